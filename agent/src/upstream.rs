//! Standing down for upstream: where the kubelet resizes the Node itself, the agent must
//! not restart it as well.
//!
//! KEP-3953 (Node Resource Hot Plug) has the kubelet re-read the machine's capacity on its
//! own behind the feature gate `InPlaceNodeResourceResize`. With the gate on in the
//! kubelet's config file (`featureGates:` of its `KubeletConfiguration`), a restart by the
//! agent is at best redundant and at worst races the kubelet's own resize, so `run` stays
//! report-only (`refresh` `skipped`, reason [`REASON`]) and says why once at start-up.
//!
//! A missing file is normal (a kubelet configured by flags only). A file that cannot be
//! read or parsed is said once and ignored: the agent then acts as it would without it.
//! TODO(kubernetes/enhancements#3953): the gate given as a kubelet flag
//! (`--feature-gates=`) is not read.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{files, record::KubeletConfigStatus};

/// The kubelet's feature gate for resizing the Node on hotplug (KEP-3953 draft).
pub const FEATURE_GATE: &str = "InPlaceNodeResourceResize";
/// The `reason` of `refresh` `skipped` while the kubelet resizes on its own.
pub const REASON: &str = "upstream_resize";
/// The Event reason said once at start-up where the agent stands down.
pub const EVENT_REASON: &str = "UpstreamNodeResizeEnabled";
/// A kubelet config is a few KiB; anything near this is not one.
const MAX_BYTES: u64 = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum KubeletConfigError {
    #[error(transparent)]
    Read(#[from] files::FileError),
    #[error("parsing {} as the kubelet's YAML configuration", path.display())]
    Parse {
        path: PathBuf,
        /// Boxed: the parser's error is large, and this one travels in every `Result`.
        #[source]
        source: Box<serde_saphyr::Error>,
    },
}

/// The part of `KubeletConfiguration` (kubelet.config.k8s.io/v1beta1) read here; every
/// other field is left to the kubelet.
#[derive(Debug, Default, Deserialize)]
struct KubeletConfiguration {
    #[serde(default, rename = "featureGates")]
    feature_gates: Option<BTreeMap<String, bool>>,
}

/// Whether the config file at `path` turns [`FEATURE_GATE`] on: `Ok(None)` where there is
/// no file.
pub fn gate_enabled(path: &Path) -> Result<Option<bool>, KubeletConfigError> {
    let text = match files::read_regular_text(path, MAX_BYTES) {
        Ok(t) => t,
        Err(e) if e.is_missing() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    // An empty file is an empty document, not an error.
    if text.trim().is_empty() {
        return Ok(Some(false));
    }
    let config: KubeletConfiguration =
        serde_saphyr::from_str(&text).map_err(|source| KubeletConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
    Ok(Some(
        config
            .feature_gates
            .and_then(|g| g.get(FEATURE_GATE).copied())
            .unwrap_or(false),
    ))
}

/// What the ready record says about the kubelet's config file; a problem is logged here,
/// once.
pub fn status(path: &Path) -> KubeletConfigStatus {
    let (found, upstream_resize, error) = match gate_enabled(path) {
        Ok(None) => (false, false, None),
        Ok(Some(on)) => (true, on, None),
        Err(e) => {
            let message = crate::sources::error_chain(&e);
            tracing::warn!(error = %message, "ignoring the kubelet's config file");
            (
                !matches!(&e, KubeletConfigError::Read(f) if f.is_missing()),
                false,
                Some(message),
            )
        }
    };
    KubeletConfigStatus {
        path: path.display().to_string(),
        found,
        upstream_resize,
        error,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("config.yaml");
        std::fs::write(&path, text).expect("fixture");
        (dir, path)
    }

    #[test]
    fn the_gate_is_read_from_a_real_kubelet_configuration() {
        let (_d, path) = config(
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n\
             cgroupDriver: systemd\nreservedSystemCPUs: \"0\"\n\
             featureGates:\n  InPlacePodVerticalScaling: true\n  InPlaceNodeResourceResize: true\n",
        );
        assert_eq!(gate_enabled(&path).expect("parses"), Some(true));
        let s = status(&path);
        assert!(s.found && s.upstream_resize && s.error.is_none(), "{s:?}");
    }

    #[test]
    fn off_absent_or_other_gates_leave_the_agent_acting() {
        for text in [
            "featureGates: {InPlaceNodeResourceResize: false}\n",
            "featureGates:\n  SomethingElse: true\n",
            "kind: KubeletConfiguration\n",
            "",
        ] {
            let (_d, path) = config(text);
            assert_eq!(gate_enabled(&path).expect(text), Some(false), "{text:?}");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let missing = dir.path().join("config.yaml");
        assert_eq!(gate_enabled(&missing).expect("missing is fine"), None);
        let s = status(&missing);
        assert!(!s.found && !s.upstream_resize && s.error.is_none(), "{s:?}");
    }

    #[test]
    fn a_garbled_or_unreadable_file_is_an_error_that_names_it() {
        let (_d, path) = config("featureGates: [\n  : : :\n");
        let err = gate_enabled(&path).expect_err("garbled");
        assert!(err.to_string().contains("config.yaml"), "{err}");
        let s = status(&path);
        assert!(s.found && !s.upstream_resize && s.error.is_some(), "{s:?}");
        // A gate that is not a boolean is garbled too, not "off".
        let (_d, path) = config("featureGates:\n  InPlaceNodeResourceResize: perhaps\n");
        assert!(gate_enabled(&path).is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let err = gate_enabled(dir.path()).expect_err("a directory");
        assert!(err.to_string().contains("directory"), "{err}");
    }
}
