//! What can go wrong with the local ledger. The messages say what happened; what the user should
//! do about it is the CLI's to say.

use std::path::PathBuf;

use synesis_billing::BillingError;
use synesis_proto::RequestId;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot create the directory for the local ledger {path}: {error}")]
    CreateDir {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot create the local ledger {path}: {error}")]
    CreateFile {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not an SQLite database, damaged, or another program's database.
    #[error(
        "{path} is not a Synesis local ledger (not an SQLite database, damaged, or another \
         program's database)"
    )]
    NotALedger { path: PathBuf },
    /// Written by a newer build, with a schema this one does not read.
    #[error(
        "the local ledger {path} has schema version {found}, newer than this build reads \
         ({supported})"
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("local ledger {path}: {error}")]
    Sqlite {
        path: PathBuf,
        error: rusqlite::Error,
    },
    #[error("local ledger {path} holds a value this build cannot read: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("request {0} is already in the local ledger")]
    Duplicate(RequestId),
    #[error("the cloud cost avoided cannot be computed")]
    Cost(#[from] BillingError),
    #[error("the local ledger's totals do not fit in 64 bits")]
    Overflow,
}
