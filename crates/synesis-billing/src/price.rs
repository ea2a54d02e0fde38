//! Prices per model.

use std::collections::BTreeMap;

use synesis_proto::MicroUsd;

/// The price of one model, in micro-USD per one million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelPrice {
    pub input_per_mtok: MicroUsd,
    pub output_per_mtok: MicroUsd,
}

/// Model name → price.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceTable {
    prices: BTreeMap<String, ModelPrice>,
}

const fn usd(dollars: i64) -> MicroUsd {
    MicroUsd(dollars * 1_000_000)
}

impl Default for PriceTable {
    /// The plan's table: Claude Sonnet $3 / $15, Claude Opus $15 / $75 per million input/output
    /// tokens; models on the device cost nothing.
    fn default() -> Self {
        let mut prices = BTreeMap::new();
        prices.insert(
            "claude-sonnet".to_owned(),
            ModelPrice {
                input_per_mtok: usd(3),
                output_per_mtok: usd(15),
            },
        );
        prices.insert(
            "claude-opus".to_owned(),
            ModelPrice {
                input_per_mtok: usd(15),
                output_per_mtok: usd(75),
            },
        );
        prices.insert(
            "on-device".to_owned(),
            ModelPrice {
                input_per_mtok: MicroUsd::ZERO,
                output_per_mtok: MicroUsd::ZERO,
            },
        );
        PriceTable { prices }
    }
}

impl PriceTable {
    pub fn empty() -> PriceTable {
        PriceTable {
            prices: BTreeMap::new(),
        }
    }

    /// Adds or overrides a model's price.
    pub fn set(&mut self, model: &str, price: ModelPrice) {
        self.prices.insert(model.to_owned(), price);
    }

    pub fn get(&self, model: &str) -> Option<ModelPrice> {
        self.prices.get(model).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, ModelPrice)> {
        self.prices.iter().map(|(k, v)| (k.as_str(), *v))
    }
}

/// Parses dollars as people write them (`10`, `10.5`, `$0.000001`) into exact micro-USD; more
/// than six decimals, signs and anything else are refused. No floating point on the way.
pub fn parse_usd(text: &str) -> Result<MicroUsd, String> {
    let t = text.trim();
    let t = t.strip_prefix('$').unwrap_or(t);
    let (whole, frac) = match t.split_once('.') {
        Some((w, f)) => (w, Some(f)),
        None => (t, None),
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(whole) || !frac.is_none_or(digits) || frac.is_some_and(|f| f.len() > 6) {
        return Err(format!(
            "{text:?} is not an amount in dollars (e.g. 10.00, at most 6 decimals)"
        ));
    }
    let whole: i64 = whole
        .parse()
        .map_err(|_| format!("{text:?} is too large"))?;
    let frac: i64 = format!("{:0<6}", frac.unwrap_or(""))
        .parse()
        .map_err(|_| format!("{text:?} is not an amount"))?;
    whole
        .checked_mul(1_000_000)
        .and_then(|w| w.checked_add(frac))
        .map(MicroUsd)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dollars_parse_exactly() {
        assert_eq!(parse_usd("10.00"), Ok(MicroUsd(10_000_000)));
        assert_eq!(parse_usd("$0.000001"), Ok(MicroUsd(1)));
        assert_eq!(parse_usd("3"), Ok(MicroUsd(3_000_000)));
        assert_eq!(parse_usd("0.1"), Ok(MicroUsd(100_000)));
        for bad in [
            "",
            "-1",
            "1.0000001",
            "1e3",
            "1.",
            ".5",
            "abc",
            "99999999999999999999",
        ] {
            assert!(parse_usd(bad).is_err(), "{bad}");
        }
    }
}
