//! Config files (`config::merge`) against a command shaped like the agent's: numbers,
//! durations, a choice, a switch and a repeatable flag.
use std::{ffi::OsString, fs, time::Duration};

use clap::{Arg, ArgAction, Command};
use hotplug_agent::{config, sources::error_chain};
use proptest::{collection::vec, option, prelude::*, sample::select};

use crate::{check, ensure};

fn cli() -> Command {
    config::with_env(
        Command::new("hotplug-agent").subcommand(
            Command::new("run")
                .arg(Arg::new("config").long("config"))
                .arg(
                    Arg::new("settle_ms")
                        .long("settle-ms")
                        .default_value("300")
                        .value_parser(clap::value_parser!(u64)),
                )
                .arg(
                    Arg::new("verify_timeout")
                        .long("verify-timeout")
                        .default_value("2m")
                        .value_parser(humantime::parse_duration),
                )
                .arg(
                    Arg::new("refresh")
                        .long("refresh")
                        .default_value("systemd")
                        .value_parser(["systemd", "command", "none"]),
                )
                .arg(
                    Arg::new("no_ebpf")
                        .long("no-ebpf")
                        .action(ArgAction::SetTrue),
                )
                .arg(Arg::new("kind").long("kind").action(ArgAction::Append)),
        ),
    )
}

/// What a valid file sets.
#[derive(Clone, Debug, Default)]
struct Settings {
    settle_ms: Option<u64>,
    verify_timeout: Option<Duration>,
    refresh: Option<&'static str>,
    no_ebpf: Option<bool>,
    kind: Option<Vec<String>>,
    /// `settle-ms` rather than `settle_ms`.
    dashes: bool,
}

fn settings() -> impl Strategy<Value = Settings> {
    (
        option::of(any::<u64>()),
        option::of(
            (0u64..1_000_000, 0u32..1000).prop_map(|(s, ms)| Duration::new(s, ms * 1_000_000)),
        ),
        option::of(select(&["systemd", "command", "none"][..])),
        option::of(any::<bool>()),
        option::of(vec(
            select(&["cpu", "memory", "episode", "a b"][..]).prop_map(String::from),
            1..4,
        )),
        any::<bool>(),
    )
        .prop_map(
            |(settle_ms, verify_timeout, refresh, no_ebpf, kind, dashes)| Settings {
                settle_ms,
                verify_timeout,
                refresh,
                no_ebpf,
                kind,
                dashes,
            },
        )
}

impl Settings {
    fn toml(&self) -> String {
        let key = |k: &str| {
            if self.dashes {
                k.replace('_', "-")
            } else {
                k.to_owned()
            }
        };
        let mut t = toml::Table::new();
        if let Some(v) = self.settle_ms {
            // TOML integers are i64; larger ones are written as strings.
            let value = i64::try_from(v)
                .map_or_else(|_| toml::Value::String(v.to_string()), toml::Value::Integer);
            t.insert(key("settle_ms"), value);
        }
        if let Some(v) = self.verify_timeout {
            t.insert(
                key("verify_timeout"),
                toml::Value::String(humantime::format_duration(v).to_string()),
            );
        }
        if let Some(v) = self.refresh {
            t.insert(key("refresh"), toml::Value::String(v.into()));
        }
        if let Some(v) = self.no_ebpf {
            t.insert(key("no_ebpf"), toml::Value::Boolean(v));
        }
        if let Some(v) = &self.kind {
            t.insert(
                key("kind"),
                toml::Value::Array(v.iter().cloned().map(toml::Value::String).collect()),
            );
        }
        t.to_string()
    }
}

fn argv(file: &std::path::Path) -> Vec<OsString> {
    ["hotplug-agent", "run", "--config"]
        .map(OsString::from)
        .into_iter()
        .chain([file.as_os_str().to_owned()])
        .collect()
}

#[test]
fn config_files_from_the_model_set_the_model() {
    check("config_model", 1000, settings(), |s| {
        let dir = crate::scratch();
        let file = dir.path().join("agent.toml");
        fs::write(&file, s.toml()).expect("write");
        let merged =
            config::merge(&cli(), argv(&file)).map_err(|e| TestCaseError::fail(error_chain(&e)))?;
        let m = cli()
            .try_get_matches_from(merged)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let r = m.subcommand_matches("run").expect("run");
        ensure!(
            *r.get_one::<u64>("settle_ms").expect("default") == s.settle_ms.unwrap_or(300),
            "settle_ms"
        );
        ensure!(
            *r.get_one::<Duration>("verify_timeout").expect("default")
                == s.verify_timeout.unwrap_or(Duration::from_secs(120)),
            "verify_timeout"
        );
        ensure!(
            r.get_one::<String>("refresh").expect("default") == s.refresh.unwrap_or("systemd"),
            "refresh"
        );
        ensure!(
            r.get_flag("no_ebpf") == s.no_ebpf.unwrap_or(false),
            "no_ebpf"
        );
        let kinds: Option<Vec<String>> = r.get_many::<String>("kind").map(|k| k.cloned().collect());
        ensure!(kinds == s.kind, "kind {kinds:?}");
        Ok(())
    });
}

/// A file from the model with one value replaced by something the flag does not take, or
/// arbitrary text.
fn hostile_file() -> impl Strategy<Value = String> {
    let bad_value = select(
        &[
            "settle_ms = \"soon\"",
            "settle_ms = -1",
            "settle_ms = 1.5",
            "settle_ms = [1, 2]",
            "settle_ms = []",
            "settle_ms = true",
            "verify_timeout = \"forever\"",
            "verify_timeout = 10",
            "refresh = \"dbus\"",
            "no_ebpf = \"yes\"",
            "no_ebpf = 1",
            "kind = {}",
            "[run]",
            "setle_ms = 3",
            "settle_ms = 1\nsettle_ms = 2",
            "\u{0}",
        ][..],
    );
    prop_oneof![
        (settings(), bad_value).prop_map(|(s, bad)| {
            // The bad line replaces the model's line for the same key, if any.
            let key = bad.split([' ', '=']).next().unwrap_or_default().to_owned();
            let mut lines: Vec<String> = s
                .toml()
                .lines()
                .filter(|l| !l.replace('-', "_").starts_with(&key))
                .map(String::from)
                .collect();
            lines.push(bad.to_owned());
            lines.join("\n")
        }),
        any::<String>(),
        vec(
            select(
                &[
                    "settle_ms",
                    "=",
                    "\"",
                    "[",
                    "]",
                    "\n",
                    "1",
                    "true",
                    ",",
                    "#",
                    "kind"
                ][..]
            ),
            0..12
        )
        .prop_map(|parts| parts.concat()),
    ]
}

#[test]
fn a_bad_config_file_is_refused_by_file_and_key_never_by_flag() {
    check("config_any", 1500, hostile_file(), |text| {
        let dir = crate::scratch();
        let file = dir.path().join("agent.toml");
        fs::write(&file, &text).expect("write");
        match config::merge(&cli(), argv(&file)) {
            Err(e) => {
                let msg = error_chain(&e);
                ensure!(
                    msg.contains(&file.display().to_string()),
                    "{msg:?} does not name the file"
                );
                for long in ["settle-ms", "verify-timeout", "refresh", "no-ebpf", "kind"] {
                    let flag = format!("--{long}");
                    ensure!(
                        !msg.contains(&flag) || text.contains(&flag),
                        "{msg:?} names the flag {flag}, not the file's key"
                    );
                }
            }
            // Whatever the file set, clap must take it: the file's values are checked in
            // merge, where the error can say which file and key.
            Ok(merged) => {
                if let Err(e) = cli().try_get_matches_from(&merged) {
                    ensure!(
                        false,
                        "{text:?} passed merge as {merged:?} but clap says: {e}"
                    );
                }
            }
        }
        Ok(())
    });
}
