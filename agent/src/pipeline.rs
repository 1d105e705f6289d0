//! Sources in, records out: the part of the data flow every mode shares.
//!
//! [`start`] binds the uevent socket and attaches the probes (so nothing that happens from
//! here on is missed), takes the start-up snapshot, and returns the `ready` record and a
//! channel of records. One task merges the sources, folds the kernel's repeats, attaches
//! the capacity as it is right after each event, and rescans on loss. Dropping the
//! receiver stops everything.
use crate::record::AgentAction;
use std::{path::PathBuf, sync::Arc, time::Duration};

use agent_common::Probe;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    auto_online,
    capacity::{self, Summary},
    record::{
        Action, AgentRecord, EventRecord, Kind, MachineSummary, Record, SCHEMA_VERSION, Source,
        SourceStatus, monotonic_ns, now_rfc3339,
    },
    sources::{
        Change, Counters, Detail, Loss, SourceMsg,
        coalesce::{Coalescer, ProbeEvent, is_folded},
        ebpf::{self, EbpfMsg},
        scan::Known,
        uevent,
    },
};

/// The slow re-read guard for MemTotal changes no uevent announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rescan {
    /// On at [`DEFAULT_RESCAN`] when the precise memory probes cannot attach, else off.
    Auto,
    Off,
    Every(Duration),
}

impl Rescan {
    /// `auto`, `off` (or `0`), or a number of seconds: the `--rescan-interval` value.
    pub fn parse(s: &str) -> Result<Self, BadRescan> {
        match s {
            "auto" => Ok(Self::Auto),
            "off" | "0" => Ok(Self::Off),
            secs => secs
                .parse::<u64>()
                .map(|n| Self::Every(Duration::from_secs(n)))
                .map_err(|_| BadRescan(s.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?}: expected auto, off, or a number of seconds")]
pub struct BadRescan(String);

pub const DEFAULT_RESCAN: Duration = Duration::from_secs(60);
/// 128 MiB: a burst of 1,152 memory uevents arrived whole with this (DESIGN.md).
pub const DEFAULT_UEVENT_RCVBUF: usize = 128 << 20;
/// Kernel-time gap below which repeats of one probe from one task are one change. One
/// block's 10 watermark hits span ~12 µs here; offlining then onlining a block back to back
/// leaves ~700 µs between the two operations.
pub const DEFAULT_FOLD_WINDOW: Duration = Duration::from_micros(200);

#[derive(Clone, Debug)]
pub struct Config {
    /// Filesystem root for /proc and /sys (tests point it at fixture trees).
    pub root: PathBuf,
    pub ebpf: bool,
    pub uevent: bool,
    pub uevent_rcvbuf: usize,
    pub rescan: Rescan,
    pub fold_window: Duration,
    /// Opt-in: online blocks and CPUs that arrive with a uevent `add` (auto_online.rs).
    pub auto_online: auto_online::Policy,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            ebpf: true,
            uevent: true,
            uevent_rcvbuf: DEFAULT_UEVENT_RCVBUF,
            rescan: Rescan::Auto,
            fold_window: DEFAULT_FOLD_WINDOW,
            auto_online: auto_online::Policy::default(),
        }
    }
}

/// The longest any duration setting may be. Beyond it a setting is a typo
/// (`400000000000y`), and deadlines computed from it would overflow the clock and panic.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);
/// What `--uevent-rcvbuf` may ask for: not 0, not more than 1 GiB. A small value is
/// allowed (tests force ENOBUFS with 1); the kernel rounds it up to its minimum, and the
/// ready record's `uevent` detail says the size the kernel actually granted.
pub const UEVENT_RCVBUF_RANGE: std::ops::RangeInclusive<usize> = 1..=(1 << 30);

/// A setting that cannot work, named by its flag, found at start-up.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("--{flag} {value} is {problem}")]
pub struct InvalidSetting {
    pub flag: &'static str,
    pub value: String,
    pub problem: &'static str,
}

impl InvalidSetting {
    /// Checks durations: `nonzero` ones must not be zero; none may exceed [`MAX_DURATION`].
    pub fn durations(
        durations: impl IntoIterator<Item = (&'static str, Duration, bool)>,
    ) -> Result<(), Self> {
        for (flag, value, nonzero) in durations {
            let problem = if value > MAX_DURATION {
                "longer than 7 days"
            } else if nonzero && value.is_zero() {
                "zero"
            } else {
                continue;
            };
            return Err(Self {
                flag,
                value: format!("{value:?}"),
                problem,
            });
        }
        Ok(())
    }
}

impl Config {
    /// Every setting of the sources, checked once at start-up.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        if self.uevent && !UEVENT_RCVBUF_RANGE.contains(&self.uevent_rcvbuf) {
            return Err(InvalidSetting {
                flag: "uevent-rcvbuf",
                value: self.uevent_rcvbuf.to_string(),
                problem: "outside 1..=1073741824 bytes",
            });
        }
        let rescan = match self.rescan {
            Rescan::Every(every) => Some(("rescan-interval", every, true)),
            Rescan::Auto | Rescan::Off => None,
        };
        InvalidSetting::durations(rescan)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("reading the machine's capacity at start-up")]
    Capacity(#[source] capacity::CapacityError),
    #[error("starting the auto-online worker thread")]
    AutoOnline(#[source] std::io::Error),
}

pub struct Pipeline {
    /// The first record: every source listening, what attached, the capacity.
    pub ready: AgentRecord,
    pub records: mpsc::Receiver<Record>,
    pub counters: Arc<Counters>,
}

pub async fn start(config: Config) -> Result<Pipeline, StartError> {
    let counters = Arc::new(Counters::default());
    let (src_tx, src_rx) = mpsc::channel::<SourceMsg>(4096);
    let (ebpf_tx, ebpf_rx) = mpsc::channel::<EbpfMsg>(4096);
    let mut sources = Vec::new();

    if config.uevent {
        match uevent::open(config.uevent_rcvbuf) {
            Ok(sock) => {
                if let Some(w) = &sock.rcvbuf_warning {
                    tracing::warn!("{w}");
                }
                sources.push(SourceStatus {
                    name: "uevent".into(),
                    listening: true,
                    detail: Some(format!(
                        "kernel netlink, receive buffer {} bytes",
                        sock.rcvbuf
                    )),
                    error: sock.rcvbuf_warning.clone(),
                });
                tokio::spawn(uevent::run(sock, src_tx.clone(), counters.clone()));
            }
            Err(e) => {
                let error = crate::sources::error_chain(&e);
                tracing::warn!("uevent source off: {error}");
                sources.push(SourceStatus {
                    name: "uevent".into(),
                    listening: false,
                    detail: None,
                    error: Some(error),
                });
            }
        }
    }

    let mut probes = Vec::new();
    let mut names = Vec::new();
    let mut precise = false;
    if config.ebpf {
        let loaded = ebpf::load(&config.root);
        probes = loaded.probes;
        precise = loaded.precise;
        match loaded.source {
            Some(source) => {
                names = source.probe_names();
                let attached = probes.iter().filter(|p| p.attached).count();
                sources.push(SourceStatus {
                    name: "ebpf".into(),
                    listening: true,
                    detail: Some(format!("{attached} of {} probes attached", probes.len())),
                    error: None,
                });
                tokio::spawn(source.run(ebpf_tx, counters.clone()));
            }
            None => {
                let error = loaded.error.unwrap_or_else(|| "unknown".into());
                tracing::warn!("eBPF source off, the uevent monitor carries on: {error}");
                sources.push(SourceStatus {
                    name: "ebpf".into(),
                    listening: false,
                    detail: None,
                    error: Some(error),
                });
            }
        }
    }
    drop(src_tx);

    let snapshot = capacity::read_snapshot(&config.root).map_err(StartError::Capacity)?;
    let rescan_every = match config.rescan {
        Rescan::Off => None,
        Rescan::Every(d) => Some(d),
        Rescan::Auto if precise => None,
        Rescan::Auto => Some(DEFAULT_RESCAN),
    };
    let mut ready = AgentRecord::new(AgentAction::Ready, snapshot.summary());
    ready.probes = probes;
    ready.sources = sources;
    ready.rescan_interval_s = Some(rescan_every.map(|d| d.as_secs()));
    ready.version = Some(env!("CARGO_PKG_VERSION").into());
    ready.machine = Some(MachineSummary::of(&snapshot));

    let (out_tx, out_rx) = mpsc::channel(4096);
    let onliner = if config.auto_online.is_off() {
        None
    } else {
        Some(
            auto_online::Onliner::spawn(config.root.clone(), out_tx.clone())
                .map_err(StartError::AutoOnline)?,
        )
    };
    let core = Core {
        root: config.root,
        known: Known::from_snapshot(&snapshot),
        last: snapshot.summary(),
        probe_memory: snapshot.memory_bytes,
        block_size: snapshot.memory_block_size,
        coalescer: Coalescer::new(config.fold_window.as_nanos() as u64),
        names,
        auto_online: config.auto_online,
        onliner,
        out: out_tx,
    };
    tokio::spawn(core.run(src_rx, ebpf_rx, rescan_every, config.fold_window));
    Ok(Pipeline {
        ready,
        records: out_rx,
        counters,
    })
}

struct Core {
    root: PathBuf,
    known: Known,
    last: Summary,
    /// MemTotal at the previous eBPF memory record: a watermark hit is a `resize` only if it moved.
    probe_memory: u64,
    /// `memory/block_size_bytes`, fixed at boot: names the block of a memory probe hit.
    block_size: Option<u64>,
    coalescer: Coalescer,
    names: Vec<(Probe, &'static str)>,
    auto_online: auto_online::Policy,
    /// The auto-online worker, when the policy is on.
    onliner: Option<auto_online::Onliner>,
    out: mpsc::Sender<Record>,
}

impl Core {
    async fn run(
        mut self,
        mut src: mpsc::Receiver<SourceMsg>,
        mut ebpf: mpsc::Receiver<EbpfMsg>,
        rescan_every: Option<Duration>,
        fold_window: Duration,
    ) {
        let far = Duration::from_secs(86400 * 365);
        let mut fold_deadline = Instant::now() + far;
        let mut next_rescan = Instant::now() + rescan_every.unwrap_or(far);
        let (mut src_open, mut ebpf_open) = (true, true);
        loop {
            let ok = tokio::select! {
                msg = src.recv(), if src_open => match msg {
                    Some(SourceMsg::Change(c)) => self.emit(c).await,
                    Some(SourceMsg::Loss { source, loss }) => self.loss(source, loss).await,
                    None => { src_open = false; true }
                },
                msg = ebpf.recv(), if ebpf_open => match msg {
                    Some(EbpfMsg::Hit(hit)) => {
                        let ok = self.hit(hit).await;
                        if self.coalescer.is_pending() {
                            fold_deadline = Instant::now() + fold_window;
                        }
                        ok
                    }
                    Some(EbpfMsg::Loss(loss)) => self.loss(Source::Ebpf, loss).await,
                    None => { ebpf_open = false; true }
                },
                _ = tokio::time::sleep_until(fold_deadline), if self.coalescer.is_pending() => {
                    fold_deadline = Instant::now() + far;
                    match self.coalescer.flush() {
                        Some(ev) => self.probe_event(ev).await,
                        None => true,
                    }
                },
                _ = tokio::time::sleep_until(next_rescan), if rescan_every.is_some() => {
                    next_rescan = Instant::now() + rescan_every.unwrap_or(far);
                    self.rescan("interval").await
                },
                _ = self.out.closed() => false,
            };
            if !ok {
                return;
            }
        }
    }

    async fn hit(&mut self, hit: ProbeEvent) -> bool {
        if !is_folded(hit.probe) {
            return self.probe_event(hit).await;
        }
        match self.coalescer.push(hit) {
            Some(done) => self.probe_event(done).await,
            None => true,
        }
    }

    async fn probe_event(&mut self, ev: ProbeEvent) -> bool {
        let name = self
            .names
            .iter()
            .find(|(p, _)| *p == ev.probe)
            .map_or("unknown", |(_, n)| *n);
        match ebpf::change_of(&ev, name, self.block_size) {
            Some(change) => self.emit(change).await,
            None => true,
        }
    }

    fn summary(&mut self) -> Summary {
        match capacity::read_summary(&self.root) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %crate::sources::error_chain(&e), "reading capacity; the record keeps the last value");
                self.last
            }
        }
    }

    async fn emit(&mut self, mut change: Change) -> bool {
        // Decided before the change becomes its record; acted on after, so the log reads
        // `add`, then what the agent did about it.
        let arrival = auto_online::arrival(self.auto_online, &change);
        let capacity = self.summary();
        if change.kind == Kind::Memory && change.source == Source::Ebpf {
            if change.action == Action::Change && capacity.memory_bytes != self.probe_memory {
                change.action = Action::Resize;
            }
            self.probe_memory = capacity.memory_bytes;
        }
        self.known.apply(&change, capacity.memory_bytes);
        self.last = capacity;
        let record = event_record(change, capacity);
        if self
            .out
            .send(Record::Event(Box::new(record)))
            .await
            .is_err()
        {
            return false;
        }
        // Auto-online (opt-in): a block or CPU that just arrived is queued for onlining,
        // once, after its `add` record; the worker writes it while the pipeline goes on
        // reading events, and the kernel's `online` uevent follows as an event.
        if let (Some(arrival), Some(onliner)) = (arrival, &self.onliner) {
            onliner.queue(arrival);
        }
        true
    }

    async fn loss(&mut self, source: Source, loss: Loss) -> bool {
        if loss.is_certain() {
            let mut rec = AgentRecord::new(AgentAction::Loss, self.last);
            rec.source = Some(source);
            rec.reason = Some(loss.reason().into());
            if let Loss::RingbufDrops { dropped } = loss {
                rec.lost = Some(dropped);
            }
            if self.out.send(Record::Agent(Box::new(rec))).await.is_err() {
                return false;
            }
        } else {
            tracing::debug!(?loss, "possible loss; checking with a rescan");
        }
        self.rescan(loss.reason()).await
    }

    async fn rescan(&mut self, reason: &'static str) -> bool {
        let snapshot = match capacity::read_snapshot(&self.root) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %crate::sources::error_chain(&e), reason, "rescan failed; will retry on the next trigger");
                return true;
            }
        };
        let capacity = snapshot.summary();
        self.last = capacity;
        for change in self.known.rescan(&snapshot, reason) {
            if self
                .out
                .send(Record::Event(Box::new(event_record(change, capacity))))
                .await
                .is_err()
            {
                return false;
            }
        }
        true
    }
}

pub fn event_record(change: Change, capacity: Summary) -> EventRecord {
    let mut rec = EventRecord {
        v: SCHEMA_VERSION,
        time: now_rfc3339(),
        source: change.source,
        kind: change.kind,
        action: change.action,
        device: change.device,
        capacity,
        mono_ns: monotonic_ns(),
        seqnum: None,
        probe: None,
        kernel_ns: None,
        delivery_ns: None,
        pid: None,
        comm: None,
        cpu: None,
        pages: None,
        hits: None,
        reason: None,
    };
    match change.detail {
        Detail::None => {}
        Detail::Uevent { seqnum } => rec.seqnum = Some(seqnum),
        Detail::Probe {
            probe,
            kernel_ns,
            delivery_ns,
            pid,
            comm,
            cpu,
            pages,
            hits,
        } => {
            rec.probe = Some(probe.into());
            rec.kernel_ns = Some(kernel_ns);
            rec.delivery_ns = Some(delivery_ns);
            rec.pid = Some(pid);
            rec.comm = Some(comm);
            rec.cpu = Some(cpu);
            rec.pages = pages;
            rec.hits = (hits > 1).then_some(hits);
        }
        Detail::Scan { reason } => rec.reason = Some(reason.into()),
    }
    rec
}
