//! The cloud's SQLite database (WAL): accounts, setup tokens, devices and their last known
//! state. `serve` and `admin` open the same file from different processes; every change is one
//! transaction, and readers never block the writer (WAL).
//!
//! Timestamps are Unix milliseconds, passed in by the caller (the clock is read at the edges).

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use sha2::Digest;
use synesis_proto::message::Tier;
use synesis_proto::{AccountId, DeviceId, ErrorCode, RequestId, Sha256, UnixMillis};

/// The schema this build writes (`PRAGMA user_version`). 2: entries carry the device and the
/// token split, and accounts' totals and open holds are kept beside them.
const SCHEMA_VERSION: i64 = 2;

/// How long a writer waits for another process's transaction before giving up.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS accounts (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    tier        TEXT NOT NULL CHECK (tier IN ('free', 'managed', 'byok')),
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS setup_tokens (
    id              BLOB PRIMARY KEY,          -- 16 bytes, not secret
    account_id      TEXT NOT NULL REFERENCES accounts(id),
    secret_sha256   BLOB NOT NULL,             -- the secret itself is never stored
    created_at      INTEGER NOT NULL,
    expires_at      INTEGER NOT NULL,
    used_at         INTEGER,
    used_by_request TEXT                       -- the enrollment's request id (idempotency key)
);
CREATE TABLE IF NOT EXISTS devices (
    id                    TEXT PRIMARY KEY,
    account_id            TEXT NOT NULL REFERENCES accounts(id),
    name                  TEXT NOT NULL,
    cert_sha256           BLOB NOT NULL UNIQUE,
    cert_der              BLOB NOT NULL,
    enroll_request        TEXT NOT NULL UNIQUE,
    enrolled_at           INTEGER NOT NULL,
    revoked_at            INTEGER,
    connected             INTEGER NOT NULL DEFAULT 0,
    last_seen_at          INTEGER,
    heartbeat_interval_ms INTEGER,
    rtt_us                INTEGER,
    vitals_json           TEXT
);
CREATE INDEX IF NOT EXISTS devices_revoked ON devices(revoked_at) WHERE revoked_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS ledger_entries (
    seq          INTEGER PRIMARY KEY,          -- 0, 1, 2, … with no gaps (the chain)
    account_id   TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    kind         INTEGER NOT NULL,
    model        TEXT NOT NULL,
    device_id    TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    amount       INTEGER NOT NULL CHECK (amount >= 0),  -- micro-USD
    quota_tokens INTEGER NOT NULL,
    body         BLOB NOT NULL,
    at           INTEGER NOT NULL,
    expires_at   INTEGER,
    prev_hash    BLOB NOT NULL,
    hash         BLOB NOT NULL
);
-- Also serves an account's listing (its prefix): one index less to keep per entry.
CREATE INDEX IF NOT EXISTS ledger_by_request ON ledger_entries(account_id, request_id);
-- An account's charges (settlements, kind 3) by time, for usage pages.
CREATE INDEX IF NOT EXISTS ledger_charges ON ledger_entries(account_id, at) WHERE kind = 3;
-- Kept beside the entries in the same transactions, so no operation reads an account's
-- history; derived from the entries alone (`admin ledger verify` checks they agree).
CREATE TABLE IF NOT EXISTS ledger_totals (
    account_id    TEXT PRIMARY KEY,
    balance       INTEGER NOT NULL,            -- micro-USD
    quota_year    INTEGER,
    quota_month   INTEGER,
    quota_settled INTEGER NOT NULL,
    open_held     INTEGER NOT NULL,            -- micro-USD, the sum of the open holds
    open_quota    INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS ledger_open_holds (
    account_id   TEXT NOT NULL,
    request_id   TEXT NOT NULL,
    seq          INTEGER NOT NULL REFERENCES ledger_entries(seq),  -- the hold entry
    amount       INTEGER NOT NULL,
    quota_tokens INTEGER NOT NULL,
    expires_at   INTEGER,
    PRIMARY KEY (account_id, request_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS ledger_open_holds_by_expiry ON ledger_open_holds(account_id, expires_at);
CREATE TABLE IF NOT EXISTS vouchers (
    code_sha256  BLOB PRIMARY KEY,             -- the code itself is never stored
    amount       INTEGER NOT NULL CHECK (amount > 0),
    created_at   INTEGER NOT NULL,
    redeemed_at  INTEGER,
    redeemed_by  TEXT
);
CREATE INDEX IF NOT EXISTS vouchers_by_request ON vouchers(redeemed_by) WHERE redeemed_by IS NOT NULL;
";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("an account named {0:?} already exists")]
    AccountExists(String),
    #[error("no account named {0:?}")]
    NoSuchAccount(String),
    #[error("no device {0}")]
    NoSuchDevice(DeviceId),
    #[error("the database holds a value this build cannot read: {0}")]
    Corrupt(String),
    #[error("{path}: {reason}")]
    Schema { path: String, reason: String },
}

/// Why an enrollment was refused: each maps to a protocol error code.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("unknown setup token or wrong secret")]
    Invalid,
    #[error("the setup token expired")]
    Expired,
    #[error("the setup token was already used")]
    Used,
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Db(#[from] DbError),
}

impl EnrollError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EnrollError::Invalid => ErrorCode::TOKEN_INVALID,
            EnrollError::Expired => ErrorCode::TOKEN_EXPIRED,
            EnrollError::Used => ErrorCode::TOKEN_USED,
            EnrollError::BadRequest(_) => ErrorCode::INVALID_REQUEST,
            EnrollError::Db(_) => ErrorCode::INTERNAL,
        }
    }
}

impl From<rusqlite::Error> for EnrollError {
    fn from(e: rusqlite::Error) -> Self {
        EnrollError::Db(e.into())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub tier: Tier,
}

/// A device's request to enroll, as the cloud checks it.
#[derive(Debug, Clone, Copy)]
pub struct Enrollment<'a> {
    pub token_id: [u8; 16],
    pub secret: &'a [u8; 32],
    /// The idempotency key: the same request again gets the same device.
    pub request: RequestId,
    pub device_name: &'a str,
    /// The id the device gets if this request creates it.
    pub new_device_id: DeviceId,
}

/// What an enrollment produced (or produced before, for a retried request).
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub device_id: DeviceId,
    pub account_id: AccountId,
    pub account_name: String,
    pub cert_der: Vec<u8>,
}

#[derive(Debug, Clone)]
pub struct Device {
    pub id: DeviceId,
    pub account_id: AccountId,
    pub revoked: bool,
}

/// A device as `admin devices` lists it.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub id: DeviceId,
    pub account: String,
    pub name: String,
    pub revoked_at: Option<UnixMillis>,
    pub connected: bool,
    pub last_seen_at: Option<UnixMillis>,
    pub heartbeat_interval_ms: Option<i64>,
    /// QUIC's smoothed RTT estimate at the last heartbeat, in microseconds.
    pub rtt_us: Option<i64>,
    pub vitals_json: Option<String>,
}

pub fn parse_tier(s: &str) -> Option<Tier> {
    match s {
        "free" => Some(Tier::Free),
        "managed" => Some(Tier::Managed),
        "byok" => Some(Tier::Byok),
        _ => None,
    }
}

fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, DbError> {
    s.parse()
        .map_err(|_| DbError::Corrupt(format!("bad id {s:?}")))
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    sha2::Sha256::digest(bytes).into()
}

/// Compares secrets' hashes without an early exit, so timing tells nothing.
fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A connection with the settings every user of the file shares.
pub(crate) fn connect(path: &Path) -> Result<Connection, DbError> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(conn)
}

fn migrate(conn: &Connection, path: &Path) -> Result<(), DbError> {
    let schema_error = |reason: String| DbError::Schema {
        path: path.display().to_string(),
        reason,
    };
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if version > SCHEMA_VERSION {
        return Err(schema_error(format!(
            "schema version {version} is newer than this build's ({SCHEMA_VERSION}); run a newer synesis-cloud"
        )));
    }
    if version < SCHEMA_VERSION {
        // Before version 2 the ledger's entries had no device or token split, and their hashes
        // cover neither, so they cannot be carried over; an empty ledger is simply remade.
        let has_ledger: bool = conn.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'ledger_entries')",
            [],
            |r| r.get(0),
        )?;
        if has_ledger {
            let n: i64 = conn.query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0))?;
            if n > 0 {
                return Err(schema_error(format!(
                    "its ledger was written by a development build (schema {version}) whose {n} entries this build cannot carry over; keep the file and start from a new data directory"
                )));
            }
            conn.execute_batch("DROP TABLE ledger_entries")?;
        }
    }
    conn.execute_batch(SCHEMA)?;
    conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    Ok(())
}

#[derive(Debug)]
pub struct Db {
    conn: Connection,
}

impl Db {
    /// Opens (or creates) the database and brings its schema up to this build's.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let conn = connect(path)?;
        // Device state (heartbeats) may lose its last moments to a power cut; the ledger may
        // not: `ledger` and the ledger writer commit with synchronous=FULL.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        migrate(&conn, path)?;
        Ok(Db { conn })
    }

    pub fn create_account(
        &mut self,
        id: AccountId,
        name: &str,
        tier: Tier,
        now: UnixMillis,
    ) -> Result<Account, DbError> {
        let inserted = self.conn.execute(
            "INSERT INTO accounts (id, name, tier, created_at) VALUES (?1, ?2, ?3, ?4) ON CONFLICT(name) DO NOTHING",
            params![id.to_string(), name, tier.as_str(), now.0],
        )?;
        if inserted == 0 {
            return Err(DbError::AccountExists(name.to_owned()));
        }
        Ok(Account {
            id,
            name: name.to_owned(),
            tier,
        })
    }

    pub fn account_by_name(&self, name: &str) -> Result<Account, DbError> {
        let row = self
            .conn
            .query_row(
                "SELECT id, tier FROM accounts WHERE name = ?1",
                [name],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
            )
            .optional()?;
        let (id, tier) = row.ok_or_else(|| DbError::NoSuchAccount(name.to_owned()))?;
        let tier = parse_tier(&tier).ok_or_else(|| DbError::Corrupt(format!("tier {tier:?}")))?;
        Ok(Account {
            id: parse_id(&id)?,
            name: name.to_owned(),
            tier,
        })
    }

    pub fn account_by_id(&self, id: AccountId) -> Result<Account, DbError> {
        let (name, tier) = self.conn.query_row(
            "SELECT name, tier FROM accounts WHERE id = ?1",
            [id.to_string()],
            |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)),
        )?;
        let tier = parse_tier(&tier).ok_or_else(|| DbError::Corrupt(format!("tier {tier:?}")))?;
        Ok(Account { id, name, tier })
    }

    pub fn create_token(
        &mut self,
        account: AccountId,
        token_id: [u8; 16],
        secret: &[u8; 32],
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO setup_tokens (id, account_id, secret_sha256, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![token_id.as_slice(), account.to_string(), sha256(secret).as_slice(), now.0, expires_at.0],
        )?;
        Ok(())
    }

    /// Uses a setup token to enroll a device, in one transaction. The request id is the
    /// idempotency key: the same request again returns the same device and certificate.
    /// `sign` makes the device's certificate for its new id.
    pub fn enroll(
        &mut self,
        e: &Enrollment<'_>,
        now: UnixMillis,
        sign: impl FnOnce(DeviceId) -> Result<Vec<u8>, String>,
    ) -> Result<Enrolled, EnrollError> {
        let Enrollment {
            token_id,
            secret,
            request,
            device_name,
            new_device_id,
        } = *e;
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let token = tx
            .query_row(
                "SELECT t.account_id, a.name, t.secret_sha256, t.expires_at, t.used_at, t.used_by_request
                 FROM setup_tokens t JOIN accounts a ON a.id = t.account_id WHERE t.id = ?1",
                [token_id.as_slice()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<i64>>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ))
                },
            )
            .optional()?;
        let Some((account_id, account_name, secret_hash, expires_at, used_at, used_by)) = token
        else {
            return Err(EnrollError::Invalid);
        };
        if !same_hash(&secret_hash, &sha256(secret)) {
            return Err(EnrollError::Invalid);
        }
        let account_id: AccountId = parse_id(&account_id)?;
        if used_at.is_some() {
            // A retry of the enrollment that used the token gets the same answer.
            if used_by.as_deref() == Some(request.to_string().as_str()) {
                let (device, cert) = tx.query_row(
                    "SELECT id, cert_der FROM devices WHERE enroll_request = ?1",
                    [request.to_string()],
                    |r| Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?)),
                )?;
                return Ok(Enrolled {
                    device_id: parse_id(&device)?,
                    account_id,
                    account_name,
                    cert_der: cert,
                });
            }
            return Err(EnrollError::Used);
        }
        if now.0 >= expires_at {
            return Err(EnrollError::Expired);
        }
        let name = device_name.trim();
        if name.is_empty() || name.len() > 255 {
            return Err(EnrollError::BadRequest(
                "the device name must be 1 to 255 bytes".into(),
            ));
        }
        let cert = sign(new_device_id).map_err(EnrollError::BadRequest)?;
        tx.execute(
            "INSERT INTO devices (id, account_id, name, cert_sha256, cert_der, enroll_request, enrolled_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                new_device_id.to_string(),
                account_id.to_string(),
                name,
                sha256(&cert).as_slice(),
                cert,
                request.to_string(),
                now.0
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
            cert_der: cert,
        })
    }

    /// The device a client certificate belongs to.
    pub fn device_by_cert(&self, cert_sha256: &Sha256) -> Result<Option<Device>, DbError> {
        let row = self
            .conn
            .query_row(
                "SELECT id, account_id, revoked_at FROM devices WHERE cert_sha256 = ?1",
                [cert_sha256.0.as_slice()],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<i64>>(2)?,
                    ))
                },
            )
            .optional()?;
        row.map(|(id, account, revoked)| {
            Ok(Device {
                id: parse_id(&id)?,
                account_id: parse_id(&account)?,
                revoked: revoked.is_some(),
            })
        })
        .transpose()
    }

    /// After a restart no connection is live, whatever the last process left behind.
    pub fn reset_connections(&mut self) -> Result<(), DbError> {
        self.conn
            .execute("UPDATE devices SET connected = 0 WHERE connected = 1", [])?;
        Ok(())
    }

    pub fn mark_connected(
        &mut self,
        id: DeviceId,
        heartbeat_interval_ms: u32,
        now: UnixMillis,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE devices SET connected = 1, last_seen_at = ?2, heartbeat_interval_ms = ?3 WHERE id = ?1",
            params![id.to_string(), now.0, heartbeat_interval_ms],
        )?;
        Ok(())
    }

    pub fn record_heartbeat(
        &mut self,
        id: DeviceId,
        now: UnixMillis,
        rtt_us: i64,
        vitals_json: &str,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE devices SET last_seen_at = ?2, rtt_us = ?3, vitals_json = ?4 WHERE id = ?1",
            params![id.to_string(), now.0, rtt_us, vitals_json],
        )?;
        Ok(())
    }

    pub fn mark_disconnected(&mut self, id: DeviceId, now: UnixMillis) -> Result<(), DbError> {
        self.conn.execute(
            "UPDATE devices SET connected = 0, last_seen_at = ?2 WHERE id = ?1",
            params![id.to_string(), now.0],
        )?;
        Ok(())
    }

    /// Revokes a device. Revoking twice is not an error; the first time is kept.
    pub fn revoke(&mut self, id: DeviceId, now: UnixMillis) -> Result<(), DbError> {
        let n = self.conn.execute(
            "UPDATE devices SET revoked_at = COALESCE(revoked_at, ?2) WHERE id = ?1",
            params![id.to_string(), now.0],
        )?;
        if n == 0 {
            return Err(DbError::NoSuchDevice(id));
        }
        Ok(())
    }

    /// Devices revoked at or after `since`.
    pub fn revoked_since(&self, since: UnixMillis) -> Result<Vec<DeviceId>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT id FROM devices WHERE revoked_at >= ?1")?;
        let ids = stmt.query_map([since.0], |r| r.get::<_, String>(0))?;
        ids.map(|id| parse_id(&id?)).collect()
    }

    pub fn set_tier(&mut self, name: &str, tier: Tier) -> Result<(), DbError> {
        let n = self.conn.execute(
            "UPDATE accounts SET tier = ?2 WHERE name = ?1",
            params![name, tier.as_str()],
        )?;
        if n == 0 {
            return Err(DbError::NoSuchAccount(name.to_owned()));
        }
        Ok(())
    }

    pub fn create_voucher(
        &mut self,
        code: &str,
        amount: synesis_proto::MicroUsd,
        now: UnixMillis,
    ) -> Result<(), DbError> {
        self.conn.execute(
            "INSERT INTO vouchers (code_sha256, amount, created_at) VALUES (?1, ?2, ?3)",
            params![sha256(code.as_bytes()).as_slice(), amount.0, now.0],
        )?;
        Ok(())
    }

    /// Runs ledger rules as one transaction: everything `f` appends is committed together, or
    /// nothing is (on any error).
    pub fn ledger<T>(
        &mut self,
        f: impl FnOnce(
            &mut crate::ledger::SqliteLedger<'_>,
        ) -> Result<T, synesis_billing::ledger::LedgerError>,
    ) -> Result<T, synesis_billing::ledger::LedgerError> {
        let store_err = |e: rusqlite::Error| synesis_billing::ledger::StoreError(e.to_string());
        // Money is committed durably (the WAL is synced at each commit); device state is not.
        self.conn
            .pragma_update(None, "synchronous", "FULL")
            .map_err(store_err)?;
        let result = (|| {
            let tx = self
                .conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(store_err)?;
            let result = f(&mut crate::ledger::SqliteLedger::new(&tx))?;
            tx.commit().map_err(store_err)?;
            Ok(result)
        })();
        self.conn
            .pragma_update(None, "synchronous", "NORMAL")
            .map_err(store_err)?;
        result
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    pub fn devices(&self) -> Result<Vec<DeviceRow>, DbError> {
        let mut stmt = self.conn.prepare(
            "SELECT d.id, a.name, d.name, d.revoked_at, d.connected, d.last_seen_at,
                    d.heartbeat_interval_ms, d.rtt_us, d.vitals_json
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
            ) = row?;
            Ok(DeviceRow {
                id: parse_id(&id)?,
                account,
                name,
                revoked_at: revoked_at.map(UnixMillis),
                connected: connected != 0,
                last_seen_at: last_seen_at.map(UnixMillis),
                heartbeat_interval_ms: interval,
                rtt_us,
                vitals_json,
            })
        })
        .collect()
    }
}
