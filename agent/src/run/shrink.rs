//! The controller's side of safe shrink (shrink.rs) and of the admission check after a
//! restart.
//!
//! Before a restart on a smaller machine: the pods against the allocatable after it. They
//! fit: restart. They do not: refuse (`refresh` `skipped`, reason `shrink_unsafe`, a
//! Warning Event, the condition), or with `--shrink-policy evict` take a drain slot of the
//! fleet budget, cordon (the agent's own cordon only: an operator's stays), evict the
//! lowest-priority pods through the Eviction API until the rest fit, wait until they are
//! gone, restart, and lift the agent's cordon. An eviction that is refused stops it all:
//! never a restart into an OOM kill.
//!
//! After a restart: pods the kubelet failed at admission (kubernetes/kubernetes#125579:
//! `OutOfcpu`, `OutOfmemory`, `UnexpectedAdmissionError`) that were not failed before it
//! are named in the `verify` record (`rejected_pods`) and a Warning Event; admission.rs
//! watches for those the kubelet fails later.
use std::{collections::HashMap, time::Duration};

use k8s_openapi::api::core::v1::{Node, Pod};
use tokio::time::Instant;

use super::{Backend, Blocking, Controller, Next, fleet};
use crate::{
    capacity::{Snapshot, Summary},
    checkpoint,
    node::{EventType, NodeError},
    offlining::{self, Started},
    record::{DecisionAction, DecisionKind, RejectedPod, ShrinkCheck},
    shrink::{self, Pinned, PodLoad, Policy},
    sources::error_chain,
};

/// How long evicted pods may take to terminate (their grace period) before the agent gives
/// up; `kubectl drain`'s default timeout is unbounded, the kubelet's default grace 30 s.
const TERMINATION_PATIENCE: Duration = Duration::from_secs(120);

/// The evictions a restart on the smaller machine needs first.
pub(super) struct Evictions {
    check: ShrinkCheck,
    pods: Vec<PodLoad>,
}

impl Evictions {
    pub(super) fn uids(&self) -> impl Iterator<Item = String> + '_ {
        self.pods.iter().map(|p| p.uid.clone())
    }
}

/// A pod the kubelet failed at admission: `OutOfcpu`, `OutOfmemory`,
/// `OutOfpods`, `OutOf<extended resource>` (pkg/kubelet/lifecycle/predicate.go), or
/// `UnexpectedAdmissionError` (a device, CPU or memory manager that could not allocate).
fn rejected(pod: &Pod) -> Option<(String, Option<String>)> {
    let status = pod.status.as_ref()?;
    let reason = status.reason.as_deref()?;
    (status.phase.as_deref() == Some("Failed")
        && (reason.starts_with("OutOf") || reason == "UnexpectedAdmissionError"))
        .then(|| (reason.to_owned(), status.message.clone()))
}

/// [`rejected`], as the record names it.
pub(super) fn rejected_pod(pod: &Pod) -> Option<RejectedPod> {
    let (reason, message) = rejected(pod)?;
    Some(RejectedPod {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        reason,
        message,
    })
}

/// The `PodsRejectedAfterRestart` Warning's text.
pub(super) fn rejected_message(pods: &[RejectedPod]) -> String {
    let names: Vec<String> = pods
        .iter()
        .map(|p| format!("{}/{} ({})", p.namespace, p.name, p.reason))
        .collect();
    format!(
        "after the kubelet restart, the kubelet failed {} pod(s) at admission: {} \
         (kubernetes/kubernetes#125579); their controllers recreate them elsewhere, bare \
         pods stay failed",
        pods.len(),
        names.join(", ")
    )
}

/// The pods against a smaller machine.
enum Assessment {
    Fits(ShrinkCheck),
    Evict(Evictions),
    /// What does not fit and why nothing is evicted, in words.
    Refuse {
        check: ShrinkCheck,
        why: String,
    },
}

impl Controller {
    /// The pods against the allocatable on `machine`: `None` where it is not smaller than
    /// the Node. `offlining`: the blocks the kernel is still taking away (offlining.rs).
    async fn assess(
        &self,
        node: &Node,
        machine: Summary,
        offlining: Vec<String>,
        pinned: Pinned<'_>,
    ) -> Option<Assessment> {
        if !shrink::is_decrease(machine, node) {
            return None;
        }
        let mut usage = shrink::pods_usage(&self.config.cgroup_root);
        let api = self
            .node
            .as_ref()
            .expect("the shrink check is only made with a client");
        let (loads, unlisted) = match api.pods().await {
            Ok(pods) => {
                let mut loads = shrink::loads(&pods, &usage);
                shrink::account_pinned(&mut loads, &mut usage, pinned);
                (Some(loads), None)
            }
            Err(e) => (None, Some(error_chain(&e))),
        };
        let mut check = shrink::check(
            shrink::allocatable_after(machine, node),
            &usage,
            loads.as_deref(),
        );
        check.offlining = offlining;
        if check.fits {
            return Some(Assessment::Fits(check));
        }
        let mut why = describe(&check);
        if let Some(e) = unlisted {
            why = format!("{why}; the node's pods could not be listed ({e})");
        }
        if self.config.shrink_policy == Policy::Refuse {
            let why = format!(
                "{why}. A restart would lower the pods' cgroup memory limit below what they use \
                 or fail them at admission (kubernetes/kubernetes#141609). Free memory or evict \
                 pods, then restart the kubelet; or run the agent with --shrink-policy evict"
            );
            return Some(Assessment::Refuse { check, why });
        }
        let loads = loads.unwrap_or_default();
        let Some(pods) = shrink::plan(&check, &loads) else {
            let evictable = loads.iter().filter(|p| p.evictable).count();
            let why = format!(
                "{why}, and evicting all {evictable} evictable pods would not make the rest \
                 fit; nothing was evicted"
            );
            return Some(Assessment::Refuse { check, why });
        };
        check.evict = pods.iter().map(PodLoad::key).collect();
        Some(Assessment::Evict(Evictions { check, pods }))
    }

    /// `Ok(None)`: no shrink, or the pods fit; `Ok(Some)`: evict these first; `Err`: not
    /// restarting (said, warned).
    pub(super) async fn shrink_gate(
        &mut self,
        node: &Node,
        machine: &Snapshot,
        blocking: &Blocking,
    ) -> Result<Option<Evictions>, Next> {
        self.shrink_checked = None;
        // The agent's own cordon left on the Node (an agent stopped between its evictions
        // and the restart, or evictions made while the kernel was offlining): lifted after
        // this restart, as it would have been.
        if matches!(blocking, Blocking::No) && crate::node::cordoned_by_agent(node) {
            self.shrink_cordon = true;
        }
        let refused =
            |why: &str| format!("not restarting the kubelet on the smaller machine: {why}");
        // One plan with a static policy: a reset's drain takes the pinned pods anyway, a
        // rewrite keeps them where they are.
        let pinned = match blocking {
            Blocking::Reset(blocked) => Pinned::Leaving(&blocked.pods),
            Blocking::Rewrite(_, _, pods) => Pinned::Staying(pods),
            Blocking::No | Blocking::Stop(_) => Pinned::None,
        };
        match self
            .assess(node, machine.summary(), Vec::new(), pinned)
            .await
        {
            None => Ok(None),
            Some(Assessment::Fits(check)) => {
                self.shrink_checked = Some(check);
                Ok(None)
            }
            Some(Assessment::Refuse { check, why }) => {
                Err(self.refuse_shrink(node, check, refused(&why)).await)
            }
            Some(Assessment::Evict(evictions)) => {
                self.shrink_checked = Some(evictions.check.clone());
                Ok(Some(evictions))
            }
        }
    }

    /// The kernel started offlining memory: the check against the machine without the
    /// blocks going, now, while the kernel still migrates pages out of them (offlining.rs).
    /// With `--shrink-policy evict` the pods that would not fit are evicted at once, which
    /// is also what lets an offline finish that waits for their pages; otherwise the
    /// Warning comes now. The restart waits for the episode's end, as always; the agent's
    /// cordon stays until then.
    pub(super) async fn offlining_started(&mut self, started: Started) {
        if self.node.is_none()
            || self.upstream_resize
            || matches!(self.config.backend, Backend::None)
        {
            return;
        }
        if self.heading(started.by_kernel).is_none() {
            // Done already: the episode's end has it.
            return;
        }
        let Ok(node) = self.fetch().await else {
            return;
        };
        if crate::node::paused(&node) {
            return;
        }
        // Read again after the Node, as everywhere: never a machine older than the Node.
        let Some((machine, heading)) = self.heading(started.by_kernel) else {
            return;
        };
        let after = heading.apply(&machine);
        let going = heading.blocks.join(", ");
        let said = |why: &str| {
            format!("the kernel is offlining {going}; on the machine without them: {why}")
        };
        // A checkpoint the smaller machine breaks: the episode's end makes one plan with the
        // static policy's reset or rewrite (shrink_gate); nothing is done ahead of it.
        let pinned = checkpoint::check(&self.config.kubelet_root, &after)
            .map_or(true, |v| v.iter().any(|v| !v.is_safe()));
        if pinned {
            return;
        }
        let assessment = self
            .assess(&node, after.summary(), heading.blocks, Pinned::None)
            .await;
        // The next block of the same unplug comes to the same check: said once.
        let said_for =
            |c: &ShrinkCheck| Some((c.memory_allocatable_after, c.cpu_allocatable_after_millis));
        let check = match &assessment {
            None | Some(Assessment::Fits(_)) => None,
            Some(Assessment::Refuse { check, .. }) => Some(check),
            Some(Assessment::Evict(e)) => Some(&e.check),
        };
        if let Some(check) = check {
            if self.offlining_said == said_for(check) {
                return;
            }
            self.offlining_said = said_for(check);
        }
        match assessment {
            None | Some(Assessment::Fits(_)) => {}
            Some(Assessment::Refuse { check, why }) => {
                self.refuse_early(&node, check, said(&why)).await;
            }
            Some(Assessment::Evict(evictions)) => {
                if self.take_slots(&[fleet::Action::Drain]).await.is_err() {
                    // Waiting for the budget was said; the episode's end tries again.
                    return;
                }
                let _ = self.evict_for_shrink(&node, evictions).await;
                self.release_slots().await;
            }
        }
    }

    /// The machine now and where the offline under way takes it; `None` when nothing is
    /// going offline (any more).
    fn heading(&self, by_kernel: bool) -> Option<(Snapshot, offlining::Heading)> {
        let machine = self.snapshot()?;
        let heading = offlining::heading(&self.config.pipeline.root, &machine, by_kernel)?;
        Some((machine, heading))
    }

    /// A refusal while the kernel is offlining: `reset` `skipped`, reason `shrink_unsafe`,
    /// and the Warning; the restart's own refusal follows at the episode's end.
    async fn refuse_early(&mut self, node: &Node, check: ShrinkCheck, message: String) {
        self.shrink_unsafe(DecisionKind::Reset, node, check, message)
            .await;
    }

    /// The restart refused: `refresh` `skipped`, reason `shrink_unsafe`, and the Warning.
    async fn refuse_shrink(&mut self, node: &Node, check: ShrinkCheck, message: String) -> Next {
        self.shrink_unsafe(DecisionKind::Refresh, node, check, message)
            .await;
        Next::Done
    }

    async fn shrink_unsafe(
        &mut self,
        kind: DecisionKind,
        node: &Node,
        check: ShrinkCheck,
        message: String,
    ) {
        let backend = (kind == DecisionKind::Refresh).then(|| self.config.backend.name());
        self.decide(kind, DecisionAction::Skipped, |d| {
            d.backend = backend.map(Into::into);
            d.reason = Some("shrink_unsafe".into());
            d.message = Some(message.clone());
            d.shrink = Some(check);
        })
        .await;
        self.warn(node, "ShrinkUnsafe", "ShrinkUnsafe", &message)
            .await;
    }

    async fn shrink_step(
        &self,
        action: DecisionAction,
        message: String,
        check: Option<&ShrinkCheck>,
    ) {
        self.decide(DecisionKind::Reset, action, |d| {
            d.reason = Some("shrink".into());
            d.message = Some(message);
            d.shrink = check.cloned();
        })
        .await;
    }

    /// Cordons (unless someone else did), evicts, waits until the pods are gone. `Err`: an
    /// eviction was refused or the pods did not go; the agent's cordon is lifted again and
    /// nothing restarts.
    pub(super) async fn evict_for_shrink(
        &mut self,
        node: &Node,
        evictions: Evictions,
    ) -> Result<(), Next> {
        let Evictions { check, pods } = evictions;
        self.shrink_step(
            DecisionAction::Started,
            if check.offlining.is_empty() {
                format!(
                    "the pods would not fit after a restart on the smaller machine ({}); evicting {}",
                    describe(&check),
                    check.evict.join(", ")
                )
            } else {
                format!(
                    "the kernel is offlining {}: the pods would not fit the machine without them \
                     ({}); evicting {} now, before it is done",
                    check.offlining.join(", "),
                    describe(&check),
                    check.evict.join(", ")
                )
            },
            Some(&check),
        )
        .await;
        self.event(
            EventType::Warning,
            "ShrinkEvicting",
            &format!(
                "evicting {} so that the other pods fit the smaller machine before the kubelet restarts",
                check.evict.join(", ")
            ),
        )
        .await;
        let api = self
            .node
            .as_ref()
            .expect("refresh is only called with a client");
        let ours = !super::reset::node_cordoned(node) || crate::node::cordoned_by_agent(node);
        if ours {
            if let Err(e) = api.cordon_by_agent(true).await {
                let why = format!("cordon failed: {}", error_chain(&e));
                return Err(self.shrink_failed(node, check, why, false).await);
            }
            self.shrink_cordon = true;
            self.shrink_step(
                DecisionAction::Cordoned,
                "the Node is unschedulable".into(),
                None,
            )
            .await;
        } else {
            self.shrink_step(
                DecisionAction::Cordoned,
                "the Node was already cordoned, not by the agent: left cordoned".into(),
                None,
            )
            .await;
        }
        let mut evicted = Vec::new();
        for pod in &pods {
            let api = self
                .node
                .as_ref()
                .expect("refresh is only called with a client");
            match api.evict(&pod.namespace, &pod.name).await {
                Ok(()) => {}
                // Gone already: what the eviction was for.
                Err(NodeError::Api(kube::Error::Api(s))) if s.code == 404 => {}
                Err(e) => {
                    let refused =
                        matches!(&e, NodeError::Api(kube::Error::Api(s)) if s.code == 429);
                    let why = format!(
                        "evicting {} {}: {}",
                        pod.key(),
                        if refused {
                            "was refused (a PodDisruptionBudget)"
                        } else {
                            "failed"
                        },
                        error_chain(&e)
                    );
                    return Err(self.shrink_failed(node, check, why, ours).await);
                }
            }
            self.shrink_step(DecisionAction::Evicted, pod.key(), None)
                .await;
            evicted.push(pod.uid.clone());
        }
        if let Err(why) = self.wait_pods_gone(&evicted).await {
            return Err(self.shrink_failed(node, check, why, ours).await);
        }
        Ok(())
    }

    /// Until none of `uids` is on the node any more (the kubelet has stopped their
    /// containers, so their memory is free), within [`TERMINATION_PATIENCE`]: watched
    /// (`NodeApi::wait_pods_gone`), so the restart follows the last deletion at once.
    pub(super) async fn wait_pods_gone(&self, uids: &[String]) -> Result<(), String> {
        let api = self
            .node
            .as_ref()
            .expect("refresh is only called with a client");
        let deadline = Instant::now() + TERMINATION_PATIENCE;
        let left = api
            .wait_pods_gone(uids, deadline)
            .await
            .map_err(|e| format!("watching the node's pods: {}", error_chain(&e)))?;
        if left.is_empty() {
            return Ok(());
        }
        Err(format!(
            "evicted pods still terminating after {TERMINATION_PATIENCE:?}: {}",
            left.join(", ")
        ))
    }

    /// Stops the shrink: the agent's cordon lifted, a `reset` `failed` step, then the
    /// refusal (`refresh` `skipped`, `shrink_unsafe`) with its Warning.
    async fn shrink_failed(
        &mut self,
        node: &Node,
        check: ShrinkCheck,
        why: String,
        uncordon: bool,
    ) -> Next {
        let mut why = why;
        if uncordon {
            why = match self.lift_shrink_cordon().await {
                Ok(()) => format!("{why}; the agent's cordon was lifted again"),
                Err(e) => format!("{why}; lifting the agent's cordon failed too: {e}"),
            };
        }
        self.shrink_step(DecisionAction::Failed, why.clone(), None)
            .await;
        let message = format!("not restarting the kubelet on the smaller machine: {why}");
        self.refuse_shrink(node, check, message).await
    }

    /// After the restart (whatever its outcome) or a stop: the agent's cordon goes.
    pub(super) async fn lift_shrink_cordon(&mut self) -> Result<(), String> {
        if !std::mem::take(&mut self.shrink_cordon) {
            return Ok(());
        }
        let api = self.node.as_ref().expect("a cordon needs a client");
        match api.cordon_by_agent(false).await {
            Ok(()) => {
                self.shrink_step(
                    DecisionAction::Uncordoned,
                    "the Node is schedulable again".into(),
                    None,
                )
                .await;
                Ok(())
            }
            Err(e) => {
                let why = error_chain(&e);
                tracing::warn!(error = %why, "lifting the agent's cordon after a shrink failed");
                Err(why)
            }
        }
    }

    /// The pods before a restart, by UID: whether each was already failed at admission.
    /// `None` where they cannot be listed (the check after the restart is skipped).
    pub(super) async fn pods_before_restart(&self) -> Option<HashMap<String, bool>> {
        let api = self.node.as_ref()?;
        match api.pods().await {
            Ok(pods) => Some(
                pods.iter()
                    .filter_map(|p| Some((p.metadata.uid.clone()?, rejected(p).is_some())))
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "listing the node's pods before the restart failed; pods failed at admission after it will not be looked for");
                None
            }
        }
    }

    /// The pods failed at admission since the restart began: failed now, and not before
    /// (or not there before). Those found count as failed before from now on, so that the
    /// watch after convergence (admission.rs) does not name them again.
    pub(super) async fn rejected_since_restart(&mut self) -> Vec<RejectedPod> {
        let api = self
            .node
            .as_ref()
            .expect("verify is only called with a client");
        let Some(before) = self.pods_before.as_mut() else {
            return Vec::new();
        };
        let pods = match api.pods().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %error_chain(&e), "listing the node's pods after the restart failed");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for p in &pods {
            let uid = p.metadata.uid.as_ref();
            if uid.is_some_and(|u| before.get(u) == Some(&true)) {
                continue;
            }
            let Some(rejected) = rejected_pod(p) else {
                continue;
            };
            if let Some(u) = uid {
                before.insert(u.clone(), true);
            }
            out.push(rejected);
        }
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out
    }

    /// A Warning naming the pods failed at admission after the restart.
    pub(super) async fn warn_rejected(&mut self, pods: &[RejectedPod]) {
        if pods.is_empty() {
            return;
        }
        let message = rejected_message(pods);
        self.event(EventType::Warning, "PodsRejectedAfterRestart", &message)
            .await;
    }
}

/// The check in words: what does not fit, with the numbers.
fn describe(c: &ShrinkCheck) -> String {
    let show = |v: Option<u64>| v.map_or_else(|| "unknown".to_owned(), |v| v.to_string());
    format!(
        "memory in use {} bytes, requested {} bytes, allocatable after the restart {} bytes; \
         cpu requested {}m, allocatable after {}m",
        show(c.memory_in_use),
        show(c.memory_requests),
        show(c.memory_allocatable_after),
        show(c.cpu_requests_millis),
        show(c.cpu_allocatable_after_millis),
    )
}
