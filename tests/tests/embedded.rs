//! The cloud as a library: started and stopped through its handle, in this process, as tests
//! and benches embed it.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_cloud::endpoint::{CERT_LIFETIME_DEFAULT, Options, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cloud_starts_and_stops_through_its_handle() {
    let scratch = tempfile::tempdir().unwrap();
    let data_dir = scratch.path().join("cloud");
    let cloud = start(Options {
        listen: "127.0.0.1:0".parse().unwrap(),
        billing: synesis_cloud::config::load(None, &data_dir)
            .unwrap()
            .billing,
        serving: synesis_cloud::config::Serving::default(),
        data_dir: data_dir.clone(),
        drain_window: Duration::from_millis(500),
        drain_grace: Duration::from_secs(1),
        cert_lifetime: CERT_LIFETIME_DEFAULT,
        database: None,
        metrics_listen: None,
        advertise: None,
    })
    .await
    .unwrap();
    let addr = cloud.addr();
    assert_ne!(addr.port(), 0);

    // A client that pins the cloud's CA completes a handshake with it.
    let ca = std::fs::read(data_dir.join("ca.crt.der")).unwrap();
    let pin = synesis_wire::tls::fingerprint(&ca.into());
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let connect = |endpoint: &quinn::Endpoint| {
        endpoint
            .connect_with(
                synesis_tunnel::tls::enrollment_client_config(pin).unwrap(),
                addr,
                synesis_wire::tls::SERVER_NAME,
            )
            .unwrap()
    };
    let conn = connect(&endpoint).await.unwrap();

    // Shutting down drains and closes: the open connection ends, and nothing answers after.
    tokio::time::timeout(Duration::from_secs(10), cloud.shutdown())
        .await
        .expect("the cloud stops within its drain grace");
    tokio::time::timeout(Duration::from_secs(5), conn.closed())
        .await
        .expect("its connections are closed");
    let again = tokio::time::timeout(Duration::from_secs(3), connect(&endpoint)).await;
    assert!(!matches!(again, Ok(Ok(_))), "a stopped cloud answered");
}
