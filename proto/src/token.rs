//! The setup token: one string that lets `synesis cloud login TOKEN` enroll a device with
//! nothing else to type.
//!
//! Format (PROTOCOL.md §2, "Enrollment"):
//! `SYN1:<server>:<ca sha-256, 64 hex>:<token id, 32 hex>:<secret, 64 hex>`.
//! `<server>` is `host:port` (it may itself hold colons: an IPv6 address in brackets), so the
//! token is split from the right.

use std::fmt;
use std::str::FromStr;

use crate::ids::Sha256;

const PREFIX: &str = "SYN1:";

#[derive(Clone, PartialEq, Eq)]
pub struct SetupToken {
    /// Where the cloud listens, `host:port`.
    pub server: String,
    /// The cloud's other nodes serving when the token was made (`host:port` each): where the
    /// device goes when `server` cannot be reached. Written after `server`, comma-separated.
    pub nodes: Vec<String>,
    /// SHA-256 of the cloud CA's certificate (DER): the device pins it during enrollment.
    pub ca_sha256: Sha256,
    /// Names the token on the cloud (not secret).
    pub token_id: [u8; 16],
    /// The one-time secret; the cloud stores only its SHA-256.
    pub secret: [u8; 32],
}

impl fmt::Debug for SetupToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SetupToken")
            .field("server", &self.server)
            .field("nodes", &self.nodes)
            .field("ca_sha256", &self.ca_sha256)
            .field("token_id", &hex(&self.token_id))
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("not a Synesis setup token (it should start with {PREFIX})")]
    Prefix,
    #[error("the setup token is incomplete or damaged: {0}")]
    Damaged(&'static str),
}

impl SetupToken {
    /// The secret as the device presents it in `EnrollRequest.token_secret`:
    /// `<token id hex>.<secret hex>`.
    pub fn presented_secret(&self) -> String {
        format!("{}.{}", hex(&self.token_id), hex(&self.secret))
    }

    /// Splits a presented secret back into the token id and the secret.
    pub fn parse_presented(s: &str) -> Option<([u8; 16], [u8; 32])> {
        let (id, secret) = s.split_once('.')?;
        Some((unhex(id)?, unhex(secret)?))
    }
}

impl fmt::Display for SetupToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut servers = self.server.clone();
        for node in &self.nodes {
            servers.push(',');
            servers.push_str(node);
        }
        write!(
            f,
            "{PREFIX}{}:{}:{}:{}",
            servers,
            self.ca_sha256,
            hex(&self.token_id),
            hex(&self.secret)
        )
    }
}

impl FromStr for SetupToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<SetupToken, TokenError> {
        let rest = s.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let mut parts = rest.rsplitn(4, ':');
        let secret = parts
            .next()
            .and_then(unhex)
            .ok_or(TokenError::Damaged("secret"))?;
        let token_id = parts
            .next()
            .and_then(unhex)
            .ok_or(TokenError::Damaged("token id"))?;
        let ca = parts
            .next()
            .and_then(unhex)
            .ok_or(TokenError::Damaged("CA fingerprint"))?;
        let mut servers = parts
            .next()
            .ok_or(TokenError::Damaged("server address"))?
            .split(',');
        let server = servers
            .next()
            .filter(|s| s.contains(':'))
            .ok_or(TokenError::Damaged("server address"))?;
        let nodes = servers
            .map(|s| {
                s.contains(':')
                    .then(|| s.to_owned())
                    .ok_or(TokenError::Damaged("node address"))
            })
            .collect::<Result<_, _>>()?;
        Ok(SetupToken {
            server: server.to_owned(),
            nodes,
            ca_sha256: Sha256(ca),
            token_id,
            secret,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2 || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(server: &str) -> SetupToken {
        SetupToken {
            server: server.into(),
            nodes: Vec::new(),
            ca_sha256: Sha256([0xab; 32]),
            token_id: [1; 16],
            secret: [2; 32],
        }
    }

    #[test]
    fn carries_the_other_nodes_after_the_first() {
        let mut t = token("10.0.0.1:4433");
        t.nodes = vec!["10.0.0.2:4433".into(), "[::1]:4433".into()];
        let text = t.to_string();
        assert!(
            text.contains("10.0.0.1:4433,10.0.0.2:4433,[::1]:4433:"),
            "{text}"
        );
        assert_eq!(text.parse::<SetupToken>(), Ok(t));
        let bad = text.replace(",10.0.0.2:4433", ",nowhere");
        assert_eq!(
            bad.parse::<SetupToken>(),
            Err(TokenError::Damaged("node address"))
        );
    }

    #[test]
    fn round_trips_with_any_server_form() {
        for server in ["127.0.0.1:4433", "[::1]:4433", "cloud.example.com:443"] {
            let t = token(server);
            assert_eq!(t.to_string().parse::<SetupToken>(), Ok(t));
        }
    }

    #[test]
    fn damage_is_named() {
        let good = token("127.0.0.1:1").to_string();
        assert_eq!("hello".parse::<SetupToken>(), Err(TokenError::Prefix));
        assert_eq!(
            good[..good.len() - 1].parse::<SetupToken>(),
            Err(TokenError::Damaged("secret"))
        );
        let tampered = good.replacen(":abab", ":zzab", 1);
        assert_eq!(
            tampered.parse::<SetupToken>(),
            Err(TokenError::Damaged("CA fingerprint"))
        );
        assert_eq!(
            "SYN1:".parse::<SetupToken>(),
            Err(TokenError::Damaged("secret"))
        );
    }

    #[test]
    fn the_secret_never_shows_in_debug_output() {
        let t = token("h:1");
        assert!(!format!("{t:?}").contains(&hex(&t.secret)));
        let presented = t.presented_secret();
        assert_eq!(
            SetupToken::parse_presented(&presented),
            Some((t.token_id, t.secret))
        );
    }
}
