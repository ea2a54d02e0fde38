//! The people of an account and their roles (schema v6; `roles.rs` says what each role may
//! do). The owner is the member whose id is the account's own; each device belongs to one
//! member and acts with that member's role.

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use synesis_proto::message::Role;
use synesis_proto::{AccountId, UnixMillis};

use super::StorageError;

/// One member as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub joined_at: UnixMillis,
    /// Devices of the member (revoked ones included).
    pub devices: u64,
}

/// Why a change to the members was refused.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    #[error("{0:?} is already a member of this account")]
    Exists(String),
    #[error("no member named {0:?} in this account")]
    NoSuchMember(String),
    #[error(
        "the owner's role cannot change, nor can the owner be removed (hand the account over first)"
    )]
    Owner,
    #[error("only the owner is an owner (hand the account over to change it)")]
    SecondOwner,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<rusqlite::Error> for MemberError {
    fn from(e: rusqlite::Error) -> Self {
        MemberError::Storage(e.into())
    }
}

pub fn role_str(role: Role) -> &'static str {
    match role {
        Role::Owner => "owner",
        Role::Editor => "editor",
        Role::Commenter => "commenter",
        Role::Viewer => "viewer",
    }
}

pub fn parse_role(s: &str) -> Option<Role> {
    match s {
        "owner" => Some(Role::Owner),
        "editor" => Some(Role::Editor),
        "commenter" => Some(Role::Commenter),
        "viewer" => Some(Role::Viewer),
        _ => None,
    }
}

/// Adds `name` to the account with `role` (not owner) under the new id `id`.
pub fn add(
    conn: &Connection,
    account: AccountId,
    id: &str,
    name: &str,
    role: Role,
    quota_tokens: Option<u64>,
    now: UnixMillis,
) -> Result<(), MemberError> {
    if role == Role::Owner {
        return Err(MemberError::SecondOwner);
    }
    let inserted = conn.execute(
        "INSERT INTO members (id, account_id, name, role, joined_at, quota_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (account_id, name) DO NOTHING",
        params![
            id,
            account.to_string(),
            name,
            role_str(role),
            now.0,
            quota_tokens.map(i64_of).transpose()?
        ],
    )?;
    if inserted == 0 {
        return Err(MemberError::Exists(name.to_owned()));
    }
    Ok(())
}

/// The id of the member `name` of the account, if present (and not removed).
pub fn id_of(conn: &Connection, account: AccountId, name: &str) -> Result<String, MemberError> {
    conn.query_row(
        "SELECT id FROM members WHERE account_id = ?1 AND name = ?2 AND removed_at IS NULL",
        params![account.to_string(), name],
        |r| r.get(0),
    )
    .optional()?
    .ok_or_else(|| MemberError::NoSuchMember(name.to_owned()))
}

/// Gives the member `name` another role (not owner; not the owner's).
pub fn set_role(
    conn: &Connection,
    account: AccountId,
    name: &str,
    role: Role,
) -> Result<(), MemberError> {
    if role == Role::Owner {
        return Err(MemberError::SecondOwner);
    }
    let id = id_of(conn, account, name)?;
    if id == account.to_string() {
        return Err(MemberError::Owner);
    }
    conn.execute(
        "UPDATE members SET role = ?2 WHERE id = ?1",
        params![id, role_str(role)],
    )?;
    Ok(())
}

/// Removes the member `name` and revokes its devices, in one transaction (their connections
/// are closed by the revocation watcher; every request is refused at once).
pub fn remove(
    conn: &mut Connection,
    account: AccountId,
    name: &str,
    now: UnixMillis,
) -> Result<u64, MemberError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let id = id_of(&tx, account, name)?;
    if id == account.to_string() {
        return Err(MemberError::Owner);
    }
    tx.execute(
        "UPDATE members SET removed_at = ?2 WHERE id = ?1",
        params![id, now.0],
    )?;
    let revoked = tx.execute(
        "UPDATE devices SET revoked_at = ?2 WHERE member_id = ?1 AND revoked_at IS NULL",
        params![id, now.0],
    )?;
    tx.commit()?;
    Ok(revoked as u64)
}

/// Makes a setup token enroll its device as the member `member_id`'s.
pub fn token_for(
    conn: &Connection,
    token_id: &[u8; 16],
    member_id: &str,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO setup_token_members (token_id, member_id) VALUES (?1, ?2)",
        params![token_id.as_slice(), member_id],
    )?;
    Ok(())
}

/// The account's members (not removed), the owner first, then by name.
pub fn list(conn: &Connection, account: AccountId) -> Result<Vec<MemberRow>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.id, m.name, m.role, m.joined_at,
                (SELECT COUNT(*) FROM devices d WHERE d.member_id = m.id)
         FROM members m WHERE m.account_id = ?1 AND m.removed_at IS NULL
         ORDER BY m.id != ?1, m.name",
    )?;
    let rows = stmt.query_map(params![account.to_string()], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, i64>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, name, role, joined, devices) = row?;
        out.push(MemberRow {
            id,
            name,
            role: parse_role(&role)
                .ok_or_else(|| StorageError::Corrupt(format!("unknown member role {role:?}")))?,
            joined_at: UnixMillis(joined),
            devices: u64::try_from(devices).unwrap_or(0),
        });
    }
    Ok(out)
}

fn i64_of(v: u64) -> Result<i64, StorageError> {
    i64::try_from(v).map_err(|_| StorageError::Corrupt(format!("{v} does not fit")))
}

/// The monthly token quota of the member `device` belongs to, and the tokens that member's
/// devices used since `month_start` (settled) or hold now (open holds, at their most): `None`
/// when the member has no quota. Read in the ledger's writer, with the hold it decides on.
pub fn quota_use(
    conn: &Connection,
    device: synesis_proto::DeviceId,
    month_start: UnixMillis,
) -> Result<Option<(u64, u64)>, StorageError> {
    let member: Option<(String, Option<i64>)> = conn
        .query_row(
            "SELECT m.id, m.quota_tokens FROM devices d JOIN members m ON m.id = d.member_id
             WHERE d.id = ?1",
            params![device.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((member, Some(quota))) = member else {
        return Ok(None);
    };
    // Settlements (kind 3) this month, and the holds still open, of the member's devices.
    let used: i64 = conn.query_row(
        "SELECT
           (SELECT COALESCE(SUM(e.input_tokens + e.output_tokens), 0)
              FROM ledger_entries e JOIN devices d ON d.id = e.device_id
             WHERE d.member_id = ?1 AND e.kind = 3 AND e.at >= ?2)
         + (SELECT COALESCE(SUM(e.input_tokens + e.output_tokens), 0)
              FROM ledger_open_holds h JOIN ledger_entries e ON e.seq = h.seq
              JOIN devices d ON d.id = e.device_id
             WHERE d.member_id = ?1)",
        params![member, month_start.0],
        |r| r.get(0),
    )?;
    let as_u64 =
        |v: i64| u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("{v} tokens")));
    Ok(Some((as_u64(quota)?, as_u64(used)?)))
}

/// An invitation to make.
#[derive(Debug, Clone)]
pub struct Invitation<'a> {
    pub account: AccountId,
    /// The request that makes it (the same request again issues its code again).
    pub request: synesis_proto::RequestId,
    pub token_id: [u8; 16],
    /// SHA-256 of the code's secret (the secret itself is never stored).
    pub secret_sha256: [u8; 32],
    pub invitee: &'a str,
    pub role: Role,
    /// The member's monthly token quota.
    pub quota_tokens: Option<u64>,
    pub created_by: synesis_proto::DeviceId,
    pub expires_at: UnixMillis,
}

/// What making an invitation came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invited {
    /// The code (new, or issued again with a new secret for the same request).
    Issued,
    /// The same request made an invitation that was used already.
    Used,
    /// The request id was used for another invitation.
    Conflict,
}

/// Records an invitation: a setup token for the account and what member it makes (one
/// transaction). The token id is derived from the request, so the same request again finds
/// it: unused, it gets the new secret (the earlier code stops working).
pub fn invite(
    conn: &mut Connection,
    i: &Invitation<'_>,
    now: UnixMillis,
) -> Result<Invited, MemberError> {
    if i.role == Role::Owner {
        return Err(MemberError::SecondOwner);
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let acct = i.account.to_string();
    let earlier: Option<(Vec<u8>, String, String)> = tx
        .query_row(
            "SELECT token_id, invitee, role FROM invites WHERE account_id = ?1 AND request_id = ?2",
            params![acct, i.request.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((token, invitee, role)) = earlier {
        if token != i.token_id || invitee != i.invitee || role != role_str(i.role) {
            return Ok(Invited::Conflict);
        }
        let reissued = tx.execute(
            "UPDATE setup_tokens SET secret_sha256 = ?2, expires_at = ?3
             WHERE id = ?1 AND used_at IS NULL",
            params![
                i.token_id.as_slice(),
                i.secret_sha256.as_slice(),
                i.expires_at.0
            ],
        )?;
        tx.commit()?;
        return Ok(if reissued == 1 {
            Invited::Issued
        } else {
            Invited::Used
        });
    }
    tx.execute(
        "INSERT INTO setup_tokens (id, account_id, secret_sha256, created_at, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            i.token_id.as_slice(),
            acct,
            i.secret_sha256.as_slice(),
            now.0,
            i.expires_at.0
        ],
    )?;
    tx.execute(
        "INSERT INTO invites (token_id, account_id, request_id, invitee, role, created_by, created_at,
             quota_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            i.token_id.as_slice(),
            acct,
            i.request.to_string(),
            i.invitee,
            role_str(i.role),
            i.created_by.to_string(),
            now.0,
            i.quota_tokens.map(i64_of).transpose()?
        ],
    )?;
    tx.commit()?;
    Ok(Invited::Issued)
}

/// At enrollment with an invitation's token (inside the enrollment's transaction): makes the
/// invitee a member (`member_id`) and the token's device theirs. `Ok(false)`: the token is no
/// invitation. An invitee who is a member already is refused.
pub(crate) fn accept_in(
    tx: &rusqlite::Transaction<'_>,
    token_id: &[u8; 16],
    member_id: &str,
    now: UnixMillis,
) -> Result<bool, MemberError> {
    let invite: Option<(String, String, String, Option<i64>)> = tx
        .query_row(
            "SELECT account_id, invitee, role, quota_tokens FROM invites WHERE token_id = ?1",
            params![token_id.as_slice()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((account, invitee, role, quota)) = invite else {
        return Ok(false);
    };
    // A member of that name exists (a removed one keeps its name: its history stays its own).
    let exists: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM members WHERE account_id = ?1 AND name = ?2)",
        params![account, invitee],
        |r| r.get(0),
    )?;
    if exists {
        return Err(MemberError::Exists(invitee));
    }
    tx.execute(
        "INSERT INTO members (id, account_id, name, role, joined_at, quota_tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![member_id, account, invitee, role, now.0, quota],
    )?;
    tx.execute(
        "INSERT INTO setup_token_members (token_id, member_id) VALUES (?1, ?2)",
        params![token_id.as_slice(), member_id],
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Accounts, Db, Devices, EnrollError, Enrollment, IssuedCert, sha256};
    use synesis_proto::message::Tier;
    use synesis_proto::{DeviceId, RequestId};

    fn enroll(
        db: &mut Db,
        token_id: [u8; 16],
        secret: &[u8; 32],
        n: u8,
        now: i64,
    ) -> Result<crate::storage::Enrolled, EnrollError> {
        let device = DeviceId::try_from_uuid(uuid::Uuid::from_u128(1_000 + u128::from(n))).unwrap();
        db.enroll(
            &Enrollment {
                token_id,
                secret,
                request: RequestId::from_parts(1, [n; 10]),
                device_name: "laptop",
                new_device_id: device,
            },
            UnixMillis(now),
            &mut |_| {
                Ok(IssuedCert {
                    der: vec![n; 8],
                    not_after: UnixMillis(i64::MAX),
                })
            },
        )
    }

    /// An invitation is a one-time setup token that makes its device a new member's: it works
    /// once, not after it expires (virtual clock), and not for someone who is a member already.
    #[test]
    fn an_invitation_works_once_and_not_after_it_expires() {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("cloud.db")).unwrap();
        let account = AccountId::try_from_uuid(uuid::Uuid::from_u128(7)).unwrap();
        db.create_account(account, "acme", Tier::Managed, UnixMillis(0))
            .unwrap();
        let owner_device = DeviceId::try_from_uuid(uuid::Uuid::from_u128(8)).unwrap();
        let secret = [9u8; 32];
        let invitation = |n: u8, invitee: &'static str, expires_at: i64| Invitation {
            account,
            request: RequestId::from_parts(2, [n; 10]),
            token_id: [n; 16],
            secret_sha256: sha256(&secret),
            invitee,
            role: Role::Commenter,
            quota_tokens: None,
            created_by: owner_device,
            expires_at: UnixMillis(expires_at),
        };
        let conn = db.connection_mut();
        assert_eq!(
            invite(conn, &invitation(1, "carl", 10_000), UnixMillis(0)).unwrap(),
            Invited::Issued
        );
        assert_eq!(
            invite(conn, &invitation(2, "dana", 10_000), UnixMillis(0)).unwrap(),
            Invited::Issued
        );
        assert_eq!(
            invite(conn, &invitation(3, "carl", 10_000), UnixMillis(0)).unwrap(),
            Invited::Issued
        );
        // Expired one millisecond ago: refused.
        assert!(matches!(
            enroll(&mut db, [2; 16], &secret, 2, 10_000),
            Err(EnrollError::Expired)
        ));
        // In time: carl is a commenter, once.
        let enrolled = enroll(&mut db, [1; 16], &secret, 1, 9_999).unwrap();
        let device = db.device(enrolled.device_id).unwrap().unwrap();
        assert_eq!(device.role, Role::Commenter);
        assert!(matches!(
            enroll(&mut db, [1; 16], &secret, 4, 9_999),
            Err(EnrollError::Used)
        ));
        // A second invitation for carl: he is a member already.
        assert!(matches!(
            enroll(&mut db, [3; 16], &secret, 5, 9_999),
            Err(EnrollError::BadRequest(m)) if m.contains("already a member")
        ));
        let names: Vec<_> = list(db.connection(), account)
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.role))
            .collect();
        assert_eq!(
            names,
            [
                ("acme".into(), Role::Owner),
                ("carl".into(), Role::Commenter)
            ]
        );
    }
}
