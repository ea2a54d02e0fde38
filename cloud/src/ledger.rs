//! The cloud's authoritative ledger: `synesis-billing`'s rules over SQLite, every operation one
//! transaction (`Db::ledger`), entries append-only in `ledger_entries`.

use rusqlite::{Connection, params};
use synesis_billing::ledger::{Entry, EntryKind, Store, StoreError};
use synesis_proto::{AccountId, MicroUsd, RequestId, UnixMillis};

/// The ledger store inside one open transaction.
#[derive(Debug)]
pub struct SqliteLedger<'c> {
    conn: &'c Connection,
}

impl<'c> SqliteLedger<'c> {
    pub fn new(conn: &'c Connection) -> SqliteLedger<'c> {
        SqliteLedger { conn }
    }

    /// Marks a voucher redeemed by `request` and returns its amount; the same request again
    /// gets the same amount (idempotent), any other request is refused.
    pub fn redeem_voucher(
        &self,
        code: &str,
        request: RequestId,
        now: UnixMillis,
    ) -> Result<Option<MicroUsd>, StoreError> {
        let hash = crate::db::sha256(code.trim().as_bytes());
        let row = self.conn.query_row(
            "SELECT amount, redeemed_by FROM vouchers WHERE code_sha256 = ?1",
            [hash.as_slice()],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<String>>(1)?)),
        );
        let (amount, redeemed_by) = match row {
            Ok(v) => v,
            Err(rusqlite::Error::QueryReturnedNoRows) => return Ok(None),
            Err(e) => return Err(err(e)),
        };
        match redeemed_by {
            Some(by) if by == request.to_string() => Ok(Some(MicroUsd(amount))),
            Some(_) => Ok(None),
            None => {
                self.conn
                    .execute(
                        "UPDATE vouchers SET redeemed_at = ?2, redeemed_by = ?3 WHERE code_sha256 = ?1 AND redeemed_by IS NULL",
                        params![hash.as_slice(), now.0, request.to_string()],
                    )
                    .map_err(err)?;
                Ok(Some(MicroUsd(amount)))
            }
        }
    }
}

const COLUMNS: &str = "seq, account_id, request_id, kind, model, amount, quota_tokens, body, at, expires_at, prev_hash, hash";

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

fn hash32(v: Vec<u8>) -> Result<[u8; 32], StoreError> {
    v.try_into()
        .map_err(|_| StoreError("a stored hash is not 32 bytes".into()))
}

/// Reads entries; a row that does not parse is an error (the chain check names it).
pub fn query_entries(
    conn: &Connection,
    where_clause: &str,
    args: &[&dyn rusqlite::ToSql],
) -> Result<Vec<Entry>, StoreError> {
    let sql = format!("SELECT {COLUMNS} FROM ledger_entries {where_clause} ORDER BY seq");
    let mut stmt = conn.prepare_cached(&sql).map_err(err)?;
    let rows = stmt
        .query_map(args, |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, String>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, i64>(6)?,
                r.get::<_, Vec<u8>>(7)?,
                r.get::<_, i64>(8)?,
                r.get::<_, Option<i64>>(9)?,
                r.get::<_, Vec<u8>>(10)?,
                r.get::<_, Vec<u8>>(11)?,
            ))
        })
        .map_err(err)?;
    rows.map(|row| {
        let (seq, account, request, kind, model, amount, tokens, body, at, expires_at, prev, hash) =
            row.map_err(err)?;
        Ok(Entry {
            seq: u64::try_from(seq).map_err(err)?,
            account: account.parse().map_err(err)?,
            request_id: request.parse().map_err(err)?,
            kind: u8::try_from(kind)
                .ok()
                .and_then(EntryKind::from_code)
                .ok_or_else(|| StoreError(format!("entry {seq}: unknown kind {kind}")))?,
            model,
            amount: MicroUsd(amount),
            quota_tokens: u64::try_from(tokens).map_err(err)?,
            body: hash32(body)?,
            at: UnixMillis(at),
            expires_at: expires_at.map(UnixMillis),
            prev_hash: hash32(prev)?,
            hash: hash32(hash)?,
        })
    })
    .collect()
}

impl Store for SqliteLedger<'_> {
    fn account_entries(&self, account: AccountId) -> Result<Vec<Entry>, StoreError> {
        query_entries(self.conn, "WHERE account_id = ?1", &[&account.to_string()])
    }

    fn request_entries(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Vec<Entry>, StoreError> {
        query_entries(
            self.conn,
            "WHERE account_id = ?1 AND request_id = ?2",
            &[&account.to_string(), &request.to_string()],
        )
    }

    fn head(&self) -> Result<(u64, [u8; 32]), StoreError> {
        let row = self.conn.query_row(
            "SELECT seq, hash FROM ledger_entries ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Vec<u8>>(1)?)),
        );
        match row {
            Ok((seq, hash)) => Ok((u64::try_from(seq).map_err(err)? + 1, hash32(hash)?)),
            Err(rusqlite::Error::QueryReturnedNoRows) => Ok((0, [0; 32])),
            Err(e) => Err(err(e)),
        }
    }

    fn append(&mut self, e: Entry) -> Result<(), StoreError> {
        self.conn
            .execute(
                &format!("INSERT INTO ledger_entries ({COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)"),
                params![
                    i64::try_from(e.seq).map_err(err)?,
                    e.account.to_string(),
                    e.request_id.to_string(),
                    i64::from(e.kind.code()),
                    e.model,
                    e.amount.0,
                    i64::try_from(e.quota_tokens).map_err(err)?,
                    e.body.as_slice(),
                    e.at.0,
                    e.expires_at.map(|t| t.0),
                    e.prev_hash.as_slice(),
                    e.hash.as_slice(),
                ],
            )
            .map_err(err)?;
        Ok(())
    }
}
