//! An account's usage as people read it (`synesis cloud usage`, `synesis-cloud admin usage`):
//! one view, one JSON shape, for the device and the operator alike. Money in micro-USD.

use std::collections::BTreeMap;

use serde::Serialize;
use synesis_proto::message::{Charge, Tier, UsageGrouping, UsageReply};
use synesis_proto::{DeviceId, RequestId, UnixMillis};

use crate::ledger::LedgerError;

/// The key a charge is grouped under: the model, the device (`-` for none), the UTC day
/// (`YYYY-MM-DD`) or the member (`-` for none).
pub fn group_key(charge: &Charge, by: UsageGrouping) -> String {
    match by {
        UsageGrouping::Model => charge.model.clone(),
        UsageGrouping::Device => charge
            .device_id
            .map_or_else(|| "-".to_owned(), |d| d.to_string()),
        UsageGrouping::Day => charge.at.to_rfc3339().map_or_else(
            || charge.at.0.to_string(),
            |t| t.get(..10).unwrap_or(&t).to_owned(),
        ),
        UsageGrouping::Member => charge.member.clone().unwrap_or_else(|| "-".to_owned()),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChargeView {
    pub request_id: RequestId,
    pub model: String,
    pub device_id: Option<DeviceId>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_micro_usd: i64,
    pub at: UnixMillis,
}

/// The charges of one model, device or day.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Group {
    pub key: String,
    pub charges: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_micro_usd: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageView {
    pub account: String,
    pub tier: &'static str,
    pub balance_micro_usd: i64,
    pub held_micro_usd: i64,
    pub quota_tokens: u64,
    pub quota_tokens_used: u64,
    pub charges: Vec<ChargeView>,
    /// With a grouping: one total per key, largest first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<Vec<Group>>,
}

impl UsageView {
    pub fn new(reply: &UsageReply, by: Option<UsageGrouping>) -> Result<UsageView, LedgerError> {
        let charges = reply
            .charges
            .iter()
            .map(|c| ChargeView {
                request_id: c.request_id,
                model: c.model.clone(),
                device_id: c.device_id,
                input_tokens: c.usage.input_tokens,
                output_tokens: c.usage.output_tokens,
                total_micro_usd: c.total.0,
                at: c.at,
            })
            .collect();
        Ok(UsageView {
            account: reply.account.clone(),
            tier: reply.tier.as_str(),
            balance_micro_usd: reply.balance.0,
            held_micro_usd: reply.held.0,
            quota_tokens: reply.quota_tokens,
            quota_tokens_used: reply.quota_tokens_used,
            charges,
            groups: by.map(|by| groups(&reply.charges, by)).transpose()?,
        })
    }

    /// A few lines for a terminal.
    pub fn text(&self) -> String {
        // Only the Free tier has a quota; the others pay from their balance.
        let quota = if self.tier == Tier::Free.as_str() {
            format!(
                "; quota {} of {} tokens used this month",
                self.quota_tokens_used, self.quota_tokens
            )
        } else {
            String::new()
        };
        let mut text = format!(
            "account {} ({}): balance ${}, held ${}{quota}; {} charges\n",
            self.account,
            self.tier,
            synesis_proto::MicroUsd(self.balance_micro_usd),
            synesis_proto::MicroUsd(self.held_micro_usd),
            self.charges.len()
        );
        for g in self.groups.iter().flatten() {
            text.push_str(&format!(
                "  {:<36} {:>6} charges {:>12} in {:>12} out  ${}\n",
                g.key,
                g.charges,
                g.input_tokens,
                g.output_tokens,
                synesis_proto::MicroUsd(g.total_micro_usd)
            ));
        }
        text
    }
}

fn groups(charges: &[Charge], by: UsageGrouping) -> Result<Vec<Group>, LedgerError> {
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    for c in charges {
        let key = group_key(c, by);
        let g = groups.entry(key.clone()).or_insert_with(|| Group {
            key,
            ..Group::default()
        });
        g.charges += 1;
        g.input_tokens = g
            .input_tokens
            .checked_add(c.usage.input_tokens)
            .ok_or(LedgerError::Overflow)?;
        g.output_tokens = g
            .output_tokens
            .checked_add(c.usage.output_tokens)
            .ok_or(LedgerError::Overflow)?;
        g.total_micro_usd = g
            .total_micro_usd
            .checked_add(c.total.0)
            .ok_or(LedgerError::Overflow)?;
    }
    let mut groups: Vec<Group> = groups.into_values().collect();
    groups.sort_by(|a, b| {
        b.total_micro_usd
            .cmp(&a.total_micro_usd)
            .then_with(|| a.key.cmp(&b.key))
    });
    Ok(groups)
}
