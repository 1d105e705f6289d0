//! The command line: every subcommand and flag, as clap reads them. Values come from
//! flags, then `HOTPLUG_AGENT_*` variables, then `--config FILE` ([`crate::config`]).
//! Nothing here acts; [`crate::app`] wires what a command asks for.
use std::{ffi::OsString, path::PathBuf, time::Duration};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::{
    config::{self, ConfigError},
    episode,
    pipeline::{self, Rescan},
    refresh,
    report::{Format, sinks, stream},
    run,
};

/// Catches CPU and memory hotplug as the kernel makes it.
#[derive(Debug, Parser)]
#[command(version, about)]
pub struct Cli {
    /// Colour on stderr's diagnostics and `events`' text: `auto` (only on a terminal, and
    /// never with NO_COLOR set), `always` or `never`.
    #[arg(long, value_enum, default_value = "auto", global = true)]
    pub color: Color,
    #[command(subcommand)]
    pub command: Command,
    /// Which settings came from the config file, to name it in errors found after parsing.
    #[arg(skip)]
    pub origins: config::Origins,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Color {
    Auto,
    Always,
    Never,
}

impl Color {
    /// Whether to colour a stream that is (or is not) a terminal. `auto` follows
    /// <https://no-color.org>: NO_COLOR set to anything but the empty string turns it off.
    pub fn enabled(self, terminal: bool) -> bool {
        match self {
            Self::Always => true,
            Self::Never => false,
            Self::Auto => terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        }
    }
}

/// What `events --kind` accepts: the record kinds of the event log.
pub const RECORD_KINDS: [&str; 9] = [
    "cpu",
    "memory_block",
    "memory",
    "agent",
    "episode",
    "reconcile",
    "refresh",
    "verify",
    "reset",
];

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Stream CPU and memory hotplug events as they happen (no cluster needed).
    Watch(WatchArgs),
    /// Watch, and make this node's kubelet advertise the real capacity (episodes,
    /// reconcile against the Node, refresh, verify).
    Run(Box<RunArgs>),
    /// Read the live event stream of a running `hotplug-agent run`.
    Events(EventsArgs),
    /// Print the effective configuration of `run`, and where each value came from: flag,
    /// environment, config file or default. Without run flags: the running agent's, read
    /// from its /config on the metrics address this environment names (in its pod or
    /// unit, the agent's), else computed here; the first line says which.
    Config {
        /// Compute it here, from these run flags, the environment and the config file,
        /// without asking a running agent.
        #[arg(long)]
        local: bool,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        run_args: Vec<std::ffi::OsString>,
    },
    /// Print a completion script: `hotplug-agent completions bash > /etc/bash_completion.d/hotplug-agent`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff) of the program or of one subcommand (`run`:
    /// hotplug-agent-run(1)); `cargo xtask man` writes them all to target/man/.
    #[command(hide = true)]
    Man { subcommand: Option<String> },
    /// Print the machine's capacity and which probes can attach here.
    Status {
        #[arg(
            long,
            short = 'o',
            visible_alias = "output",
            value_enum,
            default_value = "text"
        )]
        format: Format,
        /// Try every attach method of every probe (perf-event, raw and BTF tracepoint;
        /// fentry and kprobe), not only until one attaches as `run` does.
        #[arg(long)]
        every_method: bool,
        /// Filesystem root holding proc/ and sys/.
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
    /// For each kubelet CPU/memory manager checkpoint: its policy, whether its checksum is
    /// the kubelet's, whether the kubelet would start on it on this machine now (and if not,
    /// why), and what `--static-policy update-in-place` would write. Writes nothing.
    Checkpoint {
        /// The kubelet's root dir.
        #[arg(long, default_value = crate::checkpoint::DEFAULT_KUBELET_ROOT)]
        kubelet_root_dir: PathBuf,
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Filesystem root holding proc/ and sys/.
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// `json`: one object per line (the event log). Default: text on a terminal, else json.
    #[arg(long, short = 'o', visible_alias = "output", value_enum)]
    pub format: Option<Format>,
    #[command(flatten)]
    pub sources: SourceArgs,
}

#[derive(Debug, clap::Args)]
pub struct EventsArgs {
    /// Keep streaming new records as they are made.
    #[arg(short, long)]
    pub follow: bool,
    /// Only records from the last DURATION (e.g. 10m, 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub since: Option<Duration>,
    /// Only the last N records the agent holds.
    #[arg(long)]
    pub tail: Option<usize>,
    /// Only these kinds (cpu, memory_block, memory, agent, episode, reconcile, refresh, verify, reset).
    #[arg(long, value_delimiter = ',', value_parser = clap::builder::PossibleValuesParser::new(RECORD_KINDS))]
    pub kind: Vec<String>,
    /// `text` (coloured on a terminal) or `json`. Default: text on a terminal, else json.
    #[arg(long, short = 'o', visible_alias = "output", value_enum)]
    pub format: Option<Format>,
    /// The agent's stream socket.
    #[arg(long, default_value = stream::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// Connect over TCP instead (the agent's --stream-tcp).
    #[arg(long)]
    pub addr: Option<String>,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// A TOML file with any of these settings (keys are the flag names, `settle_ms = 500`).
    /// Precedence: flags, then HOTPLUG_AGENT_* variables, then this file, then defaults.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// `json` (the event log, default) or `text`.
    #[arg(
        long,
        short = 'o',
        visible_alias = "output",
        value_enum,
        default_value = "json"
    )]
    pub format: Format,
    #[command(flatten)]
    pub sources: SourceArgs,
    /// This node's name. Default: $NODE_NAME, else the hostname.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// A kubeconfig file. Default: in-cluster config, else $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Run without any Kubernetes API: episodes are recorded, nothing is reconciled.
    #[arg(long)]
    pub no_kubernetes: bool,
    /// An episode settles when no event came for this long (ms).
    #[arg(long, default_value_t = episode::DEFAULT_SETTLE.as_millis() as u64)]
    pub settle_ms: u64,
    /// ...but never waits longer than this after its first event (ms), unless memory
    /// blocks are still on their way online.
    #[arg(long, default_value_t = episode::DEFAULT_MAX_WAIT.as_millis() as u64)]
    pub max_wait_ms: u64,
    /// The bound while hot-added memory blocks are still coming online (ms): a 64 GiB DIMM
    /// is 512 blocks, onlined one by one.
    #[arg(long, default_value_t = episode::DEFAULT_IN_FLIGHT_MAX_WAIT.as_millis() as u64)]
    pub in_flight_max_wait_ms: u64,
    /// Blocks still offline after this long without any event are taken as left offline
    /// on purpose, and the episode settles (ms).
    #[arg(long, default_value_t = episode::DEFAULT_IN_FLIGHT_STALL.as_millis() as u64)]
    pub in_flight_stall_ms: u64,
    /// How the kubelet is made to re-read the machine.
    #[arg(long, value_enum, default_value = "systemd")]
    pub refresh: refresh::Kind,
    /// systemd: the kubelet's unit.
    #[arg(long, default_value = "kubelet.service")]
    pub kubelet_unit: String,
    /// systemd: D-Bus address (default: the system bus), e.g.
    /// unix:path=/host/run/dbus/system_bus_socket in a DaemonSet.
    #[arg(long)]
    pub systemd_bus: Option<String>,
    /// command: `PROGRAM ARG...`, split as a shell would, run without a shell.
    #[arg(long)]
    pub refresh_command: Option<String>,
    /// command + `--static-policy drain-and-reset`: how to stop the kubelet.
    #[arg(long)]
    pub kubelet_stop_command: Option<String>,
    /// command + `--static-policy drain-and-reset`: how to start the kubelet.
    #[arg(long)]
    pub kubelet_start_command: Option<String>,
    /// How long a refresh may take.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub refresh_timeout: Duration,
    /// How long the Node may take to advertise the new capacity after a refresh.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    pub verify_timeout: Duration,
    /// The deadline of each Kubernetes API call: a server that accepts and never answers
    /// becomes `api_unreachable` and a retry, not a wait forever.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub api_timeout: Duration,
    /// Guard rail: at least this long between two refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub min_refresh_interval: Duration,
    /// Guard rail: at most this many refreshes in any hour.
    #[arg(long, default_value_t = 12)]
    pub max_refreshes_per_hour: u32,
    /// The kubelet's root dir, for its CPU and memory manager checkpoints.
    #[arg(long, default_value = "/var/lib/kubelet")]
    pub kubelet_root_dir: PathBuf,
    /// The kubelet's config file. Where it turns the kubelet's InPlaceNodeResourceResize
    /// feature gate on, the kubelet resizes the Node itself and the agent only reports.
    /// A missing file is normal; an unreadable one is said once and ignored.
    /// Default: KUBELET_ROOT_DIR/config.yaml.
    #[arg(long, value_name = "FILE")]
    pub kubelet_config: Option<PathBuf>,
    /// Keep the refresh guard rails' history in DIR/guard.json, so that restarting the agent
    /// (a crash loop included) does not reset the hourly cap or the back-off. Default:
    /// $STATE_DIRECTORY (systemd's StateDirectory=), else kept in memory only.
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// With a static CPU/memory manager checkpoint that no longer matches the machine.
    #[arg(long, value_enum, default_value = "refuse")]
    pub static_policy: run::StaticPolicy,
    /// When the machine shrank (memory offlined, CPUs gone) and the pods would not fit the
    /// allocatable after a kubelet restart (their working set or requests): `refuse` the
    /// restart with a Warning, or `evict` the lowest-priority pods first (cordon, Eviction
    /// API, a drain slot of the fleet budget; needs the drain-and-reset RBAC).
    #[arg(long, value_enum, default_value = "refuse")]
    pub shrink_policy: crate::shrink::Policy,
    /// cgroup filesystem root, to check the pods' cgroup memory limit.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    pub cgroup_root: PathBuf,
    /// Fleet budget: at most this many nodes of the cluster restart their kubelet at once
    /// (a count, or a percentage of the cluster's nodes rounded up; at least 1). Held in
    /// Leases `hotplug-agent-restart-N` in --lease-namespace.
    #[arg(long, default_value = "10%")]
    pub max_concurrent_restarts: crate::fleet::Limit,
    /// Fleet budget for `--static-policy drain-and-reset` (Leases `hotplug-agent-drain-N`).
    #[arg(long, default_value = "1")]
    pub max_concurrent_drains: crate::fleet::Limit,
    /// The namespace of the fleet budgets' Leases. Default: the client's namespace (in a
    /// pod, its service account's).
    #[arg(long)]
    pub lease_namespace: Option<String>,
    /// A budget slot not renewed for this long is taken over by a waiting node (whole
    /// seconds, the Leases' leaseDurationSeconds).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
    /// `/metrics`, `/healthz`, `/readyz` on this address; `off` to disable.
    #[arg(long, default_value = "127.0.0.1:9477")]
    pub metrics_addr: String,
    /// The live event stream (`hotplug-agent events`) on this unix socket; `off` to disable.
    #[arg(long, default_value = stream::DEFAULT_SOCKET)]
    pub stream_socket: String,
    /// The live event stream on a TCP address too (off by default).
    #[arg(long)]
    pub stream_tcp: Option<String>,
    /// Records kept in memory for clients that ask for a replay.
    #[arg(long, default_value_t = stream::DEFAULT_REPLAY)]
    pub stream_replay: usize,
    /// Also write the event log to this file, rotated by size.
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Rotate the log file when it would grow past this many bytes.
    #[arg(long, default_value_t = 10 << 20)]
    pub log_file_max_bytes: u64,
    /// Rotated log files to keep.
    #[arg(long, default_value_t = 5)]
    pub log_file_keep: usize,
    /// Records stdout and the log file may each hold while their reader or disk is slow;
    /// beyond, records are counted as lost and a `loss` record says how many.
    #[arg(long, default_value_t = sinks::DEFAULT_QUEUE, hide = true)]
    pub output_queue: usize,
}

#[derive(Debug, clap::Args)]
pub struct SourceArgs {
    /// Slow re-read guard for MemTotal changes no uevent announces: `auto` (60 s when the
    /// precise memory probes cannot attach, else off), `off`, or seconds.
    #[arg(long, default_value = "auto", value_parser = Rescan::parse)]
    pub rescan_interval: Rescan,
    /// Receive buffer of the uevent socket, bytes (forced past rmem_max with CAP_NET_ADMIN).
    #[arg(long, default_value_t = pipeline::DEFAULT_UEVENT_RCVBUF)]
    pub uevent_rcvbuf: usize,
    /// Do not load the eBPF probes.
    #[arg(long)]
    pub no_ebpf: bool,
    /// Do not open the uevent monitor.
    #[arg(long)]
    pub no_uevent: bool,
    /// Online memory blocks that arrive with a uevent `add`, once (never one taken offline
    /// by hand): `off`, `online`, `online_movable` (keeps a DIMM unpluggable) or `online_kernel`.
    #[arg(long, value_enum, default_value = "off")]
    pub auto_online_memory: crate::auto_online::MemoryPolicy,
    /// Online CPUs that arrive with a uevent `add`, once: `off` or `on`.
    #[arg(long, value_enum, default_value = "off")]
    pub auto_online_cpus: crate::auto_online::CpuPolicy,
    /// Filesystem root holding proc/ and sys/.
    #[arg(long, default_value = "/", hide = true)]
    pub root: PathBuf,
}

impl SourceArgs {
    pub fn pipeline(&self) -> pipeline::Config {
        pipeline::Config {
            root: self.root.clone(),
            ebpf: !self.no_ebpf,
            uevent: !self.no_uevent,
            uevent_rcvbuf: self.uevent_rcvbuf,
            rescan: self.rescan_interval,
            auto_online: crate::auto_online::Policy {
                memory: self.auto_online_memory,
                cpus: self.auto_online_cpus,
            },
            ..pipeline::Config::default()
        }
    }
}

/// Parses the process's arguments, with the environment and the config file merged in;
/// prints the error and exits (2, as clap does) when they are wrong.
pub fn parse() -> Cli {
    let cmd = config::with_env(Cli::command());
    let (argv, origins) = match config::merge_traced(&cmd, std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {}", crate::sources::error_chain(&e));
            std::process::exit(2);
        }
    };
    let matches = cmd.get_matches_from(argv);
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    cli.origins = origins;
    cli
}

/// `hotplug-agent completions SHELL`: the script, from the same definition as the parser
/// (with the `HOTPLUG_AGENT_*` variables of [`config::with_env`]).
pub fn completions(shell: clap_complete::Shell, out: &mut dyn std::io::Write) {
    let mut cmd = config::with_env(Cli::command());
    clap_complete::generate(shell, &mut cmd, "hotplug-agent", out);
}

/// The subcommands that have a man page of their own (`hotplug-agent-NAME(1)`).
pub fn man_pages() -> Vec<String> {
    Cli::command()
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
        .map(|s| s.get_name().to_owned())
        .collect()
}

/// `hotplug-agent man [SUBCOMMAND]`: the man page, in roff; a subcommand's has its flags
/// and their `HOTPLUG_AGENT_*` variables.
pub fn man(subcommand: Option<&str>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let cmd = config::with_env(Cli::command());
    let page = match subcommand {
        None => cmd,
        Some(name) => {
            let sub = cmd.find_subcommand(name).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no subcommand {name:?}"),
                )
            })?;
            sub.clone().name(format!("hotplug-agent-{name}"))
        }
    };
    clap_mangen::Man::new(page).render(out)
}

/// Why `hotplug-agent config` could not describe a configuration.
#[derive(Debug, thiserror::Error)]
pub enum DescribeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Arguments(#[from] clap::Error),
}

/// `hotplug-agent config RUN-ARGS...`: the effective configuration of `run` with these
/// arguments, and where each value came from.
pub fn describe_run(run_args: Vec<OsString>) -> Result<String, DescribeError> {
    let cmd = config::with_env(Cli::command());
    let mut argv: Vec<OsString> = vec!["hotplug-agent".into(), "run".into()];
    argv.extend(run_args);
    let file = config::file_of(&argv);
    let before = cmd.clone().try_get_matches_from(&argv)?;
    let argv = config::merge(&cmd, argv)?;
    let matches = cmd.clone().try_get_matches_from(argv)?;
    let run = cmd
        .find_subcommand("run")
        .expect("the command line defines `run`");
    let run_matches = matches
        .subcommand_matches("run")
        .expect("matches of `hotplug-agent run ...` hold `run`");
    Ok(config::describe(
        run,
        run_matches,
        before.subcommand_matches("run"),
        file.as_ref(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hotplug-agent").chain(args.iter().copied()))
    }

    #[test]
    fn output_is_the_kubectl_style_alias_of_format() {
        for flag in ["-o", "--output", "--format"] {
            let Command::Events(e) = parse(&["events", flag, "json"]).unwrap().command else {
                panic!("not events");
            };
            assert_eq!(e.format, Some(Format::Json), "{flag}");
        }
        let Command::Run(r) = parse(&["run", "-o", "text"]).unwrap().command else {
            panic!("not run");
        };
        assert_eq!(r.format, Format::Text);
    }

    #[test]
    fn an_unknown_kind_is_refused_with_a_suggestion() {
        let err = parse(&["events", "--kind", "cpu,refrsh"]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("refrsh") && text.contains("refresh"),
            "{text}"
        );
        assert_eq!(err.kind(), clap::error::ErrorKind::InvalidValue);
        let Command::Events(e) = parse(&["events", "--kind", "cpu,verify"]).unwrap().command else {
            panic!("not events");
        };
        assert_eq!(e.kind, ["cpu", "verify"]);
    }

    #[test]
    fn completions_and_the_man_page_name_every_subcommand() {
        for shell in [
            clap_complete::Shell::Bash,
            clap_complete::Shell::Zsh,
            clap_complete::Shell::Fish,
        ] {
            let mut out = Vec::new();
            completions(shell, &mut out);
            let text = String::from_utf8(out).unwrap();
            for word in ["watch", "events", "settle-ms", "color"] {
                assert!(text.contains(word), "{shell}: no {word}");
            }
        }
        let mut out = Vec::new();
        man(None, &mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("completions"));
        assert!(man_pages().contains(&"run".to_owned()));
        let mut out = Vec::new();
        man(Some("run"), &mut out).unwrap();
        let roff = String::from_utf8(out).unwrap();
        assert!(roff.starts_with(".ie") || roff.contains(".TH"), "{roff}");
        assert!(
            roff.contains("settle\\-ms") && roff.contains("HOTPLUG_AGENT_SETTLE_MS"),
            "{roff}"
        );
    }

    /// `subcommand -> [(long flag, variable)]` as the parser sees them.
    fn variables() -> Vec<(String, Vec<(String, String)>)> {
        let mut cmd = config::with_env(Cli::command());
        cmd.build();
        cmd.get_subcommands()
            .map(|sub| {
                let vars = sub
                    .get_arguments()
                    .filter_map(|a| {
                        let env = a.get_env()?.to_string_lossy().into_owned();
                        Some((a.get_long()?.to_owned(), env))
                    })
                    .collect();
                (sub.get_name().to_owned(), vars)
            })
            .collect()
    }

    #[test]
    fn environment_names_never_collide_within_or_across_commands() {
        let all = variables();
        let agent: std::collections::BTreeMap<String, String> = all
            .iter()
            .filter(|(s, _)| s == "run" || s == "watch")
            .flat_map(|(_, v)| v.iter().map(|(l, e)| (e.clone(), l.clone())))
            .collect();
        for (sub, vars) in &all {
            let mut seen = std::collections::BTreeMap::new();
            for (long, env) in vars {
                if let Some(other) = seen.insert(env.clone(), long.clone()) {
                    panic!("`{sub}`: --{other} and --{long} both read {env}");
                }
                if sub == "run" || sub == "watch" {
                    // `--node-name` reads the downward API's conventional NODE_NAME.
                    if env != "NODE_NAME" {
                        assert_eq!(env, &config::env_name(long), "`{sub} --{long}`");
                    }
                    continue;
                }
                // A client's variable is its own, or the agent's for the very same setting.
                let own = config::env_name(&format!("{sub}-{long}"));
                let shared = agent.get(env).is_some_and(|agent_long| {
                    [("events", "socket", "stream-socket")]
                        .iter()
                        .any(|(s, l, a)| s == sub && l == long && a == agent_long)
                        || agent_long == long
                });
                assert!(
                    env == &own || shared,
                    "`{sub} --{long}` reads {env}, which is neither its own ({own}) nor the \
                     agent's for the same setting"
                );
            }
        }
        let find = |sub: &str, long: &str| {
            all.iter()
                .find(|(s, _)| s == sub)
                .and_then(|(_, v)| v.iter().find(|(l, _)| l == long))
                .map(|(_, e)| e.clone())
        };
        // What the DaemonSet and the unit set stays as it was.
        assert_eq!(
            find("run", "format").as_deref(),
            Some("HOTPLUG_AGENT_FORMAT")
        );
        assert_eq!(
            find("run", "stream-socket").as_deref(),
            Some("HOTPLUG_AGENT_STREAM_SOCKET")
        );
        // The clients' display formats are their own; the socket is the agent's.
        assert_eq!(
            find("events", "format").as_deref(),
            Some("HOTPLUG_AGENT_EVENTS_FORMAT")
        );
        assert_eq!(
            find("status", "format").as_deref(),
            Some("HOTPLUG_AGENT_STATUS_FORMAT")
        );
        assert_eq!(
            find("events", "socket").as_deref(),
            Some("HOTPLUG_AGENT_STREAM_SOCKET")
        );
    }

    #[test]
    fn color_is_global_and_never_beats_a_terminal() {
        let cli = parse(&["events", "--color", "never"]).unwrap();
        assert_eq!(cli.color, Color::Never);
        assert!(!cli.color.enabled(true));
        assert!(Color::Always.enabled(false));
        assert!(!Color::Auto.enabled(false));
        assert_eq!(
            parse(&["--color", "always", "status"]).unwrap().color,
            Color::Always
        );
    }
}
