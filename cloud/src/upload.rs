//! Upload streams: an account's LoRA adapter, in chunks, resumable across broken streams and
//! restarts, verified before it becomes visible (PROTOCOL.md §2, *Upload*).
//!
//! Files, under the data directory:
//! - `uploads/<account>/<upload id>.part`: a partial upload, the size it declared, each chunk
//!   written at its offset. Which chunks it holds is recorded in `adapter_uploads`
//!   (`storage/adapters.rs`) after the file is synced, every [`RECORD_EVERY`] chunks, when the
//!   stream pauses for `record_when_quiet` (`[adapters]` in `cloud.toml`, 500 ms by default)
//!   and when it ends, so a record never names a chunk that is not on disk.
//! - `adapters/<account>/<sha256>.gguf`: content the account holds, moved there from its
//!   `.part` once verified (hash, GGUF adapter, base architecture). Names point to it in
//!   `adapters`; nothing is visible before that.
//!
//! Two streams of one upload (a resume while the cloud has not yet noticed the old stream is
//! dead) both write; their records merge (bits are only ever added), so neither loses the
//! other's chunks. The seal for verification ([`Fences`]) stops this node's streams; a stream
//! of the same upload on another node (the data directory is shared) is kept out of what is
//! verified by verifying a copy ([`verify_and_store`]). The sweeper ([`sweep`]) removes partial uploads abandoned for
//! `abandon_after` and content no name has pointed to for [`RELEASE_GRACE`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use synesis_proto::message::{UploadBegin, UploadComplete, UploadResume};
use synesis_proto::{AccountId, ErrorCode, Message, MessageType, RequestId, Sha256};
use synesis_wire::send;
use tokio::time::timeout;

use crate::endpoint::Peer;
use crate::shared::{Shared, now};
use crate::storage::adapters::{Begun, Declared, Quota};
use crate::streams::Stream;

/// Chunk sizes a device may choose.
pub const CHUNK_MIN: u32 = 64 * 1024;
pub const CHUNK_MAX: u32 = 8 * 1024 * 1024;
/// The chunks held are recorded (after a sync) at least this often.
pub const RECORD_EVERY: u32 = 64;
/// A stream that sends nothing for this long is ended (what it sent stays held).
const IDLE: Duration = Duration::from_secs(60);
/// A stream that keeps sending is recorded at least this often (however large its chunks),
/// which keeps its upload from counting as idle (`BUSY_FOR`).
const RECORD_AT_LEAST_EVERY: Duration = Duration::from_secs(30);
/// Another upload to the same name is `BUSY` while it was active this recently (its record is
/// written at least every [`RECORD_EVERY`] chunks and when its stream ends); idle longer, a
/// new upload to the name supersedes it.
const BUSY_FOR: Duration = Duration::from_secs(120);
/// Content no name points to any more stays this long (requests admitted before still use it).
pub const RELEASE_GRACE: Duration = Duration::from_secs(3_600);
/// A node that recorded a heartbeat this recently, and did not stop cleanly, may still have an
/// upload stream writing into the shared data directory (even if it is taken for dead: cut off
/// from the database, not from the files).
const OTHER_NODE_WRITES_FOR_MS: i64 = 600_000;
/// The longest adapter name.
const NAME_MAX: usize = 64;

pub(crate) fn blob_path(data: &Path, account: AccountId, sha: &Sha256) -> PathBuf {
    data.join("adapters")
        .join(account.to_string())
        .join(format!("{sha}.gguf"))
}

fn part_path(data: &Path, account: AccountId, upload: RequestId) -> PathBuf {
    data.join("uploads")
        .join(account.to_string())
        .join(format!("{upload}.part"))
}

/// A refusal or failure that ends the stream: its code and what the device is told.
struct Refusal(ErrorCode, String);

impl Refusal {
    fn internal(e: impl std::fmt::Display) -> Refusal {
        tracing::error!(error = %e, "upload failed");
        Refusal(ErrorCode::INTERNAL, "internal error; try again".into())
    }
}

pub(crate) async fn serve(peer: &Peer, begin: UploadBegin, mut stream: Stream) {
    let id = begin.upload_id;
    let outcome = match run(peer, begin, &mut stream).await {
        Ok(()) => "ended",
        Err(Refusal(code, why)) => {
            stream.reject(code, why).await;
            code.name().unwrap_or("unknown")
        }
    };
    peer.shared
        .metrics
        .uploads
        .get_or_create(&crate::metrics::Outcome { outcome })
        .inc();
    tracing::debug!(upload = %id, "upload stream ended");
}

fn valid_name(name: &str) -> bool {
    (1..=NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The architecture adapters for `base` must have, when `base` takes uploads.
fn base_architecture(shared: &Shared, base: &str) -> Option<String> {
    shared.escalations.adapter_architecture(base)
}

async fn run(peer: &Peer, begin: UploadBegin, stream: &mut Stream) -> Result<(), Refusal> {
    let shared = &peer.shared;
    let (account, device, id) = (peer.device.account_id, peer.device.id, begin.upload_id);
    if !valid_name(&begin.name) {
        return Err(Refusal(
            ErrorCode::INVALID_REQUEST,
            format!(
                "an adapter name is 1 to {NAME_MAX} characters of A-Z a-z 0-9 . _ -; not {:?}",
                begin.name
            ),
        ));
    }
    if !(CHUNK_MIN..=CHUNK_MAX).contains(&begin.chunk_size_bytes) {
        return Err(Refusal(
            ErrorCode::INVALID_REQUEST,
            format!(
                "chunk_size_bytes is from {CHUNK_MIN} to {CHUNK_MAX}; not {}",
                begin.chunk_size_bytes
            ),
        ));
    }
    if base_architecture(shared, &begin.base_model).is_none() {
        return Err(Refusal(
            ErrorCode::UNKNOWN_MODEL,
            format!(
                "{:?} is not a model this cloud runs itself, so it takes no adapters",
                begin.base_model
            ),
        ));
    }
    let limits = &shared.adapters;
    if begin.size_bytes == 0 || begin.size_bytes > limits.max_size {
        return Err(Refusal(
            ErrorCode::TOO_LARGE,
            format!(
                "an adapter is 1 byte to {} MiB here; this one declares {} bytes",
                limits.max_size >> 20,
                begin.size_bytes
            ),
        ));
    }
    let declared = Declared {
        name: begin.name.clone(),
        base_model: begin.base_model.clone(),
        size_bytes: begin.size_bytes,
        sha256: begin.sha256,
        chunk_size: begin.chunk_size_bytes,
    };
    let quota = Quota {
        uploads_in_progress: limits.uploads_per_account,
        storage_bytes: limits.storage_per_account,
    };
    let d = declared.clone();
    let at = now();
    let busy_since =
        synesis_proto::UnixMillis(at.0 - i64::try_from(BUSY_FOR.as_millis()).unwrap_or(i64::MAX));
    let begun = shared
        .storage
        .write(move |db| db.begin_upload(account, id, device, &d, quota, at, busy_since))
        .await
        .map_err(Refusal::internal)?;
    let row = match begun {
        Begun::Upload(row, superseded) => {
            for old in superseded {
                tracing::info!(%account, upload = %old, name = %declared.name, "a new upload to the name superseded an idle one");
                let _ = std::fs::remove_file(part_path(&shared.data_dir, account, old));
            }
            row
        }
        Begun::Conflict => {
            return Err(Refusal(
                ErrorCode::IDEMPOTENCY_CONFLICT,
                "this upload id was used for another upload".into(),
            ));
        }
        Begun::Busy => {
            return Err(Refusal(
                ErrorCode::BUSY,
                format!(
                    "another upload to {:?} is in progress; it must finish (or be abandoned) first",
                    begin.name
                ),
            ));
        }
        Begun::TooMany(n) => {
            return Err(Refusal(
                ErrorCode::LIMIT_EXCEEDED,
                format!("this account has {n} uploads in progress, the most it may"),
            ));
        }
        Begun::NoRoom(used) => {
            return Err(Refusal(
                ErrorCode::TOO_LARGE,
                format!(
                    "the account's adapter storage is {} MiB; {} MiB are in use and this upload needs {} MiB",
                    limits.storage_per_account >> 20,
                    used >> 20,
                    begin.size_bytes.div_ceil(1 << 20)
                ),
            ));
        }
    };
    let chunks = declared.chunks();
    let mut held = Held::new(chunks, row.held);
    let key = (account, id);
    let max_streams = shared.adapters.uploads_per_account.saturating_mul(2);
    let turn = match shared.upload_fences.claim(key, max_streams) {
        Ok(turn) => Arc::new(turn),
        Err(NoTurn::Verifying) => {
            return Err(Refusal(
                ErrorCode::BUSY,
                "this upload is being verified; ask again in a moment".into(),
            ));
        }
        Err(NoTurn::Streams(n)) => {
            return Err(Refusal(
                ErrorCode::LIMIT_EXCEEDED,
                format!("this account has {n} upload streams open, the most it may"),
            ));
        }
    };
    let mut writer = None;
    if !row.completed && !held.all() {
        let (path, size) = (
            part_path(&shared.data_dir, account, id),
            declared.size_bytes,
        );
        let file = tokio::task::spawn_blocking(move || open_part(&path, size))
            .await
            .map_err(Refusal::internal)?
            .map_err(Refusal::internal)?;
        // Hashed as it is written when it starts from nothing and comes in order.
        let from_scratch = held.count() == 0;
        writer = Some(PartWriter::start(
            file,
            Arc::clone(&turn),
            from_scratch,
            declared.chunk_size,
            chunks,
        ));
    }
    let mut upload = Receiving {
        peer,
        id,
        declared: &declared,
        held: &mut held,
        writer,
        received: 0,
        unrecorded: 0,
        last_record: tokio::time::Instant::now(),
    };
    let result = upload.receive(stream, row.completed, &turn).await;
    if let Some(writer) = upload.writer.take() {
        writer.close().await;
    }
    drop(upload);
    // The writer held the other reference.
    if let Some(turn) = Arc::into_inner(turn) {
        shared.upload_fences.release(key, turn);
    }
    result
}

/// One stream's side of an upload: the chunks it wrote, and what it has not recorded yet.
struct Receiving<'a> {
    peer: &'a Peer,
    id: RequestId,
    declared: &'a Declared,
    held: &'a mut Held,
    writer: Option<PartWriter>,
    /// Chunks accepted since the last record (those sent again included).
    received: u64,
    /// Chunks written since the last record.
    unrecorded: u32,
    last_record: tokio::time::Instant,
}

impl Receiving<'_> {
    /// Reads chunks until `UploadDone` (then verifies and answers) or the end of the stream;
    /// what was written is recorded however it ends.
    async fn receive(
        &mut self,
        stream: &mut Stream,
        completed: bool,
        turn: &Turn,
    ) -> Result<(), Refusal> {
        // Chunks arrive up to the connection's largest frame from here on.
        stream.rx.set_limits(self.peer.frame_limits());
        let resume = UploadResume {
            upload_id: self.id,
            chunks_held: self.held.indexes(),
        };
        send(&mut stream.tx, &resume.into(), stream.sends)
            .await
            .map_err(|e| Refusal(ErrorCode::INTERNAL, e.to_string()))?;
        let ended = self.chunks(stream).await;
        let recorded = self.record().await;
        match ended? {
            None => recorded,
            Some(()) => {
                recorded?;
                let hashed = match &mut self.writer {
                    Some(w) => w.finish().await?,
                    None => None,
                };
                let sha =
                    finish(self.peer, self.id, self.declared, completed, hashed, turn).await?;
                let complete = UploadComplete {
                    upload_id: self.id,
                    sha256: sha,
                    serving: true,
                };
                stream.send_last(&complete.into()).await;
                Ok(())
            }
        }
    }

    /// Takes chunks until `UploadDone` (`Some`) or the stream's end or silence (`None`).
    async fn chunks(&mut self, stream: &mut Stream) -> Result<Option<()>, Refusal> {
        let (id, chunks) = (self.id, self.declared.chunks());
        loop {
            // Chunks not yet recorded are recorded once the stream pauses, so a device that
            // was cut off (and whose connection the cloud has not given up on yet) resumes
            // from them.
            let pending = self.unrecorded > 0 || self.received > 0;
            let next = timeout(
                if pending {
                    self.peer.shared.adapters.record_when_quiet
                } else {
                    IDLE
                },
                stream
                    .rx
                    .next_if(|t| t == MessageType::UploadChunk || t == MessageType::UploadDone),
            )
            .await;
            let message = match next {
                Ok(Ok(Some(m))) => m,
                Err(_) if pending => {
                    self.record().await?;
                    continue;
                }
                // The device went quiet or away; what it sent is held.
                Ok(Ok(None)) | Err(_) => return Ok(None),
                Ok(Err(e)) => {
                    let code = e.peer_fault().unwrap_or(ErrorCode::INTERNAL);
                    return Err(Refusal(code, e.to_string()));
                }
            };
            let c = match message {
                Message::UploadChunk(c) => c,
                Message::UploadDone(done) if done.upload_id == id => return Ok(Some(())),
                other => {
                    return Err(Refusal(
                        ErrorCode::UNEXPECTED_MESSAGE,
                        format!(
                            "{} on the stream of upload {id}",
                            other.message_type().name()
                        ),
                    ));
                }
            };
            if c.upload_id != id {
                return Err(Refusal(
                    ErrorCode::INVALID_REQUEST,
                    format!("a chunk of upload {} on the stream of {id}", c.upload_id),
                ));
            }
            let expected = chunk_len(self.declared, c.index);
            if expected != Some(c.data.0.len()) {
                return Err(Refusal(
                    ErrorCode::INVALID_REQUEST,
                    match expected {
                        None => format!(
                            "chunk {} is out of range: the upload has {chunks} chunks (0 to {})",
                            c.index,
                            chunks - 1
                        ),
                        Some(n) => format!(
                            "chunk {} is {} bytes; it must be {n}",
                            c.index,
                            c.data.0.len()
                        ),
                    },
                ));
            }
            self.received += 1;
            if let Some(writer) = &mut self.writer
                && !self.held.has(c.index)
            {
                let bytes = c.data.0.len() as u64;
                writer.write(c.index, c.data.0).await?;
                self.peer.shared.metrics.upload_bytes.inc_by(bytes);
                // Recorded as held only after the writer synced it (`record`).
                self.held.set(c.index);
                self.unrecorded += 1;
                if self.unrecorded >= RECORD_EVERY
                    || self.last_record.elapsed() >= RECORD_AT_LEAST_EVERY
                {
                    self.record().await?;
                }
            }
        }
    }

    /// Syncs what was written, then records the chunks held (merged with any other stream's).
    async fn record(&mut self) -> Result<(), Refusal> {
        self.last_record = tokio::time::Instant::now();
        if self.unrecorded == 0 && self.received == 0 {
            return Ok(()); // nothing came: the upload is not touched (nor kept alive)
        }
        if let Some(writer) = &mut self.writer {
            writer.sync().await?;
        }
        let (account, id) = (self.peer.device.account_id, self.id);
        let (bits, received) = (self.held.bits.clone(), self.received);
        self.peer
            .shared
            .storage
            .write(move |db| db.record_chunks(account, id, &bits, received, now()))
            .await
            .map_err(Refusal::internal)?;
        (self.unrecorded, self.received) = (0, 0);
        Ok(())
    }
}

/// Which stream of each upload may write its part file: the newest to begin it, until one
/// seals it for verification (ARCHITECTURE.md §4). A stream that lost its turn stops at its
/// next write; none can change the file once it is sealed, so what is verified is what is
/// stored. Also counts each account's upload streams, so that streams left open (each with
/// its chunk queue and frame buffer) stay bounded.
#[derive(Debug, Default)]
pub(crate) struct Fences {
    inner: std::sync::Mutex<FencesInner>,
    turns: std::sync::atomic::AtomicU64,
}

#[derive(Debug, Default)]
struct FencesInner {
    fences: std::collections::HashMap<(AccountId, RequestId), Arc<Fence>>,
    streams: std::collections::HashMap<AccountId, usize>,
}

/// One upload's turn: the token of the stream that may write (tokens start at 1), `0` for
/// none, or `VERIFYING`.
#[derive(Debug, Default)]
pub(crate) struct Fence {
    owner: std::sync::Mutex<u64>,
}

/// No stream may write, nor take a turn: the upload is being verified.
const VERIFYING: u64 = u64::MAX;

/// A stream's turn to write one upload.
#[derive(Debug)]
pub(crate) struct Turn {
    fence: Arc<Fence>,
    token: u64,
}

/// Why a stream got no turn.
enum NoTurn {
    Verifying,
    /// The account has this many upload streams open already.
    Streams(usize),
}

impl Fences {
    /// The caller's turn to write `key`, taken from any earlier stream: not while it is being
    /// verified, nor past `max_streams` upload streams of the account.
    fn claim(&self, key: (AccountId, RequestId), max_streams: usize) -> Result<Turn, NoTurn> {
        let token = self
            .turns
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut inner = self.lock();
        let open = inner.streams.get(&key.0).copied().unwrap_or(0);
        if open >= max_streams {
            return Err(NoTurn::Streams(open));
        }
        let fence = Arc::clone(inner.fences.entry(key).or_default());
        {
            let mut owner = fence.lock();
            if *owner == VERIFYING {
                return Err(NoTurn::Verifying);
            }
            *owner = token;
        }
        *inner.streams.entry(key.0).or_default() += 1;
        Ok(Turn { fence, token })
    }

    /// The stream is done with `key` (its writer stopped): the entry goes once no other
    /// stream holds it.
    fn release(&self, key: (AccountId, RequestId), turn: Turn) {
        let mut inner = self.lock();
        if let Some(n) = inner.streams.get_mut(&key.0) {
            *n -= 1;
            if *n == 0 {
                inner.streams.remove(&key.0);
            }
        }
        let last = Arc::strong_count(&turn.fence) <= 2;
        drop(turn);
        if last {
            inner.fences.remove(&key);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FencesInner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Fence {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.owner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Turn {
    /// Runs `write` if this stream still has the turn.
    fn write<T>(&self, write: impl FnOnce() -> T) -> Option<T> {
        let owner = self.fence.lock();
        (*owner == self.token).then(write)
    }

    /// Ends every stream's turn while the caller verifies (until the guard is dropped);
    /// `None` if another stream took the turn.
    fn seal(&self) -> Option<Sealed<'_>> {
        let mut owner = self.fence.lock();
        if *owner != self.token {
            return None;
        }
        *owner = VERIFYING;
        Some(Sealed(&self.fence))
    }
}

/// While it lives, no stream writes the upload or takes a turn; then none has the turn (a
/// stream that begins the upload again takes it).
struct Sealed<'a>(&'a Fence);

impl Drop for Sealed<'_> {
    fn drop(&mut self) {
        *self.0.lock() = 0;
    }
}

/// The part file's writer: one task that writes chunks in order of arrival (while the stream
/// reads the next) and hashes them while they come in order from the first.
struct PartWriter {
    ops: tokio::sync::mpsc::Sender<Op>,
    task: Option<tokio::task::JoinHandle<Result<(), Refusal>>>,
}

async fn sync(file: &Arc<std::fs::File>) -> Result<(), Refusal> {
    let file = Arc::clone(file);
    tokio::task::spawn_blocking(move || file.sync_data())
        .await
        .map_err(Refusal::internal)?
        .map_err(Refusal::internal)
}

enum Op {
    Write(u32, Vec<u8>),
    Sync(tokio::sync::oneshot::Sender<()>),
    /// The digest when every chunk was hashed in order (`None`: hash the file).
    Finish(tokio::sync::oneshot::Sender<Option<Sha256>>),
}

/// Chunks queued for the writer (the most chunk memory a stream holds).
const WRITE_AHEAD: usize = 4;

impl PartWriter {
    /// A writer for `file` (an upload of `chunks` chunks). A task, not a thread: each write or
    /// sync runs on the blocking pool only while it runs, so a stream that sends nothing
    /// holds no thread.
    fn start(
        file: std::fs::File,
        turn: Arc<Turn>,
        from_scratch: bool,
        chunk_size: u32,
        chunks: u32,
    ) -> Self {
        let (ops, mut queue) = tokio::sync::mpsc::channel::<Op>(WRITE_AHEAD);
        let task = tokio::spawn(async move {
            use sha2::Digest;
            let file = Arc::new(file);
            // The digest of chunks 0..next, while they came in order from the first.
            let mut hasher = from_scratch.then(sha2::Sha256::new);
            let mut next = 0u32;
            while let Some(op) = queue.recv().await {
                match op {
                    Op::Write(index, data) => {
                        let in_order = hasher.is_some() && index == next;
                        let carried = if in_order { hasher.take() } else { None };
                        let (file, turn) = (Arc::clone(&file), Arc::clone(&turn));
                        let hashed = tokio::task::spawn_blocking(move || {
                            use std::os::unix::fs::FileExt;
                            let at = u64::from(index) * u64::from(chunk_size);
                            turn.write(|| file.write_all_at(&data, at))
                                .ok_or_else(|| {
                                    Refusal(
                                        ErrorCode::CANCELLED,
                                        "a newer stream of this upload took over".into(),
                                    )
                                })?
                                .map_err(Refusal::internal)?;
                            Ok::<_, Refusal>(carried.map(|mut h| {
                                h.update(&data);
                                h
                            }))
                        })
                        .await
                        .map_err(Refusal::internal)??;
                        hasher = hashed;
                        if hasher.is_some() {
                            next += 1;
                        }
                    }
                    Op::Sync(done) => {
                        sync(&file).await?;
                        let _ = done.send(());
                    }
                    Op::Finish(done) => {
                        sync(&file).await?;
                        // Only a digest of every chunk, each written by this stream in order
                        // after it took its turn, is the file's.
                        let digest = hasher
                            .take()
                            .filter(|_| next == chunks)
                            .map(|h| Sha256(h.finalize().into()));
                        let _ = done.send(digest);
                        return Ok(());
                    }
                }
            }
            Ok(())
        });
        PartWriter {
            ops,
            task: Some(task),
        }
    }

    /// Stops the writer once it has done what was queued.
    async fn close(mut self) {
        let task = self.task.take();
        drop(self);
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Why the writer stopped (it stops only on an error, or after `Finish`).
    async fn failure(&mut self) -> Refusal {
        match self.task.take() {
            Some(task) => match task.await {
                Ok(Err(refusal)) => refusal,
                Ok(Ok(())) => Refusal::internal("the part file's writer stopped"),
                Err(e) => Refusal::internal(e),
            },
            None => Refusal::internal("the part file's writer stopped"),
        }
    }

    async fn write(&mut self, index: u32, data: Vec<u8>) -> Result<(), Refusal> {
        if self.ops.send(Op::Write(index, data)).await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    async fn sync(&mut self) -> Result<(), Refusal> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.ops.send(Op::Sync(tx)).await.is_err() || rx.await.is_err() {
            return Err(self.failure().await);
        }
        Ok(())
    }

    async fn finish(&mut self) -> Result<Option<Sha256>, Refusal> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.ops.send(Op::Finish(tx)).await.is_err() {
            return Err(self.failure().await);
        }
        match rx.await {
            Ok(digest) => Ok(digest),
            Err(_) => Err(self.failure().await),
        }
    }
}

/// The length chunk `index` must have, `None` when out of range.
fn chunk_len(d: &Declared, index: u32) -> Option<usize> {
    let start = u64::from(index) * u64::from(d.chunk_size);
    if index >= d.chunks() || start >= d.size_bytes {
        return None;
    }
    usize::try_from((d.size_bytes - start).min(u64::from(d.chunk_size))).ok()
}

fn open_part(path: &Path, size: u64) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(dir) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    if file.metadata()?.len() != size {
        file.set_len(size)?;
    }
    Ok(file)
}

/// `UploadDone`: every chunk held, the part file sealed (no stream writes it any more), the
/// bytes verified, then the content stored and the name pointed at it (one transaction).
/// Returns the digest.
async fn finish(
    peer: &Peer,
    id: RequestId,
    d: &Declared,
    completed: bool,
    hashed: Option<Sha256>,
    turn: &Turn,
) -> Result<Sha256, Refusal> {
    let shared = &peer.shared;
    let (account, device) = (peer.device.account_id, peer.device.id);
    if completed {
        return Ok(d.sha256); // a replay: the name is not moved again
    }
    let Some(_sealed) = turn.seal() else {
        return Err(Refusal(
            ErrorCode::CANCELLED,
            "a newer stream of this upload took over".into(),
        ));
    };
    if let Some(file) = &shared.adapters.verify_pause_while {
        // Tests only (`[adapters] verify_pause_while`): the sealed window, held open.
        tracing::info!(upload = %id, "sealed for verification; paused while {} exists", file.display());
        while file.exists() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let row = shared
        .storage
        .read(move |db| db.unit().upload(account, id))
        .await
        .map_err(Refusal::internal)?
        .ok_or_else(|| {
            Refusal(
                ErrorCode::NOT_FOUND,
                "this upload was removed (abandoned too long); start it again".into(),
            )
        })?;
    let held = Held::new(d.chunks(), row.held);
    if let Some(missing) = held.first_missing() {
        return Err(Refusal(
            ErrorCode::INVALID_REQUEST,
            format!(
                "chunk {missing} was never received ({} of {} held); send the missing chunks, then UploadDone",
                held.count(),
                d.chunks()
            ),
        ));
    }
    let part = part_path(&shared.data_dir, account, id);
    let blob = blob_path(&shared.data_dir, account, &d.sha256);
    let (sha, size) = (d.sha256, d.size_bytes);
    let held_already = shared
        .storage
        .read(move |db| db.unit().holds_content(account, &sha, size))
        .await
        .map_err(Refusal::internal)?;
    // Another node that may hold a stream of this upload: its part file is verified as a copy.
    let me = shared.cluster.node.id.clone();
    let shared_with_others = shared
        .storage
        .read(move |db| {
            let at = now();
            Ok(db.nodes()?.iter().any(|n| {
                n.id != me
                    && n.stopped_at.is_none()
                    && at.0.saturating_sub(n.seen_at.0) < OTHER_NODE_WRITES_FOR_MS
            }))
        })
        .await
        .map_err(Refusal::internal)?;
    let architecture = base_architecture(shared, &d.base_model).ok_or_else(|| {
        Refusal(
            ErrorCode::UNKNOWN_MODEL,
            format!("{:?} is no longer served", d.base_model),
        )
    })?;
    {
        // Content the account holds is checked against this base model (a header read); a new
        // upload is verified whole. A part file already moved into place (a crash between the
        // move and the record) is verified where it is.
        let (part_file, blob_file, want) = (part.clone(), blob.clone(), d.clone());
        let verified = tokio::task::spawn_blocking(move || {
            if held_already {
                check_header(&blob_file, &want, &architecture)
            } else if !part_file.exists() && blob_file.exists() {
                let actual = hash_file(&blob_file).map_err(Refusal::internal)?;
                check(&blob_file, actual, &want, &architecture)
            } else if !part_file.exists() {
                Err(Refusal(
                    ErrorCode::NOT_FOUND,
                    "this upload's data is gone from the cloud; push it again".into(),
                ))
            } else {
                verify_and_store(
                    &part_file,
                    &blob_file,
                    &want,
                    &architecture,
                    hashed.filter(|_| !shared_with_others),
                    shared_with_others,
                )
            }
        })
        .await
        .map_err(Refusal::internal)?;
        if let Err(refusal) = verified {
            // Nothing this upload holds can complete it any more: it starts again.
            if matches!(
                refusal.0,
                ErrorCode::HASH_MISMATCH | ErrorCode::ADAPTER_INVALID | ErrorCode::NOT_FOUND
            ) {
                let _ = shared
                    .storage
                    .write(move |db| {
                        db.unit().discard_upload(account, id)?;
                        let _ = std::fs::remove_file(&part);
                        Ok(())
                    })
                    .await;
            }
            return Err(refusal);
        }
    }
    let want = d.clone();
    // On the write connection, where the sweeper also deletes content: the file is there when
    // the name is pointed at it.
    let stored = shared
        .storage
        .write(move |db| {
            if !blob.exists() {
                return Ok(false);
            }
            db.complete_upload(account, id, device, &want, now())?;
            Ok(true)
        })
        .await
        .map_err(Refusal::internal)?;
    if !stored {
        let _ = shared
            .storage
            .write(move |db| db.unit().discard_upload(account, id))
            .await;
        return Err(Refusal(
            ErrorCode::NOT_FOUND,
            "the content this upload named was removed meanwhile; push it again".into(),
        ));
    }
    if held_already {
        let _ = std::fs::remove_file(part_path(&shared.data_dir, account, id));
    }
    tracing::info!(%account, upload = %id, name = %d.name, sha256 = %d.sha256, bytes = d.size_bytes, "adapter stored");
    Ok(d.sha256)
}

/// Checks the sealed part file — its digest (`hashed` when it was hashed as it was written,
/// else read again), a LoRA adapter for `architecture` — and moves it to its content address
/// (synced, with its directory).
///
/// With other nodes about (`shared_with_others`), it first copies the part file to a file of its
/// own, hashing it as it copies, and checks and moves the copy; then removes the part file. The
/// copy is what makes "what is verified is what is stored" hold across nodes: the seal stops
/// this node's streams, but a stream of the same upload on another node (the data directory is
/// shared) may still hold the part file open and write to it. No writer has the copy open, so
/// nothing changes it between the check and its use. Alone, the seal is enough, and the copy
/// (a write and a sync of the whole adapter) is spared.
fn verify_and_store(
    part: &Path,
    blob: &Path,
    d: &Declared,
    architecture: &str,
    hashed: Option<Sha256>,
    shared_with_others: bool,
) -> Result<(), Refusal> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = blob
        .parent()
        .ok_or_else(|| Refusal::internal("a blob path has no directory"))?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(Refusal::internal)?;
    if !shared_with_others {
        let actual = match hashed {
            Some(digest) => digest,
            None => hash_file(part).map_err(Refusal::internal)?,
        };
        check(part, actual, d, architecture)?;
        std::fs::rename(part, blob).map_err(Refusal::internal)?;
        return std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Refusal::internal);
    }
    let copy = dir.join(format!(".{}.verifying", uuid::Uuid::now_v7().simple()));
    let result = (|| {
        let actual = copy_hashing(part, &copy).map_err(Refusal::internal)?;
        check(&copy, actual, d, architecture)?;
        std::fs::rename(&copy, blob).map_err(Refusal::internal)?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Refusal::internal)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&copy);
    }
    result?;
    let _ = std::fs::remove_file(part);
    Ok(())
}

/// Copies `from` to the new file `to` (0600, synced), returning the SHA-256 of what it wrote.
fn copy_hashing(from: &Path, to: &Path) -> std::io::Result<Sha256> {
    use sha2::Digest;
    use std::io::{Read, Write};
    use std::os::unix::fs::OpenOptionsExt;
    let mut source = std::fs::File::open(from)?;
    let mut target = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = source.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        target.write_all(&buffer[..n])?;
    }
    target.sync_all()?;
    Ok(Sha256(hasher.finalize().into()))
}

fn hash_file(path: &Path) -> std::io::Result<Sha256> {
    use sha2::Digest;
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut hasher = sha2::Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(Sha256(hasher.finalize().into()));
        }
        hasher.update(&buffer[..n]);
    }
}

/// The file's digest is the declared one, and it is a LoRA adapter for `architecture`.
fn check(file: &Path, actual: Sha256, d: &Declared, architecture: &str) -> Result<(), Refusal> {
    if actual != d.sha256 {
        return Err(Refusal(
            ErrorCode::HASH_MISMATCH,
            format!(
                "the bytes received hash to {actual}, not the declared {}; the upload was discarded, start it again",
                d.sha256
            ),
        ));
    }
    check_header(file, d, architecture)
}

/// The file is a GGUF LoRA adapter for `architecture`.
fn check_header(file: &Path, d: &Declared, architecture: &str) -> Result<(), Refusal> {
    let invalid = |why: String| Refusal(ErrorCode::ADAPTER_INVALID, why);
    let meta = synesis_infer::GgufMetadata::read(file)
        .map_err(|e| invalid(format!("not a GGUF file: {e}")))?;
    if !meta.is_adapter() {
        return Err(invalid(
            "a model, not an adapter (general.type is not \"adapter\")".into(),
        ));
    }
    if meta.str("adapter.type") != Some("lora") {
        return Err(invalid(
            "an adapter, but not a LoRA (adapter.type is not \"lora\")".into(),
        ));
    }
    let arch = meta.architecture().unwrap_or("unknown");
    if arch != architecture {
        return Err(invalid(format!(
            "an adapter for the {arch} architecture; {} is {architecture}",
            d.base_model
        )));
    }
    Ok(())
}

/// Which chunks one stream knows are on disk.
struct Held {
    bits: Vec<u8>,
    chunks: u32,
}

impl Held {
    fn new(chunks: u32, mut bits: Vec<u8>) -> Held {
        bits.resize(chunks.div_ceil(8) as usize, 0);
        Held { bits, chunks }
    }

    fn has(&self, i: u32) -> bool {
        self.bits
            .get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    fn set(&mut self, i: u32) {
        if let Some(b) = self.bits.get_mut((i / 8) as usize) {
            *b |= 1 << (i % 8);
        }
    }

    fn indexes(&self) -> Vec<u32> {
        (0..self.chunks).filter(|&i| self.has(i)).collect()
    }

    fn count(&self) -> usize {
        (0..self.chunks).filter(|&i| self.has(i)).count()
    }

    fn first_missing(&self) -> Option<u32> {
        (0..self.chunks).find(|&i| !self.has(i))
    }

    fn all(&self) -> bool {
        self.first_missing().is_none()
    }
}

/// Removes abandoned partial uploads and content released long enough ago, now and then.
pub(crate) async fn sweep(shared: Arc<Shared>) {
    let abandon = shared.adapters.abandon_after;
    let every = (abandon / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticker = tokio::time::interval(every);
    loop {
        ticker.tick().await;
        let at = now();
        let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        let (abandoned, released) = (
            synesis_proto::UnixMillis(at.0.saturating_sub(ms(abandon))),
            synesis_proto::UnixMillis(at.0.saturating_sub(ms(RELEASE_GRACE))),
        );
        let data = shared.data_dir.clone();
        let swept = shared
            .storage
            .write(move |db| {
                let swept = db.sweep_uploads(abandoned, released)?;
                for (account, upload) in &swept.uploads {
                    let _ = std::fs::remove_file(part_path(&data, *account, *upload));
                }
                for (account, sha) in &swept.blobs {
                    let _ = std::fs::remove_file(blob_path(&data, *account, sha));
                }
                Ok(swept)
            })
            .await;
        match swept {
            Ok(s) if s.uploads.is_empty() && s.blobs.is_empty() => {}
            Ok(s) => tracing::info!(
                uploads = s.uploads.len(),
                contents = s.blobs.len(),
                "removed abandoned uploads and unused adapter content"
            ),
            Err(e) => tracing::warn!(error = %e, "cannot sweep uploads"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(size: u64, chunk: u32) -> Declared {
        Declared {
            name: "a".into(),
            base_model: "tiny".into(),
            size_bytes: size,
            sha256: Sha256([0; 32]),
            chunk_size: chunk,
        }
    }

    #[test]
    fn every_chunk_is_its_size_and_the_last_is_the_remainder() {
        let d = declared(10 * 65_536 + 7, 65_536);
        assert_eq!(d.chunks(), 11);
        assert_eq!(chunk_len(&d, 0), Some(65_536));
        assert_eq!(chunk_len(&d, 10), Some(7));
        assert_eq!(chunk_len(&d, 11), None);
        assert_eq!(chunk_len(&d, u32::MAX), None);
        let exact = declared(2 * 65_536, 65_536);
        assert_eq!((exact.chunks(), chunk_len(&exact, 1)), (2, Some(65_536)));
    }

    #[test]
    fn held_chunks_are_bits_and_merge_without_loss() {
        let mut h = Held::new(10, Vec::new());
        assert_eq!(h.first_missing(), Some(0));
        for i in [0, 3, 9] {
            h.set(i);
        }
        h.set(99); // out of range: ignored
        assert_eq!(h.indexes(), [0, 3, 9]);
        assert_eq!((h.count(), h.first_missing(), h.all()), (3, Some(1), false));
    }

    #[test]
    fn names_are_short_and_plain() {
        assert!(valid_name("legal-v2.1_x"));
        for bad in ["", "a/b", "../x", "é", &"x".repeat(65)] {
            assert!(!valid_name(bad), "{bad:?}");
        }
    }
}
