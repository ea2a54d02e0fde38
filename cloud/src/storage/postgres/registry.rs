//! Accounts, setup tokens, devices and their certificates, their presence, and vouchers on
//! PostgreSQL: the [`Accounts`], [`Devices`] and [`Vouchers`] traits, with SQLite's behaviour
//! (`storage::sqlite`), the rules shared through `storage::registry`.
//!
//! Where SQLite serialises writers with `BEGIN IMMEDIATE`, these transactions lock the rows they
//! decide on (`FOR UPDATE`): an enrollment locks its setup token, so two enrollments with one
//! token are one after the other and the second sees the first's use; a renewal locks its
//! device, so two renewals cannot both pass the count of recent certificates. An account's name
//! is unique by its constraint.

use deadpool_postgres::GenericClient;
use synesis_proto::message::Tier;
use synesis_proto::{AccountId, DeviceId, MicroUsd, RequestId, Sha256, UnixMillis};

use super::Pg;
use crate::storage::registry::{
    DEVICE_NAME_BYTES_MAX, Token, TokenCheck, check_token, member_role, parse_id,
};
use crate::storage::{
    Account, Accounts, Device, DeviceRow, Devices, EnrollError, Enrolled, Enrollment, IssuedCert,
    Presence, Renewal, StorageError, Vouchers, parse_tier, printable, sha256,
};

fn tier_of(tier: &str) -> Result<Tier, StorageError> {
    parse_tier(tier).ok_or_else(|| StorageError::Corrupt(format!("tier {tier:?}")))
}

async fn read_token(
    client: &impl GenericClient,
    token_id: &[u8; 16],
    lock: bool,
) -> Result<Option<Token>, StorageError> {
    let sql = format!(
        "SELECT t.account_id, a.name, t.secret_sha256, t.expires_at, t.used_at, t.used_by_request
         FROM setup_tokens t JOIN accounts a ON a.id = t.account_id WHERE t.id = $1{}",
        if lock { " FOR UPDATE OF t" } else { "" }
    );
    let row = client.query_opt(&sql, &[&token_id.as_slice()]).await?;
    Ok(row.map(|r| Token {
        account_id: r.get(0),
        account_name: r.get(1),
        secret_hash: r.get(2),
        expires_at: r.get(3),
        used_at: r.get(4),
        used_by: r.get(5),
    }))
}

/// The member a setup token enrolls its device for, if that member is still one.
async fn token_member(
    client: &impl GenericClient,
    token_id: &[u8; 16],
) -> Result<Option<String>, StorageError> {
    Ok(client
        .query_opt(
            "SELECT s.member_id FROM setup_token_members s JOIN members m ON m.id = s.member_id
             WHERE s.token_id = $1 AND m.removed_at IS NULL",
            &[&token_id.as_slice()],
        )
        .await?
        .map(|r| r.get(0)))
}

/// An invitation's token makes its invitee the member `member_id` (SQLite's
/// `members::accept_in`): whether the token was an invitation's.
async fn accept_invitation(
    client: &impl GenericClient,
    token_id: &[u8; 16],
    member_id: &str,
    now: UnixMillis,
) -> Result<bool, EnrollError> {
    let Some(invite) = client
        .query_opt(
            "SELECT i.account_id, i.invitee, i.role, i.quota_tokens, a.name
             FROM invites i JOIN accounts a ON a.id = i.account_id WHERE i.token_id = $1",
            &[&token_id.as_slice()],
        )
        .await
        .map_err(StorageError::from)?
    else {
        return Ok(false);
    };
    let (account, invitee, role, quota, account_name): (
        String,
        String,
        String,
        Option<i64>,
        String,
    ) = (
        invite.get(0),
        invite.get(1),
        invite.get(2),
        invite.get(3),
        invite.get(4),
    );
    // A member of that name exists (a removed one keeps its name: its history stays its own).
    let exists: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM members WHERE account_id = $1 AND name = $2)",
            &[&account, &invitee],
        )
        .await
        .map_err(StorageError::from)?
        .get(0);
    if exists {
        return Err(EnrollError::BadRequest(format!(
            "{}: {account_name}",
            crate::storage::members::MemberError::Exists(invitee)
        )));
    }
    client
        .execute(
            "INSERT INTO members (id, account_id, name, role, joined_at, quota_tokens)
             VALUES ($1, $2, $3, $4, $5, $6)",
            &[&member_id, &account, &invitee, &role, &now.0, &quota],
        )
        .await
        .map_err(StorageError::from)?;
    client
        .execute(
            "INSERT INTO setup_token_members (token_id, member_id) VALUES ($1, $2)",
            &[&token_id.as_slice(), &member_id],
        )
        .await
        .map_err(StorageError::from)?;
    client
        .execute(
            "INSERT INTO audit (account_id, at, actor, action, subject, detail)
             VALUES ($1, $2, 'invitation', 'member_joined', $3, $4)",
            &[&account, &now.0, &invitee, &role],
        )
        .await
        .map_err(StorageError::from)?;
    Ok(true)
}

impl Accounts for Pg {
    fn create_account(
        &mut self,
        id: AccountId,
        name: &str,
        tier: Tier,
        now: UnixMillis,
    ) -> Result<Account, StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let inserted = tx
                .execute(
                    "INSERT INTO accounts (id, name, tier, created_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (name) DO NOTHING",
                    &[&id.to_string(), &name, &tier.as_str(), &now.0],
                )
                .await?;
            if inserted == 0 {
                return Err(StorageError::AccountExists(name.to_owned()));
            }
            // Its owner: the member whose id is the account's.
            tx.execute(
                "INSERT INTO members (id, account_id, name, role, joined_at) VALUES ($1, $1, $2, 'owner', $3)",
                &[&id.to_string(), &name, &now.0],
            )
            .await?;
            tx.commit().await?;
            Ok(Account {
                id,
                name: name.to_owned(),
                tier,
            })
        })
    }

    fn account_by_name(&self, name: &str) -> Result<Account, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let row = client
                .query_opt("SELECT id, tier FROM accounts WHERE name = $1", &[&name])
                .await?
                .ok_or_else(|| StorageError::NoSuchAccount(name.to_owned()))?;
            Ok(Account {
                id: parse_id(row.get(0))?,
                name: name.to_owned(),
                tier: tier_of(row.get(1))?,
            })
        })
    }

    fn account_by_id(&self, id: AccountId) -> Result<Account, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT name, tier FROM accounts WHERE id = $1",
                    &[&id.to_string()],
                )
                .await?
                .ok_or_else(|| StorageError::Corrupt(format!("no account {id}")))?;
            Ok(Account {
                id,
                name: row.get(0),
                tier: tier_of(row.get(1))?,
            })
        })
    }

    fn set_tier(&mut self, name: &str, tier: Tier) -> Result<(), StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let n = client
                .execute(
                    "UPDATE accounts SET tier = $2 WHERE name = $1",
                    &[&name, &tier.as_str()],
                )
                .await?;
            if n == 0 {
                return Err(StorageError::NoSuchAccount(name.to_owned()));
            }
            Ok(())
        })
    }
}

impl crate::storage::Nodes for Pg {
    fn node_seen(
        &mut self,
        id: &str,
        addr: &str,
        started_at: UnixMillis,
        now: UnixMillis,
    ) -> Result<(), StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO nodes (id, addr, started_at, seen_at) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (id) DO UPDATE SET seen_at = EXCLUDED.seen_at",
                    &[&id, &addr, &started_at.0, &now.0],
                )
                .await?;
            Ok(())
        })
    }

    fn node_stopped(&mut self, id: &str, now: UnixMillis) -> Result<(), StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE nodes SET stopped_at = $2 WHERE id = $1",
                    &[&id, &now.0],
                )
                .await?;
            Ok(())
        })
    }

    fn nodes(&self) -> Result<Vec<crate::storage::NodeRow>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let rows = client
                .query(
                    "SELECT id, addr, started_at, seen_at, stopped_at, swept_at FROM nodes
                     ORDER BY started_at, id",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| crate::storage::NodeRow {
                    id: r.get(0),
                    addr: r.get(1),
                    started_at: UnixMillis(r.get(2)),
                    seen_at: UnixMillis(r.get(3)),
                    stopped_at: r.get::<_, Option<i64>>(4).map(UnixMillis),
                    swept_at: r.get::<_, Option<i64>>(5).map(UnixMillis),
                })
                .collect())
        })
    }

    fn runs_of(&self, id: &str) -> Result<Vec<(AccountId, RequestId)>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            client
                .query(
                    "SELECT account_id, request_id FROM runs WHERE node = $1",
                    &[&id],
                )
                .await?
                .iter()
                .map(|r| Ok((parse_id(r.get(0))?, parse_id(r.get(1))?)))
                .collect()
        })
    }

    fn node_gone(&mut self, id: &str) -> Result<(), StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE devices SET connected = 0, node = NULL WHERE node = $1 AND connected = 1",
                    &[&id],
                )
                .await?;
            Ok(())
        })
    }

    fn node_swept(&mut self, id: &str, now: UnixMillis) -> Result<(), StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            tx.execute("DELETE FROM runs WHERE node = $1", &[&id])
                .await?;
            tx.execute(
                "UPDATE nodes SET swept_at = $2 WHERE id = $1",
                &[&id, &now.0],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn prune_runs(&mut self, id: &str) -> Result<usize, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let n = client
                .execute(
                    "DELETE FROM runs r WHERE r.node = $1 AND NOT EXISTS (
                        SELECT 1 FROM ledger_open_holds h
                        WHERE h.account_id = r.account_id AND h.request_id = r.request_id)",
                    &[&id],
                )
                .await?;
            Ok(usize::try_from(n).unwrap_or(usize::MAX))
        })
    }
}

impl Devices for Pg {
    fn create_token(
        &mut self,
        account: AccountId,
        token_id: [u8; 16],
        secret: &[u8; 32],
        member: Option<&str>,
        now: UnixMillis,
        expires_at: UnixMillis,
    ) -> Result<(), StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let account = account.to_string();
            let member_id: Option<String> = match member {
                Some(name) => tx
                    .query_opt(
                        "SELECT id FROM members WHERE account_id = $1 AND name = $2 AND removed_at IS NULL",
                        &[&account, &name],
                    )
                    .await?,
                None => tx
                    .query_opt(
                        "SELECT id FROM members WHERE account_id = $1 AND role = 'owner' AND removed_at IS NULL",
                        &[&account],
                    )
                    .await?,
            }
            .map(|r| r.get(0));
            let Some(member_id) = member_id else {
                return Err(StorageError::NoSuchMember(
                    member.unwrap_or("(the owner)").to_owned(),
                ));
            };
            tx.execute(
                "INSERT INTO setup_tokens (id, account_id, secret_sha256, created_at, expires_at)
                 VALUES ($1, $2, $3, $4, $5)",
                &[
                    &token_id.as_slice(),
                    &account,
                    &sha256(secret).as_slice(),
                    &now.0,
                    &expires_at.0,
                ],
            )
            .await?;
            tx.execute(
                "INSERT INTO setup_token_members (token_id, member_id) VALUES ($1, $2)",
                &[&token_id.as_slice(), &member_id],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn enroll(
        &mut self,
        e: &Enrollment<'_>,
        now: UnixMillis,
        sign: &mut dyn FnMut(DeviceId) -> Result<IssuedCert, String>,
    ) -> Result<Enrolled, EnrollError> {
        let Enrollment {
            token_id,
            secret,
            request,
            device_name,
            new_device_id,
        } = *e;
        self.io().wait(async {
            let mut client = self.client().await?;
            // First without a lock: a wrong, used or expired token costs one read.
            check_token(read_token(&client, &token_id, false).await?, secret, request, now)?;
            let name = printable(device_name);
            if name.is_empty() || name.len() > DEVICE_NAME_BYTES_MAX {
                return Err(EnrollError::BadRequest(format!(
                    "the device name must be 1 to {DEVICE_NAME_BYTES_MAX} bytes"
                )));
            }
            let tx = client.transaction().await.map_err(StorageError::from)?;
            // Again with the token locked: another enrollment may have used it in between.
            match check_token(read_token(&tx, &token_id, true).await?, secret, request, now)? {
                TokenCheck::Replay {
                    account_id,
                    account_name,
                } => {
                    let row = tx
                        .query_one(
                            "SELECT id, cert_der FROM devices WHERE enroll_request = $1 AND account_id = $2",
                            &[&request.to_string(), &account_id.to_string()],
                        )
                        .await
                        .map_err(StorageError::from)?;
                    Ok(Enrolled {
                        device_id: parse_id(row.get(0))?,
                        account_id,
                        account_name,
                        cert_der: row.get(1),
                    })
                }
                TokenCheck::Fresh {
                    account_id,
                    account_name,
                } => {
                    let reused: bool = tx
                        .query_one(
                            "SELECT EXISTS (SELECT 1 FROM devices WHERE enroll_request = $1)",
                            &[&request.to_string()],
                        )
                        .await
                        .map_err(StorageError::from)?
                        .get(0);
                    if reused {
                        return Err(EnrollError::RequestReused);
                    }
                    let member = format!("m-{new_device_id}");
                    accept_invitation(&tx, &token_id, &member, now).await?;
                    // The member the token was issued for, still a member (a token bound to
                    // no one enrolls nobody: `storage::sqlite`'s enroll says why).
                    let Some(member_id) = token_member(&tx, &token_id).await? else {
                        return Err(EnrollError::Used);
                    };
                    let cert = sign(new_device_id).map_err(EnrollError::BadRequest)?;
                    let fpr = sha256(&cert.der);
                    let device = new_device_id.to_string();
                    tx.execute(
                        "INSERT INTO devices (id, account_id, name, cert_sha256, cert_der, enroll_request, enrolled_at, member_id)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                        &[
                            &device,
                            &account_id.to_string(),
                            &name,
                            &fpr.as_slice(),
                            &cert.der,
                            &request.to_string(),
                            &now.0,
                            &member_id,
                        ],
                    )
                    .await
                    .map_err(StorageError::from)?;
                    tx.execute(
                        "INSERT INTO device_certs (cert_sha256, device_id, cert_der, issued_at, not_after)
                         VALUES ($1, $2, $3, $4, $5)",
                        &[&fpr.as_slice(), &device, &cert.der, &now.0, &cert.not_after.0],
                    )
                    .await
                    .map_err(StorageError::from)?;
                    tx.execute(
                        "UPDATE setup_tokens SET used_at = $1, used_by_request = $2 WHERE id = $3",
                        &[&now.0, &request.to_string(), &token_id.as_slice()],
                    )
                    .await
                    .map_err(StorageError::from)?;
                    tx.commit().await.map_err(StorageError::from)?;
                    Ok(Enrolled {
                        device_id: new_device_id,
                        account_id,
                        account_name,
                        cert_der: cert.der,
                    })
                }
            }
        })
    }

    fn renew_cert(
        &mut self,
        device: DeviceId,
        request: RequestId,
        now: UnixMillis,
        cert: IssuedCert,
        recent: (UnixMillis, usize),
    ) -> Result<Renewal, StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let id = device.to_string();
            let revoked: Option<Option<i64>> = tx
                .query_opt("SELECT revoked_at FROM devices WHERE id = $1 FOR UPDATE", &[&id])
                .await?
                .map(|r| r.get(0));
            if !matches!(revoked, Some(None)) {
                return Ok(Renewal::Revoked);
            }
            if let Some(done) = tx
                .query_opt(
                    "SELECT cert_der, not_after FROM device_certs WHERE device_id = $1 AND renew_request = $2",
                    &[&id, &request.to_string()],
                )
                .await?
            {
                let not_after: Option<i64> = done.get(1);
                return Ok(Renewal::Issued(IssuedCert {
                    der: done.get(0),
                    not_after: UnixMillis(not_after.unwrap_or(i64::MAX)),
                }));
            }
            let (since, max) = recent;
            // Renewals only: the certificate of the enrollment is not one (PROTOCOL.md §1).
            let issued: i64 = tx
                .query_one(
                    "SELECT COUNT(*) FROM device_certs
                     WHERE device_id = $1 AND issued_at >= $2 AND renew_request IS NOT NULL",
                    &[&id, &since.0],
                )
                .await?
                .get(0);
            if usize::try_from(issued).unwrap_or(usize::MAX) >= max {
                return Ok(Renewal::TooMany);
            }
            tx.execute(
                "INSERT INTO device_certs (cert_sha256, device_id, cert_der, issued_at, not_after, renew_request)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &sha256(&cert.der).as_slice(),
                    &id,
                    &cert.der,
                    &now.0,
                    &cert.not_after.0,
                    &request.to_string(),
                ],
            )
            .await?;
            tx.commit().await?;
            Ok(Renewal::Issued(cert))
        })
    }

    fn device_by_cert(&self, cert_sha256: &Sha256) -> Result<Option<Device>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT d.id, d.account_id, d.revoked_at, m.role, m.removed_at FROM device_certs c
                     JOIN devices d ON d.id = c.device_id
                     LEFT JOIN members m ON m.id = d.member_id
                     WHERE c.cert_sha256 = $1",
                    &[&cert_sha256.0.as_slice()],
                )
                .await?;
            row.map(|r| {
                Ok(Device {
                    id: parse_id(r.get(0))?,
                    account_id: parse_id(r.get(1))?,
                    revoked: r.get::<_, Option<i64>>(2).is_some()
                        || r.get::<_, Option<i64>>(4).is_some(),
                    role: member_role(r.get(3))?,
                })
            })
            .transpose()
        })
    }

    fn device(&self, id: DeviceId) -> Result<Option<Device>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let row = client
                .query_opt(
                    "SELECT d.account_id, d.revoked_at, m.role, m.removed_at FROM devices d
                     LEFT JOIN members m ON m.id = d.member_id WHERE d.id = $1",
                    &[&id.to_string()],
                )
                .await?;
            row.map(|r| {
                Ok(Device {
                    id,
                    account_id: parse_id(r.get(0))?,
                    revoked: r.get::<_, Option<i64>>(1).is_some()
                        || r.get::<_, Option<i64>>(3).is_some(),
                    role: member_role(r.get(2))?,
                })
            })
            .transpose()
        })
    }

    fn reset_connections(&mut self, now: UnixMillis) -> Result<(), StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            client
                .execute(
                    "UPDATE devices SET connected = 0, node = NULL WHERE connected = 1 AND (node IS NULL
                     OR node NOT IN (SELECT id FROM nodes WHERE stopped_at IS NULL AND seen_at >= $1))",
                    &[&now.0.saturating_sub(crate::storage::NODE_DEAD_AFTER_MS)],
                )
                .await?;
            Ok(())
        })
    }

    fn record_presence(&mut self, node: &str, changes: &[Presence]) -> Result<(), StorageError> {
        self.io().wait(async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            // Heartbeats (most of what comes) in one statement per run of them; the rest one
            // by one, in order, each after the heartbeats before it.
            let mut seen = SeenRun::default();
            for change in changes {
                let id = change.device().to_string();
                if let Presence::Seen {
                    at,
                    rtt_us,
                    vitals_json,
                    ..
                } = change
                {
                    seen.push(id, *at, *rtt_us, vitals_json.clone());
                    continue;
                }
                seen.flush(&tx, node).await?;
                match change {
                    Presence::Connected {
                        heartbeat_interval_ms,
                        at,
                        ..
                    } => {
                        tx.execute(
                            "UPDATE devices SET connected = 1, node = $4, last_seen_at = $2, heartbeat_interval_ms = $3 WHERE id = $1",
                            &[&id, &at.0, &i64::from(*heartbeat_interval_ms), &node],
                        )
                        .await?
                    }
                    Presence::Seen { .. } => 0, // gathered above
                    Presence::Disconnected { at, .. } => {
                        tx.execute(
                            "UPDATE devices SET connected = 0, node = NULL, last_seen_at = $2 WHERE id = $1 AND node = $3",
                            &[&id, &at.0, &node],
                        )
                        .await?
                    }
                    Presence::Prewarm { prewarm_json, .. } => {
                        tx.execute(
                            "UPDATE devices SET prewarm_json = $2 WHERE id = $1",
                            &[&id, prewarm_json],
                        )
                        .await?
                    }
                };
            }
            seen.flush(&tx, node).await?;
            tx.commit().await?;
            Ok(())
        })
    }

    /// Revokes a device. Revoking twice is not an error; the first time is kept.
    fn revoke(&mut self, id: DeviceId, now: UnixMillis) -> Result<(), StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            let n = client
                .execute(
                    "UPDATE devices SET revoked_at = COALESCE(revoked_at, $2) WHERE id = $1",
                    &[&id.to_string(), &now.0],
                )
                .await?;
            if n == 0 {
                return Err(StorageError::NoSuchDevice(id));
            }
            client
                .execute(super::changes::NOTIFY, &[&"revoked"])
                .await?;
            Ok(())
        })
    }

    fn revoked_since(&self, since: UnixMillis) -> Result<Vec<DeviceId>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            client
                .query("SELECT id FROM devices WHERE revoked_at >= $1", &[&since.0])
                .await?
                .iter()
                .map(|r| parse_id(r.get(0)))
                .collect()
        })
    }

    fn devices(&self) -> Result<Vec<DeviceRow>, StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            client
                .query(
                    "SELECT d.id, a.name, d.name, d.revoked_at, d.connected, d.last_seen_at,
                            d.heartbeat_interval_ms, d.rtt_us, d.vitals_json, d.prewarm_json, d.node
                     FROM devices d JOIN accounts a ON a.id = d.account_id
                     ORDER BY d.enrolled_at, d.id",
                    &[],
                )
                .await?
                .iter()
                .map(|r| {
                    Ok(DeviceRow {
                        id: parse_id(r.get(0))?,
                        account: r.get(1),
                        name: r.get(2),
                        revoked_at: r.get::<_, Option<i64>>(3).map(UnixMillis),
                        connected: r.get::<_, i64>(4) != 0,
                        node: r.get(10),
                        last_seen_at: r.get::<_, Option<i64>>(5).map(UnixMillis),
                        heartbeat_interval_ms: r.get(6),
                        rtt_us: r.get(7),
                        vitals_json: r.get(8),
                        prewarm_json: r.get(9),
                    })
                })
                .collect()
        })
    }
}

impl Vouchers for Pg {
    fn create_voucher(
        &mut self,
        code: &str,
        amount: MicroUsd,
        now: UnixMillis,
    ) -> Result<(), StorageError> {
        self.io().wait(async {
            let client = self.client().await?;
            client
                .execute(
                    "INSERT INTO vouchers (code_sha256, amount, created_at) VALUES ($1, $2, $3)",
                    &[&sha256(code.as_bytes()).as_slice(), &amount.0, &now.0],
                )
                .await?;
            Ok(())
        })
    }
}

/// Heartbeats waiting to be written together (`record_presence`): one `UPDATE … FROM unnest`
/// for the lot, not a statement (a round trip) each.
/// A device's later heartbeat replaces its earlier one in the run (an `UPDATE … FROM` with two
/// rows for one target applies either).
#[derive(Default)]
struct SeenRun {
    ids: Vec<String>,
    ats: Vec<i64>,
    rtts: Vec<i64>,
    vitals: Vec<String>,
    at: std::collections::HashMap<String, usize>,
}

impl SeenRun {
    fn push(&mut self, id: String, at: UnixMillis, rtt_us: i64, vitals_json: String) {
        if let Some(&i) = self.at.get(&id) {
            (self.ats[i], self.rtts[i], self.vitals[i]) = (at.0, rtt_us, vitals_json);
            return;
        }
        self.at.insert(id.clone(), self.ids.len());
        self.ids.push(id);
        self.ats.push(at.0);
        self.rtts.push(rtt_us);
        self.vitals.push(vitals_json);
    }

    async fn flush(
        &mut self,
        tx: &deadpool_postgres::Transaction<'_>,
        node: &str,
    ) -> Result<(), StorageError> {
        if self.ids.is_empty() {
            return Ok(());
        }
        // A heartbeat means connected, whatever order a reconnect's changes came in.
        tx.execute(
            "UPDATE devices AS d SET connected = 1, node = $5, last_seen_at = v.at, rtt_us = v.rtt,
                    vitals_json = v.vitals
             FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::text[]) AS v (id, at, rtt, vitals)
             WHERE d.id = v.id",
            &[&self.ids, &self.ats, &self.rtts, &self.vitals, &node],
        )
        .await?;
        *self = SeenRun::default();
        Ok(())
    }
}
