//! `synesis ask "PROMPT"`: answer on this device when it can, by the cloud when it cannot (the
//! local-first policy, `synesis-route`), streaming as the model writes; `--local` and `--cloud`
//! force a route, `--explain` says why.

use std::io::{IsTerminal, Write};
use std::sync::Arc;

use anyhow::bail;
use serde::Serialize;
use synesis_infer::{CancelToken, FinishReason, Request};
use synesis_ledger_local::{LocalGeneration, LocalLedger};

use crate::answer::{Gathered, Measured, cloud_model_or_ask, fall_back, gather};
use crate::hosted::LocalRunner;
use synesis_proto::{DeviceId, RequestId};
use synesis_route::{Decision, Inputs, Mode, Reason, Thresholds, route};
use synesis_tunnel::Identity;
use synesis_tunnel::clock::{new_request_id, unix_now};
use synesis_tunnel::local::LocalClient;

use super::escalate::CloudFailure;
use super::{Output, is_closed_pipe, ledger_error};
use crate::cli::{AskArgs, CloudAskArgs};
use crate::exit::UserError;
use crate::paths::Paths;
use crate::pull::reference::{CATALOG, Pinned};
use crate::registry::Config;
use crate::request::{AnswerRequest, Conversation};
use crate::signals::Shutdown;

/// The model a first `synesis ask` offers to pull when there is none (the catalog's first).
const FIRST_MODEL: &Pinned = &CATALOG[0];

/// No model here, and no cloud to ask (or `--local`): one line that says what to do; on an
/// interactive terminal, an offer to pull [`FIRST_MODEL`] now (y/N).
async fn first_model(out: &Output, paths: &Paths, enrolled: bool) -> anyhow::Result<()> {
    let size = FIRST_MODEL.size_bytes / 1_000_000;
    let name = FIRST_MODEL.name;
    let interactive =
        !out.json() && std::io::stdin().is_terminal() && std::io::stderr().is_terminal();
    if interactive {
        eprint!("synesis: no model on this device yet. Pull {name} ({size} MB) now? [y/N] ");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        if matches!(line.trim(), "y" | "Y" | "yes") {
            let reference = crate::pull::Reference::parse(name)?;
            let fetched =
                crate::pull::fetch(paths, &reference, crate::pull::Progress::Stderr).await?;
            super::model::register(
                paths,
                super::model::Source::Pulled {
                    fetched: &fetched,
                    name: name.to_owned(),
                },
            )?;
            return Ok(());
        }
    }
    let cloud = if enrolled { "" } else { " and no cloud to ask" };
    Err(UserError::Usage(format!(
        "no model on this device{cloud}: `synesis model pull {name}` gets one ({size} MB; \
         `synesis model pull --list` shows others), `synesis demo` shows the whole product"
    ))
    .into())
}

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
    /// Why this device answered (the local-first policy's decision and its figures).
    route: Explained,
    /// Whether the model was loaded for this answer; `false` when the service kept it loaded.
    model_loaded_now: bool,
    /// Where the model ran: this process, or the service.
    model_in: &'static str,
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
    let mode = match (args.local, args.cloud) {
        (true, _) => Mode::Local,
        (_, true) => Mode::Cloud,
        _ => Mode::Auto,
    };
    let prompt = super::escalate::read_prompt(Some(&args.prompt))?;
    let mut config = Config::load(&paths.config_file())?;
    if config.models.is_empty() && args.model.is_none() {
        let enrolled = paths
            .identity_home()
            .is_ok_and(|home| matches!(synesis_tunnel::Identity::load(&home), Ok(Some(_))));
        if mode == Mode::Local || (mode == Mode::Auto && !enrolled) {
            first_model(out, paths, enrolled).await?;
            config = Config::load(&paths.config_file())?;
        }
    }
    let thresholds = config.escalation.thresholds()?;
    let local_entry = if config.models.is_empty() && args.model.is_none() {
        None
    } else {
        let (name, entry) = config.model(args.model.as_deref())?;
        Some((name.to_owned(), entry.clone()))
    };
    let lora = match &args.lora {
        Some((name, scale)) => {
            let Some(adapter) = config.adapters.get(name) else {
                bail!("no adapter named {name:?}; `synesis lora list` shows them");
            };
            Some((name.clone(), *scale, adapter.path.clone()))
        }
        None => None,
    };
    let mut conversation = Conversation::default();
    conversation.user(prompt.clone());
    let mut ask = AnswerRequest::new(String::new(), conversation)?;
    ask.max_tokens = args.max_tokens;
    ask.temperature = args.temperature;
    ask.seed = Some(u64::from(args.seed));
    ask.lora = lora.as_ref().map(|(n, s, _)| (n.clone(), *s));
    // For the service's model, which loads the adapter on demand.
    ask.lora_file = lora.as_ref().map(|(_, _, file)| file.clone());
    let request = ask.local_request()?;

    // The service's model when it runs (it keeps it loaded), else one loaded here.
    let loaded = match (&local_entry, mode) {
        (Some((name, entry)), Mode::Auto | Mode::Local) => {
            let adapter = lora.as_ref().map(|(n, _, file)| (n.clone(), file.clone()));
            let client = LocalClient::new(&paths.runtime.path);
            Some(LocalRunner::open(client, name, entry.path.clone(), adapter, &request).await?)
        }
        _ => None,
    };
    // What the policy reads, gathered as the HTTP API gathers it.
    let Gathered {
        inputs, identity, ..
    } = gather(
        paths,
        &config,
        &crate::answer::StressGauge::new(paths),
        mode,
        loaded.as_ref().map(|(_, m)| Measured {
            context_tokens: m.context_tokens,
            prompt_tokens: m.prompt_tokens,
        }),
        args.max_tokens,
        args.cloud_model.as_deref(),
    )
    .await?;
    let Decided {
        route: decided,
        inputs,
        first,
        cascade_ms,
    } = decide(
        inputs,
        &thresholds,
        loaded.as_ref().map(|(runner, _)| runner),
        &request,
    )
    .await?;
    let explained = Explained {
        decision: decided.decision,
        code: decided
            .reasons
            .first()
            .map_or("auto", Reason::code)
            .to_owned(),
        reasons: decided.reasons.iter().map(ToString::to_string).collect(),
        detail: decided.reasons.clone(),
        inputs: inputs.clone(),
        thresholds,
        cascade_ms,
    };
    if args.explain {
        explained.print();
    }

    if decided.decision == Decision::Cloud {
        let Some(identity) = &identity else {
            bail!("the cloud was chosen but this device is not enrolled");
        };
        let cloud_args = CloudAskArgs {
            prompt: None,
            model: None,
            lora: None,
            system: None,
            max_tokens: args.max_tokens,
            temperature: args.temperature,
            seed: Some(u64::from(args.seed)),
            stop: Vec::new(),
            max_cost: None,
            byok: false,
        };
        let asked = async {
            let model = cloud_model_or_ask(paths, identity, args.cloud_model.as_deref(), &config)
                .await
                .map_err(CloudFailure::Other)?;
            let escalation = super::escalate::request_of(paths, &cloud_args, model, prompt)?;
            let route_json = serde_json::to_value(&explained).map_err(anyhow::Error::from)?;
            super::escalate::ask_cloud(out, paths, identity, &escalation, Some(route_json)).await
        };
        match asked.await {
            Ok(()) => return Ok(()),
            // Never fail where a local answer is possible: the cloud said no before any output.
            Err(CloudFailure::NothingShown(e)) => match fall_back(mode, loaded.is_some(), &e) {
                Some(why) => eprintln!("synesis: {why}; answering on this device"),
                None => return Err(e.into()),
            },
            Err(CloudFailure::Other(e)) if mode == Mode::Auto && loaded.is_some() => {
                eprintln!(
                    "synesis: the cloud could not be asked ({e:#}); answering on this device"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    let Some(((model_name, _), (model, measured))) = local_entry.zip(loaded) else {
        bail!("no local model can answer; add one with `synesis model add PATH`");
    };
    answer_locally(
        out,
        paths,
        LocalAnswer {
            request_id,
            model_name,
            model,
            loaded_now: measured.loaded_now,
            request,
            lora: args.lora.as_ref().map(|(n, _)| n.clone()),
            first,
            route: explained,
        },
    )
    .await
}

/// The local-first policy's decision on one request, as `synesis ask` and the HTTP API make it.
pub(crate) struct Decided {
    pub(crate) route: synesis_route::Route,
    /// What it was decided from (with the confidence, when it was measured).
    pub(crate) inputs: Inputs,
    /// A whole answer the confidence probe already made.
    pub(crate) first: Option<synesis_infer::Generation>,
    /// What measuring the confidence cost, when it was measured.
    pub(crate) cascade_ms: Option<f64>,
}

/// Decides from `inputs`; when the policy asks how sure the local model is, its first tokens
/// are generated here (not shown) and the policy decides again with their confidence.
pub(crate) async fn decide(
    mut inputs: Inputs,
    thresholds: &Thresholds,
    model: Option<&LocalRunner>,
    request: &Request,
) -> anyhow::Result<Decided> {
    let mut decided = route(&inputs, thresholds).map_err(|e| UserError::Usage(e.to_string()))?;
    let mut first = None;
    let mut cascade_ms = None;
    if decided.measure_confidence
        && let Some(model) = model
    {
        let probe = Request {
            max_tokens: thresholds.cascade_tokens.min(request.max_tokens),
            ..request.clone()
        };
        let started = std::time::Instant::now();
        let g = model
            .generate(&probe, &CancelToken::default(), Box::new(|_| {}))
            .await?;
        cascade_ms = Some(started.elapsed().as_secs_f64() * 1_000.0);
        inputs.confidence = g.mean_logprob;
        if inputs.confidence.is_some() {
            decided = route(&inputs, thresholds).map_err(|e| UserError::Usage(e.to_string()))?;
        }
        // An answer that ended within the probe is the answer.
        if g.finish_reason != FinishReason::Length
            || request.max_tokens <= thresholds.cascade_tokens
        {
            first = Some(g);
        }
    }
    Ok(Decided {
        route: decided,
        inputs,
        first,
        cascade_ms,
    })
}

/// The policy's decision and what it was made from (`--explain`, and `route` in `--json`).
#[derive(Debug, Serialize)]
struct Explained {
    decision: Decision,
    /// The first reason's stable name (kept in the local ledger with the answer).
    code: String,
    reasons: Vec<String>,
    detail: Vec<Reason>,
    inputs: Inputs,
    thresholds: Thresholds,
    /// What measuring the first tokens' confidence cost, when it was measured.
    cascade_ms: Option<f64>,
}

impl Explained {
    fn print(&self) {
        let decision = match self.decision {
            Decision::Local => "on this device",
            Decision::Cloud => "by the cloud",
        };
        eprintln!("synesis: answering {decision}: {}", self.reasons.join("; "));
        let i = &self.inputs;
        eprintln!(
            "  prompt {} tokens + up to {} · local context {} · cloud {:?} · stress: {}",
            i.prompt_tokens,
            i.max_tokens,
            i.local
                .map_or("none".into(), |l| l.context_tokens.to_string()),
            i.cloud,
            if i.stress.is_empty() {
                "none".into()
            } else {
                i.stress
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        );
        eprintln!(
            "  confidence {} (threshold {:.2}, over the first {} tokens{})",
            i.confidence
                .map_or("not measured".into(), |c| format!("{c:.2}")),
            self.thresholds.min_confidence,
            self.thresholds.cascade_tokens,
            self.cascade_ms
                .map_or(String::new(), |ms| format!(", measured in {ms:.0} ms")),
        );
    }
}

struct LocalAnswer {
    request_id: RequestId,
    model_name: String,
    model: LocalRunner,
    /// Whether the model was loaded for this answer (not kept loaded by the service).
    loaded_now: bool,
    request: Request,
    lora: Option<String>,
    /// A whole answer the cascade already made.
    first: Option<synesis_infer::Generation>,
    route: Explained,
}

async fn answer_locally(out: &Output, paths: &Paths, a: LocalAnswer) -> anyhow::Result<()> {
    let stream = !out.json();
    let cancel = CancelToken::default();
    let reader_gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let show = {
        let (cancel, reader_gone) = (cancel.clone(), Arc::clone(&reader_gone));
        move |piece: &str| {
            let mut stdout = std::io::stdout().lock();
            if stream
                && !reader_gone.load(std::sync::atomic::Ordering::Relaxed)
                && let Err(e) = stdout
                    .write_all(piece.as_bytes())
                    .and_then(|()| stdout.flush())
            {
                // `| head`: stop generating for a reader that left.
                reader_gone.store(is_closed_pipe(&e), std::sync::atomic::Ordering::Relaxed);
                cancel.cancel();
            }
        }
    };
    let generation = match a.first {
        Some(g) => {
            show(&g.text);
            g
        }
        None => {
            let work = a.model.generate(&a.request, &cancel, Box::new(show));
            tokio::pin!(work);
            let mut shutdown = Shutdown::listen()?;
            tokio::select! {
                done = &mut work => done,
                () = shutdown.requested() => {
                    cancel.cancel();
                    work.await
                }
            }?
        }
    };
    if stream && !reader_gone.load(std::sync::atomic::Ordering::Relaxed) {
        println!();
    }

    if generation.finish_reason != FinishReason::Cancelled {
        let recorded = record_local(
            paths,
            a.request_id,
            &a.model_name,
            &generation,
            a.route.code.clone(),
        )
        .await;
        // The answer is made and shown: a ledger that cannot take it is worth a warning, not a
        // failed command.
        if let Err(e) = recorded {
            eprintln!("synesis: warning: this answer is not in the local ledger: {e:#}");
        }
    }

    let answer = Answer {
        request_id: a.request_id,
        model: a.model_name,
        lora: a.lora,
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
        route: a.route,
        model_loaded_now: a.loaded_now,
        model_in: a.model.place(),
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

/// Records an answer made on this device in the local ledger, with the policy's reason.
pub(crate) async fn record_local(
    paths: &Paths,
    request_id: RequestId,
    model: &str,
    generation: &synesis_infer::Generation,
    reason: String,
) -> anyhow::Result<()> {
    let mut record = LocalGeneration {
        request_id,
        model: model.to_owned(),
        device_id: None,
        input_tokens: u64::try_from(generation.prompt_tokens).unwrap_or(u64::MAX),
        output_tokens: u64::try_from(generation.completion_tokens).unwrap_or(u64::MAX),
        at: unix_now(),
    };
    let (paths, ledger_file) = (paths.clone(), paths.ledger_file());
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        record.device_id = enrolled_device(&paths);
        LocalLedger::open(&ledger_file)
            .and_then(|mut ledger| {
                ledger.record_local(&record)?;
                ledger.note_route(record.request_id, &reason)
            })
            .map_err(ledger_error)?;
        Ok(())
    })
    .await?
}

/// This device's id when it is enrolled; `None` otherwise, or when the identity cannot be read
/// (`synesis cloud` commands report that; an answer on the device does not need it).
fn enrolled_device(paths: &Paths) -> Option<DeviceId> {
    match paths.identity_home().and_then(|home| Identity::load(&home)) {
        Ok(identity) => identity.map(|i| i.info.device_id),
        Err(e) => {
            tracing::warn!("the device identity cannot be read: {e}");
            None
        }
    }
}
