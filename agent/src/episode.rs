//! Episodes: a burst of events is one episode.
//!
//! A 64 GiB hot-add is 512 memory blocks, each with its own uevents and probe records. The
//! agent must act once for all of them: an episode begins with its first event, settles
//! when no event has arrived for the settle window, and never waits longer than the bound.
//! Events that arrive while an episode is being handled are counted and start the next
//! one; none are dropped.
use std::time::Duration;

use tokio::{sync::watch, time::Instant};

/// The event activity the pump publishes: how many events so far, and when the last came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    pub count: u64,
    pub last: Instant,
}

/// The publishing side, held by whoever reads the event stream.
#[derive(Debug)]
pub struct Tracker {
    tx: watch::Sender<Activity>,
}

impl Tracker {
    pub fn new() -> (Self, Episodes) {
        let (tx, rx) = watch::channel(Activity {
            count: 0,
            last: Instant::now(),
        });
        (
            Self { tx },
            Episodes {
                rx,
                consumed: 0,
                settle: DEFAULT_SETTLE,
                max_wait: DEFAULT_MAX_WAIT,
            },
        )
    }

    /// One more event, now.
    pub fn event(&self) {
        self.tx.send_modify(|a| {
            a.count += 1;
            a.last = Instant::now();
        });
    }
}

pub const DEFAULT_SETTLE: Duration = Duration::from_millis(300);
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);

/// One settled burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Episode {
    /// How many events it folds.
    pub events: u64,
    pub first: Instant,
    pub settled: Instant,
    /// Settled by the bound while events were still arriving.
    pub bounded: bool,
}

#[derive(Debug)]
pub struct Episodes {
    rx: watch::Receiver<Activity>,
    consumed: u64,
    settle: Duration,
    max_wait: Duration,
}

impl Episodes {
    pub fn with_timing(mut self, settle: Duration, max_wait: Duration) -> Self {
        self.settle = settle;
        self.max_wait = max_wait.max(settle);
        self
    }

    /// Events seen but not yet part of a returned episode.
    pub fn pending(&self) -> u64 {
        self.rx.borrow().count - self.consumed
    }

    /// Waits for the next episode to begin and settle; `None` once the tracker is gone
    /// and everything it published has been returned.
    pub async fn next(&mut self) -> Option<Episode> {
        while self.pending() == 0 {
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
        let first = Instant::now();
        let bound = first + self.max_wait;
        let bounded = loop {
            let quiet_at = self.rx.borrow_and_update().last.max(first) + self.settle;
            let wake = quiet_at.min(bound);
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        // The stream ended: nothing more can join this episode.
                        break false;
                    }
                }
                () = tokio::time::sleep_until(wake) => break quiet_at > bound,
            }
        };
        let count = self.rx.borrow().count;
        let events = count - self.consumed;
        self.consumed = count;
        Some(Episode {
            events,
            first,
            settled: Instant::now(),
            bounded,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SETTLE: Duration = Duration::from_millis(300);
    const MAX: Duration = Duration::from_secs(5);

    async fn advance(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_settles_once_after_the_quiet_window() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with_timing(SETTLE, MAX);
        let task = tokio::spawn(async move { episodes.next().await });
        // 512 blocks, 1 ms apart: one episode.
        for _ in 0..512 {
            tracker.event();
            advance(1).await;
        }
        let start = Instant::now();
        let ep = task.await.unwrap().unwrap();
        assert_eq!(ep.events, 512);
        assert!(!ep.bounded);
        // It settled one window after the last event (at 511 ms), not before.
        assert_eq!(
            ep.settled - start,
            SETTLE - Duration::from_millis(1),
            "{ep:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_never_ending_stream_is_cut_at_the_bound() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with_timing(SETTLE, MAX);
        let task = tokio::spawn(async move {
            let ep = episodes.next().await.unwrap();
            (ep, episodes)
        });
        // An event every 100 ms for 8 s: never quiet for 300 ms.
        let mut sent = 0u64;
        while !task.is_finished() && sent < 80 {
            tracker.event();
            sent += 1;
            advance(100).await;
        }
        let (ep, mut episodes) = task.await.unwrap();
        assert!(ep.bounded, "{ep:?}");
        let took = ep.settled - ep.first;
        assert!(
            took >= MAX && took < MAX + Duration::from_millis(150),
            "{took:?}"
        );
        // What came after the cut is the next episode: nothing is dropped.
        for _ in 0..3 {
            tracker.event();
        }
        let next = episodes.next().await.unwrap();
        assert_eq!(ep.events + next.events, sent + 3);
    }

    #[tokio::test(start_paused = true)]
    async fn events_during_handling_start_the_next_episode() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with_timing(SETTLE, MAX);
        tracker.event();
        let first = episodes.next().await.unwrap();
        assert_eq!(first.events, 1);
        // While the first is being handled (say a kubelet restart), two more arrive.
        tracker.event();
        advance(50).await;
        tracker.event();
        assert_eq!(episodes.pending(), 2);
        let second = episodes.next().await.unwrap();
        assert_eq!(second.events, 2);
        assert_eq!(episodes.pending(), 0);
        // Nothing pending and the tracker gone: no more episodes.
        drop(tracker);
        assert_eq!(episodes.next().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn quiet_means_no_episode() {
        let (_tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with_timing(SETTLE, MAX);
        let r = tokio::time::timeout(Duration::from_secs(3600), episodes.next()).await;
        assert!(r.is_err(), "no event, no episode");
    }
}
