//! What an unreachable Kubernetes API does to `/readyz`: nothing for [`API_UNREADY_AFTER`].
//!
//! An API outage is usually the whole cluster's (a control-plane upgrade, an etcd hiccup,
//! a load balancer failing over): if every agent went NotReady at once, a DaemonSet
//! rollout would stall on `maxUnavailable`, endpoint-based scraping would drop the very
//! pods whose `hotplug_agent_api_reachable` says what is wrong, and no pod would be any
//! better after a restart. Meanwhile the agent keeps doing what needs no API: its sources
//! listen, the event log, the stream and the metrics go on. So readiness is about the
//! agent itself (its sources, its first reconcile tried), and the API's state is a metric
//! (`hotplug_agent_api_reachable`) and a record (`reconcile api_unreachable`, then
//! `api_reachable`). Only an API this agent has not reached for longer than the grace is
//! a reason to be unready: that is rarely a cluster-wide blip any more, more often this
//! node's own problem (its token, a network policy, a broken kubeconfig), and `kubectl get
//! pods` should show it.
use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

/// How long the API may be unreachable before `/readyz` says 503 (five minutes: longer
/// than a control-plane upgrade's blips and client-go's own retries, short enough that
/// the `HotplugAgentNotReady` alert, 15 minutes on top, fires within the half hour).
pub const API_UNREADY_AFTER: Duration = Duration::from_secs(300);

/// Why `/readyz` answers 503.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("sources not listening yet")]
    SourcesNotListening,
    #[error("first reconcile not done yet (waiting for the Kubernetes API)")]
    FirstReconcilePending,
    #[error(
        "the Kubernetes API has been unreachable for {} s, longer than {} s",
        .0.as_secs(),
        API_UNREADY_AFTER.as_secs()
    )]
    ApiUnreachable(Duration),
}

/// Ready, but the API has been unreachable this long (within the grace): what `/readyz`
/// adds to its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiUnreachableFor(pub Duration);

impl std::fmt::Display for ApiUnreachableFor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the Kubernetes API has been unreachable for {} s (not a reason to be unready \
             before {} s)",
            self.0.as_secs(),
            API_UNREADY_AFTER.as_secs()
        )
    }
}

/// Since when the API has been unreachable, as the reconcile records say.
#[derive(Debug, Default)]
pub struct ApiOutage {
    since: Mutex<Option<Instant>>,
}

impl ApiOutage {
    /// A reconcile record: `reachable` unless it says `api_unreachable`. The outage starts
    /// at the first unreachable record and ends at the first record of any other kind.
    pub fn observe(&self, reachable: bool, now: Instant) {
        let mut since = self.since.lock().unwrap_or_else(|e| e.into_inner());
        match (reachable, *since) {
            (true, _) => *since = None,
            (false, None) => *since = Some(now),
            (false, Some(_)) => {}
        }
    }

    /// How long the API has been unreachable at `now`, if it is.
    pub fn unreachable_for(&self, now: Instant) -> Option<Duration> {
        let since = *self.since.lock().unwrap_or_else(|e| e.into_inner());
        since.map(|s| now.saturating_duration_since(s))
    }

    /// Ok with a note for `/readyz` while within the grace (`None`: reachable); Err once
    /// the outage is longer than [`API_UNREADY_AFTER`].
    pub fn check(&self, now: Instant) -> Result<Option<ApiUnreachableFor>, NotReady> {
        match self.unreachable_for(now) {
            None => Ok(None),
            Some(d) if d <= API_UNREADY_AFTER => Ok(Some(ApiUnreachableFor(d))),
            Some(d) => Err(NotReady::ApiUnreachable(d)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_outage_keeps_ready_and_a_long_one_does_not() {
        let t0 = Instant::now();
        let outage = ApiOutage::default();
        assert_eq!(outage.check(t0), Ok(None));
        outage.observe(false, t0);
        // Later unreachable records do not restart the clock.
        outage.observe(false, t0 + Duration::from_secs(60));
        let within = outage
            .check(t0 + Duration::from_secs(120))
            .expect("ready within the grace");
        assert!(within.is_some_and(|n| n.to_string().contains("for 120 s")));
        assert!(outage.check(t0 + API_UNREADY_AFTER).is_ok());
        let after = outage
            .check(t0 + API_UNREADY_AFTER + Duration::from_secs(1))
            .expect_err("unready after the grace");
        assert!(
            after.to_string().contains("unreachable for 301 s"),
            "{after}"
        );
        // Back: ready at once, and a new outage starts a new clock.
        outage.observe(true, t0 + Duration::from_secs(400));
        assert_eq!(outage.check(t0 + Duration::from_secs(400)), Ok(None));
        outage.observe(false, t0 + Duration::from_secs(500));
        assert!(outage.check(t0 + Duration::from_secs(700)).is_ok());
    }
}
