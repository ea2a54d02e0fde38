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
