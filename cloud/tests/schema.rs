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
         CREATE TABLE ledger_totals (account_id TEXT PRIMARY KEY, balance INTEGER NOT NULL, quota_year INTEGER,
             quota_month INTEGER, quota_settled INTEGER NOT NULL, open_held INTEGER NOT NULL,
             open_quota INTEGER NOT NULL) WITHOUT ROWID;
         CREATE TABLE ledger_open_holds (account_id TEXT NOT NULL, request_id TEXT NOT NULL,
             seq INTEGER NOT NULL REFERENCES ledger_entries(seq), amount INTEGER NOT NULL,
             quota_tokens INTEGER NOT NULL, expires_at INTEGER, PRIMARY KEY (account_id, request_id)) WITHOUT ROWID;
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
    // A top-up of 1 µUSD, chained as that schema chained it (later steps verify the chain).
    let mut entry = synesis_billing::ledger::Entry {
        seq: 0,
        account,
        request_id: request,
        kind: synesis_billing::ledger::EntryKind::TopUp,
        model: String::new(),
        device: None,
        input_tokens: 0,
        output_tokens: 0,
        amount: MicroUsd(1),
        quota_tokens: 0,
        body: [0; 32],
        at: UnixMillis(0),
        expires_at: None,
        prev_hash: [0; 32],
        hash: [0; 32],
    };
    entry.hash = entry.compute_hash();
    raw.execute(
        "INSERT INTO ledger_entries VALUES (0, ?1, ?2, 1, '', NULL, 0, 0, 1, 0, ?3, 0, NULL, ?3, ?4)",
        rusqlite::params![
            account.to_string(),
            request.to_string(),
            [0u8; 32].as_slice(),
            entry.hash.as_slice()
        ],
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

/// A copy of a populated schema-9 cloud (`fixtures/cloud-v9.db`, one global chain over four
/// accounts whose entries interleave), in a directory of its own.
fn populated_v9() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cloud-v9.db"),
        &path,
    )
    .unwrap();
    (dir, path)
}

/// What a schema-9 file says of its ledger, read as that schema laid it out: every entry in
/// global order (account, request id, kind, amount, time) and every account's kept totals.
type OldLedger = (
    Vec<(String, String, i64, i64, i64)>,
    Vec<(String, i64, i64)>,
);

fn old_ledger(path: &Path) -> OldLedger {
    let raw = rusqlite::Connection::open(path).unwrap();
    let entries = raw
        .prepare("SELECT account_id, request_id, kind, amount, at FROM ledger_entries ORDER BY seq")
        .unwrap()
        .query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let totals = raw
        .prepare("SELECT account_id, balance, open_held FROM ledger_totals ORDER BY account_id")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    (entries, totals)
}

/// Schema 10 rewrites the one global chain as one chain per account, in place: every entry
/// stays, in its account's order, numbered 0, 1, 2, … within it and linked to the account's
/// previous entry; balances, holds and usage are unchanged; the chains verify; the old chain's
/// end is kept; the ledger goes on from each account's head.
#[test]
fn a_populated_global_chain_is_rechained_per_account_in_place() {
    use synesis_billing::ledger::{rebuild_states, verify};

    let (dir, path) = populated_v9();
    let (old_entries, old_totals) = old_ledger(&path);
    assert!(old_entries.len() > 30, "the fixture is populated");
    let accounts: std::collections::BTreeSet<&String> = old_entries.iter().map(|e| &e.0).collect();
    assert!(accounts.len() >= 4, "and its accounts interleave");

    let mut db = Db::open(&path).unwrap();
    let snapshot = db.ledger_snapshot().unwrap();
    verify(&snapshot.entries).unwrap();
    assert_eq!(snapshot.states, rebuild_states(&snapshot.entries).unwrap());
    assert_eq!(snapshot.entries.len(), old_entries.len(), "no entry lost");
    for account in &accounts {
        let was: Vec<_> = old_entries
            .iter()
            .filter(|e| &e.0 == *account)
            .map(|e| (e.1.clone(), e.2, e.3, e.4))
            .collect();
        let chain: Vec<_> = snapshot
            .entries
            .iter()
            .filter(|e| &e.account.to_string() == *account)
            .collect();
        let now: Vec<_> = chain
            .iter()
            .map(|e| {
                (
                    e.request_id.to_string(),
                    i64::from(e.kind.code()),
                    e.amount.0,
                    e.at.0,
                )
            })
            .collect();
        assert_eq!(
            now, was,
            "account {account}: the same entries in the same order"
        );
        assert!(
            chain.iter().enumerate().all(|(n, e)| e.seq == n as u64),
            "numbered within the account"
        );
    }
    for (account, balance, held) in &old_totals {
        let state = &snapshot.states[&account.parse::<AccountId>().unwrap()];
        assert_eq!(
            (state.totals.balance.0, state.totals.open_held.0),
            (*balance, *held),
            "account {account}: its kept totals"
        );
    }
    let raw = rusqlite::Connection::open(&path).unwrap();
    let (count, head): (i64, Vec<u8>) = raw
        .query_row(
            "SELECT entries, head_hash FROM ledger_global_chain",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(usize::try_from(count).unwrap(), old_entries.len());
    assert_eq!(head.len(), 32, "where the old chain ended is kept");

    // The ledger goes on from an account's own head.
    let account: AccountId = old_totals[0].0.parse().unwrap();
    let before = snapshot
        .entries
        .iter()
        .filter(|e| e.account == account)
        .count();
    synesis_cloud::ledger::transaction(&mut db, |s| {
        top_up(
            s,
            account,
            RequestId::from_parts(1_796_000_000_000, [3; 10]),
            MicroUsd(7),
            NOW,
        )
    })
    .unwrap();
    let after = db.ledger_snapshot().unwrap();
    verify(&after.entries).unwrap();
    let last = after
        .entries
        .iter()
        .rfind(|e| e.account == account)
        .unwrap();
    assert_eq!(last.seq, before as u64);
    drop(db);

    // The operator's check says the same, naming the chains.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_synesis-cloud"))
        .args(["admin", "--json", "--data-dir"])
        .arg(dir.path())
        .args(["ledger", "verify"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["intact"], true, "{v}");
    assert_eq!(v["chains"].as_u64(), Some(accounts.len() as u64), "{v}");
}

/// A global chain that does not verify is not rechained (that would launder the change): the
/// file is refused, saying where it breaks, and left as it was.
#[test]
fn a_tampered_global_chain_is_refused_not_rechained() {
    let (_dir, path) = populated_v9();
    let raw = rusqlite::Connection::open(&path).unwrap();
    raw.execute(
        "UPDATE ledger_entries SET amount = amount + 1 WHERE seq = 20",
        [],
    )
    .unwrap();
    drop(raw);
    let before = std::fs::read(&path).unwrap();
    let err = Db::open(&path).unwrap_err().to_string();
    assert!(err.contains("does not verify at entry 20"), "{err}");
    assert!(err.contains("cloud.db"), "{err}");
    let raw = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = raw
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, 9, "untouched");
    drop(raw);
    assert_eq!(std::fs::read(&path).unwrap(), before, "byte for byte");
}
