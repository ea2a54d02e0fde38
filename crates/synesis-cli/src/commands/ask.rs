//! `synesis ask --local "PROMPT"`: answer on this device, streaming as the model writes.

use std::io::{Read, Write};
use std::path::Path;

use anyhow::{Context, bail};
use serde::Serialize;
use synesis_infer::{CancelToken, FinishReason, Model, Request, Settings};
use synesis_ledger_local::{LocalGeneration, LocalLedger};
use synesis_proto::{DeviceId, RequestId};
use synesis_tunnel::Identity;
use synesis_tunnel::clock::{new_request_id, unix_now};

use super::{Output, is_closed_pipe, ledger_error};
use crate::cli::AskArgs;
use crate::exit::UserError;
use crate::paths::Paths;
use crate::registry::Config;
use crate::signals::Shutdown;

/// The model a first `synesis ask` registers when there is none.
const DEMO_MODEL: &str = "demo";

#[derive(Debug, Serialize)]
struct Answer {
    /// The key of this answer in the local ledger (`synesis usage`).
    request_id: RequestId,
    text: String,
    model: String,
    lora: Option<String>,
    prompt_tokens: usize,
    completion_tokens: usize,
    ttft_ms: f64,
    tokens_per_second: f64,
    mean_logprob: Option<f64>,
    finish_reason: &'static str,
}

/// `NAME` or `NAME:SCALE`.
pub(crate) fn parse_lora(text: &str) -> Result<(String, f32), String> {
    match text.rsplit_once(':') {
        Some((name, scale)) => {
            let scale: f32 = scale
                .parse()
                .map_err(|_| format!("{scale:?} is not a scale (e.g. 0.5)"))?;
            if !(scale.is_finite() && (0.0..=4.0).contains(&scale)) {
                return Err("the scale must be between 0 and 4".into());
            }
            Ok((name.to_owned(), scale))
        }
        None => Ok((text.to_owned(), 1.0)),
    }
}

pub(crate) async fn run(out: &Output, paths: &Paths, args: &AskArgs) -> anyhow::Result<()> {
    let request_id = new_request_id();
    if !args.local {
        return Err(UserError::Usage(
            "add --local to answer on this device, or ask the cloud with `synesis cloud ask` (choosing between them by itself comes next)".into(),
        )
        .into());
    }
    let prompt = if args.prompt == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("cannot read the prompt from stdin")?;
        text
    } else {
        args.prompt.clone()
    };
    if prompt.trim().is_empty() {
        return Err(UserError::Usage("the prompt is empty".into()).into());
    }
    let mut config = Config::load(&paths.config_file())?;
    if config.models.is_empty() && args.model.is_none() {
        // Embedded defaults: a first run answers at once, with the built-in demo model.
        eprintln!(
            "synesis: no model registered yet; using the built-in tiny demo model (random weights: \
             its answers are noise). Add a real one with `synesis model add PATH`."
        );
        super::model::register(paths, super::model::Source::Tiny(DEMO_MODEL))?;
        config = Config::load(&paths.config_file())?;
    }
    let (model_name, entry) = config.model(args.model.as_deref())?;
    let lora = match &args.lora {
        Some((name, scale)) => {
            let Some(adapter) = config.adapters.get(name) else {
                bail!("no adapter named {name:?}; `synesis lora list` shows them");
            };
            Some((name.clone(), *scale, adapter.path.clone()))
        }
        None => None,
    };
    let request = Request {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        lora: lora.as_ref().map(|(n, s, _)| (n.clone(), *s)),
        ..Request::new(prompt)
    };
    let model_path = entry.path.clone();
    let stream = !out.json();
    let cancel = CancelToken::default();
    let worker_cancel = cancel.clone();
    let mut work =
        tokio::task::spawn_blocking(move || -> anyhow::Result<synesis_infer::Generation> {
            let mut model = Model::load(&model_path, Settings::default())?;
            if let Some((name, _, path)) = &lora {
                model.load_adapter(name, path)?;
            }
            let mut stdout = std::io::stdout().lock();
            let mut reader_gone = false;
            let generation = model.generate(&request, &worker_cancel, &mut |piece| {
                if stream
                    && !reader_gone
                    && let Err(e) = stdout
                        .write_all(piece.as_bytes())
                        .and_then(|()| stdout.flush())
                {
                    // `| head`: stop generating for a reader that left.
                    reader_gone = is_closed_pipe(&e);
                    worker_cancel.cancel();
                }
            })?;
            if stream && !reader_gone {
                let _ = writeln!(stdout);
            }
            Ok(generation)
        });
    let mut shutdown = Shutdown::listen()?;
    let generation = tokio::select! {
        done = &mut work => done,
        () = shutdown.requested() => {
            cancel.cancel();
            work.await
        }
    }
    .context("the generation thread failed")??;

    if generation.finish_reason != FinishReason::Cancelled {
        let mut record = LocalGeneration {
            request_id,
            model: model_name.to_owned(),
            device_id: None,
            input_tokens: u64::try_from(generation.prompt_tokens).unwrap_or(u64::MAX),
            output_tokens: u64::try_from(generation.completion_tokens).unwrap_or(u64::MAX),
            at: unix_now(),
        };
        let (data_dir, ledger_file) = (paths.data.path.clone(), paths.ledger_file());
        let recorded = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            record.device_id = enrolled_device(&data_dir);
            LocalLedger::open(&ledger_file)
                .and_then(|mut ledger| ledger.record_local(&record))
                .map_err(ledger_error)?;
            Ok(())
        })
        .await
        .map_err(anyhow::Error::from)
        .and_then(|r| r);
        // The answer is made and shown: a ledger that cannot take it is worth a warning, not a
        // failed command.
        if let Err(e) = recorded {
            eprintln!("synesis: warning: this answer is not in the local ledger: {e:#}");
        }
    }

    let answer = Answer {
        request_id,
        model: model_name.to_owned(),
        lora: args.lora.as_ref().map(|(n, _)| n.clone()),
        prompt_tokens: generation.prompt_tokens,
        completion_tokens: generation.completion_tokens,
        ttft_ms: generation.time_to_first_token.as_secs_f64() * 1_000.0,
        tokens_per_second: generation.tokens_per_second,
        mean_logprob: generation.mean_logprob,
        finish_reason: match generation.finish_reason {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Cancelled => "cancelled",
        },
        text: generation.text,
    };
    if out.json() {
        out.report(&answer, String::new)?;
    } else {
        eprintln!(
            "[{} · {} prompt + {} tokens · first token {:.0} ms · {:.1} tok/s · {}]",
            answer.model,
            answer.prompt_tokens,
            answer.completion_tokens,
            answer.ttft_ms,
            answer.tokens_per_second,
            answer.finish_reason
        );
    }
    Ok(())
}

/// This device's id when it is enrolled; `None` otherwise, or when the identity cannot be read
/// (`synesis cloud` commands report that; an answer on the device does not need it).
fn enrolled_device(data_dir: &Path) -> Option<DeviceId> {
    match Identity::load(data_dir) {
        Ok(identity) => identity.map(|i| i.info.device_id),
        Err(e) => {
            tracing::warn!("the device identity cannot be read: {e}");
            None
        }
    }
}
