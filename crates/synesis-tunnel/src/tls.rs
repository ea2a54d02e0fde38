//! The device's TLS and QUIC configuration.
//!
//! Two client configurations: for enrollment, the cloud's CA is not known yet, only its SHA-256
//! from the setup token, so [`PinnedCa`] finds the CA in the chain the server presents, checks
//! its fingerprint, and then verifies the server certificate against it exactly as for any
//! root (never "accept any certificate"). After enrollment the device trusts only the CA it
//! received, and presents its own certificate (mutual TLS).

use std::sync::Arc;
use std::time::Duration;

use rustls::DigitallySignedStruct;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use synesis_proto::Sha256;
use synesis_wire::tls::{alpn, fingerprint, provider};

use crate::identity::Identity;
use crate::machine::{HEARTBEAT_INTERVAL_DEFAULT, HEARTBEAT_MISSES_MAX};

/// QUIC keep-alives are never sent more often than this (heartbeats already keep the path
/// warm; keep-alives only cover gaps).
pub const KEEP_ALIVE_INTERVAL_MIN: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("the stored identity is not usable: {0}")]
    Identity(String),
}

/// Transport settings that agree with the heartbeat logic for `heartbeat_interval`:
/// keep-alive every interval (only sent when nothing else was), idle timeout one interval after
/// the heartbeat logic would have declared the peer dead.
pub fn transport_config(heartbeat_interval: Duration) -> quinn::TransportConfig {
    let QuicTimers { keep_alive, idle } = QuicTimers::for_heartbeat(heartbeat_interval);
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(keep_alive));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t
}

/// QUIC's own timers for a heartbeat interval (PROTOCOL.md §1): keep-alive every interval, idle
/// after four, so the heartbeat logic (three misses) decides first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct QuicTimers {
    keep_alive: Duration,
    idle: Duration,
}

impl QuicTimers {
    fn for_heartbeat(heartbeat_interval: Duration) -> QuicTimers {
        let keep_alive = heartbeat_interval.max(KEEP_ALIVE_INTERVAL_MIN);
        let idle = heartbeat_interval.saturating_mul(HEARTBEAT_MISSES_MAX + 1);
        debug_assert!(keep_alive < idle);
        QuicTimers { keep_alive, idle }
    }
}

/// For `synesis cloud login`: no client certificate, the CA pinned by fingerprint.
pub fn enrollment_client_config(pin: Sha256) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let verifier = Arc::new(PinnedCa {
        pin,
        provider: Arc::clone(&provider),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    tls.alpn_protocols = alpn();
    quic_client(tls, transport_config(HEARTBEAT_INTERVAL_DEFAULT))
}

/// For everything after enrollment: mutual TLS, the cloud's CA as the only root.
pub fn device_client_config(
    identity: &Identity,
    heartbeat_interval: Duration,
) -> Result<quinn::ClientConfig, TlsError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(identity.ca())
        .map_err(|e| TlsError::Identity(format!("CA certificate: {e}")))?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![identity.cert()], identity.key())
        .map_err(|e| TlsError::Identity(format!("device key or certificate: {e}")))?;
    tls.alpn_protocols = alpn();
    quic_client(tls, transport_config(heartbeat_interval))
}

fn quic_client(
    mut tls: rustls::ClientConfig,
    transport: quinn::TransportConfig,
) -> Result<quinn::ClientConfig, TlsError> {
    // An escalation is never sent in 0-RTT data (PROTOCOL.md §2): nothing the device sends may
    // be replayable by someone on the path; nor does the connect code ask quinn for 0-RTT.
    tls.enable_early_data = false;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Identity(format!("no TLS 1.3 cipher suite for QUIC: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Verifies the server against the CA whose SHA-256 the setup token carries. The CA must be in
/// the chain the server presents (the Synesis cloud sends it).
#[derive(Debug)]
struct PinnedCa {
    pin: Sha256,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates.iter().find(|c| fingerprint(c) == self.pin) else {
            return Err(rustls::Error::General(
                "the cloud's CA does not match the fingerprint in the setup token (a wrong or damaged token, or not the cloud that issued it)".into(),
            ));
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::clone(&self.provider),
        )
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_is_the_heartbeat_interval_and_idle_four_intervals() {
        let at = |ms| QuicTimers::for_heartbeat(Duration::from_millis(ms));
        assert_eq!(
            at(2_000),
            QuicTimers {
                keep_alive: Duration::from_secs(2),
                idle: Duration::from_secs(8)
            }
        );
        assert_eq!(
            at(15_000),
            QuicTimers {
                keep_alive: Duration::from_secs(15),
                idle: Duration::from_secs(60)
            }
        );
        // Keep-alives are never more often than every 100 ms.
        assert_eq!(at(100).keep_alive, Duration::from_millis(100));
        assert_eq!(at(100).idle, Duration::from_millis(400));
    }
}
