//! Metrics and health, derived from the record stream itself: whatever the event log says
//! is what `/metrics`, `/healthz` and `/readyz` say, with no second bookkeeping.
//!
//! `/healthz`: the process answers. `/readyz`: every source listens (the `ready` record)
//! and, in `run` mode, the first reconcile is done and the API answered last time.
use crate::record::{AgentAction, DecisionAction, DecisionKind};
use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, Ordering},
};

use hyper::{Request, Response};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::{net::TcpListener, sync::watch};

use super::http::{self, Body, Limits};
use crate::record::Record;

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
    machine: Family<ResourceLabels, Gauge>,
    advertised: Family<ResourceLabels, Gauge>,
    stale: Gauge,
    /// 1 while this node waits for a fleet budget slot (fleet.rs).
    fleet_waiting: Gauge,
    probes_attached: Gauge,
    losses: Family<SourceLabels, Counter>,
    ringbuf_drops: Counter,
    output_lost: Family<OutputLabels, Counter>,
    health: Health,
}

/// What `/readyz` needs to know.
#[derive(Default)]
struct Health {
    sources_ready: AtomicBool,
    /// `run` mode: set when the agent starts reconciling; then readiness needs the first
    /// reconcile and a reachable API.
    reconciling: AtomicBool,
    first_reconcile: AtomicBool,
    api_down: AtomicBool,
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
        let refresh_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "refresh_duration_seconds",
            "How long a refresh took",
            refresh_seconds.clone(),
        );
        let verify_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 14));
        registry.register(
            "verify_duration_seconds",
            "Refresh start to the Node converging",
            verify_seconds.clone(),
        );
        let machine = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "machine_capacity",
            "The machine's capacity (memory bytes, cpus)",
            machine.clone(),
        );
        let advertised = Family::<ResourceLabels, Gauge>::default();
        registry.register(
            "node_advertised_capacity",
            "What the Node advertises (memory bytes, cpus)",
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
        Arc::new(Self {
            registry,
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

    /// `run` mode: readiness also waits for the first reconcile.
    pub fn expect_reconcile(&self) {
        self.health.reconciling.store(true, Ordering::Relaxed);
    }

    fn set_machine(&self, memory: u64, cpus: u32) {
        self.machine
            .get_or_create(&ResourceLabels {
                resource: "memory".into(),
            })
            .set(memory as i64);
        self.machine
            .get_or_create(&ResourceLabels {
                resource: "cpu".into(),
            })
            .set(i64::from(cpus));
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
                    .get_or_create(&ResourceLabels {
                        resource: "memory".into(),
                    })
                    .set(m as i64);
            }
            if let Some(c) = adv.cpu_millis {
                self.advertised
                    .get_or_create(&ResourceLabels {
                        resource: "cpu".into(),
                    })
                    .set((c / 1000) as i64);
            }
        };
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
                self.health
                    .api_down
                    .store(action == DecisionAction::ApiUnreachable, Ordering::Relaxed);
                if let Some(a) = &d.advertised {
                    advertised(a);
                }
                if let Some(stale) = match action {
                    DecisionAction::InSync => Some(0),
                    DecisionAction::Stale => Some(1),
                    _ => None,
                } {
                    self.stale.set(stale);
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

                if let Some(ms) = d.duration_ms.filter(|_| action != DecisionAction::Skipped) {
                    self.refresh_seconds.observe(ms as f64 / 1000.0);
                }
            }
            (DecisionKind::Verify, action) => {
                if let Some(a) = &d.advertised_after {
                    advertised(a);
                }
                if let Some(ms) = d.duration_ms {
                    self.verify_seconds.observe(ms as f64 / 1000.0);
                }
                let stale =
                    action != DecisionAction::Converged || d.cgroup.as_ref().is_some_and(|c| !c.ok);
                self.stale.set(i64::from(stale));
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
    pub fn ready(&self) -> Result<(), String> {
        let h = &self.health;
        if !h.sources_ready.load(Ordering::Relaxed) {
            return Err("sources not listening yet".into());
        }
        if h.reconciling.load(Ordering::Relaxed) {
            if !h.first_reconcile.load(Ordering::Relaxed) {
                return Err("first reconcile not done yet".into());
            }
            if h.api_down.load(Ordering::Relaxed) {
                return Err("the Kubernetes API is unreachable".into());
            }
        }
        Ok(())
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

    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}

fn handle(m: &Metrics, req: &Request<hyper::body::Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/metrics" => http::text(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.render(),
        ),
        "/healthz" => http::text(200, "text/plain", "ok\n"),
        "/readyz" => match m.ready() {
            Ok(()) => http::text(200, "text/plain", "ready\n"),
            Err(why) => http::text(503, "text/plain", format!("not ready: {why}\n")),
        },
        _ => http::text(404, "text/plain", "try /metrics, /healthz, /readyz\n"),
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
    let listener = TcpListener::bind(addr).await?;
    let name = listener.local_addr()?.to_string();
    let handler: http::Handler = Arc::new(move |req: Request<hyper::body::Incoming>| {
        let r = handle(&metrics, &req);
        Box::pin(async move { r })
    });
    Ok(tokio::spawn(http::serve(
        listener, name, limits, handler, shutdown,
    )))
}
