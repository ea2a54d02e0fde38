//! Durable settled charges per second on the cloud's SQLite ledger, against its anchor in the
//! same run: one bare durable SQLite commit (WAL, synchronous=FULL, a one-row insert), the
//! floor any durable write pays on this disk.
//!
//! One settled charge = a hold and a settlement, two ledger operations as an escalation makes
//! them, each answered only once it is on disk. They go through the cloud's `LedgerWriter`
//! (group commit): `settled_charges_512_clients` runs 512 clients at once, as a cloud serving
//! many devices does, with request ids as devices make them (UUID v7: time first);
//! `…_unordered_ids` the same with ids in no order, the worst case for the request index;
//! `settled_charge_1_client` is one client alone (two commits per charge).
//!
//! `cargo bench -p synesis-benches --bench ledger`
#![allow(clippy::expect_used, clippy::unwrap_used)] // a benchmark whose fixture fails stops

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use synesis_billing::ledger::{Account, HOLD_TTL_DEFAULT_MS, HoldRequest, hold, settle, top_up};
use synesis_billing::{MicroUsd, PriceTable, Tier, TierRules, Usage};
use synesis_cloud::ledger::LedgerWriter;
use synesis_cloud::storage::{Accounts, Db};
use synesis_proto::{AccountId, RequestId, UnixMillis};

/// Clients at once: requests in flight on a cloud serving many devices.
const CLIENTS: u64 = 512;

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

/// Fresh request ids for the whole run.
#[derive(Clone)]
struct Ids {
    n: Arc<AtomicU64>,
    ordered: bool,
}

impl Ids {
    /// As devices make them: UUID v7, creation time first, so ids arrive roughly in order and
    /// land at the end of the ledger's request index.
    fn ordered() -> Ids {
        Ids {
            n: Arc::default(),
            ordered: true,
        }
    }

    /// In no order (ids whose time part says nothing): each lands at a random place in the
    /// request index, the worst case for the pages a commit writes.
    fn unordered() -> Ids {
        Ids {
            n: Arc::default(),
            ordered: false,
        }
    }

    fn next(&self) -> RequestId {
        let n = self.n.fetch_add(1, Ordering::Relaxed);
        // The version and variant bits take parts of bytes 0 and 2; n lives in bytes 3..10,
        // standing in for the random bits to keep ids unique.
        let mut rand = [0u8; 10];
        if self.ordered {
            rand[3..].copy_from_slice(&n.to_be_bytes()[1..]);
            RequestId::from_parts(u64::try_from(now().0).unwrap(), rand)
        } else {
            rand[3..].copy_from_slice(&n.to_le_bytes()[..7]);
            RequestId::from_parts(1_795_000_000_000, rand)
        }
    }
}

/// One settled charge: a hold for 1,000 + up to 250 tokens of Sonnet, settled at 1,000 + 200.
async fn settled_charge(ledger: &LedgerWriter, account: Account, id: RequestId) {
    let (prices, rules) = (PriceTable::default(), TierRules::default());
    let request = HoldRequest {
        model: "claude-sonnet".into(),
        device: None,
        input_tokens: 1_000,
        max_output_tokens: 250,
        request_body: None,
    };
    let at = now();
    ledger
        .run(move |s| {
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
        .await
        .unwrap();
    let usage = Usage {
        input_tokens: 1_000,
        output_tokens: 200,
    };
    let (prices, rules) = (PriceTable::default(), TierRules::default());
    ledger
        .run(move |s| settle(s, account, id, usage, at, &prices, &rules))
        .await
        .unwrap();
}

fn ledger(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let mut db = Db::open(&path).unwrap();
    let id = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
    db.create_account(id, "bench", Tier::Managed, now())
        .unwrap();
    let account = Account {
        id,
        tier: Tier::Managed,
    };
    let ids = Ids::ordered();
    let credit = ids.next();
    synesis_cloud::ledger::transaction(&mut db, |s| {
        top_up(s, id, credit, MicroUsd(1_000_000_000_000), now())
    })
    .unwrap();
    let writer = LedgerWriter::open(&path).unwrap();

    let anchor = rusqlite::Connection::open(dir.path().join("anchor.db")).unwrap();
    anchor.pragma_update(None, "journal_mode", "WAL").unwrap();
    anchor.pragma_update(None, "synchronous", "FULL").unwrap();
    anchor
        .execute_batch("CREATE TABLE t (seq INTEGER PRIMARY KEY, body BLOB NOT NULL)")
        .unwrap();

    let mut group = c.benchmark_group("ledger");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(10));
    group.bench_function("anchor_one_durable_sqlite_commit", |b| {
        b.iter(|| {
            anchor
                .execute("INSERT INTO t (body) VALUES (?1)", [[0u8; 200].as_slice()])
                .unwrap();
        })
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    group.bench_function("settled_charge_1_client", |b| {
        b.iter(|| rt.block_on(settled_charge(&writer, account, ids.next())))
    });
    for (name, ids) in [
        (format!("settled_charges_{CLIENTS}_clients"), ids.clone()),
        (
            format!("settled_charges_{CLIENTS}_clients_unordered_ids"),
            Ids::unordered(),
        ),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let left = Arc::new(AtomicU64::new(iters));
                let start = Instant::now();
                rt.block_on(async {
                    let mut clients = tokio::task::JoinSet::new();
                    for _ in 0..CLIENTS {
                        let (left, writer, ids) = (Arc::clone(&left), writer.clone(), ids.clone());
                        clients.spawn(async move {
                            while left
                                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                    n.checked_sub(1)
                                })
                                .is_ok()
                            {
                                settled_charge(&writer, account, ids.next()).await;
                            }
                        });
                    }
                    clients.join_all().await;
                });
                start.elapsed()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, ledger);
criterion_main!(benches);
