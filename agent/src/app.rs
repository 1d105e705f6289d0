//! What each command wires together: sources, sinks, listeners, the kube client and the
//! controller. `main` parses the command line ([`crate::cli`]) and calls [`main`].
use std::{
    io::{self, IsTerminal},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use crate::{
    cli::{Cli, Command, EventsArgs, RunArgs},
    episode,
    error::RunError,
    events, kube_client,
    pipeline::InvalidSetting,
    refresh::{self, command::CommandParseError},
    report::{
        Format,
        metrics::{self, Metrics},
        sinks::{self, FileSink, Sinks, StdoutGone},
        stream::{self, Hub, SocketError},
    },
    run, sources, status, watch,
};

/// Why a command could not start, or ended with an error. Each says what was being done.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("starting the tokio runtime")]
    Runtime(#[source] io::Error),
    #[error(transparent)]
    Setting(#[from] InvalidSetting),
    #[error(transparent)]
    Config(crate::config::ConfigError),
    #[error("--refresh command needs --refresh-command 'PROGRAM ARG...'")]
    NoRefreshCommand,
    #[error("{flag} {line:?}")]
    CommandLine {
        flag: &'static str,
        line: String,
        #[source]
        source: CommandParseError,
    },
    #[error("reading the hostname (set --node-name or NODE_NAME)")]
    Hostname(#[source] io::Error),
    #[error("starting the {0} writer")]
    Output(&'static str, #[source] io::Error),
    #[error("opening the log file {path}")]
    LogFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("serving {what} on {addr}")]
    Listen {
        what: &'static str,
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("serving the event stream")]
    StreamSocket(#[from] SocketError),
    #[error("hotplug-agent {0}")]
    Run(&'static str, #[source] RunError),
    #[error("hotplug-agent events")]
    Events(#[source] events::EventsError),
    #[error("reading the machine's capacity")]
    Status(#[source] crate::capacity::CapacityError),
    #[error("writing the {0}")]
    Write(&'static str, #[source] io::Error),
    #[error("hotplug-agent config")]
    Describe(#[from] crate::cli::DescribeError),
    #[error("hotplug-agent run")]
    Client(#[source] kube_client::ClientError),
}

/// Runs the command `cli` asks for, to its end.
pub fn main(mut cli: Cli) -> Result<(), AppError> {
    let origins = std::mem::take(&mut cli.origins);
    command(cli).map_err(|e| match e {
        // Found after parsing, so named by its flag: by the file and key where it came
        // from the config file, by the variable where it came from the environment, as the
        // parse errors are.
        AppError::Setting(s) => origins
            .error_for(s.flag, s.problem)
            .map_or(AppError::Setting(s), AppError::Config),
        e => e,
    })
}

fn command(cli: Cli) -> Result<(), AppError> {
    match cli.command {
        Command::Config { local, run_args } => {
            let asked_here = local || !run_args.is_empty();
            let computed = crate::cli::describe_run(run_args)?;
            if asked_here {
                print!(
                    "# computed here from this command's flags, environment and config file\n\
                     {computed}"
                );
            } else {
                print!(
                    "{}",
                    crate::running_config::show(&computed, crate::running_config::TIMEOUT)
                );
            }
            return Ok(());
        }
        Command::Completions { shell } => {
            crate::cli::completions(shell, &mut io::stdout().lock());
            return Ok(());
        }
        Command::Man { subcommand } => {
            return crate::cli::man(subcommand.as_deref(), &mut io::stdout().lock())
                .map_err(|e| AppError::Write("man page", e));
        }
        _ => {}
    }
    crate::telemetry::init(cli.color.enabled(io::stderr().is_terminal()));
    // One thread: the agent's work is waiting; blocking work has threads of its own.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(AppError::Runtime)?;
    match cli.command {
        Command::Watch(args) => {
            let format = args.format.unwrap_or(if io::stdout().is_terminal() {
                Format::Text
            } else {
                Format::Json
            });
            let config = args.sources.pipeline();
            config.validate()?;
            let mut sinks = Sinks::stdout(format, sinks::DEFAULT_QUEUE, StdoutGone::End)
                .map_err(|e| AppError::Output("event log", e))?;
            runtime
                .block_on(watch::run(config, &mut sinks, shutdown_signal()))
                .map_err(|e| AppError::Run("watch", e))
        }
        Command::Run(args) => runtime.block_on(run_command(*args, own_config())),
        Command::Events(args) => runtime.block_on(events_command(args, cli.color)),
        Command::Config { .. } | Command::Completions { .. } | Command::Man { .. } => {
            unreachable!("handled before the runtime starts")
        }
        Command::Status {
            format,
            every_method,
            root,
        } => {
            let status = runtime
                .block_on(async { status::collect(&root, every_method) })
                .map_err(AppError::Status)?;
            status::write(&mut io::stdout().lock(), &status, format)
                .map_err(|e| AppError::Write("status", e))
        }
        Command::Checkpoint {
            kubelet_root_dir,
            format,
            root,
        } => {
            use crate::checkpoint::{update, view};
            let snapshot = crate::capacity::read_snapshot(&root).map_err(AppError::Status)?;
            let machine = update::Machine::new(&snapshot, update::reserved_cpus(&kubelet_root_dir));
            let found = update::inspect(&kubelet_root_dir, &machine);
            view::write(&mut io::stdout().lock(), &found, format)
                .map_err(|e| AppError::Write("checkpoint report", e))
        }
    }
}

async fn events_command(args: EventsArgs, color: crate::cli::Color) -> Result<(), AppError> {
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
    // As `watch`: text for a person, json for a pipe.
    let terminal = io::stdout().is_terminal();
    let format = args
        .format
        .unwrap_or(if terminal { Format::Text } else { Format::Json });
    let colour = format == Format::Text && color.enabled(terminal);
    let mut out = io::stdout().lock();
    match events::follow(&endpoint, &request, format, colour, &mut out).await {
        // `hotplug-agent events | head`: the reader had enough.
        Err(events::EventsError::Write(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(AppError::Events),
    }
}

/// `--refresh` and its flags, as the backend that acts.
fn backend(args: &RunArgs) -> Result<refresh::Backend, AppError> {
    let command = |flag: &'static str, line: &str| {
        refresh::command::parse(line).map_err(|source| AppError::CommandLine {
            flag,
            line: line.to_owned(),
            source,
        })
    };
    Ok(match args.refresh {
        refresh::Kind::None => refresh::Backend::None,
        refresh::Kind::Systemd => refresh::Backend::Systemd(refresh::systemd::SystemdConfig {
            unit: args.kubelet_unit.clone(),
            bus_address: args.systemd_bus.clone(),
            timeout: args.refresh_timeout,
        }),
        refresh::Kind::Command => {
            let line = args
                .refresh_command
                .as_deref()
                .ok_or(AppError::NoRefreshCommand)?;
            refresh::Backend::Command(refresh::command::CommandConfig {
                argv: command("--refresh-command", line)?,
                stop: (args.kubelet_stop_command.as_deref())
                    .map(|l| command("--kubelet-stop-command", l))
                    .transpose()?,
                start: (args.kubelet_start_command.as_deref())
                    .map(|l| command("--kubelet-start-command", l))
                    .transpose()?,
                timeout: args.refresh_timeout,
            })
        }
    })
}

/// The API client, or none on a host outside any cluster. Never fails: a missing or
/// broken kubeconfig, or no trust store, would crash-loop a unit. The stand-in client
/// fails every request with the reason, which the first reconcile reports once
/// (`api_unreachable`); the agent records events meanwhile, refreshes nothing, and picks
/// up a fixed kubeconfig on a retry. Fails only where no retry can help: a server that is
/// not http(s)://.
async fn client(args: &RunArgs) -> Result<Option<kube::Client>, AppError> {
    if args.no_kubernetes {
        return Ok(None);
    }
    Ok(match kube_client::build(args.kubeconfig.as_deref()).await {
        Ok(c) => Some(c),
        Err(e) if e.is_permanent() => return Err(AppError::Client(e)),
        // A host outside any cluster: events, stream, metrics, nothing to reconcile.
        Err(e) if args.refresh == refresh::Kind::None && args.kubeconfig.is_none() => {
            tracing::info!(
                "no Kubernetes configuration ({}); running standalone",
                sources::error_chain(&e)
            );
            None
        }
        Err(_) => Some(kube_client::lazy(args.kubeconfig.clone())),
    })
}

fn run_config(args: &RunArgs) -> Result<run::Config, AppError> {
    let node_name = match args.node_name.clone() {
        Some(n) => n,
        None => hostname().map_err(AppError::Hostname)?,
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
        backend: backend(args)?,
        guard: refresh::guard::GuardConfig {
            min_interval: args.min_refresh_interval,
            max_per_hour: args.max_refreshes_per_hour,
            state_file: state_dir(args.state_dir.clone())
                .map(|d| d.join(refresh::guard::STATE_FILE)),
            ..refresh::guard::GuardConfig::default()
        },
        verify_timeout: args.verify_timeout,
        api_timeout: args.api_timeout,
        kubelet_root: args.kubelet_root_dir.clone(),
        kubelet_config: args
            .kubelet_config
            .clone()
            .unwrap_or_else(|| args.kubelet_root_dir.join("config.yaml")),
        static_policy: args.static_policy,
        shrink_policy: args.shrink_policy,
        cgroup_root: args.cgroup_root.clone(),
        fleet: crate::fleet::Config {
            namespace: args.lease_namespace.clone(),
            restarts: args.max_concurrent_restarts,
            drains: args.max_concurrent_drains,
            lease_duration: args.lease_duration,
        },
    };
    config.validate()?;
    Ok(config)
}

/// The sinks of `run`: stdout, and the stream, the log file and the metrics as asked.
async fn run_sinks(args: &RunArgs, metrics: &Arc<Metrics>) -> Result<Sinks<'static>, AppError> {
    let mut sinks = Sinks::stdout(args.format, args.output_queue, StdoutGone::CarryOn)
        .map_err(|e| AppError::Output("event log", e))?;
    sinks.metrics = Some(metrics.clone());
    if args.metrics_addr != "off" {
        metrics::serve(metrics.clone(), &args.metrics_addr)
            .await
            .map_err(|source| AppError::Listen {
                what: "metrics",
                addr: args.metrics_addr.clone(),
                source,
            })?;
    }
    if args.stream_socket != "off" || args.stream_tcp.is_some() {
        let hub = Hub::new(args.stream_replay, stream::DEFAULT_CLIENT_QUEUE);
        if args.stream_socket != "off" {
            stream::serve_unix(hub.clone(), Path::new(&args.stream_socket)).await?;
        }
        if let Some(addr) = &args.stream_tcp {
            stream::serve_tcp(hub.clone(), addr)
                .await
                .map_err(|source| AppError::Listen {
                    what: "the event stream",
                    addr: addr.clone(),
                    source,
                })?;
        }
        sinks.hub = Some(hub);
    }
    if let Some(path) = &args.log_file {
        let file = FileSink::open(path.clone(), args.log_file_max_bytes, args.log_file_keep)
            .map_err(|source| AppError::LogFile {
                path: path.clone(),
                source,
            })?;
        sinks
            .set_file(file, args.output_queue)
            .map_err(|e| AppError::Output("log file", e))?;
    }
    Ok(sinks)
}

/// `hotplug-agent config` with this process's own `run` arguments and environment: what
/// `/config` serves, so that what runs can be read back, not recomputed elsewhere.
fn own_config() -> Option<String> {
    let mut args = std::env::args_os().skip(1).skip_while(|a| a != "run");
    args.next()?;
    match crate::cli::describe_run(args.collect()) {
        Ok(description) => Some(description),
        Err(e) => {
            tracing::warn!(
                "cannot describe the configuration for /config: {}",
                crate::sources::error_chain(&e)
            );
            None
        }
    }
}

async fn run_command(args: RunArgs, described: Option<String>) -> Result<(), AppError> {
    let config = run_config(&args)?;
    let client = client(&args).await?;
    let metrics = Metrics::new();
    if let Some(d) = described {
        metrics.set_config(d);
    }
    let mut sinks = run_sinks(&args, &metrics).await?;
    let notify = systemd_notify(metrics);
    run::run(config, client, &mut sinks, shutdown_signal(), notify)
        .await
        .map_err(|e| AppError::Run("run", e))
}

/// Under systemd (`Type=notify`): `STATUS=starting: ...` until then, READY=1 once running (sources listening, first reconcile
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
        // STATUS= from the first record on: before READY=1 too, so that `systemctl status`
        // says what the start waits for (the first reconcile: the Kubernetes API).
        let running = metrics.running();
        let status = match metrics.ready() {
            Ok(()) => match metrics.ready_note() {
                Some(_) => "ready; the Kubernetes API is unreachable (retrying)".to_string(),
                None => "ready".to_string(),
            },
            Err(why) if running => format!("running, not ready: {why}"),
            Err(why) => format!("starting: {why}"),
        };
        if status != last_status {
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
            last_status = status;
        }
        if running && !notified {
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

fn hostname() -> io::Result<String> {
    Ok(std::fs::read_to_string("/proc/sys/kernel/hostname")?
        .trim()
        .to_string())
}

/// SIGTERM (systemd, the kubelet) or Ctrl-C.
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
