//! Many devices on the cloud, and what they cost it: a `synesis-cloud serve` process (or two on
//! one PostgreSQL database, `--postgres URL`), then devices enrolled for real (each its own key
//! and certificate, through the enrollment protocol), each on its own QUIC connection with
//! `Hello` and a heartbeat every 5 s carrying vitals, as a device's service sends; with two
//! nodes, every other device on each. At each step the nodes' CPU (from /proc over a window of
//! heartbeats) and resident memory are read and reported per device. Then, with every device
//! still heartbeating, escalations (`--escalations N`, 200 by default, 20 a second) from the
//! devices through the nodes to a real HTTP upstream (the tests' scripted OpenAI-compatible
//! one): the time from each request to its first chunk, p50 and p99.
//!
//! ```sh
//! cargo build --release -p synesis-cloud -p synesis-e2e --bin synesis-cloud --bin devices-load
//! target/release/devices-load 1000 5000 10000        # add --json for one JSON object
//! target/release/devices-load --postgres postgres://postgres@127.0.0.1:5432/postgres 10000
//! ```
//!
//! The devices run in this one process (tokio, a few client endpoints); on a small machine it
//! takes CPU from the nodes it measures, which the report shows beside the nodes' own.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a measuring tool: a failure says where

use std::io::BufRead;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use synesis_proto::message::{Heartbeat, Hello};
use synesis_proto::{FrameLimits, Message, PROTOCOL_VERSION, SetupToken};
use tokio::sync::Semaphore;

/// How often each device heartbeats (the service's default is 5 s too).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// Enrollments at once (the node takes 8 certificate-less connections per source address).
const ENROLLING: usize = 6;
/// Handshakes at once (the node takes 64 per source address).
const CONNECTING: usize = 32;
/// Client endpoints (UDP sockets) the devices share.
const ENDPOINTS: usize = 8;
/// How long the node's CPU is measured at each step: three heartbeat rounds.
const WINDOW: Duration = Duration::from_secs(15);
/// Escalations started per second in the escalation phase.
const ESCALATION_RATE: u32 = 20;
/// Escalations running at once, at most (the account's `per_account_max` is set above it).
const ESCALATING: usize = 64;

struct Options {
    steps: Vec<usize>,
    json: bool,
    escalations: usize,
    /// A PostgreSQL server: two nodes on a new database there; `None`, one node on SQLite.
    postgres: Option<String>,
}

fn usage_exit() -> ! {
    eprintln!(
        "usage: devices-load [--json] [--escalations N] [--postgres URL] COUNT…   (e.g. 1000 5000 10000)"
    );
    std::process::exit(2)
}

fn main() {
    let mut o = Options {
        steps: Vec::new(),
        json: false,
        escalations: 200,
        postgres: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--json" => o.json = true,
            "--escalations" => {
                o.escalations = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| usage_exit());
            }
            "--postgres" => o.postgres = Some(args.next().unwrap_or_else(|| usage_exit())),
            n => o.steps.push(n.parse().unwrap_or_else(|_| usage_exit())),
        }
    }
    if o.steps.is_empty() {
        o.steps = vec![1_000, 5_000, 10_000];
    }
    o.steps.sort_unstable();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(run(&o));
    if o.json {
        let steps: Vec<serde_json::Value> = report
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "devices": s.devices,
                    "connected": s.connected,
                    "node_cores": s.node_cores,
                    "cores_per_node": s.cores_per_node,
                    "load_cores": s.load_cores,
                    "node_rss_kib": s.node_rss_kib,
                    "rss_kib_per_device": s.rss_kib_per_device,
                    "heartbeats_acked": s.heartbeats_acked,
                    "enroll_seconds": s.enroll_seconds,
                    "connect_seconds": s.connect_seconds,
                })
            })
            .collect();
        let out = serde_json::json!({
            "nodes": report.nodes,
            "heartbeat_interval_s": report.heartbeat_interval_s,
            "window_s": report.window_s,
            "baseline_rss_kib": report.baseline_rss_kib,
            "steps": steps,
            "escalations": report.escalations.as_ref().map(|e| serde_json::json!({
                "devices_heartbeating": e.devices,
                "asked": e.asked,
                "answered": e.answered,
                "refused": e.refused,
                "rate_per_s": ESCALATION_RATE,
                "ttft_p50_ms": e.p50_ms,
                "ttft_p99_ms": e.p99_ms,
                "ttft_max_ms": e.max_ms,
                "node_cores": e.node_cores,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
    }
}

/// A node under load: its process and address.
struct Node {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cloud_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let cloud = exe.parent().unwrap().join("synesis-cloud");
    assert!(
        cloud.is_file(),
        "{} is not built: cargo build --release -p synesis-cloud",
        cloud.display()
    );
    cloud
}

/// `synesis-cloud admin` on `place`.
fn admin(place: &synesis_cloud::admin::Place, args: &[&str]) {
    let mut cmd = std::process::Command::new(cloud_binary());
    cmd.args(["admin", "--data-dir"]).arg(&place.dir).args(args);
    if let Some(url) = &place.database {
        cmd.env("SYNESIS_CLOUD_DATABASE", url);
    }
    let status = cmd.stdout(std::process::Stdio::null()).status().unwrap();
    assert!(status.success(), "admin {args:?}");
}

fn start_node(place: &synesis_cloud::admin::Place, config: &std::path::Path) -> Node {
    let mut cmd = std::process::Command::new(cloud_binary());
    if let Some(url) = &place.database {
        cmd.env("SYNESIS_CLOUD_DATABASE", url);
    }
    let mut child = cmd
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(config)
        .arg("--data-dir")
        .arg(&place.dir)
        .env("RUST_LOG", "warn")
        .env("SYNESIS_TEST_OPERATOR_KEY", "load")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .parse()
        .unwrap();
    Node { child, addr }
}

/// The process's CPU time so far (user + system), and its resident memory in KiB.
fn usage(pid: u32) -> (Duration, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis: utime is the 12th, stime the 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let rss = synesis_e2e::rss_kib(pid);
    // Linux counts CPU time in clock ticks of 1/100 s (USER_HZ).
    (Duration::from_millis(ticks * 10), rss)
}

struct Step {
    devices: usize,
    connected: u64,
    /// The nodes' CPU over the window, in cores (1.0 = one core busy), all together.
    node_cores: f64,
    /// Each node's share of it.
    cores_per_node: Vec<f64>,
    /// This load generator's own CPU over the window, in cores.
    load_cores: f64,
    /// The nodes' RSS, all together.
    node_rss_kib: u64,
    /// (RSS now − RSS before any device) ÷ devices, all nodes together.
    rss_kib_per_device: f64,
    heartbeats_acked: u64,
    enroll_seconds: f64,
    connect_seconds: f64,
}

/// Escalations while every device heartbeats.
struct Escalations {
    devices: usize,
    asked: usize,
    answered: usize,
    refused: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    node_cores: f64,
}

struct Report {
    nodes: usize,
    heartbeat_interval_s: u64,
    window_s: u64,
    baseline_rss_kib: u64,
    steps: Vec<Step>,
    escalations: Option<Escalations>,
}

/// CPU time and RSS of every node.
fn usages(nodes: &[Node]) -> Vec<(Duration, u64)> {
    nodes.iter().map(|n| usage(n.child.id())).collect()
}

async fn run(o: &Options) -> Report {
    let up = synesis_e2e::upstream::upstream(Vec::new()).await;
    let scratch = tempfile::tempdir().unwrap();
    let config = scratch.path().join("cloud.toml");
    std::fs::write(
        &config,
        format!(
            "[escalation]\nper_account_max = {}\n{}",
            ESCALATING * 2,
            synesis_e2e::upstream::upstream_model(up.port, "[\"managed\"]")
        ),
    )
    .unwrap();
    let database = match &o.postgres {
        Some(server) => {
            let (server, name) = (
                server.clone(),
                format!("synesis_load_{}", uuid::Uuid::now_v7().simple()),
            );
            Some(
                tokio::task::spawn_blocking(move || {
                    synesis_cloud::storage::postgres::create_database(&server, &name)
                })
                .await
                .unwrap()
                .unwrap(),
            )
        }
        None => None,
    };
    let place = synesis_cloud::admin::Place {
        dir: scratch.path().join("cloud"),
        database,
    };
    let count = if place.database.is_some() { 2 } else { 1 };
    let nodes: Vec<Node> = (0..count).map(|_| start_node(&place, &config)).collect();
    admin(&place, &["account", "create", "load", "--tier", "managed"]);
    admin(&place, &["credit", "load", "1000.00"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline_rss: u64 = usages(&nodes).iter().map(|u| u.1).sum();
    for n in &nodes {
        eprintln!("node {} (pid {})", n.addr, n.child.id());
    }
    eprintln!("{baseline_rss} KiB RSS before any device");
    let endpoints: Vec<quinn::Endpoint> = (0..ENDPOINTS)
        .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let acked = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let mut devices = Vec::new();
    let mut conns: Vec<quinn::Connection> = Vec::new();
    let addrs: Vec<std::net::SocketAddr> = nodes.iter().map(|n| n.addr).collect();
    let mut report = Report {
        nodes: nodes.len(),
        heartbeat_interval_s: HEARTBEAT.as_secs(),
        window_s: WINDOW.as_secs(),
        baseline_rss_kib: baseline_rss,
        steps: Vec::new(),
        escalations: None,
    };
    for &target in &o.steps {
        let from = devices.len();
        let began = Instant::now();
        let identities = enroll(&place, &addrs, from, target).await;
        let enroll_seconds = began.elapsed().as_secs_f64();
        let began = Instant::now();
        let gate = Arc::new(Semaphore::new(CONNECTING));
        let mut waiting = Vec::new();
        for (i, identity) in identities.into_iter().enumerate() {
            let endpoint = endpoints[(from + i) % ENDPOINTS].clone();
            let (gate, acked, connected) = (
                Arc::clone(&gate),
                Arc::clone(&acked),
                Arc::clone(&connected),
            );
            let (up, is_up) = tokio::sync::oneshot::channel();
            devices.push(tokio::spawn(async move {
                let permit = gate.acquire_owned().await.unwrap();
                device(endpoint, identity, permit, up, &acked, &connected).await;
            }));
            waiting.push(is_up);
        }
        for up in waiting {
            if let Ok(conn) = up.await {
                conns.push(conn);
            }
        }
        let connect_seconds = began.elapsed().as_secs_f64();
        // Two heartbeat rounds to settle, then the window.
        tokio::time::sleep(2 * HEARTBEAT).await;
        let nodes_before = usages(&nodes);
        let (load_before, _) = usage(std::process::id());
        let acked_before = acked.load(Ordering::Relaxed);
        tokio::time::sleep(WINDOW).await;
        let nodes_after = usages(&nodes);
        let (load_after, _) = usage(std::process::id());
        let window = WINDOW.as_secs_f64();
        let cores_per_node: Vec<f64> = nodes_before
            .iter()
            .zip(&nodes_after)
            .map(|(b, a)| (a.0 - b.0).as_secs_f64() / window)
            .collect();
        let rss: u64 = nodes_after.iter().map(|u| u.1).sum();
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let step = Step {
            devices: target,
            connected: connected.load(Ordering::Relaxed),
            node_cores: cores_per_node.iter().sum(),
            cores_per_node,
            load_cores: (load_after - load_before).as_secs_f64() / window,
            node_rss_kib: rss,
            rss_kib_per_device: rss.saturating_sub(baseline_rss) as f64 / target as f64,
            heartbeats_acked: acked.load(Ordering::Relaxed) - acked_before,
            enroll_seconds,
            connect_seconds,
        };
        eprintln!(
            "{:>6} devices ({} connected): nodes {:.3} cores {:.3?}, {} KiB RSS ({:.1} KiB/device); load generator {:.3} cores; {} heartbeats acked in {} s; enrolled in {:.0} s, connected in {:.0} s",
            step.devices,
            step.connected,
            step.node_cores,
            step.cores_per_node,
            step.node_rss_kib,
            step.rss_kib_per_device,
            step.load_cores,
            step.heartbeats_acked,
            WINDOW.as_secs(),
            step.enroll_seconds,
            step.connect_seconds,
        );
        report.steps.push(step);
    }
    if o.escalations > 0 && !conns.is_empty() {
        let before = usages(&nodes);
        let began = Instant::now();
        let e = escalate(&conns, o.escalations).await;
        let after = usages(&nodes);
        let seconds = began.elapsed().as_secs_f64();
        let node_cores = before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a.0 - b.0).as_secs_f64() / seconds)
            .sum();
        let e = Escalations { node_cores, ..e };
        eprintln!(
            "{} escalations ({} a second) while {} devices heartbeat: {} answered, {} refused; first chunk p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; nodes {:.3} cores",
            e.asked,
            ESCALATION_RATE,
            e.devices,
            e.answered,
            e.refused,
            e.p50_ms,
            e.p99_ms,
            e.max_ms,
            e.node_cores
        );
        report.escalations = Some(e);
    }
    for d in devices {
        d.abort();
    }
    report
}

/// `n` escalations at [`ESCALATION_RATE`] a second (at most [`ESCALATING`] at once), each from
/// the next device on its own connection: the time from sending each to its first chunk.
async fn escalate(conns: &[quinn::Connection], n: usize) -> Escalations {
    let gate = Arc::new(Semaphore::new(ESCALATING));
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / ESCALATION_RATE);
    let mut tasks = Vec::new();
    for i in 0..n {
        ticker.tick().await;
        let conn = conns[i * 7919 % conns.len()].clone();
        let permit = Arc::clone(&gate).acquire_owned().await.unwrap();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let id = synesis_tunnel::clock::new_request_id();
            let request = synesis_e2e::escalation_request(id, "up", "hello", 16);
            let sent = Instant::now();
            let (mut tx, rx) = conn.open_bi().await.ok()?;
            synesis_wire::send(&mut tx, &request.into(), FrameLimits::default())
                .await
                .ok()?;
            let mut rx = synesis_wire::FramedRecv::new(rx, FrameLimits::default());
            let mut first = None;
            loop {
                match rx.next().await {
                    Ok(Some(Message::EscalationChunk(_))) => {
                        first.get_or_insert_with(|| sent.elapsed());
                    }
                    Ok(Some(Message::EscalationDone(_))) => return first,
                    other => {
                        eprintln!("an escalation ended with {other:?}");
                        return None;
                    }
                }
            }
        }));
    }
    let mut times = Vec::new();
    for t in tasks {
        if let Some(d) = t.await.unwrap() {
            times.push(d.as_secs_f64() * 1_000.0);
        }
    }
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((times.len() as f64 * q).ceil() as usize).clamp(1, times.len().max(1)) - 1;
        times.get(i).copied().unwrap_or(f64::NAN)
    };
    Escalations {
        devices: conns.len(),
        asked: n,
        answered: times.len(),
        refused: n - times.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: times.last().copied().unwrap_or(f64::NAN),
        node_cores: 0.0,
    }
}

/// Devices `from..to`, enrolled: a setup token each (issued as `admin token create` does), then
/// the enrollment protocol over QUIC.
async fn enroll(
    place: &synesis_cloud::admin::Place,
    addrs: &[std::net::SocketAddr],
    from: usize,
    to: usize,
) -> Vec<synesis_tunnel::Identity> {
    // The database handle blocks on a runtime of its own (PostgreSQL): not on this one.
    let (place, addrs) = (place.clone(), addrs.to_vec());
    let tokens: Vec<SetupToken> = tokio::task::spawn_blocking(move || {
        (from..to)
            .map(|i| {
                synesis_cloud::admin::token_issue(
                    &place,
                    "load",
                    None,
                    Duration::from_secs(3_600),
                    Some(addrs[i % addrs.len()].to_string()),
                )
                .unwrap()
            })
            .collect()
    })
    .await
    .unwrap();
    let gate = Arc::new(Semaphore::new(ENROLLING));
    let mut tasks = Vec::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let gate = Arc::clone(&gate);
        tasks.push(tokio::spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            let pending = synesis_tunnel::enroll::PendingEnrollment::begin(
                &token,
                &format!("load-{}", from + i),
            )
            .unwrap();
            synesis_tunnel::enroll::enroll(&token, &pending)
                .await
                .unwrap()
        }));
    }
    let mut identities = Vec::new();
    for t in tasks {
        identities.push(t.await.unwrap());
    }
    identities
}

/// One device: its connection (to the node its token named; handed to `up` once welcomed),
/// `Hello`, then a heartbeat every [`HEARTBEAT`] (acks counted), until the task is dropped.
async fn device(
    endpoint: quinn::Endpoint,
    identity: synesis_tunnel::Identity,
    permit: tokio::sync::OwnedSemaphorePermit,
    up: tokio::sync::oneshot::Sender<quinn::Connection>,
    acked: &AtomicU64,
    connected: &AtomicU64,
) {
    let addr: std::net::SocketAddr = identity.info.server.parse().unwrap();
    let config = synesis_tunnel::tls::device_client_config(&identity, HEARTBEAT).unwrap();
    let conn = match endpoint
        .connect_with(config, addr, synesis_wire::tls::SERVER_NAME)
        .unwrap()
        .await
    {
        Ok(conn) => conn,
        Err(e) => {
            eprintln!("a device could not connect: {e}");
            return;
        }
    };
    let limits = FrameLimits::default();
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    let hello = Hello {
        protocol_versions: vec![PROTOCOL_VERSION],
        client: "devices-load/0".into(),
        heartbeat_interval_ms: u32::try_from(HEARTBEAT.as_millis()).unwrap(),
        max_frame_bytes: 1 << 20,
    };
    synesis_wire::send(&mut tx, &hello.into(), limits)
        .await
        .unwrap();
    let mut rx = synesis_wire::FramedRecv::new(rx, limits);
    match rx.next().await {
        Ok(Some(Message::Welcome(_))) => {}
        other => {
            eprintln!("no Welcome: {other:?}");
            return;
        }
    }
    connected.fetch_add(1, Ordering::Relaxed);
    drop(permit);
    let _ = up.send(conn.clone());
    let mut ticker = tokio::time::interval(HEARTBEAT);
    let mut seq = 0u64;
    loop {
        ticker.tick().await;
        seq += 1;
        let heartbeat = Heartbeat {
            seq,
            sent_at: synesis_tunnel::clock::unix_now(),
            vitals: synesis_e2e::empty_vitals(),
        };
        if synesis_wire::send(&mut tx, &heartbeat.into(), limits)
            .await
            .is_err()
        {
            return;
        }
        match rx.next().await {
            Ok(Some(Message::HeartbeatAck(_))) => {
                acked.fetch_add(1, Ordering::Relaxed);
            }
            _ => return,
        }
    }
}
