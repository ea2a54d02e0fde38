//! The upload's pieces (id, chunk plan, frames, hashing), and whole pushes over both routes to
//! an in-process fake cloud on loopback that keeps chunks as PROTOCOL.md §2 *Upload* says.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // test code

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use synesis_proto::message::{UploadChunk, UploadResume};
use synesis_proto::{AccountId, DeviceId, FrameLimits, UnixMillis, encode_frame_vec};
use synesis_wire::{FramedRecv, send};

use super::*;
use crate::identity::{Identity, IdentityInfo};
use crate::route::Direct;
use crate::testing::{self, FakeTunnel, Loopback};

const KIB: u32 = 1024;

// ------------------------------------------------------------------ the pieces

#[test]
fn the_upload_id_is_the_one_the_protocol_derives() {
    // Computed apart from this code: SHA-256 over the fields as PROTOCOL.md §2 lays them out,
    // the first 16 bytes with the UUID v8 version and variant bits.
    let id = upload_id("legal", &Sha256([0xab; 32]), 10_000, 1 << 20);
    assert_eq!(id.to_string(), "9b813c2d-a87a-8dfe-9feb-858808c1d359");
    assert_eq!(id.as_uuid().get_version_num(), 8);
}

#[test]
fn the_upload_id_is_deterministic_and_changes_with_every_input() {
    let base = || upload_id("legal", &Sha256([1; 32]), 5_000_000, CHUNK_SIZE_DEFAULT);
    assert_eq!(base(), base());
    let mut digest = [1; 32];
    digest[31] = 2;
    let others = [
        upload_id("legal2", &Sha256([1; 32]), 5_000_000, CHUNK_SIZE_DEFAULT),
        upload_id("legaL", &Sha256([1; 32]), 5_000_000, CHUNK_SIZE_DEFAULT),
        upload_id("legal", &Sha256(digest), 5_000_000, CHUNK_SIZE_DEFAULT),
        upload_id("legal", &Sha256([1; 32]), 5_000_001, CHUNK_SIZE_DEFAULT),
        upload_id("legal", &Sha256([1; 32]), 5_000_000, CHUNK_SIZE_MIN),
    ];
    for (i, other) in others.iter().enumerate() {
        assert_ne!(*other, base(), "input {i} did not change the id");
    }
    // The name ends at its NUL: "ab" + digest is not "a" + "b…".
    assert_ne!(
        upload_id("ab", &Sha256([0; 32]), 1, CHUNK_SIZE_MIN),
        upload_id("a", &Sha256([0; 32]), 1, CHUNK_SIZE_MIN)
    );
}

/// The UUID v8 id §2 derives for an upload survives the wire (PROTOCOL.md §4 admits it).
#[test]
fn a_derived_upload_id_survives_the_wire() {
    let id = upload_id("legal", &Sha256([0xab; 32]), 10_000, 1 << 20);
    let done: Message = UploadDone { upload_id: id }.into();
    let frame = encode_frame_vec(&done, FrameLimits::default()).unwrap();
    let decoded = synesis_proto::decode_frame(&frame, FrameLimits::default()).unwrap();
    assert!(
        matches!(&decoded, synesis_proto::Decoded::Frame { message, .. } if *message == done),
        "{decoded:?}"
    );
}

#[test]
fn a_file_is_cut_into_whole_chunks_and_a_remainder() {
    let plan = ChunkPlan::new(u64::from(3 * 64 * KIB) + 10, 64 * KIB).unwrap();
    assert_eq!(plan.chunks(), 4);
    assert_eq!(
        (0..5).map(|i| plan.chunk_len(i)).collect::<Vec<_>>(),
        [64 * KIB, 64 * KIB, 64 * KIB, 10, 0]
    );
    assert_eq!(plan.offset(3), u64::from(3 * 64 * KIB));

    let exact = ChunkPlan::new(u64::from(2 * CHUNK_SIZE_DEFAULT), CHUNK_SIZE_DEFAULT).unwrap();
    assert_eq!(exact.chunks(), 2);
    assert_eq!(
        exact.chunk_len(1),
        CHUNK_SIZE_DEFAULT,
        "no empty last chunk"
    );

    let one_byte = ChunkPlan::new(1, CHUNK_SIZE_MAX).unwrap();
    assert_eq!((one_byte.chunks(), one_byte.chunk_len(0)), (1, 1));

    // A 2 GiB adapter in the default chunks: 2048 of them.
    let big = ChunkPlan::new(2 << 30, CHUNK_SIZE_DEFAULT).unwrap();
    assert_eq!(big.chunks(), 2048);
    assert_eq!(big.chunk_len(2047), CHUNK_SIZE_DEFAULT);
}

#[test]
fn a_plan_refuses_what_the_cloud_would() {
    assert_eq!(ChunkPlan::new(0, CHUNK_SIZE_DEFAULT), Err(PlanError::Empty));
    assert_eq!(
        ChunkPlan::new(10, CHUNK_SIZE_MIN - 1),
        Err(PlanError::ChunkSize(CHUNK_SIZE_MIN - 1))
    );
    assert_eq!(
        ChunkPlan::new(10, CHUNK_SIZE_MAX + 1),
        Err(PlanError::ChunkSize(CHUNK_SIZE_MAX + 1))
    );
    assert!(ChunkPlan::new(10, CHUNK_SIZE_MIN).is_ok());
    assert!(ChunkPlan::new(10, CHUNK_SIZE_MAX).is_ok());
    assert!(matches!(
        ChunkPlan::new(u64::MAX, CHUNK_SIZE_MIN),
        Err(PlanError::TooManyChunks { .. })
    ));
}

#[test]
fn only_the_chunks_the_cloud_lacks_are_sent() {
    let plan = ChunkPlan::new(u64::from(4 * 64 * KIB) + 10, 64 * KIB).unwrap(); // 5 chunks
    let all = plan.remaining(&[]).unwrap();
    assert_eq!(all.to_send, [0, 1, 2, 3, 4]);
    assert_eq!(all.held_bytes, 0);

    let some = plan.remaining(&[1, 4]).unwrap();
    assert_eq!(some.to_send, [0, 2, 3]);
    assert_eq!(
        some.held_bytes,
        u64::from(64 * KIB) + 10,
        "the last is the short one"
    );

    // Out of order and repeated: tolerated, counted once.
    let messy = plan.remaining(&[4, 1, 1]).unwrap();
    assert_eq!(messy, some);

    let none = plan.remaining(&[0, 1, 2, 3, 4]).unwrap();
    assert!(none.to_send.is_empty());
    assert_eq!(none.held_bytes, plan.size_bytes());

    assert_eq!(
        plan.remaining(&[0, 5]),
        Err(PlanError::HeldOutOfRange {
            index: 5,
            chunks: 5
        })
    );
}

#[test]
fn a_chunk_frame_built_in_place_is_the_codecs_frame_byte_for_byte() {
    let id = RequestId::from_parts(1_795_000_000_000, [4; 10]);
    // The varints' edges: one byte below 251, then 0xfb + u16, 0xfc + u32.
    for index in [0, 1, 250, 251, 65_535, 65_536, u32::MAX] {
        for len in [1, 250, 251, 65_535, 65_536, 100_000] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let expected = encode_frame_vec(
                &UploadChunk {
                    upload_id: id,
                    index,
                    data: data.clone().into(),
                }
                .into(),
                FrameLimits::default(),
            )
            .unwrap();
            let mut built = chunk_frame_head(id, index, len);
            built.extend_from_slice(&data);
            assert_eq!(built, expected, "index {index}, {len} bytes");
        }
    }
}

#[test]
fn chunk_frames_are_read_from_their_place_in_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.gguf");
    let content = pattern(u64::from(2 * 64 * KIB) + 7);
    std::fs::write(&path, &content).unwrap();
    let plan = ChunkPlan::new(content.len() as u64, 64 * KIB).unwrap();
    let id = RequestId::from_parts(1, [1; 10]);
    let file = File::open(&path).unwrap();
    for index in 0..plan.chunks() {
        let chunk = chunk_frame(&file, &plan, id, index).unwrap();
        let decoded = synesis_proto::decode_frame(&chunk.frame, FrameLimits::default()).unwrap();
        let synesis_proto::Decoded::Frame {
            message: Message::UploadChunk(c),
            consumed,
        } = decoded
        else {
            panic!("{decoded:?}");
        };
        assert_eq!(consumed, chunk.frame.len());
        assert_eq!((c.upload_id, c.index), (id, index));
        assert_eq!(chunk.len, plan.chunk_len(index));
        let start = plan.offset(index) as usize;
        assert_eq!(c.data.0, content[start..start + chunk.len as usize]);
    }
}

#[test]
fn hashing_streams_the_file_reports_progress_and_stops_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.gguf");
    let content = pattern(3 * u64::from(CHUNK_SIZE_DEFAULT) + 5);
    std::fs::write(&path, &content).unwrap();
    let mut seen = Vec::new();
    let digest = hash_file(&path, &AtomicBool::new(false), &mut |d| seen.push(d)).unwrap();
    assert_eq!(digest.size_bytes, content.len() as u64);
    assert_eq!(digest.sha256, Sha256(sha2::Sha256::digest(&content).into()));
    assert_eq!(seen.last(), Some(&(content.len() as u64)));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    let stopped = hash_file(&path, &AtomicBool::new(true), &mut |_| {}).unwrap_err();
    assert_eq!(stopped.kind(), io::ErrorKind::Interrupted);
}

#[test]
fn refusals_keep_their_code_and_only_the_retryable_are_waited_out() {
    let error = |code, retry_after_ms| ErrorMsg {
        code,
        message: "no".into(),
        request_id: None,
        retry_after_ms,
    };
    for code in [
        ErrorCode::HASH_MISMATCH,
        ErrorCode::ADAPTER_INVALID,
        ErrorCode::TOO_LARGE,
        ErrorCode::BUSY,
        ErrorCode::INVALID_REQUEST,
        ErrorCode::UNKNOWN_MODEL,
        ErrorCode::IDEMPOTENCY_CONFLICT,
    ] {
        match refusal(error(code, None)) {
            End::Failed(e @ PushError::Refused { .. }) => assert_eq!(e.code(), Some(code)),
            _ => panic!("{code} is final"),
        }
    }
    for code in [
        ErrorCode::LIMIT_EXCEEDED,
        ErrorCode::UNAVAILABLE,
        ErrorCode::INTERNAL,
    ] {
        match refusal(error(code, Some(1500))) {
            End::Broke {
                retry_after, cause, ..
            } => {
                assert_eq!(retry_after, Some(Duration::from_millis(1500)));
                assert_eq!(cause.and_then(|c| c.code()), Some(code));
            }
            _ => panic!("{code} is worth waiting out"),
        }
    }
    assert!(matches!(
        refusal(error(ErrorCode::DEVICE_REVOKED, None)),
        End::Failed(PushError::Cloud(RequestError::Revoked))
    ));
}

#[test]
fn names_the_cloud_would_refuse_are_refused_here() {
    for bad in ["", "a b", "ü", "a/b", &"x".repeat(65)] {
        assert!(
            matches!(check_name(bad), Err(PushError::Name(_))),
            "{bad:?}"
        );
    }
    for good in ["legal", "Legal-2.v1_final", &"x".repeat(64)] {
        assert!(check_name(good).is_ok(), "{good:?}");
    }
}

// ------------------------------------------------------------------ whole pushes

/// Bytes that differ from chunk to chunk, so a chunk in the wrong place changes the digest.
fn pattern(len: u64) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 65_536) as u8).collect()
}

/// How a stream to the fake cloud ended, as the cloud saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seen {
    Completed,
    /// The device ended its side cleanly after this many chunks, without `UploadDone`.
    EndedAfter(usize),
    /// The cloud broke the stream on purpose after this many chunks.
    BrokeAfter(usize),
    Refused(ErrorCode),
    /// The device reset the stream, or it failed.
    Reset,
}

#[derive(Default)]
struct Store {
    /// Chunks held per upload.
    held: HashMap<RequestId, BTreeMap<u32, Vec<u8>>>,
    /// Streams begun.
    begins: usize,
    seen: Vec<Seen>,
}

/// What the fake cloud does.
#[derive(Default, Clone)]
struct Behaviour {
    /// Answer every `UploadBegin` with this error (and its retry hint).
    refuse: Option<(ErrorCode, Option<u32>)>,
    /// Break the first stream after this many chunks.
    break_after: Option<usize>,
    /// Say the bytes do not hash to the digest.
    hash_mismatch: bool,
}

struct FakeCloud {
    store: Mutex<Store>,
    behaviour: Behaviour,
}

impl FakeCloud {
    fn new(behaviour: Behaviour) -> Arc<FakeCloud> {
        Arc::new(FakeCloud {
            store: Mutex::new(Store::default()),
            behaviour,
        })
    }

    fn saw(&self, seen: Seen) {
        self.store.lock().unwrap().seen.push(seen);
    }

    fn held_bytes(&self, id: RequestId) -> u64 {
        let store = self.store.lock().unwrap();
        store.held.get(&id).map_or(0, |chunks| {
            chunks.values().map(|c| c.len() as u64).sum::<u64>()
        })
    }

    fn hold(&self, id: RequestId, index: u32, data: Vec<u8>) {
        let mut store = self.store.lock().unwrap();
        store.held.entry(id).or_default().insert(index, data);
    }

    /// One upload stream, served as PROTOCOL.md §2 *Upload* says (without the storage).
    async fn serve(self: Arc<Self>, mut tx: quinn::SendStream, rx: quinn::RecvStream) {
        let limits = FrameLimits::default();
        let mut rx = FramedRecv::new(rx, limits);
        let Ok(Some(Message::UploadBegin(begin))) = rx.next().await else {
            return;
        };
        let stream = {
            let mut store = self.store.lock().unwrap();
            store.begins += 1;
            store.begins
        };
        if let Some((code, retry_after_ms)) = self.behaviour.refuse {
            let refusal = ErrorMsg {
                code,
                message: "refused".into(),
                request_id: Some(begin.upload_id),
                retry_after_ms,
            };
            send(&mut tx, &refusal.into(), limits).await.unwrap();
            let _ = tx.finish();
            self.saw(Seen::Refused(code));
            return;
        }
        let id = begin.upload_id;
        let plan = ChunkPlan::new(begin.size_bytes, begin.chunk_size_bytes).unwrap();
        let chunks_held = {
            let store = self.store.lock().unwrap();
            store
                .held
                .get(&id)
                .map(|c| c.keys().copied().collect())
                .unwrap_or_default()
        };
        let resume = UploadResume {
            upload_id: id,
            chunks_held,
        };
        send(&mut tx, &resume.into(), limits).await.unwrap();
        let mut chunks = 0;
        loop {
            match rx.next().await {
                Ok(Some(Message::UploadChunk(c))) => {
                    assert_eq!(c.upload_id, id);
                    assert_eq!(c.data.0.len(), plan.chunk_len(c.index) as usize);
                    self.hold(id, c.index, c.data.0);
                    chunks += 1;
                    if stream == 1 && self.behaviour.break_after == Some(chunks) {
                        let code = synesis_wire::close_code(ErrorCode::INTERNAL);
                        let _ = tx.reset(code);
                        let _ = rx.get_mut().stop(code);
                        self.saw(Seen::BrokeAfter(chunks));
                        return;
                    }
                }
                Ok(Some(Message::UploadDone(d))) => {
                    assert_eq!(d.upload_id, id);
                    let whole: Vec<u8> = {
                        let store = self.store.lock().unwrap();
                        let held = &store.held[&id];
                        assert_eq!(held.len() as u32, plan.chunks(), "every chunk is held");
                        held.values().flatten().copied().collect()
                    };
                    let digest = Sha256(sha2::Sha256::digest(&whole).into());
                    let reply: Message = if digest == begin.sha256 && !self.behaviour.hash_mismatch
                    {
                        UploadComplete {
                            upload_id: id,
                            sha256: digest,
                            serving: true,
                        }
                        .into()
                    } else {
                        self.store.lock().unwrap().held.remove(&id);
                        ErrorMsg {
                            code: ErrorCode::HASH_MISMATCH,
                            message: "the bytes do not hash to the digest".into(),
                            request_id: Some(id),
                            retry_after_ms: None,
                        }
                        .into()
                    };
                    send(&mut tx, &reply, limits).await.unwrap();
                    let _ = tx.finish();
                    self.saw(Seen::Completed);
                    return;
                }
                Ok(None) => {
                    let _ = tx.finish();
                    self.saw(Seen::EndedAfter(chunks));
                    return;
                }
                Ok(Some(other)) => panic!("the fake cloud does not take {other:?}"),
                Err(_) => {
                    self.saw(Seen::Reset);
                    return;
                }
            }
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Via {
    Service,
    Direct,
}

/// The fake cloud on loopback, and a route to it.
struct Setup {
    cloud: Arc<FakeCloud>,
    route: Route,
    _service: Option<testing::Service>,
    _server: quinn::Endpoint,
    dir: tempfile::TempDir,
}

fn identity() -> Identity {
    Identity {
        info: IdentityInfo {
            device_id: DeviceId::try_from_uuid(uuid::Uuid::from_u128(7)).unwrap(),
            account_id: AccountId::try_from_uuid(uuid::Uuid::from_u128(8)).unwrap(),
            account: "acme".into(),
            // Nothing listens here: a route that had to dial would not get through.
            server: "127.0.0.1:9".into(),
            enrolled_at: UnixMillis(0),
            nodes: Vec::new(),
        },
        key_der: vec![],
        cert_der: vec![],
        ca_der: vec![],
    }
}

impl Setup {
    async fn start(via: Via, behaviour: Behaviour) -> Setup {
        let cloud = FakeCloud::new(behaviour);
        let serving = Arc::clone(&cloud);
        let loopback = Loopback::start(move |tx, rx| Arc::clone(&serving).serve(tx, rx)).await;
        let (route, service) = match via {
            Via::Service => {
                let service = testing::Service::start(Arc::new(FakeTunnel {
                    conn: loopback.conn,
                }));
                let route = Route::Service(service.client.clone(), identity());
                (route, Some(service))
            }
            Via::Direct => {
                let direct = Direct {
                    endpoint: loopback.client,
                    conn: loopback.conn,
                    server: "127.0.0.1:9".into(),
                };
                (Route::Direct(identity(), Some(direct)), None)
            }
        };
        Setup {
            cloud,
            route,
            _service: service,
            _server: loopback.server,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn file(&self, len: u64) -> Upload {
        let path = self.dir.path().join("legal.gguf");
        std::fs::write(&path, pattern(len)).unwrap();
        Upload {
            path,
            name: "legal".into(),
            base_model: "tiny".into(),
            chunk_size_bytes: 64 * KIB,
        }
    }

    async fn push(&mut self, upload: &Upload) -> (Result<Pushed, PushError>, Vec<String>) {
        self.push_until(upload, |_| false).await
    }

    /// Pushes, cancelling when `stop` says so; returns what happened, in words.
    async fn push_until(
        &mut self,
        upload: &Upload,
        mut stop: impl FnMut(&Progress<'_>) -> bool + Send,
    ) -> (Result<Pushed, PushError>, Vec<String>) {
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let mut events = Vec::new();
        let mut on = |p: Progress<'_>| {
            if stop(&p) {
                let _ = cancel_tx.send(true);
            }
            match p {
                Progress::Hashing { .. } | Progress::Sent { .. } => {}
                other => events.push(format!("{other:?}")),
            }
        };
        let pushed = tokio::time::timeout(
            Duration::from_secs(30),
            push(&mut self.route, upload, cancel_rx, &mut on),
        )
        .await
        .expect("the push ends");
        (pushed, events)
    }

    fn id(&self, upload: &Upload) -> RequestId {
        let content = std::fs::read(&upload.path).unwrap();
        let digest = Sha256(sha2::Sha256::digest(&content).into());
        upload_id(
            &upload.name,
            &digest,
            content.len() as u64,
            upload.chunk_size_bytes,
        )
    }

    fn seen(&self) -> Vec<Seen> {
        self.cloud.store.lock().unwrap().seen.clone()
    }
}

/// 4 whole chunks of 64 KiB and a short fifth.
const FILE_BYTES: u64 = 4 * 64 * 1024 + 1000;

async fn a_new_upload_sends_every_chunk_once(via: Via) {
    let mut setup = Setup::start(via, Behaviour::default()).await;
    let upload = setup.file(FILE_BYTES);
    let (pushed, events) = setup.push(&upload).await;
    let pushed = pushed.unwrap();
    assert_eq!(pushed.bytes, FILE_BYTES);
    assert_eq!(pushed.resumed_from_bytes, 0);
    assert_eq!(pushed.sent_bytes, FILE_BYTES);
    assert_eq!(pushed.resumes, 0);
    assert!(pushed.complete.serving);
    assert_eq!(pushed.complete.upload_id, setup.id(&upload));
    assert_eq!(
        pushed.sha256,
        Sha256(sha2::Sha256::digest(pattern(FILE_BYTES)).into())
    );
    assert_eq!(setup.cloud.held_bytes(pushed.upload_id), FILE_BYTES);
    assert_eq!(setup.seen(), [Seen::Completed]);
    assert_eq!(
        events,
        [
            format!(
                "{:?}",
                Progress::Sending {
                    held_bytes: 0,
                    total_bytes: FILE_BYTES,
                    resumed: false
                }
            ),
            "Verifying".to_owned()
        ]
    );
}

#[tokio::test]
async fn a_new_upload_sends_every_chunk_once_through_the_service() {
    a_new_upload_sends_every_chunk_once(Via::Service).await;
}

#[tokio::test]
async fn a_new_upload_sends_every_chunk_once_on_a_connection_of_its_own() {
    a_new_upload_sends_every_chunk_once(Via::Direct).await;
}

async fn only_the_chunks_the_cloud_lacks_go(via: Via) {
    let mut setup = Setup::start(via, Behaviour::default()).await;
    let upload = setup.file(FILE_BYTES);
    let id = setup.id(&upload);
    let content = pattern(FILE_BYTES);
    let chunk = |i: usize| content[i * 65_536..((i + 1) * 65_536).min(content.len())].to_vec();
    setup.cloud.hold(id, 1, chunk(1));
    setup.cloud.hold(id, 4, chunk(4));
    let (pushed, _) = setup.push(&upload).await;
    let pushed = pushed.unwrap();
    assert_eq!(pushed.resumed_from_bytes, 65_536 + 1000);
    assert_eq!(pushed.sent_bytes, FILE_BYTES - 65_536 - 1000);
    assert_eq!(setup.seen(), [Seen::Completed]);

    // Pushed again: the cloud holds it all, and not a chunk goes.
    let (again, _) = setup.push(&upload).await;
    let again = again.unwrap();
    assert_eq!(again.resumed_from_bytes, FILE_BYTES);
    assert_eq!(again.sent_bytes, 0);
    assert_eq!(again.throughput_mib_s(), 0.0);
}

#[tokio::test]
async fn only_the_chunks_the_cloud_lacks_go_through_the_service() {
    only_the_chunks_the_cloud_lacks_go(Via::Service).await;
}

#[tokio::test]
async fn only_the_chunks_the_cloud_lacks_go_on_a_connection_of_its_own() {
    only_the_chunks_the_cloud_lacks_go(Via::Direct).await;
}

async fn a_broken_stream_is_resumed_from_what_the_cloud_holds(via: Via) {
    let behaviour = Behaviour {
        break_after: Some(2),
        ..Behaviour::default()
    };
    let mut setup = Setup::start(via, behaviour).await;
    let upload = setup.file(FILE_BYTES);
    let (pushed, events) = setup.push(&upload).await;
    let pushed = pushed.unwrap();
    assert_eq!(pushed.resumes, 1);
    assert_eq!(pushed.resumed_from_bytes, 0, "what the cloud held at first");
    assert!(
        pushed.sent_bytes >= FILE_BYTES,
        "chunks in flight at the break go again"
    );
    assert_eq!(setup.seen(), [Seen::BrokeAfter(2), Seen::Completed]);
    // The break may come before or after the last chunk went into the stream's buffers.
    let interrupted = events
        .iter()
        .position(|e| e.starts_with("Interrupted"))
        .expect("the break was told");
    assert_eq!(
        events[interrupted + 1],
        format!(
            "{:?}",
            Progress::Sending {
                held_bytes: 2 * 65_536,
                total_bytes: FILE_BYTES,
                resumed: true
            }
        ),
        "{events:?}"
    );
    assert_eq!(events.last().map(String::as_str), Some("Verifying"));
}

#[tokio::test]
async fn a_broken_stream_is_resumed_through_the_service() {
    a_broken_stream_is_resumed_from_what_the_cloud_holds(Via::Service).await;
}

#[tokio::test]
async fn a_broken_stream_is_resumed_on_a_connection_of_its_own() {
    a_broken_stream_is_resumed_from_what_the_cloud_holds(Via::Direct).await;
}

async fn cancelling_ends_the_stream_cleanly_and_the_next_push_resumes(via: Via) {
    let mut setup = Setup::start(via, Behaviour::default()).await;
    let upload = setup.file(FILE_BYTES);
    let id = setup.id(&upload);
    let (cancelled, _) = setup
        .push_until(&upload, |p| matches!(p, Progress::Sent { .. }))
        .await;
    match cancelled {
        Err(PushError::Cancelled {
            held_bytes: Some(held),
            total_bytes,
        }) => {
            assert_eq!(total_bytes, FILE_BYTES);
            assert_eq!(held, 65_536, "the one chunk sent, acknowledged");
            assert_eq!(setup.cloud.held_bytes(id), held);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        setup.seen(),
        [Seen::EndedAfter(1)],
        "a clean end, not a reset"
    );

    let (pushed, _) = setup.push(&upload).await;
    let pushed = pushed.unwrap();
    assert_eq!(pushed.resumed_from_bytes, 65_536);
    assert_eq!(pushed.sent_bytes, FILE_BYTES - 65_536);
}

#[tokio::test]
async fn cancelling_ends_the_stream_cleanly_through_the_service() {
    cancelling_ends_the_stream_cleanly_and_the_next_push_resumes(Via::Service).await;
}

#[tokio::test]
async fn cancelling_ends_the_stream_cleanly_on_a_connection_of_its_own() {
    cancelling_ends_the_stream_cleanly_and_the_next_push_resumes(Via::Direct).await;
}

#[tokio::test]
async fn cancelling_while_the_cloud_verifies_still_takes_its_verdict() {
    let mut setup = Setup::start(Via::Direct, Behaviour::default()).await;
    let upload = setup.file(FILE_BYTES);
    let (pushed, _) = setup
        .push_until(&upload, |p| matches!(p, Progress::Verifying))
        .await;
    assert_eq!(pushed.unwrap().bytes, FILE_BYTES);
    assert_eq!(setup.seen(), [Seen::Completed]);
}

#[tokio::test]
async fn cancelling_while_hashing_sends_nothing() {
    let mut setup = Setup::start(Via::Direct, Behaviour::default()).await;
    let upload = setup.file(FILE_BYTES);
    let (cancelled, _) = setup
        .push_until(&upload, |p| matches!(p, Progress::Hashing { .. }))
        .await;
    assert!(
        matches!(
            cancelled,
            Err(PushError::Cancelled {
                held_bytes: None,
                ..
            })
        ),
        "{cancelled:?}"
    );
    assert!(setup.seen().is_empty());
}

#[tokio::test]
async fn a_refusal_ends_the_push_with_its_code() {
    let behaviour = Behaviour {
        refuse: Some((ErrorCode::TOO_LARGE, None)),
        ..Behaviour::default()
    };
    let mut setup = Setup::start(Via::Service, behaviour).await;
    let upload = setup.file(FILE_BYTES);
    let (refused, _) = setup.push(&upload).await;
    match refused {
        Err(e @ PushError::Refused { .. }) => assert_eq!(e.code(), Some(ErrorCode::TOO_LARGE)),
        other => panic!("{other:?}"),
    }
    assert_eq!(setup.seen(), [Seen::Refused(ErrorCode::TOO_LARGE)]);
}

#[tokio::test]
async fn a_busy_cloud_that_asks_for_longer_than_the_push_waits_is_a_refusal() {
    let behaviour = Behaviour {
        refuse: Some((ErrorCode::UNAVAILABLE, Some(60_000))),
        ..Behaviour::default()
    };
    let mut setup = Setup::start(Via::Direct, behaviour).await;
    let upload = setup.file(FILE_BYTES);
    let (refused, _) = setup.push(&upload).await;
    match refused {
        Err(PushError::Refused {
            code,
            retry_after_ms,
            ..
        }) => {
            assert_eq!(code, ErrorCode::UNAVAILABLE);
            assert_eq!(retry_after_ms, Some(60_000));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(setup.seen(), [Seen::Refused(ErrorCode::UNAVAILABLE)]);
}

#[tokio::test]
async fn a_hash_mismatch_is_the_clouds_verdict() {
    let behaviour = Behaviour {
        hash_mismatch: true,
        ..Behaviour::default()
    };
    let mut setup = Setup::start(Via::Direct, behaviour).await;
    let upload = setup.file(FILE_BYTES);
    let (refused, events) = setup.push(&upload).await;
    assert_eq!(
        refused.map_err(|e| e.code()).unwrap_err(),
        Some(ErrorCode::HASH_MISMATCH)
    );
    assert_eq!(events.last().map(String::as_str), Some("Verifying"));
}

#[tokio::test]
async fn what_the_cloud_would_refuse_is_refused_before_hashing() {
    let mut setup = Setup::start(Via::Direct, Behaviour::default()).await;
    let mut upload = setup.file(FILE_BYTES);
    upload.chunk_size_bytes = 1000;
    let (refused, events) = setup.push(&upload).await;
    assert!(
        matches!(refused, Err(PushError::Plan(PlanError::ChunkSize(1000)))),
        "{refused:?}"
    );
    assert!(events.is_empty());
    let mut empty = setup.file(0);
    empty.name = "empty".into();
    let (refused, _) = setup.push(&empty).await;
    assert!(matches!(refused, Err(PushError::Plan(PlanError::Empty))));
    assert!(setup.seen().is_empty());
}
