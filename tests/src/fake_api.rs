//! An in-process fake kube-apiserver (plain HTTP on 127.0.0.1) for a node agent that
//! talks to Kubernetes with the `kube` crate.
//!
//! It runs on its own thread and tokio runtime, so a test may block (wait for a child
//! process, sleep) without starving it, and a test with paused tokio time does not
//! freeze it. It behaves like a separate process that shares its state with the test.
//!
//! # What it reproduces
//! - Nodes (cluster-scoped): GET, list, watch, POST, PUT, PATCH, DELETE, and the
//!   `status` subresource (GET/PUT/PATCH). The main resource ignores `.status` changes,
//!   the subresource keeps only them (the registries' `PrepareForUpdate`).
//! - Patch types: merge (RFC 7386), strategic merge with Node/Pod `patchMergeKey`s
//!   (`status.conditions` and `status.addresses` by `type`) and the `$patch`,
//!   `$setElementOrder`, `$retainKeys`, `$deleteFromPrimitiveList` directives, JSON patch
//!   (RFC 6902), and server-side apply (requires `fieldManager`, `apiVersion` and `kind`;
//!   creates a missing object). Anything else: 415.
//! - One global resourceVersion, bumped by every write; a write that changes nothing
//!   keeps it and emits no event. A write carrying a stale `metadata.resourceVersion`
//!   gets 409 Conflict. uid and creationTimestamp are set on create and immutable.
//! - Quantities in `status.capacity`/`allocatable` are validated (422) and stored in
//!   canonical form (`1048576Ki` reads back as `1Gi`), as decoding into Go types does.
//! - Watches from a resourceVersion with a bounded history and 410 Expired for older
//!   ones, synthetic ADDED events without one, selector-aware ADDED/DELETED, the
//!   `sendInitialEvents` bookmark, `timeoutSeconds` (details in the `watch` module).
//! - Lists with `metadata.resourceVersion` and `fieldSelector`/equality `labelSelector`.
//! - Events in core/v1 and events.k8s.io/v1 (one stored object, both views, as the real
//!   conversion), with the namespace rules of event validation (an Event about a Node
//!   belongs in `default`) and the stricter events.k8s.io/v1 rules.
//! - Pods (injected by tests) listed by `spec.nodeName`, and the Eviction subresource:
//!   201 and the pod is deleted (or, after [`FakeApi::hold_evictions`], marked terminating
//!   until the test deletes it), or 429 TooManyRequests naming the disruption budget.
//! - coordination.k8s.io/v1 Leases (namespaced): create, get, list, watch, PUT, PATCH,
//!   delete. A PUT carrying a stale `metadata.resourceVersion` gets 409 Conflict and a
//!   create of an existing name 409 AlreadyExists, with the real group-qualified messages
//!   (`leases.coordination.k8s.io "x" already exists`): the compare-and-swap that
//!   client-go's leader election and kured's lock build on. `spec.leaseDurationSeconds`
//!   must be positive and `spec.leaseTransitions` not negative (422 otherwise); as on the
//!   real server, nothing ever expires a Lease: expiry is the clients' reading of
//!   `renewTime` + `leaseDurationSeconds`.
//! - `/version`, `/api`, `/apis`, `/api/v1`, `/apis/events.k8s.io/v1`,
//!   `/apis/coordination.k8s.io/v1`, `/healthz`.
//! - Errors as `Status` objects with the real codes, reasons and message formats.
//! - [`FakeApi::stop`] closes the listener and every connection (clients get connection
//!   errors, watches end); [`FakeApi::restart`] serves the same state on the same port.
//!
//! # What it does not
//! No authentication, authorisation, admission, TLS, HTTP/2, protobuf, YAML bodies,
//! managedFields (apply is a strategic merge: fields dropped from a later apply stay),
//! finalizers or graceful deletion (evicted pods vanish at once unless held), the Lease admission
//! rules of the real server's identity leases (`kube-node-lease`), periodic watch
//! bookmarks, pagination (`limit` is ignored, everything comes in one page),
//! `resourceVersionMatch` (lists are always current), other kinds (404, recorded in
//! [`FakeApi::unhandled`]). The Node status subresource of a real server also lets
//! labels and annotations through; the fake keeps only `.status`, the stricter reading.
//! Field selectors work on any path, where the real server allows only a few per kind.
//! Watches without `timeoutSeconds` last 1800 s (the real server: 1800-3600 s).
//!
//! # Notes for tests
//! - kube 5 clients retry 429, 503 and 504 up to 15 times with exponential back-off by
//!   default (`kube::Config::default_retry`): a blocked eviction, or a 503 from
//!   [`FakeApi::fail_next`], takes minutes to surface as an error unless that is off.
//!   This is the real client against a real server too.
//! - The `wait_*` helpers wake on every write but time out on the caller's tokio clock.

mod error;
mod patch;
mod quantity;
mod resources;
mod routes;
mod selector;
mod store;
mod watch;

use std::{io, net::SocketAddr, path::Path, sync::Arc, thread::JoinHandle, time::Duration};

use http_body_util::combinators::UnsyncBoxBody;
use hyper::{body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::{
    net::{TcpListener, TcpSocket},
    sync::{mpsc, oneshot},
    task::JoinSet,
};

#[cfg(test)]
pub(crate) use self::patch::{ListStrategy, strategic_merge};
pub(crate) use self::selector::Selector;
use self::{
    resources::{Group, Kind, view},
    store::{Failure, Key, Shared},
};

type Body = UnsyncBoxBody<Bytes, std::convert::Infallible>;

enum Control {
    Stop(oneshot::Sender<()>),
    Restart(oneshot::Sender<io::Result<()>>),
}

/// The fake API server; stopped for good when dropped.
pub struct FakeApi {
    shared: Arc<Shared>,
    control: Option<mpsc::UnboundedSender<Control>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Binds 127.0.0.1 on a free port and starts serving.
    pub async fn start() -> FakeApi {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let addr = listener.local_addr().expect("the listener's address");
        let shared = Arc::new(Shared::new(addr));
        let (control, commands) = mpsc::unbounded_channel();
        let server_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("the fake API server's runtime");
                runtime.block_on(control_loop(listener, server_shared, commands));
            })
            .expect("spawning the fake API server thread");
        FakeApi {
            shared,
            control: Some(control),
            thread: Some(thread),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.shared.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.shared.addr
    }

    /// A kube client built the way the agent builds one, from a kubeconfig file in `dir`
    /// (written once, whole: simulated nodes build theirs at the same time), without
    /// kube's own retries: a stopped API or a blocked eviction must come back at once, not
    /// after minutes of back-off.
    pub async fn client(&self, dir: &Path) -> kube::Client {
        use std::sync::atomic::{AtomicU64, Ordering};
        static TMP: AtomicU64 = AtomicU64::new(0);
        let path = dir.join("kubeconfig");
        if !path.exists() {
            let tmp = dir.join(format!(
                "kubeconfig.{}.tmp",
                TMP.fetch_add(1, Ordering::Relaxed)
            ));
            self.write_kubeconfig(&tmp);
            std::fs::rename(&tmp, &path).expect("moving the kubeconfig into place");
        }
        let kubeconfig =
            kube::config::Kubeconfig::read_from(&path).expect("reading the kubeconfig");
        let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("loading the kubeconfig");
        config.default_retry = false;
        assert_eq!(config.default_namespace, "default");
        assert_eq!(
            config.cluster_url.to_string().trim_end_matches('/'),
            self.url()
        );
        kube::Client::try_from(config).expect("building the client")
    }

    /// Writes a kubeconfig for [`url`](Self::url): no credentials, its context current,
    /// namespace `default`. Works with kubectl too, for poking at a test by hand.
    pub fn write_kubeconfig(&self, path: &Path) {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\npreferences: {{}}\n",
            self.url()
        );
        std::fs::write(path, text)
            .unwrap_or_else(|e| panic!("writing the kubeconfig {}: {e}", path.display()));
    }

    fn send(&self, command: Control) {
        self.control
            .as_ref()
            .and_then(|c| c.send(command).ok())
            .expect("the fake API server thread is gone");
    }

    /// The API goes down: the listener closes and every open connection (watches
    /// included) is cut. The state is kept.
    pub async fn stop(&self) {
        let (done, wait) = oneshot::channel();
        self.send(Control::Stop(done));
        wait.await.expect("the fake API server thread is gone");
    }

    /// Serves again on the same port with the same state (a no-op if running).
    pub async fn restart(&self) {
        let (done, wait) = oneshot::channel();
        self.send(Control::Restart(done));
        wait.await
            .expect("the fake API server thread is gone")
            .unwrap_or_else(|e| panic!("listening on {} again: {e}", self.shared.addr));
    }

    /// The Node as a GET would return it.
    pub fn node(&self, name: &str) -> Option<Value> {
        let key = Key {
            kind: Kind::Node,
            ns: String::new(),
            name: name.to_owned(),
        };
        self.shared
            .read(|st| st.get(&key))
            .map(|n| view(Kind::Node, Group::Core, &n))
    }

    /// Every Event (created through either API group), in core/v1 form, in creation
    /// order, each as it is now (after any PATCH, e.g. a series count).
    pub fn events(&self) -> Vec<Value> {
        self.shared
            .read(|st| st.events())
            .iter()
            .map(|e| view(Kind::Event, Group::Core, e))
            .collect()
    }

    /// Every request received: (method, path with query), in order.
    pub fn requests(&self) -> Vec<(String, String)> {
        self.shared.read(|st| st.requests.clone())
    }

    /// The requests whose `User-Agent` starts with `prefix` (`hotplug-agent/`: the agent's,
    /// not the kubelet stand-in's nor the test's own), as [`requests`](Self::requests).
    pub fn requests_from(&self, prefix: &str) -> Vec<(String, String)> {
        self.shared.read(|st| {
            st.requests
                .iter()
                .zip(&st.user_agents)
                .filter(|(_, ua)| ua.starts_with(prefix))
                .map(|(r, _)| r.clone())
                .collect()
        })
    }

    /// The pod LISTs and WATCHes among `requests` (from [`requests`](Self::requests) or
    /// [`requests_from`](Self::requests_from)), as (LISTs, WATCHes).
    pub fn pod_lists_and_watches(requests: &[(String, String)]) -> (usize, usize) {
        let pods: Vec<&(String, String)> = requests
            .iter()
            .filter(|(m, p)| m == "GET" && p.starts_with("/api/v1/pods?"))
            .collect();
        let watches = pods
            .iter()
            .filter(|(_, p)| p.contains("watch=true"))
            .count();
        (pods.len() - watches, watches)
    }

    /// The requests no handler serves (answered 404): calls a test did not expect.
    pub fn unhandled(&self) -> Vec<(String, String)> {
        self.shared.read(|st| st.unhandled.clone())
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.read(|st| st.rv)
    }

    /// Drops the watch history, as an etcd compaction does: a watch from any older
    /// resourceVersion now gets 410 Expired.
    pub fn compact(&self) {
        self.shared.write(|st| st.compact());
    }

    /// The Lease as a GET would return it.
    pub fn lease(&self, ns: &str, name: &str) -> Option<Value> {
        let key = Key {
            kind: Kind::Lease,
            ns: ns.to_owned(),
            name: name.to_owned(),
        };
        self.shared
            .read(|st| st.get(&key))
            .map(|l| view(Kind::Lease, Group::Coordination, &l))
    }

    /// Every Lease in `ns`, by name.
    pub fn leases(&self, ns: &str) -> Vec<Value> {
        self.shared
            .read(|st| st.list(Kind::Lease, Some(ns), &Selector::default()))
            .iter()
            .map(|l| view(Kind::Lease, Group::Coordination, l))
            .collect()
    }

    /// Stores a Pod as if it had been scheduled (status kept; namespace `default` when
    /// unset). Panics if it is invalid or exists.
    pub fn add_pod(&self, pod: Value) {
        let ns = pod
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("default")
            .to_owned();
        let mut pod = resources::from_view(Kind::Pod, Group::Core, pod);
        pod["metadata"]["namespace"] = Value::String(ns.clone());
        self.shared
            .write(|st| st.create(Kind::Pod, Group::Core, &ns, pod, false))
            .unwrap_or_else(|e| panic!("add_pod: {}", e.message));
    }

    pub fn pod(&self, ns: &str, name: &str) -> Option<Value> {
        let key = Key {
            kind: Kind::Pod,
            ns: ns.to_owned(),
            name: name.to_owned(),
        };
        self.shared
            .read(|st| st.get(&key))
            .map(|p| view(Kind::Pod, Group::Core, &p))
    }

    /// From now on, evicting this pod answers 429 as a PodDisruptionBudget would.
    pub fn block_evictions(&self, ns: &str, name: &str) {
        self.shared.write(|st| {
            st.blocked_evictions
                .insert((ns.to_owned(), name.to_owned()))
        });
    }

    /// From now on, evicting this pod deletes it gracefully, as a real server does with a
    /// pod that has a termination grace period: it gets `deletionTimestamp` and stays
    /// (terminating) until [`delete_pod`](Self::delete_pod), the kubelet's final delete.
    pub fn hold_evictions(&self, ns: &str, name: &str) {
        self.shared
            .write(|st| st.held_evictions.insert((ns.to_owned(), name.to_owned())));
    }

    /// Deletes a pod at once (a watch sees DELETED); `false` if there was none.
    pub fn delete_pod(&self, ns: &str, name: &str) -> bool {
        let key = Key {
            kind: Kind::Pod,
            ns: ns.to_owned(),
            name: name.to_owned(),
        };
        self.shared.write(|st| st.delete(&key)).is_ok()
    }

    pub fn unblock_evictions(&self, ns: &str, name: &str) {
        self.shared.write(|st| {
            st.blocked_evictions
                .remove(&(ns.to_owned(), name.to_owned()))
        });
    }

    /// The next `times` requests with this method whose path starts with `path_prefix`
    /// answer `code` with a Status body, before any other processing (they are still
    /// recorded in [`requests`](Self::requests)).
    pub fn fail_next(&self, method: &str, path_prefix: &str, code: u16, times: usize) {
        self.shared.write(|st| {
            st.failures.push(Failure {
                method: method.to_owned(),
                prefix: path_prefix.to_owned(),
                exact: false,
                code,
                remaining: times,
            })
        });
    }

    /// As [`fail_next`](Self::fail_next), for requests whose path (without the query) is
    /// exactly `path`: `/api/v1/nodes/n` and not its `/status`, which a kubelet stand-in
    /// patches every few hundred ms.
    pub fn fail_next_exact(&self, method: &str, path: &str, code: u16, times: usize) {
        self.shared.write(|st| {
            st.failures.push(Failure {
                method: method.to_owned(),
                prefix: path.to_owned(),
                exact: true,
                code,
                remaining: times,
            })
        });
    }

    /// Waits until `check` returns `Some`, re-checking after every write (no polling);
    /// panics after `timeout`. Uses the caller's tokio clock: not for paused time.
    pub async fn wait_until<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&FakeApi) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(found) = check(self) {
                return found;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(result) => result.expect("the state outlives its waiters"),
                Err(_) => panic!("timed out after {timeout:?} waiting for {what}"),
            }
        }
    }

    /// Waits until the Node exists and satisfies `pred`; panics after `timeout` with
    /// the last state of the Node.
    pub async fn wait_node(
        &self,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.subscribe();
        loop {
            changes.borrow_and_update();
            let node = self.node(name);
            if let Some(node) = node.as_ref().filter(|n| pred(n)) {
                return node.clone();
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let last = node.map_or_else(|| "(no such node)".to_owned(), |n| format!("{n:#}"));
                panic!("timed out after {timeout:?} waiting for node {name}; last seen:\n{last}");
            }
        }
    }

    /// Waits for an Event (core/v1 form) matching `pred`; panics with all Events seen.
    pub async fn wait_event(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.shared.subscribe();
        loop {
            changes.borrow_and_update();
            if let Some(found) = self.events().into_iter().find(|e| pred(e)) {
                return found;
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                let seen: Vec<String> = self.events().iter().map(Value::to_string).collect();
                panic!(
                    "timed out after {timeout:?} waiting for an Event; seen:\n{}",
                    seen.join("\n")
                );
            }
        }
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        // Closing the channel ends the control loop, which stops the server.
        self.control.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn control_loop(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut commands: mpsc::UnboundedReceiver<Control>,
) {
    let listener = TcpListener::from_std(listener).expect("registering the listener");
    let mut running = Some(Running::spawn(listener, shared.clone()));
    while let Some(command) = commands.recv().await {
        match command {
            Control::Stop(done) => {
                if let Some(server) = running.take() {
                    server.stop().await;
                }
                let _ = done.send(());
            }
            Control::Restart(done) => {
                let result = match running {
                    Some(_) => Ok(()),
                    None => {
                        bind(shared.addr).map(|l| running = Some(Running::spawn(l, shared.clone())))
                    }
                };
                let _ = done.send(result);
            }
        }
    }
    if let Some(server) = running {
        server.stop().await;
    }
}

/// SO_REUSEADDR, so the port can be taken again while connections the fake cut are in
/// TIME_WAIT.
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

struct Running {
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    fn spawn(listener: TcpListener, shared: Arc<Shared>) -> Running {
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(accept_loop(listener, shared, stopped));
        Running { stop, task }
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let shared = shared.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |req| routes::handle(shared.clone(), req));
                        let _ = http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                Err(e) => {
                    // EMFILE and the like: back off a little rather than spin.
                    eprintln!("fake-apiserver: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    // Aborting the tasks drops their sockets: clients see the connection close.
    connections.shutdown().await;
}
