//! Environment variables per command: the agent's settings (the `HOTPLUG_AGENT_*` variables
//! of its unit or its pod, which `kubectl exec` and a shell on the host inherit) never
//! change what a client command does there; the client's own variables carry its name
//! (`HOTPLUG_AGENT_EVENTS_FORMAT`), and the one setting they share, the stream socket, is
//! the agent's variable (`HOTPLUG_AGENT_STREAM_SOCKET`). The real binary, no root.
use std::process::Command;

use hotplug_tests::agent_bin;

/// `hotplug-agent events --tail 1` with exactly `env`: whether it succeeded, and stderr.
fn events(env: &[(&str, &str)]) -> (bool, String) {
    let out = Command::new(agent_bin())
        .args(["events", "--tail", "1"])
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("running hotplug-agent events");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_agents_variables_do_not_change_the_client_commands() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("no-agent-here.sock");
    let socket = socket.to_str().expect("utf-8");
    // The agent's settings, and what `events` used to read, each a value `events` would
    // refuse if it read it: `events` must get as far as connecting to the agent's socket.
    let (ok, err) = events(&[
        ("HOTPLUG_AGENT_FORMAT", "bogus-format"),
        ("HOTPLUG_AGENT_SETTLE_MS", "bogus-ms"),
        ("HOTPLUG_AGENT_STREAM_TCP", "bogus-tcp"),
        ("HOTPLUG_AGENT_SOCKET", "/bogus-socket"),
        ("HOTPLUG_AGENT_SINCE", "bogus-since"),
        ("HOTPLUG_AGENT_KIND", "bogus-kind"),
        ("HOTPLUG_AGENT_STREAM_SOCKET", socket),
    ]);
    assert!(!ok, "no agent listens there");
    assert!(
        err.contains(socket) && !err.contains("bogus"),
        "`events` read a variable that is not its own, or not the agent's socket:\n{err}"
    );
    // Its own variables it does read.
    let (ok, err) = events(&[
        ("HOTPLUG_AGENT_EVENTS_FORMAT", "bogus-format"),
        ("HOTPLUG_AGENT_STREAM_SOCKET", socket),
    ]);
    assert!(
        !ok && err.contains("bogus-format"),
        "HOTPLUG_AGENT_EVENTS_FORMAT was not read:\n{err}"
    );
    let (ok, err) = events(&[
        ("HOTPLUG_AGENT_EVENTS_SINCE", "bogus-since"),
        ("HOTPLUG_AGENT_STREAM_SOCKET", socket),
    ]);
    assert!(
        !ok && err.contains("bogus-since"),
        "HOTPLUG_AGENT_EVENTS_SINCE was not read:\n{err}"
    );
}

/// An agent setting from the environment that is refused is named by its variable, whether
/// the parser refuses the value or a check after parsing does: not by a flag nobody typed.
#[test]
fn a_refused_variable_is_named_by_the_variable() {
    for (var, flag, value) in [
        ("HOTPLUG_AGENT_SETTLE_MS", "--settle-ms", "bogus-ms"),
        (
            "HOTPLUG_AGENT_VERIFY_TIMEOUT",
            "--verify-timeout",
            "400000000000y",
        ),
    ] {
        let out = Command::new(agent_bin())
            .args([
                "run",
                "--no-kubernetes",
                "--refresh",
                "none",
                "--stream-socket",
                "off",
                "--metrics-addr",
                "off",
            ])
            .env_clear()
            .env(var, value)
            .output()
            .expect("running hotplug-agent run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}={value} was taken:\n{err}");
        let want = format!("environment variable {var}: invalid value {value:?}");
        assert!(err.contains(&want), "stderr lacks {want:?}:\n{err}");
        assert!(!err.contains(flag), "named by a flag nobody typed:\n{err}");
    }
    // The flag given overrides the variable, which is then not looked at; `--help` is
    // shown whatever the environment says.
    for extra in [["--settle-ms", "5", "--help"], ["--help", "", ""]] {
        let out = Command::new(agent_bin())
            .arg("run")
            .args(extra.iter().filter(|a| !a.is_empty()))
            .env_clear()
            .env("HOTPLUG_AGENT_SETTLE_MS", "bogus-ms")
            .output()
            .expect("running hotplug-agent run --help");
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("Usage"),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
