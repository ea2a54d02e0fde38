//! Who may use the HTTP API: the holder of its key.
//!
//! An enrolled device's API spends the account's money, and a TCP port on loopback is open to
//! every user of the machine (unlike the local socket, 0600). So the API has a key: the one
//! given (`--api-key-file`, `SYNESIS_API_KEY`), else the device's own, made on the service's
//! first start in [`API_KEY_FILE`] in the config directory (0600; `synesis paths` shows it).
//! A device in no account has nothing to spend and may be used without the key on loopback —
//! until it enrolls: the key is asked for from the first request after that
//! ([`KeyRequired::WhenEnrolled`]). `/health` answers without it (it spends nothing).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::Api;
use super::pieces::ApiError;

/// The device's own key, in the config directory.
pub(crate) const API_KEY_FILE: &str = "api-key";
/// Random bytes in a key made here (256 bits), written as hex after [`API_KEY_PREFIX`].
const API_KEY_RANDOM_BYTES: usize = 32;
/// Makes the key recognisable in a file or a leaked log line.
const API_KEY_PREFIX: &str = "syn-";

/// When requests must carry the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyRequired {
    /// On every request (but `/health`).
    Always,
    /// Once this device is in an account (looked at on each request: `synesis cloud login`
    /// while the service runs makes the API spend from then on).
    WhenEnrolled,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ApiKeyError {
    #[error("cannot read the API key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the API key {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The key in `path`, made there (0600) when the file is missing or empty. A file made by two
/// services starting at once holds the first one's key, which both use.
pub(crate) fn load_or_create(path: &Path) -> Result<String, ApiKeyError> {
    use std::io::Write;
    let read = |path: &Path| {
        std::fs::read_to_string(path)
            .map(|text| text.lines().next().unwrap_or_default().trim().to_owned())
            .map_err(|source| ApiKeyError::Read {
                path: path.to_owned(),
                source,
            })
    };
    let write_error = |source: std::io::Error| ApiKeyError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        crate::secure_fs::private_dir(dir).map_err(|e| ApiKeyError::Write {
            path: path.to_owned(),
            source: std::io::Error::other(e.to_string()),
        })?;
    }
    let key = new_key();
    match crate::secure_fs::private_file_options()
        .write(true)
        .create_new(true)
        .open(path)
    {
        Ok(mut file) => {
            file.write_all(format!("{key}\n").as_bytes())
                .and_then(|()| file.sync_all())
                .map_err(write_error)?;
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let found = read(path)?;
            if !found.is_empty() {
                return Ok(found);
            }
            // Left empty by a start that died while writing it.
            synesis_wire::files::write_secret_file(path, format!("{key}\n").as_bytes())
                .map_err(write_error)?;
            Ok(key)
        }
        Err(e) => Err(write_error(e)),
    }
}

/// A new key: `syn-` and 64 hex digits (the randomness enters here, at the edge).
fn new_key() -> String {
    let bytes: [u8; API_KEY_RANDOM_BYTES] = rand::random();
    let mut key = String::with_capacity(API_KEY_PREFIX.len() + 2 * API_KEY_RANDOM_BYTES);
    key.push_str(API_KEY_PREFIX);
    for b in bytes {
        key.push_str(&format!("{b:02x}"));
    }
    key
}

/// Lets a request through only with the key (`Authorization: Bearer KEY`, or `x-api-key: KEY`
/// as Anthropic's clients send it), when one is needed.
pub(super) async fn authorize(
    State(api): State<Arc<Api>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(key) = api.options.api_key.as_deref() else {
        return next.run(request).await;
    };
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    if api.options.key_required == KeyRequired::WhenEnrolled && !enrolled(&api.paths.data.path) {
        return next.run(request).await;
    }
    let headers = request.headers();
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer)
        .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()));
    match presented {
        Some(p) if same_key(p, key) => next.run(request).await,
        _ => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "invalid_api_key",
            "a valid API key is required (Authorization: Bearer KEY, or x-api-key: KEY); on the device, `synesis paths` shows the file that holds it",
        )
        .into_response(),
    }
}

/// Whether this device is in an account (any of them); a data directory that cannot be read
/// counts as enrolled, so a failure never opens the API.
fn enrolled(data: &Path) -> bool {
    !synesis_tunnel::Identity::all(data).is_ok_and(|all| all.is_empty())
}

/// The credentials of `Bearer CREDENTIALS` (the scheme's case does not matter, RFC 9110).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(credentials.trim())
}

/// Compares the two keys' SHA-256 digests without stopping at the first difference: neither
/// where they differ nor the key's length shows in the time taken.
fn same_key(presented: &str, key: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (Sha256::digest(presented), Sha256::digest(key));
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code

    use super::*;

    #[test]
    fn keys_compare_whole_and_bearer_is_any_case() {
        let key = new_key();
        assert!(key.starts_with("syn-") && key.len() == 4 + 64, "{key}");
        assert_ne!(key, new_key());
        assert!(same_key(&key, &key));
        assert!(!same_key(&key[..key.len() - 1], &key));
        assert!(!same_key("", &key));
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
    }

    #[test]
    fn the_key_file_is_made_once_private_and_then_read() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config").join(API_KEY_FILE);
        let key = load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            load_or_create(&path).unwrap(),
            key,
            "the same key on the next start"
        );
        std::fs::write(&path, "").unwrap();
        let remade = load_or_create(&path).unwrap();
        assert_ne!(remade, key, "an empty file gets a new key");
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), remade);
    }
}
