//! Peers that stall on purpose, before the cloud knows who they are, give back what they hold
//! or cannot take it all: an enrollment connection that never lets the cloud answer loses its
//! slot, and handshakes left hanging from one source cannot hold every handshake slot.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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

/// A sans-IO QUIC client's socket (reads time out after `read_timeout`) and endpoint: the
/// tests' clients decide themselves what they send and when.
fn sans_io_client(
    local: impl std::net::ToSocketAddrs,
    read_timeout: Duration,
) -> (std::net::UdpSocket, quinn_proto::Endpoint) {
    let socket = std::net::UdpSocket::bind(local).unwrap();
    socket.set_read_timeout(Some(read_timeout)).unwrap();
    let endpoint = quinn_proto::Endpoint::new(
        Arc::new(quinn_proto::EndpointConfig::default()),
        None,
        false,
        None,
    );
    (socket, endpoint)
}

/// Sends what `conn` has due.
fn transmit(socket: &std::net::UdpSocket, conn: &mut quinn_proto::Connection) {
    let mut out = Vec::new();
    while let Some(t) = conn.poll_transmit(Instant::now(), 1, &mut out) {
        let _ = socket.send_to(&out[..t.size], t.destination);
        out.clear();
    }
}

/// Begins a handshake with `server`: its first flight is sent.
fn start(
    endpoint: &mut quinn_proto::Endpoint,
    socket: &std::net::UdpSocket,
    config: &quinn::ClientConfig,
    server: std::net::SocketAddr,
) -> (quinn_proto::ConnectionHandle, quinn_proto::Connection) {
    let (handle, mut conn) = endpoint
        .connect(
            Instant::now(),
            config.clone(),
            server,
            synesis_wire::tls::SERVER_NAME,
        )
        .unwrap();
    transmit(socket, &mut conn);
    (handle, conn)
}

/// Starts `count` handshakes from `local` and never finishes one: it answers the cloud's Retry
/// (so its address counts as proven) and ignores everything else. Until `stop`, it starts a
/// few more every 100 ms, so that the slots the cloud gives up on (its handshake timeout is
/// 5 s) are taken again at once: the door stays as full as this source can make it.
fn half_open_handshakes(
    local: &str,
    server: std::net::SocketAddr,
    config: quinn::ClientConfig,
    count: usize,
    stop: &AtomicBool,
    ready: std::sync::mpsc::Sender<()>,
) -> (usize, usize) {
    use std::collections::HashMap;
    let (socket, mut endpoint) = sans_io_client(local, Duration::from_millis(10));
    let send_all = |conn: &mut quinn_proto::Connection| transmit(&socket, conn);
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
                if !is_retry(&buf[..n]) {
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
    let begin =
        |endpoint: &mut quinn_proto::Endpoint,
         conns: &mut HashMap<quinn_proto::ConnectionHandle, quinn_proto::Connection>| {
            let (handle, conn) = start(endpoint, &socket, &config, server);
            conns.insert(handle, conn);
        };
    for i in 0..count {
        begin(&mut endpoint, &mut conns);
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
    let give_up = Instant::now() + Duration::from_secs(120);
    while !stop.load(Ordering::Relaxed) && Instant::now() < give_up {
        for _ in 0..8 {
            begin(&mut endpoint, &mut conns);
        }
        drain(
            &mut endpoint,
            &mut conns,
            Instant::now() + Duration::from_millis(100),
        );
    }
    (received, retries)
}

/// Whether `datagram` is a QUIC v1 Retry: a long header (0x80) of type Retry (0x30); neither
/// bit is under header protection.
fn is_retry(datagram: &[u8]) -> bool {
    datagram.first().is_some_and(|b| b & 0xb0 == 0xb0)
}

/// One handshake from 127.0.0.1 with a sans-IO client, so that it can tell whether the cloud
/// asked it for a Retry first, which the cloud does only while 64 handshakes or more are in
/// progress. Whether it connected (or why not), and whether it was asked for a Retry.
fn honest_handshake(
    server: std::net::SocketAddr,
    config: quinn::ClientConfig,
    limit: Duration,
) -> (Result<(), String>, bool) {
    let (socket, mut endpoint) = sans_io_client("127.0.0.1:0", Duration::from_millis(10));
    let (handle, mut conn) = start(&mut endpoint, &socket, &config, server);
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 65_536];
    let mut retried = false;
    loop {
        let now = Instant::now();
        if conn.poll_timeout().is_some_and(|at| at <= now) {
            conn.handle_timeout(now);
        }
        while let Some(event) = conn.poll_endpoint_events() {
            if let Some(event) = endpoint.handle_event(handle, event) {
                conn.handle_event(event);
            }
        }
        // What is due goes out first: the last flight too, so that the cloud's side of the
        // handshake ends here and holds no slot after.
        transmit(&socket, &mut conn);
        while let Some(event) = conn.poll() {
            match event {
                quinn_proto::Event::Connected => return (Ok(()), retried),
                quinn_proto::Event::ConnectionLost { reason } => {
                    return (Err(reason.to_string()), retried);
                }
                _ => {}
            }
        }
        if now >= deadline {
            return (Err(format!("no handshake within {limit:?}")), retried);
        }
        let Ok((n, from)) = socket.recv_from(&mut buf) else {
            continue;
        };
        retried |= is_retry(&buf[..n]);
        let mut response = Vec::new();
        match endpoint.handle(
            Instant::now(),
            from,
            None,
            None,
            bytes::BytesMut::from(&buf[..n]),
            &mut response,
        ) {
            Some(quinn_proto::DatagramEvent::ConnectionEvent(h, event)) if h == handle => {
                conn.handle_event(event);
            }
            Some(quinn_proto::DatagramEvent::Response(t)) => {
                let _ = socket.send_to(&response[..t.size], t.destination);
            }
            _ => {}
        }
    }
}

/// An honest client from another address gets in while one source holds every handshake slot
/// the cloud lets it have. Judged by the evidence, not by a clock: the attempt that counts is
/// one the cloud asked for a Retry, i.e. made while the door was full (64 or more handshakes in
/// progress, all the attacker's), and it must finish its handshake, however long that takes on
/// a loaded machine. (Without the per-source budget, the attacker's 1,100 would hold all 1,024
/// slots and the honest client would be refused.)
#[test]
fn handshakes_left_hanging_from_one_source_do_not_keep_others_out() {
    let _turn = turn();
    let cloud = Cloud::start();
    let (addr, hanging) = (cloud.addr, anonymous_config(&cloud, false));
    // More than every handshake slot the cloud has (1,024), from another loopback address.
    let stop = Arc::new(AtomicBool::new(false));
    let (ready, filled) = std::sync::mpsc::channel();
    let attacker = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            half_open_handshakes("127.0.0.2:0", addr, hanging, 1_100, &stop, ready)
        })
    };
    filled.recv().unwrap();

    // An attempt the cloud did not ask for a Retry came while some of the attacker's slots had
    // just timed out: it shows nothing either way, so another one is made.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut attempts = Vec::new();
    let (honest, retried) = loop {
        let (result, retried) = honest_handshake(
            addr,
            anonymous_config(&cloud, false),
            Duration::from_secs(30),
        );
        attempts.push((result.clone(), retried));
        if result.is_err() || retried || Instant::now() >= deadline {
            break (result, retried);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    stop.store(true, Ordering::Relaxed);
    let (received, retries) = attacker.join().unwrap();
    eprintln!(
        "attacker: {received} datagrams received, {retries} retries answered; honest attempts \
         (outcome, asked for a Retry): {attempts:?}"
    );
    assert!(
        honest.is_ok(),
        "a client from another address could not connect: {attempts:?}"
    );
    assert!(
        retried,
        "no attempt was made while the door was full (none was asked for a Retry): {attempts:?}"
    );
}

/// What the cloud's door did with one handshake attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Door {
    /// The cloud went on with the handshake (its encrypted extensions arrived).
    Admitted,
    /// The cloud closed it with `CONNECTION_REFUSED`.
    Refused,
    /// Closed for another reason.
    Lost(String),
    /// Neither, within the attempt's time.
    Silent,
}

/// Makes `count` handshake attempts from each of `sources` (loopback addresses), one source
/// after another, and never finishes one: a Retry is answered (the address counts as proven),
/// a lost datagram is sent again, every other datagram is read and left unanswered (so an
/// admitted handshake holds its slot
/// until the cloud gives it up, [`HANDSHAKE_TIMEOUT`]). At most a few attempts are in
/// flight at once, so no answer is lost to a full socket buffer. What the door did with each,
/// by source, and how long it all took (the counts mean something only well inside 5 s).
fn door_outcomes(
    server: std::net::SocketAddr,
    config: &quinn::ClientConfig,
    sources: &[std::net::Ipv4Addr],
    count: usize,
) -> (Vec<Vec<Door>>, Duration) {
    use quinn_proto::{ConnectionError, DatagramEvent, Event, TransportErrorCode};
    const IN_FLIGHT: usize = 8;
    let began = Instant::now();
    let mut all = Vec::new();
    for source in sources {
        let (socket, mut endpoint) = sans_io_client((*source, 0), Duration::from_millis(5));
        let mut outcomes = vec![Door::Silent; count];
        // In flight: the connection, its attempt's index, when it gives up.
        let mut flying = std::collections::HashMap::new();
        let (mut next, mut buf) = (0, vec![0u8; 65_536]);
        let send_all = |conn: &mut quinn_proto::Connection| transmit(&socket, conn);
        while next < count || !flying.is_empty() {
            while next < count && flying.len() < IN_FLIGHT {
                let (handle, conn) = start(&mut endpoint, &socket, config, server);
                flying.insert(
                    handle,
                    (conn, next, Instant::now() + Duration::from_secs(2)),
                );
                next += 1;
            }
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let retry = is_retry(&buf[..n]);
                let mut response = Vec::new();
                if let Some(DatagramEvent::ConnectionEvent(handle, event)) = endpoint.handle(
                    Instant::now(),
                    from,
                    None,
                    None,
                    bytes::BytesMut::from(&buf[..n]),
                    &mut response,
                ) && let Some((conn, _, _)) = flying.get_mut(&handle)
                {
                    conn.handle_event(event);
                    if retry {
                        send_all(conn);
                    }
                }
            }
            let now = Instant::now();
            flying.retain(|_, (conn, index, give_up)| {
                // A datagram lost either way is sent again, as a client does.
                if conn.poll_timeout().is_some_and(|at| at <= now) {
                    conn.handle_timeout(now);
                    send_all(conn);
                }
                while let Some(event) = conn.poll() {
                    let outcome = match event {
                        Event::HandshakeDataReady | Event::Connected => Door::Admitted,
                        Event::ConnectionLost {
                            reason: ConnectionError::ConnectionClosed(close),
                        } if close.error_code == TransportErrorCode::CONNECTION_REFUSED => {
                            Door::Refused
                        }
                        Event::ConnectionLost { reason } => Door::Lost(reason.to_string()),
                        _ => continue,
                    };
                    outcomes[*index] = outcome.clone();
                    return false;
                }
                now < *give_up
            });
        }
        all.push(outcomes);
    }
    (all, began.elapsed())
}

/// The tests that fill the cloud's handshake door take turns: two at once would each count
/// in a window the other made slower.
fn turn() -> std::sync::MutexGuard<'static, ()> {
    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());
    TURN.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The cloud gives up a handshake it admitted after this long (PROTOCOL.md §1).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

fn tally(outcomes: &[Door]) -> [usize; 3] {
    let of = |door: Door| outcomes.iter().filter(|o| **o == door).count();
    [
        of(Door::Admitted),
        of(Door::Refused),
        outcomes.len() - of(Door::Admitted) - of(Door::Refused),
    ]
}

/// S1.lim-8, counted on the wire: one source gets exactly 64 handshakes at once, and every
/// attempt past them is refused at the door (`CONNECTION_REFUSED`), while another source still
/// gets in.
#[test]
fn one_source_gets_64_handshakes_at_once_and_no_more() {
    let _turn = turn();
    let cloud = Cloud::start();
    let config = anonymous_config(&cloud, false);
    let sources = ["127.0.0.5".parse().unwrap(), "127.0.0.6".parse().unwrap()];
    let (outcomes, took) = door_outcomes(cloud.addr, &config, &sources[..1], 80);
    let (other, _) = door_outcomes(cloud.addr, &config, &sources[1..], 1);
    eprintln!(
        "80 attempts from one source in {took:?}: {:?}",
        tally(&outcomes[0])
    );
    assert!(took < HANDSHAKE_TIMEOUT, "too slow to count: {took:?}");
    assert_eq!(tally(&outcomes[0]), [64, 16, 0], "{:?}", outcomes[0]);
    assert!(
        outcomes[0][..64].iter().all(|o| *o == Door::Admitted),
        "the first 64 are admitted: {:?}",
        outcomes[0]
    );
    assert_eq!(other[0], vec![Door::Admitted], "another source gets in");
}

/// S1.lim-8, counted on the wire: 1,024 handshakes at once in all. Sixteen sources of 64
/// attempts each fill the door; a seventeenth is refused, but for the slot of an attempt the
/// cloud never answered (one in several hundred is, on a loaded machine, retransmitted or not:
/// it holds no slot, so the count in all stays exact).
#[test]
fn the_door_holds_1024_handshakes_at_once_in_all() {
    let _turn = turn();
    let cloud = Cloud::start();
    let config = anonymous_config(&cloud, false);
    let sources: Vec<std::net::Ipv4Addr> = (1..=17).map(|i| [127, 0, 1, i].into()).collect();
    let (outcomes, took) = door_outcomes(cloud.addr, &config, &sources, 64);
    let tallies: Vec<_> = outcomes.iter().map(|o| tally(o)).collect();
    let odd: Vec<_> = outcomes
        .iter()
        .flatten()
        .filter(|o| matches!(o, Door::Lost(_) | Door::Silent))
        .collect();
    eprintln!(
        "17 sources x 64 attempts in {took:?}: [admitted, refused, neither] {tallies:?}; \
         neither: {odd:?}"
    );
    assert!(took < HANDSHAKE_TIMEOUT, "too slow to count: {took:?}");
    let admitted: usize = tallies.iter().map(|[admitted, _, _]| admitted).sum();
    assert_eq!(admitted, 1_024, "handshakes admitted in all: {tallies:?}");
    assert!(
        tallies[..16].iter().all(|[_, refused, _]| *refused == 0),
        "nothing is refused before the door is full: {tallies:?}"
    );
    let [late, refused, _] = tallies[16];
    assert_eq!(
        late + refused,
        64,
        "the seventeenth source is refused: {tallies:?}"
    );
}
