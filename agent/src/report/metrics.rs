//! Metrics and health, derived from the record stream itself: whatever the event log says
//! is what `/metrics`, `/healthz` and `/readyz` say, with no second bookkeeping.
//!
//! `/healthz`: the process answers. `/readyz`: every source listens (the `ready` record)
//! and, in `run` mode, the first reconcile is done and the API answered last time.
use std::{
    convert::Infallible,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, service::service_fn};
use hyper_util::rt::TokioIo;
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
use tokio::net::TcpListener;

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
    probes_attached: Gauge,
    losses: Family<SourceLabels, Counter>,
    ringbuf_drops: Counter,
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
            probes_attached,
            losses,
            ringbuf_drops,
            health: Health::default(),
        })
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
                match a.action.as_str() {
                    "ready" => {
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
                    "loss" => {
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
        match (d.kind.as_str(), d.action.as_str()) {
            ("episode", "settled") if d.trigger.as_deref() == Some("events") => {
                self.episodes.inc();
            }
            ("reconcile", action) => {
                self.health.first_reconcile.store(true, Ordering::Relaxed);
                self.health
                    .api_down
                    .store(action == "api_unreachable", Ordering::Relaxed);
                if let Some(a) = &d.advertised {
                    advertised(a);
                }
                match action {
                    "in_sync" => {
                        self.stale.set(0);
                    }
                    "stale" => {
                        self.stale.set(1);
                    }
                    _ => {}
                }
            }
            ("refresh", action @ ("succeeded" | "failed" | "skipped" | "deferred")) => {
                let backend = d.backend.clone().unwrap_or_else(|| "none".into());
                self.refreshes
                    .get_or_create(&RefreshLabels {
                        backend,
                        result: action.into(),
                    })
                    .inc();

                if let Some(ms) = d.duration_ms.filter(|_| action != "skipped") {
                    self.refresh_seconds.observe(ms as f64 / 1000.0);
                }
            }
            ("verify", action) => {
                if let Some(a) = &d.advertised_after {
                    advertised(a);
                }
                if let Some(ms) = d.duration_ms {
                    self.verify_seconds.observe(ms as f64 / 1000.0);
                }
                let stale = action != "converged" || d.cgroup.as_ref().is_some_and(|c| !c.ok);
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

fn reply(status: u16, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

async fn handle(
    m: Arc<Metrics>,
    req: Request<hyper::body::Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(match req.uri().path() {
        "/metrics" => reply(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            m.render(),
        ),
        "/healthz" => reply(200, "text/plain", "ok\n".into()),
        "/readyz" => match m.ready() {
            Ok(()) => reply(200, "text/plain", "ready\n".into()),
            Err(why) => reply(503, "text/plain", format!("not ready: {why}\n")),
        },
        _ => reply(
            404,
            "text/plain",
            "try /metrics, /healthz, /readyz\n".into(),
        ),
    })
}

/// Serves `/metrics`, `/healthz` and `/readyz` on `addr`.
pub async fn serve(
    metrics: Arc<Metrics>,
    addr: &str,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let m = metrics.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| handle(m.clone(), req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }))
}
