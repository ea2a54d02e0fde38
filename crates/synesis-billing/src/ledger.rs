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
//!
//! Cost: no operation reads an account's history. A store keeps, beside the entries, each
//! account's running [`Totals`] and its open holds, which [`Totals::apply`] and
//! [`Entry::hold_change`] derive from the entries alone (so [`rebuild_states`] rebuilds them, and a
//! store's copy can be checked against the chain).

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

use synesis_proto::{AccountId, DeviceId, MicroUsd, RequestId, UnixMillis};

use crate::cost::{BillingError, Usage, quote};
use crate::quota::{QuotaExceeded, QuotaPeriod, admit_free, quota_period};
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
    pub const fn code(self) -> u8 {
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
    /// The entry's place in its account's chain: 0, 1, 2, … with no gaps.
    pub seq: u64,
    pub account: AccountId,
    pub request_id: RequestId,
    pub kind: EntryKind,
    pub model: String,
    /// The device whose request it is (`None`: the operator's, e.g. a credit).
    pub device: Option<DeviceId>,
    /// Hold: the input and the most output it reserves for; settle: the actual usage.
    pub input_tokens: u64,
    pub output_tokens: u64,
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
        match self.device {
            Some(d) => {
                h.update([1]);
                h.update(d.as_bytes());
            }
            None => h.update([0]),
        }
        h.update(self.input_tokens.to_le_bytes());
        h.update(self.output_tokens.to_le_bytes());
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

/// What an entry does to its request's hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldChange {
    /// A hold entry: the request's hold is open from now on.
    Open,
    /// A settlement, void or expiry: the request's hold is closed.
    Close,
    /// Anything else.
    None,
}

impl Entry {
    pub fn hold_change(&self) -> HoldChange {
        match self.kind {
            EntryKind::Hold => HoldChange::Open,
            EntryKind::Settle | EntryKind::Void | EntryKind::Expire => HoldChange::Close,
            EntryKind::TopUp | EntryKind::Refund => HoldChange::None,
        }
    }

    /// The open hold this entry places (for a hold entry).
    pub fn open_hold(&self) -> OpenHold {
        OpenHold {
            request_id: self.request_id,
            amount: self.amount,
            quota_tokens: self.quota_tokens,
            expires_at: self.expires_at,
        }
    }
}

/// An account's running totals, derived from its entries; a store keeps them beside the
/// entries so that no operation reads the account's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Totals {
    /// Top-ups + refunds − settlements.
    pub balance: MicroUsd,
    /// The UTC month `quota_settled` counts (that of the latest settlement).
    pub quota_period: Option<QuotaPeriod>,
    /// Free quota tokens settled in `quota_period`.
    pub quota_settled: u64,
    /// The sum of the open holds (active or past their time but not yet expired by an entry).
    pub open_held: MicroUsd,
    /// The quota tokens of the open holds.
    pub open_quota: u64,
}

impl Totals {
    /// Folds in one of the account's entries (in sequence order); `closed` is the hold a
    /// settlement, void or expiry closes.
    pub fn apply(&mut self, e: &Entry, closed: Option<&OpenHold>) -> Result<(), LedgerError> {
        if let Some(h) = closed {
            self.open_held = self
                .open_held
                .checked_sub(h.amount)
                .ok_or(LedgerError::Overflow)?;
            self.open_quota = self
                .open_quota
                .checked_sub(h.quota_tokens)
                .ok_or(LedgerError::Overflow)?;
        }
        match e.kind {
            EntryKind::TopUp | EntryKind::Refund => {
                self.balance = self
                    .balance
                    .checked_add(e.amount)
                    .ok_or(LedgerError::Overflow)?;
            }
            EntryKind::Settle => {
                self.balance = self
                    .balance
                    .checked_sub(e.amount)
                    .ok_or(LedgerError::Overflow)?;
                let period = quota_period(e.at);
                if period > self.quota_period {
                    self.quota_period = period;
                    self.quota_settled = 0;
                }
                // A settlement dated in an earlier month than the latest counts for that
                // month, which is over; it does not count against this one.
                if period == self.quota_period {
                    self.quota_settled = self.quota_settled.saturating_add(e.quota_tokens);
                }
            }
            EntryKind::Hold => {
                self.open_held = self
                    .open_held
                    .checked_add(e.amount)
                    .ok_or(LedgerError::Overflow)?;
                self.open_quota = self
                    .open_quota
                    .checked_add(e.quota_tokens)
                    .ok_or(LedgerError::Overflow)?;
            }
            EntryKind::Void | EntryKind::Expire => {}
        }
        Ok(())
    }

    /// Free quota tokens settled in the month of `now`.
    pub fn quota_settled_at(&self, now: UnixMillis) -> u64 {
        if self.quota_period.is_some() && self.quota_period == quota_period(now) {
            self.quota_settled
        } else {
            0
        }
    }
}

/// A hold not yet closed by a settlement, void or expiry entry (it may be past its time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenHold {
    pub request_id: RequestId,
    pub amount: MicroUsd,
    pub quota_tokens: u64,
    pub expires_at: Option<UnixMillis>,
}

impl OpenHold {
    pub fn active_at(&self, now: UnixMillis) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// What a store keeps per account beside the entries, rebuilt from the entries alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountState {
    pub totals: Totals,
    /// By request id.
    pub open_holds: BTreeMap<RequestId, OpenHold>,
}

impl AccountState {
    pub fn apply(&mut self, e: &Entry) -> Result<(), LedgerError> {
        let closed = match e.hold_change() {
            HoldChange::Close => self.open_holds.get(&e.request_id).copied(),
            HoldChange::Open | HoldChange::None => None,
        };
        self.totals.apply(e, closed.as_ref())?;
        match e.hold_change() {
            HoldChange::Open => {
                self.open_holds.insert(e.request_id, e.open_hold());
            }
            HoldChange::Close => {
                self.open_holds.remove(&e.request_id);
            }
            HoldChange::None => {}
        }
        Ok(())
    }
}

/// Every account's state, from the entries (in sequence order): what a store's kept state
/// must equal.
pub fn rebuild_states(entries: &[Entry]) -> Result<BTreeMap<AccountId, AccountState>, LedgerError> {
    let mut states: BTreeMap<AccountId, AccountState> = BTreeMap::new();
    for e in entries {
        states.entry(e.account).or_default().apply(e)?;
    }
    Ok(states)
}

/// A storage failure: what kind (callers branch on it), and the store's own words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store was busy (another writer held it, a serialisation conflict, a full queue):
    /// nothing was written, and the same operation, with the same request id, may be retried.
    #[error("ledger storage is busy, nothing was written: {0}")]
    Conflict(String),
    /// A rule the store enforces refused the write (a duplicate key, a check): retrying the same
    /// write gets the same answer.
    #[error("ledger storage refused the write: {0}")]
    Constraint(String),
    /// The store cannot be read or written now (IO, a full disk, a stopped writer).
    #[error("ledger storage is unavailable: {0}")]
    Unavailable(String),
    /// What the store holds does not read as ledger data.
    #[error("ledger storage holds data this build cannot read: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether the same operation may succeed if tried again (nothing was written).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Conflict(_))
    }
}

/// Where entries live. Implementations append atomically and in order, and keep each account's
/// [`Totals`] and open holds as the entries say.
pub trait Store {
    /// The entries of one request of one account, in sequence order.
    fn request_entries(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Vec<Entry>, StoreError>;
    /// The account's chain: the next sequence number in it and the hash of its last entry
    /// (zeros for an account without entries). Accounts chain independently, so writers for
    /// different accounts never wait for each other (ARCHITECTURE.md §4).
    fn head(&self, account: AccountId) -> Result<(u64, [u8; 32]), StoreError>;
    /// The account's totals (all zero for an account without entries).
    fn totals(&self, account: AccountId) -> Result<Totals, StoreError>;
    /// The account's open holds that are past their time at `now` (not active, not yet
    /// expired by an entry): normally none, as holds are settled within seconds.
    fn lapsed_holds(
        &self,
        account: AccountId,
        now: UnixMillis,
    ) -> Result<Vec<OpenHold>, StoreError>;
    /// Appends `entry`, keeps `totals` as its account's totals and opens or closes its
    /// request's hold as [`Entry::hold_change`] says: all in the caller's unit of work.
    fn append(&mut self, entry: &Entry, totals: &Totals) -> Result<(), StoreError>;
}

/// Entries in memory: for tests, and the shape the SQLite store follows.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    pub entries: Vec<Entry>,
    states: BTreeMap<AccountId, AccountState>,
}

impl Store for MemoryStore {
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

    fn head(&self, account: AccountId) -> Result<(u64, [u8; 32]), StoreError> {
        Ok(self
            .entries
            .iter()
            .rev()
            .find(|e| e.account == account)
            .map_or((0, [0; 32]), |e| (e.seq + 1, e.hash)))
    }

    fn totals(&self, account: AccountId) -> Result<Totals, StoreError> {
        Ok(self
            .states
            .get(&account)
            .map(|s| s.totals)
            .unwrap_or_default())
    }

    fn lapsed_holds(
        &self,
        account: AccountId,
        now: UnixMillis,
    ) -> Result<Vec<OpenHold>, StoreError> {
        Ok(self
            .states
            .get(&account)
            .map(|s| {
                s.open_holds
                    .values()
                    .filter(|h| !h.active_at(now))
                    .copied()
                    .collect()
            })
            .unwrap_or_default())
    }

    fn append(&mut self, entry: &Entry, totals: &Totals) -> Result<(), StoreError> {
        let state = self.states.entry(entry.account).or_default();
        let mut next = state.clone();
        next.apply(entry)
            .map_err(|e| StoreError::Constraint(e.to_string()))?;
        if next.totals != *totals {
            return Err(StoreError::Constraint(
                "the totals do not follow from the entry".into(),
            ));
        }
        *state = next;
        self.entries.push(entry.clone());
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerError {
    #[error(transparent)]
    Billing(#[from] BillingError),
    #[error(transparent)]
    Quota(#[from] QuotaExceeded),
    /// The asking member's own monthly quota (an account's member may have one).
    #[error(
        "this member's monthly quota of {} tokens would be exceeded: {} used, {} more asked",
        .0.quota, .0.used, .0.requested
    )]
    MemberQuota(QuotaExceeded),
    #[error("the request id was used before with a different body")]
    IdempotencyConflict,
    /// The account has as many requests running as it may (on any node of the cloud).
    #[error("the account already has {0} requests running; wait for one to finish")]
    Running(usize),
    /// The request runs on another node of the cloud that is still serving: it continues
    /// there, or here once that node is known dead.
    #[error("this request is running on another node of the cloud; retry in a moment")]
    RunningElsewhere,
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
    device: Option<DeviceId>,
    usage: Usage,
    amount: MicroUsd,
    quota_tokens: u64,
    body: [u8; 32],
    at: UnixMillis,
    expires_at: Option<UnixMillis>,
    /// The hold this entry closes (a settlement, void or expiry).
    closes: Option<OpenHold>,
}

impl Draft<'_> {
    /// An entry that moves no money: a void or an expiry of the request's hold.
    fn closing(account: AccountId, hold: OpenHold, kind: EntryKind, at: UnixMillis) -> Self {
        Draft {
            account,
            request_id: hold.request_id,
            kind,
            model: "",
            device: None,
            usage: Usage {
                input_tokens: 0,
                output_tokens: 0,
            },
            amount: MicroUsd::ZERO,
            quota_tokens: 0,
            body: [0; 32],
            at,
            expires_at: None,
            closes: Some(hold),
        }
    }
}

fn append(store: &mut impl Store, d: Draft<'_>) -> Result<Entry, LedgerError> {
    debug_assert!(d.amount >= MicroUsd::ZERO);
    let (seq, prev_hash) = store.head(d.account)?;
    let mut e = Entry {
        seq,
        account: d.account,
        request_id: d.request_id,
        kind: d.kind,
        model: d.model.to_owned(),
        device: d.device,
        input_tokens: d.usage.input_tokens,
        output_tokens: d.usage.output_tokens,
        amount: d.amount,
        quota_tokens: d.quota_tokens,
        body: d.body,
        at: d.at,
        expires_at: d.expires_at,
        prev_hash,
        hash: [0; 32],
    };
    e.hash = e.compute_hash();
    let mut totals = store.totals(d.account)?;
    totals.apply(&e, d.closes.as_ref())?;
    store.append(&e, &totals)?;
    Ok(e)
}

/// The request's hold entry, when its hold is open (not settled, voided or expired by an
/// entry) and active at `now`.
fn active_hold(entries: &[Entry], now: UnixMillis) -> Option<&Entry> {
    let hold = entries.iter().find(|e| e.kind == EntryKind::Hold)?;
    let closed = entries.iter().any(|e| e.hold_change() == HoldChange::Close);
    (!closed && hold.open_hold().active_at(now)).then_some(hold)
}

pub fn balance(
    store: &impl Store,
    account: AccountId,
    now: UnixMillis,
) -> Result<Balance, LedgerError> {
    let totals = store.totals(account)?;
    let mut held = totals.open_held;
    let mut quota = totals.open_quota;
    for h in store.lapsed_holds(account, now)? {
        held = held.checked_sub(h.amount).ok_or(LedgerError::Overflow)?;
        quota = quota.saturating_sub(h.quota_tokens);
    }
    let quota = quota.saturating_add(totals.quota_settled_at(now));
    let balance = totals.balance;
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
    // An overflowing balance is refused by `append` before anything is written.
    let e = append(
        store,
        Draft {
            account,
            request_id,
            kind: EntryKind::TopUp,
            model: "",
            device: None,
            usage: Usage {
                input_tokens: 0,
                output_tokens: 0,
            },
            amount,
            quota_tokens: 0,
            body,
            at: now,
            expires_at: None,
            closes: None,
        },
    );
    Ok(outcome(&e?))
}

/// What a request asks before it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HoldRequest {
    pub model: String,
    /// The device that asks (kept on the hold and its settlement, for usage by device).
    pub device: Option<DeviceId>,
    pub input_tokens: u64,
    pub max_output_tokens: u64,
    /// The hash of the request itself (an escalation's prompt and settings), when the caller
    /// has one: the same id with another request is then a conflict, not a replay.
    pub request_body: Option<[u8; 32]>,
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
    let input = request.input_tokens.to_le_bytes();
    let max_output = request.max_output_tokens.to_le_bytes();
    let mut parts: Vec<&[u8]> = vec![b"hold", request.model.as_bytes(), &input, &max_output];
    if let Some(request_body) = &request.request_body {
        parts.push(request_body);
    }
    let body = body(&parts);
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
            device: request.device,
            usage,
            amount: q.total,
            quota_tokens: q.quota_tokens,
            body,
            at: now,
            expires_at,
            closes: None,
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
    let (model, device) = (hold_entry.model.clone(), hold_entry.device);
    let hold_open = hold_entry.open_hold();
    let e = append(
        store,
        Draft {
            account: account.id,
            request_id,
            kind: EntryKind::Settle,
            model: &model,
            device,
            usage,
            amount,
            quota_tokens,
            body,
            at: now,
            expires_at: None,
            closes: Some(hold_open),
        },
    );
    Ok(outcome(&e?))
}

/// Where a request's hold stands: what a retried request (after a restart) needs to know
/// before it runs again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldState {
    /// The request id was never used in this account.
    Unused,
    /// A hold is open and active: the request may run and settle.
    Active(Entry),
    /// Settled: the settlement entry.
    Settled(Entry),
    /// Voided: the request failed before it cost anything.
    Voided,
    /// Its time ran out before it was settled (with or without an expiry entry yet).
    Lapsed,
    /// The id was used for something other than a hold (a top-up).
    Other,
}

pub fn hold_state(
    store: &impl Store,
    account: AccountId,
    request_id: RequestId,
    now: UnixMillis,
) -> Result<HoldState, LedgerError> {
    let entries = store.request_entries(account, request_id)?;
    let Some(first) = entries.first() else {
        return Ok(HoldState::Unused);
    };
    if first.kind != EntryKind::Hold {
        return Ok(HoldState::Other);
    }
    if let Some(done) = entries.iter().find(|e| e.kind == EntryKind::Settle) {
        return Ok(HoldState::Settled(done.clone()));
    }
    if entries.iter().any(|e| e.kind == EntryKind::Void) {
        return Ok(HoldState::Voided);
    }
    Ok(match active_hold(&entries, now) {
        Some(hold) => HoldState::Active(hold.clone()),
        None => HoldState::Lapsed,
    })
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
    append(
        store,
        Draft::closing(account, hold_entry.open_hold(), EntryKind::Void, now),
    )?;
    Ok(())
}

/// Writes an expiry entry for every hold of `account` whose time is up. Returns how many.
pub fn expire_due(
    store: &mut impl Store,
    account: AccountId,
    now: UnixMillis,
) -> Result<usize, LedgerError> {
    let due = store.lapsed_holds(account, now)?;
    for hold in &due {
        append(
            store,
            Draft::closing(account, *hold, EntryKind::Expire, now),
        )?;
    }
    Ok(due.len())
}

/// Why a chain does not verify: the first entry that does not fit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("account {account}: ledger entry {seq} (position {position} of the list): {reason}")]
pub struct ChainError {
    /// The account whose chain breaks there.
    pub account: AccountId,
    /// Where the entry is in the list that was checked.
    pub position: usize,
    /// Its sequence number in its account's chain.
    pub seq: u64,
    pub reason: &'static str,
}

/// Walks every account's chain from its start. `entries` holds whole chains, each in sequence
/// order (accounts may interleave); the first entry that does not follow its account's
/// previous one is named.
pub fn verify(entries: &[Entry]) -> Result<(), ChainError> {
    let mut heads: BTreeMap<AccountId, (u64, [u8; 32])> = BTreeMap::new();
    for (position, e) in entries.iter().enumerate() {
        let fail = |reason| {
            Err(ChainError {
                account: e.account,
                position,
                seq: e.seq,
                reason,
            })
        };
        let (next, prev) = heads.get(&e.account).copied().unwrap_or((0, [0; 32]));
        if e.seq != next {
            return fail("out of sequence (an entry was removed or moved)");
        }
        if e.prev_hash != prev {
            return fail("does not follow the entry before it");
        }
        if e.hash != e.compute_hash() {
            return fail("its contents were changed");
        }
        heads.insert(e.account, (next + 1, e.hash));
    }
    Ok(())
}
