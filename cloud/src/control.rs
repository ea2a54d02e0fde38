//! The control stream: `Hello` → `Welcome`, then heartbeats and their acks until the device
//! goes; the endpoint's drain commands go out on it.
//!
//! - An ack never waits for the database: presence (connected, each heartbeat, disconnected)
//!   is queued for the recorder, which writes it in batches.
//! - A device that heartbeats faster than it announced is throttled ([`HeartbeatBudget`]): past
//!   a burst (pings), its heartbeats are read and acked at most twice per interval, and QUIC's
//!   flow control holds back the rest. One that falls silent for [`SILENCE_INTERVALS_MAX`]
//!   intervals is closed.
//! - Only control messages are read here; anything else is refused from its type byte.

use std::time::{Duration, Instant};

use synesis_proto::message::{Drain, HeartbeatAck, Hello, Welcome};
use synesis_proto::{ErrorCode, FrameLimits, Message, PROTOCOL_VERSION, StreamKind};
use synesis_wire::{RecvError, close_code, send};
use tokio::sync::mpsc;

use crate::endpoint::Peer;
use crate::registry::ControlCommand;
use crate::shared::now;
use crate::storage::Presence;
use crate::streams::{Stream, error_msg};

/// Heartbeat intervals a device may announce.
pub const HEARTBEAT_INTERVAL_MIN_MS: u32 = 100;
pub const HEARTBEAT_INTERVAL_MAX_MS: u32 = 15_000;
/// A session with no heartbeat for this many announced intervals is closed. Above the three
/// a device itself waits for acks (and its QUIC idle timeout of four), so a live device
/// never meets it; between three and this many it shows as stale.
pub const SILENCE_INTERVALS_MAX: u32 = 6;
/// Heartbeats a device may send back to back before the pace counts: `synesis cloud ping`
/// sends its own, up to 16 in flight.
const HEARTBEAT_BURST_MAX: u32 = 16;
/// The largest frame the cloud reads on a control stream (a heartbeat with its vitals).
pub const CONTROL_FRAME_BYTES_MAX: u32 = 64 * 1024;
/// Commands queued for one device's control stream.
const CONTROL_INBOX_CAPACITY: usize = 8;

const _: () = assert!(
    SILENCE_INTERVALS_MAX > 4,
    "a live device must never meet the silence limit"
);

/// How fast a device may heartbeat: on average at most twice per announced interval, after a
/// burst of [`HEARTBEAT_BURST_MAX`]. A pure value: the caller passes the time.
#[derive(Debug, Clone)]
pub(crate) struct HeartbeatBudget {
    spacing: Duration,
    tolerance: Duration,
    /// When the next heartbeat would be on time, if all before it were.
    due: Option<Instant>,
}

impl HeartbeatBudget {
    pub(crate) fn new(interval: Duration) -> HeartbeatBudget {
        let spacing = interval / 2;
        HeartbeatBudget {
            spacing,
            tolerance: spacing * HEARTBEAT_BURST_MAX,
            due: None,
        }
    }

    /// How long a heartbeat arriving at `now` would have to wait to be within the budget (zero
    /// for a device that keeps its word).
    pub(crate) fn hold(&self, now: Instant) -> Duration {
        let due = self.due.map_or(now, |d| d.max(now));
        due.saturating_duration_since(now)
            .saturating_sub(self.tolerance.saturating_sub(self.spacing))
    }

    /// Counts a heartbeat that arrived at `now`; how long it should have been held.
    pub(crate) fn delay(&mut self, now: Instant) -> Duration {
        let hold = self.hold(now);
        let due = self.due.map_or(now, |d| d.max(now));
        self.due = Some(due + self.spacing);
        hold
    }
}

pub(crate) async fn serve(peer: &Peer, hello: Hello, mut stream: Stream) {
    let id = peer.device.id;
    let shared = &peer.shared;
    if !hello.protocol_versions.contains(&PROTOCOL_VERSION) {
        let why = format!(
            "this cloud speaks protocol version {PROTOCOL_VERSION}; the device offered {:?}",
            hello.protocol_versions
        );
        stream
            .send_last(&error_msg(ErrorCode::UNSUPPORTED_VERSION, why, None))
            .await;
        peer.conn.close(
            close_code(ErrorCode::UNSUPPORTED_VERSION),
            b"unsupported protocol version",
        );
        return;
    }
    let limits = FrameLimits::default().negotiate(hello.max_frame_bytes);
    peer.negotiated(limits);
    // What the device sends here is small (heartbeats); the connection's maximum is for the
    // streams that carry answers and uploads.
    stream
        .rx
        .set_limits(limits.negotiate(CONTROL_FRAME_BYTES_MAX));
    let interval_ms = hello
        .heartbeat_interval_ms
        .clamp(HEARTBEAT_INTERVAL_MIN_MS, HEARTBEAT_INTERVAL_MAX_MS);
    let interval = Duration::from_millis(u64::from(interval_ms));
    let welcome = Welcome {
        protocol_version: PROTOCOL_VERSION,
        device_id: id,
        account_id: peer.device.account_id,
        server_time: now(),
        max_frame_bytes: limits.max_payload_bytes(),
        nodes: shared.cluster.peers(),
    };
    if send(&mut stream.tx, &welcome.into(), limits).await.is_err() {
        return;
    }
    let (control_tx, mut control_rx) = mpsc::channel(CONTROL_INBOX_CAPACITY);
    let generation = shared
        .registry
        .open_session(id, peer.conn.clone(), control_tx);
    shared.presence.note(Presence::Connected {
        device: id,
        heartbeat_interval_ms: interval_ms,
        at: now(),
    });
    tracing::info!(device = %id, remote = %peer.conn.remote_address(), "device connected");

    let mut budget = HeartbeatBudget::new(interval);
    let silence = interval * SILENCE_INTERVALS_MAX;
    let control_only = |t: synesis_proto::MessageType| t.stream() == StreamKind::Control;
    loop {
        // A device over its budget is throttled by reading its next frame later (drain commands
        // still go out meanwhile); QUIC's flow control holds back what it sends.
        let pause = budget.hold(Instant::now());
        if !pause.is_zero() {
            tracing::debug!(device = %id, interval_ms, ?pause, "throttling heartbeats faster than announced");
        }
        let next = async {
            tokio::time::sleep(pause).await;
            tokio::time::timeout(silence, stream.rx.next_if(control_only)).await
        };
        tokio::select! {
            biased;
            command = control_rx.recv() => match command {
                Some(ControlCommand::Drain { reconnect_after, to }) => {
                    let ms = u32::try_from(reconnect_after.as_millis()).unwrap_or(u32::MAX);
                    let reason = match &to {
                        Some(node) => format!("this node is stopping; go on with {node}"),
                        None => "the cloud is restarting".into(),
                    };
                    let drain = Drain { reconnect_after_ms: ms, reason, to };
                    let _ = send(&mut stream.tx, &drain.into(), limits).await;
                }
                None => break,
            },
            // `FramedRecv::next_if` is cancel-safe: bytes read stay in its buffer.
            message = next => match message {
                Ok(Ok(Some(Message::Heartbeat(hb)))) => {
                    budget.delay(Instant::now());
                    let ack = HeartbeatAck { seq: hb.seq, device_sent_at: hb.sent_at, cloud_time: now() };
                    // A device that reads no acks holds only its own session.
                    if !matches!(tokio::time::timeout(silence, send(&mut stream.tx, &ack.into(), limits)).await, Ok(Ok(()))) {
                        break;
                    }
                    let rtt = peer.conn.rtt();
                    shared.metrics.heartbeat_rtt.observe(rtt.as_secs_f64());
                    shared.presence.note(Presence::Seen {
                        device: id,
                        at: now(),
                        rtt_us: i64::try_from(rtt.as_micros()).unwrap_or(i64::MAX),
                        vitals_json: serde_json::to_string(&hb.vitals).unwrap_or_default(),
                    });
                }
                Ok(Ok(Some(Message::Prewarm(p)))) => {
                    // Counted against the same budget as heartbeats: a flood is throttled.
                    budget.delay(Instant::now());
                    if let Some(model) = &p.model {
                        shared.escalations.prewarm(model);
                    }
                    tracing::info!(device = %id, model = ?p.model, reason = %p.reason, "pre-warm signal");
                    let json = serde_json::json!({"model": p.model, "reason": p.reason, "at": now()});
                    shared.presence.note(Presence::Prewarm { device: id, prewarm_json: json.to_string() });
                }
                Ok(Ok(Some(other))) => {
                    let why = format!("{} does not belong on the control stream", other.message_type().name());
                    stream.send_last(&error_msg(ErrorCode::UNEXPECTED_MESSAGE, why, None)).await;
                    peer.conn.close(close_code(ErrorCode::UNEXPECTED_MESSAGE), b"protocol violation on the control stream");
                    break;
                }
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    if let Some(code) = e.peer_fault() {
                        tracing::info!(device = %id, error = %e, "closing a connection whose control stream broke the protocol");
                        let why = match &e {
                            RecvError::NotAllowed(t) => format!("{} does not belong on the control stream", t.name()),
                            other => other.to_string(),
                        };
                        stream.send_last(&error_msg(code, why, None)).await;
                        peer.conn.close(close_code(code), b"protocol violation on the control stream");
                    }
                    break;
                }
                Err(_) => {
                    tracing::info!(device = %id, "closing a session with no heartbeat for {SILENCE_INTERVALS_MAX} intervals");
                    peer.conn.close(close_code(ErrorCode::UNAVAILABLE), b"no heartbeat");
                    break;
                }
            },
        }
    }
    if shared.registry.close_session(id, generation) {
        shared.presence.note(Presence::Disconnected {
            device: id,
            at: now(),
        });
        tracing::info!(device = %id, "device disconnected");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_at_the_announced_pace_are_never_held() {
        let t0 = Instant::now();
        let mut b = HeartbeatBudget::new(Duration::from_secs(1));
        for i in 0..1_000 {
            assert!(
                b.delay(t0 + Duration::from_secs(i)).is_zero(),
                "heartbeat {i}"
            );
        }
    }

    #[test]
    fn a_burst_passes_then_a_flood_is_paced_at_twice_the_interval() {
        let t0 = Instant::now();
        let mut b = HeartbeatBudget::new(Duration::from_secs(1));
        let holds: Vec<Duration> = (0..50).map(|_| b.delay(t0)).collect();
        let free = holds.iter().filter(|d| d.is_zero()).count();
        assert_eq!(free, HEARTBEAT_BURST_MAX as usize);
        // Past the burst, one more every half interval.
        for (k, hold) in holds.iter().enumerate().skip(free) {
            let beyond = u32::try_from(k - free + 1).unwrap();
            assert_eq!(*hold, Duration::from_millis(500) * beyond, "heartbeat {k}");
        }
        // After a long pause the budget is back.
        assert!(b.delay(t0 + Duration::from_secs(60)).is_zero());
    }

    #[test]
    fn twice_the_announced_rate_is_the_most_sustained_unheld() {
        let t0 = Instant::now();
        let mut b = HeartbeatBudget::new(Duration::from_secs(1));
        assert!((0..100).all(|i| b.delay(t0 + Duration::from_millis(500 * i)).is_zero()));
        let mut b = HeartbeatBudget::new(Duration::from_secs(1));
        assert!(!(0..100).all(|i| b.delay(t0 + Duration::from_millis(333 * i)).is_zero()));
    }
}
