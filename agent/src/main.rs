//! The `hotplug-agent` binary: parses the command line and wires the library together.
use std::{io::IsTerminal, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use std::sync::Arc;

use hotplug_agent::{
    config, episode, events, kube_client,
    pipeline::{self, Rescan},
    refresh,
    report::Format,
    report::{
        metrics::{self, Metrics},
        sinks::{self, FileSink, Sinks, StdoutGone},
        stream::{self, Hub},
    },
    run, status, telemetry, watch,
};

/// Catches CPU and memory hotplug as the kernel makes it.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Stream CPU and memory hotplug events as they happen (no cluster needed).
    Watch(WatchArgs),
    /// Watch, and make this node's kubelet advertise the real capacity (episodes,
    /// reconcile against the Node, refresh, verify).
    Run(Box<RunArgs>),
    /// Read the live event stream of a running `hotplug-agent run`.
    Events(EventsArgs),
    /// Print the effective configuration of `run` (with these run flags), and where each
    /// value came from: flag, environment, config file or default.
    Config {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        run_args: Vec<std::ffi::OsString>,
    },
    /// Print the machine's capacity and which probes can attach here.
    Status {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
        /// Try every attach method of every probe (perf-event, raw and BTF tracepoint;
        /// fentry and kprobe), not only until one attaches as `run` does.
        #[arg(long)]
        every_method: bool,
        /// Filesystem root holding proc/ and sys/.
        #[arg(long, default_value = "/", hide = true)]
        root: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct WatchArgs {
    /// `json`: one object per line (the event log). Default: text on a terminal, else json.
    #[arg(long, value_enum)]
    format: Option<Format>,
    #[command(flatten)]
    sources: SourceArgs,
}

#[derive(Debug, clap::Args)]
struct EventsArgs {
    /// Keep streaming new records as they are made.
    #[arg(short, long)]
    follow: bool,
    /// Only records from the last DURATION (e.g. 10m, 1h).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Only the last N records the agent holds.
    #[arg(long)]
    tail: Option<usize>,
    /// Only these kinds (cpu, memory_block, memory, agent, episode, reconcile, refresh, verify, reset).
    #[arg(long, value_delimiter = ',')]
    kind: Vec<String>,
    /// `text` (default, coloured on a terminal) or `json` for piping.
    #[arg(long, value_enum, default_value = "text")]
    format: Format,
    /// The agent's stream socket.
    #[arg(long, default_value = stream::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Connect over TCP instead (the agent's --stream-tcp).
    #[arg(long)]
    addr: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RefreshKind {
    /// RestartUnit of the kubelet's unit over the system D-Bus.
    Systemd,
    /// Run `--refresh-command`.
    Command,
    /// Report only.
    None,
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// A TOML file with any of these settings (keys are the flag names, `settle_ms = 500`).
    /// Precedence: flags, then HOTPLUG_AGENT_* variables, then this file, then defaults.
    #[arg(long)]
    config: Option<PathBuf>,
    /// `json` (the event log, default) or `text`.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    #[command(flatten)]
    sources: SourceArgs,
    /// This node's name. Default: $NODE_NAME, else the hostname.
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// A kubeconfig file. Default: in-cluster config, else $KUBECONFIG or ~/.kube/config.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Run without any Kubernetes API: episodes are recorded, nothing is reconciled.
    #[arg(long)]
    no_kubernetes: bool,
    /// An episode settles when no event came for this long (ms).
    #[arg(long, default_value_t = episode::DEFAULT_SETTLE.as_millis() as u64)]
    settle_ms: u64,
    /// ...but never waits longer than this after its first event (ms), unless memory
    /// blocks are still on their way online.
    #[arg(long, default_value_t = episode::DEFAULT_MAX_WAIT.as_millis() as u64)]
    max_wait_ms: u64,
    /// The bound while hot-added memory blocks are still coming online (ms): a 64 GiB DIMM
    /// is 512 blocks, onlined one by one.
    #[arg(long, default_value_t = episode::DEFAULT_IN_FLIGHT_MAX_WAIT.as_millis() as u64)]
    in_flight_max_wait_ms: u64,
    /// Blocks still offline after this long without any event are taken as left offline
    /// on purpose, and the episode settles (ms).
    #[arg(long, default_value_t = episode::DEFAULT_IN_FLIGHT_STALL.as_millis() as u64)]
    in_flight_stall_ms: u64,
    /// How the kubelet is made to re-read the machine.
    #[arg(long, value_enum, default_value = "systemd")]
    refresh: RefreshKind,
    /// systemd: the kubelet's unit.
    #[arg(long, default_value = "kubelet.service")]
    kubelet_unit: String,
    /// systemd: D-Bus address (default: the system bus), e.g.
    /// unix:path=/host/run/dbus/system_bus_socket in a DaemonSet.
    #[arg(long)]
    systemd_bus: Option<String>,
    /// command: `PROGRAM ARG...`, split as a shell would, run without a shell.
    #[arg(long)]
    refresh_command: Option<String>,
    /// command + `--static-policy drain-and-reset`: how to stop the kubelet.
    #[arg(long)]
    kubelet_stop_command: Option<String>,
    /// command + `--static-policy drain-and-reset`: how to start the kubelet.
    #[arg(long)]
    kubelet_start_command: Option<String>,
    /// How long a refresh may take.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    refresh_timeout: Duration,
    /// How long the Node may take to advertise the new capacity after a refresh.
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    verify_timeout: Duration,
    /// The deadline of each Kubernetes API call: a server that accepts and never answers
    /// becomes `api_unreachable` and a retry, not a wait forever.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    api_timeout: Duration,
    /// Guard rail: at least this long between two refreshes.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    min_refresh_interval: Duration,
    /// Guard rail: at most this many refreshes in any hour.
    #[arg(long, default_value_t = 12)]
    max_refreshes_per_hour: u32,
    /// The kubelet's root dir, for its CPU and memory manager checkpoints.
    #[arg(long, default_value = "/var/lib/kubelet")]
    kubelet_root_dir: PathBuf,
    /// Keep the refresh guard rails' history in DIR/guard.json, so that restarting the agent
    /// (a crash loop included) does not reset the hourly cap or the back-off. Default:
    /// $STATE_DIRECTORY (systemd's StateDirectory=), else kept in memory only.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// With a static CPU/memory manager checkpoint that no longer matches the machine.
    #[arg(long, value_enum, default_value = "refuse")]
    static_policy: run::StaticPolicy,
    /// cgroup filesystem root, to check the pods' cgroup memory limit.
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// `/metrics`, `/healthz`, `/readyz` on this address; `off` to disable.
    #[arg(long, default_value = "127.0.0.1:9477")]
    metrics_addr: String,
    /// The live event stream (`hotplug-agent events`) on this unix socket; `off` to disable.
    #[arg(long, default_value = stream::DEFAULT_SOCKET)]
    stream_socket: String,
    /// The live event stream on a TCP address too (off by default).
    #[arg(long)]
    stream_tcp: Option<String>,
    /// Records kept in memory for clients that ask for a replay.
    #[arg(long, default_value_t = stream::DEFAULT_REPLAY)]
    stream_replay: usize,
    /// Also write the event log to this file, rotated by size.
    #[arg(long)]
    log_file: Option<PathBuf>,
    /// Rotate the log file when it would grow past this many bytes.
    #[arg(long, default_value_t = 10 << 20)]
    log_file_max_bytes: u64,
    /// Rotated log files to keep.
    #[arg(long, default_value_t = 5)]
    log_file_keep: usize,
    /// Records stdout and the log file may each hold while their reader or disk is slow;
    /// beyond, records are counted as lost and a `loss` record says how many.
    #[arg(long, default_value_t = sinks::DEFAULT_QUEUE, hide = true)]
    output_queue: usize,
}

#[derive(Debug, clap::Args)]
struct SourceArgs {
    /// Slow re-read guard for MemTotal changes no uevent announces: `auto` (60 s when the
    /// precise memory probes cannot attach, else off), `off`, or seconds.
    #[arg(long, default_value = "auto", value_parser = parse_rescan)]
    rescan_interval: Rescan,
    /// Receive buffer of the uevent socket, bytes (forced past rmem_max with CAP_NET_ADMIN).
    #[arg(long, default_value_t = pipeline::DEFAULT_UEVENT_RCVBUF)]
    uevent_rcvbuf: usize,
    /// Do not load the eBPF probes.
    #[arg(long)]
    no_ebpf: bool,
    /// Do not open the uevent monitor.
    #[arg(long)]
    no_uevent: bool,
    /// Online memory blocks that arrive with a uevent `add`, once (never one taken offline
    /// by hand): `off`, `online`, `online_movable` (keeps a DIMM unpluggable) or `online_kernel`.
    #[arg(long, value_enum, default_value = "off")]
    auto_online_memory: hotplug_agent::auto_online::MemoryPolicy,
    /// Online CPUs that arrive with a uevent `add`, once: `off` or `on`.
    #[arg(long, value_enum, default_value = "off")]
    auto_online_cpus: hotplug_agent::auto_online::CpuPolicy,
    /// Filesystem root holding proc/ and sys/.
    #[arg(long, default_value = "/", hide = true)]
    root: PathBuf,
}

impl SourceArgs {
    fn pipeline(&self) -> pipeline::Config {
        pipeline::Config {
            root: self.root.clone(),
            ebpf: !self.no_ebpf,
            uevent: !self.no_uevent,
            uevent_rcvbuf: self.uevent_rcvbuf,
            rescan: self.rescan_interval,
            auto_online: hotplug_agent::auto_online::Policy {
                memory: self.auto_online_memory,
                cpus: self.auto_online_cpus,
            },
            ..pipeline::Config::default()
        }
    }
}

/// Under systemd (`Type=notify`): READY=1 once running (sources listening, first reconcile
/// tried, even if the API did not answer: the agent records events without it, and waiting
/// for the API would have the start timeout kill and restart it in a loop), `STATUS=` with
/// what `/readyz` says whenever that changes (`systemctl status` shows it), and watchdog
/// pings at half of `WatchdogSec`. Nothing at all elsewhere.
fn systemd_notify(metrics: Arc<Metrics>) -> impl FnMut() {
    if let Some(watchdog) = sd_notify::watchdog_enabled() {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(watchdog / 2);
            loop {
                tick.tick().await;
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
        });
    }
    let mut notified = false;
    let mut last_status = String::new();
    move || {
        if !metrics.running() {
            return;
        }
        let status = match metrics.ready() {
            Ok(()) => "ready".to_string(),
            Err(why) => format!("running, not ready: {why}"),
        };
        if status != last_status {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
            last_status = status;
        }
        if !notified {
            notified = true;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        }
    }
}

/// `--state-dir`, else the first directory systemd's StateDirectory= made.
fn state_dir(flag: Option<PathBuf>) -> Option<PathBuf> {
    flag.or_else(|| {
        let dirs = std::env::var_os("STATE_DIRECTORY")?;
        std::env::split_paths(&dirs).find(|p| !p.as_os_str().is_empty())
    })
}

fn hostname() -> anyhow::Result<String> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the hostname")?;
    Ok(name.trim().to_string())
}

async fn run_command(args: RunArgs) -> anyhow::Result<()> {
    let backend = match args.refresh {
        RefreshKind::None => refresh::Backend::None,
        RefreshKind::Systemd => refresh::Backend::Systemd(refresh::systemd::SystemdConfig {
            unit: args.kubelet_unit.clone(),
            bus_address: args.systemd_bus.clone(),
            timeout: args.refresh_timeout,
        }),
        RefreshKind::Command => {
            let line = args
                .refresh_command
                .as_deref()
                .context("--refresh command needs --refresh-command 'PROGRAM ARG...'")?;
            let parse = |flag: &str, line: &str| {
                refresh::command::parse(line).with_context(|| format!("{flag} {line:?}"))
            };
            let argv = parse("--refresh-command", line)?;
            let stop = args
                .kubelet_stop_command
                .as_deref()
                .map(|l| parse("--kubelet-stop-command", l))
                .transpose()?;
            let start = args
                .kubelet_start_command
                .as_deref()
                .map(|l| parse("--kubelet-start-command", l))
                .transpose()?;
            refresh::Backend::Command(refresh::command::CommandConfig {
                argv,
                stop,
                start,
                timeout: args.refresh_timeout,
            })
        }
    };
    let node_name = match args.node_name.clone() {
        Some(n) => n,
        None => hostname()?,
    };
    let client = if args.no_kubernetes {
        None
    } else {
        match kube_client::build(args.kubeconfig.as_deref()).await {
            Ok(c) => Some(c),
            // A host outside any cluster: events, stream, metrics, nothing to reconcile.
            Err(e) if args.refresh == RefreshKind::None && args.kubeconfig.is_none() => {
                tracing::info!(
                    "no Kubernetes configuration ({}); running standalone",
                    hotplug_agent::sources::error_chain(&e)
                );
                None
            }
            // A missing or broken kubeconfig, or no trust store: never fatal (a unit would
            // crash-loop on it). The stand-in client fails every request with this error,
            // which the first reconcile reports once (`api_unreachable`); the agent records
            // events meanwhile, refreshes nothing, and picks up a fixed kubeconfig on a retry.
            Err(_) => Some(kube_client::lazy(args.kubeconfig.clone())),
        }
    };
    let config = run::Config {
        pipeline: args.sources.pipeline(),
        timing: episode::Timing {
            settle: Duration::from_millis(args.settle_ms),
            max_wait: Duration::from_millis(args.max_wait_ms),
            in_flight_max_wait: Duration::from_millis(args.in_flight_max_wait_ms),
            in_flight_stall: Duration::from_millis(args.in_flight_stall_ms),
        },
        node_name,
        backend,
        guard: refresh::guard::GuardConfig {
            min_interval: args.min_refresh_interval,
            max_per_hour: args.max_refreshes_per_hour,
            state_file: state_dir(args.state_dir.clone())
                .map(|d| d.join(refresh::guard::STATE_FILE)),
            ..refresh::guard::GuardConfig::default()
        },
        verify_timeout: args.verify_timeout,
        api_timeout: args.api_timeout,
        kubelet_root: args.kubelet_root_dir,
        static_policy: args.static_policy,
        cgroup_root: args.cgroup_root,
    };
    config.validate()?;
    let mut sinks = Sinks::stdout(args.format, args.output_queue, StdoutGone::CarryOn)
        .context("starting the event log writer")?;
    let metrics = Metrics::new();
    sinks.metrics = Some(metrics.clone());
    if args.metrics_addr != "off" {
        metrics::serve(metrics.clone(), &args.metrics_addr)
            .await
            .with_context(|| format!("serving metrics on {}", args.metrics_addr))?;
    }
    if args.stream_socket != "off" || args.stream_tcp.is_some() {
        let hub = Hub::new(args.stream_replay, stream::DEFAULT_CLIENT_QUEUE);
        if args.stream_socket != "off" {
            stream::serve_unix(hub.clone(), std::path::Path::new(&args.stream_socket))
                .await
                .with_context(|| format!("serving the event stream on {}", args.stream_socket))?;
        }
        if let Some(addr) = &args.stream_tcp {
            stream::serve_tcp(hub.clone(), addr)
                .await
                .with_context(|| format!("serving the event stream on {addr}"))?;
        }
        sinks.hub = Some(hub);
    }
    if let Some(path) = &args.log_file {
        let file = FileSink::open(path.clone(), args.log_file_max_bytes, args.log_file_keep)
            .with_context(|| format!("opening {}", path.display()))?;
        sinks
            .set_file(file, args.output_queue)
            .context("starting the log file writer")?;
    }
    let notify = systemd_notify(metrics.clone());
    run::run(config, client, &mut sinks, shutdown_signal(), notify)
        .await
        .context("hotplug-agent run")
}

fn parse_rescan(s: &str) -> Result<Rescan, String> {
    match s {
        "auto" => Ok(Rescan::Auto),
        "off" | "0" => Ok(Rescan::Off),
        secs => secs
            .parse::<u64>()
            .map(|n| Rescan::Every(Duration::from_secs(n)))
            .map_err(|_| format!("{s:?}: expected auto, off, or a number of seconds")),
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C still works");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn parse() -> Cli {
    let cmd = config::with_env(Cli::command());
    let argv = match config::merge(&cmd, std::env::args_os().collect()) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {}", hotplug_agent::sources::error_chain(&e));
            std::process::exit(2);
        }
    };
    let matches = cmd.get_matches_from(argv);
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

fn print_config(run_args: Vec<std::ffi::OsString>) -> anyhow::Result<()> {
    let cmd = config::with_env(Cli::command());
    let mut argv: Vec<std::ffi::OsString> = vec!["hotplug-agent".into(), "run".into()];
    argv.extend(run_args);
    let file = config::file_of(&argv);
    let before = cmd.clone().try_get_matches_from(&argv)?;
    let argv = config::merge(&cmd, argv)?;
    let matches = cmd.clone().try_get_matches_from(argv)?;
    let run = cmd.find_subcommand("run").context("no run subcommand")?;
    let run_matches = matches
        .subcommand_matches("run")
        .context("no run matches")?;
    print!(
        "{}",
        config::describe(
            run,
            run_matches,
            before.subcommand_matches("run"),
            file.as_ref()
        )
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = parse();
    if let Command::Config { run_args } = cli.command {
        return print_config(run_args);
    }
    telemetry::init();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    match cli.command {
        Command::Watch(args) => {
            let format = args.format.unwrap_or(if std::io::stdout().is_terminal() {
                Format::Text
            } else {
                Format::Json
            });
            let config = args.sources.pipeline();
            config.validate()?;
            let mut sinks = Sinks::stdout(format, sinks::DEFAULT_QUEUE, StdoutGone::End)
                .context("starting the event log writer")?;
            runtime
                .block_on(watch::run(config, &mut sinks, shutdown_signal()))
                .context("hotplug-agent watch")
        }
        Command::Run(args) => runtime.block_on(run_command(*args)),
        Command::Events(args) => {
            let endpoint = match args.addr {
                Some(addr) => events::Endpoint::Tcp(addr),
                None => events::Endpoint::Unix(args.socket),
            };
            let request = events::StreamRequest {
                follow: args.follow,
                since: args.since,
                tail: args.tail,
                kinds: args.kind,
            };
            let colour = args.format == Format::Text && std::io::stdout().is_terminal();
            let mut out = std::io::stdout().lock();
            match runtime.block_on(events::follow(
                &endpoint,
                &request,
                args.format,
                colour,
                &mut out,
            )) {
                Err(events::EventsError::Write(e))
                    if e.kind() == std::io::ErrorKind::BrokenPipe =>
                {
                    Ok(())
                }
                other => other.context("hotplug-agent events"),
            }
        }
        Command::Config { .. } => unreachable!("handled before the runtime starts"),
        Command::Status {
            format,
            every_method,
            root,
        } => {
            let status = runtime
                .block_on(async { status::collect(&root, every_method) })
                .context("reading the machine's capacity")?;
            status::write(&mut std::io::stdout().lock(), &status, format)
                .context("writing the status")
        }
    }
}
