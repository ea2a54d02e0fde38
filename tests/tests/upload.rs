//! Adapter uploads end to end, for real: a client speaking PROTOCOL.md §2 *Upload* directly
//! (and `synesis cloud push`) against `synesis-cloud serve` with the tiny GGUF model in its
//! in-process llama.cpp provider, over QUIC on loopback. What is checked: every refusal the
//! spec names, with nothing half-visible and the cloud serving on; resume without re-sending
//! (the cloud's own count, `admin uploads`); the pushed adapter answering `cloud ask --lora`
//! exactly as `ask --local --lora` does on the same files.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::Digest;
use synesis_e2e::{Cloud, Device, TinyCloud, connect, json_of, run_ok, tiny_cloud, wait_for};
use synesis_proto::message::{AdaptersRequest, UploadBegin, UploadChunk, UploadDone};
use synesis_proto::{Blob, ErrorCode, FrameLimits, Message, RequestId, Sha256};
use synesis_wire::FramedRecv;

const CHUNK: u32 = 64 * 1024;

fn setup(extra: &str) -> TinyCloud {
    tiny_cloud(extra)
}

/// A real LoRA adapter for the tiny model (`seed` picks its weights), padded with `pad` bytes
/// after its tensors (llama.cpp reads tensors at their offsets), so uploads can span chunks.
fn adapter(dir: &Path, name: &str, seed: u64, pad: usize) -> PathBuf {
    let path = dir.join(name);
    synesis_infer::tiny::write_lora(&path, synesis_infer::tiny::TinySpec::TINY, seed).unwrap();
    if pad > 0 {
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend((0..pad).map(|i| u8::try_from(i % 251).unwrap()));
        std::fs::write(&path, bytes).unwrap();
    }
    path
}

/// The upload id as PROTOCOL.md §2 *Upload* derives it (written here from the spec).
fn upload_id(name: &str, sha: &Sha256, size: u64, chunk: u32) -> RequestId {
    let mut h = sha2::Sha256::new();
    h.update(b"synesis-upload\0");
    h.update(name.as_bytes());
    h.update(b"\0");
    h.update(sha.0);
    h.update(size.to_be_bytes());
    h.update(chunk.to_be_bytes());
    let digest: [u8; 32] = h.finalize().into();
    RequestId::from_digest(digest[..16].try_into().unwrap())
}

fn declare(name: &str, bytes: &[u8]) -> UploadBegin {
    let sha = Sha256(sha2::Sha256::digest(bytes).into());
    UploadBegin {
        upload_id: upload_id(name, &sha, bytes.len() as u64, CHUNK),
        name: name.into(),
        base_model: "tiny".into(),
        size_bytes: bytes.len() as u64,
        sha256: sha,
        chunk_size_bytes: CHUNK,
    }
}

/// How one upload stream went.
#[derive(Debug)]
struct Exchange {
    held: Vec<u32>,
    end: Option<Message>,
}

fn code(e: &Exchange) -> ErrorCode {
    match &e.end {
        Some(Message::ErrorMsg(m)) => m.code,
        other => panic!("no ErrorMsg: {other:?}"),
    }
}

/// Sends `begin`, then the chunks `send` picks among those not held (`alter` may change one
/// before it goes), then `UploadDone` when `done`; reads the cloud's last word.
async fn upload(
    conn: &quinn::Connection,
    begin: &UploadBegin,
    bytes: &[u8],
    send: impl Fn(u32) -> bool,
    alter: impl Fn(&mut UploadChunk),
    done: bool,
) -> Exchange {
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    let mut rx = FramedRecv::new(rx, FrameLimits::default());
    synesis_wire::send(&mut tx, &begin.clone().into(), FrameLimits::default())
        .await
        .unwrap();
    let held = match rx.next().await.unwrap() {
        Some(Message::UploadResume(r)) => r.chunks_held,
        end => return Exchange { held: vec![], end },
    };
    for (i, piece) in bytes.chunks(CHUNK as usize).enumerate() {
        let index = u32::try_from(i).unwrap();
        if held.contains(&index) || !send(index) {
            continue;
        }
        let mut chunk = UploadChunk {
            upload_id: begin.upload_id,
            index,
            data: Blob(piece.to_vec()),
        };
        alter(&mut chunk);
        if synesis_wire::send(&mut tx, &chunk.into(), FrameLimits::default())
            .await
            .is_err()
        {
            break; // the cloud ended the stream; its reason follows
        }
    }
    if done {
        let _ = synesis_wire::send(
            &mut tx,
            &UploadDone {
                upload_id: begin.upload_id,
            }
            .into(),
            FrameLimits::default(),
        )
        .await;
    } else {
        let _ = tx.finish();
    }
    let end = rx.next().await.ok().flatten();
    Exchange { held, end }
}

async fn listed(conn: &quinn::Connection) -> Vec<String> {
    let (mut tx, rx) = conn.open_bi().await.unwrap();
    let request = AdaptersRequest {
        request_id: RequestId::from_parts(1, rand_bytes()),
    };
    synesis_wire::send(&mut tx, &request.into(), FrameLimits::default())
        .await
        .unwrap();
    match FramedRecv::new(rx, FrameLimits::default())
        .next()
        .await
        .unwrap()
    {
        Some(Message::AdaptersReply(r)) => r.adapters.into_iter().map(|a| a.name).collect(),
        other => panic!("{other:?}"),
    }
}

fn rand_bytes() -> [u8; 10] {
    rand::random()
}

fn uploads(cloud: &Cloud) -> Vec<serde_json::Value> {
    json_of(cloud.admin().args(["--json", "uploads"]))
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_upload_is_refused_clearly_nothing_half_visible_and_the_cloud_serves_on() {
    let s = setup("[adapters]\nmax_size = \"4MiB\"\n");
    let (_endpoint, conn) = connect(&s.owner).await;
    let good = std::fs::read(adapter(s.files.path(), "good.gguf", 7, 300_000)).unwrap();
    let all = |_| true;
    let same = |_: &mut UploadChunk| {};

    // An oversize declaration, a base model the cloud does not run, a chunk size out of range.
    let mut big = declare("big", &good);
    big.size_bytes = 5 << 20;
    let e = upload(&conn, &big, &good, all, same, true).await;
    assert_eq!(code(&e), ErrorCode::TOO_LARGE, "{e:?}");
    let mut elsewhere = declare("x", &good);
    elsewhere.base_model = "gpt-9".into();
    assert_eq!(
        code(&upload(&conn, &elsewhere, &good, all, same, true).await),
        ErrorCode::UNKNOWN_MODEL
    );
    let mut tiny_chunks = declare("x", &good);
    tiny_chunks.chunk_size_bytes = 1_000;
    assert_eq!(
        code(&upload(&conn, &tiny_chunks, &good, all, same, true).await),
        ErrorCode::INVALID_REQUEST
    );

    // A chunk index out of range, and a chunk of the wrong length: the stream ends; what was
    // held stays held.
    let begin = declare("ranged", &good);
    let e = upload(
        &conn,
        &begin,
        &good,
        |i| i < 2,
        |c| {
            if c.index == 1 {
                c.index = 1_000;
            }
        },
        true,
    )
    .await;
    assert_eq!(code(&e), ErrorCode::INVALID_REQUEST, "{e:?}");
    let e = upload(&conn, &begin, &good, |i| i == 1, |c| c.data.0.push(0), true).await;
    assert_eq!(e.held, [0], "chunk 0 stayed held");
    assert_eq!(code(&e), ErrorCode::INVALID_REQUEST);

    // A second upload racing the first for the same name.
    let other = std::fs::read(adapter(s.files.path(), "other.gguf", 8, 300_000)).unwrap();
    let racing = declare("ranged", &other);
    assert_eq!(
        code(&upload(&conn, &racing, &other, all, same, true).await),
        ErrorCode::BUSY
    );

    // Wrong bytes in one chunk: the whole hash is wrong; the upload is discarded and the same
    // declaration starts again from nothing.
    let e = upload(
        &conn,
        &begin,
        &good,
        all,
        |c| {
            if c.index == 2 {
                c.data.0[10] ^= 0xff;
            }
        },
        true,
    )
    .await;
    assert_eq!(code(&e), ErrorCode::HASH_MISMATCH, "{e:?}");

    // A model instead of an adapter; an adapter for another architecture (hash correct).
    let model = std::fs::read(s.files.path().join("tiny.gguf")).unwrap();
    assert_eq!(
        code(&upload(&conn, &declare("model", &model), &model, all, same, true).await),
        ErrorCode::ADAPTER_INVALID
    );
    let mut foreign = good.clone();
    let at = foreign.windows(5).position(|w| w == b"llama").unwrap();
    foreign[at..at + 5].copy_from_slice(b"qwen2");
    assert_eq!(
        code(
            &upload(
                &conn,
                &declare("foreign", &foreign),
                &foreign,
                all,
                same,
                true
            )
            .await
        ),
        ErrorCode::ADAPTER_INVALID
    );
    // Done before every chunk was sent.
    let e = upload(
        &conn,
        &declare("early", &good),
        &good,
        |i| i == 0,
        same,
        true,
    )
    .await;
    assert_eq!(code(&e), ErrorCode::INVALID_REQUEST);

    assert!(listed(&conn).await.is_empty(), "nothing half-visible");

    // The cloud serves on: the same declaration as the discarded one now starts from nothing
    // and completes.
    let e = upload(&conn, &begin, &good, all, same, true).await;
    assert!(e.held.is_empty(), "a discarded upload keeps nothing: {e:?}");
    match &e.end {
        Some(Message::UploadComplete(c)) => {
            assert_eq!(c.sha256, begin.sha256);
            assert!(c.serving);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(listed(&conn).await, ["ranged"]);
    // The same content under another name finishes at once (nothing sent).
    let again = declare("ranged-copy", &good);
    let e = upload(&conn, &again, &good, |_| false, same, true).await;
    assert_eq!(e.held.len(), good.len().div_ceil(CHUNK as usize), "{e:?}");
    assert!(matches!(e.end, Some(Message::UploadComplete(_))), "{e:?}");
    assert_eq!(listed(&conn).await, ["ranged", "ranged-copy"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_upload_resumes_from_what_the_cloud_holds_even_across_a_cloud_restart() {
    let mut s = setup("");
    let file = adapter(s.files.path(), "a.gguf", 7, 2_000_000);
    let bytes = std::fs::read(&file).unwrap();
    let chunks = u32::try_from(bytes.len().div_ceil(CHUNK as usize)).unwrap();
    let begin = declare("resumable", &bytes);
    {
        // Half the chunks, then the connection drops without a word.
        let (endpoint, conn) = connect(&s.owner).await;
        let e = upload(&conn, &begin, &bytes, |i| i < chunks / 2, |_| {}, false).await;
        assert!(e.held.is_empty());
        conn.close(0u32.into(), b"");
        endpoint.wait_idle().await;
    }
    assert!(
        wait_for(Duration::from_secs(5), || uploads(&s.cloud)
            .first()
            .is_some_and(|u| u["chunks_held"] == chunks / 2)),
        "{:?}",
        uploads(&s.cloud)
    );
    // The cloud is killed and restarted: the chunks it recorded are still held.
    synesis_e2e::signal(s.cloud.process.pid(), "KILL");
    s.cloud.restart();
    let (_endpoint, conn) = connect(&s.owner).await;
    let e = upload(&conn, &begin, &bytes, |_| true, |_| {}, true).await;
    assert_eq!(e.held, (0..chunks / 2).collect::<Vec<_>>());
    assert!(matches!(e.end, Some(Message::UploadComplete(_))), "{e:?}");
    let u = uploads(&s.cloud);
    assert_eq!(
        u[0]["chunks_received"], chunks,
        "no chunk sent twice: {u:?}"
    );
    assert_eq!(u[0]["completed"], true);
    // And it answers with it: the same greedy text as the device's llama.cpp with the same
    // files, and not the base model's.
    let ask =
        |args: &[&str]| {
            json_of(s.owner.synesis().args(["--json"]).args(args).args([
                "--max-tokens",
                "24",
                "hello",
            ]))["text"]
                .as_str()
                .unwrap()
                .to_owned()
        };
    run_ok(
        s.owner
            .synesis()
            .args(["lora", "add"])
            .arg(&file)
            .args(["--name", "resumable"]),
    );
    let cloud = ask(&["cloud", "ask", "--lora", "resumable"]);
    assert_eq!(cloud, ask(&["ask", "--local", "--lora", "resumable"]));
    assert_ne!(
        cloud,
        ask(&["cloud", "ask"]),
        "the adapter changes the answer"
    );
}

/// Two streams of one upload (a resume while the cloud still holds the old stream): the newer
/// takes over, and the older cannot write into it any more — what was verified is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_stream_of_an_upload_takes_over_and_the_older_cannot_write_into_it() {
    let s = setup("");
    let (_endpoint, conn) = connect(&s.owner).await;
    let bytes = std::fs::read(adapter(s.files.path(), "t.gguf", 7, 1_000_000)).unwrap();
    let begin = declare("taken", &bytes);
    let chunk = |index: u32, data: &[u8]| -> Message {
        UploadChunk {
            upload_id: begin.upload_id,
            index,
            data: Blob(data.to_vec()),
        }
        .into()
    };
    // The older stream: begun, one chunk sent, left open.
    let (mut old_tx, old_rx) = conn.open_bi().await.unwrap();
    let mut old_rx = FramedRecv::new(old_rx, FrameLimits::default());
    synesis_wire::send(&mut old_tx, &begin.clone().into(), FrameLimits::default())
        .await
        .unwrap();
    assert!(matches!(
        old_rx.next().await.unwrap(),
        Some(Message::UploadResume(_))
    ));
    let first = &bytes[..CHUNK as usize];
    synesis_wire::send(&mut old_tx, &chunk(0, first), FrameLimits::default())
        .await
        .unwrap();
    // The newer stream sends everything and completes.
    let e = upload(&conn, &begin, &bytes, |_| true, |_| {}, true).await;
    assert!(matches!(e.end, Some(Message::UploadComplete(_))), "{e:?}");
    // The older one now tries to overwrite a chunk with other bytes: refused, stream ended.
    let _ = synesis_wire::send(
        &mut old_tx,
        &chunk(1, &vec![0u8; CHUNK as usize]),
        FrameLimits::default(),
    )
    .await;
    match old_rx.next().await {
        Ok(Some(Message::ErrorMsg(m))) => assert_eq!(m.code, ErrorCode::CANCELLED, "{m:?}"),
        other => panic!("{other:?}"),
    }
    // The stored content is what was declared.
    let stored = s
        .cloud
        .dir()
        .join("adapters")
        .read_dir()
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join(format!("{}.gguf", begin.sha256));
    assert_eq!(std::fs::read(stored).unwrap(), bytes);
}

/// `synesis cloud push` killed with SIGKILL about half way (over a relay that slows the
/// connection): the same command again sends only what the cloud does not hold — counted by
/// the cloud — and says how much was there; then `cloud adapters` lists it and `lora list`
/// marks the local file as on the cloud.
#[test]
fn a_push_killed_half_way_resumes_without_resending_what_the_cloud_holds() {
    let s = setup("");
    let relay = synesis_e2e::UdpRelay::start(s.cloud.addr);
    let device = Device::new();
    device.login(&relay.token_via(&s.cloud.token("acme", "1h")));
    let file = adapter(s.files.path(), "big.gguf", 7, 40 << 20);
    let size = std::fs::metadata(&file).unwrap().len();
    let chunk = 64 * 1024;
    let chunks = size.div_ceil(chunk);
    let push = || {
        let mut cmd = device.synesis();
        cmd.args(["--json", "cloud", "push"]).arg(&file).args([
            "--name",
            "big",
            "--base",
            "tiny",
            "--chunk-size",
            "64KiB",
        ]);
        cmd
    };
    let held = || {
        uploads(&s.cloud)
            .first()
            .map_or(0, |u| u["chunks_held"].as_u64().unwrap())
    };
    relay.set_delay(Duration::from_millis(40));
    let mut first = push()
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(60), || held() >= chunks / 3),
        "{:?}",
        uploads(&s.cloud)
    );
    synesis_e2e::signal(first.id(), "KILL");
    first.wait().unwrap();
    // The cloud records what it wrote once the stream goes quiet (half a second): taken as
    // done once the count has not changed for 5 s.
    let mut before = held();
    let mut since = std::time::Instant::now();
    let settled = wait_for(Duration::from_secs(60), || {
        let now = held();
        if now != before {
            (before, since) = (now, std::time::Instant::now());
        }
        since.elapsed() >= Duration::from_secs(5)
    });
    assert!(settled, "the count kept changing: {:?}", uploads(&s.cloud));
    assert!(before > 0 && before < chunks, "{before} of {chunks}");
    relay.set_delay(Duration::ZERO);
    let v = json_of(&mut push());
    // From what the cloud held (more, should a record land after the 5 s): whole chunks.
    let resumed = v["resumed_from_bytes"].as_u64().unwrap();
    assert!(
        resumed >= before * chunk && resumed < size && resumed.is_multiple_of(chunk),
        "held {before} chunks: {v}"
    );
    assert_eq!(
        v["sent_bytes"],
        size - resumed,
        "only what was missing: {v}"
    );
    assert_eq!(v["bytes"], size, "{v}");
    let u = uploads(&s.cloud);
    assert_eq!(u[0]["completed"], true, "{u:?}");
    assert_eq!(
        u[0]["chunks_received"], chunks,
        "every chunk received once, none sent again: {u:?}"
    );
    // Listed on the cloud; the local registry knows it is there.
    let listed = json_of(device.synesis().args(["--json", "cloud", "adapters"]));
    assert_eq!(listed.to_string().matches("\"big\"").count(), 1, "{listed}");
    run_ok(
        device
            .synesis()
            .args(["lora", "add"])
            .arg(&file)
            .args(["--name", "big"]),
    );
    let local = json_of(device.synesis().args(["--json", "lora", "list"]));
    assert!(local.to_string().contains("\"on_cloud\":true"), "{local}");
    // Again: already there, nothing sent.
    let again = json_of(&mut push());
    assert_eq!(again["resumed_from_bytes"], size, "{again}");
    assert_eq!(again["sent_bytes"], 0, "{again}");
}

/// Limits: uploads in progress per account, storage per account (uploads in progress count at
/// their declared size), and an abandoned partial upload removed after `abandon_after`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_limits_hold_and_an_abandoned_upload_is_removed() {
    let s = setup(
        "[adapters]\nuploads_per_account = 1\nstorage_per_account = \"2MiB\"\nabandon_after = \"1s\"\n",
    );
    let (_endpoint, conn) = connect(&s.owner).await;
    let a = std::fs::read(adapter(s.files.path(), "a.gguf", 7, 1_300_000)).unwrap();
    let b = std::fs::read(adapter(s.files.path(), "b.gguf", 8, 1_300_000)).unwrap();
    // One chunk of `a`, then the stream ends: an upload in progress.
    let e = upload(&conn, &declare("a", &a), &a, |i| i == 0, |_| {}, false).await;
    assert!(e.end.is_none(), "{e:?}");
    assert_eq!(
        code(&upload(&conn, &declare("b", &b), &b, |_| true, |_| {}, true).await),
        ErrorCode::LIMIT_EXCEEDED
    );
    // Abandoned for longer than a second: removed, with its file.
    let parts = s.cloud.dir().join("uploads");
    assert!(
        wait_for(Duration::from_secs(10), || uploads(&s.cloud).is_empty()),
        "{:?}",
        uploads(&s.cloud)
    );
    let left: Vec<_> = walk(&parts);
    assert!(left.is_empty(), "{left:?}");
    // Room again: `b` completes (1.3 MB of 2 MiB); then `a` no longer fits.
    let e = upload(&conn, &declare("b", &b), &b, |_| true, |_| {}, true).await;
    assert!(matches!(e.end, Some(Message::UploadComplete(_))), "{e:?}");
    assert_eq!(
        code(&upload(&conn, &declare("a", &a), &a, |_| true, |_| {}, true).await),
        ErrorCode::TOO_LARGE
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

/// A new version pushed under the same name answers new requests; removing the name makes the
/// cloud refuse it (and say how to see what there is).
#[test]
fn a_new_version_under_the_same_name_answers_next_and_rm_removes_it() {
    let s = setup("");
    let ask_cloud = || {
        let out = s
            .owner
            .synesis()
            .args([
                "--json",
                "cloud",
                "ask",
                "--lora",
                "style",
                "--max-tokens",
                "24",
                "hi",
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .map(|v| v["text"].as_str().unwrap_or_default().to_owned())
                .unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let local = |file: &Path, name: &str| {
        run_ok(
            s.owner
                .synesis()
                .args(["lora", "add"])
                .arg(file)
                .args(["--name", name]),
        );
        json_of(s.owner.synesis().args([
            "--json",
            "ask",
            "--local",
            "--lora",
            name,
            "--max-tokens",
            "24",
            "hi",
        ]))["text"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let v1 = adapter(s.files.path(), "v1.gguf", 7, 0);
    let v2 = adapter(s.files.path(), "v2.gguf", 8, 0);
    let push = |file: &Path| {
        json_of(
            s.owner
                .synesis()
                .args(["--json", "cloud", "push"])
                .arg(file)
                .args(["--name", "style", "--base", "tiny"]),
        )
    };
    push(&v1);
    let (ok, first, err) = ask_cloud();
    assert!(ok, "{err}");
    assert_eq!(first, local(&v1, "one"));
    push(&v2);
    let (ok, second, err) = ask_cloud();
    assert!(ok, "{err}");
    assert_eq!(second, local(&v2, "two"), "the new version answers");
    assert_ne!(first, second);
    let removed = json_of(
        s.owner
            .synesis()
            .args(["--json", "cloud", "adapters", "rm", "style"]),
    );
    assert_eq!(removed["removed"], "style", "{removed}");
    let (ok, _, err) = ask_cloud();
    assert!(!ok && err.contains("no adapter \"style\""), "{err}");
    let listed = json_of(s.owner.synesis().args(["--json", "cloud", "adapters"]));
    assert!(!listed.to_string().contains("style"), "{listed}");
}

/// An attack on the digest: one stream writes the tail of an upload with bytes of its own,
/// then a second stream of the same upload (which took over before the tail was recorded)
/// sends only the head and declares the head's digest. The cloud must hash what is on disk,
/// not what the second stream sent: `HASH_MISMATCH`, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_covering_only_what_one_stream_sent_is_not_taken_for_the_files() {
    // A stream records what it wrote only when it ends here (or after a minute of quiet), so
    // the test decides when stream 1's tail is recorded, whatever the machine's load.
    let s = setup("[adapters]\nrecord_when_quiet = \"60s\"\n");
    let (_endpoint, conn) = connect(&s.owner).await;
    let bytes = std::fs::read(adapter(s.files.path(), "h.gguf", 7, 600_000)).unwrap();
    let chunks = u32::try_from(bytes.len().div_ceil(CHUNK as usize)).unwrap();
    let head = 3u32;
    let head_len = (head * CHUNK) as usize;
    // Declared: the full size, but the digest of the head alone.
    let mut begin = declare("h", &bytes);
    begin.sha256 = Sha256(sha2::Sha256::digest(&bytes[..head_len]).into());
    begin.upload_id = upload_id("h", &begin.sha256, begin.size_bytes, CHUNK);
    let chunk = |index: u32| -> Message {
        let at = (index * CHUNK) as usize;
        let end = (at + CHUNK as usize).min(bytes.len());
        UploadChunk {
            upload_id: begin.upload_id,
            index,
            data: Blob(bytes[at..end].to_vec()),
        }
        .into()
    };
    // Stream 1 writes the tail and stays open.
    let (mut tx1, rx1) = conn.open_bi().await.unwrap();
    let mut rx1 = FramedRecv::new(rx1, FrameLimits::default());
    synesis_wire::send(&mut tx1, &begin.clone().into(), FrameLimits::default())
        .await
        .unwrap();
    assert!(matches!(
        rx1.next().await.unwrap(),
        Some(Message::UploadResume(_))
    ));
    for i in head..chunks {
        synesis_wire::send(&mut tx1, &chunk(i), FrameLimits::default())
            .await
            .unwrap();
    }
    // Written (the part file holds the tail), not yet recorded.
    let parts = s.cloud.dir().join("uploads");
    let tail_written = || {
        walk(&parts)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "part"))
            .any(|p| {
                std::fs::read(p).is_ok_and(|on_disk| {
                    on_disk.len() == bytes.len() && on_disk[head_len..] == bytes[head_len..]
                })
            })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !tail_written() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream 1's chunks were not written"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stream 2 takes over, sends the head only, and waits for stream 1's record.
    let (mut tx2, rx2) = conn.open_bi().await.unwrap();
    let mut rx2 = FramedRecv::new(rx2, FrameLimits::default());
    synesis_wire::send(&mut tx2, &begin.clone().into(), FrameLimits::default())
        .await
        .unwrap();
    match rx2.next().await.unwrap() {
        Some(Message::UploadResume(r)) => assert!(r.chunks_held.is_empty(), "{r:?}"),
        other => panic!("{other:?}"),
    }
    for i in 0..head {
        synesis_wire::send(&mut tx2, &chunk(i), FrameLimits::default())
            .await
            .unwrap();
    }
    // Stream 1 ends, which records its tail (merged with nothing: stream 2 has recorded
    // nothing yet).
    tx1.finish().unwrap();
    let tail = u64::from(chunks - head);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let u = uploads(&s.cloud);
        if u.first().and_then(|u| u["chunks_held"].as_u64()) == Some(tail) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "stream 1's tail ({tail} chunks) was not recorded: {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let done = UploadDone {
        upload_id: begin.upload_id,
    };
    synesis_wire::send(&mut tx2, &done.into(), FrameLimits::default())
        .await
        .unwrap();
    match rx2.next().await.unwrap() {
        Some(Message::ErrorMsg(m)) => assert_eq!(m.code, ErrorCode::HASH_MISMATCH, "{m:?}"),
        other => panic!("stored under a digest that is not its bytes': {other:?}"),
    }
    assert!(listed(&conn).await.is_empty());
}

/// Content the account already holds is not a way around the checks: declared with another
/// size it is not "held" (it must be sent), and named for a base model of another architecture
/// it is `ADAPTER_INVALID`; a removal's request id used again for another name is a conflict.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_content_is_checked_again_for_each_declaration() {
    let other = tempfile::tempdir().unwrap();
    let qwen = other.path().join("qwen.gguf");
    synesis_infer::tiny::write_model(&qwen, synesis_infer::tiny::TinySpec::TINY).unwrap();
    let mut model = std::fs::read(&qwen).unwrap();
    let at = model.windows(5).position(|w| w == b"llama").unwrap();
    model[at..at + 5].copy_from_slice(b"qwen2");
    std::fs::write(&qwen, model).unwrap();
    let s = setup(&format!(
        "[prices.qwen]\ninput_usd_per_mtok = \"1.00\"\noutput_usd_per_mtok = \"2.00\"\n\
         [models.qwen]\nprovider = \"llama\"\npath = {:?}\n",
        qwen.display().to_string()
    ));
    let (_endpoint, conn) = connect(&s.owner).await;
    let bytes = std::fs::read(adapter(s.files.path(), "c.gguf", 7, 200_000)).unwrap();
    let e = upload(&conn, &declare("c", &bytes), &bytes, |_| true, |_| {}, true).await;
    assert!(matches!(e.end, Some(Message::UploadComplete(_))), "{e:?}");

    let mut resized = declare("c-big", &bytes);
    resized.size_bytes += 1_000;
    resized.upload_id = upload_id("c-big", &resized.sha256, resized.size_bytes, CHUNK);
    let e = upload(&conn, &resized, &bytes, |_| false, |_| {}, false).await;
    assert!(e.held.is_empty(), "another size is other content: {e:?}");

    let mut elsewhere = declare("c-qwen", &bytes);
    elsewhere.base_model = "qwen".into();
    let e = upload(&conn, &elsewhere, &bytes, |_| false, |_| {}, true).await;
    assert_eq!(code(&e), ErrorCode::ADAPTER_INVALID, "{e:?}");
    assert_eq!(listed(&conn).await, ["c"]);

    let remove = |name: &str| synesis_proto::message::AdapterRemove {
        request_id: RequestId::from_parts(7, [7; 10]),
        name: name.into(),
    };
    let ask = |m: synesis_proto::message::AdapterRemove| {
        let conn = conn.clone();
        async move {
            let (mut tx, rx) = conn.open_bi().await.unwrap();
            synesis_wire::send(&mut tx, &m.into(), FrameLimits::default())
                .await
                .unwrap();
            FramedRecv::new(rx, FrameLimits::default())
                .next()
                .await
                .unwrap()
        }
    };
    assert!(matches!(
        ask(remove("c")).await,
        Some(Message::AdapterRemoved(_))
    ));
    assert!(
        matches!(ask(remove("c")).await, Some(Message::AdapterRemoved(_))),
        "a replay"
    );
    match ask(remove("other")).await {
        Some(Message::ErrorMsg(m)) => assert_eq!(m.code, ErrorCode::IDEMPOTENCY_CONFLICT),
        other => panic!("{other:?}"),
    }
}

/// Upload ids and content belong to their account (PROTOCOL.md §2 *Upload*): another account
/// that declares the same upload (the same id, the same content) holds none of it and must send
/// it all; a chunk sent again is accepted and ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_and_their_content_belong_to_their_account_and_a_chunk_sent_twice_is_ignored() {
    let s = setup("");
    run_ok(
        s.cloud
            .admin()
            .args(["account", "create", "globex", "--tier", "managed"]),
    );
    let other = Device::new();
    other.login(&s.cloud.token("globex", "1h"));
    let (_e1, acme) = connect(&s.owner).await;
    let (_e2, globex) = connect(&other).await;
    let bytes = std::fs::read(adapter(s.files.path(), "a.gguf", 7, 200_000)).unwrap();
    let chunks = u32::try_from(bytes.len().div_ceil(CHUNK as usize)).unwrap();
    let begin = declare("shared", &bytes);

    // Acme: chunk 0, twice, then the stream ends without a word.
    {
        let (mut tx, rx) = acme.open_bi().await.unwrap();
        let mut rx = FramedRecv::new(rx, FrameLimits::default());
        synesis_wire::send(&mut tx, &begin.clone().into(), FrameLimits::default())
            .await
            .unwrap();
        assert!(matches!(
            rx.next().await.unwrap(),
            Some(Message::UploadResume(_))
        ));
        let chunk = UploadChunk {
            upload_id: begin.upload_id,
            index: 0,
            data: Blob(bytes[..CHUNK as usize].to_vec()),
        };
        for _ in 0..2 {
            synesis_wire::send(&mut tx, &chunk.clone().into(), FrameLimits::default())
                .await
                .unwrap();
        }
        tx.finish().unwrap();
        let end = rx.next().await;
        assert!(matches!(end, Ok(None)), "accepted, no error: {end:?}");
    }
    assert!(
        wait_for(Duration::from_secs(5), || uploads(&s.cloud)
            .iter()
            .any(|u| u["chunks_held"] == 1)),
        "{:?}",
        uploads(&s.cloud)
    );
    // Globex, the same upload id: holds nothing of Acme's.
    let e = upload(&globex, &begin, &bytes, |_| false, |_| {}, false).await;
    assert!(e.held.is_empty(), "{e:?}");
    // Acme completes it; Globex, declaring the same content again, still holds nothing and
    // must send every chunk.
    let e = upload(&acme, &begin, &bytes, |_| true, |_| {}, true).await;
    assert_eq!(e.held, [0]);
    assert!(matches!(e.end, Some(Message::UploadComplete(_))), "{e:?}");
    let e = upload(&globex, &begin, &bytes, |_| true, |_| {}, true).await;
    assert!(e.held.is_empty(), "{e:?}");
    assert!(matches!(e.end, Some(Message::UploadComplete(_))), "{e:?}");
    let received: Vec<_> = uploads(&s.cloud)
        .iter()
        .map(|u| u["chunks_received"].clone())
        .collect();
    assert!(
        received.contains(&serde_json::json!(chunks)),
        "Globex sent all {chunks}: {received:?}"
    );
}

/// Upload streams an account may hold open: fewer than twice its uploads in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_streams_past_twice_the_uploads_in_progress_are_limit_exceeded() {
    let s = setup("[adapters]\nuploads_per_account = 1\n");
    let (_endpoint, conn) = connect(&s.owner).await;
    let bytes = std::fs::read(adapter(s.files.path(), "a.gguf", 7, 0)).unwrap();
    let begin = declare("streams", &bytes);
    let open = || async {
        let (mut tx, rx) = conn.open_bi().await.unwrap();
        let mut rx = FramedRecv::new(rx, FrameLimits::default());
        synesis_wire::send(&mut tx, &begin.clone().into(), FrameLimits::default())
            .await
            .unwrap();
        let first = rx.next().await.unwrap();
        (tx, rx, first)
    };
    // Two streams of the one upload in progress (the newer takes over): both answered.
    let (_tx1, _rx1, first) = open().await;
    assert!(matches!(first, Some(Message::UploadResume(_))), "{first:?}");
    let (_tx2, _rx2, second) = open().await;
    assert!(
        matches!(second, Some(Message::UploadResume(_))),
        "{second:?}"
    );
    // A third while they are open: refused.
    let (_tx3, _rx3, third) = open().await;
    assert!(
        matches!(&third, Some(Message::ErrorMsg(e)) if e.code == ErrorCode::LIMIT_EXCEEDED),
        "{third:?}"
    );
}
