//! The kernel probe source: loads `agent-ebpf` with aya, attaches what this kernel allows,
//! and drains the ring buffer through tokio.
//!
//! Attach order: the two tracepoints always; for each memory function, fentry first (exact
//! and cheap), then kprobe. On the 6.18 host here fentry fails with EPERM and kprobes are not
//! built in, so the tracepoints carry the load; every attempt is reported in the ready
//! record so an operator sees what is watching.
use std::{path::Path, sync::Arc};

use agent_common::{
    CpuAction, DROPS_MAP, EVENTS_MAP, GLOBAL_CPUHP_ONLINE, GLOBAL_CPUHP_TEARDOWN, Probe,
    ProbeRecord,
};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, RingBuf},
    programs::{FEntry, KProbe, TracePoint},
};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use super::{Change, Counters, Detail, Loss, coalesce::ProbeEvent, cpuhp, error_chain};
use crate::record::{Action, Kind, ProbeStatus, Source};

/// The object aya-build left in OUT_DIR (empty when the eBPF build was switched off).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/hotplug-probes"));

/// The memory functions, with their program names for each attach type.
const MEMORY_FUNCTIONS: [(&str, Probe); 4] = [
    ("online_pages", Probe::OnlinePages),
    ("offline_pages", Probe::OfflinePages),
    ("generic_online_page", Probe::GenericOnlinePage),
    ("adjust_managed_page_count", Probe::AdjustManagedPageCount),
];

/// One way to attach a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachKind {
    Fentry,
    Kprobe,
}

impl AttachKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Fentry => "fentry",
            Self::Kprobe => "kprobe",
        }
    }
}

/// Tries each way in order until one attaches; reports every attempt. Returns the way that
/// worked, if any.
pub fn attach_with_fallback(
    function: &str,
    ways: &[AttachKind],
    mut attach: impl FnMut(AttachKind) -> Result<(), String>,
    report: &mut Vec<ProbeStatus>,
) -> Option<AttachKind> {
    for &way in ways {
        let name = format!("{}/{function}", way.prefix());
        match attach(way) {
            Ok(()) => {
                report.push(ProbeStatus {
                    name,
                    attached: true,
                    error: None,
                });
                return Some(way);
            }
            Err(error) => report.push(ProbeStatus {
                name,
                attached: false,
                error: Some(error),
            }),
        }
    }
    None
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

const TRACEPOINTS: [(&str, &str, &str, Probe); 2] = [
    ("cpuhp_exit", "cpuhp", "cpuhp_exit", Probe::CpuhpExit),
    (
        "mm_setup_per_zone_wmarks",
        "kmem",
        "mm_setup_per_zone_wmarks",
        Probe::ZoneWatermarks,
    ),
];

/// aya's errors end in `Verifier output: ` even when the verifier said nothing.
fn tidy(e: &dyn std::error::Error) -> String {
    error_chain(e)
        .trim_end()
        .trim_end_matches("Verifier output:")
        .trim_end()
        .trim_end_matches('.')
        .to_string()
}

/// Loads the embedded object and attaches what it can. Never fails: a source that cannot
/// run says why in [`Loaded::error`].
pub fn load(root: &Path) -> Loaded {
    if OBJECT.is_empty() {
        return Loaded::off(
            "this binary was built without its eBPF object (AYA_BUILD_SKIP)".into(),
            Vec::new(),
        );
    }
    let mut probes = Vec::new();
    let states = cpuhp::read_states(root);
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
    let mut names = Vec::new();
    for (prog, category, name, probe) in TRACEPOINTS {
        let full = format!("tracepoint/{category}/{name}");
        let result = if probe == Probe::CpuhpExit
            && let Err(e) = &states
        {
            Err(format!("CPU hotplug state numbers unknown: {e}"))
        } else {
            attach_tracepoint(&mut ebpf, prog, category, name)
        };
        match result {
            Ok(()) => {
                names.push((probe, hook_name(probe, None)));
                probes.push(ProbeStatus {
                    name: full,
                    attached: true,
                    error: None,
                });
            }
            Err(error) => probes.push(ProbeStatus {
                name: full,
                attached: false,
                error: Some(error),
            }),
        }
    }
    let btf = Btf::from_sys_fs().map_err(|e| format!("no kernel BTF: {}", error_chain(&e)));
    let mut precise = true;
    for (function, probe) in MEMORY_FUNCTIONS {
        let way = attach_with_fallback(
            function,
            &[AttachKind::Fentry, AttachKind::Kprobe],
            |way| match way {
                AttachKind::Fentry => attach_fentry(&mut ebpf, function, btf.as_ref()),
                AttachKind::Kprobe => attach_kprobe(&mut ebpf, function),
            },
            &mut probes,
        );
        match way {
            Some(way) => names.push((probe, hook_name(probe, Some(way)))),
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

fn attach_tracepoint(
    ebpf: &mut Ebpf,
    prog: &str,
    category: &str,
    name: &str,
) -> Result<(), String> {
    let program: &mut TracePoint = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} not in the object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
    program.load().map_err(|e| format!("load: {}", tidy(&e)))?;
    program
        .attach(category, name)
        .map_err(|e| format!("attach: {}", error_chain(&e)))?;
    Ok(())
}

fn attach_fentry(
    ebpf: &mut Ebpf,
    function: &str,
    btf: Result<&Btf, &String>,
) -> Result<(), String> {
    let btf = btf.map_err(Clone::clone)?;
    let prog = format!("fentry_{function}");
    let program: &mut FEntry = ebpf
        .program_mut(&prog)
        .ok_or_else(|| format!("program {prog} not in the object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
    program
        .load(function, btf)
        .map_err(|e| format!("load: {}", tidy(&e)))?;
    program
        .attach()
        .map_err(|e| format!("attach: {}", error_chain(&e)))?;
    Ok(())
}

fn attach_kprobe(ebpf: &mut Ebpf, function: &str) -> Result<(), String> {
    let prog = format!("kprobe_{function}");
    let program: &mut KProbe = ebpf
        .program_mut(&prog)
        .ok_or_else(|| format!("program {prog} not in the object"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| error_chain(&e))?;
    program.load().map_err(|e| format!("load: {}", tidy(&e)))?;
    program
        .attach(function, 0)
        .map_err(|e| format!("attach: {}", error_chain(&e)))?;
    Ok(())
}

/// The name records carry for a hook: `tracepoint/...`, `fentry/...` or `kprobe/...`.
pub fn hook_name(probe: Probe, way: Option<AttachKind>) -> &'static str {
    use AttachKind::{Fentry, Kprobe};
    match (probe, way) {
        (Probe::CpuhpExit, _) => "tracepoint/cpuhp/cpuhp_exit",
        (Probe::ZoneWatermarks, _) => "tracepoint/kmem/mm_setup_per_zone_wmarks",
        (Probe::OnlinePages, Some(Kprobe)) => "kprobe/online_pages",
        (Probe::OnlinePages, _) => "fentry/online_pages",
        (Probe::OfflinePages, Some(Kprobe)) => "kprobe/offline_pages",
        (Probe::OfflinePages, _) => "fentry/offline_pages",
        (Probe::GenericOnlinePage, Some(Kprobe)) => "kprobe/generic_online_page",
        (Probe::GenericOnlinePage, _) => "fentry/generic_online_page",
        (Probe::AdjustManagedPageCount, Some(Kprobe)) => "kprobe/adjust_managed_page_count",
        (Probe::AdjustManagedPageCount, Some(Fentry) | None) => "fentry/adjust_managed_page_count",
    }
}

/// Decodes one ring-buffer item, with a length check.
pub fn decode(bytes: &[u8], received_ns: u64) -> Option<ProbeEvent> {
    if bytes.len() < size_of::<ProbeRecord>() {
        return None;
    }
    // SAFETY: length checked; ProbeRecord is Pod, any bit pattern is valid.
    let r: ProbeRecord = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    let probe = Probe::from_u16(r.probe)?;
    let comm_len = r.comm.iter().position(|&b| b == 0).unwrap_or(r.comm.len());
    Some(ProbeEvent {
        probe,
        kernel_ns: r.kernel_ns,
        received_ns,
        pid: r.pid,
        cpu: r.cpu,
        subject: r.subject,
        action: r.action,
        pages: r.pages,
        comm: String::from_utf8_lossy(&r.comm[..comm_len]).into_owned(),
        hits: 1,
    })
}

/// What a (folded) probe event means. `probe_name` is the attached hook's name.
pub fn change_of(ev: &ProbeEvent, probe_name: &'static str) -> Option<Change> {
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

/// Raw hits on their way to the pipeline (folding happens there, where time is known).
#[derive(Debug)]
pub enum EbpfMsg {
    Hit(ProbeEvent),
    Loss(Loss),
}

impl EbpfSource {
    /// The attached names, leaked once so records can hold `&'static str`.
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
                    Some(ev) => batch.push(EbpfMsg::Hit(ev)),
                    None => {
                        Counters::bump(&counters.probe_malformed);
                        tracing::warn!(len = item.len(), "undecodable ring buffer record ignored");
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
    fn falls_back_from_fentry_to_kprobe_and_reports_both() {
        let mut report = Vec::new();
        let way = attach_with_fallback(
            "online_pages",
            &[AttachKind::Fentry, AttachKind::Kprobe],
            |way| match way {
                AttachKind::Fentry => Err("load: Operation not permitted (os error 1)".into()),
                AttachKind::Kprobe => Ok(()),
            },
            &mut report,
        );
        assert_eq!(way, Some(AttachKind::Kprobe));
        assert_eq!(report.len(), 2);
        assert_eq!(report[0].name, "fentry/online_pages");
        assert!(
            !report[0].attached
                && report[0]
                    .error
                    .as_deref()
                    .unwrap()
                    .contains("not permitted")
        );
        assert_eq!(
            report[1],
            ProbeStatus {
                name: "kprobe/online_pages".into(),
                attached: true,
                error: None
            }
        );
    }

    #[test]
    fn stops_at_the_first_way_that_works_and_reports_total_failure() {
        let mut report = Vec::new();
        let mut tried = Vec::new();
        let way = attach_with_fallback(
            "x",
            &[AttachKind::Fentry, AttachKind::Kprobe],
            |w| {
                tried.push(w);
                Ok(())
            },
            &mut report,
        );
        assert_eq!(
            (way, tried.len(), report.len()),
            (Some(AttachKind::Fentry), 1, 1)
        );
        let mut report = Vec::new();
        let way = attach_with_fallback(
            "x",
            &[AttachKind::Fentry, AttachKind::Kprobe],
            |_| Err("no".into()),
            &mut report,
        );
        assert_eq!(way, None);
        assert!(report.iter().all(|p| !p.attached));
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
        let c = change_of(&ev, "tracepoint/cpuhp/cpuhp_exit").unwrap();
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
        assert_eq!(decode(&bytes[..40], 0), None);
        let mut unknown = bytes.to_vec();
        unknown[36] = 99; // probe discriminant, after kernel_ns, pages, pfn, pid, cpu, subject
        assert_eq!(decode(&unknown, 0), None);
    }
}
