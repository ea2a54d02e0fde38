//! The tunnel service's lifecycle: `synesis tunnel start` (in the background, returning once it
//! is connected or has said why not), `stop` (it drains first), `status`, `logs`, and
//! `install`/`uninstall` (a systemd unit). The service itself is `synesis tunnel run`
//! ([`super::tunnel::run`]); these commands find it through its lock in the runtime directory
//! (`synesis_tunnel::local::running_service`), never through a pid file of their own.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;
use synesis_tunnel::local::events::{Event, Outcome, What};
use synesis_tunnel::local::{LocalClient, running_service};
use synesis_tunnel::{Identity, TunnelState};

use super::Output;
use crate::cli::{InstallArgs, LogsArgs, TunnelStartArgs, TunnelStopArgs};
use crate::exit::UserError;
use crate::paths::Paths;

/// The service's log is moved aside (to `service.log.1`) when a start finds it larger.
const LOG_ROTATE_BYTES: u64 = 8 * 1024 * 1024;
/// How often the lifecycle commands look again.
const POLL: Duration = Duration::from_millis(100);
/// The systemd unit's name.
const UNIT: &str = "synesis.service";

pub(crate) async fn start(
    out: &Output,
    paths: &Paths,
    args: &TunnelStartArgs,
) -> anyhow::Result<()> {
    let runtime = &paths.runtime.path;
    if let Some(pid) = running_service(runtime)? {
        let view = serde_json::json!({"started": false, "pid": pid, "already_running": true});
        out.report(&view, || {
            format!("the service is already running (pid {pid})\n")
        })?;
        return Ok(());
    }
    if Identity::load(&paths.identity_home()?)?.is_none() {
        bail!("this device is not enrolled; run `synesis cloud login TOKEN` first");
    }
    let log = open_log(&paths.service_log())?;
    let mut command = std::process::Command::new(
        std::env::current_exe().context("cannot tell where this program is")?,
    );
    command
        .args(service_args(paths))
        .args(args.run.to_args())
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // Its own process group: a Ctrl-C in this terminal is not for the service.
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn().context("cannot start the service")?;
    let pid = child.id();

    let client = LocalClient::new(runtime);
    let deadline = Instant::now() + args.wait;
    let mut last = None;
    loop {
        if let Some(exit) = child.try_wait()? {
            bail!(
                "the service stopped at once ({exit}); the end of its log ({}):\n{}",
                paths.service_log().display(),
                tail(&paths.service_log(), 12).unwrap_or_default()
            );
        }
        if let Ok(status) = client.status().await {
            match status.state {
                TunnelState::Connected => {
                    let view = serde_json::json!({
                        "started": true, "pid": pid, "state": status.state,
                        "device_id": status.device_id, "account": status.account,
                        "server": status.server, "log": paths.service_log(),
                    });
                    out.report(&view, || {
                        format!(
                            "started: pid {pid}, connected to {} as device {} of {}\nlog: {} (`synesis tunnel logs -f`)\n",
                            status.server,
                            status.device_id,
                            status.account,
                            paths.service_log().display()
                        )
                    })?;
                    return Ok(());
                }
                TunnelState::Failed => bail!(
                    "the service could not connect and gave up: {}",
                    status.failure.as_deref().unwrap_or("no reason given")
                ),
                _ => last = Some(status),
            }
        }
        if Instant::now() >= deadline {
            let why = last
                .as_ref()
                .and_then(|s| s.failure.clone())
                .unwrap_or_else(|| "no answer from the cloud yet".into());
            let view = serde_json::json!({
                "started": true, "pid": pid, "state": last.as_ref().map(|s| s.state),
                "failure": why, "log": paths.service_log(),
            });
            out.report(&view, || {
                format!(
                    "started: pid {pid}, not connected after {}: {why}; it keeps trying (`synesis tunnel events` shows when it connects)\n",
                    humantime::format_duration(args.wait)
                )
            })?;
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}

/// The flags that make a service started from here use this command's directories and account.
fn service_args(paths: &Paths) -> Vec<std::ffi::OsString> {
    let mut args: Vec<std::ffi::OsString> = vec![
        "--config-dir".into(),
        paths.config.path.clone().into(),
        "--data-dir".into(),
        paths.data.path.clone().into(),
        "--runtime-dir".into(),
        paths.runtime.path.clone().into(),
    ];
    if let Some(account) = &paths.account {
        args.extend(["--account".into(), account.into()]);
    }
    args.extend(["-v".into(), "tunnel".into(), "run".into()]);
    args
}

/// The log, for appending; moved aside first when it grew past [`LOG_ROTATE_BYTES`].
fn open_log(path: &Path) -> anyhow::Result<std::fs::File> {
    if let Some(dir) = path.parent() {
        crate::secure_fs::private_dir(dir)?;
    }
    if std::fs::metadata(path).is_ok_and(|m| m.len() > LOG_ROTATE_BYTES) {
        std::fs::rename(path, path.with_extension("log.1"))
            .with_context(|| format!("cannot rotate {}", path.display()))?;
    }
    // Every request id, model and cost passes through it: its owner's only.
    let mut file = crate::secure_fs::private_file_options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    writeln!(
        file,
        "--- synesis tunnel start, {} ---",
        synesis_tunnel::clock::unix_now()
            .to_rfc3339()
            .unwrap_or_default()
    )?;
    Ok(file)
}

/// The last `lines` lines of a file.
fn tail(path: &Path, lines: usize) -> std::io::Result<String> {
    let text = std::fs::read_to_string(path)?;
    let all: Vec<&str> = text.lines().collect();
    Ok(all[all.len().saturating_sub(lines)..].join("\n"))
}

pub(crate) async fn stop(out: &Output, paths: &Paths, args: &TunnelStopArgs) -> anyhow::Result<()> {
    let runtime = &paths.runtime.path;
    let Some(pid) = running_service(runtime)? else {
        let view = serde_json::json!({"stopped": false, "running": false});
        out.report(&view, || "the service is not running\n".into())?;
        return Ok(());
    };
    let target = rustix::process::Pid::from_raw(i32::try_from(pid).unwrap_or(0))
        .context("the lock names no process")?;
    rustix::process::kill_process(target, rustix::process::Signal::TERM)
        .with_context(|| format!("cannot signal the service (pid {pid})"))?;
    if !out.json() {
        eprintln!("synesis: stopping the service (pid {pid}); streams in flight may finish first");
    }
    let began = Instant::now();
    while running_service(runtime)?.is_some() {
        if began.elapsed() >= args.timeout {
            bail!(
                "the service (pid {pid}) is still running after {}; `kill -9 {pid}` ends it at once (its streams are cut)",
                humantime::format_duration(args.timeout)
            );
        }
        tokio::time::sleep(POLL).await;
    }
    let seconds = began.elapsed().as_secs_f64();
    let view = serde_json::json!({"stopped": true, "pid": pid, "seconds": seconds});
    out.report(&view, || format!("stopped (pid {pid}, {seconds:.1} s)\n"))?;
    Ok(())
}

pub(crate) async fn status(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let Some(pid) = running_service(&paths.runtime.path)? else {
        return Err(UserError::NotRunning.into());
    };
    let tunnel = LocalClient::new(&paths.runtime.path).status().await.ok();
    let view = serde_json::json!({
        "running": true, "pid": pid, "log": paths.service_log(),
        "socket": synesis_tunnel::local::socket_path(&paths.runtime.path), "tunnel": tunnel,
    });
    out.report(&view, || {
        let mut text = format!(
            "running          pid {pid}\nlog              {}\n",
            paths.service_log().display()
        );
        match &tunnel {
            Some(s) => {
                text.push_str(&format!(
                    "state            {}\ndevice           {}\naccount          {}\nserver           {}\nreconnects       {}\n",
                    s.state, s.device_id, s.account, s.server, s.reconnects
                ));
                if let Some(why) = &s.failure {
                    text.push_str(&format!("failure          {why}\n"));
                }
            }
            None => text.push_str("state            starting or stopping (no answer on its socket)\n"),
        }
        text
    })?;
    Ok(())
}

pub(crate) async fn logs(paths: &Paths, args: &LogsArgs) -> anyhow::Result<()> {
    let path = paths.service_log();
    let mut file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !args.follow => {
            bail!(
                "no log yet at {} (the service writes it when `synesis tunnel start` or the systemd unit runs it)",
                path.display()
            )
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => wait_for_file(&path).await?,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(tail(&path, args.lines).unwrap_or_default().as_bytes())?;
    if !args.follow {
        stdout.write_all(b"\n")?;
        return Ok(());
    }
    stdout.write_all(b"\n")?;
    stdout.flush()?;
    let mut at = file.seek(std::io::SeekFrom::End(0))?;
    let mut buf = Vec::new();
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let len = std::fs::metadata(&path).map_or(0, |m| m.len());
        if len < at {
            // Rotated by a new start: the new file from its beginning.
            file = std::fs::File::open(&path)?;
            at = 0;
        }
        buf.clear();
        file.seek(std::io::SeekFrom::Start(at))?;
        let read = (&mut file).take(1 << 20).read_to_end(&mut buf)?;
        if read > 0 {
            at += read as u64;
            if stdout
                .write_all(&buf)
                .and_then(|()| stdout.flush())
                .is_err()
            {
                return Ok(()); // the reader went away (`| head`)
            }
        }
    }
}

pub(crate) async fn events(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let mut feed = LocalClient::new(&paths.runtime.path)
        .events()
        .await
        .map_err(|e| match e {
            synesis_tunnel::local::ClientError::NotRunning => UserError::NotRunning.into(),
            other => anyhow::Error::from(other),
        })?;
    let mut shutdown = crate::signals::Shutdown::listen()?;
    let mut stdout = std::io::stdout();
    loop {
        let next = tokio::select! {
            () = shutdown.requested() => return Ok(()),
            next = feed.next() => next?,
        };
        let Some(event) = next else {
            if !out.json() {
                eprintln!("synesis: the service stopped");
            }
            return Ok(());
        };
        let line = if out.json() {
            serde_json::to_string(&event)?
        } else {
            describe(&event)
        };
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            return Ok(()); // the reader went away
        }
    }
}

/// One event, for people.
fn describe(event: &Event) -> String {
    let at = event
        .at
        .to_rfc3339()
        .unwrap_or_else(|| event.at.0.to_string());
    let what = match &event.what {
        What::State {
            state,
            reconnects,
            reason,
        } => {
            let mut text = format!("{state}");
            if let Some(why) = reason {
                text.push_str(&format!(" ({why})"));
            }
            if *reconnects > 0 {
                text.push_str(&format!(", {reconnects} reconnects so far"));
            }
            text
        }
        What::Prewarm {
            model,
            reason,
            sent,
        } => format!(
            "pre-warm {model}: {reason}{}",
            if *sent {
                ""
            } else {
                " (not sent: not connected)"
            }
        ),
        What::EscalationStarted {
            request_id,
            model,
            resumed,
        } => format!(
            "escalation {request_id} {}{}",
            if *resumed { "resumed" } else { "started" },
            model.as_ref().map_or(String::new(), |m| format!(" ({m})"))
        ),
        What::EscalationFinished {
            request_id,
            outcome,
            cost_micro_usd,
            input_tokens,
            output_tokens,
            error,
        } => {
            let mut text = format!("escalation {request_id} {}", outcome_word(*outcome));
            if let (Some(i), Some(o)) = (input_tokens, output_tokens) {
                text.push_str(&format!(": {i} in + {o} out tokens"));
            }
            if let Some(cost) = cost_micro_usd {
                text.push_str(&format!(", ${}", synesis_proto::MicroUsd(*cost)));
            }
            if let Some(why) = error {
                text.push_str(&format!(": {why}"));
            }
            text
        }
        What::UploadStarted {
            upload_id,
            name,
            size_bytes,
        } => format!("upload {upload_id} of {name} ({size_bytes} bytes) started"),
        What::UploadFinished {
            upload_id,
            outcome,
            error,
        } => format!(
            "upload {upload_id} {}{}",
            outcome_word(*outcome),
            error.as_ref().map_or(String::new(), |e| format!(": {e}"))
        ),
        What::ConfigReloaded { ok: true, .. } => "config reloaded".into(),
        What::ConfigReloaded { error, .. } => format!(
            "config not reloaded: {}",
            error.as_deref().unwrap_or("unreadable")
        ),
        What::Stopping { grace_ms } => {
            format!("stopping; streams in flight may finish within {grace_ms} ms")
        }
        What::Missed { count } => format!("(missed {count} events: this feed fell behind)"),
    };
    format!("{at}  {what}")
}

fn outcome_word(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Done => "done",
        Outcome::Refused => "refused",
        Outcome::Cancelled => "cancelled",
        Outcome::Cut => "cut (it may resume)",
    }
}

async fn wait_for_file(path: &Path) -> anyhow::Result<std::fs::File> {
    loop {
        if let Ok(file) = std::fs::File::open(path) {
            return Ok(file);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Where the unit goes, and whether this machine runs systemd.
struct Target {
    unit_path: PathBuf,
    user: bool,
    systemd: bool,
}

fn target(paths: &Paths, user: bool) -> Target {
    let unit_path = if user {
        let config_home = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
            .unwrap_or_else(|| paths.config.path.clone());
        config_home.join("systemd/user").join(UNIT)
    } else {
        PathBuf::from("/etc/systemd/system").join(UNIT)
    };
    Target {
        unit_path,
        user,
        // What sd_booted(3) checks.
        systemd: Path::new("/run/systemd/system").is_dir(),
    }
}

/// The unit that runs the service: restarted when it fails, reloaded with SIGHUP, stopped with
/// SIGTERM (it drains within `TimeoutStopSec`), its output appended to the service log.
pub(crate) fn unit_text(
    exe: &Path,
    paths: &Paths,
    user: bool,
    run: &crate::cli::TunnelRunArgs,
) -> String {
    let mut exec = vec![unit_word(exe.as_os_str())];
    exec.extend(service_args(paths).iter().map(|a| unit_word(a)));
    exec.extend(run.to_args().iter().map(|a| unit_word(a.as_ref())));
    // systemd expands specifiers (`%`) in paths too.
    let log = paths.service_log().display().to_string().replace('%', "%%");
    // The drain's grace, and time to close the connection after it.
    let stop_secs = run.grace.as_secs() + 30;
    format!(
        "# Written by `synesis tunnel install{}`; `synesis tunnel uninstall` removes it.\n\
         [Unit]\n\
         Description=Synesis: on-device AI and its tunnel to the Synesis cloud\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={}\n\
         ExecReload=/bin/kill -HUP $MAINPID\n\
         Restart=on-failure\n\
         RestartSec=5\n\
         TimeoutStopSec={stop_secs}\n\
         Environment=RUST_LOG=info\n\
         StandardOutput=append:{}\n\
         StandardError=append:{}\n\
         \n\
         [Install]\n\
         WantedBy={}\n",
        if user { " --user" } else { "" },
        exec.join(" "),
        log,
        log,
        if user {
            "default.target"
        } else {
            "multi-user.target"
        },
    )
}

/// One word of a unit's command line: systemd's specifiers (`%`) and variables (`$`) escaped,
/// quoted when it holds spaces or quotes.
fn unit_word(word: &std::ffi::OsStr) -> String {
    let word = word.to_string_lossy().replace('%', "%%").replace('$', "$$");
    if word.is_empty()
        || word
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | ';'))
    {
        format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        word
    }
}

fn systemctl(user: bool, args: &[&str]) -> anyhow::Result<()> {
    let mut command = std::process::Command::new("systemctl");
    if user {
        command.arg("--user");
    }
    let status = command
        .args(args)
        .status()
        .context("cannot run systemctl")?;
    if !status.success() {
        bail!(
            "`systemctl {}{}` failed ({status})",
            if user { "--user " } else { "" },
            args.join(" ")
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct InstallView<'a> {
    unit_path: &'a Path,
    unit: &'a str,
    systemd: bool,
    installed: bool,
}

pub(crate) fn install(out: &Output, paths: &Paths, args: &InstallArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot tell where this program is")?;
    let t = target(paths, args.user);
    let mut run = args.run.clone();
    if run.http.listen.is_some() {
        match &run.http.api_key_file {
            // systemd runs it from `/`: the key file by its whole path.
            Some(file) => {
                run.http.api_key_file =
                    Some(std::fs::canonicalize(file).with_context(|| {
                        format!("cannot find the API key file {}", file.display())
                    })?);
            }
            None if std::env::var_os("SYNESIS_API_KEY").is_some() => bail!(
                "the unit would serve without the key in SYNESIS_API_KEY (a unit does not see this shell's variables); put it in a file and pass --api-key-file"
            ),
            None => {}
        }
    }
    let unit = unit_text(&exe, paths, t.user, &run);
    if !t.systemd {
        let view = InstallView {
            unit_path: &t.unit_path,
            unit: &unit,
            systemd: false,
            installed: false,
        };
        out.report(&view, || {
            format!(
                "this machine does not run systemd (no /run/systemd/system), so nothing was installed.\n\
                 `synesis tunnel start` runs the service in the background here. On a machine with systemd,\n\
                 this unit goes in {}:\n\n{unit}",
                t.unit_path.display()
            )
        })?;
        return Ok(());
    }
    if let Some(dir) = t.unit_path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    if let Some(dir) = paths.service_log().parent() {
        crate::secure_fs::private_dir(dir)?;
    }
    synesis_wire::files::write_public_file(&t.unit_path, unit.as_bytes())
        .with_context(|| format!("cannot write {}", t.unit_path.display()))?;
    systemctl(t.user, &["daemon-reload"])?;
    systemctl(t.user, &["enable", "--now", UNIT])?;
    let view = InstallView {
        unit_path: &t.unit_path,
        unit: &unit,
        systemd: true,
        installed: true,
    };
    let scope = if t.user { " --user" } else { "" };
    out.report(&view, || {
        format!(
            "wrote {}\nran: systemctl{scope} daemon-reload; systemctl{scope} enable --now {UNIT}\n\
             the service starts at {} from now on; `systemctl{scope} status {UNIT}` and `synesis tunnel status` show it\n",
            t.unit_path.display(),
            if t.user { "login" } else { "boot" }
        )
    })?;
    Ok(())
}

pub(crate) fn uninstall(out: &Output, paths: &Paths, args: &InstallArgs) -> anyhow::Result<()> {
    let t = target(paths, args.user);
    if !t.unit_path.exists() {
        let view = serde_json::json!({"unit_path": t.unit_path, "removed": false});
        out.report(&view, || {
            format!("no unit at {}; nothing to remove\n", t.unit_path.display())
        })?;
        return Ok(());
    }
    if t.systemd {
        systemctl(t.user, &["disable", "--now", UNIT])?;
    }
    std::fs::remove_file(&t.unit_path)
        .with_context(|| format!("cannot remove {}", t.unit_path.display()))?;
    if t.systemd {
        systemctl(t.user, &["daemon-reload"])?;
    }
    let view = serde_json::json!({"unit_path": t.unit_path, "removed": true});
    out.report(&view, || {
        format!("stopped, disabled and removed {}\n", t.unit_path.display())
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_words_escape_what_systemd_would_expand() {
        let word = |s: &str| unit_word(std::ffi::OsStr::new(s));
        assert_eq!(word("/usr/bin/synesis"), "/usr/bin/synesis");
        assert_eq!(word("/home/a b/x"), "\"/home/a b/x\"");
        assert_eq!(word("100%"), "100%%");
        assert_eq!(word("$HOME"), "$$HOME");
        assert_eq!(word("it's"), "\"it's\"");
        assert_eq!(word(""), "\"\"");
    }
    #[test]
    fn the_unit_runs_the_service_with_these_directories_and_restarts_it_on_failure() {
        use clap::Parser;
        let cli = crate::cli::Cli::try_parse_from([
            "synesis",
            "tunnel",
            "install",
            "--user",
            "--listen",
            "127.0.0.1:11435",
            "--grace",
            "10s",
        ])
        .unwrap();
        let crate::cli::Command::Tunnel {
            command: crate::cli::TunnelCommand::Install(args),
        } = cli.command
        else {
            panic!("not install");
        };
        let overrides = crate::paths::PathOverrides {
            home: Some("/home/ada/100% synesis".into()),
            ..Default::default()
        };
        let paths = Paths::resolve(&overrides, &crate::paths::XdgEnv::default()).unwrap();
        let unit = unit_text(Path::new("/usr/bin/synesis"), &paths, true, &args.run);
        for line in [
            "ExecStart=/usr/bin/synesis --config-dir \"/home/ada/100%% synesis/config\"",
            " -v tunnel run --heartbeat-interval 5s",
            " --grace 10s --reconnect-wait 10s --listen 127.0.0.1:11435 ",
            "ExecReload=/bin/kill -HUP $MAINPID\n",
            "Restart=on-failure\n",
            "TimeoutStopSec=40\n",
            "StandardError=append:/home/ada/100%% synesis/data/service.log\n",
            "WantedBy=default.target\n",
        ] {
            assert!(unit.contains(line), "{line:?} in:\n{unit}");
        }
    }
}
