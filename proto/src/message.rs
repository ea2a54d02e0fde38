//! Every message of the product, by the stream that carries it.
//!
//! Each message has a one-byte [`MessageType`] that is its frame's type byte; the payload is the
//! message struct encoded by [`crate::codec`]. A released message's layout is frozen: to add a
//! field, define a new message type (a new byte) in a new protocol version and keep the old one
//! decodable (PROTOCOL.md, "Versioning").

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::ErrorCode;
use crate::ids::{AccountId, Blob, DeviceId, MicroUsd, RequestId, Secret, Sha256, UnixMillis};
use crate::vitals::Vitals;

/// The kinds of QUIC stream, each with the messages it may carry (PROTOCOL.md, "Streams").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamKind {
    /// One long-lived bidirectional stream per connection, opened by the device.
    Control,
    /// A request/reply stream on a connection without a client certificate.
    Enrollment,
    /// One bidirectional stream per escalation.
    Escalation,
    /// One bidirectional stream per adapter upload.
    Upload,
    /// Short request/reply streams for account operations.
    Account,
}

macro_rules! messages {
    ($($(#[$doc:meta])* $code:literal => $variant:ident on $stream:ident,)+) => {
        /// The frame type byte. Values are frozen: PROTOCOL.md lists them.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[repr(u8)]
        pub enum MessageType {
            $($variant = $code,)+
        }

        impl MessageType {
            /// Every type this build knows, in the order of their bytes.
            pub const ALL: &'static [MessageType] = &[$(MessageType::$variant),+];

            pub const fn from_u8(byte: u8) -> Option<MessageType> {
                match byte {
                    $($code => Some(MessageType::$variant),)+
                    _ => None,
                }
            }

            pub const fn as_u8(self) -> u8 {
                self as u8
            }

            pub const fn name(self) -> &'static str {
                match self {
                    $(MessageType::$variant => stringify!($variant),)+
                }
            }

            pub const fn stream(self) -> StreamKind {
                match self {
                    $(MessageType::$variant => StreamKind::$stream,)+
                }
            }
        }

        /// Any message, as a frame carries it.
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[cfg_attr(test, derive(proptest_derive::Arbitrary))]
        pub enum Message {
            $($(#[$doc])* $variant($variant),)+
        }

        impl Message {
            pub const fn message_type(&self) -> MessageType {
                match self {
                    $(Message::$variant(_) => MessageType::$variant,)+
                }
            }

            /// Appends the payload (not the frame header) to `out`.
            pub(crate) fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), String> {
                match self {
                    $(Message::$variant(m) => codec::encode_into(m, out),)+
                }
            }

            /// Decodes the payload of a frame of type `message_type`; returns the message and
            /// the bytes it used.
            pub(crate) fn decode_payload(
                message_type: MessageType,
                payload: &[u8],
            ) -> Result<(Message, usize), String> {
                match message_type {
                    $(MessageType::$variant => codec::decode_prefix::<$variant>(payload)
                        .map(|(m, used)| (Message::$variant(m), used)),)+
                }
            }
        }

        $(impl From<$variant> for Message {
            fn from(m: $variant) -> Message {
                Message::$variant(m)
            }
        })+
    };
}

messages! {
    /// Device → cloud, first frame on the control stream.
    0x01 => Hello on Control,
    /// Cloud → device, the answer to `Hello`: the session is established.
    0x02 => Welcome on Control,
    /// Device → cloud, every heartbeat interval.
    0x03 => Heartbeat on Control,
    /// Cloud → device, one per `Heartbeat`.
    0x04 => HeartbeatAck on Control,
    /// Device → cloud: the device is under stress; warm a cloud model up.
    0x05 => Prewarm on Control,
    /// Cloud → device: the cloud is going away; reconnect after the hint.
    0x06 => Drain on Control,
    /// Either way, on any stream: the request or the stream failed. Closes the stream.
    0x07 => ErrorMsg on Control,
    /// Cloud → device: the account's balance changed.
    0x08 => BalanceUpdate on Control,

    /// Device → cloud over a connection without a client certificate.
    0x20 => EnrollRequest on Enrollment,
    /// Cloud → device: the device's identity.
    0x21 => EnrollResponse on Enrollment,

    /// Device → cloud (or cloud → device for a routed request): run this prompt.
    0x30 => EscalationRequest on Escalation,
    /// Answering side: the next piece of the answer.
    0x31 => EscalationChunk on Escalation,
    /// Answering side: the answer is complete; usage and cost.
    0x32 => EscalationDone on Escalation,
    /// Asking side: stop generating.
    0x33 => EscalationCancel on Escalation,
    /// Asking side, after a reconnect: continue an escalation from a chunk sequence number.
    0x34 => EscalationResume on Escalation,

    /// Device → cloud: an adapter upload starts (or restarts).
    0x40 => UploadBegin on Upload,
    /// Cloud → device: the chunks the cloud already holds; send the rest.
    0x41 => UploadResume on Upload,
    /// Device → cloud: one chunk of the adapter file.
    0x42 => UploadChunk on Upload,
    /// Device → cloud: every chunk was sent.
    0x43 => UploadDone on Upload,
    /// Cloud → device: the adapter is verified and stored.
    0x44 => UploadComplete on Upload,
    /// Device → cloud: the account's adapters (on an account stream).
    0x45 => AdaptersRequest on Account,
    0x46 => AdaptersReply on Account,
    /// Device → cloud: remove one of the account's adapters by name.
    0x47 => AdapterRemove on Account,
    0x48 => AdapterRemoved on Account,

    /// Device → cloud: what has the account used and what is left.
    0x50 => UsageRequest on Account,
    0x51 => UsageReply on Account,
    /// Device → cloud: redeem a voucher.
    0x52 => TopupRequest on Account,
    0x53 => TopupReply on Account,
    /// Device → cloud: invite a collaborator to the account.
    0x54 => InviteCreate on Account,
    0x55 => InviteCreated on Account,
    // 0x56, 0x57: retired (an `InviteAccept` never served; a device joins an account by
    // enrolling with the invitation's code). Never to be assigned again.
    /// Device → cloud: list the account's members.
    0x58 => MembersRequest on Account,
    0x59 => MembersReply on Account,
    /// Device → cloud: the account's tier and the price table.
    0x5a => PriceRequest on Account,
    0x5b => PriceReply on Account,
    /// Device → cloud: revoke this device (`synesis cloud logout`).
    0x5c => DeviceLeave on Account,
    0x5d => DeviceLeft on Account,
    /// Device → cloud: a new certificate for this device's key, before the current one ends.
    0x5e => CertRenew on Account,
    0x5f => CertRenewed on Account,
    /// Device → cloud (the owner's): remove a member; their devices are revoked.
    0x60 => MemberRemove on Account,
    0x61 => MemberRemoved on Account,
    /// Device → cloud (the owner's): offer the account to a member, for 7 days.
    0x62 => HandoverOffer on Account,
    0x63 => HandoverOffered on Account,
    /// Device → cloud (the offered member's): take the account over.
    0x64 => HandoverAccept on Account,
    0x65 => HandoverAccepted on Account,
    /// Device → cloud (the owner's): the invitations not yet accepted.
    0x66 => InvitesRequest on Account,
    0x67 => InvitesReply on Account,
    /// Device → cloud (the owner's): withdraw an invitation not yet accepted.
    0x68 => InviteRevoke on Account,
    0x69 => InviteRevoked on Account,
}

// ---------------------------------------------------------------- control

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Hello {
    /// Every protocol version the device can speak.
    pub protocol_versions: Vec<u16>,
    /// The device software, e.g. `synesis/0.1.0`.
    pub client: String,
    /// The heartbeat interval the device will keep; the cloud marks it stale after three.
    pub heartbeat_interval_ms: u32,
    /// The largest frame payload the device accepts.
    pub max_frame_bytes: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Welcome {
    /// The version chosen for this connection.
    pub protocol_version: u16,
    pub device_id: DeviceId,
    pub account_id: AccountId,
    pub server_time: UnixMillis,
    /// The largest frame payload the cloud accepts.
    pub max_frame_bytes: u32,
    /// The addresses (`host:port`) of the cloud's other nodes serving now: where the device
    /// goes when this one cannot be reached. Empty for a cloud of one node.
    pub nodes: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Heartbeat {
    /// Starts at 0 on each connection and increases by one.
    pub seq: u64,
    /// The device's clock when sent; echoed in the ack so RTT needs no clock agreement.
    pub sent_at: UnixMillis,
    pub vitals: Vitals,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct HeartbeatAck {
    pub seq: u64,
    /// The `sent_at` of the heartbeat acknowledged.
    pub device_sent_at: UnixMillis,
    pub cloud_time: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Prewarm {
    /// The cloud model the device expects to escalate to, if it knows.
    pub model: Option<String>,
    pub reason: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Drain {
    /// Wait this long before reconnecting. The cloud spreads the values over a window so that its
    /// devices do not all return in the same second.
    pub reconnect_after_ms: u32,
    pub reason: String,
    /// Another node to reconnect to (`host:port`), when the cloud has one; `None`, this one
    /// (it restarts).
    pub to: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ErrorMsg {
    pub code: ErrorCode,
    /// For a person: what went wrong and, where there is one, what to do.
    pub message: String,
    /// The request the error answers, when there is one.
    pub request_id: Option<RequestId>,
    /// For retryable codes: do not retry sooner.
    pub retry_after_ms: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct BalanceUpdate {
    pub balance: MicroUsd,
    pub held: MicroUsd,
    pub quota_tokens_used: u64,
}

// ---------------------------------------------------------------- enrollment

/// Its `Debug` output leaves the token secret out: requests end up in logs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EnrollRequest {
    pub request_id: RequestId,
    /// The secret part of the setup token.
    pub token_secret: String,
    /// A PKCS#10 certificate signing request (DER) for a key made on the device.
    pub csr_der: Blob,
    /// A name for people to recognise the device by (its host name, by default).
    pub device_name: String,
}

impl std::fmt::Debug for EnrollRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnrollRequest")
            .field("request_id", &self.request_id)
            .field("token_secret", &"<redacted>")
            .field("csr_der", &self.csr_der)
            .field("device_name", &self.device_name)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EnrollResponse {
    pub request_id: RequestId,
    pub device_id: DeviceId,
    pub account_id: AccountId,
    pub account_name: String,
    /// The device's certificate (DER), signed by the cloud's CA.
    pub client_cert_der: Blob,
    /// The cloud's CA certificate (DER); its SHA-256 equals the fingerprint in the token.
    pub ca_cert_der: Blob,
}

// ---------------------------------------------------------------- escalation

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ChatTurn {
    pub role: ChatRole,
    pub content: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Preferences {
    pub max_tokens: u32,
    /// 0 means greedy.
    pub temperature: f32,
    pub top_p: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    /// Refuse to run if the hold for this request would exceed this amount.
    pub max_cost: Option<MicroUsd>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EscalationRequest {
    pub request_id: RequestId,
    pub model: String,
    /// An adapter the account uploaded, by name.
    pub adapter: Option<String>,
    pub context: Vec<ChatTurn>,
    pub preferences: Preferences,
    /// BYOK: the user's own key for the model's provider, for this one request. The cloud
    /// uses it for the upstream call only, never stores or logs it, and charges the licensing
    /// fee instead of the provider price. Not part of the request's idempotency body.
    pub byok_key: Option<Secret>,
    /// What the answer must be beyond text (version 2): tools, a format, penalties, `top_k`.
    /// Boxed: most requests ask none of it, and every message is as large as its largest.
    pub shape: Box<AnswerShape>,
}

/// What an answer must be beyond text. The default asks nothing more than version 1 did.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AnswerShape {
    /// Functions the model may call; a call comes back in the answer's text as
    /// `<tool_call>{"name": …, "arguments": {…}}</tool_call>` (§2, *Tools*).
    pub tools: Vec<ToolSpec>,
    pub tool_choice: ToolChoice,
    pub format: AnswerFormat,
    /// OpenAI's presence and frequency penalties (0: none).
    pub presence_penalty: f32,
    pub frequency_penalty: f32,
    pub top_k: Option<i32>,
    /// Each token's log-probability in `EscalationDone`, with this many alternatives (at most
    /// 20).
    pub logprobs: Option<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ToolSpec {
    pub name: String,
    pub description: String,
    /// A JSON schema of the arguments, as JSON text; empty for any object.
    pub parameters: String,
}

/// Whether the model must call one of the tools.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum ToolChoice {
    /// The tools are described; none is called.
    #[default]
    None,
    Auto,
    Required,
    Named(String),
}

/// What the answer's text must be.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum AnswerFormat {
    #[default]
    Text,
    /// Any JSON object.
    Json,
    /// A JSON document the schema (JSON text) accepts.
    Schema(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EscalationChunk {
    pub request_id: RequestId,
    /// Starts at 0 and increases by one per chunk of this request.
    pub seq: u32,
    pub text: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum FinishReason {
    /// The model ended the answer (end of generation or a stop string).
    Stop,
    /// `max_tokens` was reached.
    Length,
    /// The asking side cancelled.
    Cancelled,
    /// The provider failed, or sent nothing for the configured idle time, after part of the
    /// answer was sent: that part is charged.
    Failed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// What a request cost. `total = base + markup`, each rounded as the billing rules say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Cost {
    pub base: MicroUsd,
    /// The Managed markup or the BYOK licensing fee.
    pub markup: MicroUsd,
    pub total: MicroUsd,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EscalationDone {
    pub request_id: RequestId,
    /// How many chunks were sent in all, so the device knows it has every one.
    pub chunks: u32,
    pub finish_reason: FinishReason,
    pub usage: Usage,
    pub cost: Cost,
    /// The provider reported no token counts: `usage` is the cloud's own count (input: one
    /// token per byte of the prompt plus the chat format's, a bound; output: one per piece
    /// streamed).
    pub usage_counted: bool,
    /// Each generated token and how likely the model found it, when the request asked
    /// (`AnswerShape::logprobs`, version 2); their bytes make up the chunks' text.
    pub logprobs: Vec<TokenLogprob>,
}

/// One generated token: its bytes, its log-probability, and the likeliest tokens at its place.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TokenLogprob {
    pub bytes: Blob,
    pub logprob: f32,
    /// Most likely first.
    pub top: Vec<TopLogprob>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TopLogprob {
    pub bytes: Blob,
    pub logprob: f32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EscalationCancel {
    pub request_id: RequestId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct EscalationResume {
    pub request_id: RequestId,
    /// The first chunk sequence number the device does not have.
    pub next_seq: u32,
}

// ---------------------------------------------------------------- upload

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct UploadBegin {
    /// The upload's id; the same id resumes the same upload.
    pub upload_id: RequestId,
    /// The adapter's name within the account.
    pub name: String,
    /// The base model the adapter was trained for.
    pub base_model: String,
    pub size_bytes: u64,
    pub sha256: Sha256,
    pub chunk_size_bytes: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct UploadResume {
    pub upload_id: RequestId,
    /// Indexes of the chunks the cloud already holds, ascending.
    pub chunks_held: Vec<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct UploadChunk {
    pub upload_id: RequestId,
    pub index: u32,
    pub data: Blob,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct UploadDone {
    pub upload_id: RequestId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct UploadComplete {
    pub upload_id: RequestId,
    pub sha256: Sha256,
    /// Whether the cloud now serves the adapter.
    pub serving: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AdaptersRequest {
    pub request_id: RequestId,
}

/// One adapter the account holds under a name (the newest version pushed under it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AdapterInfo {
    pub name: String,
    pub sha256: Sha256,
    pub size_bytes: u64,
    /// The served model it attaches to.
    pub base_model: String,
    pub uploaded_at: UnixMillis,
    /// The device that pushed this version.
    pub device_id: DeviceId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AdaptersReply {
    pub request_id: RequestId,
    /// By name.
    pub adapters: Vec<AdapterInfo>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AdapterRemove {
    pub request_id: RequestId,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct AdapterRemoved {
    pub request_id: RequestId,
    pub name: String,
    /// The content the name pointed to.
    pub sha256: Sha256,
}

// ---------------------------------------------------------------- account

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Tier {
    Free,
    Managed,
    Byok,
}

impl Tier {
    /// The name people and JSON use: `free`, `managed`, `byok`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Free => "free",
            Tier::Managed => "managed",
            Tier::Byok => "byok",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Role {
    Owner,
    Editor,
    Commenter,
    Viewer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum UsageGrouping {
    Model,
    Device,
    Day,
    /// The member the charge's device belongs to.
    Member,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct UsageRequest {
    pub request_id: RequestId,
    pub since: Option<UnixMillis>,
    pub group_by: Option<UsageGrouping>,
    /// The page after this charge (its request id): the previous reply's `next`.
    pub after: Option<RequestId>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Charge {
    pub request_id: RequestId,
    pub model: String,
    pub device_id: Option<DeviceId>,
    pub usage: Usage,
    pub total: MicroUsd,
    pub at: UnixMillis,
    /// The member the device belongs to (`None`: a charge of no device).
    pub member: Option<String>,
}

/// The most charges one `UsageReply` lists: the first ones in the listing's order (by time,
/// then in the order the cloud recorded them) at or after the request's `since`, and after its
/// `after`. When more follow, the reply's `next` names the page's last charge.
pub const USAGE_CHARGES_MAX: usize = 1_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct UsageReply {
    pub request_id: RequestId,
    pub account: String,
    pub tier: Tier,
    pub balance: MicroUsd,
    pub held: MicroUsd,
    pub quota_tokens: u64,
    pub quota_tokens_used: u64,
    pub charges: Vec<Charge>,
    /// When more charges follow this page: the request id of its last charge in the listing's
    /// order (with `group_by`, not necessarily the last element), to send as the next
    /// request's `after`.
    pub next: Option<RequestId>,
}

/// Its `Debug` output leaves the voucher code out: the code is a bearer secret until redeemed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TopupRequest {
    pub request_id: RequestId,
    pub voucher: String,
}

impl std::fmt::Debug for TopupRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopupRequest")
            .field("request_id", &self.request_id)
            .field("voucher", &"<redacted>")
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct TopupReply {
    pub request_id: RequestId,
    pub credited: MicroUsd,
    pub balance: MicroUsd,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InviteCreate {
    pub request_id: RequestId,
    /// Who the invitation is for, as people know them (an e-mail address, a name).
    pub invitee: String,
    pub role: Role,
    pub ttl_ms: u64,
    /// The member's monthly token quota (none: only the account's own limits).
    pub quota_tokens: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InviteCreated {
    pub request_id: RequestId,
    /// The one-time code to hand to the invitee.
    pub code: String,
    pub expires_at: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct MembersRequest {
    pub request_id: RequestId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Member {
    pub name: String,
    pub role: Role,
    pub joined_at: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct MembersReply {
    pub request_id: RequestId,
    pub members: Vec<Member>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PriceRequest {
    pub request_id: RequestId,
}

/// The price of one model, in micro-USD per one million tokens.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ModelPrice {
    pub model: String,
    pub input_per_mtok: MicroUsd,
    pub output_per_mtok: MicroUsd,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PriceReply {
    pub request_id: RequestId,
    pub tier: Tier,
    /// The Managed markup or the BYOK fee, in basis points of the provider price (300 = 3 %).
    pub markup_bps: u32,
    /// Every model the cloud prices (what a charge for it would cost).
    pub prices: Vec<ModelPrice>,
    /// The models the cloud serves to this account's tier, by name.
    pub served: Vec<ServedModel>,
    /// The model a device asks when it names none: one of `served` (`None`: it serves none).
    pub default_model: Option<String>,
}

/// A model the cloud answers with for this account: its price, and how many tokens its
/// context holds (prompt plus output), when the cloud knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct ServedModel {
    pub model: String,
    pub input_per_mtok: MicroUsd,
    pub output_per_mtok: MicroUsd,
    pub context_tokens: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DeviceLeave {
    pub request_id: RequestId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct DeviceLeft {
    pub request_id: RequestId,
    /// The device now revoked: the caller itself.
    pub device_id: DeviceId,
}

/// A new certificate for the calling device (same device id), for the key the CSR proves. The
/// request id is the idempotency key: the same request again gets the same certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CertRenew {
    pub request_id: RequestId,
    /// A PKCS#10 certificate signing request (DER).
    pub csr_der: Blob,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct CertRenewed {
    pub request_id: RequestId,
    pub client_cert_der: Blob,
    /// When the new certificate stops being accepted.
    pub not_after: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct MemberRemove {
    pub request_id: RequestId,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct MemberRemoved {
    pub request_id: RequestId,
    pub name: String,
    /// Devices of the member revoked by the removal.
    pub devices_revoked: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct HandoverOffer {
    pub request_id: RequestId,
    /// The member offered the account.
    pub to: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct HandoverOffered {
    pub request_id: RequestId,
    pub to: String,
    pub expires_at: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct HandoverAccept {
    pub request_id: RequestId,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct HandoverAccepted {
    pub request_id: RequestId,
    /// The account the caller now owns.
    pub account: String,
    /// The former owner, now an editor.
    pub former_owner: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InvitesRequest {
    pub request_id: RequestId,
}

/// An invitation not yet accepted (nor withdrawn, nor expired).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PendingInvite {
    pub invitee: String,
    pub role: Role,
    pub quota_tokens: Option<u64>,
    pub expires_at: UnixMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InvitesReply {
    pub request_id: RequestId,
    pub invites: Vec<PendingInvite>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InviteRevoke {
    pub request_id: RequestId,
    pub invitee: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct InviteRevoked {
    pub request_id: RequestId,
    pub invitee: String,
    /// Pending invitations of the invitee withdrawn.
    pub revoked: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_bytes_round_trip_and_are_unique() {
        for &t in MessageType::ALL {
            assert_eq!(MessageType::from_u8(t.as_u8()), Some(t));
        }
        assert!(MessageType::ALL.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn an_enroll_requests_debug_output_hides_the_token_secret() {
        let secret = "0123456789abcdef0123456789abcdef.feedfacefeedfacefeedfacefeedface";
        let request = EnrollRequest {
            request_id: RequestId::from_parts(1, [1; 10]),
            token_secret: secret.to_owned(),
            csr_der: Blob(vec![1, 2, 3]),
            device_name: "laptop".to_owned(),
        };
        let shown = format!("{request:?} {:?}", Message::from(request.clone()));
        assert!(!shown.contains(secret), "{shown}");
        assert!(!shown.contains("feedface"), "{shown}");
        assert!(shown.contains("laptop"), "{shown}");
    }

    #[test]
    fn a_topup_requests_debug_output_hides_the_voucher_code() {
        let request = TopupRequest {
            request_id: RequestId::from_parts(1, [1; 10]),
            voucher: "VCH-SECRETCODE".to_owned(),
        };
        let shown = format!("{request:?} {:?}", Message::from(request.clone()));
        assert!(!shown.contains("SECRETCODE"), "{shown}");
    }

    #[test]
    fn unassigned_bytes_name_no_type() {
        for b in [0x00, 0x09, 0x22, 0x35, 0x49, 0x6a, 0xff] {
            assert_eq!(MessageType::from_u8(b), None, "0x{b:02x}");
        }
    }
}
