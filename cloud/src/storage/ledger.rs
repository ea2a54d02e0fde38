//! The ledger's SQLite store: `synesis-billing`'s [`Store`] over the cloud's database. Entries are
//! append-only in `ledger_entries`; each account's totals and open holds are kept beside them
//! in the same transaction, so an operation costs the same on the millionth entry as on the
//! first. The server's operations go through the [`LedgerWriter`] (group commit, durable);
//! `admin` runs one operation per transaction through [`transaction`].

use rusqlite::{Connection, OptionalExtension, params};
use synesis_billing::QuotaPeriod;
use synesis_billing::ledger::{
    Entry, EntryKind, HoldChange, LedgerError, OpenHold, Store, StoreError, Totals,
};
use synesis_proto::{AccountId, MicroUsd, RequestId, UnixMillis};

mod any;
mod writer;
pub use any::{LedgerTx, Writer};
pub use writer::{BatchObserver, LedgerWriter};
pub(crate) use writer::{MAX_BATCH, Observer, QUEUE, answer_of, next_batch, stopped};

/// The ledger store inside one open transaction.
#[derive(Debug)]
pub struct SqliteLedger<'c> {
    conn: &'c Connection,
}

impl<'c> SqliteLedger<'c> {
    pub fn new(conn: &'c Connection) -> SqliteLedger<'c> {
        SqliteLedger { conn }
    }

    /// Reads and writes inside the operation's transaction, through the repository traits.
    pub fn unit(&self) -> crate::storage::Unit<'c> {
        crate::storage::Unit::new(self.conn)
    }

    /// The connection the operation runs on, inside its transaction and savepoint.
    pub fn connection(&self) -> &'c Connection {
        self.conn
    }

    /// The accounts with an open hold past its time at `now`.
    pub fn accounts_with_lapsed_holds(
        &self,
        now: UnixMillis,
    ) -> Result<Vec<AccountId>, StoreError> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT DISTINCT account_id FROM ledger_open_holds WHERE expires_at <= ?1",
            )
            .map_err(err)?;
        let rows = stmt
            .query_map([now.0], |r| r.get::<_, String>(0))
            .map_err(err)?;
        rows.map(|id| id.map_err(err)?.parse::<AccountId>().map_err(corrupt))
            .collect()
    }

    /// Marks a voucher redeemed by `account`'s `request` and returns its amount. The same
    /// request of the same account again gets the same amount (idempotent); anyone else, the
    /// same request id from another account included, is refused (`None`): a redemption
    /// belongs to one account. A request that redeemed another voucher is a conflict: one
    /// request id, one voucher.
    pub fn redeem_voucher(
        &self,
        code: &str,
        account: AccountId,
        request: RequestId,
        now: UnixMillis,
    ) -> Result<Option<MicroUsd>, LedgerError> {
        let hash = crate::storage::sha256(code.trim().as_bytes());
        let row = self
            .conn
            .query_row(
                "SELECT amount, redeemed_by, redeemed_account FROM vouchers WHERE code_sha256 = ?1",
                [hash.as_slice()],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                },
            )
            .optional()
            .map_err(err)?;
        let Some((amount, redeemed_by, redeemed_account)) = row else {
            return Ok(None);
        };
        let (account, request) = (account.to_string(), request.to_string());
        match redeemed_by {
            Some(by) if by == request && redeemed_account.as_deref() == Some(account.as_str()) => {
                Ok(Some(MicroUsd(amount)))
            }
            Some(_) => Ok(None),
            None => {
                let other = self
                    .conn
                    .prepare_cached(
                        "SELECT 1 FROM vouchers WHERE redeemed_account = ?1 AND redeemed_by = ?2",
                    )
                    .and_then(|mut s| s.exists([&account, &request]))
                    .map_err(err)?;
                if other {
                    return Err(LedgerError::IdempotencyConflict);
                }
                self.conn
                    .execute(
                        "UPDATE vouchers SET redeemed_at = ?2, redeemed_by = ?3, redeemed_account = ?4
                         WHERE code_sha256 = ?1 AND redeemed_by IS NULL",
                        params![hash.as_slice(), now.0, request, account],
                    )
                    .map_err(err)?;
                Ok(Some(MicroUsd(amount)))
            }
        }
    }
}

/// What a ledger operation reads and writes beside the ledger, inside its transaction: the
/// member quota a hold is admitted under, who asked a request, and its stored answer. Each
/// backend answers as of the operation's place in its batch (the operations before it in the
/// same transaction included), so a member's concurrent requests cannot both fit in the same
/// room.
pub trait LedgerUnit {
    /// How many of the account's holds are open and not lapsed at `now` (requests running,
    /// on whichever node), counted up to `at_most`.
    fn running(
        &self,
        account: AccountId,
        now: UnixMillis,
        at_most: usize,
    ) -> Result<usize, StoreError>;
    /// The monthly token quota of the member `device` belongs to, and what that member's
    /// devices used since `month_start` or hold now (`None`: no quota).
    fn member_quota_use(
        &self,
        device: synesis_proto::DeviceId,
        month_start: UnixMillis,
    ) -> Result<Option<(u64, u64)>, StoreError>;
    /// The member whose device asked `request` (its hold's device).
    fn asker(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Option<crate::storage::answers::Asker>, StoreError>;
    fn answer(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Option<crate::storage::answers::StoredAnswer>, StoreError>;
    /// Stores a finished request's answer, once (a second is refused).
    fn put_answer(
        &self,
        account: AccountId,
        request: RequestId,
        answer: &crate::storage::answers::StoredAnswer,
        at: UnixMillis,
    ) -> Result<(), StoreError>;
    /// The node that runs `request` (the last to take it on), if any recorded one.
    fn runner(&self, account: AccountId, request: RequestId) -> Result<Option<String>, StoreError>;
    /// Records that `node` runs `request` from now on: its open hold is that node's, and is
    /// released by the others if that node dies.
    fn set_runner(
        &self,
        account: AccountId,
        request: RequestId,
        node: &str,
    ) -> Result<(), StoreError>;
    /// Whether node `id` serves at `now` (`NodeRow::serving`); an unknown node does not.
    fn node_serving(&self, id: &str, now: UnixMillis) -> Result<bool, StoreError>;
}

const RUNNER: &str = "SELECT node FROM runs WHERE account_id = ?1 AND request_id = ?2";
const SET_RUNNER: &str = "INSERT INTO runs (account_id, request_id, node) VALUES (?1, ?2, ?3)
     ON CONFLICT (account_id, request_id) DO UPDATE SET node = excluded.node";
const NODE_SERVING: &str =
    "SELECT 1 FROM nodes WHERE id = ?1 AND stopped_at IS NULL AND seen_at >= ?2";

impl LedgerUnit for SqliteLedger<'_> {
    fn running(
        &self,
        account: AccountId,
        now: UnixMillis,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        let n: i64 = self
            .conn
            .prepare_cached(
                "SELECT count(*) FROM (SELECT 1 FROM ledger_open_holds
                 WHERE account_id = ?1 AND (expires_at IS NULL OR expires_at > ?2) LIMIT ?3)",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![
                        account.to_string(),
                        now.0,
                        i64::try_from(at_most).unwrap_or(i64::MAX)
                    ],
                    |r| r.get(0),
                )
            })
            .map_err(err)?;
        Ok(usize::try_from(n).unwrap_or(0))
    }

    fn member_quota_use(
        &self,
        device: synesis_proto::DeviceId,
        month_start: UnixMillis,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        Ok(crate::storage::members::quota_use(
            self.conn,
            device,
            month_start,
        )?)
    }

    fn asker(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Option<crate::storage::answers::Asker>, StoreError> {
        Ok(crate::storage::answers::asker(self.conn, account, request)?)
    }

    fn answer(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Option<crate::storage::answers::StoredAnswer>, StoreError> {
        Ok(crate::storage::answers::get(self.conn, account, request)?)
    }

    fn put_answer(
        &self,
        account: AccountId,
        request: RequestId,
        answer: &crate::storage::answers::StoredAnswer,
        at: UnixMillis,
    ) -> Result<(), StoreError> {
        Ok(crate::storage::answers::put(
            self.conn, account, request, answer, at,
        )?)
    }

    fn runner(&self, account: AccountId, request: RequestId) -> Result<Option<String>, StoreError> {
        self.conn
            .prepare_cached(RUNNER)
            .and_then(|mut s| {
                s.query_row(params![account.to_string(), request.to_string()], |r| {
                    r.get(0)
                })
                .optional()
            })
            .map_err(err)
    }

    fn set_runner(
        &self,
        account: AccountId,
        request: RequestId,
        node: &str,
    ) -> Result<(), StoreError> {
        self.conn
            .prepare_cached(SET_RUNNER)
            .and_then(|mut s| s.execute(params![account.to_string(), request.to_string(), node]))
            .map_err(err)?;
        Ok(())
    }

    fn node_serving(&self, id: &str, now: UnixMillis) -> Result<bool, StoreError> {
        let since = now.0.saturating_sub(crate::storage::NODE_DEAD_AFTER_MS);
        self.conn
            .prepare_cached(NODE_SERVING)
            .and_then(|mut s| s.exists(params![id, since]))
            .map_err(err)
    }
}

/// Runs ledger rules as one durable transaction on `db` (the operator's commands; the server
/// goes through the [`LedgerWriter`]): everything `f` appends is committed together, or
/// nothing is (on any error).
pub fn transaction<T>(
    db: &mut crate::storage::Db,
    f: impl FnOnce(&mut SqliteLedger<'_>) -> Result<T, LedgerError>,
) -> Result<T, LedgerError> {
    let tx = db
        .connection_mut()
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(err)?;
    let result = f(&mut SqliteLedger::new(&tx))?;
    tx.commit().map_err(err)?;
    Ok(result)
}

const COLUMNS: &str = "seq, account_id, request_id, kind, model, device_id, input_tokens, output_tokens, amount, quota_tokens, body, at, expires_at, prev_hash, hash";

/// A database error, its kind kept ([`crate::storage::store_error`]).
pub(crate) fn err(e: rusqlite::Error) -> StoreError {
    crate::storage::store_error(e)
}

/// A stored value that does not parse.
fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

fn hash32(v: Vec<u8>) -> Result<[u8; 32], StoreError> {
    v.try_into()
        .map_err(|_| StoreError::Corrupt("a stored hash is not 32 bytes".into()))
}

/// Reads entries; a row that does not parse is an error (the chain check names it).
fn query_entries(
    conn: &Connection,
    where_clause: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<Entry>, StoreError> {
    query_entries_ordered(conn, where_clause, "ORDER BY account_id, seq", args)
}

/// Every entry of a ledger still in one global chain (schema 9 and before), in its order: what
/// the migration to per-account chains reads.
pub(super) fn entries_in_global_order(conn: &Connection) -> Result<Vec<Entry>, StoreError> {
    query_entries_ordered(conn, "", "ORDER BY seq", &[])
}

/// Writes one entry into `table` (the entries' table, or the migration's new one).
pub(super) fn insert_entry(conn: &Connection, table: &str, e: &Entry) -> Result<(), StoreError> {
    conn.prepare_cached(&format!(
        "INSERT INTO {table} ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)"
    ))
    .map_err(err)?
    .execute(params![
        i64_of(e.seq)?,
        e.account.to_string(),
        e.request_id.to_string(),
        i64::from(e.kind.code()),
        e.model,
        e.device.map(|d| d.to_string()),
        i64_of(e.input_tokens)?,
        i64_of(e.output_tokens)?,
        e.amount.0,
        i64_of(e.quota_tokens)?,
        e.body.as_slice(),
        e.at.0,
        e.expires_at.map(|t| t.0),
        e.prev_hash.as_slice(),
        e.hash.as_slice(),
    ])
    .map_err(err)?;
    Ok(())
}

fn query_entries_ordered(
    conn: &Connection,
    where_clause: &str,
    order: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<Entry>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM ledger_entries {where_clause} {order}");
    let mut stmt = conn.prepare_cached(&sql).map_err(err)?;
    let rows = stmt.query_map(args, read_entry).map_err(err)?;
    rows.map(|row| row.map_err(err)?).collect()
}

fn u64_of(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("a stored {what} is negative: {v}")))
}

/// One row as an entry; a value that does not parse is an error (the chain check names it).
fn read_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<Result<Entry, StoreError>> {
    let seq: i64 = r.get(0)?;
    let account: String = r.get(1)?;
    let request: String = r.get(2)?;
    let kind: i64 = r.get(3)?;
    let model: String = r.get(4)?;
    let device: Option<String> = r.get(5)?;
    let (input, output, amount, tokens): (i64, i64, i64, i64) =
        (r.get(6)?, r.get(7)?, r.get(8)?, r.get(9)?);
    let body: Vec<u8> = r.get(10)?;
    let at: i64 = r.get(11)?;
    let expires_at: Option<i64> = r.get(12)?;
    let (prev, hash): (Vec<u8>, Vec<u8>) = (r.get(13)?, r.get(14)?);
    Ok((|| {
        Ok(Entry {
            seq: u64_of(seq, "sequence number")?,
            account: account.parse().map_err(corrupt)?,
            request_id: request.parse().map_err(corrupt)?,
            kind: u8::try_from(kind)
                .ok()
                .and_then(EntryKind::from_code)
                .ok_or_else(|| StoreError::Corrupt(format!("entry {seq}: unknown kind {kind}")))?,
            model,
            device: device.map(|d| d.parse()).transpose().map_err(corrupt)?,
            input_tokens: u64_of(input, "token count")?,
            output_tokens: u64_of(output, "token count")?,
            amount: MicroUsd(amount),
            quota_tokens: u64_of(tokens, "token count")?,
            body: hash32(body)?,
            at: UnixMillis(at),
            expires_at: expires_at.map(UnixMillis),
            prev_hash: hash32(prev)?,
            hash: hash32(hash)?,
        })
    })())
}

/// Open holds, by a WHERE clause over `ledger_open_holds`.
fn open_holds(
    conn: &Connection,
    where_clause: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<OpenHold>, StoreError> {
    let sql = format!(
        "SELECT request_id, amount, quota_tokens, expires_at FROM ledger_open_holds {where_clause}"
    );
    let mut stmt = conn.prepare_cached(&sql).map_err(err)?;
    let rows = stmt
        .query_map(args, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, Option<i64>>(3)?,
            ))
        })
        .map_err(err)?;
    rows.map(|row| {
        let (request, amount, tokens, expires_at) = row.map_err(err)?;
        Ok(OpenHold {
            request_id: request.parse().map_err(corrupt)?,
            amount: MicroUsd(amount),
            quota_tokens: u64_of(tokens, "token count")?,
            expires_at: expires_at.map(UnixMillis),
        })
    })
    .collect()
}

fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Constraint(format!("{v} does not fit a stored integer")))
}

impl Store for SqliteLedger<'_> {
    fn request_entries(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Vec<Entry>, StoreError> {
        query_entries(
            self.conn,
            // Named, since without statistics SQLite would rather walk the account's entries
            // by the key (account_id, seq), which costs the account's history on every operation.
            "INDEXED BY ledger_by_request WHERE account_id = ?1 AND request_id = ?2",
            &[&account.to_string(), &request.to_string()],
        )
    }

    fn head(&self, account: AccountId) -> Result<(u64, [u8; 32]), StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT seq, hash FROM ledger_entries WHERE account_id = ?1 ORDER BY seq DESC LIMIT 1",
            )
            .map_err(err)?
            .query_row([account.to_string()], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .optional()
            .map_err(err)?;
        match row {
            Some((seq, hash)) => Ok((u64_of(seq, "sequence number")? + 1, hash32(hash)?)),
            None => Ok((0, [0; 32])),
        }
    }

    fn totals(&self, account: AccountId) -> Result<Totals, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT balance, quota_year, quota_month, quota_settled, open_held, open_quota
                 FROM ledger_totals WHERE account_id = ?1",
            )
            .map_err(err)?
            .query_row([account.to_string()], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<i32>>(1)?,
                    r.get::<_, Option<u32>>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .optional()
            .map_err(err)?;
        let Some((balance, year, month, settled, open_held, open_quota)) = row else {
            return Ok(Totals::default());
        };
        Ok(Totals {
            balance: MicroUsd(balance),
            quota_period: year
                .zip(month)
                .map(|(year, month)| QuotaPeriod { year, month }),
            quota_settled: u64_of(settled, "token count")?,
            open_held: MicroUsd(open_held),
            open_quota: u64_of(open_quota, "token count")?,
        })
    }

    fn lapsed_holds(
        &self,
        account: AccountId,
        now: UnixMillis,
    ) -> Result<Vec<OpenHold>, StoreError> {
        open_holds(
            self.conn,
            "WHERE account_id = ?1 AND expires_at <= ?2",
            &[&account.to_string(), &now.0],
        )
    }

    fn append(&mut self, e: &Entry, totals: &Totals) -> Result<(), StoreError> {
        let account = e.account.to_string();
        let request = e.request_id.to_string();
        let seq = i64_of(e.seq)?;
        insert_entry(self.conn, "ledger_entries", e)?;
        self.conn
            .prepare_cached(
                "INSERT INTO ledger_totals (account_id, balance, quota_year, quota_month, quota_settled, open_held, open_quota)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
                 ON CONFLICT (account_id) DO UPDATE SET balance = excluded.balance,
                    quota_year = excluded.quota_year, quota_month = excluded.quota_month,
                    quota_settled = excluded.quota_settled, open_held = excluded.open_held,
                    open_quota = excluded.open_quota",
            )
            .map_err(err)?
            .execute(params![
                account,
                totals.balance.0,
                totals.quota_period.map(|p| p.year),
                totals.quota_period.map(|p| p.month),
                i64_of(totals.quota_settled)?,
                totals.open_held.0,
                i64_of(totals.open_quota)?,
            ])
            .map_err(err)?;
        match e.hold_change() {
            HoldChange::Open => self
                .conn
                .prepare_cached(
                    "INSERT INTO ledger_open_holds (account_id, request_id, seq, amount, quota_tokens, expires_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )
                .map_err(err)?
                .execute(params![
                    account,
                    request,
                    seq,
                    e.amount.0,
                    i64_of(e.quota_tokens)?,
                    e.expires_at.map(|t| t.0)
                ]),
            HoldChange::Close => self
                .conn
                .prepare_cached(
                    "DELETE FROM ledger_open_holds WHERE account_id = ?1 AND request_id = ?2",
                )
                .map_err(err)?
                .execute(params![account, request]),
            HoldChange::None => Ok(0),
        }
        .map_err(err)?;
        Ok(())
    }
}

/// The whole ledger as one snapshot sees it: what `admin ledger verify` checks.
#[derive(Debug, Clone, Default)]
pub struct LedgerSnapshot {
    /// Every entry: each account's chain whole, in its order (accounts one after another).
    pub entries: Vec<Entry>,
    /// Every account's kept totals and open holds.
    pub states: std::collections::BTreeMap<AccountId, synesis_billing::ledger::AccountState>,
}

impl crate::storage::Db {
    /// Reads every entry and every kept state from one snapshot (a running server may commit
    /// between two reads).
    pub fn ledger_snapshot(&self) -> Result<LedgerSnapshot, StoreError> {
        let snapshot = self.connection().unchecked_transaction().map_err(err)?;
        let entries = query_entries(&snapshot, "", &[])?;
        let states = stored_states(&snapshot)?;
        snapshot.finish().map_err(err)?;
        Ok(LedgerSnapshot { entries, states })
    }
}

/// Every account's kept totals and open holds, as stored (for `admin ledger verify`, which
/// compares them with what the entries say).
fn stored_states(
    conn: &Connection,
) -> Result<std::collections::BTreeMap<AccountId, synesis_billing::ledger::AccountState>, StoreError>
{
    let mut states = std::collections::BTreeMap::new();
    let accounts: Vec<String> = {
        let mut stmt = conn
            .prepare("SELECT account_id FROM ledger_totals UNION SELECT account_id FROM ledger_open_holds")
            .map_err(err)?;
        let rows = stmt.query_map([], |r| r.get(0)).map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)?
    };
    let store = SqliteLedger::new(conn);
    for account in accounts {
        let id: AccountId = account.parse().map_err(corrupt)?;
        let open_holds = open_holds(conn, "WHERE account_id = ?1", &[&account])?
            .into_iter()
            .map(|h| (h.request_id, h))
            .collect();
        let totals = store.totals(id)?;
        states.insert(
            id,
            synesis_billing::ledger::AccountState { totals, open_holds },
        );
    }
    Ok(states)
}

/// Why a usage page cannot be listed.
#[derive(Debug, thiserror::Error)]
pub enum UsageError {
    #[error("`after` names no charge of this account ({0})")]
    UnknownCursor(RequestId),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

impl From<StoreError> for UsageError {
    fn from(e: StoreError) -> Self {
        UsageError::Ledger(e.into())
    }
}

impl UsageError {
    /// The protocol's code for it.
    pub fn code(&self) -> synesis_proto::ErrorCode {
        match self {
            UsageError::UnknownCursor(_) => synesis_proto::ErrorCode::INVALID_REQUEST,
            UsageError::Ledger(_) => synesis_proto::ErrorCode::INTERNAL,
        }
    }
}

/// One page of the account's charges (settlements) in the listing's order (time, then the
/// ledger's sequence): at most [`USAGE_CHARGES_MAX`](synesis_proto::message::USAGE_CHARGES_MAX),
/// at or after `since` and after the charge `after`; with the page's last charge when more
/// follow.
pub fn charges(
    conn: &Connection,
    account: AccountId,
    since: Option<UnixMillis>,
    after: Option<RequestId>,
) -> Result<(Vec<synesis_proto::message::Charge>, Option<RequestId>), UsageError> {
    charges_page(
        conn,
        account,
        None,
        since,
        after,
        synesis_proto::message::USAGE_CHARGES_MAX,
    )
}

/// [`charges`], at most `page` of them (a smaller page where a larger one would not fit the
/// frames the device takes); with `member`, only the charges of that member's devices (what a
/// member other than the owner lists: PROTOCOL.md §2, *Usage*), and `after` must name one of
/// them.
pub fn charges_page(
    conn: &Connection,
    account: AccountId,
    member: Option<&crate::storage::answers::Asker>,
    since: Option<UnixMillis>,
    after: Option<RequestId>,
    page: usize,
) -> Result<(Vec<synesis_proto::message::Charge>, Option<RequestId>), UsageError> {
    let page = page.clamp(1, synesis_proto::message::USAGE_CHARGES_MAX);
    // The kind is written out (not bound) so that the partial index `ledger_charges` serves; its
    // entries end with the table's key `(account_id, seq)`, so it holds them in the listing's
    // order.
    const _: () = assert!(EntryKind::Settle.code() == 3);
    let account_text = account.to_string();
    // NULL: every member's charges.
    let member = member.map(crate::storage::answers::Asker::as_str);
    // "At or after `since`" is "after (since, -1)": every seq is at least 0.
    let mut from = (since.map_or(i64::MIN, |t| t.0), -1_i64);
    if let Some(after) = after {
        let cursor: (i64, i64) = conn
            .prepare_cached(
                "SELECT at, seq FROM ledger_entries INDEXED BY ledger_by_request
                 WHERE account_id = ?1 AND request_id = ?2 AND kind = 3
                 AND (?3 IS NULL OR device_id IN (SELECT id FROM devices WHERE member_id = ?3))",
            )
            .and_then(|mut stmt| {
                stmt.query_row(params![account_text, after.to_string(), member], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .map_err(err)?
            .ok_or(UsageError::UnknownCursor(after))?;
        from = from.max(cursor);
    }
    // One more than a page, to know whether another follows.
    let limit = i64::try_from(page + 1).unwrap_or(i64::MAX);
    let mut entries = query_entries_ordered(
        conn,
        "WHERE account_id = ?1 AND kind = 3 AND (at, seq) > (?2, ?3)
         AND (?5 IS NULL OR device_id IN (SELECT id FROM devices WHERE member_id = ?5))",
        "ORDER BY at, seq LIMIT ?4",
        &[&account_text, &from.0, &from.1, &limit, &member],
    )?;
    let next = next_page(&mut entries, page);
    // Who each device belongs to, for usage by member.
    let members: std::collections::HashMap<String, String> = conn
        .prepare_cached(
            "SELECT d.id, m.name FROM devices d JOIN members m ON m.id = d.member_id
             WHERE d.account_id = ?1",
        )
        .and_then(|mut stmt| {
            stmt.query_map(params![account_text], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect()
        })
        .map_err(err)?;
    Ok((charges_of(entries, &members), next))
}

/// Cuts `entries` (a page and one more, if there is one) to `page`: the cursor of the next page,
/// if one follows.
pub(crate) fn next_page(entries: &mut Vec<Entry>, page: usize) -> Option<RequestId> {
    if entries.len() > page {
        entries.truncate(page);
        entries.last().map(|e| e.request_id)
    } else {
        None
    }
}

/// Settlements as the charges a usage reply lists, each with its device's member's name
/// (`members`: device id to name).
pub(crate) fn charges_of(
    entries: Vec<Entry>,
    members: &std::collections::HashMap<String, String>,
) -> Vec<synesis_proto::message::Charge> {
    entries
        .into_iter()
        .map(|e| synesis_proto::message::Charge {
            request_id: e.request_id,
            model: e.model,
            member: e.device.and_then(|d| members.get(&d.to_string()).cloned()),
            device_id: e.device,
            usage: synesis_proto::message::Usage {
                input_tokens: e.input_tokens,
                output_tokens: e.output_tokens,
            },
            total: e.amount,
            at: e.at,
        })
        .collect()
}

/// The ledger's read side, as handlers and the operator's commands use it; a backend implements
/// it beside `synesis_billing::ledger::Store` (ARCHITECTURE.md §3).
pub trait LedgerReads {
    /// An account's balance, holds, quota and one page of at most `page` of its charges, from
    /// one snapshot.
    fn usage(
        &self,
        account: &crate::storage::Account,
        request: &synesis_proto::message::UsageRequest,
        now: UnixMillis,
        rules: &synesis_billing::TierRules,
        page: usize,
    ) -> Result<synesis_proto::message::UsageReply, UsageError>;

    /// [`usage`](Self::usage) with the charges of `member`'s devices only (`None`: all).
    fn member_usage(
        &self,
        account: &crate::storage::Account,
        member: Option<&crate::storage::answers::Asker>,
        request: &synesis_proto::message::UsageRequest,
        now: UnixMillis,
        rules: &synesis_billing::TierRules,
        page: usize,
    ) -> Result<synesis_proto::message::UsageReply, UsageError>;
}

impl LedgerReads for crate::storage::Db {
    fn usage(
        &self,
        account: &crate::storage::Account,
        request: &synesis_proto::message::UsageRequest,
        now: UnixMillis,
        rules: &synesis_billing::TierRules,
        page: usize,
    ) -> Result<synesis_proto::message::UsageReply, UsageError> {
        usage_reply(self.connection(), account, None, request, now, rules, page)
    }

    fn member_usage(
        &self,
        account: &crate::storage::Account,
        member: Option<&crate::storage::answers::Asker>,
        request: &synesis_proto::message::UsageRequest,
        now: UnixMillis,
        rules: &synesis_billing::TierRules,
        page: usize,
    ) -> Result<synesis_proto::message::UsageReply, UsageError> {
        usage_reply(
            self.connection(),
            account,
            member,
            request,
            now,
            rules,
            page,
        )
    }
}

/// An account's usage as `synesis cloud usage` (and `admin usage`) show it: balance, holds,
/// quota, and one page of the charges since `request.since` after `request.after`, grouped
/// when asked (each group's charges together, in the listing's order within it).
pub fn usage_reply(
    conn: &Connection,
    account: &crate::storage::Account,
    member: Option<&crate::storage::answers::Asker>,
    request: &synesis_proto::message::UsageRequest,
    now: UnixMillis,
    rules: &synesis_billing::TierRules,
    page: usize,
) -> Result<synesis_proto::message::UsageReply, UsageError> {
    // One snapshot for every read, so the balance, the holds and the charges agree even while
    // the ledger writer commits beside it.
    let snapshot = conn.unchecked_transaction().map_err(err)?;
    let store = SqliteLedger::new(&snapshot);
    let balance = synesis_billing::ledger::balance(&store, account.id, now)?;
    let (charges, next) = charges_page(
        &snapshot,
        account.id,
        member,
        request.since,
        request.after,
        page,
    )?;
    snapshot.finish().map_err(err)?;
    Ok(reply_of(account, request, &balance, charges, next, rules))
}

/// A usage reply from what one snapshot read: the balance, and a page of charges.
pub(crate) fn reply_of(
    account: &crate::storage::Account,
    request: &synesis_proto::message::UsageRequest,
    balance: &synesis_billing::ledger::Balance,
    mut charges: Vec<synesis_proto::message::Charge>,
    next: Option<RequestId>,
    rules: &synesis_billing::TierRules,
) -> synesis_proto::message::UsageReply {
    if let Some(by) = request.group_by {
        // Stable: the list came in the listing's order.
        charges.sort_by_cached_key(|c| synesis_billing::group_key(c, by));
    }
    synesis_proto::message::UsageReply {
        request_id: request.request_id,
        account: account.name.clone(),
        tier: account.tier,
        balance: balance.balance,
        held: balance.held,
        quota_tokens: match account.tier {
            synesis_billing::Tier::Free => rules.free_quota_tokens,
            synesis_billing::Tier::Managed | synesis_billing::Tier::Byok => 0,
        },
        quota_tokens_used: balance.quota_tokens_used,
        charges,
        next,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_errors_keep_their_kind_so_busy_can_be_retried() {
        let failure = |code| {
            err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        for busy in [rusqlite::ffi::SQLITE_BUSY, rusqlite::ffi::SQLITE_LOCKED] {
            let e = failure(busy);
            assert!(
                matches!(e, StoreError::Conflict(_)) && e.is_retryable(),
                "{e}"
            );
        }
        let e = failure(rusqlite::ffi::SQLITE_CONSTRAINT);
        assert!(
            matches!(e, StoreError::Constraint(_)) && !e.is_retryable(),
            "{e}"
        );
        for gone in [rusqlite::ffi::SQLITE_FULL, rusqlite::ffi::SQLITE_IOERR] {
            let e = failure(gone);
            assert!(
                matches!(e, StoreError::Unavailable(_)) && !e.is_retryable(),
                "{e}"
            );
        }
        let e = corrupt("not an id");
        assert!(matches!(e, StoreError::Corrupt(_)), "{e}");
        // Through the storage layer's error as well.
        let e = StoreError::from(crate::storage::StorageError::Conflict);
        assert!(e.is_retryable(), "{e}");
    }
}
