//! Tenant budgets: daily and monthly limits in USD, checked before each
//! provider call against the spend the ledger has seen, and what to do with
//! a task whose tenant is over: fail it (`budget_exceeded`) or hold it until
//! the period ends. A plain policy; the Dispatcher applies it.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ledger::{day_of, next_day, next_month, Spend};
use crate::pricing::{usd, Picousd, PICOUSD_PER_USD};
use crate::task::Priority;

/// One tenant's limits; `None` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// USD per UTC day.
    #[serde(default)]
    pub daily_usd: Option<f64>,
    /// USD per UTC month.
    #[serde(default)]
    pub monthly_usd: Option<f64>,
}

/// What happens to a task whose tenant's budget is spent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnExceeded {
    /// `budget_exceeded` outcome and a dead letter.
    #[default]
    Reject,
    /// Requeued without spending an attempt until the period ends.
    Hold,
}

/// A budget period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    /// The UTC day.
    Daily,
    /// The UTC month.
    Monthly,
}

impl Period {
    /// Both, in label order.
    pub const ALL: [Period; 2] = [Period::Daily, Period::Monthly];

    /// The `period` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Monthly => "monthly",
        }
    }
}

/// Budgets of every tenant.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Budgets {
    /// Limits of a tenant without its own entry.
    pub default: Budget,
    /// Limits per tenant.
    pub tenants: HashMap<String, Budget>,
    /// What to do per priority, by [`Priority::index`].
    pub on_exceeded: [OnExceeded; 3],
    /// How long a held task waits before it is requeued and looked at again
    /// (at most until the period ends).
    pub hold_recheck: Duration,
}

/// The check before a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Verdict {
    /// Within every limit.
    Within,
    /// Over a limit.
    Exceeded {
        /// Which period.
        period: Period,
        /// Spent in it, USD.
        spent_usd: f64,
        /// Its limit, USD.
        limit_usd: f64,
        /// When it ends.
        resets_at: DateTime<Utc>,
        /// What to do with the task.
        action: OnExceeded,
    },
}

fn limit_picousd(usd: f64) -> Picousd {
    (usd * PICOUSD_PER_USD).round().max(0.0) as Picousd
}

impl Budgets {
    /// The limits of `tenant`.
    pub fn of(&self, tenant: &str) -> Budget {
        self.tenants.get(tenant).copied().unwrap_or(self.default)
    }

    /// True when no tenant has a limit (the check is skipped).
    pub fn is_unlimited(&self) -> bool {
        let none = |b: &Budget| b.daily_usd.is_none() && b.monthly_usd.is_none();
        none(&self.default) && self.tenants.values().all(none)
    }

    /// Checks `tenant` at `now` against `spend`.
    pub fn check(&self, tenant: &str, p: Priority, spend: &Spend, now: DateTime<Utc>) -> Verdict {
        let b = self.of(tenant);
        if b.daily_usd.is_none() && b.monthly_usd.is_none() {
            return Verdict::Within;
        }
        let (today, month) = spend.of(tenant, &day_of(now));
        for (period, limit, spent, resets_at) in [
            (Period::Daily, b.daily_usd, today, next_day(now)),
            (Period::Monthly, b.monthly_usd, month, next_month(now)),
        ] {
            if let Some(limit) = limit {
                if spent >= limit_picousd(limit) {
                    return Verdict::Exceeded {
                        period,
                        spent_usd: usd(spent),
                        limit_usd: limit,
                        resets_at,
                        action: self.on_exceeded[p.index()],
                    };
                }
            }
        }
        Verdict::Within
    }

    /// Used over limit per period for `tenant` (absent where no limit).
    pub fn used_ratios(
        &self,
        tenant: &str,
        spend: &Spend,
        now: DateTime<Utc>,
    ) -> Vec<(Period, f64)> {
        let b = self.of(tenant);
        let (today, month) = spend.of(tenant, &day_of(now));
        [
            (Period::Daily, b.daily_usd, today),
            (Period::Monthly, b.monthly_usd, month),
        ]
        .into_iter()
        .filter_map(|(period, limit, spent)| {
            let limit = limit?;
            let ratio = if limit > 0.0 { usd(spent) / limit } else { 1.0 };
            Some((period, ratio))
        })
        .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn budgets() -> Budgets {
        Budgets {
            default: Budget {
                daily_usd: Some(1.0),
                monthly_usd: None,
            },
            tenants: [(
                "acme".to_owned(),
                Budget {
                    daily_usd: Some(10.0),
                    monthly_usd: Some(12.0),
                },
            )]
            .into(),
            on_exceeded: [OnExceeded::Hold, OnExceeded::Hold, OnExceeded::Reject],
            hold_recheck: Duration::from_secs(60),
        }
    }

    fn usd_p(x: f64) -> Picousd {
        limit_picousd(x)
    }

    #[test]
    fn a_tenant_within_its_limits_may_call() {
        let s = Spend::default();
        s.add("acme", "2026-12-01", usd_p(9.99));
        let now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
        assert_eq!(
            budgets().check("acme", Priority::P2, &s, now),
            Verdict::Within
        );
    }

    #[test]
    fn the_daily_limit_resets_at_midnight_and_the_action_follows_the_priority() {
        let s = Spend::default();
        s.add("bob", "2026-12-01", usd_p(1.0));
        let now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
        let Verdict::Exceeded {
            period,
            resets_at,
            action,
            ..
        } = budgets().check("bob", Priority::P3, &s, now)
        else {
            panic!("over the default daily limit");
        };
        assert_eq!(period, Period::Daily);
        assert_eq!(action, OnExceeded::Reject);
        assert_eq!(
            resets_at,
            Utc.with_ymd_and_hms(2026, 12, 2, 0, 0, 0).unwrap()
        );
        let tomorrow = Utc.with_ymd_and_hms(2026, 12, 2, 0, 0, 1).unwrap();
        assert_eq!(
            budgets().check("bob", Priority::P3, &s, tomorrow),
            Verdict::Within
        );
    }

    #[test]
    fn the_monthly_limit_counts_every_day_of_the_month() {
        let s = Spend::default();
        s.add("acme", "2026-11-30", usd_p(50.0));
        s.add("acme", "2026-12-01", usd_p(6.0));
        s.add("acme", "2026-12-02", usd_p(6.0));
        let now = Utc.with_ymd_and_hms(2026, 12, 2, 12, 0, 0).unwrap();
        let v = budgets().check("acme", Priority::P1, &s, now);
        assert!(
            matches!(
                v,
                Verdict::Exceeded {
                    period: Period::Monthly,
                    action: OnExceeded::Hold,
                    ..
                }
            ),
            "{v:?}"
        );
        let ratios = budgets().used_ratios("acme", &s, now);
        assert_eq!(ratios.len(), 2);
        assert!((ratios[0].1 - 0.6).abs() < 1e-9 && (ratios[1].1 - 1.0).abs() < 1e-9);
    }

    #[test]
    fn no_limits_means_no_check() {
        assert!(Budgets::default().is_unlimited());
        assert!(!budgets().is_unlimited());
    }
}
