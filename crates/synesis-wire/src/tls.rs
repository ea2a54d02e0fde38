//! TLS pieces both ends agree on.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::CertificateDer;
use sha2::Digest;
use synesis_proto::{Sha256, UnixMillis};

/// The name the device asks for and the cloud's certificate carries. Devices pin the cloud's CA
/// (from the setup token, then from enrollment), so the name need not be the host's DNS name:
/// one fixed name lets a cloud move hosts and addresses without reissuing its certificate.
pub const SERVER_NAME: &str = "synesis-cloud";

/// The one crypto provider: ring. Passed explicitly everywhere, so no process-wide default is
/// needed and a dependency that enables another provider cannot make the choice ambiguous.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// TLS for HTTPS clients on the public web (the cloud's HTTP providers, `synesis model pull`):
/// the same [`provider`], the webpki roots, HTTP/1.1. Passed to reqwest explicitly.
pub fn web_client_config() -> Result<rustls::ClientConfig, rustls::Error> {
    let roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tls)
}

/// The ALPN list both ends set.
pub fn alpn() -> Vec<Vec<u8>> {
    vec![synesis_proto::ALPN.to_vec()]
}

/// When a certificate starts and stops being valid (its `notBefore` and `notAfter`), or
/// `None` when it does not parse.
pub fn validity(cert: &[u8]) -> Option<(UnixMillis, UnixMillis)> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    let v = x509.validity();
    let ms = |t: &x509_parser::time::ASN1Time| UnixMillis(t.timestamp().saturating_mul(1_000));
    Some((ms(&v.not_before), ms(&v.not_after)))
}

/// A certificate's public key (its SubjectPublicKeyInfo, DER), or `None` when it does not parse.
pub fn public_key(cert: &[u8]) -> Option<Vec<u8>> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(x509.public_key().raw.to_vec())
}

/// The public key a certificate signing request is for (SubjectPublicKeyInfo, DER), or `None`
/// when it does not parse.
pub fn csr_public_key(csr: &[u8]) -> Option<Vec<u8>> {
    use x509_parser::prelude::FromDer;
    let (_, req) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr).ok()?;
    Some(req.certification_request_info.subject_pki.raw.to_vec())
}

/// SHA-256 of a certificate's DER: how certificates are pinned and looked up.
pub fn fingerprint(cert: &CertificateDer<'_>) -> Sha256 {
    Sha256(sha2::Sha256::digest(cert.as_ref()).into())
}
