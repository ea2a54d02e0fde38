//! The cloud database's schema versions: files this build cannot carry over are refused, and kept.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::Path;

use synesis_billing::ledger::top_up;
use synesis_billing::{MicroUsd, Tier};
use synesis_cloud::storage::{Accounts, Db};
use synesis_proto::{AccountId, RequestId, UnixMillis};

const NOW: UnixMillis = UnixMillis(1_795_000_000_000);

/// A database with one account and one credited entry, as this build writes it, then marked
/// as schema `version`; what opening it says.
fn opened_as_version(path: &Path, version: i64) -> String {
    let mut db = Db::open(path).unwrap();
    let account = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
    db.create_account(account, "acme", Tier::Managed, NOW)
        .unwrap();
    let request = RequestId::from_parts(1_795_000_000_000, [7; 10]);
    synesis_cloud::ledger::transaction(&mut db, |s| {
        top_up(s, account, request, MicroUsd(1_000_000), NOW)
    })
    .unwrap();
    drop(db);
    let raw = rusqlite::Connection::open(path).unwrap();
    raw.pragma_update(None, "user_version", version).unwrap();
    drop(raw);
    Db::open(path).unwrap_err().to_string()
}

/// Entries written before version 2 lack what their hashes would need: such a file is refused,
/// naming itself, and left as it was.
#[test]
fn a_ledger_from_before_version_2_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let err = opened_as_version(&path, 1);
    assert!(err.contains("cloud.db"), "{err}");
    assert!(err.contains("cannot carry over"), "{err}");
    let raw = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = raw
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 1);
    let n: i64 = raw
        .query_row("SELECT COUNT(*) FROM ledger_entries", [], |r| r.get(0))
        .unwrap();
    assert_eq!(n, 1);
}

/// A file from a newer build is refused rather than written in a layout it does not know.
#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = opened_as_version(&dir.path().join("cloud.db"), 99);
    assert!(err.contains("newer than this build"), "{err}");
}
