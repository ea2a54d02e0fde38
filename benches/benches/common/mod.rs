//! What the benches that talk to a cloud share: a cloud in this process and an enrolled
//! device of it (`mod common;` in each).

use std::path::Path;
use std::time::{Duration, Instant};

use synesis_cloud::config::Serving;
use synesis_cloud::endpoint::{CERT_LIFETIME_DEFAULT, Options, start};
use synesis_proto::message::{ChatTurn, EscalationRequest, Preferences, Tier};
use synesis_proto::{FrameLimits, Message, RequestId};
use synesis_tunnel::Identity;
use synesis_wire::FramedRecv;

/// A cloud in this process and a device of the account `bench` (Managed, $1,000). Keep it
/// whole while it is used: dropping it stops the cloud.
pub(crate) struct BenchCloud {
    _cloud: synesis_cloud::endpoint::Cloud,
    _endpoint: quinn::Endpoint,
    /// The device's identity, for a route of the device's own client.
    pub(crate) identity: Identity,
    /// A connection of the device, for a client speaking the protocol itself.
    pub(crate) conn: quinn::Connection,
}

/// Starts a cloud on `dir` serving `serving`'s models (each at $1 in and $2 out per million
/// tokens) and enrolls a device.
pub(crate) async fn cloud_with_device(dir: &Path, serving: Serving) -> BenchCloud {
    let data_dir = dir.join("cloud");
    let mut billing = synesis_cloud::config::Billing::default();
    for name in serving.models.keys() {
        billing.prices.set(
            name,
            synesis_billing::ModelPrice {
                input_per_mtok: synesis_billing::MicroUsd(1_000_000),
                output_per_mtok: synesis_billing::MicroUsd(2_000_000),
            },
        );
    }
    let cloud = start(Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.clone(),
        drain_window: Duration::from_millis(100),
        drain_grace: Duration::from_millis(500),
        billing,
        serving,
        cert_lifetime: CERT_LIFETIME_DEFAULT,
        database: None,
        metrics_listen: None,
        advertise: None,
    })
    .await
    .unwrap();
    let place = synesis_cloud::admin::Place::dir(&data_dir);
    synesis_cloud::admin::account_create(&place, "bench", Tier::Managed, false).unwrap();
    let crediting = place.clone();
    // The operator's credit waits on the ledger writer: off the runtime.
    tokio::task::spawn_blocking(move || {
        synesis_cloud::admin::credit(
            &crediting,
            "bench",
            synesis_proto::MicroUsd(1_000_000_000),
            false,
        )
    })
    .await
    .unwrap()
    .unwrap();
    let token = synesis_cloud::admin::token_issue(
        &place,
        "bench",
        None,
        Duration::from_secs(600),
        Some(cloud.addr().to_string()),
    )
    .unwrap();
    let pending = synesis_tunnel::enroll::PendingEnrollment::begin(&token, "bench").unwrap();
    let identity = synesis_tunnel::enroll::enroll(&token, &pending)
        .await
        .unwrap();
    let config =
        synesis_tunnel::tls::device_client_config(&identity, Duration::from_secs(5)).unwrap();
    let endpoint = synesis_tunnel::connect::client_endpoint(cloud.addr()).unwrap();
    let conn =
        synesis_tunnel::connect::dial(&endpoint, config, cloud.addr(), Duration::from_secs(10))
            .await
            .unwrap();
    BenchCloud {
        _cloud: cloud,
        _endpoint: endpoint,
        identity,
        conn,
    }
}

/// One greedy answer of `model` (with `adapter`) to `turns` on a new stream of `conn`, read to
/// its end: (time to the first chunk, whole time, chunks).
pub(crate) async fn escalate(
    conn: &quinn::Connection,
    model: &str,
    adapter: Option<&str>,
    turns: Vec<ChatTurn>,
    max_tokens: u32,
) -> (Duration, Duration, u64) {
    let request = EscalationRequest {
        request_id: RequestId::try_from_uuid(uuid::Uuid::now_v7()).unwrap(),
        model: model.into(),
        adapter: adapter.map(Into::into),
        context: turns,
        preferences: Preferences {
            max_tokens,
            temperature: 0.0,
            top_p: None,
            seed: None,
            stop: vec![],
            max_cost: None,
        },
        byok_key: None,
        shape: Default::default(),
    };
    let started = Instant::now();
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    synesis_wire::send(&mut tx, &request.into(), FrameLimits::default())
        .await
        .unwrap();
    let mut rx = FramedRecv::new(rx, FrameLimits::default());
    let (mut first, mut chunks) = (None, 0);
    loop {
        match rx.next().await.unwrap() {
            Some(Message::EscalationChunk(_)) => {
                first.get_or_insert_with(|| started.elapsed());
                chunks += 1;
            }
            Some(Message::EscalationDone(_)) => break,
            other => panic!("{other:?}"),
        }
    }
    (first.unwrap_or_default(), started.elapsed(), chunks)
}

/// llama.cpp in the cloud's process on `model`: one sequence, one thread (the benches measure
/// the path around the model, not the model's parallelism).
pub(crate) fn llama_settings(model: &Path) -> synesis_cloud::provider::local::LocalSettings {
    synesis_cloud::provider::local::LocalSettings {
        path: model.to_owned(),
        sequences: 1,
        queue: 4,
        adapters: Default::default(),
        n_ctx: 0,
        threads: 1,
        adapters_loaded: 8,
        pause_while: None,
    }
}
