//! The Free tier's monthly token quota: per UTC calendar month.

use chrono::{Datelike, TimeZone, Utc};
use synesis_proto::UnixMillis;

/// A UTC calendar month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QuotaPeriod {
    pub year: i32,
    pub month: u32,
}

/// The UTC calendar month `at` falls in (`None` outside chrono's range of years).
pub fn quota_period(at: UnixMillis) -> Option<QuotaPeriod> {
    let t = Utc.timestamp_millis_opt(at.0).single()?;
    Some(QuotaPeriod {
        year: t.year(),
        month: t.month(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the monthly quota of {quota} tokens would be exceeded: {used} used, {requested} more asked"
)]
pub struct QuotaExceeded {
    pub quota: u64,
    pub used: u64,
    pub requested: u64,
}

/// When the UTC calendar month `at` falls in began.
pub fn month_start(at: UnixMillis) -> Option<UnixMillis> {
    let p = quota_period(at)?;
    let start = Utc.with_ymd_and_hms(p.year, p.month, 1, 0, 0, 0).single()?;
    Some(UnixMillis(start.timestamp_millis()))
}

/// Whether a request of `requested` tokens fits after `used` tokens this month: it must not
/// cross the quota (ending exactly on it is allowed). Refused before it runs.
pub fn admit_free(used: u64, requested: u64, quota: u64) -> Result<(), QuotaExceeded> {
    match used.checked_add(requested) {
        Some(after) if after <= quota => Ok(()),
        _ => Err(QuotaExceeded {
            quota,
            used,
            requested,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_boundary() {
        let q = 100_000;
        assert_eq!(admit_free(0, q - 1, q), Ok(()));
        assert_eq!(admit_free(0, q, q), Ok(()));
        assert!(admit_free(0, q + 1, q).is_err());
        assert!(admit_free(q, 1, q).is_err());
        assert!(admit_free(u64::MAX, 1, q).is_err(), "no overflow");
    }

    #[test]
    fn months_roll_over_in_utc() {
        // 2026-11-30T23:59:59.999Z and one millisecond later
        let last = UnixMillis(1_796_083_199_999);
        assert_eq!(
            quota_period(last),
            Some(QuotaPeriod {
                year: 2026,
                month: 11
            })
        );
        assert_eq!(
            quota_period(UnixMillis(last.0 + 1)),
            Some(QuotaPeriod {
                year: 2026,
                month: 12
            })
        );
        // New year
        let eoy = UnixMillis(1_798_761_599_999);
        assert_eq!(
            quota_period(eoy),
            Some(QuotaPeriod {
                year: 2026,
                month: 12
            })
        );
        assert_eq!(
            quota_period(UnixMillis(eoy.0 + 1)),
            Some(QuotaPeriod {
                year: 2027,
                month: 1
            })
        );
    }
}
