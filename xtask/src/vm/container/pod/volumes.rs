//! Volume mounts: hostPath, ConfigMap and emptyDir volumes as podman mounts.
use std::collections::BTreeMap;

use anyhow::{Context as _, bail, ensure};
use k8s_openapi::api::core::v1::{
    ConfigMapVolumeSource, EmptyDirVolumeSource, HostPathVolumeSource, Volume, VolumeMount,
};
use kube_quantity::ParsedQuantity;

use super::{Placement, PodmanRun, Rendered, camel};

pub(super) fn mount(
    m: &VolumeMount,
    volumes: &BTreeMap<&str, &Volume>,
    rendered: &Rendered,
    at: &Placement,
    p: &str,
    run: &mut PodmanRun,
) -> anyhow::Result<()> {
    let VolumeMount {
        mount_path,
        mount_propagation,
        name,
        read_only,
        recursive_read_only,
        sub_path,
        sub_path_expr,
    } = m;
    let p = format!("{p}.volumeMounts[{name}]");
    refuse!(p; recursive_read_only, sub_path, sub_path_expr);
    let mut opts = Vec::new();
    if read_only == &Some(true) {
        opts.push("ro");
    }
    match mount_propagation.as_deref() {
        None | Some("None") => {}
        Some("HostToContainer") => opts.push("rslave"),
        Some("Bidirectional") => opts.push("rshared"),
        Some(other) => bail!("{p}.mountPropagation {other:?}: unknown"),
    }
    let volume = volumes
        .get(name.as_str())
        .with_context(|| format!("{p}: no volume {name:?} in the pod"))?;
    let bind = |source: &str, opts: &[&str]| {
        if opts.is_empty() {
            format!("--volume={source}:{mount_path}")
        } else {
            format!("--volume={source}:{mount_path}:{}", opts.join(","))
        }
    };
    match source(volume, &p)? {
        Source::HostPath(HostPathVolumeSource { path, type_ }) => {
            match type_.as_deref() {
                None | Some("") => {}
                Some("Directory") => run.dirs.push((path.clone(), false)),
                Some("DirectoryOrCreate") => run.dirs.push((path.clone(), true)),
                Some(other) => bail!("{p}: hostPath type {other:?} not translated"),
            }
            run.args.push(bind(path, &opts));
        }
        Source::ConfigMap(ConfigMapVolumeSource {
            default_mode,
            items,
            name: cm,
            optional,
        }) => {
            let at_cm = format!("{p}: configMap {cm}");
            ensure!(items.is_none(), "{at_cm}: items not translated");
            ensure!(
                default_mode.is_none_or(|m| m == 0o644),
                "{at_cm}: defaultMode not translated"
            );
            let found = rendered
                .config_maps
                .iter()
                .find(|c| c.metadata.name.as_deref() == Some(cm.as_str()));
            let Some(found) = found else {
                ensure!(
                    optional == &Some(true),
                    "{at_cm}: not in the rendered objects"
                );
                return Ok(());
            };
            ensure!(
                found.binary_data.is_none(),
                "{at_cm}: binaryData not translated"
            );
            let dir = format!("{}/{name}", at.volumes_dir);
            run.dirs.push((dir.clone(), true));
            for (key, text) in found.data.iter().flatten() {
                ensure!(!key.contains('/'), "{at_cm}: key {key:?}");
                run.files.push((format!("{dir}/{key}"), text.clone()));
            }
            // The kubelet mounts ConfigMaps read-only, whatever the mount says.
            let mut opts = opts.clone();
            if !opts.contains(&"ro") {
                opts.insert(0, "ro");
            }
            run.args.push(bind(&dir, &opts));
        }
        Source::EmptyDir(EmptyDirVolumeSource { medium, size_limit }) => match medium.as_deref() {
            Some("Memory") => {
                let mut spec = format!("--mount=type=tmpfs,destination={mount_path}");
                if let Some(q) = size_limit {
                    let bytes = ParsedQuantity::try_from(q)
                        .ok()
                        .and_then(|q| q.to_bytes_u64())
                        .with_context(|| format!("{p}: sizeLimit {:?}", q.0))?;
                    spec.push_str(&format!(",tmpfs-size={bytes}"));
                }
                if opts.contains(&"ro") {
                    spec.push_str(",ro=true");
                }
                run.args.push(spec);
            }
            None | Some("") => {
                ensure!(size_limit.is_none(), "{p}: disk sizeLimit not translated");
                let dir = format!("{}/{name}", at.volumes_dir);
                run.dirs.push((dir.clone(), true));
                run.args.push(bind(&dir, &opts));
            }
            Some(other) => bail!("{p}: emptyDir medium {other:?} not translated"),
        },
    }
    Ok(())
}

enum Source<'a> {
    HostPath(&'a HostPathVolumeSource),
    ConfigMap(&'a ConfigMapVolumeSource),
    EmptyDir(&'a EmptyDirVolumeSource),
}

fn source<'a>(v: &'a Volume, p: &str) -> anyhow::Result<Source<'a>> {
    let Volume {
        aws_elastic_block_store,
        azure_disk,
        azure_file,
        cephfs,
        cinder,
        config_map,
        csi,
        downward_api,
        empty_dir,
        ephemeral,
        fc,
        flex_volume,
        flocker,
        gce_persistent_disk,
        git_repo,
        glusterfs,
        host_path,
        image,
        iscsi,
        name: _,
        nfs,
        persistent_volume_claim,
        photon_persistent_disk,
        portworx_volume,
        projected,
        quobyte,
        rbd,
        scale_io,
        secret,
        storageos,
        vsphere_volume,
    } = v;
    let p = format!("{p} (volume)");
    refuse!(p; aws_elastic_block_store, azure_disk, azure_file, cephfs, cinder, csi,
        downward_api, ephemeral, fc, flex_volume, flocker, gce_persistent_disk, git_repo,
        glusterfs, image, iscsi, nfs, persistent_volume_claim, photon_persistent_disk,
        portworx_volume, projected, quobyte, rbd, scale_io, secret, storageos, vsphere_volume);
    Ok(match (host_path, config_map, empty_dir) {
        (Some(h), None, None) => Source::HostPath(h),
        (None, Some(c), None) => Source::ConfigMap(c),
        (None, None, Some(e)) => Source::EmptyDir(e),
        _ => bail!("{p}: not exactly one source"),
    })
}
