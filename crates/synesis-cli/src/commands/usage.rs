//! `synesis usage`: what the local ledger holds — answers made on this device with the cloud cost
//! they avoided, and the cloud's charges as last synced.

use std::fmt::Write as _;

use serde::Serialize;
use synesis_ledger_local::{GroupTotals, Grouping, LocalLedger, REFERENCE_MODEL, Summary};
use synesis_proto::{MicroUsd, UnixMillis};

use super::Output;
use crate::cli::{LocalGrouping, UsageArgs};

use super::ledger_error;
use crate::paths::Paths;

/// `--since`: `YYYY-MM-DD` (midnight UTC) or an RFC 3339 time.
pub(crate) fn parse_since(text: &str) -> Result<UnixMillis, String> {
    let t = text.trim();
    let is_date = t.len() == 10
        && t.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    let rfc3339 = if is_date {
        format!("{t}T00:00:00Z")
    } else {
        t.to_owned()
    };
    // The RFC 3339 parser checks the calendar too (no 2026-02-30).
    UnixMillis::parse_rfc3339(&rfc3339).map_err(|_| {
        format!("{text:?} is not a date: give YYYY-MM-DD (UTC) or an RFC 3339 time such as 2026-01-31T08:00:00Z")
    })
}

pub(crate) fn run(out: &Output, paths: &Paths, args: &UsageArgs) -> anyhow::Result<()> {
    let file = paths.ledger_file();
    // No ledger yet: nothing was recorded, which is a report of zeros, not an error.
    let by = args.by.map(|b| match b {
        LocalGrouping::Day => Grouping::Day,
        LocalGrouping::Model => Grouping::Model,
        LocalGrouping::Route => Grouping::Route,
    });
    let (summary, groups) = if file.exists() {
        let ledger = LocalLedger::open(&file).map_err(ledger_error)?;
        let summary = ledger.summary(args.since).map_err(ledger_error)?;
        let groups = match by {
            Some(by) => Some(ledger.groups(args.since, by).map_err(ledger_error)?),
            None => None,
        };
        (summary, groups)
    } else {
        (Summary::default(), by.map(|_| Vec::new()))
    };
    #[derive(Serialize)]
    struct View<'a> {
        #[serde(flatten)]
        summary: &'a Summary,
        #[serde(skip_serializing_if = "Option::is_none")]
        by: Option<Grouping>,
        #[serde(skip_serializing_if = "Option::is_none")]
        groups: Option<&'a [GroupTotals]>,
    }
    let view = View {
        summary: &summary,
        by,
        groups: groups.as_deref(),
    };
    out.report(&view, || {
        let mut text = human(&summary, args.since);
        if let (Some(by), Some(groups)) = (by, &groups) {
            text.push_str(&grouped(by, groups));
        }
        text
    })?;
    Ok(())
}

/// The `--by` table: one line per group and kind.
fn grouped(by: Grouping, groups: &[GroupTotals]) -> String {
    let title = match by {
        Grouping::Day => "day (UTC)",
        Grouping::Model => "model",
        Grouping::Route => "route reason",
    };
    let mut text = format!(
        "\n{title:<24} {:<6} {:>8} {:>12} {:>12} {:>14}\n",
        "kind", "count", "tokens in", "tokens out", "USD"
    );
    for g in groups {
        let _ = writeln!(
            text,
            "{:<24} {:<6} {:>8} {:>12} {:>12} {:>14}",
            g.key,
            g.kind.as_str(),
            g.count,
            g.input_tokens,
            g.output_tokens,
            dollars(g.micro_usd),
        );
    }
    text
}

fn dollars(m: MicroUsd) -> String {
    format!("${m}")
}

fn time(t: UnixMillis) -> String {
    t.to_rfc3339().unwrap_or_else(|| format!("{} ms", t.0))
}

fn human(s: &Summary, since: Option<UnixMillis>) -> String {
    let mut text = String::new();
    if let Some(t) = since {
        let _ = writeln!(text, "since {}\n", time(t));
    }
    let _ = writeln!(
        text,
        "{:<16} {:>8} {:>12} {:>12} {:>14}",
        "", "count", "tokens in", "tokens out", "USD"
    );
    let _ = writeln!(
        text,
        "{:<16} {:>8} {:>12} {:>12} {:>14}  cloud cost avoided ({REFERENCE_MODEL}, managed)",
        "on this device",
        s.local.generations,
        s.local.input_tokens,
        s.local.output_tokens,
        dollars(s.local.cloud_cost_avoided_micro_usd),
    );
    let _ = writeln!(
        text,
        "{:<16} {:>8} {:>12} {:>12} {:>14}  charged",
        "cloud charges",
        s.cloud.charges,
        s.cloud.input_tokens,
        s.cloud.output_tokens,
        dollars(s.cloud.total_micro_usd),
    );
    match s.last_sync_at {
        Some(t) => {
            let _ = writeln!(text, "\nlast sync        {}", time(t));
        }
        None => {
            let _ = writeln!(
                text,
                "\nlast sync        never (`synesis cloud sync` mirrors the cloud's charges here)"
            );
        }
    }
    if !s.by_model.is_empty() {
        let _ = writeln!(
            text,
            "\n{:<24} {:<6} {:>8} {:>12} {:>12} {:>14}",
            "model", "kind", "count", "tokens in", "tokens out", "USD"
        );
        for m in &s.by_model {
            let kind = m.kind.as_str();
            let _ = writeln!(
                text,
                "{:<24} {kind:<6} {:>8} {:>12} {:>12} {:>14}",
                m.model,
                m.generations,
                m.input_tokens,
                m.output_tokens,
                dollars(m.micro_usd),
            );
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use synesis_ledger_local::{EntryKind, LocalTotals, ModelTotals};

    #[test]
    fn since_takes_a_date_or_an_rfc3339_time() {
        assert_eq!(parse_since("2026-01-01"), Ok(UnixMillis(1_767_225_600_000)));
        assert_eq!(
            parse_since("2026-01-01T01:00:00+01:00"),
            Ok(UnixMillis(1_767_225_600_000))
        );
        for bad in [
            "2026-02-30",
            "2026-1-1",
            "yesterday",
            "",
            "2026-01-01T25:00:00Z",
        ] {
            let err = parse_since(bad).unwrap_err();
            assert!(err.contains("YYYY-MM-DD"), "{bad}: {err}");
        }
    }

    #[test]
    fn the_table_shows_avoided_cost_in_dollars() {
        let s = Summary {
            local: LocalTotals {
                generations: 2,
                input_tokens: 24,
                output_tokens: 32,
                cloud_cost_avoided_micro_usd: MicroUsd(552),
            },
            by_model: vec![ModelTotals {
                model: "demo".into(),
                kind: EntryKind::Local,
                generations: 2,
                input_tokens: 24,
                output_tokens: 32,
                micro_usd: MicroUsd(552),
            }],
            ..Summary::default()
        };
        let text = human(&s, None);
        assert!(text.contains("$0.000552"), "{text}");
        assert!(text.contains("cloud cost avoided"), "{text}");
        assert!(text.contains("never"), "{text}");
        assert!(text.contains("demo"), "{text}");
    }
}
