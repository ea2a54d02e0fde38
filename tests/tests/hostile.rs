//! A peer with a valid identity that breaks the framing gets an error code, and the cloud keeps
//! serving it and everyone else.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::{Cloud, Device, empty_vitals, wait_for};
use synesis_proto::message::{Heartbeat, Hello};
use synesis_proto::{ErrorCode, FrameLimits, Message, MessageType, PROTOCOL_VERSION, UnixMillis};
use synesis_tunnel::Identity;
use synesis_wire::FramedRecv;

async fn raw_stream(conn: &quinn::Connection, bytes: &[u8]) -> Option<Message> {
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    tx.write_all(bytes).await.unwrap();
    let mut rx = FramedRecv::new(rx, FrameLimits::default());
    // A generous bound: the answer is expected at once, but a loaded machine may be slow.
    tokio::time::timeout(synesis_e2e::wire::ANSWER_TIMEOUT, rx.next())
        .await
        .expect("an answer in time")
        .ok()
        .flatten()
}

fn code_of(reply: Option<Message>) -> ErrorCode {
    match reply {
        Some(Message::ErrorMsg(e)) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test(flavor = "current_thread")]
async fn garbage_and_oversize_frames_get_error_codes_and_everyone_is_still_served() {
    let cloud = Cloud::start();
    // A well-behaved device, connected throughout.
    let bystander = Device::new();
    bystander.login(&cloud.account_and_token("acme"));
    let _tunnel = bystander.tunnel("1s");
    assert!(wait_for(Duration::from_secs(20), || bystander
        .state()
        .as_deref()
        == Some("connected")));

    // A hostile device with a real identity, speaking raw QUIC.
    let hostile = Device::new();
    hostile.login(&cloud.token("acme", "1h"));
    let identity = Identity::load(&hostile.home().join("data"))
        .unwrap()
        .unwrap();
    let config =
        synesis_tunnel::tls::device_client_config(&identity, Duration::from_secs(5)).unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(config, cloud.addr, synesis_wire::tls::SERVER_NAME)
        .unwrap()
        .await
        .unwrap();

    assert_eq!(
        code_of(raw_stream(&conn, &[0xee, 0, 0, 0, 1, 0]).await),
        ErrorCode::FRAME_UNKNOWN_TYPE
    );
    // A type that may open a stream (any other is refused from its type byte alone).
    let oversize = [MessageType::UsageRequest.as_u8(), 0xff, 0xff, 0xff, 0xff];
    assert_eq!(
        code_of(raw_stream(&conn, &oversize).await),
        ErrorCode::FRAME_OVERSIZE
    );
    let malformed = [MessageType::Hello.as_u8(), 0, 0, 0, 3, 0xff, 0xff, 0xff];
    assert_eq!(
        code_of(raw_stream(&conn, &malformed).await),
        ErrorCode::FRAME_MALFORMED
    );
    let heartbeat: Message = Heartbeat {
        seq: 0,
        sent_at: UnixMillis(0),
        vitals: empty_vitals(),
    }
    .into();
    let not_first = synesis_proto::encode_frame_vec(&heartbeat, FrameLimits::default()).unwrap();
    assert_eq!(
        code_of(raw_stream(&conn, &not_first).await),
        ErrorCode::UNEXPECTED_MESSAGE
    );

    // The same connection still gets a session.
    let hello: Message = Hello {
        protocol_versions: vec![PROTOCOL_VERSION],
        client: "hostile/0".into(),
        heartbeat_interval_ms: 1_000,
        max_frame_bytes: 1 << 20,
    }
    .into();
    let hello = synesis_proto::encode_frame_vec(&hello, FrameLimits::default()).unwrap();
    assert!(matches!(
        raw_stream(&conn, &hello).await,
        Some(Message::Welcome(_))
    ));

    // And the bystander was served all along.
    let before = bystander.status().unwrap()["last_heartbeat_ack_at"].clone();
    assert!(wait_for(Duration::from_secs(20), || bystander
        .status()
        .unwrap()["last_heartbeat_ack_at"]
        != before));
    assert_eq!(bystander.state().as_deref(), Some("connected"));

    // A version the cloud does not speak is refused with its code: version 1 too, whose
    // `EscalationRequest` lacks the answer's shape (PROTOCOL.md §7).
    let old: Message = Hello {
        protocol_versions: vec![0, 1],
        client: "old".into(),
        heartbeat_interval_ms: 1_000,
        max_frame_bytes: 1 << 20,
    }
    .into();
    let old = synesis_proto::encode_frame_vec(&old, FrameLimits::default()).unwrap();
    // On a connection of its own (this one has its control stream: a second `Hello` here is
    // refused as unexpected, PROTOCOL.md §2). The refusal closes the connection with the code
    // (the error message before it is best effort: a close may overtake it).
    let config =
        synesis_tunnel::tls::device_client_config(&identity, Duration::from_secs(5)).unwrap();
    let conn = synesis_e2e::wire::dial(&cloud, config).await.unwrap();
    let reply = raw_stream(&conn, &old).await;
    let closed_with = synesis_wire::error_code_of(&conn.closed().await);
    assert!(
        matches!(&reply, Some(Message::ErrorMsg(e)) if e.code == ErrorCode::UNSUPPORTED_VERSION)
            || closed_with == Some(ErrorCode::UNSUPPORTED_VERSION),
        "{reply:?} {closed_with:?}"
    );
}
