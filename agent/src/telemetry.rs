//! Diagnostics: tracing on stderr, `info` unless `RUST_LOG` says otherwise. aya logs through
//! `log`; tracing-subscriber's `tracing-log` feature (on by default) bridges it at init. The
//! event log is data on stdout and never goes through here.
use tracing_subscriber::{EnvFilter, fmt};

/// `ansi`: colour the diagnostics (`--color`; by default only when stderr is a terminal and
/// NO_COLOR is unset): escape codes in journald or `kubectl logs` are noise.
pub fn init(ansi: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .with_target(false)
        .try_init();
}
