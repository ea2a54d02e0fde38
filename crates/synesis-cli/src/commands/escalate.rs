//! `synesis cloud ask`: one escalation, streamed to stdout, recorded in the local ledger.
//! The protocol (streaming, resume, cancel) is `synesis_tunnel::escalate`'s; this renders it.

use std::io::{Read, Write};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use synesis_ledger_local::{CloudCharge, LocalLedger};
use synesis_proto::message::{EscalationRequest, FinishReason};
use synesis_proto::{MicroUsd, Secret};
use synesis_tunnel::Identity;
use synesis_tunnel::clock::{new_request_id, unix_now};
use synesis_tunnel::escalate::{Progress, Route, escalate};
use synesis_tunnel::local::LocalClient;

use super::{Output, ledger_error};
use crate::cli::CloudAskArgs;
use crate::exit::UserError;
use crate::paths::Paths;
use crate::request::{AnswerRequest, Conversation};
use crate::signals::Shutdown;

/// Where a BYOK key may come from, in this order.
const BYOK_ENV: &str = "SYNESIS_BYOK_KEY";
const BYOK_FILE: &str = "byok.key";

#[derive(Debug, Serialize)]
struct Answer {
    text: String,
    model: String,
    request_id: synesis_proto::RequestId,
    input_tokens: u64,
    output_tokens: u64,
    finish_reason: &'static str,
    ttft_ms: Option<f64>,
    tokens_per_second: Option<f64>,
    total_micro_usd: i64,
    cost: CostView,
    /// The provider gave no token counts: the cloud counted.
    usage_counted: bool,
    resumed: u32,
    started_over: u32,
    /// How the stream went: `service` (the tunnel service's connection) or `direct`.
    via: &'static str,
    /// The local-first policy's decision, when `synesis ask` chose the cloud.
    #[serde(skip_serializing_if = "Option::is_none")]
    route: Option<serde_json::Value>,
}

#[derive(Debug, Serialize)]
struct CostView {
    base_micro_usd: i64,
    markup_micro_usd: i64,
    total_micro_usd: i64,
}

/// Why an escalation did not answer.
#[derive(Debug)]
pub(crate) enum CloudFailure {
    /// Nothing was shown: the caller may still answer another way.
    NothingShown(synesis_tunnel::RequestError),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for CloudFailure {
    fn from(e: anyhow::Error) -> Self {
        CloudFailure::Other(e)
    }
}

impl From<std::io::Error> for CloudFailure {
    fn from(e: std::io::Error) -> Self {
        CloudFailure::Other(e.into())
    }
}

impl From<CloudFailure> for anyhow::Error {
    fn from(f: CloudFailure) -> Self {
        match f {
            CloudFailure::NothingShown(e) => e.into(),
            CloudFailure::Other(e) => e,
        }
    }
}

/// The prompt from the argument, or stdin when it is absent or `-`; never empty.
pub(crate) fn read_prompt(arg: Option<&str>) -> anyhow::Result<String> {
    let prompt = match arg {
        Some(p) if p != "-" => p.to_owned(),
        _ => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("cannot read the prompt from stdin")?;
            text
        }
    };
    if prompt.trim().is_empty() {
        return Err(UserError::Usage("the prompt is empty".into()).into());
    }
    Ok(prompt)
}

pub(crate) async fn run(out: &Output, paths: &Paths, args: &CloudAskArgs) -> anyhow::Result<()> {
    let Some(identity) = Identity::load(&paths.identity_home()?)? else {
        bail!("this device is not enrolled; run `synesis cloud login TOKEN` first");
    };
    let prompt = read_prompt(args.prompt.as_deref())?;
    let config = crate::registry::Config::load(&paths.config_file())?;
    let model =
        crate::answer::cloud_model_or_ask(paths, &identity, args.model.as_deref(), &config).await?;
    let request = request_of(paths, args, model, prompt)?;
    Ok(ask_cloud(out, paths, &identity, &request, None).await?)
}

/// The escalation `args` describe, to `model`, for `prompt`.
pub(crate) fn request_of(
    paths: &Paths,
    args: &CloudAskArgs,
    model: String,
    prompt: String,
) -> anyhow::Result<EscalationRequest> {
    let byok_key = if args.byok {
        Some(Secret(byok_key(paths)?))
    } else {
        None
    };
    let mut conversation = Conversation::default();
    if let Some(system) = &args.system {
        conversation.system(system.clone());
    }
    conversation.user(prompt);
    let mut ask = AnswerRequest::new(model.clone(), conversation)?;
    ask.max_tokens = args.max_tokens;
    ask.temperature = args.temperature;
    ask.seed = args.seed;
    ask.stop = args.stop.clone();
    ask.lora = args.lora.clone().map(|name| (name, 1.0));
    ask.max_cost = args.max_cost;
    ask.byok_key = byok_key;
    let request = ask.escalation(new_request_id(), model)?;
    Ok(request)
}

/// Mirrors the charge of a finished escalation (`done`, to `model`, from `device`) into the
/// local ledger, with the reason the cloud was chosen.
pub(crate) async fn record_cloud(
    paths: &Paths,
    done: &synesis_proto::message::EscalationDone,
    model: &str,
    device: synesis_proto::DeviceId,
    reason: String,
) -> anyhow::Result<()> {
    let charge = CloudCharge {
        request_id: done.request_id,
        model: model.to_owned(),
        device_id: Some(device),
        input_tokens: done.usage.input_tokens,
        output_tokens: done.usage.output_tokens,
        total_micro_usd: done.cost.total,
        at: unix_now(),
    };
    let ledger_file = paths.ledger_file();
    tokio::task::spawn_blocking(move || {
        LocalLedger::open(&ledger_file)
            .and_then(|mut l| {
                l.record_cloud(&charge)?;
                l.note_route(charge.request_id, &reason)
            })
            .map_err(ledger_error)
    })
    .await?
}

/// Runs `request` to its end: streams it (or reports it as JSON, with `route` when the local-first
/// policy chose the cloud), records the charge in the local ledger.
pub(crate) async fn ask_cloud(
    out: &Output,
    paths: &Paths,
    identity: &Identity,
    request: &EscalationRequest,
    route_json: Option<serde_json::Value>,
) -> Result<(), CloudFailure> {
    let service = LocalClient::new(&paths.runtime.path);
    let mut route = Route::choose(service.clone(), identity.clone()).await;
    let route_name = if route.is_service() {
        "service"
    } else {
        "direct"
    };
    // The service waits for its tunnel to reconnect (`tunnel run --reconnect-wait`): say so.
    if route.is_service()
        && let Ok(s) = service.status().await
        && s.state != synesis_tunnel::TunnelState::Connected
    {
        eprintln!(
            "synesis: the tunnel is {} (the cloud is not connected); waiting for it to connect…",
            s.state
        );
    }
    let (cancel_tx, cancel) = tokio::sync::watch::channel(false);
    let mut shutdown = Shutdown::listen()?;
    let stream = !out.json();
    let started = Instant::now();
    let mut first_at: Option<Instant> = None;
    let mut reader_gone = false;
    let result = {
        let mut on = |p: Progress<'_>| match p {
            Progress::Text(text) => {
                first_at.get_or_insert_with(Instant::now);
                if stream && !reader_gone {
                    let mut stdout = std::io::stdout().lock();
                    if stdout
                        .write_all(text.as_bytes())
                        .and_then(|()| stdout.flush())
                        .is_err()
                    {
                        reader_gone = true; // `| head`: the rest is not shown, still charged once
                    }
                }
            }
            Progress::Interrupted(why) => {
                eprintln!("\nsynesis: the connection broke ({why}); resuming the answer…");
            }
            Progress::Resumed { next_seq } => {
                tracing::info!(next_seq, "resumed the answer");
            }
            Progress::StartedOver => {
                eprintln!(
                    "\nsynesis: the cloud lost the answer (its node restarted or died); it starts over (charged once):"
                );
            }
        };
        let work = escalate(&mut route, request, cancel, &mut on);
        tokio::pin!(work);
        tokio::select! {
            r = &mut work => r,
            () = shutdown.requested() => {
                let _ = cancel_tx.send(true);
                eprintln!("\nsynesis: cancelling; the cloud charges what it produced");
                tokio::select! {
                    r = &mut work => r,
                    () = shutdown.requested() => {
                        return Err(CloudFailure::Other(anyhow::anyhow!(
                            "interrupted twice; the cloud settles the request on its own"
                        )));
                    }
                }
            }
        }
    };
    route.close().await;
    let done = match result {
        Ok(done) => done,
        Err(e) if first_at.is_none() => return Err(CloudFailure::NothingShown(e)),
        Err(e) => return Err(CloudFailure::Other(e.into())),
    };
    let ended = Instant::now();
    if stream && !reader_gone && !done.text.ends_with('\n') {
        println!();
    }

    let d = &done.done;
    let reason = route_json
        .as_ref()
        .and_then(|r| r["code"].as_str())
        .unwrap_or("forced_cloud")
        .to_owned();
    if let Err(e) = record_cloud(paths, d, &request.model, identity.info.device_id, reason).await {
        eprintln!(
            "synesis: warning: this charge is not in the local ledger (`synesis cloud sync` adds it): {e:#}"
        );
    }

    let ttft = first_at.map(|t| (t - started).as_secs_f64() * 1_000.0);
    #[allow(clippy::cast_precision_loss)] // token counts
    let tps = first_at.and_then(|t| {
        let secs = (ended - t).as_secs_f64();
        (d.usage.output_tokens > 1 && secs > 0.0).then(|| (d.usage.output_tokens - 1) as f64 / secs)
    });
    let answer = Answer {
        text: done.text.clone(),
        model: request.model.clone(),
        request_id: d.request_id,
        input_tokens: d.usage.input_tokens,
        output_tokens: d.usage.output_tokens,
        finish_reason: match d.finish_reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
            FinishReason::Failed => "failed",
        },
        ttft_ms: ttft,
        tokens_per_second: tps,
        total_micro_usd: d.cost.total.0,
        cost: CostView {
            base_micro_usd: d.cost.base.0,
            markup_micro_usd: d.cost.markup.0,
            total_micro_usd: d.cost.total.0,
        },
        usage_counted: d.usage_counted,
        resumed: done.resumed,
        started_over: done.started_over,
        via: route_name,
        route: route_json,
    };
    if out.json() {
        out.report(&answer, String::new)?;
    } else {
        eprintln!(
            "[{} · {} in + {} out tokens{} · first token {} · {} · ${}{}{}]",
            answer.model,
            answer.input_tokens,
            answer.output_tokens,
            if answer.usage_counted {
                " (counted by the cloud)"
            } else {
                ""
            },
            ttft.map_or("-".into(), |ms| format!("{ms:.0} ms")),
            tps.map_or("-".into(), |t| format!("{t:.1} tok/s")),
            MicroUsd(answer.total_micro_usd),
            if answer.finish_reason == "stop" {
                String::new()
            } else {
                format!(" · {}", answer.finish_reason)
            },
            if done.resumed > 0 {
                format!(" · resumed {}×", done.resumed)
            } else {
                String::new()
            },
        );
    }
    Ok(())
}

/// The user's provider key: `$SYNESIS_BYOK_KEY`, else `byok.key` in the config directory,
/// which must be readable by its owner only.
fn byok_key(paths: &Paths) -> anyhow::Result<String> {
    if let Ok(key) = std::env::var(BYOK_ENV)
        && !key.trim().is_empty()
    {
        return Ok(key.trim().to_owned());
    }
    let path = paths.config.path.join(BYOK_FILE);
    let meta = std::fs::metadata(&path).map_err(|_| {
        UserError::Usage(format!(
            "--byok needs your provider key: set {BYOK_ENV}, or put it in {} (chmod 600)",
            path.display()
        ))
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{} is readable by others (mode {mode:o}); run `chmod 600 {}`",
                path.display(),
                path.display()
            );
        }
    }
    let key = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let key = key.trim();
    if key.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(key.to_owned())
}
