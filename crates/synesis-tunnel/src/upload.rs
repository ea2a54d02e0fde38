//! One adapter upload from the device's side (PROTOCOL.md §2, *Upload*): the file hashed, the
//! `UploadBegin` that names it, the chunks the cloud does not hold yet, `UploadDone`, and the
//! cloud's verdict (`UploadComplete` or an `ErrorMsg`) — across broken connections.
//!
//! What this module owns:
//! - [`upload_id`]: the upload's id, derived from what is uploaded (§2 *Upload* step 1), so that
//!   the same push after a break, a crash or a Ctrl-C names the same upload and resumes it;
//! - [`ChunkPlan`]: the file cut into chunks, and what is left to send given the chunks the
//!   cloud holds (`UploadResume`);
//! - [`hash_file`]: the SHA-256 of a file, read piece by piece in constant memory;
//! - [`push`]: the whole exchange, over a [`Route`] (the tunnel service, or a connection of this
//!   process's own), with [`Progress`] for the caller, a cancel signal, and a typed
//!   [`PushError`] (each refusal keeps the cloud's code).
//!
//! The file never sits in memory whole: a blocking task reads the missing chunks with
//! positioned reads, each straight into the frame that carries it, a few chunks ahead of the
//! stream, and the stream takes them as fast as QUIC flow control lets it — no round trip per
//! chunk, and no copy of a chunk on a direct connection (the frame is handed to quinn as is).
//!
//! A stream or connection that breaks mid-upload (anything but an `ErrorMsg`) is retried on a
//! new stream with the same `UploadBegin`: the cloud answers with the chunks it holds, and only
//! the others are sent. A cloud never reached gives up after [`FIRST_CONTACT_FOR`]; once
//! reached, after [`RECONNECT_FOR`] without a chunk going out. Cancelling stops at a chunk's
//! boundary and ends the stream cleanly, so the cloud keeps every chunk it received, and says
//! how many bytes the cloud holds ([`PushError::Cancelled`]).
//!
//! The CLI only renders: `synesis cloud push` (crates/synesis-cli/src/commands/push.rs).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use sha2::Digest;
use synesis_proto::message::{ErrorMsg, UploadBegin, UploadComplete, UploadDone};
use synesis_proto::{
    ErrorCode, FRAME_HEADER_BYTES, FRAME_PAYLOAD_MAX_BYTES, Message, MessageType, RequestId, Sha256,
};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::request::{RequestError, answer};
pub use crate::route::{FIRST_CONTACT_FOR, RECONNECT_FOR, Route};
use crate::route::{Incoming, RETRY_EVERY, Sink, retryable};

/// The chunk size `synesis` uses unless told otherwise: 1 MiB.
pub const CHUNK_SIZE_DEFAULT: u32 = 1 << 20;
/// The smallest chunk size the cloud accepts (PROTOCOL.md §2 *Upload* step 2): 64 KiB.
pub const CHUNK_SIZE_MIN: u32 = 64 << 10;
/// The largest chunk size the cloud accepts: 8 MiB.
pub const CHUNK_SIZE_MAX: u32 = 8 << 20;
// The largest chunk's frame fits under the frame limit with room for its other fields.
const _: () = assert!(CHUNK_SIZE_MAX + 64 <= FRAME_PAYLOAD_MAX_BYTES);

/// Chunks read from the file ahead of the stream (the most chunk memory an upload holds,
/// beside what QUIC holds until the cloud acknowledges it).
const READ_AHEAD_CHUNKS: usize = 4;
/// Bytes hashed per read.
const HASH_PIECE_BYTES: usize = 1 << 20;
/// How long the cloud may take to answer `UploadBegin` (its admission checks are quick).
const RESUME_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a chunk may wait for the stream to take it before the stream counts as broken.
const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// After `UploadDone`, the cloud hashes and checks the whole file: this long, plus
/// [`VERIFY_BYTES_PER_SECOND`] of the file.
const VERIFY_TIMEOUT_BASE: Duration = Duration::from_secs(60);
const VERIFY_BYTES_PER_SECOND: u64 = 50 << 20;
/// On cancel: how long a chunk half written may take to finish, and how long the cloud may
/// take to acknowledge the end of the stream (then it holds every chunk sent).
const CANCEL_GRACE: Duration = Duration::from_secs(3);

/// The upload's id (PROTOCOL.md §2 *Upload* step 1): the first 16 bytes of SHA-256 over
/// `"synesis-upload\0"`, the name, `"\0"`, the file's 32 digest bytes, its size (u64 BE) and the
/// chunk size (u32 BE), as a UUID v8. The same upload always gets the same id; a change to any
/// of them makes another upload.
pub fn upload_id(name: &str, sha256: &Sha256, size_bytes: u64, chunk_size_bytes: u32) -> RequestId {
    let mut h = sha2::Sha256::new();
    h.update(b"synesis-upload\0");
    h.update(name.as_bytes());
    h.update(b"\0");
    h.update(sha256.0);
    h.update(size_bytes.to_be_bytes());
    h.update(chunk_size_bytes.to_be_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 16];
    first.copy_from_slice(&digest[..16]);
    RequestId::from_digest(first)
}

/// Why a file cannot be cut into chunks the cloud accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("the file is empty: there is nothing to upload")]
    Empty,
    #[error(
        "a chunk size of {0} bytes is not accepted: it must be from {CHUNK_SIZE_MIN} (64 KiB) to \
         {CHUNK_SIZE_MAX} (8 MiB)"
    )]
    ChunkSize(u32),
    #[error("{size_bytes} bytes make more than 2^32 - 1 chunks of {chunk_size_bytes} bytes")]
    TooManyChunks {
        size_bytes: u64,
        chunk_size_bytes: u32,
    },
    /// The cloud listed a chunk the upload does not have (a protocol violation).
    #[error("the cloud holds chunk {index}, but the upload has {chunks} chunks")]
    HeldOutOfRange { index: u32, chunks: u32 },
}

/// A file of `size_bytes` cut into `chunks` chunks of `chunk_size_bytes`, index 0 first in the
/// file, each whole except the last (the remainder).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkPlan {
    size_bytes: u64,
    chunk_size_bytes: u32,
    chunks: u32,
}

/// What is left to send, given what the cloud holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remaining {
    /// The chunks to send, ascending.
    pub to_send: Vec<u32>,
    /// The bytes of the chunks the cloud holds.
    pub held_bytes: u64,
}

impl ChunkPlan {
    pub fn new(size_bytes: u64, chunk_size_bytes: u32) -> Result<ChunkPlan, PlanError> {
        if !(CHUNK_SIZE_MIN..=CHUNK_SIZE_MAX).contains(&chunk_size_bytes) {
            return Err(PlanError::ChunkSize(chunk_size_bytes));
        }
        if size_bytes == 0 {
            return Err(PlanError::Empty);
        }
        let chunks =
            u32::try_from(size_bytes.div_ceil(u64::from(chunk_size_bytes))).map_err(|_| {
                PlanError::TooManyChunks {
                    size_bytes,
                    chunk_size_bytes,
                }
            })?;
        Ok(ChunkPlan {
            size_bytes,
            chunk_size_bytes,
            chunks,
        })
    }

    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    pub fn chunk_size_bytes(&self) -> u32 {
        self.chunk_size_bytes
    }

    /// How many chunks the file travels in: `ceil(size / chunk size)`.
    pub fn chunks(&self) -> u32 {
        self.chunks
    }

    /// Where chunk `index` starts in the file.
    pub fn offset(&self, index: u32) -> u64 {
        u64::from(index) * u64::from(self.chunk_size_bytes)
    }

    /// The length of chunk `index`: the chunk size, the remainder for the last one, 0 past it.
    pub fn chunk_len(&self, index: u32) -> u32 {
        if index >= self.chunks {
            return 0;
        }
        let left = self.size_bytes - self.offset(index);
        u32::try_from(left).map_or(self.chunk_size_bytes, |l| l.min(self.chunk_size_bytes))
    }

    /// The chunks to send when the cloud holds `held` (ascending by the protocol; repeats and
    /// any order are tolerated), and the bytes it holds. An index the upload does not have is
    /// the cloud's mistake: [`PlanError::HeldOutOfRange`].
    pub fn remaining(&self, held: &[u32]) -> Result<Remaining, PlanError> {
        let mut held = held.to_vec();
        held.sort_unstable();
        held.dedup();
        if let Some(&index) = held.last()
            && index >= self.chunks
        {
            return Err(PlanError::HeldOutOfRange {
                index,
                chunks: self.chunks,
            });
        }
        let held_bytes = held.iter().map(|&i| u64::from(self.chunk_len(i))).sum();
        let mut next_held = held.iter().peekable();
        let to_send = (0..self.chunks)
            .filter(|&i| {
                if next_held.peek() == Some(&&i) {
                    next_held.next();
                    false
                } else {
                    true
                }
            })
            .collect();
        Ok(Remaining {
            to_send,
            held_bytes,
        })
    }
}

/// A file's digest and size, as `UploadBegin` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    pub sha256: Sha256,
    pub size_bytes: u64,
}

/// The SHA-256 of the file at `path`, read in 1 MiB pieces (constant memory); `progress` is
/// told the bytes hashed so far after each piece. Blocking: call it off the async threads.
/// Setting `stop` ends it with [`io::ErrorKind::Interrupted`].
pub fn hash_file(
    path: &Path,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(u64),
) -> io::Result<FileDigest> {
    let file = File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; HASH_PIECE_BYTES];
    let mut done = 0u64;
    loop {
        if stop.load(Ordering::Relaxed) {
            return Err(io::Error::new(io::ErrorKind::Interrupted, "stopped"));
        }
        let n = match file.read_at(&mut buf, done) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        done += n as u64;
        progress(done);
    }
    Ok(FileDigest {
        sha256: Sha256(hasher.finalize().into()),
        size_bytes: done,
    })
}

/// What to push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upload {
    /// The adapter file (GGUF); checking that it is one is the caller's business.
    pub path: PathBuf,
    /// The adapter's name in the account: 1 to 64 of `A–Z a–z 0–9 . _ -`.
    pub name: String,
    /// The served model it attaches to.
    pub base_model: String,
    /// From [`CHUNK_SIZE_MIN`] to [`CHUNK_SIZE_MAX`]; [`CHUNK_SIZE_DEFAULT`] unless there is a
    /// reason. Part of the upload's id: another chunk size starts another upload.
    pub chunk_size_bytes: u32,
}

/// What the caller is told while the upload goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress<'a> {
    /// The file is being hashed (before anything is sent).
    Hashing { done_bytes: u64, total_bytes: u64 },
    /// The cloud answered `UploadBegin`: it holds `held_bytes` already; the rest goes now.
    /// `resumed` after a break.
    Sending {
        held_bytes: u64,
        total_bytes: u64,
        resumed: bool,
    },
    /// Another chunk went out: the cloud holds or was sent `done_bytes`.
    Sent { done_bytes: u64, total_bytes: u64 },
    /// The stream or the connection broke; the upload goes on from what the cloud holds.
    Interrupted(&'a str),
    /// Every chunk was sent; the cloud verifies the file.
    Verifying,
}

/// A finished upload: the cloud verified the file and serves it under its name.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    pub upload_id: RequestId,
    pub name: String,
    pub base_model: String,
    pub sha256: Sha256,
    /// The file's size.
    pub bytes: u64,
    /// What the cloud already held when this run first asked (`UploadResume`): the whole file
    /// when the account had this content already.
    pub resumed_from_bytes: u64,
    /// The chunk bytes this run sent (a chunk sent again after a break counts again).
    pub sent_bytes: u64,
    /// From the first `UploadBegin` to `UploadComplete` (hashing not included).
    pub seconds: f64,
    /// How many times the upload went on after a break.
    pub resumes: u32,
    pub complete: UploadComplete,
}

impl Pushed {
    /// Mebibytes per second over the bytes this run sent (0 when it sent none).
    pub fn throughput_mib_s(&self) -> f64 {
        if self.sent_bytes == 0 || self.seconds <= 0.0 {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)] // a byte count, shown as a rate
        let mib = self.sent_bytes as f64 / f64::from(1u32 << 20);
        mib / self.seconds
    }
}

/// Why an upload did not complete.
#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("cannot read {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    /// The file's size or modification time changed after it was hashed.
    #[error("{} changed while it was being pushed; push it again", .0.display())]
    Changed(PathBuf),
    #[error("{0:?} is not a usable adapter name: use 1 to 64 letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// The cloud answered with an `ErrorMsg` (its code says why: `HASH_MISMATCH`,
    /// `ADAPTER_INVALID`, `TOO_LARGE`, `BUSY`, `LIMIT_EXCEEDED`, `INVALID_REQUEST`,
    /// `UNKNOWN_MODEL`, `IDEMPOTENCY_CONFLICT`, …). Revocation is [`RequestError::Revoked`].
    #[error("the cloud refused the upload: {message} ({code})")]
    Refused {
        code: ErrorCode,
        message: String,
        retry_after_ms: Option<u32>,
    },
    /// Cancelled by the caller. The cloud keeps what it holds: the same push resumes from it.
    /// `held_bytes` is what the cloud holds at least (`None`: it was not asked yet).
    #[error("{}", cancelled_text(*.held_bytes, *.total_bytes))]
    Cancelled {
        held_bytes: Option<u64>,
        total_bytes: u64,
    },
    /// The cloud could not be reached (within [`FIRST_CONTACT_FOR`]), or it refused this
    /// device (revoked, unknown certificate).
    #[error(transparent)]
    Cloud(#[from] RequestError),
    /// The upload broke off and the cloud could not be reached again within [`RECONNECT_FOR`].
    /// It keeps what it holds (at least `held_bytes`): the same push resumes from there.
    #[error(
        "the upload broke off ({why}) and could not be resumed within {} s",
        RECONNECT_FOR.as_secs()
    )]
    BrokeOff {
        why: String,
        held_bytes: u64,
        total_bytes: u64,
    },
    /// The cloud broke the upload protocol.
    #[error("the cloud broke the upload protocol: {0}")]
    Protocol(String),
}

fn cancelled_text(held: Option<u64>, total: u64) -> String {
    match held {
        Some(held) => format!("cancelled; the cloud holds {held} of {total} bytes"),
        None => "cancelled before anything was sent".to_owned(),
    }
}

impl PushError {
    /// The cloud's error code, for a refusal.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            PushError::Refused { code, .. } => Some(*code),
            PushError::Cloud(RequestError::Refused { code, .. }) => Some(*code),
            PushError::Cloud(RequestError::Revoked) => Some(ErrorCode::DEVICE_REVOKED),
            _ => None,
        }
    }
}

/// Pushes `upload` to the cloud over `route` and returns once the cloud verified it. `cancel`
/// turning true stops it ([`PushError::Cancelled`]); `on` hears how it goes.
pub async fn push(
    route: &mut Route,
    upload: &Upload,
    mut cancel: watch::Receiver<bool>,
    on: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<Pushed, PushError> {
    check_name(&upload.name)?;
    let path = &upload.path;
    let before = Snapshot::of_path(path)?;
    // A chunk size or an empty file the cloud would refuse is said before hashing.
    ChunkPlan::new(before.len, upload.chunk_size_bytes)?;
    let digest = hash(path, before.len, &mut cancel, on).await?;
    if Snapshot::of_path(path)? != before || digest.size_bytes != before.len {
        return Err(PushError::Changed(path.clone()));
    }
    let plan = ChunkPlan::new(digest.size_bytes, upload.chunk_size_bytes)?;
    let id = upload_id(
        &upload.name,
        &digest.sha256,
        digest.size_bytes,
        upload.chunk_size_bytes,
    );
    let job = Job {
        path: path.clone(),
        snapshot: before,
        plan,
        id,
        sha256: digest.sha256,
        begin: UploadBegin {
            upload_id: id,
            name: upload.name.clone(),
            base_model: upload.base_model.clone(),
            size_bytes: digest.size_bytes,
            sha256: digest.sha256,
            chunk_size_bytes: upload.chunk_size_bytes,
        }
        .into(),
    };
    let started = Instant::now();
    let mut tally = Tally {
        giving_up_at: started + FIRST_CONTACT_FOR,
        contacted: false,
        first_held: None,
        held: None,
        sent_bytes: 0,
        resumes: 0,
    };
    loop {
        let (why, retry_after, cause) =
            match attempt(route, &job, &mut tally, &mut cancel, on).await {
                End::Complete(complete) => {
                    return Ok(Pushed {
                        upload_id: id,
                        name: upload.name.clone(),
                        base_model: upload.base_model.clone(),
                        sha256: digest.sha256,
                        bytes: digest.size_bytes,
                        resumed_from_bytes: tally.first_held.unwrap_or(0),
                        sent_bytes: tally.sent_bytes,
                        seconds: started.elapsed().as_secs_f64(),
                        resumes: tally.resumes,
                        complete,
                    });
                }
                End::Failed(e) => return Err(e),
                End::Broke {
                    why,
                    retry_after,
                    cause,
                } => (why, retry_after, cause),
            };
        let wait = retry_after.map_or(RETRY_EVERY, |w| w.max(RETRY_EVERY));
        if Instant::now() + wait >= tally.giving_up_at {
            return Err(match cause {
                Some(refused @ PushError::Refused { .. }) => refused,
                Some(cause) if !tally.contacted => cause,
                _ if !tally.contacted => PushError::Cloud(RequestError::TimedOut(why)),
                _ => PushError::BrokeOff {
                    why,
                    held_bytes: tally.held.unwrap_or(0),
                    total_bytes: plan.size_bytes(),
                },
            });
        }
        if tally.contacted {
            tracing::debug!(why, "the upload broke off; resuming it");
            on(Progress::Interrupted(&why));
            tally.resumes += 1;
        } else {
            tracing::debug!(error = why, "the cloud is not reachable yet");
        }
        tokio::select! {
            biased;
            () = cancelled(&mut cancel) => {
                return Err(PushError::Cancelled {
                    held_bytes: tally.held,
                    total_bytes: plan.size_bytes(),
                });
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// The same rule as the cloud's (PROTOCOL.md §2 *Upload* step 2), said before any work.
fn check_name(name: &str) -> Result<(), PushError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PushError::Name(name.to_owned()))
    }
}

/// The file as it was hashed: a push of a file that changed since would be refused by the
/// cloud (`HASH_MISMATCH`) after every byte was sent, so it is stopped here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Snapshot {
    len: u64,
    modified: Option<SystemTime>,
}

impl Snapshot {
    fn of(file: &File) -> io::Result<Snapshot> {
        let meta = file.metadata()?;
        Ok(Snapshot {
            len: meta.len(),
            modified: meta.modified().ok(),
        })
    }

    fn of_path(path: &Path) -> Result<Snapshot, PushError> {
        File::open(path)
            .and_then(|f| Snapshot::of(&f))
            .map_err(read_error(path))
    }
}

fn read_error(path: &Path) -> impl FnOnce(io::Error) -> PushError {
    let path = path.to_owned();
    move |source| PushError::Read { path, source }
}

/// Hashes the file on the blocking pool, telling `on` how far it is.
async fn hash(
    path: &Path,
    total_bytes: u64,
    cancel: &mut watch::Receiver<bool>,
    on: &mut (dyn FnMut(Progress<'_>) + Send),
) -> Result<FileDigest, PushError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (done_tx, mut done) = watch::channel(0u64);
    let task = tokio::task::spawn_blocking({
        let path = path.to_owned();
        let stop = Arc::clone(&stop);
        move || {
            hash_file(&path, &stop, &mut |bytes| {
                done_tx.send_replace(bytes);
            })
        }
    });
    tokio::pin!(task);
    on(Progress::Hashing {
        done_bytes: 0,
        total_bytes,
    });
    loop {
        tokio::select! {
            biased;
            () = cancelled(cancel) => {
                stop.store(true, Ordering::Relaxed);
                let _ = task.await;
                return Err(PushError::Cancelled { held_bytes: None, total_bytes });
            }
            joined = &mut task => {
                let hashed = joined.map_err(|e| PushError::Read {
                    path: path.to_owned(),
                    source: io::Error::other(e.to_string()),
                })?;
                return hashed.map_err(read_error(path));
            }
            Ok(()) = done.changed() => {
                let done_bytes = *done.borrow_and_update();
                on(Progress::Hashing { done_bytes, total_bytes });
            }
        }
    }
}

/// Resolves once `cancel` is true (never, when its sender is gone without cancelling).
async fn cancelled(cancel: &mut watch::Receiver<bool>) {
    if cancel.wait_for(|&c| c).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One upload, ready to go.
struct Job {
    path: PathBuf,
    snapshot: Snapshot,
    plan: ChunkPlan,
    id: RequestId,
    sha256: Sha256,
    begin: Message,
}

/// What the attempts so far add up to.
struct Tally {
    /// A break after this gives up.
    giving_up_at: Instant,
    /// The cloud has answered an `UploadBegin` of this run.
    contacted: bool,
    /// What the cloud held at the first `UploadResume`.
    first_held: Option<u64>,
    /// What the cloud holds at least: its last `UploadResume`, plus the chunks it acknowledged
    /// since (a clean end of a cancelled stream).
    held: Option<u64>,
    sent_bytes: u64,
    resumes: u32,
}

/// How one attempt (one stream) ended.
enum End {
    Complete(UploadComplete),
    /// Not worth another attempt.
    Failed(PushError),
    /// Worth another attempt on a new stream; `cause` is the error to give if there is no time
    /// left for one.
    Broke {
        why: String,
        retry_after: Option<Duration>,
        cause: Option<PushError>,
    },
}

fn broke(why: impl Into<String>) -> End {
    End::Broke {
        why: why.into(),
        retry_after: None,
        cause: None,
    }
}

/// One stream: `UploadBegin`, `UploadResume`, the missing chunks, `UploadDone`, the verdict.
async fn attempt(
    route: &mut Route,
    job: &Job,
    tally: &mut Tally,
    cancel: &mut watch::Receiver<bool>,
    on: &mut (dyn FnMut(Progress<'_>) + Send),
) -> End {
    let total_bytes = job.plan.size_bytes();
    let cancelled_end = |held_bytes| {
        End::Failed(PushError::Cancelled {
            held_bytes,
            total_bytes,
        })
    };
    let opened = tokio::select! {
        biased;
        () = cancelled(cancel) => return cancelled_end(tally.held),
        opened = route.open() => opened,
    };
    let opened = match opened {
        Ok(o) => o,
        Err(e) if retryable(&e) => {
            return End::Broke {
                why: e.to_string(),
                retry_after: None,
                cause: Some(PushError::Cloud(e)),
            };
        }
        Err(e) => return End::Failed(PushError::Cloud(e)),
    };
    let mut incoming = opened.incoming;
    let mut outbox = Outbox(Some(opened.sink));
    match tokio::time::timeout(RESUME_TIMEOUT, outbox.send(&job.begin)).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return broke(why),
        Err(_) => return broke("the upload could not be begun within the timeout"),
    }

    // The cloud says what it holds.
    let reply = tokio::select! {
        biased;
        () = cancelled(cancel) => return cancelled_end(tally.held),
        reply = tokio::time::timeout(RESUME_TIMEOUT, incoming.recv()) => reply,
    };
    let held = match reply {
        Ok(Some(Incoming::Message(Message::UploadResume(r)))) if r.upload_id == job.id => {
            r.chunks_held
        }
        Ok(item) => return heard(item, job),
        Err(_) => return broke("the cloud did not answer the upload within the timeout"),
    };
    let remaining = match job.plan.remaining(&held) {
        Ok(r) => r,
        Err(e) => return End::Failed(PushError::Protocol(e.to_string())),
    };
    let resumed = tally.contacted;
    if !tally.contacted {
        tally.contacted = true;
        tally.giving_up_at = Instant::now() + RECONNECT_FOR;
    }
    tally.first_held.get_or_insert(remaining.held_bytes);
    tally.held = Some(remaining.held_bytes);
    on(Progress::Sending {
        held_bytes: remaining.held_bytes,
        total_bytes,
        resumed,
    });

    // The missing chunks, read ahead of the stream on the blocking pool.
    let mut done_bytes = remaining.held_bytes;
    let mut written = 0u64; // chunk bytes this stream took
    let (frames_tx, mut frames) = mpsc::channel(READ_AHEAD_CHUNKS);
    if !remaining.to_send.is_empty() {
        let reader = Reader {
            path: job.path.clone(),
            snapshot: job.snapshot,
            plan: job.plan,
            id: job.id,
        };
        let to_send = remaining.to_send;
        tokio::task::spawn_blocking(move || reader.run(&to_send, &frames_tx));
    } else {
        drop(frames_tx);
    }
    loop {
        let next = tokio::select! {
            biased;
            () = cancelled(cancel) => {
                return wind_down(outbox, &mut incoming, tally, written, total_bytes).await;
            }
            item = incoming.recv() => return heard(item, job),
            next = frames.recv() => next,
        };
        let chunk = match next {
            None => break, // every chunk is out
            Some(Ok(chunk)) => chunk,
            Some(Err(e)) => return End::Failed(e),
        };
        let step = {
            let write = outbox.send_frame(chunk.frame);
            tokio::pin!(write);
            tokio::select! {
                biased;
                () = cancelled(cancel) => {
                    // Finish the chunk under way (briefly) so the stream can end cleanly.
                    match tokio::time::timeout(CANCEL_GRACE, &mut write).await {
                        Ok(Ok(())) => Step::CancelledAfter(true),
                        _ => Step::CancelledAfter(false),
                    }
                }
                item = incoming.recv() => Step::Heard(item),
                wrote = tokio::time::timeout(STALL_TIMEOUT, &mut write) => match wrote {
                    Ok(Ok(())) => Step::Wrote,
                    Ok(Err(why)) => Step::Broke(why),
                    Err(_) => Step::Broke(format!(
                        "the stream took no data for {} s",
                        STALL_TIMEOUT.as_secs()
                    )),
                },
            }
        };
        match step {
            Step::Wrote | Step::CancelledAfter(true) => {
                let len = u64::from(chunk.len);
                written += len;
                done_bytes += len;
                tally.sent_bytes += len;
                tally.giving_up_at = Instant::now() + RECONNECT_FOR;
                on(Progress::Sent {
                    done_bytes,
                    total_bytes,
                });
                if matches!(step, Step::CancelledAfter(true)) {
                    return wind_down(outbox, &mut incoming, tally, written, total_bytes).await;
                }
            }
            // Cut inside a frame: the stream is reset (on drop); the cloud keeps the chunks it
            // had whole.
            Step::CancelledAfter(false) => return cancelled_end(tally.held),
            Step::Heard(item) => return heard(item, job),
            Step::Broke(why) => return broke(why),
        }
    }

    // Every chunk is out: the cloud checks the whole.
    let done: Message = UploadDone { upload_id: job.id }.into();
    match tokio::time::timeout(STALL_TIMEOUT, outbox.send(&done)).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return broke(why),
        Err(_) => {
            return broke(format!(
                "the stream took no data for {} s",
                STALL_TIMEOUT.as_secs()
            ));
        }
    }
    on(Progress::Verifying);
    let verify_for =
        VERIFY_TIMEOUT_BASE + Duration::from_secs(total_bytes / VERIFY_BYTES_PER_SECOND);
    let verdict = tokio::select! {
        biased;
        () = cancelled(cancel) => {
            // Everything was sent and the cloud verifies on its own: a verdict that comes
            // within the grace is still the answer; otherwise what it acknowledged is held.
            let _ = outbox.finish().await;
            return match tokio::time::timeout(CANCEL_GRACE, incoming.recv()).await {
                Ok(Some(Incoming::Message(m))) => heard(Some(Incoming::Message(m)), job),
                Ok(Some(Incoming::Ended)) => cancelled_end(Some(done_bytes)),
                _ => cancelled_end(tally.held),
            };
        }
        verdict = tokio::time::timeout(verify_for, incoming.recv()) => verdict,
    };
    match verdict {
        Ok(item) => {
            let end = heard(item, job);
            if matches!(end, End::Complete(_)) {
                let _ = outbox.finish().await;
            }
            end
        }
        Err(_) => broke(format!(
            "no verdict from the cloud within {} s of the last chunk",
            verify_for.as_secs()
        )),
    }
}

/// How writing one chunk ended.
enum Step {
    Wrote,
    /// Cancelled while the chunk was being written; whether it was then written whole.
    CancelledAfter(bool),
    /// The cloud said something (or the stream ended) while the chunk was being written.
    Heard(Option<Incoming>),
    Broke(String),
}

/// Cancelled at a chunk's boundary: the stream ends cleanly, so the cloud takes every chunk
/// written and records them; once it acknowledges the end, it holds them all.
async fn wind_down(
    outbox: Outbox,
    incoming: &mut mpsc::Receiver<Incoming>,
    tally: &Tally,
    written: u64,
    total_bytes: u64,
) -> End {
    let held = tally.held.unwrap_or(0);
    let acknowledged = outbox.finish().await.is_ok()
        && matches!(
            tokio::time::timeout(CANCEL_GRACE, incoming.recv()).await,
            Ok(Some(Incoming::Ended | Incoming::Message(_)))
        );
    End::Failed(PushError::Cancelled {
        held_bytes: Some(if acknowledged { held + written } else { held }),
        total_bytes,
    })
}

/// What arrived on the stream, as the end of the attempt: the verdict, a refusal, a break, or a
/// message that has no place here.
fn heard(item: Option<Incoming>, job: &Job) -> End {
    match item {
        Some(Incoming::Message(Message::UploadComplete(c))) if c.upload_id == job.id => {
            if c.sha256 == job.sha256 {
                End::Complete(c)
            } else {
                End::Failed(PushError::Protocol(format!(
                    "the cloud completed the upload with digest {}, not {}",
                    c.sha256, job.sha256
                )))
            }
        }
        Some(Incoming::Message(Message::ErrorMsg(e))) => refusal(e),
        Some(Incoming::Message(other)) => End::Failed(PushError::Protocol(format!(
            "the cloud sent {} on an upload stream",
            other.message_type().name()
        ))),
        Some(Incoming::Ended) => broke("the cloud ended the stream before the upload's end"),
        Some(Incoming::Broken(why)) => broke(why),
        None => broke("the stream's reader stopped"),
    }
}

/// An `ErrorMsg` on the upload stream: a refusal, or a failure worth waiting out (the cloud is
/// draining, failed, or the account has too many uploads going: the same upload later).
fn refusal(e: ErrorMsg) -> End {
    let retry_after = e
        .retry_after_ms
        .map(|ms| Duration::from_millis(u64::from(ms)));
    let code = e.code;
    let retry_after_ms = e.retry_after_ms;
    let refused = match answer(e.into()) {
        Err(RequestError::Refused { code, message }) => PushError::Refused {
            code,
            message,
            retry_after_ms,
        },
        Err(other) => PushError::Cloud(other),
        Ok(_) => PushError::Protocol("an error that is not one".into()),
    };
    if code.is_retryable() {
        End::Broke {
            why: refused.to_string(),
            retry_after,
            cause: Some(refused),
        }
    } else {
        End::Failed(refused)
    }
}

/// The sending half of one attempt's stream. Dropped unfinished, it is reset: an attempt that
/// ends early never leaves a frame cut short before a clean end.
struct Outbox(Option<Sink>);

impl Outbox {
    async fn send(&mut self, message: &Message) -> Result<(), String> {
        match &mut self.0 {
            Some(sink) => sink.send(message).await,
            None => Err("the stream was finished".into()),
        }
    }

    async fn send_frame(&mut self, frame: Bytes) -> Result<(), String> {
        match &mut self.0 {
            Some(sink) => sink.send_frame(frame).await,
            None => Err("the stream was finished".into()),
        }
    }

    async fn finish(mut self) -> Result<(), String> {
        match self.0.take() {
            Some(sink) => sink.finish().await,
            None => Ok(()),
        }
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        if let Some(sink) = self.0.take() {
            sink.reset();
        }
    }
}

/// One chunk read into the frame that carries it.
struct ChunkFrame {
    frame: Bytes,
    /// The chunk's own bytes (without the frame's).
    len: u32,
}

/// Reads the chunks an attempt sends, on the blocking pool.
struct Reader {
    path: PathBuf,
    snapshot: Snapshot,
    plan: ChunkPlan,
    id: RequestId,
}

impl Reader {
    /// Reads `indexes` in order into `frames`, a few ahead of the stream; stops early when the
    /// stream's side hangs up. A failure is the last item.
    fn run(self, indexes: &[u32], frames: &mpsc::Sender<Result<ChunkFrame, PushError>>) {
        if let Err(e) = self.read_all(indexes, frames) {
            let _ = frames.blocking_send(Err(e));
        }
    }

    fn read_all(
        &self,
        indexes: &[u32],
        frames: &mpsc::Sender<Result<ChunkFrame, PushError>>,
    ) -> Result<(), PushError> {
        let file = File::open(&self.path).map_err(read_error(&self.path))?;
        self.unchanged(&file)?;
        for &index in indexes {
            let frame = chunk_frame(&file, &self.plan, self.id, index).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    PushError::Changed(self.path.clone())
                } else {
                    read_error(&self.path)(e)
                }
            })?;
            if frames.blocking_send(Ok(frame)).is_err() {
                return Ok(()); // the attempt ended
            }
        }
        // Read all along from the file that was hashed: else the cloud would refuse the whole.
        self.unchanged(&file)
    }

    fn unchanged(&self, file: &File) -> Result<(), PushError> {
        if Snapshot::of(file).map_err(read_error(&self.path))? == self.snapshot {
            Ok(())
        } else {
            Err(PushError::Changed(self.path.clone()))
        }
    }
}

/// Chunk `index` as a whole `UploadChunk { upload_id, index, data }` frame, its bytes read from
/// `file` straight into place: the header and the fields before the data are laid out as
/// PROTOCOL.md §3–4 say (a test holds them to the codec), so no chunk is copied to be framed.
fn chunk_frame(file: &File, plan: &ChunkPlan, id: RequestId, index: u32) -> io::Result<ChunkFrame> {
    let len = plan.chunk_len(index);
    let head = chunk_frame_head(id, index, len);
    let mut frame = vec![0u8; head.len() + len as usize];
    frame[..head.len()].copy_from_slice(&head);
    file.read_exact_at(&mut frame[head.len()..], plan.offset(index))?;
    Ok(ChunkFrame {
        frame: Bytes::from(frame),
        len,
    })
}

/// The frame header and the payload's fields before the data of an `UploadChunk` whose data is
/// `len` bytes: type, payload length (u32 BE), the id's 16 bytes, the index and the data's
/// length as varints.
fn chunk_frame_head(id: RequestId, index: u32, len: u32) -> Vec<u8> {
    let mut fields = Vec::with_capacity(16 + 2 * 9);
    fields.extend_from_slice(id.as_bytes());
    put_varint(&mut fields, u64::from(index));
    put_varint(&mut fields, u64::from(len));
    // At most 16 + 9 + 9 bytes of fields and CHUNK_SIZE_MAX of data: far from u32::MAX.
    let payload_len = u32::try_from(fields.len())
        .unwrap_or(u32::MAX)
        .saturating_add(len);
    let mut head = Vec::with_capacity(FRAME_HEADER_BYTES + fields.len());
    head.push(MessageType::UploadChunk.as_u8());
    head.extend_from_slice(&payload_len.to_be_bytes());
    head.extend_from_slice(&fields);
    head
}

/// An unsigned integer as the payload encoding's varint (PROTOCOL.md §4): below 251 one byte;
/// else `0xfb` + u16 LE, `0xfc` + u32 LE or `0xfd` + u64 LE, the shortest that fits.
fn put_varint(out: &mut Vec<u8>, value: u64) {
    if let Ok(byte) = u8::try_from(value)
        && byte < 251
    {
        out.push(byte);
    } else if let Ok(v) = u16::try_from(value) {
        out.push(0xfb);
        out.extend_from_slice(&v.to_le_bytes());
    } else if let Ok(v) = u32::try_from(value) {
        out.push(0xfc);
        out.extend_from_slice(&v.to_le_bytes());
    } else {
        out.push(0xfd);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

#[cfg(test)]
mod tests;
