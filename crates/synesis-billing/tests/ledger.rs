//! The ledger rules under storms, races, expiry, bad input and tampering, on the in-memory
//! store. The same table runs on SQLite in `cloud/tests/ledger_rules_sqlite.rs`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // test code

use std::sync::Mutex;

use synesis_billing::ledger::{Entry, LedgerError, MemoryStore};

mod rules;

/// The in-memory store behind one mutex, held for each whole operation.
///
/// `MemoryStore` is not thread-safe, and an operation (read the request's entries and the
/// totals, decide, append) is its unit of work, as a transaction is SQLite's: the mutex is what
/// makes it atomic, so these tests do not test the store's atomicity. The concurrent scenarios'
/// threads still run at once and contend for it, so the operations arrive in an order nobody
/// chose: what they test here is that the rules (retries answered with the first outcome, one
/// charge per request, no overdraft) hold for any interleaving of whole operations. That a
/// real store keeps operations whole under concurrency is the SQLite run's to show.
#[derive(Debug, Default)]
struct Memory(Mutex<MemoryStore>);

impl rules::Ledger for Memory {
    fn run(&self, op: rules::Op) -> Result<rules::Done, LedgerError> {
        op.apply(&mut *self.0.lock().unwrap())
    }

    fn entries(&self) -> Vec<Entry> {
        self.0.lock().unwrap().entries.clone()
    }
}

rules::rule_tests!(Memory::default);
