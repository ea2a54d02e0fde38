//! A local model, wherever it runs: loaded in this process, or kept loaded by the running
//! service ([`LocalRunner::Service`]; the service's side is [`Hosted`], the local API's
//! `work`), so that `synesis ask` skips the load the service already made. The same model
//! host serves the service's HTTP API ([`crate::openai`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use synesis_infer::{CancelToken, ChatMessage, FinishReason, Generation, Model, Request};
use synesis_tunnel::local::{LocalClient, LocalWork, WorkFuture};
use tokio::sync::mpsc;

use crate::api::host::ModelHost;

/// How often a generation through the service looks at its cancel token.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// What a client asks of the service's models.
#[derive(Debug, Serialize, Deserialize)]
struct Work {
    model: String,
    path: PathBuf,
    /// Count the prompt's tokens and say the model's context size; generate nothing.
    measure_only: bool,
    request: WireRequest,
}

/// [`Request`], as it travels to the service.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireRequest {
    prompt: String,
    chat: bool,
    max_tokens: u32,
    temperature: f32,
    top_p: Option<f32>,
    top_k: Option<i32>,
    seed: u32,
    stop: Vec<String>,
    lora: Option<(String, f32)>,
    lora_file: Option<PathBuf>,
    context: Vec<(String, String)>,
}

impl From<&Request> for WireRequest {
    fn from(r: &Request) -> WireRequest {
        WireRequest {
            prompt: r.prompt.clone(),
            chat: r.chat,
            max_tokens: r.max_tokens,
            temperature: r.temperature,
            top_p: r.top_p,
            top_k: r.top_k,
            seed: r.seed,
            stop: r.stop.clone(),
            lora: r.lora.clone(),
            lora_file: r.lora_file.clone(),
            context: r
                .context
                .iter()
                .map(|m| (m.role.clone(), m.content.clone()))
                .collect(),
        }
    }
}

impl From<WireRequest> for Request {
    fn from(w: WireRequest) -> Request {
        Request {
            prompt: w.prompt,
            chat: w.chat,
            max_tokens: w.max_tokens,
            temperature: w.temperature,
            top_p: w.top_p,
            top_k: w.top_k,
            seed: w.seed,
            stop: w.stop,
            lora: w.lora,
            lora_file: w.lora_file,
            context: w
                .context
                .into_iter()
                .map(|(role, content)| ChatMessage { role, content })
                .collect(),
            grammar: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            logprobs: None,
        }
    }
}

/// What measuring a prompt says.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct Measured {
    pub(crate) prompt_tokens: u64,
    pub(crate) context_tokens: u32,
    /// Whether the model was loaded for this (not kept loaded from before).
    pub(crate) loaded_now: bool,
}

/// [`Generation`], as it travels back.
#[derive(Debug, Serialize, Deserialize)]
struct WireGeneration {
    text: String,
    prompt_tokens: usize,
    completion_tokens: usize,
    ttft_secs: f64,
    tokens_per_second: f64,
    mean_logprob: Option<f64>,
    finish_reason: String,
    lora_attach_secs: Option<f64>,
    lora_load_secs: Option<f64>,
}

fn finish_name(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
    }
}

impl From<&Generation> for WireGeneration {
    fn from(g: &Generation) -> WireGeneration {
        WireGeneration {
            text: g.text.clone(),
            prompt_tokens: g.prompt_tokens,
            completion_tokens: g.completion_tokens,
            ttft_secs: g.time_to_first_token.as_secs_f64(),
            tokens_per_second: g.tokens_per_second,
            mean_logprob: g.mean_logprob,
            finish_reason: finish_name(g.finish_reason).into(),
            lora_attach_secs: g.lora_attach.map(|d| d.as_secs_f64()),
            lora_load_secs: g.lora_load.map(|d| d.as_secs_f64()),
        }
    }
}

impl From<WireGeneration> for Generation {
    fn from(w: WireGeneration) -> Generation {
        let secs = |s: f64| Duration::try_from_secs_f64(s).unwrap_or_default();
        Generation {
            text: w.text,
            prompt_tokens: w.prompt_tokens,
            completion_tokens: w.completion_tokens,
            time_to_first_token: secs(w.ttft_secs),
            tokens_per_second: w.tokens_per_second,
            mean_logprob: w.mean_logprob,
            finish_reason: match w.finish_reason.as_str() {
                "length" => FinishReason::Length,
                "cancelled" => FinishReason::Cancelled,
                _ => FinishReason::Stop,
            },
            lora_attach: w.lora_attach_secs.map(secs),
            lora_load: w.lora_load_secs.map(secs),
            tokens: Vec::new(),
        }
    }
}

/// The service's side: generations with the models its host keeps loaded.
pub(crate) struct Hosted {
    pub(crate) host: Arc<ModelHost>,
}

/// Cancels a generation when the future that waits for it is dropped (its client left).
struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl LocalWork for Hosted {
    fn run(&self, work: serde_json::Value, pieces: mpsc::Sender<String>) -> WorkFuture {
        let host = Arc::clone(&self.host);
        Box::pin(async move {
            let work: Work = serde_json::from_value(work).map_err(|e| e.to_string())?;
            let (model, loaded_now) = host
                .get(&work.model, &work.path)
                .await
                .map_err(|e| format!("{e:#}"))?;
            let request = Request::from(work.request);
            if work.measure_only {
                let context_tokens = model.info().context_length;
                let tokens = tokio::task::spawn_blocking(move || model.prompt_tokens(&request))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let measured = Measured {
                    prompt_tokens: tokens as u64,
                    context_tokens,
                    loaded_now,
                };
                return serde_json::to_value(measured).map_err(|e| e.to_string());
            }
            let cancel = CancelToken::default();
            let _stop_when_dropped = CancelOnDrop(cancel.clone());
            let generation = tokio::task::spawn_blocking(move || {
                model.generate(&request, &cancel, &mut |piece| {
                    if pieces.blocking_send(piece.to_owned()).is_err() {
                        cancel.cancel();
                    }
                })
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
            serde_json::to_value(WireGeneration::from(&generation)).map_err(|e| e.to_string())
        })
    }
}

/// A local model, in this process or the service's.
pub(crate) enum LocalRunner {
    InProcess(Arc<Model>),
    Service {
        client: LocalClient,
        name: String,
        path: PathBuf,
    },
}

impl LocalRunner {
    /// Measures `request` on the model registered as `name`: with the running service's when it
    /// answers (it keeps the model loaded), else with one loaded here (and its `lora`,
    /// `(name, file)`, pinned). Returns the runner and the measure.
    pub(crate) async fn open(
        client: LocalClient,
        name: &str,
        path: PathBuf,
        lora: Option<(String, PathBuf)>,
        request: &Request,
    ) -> anyhow::Result<(LocalRunner, Measured)> {
        let service = LocalRunner::Service {
            client,
            name: name.to_owned(),
            path: path.clone(),
        };
        match service.measure(request).await {
            Ok(measured) => return Ok((service, measured)),
            Err(e) => tracing::info!("loading the model here: {e:#}"),
        }
        let (counted, file) = (request.clone(), path);
        let (model, prompt_tokens) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let model = Model::load(&file, synesis_infer::Settings::default())?;
            if let Some((name, adapter)) = &lora {
                model.load_adapter(name, adapter)?;
            }
            let tokens = model.prompt_tokens(&counted)? as u64;
            Ok((model, tokens))
        })
        .await
        .context("the model thread failed")??;
        let measured = Measured {
            prompt_tokens,
            context_tokens: model.info().context_length,
            loaded_now: true,
        };
        Ok((LocalRunner::InProcess(Arc::new(model)), measured))
    }

    /// Where the model runs, for reports.
    pub(crate) fn place(&self) -> &'static str {
        match self {
            LocalRunner::InProcess(_) => "this process",
            LocalRunner::Service { .. } => "the service",
        }
    }

    async fn measure(&self, request: &Request) -> anyhow::Result<Measured> {
        let LocalRunner::Service { client, name, path } = self else {
            anyhow::bail!("not the service's");
        };
        let work = Work {
            model: name.clone(),
            path: path.clone(),
            measure_only: true,
            request: WireRequest::from(request),
        };
        let result = client
            .work(&serde_json::to_value(work)?, &mut |_| {})
            .await?;
        Ok(serde_json::from_value(result)?)
    }

    /// One generation, each piece of text to `on_piece`; `cancel` stops it (within a step here,
    /// within [`CANCEL_POLL`] through the service).
    pub(crate) async fn generate(
        &self,
        request: &Request,
        cancel: &CancelToken,
        on_piece: Box<dyn FnMut(&str) + Send>,
    ) -> anyhow::Result<Generation> {
        let mut on_piece = on_piece;
        match self {
            LocalRunner::InProcess(model) => {
                let (model, request, cancel) = (Arc::clone(model), request.clone(), cancel.clone());
                Ok(tokio::task::spawn_blocking(move || {
                    model.generate(&request, &cancel, &mut *on_piece)
                })
                .await
                .context("the generation thread failed")??)
            }
            LocalRunner::Service { client, name, path } => {
                let work = serde_json::to_value(Work {
                    model: name.clone(),
                    path: path.clone(),
                    measure_only: false,
                    request: WireRequest::from(request),
                })?;
                let mut text = String::new();
                let mut pieces = 0usize;
                let result = {
                    let mut each = |p: &str| {
                        text.push_str(p);
                        pieces += 1;
                        on_piece(p);
                    };
                    let working = client.work(&work, &mut each);
                    tokio::pin!(working);
                    loop {
                        tokio::select! {
                            r = &mut working => break Some(r),
                            () = tokio::time::sleep(CANCEL_POLL) => {
                                // Dropping the work tells the service to stop it.
                                if cancel.is_cancelled() {
                                    break None;
                                }
                            }
                        }
                    }
                };
                match result {
                    Some(r) => Ok(serde_json::from_value::<WireGeneration>(r?)?.into()),
                    None => Ok(Generation {
                        text,
                        prompt_tokens: 0,
                        completion_tokens: pieces,
                        time_to_first_token: Duration::ZERO,
                        tokens_per_second: 0.0,
                        mean_logprob: None,
                        finish_reason: FinishReason::Cancelled,
                        lora_attach: None,
                        lora_load: None,
                        tokens: Vec::new(),
                    }),
                }
            }
        }
    }
}
