//! Accounts, setup tokens, devices, certificates, presence and vouchers behave the same on both
//! backends: one scenario, run on SQLite (a file in a temporary directory) and on PostgreSQL (a
//! database of its own on `SYNESIS_TEST_POSTGRES`; see `support/postgres.rs`). Then two
//! enrollments racing with one setup token on each: exactly one device.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

#[path = "support/postgres.rs"]
mod support;

use synesis_cloud::storage::{
    Accounts, Db, Devices, EnrollError, Enrolled, Enrollment, IssuedCert, Nodes, Presence, Renewal,
    StorageError, Vouchers,
};
use synesis_proto::message::{Role, Tier};
use synesis_proto::{AccountId, DeviceId, MicroUsd, RequestId, Sha256, UnixMillis};

const SECRET: [u8; 32] = [9; 32];

fn device_id(n: u8) -> DeviceId {
    DeviceId::try_from_uuid(uuid::Uuid::from_u128(1_000 + u128::from(n))).unwrap()
}

fn request(n: u8) -> RequestId {
    RequestId::from_parts(1, [n; 10])
}

/// Enrolls device `n` with token `[token; 16]`, as request `n`, at `now`.
fn enroll(
    store: &mut impl Devices,
    token: u8,
    secret: &[u8; 32],
    n: u8,
    name: &str,
    now: i64,
) -> Result<Enrolled, EnrollError> {
    store.enroll(
        &Enrollment {
            token_id: [token; 16],
            secret,
            request: request(n),
            device_name: name,
            new_device_id: device_id(n),
        },
        UnixMillis(now),
        &mut |_| {
            Ok(IssuedCert {
                der: vec![n; 8],
                not_after: UnixMillis(1_000_000),
            })
        },
    )
}

fn cert_sha(der: &[u8]) -> Sha256 {
    use sha2::Digest;
    Sha256(sha2::Sha256::digest(der).into())
}

/// Everything the registry promises, on one store.
fn scenario(store: &mut (impl Accounts + Devices + Nodes + Vouchers)) {
    let acme = AccountId::try_from_uuid(uuid::Uuid::from_u128(7)).unwrap();
    let made = store
        .create_account(acme, "acme", Tier::Free, UnixMillis(0))
        .unwrap();
    assert_eq!((made.id, made.tier), (acme, Tier::Free));
    let other = AccountId::try_from_uuid(uuid::Uuid::from_u128(8)).unwrap();
    assert!(matches!(
        store.create_account(other, "acme", Tier::Managed, UnixMillis(0)),
        Err(StorageError::AccountExists(name)) if name == "acme"
    ));
    store.set_tier("acme", Tier::Managed).unwrap();
    assert_eq!(store.account_by_name("acme").unwrap().tier, Tier::Managed);
    assert_eq!(store.account_by_id(acme).unwrap().name, "acme");
    assert!(matches!(
        store.account_by_name("nobody"),
        Err(StorageError::NoSuchAccount(_))
    ));
    assert!(matches!(
        store.set_tier("nobody", Tier::Free),
        Err(StorageError::NoSuchAccount(_))
    ));

    // Setup tokens: for the owner (no member named), or for a member that exists.
    store
        .create_token(
            acme,
            [1; 16],
            &SECRET,
            None,
            UnixMillis(0),
            UnixMillis(1_000),
        )
        .unwrap();
    store
        .create_token(
            acme,
            [2; 16],
            &SECRET,
            Some("acme"),
            UnixMillis(0),
            UnixMillis(1_000),
        )
        .unwrap();
    assert!(matches!(
        store.create_token(acme, [3; 16], &SECRET, Some("ada"), UnixMillis(0), UnixMillis(1_000)),
        Err(StorageError::NoSuchMember(name)) if name == "ada"
    ));

    // Enrollment: refusals first, then one device, and the same answer to the same request.
    assert!(matches!(
        enroll(store, 1, &[0; 32], 1, "laptop", 10),
        Err(EnrollError::Invalid)
    ));
    assert!(matches!(
        enroll(store, 4, &SECRET, 1, "laptop", 10),
        Err(EnrollError::Invalid)
    ));
    assert!(matches!(
        enroll(store, 1, &SECRET, 1, "laptop", 1_000),
        Err(EnrollError::Expired)
    ));
    assert!(matches!(
        enroll(store, 1, &SECRET, 1, &"x".repeat(256), 10),
        Err(EnrollError::BadRequest(_))
    ));
    let first = enroll(store, 1, &SECRET, 1, " lap\u{1b}top ", 10).unwrap();
    assert_eq!(
        (
            first.device_id,
            first.account_id,
            first.account_name.as_str()
        ),
        (device_id(1), acme, "acme")
    );
    let again = enroll(store, 1, &SECRET, 1, "laptop", 20).unwrap();
    assert_eq!(
        (again.device_id, again.cert_der),
        (device_id(1), first.cert_der.clone())
    );
    assert!(matches!(
        enroll(store, 1, &SECRET, 2, "laptop", 20),
        Err(EnrollError::Used)
    ));
    assert!(matches!(
        enroll(store, 2, &SECRET, 1, "laptop", 20),
        Err(EnrollError::RequestReused)
    ));

    // The device, by id and by certificate: the owner's, live.
    let by_id = store.device(device_id(1)).unwrap().unwrap();
    assert_eq!(
        (by_id.account_id, by_id.role, by_id.revoked),
        (acme, Role::Owner, false)
    );
    let by_cert = store
        .device_by_cert(&cert_sha(&first.cert_der))
        .unwrap()
        .unwrap();
    assert_eq!(by_cert.id, device_id(1));
    assert!(store.device(device_id(9)).unwrap().is_none());
    assert!(store.device_by_cert(&Sha256([0; 32])).unwrap().is_none());

    // Renewals: issued once per request, at most `max` since `since`.
    let renewed = |n: u8| IssuedCert {
        der: vec![100 + n; 8],
        not_after: UnixMillis(2_000_000),
    };
    let renew = |store: &mut dyn FnMut(RequestId, IssuedCert) -> Renewal, r: u8| {
        store(request(50 + r), renewed(r))
    };
    let mut renew_on = |r: RequestId, cert: IssuedCert| {
        store
            .renew_cert(device_id(1), r, UnixMillis(100), cert, (UnixMillis(50), 2))
            .unwrap()
    };
    assert!(matches!(renew(&mut renew_on, 1), Renewal::Issued(c) if c.der == vec![101; 8]));
    // The same request again: the certificate it was given, not the new one offered.
    assert!(matches!(
        renew_on(request(51), renewed(7)),
        Renewal::Issued(c) if c.der == vec![101; 8]
    ));
    assert!(matches!(renew(&mut renew_on, 2), Renewal::Issued(_)));
    assert!(matches!(renew(&mut renew_on, 3), Renewal::TooMany));
    let renewed_device = store.device_by_cert(&cert_sha(&[102; 8])).unwrap().unwrap();
    assert_eq!(renewed_device.id, device_id(1));

    // Presence, as node n1's heartbeat recorder writes it, and what a restart resets.
    store
        .record_presence(
            "n1",
            &[
                Presence::Connected {
                    device: device_id(1),
                    heartbeat_interval_ms: 5_000,
                    at: UnixMillis(200),
                },
                Presence::Seen {
                    device: device_id(1),
                    at: UnixMillis(205),
                    rtt_us: 1_234,
                    vitals_json: "{\"cpu\":1}".into(),
                },
                Presence::Prewarm {
                    device: device_id(1),
                    prewarm_json: "{\"model\":\"m\"}".into(),
                },
            ],
        )
        .unwrap();
    let rows = store.devices().unwrap();
    assert_eq!(rows.len(), 1);
    let row = &rows[0];
    assert_eq!(
        (
            row.id,
            row.account.as_str(),
            row.name.as_str(),
            row.connected,
            row.last_seen_at,
            row.heartbeat_interval_ms,
            row.rtt_us,
        ),
        (
            device_id(1),
            "acme",
            "lap top",
            true,
            Some(UnixMillis(205)),
            Some(5_000),
            Some(1_234)
        )
    );
    assert_eq!(row.vitals_json.as_deref(), Some("{\"cpu\":1}"));
    assert_eq!(row.prewarm_json.as_deref(), Some("{\"model\":\"m\"}"));
    assert_eq!(row.node.as_deref(), Some("n1"));
    // A node starting resets only the devices of nodes not serving: n1 serves until 10 s after
    // its heartbeat.
    store
        .node_seen("n1", "127.0.0.1:1", UnixMillis(0), UnixMillis(1_000))
        .unwrap();
    store.reset_connections(UnixMillis(11_000)).unwrap();
    assert!(store.devices().unwrap()[0].connected, "n1 still serves");
    store.reset_connections(UnixMillis(11_001)).unwrap();
    let row = &store.devices().unwrap()[0];
    assert!(!row.connected && row.node.is_none(), "n1 is dead: {row:?}");
    // A device that moved from n1 to n2 stays online when n1 reports it gone, late.
    let connected = |at| Presence::Connected {
        device: device_id(1),
        heartbeat_interval_ms: 5_000,
        at: UnixMillis(at),
    };
    store.record_presence("n1", &[connected(250)]).unwrap();
    store.record_presence("n2", &[connected(260)]).unwrap();
    let gone = |at| Presence::Disconnected {
        device: device_id(1),
        at: UnixMillis(at),
    };
    store.record_presence("n1", &[gone(270)]).unwrap();
    let row = &store.devices().unwrap()[0];
    assert!(
        row.connected && row.node.as_deref() == Some("n2"),
        "{row:?}"
    );
    store.record_presence("n2", &[gone(300)]).unwrap();
    let row = &store.devices().unwrap()[0];
    assert!(
        !row.connected && row.last_seen_at == Some(UnixMillis(300)),
        "{row:?}"
    );
    // A node known gone: the devices shown on it are offline.
    // In one write, in order: heartbeats written together still come before a disconnect
    // after them, and after a connect before them.
    let seen = |at| Presence::Seen {
        device: device_id(1),
        at: UnixMillis(at),
        rtt_us: 9,
        vitals_json: "{}".into(),
    };
    store
        .record_presence("n2", &[connected(301), seen(302), gone(303)])
        .unwrap();
    let row = &store.devices().unwrap()[0];
    assert!(
        !row.connected && row.last_seen_at == Some(UnixMillis(303)),
        "{row:?}"
    );
    store
        .record_presence("n2", &[gone(304), seen(305), seen(306)])
        .unwrap();
    let row = &store.devices().unwrap()[0];
    assert!(
        row.connected && row.last_seen_at == Some(UnixMillis(306)),
        "{row:?}"
    );
    assert_eq!(row.rtt_us, Some(9));
    store.record_presence("n3", &[connected(310)]).unwrap();
    store.node_gone("n2").unwrap();
    assert!(store.devices().unwrap()[0].connected, "on n3, not n2");
    store.node_gone("n3").unwrap();
    assert!(!store.devices().unwrap()[0].connected);

    // Revocation: kept the first time, seen by `revoked_since`, refused for no device.
    store.revoke(device_id(1), UnixMillis(400)).unwrap();
    store.revoke(device_id(1), UnixMillis(500)).unwrap();
    assert_eq!(
        store.devices().unwrap()[0].revoked_at,
        Some(UnixMillis(400))
    );
    assert!(store.device(device_id(1)).unwrap().unwrap().revoked);
    assert_eq!(
        store.revoked_since(UnixMillis(400)).unwrap(),
        vec![device_id(1)]
    );
    assert!(store.revoked_since(UnixMillis(401)).unwrap().is_empty());
    assert!(matches!(
        store.revoke(device_id(9), UnixMillis(400)),
        Err(StorageError::NoSuchDevice(_))
    ));
    assert!(matches!(
        store.renew_cert(
            device_id(1),
            request(60),
            UnixMillis(500),
            renewed(9),
            (UnixMillis(0), 9)
        ),
        Ok(Renewal::Revoked)
    ));

    // Vouchers: a code once.
    store
        .create_voucher("CODE-1", MicroUsd(5_000_000), UnixMillis(0))
        .unwrap();
    assert!(
        store
            .create_voucher("CODE-1", MicroUsd(1), UnixMillis(0))
            .is_err()
    );
}

/// Two enrollments with one token at once, from two connections: one device.
fn race(mut a: impl Devices + Send, mut b: impl Devices + Send) {
    let barrier = std::sync::Barrier::new(2);
    let [x, y] = std::thread::scope(|s| {
        let (barrier_a, barrier_b) = (&barrier, &barrier);
        let x = s.spawn(move || {
            barrier_a.wait();
            enroll(&mut a, 5, &SECRET, 20, "one", 10)
        });
        let y = s.spawn(move || {
            barrier_b.wait();
            enroll(&mut b, 5, &SECRET, 21, "two", 10)
        });
        [x.join().unwrap(), y.join().unwrap()]
    });
    let ok = [&x, &y].iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 1, "{x:?} {y:?}");
    assert!(
        [&x, &y].iter().any(|r| matches!(r, Err(EnrollError::Used))),
        "{x:?} {y:?}"
    );
}

fn with_race_token(store: &mut (impl Accounts + Devices)) {
    let account = AccountId::try_from_uuid(uuid::Uuid::from_u128(70)).unwrap();
    store
        .create_account(account, "racers", Tier::Managed, UnixMillis(0))
        .unwrap();
    store
        .create_token(
            account,
            [5; 16],
            &SECRET,
            None,
            UnixMillis(0),
            UnixMillis(1_000),
        )
        .unwrap();
}

#[test]
fn the_registry_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = Db::open(&dir.path().join("cloud.db")).unwrap();
    scenario(&mut db);
}

#[test]
fn the_registry_on_postgres() {
    let Some((mut pg, _)) = support::fresh_database() else {
        return;
    };
    scenario(&mut pg);
}

#[test]
fn one_setup_token_used_at_once_twice_makes_one_device_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud.db");
    let mut db = Db::open(&path).unwrap();
    with_race_token(&mut db);
    race(db, Db::open(&path).unwrap());
}

#[test]
fn one_setup_token_used_at_once_twice_makes_one_device_on_postgres() {
    let Some((mut pg, url)) = support::fresh_database() else {
        return;
    };
    with_race_token(&mut pg);
    let other = synesis_cloud::storage::postgres::Pg::open(&url).unwrap();
    race(pg, other);
}
