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
    now: UnixMillis,
) -> Result<(), MemberError> {
    if role == Role::Owner {
        return Err(MemberError::SecondOwner);
    }
    let inserted = conn.execute(
        "INSERT INTO members (id, account_id, name, role, joined_at) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (account_id, name) DO NOTHING",
        params![id, account.to_string(), name, role_str(role), now.0],
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
