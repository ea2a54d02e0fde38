//! The operator's billing settings: `cloud.toml` in the data directory (or `--config PATH`),
//! over the plan's defaults. Every key is optional; an unknown key is an error, so a typo never
//! silently leaves a default in place.
//!
//! ```toml
//! [tiers]
//! free_quota_tokens = 100000     # per account per UTC calendar month
//! managed_markup_bps = 300       # 3 %
//! byok_fee_bps = 3000            # 30 % of the provider price
//!
//! [prices.claude-sonnet]         # adds a model or overrides one, dollars per 1M tokens
//! input_usd_per_mtok = "3.00"    # a string: exact to the micro-dollar, never a float
//! output_usd_per_mtok = "15.00"
//!
//! [ledger]
//! hold_ttl = "10m"               # an unsettled hold expires after this
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Deserialize;
use synesis_billing::ledger::HOLD_TTL_DEFAULT_MS;
use synesis_billing::{ModelPrice, PriceTable, TierRules, parse_usd};

/// The file's name in the data directory.
pub const CONFIG_FILE: &str = "cloud.toml";

/// The most a markup or fee may be: 1,000 % (the range the cost arithmetic is tested over).
const MAX_BPS: u32 = 100_000;

/// Prices and rules the cloud bills by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Billing {
    pub prices: PriceTable,
    pub rules: TierRules,
    pub hold_ttl_ms: i64,
}

impl Default for Billing {
    fn default() -> Self {
        Billing {
            prices: PriceTable::default(),
            rules: TierRules::default(),
            hold_ttl_ms: HOLD_TTL_DEFAULT_MS,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tiers: Tiers,
    #[serde(default)]
    prices: BTreeMap<String, Price>,
    #[serde(default)]
    ledger: Ledger,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Tiers {
    free_quota_tokens: Option<u64>,
    managed_markup_bps: Option<u32>,
    byok_fee_bps: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Price {
    input_usd_per_mtok: String,
    output_usd_per_mtok: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ledger {
    hold_ttl: Option<String>,
}

/// Where the settings come from: `explicit` (which must exist), else the data directory's
/// `cloud.toml` when there is one.
pub fn path(explicit: Option<&Path>, data_dir: &Path) -> Option<PathBuf> {
    match explicit {
        Some(p) => Some(p.to_owned()),
        None => Some(data_dir.join(CONFIG_FILE)).filter(|p| p.exists()),
    }
}

/// The settings: the defaults with the file's values over them.
pub fn load(explicit: Option<&Path>, data_dir: &Path) -> anyhow::Result<Billing> {
    let Some(path) = path(explicit, data_dir) else {
        return Ok(Billing::default());
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read the config {}", path.display()))?;
    parse(&text).with_context(|| format!("in the config {}", path.display()))
}

fn parse(text: &str) -> anyhow::Result<Billing> {
    let file: File = toml::from_str(text)?;
    let mut billing = Billing::default();
    let rules = &mut billing.rules;
    if let Some(q) = file.tiers.free_quota_tokens {
        rules.free_quota_tokens = q;
    }
    for (value, field, name) in [
        (
            file.tiers.managed_markup_bps,
            &mut rules.managed_markup_bps,
            "managed_markup_bps",
        ),
        (
            file.tiers.byok_fee_bps,
            &mut rules.byok_fee_bps,
            "byok_fee_bps",
        ),
    ] {
        if let Some(bps) = value {
            if bps > MAX_BPS {
                bail!("tiers.{name} = {bps}: at most {MAX_BPS} (1,000 %)");
            }
            *field = bps;
        }
    }
    for (model, p) in &file.prices {
        if model.trim().is_empty() {
            bail!("a price needs a model name");
        }
        let usd = |text: &str, what: &str| {
            parse_usd(text).map_err(|e| anyhow::anyhow!("prices.{model}.{what}: {e}"))
        };
        billing.prices.set(
            model,
            ModelPrice {
                input_per_mtok: usd(&p.input_usd_per_mtok, "input_usd_per_mtok")?,
                output_per_mtok: usd(&p.output_usd_per_mtok, "output_usd_per_mtok")?,
            },
        );
    }
    if let Some(ttl) = &file.ledger.hold_ttl {
        let d =
            humantime::parse_duration(ttl).map_err(|e| anyhow::anyhow!("ledger.hold_ttl: {e}"))?;
        let ms = i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        if !(1_000..=7 * 24 * 3_600 * 1_000).contains(&ms) {
            bail!("ledger.hold_ttl = {ttl:?}: between 1s and 7 days");
        }
        billing.hold_ttl_ms = ms;
    }
    Ok(billing)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // test code
    use synesis_proto::MicroUsd;

    use super::*;

    #[test]
    fn an_empty_file_is_the_plan() {
        assert_eq!(parse("").unwrap(), Billing::default());
    }

    #[test]
    fn values_override_and_add() {
        let b = parse(
            r#"
            [tiers]
            free_quota_tokens = 250000
            managed_markup_bps = 500
            [prices.claude-sonnet]
            input_usd_per_mtok = "2.50"
            output_usd_per_mtok = "12.000001"
            [prices.house-model]
            input_usd_per_mtok = "0"
            output_usd_per_mtok = "$0.50"
            [ledger]
            hold_ttl = "2m"
            "#,
        )
        .unwrap();
        assert_eq!(b.rules.free_quota_tokens, 250_000);
        assert_eq!(b.rules.managed_markup_bps, 500);
        assert_eq!(b.rules.byok_fee_bps, 3_000, "untouched keys keep the plan");
        let sonnet = b.prices.get("claude-sonnet").unwrap();
        assert_eq!(sonnet.input_per_mtok, MicroUsd(2_500_000));
        assert_eq!(sonnet.output_per_mtok, MicroUsd(12_000_001));
        assert_eq!(
            b.prices.get("house-model").unwrap().output_per_mtok,
            MicroUsd(500_000)
        );
        assert!(b.prices.get("claude-opus").is_some());
        assert_eq!(b.hold_ttl_ms, 120_000);
    }

    #[test]
    fn mistakes_are_named() {
        for (text, says) in [
            ("[tiers]\nmanaged_markup = 5", "unknown field"),
            ("[tiers]\nbyok_fee_bps = 100001", "byok_fee_bps"),
            (
                "[prices.x]\ninput_usd_per_mtok = 3.0\noutput_usd_per_mtok = \"1\"",
                "string",
            ),
            (
                "[prices.x]\ninput_usd_per_mtok = \"-1\"\noutput_usd_per_mtok = \"1\"",
                "prices.x.input_usd_per_mtok",
            ),
            (
                "[prices.x]\ninput_usd_per_mtok = \"0.0000001\"\noutput_usd_per_mtok = \"1\"",
                "prices.x.input_usd_per_mtok",
            ),
            ("[ledger]\nhold_ttl = \"0s\"", "hold_ttl"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(says), "{text:?}: {err}");
        }
    }
}
