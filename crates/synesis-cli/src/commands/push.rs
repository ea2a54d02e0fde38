//! `synesis cloud push` and `synesis cloud adapters [rm]`: LoRA adapters on the cloud.
//!
//! The upload itself (hashing, chunks, resume, refusals) is `synesis_tunnel::upload`'s; this
//! module finds the file, checks it is an adapter, renders the progress (a bar on a terminal,
//! plain lines otherwise) and the result, and says what to do about a refusal. The account
//! requests (`AdaptersRequest`, `AdapterRemove`) go the way every account request goes
//! ([`account_request`]); [`cloud_adapters`] also serves `synesis lora list`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use serde::Serialize;
use synesis_infer::GgufMetadata;
use synesis_proto::message::{AdapterInfo, AdapterRemove, AdaptersRequest};
use synesis_proto::{ErrorCode, Message, Sha256};
use synesis_tunnel::Identity;
use synesis_tunnel::clock::new_request_id;
use synesis_tunnel::local::LocalClient;
use synesis_tunnel::upload::{
    CHUNK_SIZE_MAX, CHUNK_SIZE_MIN, Progress, PushError, Pushed, Route, Upload, push as push_upload,
};

use super::Output;
use super::cloud::account_request;
use crate::cli::{AdaptersCommand, CloudAdaptersArgs, CloudPushArgs};
use crate::exit::UserError;
use crate::paths::Paths;
use crate::registry::{Config, check_name};
use crate::signals::Shutdown;

const MIB: f64 = 1_048_576.0;

/// `--chunk-size`: a number of bytes, or with a KiB/MiB suffix (K and M too), within what the
/// cloud accepts.
pub(crate) fn parse_chunk_size(text: &str) -> Result<u32, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size: write e.g. 1048576, 512KiB or 2MiB"))?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        other => return Err(format!("{other:?} is not a unit: use KiB or MiB")),
    };
    let bytes = number.saturating_mul(scale);
    match u32::try_from(bytes) {
        Ok(b) if (CHUNK_SIZE_MIN..=CHUNK_SIZE_MAX).contains(&b) => Ok(b),
        _ => Err(format!(
            "the cloud takes chunks of 64KiB to 8MiB ({CHUNK_SIZE_MIN} to {CHUNK_SIZE_MAX} bytes)"
        )),
    }
}

/// MiB with one decimal: `12.5`.
fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // a size, shown rounded
    let m = bytes as f64 / MIB;
    format!("{m:.1}")
}

/// A size for people: bytes, KiB, MiB or GiB.
fn size(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // shown rounded
    let b = bytes as f64;
    if bytes < 1 << 10 {
        format!("{bytes} B")
    } else if bytes < 1 << 20 {
        format!("{:.1} KiB", b / 1024.0)
    } else if bytes < 1 << 30 {
        format!("{:.1} MiB", b / MIB)
    } else {
        format!("{:.2} GiB", b / (MIB * 1024.0))
    }
}

/// The first 12 hex digits of a digest: enough to tell adapters apart by eye.
fn short(sha256: &Sha256) -> String {
    sha256.to_string()[..12].to_owned()
}

/// The file a `PATH|NAME` argument names, and the adapter name it suggests: a registered
/// adapter's name wins (its file, its name) unless the argument looks like a path; a file that
/// is registered under a name keeps that name; any other file is named after its stem.
fn resolve(config: &Config, arg: &str) -> anyhow::Result<(PathBuf, String)> {
    let looks_like_path = arg.contains(std::path::MAIN_SEPARATOR) || arg.ends_with(".gguf");
    if !looks_like_path && let Some(entry) = config.adapters.get(arg) {
        return Ok((entry.path.clone(), arg.to_owned()));
    }
    let path = Path::new(arg);
    if !path.is_file() {
        let registered = config.adapters.keys().cloned().collect::<Vec<_>>();
        bail!(
            "{arg:?} is neither a file nor a registered adapter{}",
            if registered.is_empty() {
                " (`synesis lora add PATH --name NAME` registers one)".to_owned()
            } else {
                format!(" (registered: {})", registered.join(", "))
            }
        );
    }
    let canonical =
        std::fs::canonicalize(path).with_context(|| format!("{arg} cannot be opened"))?;
    if let Some((name, _)) = config.adapters.iter().find(|(_, e)| e.path == canonical) {
        return Ok((canonical, name.clone()));
    }
    let stem = canonical
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok((canonical, stem))
}

/// The file must be a GGUF LoRA adapter: the cloud would refuse anything else after the whole
/// upload.
fn check_adapter(path: &Path) -> anyhow::Result<()> {
    let meta = GgufMetadata::read(path)?;
    if !meta.is_adapter() {
        bail!(
            "{} is not a LoRA adapter: its general.type is {}, not \"adapter\" (a model? `synesis \
             cloud push` uploads adapters only)",
            path.display(),
            meta.str("general.type")
                .map_or_else(|| "missing".to_owned(), |t| format!("{t:?}"))
        );
    }
    if let Some(kind) = meta.str("adapter.type")
        && kind != "lora"
    {
        bail!(
            "{} is a {kind:?} adapter; the cloud serves LoRA adapters only",
            path.display()
        );
    }
    Ok(())
}

pub(crate) async fn push(out: &Output, paths: &Paths, args: &CloudPushArgs) -> anyhow::Result<()> {
    let Some(identity) = Identity::load(&paths.identity_home()?)? else {
        bail!("this device is not enrolled; run `synesis cloud login TOKEN` first");
    };
    let config = Config::load(&paths.config_file())?;
    let (path, suggested) = resolve(&config, &args.adapter)?;
    let name = args.name.clone().unwrap_or(suggested);
    if check_name(&name).is_err() {
        return Err(UserError::Usage(format!(
            "{name:?} is not a usable adapter name (1 to 64 letters, digits, '-', '_' or '.'); \
             choose one with --name"
        ))
        .into());
    }
    let base =
        crate::answer::cloud_model_or_ask(paths, &identity, args.base.as_deref(), &config).await?;
    check_adapter(&path)?;
    let upload = Upload {
        path,
        name,
        base_model: base,
        chunk_size_bytes: args.chunk_size,
    };

    let mut route = Route::choose(LocalClient::new(&paths.runtime.path), identity).await;
    let via = if route.is_service() {
        "service"
    } else {
        "direct"
    };
    let (cancel_tx, cancel) = tokio::sync::watch::channel(false);
    let mut shutdown = Shutdown::listen()?;
    let mut view = ProgressView::new(&upload.name, std::io::stderr().is_terminal());
    let result = {
        let mut on = |p: Progress<'_>| view.show(&p, Instant::now());
        let work = push_upload(&mut route, &upload, cancel, &mut on);
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => r,
            () = shutdown.requested() => {
                let _ = cancel_tx.send(true);
                tokio::select! {
                    r = &mut work => r,
                    () = shutdown.requested() => {
                        return Err(UserError::Interrupted(
                            "interrupted twice; the cloud keeps the chunks it received: run the \
                             same command again to resume".into(),
                        )
                        .into());
                    }
                }
            }
        }
    };
    view.done();
    route.close().await;
    match result {
        Ok(pushed) => report(out, &pushed, via),
        Err(e) => Err(explain(e, &upload)),
    }
}

/// The `--json` object: the fields the issue names first, then what else a script may want.
#[derive(Debug, Serialize)]
struct PushedView<'a> {
    name: &'a str,
    sha256: String,
    bytes: u64,
    resumed_from_bytes: u64,
    seconds: f64,
    throughput_mib_s: f64,
    sent_bytes: u64,
    base_model: &'a str,
    upload_id: synesis_proto::RequestId,
    serving: bool,
    resumes: u32,
    /// How the upload went: `service` (the tunnel service's connection) or `direct`.
    via: &'static str,
}

fn report(out: &Output, pushed: &Pushed, via: &'static str) -> anyhow::Result<()> {
    let view = PushedView {
        name: &pushed.name,
        sha256: pushed.sha256.to_string(),
        bytes: pushed.bytes,
        resumed_from_bytes: pushed.resumed_from_bytes,
        seconds: pushed.seconds,
        throughput_mib_s: pushed.throughput_mib_s(),
        sent_bytes: pushed.sent_bytes,
        base_model: &pushed.base_model,
        upload_id: pushed.upload_id,
        serving: pushed.complete.serving,
        resumes: pushed.resumes,
        via,
    };
    out.report(&view, || summary(pushed))?;
    Ok(())
}

/// The line a person reads when the push is done.
fn summary(p: &Pushed) -> String {
    let what = format!(
        "{} ({} MiB, sha256 {}) for {}",
        p.name,
        mib(p.bytes),
        short(&p.sha256),
        p.base_model
    );
    let serving = if p.complete.serving {
        format!("; `synesis cloud ask --lora {}` uses it", p.name)
    } else {
        "; the cloud does not serve it yet".to_owned()
    };
    if p.resumed_from_bytes >= p.bytes {
        return format!("{what} is already on the cloud: nothing was sent{serving}\n");
    }
    let resumed = if p.resumed_from_bytes > 0 {
        format!(
            "; resumed: {} MiB were already on the cloud",
            mib(p.resumed_from_bytes)
        )
    } else {
        String::new()
    };
    let breaks = if p.resumes > 0 {
        format!(", {} broken connection(s) resumed", p.resumes)
    } else {
        String::new()
    };
    format!(
        "pushed {what}: {} MiB in {:.1} s ({:.1} MiB/s{breaks}){resumed}{serving}\n",
        mib(p.sent_bytes),
        p.seconds,
        p.throughput_mib_s()
    )
}

/// A failed push as the user reads it: what happened (the library's words), and what to do.
fn explain(e: PushError, upload: &Upload) -> anyhow::Error {
    if let PushError::Cancelled {
        held_bytes,
        total_bytes,
    } = e
    {
        let held = match held_bytes {
            Some(held) => format!(
                "; the cloud holds {} of {} MiB",
                mib(held),
                mib(total_bytes)
            ),
            None => " (nothing was sent yet)".to_owned(),
        };
        return UserError::Interrupted(format!(
            "stopped: run the same command again to resume{held}"
        ))
        .into();
    }
    let hint = match e.code() {
        Some(ErrorCode::HASH_MISMATCH) => Some(
            "the cloud discarded what it received (did the file change while it was sent?); run \
             the same command again to start over"
                .to_owned(),
        ),
        Some(ErrorCode::ADAPTER_INVALID) => Some(format!(
            "the cloud checks that the file is a LoRA adapter for the architecture of {}; is \
             --base right?",
            upload.base_model
        )),
        Some(ErrorCode::TOO_LARGE) => Some(
            "the file is above the cloud's adapter limit or the account's storage left; \
             `synesis cloud adapters` lists what the account holds, `synesis cloud adapters rm \
             NAME` frees room"
                .to_owned(),
        ),
        Some(ErrorCode::BUSY) => Some(format!(
            "another upload to {} is in progress (another device's, or one begun with another \
             --chunk-size); wait for it to end, or push under another --name",
            upload.name
        )),
        Some(ErrorCode::LIMIT_EXCEEDED) => Some(
            "the account has as many uploads in progress as the cloud allows; try again when one \
             has ended"
                .to_owned(),
        ),
        Some(ErrorCode::UNKNOWN_MODEL) => Some(format!(
            "the cloud does not serve {} in its own process; name the model the adapter was \
             trained for with --base (`synesis cloud price` lists the cloud's models)",
            upload.base_model
        )),
        Some(ErrorCode::UNAVAILABLE | ErrorCode::INTERNAL) => Some(
            "the cloud keeps the chunks it received: run the same command again later to resume"
                .to_owned(),
        ),
        _ => match &e {
            PushError::BrokeOff {
                held_bytes,
                total_bytes,
                ..
            } => Some(format!(
                "run the same command again to resume; the cloud holds {} of {} MiB",
                mib(*held_bytes),
                mib(*total_bytes)
            )),
            PushError::Cloud(
                synesis_tunnel::RequestError::TimedOut(_)
                | synesis_tunnel::RequestError::Transport(_)
                | synesis_tunnel::RequestError::NotConnected,
            ) => Some("the cloud could not be reached; nothing was sent".to_owned()),
            _ => None,
        },
    };
    let e = anyhow::Error::new(e);
    match hint {
        Some(hint) => e.context(format!("push failed ({hint})")),
        None => e.context("push failed"),
    }
}

/// What the user sees of a push on stderr: a bar on a terminal, plain lines otherwise.
enum ProgressView {
    Bar(ProgressBar),
    Lines(Lines),
}

impl ProgressView {
    fn new(name: &str, terminal: bool) -> ProgressView {
        if !terminal {
            return ProgressView::Lines(Lines::new(name));
        }
        ProgressView::Bar(super::bytes_bar(None))
    }

    fn show(&mut self, p: &Progress<'_>, now: Instant) {
        match self {
            ProgressView::Lines(lines) => {
                if let Some(line) = lines.line(p, now) {
                    eprintln!("{line}");
                }
            }
            ProgressView::Bar(bar) => match *p {
                Progress::Hashing {
                    done_bytes,
                    total_bytes,
                } => {
                    if done_bytes == 0 {
                        bar.set_length(total_bytes);
                        bar.set_message("hashing");
                        bar.reset_eta();
                    }
                    bar.set_position(done_bytes);
                }
                Progress::Sending {
                    held_bytes,
                    total_bytes,
                    resumed,
                } => {
                    if held_bytes > 0 {
                        bar.println(held_line(held_bytes, total_bytes, resumed));
                    }
                    bar.set_length(total_bytes);
                    bar.set_message("uploading");
                    bar.set_position(held_bytes);
                    bar.reset_eta();
                }
                Progress::Sent { done_bytes, .. } => bar.set_position(done_bytes),
                Progress::Interrupted(why) => bar.println(interrupted_line(why)),
                Progress::Verifying => bar.set_message("verifying"),
            },
        }
    }

    fn done(&self) {
        if let ProgressView::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

fn held_line(held_bytes: u64, total_bytes: u64, resumed: bool) -> String {
    if resumed {
        format!(
            "synesis: back on the upload: the cloud holds {} of {} MiB",
            mib(held_bytes),
            mib(total_bytes)
        )
    } else {
        format!(
            "synesis: the cloud holds {} of {} MiB already; sending the rest",
            mib(held_bytes),
            mib(total_bytes)
        )
    }
}

fn interrupted_line(why: &str) -> String {
    format!("synesis: the connection broke ({why}); resuming the upload")
}

/// Progress as plain lines (stderr is not a terminal): one when a phase starts, then one each
/// time another tenth is done or [`Lines::EVERY`] has passed, whichever comes first.
struct Lines {
    name: String,
    /// The phase the last line was about, and when and where (bytes) it began.
    phase: Option<(&'static str, Instant, u64)>,
    last_tenth: u64,
    last_at: Option<Instant>,
}

impl Lines {
    const EVERY: Duration = Duration::from_secs(2);

    fn new(name: &str) -> Lines {
        Lines {
            name: name.to_owned(),
            phase: None,
            last_tenth: 0,
            last_at: None,
        }
    }

    fn begin(&mut self, phase: &'static str, at: Instant, from: u64) {
        self.phase = Some((phase, at, from));
        self.last_tenth = 0;
        self.last_at = Some(at);
    }

    fn line(&mut self, p: &Progress<'_>, now: Instant) -> Option<String> {
        match *p {
            Progress::Hashing {
                done_bytes,
                total_bytes,
            } => {
                if !matches!(self.phase, Some(("hashing", ..))) {
                    self.begin("hashing", now, 0);
                    return Some(format!(
                        "synesis: hashing {} ({} MiB)",
                        self.name,
                        mib(total_bytes)
                    ));
                }
                self.step(done_bytes, total_bytes, now)
            }
            Progress::Sending {
                held_bytes,
                total_bytes,
                resumed,
            } => {
                self.begin("uploading", now, held_bytes);
                Some(if held_bytes > 0 {
                    held_line(held_bytes, total_bytes, resumed)
                } else {
                    format!(
                        "synesis: uploading {} ({} MiB)",
                        self.name,
                        mib(total_bytes)
                    )
                })
            }
            Progress::Sent {
                done_bytes,
                total_bytes,
            } => self.step(done_bytes, total_bytes, now),
            Progress::Interrupted(why) => Some(interrupted_line(why)),
            Progress::Verifying => {
                self.phase = Some(("verifying", now, 0));
                Some("synesis: every chunk is on the cloud; it verifies the adapter".to_owned())
            }
        }
    }

    /// A line when another tenth is done, or when the last line is [`Lines::EVERY`] old.
    fn step(&mut self, done: u64, total: u64, now: Instant) -> Option<String> {
        let (phase, began, from) = self.phase?;
        let tenth = done.saturating_mul(10) / total.max(1);
        let stale = self
            .last_at
            .is_none_or(|at| now.duration_since(at) >= Self::EVERY);
        if tenth <= self.last_tenth && !stale {
            return None;
        }
        self.last_tenth = self.last_tenth.max(tenth);
        self.last_at = Some(now);
        let secs = now.duration_since(began).as_secs_f64();
        #[allow(clippy::cast_precision_loss)] // a rate, shown rounded
        let rate = if secs > 0.0 {
            format!(
                ", {:.1} MiB/s",
                done.saturating_sub(from) as f64 / MIB / secs
            )
        } else {
            String::new()
        };
        let percent = done.saturating_mul(100) / total.max(1);
        Some(format!(
            "synesis: {phase} {}: {percent}% ({} of {} MiB{rate})",
            self.name,
            mib(done),
            mib(total)
        ))
    }
}

// ------------------------------------------------------------------ the account's adapters

/// The account's adapters, by name.
pub(crate) async fn cloud_adapters(paths: &Paths) -> anyhow::Result<Vec<AdapterInfo>> {
    let message = AdaptersRequest {
        request_id: new_request_id(),
    };
    match account_request(paths, message.into()).await? {
        Message::AdaptersReply(r) => Ok(r.adapters),
        other => bail!(
            "the cloud answered {} to a list of adapters",
            other.message_type().name()
        ),
    }
}

pub(crate) async fn adapters(
    out: &Output,
    paths: &Paths,
    args: &CloudAdaptersArgs,
) -> anyhow::Result<()> {
    match &args.command {
        None => list(out, paths).await,
        Some(AdaptersCommand::Rm { name }) => remove(out, paths, name).await,
    }
}

#[derive(Debug, Serialize)]
struct AdapterRow<'a> {
    name: &'a str,
    sha256: String,
    size_bytes: u64,
    base_model: &'a str,
    uploaded_at: synesis_proto::UnixMillis,
    device_id: synesis_proto::DeviceId,
    /// Pushed by this device.
    this_device: bool,
}

async fn list(out: &Output, paths: &Paths) -> anyhow::Result<()> {
    let me = Identity::load(&paths.identity_home()?)?.map(|i| i.info.device_id);
    let adapters = cloud_adapters(paths).await?;
    let rows: Vec<AdapterRow<'_>> = adapters
        .iter()
        .map(|a| AdapterRow {
            name: &a.name,
            sha256: a.sha256.to_string(),
            size_bytes: a.size_bytes,
            base_model: &a.base_model,
            uploaded_at: a.uploaded_at,
            device_id: a.device_id,
            this_device: Some(a.device_id) == me,
        })
        .collect();
    out.report(&rows, || adapters_table(&adapters, me))?;
    Ok(())
}

fn adapters_table(adapters: &[AdapterInfo], me: Option<synesis_proto::DeviceId>) -> String {
    if adapters.is_empty() {
        return "no adapters on the cloud; push one with `synesis cloud push PATH`\n".into();
    }
    let mut text = format!(
        "{:<20} {:<12} {:>10}  {:<16} {:<20} {}\n",
        "NAME", "SHA256", "SIZE", "BASE", "UPLOADED (UTC)", "DEVICE"
    );
    for a in adapters {
        let at = a.uploaded_at.to_rfc3339().map_or_else(
            || a.uploaded_at.0.to_string(),
            |t| t[..19].replace('T', " "),
        );
        // Whole: device ids made close in time share their first digits.
        let device = if Some(a.device_id) == me {
            format!("{} (this device)", a.device_id)
        } else {
            a.device_id.to_string()
        };
        text.push_str(&format!(
            "{:<20} {:<12} {:>10}  {:<16} {:<20} {device}\n",
            a.name,
            short(&a.sha256),
            size(a.size_bytes),
            a.base_model,
            at
        ));
    }
    text
}

async fn remove(out: &Output, paths: &Paths, name: &str) -> anyhow::Result<()> {
    let message = AdapterRemove {
        request_id: new_request_id(),
        name: name.to_owned(),
    };
    let removed = match account_request(paths, message.into()).await {
        Ok(Message::AdapterRemoved(r)) => r,
        Ok(other) => bail!(
            "the cloud answered {} to a removal",
            other.message_type().name()
        ),
        Err(e) => {
            if let Some(synesis_tunnel::RequestError::Refused {
                code: ErrorCode::NOT_FOUND,
                ..
            }) = e.downcast_ref()
            {
                bail!(
                    "the cloud has no adapter named {name:?}; `synesis cloud adapters` lists them"
                );
            }
            return Err(e);
        }
    };
    let view = serde_json::json!({"removed": removed.name, "sha256": removed.sha256.to_string()});
    out.report(&view, || {
        format!(
            "removed {} (sha256 {}) from the cloud; escalations already running finish on it\n",
            removed.name,
            short(&removed.sha256)
        )
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use synesis_proto::RequestId;
    use synesis_proto::message::UploadComplete;

    use super::*;

    #[test]
    fn chunk_sizes_are_bytes_or_binary_units_within_the_clouds_range() {
        assert_eq!(parse_chunk_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_chunk_size("65536"), Ok(65_536));
        assert_eq!(parse_chunk_size("512KiB"), Ok(512 << 10));
        assert_eq!(parse_chunk_size("8M"), Ok(8 << 20));
        assert!(parse_chunk_size("64000").is_err(), "below 64 KiB");
        assert!(parse_chunk_size("9MiB").is_err());
        assert!(parse_chunk_size("1GiB").is_err());
        assert!(parse_chunk_size("lots").is_err());
        assert!(parse_chunk_size("99999999999999999999").is_err());
    }

    fn lines_of(events: &[(Progress<'_>, u64)]) -> Vec<String> {
        let start = Instant::now();
        let mut lines = Lines::new("legal");
        events
            .iter()
            .filter_map(|(p, ms)| lines.line(p, start + Duration::from_millis(*ms)))
            .collect()
    }

    const TOTAL: u64 = 100 << 20;

    fn sent(done_mib: u64) -> Progress<'static> {
        Progress::Sent {
            done_bytes: done_mib << 20,
            total_bytes: TOTAL,
        }
    }

    #[test]
    fn plain_progress_is_a_line_per_tenth_with_the_rate_of_this_run() {
        let mut events = vec![(
            Progress::Sending {
                held_bytes: 0,
                total_bytes: TOTAL,
                resumed: false,
            },
            0,
        )];
        // 1 MiB every 10 ms: a line at each tenth, none in between.
        events.extend((1..=100).map(|m| (sent(m), m * 10)));
        events.push((Progress::Verifying, 1_010));
        let lines = lines_of(&events);
        assert_eq!(lines.len(), 1 + 10 + 1, "{lines:#?}");
        assert_eq!(lines[0], "synesis: uploading legal (100.0 MiB)");
        assert_eq!(
            lines[1],
            "synesis: uploading legal: 10% (10.0 of 100.0 MiB, 100.0 MiB/s)"
        );
        assert!(
            lines[10].contains(": 100% (100.0 of 100.0 MiB"),
            "{}",
            lines[10]
        );
        assert!(lines[11].contains("verifies"));
    }

    #[test]
    fn slow_progress_still_says_something_every_two_seconds() {
        let mut events = vec![(
            Progress::Sending {
                held_bytes: 0,
                total_bytes: TOTAL,
                resumed: false,
            },
            0,
        )];
        // 1 MiB every second: within the first tenth, a line every 2 s.
        events.extend((1..=9).map(|m| (sent(m), m * 1_000)));
        let lines = lines_of(&events);
        assert_eq!(lines.len(), 1 + 4, "{lines:#?}");
        assert_eq!(
            lines[1],
            "synesis: uploading legal: 2% (2.0 of 100.0 MiB, 1.0 MiB/s)"
        );
    }

    #[test]
    fn a_resumed_upload_says_what_the_cloud_held_and_rates_only_what_this_run_sends() {
        let events = [
            (
                Progress::Sending {
                    held_bytes: 50 << 20,
                    total_bytes: TOTAL,
                    resumed: false,
                },
                0,
            ),
            (sent(60), 1_000),
            (Progress::Interrupted("reset"), 1_100),
            (
                Progress::Sending {
                    held_bytes: 55 << 20,
                    total_bytes: TOTAL,
                    resumed: true,
                },
                1_600,
            ),
        ];
        let lines = lines_of(&events);
        assert_eq!(
            lines,
            [
                "synesis: the cloud holds 50.0 of 100.0 MiB already; sending the rest",
                "synesis: uploading legal: 60% (60.0 of 100.0 MiB, 10.0 MiB/s)",
                "synesis: the connection broke (reset); resuming the upload",
                "synesis: back on the upload: the cloud holds 55.0 of 100.0 MiB",
            ]
        );
    }

    #[test]
    fn hashing_is_a_phase_of_its_own() {
        let events = [
            (
                Progress::Hashing {
                    done_bytes: 0,
                    total_bytes: TOTAL,
                },
                0,
            ),
            (
                Progress::Hashing {
                    done_bytes: 50 << 20,
                    total_bytes: TOTAL,
                },
                100,
            ),
        ];
        let lines = lines_of(&events);
        assert_eq!(lines[0], "synesis: hashing legal (100.0 MiB)");
        assert_eq!(
            lines[1],
            "synesis: hashing legal: 50% (50.0 of 100.0 MiB, 500.0 MiB/s)"
        );
    }

    fn pushed(bytes: u64, resumed_from_bytes: u64, sent_bytes: u64) -> Pushed {
        let upload_id = RequestId::from_parts(1, [1; 10]);
        Pushed {
            upload_id,
            name: "legal".into(),
            base_model: "tiny".into(),
            sha256: Sha256([0xab; 32]),
            bytes,
            resumed_from_bytes,
            sent_bytes,
            seconds: 2.0,
            resumes: 0,
            complete: UploadComplete {
                upload_id,
                sha256: Sha256([0xab; 32]),
                serving: true,
            },
        }
    }

    #[test]
    fn the_summary_says_what_was_sent_resumed_or_already_there() {
        assert_eq!(
            summary(&pushed(10 << 20, 0, 10 << 20)),
            "pushed legal (10.0 MiB, sha256 abababababab) for tiny: 10.0 MiB in 2.0 s (5.0 MiB/s); \
             `synesis cloud ask --lora legal` uses it\n"
        );
        assert!(
            summary(&pushed(10 << 20, 4 << 20, 6 << 20))
                .contains("resumed: 4.0 MiB were already on the cloud"),
        );
        assert_eq!(
            summary(&pushed(10 << 20, 10 << 20, 0)),
            "legal (10.0 MiB, sha256 abababababab) for tiny is already on the cloud: nothing was \
             sent; `synesis cloud ask --lora legal` uses it\n"
        );
    }

    #[test]
    fn a_cancelled_push_exits_130_and_says_how_to_resume() {
        let upload = Upload {
            path: "/x/legal.gguf".into(),
            name: "legal".into(),
            base_model: "tiny".into(),
            chunk_size_bytes: 1 << 20,
        };
        let e = explain(
            PushError::Cancelled {
                held_bytes: Some(3 << 20),
                total_bytes: 12 << 20,
            },
            &upload,
        );
        assert_eq!(crate::exit::code_for(&e), crate::exit::INTERRUPTED);
        assert_eq!(
            e.to_string(),
            "stopped: run the same command again to resume; the cloud holds 3.0 of 12.0 MiB"
        );
        let busy = explain(
            PushError::Refused {
                code: ErrorCode::BUSY,
                message: "legal is being uploaded".into(),
                retry_after_ms: None,
            },
            &upload,
        );
        assert_eq!(crate::exit::code_for(&busy), crate::exit::FAILURE);
        let text = format!("{busy:#}");
        assert!(text.contains("another upload to legal"), "{text}");
        assert!(
            text.contains("legal is being uploaded (314 (BUSY))"),
            "{text}"
        );
    }

    #[test]
    fn a_path_or_a_registered_name_finds_the_file_and_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("my-adapter.gguf");
        std::fs::write(&file, b"GGUF").unwrap();
        let registered = dir.path().join("registered.gguf");
        std::fs::write(&registered, b"GGUF").unwrap();
        let registered = std::fs::canonicalize(registered).unwrap();
        let mut config = Config::default();
        config.adapters.insert(
            "legal".into(),
            crate::registry::AdapterEntry {
                path: registered.clone(),
                size_bytes: 4,
                sha256: "00".into(),
                architecture: "llama".into(),
                base: None,
            },
        );
        assert_eq!(
            resolve(&config, "legal").unwrap(),
            (registered.clone(), "legal".to_owned())
        );
        let (path, name) = resolve(&config, file.to_str().unwrap()).unwrap();
        assert_eq!(name, "my-adapter");
        assert_eq!(path, std::fs::canonicalize(&file).unwrap());
        // The registered file by its path keeps its registered name.
        let (_, name) = resolve(&config, registered.to_str().unwrap()).unwrap();
        assert_eq!(name, "legal");
        let missing = resolve(&config, "nothing").unwrap_err().to_string();
        assert!(missing.contains("registered: legal"), "{missing}");
    }

    #[test]
    fn a_model_is_not_pushed_as_an_adapter() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("model.gguf");
        synesis_infer::tiny::write_model(&model, synesis_infer::tiny::TinySpec::TINY).unwrap();
        let err = check_adapter(&model).unwrap_err().to_string();
        assert!(err.contains("is not a LoRA adapter"), "{err}");
        let lora = dir.path().join("lora.gguf");
        synesis_infer::tiny::write_lora(&lora, synesis_infer::tiny::TinySpec::TINY, 7).unwrap();
        check_adapter(&lora).unwrap();
        let text = dir.path().join("notes.gguf");
        std::fs::write(&text, b"hello").unwrap();
        assert!(check_adapter(&text).is_err());
    }

    #[test]
    fn the_adapters_table_marks_this_devices_pushes() {
        let me: synesis_proto::DeviceId = "0190f3a2-7c1e-7b3d-9f00-00000000d001".parse().unwrap();
        let other: synesis_proto::DeviceId =
            "0190f3a2-7c1e-7b3d-9f00-00000000d002".parse().unwrap();
        let adapter = |name: &str, device_id| AdapterInfo {
            name: name.into(),
            sha256: Sha256([0x1f; 32]),
            size_bytes: 3 << 20,
            base_model: "tiny".into(),
            uploaded_at: synesis_proto::UnixMillis(1_795_000_000_123),
            device_id,
        };
        let text = adapters_table(&[adapter("legal", me), adapter("med", other)], Some(me));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[1].starts_with("legal "), "{text}");
        assert!(lines[1].contains("1f1f1f1f1f1f"), "{text}");
        assert!(lines[1].contains("3.0 MiB"), "{text}");
        assert!(lines[1].contains("2026-11-18 11:06:40"), "{text}");
        assert!(lines[1].ends_with("d001 (this device)"), "{text}");
        assert!(lines[2].ends_with("-00000000d002"), "{text}");
        assert!(adapters_table(&[], None).contains("no adapters"));
    }
}
