//! Issue 10's security items, tried the way an attacker would: over the wire, with frames and
//! connections made here rather than by the device's own client code.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::wire::{
    ANSWER_TIMEOUT, anonymous_conn, closed_count, closed_with, code_of, device_conn, enrolled,
    exchange, exchange_raw, frame, header, heartbeat, hello, new_id, usage_request,
};
use synesis_e2e::{Cloud, Device, json_of, run_ok, wait_for};
use synesis_proto::message::{DeviceLeave, EnrollRequest, TopupRequest};
use synesis_proto::{Blob, ErrorCode, FrameLimits, Message, MessageType, SetupToken};
use synesis_tunnel::Identity;
use synesis_wire::FramedRecv;

fn renewal(csr_der: Vec<u8>) -> synesis_proto::message::CertRenew {
    synesis_proto::message::CertRenew {
        request_id: new_id(),
        csr_der: Blob(csr_der),
    }
}

fn managed_account_and_device(cloud: &Cloud, account: &str) -> (Device, String) {
    let device = Device::new();
    let id = device.login(&cloud.account_and_token(account));
    run_ok(
        cloud
            .admin()
            .args(["account", "set-tier", account, "managed"]),
    );
    (device, id)
}

/// Holds the write lock on the cloud's database until dropped (an operator's long
/// transaction, or a slow disk).
struct WriteLock;

impl WriteLock {
    fn take(cloud: &Cloud) -> synesis_cloud::storage::WriteLock {
        synesis_cloud::storage::Db::open(&cloud.dir().join("cloud.db"))
            .unwrap()
            .hold_write_lock()
            .unwrap()
    }
}

// Item 1 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_voucher_redeemed_by_one_account_is_refused_to_another_with_the_same_request() {
    let cloud = Cloud::start();
    let (alice, _) = managed_account_and_device(&cloud, "alice");
    let (mallory, _) = managed_account_and_device(&cloud, "mallory");
    let code = cloud.voucher("10.00");
    let topup = TopupRequest {
        request_id: new_id(),
        voucher: code,
    };

    let a = device_conn(&cloud, &alice, Duration::from_secs(5)).await;
    let first = exchange(&a, topup.clone()).await;
    assert!(
        matches!(&first, Some(Message::TopupReply(r)) if r.credited.0 == 10_000_000),
        "{first:?}"
    );
    // The same request from another account: refused, and nothing credited there.
    let m = device_conn(&cloud, &mallory, Duration::from_secs(5)).await;
    let replayed = exchange(&m, topup.clone()).await;
    assert!(
        matches!(
            code_of(&replayed),
            Some(ErrorCode::VOUCHER_INVALID | ErrorCode::IDEMPOTENCY_CONFLICT)
        ),
        "{replayed:?}"
    );
    let usage = json_of(mallory.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(usage["balance_micro_usd"], 0, "{usage}");
    // The redeeming account's retry is still answered from what was done, once.
    let again = exchange(&a, topup).await;
    assert!(
        matches!(&again, Some(Message::TopupReply(r)) if r.balance.0 == 10_000_000),
        "{again:?}"
    );
    let usage = json_of(alice.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(usage["balance_micro_usd"], 10_000_000, "{usage}");
}

// Item 2 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_device_is_closed_even_when_it_never_said_hello() {
    let cloud = Cloud::start();
    let device = Device::new();
    let id = device.login(&cloud.account_and_token("acme"));
    let conn = device_conn(&cloud, &device, Duration::from_secs(1)).await;
    // The connection can read usage: it is a live session of the device.
    let usage = exchange(&conn, usage_request()).await;
    assert!(matches!(usage, Some(Message::UsageReply(_))), "{usage:?}");

    run_ok(cloud.admin().args(["device", "revoke", &id]));
    // Anything asked after the revocation is refused, on any stream...
    let after = exchange(&conn, usage_request()).await;
    assert!(
        !matches!(after, Some(Message::UsageReply(_))),
        "served after revocation: {after:?}"
    );
    // A renewal is refused too.
    let renewal = exchange(&conn, renewal(csr("revoked"))).await;
    assert!(
        !matches!(renewal, Some(Message::CertRenewed(_))),
        "renewed after revocation: {renewal:?}"
    );
    // ...and the connection itself is closed with the code, within seconds.
    assert_eq!(
        closed_with(&conn, Duration::from_secs(5)).await,
        Some(Some(ErrorCode::DEVICE_REVOKED))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_closes_every_connection_of_the_device() {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    let silent = device_conn(&cloud, &device, Duration::from_secs(1)).await;
    let other = device_conn(&cloud, &device, Duration::from_secs(1)).await;
    let left = exchange(
        &other,
        DeviceLeave {
            request_id: new_id(),
        },
    )
    .await;
    assert!(matches!(left, Some(Message::DeviceLeft(_))), "{left:?}");
    assert_eq!(
        closed_with(&silent, Duration::from_secs(5)).await,
        Some(Some(ErrorCode::DEVICE_REVOKED))
    );
}

#[test]
fn a_device_renews_its_certificate_and_connects_after_the_first_one_expired() {
    let mut cloud = Cloud::start_with(&["--cert-lifetime", "24s"]);
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    let cert = device.home().join("data/identity/device.crt.der");
    let first = std::fs::read(&cert).unwrap();
    let (_, first_expiry) = synesis_wire::tls::validity(&first).unwrap();
    let _tunnel = device.tunnel("1s");
    assert!(wait_for(Duration::from_secs(10), || device
        .state()
        .as_deref()
        == Some("connected")));
    // Renewed over the tunnel when a third of the lifetime is left (about 16 s in).
    assert!(
        wait_for(Duration::from_secs(30), || std::fs::read(&cert).unwrap()
            != first),
        "{}",
        device.tunnel_log()
    );
    let renewed = std::fs::read(&cert).unwrap();
    let (_, expiry) = synesis_wire::tls::validity(&renewed).unwrap();
    assert!(expiry > first_expiry);
    // Past the first certificate's end, a new connection (after a cloud restart) must use the
    // renewed one: the first would fail the handshake.
    let wait =
        u64::try_from(first_expiry.0 - synesis_tunnel::clock::unix_now().0 + 1_500).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(wait));
    synesis_e2e::signal(cloud.process.pid(), "KILL");
    cloud.restart();
    assert!(
        wait_for(Duration::from_secs(20), || device.state().as_deref()
            == Some("connected")
            && device.status().unwrap()["reconnects"].as_u64() >= Some(1)),
        "{}",
        device.tunnel_log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_must_be_for_the_devices_own_key_and_due() {
    let (_cloud, device, conn) = enrolled().await;
    let identity = Identity::load(&device.home().join("data"))
        .unwrap()
        .unwrap();
    let own_key = rcgen::KeyPair::try_from(identity.key_der.as_slice()).unwrap();
    let own_csr = csr_for(&own_key, "device");
    // Another key: whoever holds a session must not swap in a key of their own.
    let foreign = exchange(&conn, renewal(csr("thief"))).await;
    assert_eq!(
        code_of(&foreign),
        Some(ErrorCode::INVALID_REQUEST),
        "{foreign:?}"
    );
    // The device's own key, but a certificate with 90 days left: not due.
    let early = exchange(&conn, renewal(own_csr)).await;
    assert_eq!(
        code_of(&early),
        Some(ErrorCode::INVALID_REQUEST),
        "{early:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_device_cannot_open_connections_without_end() {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    let mut conns = Vec::new();
    for _ in 0..12 {
        conns.push(device_conn(&cloud, &device, Duration::from_secs(1)).await);
    }
    // The four over the limit are closed as the cloud gets to them; then none more.
    let limited = closed_count(
        &conns,
        ErrorCode::LIMIT_EXCEEDED,
        4,
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(limited, 4, "12 connections of one device, 8 allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_devices_first_frame_is_small_whatever_the_frame_maximum() {
    let (_cloud, _device, conn) = enrolled().await;
    // A request may open a stream, but not with 300 KiB announced (and never sent): 32 such
    // streams on 8 connections would make the cloud hold 10 MiB frames for each.
    let reply = exchange_raw(&conn, &header(MessageType::UsageRequest, 300 * 1024)).await;
    assert_eq!(
        code_of(&reply),
        Some(ErrorCode::FRAME_OVERSIZE),
        "{reply:?}"
    );
}

// Item 3 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificateless_connections_from_one_source_are_limited() {
    let cloud = Cloud::start();
    run_ok(cloud.admin().args(["account", "create", "acme"]));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut conns = Vec::new();
    for _ in 0..40 {
        conns.push(anonymous_conn(&endpoint, &cloud).await);
    }
    // None of them says anything. Those over the per-source budget (8) are closed at once; the
    // 8 in it keep their slots until the first-frame timeout (10 s), so all 32 others are closed
    // with the code, and no more, unless setting up the 40 took that long.
    let closed = closed_count(
        &conns,
        ErrorCode::LIMIT_EXCEEDED,
        32,
        Duration::from_secs(15),
    )
    .await;
    let timed_out = closed_count(&conns, ErrorCode::UNEXPECTED_MESSAGE, 0, Duration::ZERO).await;
    assert_eq!(
        closed, 32,
        "{closed} of 40 idle anonymous connections were limited, 8 allowed \
         ({timed_out} of those in the budget reached the first-frame timeout meanwhile)"
    );
}

// Item 4 ------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_checks_the_token_before_waiting_for_the_database() {
    let cloud = Cloud::start();
    let token: SetupToken = cloud.account_and_token("acme").parse().unwrap();
    let forged = SetupToken {
        secret: [7; 32],
        ..token
    };
    let _lock = WriteLock::take(&cloud);
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = anonymous_conn(&endpoint, &cloud).await;
    let reply = exchange(
        &conn,
        EnrollRequest {
            request_id: new_id(),
            token_secret: forged.presented_secret(),
            csr_der: Blob(csr("forger")),
            device_name: "forger".into(),
        },
    )
    .await;
    assert_eq!(code_of(&reply), Some(ErrorCode::TOKEN_INVALID), "{reply:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_not_allowed_on_a_stream_is_refused_from_its_type_byte() {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    // A header announcing a 1 MiB payload that never comes.
    let header = |t: MessageType| header(t, 1 << 20);

    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let anonymous = anonymous_conn(&endpoint, &cloud).await;
    let reply = exchange_raw(&anonymous, &header(MessageType::UsageRequest)).await;
    assert_eq!(
        code_of(&reply),
        Some(ErrorCode::UNAUTHENTICATED),
        "{reply:?}"
    );

    let conn = device_conn(&cloud, &device, Duration::from_secs(1)).await;
    let reply = exchange_raw(&conn, &header(MessageType::Heartbeat)).await;
    assert_eq!(
        code_of(&reply),
        Some(ErrorCode::UNEXPECTED_MESSAGE),
        "{reply:?}"
    );

    // On the control stream, after `Hello`: an account request's header ends the connection.
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    tx.write_all(&frame(hello(1_000))).await.unwrap();
    let mut rx = FramedRecv::new(rx, FrameLimits::default());
    let welcome = tokio::time::timeout(ANSWER_TIMEOUT, rx.next())
        .await
        .unwrap();
    assert!(
        matches!(welcome, Ok(Some(Message::Welcome(_)))),
        "{welcome:?}"
    );
    tx.write_all(&header(MessageType::TopupRequest))
        .await
        .unwrap();
    assert_eq!(
        closed_with(&conn, Duration::from_secs(10)).await,
        Some(Some(ErrorCode::UNEXPECTED_MESSAGE))
    );
}

/// A control session on `conn`: `Hello` sent, `Welcome` read.
async fn control(
    conn: &quinn::Connection,
    interval_ms: u32,
) -> (quinn::SendStream, FramedRecv<quinn::RecvStream>) {
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    tx.write_all(&frame(hello(interval_ms))).await.unwrap();
    let mut rx = FramedRecv::new(rx, FrameLimits::default());
    let welcome = tokio::time::timeout(ANSWER_TIMEOUT, rx.next())
        .await
        .unwrap();
    assert!(
        matches!(welcome, Ok(Some(Message::Welcome(_)))),
        "{welcome:?}"
    );
    (tx, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_heartbeating_faster_than_it_announced_is_throttled() {
    let (_cloud, _device, conn) = enrolled().await;
    let (mut tx, mut rx) = control(&conn, 1_000).await;
    for seq in 0..50 {
        tx.write_all(&frame(heartbeat(seq))).await.unwrap();
    }
    // Within 3 s: a burst (pings), then at most two per announced interval.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut acks = 0;
    while let Ok(Ok(Some(Message::HeartbeatAck(_)))) =
        tokio::time::timeout_at(deadline, rx.next()).await
    {
        acks += 1;
    }
    assert!(
        acks < 30,
        "{acks} of 50 heartbeats sent at once were acked within 3 s"
    );
    assert!(
        acks >= 16,
        "only {acks} acked: the burst a ping needs was refused"
    );
    assert!(conn.close_reason().is_none(), "throttled, not closed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_acks_do_not_wait_for_the_database() {
    let (cloud, _device, conn) = enrolled().await;
    let lock = WriteLock::take(&cloud);
    let (mut tx, mut rx) = control(&conn, 500).await;
    for seq in 0..4 {
        tx.write_all(&frame(heartbeat(seq))).await.unwrap();
        // Under SQLite's busy timeout (5 s): an ack that waited for the lock is late.
        let ack = tokio::time::timeout(Duration::from_secs(4), rx.next()).await;
        assert!(
            matches!(&ack, Ok(Ok(Some(Message::HeartbeatAck(a)))) if a.seq == seq),
            "heartbeat {seq}: {ack:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    drop(lock);
    // What the heartbeats said reaches the database once it is free again.
    assert!(wait_for(Duration::from_secs(20), || cloud
        .devices()
        .first()
        .is_some_and(|d| d["status"] == "online")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_stream_that_falls_silent_is_closed_after_three_intervals() {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    // QUIC keep-alives every second keep the connection itself alive.
    let conn = device_conn(&cloud, &device, Duration::from_secs(1)).await;
    let (_tx, _rx) = control(&conn, 500).await;
    // Closed for the silence (`UNAVAILABLE`, "no heartbeat"), not by a timer of QUIC's.
    assert_eq!(
        closed_with(&conn, Duration::from_secs(15)).await,
        Some(Some(ErrorCode::UNAVAILABLE)),
        "a session without heartbeats stayed open"
    );
}

// Item 5 ------------------------------------------------------------------------------------

#[cfg(unix)]
#[test]
fn the_cloud_keeps_its_files_to_itself() {
    use std::os::unix::fs::PermissionsExt;
    let cloud = Cloud::start();
    cloud.account_and_token("acme");
    let mode = |name: &str| {
        std::fs::metadata(cloud.dir().join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode(""), 0o700, "the data directory");
    for name in ["cloud.db", "ca.key.pem", "server.key.pem"] {
        assert_eq!(mode(name), 0o600, "{name}");
    }
    for name in ["cloud.db-wal", "cloud.db-shm"] {
        if cloud.dir().join(name).exists() {
            assert_eq!(mode(name), 0o600, "{name}");
        }
    }
}

#[cfg(unix)]
#[test]
fn a_key_others_can_read_is_refused_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let cloud = Cloud::start();
    for key in ["ca.key.pem", "server.key.pem"] {
        let path = cloud.dir().join(key);
        let before = std::fs::metadata(&path).unwrap().permissions();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut serve = synesis_e2e::Running {
            child: std::process::Command::new(synesis_e2e::bin("synesis-cloud"))
                .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
                .arg(cloud.dir())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        };
        let code = serve.wait(Duration::from_secs(10));
        assert!(
            code.is_some_and(|c| c != 0),
            "serve started with {key} readable by others"
        );
        let mut stderr = String::new();
        std::io::Read::read_to_string(serve.child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
        assert!(stderr.contains(key) && stderr.contains("644"), "{stderr}");
        std::fs::set_permissions(&path, before).unwrap();
    }
}

// Item 7 ------------------------------------------------------------------------------------

#[test]
fn device_names_reach_the_operator_without_control_characters() {
    let cloud = Cloud::start();
    let device = Device::new();
    let token = cloud.account_and_token("acme");
    run_ok(
        device
            .synesis()
            .args(["cloud", "login", &token, "--name"])
            .arg("evil\u{1b}]0;owned\u{7}\u{1b}[2J\u{9b}31mname"),
    );
    let out = run_ok(cloud.admin().arg("devices"));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        !text.chars().any(|c| c.is_control() && c != '\n'),
        "{text:?}"
    );
    assert!(text.contains("evil"), "{text:?}");
}

/// A certificate signing request for a fresh key.
fn csr(name: &str) -> Vec<u8> {
    csr_for(&rcgen::KeyPair::generate().unwrap(), name)
}

fn csr_for(key: &rcgen::KeyPair, name: &str) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.serialize_request(key).unwrap().der().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_to_an_unauthenticated_peer_carry_no_database_text() {
    let cloud = Cloud::start();
    let first: SetupToken = cloud.account_and_token("acme").parse().unwrap();
    let second: SetupToken = cloud.account_and_token("other").parse().unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let request_id = new_id();
    let enroll = |token: &SetupToken| EnrollRequest {
        request_id,
        token_secret: token.presented_secret(),
        csr_der: Blob(csr("device")),
        device_name: "device".into(),
    };
    let conn = anonymous_conn(&endpoint, &cloud).await;
    let reply = exchange(&conn, enroll(&first)).await;
    assert!(
        matches!(reply, Some(Message::EnrollResponse(_))),
        "{reply:?}"
    );
    // The same request id with another token (another account): a clear refusal.
    let conn = anonymous_conn(&endpoint, &cloud).await;
    let reply = exchange(&conn, enroll(&second)).await;
    let Some(Message::ErrorMsg(e)) = &reply else {
        panic!("{reply:?}")
    };
    assert_ne!(e.code, ErrorCode::INTERNAL, "{e:?}");
    let lower = e.message.to_lowercase();
    for word in ["sqlite", "database", "constraint", "unique"] {
        assert!(!lower.contains(word), "{e:?}");
    }
}
