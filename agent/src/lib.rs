//! hotplug-agent: catches CPU and memory hotplug as the kernel makes it, and makes the
//! kubelet advertise the real capacity.
//!
//! Data flow, one direction:
//! ```text
//! kernel ─► sources ─► pipeline ─► records ─┬─► report (stdout NDJSON / text)       watch
//!   eBPF ring buffer    (capacity,           └─► episode ─► reconcile ─► refresh ─► verify
//!   netlink uevents      folding,                             (Node)   (kubelet)  (Node, cgroup)  run
//!   sysfs rescans        rescans)
//! ```
//! - [`capacity`]: the machine's truth as cadvisor computes it; a pure function of a root.
//! - [`sources`]: the kernel probe, the uevent monitor, and the snapshot scans.
//! - [`pipeline`]: sources in, records out (start-up snapshot, folding, rescans).
//! - [`auto_online`]: the opt-in policy that onlines blocks and CPUs arriving with `add`.
//! - [`record`]: the event log's records (the schema); [`report`]: NDJSON and text.
//! - [`watch`]: the pipeline written out; `hotplug-agent watch`.
//! - [`episode`]: a burst of events settles into one episode.
//! - [`reconcile`]: the machine against the Node's advertised capacity.
//! - [`refresh`]: making the kubelet re-read the machine (systemd, command), with guard rails;
//!   [`checkpoint`]: the kubelet's static CPU/memory manager checkpoints that forbid it.
//! - [`kube_client`]: the API client from a kubeconfig; where it cannot be built, a stand-in
//!   that keeps trying while the agent runs report-only.
//! - [`fleet`]: cluster-wide budgets (Leases) on kubelet restarts and drains.
//! - [`upstream`]: the kubelet's config file; standing down where the kubelet resizes itself.
//! - [`node`]: this node's object: get, watch, Events, the agent's condition.
//! - [`verify`]: the pods' cgroup memory limit check.
//! - [`shrink`]: before a restart on a smaller machine, whether the pods still fit.
//! - [`run`]: the controller; `hotplug-agent run`.
//! - [`events`]: the client of the live stream; `hotplug-agent events`.
//! - [`status`]: the snapshot and which probes can attach; `hotplug-agent status`.
//! - [`config`]: TOML file, environment and flags, in that order of precedence;
//!   [`running_config`]: `hotplug-agent config` reading the running agent's `/config`.
//! - [`files`]: reading the small files the agent is pointed at, without trusting the path.
//! - [`cli`]: the command line; [`app`]: what each command wires together.
//! - [`error`]: why `watch` or `run` ended.
//! - [`telemetry`]: diagnostics (tracing) on stderr, never mixed with the event log.
pub mod app;
pub mod auto_online;
pub mod capacity;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod episode;
pub mod error;
pub mod events;
pub mod files;
pub mod fleet;
pub mod kube_client;
pub mod node;
pub mod offlining;
pub mod pipeline;
pub mod reconcile;
pub mod record;
pub mod refresh;
pub mod report;
pub mod run;
pub mod running_config;
pub mod shrink;
pub mod sources;
pub mod status;
pub mod telemetry;
pub mod upstream;
pub mod verify;
pub mod watch;
