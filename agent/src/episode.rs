//! Episodes: a burst of events is one episode.
//!
//! A 64 GiB hot-add is 512 memory blocks, each with its own uevents and probe records. The
//! agent must act once for all of them: an episode begins with its first event and settles
//! when the burst is over, never waiting longer than a bound. Events that arrive while an
//! episode is being handled are counted and start the next one; none are dropped.
//!
//! "Over" means two things:
//! - **quiet**: no event for the settle window (300 ms by default), and
//! - **nothing in flight**: every memory block that arrived (`add`) is online. The kernel
//!   (or the agent's auto-online, or a udev rule) onlines a 512-block DIMM one block at a
//!   time, which takes seconds under a slow hypervisor; reconciling half-way restarts the
//!   kubelet on a MemTotal that is still growing (the incident's second restart).
//!
//! Blocks in flight lift the bound from `max_wait` (5 s) to `in_flight_max_wait` (60 s).
//! A block that nobody onlines (the kernel leaves new memory offline, no auto-online, no
//! udev rule) would hold the episode forever, so when nothing at all has happened for the
//! stall window (2 s) the blocks still offline are taken as left offline by policy: the
//! episode settles, says so, and no later episode waits for them.
//!
//! The tracker also keeps a [`Window`]: the range of machine capacities the event records
//! showed while the controller had one open. The controller opens it before restarting the
//! kubelet; verify then accepts whatever the kubelet could have read during the restart, not
//! only the machine as it is by the time the Node is posted.
use crate::record::AgentAction;
use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use tokio::{sync::watch, time::Instant};

use crate::{
    capacity::Summary,
    record::{Action, Kind, Record},
};

/// The event activity the pump publishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Activity {
    /// Events so far.
    pub count: u64,
    /// When the last event came.
    pub last: Instant,
    /// Memory blocks that arrived and are not online yet.
    pub in_flight: u64,
    /// Memory block arrivals (`add`) so far.
    pub added: u64,
}

/// What both halves share: the blocks in flight and the capacity window. The activity
/// channel's sender is the tracker's alone, so that dropping the tracker ends the stream.
#[derive(Debug, Default)]
struct Shared {
    flight: Mutex<BTreeSet<String>>,
    /// Memory blocks the kernel started offlining (the `offline_pages` probe) whose
    /// `offline` has not come yet: an unplug under way, waited for like an arrival.
    going: Mutex<Going>,
    window: Mutex<Option<Seen>>,
}

/// Blocks being offlined. The probe's record (ring buffer) and the block's `offline`
/// uevent (netlink) come through different channels, so a fast offline's end can be read
/// before its start: an end remembers the block until it is online again.
#[derive(Debug, Default)]
struct Going {
    blocks: BTreeSet<String>,
    ended: BTreeSet<String>,
}

impl Going {
    fn start(&mut self, block: &str) {
        if !self.ended.remove(block) {
            self.blocks.insert(block.to_owned());
        }
    }

    fn end(&mut self, block: &str, online: bool) {
        self.blocks.remove(block);
        if online {
            self.ended.remove(block);
        } else {
            self.ended.insert(block.to_owned());
        }
    }
}

/// The publishing side, held by whoever reads the event stream.
#[derive(Debug)]
pub struct Tracker {
    tx: watch::Sender<Activity>,
    shared: Arc<Shared>,
    offlining: watch::Sender<crate::offlining::Started>,
}

impl Tracker {
    fn publish_flight(&self, flight: &BTreeSet<String>, event: bool, added: bool) {
        let n = flight.len() as u64;
        self.tx.send_modify(|a| {
            if event {
                a.count += 1;
                a.last = Instant::now();
            }
            if added {
                a.added += 1;
            }
            a.in_flight = n;
        });
    }

    pub fn new() -> (Self, Episodes) {
        let (tx, rx) = watch::channel(Activity {
            count: 0,
            last: Instant::now(),
            in_flight: 0,
            added: 0,
        });
        let shared = Arc::new(Shared::default());
        let (offlining, offlining_rx) = watch::channel(crate::offlining::Started::default());
        (
            Self {
                tx,
                shared: shared.clone(),
                offlining,
            },
            Episodes {
                rx,
                shared,
                offlining: offlining_rx,
                consumed: 0,
                consumed_added: 0,
                timing: Timing::default(),
            },
        )
    }

    /// One more event, now, that says nothing about blocks or capacity.
    pub fn event(&self) {
        self.tx.send_modify(|a| {
            a.count += 1;
            a.last = Instant::now();
        });
    }

    /// Every record of the log passes through here: events count, memory block arrivals and
    /// onlines move the in-flight set, a failed auto-online takes its block out of it, and
    /// each event's capacity widens an open window.
    pub fn observe(&self, record: &Record) {
        match record {
            Record::Event(e) => {
                if let Some(by_kernel) = crate::offlining::started_by(e) {
                    if let Some(device) = &e.device {
                        lock(&self.shared.going).start(device);
                    }
                    self.offlining.send_modify(|s| {
                        s.seq += 1;
                        s.by_kernel = by_kernel;
                    });
                }
                if e.kind == Kind::MemoryBlock
                    && let Some(device) = &e.device
                {
                    // Offlined, removed, or (back) online: not going any more.
                    match e.action {
                        Action::Offline | Action::Remove => {
                            lock(&self.shared.going).end(device, false);
                        }
                        Action::Online | Action::Add => lock(&self.shared.going).end(device, true),
                        Action::Change | Action::Resize => {}
                    }
                }
                if let Some(seen) = lock(&self.shared.window).as_mut() {
                    seen.widen(e.capacity);
                }
                let mut flight = lock(&self.shared.flight);
                let mut added = false;
                if e.kind == Kind::MemoryBlock
                    && let Some(device) = &e.device
                {
                    match e.action {
                        Action::Add => added = flight.insert(device.clone()),
                        Action::Online | Action::Offline | Action::Remove => {
                            flight.remove(device);
                        }
                        Action::Change | Action::Resize => {}
                    }
                }
                self.publish_flight(&flight, true, added);
            }
            Record::Agent(a) if a.action == AgentAction::AutoOnline && a.error.is_some() => {
                // The write failed: nobody is bringing this block online any more.
                if let Some(device) = &a.device {
                    let mut flight = lock(&self.shared.flight);
                    if flight.remove(device) {
                        self.publish_flight(&flight, false, false);
                    }
                }
            }
            Record::Agent(_) | Record::Decision(_) => {}
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The data stays consistent across a panic elsewhere (plain inserts and removes).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub const DEFAULT_SETTLE: Duration = Duration::from_millis(300);
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(5);
pub const DEFAULT_IN_FLIGHT_MAX_WAIT: Duration = Duration::from_secs(60);
pub const DEFAULT_IN_FLIGHT_STALL: Duration = Duration::from_secs(2);

/// When an episode settles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Quiet this long, nothing in flight: settled.
    pub settle: Duration,
    /// The bound while nothing is in flight.
    pub max_wait: Duration,
    /// The bound once blocks were in flight in the episode.
    pub in_flight_max_wait: Duration,
    /// Quiet this long with blocks still in flight: they were left offline.
    pub in_flight_stall: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            settle: DEFAULT_SETTLE,
            max_wait: DEFAULT_MAX_WAIT,
            in_flight_max_wait: DEFAULT_IN_FLIGHT_MAX_WAIT,
            in_flight_stall: DEFAULT_IN_FLIGHT_STALL,
        }
    }
}

/// Why an episode settled when it did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    /// Quiet, nothing in flight.
    Quiet,
    /// Cut by the bound while events were still arriving or blocks were in flight.
    MaxWait,
    /// Quiet for the stall window with blocks still offline: left offline by policy.
    InFlightStalled,
}

impl Settled {
    /// The record's `reason`; `None` for the ordinary case (as before this existed).
    pub fn reason(self) -> Option<&'static str> {
        match self {
            Self::Quiet => None,
            Self::MaxWait => Some("max_wait"),
            Self::InFlightStalled => Some("in_flight_stalled"),
        }
    }
}

/// One settled burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Episode {
    /// How many events it folds.
    pub events: u64,
    pub first: Instant,
    pub settled: Instant,
    /// Settled by the bound while events were still arriving.
    pub bounded: bool,
    pub why: Settled,
    /// Memory blocks that arrived during the episode.
    pub blocks_added: u64,
    /// Blocks still not online when it settled (left offline, or cut by the bound).
    pub blocks_pending: u64,
    /// Whether blocks were in flight at any point: the episode waited for them.
    pub waited_in_flight: bool,
}

#[derive(Debug)]
pub struct Episodes {
    rx: watch::Receiver<Activity>,
    shared: Arc<Shared>,
    offlining: watch::Receiver<crate::offlining::Started>,
    consumed: u64,
    consumed_added: u64,
    timing: Timing,
}

impl Episodes {
    /// The settle window and the bound while nothing is in flight; the in-flight limits keep
    /// their defaults.
    pub fn with_timing(self, settle: Duration, max_wait: Duration) -> Self {
        self.with(Timing {
            settle,
            max_wait,
            ..Timing::default()
        })
    }

    /// All four limits, made consistent: no bound below the window it bounds.
    pub fn with(mut self, timing: Timing) -> Self {
        let max_wait = timing.max_wait.max(timing.settle);
        let in_flight_stall = timing.in_flight_stall.max(timing.settle);
        self.timing = Timing {
            settle: timing.settle,
            max_wait,
            in_flight_max_wait: timing.in_flight_max_wait.max(max_wait),
            in_flight_stall,
        };
        self
    }

    /// Events seen but not yet part of a returned episode.
    pub fn pending(&self) -> u64 {
        self.rx.borrow().count - self.consumed
    }

    fn in_flight(&self) -> u64 {
        lock(&self.shared.flight).len() as u64
    }

    fn going(&self) -> u64 {
        lock(&self.shared.going).blocks.len() as u64
    }

    /// The kernel's offline starts, from now on.
    pub fn offlining(&self) -> crate::offlining::Starts {
        let mut rx = self.offlining.clone();
        rx.mark_unchanged();
        crate::offlining::Starts(rx)
    }

    /// The capacity window the controller opens around a refresh.
    pub fn window(&self) -> Window {
        Window {
            shared: self.shared.clone(),
        }
    }

    /// Waits for the next episode to begin and settle; `None` once the tracker is gone
    /// and everything it published has been returned.
    pub async fn next(&mut self) -> Option<Episode> {
        while self.pending() == 0 {
            if self.rx.changed().await.is_err() {
                return None;
            }
        }
        let t = self.timing;
        let first = Instant::now();
        let mut waited_in_flight = false;
        let mut waited_any = false;
        let why = loop {
            let activity = *self.rx.borrow_and_update();
            let last = activity.last.max(first);
            // The set, not the published count: blocks given up on below are gone from it
            // at once, before the tracker publishes again.
            let arriving = self.in_flight() > 0;
            waited_in_flight |= arriving;
            // Blocks still being offlined hold the episode the same way: a restart half-way
            // through an unplug would read a MemTotal that is still shrinking.
            let in_flight = arriving || self.going() > 0;
            waited_any |= in_flight;
            let bound = first
                + if waited_any {
                    t.in_flight_max_wait
                } else {
                    t.max_wait
                };
            let (calm_at, calm) = if in_flight {
                (last + t.in_flight_stall, Settled::InFlightStalled)
            } else {
                (last + t.settle, Settled::Quiet)
            };
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        // The stream ended: nothing more can join this episode.
                        break Settled::Quiet;
                    }
                }
                () = tokio::time::sleep_until(calm_at.min(bound)) => {
                    break if calm_at <= bound { calm } else { Settled::MaxWait };
                }
            }
        };
        let activity = *self.rx.borrow();
        let blocks_pending = self.in_flight();
        if why == Settled::InFlightStalled {
            // Nobody is onlining them (or the offline is stuck): later episodes must not
            // wait for them again.
            lock(&self.shared.flight).clear();
            lock(&self.shared.going).blocks.clear();
        }
        let events = activity.count - self.consumed;
        self.consumed = activity.count;
        let blocks_added = activity.added - self.consumed_added;
        self.consumed_added = activity.added;
        Some(Episode {
            events,
            first,
            settled: Instant::now(),
            bounded: why == Settled::MaxWait,
            why,
            blocks_added,
            blocks_pending,
            waited_in_flight,
        })
    }
}

/// The range of capacities the machine went through while a window was open: what a
/// kubelet that (re)started meanwhile could have read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seen {
    pub memory_min: u64,
    pub memory_max: u64,
    pub cpus_min: u32,
    pub cpus_max: u32,
}

impl Seen {
    pub fn at(s: Summary) -> Self {
        Self {
            memory_min: s.memory_bytes,
            memory_max: s.memory_bytes,
            cpus_min: s.cpus_online,
            cpus_max: s.cpus_online,
        }
    }

    pub fn widen(&mut self, s: Summary) {
        self.memory_min = self.memory_min.min(s.memory_bytes);
        self.memory_max = self.memory_max.max(s.memory_bytes);
        self.cpus_min = self.cpus_min.min(s.cpus_online);
        self.cpus_max = self.cpus_max.max(s.cpus_online);
    }

    /// Whether a machine with this memory and CPU count lies within what was seen. The
    /// range, not only the values the records carried: a kubelet reads MemTotal at an
    /// instant of its own while a burst moves it, and that instant may fall between two
    /// records.
    pub fn contains(&self, memory_bytes: u64, cpus: u32) -> bool {
        (self.memory_min..=self.memory_max).contains(&memory_bytes)
            && (self.cpus_min..=self.cpus_max).contains(&cpus)
    }

    /// The machine did not move while the window was open.
    pub fn is_point(&self) -> bool {
        self.memory_min == self.memory_max && self.cpus_min == self.cpus_max
    }
}

/// Opens capacity windows; see [`Seen`].
#[derive(Clone, Debug)]
pub struct Window {
    shared: Arc<Shared>,
}

impl Window {
    /// Opens the window at the machine as it is now; it closes when the guard drops. One
    /// window at a time (the controller handles one episode at a time).
    pub fn open(&self, now: Summary) -> OpenWindow {
        *lock(&self.shared.window) = Some(Seen::at(now));
        OpenWindow {
            shared: self.shared.clone(),
        }
    }
}

/// An open window; closed on drop.
#[derive(Debug)]
pub struct OpenWindow {
    shared: Arc<Shared>,
}

impl OpenWindow {
    pub fn seen(&self) -> Seen {
        lock(&self.shared.window).expect("an open window has a range")
    }

    /// A capacity read directly (not from a record), e.g. while verifying.
    pub fn widen(&self, s: Summary) {
        if let Some(seen) = lock(&self.shared.window).as_mut() {
            seen.widen(s);
        }
    }
}

impl Drop for OpenWindow {
    fn drop(&mut self) {
        *lock(&self.shared.window) = None;
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

    use crate::{
        pipeline::event_record,
        record::{AgentRecord, Source},
        sources::{Change, Detail},
    };

    const BLOCK: u64 = 128 << 20;

    fn block(action: Action, n: u32, capacity: Summary) -> Record {
        let change = Change {
            source: Source::Uevent,
            kind: Kind::MemoryBlock,
            action,
            device: Some(format!("memory{n}")),
            detail: Detail::None,
        };
        Record::Event(Box::new(event_record(change, capacity)))
    }

    fn cpu(online: bool, cpus: u32) -> Record {
        let change = Change {
            source: Source::Uevent,
            kind: Kind::Cpu,
            action: if online {
                Action::Online
            } else {
                Action::Offline
            },
            device: Some("cpu1".into()),
            detail: Detail::None,
        };
        Record::Event(Box::new(event_record(
            change,
            Summary {
                memory_bytes: 4 << 30,
                cpus_online: cpus,
            },
        )))
    }

    fn mem(blocks_online: u64) -> Summary {
        Summary {
            memory_bytes: (4 << 30) + blocks_online * BLOCK,
            cpus_online: 2,
        }
    }

    fn timing() -> Timing {
        Timing {
            settle: SETTLE,
            max_wait: MAX,
            ..Timing::default()
        }
    }

    /// The incident: 512 `add`s at once, then the blocks come online one by one, 13 ms
    /// apart (the agent's rate under TCG): 6.7 s, longer than the 5 s bound. One episode,
    /// settled one window after the last `online`, never cut.
    #[tokio::test(start_paused = true)]
    async fn a_dimm_onlining_slower_than_the_bound_is_one_episode() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with(timing());
        let task = tokio::spawn(async move { (episodes.next().await, episodes) });
        for n in 0..512 {
            tracker.observe(&block(Action::Add, 32 + n, mem(0)));
        }
        for n in 0..512u32 {
            advance(13).await;
            assert!(
                !task.is_finished(),
                "settled with {} blocks in flight",
                512 - n
            );
            tracker.observe(&block(Action::Online, 32 + n, mem(u64::from(n) + 1)));
        }
        let last_online = Instant::now();
        let (ep, episodes) = task.await.unwrap();
        let ep = ep.unwrap();
        assert_eq!(ep.why, Settled::Quiet, "{ep:?}");
        assert!(!ep.bounded && ep.waited_in_flight);
        assert_eq!(
            (ep.events, ep.blocks_added, ep.blocks_pending),
            (1024, 512, 0)
        );
        assert_eq!(ep.settled - last_online, SETTLE);
        assert_eq!(episodes.pending(), 0);
    }

    /// The `offline_pages` probe record of block `n` (the kernel's worker starts offlining it).
    fn offline_starts(n: u32, capacity: Summary) -> Record {
        let change = Change {
            source: Source::Ebpf,
            kind: Kind::Memory,
            action: Action::Resize,
            device: Some(format!("memory{n}")),
            detail: Detail::Probe {
                probe: "fentry/offline_pages",
                kernel_ns: 1,
                delivery_ns: 1,
                pid: 9,
                comm: "kworker/u4:1".into(),
                cpu: 0,
                pages: Some(-32768),
                hits: 1,
            },
        };
        Record::Event(Box::new(event_record(change, capacity)))
    }

    /// An eject whose blocks each take 1 s to offline (pages to migrate), longer than the
    /// settle window: one episode, settled one window after the last `offline`, and the
    /// controller is told at the first start.
    #[tokio::test(start_paused = true)]
    async fn an_unplug_slower_than_the_settle_window_is_one_episode() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with(timing());
        let mut starts = episodes.offlining();
        let task = tokio::spawn(async move { episodes.next().await });
        for n in 0..4u32 {
            tracker.observe(&offline_starts(40 + n, mem(4 - u64::from(n))));
            if n == 0 {
                let first = starts.next().await.expect("the start is told");
                assert_eq!((first.seq, first.by_kernel), (1, true));
            }
            advance(1000).await;
            assert!(
                !task.is_finished(),
                "settled with memory{} going offline",
                40 + n
            );
            tracker.observe(&block(Action::Offline, 40 + n, mem(3 - u64::from(n))));
        }
        let last = Instant::now();
        let ep = task.await.unwrap().unwrap();
        assert_eq!((ep.why, ep.events), (Settled::Quiet, 8), "{ep:?}");
        assert_eq!(ep.settled - last, SETTLE);
        // Only arrivals are reported as blocks: this record stays as it was.
        assert!(!ep.waited_in_flight);
    }

    /// A fast offline's `offline` uevent read before its probe record: the block is not
    /// taken as still going, so the episode settles after the ordinary window.
    #[tokio::test(start_paused = true)]
    async fn an_offline_whose_end_is_read_first_holds_nothing() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with(timing());
        tracker.observe(&block(Action::Offline, 40, mem(0)));
        tracker.observe(&offline_starts(40, mem(0)));
        let start = Instant::now();
        let ep = episodes.next().await.unwrap();
        assert_eq!((ep.why, ep.settled - start), (Settled::Quiet, SETTLE));
        // Online again, then offlined for real later: that one is waited for.
        tracker.observe(&block(Action::Online, 40, mem(1)));
        tracker.observe(&offline_starts(40, mem(1)));
        let start = Instant::now();
        let ep = episodes.next().await.unwrap();
        assert_eq!(ep.why, Settled::InFlightStalled);
        assert_eq!(ep.settled - start, DEFAULT_IN_FLIGHT_STALL);
    }

    /// Blocks onlined from outside at a steady 40 blocks/s (a slow udev rule): 12.8 s of
    /// onlining, one episode.
    #[tokio::test(start_paused = true)]
    async fn a_steady_external_onliner_is_one_episode() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with(timing());
        let task = tokio::spawn(async move { episodes.next().await });
        for n in 0..512 {
            tracker.observe(&block(Action::Add, n, mem(0)));
        }
        for n in 0..512u32 {
            advance(25).await;
            tracker.observe(&block(Action::Online, n, mem(u64::from(n) + 1)));
        }
        let ep = task.await.unwrap().unwrap();
        assert_eq!(
            (ep.why, ep.blocks_added, ep.blocks_pending),
            (Settled::Quiet, 512, 0)
        );
    }

    /// Nobody onlines the new blocks (kernel policy `offline`, no auto-online, no udev rule):
    /// the episode settles after the stall window, says so, and the next episode does not
    /// wait for those blocks again.
    #[tokio::test(start_paused = true)]
    async fn blocks_left_offline_settle_after_the_stall_window() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with(timing());
        for n in 0..8 {
            tracker.observe(&block(Action::Add, n, mem(0)));
        }
        let start = Instant::now();
        let ep = episodes.next().await.unwrap();
        assert_eq!(ep.why, Settled::InFlightStalled);
        assert_eq!(
            (ep.blocks_pending, ep.why.reason()),
            (8, Some("in_flight_stalled"))
        );
        assert_eq!(ep.settled - start, DEFAULT_IN_FLIGHT_STALL);
        // A CPU toggle later: an ordinary episode, settled after the ordinary window.
        tracker.observe(&cpu(false, 1));
        let start = Instant::now();
        let next = episodes.next().await.unwrap();
        assert_eq!((next.why, next.blocks_pending), (Settled::Quiet, 0));
        assert_eq!(next.settled - start, SETTLE);
        // One of them is onlined by hand much later: it ends no wait, it is just an event.
        tracker.observe(&block(Action::Online, 3, mem(1)));
        let late = episodes.next().await.unwrap();
        assert_eq!(
            (late.why, late.events, late.blocks_added),
            (Settled::Quiet, 1, 0)
        );
    }

    /// A failed auto-online write takes its block out of flight at once.
    #[tokio::test(start_paused = true)]
    async fn a_failed_auto_online_ends_the_wait_for_that_block() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with(timing());
        tracker.observe(&block(Action::Add, 40, mem(0)));
        let mut failed = AgentRecord::new(AgentAction::AutoOnline, mem(0));
        failed.device = Some("memory40".into());
        failed.error = Some("writing \"online_movable\": Device or resource busy".into());
        advance(50).await;
        tracker.observe(&Record::Agent(Box::new(failed)));
        let start = Instant::now();
        let ep = episodes.next().await.unwrap();
        assert_eq!((ep.why, ep.blocks_pending), (Settled::Quiet, 0));
        // Quiet is counted from the later of the last event and the start of the wait.
        assert_eq!(ep.settled - start, SETTLE);
    }

    /// Blocks keep arriving and never all get online: the generous bound cuts it.
    #[tokio::test(start_paused = true)]
    async fn the_in_flight_bound_cuts_an_endless_trickle() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with(timing());
        let task = tokio::spawn(async move { episodes.next().await });
        let mut n = 0;
        while !task.is_finished() && n < 1000 {
            tracker.observe(&block(Action::Add, n, mem(0)));
            n += 1;
            advance(100).await;
        }
        let ep = task.await.unwrap().unwrap();
        assert!(ep.bounded && ep.why == Settled::MaxWait, "{ep:?}");
        let took = ep.settled - ep.first;
        assert!(
            took >= DEFAULT_IN_FLIGHT_MAX_WAIT
                && took < DEFAULT_IN_FLIGHT_MAX_WAIT + Duration::from_millis(150),
            "{took:?}"
        );
        assert!(ep.blocks_pending > 0);
    }

    /// Two bursts with quiet between them are two episodes.
    #[tokio::test(start_paused = true)]
    async fn two_bursts_separated_by_quiet_are_two_episodes() {
        let (tracker, episodes) = Tracker::new();
        let mut episodes = episodes.with(timing());
        let (tx, mut settled) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(ep) = episodes.next().await {
                let _ = tx.send(ep);
            }
        });
        let mut got = Vec::new();
        for burst in 0..2u32 {
            for n in 0..16 {
                tracker.observe(&block(Action::Add, burst * 16 + n, mem(0)));
            }
            for n in 0..16 {
                advance(10).await;
                tracker.observe(&block(Action::Online, burst * 16 + n, mem(1)));
            }
            // The quiet between the bursts: the first settles before the second begins.
            got.push(settled.recv().await.unwrap());
        }
        let (a, b) = (got[0], got[1]);
        assert_eq!((a.blocks_added, b.blocks_added), (16, 16));
        assert_eq!((a.events, b.events), (32, 32));
        assert!(b.first > a.settled);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_holds_the_range_of_capacities_the_records_showed() {
        let (tracker, episodes) = Tracker::new();
        let window = episodes.window();
        tracker.observe(&block(Action::Online, 1, mem(5)));
        let open = window.open(mem(8));
        assert!(
            open.seen().is_point(),
            "records before the window do not count"
        );
        tracker.observe(&block(Action::Online, 2, mem(9)));
        tracker.observe(&cpu(false, 1));
        let seen = open.seen();
        assert!(!seen.is_point());
        assert!(
            seen.contains(mem(8).memory_bytes + BLOCK / 2, 2),
            "between two records"
        );
        assert!(seen.contains(4 << 30, 1), "the CPU record's own capacity");
        assert!(!seen.contains(mem(10).memory_bytes, 2));
        assert!(!seen.contains(mem(9).memory_bytes, 3));
        drop(open);
        let again = window.open(mem(9));
        tracker.observe(&block(Action::Online, 3, mem(9)));
        assert!(
            again.seen().is_point(),
            "a new window starts from its own point"
        );
    }
}
