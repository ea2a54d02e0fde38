//! The tunnel service's local API (`synesis_tunnel::local`) against the real binaries: a
//! `synesis tunnel run` connected to a `synesis-cloud`, asked from this test as a command would.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::{Duration, SystemTime};

use synesis_e2e::{Cloud, Device, wait_for};
use synesis_proto::message::{Hello, PriceRequest};
use synesis_proto::{Message, RequestId};
use synesis_tunnel::TunnelState;
use synesis_tunnel::local::{
    CLOUD_STREAMS_PER_CONNECTION, ClientError, FailureKind, LocalClient, LocalStream,
};

// The local API's idea of the cloud's stream limit is the cloud's own.
const _: () = assert!(
    CLOUD_STREAMS_PER_CONNECTION == synesis_cloud::endpoint::STREAMS_PER_CONNECTION_MAX as usize
);

fn request_id() -> RequestId {
    let ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    RequestId::from_parts(u64::try_from(ms).unwrap(), rand_bytes())
}

fn rand_bytes() -> [u8; 10] {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let mut out = [1u8; 10];
    out[..4].copy_from_slice(&nanos.to_be_bytes());
    out
}

#[tokio::test(flavor = "current_thread")]
async fn a_stream_opened_through_the_local_api_reaches_the_cloud_and_the_control_stream_does_not() {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    let _tunnel = device.tunnel("1s");
    let client = LocalClient::new(&device.home().join("run"));
    assert!(
        wait_for(Duration::from_secs(10), || device.state().as_deref()
            == Some("connected")),
        "never connected:\n{}",
        device.tunnel_log()
    );
    assert_eq!(client.status().await.unwrap().state, TunnelState::Connected);

    let asked = request_id();
    let LocalStream { mut send, mut recv } = client.open_stream().await.unwrap();
    send.send(&PriceRequest { request_id: asked }.into())
        .await
        .unwrap();
    send.finish().await.unwrap();
    match recv.next().await.unwrap() {
        Some(Message::PriceReply(r)) => assert_eq!(r.request_id, asked),
        other => panic!("{other:?}"),
    }
    assert_eq!(recv.next().await.unwrap(), None, "the cloud finished");

    // A second control session on the tunnel's connection would confuse the cloud: refused.
    let hello: Message = Hello {
        protocol_versions: vec![synesis_proto::PROTOCOL_VERSION],
        client: "test".into(),
        heartbeat_interval_ms: 1_000,
        max_frame_bytes: 64 * 1024,
    }
    .into();
    let LocalStream { mut send, mut recv } = client.open_stream().await.unwrap();
    send.send(&hello).await.unwrap();
    match recv.next().await {
        Err(ClientError::Stream(f)) => assert_eq!(f.kind, FailureKind::BadRequest, "{f}"),
        other => panic!("{other:?}"),
    }
    assert_eq!(device.status().unwrap()["reconnects"], 0);
}
