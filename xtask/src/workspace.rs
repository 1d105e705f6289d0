//! Where the workspace and its build output are, independent of the directory that
//! `cargo xtask` was started from.
use std::{
    env,
    path::{Path, PathBuf},
};

/// The workspace root: the parent of this crate's manifest directory.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
}

/// The target directory the cargo commands we start will use, made absolute.
///
/// Cargo resolves a relative `CARGO_TARGET_DIR` against its working directory; ours may differ
/// from the workspace root where we start cargo, so [`explicit_target_dir`] is passed on
/// absolute.
pub fn target_dir() -> PathBuf {
    explicit_target_dir().unwrap_or_else(|| root().join("target"))
}

/// `CARGO_TARGET_DIR` (or `CARGO_BUILD_TARGET_DIR`), absolute, if the user set one.
pub fn explicit_target_dir() -> Option<PathBuf> {
    let dir = ["CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR"]
        .into_iter()
        .filter_map(env::var_os)
        .find(|dir| !dir.is_empty())?;
    let dir = PathBuf::from(dir);
    if dir.is_absolute() {
        return Some(dir);
    }
    Some(env::current_dir().map_or(dir.clone(), |cwd| cwd.join(dir)))
}

/// The binary that `cargo build` (`profile` "debug") or `cargo build --release` leaves.
pub fn agent_binary(profile: &str) -> PathBuf {
    target_dir().join(profile).join("hotplug-agent")
}
