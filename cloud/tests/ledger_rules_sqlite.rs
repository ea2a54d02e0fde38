//! The ledger rules on SQLite, as the cloud runs them, with real concurrency.
//!
//! - The table of `crates/synesis-billing/tests/rules` (the scenarios the in-memory store runs),
//!   each operation through the cloud's group-commit [`LedgerWriter`]; its concurrent scenarios
//!   call the writer from 64 threads at once, and nothing but the writer orders them.
//! - Storms from tokio tasks across two writers on one file and `admin`'s own transactions
//!   (`ledger::transaction`) beside them: three connections, kept apart only by SQLite's write lock, as
//!   `serve` and `admin` are.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // test code

use std::path::PathBuf;

use synesis_billing::ledger::{Entry, EntryKind, LedgerError, rebuild_states, verify};
use synesis_billing::{MicroUsd, Tier, Usage};
use synesis_cloud::ledger::LedgerWriter;
use synesis_cloud::storage::Db;

#[path = "../../crates/synesis-billing/tests/rules/mod.rs"]
mod rules;

use rules::{Done, Op, rid};

/// A new cloud database and its ledger writer.
#[derive(Debug)]
struct Sqlite {
    dir: tempfile::TempDir,
    writer: LedgerWriter,
}

impl Sqlite {
    fn fresh() -> Sqlite {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cloud.db");
        // The schema; the ledger's tables do not refer to accounts.
        drop(Db::open(&path).unwrap());
        let writer = LedgerWriter::open(&path).unwrap();
        Sqlite { dir, writer }
    }

    fn path(&self) -> PathBuf {
        self.dir.path().join("cloud.db")
    }

    /// What another connection sees: the committed entries, the kept states, and whether they
    /// agree and chain.
    fn committed(&self) -> Vec<Entry> {
        let db = synesis_cloud::storage::Db::open(&self.path()).unwrap();
        let snapshot = db.ledger_snapshot().unwrap();
        verify(&snapshot.entries).unwrap();
        assert_eq!(snapshot.states, rebuild_states(&snapshot.entries).unwrap());
        snapshot.entries
    }
}

impl rules::Ledger for Sqlite {
    fn run(&self, op: Op) -> Result<Done, LedgerError> {
        self.writer.run_blocking(move |s| op.apply(s))
    }

    fn entries(&self) -> Vec<Entry> {
        self.committed()
    }
}

rules::rule_tests!(Sqlite::fresh);

/// Runs `op` through `writer` from async code.
async fn run(writer: &LedgerWriter, op: Op) -> Result<Done, LedgerError> {
    writer.run(move |s| op.apply(s)).await
}

fn managed() -> synesis_billing::ledger::Account {
    rules::account(Tier::Managed)
}

const USAGE: Usage = Usage {
    input_tokens: 1_000,
    output_tokens: 100,
};

/// Retries of one request (hold, then settle) from 400 tokio tasks, half through each of two
/// writers on the same file, and from four threads running `admin`'s transactions: one hold,
/// one charge, every answer the first outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_across_two_writers_and_admin_charges_once() {
    let ledger = Sqlite::fresh();
    let writers = [
        ledger.writer.clone(),
        LedgerWriter::open(&ledger.path()).unwrap(),
    ];
    run(
        &writers[0],
        Op::TopUp {
            account: managed().id,
            id: rid(1_000_000),
            amount: MicroUsd(10_000_000),
            at: rules::NOW,
        },
    )
    .await
    .unwrap();
    let request = || {
        (
            rules::sonnet_hold(rid(7)),
            rules::settle_op(managed(), rid(7), USAGE, rules::NOW),
        )
    };

    let path = ledger.path();
    let admins: Vec<_> = (0..4)
        .map(|_| {
            let path = path.clone();
            std::thread::spawn(move || {
                let mut db = Db::open(&path).unwrap();
                (0..25)
                    .map(|_| {
                        let (hold, settle) = request();
                        (
                            synesis_cloud::ledger::transaction(&mut db, |s| hold.apply(s)),
                            synesis_cloud::ledger::transaction(&mut db, |s| settle.apply(s)),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..400 {
        let writer = writers[t % 2].clone();
        tasks.spawn(async move {
            let (hold, settle) = request();
            (run(&writer, hold).await, run(&writer, settle).await)
        });
    }
    let mut answers = tasks.join_all().await;
    for admin in admins {
        answers.extend(admin.join().unwrap());
    }

    assert_eq!(answers.len(), 500);
    let (held, charged) = answers[0].clone();
    assert_eq!(
        (
            held.unwrap().outcome().amount,
            charged.unwrap().outcome().amount
        ),
        (MicroUsd(6_953), MicroUsd(4_635))
    );
    assert!(answers.iter().all(|a| *a == answers[0]), "{answers:?}");
    let entries = ledger.committed();
    let kinds: Vec<_> = entries.iter().map(|e| e.kind).collect();
    assert_eq!(
        kinds,
        [EntryKind::TopUp, EntryKind::Hold, EntryKind::Settle],
        "one hold, one charge"
    );
}

/// 64 different requests at once from tokio tasks across two writers, against a balance that
/// covers ten: exactly ten holds, the rest refused, the balance never below zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_holds_across_two_writers_never_overdraw() {
    let ledger = Sqlite::fresh();
    let writers = [
        ledger.writer.clone(),
        LedgerWriter::open(&ledger.path()).unwrap(),
    ];
    run(
        &writers[1],
        Op::TopUp {
            account: managed().id,
            id: rid(1_000_000),
            amount: MicroUsd(6_953 * 10 + 100),
            at: rules::NOW,
        },
    )
    .await
    .unwrap();
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..rules::THREADS {
        let writer = writers[t % 2].clone();
        tasks.spawn(async move { run(&writer, rules::sonnet_hold(rid(100 + t as u64))).await });
    }
    let results = tasks.join_all().await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 10);
    let refusal = Err(LedgerError::InsufficientFunds {
        needed: MicroUsd(6_953),
        available: MicroUsd(100),
    });
    assert!(
        results.iter().filter(|r| r.is_err()).all(|r| *r == refusal),
        "{results:?}"
    );
    let entries = ledger.committed();
    assert_eq!(entries.len(), 11);
    let b = run(
        &writers[0],
        Op::Balance {
            account: managed().id,
            at: rules::NOW,
        },
    )
    .await
    .unwrap();
    let Done::Balance(b) = b else { panic!("{b:?}") };
    assert_eq!((b.held.0, b.available.0), (6_953 * 10, 100));
}
