//! The cost arithmetic against an independent oracle: big integers and the rule written as a
//! fraction, for every tier, token counts up to 10⁹ and arbitrary prices (100,000 cases each).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use num_bigint::BigInt;
use proptest::prelude::*;
use synesis_billing::{MicroUsd, ModelPrice, PriceTable, Tier, TierRules, Usage, quote};

/// round(num / den) half up, for non-negative big integers.
fn oracle_round(num: &BigInt, den: &BigInt) -> BigInt {
    (num * 2 + den) / (den * 2)
}

fn oracle(
    tier: Tier,
    usage: Usage,
    price: ModelPrice,
    rules: &TierRules,
) -> (BigInt, BigInt, BigInt, u64) {
    let exact = BigInt::from(usage.input_tokens) * price.input_per_mtok.0
        + BigInt::from(usage.output_tokens) * price.output_per_mtok.0;
    let micro = BigInt::from(1_000_000);
    let ten_k = BigInt::from(10_000);
    match tier {
        Tier::Free => (
            0.into(),
            0.into(),
            0.into(),
            usage.input_tokens + usage.output_tokens,
        ),
        Tier::Managed => {
            let base = oracle_round(&exact, &micro);
            let total = oracle_round(
                &(exact * (10_000 + rules.managed_markup_bps)),
                &(&micro * &ten_k),
            );
            let markup = &total - &base;
            (base, markup, total, 0)
        }
        Tier::Byok => {
            let fee = oracle_round(&(exact * rules.byok_fee_bps), &(&micro * &ten_k));
            (0.into(), fee.clone(), fee, 0)
        }
    }
}

fn tier() -> impl Strategy<Value = Tier> {
    prop_oneof![Just(Tier::Free), Just(Tier::Managed), Just(Tier::Byok)]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 100_000, ..ProptestConfig::default() })]

    #[test]
    fn quote_matches_the_big_integer_oracle(
        tier in tier(),
        input in 0u64..=1_000_000_000,
        output in 0u64..=1_000_000_000,
        input_price in 0i64..=1_000_000_000_000,
        output_price in 0i64..=1_000_000_000_000,
        markup_bps in 0u32..=100_000,
        fee_bps in 0u32..=100_000,
    ) {
        let price = ModelPrice { input_per_mtok: MicroUsd(input_price), output_per_mtok: MicroUsd(output_price) };
        let mut prices = PriceTable::empty();
        prices.set("m", price);
        let rules = TierRules { free_quota_tokens: 100_000, managed_markup_bps: markup_bps, byok_fee_bps: fee_bps };
        let usage = Usage { input_tokens: input, output_tokens: output };
        let q = quote(tier, "m", usage, &prices, &rules).unwrap();
        let (base, markup, total, quota) = oracle(tier, usage, price, &rules);
        prop_assert_eq!(BigInt::from(q.base.0), base);
        prop_assert_eq!(BigInt::from(q.markup.0), markup);
        prop_assert_eq!(BigInt::from(q.total.0), total);
        prop_assert_eq!(q.quota_tokens, quota);
        prop_assert_eq!(q.base.0 + q.markup.0, q.total.0, "the parts add up");
    }
}
