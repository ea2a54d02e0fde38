//! The QUIC endpoint: it accepts connections, identifies the peer, and hands each stream to
//! the module of its kind ([`crate::enrollment`], [`crate::control`], [`crate::account`]).
//! [`start`] returns a [`Cloud`] handle; signals are `main`'s business.
//!
//! What a connection costs before the cloud knows who sent it is bounded:
//! - at most [`HANDSHAKES_MAX`] handshakes at once, each within [`HANDSHAKE_TIMEOUT`]; past
//!   [`RETRY_ABOVE_HANDSHAKES`] a client must first prove its address (QUIC Retry);
//! - a connection starts with one stream and a [`ANONYMOUS_RECEIVE_WINDOW`] window; only an
//!   identified device gets [`STREAMS_PER_CONNECTION_MAX`] streams and a full window;
//! - at most [`HANDSHAKES_PER_SOURCE_MAX`] of those handshakes from one source (an IPv4
//!   address or an IPv6 /64), so one address cannot hold them all;
//! - connections without a certificate (enrollment) have their own budget,
//!   [`ANONYMOUS_CONNECTIONS_MAX`] in all and [`ANONYMOUS_PER_SOURCE_MAX`] per source, apart
//!   from the [`CONNECTIONS_MAX`] devices may use, and [`ENROLLMENT_DEADLINE`] to finish: a
//!   flood of them never keeps a device out;
//! - an identified device may have [`DEVICE_CONNECTIONS_MAX`] connections at once, and the
//!   first frame of a stream is at most [`FIRST_FRAME_LIMITS`].

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rand::Rng;
use rustls::pki_types::CertificateDer;
use synesis_proto::{ErrorCode, FrameLimits, Message, MessageType, StreamKind, UnixMillis};
use synesis_wire::close_code;
use synesis_wire::tls::fingerprint;
use tokio::sync::{Semaphore, watch};
use tokio::time::timeout;

use crate::ledger::Writer;
use crate::metrics::{Metrics, Outcome};
use crate::pki::Pki;
use crate::registry::{ControlCommand, Registry};
use crate::shared::{PresenceQueue, Settings, Shared, Storage, now};
use crate::storage::Device;
use crate::streams::{First, Stream};

/// Where `serve` records the address it listens on, for `admin token create`.
pub const LISTEN_ADDR_FILE: &str = "listen.addr";

/// Device connections served at once; more are refused after their handshake.
pub const CONNECTIONS_MAX: usize = 10_000;
/// Connections without a certificate (enrollments) at once, and from one address.
pub const ANONYMOUS_CONNECTIONS_MAX: usize = 256;
pub const ANONYMOUS_PER_SOURCE_MAX: usize = 8;
/// Handshakes in progress at once, and from one source (an IPv4 address or an IPv6 /64); more
/// are refused at the door.
pub const HANDSHAKES_MAX: usize = 1_024;
pub const HANDSHAKES_PER_SOURCE_MAX: usize = 64;
/// Handshakes in progress above which a client must prove its address first (QUIC Retry).
pub const RETRY_ABOVE_HANDSHAKES: usize = 64;
/// A handshake must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bidirectional streams an identified device may have open at once.
pub const STREAMS_PER_CONNECTION_MAX: u32 = 32;
/// Connections one device may have at once (a reconnect may overlap a half-open old one).
pub const DEVICE_CONNECTIONS_MAX: usize = 8;
/// The first frame of a device's stream (`Hello`, a request) is at most this, whatever the
/// frame maximum: 32 streams of 8 connections cannot make the cloud buffer more than 64 MiB.
pub const FIRST_FRAME_LIMITS: FrameLimits = FrameLimits::new(256 * 1024);
/// The receive window of a connection until its peer is identified as a device, and of an
/// enrollment connection throughout.
pub const ANONYMOUS_RECEIVE_WINDOW: u32 = 64 * 1024;
/// The receive window of a device's connection.
pub const DEVICE_RECEIVE_WINDOW: u32 = 32 * 1024 * 1024;
/// An enrollment connection is closed after this, whatever the peer does (a slot is never held
/// by a peer that stalls).
pub const ENROLLMENT_DEADLINE: Duration = Duration::from_secs(25);
/// Frames on an enrollment stream: a request is a CSR and a token, far below this.
pub const ANONYMOUS_FRAME_LIMITS: FrameLimits = FrameLimits::new(64 * 1024);
/// A connection with no traffic (heartbeats, QUIC keep-alives) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often revocations made by `admin device revoke` (another process) are picked up.
pub const REVOCATION_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How long after finding a device revoked its connections close (a reply on one of them
/// goes out first).
pub(crate) const REVOKED_CLOSE_AFTER: Duration = Duration::from_millis(200);
/// How often holds past their time get their expiry entries (their amount is released the
/// moment they lapse either way).
pub const HOLD_EXPIRY_INTERVAL: Duration = Duration::from_secs(30);
/// How long a device certificate is valid, unless `--cert-lifetime` says otherwise.
pub const CERT_LIFETIME_DEFAULT: Duration = Duration::from_secs(90 * 24 * 3_600);
/// The least reconnect delay a drain hands out.
const DRAIN_DELAY_MIN: Duration = Duration::from_millis(500);

const _: () = assert!(
    REVOCATION_POLL_INTERVAL.as_secs() < 5,
    "revocation must bite within 5 s"
);
const _: () = assert!(
    IDLE_TIMEOUT.as_millis() > 3 * crate::control::HEARTBEAT_INTERVAL_MAX_MS as u128,
    "the cloud must not time out a device before it misses three heartbeats"
);
const _: () = assert!(RETRY_ABOVE_HANDSHAKES < HANDSHAKES_MAX);
const _: () = assert!(ANONYMOUS_PER_SOURCE_MAX < ANONYMOUS_CONNECTIONS_MAX);
const _: () = assert!(HANDSHAKES_PER_SOURCE_MAX <= HANDSHAKES_MAX / 16);
const _: () =
    assert!(ENROLLMENT_DEADLINE.as_secs() > 2 * crate::streams::FIRST_FRAME_TIMEOUT.as_secs());

#[derive(Debug, Clone)]
pub struct Options {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    /// Drained devices are told to come back after a delay spread over this window.
    pub drain_window: Duration,
    /// How long in-flight work may take after the drain before the process exits.
    pub drain_grace: Duration,
    /// Prices and tier rules (`cloud.toml`).
    pub billing: crate::config::Billing,
    /// The models it answers with, and how escalations run (`cloud.toml`).
    pub serving: crate::config::Serving,
    /// How long a device certificate is valid; devices renew well before it ends.
    pub cert_lifetime: Duration,
    /// The database (`--database`, `[storage] url`): `None`, SQLite in the data directory.
    pub database: Option<String>,
    /// Where to serve `/metrics`, `/live` and `/ready` (`--metrics-listen`): `None`, nowhere.
    pub metrics_listen: Option<SocketAddr>,
    /// The address devices dial to reach this node, `host:port` (`--advertise`): `None`, the
    /// address it listens on. Other nodes hand it to their devices.
    pub advertise: Option<String>,
}

/// A running cloud. [`Cloud::shutdown`] drains it and waits until it has stopped; dropping
/// the handle without it stops the endpoint abruptly.
#[derive(Debug)]
pub struct Cloud {
    addr: SocketAddr,
    metrics_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Cloud {
    /// The address the endpoint listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address `/metrics` is served on, when it is.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Drains the devices (each told to come back at its own time), gives in-flight work the
    /// grace period, and stops.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

fn server_config(pki: &Pki) -> anyhow::Result<quinn::ServerConfig> {
    let provider = synesis_wire::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der().clone())?;
    // Without a certificate a client may still connect, to enroll; `connection` enforces what
    // such a connection may do. A certificate past its expiry fails the handshake.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .allow_unauthenticated()
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(pki.server_chain(), pki.server_key())?;
    tls.alpn_protocols = synesis_wire::tls::alpn();
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    let mut transport = quinn::TransportConfig::default();
    // Until the peer is known to be a device: one stream, a small window.
    transport
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(0u32.into())
        .receive_window(ANONYMOUS_RECEIVE_WINDOW.into())
        // The protocol uses no datagrams; quinn would otherwise buffer 1.25 MB of them.
        .datagram_receive_buffer_size(None)
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(IDLE_TIMEOUT)?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Opens the data directory, the database and the endpoint, and starts serving.
pub async fn start(options: Options) -> anyhow::Result<Cloud> {
    let dir = &options.data_dir;
    crate::storage::open_dir(dir)?;
    let pki = Arc::new(Pki::load_or_create(dir)?);
    let location = crate::storage::Location::new(dir, options.database.as_deref())?;
    tracing::info!(%location, "storage");
    let metrics = Metrics::new();
    let metrics_listener = match options.metrics_listen {
        Some(addr) => Some(crate::metrics::bind(addr).await?),
        None => None,
    };
    // Opening blocks (PostgreSQL's handles wait on runtimes of their own).
    let waits = Arc::clone(&metrics);
    let changed = Arc::new(tokio::sync::Notify::new());
    let listener = location.changes(Arc::clone(&changed)).map(tokio::spawn);
    let (storage, ledger) = tokio::task::spawn_blocking(move || {
        let mut db = location.open()?;
        db.reset_connections(now())?;
        let (reader, identifier) = (location.open()?, location.open()?);
        let ledger = location.ledger_writer()?;
        Ok::<_, crate::storage::StorageError>((
            Storage::new(db, reader, identifier, &waits),
            ledger,
        ))
    })
    .await??;
    {
        let metrics = Arc::clone(&metrics);
        ledger.observe(Box::new(move |operations, committed| {
            let outcome = if committed { "committed" } else { "failed" };
            metrics
                .ledger_batches
                .get_or_create(&Outcome { outcome })
                .inc();
            metrics
                .ledger_batch_operations
                .observe(f64::from(u32::try_from(operations).unwrap_or(u32::MAX)));
        }));
    }
    let endpoint = quinn::Endpoint::server(server_config(&pki)?, options.listen)
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let addr = endpoint.local_addr()?;
    synesis_wire::files::write_public_file(
        &dir.join(LISTEN_ADDR_FILE),
        addr.to_string().as_bytes(),
    )?;
    let advertised = options
        .advertise
        .clone()
        .unwrap_or_else(|| addr.to_string());
    let cluster = Arc::new(crate::cluster::Cluster::new(advertised));
    let shared = Arc::new(Shared {
        presence: Arc::new(PresenceQueue::new(cluster.node.id.clone())),
        cluster,
        storage,
        ledger,
        billing: options.billing.clone(),
        pki,
        registry: Arc::new(Registry::default()),
        settings: Settings {
            cert_lifetime: options.cert_lifetime,
        },
        escalations: Arc::new(crate::escalation::Escalations::new(&options.serving)?),
        data_dir: dir.clone(),
        adapters: options.serving.adapters.clone(),
        upload_fences: crate::upload::Fences::default(),
        metrics,
        changed,
    });
    let metrics_addr = match &metrics_listener {
        Some(listener) => Some(listener.local_addr()?),
        None => None,
    };
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        run(endpoint, shared, options, stopped, metrics_listener).await;
        if let Some(listener) = listener {
            listener.abort();
        }
    });
    tracing::info!(%addr, "serving");
    if let Some(at) = metrics_addr {
        tracing::info!(addr = %at, "serving metrics");
    }
    Ok(Cloud {
        addr,
        metrics_addr,
        stop,
        task: Some(task),
    })
}

async fn run(
    endpoint: quinn::Endpoint,
    shared: Arc<Shared>,
    options: Options,
    mut stop: watch::Receiver<bool>,
    metrics_listener: Option<tokio::net::TcpListener>,
) {
    let metrics = metrics_listener.map(|listener| {
        tokio::spawn(crate::metrics::serve(
            listener,
            Arc::clone(&shared.metrics),
            shared.storage.clone(),
        ))
    });
    let heartbeat = tokio::spawn(
        Arc::clone(&shared.cluster).heartbeat(shared.storage.clone(), shared.ledger.clone()),
    );
    let watcher = tokio::spawn(watch_revocations(Arc::clone(&shared)));
    let expiry = tokio::spawn(expire_holds(shared.ledger.clone()));
    let presence = tokio::spawn(Arc::clone(&shared.presence).run(shared.storage.clone()));
    let sweeper = tokio::spawn(crate::upload::sweep(Arc::clone(&shared)));
    let door = Arc::new(Door::default());
    tracing::info!(ca = %shared.pki.ca_fingerprint(), "accepting connections");
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                door.admit(incoming, &shared);
            }
        }
    }
    drain(&shared, &options).await;
    heartbeat.abort();
    shared.cluster.stopped(&shared.storage).await;
    watcher.abort();
    expiry.abort();
    presence.abort();
    sweeper.abort();
    shared.presence.flush(&shared.storage).await;
    endpoint.close(0u32.into(), b"shutting down");
    let _ = timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    if let Some(metrics) = metrics {
        metrics.abort();
    }
    tracing::info!("stopped");
}

/// Where a connection comes from, for per-source budgets: an IPv4 address, or an IPv6 /64 (one
/// subscriber's usual allocation, which an attacker can fill with addresses at will).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    V4(std::net::Ipv4Addr),
    V6Net([u8; 8]),
}

impl Source {
    fn of(ip: IpAddr) -> Source {
        match ip {
            IpAddr::V4(v4) => Source::V4(v4),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => Source::V4(v4),
                None => {
                    let o = v6.octets();
                    Source::V6Net([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
                }
            },
        }
    }
}

/// How many of something each source holds, at most `max` each.
#[derive(Debug)]
struct PerSource {
    max: usize,
    counts: Mutex<HashMap<Source, usize>>,
}

/// One unit of a source's budget, given back when dropped.
struct SourceSlot {
    budget: Arc<PerSource>,
    source: Source,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.budget.lock();
        if let Some(n) = counts.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.source);
            }
        }
    }
}

impl PerSource {
    fn new(max: usize) -> Arc<PerSource> {
        Arc::new(PerSource {
            max,
            counts: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Source, usize>> {
        self.counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A unit for `source`, unless it holds `max` already. No entry is left for a refusal.
    fn take(self: &Arc<Self>, source: Source) -> Option<SourceSlot> {
        let mut counts = self.lock();
        let n = counts.get(&source).copied().unwrap_or(0);
        if n >= self.max {
            return None;
        }
        counts.insert(source, n + 1);
        Some(SourceSlot {
            budget: Arc::clone(self),
            source,
        })
    }
}

/// The budgets a connection is admitted under.
struct Door {
    handshakes: Arc<Semaphore>,
    handshakes_per_source: Arc<PerSource>,
    devices: Arc<Semaphore>,
    anonymous: Arc<Semaphore>,
    anonymous_per_source: Arc<PerSource>,
}

impl Default for Door {
    fn default() -> Self {
        Door {
            handshakes: Arc::new(Semaphore::new(HANDSHAKES_MAX)),
            handshakes_per_source: PerSource::new(HANDSHAKES_PER_SOURCE_MAX),
            devices: Arc::new(Semaphore::new(CONNECTIONS_MAX)),
            anonymous: Arc::new(Semaphore::new(ANONYMOUS_CONNECTIONS_MAX)),
            anonymous_per_source: PerSource::new(ANONYMOUS_PER_SOURCE_MAX),
        }
    }
}

impl Door {
    /// Decides at the door: Retry when busy and the address is unproven, refuse when full (in
    /// all, or for this source), else a task for the handshake and the connection.
    fn admit(self: &Arc<Self>, incoming: quinn::Incoming, shared: &Arc<Shared>) {
        let in_progress = HANDSHAKES_MAX - self.handshakes.available_permits();
        if in_progress >= RETRY_ABOVE_HANDSHAKES
            && !incoming.remote_address_validated()
            && incoming.may_retry()
        {
            if let Err(e) = incoming.retry() {
                tracing::debug!(error = %e, "retry failed");
            }
            shared.metrics.handshake("retry");
            return;
        }
        let remote = incoming.remote_address();
        let source = Source::of(remote.ip());
        let Some(source_handshake) = self.handshakes_per_source.take(source) else {
            tracing::debug!(%remote, limit = HANDSHAKES_PER_SOURCE_MAX, "handshakes from this source at their limit; refusing");
            incoming.refuse();
            shared.metrics.handshake("refused_source_limit");
            return;
        };
        let Ok(handshake) = Arc::clone(&self.handshakes).try_acquire_owned() else {
            tracing::warn!(limit = HANDSHAKES_MAX, "handshake limit reached; refusing");
            incoming.refuse();
            shared.metrics.handshake("refused_handshake_limit");
            return;
        };
        let (door, shared) = (Arc::clone(self), Arc::clone(shared));
        tokio::spawn(async move {
            let conn = match timeout(HANDSHAKE_TIMEOUT, async { incoming.accept()?.await }).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "handshake failed");
                    shared.metrics.handshake("failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "handshake timed out");
                    shared.metrics.handshake("timed_out");
                    return;
                }
            };
            drop((handshake, source_handshake));
            match peer_fingerprint(&conn) {
                None => {
                    let Some(slot) = door.anonymous_slot(source) else {
                        shared.metrics.handshake("refused_anonymous_limit");
                        conn.close(
                            close_code(ErrorCode::LIMIT_EXCEEDED),
                            b"too many connections without a certificate",
                        );
                        return;
                    };
                    shared.metrics.handshake("enrollment");
                    // However the peer stalls (no stream credit, a trickle of bytes), its slot
                    // comes back after this.
                    if timeout(
                        ENROLLMENT_DEADLINE,
                        crate::enrollment::serve(&shared, &conn),
                    )
                    .await
                    .is_err()
                    {
                        conn.close(
                            close_code(ErrorCode::LIMIT_EXCEEDED),
                            b"enrollment took too long",
                        );
                    }
                    drop(slot);
                }
                Some(fpr) => {
                    let Ok(_permit) = Arc::clone(&door.devices).try_acquire_owned() else {
                        tracing::warn!(limit = CONNECTIONS_MAX, "device connection limit reached");
                        shared.metrics.handshake("refused_connection_limit");
                        conn.close(close_code(ErrorCode::UNAVAILABLE), b"the cloud is full");
                        return;
                    };
                    device(shared, conn, fpr).await;
                }
            }
        });
    }

    fn anonymous_slot(
        &self,
        source: Source,
    ) -> Option<(tokio::sync::OwnedSemaphorePermit, SourceSlot)> {
        let slot = self.anonymous_per_source.take(source)?;
        let permit = Arc::clone(&self.anonymous).try_acquire_owned().ok()?;
        Some((permit, slot))
    }
}

/// The certificate the peer presented, if any.
pub(crate) fn peer_cert(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    chain.first().cloned()
}

fn peer_fingerprint(conn: &quinn::Connection) -> Option<synesis_proto::Sha256> {
    peer_cert(conn).map(|c| fingerprint(&c))
}

/// An identified device's connection, as every stream handler sees it.
#[derive(Debug)]
pub(crate) struct Peer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) device: Device,
    pub(crate) conn: quinn::Connection,
    /// Whether this connection opened its control stream (`Hello`): one per connection.
    pub(crate) control_opened: AtomicBool,
    /// The largest frame payload taken from this device: the protocol's until its `Hello`
    /// announces a lower one (PROTOCOL.md §3: both then use the lower).
    max_frame_bytes: AtomicU32,
}

impl Peer {
    /// The frame limits of this connection, as negotiated so far.
    pub(crate) fn frame_limits(&self) -> FrameLimits {
        FrameLimits::new(self.max_frame_bytes.load(Ordering::Acquire))
    }

    /// The limits the session's `Hello` and `Welcome` agreed on.
    pub(crate) fn negotiated(&self, limits: FrameLimits) {
        self.max_frame_bytes
            .store(limits.max_payload_bytes(), Ordering::Release);
    }
}

/// A device's connection: checked against the registry, recorded (so revocation reaches it,
/// whatever it sends), then one task per stream.
async fn device(shared: Arc<Shared>, conn: quinn::Connection, fpr: synesis_proto::Sha256) {
    let found = shared
        .storage
        .identify(move |db| db.device_by_cert(&fpr))
        .await;
    let device = match found {
        Ok(Some(d)) if !d.revoked => d,
        Ok(Some(d)) => {
            tracing::info!(device = %d.id, "refusing a revoked device");
            shared.metrics.handshake("refused_revoked");
            conn.close(
                close_code(ErrorCode::DEVICE_REVOKED),
                b"this device was revoked",
            );
            return;
        }
        Ok(None) => {
            shared.metrics.handshake("refused_unknown_certificate");
            conn.close(
                close_code(ErrorCode::UNAUTHENTICATED),
                b"unknown device certificate",
            );
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "device lookup failed");
            shared.metrics.handshake("refused_unavailable");
            conn.close(close_code(ErrorCode::UNAVAILABLE), b"try again");
            return;
        }
    };
    let Some(_registered) = shared
        .registry
        .add(device.id, &conn, DEVICE_CONNECTIONS_MAX)
    else {
        shared.metrics.handshake("refused_device_connections");
        conn.close(
            close_code(ErrorCode::LIMIT_EXCEEDED),
            b"too many connections of this device",
        );
        return;
    };
    // Revoked between the lookup and the registration: the watcher may have looked already.
    let id = device.id;
    if !matches!(shared.storage.identify(move |db| db.device(id)).await, Ok(Some(d)) if !d.revoked)
    {
        shared.metrics.handshake("refused_revoked");
        conn.close(
            close_code(ErrorCode::DEVICE_REVOKED),
            b"this device was revoked",
        );
        return;
    }
    conn.set_max_concurrent_bi_streams(STREAMS_PER_CONNECTION_MAX.into());
    conn.set_receive_window(DEVICE_RECEIVE_WINDOW.into());
    tracing::info!(device = %id, remote = %conn.remote_address(), "device connection identified");
    shared.metrics.handshake("device");
    let _connected = shared.metrics.connected();
    let peer = Arc::new(Peer {
        shared,
        device,
        conn,
        control_opened: AtomicBool::new(false),
        max_frame_bytes: AtomicU32::new(FrameLimits::default().max_payload_bytes()),
    });
    while let Ok((tx, rx)) = peer.conn.accept_bi().await {
        tokio::spawn(stream(Arc::clone(&peer), tx, rx));
    }
}

/// A new stream of a device: its first frame says its kind; its handler takes it from there.
async fn stream(peer: Arc<Peer>, tx: quinn::SendStream, rx: quinn::RecvStream) {
    let negotiated = peer.frame_limits();
    let mut stream = Stream::new(
        tx,
        rx,
        FIRST_FRAME_LIMITS.negotiate(negotiated.max_payload_bytes()),
    );
    stream.sends = negotiated;
    let opens_a_stream = |t: MessageType| {
        t == MessageType::Hello
            || t == MessageType::EscalationRequest
            || t == MessageType::EscalationResume
            || t == MessageType::UploadBegin
            || (t.stream() == StreamKind::Account && is_request(t))
    };
    let first = match stream
        .first(opens_a_stream, ErrorCode::UNEXPECTED_MESSAGE)
        .await
    {
        First::Message(m) => m,
        First::Empty | First::Refused => return,
    };
    // Every request is checked against the device as it is now: revoked (or its member
    // removed), and what its member's role allows (`roles`).
    let device = match crate::account::enrolled_now(&peer).await {
        Ok(device) => device,
        Err(reply) => {
            // The reply first, then the close: a close sent at once would overtake it.
            stream.send_last(&reply).await;
            crate::account::close_if_revoked(&peer, &reply);
            return;
        }
    };
    let kind = first.message_type();
    if !crate::roles::allows(device.role, kind) {
        stream
            .reject(
                ErrorCode::FORBIDDEN,
                format!(
                    "a {} of this account may not send {}",
                    crate::roles::name(device.role),
                    kind.name()
                ),
            )
            .await;
        return;
    }
    match first {
        // One control stream per connection (PROTOCOL.md §2): a second would replace the
        // connection's own session, and close the connection with it.
        Message::Hello(_) if peer.control_opened.swap(true, Ordering::AcqRel) => {
            stream
                .reject(
                    ErrorCode::UNEXPECTED_MESSAGE,
                    "this connection has its control stream already".into(),
                )
                .await;
        }
        Message::Hello(hello) => crate::control::serve(&peer, hello, stream).await,
        m @ (Message::EscalationRequest(_) | Message::EscalationResume(_)) => {
            crate::escalation::serve(&peer, m, stream).await;
        }
        Message::UploadBegin(begin) => crate::upload::serve(&peer, begin, stream).await,
        request => crate::account::serve(&peer, request, stream).await,
    }
}

/// The account messages a device sends (the others are the cloud's replies).
fn is_request(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::UsageRequest
            | MessageType::TopupRequest
            | MessageType::PriceRequest
            | MessageType::DeviceLeave
            | MessageType::CertRenew
            | MessageType::AdaptersRequest
            | MessageType::AdapterRemove
            | MessageType::MembersRequest
            | MessageType::InviteCreate
            | MessageType::MemberRemove
            | MessageType::HandoverOffer
            | MessageType::HandoverAccept
            | MessageType::InvitesRequest
            | MessageType::InviteRevoke
    )
}

/// Tells every device to go away and come back later (each at its own time), then gives their
/// connections up to the grace period to close.
async fn drain(shared: &Shared, options: &Options) {
    shared.metrics.set_draining();
    let targets = shared.registry.sessions();
    tracing::info!(devices = targets.len(), "draining");
    let window = options.drain_window.max(DRAIN_DELAY_MIN);
    // The devices are sent to the other nodes in turn, each at its own time in the window.
    let peers = shared.cluster.peers();
    {
        let mut rng = rand::rng();
        for (i, (id, control)) in targets.iter().enumerate() {
            let reconnect_after = rng.random_range(DRAIN_DELAY_MIN..=window);
            let to = (!peers.is_empty()).then(|| peers[i % peers.len()].clone());
            if control
                .try_send(ControlCommand::Drain {
                    reconnect_after,
                    to,
                })
                .is_err()
            {
                tracing::debug!(device = %id, "control stream busy or gone; not drained");
            }
        }
    }
    let deadline = tokio::time::Instant::now() + options.drain_grace;
    while shared.registry.has_sessions() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Expires holds that were never settled, now and then.
async fn expire_holds(ledger: Writer) {
    let mut ticker = tokio::time::interval(HOLD_EXPIRY_INTERVAL);
    loop {
        ticker.tick().await;
        match crate::ledger::expire_lapsed(&ledger, now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(holds = n, "expired holds that were never settled"),
            Err(e) => tracing::warn!(error = %e, "cannot expire holds"),
        }
    }
}

/// Closes every connection of devices revoked by another process (`admin device revoke`).
async fn watch_revocations(shared: Arc<Shared>) {
    let mut ticker = tokio::time::interval(REVOCATION_POLL_INTERVAL);
    // Each poll looks back further than one tick, so that a revocation committed while the
    // last query ran is not missed; closing twice is harmless.
    let mut since = now();
    loop {
        // Every tick, and at once when told of a change (by this node, or by another over the
        // database).
        tokio::select! {
            _ = ticker.tick() => {}
            () = shared.changed.notified() => {}
        }
        let polled_at = now();
        let revoked = match shared
            .storage
            .identify(move |db| db.revoked_since(since))
            .await
        {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read revocations");
                continue;
            }
        };
        // A revocation is stamped before its write waits for the lock (up to the busy timeout),
        // so look back past that as well as past the last poll.
        let look_back = REVOCATION_POLL_INTERVAL * 2 + crate::storage::BUSY_TIMEOUT;
        since = UnixMillis(polled_at.0 - i64::try_from(look_back.as_millis()).unwrap_or(0));
        if revoked.is_empty() {
            continue;
        }
        // A device that revoked itself (`cloud logout`) is being answered on one of its
        // connections: that reply goes out first.
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            tokio::time::sleep(REVOKED_CLOSE_AFTER).await;
            for id in revoked {
                let closed = shared.registry.close_device(
                    id,
                    ErrorCode::DEVICE_REVOKED,
                    b"this device was revoked",
                );
                if closed > 0 {
                    tracing::info!(device = %id, connections = closed, at_ms = now().0, "closed the connections of a revoked device");
                }
            }
        });
    }
}
