//! Many devices on one cloud node, and what they cost it: a `synesis-cloud serve` process, then
//! devices enrolled for real (each its own key and certificate, through the enrollment
//! protocol), each on its own QUIC connection with `Hello` and a heartbeat every 5 s carrying
//! vitals, as a device's service sends. At each step the node's CPU (from /proc over a window of
//! heartbeats) and resident memory are read and reported per device.
//!
//! ```sh
//! cargo build --release -p synesis-cloud -p synesis-e2e --bin devices-load
//! target/release/devices-load 1000 5000 10000        # add --json for one JSON object
//! ```
//!
//! The devices run in this one process (tokio, a few client endpoints); on a small machine it
//! takes CPU from the node it measures, which the report shows beside the node's own.
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

fn main() {
    let mut steps: Vec<usize> = Vec::new();
    let mut json = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--json" => json = true,
            n => steps.push(n.parse().unwrap_or_else(|_| {
                eprintln!("usage: devices-load [--json] COUNT…   (e.g. 1000 5000 10000)");
                std::process::exit(2)
            })),
        }
    }
    if steps.is_empty() {
        steps = vec![1_000, 5_000, 10_000];
    }
    steps.sort_unstable();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = runtime.block_on(run(&steps));
    if json {
        let steps: Vec<serde_json::Value> = report
            .steps
            .iter()
            .map(|s| {
                serde_json::json!({
                    "devices": s.devices,
                    "connected": s.connected,
                    "node_cores": s.node_cores,
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
            "heartbeat_interval_s": report.heartbeat_interval_s,
            "window_s": report.window_s,
            "baseline_rss_kib": report.baseline_rss_kib,
            "steps": steps,
        });
        println!("{}", serde_json::to_string_pretty(&out).unwrap());
    }
}

/// The node under load: its process and address.
struct Node {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node() -> Node {
    let exe = std::env::current_exe().unwrap();
    let cloud = exe.parent().unwrap().join("synesis-cloud");
    assert!(
        cloud.is_file(),
        "{} is not built: cargo build --release -p synesis-cloud",
        cloud.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(&cloud)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("cloud"))
        .env("RUST_LOG", "warn")
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
    Node { child, addr, dir }
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
    /// The node's CPU over the window, in cores (1.0 = one core busy).
    node_cores: f64,
    /// This load generator's own CPU over the window, in cores.
    load_cores: f64,
    node_rss_kib: u64,
    /// (RSS now − RSS before any device) ÷ devices.
    rss_kib_per_device: f64,
    heartbeats_acked: u64,
    enroll_seconds: f64,
    connect_seconds: f64,
}

struct Report {
    heartbeat_interval_s: u64,
    window_s: u64,
    baseline_rss_kib: u64,
    steps: Vec<Step>,
}

async fn run(steps: &[usize]) -> Report {
    let node = start_node();
    let pid = node.child.id();
    let place = synesis_cloud::admin::Place::dir(&node.dir.path().join("cloud"));
    let status = std::process::Command::new(
        std::env::current_exe()
            .unwrap()
            .parent()
            .unwrap()
            .join("synesis-cloud"),
    )
    .args(["admin", "--data-dir"])
    .arg(node.dir.path().join("cloud"))
    .args(["account", "create", "load", "--tier", "managed"])
    .stdout(std::process::Stdio::null())
    .status()
    .unwrap();
    assert!(status.success());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, baseline_rss) = usage(pid);
    eprintln!(
        "node {} (pid {pid}) at {} KiB before any device",
        node.addr, baseline_rss
    );
    let endpoints: Vec<quinn::Endpoint> = (0..ENDPOINTS)
        .map(|_| quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap())
        .collect();
    let acked = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicU64::new(0));
    let mut devices = Vec::new();
    let mut report = Report {
        heartbeat_interval_s: HEARTBEAT.as_secs(),
        window_s: WINDOW.as_secs(),
        baseline_rss_kib: baseline_rss,
        steps: Vec::new(),
    };
    for &target in steps {
        let from = devices.len();
        let began = Instant::now();
        let identities = enroll(&place, node.addr, from, target).await;
        let enroll_seconds = began.elapsed().as_secs_f64();
        let began = Instant::now();
        let gate = Arc::new(Semaphore::new(CONNECTING));
        let addr = node.addr;
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
                device(endpoint, addr, identity, permit, up, &acked, &connected).await;
            }));
            waiting.push(is_up);
        }
        for up in waiting {
            let _ = up.await;
        }
        let connect_seconds = began.elapsed().as_secs_f64();
        // Two heartbeat rounds to settle, then the window.
        tokio::time::sleep(2 * HEARTBEAT).await;
        let (node_before, _) = usage(pid);
        let (load_before, _) = usage(std::process::id());
        let acked_before = acked.load(Ordering::Relaxed);
        tokio::time::sleep(WINDOW).await;
        let (node_after, rss) = usage(pid);
        let (load_after, _) = usage(std::process::id());
        let window = WINDOW.as_secs_f64();
        #[allow(clippy::cast_precision_loss)] // counts far below 2^52
        let step = Step {
            devices: target,
            connected: connected.load(Ordering::Relaxed),
            node_cores: (node_after - node_before).as_secs_f64() / window,
            load_cores: (load_after - load_before).as_secs_f64() / window,
            node_rss_kib: rss,
            rss_kib_per_device: rss.saturating_sub(baseline_rss) as f64 / target as f64,
            heartbeats_acked: acked.load(Ordering::Relaxed) - acked_before,
            enroll_seconds,
            connect_seconds,
        };
        eprintln!(
            "{:>6} devices ({} connected): node {:.3} cores, {} KiB RSS ({:.1} KiB/device); load generator {:.3} cores; {} heartbeats acked in {} s; enrolled in {:.0} s, connected in {:.0} s",
            step.devices,
            step.connected,
            step.node_cores,
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
    for d in devices {
        d.abort();
    }
    report
}

/// Devices `from..to`, enrolled: a setup token each (issued as `admin token create` does), then
/// the enrollment protocol over QUIC.
async fn enroll(
    place: &synesis_cloud::admin::Place,
    addr: std::net::SocketAddr,
    from: usize,
    to: usize,
) -> Vec<synesis_tunnel::Identity> {
    let tokens: Vec<SetupToken> = (from..to)
        .map(|_| {
            synesis_cloud::admin::token_issue(
                place,
                "load",
                None,
                Duration::from_secs(3_600),
                Some(addr.to_string()),
            )
            .unwrap()
        })
        .collect();
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

/// One device: its connection, `Hello`, then a heartbeat every [`HEARTBEAT`] (acks counted),
/// until the task is dropped.
async fn device(
    endpoint: quinn::Endpoint,
    addr: std::net::SocketAddr,
    identity: synesis_tunnel::Identity,
    permit: tokio::sync::OwnedSemaphorePermit,
    up: tokio::sync::oneshot::Sender<()>,
    acked: &AtomicU64,
    connected: &AtomicU64,
) {
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
    let _ = up.send(());
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
