//! After `verify` converged: the pods the restarted kubelet fails at admission later.
//!
//! The Node can post its new capacity before the kubelet has re-admitted every pod, so
//! the look at the pods when verify converges (`rejected_since_restart`, shrink.rs) can be
//! too early. For [`ADMISSION_GRACE`] after it, a task of its own watches the Node's pods
//! (`NodeApi::watch_pods`: no polling); a pod failed at admission in that window that was
//! not failed before the restart, nor named already, gets a `verify` record (action
//! `converged`, reason `rejected_after_convergence`, `rejected_pods`) and the Warning Event
//! `PodsRejectedAfterRestart`, as at convergence. The controller does not wait for it: its
//! next episode goes on, and a new restart (or the controller's end) cancels it.
use std::{
    collections::{HashMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use tokio::{sync::mpsc, task::JoinHandle, time::Instant};

use super::shrink::rejected_pod;
use crate::{
    capacity,
    node::{EventType, NodeApi, PodChange},
    record::{DecisionAction, DecisionKind, DecisionRecord, Record, RejectedPod},
    sources::error_chain,
};

/// How long after convergence a pod failed at admission is still the restart's doing.
///
/// The restarted kubelet admits its pods (pkg/kubelet/kubelet.go `HandlePodAdditions`:
/// `canAdmitPod`, then `rejectPod` with `OutOfcpu`, `OutOfmemory`, ...) only once its pod
/// source delivers them, and that source starts after the Node informer has synced
/// (pkg/kubelet/config/apiserver.go: checked every `WaitForAPIServerSyncPeriod`, 1 s), and
/// `syncLoop` takes pods only once the container runtime reports healthy (checked every
/// 5 s by `updateRuntimeUp`, its back-off up to 5 s). The rejection then reaches the API
/// through the status manager, at once or at its next batch sync (`syncPeriod`, 10 s).
/// Meanwhile the Node's new capacity goes out with the first status update, within the
/// kubelet's first seconds. About 20 s can thus lie between the two; 60 s is three times
/// that, and short enough that a failure then is still plainly the restart's.
pub(super) const ADMISSION_GRACE: Duration = Duration::from_secs(60);

/// The watch after convergence; dropping it cancels it.
pub(super) struct Admissions(JoinHandle<()>);

impl Drop for Admissions {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the task needs to write its records as the controller would.
pub(super) struct Reporter {
    pub(super) api: NodeApi,
    pub(super) log: mpsc::Sender<Record>,
    /// The machine's root, for the records' `capacity`.
    pub(super) root: PathBuf,
    pub(super) episode: u64,
}

/// Starts watching for [`ADMISSION_GRACE`]. `before`: the pods by UID as they were
/// before the restart, `true` where already failed at admission (or named since).
pub(super) fn watch(reporter: Reporter, before: HashMap<String, bool>) -> Admissions {
    let known: HashSet<String> = before
        .into_iter()
        .filter_map(|(uid, failed)| failed.then_some(uid))
        .collect();
    Admissions(tokio::spawn(follow(reporter, known, ADMISSION_GRACE)))
}

async fn follow(reporter: Reporter, mut known: HashSet<String>, grace: Duration) {
    let mut pods = reporter.api.watch_pods(Instant::now() + grace);
    loop {
        let change = match pods.next().await {
            Ok(Some(change)) => change,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "watching the node's pods after convergence failed; pods failed at admission later will not be seen");
                return;
            }
        };
        let changed = match change {
            PodChange::Listed(all) => all,
            PodChange::Applied(pod) => vec![pod],
            PodChange::Deleted(_) => continue,
        };
        let mut new: Vec<RejectedPod> = changed
            .iter()
            .filter_map(|p| {
                let uid = p.metadata.uid.as_ref()?;
                if known.contains(uid) {
                    return None;
                }
                let rejected = rejected_pod(p)?;
                known.insert(uid.clone());
                Some(rejected)
            })
            .collect();
        if new.is_empty() {
            continue;
        }
        new.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        reporter.report(new, grace).await;
    }
}

impl Reporter {
    async fn report(&self, pods: Vec<RejectedPod>, grace: Duration) {
        let capacity = capacity::read_summary(&self.root).unwrap_or_default();
        let mut d = DecisionRecord::new(
            DecisionKind::Verify,
            DecisionAction::Converged,
            capacity,
            self.episode,
        );
        d.node = Some(self.api.name().to_owned());
        d.reason = Some("rejected_after_convergence".into());
        d.message = Some(format!(
            "the kubelet failed {} pod(s) at admission after the Node had converged (watched \
             for {}s after convergence)",
            pods.len(),
            grace.as_secs()
        ));
        let message = super::shrink::rejected_message(&pods);
        d.rejected_pods = pods;
        let _ = self.log.send(Record::Decision(Box::new(d))).await;
        if let Err(e) = self
            .api
            .event(EventType::Warning, "PodsRejectedAfterRestart", &message)
            .await
        {
            tracing::warn!(error = %error_chain(&e), "posting a Node Event failed; the event log still has it");
        }
    }
}
