//! `--static-policy drain-and-reset`: the documented way out when the kubelet's static CPU
//! or memory manager checkpoint no longer matches the machine (kubernetes/kubernetes#124066,
//! #109996; the "changing the CPU manager policy" procedure in the Kubernetes docs):
//! cordon, evict the pods that hold exclusive CPUs or pinned memory (through the Eviction
//! API, so PodDisruptionBudgets are honoured), wait until they are gone (watched, as the
//! shrink's evictions are), stop the kubelet, move the checkpoint aside (kept as a backup,
//! never deleted), start the kubelet, wait for the Node to be Ready, uncordon. Every step is a `reset` record; a step that fails stops the procedure, and the
//! kubelet is never left stopped by us.
use crate::record::{DecisionAction, DecisionKind};
use std::{path::PathBuf, time::Duration};

use k8s_openapi::{api::core::v1::Node, jiff::Timestamp};
use tokio::time::Instant;

use super::{Controller, Next};
use crate::{
    node::{EventType, NodeError},
    refresh,
    sources::error_chain,
};

/// What the checkpoint check found.
pub struct Blocked {
    pub checkpoints: Vec<PathBuf>,
    /// UIDs of the pods holding pinned resources.
    pub pods: Vec<String>,
}

/// How long a PodDisruptionBudget may hold an eviction before the procedure gives up.
const EVICTION_PATIENCE: Duration = Duration::from_secs(120);
const EVICTION_RETRY: Duration = Duration::from_secs(5);

impl Controller {
    pub(super) async fn step(&self, action: DecisionAction, message: String) {
        self.decide(DecisionKind::Reset, action, |d| d.message = Some(message))
            .await;
    }

    /// `uncordon`: the agent cordoned the Node for this reset, so it undoes that; a Node
    /// cordoned by someone else stays cordoned. The message says which.
    async fn abort(&mut self, node: &Node, why: String, uncordon: bool) -> Next {
        let why = if uncordon && let Some(api) = &self.node {
            match api.cordon_by_agent(false).await {
                Ok(()) => format!("{why}; the agent's cordon was lifted again"),
                Err(e) => format!(
                    "{why}; lifting the agent's cordon failed too: {}",
                    error_chain(&e)
                ),
            }
        } else {
            why
        };
        self.step(DecisionAction::Failed, why.clone()).await;
        self.warn(
            node,
            "StaticPolicyResetFailed",
            "StaticPolicyResetFailed",
            &why,
        )
        .await;
        Next::Done
    }

    /// `Ok`: the kubelet runs on a fresh checkpoint; go on to verify. `Err`: what to do instead.
    pub(super) async fn drain_and_reset(
        &mut self,
        node: &Node,
        blocked: Blocked,
    ) -> Result<(), Next> {
        let names: Vec<String> = blocked
            .checkpoints
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        // On a smaller machine the drain also takes the pods there is no room for
        // (shrink.rs): the check and its `evict` list go with this record.
        let shrink = self.shrink_checked.take();
        let message = format!(
            "checkpoints {}; pods {}",
            names.join(", "),
            blocked.pods.join(", ")
        );
        self.decide(DecisionKind::Reset, DecisionAction::Started, |d| {
            d.message = Some(message);
            d.shrink = shrink;
        })
        .await;
        self.event(
            EventType::Warning,
            "StaticPolicyReset",
            "draining pinned pods and resetting the kubelet's checkpoint",
        )
        .await;
        let api = self
            .node
            .as_ref()
            .expect("reset is only called with a client");
        // Respect the operator: a Node cordoned by someone else (not carrying our
        // annotation) stays cordoned, during and after the reset. Ours (an earlier reset
        // that the agent's restart cut short) is ours to lift.
        let ours = !node_cordoned(node) || crate::node::cordoned_by_agent(node);
        if ours {
            if let Err(e) = api.cordon_by_agent(true).await {
                return Err(self
                    .abort(node, format!("cordon failed: {}", error_chain(&e)), false)
                    .await);
            }
            self.step(DecisionAction::Cordoned, "the Node is unschedulable".into())
                .await;
        } else {
            self.step(
                DecisionAction::Cordoned,
                "the Node was already cordoned, not by the agent: left cordoned, now and after the reset".into(),
            )
            .await;
        }

        if let Err(why) = self.evict_pinned(&blocked.pods).await {
            return Err(self.abort(node, why, ours).await);
        }
        // Drained means gone, as `kubectl drain` waits for: a kubelet stopped while it
        // still terminates a pinned pod leaves its containers on the CPUs the new
        // checkpoint hands out again.
        if let Err(why) = self.wait_pods_gone(&blocked.pods).await {
            return Err(self.abort(node, why, ours).await);
        }

        if let Err(e) = refresh::stop(&self.config.backend).await {
            return Err(self
                .abort(
                    node,
                    format!("stopping the kubelet failed: {}", error_chain(&e)),
                    ours,
                )
                .await);
        }
        self.step(
            DecisionAction::KubeletStopped,
            self.config.backend.name().into(),
        )
        .await;

        let stamp = Timestamp::now().as_second();
        let mut moved = Vec::new();
        for path in &blocked.checkpoints {
            let backup = path.with_file_name(format!(
                "{}.hotplug-agent-{stamp}.bak",
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            ));
            match std::fs::rename(path, &backup) {
                Ok(()) => {
                    self.step(
                        DecisionAction::CheckpointMoved,
                        format!("{} -> {}", path.display(), backup.display()),
                    )
                    .await;
                    moved.push(backup);
                }
                Err(e) => {
                    // Never leave the kubelet stopped: start it on the old checkpoint and say so.
                    let _ = refresh::start(&self.config.backend).await;
                    return Err(self
                        .abort(
                            node,
                            format!("moving {} aside failed: {e}", path.display()),
                            ours,
                        )
                        .await);
                }
            }
        }

        // The Ready heartbeat the stopped kubelet left: only a new kubelet changes it now
        // (see `is_ready_since`). Read after the checkpoints moved, the latest before the
        // start, so that a stop command that returned before its kubelet was gone still
        // lets that kubelet's last post in first.
        let left = match self.node.as_mut() {
            Some(api) => match api.get().await {
                Ok(n) => Some(ready_heartbeat(&n)),
                Err(e) => {
                    tracing::debug!(error = %error_chain(&e), "reading the Node before the kubelet starts");
                    None
                }
            },
            None => None,
        };
        let started_at = Timestamp::now();
        if let Err(e) = refresh::start(&self.config.backend).await {
            return Err(self
                .abort(
                    node,
                    format!(
                        "starting the kubelet failed (checkpoints kept at {moved:?}): {}",
                        error_chain(&e)
                    ),
                    false,
                )
                .await);
        }
        self.step(
            DecisionAction::KubeletStarted,
            self.config.backend.name().into(),
        )
        .await;

        let api = self
            .node
            .as_mut()
            .expect("reset is only called with a client");
        let ready = api
            .wait_until(self.config.verify_timeout, |n| {
                is_ready_since(n, started_at, left)
            })
            .await;
        match ready {
            Ok(Some(_)) => {
                self.step(
                    DecisionAction::NodeReady,
                    "the kubelet reports Ready again".into(),
                )
                .await
            }
            Ok(None) => {
                let why = format!(
                    "the Node did not report Ready within {:?} after the kubelet started; left cordoned",
                    self.config.verify_timeout
                );
                return Err(self.abort(node, why, false).await);
            }
            Err(e) => {
                return Err(self
                    .abort(
                        node,
                        format!("watching the Node: {}", error_chain(&e)),
                        false,
                    )
                    .await);
            }
        }
        let api = self
            .node
            .as_ref()
            .expect("reset is only called with a client");
        if !ours {
            self.step(
                DecisionAction::LeftCordoned,
                "someone else had cordoned the Node before the reset: left cordoned".into(),
            )
            .await;
            return Ok(());
        }
        if let Err(e) = api.cordon_by_agent(false).await {
            return Err(self
                .abort(node, format!("uncordon failed: {}", error_chain(&e)), false)
                .await);
        }
        self.step(
            DecisionAction::Uncordoned,
            "the Node is schedulable again".into(),
        )
        .await;
        Ok(())
    }

    /// Evicts the pods that hold pinned resources; waits while a PodDisruptionBudget says no.
    async fn evict_pinned(&mut self, uids: &[String]) -> Result<(), String> {
        let api = self
            .node
            .as_ref()
            .expect("reset is only called with a client");
        let pods = api
            .pods()
            .await
            .map_err(|e| format!("listing the Node's pods: {}", error_chain(&e)))?;
        let targets: Vec<(String, String)> = pods
            .iter()
            .filter(|p| p.metadata.uid.as_ref().is_some_and(|u| uids.contains(u)))
            .filter_map(|p| Some((p.metadata.namespace.clone()?, p.metadata.name.clone()?)))
            .collect();
        for (ns, name) in targets {
            let deadline = Instant::now() + EVICTION_PATIENCE;
            loop {
                match api.evict(&ns, &name).await {
                    Ok(()) => break,
                    Err(NodeError::Api(kube::Error::Api(status))) if status.code == 404 => break,
                    Err(NodeError::Api(kube::Error::Api(status)))
                        if status.code == 429 && Instant::now() < deadline =>
                    {
                        tracing::info!(pod = %format!("{ns}/{name}"), "eviction refused by a PodDisruptionBudget; retrying");
                        tokio::time::sleep(EVICTION_RETRY).await;
                    }
                    Err(e) => return Err(format!("evicting {ns}/{name}: {}", error_chain(&e))),
                }
            }
            self.step(DecisionAction::Evicted, format!("{ns}/{name}"))
                .await;
        }
        Ok(())
    }
}

pub(super) fn node_cordoned(node: &Node) -> bool {
    node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
}

/// The Ready condition's status and heartbeat, if it has one.
fn ready_condition(node: &Node) -> Option<(&str, Option<Timestamp>)> {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| {
            (
                c.status.as_str(),
                c.last_heartbeat_time.as_ref().map(|t| t.0),
            )
        })
}

/// The Ready condition's heartbeat, if any.
fn ready_heartbeat(node: &Node) -> Option<Timestamp> {
    ready_condition(node).and_then(|(_, t)| t)
}

/// Whether the Node shows the kubelet started at `started` posting Ready=True.
///
/// The API keeps heartbeats to the second (`metav1.Time`), so "a heartbeat from after the
/// start" cannot be told to the second alone: the stopped kubelet's last post, made in
/// the second the new one was started (a stop, a rename and a start take milliseconds),
/// has that second too, and taking it for the new kubelet would uncordon a Node whose
/// kubelet has not come up (it may never, on a bad checkpoint). Nor can "a later second"
/// be asked for: a kubelet that posts Ready in the second it was started, and then not
/// for minutes (nodeStatusReportFrequency), would be missed. So a heartbeat counts when
/// it is no older than the start's second and is not the one the stopped kubelet left
/// (`left`: `Some` of what the Node carried just before the start; nothing but a new
/// kubelet changes it then). Missed only if the new kubelet's post lands in the very
/// second of the old one's last, and then only until its next post. Without that reading
/// (`left` is `None`), only a heartbeat from a later second than the start counts.
fn is_ready_since(node: &Node, started: Timestamp, left: Option<Option<Timestamp>>) -> bool {
    let Some(("True", Some(heartbeat))) = ready_condition(node) else {
        return false;
    };
    let second = heartbeat.as_second();
    match left {
        Some(left) => second >= started.as_second() && left != Some(heartbeat),
        None => second > started.as_second(),
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeCondition, NodeStatus},
        apimachinery::pkg::apis::meta::v1::Time,
    };

    use super::*;

    fn node(status: &str, heartbeat: Option<&str>) -> Node {
        Node {
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: status.into(),
                    last_heartbeat_time: heartbeat.map(|t| Time(t.parse().unwrap())),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        }
    }

    fn at(t: &str) -> Timestamp {
        t.parse().unwrap()
    }

    #[test]
    fn the_stopped_kubelets_last_heartbeat_in_the_same_second_is_not_the_new_one() {
        let started = at("2026-01-01T10:00:05.600Z");
        let old = "2026-01-01T10:00:05Z";
        // The stopped kubelet posted at 10:00:05.4, the start was at 10:00:05.6.
        assert!(!is_ready_since(
            &node("True", Some(old)),
            started,
            Some(Some(at(old)))
        ));
        // The new kubelet's first post, a second later.
        let new = "2026-01-01T10:00:06Z";
        assert!(is_ready_since(
            &node("True", Some(new)),
            started,
            Some(Some(at(old)))
        ));
        // The new kubelet posts within the second it was started, and the old one's last
        // post was an earlier second: counted at once.
        let old = "2026-01-01T10:00:04Z";
        assert!(is_ready_since(
            &node("True", Some("2026-01-01T10:00:05Z")),
            started,
            Some(Some(at(old)))
        ));
        // A Node that had no heartbeat before.
        assert!(is_ready_since(
            &node("True", Some("2026-01-01T10:00:05Z")),
            started,
            Some(None)
        ));
    }

    #[test]
    fn not_ready_stale_or_unknown_is_not_ready() {
        let started = at("2026-01-01T10:00:05.600Z");
        let new = "2026-01-01T10:00:07Z";
        for status in ["False", "Unknown"] {
            assert!(!is_ready_since(
                &node(status, Some(new)),
                started,
                Some(None)
            ));
        }
        assert!(!is_ready_since(&node("True", None), started, Some(None)));
        // From before the start.
        assert!(!is_ready_since(
            &node("True", Some("2026-01-01T10:00:04Z")),
            started,
            Some(None)
        ));
        // Without the reading before the start: only a later second counts.
        assert!(!is_ready_since(
            &node("True", Some("2026-01-01T10:00:05Z")),
            started,
            None
        ));
        assert!(is_ready_since(&node("True", Some(new)), started, None));
    }
}
