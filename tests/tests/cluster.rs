//! Several cloud nodes on one PostgreSQL database: two `synesis-cloud serve` processes sharing
//! the data directory (its CA, its adapters) and the database, each on a port of its own.
//! Needs `SYNESIS_TEST_POSTGRES` (a server URL; `.ci/run` starts one): skipped without it
//! outside CI, a failure inside.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::{Cloud, Device, json_of, run_ok, wait_for};

/// Two nodes of one cloud, `None` (having said so) without a PostgreSQL server.
fn two_nodes() -> Option<(Cloud, Cloud)> {
    if !postgres() {
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

/// Whether a PostgreSQL server is named (having said so when not: the test is skipped).
fn postgres() -> bool {
    !synesis_e2e::skip_unless(
        std::env::var("SYNESIS_TEST_POSTGRES").is_ok_and(|u| !u.is_empty()),
        "SYNESIS_TEST_POSTGRES names no PostgreSQL server (scripts/postgres.sh start DIR makes one)",
    )
}

/// Two nodes whose model `up` is the scripted upstream answering `script` (`extra` at the top
/// of their `cloud.toml`), with the account `acme` (Managed).
struct UpCluster {
    up: synesis_e2e::upstream::Upstream,
    a: Cloud,
    b: Cloud,
    _files: tempfile::TempDir,
}

async fn up_cluster(script: Vec<synesis_e2e::upstream::Script>, extra: &str) -> UpCluster {
    let up = synesis_e2e::upstream::upstream(script).await;
    let files = tempfile::tempdir().unwrap();
    let toml = files.path().join("cloud.toml");
    std::fs::write(
        &toml,
        format!(
            "{extra}\n{}",
            synesis_e2e::upstream::upstream_model(up.port, "[\"managed\"]")
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
    UpCluster {
        up,
        a,
        b,
        _files: files,
    }
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
    use synesis_e2e::upstream::{Script, paced_text};
    use synesis_proto::{ErrorCode, Message};
    const PACED: u32 = 8;
    if !postgres() {
        return;
    }
    let UpCluster { up, a, b, _files } = up_cluster(
        vec![Script::Paced(PACED), Script::Paced(PACED)],
        "[escalation]\nper_account_max = 2",
    )
    .await;
    up.release(1);
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

/// Acceptance of several nodes: a device answering through node A; A killed (SIGKILL) in the
/// middle of the answer. The device's tunnel fails over to node B (which A's `Welcome` named),
/// the request is asked again there with the same id and, once A is known dead, B takes its
/// open hold over and runs it from the start: the whole answer, one charge, no hold left, and
/// `admin devices` (run against either node's data) shows the device online on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_answer_leaves_the_answer_to_another_charged_once() {
    use synesis_e2e::upstream::{Script, paced_text};
    const PACED: u32 = 20;
    if !postgres() {
        return;
    }
    let UpCluster {
        up,
        mut a,
        b,
        _files,
    } = up_cluster(vec![Script::Paced(PACED), Script::Paced(PACED)], "").await;
    // Each node reads the others at its heartbeat (every 2 s): both serving, and one more beat.
    let serving = || {
        match json_of(a.admin().args(["nodes", "--json"])) {
            serde_json::Value::Array(nodes) => nodes,
            other => panic!("{other}"),
        }
        .iter()
        .filter(|n| n["state"] == "serving")
        .count()
    };
    assert!(wait_for(Duration::from_secs(20), || serving() == 2));
    std::thread::sleep(Duration::from_millis(2_500));
    // A token names every node serving; this device is given A's alone, and learns B from A.
    let token = a.token("acme", "1h");
    for node in [a.addr, b.addr] {
        assert!(token.contains(&node.to_string()), "{token}");
    }
    let device = Device::new();
    let device_id = device.login(&synesis_e2e::token_naming(&token, a.addr));
    a.top_up(&device, "10.00");
    let _tunnel = device.tunnel("1s");
    assert!(
        wait_for(Duration::from_secs(30), || device.state().as_deref()
            == Some("connected")),
        "{}",
        device.tunnel_log()
    );
    assert!(
        wait_for(Duration::from_secs(10), || device
            .tunnel_log()
            .contains(&b.addr.to_string())),
        "A's Welcome named B: {}",
        device.tunnel_log()
    );
    let ask = device
        .synesis()
        .args(["--json", "cloud", "ask", "--model", "up", "--max-tokens"])
        .arg(PACED.to_string())
        .arg("hello")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let upstream_saw = |n: usize, what: &str, limit: u64, a: &Cloud| {
        assert!(
            wait_for(Duration::from_secs(limit), || up.requests() >= n),
            "{what}: {} requests\nA: {}\nB: {}\ntunnel: {}",
            up.requests(),
            a.log(),
            b.log(),
            device.tunnel_log()
        );
    };
    upstream_saw(1, "node A asked the upstream", 30, &a);
    up.release(PACED / 2);
    assert!(wait_for(Duration::from_secs(30), || up.written() >= PACED / 2));
    synesis_e2e::signal(a.process.pid(), "KILL");
    let killed_at = std::time::Instant::now();
    let _ = a.process.wait(Duration::from_secs(20));
    // B runs it again only once A is known dead (10 s without a heartbeat): until then the
    // device is told to wait, since A might still be answering.
    upstream_saw(2, "node B took the request over", 90, &a);
    let took_over = killed_at.elapsed();
    up.release(PACED);
    let out = ask.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{stderr}\nB: {}\ntunnel: {}",
        b.log(),
        device.tunnel_log()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["text"],
        paced_text(PACED),
        "the whole answer, once: {stderr}"
    );
    assert!(v["started_over"].as_u64().unwrap() >= 1, "{v}");
    // A's last heartbeat was at most 2 s before the kill, and it is dead 10 s after it.
    assert!(
        took_over >= Duration::from_secs(7),
        "B ran it {took_over:?} after the kill, before A was known dead"
    );
    let usage = json_of(device.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(
        usage["charges"].as_array().unwrap().len(),
        1,
        "one charge: {usage}"
    );
    assert_eq!(usage["charges"][0]["output_tokens"], PACED, "{usage}");
    assert_eq!(
        usage["held_micro_usd"].as_i64().unwrap(),
        0,
        "no hold left: {usage}"
    );
    // Online on B (its tunnel may still be in its backoff: the answer can come over a
    // connection of its own), whichever node's data `admin devices` reads (one database).
    for node in [&a, &b] {
        let row = || {
            node.devices()
                .into_iter()
                .find(|d| d["device_id"] == device_id.as_str())
                .unwrap()
        };
        assert!(
            wait_for(Duration::from_secs(30), || {
                let row = row();
                row["status"] == "online" && row["node"] == b.addr.to_string()
            }),
            "{}
{}",
            row(),
            device.tunnel_log()
        );
    }
    eprintln!(
        "node A killed; node B took the request over {} ms later",
        took_over.as_millis()
    );
}

/// A node that dies running a request whose device never comes back: the nodes that survive it
/// release its hold (voided, nothing charged) once it has been known dead for 20 s, so the
/// account's money and its running limit are not held until the hold lapses. The device's own
/// requests meanwhile go to the node still serving (its token names both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hold_of_a_request_its_dead_node_left_is_released_by_the_others() {
    use synesis_e2e::upstream::Script;
    use synesis_proto::Message;
    if !postgres() {
        return;
    }
    let UpCluster {
        up,
        mut a,
        b,
        _files,
    } = up_cluster(vec![Script::Paced(20)], "").await;
    up.release(1);
    // Node A first, node B after it.
    let token = synesis_e2e::token_naming(&a.token("acme", "1h"), a.addr).replacen(
        &a.addr.to_string(),
        &format!("{},{}", a.addr, b.addr),
        1,
    );
    let device = Device::new();
    device.login(&token);
    a.top_up(&device, "10.00");

    let (_endpoint, conn) = synesis_e2e::connect_to(&device, Some(a.addr)).await;
    let request =
        synesis_e2e::escalation_request(synesis_tunnel::clock::new_request_id(), "up", "hello", 20);
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    synesis_wire::send(
        &mut tx,
        &request.into(),
        synesis_proto::FrameLimits::default(),
    )
    .await
    .unwrap();
    let mut rx = synesis_wire::FramedRecv::new(rx, synesis_proto::FrameLimits::default());
    match rx.next().await {
        Ok(Some(Message::EscalationChunk(_))) => {}
        other => panic!("{other:?}\n{}", a.log()),
    }
    synesis_e2e::signal(a.process.pid(), "KILL");
    let _ = a.process.wait(Duration::from_secs(20));
    assert!(
        wait_for(Duration::from_secs(60), || b
            .log()
            .contains("swept a node that is gone")),
        "{}",
        b.log()
    );
    assert!(
        b.log()
            .contains("released the hold of a request its node died running"),
        "{}",
        b.log()
    );
    let usage = json_of(device.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(
        usage["held_micro_usd"].as_i64().unwrap(),
        0,
        "released: {usage}"
    );
    assert_eq!(
        usage["charges"].as_array().unwrap().len(),
        0,
        "nothing charged: {usage}"
    );
    assert_eq!(
        usage["balance_micro_usd"].as_i64().unwrap(),
        10_000_000,
        "{usage}"
    );
    let nodes = json_of(b.admin().args(["nodes", "--json"]));
    let dead = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["addr"] == a.addr.to_string())
        .unwrap();
    assert_eq!(dead["state"], "dead", "{nodes}");
    assert!(!dead["swept_at"].is_null(), "{nodes}");
}

/// A node stopped with SIGTERM drains: it sends each device to another node (the drain hint
/// names it), at a time spread over the drain window, and the device's tunnel goes on there.
#[test]
fn a_draining_node_sends_its_devices_to_another() {
    let Some((mut a, b)) = two_nodes() else {
        return;
    };
    run_ok(
        a.admin()
            .args(["account", "create", "acme", "--tier", "managed"]),
    );
    let device = Device::new();
    let device_id = device.login(&synesis_e2e::token_naming(&a.token("acme", "1h"), a.addr));
    // Both nodes serving, and A has read B (its heartbeat, every 2 s) before it drains.
    assert!(wait_for(Duration::from_secs(20), || {
        json_of(a.admin().args(["nodes", "--json"]))
            .as_array()
            .is_some_and(|n| n.iter().filter(|n| n["state"] == "serving").count() == 2)
    }));
    std::thread::sleep(Duration::from_millis(2_500));
    let _tunnel = device.tunnel("1s");
    assert!(
        wait_for(Duration::from_secs(30), || device.state().as_deref()
            == Some("connected")),
        "{}",
        device.tunnel_log()
    );
    synesis_e2e::signal(a.process.pid(), "TERM");
    let on_b = || {
        device
            .status()
            .is_some_and(|s| s["state"] == "connected" && s["server"] == b.addr.to_string())
    };
    assert!(
        wait_for(Duration::from_secs(30), on_b),
        "{}\nA: {}",
        device.tunnel_log(),
        a.log()
    );
    assert!(
        device
            .tunnel_log()
            .contains(&format!("go on with {}", b.addr)),
        "the drain named B: {}",
        device.tunnel_log()
    );
    assert_eq!(
        a.process.wait(Duration::from_secs(20)),
        Some(0),
        "{}",
        a.log()
    );
    let row = b
        .devices()
        .into_iter()
        .find(|d| d["device_id"] == device_id.as_str())
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || {
            b.devices()
                .into_iter()
                .find(|d| d["device_id"] == device_id.as_str())
                .is_some_and(|d| d["status"] == "online" && d["node"] == b.addr.to_string())
        }),
        "{row}"
    );
}

/// What is verified is what is stored, across nodes: the data directory is shared, so a stream
/// of the same upload on another node may still write the part file while this node verifies
/// it (its own seal stops only its own streams). Node A seals and verifies an upload whose every
/// chunk it wrote (in order: it knows their digest); meanwhile a stream of the same upload on
/// node B, begun before A had them, writes other bytes into one chunk. Node A must not store
/// the changed file under the declared digest: it verifies a copy of its own, refuses it
/// (`HASH_MISMATCH`), and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_another_node_cannot_change_an_upload_being_verified() {
    use sha2::Digest;
    use synesis_proto::message::{UploadBegin, UploadChunk, UploadDone};
    use synesis_proto::{Blob, ErrorCode, FrameLimits, Message, Sha256};
    const CHUNK: u32 = 64 * 1024;
    if !postgres() {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let model = files.path().join("tiny.gguf");
    synesis_infer::tiny::write_model(&model, synesis_infer::tiny::TinySpec::TINY).unwrap();
    let pause = files.path().join("pause");
    let toml = files.path().join("cloud.toml");
    std::fs::write(
        &toml,
        format!(
            "[adapters]\nverify_pause_while = {:?}\n[prices.tiny]\ninput_usd_per_mtok = \"1.00\"\noutput_usd_per_mtok = \"2.00\"\n\
             [models.tiny]\nprovider = \"llama\"\npath = {:?}\nthreads = 1\n",
            pause.display().to_string(),
            model.display().to_string()
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
    let (_on_a, conn_a) = synesis_e2e::connect_to(&device, Some(a.addr)).await;
    let (_on_b, conn_b) = synesis_e2e::connect_to(&device, Some(b.addr)).await;

    // A real adapter, padded past its tensors so that it spans several chunks.
    let lora = files.path().join("l.gguf");
    synesis_infer::tiny::write_lora(&lora, synesis_infer::tiny::TinySpec::TINY, 3).unwrap();
    let mut bytes = std::fs::read(&lora).unwrap();
    bytes.extend((0..300_000).map(|i| u8::try_from(i % 251).unwrap()));
    let sha = Sha256(sha2::Sha256::digest(&bytes).into());
    let size = bytes.len() as u64;
    let begin = UploadBegin {
        upload_id: synesis_tunnel::upload::upload_id("l", &sha, size, CHUNK),
        name: "l".into(),
        base_model: "tiny".into(),
        size_bytes: size,
        sha256: sha,
        chunk_size_bytes: CHUNK,
    };
    let chunks = u32::try_from(bytes.len().div_ceil(CHUNK as usize)).unwrap();
    let chunk = |index: u32, data: Vec<u8>| -> Message {
        UploadChunk {
            upload_id: begin.upload_id,
            index,
            data: Blob(data),
        }
        .into()
    };
    let piece = |index: u32| {
        let at = (index * CHUNK) as usize;
        bytes[at..(at + CHUNK as usize).min(bytes.len())].to_vec()
    };
    let open = |conn: quinn::Connection| {
        let begin = begin.clone();
        async move {
            let (mut tx, rx) = conn.open_bi().await.unwrap();
            let mut rx = synesis_wire::FramedRecv::new(rx, FrameLimits::default());
            synesis_wire::send(&mut tx, &begin.into(), FrameLimits::default())
                .await
                .unwrap();
            match rx.next().await.unwrap() {
                Some(Message::UploadResume(r)) => assert!(r.chunks_held.is_empty(), "{r:?}"),
                other => panic!("{other:?}"),
            }
            (tx, rx)
        }
    };
    // B's stream begins first: it holds nothing, so it will write what it is sent.
    let (mut tx_b, _rx_b) = open(conn_b.clone()).await;
    // A's stream sends every chunk, in order, then UploadDone; A seals and holds there.
    let (mut tx_a, mut rx_a) = open(conn_a.clone()).await;
    for i in 0..chunks {
        synesis_wire::send(&mut tx_a, &chunk(i, piece(i)), FrameLimits::default())
            .await
            .unwrap();
    }
    std::fs::write(&pause, b"").unwrap();
    let done = UploadDone {
        upload_id: begin.upload_id,
    };
    synesis_wire::send(&mut tx_a, &done.into(), FrameLimits::default())
        .await
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || a
            .log()
            .contains("sealed for verification")),
        "{}",
        a.log()
    );
    // B writes other bytes into the last chunk (past the GGUF header: only the digest can tell).
    let last = chunks - 1;
    let mut forged = piece(last);
    forged[0] ^= 0xff;
    synesis_wire::send(&mut tx_b, &chunk(last, forged), FrameLimits::default())
        .await
        .unwrap();
    let part = walk(&a.dir().join("uploads"))
        .into_iter()
        .find(|p| p.extension().is_some_and(|e| e == "part"))
        .expect("the part file");
    let at = (last * CHUNK) as usize;
    assert!(
        wait_for(Duration::from_secs(30), || std::fs::read(&part)
            .is_ok_and(|on_disk| on_disk[at] == bytes[at] ^ 0xff)),
        "node B wrote into the part file node A is verifying"
    );
    std::fs::remove_file(&pause).unwrap();
    match rx_a.next().await.unwrap() {
        Some(Message::ErrorMsg(m)) => assert_eq!(m.code, ErrorCode::HASH_MISMATCH, "{m:?}"),
        other => panic!("stored although its bytes changed under the check: {other:?}"),
    }
    let stored: Vec<_> = walk(&a.dir().join("adapters"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "gguf"))
        .collect();
    for blob in &stored {
        let on_disk = std::fs::read(blob).unwrap();
        assert_eq!(
            Sha256(sha2::Sha256::digest(&on_disk).into()),
            sha,
            "{} is not the bytes it is named for",
            blob.display()
        );
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else {
                found.push(path);
            }
        }
    }
    found
}

/// A device that loses node A while A is still answering, and reaches node B: B does not run the
/// request again while A serves (A goes on making the answer, and stores it); the device's
/// `EscalationResume` on B is told to wait (`UNAVAILABLE`, `retry_after_ms`), and once A has
/// stored the answer, the same resume on B streams the rest from where the device was: no gap,
/// no repeat, one charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_loses_a_live_node_gets_the_rest_of_its_answer_from_another() {
    use synesis_e2e::upstream::{Script, paced_text};
    use synesis_proto::message::EscalationResume;
    use synesis_proto::{ErrorCode, FrameLimits, Message};
    const PACED: u32 = 10;
    if !postgres() {
        return;
    }
    let UpCluster { up, a, b, _files } = up_cluster(vec![Script::Paced(PACED)], "").await;
    let device = Device::new();
    device.login(&synesis_e2e::token_naming(&a.token("acme", "1h"), a.addr));
    a.top_up(&device, "10.00");
    let id = synesis_tunnel::clock::new_request_id();
    let request = synesis_e2e::escalation_request(id, "up", "hello", PACED);

    // On A: the first chunks, then the device loses A (its connection closes).
    let (on_a, conn_a) = synesis_e2e::connect_to(&device, Some(a.addr)).await;
    let (mut tx, rx) = conn_a.open_bi().await.unwrap();
    synesis_wire::send(&mut tx, &request.into(), FrameLimits::default())
        .await
        .unwrap();
    let mut rx = synesis_wire::FramedRecv::new(rx, FrameLimits::default());
    up.release(PACED / 2);
    let mut text = String::new();
    for seq in 0..PACED / 2 {
        match rx.next().await.unwrap() {
            Some(Message::EscalationChunk(c)) => {
                assert_eq!(c.seq, seq);
                text.push_str(&c.text);
            }
            other => panic!("{other:?}"),
        }
    }
    conn_a.close(0u32.into(), b"lost");
    on_a.wait_idle().await;

    // On B, while A still makes it: wait.
    let (_on_b, conn_b) = synesis_e2e::connect_to(&device, Some(b.addr)).await;
    let resume = || EscalationResume {
        request_id: id,
        next_seq: PACED / 2,
    };
    let reply = synesis_e2e::exchange(&conn_b, resume().into(), None).await;
    match &reply.end {
        Some(Message::ErrorMsg(e)) => {
            assert_eq!(e.code, ErrorCode::UNAVAILABLE, "{e:?}");
            assert!(e.retry_after_ms.is_some(), "{e:?}");
        }
        other => panic!("B answered while A was making the answer: {other:?}"),
    }
    assert!(reply.text.is_empty());
    // A finishes and stores it; the same resume on B gets the rest.
    up.release(PACED);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let rest = loop {
        let reply = synesis_e2e::exchange(&conn_b, resume().into(), None).await;
        match &reply.end {
            Some(Message::EscalationDone(d)) => {
                assert_eq!(d.chunks, PACED);
                break reply;
            }
            Some(Message::ErrorMsg(e)) if e.code == ErrorCode::UNAVAILABLE => {
                assert!(tokio::time::Instant::now() < deadline, "{e:?}\n{}", a.log());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("{other:?}"),
        }
    };
    text.push_str(&rest.text);
    assert_eq!(text, paced_text(PACED), "no gap, no repeat");
    assert_eq!(up.requests(), 1, "run once, on A");
    let usage = json_of(device.synesis().args(["--json", "cloud", "usage"]));
    assert_eq!(usage["charges"].as_array().unwrap().len(), 1, "{usage}");
    assert_eq!(usage["held_micro_usd"].as_i64().unwrap(), 0, "{usage}");
}
