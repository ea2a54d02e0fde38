//! `synesis-cloud admin` billing commands on a real SQLite file: credit, usage, quote, vouchers,
//! and `ledger verify` catching an edited entry.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::process::{Command, Output};

fn admin(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_synesis-cloud"))
        .arg("admin")
        .arg("--data-dir")
        .arg(dir)
        .args(args)
        .output()
        .unwrap()
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn credit_shows_exactly_in_usage_and_the_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    json(&admin(
        dir.path(),
        &["--json", "account", "create", "acme", "--tier", "managed"],
    ));
    let credited = json(&admin(dir.path(), &["--json", "credit", "acme", "10.00"]));
    assert_eq!(credited["balance_micro_usd"], 10_000_000);
    json(&admin(
        dir.path(),
        &["--json", "credit", "acme", "0.000001"],
    ));
    let usage = json(&admin(dir.path(), &["--json", "usage", "acme"]));
    assert_eq!(usage["balance_micro_usd"], 10_000_001);
    assert_eq!(usage["held_micro_usd"], 0);
    assert_eq!(usage["tier"], "managed");
    let verified = json(&admin(dir.path(), &["--json", "ledger", "verify"]));
    assert_eq!(verified["intact"], true);
    assert_eq!(verified["entries"], 2);

    let bad = admin(dir.path(), &["credit", "acme", "1.0000001"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("at most 6 decimals"));
}

#[test]
fn an_edited_entry_is_named_by_ledger_verify() {
    let dir = tempfile::tempdir().unwrap();
    json(&admin(dir.path(), &["--json", "account", "create", "acme"]));
    for amount in ["1", "2", "3"] {
        json(&admin(dir.path(), &["--json", "credit", "acme", amount]));
    }
    let db = rusqlite::Connection::open(dir.path().join("cloud.db")).unwrap();
    db.execute(
        "UPDATE ledger_entries SET amount = 99000000 WHERE seq = 1",
        [],
    )
    .unwrap();
    let stderr = verify_fails_at(dir.path(), 1);
    assert!(stderr.contains("entry 1"), "{stderr}");

    db.execute(
        "UPDATE ledger_entries SET amount = 2000000 WHERE seq = 1",
        [],
    )
    .unwrap();
    db.execute("DELETE FROM ledger_entries WHERE seq = 0", [])
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_slice(&admin(dir.path(), &["--json", "ledger", "verify"]).stdout).unwrap();
    assert_eq!(
        v["first_bad_seq"], 1,
        "the first entry left is out of sequence"
    );
}

/// Each account has its own chain: an edit in one account's chain is named with that account
/// (its id and name) and the entry's number in its chain.
#[test]
fn ledger_verify_names_the_account_whose_chain_breaks() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["acme", "globex"] {
        json(&admin(dir.path(), &["--json", "account", "create", name]));
    }
    for amount in ["1", "2", "3"] {
        for name in ["acme", "globex"] {
            json(&admin(dir.path(), &["--json", "credit", name, amount]));
        }
    }
    let verified = json(&admin(dir.path(), &["--json", "ledger", "verify"]));
    assert_eq!(
        (verified["intact"].as_bool(), verified["chains"].as_u64()),
        (Some(true), Some(2)),
        "{verified}"
    );
    let db = rusqlite::Connection::open(dir.path().join("cloud.db")).unwrap();
    db.execute(
        "UPDATE ledger_entries SET amount = 99000000
         WHERE seq = 2 AND account_id = (SELECT id FROM accounts WHERE name = 'globex')",
        [],
    )
    .unwrap();
    let out = admin(dir.path(), &["--json", "ledger", "verify"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["first_bad_account_name"], "globex", "{v}");
    assert_eq!(v["first_bad_seq"], 2, "{v}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("globex") && stderr.contains("entry 2"),
        "{stderr}"
    );
}

/// `admin ledger verify --json` on a damaged ledger: it fails, naming entry `seq` as the first
/// bad one; what it said on stderr.
fn verify_fails_at(dir: &std::path::Path, seq: u64) -> String {
    let out = admin(dir, &["--json", "ledger", "verify"]);
    assert!(!out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["intact"].as_bool(), v["first_bad_seq"].as_u64()),
        (Some(false), Some(seq))
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn an_edited_balance_is_found_by_ledger_verify() {
    let dir = tempfile::tempdir().unwrap();
    json(&admin(dir.path(), &["--json", "account", "create", "acme"]));
    json(&admin(dir.path(), &["--json", "credit", "acme", "5"]));
    let verified = json(&admin(dir.path(), &["--json", "ledger", "verify"]));
    assert_eq!(verified["intact"], true);

    // Money made out of thin air: the kept balance, without an entry behind it.
    let db = rusqlite::Connection::open(dir.path().join("cloud.db")).unwrap();
    db.execute("UPDATE ledger_totals SET balance = balance + 1000000", [])
        .unwrap();
    let stderr = verify_fails_at(dir.path(), 0);
    assert!(
        stderr.contains("do not follow from the entries"),
        "{stderr}"
    );
}

#[test]
fn quotes_follow_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let q = |tier: &str| {
        json(&admin(
            dir.path(),
            &[
                "--json",
                "quote",
                "--tier",
                tier,
                "--model",
                "claude-sonnet",
                "--input-tokens",
                "1000",
                "--output-tokens",
                "250",
            ],
        ))
    };
    let managed = q("managed");
    assert_eq!(
        (
            managed["base_micro_usd"].as_i64(),
            managed["markup_micro_usd"].as_i64(),
            managed["total_micro_usd"].as_i64()
        ),
        (Some(6_750), Some(203), Some(6_953))
    );
    let byok = q("byok");
    assert_eq!(
        (
            byok["base_micro_usd"].as_i64(),
            byok["total_micro_usd"].as_i64()
        ),
        (Some(0), Some(2_025))
    );
    let free = q("free");
    assert_eq!(
        (
            free["total_micro_usd"].as_i64(),
            free["quota_tokens_used"].as_u64()
        ),
        (Some(0), Some(1_250))
    );
    for key in [
        "tier",
        "model",
        "input_tokens",
        "output_tokens",
        "base_micro_usd",
        "markup_micro_usd",
        "total_micro_usd",
        "quota_tokens_used",
    ] {
        assert!(managed.get(key).is_some(), "{key}");
    }
    let unknown = admin(
        dir.path(),
        &[
            "quote",
            "--tier",
            "managed",
            "--model",
            "gpt-9",
            "--input-tokens",
            "1",
            "--output-tokens",
            "1",
        ],
    );
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no price for model"));
}

/// The database's files as they lie on disk (the main file, its WAL if one is left), every byte:
/// free pages and old WAL frames too, which no query shows.
fn database_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("cloud.db") {
            bytes.extend(std::fs::read(&path).unwrap());
        }
    }
    assert!(!bytes.is_empty(), "no database in {}", dir.display());
    bytes
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn vouchers_are_printed_once_and_stored_hashed() {
    use sha2::Digest;

    let dir = tempfile::tempdir().unwrap();
    let out = admin(dir.path(), &["voucher", "create", "5.00", "--count", "3"]);
    assert!(out.status.success());
    let codes: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(codes.len(), 3);

    // Read before any connection of ours touches the files.
    let on_disk = database_bytes(dir.path());
    for code in &codes {
        assert!(
            !contains(&on_disk, code.as_bytes()),
            "{code} is on disk in clear"
        );
        let random_part = code.trim_start_matches("VCH-");
        assert!(
            !contains(&on_disk, random_part.as_bytes()),
            "the random part of {code} is on disk"
        );
        let hash = sha2::Sha256::digest(code.as_bytes());
        assert!(
            contains(&on_disk, hash.as_slice()),
            "the SHA-256 of {code} is not on disk"
        );
    }

    let db = rusqlite::Connection::open(dir.path().join("cloud.db")).unwrap();
    let stored: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM vouchers WHERE amount = 5000000",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 3);
}

#[test]
fn the_operators_config_sets_prices_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("cloud.toml"),
        "[tiers]\nmanaged_markup_bps = 1000\n\n[prices.house-model]\ninput_usd_per_mtok = \"1\"\noutput_usd_per_mtok = \"2\"\n",
    )
    .unwrap();
    let q = json(&admin(
        dir.path(),
        &[
            "--json",
            "quote",
            "--tier",
            "managed",
            "--model",
            "house-model",
            "--input-tokens",
            "1000000",
            "--output-tokens",
            "1000000",
        ],
    ));
    // $1 + $2 = $3 base, 10 % markup.
    assert_eq!(
        (q["base_micro_usd"].as_i64(), q["total_micro_usd"].as_i64()),
        (Some(3_000_000), Some(3_300_000))
    );

    // A mistake in the file stops the command and names the file and the key.
    std::fs::write(
        dir.path().join("cloud.toml"),
        "[tiers]\nmanaged_markup = 5\n",
    )
    .unwrap();
    let out = admin(
        dir.path(),
        &[
            "quote",
            "--tier",
            "managed",
            "--model",
            "claude-sonnet",
            "--input-tokens",
            "1",
            "--output-tokens",
            "1",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cloud.toml") && err.contains("managed_markup"),
        "{err}"
    );

    // An explicit --config that does not exist is an error, not the defaults.
    let out = admin(
        dir.path(),
        &["--config", "/nonexistent/cloud.toml", "usage", "acme"],
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/cloud.toml"));
}
