//! hotplug-agent: catches CPU and memory hotplug as the kernel makes it.
//!
//! Data flow, one direction:
//! ```text
//! kernel ─► sources ─► SourceEvent channel ─► watch (annotate with capacity) ─► report
//!   eBPF ring buffer   sources::ebpf
//!   netlink uevents    sources::uevent
//!   sysfs rescans      sources::scan
//! ```
//! - [`capacity`]: the machine's truth as cadvisor computes it; a pure function of a root.
//! - [`sources`]: the kernel probe, the uevent monitor, and the snapshot scans.
//! - [`record`]: the event log's records (the schema).
//! - [`report`]: NDJSON and the human text view.
//! - [`pipeline`]: sources in, records out (start-up snapshot, folding, rescans).
//! - [`watch`]: the pipeline written out; `hotplug-agent watch`.
//! - [`status`]: the snapshot and which probes can attach; `hotplug-agent status`.
//! - [`telemetry`]: diagnostics (tracing) on stderr, never mixed with the event log.
pub mod capacity;
pub mod checkpoint;
pub mod episode;
pub mod node;
pub mod pipeline;
pub mod reconcile;
pub mod record;
pub mod refresh;
pub mod report;
pub mod run;
pub mod sources;
pub mod status;
pub mod telemetry;
pub mod verify;
pub mod watch;
