//! Replacing a checkpoint file so that a crash at any moment leaves either the old file or
//! the new one, and the old one is always kept.
//!
//! The old file is hard-linked to `<name>.bak.<stamp>` first (link(2) never replaces an
//! existing name: a backup is never overwritten; a taken name gets `.1`, `.2`, ...), the new
//! contents go to a temporary file in the same directory (O_EXCL), which is fsynced,
//! renamed over the checkpoint, and the directory fsynced. The checkpoint must be a
//! regular file, not a symlink: the kubelet writes a plain file, and a link there is not
//! something to follow with a write. Nothing is ever deleted but our own temporary file
//! when a step fails.
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{} is a symlink: not rewritten", path.display())]
    Symlink { path: PathBuf },
    #[error("{} is not a regular file: not rewritten", path.display())]
    NotRegular { path: PathBuf },
    #[error("{} changed since it was read: not rewritten", path.display())]
    Changed { path: PathBuf },
    #[error("{step} {}", path.display())]
    Io {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err<'a>(step: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WriteError + 'a {
    move |source| WriteError::Io {
        step,
        path: path.to_owned(),
        source,
    }
}

/// Replaces `path`, whose contents must still be `expected`, with `contents`. Returns the
/// backup's path.
pub fn replace(
    path: &Path,
    expected: &[u8],
    contents: &[u8],
    stamp: &str,
) -> Result<PathBuf, WriteError> {
    let meta = fs::symlink_metadata(path).map_err(io_err("inspecting", path))?;
    if meta.file_type().is_symlink() {
        return Err(WriteError::Symlink {
            path: path.to_owned(),
        });
    }
    if !meta.file_type().is_file() {
        return Err(WriteError::NotRegular {
            path: path.to_owned(),
        });
    }
    let now = fs::read(path).map_err(io_err("reading", path))?;
    if now != expected {
        return Err(WriteError::Changed {
            path: path.to_owned(),
        });
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    let backup = link_backup(path, dir, &name, stamp)?;

    let tmp = dir.join(format!(".{name}.hotplug-agent.{}.tmp", std::process::id()));
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(meta.mode() & 0o7777)
        .open(&tmp)
        .map_err(io_err("creating", &tmp))?;
    let written = (|| {
        file.write_all(contents)?;
        file.set_permissions(fs::Permissions::from_mode(meta.mode() & 0o7777))?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("writing", &tmp)(e));
    }
    drop(file);
    // The same inode still there? A writer that replaced the file since would be undone.
    let again = fs::symlink_metadata(path).map_err(io_err("inspecting", path))?;
    if (again.dev(), again.ino()) != (meta.dev(), meta.ino()) {
        let _ = fs::remove_file(&tmp);
        return Err(WriteError::Changed {
            path: path.to_owned(),
        });
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err("renaming over", path)(e));
    }
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing", dir))?;
    Ok(backup)
}

/// A hard link to the current file under the first free `<name>.bak.<stamp>[.N]`.
fn link_backup(path: &Path, dir: &Path, name: &str, stamp: &str) -> Result<PathBuf, WriteError> {
    for n in 0..1000 {
        let candidate = match n {
            0 => dir.join(format!("{name}.bak.{stamp}")),
            n => dir.join(format!("{name}.bak.{stamp}.{n}")),
        };
        match fs::hard_link(path, &candidate) {
            Ok(()) => return Ok(candidate),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err("backing up", path)(e)),
        }
    }
    Err(io_err("backing up", path)(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "1000 backups with this timestamp already",
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_and_keeps_every_old_version() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cpu_manager_state");
        fs::write(&path, b"old").expect("fixture");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
        let first = replace(&path, b"old", b"new", "1700000000").expect("replaced");
        assert_eq!(fs::read(&path).expect("read"), b"new");
        assert_eq!(fs::read(&first).expect("backup"), b"old");
        assert_eq!(
            fs::metadata(&path).expect("meta").mode() & 0o777,
            0o600,
            "mode kept"
        );
        // Same second again: the first backup is not overwritten.
        let second = replace(&path, b"new", b"newer", "1700000000").expect("replaced");
        assert_ne!(first, second);
        assert_eq!(fs::read(&first).expect("first backup"), b"old");
        assert_eq!(fs::read(&second).expect("second backup"), b"new");
        let names: Vec<String> = fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 3, "no temporary file left: {names:?}");
    }

    #[test]
    fn a_symlink_or_a_changed_file_is_left_alone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("elsewhere");
        fs::write(&real, b"old").expect("fixture");
        let link = dir.path().join("cpu_manager_state");
        std::os::unix::fs::symlink(&real, &link).expect("symlink");
        let err = replace(&link, b"old", b"new", "1").expect_err("symlink");
        assert!(matches!(err, WriteError::Symlink { .. }), "{err}");
        assert_eq!(fs::read(&real).expect("read"), b"old");

        let path = dir.path().join("memory_manager_state");
        fs::write(&path, b"the kubelet wrote this meanwhile").expect("fixture");
        let err = replace(&path, b"old", b"new", "1").expect_err("changed");
        assert!(matches!(err, WriteError::Changed { .. }), "{err}");
        assert_eq!(
            fs::read_dir(dir.path()).expect("ls").count(),
            3,
            "nothing added"
        );
    }
}
