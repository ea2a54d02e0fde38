//! The driver: performs what the [`Machine`] asks with quinn and tokio, and feeds back what
//! happened (ARCHITECTURE.md §4, THREAD_SAFETY_PATTERNS.md §1: it holds no `if` about backoff or liveness; those are the machine's).
//!
//! [`Tunnel::spawn`] starts it as an actor (THREAD_SAFETY_PATTERNS.md §3): a bounded command
//! inbox, a `watch` channel with the [`TunnelStatus`], and a [`TunnelHandle`] whose drop stops
//! it. One connection at a time; each gets a generation number so that a late event from a
//! connection the machine already gave up on is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use synesis_proto::message::{Heartbeat, Hello};
use synesis_proto::vitals::Vitals;
use synesis_proto::{DeviceId, FrameLimits, Message, PROTOCOL_VERSION, UnixMillis};
use synesis_wire::{FramedRecv, send};
use tokio::sync::{mpsc, oneshot, watch};

use crate::clock::unix_now;
use crate::connect::{classify, classify_error_msg, client_endpoint, closed_or, dial, resolve};
use crate::identity::Identity;
use crate::machine::{Action, CONNECT_TIMEOUT, Config, Event, Failure, Machine, State};
use crate::request::RequestError;
use crate::tls::device_client_config;

/// Commands queued for the driver.
const COMMAND_INBOX_CAPACITY: usize = 16;
/// Events queued from the connection's reader.
const EVENT_INBOX_CAPACITY: usize = 32;
/// Frames queued for the connection's writer; a heartbeat that does not fit is dropped (the
/// machine notices missing acks).
const OUTBOX_CAPACITY: usize = 8;
/// Pings waiting for their ack.
const PINGS_IN_FLIGHT_MAX: usize = 16;

/// Where the tunnel is, as `synesis cloud status` shows it (serialised in snake case:
/// `connecting`, `connected`, `reconnecting`, `failed`, `stopped`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TunnelState {
    Connecting,
    Connected,
    Reconnecting,
    /// Failed for good (a revoked device, say): no further attempts.
    Failed,
    Stopped,
}

impl TunnelState {
    pub const fn as_str(self) -> &'static str {
        match self {
            TunnelState::Connecting => "connecting",
            TunnelState::Connected => "connected",
            TunnelState::Reconnecting => "reconnecting",
            TunnelState::Failed => "failed",
            TunnelState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for TunnelState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<State> for TunnelState {
    fn from(state: State) -> TunnelState {
        match state {
            State::Disconnected => TunnelState::Stopped,
            State::Connecting => TunnelState::Connecting,
            State::Connected => TunnelState::Connected,
            State::Reconnecting => TunnelState::Reconnecting,
            State::Failed => TunnelState::Failed,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TunnelStatus {
    pub state: TunnelState,
    pub device_id: DeviceId,
    pub account: String,
    pub server: String,
    pub rtt_ms: Option<f64>,
    pub last_heartbeat_ack_at: Option<UnixMillis>,
    pub connected_since: Option<UnixMillis>,
    pub reconnects: u64,
    pub failure: Option<String>,
    /// While reconnecting: when the next attempt starts (sooner when a client waits).
    #[serde(default)]
    pub next_attempt_at: Option<UnixMillis>,
}

#[derive(Debug, thiserror::Error)]
pub enum PingError {
    #[error("the tunnel is not connected ({0})")]
    NotConnected(&'static str),
    #[error("too many pings in flight")]
    Busy,
    #[error("the connection ended before the ack")]
    Lost,
    #[error("the tunnel stopped")]
    Stopped,
}

/// Why no stream could be opened on the tunnel's connection.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the tunnel is not connected ({0})")]
    NotConnected(TunnelState),
    #[error("no stream could be opened within {0:?}")]
    Timeout(Duration),
    #[error("the connection failed: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("the tunnel stopped")]
    Stopped,
}

enum Command {
    Ping(oneshot::Sender<Result<Duration, PingError>>),
    /// The live connection, for a stream of the asker's own.
    Connection(oneshot::Sender<Result<quinn::Connection, TunnelState>>),
    Request(Box<Message>, oneshot::Sender<Result<Message, RequestError>>),
    Prewarm(synesis_proto::message::Prewarm),
    /// A client waits for the connection ([`Event::Wanted`]).
    Wanted,
}

#[derive(Debug)]
pub struct Options {
    pub identity: Identity,
    pub config: Config,
    /// The latest vitals; each heartbeat carries the value current when it is sent.
    pub vitals: watch::Receiver<Vitals>,
    /// Seeds the backoff jitter.
    pub seed: u64,
    /// Where a renewed certificate is saved (the data directory); `None` keeps it in memory.
    pub data_dir: Option<std::path::PathBuf>,
}

/// Controls a running tunnel. Dropping it stops the tunnel and closes the connection.
#[derive(Debug)]
pub struct TunnelHandle {
    commands: mpsc::Sender<Command>,
    status: watch::Receiver<TunnelStatus>,
    task: tokio::task::JoinHandle<()>,
}

impl TunnelHandle {
    pub fn status(&self) -> watch::Receiver<TunnelStatus> {
        self.status.clone()
    }

    /// Measures the round trip of one heartbeat sent now.
    pub async fn ping(&self) -> Result<Duration, PingError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Ping(tx))
            .await
            .map_err(|_| PingError::Stopped)?;
        rx.await.map_err(|_| PingError::Stopped)?
    }

    /// Sends one request (an account request: usage, top-up, …) on a new stream of the
    /// tunnel's connection and returns the cloud's reply as it came, an `ErrorMsg` too (the
    /// local API passes it on as a frame; [`answer`](crate::request::answer) interprets it).
    /// Fails at once with [`RequestError::NotConnected`] when the tunnel is not connected, or
    /// [`RequestError::Stopped`]; the caller may then use a connection of its own
    /// ([`request`](crate::request::request)) with the same request id.
    pub async fn request(&self, message: Message) -> Result<Message, RequestError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Request(Box::new(message), tx))
            .await
            .map_err(|_| RequestError::Stopped)?;
        rx.await.map_err(|_| RequestError::Stopped)?
    }

    /// Opens a new bidirectional stream on the tunnel's connection, for the caller alone (an
    /// escalation, an upload, an account request), within [`CONNECT_TIMEOUT`] (opening waits
    /// while the connection's stream limit is reached). Fails at once when not connected.
    pub async fn open_stream(&self) -> Result<(quinn::SendStream, quinn::RecvStream), OpenError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Connection(tx))
            .await
            .map_err(|_| OpenError::Stopped)?;
        let conn = rx
            .await
            .map_err(|_| OpenError::Stopped)?
            .map_err(OpenError::NotConnected)?;
        tokio::time::timeout(CONNECT_TIMEOUT, conn.open_bi())
            .await
            .map_err(|_| OpenError::Timeout(CONNECT_TIMEOUT))?
            .map_err(OpenError::from)
    }

    /// Sends a pre-warm signal on the control stream: the cloud gets the model ready. Dropped
    /// (`false`) when not connected or the outbox is full: a signal is only worth its moment.
    /// The caller rate-limits (the vitals crate's `PrewarmPolicy`); the cloud throttles too.
    pub fn prewarm(&self, signal: synesis_proto::message::Prewarm) -> bool {
        self.commands.try_send(Command::Prewarm(signal)).is_ok()
    }

    /// Says that a client waits for the connection: a reconnect in a long backoff is tried
    /// sooner (at most one attempt a second; [`Event::Wanted`]). Dropped when the command queue
    /// is full: others are waiting already.
    pub fn want_connection(&self) {
        let _ = self.commands.try_send(Command::Wanted);
    }

    /// Stops the tunnel and waits until its connection is closed.
    pub async fn shutdown(self) {
        let TunnelHandle { commands, task, .. } = self;
        drop(commands);
        let _ = task.await;
    }
}

#[derive(Debug)]
pub struct Tunnel;

impl Tunnel {
    pub fn spawn(options: Options) -> TunnelHandle {
        let (commands_tx, commands) = mpsc::channel(COMMAND_INBOX_CAPACITY);
        let initial = status_of(
            &options.identity,
            &options.identity.info.server,
            &Machine::new(options.config, 0),
            &Clock::now(),
        );
        let (status_tx, status) = watch::channel(initial);
        let driver = Driver::new(options, commands, status_tx);
        let task = tokio::spawn(driver.run());
        TunnelHandle {
            commands: commands_tx,
            status,
            task,
        }
    }
}

/// Monotonic instants as wall-clock times, for people: one anchor read at start.
struct Clock {
    instant: Instant,
    wall: UnixMillis,
}

impl Clock {
    fn now() -> Clock {
        Clock {
            instant: Instant::now(),
            wall: unix_now(),
        }
    }

    fn wall(&self, at: Instant) -> UnixMillis {
        let since = at.saturating_duration_since(self.instant).as_millis();
        UnixMillis(
            self.wall
                .0
                .saturating_add(i64::try_from(since).unwrap_or(i64::MAX)),
        )
    }
}

fn status_of(identity: &Identity, server: &str, machine: &Machine, clock: &Clock) -> TunnelStatus {
    let s = machine.status();
    TunnelStatus {
        state: s.state.into(),
        device_id: identity.info.device_id,
        account: identity.info.account.clone(),
        server: server.to_owned(),
        rtt_ms: s.rtt.map(|d| d.as_secs_f64() * 1_000.0),
        last_heartbeat_ack_at: s.last_ack_at.map(|t| clock.wall(t)),
        connected_since: s.connected_since.map(|t| clock.wall(t)),
        reconnects: s.reconnects,
        failure: s.failure,
        next_attempt_at: s.retry_at.map(|t| clock.wall(t)),
    }
}

/// An established session: the writer's inbox and the connection.
struct Link {
    generation: u64,
    conn: quinn::Connection,
    outbox: mpsc::Sender<Message>,
}

enum LinkEvent {
    Message(Message),
    Lost(Failure),
    /// A certificate renewal finished: the new certificate, or why not.
    Renewed(Result<Vec<u8>, crate::renew::RenewError>),
}

/// After a failed renewal, the wait before the next try: short when the answer was lost, long
/// when the cloud said no (it will not change its mind in seconds).
const RENEW_RETRY: Duration = Duration::from_secs(10);
const RENEW_RETRY_REFUSED: Duration = Duration::from_secs(3_600);

/// A connection welcomed by the cloud: its control stream, and the other nodes it named.
struct Session {
    conn: quinn::Connection,
    tx: quinn::SendStream,
    rx: FramedRecv<quinn::RecvStream>,
    nodes: Vec<String>,
}

type Connecting = Pin<Box<dyn Future<Output = Result<Session, Failure>> + Send>>;

struct Driver {
    options: Options,
    machine: Machine,
    /// Which node to dial (the one it was on; the next after a failed dial).
    nodes: crate::nodes::Nodes,
    clock: Clock,
    commands: mpsc::Receiver<Command>,
    status: watch::Sender<TunnelStatus>,
    events_tx: mpsc::Sender<(u64, LinkEvent)>,
    events: mpsc::Receiver<(u64, LinkEvent)>,
    connecting: Option<Connecting>,
    link: Option<Link>,
    generation: u64,
    pings: HashMap<u64, oneshot::Sender<Result<Duration, PingError>>>,
    /// When the certificate should be renewed (`None`: unreadable or never).
    renew_at: Option<UnixMillis>,
    renewing: bool,
}

impl Driver {
    fn new(
        options: Options,
        commands: mpsc::Receiver<Command>,
        status: watch::Sender<TunnelStatus>,
    ) -> Driver {
        let (events_tx, events) = mpsc::channel(EVENT_INBOX_CAPACITY);
        let renew_at = crate::renew::due(&options.identity);
        Driver {
            machine: Machine::new(options.config, options.seed),
            nodes: options.identity.nodes(),
            options,
            clock: Clock::now(),
            commands,
            status,
            events_tx,
            events,
            connecting: None,
            link: None,
            generation: 0,
            pings: HashMap::new(),
            renew_at,
            renewing: false,
        }
    }

    async fn run(mut self) {
        self.machine.handle(Instant::now(), Event::Start);
        loop {
            self.perform_actions();
            self.status.send_replace(status_of(
                &self.options.identity,
                self.nodes.current(),
                &self.machine,
                &self.clock,
            ));
            let deadline = self.machine.poll_timeout();
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at.into()).await,
                    None => std::future::pending().await,
                }
            };
            let connecting = async {
                match self.connecting.as_mut() {
                    Some(fut) => fut.await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                command = self.commands.recv() => match command {
                    Some(Command::Ping(reply)) => self.ping(reply),
                    Some(Command::Request(message, reply)) => self.request(*message, reply),
                    Some(Command::Connection(reply)) => self.connection(reply),
                    Some(Command::Prewarm(signal)) => self.prewarm(signal),
                    Some(Command::Wanted) => self.machine.handle(Instant::now(), Event::Wanted),
                    None => break,
                },
                result = connecting => {
                    self.connecting = None;
                    self.connected(result);
                }
                Some((generation, event)) = self.events.recv() => match event {
                    // A renewal's outcome counts whichever connection it finished on.
                    LinkEvent::Renewed(result) => self.renewed(result),
                    event => {
                        if self.link.as_ref().is_some_and(|l| l.generation == generation) {
                            self.link_event(event);
                        }
                    }
                },
                () = sleep => self.machine.handle_timeout(Instant::now()),
            }
        }
        self.machine.handle(Instant::now(), Event::Stop);
        self.perform_actions();
        self.status.send_replace(status_of(
            &self.options.identity,
            self.nodes.current(),
            &self.machine,
            &self.clock,
        ));
    }

    fn perform_actions(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            match action {
                Action::Connect => self.connect(),
                Action::SendHeartbeat { seq } => self.send_heartbeat(seq),
                Action::Close(reason) => {
                    self.connecting = None;
                    if let Some(link) = self.link.take() {
                        tracing::debug!(?reason, "closing the connection");
                        link.conn
                            .close(0u32.into(), format!("{reason:?}").as_bytes());
                    }
                    for (_, reply) in self.pings.drain() {
                        let _ = reply.send(Err(PingError::Lost));
                    }
                }
            }
        }
    }

    fn connect(&mut self) {
        let identity = self.options.identity.clone();
        let interval = self.machine.config().heartbeat_interval;
        let limit = self.machine.config().connect_timeout;
        let server = self.nodes.current().to_owned();
        self.connecting = Some(Box::pin(async move {
            let addr = resolve(&server).await?;
            let config = device_client_config(&identity, interval)
                .map_err(|e| Failure::Fatal(crate::machine::Fatal::BadIdentity(e.to_string())))?;
            let endpoint = client_endpoint(addr).map_err(|e| Failure::Transient(e.to_string()))?;
            let started = Instant::now();
            let conn = dial(&endpoint, config, addr, limit).await?;
            let (mut tx, rx) = conn.open_bi().await.map_err(|e| classify(&e))?;
            let hello = Hello {
                protocol_versions: vec![PROTOCOL_VERSION],
                client: format!("synesis/{}", env!("CARGO_PKG_VERSION")),
                heartbeat_interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
                max_frame_bytes: FrameLimits::default().max_payload_bytes(),
            };
            send(&mut tx, &hello.into(), FrameLimits::default())
                .await
                .map_err(|e| closed_or(&conn, e.to_string()))?;
            let mut rx = FramedRecv::new(rx, FrameLimits::default());
            let first = tokio::select! {
                first = rx.next() => first,
                closed = conn.closed() => return Err(classify(&closed)),
            };
            match first {
                Ok(Some(Message::Welcome(w))) => {
                    rx.set_limits(FrameLimits::default().negotiate(w.max_frame_bytes));
                    tracing::info!(handshake_ms = started.elapsed().as_millis(), server = %addr, nodes = ?w.nodes, "session established");
                    Ok(Session {
                        conn,
                        tx,
                        rx,
                        nodes: w.nodes,
                    })
                }
                Ok(Some(Message::ErrorMsg(e))) => Err(classify_error_msg(&e)),
                Ok(Some(other)) => Err(Failure::Transient(format!(
                    "unexpected {:?} before welcome",
                    other.message_type()
                ))),
                Ok(None) => Err(closed_or(
                    &conn,
                    "the cloud closed the control stream".into(),
                )),
                Err(e) => Err(closed_or(&conn, e.to_string())),
            }
        }));
    }

    fn connected(&mut self, result: Result<Session, Failure>) {
        let now = Instant::now();
        match result {
            Ok(Session {
                conn,
                tx,
                rx,
                nodes,
            }) => {
                if self.nodes.learned(&nodes) {
                    self.save_nodes();
                }
                self.generation += 1;
                let generation = self.generation;
                let (outbox, outbox_rx) = mpsc::channel(OUTBOX_CAPACITY);
                tokio::spawn(write_loop(tx, outbox_rx));
                tokio::spawn(read_loop(
                    generation,
                    conn.clone(),
                    rx,
                    self.events_tx.clone(),
                ));
                self.link = Some(Link {
                    generation,
                    conn,
                    outbox,
                });
                self.machine.handle(now, Event::Connected);
            }
            Err(failure) => {
                tracing::info!(?failure, server = %self.nodes.current(), "connection attempt failed");
                // The next attempt (after the machine's backoff) dials the next node.
                self.nodes.failed();
                self.machine.handle(now, Event::ConnectFailed(failure));
            }
        }
    }

    fn link_event(&mut self, event: LinkEvent) {
        let now = Instant::now();
        match event {
            LinkEvent::Message(Message::HeartbeatAck(ack)) => {
                self.machine
                    .handle(now, Event::HeartbeatAck { seq: ack.seq });
                if let Some(reply) = self.pings.remove(&ack.seq) {
                    let rtt = self.machine.status().rtt.ok_or(PingError::Lost);
                    let _ = reply.send(rtt);
                }
            }
            LinkEvent::Message(Message::Drain(d)) => {
                tracing::info!(after_ms = d.reconnect_after_ms, reason = %d.reason, to = ?d.to, "the cloud is draining");
                if let Some(to) = &d.to {
                    self.nodes.go_to(to);
                }
                let reconnect_after = Duration::from_millis(u64::from(d.reconnect_after_ms));
                self.machine.handle(now, Event::Drain { reconnect_after });
            }
            LinkEvent::Message(Message::ErrorMsg(e)) => {
                tracing::warn!(code = %e.code, message = %e.message, "the cloud reported an error");
                self.machine
                    .handle(now, Event::ConnectionLost(classify_error_msg(&e)));
            }
            LinkEvent::Message(other) => {
                tracing::debug!(message = ?other.message_type(), "ignoring a control message this version does not use");
            }
            LinkEvent::Lost(failure) => {
                tracing::info!(?failure, "connection lost");
                self.machine.handle(now, Event::ConnectionLost(failure));
            }
            LinkEvent::Renewed(result) => self.renewed(result),
        }
    }

    /// Keeps the nodes a `Welcome` named in the identity, so a restarted service knows them.
    fn save_nodes(&mut self) {
        self.options.identity.info.nodes = self.nodes.others().to_vec();
        let Some(dir) = &self.options.data_dir else {
            return;
        };
        match Identity::save_info(dir, &self.options.identity.info) {
            Ok(()) => tracing::info!(nodes = ?self.nodes.all(), "the cloud's nodes"),
            Err(e) => tracing::warn!(error = %e, "cannot keep the cloud's nodes"),
        }
    }

    /// Starts a certificate renewal on the live connection when one is due.
    fn renew_if_due(&mut self) {
        let Some(link) = &self.link else { return };
        let due = self.renew_at.is_some_and(|at| unix_now() >= at);
        if !due || self.renewing || self.machine.state() != State::Connected {
            return;
        }
        self.renewing = true;
        let (conn, identity, generation) = (
            link.conn.clone(),
            self.options.identity.clone(),
            link.generation,
        );
        let (data_dir, events) = (self.options.data_dir.clone(), self.events_tx.clone());
        tokio::spawn(async move {
            let result = crate::renew::renew(&conn, &identity, data_dir.as_deref()).await;
            let _ = events.send((generation, LinkEvent::Renewed(result))).await;
        });
    }

    fn renewed(&mut self, result: Result<Vec<u8>, crate::renew::RenewError>) {
        self.renewing = false;
        match result {
            Ok(cert) => {
                self.options.identity.cert_der = cert;
                self.renew_at = crate::renew::due(&self.options.identity);
                tracing::info!(renew_at = ?self.renew_at, "device certificate renewed");
            }
            Err(e) => {
                let wait = match e {
                    crate::renew::RenewError::Transport(_) => RENEW_RETRY,
                    _ => RENEW_RETRY_REFUSED,
                };
                let retry = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
                self.renew_at = Some(UnixMillis(unix_now().0.saturating_add(retry)));
                tracing::warn!(error = %e, "certificate renewal failed; trying again later");
            }
        }
    }

    fn send_heartbeat(&mut self, seq: u64) {
        self.renew_if_due();
        let Some(link) = &self.link else { return };
        let vitals = self.options.vitals.borrow().clone();
        let heartbeat = Heartbeat {
            seq,
            sent_at: unix_now(),
            vitals,
        };
        if link.outbox.try_send(heartbeat.into()).is_err() {
            tracing::debug!(seq, "the writer is behind; heartbeat dropped");
        }
    }

    /// A request on its own stream of the live connection, answered by a task of its own so the
    /// driver never waits on it.
    fn request(&mut self, message: Message, reply: oneshot::Sender<Result<Message, RequestError>>) {
        let live = self
            .link
            .as_ref()
            .filter(|_| self.machine.state() == State::Connected);
        let Some(link) = live else {
            let _ = reply.send(Err(RequestError::NotConnected));
            return;
        };
        let conn = link.conn.clone();
        tokio::spawn(async move {
            let result = crate::request::exchange_on(&conn, &message)
                .await
                .map_err(RequestError::from);
            let _ = reply.send(result);
        });
    }

    fn prewarm(&self, signal: synesis_proto::message::Prewarm) {
        let live = self
            .link
            .as_ref()
            .filter(|_| self.machine.state() == State::Connected);
        match live {
            Some(link) if link.outbox.try_send(signal.into()).is_ok() => {
                tracing::info!("pre-warm signal sent");
            }
            _ => tracing::debug!("pre-warm signal dropped: not connected"),
        }
    }

    fn connection(&self, reply: oneshot::Sender<Result<quinn::Connection, TunnelState>>) {
        let state = self.machine.state();
        let live = self.link.as_ref().filter(|_| state == State::Connected);
        let _ = reply.send(live.map(|l| l.conn.clone()).ok_or(state.into()));
    }

    fn ping(&mut self, reply: oneshot::Sender<Result<Duration, PingError>>) {
        if self.pings.len() >= PINGS_IN_FLIGHT_MAX {
            let _ = reply.send(Err(PingError::Busy));
            return;
        }
        let state = self.machine.state();
        match self.machine.ping(Instant::now()) {
            Some(seq) => {
                self.pings.insert(seq, reply);
            }
            None => {
                let why = match state {
                    State::Failed => "failed",
                    State::Reconnecting => "reconnecting",
                    State::Connecting => "connecting",
                    _ => "stopped",
                };
                let _ = reply.send(Err(PingError::NotConnected(why)));
            }
        }
    }
}

async fn write_loop(mut tx: quinn::SendStream, mut outbox: mpsc::Receiver<Message>) {
    while let Some(message) = outbox.recv().await {
        if let Err(e) = send(&mut tx, &message, FrameLimits::default()).await {
            tracing::debug!(error = %e, "control stream write failed");
            break;
        }
    }
    let _ = tx.finish();
}

async fn read_loop(
    generation: u64,
    conn: quinn::Connection,
    mut rx: FramedRecv<quinn::RecvStream>,
    events: mpsc::Sender<(u64, LinkEvent)>,
) {
    loop {
        let event = tokio::select! {
            message = rx.next() => match message {
                Ok(Some(m)) => LinkEvent::Message(m),
                Ok(None) => LinkEvent::Lost(Failure::Transient("the cloud closed the control stream".into())),
                Err(e) => match e.peer_fault() {
                    // A framing error from the cloud: not healed by waiting, but a restarted
                    // cloud may be fine; retry with backoff.
                    Some(code) => LinkEvent::Lost(Failure::Transient(format!("bad frame from the cloud: {code}"))),
                    None => LinkEvent::Lost(classify(&conn.closed().await)),
                },
            },
            closed = conn.closed() => LinkEvent::Lost(classify(&closed)),
        };
        let lost = matches!(event, LinkEvent::Lost(_));
        if events.send((generation, event)).await.is_err() || lost {
            return;
        }
    }
}
