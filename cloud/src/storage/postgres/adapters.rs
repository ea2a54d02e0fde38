//! Adapter uploads in progress, the content each account holds and the names pointing to it,
//! on PostgreSQL ([`AdapterStore`], [`AdapterChanges`]), with SQLite's behaviour
//! (`storage::adapters`).
//!
//! Where SQLite serialises writers with `BEGIN IMMEDIATE`, a change that decides on an
//! account's whole adapter state (admitting an upload against its limits, completing one,
//! removing a name) locks the account first ([`lock_account`]); recording chunks locks only its
//! upload's row. The sweep deletes what is old enough with `RETURNING`, row by row.

use deadpool_postgres::GenericClient;
use synesis_proto::{AccountId, DeviceId, RequestId, Sha256, UnixMillis};

use super::{Pg, lock_account};
use crate::storage::StorageError;
use crate::storage::adapters::{
    AdapterRow, Begun, Declared, Quota, Removed, Swept, UploadRow, UploadSummary, adapter_of,
    corrupt, digest, i64_of, summary, u64_of, upload_of,
};
use crate::storage::unit::{AdapterChanges, AdapterStore};

async fn upload_row(
    client: &impl GenericClient,
    account: AccountId,
    upload: RequestId,
) -> Result<Option<UploadRow>, StorageError> {
    let row = client
        .query_opt(
            "SELECT body, name, base_model, size_bytes, sha256, chunk_size, chunks_held,
                    chunks_received, completed_at IS NOT NULL
             FROM adapter_uploads WHERE account_id = $1 AND upload_id = $2",
            &[&account.to_string(), &upload.to_string()],
        )
        .await?;
    let Some(r) = row else {
        return Ok(None);
    };
    let declared = Declared {
        name: r.get(1),
        base_model: r.get(2),
        size_bytes: u64_of(r.get(3))?,
        sha256: digest(r.get(4))?,
        chunk_size: u32::try_from(r.get::<_, i64>(5)).map_err(corrupt)?,
    };
    upload_of(declared, r.get(0), r.get(6), r.get(7), r.get(8)).map(Some)
}

async fn holds(
    client: &impl GenericClient,
    account: AccountId,
    sha: &Sha256,
    size: u64,
) -> Result<bool, StorageError> {
    Ok(client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM adapter_blobs
                            WHERE account_id = $1 AND sha256 = $2 AND size_bytes = $3)",
            &[&account.to_string(), &sha.0.as_slice(), &i64_of(size)?],
        )
        .await?
        .get(0))
}

async fn list_where(
    client: &impl GenericClient,
    account: AccountId,
    name: Option<&str>,
) -> Result<Vec<AdapterRow>, StorageError> {
    let rows = client
        .query(
            "SELECT name, sha256, size_bytes, base_model, uploaded_at, device_id FROM adapters
             WHERE account_id = $1 AND ($2::TEXT IS NULL OR name = $2) ORDER BY name",
            &[&account.to_string(), &name],
        )
        .await?;
    rows.iter()
        .map(|r| adapter_of(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)))
        .collect()
}

/// Marks content no name points to any more (`storage::adapters::release_if_unused`).
async fn release_if_unused(
    client: &impl GenericClient,
    account: AccountId,
    sha: &[u8],
    now: UnixMillis,
) -> Result<(), StorageError> {
    client
        .execute(
            "UPDATE adapter_blobs SET released_at = $3
             WHERE account_id = $1 AND sha256 = $2 AND released_at IS NULL
               AND NOT EXISTS (SELECT 1 FROM adapters WHERE account_id = $1 AND sha256 = $2)",
            &[&account.to_string(), &sha, &now.0],
        )
        .await?;
    Ok(())
}

impl AdapterStore for Pg {
    fn upload(
        &self,
        account: AccountId,
        upload: RequestId,
    ) -> Result<Option<UploadRow>, StorageError> {
        self.io()
            .wait(async { upload_row(&self.client().await?, account, upload).await })
    }

    fn holds_content(
        &self,
        account: AccountId,
        sha: &Sha256,
        size: u64,
    ) -> Result<bool, StorageError> {
        self.io()
            .wait(async { holds(&self.client().await?, account, sha, size).await })
    }

    fn discard_upload(&self, account: AccountId, upload: RequestId) -> Result<(), StorageError> {
        self.io().wait(async {
            self.client()
                .await?
                .execute(
                    "DELETE FROM adapter_uploads WHERE account_id = $1 AND upload_id = $2",
                    &[&account.to_string(), &upload.to_string()],
                )
                .await?;
            Ok(())
        })
    }

    fn adapter(&self, account: AccountId, name: &str) -> Result<Option<AdapterRow>, StorageError> {
        self.io().wait(async {
            let mut rows = list_where(&self.client().await?, account, Some(name)).await?;
            Ok(rows.pop())
        })
    }

    fn adapters(&self, account: AccountId) -> Result<Vec<AdapterRow>, StorageError> {
        self.io()
            .wait(async { list_where(&self.client().await?, account, None).await })
    }

    fn upload_summaries(&self) -> Result<Vec<UploadSummary>, StorageError> {
        self.io().wait(async {
            let rows = self
                .client()
                .await?
                .query(
                    "SELECT a.name, u.upload_id, u.name, u.base_model, u.size_bytes, u.sha256,
                            u.chunk_size, u.chunks_held, u.chunks_received,
                            u.completed_at IS NOT NULL
                     FROM adapter_uploads u JOIN accounts a ON a.id = u.account_id
                     ORDER BY u.started_at",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    summary(
                        r.get(0),
                        r.get(1),
                        r.get(2),
                        r.get(3),
                        r.get(4),
                        r.get(5),
                        r.get(6),
                        r.get(7),
                        r.get(8),
                        r.get(9),
                    )
                })
                .collect())
        })
    }
}

impl AdapterChanges for Pg {
    fn begin_upload(
        &mut self,
        account: AccountId,
        upload: RequestId,
        device: DeviceId,
        d: &Declared,
        quota: Quota,
        now: UnixMillis,
        busy_since: UnixMillis,
    ) -> Result<Begun, StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let acct = account.to_string();
            if let Some(row) = upload_row(&tx, account, upload).await? {
                return Ok(if row.body == d.body() {
                    Begun::Upload(row, Vec::new())
                } else {
                    Begun::Conflict
                });
            }
            let busy: bool = tx
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM adapter_uploads
                                    WHERE account_id = $1 AND name = $2 AND completed_at IS NULL
                                      AND touched_at >= $3)",
                    &[&acct, &d.name, &busy_since.0],
                )
                .await?
                .get(0);
            if busy {
                return Ok(Begun::Busy);
            }
            let superseded = tx
                .query(
                    "DELETE FROM adapter_uploads
                     WHERE account_id = $1 AND name = $2 AND completed_at IS NULL
                     RETURNING upload_id",
                    &[&acct, &d.name],
                )
                .await?
                .iter()
                .map(|r| r.get::<_, &str>(0).parse().map_err(corrupt))
                .collect::<Result<Vec<RequestId>, _>>()?;
            let chunks = d.chunks();
            let mut held = vec![0u8; chunks.div_ceil(8) as usize];
            if holds(&tx, account, &d.sha256, d.size_bytes).await? {
                for i in 0..chunks {
                    held[(i / 8) as usize] |= 1 << (i % 8);
                }
            } else {
                let row = tx
                    .query_one(
                        "SELECT COUNT(*), COALESCE(SUM(size_bytes), 0)::BIGINT FROM adapter_uploads
                         WHERE account_id = $1 AND completed_at IS NULL",
                        &[&acct],
                    )
                    .await?;
                let (in_progress, pending): (i64, i64) = (row.get(0), row.get(1));
                let in_progress = usize::try_from(in_progress).map_err(corrupt)?;
                if in_progress >= quota.uploads_in_progress {
                    return Ok(Begun::TooMany(in_progress));
                }
                let stored: i64 = tx
                    .query_one(
                        "SELECT COALESCE(SUM(size_bytes), 0)::BIGINT FROM adapter_blobs
                         WHERE account_id = $1",
                        &[&acct],
                    )
                    .await?
                    .get(0);
                let used = u64_of(stored)? + u64_of(pending)?;
                if used.saturating_add(d.size_bytes) > quota.storage_bytes {
                    return Ok(Begun::NoRoom(used));
                }
            }
            let row = UploadRow {
                declared: d.clone(),
                body: d.body(),
                held,
                received: 0,
                completed: false,
            };
            tx.execute(
                "INSERT INTO adapter_uploads (account_id, upload_id, body, name, base_model,
                     size_bytes, sha256, chunk_size, device_id, chunks_held, chunks_received,
                     started_at, touched_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, 0, $11, $11)",
                &[
                    &acct,
                    &upload.to_string(),
                    &row.body.as_slice(),
                    &d.name,
                    &d.base_model,
                    &i64_of(d.size_bytes)?,
                    &d.sha256.0.as_slice(),
                    &i64::from(d.chunk_size),
                    &device.to_string(),
                    &row.held,
                    &now.0,
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(Begun::Upload(row, superseded))
        })
    }

    fn record_chunks(
        &mut self,
        account: AccountId,
        upload: RequestId,
        held: &[u8],
        received: u64,
        now: UnixMillis,
    ) -> Result<(), StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let (acct, id) = (account.to_string(), upload.to_string());
            let current = tx
                .query_opt(
                    "SELECT chunks_held FROM adapter_uploads
                     WHERE account_id = $1 AND upload_id = $2 AND completed_at IS NULL
                     FOR UPDATE",
                    &[&acct, &id],
                )
                .await?;
            let Some(current) = current else {
                return Ok(()); // completed, discarded or swept meanwhile
            };
            let mut current: Vec<u8> = current.get(0);
            for (c, h) in current.iter_mut().zip(held) {
                *c |= h;
            }
            tx.execute(
                "UPDATE adapter_uploads SET chunks_held = $3,
                     chunks_received = chunks_received + $4, touched_at = $5
                 WHERE account_id = $1 AND upload_id = $2",
                &[&acct, &id, &current, &i64_of(received)?, &now.0],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn complete_upload(
        &mut self,
        account: AccountId,
        upload: RequestId,
        device: DeviceId,
        d: &Declared,
        now: UnixMillis,
    ) -> Result<(), StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let acct = account.to_string();
            let done = tx
                .execute(
                    "UPDATE adapter_uploads SET completed_at = $3, touched_at = $3
                     WHERE account_id = $1 AND upload_id = $2 AND completed_at IS NULL",
                    &[&acct, &upload.to_string(), &now.0],
                )
                .await?;
            if done == 1 {
                let (sha, size) = (d.sha256.0.as_slice(), i64_of(d.size_bytes)?);
                tx.execute(
                    "INSERT INTO adapter_blobs (account_id, sha256, size_bytes, released_at)
                     VALUES ($1, $2, $3, NULL)
                     ON CONFLICT (account_id, sha256) DO UPDATE SET released_at = NULL",
                    &[&acct, &sha, &size],
                )
                .await?;
                // The name points to the new content; what it pointed to before may be unused.
                let before = tx
                    .query_opt(
                        "SELECT sha256 FROM adapters WHERE account_id = $1 AND name = $2",
                        &[&acct, &d.name],
                    )
                    .await?;
                tx.execute(
                    "INSERT INTO adapters (account_id, name, sha256, size_bytes, base_model,
                         device_id, uploaded_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7)
                     ON CONFLICT (account_id, name) DO UPDATE SET sha256 = $3, size_bytes = $4,
                         base_model = $5, device_id = $6, uploaded_at = $7",
                    &[
                        &acct,
                        &d.name,
                        &sha,
                        &size,
                        &d.base_model,
                        &device.to_string(),
                        &now.0,
                    ],
                )
                .await?;
                if let Some(before) = before {
                    release_if_unused(&tx, account, before.get(0), now).await?;
                }
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn remove_adapter(
        &mut self,
        account: AccountId,
        request: RequestId,
        name: &str,
        now: UnixMillis,
    ) -> Result<Removed, StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let acct = account.to_string();
            let earlier = tx
                .query_opt(
                    "SELECT name, sha256 FROM adapter_removals
                     WHERE account_id = $1 AND request_id = $2",
                    &[&acct, &request.to_string()],
                )
                .await?;
            if let Some(r) = earlier {
                return Ok(if r.get::<_, &str>(0) == name {
                    Removed::Removed(digest(r.get(1))?)
                } else {
                    Removed::Conflict
                });
            }
            let current = tx
                .query_opt(
                    "SELECT sha256 FROM adapters WHERE account_id = $1 AND name = $2",
                    &[&acct, &name],
                )
                .await?;
            let Some(current) = current else {
                return Ok(Removed::NotFound);
            };
            let sha: Vec<u8> = current.get(0);
            tx.execute(
                "DELETE FROM adapters WHERE account_id = $1 AND name = $2",
                &[&acct, &name],
            )
            .await?;
            tx.execute(
                "INSERT INTO adapter_removals (account_id, request_id, name, sha256, at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&acct, &request.to_string(), &name, &sha, &now.0],
            )
            .await?;
            release_if_unused(&tx, account, &sha, now).await?;
            tx.commit().await?;
            digest(sha).map(Removed::Removed)
        })
    }

    fn sweep_uploads(
        &mut self,
        abandoned_before: UnixMillis,
        released_before: UnixMillis,
    ) -> Result<Swept, StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let mut swept = Swept::default();
            let rows = tx
                .query(
                    "DELETE FROM adapter_uploads WHERE completed_at IS NULL AND touched_at < $1
                     RETURNING account_id, upload_id",
                    &[&abandoned_before.0],
                )
                .await?;
            for r in &rows {
                let (a, u): (&str, &str) = (r.get(0), r.get(1));
                swept
                    .uploads
                    .push((a.parse().map_err(corrupt)?, u.parse().map_err(corrupt)?));
            }
            // Finished uploads and removals are kept for replays as long as partial uploads are.
            tx.execute(
                "DELETE FROM adapter_uploads WHERE completed_at IS NOT NULL AND completed_at < $1",
                &[&abandoned_before.0],
            )
            .await?;
            tx.execute(
                "DELETE FROM adapter_removals WHERE at < $1",
                &[&abandoned_before.0],
            )
            .await?;
            let rows = tx
                .query(
                    "DELETE FROM adapter_blobs WHERE released_at IS NOT NULL AND released_at < $1
                     RETURNING account_id, sha256",
                    &[&released_before.0],
                )
                .await?;
            for r in &rows {
                let a: &str = r.get(0);
                swept
                    .blobs
                    .push((a.parse().map_err(corrupt)?, digest(r.get(1))?));
            }
            tx.commit().await?;
            Ok(swept)
        })
    }
}
