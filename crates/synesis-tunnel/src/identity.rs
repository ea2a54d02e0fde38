//! The device's identity: its key (made on the device, never sent), the certificate the cloud's
//! CA signed for it, the CA itself, and who it is. All under the data directory, in
//! `identity/`, every file mode 0600.
//!
//! A device may belong to more than one account: the one it enrolled in first, and any it
//! joined later with an invitation's code (`synesis cloud accept`). Each is an identity of its
//! own (its own key, certificate and device id on the cloud), kept in a *home* of its own: the
//! data directory for the first, `accounts/<account id>/` for the others. Every function here
//! that takes a `data_dir` takes such a home. [`Identity::select`] says which one a command
//! acts in: the account it names, else the one `synesis cloud use` chose (the file `account`),
//! else the first.

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
/// Homes of the accounts joined after the first, one per account id.
const ACCOUNTS: &str = "accounts";
/// The home of an enrollment into another account not finished yet.
const JOINING: &str = "joining";
/// Which account commands act in: an account id (absent: the first).
const ACTIVE: &str = "account";
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
    #[error("this device is in no account named {0:?} (`synesis cloud accounts` lists them)")]
    UnknownAccount(String),
    #[error("this device is in more than one account named {0:?}; name it by its id")]
    AmbiguousAccount(String),
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
    /// The cloud's other nodes (`host:port`), from the token and the last `Welcome`: where the
    /// device goes when `server` cannot be reached ([`Nodes`](crate::nodes::Nodes)).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
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

    /// The home of the identity in `account`, joined after the first.
    pub fn joined_home(data_dir: &Path, account: AccountId) -> PathBuf {
        data_dir.join(ACCOUNTS).join(account.to_string())
    }

    /// The home of an enrollment into another account, until the cloud says which account.
    pub fn joining_home(data_dir: &Path) -> PathBuf {
        data_dir.join(ACCOUNTS).join(JOINING)
    }

    /// Every identity on this device with its home: the first, then the joined ones by account
    /// id.
    pub fn all(data_dir: &Path) -> Result<Vec<(PathBuf, Identity)>, IdentityError> {
        let mut found = Vec::new();
        if let Some(first) = Self::load(data_dir)? {
            found.push((data_dir.to_path_buf(), first));
        }
        let accounts = data_dir.join(ACCOUNTS);
        let entries = match std::fs::read_dir(&accounts) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(source) => {
                return Err(IdentityError::Io {
                    path: accounts,
                    source,
                });
            }
        };
        let mut joined = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| IdentityError::Io {
                path: accounts.clone(),
                source,
            })?;
            let home = entry.path();
            // Only homes named by an account id (never `joining`, never a stray file).
            let named = entry
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<AccountId>().ok());
            if let Some(account) = named
                && let Some(identity) = Self::load(&home)?
                && identity.info.account_id == account
            {
                joined.push((home, identity));
            }
        }
        joined.sort_by_key(|(_, i)| i.info.account_id.to_string());
        found.extend(joined);
        Ok(found)
    }

    /// The home of the identity a command acts in: the account `choice` names (its name or id)
    /// when given; else the one `synesis cloud use` chose, while this device is still in it;
    /// else the first (or, when the first was logged out of, the first joined). With no
    /// identity at all: `data_dir`, where `load` finds none.
    pub fn select(data_dir: &Path, choice: Option<&str>) -> Result<PathBuf, IdentityError> {
        let active = Self::active(data_dir)?;
        if choice.is_none() && active.is_none() && Self::dir(data_dir).join(INFO).exists() {
            return Ok(data_dir.to_path_buf());
        }
        let all = Self::all(data_dir)?;
        let Some(wanted) = choice else {
            let chosen = all
                .iter()
                .find(|(_, i)| Some(i.info.account_id.to_string()) == active)
                .or(all.first());
            return Ok(chosen.map_or_else(|| data_dir.to_path_buf(), |(home, _)| home.clone()));
        };
        let mut matching = all
            .into_iter()
            .filter(|(_, i)| i.info.account_id.to_string() == wanted || i.info.account == wanted);
        match (matching.next(), matching.next()) {
            (Some((home, _)), None) => Ok(home),
            (Some(_), Some(_)) => Err(IdentityError::AmbiguousAccount(wanted.to_owned())),
            (None, _) => Err(IdentityError::UnknownAccount(wanted.to_owned())),
        }
    }

    /// The account id `synesis cloud use` chose, if any (it may since have been left).
    pub fn active(data_dir: &Path) -> Result<Option<String>, IdentityError> {
        match std::fs::read_to_string(data_dir.join(ACTIVE)) {
            Ok(id) => Ok(Some(id.trim().to_owned())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(IdentityError::Io {
                path: data_dir.join(ACTIVE),
                source,
            }),
        }
    }

    /// Makes `account` the one commands act in (`None`: the first), atomically.
    pub fn set_active(data_dir: &Path, account: Option<AccountId>) -> Result<(), IdentityError> {
        let path = data_dir.join(ACTIVE);
        let done = match account {
            Some(id) => write_secret_file(&path, id.to_string().as_bytes()),
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                other => other,
            },
        };
        done.map_err(|source| IdentityError::Io { path, source })
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

    /// Rewrites `identity.json` (the nodes learned from a `Welcome`), atomically.
    pub fn save_info(data_dir: &Path, info: &IdentityInfo) -> Result<(), IdentityError> {
        let path = Self::dir(data_dir).join(INFO);
        let bytes =
            serde_json::to_vec_pretty(info).map_err(|_| IdentityError::Damaged(path.clone()))?;
        write_secret_file(&path, &bytes).map_err(|source| IdentityError::Io { path, source })
    }

    /// The nodes this identity dials, its token's first.
    pub fn nodes(&self) -> crate::nodes::Nodes {
        crate::nodes::Nodes::new(&self.info.server, &self.info.nodes)
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
        // A joined account's home holds nothing else.
        if data_dir.parent().is_some_and(|p| p.ends_with(ACCOUNTS)) {
            let _ = std::fs::remove_dir(data_dir);
        }
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
                nodes: Vec::new(),
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

    fn in_account(id: &str, name: &str) -> Identity {
        Identity {
            info: IdentityInfo {
                device_id: "0190f3a2-7c1e-7b3d-9f00-00000000d001".parse().unwrap(),
                account_id: id.parse().unwrap(),
                account: name.into(),
                server: "127.0.0.1:4433".into(),
                nodes: Vec::new(),
                enrolled_at: UnixMillis(1),
            },
            key_der: vec![1],
            cert_der: vec![2],
            ca_der: vec![3],
        }
    }

    #[test]
    fn selects_the_named_account_else_the_chosen_one_else_the_first() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path();
        let (a, b) = (
            "0190f3a2-7c1e-7b3d-9f00-00000000a001",
            "0190f3a2-7c1e-7b3d-9f00-00000000a002",
        );
        // Nothing enrolled: the data directory, where nothing loads.
        assert_eq!(Identity::select(data, None).unwrap(), data);
        in_account(a, "acme").save(data).unwrap();
        let joined = Identity::joined_home(data, b.parse().unwrap());
        in_account(b, "globex").save(&joined).unwrap();
        // A half-made join is never listed.
        std::fs::create_dir_all(Identity::joining_home(data)).unwrap();

        let listed: Vec<String> = Identity::all(data)
            .unwrap()
            .into_iter()
            .map(|(_, i)| i.info.account)
            .collect();
        assert_eq!(listed, ["acme", "globex"]);
        assert_eq!(Identity::select(data, None).unwrap(), data);
        assert_eq!(Identity::select(data, Some("globex")).unwrap(), joined);
        assert_eq!(Identity::select(data, Some(b)).unwrap(), joined);
        assert_eq!(Identity::select(data, Some("acme")).unwrap(), data);
        assert!(matches!(
            Identity::select(data, Some("initech")),
            Err(IdentityError::UnknownAccount(_))
        ));

        Identity::set_active(data, Some(b.parse().unwrap())).unwrap();
        assert_eq!(Identity::select(data, None).unwrap(), joined);
        assert_eq!(Identity::select(data, Some("acme")).unwrap(), data);
        // Leaving the chosen account falls back to the first; leaving the first, to a joined one.
        Identity::remove(&joined).unwrap();
        assert!(!joined.exists());
        assert_eq!(Identity::select(data, None).unwrap(), data);
        in_account(b, "globex").save(&joined).unwrap();
        Identity::set_active(data, None).unwrap();
        Identity::remove(data).unwrap();
        assert_eq!(Identity::select(data, None).unwrap(), joined);
    }
}
