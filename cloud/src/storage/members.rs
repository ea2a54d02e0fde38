//! The people of an account and their roles (schema v6–v9; `roles.rs` says what each role
//! may do). An account has one owner (the member whose role is `owner`; at first the member
//! whose id is the account's own, until a handover); each device belongs to one member and
//! acts with that member's role. Every change to the members is written to the audit log in
//! the transaction that makes it.

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
#[allow(clippy::too_many_arguments)]
pub fn add(
    conn: &Connection,
    account: AccountId,
    id: &str,
    name: &str,
    role: Role,
    quota_tokens: Option<u64>,
    actor: &str,
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
    audit(
        conn,
        account,
        now,
        actor,
        "member_added",
        name,
        role_str(role),
    )?;
    Ok(())
}

/// The id of the member `name` of the account, if present (and not removed).
pub fn id_of(conn: &Connection, account: AccountId, name: &str) -> Result<String, MemberError> {
    Ok(member(conn, account, name)?.0)
}

/// The id and role of the member `name` of the account (not removed).
fn member(
    conn: &Connection,
    account: AccountId,
    name: &str,
) -> Result<(String, Role), MemberError> {
    let row: Option<(String, String)> = conn
        .query_row(
            "SELECT id, role FROM members WHERE account_id = ?1 AND name = ?2 AND removed_at IS NULL",
            params![account.to_string(), name],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let (id, role) = row.ok_or_else(|| MemberError::NoSuchMember(name.to_owned()))?;
    let role = parse_role(&role)
        .ok_or_else(|| StorageError::Corrupt(format!("unknown member role {role:?}")))?;
    Ok((id, role))
}

/// Writes one line of the account's audit log (inside the caller's transaction).
pub fn audit(
    conn: &Connection,
    account: AccountId,
    at: UnixMillis,
    actor: &str,
    action: &str,
    subject: &str,
    detail: &str,
) -> Result<(), StorageError> {
    conn.execute(
        "INSERT INTO audit (account_id, at, actor, action, subject, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![account.to_string(), at.0, actor, action, subject, detail],
    )?;
    Ok(())
}

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AuditRow {
    pub at: UnixMillis,
    pub actor: String,
    pub action: String,
    pub subject: String,
    pub detail: String,
}

pub fn audit_log(conn: &Connection, account: AccountId) -> Result<Vec<AuditRow>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT at, actor, action, subject, detail FROM audit WHERE account_id = ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map(params![account.to_string()], |r| {
        Ok(AuditRow {
            at: UnixMillis(r.get(0)?),
            actor: r.get(1)?,
            action: r.get(2)?,
            subject: r.get(3)?,
            detail: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The account's invitations not yet accepted, withdrawn or expired at `now`, oldest first.
pub fn pending_invites(
    conn: &Connection,
    account: AccountId,
    now: UnixMillis,
) -> Result<Vec<synesis_proto::message::PendingInvite>, StorageError> {
    let mut stmt = conn.prepare_cached(
        "SELECT i.invitee, i.role, i.quota_tokens, t.expires_at FROM invites i
         JOIN setup_tokens t ON t.id = i.token_id
         WHERE i.account_id = ?1 AND t.used_at IS NULL AND t.expires_at > ?2
         ORDER BY i.created_at",
    )?;
    let rows = stmt.query_map(params![account.to_string(), now.0], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, Option<i64>>(2)?,
            r.get::<_, i64>(3)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (invitee, role, quota, expires) = row?;
        out.push(synesis_proto::message::PendingInvite {
            invitee,
            role: parse_role(&role)
                .ok_or_else(|| StorageError::Corrupt(format!("unknown member role {role:?}")))?,
            quota_tokens: quota.and_then(|q| u64::try_from(q).ok()),
            expires_at: UnixMillis(expires),
        });
    }
    Ok(out)
}

/// Withdraws the invitee's pending invitations: their codes count as used. How many.
pub fn revoke_invites(
    conn: &mut Connection,
    account: AccountId,
    invitee: &str,
    actor: &str,
    now: UnixMillis,
) -> Result<u64, StorageError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let revoked = tx.execute(
        "UPDATE setup_tokens SET used_at = ?3, used_by_request = 'revoked'
         WHERE used_at IS NULL AND expires_at > ?3 AND id IN
           (SELECT token_id FROM invites WHERE account_id = ?1 AND invitee = ?2)",
        params![account.to_string(), invitee, now.0],
    )?;
    if revoked > 0 {
        audit(&tx, account, now, actor, "invite_revoked", invitee, "")?;
    }
    tx.commit()?;
    Ok(revoked as u64)
}

/// How long a handover offer stands.
pub const HANDOVER_FOR_MS: i64 = 7 * 24 * 3_600_000;

/// The owner offers the account to the member `to` (replacing an earlier offer); when it
/// lapses.
pub fn offer_handover(
    conn: &mut Connection,
    account: AccountId,
    actor: &str,
    to: &str,
    now: UnixMillis,
) -> Result<UnixMillis, MemberError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (id, role) = member(&tx, account, to)?;
    if role == Role::Owner {
        return Err(MemberError::Owner);
    }
    let expires_at = UnixMillis(now.0.saturating_add(HANDOVER_FOR_MS));
    tx.execute(
        "INSERT INTO handovers (account_id, to_member, offered_at, expires_at) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (account_id) DO UPDATE SET to_member = ?2, offered_at = ?3, expires_at = ?4",
        params![account.to_string(), id, now.0, expires_at.0],
    )?;
    audit(&tx, account, now, actor, "handover_offered", to, "")?;
    tx.commit()?;
    Ok(expires_at)
}

/// Why a handover could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("no handover of this account is offered to you")]
    NotOffered,
    #[error("the handover offer lapsed (offers stand 7 days); ask the owner to offer it again")]
    Lapsed,
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<rusqlite::Error> for HandoverError {
    fn from(e: rusqlite::Error) -> Self {
        HandoverError::Storage(e.into())
    }
}

/// The member `device` belongs to takes the account over, if it was offered to them and the
/// offer stands: they become the owner and the owner an editor (one transaction). The account's
/// name and the former owner's.
pub fn accept_handover(
    conn: &mut Connection,
    account: AccountId,
    device: synesis_proto::DeviceId,
    now: UnixMillis,
) -> Result<(String, String), HandoverError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let offer: Option<(String, i64, String)> = tx
        .query_row(
            "SELECT h.to_member, h.expires_at, m.name FROM handovers h
             JOIN devices d ON d.member_id = h.to_member
             JOIN members m ON m.id = h.to_member
             WHERE h.account_id = ?1 AND d.id = ?2 AND m.removed_at IS NULL",
            params![account.to_string(), device.to_string()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((to, expires_at, to_name)) = offer else {
        return Err(HandoverError::NotOffered);
    };
    if now.0 >= expires_at {
        return Err(HandoverError::Lapsed);
    }
    let (former_id, former): (String, String) = tx.query_row(
        "SELECT id, name FROM members WHERE account_id = ?1 AND role = 'owner'",
        params![account.to_string()],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    // Both roles change: tokens either of them holds were issued for rights they no longer have.
    end_tokens_of(&tx, &former_id, now)?;
    end_tokens_of(&tx, &to, now)?;
    tx.execute(
        "UPDATE members SET role = 'editor' WHERE account_id = ?1 AND role = 'owner'",
        params![account.to_string()],
    )?;
    tx.execute(
        "UPDATE members SET role = 'owner' WHERE id = ?1",
        params![to],
    )?;
    tx.execute(
        "DELETE FROM handovers WHERE account_id = ?1",
        params![account.to_string()],
    )?;
    audit(
        &tx,
        account,
        now,
        &device.to_string(),
        "handover_accepted",
        &to_name,
        &format!("former owner {former} is now an editor"),
    )?;
    let name: String = tx.query_row(
        "SELECT name FROM accounts WHERE id = ?1",
        params![account.to_string()],
        |r| r.get(0),
    )?;
    tx.commit()?;
    Ok((name, former))
}

/// Gives the member `name` another role (not owner; not the owner's).
pub fn set_role(
    conn: &Connection,
    account: AccountId,
    name: &str,
    role: Role,
    actor: &str,
    now: UnixMillis,
) -> Result<(), MemberError> {
    if role == Role::Owner {
        return Err(MemberError::SecondOwner);
    }
    let tx = conn.unchecked_transaction()?;
    let (id, current) = member(&tx, account, name)?;
    if current == Role::Owner {
        return Err(MemberError::Owner);
    }
    tx.execute(
        "UPDATE members SET role = ?2 WHERE id = ?1",
        params![id, role_str(role)],
    )?;
    end_tokens_of(&tx, &id, now)?;
    audit(
        &tx,
        account,
        now,
        actor,
        "role_changed",
        name,
        role_str(role),
    )?;
    tx.commit()?;
    Ok(())
}

/// Removes the member `name` and revokes its devices, in one transaction (their connections
/// are closed by the revocation watcher; every request is refused at once).
pub fn remove(
    conn: &mut Connection,
    account: AccountId,
    name: &str,
    actor: &str,
    now: UnixMillis,
) -> Result<u64, MemberError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (id, role) = member(&tx, account, name)?;
    if role == Role::Owner {
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
    tx.execute("DELETE FROM handovers WHERE to_member = ?1", params![id])?;
    end_tokens_of(&tx, &id, now)?;
    audit(
        &tx,
        account,
        now,
        actor,
        "member_removed",
        name,
        &format!("{revoked} devices revoked"),
    )?;
    tx.commit()?;
    Ok(revoked as u64)
}

/// The member a setup token enrolls its device for, if that member is still one.
pub(crate) fn token_member(
    conn: &Connection,
    token_id: &[u8; 16],
) -> Result<Option<String>, StorageError> {
    Ok(conn
        .query_row(
            "SELECT s.member_id FROM setup_token_members s JOIN members m ON m.id = s.member_id
             WHERE s.token_id = ?1 AND m.removed_at IS NULL",
            params![token_id.as_slice()],
            |r| r.get(0),
        )
        .optional()?)
}

/// Ends every unused setup token of the member `member_id` (they count as used, as a withdrawn
/// invitation does): a token carries the rights its member had when it was issued, so any
/// change of those rights — a new role, a handover, removal — must not leave one lying
/// around. How many. Inside the caller's transaction.
pub(crate) fn end_tokens_of(
    conn: &Connection,
    member_id: &str,
    now: UnixMillis,
) -> Result<u64, StorageError> {
    let ended = conn.execute(
        "UPDATE setup_tokens SET used_at = ?2, used_by_request = 'revoked'
         WHERE used_at IS NULL AND id IN
           (SELECT token_id FROM setup_token_members WHERE member_id = ?1)",
        params![member_id, now.0],
    )?;
    Ok(ended as u64)
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
         ORDER BY m.role != 'owner', m.name",
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
              FROM ledger_open_holds h
              JOIN ledger_entries e ON e.account_id = h.account_id AND e.seq = h.seq
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
    audit(
        &tx,
        i.account,
        now,
        &i.created_by.to_string(),
        "invited",
        i.invitee,
        role_str(i.role),
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
    let account_id: AccountId = account
        .parse()
        .map_err(|_| StorageError::Corrupt(format!("an account id {account:?}")))?;
    audit(
        tx,
        account_id,
        now,
        "invitation",
        "member_joined",
        &invitee,
        &role,
    )?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::{Accounts, Db, Devices, EnrollError, Enrollment, IssuedCert, sha256};
    use synesis_proto::message::Tier;
    use synesis_proto::{DeviceId, RequestId};

    /// A database in a temporary directory (kept while the handle lives) with the account
    /// `acme` (Managed).
    fn acme() -> (tempfile::TempDir, Db, AccountId) {
        let dir = tempfile::tempdir().unwrap();
        let mut db = Db::open(&dir.path().join("cloud.db")).unwrap();
        let account = AccountId::try_from_uuid(uuid::Uuid::from_u128(7)).unwrap();
        db.create_account(account, "acme", Tier::Managed, UnixMillis(0))
            .unwrap();
        (dir, db, account)
    }

    /// A setup token `[n; 16]` for the member `member` (`None`: the owner), valid until 1 s.
    fn token(db: &mut Db, account: AccountId, n: u8, member: Option<&str>, secret: &[u8; 32]) {
        db.create_token(
            account,
            [n; 16],
            secret,
            member,
            UnixMillis(0),
            UnixMillis(1_000),
        )
        .unwrap();
    }

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
        let (_dir, mut db, account) = acme();
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

    /// A handover offered on day 0 is taken on day 6; one offered again and taken on day 8 is
    /// refused (virtual clock); only the member offered can take it.
    #[test]
    fn a_handover_stands_seven_days_and_only_for_the_member_offered() {
        let (_dir, mut db, account) = acme();
        let secret = [9u8; 32];
        let owner_device = DeviceId::try_from_uuid(uuid::Uuid::from_u128(8)).unwrap();
        for (n, who) in [(1u8, "ada"), (2, "bob")] {
            let invitation = Invitation {
                account,
                request: RequestId::from_parts(2, [n; 10]),
                token_id: [n; 16],
                secret_sha256: sha256(&secret),
                invitee: who,
                role: Role::Editor,
                quota_tokens: None,
                created_by: owner_device,
                expires_at: UnixMillis(i64::MAX),
            };
            invite(db.connection_mut(), &invitation, UnixMillis(0)).unwrap();
        }
        let ada = enroll(&mut db, [1; 16], &secret, 1, 10).unwrap().device_id;
        let bob = enroll(&mut db, [2; 16], &secret, 2, 10).unwrap().device_id;
        const DAY: i64 = 24 * 3_600_000;

        let conn = db.connection_mut();
        offer_handover(conn, account, "owner-device", "ada", UnixMillis(0)).unwrap();
        assert!(matches!(
            accept_handover(conn, account, bob, UnixMillis(DAY)),
            Err(HandoverError::NotOffered)
        ));
        let (name, former) = accept_handover(conn, account, ada, UnixMillis(6 * DAY)).unwrap();
        assert_eq!((name.as_str(), former.as_str()), ("acme", "acme"));
        assert_eq!(db.device(ada).unwrap().unwrap().role, Role::Owner);
        let roles: Vec<_> = list(db.connection(), account)
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.role))
            .collect();
        assert_eq!(
            roles,
            [
                ("ada".into(), Role::Owner),
                ("acme".into(), Role::Editor),
                ("bob".into(), Role::Editor)
            ]
        );

        // Ada offers it to Bob on day 10; day 18 is too late.
        let conn = db.connection_mut();
        offer_handover(conn, account, "ada-device", "bob", UnixMillis(10 * DAY)).unwrap();
        assert!(matches!(
            accept_handover(conn, account, bob, UnixMillis(18 * DAY)),
            Err(HandoverError::Lapsed)
        ));
        assert_eq!(db.device(bob).unwrap().unwrap().role, Role::Editor);
        let actions: Vec<_> = audit_log(db.connection(), account)
            .unwrap()
            .into_iter()
            .map(|r| r.action)
            .collect();
        assert_eq!(
            actions,
            [
                "invited",
                "invited",
                "member_joined",
                "member_joined",
                "handover_offered",
                "handover_accepted",
                "handover_offered"
            ]
        );
    }

    /// The review's takeover (issue 23, item 1): the owner keeps a spare setup token, hands the
    /// account to Ada, and Ada removes the former owner. The spare token enrolls nothing: it
    /// was the former owner's, and its rights ended with the handover. Before tokens were bound
    /// at issue, it made a device of whoever owned the account when it was used (Ada), with the
    /// owner's rights.
    #[test]
    fn a_spare_setup_token_does_not_outlive_a_handover() {
        let (_dir, mut db, account) = acme();
        let secret = [9u8; 32];
        // Two tokens for the owner: one used, one kept.
        token(&mut db, account, 1, None, &secret);
        token(&mut db, account, 2, None, &secret);
        let owner = enroll(&mut db, [1; 16], &secret, 1, 10).unwrap().device_id;
        assert_eq!(db.device(owner).unwrap().unwrap().role, Role::Owner);
        invite(
            db.connection_mut(),
            &Invitation {
                account,
                request: RequestId::from_parts(2, [3; 10]),
                token_id: [3; 16],
                secret_sha256: sha256(&secret),
                invitee: "ada",
                role: Role::Editor,
                quota_tokens: None,
                created_by: owner,
                expires_at: UnixMillis(1_000),
            },
            UnixMillis(0),
        )
        .unwrap();
        let ada = enroll(&mut db, [3; 16], &secret, 3, 20).unwrap().device_id;
        let conn = db.connection_mut();
        offer_handover(conn, account, "owner-device", "ada", UnixMillis(30)).unwrap();
        accept_handover(conn, account, ada, UnixMillis(40)).unwrap();
        remove(conn, account, "acme", "ada-device", UnixMillis(50)).unwrap();

        assert!(matches!(
            enroll(&mut db, [2; 16], &secret, 4, 60),
            Err(EnrollError::Used)
        ));
        let devices: Vec<_> = list(db.connection(), account)
            .unwrap()
            .into_iter()
            .map(|m| (m.name, m.role, m.devices))
            .collect();
        assert_eq!(devices, [("ada".into(), Role::Owner, 1)]);
    }

    /// A token is its member's from the moment it is issued: a new role or removal ends it,
    /// a token for a member who is not one is refused, and an unchanged member's token works.
    #[test]
    fn a_setup_token_is_bound_to_its_member_when_issued() {
        let (_dir, mut db, account) = acme();
        let secret = [9u8; 32];
        for name in ["bob", "cy", "di"] {
            add(
                db.connection(),
                account,
                &format!("m-{name}"),
                name,
                Role::Editor,
                None,
                "operator",
                UnixMillis(0),
            )
            .unwrap();
        }
        for (n, name) in [(1u8, "bob"), (2, "cy"), (3, "di")] {
            token(&mut db, account, n, Some(name), &secret);
        }
        assert!(matches!(
            db.create_token(account, [9; 16], &secret, Some("eve"), UnixMillis(0), UnixMillis(1_000)),
            Err(StorageError::NoSuchMember(name)) if name == "eve"
        ));
        // Bob is made a viewer, Cy is removed: their tokens end; Di's still works, as Di's.
        set_role(
            db.connection(),
            account,
            "bob",
            Role::Viewer,
            "operator",
            UnixMillis(5),
        )
        .unwrap();
        remove(
            db.connection_mut(),
            account,
            "cy",
            "operator",
            UnixMillis(5),
        )
        .unwrap();
        assert!(matches!(
            enroll(&mut db, [1; 16], &secret, 1, 10),
            Err(EnrollError::Used)
        ));
        assert!(matches!(
            enroll(&mut db, [2; 16], &secret, 2, 10),
            Err(EnrollError::Used)
        ));
        let di = enroll(&mut db, [3; 16], &secret, 3, 10).unwrap().device_id;
        assert_eq!(db.device(di).unwrap().unwrap().role, Role::Editor);
    }

    /// A device whose member record is missing acts as no one (before: read as the owner).
    #[test]
    fn a_device_without_a_member_is_refused_not_read_as_owner() {
        let (_dir, mut db, account) = acme();
        let secret = [9u8; 32];
        token(&mut db, account, 1, None, &secret);
        let device = enroll(&mut db, [1; 16], &secret, 1, 10).unwrap().device_id;
        db.connection()
            .execute(
                "UPDATE devices SET member_id = NULL WHERE id = ?1",
                params![device.to_string()],
            )
            .unwrap();
        assert!(matches!(db.device(device), Err(StorageError::Corrupt(_))));
    }
}
