//! The tunnel end to end: the real `synesis-cloud` and `synesis` binaries on loopback, each
//! device in its own SYNESIS_HOME, each cloud in its own data directory on an OS-chosen port.
//! Heartbeats run at 1 s here so that "three missed heartbeats" takes seconds, not minutes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::PathBuf;
use std::time::{Duration, Instant};

use synesis_e2e::{Cloud, Device, Running, signal, wait_for};

const HEARTBEAT: &str = "1s";
const INTERVAL: Duration = Duration::from_secs(1);
/// How long a test waits for something that must happen; it returns as soon as it has. Bounds
/// the design promises are checked against the times the binaries themselves record.
const PATIENCE: Duration = Duration::from_secs(20);

fn connected(device: &Device) -> bool {
    device.state().as_deref() == Some("connected")
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap()
}

/// Milliseconds since the Unix epoch of a time the binaries wrote (RFC 3339).
fn millis(time: &serde_json::Value) -> i64 {
    let text = time
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {time}"));
    synesis_proto::UnixMillis::parse_rfc3339(text)
        .unwrap_or_else(|e| panic!("not a time: {text:?} ({e})"))
        .0
}

/// `synesis tunnel events --json`, followed from its start: each event the service stamped
/// with the time it happened.
struct Feed {
    _process: Running,
    path: PathBuf,
}

impl Feed {
    /// Subscribes and waits for the first event (where things stand now).
    fn follow(device: &Device, name: &str) -> Feed {
        let path = device.home().join(name);
        let child = device
            .synesis()
            .args(["--json", "tunnel", "events"])
            .stdout(std::fs::File::create(&path).unwrap())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let feed = Feed {
            _process: Running { child },
            path,
        };
        assert!(
            wait_for(PATIENCE, || !feed.events().is_empty()),
            "the events feed never started:\n{}",
            device.tunnel_log()
        );
        feed
    }

    /// The events so far (whole lines only).
    fn events(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.path).unwrap_or_default();
        let whole = text.rfind('\n').map_or("", |end| &text[..end]);
        whole
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// The first state change to `state` after the feed started, waiting for it.
    fn state_change_to(&self, state: &str) -> serde_json::Value {
        let mut found = None;
        wait_for(PATIENCE, || {
            found = self
                .events()
                .into_iter()
                .skip(1)
                .find(|e| e["event"] == "state" && e["state"] == state);
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no change to {state:?} in {:?}", self.events()))
    }
}

/// A cloud, an enrolled device and its running tunnel, connected.
fn connected_pair() -> (Cloud, Device, String, synesis_e2e::Running) {
    let cloud = Cloud::start();
    let device = Device::new();
    let id = device.login(&cloud.account_and_token("acme"));
    let tunnel = device.tunnel(HEARTBEAT);
    assert!(
        wait_for(PATIENCE, || connected(&device)),
        "never connected:\n{}",
        device.tunnel_log()
    );
    (cloud, device, id, tunnel)
}

#[test]
fn login_then_the_cloud_lists_the_device_online_with_vitals() {
    let (cloud, device, id, _tunnel) = connected_pair();
    assert!(wait_for(PATIENCE, || {
        cloud.devices().iter().any(|d| {
            d["device_id"] == id.as_str() && d["status"] == "online" && d["vitals"].is_object()
        })
    }));
    let listed = cloud
        .devices()
        .into_iter()
        .find(|d| d["device_id"] == id.as_str())
        .unwrap();
    assert_eq!(listed["account"], "acme");
    assert!(
        listed["vitals"]["cpu"]["cores"].as_u64().unwrap() >= 1,
        "{listed}"
    );
    assert!(listed["rtt_ms"].is_number());
    assert!(listed["last_seen_at"].is_string());

    let status = device.status().unwrap();
    for key in [
        "state",
        "device_id",
        "account",
        "server",
        "rtt_ms",
        "last_heartbeat_ack_at",
        "connected_since",
        "reconnects",
        "failure",
    ] {
        assert!(status.get(key).is_some(), "status lacks {key}: {status}");
    }
    assert_eq!(status["device_id"], id.as_str());
    assert_eq!(status["server"], cloud.addr.to_string());

    // Identity files are the owner's only.
    #[cfg(unix)]
    for entry in std::fs::read_dir(device.home().join("data/identity")).unwrap() {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            entry.unwrap().metadata().unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    // Ping goes through the tunnel.
    let ping = synesis_e2e::json_of(device.synesis().args([
        "--json",
        "cloud",
        "ping",
        "--count",
        "3",
        "--interval",
        "10ms",
    ]));
    assert_eq!(ping["count"], 3);
    assert!(ping["min_ms"].as_f64().unwrap() > 0.0);
}

#[test]
fn after_kill_9_and_a_restart_on_the_same_port_the_device_reconnects_by_itself() {
    let (mut cloud, device, id, _tunnel) = connected_pair();
    signal(cloud.process.pid(), "KILL");
    assert!(
        wait_for(PATIENCE, || !connected(&device)),
        "still connected to a dead cloud"
    );
    let restarted = Instant::now();
    cloud.restart();
    assert!(
        wait_for(Duration::from_secs(30), || connected(&device)),
        "no reconnect after the restart:\n{}",
        device.tunnel_log()
    );
    eprintln!(
        "measured: cloud restart → connected in {:?}",
        restarted.elapsed()
    );
    assert!(device.status().unwrap()["reconnects"].as_u64().unwrap() >= 1);
    assert!(wait_for(PATIENCE, || cloud.device_status(&id).as_deref()
        == Some("online")));
}

#[test]
fn a_half_open_cloud_is_left_within_three_heartbeats_and_rejoined_after_sigcont() {
    let (cloud, device, _id, _tunnel) = connected_pair();
    let feed = Feed::follow(&device, "events.jsonl");
    signal(cloud.process.pid(), "STOP");
    let stopped = Instant::now();
    assert!(
        wait_for(PATIENCE, || !connected(&device)),
        "still 'connected' {:?} after the cloud stopped answering",
        stopped.elapsed()
    );
    eprintln!(
        "measured: left 'connected' {:?} after SIGSTOP (as the status polls saw it)",
        stopped.elapsed()
    );
    // The promise, on the tunnel's own clock: no ack came after the cloud stopped, so the
    // tunnel gave the connection up at most three intervals after the last ack it had (plus a
    // second for a loaded machine), and for the missing acks.
    let left = feed.state_change_to("reconnecting");
    let status = device.status().unwrap();
    let silent_for = millis(&left["at"]) - millis(&status["last_heartbeat_ack_at"]);
    eprintln!("recorded: left 'connected' {silent_for} ms after the last ack: {left}");
    let bound = INTERVAL * 3 + Duration::from_secs(1);
    assert!(
        silent_for <= ms(bound),
        "left 'connected' {silent_for} ms after the last ack (at most {bound:?}): {left} {status}"
    );
    assert!(
        left["reason"]
            .as_str()
            .is_some_and(|r| r.contains("no heartbeat acknowledged")),
        "left for another reason than the missing acks: {left}"
    );
    signal(cloud.process.pid(), "CONT");
    assert!(
        wait_for(Duration::from_secs(30), || connected(&device)),
        "no reconnect after SIGCONT:\n{}",
        device.tunnel_log()
    );
}

/// What the cloud promises about a device that stops answering: it is listed online only while
/// its last heartbeat is at most three of its intervals old, so within three intervals (plus a
/// margin for a loaded machine) it is stale or offline, and never online again while stopped;
/// QUIC's idle timeout (the device's, four intervals) then ends the connection and the cloud
/// marks it offline. Whether `stale` shows in between is a race this test does not run: the
/// window is one interval, and `admin devices` may not look during it (the next test pins it).
/// Each listing is judged by the heartbeat time the cloud recorded, not by when the test saw it.
#[test]
fn a_stopped_device_leaves_online_and_is_marked_offline_by_the_cloud() {
    let (cloud, _device, id, tunnel) = connected_pair();
    assert!(wait_for(PATIENCE, || cloud.device_status(&id).as_deref()
        == Some("online")));
    signal(tunnel.pid(), "STOP");
    let stopped = Instant::now();
    let stopped_at = synesis_tunnel::clock::unix_now().0;
    // Each status the cloud listed, in order, without repeats; when it first was not online.
    let mut seen: Vec<String> = Vec::new();
    let mut left_online = None;
    // The last heartbeat the cloud recorded, and the oldest it was (at the start of a listing)
    // in a listing that said online.
    let mut last_seen_at = None;
    let mut oldest_online = None;
    let offline = wait_for(Duration::from_secs(30), || {
        let before = synesis_tunnel::clock::unix_now().0;
        let listed = cloud
            .devices()
            .into_iter()
            .find(|d| d["device_id"] == id.as_str())
            .unwrap();
        let status = listed["status"].as_str().unwrap_or_default().to_owned();
        let seen_at = millis(&listed["last_seen_at"]);
        last_seen_at = Some(seen_at);
        if status == "online" {
            oldest_online = oldest_online.max(Some(before - seen_at));
        } else if left_online.is_none() {
            left_online = Some(stopped.elapsed());
        }
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        status == "offline"
    });
    eprintln!(
        "measured: after SIGSTOP the cloud listed {seen:?}; not online after {left_online:?}; \
         listed online with its last heartbeat at most {oldest_online:?} ms old"
    );
    assert!(offline, "never offline: {seen:?}");
    // The device sent nothing after the stop (a heartbeat on its way then may land later).
    let last_seen_at = last_seen_at.unwrap();
    assert!(
        last_seen_at <= stopped_at + ms(INTERVAL * 5),
        "a heartbeat recorded {} ms after the device stopped",
        last_seen_at - stopped_at
    );
    // Online only while the heartbeat the cloud recorded was at most three intervals old when
    // the listing began (the cloud judged it later still).
    if let Some(age) = oldest_online {
        assert!(
            age <= ms(INTERVAL * 3),
            "listed online {age} ms after the last heartbeat it recorded: {seen:?}"
        );
    }
    let first_not_online = seen.iter().position(|s| s != "online").unwrap();
    assert!(
        seen[first_not_online..]
            .iter()
            .all(|s| s == "stale" || s == "offline"),
        "online again while stopped: {seen:?}"
    );
    signal(tunnel.pid(), "CONT");
    assert!(wait_for(PATIENCE, || cloud.device_status(&id).as_deref()
        == Some("online")));
}

/// `stale` is what the database says when nothing marked the device offline: here the cloud
/// is killed while the device is connected, so its row stays connected and only ages. Listed
/// stale after three of the intervals the device announced (1 s: stale by 3 s, while the 5 s
/// default would take 15), and stale it stays.
#[test]
fn a_device_left_connected_by_a_killed_cloud_is_listed_stale() {
    let (cloud, _device, id, _tunnel) = connected_pair();
    assert!(wait_for(PATIENCE, || cloud.device_status(&id).as_deref()
        == Some("online")));
    signal(cloud.process.pid(), "KILL");
    let killed = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    // How old the recorded heartbeat was, at most, when the cloud first listed it stale.
    let mut stale_at_age = None;
    let stale = wait_for(PATIENCE, || {
        let listed = cloud
            .devices()
            .into_iter()
            .find(|d| d["device_id"] == id.as_str())
            .unwrap();
        let after = synesis_tunnel::clock::unix_now().0;
        let status = listed["status"].as_str().unwrap_or_default().to_owned();
        if seen.last() != Some(&status) {
            seen.push(status.clone());
        }
        if status == "stale" {
            stale_at_age = Some(after - millis(&listed["last_seen_at"]));
        }
        status == "stale"
    });
    assert!(
        stale,
        "not stale {:?} after the cloud died: {seen:?}",
        killed.elapsed()
    );
    assert!(
        seen.iter().all(|s| s == "online" || s == "stale"),
        "nothing marks it offline: {seen:?}"
    );
    // Judged by the interval the device announced: by the default's (5 s) it would have been
    // online until its last heartbeat was 15 s old.
    let age = stale_at_age.unwrap();
    eprintln!("recorded: listed stale with its last heartbeat at most {age} ms old");
    assert!(
        age < ms(INTERVAL * 15),
        "first listed stale {age} ms after its last heartbeat"
    );
    for _ in 0..3 {
        std::thread::sleep(INTERVAL / 2);
        assert_eq!(cloud.device_status(&id).as_deref(), Some("stale"));
    }
}

fn login_error(device: &Device, token: &str) -> String {
    let out = device
        .synesis()
        .args(["cloud", "login", token])
        .output()
        .unwrap();
    assert!(!out.status.success(), "login with a bad token succeeded");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn token_reuse_expiry_and_a_wrong_ca_pin_are_clear_errors() {
    let cloud = Cloud::start();
    let token = cloud.account_and_token("acme");
    Device::new().login(&token);

    let reused = login_error(&Device::new(), &token);
    assert!(reused.contains("already used"), "{reused}");

    let short = cloud.token("acme", "1ms");
    std::thread::sleep(Duration::from_millis(20));
    let expired = login_error(&Device::new(), &short);
    assert!(expired.contains("expired"), "{expired}");

    // The same token with another CA fingerprint: the device must refuse the cloud.
    let good = cloud.token("acme", "1h");
    let mut parts: Vec<&str> = good.rsplitn(4, ':').collect();
    let wrong_pin = "00".repeat(32);
    parts[2] = &wrong_pin;
    parts.reverse();
    let tampered = parts.join(":");
    // Refused at the first attempt: the client logs each retry (at info), and there is none.
    let out = Device::new()
        .synesis()
        .env("RUST_LOG", "info")
        .args(["cloud", "login", &tampered])
        .output()
        .unwrap();
    let pinned = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "login with a wrong pin succeeded");
    assert!(pinned.contains("fingerprint"), "{pinned}");
    assert!(
        !pinned.contains("retrying"),
        "a wrong pin must not be retried:\n{pinned}"
    );

    let garbage = login_error(&Device::new(), "not-a-token");
    assert!(garbage.contains("setup token"), "{garbage}");
}

/// The revocation time the cloud recorded for `id` (milliseconds since the Unix epoch).
fn revoked_at(cloud: &Cloud, id: &str) -> i64 {
    use synesis_cloud::storage::Devices;
    let db = synesis_cloud::storage::Db::open(&cloud.dir().join("cloud.db")).unwrap();
    let devices = db.devices().unwrap();
    let row = devices.iter().find(|d| d.id.to_string() == id).unwrap();
    row.revoked_at.expect("revoked").0
}

#[test]
fn a_revoked_device_is_cut_off_within_5_s_and_never_retries() {
    let (cloud, device, id, _tunnel) = connected_pair();
    let feed = Feed::follow(&device, "events.jsonl");
    let revoked = Instant::now();
    synesis_e2e::run_ok(cloud.admin().args(["device", "revoke", &id]));
    assert!(
        wait_for(PATIENCE, || device.state().as_deref() == Some("failed")),
        "state {:?} {:?} after revocation",
        device.state(),
        revoked.elapsed()
    );
    // The promise, between the times the cloud and the tunnel recorded: revoked, then cut off
    // (and failed for good) within 5 s.
    let failed = feed.state_change_to("failed");
    let cut_off_after = millis(&failed["at"]) - revoked_at(&cloud, &id);
    eprintln!(
        "recorded: failed {cut_off_after} ms after the revocation ({:?} as the test saw it)",
        revoked.elapsed()
    );
    assert!(
        cut_off_after <= 5_000,
        "failed {cut_off_after} ms after the revocation: {failed}"
    );
    let status = device.status().unwrap();
    assert!(
        status["failure"].as_str().unwrap().contains("revoked"),
        "{status}"
    );
    let reconnects = status["reconnects"].clone();
    std::thread::sleep(INTERVAL * 3);
    let later = device.status().unwrap();
    assert_eq!(
        later["reconnects"], reconnects,
        "a revoked device must not retry"
    );
    assert_eq!(later["state"], "failed");
    assert_eq!(cloud.device_status(&id).as_deref(), Some("revoked"));

    // Starting the tunnel again fails at once too: at its first attempt, with no retry.
    drop(_tunnel);
    let again = device.tunnel(HEARTBEAT);
    assert!(
        wait_for(PATIENCE, || device.state().as_deref() == Some("failed")),
        "state {:?}:\n{}",
        device.state(),
        device.tunnel_log()
    );
    let status = device.status().unwrap();
    assert_eq!(status["reconnects"], 0, "{status}");
    assert!(
        status["failure"].as_str().unwrap().contains("revoked"),
        "{status}"
    );
    drop(again);
}

#[test]
fn status_and_ping_without_a_service_exit_3_and_say_how_to_start_one() {
    let device = Device::new();
    for args in [&["cloud", "status"][..], &["cloud", "ping"][..]] {
        let out = device.synesis().args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(3), "{args:?}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("synesis tunnel run"));
    }
}

#[test]
fn logout_revokes_on_the_cloud_and_deletes_the_identity() {
    let cloud = Cloud::start();
    let device = Device::new();
    let id = device.login(&cloud.account_and_token("acme"));
    synesis_e2e::run_ok(device.synesis().args(["cloud", "logout"]));
    assert_eq!(cloud.device_status(&id).as_deref(), Some("revoked"));
    assert!(!device.home().join("data/identity/identity.json").exists());
    let out = device.synesis().args(["tunnel", "run"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not enrolled"));
}

#[test]
fn logout_of_a_device_the_cloud_already_revoked_deletes_it_without_force() {
    let cloud = Cloud::start();
    let device = Device::new();
    let id = device.login(&cloud.account_and_token("acme"));
    synesis_e2e::run_ok(cloud.admin().args(["device", "revoke", &id]));
    // The cloud closes the connection with DEVICE_REVOKED at the handshake: revoked already.
    let v = synesis_e2e::json_of(device.synesis().args(["--json", "cloud", "logout"]));
    assert_eq!(v["revoked"], true, "{v}");
    assert!(!device.home().join("data/identity/identity.json").exists());
}

#[test]
fn sigterm_drains_connected_devices_and_exits_0() {
    let (mut cloud, device, _id, _tunnel) = connected_pair();
    signal(cloud.process.pid(), "TERM");
    assert_eq!(
        cloud.process.wait(PATIENCE),
        Some(0),
        "exit code after SIGTERM"
    );
    let log = device.tunnel_log();
    assert!(wait_for(PATIENCE, || device.state().as_deref() != Some("connected")));
    // The device was told to come back later, and says so.
    assert!(
        wait_for(PATIENCE, || device.tunnel_log().contains("draining")
            || device.status().is_some_and(|s| s["failure"]
                .as_str()
                .is_some_and(|f| f.contains("draining")))),
        "{log}"
    );
}

#[test]
fn a_second_tunnel_service_refuses_to_start_and_a_killed_ones_place_is_taken_by_the_next() {
    let (_cloud, device, _id, mut first) = connected_pair();

    // A second service for the same SYNESIS_HOME: refused at once, naming the first.
    let log = device.home().join("second.log");
    let second = device
        .synesis()
        .args(["tunnel", "run", "--heartbeat-interval", HEARTBEAT])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut second = synesis_e2e::Running { child: second };
    let code = second.wait(PATIENCE);
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        code.is_some_and(|c| c != 0),
        "the second service did not exit non-zero within {PATIENCE:?} ({code:?}):\n{said}"
    );
    assert!(
        said.contains("already running") && said.contains(&first.pid().to_string()),
        "the refusal does not name the running service's pid {}:\n{said}",
        first.pid()
    );
    // The first one kept its connection.
    std::thread::sleep(INTERVAL * 2);
    assert!(connected(&device), "{}", device.tunnel_log());
    assert_eq!(
        device.status().unwrap()["reconnects"],
        0,
        "{}",
        device.tunnel_log()
    );

    // kill -9 leaves the socket and the lock file behind; the next start recovers both.
    signal(first.pid(), "KILL");
    assert!(wait_for(PATIENCE, || first
        .child
        .try_wait()
        .unwrap()
        .is_some()));
    assert!(device.state().is_none(), "a dead service still answers");
    let next = device.tunnel(HEARTBEAT);
    assert!(
        wait_for(PATIENCE, || connected(&device)),
        "the next service did not take over:\n{}",
        device.tunnel_log()
    );
    drop(next);
}

#[test]
fn of_two_services_started_at_once_exactly_one_keeps_running() {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    let mut both: Vec<synesis_e2e::Running> = (0..2)
        .map(|i| {
            let child = device
                .synesis()
                .args(["tunnel", "run", "--heartbeat-interval", HEARTBEAT])
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(device.home().join(format!("run{i}.log"))).unwrap())
                .spawn()
                .unwrap();
            synesis_e2e::Running { child }
        })
        .collect();
    let exited = |both: &mut Vec<synesis_e2e::Running>| {
        both.iter_mut()
            .map(|r| r.child.try_wait().unwrap())
            .filter(Option::is_some)
            .count()
    };
    assert!(
        wait_for(PATIENCE, || exited(&mut both) == 1),
        "{} of the two exited",
        exited(&mut both)
    );
    assert!(wait_for(PATIENCE, || connected(&device)));
    // Nobody evicts the survivor's connection.
    std::thread::sleep(INTERVAL * 3);
    assert_eq!(exited(&mut both), 1);
    assert_eq!(device.status().unwrap()["reconnects"], 0);
}
