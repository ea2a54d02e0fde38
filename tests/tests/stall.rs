//! Peers that stall on purpose, before the cloud knows who they are, give back what they hold:
//! an enrollment connection that never lets the cloud answer loses its slot, so enrollment
//! from the same address works again.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;
use std::time::Duration;

use synesis_e2e::Cloud;
use synesis_proto::message::EnrollRequest;
use synesis_proto::{Blob, FrameLimits, Message, SetupToken};
use synesis_wire::FramedRecv;

/// The cloud's budget of certificate-less connections per source (PROTOCOL.md §1).
const ANONYMOUS_PER_SOURCE: usize = 8;

fn anonymous_config(cloud: &Cloud, stalled: bool) -> quinn::ClientConfig {
    let ca = std::fs::read(cloud.dir().join("ca.crt.der")).unwrap();
    let pin = synesis_wire::tls::fingerprint(&ca.into());
    let mut config = synesis_tunnel::tls::enrollment_client_config(pin).unwrap();
    if stalled {
        // No flow-control credit at all: the cloud can never send an answer. Keep-alives keep
        // the connection itself alive past any idle timeout.
        let mut t = quinn::TransportConfig::default();
        t.stream_receive_window(0u32.into())
            .receive_window(0u32.into())
            .keep_alive_interval(Some(Duration::from_secs(1)))
            .max_idle_timeout(Some(Duration::from_secs(120).try_into().unwrap()));
        config.transport_config(Arc::new(t));
    }
    config
}

fn enroll_request(token: &SetupToken) -> Vec<u8> {
    let message: Message = EnrollRequest {
        request_id: synesis_tunnel::clock::new_request_id(),
        token_secret: token.presented_secret(),
        csr_der: Blob(vec![0x30, 0x00]),
        device_name: "staller".into(),
    }
    .into();
    synesis_proto::encode_frame_vec(&message, FrameLimits::default()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enrollment_connections_that_never_take_an_answer_give_their_slots_back() {
    let cloud = Cloud::start();
    let token: SetupToken = cloud.account_and_token("acme").parse().unwrap();
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();

    // Fill this address's budget with connections that ask and never let the answer in.
    let mut stalled = Vec::new();
    for _ in 0..ANONYMOUS_PER_SOURCE {
        let conn = endpoint
            .connect_with(
                anonymous_config(&cloud, true),
                cloud.addr,
                synesis_wire::tls::SERVER_NAME,
            )
            .unwrap()
            .await
            .unwrap();
        let (mut tx, rx) = conn.open_bi().await.unwrap();
        tx.write_all(&enroll_request(&token)).await.unwrap();
        stalled.push((conn, tx, rx));
    }

    // An honest enrollment from the same address gets a slot back within the cloud's deadline
    // for enrollment connections (25 s), however the stalled ones behave.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let answered = loop {
        let conn = endpoint
            .connect_with(
                anonymous_config(&cloud, false),
                cloud.addr,
                synesis_wire::tls::SERVER_NAME,
            )
            .unwrap()
            .await
            .unwrap();
        let reply = async {
            let (mut tx, rx) = conn.open_bi().await.ok()?;
            tx.write_all(&enroll_request(&token)).await.ok()?;
            let mut rx = FramedRecv::new(rx, FrameLimits::default());
            rx.next().await.ok().flatten()
        };
        if let Ok(Some(reply)) = tokio::time::timeout(Duration::from_secs(5), reply).await {
            break Some(reply);
        }
        if tokio::time::Instant::now() >= deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    // A reply of any kind (the CSR here is not valid) means the cloud served this connection.
    assert!(
        matches!(answered, Some(Message::ErrorMsg(_) | Message::EnrollResponse(_))),
        "no enrollment slot came back within 45 s: {answered:?}"
    );
    drop(stalled);
}
