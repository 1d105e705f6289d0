//! Suites measured by a test of `tests/` (it has the fake API, the stand-in and the
//! machine guards at hand): run it with cargo and read the one line of figures it prints.
use std::{
    io::{BufRead as _, BufReader},
    process::{Command, Stdio},
};

use anyhow::{Context as _, bail};

use crate::process;

/// `cargo test -p hotplug-tests --test TARGET -- --exact NAME --nocapture ARGS…`, its stdout
/// piped for [`json_line`].
pub fn test_command(target: &str, name: &str, args: &[&str]) -> Command {
    let mut cmd = process::cargo();
    cmd.args(["test", "-p", "hotplug-tests", "--test", target, "--"])
        .args(["--exact", name, "--nocapture"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    cmd
}

/// Runs `cmd` and returns what follows `prefix` on the line that carries it; every other
/// line goes to stderr. `exited` runs as soon as the test has ended, whatever its status
/// (putting the machine back), before a failed status is reported.
pub fn json_line(
    mut cmd: Command,
    prefix: &str,
    exited: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let mut child = cmd.spawn().context("starting cargo test")?;
    let stdout = child
        .stdout
        .take()
        .context("cargo test's stdout not piped")?;
    let mut json = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading cargo test's stdout")?;
        // The test starts its line with a newline, but libtest's own `test NAME ... ` may
        // still share it: look for the prefix anywhere.
        match line.find(prefix) {
            Some(at) => {
                json = Some(line[at + prefix.len()..].to_owned());
                if at > 0 {
                    eprintln!("{}", &line[..at]);
                }
            }
            None => eprintln!("{line}"),
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    exited()?;
    if !status.success() {
        bail!(
            "`{}` failed ({status}); its output is above",
            process::display(&cmd)
        );
    }
    json.with_context(|| format!("the test printed no {prefix}line"))
}
