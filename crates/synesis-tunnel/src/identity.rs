//! The device's identity: its key (made on the device, never sent), the certificate the cloud's
//! CA signed for it, the CA itself, and who it is. All under the data directory, in
//! `identity/`, every file mode 0600.

use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use synesis_proto::{AccountId, DeviceId, UnixMillis};
use synesis_wire::files::write_secret_file;

const DIR: &str = "identity";
const INFO: &str = "identity.json";
const KEY: &str = "device.key.der";
const CERT: &str = "device.crt.der";
const CA: &str = "ca.crt.der";
/// An enrollment begun and not finished ([`PendingEnrollment`](crate::enroll::PendingEnrollment)).
pub(crate) const PENDING: &str = "enrollment.json";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is damaged; run `synesis cloud logout --force` and enroll again")]
    Damaged(PathBuf),
}

/// Who this device is, in words (`identity.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub device_id: DeviceId,
    pub account_id: AccountId,
    pub account: String,
    /// The cloud's address, `host:port`, from the setup token.
    pub server: String,
    pub enrolled_at: UnixMillis,
}

#[derive(Clone)]
pub struct Identity {
    pub info: IdentityInfo,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("info", &self.info)
            .field("key_der", &"<redacted>")
            .finish()
    }
}

impl Identity {
    pub fn dir(data_dir: &Path) -> PathBuf {
        data_dir.join(DIR)
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    pub fn cert(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.cert_der.clone())
    }

    pub fn ca(&self) -> CertificateDer<'static> {
        CertificateDer::from(self.ca_der.clone())
    }

    /// The identity in `data_dir`, or `None` when this device never enrolled.
    pub fn load(data_dir: &Path) -> Result<Option<Identity>, IdentityError> {
        let dir = Self::dir(data_dir);
        let info_path = dir.join(INFO);
        if !info_path.exists() {
            return Ok(None);
        }
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| IdentityError::Io { path, source })
        };
        let info: IdentityInfo = serde_json::from_slice(&read(INFO)?)
            .map_err(|_| IdentityError::Damaged(info_path.clone()))?;
        Ok(Some(Identity {
            info,
            key_der: read(KEY)?,
            cert_der: read(CERT)?,
            ca_der: read(CA)?,
        }))
    }

    /// Writes every file (0600, atomically), `identity.json` last so a crash midway leaves no
    /// half identity that `load` would accept.
    pub fn save(&self, data_dir: &Path) -> Result<(), IdentityError> {
        let dir = Self::make_dir(data_dir)?;
        let info = serde_json::to_vec_pretty(&self.info)
            .map_err(|_| IdentityError::Damaged(dir.join(INFO)))?;
        for (name, bytes) in [
            (KEY, &self.key_der),
            (CERT, &self.cert_der),
            (CA, &self.ca_der),
            (INFO, &info),
        ] {
            let path = dir.join(name);
            write_secret_file(&path, bytes).map_err(|source| IdentityError::Io { path, source })?;
        }
        Ok(())
    }

    /// The identity directory, made if missing, readable by the owner only.
    pub(crate) fn make_dir(data_dir: &Path) -> Result<PathBuf, IdentityError> {
        let dir = Self::dir(data_dir);
        std::fs::create_dir_all(&dir).map_err(|source| IdentityError::Io {
            path: dir.clone(),
            source,
        })?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
                |source| IdentityError::Io {
                    path: dir.clone(),
                    source,
                },
            )?;
        }
        Ok(dir)
    }

    /// Replaces the certificate with a renewed one (same key, same device), atomically.
    pub fn save_cert(data_dir: &Path, cert_der: &[u8]) -> Result<(), IdentityError> {
        let path = Self::dir(data_dir).join(CERT);
        write_secret_file(&path, cert_der).map_err(|source| IdentityError::Io { path, source })
    }

    /// Deletes the identity (`identity.json` first: after a crash the rest is inert), and an
    /// unfinished enrollment's key if one was left.
    pub fn remove(data_dir: &Path) -> Result<(), IdentityError> {
        let dir = Self::dir(data_dir);
        for name in [INFO, KEY, CERT, CA, PENDING] {
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(IdentityError::Io { path, source }),
            }
        }
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_removes_with_owner_only_permissions() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(Identity::load(tmp.path()).unwrap().is_none());
        let identity = Identity {
            info: IdentityInfo {
                device_id: "0190f3a2-7c1e-7b3d-9f00-00000000d001".parse().unwrap(),
                account_id: "0190f3a2-7c1e-7b3d-9f00-00000000a001".parse().unwrap(),
                account: "acme".into(),
                server: "127.0.0.1:4433".into(),
                enrolled_at: UnixMillis(1),
            },
            key_der: vec![1, 2, 3],
            cert_der: vec![4],
            ca_der: vec![5],
        };
        identity.save(tmp.path()).unwrap();
        let loaded = Identity::load(tmp.path()).unwrap().unwrap();
        assert_eq!(loaded.info, identity.info);
        assert_eq!(loaded.key_der, identity.key_der);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for entry in std::fs::read_dir(Identity::dir(tmp.path())).unwrap() {
                let mode = entry.unwrap().metadata().unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600);
            }
        }
        Identity::remove(tmp.path()).unwrap();
        assert!(Identity::load(tmp.path()).unwrap().is_none());
    }
}
