//! `synesis-cloud serve`: the QUIC endpoint and one task per connection and per stream.
//!
//! - A connection without a client certificate may only enroll (one stream, one request).
//! - A connection with a certificate the CA signed is a device: it is looked up by the
//!   certificate's fingerprint, refused if unknown or revoked, and then opens a control stream
//!   (hello, heartbeats, drain) and short request streams (`DeviceLeave`).
//! - Every limit is a named constant; a peer that breaks the framing gets the error code on its
//!   stream (or connection, for the control stream) and every other peer is served on.
//!
//! Concurrency (THREAD_SAFETY_PATTERNS.md): SQLite runs on the blocking pool behind a
//! `std::sync::Mutex` that is only locked inside `spawn_blocking`; the live-device map is a
//! `std::sync::Mutex` held for map operations only, never across `.await`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rand::Rng;
use rustls::pki_types::CertificateDer;
use synesis_proto::message::{
    DeviceLeave, DeviceLeft, Drain, EnrollRequest, EnrollResponse, ErrorMsg, HeartbeatAck, Hello,
    Welcome,
};
use synesis_proto::{
    Blob, DeviceId, ErrorCode, FrameLimits, Message, PROTOCOL_VERSION, SetupToken, UnixMillis,
};
use synesis_wire::tls::fingerprint;
use synesis_wire::{FramedRecv, close_code, send};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::timeout;

use crate::db::{Db, Device, EnrollError, Enrollment};
use crate::ledger::LedgerWriter;
use crate::pki::Pki;

/// The database file in the data directory.
pub const DB_FILE: &str = "cloud.db";
/// Where `serve` records the address it listens on, for `admin token create`.
pub const LISTEN_ADDR_FILE: &str = "listen.addr";

/// Connections served at once; more are refused at the door.
pub const CONNECTIONS_MAX: usize = 10_000;
/// Bidirectional streams a device may have open at once (quinn enforces it).
pub const STREAMS_PER_CONNECTION_MAX: u32 = 32;
/// A connection with no traffic (heartbeats, QUIC keep-alives) for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// A stream must say what it is (its first frame) within this time.
pub const FIRST_FRAME_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals a device may announce.
pub const HEARTBEAT_INTERVAL_MIN_MS: u32 = 100;
pub const HEARTBEAT_INTERVAL_MAX_MS: u32 = 15_000;
/// How often revocations made by `admin device revoke` (another process) are picked up.
pub const REVOCATION_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often holds past their time get their expiry entries (their amount is released the
/// moment they lapse either way).
pub const HOLD_EXPIRY_INTERVAL: Duration = Duration::from_secs(30);
/// Commands queued for one device's control stream.
const CONTROL_INBOX_CAPACITY: usize = 8;
/// The least reconnect delay a drain hands out.
const DRAIN_DELAY_MIN: Duration = Duration::from_millis(500);

const _: () = assert!(
    REVOCATION_POLL_INTERVAL.as_secs() < 5,
    "revocation must bite within 5 s"
);
const _: () = assert!(
    IDLE_TIMEOUT.as_millis() > 3 * HEARTBEAT_INTERVAL_MAX_MS as u128,
    "the cloud must not time out a device before it misses three heartbeats"
);

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
}

enum ControlCommand {
    Drain { reconnect_after: Duration },
}

struct Live {
    generation: u64,
    conn: quinn::Connection,
    control: mpsc::Sender<ControlCommand>,
}

struct Cloud {
    db: Arc<Mutex<Db>>,
    /// Every ledger operation the server makes goes through it (group commit, durable).
    ledger: LedgerWriter,
    billing: crate::config::Billing,
    pki: Arc<Pki>,
    live: Mutex<HashMap<DeviceId, Live>>,
    generations: AtomicU64,
}

fn now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
}

impl Cloud {
    /// Runs `f` on the database, on the blocking pool.
    async fn db<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Db) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || {
            let mut guard = db.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            f(&mut guard)
        })
        .await
        .context("database task failed")
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceId, Live>> {
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a device's new session; an older connection of the same device (a half-open one
    /// the device gave up on) is closed.
    fn register(
        &self,
        id: DeviceId,
        conn: quinn::Connection,
        control: mpsc::Sender<ControlCommand>,
    ) -> u64 {
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let old = self.live().insert(
            id,
            Live {
                generation,
                conn,
                control,
            },
        );
        if let Some(old) = old {
            old.conn.close(
                close_code(ErrorCode::UNAVAILABLE),
                b"replaced by a newer connection of this device",
            );
        }
        generation
    }

    /// Forgets a session unless a newer one replaced it. Returns whether it was current.
    fn unregister(&self, id: DeviceId, generation: u64) -> bool {
        let mut live = self.live();
        match live.get(&id) {
            Some(l) if l.generation == generation => {
                live.remove(&id);
                true
            }
            _ => false,
        }
    }
}

fn server_config(pki: &Pki) -> anyhow::Result<quinn::ServerConfig> {
    let provider = synesis_wire::tls::provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der().clone())?;
    // Without a certificate a client may still connect, to enroll; the connection task
    // enforces that (see the module docs).
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
    transport
        .max_concurrent_bidi_streams(STREAMS_PER_CONNECTION_MAX.into())
        .max_concurrent_uni_streams(0u32.into())
        .max_idle_timeout(Some(quinn::IdleTimeout::try_from(IDLE_TIMEOUT)?));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

pub async fn serve(options: Options) -> anyhow::Result<()> {
    let dir = &options.data_dir;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let pki = Arc::new(Pki::load_or_create(dir)?);
    let mut db = Db::open(&dir.join(DB_FILE))?;
    db.reset_connections()?;
    let endpoint = quinn::Endpoint::server(server_config(&pki)?, options.listen)
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let addr = endpoint.local_addr()?;
    synesis_wire::files::write_public_file(
        &dir.join(LISTEN_ADDR_FILE),
        addr.to_string().as_bytes(),
    )?;

    let ledger = LedgerWriter::open(&dir.join(DB_FILE))?;
    let cloud = Arc::new(Cloud {
        db: Arc::new(Mutex::new(db)),
        ledger,
        billing: options.billing.clone(),
        pki,
        live: Mutex::new(HashMap::new()),
        generations: AtomicU64::new(0),
    });
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    let watcher = tokio::spawn(watch_revocations(Arc::clone(&cloud)));
    let expiry = tokio::spawn(expire_holds(cloud.ledger.clone()));
    let permits = Arc::new(Semaphore::new(CONNECTIONS_MAX));

    println!("listening on {addr}");
    tracing::info!(%addr, ca = %cloud.pki.ca_fingerprint(), "serving");
    loop {
        tokio::select! {
            biased;
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                match Arc::clone(&permits).try_acquire_owned() {
                    Ok(permit) => {
                        let cloud = Arc::clone(&cloud);
                        tokio::spawn(async move {
                            connection(cloud, incoming).await;
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        tracing::warn!(limit = CONNECTIONS_MAX, "connection limit reached; refusing");
                        incoming.refuse();
                    }
                }
            }
        }
    }

    drain(&cloud, &options).await;
    watcher.abort();
    expiry.abort();
    endpoint.close(0u32.into(), b"shutting down");
    let _ = timeout(Duration::from_secs(2), endpoint.wait_idle()).await;
    tracing::info!("stopped");
    Ok(())
}

/// Tells every device to go away and come back later (each at its own time), then gives their
/// connections up to the grace period to close.
async fn drain(cloud: &Cloud, options: &Options) {
    let targets: Vec<(DeviceId, mpsc::Sender<ControlCommand>)> = cloud
        .live()
        .iter()
        .map(|(id, l)| (*id, l.control.clone()))
        .collect();
    tracing::info!(devices = targets.len(), "draining");
    let window = options.drain_window.max(DRAIN_DELAY_MIN);
    {
        let mut rng = rand::rng();
        for (id, control) in &targets {
            let reconnect_after = rng.random_range(DRAIN_DELAY_MIN..=window);
            if control
                .try_send(ControlCommand::Drain { reconnect_after })
                .is_err()
            {
                tracing::debug!(device = %id, "control stream busy or gone; not drained");
            }
        }
    }
    let deadline = tokio::time::Instant::now() + options.drain_grace;
    while !cloud.live().is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Expires holds that were never settled, now and then.
async fn expire_holds(ledger: LedgerWriter) {
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

/// Closes the live connections of devices revoked by another process (`admin device revoke`).
async fn watch_revocations(cloud: Arc<Cloud>) {
    let mut ticker = tokio::time::interval(REVOCATION_POLL_INTERVAL);
    // Look back a little further than one tick, so that a revocation committed while the last
    // query ran is not missed; closing twice is harmless.
    let mut since = now();
    loop {
        ticker.tick().await;
        let polled_at = now();
        let revoked = match cloud.db(move |db| db.revoked_since(since)).await {
            Ok(Ok(ids)) => ids,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot read revocations");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot read revocations");
                continue;
            }
        };
        since = UnixMillis(
            polled_at.0 - 2 * i64::try_from(REVOCATION_POLL_INTERVAL.as_millis()).unwrap_or(0),
        );
        for id in revoked {
            if let Some(live) = cloud.live().get(&id) {
                tracing::info!(device = %id, "closing the connection of a revoked device");
                live.conn.close(
                    close_code(ErrorCode::DEVICE_REVOKED),
                    b"this device was revoked",
                );
            }
        }
    }
}

fn peer_fingerprint(conn: &quinn::Connection) -> Option<synesis_proto::Sha256> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    chain.first().map(fingerprint)
}

fn error_msg(
    code: ErrorCode,
    message: impl Into<String>,
    request_id: Option<synesis_proto::RequestId>,
) -> Message {
    ErrorMsg {
        code,
        message: message.into(),
        request_id,
        retry_after_ms: None,
    }
    .into()
}

async fn connection(cloud: Arc<Cloud>, incoming: quinn::Incoming) {
    let remote = incoming.remote_address();
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!(%remote, error = %e, "handshake failed");
            return;
        }
    };
    match peer_fingerprint(&conn) {
        None => enrollment(&cloud, &conn).await,
        Some(fpr) => device(cloud, conn, fpr).await,
    }
}

/// A connection without a certificate: one enrollment request, one reply.
async fn enrollment(cloud: &Arc<Cloud>, conn: &quinn::Connection) {
    let limits = FrameLimits::default();
    let Ok(Ok((mut tx, rx))) = timeout(FIRST_FRAME_TIMEOUT, conn.accept_bi()).await else {
        conn.close(
            close_code(ErrorCode::UNEXPECTED_MESSAGE),
            b"no enrollment request",
        );
        return;
    };
    let mut rx = FramedRecv::new(rx, limits);
    let reply = match timeout(FIRST_FRAME_TIMEOUT, rx.next()).await {
        Ok(Ok(Some(Message::EnrollRequest(request)))) => enroll(cloud, request).await,
        Ok(Ok(Some(other))) => error_msg(
            ErrorCode::UNAUTHENTICATED,
            format!(
                "{} needs a device certificate; without one a connection may only enroll",
                other.message_type().name()
            ),
            None,
        ),
        Ok(Ok(None)) => return,
        Ok(Err(e)) => error_msg(
            e.peer_fault().unwrap_or(ErrorCode::INTERNAL),
            e.to_string(),
            None,
        ),
        Err(_) => error_msg(
            ErrorCode::UNEXPECTED_MESSAGE,
            "no enrollment request within 10 s",
            None,
        ),
    };
    send_last(&mut tx, &reply).await;
    // Give the device the time to read the reply and close; then close anyway.
    let _ = timeout(FIRST_FRAME_TIMEOUT, conn.closed()).await;
}

async fn enroll(cloud: &Arc<Cloud>, request: EnrollRequest) -> Message {
    let request_id = request.request_id;
    let Some((token_id, secret)) = SetupToken::parse_presented(&request.token_secret) else {
        return error_msg(
            ErrorCode::TOKEN_INVALID,
            "the setup token's secret is malformed",
            Some(request_id),
        );
    };
    let device_id = match DeviceId::try_from_uuid(uuid::Uuid::now_v7()) {
        Ok(id) => id,
        Err(e) => return error_msg(ErrorCode::INTERNAL, e.to_string(), Some(request_id)),
    };
    let pki = Arc::clone(&cloud.pki);
    let csr = request.csr_der.0;
    let name = request.device_name;
    let at = now();
    let outcome = cloud
        .db(move |db| {
            let enrollment = Enrollment {
                token_id,
                secret: &secret,
                request: request_id,
                device_name: &name,
                new_device_id: device_id,
            };
            db.enroll(&enrollment, at, |id| {
                pki.sign_device(&csr, id)
                    .map(|c| c.to_vec())
                    .map_err(|e| e.to_string())
            })
        })
        .await;
    match outcome {
        Ok(Ok(enrolled)) => {
            tracing::info!(device = %enrolled.device_id, account = %enrolled.account_name, "device enrolled");
            EnrollResponse {
                request_id,
                device_id: enrolled.device_id,
                account_id: enrolled.account_id,
                account_name: enrolled.account_name,
                client_cert_der: Blob(enrolled.cert_der),
                ca_cert_der: Blob(cloud.pki.ca_der().to_vec()),
            }
            .into()
        }
        Ok(Err(e)) => {
            if let EnrollError::Db(db) = &e {
                tracing::error!(error = %db, "enrollment failed");
            }
            error_msg(e.code(), e.to_string(), Some(request_id))
        }
        Err(e) => error_msg(ErrorCode::INTERNAL, e.to_string(), Some(request_id)),
    }
}

/// A device's connection: checked against the registry, then one task per stream.
async fn device(cloud: Arc<Cloud>, conn: quinn::Connection, fpr: synesis_proto::Sha256) {
    let found = cloud.db(move |db| db.device_by_cert(&fpr)).await;
    let device = match found {
        Ok(Ok(Some(d))) if !d.revoked => d,
        Ok(Ok(Some(d))) => {
            tracing::info!(device = %d.id, "refusing a revoked device");
            conn.close(
                close_code(ErrorCode::DEVICE_REVOKED),
                b"this device was revoked",
            );
            return;
        }
        Ok(Ok(None)) => {
            conn.close(
                close_code(ErrorCode::UNAUTHENTICATED),
                b"unknown device certificate",
            );
            return;
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "device lookup failed");
            conn.close(close_code(ErrorCode::INTERNAL), b"internal error");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "device lookup failed");
            conn.close(close_code(ErrorCode::INTERNAL), b"internal error");
            return;
        }
    };
    let session = Arc::new(Session {
        cloud,
        device,
        conn,
    });
    while let Ok((tx, rx)) = session.conn.accept_bi().await {
        tokio::spawn(Arc::clone(&session).stream(tx, rx));
    }
}

struct Session {
    cloud: Arc<Cloud>,
    device: Device,
    conn: quinn::Connection,
}

impl Session {
    /// A new stream: its first frame says what it is.
    async fn stream(self: Arc<Self>, mut tx: quinn::SendStream, rx: quinn::RecvStream) {
        let mut rx = FramedRecv::new(rx, FrameLimits::default());
        let first = match timeout(FIRST_FRAME_TIMEOUT, rx.next()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::debug!(device = %self.device.id, error = %e, "bad first frame");
                reject(
                    &mut tx,
                    &mut rx,
                    e.peer_fault().unwrap_or(ErrorCode::INTERNAL),
                    e.to_string(),
                )
                .await;
                return;
            }
            Err(_) => {
                reject(
                    &mut tx,
                    &mut rx,
                    ErrorCode::UNEXPECTED_MESSAGE,
                    "no frame within 10 s".into(),
                )
                .await;
                return;
            }
        };
        match first {
            Message::Hello(hello) => self.control(hello, tx, rx).await,
            Message::DeviceLeave(leave) => self.leave(leave, tx).await,
            Message::TopupRequest(r) => {
                let reply = self.topup(r).await;
                send_last(&mut tx, &reply).await;
            }
            Message::UsageRequest(r) => {
                let reply = self.usage(r).await;
                send_last(&mut tx, &reply).await;
            }
            Message::PriceRequest(r) => {
                let reply = self.price(r).await;
                send_last(&mut tx, &reply).await;
            }
            other => {
                let why = format!("{} cannot open a stream", other.message_type().name());
                reject(&mut tx, &mut rx, ErrorCode::UNEXPECTED_MESSAGE, why).await;
            }
        }
    }

    async fn control(
        &self,
        hello: Hello,
        mut tx: quinn::SendStream,
        mut rx: FramedRecv<quinn::RecvStream>,
    ) {
        let id = self.device.id;
        if !hello.protocol_versions.contains(&PROTOCOL_VERSION) {
            let why = format!(
                "this cloud speaks protocol version {PROTOCOL_VERSION}; the device offered {:?}",
                hello.protocol_versions
            );
            send_last(
                &mut tx,
                &error_msg(ErrorCode::UNSUPPORTED_VERSION, why, None),
            )
            .await;
            self.conn.close(
                close_code(ErrorCode::UNSUPPORTED_VERSION),
                b"unsupported protocol version",
            );
            return;
        }
        let limits = FrameLimits::default().negotiate(hello.max_frame_bytes);
        rx.set_limits(limits);
        let interval_ms = hello
            .heartbeat_interval_ms
            .clamp(HEARTBEAT_INTERVAL_MIN_MS, HEARTBEAT_INTERVAL_MAX_MS);
        let welcome = Welcome {
            protocol_version: PROTOCOL_VERSION,
            device_id: id,
            account_id: self.device.account_id,
            server_time: now(),
            max_frame_bytes: limits.max_payload_bytes(),
        };
        if send(&mut tx, &welcome.into(), limits).await.is_err() {
            return;
        }
        let (control_tx, mut control_rx) = mpsc::channel(CONTROL_INBOX_CAPACITY);
        let generation = self.cloud.register(id, self.conn.clone(), control_tx);
        let at = now();
        let _ = self
            .cloud
            .db(move |db| db.mark_connected(id, interval_ms, at))
            .await;
        tracing::info!(device = %id, remote = %self.conn.remote_address(), "device connected");

        loop {
            tokio::select! {
                biased;
                command = control_rx.recv() => match command {
                    Some(ControlCommand::Drain { reconnect_after }) => {
                        let ms = u32::try_from(reconnect_after.as_millis()).unwrap_or(u32::MAX);
                        let drain = Drain { reconnect_after_ms: ms, reason: "the cloud is restarting".into() };
                        let _ = send(&mut tx, &drain.into(), limits).await;
                    }
                    None => break,
                },
                // `FramedRecv::next` is cancel-safe: bytes read stay in its buffer.
                message = rx.next() => match message {
                    Ok(Some(Message::Heartbeat(hb))) => {
                        let ack = HeartbeatAck { seq: hb.seq, device_sent_at: hb.sent_at, cloud_time: now() };
                        if send(&mut tx, &ack.into(), limits).await.is_err() {
                            break;
                        }
                        let rtt_us = i64::try_from(self.conn.rtt().as_micros()).unwrap_or(i64::MAX);
                        let vitals = serde_json::to_string(&hb.vitals).unwrap_or_default();
                        let at = now();
                        let _ = self.cloud.db(move |db| db.record_heartbeat(id, at, rtt_us, &vitals)).await;
                    }
                    Ok(Some(other)) => {
                        let why = format!("{} does not belong on the control stream", other.message_type().name());
                        send_last(&mut tx, &error_msg(ErrorCode::UNEXPECTED_MESSAGE, why, None)).await;
                        self.conn.close(close_code(ErrorCode::UNEXPECTED_MESSAGE), b"protocol violation on the control stream");
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        if let Some(code) = e.peer_fault() {
                            tracing::info!(device = %id, error = %e, "closing a connection whose control stream broke the framing");
                            send_last(&mut tx, &error_msg(code, e.to_string(), None)).await;
                            self.conn.close(close_code(code), b"framing error on the control stream");
                        }
                        break;
                    }
                },
            }
        }
        if self.cloud.unregister(id, generation) {
            let at = now();
            let _ = self.cloud.db(move |db| db.mark_disconnected(id, at)).await;
            tracing::info!(device = %id, "device disconnected");
        }
    }

    /// `synesis cloud topup --voucher`: a voucher's amount becomes credit, once.
    async fn topup(&self, r: synesis_proto::message::TopupRequest) -> Message {
        let account = self.device.account_id;
        let at = now();
        let (request_id, voucher) = (r.request_id, r.voucher);
        let result = self
            .cloud
            .ledger
            .run(move |store| {
                let Some(amount) = store.redeem_voucher(&voucher, request_id, at)? else {
                    return Ok(None);
                };
                synesis_billing::ledger::top_up(store, account, request_id, amount, at)?;
                let balance = synesis_billing::ledger::balance(store, account, at)?;
                Ok(Some((amount, balance.balance)))
            })
            .await;
        match result {
            Ok(Some((credited, balance))) => synesis_proto::message::TopupReply {
                request_id,
                credited,
                balance,
            }
            .into(),
            Ok(None) => error_msg(
                ErrorCode::VOUCHER_INVALID,
                "unknown voucher, or it was already redeemed",
                Some(request_id),
            ),
            Err(synesis_billing::ledger::LedgerError::IdempotencyConflict) => error_msg(
                ErrorCode::IDEMPOTENCY_CONFLICT,
                "this request id was used for something else",
                Some(request_id),
            ),
            Err(e) => error_msg(ErrorCode::INTERNAL, e.to_string(), Some(request_id)),
        }
    }

    /// `synesis cloud usage`: balance, holds, quota, charges.
    async fn usage(&self, r: synesis_proto::message::UsageRequest) -> Message {
        let account = self.device.account_id;
        let (at, request_id, rules) = (now(), r.request_id, self.cloud.billing.rules);
        let result = self
            .cloud
            .db(
                move |db| -> anyhow::Result<synesis_proto::message::UsageReply> {
                    let acct = db.account_by_id(account)?;
                    Ok(crate::ledger::usage_reply(
                        db.connection(),
                        &acct,
                        &r,
                        at,
                        &rules,
                    )?)
                },
            )
            .await;
        match result {
            Ok(Ok(reply)) => reply.into(),
            Ok(Err(e)) => {
                let code = e
                    .downcast_ref::<crate::ledger::UsageError>()
                    .map_or(ErrorCode::INTERNAL, crate::ledger::UsageError::code);
                error_msg(code, e.to_string(), Some(request_id))
            }
            Err(e) => error_msg(ErrorCode::INTERNAL, e.to_string(), Some(request_id)),
        }
    }

    /// `synesis cloud price`: the account's tier and the price table.
    async fn price(&self, r: synesis_proto::message::PriceRequest) -> Message {
        let account = self.device.account_id;
        match self.cloud.db(move |db| db.account_by_id(account)).await {
            Ok(Ok(acct)) => {
                let rules = self.cloud.billing.rules;
                let markup_bps = match acct.tier {
                    synesis_proto::message::Tier::Free => 0,
                    synesis_proto::message::Tier::Managed => rules.managed_markup_bps,
                    synesis_proto::message::Tier::Byok => rules.byok_fee_bps,
                };
                let prices = self
                    .cloud
                    .billing
                    .prices
                    .iter()
                    .map(|(model, p)| synesis_proto::message::ModelPrice {
                        model: model.to_owned(),
                        input_per_mtok: p.input_per_mtok,
                        output_per_mtok: p.output_per_mtok,
                    })
                    .collect();
                synesis_proto::message::PriceReply {
                    request_id: r.request_id,
                    tier: acct.tier,
                    markup_bps,
                    prices,
                }
                .into()
            }
            Ok(Err(e)) => error_msg(ErrorCode::INTERNAL, e.to_string(), Some(r.request_id)),
            Err(e) => error_msg(ErrorCode::INTERNAL, e.to_string(), Some(r.request_id)),
        }
    }

    /// `synesis cloud logout`: the device revokes itself.
    async fn leave(&self, leave: DeviceLeave, mut tx: quinn::SendStream) {
        let id = self.device.id;
        let at = now();
        let reply = match self.cloud.db(move |db| db.revoke(id, at)).await {
            Ok(Ok(())) => DeviceLeft {
                request_id: leave.request_id,
                device_id: id,
            }
            .into(),
            Ok(Err(e)) => error_msg(ErrorCode::INTERNAL, e.to_string(), Some(leave.request_id)),
            Err(e) => error_msg(ErrorCode::INTERNAL, e.to_string(), Some(leave.request_id)),
        };
        tracing::info!(device = %id, "device left (revoked itself)");
        send_last(&mut tx, &reply).await;
    }
}

/// Answers a bad stream with an error and stops reading it; the connection lives on.
async fn reject(
    tx: &mut quinn::SendStream,
    rx: &mut FramedRecv<quinn::RecvStream>,
    code: ErrorCode,
    why: String,
) {
    let _ = rx.get_mut().stop(close_code(code));
    send_last(tx, &error_msg(code, why, None)).await;
}

/// How long a last message (before a stream or connection is closed) may take to arrive.
const LAST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends a stream's last message and waits (briefly) until the peer has it, so that closing the
/// connection next does not discard it.
async fn send_last(tx: &mut quinn::SendStream, message: &Message) {
    if send(tx, message, FrameLimits::default()).await.is_ok() && tx.finish().is_ok() {
        let _ = timeout(LAST_MESSAGE_TIMEOUT, tx.stopped()).await;
    }
}
