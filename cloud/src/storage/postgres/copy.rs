//! Moving a SQLite cloud onto PostgreSQL (`synesis-cloud admin migrate --to postgres://…`).
//!
//! - The source is never written: the copy is read from a snapshot (`VACUUM INTO` a temporary
//!   file, consistent even while a server writes), and that snapshot, not the source, is brought
//!   up to this build's schema.
//! - The target must be empty (every table of the cloud's schema without a row): a copy never
//!   merges into, or overwrites, a database in use.
//! - Every table goes over row for row, parents before children (SQLite's foreign keys say
//!   which), in one transaction: a failure leaves the target as it was.
//! - Then the copy is checked from the target's side: the same rows in every table, every
//!   ledger chain verifies, and every account's kept totals and open holds are the source's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use rusqlite::types::Value;

use super::{Pg, StorageError};

/// What a copy moved and what it checked.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Copied {
    /// Each table, in the order copied, with its rows.
    pub tables: Vec<(String, u64)>,
    /// Ledger entries, and the accounts whose chains verified on the target.
    pub entries: u64,
    pub chains: u64,
    /// Accounts whose balance, holds and quota use are the source's on the target.
    pub accounts_agreeing: u64,
}

/// One column's values for a chunk of rows, typed as the target column is.
enum Column {
    Int(Vec<Option<i64>>),
    Text(Vec<Option<String>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Column {
    fn new(pg_type: &str) -> Result<Column, StorageError> {
        match pg_type {
            "bigint" | "integer" | "smallint" => Ok(Column::Int(Vec::new())),
            "text" => Ok(Column::Text(Vec::new())),
            "bytea" => Ok(Column::Bytes(Vec::new())),
            other => Err(StorageError::Refused(format!(
                "the target has a column of type {other}, which a copy does not carry"
            ))),
        }
    }

    fn cast(&self) -> &'static str {
        match self {
            Column::Int(_) => "bigint[]",
            Column::Text(_) => "text[]",
            Column::Bytes(_) => "bytea[]",
        }
    }

    fn push(&mut self, v: Value, table: &str, column: &str) -> Result<(), StorageError> {
        let wrong = |what: &str| {
            StorageError::Refused(format!(
                "{table}.{column} holds {what}, which its column on the target cannot take"
            ))
        };
        match (self, v) {
            (Column::Int(c), Value::Null) => c.push(None),
            (Column::Text(c), Value::Null) => c.push(None),
            (Column::Bytes(c), Value::Null) => c.push(None),
            (Column::Int(c), Value::Integer(i)) => c.push(Some(i)),
            (Column::Text(c), Value::Text(t)) => c.push(Some(t)),
            (Column::Bytes(c), Value::Blob(b)) => c.push(Some(b)),
            (_, Value::Real(_)) => return Err(wrong("a real number")),
            (_, Value::Integer(_)) => return Err(wrong("an integer")),
            (_, Value::Text(_)) => return Err(wrong("text")),
            (_, Value::Blob(_)) => return Err(wrong("bytes")),
        }
        Ok(())
    }

    fn param(&self) -> &(dyn tokio_postgres::types::ToSql + Sync) {
        match self {
            Column::Int(c) => c,
            Column::Text(c) => c,
            Column::Bytes(c) => c,
        }
    }

    fn clear(&mut self) {
        match self {
            Column::Int(c) => c.clear(),
            Column::Text(c) => c.clear(),
            Column::Bytes(c) => c.clear(),
        }
    }
}

/// A directory of the copy's own under the system's temporary directory, removed with all it
/// holds when the copy ends, however it ends.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Result<Scratch, StorageError> {
        let dir = std::env::temp_dir().join(format!("synesis-migrate-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir(&dir)
            .map_err(|e| StorageError::Corrupt(format!("cannot make {}: {e}", dir.display())))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Rows sent per statement.
const CHUNK: usize = 2_000;

/// The source's tables, parents before the tables whose foreign keys name them.
fn tables_in_copy_order(conn: &rusqlite::Connection) -> Result<Vec<String>, StorageError> {
    let names: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut parents: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for name in &names {
        let refs: BTreeSet<String> = conn
            .prepare(&format!(
                "SELECT \"table\" FROM pragma_foreign_key_list('{name}')"
            ))?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        parents.insert(name.clone(), refs);
    }
    let mut ordered = Vec::new();
    let mut placed = BTreeSet::new();
    while ordered.len() < names.len() {
        let next = names.iter().find(|n| {
            !placed.contains(*n)
                && parents[*n]
                    .iter()
                    .all(|p| placed.contains(p) || p == *n || !parents.contains_key(p))
        });
        let Some(next) = next else {
            return Err(StorageError::Corrupt(
                "the source's foreign keys go round in a circle".into(),
            ));
        };
        placed.insert(next.clone());
        ordered.push(next.clone());
    }
    Ok(ordered)
}

/// Copies the SQLite cloud database at `source` into the empty PostgreSQL database `target`
/// and checks the copy; `progress` hears of each table as it is copied.
pub fn from_sqlite(
    source: &Path,
    target: &Pg,
    mut progress: impl FnMut(&str, u64),
) -> Result<Copied, StorageError> {
    // A snapshot of the source, brought to this build's schema; the source stays as it was.
    let scratch = Scratch::new()?;
    let snapshot = scratch.0.join("cloud.db");
    {
        let reader = rusqlite::Connection::open_with_flags(
            source,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )?;
        reader.execute("VACUUM INTO ?1", [snapshot.to_string_lossy()])?;
    }
    let db = crate::storage::Db::open(&snapshot)?;
    let conn = db.connection();
    let order = tables_in_copy_order(conn)?;

    let copied = target.io().wait(async {
        let mut client = target.client().await?;
        let tx = client.transaction().await?;
        let mut tables = Vec::new();
        for table in &order {
            let columns: Vec<(String, String)> = tx
                .query(
                    "SELECT column_name, data_type FROM information_schema.columns
                     WHERE table_schema = current_schema() AND table_name = $1
                     ORDER BY ordinal_position",
                    &[table],
                )
                .await?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            if columns.is_empty() {
                return Err(StorageError::Refused(format!(
                    "the target has no table {table}: it was made by another build"
                )));
            }
            let occupied: bool = tx
                .query_one(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), &[])
                .await?
                .get(0);
            if occupied {
                return Err(StorageError::Refused(format!(
                    "the target's table {table} has rows: a cloud is copied only into an empty database"
                )));
            }
            let names: Vec<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
            let mut values = columns
                .iter()
                .map(|(_, t)| Column::new(t))
                .collect::<Result<Vec<_>, _>>()?;
            let list = names.join(", ");
            let arrays = values
                .iter()
                .enumerate()
                .map(|(i, c)| format!("${}::{}", i + 1, c.cast()))
                .collect::<Vec<_>>()
                .join(", ");
            let insert = tx
                .prepare(&format!(
                    "INSERT INTO {table} ({list}) OVERRIDING SYSTEM VALUE SELECT * FROM UNNEST({arrays})"
                ))
                .await?;
            let mut stmt = conn.prepare(&format!("SELECT {list} FROM {table}"))?;
            let mut rows = stmt.query([])?;
            let (mut n, mut pending) = (0u64, 0usize);
            loop {
                let row = rows.next()?;
                if let Some(row) = row {
                    for (i, (column, name)) in values.iter_mut().zip(&names).enumerate() {
                        column.push(row.get::<_, Value>(i)?, table, name)?;
                    }
                    pending += 1;
                }
                if pending > 0 && (pending == CHUNK || row.is_none()) {
                    let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
                        values.iter().map(Column::param).collect();
                    tx.execute(&insert, &params).await?;
                    n += pending as u64;
                    pending = 0;
                    values.iter_mut().for_each(Column::clear);
                }
                if row.is_none() {
                    break;
                }
            }
            // A column numbered by the database goes on after the copied numbers.
            for (name, _) in &columns {
                let identity: bool = tx
                    .query_one(
                        "SELECT is_identity = 'YES' FROM information_schema.columns
                         WHERE table_schema = current_schema() AND table_name = $1 AND column_name = $2",
                        &[table, name],
                    )
                    .await?
                    .get(0);
                if identity {
                    tx.execute(
                        &format!(
                            "SELECT setval(pg_get_serial_sequence('{table}', '{name}'), COALESCE(MAX({name}), 0) + 1, false) FROM {table}"
                        ),
                        &[],
                    )
                    .await?;
                }
            }
            progress(table, n);
            tables.push((table.clone(), n));
        }
        tx.commit().await?;
        Ok::<_, StorageError>(tables)
    })?;

    // Checked from the target's side, after the commit.
    let counted = target.io().wait(async {
        let client = target.client().await?;
        let mut counts = Vec::new();
        for (table, _) in &copied {
            let n: i64 = client
                .query_one(&format!("SELECT COUNT(*) FROM {table}"), &[])
                .await?
                .get(0);
            counts.push((table.clone(), u64::try_from(n).unwrap_or(0)));
        }
        Ok::<_, StorageError>(counts)
    })?;
    if counted != copied {
        return Err(StorageError::Corrupt(format!(
            "the target's row counts {counted:?} are not the source's {copied:?}"
        )));
    }
    let unreadable = |e: synesis_billing::ledger::StoreError| StorageError::Corrupt(e.to_string());
    let theirs = target.ledger_snapshot().map_err(unreadable)?;
    let ours = db.ledger_snapshot().map_err(unreadable)?;
    synesis_billing::ledger::verify(&theirs.entries)
        .map_err(|e| StorageError::Corrupt(format!("the copied ledger does not verify: {e}")))?;
    if theirs.entries != ours.entries {
        return Err(StorageError::Corrupt(
            "the copied ledger's entries are not the source's".into(),
        ));
    }
    if theirs.states != ours.states {
        return Err(StorageError::Corrupt(
            "the copied accounts' totals or open holds are not the source's".into(),
        ));
    }
    let chains = theirs
        .entries
        .iter()
        .map(|e| e.account)
        .collect::<BTreeSet<_>>()
        .len();
    Ok(Copied {
        tables: copied,
        entries: theirs.entries.len() as u64,
        chains: chains as u64,
        accounts_agreeing: theirs.states.len() as u64,
    })
}
