//! Accounts' LoRA adapters (schema v5): uploads in progress with the chunks they hold, the
//! content each account holds (by digest), and the names pointing to it (PROTOCOL.md §2,
//! *Upload*). The bytes themselves are files in the data directory (`upload.rs`); these rows
//! say what is there and what is visible.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use synesis_proto::{AccountId, DeviceId, RequestId, Sha256, UnixMillis};

use super::StorageError;

/// An upload as `UploadBegin` declared it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declared {
    pub name: String,
    pub base_model: String,
    pub size_bytes: u64,
    pub sha256: Sha256,
    pub chunk_size: u32,
}

impl Declared {
    pub fn chunks(&self) -> u32 {
        u32::try_from(self.size_bytes.div_ceil(u64::from(self.chunk_size))).unwrap_or(u32::MAX)
    }

    /// SHA-256 of the declaration, to refuse an upload id reused for another one.
    pub fn body(&self) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.name.as_bytes());
        h.update([0]);
        h.update(self.base_model.as_bytes());
        h.update([0]);
        h.update(self.size_bytes.to_be_bytes());
        h.update(self.sha256.0);
        h.update(self.chunk_size.to_be_bytes());
        h.finalize().into()
    }
}

/// What the cloud knows of an upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRow {
    pub declared: Declared,
    pub body: [u8; 32],
    /// One bit per chunk, chunk 0 in the lowest bit of byte 0.
    pub held: Vec<u8>,
    /// Chunks accepted over the upload's life, those sent again included.
    pub received: u64,
    pub completed: bool,
}

/// One upload as the operator's listing (`admin uploads`) shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UploadSummary {
    pub account: String,
    pub upload_id: String,
    pub name: String,
    pub base_model: String,
    pub size_bytes: u64,
    pub sha256: String,
    pub chunks: u64,
    pub chunks_held: u64,
    /// Chunks accepted over the upload's life, re-sent ones included.
    pub chunks_received: u64,
    pub completed: bool,
}

/// Every account's uploads, oldest first.
pub fn summaries(conn: &Connection) -> Result<Vec<UploadSummary>, StorageError> {
    let mut stmt = conn.prepare(
        "SELECT a.name, u.upload_id, u.name, u.base_model, u.size_bytes, u.sha256, u.chunk_size,
                u.chunks_held, u.chunks_received, u.completed_at IS NOT NULL
         FROM adapter_uploads u JOIN accounts a ON a.id = u.account_id
         ORDER BY u.started_at",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(summary(
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            &r.get::<_, Vec<u8>>(5)?,
            r.get(6)?,
            &r.get::<_, Vec<u8>>(7)?,
            r.get(8)?,
            r.get(9)?,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One row of the operator's listing, from its stored columns.
#[allow(clippy::too_many_arguments)]
pub(crate) fn summary(
    account: String,
    upload_id: String,
    name: String,
    base_model: String,
    size: i64,
    sha: &[u8],
    chunk: i64,
    held: &[u8],
    received: i64,
    completed: bool,
) -> UploadSummary {
    let size = u64::try_from(size).unwrap_or(0);
    UploadSummary {
        account,
        upload_id,
        name,
        base_model,
        size_bytes: size,
        sha256: sha.iter().map(|b| format!("{b:02x}")).collect(),
        chunks: size.div_ceil(u64::try_from(chunk).unwrap_or(1).max(1)),
        chunks_held: held.iter().map(|b| u64::from(b.count_ones())).sum(),
        chunks_received: u64::try_from(received).unwrap_or(0),
        completed,
    }
}

/// How an `UploadBegin` was admitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// A new upload, or one already known under this id. When the account holds this content
    /// already, every chunk is marked held: nothing needs sending. Uploads to the same name
    /// that had been idle since `busy_since` were superseded (their rows removed; the caller
    /// removes their files).
    Upload(UploadRow, Vec<RequestId>),
    Conflict,
    /// Another upload to the same name is in progress.
    Busy,
    /// The account has `n` uploads in progress already.
    TooMany(usize),
    /// The account's storage would go past its limit: what it uses now.
    NoRoom(u64),
}

/// Limits an upload is admitted under.
#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub uploads_in_progress: usize,
    pub storage_bytes: u64,
}

/// One name of an account's adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterRow {
    pub name: String,
    pub sha256: Sha256,
    pub size_bytes: u64,
    pub base_model: String,
    pub uploaded_at: UnixMillis,
    pub device_id: DeviceId,
}

pub(crate) fn corrupt(what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("an adapter record: {what}"))
}

pub(crate) fn digest(bytes: Vec<u8>) -> Result<Sha256, StorageError> {
    Ok(Sha256(
        bytes
            .try_into()
            .map_err(|_| corrupt("a digest is not 32 bytes"))?,
    ))
}

pub(crate) fn u64_of(v: i64) -> Result<u64, StorageError> {
    u64::try_from(v).map_err(corrupt)
}

pub(crate) fn i64_of(v: u64) -> Result<i64, StorageError> {
    i64::try_from(v).map_err(corrupt)
}

/// Admits `UploadBegin` in one write transaction (the checks and the insert cannot race
/// another begin).
/// An upload to a name that another in-progress upload of it touched since `busy_since` is
/// `Busy`; one idle longer is superseded (a person who stopped a push and changed the file
/// need not wait for the abandoned one to be swept).
#[allow(clippy::too_many_arguments)]
pub fn begin(
    conn: &mut Connection,
    account: AccountId,
    upload: RequestId,
    device: DeviceId,
    d: &Declared,
    quota: Quota,
    now: UnixMillis,
    busy_since: UnixMillis,
) -> Result<Begun, StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let acct = account.to_string();
    if let Some(row) = upload_row(&tx, account, upload)? {
        return Ok(if row.body == d.body() {
            Begun::Upload(row, Vec::new())
        } else {
            Begun::Conflict
        });
    }
    let busy: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM adapter_uploads
                        WHERE account_id = ?1 AND name = ?2 AND completed_at IS NULL
                          AND touched_at >= ?3)",
        params![acct, d.name, busy_since.0],
        |r| r.get(0),
    )?;
    if busy {
        return Ok(Begun::Busy);
    }
    let superseded = {
        let mut stmt = tx.prepare(
            "DELETE FROM adapter_uploads
             WHERE account_id = ?1 AND name = ?2 AND completed_at IS NULL
             RETURNING upload_id",
        )?;
        let ids = stmt.query_map(params![acct, d.name], |r| r.get::<_, String>(0))?;
        ids.map(|id| id.map_err(StorageError::from)?.parse().map_err(corrupt))
            .collect::<Result<Vec<RequestId>, _>>()?
    };
    let chunks = d.chunks();
    let mut held = vec![0u8; chunks.div_ceil(8) as usize];
    if holds(&tx, account, &d.sha256, d.size_bytes)? {
        for i in 0..chunks {
            held[(i / 8) as usize] |= 1 << (i % 8);
        }
        return insert(tx, account, upload, device, d, held, now, superseded);
    }
    let (in_progress, pending): (i64, i64) = tx.query_row(
        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0) FROM adapter_uploads
         WHERE account_id = ?1 AND completed_at IS NULL",
        params![acct],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let in_progress = usize::try_from(in_progress).map_err(corrupt)?;
    if in_progress >= quota.uploads_in_progress {
        return Ok(Begun::TooMany(in_progress));
    }
    let stored: i64 = tx.query_row(
        "SELECT COALESCE(SUM(size_bytes), 0) FROM adapter_blobs WHERE account_id = ?1",
        params![acct],
        |r| r.get(0),
    )?;
    let used = u64_of(stored)? + u64_of(pending)?;
    if used.saturating_add(d.size_bytes) > quota.storage_bytes {
        return Ok(Begun::NoRoom(used));
    }
    insert(tx, account, upload, device, d, held, now, superseded)
}

/// Whether the account holds content with this digest and size.
pub fn holds(
    conn: &Connection,
    account: AccountId,
    sha: &Sha256,
    size: u64,
) -> Result<bool, StorageError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM adapter_blobs
                        WHERE account_id = ?1 AND sha256 = ?2 AND size_bytes = ?3)",
        params![account.to_string(), &sha.0[..], i64_of(size)?],
        |r| r.get(0),
    )?)
}

#[allow(clippy::too_many_arguments)]
fn insert(
    tx: rusqlite::Transaction<'_>,
    account: AccountId,
    upload: RequestId,
    device: DeviceId,
    d: &Declared,
    held: Vec<u8>,
    now: UnixMillis,
    superseded: Vec<RequestId>,
) -> Result<Begun, StorageError> {
    let row = UploadRow {
        declared: d.clone(),
        body: d.body(),
        held,
        received: 0,
        completed: false,
    };
    tx.execute(
        "INSERT INTO adapter_uploads (account_id, upload_id, body, name, base_model, size_bytes,
             sha256, chunk_size, device_id, chunks_held, chunks_received, started_at, touched_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, 0, ?11, ?11)",
        params![
            account.to_string(),
            upload.to_string(),
            &row.body[..],
            d.name,
            d.base_model,
            i64_of(d.size_bytes)?,
            &d.sha256.0[..],
            d.chunk_size,
            device.to_string(),
            row.held,
            now.0
        ],
    )?;
    tx.commit()?;
    Ok(Begun::Upload(row, superseded))
}

pub fn upload_row(
    conn: &Connection,
    account: AccountId,
    upload: RequestId,
) -> Result<Option<UploadRow>, StorageError> {
    type Raw = (
        Vec<u8>,
        String,
        String,
        i64,
        Vec<u8>,
        u32,
        Vec<u8>,
        i64,
        bool,
    );
    let raw: Option<Raw> = conn
        .query_row(
            "SELECT body, name, base_model, size_bytes, sha256, chunk_size, chunks_held,
                    chunks_received, completed_at IS NOT NULL
             FROM adapter_uploads WHERE account_id = ?1 AND upload_id = ?2",
            params![account.to_string(), upload.to_string()],
            |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                ))
            },
        )
        .optional()?;
    let Some((body, name, base_model, size, sha, chunk_size, held, received, completed)) = raw
    else {
        return Ok(None);
    };
    let declared = Declared {
        name,
        base_model,
        size_bytes: u64_of(size)?,
        sha256: digest(sha)?,
        chunk_size,
    };
    upload_of(declared, body, held, received, completed).map(Some)
}

/// An upload from its stored columns.
pub(crate) fn upload_of(
    declared: Declared,
    body: Vec<u8>,
    held: Vec<u8>,
    received: i64,
    completed: bool,
) -> Result<UploadRow, StorageError> {
    Ok(UploadRow {
        declared,
        body: body
            .try_into()
            .map_err(|_| corrupt("body is not 32 bytes"))?,
        held,
        received: u64_of(received)?,
        completed,
    })
}

/// Adds chunks held (bits set in `held`, never cleared: another stream of the same upload may
/// have recorded others) and chunks received. Call only once their bytes are on disk.
pub fn record_chunks(
    conn: &mut Connection,
    account: AccountId,
    upload: RequestId,
    held: &[u8],
    received: u64,
    now: UnixMillis,
) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let current: Option<Vec<u8>> = tx
        .query_row(
            "SELECT chunks_held FROM adapter_uploads
             WHERE account_id = ?1 AND upload_id = ?2 AND completed_at IS NULL",
            params![account.to_string(), upload.to_string()],
            |r| r.get(0),
        )
        .optional()?;
    let Some(mut current) = current else {
        return Ok(()); // completed, discarded or swept meanwhile
    };
    for (c, h) in current.iter_mut().zip(held) {
        *c |= h;
    }
    tx.execute(
        "UPDATE adapter_uploads SET chunks_held = ?3, chunks_received = chunks_received + ?4,
             touched_at = ?5
         WHERE account_id = ?1 AND upload_id = ?2",
        params![
            account.to_string(),
            upload.to_string(),
            current,
            i64_of(received)?,
            now.0
        ],
    )?;
    tx.commit()?;
    Ok(())
}

/// Forgets an upload whose bytes were wrong (its file is removed by the caller).
pub fn discard(
    conn: &Connection,
    account: AccountId,
    upload: RequestId,
) -> Result<(), StorageError> {
    conn.execute(
        "DELETE FROM adapter_uploads WHERE account_id = ?1 AND upload_id = ?2",
        params![account.to_string(), upload.to_string()],
    )?;
    Ok(())
}

/// The upload is verified and its content stored: the name points to it now (one
/// transaction). A completed upload is left as it is (a replay moves no name).
pub fn complete(
    conn: &mut Connection,
    account: AccountId,
    upload: RequestId,
    device: DeviceId,
    d: &Declared,
    now: UnixMillis,
) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let acct = account.to_string();
    let done = tx.execute(
        "UPDATE adapter_uploads SET completed_at = ?3, touched_at = ?3
         WHERE account_id = ?1 AND upload_id = ?2 AND completed_at IS NULL",
        params![acct, upload.to_string(), now.0],
    )?;
    if done == 1 {
        tx.execute(
            "INSERT INTO adapter_blobs (account_id, sha256, size_bytes, released_at)
             VALUES (?1, ?2, ?3, NULL)
             ON CONFLICT (account_id, sha256) DO UPDATE SET released_at = NULL",
            params![acct, &d.sha256.0[..], i64_of(d.size_bytes)?],
        )?;
        point(&tx, account, device, d, now)?;
    }
    tx.commit()?;
    Ok(())
}

fn point(
    tx: &rusqlite::Transaction<'_>,
    account: AccountId,
    device: DeviceId,
    d: &Declared,
    now: UnixMillis,
) -> Result<(), StorageError> {
    let acct = account.to_string();
    let before: Option<Vec<u8>> = tx
        .query_row(
            "SELECT sha256 FROM adapters WHERE account_id = ?1 AND name = ?2",
            params![acct, d.name],
            |r| r.get(0),
        )
        .optional()?;
    tx.execute(
        "INSERT INTO adapters (account_id, name, sha256, size_bytes, base_model, device_id,
             uploaded_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (account_id, name) DO UPDATE SET sha256 = ?3, size_bytes = ?4,
             base_model = ?5, device_id = ?6, uploaded_at = ?7",
        params![
            acct,
            d.name,
            &d.sha256.0[..],
            i64_of(d.size_bytes)?,
            d.base_model,
            device.to_string(),
            now.0
        ],
    )?;
    if let Some(before) = before {
        release_if_unused(tx, account, &before, now)?;
    }
    Ok(())
}

/// Marks content no name points to any more, so the sweeper removes it after a grace period
/// (requests admitted before keep using it meanwhile).
fn release_if_unused(
    tx: &rusqlite::Transaction<'_>,
    account: AccountId,
    sha: &[u8],
    now: UnixMillis,
) -> Result<(), StorageError> {
    tx.execute(
        "UPDATE adapter_blobs SET released_at = ?3
         WHERE account_id = ?1 AND sha256 = ?2 AND released_at IS NULL
           AND NOT EXISTS (SELECT 1 FROM adapters WHERE account_id = ?1 AND sha256 = ?2)",
        params![account.to_string(), sha, now.0],
    )?;
    Ok(())
}

pub fn adapter(
    conn: &Connection,
    account: AccountId,
    name: &str,
) -> Result<Option<AdapterRow>, StorageError> {
    let mut rows = list_where(conn, account, Some(name))?;
    Ok(rows.pop())
}

/// The account's adapters, by name.
pub fn list(conn: &Connection, account: AccountId) -> Result<Vec<AdapterRow>, StorageError> {
    list_where(conn, account, None)
}

fn list_where(
    conn: &Connection,
    account: AccountId,
    name: Option<&str>,
) -> Result<Vec<AdapterRow>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, sha256, size_bytes, base_model, uploaded_at, device_id FROM adapters
         WHERE account_id = ?1 AND (?2 IS NULL OR name = ?2) ORDER BY name",
    )?;
    let rows = stmt.query_map(params![account.to_string(), name], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, Vec<u8>>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (name, sha, size, base_model, at, device) = row?;
        out.push(adapter_of(name, sha, size, base_model, at, &device)?);
    }
    Ok(out)
}

/// One name of an account's adapters, from its stored columns.
pub(crate) fn adapter_of(
    name: String,
    sha: Vec<u8>,
    size: i64,
    base_model: String,
    at: i64,
    device: &str,
) -> Result<AdapterRow, StorageError> {
    Ok(AdapterRow {
        name,
        sha256: digest(sha)?,
        size_bytes: u64_of(size)?,
        base_model,
        uploaded_at: UnixMillis(at),
        device_id: device.parse().map_err(corrupt)?,
    })
}

/// What removing a name came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removed {
    /// The content the name pointed to (now, or for the first try of this request id).
    Removed(Sha256),
    NotFound,
    /// The request id removed another name.
    Conflict,
}

/// Removes a name, once per request id: a repeated id answers what the first removed.
pub fn remove(
    conn: &mut Connection,
    account: AccountId,
    request: RequestId,
    name: &str,
    now: UnixMillis,
) -> Result<Removed, StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let acct = account.to_string();
    let earlier: Option<(String, Vec<u8>)> = tx
        .query_row(
            "SELECT name, sha256 FROM adapter_removals WHERE account_id = ?1 AND request_id = ?2",
            params![acct, request.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((removed, sha)) = earlier {
        return Ok(if removed == name {
            Removed::Removed(digest(sha)?)
        } else {
            Removed::Conflict
        });
    }
    let current: Option<Vec<u8>> = tx
        .query_row(
            "SELECT sha256 FROM adapters WHERE account_id = ?1 AND name = ?2",
            params![acct, name],
            |r| r.get(0),
        )
        .optional()?;
    let Some(sha) = current else {
        return Ok(Removed::NotFound);
    };
    tx.execute(
        "DELETE FROM adapters WHERE account_id = ?1 AND name = ?2",
        params![acct, name],
    )?;
    tx.execute(
        "INSERT INTO adapter_removals (account_id, request_id, name, sha256, at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![acct, request.to_string(), name, &sha[..], now.0],
    )?;
    release_if_unused(&tx, account, &sha, now)?;
    tx.commit()?;
    digest(sha).map(Removed::Removed)
}

/// What the sweeper removes: uploads untouched since `abandoned_before` (their rows go now,
/// their files are named for the caller to delete), and content released before
/// `released_before` that no name points to again.
#[derive(Debug, Default)]
pub struct Swept {
    pub uploads: Vec<(AccountId, RequestId)>,
    pub blobs: Vec<(AccountId, Sha256)>,
}

pub fn sweep(
    conn: &mut Connection,
    abandoned_before: UnixMillis,
    released_before: UnixMillis,
) -> Result<Swept, StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut swept = Swept::default();
    {
        let mut stmt = tx.prepare(
            "DELETE FROM adapter_uploads WHERE completed_at IS NULL AND touched_at < ?1
             RETURNING account_id, upload_id",
        )?;
        let rows = stmt.query_map(params![abandoned_before.0], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        for row in rows {
            let (a, u) = row?;
            swept
                .uploads
                .push((a.parse().map_err(corrupt)?, u.parse().map_err(corrupt)?));
        }
        // Finished uploads and removals are kept for replays as long as partial uploads are.
        tx.execute(
            "DELETE FROM adapter_uploads WHERE completed_at IS NOT NULL AND completed_at < ?1",
            params![abandoned_before.0],
        )?;
        tx.execute(
            "DELETE FROM adapter_removals WHERE at < ?1",
            params![abandoned_before.0],
        )?;
        let mut stmt = tx.prepare(
            "DELETE FROM adapter_blobs WHERE released_at IS NOT NULL AND released_at < ?1
             RETURNING account_id, sha256",
        )?;
        let rows = stmt.query_map(params![released_before.0], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })?;
        for row in rows {
            let (a, sha) = row?;
            swept
                .blobs
                .push((a.parse().map_err(corrupt)?, digest(sha)?));
        }
    }
    tx.commit()?;
    Ok(swept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::Db;

    fn declared(name: &str, sha: u8) -> Declared {
        Declared {
            name: name.into(),
            base_model: "tiny".into(),
            size_bytes: 200_000,
            sha256: Sha256([sha; 32]),
            chunk_size: 65_536,
        }
    }

    fn id(n: u8) -> RequestId {
        RequestId::from_digest([n; 16])
    }

    #[test]
    fn a_name_is_busy_while_its_upload_is_active_and_superseded_once_idle() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("cloud.db")).unwrap();
        let conn = db.connection_mut();
        let (account, device) = (
            AccountId::try_from_uuid(uuid::Uuid::from_u128(1)).unwrap(),
            DeviceId::try_from_uuid(uuid::Uuid::from_u128(2)).unwrap(),
        );
        let quota = Quota {
            uploads_in_progress: 4,
            storage_bytes: 1 << 30,
        };
        let begin = |conn: &mut Connection, n: u8, sha: u8, at: i64, busy_since: i64| {
            begin(
                conn,
                account,
                id(n),
                device,
                &declared("legal", sha),
                quota,
                UnixMillis(at),
                UnixMillis(busy_since),
            )
            .unwrap()
        };
        assert!(matches!(begin(conn, 1, 1, 1_000, 0), Begun::Upload(_, s) if s.is_empty()));
        // Another declaration under the same id: a conflict, whatever the name's state.
        assert_eq!(begin(conn, 1, 2, 1_000, 0), Begun::Conflict);
        // Another upload to the name while the first was touched within the window.
        assert_eq!(begin(conn, 2, 2, 1_500, 900), Begun::Busy);
        // The first went idle before the window: the new one supersedes it.
        match begin(conn, 2, 2, 200_000, 100_000) {
            Begun::Upload(row, superseded) => {
                assert_eq!(superseded, [id(1)]);
                assert!(!row.completed);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(upload_row(conn, account, id(1)).unwrap(), None);
    }
}
