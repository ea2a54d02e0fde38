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

/// `per_account_max = 2` holds across the cluster: with two requests of the account running
/// through node A, a third is refused whichever node it reaches (`LIMIT_EXCEEDED`, told to
/// wait), and never reaches the upstream; once they end, node B takes one. The count is the
/// account's open holds, read in the database under the account's lock as the hold is placed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_limit_of_an_account_holds_across_nodes() {
    use synesis_e2e::upstream::{Script, paced_text, upstream, upstream_model};
    use synesis_proto::{ErrorCode, Message};
    const PACED: u32 = 8;
    if synesis_e2e::skip_unless(
        std::env::var("SYNESIS_TEST_POSTGRES").is_ok_and(|u| !u.is_empty()),
        "SYNESIS_TEST_POSTGRES names no PostgreSQL server (scripts/postgres.sh start DIR makes one)",
    ) {
        return;
    }
    let up = upstream(vec![Script::Paced(PACED), Script::Paced(PACED)]).await;
    up.release(1);
    let files = tempfile::tempdir().unwrap();
    let toml = files.path().join("cloud.toml");
    std::fs::write(
        &toml,
        format!(
            "[escalation]\nper_account_max = 2\n{}",
            upstream_model(up.port, "[\"managed\"]")
        ),
    )
    .unwrap();
    let config = ["--config", toml.to_str().unwrap()];
    let a = Cloud::start_on_postgres(&config).expect("a database");
    let b = a.node(&config);
    run_ok(
        a.admin()
            .args(["account", "create", "acme", "--tier", "managed"]),
    );
    let device = Device::new();
    device.login(&synesis_e2e::token_naming(&a.token("acme", "1h"), a.addr));
    a.top_up(&device, "10.00");
    let request = |max_tokens| {
        synesis_e2e::escalation_request(
            synesis_tunnel::clock::new_request_id(),
            "up",
            "hello",
            max_tokens,
        )
    };

    let (_on_a, conn_a) = synesis_e2e::connect_to(&device, Some(a.addr)).await;
    let (_on_b, conn_b) = synesis_e2e::connect_to(&device, Some(b.addr)).await;
    let (running, started): (Vec<_>, Vec<_>) = (0..2)
        .map(|_| {
            let (conn, first) = (conn_a.clone(), request(PACED).into());
            let (tell, started) = tokio::sync::oneshot::channel();
            let run = tokio::spawn(async move {
                synesis_e2e::exchange_telling(&conn, first, None, Some(tell)).await
            });
            (run, started)
        })
        .unzip();
    for started in started {
        tokio::time::timeout(Duration::from_secs(30), started)
            .await
            .expect("a request started within 30 s")
            .expect("it sent a chunk");
    }
    for (node, conn) in [("B", &conn_b), ("A", &conn_a)] {
        let third = synesis_e2e::exchange(conn, request(8).into(), None).await;
        match &third.end {
            Some(Message::ErrorMsg(e)) => {
                assert_eq!(e.code, ErrorCode::LIMIT_EXCEEDED, "node {node}: {e:?}");
                assert!(e.retry_after_ms.is_some(), "{e:?}");
            }
            other => panic!("a third request ran on node {node}: {other:?}"),
        }
    }
    assert_eq!(up.requests(), 2, "no third request reached the upstream");
    up.release(PACED);
    for r in running {
        let r = r.await.unwrap();
        synesis_e2e::done(&r);
        assert_eq!(r.text, paced_text(PACED));
    }
    let later = synesis_e2e::exchange(&conn_b, request(8).into(), None).await;
    synesis_e2e::done(&later);
    let usage = json_of(device.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(usage["charges"].as_array().unwrap().len(), 3, "{usage}");
    assert_eq!(usage["held_micro_usd"].as_i64().unwrap(), 0, "{usage}");
}

/// Each node records itself while it serves: `admin nodes` lists both as serving; one killed
/// (no clean stop) is listed dead within 10 s of its last heartbeat, one stopped with SIGTERM as
/// stopped.
#[test]
fn the_nodes_know_each_other_and_a_dead_one_is_noticed() {
    let Some((mut a, b)) = two_nodes() else {
        return;
    };
    let states = |cloud: &Cloud| -> Vec<(String, String)> {
        let nodes = json_of(cloud.admin().args(["--json", "nodes"]));
        nodes
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["addr"].as_str().unwrap().to_owned(),
                    n["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect()
    };
    let (addr_a, addr_b) = (a.addr.to_string(), b.addr.to_string());
    let serving = vec![
        (addr_a.clone(), "serving".to_owned()),
        (addr_b.clone(), "serving".to_owned()),
    ];
    assert!(
        wait_for(Duration::from_secs(10), || states(&a) == serving),
        "{:?}",
        states(&a)
    );
    synesis_e2e::signal(b.process.pid(), "KILL");
    let killed = std::time::Instant::now();
    let dead = vec![
        (addr_a.clone(), "serving".to_owned()),
        (addr_b.clone(), "dead".to_owned()),
    ];
    assert!(
        wait_for(Duration::from_secs(20), || states(&a) == dead),
        "{:?}",
        states(&a)
    );
    let noticed = killed.elapsed();
    // Its last heartbeat was at most 2 s before the kill.
    assert!(noticed <= Duration::from_secs(11), "{noticed:?}");
    synesis_e2e::signal(a.process.pid(), "TERM");
    assert_eq!(a.process.wait(Duration::from_secs(30)), Some(0));
    assert_eq!(
        states(&b),
        vec![(addr_a, "stopped".to_owned()), (addr_b, "dead".to_owned())]
    );
    eprintln!("a killed node was listed dead {noticed:?} after the kill");
}
