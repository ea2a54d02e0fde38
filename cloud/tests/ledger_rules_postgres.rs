//! The ledger rules on PostgreSQL, as the cloud's PostgreSQL writer runs them, with real
//! concurrency: the table of `crates/synesis-billing/tests/rules` (the scenarios the in-memory
//! store and SQLite run), each operation through a [`PgLedgerWriter`], each test on a database
//! of its own; then two writers on one database, as two cloud nodes would have.
//!
//! The server is `SYNESIS_TEST_POSTGRES` (a URL; `scripts/postgres.sh start DIR` makes one).
//! Without it these tests say they skipped, outside CI; inside CI they fail.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // test code

#[path = "support/postgres.rs"]
mod support;

use support::fresh_database;
use synesis_billing::ledger::{Entry, LedgerError, balance, expire_due, rebuild_states, verify};
use synesis_billing::{MicroUsd, Tier, Usage};
use synesis_cloud::storage::postgres::Pg;
use synesis_cloud::storage::postgres::ledger::PgLedgerWriter;
use synesis_proto::UnixMillis;

#[path = "../../crates/synesis-billing/tests/rules/mod.rs"]
mod rules;

use rules::{Done, Op, rid};

/// A database and its ledger writer.
#[derive(Debug)]
struct Postgres {
    pg: Pg,
    writer: PgLedgerWriter,
}

impl Postgres {
    fn fresh() -> Option<Postgres> {
        let (pg, url) = fresh_database()?;
        let writer = PgLedgerWriter::open(&url).unwrap();
        Some(Postgres { pg, writer })
    }

    /// What another connection sees: the committed entries, the kept states, and whether they
    /// agree and chain.
    fn committed(&self) -> Vec<Entry> {
        let snapshot = self.pg.ledger_snapshot().unwrap();
        verify(&snapshot.entries).unwrap();
        assert_eq!(snapshot.states, rebuild_states(&snapshot.entries).unwrap());
        snapshot.entries
    }
}

impl rules::Ledger for Postgres {
    /// Keyed where the operation has a key (what the cloud's hot paths do: the batch reads
    /// ahead), and not where it has none (read as it runs): both paths under the same rules.
    fn run(&self, op: Op) -> Result<Done, LedgerError> {
        match op.key() {
            Some((account, request)) => {
                self.writer
                    .run_keyed_blocking(account, request, move |s| op.apply(s))
            }
            None => self.writer.run_blocking(move |s| op.apply(s)),
        }
    }

    fn entries(&self) -> Vec<Entry> {
        self.committed()
    }
}

rules::rule_tests!(optional Postgres::fresh);

fn managed() -> synesis_billing::ledger::Account {
    rules::account(Tier::Managed)
}

const USAGE: Usage = Usage {
    input_tokens: 1_000,
    output_tokens: 100,
};

/// A database with `balance` µUSD on the managed account, and two writers on it (two nodes).
async fn two_writers(balance: i64) -> Option<(Postgres, [PgLedgerWriter; 2])> {
    let ledger = tokio::task::spawn_blocking(Postgres::fresh)
        .await
        .unwrap()?;
    let url = ledger.pg.url().to_owned();
    let second = tokio::task::spawn_blocking(move || PgLedgerWriter::open(&url).unwrap())
        .await
        .unwrap();
    let writers = [ledger.writer.clone(), second];
    let top_up = Op::TopUp {
        account: managed().id,
        id: rid(1_000_000),
        amount: MicroUsd(balance),
        at: rules::NOW,
    };
    writers[0].run(move |s| top_up.apply(s)).await.unwrap();
    Some((ledger, writers))
}

/// Retries of one request (hold, then settle) from 400 tokio tasks, half through each of two
/// writers on one database (two nodes): one hold, one charge, every answer the first outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_across_two_writers_charges_once() {
    let Some((ledger, writers)) = two_writers(10_000_000).await else {
        return;
    };
    let mut tasks = tokio::task::JoinSet::new();
    for t in 0..400 {
        let writer = writers[t % 2].clone();
        tasks.spawn(async move {
            let hold = rules::sonnet_hold(rid(7));
            let settle = rules::settle_op(managed(), rid(7), USAGE, rules::NOW);
            // Half the tasks unkeyed (read as they run), half keyed (read ahead), on both writers.
            if t % 4 < 2 {
                (
                    writer.run(move |s| hold.apply(s)).await,
                    writer.run(move |s| settle.apply(s)).await,
                )
            } else {
                (
                    writer
                        .run_keyed(managed().id, rid(7), move |s| hold.apply(s))
                        .await,
                    writer
                        .run_keyed(managed().id, rid(7), move |s| settle.apply(s))
                        .await,
                )
            }
        });
    }
    let answers = tasks.join_all().await;
    let (holds, settles): (Vec<_>, Vec<_>) = answers.into_iter().unzip();
    let first_hold = holds[0].clone().unwrap();
    assert!(holds.iter().all(|h| h.as_ref() == Ok(&first_hold)));
    let first_settle = settles[0].clone().unwrap();
    assert!(settles.iter().all(|s| s.as_ref() == Ok(&first_settle)));
    let entries = tokio::task::spawn_blocking(move || ledger.committed())
        .await
        .unwrap();
    // The top-up, one hold, one settlement.
    assert_eq!(entries.len(), 3, "{entries:#?}");
}

/// Two writers taking money from one account at once (as two nodes would): the holds never
/// overdraw it, whichever writer places them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_across_two_writers_never_overdraw() {
    // Room for exactly ten Sonnet holds (6,953 µUSD each).
    let Some((ledger, writers)) = two_writers(69_530).await else {
        return;
    };
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..60u64 {
        let writer = writers[(n % 2) as usize].clone();
        tasks.spawn(async move {
            let hold = rules::sonnet_hold(rid(n));
            writer
                .run_keyed(managed().id, rid(n), move |s| hold.apply(s))
                .await
        });
    }
    let placed = tasks
        .join_all()
        .await
        .into_iter()
        .filter(Result::is_ok)
        .count();
    assert_eq!(placed, 10, "exactly as many holds as the balance covers");
    tokio::task::spawn_blocking(move || ledger.committed())
        .await
        .unwrap();
}

/// A database whose schema a newer build wrote is refused, not guessed at; a second open of
/// this build's schema changes nothing; a URL that is not one says so.
#[test]
fn schema_versions_are_checked_on_postgres() {
    let Some((pg, url)) = fresh_database() else {
        return;
    };
    drop(pg);
    // Opening again (another node starting) finds the schema in place.
    drop(Pg::open(&url).unwrap());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        let driver = tokio::spawn(connection);
        client
            .batch_execute("UPDATE schema_version SET version = 99")
            .await
            .unwrap();
        drop(client);
        let _ = driver.await;
    });
    let err = Pg::open(&url).unwrap_err().to_string();
    assert!(err.contains("newer than this build"), "{err}");
    let err = Pg::open("postgres://nobody@[not a host")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a PostgreSQL URL"), "{err}");
}

/// Ten minutes and one second after [`rules::NOW`]: a hold made at `NOW` has lapsed.
const LAPSED: UnixMillis =
    UnixMillis(rules::NOW.0 + synesis_billing::ledger::HOLD_TTL_DEFAULT_MS + 1_000);

/// A funded database with one open hold made at [`rules::NOW`].
fn one_open_hold() -> Option<Postgres> {
    let ledger = Postgres::fresh()?;
    rules::fund(&ledger, 1_000_000);
    rules::Ledger::run(&ledger, rules::sonnet_hold(rid(1))).unwrap();
    Some(ledger)
}

/// The writer reads an account's open holds for a window of time ahead of an operation, not all
/// of them: one unit of work that asks for the balance now and then after its hold has lapsed
/// sees the hold lapse, as a unit asking only later does.
#[test]
fn a_batch_that_asks_again_later_sees_the_holds_that_lapsed_meanwhile() {
    let Some(ledger) = one_open_hold() else {
        return;
    };
    let id = managed().id;
    let (now, later) = ledger
        .writer
        .run_blocking(move |s| Ok((balance(s, id, rules::NOW)?, balance(s, id, LAPSED)?)))
        .unwrap();
    let alone = ledger
        .writer
        .run_blocking(move |s| balance(s, id, LAPSED))
        .unwrap();
    assert_eq!(later, alone);
    assert!(now.held > alone.held, "{now:?} then {alone:?}");
}

/// An operation that closed a hold and was then refused leaves the hold open for the rest of its
/// batch: the next operation there still finds it lapsed, and closes it once.
#[test]
fn a_refused_operation_leaves_the_holds_it_closed_open_for_its_batch() {
    let Some(ledger) = one_open_hold() else {
        return;
    };
    let id = managed().id;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        // The writer is busy with this one while the next two wait: they make one batch.
        let writer = ledger.writer.clone();
        let busy = scope.spawn(move || {
            writer.run_blocking(move |_| {
                tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(300));
                Ok(())
            })
        });
        rx.recv().unwrap();
        let writer = ledger.writer.clone();
        let refused = scope.spawn(move || {
            writer.run_blocking(move |s| {
                assert_eq!(expire_due(s, id, LAPSED)?, 1);
                Err::<(), _>(LedgerError::NotPositive)
            })
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        let writer = ledger.writer.clone();
        let expired = scope.spawn(move || writer.run_blocking(move |s| expire_due(s, id, LAPSED)));
        busy.join().unwrap().unwrap();
        assert_eq!(refused.join().unwrap(), Err(LedgerError::NotPositive));
        assert_eq!(expired.join().unwrap(), Ok(1));
    });
    let expiries = ledger
        .committed()
        .iter()
        .filter(|e| e.kind == synesis_billing::ledger::EntryKind::Expire)
        .count();
    assert_eq!(expiries, 1);
}
