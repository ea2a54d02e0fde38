//! `synesis-billing` — what a request costs, exactly.
//!
//! What it owns: the price table ([`PriceTable`], micro-USD per one million tokens, input and
//! output apart), the tier rules ([`TierRules`]: Free quota, Managed markup, BYOK fee), the cost
//! arithmetic ([`quote`]) and the Free tier's monthly quota ([`quota_period`], [`admit_free`]).
//!
//! The arithmetic, written down once:
//! 1. `exact = input_tokens × input_price + output_tokens × output_price`, in pico-USD
//!    (a price is micro-USD per 10⁶ tokens, so one token at one unit of price is 10⁻⁶ µUSD):
//!    an exact integer, `u128`, checked.
//! 2. Managed: `total = round(exact × (10 000 + markup_bps) / 10¹⁰)`, `base = round(exact / 10⁶)`,
//!    `markup = total − base`. BYOK: the provider is paid with the user's key, so
//!    `base = 0` and `total = markup = round(exact × fee_bps / 10¹⁰)`. Free: no money.
//! 3. Every rounding is to micro-USD, half up (0.5 µUSD → 1 µUSD), and happens once, on the exact
//!    amount; the parts always add up (`base + markup = total`).
//!
//! [`ledger`] holds the rules over entries: holds, settlement, idempotency, expiry, the hash
//! chain; a storage trait with an in-memory store (the cloud's SQLite store is next).
//!
//! What it must not do: floating point (denied below), IO, clocks. Overflow is an error.
#![deny(clippy::float_arithmetic)]

mod cost;
pub mod ledger;
mod price;
mod quota;
pub mod usage;

pub use cost::{BillingError, Quote, Usage, quote};
pub use price::{ModelPrice, PriceTable, parse_usd};
pub use quota::{QuotaExceeded, QuotaPeriod, admit_free, month_start, quota_period};
pub use synesis_proto::MicroUsd;
pub use synesis_proto::message::Tier;
pub use usage::{UsageView, group_key};

/// The rules of the three tiers; the defaults are the plan's, the cloud's config may override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierRules {
    /// Free: tokens (input + output) per account per UTC calendar month.
    pub free_quota_tokens: u64,
    /// Managed: markup on the provider price, in basis points (300 = 3 %).
    pub managed_markup_bps: u32,
    /// BYOK: licensing fee as a share of the provider price, in basis points (3 000 = 30 %).
    pub byok_fee_bps: u32,
}

impl Default for TierRules {
    fn default() -> Self {
        TierRules {
            free_quota_tokens: 100_000,
            managed_markup_bps: 300,
            byok_fee_bps: 3_000,
        }
    }
}
