//! `cargo xtask run [-- ARGS...]`: setup, a release build of the agent, then the agent itself
//! in place of this process, so that its exit code and signals (Ctrl-C) are its own.
use std::{env, os::unix::process::CommandExt as _, process::Command};

use anyhow::{Context as _, ensure};
use clap::Args as ClapArgs;

use crate::{
    process::{self, Privilege},
    setup, workspace,
};

/// Arguments of `cargo xtask run [-- ARGS...]`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Arguments for `hotplug-agent`, replacing the default `watch`
    /// (e.g. `cargo xtask run -- status --format json`).
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    setup::run()?;
    process::run(process::cargo().args(["build", "--release", "-p", "hotplug-agent"]))?;
    let binary = workspace::agent_binary("release");
    ensure!(
        binary.is_file(),
        "{} not found after the build",
        binary.display()
    );

    let agent_args = if args.args.is_empty() {
        vec!["watch".to_owned()]
    } else {
        args.args
    };
    // The eBPF probes and the large netlink receive buffer (SO_RCVBUFFORCE) need root.
    let mut cmd = match Privilege::current() {
        Privilege::Root => Command::new(&binary),
        Privilege::Sudo(sudo) => {
            let mut cmd = Command::new(sudo);
            // sudo resets the environment; keep the log filter the user asked for.
            if env::var_os("RUST_LOG").is_some() {
                cmd.arg("--preserve-env=RUST_LOG");
            }
            cmd.arg(&binary);
            cmd
        }
        Privilege::None => {
            eprintln!(
                "note: not root and no sudo: running unprivileged; the agent says which \
                 sources it could not start"
            );
            Command::new(&binary)
        }
    };
    cmd.args(&agent_args);
    process::echo(&cmd);
    let err = cmd.exec();
    Err(err).with_context(|| format!("starting {}", binary.display()))
}
