//! The ledger writer's group commit: many operations to a transaction, each one all or nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use synesis_billing::ledger::{LedgerError, StoreError, balance, top_up};
use synesis_billing::{MicroUsd, Tier};
use synesis_cloud::ledger::LedgerWriter;
use synesis_cloud::storage::{Accounts, Db, Vouchers};
use synesis_proto::{AccountId, RequestId, UnixMillis};

const NOW: UnixMillis = UnixMillis(1_795_000_000_000);

fn rid(n: u64) -> RequestId {
    let mut rand = [0u8; 10];
    rand[3..].copy_from_slice(&n.to_le_bytes()[..7]);
    RequestId::from_parts(1_795_000_000_000, rand)
}

/// A new cloud database with one Managed account, and its ledger writer.
fn managed_account() -> (tempfile::TempDir, AccountId, LedgerWriter) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let mut db = Db::open(&path).unwrap();
    let account = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
    db.create_account(account, "acme", Tier::Managed, NOW)
        .unwrap();
    (dir, account, LedgerWriter::open(&path).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operation_is_all_or_nothing_inside_a_shared_transaction() {
    let (dir, account, writer) = managed_account();
    let path = dir.path().join("cloud.db");

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
            .filter(|r| matches!(r, Err(LedgerError::Store(StoreError::Unavailable(_)))))
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
    let entries = reader.ledger_snapshot().unwrap().entries;
    assert_eq!(entries.len(), 100);
    synesis_billing::ledger::verify(&entries).unwrap();

    // A retry of a kept operation gets its first outcome, through the writer as well.
    let again = writer
        .run(move |s| top_up(s, account, rid(0), MicroUsd(1), NOW))
        .await
        .unwrap();
    assert_eq!(again.amount, MicroUsd(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapsed_holds_get_their_expiry_entries() {
    use synesis_billing::ledger::{Account, HoldRequest, hold};
    use synesis_billing::{PriceTable, TierRules};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let mut db = Db::open(&path).unwrap();
    let writer = LedgerWriter::open(&path).unwrap();
    let mut accounts = Vec::new();
    for name in ["a", "b"] {
        let id = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
        db.create_account(id, name, Tier::Managed, NOW).unwrap();
        accounts.push(Account {
            id,
            tier: Tier::Managed,
        });
    }
    let mut n = 0;
    for (i, account) in accounts.iter().copied().enumerate() {
        let credit = rid(1_000 + i as u64);
        writer
            .run(move |s| top_up(s, account.id, credit, MicroUsd(10_000_000), NOW))
            .await
            .unwrap();
        // Two holds of one minute and one of an hour per account.
        for ttl in [60_000, 60_000, 3_600_000] {
            n += 1;
            let id = rid(n);
            writer
                .run(move |s| {
                    let request = HoldRequest {
                        model: "claude-sonnet".into(),
                        device: None,
                        input_tokens: 1_000,
                        max_output_tokens: 250,
                        request_body: None,
                    };
                    let (prices, rules) = (PriceTable::default(), TierRules::default());
                    hold(s, account, id, &request, NOW, ttl, &prices, &rules)
                })
                .await
                .unwrap();
        }
    }
    let later = UnixMillis(NOW.0 + 120_000);
    let writer = synesis_cloud::ledger::Writer::Sqlite(writer);
    let expired = synesis_cloud::ledger::expire_lapsed(&writer, later)
        .await
        .unwrap();
    assert_eq!(expired, 4);
    assert_eq!(
        synesis_cloud::ledger::expire_lapsed(&writer, later)
            .await
            .unwrap(),
        0,
        "once"
    );
    let reader = Db::open(&path).unwrap();
    let store = synesis_cloud::ledger::SqliteLedger::new(reader.connection());
    for account in &accounts {
        let b = balance(&store, account.id, later).unwrap();
        assert_eq!(
            (b.balance.0, b.held.0),
            (10_000_000, 6_953),
            "one hold left"
        );
    }
    let entries = reader.ledger_snapshot().unwrap().entries;
    synesis_billing::ledger::verify(&entries).unwrap();
    let stored = reader.ledger_snapshot().unwrap().states;
    assert_eq!(
        stored,
        synesis_billing::ledger::rebuild_states(&entries).unwrap()
    );
}

#[test]
fn one_request_id_redeems_one_voucher() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("cloud.db")).unwrap();
    db.create_voucher("VCH-ONE", MicroUsd(5_000_000), NOW)
        .unwrap();
    db.create_voucher("VCH-TWO", MicroUsd(5_000_000), NOW)
        .unwrap();
    let account = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
    let redeem = |db: &mut Db, code: &str, request| {
        synesis_cloud::ledger::transaction(db, |s| s.redeem_voucher(code, account, request, NOW))
    };
    assert_eq!(
        redeem(&mut db, "VCH-ONE", rid(1)).unwrap(),
        Some(MicroUsd(5_000_000))
    );
    assert_eq!(
        redeem(&mut db, "VCH-ONE", rid(1)).unwrap(),
        Some(MicroUsd(5_000_000)),
        "the same request again: the same answer"
    );
    assert_eq!(redeem(&mut db, "VCH-ONE", rid(2)).unwrap(), None, "used");
    // The first request id with another voucher is a conflict, and leaves that voucher unused.
    assert!(matches!(
        redeem(&mut db, "VCH-TWO", rid(1)),
        Err(LedgerError::IdempotencyConflict)
    ));
    assert_eq!(
        redeem(&mut db, "VCH-TWO", rid(3)).unwrap(),
        Some(MicroUsd(5_000_000))
    );
    // The first request id from another account is not a replay of this one's redemption.
    let other = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
    assert_eq!(
        synesis_cloud::ledger::transaction(&mut db, |s| s.redeem_voucher(
            "VCH-ONE",
            other,
            rid(1),
            NOW
        ))
        .unwrap(),
        None,
        "a redemption belongs to the account that made it"
    );
}

/// Caps (or uncaps) the writer's database at `pages`, as a full disk would: SQLite answers
/// SQLITE_FULL when a write needs a page beyond it.
fn cap(writer: &LedgerWriter, pages: Option<u64>) {
    writer
        .run_blocking(move |s| {
            let now: u64 = s
                .connection()
                .query_row("PRAGMA page_count", [], |r| r.get(0))
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let limit = pages.unwrap_or(now).to_string();
            s.connection()
                .pragma_update(None, "max_page_count", limit)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            Ok(())
        })
        .unwrap();
}

/// A full disk refuses the operation that needed the space, with an error that says so, keeps
/// every operation answered before it, and the writer serves again once there is room: the
/// refused request, retried with the same id, is applied once.
#[test]
fn a_full_disk_refuses_cleanly_and_the_writer_goes_on() {
    let (dir, account, writer) = managed_account();
    let path = dir.path().join("cloud.db");

    cap(&writer, None);
    let mut kept = 0i64;
    let refused = loop {
        assert!(kept < 10_000, "the capped database never filled up");
        let id = rid(kept as u64);
        match writer.run_blocking(move |s| top_up(s, account, id, MicroUsd(1), NOW)) {
            Ok(_) => kept += 1,
            Err(e) => break e,
        }
    };
    assert!(
        matches!(&refused, LedgerError::Store(StoreError::Unavailable(why)) if why.contains("full")),
        "{refused}"
    );

    let reader = Db::open(&path).unwrap();
    let check = |expect: i64| {
        let store = synesis_cloud::ledger::SqliteLedger::new(reader.connection());
        assert_eq!(
            balance(&store, account, NOW).unwrap().balance,
            MicroUsd(expect)
        );
        let entries = reader.ledger_snapshot().unwrap().entries;
        assert_eq!(entries.len() as i64, expect);
        synesis_billing::ledger::verify(&entries).unwrap();
        let stored = reader.ledger_snapshot().unwrap().states;
        assert_eq!(
            stored,
            synesis_billing::ledger::rebuild_states(&entries).unwrap()
        );
    };
    assert!(
        kept > 0,
        "some operations fit before the database filled up"
    );
    check(kept);

    cap(&writer, Some(1 << 30));
    let id = rid(kept as u64);
    writer
        .run_blocking(move |s| top_up(s, account, id, MicroUsd(1), NOW))
        .unwrap();
    writer
        .run_blocking(move |s| top_up(s, account, id, MicroUsd(1), NOW))
        .unwrap();
    check(kept + 1);
}

/// Another process holding the database's write lock past the busy timeout: the operation is
/// refused as a conflict (retryable: nothing was written), and the same request, sent again once
/// the lock is gone, is applied once.
#[test]
fn a_database_held_by_another_writer_is_a_retryable_conflict() {
    let (dir, account, writer) = managed_account();
    let other = rusqlite::Connection::open(dir.path().join("cloud.db")).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let id = rid(1);
    let refused = writer
        .run_blocking(move |s| top_up(s, account, id, MicroUsd(5), NOW))
        .unwrap_err();
    assert!(
        matches!(&refused, LedgerError::Store(e @ StoreError::Conflict(_)) if e.is_retryable()),
        "{refused}"
    );
    other.execute_batch("ROLLBACK").unwrap();
    writer
        .run_blocking(move |s| top_up(s, account, id, MicroUsd(5), NOW))
        .unwrap();
    writer
        .run_blocking(move |s| top_up(s, account, id, MicroUsd(5), NOW))
        .unwrap();
    let b = writer
        .run_blocking(move |s| balance(s, account, NOW))
        .unwrap();
    assert_eq!(b.balance, MicroUsd(5));
}
