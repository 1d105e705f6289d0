//! Refresh: make the kubelet re-read the machine.
//!
//! The kubelet caches cadvisor's `MachineInfo` at start-up and sets the pods' cgroup limit
//! from it once, so a restart is today's one complete remedy for hot-plugged capacity
//! (DESIGN.md). How the restart is done is pluggable:
//! - [`systemd`]: `RestartUnit` over D-Bus, waiting for the job (the default on a host);
//! - [`command`]: any program, split as a shell would and run without one (OpenRC,
//!   supervisors, the test suite's kubelet stand-in);
//! - `None`: report only.
//!
//! [`guard`] decides *whether* a refresh may start now (rate limit, hourly cap, back-off);
//! [`crate::checkpoint`] decides whether a restart is safe for the kubelet's static CPU and
//! memory managers. This module only performs the action and says how it went.
use std::{io, time::Duration};

pub mod command;
pub mod guard;
pub mod systemd;

pub use command::CommandConfig;
pub use guard::{Deferred, Guard, GuardConfig};
pub use systemd::SystemdConfig;

/// How the kubelet is made to re-read the machine.
#[derive(Clone, Debug)]
pub enum Backend {
    Systemd(SystemdConfig),
    Command(CommandConfig),
    None,
}

/// Which way the kubelet is made to re-read the machine: the `--refresh` value, and the
/// event log's `backend` name. One type for both, so the two cannot drift apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// RestartUnit of the kubelet's unit over the system D-Bus.
    Systemd,
    /// Run `--refresh-command`.
    Command,
    /// Report only.
    None,
}

impl Kind {
    /// `"systemd"`, `"command"` or `"none"`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Systemd => "systemd",
            Self::Command => "command",
            Self::None => "none",
        }
    }
}

impl Backend {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Systemd(_) => Kind::Systemd,
            Self::Command(_) => Kind::Command,
            Self::None => Kind::None,
        }
    }

    /// The `--refresh` value and the event log's name.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// How long one refresh action may take; `None` for the `none` backend.
    pub fn timeout(&self) -> Option<Duration> {
        match self {
            Self::Systemd(c) => Some(c.timeout),
            Self::Command(c) => Some(c.timeout),
            Self::None => None,
        }
    }
}

/// A finished refresh action.
#[derive(Debug)]
pub struct Outcome {
    pub backend: &'static str,
    /// One line for the event log, e.g. `RestartUnit kubelet.service: job .../job/42 done`.
    pub detail: String,
    pub duration: Duration,
}

/// Why a refresh action failed. Every variant names what was being done, so that the
/// message alone tells an operator what to fix.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    /// The backend has no way to perform this action (`stop`/`start` without a command, or
    /// the `none` backend).
    #[error("no {action} command configured ({backend} backend)")]
    NotConfigured {
        backend: &'static str,
        action: &'static str,
    },
    #[error("empty command line")]
    EmptyCommand,
    #[error("program not found: {program}")]
    ProgramNotFound {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("starting {program}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("waiting for `{command}`")]
    Wait {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` exited with status {code}{}", stderr_suffix(.stderr))]
    Exit {
        command: String,
        code: i32,
        stderr: String,
    },
    #[error("`{command}` was killed by signal {signal}{}", stderr_suffix(.stderr))]
    Signal {
        command: String,
        signal: i32,
        stderr: String,
    },
    /// The action did not finish in time. For a command, its whole process group has been
    /// killed; for systemd, the job may still run (systemd owns it).
    #[error("{what} did not finish within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("cannot connect to the D-Bus at {address}")]
    BusConnect {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd is not on the D-Bus at {address} (org.freedesktop.systemd1 has no owner)")]
    NoSystemd {
        address: String,
        #[source]
        source: zbus::Error,
    },
    #[error("unit {unit} not found")]
    NoSuchUnit {
        unit: String,
        #[source]
        source: zbus::Error,
    },
    #[error("systemd {method} {unit}")]
    Systemd {
        method: &'static str,
        unit: String,
        #[source]
        source: zbus::Error,
    },
    /// systemd ran the job and reports a result other than `done`: `failed`, `canceled`,
    /// `timeout`, `dependency`, `skipped`, `invalid` (man org.freedesktop.systemd1, JobRemoved).
    #[error("systemd {method} {unit}: job {job} finished with result \"{result}\"")]
    JobFailed {
        method: &'static str,
        unit: String,
        job: String,
        result: String,
    },
    #[error("the D-Bus connection to {address} closed before the job for {unit} finished")]
    BusClosed { address: String, unit: String },
}

fn stderr_suffix(stderr: &str) -> String {
    if stderr.is_empty() {
        String::new()
    } else {
        format!(": {stderr}")
    }
}

/// Restarts the kubelet; with [`Backend::None`], does nothing and says "report only".
pub async fn refresh(backend: &Backend) -> Result<Outcome, RefreshError> {
    match backend {
        Backend::Systemd(cfg) => systemd::restart_unit(cfg).await,
        Backend::Command(cfg) => command::run(&cfg.argv, cfg.timeout).await,
        Backend::None => Ok(Outcome {
            backend: "none",
            detail: "report only".to_owned(),
            duration: Duration::ZERO,
        }),
    }
}

/// Stops the kubelet, for the static-policy reset procedure (stop, move the checkpoint
/// aside, start).
pub async fn stop(backend: &Backend) -> Result<Outcome, RefreshError> {
    match backend {
        Backend::Systemd(cfg) => systemd::stop_unit(cfg).await,
        Backend::Command(cfg) => {
            command::run_optional(cfg.stop.as_deref(), "stop", cfg.timeout).await
        }
        Backend::None => Err(RefreshError::NotConfigured {
            backend: "none",
            action: "stop",
        }),
    }
}

/// Starts the kubelet again after [`stop`].
pub async fn start(backend: &Backend) -> Result<Outcome, RefreshError> {
    match backend {
        Backend::Systemd(cfg) => systemd::start_unit(cfg).await,
        Backend::Command(cfg) => {
            command::run_optional(cfg.start.as_deref(), "start", cfg.timeout).await
        }
        Backend::None => Err(RefreshError::NotConfigured {
            backend: "none",
            action: "start",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commands(stop: Option<&[&str]>) -> Backend {
        let argv = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        Backend::Command(CommandConfig {
            argv: argv(&["true"]),
            stop: stop.map(argv),
            start: None,
            timeout: Duration::from_secs(5),
        })
    }

    #[tokio::test]
    async fn none_reports_only_and_cannot_stop() {
        let outcome = refresh(&Backend::None).await.expect("none always succeeds");
        assert_eq!(
            (outcome.backend, outcome.detail.as_str()),
            ("none", "report only")
        );
        let err = stop(&Backend::None)
            .await
            .expect_err("none cannot stop the kubelet");
        assert!(
            err.to_string().contains("no stop command configured"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn command_backend_dispatches_refresh_stop_and_start() {
        let backend = commands(Some(&["true"]));
        assert_eq!(backend.name(), "command");
        assert_eq!(
            refresh(&backend).await.expect("`true` succeeds").backend,
            "command"
        );
        stop(&backend).await.expect("the stop command is `true`");
        let err = start(&backend)
            .await
            .expect_err("no start command configured");
        assert_eq!(
            err.to_string(),
            "no start command configured (command backend)"
        );
    }
}
