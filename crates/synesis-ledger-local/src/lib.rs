//! `synesis-ledger-local` — the device's local ledger.
//!
//! What it owns: one SQLite file ([`LEDGER_FILE`] in the data directory) with one row per request
//! id, of two kinds ([`EntryKind`]):
//! - `local`: an answer this device made itself ([`LocalGeneration`], recorded by
//!   [`LocalLedger::record_local`]), with the cloud cost it avoided ([`cloud_cost_avoided`]).
//! - `cloud`: a charge mirrored from the cloud's ledger ([`CloudCharge`]). The cloud is the
//!   authority: where the two disagree the cloud's values win and the difference is reported,
//!   never silently dropped.
//!
//! The rules are pure and live apart from the storage: [`reconcile`] compares what the device
//! holds ([`Entry`]) with the cloud's list and returns a [`SyncPlan`] (what to add, what to
//! correct, what the cloud lacks, what conflicts); [`machine_charges`] picks this machine's
//! charges from the account's. [`LocalLedger`] (`store`) reads the rows, asks [`reconcile`] and
//! applies its plan in one transaction; [`LocalLedger::summary`] gives the totals ([`Summary`])
//! that `synesis usage` shows.
//!
//! What it must not do: read a clock (every time, `at` and `now`, comes from the caller), depend
//! on the CLI, the tunnel or the cloud, or use floating point for money (amounts are integer
//! micro-USD). Errors are one typed enum, [`LedgerError`]; what to tell the user is the CLI's.

mod entry;
mod error;
mod reconcile;
mod store;
mod summary;

pub use entry::{
    CloudCharge, Entry, EntryKind, LocalGeneration, REFERENCE_MODEL, cloud_cost_avoided,
};
pub use error::LedgerError;
pub use reconcile::{
    ChargeChange, ConflictReason, SyncConflict, SyncCounts, SyncPlan, SyncReport, machine_charges,
    reconcile,
};
pub use store::{LEDGER_FILE, LocalLedger};
pub use summary::{CloudTotals, GroupTotals, Grouping, LocalTotals, ModelTotals, Summary};
