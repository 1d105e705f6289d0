//! pod-standin: one pod's process, for the VM scenario in which the agent evicts pods while
//! the kernel offlines the memory they sit on (xtask/src/vm/shrink.rs).
//!
//! `pod-standin --kubeconfig K --node-name N --name NAME --priority P --memory-request Q
//! --hold-bytes B [--pin] [--cgroup-root /sys/fs/cgroup] [--ready-file F]`
//!
//! 1. Creates the Pod through the API (bound to the node: `spec.nodeName`, `spec.priority`,
//!    one container requesting `memory: Q`) and reports it `Running` (pods/status).
//! 2. Makes the pod's cgroup where the kubelet's systemd cgroup driver puts a Burstable pod
//!    (requests without limits): `kubepods.slice/kubepods-burstable.slice/
//!    kubepods-burstable-pod<uid, - as _>.slice`, with the memory controller enabled on
//!    the way down, and moves itself in before it allocates: its memory is charged there,
//!    so the agent reads the pod's real `memory.current`.
//! 3. Allocates B bytes and touches every page. With `--pin` it then vmsplices every page
//!    into pipes nobody reads: without SPLICE_F_GIFT a pipe keeps a reference on each page,
//!    as pages under in-flight I/O have, so the kernel cannot migrate them and
//!    `offline_pages()` retries until they are released (it has no timeout in 6.x). It
//!    prints, from /proc/self/pagemap (root: PFNs), how many pinned pages lie in each
//!    memory block: `pinned 16384 pages: memory40 9000, memory41 7384`.
//! 4. Prints `running` (and writes the ready file), then watches its own Pod (a watch with
//!    a field selector, no polling) and exits 0 printing `deleted` once the Pod is gone,
//!    which frees the memory and the pins. SIGTERM or SIGINT: exit 0 printing `terminated`.
//!
//! What a real pod does that this one does not: no container runtime, no image, no
//! kubelet between the API and the process (deletion reaches the process through its own
//! watch, at once, with no grace period or SIGTERM from a kubelet), no QoS-dependent
//! `memory.min`/`memory.high`, and the status is written once by the pod itself. The Pod's
//! `spec.priority` is set directly, as the Priority admission plugin would from a class.
use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use futures::{StreamExt as _, TryStreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api,
    api::{Patch, PatchParams, PostParams},
    runtime::watcher,
};
use tokio::signal::unix::{SignalKind, signal};

const PAGE: usize = 4096;
/// The pipe size asked for with F_SETPIPE_SZ: 256 page slots.
const PIPE_BYTES: usize = 1 << 20;

#[derive(Parser, Debug)]
#[command(about = "One pod's process for the shrink VM scenario (see the source)")]
struct Args {
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long)]
    node_name: String,
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long, default_value_t = 0)]
    priority: i32,
    /// The container's `resources.requests.memory`, a Kubernetes quantity.
    #[arg(long)]
    memory_request: String,
    /// Bytes to allocate and touch (`64Mi`, or a number of bytes).
    #[arg(long, value_parser = parse_bytes)]
    hold_bytes: usize,
    /// Keep every held page referenced by a pipe (vmsplice), unmigratable while we live.
    #[arg(long)]
    pin: bool,
    #[arg(long, default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// Receives `running` once the memory is held (written atomically).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

/// `64Mi`, `1Gi`, `4096`.
fn parse_bytes(s: &str) -> Result<usize, String> {
    let (digits, shift) = match s {
        s if s.ends_with("Ki") => (&s[..s.len() - 2], 10),
        s if s.ends_with("Mi") => (&s[..s.len() - 2], 20),
        s if s.ends_with("Gi") => (&s[..s.len() - 2], 30),
        s => (s, 0),
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_shl(shift))
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("not a size: {s:?} (e.g. 64Mi)"))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let client = hotplug_tests::kubelet::client(&args.kubeconfig, None).await?;
    let pods: Api<Pod> = Api::namespaced(client, &args.namespace);

    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": args.name, "namespace": args.namespace},
        "spec": {
            "nodeName": args.node_name,
            "priority": args.priority,
            "containers": [{
                "name": "main",
                "image": "none",
                "resources": {"requests": {"memory": args.memory_request}},
            }],
        },
    }))
    .context("the Pod object")?;
    let created = pods
        .create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating Pod {}/{}", args.namespace, args.name))?;
    let uid = created
        .metadata
        .uid
        .clone()
        .context("the created Pod has no uid")?;
    pods.patch_status(
        &args.name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"phase": "Running", "qosClass": "Burstable"}})),
    )
    .await
    .context("reporting the Pod Running")?;

    let cgroup = enter_pod_cgroup(&args.cgroup_root, &uid)?;
    let held = Held::allocate(args.hold_bytes)?;
    // Kept open until we exit: closing them drops the page references.
    let pins = if args.pin { Some(held.pin()?) } else { None };
    let blocks = held.blocks()?;
    println!(
        "{} {} pages: {}",
        if pins.is_some() {
            "pinned"
        } else {
            "holding unpinned"
        },
        held.pages(),
        blocks
            .iter()
            .map(|(b, n)| format!("{b} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("cgroup {}", cgroup.display());
    if let Some(path) = &args.ready_file {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, "running\n").with_context(|| format!("writing {}", tmp.display()))?;
        fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    }
    println!("running");

    tokio::select! {
        r = deleted(&pods, &args.name, &uid) => {
            r?;
            println!("deleted");
        }
        _ = term.recv() => println!("terminated"),
        _ = int.recv() => println!("terminated"),
    }
    drop(pins);
    drop(held);
    Ok(())
}

/// Resolves once our Pod (this uid) is gone: a DELETED event, or a re-list without it
/// (the watch was interrupted and the deletion happened meanwhile).
async fn deleted(pods: &Api<Pod>, name: &str, uid: &str) -> anyhow::Result<()> {
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let ours = |p: &Pod| p.metadata.uid.as_deref() == Some(uid);
    let mut stream = watcher(pods.clone(), config).boxed();
    let mut listed_ours = false;
    while let Some(event) = stream.try_next().await.context("watching our Pod")? {
        match event {
            watcher::Event::Delete(p) if ours(&p) => return Ok(()),
            watcher::Event::Init => listed_ours = false,
            watcher::Event::InitApply(p) if ours(&p) => listed_ours = true,
            watcher::Event::InitDone if !listed_ours => return Ok(()),
            _ => {}
        }
    }
    bail!("the watch of our Pod ended")
}

/// Makes the pod's cgroup (systemd driver, Burstable) and moves this process into it.
fn enter_pod_cgroup(root: &Path, uid: &str) -> anyhow::Result<PathBuf> {
    let escaped = uid.replace('-', "_");
    let levels = [
        root.to_path_buf(),
        root.join("kubepods.slice"),
        root.join("kubepods.slice/kubepods-burstable.slice"),
    ];
    for dir in &levels {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Each level hands the memory controller down, so the pod's cgroup has its own
        // memory.current.
        let control = dir.join("cgroup.subtree_control");
        fs::write(&control, "+memory")
            .with_context(|| format!("enabling memory in {}", control.display()))?;
    }
    let pod = levels[2].join(format!("kubepods-burstable-pod{escaped}.slice"));
    fs::create_dir_all(&pod).with_context(|| format!("creating {}", pod.display()))?;
    let procs = pod.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("moving into {}", procs.display()))?;
    Ok(pod)
}

/// Anonymous memory, touched page by page.
struct Held {
    ptr: *mut u8,
    len: usize,
}

impl Held {
    fn allocate(len: usize) -> anyhow::Result<Self> {
        let len = len.div_ceil(PAGE) * PAGE;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mmap");
        }
        let ptr = ptr.cast::<u8>();
        for off in (0..len).step_by(PAGE) {
            // SAFETY: inside the mapping; a distinct value per page keeps pages distinct
            // (no zero-page or KSM sharing).
            unsafe { ptr.add(off).write_volatile((off / PAGE) as u8 | 1) };
        }
        Ok(Self { ptr, len })
    }

    fn pages(&self) -> usize {
        self.len / PAGE
    }

    /// vmsplice every page into pipes of [`PIPE_BYTES`]; the pipes hold a reference on
    /// each page until they are closed.
    fn pin(&self) -> anyhow::Result<Vec<(OwnedFd, OwnedFd)>> {
        let mut pipes = Vec::new();
        let mut off = 0;
        while off < self.len {
            let mut fds = [0; 2];
            // SAFETY: fds has room for the two descriptors.
            if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
                return Err(std::io::Error::last_os_error()).context("pipe2");
            }
            // SAFETY: both were just opened and are owned by nothing else.
            let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: plain fcntl on our own descriptor.
            let size = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_BYTES as i32) };
            ensure!(
                size >= 0,
                "F_SETPIPE_SZ {PIPE_BYTES}: {}",
                std::io::Error::last_os_error()
            );
            let chunk = (size as usize).min(self.len - off);
            let mut done = 0;
            while done < chunk {
                let iov = libc::iovec {
                    // SAFETY: inside the mapping.
                    iov_base: unsafe { self.ptr.add(off + done) }.cast(),
                    iov_len: chunk - done,
                };
                // SAFETY: the iovec points into our mapping, which outlives the pipes (we
                // exit with both). Non-blocking: a full pipe is an error, not a hang.
                let n = unsafe { libc::vmsplice(w.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
                ensure!(
                    n > 0,
                    "vmsplice at offset {}: {}",
                    off + done,
                    std::io::Error::last_os_error()
                );
                done += n as usize;
            }
            off += chunk;
            pipes.push((r, w));
        }
        Ok(pipes)
    }

    /// Pages per memory block (`memory40`), from the PFNs in /proc/self/pagemap.
    fn blocks(&self) -> anyhow::Result<Vec<(String, usize)>> {
        let hex = fs::read_to_string("/sys/devices/system/memory/block_size_bytes")
            .context("block_size_bytes")?;
        let block_size = u64::from_str_radix(hex.trim(), 16)
            .with_context(|| format!("block_size_bytes {hex:?}"))?;
        let mut pagemap = fs::File::open("/proc/self/pagemap").context("/proc/self/pagemap")?;
        let first = self.ptr as u64 / PAGE as u64;
        pagemap.seek(SeekFrom::Start(first * 8))?;
        let mut raw = vec![0u8; self.pages() * 8];
        pagemap.read_exact(&mut raw).context("reading pagemap")?;
        let mut counts = std::collections::BTreeMap::<u64, usize>::new();
        for entry in raw.chunks_exact(8) {
            let e = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
            let present = e >> 63 == 1;
            let pfn = e & ((1 << 55) - 1);
            ensure!(present, "a held page is not present: {e:#x}");
            ensure!(pfn != 0, "pagemap shows no PFNs (not root?)");
            *counts.entry(pfn * PAGE as u64 / block_size).or_default() += 1;
        }
        Ok(counts
            .into_iter()
            .map(|(b, n)| (format!("memory{b}"), n))
            .collect())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // SAFETY: our mapping, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}
