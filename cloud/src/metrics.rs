//! What a node counts, served as `/metrics` in the Prometheus text format (version 0.0.4), with
//! `/live` and `/ready`, on `serve --metrics-listen ADDR`.
//!
//! Every label's values come from a closed set: outcomes and reasons are this code's own words,
//! and a model is named only when the node serves it (anything a device sends is `other`), so
//! no peer can grow the series without bound.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use crate::shared::Storage;

/// The namespace of every metric a node serves.
const PREFIX: &str = "synesis_cloud";

/// A label set of one label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Outcome {
    pub(crate) outcome: &'static str,
}

/// A model the node serves, or `other`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Model {
    pub(crate) model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModelOutcome {
    pub(crate) model: String,
    pub(crate) outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Tokens {
    pub(crate) model: String,
    /// `in` (the prompt) or `out` (the answer).
    pub(crate) direction: &'static str,
}

/// One of the node's database handles: `writer`, `reader` or `identifier`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct Connection {
    pub(crate) connection: &'static str,
}

/// A finish reason as an escalation's outcome.
pub(crate) fn finish_reason(f: synesis_proto::message::FinishReason) -> &'static str {
    use synesis_proto::message::FinishReason;
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Failed => "failed",
    }
}

/// Seconds, from a millisecond to about a minute.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// The node's metrics. Cheap to update from any task: counters and histograms are atomics.
#[derive(Debug)]
pub(crate) struct Metrics {
    registry: Registry,
    /// Whether the node is draining (not ready: a balancer sends no one new).
    draining: AtomicBool,
    pub(crate) devices_connected: Gauge,
    pub(crate) handshakes: Family<Outcome, Counter>,
    pub(crate) heartbeat_rtt: Histogram,
    pub(crate) escalations: Family<ModelOutcome, Counter>,
    pub(crate) tokens: Family<Tokens, Counter>,
    pub(crate) first_chunk: Family<Model, Histogram>,
    pub(crate) provider_duration: Family<Model, Histogram>,
    pub(crate) provider_errors: Family<ModelOutcome, Counter>,
    pub(crate) ledger_batches: Family<Outcome, Counter>,
    pub(crate) ledger_batch_operations: Histogram,
    pub(crate) uploads: Family<Outcome, Counter>,
    pub(crate) upload_bytes: Counter,
    pub(crate) database_wait: Family<Connection, Histogram>,
}

impl Metrics {
    pub(crate) fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix(PREFIX);
        let m = Metrics {
            draining: AtomicBool::new(false),
            devices_connected: Gauge::default(),
            handshakes: Family::default(),
            heartbeat_rtt: latency(),
            escalations: Family::default(),
            tokens: Family::default(),
            first_chunk: Family::new_with_constructor(latency),
            provider_duration: Family::new_with_constructor(latency),
            provider_errors: Family::default(),
            ledger_batches: Family::default(),
            ledger_batch_operations: Histogram::new(exponential_buckets(1.0, 2.0, 11)),
            uploads: Family::default(),
            upload_bytes: Counter::default(),
            database_wait: Family::new_with_constructor(latency),
            registry: Registry::default(),
        };
        registry.register(
            "devices_connected",
            "Device connections identified and open now",
            m.devices_connected.clone(),
        );
        registry.register(
            "handshakes",
            "Connections at the door, by outcome: device, enrollment, or why refused",
            m.handshakes.clone(),
        );
        registry.register_with_unit(
            "heartbeat_rtt",
            "The QUIC round-trip time of each device heartbeat",
            Unit::Seconds,
            m.heartbeat_rtt.clone(),
        );
        registry.register(
            "escalations",
            "Escalations ended, by model and outcome (a finish reason, replayed, or an error code)",
            m.escalations.clone(),
        );
        registry.register(
            "tokens",
            "Tokens of the escalations settled, by model and direction (in, out)",
            m.tokens.clone(),
        );
        registry.register_with_unit(
            "time_to_first_chunk",
            "From an escalation's arrival to its first chunk of answer",
            Unit::Seconds,
            m.first_chunk.clone(),
        );
        registry.register_with_unit(
            "provider_duration",
            "How long a provider took to answer an escalation, from its start to its end",
            Unit::Seconds,
            m.provider_duration.clone(),
        );
        registry.register(
            "provider_errors",
            "Provider failures, by model and kind (each try counts)",
            m.provider_errors.clone(),
        );
        registry.register(
            "ledger_batches",
            "Ledger transactions (group commits), by outcome: committed or failed",
            m.ledger_batches.clone(),
        );
        registry.register(
            "ledger_batch_operations",
            "Operations per ledger transaction",
            m.ledger_batch_operations.clone(),
        );
        registry.register(
            "uploads",
            "Adapter upload streams ended, by outcome: ended (stored, or left to resume), or an error code",
            m.uploads.clone(),
        );
        registry.register_with_unit(
            "upload",
            "Adapter bytes received and written",
            Unit::Bytes,
            m.upload_bytes.clone(),
        );
        registry.register_with_unit(
            "database_wait",
            "How long a request waited for a database handle, by handle",
            Unit::Seconds,
            m.database_wait.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// Counts a connection at the door by its outcome.
    pub(crate) fn handshake(&self, outcome: &'static str) {
        self.handshakes.get_or_create(&Outcome { outcome }).inc();
    }

    /// Counts a device connection open until the guard is dropped.
    pub(crate) fn connected(self: &Arc<Self>) -> Connected {
        self.devices_connected.inc();
        Connected(Arc::clone(self))
    }

    /// The metrics, in the Prometheus text format.
    pub(crate) fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut text, &self.registry);
        text
    }

    /// From now on the node is draining: `/ready` says so.
    pub(crate) fn set_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// A device connection counted in `devices_connected`, until dropped.
pub(crate) struct Connected(Arc<Metrics>);

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.devices_connected.dec();
    }
}

/// Whether the node can take new devices, and why not.
async fn readiness(metrics: &Metrics, storage: &Storage) -> Result<(), String> {
    if metrics.draining() {
        return Err("draining".into());
    }
    let current =
        tokio::time::timeout(READY_DEADLINE, storage.read(|db| db.schema_current())).await;
    match current {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) => Err("the database's schema is not this build's".into()),
        Ok(Err(e)) => Err(format!("the database does not answer: {e}")),
        Err(_) => Err("the database did not answer in time".into()),
    }
}

/// How long `/ready` waits for the database.
const READY_DEADLINE: Duration = Duration::from_secs(2);

/// Serves `/metrics`, `/live` and `/ready` on `listener` until the task is dropped.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    storage: Storage,
) {
    use axum::http::{StatusCode, header};
    use axum::routing::get;

    let scrape = {
        let metrics = Arc::clone(&metrics);
        move || {
            let metrics = Arc::clone(&metrics);
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    )],
                    metrics.encode(),
                )
            }
        }
    };
    let ready = move || {
        let (metrics, storage) = (Arc::clone(&metrics), storage.clone());
        async move {
            match readiness(&metrics, &storage).await {
                Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
                Err(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {why}\n"),
                ),
            }
        }
    };
    let app = axum::Router::new()
        .route("/metrics", get(scrape))
        .route("/live", get(|| async { "live\n" }))
        .route("/ready", get(ready));
    if let Err(e) = axum::serve(listener, app).await {
        tracing::error!(error = %e, "the metrics listener stopped");
    }
}

/// Binds the metrics listener (before the node serves, so a bad address fails the start).
pub(crate) async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    use anyhow::Context as _;
    tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}"))
}
