//! The cloud's storage layer: the schema and its stepwise migrations ([`schema`]), the files
//! and connections ([`open_dir`], [`connect`]), one typed error ([`StorageError`]), and the
//! traits the handlers use ([`Accounts`], [`Devices`], [`Vouchers`]; the ledger's is
//! `synesis_billing::ledger::Store`, implemented by the ledger module's `SqliteLedger`).
//!
//! SQLite ([`Db`]) is the one backend today. A PostgreSQL backend implements the same traits;
//! handlers and the ledger rules do not change (ARCHITECTURE.md, "Storage").
//!
//! Imports flow one way: `ledger` uses `storage`, never the reverse.

use std::path::{Path, PathBuf};

use synesis_proto::message::{Role, Tier};
use synesis_proto::{AccountId, DeviceId, ErrorCode, MicroUsd, RequestId, Sha256, UnixMillis};

pub mod adapters;
pub mod answers;
pub mod ledger;
pub mod members;
pub mod postgres;
mod registry;
pub mod schema;
mod sqlite;
pub mod unit;

pub use sqlite::{Db, WriteLock, connect};
pub use unit::{AdapterChanges, AdapterStore, AnswerStore, MemberChanges, MemberStore, Unit};

/// The database file in the data directory.
pub const DB_FILE: &str = "cloud.db";

/// How long a writer waits for another process's transaction before giving up.
pub const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Another writer held the database past [`BUSY_TIMEOUT`], or a serialisation conflict
    /// (PostgreSQL): nothing was written, and the same operation may be tried again.
    #[error("the database is busy; try again")]
    Conflict,
    #[error("database: {0}")]
    Backend(rusqlite::Error),
    #[error("an account named {0:?} already exists")]
    AccountExists(String),
    #[error("no account named {0:?}")]
    NoSuchAccount(String),
    #[error("no device {0}")]
    NoSuchDevice(DeviceId),
    #[error("no member named {0:?} in this account")]
    NoSuchMember(String),
    #[error("the database holds a value this build cannot read: {0}")]
    Corrupt(String),
    /// PostgreSQL answered with an error (the server's words, after the SQLSTATE).
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// What was asked cannot be done to this database, for the reason given.
    #[error("{0}")]
    Refused(String),
    #[error("{path}: {reason}")]
    Schema { path: String, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl StorageError {
    /// Whether trying the same operation again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, StorageError::Conflict)
    }
}

impl From<rusqlite::Error> for StorageError {
    fn from(e: rusqlite::Error) -> Self {
        match e.sqlite_error_code() {
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
                StorageError::Conflict
            }
            _ => StorageError::Backend(e),
        }
    }
}

/// A database error as the ledger's rules see it: busy is a retryable conflict, a constraint a
/// refusal, the disk or the connection unavailable, anything else corrupt data.
pub fn store_error(e: rusqlite::Error) -> synesis_billing::ledger::StoreError {
    use rusqlite::ErrorCode as C;
    use synesis_billing::ledger::StoreError as S;
    let words = e.to_string();
    match e.sqlite_error_code() {
        Some(C::DatabaseBusy | C::DatabaseLocked) => S::Conflict(words),
        Some(C::ConstraintViolation) => S::Constraint(words),
        Some(
            C::DiskFull
            | C::SystemIoFailure
            | C::CannotOpen
            | C::ReadOnly
            | C::PermissionDenied
            | C::OutOfMemory,
        ) => S::Unavailable(words),
        _ => S::Corrupt(words),
    }
}

/// A storage error inside a ledger operation: its kind kept, so the retry signal survives.
impl From<StorageError> for synesis_billing::ledger::StoreError {
    fn from(e: StorageError) -> Self {
        use synesis_billing::ledger::StoreError as S;
        match e {
            StorageError::Conflict => S::Conflict(e.to_string()),
            StorageError::Backend(db) => store_error(db),
            StorageError::Io { .. } | StorageError::Postgres(_) => S::Unavailable(e.to_string()),
            StorageError::Corrupt(_) | StorageError::Schema { .. } => S::Corrupt(e.to_string()),
            StorageError::Refused(_) => S::Constraint(e.to_string()),
            StorageError::AccountExists(_)
            | StorageError::NoSuchAccount(_)
            | StorageError::NoSuchDevice(_)
            | StorageError::NoSuchMember(_) => S::Constraint(e.to_string()),
        }
    }
}

/// Why an enrollment was refused: each maps to a protocol error code. The messages are what an
/// unauthenticated peer reads: plain words, never database text.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("unknown setup token or wrong secret")]
    Invalid,
    #[error("the setup token expired")]
    Expired,
    #[error("the setup token was already used, or withdrawn")]
    Used,
    #[error("this request id was already used by another enrollment")]
    RequestReused,
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl EnrollError {
    pub fn code(&self) -> ErrorCode {
        match self {
            EnrollError::Invalid => ErrorCode::TOKEN_INVALID,
            EnrollError::Expired => ErrorCode::TOKEN_EXPIRED,
            EnrollError::Used => ErrorCode::TOKEN_USED,
            EnrollError::RequestReused => ErrorCode::IDEMPOTENCY_CONFLICT,
            EnrollError::BadRequest(_) => ErrorCode::INVALID_REQUEST,
            EnrollError::Storage(StorageError::Conflict) => ErrorCode::UNAVAILABLE,
            EnrollError::Storage(_) => ErrorCode::INTERNAL,
        }
    }

    /// What the peer is told: internal failures say only that they happened.
    pub fn public_message(&self) -> String {
        match self {
            EnrollError::Storage(StorageError::Conflict) => "the cloud is busy; try again".into(),
            EnrollError::Storage(_) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

impl From<rusqlite::Error> for EnrollError {
    fn from(e: rusqlite::Error) -> Self {
        EnrollError::Storage(e.into())
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

/// A certificate the cloud signed for a device, as stored.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub der: Vec<u8>,
    pub not_after: UnixMillis,
}

/// What a certificate renewal came to.
#[derive(Debug, Clone)]
pub enum Renewal {
    Issued(IssuedCert),
    /// The device is unknown or revoked.
    Revoked,
    /// The device had as many certificates issued lately as it may.
    TooMany,
}

#[derive(Debug, Clone)]
pub struct Device {
    pub id: DeviceId,
    pub account_id: AccountId,
    /// Revoked, or its member was removed from the account.
    pub revoked: bool,
    /// The role of the member it belongs to: what it may do in the account.
    pub role: Role,
}

/// A device as `admin devices` lists it.
#[derive(Debug, Clone)]
pub struct DeviceRow {
    pub id: DeviceId,
    pub account: String,
    pub name: String,
    pub revoked_at: Option<UnixMillis>,
    pub connected: bool,
    /// The node it is connected to (its id), while connected.
    pub node: Option<String>,
    pub last_seen_at: Option<UnixMillis>,
    pub heartbeat_interval_ms: Option<i64>,
    /// QUIC's smoothed RTT estimate at the last heartbeat, in microseconds.
    pub rtt_us: Option<i64>,
    pub vitals_json: Option<String>,
    /// The last pre-warm signal (JSON).
    pub prewarm_json: Option<String>,
}

/// What the cloud learned of a device's presence; written in batches, in order, never one
/// heartbeat at a time.
#[derive(Debug, Clone)]
pub enum Presence {
    Connected {
        device: DeviceId,
        heartbeat_interval_ms: u32,
        at: UnixMillis,
    },
    /// A heartbeat: when, the RTT QUIC measured, and the vitals it carried (JSON).
    Seen {
        device: DeviceId,
        at: UnixMillis,
        rtt_us: i64,
        vitals_json: String,
    },
    Disconnected {
        device: DeviceId,
        at: UnixMillis,
    },
    /// A pre-warm signal (JSON: model, reason, at).
    Prewarm {
        device: DeviceId,
        prewarm_json: String,
    },
}

impl Presence {
    pub fn device(&self) -> DeviceId {
        match self {
            Presence::Connected { device, .. }
            | Presence::Seen { device, .. }
            | Presence::Disconnected { device, .. }
            | Presence::Prewarm { device, .. } => *device,
        }
    }
}

pub trait Accounts {
    fn create_account(
        &mut self,
        id: AccountId,
        name: &str,
        tier: Tier,
        now: UnixMillis,
    ) -> Result<Account, StorageError>;
    fn account_by_name(&self, name: &str) -> Result<Account, StorageError>;
    fn account_by_id(&self, id: AccountId) -> Result<Account, StorageError>;
    fn set_tier(&mut self, name: &str, tier: Tier) -> Result<(), StorageError>;
}

pub trait Devices {
    /// Records a setup token for a device of the member named `member` (`None`: whoever owns
    /// the account now). The member is bound when the token is issued, never when it is used:
    /// a token outlives no change of its member (`members::end_tokens_of`).
    fn create_token(
        &mut self,
        account: AccountId,
        token_id: [u8; 16],
        secret: &[u8; 32],
        member: Option<&str>,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(), StorageError>;
    /// Uses a setup token to enroll a device, durably, in one transaction. The token is checked
    /// before the write lock is taken; the request id is the idempotency key.
    fn enroll(
        &mut self,
        e: &Enrollment<'_>,
        now: UnixMillis,
        sign: &mut dyn FnMut(DeviceId) -> Result<IssuedCert, String>,
    ) -> Result<Enrolled, EnrollError>;
    /// Records `cert`, newly signed for `device` (same id), keyed by `request`, unless the
    /// device was issued `recent.1` certificates since `recent.0` already. The certificate of
    /// that request: `cert`, or the one an earlier try of the same request stored.
    fn renew_cert(
        &mut self,
        device: DeviceId,
        request: RequestId,
        now: UnixMillis,
        cert: IssuedCert,
        recent: (UnixMillis, usize),
    ) -> Result<Renewal, StorageError>;
    /// The device a client certificate belongs to (any certificate the cloud signed for it).
    fn device_by_cert(&self, cert_sha256: &Sha256) -> Result<Option<Device>, StorageError>;
    fn device(&self, id: DeviceId) -> Result<Option<Device>, StorageError>;
    /// Marks offline the devices left connected to no serving node (none after a crash of
    /// the only node; with several, those of nodes that stopped or died).
    fn reset_connections(&mut self, now: UnixMillis) -> Result<(), StorageError>;
    /// Applies presence changes seen by `node` in order, in one transaction. A device that
    /// left `node` is marked offline only while `node` is still the one it is connected to:
    /// one that moved on to another node stays online.
    fn record_presence(&mut self, node: &str, changes: &[Presence]) -> Result<(), StorageError>;
    fn revoke(&mut self, id: DeviceId, now: UnixMillis) -> Result<(), StorageError>;
    fn revoked_since(&self, since: UnixMillis) -> Result<Vec<DeviceId>, StorageError>;
    fn devices(&self) -> Result<Vec<DeviceRow>, StorageError>;
}

pub trait Vouchers {
    fn create_voucher(
        &mut self,
        code: &str,
        amount: MicroUsd,
        now: UnixMillis,
    ) -> Result<(), StorageError>;
}

/// What a unit reads and writes: members, adapters, stored answers.
pub trait Reads: MemberStore + AdapterStore + AnswerStore {}

impl<T: MemberStore + AdapterStore + AnswerStore> Reads for T {}

/// A cloud database on either backend, as the server's handlers use it: every change that is a
/// transaction of its own, the usage reads, and [`Backend::unit`] for the rest. SQLite's [`Db`]
/// is one connection; PostgreSQL's [`postgres::Pg`] a pool.
/// One node of the cloud as it recorded itself.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NodeRow {
    pub id: String,
    pub addr: String,
    pub started_at: UnixMillis,
    pub seen_at: UnixMillis,
    pub stopped_at: Option<UnixMillis>,
    /// When the other nodes released what it died holding (its requests' holds, its devices).
    pub swept_at: Option<UnixMillis>,
}

/// How long after its last heartbeat a node that did not stop is taken for dead.
pub const NODE_DEAD_AFTER_MS: i64 = 10_000;

impl NodeRow {
    /// `serving`, `stopped`, or `dead` (no heartbeat for [`NODE_DEAD_AFTER_MS`]) at `now`.
    pub fn state(&self, now: UnixMillis) -> &'static str {
        if self.stopped_at.is_some() {
            "stopped"
        } else if self.dead_at(now) {
            "dead"
        } else {
            "serving"
        }
    }

    /// Whether it serves at `now`: a heartbeat within [`NODE_DEAD_AFTER_MS`], and no stop.
    pub fn serving(&self, now: UnixMillis) -> bool {
        self.stopped_at.is_none() && !self.dead_at(now)
    }

    fn dead_at(&self, now: UnixMillis) -> bool {
        now.0.saturating_sub(self.seen_at.0) > NODE_DEAD_AFTER_MS
    }
}

/// The cloud's nodes, each recording itself (a heartbeat) while it serves.
pub trait Nodes {
    /// Records that node `id`, reached at `addr` and started at `started_at`, is serving at
    /// `now`.
    fn node_seen(
        &mut self,
        id: &str,
        addr: &str,
        started_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<(), StorageError>;
    /// Records that node `id` stopped cleanly.
    fn node_stopped(&mut self, id: &str, now: UnixMillis) -> Result<(), StorageError>;
    /// Every node that ever recorded itself, oldest first.
    fn nodes(&self) -> Result<Vec<NodeRow>, StorageError>;
    /// The requests node `id` took on whose runs are not forgotten yet (their holds may be
    /// open or closed: the ledger says which).
    fn runs_of(&self, id: &str) -> Result<Vec<(AccountId, RequestId)>, StorageError>;
    /// Node `id` is gone: the devices still shown connected to it are offline.
    fn node_gone(&mut self, id: &str) -> Result<(), StorageError>;
    /// What node `id` died holding was released: its runs are forgotten, and it is not swept
    /// again.
    fn node_swept(&mut self, id: &str, now: UnixMillis) -> Result<(), StorageError>;
    /// Forgets node `id`'s runs whose holds are closed; how many.
    fn prune_runs(&mut self, id: &str) -> Result<usize, StorageError>;
}

pub trait Backend:
    Accounts
    + Devices
    + Nodes
    + Vouchers
    + MemberChanges
    + AdapterChanges
    + ledger::LedgerReads
    + Send
    + std::fmt::Debug
{
    /// Reads and writes through the repository traits (members, adapters, answers).
    fn unit(&self) -> Box<dyn Reads + '_>;
    /// Every ledger entry and the kept states, from one snapshot (`admin ledger verify`).
    fn ledger_snapshot(
        &self,
    ) -> Result<ledger::LedgerSnapshot, synesis_billing::ledger::StoreError>;
    /// Whether the database answers and its schema is the one this build writes (a node's
    /// readiness: another node may have migrated it further).
    fn schema_current(&self) -> Result<bool, StorageError>;
}

impl Backend for Db {
    fn unit(&self) -> Box<dyn Reads + '_> {
        Box::new(Db::unit(self))
    }

    fn ledger_snapshot(
        &self,
    ) -> Result<ledger::LedgerSnapshot, synesis_billing::ledger::StoreError> {
        Db::ledger_snapshot(self)
    }

    fn schema_current(&self) -> Result<bool, StorageError> {
        Ok(self.schema_version()? == schema::SCHEMA_VERSION)
    }
}

impl Backend for postgres::Pg {
    fn unit(&self) -> Box<dyn Reads + '_> {
        Box::new(self.clone())
    }

    fn ledger_snapshot(
        &self,
    ) -> Result<ledger::LedgerSnapshot, synesis_billing::ledger::StoreError> {
        postgres::Pg::ledger_snapshot(self)
    }

    fn schema_current(&self) -> Result<bool, StorageError> {
        Ok(self.schema_version()? == i64::from(postgres::SCHEMA_VERSION))
    }
}

/// Where a cloud keeps its data: SQLite in the data directory (the default), or a PostgreSQL
/// database that several cloud processes may share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    /// `postgres://…` (or `postgresql://…`) names a PostgreSQL database; no URL, the data
    /// directory's SQLite file.
    pub fn new(data_dir: &Path, url: Option<&str>) -> Result<Location, StorageError> {
        match url {
            None => Ok(Location::Sqlite(data_dir.join(DB_FILE))),
            Some(u) if u.starts_with("postgres://") || u.starts_with("postgresql://") => {
                Ok(Location::Postgres(u.to_owned()))
            }
            Some(u) => Err(StorageError::Refused(format!(
                "{}: not a database URL this cloud can use (postgres://USER@HOST:PORT/NAME; \
                 without one, SQLite in the data directory)",
                postgres::redacted(u)
            ))),
        }
    }

    /// A new handle on the database (a connection to SQLite's file, or a pool), its schema
    /// brought up to this build's.
    /// A task that wakes `wake` whenever another process commits a change every node must
    /// act on at once (PostgreSQL's `LISTEN`/`NOTIFY`); `None` for SQLite, which one process
    /// serves.
    pub fn changes(
        &self,
        wake: std::sync::Arc<tokio::sync::Notify>,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        match self {
            Location::Sqlite(_) => None,
            Location::Postgres(url) => Some(postgres::changes::listen(url.clone(), wake)),
        }
    }

    pub fn open(&self) -> Result<Box<dyn Backend>, StorageError> {
        Ok(match self {
            Location::Sqlite(path) => Box::new(Db::open(path)?),
            Location::Postgres(url) => Box::new(postgres::Pg::open(url)?),
        })
    }

    /// The ledger's group-commit writer on this database.
    pub fn ledger_writer(&self) -> Result<ledger::Writer, StorageError> {
        Ok(match self {
            Location::Sqlite(path) => ledger::Writer::Sqlite(ledger::LedgerWriter::open(path)?),
            Location::Postgres(url) => {
                ledger::Writer::Postgres(postgres::ledger::PgLedgerWriter::open(url)?)
            }
        })
    }
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "SQLite {}", path.display()),
            Location::Postgres(url) => write!(f, "PostgreSQL {}", postgres::redacted(url)),
        }
    }
}

pub fn parse_tier(s: &str) -> Option<Tier> {
    match s {
        "free" => Some(Tier::Free),
        "managed" => Some(Tier::Managed),
        "byok" => Some(Tier::Byok),
        _ => None,
    }
}

/// Text a peer supplied (a device name), as an operator's terminal may show it: control
/// characters (escape sequences, bells, line breaks) become spaces; surrounding space is
/// trimmed.
pub fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

/// Compares secrets' hashes without an early exit, so timing tells nothing.
pub(crate) fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The data directory, made private: created 0700 (or narrowed to it), and the database file
/// created 0600 before SQLite opens it (SQLite gives its WAL and shared-memory files the
/// database file's mode).
pub fn open_dir(dir: &Path) -> Result<(), StorageError> {
    let io = |source| StorageError::Io {
        path: dir.to_owned(),
        source,
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let db = dir.join(DB_FILE);
        let file_io = |source| StorageError::Io {
            path: db.clone(),
            source,
        };
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&db)
            .map_err(file_io)?;
        for name in [DB_FILE, "cloud.db-wal", "cloud.db-shm"] {
            let path = dir.join(name);
            if path.exists() {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .map_err(file_io)?;
            }
        }
    }
    #[cfg(not(unix))]
    std::fs::create_dir_all(dir).map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_text_loses_its_control_characters() {
        assert_eq!(printable("a\u{1b}[2Jb\u{7}\u{9b}c\n"), "a [2Jb  c");
        assert_eq!(printable("  laptop  "), "laptop");
    }
}
