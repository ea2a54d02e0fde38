//! The rows of the local ledger, and what goes into them.

use serde::{Deserialize, Serialize};
use synesis_billing::{BillingError, MicroUsd, PriceTable, Tier, TierRules, Usage};
use synesis_proto::{DeviceId, RequestId, UnixMillis};

/// The cloud model an escalation would go to: an on-device answer's "cloud cost avoided" is what
/// its tokens would have cost on this model at the Managed tier's price (provider price plus the
/// markup), with the default price table and tier rules.
pub const REFERENCE_MODEL: &str = "claude-sonnet";

/// What the tokens of an on-device answer would have cost in the cloud: [`REFERENCE_MODEL`] at
/// the Managed tier, default prices and rules (rounded once, half up, as every quote is).
pub fn cloud_cost_avoided(input_tokens: u64, output_tokens: u64) -> Result<MicroUsd, BillingError> {
    synesis_billing::quote(
        Tier::Managed,
        REFERENCE_MODEL,
        Usage {
            input_tokens,
            output_tokens,
        },
        &PriceTable::default(),
        &TierRules::default(),
    )
    .map(|q| q.total)
}

/// Which side made a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    /// An answer made on this device.
    Local,
    /// A charge on the cloud's ledger.
    Cloud,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Local => "local",
            EntryKind::Cloud => "cloud",
        }
    }

    pub(crate) fn parse(s: &str) -> Option<EntryKind> {
        match s {
            "local" => Some(EntryKind::Local),
            "cloud" => Some(EntryKind::Cloud),
            _ => None,
        }
    }
}

/// One row the local ledger holds, of either kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub request_id: RequestId,
    pub kind: EntryKind,
    pub model: String,
    /// `None`: not enrolled (local) or not said (cloud).
    pub device_id: Option<DeviceId>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Local: the cloud cost avoided; cloud: the charge.
    pub micro_usd: MicroUsd,
    pub at: UnixMillis,
}

impl Entry {
    /// The row of a cloud charge.
    pub fn cloud(charge: &CloudCharge) -> Entry {
        Entry {
            request_id: charge.request_id,
            kind: EntryKind::Cloud,
            model: charge.model.clone(),
            device_id: charge.device_id,
            input_tokens: charge.input_tokens,
            output_tokens: charge.output_tokens,
            micro_usd: charge.total_micro_usd,
            at: charge.at,
        }
    }

    /// The row's values as a charge (for a local row, the avoided cost stands as the total).
    pub(crate) fn to_charge(&self) -> CloudCharge {
        CloudCharge {
            request_id: self.request_id,
            model: self.model.clone(),
            device_id: self.device_id,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            total_micro_usd: self.micro_usd,
            at: self.at,
        }
    }
}

/// One finished on-device generation, as `synesis ask --local` records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalGeneration {
    pub request_id: RequestId,
    pub model: String,
    /// `None` when this device is not enrolled.
    pub device_id: Option<DeviceId>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// When the generation finished.
    pub at: UnixMillis,
}

/// One charge on the cloud's ledger, as `synesis cloud sync` hands it to [`crate::reconcile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudCharge {
    pub request_id: RequestId,
    pub model: String,
    pub device_id: Option<DeviceId>,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub total_micro_usd: MicroUsd,
    pub at: UnixMillis,
}

impl From<synesis_proto::message::Charge> for CloudCharge {
    fn from(c: synesis_proto::message::Charge) -> CloudCharge {
        CloudCharge {
            request_id: c.request_id,
            model: c.model,
            device_id: c.device_id,
            input_tokens: c.usage.input_tokens,
            output_tokens: c.usage.output_tokens,
            total_micro_usd: c.total,
            at: c.at,
        }
    }
}

impl CloudCharge {
    /// The names of the fields where `self` and `other` (a charge of the same request) differ.
    pub(crate) fn differences(&self, other: &CloudCharge) -> Vec<&'static str> {
        let mut fields = Vec::new();
        let mut check = |same: bool, name| {
            if !same {
                fields.push(name);
            }
        };
        check(self.model == other.model, "model");
        check(self.device_id == other.device_id, "device_id");
        check(self.input_tokens == other.input_tokens, "input_tokens");
        check(self.output_tokens == other.output_tokens, "output_tokens");
        check(
            self.total_micro_usd == other.total_micro_usd,
            "total_micro_usd",
        );
        check(self.at == other.at, "at");
        fields
    }
}
