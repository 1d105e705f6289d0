//! The `hotplug-agent` binary: parses the command line and wires the library together.
use std::{io::IsTerminal, path::PathBuf, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use hotplug_agent::{
    pipeline::{self, Rescan},
    report::Format,
    status, telemetry, watch,
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
    /// Print the machine's capacity and which probes can attach here.
    Status {
        #[arg(long, value_enum, default_value = "text")]
        format: Format,
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
    /// Filesystem root holding proc/ and sys/.
    #[arg(long, default_value = "/", hide = true)]
    root: PathBuf,
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
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
            let config = pipeline::Config {
                root: args.root,
                ebpf: !args.no_ebpf,
                uevent: !args.no_uevent,
                uevent_rcvbuf: args.uevent_rcvbuf,
                rescan: args.rescan_interval,
                ..pipeline::Config::default()
            };
            let mut out = std::io::stdout().lock();
            runtime
                .block_on(watch::run(config, format, &mut out, shutdown_signal()))
                .context("hotplug-agent watch")
        }
        Command::Status { format, root } => {
            let status = runtime
                .block_on(async { status::collect(&root) })
                .context("reading the machine's capacity")?;
            status::write(&mut std::io::stdout().lock(), &status, format)
                .context("writing the status")
        }
    }
}
