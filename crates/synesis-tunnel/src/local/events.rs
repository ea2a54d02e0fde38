//! What the service does, as a feed of events (`synesis tunnel events`): the tunnel's state
//! changes with their reasons, pre-warm signals, escalations and uploads passing through the
//! local API with how they ended, config reloads, the drain.
//!
//! Producers send on an [`EventSender`] (a broadcast channel: sending never waits, and with
//! nobody listening costs nothing); each `events` client of the local API is a subscriber. A
//! subscriber that falls behind by more than [`EVENTS_BUFFERED`] is told how many it missed.

use serde::{Deserialize, Serialize};
use synesis_proto::{Message, RequestId, UnixMillis};
use tokio::sync::broadcast;

use crate::TunnelState;

/// Events kept for a subscriber that is behind.
pub const EVENTS_BUFFERED: usize = 256;

/// One event: when, and what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub at: UnixMillis,
    #[serde(flatten)]
    pub what: What,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum What {
    /// The tunnel's state changed (a reconnect is `reconnecting` then `connected`).
    State {
        state: TunnelState,
        reconnects: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The pre-warm policy fired: the cloud was told (`sent`) to get `model` ready.
    Prewarm {
        model: String,
        reason: String,
        sent: bool,
    },
    /// An escalation began through the service (or a broken one resumed).
    EscalationStarted {
        request_id: RequestId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        resumed: bool,
    },
    EscalationFinished {
        request_id: RequestId,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cost_micro_usd: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        input_tokens: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        output_tokens: Option<u64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    UploadStarted {
        upload_id: RequestId,
        name: String,
        size_bytes: u64,
    },
    UploadFinished {
        upload_id: RequestId,
        outcome: Outcome,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// `config.toml` was read again (SIGHUP); a bad one leaves the old settings.
    ConfigReloaded {
        ok: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// The service was asked to stop; streams in flight may finish within `grace_ms`.
    Stopping { grace_ms: u64 },
    /// This subscriber fell behind and missed `count` events.
    Missed { count: u64 },
}

/// How a stream through the service ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Answered, or uploaded.
    Done,
    /// The cloud refused it (`ErrorMsg`).
    Refused,
    /// Its client went away.
    Cancelled,
    /// The stream broke (the connection, or the service stopping); the client may resume.
    Cut,
}

pub type EventSender = broadcast::Sender<Event>;

/// A new feed with nobody subscribed yet.
pub fn channel() -> EventSender {
    broadcast::channel(EVENTS_BUFFERED).0
}

/// Sends `what`, stamped now; nobody listening is fine.
pub fn emit(events: &EventSender, what: What) {
    let _ = events.send(Event {
        at: crate::clock::unix_now(),
        what,
    });
}

/// What the first frame of a client's cloud stream says it starts (for the feed).
pub(crate) fn started(first: &Message) -> Option<What> {
    match first {
        Message::EscalationRequest(r) => Some(What::EscalationStarted {
            request_id: r.request_id,
            model: Some(r.model.clone()),
            resumed: false,
        }),
        Message::EscalationResume(r) => Some(What::EscalationStarted {
            request_id: r.request_id,
            model: None,
            resumed: true,
        }),
        Message::UploadBegin(b) => Some(What::UploadStarted {
            upload_id: b.upload_id,
            name: b.name.clone(),
            size_bytes: b.size_bytes,
        }),
        _ => None,
    }
}

/// How a stream that `start` began ended, from the cloud's last frame (`None`: the stream
/// ended without one).
pub(crate) fn finished(start: &What, last: Option<&Message>, cut: Outcome) -> Option<What> {
    match start {
        What::EscalationStarted { request_id, .. } => Some(match last {
            Some(Message::EscalationDone(d)) => What::EscalationFinished {
                request_id: *request_id,
                outcome: Outcome::Done,
                cost_micro_usd: Some(d.cost.total.0),
                input_tokens: Some(d.usage.input_tokens),
                output_tokens: Some(d.usage.output_tokens),
                error: None,
            },
            Some(Message::ErrorMsg(e)) => What::EscalationFinished {
                request_id: *request_id,
                outcome: Outcome::Refused,
                cost_micro_usd: None,
                input_tokens: None,
                output_tokens: None,
                error: Some(format!("{} ({})", e.message, e.code)),
            },
            _ => What::EscalationFinished {
                request_id: *request_id,
                outcome: cut,
                cost_micro_usd: None,
                input_tokens: None,
                output_tokens: None,
                error: None,
            },
        }),
        What::UploadStarted { upload_id, .. } => Some(match last {
            Some(Message::UploadComplete(_)) => What::UploadFinished {
                upload_id: *upload_id,
                outcome: Outcome::Done,
                error: None,
            },
            Some(Message::ErrorMsg(e)) => What::UploadFinished {
                upload_id: *upload_id,
                outcome: Outcome::Refused,
                error: Some(format!("{} ({})", e.message, e.code)),
            },
            _ => What::UploadFinished {
                upload_id: *upload_id,
                outcome: cut,
                error: None,
            },
        }),
        _ => None,
    }
}

/// The cloud frames worth decoding on their way to a client: the ends of escalations and
/// uploads (small), never the chunks.
pub(crate) fn ends_a_stream(ty: synesis_proto::MessageType) -> bool {
    use synesis_proto::MessageType as T;
    matches!(ty, T::EscalationDone | T::ErrorMsg | T::UploadComplete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json_lines_with_a_stable_shape() {
        let e = Event {
            at: UnixMillis(1_795_000_000_000),
            what: What::State {
                state: TunnelState::Reconnecting,
                reconnects: 2,
                reason: Some("the cloud closed the connection".into()),
            },
        };
        let json = serde_json::to_string(&e).unwrap();
        assert!(
            json.contains(r#""event":"state""#) && json.contains(r#""state":"reconnecting""#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<Event>(&json).unwrap(), e);
    }
}
