//! `cargo xtask vm-test [--scenario NAME]... [FILTER]...`: real ACPI DIMM, virtio-mem and
//! CPU hotplug in a QEMU guest (TCG) with the agent inside, driven from here over QMP
//! (recipe and traps: ../shared/VM-HOTPLUG.md).
//!
//! 1. setup (qemu-system-x86, busybox-static, kmod, cpio), then the binaries: the agent in
//!    release (its latencies are figures), the test doubles as `cargo xtask test` builds them;
//! 2. [`kernel`]: Debian's kernel (cached in `target/vm`); [`image`]: the initramfs;
//! 3. [`qemu`]: boots the guest; [`guest`]: its control shell and the agent's records over
//!    virtio-serial; [`qmp`]: the QMP client;
//! 4. the scenarios ([`scenarios`], [`incident`], [`seed_scale`]) over a
//!    [`session::Session`] and its [`moves`] (plug, unplug), each asserting on the agent's
//!    own records; results print as libtest does, so that `cargo xtask test` counts them,
//!    followed by the figures and the probe coverage of the guest kernel against this
//!    host's.
//!
//! Skips (and says so) only where QEMU cannot run at all: no `qemu-system-x86_64`.
use std::{
    path::{Path, PathBuf},
    process::{Command, ExitCode},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use clap::Args as ClapArgs;
use serde_json::Value;

use crate::{process, setup, workspace};

mod guest;
mod image;
mod incident;
mod kernel;
mod moves;
mod qemu;
mod qmp;
mod scenarios;
mod seed_scale;
mod session;
mod shrink;
mod static_cpu;
mod systemd;
// The container path: the image and the DaemonSet's pod under podman, in a systemd guest.
mod container;

/// Arguments of `cargo xtask vm-test`.
#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Run only these scenarios (repeatable): dimm, virtio-mem, cpu, manual-offline,
    /// unplug, incident, static-cpu, shrink-unplug, seed-scale. Default: all.
    #[arg(long = "scenario", value_name = "NAME")]
    pub scenarios: Vec<String>,
    /// Run only the scenarios whose test name (`vm::dimm_hot_add`, ...) contains one of these.
    pub filters: Vec<String>,
}

/// Measurements for the closing summary, one line each.
pub type Figures = Vec<String>;

type Run = fn(&mut session::Session, &mut Figures) -> anyhow::Result<()>;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Guest {
    /// `hotplug-agent watch` with auto-online, started at boot.
    Watch,
    /// A fresh guest; the scenario starts what it needs.
    Incident,
    /// A fresh guest for each scenario, on [`seed_scale::MACHINE`] (room for 64 GiB):
    /// the state a 64 GiB hot-add leaves is not worth undoing.
    SeedScale,
}

struct Scenario {
    name: &'static str,
    test: &'static str,
    guest: Guest,
    run: Run,
}

/// In the order they run: unplug undoes what the plugs before it did.
const SCENARIOS: [Scenario; 13] = [
    Scenario {
        name: "dimm",
        test: "vm::dimm_hot_add",
        guest: Guest::Watch,
        run: scenarios::dimm_hot_add,
    },
    Scenario {
        name: "virtio-mem",
        test: "vm::virtio_mem_grow",
        guest: Guest::Watch,
        run: scenarios::virtio_mem_grow,
    },
    Scenario {
        name: "cpu",
        test: "vm::cpu_hot_add",
        guest: Guest::Watch,
        run: scenarios::cpu_hot_add,
    },
    Scenario {
        name: "manual-offline",
        test: "vm::auto_online_leaves_manual_offline",
        guest: Guest::Watch,
        run: scenarios::manual_offline,
    },
    Scenario {
        name: "unplug",
        test: "vm::unplug_safe_order",
        guest: Guest::Watch,
        run: scenarios::unplug,
    },
    Scenario {
        name: "incident",
        test: "vm::incident_end_to_end",
        guest: Guest::Incident,
        run: incident::incident,
    },
    Scenario {
        name: "static-cpu",
        test: "vm::static_cpu_update_in_place",
        guest: Guest::Incident,
        run: static_cpu::static_cpu_hot_add,
    },
    Scenario {
        name: "shrink-unplug",
        test: "vm::shrink_pins_stall_the_unplug",
        guest: Guest::Incident,
        run: shrink::pins_stall_the_unplug,
    },
    Scenario {
        name: "shrink-unplug",
        test: "vm::shrink_evicts_while_the_kernel_offlines",
        guest: Guest::Incident,
        run: shrink::shrink_evicts_while_the_kernel_offlines,
    },
    Scenario {
        name: "seed-scale",
        test: "vm::seed_scale_dimm_agent_online",
        guest: Guest::SeedScale,
        run: seed_scale::dimm_agent_online,
    },
    Scenario {
        name: "seed-scale",
        test: "vm::seed_scale_dimm_kernel_online",
        guest: Guest::SeedScale,
        run: seed_scale::dimm_kernel_online,
    },
    Scenario {
        name: "seed-scale",
        test: "vm::seed_scale_dimm_paced_online",
        guest: Guest::SeedScale,
        run: seed_scale::dimm_paced_online,
    },
    Scenario {
        name: "seed-scale",
        test: "vm::seed_scale_virtio_mem_steps",
        guest: Guest::SeedScale,
        run: seed_scale::virtio_mem_steps,
    },
];

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    setup::run()?;
    let selected = select(&args)?;
    let systemd_selected = systemd::select(&args);
    let container_selected = container::select(&args);
    let filtered_out = SCENARIOS.len() + systemd::SCENARIOS.len() + container::SCENARIOS.len()
        - selected.len()
        - systemd_selected.len()
        - container_selected.len();
    let count = selected.len() + systemd_selected.len() + container_selected.len();
    println!("\nrunning {count} VM scenarios");
    if count == 0 {
        print_result(0, 0, 0, filtered_out, started.elapsed());
        return Ok(ExitCode::SUCCESS);
    }
    if process::which("qemu-system-x86_64").is_none() {
        eprintln!(
            "\n!!! SKIP VM scenarios: qemu-system-x86_64 not found after setup \
             (install qemu-system-x86); QEMU cannot run here.\n"
        );
        let tests = selected.iter().map(|s| s.test);
        let tests = tests.chain(systemd_selected.iter().map(|s| s.test));
        for test in tests.chain(container_selected.iter().map(|s| s.test)) {
            println!("test {test} ... ignored (no qemu-system-x86_64)");
        }
        print_result(0, 0, count, filtered_out, started.elapsed());
        return Ok(ExitCode::SUCCESS);
    }

    let dir = workspace::target_dir().join("vm");
    let systemd_image = systemd::prepare_image(&systemd_selected, &dir);
    let prepared = (|| {
        let bins = build()?;
        let image = image::prepare(&dir, &bins)?;
        anyhow::Ok((bins, image))
    })();
    let (bins, image) = match prepared {
        Ok(p) => p,
        Err(e) => {
            // Nothing ran: every selected scenario failed to start.
            eprintln!("error: preparing the guest: {e:#}");
            let tests = selected.iter().map(|s| s.test);
            let tests = tests.chain(systemd_selected.iter().map(|s| s.test));
            for test in tests.chain(container_selected.iter().map(|s| s.test)) {
                println!("test {test} ... FAILED (guest not prepared)");
            }
            print_result(0, count, 0, filtered_out, started.elapsed());
            return Ok(ExitCode::FAILURE);
        }
    };
    let prepared_in = started.elapsed();
    eprintln!(
        "vm: guest kernel {} ({}), initramfs {}",
        image.package,
        image.kernel.display(),
        image.initrd.display()
    );

    let mut outcome = run_scenarios(&selected, &image, &dir);
    systemd::run_group(&systemd_selected, systemd_image, &bins, &mut outcome);
    container::run_group(&container_selected, &dir, &bins, &mut outcome);
    let Outcome {
        passed,
        failures,
        mut figures,
        guest_ready,
        ignored,
    } = outcome;
    if !failures.is_empty() {
        println!("\nfailures:");
        for (test, message) in &failures {
            println!("\n---- {test} ----\n{message}");
        }
        println!("\nfailures:");
        for (test, _) in &failures {
            println!("    {test}");
        }
    }
    let wall = started.elapsed();
    figures.push(format!(
        "VM suite wall time {:.1} s for {} scenarios: {:.1} s in guests, {:.1} s setup, build and image",
        wall.as_secs_f64(),
        count,
        (wall - prepared_in).as_secs_f64(),
        prepared_in.as_secs_f64()
    ));
    println!("\nVM figures:");
    for line in &figures {
        println!("  {line}");
    }
    probe_coverage(guest_ready.as_ref(), &bins.agent, &image.package);
    print_result(passed, failures.len(), ignored, filtered_out, wall);
    Ok(if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What the scenarios left: counts, failure messages, figures, the guest agent's `ready`.
#[derive(Default)]
struct Outcome {
    passed: usize,
    failures: Vec<(&'static str, String)>,
    figures: Figures,
    guest_ready: Option<Value>,
    /// Scenarios that could not run here, said why.
    ignored: usize,
}

/// Each group in one guest, booted for its first scenario; a failure costs the guest, and
/// the next scenario boots a fresh one.
fn run_scenarios(selected: &[&'static Scenario], image: &image::Image, dir: &Path) -> Outcome {
    let mut out = Outcome::default();
    for guest in [Guest::Watch, Guest::Incident, Guest::SeedScale] {
        let group: Vec<&Scenario> = selected
            .iter()
            .copied()
            .filter(|s| s.guest == guest)
            .collect();
        let mut session: Option<session::Session> = None;
        for scenario in group {
            if guest != Guest::Watch {
                // Dropped (QEMU quits) before the next one boots: an incident-style
                // scenario starts its own API server, stand-in and agent.
                session = None;
            }
            let t = Instant::now();
            let result = (|| {
                if session.is_none() {
                    // Scenarios that share a name (the seed-scale variants, shrink-unplug's
                    // control) each boot their own guest: each its own logs.
                    let shared = SCENARIOS.iter().filter(|o| o.name == scenario.name).count() > 1;
                    let name = if shared && guest != Guest::Watch {
                        scenario.test.trim_start_matches("vm::")
                    } else {
                        scenario.name
                    };
                    session = Some(boot(image, guest, dir, name, &mut out.figures)?);
                }
                let s = session.as_mut().context("no session")?;
                (scenario.run)(s, &mut out.figures)
            })();
            if out.guest_ready.is_none() {
                out.guest_ready = session.as_ref().and_then(|s| s.ready.clone());
            }
            match result {
                Ok(()) => {
                    out.passed += 1;
                    println!(
                        "test {} ... ok ({:.1} s)",
                        scenario.test,
                        t.elapsed().as_secs_f64()
                    );
                }
                Err(e) => {
                    println!(
                        "test {} ... FAILED ({:.1} s)",
                        scenario.test,
                        t.elapsed().as_secs_f64()
                    );
                    let diag = session
                        .as_mut()
                        .map(|s| s.diagnostics())
                        .unwrap_or_default();
                    out.failures.push((scenario.test, format!("{e:#}\n{diag}")));
                    // The guest's state is unknown now: the next scenario gets a fresh one.
                    session = None;
                }
            }
        }
    }
    out
}

/// libtest's summary line: `cargo xtask test` adds these counts to its own.
fn print_result(passed: usize, failed: usize, ignored: usize, filtered: usize, took: Duration) {
    let verdict = if failed == 0 { "ok" } else { "FAILED" };
    println!(
        "\ntest result: {verdict}. {passed} passed; {failed} failed; {ignored} ignored; 0 measured; \
         {filtered} filtered out; finished in {:.2}s\n",
        took.as_secs_f64()
    );
}

fn select(args: &Args) -> anyhow::Result<Vec<&'static Scenario>> {
    for name in &args.scenarios {
        if !SCENARIOS.iter().any(|s| s.name == name)
            && !systemd::SCENARIOS.iter().any(|s| s.name == name)
            && !container::SCENARIOS.iter().any(|s| s.name == name)
        {
            anyhow::bail!("unknown scenario {name:?}; known: {}", {
                let mut names = SCENARIOS.map(|s| s.name).to_vec();
                names.dedup();
                names.extend(systemd::SCENARIOS.map(|s| s.name));
                names.push(container::SCENARIOS[0].name);
                names.join(", ")
            });
        }
    }
    Ok(SCENARIOS
        .iter()
        .filter(|s| args.scenarios.is_empty() || args.scenarios.iter().any(|n| n == s.name))
        .filter(|s| {
            args.filters.is_empty() || args.filters.iter().any(|f| s.test.contains(f.as_str()))
        })
        .collect())
}

/// The agent in release (the guest runs it under TCG, and its latencies are figures);
/// the doubles in the dev profile, which `cargo xtask test` has built already.
fn build() -> anyhow::Result<image::Binaries> {
    process::run(process::cargo().args([
        "build",
        "--release",
        "-p",
        "hotplug-agent",
        "--bin",
        "hotplug-agent",
    ]))?;
    process::run(process::cargo().args(["build", "-p", "hotplug-tests", "--bins"]))?;
    let target = workspace::target_dir();
    Ok(image::Binaries {
        agent: workspace::agent_binary("release"),
        fake_apiserver: target.join("debug/fake-apiserver"),
        kubelet_standin: target.join("debug/kubelet-standin"),
        pod_standin: target.join("debug/pod-standin"),
    })
}

fn boot(
    image: &image::Image,
    guest: Guest,
    dir: &Path,
    first: &str,
    figures: &mut Figures,
) -> anyhow::Result<session::Session> {
    let logs: PathBuf = dir.join("logs").join(first);
    let (initrd, machine) = match guest {
        Guest::Watch => (&image.initrd, &qemu::Machine::DEFAULT),
        Guest::Incident => (&image.initrd_doubles, &qemu::Machine::DEFAULT),
        Guest::SeedScale => (&image.initrd_doubles, &seed_scale::MACHINE),
    };
    eprintln!(
        "vm: booting a guest for {first} (logs in {})",
        logs.display()
    );
    let vm = qemu::Vm::boot(image, initrd, machine, &logs)?;
    figures.push(format!(
        "boot to /init answering ({first}): {:.1} s",
        vm.boot_time.as_secs_f64()
    ));
    let mut s = session::Session::new(vm)?;
    if guest == Guest::Watch {
        // Offline before the agent starts: auto-online must never touch it.
        s.preplug_offline_dimm(s.block_size)?;
        let t = Instant::now();
        s.start_agent(scenarios::WATCH_ARGS)?;
        figures.push(format!(
            "guest agent start to `ready`: {:.2} s",
            t.elapsed().as_secs_f64()
        ));
    }
    Ok(s)
}

/// Which probes attached in the guest kernel (its agent's ready record) and on this host
/// (`hotplug-agent status --format json`), side by side.
fn probe_coverage(guest: Option<&Value>, agent: &Path, package: &str) {
    let host = Command::new(agent)
        .args(["status", "--format", "json"])
        .output()
        .ok()
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok());
    let probes = |v: Option<&Value>| -> Vec<(String, String)> {
        v.and_then(|v| v["probes"].as_array())
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        let name = p["name"].as_str().unwrap_or("?").to_owned();
                        let state = if p["attached"] == true {
                            "attached".to_owned()
                        } else {
                            format!("no, {}", brief(p["error"].as_str().unwrap_or("")))
                        };
                        (name, state)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let (g, h) = (probes(guest), probes(host.as_ref()));
    let mut names: Vec<&String> = g.iter().chain(h.iter()).map(|(n, _)| n).collect();
    names.sort();
    names.dedup();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "\nprobe coverage: guest ({package}) | host ({}{})",
        host_kernel.trim(),
        if process::is_root() {
            ""
        } else {
            ", not root: eBPF cannot load"
        }
    );
    let state = |list: &[(String, String)], n: &str| {
        list.iter()
            .find(|(name, _)| name == n)
            .map_or("-".to_owned(), |(_, s)| s.clone())
    };
    for n in names {
        println!("  {n:<42} {:<52} {}", state(&g, n), state(&h, n));
    }
    if guest.is_none() {
        println!("  (no guest agent started: no guest column)");
    }
}

/// `attach: `/sys/.../id`: No such file or directory (os error 2)` -> `attach: No such file
/// or directory (os error 2)`; `load: the BPF_PROG_LOAD syscall returned Operation not
/// permitted (os error 1)` -> `load: Operation not permitted (os error 1)`.
fn brief(error: &str) -> String {
    let stage = error.split(':').next().unwrap_or("").trim();
    let last = error.rsplit(": ").next().unwrap_or(error);
    let reason = last.rsplit("returned ").next().unwrap_or(last).trim();
    if stage == reason || stage.is_empty() {
        reason.to_owned()
    } else {
        format!("{stage}: {reason}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_errors_in_brief() {
        assert_eq!(
            brief(
                "attach: `/sys/kernel/tracing/events/kmem/x/id`: No such file or directory (os error 2)"
            ),
            "attach: No such file or directory (os error 2)"
        );
        assert_eq!(
            brief("load: the BPF_PROG_LOAD syscall returned Operation not permitted (os error 1)"),
            "load: Operation not permitted (os error 1)"
        );
        assert_eq!(brief("no kernel BTF"), "no kernel BTF");
    }

    #[test]
    fn selects_by_name_and_filter() {
        let args = |scenarios: &[&str], filters: &[&str]| Args {
            scenarios: scenarios.iter().map(|s| s.to_string()).collect(),
            filters: filters.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(select(&args(&[], &[])).unwrap().len(), SCENARIOS.len());
        assert_eq!(select(&args(&[], &["vm"])).unwrap().len(), SCENARIOS.len());
        let names = |v: Vec<&Scenario>| v.iter().map(|s| s.name).collect::<Vec<_>>();
        assert_eq!(
            names(select(&args(&["cpu", "dimm"], &[])).unwrap()),
            ["dimm", "cpu"]
        );
        assert_eq!(
            names(select(&args(&[], &["incident"])).unwrap()),
            ["incident"]
        );
        assert!(select(&args(&["nope"], &[])).is_err());
    }
}
