//! The device's OpenAI-compatible HTTP API, served by the service (`synesis serve`, or
//! `synesis tunnel run --listen ADDR`): `POST /v1/chat/completions` (streamed as server-sent
//! events or not), `GET /v1/models`, `GET /health`.
//!
//! A request is routed as `synesis ask` routes one ([`crate::commands::ask::decide`]): its
//! `model` names a local model (answered here, by a model the service keeps loaded for
//! `keep_alive`), a cloud model (escalated through the service's connection), or `auto` (the
//! local-first policy chooses). The route, the request id and the cost travel in the headers
//! `x-synesis-route`, `x-synesis-request-id` and `x-synesis-cost-micro-usd` (a streamed answer's
//! cost is known only at its end: it is in its last chunk, `x_synesis.cost_micro_usd`). A client
//! may name the request id itself (`x-synesis-request-id`, a UUIDv7): the cloud then answers a
//! repeated request once, charged once.
//!
//! Bounded: the body ([`ApiOptions::max_body_bytes`]), requests at once (more are refused with
//! 429), each request's time ([`ApiOptions::request_timeout`], 504). A client that goes away
//! cancels its answer: a local generation stops before its next token; an escalation is
//! cancelled on the cloud, which charges what was produced. Errors have OpenAI's shape and
//! status codes. It listens on loopback unless told otherwise, and then only with a bearer key.
//! An enrolled device's API needs its key on loopback too ([`auth`]); connections are bounded
//! before any request on them is read ([`limits`]).

mod anthropic;
pub(crate) mod auth;
pub(crate) mod host;
mod limits;
mod metrics;
mod ollama;
mod openai;
mod pieces;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use synesis_infer::{CancelToken, Model};
use synesis_proto::message::EscalationRequest;
use synesis_proto::{ErrorCode, RequestId};
use synesis_route::{Decision, Mode};
use synesis_tunnel::escalate::{Progress, Route, escalate};
use synesis_tunnel::local::LocalClient;
use synesis_tunnel::{Identity, RequestError};
use tokio::sync::{Semaphore, mpsc, watch};

use synesis_infer::tools::{ToolEvent, ToolParser};

use self::host::ModelHost;
use self::openai::{Posted, Shape};
pub(crate) use self::pieces::ApiError;
use self::pieces::{Ending, Finish, Piece};
use crate::answer::{Gathered, Measured, ModelName, cloud_model_or_ask, fall_back, gather};
use crate::commands::ask::{Decided, decide, record_local};
use crate::commands::escalate::record_cloud;
use crate::paths::Paths;
use crate::registry::Config;
use crate::request::{self, AnswerRequest};

/// Pieces of an answer waiting for their client: a local generation waits when they are
/// this many; a cloud answer (a piece per token at most) fills them only for a client that
/// reads nothing, and is then cancelled.
pub(crate) const PIECES_MAX: usize = request::MAX_TOKENS_MAX as usize + 4;

/// The most texts one embeddings request may hold (OpenAI's limit).
const EMBED_INPUTS_MAX: usize = 2048;

/// Where `synesis serve` listens unless told otherwise (Ollama's port, plus one).
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:11435";

/// How the API is bounded and who may use it.
#[derive(Debug, Clone)]
pub(crate) struct ApiOptions {
    /// A bearer key every request but `/health` must carry (`Authorization: Bearer KEY`).
    pub(crate) api_key: Option<String>,
    /// Always, or only once the device is in an account ([`auth`]).
    pub(crate) key_required: auth::KeyRequired,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_concurrent: usize,
    pub(crate) request_timeout: Duration,
    /// Listening on loopback only: then requests must name a loopback host (`Host`), which
    /// keeps out web pages that rebind a name of theirs to 127.0.0.1.
    pub(crate) loopback_only: bool,
}

/// What the handlers share.
pub(crate) struct Api {
    paths: Paths,
    /// `config.toml`: replaced when the service reloads it, or when `/api/pull` registers a
    /// model.
    config: Arc<watch::Sender<Config>>,
    /// Held by the one pull at a time (`/api/pull`).
    pub(crate) pulling: tokio::sync::Mutex<()>,
    host: Arc<ModelHost>,
    options: ApiOptions,
    permits: Arc<Semaphore>,
    /// Kept for the service's life, so a request reads the device's stress without waiting.
    stress: Arc<crate::answer::StressGauge>,
    /// What it counts (`/metrics`).
    metrics: Arc<metrics::ApiMetrics>,
}

impl Api {
    pub(crate) fn new(
        paths: Paths,
        config: Arc<watch::Sender<Config>>,
        host: Arc<ModelHost>,
        options: ApiOptions,
    ) -> Arc<Api> {
        let stress = crate::answer::StressGauge::new(&paths);
        stress.warm(&config.borrow());
        Arc::new(Api {
            paths,
            config,
            host,
            pulling: tokio::sync::Mutex::new(()),
            permits: Arc::new(Semaphore::new(options.max_concurrent)),
            options,
            stress,
            metrics: metrics::ApiMetrics::new(),
        })
    }
}

/// Refuses an address off this machine unless `allow_remote` and a key (the API spends the
/// account's money).
pub(crate) fn check_listen(
    addr: SocketAddr,
    allow_remote: bool,
    api_key: Option<&str>,
) -> Result<(), String> {
    if addr.ip().is_loopback() {
        return Ok(());
    }
    if !allow_remote {
        return Err(format!(
            "{addr} is reachable from other machines; pass --allow-remote (with an API key) to serve there"
        ));
    }
    if api_key.is_none_or(str::is_empty) {
        return Err(format!(
            "serving on {addr} needs an API key: set SYNESIS_API_KEY or pass --api-key-file"
        ));
    }
    Ok(())
}

pub(crate) fn router(api: Arc<Api>) -> Router {
    let max_body = api.options.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/embeddings", post(embeddings))
        .route("/v1/messages", post(anthropic::messages))
        .route("/api/chat", post(ollama::chat))
        .route("/api/generate", post(ollama::generate))
        .route("/api/embed", post(ollama::embed))
        .route("/api/tags", get(ollama::tags))
        .route("/api/show", post(ollama::show))
        .route("/api/ps", get(ollama::ps))
        .route("/api/version", get(ollama::version))
        .route("/api/pull", post(ollama::pull))
        .route("/metrics", get(scrape))
        .fallback(|| async {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                "no such endpoint; README.md lists this server's (OpenAI's /v1/…, Ollama's /api/…, Anthropic's /v1/messages, /metrics, /health)",
            )
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                "this endpoint does not take that method",
            )
        })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&api),
            auth::authorize,
        ))
        // Outermost: a web page is refused before its key is even looked at.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&api),
            same_machine,
        ))
        .layer(DefaultBodyLimit::max(max_body))
        // Outermost of all: every request is counted, refusals too.
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&api),
            metrics::count_requests,
        ))
        .with_state(api)
}

/// `/metrics`: what this API counted, in the Prometheus text format.
async fn scrape(State(api): State<Arc<Api>>) -> Response {
    let busy = api
        .options
        .max_concurrent
        .saturating_sub(api.permits.available_permits());
    api.metrics
        .in_flight
        .set(i64::try_from(busy).unwrap_or(i64::MAX));
    let mut response = Response::new(Body::from(api.metrics.encode()));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(prometheus_client::encoding::prometheus_text::CONTENT_TYPE),
    );
    response
}

/// Serves until `stop` completes; requests being answered finish first. Each connection is
/// bounded before any request on it is looked at ([`limits`]).
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    api: Arc<Api>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    limits::serve(listener, router(api), stop).await
}

/// Keeps web pages out: a browser tells the page's origin (`Origin`) on a cross-site request,
/// and names the host it resolved (`Host`), so a page on another site — or one that rebinds its
/// own name to 127.0.0.1 — is refused before anything is read or spent. Programs send no
/// `Origin`, and a loopback `Host`.
async fn same_machine(State(api): State<Arc<Api>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let origin_ok = headers
        .get(header::ORIGIN)
        .is_none_or(|o| o.to_str().is_ok_and(loopback_origin));
    let host_ok = !api.options.loopback_only
        || headers
            .get(header::HOST)
            .is_some_and(|h| h.to_str().is_ok_and(loopback_host));
    if origin_ok && host_ok {
        return next.run(request).await;
    }
    ApiError::new(
        StatusCode::FORBIDDEN,
        "invalid_request_error",
        "forbidden_origin",
        "requests from web pages, or naming another host, are refused (this API serves programs on this machine)",
    )
    .into_response()
}

/// `127.0.0.1`, `localhost` or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// An origin on this machine: `http://localhost:3000`, `http://127.0.0.1`, …
fn loopback_origin(origin: &str) -> bool {
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| !rest.contains('/') && loopback_host(rest))
}

async fn health(State(api): State<Arc<Api>>) -> Response {
    let tunnel = LocalClient::new(&api.paths.runtime.path)
        .status()
        .await
        .ok();
    axum::Json(serde_json::json!({
        "status": "ok",
        "models_loaded": api.host.names().await,
        "tunnel": tunnel.map(|s| s.state),
    }))
    .into_response()
}

/// The models this account may use: this device's (by name), `auto`, and those the cloud serves
/// to the account (`cloud/NAME` where a local model has the same name; a bare name reaches the
/// local one). The cloud's come from the service's facts, else from asking it (a cloud that
/// does not answer soon leaves them out).
async fn models(State(api): State<Arc<Api>>) -> Response {
    let config = api.config.borrow().clone();
    let mut data: Vec<serde_json::Value> = config
        .models
        .keys()
        .map(|name| openai::model_entry(name, "synesis-local"))
        .collect();
    data.push(openai::model_entry("auto", "synesis"));
    if let Some(me) = enrolled(&api.paths) {
        let served = match crate::answer::load_facts(&api.paths, me.info.device_id) {
            Some(facts) => Some(facts.served),
            None => {
                let asked = synesis_proto::message::PriceRequest {
                    request_id: synesis_tunnel::clock::new_request_id(),
                };
                let reply = tokio::time::timeout(
                    Duration::from_secs(3),
                    crate::commands::cloud::account_request(&api.paths, asked.into()),
                )
                .await;
                match reply {
                    Ok(Ok(synesis_proto::Message::PriceReply(p))) => Some(p.served),
                    other => {
                        tracing::info!("the cloud's models are left out: {other:?}");
                        None
                    }
                }
            }
        };
        if let Some(served) = served {
            let names =
                crate::answer::cloud_names(served.iter().map(|m| m.model.as_str()), &config);
            data.extend(
                names
                    .iter()
                    .map(|n| openai::model_entry(n, "synesis-cloud")),
            );
        }
    }
    axum::Json(serde_json::json!({"object": "list", "data": data})).into_response()
}

fn enrolled(paths: &Paths) -> Option<Identity> {
    paths
        .identity_home()
        .ok()
        .and_then(|home| Identity::load(&home).ok().flatten())
}

/// A request answered on this device.
struct LocalTarget {
    request_id: RequestId,
    name: String,
    model: Arc<Model>,
    request: synesis_infer::Request,
    /// Take tool calls out of the text.
    tools: bool,
    /// A whole answer the policy's confidence probe already made.
    first: Option<synesis_infer::Generation>,
    reason: String,
    /// Why the cloud, chosen first, did not answer (`x-synesis-fallback`).
    fallback: Option<String>,
}

/// Where one request goes, decided.
enum Target {
    Local(LocalTarget),
    Cloud {
        identity: Identity,
        request: EscalationRequest,
        reason: String,
        /// Where the answer is made when the cloud fails before any output (`auto` only).
        fallback: Option<Box<LocalTarget>>,
    },
}

/// Runs a handler's work; its error in OpenAI's shape.
fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(openai_answer(&api, &headers, body, Shape::Chat).await)
}

/// `/v1/completions`: the prompt as it is, without the chat template.
async fn completions(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(openai_answer(&api, &headers, body, Shape::Completion).await)
}

/// A chat completion or a completion, whole or streamed.
async fn openai_answer(
    api: &Arc<Api>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    shape: Shape,
) -> Result<Response, ApiError> {
    let body = checked_body(api, headers, body)?;
    let (ask, (stream, include_usage)) = match shape {
        Shape::Chat => {
            let chat = openai::ChatRequest::read(&body)?;
            (chat.answer_request()?, chat.sampling.streaming())
        }
        Shape::Completion => {
            let completion = openai::CompletionRequest::read(&body)?;
            (
                completion.answer_request()?,
                completion.sampling.streaming(),
            )
        }
    };
    let started = start(api, headers, ask).await?;
    let (info, first, rx) = started.parts();
    let meta = info.openai_meta(match shape {
        Shape::Chat => "chatcmpl",
        Shape::Completion => "cmpl",
    });
    let response = if stream {
        openai::streamed(meta, shape, first, rx, include_usage)
    } else {
        openai::collected(meta, shape, first, rx).await?
    };
    Ok(info.label(response))
}

/// `/v1/embeddings`: vectors from a local model.
async fn embeddings(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    respond(
        async {
            let body = checked_body(&api, &headers, body)?;
            let request = openai::EmbeddingRequest::read(&body)?.checked()?;
            let (name, made) = embed(&api, &request.model, request.texts()).await?;
            Ok(json_response(&request.response(&name, &made)?))
        }
        .await,
    )
}

/// `texts` as vectors, by the local model `model` names (`auto`: the default one).
pub(crate) async fn embed(
    api: &Arc<Api>,
    model: &str,
    texts: Vec<String>,
) -> Result<(String, synesis_infer::Embeddings), ApiError> {
    let (name, model) = local_model(api, model).await?;
    let Ok(permit) = Arc::clone(&api.permits).try_acquire_owned() else {
        return Err(busy(api));
    };
    if texts.len() > EMBED_INPUTS_MAX {
        return Err(ApiError::invalid(format!(
            "at most {EMBED_INPUTS_MAX} texts a request"
        )));
    }
    // Within the request's time, as an answer is: stopped between texts past it.
    let cancel = CancelToken::default();
    let stop = cancel.clone();
    // The place is held by the work, until it stops (past the time, between two texts).
    let work = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        model.embed(&texts, &stop)
    });
    let timeout = api.options.request_timeout;
    let made = match tokio::time::timeout(timeout, work).await {
        Ok(done) => done.map_err(|e| ApiError::internal(e.to_string()))?,
        Err(_) => {
            cancel.cancel();
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "server_error",
                "timeout",
                format!(
                    "the embeddings took longer than {}",
                    humantime::format_duration(timeout)
                ),
            ));
        }
    };
    Ok((name, made.map_err(|e| ApiError::invalid(e.to_string()))?))
}

/// The local model a request names, loaded: by name, or the default one for `auto`.
pub(crate) async fn local_model(
    api: &Arc<Api>,
    named: &str,
) -> Result<(String, Arc<Model>), ApiError> {
    let config = api.config.borrow().clone();
    let found = match ModelName::parse(named) {
        ModelName::Auto => config
            .model(None)
            .ok()
            .map(|(n, e)| (n.to_owned(), e.clone())),
        ModelName::Local(name) | ModelName::Either(name) => config
            .models
            .get(name)
            .map(|e| (name.to_owned(), e.clone())),
        ModelName::Cloud(_) => None,
    };
    let Some((name, entry)) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            format!("no local model {named:?} here (`synesis model list` shows them)"),
        ));
    };
    let (model, _) = api
        .host
        .get(&name, &entry.path)
        .await
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    Ok((name, model))
}

fn busy(api: &Api) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limit_error",
        "rate_limit_exceeded",
        format!(
            "{} requests are being answered; try again shortly",
            api.options.max_concurrent
        ),
    )
}

/// A JSON response of `value`.
pub(crate) fn json_response(value: &serde_json::Value) -> Response {
    let mut response = Response::new(json_body(value));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The body of a request that posts JSON: refused when it is another type, or too large.
pub(crate) fn checked_body(
    api: &Api,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, ApiError> {
    // JSON only: a browser page can POST a "simple" text/plain body to loopback without asking
    // first, never an application/json one.
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "invalid_request_error",
            "unsupported_media_type",
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!(
                    "the body is larger than this server takes ({} bytes)",
                    api.options.max_body_bytes
                ),
            )
        } else {
            ApiError::invalid(e.body_text())
        }
    })
}

/// An answer under way: where it went, its first piece, and the rest to come.
pub(crate) struct Started {
    info: Routed,
    first: Piece,
    rx: metrics::Pieces,
}

impl Started {
    pub(crate) fn parts(self) -> (Routed, Piece, metrics::Pieces) {
        (self.info, self.first, self.rx)
    }
}

/// Where an answer went, as every API's response tells it in headers.
pub(crate) struct Routed {
    pub(crate) request_id: RequestId,
    pub(crate) route: &'static str,
    pub(crate) model: String,
    reason: String,
    fallback: Option<String>,
}

impl Routed {
    pub(crate) fn openai_meta(&self, prefix: &str) -> openai::Meta {
        openai::Meta {
            id: format!("{prefix}-{}", self.request_id),
            created: synesis_tunnel::clock::unix_now().0 / 1_000,
            model: self.model.clone(),
            route: self.route,
            request_id: self.request_id,
        }
    }

    /// `response` with the route, its reason, a fallback's cause and the request id in headers.
    pub(crate) fn label(&self, mut response: Response) -> Response {
        let h = response.headers_mut();
        h.insert("x-synesis-route", HeaderValue::from_static(self.route));
        if let Ok(v) = HeaderValue::from_str(&self.reason) {
            h.insert("x-synesis-route-reason", v);
        }
        // Why the cloud did not answer an `auto` request it was chosen for (visible ASCII only).
        if let Some(why) = &self.fallback {
            let why: String = why
                .chars()
                .map(|c| {
                    if c.is_ascii_graphic() || c == ' ' {
                        c
                    } else {
                        '?'
                    }
                })
                .take(512)
                .collect();
            if let Ok(v) = HeaderValue::from_str(&why) {
                h.insert("x-synesis-fallback", v);
            }
        }
        if let Ok(v) = HeaderValue::from_str(&self.request_id.to_string()) {
            h.insert("x-synesis-request-id", v);
        }
        response
    }
}

/// Starts answering `ask`, whatever API it came through: routes it, and waits for where it
/// went and its first piece (a refusal before any output keeps its own status).
pub(crate) async fn start(
    api: &Arc<Api>,
    headers: &HeaderMap,
    ask: AnswerRequest,
) -> Result<Started, ApiError> {
    let arrived = std::time::Instant::now();
    let request_id = match headers.get("x-synesis-request-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<RequestId>().ok())
            .ok_or_else(|| ApiError::invalid("x-synesis-request-id must be a UUIDv7"))?,
        None => synesis_tunnel::clock::new_request_id(),
    };
    // The place is held by the work, not by this handler: a client that leaves while its
    // request is routed (a model loading, a confidence probe) frees it only when that work ends.
    let Ok(permit) = Arc::clone(&api.permits).try_acquire_owned() else {
        return Err(busy(api));
    };
    let (tx, mut rx) = mpsc::channel(PIECES_MAX);
    let producer = Producer {
        api: Arc::clone(api),
        tx,
        timeout: api.options.request_timeout,
        _permit: permit,
    };
    tokio::spawn(producer.run(ask, request_id));
    let (route, model, reason, fallback) = match rx.recv().await {
        Some(Piece::Routed {
            route,
            model,
            reason,
            fallback,
        }) => (route, model, reason, fallback),
        Some(Piece::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the request ended before it was routed")),
    };
    let mut rx = metrics::Pieces::new(rx, Arc::clone(&api.metrics), route, arrived);
    let first = match rx.recv().await {
        Some(Piece::Failed(e)) => return Err(e),
        Some(piece) => piece,
        None => return Err(ApiError::internal("the answer ended before it began")),
    };
    Ok(Started {
        info: Routed {
            request_id,
            route,
            model,
            reason,
            fallback,
        },
        first,
        rx,
    })
}

/// Decides where the request goes: the model it names, or the local-first policy for `auto`.
///
/// A request for what only this device's models do yet ([`AnswerRequest::device_only`]) is
/// answered here under `auto`, and refused for a cloud model by name.
async fn route(
    api: &Arc<Api>,
    ask: &AnswerRequest,
    request_id: RequestId,
) -> Result<Target, ApiError> {
    let config = api.config.borrow().clone();
    let is_enrolled = enrolled(&api.paths).is_some();
    let named = ModelName::parse(&ask.model);
    let device_only = ask.device_only();
    let (mode, local, cloud_name) = match named {
        ModelName::Auto => {
            let local = config
                .model(None)
                .ok()
                .map(|(n, e)| (n.to_owned(), e.clone()));
            match device_only {
                Some(what) if local.is_none() => return Err(request::cloud_cannot(what)),
                Some(_) => (Mode::Local, local, None),
                None => (Mode::Auto, local, None),
            }
        }
        ModelName::Cloud(_) | ModelName::Either(_) if is_enrolled && device_only.is_some() => {
            if let ModelName::Either(name) = named
                && config.models.contains_key(name)
            {
                let entry = config.models[name].clone();
                (Mode::Local, Some((name.to_owned(), entry)), None)
            } else {
                return Err(request::cloud_cannot(device_only.unwrap_or_default()));
            }
        }
        ModelName::Local(name) if config.models.contains_key(name) => {
            let entry = config.models[name].clone();
            (Mode::Local, Some((name.to_owned(), entry)), None)
        }
        ModelName::Cloud(name) if is_enrolled => (Mode::Cloud, None, Some(name)),
        ModelName::Either(name) if config.models.contains_key(name) => {
            let entry = config.models[name].clone();
            (Mode::Local, Some((name.to_owned(), entry)), None)
        }
        ModelName::Either(name) if is_enrolled => (Mode::Cloud, None, Some(name)),
        _ => {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                format!(
                    "no model {:?} here: `/v1/models` lists those this device and its cloud serve",
                    ask.model
                ),
            ));
        }
    };
    let max_tokens = ask.max_tokens;
    // Off the runtime's threads: a grammar is built from the request's schemas.
    let local_request = {
        let ask = ask.clone();
        tokio::task::spawn_blocking(move || ask.local_request())
            .await
            .map_err(|e| ApiError::internal(e.to_string()))??
    };
    // Calls are taken out of the text only when the model may make them.
    let tools = ask.tool_choice.is_some();
    let loaded = match &local {
        Some((name, entry)) => {
            let (model, _) = api
                .host
                .get(name, &entry.path)
                .await
                .map_err(|e| ApiError::internal(format!("{e:#}")))?;
            let counting = (Arc::clone(&model), local_request.clone());
            let tokens = tokio::task::spawn_blocking(move || counting.0.prompt_tokens(&counting.1))
                .await
                .map_err(|e| ApiError::internal(e.to_string()))?
                .map_err(|e| ApiError::invalid(e.to_string()))?;
            Some((model, tokens as u64))
        }
        None => None,
    };
    let thresholds = config
        .escalation
        .thresholds()
        .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let runner = loaded
        .as_ref()
        .map(|(m, _)| crate::hosted::LocalRunner::InProcess(Arc::clone(m)));
    // What the policy reads, gathered as `synesis ask` gathers it.
    let Gathered {
        inputs,
        identity,
        cloud_model,
    } = gather(
        &api.paths,
        &config,
        &api.stress,
        mode,
        loaded.as_ref().map(|(m, n)| Measured {
            context_tokens: m.info().context_length,
            prompt_tokens: *n,
        }),
        max_tokens,
        cloud_name,
    )
    .await
    .map_err(|e| ApiError::internal(format!("{e:#}")))?;
    let Decided { route, first, .. } = decide(inputs, &thresholds, runner.as_ref(), &local_request)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_route",
                format!("{e:#}"),
            )
        })?;
    let reason = route
        .reasons
        .first()
        .map_or("auto", synesis_route::Reason::code)
        .to_owned();
    // Where the cloud fails before any output, `auto` answers here (as `synesis ask` does).
    let local_target = |fallback: Option<String>| match (&loaded, &local) {
        (Some((model, _)), Some((name, _))) => Some(LocalTarget {
            request_id,
            name: name.clone(),
            model: Arc::clone(model),
            request: local_request.clone(),
            tools,
            first: first.clone(),
            reason: reason.clone(),
            fallback,
        }),
        _ => None,
    };
    match (route.decision, identity) {
        (Decision::Local, _) => local_target(None).map(Target::Local).ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                "no_route",
                "no local model can answer",
            )
        }),
        (Decision::Cloud, Some(identity)) => {
            let model = match cloud_model {
                Some(model) => model,
                None => match cloud_model_or_ask(&api.paths, &identity, None, &config).await {
                    Ok(model) => model,
                    Err(e) => {
                        let why = format!("the cloud could not be asked ({e:#})");
                        return match local_target(Some(why.clone())) {
                            Some(local) if mode == Mode::Auto => Ok(Target::Local(local)),
                            _ => Err(ApiError::new(
                                StatusCode::SERVICE_UNAVAILABLE,
                                "server_error",
                                "no_cloud_model",
                                why,
                            )),
                        };
                    }
                },
            };
            let request = ask.escalation(request_id, model)?;
            Ok(Target::Cloud {
                identity,
                request,
                reason: if mode == Mode::Cloud {
                    "forced_cloud".into()
                } else {
                    reason.clone()
                },
                fallback: if mode == Mode::Auto {
                    local_target(None).map(Box::new)
                } else {
                    None
                },
            })
        }
        _ => Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "no_route",
            "neither this device nor the cloud can answer now",
        )),
    }
}

/// Makes the answer and hands it over piece by piece; stops (and cancels the work) when the
/// receiving side is gone or the request's time is up.
struct Producer {
    api: Arc<Api>,
    tx: mpsc::Sender<Piece>,
    timeout: Duration,
    /// The request's place among those answered at once, until the answer is made.
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Producer {
    /// Routes the request (within its time), says where it went, then answers it.
    async fn run(self, ask: AnswerRequest, request_id: RequestId) {
        let routed = tokio::time::timeout(self.timeout, route(&self.api, &ask, request_id)).await;
        let target = match routed {
            Ok(Ok(target)) => target,
            Ok(Err(e)) => {
                self.finish(Piece::Failed(e)).await;
                return;
            }
            Err(_) => {
                let timed_out = self.timed_out();
                self.finish(timed_out).await;
                return;
            }
        };
        match target {
            Target::Local(local) => self.local(local).await,
            Target::Cloud {
                identity,
                request,
                reason,
                fallback,
            } => self.cloud(identity, request, reason, fallback).await,
        }
    }

    /// Hands over the answer's last piece once its work is done: the request's place among
    /// those answered at once is given back first, so a client that sends its next request as
    /// it hears the end finds the place free (the work held it past the end, writing the
    /// ledger, and such a client met a 429 with `--max-concurrent 1`).
    async fn finish(self, last: Piece) {
        let tx = self.tx.clone();
        drop(self);
        let _ = tx.send(last).await;
    }

    fn timed_out(&self) -> Piece {
        Piece::Failed(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "server_error",
            "timeout",
            format!(
                "the answer took longer than {}",
                humantime::format_duration(self.timeout)
            ),
        ))
    }

    async fn local(self, target: LocalTarget) {
        let LocalTarget {
            request_id,
            name,
            model,
            request,
            tools,
            first,
            reason,
            fallback,
        } = target;
        let logprobs = request.logprobs.is_some();
        let mut pieces = Pieces::new(request_id, tools);
        let routed = Piece::Routed {
            route: "local",
            model: name.clone(),
            reason: reason.clone(),
            fallback,
        };
        if self.tx.send(routed).await.is_err() {
            return; // the client left
        }
        let (generation, calls) = match first {
            Some(made) => {
                let mut made_pieces = pieces.text(&made.text);
                made_pieces.extend(pieces.finish());
                for piece in made_pieces {
                    let _ = self.tx.send(piece).await;
                }
                (made, pieces.calls)
            }
            None => {
                let cancel = CancelToken::default();
                // A client gone before the first token stops the work too.
                let watcher = {
                    let (tx, cancel) = (self.tx.clone(), cancel.clone());
                    tokio::spawn(async move {
                        tx.closed().await;
                        cancel.cancel();
                    })
                };
                let (tx, worker_cancel) = (self.tx.clone(), cancel.clone());
                let mut work = tokio::task::spawn_blocking(move || {
                    // Waits while the client is slower than the model (back-pressure).
                    let send = |piece| {
                        if tx.blocking_send(piece).is_err() {
                            worker_cancel.cancel();
                        }
                    };
                    let made = model.generate(&request, &worker_cancel, &mut |text| {
                        pieces.text(text).into_iter().for_each(send);
                    });
                    pieces.finish().into_iter().for_each(send);
                    made.map(|g| (g, pieces.calls))
                });
                let done = tokio::select! {
                    done = &mut work => done,
                    () = tokio::time::sleep(self.timeout) => {
                        cancel.cancel();
                        let _ = self.tx.send(self.timed_out()).await;
                        let _ = work.await;
                        watcher.abort();
                        return;
                    }
                };
                watcher.abort();
                match done {
                    Ok(Ok(made)) => made,
                    Ok(Err(e)) => {
                        let failed = Piece::Failed(ApiError::invalid(e.to_string()));
                        self.finish(failed).await;
                        return;
                    }
                    Err(e) => {
                        let failed = Piece::Failed(ApiError::internal(e.to_string()));
                        self.finish(failed).await;
                        return;
                    }
                }
            }
        };
        if logprobs {
            let _ = self
                .tx
                .send(Piece::Logprobs(generation.tokens.clone()))
                .await;
        }
        let ending = Piece::End(Ending {
            finish: match generation.finish_reason {
                _ if calls > 0 => Finish::ToolCalls,
                synesis_infer::FinishReason::Length => Finish::Length,
                _ => Finish::Stop,
            },
            prompt_tokens: generation.prompt_tokens as u64,
            completion_tokens: generation.completion_tokens as u64,
            cost_micro_usd: 0,
        });
        // In the ledger before the client has the end.
        if generation.finish_reason != synesis_infer::FinishReason::Cancelled
            && let Err(e) =
                record_local(&self.api.paths, request_id, &name, &generation, reason).await
        {
            tracing::warn!("this answer is not in the local ledger: {e:#}");
        }
        self.finish(ending).await;
    }

    async fn cloud(
        self,
        identity: Identity,
        request: EscalationRequest,
        reason: String,
        fallback: Option<Box<LocalTarget>>,
    ) {
        let mut route = Route::choose(
            LocalClient::new(&self.api.paths.runtime.path),
            identity.clone(),
        )
        .await;
        let (cancel_tx, cancel) = watch::channel(false);
        // Said with the first output: until then the answer may still be made here.
        let routed = || Piece::Routed {
            route: "cloud",
            model: request.model.clone(),
            reason: reason.clone(),
            fallback: None,
        };
        let mut shown = false;
        // The cloud writes tool calls into the text, as a local model does (PROTOCOL.md §2).
        let callable = request.shape.tool_choice != synesis_proto::message::ToolChoice::None;
        let mut pieces = Pieces::new(request.request_id, callable);
        let result = {
            let tx = &self.tx;
            let pieces = &mut pieces;
            let mut on = |p: Progress<'_>| {
                if let Progress::Text(text) = p {
                    if !shown {
                        shown = true;
                        if tx.try_send(routed()).is_err() {
                            let _ = cancel_tx.send(true);
                        }
                    }
                    // Full only for a client that reads nothing while the cloud streams
                    // `PIECES_MAX` pieces: it is treated as gone.
                    for piece in pieces.text(text) {
                        if tx.try_send(piece).is_err() {
                            let _ = cancel_tx.send(true);
                        }
                    }
                }
            };
            let work = escalate(&mut route, &request, cancel, &mut on);
            tokio::pin!(work);
            let deadline = tokio::time::sleep(self.timeout);
            tokio::pin!(deadline);
            let mut timed_out = false;
            loop {
                tokio::select! {
                    r = &mut work => break r,
                    // The client went away: the cloud stops and charges what it produced.
                    () = tx.closed(), if !*cancel_tx.borrow() => {
                        let _ = cancel_tx.send(true);
                    }
                    () = &mut deadline, if !timed_out => {
                        timed_out = true;
                        let _ = cancel_tx.send(true);
                        let _ = tx.try_send(self.timed_out());
                    }
                }
            }
        };
        route.close().await;
        if !shown && result.is_ok() && self.tx.send(routed()).await.is_err() {
            return; // the client left
        }
        match result {
            Ok(done) => {
                let d = &done.done;
                for piece in pieces.finish() {
                    let _ = self.tx.send(piece).await;
                }
                if request.shape.logprobs.is_some() {
                    let tokens = d
                        .logprobs
                        .iter()
                        .map(|t| synesis_infer::TokenLogprob {
                            bytes: t.bytes.0.clone(),
                            logprob: f64::from(t.logprob),
                            top: t
                                .top
                                .iter()
                                .map(|a| (a.bytes.0.clone(), f64::from(a.logprob)))
                                .collect(),
                        })
                        .collect();
                    let _ = self.tx.send(Piece::Logprobs(tokens)).await;
                }
                use synesis_proto::message::FinishReason as Done;
                let ending = match d.finish_reason {
                    Done::Stop | Done::Length => Piece::End(Ending {
                        finish: match d.finish_reason {
                            _ if pieces.calls > 0 => Finish::ToolCalls,
                            Done::Length => Finish::Length,
                            _ => Finish::Stop,
                        },
                        prompt_tokens: d.usage.input_tokens,
                        completion_tokens: d.usage.output_tokens,
                        cost_micro_usd: d.cost.total.0,
                    }),
                    // Not a whole answer, whatever was streamed: never a `stop`.
                    Done::Failed => Piece::Failed(ApiError::new(
                        StatusCode::BAD_GATEWAY,
                        "server_error",
                        "upstream_failed",
                        "the cloud's model failed partway through the answer (what it made is charged)",
                    )),
                    Done::Cancelled => Piece::Failed(ApiError::new(
                        StatusCode::CONFLICT,
                        "invalid_request_error",
                        "request_cancelled",
                        format!(
                            "request {} was cancelled; send it again with a new x-synesis-request-id",
                            d.request_id
                        ),
                    )),
                };
                // In the ledger before the client has the end, as an answer made here.
                let device = identity.info.device_id;
                let recorded = record_cloud(&self.api.paths, d, &request.model, device, reason);
                if let Err(e) = recorded.await {
                    tracing::warn!("this charge is not in the local ledger: {e:#}");
                }
                self.finish(ending).await;
            }
            Err(e) => {
                let fell_back = if shown {
                    None
                } else {
                    fallback.and_then(|local| {
                        fall_back(Mode::Auto, true, &e).map(|why| LocalTarget {
                            fallback: Some(why),
                            ..*local
                        })
                    })
                };
                match fell_back {
                    Some(local) => {
                        tracing::info!(error = %e, "the cloud could not answer; answering here");
                        self.local(local).await;
                    }
                    None => self.finish(Piece::Failed(cloud_error(&e))).await,
                }
            }
        }
    }
}

/// A local answer's text as pieces: tool calls taken out when the request has tools.
struct Pieces {
    request_id: RequestId,
    parser: Option<ToolParser>,
    calls: usize,
}

impl Pieces {
    fn new(request_id: RequestId, tools: bool) -> Pieces {
        Pieces {
            request_id,
            parser: tools.then(ToolParser::new),
            calls: 0,
        }
    }

    fn text(&mut self, text: &str) -> Vec<Piece> {
        match &mut self.parser {
            None => vec![Piece::Text(text.to_owned())],
            Some(parser) => {
                let events = parser.push(text);
                self.pieces(events)
            }
        }
    }

    fn finish(&mut self) -> Vec<Piece> {
        match &mut self.parser {
            None => Vec::new(),
            Some(parser) => {
                let events = parser.finish();
                self.pieces(events)
            }
        }
    }

    fn pieces(&mut self, events: Vec<ToolEvent>) -> Vec<Piece> {
        events
            .into_iter()
            .filter_map(|e| match e {
                ToolEvent::Text(t) if t.is_empty() => None,
                ToolEvent::Text(t) => Some(Piece::Text(t)),
                ToolEvent::Call { name, arguments } => {
                    self.calls += 1;
                    Some(Piece::ToolCall {
                        id: format!("call_{}_{}", self.request_id, self.calls),
                        name,
                        arguments,
                    })
                }
            })
            .collect()
    }
}

/// A refusal or failure of the cloud, as OpenAI's errors say it.
fn cloud_error(e: &RequestError) -> ApiError {
    let (status, kind, code) = match e {
        RequestError::Refused { code, .. } => match *code {
            ErrorCode::INSUFFICIENT_FUNDS | ErrorCode::QUOTA_EXCEEDED => (
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                "insufficient_quota",
            ),
            ErrorCode::LIMIT_EXCEEDED | ErrorCode::BUSY => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "rate_limit_exceeded",
            ),
            ErrorCode::FORBIDDEN | ErrorCode::MODEL_NOT_ALLOWED => {
                (StatusCode::FORBIDDEN, "permission_error", "forbidden")
            }
            ErrorCode::NOT_FOUND | ErrorCode::UNKNOWN_MODEL => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            ErrorCode::INVALID_REQUEST => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_request",
            ),
            ErrorCode::IDEMPOTENCY_CONFLICT => (
                StatusCode::CONFLICT,
                "invalid_request_error",
                "idempotency_conflict",
            ),
            _ => (StatusCode::BAD_GATEWAY, "server_error", "cloud_error"),
        },
        _ => (
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "cloud_unreachable",
        ),
    };
    ApiError::new(status, kind, code, e.to_string())
}

/// The body of a response made of text, for `wire`.
pub(crate) fn json_body(value: &serde_json::Value) -> Body {
    Body::from(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_machines_hosts_and_origins_pass() {
        for host in [
            "127.0.0.1:11435",
            "localhost",
            "LOCALHOST:1",
            "[::1]:11435",
            "127.0.0.2",
        ] {
            assert!(loopback_host(host), "{host}");
        }
        for host in [
            "evil.example:11435",
            "127.0.0.1.evil.example",
            "[::2]:1",
            "",
            "0.0.0.0",
        ] {
            assert!(!loopback_host(host), "{host}");
        }
        assert!(loopback_origin("http://localhost:3000"));
        assert!(loopback_origin("http://127.0.0.1"));
        for origin in [
            "https://evil.example",
            "null",
            "http://localhost.evil.example",
            "http://127.0.0.1/x",
        ] {
            assert!(!loopback_origin(origin), "{origin}");
        }
    }
}
