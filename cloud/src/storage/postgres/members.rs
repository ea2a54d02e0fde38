//! Members, their roles and quotas, invitations, handovers and the audit log on PostgreSQL
//! ([`MemberStore`], [`MemberChanges`]), with SQLite's behaviour (`storage::members`), and the
//! stored answers of finished escalations ([`AnswerStore`], `storage::answers`).
//!
//! Where SQLite serialises writers with `BEGIN IMMEDIATE`, a change to an account's members
//! here first locks that account's row (`FOR NO KEY UPDATE`, which rows that merely refer to
//! the account do not wait for): two changes to one account's members run one after the
//! other, each deciding on what the one before it wrote (one owner; a handover against a
//! removal), while other accounts' go on beside them.

use deadpool_postgres::GenericClient;
use synesis_billing::ledger::EntryKind;
use synesis_proto::message::{PendingInvite, Role};
use synesis_proto::{AccountId, DeviceId, RequestId, UnixMillis};

use super::{Pg, lock_account};
use crate::storage::StorageError;
use crate::storage::answers::{Asker, StoredAnswer};
use crate::storage::members::{
    AuditRow, HANDOVER_FOR_MS, HandoverError, Invitation, Invited, MemberError, MemberRow,
    parse_role, role_str,
};
use crate::storage::unit::{AnswerStore, MemberChanges, MemberStore};

impl From<tokio_postgres::Error> for MemberError {
    fn from(e: tokio_postgres::Error) -> Self {
        MemberError::Storage(e.into())
    }
}

impl From<tokio_postgres::Error> for HandoverError {
    fn from(e: tokio_postgres::Error) -> Self {
        HandoverError::Storage(e.into())
    }
}

fn role_of(role: &str) -> Result<Role, StorageError> {
    parse_role(role).ok_or_else(|| StorageError::Corrupt(format!("unknown member role {role:?}")))
}

fn i64_of(v: u64) -> Result<i64, StorageError> {
    i64::try_from(v).map_err(|_| StorageError::Corrupt(format!("{v} does not fit")))
}

/// The id and role of the member `name` of the account (not removed).
async fn member(
    client: &impl GenericClient,
    account: AccountId,
    name: &str,
) -> Result<(String, Role), MemberError> {
    let row = client
        .query_opt(
            "SELECT id, role FROM members WHERE account_id = $1 AND name = $2 AND removed_at IS NULL",
            &[&account.to_string(), &name],
        )
        .await?
        .ok_or_else(|| MemberError::NoSuchMember(name.to_owned()))?;
    Ok((row.get(0), role_of(row.get(1))?))
}

/// One line of the account's audit log, inside the caller's transaction.
async fn audit(
    client: &impl GenericClient,
    account: AccountId,
    at: UnixMillis,
    actor: &str,
    (action, subject, detail): (&str, &str, &str),
) -> Result<(), StorageError> {
    client
        .execute(
            "INSERT INTO audit (account_id, at, actor, action, subject, detail)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &account.to_string(),
                &at.0,
                &actor,
                &action,
                &subject,
                &detail,
            ],
        )
        .await?;
    Ok(())
}

/// Ends every unused setup token of the member (`storage::members::end_tokens_of`).
async fn end_tokens_of(
    client: &impl GenericClient,
    member_id: &str,
    now: UnixMillis,
) -> Result<u64, StorageError> {
    Ok(client
        .execute(
            "UPDATE setup_tokens SET used_at = $2, used_by_request = 'revoked'
             WHERE used_at IS NULL AND id IN
               (SELECT token_id FROM setup_token_members WHERE member_id = $1)",
            &[&member_id, &now.0],
        )
        .await?)
}

impl MemberStore for Pg {
    fn members(&self, account: AccountId) -> Result<Vec<MemberRow>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT m.id, m.name, m.role, m.joined_at,
                            (SELECT COUNT(*) FROM devices d WHERE d.member_id = m.id)
                     FROM members m WHERE m.account_id = $1 AND m.removed_at IS NULL
                     ORDER BY m.role != 'owner', m.name",
                    &[&account.to_string()],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(MemberRow {
                        id: r.get(0),
                        name: r.get(1),
                        role: role_of(r.get(2))?,
                        joined_at: UnixMillis(r.get(3)),
                        devices: u64::try_from(r.get::<_, i64>(4)).unwrap_or(0),
                    })
                })
                .collect()
        })
    }

    fn add_member(
        &self,
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
        let quota = quota_tokens.map(i64_of).transpose()?;
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let inserted = tx
                .execute(
                    "INSERT INTO members (id, account_id, name, role, joined_at, quota_tokens)
                     VALUES ($1, $2, $3, $4, $5, $6)
                     ON CONFLICT (account_id, name) DO NOTHING",
                    &[
                        &id,
                        &account.to_string(),
                        &name,
                        &role_str(role),
                        &now.0,
                        &quota,
                    ],
                )
                .await?;
            if inserted == 0 {
                return Err(MemberError::Exists(name.to_owned()));
            }
            let what = ("member_added", name, role_str(role));
            audit(&tx, account, now, actor, what).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn set_member_role(
        &self,
        account: AccountId,
        name: &str,
        role: Role,
        actor: &str,
        now: UnixMillis,
    ) -> Result<(), MemberError> {
        if role == Role::Owner {
            return Err(MemberError::SecondOwner);
        }
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let (id, current) = member(&tx, account, name).await?;
            if current == Role::Owner {
                return Err(MemberError::Owner);
            }
            tx.execute(
                "UPDATE members SET role = $2 WHERE id = $1",
                &[&id, &role_str(role)],
            )
            .await?;
            end_tokens_of(&tx, &id, now).await?;
            let what = ("role_changed", name, role_str(role));
            audit(&tx, account, now, actor, what).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn member_quota_use(
        &self,
        device: DeviceId,
        month_start: UnixMillis,
    ) -> Result<Option<(u64, u64)>, StorageError> {
        self.io()
            .wait(async { quota_use(&self.client().await?, device, month_start).await })
    }

    fn pending_invites(
        &self,
        account: AccountId,
        now: UnixMillis,
    ) -> Result<Vec<PendingInvite>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT i.invitee, i.role, i.quota_tokens, t.expires_at FROM invites i
                     JOIN setup_tokens t ON t.id = i.token_id
                     WHERE i.account_id = $1 AND t.used_at IS NULL AND t.expires_at > $2
                     ORDER BY i.created_at",
                    &[&account.to_string(), &now.0],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(PendingInvite {
                        invitee: r.get(0),
                        role: role_of(r.get(1))?,
                        quota_tokens: r
                            .get::<_, Option<i64>>(2)
                            .and_then(|q| u64::try_from(q).ok()),
                        expires_at: UnixMillis(r.get(3)),
                    })
                })
                .collect()
        })
    }

    fn audit_log(&self, account: AccountId) -> Result<Vec<AuditRow>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT at, actor, action, subject, detail FROM audit
                     WHERE account_id = $1 ORDER BY seq",
                    &[&account.to_string()],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| AuditRow {
                    at: UnixMillis(r.get(0)),
                    actor: r.get(1),
                    action: r.get(2),
                    subject: r.get(3),
                    detail: r.get(4),
                })
                .collect())
        })
    }
}

/// The device's member's monthly quota and what its devices used since `month_start` or hold
/// now (`storage::members::quota_use`); `None` when that member has no quota.
pub(crate) async fn quota_use(
    client: &impl GenericClient,
    device: DeviceId,
    month_start: UnixMillis,
) -> Result<Option<(u64, u64)>, StorageError> {
    let member = client
        .query_opt(
            "SELECT m.id, m.quota_tokens FROM devices d JOIN members m ON m.id = d.member_id
             WHERE d.id = $1",
            &[&device.to_string()],
        )
        .await?;
    let Some((member, Some(quota))) = member.map(|r| (r.get::<_, String>(0), r.get(1))) else {
        return Ok(None);
    };
    const _: () = assert!(EntryKind::Settle.code() == 3);
    // Settlements this month, and the holds still open, of the member's devices.
    let used: i64 = client
        .query_one(
            "SELECT
               (SELECT COALESCE(SUM(e.input_tokens + e.output_tokens), 0)
                  FROM ledger_entries e JOIN devices d ON d.id = e.device_id
                 WHERE d.member_id = $1 AND e.kind = 3 AND e.at >= $2)::BIGINT
             + (SELECT COALESCE(SUM(e.input_tokens + e.output_tokens), 0)
                  FROM ledger_open_holds h
                  JOIN ledger_entries e ON e.account_id = h.account_id AND e.seq = h.seq
                  JOIN devices d ON d.id = e.device_id
                 WHERE d.member_id = $1)::BIGINT",
            &[&member, &month_start.0],
        )
        .await?
        .get(0);
    let as_u64 =
        |v: i64| u64::try_from(v).map_err(|_| StorageError::Corrupt(format!("{v} tokens")));
    Ok(Some((as_u64(quota)?, as_u64(used)?)))
}

impl MemberChanges for Pg {
    fn invite(&mut self, i: &Invitation<'_>, now: UnixMillis) -> Result<Invited, MemberError> {
        if i.role == Role::Owner {
            return Err(MemberError::SecondOwner);
        }
        let quota = i.quota_tokens.map(i64_of).transpose()?;
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, i.account).await?;
            let acct = i.account.to_string();
            let earlier = tx
                .query_opt(
                    "SELECT token_id, invitee, role FROM invites
                     WHERE account_id = $1 AND request_id = $2",
                    &[&acct, &i.request.to_string()],
                )
                .await?;
            if let Some(r) = earlier {
                let (token, invitee, role): (&[u8], &str, &str) = (r.get(0), r.get(1), r.get(2));
                if token != i.token_id || invitee != i.invitee || role != role_str(i.role) {
                    return Ok(Invited::Conflict);
                }
                let reissued = tx
                    .execute(
                        "UPDATE setup_tokens SET secret_sha256 = $2, expires_at = $3
                         WHERE id = $1 AND used_at IS NULL",
                        &[
                            &i.token_id.as_slice(),
                            &i.secret_sha256.as_slice(),
                            &i.expires_at.0,
                        ],
                    )
                    .await?;
                tx.commit().await?;
                return Ok(if reissued == 1 {
                    Invited::Issued
                } else {
                    Invited::Used
                });
            }
            tx.execute(
                "INSERT INTO setup_tokens (id, account_id, secret_sha256, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &i.token_id.as_slice(),
                    &acct,
                    &i.secret_sha256.as_slice(),
                    &now.0,
                    &i.expires_at.0,
                ],
            )
            .await?;
            tx.execute(
                "INSERT INTO invites (token_id, account_id, request_id, invitee, role, created_by,
                     created_at, quota_tokens)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                &[
                    &i.token_id.as_slice(),
                    &acct,
                    &i.request.to_string(),
                    &i.invitee,
                    &role_str(i.role),
                    &i.created_by.to_string(),
                    &now.0,
                    &quota,
                ],
            )
            .await?;
            let by = i.created_by.to_string();
            let what = ("invited", i.invitee, role_str(i.role));
            audit(&tx, i.account, now, &by, what).await?;
            tx.commit().await?;
            Ok(Invited::Issued)
        })
    }

    fn remove_member(
        &mut self,
        account: AccountId,
        name: &str,
        actor: &str,
        now: UnixMillis,
    ) -> Result<u64, MemberError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let (id, role) = member(&tx, account, name).await?;
            if role == Role::Owner {
                return Err(MemberError::Owner);
            }
            tx.execute(
                "UPDATE members SET removed_at = $2 WHERE id = $1",
                &[&id, &now.0],
            )
            .await?;
            let revoked = tx
                .execute(
                    "UPDATE devices SET revoked_at = $2 WHERE member_id = $1 AND revoked_at IS NULL",
                    &[&id, &now.0],
                )
                .await?;
            tx.execute("DELETE FROM handovers WHERE to_member = $1", &[&id])
                .await?;
            end_tokens_of(&tx, &id, now).await?;
            let detail = format!("{revoked} devices revoked");
            audit(&tx, account, now, actor, ("member_removed", name, &detail)).await?;
            tx.execute(super::changes::NOTIFY, &[&"revoked"]).await?;
            tx.commit().await?;
            Ok(revoked)
        })
    }

    fn revoke_invites(
        &mut self,
        account: AccountId,
        invitee: &str,
        actor: &str,
        now: UnixMillis,
    ) -> Result<u64, StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let revoked = tx
                .execute(
                    "UPDATE setup_tokens SET used_at = $3, used_by_request = 'revoked'
                     WHERE used_at IS NULL AND expires_at > $3 AND id IN
                       (SELECT token_id FROM invites WHERE account_id = $1 AND invitee = $2)",
                    &[&account.to_string(), &invitee, &now.0],
                )
                .await?;
            if revoked > 0 {
                audit(&tx, account, now, actor, ("invite_revoked", invitee, "")).await?;
            }
            tx.commit().await?;
            Ok(revoked)
        })
    }

    fn offer_handover(
        &mut self,
        account: AccountId,
        actor: &str,
        to: &str,
        now: UnixMillis,
    ) -> Result<UnixMillis, MemberError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let (id, role) = member(&tx, account, to).await?;
            if role == Role::Owner {
                return Err(MemberError::Owner);
            }
            let expires_at = UnixMillis(now.0.saturating_add(HANDOVER_FOR_MS));
            tx.execute(
                "INSERT INTO handovers (account_id, to_member, offered_at, expires_at)
                 VALUES ($1, $2, $3, $4)
                 ON CONFLICT (account_id) DO UPDATE
                 SET to_member = $2, offered_at = $3, expires_at = $4",
                &[&account.to_string(), &id, &now.0, &expires_at.0],
            )
            .await?;
            audit(&tx, account, now, actor, ("handover_offered", to, "")).await?;
            tx.commit().await?;
            Ok(expires_at)
        })
    }

    fn accept_handover(
        &mut self,
        account: AccountId,
        device: DeviceId,
        now: UnixMillis,
    ) -> Result<(String, String), HandoverError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            lock_account(&tx, account).await?;
            let acct = account.to_string();
            let offer = tx
                .query_opt(
                    "SELECT h.to_member, h.expires_at, m.name FROM handovers h
                     JOIN devices d ON d.member_id = h.to_member
                     JOIN members m ON m.id = h.to_member
                     WHERE h.account_id = $1 AND d.id = $2 AND m.removed_at IS NULL",
                    &[&acct, &device.to_string()],
                )
                .await?;
            let Some(offer) = offer else {
                return Err(HandoverError::NotOffered);
            };
            let (to, expires_at, to_name): (String, i64, String) =
                (offer.get(0), offer.get(1), offer.get(2));
            if now.0 >= expires_at {
                return Err(HandoverError::Lapsed);
            }
            let former = tx
                .query_one(
                    "SELECT id, name FROM members WHERE account_id = $1 AND role = 'owner'",
                    &[&acct],
                )
                .await?;
            let (former_id, former): (String, String) = (former.get(0), former.get(1));
            // Both roles change: tokens either of them holds were issued for rights they no
            // longer have.
            end_tokens_of(&tx, &former_id, now).await?;
            end_tokens_of(&tx, &to, now).await?;
            tx.execute(
                "UPDATE members SET role = 'editor' WHERE account_id = $1 AND role = 'owner'",
                &[&acct],
            )
            .await?;
            tx.execute("UPDATE members SET role = 'owner' WHERE id = $1", &[&to])
                .await?;
            tx.execute("DELETE FROM handovers WHERE account_id = $1", &[&acct])
                .await?;
            let detail = format!("former owner {former} is now an editor");
            let what = ("handover_accepted", to_name.as_str(), detail.as_str());
            audit(&tx, account, now, &device.to_string(), what).await?;
            let name: String = tx
                .query_one("SELECT name FROM accounts WHERE id = $1", &[&acct])
                .await?
                .get(0);
            tx.commit().await?;
            Ok((name, former))
        })
    }
}

/// The member whose device asked `request_id` in `account` (`storage::answers::asker`).
async fn asker(
    client: &impl GenericClient,
    account: AccountId,
    request_id: RequestId,
) -> Result<Option<Asker>, StorageError> {
    const _: () = assert!(EntryKind::Hold.code() == 2);
    let member: Option<Option<String>> = client
        .query_opt(
            "SELECT d.member_id FROM ledger_entries e JOIN devices d ON d.id = e.device_id
             WHERE e.account_id = $1 AND e.request_id = $2 AND e.kind = 2
             ORDER BY e.seq LIMIT 1",
            &[&account.to_string(), &request_id.to_string()],
        )
        .await?
        .map(|r| r.get(0));
    Ok(member.flatten().map(Asker::new))
}

/// Records a finished request, once (`storage::answers::put`), inside the caller's transaction.
pub(crate) async fn put_answer(
    client: &impl GenericClient,
    account: AccountId,
    request_id: RequestId,
    answer: &StoredAnswer,
    at: UnixMillis,
) -> Result<(), StorageError> {
    let (chunks, done) = crate::storage::answers::encode(answer)?;
    client
        .execute(
            "INSERT INTO escalation_answers (account_id, request_id, body, chunks, done, at)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[
                &account.to_string(),
                &request_id.to_string(),
                &answer.body.as_slice(),
                &chunks,
                &done,
                &at.0,
            ],
        )
        .await?;
    Ok(())
}

impl AnswerStore for Pg {
    fn asker_of_device(&self, device: DeviceId) -> Result<Option<Asker>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let member: Option<Option<String>> = client
                .query_opt(
                    "SELECT member_id FROM devices WHERE id = $1",
                    &[&device.to_string()],
                )
                .await?
                .map(|r| r.get(0));
            Ok(member.flatten().map(Asker::new))
        })
    }

    fn asker(
        &self,
        account: AccountId,
        request_id: RequestId,
    ) -> Result<Option<Asker>, StorageError> {
        self.io()
            .wait(async { asker(&self.client().await?, account, request_id).await })
    }

    fn answer(
        &self,
        account: AccountId,
        request_id: RequestId,
    ) -> Result<Option<StoredAnswer>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT body, chunks, done FROM escalation_answers
                     WHERE account_id = $1 AND request_id = $2",
                    &[&account.to_string(), &request_id.to_string()],
                )
                .await?;
            let Some(row) = row else {
                return Ok(None);
            };
            let asker = asker(&client, account, request_id).await?;
            crate::storage::answers::decode(row.get(0), row.get(1), row.get(2), asker).map(Some)
        })
    }

    fn put_answer(
        &self,
        account: AccountId,
        request_id: RequestId,
        answer: &StoredAnswer,
        at: UnixMillis,
    ) -> Result<(), StorageError> {
        self.io().wait(async {
            put_answer(&self.client().await?, account, request_id, answer, at).await
        })
    }

    fn running_on(
        &self,
        account: AccountId,
        request_id: RequestId,
        now: UnixMillis,
    ) -> Result<Option<String>, StorageError> {
        let since = now.0.saturating_sub(crate::storage::NODE_DEAD_AFTER_MS);
        let sql = crate::storage::unit::RUNNING_ON
            .replace("?1", "$1")
            .replace("?2", "$2")
            .replace("?3", "$3");
        self.io().wait(async {
            let client = self.client().await?;
            Ok(client
                .query_opt(
                    &sql,
                    &[&account.to_string(), &request_id.to_string(), &since],
                )
                .await?
                .map(|r| r.get(0)))
        })
    }
}
