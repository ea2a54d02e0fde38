//! Speaking the protocol by hand, as a client written from `proto/PROTOCOL.md` alone would:
//! connections made here (with a device's certificate, or none), frames encoded by the test,
//! raw bytes when a test needs them wrong. Shared by `tests/tests/security.rs` and
//! `tests/tests/conformance.rs`.

use std::time::Duration;

use synesis_proto::message::{Heartbeat, Hello, UsageRequest};
use synesis_proto::{ErrorCode, FrameLimits, Message, MessageType, PROTOCOL_VERSION, RequestId};
use synesis_wire::FramedRecv;

use crate::{Cloud, Device};

/// How long a test waits for the cloud's answer on a stream.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

pub fn new_id() -> RequestId {
    synesis_tunnel::clock::new_request_id()
}

/// A connection presenting `device`'s certificate (no `Hello` sent), with `heartbeat` as its
/// keep-alive.
pub async fn device_conn(cloud: &Cloud, device: &Device, heartbeat: Duration) -> quinn::Connection {
    let identity = synesis_tunnel::Identity::load(&device.home().join("data"))
        .expect("the device's identity reads")
        .expect("the device is enrolled");
    let config =
        synesis_tunnel::tls::device_client_config(&identity, heartbeat).expect("a client config");
    dial(cloud, config)
        .await
        .expect("the cloud accepts the device")
}

/// A connection to `cloud` with `config` (any TLS setup a test makes), from a new endpoint:
/// the handshake's outcome.
pub async fn dial(
    cloud: &Cloud,
    config: quinn::ClientConfig,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    let endpoint =
        quinn::Endpoint::client("127.0.0.1:0".parse().expect("an address")).expect("an endpoint");
    endpoint
        .connect_with(config, cloud.addr, synesis_wire::tls::SERVER_NAME)
        .expect("a connection starts")
        .await
}

/// A connection without a client certificate (what enrollment uses), pinned to the cloud's CA.
pub async fn anonymous_conn(endpoint: &quinn::Endpoint, cloud: &Cloud) -> quinn::Connection {
    endpoint
        .connect_with(
            anonymous_config(cloud),
            cloud.addr,
            synesis_wire::tls::SERVER_NAME,
        )
        .expect("a connection starts")
        .await
        .expect("the cloud accepts the connection")
}

pub fn anonymous_config(cloud: &Cloud) -> quinn::ClientConfig {
    let ca = std::fs::read(cloud.dir().join("ca.crt.der")).expect("the cloud's CA");
    let pin = synesis_wire::tls::fingerprint(&ca.into());
    synesis_tunnel::tls::enrollment_client_config(pin).expect("a client config")
}

/// `message` as one whole frame.
pub fn frame(message: impl Into<Message>) -> Vec<u8> {
    synesis_proto::encode_frame_vec(&message.into(), FrameLimits::default())
        .expect("the message encodes")
}

/// A frame header of type `t` announcing `length` payload bytes.
pub fn header(t: MessageType, length: u32) -> Vec<u8> {
    let mut h = vec![t.as_u8()];
    h.extend_from_slice(&length.to_be_bytes());
    h
}

/// Writes `bytes` on a new stream (left open) and returns the first message that comes back,
/// or `None` when the stream or connection ends without one.
pub async fn exchange_raw(conn: &quinn::Connection, bytes: &[u8]) -> Option<Message> {
    let Ok((mut tx, rx)) = conn.open_bi().await else {
        return None;
    };
    if tx.write_all(bytes).await.is_err() {
        return None;
    }
    let mut rx = FramedRecv::new(rx, FrameLimits::default());
    let reply = tokio::time::timeout(ANSWER_TIMEOUT, rx.next())
        .await
        .expect("an answer in time");
    // Keep the send half open until the answer is in: a finished stream is a different case.
    drop(tx);
    reply.ok().flatten()
}

pub async fn exchange(conn: &quinn::Connection, message: impl Into<Message>) -> Option<Message> {
    exchange_raw(conn, &frame(message)).await
}

pub fn code_of(reply: &Option<Message>) -> Option<ErrorCode> {
    match reply {
        Some(Message::ErrorMsg(e)) => Some(e.code),
        _ => None,
    }
}

pub fn usage_request() -> UsageRequest {
    UsageRequest {
        request_id: new_id(),
        since: None,
        group_by: None,
        after: None,
    }
}

pub fn hello(interval_ms: u32) -> Message {
    Hello {
        protocol_versions: vec![PROTOCOL_VERSION],
        client: "wire-test/0".into(),
        heartbeat_interval_ms: interval_ms,
        max_frame_bytes: 1 << 20,
    }
    .into()
}

pub fn heartbeat(seq: u64) -> Message {
    Heartbeat {
        seq,
        sent_at: synesis_proto::UnixMillis(0),
        vitals: crate::empty_vitals(),
    }
    .into()
}

/// The code a connection was closed with, waiting at most `limit` for the close.
pub async fn closed_with(conn: &quinn::Connection, limit: Duration) -> Option<Option<ErrorCode>> {
    tokio::time::timeout(limit, conn.closed())
        .await
        .ok()
        .map(|e| synesis_wire::error_code_of(&e))
}

/// How many of `conns` are closed with `code`: counted once at least `at_least` are, or when
/// `limit` has passed (the cloud closes them as it gets to them, not at once).
pub async fn closed_count(
    conns: &[quinn::Connection],
    code: ErrorCode,
    at_least: usize,
    limit: Duration,
) -> usize {
    let count = || {
        conns
            .iter()
            .filter(|c| {
                c.close_reason()
                    .is_some_and(|r| synesis_wire::error_code_of(&r) == Some(code))
            })
            .count()
    };
    let deadline = tokio::time::Instant::now() + limit;
    while count() < at_least && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    count()
}

/// A cloud, a device enrolled in account `acme`, and a connection of that device (no `Hello`).
pub async fn enrolled() -> (Cloud, Device, quinn::Connection) {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    let conn = device_conn(&cloud, &device, Duration::from_secs(1)).await;
    (cloud, device, conn)
}
