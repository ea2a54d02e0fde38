//! What the benches that talk to a cloud share: a cloud in this process and an enrolled
//! device of it (`mod common;` in each).

use std::path::Path;
use std::time::Duration;

use synesis_cloud::config::Serving;
use synesis_cloud::endpoint::{CERT_LIFETIME_DEFAULT, Options, start};
use synesis_proto::message::Tier;
use synesis_tunnel::Identity;

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
    })
    .await
    .unwrap();
    synesis_cloud::admin::account_create(&data_dir, "bench", Tier::Managed, false).unwrap();
    synesis_cloud::admin::credit(
        &data_dir,
        "bench",
        synesis_proto::MicroUsd(1_000_000_000),
        false,
    )
    .unwrap();
    let token = synesis_cloud::admin::token_issue(
        &data_dir,
        "bench",
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
