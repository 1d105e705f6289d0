//! Verify, beyond the Node object: the pods' cgroup memory limit.
//!
//! With the default `enforceNodeAllocatable: [pods]` the kubelet sets the memory limit of
//! the pods' cgroup once at start-up (pkg/kubelet/cm/node_container_manager_linux.go:
//! capacity minus kube- and system-reserved). That limit is what evicted the pods in the
//! incident, so after a refresh it must have moved as far as the Node's allocatable memory.
use std::path::{Path, PathBuf};

use crate::record::CgroupCheck;

/// Where the pods' cgroup keeps its memory limit: systemd or cgroupfs driver, v2 or v1.
const CANDIDATES: [&str; 4] = [
    "kubepods.slice/memory.max",
    "kubepods/memory.max",
    "memory/kubepods.slice/memory.limit_in_bytes",
    "memory/kubepods/memory.limit_in_bytes",
];

/// The limit file of the pods' cgroup, if this host has one.
pub fn pods_limit_file(cgroup_root: &Path) -> Option<PathBuf> {
    CANDIDATES
        .iter()
        .map(|c| cgroup_root.join(c))
        .find(|p| p.exists())
}

/// The limit in bytes; `None` for no limit (`max` in v2, the page-rounded i64::MAX in v1).
pub fn read_limit(path: &Path) -> std::io::Result<Option<u64>> {
    let text = std::fs::read_to_string(path)?;
    let text = text.trim();
    if text == "max" {
        return Ok(None);
    }
    let v: u64 = text.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {text:?} is not a limit", path.display()),
        )
    })?;
    Ok((v < 1 << 62).then_some(v))
}

/// Did the limit move with allocatable?
pub fn check(
    path: &Path,
    before: Option<u64>,
    after: Option<u64>,
    expected_delta: Option<i64>,
) -> CgroupCheck {
    let ok = match (before, after, expected_delta) {
        (Some(b), Some(a), Some(d)) => a as i128 - b as i128 == d as i128,
        // Unlimited stays fine; we cannot judge without a before/after or an expectation.
        (None, None, _) => true,
        _ => false,
    };
    CgroupCheck {
        path: path.display().to_string(),
        before,
        after,
        expected_delta,
        ok,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v2_and_v1_layouts_and_reads_limits() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(pods_limit_file(dir.path()), None);
        let v1 = dir.path().join("memory/kubepods");
        std::fs::create_dir_all(&v1).unwrap();
        std::fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        let f = pods_limit_file(dir.path()).unwrap();
        assert_eq!(read_limit(&f).unwrap(), None, "v1's unlimited");
        let v2 = dir.path().join("kubepods.slice");
        std::fs::create_dir_all(&v2).unwrap();
        std::fs::write(v2.join("memory.max"), "68719476736\n").unwrap();
        let f = pods_limit_file(dir.path()).unwrap();
        assert!(
            f.ends_with("kubepods.slice/memory.max"),
            "v2 systemd layout wins: {f:?}"
        );
        assert_eq!(read_limit(&f).unwrap(), Some(64 << 30));
        std::fs::write(&f, "max\n").unwrap();
        assert_eq!(read_limit(&f).unwrap(), None);
        std::fs::write(&f, "lots\n").unwrap();
        assert!(read_limit(&f).is_err());
    }

    #[test]
    fn the_limit_must_move_as_far_as_allocatable() {
        let p = Path::new("/x");
        assert!(check(p, Some(64 << 30), Some(128 << 30), Some(64 << 30)).ok);
        // The incident: capacity doubled, the limit stayed.
        assert!(!check(p, Some(64 << 30), Some(64 << 30), Some(64 << 30)).ok);
        // Unplug moves it down.
        assert!(check(p, Some(2 << 30), Some(1 << 30), Some(-(1 << 30))).ok);
        assert!(check(p, None, None, Some(5)).ok);
        assert!(!check(p, Some(1), None, Some(5)).ok);
    }
}
