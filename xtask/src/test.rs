//! `cargo xtask test [-- FILTER...]`: the whole suite.
//!
//! 1. setup, then one `cargo build` of every target, so the eBPF object is built once;
//! 2. every test but the privileged ones, in parallel (unit, doc, `agent/tests`, and the
//!    `hotplug-tests` targets in [`PARALLEL_TARGETS`]: the controller in-process against the
//!    fake API over a fixture sysfs, the manifests, the fake API itself);
//! 3. the privileged integration tests (the other `hotplug-tests` targets) one at a time:
//!    they take CPUs and memory blocks offline, which tests running side by side would see.
//!    Not root: through `sudo -E` as the test runner where sudo needs no password (cargo
//!    itself stays the developer's), else they skip themselves, loudly;
//! 4. the VM scenarios (`cargo xtask vm-test`, all of them: ~30 s here on an idle
//!    machine, ~90 s on a busy one, plus seed-scale's four 64 GiB guests, 4.6 min at load
//!    9), whose hotplug happens inside a QEMU guest, never here.
//!
//! libtest's `test result:` lines are counted while the output streams through, and a last
//! line `test: N passed, N failed` sums them.
use std::{
    env,
    io::{self, IsTerminal as _, Read as _, Write as _},
    process::{Command, ExitCode, Stdio},
};

use anyhow::Context as _;
use clap::Args as ClapArgs;

use crate::{process, setup, tally, workspace};

/// Arguments of `cargo xtask test [-- FILTER...]`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Test-name filter (and any other libtest arguments), applied to both phases.
    #[arg(last = true)]
    pub args: Vec<String>,
}

/// `hotplug-tests` targets that neither need root nor change the machine: they run with
/// the unprivileged tests, in parallel. Every other target there runs in the serial,
/// privileged phase, so a new test file is serial until someone says otherwise.
const PARALLEL_TARGETS: [&str; 4] = ["cli_env", "controller", "deploy", "fake_api"];

/// Spawned by the integration tests that run the agent.
const AGENT_BIN_ENV: &str = "HOTPLUG_AGENT_BIN";

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    setup::run()?;
    let root = process::is_root();
    let mut suite = Suite::default();
    tally::clear();

    // agent-ebpf is a no_std crate for the bpf target (agent/build.rs builds it); `--workspace`
    // would build it for the host too.
    let mut build = process::cargo();
    build.args([
        "build",
        "--workspace",
        "--exclude",
        "agent-ebpf",
        "--all-targets",
    ]);
    if let Err(err) = process::run(&mut build) {
        suite.failures.push(format!("{err:#}"));
        return Ok(suite.finish());
    }

    let agent_bin = match env::var_os(AGENT_BIN_ENV) {
        Some(bin) => {
            eprintln!(
                "note: {AGENT_BIN_ENV} already set, keeping {}",
                bin.to_string_lossy()
            );
            bin.into()
        }
        None => workspace::agent_binary("debug"),
    };
    let mut libtest_args = Vec::new();
    // Our pipe makes libtest think it is not on a terminal; its colours are stripped again
    // before the result lines are counted.
    if io::stdout().is_terminal() {
        libtest_args.extend(["--color".to_owned(), "always".to_owned()]);
    }
    let vm_filters = vm_filters(&args.args);
    libtest_args.extend(args.args);

    let mut unprivileged = process::cargo();
    unprivileged
        .args([
            "test",
            "--workspace",
            "--exclude",
            "agent-ebpf",
            "--exclude",
            "hotplug-tests",
        ])
        .args(["--no-fail-fast", "--"])
        .args(&libtest_args)
        .env(AGENT_BIN_ENV, &agent_bin);
    suite.run(&mut unprivileged)?;
    let mut parallel = process::cargo();
    parallel.args(["test", "-p", "hotplug-tests"]);
    for target in PARALLEL_TARGETS {
        parallel.args(["--test", target]);
    }
    parallel
        .args(["--no-fail-fast", "--"])
        .args(&libtest_args)
        .env(AGENT_BIN_ENV, &agent_bin);
    suite.run(&mut parallel)?;

    let mut privileged = process::cargo();
    privileged.args(["test", "-p", "hotplug-tests", "--lib", "--bins"]);
    for target in serial_targets()? {
        privileged.args(["--test", &target]);
    }
    if !root {
        if sudo_without_password() {
            eprintln!("note: not root; the privileged tests run through `sudo -E`");
            privileged.args(["--config", r#"target."cfg(all())".runner = "sudo -E""#]);
        } else {
            warn_unprivileged();
        }
    }
    privileged
        .args(["--no-fail-fast", "--", "--test-threads=1"])
        .args(&libtest_args)
        .env(AGENT_BIN_ENV, &agent_bin);
    suite.run(&mut privileged)?;

    // `cargo xtask vm-test`: it prints libtest's result line, counted like the others.
    // Through cargo, not our own executable: the build above may have replaced it.
    let mut vm = process::cargo();
    vm.args(["run", "--quiet", "--package", "xtask", "--", "vm-test"])
        .args(&vm_filters);
    suite.run(&mut vm)?;

    tally::report();
    Ok(suite.finish())
}

/// The test-name filters among libtest's arguments, for `vm-test` (names `vm::...`).
fn vm_filters(args: &[String]) -> Vec<String> {
    const WITH_VALUE: [&str; 7] = [
        "--skip",
        "--color",
        "--format",
        "--test-threads",
        "--logfile",
        "--shuffle-seed",
        "-Z",
    ];
    let mut filters = Vec::new();
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        if WITH_VALUE.contains(&arg.as_str()) {
            args.next();
        } else if !arg.starts_with('-') {
            filters.push(arg.clone());
        }
    }
    filters
}

/// The `hotplug-tests` integration targets not in [`PARALLEL_TARGETS`].
fn serial_targets() -> anyhow::Result<Vec<String>> {
    let dir = workspace::root().join("tests/tests");
    let mut targets = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
            && !PARALLEL_TARGETS.contains(&stem)
        {
            targets.push(stem.to_owned());
        }
    }
    targets.sort();
    Ok(targets)
}

/// `sudo -n true`: sudo is there and asks no password (so it cannot hang the suite).
fn sudo_without_password() -> bool {
    Command::new("sudo")
        .args(["-n", "true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn warn_unprivileged() {
    eprintln!(
        "\n!!! NOT ROOT, and sudo asks a password: the privileged integration tests\n\
         !!! (hotplug-tests) will skip themselves. Run `cargo xtask test` as root, or with\n\
         !!! passwordless sudo, to exercise real CPU and memory hotplug.\n"
    );
}

#[derive(Debug, Default)]
struct Suite {
    counts: Counts,
    failures: Vec<String>,
}

impl Suite {
    /// Runs one `cargo test`, streaming its stdout through while counting results. A failing
    /// command is recorded, not returned: the next phase still runs.
    fn run(&mut self, cmd: &mut Command) -> anyhow::Result<()> {
        process::echo(cmd);
        let mut child = cmd
            .stdout(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting `{}`", process::display(cmd)))?;
        let mut pipe = child.stdout.take().context("child stdout not piped")?;
        let mut stdout = io::stdout().lock();
        let mut forward = true;
        let mut line = Vec::new();
        let mut buf = [0; 8192];
        loop {
            let n = match pipe.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(err).context("reading cargo test's output"),
            };
            // Forwarded as it comes, not per line: libtest prints `test name ... ` before a
            // (possibly long) test runs and `ok` after. If our own stdout goes away (`| head`),
            // keep draining so that cargo does not block.
            forward = forward
                && stdout
                    .write_all(&buf[..n])
                    .and_then(|()| stdout.flush())
                    .is_ok();
            for &byte in &buf[..n] {
                if byte == b'\n' {
                    self.counts.add_line(&String::from_utf8_lossy(&line));
                    line.clear();
                } else {
                    line.push(byte);
                }
            }
        }
        self.counts.add_line(&String::from_utf8_lossy(&line));
        let status = child.wait().context("waiting for cargo test")?;
        if !status.success() {
            self.failures
                .push(format!("`{}` failed ({status})", process::display(cmd)));
        }
        Ok(())
    }

    fn finish(self) -> ExitCode {
        for failure in &self.failures {
            eprintln!("error: {failure}");
        }
        println!(
            "test: {} passed, {} failed",
            self.counts.passed, self.counts.failed
        );
        if self.failures.is_empty() && self.counts.failed == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
struct Counts {
    passed: u64,
    failed: u64,
}

impl Counts {
    /// Adds libtest's `test result: ok. 3 passed; 0 failed; 1 ignored; ...` line, if `line` is
    /// one (possibly coloured).
    fn add_line(&mut self, line: &str) {
        let line = strip_ansi(line);
        let Some(rest) = line.trim_start().strip_prefix("test result:") else {
            return;
        };
        for part in rest.split(';') {
            let words: Vec<&str> = part.split_whitespace().collect();
            let [.., count, label] = words[..] else {
                continue;
            };
            let Ok(count) = count.parse::<u64>() else {
                continue;
            };
            match label {
                "passed" => self.passed += count,
                "failed" => self.failed += count,
                _ => {}
            }
        }
    }
}

/// `line` without ANSI escape sequences (`ESC [ ... final-byte`, `ESC ( B`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\x1b' {
            out.push(c);
            continue;
        }
        match chars.next() {
            // CSI: parameters and intermediates, up to the final byte in '@'..='~'.
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            // Character set designation, e.g. `ESC ( B` that terminfo's sgr0 emits.
            Some('(' | ')') => {
                chars.next();
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(lines: &[&str]) -> Counts {
        let mut counts = Counts::default();
        for line in lines {
            counts.add_line(line);
        }
        counts
    }

    #[test]
    fn sums_result_lines() {
        let counts = count(&[
            "running 3 tests",
            "test capacity::tests::parses ... ok",
            "test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.01s",
            "test result: FAILED. 4 passed; 2 failed; 0 ignored; 0 measured; 5 filtered out; finished in 1.20s",
            "test result: ok. 0 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ]);
        assert_eq!(
            counts,
            Counts {
                passed: 7,
                failed: 2
            }
        );
    }

    #[test]
    fn reads_coloured_result_lines() {
        let counts = count(&[
            "test result: \x1b[32mok\x1b[0m. 5 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
            "test result: \x1b[31mFAILED\x1b(B\x1b[m. 1 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        ]);
        assert_eq!(
            counts,
            Counts {
                passed: 6,
                failed: 1
            }
        );
    }

    #[test]
    fn passes_only_name_filters_to_the_vm_step() {
        let args: Vec<String> = [
            "vm",
            "--exact",
            "--skip",
            "slow",
            "--test-threads=1",
            "dimm",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(vm_filters(&args), ["vm", "dimm"]);
    }

    #[test]
    fn strips_escapes() {
        assert_eq!(
            strip_ansi("\x1b[32mok\x1b(B\x1b[m. 1 passed"),
            "ok. 1 passed"
        );
    }

    #[test]
    fn ignores_other_lines() {
        let counts = count(&[
            "test result_lines_are_parsed ... ok",
            "failures:",
            "    3 passed; 1 failed",
            "",
        ]);
        assert_eq!(counts, Counts::default());
    }
}
