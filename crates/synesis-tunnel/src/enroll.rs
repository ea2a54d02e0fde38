//! `synesis cloud login TOKEN`: trade a one-time setup token for this device's identity.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use synesis_proto::message::{EnrollRequest, EnrollResponse};
use synesis_proto::{Blob, ErrorCode, Message, RequestId, SetupToken, UnixMillis};
use synesis_wire::tls::fingerprint;

use crate::identity::{Identity, IdentityInfo};
use crate::machine::{Failure, Fatal};
use crate::tls::enrollment_client_config;

/// Attempts for one enrollment (same request id each time, so a lost reply is answered from
/// what the cloud already did, never by a second device).
const ENROLL_ATTEMPTS_MAX: u32 = 3;
const ENROLL_RETRY_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("the cloud refused the enrollment: {message} ({code})")]
    Refused { code: ErrorCode, message: String },
    #[error("{0}")]
    Fatal(Fatal),
    #[error("could not reach the cloud at {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("the cloud answered with something unexpected: {0}")]
    Protocol(String),
    #[error("could not make this device's key: {0}")]
    Key(String),
}

/// Enrolls this device with the cloud named in `token`. Nothing is written: the caller saves
/// the returned identity.
pub async fn enroll(token: &SetupToken, device_name: &str) -> Result<Identity, EnrollError> {
    let key = KeyPair::generate().map_err(|e| EnrollError::Key(e.to_string()))?;
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, device_name);
    params.distinguished_name = dn;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| EnrollError::Key(e.to_string()))?;
    let request = EnrollRequest {
        request_id: new_request_id(),
        token_secret: token.presented_secret(),
        csr_der: Blob(csr.der().to_vec()),
        device_name: device_name.to_owned(),
    };

    let mut attempt = 1;
    let response = loop {
        match exchange(token, &request).await {
            Ok(response) => break response,
            Err(Attempt::Retry(reason)) if attempt < ENROLL_ATTEMPTS_MAX => {
                tracing::info!(attempt, %reason, "enrollment attempt failed; retrying with the same request id");
                attempt += 1;
                tokio::time::sleep(ENROLL_RETRY_DELAY).await;
            }
            Err(Attempt::Retry(reason)) => {
                return Err(EnrollError::Unreachable {
                    server: token.server.clone(),
                    reason,
                });
            }
            Err(Attempt::Final(e)) => return Err(e),
        }
    };

    if fingerprint(&response.ca_cert_der.0.clone().into()) != token.ca_sha256 {
        return Err(EnrollError::Protocol(
            "the CA certificate sent does not match the token's fingerprint".into(),
        ));
    }
    Ok(Identity {
        info: IdentityInfo {
            device_id: response.device_id,
            account_id: response.account_id,
            account: response.account_name,
            server: token.server.clone(),
            enrolled_at: unix_now(),
        },
        key_der: key.serialize_der(),
        cert_der: response.client_cert_der.0,
        ca_der: response.ca_cert_der.0,
    })
}

enum Attempt {
    Retry(String),
    Final(EnrollError),
}

async fn exchange(token: &SetupToken, request: &EnrollRequest) -> Result<EnrollResponse, Attempt> {
    let config = enrollment_client_config(token.ca_sha256)
        .map_err(|e| Attempt::Final(EnrollError::Key(e.to_string())))?;
    match crate::request::exchange(config, &token.server, &request.clone().into()).await {
        Ok(Message::EnrollResponse(r)) if r.request_id == request.request_id => Ok(r),
        Ok(Message::ErrorMsg(e)) => Err(Attempt::Final(EnrollError::Refused {
            code: e.code,
            message: e.message,
        })),
        Ok(other) => Err(Attempt::Final(EnrollError::Protocol(format!(
            "{:?}",
            other.message_type()
        )))),
        Err(Failure::Fatal(fatal)) => Err(Attempt::Final(EnrollError::Fatal(fatal))),
        Err(Failure::Transient(reason)) => Err(Attempt::Retry(reason)),
    }
}

/// A fresh request id: the clock and the OS's randomness, read here at the edge.
pub fn new_request_id() -> RequestId {
    let ms = u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis()),
    )
    .unwrap_or(0);
    let mut random = [0u8; 10];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut random);
    RequestId::from_parts(ms, random)
}

pub fn unix_now() -> UnixMillis {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    UnixMillis(i64::try_from(ms).unwrap_or(i64::MAX))
}
