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

/// An enrollment the device was told succeeded must survive a power cut: registry commits are
/// synced, not left to the next checkpoint.
#[test]
fn registry_commits_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(&dir.path().join("cloud.db")).unwrap();
    let synchronous: i64 = db
        .connection()
        .pragma_query_value(None, "synchronous", |r| r.get(0))
        .unwrap();
    assert_eq!(synchronous, 2, "synchronous=FULL");
}

/// A version-2 file is carried over: a redeemed voucher learns the account that redeemed it
/// (from its top-up entry), and each device's certificate is listed among its certificates.
#[test]
fn a_version_2_file_is_migrated_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute_batch(
        "CREATE TABLE accounts (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, tier TEXT NOT NULL, created_at INTEGER NOT NULL);
         CREATE TABLE devices (id TEXT PRIMARY KEY, account_id TEXT NOT NULL, name TEXT NOT NULL,
             cert_sha256 BLOB NOT NULL UNIQUE, cert_der BLOB NOT NULL, enroll_request TEXT NOT NULL UNIQUE,
             enrolled_at INTEGER NOT NULL, revoked_at INTEGER, connected INTEGER NOT NULL DEFAULT 0,
             last_seen_at INTEGER, heartbeat_interval_ms INTEGER, rtt_us INTEGER, vitals_json TEXT);
         CREATE TABLE ledger_entries (seq INTEGER PRIMARY KEY, account_id TEXT NOT NULL, request_id TEXT NOT NULL,
             kind INTEGER NOT NULL, model TEXT NOT NULL, device_id TEXT, input_tokens INTEGER NOT NULL,
             output_tokens INTEGER NOT NULL, amount INTEGER NOT NULL, quota_tokens INTEGER NOT NULL,
             body BLOB NOT NULL, at INTEGER NOT NULL, expires_at INTEGER, prev_hash BLOB NOT NULL, hash BLOB NOT NULL);
         CREATE TABLE vouchers (code_sha256 BLOB PRIMARY KEY, amount INTEGER NOT NULL, created_at INTEGER NOT NULL,
             redeemed_at INTEGER, redeemed_by TEXT);
         PRAGMA user_version = 2;",
    )
    .unwrap();
    let (account, device) = (
        AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap(),
        synesis_proto::DeviceId::try_from_uuid(uuid::Uuid::now_v7()).unwrap(),
    );
    let request = RequestId::from_parts(1_795_000_000_000, [7; 10]);
    raw.execute(
        "INSERT INTO accounts VALUES (?1, 'acme', 'managed', 0)",
        [account.to_string()],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO devices (id, account_id, name, cert_sha256, cert_der, enroll_request, enrolled_at)
         VALUES (?1, ?2, 'laptop', X'AA', X'BB', 'r', 5)",
        [device.to_string(), account.to_string()],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO ledger_entries VALUES (0, ?1, ?2, 1, '', NULL, 0, 0, 1, 0, X'00', 0, NULL, X'00', X'00')",
        [account.to_string(), request.to_string()],
    )
    .unwrap();
    raw.execute(
        "INSERT INTO vouchers VALUES (X'01', 1, 0, 0, ?1)",
        [request.to_string()],
    )
    .unwrap();
    drop(raw);

    let db = Db::open(&path).unwrap();
    let conn = db.connection();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, synesis_cloud::storage::schema::SCHEMA_VERSION);
    let redeemed_account: String = conn
        .query_row("SELECT redeemed_account FROM vouchers", [], |r| r.get(0))
        .unwrap();
    assert_eq!(redeemed_account, account.to_string());
    let certs: i64 = conn
        .query_row(
            "SELECT COUNT(*) FROM device_certs WHERE device_id = ?1 AND cert_sha256 = X'AA'",
            [device.to_string()],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(certs, 1);
    // Version 4: a device row takes a pre-warm signal, and finished answers have their table.
    conn.execute(
        "UPDATE devices SET prewarm_json = '{}' WHERE id = ?1",
        [device.to_string()],
    )
    .expect("devices.prewarm_json exists after the upgrade");
    let answers: i64 = conn
        .query_row("SELECT COUNT(*) FROM escalation_answers", [], |r| r.get(0))
        .unwrap();
    assert_eq!(answers, 0);
}
