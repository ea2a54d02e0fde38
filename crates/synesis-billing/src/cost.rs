//! Exact cost arithmetic (the rules are in the crate docs).

use synesis_proto::MicroUsd;
use synesis_proto::message::Tier;

use crate::TierRules;
use crate::price::{ModelPrice, PriceTable};

/// Pico-USD per micro-USD.
const PICO_PER_MICRO: u128 = 1_000_000;
/// Basis points per whole.
const BPS_PER_WHOLE: u128 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillingError {
    #[error("no price for model {0:?}")]
    UnknownModel(String),
    #[error("the price of {model:?} is negative")]
    NegativePrice { model: String },
    #[error("the amount does not fit: {0}")]
    Overflow(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// What a request costs under a tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quote {
    /// The provider price Synesis charges (0 for Free and BYOK).
    pub base: MicroUsd,
    /// The Managed markup, or the BYOK licensing fee.
    pub markup: MicroUsd,
    /// What is charged: `base + markup`.
    pub total: MicroUsd,
    /// Tokens counted against the Free quota (0 on paying tiers).
    pub quota_tokens: u64,
}

/// `num / den`, rounded half up. `den > 0`.
fn round_half_up(num: u128, den: u128) -> u128 {
    debug_assert!(den > 0);
    let (q, r) = (num / den, num % den);
    // r ≥ den/2, written without a division that could itself round
    if r.saturating_mul(2) >= den { q + 1 } else { q }
}

fn to_micro(v: u128, what: &'static str) -> Result<MicroUsd, BillingError> {
    i64::try_from(v)
        .map(MicroUsd)
        .map_err(|_| BillingError::Overflow(what))
}

fn price_units(p: MicroUsd, model: &str) -> Result<u128, BillingError> {
    u128::try_from(p.0).map_err(|_| BillingError::NegativePrice {
        model: model.to_owned(),
    })
}

/// The exact provider cost in pico-USD.
fn exact_pico(model: &str, price: ModelPrice, usage: Usage) -> Result<u128, BillingError> {
    let input = u128::from(usage.input_tokens)
        .checked_mul(price_units(price.input_per_mtok, model)?)
        .ok_or(BillingError::Overflow("input cost"))?;
    let output = u128::from(usage.output_tokens)
        .checked_mul(price_units(price.output_per_mtok, model)?)
        .ok_or(BillingError::Overflow("output cost"))?;
    input
        .checked_add(output)
        .ok_or(BillingError::Overflow("provider cost"))
}

/// What `usage` of `model` costs under `tier`.
pub fn quote(
    tier: Tier,
    model: &str,
    usage: Usage,
    prices: &PriceTable,
    rules: &TierRules,
) -> Result<Quote, BillingError> {
    let price = prices
        .get(model)
        .ok_or_else(|| BillingError::UnknownModel(model.to_owned()))?;
    let exact = exact_pico(model, price, usage)?;
    let scaled = |bps: u32| -> Result<u128, BillingError> {
        let num = exact
            .checked_mul(u128::from(bps))
            .ok_or(BillingError::Overflow("scaled cost"))?;
        Ok(round_half_up(num, PICO_PER_MICRO * BPS_PER_WHOLE))
    };
    let q = match tier {
        Tier::Free => Quote {
            base: MicroUsd::ZERO,
            markup: MicroUsd::ZERO,
            total: MicroUsd::ZERO,
            quota_tokens: usage
                .input_tokens
                .checked_add(usage.output_tokens)
                .ok_or(BillingError::Overflow("tokens"))?,
        },
        Tier::Managed => {
            let base = round_half_up(exact, PICO_PER_MICRO);
            let bps = u32::try_from(BPS_PER_WHOLE)
                .unwrap_or(u32::MAX)
                .checked_add(rules.managed_markup_bps)
                .ok_or(BillingError::Overflow("markup"))?;
            let total = scaled(bps)?;
            let (base, total) = (to_micro(base, "base")?, to_micro(total, "total")?);
            let markup = total
                .checked_sub(base)
                .ok_or(BillingError::Overflow("markup"))?;
            Quote {
                base,
                markup,
                total,
                quota_tokens: 0,
            }
        }
        Tier::Byok => {
            let fee = to_micro(scaled(rules.byok_fee_bps)?, "fee")?;
            Quote {
                base: MicroUsd::ZERO,
                markup: fee,
                total: fee,
                quota_tokens: 0,
            }
        }
    };
    debug_assert_eq!(q.base.checked_add(q.markup), Some(q.total));
    debug_assert!(q.total >= MicroUsd::ZERO);
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn managed(model: &str, input: u64, output: u64) -> Quote {
        quote(
            Tier::Managed,
            model,
            Usage {
                input_tokens: input,
                output_tokens: output,
            },
            &PriceTable::default(),
            &TierRules::default(),
        )
        .unwrap()
    }

    #[test]
    fn the_plan_prices_come_out_exactly() {
        // 1,000 in + 250 out on Sonnet: 3,000 + 3,750 = 6,750 µUSD; 3 % = 202.5 → total 6,953 (half up)
        let q = managed("claude-sonnet", 1_000, 250);
        assert_eq!((q.base.0, q.markup.0, q.total.0), (6_750, 203, 6_953));
        // BYOK: 30 % of 6,750 = 2,025
        let b = quote(
            Tier::Byok,
            "claude-sonnet",
            Usage {
                input_tokens: 1_000,
                output_tokens: 250,
            },
            &PriceTable::default(),
            &TierRules::default(),
        )
        .unwrap();
        assert_eq!((b.base.0, b.markup.0, b.total.0), (0, 2_025, 2_025));
    }

    #[test]
    fn half_way_rounds_up_and_just_below_rounds_down() {
        // One input token of Sonnet costs 3 µUSD exactly... use a price that makes halves.
        let mut prices = PriceTable::empty();
        prices.set(
            "half",
            ModelPrice {
                input_per_mtok: MicroUsd(500_000),
                output_per_mtok: MicroUsd(499_999),
            },
        );
        let rules = TierRules {
            managed_markup_bps: 0,
            ..TierRules::default()
        };
        let at = |i, o| {
            quote(
                Tier::Managed,
                "half",
                Usage {
                    input_tokens: i,
                    output_tokens: o,
                },
                &prices,
                &rules,
            )
            .unwrap()
            .total
            .0
        };
        assert_eq!(at(1, 0), 1, "0.5 µUSD → 1");
        assert_eq!(at(0, 1), 0, "0.499999 µUSD → 0");
        assert_eq!(at(3, 0), 2, "1.5 µUSD → 2");
    }

    #[test]
    fn free_counts_tokens_and_charges_nothing() {
        let q = quote(
            Tier::Free,
            "claude-opus",
            Usage {
                input_tokens: 10,
                output_tokens: 5,
            },
            &PriceTable::default(),
            &TierRules::default(),
        )
        .unwrap();
        assert_eq!((q.total, q.quota_tokens), (MicroUsd::ZERO, 15));
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let max = Usage {
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
        };
        let err = quote(
            Tier::Managed,
            "claude-opus",
            max,
            &PriceTable::default(),
            &TierRules::default(),
        )
        .unwrap_err();
        assert!(matches!(err, BillingError::Overflow(_)), "{err:?}");
        assert_eq!(
            quote(
                Tier::Free,
                "gpt-9",
                Usage {
                    input_tokens: 1,
                    output_tokens: 1
                },
                &PriceTable::default(),
                &TierRules::default()
            ),
            Err(BillingError::UnknownModel("gpt-9".into()))
        );
        let mut prices = PriceTable::empty();
        prices.set(
            "neg",
            ModelPrice {
                input_per_mtok: MicroUsd(-1),
                output_per_mtok: MicroUsd(0),
            },
        );
        assert!(matches!(
            quote(
                Tier::Managed,
                "neg",
                Usage {
                    input_tokens: 1,
                    output_tokens: 0
                },
                &prices,
                &TierRules::default()
            ),
            Err(BillingError::NegativePrice { .. })
        ));
    }
}
