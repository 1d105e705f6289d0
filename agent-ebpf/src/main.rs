//! Kernel side of hotplug-agent: hooks on CPU and memory hotplug that write
//! [`ProbeRecord`]s into one ring buffer.
//!
//! - `cpuhp_exit`: filtered in the kernel to the two steps that finish a CPU going online or
//!   offline ([`classify_cpuhp`], state numbers set by the loader).
//! - `mm_setup_per_zone_wmarks`: fires on every memory online/offline (once per zone,
//!   twice per change; user space folds the repeats).
//!
//!   Each of these two tracepoints has three programs, one per attach method, and the loader
//!   uses the first that attaches: the perf-event tracepoint (`tracepoint/...`, needs
//!   perf_event_open), the raw tracepoint (`raw_tracepoint/...`, `BPF_RAW_TRACEPOINT_OPEN`)
//!   and the BTF-enabled tracepoint (`tp_btf/...`, needs kernel BTF). The last two take the
//!   tracepoint's `TP_PROTO` arguments instead of the trace record's fields.
//! - fentry, else kprobe, on `online_pages`, `offline_pages`, `generic_online_page` and
//!   `adjust_managed_page_count`: the functions through which MemTotal changes, with the
//!   page counts. The same body serves both attach types.
// The real build is for the bpf target; a host build (`cargo clippy --workspace`) gets std
// and an empty main so the programs are still type-checked and linted.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

use agent_common::{CpuAction, Probe, ProbeRecord, classify_cpuhp};
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_smp_processor_id, bpf_ktime_get_ns,
    },
    macros::{btf_tracepoint, fentry, kprobe, map, raw_tracepoint, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::{
        BtfTracePointContext, FEntryContext, ProbeContext, RawTracePointContext, TracePointContext,
    },
};

/// 1 MiB: 18,724 records; a 64 GiB hot-add makes ~16 records per block on the precise path.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Records that did not fit in the ring buffer, per CPU.
#[map]
static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `cpuhp` state numbers, looked up by name and set by the loader (0: not set, report nothing).
#[unsafe(no_mangle)]
static CPUHP_ONLINE: i32 = 0;
#[unsafe(no_mangle)]
static CPUHP_TEARDOWN: i32 = 0;

#[inline(always)]
fn emit(probe: Probe, subject: u32, action: u16, pages: i64, pfn: u64) {
    match EVENTS.reserve::<ProbeRecord>(0) {
        Some(mut entry) => {
            let comm = bpf_get_current_comm().unwrap_or([0; 16]);
            entry.write(ProbeRecord {
                // SAFETY: plain helper calls without pointer arguments.
                kernel_ns: unsafe { bpf_ktime_get_ns() },
                pages,
                pfn,
                pid: bpf_get_current_pid_tgid() as u32,
                cpu: unsafe { bpf_get_smp_processor_id() },
                subject,
                probe: probe as u16,
                action,
                comm,
            });
            entry.submit(0);
        }
        None => {
            if let Some(counter) = DROPS.get_ptr_mut(0) {
                // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
                unsafe { *counter += 1 };
            }
        }
    }
}

/// One `cpuhp_exit` hit, whatever the attach method: emits a record for the two steps that
/// finish a transition.
#[inline(always)]
fn cpuhp_hit(cpu: u32, state: i32, idx: i32, ret: i32) {
    // SAFETY: read-only globals patched by the loader before the program is loaded.
    let (online, teardown) = unsafe {
        (
            core::ptr::read_volatile(&CPUHP_ONLINE),
            core::ptr::read_volatile(&CPUHP_TEARDOWN),
        )
    };
    let action = classify_cpuhp(state, idx, ret, online, teardown);
    if action != CpuAction::None {
        emit(Probe::CpuhpExit, cpu, action as u16, 0, 0);
    }
}

// include/trace/events/cpuhp.h (v6.18): after the common header,
// `unsigned int cpu` @8, `int state` @12, `int idx` @16, `int ret` @20.
#[tracepoint(category = "cpuhp", name = "cpuhp_exit")]
pub fn cpuhp_exit(ctx: TracePointContext) -> u32 {
    match try_cpuhp_exit(&ctx) {
        Ok(r) | Err(r) => r,
    }
}

fn try_cpuhp_exit(ctx: &TracePointContext) -> Result<u32, u32> {
    // SAFETY: offsets from the tracepoint's format file, fields are plain integers.
    let (cpu, state, idx, ret) = unsafe {
        (
            ctx.read_at::<u32>(8).map_err(|_| 1u32)?,
            ctx.read_at::<i32>(12).map_err(|_| 1u32)?,
            ctx.read_at::<i32>(16).map_err(|_| 1u32)?,
            ctx.read_at::<i32>(20).map_err(|_| 1u32)?,
        )
    };
    cpuhp_hit(cpu, state, idx, ret);
    Ok(0)
}

// include/trace/events/cpuhp.h (v6.18): TP_PROTO(unsigned int cpu, int state, int idx,
// int ret). Raw and BTF tracepoints get these as u64 slots; `as` keeps the low 32 bits,
// which is the value whether the kernel widened it with or without sign.
#[raw_tracepoint(tracepoint = "cpuhp_exit")]
pub fn raw_cpuhp_exit(ctx: RawTracePointContext) -> i32 {
    cpuhp_hit(
        ctx.arg::<u64>(0) as u32,
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
        ctx.arg::<u64>(3) as i32,
    );
    0
}

#[btf_tracepoint(function = "cpuhp_exit")]
pub fn tp_btf_cpuhp_exit(ctx: BtfTracePointContext) -> i32 {
    cpuhp_hit(
        ctx.arg::<u64>(0) as u32,
        ctx.arg::<u64>(1) as i32,
        ctx.arg::<u64>(2) as i32,
        ctx.arg::<u64>(3) as i32,
    );
    0
}

// include/trace/events/kmem.h (v6.18): `int node_id` @8.
#[tracepoint(category = "kmem", name = "mm_setup_per_zone_wmarks")]
pub fn mm_setup_per_zone_wmarks(ctx: TracePointContext) -> u32 {
    // SAFETY: offset from the tracepoint's format file.
    let node = unsafe { ctx.read_at::<i32>(8) }.unwrap_or(-1);
    emit(Probe::ZoneWatermarks, node as u32, 0, 0, 0);
    0
}

/// The node of a watermark hit that came through a raw or BTF tracepoint: unknown.
///
/// TP_PROTO is `(struct zone *zone)` and the node id sits at `zone->node`, whose offset
/// depends on the kernel's config (CONFIG_NUMA, the size of the watermark and lowmem arrays
/// before it). Without CO-RE relocations (aya-ebpf 0.2 has none) a fixed offset would read
/// the wrong field on some kernel, so the record says -1 (u32::MAX): user space only needs
/// "memory changed" from this probe, and reads the nodes from sysfs.
const NODE_UNKNOWN: u32 = u32::MAX;

#[raw_tracepoint(tracepoint = "mm_setup_per_zone_wmarks")]
pub fn raw_mm_setup_per_zone_wmarks(_ctx: RawTracePointContext) -> i32 {
    emit(Probe::ZoneWatermarks, NODE_UNKNOWN, 0, 0, 0);
    0
}

#[btf_tracepoint(function = "mm_setup_per_zone_wmarks")]
pub fn tp_btf_mm_setup_per_zone_wmarks(_ctx: BtfTracePointContext) -> i32 {
    emit(Probe::ZoneWatermarks, NODE_UNKNOWN, 0, 0, 0);
    0
}

/// Reads the arguments of the four memory functions, whatever the attach type.
trait Args {
    fn u64_arg(&self, n: usize) -> u64;
}

impl Args for FEntryContext {
    fn u64_arg(&self, n: usize) -> u64 {
        self.arg(n)
    }
}

impl Args for ProbeContext {
    fn u64_arg(&self, n: usize) -> u64 {
        self.arg(n).unwrap_or(0)
    }
}

// mm/memory_hotplug.c (v6.18): online_pages(pfn, nr_pages, zone, group),
// offline_pages(start_pfn, nr_pages, zone, group), generic_online_page(page, order);
// mm/page_alloc.c: adjust_managed_page_count(page, long count).
#[inline(always)]
fn memory_hook<C: Args + EbpfContext>(ctx: &C, probe: Probe) -> u32 {
    let (pages, pfn) = match probe {
        Probe::OnlinePages => (ctx.u64_arg(1) as i64, ctx.u64_arg(0)),
        Probe::OfflinePages => (-(ctx.u64_arg(1) as i64), ctx.u64_arg(0)),
        Probe::GenericOnlinePage => (1i64 << (ctx.u64_arg(1) & 31), 0),
        Probe::AdjustManagedPageCount => (ctx.u64_arg(1) as i64, 0),
        Probe::CpuhpExit | Probe::ZoneWatermarks => return 0,
    };
    emit(probe, 0, 0, pages, pfn);
    0
}

#[fentry(function = "online_pages")]
pub fn fentry_online_pages(ctx: FEntryContext) -> i32 {
    memory_hook(&ctx, Probe::OnlinePages) as i32
}
#[fentry(function = "offline_pages")]
pub fn fentry_offline_pages(ctx: FEntryContext) -> i32 {
    memory_hook(&ctx, Probe::OfflinePages) as i32
}
#[fentry(function = "generic_online_page")]
pub fn fentry_generic_online_page(ctx: FEntryContext) -> i32 {
    memory_hook(&ctx, Probe::GenericOnlinePage) as i32
}
#[fentry(function = "adjust_managed_page_count")]
pub fn fentry_adjust_managed_page_count(ctx: FEntryContext) -> i32 {
    memory_hook(&ctx, Probe::AdjustManagedPageCount) as i32
}

#[kprobe]
pub fn kprobe_online_pages(ctx: ProbeContext) -> u32 {
    memory_hook(&ctx, Probe::OnlinePages)
}
#[kprobe]
pub fn kprobe_offline_pages(ctx: ProbeContext) -> u32 {
    memory_hook(&ctx, Probe::OfflinePages)
}
#[kprobe]
pub fn kprobe_generic_online_page(ctx: ProbeContext) -> u32 {
    memory_hook(&ctx, Probe::GenericOnlinePage)
}
#[kprobe]
pub fn kprobe_adjust_managed_page_count(ctx: ProbeContext) -> u32 {
    memory_hook(&ctx, Probe::AdjustManagedPageCount)
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(not(target_arch = "bpf"))]
fn main() {}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
