//! The tunnel's connection logic as a pure state machine (THREAD_SAFETY_PATTERNS.md §1, after `quinn-proto`).
//!
//! ```text
//!   Disconnected --start--> Connecting --session up--> Connected
//!        ^                    |   ^                       |
//!        | stop               |   | retry timer           | lost / acks missed / drain
//!        |                    v   |                       v
//!        +------------------ Reconnecting <---------------+
//!   any state --fatal error--> Failed (stays; no retries)
//! ```
//!
//! A client waiting for the connection ([`Event::Wanted`]) brings a reconnect forward, at most
//! one attempt per [`Config::reconnect_delay_min`].
//!
//! Input: [`Machine::handle`] with an [`Event`] and the time it happened, and
//! [`Machine::handle_timeout`] when the time from [`Machine::poll_timeout`] has come. Output:
//! [`Machine::poll_action`] (connect, send a heartbeat, close) and [`Machine::status`]. Nothing in
//! here reads a clock, sleeps, touches a socket or draws entropy: `now` is always passed in and
//! the jitter generator is seeded by the caller, so tests drive it with virtual time.

mod rng;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use rng::SplitMix64;

/// Heartbeats are sent this often unless configured otherwise.
pub const HEARTBEAT_INTERVAL_DEFAULT: Duration = Duration::from_secs(5);
/// The connection is dead when no heartbeat has been acknowledged for this many intervals.
pub const HEARTBEAT_MISSES_MAX: u32 = 3;
/// The first reconnect delay cap; it doubles per failed attempt.
pub const RECONNECT_DELAY_MIN: Duration = Duration::from_secs(1);
/// The largest reconnect delay cap.
pub const RECONNECT_DELAY_MAX: Duration = Duration::from_secs(60);
/// A connection that lasted this long resets the backoff.
pub const STABLE_CONNECTION_MIN: Duration = Duration::from_secs(30);
/// A connection attempt (QUIC and TLS handshake plus hello/welcome) that takes longer fails.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

const _: () = assert!(RECONNECT_DELAY_MIN.as_nanos() <= RECONNECT_DELAY_MAX.as_nanos());
const _: () = assert!(HEARTBEAT_MISSES_MAX >= 2);
// A stable connection must outlive the dead-peer detection, or a flapping peer never backs off.
const _: () = assert!(
    STABLE_CONNECTION_MIN.as_nanos()
        > HEARTBEAT_INTERVAL_DEFAULT.as_nanos() * HEARTBEAT_MISSES_MAX as u128
);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config {
    pub heartbeat_interval: Duration,
    pub heartbeat_misses_max: u32,
    pub reconnect_delay_min: Duration,
    pub reconnect_delay_max: Duration,
    pub stable_connection_min: Duration,
    pub connect_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            heartbeat_interval: HEARTBEAT_INTERVAL_DEFAULT,
            heartbeat_misses_max: HEARTBEAT_MISSES_MAX,
            reconnect_delay_min: RECONNECT_DELAY_MIN,
            reconnect_delay_max: RECONNECT_DELAY_MAX,
            stable_connection_min: STABLE_CONNECTION_MIN,
            connect_timeout: CONNECT_TIMEOUT,
        }
    }
}

impl Config {
    /// How long without an acknowledged heartbeat before the connection is dead.
    pub fn dead_after(&self) -> Duration {
        self.heartbeat_interval
            .saturating_mul(self.heartbeat_misses_max)
    }

    /// The reconnect delay cap after `attempt` failed attempts: min · 2^attempt, at most max.
    pub fn backoff_cap(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.reconnect_delay_min
            .saturating_mul(factor)
            .min(self.reconnect_delay_max)
    }
}

/// Errors that retrying cannot heal. The machine stops in [`State::Failed`] on these.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fatal {
    /// The cloud revoked this device.
    Revoked,
    /// The cloud does not accept this device's certificate (or the device's files are broken).
    BadIdentity(String),
    /// No protocol version in common.
    IncompatibleVersion(String),
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fatal::Revoked => f.write_str(
                "this device was revoked by the cloud; enroll it again with `synesis cloud login TOKEN`",
            ),
            Fatal::BadIdentity(why) => write!(f, "the cloud refused this device's identity: {why}"),
            Fatal::IncompatibleVersion(why) => write!(f, "incompatible protocol version: {why}"),
        }
    }
}

/// Why a connection attempt failed or a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Worth retrying: resets, an unreachable or restarting cloud.
    Transient(String),
    /// Worth retrying: no answer in time (a handshake, a stream, a reply, or the connection
    /// went idle).
    TimedOut(String),
    Fatal(Fatal),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Begin connecting (from `Disconnected`).
    Start,
    /// The session is established (the cloud's welcome arrived).
    Connected,
    ConnectFailed(Failure),
    /// The cloud acknowledged heartbeat `seq`.
    HeartbeatAck {
        seq: u64,
    },
    /// The established connection ended.
    ConnectionLost(Failure),
    /// The cloud is draining: reconnect after this long, whatever the backoff says.
    Drain {
        reconnect_after: Duration,
    },
    /// A client is waiting for the connection (a command's stream, through the local API):
    /// while reconnecting, the next attempt is brought forward to now, but never sooner than
    /// [`Config::reconnect_delay_min`] after the last attempt began, and never before a drain's
    /// `reconnect_after`. The backoff itself is unchanged: a failed attempt still doubles it.
    Wanted,
    /// Stop for good (the service is shutting down).
    Stop,
}

/// Why the machine closes a connection or abandons an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    ConnectTimedOut,
    HeartbeatsMissed,
    Drained,
    Fatal,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a connection attempt; report `Connected` or `ConnectFailed`.
    Connect,
    /// Send heartbeat `seq` on the control stream.
    SendHeartbeat { seq: u64 },
    /// Close the connection or abandon the attempt in progress.
    Close(CloseReason),
}

/// The public state, as subscribers see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Disconnected,
    Connecting,
    Connected,
    Reconnecting,
    Failed,
}

/// Everything a status report needs, in the machine's (monotonic) time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// How many times the connection was lost or an attempt failed and a retry was scheduled.
    pub reconnects: u64,
    pub rtt: Option<Duration>,
    pub last_ack_at: Option<Instant>,
    pub connected_since: Option<Instant>,
    /// When the next attempt starts, while reconnecting.
    pub retry_at: Option<Instant>,
    /// Why the machine failed, or why the last connection ended.
    pub failure: Option<String>,
}

#[derive(Debug, Clone)]
enum Phase {
    Disconnected,
    Connecting {
        deadline: Instant,
    },
    Connected(Link),
    Reconnecting {
        retry_at: Instant,
        /// The earliest a wanted attempt may start ([`Event::Wanted`]).
        not_before: Instant,
    },
    Failed(Fatal),
}

/// Heartbeat bookkeeping of one established connection.
#[derive(Debug, Clone)]
struct Link {
    since: Instant,
    next_heartbeat: Instant,
    last_ack: Option<Instant>,
    next_seq: u64,
    /// Heartbeats sent and not yet acknowledged, oldest first (bounded: see `send_heartbeat`).
    in_flight: VecDeque<(u64, Instant)>,
}

impl Link {
    /// When the connection counts as dead if no ack arrives before.
    fn ack_deadline(&self, config: &Config) -> Instant {
        self.last_ack.unwrap_or(self.since) + config.dead_after()
    }
}

#[derive(Debug, Clone)]
pub struct Machine {
    config: Config,
    phase: Phase,
    /// Failed attempts since the last stable connection; drives the backoff cap.
    attempt: u32,
    rng: SplitMix64,
    actions: VecDeque<Action>,
    reconnects: u64,
    rtt: Option<Duration>,
    last_ack_at: Option<Instant>,
    last_failure: Option<String>,
    /// When the last connection attempt began.
    last_attempt_at: Option<Instant>,
}

impl Machine {
    /// `seed` feeds the backoff jitter; the driver draws it from the OS once.
    pub fn new(config: Config, seed: u64) -> Machine {
        Machine {
            config,
            phase: Phase::Disconnected,
            attempt: 0,
            rng: SplitMix64::new(seed),
            actions: VecDeque::new(),
            reconnects: 0,
            rtt: None,
            last_ack_at: None,
            last_failure: None,
            last_attempt_at: None,
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn handle(&mut self, now: Instant, event: Event) {
        match (&mut self.phase, event) {
            (_, Event::Stop) => {
                if matches!(self.phase, Phase::Connecting { .. } | Phase::Connected(_)) {
                    self.actions.push_back(Action::Close(CloseReason::Stopped));
                }
                self.phase = Phase::Disconnected;
            }
            (Phase::Failed(_), _) => {} // terminal: nothing but Stop changes it
            (Phase::Disconnected, Event::Start) => self.connect(now),
            (Phase::Connecting { .. }, Event::Connected) => {
                self.phase = Phase::Connected(Link {
                    since: now,
                    next_heartbeat: now,
                    last_ack: None,
                    next_seq: 0,
                    in_flight: VecDeque::new(),
                });
                self.last_failure = None;
                // The first heartbeat goes out at once: it measures RTT and carries vitals.
                self.handle_timeout(now);
            }
            (Phase::Connecting { .. }, Event::ConnectFailed(failure)) => self.fail(now, failure),
            (Phase::Connected(link), Event::HeartbeatAck { seq }) => {
                // Acks for heartbeats no longer in flight (stale, duplicated) are ignored.
                if let Some(pos) = link.in_flight.iter().position(|&(s, _)| s == seq) {
                    let sent = link.in_flight[pos].1;
                    link.in_flight.drain(..=pos);
                    link.last_ack = Some(now);
                    self.last_ack_at = Some(now);
                    self.rtt = Some(now.saturating_duration_since(sent));
                }
            }
            (Phase::Connected(_), Event::ConnectionLost(failure)) => self.fail(now, failure),
            (Phase::Connected(_), Event::Drain { reconnect_after }) => {
                self.actions.push_back(Action::Close(CloseReason::Drained));
                self.attempt = 0;
                self.reconnects += 1;
                self.last_failure = Some("the cloud is draining".to_owned());
                self.phase = Phase::Reconnecting {
                    retry_at: now + reconnect_after,
                    not_before: now + reconnect_after,
                };
            }
            (
                Phase::Reconnecting {
                    retry_at,
                    not_before,
                },
                Event::Wanted,
            ) => {
                let wanted = now.max(*not_before);
                if wanted < *retry_at {
                    tracing::debug!(
                        sooner_by = ?retry_at.saturating_duration_since(wanted),
                        "a client waits: the next attempt comes sooner"
                    );
                    *retry_at = wanted;
                }
                if now >= *retry_at {
                    self.connect(now);
                }
            }
            // Anything else is an event for a state we already left (a late report from a
            // connection we abandoned): ignore it.
            _ => {}
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match &mut self.phase {
            Phase::Connecting { deadline } if now >= *deadline => {
                self.actions
                    .push_back(Action::Close(CloseReason::ConnectTimedOut));
                self.fail(
                    now,
                    Failure::TimedOut("connection attempt timed out".to_owned()),
                );
            }
            Phase::Connected(link) => {
                if now >= link.ack_deadline(&self.config) {
                    self.actions
                        .push_back(Action::Close(CloseReason::HeartbeatsMissed));
                    let missed = self.config.heartbeat_misses_max;
                    self.fail(
                        now,
                        Failure::Transient(format!(
                            "no heartbeat acknowledged for {missed} intervals"
                        )),
                    );
                } else if now >= link.next_heartbeat {
                    // From the time actually sent: a late driver delays, never bunches, heartbeats.
                    link.next_heartbeat = now + self.config.heartbeat_interval;
                    let seq = Self::send_heartbeat(link, now, &mut self.actions, &self.config);
                    tracing::trace!(seq, "heartbeat due");
                }
            }
            Phase::Reconnecting { retry_at, .. } if now >= *retry_at => self.connect(now),
            _ => {}
        }
    }

    /// Sends a heartbeat now, outside the schedule (for `synesis cloud ping`). Returns its
    /// sequence number, or `None` when not connected.
    pub fn ping(&mut self, now: Instant) -> Option<u64> {
        match &mut self.phase {
            Phase::Connected(link) => Some(Self::send_heartbeat(
                link,
                now,
                &mut self.actions,
                &self.config,
            )),
            _ => None,
        }
    }

    fn send_heartbeat(
        link: &mut Link,
        now: Instant,
        actions: &mut VecDeque<Action>,
        config: &Config,
    ) -> u64 {
        let seq = link.next_seq;
        link.next_seq += 1;
        // Older entries than the dead-peer window can never matter again.
        let keep = (config.heartbeat_misses_max as usize)
            .saturating_mul(4)
            .max(8);
        while link.in_flight.len() >= keep {
            link.in_flight.pop_front();
        }
        link.in_flight.push_back((seq, now));
        actions.push_back(Action::SendHeartbeat { seq });
        seq
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// When [`Machine::handle_timeout`] must be called next, if ever.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match &self.phase {
            Phase::Connecting { deadline } => Some(*deadline),
            Phase::Connected(link) => {
                Some(link.next_heartbeat.min(link.ack_deadline(&self.config)))
            }
            Phase::Reconnecting { retry_at, .. } => Some(*retry_at),
            Phase::Disconnected | Phase::Failed(_) => None,
        }
    }

    pub fn state(&self) -> State {
        match self.phase {
            Phase::Disconnected => State::Disconnected,
            Phase::Connecting { .. } => State::Connecting,
            Phase::Connected(_) => State::Connected,
            Phase::Reconnecting { .. } => State::Reconnecting,
            Phase::Failed(_) => State::Failed,
        }
    }

    pub fn fatal(&self) -> Option<&Fatal> {
        match &self.phase {
            Phase::Failed(f) => Some(f),
            _ => None,
        }
    }

    pub fn status(&self) -> Status {
        Status {
            state: self.state(),
            reconnects: self.reconnects,
            rtt: self.rtt,
            last_ack_at: self.last_ack_at,
            connected_since: match &self.phase {
                Phase::Connected(link) => Some(link.since),
                _ => None,
            },
            retry_at: match self.phase {
                Phase::Reconnecting { retry_at, .. } => Some(retry_at),
                _ => None,
            },
            failure: match &self.phase {
                Phase::Failed(f) => Some(f.to_string()),
                _ => self.last_failure.clone(),
            },
        }
    }

    fn connect(&mut self, now: Instant) {
        self.last_attempt_at = Some(now);
        self.phase = Phase::Connecting {
            deadline: now + self.config.connect_timeout,
        };
        self.actions.push_back(Action::Connect);
    }

    /// The attempt or the connection failed: stop for good, or schedule the next attempt.
    fn fail(&mut self, now: Instant, failure: Failure) {
        let reason = match failure {
            Failure::Fatal(fatal) => {
                if matches!(self.phase, Phase::Connected(_)) {
                    self.actions.push_back(Action::Close(CloseReason::Fatal));
                }
                self.phase = Phase::Failed(fatal);
                return;
            }
            Failure::Transient(reason) | Failure::TimedOut(reason) => reason,
        };
        if let Phase::Connected(link) = &self.phase
            && now.saturating_duration_since(link.since) >= self.config.stable_connection_min
        {
            self.attempt = 0;
        }
        // Full jitter: uniform in [0, cap], cap = min · 2^attempt ≤ max.
        let cap = self.config.backoff_cap(self.attempt);
        let cap_ms = u64::try_from(cap.as_millis()).unwrap_or(u64::MAX);
        let delay = Duration::from_millis(self.rng.up_to(cap_ms));
        self.attempt = self.attempt.saturating_add(1);
        self.reconnects += 1;
        self.last_failure = Some(reason);
        let not_before = self
            .last_attempt_at
            .map_or(now, |at| at + self.config.reconnect_delay_min);
        self.phase = Phase::Reconnecting {
            retry_at: now + delay,
            not_before: not_before.min(now + delay),
        };
    }
}

#[cfg(test)]
mod tests;
