//! The ledger rules: append-only entries; a hold before a request runs, a settlement after;
//! the request id as a permanent idempotency key; expiry; a hash chain over every entry.
//!
//! Rules, as enforced here:
//! - `available = balance − active holds`, and an operation that would make it negative is
//!   refused, so it never is. Balance = top-ups − settlements + refunds.
//! - A hold is sized for the request's input and its maximum output; it is active until it is
//!   settled, voided or expired (`expires_at`, default 10 minutes after it was placed).
//! - A settlement charges the actual usage, at most the hold, and only while the hold is active.
//! - A request id, once used by an operation, answers that operation again with the first
//!   outcome when the body is the same, and with [`LedgerError::IdempotencyConflict`] when not.
//!   Nothing is written either way.
//! - Each entry's hash covers its fields and the previous entry's hash; [`verify`] names the first
//!   entry that does not fit.
//!
//! Atomicity is the store's: every operation here reads and appends through one `&mut` store,
//! which the caller holds for the whole operation (a mutex for [`MemoryStore`], a transaction
//! for SQLite).

use sha2::{Digest, Sha256};
use synesis_proto::{AccountId, MicroUsd, RequestId, UnixMillis};

use crate::cost::{BillingError, Usage, quote};
use crate::quota::{QuotaExceeded, admit_free, quota_period};
use crate::{PriceTable, Tier, TierRules};

/// How long a hold stays active if it is never settled.
pub const HOLD_TTL_DEFAULT_MS: i64 = 10 * 60 * 1_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    TopUp,
    Hold,
    Settle,
    Void,
    Expire,
    Refund,
}

impl EntryKind {
    const ALL: [EntryKind; 6] = [
        EntryKind::TopUp,
        EntryKind::Hold,
        EntryKind::Settle,
        EntryKind::Void,
        EntryKind::Expire,
        EntryKind::Refund,
    ];

    /// The stable number a store keeps (and the hash covers).
    pub fn code(self) -> u8 {
        match self {
            EntryKind::TopUp => 1,
            EntryKind::Hold => 2,
            EntryKind::Settle => 3,
            EntryKind::Void => 4,
            EntryKind::Expire => 5,
            EntryKind::Refund => 6,
        }
    }

    pub fn from_code(code: u8) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|k| k.code() == code)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub account: AccountId,
    pub request_id: RequestId,
    pub kind: EntryKind,
    pub model: String,
    /// Never negative; the kind says which way it moves the balance.
    pub amount: MicroUsd,
    pub quota_tokens: u64,
    /// SHA-256 of the request body, for idempotency.
    pub body: [u8; 32],
    pub at: UnixMillis,
    pub expires_at: Option<UnixMillis>,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

impl Entry {
    /// The hash of this entry's fields and the previous hash (the chain link).
    pub fn compute_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.prev_hash);
        h.update(self.seq.to_le_bytes());
        h.update(self.account.as_bytes());
        h.update(self.request_id.as_bytes());
        h.update([self.kind.code()]);
        h.update((self.model.len() as u64).to_le_bytes());
        h.update(self.model.as_bytes());
        h.update(self.amount.0.to_le_bytes());
        h.update(self.quota_tokens.to_le_bytes());
        h.update(self.body);
        h.update(self.at.0.to_le_bytes());
        match self.expires_at {
            Some(t) => {
                h.update([1]);
                h.update(t.0.to_le_bytes());
            }
            None => h.update([0]),
        }
        h.finalize().into()
    }
}

/// A storage failure, as text (each store has its own error type).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger storage: {0}")]
pub struct StoreError(pub String);

/// Where entries live. Implementations append atomically and in order.
pub trait Store {
    /// Every entry of `account`, in sequence order.
    fn account_entries(&self, account: AccountId) -> Result<Vec<Entry>, StoreError>;
    /// The entries of one request of one account, in sequence order.
    fn request_entries(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Vec<Entry>, StoreError>;
    /// The next sequence number and the hash of the last entry (zeros when empty).
    fn head(&self) -> Result<(u64, [u8; 32]), StoreError>;
    fn append(&mut self, entry: Entry) -> Result<(), StoreError>;
}

/// Entries in memory: for tests, and the shape the SQLite store follows.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    pub entries: Vec<Entry>,
}

impl Store for MemoryStore {
    fn account_entries(&self, account: AccountId) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .entries
            .iter()
            .filter(|e| e.account == account)
            .cloned()
            .collect())
    }

    fn request_entries(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Vec<Entry>, StoreError> {
        Ok(self
            .entries
            .iter()
            .filter(|e| e.account == account && e.request_id == request)
            .cloned()
            .collect())
    }

    fn head(&self) -> Result<(u64, [u8; 32]), StoreError> {
        Ok(self
            .entries
            .last()
            .map_or((0, [0; 32]), |e| (e.seq + 1, e.hash)))
    }

    fn append(&mut self, entry: Entry) -> Result<(), StoreError> {
        self.entries.push(entry);
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Billing(#[from] BillingError),
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    #[error("the request id was used before with a different body")]
    IdempotencyConflict,
    #[error("available balance {available} does not cover {needed}")]
    InsufficientFunds {
        needed: MicroUsd,
        available: MicroUsd,
    },
    #[error("no hold for this request")]
    NoHold,
    #[error("the hold expired; the request must be placed again")]
    HoldExpired,
    #[error("the hold was voided")]
    HoldVoided,
    #[error("an amount must be positive")]
    NotPositive,
    #[error("the amount does not fit")]
    Overflow,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An account as the rules see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub tier: Tier,
}

/// What an account holds at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Balance {
    pub balance: MicroUsd,
    pub held: MicroUsd,
    pub available: MicroUsd,
    /// Free quota tokens used in the month of `now`: settled plus held.
    pub quota_tokens_used: u64,
}

/// The outcome of a hold or a settlement (the same again for a retry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub amount: MicroUsd,
    pub quota_tokens: u64,
    pub expires_at: Option<UnixMillis>,
}

fn body(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().into()
}

/// The first outcome again when `request_id` was used for the same operation with the same
/// body; a conflict when it was used otherwise; `None` when it is new.
fn replay(
    store: &impl Store,
    account: AccountId,
    request_id: RequestId,
    kind: EntryKind,
    body: &[u8; 32],
) -> Result<Option<Outcome>, LedgerError> {
    match store.request_entries(account, request_id)?.first() {
        None => Ok(None),
        Some(first) if first.kind == kind && first.body == *body => Ok(Some(outcome(first))),
        Some(_) => Err(LedgerError::IdempotencyConflict),
    }
}

fn outcome(e: &Entry) -> Outcome {
    Outcome {
        amount: e.amount,
        quota_tokens: e.quota_tokens,
        expires_at: e.expires_at,
    }
}

struct Draft<'a> {
    account: AccountId,
    request_id: RequestId,
    kind: EntryKind,
    model: &'a str,
    amount: MicroUsd,
    quota_tokens: u64,
    body: [u8; 32],
    at: UnixMillis,
    expires_at: Option<UnixMillis>,
}

fn append(store: &mut impl Store, d: Draft<'_>) -> Result<Entry, LedgerError> {
    debug_assert!(d.amount >= MicroUsd::ZERO);
    let (seq, prev_hash) = store.head()?;
    let mut e = Entry {
        seq,
        account: d.account,
        request_id: d.request_id,
        kind: d.kind,
        model: d.model.to_owned(),
        amount: d.amount,
        quota_tokens: d.quota_tokens,
        body: d.body,
        at: d.at,
        expires_at: d.expires_at,
        prev_hash,
        hash: [0; 32],
    };
    e.hash = e.compute_hash();
    store.append(e.clone())?;
    Ok(e)
}

/// Whether the hold of `entries` (one request's) is active at `now`.
fn active_hold(entries: &[Entry], now: UnixMillis) -> Option<&Entry> {
    let hold = entries.iter().find(|e| e.kind == EntryKind::Hold)?;
    let closed = entries.iter().any(|e| {
        matches!(
            e.kind,
            EntryKind::Settle | EntryKind::Void | EntryKind::Expire
        )
    });
    let live = hold.expires_at.is_none_or(|t| now < t);
    (!closed && live).then_some(hold)
}

pub fn balance(
    store: &impl Store,
    account: AccountId,
    now: UnixMillis,
) -> Result<Balance, LedgerError> {
    let entries = store.account_entries(account)?;
    let period = quota_period(now);
    let mut balance = MicroUsd::ZERO;
    let mut held = MicroUsd::ZERO;
    let mut quota: u64 = 0;
    let add = |a: MicroUsd, b: MicroUsd| a.checked_add(b).ok_or(LedgerError::Overflow);
    for e in &entries {
        match e.kind {
            EntryKind::TopUp | EntryKind::Refund => balance = add(balance, e.amount)?,
            EntryKind::Settle => {
                balance = balance.checked_sub(e.amount).ok_or(LedgerError::Overflow)?;
                if quota_period(e.at) == period {
                    quota = quota.saturating_add(e.quota_tokens);
                }
            }
            EntryKind::Hold => {
                let same: Vec<Entry> = entries
                    .iter()
                    .filter(|x| x.request_id == e.request_id)
                    .cloned()
                    .collect();
                if active_hold(&same, now).is_some() {
                    held = add(held, e.amount)?;
                    quota = quota.saturating_add(e.quota_tokens);
                }
            }
            EntryKind::Void | EntryKind::Expire => {}
        }
    }
    let available = balance.checked_sub(held).ok_or(LedgerError::Overflow)?;
    // The invariant, checked where it is read as well as where it is written.
    debug_assert!(
        available >= MicroUsd::ZERO,
        "available balance below zero: {available:?}"
    );
    Ok(Balance {
        balance,
        held,
        available,
        quota_tokens_used: quota,
    })
}

/// Adds credit (a voucher, a payment).
pub fn top_up(
    store: &mut impl Store,
    account: AccountId,
    request_id: RequestId,
    amount: MicroUsd,
    now: UnixMillis,
) -> Result<Outcome, LedgerError> {
    if amount <= MicroUsd::ZERO {
        return Err(LedgerError::NotPositive);
    }
    let body = body(&[b"top-up", &amount.0.to_le_bytes()]);
    if let Some(first) = replay(store, account, request_id, EntryKind::TopUp, &body)? {
        return Ok(first);
    }
    balance(store, account, now)?
        .balance
        .checked_add(amount)
        .ok_or(LedgerError::Overflow)?;
    let e = append(
        store,
        Draft {
            account,
            request_id,
            kind: EntryKind::TopUp,
            model: "",
            amount,
            quota_tokens: 0,
            body,
            at: now,
            expires_at: None,
        },
    );
    Ok(outcome(&e?))
}

/// What a request asks before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub model: String,
    pub input_tokens: u64,
    pub max_output_tokens: u64,
}

/// Reserves what the request can cost at most, or refuses it (funds, quota, prices).
#[allow(clippy::too_many_arguments)] // the rules' inputs, each one distinct
pub fn hold(
    store: &mut impl Store,
    account: Account,
    request_id: RequestId,
    request: &HoldRequest,
    now: UnixMillis,
    ttl_ms: i64,
    prices: &PriceTable,
    rules: &TierRules,
) -> Result<Outcome, LedgerError> {
    let body = body(&[
        b"hold",
        request.model.as_bytes(),
        &request.input_tokens.to_le_bytes(),
        &request.max_output_tokens.to_le_bytes(),
    ]);
    if let Some(first) = replay(store, account.id, request_id, EntryKind::Hold, &body)? {
        return Ok(first);
    }
    let usage = Usage {
        input_tokens: request.input_tokens,
        output_tokens: request.max_output_tokens,
    };
    let q = quote(account.tier, &request.model, usage, prices, rules)?;
    let state = balance(store, account.id, now)?;
    if account.tier == Tier::Free {
        admit_free(
            state.quota_tokens_used,
            q.quota_tokens,
            rules.free_quota_tokens,
        )?;
    }
    if q.total > state.available {
        return Err(LedgerError::InsufficientFunds {
            needed: q.total,
            available: state.available,
        });
    }
    let expires_at = Some(UnixMillis(
        now.0.checked_add(ttl_ms).ok_or(LedgerError::Overflow)?,
    ));
    let e = append(
        store,
        Draft {
            account: account.id,
            request_id,
            kind: EntryKind::Hold,
            model: &request.model,
            amount: q.total,
            quota_tokens: q.quota_tokens,
            body,
            at: now,
            expires_at,
        },
    );
    Ok(outcome(&e?))
}

/// Charges the actual usage of a request that holds a hold: at most the hold.
pub fn settle(
    store: &mut impl Store,
    account: Account,
    request_id: RequestId,
    usage: Usage,
    now: UnixMillis,
    prices: &PriceTable,
    rules: &TierRules,
) -> Result<Outcome, LedgerError> {
    let body = body(&[
        b"settle",
        &usage.input_tokens.to_le_bytes(),
        &usage.output_tokens.to_le_bytes(),
    ]);
    let entries = store.request_entries(account.id, request_id)?;
    if !entries.iter().any(|e| e.kind == EntryKind::Hold) {
        return Err(LedgerError::NoHold);
    }
    if let Some(done) = entries.iter().find(|e| e.kind == EntryKind::Settle) {
        return if done.body == body {
            Ok(outcome(done))
        } else {
            Err(LedgerError::IdempotencyConflict)
        };
    }
    if entries.iter().any(|e| e.kind == EntryKind::Void) {
        return Err(LedgerError::HoldVoided);
    }
    // One hold per request: if it is not active now, it lapsed.
    let Some(hold_entry) = active_hold(&entries, now) else {
        return Err(LedgerError::HoldExpired);
    };
    let q = quote(account.tier, &hold_entry.model, usage, prices, rules)?;
    let amount = q.total.min(hold_entry.amount);
    let quota_tokens = q.quota_tokens.min(hold_entry.quota_tokens);
    let model = hold_entry.model.clone();
    let e = append(
        store,
        Draft {
            account: account.id,
            request_id,
            kind: EntryKind::Settle,
            model: &model,
            amount,
            quota_tokens,
            body,
            at: now,
            expires_at: None,
        },
    );
    Ok(outcome(&e?))
}

/// Releases the hold of a request that will not run (or failed before it cost anything).
pub fn void(
    store: &mut impl Store,
    account: AccountId,
    request_id: RequestId,
    now: UnixMillis,
) -> Result<(), LedgerError> {
    let entries = store.request_entries(account, request_id)?;
    if entries.iter().any(|e| e.kind == EntryKind::Void) {
        return Ok(());
    }
    let Some(hold_entry) = active_hold(&entries, now) else {
        return Err(LedgerError::NoHold);
    };
    let model = hold_entry.model.clone();
    append(
        store,
        Draft {
            account,
            request_id,
            kind: EntryKind::Void,
            model: &model,
            amount: MicroUsd::ZERO,
            quota_tokens: 0,
            body: [0; 32],
            at: now,
            expires_at: None,
        },
    )?;
    Ok(())
}

/// Writes an expiry entry for every hold of `account` whose time is up. Returns how many.
pub fn expire_due(
    store: &mut impl Store,
    account: AccountId,
    now: UnixMillis,
) -> Result<usize, LedgerError> {
    let entries = store.account_entries(account)?;
    let due: Vec<(RequestId, String)> = entries
        .iter()
        .filter(|e| e.kind == EntryKind::Hold && e.expires_at.is_some_and(|t| now >= t))
        .filter(|h| {
            !entries.iter().any(|e| {
                e.request_id == h.request_id
                    && matches!(
                        e.kind,
                        EntryKind::Settle | EntryKind::Void | EntryKind::Expire
                    )
            })
        })
        .map(|h| (h.request_id, h.model.clone()))
        .collect();
    for (request_id, model) in &due {
        append(
            store,
            Draft {
                account,
                request_id: *request_id,
                kind: EntryKind::Expire,
                model,
                amount: MicroUsd::ZERO,
                quota_tokens: 0,
                body: [0; 32],
                at: now,
                expires_at: None,
            },
        )?;
    }
    Ok(due.len())
}

/// Why a chain does not verify: the first entry that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ledger entry {seq} (position {position}): {reason}")]
pub struct ChainError {
    pub position: usize,
    pub seq: u64,
    pub reason: &'static str,
}

/// Walks the chain from the start.
pub fn verify(entries: &[Entry]) -> Result<(), ChainError> {
    let mut prev = [0u8; 32];
    for (position, e) in entries.iter().enumerate() {
        let fail = |reason| {
            Err(ChainError {
                position,
                seq: e.seq,
                reason,
            })
        };
        if e.seq != position as u64 {
            return fail("out of sequence (an entry was removed or moved)");
        }
        if e.prev_hash != prev {
            return fail("does not follow the entry before it");
        }
        if e.hash != e.compute_hash() {
            return fail("its contents were changed");
        }
        prev = e.hash;
    }
    Ok(())
}
