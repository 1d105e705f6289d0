//! Guard rails: whether a refresh may start now.
//!
//! Three limits, so that nothing (a flapping block, a refresh that never converges, a bug
//! upstream of us) can turn into a kubelet restart storm:
//! - a minimum interval between two starts, small by default so that two real hot-adds a
//!   few seconds apart are both picked up within seconds;
//! - a cap per sliding hour;
//! - exponential back-off after a refresh that did not converge (base, 2x, 4x ... up to a
//!   maximum), reset by one that did.
//!
//! Pure: time is passed in, so the rules are tested with explicit instants. The caller
//! keeps one refresh in flight at a time; this type only counts.
use std::{collections::VecDeque, time::Duration};

use tokio::time::Instant;

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Clone, Debug)]
pub struct GuardConfig {
    pub min_interval: Duration,
    pub max_per_hour: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(2),
            max_per_hour: 12,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(600),
        }
    }
}

/// A refresh may not start before `until`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deferred {
    pub until: Instant,
    /// `"min_interval"`, `"hourly_cap"` or `"backoff"`.
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Guard {
    cfg: GuardConfig,
    /// Starts within the last hour, oldest first (pruned in [`Guard::started`]).
    starts: VecDeque<Instant>,
    /// Refreshes in a row that did not converge.
    failures: u32,
    backoff_until: Option<Instant>,
}

impl Guard {
    pub fn new(cfg: GuardConfig) -> Self {
        Self {
            cfg,
            starts: VecDeque::new(),
            failures: 0,
            backoff_until: None,
        }
    }

    /// `Ok` if a refresh may start at `now`; otherwise the latest of the limits that apply,
    /// so that waiting until `until` is enough.
    pub fn check(&self, now: Instant) -> Result<(), Deferred> {
        let mut deferred: Option<Deferred> = None;
        let mut defer = |until: Instant, reason| {
            if now < until && deferred.is_none_or(|d| until > d.until) {
                deferred = Some(Deferred { until, reason });
            }
        };
        if let Some(until) = self.backoff_until {
            defer(until, "backoff");
        }
        if let Some(last) = self.starts.back() {
            defer(*last + self.cfg.min_interval, "min_interval");
        }
        let in_window: Vec<Instant> = self
            .starts
            .iter()
            .copied()
            .filter(|s| now.saturating_duration_since(*s) < HOUR)
            .collect();
        let cap = self.cfg.max_per_hour as usize;
        if in_window.len() >= cap {
            // Allowed again once enough of the window's starts have aged out to leave room for
            // one more; a cap of 0 means never within the coming hour.
            let until = if cap == 0 {
                now + HOUR
            } else {
                in_window[in_window.len() - cap] + HOUR
            };
            defer(until, "hourly_cap");
        }
        deferred.map_or(Ok(()), Err)
    }

    /// A refresh began at `now`: it counts toward the hourly cap and the minimum interval.
    pub fn started(&mut self, now: Instant) {
        while self
            .starts
            .front()
            .is_some_and(|s| now.saturating_duration_since(*s) >= HOUR)
        {
            self.starts.pop_front();
        }
        self.starts.push_back(now);
    }

    /// A refresh ended: converged resets the back-off; not converged doubles it.
    pub fn finished(&mut self, now: Instant, converged: bool) {
        if converged {
            self.failures = 0;
            self.backoff_until = None;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.backoff_until = self.backoff().map(|b| now + b);
        }
    }

    /// The current back-off, `None` after a success (or before any refresh).
    pub fn backoff(&self) -> Option<Duration> {
        let doublings = self.failures.checked_sub(1)?;
        let factor = 2u32.checked_pow(doublings).unwrap_or(u32::MAX);
        Some(
            self.cfg
                .backoff_base
                .saturating_mul(factor)
                .min(self.cfg.backoff_max),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn defaults_let_two_hot_adds_seconds_apart_both_refresh() {
        let mut guard = Guard::new(GuardConfig::default());
        let t0 = Instant::now();
        assert_eq!(guard.check(t0), Ok(()));
        guard.started(t0);
        guard.finished(t0 + secs(1), true);
        assert_eq!(
            guard.check(t0 + secs(3)),
            Ok(()),
            "a second episode 3 s later proceeds"
        );
    }

    #[test]
    fn min_interval_defers_until_it_has_passed() {
        let mut guard = Guard::new(GuardConfig::default());
        let t0 = Instant::now();
        guard.started(t0);
        let deferred = guard
            .check(t0 + Duration::from_millis(500))
            .expect_err("too soon");
        assert_eq!(
            deferred,
            Deferred {
                until: t0 + secs(2),
                reason: "min_interval"
            }
        );
        assert_eq!(guard.check(t0 + secs(2)), Ok(()));
    }

    #[test]
    fn hourly_cap_slides_the_13th_waits_for_the_oldest_to_age_out() {
        let mut guard = Guard::new(GuardConfig::default());
        let t0 = Instant::now();
        for i in 0..12 {
            let now = t0 + secs(60) * i;
            assert_eq!(guard.check(now), Ok(()), "start {i}");
            guard.started(now);
            guard.finished(now, true);
        }
        let now = t0 + secs(12 * 60);
        let deferred = guard.check(now).expect_err("13th within the hour");
        assert_eq!(
            deferred,
            Deferred {
                until: t0 + HOUR,
                reason: "hourly_cap"
            }
        );
        assert_eq!(guard.check(t0 + HOUR), Ok(()), "the oldest has aged out");
        guard.started(t0 + HOUR);
        // The next one waits for the second-oldest, one minute later.
        let deferred = guard.check(t0 + HOUR + secs(10)).expect_err("cap again");
        assert_eq!(
            deferred,
            Deferred {
                until: t0 + HOUR + secs(60),
                reason: "hourly_cap"
            }
        );
    }

    #[test]
    fn backoff_doubles_caps_and_resets_on_success() {
        let mut guard = Guard::new(GuardConfig::default());
        let mut now = Instant::now();
        assert_eq!(guard.backoff(), None);
        let mut seen = Vec::new();
        for _ in 0..8 {
            guard.started(now);
            guard.finished(now, false);
            let backoff = guard.backoff().expect("after a failure");
            seen.push(backoff.as_secs());
            let deferred = guard.check(now + secs(5)).expect_err("backing off");
            assert_eq!(
                deferred,
                Deferred {
                    until: now + backoff,
                    reason: "backoff"
                }
            );
            now += backoff;
            assert_eq!(guard.check(now), Ok(()));
        }
        assert_eq!(seen, [10, 20, 40, 80, 160, 320, 600, 600]);
        guard.started(now);
        guard.finished(now, true);
        assert_eq!(guard.backoff(), None);
        assert_eq!(guard.check(now + secs(2)), Ok(()));
    }

    #[test]
    fn the_latest_limit_wins() {
        let mut guard = Guard::new(GuardConfig {
            min_interval: secs(30),
            ..GuardConfig::default()
        });
        let t0 = Instant::now();
        guard.started(t0);
        guard.finished(t0, false); // back-off 10 s, min interval 30 s
        assert_eq!(
            guard.check(t0 + secs(1)).unwrap_err().reason,
            "min_interval"
        );
    }

    #[test]
    fn a_storm_of_checks_allows_at_most_the_cap() {
        // Every call that is allowed starts a refresh: with no minimum interval only the
        // hourly cap holds the storm back.
        let mut guard = Guard::new(GuardConfig {
            min_interval: Duration::ZERO,
            ..GuardConfig::default()
        });
        let t0 = Instant::now();
        let mut allowed = 0;
        for i in 0..1000 {
            let now = t0 + Duration::from_millis(i);
            if guard.check(now).is_ok() {
                guard.started(now);
                guard.finished(now, true);
                allowed += 1;
            }
        }
        assert_eq!(allowed, 12);

        // With the defaults, a burst at one instant starts exactly one.
        let mut guard = Guard::new(GuardConfig::default());
        let allowed = (0..1000)
            .filter(|_| {
                let ok = guard.check(t0).is_ok();
                if ok {
                    guard.started(t0);
                }
                ok
            })
            .count();
        assert_eq!(allowed, 1);
    }

    #[test]
    fn a_cap_of_zero_never_allows() {
        let guard = Guard::new(GuardConfig {
            max_per_hour: 0,
            ..GuardConfig::default()
        });
        let t0 = Instant::now();
        assert_eq!(
            guard.check(t0),
            Err(Deferred {
                until: t0 + HOUR,
                reason: "hourly_cap"
            })
        );
    }
}
