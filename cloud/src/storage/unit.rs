//! The unit of work handlers go through, and one repository trait per aggregate over it.
//!
//! A [`Unit`] is where a handler's reads and writes land: the storage thread's connection
//! ([`super::Db::unit`]) or the ledger writer's open transaction (`SqliteLedger::unit`), so a
//! handler that changes two aggregates atomically does it through one unit. Handlers name
//! what they need (`MemberStore`, `AdapterStore`, `AnswerStore`); how it is stored stays in this
//! module's siblings. SQLite is the one backend today.

use rusqlite::Connection;
use synesis_proto::message::{PendingInvite, Role};
use synesis_proto::{AccountId, DeviceId, RequestId, Sha256, UnixMillis};

use super::StorageError;
use super::adapters::{
    AdapterRow, Begun, Declared, Quota, Removed, Swept, UploadRow, UploadSummary,
};
use super::answers::{Asker, StoredAnswer};
use super::members::{AuditRow, HandoverError, Invitation, Invited, MemberError, MemberRow};

/// Reads and writes inside one transaction (or on one connection), whatever the aggregate.
#[derive(Debug, Clone, Copy)]
pub struct Unit<'c> {
    conn: &'c Connection,
}

impl<'c> Unit<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Unit<'c> {
        Unit { conn }
    }
}

/// Members of an account, their roles, quotas, invitations and the audit log.
pub trait MemberStore {
    fn members(&self, account: AccountId) -> Result<Vec<MemberRow>, StorageError>;
    #[allow(clippy::too_many_arguments)]
    fn add_member(
        &self,
        account: AccountId,
        id: &str,
        name: &str,
        role: Role,
        quota_tokens: Option<u64>,
        actor: &str,
        now: UnixMillis,
    ) -> Result<(), MemberError>;
    fn set_member_role(
        &self,
        account: AccountId,
        name: &str,
        role: Role,
        actor: &str,
        now: UnixMillis,
    ) -> Result<(), MemberError>;
    /// Tokens the device's member used since `month_start`, and their quota (`None`: the
    /// device has no member with a quota).
    fn member_quota_use(
        &self,
        device: DeviceId,
        month_start: UnixMillis,
    ) -> Result<Option<(u64, u64)>, StorageError>;
    fn pending_invites(
        &self,
        account: AccountId,
        now: UnixMillis,
    ) -> Result<Vec<PendingInvite>, StorageError>;
    fn audit_log(&self, account: AccountId) -> Result<Vec<AuditRow>, StorageError>;
}

/// Adapter uploads in progress, the content an account holds, and adapter names.
pub trait AdapterStore {
    fn upload(
        &self,
        account: AccountId,
        upload: RequestId,
    ) -> Result<Option<UploadRow>, StorageError>;
    /// Whether the account holds content with this digest and size.
    fn holds_content(
        &self,
        account: AccountId,
        sha: &Sha256,
        size: u64,
    ) -> Result<bool, StorageError>;
    fn discard_upload(&self, account: AccountId, upload: RequestId) -> Result<(), StorageError>;
    fn adapter(&self, account: AccountId, name: &str) -> Result<Option<AdapterRow>, StorageError>;
    fn adapters(&self, account: AccountId) -> Result<Vec<AdapterRow>, StorageError>;
    /// Every account's uploads, oldest first (the operator's listing).
    fn upload_summaries(&self) -> Result<Vec<UploadSummary>, StorageError>;
}

/// Finished escalations' answers, and who may read them.
pub trait AnswerStore {
    /// The member a device acts for.
    fn asker_of_device(&self, device: DeviceId) -> Result<Option<Asker>, StorageError>;
    /// The member whose device asked `request_id` of `account`.
    fn asker(
        &self,
        account: AccountId,
        request_id: RequestId,
    ) -> Result<Option<Asker>, StorageError>;
    fn answer(
        &self,
        account: AccountId,
        request_id: RequestId,
    ) -> Result<Option<StoredAnswer>, StorageError>;
    fn put_answer(
        &self,
        account: AccountId,
        request_id: RequestId,
        answer: &StoredAnswer,
        at: UnixMillis,
    ) -> Result<(), StorageError>;
    /// The node running `request_id` of `account` at `now`, when one is: its hold is open, and
    /// the node it last ran on serves (`storage::NodeRow::serving`).
    fn running_on(
        &self,
        account: AccountId,
        request_id: RequestId,
        now: UnixMillis,
    ) -> Result<Option<String>, StorageError>;
}

/// [`AnswerStore::running_on`], in SQL both backends speak (`?1`… are `$1`… on PostgreSQL).
pub(crate) const RUNNING_ON: &str = "SELECT r.node FROM runs r
     JOIN nodes n ON n.id = r.node
     JOIN ledger_open_holds h ON h.account_id = r.account_id AND h.request_id = r.request_id
     WHERE r.account_id = ?1 AND r.request_id = ?2 AND n.stopped_at IS NULL AND n.seen_at >= ?3";

impl MemberStore for Unit<'_> {
    fn members(&self, account: AccountId) -> Result<Vec<MemberRow>, StorageError> {
        super::members::list(self.conn, account)
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
        super::members::add(self.conn, account, id, name, role, quota_tokens, actor, now)
    }

    fn set_member_role(
        &self,
        account: AccountId,
        name: &str,
        role: Role,
        actor: &str,
        now: UnixMillis,
    ) -> Result<(), MemberError> {
        super::members::set_role(self.conn, account, name, role, actor, now)
    }

    fn member_quota_use(
        &self,
        device: DeviceId,
        month_start: UnixMillis,
    ) -> Result<Option<(u64, u64)>, StorageError> {
        super::members::quota_use(self.conn, device, month_start)
    }

    fn pending_invites(
        &self,
        account: AccountId,
        now: UnixMillis,
    ) -> Result<Vec<PendingInvite>, StorageError> {
        super::members::pending_invites(self.conn, account, now)
    }

    fn audit_log(&self, account: AccountId) -> Result<Vec<AuditRow>, StorageError> {
        super::members::audit_log(self.conn, account)
    }
}

impl AdapterStore for Unit<'_> {
    fn upload(
        &self,
        account: AccountId,
        upload: RequestId,
    ) -> Result<Option<UploadRow>, StorageError> {
        super::adapters::upload_row(self.conn, account, upload)
    }

    fn holds_content(
        &self,
        account: AccountId,
        sha: &Sha256,
        size: u64,
    ) -> Result<bool, StorageError> {
        super::adapters::holds(self.conn, account, sha, size)
    }

    fn discard_upload(&self, account: AccountId, upload: RequestId) -> Result<(), StorageError> {
        super::adapters::discard(self.conn, account, upload)
    }

    fn adapter(&self, account: AccountId, name: &str) -> Result<Option<AdapterRow>, StorageError> {
        super::adapters::adapter(self.conn, account, name)
    }

    fn adapters(&self, account: AccountId) -> Result<Vec<AdapterRow>, StorageError> {
        super::adapters::list(self.conn, account)
    }

    fn upload_summaries(&self) -> Result<Vec<UploadSummary>, StorageError> {
        super::adapters::summaries(self.conn)
    }
}

impl AnswerStore for Unit<'_> {
    fn asker_of_device(&self, device: DeviceId) -> Result<Option<Asker>, StorageError> {
        super::answers::asker_of_device(self.conn, device)
    }

    fn asker(
        &self,
        account: AccountId,
        request_id: RequestId,
    ) -> Result<Option<Asker>, StorageError> {
        super::answers::asker(self.conn, account, request_id)
    }

    fn answer(
        &self,
        account: AccountId,
        request_id: RequestId,
    ) -> Result<Option<StoredAnswer>, StorageError> {
        super::answers::get(self.conn, account, request_id)
    }

    fn put_answer(
        &self,
        account: AccountId,
        request_id: RequestId,
        answer: &StoredAnswer,
        at: UnixMillis,
    ) -> Result<(), StorageError> {
        super::answers::put(self.conn, account, request_id, answer, at)
    }

    fn running_on(
        &self,
        account: AccountId,
        request_id: RequestId,
        now: UnixMillis,
    ) -> Result<Option<String>, StorageError> {
        use rusqlite::OptionalExtension;
        let since = now.0.saturating_sub(super::NODE_DEAD_AFTER_MS);
        Ok(self
            .conn
            .prepare_cached(RUNNING_ON)?
            .query_row(
                rusqlite::params![account.to_string(), request_id.to_string(), since],
                |r| r.get(0),
            )
            .optional()?)
    }
}

/// Changes to members that are a transaction of their own (each checks and writes at once,
/// under the database's write lock).
pub trait MemberChanges {
    fn invite(
        &mut self,
        invitation: &Invitation<'_>,
        now: UnixMillis,
    ) -> Result<Invited, MemberError>;
    /// Removes the member, revoking its devices and unused tokens; how many devices.
    fn remove_member(
        &mut self,
        account: AccountId,
        name: &str,
        actor: &str,
        now: UnixMillis,
    ) -> Result<u64, MemberError>;
    /// Ends the unused invitations of `invitee`; how many.
    fn revoke_invites(
        &mut self,
        account: AccountId,
        invitee: &str,
        actor: &str,
        now: UnixMillis,
    ) -> Result<u64, StorageError>;
    /// Offers the account to `to`; until when the offer stands.
    fn offer_handover(
        &mut self,
        account: AccountId,
        actor: &str,
        to: &str,
        now: UnixMillis,
    ) -> Result<UnixMillis, MemberError>;
    /// The offered member's device takes the account: the former and the new owner's names.
    fn accept_handover(
        &mut self,
        account: AccountId,
        device: DeviceId,
        now: UnixMillis,
    ) -> Result<(String, String), HandoverError>;
}

/// Changes to uploads and adapters that are a transaction of their own.
pub trait AdapterChanges {
    #[allow(clippy::too_many_arguments)]
    fn begin_upload(
        &mut self,
        account: AccountId,
        upload: RequestId,
        device: DeviceId,
        declared: &Declared,
        quota: Quota,
        now: UnixMillis,
        busy_since: UnixMillis,
    ) -> Result<Begun, StorageError>;
    fn record_chunks(
        &mut self,
        account: AccountId,
        upload: RequestId,
        held: &[u8],
        received: u64,
        now: UnixMillis,
    ) -> Result<(), StorageError>;
    fn complete_upload(
        &mut self,
        account: AccountId,
        upload: RequestId,
        device: DeviceId,
        declared: &Declared,
        now: UnixMillis,
    ) -> Result<(), StorageError>;
    fn remove_adapter(
        &mut self,
        account: AccountId,
        request: RequestId,
        name: &str,
        now: UnixMillis,
    ) -> Result<Removed, StorageError>;
    /// Drops uploads idle since `abandoned_before` and content unnamed since
    /// `released_before`: what the caller deletes from disk.
    fn sweep_uploads(
        &mut self,
        abandoned_before: UnixMillis,
        released_before: UnixMillis,
    ) -> Result<Swept, StorageError>;
}

impl MemberChanges for super::Db {
    fn invite(
        &mut self,
        invitation: &Invitation<'_>,
        now: UnixMillis,
    ) -> Result<Invited, MemberError> {
        super::members::invite(self.connection_mut(), invitation, now)
    }

    fn remove_member(
        &mut self,
        account: AccountId,
        name: &str,
        actor: &str,
        now: UnixMillis,
    ) -> Result<u64, MemberError> {
        super::members::remove(self.connection_mut(), account, name, actor, now)
    }

    fn revoke_invites(
        &mut self,
        account: AccountId,
        invitee: &str,
        actor: &str,
        now: UnixMillis,
    ) -> Result<u64, StorageError> {
        super::members::revoke_invites(self.connection_mut(), account, invitee, actor, now)
    }

    fn offer_handover(
        &mut self,
        account: AccountId,
        actor: &str,
        to: &str,
        now: UnixMillis,
    ) -> Result<UnixMillis, MemberError> {
        super::members::offer_handover(self.connection_mut(), account, actor, to, now)
    }

    fn accept_handover(
        &mut self,
        account: AccountId,
        device: DeviceId,
        now: UnixMillis,
    ) -> Result<(String, String), HandoverError> {
        super::members::accept_handover(self.connection_mut(), account, device, now)
    }
}

impl AdapterChanges for super::Db {
    fn begin_upload(
        &mut self,
        account: AccountId,
        upload: RequestId,
        device: DeviceId,
        declared: &Declared,
        quota: Quota,
        now: UnixMillis,
        busy_since: UnixMillis,
    ) -> Result<Begun, StorageError> {
        super::adapters::begin(
            self.connection_mut(),
            account,
            upload,
            device,
            declared,
            quota,
            now,
            busy_since,
        )
    }

    fn record_chunks(
        &mut self,
        account: AccountId,
        upload: RequestId,
        held: &[u8],
        received: u64,
        now: UnixMillis,
    ) -> Result<(), StorageError> {
        super::adapters::record_chunks(self.connection_mut(), account, upload, held, received, now)
    }

    fn complete_upload(
        &mut self,
        account: AccountId,
        upload: RequestId,
        device: DeviceId,
        declared: &Declared,
        now: UnixMillis,
    ) -> Result<(), StorageError> {
        super::adapters::complete(
            self.connection_mut(),
            account,
            upload,
            device,
            declared,
            now,
        )
    }

    fn remove_adapter(
        &mut self,
        account: AccountId,
        request: RequestId,
        name: &str,
        now: UnixMillis,
    ) -> Result<Removed, StorageError> {
        super::adapters::remove(self.connection_mut(), account, request, name, now)
    }

    fn sweep_uploads(
        &mut self,
        abandoned_before: UnixMillis,
        released_before: UnixMillis,
    ) -> Result<Swept, StorageError> {
        super::adapters::sweep(self.connection_mut(), abandoned_before, released_before)
    }
}
