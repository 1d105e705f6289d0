//! The kernel probe source: loads `agent-ebpf` with aya, attaches what this kernel allows,
//! and drains the ring buffer through tokio.
//!
//! Every hook has attach methods tried in order until one attaches ([`HOOKS`]); every
//! attempt, failed or not, is reported in the ready record so an operator sees what is
//! watching and why the rest is not. What each method needs, per kernel family, is in the
//! README ("eBPF attach methods and capabilities").
use std::{path::Path, sync::Arc};

use agent_common::{
    CpuAction, DROPS_MAP, EVENTS_MAP, GLOBAL_CPUHP_ONLINE, GLOBAL_CPUHP_TEARDOWN, Probe,
    ProbeRecord,
};
use aya::{
    Btf, BtfError, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{BtfTracePoint, FEntry, KProbe, ProgramError, RawTracePoint, TracePoint},
};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{
    Change, Counters, Detail, Loss, coalesce::ProbeEvent, cpuhp, cpuhp::CpuhpError, error_chain,
};
use crate::record::{Action, Kind, ProbeStatus, Source};

/// The object aya-build left in OUT_DIR (empty when the eBPF build was switched off).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hotplug-probes"));

/// How a program is attached to its hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `BPF_PROG_TYPE_TRACEPOINT` on a perf event: perf_event_open(2), which
    /// `perf_event_paranoid` and Debian's CONFIG_SECURITY_PERF_EVENTS_RESTRICT gate.
    Tracepoint { category: &'static str },
    /// `BPF_PROG_TYPE_RAW_TRACEPOINT` through `BPF_RAW_TRACEPOINT_OPEN` (bpf(2) only, 4.17+).
    RawTracepoint,
    /// BTF-enabled tracepoint (`BPF_PROG_TYPE_TRACING`, `BPF_TRACE_RAW_TP`; bpf(2) only,
    /// needs kernel BTF, 5.5+).
    BtfTracepoint,
    /// `BPF_TRACE_FENTRY` on a kernel function (bpf(2) only, needs BTF and a trampoline).
    Fentry,
    /// A kprobe: perf_event_open(2) on the kprobe PMU, or tracefs `kprobe_events`.
    Kprobe,
}

impl Method {
    /// The method's name: the first part of an attempt's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Tracepoint { .. } => "tracepoint",
            Self::RawTracepoint => "raw_tracepoint",
            Self::BtfTracepoint => "tp_btf",
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
        }
    }
}

/// Restricts the attach methods tried, by name (comma-separated, e.g.
/// `raw_tracepoint,fentry`): for testing one method on its own, or for leaving out one
/// that misbehaves on some kernel. Unset: every method, in [`HOOKS`] order.
pub const METHODS_ENV: &str = "HOTPLUG_AGENT_EBPF_METHODS";

/// Whether `method` may be tried under `allowed` (the value of [`METHODS_ENV`]).
pub fn method_allowed(allowed: Option<&str>, method: Method) -> bool {
    allowed.is_none_or(|list| list.split(',').any(|m| m.trim() == method.name()))
}

/// One way to attach one hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Attempt {
    pub method: Method,
    /// The program's name in the object (`agent-ebpf`'s function name).
    pub program: &'static str,
    /// The name the ready record and the event records carry (`probe`): the method, then
    /// the hook (`raw_tracepoint/cpuhp_exit`); the part after the last `/` names the hook.
    pub name: &'static str,
}

/// A kernel hook and the ways to attach it, in the order they are tried.
#[derive(Clone, Copy, Debug)]
pub struct Hook {
    pub probe: Probe,
    /// The tracepoint or kernel function.
    pub target: &'static str,
    pub attempts: &'static [Attempt],
}

/// A tracepoint: perf-event tracepoint, then raw tracepoint, then BTF tracepoint.
///
/// Why this order: the perf-event tracepoint first, so hosts where it attaches (root on
/// most kernels) keep the `tracepoint/...` names their logs and dashboards already have.
/// Where perf_event_open is refused (Debian's perf_event_paranoid 3 without
/// CAP_SYS_ADMIN), the raw tracepoint next: it needs no perf event and no BTF, and has
/// existed since 4.17. The BTF tracepoint last: it needs no perf event either but does need
/// kernel BTF, and gives these hooks nothing the raw one does not; it is there for a kernel
/// or LSM policy that allows `BPF_PROG_TYPE_TRACING` but not raw tracepoint programs.
macro_rules! tracepoint_hook {
    ($probe:expr, $category:literal, $tp:literal) => {
        Hook {
            probe: $probe,
            target: $tp,
            attempts: &[
                Attempt {
                    method: Method::Tracepoint {
                        category: $category,
                    },
                    program: $tp,
                    name: concat!("tracepoint/", $category, "/", $tp),
                },
                Attempt {
                    method: Method::RawTracepoint,
                    program: concat!("raw_", $tp),
                    name: concat!("raw_tracepoint/", $tp),
                },
                Attempt {
                    method: Method::BtfTracepoint,
                    program: concat!("tp_btf_", $tp),
                    name: concat!("tp_btf/", $tp),
                },
            ],
        }
    };
}

/// A kernel function: fentry (exact, cheap, no perf event), then kprobe.
macro_rules! function_hook {
    ($probe:expr, $function:literal) => {
        Hook {
            probe: $probe,
            target: $function,
            attempts: &[
                Attempt {
                    method: Method::Fentry,
                    program: concat!("fentry_", $function),
                    name: concat!("fentry/", $function),
                },
                Attempt {
                    method: Method::Kprobe,
                    program: concat!("kprobe_", $function),
                    name: concat!("kprobe/", $function),
                },
            ],
        }
    };
}

/// Every hook, in the order they are attached.
pub const HOOKS: [Hook; 6] = [
    tracepoint_hook!(Probe::CpuhpExit, "cpuhp", "cpuhp_exit"),
    tracepoint_hook!(Probe::ZoneWatermarks, "kmem", "mm_setup_per_zone_wmarks"),
    function_hook!(Probe::OnlinePages, "online_pages"),
    function_hook!(Probe::OfflinePages, "offline_pages"),
    function_hook!(Probe::GenericOnlinePage, "generic_online_page"),
    function_hook!(Probe::AdjustManagedPageCount, "adjust_managed_page_count"),
];

/// Why one attach attempt failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("program {program} not in the object")]
    NotInObject { program: &'static str },
    #[error("program {program} is not of the expected type")]
    WrongType {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("no kernel BTF")]
    NoBtf(#[source] Arc<BtfError>),
    #[error("CPU hotplug state numbers unknown")]
    CpuhpStates(#[source] Arc<CpuhpError>),
    #[error("loading {program}")]
    Load {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("attaching {program} to {target}")]
    Attach {
        program: &'static str,
        target: &'static str,
        #[source]
        source: ProgramError,
    },
    /// A perf-event tracepoint reads its id from tracefs. In a pod, the hostPath of a host
    /// without tracefs mounted is an empty directory that `type: Directory` accepts, so
    /// this is where that shows, said plainly rather than as aya's "tracefs not found".
    #[error(
        "attaching {program} to {target}: tracefs is not mounted (neither \
         {TRACEFS} nor {DEBUG_TRACEFS} has anything in it): mount it on the host \
         (`mount -t tracefs tracefs {TRACEFS}`; systemd does at boot), and in a pod mount \
         the host's {TRACEFS}; the raw and BTF tracepoints need no tracefs"
    )]
    NoTracefs {
        program: &'static str,
        target: &'static str,
    },
}

const TRACEFS: &str = "/sys/kernel/tracing";
const DEBUG_TRACEFS: &str = "/sys/kernel/debug/tracing";

/// Where aya finds tracefs: the first of `candidates` that exists and is not empty (aya
/// 0.14 `find_tracefs_path`; an unmounted tracefs leaves an empty directory).
fn tracefs_in(candidates: &[&std::path::Path]) -> bool {
    candidates
        .iter()
        .any(|p| std::fs::read_dir(p).is_ok_and(|mut entries| entries.next().is_some()))
}

/// Tries each attempt in order until one attaches; reports every attempt. Returns the
/// attempt that worked, if any. With `every`, tries all of them (`status --every-method`).
pub fn attach_with_fallback<'a>(
    attempts: &'a [Attempt],
    every: bool,
    mut attach: impl FnMut(&Attempt) -> Result<(), AttachError>,
    report: &mut Vec<ProbeStatus>,
) -> Option<&'a Attempt> {
    let mut worked = None;
    for attempt in attempts {
        match attach(attempt) {
            Ok(()) => {
                report.push(ProbeStatus {
                    name: attempt.name.into(),
                    attached: true,
                    error: None,
                });
                worked = worked.or(Some(attempt));
                if !every {
                    break;
                }
            }
            Err(error) => report.push(ProbeStatus {
                name: attempt.name.into(),
                attached: false,
                error: Some(tidy(&error)),
            }),
        }
    }
    worked
}

/// A loaded, attached probe set.
pub struct EbpfSource {
    // Keeps the programs and their links alive.
    _ebpf: Ebpf,
    ring: AsyncFd<RingBuf<MapData>>,
    drops: PerCpuArray<MapData, u64>,
    /// The attached name of each probe, for the records.
    names: Vec<(Probe, &'static str)>,
}

/// What loading produced: the source (if anything attached) and the report.
pub struct Loaded {
    pub source: Option<EbpfSource>,
    pub probes: Vec<ProbeStatus>,
    /// Why the whole source is off, if it is.
    pub error: Option<String>,
    /// Every memory function is hooked: MemTotal changes without uevents are seen.
    pub precise: bool,
}

impl Loaded {
    fn off(error: String, probes: Vec<ProbeStatus>) -> Self {
        Self {
            source: None,
            probes,
            error: Some(error),
            precise: false,
        }
    }
}

/// aya's errors end in `Verifier output: ` even when the verifier said nothing.
fn tidy(e: &dyn std::error::Error) -> String {
    error_chain(e)
        .trim_end()
        .trim_end_matches("Verifier output:")
        .trim_end()
        .trim_end_matches('.')
        .to_string()
}

/// Loads the embedded object and attaches what it can, one method per hook. Never fails:
/// a source that cannot run says why in [`Loaded::error`].
pub fn load(root: &Path) -> Loaded {
    load_with(root, false)
}

/// Loads the object and tries every attach method of every hook, not only until one
/// attaches: what `hotplug-agent status --every-method` reports.
pub fn load_every_method(root: &Path) -> Loaded {
    load_with(root, true)
}

fn load_with(root: &Path, every: bool) -> Loaded {
    if OBJECT.is_empty() {
        return Loaded::off(
            "this binary was built without its eBPF object (AYA_BUILD_SKIP)".into(),
            Vec::new(),
        );
    }
    let mut probes = Vec::new();
    let states = cpuhp::read_states(root).map_err(Arc::new);
    let (online, teardown) = match &states {
        Ok(s) => (s.online, s.teardown),
        Err(_) => (0, 0),
    };
    let mut ebpf = match EbpfLoader::new()
        .override_global(GLOBAL_CPUHP_ONLINE, &online, true)
        .override_global(GLOBAL_CPUHP_TEARDOWN, &teardown, true)
        .load(OBJECT)
    {
        Ok(e) => e,
        Err(e) => {
            return Loaded::off(
                format!(
                    "loading the eBPF object (needs root or CAP_BPF+CAP_PERFMON): {}",
                    error_chain(&e)
                ),
                probes,
            );
        }
    };
    let btf = Btf::from_sys_fs().map_err(Arc::new);
    let allowed = std::env::var(METHODS_ENV).ok();
    let mut names = Vec::new();
    let mut precise = true;
    for hook in &HOOKS {
        let attempts: Vec<Attempt> = hook
            .attempts
            .iter()
            .copied()
            .filter(|a| method_allowed(allowed.as_deref(), a.method))
            .collect();
        let worked = attach_with_fallback(
            &attempts,
            every,
            |attempt| {
                if hook.probe == Probe::CpuhpExit
                    && let Err(e) = &states
                {
                    // The kernel filter cannot tell a finished transition without them.
                    return Err(AttachError::CpuhpStates(e.clone()));
                }
                attach(&mut ebpf, hook.target, attempt, btf.as_ref())
            },
            &mut probes,
        );
        match worked.map(|a| a.name) {
            Some(name) => names.push((hook.probe, name)),
            None if matches!(hook.probe, Probe::CpuhpExit | Probe::ZoneWatermarks) => {}
            None => precise = false,
        }
    }
    if names.is_empty() {
        return Loaded::off("no probe could attach".into(), probes);
    }
    let ring = match ebpf.take_map(EVENTS_MAP).map(RingBuf::try_from) {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            return Loaded::off(format!("ring buffer map: {}", error_chain(&e)), probes);
        }
        None => return Loaded::off(format!("map {EVENTS_MAP} not in the object"), probes),
    };
    let drops = match ebpf.take_map(DROPS_MAP).map(PerCpuArray::try_from) {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            return Loaded::off(format!("drop counter map: {}", error_chain(&e)), probes);
        }
        None => return Loaded::off(format!("map {DROPS_MAP} not in the object"), probes),
    };
    // SAFETY: the ring buffer owns its map fd, which stays open and the same until drop.
    let ring = match unsafe { AsyncFd::register(ring) }.map_err(std::io::Error::from) {
        Ok(r) => r,
        Err(e) => {
            return Loaded::off(
                format!("registering the ring buffer with tokio: {e}"),
                probes,
            );
        }
    };
    Loaded {
        source: Some(EbpfSource {
            _ebpf: ebpf,
            ring,
            drops,
            names,
        }),
        probes,
        error: None,
        precise,
    }
}

/// Loads and attaches one attempt's program to `target`.
fn attach(
    ebpf: &mut Ebpf,
    target: &'static str,
    attempt: &Attempt,
    btf: Result<&Btf, &Arc<BtfError>>,
) -> Result<(), AttachError> {
    let program = attempt.program;
    let prog = ebpf
        .program_mut(program)
        .ok_or(AttachError::NotInObject { program })?;
    let wrong = |source| AttachError::WrongType { program, source };
    let load = |source| AttachError::Load { program, source };
    let attach = |source| AttachError::Attach {
        program,
        target,
        source,
    };
    let btf = || btf.map_err(|e| AttachError::NoBtf(e.clone()));
    match attempt.method {
        Method::Tracepoint { category } => {
            let p: &mut TracePoint = prog.try_into().map_err(wrong)?;
            p.load().map_err(load)?;
            p.attach(category, target).map_err(|e| {
                let roots = [TRACEFS, DEBUG_TRACEFS].map(std::path::Path::new);
                if tracefs_in(&roots) {
                    attach(e)
                } else {
                    AttachError::NoTracefs { program, target }
                }
            })?;
        }
        Method::RawTracepoint => {
            let p: &mut RawTracePoint = prog.try_into().map_err(wrong)?;
            p.load().map_err(load)?;
            p.attach(target).map_err(attach)?;
        }
        Method::BtfTracepoint => {
            let btf = btf()?;
            let p: &mut BtfTracePoint = prog.try_into().map_err(wrong)?;
            p.load(target, btf).map_err(load)?;
            p.attach().map_err(attach)?;
        }
        Method::Fentry => {
            let btf = btf()?;
            let p: &mut FEntry = prog.try_into().map_err(wrong)?;
            p.load(target, btf).map_err(load)?;
            p.attach().map_err(attach)?;
        }
        Method::Kprobe => {
            let p: &mut KProbe = prog.try_into().map_err(wrong)?;
            p.load().map_err(load)?;
            p.attach(target, 0).map_err(attach)?;
        }
    }
    Ok(())
}

/// A ring-buffer item that is not a [`ProbeRecord`] of this build.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("ring buffer record of {len} bytes, shorter than a probe record ({want})")]
    Short { len: usize, want: usize },
    #[error("ring buffer record with unknown probe {probe}")]
    UnknownProbe { probe: u16 },
}

/// Decodes one ring-buffer item, with a length check.
pub fn decode(bytes: &[u8], received_ns: u64) -> Result<ProbeEvent, DecodeError> {
    let want = size_of::<ProbeRecord>();
    if bytes.len() < want {
        return Err(DecodeError::Short {
            len: bytes.len(),
            want,
        });
    }
    // SAFETY: length checked; ProbeRecord is Pod, any bit pattern is valid.
    let r: ProbeRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let probe = Probe::from_u16(r.probe).ok_or(DecodeError::UnknownProbe { probe: r.probe })?;
    let comm_len = r.comm.iter().position(|&b| b == 0).unwrap_or(r.comm.len());
    Ok(ProbeEvent {
        probe,
        kernel_ns: r.kernel_ns,
        received_ns,
        pid: r.pid,
        cpu: r.cpu,
        subject: r.subject,
        action: r.action,
        pages: r.pages,
        pfn: r.pfn,
        comm: String::from_utf8_lossy(&r.comm[..comm_len]).into_owned(),
        hits: 1,
    })
}

/// What a (folded) probe event means. `probe_name` is the attached hook's name;
/// `block_size` (`memory/block_size_bytes`) names the memory block an `online_pages` or
/// `offline_pages` hit is about, as its uevents will.
pub fn change_of(
    ev: &ProbeEvent,
    probe_name: &'static str,
    block_size: Option<u64>,
) -> Option<Change> {
    let (kind, action, device, pages) = match ev.probe {
        Probe::CpuhpExit => {
            let action = match ev.action {
                a if a == CpuAction::Online as u16 => Action::Online,
                a if a == CpuAction::Offline as u16 => Action::Offline,
                _ => return None,
            };
            (Kind::Cpu, action, Some(format!("cpu{}", ev.subject)), None)
        }
        Probe::ZoneWatermarks => (Kind::Memory, Action::Change, None, None),
        Probe::OnlinePages | Probe::OfflinePages => {
            let block = block_size
                .filter(|&size| size >= PAGE_SIZE && ev.pfn != 0)
                .and_then(|size| Some(ev.pfn.checked_mul(PAGE_SIZE)? / size))
                .map(|id| format!("memory{id}"));
            (Kind::Memory, Action::Resize, block, Some(ev.pages))
        }
        _ => (Kind::Memory, Action::Resize, None, Some(ev.pages)),
    };
    Some(Change {
        source: Source::Ebpf,
        kind,
        action,
        device,
        detail: Detail::Probe {
            probe: probe_name,
            kernel_ns: ev.kernel_ns,
            delivery_ns: ev.received_ns.saturating_sub(ev.kernel_ns),
            pid: ev.pid,
            comm: ev.comm.clone(),
            cpu: ev.cpu,
            pages,
            hits: ev.hits,
        },
    })
}

/// The page size the memory hooks count in (x86-64, arm64 with 4 KiB pages: the kernels
/// this agent is built for).
const PAGE_SIZE: u64 = 4096;

/// Raw hits on their way to the pipeline (folding happens there, where time is known).
#[derive(Debug)]
pub enum EbpfMsg {
    Hit(ProbeEvent),
    Loss(Loss),
}

impl EbpfSource {
    /// Each hook that attached, with the name of the method that did (`fentry/online_pages`).
    pub fn probe_names(&self) -> Vec<(Probe, &'static str)> {
        self.names.clone()
    }

    /// Drains the ring buffer whenever the kernel signals it, until `tx` closes.
    pub async fn run(mut self, tx: mpsc::Sender<EbpfMsg>, counters: Arc<Counters>) {
        let mut seen_drops = 0u64;
        let mut batch = Vec::new();
        loop {
            let mut guard = match self.ring.readable_mut().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "eBPF ring buffer failed; the eBPF source stops");
                    return;
                }
            };
            let now = crate::record::monotonic_ns();
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                match decode(&item, now) {
                    Ok(ev) => batch.push(EbpfMsg::Hit(ev)),
                    Err(e) => {
                        Counters::bump(&counters.probe_malformed);
                        tracing::warn!(error = %e, "undecodable ring buffer record ignored");
                    }
                }
            }
            guard.clear_ready();
            drop(guard);
            let drops: u64 = match self.drops.get(&0, 0) {
                Ok(per_cpu) => per_cpu.iter().sum(),
                Err(_) => seen_drops,
            };
            if drops > seen_drops {
                counters
                    .ringbuf_drops
                    .store(drops, std::sync::atomic::Ordering::Relaxed);
                batch.push(EbpfMsg::Loss(Loss::RingbufDrops {
                    dropped: drops - seen_drops,
                }));
                seen_drops = drops;
            }
            counters
                .probe_records
                .fetch_add(batch.len() as u64, std::sync::atomic::Ordering::Relaxed);
            for msg in batch.drain(..) {
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmounted_tracefs_is_an_empty_directory_and_said_so() {
        let dir = tempfile::tempdir().unwrap();
        let (empty, mounted) = (dir.path().join("empty"), dir.path().join("mounted"));
        std::fs::create_dir_all(&empty).unwrap();
        std::fs::create_dir_all(mounted.join("events")).unwrap();
        let missing = dir.path().join("missing");
        assert!(!tracefs_in(&[&empty, &missing]));
        assert!(tracefs_in(&[&empty, &mounted]));
        let e = AttachError::NoTracefs {
            program: "cpuhp_exit",
            target: "cpuhp_exit",
        };
        let text = e.to_string();
        assert!(
            text.contains("tracefs is not mounted") && text.contains("mount -t tracefs"),
            "{text}"
        );
    }

    fn denied(program: &'static str) -> AttachError {
        AttachError::Attach {
            program,
            target: "cpuhp_exit",
            source: ProgramError::SyscallError(aya::sys::SyscallError {
                call: "perf_event_open",
                io_error: std::io::Error::from_raw_os_error(libc::EACCES),
            }),
        }
    }

    fn hook(probe: Probe) -> &'static Hook {
        HOOKS.iter().find(|h| h.probe == probe).unwrap()
    }

    #[test]
    fn every_hook_has_its_methods_in_order_with_stable_names() {
        let names = |p| -> Vec<&str> { hook(p).attempts.iter().map(|a| a.name).collect() };
        // The perf-event tracepoint keeps the name records had before the fallback existed.
        assert_eq!(
            names(Probe::CpuhpExit),
            [
                "tracepoint/cpuhp/cpuhp_exit",
                "raw_tracepoint/cpuhp_exit",
                "tp_btf/cpuhp_exit"
            ]
        );
        assert_eq!(
            names(Probe::ZoneWatermarks),
            [
                "tracepoint/kmem/mm_setup_per_zone_wmarks",
                "raw_tracepoint/mm_setup_per_zone_wmarks",
                "tp_btf/mm_setup_per_zone_wmarks"
            ]
        );
        assert_eq!(
            names(Probe::OnlinePages),
            ["fentry/online_pages", "kprobe/online_pages"]
        );
        for h in &HOOKS {
            for a in h.attempts {
                // The hook is the part after the last `/`, whatever the method.
                assert_eq!(a.name.rsplit('/').next(), Some(h.target), "{a:?}");
                assert!(a.program.ends_with(h.target), "{a:?}");
            }
        }
    }

    #[test]
    fn the_methods_variable_picks_methods_by_name() {
        let raw = Method::RawTracepoint;
        assert!(method_allowed(None, raw));
        assert!(method_allowed(Some("tp_btf, raw_tracepoint"), raw));
        assert!(!method_allowed(Some("tracepoint"), raw));
        assert!(method_allowed(
            Some("tracepoint"),
            Method::Tracepoint { category: "kmem" }
        ));
        assert!(!method_allowed(Some(""), Method::Fentry));
        for h in &HOOKS {
            for a in h.attempts {
                assert!(
                    a.name.starts_with(&format!("{}/", a.method.name())),
                    "{a:?}"
                );
            }
        }
    }

    #[test]
    fn a_refused_perf_tracepoint_falls_back_to_the_raw_one_and_both_are_reported() {
        let mut report = Vec::new();
        let worked = attach_with_fallback(
            hook(Probe::CpuhpExit).attempts,
            false,
            |a| match a.method {
                Method::Tracepoint { .. } => Err(denied(a.program)),
                _ => Ok(()),
            },
            &mut report,
        );
        assert_eq!(worked.map(|a| a.name), Some("raw_tracepoint/cpuhp_exit"));
        assert_eq!(
            report.len(),
            2,
            "the BTF tracepoint is not tried: {report:?}"
        );
        assert_eq!(report[0].name, "tracepoint/cpuhp/cpuhp_exit");
        assert!(!report[0].attached);
        assert_eq!(
            report[0].error.as_deref(),
            Some(
                "attaching cpuhp_exit to cpuhp_exit: `perf_event_open` failed: \
                 Permission denied (os error 13)"
            )
        );
        assert_eq!(
            report[1],
            ProbeStatus {
                name: "raw_tracepoint/cpuhp_exit".into(),
                attached: true,
                error: None
            }
        );
    }

    #[test]
    fn falls_back_from_fentry_to_kprobe_and_reports_both() {
        let mut report = Vec::new();
        let worked = attach_with_fallback(
            hook(Probe::OnlinePages).attempts,
            false,
            |a| match a.method {
                Method::Fentry => Err(AttachError::NoBtf(Arc::new(BtfError::FileError {
                    path: "/sys/kernel/btf/vmlinux".into(),
                    error: std::io::Error::from_raw_os_error(libc::ENOENT),
                }))),
                _ => Ok(()),
            },
            &mut report,
        );
        assert_eq!(worked.map(|a| a.method), Some(Method::Kprobe));
        assert_eq!(report.len(), 2);
        assert_eq!(report[0].name, "fentry/online_pages");
        let error = report[0].error.as_deref().unwrap();
        assert!(
            error.starts_with("no kernel BTF: ") && error.contains("/sys/kernel/btf/vmlinux"),
            "{error}"
        );
        assert_eq!(report[1].name, "kprobe/online_pages");
        assert!(report[1].attached);
    }

    #[test]
    fn stops_at_the_first_method_that_works_unless_asked_for_every_one() {
        let attempts = hook(Probe::ZoneWatermarks).attempts;
        let mut report = Vec::new();
        let mut tried = 0;
        let worked = attach_with_fallback(
            attempts,
            false,
            |_| {
                tried += 1;
                Ok(())
            },
            &mut report,
        );
        assert_eq!(
            (worked.map(|a| a.name), tried, report.len()),
            (Some("tracepoint/kmem/mm_setup_per_zone_wmarks"), 1, 1)
        );
        // --every-method: all three tried, the first that worked is the one used.
        let mut report = Vec::new();
        let worked = attach_with_fallback(
            attempts,
            true,
            |a| match a.method {
                Method::RawTracepoint => Err(denied(a.program)),
                _ => Ok(()),
            },
            &mut report,
        );
        assert_eq!(worked.map(|a| a.method), Some(attempts[0].method));
        assert_eq!(
            report.iter().map(|p| p.attached).collect::<Vec<_>>(),
            [true, false, true]
        );
        // Nothing attaches: every attempt says why.
        let mut report = Vec::new();
        let worked = attach_with_fallback(attempts, false, |a| Err(denied(a.program)), &mut report);
        assert_eq!(worked, None);
        assert_eq!(report.len(), 3);
        assert!(report.iter().all(|p| !p.attached && p.error.is_some()));
    }

    /// `offline_pages(start_pfn, nr_pages)` names its block as the uevents will: block 40 of
    /// 128 MiB starts at PFN 0x140000; without a block size (no memory hotplug) no name.
    #[test]
    fn a_memory_block_probe_names_its_block() {
        let ev = ProbeEvent {
            probe: Probe::OfflinePages,
            kernel_ns: 5,
            received_ns: 6,
            pid: 7,
            cpu: 0,
            subject: 0,
            action: 0,
            pages: -32768,
            pfn: 0x140000,
            comm: "kworker/u4:1".into(),
            hits: 1,
        };
        let c = change_of(&ev, "fentry/offline_pages", Some(128 << 20)).unwrap();
        assert_eq!(
            (c.kind, c.action, c.device.as_deref()),
            (Kind::Memory, Action::Resize, Some("memory40"))
        );
        assert_eq!(
            change_of(&ev, "fentry/offline_pages", None).unwrap().device,
            None
        );
        let balloon = ProbeEvent {
            probe: Probe::AdjustManagedPageCount,
            ..ev
        };
        assert_eq!(
            change_of(
                &balloon,
                "fentry/adjust_managed_page_count",
                Some(128 << 20)
            )
            .unwrap()
            .device,
            None
        );
    }

    #[test]
    fn decodes_records_and_rejects_short_ones() {
        let rec = ProbeRecord {
            kernel_ns: 1_000,
            pages: 0,
            pfn: 0,
            pid: 42,
            cpu: 1,
            subject: 3,
            probe: Probe::CpuhpExit as u16,
            action: CpuAction::Online as u16,
            comm: *b"cpuhp/3\0\0\0\0\0\0\0\0\0",
        };
        // SAFETY: viewing a Pod struct as bytes.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&rec as *const ProbeRecord).cast::<u8>(),
                size_of::<ProbeRecord>(),
            )
        };
        // Unaligned on purpose.
        let mut shifted = vec![0u8; 1];
        shifted.extend_from_slice(bytes);
        let ev = decode(&shifted[1..], 1_500).unwrap();
        assert_eq!((ev.pid, ev.subject, ev.comm.as_str()), (42, 3, "cpuhp/3"));
        let c = change_of(&ev, "raw_tracepoint/cpuhp_exit", None).unwrap();
        assert_eq!(
            (c.kind, c.action, c.device.as_deref()),
            (Kind::Cpu, Action::Online, Some("cpu3"))
        );
        assert!(matches!(
            c.detail,
            Detail::Probe {
                delivery_ns: 500,
                ..
            }
        ));
        assert_eq!(
            decode(&bytes[..40], 0),
            Err(DecodeError::Short { len: 40, want: 56 })
        );
        let mut unknown = bytes.to_vec();
        unknown[36] = 99; // probe discriminant, after kernel_ns, pages, pfn, pid, cpu, subject
        assert_eq!(
            decode(&unknown, 0),
            Err(DecodeError::UnknownProbe { probe: 99 })
        );
    }
}
