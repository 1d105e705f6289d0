//! Configuration: a TOML file (`--config`), environment variables, and flags, in that
//! order of precedence (a flag beats a variable beats the file beats the default).
//!
//! Every long flag `--settle-ms` of `run` and `watch` (the agent itself) is also the
//! variable `HOTPLUG_AGENT_SETTLE_MS` and the file key `settle_ms` (or `settle-ms`). The
//! client commands' flags carry their command in the name (`events --format` is
//! `HOTPLUG_AGENT_EVENTS_FORMAT`), so a unit's or a pod's settings for the agent never
//! change how `hotplug-agent events` or `status` behave in the same environment; a flag
//! that means the very same as one of the agent's reads the agent's variable (`events
//! --socket` is `HOTPLUG_AGENT_STREAM_SOCKET`, `checkpoint --kubelet-root-dir` is
//! `HOTPLUG_AGENT_KUBELET_ROOT_DIR`), so those commands find what the agent uses. The file is
//! applied by turning its keys into flags for the ones neither the command line nor the
//! environment set, so clap validates every value the same way whatever its origin, and
//! an unknown key is rejected with the closest valid one as a hint.
use std::{collections::BTreeMap, ffi::OsString, path::PathBuf};

use clap::{
    ArgMatches, Command,
    error::{ContextKind, ContextValue},
    parser::ValueSource,
};

pub const ENV_PREFIX: &str = "HOTPLUG_AGENT_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading the config file")]
    Read(#[source] crate::files::FileError),
    #[error("{path}: not valid TOML: {message}")]
    Toml { path: PathBuf, message: String },
    #[error("{path}: unknown key {key:?} for `{subcommand}`{hint}")]
    UnknownKey {
        path: PathBuf,
        key: String,
        subcommand: String,
        hint: String,
    },
    #[error("{path}: key {key:?}: {message}")]
    BadValue {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// An environment variable's value: named by the variable, not by a flag nobody typed.
    #[error("environment variable {var}: {message}")]
    BadEnv { var: String, message: String },
}

/// The environment variable of a long flag: `settle-ms` -> `HOTPLUG_AGENT_SETTLE_MS`.
pub fn env_name(long: &str) -> String {
    format!(
        "{ENV_PREFIX}{}",
        long.replace('-', "_").to_ascii_uppercase()
    )
}

/// The subcommands that are the agent: their flags are `HOTPLUG_AGENT_<FLAG>` (the names
/// the DaemonSet and the systemd unit use).
const AGENT_COMMANDS: [&str; 2] = ["run", "watch"];

/// Client flags that mean exactly one of the agent's settings, and so read its variable.
const SAME_AS_AGENT: [(&str, &str, &str); 4] = [
    ("events", "socket", "stream-socket"),
    ("checkpoint", "kubelet-root-dir", "kubelet-root-dir"),
    // The filesystem root holding proc/ and sys/ (hidden; for tests and chroots).
    ("status", "root", "root"),
    ("checkpoint", "root", "root"),
];

/// The environment variable of `--long` of `subcommand`: `run --settle-ms` ->
/// `HOTPLUG_AGENT_SETTLE_MS`, `events --format` -> `HOTPLUG_AGENT_EVENTS_FORMAT`.
pub fn env_name_of(subcommand: &str, long: &str) -> String {
    if AGENT_COMMANDS.contains(&subcommand) {
        return env_name(long);
    }
    if let Some((_, _, agent)) = SAME_AS_AGENT
        .iter()
        .find(|(s, l, _)| *s == subcommand && *l == long)
    {
        return env_name(agent);
    }
    env_name(&format!("{subcommand}-{long}"))
}

/// Gives every long flag of every subcommand its environment variable (where it has none).
pub fn with_env(cmd: Command) -> Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    names.into_iter().fold(cmd, |cmd, name| {
        cmd.mut_subcommand(name.clone(), |sub| {
            sub.mut_args(
                |arg| match (arg.get_long().map(str::to_string), arg.get_env()) {
                    (Some(long), None) if long != "help" && long != "version" => {
                        arg.env(env_name_of(&name, &long))
                    }
                    _ => arg,
                },
            )
        })
    })
}

/// The config file named by `--config` (or `HOTPLUG_AGENT_CONFIG`), if any.
fn config_path(argv: &[OsString]) -> Option<PathBuf> {
    let mut it = argv.iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            return it.next().map(PathBuf::from);
        }
        if let Some(p) = a.strip_prefix("--config=") {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var_os(env_name("config")).map(PathBuf::from)
}

/// A config file of every setting is a few KiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Reads a config file into `key -> [flag values]`; `None` for a `false` switch.
fn read_file(path: &std::path::Path) -> Result<BTreeMap<String, Option<Vec<String>>>, ConfigError> {
    // A FIFO or /dev/zero given as --config is refused at once, not read forever.
    let text =
        crate::files::read_regular_text(path, MAX_CONFIG_BYTES).map_err(ConfigError::Read)?;
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Toml {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    let mut out = BTreeMap::new();
    for (key, value) in table {
        let bad = |message: &str| ConfigError::BadValue {
            path: path.to_path_buf(),
            key: key.clone(),
            message: message.into(),
        };
        let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
            Ok(match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) => b.to_string(),
                _ => return Err(bad("expected a string, number or boolean")),
            })
        };
        let values = match &value {
            toml::Value::Boolean(false) => None,
            toml::Value::Boolean(true) => Some(Vec::new()),
            toml::Value::Array(items) => Some(items.iter().map(scalar).collect::<Result<_, _>>()?),
            toml::Value::Table(_) => {
                return Err(bad("sections are not used; write keys at the top level"));
            }
            v => Some(vec![scalar(v)?]),
        };
        out.insert(key, values);
    }
    Ok(out)
}

/// Which flags took their values from the config file, and the key and values as the file
/// wrote them: a setting found wrong after parsing (a duration out of range) is then
/// named where the operator wrote it, `FILE: key "x"`, as the parse errors are, not by a
/// flag nobody typed.
#[derive(Clone, Debug, Default)]
pub struct Origins {
    path: Option<PathBuf>,
    /// Long flag -> (key as written, values).
    keys: BTreeMap<String, (String, Vec<String>)>,
    /// Long flag -> (environment variable, value), for the flags the environment set.
    env: BTreeMap<String, (String, String)>,
}

impl Origins {
    /// The error for `flag` (its long name) being `problem`, by file and key if the config
    /// file set it, by variable if the environment did; `None` if a flag or the default did.
    pub fn error_for(&self, flag: &str, problem: &str) -> Option<ConfigError> {
        if let Some((var, value)) = self.env.get(flag) {
            return Some(ConfigError::BadEnv {
                var: var.clone(),
                message: format!("invalid value {value:?}: {problem}"),
            });
        }
        let path = self.path.as_ref()?;
        let (key, values) = self.keys.get(flag)?;
        let value = match values.as_slice() {
            [one] => format!("{one:?}"),
            many => format!("{many:?}"),
        };
        Some(ConfigError::BadValue {
            path: path.clone(),
            key: key.clone(),
            message: format!("invalid value {value}: {problem}"),
        })
    }
}

/// Inserts the config file's settings into `argv` (after the subcommand) for every flag
/// that neither the command line nor the environment set. `cmd` must already have its
/// environment variables ([`with_env`]).
pub fn merge(cmd: &Command, argv: Vec<OsString>) -> Result<Vec<OsString>, ConfigError> {
    merge_traced(cmd, argv).map(|(argv, _)| argv)
}

/// [`merge`], and which flags the file set ([`Origins`]).
pub fn merge_traced(
    cmd: &Command,
    argv: Vec<OsString>,
) -> Result<(Vec<OsString>, Origins), ConfigError> {
    let mut origins = Origins::default();
    // Which subcommand: the first argument that names one.
    let Some((pos, sub)) = argv.iter().enumerate().skip(1).find_map(|(i, a)| {
        cmd.find_subcommand(a.to_string_lossy().as_ref())
            .map(|s| (i, s))
    }) else {
        return Ok((argv, origins));
    };
    // What the command line decided (parse errors are left for the real parse to report).
    let given = cmd
        .clone()
        .ignore_errors(true)
        .try_get_matches_from(&argv)
        .ok();
    let sub_matches: Option<&ArgMatches> = given
        .as_ref()
        .and_then(|m| m.subcommand_matches(sub.get_name()));
    check_env(cmd, sub, sub_matches, &mut origins)?;
    let Some(path) = config_path(&argv) else {
        return Ok((argv, origins));
    };
    // Only subcommands that take `--config` read the file.
    if !sub.get_arguments().any(|a| a.get_long() == Some("config")) {
        return Ok((argv, origins));
    }
    origins.path = Some(path.clone());
    let file = read_file(&path)?;
    let longs: Vec<&str> = sub
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != "config")
        .collect();
    let mut inserted = Vec::new();
    for (original, values) in file {
        let key = original.replace('_', "-");
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(key.as_str()))
        else {
            let best = longs
                .iter()
                .map(|l| (strsim::jaro_winkler(l, &key), *l))
                .fold((0.0, ""), |a, b| if b.0 > a.0 { b } else { a });
            let hint = if best.0 > 0.8 {
                format!(" (did you mean {:?}?)", best.1.replace('-', "_"))
            } else {
                String::new()
            };
            return Err(ConfigError::UnknownKey {
                path: path.clone(),
                key: original,
                subcommand: sub.get_name().into(),
                hint,
            });
        };
        let id = arg.get_id().as_str();
        let decided = sub_matches
            .and_then(|m| m.value_source(id))
            .is_some_and(|s| matches!(s, ValueSource::CommandLine | ValueSource::EnvVariable));
        if decided {
            continue;
        }
        // Checked here, where the error can name the file and the key: clap would name
        // a flag the user never wrote.
        check_values(cmd, sub, arg, values.as_deref()).map_err(|message| {
            ConfigError::BadValue {
                path: path.clone(),
                key: original.clone(),
                message,
            }
        })?;
        match values {
            None => {}
            Some(v) if v.is_empty() => inserted.push(OsString::from(format!("--{key}"))),
            Some(v) => {
                inserted.extend(v.iter().map(|v| OsString::from(format!("--{key}={v}"))));
                origins.keys.insert(key, (original, v));
            }
        }
    }
    let mut out = argv;
    out.splice(pos + 1..pos + 1, inserted);
    Ok((out, origins))
}

/// The environment variables of `sub`'s flags that the command line did not override:
/// checked here, where the error can name the variable (clap would name the flag), and
/// remembered in `origins` for the checks made after parsing. Switches are left to clap,
/// which reads any value of theirs as true or false.
fn check_env(
    cmd: &Command,
    sub: &Command,
    given: Option<&ArgMatches>,
    origins: &mut Origins,
) -> Result<(), ConfigError> {
    for arg in sub.get_arguments() {
        let (Some(long), Some(var)) = (arg.get_long(), arg.get_env()) else {
            continue;
        };
        // No lenient parse (`--help`, `--version`): clap shows those whatever the
        // environment says; nothing to check.
        let Some(given) = given else {
            return Ok(());
        };
        let on_command_line =
            given.value_source(arg.get_id().as_str()) == Some(ValueSource::CommandLine);
        let Some(value) = std::env::var_os(var) else {
            continue;
        };
        if on_command_line || !arg.get_action().takes_values() {
            continue;
        }
        let var = var.to_string_lossy().into_owned();
        let value = value.to_string_lossy().into_owned();
        check_values(cmd, sub, arg, Some(std::slice::from_ref(&value))).map_err(|message| {
            ConfigError::BadEnv {
                var: var.clone(),
                message,
            }
        })?;
        origins.env.insert(long.to_owned(), (var, value));
    }
    Ok(())
}

/// Whether clap would take `values` (from a file key) for `arg`; why not, if not.
fn check_values(
    cmd: &Command,
    sub: &Command,
    arg: &clap::Arg,
    values: Option<&[String]>,
) -> Result<(), String> {
    let takes_values = arg.get_action().takes_values();
    let values = match values {
        // `key = false`: the switch stays off; nothing is inserted.
        None if !takes_values => return Ok(()),
        None => return Err("expected a value, not `false`".into()),
        Some([]) if !takes_values => return Ok(()),
        Some([]) => return Err("expected a value".into()),
        Some(_) if !takes_values => return Err("a switch: expected true or false".into()),
        Some(v) => v,
    };
    if values.len() > 1 && !matches!(arg.get_action(), clap::ArgAction::Append) {
        return Err(format!(
            "expected one value, not a list of {}",
            values.len()
        ));
    }
    // clap's value parsers are reachable only through a parse: this key's values alone.
    let Some(long) = arg.get_long() else {
        return Ok(());
    };
    let flag = format!("--{long}");
    let argv = ["hotplug-agent".to_owned(), sub.get_name().to_owned()]
        .into_iter()
        .chain(values.iter().map(|v| format!("{flag}={v}")));
    let Err(e) = cmd.clone().try_get_matches_from(argv) else {
        return Ok(());
    };
    // Another argument's problem (a required one, a bad environment variable) is left
    // for the real parse to report.
    let ours = e
        .get(ContextKind::InvalidArg)
        .is_some_and(|a| a.to_string().split(' ').next() == Some(flag.as_str()));
    if !ours {
        return Ok(());
    }
    let value = match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => format!(" {v:?}"),
        _ => String::new(),
    };
    let why = match (
        std::error::Error::source(&e),
        e.get(ContextKind::ValidValue),
    ) {
        (Some(source), _) => format!(": {source}"),
        (None, Some(valid)) => format!("; expected one of {valid}"),
        (None, None) => String::new(),
    };
    Err(format!("invalid value{value}{why}"))
}

/// Where each effective value came from, for `hotplug-agent config`. `before` are the
/// matches without the file, to tell its values from the flags'.
pub fn describe(
    sub: &Command,
    matches: &ArgMatches,
    before: Option<&ArgMatches>,
    file: Option<&PathBuf>,
) -> String {
    let mut out = String::new();
    if let Some(f) = file {
        out.push_str(&format!("# config file: {}\n", f.display()));
    }
    for arg in sub.get_arguments() {
        let (Some(long), id) = (arg.get_long(), arg.get_id().as_str()) else {
            continue;
        };
        if matches!(long, "help" | "version") {
            continue;
        }
        let values: Vec<String> = matches
            .get_raw(id)
            .map(|v| v.map(|s| s.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let source = match matches.value_source(id) {
            Some(ValueSource::CommandLine)
                if before.and_then(|b| b.value_source(id)) != Some(ValueSource::CommandLine) =>
            {
                "file".to_string()
            }
            Some(ValueSource::CommandLine) => "flag".into(),
            Some(ValueSource::EnvVariable) => format!(
                "env {}",
                arg.get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ),
            Some(ValueSource::DefaultValue) => "default".into(),
            _ => "unset".into(),
        };
        let key = long.replace('-', "_");
        if values.is_empty() {
            out.push_str(&format!("# {key} (unset)\n"));
            continue;
        }
        let value = match values.as_slice() {
            [one] if !arg.get_action().takes_values() => one.clone(),
            [one] => toml::Value::String(one.clone()).to_string(),
            many => toml::Value::Array(
                many.iter()
                    .map(|v| toml::Value::String(v.clone()))
                    .collect(),
            )
            .to_string(),
        };
        out.push_str(&format!("{key} = {value}  # {source}\n"));
    }
    out
}

/// The config file this command line reads, if any.
pub fn file_of(argv: &[OsString]) -> Option<PathBuf> {
    config_path(argv)
}

#[cfg(test)]
mod tests {
    use clap::{Arg, ArgAction};

    use super::*;

    fn cli() -> Command {
        with_env(
            Command::new("hotplug-agent").subcommand(
                Command::new("run")
                    .arg(Arg::new("config").long("config"))
                    .arg(
                        Arg::new("settle_ms")
                            .long("settle-ms")
                            .default_value("300")
                            .value_parser(clap::value_parser!(u64)),
                    )
                    .arg(Arg::new("refresh").long("refresh").default_value("systemd"))
                    .arg(
                        Arg::new("no_ebpf")
                            .long("no-ebpf")
                            .action(ArgAction::SetTrue),
                    ),
            ),
        )
    }

    fn args(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    fn effective(argv: Vec<OsString>) -> (u64, String, bool) {
        let m = cli().try_get_matches_from(argv).unwrap();
        let r = m.subcommand_matches("run").unwrap();
        (
            *r.get_one::<u64>("settle_ms").unwrap(),
            r.get_one::<String>("refresh").unwrap().clone(),
            r.get_flag("no_ebpf"),
        )
    }

    // One test: it sets process environment variables, which tests in parallel would share.
    #[test]
    fn flags_beat_env_beat_file_beat_defaults_and_bad_input_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "settle_ms = 500\nrefresh = \"command\"\nno_ebpf = true\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        // Defaults.
        assert_eq!(
            effective(merge(&cli(), args(&["a", "run"])).unwrap()),
            (300, "systemd".into(), false)
        );
        // The file over the defaults.
        assert_eq!(
            effective(merge(&cli(), args(&["a", "run", "--config", f])).unwrap()),
            (500, "command".into(), true)
        );
        // The environment over the file.
        // SAFETY: this is the only test setting a variable; no other test depends on
        // this one's value (a valid one, so every parse that reads it meanwhile passes).
        unsafe { std::env::set_var("HOTPLUG_AGENT_SETTLE_MS", "700") };
        assert_eq!(
            effective(merge(&cli(), args(&["a", "run", "--config", f])).unwrap()).0,
            700
        );
        // A flag over the environment.
        assert_eq!(
            effective(
                merge(
                    &cli(),
                    args(&["a", "run", "--config", f, "--settle-ms", "900"])
                )
                .unwrap()
            )
            .0,
            900
        );
        unsafe { std::env::remove_var("HOTPLUG_AGENT_SETTLE_MS") };

        // Unknown keys: rejected with the key and a hint.
        std::fs::write(&file, "setle_ms = 5\n").unwrap();
        let err = merge(&cli(), args(&["a", "run", "--config", f]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"setle_ms\"") && err.contains("did you mean \"settle_ms\""),
            "{err}"
        );
        // Invalid values: named by the file and its key, not by a flag nobody wrote.
        for (line, why) in [
            (
                "settle_ms = \"soon\"",
                "invalid value \"soon\": invalid digit",
            ),
            ("settle_ms = [1, 2]", "expected one value, not a list of 2"),
            ("settle_ms = true", "expected a value"),
            ("no_ebpf = \"yes\"", "a switch: expected true or false"),
        ] {
            std::fs::write(&file, format!("{line}\n")).unwrap();
            let err = merge(&cli(), args(&["a", "run", "--config", f]))
                .unwrap_err()
                .to_string();
            let key = line.split(' ').next().unwrap();
            assert!(
                err.starts_with(&format!("{f}: key {key:?}: ")) && err.contains(why),
                "{line}: {err}"
            );
            assert!(!err.contains("--"), "{err}");
        }
        // A flag on the command line still wins over a bad file value, which is not read.
        std::fs::write(&file, "settle_ms = \"soon\"\n").unwrap();
        let argv = merge(
            &cli(),
            args(&["a", "run", "--config", f, "--settle-ms", "1"]),
        )
        .unwrap();
        assert_eq!(effective(argv).0, 1);
        // Broken TOML and sections.
        std::fs::write(&file, "settle_ms = \n").unwrap();
        assert!(matches!(
            merge(&cli(), args(&["a", "run", "--config", f])),
            Err(ConfigError::Toml { .. })
        ));
        std::fs::write(&file, "[run]\nsettle_ms = 1\n").unwrap();
        assert!(matches!(
            merge(&cli(), args(&["a", "run", "--config", f])),
            Err(ConfigError::BadValue { .. })
        ));
        assert!(matches!(
            merge(&cli(), args(&["a", "run", "--config", "/nonexistent.toml"])),
            Err(ConfigError::Read { .. })
        ));
    }

    // `refresh` only: the test above sets HOTPLUG_AGENT_SETTLE_MS for a while.
    #[test]
    fn origins_name_the_file_and_the_key_as_written() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "refresh = \"someday\"\nno_ebpf = true\n").unwrap();
        let f = file.to_str().unwrap();
        let (_, origins) = merge_traced(&cli(), args(&["a", "run", "--config", f])).unwrap();
        let err = origins
            .error_for("refresh", "not a backend")
            .expect("the file set --refresh")
            .to_string();
        assert_eq!(
            err,
            format!("{f}: key \"refresh\": invalid value \"someday\": not a backend")
        );
        // A flag on the command line: the file's value was not used, so not named.
        let (_, origins) = merge_traced(
            &cli(),
            args(&["a", "run", "--config", f, "--refresh", "none"]),
        )
        .unwrap();
        assert!(origins.error_for("refresh", "x").is_none());
        // The default, and no file at all. (Not settle-ms: the precedence test sets its
        // variable for a moment, and the environment names a setting too.)
        assert!(origins.error_for("max-wait-ms", "x").is_none());
        let (_, origins) = merge_traced(&cli(), args(&["a", "run"])).unwrap();
        assert!(origins.error_for("refresh", "x").is_none());
    }
}
