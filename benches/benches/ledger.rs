//! Durable settled charges on the cloud's SQLite ledger, against its anchor: the same number of
//! bare SQLite write transactions (one row each) on the same kind of file, WAL, synchronous=NORMAL.
//! One settled charge = a hold transaction + a settle transaction, as an escalation makes them.
//!
//! `cargo bench -p synesis-benches --bench ledger`
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark whose fixture fails stops

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use synesis_billing::ledger::{HOLD_TTL_DEFAULT_MS, HoldRequest, hold, settle, top_up};
use synesis_billing::{MicroUsd, PriceTable, Tier, TierRules, Usage};
use synesis_cloud::db::Db;
use synesis_proto::{AccountId, RequestId, UnixMillis};

fn now() -> UnixMillis {
    UnixMillis(
        i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis(),
        )
        .unwrap(),
    )
}

fn ledger(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("cloud.db")).unwrap();
    let account_id = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
    db.create_account(account_id, "bench", Tier::Managed, now())
        .unwrap();
    let account = synesis_billing::ledger::Account {
        id: account_id,
        tier: Tier::Managed,
    };
    let (prices, rules) = (PriceTable::default(), TierRules::default());
    let mut n: u64 = 0;
    let mut next_id = || {
        n += 1;
        RequestId::from_parts(1_795_000_000_000 + n, [7; 10])
    };
    let credit = next_id();
    db.ledger(|s| top_up(s, account_id, credit, MicroUsd(1_000_000_000_000), now()))
        .unwrap();

    let anchor = rusqlite::Connection::open(dir.path().join("anchor.db")).unwrap();
    anchor.pragma_update(None, "journal_mode", "WAL").unwrap();
    anchor.pragma_update(None, "synchronous", "NORMAL").unwrap();
    anchor
        .execute_batch("CREATE TABLE t (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        .unwrap();

    let mut group = c.benchmark_group("ledger");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("anchor_two_bare_sqlite_transactions", |b| {
        b.iter(|| {
            for _ in 0..2 {
                anchor
                    .execute("INSERT INTO t (body) VALUES (?1)", [[0u8; 200].as_slice()])
                    .unwrap();
            }
        })
    });
    let request = HoldRequest {
        model: "claude-sonnet".into(),
        input_tokens: 1_000,
        max_output_tokens: 250,
    };
    let usage = Usage {
        input_tokens: 1_000,
        output_tokens: 200,
    };
    group.bench_function("settled_charge_hold_then_settle", |b| {
        b.iter(|| {
            let id = next_id();
            let at = now();
            db.ledger(|s| {
                hold(
                    s,
                    account,
                    id,
                    &request,
                    at,
                    HOLD_TTL_DEFAULT_MS,
                    &prices,
                    &rules,
                )
            })
            .unwrap();
            db.ledger(|s| settle(s, account, id, usage, at, &prices, &rules))
                .unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, ledger);
criterion_main!(benches);
