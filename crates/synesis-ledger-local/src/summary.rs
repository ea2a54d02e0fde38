//! The totals `synesis usage` shows, summed from per-model groups with checked arithmetic.

use serde::Serialize;
use synesis_proto::{MicroUsd, UnixMillis};

use crate::entry::EntryKind;
use crate::error::LedgerError;

/// On-device totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LocalTotals {
    pub generations: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cloud_cost_avoided_micro_usd: MicroUsd,
}

/// Cloud totals, as last mirrored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CloudTotals {
    pub charges: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_micro_usd: MicroUsd,
}

/// The totals of one model and kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelTotals {
    pub model: String,
    pub kind: EntryKind,
    pub generations: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Local: the cloud cost avoided; cloud: what was charged.
    pub micro_usd: MicroUsd,
}

/// How [`LocalLedger::groups`](crate::LocalLedger::groups) groups.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Grouping {
    /// The UTC day, `YYYY-MM-DD`.
    Day,
    Model,
    /// The local-first policy's reason (`-` for answers it did not route).
    Route,
}

/// One group's totals of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GroupTotals {
    pub key: String,
    pub kind: EntryKind,
    pub count: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Local: the cloud cost avoided; cloud: what was charged.
    pub micro_usd: MicroUsd,
}

/// What `synesis usage` shows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    pub local: LocalTotals,
    pub cloud: CloudTotals,
    pub last_sync_at: Option<UnixMillis>,
    /// Sorted by kind (local first), then model.
    pub by_model: Vec<ModelTotals>,
}

impl Summary {
    /// Adds one model's group to the totals of its kind, and to `by_model` (the caller keeps
    /// the order).
    pub(crate) fn add(&mut self, m: ModelTotals) -> Result<(), LedgerError> {
        let add = |a: u64, b: u64| a.checked_add(b).ok_or(LedgerError::Overflow);
        let add_usd = |a: MicroUsd, b: MicroUsd| a.checked_add(b).ok_or(LedgerError::Overflow);
        match m.kind {
            EntryKind::Local => {
                let t = &mut self.local;
                t.generations = add(t.generations, m.generations)?;
                t.input_tokens = add(t.input_tokens, m.input_tokens)?;
                t.output_tokens = add(t.output_tokens, m.output_tokens)?;
                t.cloud_cost_avoided_micro_usd =
                    add_usd(t.cloud_cost_avoided_micro_usd, m.micro_usd)?;
            }
            EntryKind::Cloud => {
                let t = &mut self.cloud;
                t.charges = add(t.charges, m.generations)?;
                t.input_tokens = add(t.input_tokens, m.input_tokens)?;
                t.output_tokens = add(t.output_tokens, m.output_tokens)?;
                t.total_micro_usd = add_usd(t.total_micro_usd, m.micro_usd)?;
            }
        }
        self.by_model.push(m);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(kind: EntryKind, tokens: u64, micro: i64) -> ModelTotals {
        ModelTotals {
            model: "m".into(),
            kind,
            generations: 1,
            input_tokens: tokens,
            output_tokens: tokens,
            micro_usd: MicroUsd(micro),
        }
    }

    #[test]
    fn groups_add_to_the_totals_of_their_kind() {
        let mut s = Summary::default();
        s.add(group(EntryKind::Local, 10, 5)).unwrap();
        s.add(group(EntryKind::Cloud, 3, 7)).unwrap();
        s.add(group(EntryKind::Local, 1, 1)).unwrap();
        assert_eq!(s.local.generations, 2);
        assert_eq!(s.local.input_tokens, 11);
        assert_eq!(s.local.cloud_cost_avoided_micro_usd, MicroUsd(6));
        assert_eq!(s.cloud.charges, 1);
        assert_eq!(s.cloud.total_micro_usd, MicroUsd(7));
        assert_eq!(s.by_model.len(), 3);
    }

    #[test]
    fn totals_past_64_bits_are_an_error() {
        let mut s = Summary::default();
        s.add(group(EntryKind::Cloud, u64::MAX, 0)).unwrap();
        assert!(matches!(
            s.add(group(EntryKind::Cloud, 1, 0)),
            Err(LedgerError::Overflow)
        ));
        s.add(group(EntryKind::Local, 0, i64::MAX)).unwrap();
        assert!(matches!(
            s.add(group(EntryKind::Local, 0, 1)),
            Err(LedgerError::Overflow)
        ));
    }
}
