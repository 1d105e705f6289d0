//! fake-apiserver: the in-process fake API server (`hotplug_tests::fake_api`) as a
//! process of its own, for places a test cannot run in: the QEMU guest of
//! `cargo xtask vm-test`.
//!
//! `fake-apiserver --kubeconfig PATH` serves plain HTTP on 127.0.0.1 (a free port),
//! prints `listening on http://127.0.0.1:PORT` on stdout, then writes a kubeconfig for
//! it to PATH (atomically: once the file exists it is complete, so it doubles as the
//! readiness signal), and runs until SIGTERM or SIGINT. What it reproduces of a real
//! kube-apiserver, and what not, is in the `fake_api` module's documentation.
use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::Context as _;
use clap::Parser;
use hotplug_tests::fake_api::FakeApi;
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "fake-apiserver",
    about = "A fake kube-apiserver on 127.0.0.1 (plain HTTP) until SIGTERM"
)]
struct Cli {
    /// Where to write a kubeconfig for it (written once it listens).
    #[arg(long)]
    kubeconfig: PathBuf,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("building the runtime")
        .and_then(|rt| rt.block_on(serve(&cli.kubeconfig)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fake-apiserver: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(kubeconfig: &Path) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    // The server runs on its own thread and runtime; this one only waits for a signal.
    let api = FakeApi::start().await;
    println!("listening on {}", api.url());
    std::io::stdout().flush().context("writing stdout")?;
    let mut tmp = kubeconfig.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    api.write_kubeconfig(&tmp);
    fs::rename(&tmp, kubeconfig)
        .with_context(|| format!("renaming {} to {}", tmp.display(), kubeconfig.display()))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    drop(api);
    Ok(())
}
