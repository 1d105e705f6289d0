//! The records that cross the kernel/user boundary, defined once for both sides.
//!
//! `agent-ebpf` writes [`ProbeRecord`]s into the `EVENTS` ring buffer; the agent reads them
//! back with a length check and `read_unaligned`. The CPU-hotplug classification
//! ([`classify_cpuhp`]) lives here too, so the kernel filter and the user-space tests run
//! the very same code.
#![no_std]

/// Name of the ring buffer map in the eBPF object.
pub const EVENTS_MAP: &str = "EVENTS";
/// Name of the per-CPU drop counter map (ring buffer full).
pub const DROPS_MAP: &str = "DROPS";
/// Global set by the loader: the `cpuhp` state number named `online`.
pub const GLOBAL_CPUHP_ONLINE: &str = "CPUHP_ONLINE";
/// Global set by the loader: the `cpuhp` state number named `cpu:teardown`.
pub const GLOBAL_CPUHP_TEARDOWN: &str = "CPUHP_TEARDOWN";

/// Which kernel hook produced a record.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `cpuhp_exit` (tracepoint, raw or BTF tracepoint), filtered to finished transitions.
    CpuhpExit = 1,
    /// `mm_setup_per_zone_wmarks` (any tracepoint kind): one per zone, twice per memory change.
    ZoneWatermarks = 2,
    /// `online_pages(pfn, nr_pages, ...)`: a memory block (or part of one) goes online.
    OnlinePages = 3,
    /// `offline_pages(start_pfn, nr_pages, ...)`.
    OfflinePages = 4,
    /// `generic_online_page(page, order)`: virtio-mem plugs sub-blocks through it.
    GenericOnlinePage = 5,
    /// `adjust_managed_page_count(page, count)`: balloons.
    AdjustManagedPageCount = 6,
}

impl Probe {
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            1 => Self::CpuhpExit,
            2 => Self::ZoneWatermarks,
            3 => Self::OnlinePages,
            4 => Self::OfflinePages,
            5 => Self::GenericOnlinePage,
            6 => Self::AdjustManagedPageCount,
            _ => return None,
        })
    }
}

/// What a CPU did, for [`Probe::CpuhpExit`] records.
#[repr(u16)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuAction {
    None = 0,
    Online = 1,
    Offline = 2,
}

/// One record in the ring buffer. Fixed size, no implicit padding.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeRecord {
    /// `bpf_ktime_get_ns()`: CLOCK_MONOTONIC at the hook.
    pub kernel_ns: u64,
    /// Signed page delta for the memory probes (0 where unknown).
    pub pages: i64,
    /// First page frame number, where the hook has one (0 otherwise).
    pub pfn: u64,
    /// Thread id of the task that ran the hook.
    pub pid: u32,
    /// The CPU the hook ran on.
    pub cpu: u32,
    /// The subject: the CPU that changed (cpuhp) or the NUMA node (watermarks; `u32::MAX`
    /// where the hook cannot tell, i.e. the raw and BTF tracepoints).
    pub subject: u32,
    /// A [`Probe`] discriminant.
    pub probe: u16,
    /// A [`CpuAction`] discriminant (cpuhp), 0 otherwise.
    pub action: u16,
    /// `bpf_get_current_comm()`, NUL-padded.
    pub comm: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<ProbeRecord>() == 56);
const _: () = assert!(core::mem::align_of::<ProbeRecord>() == 8);

#[cfg(feature = "user")]
// SAFETY: repr(C), Copy, every bit pattern is valid, no padding (asserted above).
unsafe impl aya::Pod for ProbeRecord {}

/// Decides whether a `cpuhp_exit` tracepoint hit finishes a CPU going online or offline.
///
/// `include/trace/events/cpuhp.h` (v6.18) records `cpu, state = st->state, idx, ret`.
/// Bringing a CPU up, the last hit is `cpuhp_kick_ap_work` reporting the CPU's state as
/// `online` (`CPUHP_ONLINE`). Taking it down, the CPU leaves `cpu_online_mask` in
/// `takedown_cpu`, the teardown callback of `cpu:teardown` (`CPUHP_TEARDOWN_CPU`): its hit
/// has `idx == teardown` and a state below it. The numbers differ between kernels and
/// configs, so the loader looks them up by name in `/sys/devices/system/cpu/hotplug/states`.
#[inline(always)]
pub fn classify_cpuhp(state: i32, idx: i32, ret: i32, online: i32, teardown: i32) -> CpuAction {
    if ret != 0 || online <= 0 || teardown <= 0 {
        return CpuAction::None;
    }
    if state == online && idx != online {
        CpuAction::Online
    } else if idx == teardown && state < teardown {
        CpuAction::Offline
    } else {
        CpuAction::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Numbers as on the 6.18 host: 144 is cpu:teardown, 236 is online.
    const ON: i32 = 236;
    const TD: i32 = 144;

    #[test]
    fn classifies_only_the_finishing_steps() {
        // Recorded on this machine: `echo 0 > cpu1/online; echo 1 > cpu1/online`.
        let steps = [
            (234, 235, 0), // sched:active teardown on the AP
            (144, 236, 0), // cpuhp_kick_ap_work: the AP reached cpu:teardown
            (84, 144, 0),  // takedown_cpu: the CPU is gone
            (7, 8, 0),     // BP-side cleanup
            (1, 1, 0),     // bring-up starts
            (235, 235, 0),
            (236, 83, 0), // cpuhp_kick_ap_work: the CPU is online
        ];
        let got: [CpuAction; 7] = steps.map(|(s, i, r)| classify_cpuhp(s, i, r, ON, TD));
        assert_eq!(
            got,
            [
                CpuAction::None,
                CpuAction::None,
                CpuAction::Offline,
                CpuAction::None,
                CpuAction::None,
                CpuAction::None,
                CpuAction::Online,
            ]
        );
    }

    #[test]
    fn failed_steps_and_unset_numbers_report_nothing() {
        assert_eq!(classify_cpuhp(236, 83, -16, ON, TD), CpuAction::None);
        assert_eq!(classify_cpuhp(84, 144, -5, ON, TD), CpuAction::None);
        assert_eq!(classify_cpuhp(236, 83, 0, 0, 0), CpuAction::None);
    }
}
