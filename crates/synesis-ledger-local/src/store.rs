//! The ledger's file: SQLite (WAL, `synchronous=FULL`), one row per request id.
//!
//! Every write is one transaction. Amounts are INTEGER micro-USD, never floats. The schema's
//! version is `PRAGMA user_version`; a file written by a newer build is refused, not guessed at.
//! The clock is read by the callers (`at`, `now`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OptionalExtension, Row, Transaction, TransactionBehavior, params};
use synesis_billing::MicroUsd;
use synesis_proto::{DeviceId, RequestId, UnixMillis};

use crate::entry::{CloudCharge, Entry, EntryKind, LocalGeneration, cloud_cost_avoided};
use crate::error::LedgerError;
use crate::reconcile::{SyncPlan, SyncReport, reconcile};
use crate::summary::{GroupTotals, Grouping};
use crate::summary::{ModelTotals, Summary};

/// The ledger's file name in the data directory.
pub const LEDGER_FILE: &str = "ledger.db";

/// The schema this build writes and reads (`PRAGMA user_version`).
const SCHEMA_VERSION: i64 = 2;

/// How long a writer waits for another process's transaction (two `synesis ask` at once).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The key of the last sync's time in `meta` (Unix milliseconds).
const META_LAST_SYNC_AT: &str = "last_sync_at";

const SCHEMA_V1: &str = "
CREATE TABLE entries (
    request_id     TEXT PRIMARY KEY,           -- UUID v7, hyphenated; one row per request
    kind           TEXT NOT NULL CHECK (kind IN ('local', 'cloud')),
    model          TEXT NOT NULL,
    device_id      TEXT,                       -- NULL: not enrolled (local) or not said (cloud)
    input_tokens   INTEGER NOT NULL CHECK (input_tokens >= 0),
    output_tokens  INTEGER NOT NULL CHECK (output_tokens >= 0),
    micro_usd      INTEGER NOT NULL,           -- local: cloud cost avoided; cloud: the charge
    at             INTEGER NOT NULL            -- Unix milliseconds, UTC
);
CREATE INDEX entries_by_at ON entries(at);
CREATE TABLE meta (
    key    TEXT PRIMARY KEY,
    value  NOT NULL
);
";

/// Version 2: why `synesis ask` answered where it did (the local-first policy's first reason).
const STEP_V2: &str = "
ALTER TABLE entries ADD COLUMN route_reason TEXT;   -- NULL: not routed by the policy
";

/// The columns of an [`Entry`], in the order [`entry_from_row`] reads them.
const ENTRY_COLUMNS: &str =
    "request_id, kind, model, device_id, input_tokens, output_tokens, micro_usd, at";

/// Maps SQLite's errors for `path`: "not a database" and "corrupt" become [`NotALedger`].
///
/// [`NotALedger`]: LedgerError::NotALedger
fn sql_error(path: &Path) -> impl Fn(rusqlite::Error) -> LedgerError + '_ {
    move |error| match error.sqlite_error_code() {
        Some(rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt) => {
            LedgerError::NotALedger {
                path: path.to_owned(),
            }
        }
        _ => LedgerError::Sqlite {
            path: path.to_owned(),
            error,
        },
    }
}

fn to_u64(v: i64, path: &Path, what: &str) -> Result<u64, LedgerError> {
    u64::try_from(v).map_err(|_| LedgerError::Corrupt {
        path: path.to_owned(),
        what: format!("{what} {v}"),
    })
}

fn parse_id<T: std::str::FromStr>(s: &str, path: &Path) -> Result<T, LedgerError> {
    s.parse().map_err(|_| LedgerError::Corrupt {
        path: path.to_owned(),
        what: format!("id {s:?}"),
    })
}

fn parse_kind(s: &str, path: &Path) -> Result<EntryKind, LedgerError> {
    EntryKind::parse(s).ok_or_else(|| LedgerError::Corrupt {
        path: path.to_owned(),
        what: format!("kind {s:?}"),
    })
}

/// One row of `entries` as SQLite gives it, before its values are checked.
type RawEntry = (String, String, String, Option<String>, i64, i64, i64, i64);

fn raw_entry(r: &Row<'_>) -> rusqlite::Result<RawEntry> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
    ))
}

fn entry_from_row(raw: RawEntry, path: &Path) -> Result<Entry, LedgerError> {
    let (id, kind, model, device_id, input, output, micro, at) = raw;
    Ok(Entry {
        request_id: parse_id(&id, path)?,
        kind: parse_kind(&kind, path)?,
        model,
        device_id: device_id.map(|d| parse_id(&d, path)).transpose()?,
        input_tokens: to_u64(input, path, "input tokens")?,
        output_tokens: to_u64(output, path, "output tokens")?,
        micro_usd: MicroUsd(micro),
        at: UnixMillis(at),
    })
}

/// The local ledger, open.
#[derive(Debug)]
pub struct LocalLedger {
    conn: Connection,
    path: PathBuf,
}

impl LocalLedger {
    /// Opens (creating the file, its directory and the schema when missing) the ledger at `path`.
    /// What it creates is its owner's alone (the directory 0700, the file 0600, and so SQLite's
    /// `-wal` and `-shm` beside it, which take the file's mode): it lists every request, model
    /// and cost.
    pub fn open(path: &Path) -> Result<LocalLedger, LedgerError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder
                .create(dir)
                .map_err(|error| LedgerError::CreateDir {
                    path: dir.to_owned(),
                    error,
                })?;
        }
        // Made here rather than by SQLite, which would use the umask's mode (0644, usually).
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        options
            .open(path)
            .map_err(|error| LedgerError::CreateFile {
                path: path.to_owned(),
                error,
            })?;
        let err = sql_error(path);
        let conn = Connection::open(path).map_err(&err)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(&err)?;
        // The first read of the file: a file that is not SQLite fails here.
        let found = user_version(&conn).map_err(&err)?;
        if found > SCHEMA_VERSION {
            return Err(newer(path, found));
        }
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(&err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(&err)?;
        let mut ledger = LocalLedger {
            conn,
            path: path.to_owned(),
        };
        if found < SCHEMA_VERSION {
            ledger.migrate()?;
        }
        Ok(ledger)
    }

    /// Brings the schema to [`SCHEMA_VERSION`], in one transaction that re-reads the version
    /// (another process may have done it meanwhile).
    fn migrate(&mut self) -> Result<(), LedgerError> {
        let err = sql_error(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let found = user_version(&tx).map_err(&err)?;
        if found > SCHEMA_VERSION {
            return Err(newer(&self.path, found));
        }
        if found < 1 {
            // Version 0 is a fresh file; any table in it means someone else's database.
            let tables: i64 = tx
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                    [],
                    |r| r.get(0),
                )
                .map_err(&err)?;
            if tables > 0 {
                return Err(LedgerError::NotALedger {
                    path: self.path.clone(),
                });
            }
            tx.execute_batch(SCHEMA_V1).map_err(&err)?;
            tx.pragma_update(None, "user_version", 1).map_err(&err)?;
        }
        if found < 2 {
            tx.execute_batch(STEP_V2).map_err(&err)?;
            tx.pragma_update(None, "user_version", 2).map_err(&err)?;
        }
        // Later versions: `if found < 3 { … }` here, each step in this same transaction.
        tx.commit().map_err(&err)
    }

    /// Records one finished on-device generation, with the cloud cost it avoided (returned).
    pub fn record_local(&mut self, generation: &LocalGeneration) -> Result<MicroUsd, LedgerError> {
        let avoided = cloud_cost_avoided(generation.input_tokens, generation.output_tokens)?;
        let err = sql_error(&self.path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let inserted = tx
            .execute(
                "INSERT INTO entries (request_id, kind, model, device_id, input_tokens, \
                 output_tokens, micro_usd, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) \
                 ON CONFLICT(request_id) DO NOTHING",
                params![
                    generation.request_id.to_string(),
                    EntryKind::Local.as_str(),
                    generation.model,
                    generation.device_id.map(|d| d.to_string()),
                    generation.input_tokens,
                    generation.output_tokens,
                    avoided.0,
                    generation.at.0,
                ],
            )
            .map_err(&err)?;
        if inserted == 0 {
            return Err(LedgerError::Duplicate(generation.request_id));
        }
        tx.commit().map_err(&err)?;
        Ok(avoided)
    }

    /// Makes the cloud-kind rows agree with the cloud's list, in one transaction: reads what
    /// [`reconcile`] needs, applies its plan (adds, overwrites with the cloud's values; nothing
    /// is deleted) and records `now` as the last sync time. The same list again changes nothing.
    pub fn reconcile(
        &mut self,
        cloud: &[CloudCharge],
        now: UnixMillis,
    ) -> Result<SyncReport, LedgerError> {
        let plan = self.apply(cloud, Some(now))?;
        Ok(plan.into_report(now))
    }

    /// Records one cloud charge as the device learned it (an escalation's `EscalationDone`), by
    /// the same rules as [`reconcile`](Self::reconcile) for a list of one: added when new,
    /// overwritten when the cloud's values differ, unchanged when the same. The last sync time
    /// is not touched (this is not a sync). A local answer under the same request id is a
    /// conflict, refused.
    pub fn record_cloud(&mut self, charge: &CloudCharge) -> Result<(), LedgerError> {
        let plan = self.apply(std::slice::from_ref(charge), None)?;
        match plan.conflicts.first() {
            Some(conflict) => Err(LedgerError::Duplicate(conflict.request_id)),
            None => Ok(()),
        }
    }

    /// In one transaction: the plan [`reconcile`] makes for `cloud`, applied (conflicts are
    /// left alone), and `synced_at` recorded as the last sync time when given.
    fn apply(
        &mut self,
        cloud: &[CloudCharge],
        synced_at: Option<UnixMillis>,
    ) -> Result<SyncPlan, LedgerError> {
        let path = self.path.clone();
        let err = sql_error(&path);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(&err)?;
        let held = held_for(&tx, &path, cloud)?;
        let plan = reconcile(&held, cloud);
        for charge in &plan.added {
            write_cloud(&tx, charge, false).map_err(&err)?;
        }
        for change in &plan.changed {
            write_cloud(&tx, &change.cloud, true).map_err(&err)?;
        }
        if let Some(now) = synced_at {
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) \
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![META_LAST_SYNC_AT, now.0],
            )
            .map_err(&err)?;
        }
        tx.commit().map_err(&err)?;
        Ok(plan)
    }

    /// Records why an answer went where it did (the local-first policy's reason, e.g.
    /// `low_confidence`), on the entry of `request_id` once it is recorded.
    pub fn note_route(&mut self, request_id: RequestId, reason: &str) -> Result<(), LedgerError> {
        let err = sql_error(&self.path);
        self.conn
            .execute(
                "UPDATE entries SET route_reason = ?2 WHERE request_id = ?1",
                params![request_id.to_string(), reason],
            )
            .map_err(&err)?;
        Ok(())
    }

    /// Answers and charges at or after `since`, per UTC day or per model, and per route reason;
    /// each group split by kind (local answers, cloud charges).
    pub fn groups(
        &self,
        since: Option<UnixMillis>,
        by: Grouping,
    ) -> Result<Vec<GroupTotals>, LedgerError> {
        let key = match by {
            Grouping::Model => "model",
            Grouping::Day => "strftime('%Y-%m-%d', at / 1000, 'unixepoch')",
            Grouping::Route => "coalesce(route_reason, '-')",
        };
        let rows = self.aggregate(key, "k, kind DESC", since)?;
        Ok(rows
            .into_iter()
            .map(|(key, g)| GroupTotals {
                key,
                kind: g.kind,
                count: g.generations,
                input_tokens: g.input_tokens,
                output_tokens: g.output_tokens,
                micro_usd: g.micro_usd,
            })
            .collect())
    }

    /// The devices whose cloud charges this ledger mirrors: this machine's identities, the
    /// current one and any it had before a new `cloud login`.
    pub fn cloud_devices(&self) -> Result<HashSet<DeviceId>, LedgerError> {
        let err = sql_error(&self.path);
        let mut stmt = self
            .conn
            .prepare(
                "SELECT DISTINCT device_id FROM entries WHERE kind = 'cloud' AND device_id IS NOT NULL",
            )
            .map_err(&err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(&err)?;
        rows.map(|id| parse_id(&id.map_err(&err)?, &self.path))
            .collect()
    }

    /// The rows at or after `since`, totalled per `key` (an SQL expression) and kind, ordered
    /// by `order` (over `k`, the key, and `kind`); each group's totals with its key apart.
    fn aggregate(
        &self,
        key: &str,
        order: &str,
        since: Option<UnixMillis>,
    ) -> Result<Vec<(String, ModelTotals)>, LedgerError> {
        let path = &self.path;
        let err = sql_error(path);
        let sql = format!(
            "SELECT {key} AS k, kind, count(*), sum(input_tokens), sum(output_tokens), \
             sum(micro_usd) FROM entries WHERE at >= ?1 GROUP BY k, kind ORDER BY {order}"
        );
        let mut stmt = self.conn.prepare(&sql).map_err(&err)?;
        let rows = stmt
            .query_map([since.map_or(i64::MIN, |t| t.0)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, i64>(4)?,
                    r.get::<_, i64>(5)?,
                ))
            })
            .map_err(&err)?;
        let mut groups = Vec::new();
        for row in rows {
            let (key, kind, count, input, output, micro) = row.map_err(&err)?;
            groups.push((
                key,
                ModelTotals {
                    model: String::new(),
                    kind: parse_kind(&kind, path)?,
                    generations: to_u64(count, path, "count")?,
                    input_tokens: to_u64(input, path, "input tokens")?,
                    output_tokens: to_u64(output, path, "output tokens")?,
                    micro_usd: MicroUsd(micro),
                },
            ));
        }
        Ok(groups)
    }

    /// Totals of the rows at or after `since` (all rows with `None`), and the last sync time.
    pub fn summary(&self, since: Option<UnixMillis>) -> Result<Summary, LedgerError> {
        let path = &self.path;
        let err = sql_error(path);
        let mut summary = Summary {
            last_sync_at: self
                .conn
                .query_row(
                    "SELECT value FROM meta WHERE key = ?1",
                    [META_LAST_SYNC_AT],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map_err(&err)?
                .map(UnixMillis),
            ..Summary::default()
        };
        for (model, totals) in self.aggregate("model", "kind DESC, k", since)? {
            summary.add(ModelTotals { model, ..totals })?;
        }
        Ok(summary)
    }
}

fn user_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.pragma_query_value(None, "user_version", |r| r.get(0))
}

fn newer(path: &Path, found: i64) -> LedgerError {
    LedgerError::NewerSchema {
        path: path.to_owned(),
        found,
        supported: SCHEMA_VERSION,
    }
}

/// What [`reconcile`] needs of the rows: every cloud-kind row, and the local row of any request
/// id the cloud's list names.
fn held_for(
    tx: &Transaction<'_>,
    path: &Path,
    cloud: &[CloudCharge],
) -> Result<Vec<Entry>, LedgerError> {
    let err = sql_error(path);
    let mut held = Vec::new();
    let mut stmt = tx
        .prepare(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries WHERE kind = 'cloud'"
        ))
        .map_err(&err)?;
    for raw in stmt.query_map([], raw_entry).map_err(&err)? {
        held.push(entry_from_row(raw.map_err(&err)?, path)?);
    }
    let mut stmt = tx
        .prepare(&format!(
            "SELECT {ENTRY_COLUMNS} FROM entries WHERE request_id = ?1 AND kind = 'local'"
        ))
        .map_err(&err)?;
    let mut looked_up = HashSet::with_capacity(cloud.len());
    for charge in cloud {
        if !looked_up.insert(charge.request_id) {
            continue;
        }
        let raw = stmt
            .query_row([charge.request_id.to_string()], raw_entry)
            .optional()
            .map_err(&err)?;
        if let Some(raw) = raw {
            held.push(entry_from_row(raw, path)?);
        }
    }
    Ok(held)
}

/// Inserts a cloud charge, or overwrites the cloud row of its id with it.
fn write_cloud(tx: &Transaction<'_>, c: &CloudCharge, overwrite: bool) -> rusqlite::Result<()> {
    let sql = if overwrite {
        "UPDATE entries SET model = ?3, device_id = ?4, input_tokens = ?5, output_tokens = ?6, \
         micro_usd = ?7, at = ?8 WHERE request_id = ?1 AND kind = ?2"
    } else {
        "INSERT INTO entries (request_id, kind, model, device_id, input_tokens, output_tokens, \
         micro_usd, at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
    };
    let n = tx.execute(
        sql,
        params![
            c.request_id.to_string(),
            EntryKind::Cloud.as_str(),
            c.model,
            c.device_id.map(|d| d.to_string()),
            c.input_tokens,
            c.output_tokens,
            c.total_micro_usd.0,
            c.at.0,
        ],
    )?;
    debug_assert_eq!(n, 1);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::{ConflictReason, SyncCounts};
    use crate::summary::{CloudTotals, LocalTotals};
    use synesis_proto::RequestId;

    fn id(n: u8) -> RequestId {
        RequestId::from_parts(1_700_000_000_000 + u64::from(n), [n; 10])
    }

    fn device() -> DeviceId {
        "0190a0a0-0000-7000-8000-000000000001".parse().unwrap()
    }

    fn local(n: u8, input: u64, output: u64, at: i64) -> LocalGeneration {
        LocalGeneration {
            request_id: id(n),
            model: "demo".into(),
            device_id: None,
            input_tokens: input,
            output_tokens: output,
            at: UnixMillis(at),
        }
    }

    fn charge(n: u8, total: i64) -> CloudCharge {
        CloudCharge {
            request_id: id(n),
            model: "claude-sonnet".into(),
            device_id: Some(device()),
            input_tokens: 100,
            output_tokens: 50,
            total_micro_usd: MicroUsd(total),
            at: UnixMillis(1_000 + i64::from(n)),
        }
    }

    fn open_in(dir: &tempfile::TempDir) -> LocalLedger {
        LocalLedger::open(&dir.path().join("data").join(LEDGER_FILE)).unwrap()
    }

    #[cfg(unix)]
    #[test]
    fn the_ledger_and_its_directory_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = open_in(&dir);
        ledger.record_local(&local(1, 10, 5, 86_400_000)).unwrap();
        let mode = |name: &str| {
            std::fs::metadata(dir.path().join("data").join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(""), 0o700, "the directory");
        assert_eq!(mode(LEDGER_FILE), 0o600);
        let wal = format!("{LEDGER_FILE}-wal");
        assert!(dir.path().join("data").join(&wal).exists(), "WAL mode");
        assert_eq!(mode(&wal), 0o600, "SQLite gives its WAL the file's mode");
    }

    #[test]
    fn answers_keep_their_route_and_total_by_day_model_and_route() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = open_in(&dir);
        ledger.record_local(&local(1, 10, 5, 86_400_000)).unwrap();
        ledger.note_route(id(1), "confident_enough").unwrap();
        ledger
            .record_local(&local(2, 10, 5, 2 * 86_400_000))
            .unwrap();
        ledger.record_cloud(&charge(3, 100)).unwrap();
        ledger.note_route(id(3), "low_confidence").unwrap();
        let keys = |by| {
            ledger
                .groups(None, by)
                .unwrap()
                .into_iter()
                .map(|g| (g.key, g.kind.as_str(), g.count))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            keys(Grouping::Route),
            [
                ("-".to_owned(), "local", 1),
                ("confident_enough".to_owned(), "local", 1),
                ("low_confidence".to_owned(), "cloud", 1)
            ]
        );
        assert_eq!(
            keys(Grouping::Day),
            [
                ("1970-01-01".to_owned(), "cloud", 1),
                ("1970-01-02".to_owned(), "local", 1),
                ("1970-01-03".to_owned(), "local", 1)
            ]
        );
        assert_eq!(
            keys(Grouping::Model),
            [
                ("claude-sonnet".to_owned(), "cloud", 1),
                ("demo".to_owned(), "local", 2)
            ]
        );
    }

    #[test]
    fn a_version_1_ledger_is_upgraded_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA_V1).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO entries VALUES ('01890000-0000-7000-8000-000000000001', 'local', 'm', NULL, 1, 1, 1, 1)",
                [],
            )
            .unwrap();
        }
        let mut ledger = LocalLedger::open(&path).unwrap();
        assert_eq!(user_version(&ledger.conn).unwrap(), SCHEMA_VERSION);
        ledger
            .note_route(
                "01890000-0000-7000-8000-000000000001".parse().unwrap(),
                "over_context",
            )
            .unwrap();
        assert_eq!(
            ledger.summary(None).unwrap().local.generations,
            1,
            "rows kept"
        );
    }

    #[test]
    fn one_cloud_charge_is_recorded_once_overwritten_by_the_cloud_and_never_over_a_local_one() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = open_in(&dir);
        ledger.record_cloud(&charge(1, 100)).unwrap();
        ledger.record_cloud(&charge(1, 100)).unwrap();
        ledger.record_cloud(&charge(1, 90)).unwrap();
        let summary = ledger.summary(None).unwrap();
        assert_eq!(summary.cloud.charges, 1);
        assert_eq!(
            summary.cloud.total_micro_usd,
            MicroUsd(90),
            "the cloud's value wins"
        );
        assert_eq!(summary.last_sync_at, None, "recording is not a sync");
        ledger.record_local(&local(2, 10, 5, 1_000)).unwrap();
        assert!(matches!(
            ledger.record_cloud(&charge(2, 100)),
            Err(LedgerError::Duplicate(_))
        ));
    }

    #[test]
    fn records_local_generations_and_sums_them() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = open_in(&dir);
        let empty = ledger.summary(None).unwrap();
        assert_eq!(empty, Summary::default());

        // Sonnet, Managed: 1,000 in + 250 out = 6,750 µUSD + 3 % = 6,953 (the plan's example).
        let avoided = ledger.record_local(&local(1, 1_000, 250, 10)).unwrap();
        assert_eq!(avoided, MicroUsd(6_953));
        assert_eq!(cloud_cost_avoided(1_000, 250).unwrap(), avoided);
        let mut other = local(2, 10, 5, 20);
        other.model = "llama3".into();
        other.device_id = Some(device());
        let avoided2 = ledger.record_local(&other).unwrap();

        let s = ledger.summary(None).unwrap();
        assert_eq!(
            s.local,
            LocalTotals {
                generations: 2,
                input_tokens: 1_010,
                output_tokens: 255,
                cloud_cost_avoided_micro_usd: MicroUsd(6_953 + avoided2.0),
            }
        );
        assert_eq!(s.cloud, CloudTotals::default());
        assert_eq!(s.last_sync_at, None);
        let models: Vec<_> = s.by_model.iter().map(|m| m.model.as_str()).collect();
        assert_eq!(models, ["demo", "llama3"]);

        // --since: only rows at or after it.
        let later = ledger.summary(Some(UnixMillis(15))).unwrap();
        assert_eq!(later.local.generations, 1);
        assert_eq!(later.local.input_tokens, 10);

        // One row per request id.
        assert!(matches!(
            ledger.record_local(&local(1, 1, 1, 30)),
            Err(LedgerError::Duplicate(_))
        ));
        // And the rows outlive the connection.
        drop(ledger);
        assert_eq!(open_in(&dir).summary(None).unwrap().local.generations, 2);
    }

    #[test]
    fn reconcile_adds_changes_keeps_and_reports() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = open_in(&dir);
        ledger.record_local(&local(9, 10, 10, 5)).unwrap();
        let first = ledger
            .reconcile(
                &[charge(1, 100), charge(2, 200), charge(3, 300)],
                UnixMillis(1),
            )
            .unwrap();
        assert_eq!(first.added, [id(1), id(2), id(3)]);
        assert_eq!(first.counts.added, 3);
        assert!(first.changed.is_empty() && first.missing_in_cloud.is_empty());

        // The cloud now says: 1 as before, 2 at another price, 3 gone, 4 new, and one charge
        // with the id of an on-device generation.
        let mut two = charge(2, 250);
        two.output_tokens = 60;
        let mut clash = charge(9, 1);
        clash.model = "claude-opus".into();
        let report = ledger
            .reconcile(
                &[charge(1, 100), two.clone(), charge(4, 400), clash],
                UnixMillis(2),
            )
            .unwrap();
        assert_eq!(report.added, [id(4)]);
        assert_eq!(report.counts.unchanged, 1);
        assert_eq!(report.changed.len(), 1);
        let change = &report.changed[0];
        assert_eq!(change.request_id, id(2));
        assert_eq!(change.fields, ["output_tokens", "total_micro_usd"]);
        assert_eq!(change.local, charge(2, 200));
        assert_eq!(change.cloud, two);
        assert_eq!(report.missing_in_cloud, [id(3)]);
        assert_eq!(report.conflicts.len(), 1);
        assert_eq!(report.conflicts[0].request_id, id(9));
        assert_eq!(report.conflicts[0].reason, ConflictReason::LocalGeneration);
        assert_eq!(
            report.counts,
            SyncCounts {
                cloud_charges: 4,
                added: 1,
                changed: 1,
                unchanged: 1,
                missing_in_cloud: 1,
                conflicts: 1,
            }
        );
        assert!(!report.in_agreement());

        let s = ledger.summary(None).unwrap();
        // The cloud's values won; 3 was kept; the local row was not overwritten.
        assert_eq!(s.cloud.charges, 4);
        assert_eq!(s.cloud.total_micro_usd, MicroUsd(100 + 250 + 300 + 400));
        assert_eq!(s.local.generations, 1);
        assert_eq!(s.local.input_tokens, 10);
        assert_eq!(s.last_sync_at, Some(UnixMillis(2)));

        // The JSON that `synesis cloud sync --json` prints.
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["counts"]["changed"], 1);
        assert_eq!(json["changed"][0]["cloud"]["total_micro_usd"], 250);
        assert_eq!(json["conflicts"][0]["reason"], "local_generation");
        assert_eq!(json["missing_in_cloud"][0], id(3).to_string());
    }

    #[test]
    fn reconciling_the_same_list_twice_changes_nothing_the_second_time() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = open_in(&dir);
        let list = [charge(1, 100), charge(2, 200)];
        ledger.reconcile(&list, UnixMillis(1)).unwrap();
        let before = ledger.summary(None).unwrap();
        let again = ledger.reconcile(&list, UnixMillis(2)).unwrap();
        assert!(again.in_agreement(), "{again:?}");
        assert_eq!(again.counts.unchanged, 2);
        let after = ledger.summary(None).unwrap();
        assert_eq!(after.cloud, before.cloud);
        assert_eq!(after.last_sync_at, Some(UnixMillis(2)));
    }

    #[test]
    fn a_duplicate_id_in_the_cloud_list_is_a_conflict_not_a_second_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut ledger = open_in(&dir);
        let report = ledger
            .reconcile(&[charge(1, 100), charge(1, 999)], UnixMillis(1))
            .unwrap();
        assert_eq!(report.added, [id(1)]);
        assert_eq!(
            report.conflicts[0].reason,
            ConflictReason::DuplicateInCloudList
        );
        assert_eq!(
            ledger.summary(None).unwrap().cloud.total_micro_usd,
            MicroUsd(100)
        );
    }

    #[test]
    fn a_file_that_is_not_a_ledger_is_a_clear_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        std::fs::write(&path, vec![b'x'; 4096]).unwrap();
        let err = LocalLedger::open(&path).unwrap_err();
        assert!(matches!(err, LedgerError::NotALedger { .. }), "{err:?}");
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("not a Synesis local ledger"), "{text}");

        // Another program's SQLite database is not ours either.
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x INTEGER);")
            .unwrap();
        assert!(matches!(
            LocalLedger::open(&other),
            Err(LedgerError::NotALedger { .. })
        ));
    }

    #[test]
    fn a_ledger_from_a_newer_synesis_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(LEDGER_FILE);
        drop(LocalLedger::open(&path).unwrap());
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
        let err = LocalLedger::open(&path).unwrap_err();
        assert!(
            matches!(err, LedgerError::NewerSchema { found, .. } if found == SCHEMA_VERSION + 1),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("newer"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn the_file_is_in_wal_mode_with_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = open_in(&dir);
        let mode: String = ledger
            .conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        let sync: i64 = ledger
            .conn
            .pragma_query_value(None, "synchronous", |r| r.get(0))
            .unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 2));
        assert_eq!(user_version(&ledger.conn).unwrap(), SCHEMA_VERSION);
    }
}
