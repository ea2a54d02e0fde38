//! Escalation streams: a device's prompt answered by a provider, streamed back chunk by chunk,
//! billed exactly once (PROTOCOL.md §2, *Escalation*).
//!
//! A request is a [`Run`], keyed by `(account, request id)` and independent of the stream that
//! asked for it:
//!
//! 1. **Admission**, in this order, each refusal clear and free: the model is served
//!    (`UNKNOWN_MODEL`) and to this tier (`MODEL_NOT_ALLOWED`), the values are sane
//!    (`INVALID_REQUEST`), the hold for the input and the maximum output fits `max_cost`
//!    (`MAX_COST_EXCEEDED`), then the ledger places the hold (`QUOTA_EXCEEDED`,
//!    `INSUFFICIENT_FUNDS`). The provider counts the input first (llama.cpp's tokenizer; an
//!    HTTP upstream's bound).
//! 2. **Generation** ([`drive`]) runs in a task of its own: the device may go away and come
//!    back. Chunks are numbered and kept in the run (at most `max_output_tokens` of them), so
//!    any number of streams follow it from any `seq` ([`follow`]): the first asker, a repeat
//!    of the same request id, an `EscalationResume` after a reconnect. An upstream that fails
//!    before its first chunk is retried; after that, never.
//! 3. **Settlement**: the actual usage (the provider's count, or the cloud's when it gave
//!    none: [`Produced::usage`]), never more than the hold, in one ledger transaction with the
//!    answer itself (`escalation_answers`). A request cancelled, abandoned (no device for
//!    `resume_window`), idle (`idle_timeout`) or failed after it produced something is charged
//!    for what it produced. One cancelled or abandoned before its first chunk but after the
//!    provider had it is charged its input; one that failed (or was cut, or cancelled before
//!    its provider had it) before its first chunk is voided.
//!
//! Idempotency: a request id already running is followed, not run again; one finished is
//! streamed again from its stored answer; one that ended without an answer after its hold was
//! placed (voided) is spent, `INVALID_REQUEST`, whether the run is still in memory or not; one
//! used for another body is `IDEMPOTENCY_CONFLICT`. After a restart a request whose hold is still open runs again from
//! the start under the same hold (the device says so to its user), and is charged once.
//! All of this only for the devices of the member that asked (the run's [`Asker`]; stored,
//! the member of the device the hold was placed for): another member's `EscalationResume` is
//! `NOT_FOUND` as for an unknown id, and its `EscalationRequest` with the id
//! `IDEMPOTENCY_CONFLICT` whatever its body.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use sha2::{Digest, Sha256};
use synesis_billing::ledger::{
    Account as LedgerAccount, HoldRequest, HoldState, LedgerError, hold, hold_state, settle, void,
};
use synesis_billing::{Quote, Usage as BillingUsage, quote};
use synesis_proto::message::{
    ChatRole, Cost, ErrorMsg, EscalationChunk, EscalationDone, EscalationRequest, EscalationResume,
    FinishReason, Tier, Usage,
};
use synesis_proto::{
    AccountId, DeviceId, ErrorCode, FrameLimits, Message, MessageType, RequestId, UnixMillis,
};
use synesis_wire::RecvError;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use crate::config::{EscalationSettings, ProviderConfig, Serving};
use crate::endpoint::Peer;
use crate::provider::{ApiKey, Ask, Event, Provider, ProviderError, ProviderUsage};
use crate::shared::{Shared, now};
use crate::storage::StorageError;
use crate::storage::answers::{Asker, StoredAnswer};
use crate::storage::ledger::LedgerUnit;
use crate::streams::{Stream, error_msg};

/// A generation stops this long (at most a fifth of its hold's time) before its hold expires,
/// so that its settlement (which an expired hold refuses) still fits.
const HOLD_MARGIN: Duration = Duration::from_secs(5);
/// How long an account at its limit of running requests is told to wait.
const BUSY_RETRY_AFTER_MS: u32 = 1_000;
/// How long a device asking for a request that runs on another (still serving) node is told
/// to wait.
const ELSEWHERE_RETRY_AFTER_MS: u32 = 1_000;
/// How often a running request checks whether any device still follows it.
const FOLLOWER_CHECK: Duration = Duration::from_secs(1);
/// The first wait before retrying an upstream (doubled each time, unless it said how long).
const RETRY_BACKOFF: Duration = Duration::from_millis(250);
/// The most stop strings, and the longest one.
const STOPS_MAX: usize = 16;
const STOP_BYTES_MAX: usize = 256;

/// Every served model's provider and the requests running or recently finished.
#[derive(Debug)]
pub(crate) struct Escalations {
    models: BTreeMap<String, Model>,
    /// `[escalation] default_model` (a served model).
    default_model: Option<String>,
    settings: EscalationSettings,
    runs: Mutex<HashMap<(AccountId, RequestId), Arc<Run>>>,
    /// Requests being admitted or generated, per account (at most `per_account_max`).
    live: Mutex<HashMap<AccountId, usize>>,
}

/// What [`Escalations::claim`] found.
enum Claim {
    /// The request id is running or recently finished: follow it.
    Existing(Arc<Run>),
    /// A new run, for the caller to admit.
    Fresh(Arc<Run>),
    /// The account already has `per_account_max` requests running.
    Busy,
}

#[derive(Debug)]
struct Model {
    provider: Arc<dyn Provider>,
    tiers: Vec<Tier>,
    /// The provider's own name for the model.
    upstream: String,
}

impl Escalations {
    pub(crate) fn new(serving: &Serving) -> anyhow::Result<Escalations> {
        let mut models = BTreeMap::new();
        for (name, served) in &serving.models {
            models.insert(
                name.clone(),
                Model {
                    provider: crate::provider::build(&served.provider)?,
                    tiers: served.tiers.clone(),
                    upstream: match &served.provider {
                        ProviderConfig::Llama(_) => name.clone(),
                        ProviderConfig::OpenAi(u) | ProviderConfig::Anthropic(u) => {
                            u.upstream_model.clone()
                        }
                    },
                },
            );
        }
        Ok(Escalations {
            models,
            default_model: serving.default_model.clone(),
            settings: serving.escalation,
            runs: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
        })
    }

    /// The models served to `tier`, by name, with their context when known; and the one a
    /// device of that tier asks when it names none: the operator's default when the tier may
    /// use it, else the first of them.
    /// `model` as a metric's label: its name when served here, else `other` (a device names
    /// whatever it likes).
    pub(crate) fn label(&self, model: &str) -> String {
        if self.models.contains_key(model) {
            model.to_owned()
        } else {
            "other".to_owned()
        }
    }

    pub(crate) fn served_to(&self, tier: Tier) -> (Vec<(String, Option<u32>)>, Option<String>) {
        let served: Vec<(String, Option<u32>)> = self
            .models
            .iter()
            .filter(|(_, m)| m.tiers.contains(&tier))
            .map(|(name, m)| (name.clone(), m.provider.context_tokens()))
            .collect();
        let default = self
            .default_model
            .as_ref()
            .filter(|d| served.iter().any(|(name, _)| name == *d))
            .cloned()
            .or_else(|| served.first().map(|(name, _)| name.clone()));
        (served, default)
    }

    /// The architecture accounts' adapters for `model` must have, when it takes uploads.
    pub(crate) fn adapter_architecture(&self, model: &str) -> Option<String> {
        self.models
            .get(model)
            .and_then(|m| m.provider.adapter_architecture())
    }

    /// A device expects to escalate to `model` soon: its provider gets ready.
    pub(crate) fn prewarm(&self, model: &str) {
        if let Some(m) = self.models.get(model) {
            m.provider.prewarm();
        }
    }

    fn runs(&self) -> std::sync::MutexGuard<'_, HashMap<(AccountId, RequestId), Arc<Run>>> {
        self.runs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The run of `key`: the one already there, or a new one for the caller to admit when the
    /// account has room for one more.
    fn claim(&self, key: (AccountId, RequestId), body: [u8; 32], asker: &Asker) -> Claim {
        let mut runs = self.runs();
        if let Some(run) = runs.get(&key) {
            return Claim::Existing(Arc::clone(run));
        }
        {
            let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
            let n = live.entry(key.0).or_default();
            if *n >= self.settings.per_account_max {
                return Claim::Busy;
            }
            *n += 1;
        }
        let run = Arc::new(Run::new(key.1, body, asker.clone()));
        runs.insert(key, Arc::clone(&run));
        Claim::Fresh(run)
    }

    /// A run [`claim`](Self::claim)ed fresh is over (its admission task ended).
    fn release(&self, account: AccountId) {
        let mut live = self.live.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = live.get_mut(&account) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                live.remove(&account);
            }
        }
    }

    fn get(&self, key: (AccountId, RequestId)) -> Option<Arc<Run>> {
        self.runs().get(&key).cloned()
    }

    /// Forgets `run` now (a refusal that wrote nothing: the same id may be sent again).
    fn forget(&self, key: (AccountId, RequestId), run: &Arc<Run>) {
        let mut runs = self.runs();
        if runs.get(&key).is_some_and(|r| Arc::ptr_eq(r, run)) {
            runs.remove(&key);
        }
    }

    /// Keeps a finished run for `resume_window` (a device that lost the end resumes from
    /// memory), then forgets it; its stored answer serves repeats from then on.
    fn forget_later(self: &Arc<Self>, key: (AccountId, RequestId), run: Arc<Run>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            tokio::time::sleep(this.settings.resume_window).await;
            this.forget(key, &run);
        });
    }
}

/// One request: its chunks so far, its end, who follows it.
#[derive(Debug)]
struct Run {
    request_id: RequestId,
    body: [u8; 32],
    /// The member that asked: only its devices follow the run (anyone else is told the id is
    /// unknown, or used for another request).
    asker: Asker,
    state: Mutex<RunState>,
    /// Bumped at every change; followers wait on it.
    changed: watch::Sender<u64>,
    cancel: Notify,
    /// A device asked to cancel (also before the provider was started: it then never is).
    cancel_asked: AtomicBool,
}

#[derive(Debug, Default)]
struct RunState {
    chunks: Vec<String>,
    /// The tokens' log-probabilities, when the request asked and the provider told them.
    logprobs: Vec<synesis_proto::message::TokenLogprob>,
    /// `EscalationDone` or `ErrorMsg`.
    end: Option<Message>,
    followers: usize,
    /// Since when nobody follows (`None` while someone does).
    alone_since: Option<Instant>,
    /// When the first chunk came (`/metrics`: time to first chunk).
    first_chunk_at: Option<Instant>,
}

impl Run {
    fn new(request_id: RequestId, body: [u8; 32], asker: Asker) -> Run {
        Run {
            request_id,
            body,
            asker,
            state: Mutex::new(RunState {
                alone_since: Some(Instant::now()),
                ..RunState::default()
            }),
            changed: watch::channel(0).0,
            cancel: Notify::new(),
            cancel_asked: AtomicBool::new(false),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RunState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut RunState)) {
        f(&mut self.state());
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn push(&self, text: String) {
        self.update(|s| {
            s.first_chunk_at.get_or_insert_with(Instant::now);
            s.chunks.push(text);
        });
    }

    fn end(&self, message: Message) {
        self.update(|s| {
            s.end.get_or_insert(message);
        });
    }

    /// The message of the `ErrorMsg` the run ended with, if it ended without an answer.
    fn refused(&self) -> Option<String> {
        match &self.state().end {
            Some(Message::ErrorMsg(e)) => Some(e.message.clone()),
            _ => None,
        }
    }

    fn produced(&self) -> usize {
        self.state().chunks.len()
    }

    /// The UTF-8 bytes of the chunks so far.
    fn produced_bytes(&self) -> u64 {
        self.state().chunks.iter().map(|c| c.len() as u64).sum()
    }

    /// A device cancels the request: the generation stops (or never starts).
    fn cancel(&self) {
        // Relaxed: read before the provider starts, the `Notify` carries it after.
        self.cancel_asked.store(true, Ordering::Relaxed);
        self.cancel.notify_one();
    }

    fn cancel_asked(&self) -> bool {
        self.cancel_asked.load(Ordering::Relaxed)
    }

    fn chunks(&self) -> Vec<String> {
        self.state().chunks.clone()
    }

    fn set_logprobs(&self, logprobs: Vec<synesis_proto::message::TokenLogprob>) {
        self.state().logprobs = logprobs;
    }

    fn logprobs(&self) -> Vec<synesis_proto::message::TokenLogprob> {
        self.state().logprobs.clone()
    }

    fn attach(&self) {
        let mut s = self.state();
        s.followers += 1;
        s.alone_since = None;
    }

    fn detach(&self) {
        let mut s = self.state();
        s.followers = s.followers.saturating_sub(1);
        if s.followers == 0 {
            s.alone_since = Some(Instant::now());
        }
    }

    /// Whether nobody has followed the run for `window`.
    fn abandoned(&self, window: Duration) -> bool {
        self.state()
            .alone_since
            .is_some_and(|t| t.elapsed() >= window)
    }
}

/// Serves a stream whose first frame is an `EscalationRequest` or an `EscalationResume`.
pub(crate) async fn serve(peer: &Peer, first: Message, mut stream: Stream) {
    if let Err(reply) = crate::account::still_enrolled(peer).await {
        stream.send_last(&reply).await;
        return;
    }
    let asker = match asker_of(peer).await {
        Ok(asker) => asker,
        Err(reply) => return stream.send_last(&reply).await,
    };
    let escalations = &peer.shared.escalations;
    let account = peer.device.account_id;
    match first {
        Message::EscalationRequest(r) => {
            let key = (account, r.request_id);
            let body = body_of(&r);
            let (run, fresh) = match escalations.claim(key, body, &asker) {
                Claim::Existing(run) => (run, false),
                Claim::Fresh(run) => (run, true),
                Claim::Busy => {
                    let reply = ErrorMsg {
                        code: ErrorCode::LIMIT_EXCEEDED,
                        message: format!(
                            "this account already has {} requests running; retry when one ends",
                            escalations.settings.per_account_max
                        ),
                        request_id: Some(r.request_id),
                        retry_after_ms: Some(BUSY_RETRY_AFTER_MS),
                    };
                    return stream.send_last(&reply.into()).await;
                }
            };
            // Another member's request: a conflict whatever its body, so that nobody learns
            // whether they guessed the body, and before anything of the run is read.
            if run.asker != asker || run.body != body {
                return conflict(&mut stream, r.request_id).await;
            }
            if let Some(why) = run.refused() {
                // It ended without an answer after its hold was placed (a refusal that wrote
                // nothing is forgotten before it ends): the id is spent, as the ledger will say
                // once the run is forgotten.
                let reply = error_msg(
                    ErrorCode::INVALID_REQUEST,
                    format!(
                        "this request id is spent: {why}; send the request again with a new id"
                    ),
                    Some(r.request_id),
                );
                return stream.send_last(&reply).await;
            }
            if fresh {
                let admission = Admission {
                    shared: Arc::clone(&peer.shared),
                    account,
                    device: peer.device.id,
                    run: Arc::clone(&run),
                };
                tokio::spawn(admission.run(r));
            }
            follow(&run, &mut stream, 0).await;
        }
        Message::EscalationResume(r) => resume(peer, &asker, r, &mut stream).await,
        other => {
            let reply = error_msg(
                ErrorCode::UNEXPECTED_MESSAGE,
                format!("{} cannot open an escalation", other.message_type().name()),
                None,
            );
            stream.send_last(&reply).await;
        }
    }
}

/// The member the calling device belongs to, read now.
async fn asker_of(peer: &Peer) -> Result<Asker, Message> {
    let device = peer.device.id;
    match peer
        .shared
        .storage
        .read(move |db| db.unit().asker_of_device(device))
        .await
    {
        Ok(Some(asker)) => Ok(asker),
        Ok(None) => Err(error_msg(
            ErrorCode::DEVICE_REVOKED,
            "this device belongs to no member of the account",
            None,
        )),
        Err(e) => {
            tracing::error!(error = %e, "reading the device's member failed");
            Err(error_msg(ErrorCode::UNAVAILABLE, "try again", None))
        }
    }
}

async fn conflict(stream: &mut Stream, request_id: RequestId) {
    let reply = error_msg(
        ErrorCode::IDEMPOTENCY_CONFLICT,
        "this request id was used for another request",
        Some(request_id),
    );
    stream.send_last(&reply).await;
}

/// `EscalationResume`: the rest of a request from `next_seq`, from memory while it runs or
/// was just finished, else from its stored answer. Only for the member that asked it: for
/// anyone else the id is unknown (the same `NOT_FOUND`, word for word).
async fn resume(peer: &Peer, asker: &Asker, r: EscalationResume, stream: &mut Stream) {
    let key = (peer.device.account_id, r.request_id);
    let (account, request_id) = key;
    let unknown = || {
        error_msg(
            ErrorCode::NOT_FOUND,
            "no answer is held for this request (the cloud restarted, or it never ran): send the request again with the same id",
            Some(request_id),
        )
    };
    if let Some(run) = peer.shared.escalations.get(key) {
        if run.asker != *asker {
            return stream.send_last(&unknown()).await;
        }
        return follow(&run, stream, r.next_seq).await;
    }
    let (theirs, me) = (asker.clone(), peer.shared.cluster.node.id.clone());
    let stored = peer
        .shared
        .storage
        .read(move |db| {
            let unit = db.unit();
            // Still being made on another node that serves (the device lost that node, not
            // the cloud): resumed here once it is stored. Only for the member that asked.
            // Read before the answer: the hold closes in the transaction that stores the
            // answer, so a request found not running has its answer visible after.
            let elsewhere = unit
                .running_on(account, request_id, now())?
                .is_some_and(|node| node != me)
                && unit.asker(account, request_id)?.as_ref() == Some(&theirs);
            if elsewhere {
                return Ok(Resumed::Elsewhere);
            }
            Ok(match unit.answer(account, request_id)? {
                Some(answer) => Resumed::Stored(answer),
                None => Resumed::Unknown,
            })
        })
        .await;
    match stored {
        Ok(Resumed::Stored(answer)) if answer.asker.as_ref() == Some(asker) => {
            let run = Arc::new(Run::new(request_id, answer.body, asker.clone()));
            run.update(|s| {
                s.chunks = answer.chunks;
                s.end = Some(answer.done.into());
            });
            follow(&run, stream, r.next_seq).await;
        }
        Ok(Resumed::Elsewhere) => {
            let reply = ErrorMsg {
                code: ErrorCode::UNAVAILABLE,
                message: "the answer is still being made on another node of the cloud; resume in a moment".into(),
                request_id: Some(request_id),
                retry_after_ms: Some(ELSEWHERE_RETRY_AFTER_MS),
            };
            stream.send_last(&reply.into()).await;
        }
        Ok(_) => stream.send_last(&unknown()).await,
        Err(e) => {
            tracing::error!(error = %e, "reading a stored answer failed");
            let reply = error_msg(ErrorCode::UNAVAILABLE, "try again", Some(request_id));
            stream.send_last(&reply).await;
        }
    }
}

/// What a resume finds of a request this node does not hold.
enum Resumed {
    Stored(StoredAnswer),
    /// It runs on another node that serves.
    Elsewhere,
    Unknown,
}

/// Streams `run` to this stream from chunk `from` to its end, and passes the device's
/// `EscalationCancel` on. Leaving (the stream or the connection broke) does not stop the run.
async fn follow(run: &Run, stream: &mut Stream, from: u32) {
    run.attach();
    follow_attached(run, stream, from).await;
    run.detach();
}

async fn follow_attached(run: &Run, stream: &mut Stream, from: u32) {
    let mut changed = run.changed.subscribe();
    let mut next = from as usize;
    let mut reading = true;
    loop {
        let (pieces, end, past) = {
            let s = run.state();
            let past = next > s.chunks.len() && s.end.is_some();
            let pieces = s.chunks.get(next..).unwrap_or_default().to_vec();
            (pieces, s.end.clone(), past)
        };
        if past {
            let reply = error_msg(
                ErrorCode::INVALID_REQUEST,
                format!("next_seq {next} is past the answer's last chunk"),
                Some(run.request_id),
            );
            return stream.send_last(&reply).await;
        }
        // Every chunk waiting goes out in one write (a reader that fell behind catches up in
        // a few large writes, not one per token).
        let mut frames = Vec::new();
        for text in pieces {
            let chunk = EscalationChunk {
                request_id: run.request_id,
                seq: u32::try_from(next).unwrap_or(u32::MAX),
                text,
            };
            match synesis_proto::encode_frame_vec(&chunk.into(), stream.sends) {
                Ok(frame) => frames.extend_from_slice(&frame),
                Err(e) => {
                    tracing::error!(error = %e, "a chunk does not fit a frame");
                    return;
                }
            }
            next += 1;
        }
        if !frames.is_empty()
            && let Err(e) = stream.tx.write_all(&frames).await
        {
            if stopped_as_cancelled(&e) {
                run.cancel();
            }
            return; // the device went away; it may resume on another stream
        }
        if let Some(end) = end {
            return stream.send_last(&end).await;
        }
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            frame = stream.rx.next_if(|t| t == MessageType::EscalationCancel), if reading => {
                match frame {
                    Ok(Some(Message::EscalationCancel(c))) if c.request_id == run.request_id => {
                        run.cancel();
                    }
                    Ok(Some(_)) => {
                        let reply = error_msg(
                            ErrorCode::INVALID_REQUEST,
                            "EscalationCancel names another request",
                            Some(run.request_id),
                        );
                        return stream.reject_with(reply).await;
                    }
                    // The device finished its half: it sends nothing more, and reads on.
                    Ok(None) => reading = false,
                    Err(e) if reset_as_cancelled(&e) => {
                        // A local client that went away: its stream is reset with CANCELLED.
                        run.cancel();
                        return;
                    }
                    Err(e) => match e.peer_fault() {
                        Some(code) => {
                            let reply = error_msg(code, e.to_string(), Some(run.request_id));
                            return stream.reject_with(reply).await;
                        }
                        None => return,
                    },
                }
            }
        }
    }
}

/// Whether the device stopped our half with `CANCELLED` (a local client that went away, seen
/// while sending).
fn stopped_as_cancelled(e: &quinn::WriteError) -> bool {
    let cancelled = synesis_wire::close_code(ErrorCode::CANCELLED);
    matches!(e, quinn::WriteError::Stopped(code) if *code == cancelled)
}

/// Whether the device reset its half with `CANCELLED` (it will not come back for the answer).
fn reset_as_cancelled(e: &RecvError) -> bool {
    let RecvError::Io(io) = e else { return false };
    let cancelled = synesis_wire::close_code(ErrorCode::CANCELLED);
    io.get_ref()
        .and_then(|inner| inner.downcast_ref::<quinn::ReadError>())
        .is_some_and(|r| matches!(r, quinn::ReadError::Reset(code) if *code == cancelled))
}

/// The request's identity for idempotency: everything but the key itself (whether a key came
/// counts: it changes who pays the provider).
fn body_of(r: &EscalationRequest) -> [u8; 32] {
    let mut plain = r.clone();
    plain.byok_key = r
        .byok_key
        .as_ref()
        .map(|_| synesis_proto::Secret(String::new()));
    let bytes =
        synesis_proto::encode_frame_vec(&plain.into(), FrameLimits::default()).unwrap_or_default();
    Sha256::digest(bytes).into()
}

/// A new request: checked, held, run, settled. Owns what it needs, so it lives on when the
/// stream that asked is gone.
struct Admission {
    shared: Arc<Shared>,
    account: AccountId,
    device: DeviceId,
    run: Arc<Run>,
}

/// Ends a run that its admission task left without an end (it panicked): followers get
/// `INTERNAL` instead of waiting forever, and the id is free again.
struct EndGuard {
    run: Arc<Run>,
    escalations: Arc<Escalations>,
    key: (AccountId, RequestId),
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        self.escalations.release(self.key.0);
        if self.run.state().end.is_none() {
            tracing::error!(request = %self.key.1, "an escalation ended without an outcome");
            self.escalations.forget(self.key, &self.run);
            self.run.end(error_msg(
                ErrorCode::INTERNAL,
                "the cloud failed; send the request again with a new id",
                Some(self.key.1),
            ));
        }
    }
}

/// When a generation under a hold that expires at `expires_at` must stop.
fn hold_deadline(expires_at: UnixMillis) -> Instant {
    let left =
        Duration::from_millis(u64::try_from(expires_at.0.saturating_sub(now().0)).unwrap_or(0));
    Instant::now() + left.saturating_sub(HOLD_MARGIN.min(left / 5))
}

/// What the hold step found.
enum Held {
    /// Run it (a new hold, or the open hold of a request cut short by a restart), and stop
    /// before the hold runs out (a settlement after that would be refused).
    Run {
        tier: Tier,
        expires_at: Option<UnixMillis>,
    },
    /// Finished before: its answer.
    Stored(StoredAnswer),
}

impl Admission {
    async fn run(self, r: EscalationRequest) {
        let arrived = Instant::now();
        let model = self.shared.escalations.label(&r.model);
        let replayed = self.admit_and_run(r).await;
        self.count(&model, arrived, replayed);
    }

    /// Counts the run's outcome, its tokens and its first chunk's time (`/metrics`).
    fn count(&self, model: &str, arrived: Instant, replayed: bool) {
        let metrics = &self.shared.metrics;
        let state = self.run.state();
        let outcome = match &state.end {
            _ if replayed => "replayed",
            Some(Message::EscalationDone(done)) => {
                for (direction, n) in [
                    ("in", done.usage.input_tokens),
                    ("out", done.usage.output_tokens),
                ] {
                    metrics
                        .tokens
                        .get_or_create(&crate::metrics::Tokens {
                            model: model.to_owned(),
                            direction,
                        })
                        .inc_by(n);
                }
                crate::metrics::finish_reason(done.finish_reason)
            }
            Some(Message::ErrorMsg(e)) => e.code.name().unwrap_or("unknown"),
            _ => "unknown",
        };
        metrics
            .escalations
            .get_or_create(&crate::metrics::ModelOutcome {
                model: model.to_owned(),
                outcome,
            })
            .inc();
        if let (Some(first), false) = (state.first_chunk_at, replayed) {
            metrics
                .first_chunk
                .get_or_create(&crate::metrics::Model {
                    model: model.to_owned(),
                })
                .observe(first.saturating_duration_since(arrived).as_secs_f64());
        }
    }

    /// Replays a finished request, or checks, holds, runs and settles a new one; whether it
    /// was a replay.
    async fn admit_and_run(&self, r: EscalationRequest) -> bool {
        let key = (self.account, r.request_id);
        // Whatever happens below (a panic too), the run ends and followers are answered.
        let _guard = EndGuard {
            run: Arc::clone(&self.run),
            escalations: Arc::clone(&self.shared.escalations),
            key,
        };
        // A finished request is replayed before any check: a config or tier change since does
        // not turn its outcome into a refusal, and a repeat costs one read.
        let (account, id) = key;
        // One read for both: the stored answer, and the account the checks need.
        let read = self
            .shared
            .storage
            .read(move |db| {
                Ok(match db.unit().answer(account, id)? {
                    Some(answer) => Err(answer),
                    None => Ok(db.account_by_id(account)?),
                })
            })
            .await;
        let admitted = match read {
            Ok(Err(answer)) => Ok((Held::Stored(answer), None)),
            Ok(Ok(acct)) => self
                .admit(&r, &acct)
                .await
                .map(|(held, rest)| (held, Some(rest))),
            Err(e) => Err(unavailable(&e, id)),
        };
        match admitted {
            Err(refusal) => {
                // Nothing was written: the same id may come again (after a top-up, say).
                self.shared.escalations.forget(key, &self.run);
                self.run.end(refusal);
            }
            Ok((Held::Stored(answer), _))
                if answer.body != self.run.body
                    || answer.asker.as_ref() != Some(&self.run.asker) =>
            {
                // Another body, or another member's request (whatever its body: no oracle).
                // At once: the right body may come next and must find the stored answer.
                self.shared.escalations.forget(key, &self.run);
                self.run.end(error_msg(
                    ErrorCode::IDEMPOTENCY_CONFLICT,
                    "this request id was used for another request",
                    Some(r.request_id),
                ));
            }
            Ok((Held::Stored(answer), _)) => {
                self.run.update(|s| {
                    s.chunks = answer.chunks;
                    s.end = Some(answer.done.into());
                });
                self.shared
                    .escalations
                    .forget_later(key, Arc::clone(&self.run));
                return true;
            }
            Ok((Held::Run { .. }, None)) => {
                self.shared.escalations.forget(key, &self.run);
                self.run.end(error_msg(
                    ErrorCode::INTERNAL,
                    "no provider",
                    Some(r.request_id),
                ));
            }
            Ok((Held::Run { tier, expires_at }, Some((provider, ask, input_bound)))) => {
                let model = r.model.clone();
                let deadline = expires_at.map(hold_deadline);
                drive(self, tier, &model, provider, ask, input_bound, deadline).await;
                self.shared
                    .escalations
                    .forget_later(key, Arc::clone(&self.run));
            }
        }
        false
    }

    /// The checks, in order, then the hold. `Err` is the refusal to send.
    async fn admit(
        &self,
        r: &EscalationRequest,
        acct: &crate::storage::Account,
    ) -> Result<(Held, (Arc<dyn Provider>, Ask, u64)), Message> {
        let id = r.request_id;
        let refuse = |code, why: String| error_msg(code, why, Some(id));
        let escalations = &self.shared.escalations;
        let Some(model) = escalations.models.get(&r.model) else {
            return Err(refuse(
                ErrorCode::UNKNOWN_MODEL,
                format!(
                    "{:?} is not served here; served: {}",
                    r.model,
                    escalations
                        .models
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        };
        // BYOK is per request: a key makes it so; an account on the BYOK tier must send one.
        let tier = match (&r.byok_key, acct.tier) {
            (Some(_), _) if !model.provider.takes_user_keys() => {
                return Err(refuse(
                    ErrorCode::MODEL_NOT_ALLOWED,
                    format!(
                        "{} runs on Synesis's own hardware: it takes no BYOK key",
                        r.model
                    ),
                ));
            }
            (Some(_), _) => Tier::Byok,
            (None, Tier::Byok) => {
                return Err(refuse(
                    ErrorCode::MODEL_NOT_ALLOWED,
                    "this account is on the BYOK tier: send your provider key with the request (--byok)".into(),
                ));
            }
            (None, tier) => tier,
        };
        if !model.tiers.contains(&tier) {
            return Err(refuse(
                ErrorCode::MODEL_NOT_ALLOWED,
                format!("{} is not offered on the {} tier", r.model, tier_name(tier)),
            ));
        }
        let mut ask = self
            .ask(r)
            .map_err(|why| refuse(ErrorCode::INVALID_REQUEST, why))?;
        if let Some(adapter) = &r.adapter
            && !model.provider.has_adapter(adapter)
        {
            // An adapter the account pushed, in the version its name points to now: requests
            // admitted before a new push keep theirs (each version is loaded by its digest).
            let (account, name) = (self.account, adapter.clone());
            let pushed = self
                .shared
                .storage
                .read(move |db| db.unit().adapter(account, &name))
                .await
                .map_err(|e| {
                    tracing::error!(error = %e, "adapter lookup failed");
                    refuse(ErrorCode::INTERNAL, "internal error".into())
                })?;
            match pushed {
                Some(a) if a.base_model == r.model => {
                    ask.adapter = Some(format!("sha256:{}", a.sha256));
                    ask.adapter_file = Some(crate::upload::blob_path(
                        &self.shared.data_dir,
                        account,
                        &a.sha256,
                    ));
                }
                Some(a) => {
                    return Err(refuse(
                        ErrorCode::NOT_FOUND,
                        format!(
                            "the adapter {adapter:?} is for {}, not {}",
                            a.base_model, r.model
                        ),
                    ));
                }
                None => {
                    return Err(refuse(
                        ErrorCode::NOT_FOUND,
                        format!(
                            "no adapter {adapter:?} is served with {}; `synesis cloud adapters` lists this account's",
                            r.model
                        ),
                    ));
                }
            }
        }
        let provider = Arc::clone(&model.provider);
        let input_bound = {
            let (provider, ask) = (Arc::clone(&provider), ask.clone());
            tokio::task::spawn_blocking(move || provider.input_tokens_bound(&ask))
                .await
                .map_err(|_| refuse(ErrorCode::INTERNAL, "the provider failed".into()))?
                .map_err(|e| provider_refusal(&e, id))?
        };
        let billing = &self.shared.billing;
        let max = BillingUsage {
            input_tokens: input_bound,
            output_tokens: u64::from(ask.max_tokens),
        };
        let most = quote(tier, &r.model, max, &billing.prices, &billing.rules)
            .map_err(|e| refuse(ErrorCode::UNKNOWN_MODEL, e.to_string()))?;
        if let Some(max_cost) = r.preferences.max_cost
            && most.total > max_cost
        {
            return Err(refuse(
                ErrorCode::MAX_COST_EXCEEDED,
                format!(
                    "this request can cost up to ${} ({} input tokens, up to {} output); --max-cost is ${max_cost}",
                    most.total, input_bound, ask.max_tokens
                ),
            ));
        }
        let held = self.hold(r, tier, input_bound).await?;
        Ok((held, (provider, ask, input_bound)))
    }

    fn ask(&self, r: &EscalationRequest) -> Result<Ask, String> {
        let p = &r.preferences;
        let limit = self.shared.escalations.settings.max_output_tokens;
        if p.max_tokens == 0 || p.max_tokens > limit {
            return Err(format!(
                "max_tokens must be 1 to {limit}; it is {}",
                p.max_tokens
            ));
        }
        if !(p.temperature.is_finite() && (0.0..=2.0).contains(&p.temperature)) {
            return Err("temperature must be between 0 and 2".into());
        }
        if let Some(top_p) = p.top_p
            && !(top_p.is_finite() && top_p > 0.0 && top_p <= 1.0)
        {
            return Err("top_p must be above 0 and at most 1".into());
        }
        if p.stop.len() > STOPS_MAX
            || p.stop
                .iter()
                .any(|s| s.is_empty() || s.len() > STOP_BYTES_MAX)
        {
            return Err(format!(
                "at most {STOPS_MAX} stop strings, each 1 to {STOP_BYTES_MAX} bytes"
            ));
        }
        match r.context.last() {
            Some(t) if t.role == ChatRole::User && !t.content.trim().is_empty() => {}
            _ => return Err("the conversation must end with the user's (non-empty) turn".into()),
        }
        let upstream = match self.shared.escalations.models.get(&r.model) {
            Some(m) => m.upstream.clone(),
            None => return Err(format!("{:?} is not served", r.model)),
        };
        Ok(Ask {
            model: upstream,
            turns: r.context.clone(),
            max_tokens: p.max_tokens,
            temperature: p.temperature,
            top_p: p.top_p,
            seed: p.seed,
            stop: p.stop.clone(),
            adapter: r.adapter.clone(),
            adapter_file: None,
            key: r.byok_key.as_ref().map(|k| ApiKey::new(k.0.clone())),
            shape: (*r.shape).clone(),
        })
    }

    /// Places the hold, or finds why this request id already has one.
    async fn hold(
        &self,
        r: &EscalationRequest,
        tier: Tier,
        input_bound: u64,
    ) -> Result<Held, Message> {
        let id = r.request_id;
        let (account, device) = (self.account, self.device);
        let request = HoldRequest {
            model: r.model.clone(),
            device: Some(device),
            input_tokens: input_bound,
            max_output_tokens: u64::from(r.preferences.max_tokens),
            request_body: Some(self.run.body),
        };
        let (billing, at) = (self.shared.billing.clone(), now());
        let asker = self.run.asker.clone();
        let max_running = self.shared.escalations.settings.per_account_max;
        let node = self.shared.cluster.node.id.clone();
        let found = self
            .shared
            .ledger
            .run(move |store| {
                let state = hold_state(store, account, id, at)?;
                if !matches!(state, HoldState::Unused | HoldState::Other) {
                    // Another member's request id, in whatever state: a conflict, nothing of
                    // it told (its answer, whether it was spent).
                    let theirs = store.asker(account, id)?;
                    if theirs.as_ref() != Some(&asker) {
                        return Err(LedgerError::IdempotencyConflict);
                    }
                }
                if matches!(state, HoldState::Unused) {
                    // Requests running for the account on every node (their open holds),
                    // read with the hold it decides on: the account is locked, so two nodes
                    // cannot both take the last place.
                    if store.running(account, at, max_running)? >= max_running {
                        return Err(LedgerError::Running(max_running));
                    }
                    // The member's own monthly quota, read with the hold it decides on (one
                    // writer: concurrent requests cannot both fit in the same room).
                    let since = synesis_billing::month_start(at).ok_or(LedgerError::Overflow)?;
                    let quota = store.member_quota_use(device, since)?;
                    if let Some((quota, used)) = quota {
                        let asked = request
                            .input_tokens
                            .saturating_add(request.max_output_tokens);
                        synesis_billing::admit_free(used, asked, quota)
                            .map_err(LedgerError::MemberQuota)?;
                    }
                }
                if matches!(state, HoldState::Active(_))
                    && let Some(runner) = store.runner(account, id)?
                    && runner != node
                    && store.node_serving(&runner, at)?
                {
                    // Its node still serves (the device lost it, not the cloud): the answer
                    // goes on there, and is stored when done. Taken over here only once that
                    // node is known dead.
                    return Err(LedgerError::RunningElsewhere);
                }
                match state {
                    HoldState::Unused | HoldState::Active(_) => {
                        // A retry after a restart, or on another node after its own died,
                        // replays the first hold (or conflicts); this node runs it now.
                        let held = hold(
                            store,
                            LedgerAccount { id: account, tier },
                            id,
                            &request,
                            at,
                            billing.hold_ttl_ms,
                            &billing.prices,
                            &billing.rules,
                        )?;
                        store.set_runner(account, id, &node)?;
                        Ok(Some(Ok(Err(held.expires_at))))
                    }
                    HoldState::Settled(_) => store
                        .answer(account, id)
                        .map_err(LedgerError::from)
                        .map(|a| Some(a.map(Ok).ok_or("settled, but its answer is not stored"))),
                    HoldState::Voided => Ok(Some(Err(
                        "it failed before it produced anything, and was not charged",
                    ))),
                    HoldState::Lapsed => Ok(Some(Err("its hold expired before it was settled"))),
                    HoldState::Other => Err(LedgerError::IdempotencyConflict),
                }
            })
            .await;
        match found {
            Ok(None) => Err(error_msg(
                ErrorCode::INTERNAL,
                "the ledger said nothing",
                Some(id),
            )),
            Ok(Some(Ok(Err(expires_at)))) => Ok(Held::Run { tier, expires_at }),
            Ok(Some(Ok(Ok(answer)))) => Ok(Held::Stored(answer)),
            Ok(Some(Err(why))) => Err(error_msg(
                ErrorCode::INVALID_REQUEST,
                format!("this request id is spent: {why}; send the request again with a new id"),
                Some(id),
            )),
            Err(e) => Err(ledger_refusal(e, id)),
        }
    }
}

fn tier_name(tier: Tier) -> &'static str {
    match tier {
        Tier::Free => "Free",
        Tier::Managed => "Managed",
        Tier::Byok => "BYOK",
    }
}

fn unavailable(e: &StorageError, id: RequestId) -> Message {
    tracing::error!(error = %e, %id, "escalation storage read failed");
    error_msg(ErrorCode::UNAVAILABLE, "try again", Some(id))
}

fn ledger_refusal(e: LedgerError, id: RequestId) -> Message {
    let wait = match e {
        // Told to wait as a node's own limit tells it (`Claim::Busy`).
        LedgerError::Running(_) => Some((ErrorCode::LIMIT_EXCEEDED, BUSY_RETRY_AFTER_MS)),
        // A device that lost its node asks another while the first is not yet known dead.
        LedgerError::RunningElsewhere => Some((ErrorCode::UNAVAILABLE, ELSEWHERE_RETRY_AFTER_MS)),
        _ => None,
    };
    if let Some((code, after_ms)) = wait {
        return ErrorMsg {
            code,
            message: format!("{e}"),
            request_id: Some(id),
            retry_after_ms: Some(after_ms),
        }
        .into();
    }
    let (code, why) = match &e {
        LedgerError::Quota(q) => (ErrorCode::QUOTA_EXCEEDED, q.to_string()),
        e @ LedgerError::MemberQuota(_) => (ErrorCode::QUOTA_EXCEEDED, e.to_string()),
        LedgerError::InsufficientFunds { needed, available } => (
            ErrorCode::INSUFFICIENT_FUNDS,
            format!("this request holds up to ${needed}; the available balance is ${available}"),
        ),
        // The words of every other conflict here: another member's id says nothing more.
        LedgerError::IdempotencyConflict => (
            ErrorCode::IDEMPOTENCY_CONFLICT,
            "this request id was used for another request".into(),
        ),
        LedgerError::Billing(b) => (ErrorCode::UNKNOWN_MODEL, b.to_string()),
        _ => {
            tracing::error!(error = %e, %id, "escalation ledger operation failed");
            (
                ErrorCode::INTERNAL,
                "the ledger failed; retry with the same id".into(),
            )
        }
    };
    error_msg(code, why, Some(id))
}

/// The refusal a provider error becomes when nothing was produced.
fn provider_refusal(e: &ProviderError, id: RequestId) -> Message {
    let (code, retry_after_ms) = match e {
        ProviderError::Unavailable { retry_after_ms, .. } => (
            ErrorCode::UNAVAILABLE,
            retry_after_ms.map(|ms| ms.min(u64::from(u32::MAX))),
        ),
        ProviderError::TimedOut(_) => (ErrorCode::UNAVAILABLE, None),
        ProviderError::Refused(_) => (ErrorCode::INVALID_REQUEST, None),
        ProviderError::Failed(_) => (ErrorCode::INTERNAL, None),
    };
    ErrorMsg {
        code,
        message: format!(
            "{e}; nothing was charged and this request id is spent: send the request again with a new id"
        ),
        request_id: Some(id),
        retry_after_ms: retry_after_ms.and_then(|ms| u32::try_from(ms).ok()),
    }
    .into()
}

/// How a generation ended.
enum Ended {
    Done(FinishReason, Option<ProviderUsage>),
    /// Cancelled by the device, or abandoned (nobody followed for `resume_window`); the
    /// provider's own count when it gave one on stopping (in process).
    Stopped(Option<ProviderUsage>),
    /// Stopped at `max_tokens` chunks, or before its hold expired.
    Cut(Option<ProviderUsage>),
    Failed(ProviderError),
}

/// Runs the provider (retrying before the first chunk), then settles.
async fn drive(
    a: &Admission,
    tier: Tier,
    model: &str,
    provider: Arc<dyn Provider>,
    ask: Ask,
    input_bound: u64,
    deadline: Option<Instant>,
) {
    let settings = a.shared.escalations.settings;
    let max_output = u64::from(ask.max_tokens);
    let mut attempt = 0;
    // Whether the provider was given the request: from then on it has the prompt, and a
    // request cancelled before its first chunk is charged its input (PROTOCOL.md §2).
    let mut dispatched = false;
    let label = crate::metrics::Model {
        model: a.shared.escalations.label(model),
    };
    let ended = loop {
        let started = Instant::now();
        let ended = generate(
            &a.run,
            provider.as_ref(),
            ask.clone(),
            &settings,
            deadline,
            &mut dispatched,
        )
        .await;
        let metrics = &a.shared.metrics;
        match &ended {
            Ended::Done(..) => metrics
                .provider_duration
                .get_or_create(&label)
                .observe(started.elapsed().as_secs_f64()),
            Ended::Failed(e) => {
                metrics
                    .provider_errors
                    .get_or_create(&crate::metrics::ModelOutcome {
                        model: label.model.clone(),
                        outcome: e.kind(),
                    })
                    .inc();
            }
            Ended::Stopped(_) | Ended::Cut(_) => {}
        }
        match ended {
            Ended::Failed(e)
                if a.run.produced() == 0 && e.retryable() && attempt < settings.retries =>
            {
                attempt += 1;
                let wait = match &e {
                    ProviderError::Unavailable {
                        retry_after_ms: Some(ms),
                        ..
                    } => Duration::from_millis(*ms).min(Duration::from_secs(10)),
                    _ => RETRY_BACKOFF * 2u32.pow(attempt - 1),
                };
                tracing::info!(error = %e, attempt, "retrying the upstream before its first output");
                tokio::time::sleep(wait).await;
            }
            ended => break ended,
        }
    };
    let produced = a.run.produced() as u64;
    let id = a.run.request_id;
    let count = || Produced {
        input_bound,
        chunks: produced,
        bytes: a.run.produced_bytes(),
        max_output,
    };
    // The provider's own count on stopping, else the cloud's.
    let own_or_counted =
        |own: Option<ProviderUsage>| own.map_or_else(|| (count().usage(), true), |u| (u, false));
    let (finish_reason, (usage, counted)) = match ended {
        Ended::Done(f, Some(u)) => (f, (u, false)),
        Ended::Done(f, None) => (f, (count().usage(), true)),
        // Cancelled (or abandoned) once the provider had the prompt: it did the work of
        // reading it, so the input is charged even though no chunk came.
        Ended::Stopped(own) if produced == 0 && dispatched => {
            (FinishReason::Cancelled, own_or_counted(own))
        }
        Ended::Stopped(_) | Ended::Cut(_) | Ended::Failed(_) if produced == 0 => {
            let why = match ended {
                Ended::Failed(e) => provider_refusal(&e, id),
                Ended::Cut(_) => error_msg(
                    ErrorCode::CANCELLED,
                    "stopped before any output; not charged",
                    Some(id),
                ),
                _ => error_msg(
                    ErrorCode::CANCELLED,
                    "cancelled before the request reached its provider; not charged",
                    Some(id),
                ),
            };
            let account = a.account;
            let at = now();
            if let Err(e) = a
                .shared
                .ledger
                .run(move |store| void(store, account, id, at))
                .await
            {
                tracing::error!(error = %e, %id, "voiding a hold failed (it expires on its own)");
            }
            return a.run.end(why);
        }
        Ended::Stopped(own) => (FinishReason::Cancelled, own_or_counted(own)),
        Ended::Cut(own) => (FinishReason::Length, own_or_counted(own)),
        Ended::Failed(e) => {
            tracing::warn!(error = %e, %id, produced, "the provider failed mid-answer");
            (FinishReason::Failed, (count().usage(), true))
        }
    };
    let end = settle_and_store(a, tier, model, finish_reason, usage, counted).await;
    tracing::info!(
        request = %id,
        device = %a.device,
        model,
        input_tokens = usage.input_tokens,
        output_tokens = usage.output_tokens,
        counted,
        ?finish_reason,
        "escalation finished"
    );
    a.run.end(end);
}

/// What the cloud saw of a generation whose provider gave no count of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Produced {
    /// The input count the hold was placed with (exact in process; an HTTP upstream's bound).
    input_bound: u64,
    /// Chunks received, and their UTF-8 bytes.
    chunks: u64,
    bytes: u64,
    /// The request's `max_tokens`: the output the hold covers.
    max_output: u64,
}

/// Bytes per token the output estimate assumes: fewer than any tokenizer's average on text,
/// so the estimate does not undercount (a token is one to a few bytes; English averages ~4).
const OUTPUT_BYTES_PER_TOKEN: u64 = 4;

impl Produced {
    /// The cloud's own count (PROTOCOL.md §2, *Escalation*): the input bound, and for the
    /// output the larger of one token per chunk and one per [`OUTPUT_BYTES_PER_TOKEN`] bytes
    /// (rounded up), never more than the hold's `max_tokens`. One per chunk alone undercounts
    /// an upstream that sends several tokens per delta.
    fn usage(self) -> ProviderUsage {
        let by_bytes = self.bytes.div_ceil(OUTPUT_BYTES_PER_TOKEN);
        ProviderUsage {
            input_tokens: self.input_bound,
            output_tokens: self.chunks.max(by_bytes).min(self.max_output),
        }
    }
}

/// How long a halted in-process generation may take to report its count (it stops within one
/// token; a prompt batch being decoded may take longer, and then the cloud counts).
const HALT_REPORT_MAX: Duration = Duration::from_secs(2);

/// Stops `generation`: a provider that can be halted reports its exact usage (the text it
/// made up to then is kept, up to `max_chunks`); any other is closed, and `None` is returned.
async fn stop(
    run: &Run,
    generation: &mut crate::provider::Generation,
    max_chunks: usize,
) -> Option<ProviderUsage> {
    let mut usage = None;
    if let Some(halt) = generation.halt.take() {
        halt.cancel();
        let report = tokio::time::timeout(HALT_REPORT_MAX, async {
            loop {
                match generation.events.recv().await {
                    Some(Event::Text(text)) => {
                        if !text.is_empty() && run.produced() < max_chunks {
                            run.push(text);
                        }
                    }
                    Some(Event::Logprobs(logprobs)) => run.set_logprobs(logprobs),
                    Some(Event::Done { usage, .. }) => return usage,
                    Some(Event::Failed(_)) | None => return None,
                }
            }
        })
        .await;
        usage = report.ok().flatten();
    }
    generation.stop();
    usage
}

/// One generation attempt, its chunks pushed into the run as they come. `dispatched` turns
/// true once the provider has the request (a cancel before that never starts it).
async fn generate(
    run: &Run,
    provider: &dyn Provider,
    ask: Ask,
    settings: &EscalationSettings,
    deadline: Option<Instant>,
    dispatched: &mut bool,
) -> Ended {
    let max_chunks = ask.max_tokens as usize;
    if run.cancel_asked() {
        return Ended::Stopped(None);
    }
    let mut generation = provider.start(ask);
    *dispatched = true;
    let mut check = tokio::time::interval(FOLLOWER_CHECK);
    // The idle clock starts with the first event: waiting in a provider's queue is not idling
    // (the hold's deadline bounds that wait).
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3_600);
    let deadline = deadline.unwrap_or(far);
    let mut idle_until = far;
    loop {
        tokio::select! {
            () = run.cancel.notified() => {
                return Ended::Stopped(stop(run, &mut generation, max_chunks).await);
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(request = %run.request_id, "stopped before its hold expires");
                return Ended::Cut(stop(run, &mut generation, max_chunks).await);
            }
            _ = check.tick() => {
                if run.abandoned(settings.resume_window) {
                    tracing::info!(request = %run.request_id, "no device followed the request; stopped");
                    return Ended::Stopped(stop(run, &mut generation, max_chunks).await);
                }
            }
            event = tokio::time::timeout_at(idle_until, generation.events.recv()) => match event {
                Err(_) => {
                    generation.stop();
                    return Ended::Failed(ProviderError::TimedOut(format!(
                        "no output for {} s", settings.idle_timeout.as_secs()
                    )));
                }
                Ok(None) => return Ended::Failed(ProviderError::Failed("the provider stopped without an end".into())),
                Ok(Some(Event::Text(text))) => {
                    if run.produced() >= max_chunks {
                        // An upstream past max_tokens: the device is promised at most that many.
                        generation.stop();
                        return Ended::Cut(None);
                    }
                    if !text.is_empty() {
                        run.push(text);
                    }
                    idle_until = Instant::now() + settings.idle_timeout;
                }
                Ok(Some(Event::Logprobs(logprobs))) => run.set_logprobs(logprobs),
                Ok(Some(Event::Done { finish_reason, usage })) => return Ended::Done(finish_reason, usage),
                Ok(Some(Event::Failed(e))) => return Ended::Failed(e),
            }
        }
    }
}

/// The most bytes an `EscalationDone`'s logprobs take: with the rest of it, under the smallest
/// frame two peers may agree on (`FRAME_PAYLOAD_MAX_BYTES_FLOOR`, 64 KiB).
const LOGPROBS_MAX_BYTES: usize = 48 * 1024;

/// The first of `logprobs` that fit in `max` bytes as encoded (a token's bytes, its
/// log-probability, and each alternative's, with their lengths).
fn fitted(
    mut logprobs: Vec<synesis_proto::message::TokenLogprob>,
    max: usize,
) -> Vec<synesis_proto::message::TokenLogprob> {
    let mut used = 0usize;
    let fit = logprobs
        .iter()
        .take_while(|t| {
            used += 9 + t.bytes.0.len() + 9;
            used += t.top.iter().map(|a| 18 + a.bytes.0.len()).sum::<usize>();
            used <= max
        })
        .count();
    logprobs.truncate(fit);
    logprobs
}

/// Settles the usage (at most the hold) and stores the answer, in one ledger transaction;
/// the `EscalationDone` to send.
async fn settle_and_store(
    a: &Admission,
    tier: Tier,
    model: &str,
    finish_reason: FinishReason,
    usage: ProviderUsage,
    usage_counted: bool,
) -> Message {
    let id = a.run.request_id;
    let (account, body, chunks) = (a.account, a.run.body, a.run.chunks());
    let logprobs = fitted(a.run.logprobs(), LOGPROBS_MAX_BYTES);
    let (billing, model, at) = (a.shared.billing.clone(), model.to_owned(), now());
    let usage = BillingUsage {
        input_tokens: usage.input_tokens,
        output_tokens: usage.output_tokens,
    };
    let settled = a
        .shared
        .ledger
        .run(move |store| {
            let charged = settle(
                store,
                LedgerAccount { id: account, tier },
                id,
                usage,
                at,
                &billing.prices,
                &billing.rules,
            )?;
            let q = quote(tier, &model, usage, &billing.prices, &billing.rules)?;
            let done = EscalationDone {
                request_id: id,
                chunks: u32::try_from(chunks.len()).unwrap_or(u32::MAX),
                finish_reason,
                usage: Usage {
                    input_tokens: usage.input_tokens,
                    output_tokens: usage.output_tokens,
                },
                cost: cost_parts(q, charged.amount),
                usage_counted,
                logprobs,
            };
            let answer = StoredAnswer {
                body,
                chunks,
                done,
                asker: None, // derived from the hold when read
            };
            store.put_answer(account, id, &answer, at)?;
            Ok(answer.done)
        })
        .await;
    match settled {
        Ok(done) => done.into(),
        Err(e) => {
            tracing::error!(error = %e, %id, "settling an escalation failed");
            error_msg(
                ErrorCode::INTERNAL,
                "the answer could not be settled; nothing was charged",
                Some(id),
            )
        }
    }
}

/// The quote's parts, for the amount actually charged (the settlement caps it at the hold:
/// the markup gives way first, so `base + markup = total` always).
fn cost_parts(q: Quote, charged: synesis_proto::MicroUsd) -> Cost {
    let total = charged;
    let base = q.base.min(total);
    Cost {
        base,
        markup: total
            .checked_sub(base)
            .unwrap_or(synesis_proto::MicroUsd::ZERO),
        total,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produced(chunks: u64, bytes: u64, max_output: u64) -> u64 {
        Produced {
            input_bound: 100,
            chunks,
            bytes,
            max_output,
        }
        .usage()
        .output_tokens
    }

    #[test]
    fn the_output_estimate_counts_long_chunks_by_their_bytes() {
        // Two deltas of 40 bytes each: ten tokens, not two.
        assert_eq!(produced(2, 80, 1_000), 20);
        // Rounded up: a 5-byte answer is two tokens.
        assert_eq!(produced(1, 5, 1_000), 2);
    }

    #[test]
    fn the_output_estimate_is_never_below_one_token_per_chunk() {
        // Short pieces (a token of one or two bytes each): one per chunk.
        assert_eq!(produced(10, 12, 1_000), 10);
        assert_eq!(produced(0, 0, 1_000), 0);
    }

    #[test]
    fn the_output_estimate_never_passes_the_hold() {
        assert_eq!(produced(3, 4_000, 100), 100);
        assert_eq!(produced(500, 500, 100), 100);
        assert_eq!(produced(u64::MAX, u64::MAX, 7), 7);
    }

    #[test]
    fn the_input_is_the_count_the_hold_was_placed_with() {
        let usage = Produced {
            input_bound: 8_208,
            chunks: 0,
            bytes: 0,
            max_output: 16,
        }
        .usage();
        assert_eq!((usage.input_tokens, usage.output_tokens), (8_208, 0));
    }
}
