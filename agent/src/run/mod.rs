//! `hotplug-agent run`: the pipeline, and for this node the whole loop:
//! episode -> reconcile -> refresh -> verify, reported in the event log and on the Node.
//!
//! One controller task handles one episode at a time (so never more than one refresh is
//! in flight); the pump keeps writing events and counting them meanwhile, so whatever
//! arrives during a refresh becomes the next episode. Work that cannot be done now (API
//! down, a guard rail) stays pending and is retried; a new episode joins it.
use crate::record::{DecisionAction, DecisionKind};
use std::{collections::HashMap, future::Future, path::PathBuf, time::Duration};

use k8s_openapi::api::core::v1::Node;
use tokio::{sync::mpsc, time::Instant};

use crate::{
    capacity::{self, Snapshot},
    checkpoint::{self, Verdict},
    episode::{Episode, Episodes, OpenWindow, Seen, Timing, Tracker, Window},
    fleet::{self, Fleet},
    node::{EventType, NodeApi, NodeError},
    pipeline::{self, InvalidSetting, Pipeline},
    reconcile,
    record::{Advertised, DecisionRecord, Record},
    refresh::{self, Backend, guard::Guard},
    report::sinks::{Sinks, drain},
    sources::error_chain,
    verify,
};

mod admission;
mod budget;
mod reset;
mod shrink;
mod update;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StaticPolicy {
    /// Do not restart; raise the condition and a Warning Event saying what to do.
    Refuse,
    /// Cordon, evict the pinned pods, stop the kubelet, move the checkpoint aside, start.
    DrainAndReset,
    /// Rewrite the checkpoint for the new machine (new CPUs join the shared pool, new
    /// memory its NUMA node; no assignment moves), restart the kubelet once. Where that is
    /// not safe (a pinned or reserved CPU went away, ...): refuse, as `refuse` does.
    UpdateInPlace,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub pipeline: pipeline::Config,
    /// When a burst counts as over (episode.rs).
    pub timing: Timing,
    pub node_name: String,
    pub backend: Backend,
    pub guard: refresh::guard::GuardConfig,
    pub verify_timeout: Duration,
    /// The deadline of each API call (node.rs).
    pub api_timeout: Duration,
    pub kubelet_root: PathBuf,
    /// The kubelet's config file (upstream.rs): with its `InPlaceNodeResourceResize` gate
    /// on, the agent only reports.
    pub kubelet_config: PathBuf,
    pub static_policy: StaticPolicy,
    pub cgroup_root: PathBuf,
    /// Cluster-wide budgets on restarts and drains (only with a client).
    pub fleet: fleet::Config,
    /// A restart on a smaller machine that the pods would not fit (shrink.rs).
    pub shrink_policy: crate::shrink::Policy,
}

impl Config {
    /// Every duration, checked once at start-up with the flag's name, so that none can
    /// overflow a deadline later.
    pub fn validate(&self) -> Result<(), InvalidSetting> {
        self.pipeline.validate()?;
        let t = &self.timing;
        let mut durations = vec![
            ("settle-ms", t.settle, false),
            ("max-wait-ms", t.max_wait, true),
            ("in-flight-max-wait-ms", t.in_flight_max_wait, true),
            ("in-flight-stall-ms", t.in_flight_stall, true),
            ("verify-timeout", self.verify_timeout, true),
            ("api-timeout", self.api_timeout, true),
            ("min-refresh-interval", self.guard.min_interval, false),
            ("lease-duration", self.fleet.lease_duration, true),
        ];
        if let Some(timeout) = self.backend.timeout() {
            durations.push(("refresh-timeout", timeout, true));
        }
        InvalidSetting::durations(durations)
    }
}

pub use crate::error::{Fault, RunError};

/// Runs until `shutdown` completes. `client` is `None` where no cluster is configured:
/// episodes are still recorded and reconcile says it has nothing to compare with.
pub async fn run(
    config: Config,
    client: Option<kube::Client>,
    sinks: &mut Sinks<'_>,
    shutdown: impl Future<Output = ()>,
    after_batch: impl FnMut(),
) -> Result<(), RunError> {
    let Pipeline {
        ready,
        records,
        counters,
    } = pipeline::start(config.pipeline.clone()).await?;
    if let Some(m) = &sinks.metrics {
        m.attach_counters(counters);
    }
    control(
        config,
        client,
        Record::Agent(Box::new(ready)),
        records,
        sinks,
        shutdown,
        after_batch,
    )
    .await
}

/// The loop over records that some pipeline produces: `first` (the `ready` record) and then
/// `records`, every one logged, the events counted into episodes. [`run`] feeds it the
/// machine's own pipeline; tests feed it records they make, over a fixture root
/// (`config.pipeline.root`), which is how the controller is tested without root.
pub async fn control(
    config: Config,
    client: Option<kube::Client>,
    first: Record,
    mut records: mpsc::Receiver<Record>,
    sinks: &mut Sinks<'_>,
    shutdown: impl Future<Output = ()>,
    after_batch: impl FnMut(),
) -> Result<(), RunError> {
    // Read once, said in the ready record: the kubelet may resize the Node itself.
    let kubelet_config = crate::upstream::status(&config.kubelet_config);
    let upstream_resize = kubelet_config.upstream_resize;
    let mut first = first;
    if let Record::Agent(a) = &mut first {
        a.kubelet_config = Some(kubelet_config);
    }
    if let Some(m) = &sinks.metrics
        && client.is_some()
    {
        m.expect_reconcile();
    }
    let (tracker, episodes) = Tracker::new();
    let episodes = episodes.with(config.timing);
    let (log_tx, mut log_rx) = mpsc::channel::<Record>(4096);
    let decisions = log_tx.clone();
    // The pump: every pipeline record to the log, every event counted for the episodes.
    let pump = tokio::spawn(async move {
        while let Some(rec) = records.recv().await {
            tracker.observe(&rec);
            if log_tx.send(rec).await.is_err() {
                break;
            }
        }
    });
    let fleet = client
        .clone()
        .map(|c| Fleet::new(c, &config.fleet, &config.node_name, config.api_timeout));
    let (holder, api_timeout) = (config.node_name.clone(), config.api_timeout);
    let mut controller =
        Controller::new(config, client, decisions, episodes.window(), fleet.clone());
    controller.upstream_resize = upstream_resize;
    let control = tokio::spawn(controller.run(episodes));
    let tasks = [pump.abort_handle(), control.abort_handle()];
    // Either task ending on its own is a fault: the pipeline's records stopped (its task
    // panicked), or the controller panicked. Stop, with the `stopped` record, and fail.
    let (fault_tx, fault_rx) = tokio::sync::oneshot::channel::<Fault>();
    let watch_faults = tokio::spawn(async move {
        let fault = tokio::select! {
            r = pump => match r {
                Ok(()) => Fault::PipelineStopped,
                Err(e) => Fault::Pump(panic_text(e)),
            },
            r = control => match r {
                // It returns only when its episodes end, i.e. when the pump (and so the
                // pipeline) has; which of the two is noticed first is a race.
                Ok(()) => Fault::PipelineStopped,
                Err(e) => Fault::Controller(panic_text(e)),
            },
        };
        tracing::error!("{fault}; stopping");
        let _ = fault_tx.send(fault);
    });
    let mut fault = None;
    let mut asked_to_stop = false;
    let stop = async {
        tokio::select! {
            () = shutdown => asked_to_stop = true,
            f = fault_rx => fault = f.ok(),
        }
    };
    let result = drain(sinks, first, &mut log_rx, stop, after_batch).await;
    // The log's channel can close (both tasks ended) before the watcher's message arrives:
    // the records stopped without anyone asking, which is the pipeline stopping.
    if fault.is_none() && !asked_to_stop {
        fault = Some(Fault::PipelineStopped);
    }
    watch_faults.abort();
    for task in tasks {
        task.abort();
    }
    // A slot held by a restart the shutdown cut short goes back now, not after it expires.
    if let Some(fleet) = &fleet {
        fleet.release_all(&holder, api_timeout).await;
    }
    result.map_err(RunError::Write)?;
    match fault {
        Some(f) => Err(f.into()),
        None => Ok(()),
    }
}

/// What a task's panic said, for the record and the exit message.
fn panic_text(e: tokio::task::JoinError) -> String {
    if !e.is_panic() {
        return e.to_string();
    }
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".to_owned())
}

/// What to do after handling: done, or try again at a time.
enum Next {
    Done,
    RetryAt(Instant),
}

struct Controller {
    config: Config,
    node: Option<NodeApi>,
    log: mpsc::Sender<Record>,
    /// What the machine went through while a refresh and its verify ran.
    window: Window,
    guard: Guard,
    episode: u64,
    /// The API failed and we said so; say it again only when it is back.
    api_down: bool,
    api_backoff: Duration,
    /// Posting Events failed and we said so once.
    events_failing: bool,
    /// The stale state last announced on the Node: a retry of the same work does not
    /// announce it again.
    announced: Option<String>,
    /// The fleet budgets (none without a cluster), the slots held, since when each budget
    /// has been waited for, and the budget the pending retry waits on.
    fleet: Option<Fleet>,
    held: Vec<fleet::Slot>,
    fleet_waiting: HashMap<fleet::Action, Instant>,
    fleet_retry: Option<fleet::Action>,
    /// The API answered that our Node does not exist, and we said so once.
    node_missing: bool,
    /// The kubelet resizes the Node itself (upstream.rs): report only.
    upstream_resize: bool,
    /// Safe shrink (run/shrink.rs): the check before this restart, for its `started`
    /// record; whether the Node carries the agent's cordon for its evictions; the pods as
    /// they were before the restart, to find the ones failed at admission after it.
    shrink_checked: Option<crate::record::ShrinkCheck>,
    shrink_cordon: bool,
    pods_before: Option<HashMap<String, bool>>,
    /// The watch for pods failed at admission after the last convergence (admission.rs);
    /// dropped, so cancelled, when the next restart begins.
    admissions: Option<admission::Admissions>,
    /// The API refused the initial-capacity annotation and we said so once.
    initial_capacity_refused: bool,
    /// The allocatable (memory, CPU) the last check made while the kernel was offlining
    /// refused or evicted for: the rest of the same unplug is not said again.
    offlining_said: Option<(Option<u64>, Option<u64>)>,
}

const API_RETRY_MIN: Duration = Duration::from_secs(1);
const API_RETRY_MAX: Duration = Duration::from_secs(30);

impl Controller {
    fn new(
        config: Config,
        client: Option<kube::Client>,
        log: mpsc::Sender<Record>,
        window: Window,
        fleet: Option<Fleet>,
    ) -> Self {
        let node =
            client.map(|c| NodeApi::new(c, &config.node_name).with_timeout(config.api_timeout));
        let guard = Guard::new(config.guard.clone());
        Self {
            config,
            node,
            log,
            window,
            guard,
            episode: 0,
            api_down: false,
            api_backoff: API_RETRY_MIN,
            events_failing: false,
            announced: None,
            fleet,
            held: Vec::new(),
            fleet_waiting: HashMap::new(),
            fleet_retry: None,
            node_missing: false,
            upstream_resize: false,
            shrink_checked: None,
            shrink_cordon: false,
            pods_before: None,
            admissions: None,
            initial_capacity_refused: false,
            offlining_said: None,
        }
    }

    async fn run(mut self, mut episodes: Episodes) {
        // The start-up reconcile: a hot-add while the agent was down is caught here.
        let mut pending = true;
        if self.upstream_resize {
            let message = upstream_message(&self.config.kubelet_config);
            self.event(EventType::Normal, crate::upstream::EVENT_REASON, &message)
                .await;
        }
        self.decide(DecisionKind::Episode, DecisionAction::Settled, |d| {
            d.trigger = Some("startup".into());
            d.events = Some(0);
        })
        .await;
        // The kernel starting to offline memory is looked at at once (offlining.rs), while
        // the episode it begins waits to settle.
        let mut offlining = episodes.offlining();
        loop {
            if !pending {
                // What the agent does while the kernel offlines belongs to the episode that
                // the offline's first event began: its number is taken then, once.
                let mut opened = false;
                let ep = loop {
                    tokio::select! {
                        ep = episodes.next() => break ep,
                        Some(started) = offlining.next() => {
                            if !opened {
                                self.episode += 1;
                                opened = true;
                            }
                            self.offlining_started(started).await;
                        }
                    }
                };
                let Some(ep) = ep else {
                    return;
                };
                if !opened {
                    self.episode += 1;
                }
                self.settled(&ep, true).await;
            }
            pending = false;
            self.fleet_retry = None;
            let next = self.handle().await;
            if self.fleet_retry.is_none() {
                // Not waiting for a slot (any more): the next wait is announced again.
                self.fleet_waiting.clear();
            }
            match next {
                Next::Done => {}
                Next::RetryAt(at) => {
                    pending = true;
                    // Wait for the retry time; a new episode meanwhile joins the pending work,
                    // and a Node that catches up on its own (someone restarted the kubelet
                    // during an hour-long deferral) ends the wait: stale is not kept up.
                    loop {
                        tokio::select! {
                            () = tokio::time::sleep_until(at) => break,
                            () = self.caught_up(at) => break,
                            () = self.fleet_changed(at) => break,
                            ep = episodes.next() => {
                                let Some(ep) = ep else { return };
                                self.episode += 1;
                                self.settled(&ep, false).await;
                                break;
                            }
                            Some(started) = offlining.next() => {
                                self.offlining_started(started).await;
                            }
                        }
                    }
                }
            }
        }
    }

    /// Completes when the Node advertises the machine as it is, watched (not polled) until
    /// `until`; never completes otherwise (an error or the deadline leave the wait to the
    /// caller's timer, so an API that is down cannot make it spin).
    fn caught_up(&self, until: Instant) -> impl Future<Output = ()> + use<> {
        let api = self.node.clone();
        let root = self.config.pipeline.root.clone();
        async move {
            let Some(mut api) = api else {
                return std::future::pending().await;
            };
            let left = until.saturating_duration_since(Instant::now());
            let matches = |n: &Node| {
                let (Ok(adv), Ok(m)) = (reconcile::advertised(n), capacity::read_snapshot(&root))
                else {
                    return false;
                };
                reconcile::differences(&reconcile::expected(&m), &adv).is_empty()
            };
            match api.wait_until(left, matches).await {
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => std::future::pending().await,
            }
        }
    }

    /// The `episode` `settled` record. `timed`: the episode was waited for here (one that
    /// joins pending work has no settle time of its own to report, as before).
    async fn settled(&self, ep: &Episode, timed: bool) {
        let settle_ms = (ep.settled - ep.first).as_millis() as u64;
        self.decide(DecisionKind::Episode, DecisionAction::Settled, |d| {
            d.trigger = Some("events".into());
            d.events = Some(ep.events);
            if timed {
                d.settle_ms = Some(settle_ms);
                d.reason = ep.why.reason().map(str::to_string);
            }
            // Only where blocks were involved: other episodes' records stay as they were.
            if ep.blocks_added > 0 || ep.waited_in_flight {
                d.blocks_added = Some(ep.blocks_added);
                d.blocks_pending = Some(ep.blocks_pending);
            }
        })
        .await;
    }

    fn snapshot(&self) -> Option<Snapshot> {
        match capacity::read_snapshot(&self.config.pipeline.root) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "reading the machine's capacity");
                None
            }
        }
    }

    async fn decide(
        &self,
        kind: DecisionKind,
        action: DecisionAction,
        fill: impl FnOnce(&mut DecisionRecord),
    ) {
        let capacity = capacity::read_summary(&self.config.pipeline.root).unwrap_or_default();
        let mut d = DecisionRecord::new(kind, action, capacity, self.episode);
        d.node = self.node.as_ref().map(|n| n.name().to_string());
        fill(&mut d);
        let _ = self.log.send(Record::Decision(Box::new(d))).await;
    }

    async fn event(&mut self, kind: EventType, reason: &str, message: &str) {
        let Some(node) = &self.node else { return };
        match node.event(kind, reason, message).await {
            Ok(()) => self.events_failing = false,
            Err(e) if !self.events_failing => {
                self.events_failing = true;
                tracing::warn!(error = %error_chain(&e), "posting a Node Event failed; the event log still has it");
            }
            Err(_) => {}
        }
    }

    /// A problem the operator must act on, after its decision record: a Warning Event
    /// (`event_reason`) and the agent's condition on the Node, stale (`condition_reason`),
    /// both with `message`. One place, so that the two never say different things.
    async fn warn(
        &mut self,
        node: &Node,
        event_reason: &str,
        condition_reason: &str,
        message: &str,
    ) {
        self.event(EventType::Warning, event_reason, message).await;
        self.condition(node, true, condition_reason, message).await;
    }

    async fn condition(&mut self, node: &Node, stale: bool, reason: &str, message: &str) {
        let Some(api) = &self.node else { return };
        if let Err(e) = api.set_condition(node, stale, reason, message).await {
            tracing::warn!(error = %error_chain(&e), "setting the Node condition failed");
        }
    }

    /// Fetches the Node, or arranges a retry and says once that the API is down.
    async fn fetch(&mut self) -> Result<Node, Next> {
        let api = self
            .node
            .as_mut()
            .expect("fetch is only called with a client");
        match api.get().await {
            Ok(node) => {
                self.api_answered().await;
                self.node_missing = false;
                Ok(node)
            }
            // The API answered: it is up, and the Node is not there (the kubelet has not
            // registered it yet, it was deleted, or --node-name is wrong). Said once as
            // what it is, not as an unreachable API; looked for again at the slowest
            // retry pace, which a kubelet registering the Node will be well within.
            Err(NodeError::Api(kube::Error::Api(status))) if status.code == 404 => {
                self.api_answered().await;
                if !self.node_missing {
                    self.node_missing = true;
                    let name = self.config.node_name.clone();
                    self.decide(DecisionKind::Reconcile, DecisionAction::Failed, |d| {
                        d.reason = Some("node_not_found".into());
                        d.message = Some(format!(
                            "the API has no Node {name:?} (not registered yet, deleted, or the \
                             wrong --node-name); keeping the episode and looking again every \
                             {}s",
                            API_RETRY_MAX.as_secs()
                        ));
                    })
                    .await;
                }
                Err(Next::RetryAt(Instant::now() + API_RETRY_MAX))
            }
            Err(e) => {
                let message = error_chain(&e);
                if !self.api_down {
                    self.api_down = true;
                    self.decide(
                        DecisionKind::Reconcile,
                        DecisionAction::ApiUnreachable,
                        |d| {
                            d.message = Some(format!(
                                "{message}; keeping the episode and retrying until the API answers"
                            ));
                        },
                    )
                    .await;
                }
                let at = Instant::now() + self.api_backoff;
                self.api_backoff = (self.api_backoff * 2).min(API_RETRY_MAX);
                Err(Next::RetryAt(at))
            }
        }
    }

    /// The API answered a call: if we said it was down, say it is back.
    async fn api_answered(&mut self) {
        if self.api_down {
            self.api_down = false;
            self.api_backoff = API_RETRY_MIN;
            self.decide(DecisionKind::Reconcile, DecisionAction::ApiReachable, |d| {
                d.message = Some("the API answers again; reconciling the pending episode".into())
            })
            .await;
        }
    }

    async fn handle(&mut self) -> Next {
        // An episode is handled: a later unplug's checks are said again.
        self.offlining_said = None;
        if self.node.is_none() {
            self.decide(DecisionKind::Reconcile, DecisionAction::Skipped, |d| {
                d.reason = Some("no Kubernetes API configured".into())
            })
            .await;
            return Next::Done;
        }
        let node = match self.fetch().await {
            Ok(n) => n,
            Err(next) => return next,
        };
        // The machine is read after the Node, never before a wait: a snapshot taken before
        // an API call that hung would be compared, minutes later, with a fresh Node.
        let Some(machine) = self.snapshot() else {
            return Next::RetryAt(Instant::now() + API_RETRY_MAX);
        };
        let advertised = match reconcile::advertised(&node) {
            Ok(a) => a,
            Err(e) => {
                self.decide(DecisionKind::Reconcile, DecisionAction::Failed, |d| {
                    d.message = Some(e.to_string())
                })
                .await;
                // The kubelet may not have registered yet; its next update is an event for us
                // only if the machine changes, so look again later.
                return Next::RetryAt(Instant::now() + API_RETRY_MAX);
            }
        };
        let expected = reconcile::expected(&machine);
        let differences = reconcile::differences(&expected, &advertised);
        if differences.is_empty() {
            self.announced = None;
            // Evictions made while the kernel was offlining, and then no restart was needed
            // (the offline failed, or someone else restarted the kubelet): the agent's cordon
            // goes, once nothing is going offline any more.
            if self.shrink_cordon
                && !machine
                    .memory_blocks
                    .iter()
                    .any(|b| b.state == capacity::BlockState::GoingOffline)
            {
                let _ = self.lift_shrink_cordon().await;
            }
            self.decide(DecisionKind::Reconcile, DecisionAction::InSync, |d| {
                d.advertised = Some(advertised.clone())
            })
            .await;
            self.condition(
                &node,
                false,
                "CapacityInSync",
                "the Node advertises the machine's capacity",
            )
            .await;
            return Next::Done;
        }
        let summary = differences.join("; ");
        self.decide(DecisionKind::Reconcile, DecisionAction::Stale, |d| {
            d.advertised = Some(advertised.clone());
            d.differences = differences.clone();
        })
        .await;
        if self.announced.as_deref() != Some(summary.as_str()) {
            self.event(
                EventType::Normal,
                "CapacityChanged",
                &format!("machine capacity changed, Node is stale: {summary}"),
            )
            .await;
            self.condition(&node, true, "CapacityStale", &summary).await;
            self.announced = Some(summary.clone());
        }
        self.refresh(&node, &machine, advertised, &summary).await
    }

    /// The refresh with the fleet budget's slots given back once it is over (verify
    /// finished, or it stopped short).
    async fn refresh(
        &mut self,
        node: &Node,
        machine: &Snapshot,
        before: Advertised,
        summary: &str,
    ) -> Next {
        let next = self
            .refresh_within_budget(node, machine, before, summary)
            .await;
        // The agent's cordon for a shrink's evictions goes once the restart is over, whatever
        // its outcome (the failure was said): never left behind.
        let _ = self.lift_shrink_cordon().await;
        self.pods_before = None;
        self.release_slots().await;
        next
    }

    /// Whether the guard rails (minimum interval, back-off, hourly cap) let a restart
    /// start now; if not, the `deferred` record says why and until when.
    async fn guard_allows(&mut self, now: Instant, backend: &'static str) -> Result<(), Next> {
        let Err(deferred) = self.guard.check(now) else {
            return Ok(());
        };
        let wait = deferred.until.saturating_duration_since(now);
        self.decide(DecisionKind::Refresh, DecisionAction::Deferred, |d| {
            d.backend = Some(backend.into());
            d.reason = Some(deferred.reason.into());
            d.until = Some(crate::record::rfc3339_in(wait));
        })
        .await;
        Err(Next::RetryAt(deferred.until))
    }

    async fn refresh_within_budget(
        &mut self,
        node: &Node,
        machine: &Snapshot,
        before: Advertised,
        summary: &str,
    ) -> Next {
        let backend = self.config.backend.name();
        if crate::node::paused(node) {
            self.decide(DecisionKind::Refresh, DecisionAction::Skipped, |d| {
                d.backend = Some(backend.into());
                d.reason = Some("paused".into());
                d.message = Some(format!(
                    "the Node carries {}: report only until it is removed",
                    crate::node::PAUSE_KEY
                ));
            })
            .await;
            return Next::Done;
        }
        if self.upstream_resize {
            let message = upstream_message(&self.config.kubelet_config);
            self.decide(DecisionKind::Refresh, DecisionAction::Skipped, |d| {
                d.backend = Some(backend.into());
                d.reason = Some(crate::upstream::REASON.into());
                d.message = Some(message);
            })
            .await;
            return Next::Done;
        }
        if matches!(self.config.backend, Backend::None) {
            self.decide(DecisionKind::Refresh, DecisionAction::Skipped, |d| {
                d.backend = Some(backend.into());
                d.reason = Some("report_only".into());
            })
            .await;
            return Next::Done;
        }
        let now = Instant::now();
        // From here on, every capacity the machine goes through is one the kubelet may read
        // when it starts: verify accepts any of them (episode.rs, `Seen`).
        let window = self.window.open(machine.summary());
        // Read before anything restarts the kubelet: verify checks how far it moved.
        let cgroup_file = verify::pods_limit_file(&self.config.cgroup_root);
        let cgroup_before = cgroup_file
            .as_deref()
            .and_then(|f| verify::read_limit(f).ok().flatten());
        let blocking = self.static_policy_blocks(node, machine).await;
        if let Blocking::Stop(next) = blocking {
            return next;
        }
        // A restart on a smaller machine the pods would not fit: refused, or evictions first.
        let mut evictions = match self.shrink_gate(node, machine, &blocking).await {
            Ok(e) => e,
            Err(next) => return next,
        };
        // The agent is about to change the Node (a restart, a drain): its capacity as first
        // seen goes on it before, once.
        if let Err(next) = self.annotate_initial_capacity(node).await {
            return next;
        }
        self.pods_before = self.pods_before_restart().await;
        // A new restart: pods failed from here on are its own (the list above has those
        // failed before it), not the last one's.
        self.admissions = None;
        let reset = match blocking {
            Blocking::No => false,
            Blocking::Stop(next) => return next,
            Blocking::Reset(mut blocked) => {
                // The reset restarts the kubelet itself; it counts against the guard rails too.
                if let Err(next) = self.guard_allows(now, backend).await {
                    return next;
                }
                if let Err(next) = self
                    .take_slots(&[fleet::Action::Drain, fleet::Action::Restart])
                    .await
                {
                    return next;
                }
                // One drain: the pods the smaller machine has no room for go with the pinned
                // ones (the plan already counted those as gone).
                if let Some(evictions) = evictions.take() {
                    blocked.pods.extend(evictions.uids());
                }
                self.guard.started(now);
                if let Err(next) = self.drain_and_reset(node, blocked).await {
                    self.guard.finished(Instant::now(), false);
                    return next;
                }
                true
            }
            Blocking::Rewrite(planned, checked, _) => {
                if let Err(next) = self.guard_allows(now, backend).await {
                    return next;
                }
                if let Err(next) = self.take_slots(restart_slots(&evictions)).await {
                    return next;
                }
                // The pinned pods stay where the rewrite keeps them; the others the smaller
                // machine has no room for go first.
                if let Some(evictions) = evictions.take()
                    && let Err(next) = self.evict_for_shrink(node, evictions).await
                {
                    return next;
                }
                self.guard.started(now);
                if let Err(next) = self.update_in_place(node, planned, &checked).await {
                    self.guard.finished(Instant::now(), false);
                    return next;
                }
                true
            }
        };
        if reset {
            return self
                .verify(before, window, cgroup_file, cgroup_before, now)
                .await;
        }
        if let Err(next) = self.guard_allows(now, backend).await {
            return next;
        }
        let taken = match self.take_slots(restart_slots(&evictions)).await {
            Ok(taken) => taken,
            Err(next) => return next,
        };
        if let Some(evictions) = evictions
            && let Err(next) = self.evict_for_shrink(node, evictions).await
        {
            return next;
        }
        self.guard.started(now);
        let shrink = self.shrink_checked.take();
        self.decide(DecisionKind::Refresh, DecisionAction::Started, |d| {
            d.backend = Some(backend.into());
            d.fleet = taken.into_iter().last();
            d.shrink = shrink;
        })
        .await;
        let started = Instant::now();
        match refresh::refresh(&self.config.backend).await {
            Ok(outcome) => {
                self.decide(DecisionKind::Refresh, DecisionAction::Succeeded, |d| {
                    d.backend = Some(backend.into());
                    d.duration_ms = Some(outcome.duration.as_millis() as u64);
                    d.message = Some(outcome.detail.clone());
                })
                .await;
                self.event(
                    EventType::Normal,
                    "KubeletRefreshed",
                    &format!("{backend} refresh done to pick up: {summary}"),
                )
                .await;
            }
            Err(e) => {
                let message = error_chain(&e);
                self.guard.finished(Instant::now(), false);
                let retry = Instant::now() + self.guard.backoff().unwrap_or(API_RETRY_MAX);
                self.decide(DecisionKind::Refresh, DecisionAction::Failed, |d| {
                    d.backend = Some(backend.into());
                    d.duration_ms = Some(started.elapsed().as_millis() as u64);
                    d.message = Some(message.clone());
                })
                .await;
                let message = format!("{backend} refresh failed: {message}");
                self.warn(node, "KubeletRefreshFailed", "RefreshFailed", &message)
                    .await;
                return Next::RetryAt(retry);
            }
        }
        self.verify(before, window, cgroup_file, cgroup_before, started)
            .await
    }

    async fn verify(
        &mut self,
        before: Advertised,
        window: OpenWindow,
        cgroup_file: Option<PathBuf>,
        cgroup_before: Option<u64>,
        started: Instant,
    ) -> Next {
        let root = self.config.pipeline.root.clone();
        if let Ok(now) = capacity::read_summary(&root) {
            window.widen(now);
        }
        let timeout = self.config.verify_timeout;
        let api = self
            .node
            .as_mut()
            .expect("verify is only called with a client");
        // The machine is re-read at every Node update. The Node converged when it shows the
        // machine as it is now, or as it was at some instant since the refresh began: a
        // kubelet that started while a CPU went away (or while blocks were still coming
        // online) advertises what it read then, and waiting for it to show the machine of
        // *now* would wait forever. The change since is the next episode's work.
        let result = api
            .wait_until(timeout, |n| {
                let Ok(adv) = reconcile::advertised(n) else {
                    return false;
                };
                capacity::read_snapshot(&root).is_ok_and(|m| {
                    window.widen(m.summary());
                    reconcile::differences(&reconcile::expected(&m), &adv).is_empty()
                        || could_have_seen(&window.seen(), &m, &adv, &before)
                })
            })
            .await;
        let moved = !window.seen().is_point();
        drop(window);
        let elapsed = started.elapsed().as_millis() as u64;
        match result {
            Ok(Some(node)) => {
                let after = reconcile::advertised(&node).ok();
                let cgroup = cgroup_file.map(|f| {
                    let now = verify::read_limit(&f).ok().flatten();
                    let delta = match (
                        before.allocatable_memory_bytes,
                        after.as_ref().and_then(|a| a.allocatable_memory_bytes),
                    ) {
                        (Some(b), Some(a)) => Some(a as i64 - b as i64),
                        _ => None,
                    };
                    verify::check(&f, cgroup_before, now, delta)
                });
                let cgroup_ok = cgroup.as_ref().is_none_or(|c| c.ok);
                let rejected = self.rejected_since_restart().await;
                self.guard.finished(Instant::now(), true);
                self.announced = None;
                // Converged on what the kubelet read, while the machine kept moving: the Node
                // is right for that instant and stale for now, so reconcile again at once.
                let behind = moved
                    && match (self.snapshot(), &after) {
                        (Some(m), Some(a)) => {
                            !reconcile::differences(&reconcile::expected(&m), a).is_empty()
                        }
                        _ => false,
                    };
                self.decide(DecisionKind::Verify, DecisionAction::Converged, |d| {
                    d.advertised = Some(before.clone());
                    d.advertised_after = after.clone();
                    d.duration_ms = Some(elapsed);
                    d.cgroup = cgroup.clone();
                    d.rejected_pods = rejected.clone();
                    if behind {
                        d.reason = Some("machine_moved".into());
                        d.message = Some(
                            "the kubelet read the machine while it was still changing; \
                             reconciling again"
                                .into(),
                        );
                    }
                })
                .await;
                let message = format!(
                    "Node capacity converged: memory {} -> {}, cpu {} -> {}",
                    show(before.memory_bytes),
                    show(after.as_ref().and_then(|a| a.memory_bytes)),
                    show(before.cpu_millis.map(|m| m / 1000)),
                    show(after.as_ref().and_then(|a| a.cpu_millis).map(|m| m / 1000)),
                );
                self.event(EventType::Normal, "CapacityConverged", &message)
                    .await;
                self.warn_rejected(&rejected).await;
                if let Some(before) = self.pods_before.take() {
                    let reporter = admission::Reporter {
                        api: self
                            .node
                            .clone()
                            .expect("verify is only called with a client"),
                        log: self.log.clone(),
                        root: self.config.pipeline.root.clone(),
                        episode: self.episode,
                    };
                    self.admissions = Some(admission::watch(reporter, before));
                }
                if !cgroup_ok {
                    let c = cgroup.as_ref().expect("checked");
                    let warn = format!(
                        "the pods' cgroup limit {} did not move with allocatable ({:?} -> {:?})",
                        c.path, c.before, c.after
                    );
                    self.event(EventType::Warning, "PodsCgroupLimitStale", &warn)
                        .await;
                }
                self.condition(
                    &node,
                    !cgroup_ok,
                    if cgroup_ok {
                        "CapacityInSync"
                    } else {
                        "PodsCgroupLimitStale"
                    },
                    &message,
                )
                .await;
                if behind {
                    Next::RetryAt(Instant::now())
                } else {
                    Next::Done
                }
            }
            Ok(None) => {
                self.guard.finished(Instant::now(), false);
                let retry = Instant::now() + self.guard.backoff().unwrap_or(API_RETRY_MAX);
                self.decide(DecisionKind::Verify, DecisionAction::Timeout, |d| {
                    d.advertised = Some(before.clone());
                    d.duration_ms = Some(elapsed);
                    d.message = Some(format!("the Node did not converge within {timeout:?}"));
                })
                .await;
                let message = format!(
                    "the Node did not advertise the machine's capacity within {timeout:?} after the refresh"
                );
                match self.fetch().await {
                    Ok(node) => {
                        self.warn(
                            &node,
                            "CapacityNotConverged",
                            "RefreshNotConverged",
                            &message,
                        )
                        .await
                    }
                    // No Node to set the condition on: the Event at least.
                    Err(_) => {
                        self.event(EventType::Warning, "CapacityNotConverged", &message)
                            .await
                    }
                }
                Next::RetryAt(retry)
            }
            Err(e) => {
                let message = error_chain(&e);
                self.decide(DecisionKind::Verify, DecisionAction::Failed, |d| {
                    d.message = Some(message)
                })
                .await;
                Next::RetryAt(Instant::now() + API_RETRY_MIN)
            }
        }
    }

    /// Writes [`crate::node::INITIAL_CAPACITY_ANNOTATION`] unless the Node has it. If the
    /// API does not answer, nothing changes yet: the hint must precede the change, so the
    /// refresh waits (`refresh` `deferred`, reason `initial_capacity`) and is tried again.
    /// If the API answers no (RBAC without `nodes` `patch`, an admission webhook), waiting
    /// would wait for ever: said once (a Warning Event, and on stderr), and the agent
    /// carries on without the hint; it is tried again before each change.
    async fn annotate_initial_capacity(&mut self, node: &Node) -> Result<(), Next> {
        let Some(value) = crate::node::initial_capacity(node) else {
            return Ok(());
        };
        let api = self
            .node
            .as_ref()
            .expect("refresh is only called with a client");
        match api
            .annotate(crate::node::INITIAL_CAPACITY_ANNOTATION, &value)
            .await
        {
            Ok(()) => {
                self.initial_capacity_refused = false;
                Ok(())
            }
            Err(NodeError::Api(kube::Error::Api(status))) if is_refusal(status.code) => {
                if !self.initial_capacity_refused {
                    self.initial_capacity_refused = true;
                    let message = format!(
                        "the API refused {} on the Node ({} {}: {}); carrying on without this \
                         hint for the Cluster Autoscaler",
                        crate::node::INITIAL_CAPACITY_ANNOTATION,
                        status.code,
                        status.reason,
                        status.message
                    );
                    tracing::warn!("{message}");
                    self.event(EventType::Warning, "InitialCapacityNotAnnotated", &message)
                        .await;
                }
                Ok(())
            }
            Err(e) => {
                let message = format!(
                    "writing {} before the first change: {}",
                    crate::node::INITIAL_CAPACITY_ANNOTATION,
                    error_chain(&e)
                );
                let wait = self.api_backoff;
                self.api_backoff = (self.api_backoff * 2).min(API_RETRY_MAX);
                let backend = self.config.backend.name();
                self.decide(DecisionKind::Refresh, DecisionAction::Deferred, |d| {
                    d.backend = Some(backend.into());
                    d.reason = Some("initial_capacity".into());
                    d.message = Some(message);
                    d.until = Some(crate::record::rfc3339_in(wait));
                })
                .await;
                Err(Next::RetryAt(Instant::now() + wait))
            }
        }
    }

    /// The kubelet's static CPU or memory manager: a restart would crash-loop it.
    async fn static_policy_blocks(&mut self, node: &Node, machine: &Snapshot) -> Blocking {
        let verdicts = match checkpoint::check(&self.config.kubelet_root, machine) {
            Ok(v) => v,
            Err(e) => {
                let message = format!(
                    "cannot read the kubelet's checkpoints, not restarting blind: {}",
                    error_chain(&e)
                );
                self.decide(DecisionKind::Refresh, DecisionAction::Skipped, |d| {
                    d.reason = Some("checkpoint_unreadable".into());
                    d.message = Some(message.clone());
                })
                .await;
                self.warn(
                    node,
                    "KubeletCheckpointUnreadable",
                    "KubeletCheckpointUnreadable",
                    &message,
                )
                .await;
                return Blocking::Stop(Next::Done);
            }
        };
        let mut reasons = Vec::new();
        let mut blocked = reset::Blocked {
            checkpoints: Vec::new(),
            pods: Vec::new(),
        };
        for v in verdicts {
            if let Verdict::Unsafe {
                manager,
                policy,
                path,
                reason,
                pods,
            } = v
            {
                reasons.push(format!("its {manager} manager ({policy}) checkpoint {} no longer matches the machine ({reason})", path.display()));
                blocked.checkpoints.push(path);
                blocked.pods.extend(pods);
            }
        }
        if reasons.is_empty() {
            return Blocking::No;
        }
        if self.config.static_policy == StaticPolicy::DrainAndReset {
            return Blocking::Reset(blocked);
        }
        let mut refused = None;
        if self.config.static_policy == StaticPolicy::UpdateInPlace {
            let root = &self.config.kubelet_root;
            let checked =
                checkpoint::update::Machine::new(machine, checkpoint::update::reserved_cpus(root));
            match update::plan(root, &checked) {
                Ok(planned) if !planned.rewrites.is_empty() => {
                    return Blocking::Rewrite(planned, checked, blocked.pods);
                }
                Ok(_) => refused = Some("nothing to rewrite".to_owned()),
                Err(why) => refused = Some(why.0),
            }
        }
        let message = format!(
            "not restarting the kubelet: {}; a restart would crash-loop it. Drain the node ({} pods hold pinned resources), \
             stop the kubelet, move the checkpoint aside, start the kubelet, uncordon; or run the agent with \
             --static-policy drain-and-reset to have it done",
            reasons.join("; "),
            blocked.pods.len()
        );
        let message = match refused {
            Some(why) => format!("{message} (update-in-place not possible: {why})"),
            None => message,
        };
        self.decide(DecisionKind::Refresh, DecisionAction::Skipped, |d| {
            d.reason = Some("static_policy".into());
            d.message = Some(message.clone());
        })
        .await;
        self.warn(
            node,
            "StaticPolicyBlocksRefresh",
            "StaticPolicyCheckpoint",
            &message,
        )
        .await;
        Blocking::Stop(Next::Done)
    }
}

/// The fleet budgets a restart takes: evictions first take a drain slot, as a
/// drain-and-reset does.
fn restart_slots<T>(evictions: &Option<T>) -> &'static [fleet::Action] {
    if evictions.is_some() {
        &[fleet::Action::Drain, fleet::Action::Restart]
    } else {
        &[fleet::Action::Restart]
    }
}

/// An answer that a retry of the same request will get again: forbidden, invalid, refused
/// by admission. Not 408/409/429 (transient), nor 5xx.
fn is_refusal(code: u16) -> bool {
    matches!(code, 400 | 401 | 403 | 404 | 405 | 415 | 422)
}

/// Whether the checkpoints let a plain restart happen.
enum Blocking {
    No,
    Stop(Next),
    Reset(reset::Blocked),
    /// The rewrite, and the pinned pods (UIDs) it keeps where they are.
    Rewrite(update::Planned, checkpoint::update::Machine, Vec<String>),
}

/// Whether `adv` is what a kubelet that started inside the window could have posted: memory
/// and CPU count within the range the machine went through, the rest as the machine is now,
/// and not simply the Node's old values (a kubelet that has not posted yet).
fn could_have_seen(seen: &Seen, now: &Snapshot, adv: &Advertised, before: &Advertised) -> bool {
    let (Some(memory), Some(millis)) = (adv.memory_bytes, adv.cpu_millis) else {
        return false;
    };
    if !millis.is_multiple_of(1000) || !seen.contains(memory, (millis / 1000) as u32) {
        return false;
    }
    if (adv.memory_bytes, adv.cpu_millis) == (before.memory_bytes, before.cpu_millis) {
        return false;
    }
    let mut then = reconcile::expected(now);
    then.memory_bytes = adv.memory_bytes;
    then.cpu_millis = adv.cpu_millis;
    reconcile::differences(&then, adv).is_empty()
}

/// Why the agent only reports where the kubelet resizes the Node itself.
fn upstream_message(config: &std::path::Path) -> String {
    format!(
        "{} turns on the kubelet's {} feature gate: the kubelet resizes the Node itself, \
         so the agent reports and does not restart it",
        config.display(),
        crate::upstream::FEATURE_GATE
    )
}

fn show(v: Option<u64>) -> String {
    v.map_or_else(|| "?".into(), |v| v.to_string())
}
