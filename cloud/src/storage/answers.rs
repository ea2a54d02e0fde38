//! Finished escalations' answers (`escalation_answers`, schema v4): what a repeated request id
//! streams again, chunk for chunk, instead of running the model a second time. Written by the
//! ledger writer in the transaction that settles the request (ARCHITECTURE.md §3).
//!
//! An answer is the asking member's alone (PROTOCOL.md §2, *Escalation*): who asked is the
//! member of the device its hold was placed for (`ledger_entries.device_id`, kept for ever),
//! so no column of its own is needed and answers stored before this rule carry it too.

use rusqlite::{Connection, OptionalExtension, params};
use synesis_billing::ledger::EntryKind;
use synesis_proto::message::EscalationDone;
use synesis_proto::{AccountId, DeviceId, FrameLimits, Message, RequestId, UnixMillis};

use super::StorageError;

/// The member an escalation belongs to: only the devices of the member that asked may follow,
/// resume or replay it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asker(String);

impl Asker {
    /// The member whose id this is (`members.id`).
    pub fn new(member_id: impl Into<String>) -> Asker {
        Asker(member_id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A finished request as it was streamed.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAnswer {
    /// SHA-256 of the request (without a BYOK key), to refuse the id reused for another one.
    pub body: [u8; 32],
    pub chunks: Vec<String>,
    pub done: EscalationDone,
    /// The member that asked (`None`: its device is gone from the database, and nobody may
    /// follow it).
    pub asker: Option<Asker>,
}

/// The member `device` belongs to (`None`: no such device, or one of no member).
pub fn asker_of_device(conn: &Connection, device: DeviceId) -> Result<Option<Asker>, StorageError> {
    let member: Option<Option<String>> = conn
        .prepare_cached("SELECT member_id FROM devices WHERE id = ?1")?
        .query_row([device.to_string()], |r| r.get(0))
        .optional()?;
    Ok(member.flatten().map(Asker))
}

/// The member whose device asked `request_id` in `account`: the device its hold was placed
/// for. `None` when the id holds no hold (unused, or a top-up's).
pub fn asker(
    conn: &Connection,
    account: AccountId,
    request_id: RequestId,
) -> Result<Option<Asker>, StorageError> {
    const _: () = assert!(EntryKind::Hold.code() == 2);
    let member: Option<Option<String>> = conn
        .prepare_cached(
            "SELECT d.member_id FROM ledger_entries AS e INDEXED BY ledger_by_request
             JOIN devices d ON d.id = e.device_id
             WHERE e.account_id = ?1 AND e.request_id = ?2 AND e.kind = 2
             ORDER BY e.seq LIMIT 1",
        )?
        .query_row(params![account.to_string(), request_id.to_string()], |r| {
            r.get(0)
        })
        .optional()?;
    Ok(member.flatten().map(Asker))
}

fn corrupt(what: impl std::fmt::Display) -> StorageError {
    StorageError::Corrupt(format!("a stored escalation answer: {what}"))
}

/// An answer's chunks and its end as they are stored (JSON, and the end's frame).
pub(crate) fn encode(answer: &StoredAnswer) -> Result<(String, Vec<u8>), StorageError> {
    let chunks = serde_json::to_string(&answer.chunks).map_err(corrupt)?;
    let done = synesis_proto::encode_frame_vec(
        &Message::EscalationDone(answer.done.clone()),
        FrameLimits::default(),
    )
    .map_err(corrupt)?;
    Ok((chunks, done))
}

/// An answer from its stored columns.
pub(crate) fn decode(
    body: &[u8],
    chunks: &str,
    done: &[u8],
    asker: Option<Asker>,
) -> Result<StoredAnswer, StorageError> {
    let body: [u8; 32] = body
        .try_into()
        .map_err(|_| corrupt("body is not 32 bytes"))?;
    let chunks: Vec<String> = serde_json::from_str(chunks).map_err(corrupt)?;
    let done = match synesis_proto::decode_frame(done, FrameLimits::default()).map_err(corrupt)? {
        synesis_proto::Decoded::Frame {
            message: Message::EscalationDone(done),
            ..
        } => done,
        _ => return Err(corrupt("done is not an EscalationDone frame")),
    };
    Ok(StoredAnswer {
        body,
        chunks,
        done,
        asker,
    })
}

/// Records a finished request (once: the primary key refuses a second).
pub fn put(
    conn: &Connection,
    account: AccountId,
    request_id: RequestId,
    answer: &StoredAnswer,
    at: UnixMillis,
) -> Result<(), StorageError> {
    let (chunks, done) = encode(answer)?;
    conn.execute(
        "INSERT INTO escalation_answers (account_id, request_id, body, chunks, done, at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            account.to_string(),
            request_id.to_string(),
            &answer.body[..],
            chunks,
            done,
            at.0
        ],
    )?;
    Ok(())
}

pub fn get(
    conn: &Connection,
    account: AccountId,
    request_id: RequestId,
) -> Result<Option<StoredAnswer>, StorageError> {
    let row: Option<(Vec<u8>, String, Vec<u8>)> = conn
        .query_row(
            "SELECT body, chunks, done FROM escalation_answers
             WHERE account_id = ?1 AND request_id = ?2",
            params![account.to_string(), request_id.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((body, chunks, done)) = row else {
        return Ok(None);
    };
    let asker = asker(conn, account, request_id)?;
    decode(&body, &chunks, &done, asker).map(Some)
}
