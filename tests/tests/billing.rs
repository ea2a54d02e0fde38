//! Credit over the wire: a voucher made by the operator, redeemed by a device, seen in usage.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::{Cloud, Device, json_of, run_ok, signal};

#[test]
fn a_voucher_tops_up_exactly_once() {
    let mut cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    run_ok(
        cloud
            .admin()
            .args(["account", "set-tier", "acme", "managed"]),
    );
    let code = cloud.voucher("10.00");

    let topped = json_of(
        device
            .synesis()
            .args(["--json", "cloud", "topup", "--voucher", &code]),
    );
    assert_eq!(topped["credited_micro_usd"], 10_000_000);
    let usage = json_of(device.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(usage["balance_micro_usd"], 10_000_000);
    assert_eq!(usage["held_micro_usd"], 0);
    assert_eq!(
        (usage["account"].as_str(), usage["tier"].as_str()),
        (Some("acme"), Some("managed"))
    );
    for key in ["quota_tokens", "quota_tokens_used", "charges"] {
        assert!(usage.get(key).is_some(), "{key}");
    }

    let again = device
        .synesis()
        .args(["cloud", "topup", "--voucher", &code])
        .output()
        .unwrap();
    assert!(!again.status.success(), "a reused voucher must be refused");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already redeemed"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let usage = json_of(device.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(
        usage["balance_micro_usd"], 10_000_000,
        "nothing credited twice"
    );

    let price = json_of(device.synesis().args(["--json", "cloud", "price"]));
    assert_eq!(price["tier"], "managed");
    assert_eq!(price["markup_bps"], 300);
    run_ok(cloud.admin().args(["ledger", "verify"]));

    // The operator's cloud.toml, read at start: devices see its prices and rules.
    std::fs::write(
        cloud.dir().join("cloud.toml"),
        "[tiers]\nmanaged_markup_bps = 450\n[prices.house-model]\ninput_usd_per_mtok = \"0.25\"\noutput_usd_per_mtok = \"1.25\"\n",
    )
    .unwrap();
    signal(cloud.process.pid(), "TERM");
    assert_eq!(cloud.process.wait(Duration::from_secs(15)), Some(0));
    cloud.restart();
    let price = json_of(device.synesis().args(["--json", "cloud", "price"]));
    assert_eq!(price["markup_bps"], 450);
    let house = price["prices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["model"] == "house-model")
        .expect("the configured model is listed")
        .clone();
    assert_eq!(house["input_micro_usd_per_mtok"], 250_000);
    assert_eq!(house["output_micro_usd_per_mtok"], 1_250_000);
}

/// Account requests go through the running tunnel service (a stream of its connection), and on
/// a connection of their own when none runs; the answers are the same.
#[test]
fn account_requests_use_the_tunnel_when_it_runs() {
    let cloud = Cloud::start();
    let device = Device::new();
    device.login(&cloud.account_and_token("acme"));
    run_ok(cloud.admin().args(["credit", "acme", "1.50"]));

    let usage_with_log = || {
        let out = run_ok(device.synesis().args(["-v", "--json", "cloud", "usage"]));
        let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (view, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (direct, log) = usage_with_log();
    assert!(log.contains("connection of its own"), "{log}");

    let _tunnel = device.tunnel("1s");
    assert!(
        synesis_e2e::wait_for(Duration::from_secs(10), || device.state().as_deref()
            == Some("connected")),
        "never connected:\n{}",
        device.tunnel_log()
    );
    let (tunneled, log) = usage_with_log();
    assert!(log.contains("through the tunnel service"), "{log}");
    assert_eq!(tunneled, direct);
    assert_eq!(tunneled["balance_micro_usd"], 1_500_000);

    // A refusal comes back through the tunnel as well, as the same clear error.
    let out = device
        .synesis()
        .args(["cloud", "topup", "--voucher", "VCH-NOPE"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("unknown voucher"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
