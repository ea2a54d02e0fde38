//! The device against another user of the same machine (issue 23): the HTTP API spends an
//! enrolled device's account only for the holder of its key; silent connections cannot keep
//! the API from answering; the device's files are its owner's alone; secrets need not be
//! command-line arguments, which every user can read.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::io::{BufRead, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use synesis_e2e::{Cloud, Device, bin, json_of, run_ok, signal, wait_for};

/// A service with the HTTP API, stopped with SIGTERM when dropped.
struct Serving {
    child: Child,
    addr: String,
}

impl Drop for Serving {
    fn drop(&mut self) {
        signal(self.child.id(), "TERM");
        let _ = self.child.wait();
    }
}

/// Starts `cmd` (a `synesis serve`) and waits for the line that says where it listens.
fn listening(mut cmd: Command) -> Serving {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("not listening: {line:?}"))
        .to_owned();
    Serving { child, addr }
}

fn serve(device: &Device) -> Serving {
    let mut cmd = device.synesis();
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    listening(cmd)
}

/// One HTTP/1.1 request: the status code and the body. `None` when no answer came within the
/// hang guard (the server kept the connection waiting).
fn request(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut text = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\n");
    if let Some(key) = key {
        text.push_str(&format!("Authorization: Bearer {key}\r\n"));
    }
    if !body.is_empty() {
        text.push_str("Content-Type: application/json\r\n");
    }
    text.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    ));
    // A refused connection may be closed before the request is written.
    let _ = stream.write_all(text.as_bytes());
    let mut response = Vec::new();
    match stream.read_to_end(&mut response) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !response.is_empty() => {}
        // Refused before anything was read back: status 0.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            return Some((0, String::new()));
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            return None;
        }
        Err(e) => panic!("{method} {path}: {e}"),
    }
    let response = String::from_utf8_lossy(&response).into_owned();
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

fn get(addr: &str, path: &str, key: Option<&str>) -> (u16, String) {
    request(addr, "GET", path, key, "").expect("an answer")
}

const CHAT: &str =
    r#"{"model":"pocket","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}"#;

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

fn key_of(device: &Device) -> String {
    std::fs::read_to_string(device.home().join("config/api-key"))
        .unwrap()
        .trim()
        .to_owned()
}

// Item 2 ------------------------------------------------------------------------------------

/// Another user of the machine reaches the loopback port as easily as the owner: on an
/// enrolled device only the key, which the owner alone can read, gets an answer.
#[test]
fn an_enrolled_devices_api_answers_only_with_its_key() {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    run_ok(device.synesis().args(["model", "add", "--tiny", "pocket"]));
    let serving = serve(&device);
    let addr = serving.addr.as_str();

    let file = device.home().join("config/api-key");
    assert_eq!(mode(&file), 0o600, "the key is the owner's alone");
    let paths = json_of(device.synesis().args(["--json", "paths"]));
    assert_eq!(paths["api_key_file"], file.display().to_string());
    let key = key_of(&device);

    let (status, body) = get(addr, "/v1/models", None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains(r#""code":"invalid_api_key""#), "{body}");
    let (status, body) = request(addr, "POST", "/v1/chat/completions", None, CHAT).unwrap();
    assert_eq!(status, 401, "no answer, no charge, without the key: {body}");
    let last = if key.ends_with('0') { '1' } else { '0' };
    let wrong = format!("{}{last}", &key[..key.len() - 1]);
    let (status, _) = request(addr, "POST", "/v1/chat/completions", Some(&wrong), CHAT).unwrap();
    assert_eq!(status, 401, "a key one digit off");

    let (status, body) = request(addr, "POST", "/v1/chat/completions", Some(&key), CHAT).unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(get(addr, "/v1/models", Some(&key)).0, 200);
    assert_eq!(get(addr, "/health", None).0, 200, "health spends nothing");

    // The next start keeps the key.
    drop(serving);
    let serving = serve(&device);
    assert_eq!(key_of(&device), key);
    assert_eq!(get(&serving.addr, "/v1/models", Some(&key)).0, 200);
}

/// A device in no account is used without a key on loopback, as before; once it enrolls (the
/// service still running), its API spends, and asks for the key.
#[test]
fn a_device_that_enrolls_while_serving_asks_for_the_key_from_then_on() {
    let cloud = Cloud::start();
    let device = Device::new();
    run_ok(device.synesis().args(["model", "add", "--tiny", "pocket"]));
    let serving = serve(&device);
    let addr = serving.addr.as_str();
    let (status, body) = get(addr, "/v1/models", None);
    assert_eq!(status, 200, "nothing to spend, no key: {body}");

    device.login(&cloud.account_and_token("acme"));
    let (status, body) = get(addr, "/v1/models", None);
    assert_eq!(status, 401, "enrolled now: {body}");
    let (status, _) = request(addr, "POST", "/v1/chat/completions", None, CHAT).unwrap();
    assert_eq!(status, 401);
    assert_eq!(get(addr, "/v1/models", Some(&key_of(&device))).0, 200);
}

// Item 6 ------------------------------------------------------------------------------------

/// The service may open 200 files; 200 connections that send nothing arrive at once. Without
/// bounds they took every file and `/health` waited for ever. Now the service takes what its
/// cap allows, refuses the rest with a 503 at once, cuts the silent ones after the header
/// timeout, and answers `/health` again.
#[test]
fn silent_connections_beyond_the_file_limit_do_not_keep_health_out() {
    const FILES: usize = 200;
    let device = Device::new();
    let mut cmd = Command::new("sh");
    cmd.env_clear()
        .env("SYNESIS_HOME", device.home())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["-c", &format!("ulimit -n {FILES} && exec \"$0\" \"$@\"")])
        .arg(bin("synesis"))
        .args(["serve", "--listen", "127.0.0.1:0"]);
    let serving = listening(cmd);
    let addr = serving.addr.as_str();
    assert_eq!(get(addr, "/health", None).0, 200);

    let silent: Vec<std::net::TcpStream> = (0..FILES)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    // At once: an answer, not a wait (a refusal while the silent ones hold every place, or
    // the health itself if they were already cut).
    let (status, body) = request(addr, "GET", "/health", None, "")
        .expect("/health answered while silent connections are open");
    assert!(
        status == 503 && body.contains("too_many_connections") || status == 200 || status == 0,
        "{status} {body}"
    );
    // Every silent connection ends: refused with a 503 at once, or cut after the header
    // timeout; none is kept for ever.
    let mut refused = 0;
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(90))).unwrap();
        let mut got = Vec::new();
        match s.read_to_end(&mut got) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("a silent connection was kept open: {e}"),
        }
        if String::from_utf8_lossy(&got).starts_with("HTTP/1.1 503") {
            refused += 1;
        }
    }
    assert!(refused > 0, "more connections than files, and none refused");
    assert!(
        wait_for(Duration::from_secs(30), || request(
            addr, "GET", "/health", None, ""
        )
        .is_some_and(|(status, _)| status == 200)),
        "/health answers once the silent connections are gone"
    );
}

// Item 7 ------------------------------------------------------------------------------------

/// `synesis` as a user with the usual umask (022) runs it.
fn synesis_022(device: &Device) -> Command {
    let mut cmd = Command::new("sh");
    cmd.env_clear()
        .env("SYNESIS_HOME", device.home())
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(bin("synesis"));
    cmd
}

/// The data directory holds every request id, model and cost (the ledger, the service log)
/// and the config directory the API key: both 0700, their files 0600; an installation an
/// older version left readable is narrowed on the next start, which says so once.
#[test]
fn the_devices_files_are_its_owners_alone_and_old_open_ones_are_narrowed_once() {
    let cloud = Cloud::start();
    let device = Device::new();
    let token = cloud.account_and_token("acme");
    run_ok(synesis_022(&device).args(["cloud", "login", &token]));
    run_ok(synesis_022(&device).args(["model", "add", "--tiny", "pocket"]));
    run_ok(synesis_022(&device).args([
        "tunnel",
        "start",
        "--listen",
        "127.0.0.1:0",
        "--heartbeat-interval",
        "1s",
    ]));
    run_ok(synesis_022(&device).args(["ask", "--local", "--max-tokens", "2", "hi"]));
    run_ok(synesis_022(&device).args(["tunnel", "stop"]));

    let home = device.home();
    let dirs = ["config", "data", "data/models", "data/identity"];
    let files = [
        "config/config.toml",
        "config/api-key",
        "data/ledger.db",
        "data/service.log",
        "data/models/pocket.gguf",
    ];
    for dir in dirs {
        assert_eq!(mode(&home.join(dir)), 0o700, "{dir}");
    }
    for file in files {
        assert_eq!(mode(&home.join(file)), 0o600, "{file}");
    }

    // As an older version left them.
    for dir in dirs {
        std::fs::set_permissions(home.join(dir), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    for file in files {
        std::fs::set_permissions(home.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let out = run_ok(synesis_022(&device).args(["usage"]));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("private now"), "{said}");
    for dir in dirs {
        assert_eq!(mode(&home.join(dir)), 0o700, "{dir}");
    }
    for file in files {
        assert_eq!(mode(&home.join(file)), 0o600, "{file}");
    }
    let out = run_ok(synesis_022(&device).args(["usage"]));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("private now"), "said once: {said}");
}

// Item 8 ------------------------------------------------------------------------------------

/// Runs `synesis ARGS` with `input` on its standard input; its stdout, after asserting success.
fn with_stdin(device: &Device, args: &[&str], input: &str) -> String {
    let mut child = device
        .synesis()
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A setup token, an invitation code and a voucher each come from standard input with `-`, so
/// they never stand in the process list.
#[test]
fn tokens_codes_and_vouchers_are_read_from_stdin_with_a_dash() {
    let cloud = Cloud::start();
    let owner = Device::new();
    let token = cloud.account_and_token("acme");
    let enrolled = with_stdin(
        &owner,
        &["--json", "cloud", "login", "-"],
        &format!("{token}\n"),
    );
    assert!(enrolled.contains("device_id"), "{enrolled}");

    let voucher = cloud.voucher("5.00");
    let credited = with_stdin(
        &owner,
        &["--json", "cloud", "topup", "--voucher", "-"],
        &format!("{voucher}\n"),
    );
    let credited: serde_json::Value = serde_json::from_str(&credited).unwrap();
    assert_eq!(credited["credited_micro_usd"], 5_000_000);

    let invite = json_of(owner.synesis().args([
        "--json",
        "cloud",
        "invite",
        "carl@example.com",
        "--role",
        "viewer",
    ]));
    let code = invite["code"].as_str().unwrap();
    let carl = Device::new();
    let joined = with_stdin(
        &carl,
        &["--json", "cloud", "accept", "-"],
        &format!("{code}\n"),
    );
    assert!(joined.contains("acme"), "{joined}");

    // Nothing on standard input: a clear refusal, exit 2.
    let out = Device::new()
        .synesis()
        .args(["cloud", "login", "-"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no setup token on standard input"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
