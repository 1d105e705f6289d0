//! The controller's side of the fleet budgets (fleet.rs): a slot is taken before the
//! kubelet restarts (and before a drain), waited for while every slot is held, and given
//! back as soon as verify is over, whatever its outcome.
use std::future::Future;

use tokio::time::Instant;

use super::{Controller, Next};
use crate::{
    fleet::{Action, Attempt},
    record::{DecisionAction, DecisionKind, FleetBudget},
    sources::error_chain,
};

impl Controller {
    /// Takes a slot of each budget in `actions`, in that order (the same order on every
    /// node, and nothing is held while waiting, so no two nodes can wait on each other).
    /// `Err`: every slot is held or the budget could not be read; the retry is arranged
    /// and recorded once per wait. `Ok`: the slots taken, for the `started` record.
    pub(super) async fn take_slots(
        &mut self,
        actions: &[Action],
    ) -> Result<Vec<FleetBudget>, Next> {
        let mut taken = Vec::new();
        let Some(fleet) = self.fleet.as_mut() else {
            return Ok(taken);
        };
        for &action in actions {
            let budget = fleet.budget(action);
            match budget.try_take().await {
                Ok(Attempt::Held(slot)) => {
                    let waited = self
                        .fleet_waiting
                        .remove(&action)
                        .map(|since| since.elapsed().as_millis() as u64);
                    taken.push(FleetBudget {
                        budget: action.name().into(),
                        slots: slot.slots,
                        lease: Some(slot.lease.clone()),
                        waited_ms: waited,
                        ..FleetBudget::default()
                    });
                    self.held.push(slot);
                }
                Ok(Attempt::Full(full)) => {
                    self.fleet_retry = Some(action);
                    if self.fleet_waiting.contains_key(&action) {
                        return Err(Next::RetryAt(full.retry_at));
                    }
                    self.fleet_waiting.insert(action, Instant::now());
                    let fleet = FleetBudget {
                        budget: action.name().into(),
                        slots: full.slots,
                        holders: full.holders.clone(),
                        ..FleetBudget::default()
                    };
                    let message = format!(
                        "all {} {} slots of the fleet are held ({}); waiting for one",
                        full.slots,
                        action.name(),
                        full.holders.join(", ")
                    );
                    self.fleet_deferred(fleet, message).await;
                    return Err(Next::RetryAt(full.retry_at));
                }
                Err(e) => {
                    // Never restart outside the budget: an API that cannot be read is waited for.
                    self.fleet_retry = Some(action);
                    let at = Instant::now() + self.api_backoff;
                    self.api_backoff = (self.api_backoff * 2).min(super::API_RETRY_MAX);
                    if self.fleet_waiting.contains_key(&action) {
                        return Err(Next::RetryAt(at));
                    }
                    self.fleet_waiting.insert(action, Instant::now());
                    let fleet = FleetBudget {
                        budget: action.name().into(),
                        ..FleetBudget::default()
                    };
                    let message = format!(
                        "cannot read the fleet's {} budget, not restarting outside it: {}",
                        action.name(),
                        error_chain(&e)
                    );
                    self.fleet_deferred(fleet, message).await;
                    return Err(Next::RetryAt(at));
                }
            }
        }
        Ok(taken)
    }

    async fn fleet_deferred(&self, fleet: FleetBudget, message: String) {
        let backend = self.config.backend.name();
        self.decide(DecisionKind::Refresh, DecisionAction::Deferred, |d| {
            d.backend = Some(backend.into());
            d.reason = Some("fleet_budget".into());
            d.message = Some(message);
            d.fleet = Some(fleet);
        })
        .await;
    }

    /// Gives back every slot held (verify is over, or the refresh stopped short).
    pub(super) async fn release_slots(&mut self) {
        for slot in self.held.drain(..) {
            let lease = slot.lease.clone();
            if slot.lost() {
                tracing::warn!(%lease, "this node's slot had been taken over while it restarted the kubelet: the fleet budget was exceeded by one");
            }
            if let Err(e) = slot.release().await {
                // The Lease then expires on its own after its duration.
                tracing::warn!(%lease, error = %error_chain(&e), "giving the fleet budget slot back failed");
            }
        }
    }

    /// While waiting for a slot: completes when that budget's Leases change (a slot was
    /// given back), so the wait does not last until the next timer.
    pub(super) fn fleet_changed(&self, until: Instant) -> impl Future<Output = ()> + use<> {
        let budget = self
            .fleet_retry
            .and_then(|a| self.fleet.as_ref().map(|f| f.clone_budget(a)));
        async move {
            match budget {
                Some(b) => b.changed(until).await,
                None => std::future::pending().await,
            }
        }
    }
}
