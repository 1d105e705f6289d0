//! Safe shrink: will the pods still fit after the kubelet restarts on a smaller machine?
//!
//! On restart the kubelet sets the pods' cgroup memory limit from the capacity it reads
//! (pkg/kubelet/cm/node_container_manager_linux.go), and re-admits every pod against the
//! new allocatable (pkg/kubelet/lifecycle/predicate.go). After memory was offlined or CPUs
//! went away, a restart can therefore OOM-kill pods before the kubelet evicts anything
//! (kubernetes/kubernetes#141609), or fail running pods with `OutOfmemory`/`OutOfcpu`.
//! Before such a restart the agent compares the allocatable the Node will advertise with
//! what the pods use and request, and either refuses or, opt-in, evicts the lowest-priority
//! pods until they fit (run/shrink.rs). Pure functions of a Node, its pods and a cgroup
//! tree, so they are tested on fixtures.
use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use k8s_openapi::api::core::v1::{Node, Pod};
use kube_quantity::ParsedQuantity;

use crate::{capacity::Summary, record::ShrinkCheck};

/// `--shrink-policy`: what to do when a restart on a smaller machine would not hold the pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Policy {
    /// Do not restart; a Warning Event and a `refresh` `skipped` (`shrink_unsafe`) record.
    #[default]
    Refuse,
    /// Cordon, evict the lowest-priority pods through the Eviction API until the rest fit,
    /// restart, lift the agent's own cordon.
    Evict,
}

/// The phases of a pod that holds nothing any more: the kubelet leaves them out of
/// admission (and their cgroups are gone).
const TERMINAL: [&str; 2] = ["Succeeded", "Failed"];

/// What one pod on the node asks for and uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodLoad {
    pub uid: String,
    pub namespace: String,
    pub name: String,
    /// `spec.priority` (0 without a priority class, as the admission plugin defaults it).
    pub priority: i32,
    pub memory_request: u64,
    pub cpu_request_millis: u64,
    /// The working set of its cgroup, where it was found.
    pub memory_in_use: Option<u64>,
    /// Not a mirror (static) pod, not a DaemonSet's (recreated on the same node, as
    /// `kubectl drain` says), not already terminating.
    pub evictable: bool,
    /// `metadata.deletionTimestamp` is set: on its way out, still holding its memory.
    pub terminating: bool,
}

impl PodLoad {
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The node's pods that hold resources (not terminal), with their cgroups' use.
pub fn loads(pods: &[Pod], usage: &PodsUsage) -> Vec<PodLoad> {
    pods.iter()
        .filter(|p| {
            let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
            !phase.is_some_and(|ph| TERMINAL.contains(&ph))
        })
        .map(|p| {
            let uid = p.metadata.uid.clone().unwrap_or_default();
            let (memory_request, cpu_request_millis) = requests(p);
            let mirror = p
                .metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"));
            let daemon = p
                .metadata
                .owner_references
                .as_ref()
                .is_some_and(|o| o.iter().any(|r| r.kind == "DaemonSet"));
            let terminating = p.metadata.deletion_timestamp.is_some();
            PodLoad {
                memory_in_use: usage.pods.get(&uid).copied(),
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
                priority: p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0),
                memory_request,
                cpu_request_millis,
                evictable: !mirror && !daemon && !terminating,
                terminating,
                uid,
            }
        })
        .collect()
}

/// Pods a static policy's reset or rewrite has already decided about, when the same
/// restart is also on a smaller machine.
#[derive(Clone, Copy, Debug)]
pub enum Pinned<'a> {
    /// No static policy in the way.
    None,
    /// drain-and-reset evicts these (UIDs) anyway: they hold nothing after it.
    Leaving(&'a [String]),
    /// update-in-place keeps these (UIDs) on their CPUs and memory: never evicted for the
    /// shrink.
    Staying(&'a [String]),
}

/// `loads` and `usage` as the shrink's plan must see them, given what the static policy
/// does with the pinned pods.
pub fn account_pinned(loads: &mut Vec<PodLoad>, usage: &mut PodsUsage, pinned: Pinned<'_>) {
    match pinned {
        Pinned::None => {}
        Pinned::Leaving(uids) => {
            loads.retain(|p| !uids.contains(&p.uid));
            let freed: u64 = uids.iter().filter_map(|u| usage.pods.remove(u)).sum();
            usage.total = usage.total.map(|t| t.saturating_sub(freed));
        }
        Pinned::Staying(uids) => {
            for p in loads.iter_mut().filter(|p| uids.contains(&p.uid)) {
                p.evictable = false;
            }
        }
    }
}

/// A pod's requests as the scheduler and the kubelet's admission count them
/// (k8s.io/component-helpers/resource `PodRequests`): the larger of the containers' sum
/// and the largest init container, plus the pod overhead.
fn requests(pod: &Pod) -> (u64, u64) {
    let Some(spec) = pod.spec.as_ref() else {
        return (0, 0);
    };
    let of = |r: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
              key: &str,
              scale: f64| {
        r.and_then(|m| m.get(key))
            .and_then(|q| quantity(&q.0))
            .map_or(0, |v| (v * scale).round() as u64)
    };
    let container = |c: &k8s_openapi::api::core::v1::Container| {
        let r = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        (of(r, "memory", 1.0), of(r, "cpu", 1000.0))
    };
    let (mut mem, mut cpu) = spec
        .containers
        .iter()
        .map(container)
        .fold((0, 0), |(m, c), (m2, c2)| (m + m2, c + c2));
    for init in spec.init_containers.iter().flatten() {
        let (m, c) = container(init);
        mem = mem.max(m);
        cpu = cpu.max(c);
    }
    let overhead = spec.overhead.as_ref();
    (
        mem + of(overhead, "memory", 1.0),
        cpu + of(overhead, "cpu", 1000.0),
    )
}

/// A Kubernetes quantity as a number (bytes, cores); kube_quantity, never by hand.
fn quantity(text: &str) -> Option<f64> {
    ParsedQuantity::try_from(text)
        .ok()?
        .to_bytes_f64()
        .filter(|v| v.is_finite() && *v >= 0.0)
}

/// The memory the pods use, as the kernel counts it under the kubelet's cgroup root.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodsUsage {
    /// The pods' cgroup (`kubepods`) as a whole.
    pub total: Option<u64>,
    /// Each pod's cgroup, by pod UID.
    pub pods: HashMap<String, u64>,
    /// Where `total` was read.
    pub path: Option<PathBuf>,
}

/// The pods' cgroup under `cgroup_root`: cgroup v2 with the systemd or cgroupfs driver,
/// then v1's memory controller; each with its usage file and the `memory.stat` key of the
/// inactive file pages.
const LAYOUTS: [(&str, &str, &str); 4] = [
    ("kubepods.slice", "memory.current", "inactive_file"),
    ("kubepods", "memory.current", "inactive_file"),
    (
        "memory/kubepods.slice",
        "memory.usage_in_bytes",
        "total_inactive_file",
    ),
    (
        "memory/kubepods",
        "memory.usage_in_bytes",
        "total_inactive_file",
    ),
];

/// Reads the pods' memory use: the working set (usage minus inactive file pages, which the
/// kernel reclaims before it OOM-kills), as the kubelet's eviction manager and cadvisor
/// count it. The same tree the verify step reads the limit from (verify.rs).
pub fn pods_usage(cgroup_root: &Path) -> PodsUsage {
    let Some((dir, usage_file, inactive)) = LAYOUTS
        .iter()
        .map(|(d, u, i)| (cgroup_root.join(d), *u, *i))
        .find(|(d, u, _)| d.join(u).exists())
    else {
        return PodsUsage::default();
    };
    let mut out = PodsUsage {
        total: working_set(&dir, usage_file, inactive),
        path: Some(dir.join(usage_file)),
        pods: HashMap::new(),
    };
    // kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice,
    // kubepods.slice/kubepods-pod<uid_>.slice (Guaranteed), kubepods/burstable/pod<uid>.
    let mut stack = vec![(dir, 0)];
    while let Some((dir, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten().filter(|e| e.path().is_dir()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            match pod_uid(&name) {
                Some(uid) => {
                    if let Some(ws) = working_set(&entry.path(), usage_file, inactive) {
                        out.pods.insert(uid, ws);
                    }
                }
                None if depth < 2 => stack.push((entry.path(), depth + 1)),
                None => {}
            }
        }
    }
    out
}

/// The pod UID in a pod cgroup's name: `kubepods-besteffort-pod12ab_34cd.slice` (systemd
/// driver, `-` escaped as `_`) or `pod12ab-34cd` (cgroupfs).
fn pod_uid(name: &str) -> Option<String> {
    if let Some(stem) = name.strip_suffix(".slice") {
        let (_, uid) = stem.rsplit_once("-pod")?;
        return (!uid.is_empty()).then(|| uid.replace('_', "-"));
    }
    name.strip_prefix("pod")
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
}

fn working_set(dir: &Path, usage_file: &str, inactive_key: &str) -> Option<u64> {
    let usage: u64 = std::fs::read_to_string(dir.join(usage_file))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let inactive = std::fs::read_to_string(dir.join("memory.stat"))
        .ok()
        .and_then(|stat| {
            stat.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == inactive_key).then(|| v.trim().parse::<u64>().ok())?
            })
        })
        .unwrap_or(0);
    Some(usage.saturating_sub(inactive))
}

/// Whether the machine has less than the Node advertises: the case this module is for.
pub fn is_decrease(machine: Summary, node: &Node) -> bool {
    let Some(cap) = node.status.as_ref().and_then(|s| s.capacity.as_ref()) else {
        return false;
    };
    let memory = cap.get("memory").and_then(|q| quantity(&q.0));
    let cpu = cap.get("cpu").and_then(|q| quantity(&q.0));
    memory.is_some_and(|m| (machine.memory_bytes as f64) < m)
        || cpu.is_some_and(|c| f64::from(machine.cpus_online) < c)
}

/// The allocatable memory (bytes) and CPU (millicores) the Node will advertise after a
/// restart on `machine`: the machine's capacity minus what the Node reserves now
/// (capacity minus allocatable: kube- and system-reserved and the eviction threshold,
/// which a restart does not change).
pub fn allocatable_after(machine: Summary, node: &Node) -> (Option<u64>, Option<u64>) {
    let status = node.status.as_ref();
    let get = |m: Option<
        &std::collections::BTreeMap<
            String,
            k8s_openapi::apimachinery::pkg::api::resource::Quantity,
        >,
    >,
               key: &str| m.and_then(|m| m.get(key)).and_then(|q| quantity(&q.0));
    let cap = status.and_then(|s| s.capacity.as_ref());
    let alloc = status.and_then(|s| s.allocatable.as_ref());
    let reserved = |key: &str| match (get(cap, key), get(alloc, key)) {
        (Some(c), Some(a)) => Some((c - a).max(0.0)),
        _ => None,
    };
    let memory =
        reserved("memory").map(|r| (machine.memory_bytes as f64 - r).max(0.0).round() as u64);
    let cpu = reserved("cpu").map(|r| {
        (f64::from(machine.cpus_online) * 1000.0 - r * 1000.0)
            .max(0.0)
            .round() as u64
    });
    (memory, cpu)
}

/// The check of the pods against the allocatable after the restart. Every measure that
/// could be read must fit, and at least one of memory use and memory requests must have
/// been read: an unknown is never taken as room.
pub fn check(
    allocatable: (Option<u64>, Option<u64>),
    usage: &PodsUsage,
    loads: Option<&[PodLoad]>,
) -> ShrinkCheck {
    let (memory_after, cpu_after) = allocatable;
    let memory_requests = loads.map(|l| l.iter().map(|p| p.memory_request).sum::<u64>());
    let cpu_requests = loads.map(|l| l.iter().map(|p| p.cpu_request_millis).sum::<u64>());
    let mut c = ShrinkCheck {
        memory_allocatable_after: memory_after,
        memory_in_use: usage.total,
        memory_requests,
        cpu_allocatable_after_millis: cpu_after,
        cpu_requests_millis: cpu_requests,
        pods: loads.map(|l| l.len() as u64),
        cgroup: usage.path.as_ref().map(|p| p.display().to_string()),
        fits: false,
        evict: Vec::new(),
        offlining: Vec::new(),
    };
    c.fits = fits(&c);
    c
}

fn fits(c: &ShrinkCheck) -> bool {
    let within = |v: Option<u64>, limit: Option<u64>| match (v, limit) {
        (Some(v), Some(l)) => v <= l,
        (None, _) => true,
        // Something to fit and no idea of the room: not known to fit.
        (Some(_), None) => false,
    };
    (c.memory_in_use.is_some() || c.memory_requests.is_some())
        && within(c.memory_in_use, c.memory_allocatable_after)
        && within(c.memory_requests, c.memory_allocatable_after)
        && within(c.cpu_requests_millis, c.cpu_allocatable_after_millis)
}

/// The pods to evict, lowest priority first (then the largest working set, then by name,
/// so that the order is the same on every run), until the rest would fit: `None` where
/// even evicting every evictable pod would not do (evicting then only hurts).
pub fn plan(check: &ShrinkCheck, loads: &[PodLoad]) -> Option<Vec<PodLoad>> {
    let mut order: Vec<&PodLoad> = loads.iter().filter(|p| p.evictable).collect();
    order.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then(b.memory_in_use.cmp(&a.memory_in_use))
            .then(a.key().cmp(&b.key()))
    });
    let mut left = check.clone();
    let mut out = Vec::new();
    for pod in order {
        if fits(&left) {
            break;
        }
        // A pod whose cgroup was not found frees nothing we can count.
        left.memory_in_use = left
            .memory_in_use
            .map(|u| u.saturating_sub(pod.memory_in_use.unwrap_or(0)));
        left.memory_requests = left
            .memory_requests
            .map(|r| r.saturating_sub(pod.memory_request));
        left.cpu_requests_millis = left
            .cpu_requests_millis
            .map(|r| r.saturating_sub(pod.cpu_request_millis));
        out.push(pod.clone());
    }
    fits(&left).then_some(out)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn pod(name: &str, priority: i32, memory: &str, cpu: &str) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "work", "uid": format!("uid-{name}")},
            "spec": {"priority": priority, "containers": [
                {"name": "a", "image": "x", "resources": {"requests": {"memory": memory, "cpu": cpu}}},
            ]},
            "status": {"phase": "Running"},
        }))
        .expect("a Pod")
    }

    fn node(cap: (&str, &str), alloc: (&str, &str)) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n"},
            "status": {
                "capacity": {"memory": cap.0, "cpu": cap.1},
                "allocatable": {"memory": alloc.0, "cpu": alloc.1},
            },
        }))
        .expect("a Node")
    }

    fn machine(memory: u64, cpus: u32) -> Summary {
        Summary {
            memory_bytes: memory,
            cpus_online: cpus,
        }
    }

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    #[test]
    fn the_working_set_is_read_for_the_pods_and_each_pod_in_every_layout() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(pods_usage(dir.path()), PodsUsage::default());
        let v2 = dir.path().join("kubepods.slice");
        write(&v2.join("memory.current"), "3000\n");
        write(&v2.join("memory.stat"), "anon 2000\ninactive_file 500\n");
        let burst = v2.join("kubepods-burstable.slice/kubepods-burstable-pod12ab_34cd.slice");
        write(&burst.join("memory.current"), "1200\n");
        write(&burst.join("memory.stat"), "inactive_file 200\n");
        let guaranteed = v2.join("kubepods-pod99_00.slice");
        write(&guaranteed.join("memory.current"), "700\n");
        let usage = pods_usage(dir.path());
        assert_eq!(
            usage.total,
            Some(2500),
            "3000 minus 500 inactive file pages"
        );
        assert_eq!(usage.pods.get("12ab-34cd"), Some(&1000));
        assert_eq!(usage.pods.get("99-00"), Some(&700));
        assert_eq!(usage.pods.len(), 2, "the QoS slices are not pods");
        // cgroupfs driver on v1.
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("memory/kubepods");
        write(&v1.join("memory.usage_in_bytes"), "9000\n");
        write(&v1.join("memory.stat"), "total_inactive_file 1000\n");
        write(
            &v1.join("besteffort/podab-cd/memory.usage_in_bytes"),
            "400\n",
        );
        let usage = pods_usage(dir.path());
        assert_eq!(usage.total, Some(8000));
        assert_eq!(usage.pods.get("ab-cd"), Some(&400));
        assert_eq!(pod_uid("kubepods-besteffort.slice"), None);
        assert_eq!(pod_uid("burstable"), None);
    }

    #[test]
    fn requests_count_init_containers_and_overhead_as_admission_does() {
        let p: Pod = serde_json::from_value(json!({
            "metadata": {"name": "p", "uid": "u"},
            "spec": {
                "containers": [
                    {"name": "a", "image": "x", "resources": {"requests": {"memory": "100Mi", "cpu": "250m"}}},
                    {"name": "b", "image": "x", "resources": {"requests": {"memory": "1.5Gi"}}},
                ],
                "initContainers": [
                    {"name": "i", "image": "x", "resources": {"requests": {"memory": "2Gi", "cpu": "100m"}}},
                ],
                "overhead": {"memory": "10Mi", "cpu": "10m"},
            },
        }))
        .unwrap();
        assert_eq!(requests(&p), (2 * GIB + 10 * MIB, 260));
    }

    #[test]
    fn allocatable_after_keeps_what_the_node_reserves() {
        let n = node(("4Gi", "4"), ("3996Mi", "3500m"));
        let (mem, cpu) = allocatable_after(machine(3 * GIB, 2), &n);
        assert_eq!(mem, Some(3 * GIB - 100 * MIB));
        assert_eq!(cpu, Some(1500));
        assert!(is_decrease(machine(3 * GIB, 4), &n));
        assert!(is_decrease(machine(4 * GIB, 3), &n));
        assert!(!is_decrease(machine(4 * GIB, 4), &n));
        assert!(!is_decrease(machine(8 * GIB, 4), &n));
    }

    #[test]
    fn it_fits_only_where_every_known_measure_fits() {
        let pods = vec![pod("a", 0, "1Gi", "500m"), pod("b", 0, "1Gi", "500m")];
        let usage = PodsUsage {
            total: Some(GIB),
            ..PodsUsage::default()
        };
        let l = loads(&pods, &usage);
        assert!(check((Some(3 * GIB), Some(2000)), &usage, Some(&l)).fits);
        // Requests too large for memory, or for CPU.
        assert!(!check((Some(GIB), Some(2000)), &usage, Some(&l)).fits);
        assert!(!check((Some(3 * GIB), Some(999)), &usage, Some(&l)).fits);
        // Use above the new allocatable.
        let hot = PodsUsage {
            total: Some(4 * GIB),
            ..PodsUsage::default()
        };
        assert!(!check((Some(3 * GIB), Some(2000)), &hot, Some(&l)).fits);
        // Nothing known about memory: not known to fit.
        assert!(!check((Some(3 * GIB), None), &PodsUsage::default(), None).fits);
        // Pods unknown (the list was refused): judged by the cgroup alone.
        assert!(check((Some(3 * GIB), None), &usage, None).fits);
    }

    #[test]
    fn terminal_pods_hold_nothing_and_daemons_mirrors_and_terminating_pods_stay() {
        let mut done = pod("done", 0, "8Gi", "8");
        done.status.as_mut().unwrap().phase = Some("Succeeded".into());
        let mut daemon = pod("daemon", 0, "1Gi", "0");
        daemon.metadata.owner_references = Some(vec![
            serde_json::from_value(
                json!({"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "d", "uid": "x"}),
            )
            .unwrap(),
        ]);
        let mut mirror = pod("mirror", 0, "1Gi", "0");
        mirror.metadata.annotations =
            Some([("kubernetes.io/config.mirror".to_owned(), "h".to_owned())].into());
        let l = loads(
            &[done, daemon, mirror, pod("plain", 0, "1Gi", "0")],
            &PodsUsage::default(),
        );
        let names: Vec<(&str, bool)> = l.iter().map(|p| (p.name.as_str(), p.evictable)).collect();
        assert_eq!(
            names,
            [("daemon", false), ("mirror", false), ("plain", true)]
        );
    }

    /// A reset's pinned pods count as gone (their use and requests), a rewrite's stay and
    /// are never picked for eviction.
    #[test]
    fn pinned_pods_leave_with_a_reset_and_stay_with_a_rewrite() {
        let pods = [pod("pinned", 2000, "1Gi", "1"), pod("low", 0, "1Gi", "0")];
        let mut usage = PodsUsage {
            total: Some(3 * GIB),
            pods: [
                ("uid-pinned".to_owned(), 2 * GIB),
                ("uid-low".to_owned(), GIB),
            ]
            .into(),
            path: None,
        };
        let base = loads(&pods, &usage);
        let pinned = ["uid-pinned".to_owned()];

        let (mut leaving, mut after) = (base.clone(), usage.clone());
        account_pinned(&mut leaving, &mut after, Pinned::Leaving(&pinned));
        assert_eq!(after.total, Some(GIB));
        assert_eq!(
            leaving.iter().map(PodLoad::key).collect::<Vec<_>>(),
            ["work/low"]
        );

        let mut staying = base;
        account_pinned(&mut staying, &mut usage, Pinned::Staying(&pinned));
        assert_eq!(usage.total, Some(3 * GIB));
        let evictable: Vec<(String, bool)> =
            staying.iter().map(|p| (p.key(), p.evictable)).collect();
        assert_eq!(
            evictable,
            [
                ("work/pinned".to_owned(), false),
                ("work/low".to_owned(), true)
            ]
        );
    }

    #[test]
    fn the_plan_evicts_the_lowest_priority_first_until_the_rest_fit() {
        let pods = vec![
            pod("high", 1000, "512Mi", "0"),
            pod("mid", 100, "512Mi", "0"),
            pod("low", 0, "512Mi", "0"),
        ];
        let usage = PodsUsage {
            total: Some(3 * GIB + 512 * MIB),
            pods: HashMap::from([
                ("uid-high".to_owned(), 2 * GIB),
                ("uid-mid".to_owned(), 512 * MIB),
                ("uid-low".to_owned(), 512 * MIB),
            ]),
            path: None,
        };
        let l = loads(&pods, &usage);
        let c = check((Some(3 * GIB - 100 * MIB), Some(2000)), &usage, Some(&l));
        assert!(!c.fits);
        let order: Vec<String> = plan(&c, &l)
            .unwrap()
            .iter()
            .map(|p| p.name.clone())
            .collect();
        assert_eq!(
            order,
            ["low", "mid"],
            "3.5 GiB - 0.5 still too much; - 1 GiB fits"
        );
        // Not even all of them would do: nothing is evicted.
        let c = check((Some(256 * MIB), Some(2000)), &usage, Some(&l));
        assert_eq!(plan(&c, &l), None);
    }
}
