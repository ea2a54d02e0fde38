//! Support for end-to-end tests: find the workspace's binaries and give each simulated device
//! a fresh `SYNESIS_HOME` (ripgrep's `tests/util.rs` is the model).
//!
//! The binaries are the ones `cargo test --workspace` builds (cargo builds a package's binaries
//! for its own integration tests, and `synesis-cli` has some), found beside this test
//! executable's `deps/` directory. Tests never use fixed ports: servers bind port 0.

// Test support: a setup step that fails should fail the test, loudly and at once.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod hub;
pub mod upstream;
pub mod wire;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The path of a workspace binary, e.g. `bin("synesis")`.
///
/// # Panics
/// If the binary was not built, with the command that builds it.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/*/deps");
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    assert!(
        path.is_file(),
        "{} is not built; run `cargo test --workspace` (or `cargo build --bins`) first",
        path.display()
    );
    path
}

/// One simulated device: a fresh, empty `SYNESIS_HOME` removed when dropped.
#[derive(Debug)]
pub struct Device {
    home: tempfile::TempDir,
}

impl Device {
    pub fn new() -> Device {
        Device {
            home: tempfile::tempdir().expect("a temporary SYNESIS_HOME"),
        }
    }

    pub fn home(&self) -> &Path {
        self.home.path()
    }

    /// `synesis` with this device's home and nothing else from the environment that could leak
    /// the developer's own files in (HOME, XDG_*).
    pub fn synesis(&self) -> Command {
        let mut cmd = Command::new(bin("synesis"));
        cmd.env_clear()
            .env("SYNESIS_HOME", self.home())
            .env("PATH", std::env::var_os("PATH").unwrap_or_default());
        cmd
    }
}

impl Default for Device {
    fn default() -> Self {
        Device::new()
    }
}

/// Runs `cmd`, asserts it succeeded, and parses its stdout as one JSON value.
/// Whether `python3` can import `module` (a peer or client a test drives).
pub fn python_has(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether a test that lacks a peer may skip itself: outside CI it may (and says why on
/// stderr); inside CI (`CI` set, as `.ci/run` does) a skip is a failure, so a missing peer
/// never passes as a test that ran. Returns `true` when the caller should return early.
pub fn skip_unless(available: bool, what: &str) -> bool {
    if available {
        return false;
    }
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false") {
        panic!("CI must run this test, but {what} (.ci/run installs it)");
    }
    eprintln!("SKIPPED (outside CI): {what}");
    true
}

/// A `/metrics` scrape as the Prometheus project's Python parser (`prometheus_client`) reads it:
/// every sample as `name{label="value",…}` (labels sorted) → value. A text it cannot parse fails the test.
pub fn prometheus_samples(text: &str) -> std::collections::HashMap<String, f64> {
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the scrape: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

pub fn sample(samples: &std::collections::HashMap<String, f64>, key: &str) -> f64 {
    *samples
        .get(key)
        .unwrap_or_else(|| panic!("no sample {key}; have {:#?}", sorted(samples)))
}

fn sorted(samples: &std::collections::HashMap<String, f64>) -> Vec<(&String, &f64)> {
    let mut all: Vec<_> = samples.iter().collect();
    all.sort_by(|a, b| a.0.cmp(b.0));
    all
}

/// One HTTP/1.1 request with exactly these headers and body: the status code and the body.
pub fn raw_http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(addr).expect("the server accepts");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(120)))
        .expect("a read timeout");
    let mut request = format!("{method} {path} HTTP/1.1\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    std::io::Write::write_all(&mut stream, request.as_bytes()).expect("the request is sent");
    let mut response = String::new();
    std::io::Read::read_to_string(&mut stream, &mut response).expect("a response");
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The resident memory of process `pid`, in KiB (0 when it cannot be read).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|n| n.parse().ok())
        })
        .unwrap_or(0)
}

pub fn json_of(cmd: &mut Command) -> serde_json::Value {
    let out = run_ok(cmd);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// Runs `cmd` and asserts it succeeded, showing its stderr when not.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("the command starts");
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Polls `condition` every 50 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: std::time::Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Sends a signal by name (`KILL`, `STOP`, `CONT`, `TERM`, `INT`) with the system's `kill`.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill -{name} {pid}");
}

/// A child process killed when dropped, so a failing test leaves nothing running.
#[derive(Debug)]
pub struct Running {
    pub child: std::process::Child,
}

impl Running {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit (at most `limit`); its exit code.
    pub fn wait(&mut self, limit: std::time::Duration) -> Option<i32> {
        let mut status = None;
        wait_for(limit, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        status.and_then(|s| s.code())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .stderr(std::process::Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `synesis-cloud serve` on loopback, on a port the OS chose, with its own data directory.
#[derive(Debug)]
pub struct Cloud {
    pub process: Running,
    pub addr: std::net::SocketAddr,
    /// The data directory: made by the cloud itself, inside `_scratch`.
    dir: PathBuf,
    /// The `serve` flags it was started with (a restart keeps them).
    args: Vec<String>,
    /// Its database, when it is not SQLite in the data directory ([`e2e_database`]).
    database: Option<String>,
    /// Where it serves `/metrics`, when started with `--metrics-listen`.
    metrics: Option<std::net::SocketAddr>,
    /// Where its stderr goes (one file per node).
    log: PathBuf,
    _scratch: std::sync::Arc<tempfile::TempDir>,
}

/// The database a new cloud of this run gets: SQLite in its data directory, or, when
/// `SYNESIS_E2E_BACKEND=postgres`, a new PostgreSQL database of its own on the server
/// `SYNESIS_TEST_POSTGRES` names (`.ci/run` runs the escalation, upload, member and
/// enrollment suites a second time so).
pub fn e2e_database() -> Option<String> {
    match std::env::var("SYNESIS_E2E_BACKEND").as_deref() {
        Ok("postgres") => Some(
            postgres_database()
                .expect("SYNESIS_E2E_BACKEND=postgres needs SYNESIS_TEST_POSTGRES (a server URL)"),
        ),
        Ok("sqlite") | Ok("") | Err(_) => None,
        Ok(other) => panic!("SYNESIS_E2E_BACKEND={other:?}: sqlite or postgres"),
    }
}

/// A new, empty PostgreSQL database on the server `SYNESIS_TEST_POSTGRES` names (`None`: it
/// names none), and its URL.
pub fn postgres_database() -> Option<String> {
    let server = std::env::var("SYNESIS_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.is_empty())?;
    let name = format!("synesis_e2e_{}", uuid::Uuid::now_v7().simple());
    // On a thread of its own: the PostgreSQL handle blocks on a runtime of its own, and async
    // tests start clouds too.
    let made = std::thread::spawn(move || {
        synesis_cloud::storage::postgres::create_database(&server, &name)
    });
    Some(
        made.join()
            .expect("the database thread")
            .expect("a database of the test's own"),
    )
}

impl Cloud {
    /// Starts a cloud on a new data directory.
    pub fn start() -> Cloud {
        Cloud::start_with(&[])
    }

    /// Starts a cloud on a new data directory with more `serve` flags.
    pub fn start_with(args: &[&str]) -> Cloud {
        let scratch = tempfile::tempdir().expect("a scratch directory");
        let dir = scratch.path().join("cloud");
        let database = e2e_database();
        let log = dir.with_extension("serve.log");
        let (process, addr, metrics) =
            Cloud::spawn(&dir, database.as_deref(), "127.0.0.1:0", args, &log);
        Cloud {
            process,
            addr,
            metrics,
            dir,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            database,
            log,
            _scratch: std::sync::Arc::new(scratch),
        }
    }

    /// Another node of this cloud, on PostgreSQL: a second `serve` process on the same data
    /// directory (the CA and the adapters' content every node reads) and the same database, on
    /// a port of its own, with these `serve` flags.
    pub fn node(&self, args: &[&str]) -> Cloud {
        let database = self
            .database
            .clone()
            .expect("several nodes share a PostgreSQL database");
        let log = self
            .dir
            .with_extension(format!("serve-{}.log", uuid::Uuid::now_v7().simple()));
        let (process, addr, metrics) =
            Cloud::spawn(&self.dir, Some(&database), "127.0.0.1:0", args, &log);
        Cloud {
            process,
            addr,
            metrics,
            dir: self.dir.clone(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            database: Some(database),
            log,
            _scratch: std::sync::Arc::clone(&self._scratch),
        }
    }

    /// A cloud on a new data directory and a new PostgreSQL database of its own (`None` when
    /// `SYNESIS_TEST_POSTGRES` names no server), with these `serve` flags.
    pub fn start_on_postgres(args: &[&str]) -> Option<Cloud> {
        let database = postgres_database()?;
        let scratch = tempfile::tempdir().expect("a scratch directory");
        let dir = scratch.path().join("cloud");
        let log = dir.with_extension("serve.log");
        let (process, addr, metrics) =
            Cloud::spawn(&dir, Some(&database), "127.0.0.1:0", args, &log);
        Some(Cloud {
            process,
            addr,
            metrics,
            dir,
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            database: Some(database),
            log,
            _scratch: std::sync::Arc::new(scratch),
        })
    }

    fn spawn(
        dir: &Path,
        database: Option<&str>,
        listen: &str,
        args: &[&str],
        log: &Path,
    ) -> (Running, std::net::SocketAddr, Option<std::net::SocketAddr>) {
        use std::io::BufRead;
        let mut serve = Command::new(bin("synesis-cloud"));
        if let Some(url) = database {
            serve.env("SYNESIS_CLOUD_DATABASE", url);
        }
        let mut child = serve
            .args([
                "serve",
                "--listen",
                listen,
                "--drain-window",
                "1s",
                "--drain-grace",
                "3s",
                "--data-dir",
            ])
            .arg(dir)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(
                std::fs::File::create(log).map_or_else(|_| std::process::Stdio::null(), Into::into),
            )
            .spawn()
            .expect("synesis-cloud starts");
        let stdout = child.stdout.take().expect("stdout");
        let mut stdout = std::io::BufReader::new(stdout);
        let mut said = |prefix: &str| -> std::net::SocketAddr {
            let mut line = String::new();
            stdout
                .read_line(&mut line)
                .expect("the cloud says where it listens");
            line.trim()
                .strip_prefix(prefix)
                .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
                .parse()
                .expect("an address")
        };
        let addr = said("listening on ");
        let metrics = args
            .contains(&"--metrics-listen")
            .then(|| said("metrics on "));
        (Running { child }, addr, metrics)
    }

    /// Where it serves `/metrics`, `/live` and `/ready` (started with `--metrics-listen`).
    pub fn metrics_addr(&self) -> std::net::SocketAddr {
        self.metrics.expect("a cloud started with --metrics-listen")
    }

    /// Starts the cloud again on the same data directory and port (killing it first if it
    /// still runs).
    pub fn restart(&mut self) {
        let args = self.args.clone();
        self.restart_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// [`restart`](Self::restart) with other `serve` flags (kept for later restarts).
    pub fn restart_with(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| (*a).to_owned()).collect();
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
        let listen = self.addr.to_string();
        let (process, addr, metrics) = Cloud::spawn(
            &self.dir,
            self.database.as_deref(),
            &listen,
            args,
            &self.log,
        );
        self.metrics = metrics;
        let old = std::mem::replace(&mut self.process, process);
        drop(old);
        assert_eq!(addr, self.addr);
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The cloud's database, opened here (either backend): for reads quicker than an `admin`
    /// process.
    pub fn store(&self) -> Box<dyn synesis_cloud::storage::Backend> {
        let at = synesis_cloud::storage::Location::new(&self.dir, self.database.as_deref())
            .expect("the cloud's database");
        // Opened off any runtime (PostgreSQL's handle blocks on one of its own).
        std::thread::spawn(move || at.open())
            .join()
            .expect("the database thread")
            .expect("the cloud's database")
    }

    /// What the cloud wrote to stderr so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn admin(&self) -> Command {
        let mut cmd = Command::new(bin("synesis-cloud"));
        cmd.arg("admin").arg("--data-dir").arg(&self.dir);
        if let Some(url) = &self.database {
            cmd.env("SYNESIS_CLOUD_DATABASE", url);
        }
        cmd
    }

    /// A new account and a setup token for it.
    pub fn account_and_token(&self, account: &str) -> String {
        run_ok(self.admin().args(["account", "create", account]));
        self.token(account, "1h")
    }

    pub fn token(&self, account: &str, ttl: &str) -> String {
        let out =
            run_ok(
                self.admin()
                    .args(["token", "create", "--account", account, "--ttl", ttl]),
            );
        String::from_utf8(out.stdout)
            .expect("UTF-8")
            .trim()
            .to_owned()
    }

    /// A new voucher worth `dollars` (e.g. `"10.00"`): its code.
    pub fn voucher(&self, dollars: &str) -> String {
        let out = run_ok(self.admin().args(["voucher", "create", dollars]));
        String::from_utf8(out.stdout)
            .expect("UTF-8")
            .trim()
            .to_owned()
    }

    /// Credits `device`'s account with `dollars` through a voucher it redeems.
    pub fn top_up(&self, device: &Device, dollars: &str) {
        let code = self.voucher(dollars);
        run_ok(
            device
                .synesis()
                .args(["cloud", "topup", "--voucher", &code]),
        );
    }

    pub fn devices(&self) -> Vec<serde_json::Value> {
        match json_of(self.admin().args(["devices", "--json"])) {
            serde_json::Value::Array(devices) => devices,
            other => panic!("not a list: {other}"),
        }
    }

    /// The status the cloud reports for one device.
    pub fn device_status(&self, device_id: &str) -> Option<String> {
        self.devices()
            .into_iter()
            .find(|d| d["device_id"] == device_id)
            .and_then(|d| d["status"].as_str().map(str::to_owned))
    }
}

impl Device {
    /// `synesis cloud login TOKEN`; returns the device id.
    pub fn login(&self, token: &str) -> String {
        let v = json_of(self.synesis().args(["--json", "cloud", "login", token]));
        v["device_id"].as_str().expect("a device id").to_owned()
    }

    /// `synesis tunnel run` with the given heartbeat interval, in the background.
    pub fn tunnel(&self, heartbeat_interval: &str) -> Running {
        let child = self
            .synesis()
            .args(["tunnel", "run", "--heartbeat-interval", heartbeat_interval])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::File::create(self.home().join("tunnel.log"))
                    .map_or_else(|_| std::process::Stdio::null(), Into::into),
            )
            .spawn()
            .expect("synesis tunnel run starts");
        Running { child }
    }

    /// `synesis cloud status --json`, or `None` while no service answers.
    pub fn status(&self) -> Option<serde_json::Value> {
        let out = self
            .synesis()
            .args(["--json", "cloud", "status"])
            .output()
            .expect("runs");
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).expect("JSON"))
    }

    pub fn state(&self) -> Option<String> {
        self.status()
            .and_then(|s| s["state"].as_str().map(str::to_owned))
    }

    /// What the tunnel service wrote to stderr so far (for failure messages).
    pub fn tunnel_log(&self) -> String {
        std::fs::read_to_string(self.home().join("tunnel.log")).unwrap_or_default()
    }
}

/// A UDP relay between a device and a cloud with faults on the way back to the device: each
/// datagram from the cloud waits [`UdpRelay::set_delay`] before it is passed on, and none is
/// passed on (not even those already waiting) while [`UdpRelay::cut`] holds. QUIC routes by
/// connection id, so one relay serves a device's connections one after the other; datagrams
/// from the cloud go to the device address that sent last.
#[derive(Debug)]
pub struct UdpRelay {
    /// Where devices send (put it in the setup token in place of the cloud's address).
    pub addr: std::net::SocketAddr,
    delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpRelay {
    pub fn start(cloud: std::net::SocketAddr) -> UdpRelay {
        use std::net::UdpSocket;
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::{Arc, Mutex, mpsc};
        use std::time::{Duration, Instant};
        const POLL: Duration = Duration::from_millis(20);

        let front = UdpSocket::bind("127.0.0.1:0").expect("a relay socket");
        let back = UdpSocket::bind("127.0.0.1:0").expect("a relay socket");
        for s in [&front, &back] {
            s.set_read_timeout(Some(POLL)).expect("a read timeout");
        }
        let addr = front.local_addr().expect("an address");
        let delay_ms = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let device: Arc<Mutex<Option<std::net::SocketAddr>>> = Arc::default();
        let (queue, due) = mpsc::channel::<(Instant, Vec<u8>)>();
        let mut threads = Vec::new();

        let (front_rx, back_tx, device_rx, stop_rx) = (
            front.try_clone().expect("clone"),
            back.try_clone().expect("clone"),
            Arc::clone(&device),
            Arc::clone(&stop),
        );
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop_rx.load(Ordering::Relaxed) {
                if let Ok((n, from)) = front_rx.recv_from(&mut buf) {
                    *device_rx.lock().unwrap() = Some(from);
                    let _ = back_tx.send_to(&buf[..n], cloud);
                }
            }
        }));
        let (delay_rx, stop_rx) = (Arc::clone(&delay_ms), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !stop_rx.load(Ordering::Relaxed) {
                if let Ok((n, _)) = back.recv_from(&mut buf) {
                    let delay = Duration::from_millis(delay_rx.load(Ordering::Relaxed));
                    let _ = queue.send((Instant::now() + delay, buf[..n].to_vec()));
                }
            }
        }));
        let (cut_rx, stop_rx) = (Arc::clone(&cut), Arc::clone(&stop));
        threads.push(std::thread::spawn(move || {
            while !stop_rx.load(Ordering::Relaxed) {
                let Ok((at, datagram)) = due.recv_timeout(POLL) else {
                    continue;
                };
                std::thread::sleep(at.saturating_duration_since(Instant::now()));
                let to = *device.lock().unwrap();
                if let Some(to) = to
                    && !cut_rx.load(Ordering::Relaxed)
                {
                    let _ = front.send_to(&datagram, to);
                }
            }
        }));
        UdpRelay {
            addr,
            delay_ms,
            cut,
            stop,
            threads,
        }
    }

    /// How long each datagram from the cloud waits from now on.
    pub fn set_delay(&self, delay: std::time::Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms
            .store(ms, std::sync::atomic::Ordering::Relaxed);
    }

    /// While `true`, nothing from the cloud reaches the device.
    pub fn cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::Relaxed);
    }

    /// `token` with its server replaced by this relay.
    pub fn token_via(&self, token: &str) -> String {
        token_naming(token, self.addr)
    }
}

/// A setup token with its server replaced by `server` (a relay, another node).
pub fn token_naming(token: &str, server: std::net::SocketAddr) -> String {
    // SYN1:<server>:<ca>:<token id>:<secret>, split from the right.
    let mut parts: Vec<&str> = token.rsplitn(4, ':').collect();
    let server = server.to_string();
    parts[3] = &server;
    parts.reverse();
    format!("SYN1:{}", parts.join(":"))
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Vitals with nothing in them, for heartbeats a test sends by hand.
pub fn empty_vitals() -> synesis_proto::vitals::Vitals {
    use synesis_proto::vitals::{CpuVitals, MemoryVitals, Vitals};
    Vitals {
        sampled_at: synesis_proto::UnixMillis(0),
        cpu: CpuVitals {
            usage_percent: 0.0,
            cores: 1,
            per_core_percent: vec![],
            load_average: None,
        },
        memory: MemoryVitals {
            total_bytes: 1,
            used_bytes: 0,
            swap_total_bytes: 0,
            swap_used_bytes: 0,
        },
        disk: None,
        temperatures: vec![],
        gpus: vec![],
        gpu_unavailable_reason: None,
    }
}

/// What came back on one escalation stream.
#[derive(Debug, Default)]
pub struct Reply {
    pub text: String,
    pub chunks: Vec<u32>,
    pub end: Option<synesis_proto::Message>,
}

/// Sends `first` on a new stream; reads to the end, sending a cancel after `cancel_after`
/// chunks.
pub async fn exchange(
    conn: &quinn::Connection,
    first: synesis_proto::Message,
    cancel_after: Option<usize>,
) -> Reply {
    exchange_telling(conn, first, cancel_after, None).await
}

/// [`exchange`], telling `started` when the first chunk came (the request is running).
pub async fn exchange_telling(
    conn: &quinn::Connection,
    first: synesis_proto::Message,
    cancel_after: Option<usize>,
    mut started: Option<tokio::sync::oneshot::Sender<()>>,
) -> Reply {
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    synesis_wire::send(&mut tx, &first, synesis_proto::FrameLimits::default())
        .await
        .unwrap();
    let mut rx = synesis_wire::FramedRecv::new(rx, synesis_proto::FrameLimits::default());
    let mut reply = Reply::default();
    while let Some(m) = rx.next().await.unwrap() {
        match m {
            synesis_proto::Message::EscalationChunk(c) => {
                reply.text.push_str(&c.text);
                reply.chunks.push(c.seq);
                if let Some(started) = started.take() {
                    let _ = started.send(());
                }
                if cancel_after == Some(reply.chunks.len()) {
                    let cancel = synesis_proto::message::EscalationCancel {
                        request_id: c.request_id,
                    };
                    synesis_wire::send(
                        &mut tx,
                        &cancel.into(),
                        synesis_proto::FrameLimits::default(),
                    )
                    .await
                    .unwrap();
                }
            }
            end => {
                reply.end = Some(end);
                break;
            }
        }
    }
    reply
}

pub fn done(reply: &Reply) -> &synesis_proto::message::EscalationDone {
    match &reply.end {
        Some(synesis_proto::Message::EscalationDone(d)) => d,
        other => panic!("no EscalationDone: {other:?}"),
    }
}

/// One mutual-TLS connection of `device` (enrolled) to its cloud, for a client speaking the
/// protocol itself: the endpoint (keep it alive) and the connection.
pub async fn connect(device: &Device) -> (quinn::Endpoint, quinn::Connection) {
    connect_to(device, None).await
}

/// [`connect`] to `addr` (another node of the cloud) instead of the address the device enrolled
/// with (`None`).
pub async fn connect_to(
    device: &Device,
    addr: Option<std::net::SocketAddr>,
) -> (quinn::Endpoint, quinn::Connection) {
    use std::time::Duration;
    let identity = synesis_tunnel::Identity::load(&device.home().join("data"))
        .expect("the device's identity reads")
        .expect("the device is enrolled");
    let config = synesis_tunnel::tls::device_client_config(&identity, Duration::from_secs(5))
        .expect("a client config");
    let addr = match addr {
        Some(addr) => addr,
        None => synesis_tunnel::connect::resolve(&identity.info.server)
            .await
            .expect("the cloud's address resolves"),
    };
    let endpoint = synesis_tunnel::connect::client_endpoint(addr).expect("a client endpoint");
    let conn = synesis_tunnel::connect::dial(&endpoint, config, addr, Duration::from_secs(10))
        .await
        .expect("the cloud answers");
    (endpoint, conn)
}

/// A greedy escalation of `prompt` to `model`, at most `max_tokens` out.
pub fn escalation_request(
    id: synesis_proto::RequestId,
    model: &str,
    prompt: &str,
    max_tokens: u32,
) -> synesis_proto::message::EscalationRequest {
    use synesis_proto::message::{ChatRole, ChatTurn, EscalationRequest, Preferences};
    EscalationRequest {
        request_id: id,
        model: model.into(),
        adapter: None,
        context: vec![ChatTurn {
            role: ChatRole::User,
            content: prompt.into(),
        }],
        preferences: Preferences {
            max_tokens,
            temperature: 0.0,
            top_p: None,
            seed: None,
            stop: vec![],
            max_cost: None,
        },
        byok_key: None,
        shape: Default::default(),
    }
}

/// A cloud answering with the tiny model as `tiny` (llama.cpp in process), the account `acme`
/// (Managed, $10) and its owner's device, which has the same model registered as `tiny`.
#[derive(Debug)]
pub struct TinyCloud {
    pub cloud: Cloud,
    pub owner: Device,
    /// Holds `tiny.gguf` and `cloud.toml`.
    pub files: tempfile::TempDir,
}

impl TinyCloud {
    /// Pauses every generation of `tiny` after its next piece (`pause_while` in `cloud.toml`),
    /// or lets them go on: an answer held in the middle for as long as a test needs, on any
    /// machine.
    pub fn pause(&self, paused: bool) {
        let file = self.files.path().join("pause");
        if paused {
            std::fs::write(&file, b"").expect("the pause file is written");
        } else {
            std::fs::remove_file(&file).expect("the pause file is removed");
        }
    }
}

/// [`TinyCloud`], with `extra` at the top of its `cloud.toml`.
pub fn tiny_cloud(extra: &str) -> TinyCloud {
    tiny_cloud_with(synesis_infer::tiny::TinySpec::TINY, extra)
}

/// [`TinyCloud`] answering with a model of another shape (`TinySpec::BENCH` with a long context
/// answers slowly enough to stop, kill or cut in the middle).
pub fn tiny_cloud_with(spec: synesis_infer::tiny::TinySpec, extra: &str) -> TinyCloud {
    let owner = Device::new();
    let files = tempfile::tempdir().expect("a scratch directory");
    let model = files.path().join("tiny.gguf");
    synesis_infer::tiny::write_model(&model, spec).expect("the tiny model is written");
    run_ok(
        owner
            .synesis()
            .args(["model", "add"])
            .arg(&model)
            .args(["--name", "tiny"]),
    );
    let toml = files.path().join("cloud.toml");
    std::fs::write(
        &toml,
        format!(
            "{extra}\n[prices.tiny]\ninput_usd_per_mtok = \"1.00\"\noutput_usd_per_mtok = \"2.00\"\n\
             [models.tiny]\nprovider = \"llama\"\npath = {:?}\nthreads = 1\npause_while = \"pause\"\n",
            model.display().to_string()
        ),
    )
    .expect("cloud.toml is written");
    let cloud = Cloud::start_with(&["--config", toml.to_str().expect("a UTF-8 path")]);
    run_ok(
        cloud
            .admin()
            .args(["account", "create", "acme", "--tier", "managed"]),
    );
    owner.login(&cloud.token("acme", "1h"));
    cloud.top_up(&owner, "10.00");
    TinyCloud {
        cloud,
        owner,
        files,
    }
}

/// `synesis serve` running, stopped with SIGTERM when dropped.
#[derive(Debug)]
pub struct Serving {
    pub child: std::process::Child,
    pub addr: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        signal(self.child.id(), "TERM");
        let _ = self.child.wait();
    }
}

/// `synesis serve ARGS…` on `device`, once it says where it listens; what it said on stderr
/// when it did not start.
pub fn serve(device: &Device, args: &[&str], env: &[(&str, &str)]) -> Result<Serving, String> {
    use std::io::{BufRead, Read};
    use std::process::Stdio;
    let mut child = device
        .synesis()
        .args(["serve", "--heartbeat-interval", "1s"])
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    match line.trim().strip_prefix("listening on http://") {
        Some(addr) => Ok(Serving {
            addr: addr.to_owned(),
            child,
        }),
        None => {
            let mut stderr = String::new();
            child
                .stderr
                .take()
                .unwrap()
                .read_to_string(&mut stderr)
                .unwrap();
            let _ = child.wait();
            Err(stderr)
        }
    }
}
