//! The cloud's private CA: made on first start, reused after. It signs the cloud's server
//! certificate and every device's client certificate (from a CSR: the device's key never leaves
//! the device).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls::pki_types::{
    CertificateDer, CertificateSigningRequestDer, PrivateKeyDer, PrivatePkcs8KeyDer,
};
use synesis_proto::{DeviceId, Sha256, UnixMillis};
use synesis_wire::tls::{SERVER_NAME, fingerprint};

use synesis_wire::files::{read_file, write_public_file, write_secret_file};

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(
        "{0}: not a valid key or certificate; move it away to let the cloud make a new CA (enrolled devices must then enroll again)"
    )]
    Corrupt(PathBuf),
    #[error("the device's certificate signing request is invalid: {0}")]
    BadCsr(rcgen::Error),
    #[error(
        "{path}: mode {mode:04o} lets others read this key; run `chmod 600 {path}` (and check who could have read it)"
    )]
    KeyExposed { path: PathBuf, mode: u32 },
    #[error("a certificate's expiry is out of range")]
    BadExpiry,
}

pub struct Pki {
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    server_der: CertificateDer<'static>,
    server_key_der: Vec<u8>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pki(CA {})", self.ca_fingerprint())
    }
}

struct Files {
    ca_key: PathBuf,
    ca_cert: PathBuf,
    server_key: PathBuf,
    server_cert: PathBuf,
}

impl Files {
    fn in_dir(dir: &Path) -> Files {
        Files {
            ca_key: dir.join("ca.key.pem"),
            ca_cert: dir.join("ca.crt.der"),
            server_key: dir.join("server.key.pem"),
            server_cert: dir.join("server.crt.der"),
        }
    }
}

impl Pki {
    /// Loads the CA and server certificate from `dir`, creating whichever is missing.
    pub fn load_or_create(dir: &Path) -> Result<Pki, PkiError> {
        let files = Files::in_dir(dir);
        let (ca_key, ca_der) = if files.ca_key.exists() {
            let key = load_key(&files.ca_key)?;
            let der =
                CertificateDer::from(read_file(&files.ca_cert).map_err(|source| PkiError::Io {
                    path: files.ca_cert.clone(),
                    source,
                })?);
            (key, der)
        } else {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name = name("Synesis cloud CA");
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let cert = params.self_signed(&key)?;
            // The certificate first: a key without its certificate would be an orphan.
            write_public_file(&files.ca_cert, cert.der()).map_err(|source| PkiError::Io {
                path: files.ca_cert.clone(),
                source,
            })?;
            write_secret_file(&files.ca_key, key.serialize_pem().as_bytes()).map_err(|source| {
                PkiError::Io {
                    path: files.ca_key.clone(),
                    source,
                }
            })?;
            (key, cert.der().clone())
        };
        let issuer = Issuer::from_ca_cert_der(&ca_der, ca_key)
            .map_err(|_| PkiError::Corrupt(files.ca_cert.clone()))?;

        let (server_key, server_der) = if files.server_key.exists() && files.server_cert.exists() {
            let key = load_key(&files.server_key)?;
            let der = read_file(&files.server_cert).map_err(|source| PkiError::Io {
                path: files.server_cert.clone(),
                source,
            })?;
            (key, CertificateDer::from(der))
        } else {
            let key = KeyPair::generate()?;
            let mut params =
                CertificateParams::new(vec![SERVER_NAME.to_owned(), "localhost".to_owned()])?;
            params.distinguished_name = name(SERVER_NAME);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            let cert = params.signed_by(&key, &issuer)?;
            write_public_file(&files.server_cert, cert.der()).map_err(|source| PkiError::Io {
                path: files.server_cert.clone(),
                source,
            })?;
            write_secret_file(&files.server_key, key.serialize_pem().as_bytes()).map_err(
                |source| PkiError::Io {
                    path: files.server_key.clone(),
                    source,
                },
            )?;
            (key, cert.der().clone())
        };
        Ok(Pki {
            ca_der,
            issuer,
            server_der,
            server_key_der: server_key.serialize_der(),
        })
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    pub fn ca_fingerprint(&self) -> Sha256 {
        fingerprint(&self.ca_der)
    }

    /// The chain the server presents: its certificate, then the CA (so that a device enrolling
    /// with only the CA's fingerprint can find and pin it).
    pub fn server_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.server_der.clone(), self.ca_der.clone()]
    }

    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()))
    }

    /// Signs a device's CSR: the certificate names the device, is for client authentication
    /// only, carries the key the device proved it holds (the CSR's signature is checked), and
    /// is valid from `not_before` until `not_after` (TLS refuses it outside).
    pub fn sign_device(
        &self,
        csr_der: &[u8],
        device: DeviceId,
        (not_before, not_after): (UnixMillis, UnixMillis),
    ) -> Result<CertificateDer<'static>, PkiError> {
        let mut csr =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(csr_der))
                .map_err(PkiError::BadCsr)?;
        let p = &mut csr.params;
        p.distinguished_name = name(&device.to_string());
        p.subject_alt_names = Vec::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        // Unique per certificate (a device renews under the same id), positive, and within
        // RFC 5280's 20 bytes: 16 random bytes with the top bit clear.
        let mut serial = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut serial);
        serial[0] = (serial[0] & 0x7f) | 0x01;
        p.serial_number = Some(SerialNumber::from_slice(&serial));
        let time = |t: UnixMillis| {
            time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(t.0) * 1_000_000)
                .map_err(|_| PkiError::BadExpiry)
        };
        p.not_before = time(not_before)?;
        p.not_after = time(not_after)?;
        Ok(csr.signed_by(&self.issuer)?.der().clone())
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn load_key(path: &Path) -> Result<KeyPair, PkiError> {
    refuse_exposed(path)?;
    let pem = read_file(path).map_err(|source| PkiError::Io {
        path: path.to_owned(),
        source,
    })?;
    let pem = String::from_utf8(pem).map_err(|_| PkiError::Corrupt(path.to_owned()))?;
    KeyPair::from_pem(&pem).map_err(|_| PkiError::Corrupt(path.to_owned()))
}

/// A private key others can read is refused, not used: whoever read it can impersonate the
/// cloud (the server key) or sign devices (the CA key).
fn refuse_exposed(path: &Path) -> Result<(), PkiError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|source| PkiError::Io {
                path: path.to_owned(),
                source,
            })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(PkiError::KeyExposed {
                path: path.to_owned(),
                mode,
            });
        }
    }
    Ok(())
}
