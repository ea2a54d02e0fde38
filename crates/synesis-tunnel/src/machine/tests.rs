//! The machine against a simulated cloud on a virtual clock (THREAD_SAFETY_PATTERNS.md §1): a fault is one line.

use super::*;

/// A simulated cloud with knobs, and the machine under test, on one virtual clock.
struct Pair {
    now: Instant,
    machine: Machine,
    /// One-way network latency.
    latency: Duration,
    /// The cloud answers nothing (a SIGSTOPped or partitioned peer).
    silent: bool,
    /// The cloud refuses connections with this failure.
    refuse: Option<Failure>,
    /// Events in flight to the machine, with their arrival time.
    inbox: Vec<(Instant, Event)>,
    connects: Vec<Instant>,
    heartbeats: Vec<(Instant, u64)>,
    closes: Vec<(Instant, CloseReason)>,
}

impl Pair {
    fn new(seed: u64) -> Pair {
        Pair::with_config(Config::default(), seed)
    }

    fn with_config(config: Config, seed: u64) -> Pair {
        Pair {
            now: Instant::now(),
            machine: Machine::new(config, seed),
            latency: Duration::from_millis(10),
            silent: false,
            refuse: None,
            inbox: Vec::new(),
            connects: Vec::new(),
            heartbeats: Vec::new(),
            closes: Vec::new(),
        }
    }

    fn start(&mut self) {
        self.machine.handle(self.now, Event::Start);
        self.react();
    }

    /// Performs the machine's actions as the simulated cloud would answer them.
    fn react(&mut self) {
        while let Some(action) = self.machine.poll_action() {
            let rtt = self.latency * 2;
            match action {
                Action::Connect => {
                    self.connects.push(self.now);
                    if self.silent {
                        continue;
                    }
                    let event = match &self.refuse {
                        Some(f) => Event::ConnectFailed(f.clone()),
                        None => Event::Connected,
                    };
                    self.inbox.push((self.now + rtt * 2, event));
                }
                Action::SendHeartbeat { seq } => {
                    self.heartbeats.push((self.now, seq));
                    if !self.silent {
                        self.inbox
                            .push((self.now + rtt, Event::HeartbeatAck { seq }));
                    }
                }
                Action::Close(reason) => {
                    self.closes.push((self.now, reason));
                    self.inbox.clear(); // whatever was in flight belonged to that connection
                }
            }
        }
    }

    /// Advances virtual time to the next event or timeout, at most to `until`.
    fn step(&mut self, until: Instant) -> bool {
        let next_event = self.inbox.iter().map(|(t, _)| *t).min();
        let next = [next_event, self.machine.poll_timeout()]
            .into_iter()
            .flatten()
            .min();
        let Some(next) = next.filter(|&t| t <= until) else {
            self.now = until;
            return false;
        };
        self.now = self.now.max(next);
        if let Some(i) = self.inbox.iter().position(|(t, _)| *t <= self.now) {
            let (_, event) = self.inbox.remove(i);
            self.machine.handle(self.now, event);
        } else {
            self.machine.handle_timeout(self.now);
        }
        self.react();
        true
    }

    fn run_for(&mut self, d: Duration) {
        let until = self.now + d;
        while self.step(until) {}
    }

    fn state(&self) -> State {
        self.machine.state()
    }

    /// Steps until the machine is in `state` (at most an hour of virtual time).
    fn run_until(&mut self, state: State) {
        let until = self.now + Duration::from_secs(3_600);
        while self.state() != state {
            assert!(self.step(until), "never reached {state:?}");
        }
    }

    /// The cloud goes down for good while connected: the connection is lost.
    fn lose_connection(&mut self) {
        self.machine.handle(
            self.now,
            Event::ConnectionLost(Failure::Transient("reset".into())),
        );
        self.react();
    }
}

const SEC: Duration = Duration::from_secs(1);

#[test]
fn connects_and_sends_heartbeats_every_interval() {
    let mut p = Pair::new(1);
    p.start();
    p.run_for(SEC * 21);
    assert_eq!(p.state(), State::Connected);
    let times: Vec<_> = p.heartbeats.iter().map(|(t, _)| *t).collect();
    assert_eq!(times.len(), 5, "at 0, 5, 10, 15, 20 s");
    assert!(
        times
            .windows(2)
            .all(|w| w[1] - w[0] == HEARTBEAT_INTERVAL_DEFAULT)
    );
    assert_eq!(p.machine.status().rtt, Some(p.latency * 2));
    assert_eq!(p.machine.status().reconnects, 0);
}

#[test]
fn three_missed_heartbeats_trigger_reconnect() {
    let mut p = Pair::new(2);
    p.start();
    p.run_for(SEC * 7); // connected, two heartbeats acknowledged (0 s and 5 s)
    let last_ack = p.machine.status().last_ack_at.unwrap();
    p.silent = true;
    p.run_for(SEC * 14);
    assert_eq!(
        p.closes.first().map(|c| c.1),
        Some(CloseReason::HeartbeatsMissed)
    );
    let closed_at = p.closes[0].0;
    assert_eq!(
        closed_at - last_ack,
        HEARTBEAT_INTERVAL_DEFAULT * HEARTBEAT_MISSES_MAX
    );
    assert_ne!(p.state(), State::Connected);
    // The last ack came for the heartbeat at 5 s; those at 10, 15 and 20 s went unanswered.
    assert_eq!(p.heartbeats.len(), 5);

    // The peer comes back: the machine reconnects by itself.
    // (An attempt made while it was silent times out first; the next one succeeds.)
    p.silent = false;
    p.run_until(State::Connected);
}

#[test]
fn backoff_delays_stay_inside_the_jitter_bounds_and_cap() {
    for seed in 0..50 {
        let mut p = Pair::new(seed);
        p.silent = true; // every attempt times out
        p.refuse = None;
        p.start();
        p.run_for(Duration::from_secs(3_600));
        let config = *p.machine.config();
        // connect → timeout (CONNECT_TIMEOUT) → delay → connect ...
        for (attempt, pair) in p.connects.windows(2).enumerate() {
            let delay = pair[1] - pair[0] - config.connect_timeout;
            let cap = config.backoff_cap(u32::try_from(attempt).unwrap());
            assert!(
                delay <= cap,
                "seed {seed} attempt {attempt}: {delay:?} > {cap:?}"
            );
            assert!(cap <= RECONNECT_DELAY_MAX);
        }
        assert!(
            p.connects.len() > 40,
            "an hour of 10 s timeouts and ≤ 60 s delays"
        );
    }
}

#[test]
fn backoff_caps_double_from_one_second_to_sixty() {
    let c = Config::default();
    let caps: Vec<u64> = (0..9).map(|a| c.backoff_cap(a).as_secs()).collect();
    assert_eq!(caps, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
    assert_eq!(c.backoff_cap(u32::MAX), RECONNECT_DELAY_MAX);
}

#[test]
fn jitter_is_spread_not_constant() {
    let c = Config::default();
    let delays: std::collections::BTreeSet<Duration> = (0..20)
        .map(|seed| {
            let mut p = Pair::new(seed);
            p.refuse = Some(Failure::Transient("refused".into()));
            p.start();
            p.run_until(State::Reconnecting);
            p.machine.status().retry_at.unwrap() - p.now
        })
        .collect();
    assert!(delays.len() > 10, "{delays:?}");
    assert!(delays.iter().all(|d| *d <= c.backoff_cap(0)));
}

#[test]
fn backoff_resets_after_a_stable_connection() {
    let mut p = Pair::new(7);
    p.refuse = Some(Failure::Transient("refused".into()));
    p.start();
    p.run_for(SEC * 200); // many failed attempts: the cap is at its maximum
    assert!(p.machine.attempt >= 6);
    p.refuse = None;
    p.run_until(State::Connected);

    // Connected for less than the stable minimum: the backoff continues where it was.
    p.run_for(SEC * 10);
    let before = p.machine.attempt;
    p.lose_connection();
    assert_eq!(p.machine.attempt, before + 1);

    // Connected for longer than the stable minimum: the backoff starts over.
    p.run_until(State::Connected);
    p.run_for(STABLE_CONNECTION_MIN);
    p.lose_connection();
    assert_eq!(p.machine.attempt, 1);
    assert!(p.machine.status().retry_at.unwrap() - p.now <= RECONNECT_DELAY_MIN);
}

#[test]
fn fatal_errors_stop_retrying() {
    for fatal in [
        Fatal::Revoked,
        Fatal::BadIdentity("unknown certificate".into()),
        Fatal::IncompatibleVersion("cloud speaks 2".into()),
    ] {
        let mut p = Pair::new(3);
        p.refuse = Some(Failure::Fatal(fatal.clone()));
        p.start();
        p.run_for(SEC * 3_600);
        assert_eq!(
            p.connects.len(),
            1,
            "{fatal:?}: one attempt, no retry storm"
        );
        assert_eq!(p.state(), State::Failed);
        assert_eq!(p.machine.fatal(), Some(&fatal));
        assert_eq!(p.machine.poll_timeout(), None);
    }
}

#[test]
fn revocation_while_connected_closes_and_stops() {
    let mut p = Pair::new(4);
    p.start();
    p.run_for(SEC * 6);
    p.machine
        .handle(p.now, Event::ConnectionLost(Failure::Fatal(Fatal::Revoked)));
    p.react();
    assert_eq!(p.state(), State::Failed);
    p.run_for(SEC * 600);
    assert_eq!(p.connects.len(), 1);
    assert!(p.machine.status().failure.unwrap().contains("revoked"));
}

#[test]
fn a_drain_hint_is_honoured_over_the_backoff() {
    let mut p = Pair::new(5);
    p.start();
    p.run_for(SEC * 2);
    let hint = Duration::from_millis(42_500);
    p.machine.handle(
        p.now,
        Event::Drain {
            reconnect_after: hint,
        },
    );
    p.react();
    let drained_at = p.now;
    assert_eq!(p.closes.last().map(|c| c.1), Some(CloseReason::Drained));
    assert_eq!(p.state(), State::Reconnecting);
    // Nor does a client waiting for the connection cut the drain short.
    p.run_for(SEC * 3);
    p.machine.handle(p.now, Event::Wanted);
    p.react();
    p.run_for(SEC * 57);
    assert_eq!(p.connects.len(), 2);
    assert_eq!(p.connects[1] - drained_at, hint);
    assert_eq!(p.state(), State::Connected);
}

#[test]
fn stop_closes_and_nothing_follows() {
    let mut p = Pair::new(6);
    p.start();
    p.run_for(SEC);
    p.machine.handle(p.now, Event::Stop);
    p.react();
    assert_eq!(p.closes.last().map(|c| c.1), Some(CloseReason::Stopped));
    assert_eq!(p.state(), State::Disconnected);
    assert_eq!(p.machine.poll_timeout(), None);
}

#[test]
fn late_reports_from_an_abandoned_attempt_are_ignored() {
    let mut p = Pair::new(8);
    p.silent = true;
    p.start();
    p.run_for(CONNECT_TIMEOUT + Duration::from_millis(1)); // the attempt timed out
    assert_eq!(p.state(), State::Reconnecting);
    p.machine.handle(p.now, Event::Connected); // the old attempt's handshake finishing late
    assert_eq!(p.state(), State::Reconnecting);
}

#[test]
fn ping_sends_an_extra_heartbeat_and_its_ack_gives_rtt() {
    let mut p = Pair::new(9);
    p.latency = Duration::from_millis(3);
    p.start();
    p.run_for(SEC);
    let seq = p.machine.ping(p.now).unwrap();
    p.react();
    p.run_for(Duration::from_millis(100));
    assert_eq!(p.heartbeats.last().map(|h| h.1), Some(seq));
    assert_eq!(p.machine.status().rtt, Some(Duration::from_millis(6)));
}

#[test]
fn stale_and_duplicate_acks_are_ignored() {
    let mut p = Pair::new(10);
    p.start();
    p.run_for(SEC);
    let before = p.machine.status();
    p.machine.handle(p.now, Event::HeartbeatAck { seq: 999 });
    p.machine.handle(p.now, Event::HeartbeatAck { seq: 0 }); // already acknowledged
    assert_eq!(p.machine.status(), before);
}

/// Failed attempts until the next is at least `far` away: where the backoff has grown.
fn backed_off(p: &mut Pair, far: Duration) -> Instant {
    p.refuse = Some(Failure::Transient("refused".into()));
    p.start();
    loop {
        let at = p.machine.status().retry_at;
        if let Some(at) = at.filter(|at| *at >= p.now + far) {
            return at;
        }
        assert!(
            p.step(p.now + Duration::from_secs(3_600)),
            "never backed off"
        );
    }
}

#[test]
fn a_waiting_client_brings_a_long_backoff_forward_once_a_second_at_most() {
    for seed in 0..20 {
        let mut p = Pair::new(seed);
        let retry_at = backed_off(&mut p, SEC * 12);
        let attempts = p.connects.len();
        let last = *p.connects.last().unwrap();
        // The cloud is back; a client waits.
        p.refuse = None;
        p.run_for(SEC * 2);
        assert_eq!(
            p.connects.len(),
            attempts,
            "seed {seed}: nothing before it is wanted"
        );
        p.machine.handle(p.now, Event::Wanted);
        p.react();
        assert_eq!(
            p.connects.len(),
            attempts + 1,
            "seed {seed}: wanted, attempted at once"
        );
        assert!(p.now >= last + RECONNECT_DELAY_MIN && p.now < retry_at);
        p.run_until(State::Connected);
    }
}

#[test]
fn wanting_the_connection_again_and_again_makes_at_most_one_attempt_a_second() {
    let mut p = Pair::new(7);
    backed_off(&mut p, SEC * 12);
    assert_eq!(p.machine.attempt as usize, p.connects.len());
    let before = p.connects.len();
    let first = p.now;
    // A client every 100 ms for 5 s, the cloud still refusing.
    while p.now < first + SEC * 5 {
        p.machine.handle(p.now, Event::Wanted);
        p.react();
        p.run_for(Duration::from_millis(100));
    }
    let wanted = &p.connects[before..];
    assert!(
        wanted
            .windows(2)
            .all(|w| w[1] - w[0] >= RECONNECT_DELAY_MIN),
        "{wanted:?}"
    );
    assert!(
        (4..=6).contains(&wanted.len()),
        "{} attempts in 5 s",
        wanted.len()
    );
    // Each wanted attempt that failed counts in the backoff as any other.
    assert_eq!(p.machine.attempt as usize, p.connects.len());
}

#[test]
fn wanting_a_connection_that_is_up_or_failed_changes_nothing() {
    let mut p = Pair::new(9);
    p.start();
    p.run_for(SEC * 2);
    p.machine.handle(p.now, Event::Wanted);
    p.react();
    assert_eq!((p.state(), p.connects.len()), (State::Connected, 1));
    p.machine
        .handle(p.now, Event::ConnectionLost(Failure::Fatal(Fatal::Revoked)));
    p.react();
    p.machine.handle(p.now, Event::Wanted);
    p.react();
    p.run_for(SEC * 60);
    assert_eq!((p.state(), p.connects.len()), (State::Failed, 1));
}
