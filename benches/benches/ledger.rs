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
//! The limit itself is the second anchor, `anchor_bare_sqlite_batch_<n>`: bare SQLite writing
//! the rows a settled charge writes (a hold entry, its open hold and the account's totals; then
//! the settlement entry, the hold gone, the totals again) into the same schema with the same
//! pragmas, `n` charges per transaction — with no ledger rules, hashing, queue or tasks. Group
//! commit under 512 clients cannot beat the batch size it reaches; the ratio to these says what
//! the ledger's own work costs.
//!
//! The group `ledger_postgres` is the same on PostgreSQL (`SYNESIS_TEST_POSTGRES` names the
//! server; `scripts/postgres.sh start DIR` makes one; without it the group is skipped, saying
//! so): the cloud's PostgreSQL writer (`storage::postgres::ledger`) at 1 and 512 clients,
//! against `anchor_bare_postgres_batch_<n>`, bare PostgreSQL inserting the rows a settled charge
//! writes, `n` charges per transaction, as four array statements per transaction (the fewest
//! round trips those rows can take), with no ledger rules, hashing, locks or queue.
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

/// [`CLIENTS`] clients at once settle `iters` charges between them, each charge with a fresh
/// request id (`charge` makes it); how long that took.
fn clients<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, charge: F, ids: &Ids) -> Duration
where
    F: Fn(RequestId) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let left = Arc::new(AtomicU64::new(iters));
    let start = Instant::now();
    rt.block_on(async {
        let mut clients = tokio::task::JoinSet::new();
        for _ in 0..CLIENTS {
            let (left, charge, ids) = (Arc::clone(&left), charge.clone(), ids.clone());
            clients.spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    charge(ids.next()).await;
                }
            });
        }
        clients.join_all().await;
    });
    start.elapsed()
}

/// One settled charge: a hold for 1,000 + up to 250 tokens of Sonnet, settled at 1,000 + 200.
/// `batch` settled charges' rows in bare SQLite: the holds in one transaction, then the
/// settlements in another (as the writer commits the holds of a batch of clients together,
/// then their settlements).
/// `next_seq` is the account's chain head (the key is `(account_id, seq)`).
fn bare_charges(
    conn: &mut rusqlite::Connection,
    account: &str,
    next_seq: &mut i64,
    ids: &Ids,
    batch: usize,
) {
    let requests: Vec<String> = (0..batch).map(|_| ids.next().to_string()).collect();
    let at = now().0;
    let hash = [0x5au8; 32];
    let body = [0x11u8; 96];
    for settle in [false, true] {
        let tx = conn.transaction().unwrap();
        {
            let mut entry = tx
                .prepare_cached(
                    "INSERT INTO ledger_entries (account_id, seq, request_id, kind, model, device_id,
                       input_tokens, output_tokens, amount, quota_tokens, body, at, expires_at,
                       prev_hash, hash)
                     VALUES (?1, ?9, ?2, ?3, 'claude-sonnet', NULL, 1000, 250, 6180, 0, ?4, ?5, ?6,
                       ?7, ?8)",
                )
                .unwrap();
            let mut hold = tx
                .prepare_cached(
                    "INSERT INTO ledger_open_holds (account_id, request_id, seq, amount,
                       quota_tokens, expires_at) VALUES (?1, ?2, ?4, 6180, 0, ?3)",
                )
                .unwrap();
            let mut release = tx
                .prepare_cached(
                    "DELETE FROM ledger_open_holds WHERE account_id = ?1 AND request_id = ?2",
                )
                .unwrap();
            let mut totals = tx
                .prepare_cached(
                    "UPDATE ledger_totals SET balance = balance - 1, open_held = open_held + 1
                     WHERE account_id = ?1",
                )
                .unwrap();
            for request in &requests {
                let kind = if settle { 3 } else { 2 };
                let expires = if settle { None } else { Some(at + 60_000) };
                entry
                    .execute(rusqlite::params![
                        account,
                        request,
                        kind,
                        body.as_slice(),
                        at,
                        expires,
                        hash.as_slice(),
                        hash.as_slice(),
                        *next_seq
                    ])
                    .unwrap();
                if settle {
                    release.execute([account, request.as_str()]).unwrap();
                } else {
                    hold.execute(rusqlite::params![account, request, at + 60_000, *next_seq])
                        .unwrap();
                }
                *next_seq += 1;
                totals.execute([account]).unwrap();
            }
        }
        tx.commit().unwrap();
    }
}

async fn settled_charge(ledger: &LedgerWriter, account: Account, id: RequestId) {
    let (request, usage) = charge_shape();
    let at = now();
    ledger
        .run(move |s| {
            let (prices, rules) = (PriceTable::default(), TierRules::default());
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
    ledger
        .run(move |s| {
            let (prices, rules) = (PriceTable::default(), TierRules::default());
            settle(s, account, id, usage, at, &prices, &rules)
        })
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

    // The limit: the same schema and pragmas as the ledger's writer, driven bare.
    let bare_path = dir.path().join("bare.db");
    let bare_id = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
    Db::open(&bare_path)
        .unwrap()
        .create_account(bare_id, "bare", Tier::Managed, now())
        .unwrap();
    let mut bare = rusqlite::Connection::open(&bare_path).unwrap();
    bare.pragma_update(None, "journal_mode", "WAL").unwrap();
    bare.pragma_update(None, "synchronous", "FULL").unwrap();
    bare.pragma_update(None, "cache_size", -65_536).unwrap();
    bare.pragma_update(None, "wal_autocheckpoint", 10_000)
        .unwrap();
    bare.execute(
        "INSERT OR IGNORE INTO ledger_totals (account_id, balance, quota_settled, open_held, open_quota)
         VALUES (?1, 1000000000000, 0, 0, 0)",
        [bare_id.to_string()],
    )
    .unwrap();
    let bare_account = bare_id.to_string();
    let mut bare_seq = 0i64;

    let mut group = c.benchmark_group("ledger");
    group.measurement_time(Duration::from_secs(10));
    for batch in [1usize, 64, 512] {
        group.throughput(Throughput::Elements(batch as u64));
        let bare_ids = Ids::ordered();
        group.bench_function(format!("anchor_bare_sqlite_batch_{batch}"), |b| {
            b.iter(|| bare_charges(&mut bare, &bare_account, &mut bare_seq, &bare_ids, batch));
        });
    }
    group.throughput(Throughput::Elements(1));
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
                let writer = writer.clone();
                let charge = move |id| {
                    let writer = writer.clone();
                    async move { settled_charge(&writer, account, id).await }
                };
                clients(&rt, iters, charge, &ids)
            })
        });
    }
    group.finish();
}

/// Bare PostgreSQL's statements, prepared once (a statement prepared on the fly costs a round
/// trip, and pipelined ones would no longer reach the server in order).
struct BareStatements {
    entries: tokio_postgres::Statement,
    open: tokio_postgres::Statement,
    close: tokio_postgres::Statement,
    totals: tokio_postgres::Statement,
}

impl BareStatements {
    async fn prepare(c: &tokio_postgres::Client) -> BareStatements {
        BareStatements {
            entries: c
                .prepare(
                    "INSERT INTO ledger_entries (seq, account_id, request_id, kind, model, device_id,
                       input_tokens, output_tokens, amount, quota_tokens, body, at, expires_at, prev_hash, hash)
                     SELECT s, a, r, k, 'claude-sonnet', NULL, 1000, 250, 6180, 0, b, $6, e, h, h
                     FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bytea[],
                        $7::bigint[], $8::bytea[]) AS x (s, a, r, k, b, e, h)",
                )
                .await
                .unwrap(),
            open: c
                .prepare(
                    "INSERT INTO ledger_open_holds (account_id, request_id, seq, amount, quota_tokens, expires_at)
                     SELECT a, r, s, 6180, 0, $4 FROM UNNEST($1::text[], $2::text[], $3::bigint[]) AS x (a, r, s)",
                )
                .await
                .unwrap(),
            close: c
                .prepare(
                    "DELETE FROM ledger_open_holds h USING UNNEST($1::text[], $2::text[]) AS d (a, r)
                     WHERE h.account_id = d.a AND h.request_id = d.r",
                )
                .await
                .unwrap(),
            totals: c
                .prepare(
                    "UPDATE ledger_totals SET balance = balance - 1, open_held = open_held + 1
                     WHERE account_id = $1",
                )
                .await
                .unwrap(),
        }
    }
}

/// `batch` settled charges' rows in bare PostgreSQL: the holds in one transaction (entries,
/// open holds, the totals), then the settlements in another (entries, holds gone, totals),
/// each transaction's statements pipelined.
async fn bare_pg_charges(
    client: &tokio_postgres::Client,
    statements: &BareStatements,
    account: &str,
    next_seq: &mut i64,
    ids: &Ids,
    batch: usize,
) {
    type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);
    let requests: Vec<String> = (0..batch).map(|_| ids.next().to_string()).collect();
    let at = now().0;
    let accounts = vec![account.to_owned(); batch];
    let hash = vec![vec![0x5au8; 32]; batch];
    let body = vec![vec![0x11u8; 32]; batch];
    let expiry = at + 60_000;
    for settle in [false, true] {
        let seqs: Vec<i64> = (0..batch as i64).map(|n| *next_seq + n).collect();
        *next_seq += batch as i64;
        let kind = vec![if settle { 3i64 } else { 2 }; batch];
        let expires: Vec<Option<i64>> = vec![(!settle).then_some(expiry); batch];
        let entry_params: [Param<'_>; 8] = [
            &seqs, &accounts, &requests, &kind, &body, &at, &expires, &hash,
        ];
        let open_params: [Param<'_>; 4] = [&accounts, &requests, &seqs, &expiry];
        let close_params: [Param<'_>; 2] = [&accounts, &requests];
        let totals_params: [Param<'_>; 1] = [&account];
        let (holds, params) = if settle {
            (&statements.close, &close_params[..])
        } else {
            (&statements.open, &open_params[..])
        };
        tokio::try_join!(
            client.batch_execute("BEGIN"),
            client.execute(&statements.entries, &entry_params),
            client.execute(holds, params),
            client.execute(&statements.totals, &totals_params),
            client.batch_execute("COMMIT"),
        )
        .unwrap();
    }
}

/// The same charges on PostgreSQL, when `SYNESIS_TEST_POSTGRES` names a server.
fn ledger_postgres(c: &mut Criterion) {
    use synesis_cloud::storage::postgres::ledger::PgLedgerWriter;
    use synesis_cloud::storage::postgres::{Pg, create_database};

    let Some(server) = std::env::var("SYNESIS_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.is_empty())
    else {
        eprintln!("ledger_postgres: SKIPPED, SYNESIS_TEST_POSTGRES names no PostgreSQL server");
        return;
    };
    let suffix = uuid::Uuid::now_v7().simple().to_string();
    let url = create_database(&server, &format!("synesis_bench_{suffix}")).unwrap();
    let bare_url = create_database(&server, &format!("synesis_bench_bare_{suffix}")).unwrap();
    drop(Pg::open(&url).unwrap());
    drop(Pg::open(&bare_url).unwrap());
    let writer = PgLedgerWriter::open(&url).unwrap();
    let id = AccountId::try_from_uuid(uuid::Uuid::now_v7()).unwrap();
    let account = Account {
        id,
        tier: Tier::Managed,
    };
    let ids = Ids::ordered();
    let credit = ids.next();
    writer
        .run_blocking(move |s| top_up(s, id, credit, MicroUsd(1_000_000_000_000), now()))
        .unwrap();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bare_account = uuid::Uuid::now_v7().to_string();
    let (bare, bare_statements) = rt.block_on(async {
        let (client, connection) = tokio_postgres::connect(&bare_url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(connection);
        client
            .execute(
                "INSERT INTO ledger_totals (account_id, balance, quota_settled, open_held, open_quota)
                 VALUES ($1, 1000000000000, 0, 0, 0)",
                &[&bare_account],
            )
            .await
            .unwrap();
        let statements = BareStatements::prepare(&client).await;
        (client, statements)
    });
    let mut bare_seq = 0i64;

    let mut group = c.benchmark_group("ledger_postgres");
    group.measurement_time(Duration::from_secs(10));
    for batch in [1usize, 64, 512] {
        group.throughput(Throughput::Elements(batch as u64));
        let bare_ids = Ids::ordered();
        group.bench_function(format!("anchor_bare_postgres_batch_{batch}"), |b| {
            b.iter(|| {
                rt.block_on(bare_pg_charges(
                    &bare,
                    &bare_statements,
                    &bare_account,
                    &mut bare_seq,
                    &bare_ids,
                    batch,
                ))
            });
        });
    }
    group.throughput(Throughput::Elements(1));
    group.bench_function("settled_charge_1_client", |b| {
        b.iter(|| rt.block_on(settled_charge_on(&writer, account, ids.next())))
    });
    group.bench_function(format!("settled_charges_{CLIENTS}_clients"), |b| {
        b.iter_custom(|iters| {
            let writer = writer.clone();
            let charge = move |id| {
                let writer = writer.clone();
                async move { settled_charge_on(&writer, account, id).await }
            };
            clients(&rt, iters, charge, &ids)
        })
    });
    group.finish();
}

/// [`settled_charge`] through the PostgreSQL writer.
async fn settled_charge_on(
    ledger: &synesis_cloud::storage::postgres::ledger::PgLedgerWriter,
    account: Account,
    id: RequestId,
) {
    let (request, usage) = charge_shape();
    let at = now();
    ledger
        .run_keyed(account.id, id, move |s| {
            let (prices, rules) = (PriceTable::default(), TierRules::default());
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
    ledger
        .run_keyed(account.id, id, move |s| {
            let (prices, rules) = (PriceTable::default(), TierRules::default());
            settle(s, account, id, usage, at, &prices, &rules)
        })
        .await
        .unwrap();
}

/// What one settled charge asks for and uses.
fn charge_shape() -> (HoldRequest, Usage) {
    (
        HoldRequest {
            model: "claude-sonnet".into(),
            device: None,
            input_tokens: 1_000,
            max_output_tokens: 250,
            request_body: None,
        },
        Usage {
            input_tokens: 1_000,
            output_tokens: 200,
        },
    )
}

criterion_group!(benches, ledger, ledger_postgres);
criterion_main!(benches);
