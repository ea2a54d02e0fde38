//! The enrollment stream: the only thing a connection without a client certificate may carry.
//! One `EnrollRequest`, one reply, then the connection is closed.
//!
//! What an unauthenticated peer can make the cloud do is kept small: any other message type is
//! refused from its type byte; the token is checked with one read before any write lock
//! (`Devices::enroll`); errors carry a code and plain words, never database text.

use std::sync::Arc;

use synesis_proto::message::{EnrollRequest, EnrollResponse};
use synesis_proto::{Blob, DeviceId, ErrorCode, Message, MessageType, SetupToken, StreamKind};
use synesis_wire::close_code;
use tokio::time::timeout;

use crate::shared::{Shared, now};
use crate::storage::{Enrollment, IssuedCert};
use crate::streams::{FIRST_FRAME_TIMEOUT, First, Stream, error_msg};

/// Serves a connection without a certificate: one enrollment request, one reply.
pub(crate) async fn serve(shared: &Arc<Shared>, conn: &quinn::Connection) {
    let Ok(Ok((tx, rx))) = timeout(FIRST_FRAME_TIMEOUT, conn.accept_bi()).await else {
        conn.close(
            close_code(ErrorCode::UNEXPECTED_MESSAGE),
            b"no enrollment request",
        );
        return;
    };
    let mut stream = Stream::new(tx, rx, crate::endpoint::ANONYMOUS_FRAME_LIMITS);
    let allowed = |t: MessageType| t.stream() == StreamKind::Enrollment;
    let reply = match stream.first(allowed, ErrorCode::UNAUTHENTICATED).await {
        First::Message(Message::EnrollRequest(request)) => enroll(shared, request).await,
        First::Message(other) => error_msg(
            ErrorCode::UNEXPECTED_MESSAGE,
            format!("{} is not a request", other.message_type().name()),
            None,
        ),
        First::Empty | First::Refused => return,
    };
    stream.send_last(&reply).await;
    // Give the device the time to read the reply and close; then close anyway.
    let _ = timeout(FIRST_FRAME_TIMEOUT, conn.closed()).await;
}

async fn enroll(shared: &Arc<Shared>, request: EnrollRequest) -> Message {
    let request_id = request.request_id;
    let Some((token_id, secret)) = SetupToken::parse_presented(&request.token_secret) else {
        return error_msg(
            ErrorCode::TOKEN_INVALID,
            "the setup token's secret is malformed",
            Some(request_id),
        );
    };
    let Ok(device_id) = DeviceId::try_from_uuid(uuid::Uuid::now_v7()) else {
        return error_msg(ErrorCode::INTERNAL, "internal error", Some(request_id));
    };
    let pki = Arc::clone(&shared.pki);
    let validity = shared.cert_validity();
    let csr = request.csr_der.0;
    let name = request.device_name;
    let at = now();
    let outcome = shared
        .storage
        .write(move |db| {
            let enrollment = Enrollment {
                token_id,
                secret: &secret,
                request: request_id,
                device_name: &name,
                new_device_id: device_id,
            };
            Ok(db.enroll(&enrollment, at, &mut |id| {
                pki.sign_device(&csr, id, validity)
                    .map(|c| IssuedCert {
                        der: c.to_vec(),
                        not_after: validity.1,
                    })
                    .map_err(|e| match e {
                        crate::pki::PkiError::BadCsr(_) => e.to_string(),
                        other => {
                            tracing::error!(error = %other, "cannot sign a device certificate");
                            "the cloud could not sign a certificate".into()
                        }
                    })
            }))
        })
        .await;
    match outcome
        .map_err(crate::storage::EnrollError::from)
        .and_then(|r| r)
    {
        Ok(enrolled) => {
            tracing::info!(device = %enrolled.device_id, account = %enrolled.account_name, "device enrolled");
            EnrollResponse {
                request_id,
                device_id: enrolled.device_id,
                account_id: enrolled.account_id,
                account_name: enrolled.account_name,
                client_cert_der: Blob(enrolled.cert_der),
                ca_cert_der: Blob(shared.pki.ca_der().to_vec()),
            }
            .into()
        }
        Err(e) => {
            if let crate::storage::EnrollError::Storage(s) = &e {
                tracing::error!(error = %s, "enrollment failed");
            }
            error_msg(e.code(), e.public_message(), Some(request_id))
        }
    }
}
