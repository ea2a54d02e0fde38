//! The local API over a real QUIC connection to an in-process fake cloud on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::sync::Arc;
use std::time::Duration;

use synesis_proto::message::{EscalationChunk, Hello, PriceReply, PriceRequest, Tier};
use synesis_proto::{ErrorCode, FrameLimits, Message, RequestId};
use synesis_wire::{FramedRecv, send};
use tokio::sync::{mpsc, oneshot};

use super::*;
use crate::testing::{self, FakeTunnel, Loopback};

/// Chunks in the fake cloud's streamed answer; one of them larger than a copy chunk.
const CHUNKS: u32 = 200;
const BIG_CHUNK_BYTES: usize = 1024 * 1024;

fn request_id(n: u8) -> RequestId {
    RequestId::from_parts(1_795_000_000_000, [n; 10])
}

fn chunk(seq: u32) -> Message {
    let text = if seq == CHUNKS / 2 {
        "x".repeat(BIG_CHUNK_BYTES)
    } else {
        format!("chunk {seq}")
    };
    EscalationChunk {
        request_id: request_id(1),
        seq,
        text,
    }
    .into()
}

/// What the fake cloud saw of a stream after its first frame.
#[derive(Debug)]
enum Seen {
    Finished,
    Reset(quinn::VarInt),
}

/// A QUIC server on loopback playing the cloud: it answers a `PriceRequest` with one reply, and
/// an escalation with `CHUNKS` chunks, the first alone until the client has it (`first_seen`),
/// so a test can tell streaming from buffering. After answering it reports how the device's
/// half of the stream ended.
struct FakeCloud {
    conn: quinn::Connection,
    _endpoints: (quinn::Endpoint, quinn::Endpoint),
    seen: mpsc::Receiver<Seen>,
    first_seen: mpsc::Sender<()>,
}

impl FakeCloud {
    async fn start() -> FakeCloud {
        let (seen_tx, seen) = mpsc::channel(16);
        let (first_seen, first_seen_rx) = mpsc::channel(16);
        let first_seen_rx = Arc::new(tokio::sync::Mutex::new(first_seen_rx));
        let loopback = Loopback::start(move |tx, rx| {
            answer(tx, rx, seen_tx.clone(), Arc::clone(&first_seen_rx))
        })
        .await;
        FakeCloud {
            conn: loopback.conn,
            _endpoints: (loopback.server, loopback.client),
            seen,
            first_seen,
        }
    }
}

async fn answer(
    mut tx: quinn::SendStream,
    rx: quinn::RecvStream,
    seen: mpsc::Sender<Seen>,
    first_seen: Arc<tokio::sync::Mutex<mpsc::Receiver<()>>>,
) {
    let mut rx = FramedRecv::new(rx, FrameLimits::default());
    let limits = FrameLimits::default();
    // A stream opened and reset before its first frame (the bound test) ends here.
    let Ok(Some(first)) = rx.next().await else {
        return;
    };
    let mut device_done = None;
    match first {
        Message::PriceRequest(r) => {
            let reply: Message = PriceReply {
                request_id: r.request_id,
                tier: Tier::Free,
                markup_bps: 0,
                prices: vec![],
                served: vec![],
                default_model: None,
            }
            .into();
            send(&mut tx, &reply, limits).await.unwrap();
        }
        Message::EscalationRequest(_) => {
            send(&mut tx, &chunk(0), limits).await.unwrap();
            let mut held = first_seen.lock().await;
            loop {
                tokio::select! {
                    _ = held.recv() => break,
                    end = device_end(rx.get_mut()), if device_done.is_none() => match end {
                        Seen::Finished => device_done = Some(Seen::Finished),
                        reset => {
                            let _ = seen.send(reset).await;
                            return;
                        }
                    },
                }
            }
            for seq in 1..CHUNKS {
                send(&mut tx, &chunk(seq), limits).await.unwrap();
            }
        }
        other => panic!("the fake cloud does not take {other:?}"),
    }
    let _ = tx.finish();
    let end = match device_done {
        Some(end) => end,
        None => device_end(rx.get_mut()).await,
    };
    let _ = seen.send(end).await;
}

/// How the device's half of a stream ends (nothing more is expected on it).
async fn device_end(rx: &mut quinn::RecvStream) -> Seen {
    match rx.read(&mut [0u8; 64]).await {
        Ok(None) => Seen::Finished,
        Err(quinn::ReadError::Reset(code)) => Seen::Reset(code),
        other => panic!("the device's half of the stream ended with {other:?}"),
    }
}

/// A service on a fresh runtime directory in front of a fake cloud.
struct Service {
    client: LocalClient,
    cloud_seen: mpsc::Receiver<Seen>,
    first_seen: mpsc::Sender<()>,
    backend: Arc<FakeTunnel>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    dir: tempfile::TempDir,
}

impl Service {
    async fn start() -> Service {
        let cloud = FakeCloud::start().await;
        let backend = Arc::new(FakeTunnel { conn: cloud.conn });
        let service = testing::Service::start(Arc::clone(&backend));
        Service {
            client: service.client,
            cloud_seen: cloud.seen,
            first_seen: cloud.first_seen,
            backend,
            stop: service.stop,
            task: service.task,
            dir: service.dir,
        }
    }

    async fn cloud_saw(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(5), self.cloud_saw_unbounded())
            .await
            .expect("the fake cloud reports how the stream ended")
    }

    async fn cloud_saw_unbounded(&mut self) -> Seen {
        self.cloud_seen.recv().await.unwrap()
    }
}

fn escalation() -> Message {
    synesis_proto::message::EscalationRequest {
        request_id: request_id(1),
        model: "m".into(),
        adapter: None,
        context: vec![],
        preferences: synesis_proto::message::Preferences {
            max_tokens: 16,
            temperature: 0.0,
            top_p: None,
            seed: None,
            stop: vec![],
            max_cost: None,
        },
        byok_key: None,
        shape: Default::default(),
    }
    .into()
}

#[tokio::test]
async fn a_reply_of_many_frames_streams_through_frame_by_frame() {
    let mut service = Service::start().await;
    let LocalStream { send, mut recv } = service.client.open_stream().await.unwrap();
    let mut send = send;
    send.send(&escalation()).await.unwrap();
    send.finish().await.unwrap();
    // The first chunk arrives while the cloud holds back the rest: nothing waits for the whole.
    assert_eq!(recv.next().await.unwrap(), Some(chunk(0)));
    service.first_seen.send(()).await.unwrap();
    for seq in 1..CHUNKS {
        assert_eq!(recv.next().await.unwrap(), Some(chunk(seq)), "chunk {seq}");
    }
    assert_eq!(recv.next().await.unwrap(), None, "the cloud finished");
    assert_eq!(recv.next().await.unwrap(), None);
    assert!(matches!(service.cloud_saw().await, Seen::Finished));
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_cloud_stream() {
    let mut service = Service::start().await;
    let LocalStream { mut send, mut recv } = service.client.open_stream().await.unwrap();
    send.send(&escalation()).await.unwrap();
    assert_eq!(recv.next().await.unwrap(), Some(chunk(0)));
    drop((send, recv));
    match service.cloud_saw().await {
        Seen::Reset(code) => assert_eq!(code, synesis_wire::close_code(ErrorCode::CANCELLED)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn an_account_request_gets_its_reply_and_status_and_ping_are_typed() {
    let mut service = Service::start().await;
    let asked: Message = PriceRequest {
        request_id: request_id(9),
    }
    .into();
    match service.client.request(&asked).await.unwrap() {
        Message::PriceReply(r) => assert_eq!(r.request_id, request_id(9)),
        other => panic!("{other:?}"),
    }
    assert!(matches!(service.cloud_saw().await, Seen::Finished));

    let status = service.client.status().await.unwrap();
    assert_eq!(status, service.backend.current_status());
    assert_eq!(
        service.client.ping().await.unwrap(),
        Duration::from_micros(1234)
    );
}

#[tokio::test]
async fn the_control_stream_cannot_be_opened_through_the_local_api() {
    let service = Service::start().await;
    let hello: Message = Hello {
        protocol_versions: vec![1],
        client: "x".into(),
        heartbeat_interval_ms: 1000,
        max_frame_bytes: 65536,
    }
    .into();
    let LocalStream { mut send, mut recv } = service.client.open_stream().await.unwrap();
    send.send(&hello).await.unwrap();
    match recv.next().await {
        Err(ClientError::Stream(f)) => assert_eq!(f.kind, FailureKind::BadRequest, "{f}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn streams_in_flight_are_bounded_and_status_still_answers() {
    let service = Service::start().await;
    let mut open = Vec::new();
    for _ in 0..CLOUD_STREAMS_MAX {
        open.push(service.client.open_stream().await.unwrap());
    }
    match service.client.open_stream().await {
        Err(ClientError::Refused(f)) => assert_eq!(f.kind, FailureKind::Busy),
        other => panic!("{other:?}"),
    }
    service.client.status().await.unwrap();
    // A stream that ends gives its place back.
    drop(open.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut again = None;
    while again.is_none() && tokio::time::Instant::now() < deadline {
        match service.client.open_stream().await {
            Ok(stream) => again = Some(stream),
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
    assert!(again.is_some(), "the place was never given back");
}

#[tokio::test]
async fn one_service_per_directory_and_a_stale_socket_is_replaced() {
    let mut service = Service::start().await;
    match bind(service.dir.path()) {
        Err(BindError::AlreadyRunning { pid, .. }) => {
            assert_eq!(pid, Some(std::process::id()));
        }
        other => panic!("{other:?}"),
    }
    // A socket left behind (here: a plain file) does not stop the next service.
    service.stop.take().unwrap().send(()).unwrap();
    (&mut service.task).await.unwrap();
    assert!(!socket_path(service.dir.path()).exists(), "removed on stop");
    std::fs::write(socket_path(service.dir.path()), b"stale").unwrap();
    let (_listener, _lock) = bind(service.dir.path()).unwrap();
    use std::os::unix::fs::FileTypeExt;
    let socket = std::fs::metadata(socket_path(service.dir.path())).unwrap();
    assert!(socket.file_type().is_socket());
}

#[tokio::test]
async fn nothing_listening_is_not_running() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        LocalClient::new(dir.path()).status().await,
        Err(ClientError::NotRunning)
    ));
}

/// Local work that counts to `n` in pieces, a piece at a time when told to go on; its drop is
/// reported (the service dropping it is how the work stops).
struct Counting {
    go: Arc<tokio::sync::Semaphore>,
    dropped: mpsc::Sender<()>,
}

struct DropSignal(mpsc::Sender<()>);

impl Drop for DropSignal {
    fn drop(&mut self) {
        let _ = self.0.try_send(());
    }
}

impl LocalWork for Counting {
    fn run(&self, work: serde_json::Value, pieces: mpsc::Sender<String>) -> WorkFuture {
        let (go, signal) = (Arc::clone(&self.go), DropSignal(self.dropped.clone()));
        Box::pin(async move {
            let _signal = signal;
            let n = work["count"].as_u64().ok_or("no count")?;
            for i in 0..n {
                go.acquire().await.unwrap().forget();
                pieces
                    .send(format!("{i} "))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Ok(serde_json::json!({"counted": n}))
        })
    }
}

#[tokio::test]
async fn local_work_streams_its_pieces_then_its_result_and_stops_when_its_client_leaves() {
    let loopback = Loopback::start(|_tx, _rx| async {}).await;
    let (dropped, mut was_dropped) = mpsc::channel(4);
    let go = Arc::new(tokio::sync::Semaphore::new(0));
    let worker = Arc::new(Counting {
        go: Arc::clone(&go),
        dropped,
    });
    let service = testing::Service::start_with(
        Arc::new(FakeTunnel {
            conn: loopback.conn.clone(),
        }),
        Some(worker),
    );

    go.add_permits(3);
    let mut text = String::new();
    let result = service
        .client
        .work(&serde_json::json!({"count": 3}), &mut |p| text.push_str(p))
        .await
        .unwrap();
    assert_eq!(
        (text.as_str(), result["counted"].as_u64()),
        ("0 1 2 ", Some(3))
    );
    was_dropped.recv().await.unwrap();

    // A failure is the worker's own words.
    let refused = service
        .client
        .work(&serde_json::json!({}), &mut |_| {})
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("no count"), "{refused}");
    was_dropped.recv().await.unwrap();

    // A client that leaves mid-work: the work is dropped, not finished.
    go.add_permits(1);
    let mut first = None;
    let client = service.client.clone();
    let (got_first, mut first_seen) = mpsc::channel(1);
    let leaving = tokio::spawn(async move {
        client
            .work(&serde_json::json!({"count": 1000}), &mut |p| {
                if first.is_none() {
                    first = Some(p.to_owned());
                    let _ = got_first.try_send(());
                }
            })
            .await
    });
    first_seen.recv().await.unwrap();
    leaving.abort();
    tokio::time::timeout(Duration::from_secs(5), was_dropped.recv())
        .await
        .expect("the work stops when its client leaves")
        .unwrap();
}

/// A tunnel that is reconnecting until `connected` is set: until then it opens no stream.
/// With `connects_when_wanted`, a client's wait connects it (a reconnect brought forward).
struct Reconnecting {
    inner: FakeTunnel,
    connected: std::sync::atomic::AtomicBool,
    connects_when_wanted: bool,
    wanted: std::sync::atomic::AtomicUsize,
}

impl Reconnecting {
    fn new(conn: quinn::Connection, connects_when_wanted: bool) -> Arc<Reconnecting> {
        Arc::new(Reconnecting {
            inner: FakeTunnel { conn },
            connected: false.into(),
            connects_when_wanted,
            wanted: 0.into(),
        })
    }
}

impl Backend for Reconnecting {
    fn current_status(&self) -> crate::TunnelStatus {
        let mut status = self.inner.current_status();
        if !self.connected.load(std::sync::atomic::Ordering::SeqCst) {
            status.state = crate::TunnelState::Reconnecting;
        }
        status
    }

    async fn measure_ping(&self) -> Result<Duration, crate::PingError> {
        self.inner.measure_ping().await
    }

    fn want_connection(&self) {
        self.wanted
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.connects_when_wanted {
            self.connected
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
    }

    async fn open_cloud_stream(
        &self,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), crate::OpenError> {
        if self.connected.load(std::sync::atomic::Ordering::SeqCst) {
            self.inner.open_cloud_stream().await
        } else {
            Err(crate::OpenError::NotConnected(
                crate::TunnelState::Reconnecting,
            ))
        }
    }
}

#[tokio::test]
async fn a_stream_asked_for_while_the_tunnel_reconnects_waits_for_it() {
    let cloud = FakeCloud::start().await;
    let backend = Reconnecting::new(cloud.conn, false);
    let wait = Duration::from_secs(10);
    let service = testing::Service::start_waiting(Arc::clone(&backend), None, wait);
    let asked: Message = PriceRequest {
        request_id: request_id(9),
    }
    .into();
    // The tunnel connects while the request waits: it is answered.
    let connects = {
        let backend = Arc::clone(&backend);
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            backend
                .connected
                .store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    match service.client.request(&asked).await {
        Ok(Message::PriceReply(r)) => assert_eq!(r.request_id, request_id(9)),
        other => panic!("waited for the tunnel, then answered: {other:?}"),
    }
    connects.await.unwrap();
}

/// The wait tells the tunnel that a client waits, so that a reconnect in a long backoff is
/// tried sooner (`Event::Wanted`): here that attempt connects, and the request is answered.
#[tokio::test]
async fn a_waiting_stream_asks_the_tunnel_to_reconnect_sooner() {
    let cloud = FakeCloud::start().await;
    let backend = Reconnecting::new(cloud.conn, true);
    let service =
        testing::Service::start_waiting(Arc::clone(&backend), None, Duration::from_secs(10));
    let asked: Message = PriceRequest {
        request_id: request_id(10),
    }
    .into();
    match service.client.request(&asked).await {
        Ok(Message::PriceReply(r)) => assert_eq!(r.request_id, request_id(10)),
        other => panic!("the wanted reconnect answered it: {other:?}"),
    }
    assert_eq!(backend.wanted.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_tunnel_that_does_not_reconnect_in_time_is_refused_after_the_wait() {
    let cloud = FakeCloud::start().await;
    let backend = Reconnecting::new(cloud.conn, false);
    let wait = Duration::from_millis(400);
    let service = testing::Service::start_waiting(Arc::clone(&backend), None, wait);
    let started = std::time::Instant::now();
    match service.client.open_stream().await {
        Err(ClientError::Refused(f)) => assert_eq!(f.kind, FailureKind::NotConnected),
        other => panic!("{:?}", other.map(|_| "a stream")),
    }
    assert!(started.elapsed() >= wait, "refused only after the wait");
}
