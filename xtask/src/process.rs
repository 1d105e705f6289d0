//! Starting commands: cargo with the workspace's settings, privilege (root, sudo), and
//! finding programs on `PATH`.
use std::{
    env,
    ffi::OsString,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::workspace;

/// `cargo`, the same one that runs xtask, started in the workspace root.
///
/// `PATH` gets cargo's bin directory appended when it lacks it: `cargo install` puts
/// bpf-linker there, and aya-build (in `agent/build.rs`) finds it on `PATH`.
pub fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace::root());
    if let Some(dir) = workspace::explicit_target_dir() {
        cmd.env("CARGO_TARGET_DIR", dir);
    }
    if let Some(path) = path_with_cargo_bin() {
        cmd.env("PATH", path);
    }
    cmd
}

/// Runs `cmd` (echoing it to stderr) and fails unless it exits successfully.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    echo(cmd);
    let status = cmd
        .status()
        .with_context(|| format!("starting `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed ({status})", display(cmd));
    }
    Ok(())
}

/// Prints the command line about to run, the way a user would type it.
pub fn echo(cmd: &Command) {
    eprintln!("$ {}", display(cmd));
}

/// The command line, with the program shortened to its file name (`cargo`, not the
/// toolchain path that `CARGO` holds).
pub fn display(cmd: &Command) -> String {
    let program = Path::new(cmd.get_program());
    let program = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|arg| arg.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The first executable called `name` on `PATH`, then in cargo's bin directory.
pub fn which(name: &str) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(cargo_bin_dir())
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    path.metadata()
        .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

/// `$CARGO_HOME/bin`, by default `~/.cargo/bin`: where `cargo install` puts binaries.
pub fn cargo_bin_dir() -> Option<PathBuf> {
    let home = env::var_os("CARGO_HOME")
        .filter(|home| !home.is_empty())
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))?;
    Some(home.join("bin"))
}

/// `PATH` with cargo's bin directory appended, or `None` when it is already there.
fn path_with_cargo_bin() -> Option<OsString> {
    let bin = cargo_bin_dir()?;
    let path = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&path).collect();
    if dirs.contains(&bin) {
        return None;
    }
    dirs.push(bin);
    env::join_paths(dirs).ok()
}

/// How to run something that needs root: directly as root, through sudo, or not at all.
pub enum Privilege {
    Root,
    Sudo(PathBuf),
    None,
}

impl Privilege {
    pub fn current() -> Self {
        if is_root() {
            Self::Root
        } else if let Some(sudo) = which("sudo") {
            Self::Sudo(sudo)
        } else {
            Self::None
        }
    }

    /// `program` as root (through sudo if needed), or `None` when that is impossible.
    pub fn command(&self, program: impl AsRef<Path>) -> Option<Command> {
        match self {
            Self::Root => Some(Command::new(program.as_ref())),
            Self::Sudo(sudo) => {
                let mut cmd = Command::new(sudo);
                cmd.arg(program.as_ref());
                Some(cmd)
            }
            Self::None => None,
        }
    }
}
