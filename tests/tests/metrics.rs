//! A node's `/metrics`, `/live` and `/ready` (`serve --metrics-listen`), read as an operator's
//! Prometheus would: after a device enrolled, pinged and asked the tiny model through the
//! cloud, the Prometheus project's own Python text parser (`prometheus_client.parser`) reads
//! the scrape, and the counts are the ones that happened. `/ready` turns 503 when the node
//! drains.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::{Cloud, Device, json_of, prometheus_samples as parsed, run_ok, sample};

/// `GET path` on the metrics listener: the status code and the body.
fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let host = addr.to_string();
    synesis_e2e::raw_http(&host, "GET", path, &[("Host", &host)], "")
}

#[test]
fn an_operator_scrapes_what_the_node_did_and_sees_it_drain() {
    if synesis_e2e::skip_unless(
        synesis_e2e::python_has("prometheus_client"),
        "python3 with the `prometheus_client` package is not installed (pip install prometheus_client)",
    ) {
        return;
    }
    let device = Device::new();
    let config = tempfile::tempdir().unwrap();
    let model = config.path().join("tiny.gguf");
    synesis_infer::tiny::write_model(&model, synesis_infer::tiny::TinySpec::TINY).unwrap();
    let file = config.path().join("cloud.toml");
    std::fs::write(
        &file,
        format!(
            "[prices.tiny]\ninput_usd_per_mtok = \"1.00\"\noutput_usd_per_mtok = \"2.00\"\n\
             [models.tiny]\nprovider = \"llama\"\npath = {:?}\nthreads = 1\n",
            model.display().to_string()
        ),
    )
    .unwrap();
    let mut cloud = Cloud::start_with(&[
        "--config",
        file.to_str().unwrap(),
        "--metrics-listen",
        "127.0.0.1:0",
    ]);
    let at = cloud.metrics_addr();
    assert_eq!(get(at, "/live"), (200, "live\n".to_owned()));
    assert_eq!(get(at, "/ready"), (200, "ready\n".to_owned()));

    run_ok(
        cloud
            .admin()
            .args(["account", "create", "acme", "--tier", "managed"]),
    );
    device.login(&cloud.token("acme", "1h"));
    cloud.top_up(&device, "10.00");
    // The device's one connection, heartbeating every second.
    let _tunnel = device.tunnel("1s");
    assert!(
        synesis_e2e::wait_for(Duration::from_secs(30), || device.state().as_deref()
            == Some("connected")),
        "{}",
        device.tunnel_log()
    );
    run_ok(device.synesis().args(["cloud", "ping", "--count", "3"]));
    let answer = json_of(device.synesis().args([
        "--json",
        "cloud",
        "ask",
        "--model",
        "tiny",
        "--max-tokens",
        "8",
        "hello",
    ]));
    let (input, output) = (
        answer["input_tokens"].as_f64().unwrap(),
        answer["output_tokens"].as_f64().unwrap(),
    );
    assert!(output > 0.0, "{answer}");
    let finish = answer["finish_reason"].as_str().unwrap().to_owned();
    // A model the node does not serve: refused, and counted under `other`, never under a name
    // a device chose (each new name would be a new series in the node's memory).
    let refused = device
        .synesis()
        .args(["cloud", "ask", "--model", "no-such-model-7f3a", "hello"])
        .output()
        .unwrap();
    assert!(!refused.status.success());

    let (status, text) = get(at, "/metrics");
    assert_eq!(status, 200, "{text}");
    let s = parsed(&text);
    let escalations =
        format!("synesis_cloud_escalations_total{{model=\"tiny\",outcome=\"{finish}\"}}");
    assert_eq!(sample(&s, &escalations), 1.0, "{text}");
    assert_eq!(
        sample(
            &s,
            "synesis_cloud_escalations_total{model=\"other\",outcome=\"UNKNOWN_MODEL\"}"
        ),
        1.0,
        "{text}"
    );
    assert!(!text.contains("no-such-model"), "{text}");
    assert_eq!(
        sample(
            &s,
            "synesis_cloud_tokens_total{direction=\"in\",model=\"tiny\"}"
        ),
        input
    );
    assert_eq!(
        sample(
            &s,
            "synesis_cloud_tokens_total{direction=\"out\",model=\"tiny\"}"
        ),
        output
    );
    assert_eq!(
        sample(
            &s,
            "synesis_cloud_time_to_first_chunk_seconds_count{model=\"tiny\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &s,
            "synesis_cloud_provider_duration_seconds_count{model=\"tiny\"}"
        ),
        1.0
    );
    // The enrollment's connection, then the device's own.
    assert_eq!(
        sample(&s, "synesis_cloud_handshakes_total{outcome=\"enrollment\"}"),
        1.0
    );
    assert!(sample(&s, "synesis_cloud_handshakes_total{outcome=\"device\"}") >= 1.0);
    assert_eq!(sample(&s, "synesis_cloud_devices_connected{}"), 1.0);
    assert!(sample(&s, "synesis_cloud_heartbeat_rtt_seconds_count{}") >= 3.0);
    // The top-up, the hold and the settlement were committed, in one batch or more.
    let batches = sample(
        &s,
        "synesis_cloud_ledger_batches_total{outcome=\"committed\"}",
    );
    assert!(batches >= 1.0);
    assert!(sample(&s, "synesis_cloud_ledger_batch_operations_sum{}") >= 3.0);
    assert_eq!(
        sample(&s, "synesis_cloud_ledger_batch_operations_count{}"),
        batches
    );
    assert!(
        sample(
            &s,
            "synesis_cloud_database_wait_seconds_count{connection=\"identifier\"}"
        ) >= 2.0
    );
    // Draining: not ready (a balancer sends no one new) while in-flight work finishes; the
    // connected device makes the drain last.
    synesis_e2e::signal(cloud.process.pid(), "TERM");
    assert!(
        synesis_e2e::wait_for(Duration::from_secs(10), || {
            std::net::TcpStream::connect(at).is_ok_and(|_| get(at, "/ready").0 == 503)
        }),
        "/ready never said 503 while draining\n{}",
        cloud.log()
    );
    assert_eq!(cloud.process.wait(Duration::from_secs(30)), Some(0));
}
