//! The sources' own counters ([`Counters`]) and the build, on `/metrics`.
//!
//! The sources count what never becomes a record (a malformed uevent, an undecodable ring
//! buffer record, a `SEQNUM` gap no rescan confirmed): these counters are read at scrape
//! time, straight from the atomics the sources bump, so there is no second bookkeeping.
//! Before the pipeline has started (or in a mode without one) they read 0, so that alert
//! rules built on `increase()` see the series from the first scrape on.
use std::sync::{Arc, OnceLock, atomic::Ordering};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
};

use crate::sources::Counters;

/// The commit the binary was built from: agent/build.rs (`git rev-parse HEAD`, or the
/// `HOTPLUG_AGENT_REVISION` build argument of the Dockerfile), `unknown` without either.
pub const REVISION: &str = env!("HOTPLUG_AGENT_REVISION");
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// One exported counter: name (without the `hotplug_agent_` prefix and the `_total`
/// suffix), help, and how to read it.
type Exported = (&'static str, &'static str, fn(&Counters) -> u64);

const EXPORTED: [Exported; 7] = [
    (
        "uevents_received",
        "Datagrams read from the kernel's uevent socket",
        |c| c.uevents.load(Ordering::Relaxed),
    ),
    (
        "uevents_ignored",
        "uevents of other subsystems or senders, not about memory or CPUs",
        |c| c.uevents_ignored.load(Ordering::Relaxed),
    ),
    (
        "uevents_malformed",
        "uevent datagrams that did not parse (logged and dropped)",
        |c| c.uevents_malformed.load(Ordering::Relaxed),
    ),
    (
        "uevent_overflows",
        "ENOBUFS on the uevent socket: uevents certainly lost (a rescan follows)",
        |c| c.uevent_overflows.load(Ordering::Relaxed),
    ),
    (
        "uevent_seqnum_gaps",
        "uevent SEQNUM jumps (other namespaces' devices cause them too; a rescan checks)",
        |c| c.uevent_seqnum_gaps.load(Ordering::Relaxed),
    ),
    (
        "probe_records",
        "Records read from the eBPF ring buffer",
        |c| c.probe_records.load(Ordering::Relaxed),
    ),
    (
        "ringbuf_undecodable_records",
        "eBPF ring buffer records of the wrong size or shape (logged and dropped)",
        |c| c.probe_malformed.load(Ordering::Relaxed),
    ),
];

/// Reads the pipeline's [`Counters`] once [`attach`](Self::attach)ed.
#[derive(Debug, Default, Clone)]
pub struct SourceCounters(Arc<OnceLock<Arc<Counters>>>);

impl SourceCounters {
    /// The pipeline's counters; a second call is ignored (one pipeline per process).
    pub fn attach(&self, counters: Arc<Counters>) {
        let _ = self.0.set(counters);
    }
}

impl Collector for SourceCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let zero = Counters::default();
        let counters = self.0.get().map_or(&zero, |c| c.as_ref());
        for (name, help, read) in EXPORTED {
            let counter = ConstCounter::new(read(counters));
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}
