//! Issue 23, items 3–5, over the real QUIC wire with a real cloud (PROTOCOL.md §2,
//! *Escalation* and *Usage*): an answer is its asking member's alone; a request cancelled
//! once its provider has the prompt is charged its input; the cloud's own count of an
//! upstream's output does not undercount several tokens per chunk.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::time::Duration;

use synesis_e2e::upstream::{Script, upstream, upstream_model};
use synesis_e2e::wire::{device_conn, exchange, frame, new_id, usage_request};
use synesis_e2e::{Device, escalation_request, tiny_cloud};
use synesis_proto::message::{
    ErrorMsg, EscalationCancel, EscalationDone, EscalationRequest, EscalationResume, FinishReason,
    UsageReply, UsageRequest,
};
use synesis_proto::{ErrorCode, FrameLimits, Message, RequestId};
use synesis_wire::FramedRecv;

/// How long any one answer may take here (the cloud's own limits are far shorter).
const ANSWER_MAX: Duration = Duration::from_secs(60);

/// Reads a stream's answer to its end: the text and the `EscalationDone`, or the `ErrorMsg`.
async fn answer(
    rx: &mut FramedRecv<quinn::RecvStream>,
) -> Result<(String, EscalationDone), ErrorMsg> {
    let mut text = String::new();
    loop {
        let next = tokio::time::timeout(ANSWER_MAX, rx.next())
            .await
            .expect("the cloud answers in time");
        match next.expect("the stream reads") {
            Some(Message::EscalationChunk(c)) => text.push_str(&c.text),
            Some(Message::EscalationDone(d)) => return Ok((text, d)),
            Some(Message::ErrorMsg(e)) => return Err(e),
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// A stream opened with `first`, its answer not read yet.
async fn open(
    conn: &quinn::Connection,
    first: impl Into<Message>,
) -> (quinn::SendStream, FramedRecv<quinn::RecvStream>) {
    let (mut tx, rx) = conn.open_bi().await.expect("a stream opens");
    tx.write_all(&frame(first))
        .await
        .expect("the request is sent");
    (tx, FramedRecv::new(rx, FrameLimits::default()))
}

async fn escalate(
    conn: &quinn::Connection,
    request: EscalationRequest,
) -> Result<(String, EscalationDone), ErrorMsg> {
    let (_tx, mut rx) = open(conn, request).await;
    answer(&mut rx).await
}

async fn resume(
    conn: &quinn::Connection,
    request_id: RequestId,
) -> Result<(String, EscalationDone), ErrorMsg> {
    let (_tx, mut rx) = open(
        conn,
        EscalationResume {
            request_id,
            next_seq: 0,
        },
    )
    .await;
    answer(&mut rx).await
}

async fn usage(conn: &quinn::Connection, request: UsageRequest) -> Result<UsageReply, ErrorMsg> {
    match exchange(conn, request).await {
        Some(Message::UsageReply(u)) => Ok(u),
        Some(Message::ErrorMsg(e)) => Err(e),
        other => panic!("unexpected {other:?}"),
    }
}

fn listed(u: &UsageReply) -> Vec<RequestId> {
    u.charges.iter().map(|c| c.request_id).collect()
}

/// A device of a new member `name` of account `acme`, with `role`.
fn member(cloud: &synesis_e2e::Cloud, name: &str, role: &str) -> Device {
    synesis_e2e::run_ok(
        cloud
            .admin()
            .args(["member", "add", "acme", name, "--role", role]),
    );
    let out = synesis_e2e::run_ok(cloud.admin().args([
        "token",
        "create",
        "--account",
        "acme",
        "--member",
        name,
    ]));
    let device = Device::new();
    device.login(String::from_utf8(out.stdout).unwrap().trim());
    device
}

/// The refusal another member gets for a request id, compared with the one for an id nobody
/// used: the same code and the same words (the request id aside).
fn same_as_unknown(theirs: &ErrorMsg, unknown: &ErrorMsg) {
    assert_eq!(
        (theirs.code, &theirs.message, theirs.retry_after_ms),
        (unknown.code, &unknown.message, unknown.retry_after_ms),
        "another member's request id must look unknown"
    );
}

/// A tiny cloud (account `acme`), a commenter Carl, a second device of the owner (its
/// laptop), and one answer the owner asked for.
struct Asked {
    t: synesis_e2e::TinyCloud,
    carl: Device,
    laptop: Device,
    id: RequestId,
    request: EscalationRequest,
    answer: (String, EscalationDone),
}

const HEARTBEAT: Duration = Duration::from_secs(1);

async fn asked() -> Asked {
    let t = tiny_cloud("");
    let carl = member(&t.cloud, "carl@example.com", "commenter");
    let laptop = Device::new();
    laptop.login(&t.cloud.token("acme", "1h"));
    let owner = device_conn(&t.cloud, &t.owner, HEARTBEAT).await;
    let id = new_id();
    let request = escalation_request(id, "tiny", "hello", 8);
    let answer = escalate(&owner, request.clone()).await.expect("answered");
    assert!(answer.1.chunks > 0, "{answer:?}");
    Asked {
        t,
        carl,
        laptop,
        id,
        request,
        answer,
    }
}

/// What Carl (who knows the id: it used to be in his usage listing) and the owner's laptop
/// get for the owner's request: Carl neither resumes nor replays it, the laptop does both.
async fn only_the_asking_member_gets_the_answer(a: &Asked) {
    let carl = device_conn(&a.t.cloud, &a.carl, HEARTBEAT).await;
    let laptop = device_conn(&a.t.cloud, &a.laptop, HEARTBEAT).await;
    let unknown = resume(&carl, new_id()).await.expect_err("unknown id");
    assert_eq!(unknown.code, ErrorCode::NOT_FOUND, "{unknown:?}");
    let theirs = resume(&carl, a.id)
        .await
        .expect_err("another member's answer is not resumed");
    same_as_unknown(&theirs, &unknown);
    // The same body, and another: one conflict, in the same words, nothing streamed.
    let mut other = a.request.clone();
    other.preferences.max_tokens = 4;
    let mut refusals = Vec::new();
    for r in [a.request.clone(), other] {
        // The first frame back is the refusal: no chunk of the answer comes first.
        match exchange(&carl, r).await {
            Some(Message::ErrorMsg(e)) => {
                assert_eq!(e.code, ErrorCode::IDEMPOTENCY_CONFLICT, "{e:?}");
                refusals.push(e.message);
            }
            other => panic!("another member's request id is replayed: {other:?}"),
        }
    }
    assert_eq!(
        refusals[0], refusals[1],
        "whether the body matched is not told"
    );
    // The owner's other device: the member that asked, so the same answer, charged once.
    assert_eq!(resume(&laptop, a.id).await.expect("resumed"), a.answer);
    assert_eq!(
        escalate(&laptop, a.request.clone())
            .await
            .expect("replayed"),
        a.answer
    );
}

/// Issue 23 item 3, while the run is in memory (within the resume window): a commenter of the
/// account cannot resume or replay the owner's answer; the owner's other device can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_member_can_neither_resume_nor_replay_an_answer_in_memory() {
    let a = asked().await;
    only_the_asking_member_gets_the_answer(&a).await;
}

/// Issue 23 item 3, from the stored copy: the cloud restarted (nothing is in memory), and the
/// answer is the owner's member's still.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_member_can_neither_resume_nor_replay_a_stored_answer() {
    let mut a = asked().await;
    a.t.cloud.restart();
    only_the_asking_member_gets_the_answer(&a).await;
}

/// Issue 23 item 3, the usage listing: a member other than the owner lists its own charges
/// only (no other member's request id), and cannot page from another member's charge; the
/// owner lists every member's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_other_than_the_owner_lists_only_its_own_charges() {
    let a = asked().await;
    let carl = device_conn(&a.t.cloud, &a.carl, HEARTBEAT).await;
    let mine = new_id();
    escalate(&carl, escalation_request(mine, "tiny", "hi", 4))
        .await
        .expect("the commenter's own answer");
    let seen = usage(&carl, usage_request()).await.expect("a usage page");
    assert_eq!(listed(&seen), vec![mine], "{seen:?}");
    let from_theirs = usage(
        &carl,
        UsageRequest {
            after: Some(a.id),
            ..usage_request()
        },
    )
    .await
    .expect_err("another member's charge is no cursor");
    assert_eq!(
        from_theirs.code,
        ErrorCode::INVALID_REQUEST,
        "{from_theirs:?}"
    );
    let owner = device_conn(&a.t.cloud, &a.t.owner, HEARTBEAT).await;
    let all = usage(&owner, usage_request()).await.expect("a usage page");
    assert_eq!(
        listed(&all),
        vec![a.id, mine],
        "the owner lists every member's"
    );
    // Carl resumes his own answer.
    assert_eq!(
        resume(&carl, mine).await.expect("his own").1.request_id,
        mine
    );
}

/// Waits until the upstream has been asked `n` times (each request has reached it).
async fn upstream_asked(up: &synesis_e2e::upstream::Upstream, n: usize) {
    let deadline = tokio::time::Instant::now() + ANSWER_MAX;
    while up.seen.lock().unwrap().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upstream was asked {} times, not {n}",
            up.seen.lock().unwrap().len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Issue 23 item 4: an upstream slow to its first byte has every prompt; requests cancelled
/// then (by `EscalationCancel`, or by a reset with the code of `CANCELLED`) are charged their
/// input, not nothing, however many there are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_before_the_first_chunk_still_charges_the_input_the_upstream_has() {
    const REQUESTS: usize = 4;
    let up = upstream(vec![Script::Silent; REQUESTS]).await;
    let t = tiny_cloud(&format!(
        "[escalation]\nidle_timeout = \"120s\"\n{}",
        upstream_model(up.port, "[\"managed\"]")
    ));
    let conn = device_conn(&t.cloud, &t.owner, Duration::from_secs(1)).await;
    let before = usage(&conn, usage_request()).await.expect("usage");
    let prompt = "x".repeat(8 * 1024);
    let mut streams = Vec::new();
    for _ in 0..REQUESTS {
        let id = new_id();
        let (tx, rx) = open(&conn, escalation_request(id, "up", &prompt, 16)).await;
        streams.push((id, tx, rx));
    }
    upstream_asked(&up, REQUESTS).await;

    let mut charged = 0;
    let (reset_id, mut reset_tx, _reset_rx) = streams.pop().expect("one to reset");
    for (id, mut tx, mut rx) in streams {
        tx.write_all(&frame(EscalationCancel { request_id: id }))
            .await
            .expect("the cancel is sent");
        let (text, done) = answer(&mut rx)
            .await
            .expect("a cancelled request the upstream had is settled, not refused");
        assert_eq!(text, "");
        assert_eq!(
            (done.finish_reason, done.chunks, done.usage.output_tokens),
            (FinishReason::Cancelled, 0, 0),
            "{done:?}"
        );
        assert!(
            done.usage.input_tokens >= prompt.len() as u64 && done.usage_counted,
            "charged at least the prompt's bound: {done:?}"
        );
        assert!(done.cost.total.0 > 0, "{done:?}");
        charged += done.cost.total.0;
    }
    reset_tx
        .reset(quinn::VarInt::from_u32(u32::from(ErrorCode::CANCELLED.0)))
        .expect("the stream resets");

    // Every one is on the ledger, the reset one too, and no hold is left open.
    let deadline = tokio::time::Instant::now() + ANSWER_MAX;
    let after = loop {
        let u = usage(&conn, usage_request()).await.expect("usage");
        if u.held.0 == 0 && u.charges.len() == REQUESTS {
            break u;
        }
        assert!(tokio::time::Instant::now() < deadline, "{u:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let reset = after
        .charges
        .iter()
        .find(|c| c.request_id == reset_id)
        .expect("the reset request is charged");
    assert!(reset.usage.input_tokens >= prompt.len() as u64, "{reset:?}");
    assert_eq!(reset.usage.output_tokens, 0);
    assert_eq!(
        before.balance.0 - after.balance.0,
        charged + reset.total.0,
        "the balance paid exactly the charges"
    );
}

/// Issue 23 item 5: an upstream that gives no usage and sends several tokens per chunk is
/// counted at one token per four bytes at least (not one per chunk), never past `max_tokens`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uncounted_upstream_with_long_chunks_is_not_billed_one_token_per_chunk() {
    const DELTAS: &[&str] = &[
        "The quick brown fox jumps over",
        " the lazy dog, and then it runs far away.",
    ];
    let bytes: usize = DELTAS.iter().map(|d| d.len()).sum();
    let up = upstream(vec![Script::Deltas(DELTAS), Script::Deltas(DELTAS)]).await;
    let t = tiny_cloud(&upstream_model(up.port, "[\"managed\"]"));
    let conn = device_conn(&t.cloud, &t.owner, Duration::from_secs(1)).await;

    let (text, done) = escalate(&conn, escalation_request(new_id(), "up", "hello", 64))
        .await
        .expect("answered");
    assert_eq!(text, DELTAS.concat());
    assert_eq!(done.chunks, 2);
    assert!(done.usage_counted, "{done:?}");
    assert_eq!(
        done.usage.output_tokens,
        bytes.div_ceil(4) as u64,
        "one token per 4 bytes, not one per chunk: {done:?}"
    );

    // Never more than the hold's output: max_tokens 8 caps the estimate.
    let (_, capped) = escalate(&conn, escalation_request(new_id(), "up", "hello", 8))
        .await
        .expect("answered");
    assert_eq!(capped.usage.output_tokens, 8, "{capped:?}");
}

/// Issue 23 item 5, in process: a request cancelled mid-answer is charged the model's own
/// count of the tokens it generated (`usage_counted: false`), not the cloud's estimate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_in_process_model_reports_its_exact_count_when_cancelled() {
    // A context long enough for an answer that is still running when the cancel comes.
    let spec = synesis_infer::tiny::TinySpec {
        n_ctx: 4_096,
        ..synesis_infer::tiny::TinySpec::TINY
    };
    let t = synesis_e2e::tiny_cloud_with(spec, "");
    let conn = device_conn(&t.cloud, &t.owner, HEARTBEAT).await;
    let id = new_id();
    let (mut tx, mut rx) = open(&conn, escalation_request(id, "tiny", "hello", 4_000)).await;
    let mut chunks = 0;
    let done = loop {
        let next = tokio::time::timeout(ANSWER_MAX, rx.next())
            .await
            .expect("the cloud answers in time");
        match next.expect("the stream reads") {
            Some(Message::EscalationChunk(_)) => {
                chunks += 1;
                if chunks == 5 {
                    tx.write_all(&frame(EscalationCancel { request_id: id }))
                        .await
                        .expect("the cancel is sent");
                }
            }
            Some(Message::EscalationDone(d)) => break d,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(done.finish_reason, FinishReason::Cancelled, "{done:?}");
    assert_eq!(done.chunks, chunks, "{done:?}");
    assert!(!done.usage_counted, "the model's own count: {done:?}");
    assert!(
        done.usage.output_tokens >= u64::from(chunks) && done.usage.output_tokens < 4_000,
        "{done:?}"
    );
}
