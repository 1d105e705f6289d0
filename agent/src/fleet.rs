//! Fleet budgets: at most N nodes of the cluster restart their kubelet (or drain) at the
//! same time, so that a hypervisor-wide hot-add does not become a thundering herd of
//! kubelets re-listing their pods, or a cluster-wide drain.
//!
//! The budget is held in the cluster itself, in `coordination.k8s.io/v1` Leases, as kured's
//! lock and client-go's leader election are: N slot Leases named `{prefix}-0` ..
//! `{prefix}-(N-1)` in the agent's namespace, each held by at most one node
//! (`spec.holderIdentity` = the node's name) and renewed while held. A slot is taken by a
//! create (409 AlreadyExists: someone else was first) or by an update carrying the
//! resourceVersion just read (409 Conflict: someone else was first); either way the loser
//! tries the next slot. No protocol of our own: the API server's compare-and-swap is the
//! only arbiter.
//!
//! **Expiry and clock skew.** A holder that crashed stops renewing, and its slot must come
//! free. As client-go's leader election does, a waiter judges that on its *own* monotonic
//! clock: a slot whose resourceVersion has not changed for a whole `leaseDurationSeconds`
//! since this waiter first saw that version is expired. `renewTime` is written for people
//! (`kubectl get lease`) and never compared with the local clock, so any offset between
//! the nodes' wall clocks is tolerated, however large; what must hold is that clocks run
//! at about the same *rate* (a holder renews every third of the duration, so a rate error
//! under 3x is harmless). A waiter that could not read the Leases (API down) forgets what
//! it observed: after an outage every holder gets a whole duration to renew again before
//! anyone takes its slot over.
//!
//! What a Lease cannot give: a holder cut off from the API for longer than the duration
//! while others can reach it loses its slot (it is told: [`Slot::lost`]), and the budget is
//! exceeded by one for the rest of its restart. That is the price of not deadlocking on a
//! dead holder, the same trade every Lease-based lock makes.
use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    str::FromStr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, pin_mut};
use k8s_openapi::{
    api::{
        coordination::v1::{Lease, LeaseSpec},
        core::v1::Node,
    },
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ListParams, PostParams, WatchEvent, WatchParams},
};
use tokio::time::Instant;

/// The label every slot Lease carries, with the budget's name as its value: the agents
/// list and watch their budget's slots by it.
pub const BUDGET_LABEL: &str = "hotplug-agent.io/budget";
const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "hotplug-agent");
/// How long a percentage budget trusts its count of the cluster's nodes.
const NODE_COUNT_TTL: Duration = Duration::from_secs(300);
/// Retrying a Lease write that met a concurrent one.
const WRITE_ATTEMPTS: usize = 5;
/// Slot writes one try may make: when hundreds of nodes want the same few slots, a node
/// that lost this many races backs off briefly instead of writing to every slot.
const WRITES_PER_TRY: usize = 3;
/// The most a waiter waits, after seeing a slot come free, before it tries for it. Spread
/// at random, so that of hundreds of waiters a few try (the first one's write reaches the
/// others' watches before most of them are due), not all.
const MAX_JITTER: Duration = Duration::from_millis(500);

/// A random duration in `[0, max)`: std's per-instance random hash keys are random enough
/// to spread nodes apart.
fn jitter(max: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    let r = RandomState::new().hash_one(std::time::SystemTime::now());
    max.mul_f64((r % 1_000_000) as f64 / 1_000_000.0)
}

/// Where a node starts looking among `slots`: nodes that start at once spread over the
/// slots rather than all writing to slot 0 first.
fn start_slot(holder: &str, slots: u32) -> u32 {
    // FNV-1a: stable across processes and releases, unlike std's hasher.
    let h = holder.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    (h % u64::from(slots.max(1))) as u32
}

/// Which action a budget limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// A kubelet restart (every refresh).
    Restart,
    /// A cordon and eviction (`--static-policy drain-and-reset`).
    Drain,
}

impl Action {
    pub fn name(self) -> &'static str {
        match self {
            Action::Restart => "restart",
            Action::Drain => "drain",
        }
    }

    /// The slot Leases are `{prefix}-{i}`.
    pub fn lease_prefix(self) -> &'static str {
        match self {
            Action::Restart => "hotplug-agent-restart",
            Action::Drain => "hotplug-agent-drain",
        }
    }
}

/// A budget: a number of nodes, or a percentage of the cluster's nodes (rounded up, at
/// least one: a budget of zero would deadlock the fleet).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Count(u32),
    Percent(u32),
}

impl Limit {
    /// The number of slots for a cluster of `nodes` nodes.
    pub fn slots(self, nodes: usize) -> u32 {
        match self {
            Limit::Count(n) => n.max(1),
            Limit::Percent(p) => {
                let n = (nodes as u64 * u64::from(p)).div_ceil(100);
                u32::try_from(n).unwrap_or(u32::MAX).max(1)
            }
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LimitError {
    #[error("{0:?}: expected a count (3) or a percentage of the nodes (10%)")]
    Syntax(String),
    #[error("{0:?}: a budget of zero would stop every node forever; the minimum is 1")]
    Zero(String),
    #[error("{0:?}: a percentage is at most 100%")]
    OverHundred(String),
}

impl FromStr for Limit {
    type Err = LimitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let (digits, percent) = match t.strip_suffix('%') {
            Some(d) => (d.trim(), true),
            None => (t, false),
        };
        let n: u32 = digits
            .parse()
            .map_err(|_| LimitError::Syntax(s.to_owned()))?;
        match (n, percent) {
            (0, _) => Err(LimitError::Zero(s.to_owned())),
            (101.., true) => Err(LimitError::OverHundred(s.to_owned())),
            (n, true) => Ok(Limit::Percent(n)),
            (n, false) => Ok(Limit::Count(n)),
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// The budgets of `hotplug-agent run`.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the slot Leases live; `None`: the client's default namespace (in a pod, its
    /// service account's).
    pub namespace: Option<String>,
    pub restarts: Limit,
    pub drains: Limit,
    /// A slot not renewed for this long is taken over (whole seconds, at least 1: the
    /// Lease's `leaseDurationSeconds`).
    pub lease_duration: Duration,
}

pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(30);

impl Default for Config {
    fn default() -> Self {
        Self {
            namespace: None,
            restarts: Limit::Percent(10),
            drains: Limit::Count(1),
            lease_duration: DEFAULT_LEASE_DURATION,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{call} {target}")]
    Api {
        call: &'static str,
        target: String,
        #[source]
        source: kube::Error,
    },
    #[error("the API server did not answer {call} {target} within {after:?}")]
    Timeout {
        call: &'static str,
        target: String,
        after: Duration,
    },
    #[error("lease {0}: every write met a concurrent one; giving up for now")]
    Contended(String),
}

/// The slots this agent holds, shared so that shutdown can give them back whatever task
/// held them.
type Registry = Arc<Mutex<HashMap<String, Api<Lease>>>>;

/// The budgets of one agent.
#[derive(Clone)]
pub struct Fleet {
    pub restarts: Budget,
    pub drains: Budget,
    held: Registry,
}

impl Fleet {
    pub fn new(client: Client, config: &Config, holder: &str, api_timeout: Duration) -> Self {
        let ns = config
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let held = Registry::default();
        let budget = |action, limit| Budget {
            leases: Api::namespaced(client.clone(), &ns),
            nodes: Api::all(client.clone()),
            action,
            limit,
            holder: holder.to_owned(),
            duration: config.lease_duration.max(Duration::from_secs(1)),
            timeout: api_timeout,
            observed: HashMap::new(),
            nodes_seen: None,
            list_rv: Arc::default(),
            freed: Arc::default(),
            last_slots: 1,
            held: held.clone(),
        };
        Self {
            restarts: budget(Action::Restart, config.restarts),
            drains: budget(Action::Drain, config.drains),
            held,
        }
    }

    /// A copy of one budget, to wait on its changes apart from the controller.
    pub fn clone_budget(&self, action: Action) -> Budget {
        match action {
            Action::Restart => self.restarts.clone(),
            Action::Drain => self.drains.clone(),
        }
    }

    pub fn budget(&mut self, action: Action) -> &mut Budget {
        match action {
            Action::Restart => &mut self.restarts,
            Action::Drain => &mut self.drains,
        }
    }

    /// Gives back every slot still held (shutdown), each within the API timeout.
    pub async fn release_all(&self, holder: &str, timeout: Duration) {
        let held: Vec<(String, Api<Lease>)> = lock(&self.held).drain().collect();
        for (name, api) in held {
            if let Err(e) = release(&api, &name, holder, timeout).await {
                tracing::warn!(lease = %name, error = %crate::sources::error_chain(&e), "releasing the slot at shutdown");
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One budget (restarts or drains) as this agent sees it.
#[derive(Clone)]
pub struct Budget {
    leases: Api<Lease>,
    nodes: Api<Node>,
    action: Action,
    limit: Limit,
    holder: String,
    duration: Duration,
    timeout: Duration,
    /// Slot -> (the resourceVersion last seen, when this agent first saw it).
    observed: HashMap<String, (String, Instant)>,
    /// (node count, when counted), for a percentage.
    nodes_seen: Option<(usize, Instant)>,
    /// The resourceVersion to watch from: the last list's, moved on by every watch event
    /// seen since (shared with [`Budget::changed`]'s detached future), so that a new wait
    /// does not replay what the last one already saw.
    list_rv: Arc<Mutex<Option<String>>>,
    /// A slot [`Budget::changed`] saw come free (shared with its detached future): the
    /// next try writes to it at once, without a LIST.
    freed: Arc<Mutex<Option<Lease>>>,
    /// The slot count of the last try.
    last_slots: u32,
    held: Registry,
}

/// A taken slot; renewed in the background until released. Dropping it stops the
/// renewal (the Lease then expires); [`Slot::release`] gives it back at once.
pub struct Slot {
    pub lease: String,
    pub slots: u32,
    api: Api<Lease>,
    holder: String,
    lost: Arc<AtomicBool>,
    renewer: tokio::task::AbortHandle,
    held: Registry,
    timeout: Duration,
}

/// Every slot is held by someone else.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Full {
    pub slots: u32,
    /// Who holds them (the holders' identities), sorted.
    pub holders: Vec<String>,
    /// When the earliest slot could expire, if its holder stops renewing.
    pub retry_at: Instant,
}

#[expect(
    clippy::large_enum_variant,
    reason = "one value per try, moved once into the holder: boxing buys nothing"
)]
pub enum Attempt {
    Held(Slot),
    Full(Full),
}

impl Budget {
    pub fn action(&self) -> Action {
        self.action
    }

    pub fn holder(&self) -> &str {
        &self.holder
    }

    async fn within<T>(
        &self,
        call: &'static str,
        target: &str,
        request: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, FleetError> {
        within(self.timeout, call, target, request).await
    }

    async fn slot_count(&mut self) -> Result<u32, FleetError> {
        if let Limit::Count(_) = self.limit {
            return Ok(self.limit.slots(0));
        }
        let fresh = self
            .nodes_seen
            .filter(|(_, at)| at.elapsed() < NODE_COUNT_TTL);
        let count = match fresh {
            Some((n, _)) => n,
            None => {
                let list = self
                    .within(
                        "LIST",
                        "nodes",
                        self.nodes.list_metadata(&ListParams::default()),
                    )
                    .await?;
                self.nodes_seen = Some((list.items.len(), Instant::now()));
                list.items.len()
            }
        };
        Ok(self.limit.slots(count))
    }

    /// Takes a free, released or expired slot, or says who holds them all. One LIST, then
    /// at most one write per slot tried.
    pub async fn try_take(&mut self) -> Result<Attempt, FleetError> {
        let freed = lock(&self.freed).take();
        if let Some(lease) = freed {
            // One write to the slot seen free, without a LIST; lost: the full try below,
            // since other slots may have come free meanwhile.
            let name = lease.metadata.name.clone().unwrap_or_default();
            let slots = self.last_slots;
            let taken = match lease.metadata.resource_version {
                Some(_) => self.take_over(lease).await,
                // Deleted: create it again.
                None => self.create(&name).await,
            };
            if let Ok(true) = taken {
                return Ok(Attempt::Held(self.start_renewing(name, slots)));
            }
        }
        let result = self.try_take_inner().await;
        if result.is_err() {
            // What was observed before the API failed says nothing about whether the
            // holders renew: start every expiry clock again once it answers.
            self.observed.clear();
        }
        result
    }

    async fn try_take_inner(&mut self) -> Result<Attempt, FleetError> {
        let slots = self.slot_count().await?;
        self.last_slots = slots;
        let params =
            ListParams::default().labels(&format!("{BUDGET_LABEL}={}", self.action.name()));
        let list = self
            .within("LIST", "leases", self.leases.list(&params))
            .await?;
        *lock(&self.list_rv) = list.metadata.resource_version.clone();
        let mut by_name: HashMap<String, Lease> = list
            .items
            .into_iter()
            .filter_map(|l| l.metadata.name.clone().map(|n| (n, l)))
            .collect();
        let now = Instant::now();
        let mut holders = BTreeSet::new();
        let mut retry_at = now + self.duration;
        // A slot this node already holds (the agent restarted mid-restart) is its own.
        let mine = (0..slots).map(|i| self.lease_name(i)).find(|n| {
            by_name
                .get(n)
                .is_some_and(|l| holder_of(l) == Some(&self.holder))
        });
        let first = start_slot(&self.holder, slots);
        let order: Vec<String> = match mine {
            Some(n) => vec![n],
            None => (0..slots)
                .map(|i| self.lease_name((first + i) % slots))
                .collect(),
        };
        let mut writes = 0;
        for name in order {
            if writes == WRITES_PER_TRY {
                break;
            }
            let lease = by_name.remove(&name);
            let taken = match lease {
                None => {
                    writes += 1;
                    self.create(&name).await?
                }
                Some(lease) => {
                    let rv = lease.metadata.resource_version.clone().unwrap_or_default();
                    let seen = self
                        .observed
                        .entry(name.clone())
                        .and_modify(|(v, at)| {
                            if *v != rv {
                                *v = rv.clone();
                                *at = now;
                            }
                        })
                        .or_insert_with(|| (rv.clone(), now))
                        .1;
                    let duration = lease
                        .spec
                        .as_ref()
                        .and_then(|s| s.lease_duration_seconds)
                        .and_then(|s| u64::try_from(s).ok())
                        .map_or(self.duration, Duration::from_secs);
                    let expires = seen + duration;
                    match holder_of(&lease) {
                        Some(h) if *h != self.holder && now < expires => {
                            holders.insert(h.to_owned());
                            retry_at = retry_at.min(expires);
                            false
                        }
                        _ => {
                            writes += 1;
                            self.take_over(lease).await?
                        }
                    }
                }
            };
            if taken {
                self.observed.remove(&name);
                return Ok(Attempt::Held(self.start_renewing(name, slots)));
            }
        }
        if writes > 0 {
            // Lost every race: slots may still be free (or not exist yet, which no watch
            // would announce), so look again soon, not at the next expiry.
            retry_at = now + jitter(self.jitter());
        }
        Ok(Attempt::Full(Full {
            slots,
            holders: holders.into_iter().collect(),
            retry_at,
        }))
    }

    fn jitter(&self) -> Duration {
        MAX_JITTER.min(self.duration / 4)
    }

    fn lease_name(&self, i: u32) -> String {
        format!("{}-{i}", self.action.lease_prefix())
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().clamp(1, i32::MAX as u64) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Ok(false): someone created it first.
    async fn create(&self, name: &str) -> Result<bool, FleetError> {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                labels: Some(
                    [
                        (BUDGET_LABEL.to_owned(), self.action.name().to_owned()),
                        (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            spec: Some(self.spec(0, None)),
        };
        match self
            .within(
                "CREATE lease",
                name,
                self.leases.create(&PostParams::default(), &lease),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Takes a free, own or expired slot: a replace guarded by its resourceVersion.
    /// Ok(false): someone else wrote it first.
    async fn take_over(&self, mut lease: Lease) -> Result<bool, FleetError> {
        let name = lease.metadata.name.clone().unwrap_or_default();
        let old = lease.spec.take().unwrap_or_default();
        let same = old.holder_identity.as_deref() == Some(self.holder.as_str());
        let transitions = old.lease_transitions.unwrap_or(0) + i32::from(!same);
        lease.spec = Some(self.spec(transitions, same.then_some(old.acquire_time).flatten()));
        match self
            .within(
                "UPDATE lease",
                &name,
                self.leases.replace(&name, &PostParams::default(), &lease),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn start_renewing(&self, lease: String, slots: u32) -> Slot {
        let lost = Arc::new(AtomicBool::new(false));
        let api = self.leases.clone();
        let (holder, timeout) = (self.holder.clone(), self.timeout);
        // A third of the duration: two renewals may fail before anyone may take over.
        let every = self.duration / 3;
        let task = tokio::spawn({
            let (api, lease, lost, holder) =
                (api.clone(), lease.clone(), lost.clone(), holder.clone());
            async move {
                loop {
                    tokio::time::sleep(every).await;
                    match renew(&api, &lease, &holder, timeout).await {
                        Ok(true) => {}
                        Ok(false) => {
                            tracing::warn!(%lease, "the fleet budget slot was taken over while held (the API was out of reach for longer than its duration)");
                            lost.store(true, Ordering::Relaxed);
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(%lease, error = %crate::sources::error_chain(&e), "renewing the slot failed; retrying");
                        }
                    }
                }
            }
        });
        lock(&self.held).insert(lease.clone(), api.clone());
        Slot {
            lease,
            slots,
            api,
            holder,
            lost,
            renewer: task.abort_handle(),
            held: self.held.clone(),
            timeout,
        }
    }

    /// Completes when a slot of this budget has come free (given back or deleted) and is
    /// still free after a random pause of up to half a second, or at `until`. Watched from
    /// the last list, not polled. Renewals do not wake it, and most waiters see the first
    /// one's write before their pause ends: a release costs a few LISTs and writes, not one
    /// from every waiter. Expiry is the caller's timer's job ([`Full::retry_at`]), and so
    /// is every error.
    pub fn changed(&self, until: Instant) -> impl Future<Output = ()> + use<> {
        let api = self.leases.clone();
        let seen_rv = self.list_rv.clone();
        let rv = lock(&seen_rv).clone();
        let label = format!("{BUDGET_LABEL}={}", self.action.name());
        let max_jitter = self.jitter();
        let freed = self.freed.clone();
        // Each node has a home slot (where its tries start): it tries for a freed home
        // slot first, for any other only after twice the longest pause. So a release is
        // contended by the tenth or so of the waiters at home there, not all of them, and
        // a slot whose home waiters are all done still gets used.
        let home = self.lease_name(start_slot(&self.holder, self.last_slots));
        let pause = move |name: &str| {
            let away = if name == home {
                Duration::ZERO
            } else {
                max_jitter * 2
            };
            Instant::now() + away + jitter(max_jitter)
        };
        async move {
            let Some(rv) = rv else {
                return tokio::time::sleep_until(until).await;
            };
            let left = until.saturating_duration_since(Instant::now());
            let params = WatchParams::default()
                .labels(&label)
                .timeout(left.as_secs().clamp(1, 290) as u32);
            let watch = async {
                let Ok(stream) = api.watch(&params, &rv).await else {
                    return std::future::pending().await;
                };
                pin_mut!(stream);
                // Slots seen free (as last seen), and when this waiter will try for them.
                let mut free: HashMap<String, (Lease, Instant)> = HashMap::new();
                loop {
                    let due = free
                        .iter()
                        .min_by_key(|(_, (_, at))| *at)
                        .map(|(n, (_, at))| (n.clone(), *at));
                    let next = async {
                        match &due {
                            Some((_, at)) => tokio::time::timeout_at(*at, stream.next()).await.ok(),
                            None => Some(stream.next().await),
                        }
                    };
                    let event = next.await;
                    if let Some(Some(Ok(
                        WatchEvent::Added(l) | WatchEvent::Modified(l) | WatchEvent::Deleted(l),
                    ))) = &event
                    {
                        *lock(&seen_rv) = l.metadata.resource_version.clone();
                    }
                    match event {
                        // A free slot's pause is over and nobody took it meanwhile.
                        None => {
                            let (name, _) = due.expect("a timeout needs a due slot");
                            *lock(&freed) = free.remove(&name).map(|(l, _)| l);
                            return;
                        }
                        Some(Some(Ok(WatchEvent::Deleted(mut l)))) => {
                            let name = l.metadata.name.clone().unwrap_or_default();
                            // Gone: the next try creates it.
                            l.metadata.resource_version = None;
                            let at = pause(&name);
                            free.entry(name).or_insert((l, at));
                        }
                        Some(Some(Ok(WatchEvent::Added(l) | WatchEvent::Modified(l)))) => {
                            let name = l.metadata.name.clone().unwrap_or_default();
                            if holder_of(&l).is_none() {
                                let at =
                                    free.get(&name).map_or_else(|| pause(&name), |(_, at)| *at);
                                free.insert(name, (l, at));
                            } else {
                                free.remove(&name);
                            }
                        }
                        Some(Some(Ok(WatchEvent::Bookmark(_)))) => {}
                        // A 410 or a broken stream: retrying is the caller's timer's job.
                        Some(Some(Ok(WatchEvent::Error(_)) | Err(_)) | None) => {
                            return std::future::pending().await;
                        }
                    }
                }
            };
            let _ = tokio::time::timeout_at(until, watch).await;
        }
    }
}

impl Slot {
    /// The slot was taken over by another node while held (see the module's notes).
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// Gives the slot back (the holder cleared, so the next waiter need not wait for the
    /// duration to pass).
    pub async fn release(self) -> Result<(), FleetError> {
        self.renewer.abort();
        lock(&self.held).remove(&self.lease);
        release(&self.api, &self.lease, &self.holder, self.timeout).await
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.renewer.abort();
    }
}

fn holder_of(lease: &Lease) -> Option<&String> {
    lease
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.as_ref())
        .filter(|h| !h.is_empty())
}

fn is_conflict(e: &FleetError) -> bool {
    matches!(e, FleetError::Api { source: kube::Error::Api(s), .. } if s.code == 409)
}

async fn within<T>(
    timeout: Duration,
    call: &'static str,
    target: &str,
    request: impl Future<Output = Result<T, kube::Error>>,
) -> Result<T, FleetError> {
    match tokio::time::timeout(timeout, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(FleetError::Api {
            call,
            target: target.to_owned(),
            source,
        }),
        Err(_) => Err(FleetError::Timeout {
            call,
            target: target.to_owned(),
            after: timeout,
        }),
    }
}

/// Ok(false): the Lease is no longer ours.
async fn renew(
    api: &Api<Lease>,
    name: &str,
    holder: &str,
    timeout: Duration,
) -> Result<bool, FleetError> {
    update_own(api, name, holder, timeout, |_| {}).await
}

/// Gives the slot back; a Lease that is no longer ours is left alone.
async fn release(
    api: &Api<Lease>,
    name: &str,
    holder: &str,
    timeout: Duration,
) -> Result<(), FleetError> {
    let free = |spec: &mut LeaseSpec| {
        spec.holder_identity = None;
        spec.acquire_time = None;
    };
    update_own(api, name, holder, timeout, free).await.map(drop)
}

/// Updates our own Lease: `edit`, and `renewTime` now, guarded by the resourceVersion just
/// read (a conflict reads it again). Ok(false): it is no longer ours, left alone.
async fn update_own(
    api: &Api<Lease>,
    name: &str,
    holder: &str,
    timeout: Duration,
    edit: impl Fn(&mut LeaseSpec),
) -> Result<bool, FleetError> {
    for _ in 0..WRITE_ATTEMPTS {
        let mut lease = within(timeout, "GET lease", name, api.get(name)).await?;
        if holder_of(&lease).map(String::as_str) != Some(holder) {
            return Ok(false);
        }
        if let Some(spec) = lease.spec.as_mut() {
            edit(spec);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
        }
        match within(
            timeout,
            "UPDATE lease",
            name,
            api.replace(name, &PostParams::default(), &lease),
        )
        .await
        {
            Ok(_) => return Ok(true),
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(FleetError::Contended(name.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_and_round_up_to_at_least_one() {
        assert_eq!("3".parse(), Ok(Limit::Count(3)));
        assert_eq!(" 10% ".parse(), Ok(Limit::Percent(10)));
        assert!(matches!("0".parse::<Limit>(), Err(LimitError::Zero(_))));
        assert!(matches!("0%".parse::<Limit>(), Err(LimitError::Zero(_))));
        assert!(matches!(
            "150%".parse::<Limit>(),
            Err(LimitError::OverHundred(_))
        ));
        assert!(matches!("ten".parse::<Limit>(), Err(LimitError::Syntax(_))));
        assert!(matches!("-1".parse::<Limit>(), Err(LimitError::Syntax(_))));
        assert_eq!(Limit::Percent(10).slots(200), 20);
        assert_eq!(Limit::Percent(10).slots(201), 21);
        assert_eq!(Limit::Percent(10).slots(3), 1);
        assert_eq!(Limit::Percent(10).slots(0), 1);
        assert_eq!(Limit::Count(5).slots(2), 5);
        assert_eq!(Limit::Percent(10).to_string(), "10%");
    }
}
