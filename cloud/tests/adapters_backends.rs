//! Adapter uploads, the content an account holds and the names pointing to it behave the same
//! on both backends: one scenario, run on SQLite (a file in a temporary directory) and on
//! PostgreSQL (a database of its own on `SYNESIS_TEST_POSTGRES`; see `support/postgres.rs`),
//! each step's outcome written down and the two transcripts compared. Then uploads begun at once
//! against a limit of one in progress: exactly one admitted, on each.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "support/postgres.rs"]
mod support;

use synesis_cloud::storage::adapters::{Begun, Declared, Quota, Removed};
use synesis_cloud::storage::postgres::Pg;
use synesis_cloud::storage::{Accounts, AdapterChanges, AdapterStore, Db};
use synesis_proto::message::Tier;
use synesis_proto::{AccountId, DeviceId, RequestId, Sha256, UnixMillis};

/// A backend as the handlers see it: its changes, and its reads (on SQLite, through a unit).
trait Backend: Accounts + AdapterChanges {
    fn reads(&self) -> impl AdapterStore + '_;
}

impl Backend for Db {
    fn reads(&self) -> impl AdapterStore + '_ {
        self.unit()
    }
}

impl Backend for Pg {
    fn reads(&self) -> impl AdapterStore + '_ {
        self.clone()
    }
}

fn id(n: u8) -> RequestId {
    RequestId::from_digest([n; 16])
}

fn declared(name: &str, sha: u8, size_bytes: u64) -> Declared {
    Declared {
        name: name.into(),
        base_model: "tiny".into(),
        size_bytes,
        sha256: Sha256([sha; 32]),
        chunk_size: 65_536,
    }
}

const QUOTA: Quota = Quota {
    uploads_in_progress: 2,
    storage_bytes: 1_000_000,
};

fn account(n: u128) -> AccountId {
    AccountId::try_from_uuid(uuid::Uuid::from_u128(n)).unwrap()
}

/// Everything the adapter records promise, on one store: what each step came to.
fn scenario(store: &mut impl Backend) -> Vec<String> {
    let acme = account(7);
    let device = DeviceId::try_from_uuid(uuid::Uuid::from_u128(2)).unwrap();
    store
        .create_account(acme, "acme", Tier::Managed, UnixMillis(0))
        .unwrap();
    let mut said = Vec::new();
    let begin = |store: &mut dyn AdapterChanges, n: u8, d: &Declared, at: i64, since: i64| {
        let begun = store
            .begin_upload(
                acme,
                id(n),
                device,
                d,
                QUOTA,
                UnixMillis(at),
                UnixMillis(since),
            )
            .unwrap();
        match &begun {
            Begun::Upload(row, superseded) => {
                format!("upload {n}: held {:?}, superseded {superseded:?}", row.held)
            }
            other => format!("upload {n}: {other:?}"),
        }
    };
    let legal = declared("legal", 1, 200_000); // 4 chunks
    said.push(begin(store, 1, &legal, 1_000, 0));
    said.push(begin(store, 1, &legal, 1_001, 0)); // the same again: the same upload
    said.push(begin(store, 1, &declared("legal", 2, 200_000), 1_002, 0)); // another: a conflict
    said.push(begin(store, 2, &declared("legal", 2, 200_000), 1_500, 900)); // busy
    said.push(begin(store, 3, &declared("medical", 3, 100_000), 1_600, 0));
    said.push(begin(store, 4, &declared("finance", 4, 100_000), 1_700, 0)); // a third: too many
    said.push(begin(
        store,
        5,
        &declared("legal", 5, 950_000),
        200_000,
        100_000,
    )); // supersedes 1; no room
    said.push(begin(
        store,
        6,
        &declared("legal", 6, 200_000),
        200_000,
        100_000,
    )); // supersedes 1

    // Chunks recorded from two streams: bits only ever added.
    store
        .record_chunks(acme, id(6), &[0b0101], 2, UnixMillis(200_100))
        .unwrap();
    store
        .record_chunks(acme, id(6), &[0b1010], 3, UnixMillis(200_200))
        .unwrap();
    let row = store.reads().upload(acme, id(6)).unwrap().unwrap();
    said.push(format!("upload 6: {row:?}"));
    store
        .complete_upload(acme, id(6), device, &row.declared, UnixMillis(200_300))
        .unwrap();
    store // a replay moves nothing
        .complete_upload(acme, id(6), device, &row.declared, UnixMillis(200_400))
        .unwrap();
    let reads = store.reads();
    said.push(format!("adapters: {:?}", reads.adapters(acme).unwrap()));
    said.push(format!(
        "holds: {} {}",
        reads
            .holds_content(acme, &Sha256([6; 32]), 200_000)
            .unwrap(),
        reads.holds_content(acme, &Sha256([6; 32]), 1).unwrap()
    ));
    drop(reads);
    // The same content under another name: nothing to send.
    said.push(begin(
        store,
        7,
        &declared("legal-v2", 6, 200_000),
        200_500,
        0,
    ));
    store
        .complete_upload(
            acme,
            id(7),
            device,
            &declared("legal-v2", 6, 200_000),
            UnixMillis(200_600),
        )
        .unwrap();
    store.reads().discard_upload(acme, id(3)).unwrap();
    said.push(format!(
        "discarded 3: {:?}",
        store.reads().upload(acme, id(3)).unwrap()
    ));

    // Removing names, once per request id; the content is released when no name is left.
    for (n, name) in [(8, "legal"), (8, "legal"), (8, "legal-v2"), (9, "nothing")] {
        let removed = store
            .remove_adapter(acme, id(n), name, UnixMillis(300_000))
            .unwrap();
        said.push(format!("remove {name} as {n}: {removed:?}"));
    }
    assert!(matches!(
        store
            .remove_adapter(acme, id(10), "legal-v2", UnixMillis(300_100))
            .unwrap(),
        Removed::Removed(_)
    ));
    said.push(format!(
        "summaries: {:?}",
        store.reads().upload_summaries().unwrap()
    ));
    let swept = store
        .sweep_uploads(UnixMillis(250_000), UnixMillis(400_000))
        .unwrap();
    said.push(format!("swept: {:?} {:?}", swept.uploads, swept.blobs));
    said.push(format!(
        "summaries: {:?}",
        store.reads().upload_summaries().unwrap()
    ));
    said
}

#[test]
fn adapters_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let said = scenario(&mut Db::open(&dir.path().join("cloud.db")).unwrap());
    let expected_starts = [
        "upload 1: held [0], superseded []",
        "upload 1: held [0], superseded []",
        "upload 1: Conflict",
        "upload 2: Busy",
        "upload 3: held [0]",
        "upload 4: TooMany(2)",
        "upload 5: NoRoom(",
        "upload 6: held [0], superseded [",
    ];
    for (said, start) in said.iter().zip(expected_starts) {
        assert!(said.starts_with(start), "{said:?} is not {start:?}…");
    }
    let said = said.join("\n");
    for expected in [
        "holds: true false",
        "upload 7: held [15], superseded []",
        "discarded 3: None",
        "remove legal as 8: Removed(",
        "remove legal-v2 as 8: Conflict",
        "remove nothing as 9: NotFound",
    ] {
        assert!(said.contains(expected), "{expected:?} not in\n{said}");
    }
}

#[test]
fn adapters_on_postgres_as_on_sqlite() {
    support::same_on_both(scenario, scenario);
}

/// Uploads begun at once, each of another name, against a limit of one in progress: one is
/// admitted, the others are told there are too many. Rounds of `n` at once, on handles `made`
/// makes on one database.
fn begun_at_once<B: Backend + Send>(made: impl Fn() -> B) {
    let quota = Quota {
        uploads_in_progress: 1,
        storage_bytes: 1 << 30,
    };
    let device = DeviceId::try_from_uuid(uuid::Uuid::from_u128(2)).unwrap();
    for round in 0..8u8 {
        let acct = account(100 + u128::from(round));
        made()
            .create_account(acct, &format!("a{round}"), Tier::Managed, UnixMillis(0))
            .unwrap();
        let mut handles: Vec<B> = (0..3).map(|_| made()).collect();
        let start = std::sync::Barrier::new(handles.len());
        let admitted = std::thread::scope(|s| {
            let runs: Vec<_> = handles
                .iter_mut()
                .enumerate()
                .map(|(n, store)| {
                    let start = &start;
                    s.spawn(move || {
                        let n = u8::try_from(n).unwrap();
                        let d = declared(&format!("name{n}"), n, 1_000);
                        start.wait();
                        store
                            .begin_upload(
                                acct,
                                id(n),
                                device,
                                &d,
                                quota,
                                UnixMillis(1),
                                UnixMillis(0),
                            )
                            .unwrap()
                    })
                })
                .collect();
            runs.into_iter()
                .map(|r| r.join().unwrap())
                .filter(|b| matches!(b, Begun::Upload(..)))
                .count()
        });
        assert_eq!(admitted, 1, "round {round}");
    }
}

#[test]
fn one_upload_admitted_of_several_at_once_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    Db::open(&path).unwrap();
    begun_at_once(|| Db::open(&path).unwrap());
}

#[test]
fn one_upload_admitted_of_several_at_once_on_postgres() {
    let Some((pg, _)) = support::fresh_database() else {
        return;
    };
    begun_at_once(|| pg.clone());
}
