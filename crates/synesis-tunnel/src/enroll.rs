//! `synesis cloud login TOKEN`: trade a one-time setup token for this device's identity,
//! in two steps so that a crash between them cannot burn the token: a [`PendingEnrollment`]
//! is written, then [`enroll`] sends it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
use serde::{Deserialize, Serialize};
use synesis_proto::message::{EnrollRequest, EnrollResponse};
use synesis_proto::{Blob, ErrorCode, Message, RequestId, SetupToken, UnixMillis};
use synesis_wire::files::write_secret_file;
use synesis_wire::tls::fingerprint;

// Re-exported for callers that still name them here (the CLI's ledger); the clock module is
// their home.
use crate::clock::{new_request_id, unix_now};
use crate::identity::{Identity, IdentityError, IdentityInfo, PENDING};
use crate::machine::{Failure, Fatal, HEARTBEAT_INTERVAL_DEFAULT};
use crate::tls::{device_client_config, enrollment_client_config};

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
    #[error(
        "could not reach the cloud at {server}: {reason}; `synesis cloud login` with the same token resumes this enrollment"
    )]
    Unreachable { server: String, reason: String },
    #[error("the cloud answered with something unexpected: {0}")]
    Protocol(String),
    #[error("could not make this device's key: {0}")]
    Key(String),
}

/// An enrollment begun and not finished: the device's new key, its CSR and the request id,
/// written to `identity/enrollment.json` (0600, durably) before the request is sent. The cloud
/// may commit the enrollment and the device then crash or lose the reply; the token is used up
/// by then, and only the same request id gets its answer. So `synesis cloud login` with the
/// same token again finds this, sends the byte-for-byte same request, and receives the device
/// and the certificate (for this key) the cloud made the first time.
///
/// The token's secret is not stored: the rerun is given the token again. What names the token
/// (its id and the CA fingerprint, neither secret) is, so a rerun with another token starts
/// over.
#[derive(Clone)]
pub struct PendingEnrollment {
    pub request_id: RequestId,
    pub device_name: String,
    pub begun_at: UnixMillis,
    token_id: String,
    ca_sha256: String,
    /// PKCS#8 DER.
    key_der: Vec<u8>,
    csr_der: Vec<u8>,
}

impl std::fmt::Debug for PendingEnrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingEnrollment")
            .field("request_id", &self.request_id)
            .field("device_name", &self.device_name)
            .field("begun_at", &self.begun_at)
            .field("token_id", &self.token_id)
            .field("key_der", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// `enrollment.json`: bytes as base64.
#[derive(Serialize, Deserialize)]
struct PendingFile {
    request_id: RequestId,
    device_name: String,
    begun_at: UnixMillis,
    token_id: String,
    ca_sha256: String,
    key_der: String,
    csr_der: String,
}

impl PendingEnrollment {
    /// A new key and CSR for `device_name`, and a new request id, for `token`. Nothing is
    /// written: [`PendingEnrollment::save`] it before [`enroll`].
    pub fn begin(token: &SetupToken, device_name: &str) -> Result<PendingEnrollment, EnrollError> {
        let key = KeyPair::generate().map_err(|e| EnrollError::Key(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| EnrollError::Key(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device_name);
        params.distinguished_name = dn;
        let csr = params
            .serialize_request(&key)
            .map_err(|e| EnrollError::Key(e.to_string()))?;
        Ok(PendingEnrollment {
            request_id: new_request_id(),
            device_name: device_name.to_owned(),
            begun_at: unix_now(),
            token_id: token_id_hex(token),
            ca_sha256: token.ca_sha256.to_string(),
            key_der: key.serialize_der(),
            csr_der: csr.der().to_vec(),
        })
    }

    /// Whether this enrollment was begun with `token` (the same token id and CA).
    pub fn is_for(&self, token: &SetupToken) -> bool {
        self.token_id == token_id_hex(token) && self.ca_sha256 == token.ca_sha256.to_string()
    }

    fn path(data_dir: &Path) -> PathBuf {
        Identity::dir(data_dir).join(PENDING)
    }

    /// The enrollment left unfinished in `data_dir`, if any.
    pub fn load(data_dir: &Path) -> Result<Option<PendingEnrollment>, IdentityError> {
        let path = Self::path(data_dir);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(IdentityError::Io { path, source }),
        };
        let damaged = || IdentityError::Damaged(path.clone());
        let file: PendingFile = serde_json::from_slice(&bytes).map_err(|_| damaged())?;
        let b64 = |s: &str| BASE64.decode(s).map_err(|_| damaged());
        Ok(Some(PendingEnrollment {
            request_id: file.request_id,
            device_name: file.device_name,
            begun_at: file.begun_at,
            key_der: b64(&file.key_der)?,
            csr_der: b64(&file.csr_der)?,
            token_id: file.token_id,
            ca_sha256: file.ca_sha256,
        }))
    }

    /// Writes it (0600, atomically, fsynced with its directory): when this returns, a crash
    /// cannot lose the key the cloud is about to certify.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let dir = Identity::make_dir(data_dir)?;
        let path = dir.join(PENDING);
        let file = PendingFile {
            request_id: self.request_id,
            device_name: self.device_name.clone(),
            begun_at: self.begun_at,
            token_id: self.token_id.clone(),
            ca_sha256: self.ca_sha256.clone(),
            key_der: BASE64.encode(&self.key_der),
            csr_der: BASE64.encode(&self.csr_der),
        };
        let bytes =
            serde_json::to_vec_pretty(&file).map_err(|_| IdentityError::Damaged(path.clone()))?;
        write_secret_file(&path, &bytes).map_err(|source| IdentityError::Io { path, source })
    }

    /// Forgets it (after the identity was saved, or when the cloud said it never will be).
    pub fn remove(data_dir: &Path) -> Result<(), IdentityError> {
        let path = Self::path(data_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(IdentityError::Io { path, source }),
        }
    }
}

fn token_id_hex(token: &SetupToken) -> String {
    token.token_id.iter().map(|b| format!("{b:02x}")).collect()
}

impl EnrollError {
    /// Whether sending the same request again might still enroll the device: always, unless
    /// the cloud said this token or this request never will. (The cloud may have committed
    /// the enrollment before the failure; only the same request gets that answer.)
    pub fn resumable(&self) -> bool {
        !matches!(
            self,
            EnrollError::Refused {
                code: ErrorCode::TOKEN_INVALID
                    | ErrorCode::TOKEN_EXPIRED
                    | ErrorCode::TOKEN_USED
                    | ErrorCode::INVALID_REQUEST,
                ..
            }
        )
    }
}

/// Sends `pending`'s request with `token`'s secret to the cloud named in `token`, and returns
/// the identity made of its key and the cloud's answer. Nothing is written: the caller saves
/// the identity, then removes `pending`.
pub async fn enroll(
    token: &SetupToken,
    pending: &PendingEnrollment,
) -> Result<Identity, EnrollError> {
    let request = EnrollRequest {
        request_id: pending.request_id,
        token_secret: token.presented_secret(),
        csr_der: Blob(pending.csr_der.clone()),
        device_name: pending.device_name.clone(),
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
    let identity = Identity {
        info: IdentityInfo {
            device_id: response.device_id,
            account_id: response.account_id,
            account: response.account_name,
            server: token.server.clone(),
            enrolled_at: unix_now(),
            nodes: token.nodes.clone(),
        },
        key_der: pending.key_der.clone(),
        cert_der: response.client_cert_der.0,
        ca_der: response.ca_cert_der.0,
    };
    // rustls checks that the certificate is for this key: an identity that could never
    // connect is refused here, not on every connection after.
    device_client_config(&identity, HEARTBEAT_INTERVAL_DEFAULT).map_err(|e| {
        EnrollError::Protocol(format!(
            "the certificate sent is not usable with this device's key: {e}"
        ))
    })?;
    Ok(identity)
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
        Err(Failure::Transient(reason) | Failure::TimedOut(reason)) => Err(Attempt::Retry(reason)),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use super::*;

    fn token(id: u8) -> SetupToken {
        SetupToken {
            server: "127.0.0.1:4433".into(),
            nodes: Vec::new(),
            ca_sha256: synesis_proto::Sha256([0xab; 32]),
            token_id: [id; 16],
            secret: [2; 32],
        }
    }

    #[test]
    fn a_pending_enrollment_survives_on_disk_owner_only_and_matches_only_its_token() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(PendingEnrollment::load(tmp.path()).unwrap().is_none());
        let pending = PendingEnrollment::begin(&token(1), "laptop").unwrap();
        pending.save(tmp.path()).unwrap();

        let loaded = PendingEnrollment::load(tmp.path()).unwrap().unwrap();
        assert_eq!(loaded.request_id, pending.request_id);
        assert_eq!(loaded.device_name, "laptop");
        assert_eq!(loaded.key_der, pending.key_der);
        assert_eq!(loaded.csr_der, pending.csr_der);
        assert!(loaded.is_for(&token(1)));
        assert!(!loaded.is_for(&token(2)));
        let other_cloud = SetupToken {
            ca_sha256: synesis_proto::Sha256([0xcd; 32]),
            ..token(1)
        };
        assert!(!loaded.is_for(&other_cloud));

        // Neither the token's secret nor the key shows anywhere it could leak.
        let text = std::fs::read_to_string(Identity::dir(tmp.path()).join(PENDING)).unwrap();
        assert!(!text.contains(&token(1).presented_secret()[33..]), "{text}");
        assert!(!format!("{loaded:?}").contains(&BASE64.encode(&loaded.key_der)));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let dir = Identity::dir(tmp.path());
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&dir), 0o700);
            assert_eq!(mode(&dir.join(PENDING)), 0o600);
        }

        PendingEnrollment::remove(tmp.path()).unwrap();
        PendingEnrollment::remove(tmp.path()).unwrap();
        assert!(PendingEnrollment::load(tmp.path()).unwrap().is_none());
    }

    #[test]
    fn removing_the_identity_removes_a_pending_enrollment_too() {
        let tmp = tempfile::tempdir().unwrap();
        PendingEnrollment::begin(&token(1), "laptop")
            .unwrap()
            .save(tmp.path())
            .unwrap();
        Identity::remove(tmp.path()).unwrap();
        assert!(!Identity::dir(tmp.path()).exists());
    }

    #[test]
    fn only_a_refusal_of_the_token_or_the_request_ends_a_pending_enrollment() {
        let refused = |code| EnrollError::Refused {
            code,
            message: String::new(),
        };
        for code in [
            ErrorCode::TOKEN_INVALID,
            ErrorCode::TOKEN_EXPIRED,
            ErrorCode::TOKEN_USED,
            ErrorCode::INVALID_REQUEST,
        ] {
            assert!(!refused(code).resumable(), "{code}");
        }
        assert!(refused(ErrorCode::INTERNAL).resumable());
        let unreachable = EnrollError::Unreachable {
            server: "h:1".into(),
            reason: "timeout".into(),
        };
        assert!(unreachable.resumable());
    }
}
