//! Several cloud nodes on one PostgreSQL database: two `synesis-cloud serve` processes sharing
//! the data directory (its CA, its adapters) and the database, each on a port of its own.
//! Needs `SYNESIS_TEST_POSTGRES` (a server URL; `.ci/run` starts one): skipped without it
//! outside CI, a failure inside.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::{Cloud, Device, json_of, run_ok, wait_for};

/// Two nodes of one cloud, `None` (having said so) without a PostgreSQL server.
fn two_nodes() -> Option<(Cloud, Cloud)> {
    if synesis_e2e::skip_unless(
        std::env::var("SYNESIS_TEST_POSTGRES").is_ok_and(|u| !u.is_empty()),
        "SYNESIS_TEST_POSTGRES names no PostgreSQL server (scripts/postgres.sh start DIR makes one)",
    ) {
        return None;
    }
    let a = Cloud::start_on_postgres(&[]).expect("a database");
    let b = a.node(&[]);
    assert_ne!(a.addr, b.addr);
    Some((a, b))
}

/// The Unix milliseconds in `key=` of the first line of `log` that contains `what`.
fn logged_ms(log: &str, what: &str, key: &str) -> Option<i64> {
    let line = log.lines().find(|l| l.contains(what))?;
    let value = line.split(&format!("{key}=")).nth(1)?;
    value.split_whitespace().next()?.parse().ok()
}

/// A member removed by the owner's device through node A is cut off on node B, where its
/// device is connected, within a second of the removal (the time node A recorded in the audit
/// log, against the time node B logged closing the connection): node A's transaction notifies
/// every node listening on the database, and B re-reads the revocations at once.
#[test]
fn a_member_removed_through_one_node_is_cut_off_on_another_within_a_second() {
    let Some((a, b)) = two_nodes() else {
        return;
    };
    run_ok(
        a.admin()
            .args(["account", "create", "acme", "--tier", "managed"]),
    );
    let owner = Device::new();
    // Nodes share the data directory, where each records its address as it starts (`admin`
    // names the last one in a token by default): each token here names its node.
    owner.login(&synesis_e2e::token_naming(&a.token("acme", "1h"), a.addr));
    run_ok(a.admin().args([
        "member",
        "add",
        "acme",
        "eda@example.com",
        "--role",
        "editor",
    ]));
    let token = run_ok(a.admin().args([
        "token",
        "create",
        "--account",
        "acme",
        "--member",
        "eda@example.com",
    ]));
    let eda = Device::new();
    let token = String::from_utf8(token.stdout).unwrap();
    eda.login(&synesis_e2e::token_naming(token.trim(), b.addr));
    let _tunnel = eda.tunnel("1s");
    assert!(
        wait_for(Duration::from_secs(30), || eda.state().as_deref()
            == Some("connected")),
        "{}",
        eda.tunnel_log()
    );
    // Enrolled and connected through node B, not A.
    assert!(
        b.log().contains("device connection identified")
            && !a.log().contains("device connection identified"),
        "{}\n{}",
        a.log(),
        b.log()
    );

    run_ok(
        owner
            .synesis()
            .args(["cloud", "members", "rm", "eda@example.com"]),
    );
    let audit = json_of(a.admin().args(["--json", "audit", "acme"]));
    let removed_at = audit
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "member_removed")
        .and_then(|r| r["at"].as_str())
        .and_then(|at| humantime::parse_rfc3339_weak(at).ok())
        .unwrap_or_else(|| panic!("{audit}"));
    let removed_at = i64::try_from(
        removed_at
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let mut closed_at = None;
    assert!(
        wait_for(Duration::from_secs(10), || {
            closed_at = logged_ms(
                &b.log(),
                "closed the connections of a revoked device",
                "at_ms",
            );
            closed_at.is_some()
        }),
        "node B never closed the device's connection\n{}",
        b.log()
    );
    let took = closed_at.unwrap() - removed_at;
    assert!(
        (0..1_000).contains(&took),
        "node B closed it {took} ms after node A removed the member"
    );
    assert!(wait_for(Duration::from_secs(10), || eda.state().as_deref()
        != Some("connected")));
    assert!(
        a.log().contains("device connection identified"),
        "the owner's request went through node A\n{}",
        a.log()
    );
    eprintln!("member removed through node A; node B closed the connection {took} ms later");
}
