//! The ledger rules' scenarios, written once for any store. `tests/ledger.rs` runs the table
//! ([`rule_tests!`]) on the in-memory store, `cloud/tests/ledger_rules_sqlite.rs` on SQLite
//! through the cloud's ledger writer. The cloud includes this file by path: it may depend on
//! billing, not the reverse, and the scenarios spawn threads, which the pure library must not.
//!
//! A scenario gets a fresh, empty [`Ledger`] and sends it [`Op`]s, each one ledger operation.
//! The concurrent ones send from [`THREADS`] threads released together by a barrier, with no
//! lock of their own: how a store makes one operation atomic is its harness's business (a mutex
//! around the memory store, a savepoint in the writer's transaction for SQLite). After every
//! scenario, [`check_kept_state`] compares what the store keeps with what its entries say.

use std::collections::BTreeMap;
use std::sync::Barrier;

use synesis_billing::ledger::{
    Account, Balance, Entry, EntryKind, HOLD_TTL_DEFAULT_MS, HoldRequest, LedgerError, OpenHold,
    Outcome, Store, Totals, balance, expire_due, hold, rebuild_states, settle, top_up, verify,
    void,
};
use synesis_billing::{MicroUsd, PriceTable, Tier, TierRules, Usage};
use synesis_proto::{AccountId, RequestId, UnixMillis};

pub(crate) const NOW: UnixMillis = UnixMillis(1_795_000_000_000);

/// Threads that send at once in the concurrent scenarios.
pub(crate) const THREADS: usize = 64;

/// A store under test, with whatever makes one operation atomic on it.
pub(crate) trait Ledger: Sync {
    /// Runs `op` as one ledger operation; answers once its outcome is kept.
    fn run(&self, op: Op) -> Result<Done, LedgerError>;
    /// Every entry kept so far, in sequence order.
    fn entries(&self) -> Vec<Entry>;
}

/// One ledger operation, as data, so that any store's harness can run it in its own unit of
/// work (a closure generic over the store could not cross into the SQLite writer's thread).
#[derive(Debug, Clone)]
pub(crate) enum Op {
    TopUp {
        account: AccountId,
        id: RequestId,
        amount: MicroUsd,
        at: UnixMillis,
    },
    Hold {
        account: Account,
        id: RequestId,
        request: HoldRequest,
        at: UnixMillis,
        prices: PriceTable,
        rules: TierRules,
    },
    Settle {
        account: Account,
        id: RequestId,
        usage: Usage,
        at: UnixMillis,
        rules: TierRules,
    },
    Void {
        account: AccountId,
        id: RequestId,
        at: UnixMillis,
    },
    ExpireDue {
        account: AccountId,
        at: UnixMillis,
    },
    Balance {
        account: AccountId,
        at: UnixMillis,
    },
    Totals(AccountId),
    /// The open holds not active at `at`.
    Lapsed {
        account: AccountId,
        at: UnixMillis,
    },
    /// The account's chain head.
    Head(AccountId),
}

/// What an [`Op`] answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Done {
    Outcome(Outcome),
    Expired(usize),
    Voided,
    Balance(Balance),
    Totals(Totals),
    Lapsed(Vec<OpenHold>),
    Head(u64, [u8; 32]),
}

impl Op {
    /// The account and request it is about, for a store that reads ahead by them.
    #[allow(dead_code)] // the stores that read ahead use it; the others need not
    pub(crate) fn key(&self) -> Option<(AccountId, RequestId)> {
        match self {
            Op::TopUp { account, id, .. } | Op::Void { account, id, .. } => Some((*account, *id)),
            Op::Hold { account, id, .. } | Op::Settle { account, id, .. } => {
                Some((account.id, *id))
            }
            _ => None,
        }
    }

    pub(crate) fn apply<S: Store>(self, s: &mut S) -> Result<Done, LedgerError> {
        let prices = PriceTable::default();
        Ok(match self {
            Op::TopUp {
                account,
                id,
                amount,
                at,
            } => Done::Outcome(top_up(s, account, id, amount, at)?),
            Op::Hold {
                account,
                id,
                request,
                at,
                prices,
                rules,
            } => Done::Outcome(hold(
                s,
                account,
                id,
                &request,
                at,
                HOLD_TTL_DEFAULT_MS,
                &prices,
                &rules,
            )?),
            Op::Settle {
                account,
                id,
                usage,
                at,
                rules,
            } => Done::Outcome(settle(s, account, id, usage, at, &prices, &rules)?),
            Op::Void { account, id, at } => {
                void(s, account, id, at)?;
                Done::Voided
            }
            Op::ExpireDue { account, at } => Done::Expired(expire_due(s, account, at)?),
            Op::Balance { account, at } => Done::Balance(balance(s, account, at)?),
            Op::Totals(account) => Done::Totals(s.totals(account)?),
            Op::Lapsed { account, at } => Done::Lapsed(s.lapsed_holds(account, at)?),
            Op::Head(account) => {
                let (seq, hash) = s.head(account)?;
                Done::Head(seq, hash)
            }
        })
    }
}

impl Done {
    pub(crate) fn outcome(self) -> Outcome {
        match self {
            Done::Outcome(o) => o,
            other => panic!("not an outcome: {other:?}"),
        }
    }
}

/// The scenarios as `#[test]`s, each on a fresh ledger from `$fresh` (a path to a function),
/// each followed by [`check_kept_state`].
macro_rules! rule_tests {
    ($fresh:path) => {
        $crate::rules::rule_tests!(@names each $fresh);
    };
    // `$fresh` returns `None` where the store is not at hand (a test then passes, having said
    // why it did nothing: outside CI only, which is `$fresh`'s to enforce).
    (optional $fresh:path) => {
        $crate::rules::rule_tests!(@names each_optional $fresh);
    };
    (@names $arm:ident $fresh:path) => {
        $crate::rules::rule_tests!(@$arm $fresh;
            hold_then_settle_charges_the_actual_usage_at_most_the_hold,
            a_duplicate_storm_charges_once,
            the_same_id_with_another_body_is_refused_and_changes_nothing,
            concurrent_holds_never_overdraw,
            an_unsettled_hold_expires_and_a_late_settle_is_refused,
            bad_input_is_a_typed_error_and_leaves_the_chain_unchanged,
            the_free_quota_refuses_a_request_that_would_cross_it,
            tampering_is_found_at_the_first_bad_entry,
            each_account_chains_on_its_own,
            the_kept_totals_are_what_the_entries_say,
        );
    };
    (@each $fresh:path; $($name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                let ledger = $fresh();
                $crate::rules::$name(&ledger);
                $crate::rules::check_kept_state(&ledger);
            }
        )*
    };
    (@each_optional $fresh:path; $($name:ident,)*) => {
        $(
            #[test]
            fn $name() {
                let Some(ledger) = $fresh() else {
                    return;
                };
                $crate::rules::$name(&ledger);
                $crate::rules::check_kept_state(&ledger);
            }
        )*
    };
}
pub(crate) use rule_tests;

pub(crate) fn account(tier: Tier) -> Account {
    Account {
        id: "0190f3a2-7c1e-7b3d-9f00-00000000a001"
            .parse::<AccountId>()
            .unwrap(),
        tier,
    }
}

fn managed() -> Account {
    account(Tier::Managed)
}

pub(crate) fn rid(n: u64) -> RequestId {
    RequestId::from_parts(1_795_000_000_000 + n, [u8::try_from(n % 251).unwrap(); 10])
}

/// A Sonnet request: 1,000 input tokens, up to 250 output (Managed: 6,953 µUSD).
pub(crate) fn sonnet() -> HoldRequest {
    HoldRequest {
        device: None,
        model: "claude-sonnet".into(),
        input_tokens: 1_000,
        max_output_tokens: 250,
        request_body: None,
    }
}

pub(crate) fn hold_op(
    account: Account,
    id: RequestId,
    request: HoldRequest,
    rules: TierRules,
) -> Op {
    Op::Hold {
        account,
        id,
        request,
        at: NOW,
        prices: PriceTable::default(),
        rules,
    }
}

/// [`sonnet`] for the Managed account, now.
pub(crate) fn sonnet_hold(id: RequestId) -> Op {
    hold_op(managed(), id, sonnet(), TierRules::default())
}

pub(crate) fn settle_op(account: Account, id: RequestId, usage: Usage, at: UnixMillis) -> Op {
    Op::Settle {
        account,
        id,
        usage,
        at,
        rules: TierRules::default(),
    }
}

fn usage(input_tokens: u64, output_tokens: u64) -> Usage {
    Usage {
        input_tokens,
        output_tokens,
    }
}

/// Credits the Managed account with `amount` µUSD.
pub(crate) fn fund(ledger: &impl Ledger, amount: i64) {
    ledger
        .run(Op::TopUp {
            account: managed().id,
            id: rid(1_000_000),
            amount: MicroUsd(amount),
            at: NOW,
        })
        .unwrap();
}

pub(crate) fn balance_of(ledger: &impl Ledger, account: AccountId, at: UnixMillis) -> Balance {
    match ledger.run(Op::Balance { account, at }).unwrap() {
        Done::Balance(b) => b,
        other => panic!("{other:?}"),
    }
}

fn head(ledger: &impl Ledger) -> Done {
    ledger.run(Op::Head(managed().id)).unwrap()
}

fn count(entries: &[Entry], kind: EntryKind) -> usize {
    entries.iter().filter(|e| e.kind == kind).count()
}

/// Runs `f(thread)` on `threads` threads at once (a barrier releases them together) and
/// returns their results in thread order. Nothing here serialises them.
pub(crate) fn on_threads<L: Ledger, T: Send>(
    ledger: &L,
    threads: usize,
    f: impl Fn(&L, usize) -> T + Sync,
) -> Vec<T> {
    let start = Barrier::new(threads);
    std::thread::scope(|s| {
        let running: Vec<_> = (0..threads)
            .map(|t| {
                let (start, f) = (&start, &f);
                s.spawn(move || {
                    start.wait();
                    f(ledger, t)
                })
            })
            .collect();
        running.into_iter().map(|t| t.join().unwrap()).collect()
    })
}

/// What the store keeps (totals, open holds) is what its entries say, and they chain.
pub(crate) fn check_kept_state(ledger: &impl Ledger) {
    let entries = ledger.entries();
    verify(&entries).unwrap();
    for (account, state) in rebuild_states(&entries).unwrap() {
        assert_eq!(
            ledger.run(Op::Totals(account)).unwrap(),
            Done::Totals(state.totals),
            "kept totals"
        );
        // Every hold expires at some time, so at the end of time every open hold is lapsed.
        let Done::Lapsed(open) = ledger
            .run(Op::Lapsed {
                account,
                at: UnixMillis(i64::MAX),
            })
            .unwrap()
        else {
            panic!("not a list of holds")
        };
        let open: BTreeMap<_, _> = open.into_iter().map(|h| (h.request_id, h)).collect();
        assert_eq!(open, state.open_holds, "kept open holds");
    }
}

pub(crate) fn hold_then_settle_charges_the_actual_usage_at_most_the_hold(l: &impl Ledger) {
    fund(l, 10_000_000);
    let held = l.run(sonnet_hold(rid(1))).unwrap().outcome();
    assert_eq!(held.amount, MicroUsd(6_953));
    let b = balance_of(l, managed().id, NOW);
    assert_eq!(
        (b.balance.0, b.held.0, b.available.0),
        (10_000_000, 6_953, 9_993_047)
    );

    let settled = l
        .run(settle_op(managed(), rid(1), usage(1_000, 100), NOW))
        .unwrap()
        .outcome();
    // 3,000 + 1,500 = 4,500; 3 % = 135 → 4,635
    assert_eq!(settled.amount, MicroUsd(4_635));
    let b = balance_of(l, managed().id, NOW);
    assert_eq!((b.balance.0, b.held.0), (10_000_000 - 4_635, 0));

    // More usage than held is charged the hold, not more.
    l.run(sonnet_hold(rid(2))).unwrap();
    let capped = l
        .run(settle_op(managed(), rid(2), usage(1_000, 100_000), NOW))
        .unwrap()
        .outcome();
    assert_eq!(capped.amount, MicroUsd(6_953));
}

/// 1,000 retries of one request (hold, then settle), from [`THREADS`] threads at once: one
/// hold, one charge, and every retry answered with the first outcome.
pub(crate) fn a_duplicate_storm_charges_once(l: &impl Ledger) {
    const RETRIES: usize = 1_000;
    fund(l, 10_000_000);
    let answers = on_threads(l, THREADS, |l, t| {
        let rounds = RETRIES / THREADS + usize::from(t < RETRIES % THREADS);
        (0..rounds)
            .map(|_| {
                let held = l.run(sonnet_hold(rid(7)));
                let charged = l.run(settle_op(managed(), rid(7), usage(1_000, 100), NOW));
                (held, charged)
            })
            .collect::<Vec<_>>()
    })
    .concat();
    assert_eq!(answers.len(), RETRIES);
    let first = answers[0].clone();
    let (held, charged) = (first.0.unwrap().outcome(), first.1.unwrap().outcome());
    assert_eq!(
        (held.amount, charged.amount),
        (MicroUsd(6_953), MicroUsd(4_635))
    );
    assert!(
        answers.iter().all(|a| *a == answers[0]),
        "every retry gets the first outcome"
    );
    let entries = l.entries();
    assert_eq!(
        (
            count(&entries, EntryKind::Hold),
            count(&entries, EntryKind::Settle),
            entries.len()
        ),
        (1, 1, 3)
    );
    let b = balance_of(l, managed().id, NOW);
    assert_eq!(
        (b.balance, b.held),
        (MicroUsd(10_000_000 - 4_635), MicroUsd::ZERO)
    );
}

pub(crate) fn the_same_id_with_another_body_is_refused_and_changes_nothing(l: &impl Ledger) {
    fund(l, 10_000_000);
    l.run(sonnet_hold(rid(1))).unwrap();
    let unchanged = head(l);
    let other = HoldRequest {
        max_output_tokens: 251,
        request_body: None,
        ..sonnet()
    };
    let err = l
        .run(hold_op(managed(), rid(1), other, TierRules::default()))
        .unwrap_err();
    assert_eq!(err, LedgerError::IdempotencyConflict);
    let err = l
        .run(Op::TopUp {
            account: managed().id,
            id: rid(1),
            amount: MicroUsd(5),
            at: NOW,
        })
        .unwrap_err();
    assert_eq!(err, LedgerError::IdempotencyConflict);
    assert_eq!(head(l), unchanged, "the ledger is unchanged");

    // Two bodies for one new id at once: whichever lands first is the request, every answer
    // with its body is its outcome, every answer with the other body a conflict.
    let answers = on_threads(l, THREADS, |l, t| {
        let request = HoldRequest {
            max_output_tokens: 250 + (t % 2) as u64,
            request_body: None,
            ..sonnet()
        };
        (
            t % 2,
            l.run(hold_op(managed(), rid(2), request, TierRules::default())),
        )
    });
    let won: Vec<_> = answers.iter().filter(|(_, a)| a.is_ok()).collect();
    assert_eq!(won.len(), THREADS / 2, "{answers:?}");
    assert!(won.iter().all(|a| *a == won[0]), "one body won: {won:?}");
    assert!(
        answers
            .iter()
            .filter(|(body, _)| *body != won[0].0)
            .all(|(_, a)| *a == Err(LedgerError::IdempotencyConflict)),
        "{answers:?}"
    );
    let holds = l
        .entries()
        .into_iter()
        .filter(|e| e.request_id == rid(2))
        .count();
    assert_eq!(holds, 1);
}

/// [`THREADS`] different requests at once against a balance that covers ten: ten holds, and
/// every other request is refused for funds, the balance never below zero.
pub(crate) fn concurrent_holds_never_overdraw(l: &impl Ledger) {
    fund(l, 6_953 * 10 + 100);
    let results = on_threads(l, THREADS, |l, t| {
        l.run(sonnet_hold(rid(100 + t as u64))).map(Done::outcome)
    });
    let held: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(held.len(), 10);
    assert!(held.iter().all(|o| o.amount == MicroUsd(6_953)));
    // A refusal comes only once the ten holds took all but 100.
    let refusal = LedgerError::InsufficientFunds {
        needed: MicroUsd(6_953),
        available: MicroUsd(100),
    };
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| *e == refusal),
        "{results:?}"
    );
    let b = balance_of(l, managed().id, NOW);
    assert_eq!((b.balance.0, b.available.0), (6_953 * 10 + 100, 100));
    let entries = l.entries();
    assert_eq!(
        (
            count(&entries, EntryKind::Hold),
            count(&entries, EntryKind::Settle)
        ),
        (10, 0),
        "ten holds, nothing charged"
    );
}

pub(crate) fn an_unsettled_hold_expires_and_a_late_settle_is_refused(l: &impl Ledger) {
    let id = managed().id;
    fund(l, 10_000);
    l.run(sonnet_hold(rid(1))).unwrap();
    let later = UnixMillis(NOW.0 + HOLD_TTL_DEFAULT_MS);
    let b = balance_of(l, id, later);
    assert_eq!(
        (b.held.0, b.available.0),
        (0, 10_000),
        "the amount is released at expiry"
    );
    let err = l
        .run(settle_op(managed(), rid(1), usage(10, 10), later))
        .unwrap_err();
    assert_eq!(err, LedgerError::HoldExpired);
    let expire = || {
        l.run(Op::ExpireDue {
            account: id,
            at: later,
        })
    };
    assert_eq!(expire(), Ok(Done::Expired(1)));
    assert_eq!(expire(), Ok(Done::Expired(0)));
    let err = l
        .run(settle_op(managed(), rid(1), usage(10, 10), later))
        .unwrap_err();
    assert_eq!(err, LedgerError::HoldExpired, "also after its expiry entry");
    // A voided hold cannot be settled either.
    l.run(sonnet_hold(rid(2))).unwrap();
    l.run(Op::Void {
        account: id,
        id: rid(2),
        at: NOW,
    })
    .unwrap();
    let err = l
        .run(settle_op(managed(), rid(2), usage(10, 10), NOW))
        .unwrap_err();
    assert_eq!(err, LedgerError::HoldVoided);
    assert_eq!(
        balance_of(l, id, later).balance,
        MicroUsd(10_000),
        "nothing charged"
    );
}

pub(crate) fn bad_input_is_a_typed_error_and_leaves_the_chain_unchanged(l: &impl Ledger) {
    fund(l, 10_000_000);
    let unchanged = head(l);
    let rules = TierRules::default();
    let huge = HoldRequest {
        device: None,
        model: "claude-opus".into(),
        input_tokens: u64::MAX,
        max_output_tokens: u64::MAX,
        request_body: None,
    };
    let err = l.run(hold_op(managed(), rid(1), huge, rules)).unwrap_err();
    assert!(matches!(err, LedgerError::Billing(_)), "{err:?}");
    let unknown = HoldRequest {
        device: None,
        model: "gpt-9".into(),
        ..sonnet()
    };
    let err = l
        .run(hold_op(managed(), rid(2), unknown, rules))
        .unwrap_err();
    assert!(matches!(err, LedgerError::Billing(_)), "{err:?}");
    let unpriced = Op::Hold {
        account: managed(),
        id: rid(3),
        request: sonnet(),
        at: NOW,
        prices: PriceTable::empty(),
        rules,
    };
    assert!(matches!(l.run(unpriced), Err(LedgerError::Billing(_))));
    let credit = |n, amount| Op::TopUp {
        account: managed().id,
        id: rid(n),
        amount: MicroUsd(amount),
        at: NOW,
    };
    assert_eq!(l.run(credit(4, 0)), Err(LedgerError::NotPositive));
    assert_eq!(l.run(credit(5, i64::MAX)), Err(LedgerError::Overflow));
    assert_eq!(head(l), unchanged);
    // Empty and oversized ids never reach the ledger: they are not request ids.
    assert!("".parse::<RequestId>().is_err());
    assert!("x".repeat(10 << 20).parse::<RequestId>().is_err());
}

pub(crate) fn the_free_quota_refuses_a_request_that_would_cross_it(l: &impl Ledger) {
    let free = account(Tier::Free);
    let rules = TierRules {
        free_quota_tokens: 1_000,
        ..TierRules::default()
    };
    let ask = |n: u64, tokens: u64| {
        let request = HoldRequest {
            device: None,
            model: "claude-sonnet".into(),
            input_tokens: tokens,
            max_output_tokens: 0,
            request_body: None,
        };
        l.run(hold_op(free, rid(n), request, rules))
    };
    ask(1, 999).unwrap();
    assert!(
        matches!(ask(2, 2), Err(LedgerError::Quota(_))),
        "999 + 2 > 1,000"
    );
    ask(3, 1).unwrap(); // exactly the quota
    assert_eq!(balance_of(l, free.id, NOW).quota_tokens_used, 1_000);
    // Next month (UTC) the settled tokens no longer count.
    let settle_free = |n, tokens| Op::Settle {
        account: free,
        id: rid(n),
        usage: usage(tokens, 0),
        at: NOW,
        rules,
    };
    l.run(settle_free(1, 999)).unwrap();
    l.run(settle_free(3, 1)).unwrap();
    assert_eq!(balance_of(l, free.id, NOW).quota_tokens_used, 1_000);
    let next_month = UnixMillis(NOW.0 + 31 * 24 * 3_600 * 1_000);
    assert_eq!(balance_of(l, free.id, next_month).quota_tokens_used, 0);
}

pub(crate) fn tampering_is_found_at_the_first_bad_entry(l: &impl Ledger) {
    fund(l, 10_000_000);
    for i in 0..5 {
        l.run(sonnet_hold(rid(i))).unwrap();
    }
    let entries = l.entries();
    verify(&entries).unwrap();

    let mut edited = entries.clone();
    edited[3].amount = MicroUsd(1);
    assert_eq!(verify(&edited).unwrap_err().seq, 3);

    let mut deleted = entries.clone();
    deleted.remove(2);
    assert_eq!(verify(&deleted).unwrap_err().position, 2);

    let mut reordered = entries;
    reordered.swap(1, 4);
    assert_eq!(verify(&reordered).unwrap_err().position, 1);
}

/// Accounts chain independently: each account's entries number 0, 1, 2, … and link to that
/// account's previous entry, however the accounts' operations interleave; a break is named
/// with its account, and another account's chain is not its concern.
pub(crate) fn each_account_chains_on_its_own(l: &impl Ledger) {
    let other: AccountId = "0190f3a2-7c1e-7b3d-9f00-00000000b002".parse().unwrap();
    for n in 0..3 {
        for account in [managed().id, other] {
            l.run(Op::TopUp {
                account,
                id: rid(n),
                amount: MicroUsd(1_000),
                at: NOW,
            })
            .unwrap();
        }
    }
    for account in [managed().id, other] {
        let Done::Head(next, last) = l.run(Op::Head(account)).unwrap() else {
            panic!("a head");
        };
        let chain: Vec<Entry> = l
            .entries()
            .into_iter()
            .filter(|e| e.account == account)
            .collect();
        assert_eq!(
            chain.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [0, 1, 2],
            "its own numbering"
        );
        assert_eq!(chain[0].prev_hash, [0; 32], "its own start");
        assert_eq!(chain[2].prev_hash, chain[1].hash, "its own links");
        assert_eq!((next, last), (3, chain[2].hash), "its own head");
    }
    let entries = l.entries();
    verify(&entries).unwrap();
    // The other account's middle entry, edited: named with its account.
    let mut edited = entries.clone();
    let at = edited
        .iter()
        .position(|e| e.account == other && e.seq == 1)
        .unwrap();
    edited[at].amount = MicroUsd(1);
    let err = verify(&edited).unwrap_err();
    assert_eq!(
        (err.account, err.seq, err.position),
        (other, 1, at),
        "{err}"
    );
    // One account's chain alone verifies; a chain without its start does not.
    let managed_only: Vec<Entry> = entries
        .iter()
        .filter(|e| e.account == managed().id)
        .cloned()
        .collect();
    verify(&managed_only).unwrap();
    assert_eq!(verify(&managed_only[1..]).unwrap_err().seq, 1);
}

pub(crate) fn the_kept_totals_are_what_the_entries_say(l: &impl Ledger) {
    let acct = managed();
    fund(l, 10_000_000);
    for i in 0..12 {
        l.run(sonnet_hold(rid(i))).unwrap();
    }
    for i in 0..4 {
        l.run(settle_op(acct, rid(i), usage(900 + i, 100), NOW))
            .unwrap();
    }
    l.run(Op::Void {
        account: acct.id,
        id: rid(4),
        at: NOW,
    })
    .unwrap();
    let mid = rebuild_states(&l.entries()).unwrap();
    assert_eq!(
        l.run(Op::Totals(acct.id)).unwrap(),
        Done::Totals(mid[&acct.id].totals)
    );
    assert_eq!(mid[&acct.id].open_holds.len(), 7);
    assert_eq!(balance_of(l, acct.id, NOW).held, MicroUsd(7 * 6_953));
    let later = UnixMillis(NOW.0 + HOLD_TTL_DEFAULT_MS);
    assert_eq!(
        l.run(Op::ExpireDue {
            account: acct.id,
            at: later
        }),
        Ok(Done::Expired(7))
    );

    let rebuilt = rebuild_states(&l.entries()).unwrap();
    let state = &rebuilt[&acct.id];
    assert_eq!(
        l.run(Op::Totals(acct.id)).unwrap(),
        Done::Totals(state.totals)
    );
    assert_eq!(
        l.run(Op::Lapsed {
            account: acct.id,
            at: later
        }),
        Ok(Done::Lapsed(Vec::new()))
    );
    assert!(state.open_holds.is_empty());
    let b = balance_of(l, acct.id, later);
    assert_eq!((b.balance, b.held), (state.totals.balance, MicroUsd::ZERO));
}
