//! The reconcile of the local ledger with the cloud's: pure functions over two lists, what the
//! device holds and what the cloud says. No storage, no clock: the store reads the rows, asks
//! [`reconcile`] and applies the [`SyncPlan`] in one transaction, stamped with the caller's time.

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use synesis_proto::{DeviceId, RequestId, UnixMillis};

use crate::entry::{CloudCharge, Entry, EntryKind};

/// A cloud charge the local ledger held with other values; the cloud's are written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChargeChange {
    pub request_id: RequestId,
    /// The fields that differed (`model`, `device_id`, `input_tokens`, `output_tokens`,
    /// `total_micro_usd`, `at`).
    pub fields: Vec<&'static str>,
    /// What the local ledger held before.
    pub local: CloudCharge,
    /// What it holds after.
    pub cloud: CloudCharge,
}

/// Why a cloud charge was not applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictReason {
    /// Its request id is an on-device generation's: the two can never share an id.
    LocalGeneration,
    /// The cloud's list named this request id more than once; the first one was applied.
    DuplicateInCloudList,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncConflict {
    pub request_id: RequestId,
    pub reason: ConflictReason,
    /// The charge as the cloud sent it (not written).
    pub cloud: CloudCharge,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SyncCounts {
    /// Charges in the cloud's list: `added + changed + unchanged + conflicts`.
    pub cloud_charges: usize,
    pub added: usize,
    pub changed: usize,
    pub unchanged: usize,
    pub missing_in_cloud: usize,
    pub conflicts: usize,
}

/// What [`reconcile`] found, and so what the store writes: `added` inserted, `changed`
/// overwritten with the cloud's values, nothing else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncPlan {
    pub counts: SyncCounts,
    /// Cloud charges the local ledger lacks, in the cloud's order: to insert.
    pub added: Vec<CloudCharge>,
    /// Cloud charges held with other values: to overwrite with the cloud's.
    pub changed: Vec<ChargeChange>,
    /// Cloud-kind rows the cloud's list lacks, by time then request id: kept, not deleted.
    pub missing_in_cloud: Vec<RequestId>,
    /// Cloud charges not to apply, and why.
    pub conflicts: Vec<SyncConflict>,
}

impl SyncPlan {
    /// The report of this plan, applied at `synced_at`.
    pub fn into_report(self, synced_at: UnixMillis) -> SyncReport {
        SyncReport {
            synced_at,
            counts: self.counts,
            added: self.added.iter().map(|c| c.request_id).collect(),
            changed: self.changed,
            missing_in_cloud: self.missing_in_cloud,
            conflicts: self.conflicts,
        }
    }
}

/// What one sync found and did (`synesis cloud sync --json` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SyncReport {
    pub synced_at: UnixMillis,
    pub counts: SyncCounts,
    /// Cloud charges the local ledger did not have; now it does.
    pub added: Vec<RequestId>,
    /// Cloud charges held here with other values; overwritten with the cloud's.
    pub changed: Vec<ChargeChange>,
    /// Cloud-kind rows here that the cloud's list does not have (kept, not deleted).
    pub missing_in_cloud: Vec<RequestId>,
    /// Cloud charges not applied, and why.
    pub conflicts: Vec<SyncConflict>,
}

impl SyncReport {
    /// Whether the two ledgers agreed already: nothing changed, missing or in conflict.
    pub fn in_agreement(&self) -> bool {
        self.added.is_empty()
            && self.changed.is_empty()
            && self.missing_in_cloud.is_empty()
            && self.conflicts.is_empty()
    }
}

/// The charges of this machine among the account's: those of its `current` identity, and those
/// of the earlier identities whose charges the local ledger already mirrors (`mirrored`, from
/// [`crate::LocalLedger::cloud_devices`]), so that a new `cloud login` does not make them
/// missing on the cloud. Another device's charges, and charges with no device, are left out.
pub fn machine_charges(
    account: impl IntoIterator<Item = CloudCharge>,
    current: DeviceId,
    mirrored: &HashSet<DeviceId>,
) -> Vec<CloudCharge> {
    account
        .into_iter()
        .filter(|c| {
            c.device_id
                .is_some_and(|d| d == current || mirrored.contains(&d))
        })
        .collect()
}

/// Compares the rows the device `held` with the `cloud`'s list, request id by request id: a
/// charge missing here is to add, one held with other values is to overwrite with the cloud's
/// (the authority), equal ones are left alone, and cloud-kind rows here that the cloud's list
/// lacks are reported, not deleted. A cloud charge with an on-device generation's id, or a
/// request id the cloud's list names again, is a conflict and not applied. The same list
/// against the rows it produced plans nothing.
///
/// `held` must contain every cloud-kind row, and every row whose request id the cloud's list
/// names; other local rows are ignored. Request ids are unique in it (the store's key).
pub fn reconcile(held: &[Entry], cloud: &[CloudCharge]) -> SyncPlan {
    let by_id: HashMap<RequestId, &Entry> = held.iter().map(|e| (e.request_id, e)).collect();
    debug_assert_eq!(
        by_id.len(),
        held.len(),
        "request ids are unique in the ledger"
    );
    let mut plan = SyncPlan::default();
    let mut unchanged = 0;
    let mut seen = HashSet::with_capacity(cloud.len());
    for charge in cloud {
        let conflict = |reason| SyncConflict {
            request_id: charge.request_id,
            reason,
            cloud: charge.clone(),
        };
        if !seen.insert(charge.request_id) {
            plan.conflicts
                .push(conflict(ConflictReason::DuplicateInCloudList));
            continue;
        }
        match by_id.get(&charge.request_id) {
            None => plan.added.push(charge.clone()),
            Some(entry) if entry.kind == EntryKind::Local => {
                plan.conflicts
                    .push(conflict(ConflictReason::LocalGeneration));
            }
            Some(entry) => {
                let local = entry.to_charge();
                if local == *charge {
                    unchanged += 1;
                } else {
                    plan.changed.push(ChargeChange {
                        request_id: charge.request_id,
                        fields: local.differences(charge),
                        local,
                        cloud: charge.clone(),
                    });
                }
            }
        }
    }
    let mut missing: Vec<&Entry> = held
        .iter()
        .filter(|e| e.kind == EntryKind::Cloud && !seen.contains(&e.request_id))
        .collect();
    missing.sort_by_key(|e| (e.at, e.request_id));
    plan.missing_in_cloud = missing.into_iter().map(|e| e.request_id).collect();
    plan.counts = SyncCounts {
        cloud_charges: cloud.len(),
        added: plan.added.len(),
        changed: plan.changed.len(),
        unchanged,
        missing_in_cloud: plan.missing_in_cloud.len(),
        conflicts: plan.conflicts.len(),
    };
    debug_assert_eq!(
        plan.counts.added + plan.counts.changed + unchanged + plan.counts.conflicts,
        cloud.len()
    );
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use synesis_proto::MicroUsd;

    fn id(n: u8) -> RequestId {
        RequestId::from_parts(1_700_000_000_000 + u64::from(n), [n; 10])
    }

    fn device(n: u8) -> DeviceId {
        format!("0190a0a0-0000-7000-8000-0000000000{n:02x}")
            .parse()
            .unwrap()
    }

    fn charge(n: u8, total: i64) -> CloudCharge {
        CloudCharge {
            request_id: id(n),
            model: "claude-sonnet".into(),
            device_id: Some(device(1)),
            input_tokens: 100,
            output_tokens: 50,
            total_micro_usd: MicroUsd(total),
            at: UnixMillis(1_000 + i64::from(n)),
        }
    }

    fn held(n: u8, total: i64) -> Entry {
        Entry::cloud(&charge(n, total))
    }

    fn local(n: u8) -> Entry {
        Entry {
            kind: EntryKind::Local,
            model: "demo".into(),
            device_id: None,
            ..held(n, 7)
        }
    }

    /// What a plan says, as request ids per outcome (a row of the table below).
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        added: Vec<RequestId>,
        changed: Vec<(RequestId, Vec<&'static str>)>,
        unchanged: usize,
        missing: Vec<RequestId>,
        conflicts: Vec<(RequestId, ConflictReason)>,
    }

    fn outcome(plan: &SyncPlan) -> Outcome {
        Outcome {
            added: plan.added.iter().map(|c| c.request_id).collect(),
            changed: plan
                .changed
                .iter()
                .map(|c| (c.request_id, c.fields.clone()))
                .collect(),
            unchanged: plan.counts.unchanged,
            missing: plan.missing_in_cloud.clone(),
            conflicts: plan
                .conflicts
                .iter()
                .map(|c| (c.request_id, c.reason))
                .collect(),
        }
    }

    fn none() -> Outcome {
        Outcome {
            added: vec![],
            changed: vec![],
            unchanged: 0,
            missing: vec![],
            conflicts: vec![],
        }
    }

    #[test]
    fn plans_by_request_id() {
        let mut more_tokens = charge(2, 250);
        more_tokens.output_tokens = 60;
        let mut moved = charge(3, 300);
        moved.at = UnixMillis(5);
        moved.model = "claude-opus".into();
        moved.device_id = None;
        let mut fewer_in = charge(4, 400);
        fewer_in.input_tokens = 1;
        let cases: Vec<(&str, Vec<Entry>, Vec<CloudCharge>, Outcome)> = vec![
            ("both empty", vec![], vec![], none()),
            (
                "agree",
                vec![held(1, 100), held(2, 200)],
                vec![charge(1, 100), charge(2, 200)],
                Outcome {
                    unchanged: 2,
                    ..none()
                },
            ),
            (
                "only on the cloud: added in the cloud's order",
                vec![],
                vec![charge(3, 300), charge(1, 100)],
                Outcome {
                    added: vec![id(3), id(1)],
                    ..none()
                },
            ),
            (
                "only here: missing on the cloud, by time",
                vec![held(3, 300), held(1, 100), local(2)],
                vec![],
                Outcome {
                    missing: vec![id(1), id(3)],
                    ..none()
                },
            ),
            (
                "differing values: the fields that differ, in a fixed order",
                vec![held(2, 200), held(3, 300), held(4, 400)],
                vec![more_tokens, moved, fewer_in],
                Outcome {
                    changed: vec![
                        (id(2), vec!["output_tokens", "total_micro_usd"]),
                        (id(3), vec!["model", "device_id", "at"]),
                        (id(4), vec!["input_tokens"]),
                    ],
                    ..none()
                },
            ),
            (
                "a charge with an on-device generation's id",
                vec![local(9)],
                vec![charge(9, 1)],
                Outcome {
                    conflicts: vec![(id(9), ConflictReason::LocalGeneration)],
                    ..none()
                },
            ),
            (
                "a request id named twice: the first one counts",
                vec![],
                vec![charge(1, 100), charge(1, 999)],
                Outcome {
                    added: vec![id(1)],
                    conflicts: vec![(id(1), ConflictReason::DuplicateInCloudList)],
                    ..none()
                },
            ),
            (
                "a local generation's id named twice: a conflict each time",
                vec![local(9)],
                vec![charge(9, 1), charge(9, 1)],
                Outcome {
                    conflicts: vec![
                        (id(9), ConflictReason::LocalGeneration),
                        (id(9), ConflictReason::DuplicateInCloudList),
                    ],
                    ..none()
                },
            ),
            (
                "local generations the cloud does not name are not its business",
                vec![local(8), held(1, 100)],
                vec![charge(1, 100)],
                Outcome {
                    unchanged: 1,
                    ..none()
                },
            ),
        ];
        for (name, held, cloud, expected) in cases {
            let plan = reconcile(&held, &cloud);
            assert_eq!(outcome(&plan), expected, "{name}");
            let c = plan.counts;
            assert_eq!(
                (
                    c.cloud_charges,
                    c.added,
                    c.changed,
                    c.missing_in_cloud,
                    c.conflicts
                ),
                (
                    cloud.len(),
                    expected.added.len(),
                    expected.changed.len(),
                    expected.missing.len(),
                    expected.conflicts.len()
                ),
                "{name}"
            );
        }
    }

    #[test]
    fn a_change_carries_both_values_and_the_report_its_time() {
        let mut two = charge(2, 250);
        two.output_tokens = 60;
        let mut clash = charge(9, 1);
        clash.model = "claude-opus".into();
        let held = [local(9), held(1, 100), held(2, 200), held(3, 300)];
        let plan = reconcile(
            &held,
            &[charge(1, 100), two.clone(), charge(4, 400), clash.clone()],
        );
        assert_eq!(plan.added, [charge(4, 400)]);
        assert_eq!(
            plan.changed,
            [ChargeChange {
                request_id: id(2),
                fields: vec!["output_tokens", "total_micro_usd"],
                local: charge(2, 200),
                cloud: two,
            }]
        );
        assert_eq!(plan.conflicts[0].cloud, clash);
        assert_eq!(
            plan.counts,
            SyncCounts {
                cloud_charges: 4,
                added: 1,
                changed: 1,
                unchanged: 1,
                missing_in_cloud: 1,
                conflicts: 1,
            }
        );

        let report = plan.into_report(UnixMillis(2));
        assert_eq!(report.synced_at, UnixMillis(2));
        assert_eq!(report.added, [id(4)]);
        assert_eq!(report.missing_in_cloud, [id(3)]);
        assert!(!report.in_agreement());
    }

    #[test]
    fn the_plan_applied_then_the_same_list_again_is_agreement() {
        let cloud = [charge(1, 100), charge(2, 200)];
        let first = reconcile(&[held(2, 199)], &cloud);
        // What the store holds after applying the plan.
        let after: Vec<Entry> = cloud.iter().map(Entry::cloud).collect();
        assert_eq!(first.added.len() + first.changed.len(), 2);
        let again = reconcile(&after, &cloud).into_report(UnixMillis(1));
        assert!(again.in_agreement(), "{again:?}");
        assert_eq!(again.counts.unchanged, 2);
    }

    #[test]
    fn rows_missing_on_the_cloud_at_one_time_are_ordered_by_request_id() {
        let at = |n, t| Entry {
            at: UnixMillis(t),
            ..held(n, 1)
        };
        let plan = reconcile(&[at(2, 7), at(3, 6), at(1, 7), at(0, 7)], &[]);
        assert_eq!(plan.missing_in_cloud, [id(3), id(0), id(1), id(2)]);
    }

    #[test]
    fn machine_charges_are_the_current_and_mirrored_identities() {
        let (current, earlier, stranger) = (device(1), device(2), device(3));
        let mut mine = charge(1, 100);
        mine.device_id = Some(current);
        let mut before_login = charge(2, 200);
        before_login.device_id = Some(earlier);
        let mut theirs = charge(3, 300);
        theirs.device_id = Some(stranger);
        let mut api_key = charge(4, 400);
        api_key.device_id = None;
        let account = [mine.clone(), before_login.clone(), theirs, api_key];

        // A first sync mirrors only the current identity's charges.
        let first = machine_charges(account.clone(), current, &HashSet::new());
        assert_eq!(first, [mine.clone()]);
        // Once the ledger holds an earlier identity's charges, they stay this machine's.
        let mirrored = HashSet::from([earlier]);
        let later = machine_charges(account.clone(), current, &mirrored);
        assert_eq!(later, [mine.clone(), before_login.clone()]);

        // So after a new login, the earlier identity's charge the ledger holds is in agreement,
        // not missing on the cloud, and the new identity's charge is added.
        let held = [Entry::cloud(&before_login)];
        let new_identity = device(4);
        let mut after_login = charge(5, 500);
        after_login.device_id = Some(new_identity);
        let mut account = account.to_vec();
        account.push(after_login);
        let plan = reconcile(&held, &machine_charges(account, new_identity, &mirrored));
        assert_eq!(
            outcome(&plan),
            Outcome {
                added: vec![id(5)],
                unchanged: 1,
                ..none()
            }
        );
    }
}
