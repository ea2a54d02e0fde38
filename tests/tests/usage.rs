//! The local ledger through the real binary: `synesis ask --local` records each answer, and
//! `synesis usage` reports them with the cloud cost they avoided, priced by synesis-billing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use synesis_billing::{PriceTable, Tier, TierRules, Usage, quote};
use synesis_e2e::{Device, json_of, run_ok};

/// The model an on-device answer's avoided cost is priced at (the CLI's `REFERENCE_MODEL`).
const REFERENCE_MODEL: &str = "claude-sonnet";

fn avoided(input_tokens: u64, output_tokens: u64) -> i64 {
    quote(
        Tier::Managed,
        REFERENCE_MODEL,
        Usage {
            input_tokens,
            output_tokens,
        },
        &PriceTable::default(),
        &TierRules::default(),
    )
    .unwrap()
    .total
    .0
}

#[test]
fn each_local_answer_is_recorded_with_the_cloud_cost_it_avoided() {
    let device = Device::new();
    run_ok(device.synesis().args(["model", "add", "--tiny", "demo"]));
    let mut input = 0;
    let mut output = 0;
    let mut expected_avoided = 0;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let answer = json_of(device.synesis().args([
            "--json",
            "ask",
            "--local",
            "--max-tokens",
            "16",
            "hello",
        ]));
        let (i, o) = (
            answer["prompt_tokens"].as_u64().unwrap(),
            answer["completion_tokens"].as_u64().unwrap(),
        );
        assert!(i > 0 && o > 0, "{answer}");
        input += i;
        output += o;
        // Each answer is priced on its own (rounded once, as every quote is), then summed.
        expected_avoided += avoided(i, o);
        ids.push(answer["request_id"].as_str().unwrap().to_owned());
    }
    assert_ne!(ids[0], ids[1], "a fresh request id per ask");

    let usage = json_of(device.synesis().args(["usage", "--json"]));
    let local = &usage["local"];
    assert_eq!(local["generations"], 2, "{usage}");
    assert_eq!(local["input_tokens"], input);
    assert_eq!(local["output_tokens"], output);
    assert_eq!(local["cloud_cost_avoided_micro_usd"], expected_avoided);
    assert!(expected_avoided > 0);
    assert_eq!(usage["cloud"]["charges"], 0);
    assert_eq!(usage["cloud"]["total_micro_usd"], 0);
    assert!(usage["last_sync_at"].is_null());
    let by_model = usage["by_model"].as_array().unwrap();
    assert_eq!(by_model.len(), 1, "{usage}");
    assert_eq!(by_model[0]["model"], "demo");
    assert_eq!(by_model[0]["kind"], "local");
    assert_eq!(by_model[0]["generations"], 2);
    assert_eq!(by_model[0]["micro_usd"], expected_avoided);

    // The table for people, in dollars.
    let table = run_ok(device.synesis().arg("usage"));
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.contains("cloud cost avoided"), "{table}");
    let dollars = format!(
        "${}.{:06}",
        expected_avoided / 1_000_000,
        expected_avoided % 1_000_000
    );
    assert!(table.contains(&dollars), "{dollars} not in:\n{table}");

    // --since: a date after today counts nothing; one long ago counts everything.
    let later = json_of(
        device
            .synesis()
            .args(["--json", "usage", "--since", "2999-01-01"]),
    );
    assert_eq!(later["local"]["generations"], 0);
    let all =
        json_of(
            device
                .synesis()
                .args(["usage", "--json", "--since", "2000-01-01T00:00:00Z"]),
        );
    assert_eq!(all["local"]["generations"], 2);
}

#[test]
fn a_fresh_home_has_zero_usage_and_bad_dates_are_usage_errors() {
    let device = Device::new();
    let usage = json_of(device.synesis().args(["usage", "--json"]));
    assert_eq!(usage["local"]["generations"], 0);
    assert_eq!(usage["local"]["cloud_cost_avoided_micro_usd"], 0);
    assert_eq!(usage["cloud"]["charges"], 0);
    assert_eq!(usage["by_model"].as_array().unwrap().len(), 0);
    assert!(usage["last_sync_at"].is_null());

    let out = device
        .synesis()
        .args(["usage", "--since", "last tuesday"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("YYYY-MM-DD"));
}

#[test]
fn usage_help_explains_the_avoided_cost() {
    let device = Device::new();
    let help = run_ok(device.synesis().args(["usage", "--help"]));
    let help = String::from_utf8(help.stdout).unwrap();
    for needle in ["avoided", REFERENCE_MODEL, "--since", "--json", "micro-USD"] {
        assert!(
            help.contains(needle),
            "usage --help lacks {needle}:\n{help}"
        );
    }
}

#[test]
fn a_damaged_ledger_does_not_fail_the_answer_but_usage_names_it() {
    let device = Device::new();
    let ledger = device.home().join("data/ledger.db");
    std::fs::create_dir_all(ledger.parent().unwrap()).unwrap();
    std::fs::write(&ledger, vec![b'x'; 4096]).unwrap();
    run_ok(device.synesis().args(["model", "add", "--tiny", "demo"]));

    let ask = run_ok(
        device
            .synesis()
            .args(["ask", "--local", "--max-tokens", "4", "hi"]),
    );
    let stderr = String::from_utf8_lossy(&ask.stderr);
    assert!(
        stderr.contains("warning") && stderr.contains("ledger.db"),
        "{stderr}"
    );

    let out = device.synesis().args(["usage"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("ledger.db") && stderr.contains("not a Synesis local ledger"),
        "{stderr}"
    );
}
