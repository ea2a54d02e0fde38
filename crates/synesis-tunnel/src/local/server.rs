//! The service side of the local API (the protocol is described in [`super`]).
//!
//! [`serve`] runs the accept loop; each client is a task of its own (in a `JoinSet` the loop
//! owns, so stopping the loop stops its clients). A client that opens a cloud stream is served by
//! two halves (THREAD_SAFETY_PATTERNS.md §2): `upstream` owns the socket's read half and the QUIC
//! send half, `downstream` the QUIC receive half and the socket's write half; the client's task
//! owns both futures and decides, when one ends, what becomes of the other.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use synesis_proto::{ErrorCode, FrameLimits, Message, MessageType, StreamKind};
use synesis_wire::close_code;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, broadcast, mpsc, watch};
use tokio::task::JoinSet;

use super::events::{self, Event, EventSender, Outcome, What, emit};
use super::{
    FailureKind, FrameFault, Header, LOCAL_REPLY, LOCAL_REQUEST, LocalFailure, LocalReply,
    LocalRequest, lock_path, read_header, read_payload, socket_path, write_local,
};
use crate::machine::CONNECT_TIMEOUT;
use crate::{OpenError, PingError, TunnelHandle, TunnelStatus};

/// Clients served at once; one more is dropped (it sees the connection close).
pub const CLIENTS_MAX: usize = 32;
/// Cloud streams open for clients at once; one more is refused with [`FailureKind::Busy`].
pub const CLOUD_STREAMS_MAX: usize = 24;
/// The reference cloud's limit on concurrent bidirectional streams per connection
/// (proto/PROTOCOL.md §1; the cloud's `STREAMS_PER_CONNECTION_MAX`, which
/// `tests/tests/local_api.rs` checks against this).
pub const CLOUD_STREAMS_PER_CONNECTION: usize = 32;
// Below the cloud's limit with room to spare for the control stream and the tunnel's own
// requests: a busy local API never makes the tunnel wait for a stream.
const _: () = assert!(CLOUD_STREAMS_MAX + 1 < CLOUD_STREAMS_PER_CONNECTION);
// Clients holding streams never take every place: a status or a ping still gets one.
const _: () = assert!(CLOUD_STREAMS_MAX < CLIENTS_MAX);
/// How long a client may take to say what it wants and have it done (a status, a ping, a
/// stream opened): one that connects and says nothing frees its place after this. Above the
/// tunnel's own bound on opening a stream (`CONNECT_TIMEOUT`), below the client's patience
/// ([`ASK_TIMEOUT`](super::client::ASK_TIMEOUT)). An open stream has no time limit: an
/// escalation may stream for minutes; the cloud's idle timeout and the client's own bound it.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(25);
const _: () = assert!(CLIENT_TIMEOUT.as_millis() > CONNECT_TIMEOUT.as_millis());
/// How long a client's stream waits for a tunnel that is reconnecting before it is refused
/// ([`ServeOptions::reconnect_wait`], `tunnel run --reconnect-wait`), unless told otherwise.
pub const RECONNECT_WAIT_DEFAULT: Duration = Duration::from_secs(10);
/// The longest such wait: it and opening the stream then fit the client's bound.
pub const RECONNECT_WAIT_MAX: Duration = Duration::from_secs(14);
const _: () = assert!(RECONNECT_WAIT_DEFAULT.as_millis() <= RECONNECT_WAIT_MAX.as_millis());
const _: () = assert!(
    CLIENT_TIMEOUT.as_millis() > RECONNECT_WAIT_MAX.as_millis() + CONNECT_TIMEOUT.as_millis()
);
/// How often a waiting client's stream looks at the tunnel's state again.
const RECONNECT_POLL: Duration = Duration::from_millis(50);
/// After a failed accept (out of file descriptors, say), the pause before the next; doubled
/// while failures follow one another, up to `ACCEPT_RETRY_MAX`.
const ACCEPT_RETRY: Duration = Duration::from_millis(250);
const ACCEPT_RETRY_MAX: Duration = Duration::from_secs(8);
/// Bytes copied at a time when a frame's payload passes through.
const COPY_CHUNK_BYTES: usize = 16 * 1024;

/// What the local API needs of the tunnel: [`TunnelHandle`] in production, a plain QUIC
/// connection in tests.
pub trait Backend: Send + Sync + 'static {
    fn current_status(&self) -> TunnelStatus;
    fn measure_ping(&self) -> impl Future<Output = Result<Duration, PingError>> + Send;
    fn open_cloud_stream(
        &self,
    ) -> impl Future<Output = Result<(quinn::SendStream, quinn::RecvStream), OpenError>> + Send;

    /// Says that a client waits for the connection (a reconnect may be tried sooner).
    fn want_connection(&self) {}

    /// Waits until the tunnel is connected, `within` at most: whether it is.
    fn connected_within(&self, within: Duration) -> impl Future<Output = bool> + Send {
        async move {
            let deadline = tokio::time::Instant::now() + within;
            loop {
                if self.current_status().state == crate::TunnelState::Connected {
                    return true;
                }
                if tokio::time::Instant::now() >= deadline {
                    return false;
                }
                tokio::time::sleep(RECONNECT_POLL).await;
            }
        }
    }
}

impl Backend for TunnelHandle {
    fn current_status(&self) -> TunnelStatus {
        TunnelHandle::status(self).borrow().clone()
    }

    fn measure_ping(&self) -> impl Future<Output = Result<Duration, PingError>> + Send {
        TunnelHandle::ping(self)
    }

    fn open_cloud_stream(
        &self,
    ) -> impl Future<Output = Result<(quinn::SendStream, quinn::RecvStream), OpenError>> + Send
    {
        TunnelHandle::open_stream(self)
    }

    fn want_connection(&self) {
        TunnelHandle::want_connection(self);
    }
}

/// The running service's claim on a runtime directory: an advisory lock (`flock`) on
/// [`lock_path`] held for as long as this value lives, the file holding the service's pid. The
/// kernel releases the lock when the process ends however it ends (`kill -9` too), so a lock
/// file left behind never blocks the next start; the file itself is kept (removing it would let
/// two starts lock two different files).
#[derive(Debug)]
pub struct ServiceLock {
    _file: std::fs::File,
}

/// The bound socket; dropping it removes the socket file.
#[derive(Debug)]
pub struct LocalListener {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for LocalListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error(
        "a tunnel service is already running for this device ({}; lock {})",
        describe_pid(*.pid),
        .lock.display()
    )]
    AlreadyRunning { pid: Option<u32>, lock: PathBuf },
    #[error("cannot {what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn describe_pid(pid: Option<u32>) -> String {
    // None while the holder is between taking the lock and writing its pid.
    pid.map_or_else(|| "pid not written yet".to_owned(), |p| format!("pid {p}"))
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BindError {
    let path = path.to_owned();
    move |source| BindError::Io { what, path, source }
}

/// Claims `runtime_dir` (created 0700 if missing) and binds its socket (0600). One service per
/// directory: a second is refused with the first one's pid. Once the lock is held, a socket
/// left behind is stale (its service died without removing it) and is replaced. Keep the lock
/// until the service has stopped altogether (its connection closed too).
pub fn bind(runtime_dir: &Path) -> Result<(LocalListener, ServiceLock), BindError> {
    std::fs::create_dir_all(runtime_dir).map_err(io_error("create", runtime_dir))?;
    set_mode(runtime_dir, 0o700)?;
    let lock = lock(&lock_path(runtime_dir))?;
    let path = socket_path(runtime_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(socket = %path.display(), "replaced the socket of a service that did not stop cleanly")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("remove", &path)(e)),
    }
    let listener = UnixListener::bind(&path).map_err(io_error("listen on", &path))?;
    let listener = LocalListener { listener, path };
    set_mode(&listener.path, 0o600)?;
    Ok((listener, lock))
}

/// The pid of the service holding `runtime_dir`'s lock, or `None` when no service runs there
/// (the lock is free, whatever a stale lock file says). Asks without taking the lock for long:
/// a free lock is released at once.
pub fn running_service(runtime_dir: &Path) -> Result<Option<u32>, BindError> {
    use std::io::Read;
    let path = lock_path(runtime_dir);
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("open", &path)(e)),
    };
    match file.try_lock_shared() {
        Ok(()) => return Ok(None),
        Err(std::fs::TryLockError::WouldBlock) => {}
        Err(std::fs::TryLockError::Error(e)) => return Err(io_error("lock", &path)(e)),
    }
    // The holder writes its pid right after taking the lock.
    for _ in 0..50 {
        let mut text = String::new();
        if file.read_to_string(&mut text).is_ok()
            && let Ok(pid) = text.trim().parse()
        {
            return Ok(Some(pid));
        }
        std::thread::sleep(Duration::from_millis(10));
        let _ = std::io::Seek::rewind(&mut file);
    }
    Err(BindError::AlreadyRunning {
        pid: None,
        lock: path,
    })
}

fn set_mode(path: &Path, mode: u32) -> Result<(), BindError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_error("set the permissions of", path))
}

fn lock(path: &Path) -> Result<ServiceLock, BindError> {
    use std::io::{Read, Seek, Write};
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        // Not before the lock is ours: the pid in it is the running service's.
        .truncate(false)
        .open(path)
        .map_err(io_error("open", path))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Err(BindError::AlreadyRunning {
                pid: text.trim().parse().ok(),
                lock: path.to_owned(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => return Err(io_error("lock", path)(e)),
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .and_then(|()| file.sync_all())
        .map_err(io_error("write", path))?;
    Ok(ServiceLock { _file: file })
}

/// How [`serve`] runs.
#[derive(Clone)]
pub struct ServeOptions {
    /// How long clients being served may go on once `stop` completed.
    pub grace: Duration,
    /// Where escalations and uploads passing through are reported, and what `events` clients
    /// subscribe to (the service's other parts send on it too).
    pub events: EventSender,
    /// The work the service does itself for `work` clients, if any.
    pub work: Option<Arc<dyn LocalWork>>,
    /// How long a client's stream (`open`) waits for a tunnel that is not connected — one
    /// reconnecting — before it is refused (at most [`RECONNECT_WAIT_MAX`]).
    pub reconnect_wait: Duration,
}

impl std::fmt::Debug for ServeOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServeOptions")
            .field("grace", &self.grace)
            .field("work", &self.work.is_some())
            .field("reconnect_wait", &self.reconnect_wait)
            .finish_non_exhaustive()
    }
}

/// What [`LocalWork::run`] returns: the work's result, or why it failed.
pub type WorkFuture =
    std::pin::Pin<Box<dyn Future<Output = Result<serde_json::Value, String>> + Send + 'static>>;

/// Work the service does itself for its clients — generations with the models it keeps loaded
/// (the CLI's model host) — described in the worker's own JSON, so that this crate knows
/// nothing of models. Dropping the future stops the work (its client left).
pub trait LocalWork: Send + Sync + 'static {
    /// Starts `work`; each piece of text it makes goes to `pieces`, in order.
    fn run(&self, work: serde_json::Value, pieces: mpsc::Sender<String>) -> WorkFuture;
}

/// `events` clients at once: each holds a client's place for as long as it listens, so they
/// never take the places status, ping and streams need.
pub const EVENT_SUBSCRIBERS_MAX: usize = 4;
const _: () = assert!(EVENT_SUBSCRIBERS_MAX + CLOUD_STREAMS_MAX < CLIENTS_MAX);

/// Pieces of local work waiting for their client (the work waits while they are this many).
const WORK_PIECES_BUFFERED: usize = 64;

/// Serves the local API until `stop` completes. Then it drains: the socket is removed at once
/// (a new command finds no service and goes on a connection of its own), the clients being
/// served go on — an escalation streams to its end — for up to `grace`, and those still there
/// after it are stopped (their cloud streams reset) before it returns.
pub async fn serve<B: Backend>(
    listener: LocalListener,
    backend: Arc<B>,
    stop: impl Future<Output = ()>,
    options: ServeOptions,
) {
    let ServeOptions {
        grace,
        events,
        work,
        reconnect_wait,
    } = options;
    let places = Arc::new(Semaphore::new(CLIENTS_MAX));
    let streams = Streams {
        places: Arc::new(Semaphore::new(CLOUD_STREAMS_MAX)),
        stopping: watch::channel(false).0,
        events,
        work,
        subscribers: Arc::new(Semaphore::new(EVENT_SUBSCRIBERS_MAX)),
        reconnect_wait: reconnect_wait.min(RECONNECT_WAIT_MAX),
    };
    let mut clients = JoinSet::new();
    let mut pause = ACCEPT_RETRY;
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut stop => break,
            Some(_) = clients.join_next(), if !clients.is_empty() => continue,
            accepted = listener.listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                pause = ACCEPT_RETRY;
                stream
            }
            Err(e) => {
                // Usually passing (no file descriptor left): the API must outlive it.
                tracing::warn!(error = %e, retry_in = ?pause, "the local API cannot accept a client");
                tokio::select! {
                    biased;
                    () = &mut stop => break,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(ACCEPT_RETRY_MAX);
                continue;
            }
        };
        let Ok(place) = Arc::clone(&places).try_acquire_owned() else {
            continue; // too many clients: drop this one, it sees the connection close
        };
        let backend = Arc::clone(&backend);
        let streams = streams.clone();
        clients.spawn(async move {
            client(stream, &*backend, &streams).await;
            drop(place);
        });
    }
    drop(listener);
    // Streams cut from here on are the service's doing, not their clients': the cloud keeps
    // their work for the clients to resume on connections of their own.
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    emit(&streams.events, What::Stopping { grace_ms });
    streams.stopping.send_replace(true);
    if !clients.is_empty() {
        tracing::info!(
            clients = clients.len(),
            ?grace,
            "draining: the clients being served may finish"
        );
    }
    let drained = tokio::time::timeout(grace, async {
        while clients.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            clients = clients.len(),
            "still busy after the grace period; their streams are reset"
        );
    }
    clients.shutdown().await;
}

/// The cloud streams the service holds for clients: how many more it may open, and whether the
/// service is stopping.
#[derive(Clone)]
struct Streams {
    places: Arc<Semaphore>,
    stopping: watch::Sender<bool>,
    events: EventSender,
    work: Option<Arc<dyn LocalWork>>,
    subscribers: Arc<Semaphore>,
    reconnect_wait: Duration,
}

async fn client<B: Backend>(stream: UnixStream, backend: &B, streams: &Streams) {
    let (mut read, mut write) = stream.into_split();
    let opened = tokio::time::timeout(
        CLIENT_TIMEOUT,
        opening(&mut read, &mut write, backend, streams),
    )
    .await;
    match opened {
        Ok(Ok(Next::Done)) => {}
        Ok(Ok(Next::Proxy((send, recv, permit)))) => {
            proxy(read, write, send, recv, &streams.events).await;
            drop(permit);
        }
        Ok(Ok(Next::Events(subscription, place))) => {
            feed(read, write, subscription, streams.stopping.subscribe()).await;
            drop(place);
        }
        Ok(Ok(Next::Work(worker, work))) => serve_work(read, write, &*worker, work).await,
        Ok(Err(e)) => tracing::debug!(error = %e, "local API client failed"),
        Err(_) => tracing::debug!("local API client dropped after {CLIENT_TIMEOUT:?}"),
    }
}

type Opened = (Upstream, quinn::RecvStream, OwnedSemaphorePermit);

/// What a client's connection carries after its request was answered.
enum Next {
    Done,
    Proxy(Opened),
    Events(broadcast::Receiver<Event>, OwnedSemaphorePermit),
    Work(Arc<dyn LocalWork>, serde_json::Value),
}

/// Local work for one client: its pieces as they come, then its result; the client leaving
/// (its socket's end) drops the work, which stops it.
async fn serve_work(
    mut read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
    worker: &dyn LocalWork,
    work: serde_json::Value,
) {
    let (tx, mut pieces) = mpsc::channel(WORK_PIECES_BUFFERED);
    let running = worker.run(work, tx);
    tokio::pin!(running);
    let mut probe = [0u8; 1];
    let mut more = true;
    let result = loop {
        tokio::select! {
            biased;
            piece = pieces.recv(), if more => match piece {
                Some(text) => {
                    if write_local(&mut write, LOCAL_REPLY, &LocalReply::Piece { text }).await.is_err() {
                        return;
                    }
                }
                None => more = false,
            },
            result = &mut running => break result,
            // The client sends nothing more: anything (or the end) means it left.
            _ = read.read(&mut probe) => return,
        }
    };
    // What the work made before it ended, then its end.
    while let Ok(text) = pieces.try_recv() {
        if write_local(&mut write, LOCAL_REPLY, &LocalReply::Piece { text })
            .await
            .is_err()
        {
            return;
        }
    }
    let reply = match result {
        Ok(result) => LocalReply::Worked { result },
        Err(why) => LocalReply::Refused {
            failure: LocalFailure::new(FailureKind::WorkFailed, why),
        },
    };
    let _ = write_local(&mut write, LOCAL_REPLY, &reply).await;
}

/// Events to an `events` client until it leaves or the service stops (the drain waits for
/// no subscriber: the `stopping` event is its last).
async fn feed(
    mut read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
    mut subscription: broadcast::Receiver<Event>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut probe = [0u8; 1];
    loop {
        if *stopping.borrow_and_update() {
            // What was sent before the stop (the `stopping` event itself) goes out first.
            while let Ok(event) = subscription.try_recv() {
                if write_local(&mut write, LOCAL_REPLY, &LocalReply::Event { event })
                    .await
                    .is_err()
                {
                    return;
                }
            }
            break;
        }
        let event = tokio::select! {
            // The client sends nothing more: anything (or the end) means it left.
            _ = read.read(&mut probe) => return,
            changed = stopping.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
            received = subscription.recv() => match received {
                Ok(event) => event,
                Err(broadcast::error::RecvError::Lagged(count)) => Event {
                    at: crate::clock::unix_now(),
                    what: What::Missed { count },
                },
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        if write_local(&mut write, LOCAL_REPLY, &LocalReply::Event { event })
            .await
            .is_err()
        {
            return;
        }
    }
    let _ = write_local(&mut write, LOCAL_REPLY, &LocalReply::End { failure: None }).await;
}

/// The client's request, answered; a cloud stream when it asked for one.
async fn opening<B: Backend>(
    read: &mut OwnedReadHalf,
    write: &mut OwnedWriteHalf,
    backend: &B,
    streams: &Streams,
) -> Result<Next, FrameFault> {
    let request = match read_request(read).await {
        Ok(request) => request,
        Err(e) => {
            let failure = LocalFailure::new(FailureKind::BadRequest, e.to_string());
            write_local(write, LOCAL_REPLY, &LocalReply::Refused { failure }).await?;
            return Ok(Next::Done);
        }
    };
    let refused = |kind, message: String| LocalReply::Refused {
        failure: LocalFailure::new(kind, message),
    };
    let (reply, opened) = match request {
        LocalRequest::Status => {
            let status = backend.current_status();
            (LocalReply::Status { status }, None)
        }
        LocalRequest::Ping => match backend.measure_ping().await {
            Ok(rtt) => {
                let rtt_nanos = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX);
                (LocalReply::Pong { rtt_nanos }, None)
            }
            Err(e @ (PingError::NotConnected(_) | PingError::Stopped)) => {
                (refused(FailureKind::NotConnected, e.to_string()), None)
            }
            Err(e) => (refused(FailureKind::StreamFailed, e.to_string()), None),
        },
        LocalRequest::Open => match Arc::clone(&streams.places).try_acquire_owned() {
            Err(_) => (
                refused(
                    FailureKind::Busy,
                    format!("{CLOUD_STREAMS_MAX} cloud streams are in flight"),
                ),
                None,
            ),
            Ok(permit) => match open_waiting(backend, streams.reconnect_wait).await {
                Ok((send, recv)) => {
                    let send = Upstream {
                        send,
                        done: false,
                        stopping: streams.stopping.subscribe(),
                    };
                    (LocalReply::Opened, Some((send, recv, permit)))
                }
                Err(e @ (OpenError::NotConnected(_) | OpenError::Stopped)) => {
                    (refused(FailureKind::NotConnected, e.to_string()), None)
                }
                Err(e) => (refused(FailureKind::StreamFailed, e.to_string()), None),
            },
        },
        LocalRequest::Finish => (
            refused(FailureKind::BadRequest, "no stream to finish".into()),
            None,
        ),
        LocalRequest::Work { work } => match &streams.work {
            Some(worker) => {
                return Ok(Next::Work(Arc::clone(worker), work));
            }
            None => (
                refused(
                    FailureKind::WorkFailed,
                    "this service does no local work".into(),
                ),
                None,
            ),
        },
        LocalRequest::Events => {
            let Ok(place) = Arc::clone(&streams.subscribers).try_acquire_owned() else {
                let failure = LocalFailure::new(
                    FailureKind::Busy,
                    format!("{EVENT_SUBSCRIBERS_MAX} clients follow the events already"),
                );
                write_local(write, LOCAL_REPLY, &LocalReply::Refused { failure }).await?;
                return Ok(Next::Done);
            };
            let subscription = streams.events.subscribe();
            write_local(write, LOCAL_REPLY, &LocalReply::Subscribed).await?;
            // Where things stand, first.
            let now = backend.current_status();
            let event = Event {
                at: crate::clock::unix_now(),
                what: What::State {
                    state: now.state,
                    reconnects: now.reconnects,
                    reason: now.failure,
                },
            };
            write_local(write, LOCAL_REPLY, &LocalReply::Event { event }).await?;
            return Ok(Next::Events(subscription, place));
        }
    };
    write_local(write, LOCAL_REPLY, &reply).await?;
    Ok(opened.map_or(Next::Done, Next::Proxy))
}

/// A cloud stream; a tunnel that is not connected (reconnecting) is waited for, `wait` at
/// most, before the stream is refused.
async fn open_waiting<B: Backend>(
    backend: &B,
    wait: Duration,
) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
    let state = backend.current_status().state;
    if state != crate::TunnelState::Connected && !wait.is_zero() {
        tracing::info!(
            ?state,
            ?wait,
            "a client's stream waits for the tunnel to connect"
        );
        backend.want_connection();
        if !backend.connected_within(wait).await {
            tracing::info!(
                ?wait,
                "the tunnel did not connect in time; the stream is refused"
            );
        }
    }
    backend.open_cloud_stream().await
}

async fn read_request(read: &mut OwnedReadHalf) -> Result<LocalRequest, FrameFault> {
    match read_header(read, true).await? {
        Some(Header::Local {
            ty: LOCAL_REQUEST,
            len,
        }) => Ok(serde_json::from_slice(&read_payload(read, len).await?)?),
        Some(_) => Err(FrameFault::Unexpected(
            "the first frame must be a local request",
        )),
        None => Err(FrameFault::Truncated),
    }
}

/// The QUIC send half of a client's stream: reset when dropped unfinished (quinn would finish
/// it, and the cloud would take a cut-off stream for a whole one) — with `CANCELLED` when its
/// client went away, `UNAVAILABLE` when the service is stopping (the cloud then keeps the work
/// for the client to resume elsewhere: PROTOCOL.md §2).
struct Upstream {
    send: quinn::SendStream,
    done: bool,
    stopping: watch::Receiver<bool>,
}

impl Upstream {
    fn finish(&mut self) {
        self.done = true;
        let _ = self.send.finish();
    }

    fn cancel(&mut self) {
        self.done = true;
        let _ = self.send.reset(close_code(ErrorCode::CANCELLED));
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if self.done {
        } else if *self.stopping.borrow() {
            self.done = true;
            let _ = self.send.reset(close_code(ErrorCode::UNAVAILABLE));
        } else {
            self.cancel();
        }
    }
}

/// How the client → cloud half ended.
#[derive(Debug)]
enum Up {
    /// The client said `finish`; the QUIC send half is finished.
    Finished,
    /// The client went away without `finish`.
    ClientGone(String),
    /// The client broke the local protocol (or sent a frame its stream may not carry).
    ClientFault(String),
    /// The cloud side cannot take more (stopped, or the connection failed); the other half
    /// reports it.
    CloudGone,
}

/// How the cloud → client half ended.
#[derive(Debug)]
enum Down {
    /// The end was told to the client (finished, or failed with a reason).
    Told,
    /// The client cannot be written to any more.
    ClientGone,
}

async fn proxy(
    mut read: OwnedReadHalf,
    mut write: OwnedWriteHalf,
    mut send: Upstream,
    mut recv: quinn::RecvStream,
    events: &EventSender,
) {
    let mut up_done = None;
    let mut down_done = None;
    // What the stream is (from its first frame) and the cloud's last word on it.
    let mut start: Option<What> = None;
    let mut last: Option<Message> = None;
    {
        let up = upstream(&mut read, &mut send, &mut start, events);
        let down = downstream(&mut recv, &mut write, &mut last);
        tokio::pin!(up, down);
        loop {
            tokio::select! {
                r = &mut up, if up_done.is_none() => up_done = Some(r),
                r = &mut down, if down_done.is_none() => down_done = Some(r),
            }
            match (&up_done, &down_done) {
                // The client is done sending (or the cloud stopped listening): the answer
                // goes on until the cloud ends it.
                (Some(Up::Finished | Up::CloudGone), None) => {}
                // Nobody listens for the answer, or the cloud has ended the stream: whatever
                // the client still had to send is not wanted.
                (Some(Up::ClientGone(_) | Up::ClientFault(_)), _) | (_, Some(_)) => break,
                (None, None) => {}
            }
        }
    }
    let cancelled = match (&up_done, &down_done) {
        (Some(Up::ClientGone(why)), _) => {
            tracing::debug!(why, "a local client left its cloud stream; cancelling it");
            true
        }
        (Some(Up::ClientFault(why)), _) => {
            tracing::debug!(
                why,
                "a local client broke the protocol; cancelling its stream"
            );
            let failure = LocalFailure::new(FailureKind::BadRequest, why.clone());
            let end = LocalReply::End {
                failure: Some(failure),
            };
            let _ = write_local(&mut write, LOCAL_REPLY, &end).await;
            true
        }
        (_, Some(Down::ClientGone)) => true,
        _ => false,
    };
    if cancelled {
        // `CANCELLED` also while the service drains: nobody comes back for this one.
        send.cancel();
        let _ = recv.stop(close_code(ErrorCode::CANCELLED));
    }
    let cut = if cancelled {
        Outcome::Cancelled
    } else {
        Outcome::Cut
    };
    if let Some(end) = start
        .as_ref()
        .and_then(|s| events::finished(s, last.as_ref(), cut))
    {
        emit(events, end);
    }
    drop(send); // reset unless finished
}

/// Client → cloud: frames through, until `finish` or the client is gone. The first frame is
/// decoded on its way (`start`, reported to `events`).
async fn upstream(
    read: &mut OwnedReadHalf,
    send: &mut Upstream,
    start: &mut Option<What>,
    events: &EventSender,
) -> Up {
    let mut kind: Option<StreamKind> = None;
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    loop {
        let header = match read_header(read, true).await {
            Ok(Some(h)) => h,
            Ok(None) => return Up::ClientGone("the client closed without finishing".into()),
            Err(e @ (FrameFault::Truncated | FrameFault::Io(_))) => {
                return Up::ClientGone(e.to_string());
            }
            Err(e) => return Up::ClientFault(e.to_string()),
        };
        let ty = match header {
            Header::Local {
                ty: LOCAL_REQUEST,
                len,
            } => {
                let request = match read_payload(read, len).await {
                    Ok(p) => serde_json::from_slice::<LocalRequest>(&p),
                    Err(e) => return Up::ClientGone(e.to_string()),
                };
                return match request {
                    Ok(LocalRequest::Finish) => {
                        send.finish();
                        Up::Finished
                    }
                    Ok(other) => Up::ClientFault(format!("{other:?} inside a cloud stream")),
                    Err(e) => Up::ClientFault(e.to_string()),
                };
            }
            Header::Local { ty, .. } => {
                return Up::ClientFault(format!("frame type {ty:#04x} from a client"));
            }
            Header::Cloud { ty, .. } => ty,
        };
        let first = kind.is_none();
        match (kind, ty.stream()) {
            (None, k @ (StreamKind::Escalation | StreamKind::Upload | StreamKind::Account)) => {
                kind = Some(k);
            }
            (Some(open), k) if k == open || ty == MessageType::ErrorMsg => {}
            _ => {
                return Up::ClientFault(format!(
                    "{} may not travel on this stream through the local API",
                    ty.name()
                ));
            }
        }
        let keep = first && kind != Some(StreamKind::Account);
        match copy_frame(read, &mut send.send, header, &mut buf, keep).await {
            Ok(kept) => {
                if let Some(what) = kept.as_ref().and_then(events::started) {
                    *start = Some(what.clone());
                    emit(events, what);
                }
            }
            Err(CopyError::Read(why)) => return Up::ClientGone(why),
            Err(CopyError::Write(why)) => {
                tracing::debug!(why, "the cloud takes no more of this stream");
                return Up::CloudGone;
            }
        }
    }
}

/// Cloud → client: frames through, then the end (finished or failed) as a local reply. The
/// frames that end a stream are decoded on their way (`last`).
async fn downstream(
    recv: &mut quinn::RecvStream,
    write: &mut OwnedWriteHalf,
    last: &mut Option<Message>,
) -> Down {
    let mut buf = vec![0u8; COPY_CHUNK_BYTES];
    let failure = loop {
        let header = match read_header(recv, false).await {
            Ok(Some(h)) => h,
            Ok(None) => break None,
            Err(e) => break Some(e.to_string()),
        };
        let keep = matches!(header, Header::Cloud { ty, .. } if events::ends_a_stream(ty));
        match copy_frame(recv, write, header, &mut buf, keep).await {
            Ok(kept) => {
                if kept.is_some() {
                    *last = kept;
                }
            }
            Err(CopyError::Read(why)) => break Some(why),
            Err(CopyError::Write(_)) => return Down::ClientGone,
        }
    };
    let end = LocalReply::End {
        failure: failure.map(|why| LocalFailure::new(FailureKind::StreamFailed, why)),
    };
    match write_local(write, LOCAL_REPLY, &end).await {
        Ok(()) => {
            let _ = write.shutdown().await;
            Down::Told
        }
        Err(_) => Down::ClientGone,
    }
}

enum CopyError {
    Read(String),
    Write(String),
}

/// One frame from `from` to `to`, its payload in chunks: never more than one chunk in memory,
/// whatever the frame's size — unless `keep` asks for the frame decoded on its way (a first
/// frame, at most 256 KiB, or a small last one); one that does not decode is passed on all the
/// same, for the cloud or the client to refuse.
async fn copy_frame<R, W>(
    from: &mut R,
    to: &mut W,
    header: Header,
    buf: &mut [u8],
    keep: bool,
) -> Result<Option<Message>, CopyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let write = |e: std::io::Error| CopyError::Write(e.to_string());
    let head = header.bytes();
    to.write_all(&head).await.map_err(write)?;
    let mut kept = keep.then(|| head.to_vec());
    let mut left = header.len() as usize;
    while left > 0 {
        let want = left.min(buf.len());
        let n = from
            .read(&mut buf[..want])
            .await
            .map_err(|e| CopyError::Read(e.to_string()))?;
        if n == 0 {
            return Err(CopyError::Read(FrameFault::Truncated.to_string()));
        }
        to.write_all(&buf[..n]).await.map_err(write)?;
        if let Some(kept) = &mut kept {
            kept.extend_from_slice(&buf[..n]);
        }
        left -= n;
    }
    to.flush().await.map_err(write)?;
    Ok(kept.and_then(|bytes| {
        match synesis_proto::decode_frame(&bytes, FrameLimits::new(u32::MAX)) {
            Ok(synesis_proto::Decoded::Frame { message, .. }) => Some(message),
            _ => None,
        }
    }))
}
