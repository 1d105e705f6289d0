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
//! The rules are pure: time is passed in, so they are tested with explicit instants. The
//! caller keeps one refresh in flight at a time; this type only counts.
//!
//! With [`GuardConfig::state_file`] the history (starts within the hour, failures in a row,
//! the back-off deadline) survives a restart of the agent: it is read at start-up and written
//! after every start and end of a refresh, so an agent that crashes and is restarted in a
//! loop still cannot restart the kubelet more often than these limits allow. Wall-clock
//! times on disk, monotonic instants in memory. A missing file is a first start; an
//! unreadable or malformed one is reported (once, on stderr) and ignored, never fatal.
use std::{
    collections::VecDeque,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

const HOUR: Duration = Duration::from_secs(3600);

/// The state file's name in `--state-dir`.
pub const STATE_FILE: &str = "guard.json";
/// A state file is a few hundred bytes; anything much larger is not one.
const MAX_STATE_BYTES: u64 = 64 << 10;

#[derive(Clone, Debug)]
pub struct GuardConfig {
    pub min_interval: Duration,
    pub max_per_hour: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Where the history is kept across restarts; `None`: in memory only.
    pub state_file: Option<PathBuf>,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(2),
            max_per_hour: 12,
            backoff_base: Duration::from_secs(10),
            backoff_max: Duration::from_secs(600),
            state_file: None,
        }
    }
}

/// The history as written to the state file: wall-clock times, milliseconds since the epoch.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuardState {
    /// Format version: 1.
    pub v: u32,
    /// Refresh starts within the last hour, oldest first.
    pub starts_unix_ms: Vec<u64>,
    /// Refreshes in a row that did not converge.
    pub failures: u32,
    pub backoff_until_unix_ms: Option<u64>,
}

const STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a regular file of at most {MAX_STATE_BYTES} bytes", path.display())]
    NotAStateFile { path: PathBuf },
    #[error("{} is not a guard-rail state file", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("{} has format version {found}, this agent writes {STATE_VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Reads a state file; `Ok(None)` when there is none yet.
pub fn read_state(path: &Path) -> Result<Option<GuardState>, StateError> {
    let read = |source| StateError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read(e)),
    };
    if !meta.is_file() || meta.len() > MAX_STATE_BYTES {
        return Err(StateError::NotAStateFile {
            path: path.to_owned(),
        });
    }
    let bytes = std::fs::read(path).map_err(read)?;
    let state: GuardState =
        serde_json::from_slice(&bytes).map_err(|source| StateError::Malformed {
            path: path.to_owned(),
            source,
        })?;
    if state.v != STATE_VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: state.v,
        });
    }
    Ok(Some(state))
}

/// Writes a state file atomically: a temporary file in the same directory, flushed to
/// disk, renamed over the old one. A crash leaves the old file or the new one, never half.
pub fn write_state(path: &Path, state: &GuardState) -> Result<(), StateError> {
    use std::io::Write as _;
    let write = |source| StateError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let bytes = serde_json::to_vec(state).map_err(|e| write(std::io::Error::other(e)))?;
    let mut f = std::fs::File::create(&tmp).map_err(write)?;
    f.write_all(&bytes).map_err(write)?;
    f.sync_all().map_err(write)?;
    std::fs::rename(&tmp, path).map_err(write)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The instant that corresponds to the wall-clock time `ms`, given that `now` is `wall`.
fn instant_of(ms: u64, now: Instant, wall: SystemTime) -> Instant {
    let wall_ms = unix_ms(wall);
    if ms <= wall_ms {
        now.checked_sub(Duration::from_millis(wall_ms - ms))
            .unwrap_or(now)
    } else {
        now + Duration::from_millis(ms - wall_ms)
    }
}

fn ms_of(t: Instant, now: Instant, wall: SystemTime) -> u64 {
    let wall_ms = unix_ms(wall);
    if t <= now {
        wall_ms.saturating_sub(u64::try_from(now.duration_since(t).as_millis()).unwrap_or(u64::MAX))
    } else {
        wall_ms.saturating_add(u64::try_from(t.duration_since(now).as_millis()).unwrap_or(u64::MAX))
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
    /// Writing the state file failed and that was said; said again only after a success.
    save_failing: bool,
    /// The wall clock the state file is written in.
    wall: fn() -> SystemTime,
}

impl Guard {
    /// A guard with the history of [`GuardConfig::state_file`], if there is one.
    pub fn new(cfg: GuardConfig) -> Self {
        Self::with_wall_clock(cfg, SystemTime::now)
    }

    /// [`Guard::new`] with another wall clock: tests with paused monotonic time pass one
    /// that moves with it, as the real one does with real time.
    pub fn with_wall_clock(cfg: GuardConfig, wall: fn() -> SystemTime) -> Self {
        let state = match cfg.state_file.as_deref().map(read_state) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(state))) => Some(state),
            Some(Err(e)) => {
                tracing::warn!(
                    "refresh guard rails start without their history: {}",
                    crate::sources::error_chain(&e)
                );
                None
            }
        };
        let mut guard = Self {
            cfg,
            starts: VecDeque::new(),
            failures: 0,
            backoff_until: None,
            save_failing: false,
            wall,
        };
        if let Some(state) = state {
            guard.restore(&state, Instant::now(), wall());
        }
        guard
    }

    /// Takes over a saved history; `now` is `wall` on the wall clock.
    pub fn restore(&mut self, state: &GuardState, now: Instant, wall: SystemTime) {
        self.starts = state
            .starts_unix_ms
            .iter()
            .map(|&ms| instant_of(ms, now, wall))
            .filter(|&t| now.saturating_duration_since(t) < HOUR)
            .collect();
        self.starts.make_contiguous().sort();
        self.failures = state.failures;
        self.backoff_until = state
            .backoff_until_unix_ms
            .map(|ms| instant_of(ms, now, wall))
            // A deadline past what any back-off could be (a clock set back): cap it.
            .map(|t| t.min(now + self.cfg.backoff_max));
    }

    /// The history to save; `now` is `wall` on the wall clock.
    pub fn state(&self, now: Instant, wall: SystemTime) -> GuardState {
        GuardState {
            v: STATE_VERSION,
            starts_unix_ms: self
                .starts
                .iter()
                .filter(|&&t| now.saturating_duration_since(t) < HOUR)
                .map(|&t| ms_of(t, now, wall))
                .collect(),
            failures: self.failures,
            backoff_until_unix_ms: self.backoff_until.map(|t| ms_of(t, now, wall)),
        }
    }

    fn save(&mut self) {
        let Some(path) = self.cfg.state_file.clone() else {
            return;
        };
        let state = self.state(Instant::now(), (self.wall)());
        match write_state(&path, &state) {
            Ok(()) => self.save_failing = false,
            Err(e) if !self.save_failing => {
                self.save_failing = true;
                tracing::warn!(
                    "the refresh guard rails' history is not kept across restarts: {}",
                    crate::sources::error_chain(&e)
                );
            }
            Err(_) => {}
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
        self.save();
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
        self.save();
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

    fn persisted(dir: &Path) -> GuardConfig {
        GuardConfig {
            state_file: Some(dir.join(STATE_FILE)),
            ..GuardConfig::default()
        }
    }

    thread_local! {
        static ANCHOR: std::cell::Cell<Option<Instant>> = const { std::cell::Cell::new(None) };
    }

    /// A wall clock that moves with tokio's (paused) clock, from a fixed date: what the real
    /// wall clock does across real restarts. Per test thread.
    fn paused_wall() -> SystemTime {
        let now = Instant::now();
        let anchor = ANCHOR.with(|a| {
            let anchor = a.get().unwrap_or(now);
            a.set(Some(anchor));
            anchor
        });
        UNIX_EPOCH + secs(1_800_000_000) + now.duration_since(anchor)
    }

    fn restarted(dir: &Path) -> Guard {
        Guard::with_wall_clock(persisted(dir), paused_wall)
    }

    #[test]
    fn the_history_maps_between_instants_and_wall_clock_exactly() {
        let mut guard = Guard::new(GuardConfig::default());
        let t0 = Instant::now();
        let wall0 = UNIX_EPOCH + secs(1_800_000_000);
        for i in 0..3 {
            guard.started(t0 + secs(100) * i);
        }
        guard.finished(t0 + secs(200), false);
        guard.finished(t0 + secs(200), false); // back-off 20 s
        let now = t0 + secs(205);
        let wall = wall0 + secs(205);
        let state = guard.state(now, wall);
        let base = 1_800_000_000_000;
        assert_eq!(
            state,
            GuardState {
                v: 1,
                starts_unix_ms: vec![base, base + 100_000, base + 200_000],
                failures: 2,
                backoff_until_unix_ms: Some(base + 220_000),
            }
        );
        // Restored by another process whose monotonic clock reads something else entirely.
        let mut other = Guard::new(GuardConfig::default());
        let later = Instant::now() + secs(5000);
        other.restore(&state, later, wall + secs(10));
        assert_eq!(other.state(later, wall + secs(10)), state);
        // 10 s after the save the back-off (until 220 s) still has 5 s to run.
        assert_eq!(
            other.check(later),
            Err(Deferred {
                until: later + secs(5),
                reason: "backoff"
            })
        );
        // 3,650 s after the first start, that one is out of the hour and forgotten.
        let mut aged = Guard::new(GuardConfig::default());
        let wall = wall0 + secs(3650);
        aged.restore(&state, later, wall);
        assert_eq!(
            aged.state(later, wall).starts_unix_ms,
            [base + 100_000, base + 200_000]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_crash_loop_cannot_restart_the_kubelet_past_the_hourly_cap() {
        let dir = tempfile::tempdir().unwrap();
        // Each agent process starts, finds the Node stale, starts a refresh and crashes
        // before it ends; systemd restarts it 5 s later (RestartSec). 40 restarts.
        let mut allowed = 0;
        for _ in 0..40 {
            let mut guard = restarted(dir.path());
            if guard.check(Instant::now()).is_ok() {
                guard.started(Instant::now());
                allowed += 1;
            }
            drop(guard);
            tokio::time::advance(secs(5)).await;
        }
        assert_eq!(allowed, 12, "the hourly cap holds across restarts");
        // Control: without the state file every restart would have restarted the kubelet.
        let mut forgetful = 0;
        for _ in 0..40 {
            let mut guard = Guard::new(GuardConfig::default());
            if guard.check(Instant::now()).is_ok() {
                guard.started(Instant::now());
                forgetful += 1;
            }
        }
        assert_eq!(forgetful, 40);
    }

    #[tokio::test(start_paused = true)]
    async fn back_off_and_min_interval_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut guard = restarted(dir.path());
        let t0 = Instant::now();
        for _ in 0..3 {
            guard.started(Instant::now());
            guard.finished(Instant::now(), false);
        }
        assert_eq!(guard.backoff(), Some(secs(40)));
        drop(guard);
        tokio::time::advance(secs(15)).await;
        let again = restarted(dir.path());
        let deferred = again.check(Instant::now()).expect_err("still backing off");
        assert_eq!(deferred.reason, "backoff");
        // 40 s after the last failure (milliseconds on disk: exact here).
        assert_eq!(deferred.until, t0 + secs(40));
        assert_eq!(again.backoff(), Some(secs(40)), "failures in a row kept");
        // The file is whole and no temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [STATE_FILE]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_malformed_or_unreadable_state_file_is_ignored_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        for bad in [
            &b"{not json"[..],
            b"{\"v\":7,\"starts_unix_ms\":[],\"failures\":0}",
            b"",
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = read_state(&path).unwrap_err();
            assert!(
                matches!(e, StateError::Malformed { .. } | StateError::Version { .. }),
                "{e:?}"
            );
            let mut guard = restarted(dir.path());
            assert_eq!(guard.check(Instant::now()), Ok(()), "a fresh history");
            guard.started(Instant::now());
            let state = read_state(&path).unwrap().expect("rewritten");
            assert_eq!(state.starts_unix_ms.len(), 1);
        }
        // Not a file at all: refused without reading it, and saving fails without panicking.
        std::fs::remove_file(&path).unwrap();
        std::fs::create_dir(&path).unwrap();
        assert!(matches!(
            read_state(&path),
            Err(StateError::NotAStateFile { .. })
        ));
        let mut guard = restarted(dir.path());
        guard.started(Instant::now());
        guard.finished(Instant::now(), true);
        assert!(guard.save_failing);
        // A missing file is a first start, not an error.
        assert!(matches!(read_state(&dir.path().join("absent")), Ok(None)));
    }
}
