//! `synesis-cloud admin migrate --to postgres://…` on a populated cloud (`fixtures/cloud-v9.db`:
//! accounts, devices, members by invitation, an adapter, escalations charged, four accounts'
//! ledger chains): every table copied, the chains verify, balances and holds agree, and the
//! SQLite file is the same byte for byte. A second copy into the same database is refused.
//!
//! Runs when `SYNESIS_TEST_POSTGRES` names a server (see `ledger_rules_postgres.rs`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "support/postgres.rs"]
mod support;

use std::path::Path;
use std::process::{Command, Output};

use support::server;
use synesis_cloud::storage::postgres::{Pg, create_database};

fn admin(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_synesis-cloud"))
        .arg("admin")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_populated_cloud_moves_to_postgres_and_checks_out() {
    let Some(server) = server() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("cloud.db");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cloud-v9.db"),
        &source,
    )
    .unwrap();
    let before = std::fs::read(&source).unwrap();
    let url = create_database(
        &server,
        &format!("synesis_migrate_{}", uuid::Uuid::now_v7().simple()),
    )
    .unwrap();

    let out = admin(dir.path(), &["--json", "migrate", "--to", &url]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = |table: &str| {
        report["tables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t[0] == table)
            .and_then(|t| t[1].as_u64())
    };
    assert_eq!(rows("accounts"), Some(4), "{report}");
    assert_eq!(rows("ledger_entries"), Some(37), "{report}");
    assert_eq!(rows("devices"), Some(2), "{report}");
    assert_eq!(rows("adapters"), Some(1), "{report}");
    assert!(rows("members").unwrap() >= 5, "{report}");
    assert_eq!(report["chains"], 4, "{report}");
    assert_eq!(report["accounts_agreeing"], 4, "{report}");
    // Parents went before their children.
    let order: Vec<&str> = report["tables"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t[0].as_str().unwrap())
        .collect();
    let at = |t: &str| order.iter().position(|o| *o == t).unwrap();
    assert!(at("accounts") < at("members") && at("members") < at("devices"));
    assert!(at("ledger_entries") < at("ledger_open_holds"));

    // The source was only read (its schema-9 file was not even brought to schema 10); a
    // reader of a WAL database may leave SQLite's empty log and index files beside it.
    assert!(
        std::fs::read(&source).unwrap() == before,
        "the source changed"
    );
    let wal = dir.path().join("cloud.db-wal");
    assert!(
        !wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0,
        "nothing was written to the source's log"
    );

    // The target, read on its own: the same ledger the source's `ledger verify` sees.
    let target = Pg::open(&url).unwrap();
    let snapshot = target.ledger_snapshot().unwrap();
    synesis_billing::ledger::verify(&snapshot.entries).unwrap();
    assert_eq!(
        snapshot.states,
        synesis_billing::ledger::rebuild_states(&snapshot.entries).unwrap()
    );
    drop(target);

    // A second copy into a database that has rows is refused, and changes nothing there.
    let again = admin(dir.path(), &["migrate", "--to", &url]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("only into an empty database"), "{stderr}");
    assert_eq!(
        Pg::open(&url)
            .unwrap()
            .ledger_snapshot()
            .unwrap()
            .entries
            .len(),
        37
    );
    // The password never reaches the output.
    assert!(!stderr.contains("password"), "{stderr}");
}
