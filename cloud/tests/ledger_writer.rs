//! The ledger writer's group commit: many operations to a transaction, each one all or nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use synesis_billing::ledger::{LedgerError, StoreError, balance, top_up};
use synesis_billing::{MicroUsd, Tier};
use synesis_cloud::db::Db;
use synesis_cloud::ledger::LedgerWriter;
use synesis_proto::{AccountId, RequestId, UnixMillis};

const NOW: UnixMillis = UnixMillis(1_795_000_000_000);

fn rid(n: u64) -> RequestId {
    let mut rand = [0u8; 10];
    rand[3..].copy_from_slice(&n.to_le_bytes()[..7]);
    RequestId::from_parts(1_795_000_000_000, rand)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operation_is_all_or_nothing_inside_a_shared_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let mut db = Db::open(&path).unwrap();
    let account = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
    db.create_account(account, "acme", Tier::Managed, NOW)
        .unwrap();
    let writer = LedgerWriter::open(&path).unwrap();

    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..300u64 {
        let writer = writer.clone();
        tasks.spawn(async move {
            match n % 3 {
                // Kept.
                0 => writer
                    .run(move |s| top_up(s, account, rid(n), MicroUsd(1), NOW))
                    .await
                    .map(|_| ()),
                // Writes, then is refused: its write must not stay.
                1 => {
                    writer
                        .run(move |s| {
                            top_up(s, account, rid(n), MicroUsd(1_000), NOW)?;
                            Err::<(), _>(LedgerError::NotPositive)
                        })
                        .await
                }
                // Writes, then panics: rolled back, and the writer goes on.
                _ => {
                    writer
                        .run(move |s| -> Result<(), LedgerError> {
                            top_up(s, account, rid(n), MicroUsd(1_000_000), NOW)?;
                            panic!("a bug in an operation")
                        })
                        .await
                }
            }
        });
    }
    let results = tasks.join_all().await;
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 100);
    assert_eq!(
        results
            .iter()
            .filter(|r| matches!(r, Err(LedgerError::NotPositive)))
            .count(),
        100
    );
    assert!(
        results
            .iter()
            .filter(|r| matches!(r, Err(LedgerError::Store(StoreError(_)))))
            .count()
            == 100
    );

    // Answered means committed: another connection sees exactly the kept operations.
    let reader = Db::open(&path).unwrap();
    let store = synesis_cloud::ledger::SqliteLedger::new(reader.connection());
    assert_eq!(
        balance(&store, account, NOW).unwrap().balance,
        MicroUsd(100)
    );
    let entries = synesis_cloud::ledger::query_entries(reader.connection(), "", &[]).unwrap();
    assert_eq!(entries.len(), 100);
    synesis_billing::ledger::verify(&entries).unwrap();

    // A retry of a kept operation gets its first outcome, through the writer as well.
    let again = writer
        .run(move |s| top_up(s, account, rid(0), MicroUsd(1), NOW))
        .await
        .unwrap();
    assert_eq!(again.amount, MicroUsd(1));
}
