//! Fleet budgets (`hotplug_agent::fleet`) against the in-process fake API: the agent's own
//! Lease code with real kube clients, one per simulated node, as each agent has its own.
//!
//! - A fleet of 200 nodes hit by the same hot-add: every node takes a restart slot, "restarts
//!   its kubelet" (a fixed delay, then the Node's status shows the new memory, as the
//!   stand-in posts it) and gives the slot back; the number of nodes between taking and
//!   giving back never exceeds the budget, and every node converges.
//! - Bad input: Lease conflicts (many nodes racing for one slot), a holder that never renews
//!   (its clock far ahead), a holder that renews with its clock an hour behind, and an API
//!   outage while a slot is held.
//!
//! The fake API runs on its own thread and the clients talk HTTP to it, so tokio's paused
//! time cannot drive these tests: they run in real time with short leases (1–2 s).
//! `bench_fleet_convergence` (ignored; `cargo xtask bench -- fleet`) measures the time
//! until the whole fleet converged for several budgets and prints `BENCH_FLEET_JSON`.
use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use hotplug_agent::fleet::{self, Attempt, Budget, Fleet, Limit};
use hotplug_tests::fake_api::FakeApi;
use k8s_openapi::{
    api::{coordination::v1::Lease, core::v1::Node},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::json;
use tokio::time::Instant;

const NS: &str = "default";
const API_TIMEOUT: Duration = Duration::from_secs(5);
const GIB: u64 = 1 << 30;

fn config(restarts: Limit, lease: Duration) -> fleet::Config {
    fleet::Config {
        namespace: Some(NS.into()),
        restarts,
        drains: Limit::Count(1),
        lease_duration: lease,
    }
}

async fn budget(api: &FakeApi, dir: &Path, holder: &str, limit: Limit, lease: Duration) -> Budget {
    let c = api.client(dir).await;
    Fleet::new(c, &config(limit, lease), holder, API_TIMEOUT).restarts
}

fn holder(api: &FakeApi, name: &str) -> Option<String> {
    api.lease(NS, name).and_then(|l| {
        l.pointer("/spec/holderIdentity")
            .and_then(|h| h.as_str().map(str::to_owned))
    })
}

/// Tries until a slot is taken or `deadline` passes, waiting between tries as the
/// controller does (a slot given back, or the earliest expiry).
async fn take_until(b: &mut Budget, deadline: Instant) -> Option<fleet::Slot> {
    loop {
        let retry = match b.try_take().await {
            Ok(Attempt::Held(slot)) => return Some(slot),
            Ok(Attempt::Full(full)) => full.retry_at,
            Err(_) => Instant::now() + Duration::from_millis(100),
        };
        if Instant::now() >= deadline {
            return None;
        }
        b.changed(retry.min(deadline)).await;
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn racing_nodes_get_one_slot_each_and_the_losers_see_who_holds_them() {
    rt().block_on(async {
        let api = FakeApi::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut budgets = Vec::new();
        for i in 0..10 {
            budgets.push(
                budget(
                    &api,
                    dir.path(),
                    &format!("node-{i}"),
                    Limit::Count(2),
                    Duration::from_secs(5),
                )
                .await,
            );
        }
        // All ten at once, on a budget that does not exist yet: the creates race.
        let attempts = futures::future::join_all(budgets.iter_mut().map(|b| b.try_take())).await;
        let mut held = Vec::new();
        let mut full = Vec::new();
        for a in attempts {
            match a.expect("the API answers") {
                Attempt::Held(s) => held.push(s),
                Attempt::Full(f) => full.push(f),
            }
        }
        assert_eq!(held.len(), 2, "exactly the budget's two slots are taken");
        let holders: Vec<String> = ["hotplug-agent-restart-0", "hotplug-agent-restart-1"]
            .iter()
            .map(|n| holder(&api, n).expect("the slot is held"))
            .collect();
        assert_ne!(holders[0], holders[1]);
        for f in &full {
            assert_eq!(f.slots, 2);
            // A loser that listed before the winners wrote sees fewer holders, never others.
            assert!(f.holders.iter().all(|h| holders.contains(h)), "{f:?}");
        }
        assert_eq!(api.leases(NS).len(), 2);

        // Given back: the next racers take them, again exactly two.
        for s in held.drain(..) {
            s.release().await.expect("releasing");
        }
        assert_eq!(holder(&api, "hotplug-agent-restart-0"), None);
        let mut rest: Vec<&mut Budget> = budgets
            .iter_mut()
            .filter(|b| !holders.iter().any(|h| h == b.holder()))
            .collect();
        let attempts = futures::future::join_all(rest.iter_mut().map(|b| b.try_take())).await;
        let taken: Vec<fleet::Slot> = attempts
            .into_iter()
            .filter_map(|a| match a.expect("the API answers") {
                Attempt::Held(s) => Some(s),
                Attempt::Full(_) => None,
            })
            .collect();
        assert_eq!(
            taken.len(),
            2,
            "the released slots are taken by updates, once each"
        );
        let lease = api.lease(NS, "hotplug-agent-restart-0").expect("lease");
        assert_eq!(lease["spec"]["leaseTransitions"], 1, "{lease}");
        assert_eq!(lease["spec"]["leaseDurationSeconds"], 5);
        assert_eq!(
            lease["metadata"]["labels"]["hotplug-agent.io/budget"],
            "restart"
        );

        // Losing a race, deterministically: the API answers 409 to the write on a slot
        // (as it does when another node wrote it first); the loser goes on to the other.
        for s in taken {
            s.release().await.expect("releasing");
        }
        let path = "/apis/coordination.k8s.io/v1/namespaces/default/leases";
        api.fail_next("PUT", path, 409, 1);
        let b = &mut budgets[0];
        let Attempt::Held(slot) = b.try_take().await.expect("a conflict is not an error") else {
            panic!("one of the two slots is free");
        };
        let puts = |api: &FakeApi| {
            api.requests()
                .iter()
                .filter(|(m, p)| m == "PUT" && p.starts_with(path))
                .count()
        };
        slot.release().await.expect("releasing");
        // Both writes lost: every slot is someone's, as far as this node can tell; it
        // retries soon rather than at an expiry, since the slots may well be free.
        api.fail_next("PUT", path, 409, 2);
        let before = puts(&api);
        let Ok(Attempt::Full(full)) = b.try_take().await else {
            panic!("both writes lost");
        };
        assert_eq!(puts(&api) - before, 2);
        assert!(full.holders.is_empty(), "{full:?}");
        assert!(full.retry_at <= Instant::now() + Duration::from_secs(1));
        // A create that lost (AlreadyExists) on a budget grown to three slots.
        let mut grown = budget(
            &api,
            dir.path(),
            "node-x",
            Limit::Count(3),
            Duration::from_secs(5),
        )
        .await;
        api.fail_next("PUT", path, 409, 2);
        api.fail_next("POST", path, 409, 1);
        assert!(matches!(grown.try_take().await, Ok(Attempt::Full(_))));
        assert!(api.lease(NS, "hotplug-agent-restart-2").is_none());
        let Attempt::Held(slot) = grown.try_take().await.expect("answers") else {
            panic!("three free slots");
        };
        slot.release().await.expect("releasing");
    });
}

/// A Lease held by a node that is gone, written with its clock an hour ahead.
async fn ghost_lease(c: &Client, renew: Timestamp) -> Lease {
    let leases: Api<Lease> = Api::namespaced(c.clone(), NS);
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": "hotplug-agent-restart-0", "labels": {"hotplug-agent.io/budget": "restart"}},
        "spec": {"holderIdentity": "ghost", "leaseDurationSeconds": 1, "leaseTransitions": 0,
                 "renewTime": MicroTime(renew)},
    }))
    .expect("a Lease");
    leases
        .create(&PostParams::default(), &lease)
        .await
        .expect("creating the ghost's lease")
}

#[test]
fn a_holder_that_never_renews_loses_its_slot_after_the_duration_whatever_its_clock() {
    rt().block_on(async {
        let api = FakeApi::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let c = api.client(dir.path()).await;
        // renewTime an hour in the future: a waiter trusting it would wait an hour.
        let ahead = Timestamp::now() + SignedDuration::from_hours(1);
        ghost_lease(&c, ahead).await;
        let mut b = budget(
            &api,
            dir.path(),
            "node-b",
            Limit::Count(1),
            Duration::from_secs(1),
        )
        .await;
        let start = Instant::now();
        let Attempt::Full(full) = b.try_take().await.expect("the API answers") else {
            panic!("the ghost's slot must not be free at first sight");
        };
        assert_eq!(full.holders, ["ghost"]);
        assert!(
            full.retry_at <= start + Duration::from_millis(1100),
            "one lease duration"
        );
        let slot = take_until(&mut b, start + Duration::from_secs(5))
            .await
            .expect("the slot is taken over once the ghost did not renew for its duration");
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited < Duration::from_secs(3),
            "taken over after {waited:?}"
        );
        let lease = api.lease(NS, &slot.lease).expect("lease");
        assert_eq!(lease["spec"]["holderIdentity"], "node-b");
        assert_eq!(lease["spec"]["leaseTransitions"], 1);
        slot.release().await.expect("releasing");
    });
}

#[test]
fn a_holder_whose_clock_is_an_hour_behind_keeps_its_slot_while_it_renews() {
    rt().block_on(async {
        let api = FakeApi::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let c = api.client(dir.path()).await;
        let behind = || Timestamp::now() - SignedDuration::from_hours(1);
        ghost_lease(&c, behind()).await;
        // The skewed holder renews every 300 ms (its duration is 1 s), an hour in the past.
        let leases: Api<Lease> = Api::namespaced(c.clone(), NS);
        let renewer = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let patch = json!({"spec": {"renewTime": MicroTime(behind())}});
                let _ = leases
                    .patch(
                        "hotplug-agent-restart-0",
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await;
            }
        });
        let mut b = budget(
            &api,
            dir.path(),
            "node-b",
            Limit::Count(1),
            Duration::from_secs(1),
        )
        .await;
        // Three lease durations: a waiter comparing renewTime with its own clock would have
        // taken the slot at once.
        let taken = take_until(&mut b, Instant::now() + Duration::from_secs(3)).await;
        assert!(taken.is_none(), "a renewing holder's slot was taken over");
        assert_eq!(
            holder(&api, "hotplug-agent-restart-0").as_deref(),
            Some("ghost")
        );
        renewer.abort();
        let stopped = Instant::now();
        let slot = take_until(&mut b, stopped + Duration::from_secs(5))
            .await
            .expect("taken over once the holder stopped renewing");
        assert!(
            stopped.elapsed() >= Duration::from_millis(700),
            "{:?}",
            stopped.elapsed()
        );
        slot.release().await.expect("releasing");
    });
}

#[test]
fn an_api_outage_while_a_slot_is_held_does_not_hand_it_over() {
    rt().block_on(async {
        let api = FakeApi::start().await;
        let dir = tempfile::tempdir().expect("tempdir");
        let lease = Duration::from_secs(2);
        let mut a = budget(&api, dir.path(), "node-a", Limit::Count(1), lease).await;
        let mut b = budget(&api, dir.path(), "node-b", Limit::Count(1), lease).await;
        let Attempt::Held(slot) = a.try_take().await.expect("the API answers") else {
            panic!("the first node takes the free slot");
        };
        assert!(matches!(b.try_take().await, Ok(Attempt::Full(_))));
        // The outage outlasts the lease: nobody can renew, nobody can read.
        api.stop().await;
        tokio::time::sleep(lease + Duration::from_secs(1)).await;
        assert!(b.try_take().await.is_err(), "the API is down");
        api.restart().await;
        // Back: b forgot what it saw before the outage, so the holder gets a whole duration
        // to renew (it does within a third of it) and b never takes the slot.
        let taken = take_until(&mut b, Instant::now() + lease + Duration::from_secs(1)).await;
        assert!(taken.is_none(), "the slot was handed over after the outage");
        assert_eq!(holder(&api, &slot.lease).as_deref(), Some("node-a"));
        assert!(!slot.lost());
        // Given back, it is b's at once.
        slot.release().await.expect("releasing");
        let slot = take_until(&mut b, Instant::now() + Duration::from_secs(2))
            .await
            .expect("the released slot");
        assert_eq!(holder(&api, &slot.lease).as_deref(), Some("node-b"));
    });
}

/// What one simulated fleet did.
struct FleetRun {
    nodes: usize,
    slots: u32,
    /// The most nodes between taking a slot and giving it back at once.
    max_concurrent: usize,
    /// From the hot-add to the last node converged.
    converged: Duration,
    lease_writes: usize,
}

/// `nodes` agents hit by the same hot-add at once; each restarts (a `restart` delay, then
/// its Node shows 8 GiB) inside a restart slot of `limit`.
async fn simulate(nodes: usize, limit: Limit, restart: Duration) -> FleetRun {
    let api = FakeApi::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let admin = api.client(dir.path()).await;
    let node_api: Api<Node> = Api::all(admin.clone());
    for i in 0..nodes {
        let name = format!("node-{i:03}");
        let node: Node = serde_json::from_value(json!({"metadata": {"name": name}})).expect("Node");
        node_api
            .create(&PostParams::default(), &node)
            .await
            .expect("creating a Node");
        let status = json!({"status": {"capacity": {"memory": (4 * GIB).to_string(), "cpu": "2"}}});
        node_api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .expect("posting the Node's status");
    }
    let inside = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let (go, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut agents = tokio::task::JoinSet::new();
    let mut slots_seen = Vec::new();
    for i in 0..nodes {
        let name = format!("node-{i:03}");
        let c = api.client(dir.path()).await;
        let mut b = Fleet::new(
            c.clone(),
            &config(limit, Duration::from_secs(10)),
            &name,
            // The agent's default: 200 nodes at once can keep the one fake busy for seconds.
            hotplug_agent::node::DEFAULT_API_TIMEOUT,
        )
        .restarts;
        let (inside, max) = (inside.clone(), max.clone());
        let mut go = go.subscribe();
        agents.spawn(async move {
            let _ = go.recv().await;
            let slot = take_until(&mut b, Instant::now() + Duration::from_secs(600))
                .await
                .expect("a slot within 10 minutes");
            let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(now, Ordering::SeqCst);
            // The kubelet restarts and posts the machine's new capacity.
            tokio::time::sleep(restart).await;
            let nodes: Api<Node> = Api::all(c);
            let status = json!({"status": {"capacity": {"memory": (8 * GIB).to_string()}}});
            nodes
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await
                .expect("the kubelet posts");
            // Verify: the Node shows it.
            let n = nodes.get(&name).await.expect("GET node");
            let mem = n
                .status
                .and_then(|s| s.capacity)
                .and_then(|c| c.get("memory").cloned());
            assert_eq!(mem.map(|q| q.0), Some((8 * GIB).to_string()));
            inside.fetch_sub(1, Ordering::SeqCst);
            let slots = slot.slots;
            slot.release().await.expect("giving the slot back");
            slots
        });
    }
    let start = Instant::now();
    go.send(()).expect("agents listen");
    while let Some(r) = agents.join_next().await {
        slots_seen.push(r.expect("an agent panicked"));
    }
    let converged = start.elapsed();
    // Every Node shows the hot-add and every slot is free again.
    for i in 0..nodes {
        let n = api.node(&format!("node-{i:03}")).expect("node");
        assert_eq!(
            n["status"]["capacity"]["memory"],
            (8 * GIB).to_string(),
            "{n}"
        );
    }
    for l in api.leases(NS) {
        assert!(
            l["spec"].get("holderIdentity").is_none_or(|h| h.is_null()),
            "{l}"
        );
    }
    let lease_writes = api
        .requests()
        .iter()
        .filter(|(m, p)| (m == "PUT" || m == "POST") && p.contains("/leases"))
        .count();
    if std::env::var_os("FLEET_DEBUG").is_some() {
        let mut counts = std::collections::BTreeMap::new();
        for (m, p) in api.requests() {
            let kind = if p.contains("watch=") {
                "WATCH"
            } else {
                m.as_str()
            };
            let what = if p.contains("/leases") {
                "leases"
            } else {
                "nodes"
            };
            *counts.entry(format!("{kind} {what}")).or_insert(0) += 1;
        }
        eprintln!("{counts:?}");
    }
    slots_seen.dedup();
    assert_eq!(slots_seen.len(), 1, "every node computed the same budget");
    FleetRun {
        nodes,
        slots: slots_seen[0],
        max_concurrent: max.load(Ordering::SeqCst),
        converged,
        lease_writes,
    }
}

#[test]
fn a_fleet_of_200_hit_by_one_hot_add_restarts_within_the_budget_and_converges() {
    let run = rt().block_on(simulate(
        200,
        Limit::Percent(10),
        Duration::from_millis(100),
    ));
    eprintln!(
        "200 nodes, budget 10% = {} slots: max concurrent {}, converged in {:?}, {} lease writes",
        run.slots, run.max_concurrent, run.converged, run.lease_writes
    );
    assert_eq!(run.slots, 20, "10 % of 200 nodes");
    assert!(
        run.max_concurrent <= 20,
        "{} restarts at once",
        run.max_concurrent
    );
    // The budget is used, not just respected: waiters take freed slots at once.
    assert!(
        run.max_concurrent >= 10,
        "only {} at once",
        run.max_concurrent
    );
    // 10 rounds of 100 ms restarts; measured ~15 s here (2 shared cores, the debug-build
    // fake serialising every Lease write to 200 watches). Waiters that missed releases and
    // waited for expiries instead (10 s each, 10 rounds) would take well over a minute.
    assert!(
        run.converged < Duration::from_secs(60),
        "{:?}",
        run.converged
    );
}

#[test]
#[ignore = "a benchmark: `cargo xtask bench -- fleet`"]
fn bench_fleet_convergence() {
    let nodes: usize = std::env::var("BENCH_FLEET_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let restart = Duration::from_millis(
        std::env::var("BENCH_FLEET_RESTART_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(200),
    );
    let mut rows = Vec::new();
    for limit in [
        Limit::Count(1),
        Limit::Count(5),
        Limit::Percent(10),
        Limit::Count(50),
        Limit::Percent(100),
    ] {
        let run = rt().block_on(simulate(nodes, limit, restart));
        assert!(run.max_concurrent <= run.slots as usize);
        eprintln!(
            "budget {limit} ({} slots): max concurrent {}, fleet converged in {:.2} s, {} lease writes",
            run.slots,
            run.max_concurrent,
            run.converged.as_secs_f64(),
            run.lease_writes
        );
        rows.push(json!({
            "budget": limit.to_string(), "slots": run.slots, "nodes": run.nodes,
            "max_concurrent": run.max_concurrent, "converged_ms": run.converged.as_millis() as u64,
            "ideal_ms": (nodes as u64).div_ceil(u64::from(run.slots)) * restart.as_millis() as u64,
            "lease_writes": run.lease_writes,
        }));
    }
    println!(
        "\nBENCH_FLEET_JSON {}",
        json!({"restart_ms": restart.as_millis() as u64, "rows": rows})
    );
}
