//! The cloud's authoritative ledger: `synesis-billing`'s rules over the store in
//! [`crate::storage::ledger`]. The server's operations go through the [`Writer`] (group
//! commit, durable); `admin` runs one operation per transaction through [`transaction`].

use synesis_billing::ledger::LedgerError;
use synesis_proto::UnixMillis;

pub use crate::storage::ledger::{
    LedgerReads, LedgerTx, LedgerUnit, LedgerWriter, SqliteLedger, UsageError, Writer, transaction,
};

/// Writes an expiry entry for every open hold past its time, in every account (one ledger
/// operation per account, through the writer). Returns how many holds expired.
///
/// Lapsed holds already count for nothing in balances; the entries make their end part of the
/// chain and drop them from the open holds.
pub async fn expire_lapsed(writer: &Writer, now: UnixMillis) -> Result<usize, LedgerError> {
    let accounts = writer
        .run(move |store| Ok(store.accounts_with_lapsed_holds(now)?))
        .await?;
    let mut expired = 0;
    for account in accounts {
        expired += writer
            .run(move |store| synesis_billing::ledger::expire_due(store, account, now))
            .await?;
    }
    Ok(expired)
}
