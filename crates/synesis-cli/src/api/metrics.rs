//! What the device's HTTP API counts, served as `/metrics` (Prometheus text format 0.0.4;
//! the same key as every other endpoint but `/health`): requests by endpoint and status,
//! answers by route and outcome, tokens, time to first token, requests being answered.
//!
//! Labels come from closed sets: endpoints this API has (else `other`), routes (`local`,
//! `cloud`), finish reasons and this API's own error codes.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::sync::mpsc;

use super::Api;
use super::pieces::Piece;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Requests {
    path: &'static str,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Answers {
    route: &'static str,
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Tokens {
    route: &'static str,
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Route {
    route: &'static str,
}

/// The API's metrics: atomics, updated from any request's task.
#[derive(Debug)]
pub(crate) struct ApiMetrics {
    registry: Registry,
    requests: Family<Requests, Counter>,
    answers: Family<Answers, Counter>,
    tokens: Family<Tokens, Counter>,
    first_token: Family<Route, Histogram>,
    pub(crate) in_flight: Gauge,
}

impl ApiMetrics {
    pub(crate) fn new() -> Arc<ApiMetrics> {
        let mut registry = Registry::with_prefix("synesis_api");
        let m = ApiMetrics {
            registry: Registry::default(),
            requests: Family::default(),
            answers: Family::default(),
            tokens: Family::default(),
            first_token: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 17))
            }),
            in_flight: Gauge::default(),
        };
        registry.register(
            "requests",
            "HTTP requests answered, by endpoint and status",
            m.requests.clone(),
        );
        registry.register(
            "answers",
            "Chat completions ended, by route (local, cloud) and outcome (a finish reason, an error code, or abandoned by the client)",
            m.answers.clone(),
        );
        registry.register(
            "tokens",
            "Tokens of the chat completions answered, by route and direction (in, out)",
            m.tokens.clone(),
        );
        registry.register_with_unit(
            "time_to_first_token",
            "From a chat completion's arrival to its first text, by route",
            Unit::Seconds,
            m.first_token.clone(),
        );
        registry.register(
            "in_flight",
            "Chat completions being answered now (at most --max-concurrent)",
            m.in_flight.clone(),
        );
        Arc::new(ApiMetrics { registry, ..m })
    }

    /// The metrics, in the Prometheus text format.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }
}

/// The endpoint a path names, as a label.
fn endpoint(path: &str) -> &'static str {
    match path {
        "/health" => "/health",
        "/metrics" => "/metrics",
        "/v1/models" => "/v1/models",
        "/v1/chat/completions" => "/v1/chat/completions",
        _ => "other",
    }
}

/// Counts every request by endpoint and status (outermost: refusals count too).
pub(crate) async fn count_requests(
    State(api): State<Arc<Api>>,
    request: Request,
    next: Next,
) -> Response {
    let path = endpoint(request.uri().path());
    let response = next.run(request).await;
    api.metrics
        .requests
        .get_or_create(&Requests {
            path,
            status: response.status().as_u16(),
        })
        .inc();
    response
}

/// An answer's pieces as the response reads them, counted on the way: the first text's time,
/// then the end (its finish reason and tokens) or the failure. An answer whose reader is
/// dropped before its end (the client left) counts as `abandoned`.
pub(crate) struct Pieces {
    rx: mpsc::Receiver<Piece>,
    metrics: Arc<ApiMetrics>,
    route: &'static str,
    arrived: Instant,
    texts: bool,
    ended: bool,
}

impl Pieces {
    pub(crate) fn new(
        rx: mpsc::Receiver<Piece>,
        metrics: Arc<ApiMetrics>,
        route: &'static str,
        arrived: Instant,
    ) -> Pieces {
        Pieces {
            rx,
            metrics,
            route,
            arrived,
            texts: false,
            ended: false,
        }
    }

    /// The next piece, as `mpsc::Receiver::recv`.
    pub(crate) async fn recv(&mut self) -> Option<Piece> {
        let piece = self.rx.recv().await;
        self.count(piece.as_ref());
        piece
    }

    fn count(&mut self, piece: Option<&Piece>) {
        let route = self.route;
        let outcome = match piece {
            Some(Piece::Text(_) | Piece::ToolCall { .. }) => {
                if !self.texts {
                    self.texts = true;
                    self.metrics
                        .first_token
                        .get_or_create(&Route { route })
                        .observe(self.arrived.elapsed().as_secs_f64());
                }
                return;
            }
            Some(Piece::Routed { .. } | Piece::Logprobs(_)) => return,
            Some(Piece::End(e)) => {
                for (direction, n) in [("in", e.prompt_tokens), ("out", e.completion_tokens)] {
                    self.metrics
                        .tokens
                        .get_or_create(&Tokens { route, direction })
                        .inc_by(n);
                }
                e.finish.openai()
            }
            Some(Piece::Failed(e)) => e.code(),
            None => "ended_without_end",
        };
        self.end(outcome);
    }

    fn end(&mut self, outcome: &'static str) {
        if !self.ended {
            self.ended = true;
            self.metrics
                .answers
                .get_or_create(&Answers {
                    route: self.route,
                    outcome,
                })
                .inc();
        }
    }
}

impl Drop for Pieces {
    fn drop(&mut self) {
        self.end("abandoned");
    }
}
