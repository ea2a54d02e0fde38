//! Certificate renewal: a device certificate expires (the cloud's `--cert-lifetime`), so the
//! tunnel asks for a new one over its own connection when a third of the current one's life is
//! left (PROTOCOL.md §1, "Enrollment and identity", 6). Same key, same device id; the cloud
//! refuses a revoked device.
//!
//! [`renew_after`] is the pure policy; [`renew`] is the exchange, run by the driver.

use synesis_proto::message::CertRenew;
use synesis_proto::{Blob, Message, UnixMillis};

use crate::identity::Identity;

/// The share of a certificate's lifetime left when the device renews it: a third, so a device
/// that is offline for a while still renews before the end.
const RENEW_WHEN_LEFT_DIVISOR: i64 = 3;

/// A certificate valid for longer than this was signed before certificates expired (rcgen's
/// default, 1975 to 4096; the cloud signs at most 10 years): it is due at once, and the cloud
/// replaces it with one that expires.
const LEGACY_LIFETIME_MS: i64 = 20 * 366 * 24 * 3_600 * 1_000;

/// When a certificate valid from `not_before` to `not_after` should be renewed.
pub fn renew_after(not_before: UnixMillis, not_after: UnixMillis) -> UnixMillis {
    let lifetime = not_after.0.saturating_sub(not_before.0).max(0);
    if lifetime > LEGACY_LIFETIME_MS {
        return not_before;
    }
    UnixMillis(
        not_after
            .0
            .saturating_sub(lifetime / RENEW_WHEN_LEFT_DIVISOR),
    )
}

/// When `identity`'s certificate should be renewed; `None` when it cannot be read (the
/// handshake will say what is wrong with it).
pub fn due(identity: &Identity) -> Option<UnixMillis> {
    synesis_wire::tls::validity(&identity.cert_der).map(|(from, until)| renew_after(from, until))
}

#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("cannot make a signing request for this device's key: {0}")]
    Key(String),
    #[error("the cloud refused the renewal: {message} ({code})")]
    Refused {
        code: synesis_proto::ErrorCode,
        message: String,
    },
    #[error("the cloud answered a renewal with {0:?}")]
    Protocol(synesis_proto::MessageType),
    #[error("the renewed certificate is not for this device's key, or not valid now")]
    Mismatch,
    #[error("the new certificate was not saved: {0}")]
    Save(#[from] crate::identity::IdentityError),
    #[error("{0}")]
    Transport(String),
}

/// Asks for a new certificate for `identity`'s key on a stream of `conn`, and saves it under
/// `data_dir` (when given) before returning it.
pub async fn renew(
    conn: &quinn::Connection,
    identity: &Identity,
    data_dir: Option<&std::path::Path>,
) -> Result<Vec<u8>, RenewError> {
    let key = rcgen::KeyPair::try_from(identity.key_der.as_slice())
        .map_err(|e| RenewError::Key(e.to_string()))?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .map_err(|e| RenewError::Key(e.to_string()))?;
    let request = CertRenew {
        request_id: crate::clock::new_request_id(),
        csr_der: Blob(csr.der().to_vec()),
    };
    let reply = crate::request::exchange_on(conn, &request.into())
        .await
        .map_err(|f| RenewError::Transport(format!("{f:?}")))?;
    let cert = match reply {
        Message::CertRenewed(r) => r.client_cert_der.0,
        Message::ErrorMsg(e) => {
            return Err(RenewError::Refused {
                code: e.code,
                message: e.message,
            });
        }
        other => return Err(RenewError::Protocol(other.message_type())),
    };
    if !acceptable(&cert, &identity.cert_der, crate::clock::unix_now()) {
        return Err(RenewError::Mismatch);
    }
    if let Some(dir) = data_dir {
        Identity::save_cert(dir, &cert)?;
    }
    Ok(cert)
}

/// Whether a renewed certificate may replace `current` (PROTOCOL.md §1): only one for the same
/// key and valid at `now`; a wrong one would lock the device out at its next connection.
fn acceptable(renewed: &[u8], current: &[u8], now: UnixMillis) -> bool {
    let key = synesis_wire::tls::public_key(renewed);
    let for_this_key = key.is_some() && key == synesis_wire::tls::public_key(current);
    let valid_now = synesis_wire::tls::validity(renewed)
        .is_some_and(|(from, until)| from <= now && now < until);
    for_this_key && valid_now
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A certificate for `key`, valid in the years `from` to `until`.
    fn cert(key: &rcgen::KeyPair, from: i32, until: i32) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.not_before = rcgen::date_time_ymd(from, 1, 1);
        params.not_after = rcgen::date_time_ymd(until, 1, 1);
        params.self_signed(key).unwrap().der().to_vec()
    }

    #[test]
    fn a_renewed_certificate_is_kept_only_for_this_key_and_valid_now() {
        let mine = rcgen::KeyPair::generate().unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        let current = cert(&mine, 2020, 2030);
        // 2026-11-30, in milliseconds since the epoch.
        let now = UnixMillis(1_796_000_000_000);
        assert!(acceptable(&cert(&mine, 2026, 2027), &current, now));
        assert!(
            !acceptable(&cert(&other, 2026, 2027), &current, now),
            "another key"
        );
        assert!(
            !acceptable(&cert(&mine, 2020, 2021), &current, now),
            "expired"
        );
        assert!(
            !acceptable(&cert(&mine, 2027, 2028), &current, now),
            "not yet valid"
        );
        assert!(!acceptable(b"not a certificate", &current, now));
    }

    #[test]
    fn renewal_is_due_when_a_third_of_the_lifetime_is_left() {
        let day = 86_400_000;
        assert_eq!(
            renew_after(UnixMillis(0), UnixMillis(90 * day)),
            UnixMillis(60 * day)
        );
        assert_eq!(
            renew_after(UnixMillis(1_000), UnixMillis(31_000)),
            UnixMillis(21_000)
        );
        // One valid for centuries (signed before certificates expired): at once.
        let year = 365 * day;
        assert_eq!(
            renew_after(UnixMillis(5), UnixMillis(2_000 * year)),
            UnixMillis(5)
        );
        // Ten years (the longest the cloud signs) is not legacy.
        assert_eq!(
            renew_after(UnixMillis(0), UnixMillis(3_660 * day)),
            UnixMillis(2_440 * day)
        );
        // A certificate that ends before it starts is due at once (at its end).
        assert_eq!(renew_after(UnixMillis(5), UnixMillis(1)), UnixMillis(1));
    }
}
