//! The SQLite backend (WAL): accounts, setup tokens, devices and their certificates, their
//! last known state, vouchers. `serve` and `admin` open the same file from different
//! processes; every change is one transaction, and readers never block the writer (WAL).
//!
//! Commits are durable (`synchronous=FULL`): an enrollment the device was told succeeded
//! survives a power cut. What would make that expensive, a write per heartbeat, is batched by
//! the cloud's heartbeat recorder ([`Devices::record_seen`]).
//!
//! Timestamps are Unix milliseconds, passed in by the caller (the clock is read at the edges).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use synesis_proto::message::Tier;
use synesis_proto::{AccountId, DeviceId, MicroUsd, RequestId, Sha256, UnixMillis};

use super::registry::{
    DEVICE_NAME_BYTES_MAX, Token, TokenCheck, check_token, member_role, parse_id,
};
use super::{
    Account, Accounts, BUSY_TIMEOUT, Device, DeviceRow, Devices, EnrollError, Enrolled, Enrollment,
    IssuedCert, Presence, Renewal, StorageError, Vouchers, parse_tier, printable, sha256,
};

/// A connection with the settings every user of the file shares.
pub fn connect(path: &Path) -> Result<Connection, StorageError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// The write lock [`Db::hold_write_lock`] took; released (nothing written) when dropped.
#[derive(Debug)]
pub struct WriteLock {
    conn: Connection,
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
    }
}

#[derive(Debug)]
pub struct Db {
    conn: Connection,
}

fn read_token(conn: &Connection, token_id: &[u8; 16]) -> Result<Option<Token>, rusqlite::Error> {
    conn.prepare_cached(
        "SELECT t.account_id, a.name, t.secret_sha256, t.expires_at, t.used_at, t.used_by_request
         FROM setup_tokens t JOIN accounts a ON a.id = t.account_id WHERE t.id = ?1",
    )?
    .query_row([token_id.as_slice()], |r| {
        Ok(Token {
            account_id: r.get(0)?,
            account_name: r.get(1)?,
            secret_hash: r.get(2)?,
            expires_at: r.get(3)?,
            used_at: r.get(4)?,
            used_by: r.get(5)?,
        })
    })
    .optional()
}

impl Db {
    /// Opens (or creates) the database and brings its schema up to this build's.
    pub fn open(path: &Path) -> Result<Db, StorageError> {
        let mut conn = connect(path)?;
        super::schema::migrate(&mut conn, path)?;
        Ok(Db { conn })
    }

    /// Reads and writes on this connection, through the repository traits.
    pub fn unit(&self) -> super::Unit<'_> {
        super::Unit::new(&self.conn)
    }

    /// Holds the database's write lock until the guard is dropped: what an operator's long
    /// transaction or a stalled disk does to every other writer. Tests use it to make the
    /// store busy.
    pub fn hold_write_lock(self) -> Result<WriteLock, StorageError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        Ok(WriteLock { conn: self.conn })
    }

    /// The raw connection: for the storage layer and its own tests (`cloud/tests`). Handlers
    /// and `admin` go through the repository traits (the tidy test holds them to it).
    /// The schema version the file is at (what a node's readiness compares with its own).
    pub fn schema_version(&self) -> Result<i64, StorageError> {
        Ok(self
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))?)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn connection_mut(&mut self) -> &mut Connection {
        &mut self.conn
    }
}

impl Accounts for Db {
    fn create_account(
        &mut self,
        id: AccountId,
        name: &str,
        tier: Tier,
        now: UnixMillis,
    ) -> Result<Account, StorageError> {
        let inserted = self.conn.execute(
            "INSERT INTO accounts (id, name, tier, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(name) DO NOTHING",
            params![id.to_string(), name, tier.as_str(), now.0],
        )?;
        if inserted == 0 {
            return Err(StorageError::AccountExists(name.to_owned()));
        }
        // Its owner: the member whose id is the account's.
        self.conn.execute(
            "INSERT INTO members (id, account_id, name, role, joined_at) VALUES (?1, ?1, ?2, 'owner', ?3)",
            params![id.to_string(), name, now.0],
        )?;
        Ok(Account {
            id,
            name: name.to_owned(),
            tier,
        })
    }

    fn account_by_name(&self, name: &str) -> Result<Account, StorageError> {
        let row = self
            .conn
            .query_row(
                "SELECT id, tier FROM accounts WHERE name = ?1",
                [name],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?;
        let (id, tier) = row.ok_or_else(|| StorageError::NoSuchAccount(name.to_owned()))?;
        let tier =
            parse_tier(&tier).ok_or_else(|| StorageError::Corrupt(format!("tier {tier:?}")))?;
        Ok(Account {
            id: parse_id(&id)?,
            name: name.to_owned(),
            tier,
        })
    }

    fn account_by_id(&self, id: AccountId) -> Result<Account, StorageError> {
        let (name, tier) = self.conn.query_row(
            "SELECT name, tier FROM accounts WHERE id = ?1",
            [id.to_string()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )?;
        let tier =
            parse_tier(&tier).ok_or_else(|| StorageError::Corrupt(format!("tier {tier:?}")))?;
        Ok(Account { id, name, tier })
    }

    fn set_tier(&mut self, name: &str, tier: Tier) -> Result<(), StorageError> {
        let n = self.conn.execute(
            "UPDATE accounts SET tier = ?2 WHERE name = ?1",
            params![name, tier.as_str()],
        )?;
        if n == 0 {
            return Err(StorageError::NoSuchAccount(name.to_owned()));
        }
        Ok(())
    }
}

impl super::Nodes for Db {
    fn node_seen(
        &mut self,
        id: &str,
        addr: &str,
        started_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<(), StorageError> {
        self.conn
            .prepare_cached(
                "INSERT INTO nodes (id, addr, started_at, seen_at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (id) DO UPDATE SET seen_at = excluded.seen_at",
            )?
            .execute(params![id, addr, started_at.0, now.0])?;
        Ok(())
    }

    fn node_stopped(&mut self, id: &str, now: UnixMillis) -> Result<(), StorageError> {
        self.conn
            .prepare_cached("UPDATE nodes SET stopped_at = ?2 WHERE id = ?1")?
            .execute(params![id, now.0])?;
        Ok(())
    }

    fn nodes(&self) -> Result<Vec<super::NodeRow>, StorageError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, addr, started_at, seen_at, stopped_at, swept_at FROM nodes
             ORDER BY started_at, id",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok(super::NodeRow {
                id: r.get(0)?,
                addr: r.get(1)?,
                started_at: UnixMillis(r.get(2)?),
                seen_at: UnixMillis(r.get(3)?),
                stopped_at: r.get::<_, Option<i64>>(4)?.map(UnixMillis),
                swept_at: r.get::<_, Option<i64>>(5)?.map(UnixMillis),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    fn runs_of(&self, id: &str) -> Result<Vec<(AccountId, RequestId)>, StorageError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT account_id, request_id FROM runs WHERE node = ?1")?;
        let rows = stmt.query_map([id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?;
        rows.map(|row| {
            let (account, request) = row?;
            Ok((parse_id(&account)?, parse_id(&request)?))
        })
        .collect()
    }

    fn node_gone(&mut self, id: &str) -> Result<(), StorageError> {
        self.conn
            .prepare_cached(
                "UPDATE devices SET connected = 0, node = NULL WHERE node = ?1 AND connected = 1",
            )?
            .execute([id])?;
        Ok(())
    }

    fn node_swept(&mut self, id: &str, now: UnixMillis) -> Result<(), StorageError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        tx.prepare_cached("DELETE FROM runs WHERE node = ?1")?
            .execute([id])?;
        tx.prepare_cached("UPDATE nodes SET swept_at = ?2 WHERE id = ?1")?
            .execute(params![id, now.0])?;
        tx.commit()?;
        Ok(())
    }

    fn prune_runs(&mut self, id: &str) -> Result<usize, StorageError> {
        Ok(self
            .conn
            .prepare_cached(
                "DELETE FROM runs WHERE node = ?1 AND NOT EXISTS (
                    SELECT 1 FROM ledger_open_holds h
                    WHERE h.account_id = runs.account_id AND h.request_id = runs.request_id)",
            )?
            .execute([id])?)
    }
}

impl Devices for Db {
    fn create_token(
        &mut self,
        account: AccountId,
        token_id: [u8; 16],
        secret: &[u8; 32],
        member: Option<&str>,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(), StorageError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let member_id: Option<String> = match member {
            Some(name) => tx
                .query_row(
                    "SELECT id FROM members WHERE account_id = ?1 AND name = ?2 AND removed_at IS NULL",
                    params![account.to_string(), name],
                    |r| r.get(0),
                )
                .optional()?,
            None => tx
                .query_row(
                    "SELECT id FROM members WHERE account_id = ?1 AND role = 'owner' AND removed_at IS NULL",
                    params![account.to_string()],
                    |r| r.get(0),
                )
                .optional()?,
        };
        let Some(member_id) = member_id else {
            return Err(StorageError::NoSuchMember(
                member.unwrap_or("(the owner)").to_owned(),
            ));
        };
        tx.execute(
            "INSERT INTO setup_tokens (id, account_id, secret_sha256, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![token_id.as_slice(), account.to_string(), sha256(secret).as_slice(), now.0, expires_at.0],
        )?;
        super::members::token_for(&tx, &token_id, &member_id)?;
        tx.commit()?;
        Ok(())
    }

    fn enroll(
        &mut self,
        e: &Enrollment<'_>,
        now: UnixMillis,
        sign: &mut dyn FnMut(DeviceId) -> Result<IssuedCert, String>,
    ) -> Result<Enrolled, EnrollError> {
        let Enrollment {
            token_id,
            secret,
            request,
            device_name,
            new_device_id,
        } = *e;
        // First without the write lock: a wrong, used or expired token costs one read, and
        // never waits behind (or holds up) anyone's write.
        check_token(read_token(&self.conn, &token_id)?, secret, request, now)?;
        let name = printable(device_name);
        if name.is_empty() || name.len() > DEVICE_NAME_BYTES_MAX {
            return Err(EnrollError::BadRequest(format!(
                "the device name must be 1 to {DEVICE_NAME_BYTES_MAX} bytes"
            )));
        }

        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        // Again inside the transaction: another enrollment may have used it in between.
        match check_token(read_token(&tx, &token_id)?, secret, request, now)? {
            TokenCheck::Replay {
                account_id,
                account_name,
            } => {
                let (device, cert) = tx.query_row(
                    "SELECT id, cert_der FROM devices WHERE enroll_request = ?1 AND account_id = ?2",
                    [request.to_string(), account_id.to_string()],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)),
                )?;
                Ok(Enrolled {
                    device_id: parse_id(&device)?,
                    account_id,
                    account_name,
                    cert_der: cert,
                })
            }
            TokenCheck::Fresh {
                account_id,
                account_name,
            } => {
                let reused: bool = tx
                    .prepare_cached(
                        "SELECT EXISTS (SELECT 1 FROM devices WHERE enroll_request = ?1)",
                    )?
                    .query_row([request.to_string()], |r| r.get(0))?;
                if reused {
                    return Err(EnrollError::RequestReused);
                }
                // An invitation's token makes its invitee a member, whose device this is.
                let member = format!("m-{new_device_id}");
                match super::members::accept_in(&tx, &token_id, &member, now) {
                    Ok(_) => {}
                    Err(super::members::MemberError::Storage(e)) => return Err(e.into()),
                    Err(e) => {
                        return Err(EnrollError::BadRequest(format!("{e}: {account_name}")));
                    }
                }
                // The member the token was issued for, still a member. A token bound to no
                // one (issued before tokens were bound) enrolls nobody: deciding its member
                // now would hand whoever owns the account today a device made by someone else.
                let Some(member_id) = super::members::token_member(&tx, &token_id)? else {
                    return Err(EnrollError::Used);
                };
                let cert = sign(new_device_id).map_err(EnrollError::BadRequest)?;
                let fpr = sha256(&cert.der);
                tx.execute(
                    "INSERT INTO devices (id, account_id, name, cert_sha256, cert_der, enroll_request, enrolled_at, member_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    params![
                        new_device_id.to_string(),
                        account_id.to_string(),
                        name,
                        fpr.as_slice(),
                        cert.der,
                        request.to_string(),
                        now.0,
                        member_id
                    ],
                )?;
                tx.execute(
                    "INSERT INTO device_certs (cert_sha256, device_id, cert_der, issued_at, not_after)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![
                        fpr.as_slice(),
                        new_device_id.to_string(),
                        cert.der,
                        now.0,
                        cert.not_after.0
                    ],
                )?;
                tx.execute(
                    "UPDATE setup_tokens SET used_at = ?1, used_by_request = ?2 WHERE id = ?3",
                    params![now.0, request.to_string(), token_id.as_slice()],
                )?;
                tx.commit()?;
                Ok(Enrolled {
                    device_id: new_device_id,
                    account_id,
                    account_name,
                    cert_der: cert.der,
                })
            }
        }
    }

    fn renew_cert(
        &mut self,
        device: DeviceId,
        request: RequestId,
        now: UnixMillis,
        cert: IssuedCert,
        recent: (UnixMillis, usize),
    ) -> Result<Renewal, StorageError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let revoked: Option<Option<i64>> = tx
            .query_row(
                "SELECT revoked_at FROM devices WHERE id = ?1",
                [device.to_string()],
                |r| r.get(0),
            )
            .optional()?;
        if !matches!(revoked, Some(None)) {
            return Ok(Renewal::Revoked);
        }
        let done = tx
            .query_row(
                "SELECT cert_der, not_after FROM device_certs WHERE device_id = ?1 AND renew_request = ?2",
                [device.to_string(), request.to_string()],
                |r| Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, Option<i64>>(1)?)),
            )
            .optional()?;
        if let Some((der, not_after)) = done {
            return Ok(Renewal::Issued(IssuedCert {
                der,
                not_after: UnixMillis(not_after.unwrap_or(i64::MAX)),
            }));
        }
        let (since, max) = recent;
        let issued: i64 = tx
            .prepare_cached(
                // Renewals only: the certificate of the enrollment is not one (PROTOCOL.md §1).
                "SELECT COUNT(*) FROM device_certs
                 WHERE device_id = ?1 AND issued_at >= ?2 AND renew_request IS NOT NULL",
            )?
            .query_row(params![device.to_string(), since.0], |r| r.get(0))?;
        if usize::try_from(issued).unwrap_or(usize::MAX) >= max {
            return Ok(Renewal::TooMany);
        }
        tx.execute(
            "INSERT INTO device_certs (cert_sha256, device_id, cert_der, issued_at, not_after, renew_request)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                sha256(&cert.der).as_slice(),
                device.to_string(),
                cert.der,
                now.0,
                cert.not_after.0,
                request.to_string()
            ],
        )?;
        tx.commit()?;
        Ok(Renewal::Issued(cert))
    }

    fn device_by_cert(&self, cert_sha256: &Sha256) -> Result<Option<Device>, StorageError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT d.id, d.account_id, d.revoked_at, m.role, m.removed_at FROM device_certs c
                 JOIN devices d ON d.id = c.device_id
                 LEFT JOIN members m ON m.id = d.member_id
                 WHERE c.cert_sha256 = ?1",
            )?
            .query_row([cert_sha256.0.as_slice()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, Option<i64>>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<i64>>(4)?,
                ))
            })
            .optional()?;
        row.map(|(id, account, revoked, role, removed)| {
            Ok(Device {
                id: parse_id(&id)?,
                account_id: parse_id(&account)?,
                revoked: revoked.is_some() || removed.is_some(),
                role: member_role(role.as_deref())?,
            })
        })
        .transpose()
    }

    fn device(&self, id: DeviceId) -> Result<Option<Device>, StorageError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT d.account_id, d.revoked_at, m.role, m.removed_at FROM devices d
                 LEFT JOIN members m ON m.id = d.member_id WHERE d.id = ?1",
            )?
            .query_row([id.to_string()], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, Option<String>>(2)?,
                    r.get::<_, Option<i64>>(3)?,
                ))
            })
            .optional()?;
        row.map(|(account, revoked, role, removed)| {
            Ok(Device {
                id,
                account_id: parse_id(&account)?,
                revoked: revoked.is_some() || removed.is_some(),
                role: member_role(role.as_deref())?,
            })
        })
        .transpose()
    }

    fn reset_connections(&mut self, now: UnixMillis) -> Result<(), StorageError> {
        self.conn.execute(
            "UPDATE devices SET connected = 0, node = NULL WHERE connected = 1 AND (node IS NULL
             OR node NOT IN (SELECT id FROM nodes WHERE stopped_at IS NULL AND seen_at >= ?1))",
            [now.0.saturating_sub(super::NODE_DEAD_AFTER_MS)],
        )?;
        Ok(())
    }

    fn record_presence(&mut self, node: &str, changes: &[Presence]) -> Result<(), StorageError> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        for change in changes {
            match change {
                Presence::Connected {
                    device,
                    heartbeat_interval_ms,
                    at,
                } => tx.prepare_cached(
                    "UPDATE devices SET connected = 1, node = ?4, last_seen_at = ?2, heartbeat_interval_ms = ?3 WHERE id = ?1",
                )?
                .execute(params![device.to_string(), at.0, heartbeat_interval_ms, node])?,
                Presence::Seen {
                    device,
                    at,
                    rtt_us,
                    vitals_json,
                } => tx.prepare_cached(
                    // A heartbeat means connected, whatever order a reconnect's changes came in.
                    "UPDATE devices SET connected = 1, node = ?5, last_seen_at = ?2, rtt_us = ?3, vitals_json = ?4 WHERE id = ?1",
                )?
                .execute(params![device.to_string(), at.0, rtt_us, vitals_json, node])?,
                Presence::Disconnected { device, at } => tx.prepare_cached(
                    "UPDATE devices SET connected = 0, node = NULL, last_seen_at = ?2 WHERE id = ?1 AND node = ?3",
                )?
                .execute(params![device.to_string(), at.0, node])?,
                Presence::Prewarm {
                    device,
                    prewarm_json,
                } => tx
                    .prepare_cached("UPDATE devices SET prewarm_json = ?2 WHERE id = ?1")?
                    .execute(params![device.to_string(), prewarm_json])?,
            };
        }
        tx.commit()?;
        Ok(())
    }

    /// Revokes a device. Revoking twice is not an error; the first time is kept.
    fn revoke(&mut self, id: DeviceId, now: UnixMillis) -> Result<(), StorageError> {
        let n = self.conn.execute(
            "UPDATE devices SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
            params![id.to_string(), now.0],
        )?;
        if n == 0 {
            return Err(StorageError::NoSuchDevice(id));
        }
        Ok(())
    }

    /// Devices revoked at or after `since`.
    fn revoked_since(&self, since: UnixMillis) -> Result<Vec<DeviceId>, StorageError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM devices WHERE revoked_at >= ?1")?;
        let ids = stmt.query_map([since.0], |r| r.get::<_, String>(0))?;
        ids.map(|id| parse_id(&id?)).collect()
    }

    fn devices(&self) -> Result<Vec<DeviceRow>, StorageError> {
        let mut stmt = self.conn.prepare(
            "SELECT d.id, a.name, d.name, d.revoked_at, d.connected, d.last_seen_at,
                    d.heartbeat_interval_ms, d.rtt_us, d.vitals_json, d.prewarm_json, d.node
             FROM devices d JOIN accounts a ON a.id = d.account_id ORDER BY d.enrolled_at",
        )?;
        let rows = stmt.query_map([], |r| {
            let id: String = r.get(0)?;
            Ok((
                id,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, Option<i64>>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<i64>>(5)?,
                r.get::<_, Option<i64>>(6)?,
                r.get::<_, Option<i64>>(7)?,
                r.get::<_, Option<String>>(8)?,
                r.get::<_, Option<String>>(9)?,
                r.get::<_, Option<String>>(10)?,
            ))
        })?;
        rows.map(|row| {
            let (
                id,
                account,
                name,
                revoked_at,
                connected,
                last_seen_at,
                interval,
                rtt_us,
                vitals_json,
                prewarm_json,
                node,
            ) = row?;
            Ok(DeviceRow {
                id: parse_id(&id)?,
                account,
                name,
                revoked_at: revoked_at.map(UnixMillis),
                connected: connected != 0,
                node,
                last_seen_at: last_seen_at.map(UnixMillis),
                heartbeat_interval_ms: interval,
                rtt_us,
                vitals_json,
                prewarm_json,
            })
        })
        .collect()
    }
}

impl Vouchers for Db {
    fn create_voucher(
        &mut self,
        code: &str,
        amount: MicroUsd,
        now: UnixMillis,
    ) -> Result<(), StorageError> {
        self.conn.execute(
            "INSERT INTO vouchers (code_sha256, amount, created_at) VALUES (?1, ?2, ?3)",
            params![sha256(code.as_bytes()).as_slice(), amount.0, now.0],
        )?;
        Ok(())
    }
}
