//! An account's usage on PostgreSQL ([`LedgerReads`]): the balance, the holds, the quota and a
//! page of charges, read in one read-only `REPEATABLE READ` transaction so they agree while the
//! ledger writer commits beside it (as SQLite's snapshot does, `storage::ledger::usage_reply`).

use std::collections::HashMap;

use deadpool_postgres::GenericClient;
use synesis_billing::ledger::{OpenHold, Store, StoreError, Totals};
use synesis_proto::message::{UsageReply, UsageRequest};
use synesis_proto::{AccountId, RequestId, UnixMillis};
use tokio_postgres::IsolationLevel;

use super::{COLUMNS, Pg, read_entry, read_hold, read_totals, store_error};
use crate::storage::Account;
use crate::storage::answers::Asker;
use crate::storage::ledger::{LedgerReads, UsageError, charges_of, next_page, reply_of};

/// What `synesis_billing::ledger::balance` reads, read ahead.
struct Read {
    totals: Totals,
    lapsed: Vec<OpenHold>,
}

impl Store for Read {
    fn request_entries(
        &self,
        _: AccountId,
        _: RequestId,
    ) -> Result<Vec<synesis_billing::ledger::Entry>, StoreError> {
        Err(StoreError::Corrupt("a usage read asks no request".into()))
    }

    fn head(&self, _: AccountId) -> Result<(u64, [u8; 32]), StoreError> {
        Err(StoreError::Corrupt(
            "a usage read asks no chain head".into(),
        ))
    }

    fn totals(&self, _: AccountId) -> Result<Totals, StoreError> {
        Ok(self.totals)
    }

    fn lapsed_holds(&self, _: AccountId, _: UnixMillis) -> Result<Vec<OpenHold>, StoreError> {
        Ok(self.lapsed.clone())
    }

    fn append(&mut self, _: &synesis_billing::ledger::Entry, _: &Totals) -> Result<(), StoreError> {
        Err(StoreError::Constraint("a usage read writes nothing".into()))
    }
}

fn err(e: &tokio_postgres::Error) -> UsageError {
    UsageError::from(store_error(e))
}

impl LedgerReads for Pg {
    fn usage(
        &self,
        account: &Account,
        request: &UsageRequest,
        now: UnixMillis,
        rules: &synesis_billing::TierRules,
        page: usize,
    ) -> Result<UsageReply, UsageError> {
        self.member_usage(account, None, request, now, rules, page)
    }

    fn member_usage(
        &self,
        account: &Account,
        member: Option<&Asker>,
        request: &UsageRequest,
        now: UnixMillis,
        rules: &synesis_billing::TierRules,
        page: usize,
    ) -> Result<UsageReply, UsageError> {
        let page = page.clamp(1, synesis_proto::message::USAGE_CHARGES_MAX);
        let acct = account.id.to_string();
        let member = member.map(Asker::as_str);
        let (read, mut entries, members) = self.io().wait(async {
            let mut client = self
                .client()
                .await
                .map_err(|e| UsageError::from(StoreError::from(e)))?;
            let tx = client
                .build_transaction()
                .isolation_level(IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(|e| err(&e))?;
            let totals = match tx
                .query_opt(
                    "SELECT balance, quota_year, quota_month, quota_settled, open_held, open_quota
                     FROM ledger_totals WHERE account_id = $1",
                    &[&acct],
                )
                .await
                .map_err(|e| err(&e))?
            {
                Some(r) => read_totals(&r, 0)?,
                None => Totals::default(),
            };
            let lapsed = tx
                .query(
                    "SELECT request_id, amount, quota_tokens, expires_at FROM ledger_open_holds
                     WHERE account_id = $1 AND expires_at <= $2",
                    &[&acct, &now.0],
                )
                .await
                .map_err(|e| err(&e))?
                .iter()
                .map(|r| read_hold(r, 0))
                .collect::<Result<Vec<_>, _>>()?;
            let entries = charges(&tx, &acct, member, request, page).await?;
            let members: HashMap<String, String> = tx
                .query(
                    "SELECT d.id, m.name FROM devices d JOIN members m ON m.id = d.member_id
                     WHERE d.account_id = $1",
                    &[&acct],
                )
                .await
                .map_err(|e| err(&e))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect();
            tx.commit().await.map_err(|e| err(&e))?;
            Ok::<_, UsageError>((Read { totals, lapsed }, entries, members))
        })?;
        let balance = synesis_billing::ledger::balance(&read, account.id, now)?;
        let next = next_page(&mut entries, page);
        Ok(reply_of(
            account,
            request,
            &balance,
            charges_of(entries, &members),
            next,
            rules,
        ))
    }
}

/// The settlements after the request's cursor (and at or after its `since`), of `member`'s
/// devices or all: a page and one more, in the listing's order (`storage::ledger::charges_page`).
async fn charges(
    tx: &impl GenericClient,
    acct: &str,
    member: Option<&str>,
    request: &UsageRequest,
    page: usize,
) -> Result<Vec<synesis_billing::ledger::Entry>, UsageError> {
    const _: () = assert!(synesis_billing::ledger::EntryKind::Settle.code() == 3);
    // "At or after `since`" is "after (since, -1)": every seq is at least 0.
    let mut from = (request.since.map_or(i64::MIN, |t| t.0), -1_i64);
    if let Some(after) = request.after {
        let cursor = tx
            .query_opt(
                "SELECT at, seq FROM ledger_entries
                 WHERE account_id = $1 AND request_id = $2 AND kind = 3
                 AND ($3::TEXT IS NULL OR device_id IN (SELECT id FROM devices WHERE member_id = $3))",
                &[&acct, &after.to_string(), &member],
            )
            .await
            .map_err(|e| err(&e))?
            .ok_or(UsageError::UnknownCursor(after))?;
        from = from.max((cursor.get(0), cursor.get(1)));
    }
    let limit = i64::try_from(page + 1).unwrap_or(i64::MAX);
    let rows = tx
        .query(
            &format!(
                "SELECT {COLUMNS} FROM ledger_entries
                 WHERE account_id = $1 AND kind = 3 AND (at, seq) > ($2, $3)
                 AND ($5::TEXT IS NULL OR device_id IN (SELECT id FROM devices WHERE member_id = $5))
                 ORDER BY at, seq LIMIT $4"
            ),
            &[&acct, &from.0, &from.1, &limit, &member],
        )
        .await
        .map_err(|e| err(&e))?;
    Ok(rows.iter().map(read_entry).collect::<Result<Vec<_>, _>>()?)
}
