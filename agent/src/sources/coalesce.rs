//! Folds the kernel's repeats into one record.
//!
//! One memory block going online or offline fires `mm_setup_per_zone_wmarks` once per zone,
//! twice (10 hits within ~12 µs on the host here); virtio-mem onlines a sub-block through
//! `generic_online_page` once per chunk. Hits of the same probe from the same task less than
//! a window apart (kernel time) are one change; the folded record keeps the first hit's
//! identity, the sum of the pages and the number of hits. Separate operations, even in a
//! fast burst (20 blocks in 0.3 s here: ~15 ms apart), stay separate.
use agent_common::Probe;

/// A decoded ring-buffer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeEvent {
    pub probe: Probe,
    pub kernel_ns: u64,
    /// Monotonic time the agent read it.
    pub received_ns: u64,
    pub pid: u32,
    pub cpu: u32,
    pub subject: u32,
    pub action: u16,
    pub pages: i64,
    /// The first page frame the hook names (memory block probes), 0 where it names none.
    pub pfn: u64,
    pub comm: String,
    pub hits: u32,
}

impl ProbeEvent {
    fn folds_into(&self, pending: &ProbeEvent, last_ns: u64, window_ns: u64) -> bool {
        self.probe == pending.probe
            && self.pid == pending.pid
            && self.kernel_ns.saturating_sub(last_ns) <= window_ns
    }
}

/// Whether a probe's hits are folded at all (CPU transitions are already exact).
pub fn is_folded(probe: Probe) -> bool {
    !matches!(probe, Probe::CpuhpExit)
}

#[derive(Debug)]
pub struct Coalescer {
    window_ns: u64,
    pending: Option<(ProbeEvent, u64)>,
}

impl Coalescer {
    pub fn new(window_ns: u64) -> Self {
        Self {
            window_ns,
            pending: None,
        }
    }

    /// Takes a hit; returns the previous folded record when this hit does not belong to it.
    pub fn push(&mut self, ev: ProbeEvent) -> Option<ProbeEvent> {
        if let Some((pending, last_ns)) = &mut self.pending
            && ev.folds_into(pending, *last_ns, self.window_ns)
        {
            pending.pages += ev.pages;
            pending.hits += ev.hits;
            *last_ns = ev.kernel_ns;
            return None;
        }
        let kernel_ns = ev.kernel_ns;
        self.pending.replace((ev, kernel_ns)).map(|(p, _)| p)
    }

    /// The folded record, once no further hit can belong to it.
    pub fn flush(&mut self) -> Option<ProbeEvent> {
        self.pending.take().map(|(p, _)| p)
    }

    pub fn is_pending(&self) -> bool {
        self.pending.is_some()
    }

    pub fn window_ns(&self) -> u64 {
        self.window_ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hit(probe: Probe, pid: u32, ns: u64, pages: i64) -> ProbeEvent {
        ProbeEvent {
            probe,
            kernel_ns: ns,
            received_ns: ns + 1000,
            pid,
            cpu: 0,
            subject: 0,
            action: 0,
            pages,
            pfn: 0,
            comm: "bash".into(),
            hits: 1,
        }
    }

    /// The hits recorded on the host for `offline` then `online` of one block, 4 ms apart.
    #[test]
    fn per_zone_repeats_fold_into_one_record_per_operation() {
        let mut c = Coalescer::new(1_000_000);
        let mut out = Vec::new();
        let offline = [
            133_360u64, 133_362, 133_363, 133_364, 133_364, 133_371, 133_371, 133_372, 133_372,
            133_372,
        ];
        let online = [
            137_152u64, 137_155, 137_155, 137_156, 137_156, 137_161, 137_161, 137_162, 137_162,
            137_162,
        ];
        for us in offline.iter().chain(online.iter()) {
            out.extend(c.push(hit(Probe::ZoneWatermarks, 4103, us * 1000, 0)));
        }
        out.extend(c.flush());
        assert_eq!(out.len(), 2, "{out:?}");
        assert_eq!(out[0].kernel_ns, 133_360_000);
        assert_eq!(out[0].hits, 10);
        assert_eq!(out[1].kernel_ns, 137_152_000);
        assert_eq!(out[1].hits, 10);
        assert!(!c.is_pending());
    }

    #[test]
    fn page_chunks_are_summed_and_different_tasks_or_probes_stay_apart() {
        let mut c = Coalescer::new(1_000_000);
        let mut out = Vec::new();
        // virtio-mem: eight 4 MiB chunks (order 10 = 1024 pages) from one kworker.
        for i in 0..8 {
            out.extend(c.push(hit(
                Probe::GenericOnlinePage,
                77,
                1_000_000 + i * 10_000,
                1024,
            )));
        }
        // Another task, same probe, same instant: a different change.
        out.extend(c.push(hit(Probe::GenericOnlinePage, 78, 1_080_000, 1024)));
        // Same task, other probe.
        out.extend(c.push(hit(Probe::AdjustManagedPageCount, 78, 1_081_000, -512)));
        out.extend(c.flush());
        let summary: Vec<_> = out
            .iter()
            .map(|e| (e.probe, e.pid, e.pages, e.hits))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Probe::GenericOnlinePage, 77, 8 * 1024, 8),
                (Probe::GenericOnlinePage, 78, 1024, 1),
                (Probe::AdjustManagedPageCount, 78, -512, 1),
            ]
        );
    }

    #[test]
    fn a_gap_longer_than_the_window_splits() {
        let mut c = Coalescer::new(1_000_000);
        assert_eq!(c.push(hit(Probe::ZoneWatermarks, 1, 0, 0)), None);
        // Chained hits each within the window extend it.
        assert_eq!(c.push(hit(Probe::ZoneWatermarks, 1, 900_000, 0)), None);
        assert_eq!(c.push(hit(Probe::ZoneWatermarks, 1, 1_800_000, 0)), None);
        let first = c
            .push(hit(Probe::ZoneWatermarks, 1, 2_800_001, 0))
            .expect("split");
        assert_eq!(first.hits, 3);
        assert_eq!(c.flush().unwrap().kernel_ns, 2_800_001);
    }
}
