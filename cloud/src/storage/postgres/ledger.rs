//! The ledger on PostgreSQL: `synesis-billing`'s [`Store`] and a group-commit writer, with
//! the SQLite writer's contract (operations run one after another in arrival order, each sees
//! the ones before it, a refused one leaves no trace, an answer means the batch is durable).
//!
//! What differs is where the time goes. Every statement is a round trip to the server, so a
//! batch does not write as it goes:
//!
//! - An operation's reads go to the database once per batch and account (its chain head, its
//!   totals, its open holds) and once per request; after that they are answered from what the
//!   batch holds. The account is locked first (`pg_advisory_xact_lock` on its id, held to the
//!   end of the transaction), so nothing the batch read can change under it: two writers, on
//!   one node or several, never interleave operations of one account (holds never overdraw,
//!   one request id is one request per account).
//! - Its writes go into the batch; a refused or panicking operation's writes are undone there
//!   (an undo log), so no savepoint is needed.
//! - At the end, the batch's new entries, the holds it opened and closed, and the totals of the
//!   accounts it touched go out as four statements over arrays (`UNNEST`), pipelined, then one
//!   `COMMIT`: a handful of round trips per batch whatever its size.
//!
//! Two writers whose batches lock the same accounts in opposite orders can deadlock; PostgreSQL
//! ends one of the transactions, and its batch is answered `Conflict` (retryable: nothing was
//! written, and the request ids make a retry safe).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::panic::{AssertUnwindSafe, catch_unwind};

use synesis_billing::ledger::{
    Entry, EntryKind, HoldChange, LedgerError, OpenHold, Store, StoreError, Totals,
};
use synesis_proto::{AccountId, DeviceId, MicroUsd, RequestId, UnixMillis};
use tokio::sync::{mpsc, oneshot};

use super::{COLUMNS, i64_of, read_entry, read_hold, read_totals, store_error};
use crate::storage::StorageError;
use crate::storage::answers::{Asker, StoredAnswer};
use crate::storage::ledger::{
    BatchObserver, MAX_BATCH, Observer, QUEUE, answer_of, next_batch, stopped,
};

/// How far ahead of an operation's time the batch reads an account's open holds (see
/// `PgLedger::load_holds`): a batch of operations made within this much of each other reads
/// them once. The holds the ledger opens live far longer (ten minutes by default), so a busy
/// account's fresh holds are not read at all.
const HOLDS_AHEAD_MS: i64 = 60_000;

/// The writer's own connection, driven by a runtime on the writer's thread.
struct Conn {
    client: tokio_postgres::Client,
    runtime: tokio::runtime::Runtime,
    statements: Statements,
}

/// The statements the writer runs, prepared once per connection.
struct Statements {
    lock: tokio_postgres::Statement,
    lock_all: tokio_postgres::Statement,
    prefetch_requests: tokio_postgres::Statement,
    prefetch_heads: tokio_postgres::Statement,
    prefetch_totals: tokio_postgres::Statement,
    request: tokio_postgres::Statement,
    head: tokio_postgres::Statement,
    totals: tokio_postgres::Statement,
    holds: tokio_postgres::Statement,
    insert_entries: tokio_postgres::Statement,
    delete_holds: tokio_postgres::Statement,
    insert_holds: tokio_postgres::Statement,
    upsert_totals: tokio_postgres::Statement,
    insert_answers: tokio_postgres::Statement,
    redeem_vouchers: tokio_postgres::Statement,
}

impl Conn {
    fn open(url: &str) -> Result<Conn, StorageError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StorageError::Corrupt(format!("cannot start a runtime: {e}")))?;
        let (client, statements) = runtime.block_on(async {
            let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
                .await
                .map_err(|e| StorageError::Schema {
                    path: super::redacted(url),
                    reason: format!("cannot connect: {e}"),
                })?;
            // Driven whenever the writer waits on this runtime, which is whenever it talks to
            // the server.
            tokio::spawn(async move {
                if let Err(e) = connection.await {
                    tracing::error!(error = %e, "the ledger writer's PostgreSQL connection ended");
                }
            });
            // Every statement planned for what the tables hold when it runs. A prepared
            // statement otherwise settles on a generic plan made once, and one made while a
            // new database's ledger was nearly empty scans every entry for each key until the
            // tables are next analysed: at 512 clients the batch's request reads took 27 ms
            // each, then grew with the ledger. Planning costs a fraction of a millisecond per
            // statement; a batch runs a handful.
            client
                .batch_execute("SET plan_cache_mode = force_custom_plan")
                .await?;
            let statements = Statements::prepare(&client).await?;
            Ok::<_, StorageError>((client, statements))
        })?;
        Ok(Conn {
            client,
            runtime,
            statements,
        })
    }

    fn wait<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(f)
    }
}

impl Statements {
    async fn prepare(c: &tokio_postgres::Client) -> Result<Statements, tokio_postgres::Error> {
        Ok(Statements {
            lock: c.prepare("SELECT pg_advisory_xact_lock($1)").await?,
            // In the order given (sorted by the caller), so that two writers locking the same
            // accounts take them in the same order.
            lock_all: c
                .prepare("SELECT pg_advisory_xact_lock(k) FROM UNNEST($1::bigint[]) WITH ORDINALITY AS x (k, n) ORDER BY n")
                .await?,
            prefetch_requests: c
                .prepare(&format!(
                    "SELECT {} FROM ledger_entries e
                     JOIN UNNEST($1::text[], $2::text[]) AS k (a, r)
                       ON e.account_id = k.a AND e.request_id = k.r
                     ORDER BY e.account_id, e.seq",
                    prefixed("e.")
                ))
                .await?,
            prefetch_heads: c
                // One backward step on the key per account (a `DISTINCT ON` over the accounts'
                // entries would read and sort all of them).
                .prepare(
                    "SELECT a.id, h.seq, h.hash FROM UNNEST($1::text[]) AS a (id)
                     CROSS JOIN LATERAL (
                        SELECT seq, hash FROM ledger_entries WHERE account_id = a.id
                        ORDER BY seq DESC LIMIT 1
                     ) AS h",
                )
                .await?,
            prefetch_totals: c
                .prepare(
                    "SELECT account_id, balance, quota_year, quota_month, quota_settled, open_held, open_quota
                     FROM ledger_totals WHERE account_id = ANY($1::text[])",
                )
                .await?,
            request: c
                .prepare(&format!(
                    "SELECT {COLUMNS} FROM ledger_entries WHERE account_id = $1 AND request_id = $2 ORDER BY seq"
                ))
                .await?,
            head: c
                .prepare(
                    "SELECT seq, hash FROM ledger_entries WHERE account_id = $1 ORDER BY seq DESC LIMIT 1",
                )
                .await?,
            totals: c
                .prepare(
                    "SELECT balance, quota_year, quota_month, quota_settled, open_held, open_quota
                     FROM ledger_totals WHERE account_id = $1",
                )
                .await?,
            holds: c
                .prepare(
                    "SELECT request_id, amount, quota_tokens, expires_at FROM ledger_open_holds
                     WHERE account_id = $1 AND expires_at <= $2",
                )
                .await?,
            insert_entries: c
                .prepare(&format!(
                    "INSERT INTO ledger_entries ({COLUMNS})
                     SELECT * FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[],
                        $5::text[], $6::text[], $7::bigint[], $8::bigint[], $9::bigint[],
                        $10::bigint[], $11::bytea[], $12::bigint[], $13::bigint[], $14::bytea[],
                        $15::bytea[])"
                ))
                .await?,
            delete_holds: c
                .prepare(
                    "DELETE FROM ledger_open_holds h
                     USING UNNEST($1::text[], $2::text[]) AS d (account_id, request_id)
                     WHERE h.account_id = d.account_id AND h.request_id = d.request_id",
                )
                .await?,
            insert_holds: c
                .prepare(
                    "INSERT INTO ledger_open_holds (account_id, request_id, seq, amount, quota_tokens, expires_at)
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[],
                        $5::bigint[], $6::bigint[])",
                )
                .await?,
            upsert_totals: c
                .prepare(
                    "INSERT INTO ledger_totals (account_id, balance, quota_year, quota_month,
                        quota_settled, open_held, open_quota)
                     SELECT * FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $4::bigint[],
                        $5::bigint[], $6::bigint[], $7::bigint[])
                     ON CONFLICT (account_id) DO UPDATE SET balance = EXCLUDED.balance,
                        quota_year = EXCLUDED.quota_year, quota_month = EXCLUDED.quota_month,
                        quota_settled = EXCLUDED.quota_settled, open_held = EXCLUDED.open_held,
                        open_quota = EXCLUDED.open_quota",
                )
                .await?,
            insert_answers: c
                .prepare(
                    "INSERT INTO escalation_answers (account_id, request_id, body, chunks, done, at)
                     SELECT * FROM UNNEST($1::text[], $2::text[], $3::bytea[], $4::text[],
                        $5::bytea[], $6::bigint[])",
                )
                .await?,
            redeem_vouchers: c
                .prepare(
                    "UPDATE vouchers v SET redeemed_by = r.by, redeemed_account = r.account,
                        redeemed_at = r.at
                     FROM UNNEST($1::bytea[], $2::text[], $3::text[], $4::bigint[])
                        AS r (code, by, account, at)
                     WHERE v.code_sha256 = r.code",
                )
                .await?,
        })
    }
}

/// [`COLUMNS`], each named through a table alias.
fn prefixed(alias: &str) -> String {
    COLUMNS
        .split(", ")
        .map(|c| format!("{alias}{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What the flush does with one request's open hold.
#[derive(Debug, Clone)]
enum HoldWrite {
    /// Insert it (the database has none).
    Open { seq: u64, hold: OpenHold },
    /// Delete the database's.
    Close,
    /// Delete the database's, then insert this one.
    Replace { seq: u64, hold: OpenHold },
    /// Opened and closed within the batch: nothing.
    Neither,
}

/// How to take back one change an operation made to the batch.
enum Undo {
    Answer((AccountId, RequestId)),
    Voucher([u8; 32], Voucher),
    Head(AccountId, Option<(u64, [u8; 32])>),
    Totals(AccountId, Option<Totals>, bool),
    Request((AccountId, RequestId)),
    Entry,
    Hold {
        key: (AccountId, RequestId),
        write: Option<HoldWrite>,
    },
}

/// The batch: what it read (as of its locks) and what it will write.
#[derive(Default)]
struct Batch {
    locked: HashSet<AccountId>,
    heads: HashMap<AccountId, (u64, [u8; 32])>,
    totals: HashMap<AccountId, Totals>,
    requests: HashMap<(AccountId, RequestId), Vec<Entry>>,
    /// Each account's open holds that lapse by a time (the map's key), as far as the batch
    /// read them: enough to answer which are lapsed at any time up to it.
    holds: HashMap<AccountId, (UnixMillis, HashMap<RequestId, OpenHold>)>,
    entries: Vec<Entry>,
    dirty: HashSet<AccountId>,
    hold_writes: HashMap<(AccountId, RequestId), HoldWrite>,
    /// Answers stored by the batch's operations, written at the flush.
    answers: HashMap<(AccountId, RequestId), (StoredAnswer, UnixMillis)>,
    /// The vouchers the batch read (locked), as its operations left them; the changed ones
    /// are written at the flush.
    vouchers: HashMap<[u8; 32], Voucher>,
    /// The running operation's changes, newest last.
    undo: Vec<Undo>,
}

/// A voucher as the batch sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Voucher {
    amount: i64,
    /// The request and account that redeemed it, and when.
    redeemed: Option<(String, String, i64)>,
    changed: bool,
}

impl Batch {
    /// Takes back everything the running operation changed.
    fn roll_back(&mut self) {
        while let Some(u) = self.undo.pop() {
            match u {
                Undo::Answer(key) => {
                    self.answers.remove(&key);
                }
                Undo::Voucher(code, before) => {
                    self.vouchers.insert(code, before);
                }
                Undo::Head(a, Some(h)) => {
                    self.heads.insert(a, h);
                }
                Undo::Head(a, None) => {
                    self.heads.remove(&a);
                }
                Undo::Totals(a, t, dirty) => {
                    match t {
                        Some(t) => self.totals.insert(a, t),
                        None => self.totals.remove(&a),
                    };
                    if !dirty {
                        self.dirty.remove(&a);
                    }
                }
                Undo::Request(key) => {
                    if let Some(list) = self.requests.get_mut(&key) {
                        list.pop();
                    }
                }
                Undo::Entry => {
                    self.entries.pop();
                }
                Undo::Hold { key, write } => {
                    match write {
                        Some(w) => self.hold_writes.insert(key, w),
                        None => self.hold_writes.remove(&key),
                    };
                    // Read again when next asked: the database and the batch's writes are
                    // what the account's holds are.
                    self.holds.remove(&key.0);
                }
            }
        }
    }
}

/// The ledger store inside one batch of the PostgreSQL writer.
pub struct PgLedger<'b> {
    conn: &'b Conn,
    batch: &'b RefCell<Batch>,
}

impl std::fmt::Debug for PgLedger<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgLedger").finish_non_exhaustive()
    }
}

impl PgLedger<'_> {
    fn query(
        &self,
        statement: &tokio_postgres::Statement,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.conn
            .wait(self.conn.client.query(statement, params))
            .map_err(|e| store_error(&e))
    }

    /// Takes the account's lock for the rest of the transaction (once per batch).
    fn lock(&self, account: AccountId) -> Result<(), StoreError> {
        if self.batch.borrow().locked.contains(&account) {
            return Ok(());
        }
        self.query(&self.conn.statements.lock, &[&lock_key(account)])?;
        self.batch.borrow_mut().locked.insert(account);
        Ok(())
    }

    /// The account's open holds as the batch sees them, those that lapse after
    /// `now` + [`HOLDS_AHEAD_MS`] left out: the database is asked for a window of time ahead, not
    /// for every open hold of a busy account.
    fn load_holds(&self, account: AccountId, now: UnixMillis) -> Result<(), StoreError> {
        if let Some((until, _)) = self.batch.borrow().holds.get(&account)
            && now <= *until
        {
            return Ok(());
        }
        let until = UnixMillis(now.0.saturating_add(HOLDS_AHEAD_MS));
        let rows = self.query(
            &self.conn.statements.holds,
            &[&account.to_string(), &until.0],
        )?;
        let mut holds = rows
            .iter()
            .map(|r| read_hold(r, 0).map(|h| (h.request_id, h)))
            .collect::<Result<HashMap<_, _>, _>>()?;
        let mut batch = self.batch.borrow_mut();
        for ((a, request), write) in &batch.hold_writes {
            if *a != account {
                continue;
            }
            match write {
                HoldWrite::Open { hold, .. } | HoldWrite::Replace { hold, .. } => {
                    holds.insert(*request, *hold);
                }
                HoldWrite::Close | HoldWrite::Neither => {
                    holds.remove(request);
                }
            }
        }
        batch.holds.insert(account, (until, holds));
        Ok(())
    }
}

impl PgLedger<'_> {
    /// A statement outside the prepared ones, in the batch's transaction.
    fn sql(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.conn
            .wait(self.conn.client.query(sql, params))
            .map_err(|e| store_error(&e))
    }

    /// The accounts with an open hold past its time at `now`.
    pub fn accounts_with_lapsed_holds(
        &self,
        now: UnixMillis,
    ) -> Result<Vec<AccountId>, StoreError> {
        let rows = self.sql(
            "SELECT DISTINCT account_id FROM ledger_open_holds WHERE expires_at <= $1",
            &[&now.0],
        )?;
        rows.iter().map(|r| super::parse(r.get(0))).collect()
    }

    /// `SqliteLedger::redeem_voucher`'s rules: the voucher's row locked for the batch, its
    /// redemption written at the flush.
    pub fn redeem_voucher(
        &self,
        code: &str,
        account: AccountId,
        request: RequestId,
        now: UnixMillis,
    ) -> Result<Option<MicroUsd>, LedgerError> {
        self.lock(account)?;
        let hash = crate::storage::sha256(code.trim().as_bytes());
        let cached = self.batch.borrow().vouchers.get(&hash).cloned();
        let voucher = match cached {
            Some(v) => v,
            None => {
                let rows = self.sql(
                    "SELECT amount, redeemed_by, redeemed_account, redeemed_at FROM vouchers
                     WHERE code_sha256 = $1 FOR UPDATE",
                    &[&hash.as_slice()],
                )?;
                let Some(r) = rows.first() else {
                    return Ok(None);
                };
                let redeemed = match (r.get(1), r.get(2), r.get(3)) {
                    (Some(by), Some(account), Some(at)) => Some((by, account, at)),
                    _ => None,
                };
                let v = Voucher {
                    amount: r.get(0),
                    redeemed,
                    changed: false,
                };
                self.batch.borrow_mut().vouchers.insert(hash, v.clone());
                v
            }
        };
        let (acct, req) = (account.to_string(), request.to_string());
        match &voucher.redeemed {
            Some((by, a, _)) if *by == req && *a == acct => Ok(Some(MicroUsd(voucher.amount))),
            Some(_) => Ok(None),
            None => {
                let mine = |v: &Voucher| {
                    v.redeemed
                        .as_ref()
                        .is_some_and(|(by, a, _)| *by == req && *a == acct)
                };
                let other = self.batch.borrow().vouchers.values().any(mine)
                    || !self
                        .sql(
                            "SELECT 1 FROM vouchers WHERE redeemed_account = $1 AND redeemed_by = $2",
                            &[&acct, &req],
                        )?
                        .is_empty();
                if other {
                    return Err(LedgerError::IdempotencyConflict);
                }
                let redeemed = Voucher {
                    redeemed: Some((req, acct, now.0)),
                    changed: true,
                    ..voucher.clone()
                };
                let mut batch = self.batch.borrow_mut();
                batch.vouchers.insert(hash, redeemed);
                batch.undo.push(Undo::Voucher(hash, voucher.clone()));
                Ok(Some(MicroUsd(voucher.amount)))
            }
        }
    }
}

impl crate::storage::ledger::LedgerUnit for PgLedger<'_> {
    /// The database's open holds of the account not lapsed at `now` (those the batch closed or
    /// replaced left out), and the batch's own; the account is locked first, so every node's
    /// writer counts the same holds.
    fn running(
        &self,
        account: AccountId,
        now: UnixMillis,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        self.lock(account)?;
        let written: HashMap<RequestId, Option<OpenHold>> = self
            .batch
            .borrow()
            .hold_writes
            .iter()
            .filter(|((a, _), _)| *a == account)
            .map(|((_, request), write)| {
                let opened = match write {
                    HoldWrite::Open { hold, .. } | HoldWrite::Replace { hold, .. } => Some(*hold),
                    HoldWrite::Close | HoldWrite::Neither => None,
                };
                (*request, opened)
            })
            .collect();
        // Enough rows that `at_most` would remain with the batch's own taken out.
        let limit = i64::try_from(at_most.saturating_add(written.len())).unwrap_or(i64::MAX);
        let rows = self.sql(
            "SELECT request_id FROM ledger_open_holds
             WHERE account_id = $1 AND (expires_at IS NULL OR expires_at > $2) LIMIT $3",
            &[&account.to_string(), &now.0, &limit],
        )?;
        let mut n = 0usize;
        for r in &rows {
            let request: RequestId = super::parse(r.get(0))?;
            if !written.contains_key(&request) {
                n += 1;
            }
        }
        n += written
            .values()
            .flatten()
            .filter(|h| h.active_at(now))
            .count();
        Ok(n.min(at_most))
    }

    /// What the member's devices used this month or hold now, as the batch sees it: the
    /// database's settlements and open holds (those the batch closed or replaced left out),
    /// and the batch's own. The account is locked first, so no other writer changes them.
    fn member_quota_use(
        &self,
        device: DeviceId,
        month_start: UnixMillis,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let rows = self.sql(
            "SELECT m.id, m.quota_tokens, m.account_id FROM devices d
             JOIN members m ON m.id = d.member_id WHERE d.id = $1",
            &[&device.to_string()],
        )?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let (member, quota): (String, Option<i64>) = (row.get(0), row.get(1));
        let Some(quota) = quota else {
            return Ok(None);
        };
        let account: AccountId = super::parse(row.get(2))?;
        self.lock(account)?;
        let devices = self
            .sql("SELECT id FROM devices WHERE member_id = $1", &[&member])?
            .iter()
            .map(|r| super::parse::<DeviceId>(r.get(0)))
            .collect::<Result<HashSet<_>, _>>()?;
        let settled: i64 = self.sql(
            "SELECT COALESCE(SUM(e.input_tokens + e.output_tokens), 0)::BIGINT
             FROM ledger_entries e JOIN devices d ON d.id = e.device_id
             WHERE d.member_id = $1 AND e.kind = 3 AND e.at >= $2",
            &[&member, &month_start.0],
        )?[0]
            .get(0);
        let held = self.sql(
            "SELECT h.request_id, e.input_tokens + e.output_tokens FROM ledger_open_holds h
             JOIN ledger_entries e ON e.account_id = h.account_id AND e.seq = h.seq
             JOIN devices d ON d.id = e.device_id
             WHERE d.member_id = $1",
            &[&member],
        )?;
        let as_u64 =
            |v: i64| u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("{v} tokens")));
        let mut used = as_u64(settled)?;
        let batch = self.batch.borrow();
        for r in &held {
            let request: RequestId = super::parse(r.get(0))?;
            if !batch.hold_writes.contains_key(&(account, request)) {
                used = used.saturating_add(as_u64(r.get(1))?);
            }
        }
        let tokens = |e: &Entry| e.input_tokens.saturating_add(e.output_tokens);
        let members = |e: &&Entry| e.device.is_some_and(|d| devices.contains(&d));
        const _: () = assert!(EntryKind::Settle.code() == 3);
        for e in batch.entries.iter().filter(members) {
            if e.kind == EntryKind::Settle && e.at >= month_start {
                used = used.saturating_add(tokens(e));
            }
        }
        for ((a, _), write) in &batch.hold_writes {
            let (HoldWrite::Open { seq, .. } | HoldWrite::Replace { seq, .. }) = write else {
                continue;
            };
            let opened = batch
                .entries
                .iter()
                .filter(members)
                .find(|e| e.account == *a && e.seq == *seq);
            if let Some(e) = opened {
                used = used.saturating_add(tokens(e));
            }
        }
        Ok(Some((as_u64(quota)?, used)))
    }

    /// The member of the device the request's hold was placed for (the batch's entries
    /// included).
    fn asker(&self, account: AccountId, request: RequestId) -> Result<Option<Asker>, StoreError> {
        let entries = self.request_entries(account, request)?;
        let Some(device) = entries
            .iter()
            .find(|e| e.kind == EntryKind::Hold)
            .and_then(|e| e.device)
        else {
            return Ok(None);
        };
        let rows = self.sql(
            "SELECT member_id FROM devices WHERE id = $1",
            &[&device.to_string()],
        )?;
        Ok(rows
            .first()
            .and_then(|r| r.get::<_, Option<String>>(0))
            .map(Asker::new))
    }

    fn answer(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Option<StoredAnswer>, StoreError> {
        let pending = self
            .batch
            .borrow()
            .answers
            .get(&(account, request))
            .map(|(a, _)| a.clone());
        let found = match pending {
            Some(answer) => answer,
            None => {
                let rows = self.sql(
                    "SELECT body, chunks, done FROM escalation_answers
                     WHERE account_id = $1 AND request_id = $2",
                    &[&account.to_string(), &request.to_string()],
                )?;
                let Some(r) = rows.first() else {
                    return Ok(None);
                };
                crate::storage::answers::decode(r.get(0), r.get(1), r.get(2), None)?
            }
        };
        let asker = self.asker(account, request)?;
        Ok(Some(StoredAnswer { asker, ..found }))
    }

    fn put_answer(
        &self,
        account: AccountId,
        request: RequestId,
        answer: &StoredAnswer,
        at: UnixMillis,
    ) -> Result<(), StoreError> {
        let key = (account, request);
        let stored = self.batch.borrow().answers.contains_key(&key)
            || !self
                .sql(
                    "SELECT 1 FROM escalation_answers WHERE account_id = $1 AND request_id = $2",
                    &[&account.to_string(), &request.to_string()],
                )?
                .is_empty();
        if stored {
            return Err(StoreError::Constraint(format!(
                "an answer to request {request} is stored already"
            )));
        }
        let mut batch = self.batch.borrow_mut();
        batch.answers.insert(key, (answer.clone(), at));
        batch.undo.push(Undo::Answer(key));
        Ok(())
    }

    fn runner(&self, account: AccountId, request: RequestId) -> Result<Option<String>, StoreError> {
        self.lock(account)?;
        let rows = self.sql(
            "SELECT node FROM runs WHERE account_id = $1 AND request_id = $2",
            &[&account.to_string(), &request.to_string()],
        )?;
        Ok(rows.first().map(|r| r.get(0)))
    }

    fn set_runner(
        &self,
        account: AccountId,
        request: RequestId,
        node: &str,
    ) -> Result<(), StoreError> {
        self.lock(account)?;
        self.sql(
            "INSERT INTO runs (account_id, request_id, node) VALUES ($1, $2, $3)
             ON CONFLICT (account_id, request_id) DO UPDATE SET node = EXCLUDED.node",
            &[&account.to_string(), &request.to_string(), &node],
        )?;
        Ok(())
    }

    fn node_serving(&self, id: &str, now: UnixMillis) -> Result<bool, StoreError> {
        let since = now.0.saturating_sub(crate::storage::NODE_DEAD_AFTER_MS);
        let rows = self.sql(
            "SELECT 1 FROM nodes WHERE id = $1 AND stopped_at IS NULL AND seen_at >= $2",
            &[&id, &since],
        )?;
        Ok(!rows.is_empty())
    }
}

/// A chain's head from the last entry's `seq, hash` starting at column `at`: the next
/// sequence number and the hash to link to.
fn head_of(r: &tokio_postgres::Row, at: usize) -> Result<(u64, [u8; 32]), StoreError> {
    let seq: i64 = r.get(at);
    let hash: &[u8] = r.get(at + 1);
    let next =
        u64::try_from(seq).map_err(|_| StoreError::Corrupt(format!("sequence number {seq}")))? + 1;
    let hash = hash
        .try_into()
        .map_err(|_| StoreError::Corrupt("a stored hash is not 32 bytes".into()))?;
    Ok((next, hash))
}

/// The advisory lock's key for an account: its id's 128 bits folded to 64.
fn lock_key(account: AccountId) -> i64 {
    let b = account.as_bytes();
    let (hi, lo) = b.split_at(8);
    let fold = u64::from_le_bytes(hi.try_into().unwrap_or_default())
        ^ u64::from_le_bytes(lo.try_into().unwrap_or_default());
    i64::from_le_bytes(fold.to_le_bytes())
}

impl Store for PgLedger<'_> {
    fn request_entries(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Vec<Entry>, StoreError> {
        self.lock(account)?;
        if let Some(list) = self.batch.borrow().requests.get(&(account, request)) {
            return Ok(list.clone());
        }
        let rows = self.query(
            &self.conn.statements.request,
            &[&account.to_string(), &request.to_string()],
        )?;
        let list = rows.iter().map(read_entry).collect::<Result<Vec<_>, _>>()?;
        self.batch
            .borrow_mut()
            .requests
            .insert((account, request), list.clone());
        Ok(list)
    }

    fn head(&self, account: AccountId) -> Result<(u64, [u8; 32]), StoreError> {
        self.lock(account)?;
        if let Some(head) = self.batch.borrow().heads.get(&account) {
            return Ok(*head);
        }
        let rows = self.query(&self.conn.statements.head, &[&account.to_string()])?;
        let head = match rows.first() {
            Some(r) => head_of(r, 0)?,
            None => (0, [0; 32]),
        };
        self.batch.borrow_mut().heads.insert(account, head);
        Ok(head)
    }

    fn totals(&self, account: AccountId) -> Result<Totals, StoreError> {
        self.lock(account)?;
        if let Some(t) = self.batch.borrow().totals.get(&account) {
            return Ok(*t);
        }
        let rows = self.query(&self.conn.statements.totals, &[&account.to_string()])?;
        let totals = match rows.first() {
            Some(r) => read_totals(r, 0)?,
            None => Totals::default(),
        };
        self.batch.borrow_mut().totals.insert(account, totals);
        Ok(totals)
    }

    fn lapsed_holds(
        &self,
        account: AccountId,
        now: UnixMillis,
    ) -> Result<Vec<OpenHold>, StoreError> {
        self.lock(account)?;
        self.load_holds(account, now)?;
        let batch = self.batch.borrow();
        let mut lapsed: Vec<OpenHold> = batch
            .holds
            .get(&account)
            .map(|(_, holds)| {
                holds
                    .values()
                    .filter(|h| !h.active_at(now))
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        lapsed.sort_by_key(|h| h.request_id);
        Ok(lapsed)
    }

    fn append(&mut self, e: &Entry, totals: &Totals) -> Result<(), StoreError> {
        // The request's entries must be known before one is added to them.
        self.request_entries(e.account, e.request_id)?;
        // Checked here, not at the flush, so that only this operation is refused.
        for v in [e.seq, e.input_tokens, e.output_tokens, e.quota_tokens] {
            i64_of(v)?;
        }
        let mut batch = self.batch.borrow_mut();
        let b = &mut *batch;
        let account = e.account;
        let previous = b.heads.insert(account, (e.seq + 1, e.hash));
        b.undo.push(Undo::Head(account, previous));
        let previous = b.totals.insert(account, *totals);
        let was_dirty = !b.dirty.insert(account);
        b.undo.push(Undo::Totals(account, previous, was_dirty));
        let key = (account, e.request_id);
        b.requests.entry(key).or_default().push(e.clone());
        b.undo.push(Undo::Request(key));
        b.entries.push(e.clone());
        b.undo.push(Undo::Entry);
        let (write, cached) = match e.hold_change() {
            HoldChange::None => return Ok(()),
            HoldChange::Open => {
                let hold = e.open_hold();
                let next = match b.hold_writes.get(&key) {
                    Some(HoldWrite::Close) => HoldWrite::Replace { seq: e.seq, hold },
                    _ => HoldWrite::Open { seq: e.seq, hold },
                };
                (next, Some(hold))
            }
            HoldChange::Close => {
                let next = match b.hold_writes.get(&key) {
                    Some(HoldWrite::Open { .. } | HoldWrite::Neither) => HoldWrite::Neither,
                    _ => HoldWrite::Close,
                };
                (next, None)
            }
        };
        let previous = b.hold_writes.insert(key, write);
        if let Some((_, holds)) = b.holds.get_mut(&account) {
            match cached {
                Some(h) => holds.insert(key.1, h),
                None => holds.remove(&key.1),
            };
        }
        b.undo.push(Undo::Hold {
            key,
            write: previous,
        });
        Ok(())
    }
}

/// Sends the batch's writes (pipelined: the server sees them in this order) and commits.
fn flush_and_commit(conn: &Conn, batch: Batch) -> Result<(), StoreError> {
    let Batch {
        entries,
        dirty,
        totals,
        hold_writes,
        answers,
        vouchers,
        ..
    } = batch;
    let mut a = AnswerColumns::default();
    for ((account, request), (answer, at)) in &answers {
        let (chunks, done) = crate::storage::answers::encode(answer).map_err(StoreError::from)?;
        a.account.push(account.to_string());
        a.request.push(request.to_string());
        a.body.push(answer.body.to_vec());
        a.chunks.push(chunks);
        a.done.push(done);
        a.at.push(at.0);
    }
    let (mut v_code, mut v_by, mut v_account, mut v_at) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (code, v) in &vouchers {
        if let (true, Some((by, account, at))) = (v.changed, &v.redeemed) {
            v_code.push(code.to_vec());
            v_by.push(by.clone());
            v_account.push(account.clone());
            v_at.push(*at);
        }
    }
    let mut e = EntryColumns::default();
    for entry in &entries {
        e.push(entry)?;
    }
    let (mut del_account, mut del_request) = (Vec::new(), Vec::new());
    let mut ins = HoldColumns::default();
    for ((account, request), write) in &hold_writes {
        match write {
            HoldWrite::Close => {
                del_account.push(account.to_string());
                del_request.push(request.to_string());
            }
            HoldWrite::Replace { seq, hold } => {
                del_account.push(account.to_string());
                del_request.push(request.to_string());
                ins.push(*account, *seq, hold)?;
            }
            HoldWrite::Open { seq, hold } => ins.push(*account, *seq, hold)?,
            HoldWrite::Neither => {}
        }
    }
    let mut t = TotalsColumns::default();
    for account in &dirty {
        if let Some(totals) = totals.get(account) {
            t.push(*account, totals)?;
        }
    }
    let s = &conn.statements;
    let c = &conn.client;
    type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let entry_params: [Param<'_>; 15] = [
        &e.seq,
        &e.account,
        &e.request,
        &e.kind,
        &e.model,
        &e.device,
        &e.input,
        &e.output,
        &e.amount,
        &e.quota,
        &e.body,
        &e.at,
        &e.expires_at,
        &e.prev_hash,
        &e.hash,
    ];
    let delete_params: [Param<'_>; 2] = [&del_account, &del_request];
    let hold_params: [Param<'_>; 6] = [
        &ins.account,
        &ins.request,
        &ins.seq,
        &ins.amount,
        &ins.quota,
        &ins.expires_at,
    ];
    let totals_params: [Param<'_>; 7] = [
        &t.account, &t.balance, &t.year, &t.month, &t.settled, &t.held, &t.quota,
    ];
    let answer_params: [Param<'_>; 6] =
        [&a.account, &a.request, &a.body, &a.chunks, &a.done, &a.at];
    let voucher_params: [Param<'_>; 4] = [&v_code, &v_by, &v_account, &v_at];
    conn.wait(async {
        tokio::try_join!(
            c.execute(&s.insert_entries, &entry_params),
            c.execute(&s.delete_holds, &delete_params),
            c.execute(&s.insert_holds, &hold_params),
            c.execute(&s.upsert_totals, &totals_params),
            // Most batches store no answer and redeem no voucher: nothing sent for them.
            async {
                if a.account.is_empty() {
                    return Ok(0);
                }
                c.execute(&s.insert_answers, &answer_params).await
            },
            async {
                if v_code.is_empty() {
                    return Ok(0);
                }
                c.execute(&s.redeem_vouchers, &voucher_params).await
            },
            c.batch_execute("COMMIT"),
        )
    })
    .map(drop)
    .map_err(|e| store_error(&e))
}

/// The batch's stored answers, as one array per column.
#[derive(Default)]
struct AnswerColumns {
    account: Vec<String>,
    request: Vec<String>,
    body: Vec<Vec<u8>>,
    chunks: Vec<String>,
    done: Vec<Vec<u8>>,
    at: Vec<i64>,
}

/// The batch's new entries, as one array per column.
#[derive(Default)]
struct EntryColumns {
    seq: Vec<i64>,
    account: Vec<String>,
    request: Vec<String>,
    kind: Vec<i64>,
    model: Vec<String>,
    device: Vec<Option<String>>,
    input: Vec<i64>,
    output: Vec<i64>,
    amount: Vec<i64>,
    quota: Vec<i64>,
    body: Vec<Vec<u8>>,
    at: Vec<i64>,
    expires_at: Vec<Option<i64>>,
    prev_hash: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

impl EntryColumns {
    fn push(&mut self, e: &Entry) -> Result<(), StoreError> {
        self.seq.push(i64_of(e.seq)?);
        self.account.push(e.account.to_string());
        self.request.push(e.request_id.to_string());
        self.kind.push(i64::from(e.kind.code()));
        self.model.push(e.model.clone());
        self.device.push(e.device.map(|d| d.to_string()));
        self.input.push(i64_of(e.input_tokens)?);
        self.output.push(i64_of(e.output_tokens)?);
        self.amount.push(e.amount.0);
        self.quota.push(i64_of(e.quota_tokens)?);
        self.body.push(e.body.to_vec());
        self.at.push(e.at.0);
        self.expires_at.push(e.expires_at.map(|t| t.0));
        self.prev_hash.push(e.prev_hash.to_vec());
        self.hash.push(e.hash.to_vec());
        Ok(())
    }
}

#[derive(Default)]
struct HoldColumns {
    account: Vec<String>,
    request: Vec<String>,
    seq: Vec<i64>,
    amount: Vec<i64>,
    quota: Vec<i64>,
    expires_at: Vec<Option<i64>>,
}

impl HoldColumns {
    fn push(&mut self, account: AccountId, seq: u64, h: &OpenHold) -> Result<(), StoreError> {
        self.account.push(account.to_string());
        self.request.push(h.request_id.to_string());
        self.seq.push(i64_of(seq)?);
        self.amount.push(h.amount.0);
        self.quota.push(i64_of(h.quota_tokens)?);
        self.expires_at.push(h.expires_at.map(|t| t.0));
        Ok(())
    }
}

#[derive(Default)]
struct TotalsColumns {
    account: Vec<String>,
    balance: Vec<i64>,
    year: Vec<Option<i64>>,
    month: Vec<Option<i64>>,
    settled: Vec<i64>,
    held: Vec<i64>,
    quota: Vec<i64>,
}

impl TotalsColumns {
    fn push(&mut self, account: AccountId, t: &Totals) -> Result<(), StoreError> {
        self.account.push(account.to_string());
        self.balance.push(t.balance.0);
        self.year.push(t.quota_period.map(|p| i64::from(p.year)));
        self.month.push(t.quota_period.map(|p| i64::from(p.month)));
        self.settled.push(i64_of(t.quota_settled)?);
        self.held.push(t.open_held.0);
        self.quota.push(i64_of(t.open_quota)?);
        Ok(())
    }
}

/// The handle every task uses; cheap to clone. The writer thread ends when the last handle is
/// dropped, after answering everything already sent.
#[derive(Debug, Clone)]
pub struct PgLedgerWriter {
    jobs: mpsc::Sender<Box<dyn Job>>,
    observer: Observer,
}

/// An operation in the queue, with its answer.
trait Job: Send {
    /// The account and request the operation is about, when its caller said.
    fn key(&self) -> Option<(AccountId, RequestId)>;
    /// Runs the operation in the batch; whether its writes are to be kept.
    fn run(&mut self, store: &mut PgLedger<'_>) -> bool;
    /// Answers the caller, once the transaction's fate is known.
    fn answer(self: Box<Self>, committed: Result<(), StoreError>);
}

type Reply<T> = oneshot::Sender<Result<T, LedgerError>>;

struct Pending<T, F> {
    key: Option<(AccountId, RequestId)>,
    op: Option<F>,
    result: Option<Result<T, LedgerError>>,
    reply: Reply<T>,
}

impl<T, F> Job for Pending<T, F>
where
    T: Send,
    F: FnOnce(&mut PgLedger<'_>) -> Result<T, LedgerError> + Send,
{
    fn key(&self) -> Option<(AccountId, RequestId)> {
        self.key
    }

    fn run(&mut self, store: &mut PgLedger<'_>) -> bool {
        let Some(op) = self.op.take() else {
            return false;
        };
        let result = op(store);
        let ok = result.is_ok();
        self.result = Some(result);
        ok
    }

    fn answer(self: Box<Self>, committed: Result<(), StoreError>) {
        let _ = self.reply.send(answer_of(self.result, committed));
    }
}

impl PgLedgerWriter {
    /// Opens its own connection to the database at `url` (whose schema `Pg::open` made) and
    /// starts the writer thread.
    pub fn open(url: &str) -> Result<PgLedgerWriter, StorageError> {
        let conn = Conn::open(url)?;
        let (jobs, queue) = mpsc::channel(QUEUE);
        let url = url.to_owned();
        let observer = Observer::default();
        let told = observer.clone();
        std::thread::Builder::new()
            .name("ledger-writer-pg".into())
            .spawn(move || serve(conn, &url, queue, &told))
            .map_err(|e| StorageError::Corrupt(format!("cannot start the ledger writer: {e}")))?;
        Ok(PgLedgerWriter { jobs, observer })
    }

    /// Tells `observe` of every batch from now on.
    pub fn observe(&self, observe: BatchObserver) {
        self.observer.set(observe);
    }

    fn job<T, F>(
        key: Option<(AccountId, RequestId)>,
        op: F,
    ) -> (Box<dyn Job>, oneshot::Receiver<Result<T, LedgerError>>)
    where
        T: Send + 'static,
        F: FnOnce(&mut PgLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let job = Pending {
            key,
            op: Some(op),
            result: None,
            reply,
        };
        (Box::new(job), answer)
    }

    /// Runs `op` as one ledger operation and answers once it is durable.
    pub async fn run<T, F>(&self, op: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        self.send(None, op).await
    }

    /// [`run`](Self::run) for an operation on one request of one account (a hold, a
    /// settlement, a top-up): the batch reads what it needs of that account and request in
    /// one round trip with the other keyed operations, before any runs.
    pub async fn run_keyed<T, F>(
        &self,
        account: AccountId,
        request: RequestId,
        op: F,
    ) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        self.send(Some((account, request)), op).await
    }

    async fn send<T, F>(&self, key: Option<(AccountId, RequestId)>, op: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        let (job, answer) = Self::job(key, op);
        self.jobs.send(job).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// [`run_keyed`](Self::run_keyed) for a thread outside the async runtime.
    pub fn run_keyed_blocking<T, F>(
        &self,
        account: AccountId,
        request: RequestId,
        op: F,
    ) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        self.send_blocking(Some((account, request)), op)
    }

    /// [`run`](Self::run) for a thread outside the async runtime.
    pub fn run_blocking<T, F>(&self, op: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        self.send_blocking(None, op)
    }

    fn send_blocking<T, F>(
        &self,
        key: Option<(AccountId, RequestId)>,
        op: F,
    ) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut PgLedger<'_>) -> Result<T, LedgerError> + Send + 'static,
    {
        let (job, answer) = Self::job(key, op);
        self.jobs.blocking_send(job).map_err(|_| stopped())?;
        answer.blocking_recv().map_err(|_| stopped())?
    }
}

fn serve(mut conn: Conn, url: &str, mut queue: mpsc::Receiver<Box<dyn Job>>, observer: &Observer) {
    let mut batch: Vec<Box<dyn Job>> = Vec::with_capacity(MAX_BATCH);
    while next_batch(&mut queue, &mut batch) {
        let committed = run_batch(&conn, &mut batch);
        observer.ran(batch.len(), committed.is_ok());
        if let Err(e) = &committed {
            tracing::error!(error = %e, operations = batch.len(), "a ledger transaction failed");
            if conn.client.is_closed() {
                match Conn::open(url) {
                    Ok(fresh) => conn = fresh,
                    Err(e) => {
                        tracing::error!(error = %e, "the ledger writer cannot reconnect; it tries again with the next batch")
                    }
                }
            }
        }
        for job in batch.drain(..) {
            job.answer(committed.clone());
        }
    }
}

/// Opens the batch's transaction and, for the keyed operations, locks their accounts (in
/// order) and reads their requests' entries, chain heads and totals: one round trip.
fn begin(conn: &Conn, keys: &[(AccountId, RequestId)]) -> Result<Batch, StoreError> {
    let c = &conn.client;
    let s = &conn.statements;
    if keys.is_empty() {
        conn.wait(c.batch_execute("BEGIN"))
            .map_err(|e| store_error(&e))?;
        return Ok(Batch::default());
    }
    let mut accounts: Vec<AccountId> = keys.iter().map(|k| k.0).collect();
    accounts.sort_unstable_by_key(|a| lock_key(*a));
    accounts.dedup();
    let lock_keys: Vec<i64> = accounts.iter().map(|a| lock_key(*a)).collect();
    let account_ids: Vec<String> = accounts.iter().map(ToString::to_string).collect();
    let (key_accounts, key_requests): (Vec<String>, Vec<String>) = keys
        .iter()
        .map(|(a, r)| (a.to_string(), r.to_string()))
        .unzip();
    type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let lock_params: [Param<'_>; 1] = [&lock_keys];
    let request_params: [Param<'_>; 2] = [&key_accounts, &key_requests];
    let account_params: [Param<'_>; 1] = [&account_ids];
    let (_, _, requests, heads, totals) = conn
        .wait(async {
            tokio::try_join!(
                c.batch_execute("BEGIN"),
                c.query(&s.lock_all, &lock_params),
                c.query(&s.prefetch_requests, &request_params),
                c.query(&s.prefetch_heads, &account_params),
                c.query(&s.prefetch_totals, &account_params),
            )
        })
        .map_err(|e| store_error(&e))?;
    let mut batch = Batch {
        locked: accounts.iter().copied().collect(),
        ..Batch::default()
    };
    for key in keys {
        batch.requests.entry(*key).or_default();
    }
    for row in &requests {
        let e = read_entry(row)?;
        batch
            .requests
            .entry((e.account, e.request_id))
            .or_default()
            .push(e);
    }
    for account in &accounts {
        batch.heads.insert(*account, (0, [0; 32]));
        batch.totals.insert(*account, Totals::default());
    }
    for row in &heads {
        let account: AccountId = super::parse(row.get(0))?;
        batch.heads.insert(account, head_of(row, 1)?);
    }
    for row in &totals {
        let account: AccountId = super::parse(row.get(0))?;
        batch.totals.insert(account, read_totals(row, 1)?);
    }
    Ok(batch)
}

/// Runs the batch in one transaction; the commit's outcome.
fn run_batch(conn: &Conn, jobs: &mut [Box<dyn Job>]) -> Result<(), StoreError> {
    let keys: Vec<(AccountId, RequestId)> = jobs.iter().filter_map(|j| j.key()).collect();
    let batch = RefCell::new(begin(conn, &keys)?);
    for job in jobs.iter_mut() {
        batch.borrow_mut().undo.clear();
        let mut store = PgLedger {
            conn,
            batch: &batch,
        };
        let keep = catch_unwind(AssertUnwindSafe(|| job.run(&mut store))).unwrap_or_else(|_| {
            tracing::error!("a ledger operation panicked; its writes are rolled back");
            false
        });
        if !keep {
            batch.borrow_mut().roll_back();
        }
    }
    let done = flush_and_commit(conn, batch.into_inner());
    if done.is_err() {
        // Nothing of the batch is kept; the connection is ready for the next one.
        let _ = conn.wait(conn.client.batch_execute("ROLLBACK"));
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_lock_apart() {
        let a: AccountId = "0190f3a2-7c1e-7b3d-9f00-00000000a001".parse().unwrap();
        let b: AccountId = "0190f3a2-7c1e-7b3d-9f00-00000000b002".parse().unwrap();
        assert_ne!(lock_key(a), lock_key(b));
        assert_eq!(lock_key(a), lock_key(a));
    }
}
