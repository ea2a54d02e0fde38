//! The registry's rules that do not depend on where it is stored: how a setup token is judged,
//! how a member's stored role is read, device names. Both backends (`sqlite`, `postgres`)
//! read their rows and ask these.

use synesis_proto::message::Role;
use synesis_proto::{AccountId, RequestId, UnixMillis};

use super::{EnrollError, StorageError, same_hash, sha256};

/// The longest device name kept, in bytes.
pub(crate) const DEVICE_NAME_BYTES_MAX: usize = 255;

pub(crate) fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, StorageError> {
    s.parse()
        .map_err(|_| StorageError::Corrupt(format!("bad id {s:?}")))
}

/// A setup token as stored, with its account's name.
pub(crate) struct Token {
    pub(crate) account_id: String,
    pub(crate) account_name: String,
    pub(crate) secret_hash: Vec<u8>,
    pub(crate) expires_at: i64,
    pub(crate) used_at: Option<i64>,
    pub(crate) used_by: Option<String>,
}

/// What a token allows this request: refusals need no write.
pub(crate) enum TokenCheck {
    /// The token was used by this very request: answer what it made.
    Replay {
        account_id: AccountId,
        account_name: String,
    },
    Fresh {
        account_id: AccountId,
        account_name: String,
    },
}

pub(crate) fn check_token(
    token: Option<Token>,
    secret: &[u8; 32],
    request: RequestId,
    now: UnixMillis,
) -> Result<TokenCheck, EnrollError> {
    let Some(t) = token else {
        return Err(EnrollError::Invalid);
    };
    if !same_hash(&t.secret_hash, &sha256(secret)) {
        return Err(EnrollError::Invalid);
    }
    let account_id: AccountId = parse_id(&t.account_id)?;
    if t.used_at.is_some() {
        if t.used_by.as_deref() == Some(request.to_string().as_str()) {
            return Ok(TokenCheck::Replay {
                account_id,
                account_name: t.account_name,
            });
        }
        return Err(EnrollError::Used);
    }
    if now.0 >= t.expires_at {
        return Err(EnrollError::Expired);
    }
    Ok(TokenCheck::Fresh {
        account_id,
        account_name: t.account_name,
    })
}

/// A member's role as stored. A device whose member is missing acts as no one: it is refused,
/// never read as the owner (schema v6 gave every earlier device its member).
pub(crate) fn member_role(role: Option<&str>) -> Result<Role, StorageError> {
    match role {
        None => Err(StorageError::Corrupt(
            "a device belongs to no member".to_owned(),
        )),
        Some("owner") => Ok(Role::Owner),
        Some("editor") => Ok(Role::Editor),
        Some("commenter") => Ok(Role::Commenter),
        Some("viewer") => Ok(Role::Viewer),
        Some(other) => Err(StorageError::Corrupt(format!(
            "unknown member role {other:?}"
        ))),
    }
}
