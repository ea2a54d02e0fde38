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

/// A Managed account with $1 on it, in a fresh store, at a fixed time.
fn funded() -> (
    MemoryStore,
    synesis_billing::ledger::Account,
    synesis_billing::PriceTable,
    synesis_billing::TierRules,
    synesis_proto::UnixMillis,
) {
    let mut store = MemoryStore::default();
    let acct = rules::account(synesis_billing::Tier::Managed);
    let at = synesis_proto::UnixMillis(1_795_000_000_000);
    synesis_billing::ledger::top_up(
        &mut store,
        acct.id,
        rules::rid(100),
        synesis_billing::MicroUsd(1_000_000),
        at,
    )
    .unwrap();
    (store, acct, Default::default(), Default::default(), at)
}

/// What a request retried after a restart finds: each state of its hold, named.
#[test]
fn hold_state_names_where_a_request_stands() {
    use synesis_billing::Usage;
    use synesis_billing::ledger::{HoldState, hold, hold_state, settle, void};
    use synesis_proto::UnixMillis;

    let (mut store, acct, prices, tiers, at) = funded();
    let state =
        |store: &MemoryStore, n, now| hold_state(store, acct.id, rules::rid(n), now).unwrap();
    assert_eq!(state(&store, 1, at), HoldState::Unused);
    assert_eq!(state(&store, 100, at), HoldState::Other);
    for n in 1..=3 {
        hold(
            &mut store,
            acct,
            rules::rid(n),
            &rules::sonnet(),
            at,
            60_000,
            &prices,
            &tiers,
        )
        .unwrap();
    }
    assert!(matches!(state(&store, 1, at), HoldState::Active(_)));
    let usage = Usage {
        input_tokens: 1_000,
        output_tokens: 10,
    };
    let done = settle(&mut store, acct, rules::rid(1), usage, at, &prices, &tiers).unwrap();
    match state(&store, 1, at) {
        HoldState::Settled(e) => assert_eq!((e.amount, e.output_tokens), (done.amount, 10)),
        other => panic!("{other:?}"),
    }
    void(&mut store, acct.id, rules::rid(2), at).unwrap();
    assert_eq!(state(&store, 2, at), HoldState::Voided);
    assert_eq!(
        state(&store, 3, UnixMillis(at.0 + 60_001)),
        HoldState::Lapsed
    );
}

/// A hold that carries its request's own hash conflicts with the same id for another request,
/// even when the model and the token counts are the same.
#[test]
fn a_hold_with_a_request_body_conflicts_with_another_body() {
    use synesis_billing::ledger::hold;

    let (mut store, acct, prices, tiers, at) = funded();
    let with = |b: u8| synesis_billing::ledger::HoldRequest {
        request_body: Some([b; 32]),
        ..rules::sonnet()
    };
    let first = hold(
        &mut store,
        acct,
        rules::rid(1),
        &with(1),
        at,
        60_000,
        &prices,
        &tiers,
    )
    .unwrap();
    let again = hold(
        &mut store,
        acct,
        rules::rid(1),
        &with(1),
        at,
        60_000,
        &prices,
        &tiers,
    )
    .unwrap();
    assert_eq!(first, again, "the same request replays");
    assert!(matches!(
        hold(
            &mut store,
            acct,
            rules::rid(1),
            &with(2),
            at,
            60_000,
            &prices,
            &tiers
        ),
        Err(LedgerError::IdempotencyConflict)
    ));
}
