//! `synesis-route` — the local-first policy: answer on this device, or escalate to the cloud,
//! and say why.
//!
//! [`route`] is a pure function of what the caller measured ([`Inputs`]) and the thresholds
//! ([`Thresholds`]): no IO, no clock, no randomness, so a person can predict it and the tests
//! can walk every edge. The caller gathers the inputs (the local model, the vitals' stress
//! verdict, the tunnel's state, the account's standing when known, the confidence of the first
//! tokens once measured) and follows the answer.
//!
//! The rules, in order of precedence:
//! 1. The user forces a route (`--local`, `--cloud`): it is taken, or refused when impossible
//!    (`--local` with no local model or an over-long prompt; `--cloud` with no cloud).
//! 2. The device cannot answer (no local model; prompt plus max tokens over its context): the
//!    cloud, when it can be asked; otherwise there is no route.
//! 3. The cloud cannot be asked, or would refuse (not enrolled, unreachable, Free quota spent,
//!    balance below the hold): local, and the reason says why it did not escalate.
//! 4. The device is stressed (the vitals' verdict): the cloud.
//! 5. The first tokens' confidence (mean log-probability), once measured, is under the
//!    threshold: the cloud. Not measured yet: local, and the caller measures it
//!    ([`Route::measure_confidence`]).
//! 6. Otherwise: local.

use serde::Serialize;
use synesis_vitals::StressReason;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    Auto,
    Local,
    Cloud,
}

/// Whether the cloud can be asked now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloudReach {
    /// This device has no identity.
    NotEnrolled,
    /// Enrolled, and the last attempt (or the tunnel service) says the cloud cannot be reached.
    Unreachable,
    /// Enrolled and, as far as is known, reachable.
    Reachable,
}

/// The account's standing, when the device knows it (a recent usage reply, a refusal).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct Standing {
    /// Free tier: the monthly quota tokens left.
    pub quota_tokens_left: Option<u64>,
    /// Paying tiers: the available balance, and what the hold for this request would be, in
    /// micro-USD.
    pub available_micro_usd: Option<i64>,
    pub hold_micro_usd: Option<i64>,
}

/// The local model, when there is one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LocalModel {
    pub context_tokens: u32,
}

/// Everything the policy reads, measured by the caller.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inputs {
    pub mode: Mode,
    pub local: Option<LocalModel>,
    /// The prompt's tokens on the local model (with its chat format).
    pub prompt_tokens: u64,
    pub max_tokens: u32,
    /// The vitals' stress verdict (empty: calm).
    #[serde(skip)]
    pub stress: Vec<StressReason>,
    pub cloud: CloudReach,
    pub standing: Option<Standing>,
    /// The mean log-probability of the first tokens generated locally, once measured.
    pub confidence: Option<f64>,
}

/// The thresholds (`config.toml` `[escalation]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    /// Escalate when the first tokens' mean log-probability is below this.
    pub min_confidence: f64,
    /// How many tokens the confidence is measured on.
    pub cascade_tokens: u32,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            min_confidence: -3.0,
            cascade_tokens: 16,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Local,
    Cloud,
}

/// Why a route was taken (or another was not); every one that applied, in precedence order.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// `--local` or `--cloud`.
    Forced {
        mode: Mode,
    },
    NoLocalModel,
    /// Prompt plus max tokens do not fit the local context.
    OverContext {
        prompt_tokens: u64,
        max_tokens: u32,
        context_tokens: u32,
    },
    NotEnrolled,
    CloudUnreachable,
    /// Free tier: the hold (prompt plus max tokens) is more than the quota left.
    QuotaSpent {
        needed: u64,
        left: u64,
    },
    /// The balance does not cover the hold.
    BalanceShort {
        hold_micro_usd: i64,
        available_micro_usd: i64,
    },
    /// The device is under stress.
    Stressed {
        reasons: Vec<String>,
    },
    LowConfidence {
        measured: f64,
        threshold: f64,
    },
    ConfidentEnough {
        measured: f64,
        threshold: f64,
    },
    /// Nothing calls for the cloud.
    LocalCanAnswer,
}

impl Reason {
    /// A stable name for records and scripts (the `reason` of its JSON).
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Forced { mode: Mode::Local } => "forced_local",
            Reason::Forced { mode: Mode::Cloud } => "forced_cloud",
            Reason::Forced { mode: Mode::Auto } => "auto",
            Reason::NoLocalModel => "no_local_model",
            Reason::OverContext { .. } => "over_context",
            Reason::NotEnrolled => "not_enrolled",
            Reason::CloudUnreachable => "cloud_unreachable",
            Reason::QuotaSpent { .. } => "quota_spent",
            Reason::BalanceShort { .. } => "balance_short",
            Reason::Stressed { .. } => "stressed",
            Reason::LowConfidence { .. } => "low_confidence",
            Reason::ConfidentEnough { .. } => "confident_enough",
            Reason::LocalCanAnswer => "local_can_answer",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Forced { mode } => write!(
                f,
                "asked for {}",
                match mode {
                    Mode::Local => "--local",
                    Mode::Cloud => "--cloud",
                    Mode::Auto => "auto",
                }
            ),
            Reason::NoLocalModel => f.write_str("no local model"),
            Reason::OverContext {
                prompt_tokens,
                max_tokens,
                context_tokens,
            } => write!(
                f,
                "{prompt_tokens} prompt + {max_tokens} max tokens exceed the local context of {context_tokens}"
            ),
            Reason::NotEnrolled => f.write_str("not enrolled with a cloud"),
            Reason::CloudUnreachable => f.write_str("the cloud is unreachable"),
            Reason::QuotaSpent { needed, left } => {
                write!(
                    f,
                    "the Free quota has {left} tokens left; this needs up to {needed}"
                )
            }
            Reason::BalanceShort {
                hold_micro_usd,
                available_micro_usd,
            } => write!(
                f,
                "the balance ({available_micro_usd} µUSD) does not cover the hold ({hold_micro_usd} µUSD)"
            ),
            Reason::Stressed { reasons } => {
                write!(f, "the device is stressed: {}", reasons.join(", "))
            }
            Reason::LowConfidence {
                measured,
                threshold,
            } => write!(f, "confidence {measured:.2} is under {threshold:.2}"),
            Reason::ConfidentEnough {
                measured,
                threshold,
            } => write!(f, "confidence {measured:.2} is at least {threshold:.2}"),
            Reason::LocalCanAnswer => f.write_str("this device can answer"),
        }
    }
}

/// The policy's answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Route {
    pub decision: Decision,
    pub reasons: Vec<Reason>,
    /// Local, but the first tokens' confidence is still to be measured (then [`route`] again
    /// with it).
    pub measure_confidence: bool,
}

/// No route can answer: both ways are closed (or the forced one is).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NoRoute {
    pub reasons: Vec<Reason>,
}

impl std::fmt::Display for NoRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let reasons: Vec<String> = self.reasons.iter().map(ToString::to_string).collect();
        write!(f, "no way to answer: {}", reasons.join("; "))
    }
}

/// Why the device cannot answer by itself, if it cannot.
fn local_blocker(i: &Inputs) -> Option<Reason> {
    let Some(local) = i.local else {
        return Some(Reason::NoLocalModel);
    };
    let needed = i.prompt_tokens.saturating_add(u64::from(i.max_tokens));
    (needed > u64::from(local.context_tokens)).then_some(Reason::OverContext {
        prompt_tokens: i.prompt_tokens,
        max_tokens: i.max_tokens,
        context_tokens: local.context_tokens,
    })
}

/// Why the cloud cannot (or would refuse to) answer, if it cannot.
fn cloud_blocker(i: &Inputs) -> Option<Reason> {
    match i.cloud {
        CloudReach::NotEnrolled => return Some(Reason::NotEnrolled),
        CloudReach::Unreachable => return Some(Reason::CloudUnreachable),
        CloudReach::Reachable => {}
    }
    let s = i.standing?;
    let needed = i.prompt_tokens.saturating_add(u64::from(i.max_tokens));
    if let Some(left) = s.quota_tokens_left
        && needed > left
    {
        return Some(Reason::QuotaSpent { needed, left });
    }
    match (s.hold_micro_usd, s.available_micro_usd) {
        (Some(hold), Some(available)) if hold > available => Some(Reason::BalanceShort {
            hold_micro_usd: hold,
            available_micro_usd: available,
        }),
        _ => None,
    }
}

pub fn route(i: &Inputs, t: &Thresholds) -> Result<Route, NoRoute> {
    let local = |reasons, measure_confidence| Route {
        decision: Decision::Local,
        reasons,
        measure_confidence,
    };
    let cloud = |reasons| Route {
        decision: Decision::Cloud,
        reasons,
        measure_confidence: false,
    };
    let local_blocked = local_blocker(i);
    let cloud_blocked = cloud_blocker(i);
    match i.mode {
        Mode::Local => {
            return match local_blocked {
                Some(why) => Err(NoRoute {
                    reasons: vec![Reason::Forced { mode: Mode::Local }, why],
                }),
                None => Ok(local(vec![Reason::Forced { mode: Mode::Local }], false)),
            };
        }
        Mode::Cloud => {
            return match cloud_blocked {
                Some(why) => Err(NoRoute {
                    reasons: vec![Reason::Forced { mode: Mode::Cloud }, why],
                }),
                None => Ok(cloud(vec![Reason::Forced { mode: Mode::Cloud }])),
            };
        }
        Mode::Auto => {}
    }
    match (local_blocked, cloud_blocked) {
        (Some(l), Some(c)) => Err(NoRoute {
            reasons: vec![l, c],
        }),
        (Some(l), None) => Ok(cloud(vec![l])),
        (None, Some(c)) => Ok(local(vec![c], false)),
        (None, None) => {
            if !i.stress.is_empty() {
                return Ok(cloud(vec![Reason::Stressed {
                    reasons: i.stress.iter().map(ToString::to_string).collect(),
                }]));
            }
            match i.confidence {
                None if t.cascade_tokens > 0 => Ok(local(vec![Reason::LocalCanAnswer], true)),
                None => Ok(local(vec![Reason::LocalCanAnswer], false)),
                Some(measured) if measured < t.min_confidence => {
                    Ok(cloud(vec![Reason::LowConfidence {
                        measured,
                        threshold: t.min_confidence,
                    }]))
                }
                Some(measured) => Ok(local(
                    vec![Reason::ConfidentEnough {
                        measured,
                        threshold: t.min_confidence,
                    }],
                    false,
                )),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calm() -> Inputs {
        Inputs {
            mode: Mode::Auto,
            local: Some(LocalModel {
                context_tokens: 256,
            }),
            prompt_tokens: 56,
            max_tokens: 100,
            stress: vec![],
            cloud: CloudReach::Reachable,
            standing: None,
            confidence: None,
        }
    }

    fn t() -> Thresholds {
        Thresholds::default()
    }

    fn decide(i: &Inputs) -> (Decision, Vec<Reason>, bool) {
        let r = route(i, &t()).unwrap();
        (r.decision, r.reasons, r.measure_confidence)
    }

    fn hot() -> Vec<StressReason> {
        vec![StressReason::Memory {
            used_bytes: 95,
            total_bytes: 100,
        }]
    }

    #[test]
    fn a_calm_device_that_can_answer_measures_its_confidence_first() {
        assert_eq!(
            decide(&calm()),
            (Decision::Local, vec![Reason::LocalCanAnswer], true)
        );
        let no_cascade = Thresholds {
            cascade_tokens: 0,
            ..t()
        };
        assert!(!route(&calm(), &no_cascade).unwrap().measure_confidence);
    }

    #[test]
    fn each_reason_alone() {
        let cases: Vec<(Inputs, Decision, Reason)> = vec![
            (
                Inputs {
                    local: None,
                    ..calm()
                },
                Decision::Cloud,
                Reason::NoLocalModel,
            ),
            (
                Inputs {
                    max_tokens: 201,
                    ..calm()
                },
                Decision::Cloud,
                Reason::OverContext {
                    prompt_tokens: 56,
                    max_tokens: 201,
                    context_tokens: 256,
                },
            ),
            (
                Inputs {
                    stress: hot(),
                    ..calm()
                },
                Decision::Cloud,
                Reason::Stressed {
                    reasons: vec!["memory 95 % used".into()],
                },
            ),
            (
                Inputs {
                    confidence: Some(-3.5),
                    ..calm()
                },
                Decision::Cloud,
                Reason::LowConfidence {
                    measured: -3.5,
                    threshold: -3.0,
                },
            ),
            (
                Inputs {
                    confidence: Some(-0.5),
                    ..calm()
                },
                Decision::Local,
                Reason::ConfidentEnough {
                    measured: -0.5,
                    threshold: -3.0,
                },
            ),
        ];
        for (inputs, decision, reason) in cases {
            assert_eq!(decide(&inputs).0, decision, "{inputs:?}");
            assert_eq!(decide(&inputs).1, vec![reason]);
        }
    }

    #[test]
    fn thresholds_at_their_edges() {
        // The context: exactly full fits; one more token does not.
        assert_eq!(
            decide(&Inputs {
                max_tokens: 200,
                ..calm()
            })
            .0,
            Decision::Local
        );
        assert_eq!(
            decide(&Inputs {
                max_tokens: 201,
                ..calm()
            })
            .0,
            Decision::Cloud
        );
        // Confidence: at the threshold stays local; just under escalates.
        assert_eq!(
            decide(&Inputs {
                confidence: Some(-3.0),
                ..calm()
            })
            .0,
            Decision::Local
        );
        assert_eq!(
            decide(&Inputs {
                confidence: Some(-3.000_001),
                ..calm()
            })
            .0,
            Decision::Cloud
        );
        // Quota: exactly enough is enough.
        let over = |left| Inputs {
            stress: hot(),
            standing: Some(Standing {
                quota_tokens_left: Some(left),
                ..Standing::default()
            }),
            ..calm()
        };
        assert_eq!(decide(&over(156)).0, Decision::Cloud);
        assert_eq!(decide(&over(155)).0, Decision::Local);
        // Balance: a hold equal to the balance is covered.
        let money = |hold, available| Inputs {
            stress: hot(),
            standing: Some(Standing {
                hold_micro_usd: Some(hold),
                available_micro_usd: Some(available),
                ..Standing::default()
            }),
            ..calm()
        };
        assert_eq!(decide(&money(100, 100)).0, Decision::Cloud);
        assert_eq!(decide(&money(101, 100)).0, Decision::Local);
    }

    #[test]
    fn a_closed_cloud_keeps_a_possible_answer_local_and_says_why() {
        for (cloud, why) in [
            (CloudReach::NotEnrolled, Reason::NotEnrolled),
            (CloudReach::Unreachable, Reason::CloudUnreachable),
        ] {
            // Even stressed, or unsure: a local answer beats none.
            let i = Inputs {
                cloud,
                stress: hot(),
                confidence: Some(-9.0),
                ..calm()
            };
            assert_eq!(decide(&i), (Decision::Local, vec![why], false));
        }
    }

    #[test]
    fn precedence_forced_then_cannot_then_cloud_closed_then_stress_then_confidence() {
        let everything = Inputs {
            max_tokens: 500,
            stress: hot(),
            confidence: Some(-9.0),
            ..calm()
        };
        // The device cannot answer: that comes before stress and confidence.
        assert!(matches!(
            decide(&everything).1[0],
            Reason::OverContext { .. }
        ));
        // Both closed: no route, both reasons.
        let none = Inputs {
            cloud: CloudReach::Unreachable,
            ..everything.clone()
        };
        let refused = route(&none, &t()).unwrap_err();
        assert!(matches!(
            refused.reasons[..],
            [Reason::OverContext { .. }, Reason::CloudUnreachable]
        ));
        // Stress before confidence.
        let stressed = Inputs {
            max_tokens: 10,
            ..everything.clone()
        };
        assert!(matches!(decide(&stressed).1[0], Reason::Stressed { .. }));
        // Forced routes win over everything they can.
        let forced_cloud = Inputs {
            mode: Mode::Cloud,
            ..calm()
        };
        assert_eq!(decide(&forced_cloud).0, Decision::Cloud);
        let forced_local = Inputs {
            mode: Mode::Local,
            stress: hot(),
            ..calm()
        };
        assert_eq!(
            decide(&forced_local),
            (
                Decision::Local,
                vec![Reason::Forced { mode: Mode::Local }],
                false
            )
        );
    }

    #[test]
    fn a_forced_route_that_is_impossible_is_an_honest_refusal() {
        let local_too_long = Inputs {
            mode: Mode::Local,
            max_tokens: 500,
            ..calm()
        };
        let err = route(&local_too_long, &t()).unwrap_err();
        assert!(
            err.to_string().contains("exceed the local context"),
            "{err}"
        );
        let cloud_closed = Inputs {
            mode: Mode::Cloud,
            cloud: CloudReach::NotEnrolled,
            ..calm()
        };
        let err = route(&cloud_closed, &t()).unwrap_err();
        assert!(err.to_string().contains("not enrolled"), "{err}");
    }
}
