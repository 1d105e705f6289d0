//! Diagnostics: tracing on stderr, `info` unless `RUST_LOG` says otherwise. aya logs through
//! `log`; tracing-subscriber's `tracing-log` feature (on by default) bridges it at init. The
//! event log is data on stdout and never goes through here.
use tracing_subscriber::{EnvFilter, fmt};

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
