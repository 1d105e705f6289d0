//! Watch streams: one JSON `{"type": ..., "object": ...}` per line, chunked, from a
//! resourceVersion on, woken by every write (no polling).
//!
//! As the real server (k8s.io/apiserver/pkg/storage/cacher, v1.34):
//! - no resourceVersion, or `0`: synthetic ADDED events for the current state first;
//! - `resourceVersion=N`: every change after N, replayed from the history; N older than
//!   the history: one ERROR event carrying a 410 Expired Status, then the end;
//! - with a field/label selector, an object that starts or stops matching shows up as
//!   ADDED or DELETED;
//! - `sendInitialEvents=true`: the initial ADDED events end with a BOOKMARK annotated
//!   `k8s.io/initial-events-end` (what kube's streaming-list watcher waits for);
//! - the stream ends after `timeoutSeconds`, or when the server stops.
//!
//! Not reproduced: periodic BOOKMARKs (`allowWatchBookmarks` is accepted and ignored),
//! and the wait-then-504 for a resourceVersion from the future (the fake just waits).

use std::{collections::VecDeque, convert::Infallible, sync::Arc, time::Duration};

use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Bytes, Frame};
use serde_json::{Value, json};
use tokio::{sync::watch, time::Instant};

use super::{
    Body, Selector,
    error::ApiError,
    resources::{Group, Kind, api_version, view},
    store::{Change, ChangeType, Shared, State},
};

pub(crate) enum Since {
    /// Synthetic ADDED events for the current state, then changes.
    Now,
    Rv(u64),
}

pub(crate) struct WatchRequest {
    pub(crate) kind: Kind,
    pub(crate) group: Group,
    pub(crate) ns: Option<String>,
    pub(crate) selector: Selector,
    pub(crate) since: Since,
    pub(crate) timeout: Duration,
    pub(crate) initial_events_end: bool,
}

struct Watcher {
    shared: Arc<Shared>,
    rx: watch::Receiver<u64>,
    req: WatchRequest,
    /// Changes up to here have been sent.
    cursor: u64,
    pending: VecDeque<Bytes>,
    done: bool,
    deadline: Instant,
}

fn line(ty: &str, object: Value) -> Bytes {
    let mut text = json!({"type": ty, "object": object}).to_string();
    text.push('\n');
    Bytes::from(text)
}

pub(crate) fn body(shared: Arc<Shared>, req: WatchRequest) -> Body {
    let mut rx = shared.subscribe();
    rx.borrow_and_update();
    let mut w = Watcher {
        shared: shared.clone(),
        rx,
        cursor: 0,
        pending: VecDeque::new(),
        done: false,
        deadline: Instant::now() + req.timeout,
        req,
    };
    shared.read(|st| w.begin(st));
    let stream = futures::stream::unfold(w, |mut w| async move {
        let chunk = w.next().await?;
        Some((Ok::<_, Infallible>(Frame::data(chunk)), w))
    });
    StreamBody::new(stream).boxed_unsync()
}

impl Watcher {
    fn begin(&mut self, st: &State) {
        match self.req.since {
            Since::Rv(rv) => self.cursor = rv,
            Since::Now => {
                let ns = self.req.ns.as_deref();
                for obj in st.list(self.req.kind, ns, &self.req.selector) {
                    self.pending
                        .push_back(line("ADDED", view(self.req.kind, self.req.group, &obj)));
                }
                if self.req.initial_events_end {
                    let bookmark = json!({
                        "apiVersion": api_version(self.req.kind, self.req.group),
                        "kind": self.req.kind.name(),
                        "metadata": {
                            "resourceVersion": st.rv.to_string(),
                            "annotations": {"k8s.io/initial-events-end": "true"},
                        },
                    });
                    self.pending.push_back(line("BOOKMARK", bookmark));
                }
                self.cursor = st.rv;
            }
        }
        self.catch_up(st);
    }

    /// Queues every change after the cursor, or the 410 if they are gone.
    fn catch_up(&mut self, st: &State) {
        if self.cursor < st.compacted {
            let status = ApiError::expired(self.cursor, st.compacted).status();
            self.pending.push_back(line("ERROR", status));
            self.done = true;
            return;
        }
        let from = st.history.partition_point(|c| c.rv <= self.cursor);
        for change in st.history.range(from..) {
            if let Some(event) = self.translate(change) {
                self.pending.push_back(event);
            }
        }
        self.cursor = self.cursor.max(st.rv);
    }

    fn translate(&self, c: &Change) -> Option<Bytes> {
        let req = &self.req;
        if c.kind != req.kind {
            return None;
        }
        let matches = |obj: &Value| {
            let ns = obj
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or_default();
            req.ns.as_deref().is_none_or(|want| want == ns) && req.selector.matches(obj)
        };
        let now = matches(&c.obj);
        let before = c.prev.as_ref().is_some_and(matches);
        let ty = match (c.ty, before, now) {
            (ChangeType::Added, _, true) => "ADDED",
            (ChangeType::Deleted, _, true) => "DELETED",
            (ChangeType::Modified, true, true) => "MODIFIED",
            (ChangeType::Modified, false, true) => "ADDED",
            (ChangeType::Modified, true, false) => "DELETED",
            _ => return None,
        };
        Some(line(ty, view(req.kind, req.group, &c.obj)))
    }

    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(chunk) = self.pending.pop_front() {
                return Some(chunk);
            }
            if self.done {
                return None;
            }
            // Mark the current revision seen before reading, so no write slips between.
            self.rx.borrow_and_update();
            let shared = self.shared.clone();
            shared.read(|st| self.catch_up(st));
            if !self.pending.is_empty() {
                continue;
            }
            tokio::select! {
                changed = self.rx.changed() => changed.ok()?,
                () = tokio::time::sleep_until(self.deadline) => return None,
            }
        }
    }
}
