//! The ledger rules under storms, races, expiry, bad input and tampering.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::cast_possible_truncation
)] // test code

use std::sync::{Arc, Mutex};

use synesis_billing::ledger::{
    Account, EntryKind, HOLD_TTL_DEFAULT_MS, HoldRequest, LedgerError, MemoryStore, Store, balance,
    expire_due, hold, settle, top_up, verify, void,
};
use synesis_billing::{MicroUsd, PriceTable, Tier, TierRules, Usage};
use synesis_proto::{AccountId, RequestId, UnixMillis};

const NOW: UnixMillis = UnixMillis(1_795_000_000_000);

fn account(tier: Tier) -> Account {
    Account {
        id: "0190f3a2-7c1e-7b3d-9f00-00000000a001"
            .parse::<AccountId>()
            .unwrap(),
        tier,
    }
}

fn rid(n: u64) -> RequestId {
    RequestId::from_parts(1_795_000_000_000 + n, [u8::try_from(n % 251).unwrap(); 10])
}

/// A Sonnet request: 1,000 input tokens, up to 250 output (Managed: 6,953 µUSD).
fn sonnet() -> HoldRequest {
    HoldRequest {
        device: None,
        model: "claude-sonnet".into(),
        input_tokens: 1_000,
        max_output_tokens: 250,
    }
}

fn funded(amount: i64) -> MemoryStore {
    let mut store = MemoryStore::default();
    top_up(
        &mut store,
        account(Tier::Managed).id,
        rid(1_000_000),
        MicroUsd(amount),
        NOW,
    )
    .unwrap();
    store
}

fn hold_now(
    store: &mut MemoryStore,
    id: RequestId,
) -> Result<synesis_billing::ledger::Outcome, LedgerError> {
    hold(
        store,
        account(Tier::Managed),
        id,
        &sonnet(),
        NOW,
        HOLD_TTL_DEFAULT_MS,
        &PriceTable::default(),
        &TierRules::default(),
    )
}

#[test]
fn hold_then_settle_charges_the_actual_usage_at_most_the_hold() {
    let mut store = funded(10_000_000);
    let held = hold_now(&mut store, rid(1)).unwrap();
    assert_eq!(held.amount, MicroUsd(6_953));
    let b = balance(&store, account(Tier::Managed).id, NOW).unwrap();
    assert_eq!(
        (b.balance.0, b.held.0, b.available.0),
        (10_000_000, 6_953, 9_993_047)
    );

    let usage = Usage {
        input_tokens: 1_000,
        output_tokens: 100,
    };
    let settled = settle(
        &mut store,
        account(Tier::Managed),
        rid(1),
        usage,
        NOW,
        &PriceTable::default(),
        &TierRules::default(),
    )
    .unwrap();
    // 3,000 + 1,500 = 4,500; 3 % = 135 → 4,635
    assert_eq!(settled.amount, MicroUsd(4_635));
    let b = balance(&store, account(Tier::Managed).id, NOW).unwrap();
    assert_eq!((b.balance.0, b.held.0), (10_000_000 - 4_635, 0));

    // More usage than held is charged the hold, not more.
    hold_now(&mut store, rid(2)).unwrap();
    let huge = Usage {
        input_tokens: 1_000,
        output_tokens: 100_000,
    };
    let capped = settle(
        &mut store,
        account(Tier::Managed),
        rid(2),
        huge,
        NOW,
        &PriceTable::default(),
        &TierRules::default(),
    )
    .unwrap();
    assert_eq!(capped.amount, MicroUsd(6_953));
    verify(&store.entries).unwrap();
}

#[test]
fn a_duplicate_storm_charges_once() {
    let store = Arc::new(Mutex::new(funded(10_000_000)));
    let usage = Usage {
        input_tokens: 1_000,
        output_tokens: 250,
    };
    let threads: Vec<_> = (0..64)
        .map(|t| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                let per_thread = if t < 1_000 % 64 {
                    1_000 / 64 + 1
                } else {
                    1_000 / 64
                };
                for _ in 0..per_thread {
                    let mut s = store.lock().unwrap();
                    hold_now(&mut s, rid(7)).unwrap();
                    settle(
                        &mut *s,
                        account(Tier::Managed),
                        rid(7),
                        usage,
                        NOW,
                        &PriceTable::default(),
                        &TierRules::default(),
                    )
                    .unwrap();
                }
            })
        })
        .collect();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let s = store.lock().unwrap();
    let charges = s
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Settle)
        .count();
    let holds = s
        .entries
        .iter()
        .filter(|e| e.kind == EntryKind::Hold)
        .count();
    assert_eq!((holds, charges), (1, 1));
    assert_eq!(
        balance(&*s, account(Tier::Managed).id, NOW)
            .unwrap()
            .balance,
        MicroUsd(10_000_000 - 6_953)
    );
}

#[test]
fn the_same_id_with_another_body_is_refused_and_changes_nothing() {
    let mut store = funded(10_000_000);
    hold_now(&mut store, rid(1)).unwrap();
    let head = store.head().unwrap();
    let other = HoldRequest {
        max_output_tokens: 251,
        ..sonnet()
    };
    let err = hold(
        &mut store,
        account(Tier::Managed),
        rid(1),
        &other,
        NOW,
        HOLD_TTL_DEFAULT_MS,
        &PriceTable::default(),
        &TierRules::default(),
    )
    .unwrap_err();
    assert_eq!(err, LedgerError::IdempotencyConflict);
    let err = top_up(
        &mut store,
        account(Tier::Managed).id,
        rid(1),
        MicroUsd(5),
        NOW,
    )
    .unwrap_err();
    assert_eq!(err, LedgerError::IdempotencyConflict);
    assert_eq!(store.head().unwrap(), head, "the ledger is unchanged");
}

#[test]
fn concurrent_holds_never_overdraw() {
    // Covers 10 holds of 6,953 and a bit, not 11.
    let store = Arc::new(Mutex::new(funded(6_953 * 10 + 100)));
    let results: Vec<_> = (0..64)
        .map(|i| {
            let store = Arc::clone(&store);
            std::thread::spawn(move || hold_now(&mut store.lock().unwrap(), rid(100 + i)))
        })
        .map(|t| t.join().unwrap())
        .collect();
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 10);
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| matches!(e, LedgerError::InsufficientFunds { .. }))
    );
    let s = store.lock().unwrap();
    let b = balance(&*s, account(Tier::Managed).id, NOW).unwrap();
    assert_eq!(b.available, MicroUsd(100));
    assert_eq!(
        s.entries
            .iter()
            .filter(|e| e.kind == EntryKind::Settle)
            .count(),
        0,
        "nothing charged"
    );
}

#[test]
fn an_unsettled_hold_expires_and_a_late_settle_is_refused() {
    let mut store = funded(10_000);
    hold_now(&mut store, rid(1)).unwrap();
    let later = UnixMillis(NOW.0 + HOLD_TTL_DEFAULT_MS);
    let b = balance(&store, account(Tier::Managed).id, later).unwrap();
    assert_eq!(
        (b.held.0, b.available.0),
        (0, 10_000),
        "the amount is released at expiry"
    );
    let usage = Usage {
        input_tokens: 10,
        output_tokens: 10,
    };
    let err = settle(
        &mut store,
        account(Tier::Managed),
        rid(1),
        usage,
        later,
        &PriceTable::default(),
        &TierRules::default(),
    )
    .unwrap_err();
    assert_eq!(err, LedgerError::HoldExpired);
    assert_eq!(
        expire_due(&mut store, account(Tier::Managed).id, later),
        Ok(1)
    );
    assert_eq!(
        expire_due(&mut store, account(Tier::Managed).id, later),
        Ok(0)
    );
    // A voided hold cannot be settled either.
    hold_now(&mut store, rid(2)).unwrap();
    void(&mut store, account(Tier::Managed).id, rid(2), NOW).unwrap();
    let err = settle(
        &mut store,
        account(Tier::Managed),
        rid(2),
        usage,
        NOW,
        &PriceTable::default(),
        &TierRules::default(),
    )
    .unwrap_err();
    assert_eq!(err, LedgerError::HoldVoided);
    verify(&store.entries).unwrap();
}

#[test]
fn bad_input_is_a_typed_error_and_leaves_the_chain_unchanged() {
    let mut store = funded(10_000_000);
    let head = store.head().unwrap();
    let rules = TierRules::default();
    let huge = HoldRequest {
        device: None,
        model: "claude-opus".into(),
        input_tokens: u64::MAX,
        max_output_tokens: u64::MAX,
    };
    let err = hold(
        &mut store,
        account(Tier::Managed),
        rid(1),
        &huge,
        NOW,
        HOLD_TTL_DEFAULT_MS,
        &PriceTable::default(),
        &rules,
    )
    .unwrap_err();
    assert!(matches!(err, LedgerError::Billing(_)), "{err:?}");
    let unknown = HoldRequest {
        device: None,
        model: "gpt-9".into(),
        ..sonnet()
    };
    assert!(matches!(
        hold(
            &mut store,
            account(Tier::Managed),
            rid(2),
            &unknown,
            NOW,
            HOLD_TTL_DEFAULT_MS,
            &PriceTable::default(),
            &rules
        ),
        Err(LedgerError::Billing(_))
    ));
    assert!(matches!(
        hold(
            &mut store,
            account(Tier::Managed),
            rid(3),
            &sonnet(),
            NOW,
            HOLD_TTL_DEFAULT_MS,
            &PriceTable::empty(),
            &rules
        ),
        Err(LedgerError::Billing(_))
    ));
    assert_eq!(
        top_up(
            &mut store,
            account(Tier::Managed).id,
            rid(4),
            MicroUsd(0),
            NOW
        ),
        Err(LedgerError::NotPositive)
    );
    assert_eq!(
        top_up(
            &mut store,
            account(Tier::Managed).id,
            rid(5),
            MicroUsd(i64::MAX),
            NOW
        ),
        Err(LedgerError::Overflow)
    );
    assert_eq!(store.head().unwrap(), head);
    // Empty and oversized ids never reach the ledger: they are not request ids.
    assert!("".parse::<RequestId>().is_err());
    assert!("x".repeat(10 << 20).parse::<RequestId>().is_err());
}

#[test]
fn the_free_quota_refuses_a_request_that_would_cross_it() {
    let free = account(Tier::Free);
    let rules = TierRules {
        free_quota_tokens: 1_000,
        ..TierRules::default()
    };
    let mut store = MemoryStore::default();
    let ask = |store: &mut MemoryStore, n: u64, tokens: u64| {
        let request = HoldRequest {
            device: None,
            model: "claude-sonnet".into(),
            input_tokens: tokens,
            max_output_tokens: 0,
        };
        hold(
            store,
            free,
            rid(n),
            &request,
            NOW,
            HOLD_TTL_DEFAULT_MS,
            &PriceTable::default(),
            &rules,
        )
    };
    ask(&mut store, 1, 999).unwrap();
    assert!(
        matches!(ask(&mut store, 2, 2), Err(LedgerError::Quota(_))),
        "999 + 2 > 1,000"
    );
    ask(&mut store, 3, 1).unwrap(); // exactly the quota
    assert_eq!(
        balance(&store, free.id, NOW).unwrap().quota_tokens_used,
        1_000
    );
    // Next month (UTC) the settled tokens no longer count.
    let usage = Usage {
        input_tokens: 999,
        output_tokens: 0,
    };
    settle(
        &mut store,
        free,
        rid(1),
        usage,
        NOW,
        &PriceTable::default(),
        &rules,
    )
    .unwrap();
    settle(
        &mut store,
        free,
        rid(3),
        Usage {
            input_tokens: 1,
            output_tokens: 0,
        },
        NOW,
        &PriceTable::default(),
        &rules,
    )
    .unwrap();
    let next_month = UnixMillis(NOW.0 + 31 * 24 * 3_600 * 1_000);
    assert_eq!(
        balance(&store, free.id, next_month)
            .unwrap()
            .quota_tokens_used,
        0
    );
}

#[test]
fn tampering_is_found_at_the_first_bad_entry() {
    let mut store = funded(10_000_000);
    for i in 0..5 {
        hold_now(&mut store, rid(i)).unwrap();
    }
    verify(&store.entries).unwrap();

    let mut edited = store.entries.clone();
    edited[3].amount = MicroUsd(1);
    assert_eq!(verify(&edited).unwrap_err().seq, 3);

    let mut deleted = store.entries.clone();
    deleted.remove(2);
    assert_eq!(verify(&deleted).unwrap_err().position, 2);

    let mut reordered = store.entries.clone();
    reordered.swap(1, 4);
    assert_eq!(verify(&reordered).unwrap_err().position, 1);
}

#[test]
fn the_kept_totals_are_what_the_entries_say() {
    let acct = account(Tier::Managed);
    let mut store = funded(10_000_000);
    for i in 0..12 {
        hold_now(&mut store, rid(i)).unwrap();
    }
    let (prices, rules) = (PriceTable::default(), TierRules::default());
    for i in 0..4 {
        let usage = Usage {
            input_tokens: 900 + i,
            output_tokens: 100,
        };
        settle(&mut store, acct, rid(i), usage, NOW, &prices, &rules).unwrap();
    }
    void(&mut store, acct.id, rid(4), NOW).unwrap();
    let mid = synesis_billing::ledger::rebuild_states(&store.entries).unwrap();
    assert_eq!(store.totals(acct.id).unwrap(), mid[&acct.id].totals);
    assert_eq!(mid[&acct.id].open_holds.len(), 7);
    assert_eq!(
        balance(&store, acct.id, NOW).unwrap().held,
        MicroUsd(7 * 6_953)
    );
    let later = UnixMillis(NOW.0 + HOLD_TTL_DEFAULT_MS);
    assert_eq!(expire_due(&mut store, acct.id, later).unwrap(), 7);

    let rebuilt = synesis_billing::ledger::rebuild_states(&store.entries).unwrap();
    let state = &rebuilt[&acct.id];
    assert_eq!(store.totals(acct.id).unwrap(), state.totals);
    assert!(store.lapsed_holds(acct.id, later).unwrap().is_empty());
    assert!(state.open_holds.is_empty());
    let b = balance(&store, acct.id, later).unwrap();
    assert_eq!(b.balance, state.totals.balance);
    assert_eq!(b.held, MicroUsd::ZERO);
}
