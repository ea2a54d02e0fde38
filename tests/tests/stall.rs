//! Peers that stall on purpose, before the cloud knows who they are, give back what they hold
//! or cannot take it all: an enrollment connection that never lets the cloud answer loses its
//! slot, and handshakes left hanging from one source cannot hold every handshake slot.
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
        matches!(
            answered,
            Some(Message::ErrorMsg(_) | Message::EnrollResponse(_))
        ),
        "no enrollment slot came back within 45 s: {answered:?}"
    );
    drop(stalled);
}

/// Starts `count` handshakes from `local` and never finishes one: it answers the cloud's Retry
/// (so its address counts as proven) and ignores everything else, for `hold`.
fn half_open_handshakes(
    local: &str,
    server: std::net::SocketAddr,
    config: quinn::ClientConfig,
    count: usize,
    hold: Duration,
    ready: std::sync::mpsc::Sender<()>,
) -> (usize, usize) {
    use std::collections::HashMap;
    use std::time::Instant;
    let socket = std::net::UdpSocket::bind(local).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(10)))
        .unwrap();
    let send_all = |conn: &mut quinn_proto::Connection| {
        let mut out = Vec::new();
        while let Some(t) = conn.poll_transmit(Instant::now(), 1, &mut out) {
            let _ = socket.send_to(&out[..t.size], t.destination);
            out.clear();
        }
    };
    let mut endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    let mut conns = HashMap::new();
    let mut buf = vec![0u8; 65_536];
    let (mut received, mut retries) = (0, 0);
    // Answers the Retry packets waiting, until `until`.
    let mut drain =
        |endpoint: &mut quinn_proto::Endpoint,
         conns: &mut HashMap<quinn_proto::ConnectionHandle, quinn_proto::Connection>,
         until: Instant| {
            while Instant::now() < until {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                received += 1;
                // A long header (0x80) of type Retry (0x30 in QUIC v1): the only packet answered.
                if n == 0 || buf[0] & 0xb0 != 0xb0 {
                    continue;
                }
                let mut out = Vec::new();
                let event = endpoint.handle(
                    Instant::now(),
                    from,
                    None,
                    None,
                    bytes::BytesMut::from(&buf[..n]),
                    &mut out,
                );
                if let Some(quinn_proto::DatagramEvent::ConnectionEvent(handle, event)) = event
                    && let Some(conn) = conns.get_mut(&handle)
                {
                    conn.handle_event(event);
                    send_all(conn);
                    retries += 1;
                }
            }
        };
    let deadline = Instant::now() + hold;
    for i in 0..count {
        let (handle, mut conn) = endpoint
            .connect(
                Instant::now(),
                config.clone(),
                server,
                synesis_wire::tls::SERVER_NAME,
            )
            .unwrap();
        send_all(&mut conn);
        conns.insert(handle, conn);
        // A few at a time, so the answers fit the socket's receive buffer.
        if i % 8 == 7 {
            drain(
                &mut endpoint,
                &mut conns,
                Instant::now() + Duration::from_millis(5),
            );
        }
    }
    // Every attempt is out; once the last Retries are answered, the slots are as full as this
    // source can make them.
    drain(
        &mut endpoint,
        &mut conns,
        Instant::now() + Duration::from_millis(300),
    );
    let _ = ready.send(());
    drain(&mut endpoint, &mut conns, deadline);
    (received, retries)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_left_hanging_from_one_source_do_not_keep_others_out() {
    let cloud = Cloud::start();
    let (addr, hanging) = (cloud.addr, anonymous_config(&cloud, false));
    // More than every handshake slot the cloud has (1,024), from another loopback address.
    let (ready, filled) = std::sync::mpsc::channel();
    let attacker = std::thread::spawn(move || {
        half_open_handshakes(
            "127.0.0.2:0",
            addr,
            hanging,
            1_100,
            Duration::from_secs(6),
            ready,
        )
    });
    tokio::task::spawn_blocking(move || filled.recv())
        .await
        .unwrap()
        .unwrap();

    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let honest = tokio::time::timeout(
        Duration::from_secs(3),
        endpoint
            .connect_with(
                anonymous_config(&cloud, false),
                addr,
                synesis_wire::tls::SERVER_NAME,
            )
            .unwrap(),
    )
    .await;
    let (received, retries) = attacker.join().unwrap();
    eprintln!("attacker: {received} datagrams received, {retries} retries answered");
    assert!(
        matches!(honest, Ok(Ok(_))),
        "a client from another address could not connect: {honest:?}"
    );
}
