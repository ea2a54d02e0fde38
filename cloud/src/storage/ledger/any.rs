//! A ledger operation on whichever backend the cloud stores in: [`LedgerTx`], what an operation
//! works on (the billing rules' [`Store`], [`LedgerUnit`], vouchers), and [`Writer`], the
//! group-commit writer of either backend. Handlers write an operation once; the backend's writer
//! runs it in its batch.

use synesis_billing::ledger::{Entry, LedgerError, OpenHold, Store, StoreError, Totals};
use synesis_proto::{AccountId, DeviceId, MicroUsd, RequestId, UnixMillis};

use super::{LedgerUnit, LedgerWriter, SqliteLedger};
use crate::storage::answers::{Asker, StoredAnswer};
use crate::storage::postgres::ledger::{PgLedger, PgLedgerWriter};

/// The ledger inside one operation of a batch, on either backend.
#[derive(Debug)]
pub enum LedgerTx<'a, 'b> {
    Sqlite(&'a mut SqliteLedger<'b>),
    Postgres(&'a mut PgLedger<'b>),
}

/// Runs `$body` on the backend's store, bound to `$s`.
macro_rules! on {
    ($tx:expr, $s:ident => $body:expr) => {
        match $tx {
            LedgerTx::Sqlite($s) => $body,
            LedgerTx::Postgres($s) => $body,
        }
    };
}

impl Store for LedgerTx<'_, '_> {
    fn request_entries(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Vec<Entry>, StoreError> {
        on!(self, s => s.request_entries(account, request))
    }

    fn head(&self, account: AccountId) -> Result<(u64, [u8; 32]), StoreError> {
        on!(self, s => s.head(account))
    }

    fn totals(&self, account: AccountId) -> Result<Totals, StoreError> {
        on!(self, s => s.totals(account))
    }

    fn lapsed_holds(
        &self,
        account: AccountId,
        now: UnixMillis,
    ) -> Result<Vec<OpenHold>, StoreError> {
        on!(self, s => s.lapsed_holds(account, now))
    }

    fn append(&mut self, entry: &Entry, totals: &Totals) -> Result<(), StoreError> {
        on!(self, s => s.append(entry, totals))
    }
}

impl LedgerUnit for LedgerTx<'_, '_> {
    fn running(
        &self,
        account: AccountId,
        now: UnixMillis,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        on!(self, s => s.running(account, now, at_most))
    }

    fn member_quota_use(
        &self,
        device: DeviceId,
        month_start: UnixMillis,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        on!(self, s => s.member_quota_use(device, month_start))
    }

    fn asker(&self, account: AccountId, request: RequestId) -> Result<Option<Asker>, StoreError> {
        on!(self, s => s.asker(account, request))
    }

    fn answer(
        &self,
        account: AccountId,
        request: RequestId,
    ) -> Result<Option<StoredAnswer>, StoreError> {
        on!(self, s => s.answer(account, request))
    }

    fn put_answer(
        &self,
        account: AccountId,
        request: RequestId,
        answer: &StoredAnswer,
        at: UnixMillis,
    ) -> Result<(), StoreError> {
        on!(self, s => s.put_answer(account, request, answer, at))
    }

    fn runner(&self, account: AccountId, request: RequestId) -> Result<Option<String>, StoreError> {
        on!(self, s => s.runner(account, request))
    }

    fn set_runner(
        &self,
        account: AccountId,
        request: RequestId,
        node: &str,
    ) -> Result<(), StoreError> {
        on!(self, s => s.set_runner(account, request, node))
    }

    fn node_serving(&self, id: &str, now: UnixMillis) -> Result<bool, StoreError> {
        on!(self, s => s.node_serving(id, now))
    }
}

impl LedgerTx<'_, '_> {
    /// The accounts with an open hold past its time at `now`.
    pub fn accounts_with_lapsed_holds(
        &self,
        now: UnixMillis,
    ) -> Result<Vec<AccountId>, StoreError> {
        on!(self, s => s.accounts_with_lapsed_holds(now))
    }

    /// Redeems a voucher for `account`'s `request` (`SqliteLedger::redeem_voucher`).
    pub fn redeem_voucher(
        &self,
        code: &str,
        account: AccountId,
        request: RequestId,
        now: UnixMillis,
    ) -> Result<Option<MicroUsd>, LedgerError> {
        on!(self, s => s.redeem_voucher(code, account, request, now))
    }
}

/// The ledger writer of either backend; cheap to clone.
#[derive(Debug, Clone)]
pub enum Writer {
    Sqlite(LedgerWriter),
    Postgres(PgLedgerWriter),
}

impl Writer {
    /// Tells `observe` of every batch the writer runs from now on.
    pub fn observe(&self, observe: super::BatchObserver) {
        match self {
            Writer::Sqlite(w) => w.observe(observe),
            Writer::Postgres(w) => w.observe(observe),
        }
    }

    /// Runs `op` as one ledger operation and answers once it is durable.
    pub async fn run<T, F>(&self, op: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut LedgerTx<'_, '_>) -> Result<T, LedgerError> + Send + 'static,
    {
        match self {
            Writer::Sqlite(w) => w.run(move |s| op(&mut LedgerTx::Sqlite(s))).await,
            Writer::Postgres(w) => w.run(move |s| op(&mut LedgerTx::Postgres(s))).await,
        }
    }

    /// [`run`](Self::run) for a thread outside the async runtime.
    pub fn run_blocking<T, F>(&self, op: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&mut LedgerTx<'_, '_>) -> Result<T, LedgerError> + Send + 'static,
    {
        match self {
            Writer::Sqlite(w) => w.run_blocking(move |s| op(&mut LedgerTx::Sqlite(s))),
            Writer::Postgres(w) => w.run_blocking(move |s| op(&mut LedgerTx::Postgres(s))),
        }
    }
}
