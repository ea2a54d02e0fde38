//! The PostgreSQL backend, for a cloud whose database several processes share
//! (`--database postgres://…`; SQLite in the data directory stays the default).
//!
//! The driver is `tokio-postgres` (the maintained native async client) with `deadpool-postgres`
//! as the pool: it keeps this crate on tokio, the runtime it already has, adds no compile-time
//! query checking that would need a database at build time (as `sqlx`'s macros do), and its
//! pipelining sends the ledger's batched writes in one round trip.
//!
//! The storage traits are synchronous (their callers run on the blocking pool or on the ledger
//! writer's thread, as with SQLite), so this backend owns a small runtime of its own that drives
//! the pool's connections; a call blocks its thread on that runtime, never a runtime worker.
//!
//! What is here: the schema and its steps, the ledger's store and its group-commit writer
//! ([`ledger`]), the ledger snapshot `admin ledger verify` reads. The other aggregates
//! (accounts, devices, members, adapters, answers) are still SQLite's alone: the cloud does not
//! yet serve on PostgreSQL.

pub mod ledger;

use std::future::Future;

use synesis_billing::ledger::{Entry, EntryKind, StoreError};
use synesis_proto::{AccountId, MicroUsd, UnixMillis};

use super::StorageError;

/// The schema this build writes (the same numbering as SQLite's: a PostgreSQL database starts
/// at the layout SQLite reached at this version).
pub const SCHEMA_VERSION: i32 = 10;

/// Version 10: the ledger (one hash chain per account), as SQLite's schema 10 lays it out, in
/// PostgreSQL's types (64-bit integers, `bytea`).
const STEP_V10: &str = "
CREATE TABLE ledger_entries (
    account_id    TEXT NOT NULL,
    seq           BIGINT NOT NULL,              -- 0, 1, 2, … with no gaps within the account
    request_id    TEXT NOT NULL,
    kind          SMALLINT NOT NULL,
    model         TEXT NOT NULL,
    device_id     TEXT,
    input_tokens  BIGINT NOT NULL,
    output_tokens BIGINT NOT NULL,
    amount        BIGINT NOT NULL CHECK (amount >= 0),  -- micro-USD
    quota_tokens  BIGINT NOT NULL,
    body          BYTEA NOT NULL,
    at            BIGINT NOT NULL,
    expires_at    BIGINT,
    prev_hash     BYTEA NOT NULL,
    hash          BYTEA NOT NULL,
    PRIMARY KEY (account_id, seq)
);
CREATE INDEX ledger_by_request ON ledger_entries (account_id, request_id);
CREATE INDEX ledger_charges ON ledger_entries (account_id, at, seq) WHERE kind = 3;
CREATE TABLE ledger_totals (
    account_id    TEXT PRIMARY KEY,
    balance       BIGINT NOT NULL,              -- micro-USD
    quota_year    INTEGER,
    quota_month   INTEGER,
    quota_settled BIGINT NOT NULL,
    open_held     BIGINT NOT NULL,              -- micro-USD, the sum of the open holds
    open_quota    BIGINT NOT NULL
);
CREATE TABLE ledger_open_holds (
    account_id    TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    seq           BIGINT NOT NULL,              -- the hold entry, in its account's chain
    amount        BIGINT NOT NULL,
    quota_tokens  BIGINT NOT NULL,
    expires_at    BIGINT,
    PRIMARY KEY (account_id, request_id),
    FOREIGN KEY (account_id, seq) REFERENCES ledger_entries (account_id, seq)
);
CREATE INDEX ledger_open_holds_by_expiry ON ledger_open_holds (account_id, expires_at);
";

/// The steps: the version each brings the database to, and its SQL.
const STEPS: &[(i32, &str)] = &[(10, STEP_V10)];
const _: () = assert!(STEPS[STEPS.len() - 1].0 == SCHEMA_VERSION);

/// Any number, the same in every build: the advisory lock that keeps two processes from
/// migrating one database at once.
const MIGRATION_LOCK: i64 = 0x5359_4e45_5349_5300;

/// A database error as the ledger's rules see it, its kind kept: a serialisation failure, a
/// deadlock or a lock not granted are `Conflict` (nothing written, the same operation may be
/// tried again); a broken rule is `Constraint`; a lost connection `Unavailable`.
pub fn store_error(e: &tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState;
    let text = e.to_string();
    match e.code() {
        Some(c)
            if *c == SqlState::T_R_SERIALIZATION_FAILURE
                || *c == SqlState::T_R_DEADLOCK_DETECTED
                || *c == SqlState::LOCK_NOT_AVAILABLE =>
        {
            StoreError::Conflict(text)
        }
        Some(c) if c.code().starts_with("23") => StoreError::Constraint(text),
        Some(c) if c.code().starts_with("22") || c.code().starts_with("42") => {
            StoreError::Corrupt(text)
        }
        _ => StoreError::Unavailable(text),
    }
}

impl From<tokio_postgres::Error> for StorageError {
    fn from(e: tokio_postgres::Error) -> Self {
        match store_error(&e) {
            StoreError::Conflict(_) => StorageError::Conflict,
            other => StorageError::Corrupt(other.to_string()),
        }
    }
}

/// The runtime every PostgreSQL connection of this process runs on, and a way to wait for it
/// from a thread that is not a runtime worker.
#[derive(Debug, Clone)]
pub(crate) struct Io {
    runtime: std::sync::Arc<IoRuntime>,
}

/// Shut down without waiting when the last handle goes, wherever that is (an async task
/// included, where dropping a runtime the usual way would panic).
#[derive(Debug)]
struct IoRuntime(Option<tokio::runtime::Runtime>);

impl Drop for IoRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

impl Io {
    fn new() -> Result<Io, StorageError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("postgres-io")
            .enable_all()
            .build()
            .map_err(|e| {
                StorageError::Corrupt(format!("cannot start PostgreSQL's runtime: {e}"))
            })?;
        Ok(Io {
            runtime: std::sync::Arc::new(IoRuntime(Some(runtime))),
        })
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Taken only in `drop`.
        self.runtime.0.as_ref().unwrap_or_else(|| unreachable!())
    }

    /// Runs `f` to completion on this runtime; the calling thread waits. Never call it from a
    /// runtime worker (the storage layer's callers are blocking threads).
    pub(crate) fn wait<T>(&self, f: impl Future<Output = T>) -> T {
        self.runtime().block_on(f)
    }
}

/// A PostgreSQL cloud database: a pool of connections and the runtime they run on.
#[derive(Clone)]
pub struct Pg {
    pool: deadpool_postgres::Pool,
    io: Io,
    url: String,
}

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("url", &redacted(&self.url))
            .finish()
    }
}

/// The URL without its password, for messages and logs.
pub fn redacted(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .map(|h| match h {
                    tokio_postgres::config::Host::Tcp(h) => h.clone(),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            format!(
                "postgres://{}@{}/{}",
                c.get_user().unwrap_or(""),
                hosts.join(","),
                c.get_dbname().unwrap_or("")
            )
        }
        Err(_) => "postgres://…".into(),
    }
}

impl Pg {
    /// Connects to the database at `url` (a `postgres://` URL) and brings its schema up to
    /// this build's.
    pub fn open(url: &str) -> Result<Pg, StorageError> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| StorageError::Schema {
            path: redacted(url),
            reason: format!("not a PostgreSQL URL: {e}"),
        })?;
        let io = Io::new()?;
        let manager = deadpool_postgres::Manager::from_config(
            config,
            tokio_postgres::NoTls,
            deadpool_postgres::ManagerConfig {
                recycling_method: deadpool_postgres::RecyclingMethod::Fast,
            },
        );
        let pool = {
            // The pool spawns its connections on the runtime it is built in.
            let _inside = io.runtime().enter();
            deadpool_postgres::Pool::builder(manager)
                .max_size(16)
                .runtime(deadpool_postgres::Runtime::Tokio1)
                .build()
                .map_err(|e| StorageError::Corrupt(format!("cannot make the pool: {e}")))?
        };
        let pg = Pg {
            pool,
            io,
            url: url.to_owned(),
        };
        pg.migrate()?;
        Ok(pg)
    }

    /// The URL it was opened with (the ledger writer opens its own connection there).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A connection from the pool.
    async fn client(&self) -> Result<deadpool_postgres::Object, StorageError> {
        self.pool.get().await.map_err(|e| StorageError::Schema {
            path: redacted(&self.url),
            reason: format!("cannot connect: {e}"),
        })
    }

    fn migrate(&self) -> Result<(), StorageError> {
        let schema_error = |reason: String| StorageError::Schema {
            path: redacted(&self.url),
            reason,
        };
        self.io.wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
                .await?;
            tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
                .await?;
            let version: Option<i32> = tx
                .query_opt("SELECT version FROM schema_version", &[])
                .await?
                .map(|r| r.get(0));
            let version = version.unwrap_or(0);
            if version > SCHEMA_VERSION {
                return Err(schema_error(format!(
                    "schema version {version} is newer than this build's ({SCHEMA_VERSION}); run a newer synesis-cloud"
                )));
            }
            for &(to, step) in STEPS {
                if version < to {
                    tx.batch_execute(step).await?;
                }
            }
            if version == 0 {
                tx.execute("INSERT INTO schema_version (version) VALUES ($1)", &[&SCHEMA_VERSION])
                    .await?;
            } else {
                tx.execute("UPDATE schema_version SET version = $1", &[&SCHEMA_VERSION])
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    /// Reads every entry and every kept state in one snapshot (`REPEATABLE READ`): what
    /// `admin ledger verify` checks.
    pub fn ledger_snapshot(&self) -> Result<super::ledger::LedgerSnapshot, StoreError> {
        self.io.wait(async {
            let mut client = self.client().await.map_err(StoreError::from)?;
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| store_error(&e))?;
            let rows = tx
                .query(
                    &format!("SELECT {COLUMNS} FROM ledger_entries ORDER BY account_id, seq"),
                    &[],
                )
                .await
                .map_err(|e| store_error(&e))?;
            let entries = rows.iter().map(read_entry).collect::<Result<Vec<_>, _>>()?;
            let mut states = std::collections::BTreeMap::new();
            for row in tx
                .query(
                    "SELECT account_id, balance, quota_year, quota_month, quota_settled, open_held, open_quota
                     FROM ledger_totals",
                    &[],
                )
                .await
                .map_err(|e| store_error(&e))?
            {
                let account: AccountId = parse(row.get(0))?;
                let state: &mut synesis_billing::ledger::AccountState =
                    states.entry(account).or_default();
                state.totals = read_totals(&row, 1)?;
            }
            for row in tx
                .query(
                    "SELECT account_id, request_id, amount, quota_tokens, expires_at FROM ledger_open_holds",
                    &[],
                )
                .await
                .map_err(|e| store_error(&e))?
            {
                let account: AccountId = parse(row.get(0))?;
                let hold = read_hold(&row, 1)?;
                states
                    .entry(account)
                    .or_default()
                    .open_holds
                    .insert(hold.request_id, hold);
            }
            tx.commit().await.map_err(|e| store_error(&e))?;
            Ok(super::ledger::LedgerSnapshot { entries, states })
        })
    }
}

/// Makes database `name` on the server at `server_url` (a URL naming any database there, as
/// `postgres://user@host:port/postgres`) and returns the URL of the new one.
pub fn create_database(server_url: &str, name: &str) -> Result<String, StorageError> {
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(StorageError::Corrupt(format!(
            "{name:?} is not a plain database name"
        )));
    }
    let io = Io::new()?;
    io.wait(async {
        let (client, connection) = tokio_postgres::connect(server_url, tokio_postgres::NoTls)
            .await
            .map_err(|e| StorageError::Schema {
                path: redacted(server_url),
                reason: format!("cannot connect: {e}"),
            })?;
        let driver = tokio::spawn(connection);
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        drop(client);
        let _ = driver.await;
        Ok(with_dbname(server_url, name))
    })
}

/// `url` naming database `name` instead of its own.
fn with_dbname(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let base = match base[scheme_end..].find('/') {
        Some(slash) => &base[..scheme_end + slash],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{name}?{q}"),
        None => format!("{base}/{name}"),
    }
}

/// The entries' columns, in the order [`read_entry`] reads them.
pub(crate) const COLUMNS: &str = "seq, account_id, request_id, kind, model, device_id, input_tokens, output_tokens, amount, quota_tokens, body, at, expires_at, prev_hash, hash";

pub(crate) fn parse<T: std::str::FromStr>(s: &str) -> Result<T, StoreError>
where
    T::Err: std::fmt::Display,
{
    s.parse()
        .map_err(|e: T::Err| StoreError::Corrupt(format!("{s:?}: {e}")))
}

fn u64_of(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("a stored {what} is negative: {v}")))
}

pub(crate) fn i64_of(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v)
        .map_err(|_| StoreError::Constraint(format!("{v} does not fit a stored integer")))
}

fn hash32(v: &[u8]) -> Result<[u8; 32], StoreError> {
    v.try_into()
        .map_err(|_| StoreError::Corrupt("a stored hash is not 32 bytes".into()))
}

/// One row of [`COLUMNS`] as an entry.
pub(crate) fn read_entry(r: &tokio_postgres::Row) -> Result<Entry, StoreError> {
    let seq: i64 = r.get(0);
    let kind: i16 = r.get(3);
    let device: Option<&str> = r.get(5);
    Ok(Entry {
        seq: u64_of(seq, "sequence number")?,
        account: parse(r.get(1))?,
        request_id: parse(r.get(2))?,
        kind: u8::try_from(kind)
            .ok()
            .and_then(EntryKind::from_code)
            .ok_or_else(|| StoreError::Corrupt(format!("entry {seq}: unknown kind {kind}")))?,
        model: r.get(4),
        device: device.map(parse).transpose()?,
        input_tokens: u64_of(r.get(6), "token count")?,
        output_tokens: u64_of(r.get(7), "token count")?,
        amount: MicroUsd(r.get(8)),
        quota_tokens: u64_of(r.get(9), "token count")?,
        body: hash32(r.get(10))?,
        at: UnixMillis(r.get(11)),
        expires_at: r.get::<_, Option<i64>>(12).map(UnixMillis),
        prev_hash: hash32(r.get(13))?,
        hash: hash32(r.get(14))?,
    })
}

/// Totals from `balance, quota_year, quota_month, quota_settled, open_held, open_quota`
/// starting at column `at`.
pub(crate) fn read_totals(
    r: &tokio_postgres::Row,
    at: usize,
) -> Result<synesis_billing::ledger::Totals, StoreError> {
    let year: Option<i32> = r.get(at + 1);
    let month: Option<i32> = r.get(at + 2);
    Ok(synesis_billing::ledger::Totals {
        balance: MicroUsd(r.get(at)),
        quota_period: match (year, month) {
            (Some(year), Some(month)) => Some(synesis_billing::QuotaPeriod {
                year,
                month: u32::try_from(month)
                    .map_err(|_| StoreError::Corrupt(format!("month {month}")))?,
            }),
            _ => None,
        },
        quota_settled: u64_of(r.get(at + 3), "token count")?,
        open_held: MicroUsd(r.get(at + 4)),
        open_quota: u64_of(r.get(at + 5), "token count")?,
    })
}

/// An open hold from `request_id, amount, quota_tokens, expires_at` starting at column `at`.
pub(crate) fn read_hold(
    r: &tokio_postgres::Row,
    at: usize,
) -> Result<synesis_billing::ledger::OpenHold, StoreError> {
    Ok(synesis_billing::ledger::OpenHold {
        request_id: parse(r.get(at))?,
        amount: MicroUsd(r.get(at + 1)),
        quota_tokens: u64_of(r.get(at + 2), "token count")?,
        expires_at: r.get::<_, Option<i64>>(at + 3).map(UnixMillis),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_another_database_and_hides_its_password() {
        assert_eq!(
            with_dbname("postgres://u:pw@127.0.0.1:5432/postgres", "t1"),
            "postgres://u:pw@127.0.0.1:5432/t1"
        );
        assert_eq!(
            with_dbname("postgres://u@h:1/postgres?sslmode=disable", "t2"),
            "postgres://u@h:1/t2?sslmode=disable"
        );
        assert_eq!(with_dbname("postgres://u@h:1", "t3"), "postgres://u@h:1/t3");
        let shown = redacted("postgres://u:secret@127.0.0.1:5432/db");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("127.0.0.1") && shown.contains("db"),
            "{shown}"
        );
    }
}
