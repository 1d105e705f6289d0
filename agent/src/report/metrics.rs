//! Metrics and health, derived from the record stream itself: whatever the event log says
//! is what `/metrics`, `/healthz` and `/readyz` say, with no second bookkeeping.
//!
//! `/healthz`: the process answers. `/readyz`: every source listens (the `ready` record)
//! and, in `run` mode, the first reconcile was tried; an unreachable API makes it 503 only
//! after [`readiness::API_UNREADY_AFTER`] (readiness.rs says why).
//!
//! Capacities carry their unit as a label, as kube-state-metrics does
//! (`kube_node_status_capacity{resource,unit}`): `memory` in `byte`, `cpu` in `core`, and
//! exact (a Node advertising `1500m` reads 1.5). `/metrics` answers in OpenMetrics to a
//! client that asks for it (Prometheus does), else in the Prometheus text format 0.0.4
//! (what `curl` and `promtool check metrics` read).
use crate::record::{AgentAction, DecisionAction, DecisionKind};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use hyper::{Request, Response};
use prometheus_client::{
    encoding::{EncodeLabelSet, prometheus_text, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};

use super::{
    http::{self, Body, Limits},
    source_metrics::{self, SourceCounters},
};
use crate::{record::Record, sources::Counters};

/// Buckets of the refresh and verify durations: fine below a few seconds (a kubelet restart
/// over D-Bus), and past the 2-minute default of `--refresh-timeout` and
/// `--verify-timeout`, so that a timeout is its own bucket and not lost in `+Inf`.
const SLOW_BUCKETS: [f64; 16] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    source: String,
    kind: String,
    action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefreshLabels {
    backend: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResourceLabels {
    resource: String,
    /// `byte` or `core`, kube-state-metrics' units.
    unit: String,
}

impl ResourceLabels {
    fn memory() -> Self {
        Self {
            resource: "memory".into(),
            unit: "byte".into(),
        }
    }

    fn cpu() -> Self {
        Self {
            resource: "cpu".into(),
            unit: "core".into(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
    revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutputLabels {
    output: String,
}

/// `loss` reasons of the outputs (sinks.rs): counted as they happen by
/// [`Metrics::output_lost`], not again from the record, and no source's loss.
pub const OUTPUT_LOSS_REASONS: [&str; 4] = [
    "stdout_stalled",
    "stdout_failed",
    "log_file_stalled",
    "log_file_failed",
];

pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    detection: Histogram,
    episodes: Counter,
    refreshes: Family<RefreshLabels, Counter>,
    refresh_seconds: Histogram,
    verify_seconds: Histogram,
    verifications: Family<ResultLabels, Counter>,
    machine: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    advertised: Family<ResourceLabels, Gauge<f64, AtomicU64>>,
    stale: Gauge,
    /// 1 while this node waits for a fleet budget slot (fleet.rs).
    fleet_waiting: Gauge,
    /// Safe shrink (shrink.rs) and the admission check after a restart.
    shrink: ShrinkCounters,
    refresh_failing: Gauge,
    unconverged: Gauge,
    probes_attached: Gauge,
    losses: Family<SourceLabels, Counter>,
    ringbuf_drops: Counter,
    output_lost: Family<OutputLabels, Counter>,
    ready: Gauge,
    api_reachable: Gauge,
    source_counters: SourceCounters,
    /// `/config`: the effective configuration of this process, with each value's source.
    config: std::sync::OnceLock<String>,
    health: Health,
}

#[derive(Default)]
struct ShrinkCounters {
    refusals: Counter,
    evictions: Counter,
    rejected: Counter,
}

/// What `/readyz` needs to know.
#[derive(Default)]
struct Health {
    sources_ready: AtomicBool,
    /// `run` mode: set when the agent starts reconciling; then readiness needs the first
    /// reconcile and a reachable API.
    reconciling: AtomicBool,
    first_reconcile: AtomicBool,
    api: super::readiness::ApiOutage,
    why: Mutex<String>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("hotplug_agent");
        let events = Family::<EventLabels, Counter>::default();
        registry.register(
            "events",
            "Hotplug events recorded, by source, kind and action",
            events.clone(),
        );
        // 10 µs .. ~10 s.
        let detection = Histogram::new(exponential_buckets(0.000_01, 2.0, 21));
        registry.register(
            "detection_latency_seconds",
            "Kernel hook to the agent's record (eBPF records)",
            detection.clone(),
        );
        let episodes = Counter::default();
        registry.register("episodes", "Settled episodes", episodes.clone());
        let refreshes = Family::<RefreshLabels, Counter>::default();
        registry.register(
            "refreshes",
            "Kubelet refreshes by backend and result",
            refreshes.clone(),
        );
        let refresh_seconds = Histogram::new(SLOW_BUCKETS);
        registry.register(
            "refresh_duration_seconds",
            "How long a refresh took",
            refresh_seconds.clone(),
        );
        let verify_seconds = Histogram::new(SLOW_BUCKETS);
        registry.register(
            "verify_duration_seconds",
            "Refresh start to the Node converging",
            verify_seconds.clone(),
        );
        let verifications = Family::<ResultLabels, Counter>::default();
        registry.register(
            "verifications",
            "Verifications after a refresh, by result (converged, timeout, ...)",
            verifications.clone(),
        );
        let machine = Family::<ResourceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "machine_capacity",
            "The machine's capacity, by resource and unit (memory in bytes, cpu in cores)",
            machine.clone(),
        );
        let advertised = Family::<ResourceLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "node_advertised_capacity",
            "What the Node's .status.capacity says, by resource and unit (memory in bytes, cpu in cores)",
            advertised.clone(),
        );
        let stale = Gauge::default();
        registry.register(
            "stale",
            "1 while the Node's capacity is stale or a refresh failed",
            stale.clone(),
        );
        let fleet_waiting = Gauge::default();
        registry.register(
            "fleet_budget_waiting",
            "1 while this node waits for a slot of the fleet's restart or drain budget",
            fleet_waiting.clone(),
        );
        let shrink = ShrinkCounters::default();
        registry.register(
            "shrink_refusals",
            "Kubelet restarts on a smaller machine not done because the pods would not fit (refresh skipped, reason shrink_unsafe)",
            shrink.refusals.clone(),
        );
        registry.register(
            "shrink_evictions",
            "Pods evicted so that the others fit a smaller machine before the kubelet restart (--shrink-policy evict)",
            shrink.evictions.clone(),
        );
        registry.register(
            "pods_rejected_after_restart",
            "Pods the restarted kubelet failed at admission (OutOfcpu, OutOfmemory, UnexpectedAdmissionError, ...)",
            shrink.rejected.clone(),
        );
        let refresh_failing = Gauge::default();
        registry.register(
            "refresh_failing",
            "1 after a failed refresh, until one succeeds or a reconcile finds the Node in sync",
            refresh_failing.clone(),
        );
        let unconverged = Gauge::default();
        registry.register(
            "unconverged",
            "1 after a verify that did not converge (or left the pods' cgroup limit behind), until one converges or a reconcile finds the Node in sync",
            unconverged.clone(),
        );
        let probes_attached = Gauge::default();
        registry.register(
            "probes_attached",
            "eBPF probes attached",
            probes_attached.clone(),
        );
        let losses = Family::<SourceLabels, Counter>::default();
        registry.register(
            "losses",
            "Detected event losses (uevent overflows, ring buffer drops)",
            losses.clone(),
        );
        let ringbuf_drops = Counter::default();
        registry.register(
            "ringbuf_dropped_records",
            "Records the eBPF ring buffer had no room for",
            ringbuf_drops.clone(),
        );
        let output_lost = Family::<OutputLabels, Counter>::default();
        registry.register(
            "output_lost_records",
            "Records an output (stdout, log_file) could not take: queue full behind a stalled reader, or a failed write",
            output_lost.clone(),
        );
        let build_info = Family::<BuildLabels, Gauge>::default();
        registry.register(
            "build_info",
            "Always 1: the agent's version and the commit it was built from",
            build_info.clone(),
        );
        build_info
            .get_or_create(&BuildLabels {
                version: source_metrics::VERSION.into(),
                revision: source_metrics::REVISION.into(),
            })
            .set(1);
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while /readyz answers 200 (sources listening; run mode: first reconcile tried, the API not unreachable for over 5 minutes)",
            ready.clone(),
        );
        let api_reachable = Gauge::default();
        registry.register(
            "api_reachable",
            "run mode: 1 while the Kubernetes API answered the last reconcile, 0 after api_unreachable",
            api_reachable.clone(),
        );
        // Zero from the start, so that `increase()` in the alert rules sees the first loss:
        // a series that appears at 1 has no increase.
        for source in ["uevent", "ebpf"] {
            drop(losses.get_or_create(&SourceLabels {
                source: source.into(),
            }));
        }
        for output in ["stdout", "log_file"] {
            drop(output_lost.get_or_create(&OutputLabels {
                output: output.into(),
            }));
        }
        let source_counters = SourceCounters::default();
        registry.register_collector(Box::new(source_counters.clone()));
        Arc::new(Self {
            registry,
            verifications,
            refresh_failing,
            unconverged,
            ready,
            api_reachable,
            source_counters,
            config: std::sync::OnceLock::new(),
            events,
            detection,
            episodes,
            refreshes,
            refresh_seconds,
            verify_seconds,
            machine,
            advertised,
            stale,
            fleet_waiting,
            shrink,
            probes_attached,
            losses,
            ringbuf_drops,
            output_lost,
            health: Health::default(),
        })
    }

    /// `n` records that `output` (`stdout`, `log_file`) could not take.
    pub fn output_lost(&self, output: &str, n: u64) {
        self.output_lost
            .get_or_create(&OutputLabels {
                output: output.into(),
            })
            .inc_by(n);
    }

    /// What `/config` serves: `hotplug-agent config`'s description of this process's own
    /// settings. Set once at start-up.
    pub fn set_config(&self, description: String) {
        let _ = self.config.set(description);
    }

    /// The pipeline's source counters, read at every scrape.
    pub fn attach_counters(&self, counters: Arc<Counters>) {
        self.source_counters.attach(counters);
    }

    /// `run` mode: readiness also waits for the first reconcile.
    pub fn expect_reconcile(&self) {
        self.health.reconciling.store(true, Ordering::Relaxed);
    }

    fn set_machine(&self, memory: u64, cpus: u32) {
        self.machine
            .get_or_create(&ResourceLabels::memory())
            .set(memory as f64);
        self.machine
            .get_or_create(&ResourceLabels::cpu())
            .set(f64::from(cpus));
    }

    pub fn observe(&self, record: &Record) {
        match record {
            Record::Event(e) => {
                let labels = EventLabels {
                    source: e.source.as_str().into(),
                    kind: e.kind.as_str().into(),
                    action: e.action.as_str().into(),
                };
                self.events.get_or_create(&labels).inc();
                if let Some(ns) = e.delivery_ns {
                    self.detection.observe(ns as f64 / 1e9);
                }
                self.set_machine(e.capacity.memory_bytes, e.capacity.cpus_online);
            }
            Record::Agent(a) => {
                self.set_machine(a.capacity.memory_bytes, a.capacity.cpus_online);
                match a.action {
                    AgentAction::Ready => {
                        self.probes_attached
                            .set(a.probes.iter().filter(|p| p.attached).count() as i64);
                        let off: Vec<&str> = a
                            .sources
                            .iter()
                            .filter(|s| !s.listening)
                            .map(|s| s.name.as_str())
                            .collect();
                        // A source that could not start is reported, not a reason to be unready:
                        // the agent runs on what it has (it says which in the ready record).
                        self.health
                            .sources_ready
                            .store(a.sources.iter().any(|s| s.listening), Ordering::Relaxed);
                        if !off.is_empty() {
                            self.set_why(format!("sources off: {}", off.join(", ")));
                        }
                    }
                    // An output's loss: already counted by `output_lost`.
                    AgentAction::Loss
                        if a.reason
                            .as_deref()
                            .is_some_and(|r| OUTPUT_LOSS_REASONS.contains(&r)) => {}
                    AgentAction::Loss => {
                        let source = a.source.map_or("unknown", |s| s.as_str());
                        self.losses
                            .get_or_create(&SourceLabels {
                                source: source.into(),
                            })
                            .inc();
                        if let Some(lost) = a.lost {
                            self.ringbuf_drops.inc_by(lost);
                        }
                    }
                    _ => {}
                }
            }
            Record::Decision(d) => self.observe_decision(d),
        }
    }

    fn observe_decision(&self, d: &crate::record::DecisionRecord) {
        let advertised = |adv: &crate::record::Advertised| {
            if let Some(m) = adv.memory_bytes {
                self.advertised
                    .get_or_create(&ResourceLabels::memory())
                    .set(m as f64);
            }
            if let Some(c) = adv.cpu_millis {
                // Exact: 1500m is 1.5 cores, not 1.
                self.advertised
                    .get_or_create(&ResourceLabels::cpu())
                    .set(c as f64 / 1000.0);
            }
        };
        match (d.kind, d.action, d.reason.as_deref()) {
            (DecisionKind::Refresh, DecisionAction::Skipped, Some("shrink_unsafe")) => {
                self.shrink.refusals.inc();
            }
            (DecisionKind::Reset, DecisionAction::Evicted, Some("shrink")) => {
                self.shrink.evictions.inc();
            }
            (DecisionKind::Verify, _, _) => {
                self.shrink.rejected.inc_by(d.rejected_pods.len() as u64);
            }
            _ => {}
        }
        match (d.kind, d.action, d.reason.as_deref()) {
            (DecisionKind::Refresh, DecisionAction::Deferred, Some("fleet_budget")) => {
                self.fleet_waiting.set(1);
            }
            (DecisionKind::Refresh, _, _)
            | (DecisionKind::Reconcile, DecisionAction::InSync, _)
            | (DecisionKind::Reset, DecisionAction::Started, _) => {
                self.fleet_waiting.set(0);
            }
            _ => {}
        }
        match (d.kind, d.action) {
            (DecisionKind::Episode, DecisionAction::Settled)
                if d.trigger.as_deref() == Some("events") =>
            {
                self.episodes.inc();
            }
            (DecisionKind::Reconcile, action) => {
                self.health.first_reconcile.store(true, Ordering::Relaxed);
                self.health.api.observe(
                    action != DecisionAction::ApiUnreachable,
                    std::time::Instant::now(),
                );
                self.api_reachable
                    .set(i64::from(action != DecisionAction::ApiUnreachable));
                if let Some(a) = &d.advertised {
                    advertised(a);
                }
                match action {
                    DecisionAction::InSync => {
                        self.stale.set(0);
                        self.refresh_failing.set(0);
                        self.unconverged.set(0);
                    }
                    DecisionAction::Stale => {
                        self.stale.set(1);
                    }
                    _ => {}
                }
            }
            (
                DecisionKind::Refresh,
                action @ (DecisionAction::Succeeded
                | DecisionAction::Failed
                | DecisionAction::Skipped
                | DecisionAction::Deferred),
            ) => {
                let backend = d.backend.clone().unwrap_or_else(|| "none".into());
                self.refreshes
                    .get_or_create(&RefreshLabels {
                        backend,
                        result: action.as_str().into(),
                    })
                    .inc();
                if action == DecisionAction::Failed {
                    self.refresh_failing.set(1);
                } else if action == DecisionAction::Succeeded {
                    self.refresh_failing.set(0);
                }

                if let Some(ms) = d.duration_ms.filter(|_| action != DecisionAction::Skipped) {
                    self.refresh_seconds.observe(ms as f64 / 1000.0);
                }
            }
            // A late word on a verify already counted (run/admission.rs): its pods are
            // counted above, the verify and the gauges stay as that verify left them.
            (DecisionKind::Verify, _)
                if d.reason.as_deref() == Some("rejected_after_convergence") => {}
            (DecisionKind::Verify, action) => {
                if let Some(a) = &d.advertised_after {
                    advertised(a);
                }
                if let Some(ms) = d.duration_ms {
                    self.verify_seconds.observe(ms as f64 / 1000.0);
                }
                self.verifications
                    .get_or_create(&ResultLabels {
                        result: action.as_str().into(),
                    })
                    .inc();
                let stale =
                    action != DecisionAction::Converged || d.cgroup.as_ref().is_some_and(|c| !c.ok);
                self.stale.set(i64::from(stale));
                self.unconverged.set(i64::from(stale));
            }
            _ => {}
        }
    }

    fn set_why(&self, why: String) {
        if let Ok(mut w) = self.health.why.lock() {
            *w = why;
        }
    }

    /// Ready, or why not.
    pub fn ready(&self) -> Result<(), super::readiness::NotReady> {
        use super::readiness::NotReady;
        let h = &self.health;
        if !h.sources_ready.load(Ordering::Relaxed) {
            return Err(NotReady::SourcesNotListening);
        }
        if h.reconciling.load(Ordering::Relaxed) {
            if !h.first_reconcile.load(Ordering::Relaxed) {
                return Err(NotReady::FirstReconcilePending);
            }
            h.api.check(std::time::Instant::now())?;
        }
        Ok(())
    }

    /// While the API is unreachable but within the grace: what `/readyz` adds to `ready`.
    pub fn ready_note(&self) -> Option<super::readiness::ApiUnreachableFor> {
        self.health
            .api
            .check(std::time::Instant::now())
            .ok()
            .flatten()
    }

    /// Running: every source that could start listens and (in `run` mode) the first
    /// reconcile was tried, whether or not the API answered. What systemd's READY=1 waits
    /// for: an agent without its API still records events, and must not be killed by the
    /// start timeout and restarted in a loop for it; `/readyz` tells the API apart.
    pub fn running(&self) -> bool {
        let h = &self.health;
        h.sources_ready.load(Ordering::Relaxed)
            && (!h.reconciling.load(Ordering::Relaxed) || h.first_reconcile.load(Ordering::Relaxed))
    }

    /// OpenMetrics 1.0.0.
    pub fn render(&self) -> String {
        self.refresh_ready();
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text format 0.0.4.
    pub fn render_text(&self) -> String {
        self.refresh_ready();
        let mut out = String::new();
        let _ = prometheus_text::encode(&mut out, &self.registry);
        out
    }

    fn refresh_ready(&self) {
        self.ready.set(i64::from(self.ready().is_ok()));
    }
}

/// Whether the client's `Accept` asks for OpenMetrics (Prometheus' scrapes do).
fn wants_openmetrics(req: &Request<hyper::body::Incoming>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

fn handle(m: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/metrics" if wants_openmetrics(req) => http::text(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.render(),
        ),
        "/metrics" => http::text(200, prometheus_text::CONTENT_TYPE, m.render_text()),
        "/healthz" => http::text(200, "text/plain", "ok\n"),
        "/config" => match m.config.get() {
            Some(c) => http::text(200, "text/plain; charset=utf-8", c.clone()),
            None => http::text(404, "text/plain", "this process serves no configuration\n"),
        },
        "/readyz" => match m.ready() {
            Ok(()) => match m.ready_note() {
                Some(note) => http::text(200, "text/plain", format!("ready; {note}\n")),
                None => http::text(200, "text/plain", "ready\n"),
            },
            Err(why) => http::text(503, "text/plain", format!("not ready: {why}\n")),
        },
        _ => http::text(
            404,
            "text/plain",
            "try /metrics, /healthz, /readyz, /config\n",
        ),
    }
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr` with the default limits, until
/// the runtime ends.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: &str,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let (_never, shutdown) = watch::channel(false);
    serve_with(metrics, addr, Limits::default(), shutdown).await
}

/// [`serve`] with chosen limits, until `shutdown` says true.
pub async fn serve_with(
    metrics: Arc<Metrics>,
    addr: &str,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    serve_on(metrics, TcpListener::bind(addr).await?, limits, shutdown)
}

/// [`serve_with`] on a listener already bound (a test's port 0).
pub fn serve_on(
    metrics: Arc<Metrics>,
    listener: TcpListener,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let name = listener.local_addr()?.to_string();
    let handler: http::Handler = Arc::new(move |req: Request<hyper::body::Incoming>| {
        let r = handle(&metrics, &req);
        Box::pin(async move { r })
    });
    Ok(tokio::spawn(http::serve(
        listener, name, limits, handler, shutdown,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        capacity::Summary,
        record::{Advertised, AgentRecord, DecisionRecord},
    };

    /// The value of the sample `key` (name and labels, as rendered).
    fn sample(text: &str, key: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    }

    fn machine(memory_bytes: u64, cpus_online: u32) -> Summary {
        Summary {
            memory_bytes,
            cpus_online,
        }
    }

    #[test]
    fn capacities_carry_their_unit_and_cpu_is_exact() {
        let m = Metrics::new();
        m.observe(&Record::Agent(Box::new(AgentRecord::new(
            AgentAction::Ready,
            machine(3 << 30, 2),
        ))));
        let mut d = DecisionRecord::new(
            DecisionKind::Reconcile,
            DecisionAction::Stale,
            machine(3 << 30, 2),
            1,
        );
        d.advertised = Some(Advertised {
            memory_bytes: Some(2 << 30),
            cpu_millis: Some(1500),
            ..Advertised::default()
        });
        m.observe(&Record::Decision(Box::new(d)));
        let text = m.render_text();
        let cpu = r#"hotplug_agent_node_advertised_capacity{resource="cpu",unit="core"}"#;
        assert_eq!(sample(&text, cpu), Some(1.5), "{text}");
        let mem = r#"hotplug_agent_machine_capacity{resource="memory",unit="byte"}"#;
        assert_eq!(sample(&text, mem), Some(f64::from(3u32 << 30)), "{text}");
        assert_eq!(sample(&text, "hotplug_agent_stale"), Some(1.0));
    }

    #[test]
    fn build_info_names_the_version_and_revision() {
        let text = Metrics::new().render();
        let key = format!(
            r#"hotplug_agent_build_info{{version="{}",revision="{}"}}"#,
            source_metrics::VERSION,
            source_metrics::REVISION
        );
        assert_eq!(sample(&text, &key), Some(1.0), "{text}");
        assert!(!source_metrics::REVISION.is_empty());
    }

    #[test]
    fn the_sources_counters_are_read_at_scrape_time() {
        let m = Metrics::new();
        let before = m.render_text();
        assert_eq!(
            sample(&before, "hotplug_agent_uevents_malformed_total"),
            Some(0.0),
            "present, at 0, before the pipeline starts:\n{before}"
        );
        let counters = Arc::new(Counters::default());
        m.attach_counters(counters.clone());
        counters.uevents_malformed.store(3, Ordering::Relaxed);
        counters.probe_malformed.store(2, Ordering::Relaxed);
        counters.uevent_seqnum_gaps.store(5, Ordering::Relaxed);
        let text = m.render();
        for (key, want) in [
            ("hotplug_agent_uevents_malformed_total", 3.0),
            ("hotplug_agent_ringbuf_undecodable_records_total", 2.0),
            ("hotplug_agent_uevent_seqnum_gaps_total", 5.0),
        ] {
            assert_eq!(sample(&text, key), Some(want), "{key} in\n{text}");
        }
    }

    #[test]
    fn slow_buckets_cover_the_two_minute_timeouts() {
        let m = Metrics::new();
        let mut d = DecisionRecord::new(
            DecisionKind::Verify,
            DecisionAction::Timeout,
            machine(1, 1),
            1,
        );
        d.duration_ms = Some(120_000);
        m.observe(&Record::Decision(Box::new(d)));
        let text = m.render_text();
        let le = |b: &str| {
            sample(
                &text,
                &format!(r#"hotplug_agent_verify_duration_seconds_bucket{{le="{b}"}}"#),
            )
        };
        assert_eq!(le("90"), Some(0.0), "{text}");
        assert_eq!(le("120"), Some(1.0), "{text}");
        assert_eq!(sample(&text, "hotplug_agent_unconverged"), Some(1.0));
        let key = r#"hotplug_agent_verifications_total{result="timeout"}"#;
        assert_eq!(sample(&text, key), Some(1.0), "{text}");
    }

    #[test]
    fn refresh_failing_clears_on_success_or_sync() {
        let m = Metrics::new();
        let refresh = |action: DecisionAction| {
            let mut d = DecisionRecord::new(DecisionKind::Refresh, action, machine(1, 1), 1);
            d.backend = Some("systemd".into());
            Record::Decision(Box::new(d))
        };
        let failing = |m: &Metrics| sample(&m.render_text(), "hotplug_agent_refresh_failing");
        m.observe(&refresh(DecisionAction::Failed));
        assert_eq!(failing(&m), Some(1.0));
        m.observe(&refresh(DecisionAction::Deferred));
        assert_eq!(failing(&m), Some(1.0), "a deferral is no success");
        m.observe(&refresh(DecisionAction::Succeeded));
        assert_eq!(failing(&m), Some(0.0));
        m.observe(&refresh(DecisionAction::Failed));
        let sync = DecisionRecord::new(
            DecisionKind::Reconcile,
            DecisionAction::InSync,
            machine(1, 1),
            2,
        );
        m.observe(&Record::Decision(Box::new(sync)));
        assert_eq!(failing(&m), Some(0.0));
    }

    #[test]
    fn shrink_refusals_evictions_and_rejected_pods_are_counted() {
        let m = Metrics::new();
        let get = |m: &Metrics, key: &str| sample(&m.render_text(), key);
        assert_eq!(get(&m, "hotplug_agent_shrink_refusals_total"), Some(0.0));
        let decision = |kind, action, reason: &str| {
            let mut d = DecisionRecord::new(kind, action, machine(1, 1), 1);
            d.reason = Some(reason.into());
            d
        };
        let skipped = decision(
            DecisionKind::Refresh,
            DecisionAction::Skipped,
            "shrink_unsafe",
        );
        m.observe(&Record::Decision(Box::new(skipped)));
        // Another skip is not a shrink refusal; a static policy reset's eviction is not a
        // shrink's.
        let paused = decision(DecisionKind::Refresh, DecisionAction::Skipped, "paused");
        m.observe(&Record::Decision(Box::new(paused)));
        for reason in ["shrink", "shrink", "static_policy"] {
            let evicted = decision(DecisionKind::Reset, DecisionAction::Evicted, reason);
            m.observe(&Record::Decision(Box::new(evicted)));
        }
        let mut verify = decision(DecisionKind::Verify, DecisionAction::Converged, "");
        verify.rejected_pods = vec![
            crate::record::RejectedPod::default(),
            crate::record::RejectedPod::default(),
        ];
        m.observe(&Record::Decision(Box::new(verify)));
        assert_eq!(get(&m, "hotplug_agent_shrink_refusals_total"), Some(1.0));
        assert_eq!(get(&m, "hotplug_agent_shrink_evictions_total"), Some(2.0));
        assert_eq!(
            get(&m, "hotplug_agent_pods_rejected_after_restart_total"),
            Some(2.0)
        );
    }

    #[test]
    fn a_pod_rejected_after_convergence_is_counted_and_the_verify_is_not_again() {
        let m = Metrics::new();
        let mut verify = DecisionRecord::new(
            DecisionKind::Verify,
            DecisionAction::Converged,
            machine(1, 1),
            1,
        );
        verify.cgroup = Some(crate::record::CgroupCheck {
            path: "kubepods.slice/memory.max".into(),
            before: Some(1),
            after: Some(1),
            expected_delta: Some(1),
            ok: false,
        });
        m.observe(&Record::Decision(Box::new(verify.clone())));
        let mut late = verify;
        late.cgroup = None;
        late.reason = Some("rejected_after_convergence".into());
        late.rejected_pods = vec![crate::record::RejectedPod::default()];
        m.observe(&Record::Decision(Box::new(late)));
        let text = m.render_text();
        assert_eq!(
            sample(&text, "hotplug_agent_pods_rejected_after_restart_total"),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "hotplug_agent_verifications_total{result=\"converged\"}"
            ),
            Some(1.0),
            "{text}"
        );
        // The stale cgroup the verify found is still said.
        assert_eq!(
            sample(&text, "hotplug_agent_unconverged"),
            Some(1.0),
            "{text}"
        );
    }
}
