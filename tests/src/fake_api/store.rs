//! The fake's storage: objects by (kind, namespace, name), one global resourceVersion
//! (etcd's revision), and a bounded history of changes that watches replay from.

use std::{
    collections::{BTreeMap, HashSet, VecDeque},
    hash::{BuildHasher, RandomState},
    sync::{Mutex, MutexGuard, PoisonError},
};

use serde_json::{Map, Value, json};
use tokio::sync::watch;

use super::{
    error::ApiError,
    resources::{self, Group, Kind},
};

/// Changes kept for watches; a watch from an older resourceVersion gets 410 Gone, as
/// from the watch cache's bounded window (or etcd compaction) on a real server.
pub(crate) const HISTORY_LIMIT: usize = 4096;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    pub(crate) kind: Kind,
    /// Empty for cluster-scoped kinds.
    pub(crate) ns: String,
    pub(crate) name: String,
}

/// Which part of the object a write may change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sub {
    /// The main resource: `.status` changes are dropped.
    Main,
    /// The `status` subresource: only `.status` changes are kept.
    Status,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ChangeType {
    Added,
    Modified,
    Deleted,
}

pub(crate) struct Change {
    pub(crate) rv: u64,
    pub(crate) kind: Kind,
    pub(crate) ty: ChangeType,
    /// The object after the change (for `Deleted`, the last state, at the new rv).
    pub(crate) obj: Value,
    /// The object before (for `Modified`), so a filtered watch can tell ADDED/DELETED.
    pub(crate) prev: Option<Value>,
}

struct Stored {
    obj: Value,
    /// Creation order, for [`State::events`].
    seq: u64,
}

/// An error a test asked for: the next `remaining` requests matching answer `code`.
pub(crate) struct Failure {
    pub(crate) method: String,
    pub(crate) prefix: String,
    /// The path must be `prefix` itself, not only start with it.
    pub(crate) exact: bool,
    pub(crate) code: u16,
    pub(crate) remaining: usize,
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) rv: u64,
    objects: BTreeMap<Key, Stored>,
    pub(crate) history: VecDeque<Change>,
    /// Changes up to and including this resourceVersion are no longer in `history`.
    pub(crate) compacted: u64,
    seq: u64,
    pub(crate) requests: Vec<(String, String)>,
    /// The `User-Agent` of each of `requests`, in the same order ("" when none was sent).
    pub(crate) user_agents: Vec<String>,
    pub(crate) unhandled: Vec<(String, String)>,
    pub(crate) blocked_evictions: HashSet<(String, String)>,
    /// Pods whose eviction marks them terminating instead of deleting them.
    pub(crate) held_evictions: HashSet<(String, String)>,
    pub(crate) failures: Vec<Failure>,
}

/// The state behind a lock, and a channel that carries the latest resourceVersion to
/// watches and waiters: they wake on every write, nobody polls.
pub(crate) struct Shared {
    state: Mutex<State>,
    rv_tx: watch::Sender<u64>,
    pub(crate) addr: std::net::SocketAddr,
}

impl Shared {
    pub(crate) fn new(addr: std::net::SocketAddr) -> Shared {
        let state = State {
            rv: 1,
            compacted: 1,
            ..State::default()
        };
        Shared {
            state: Mutex::new(state),
            rv_tx: watch::Sender::new(1),
            addr,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not take the server down with it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&self.lock())
    }

    /// Runs `f` under the lock, then wakes every watcher if the resourceVersion moved.
    pub(crate) fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, rv) = {
            let mut state = self.lock();
            let out = f(&mut state);
            (out, state.rv)
        };
        self.rv_tx.send_if_modified(|current| {
            let moved = *current != rv;
            *current = rv;
            moved
        });
        out
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.rv_tx.subscribe()
    }
}

pub(crate) fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn random_u64() -> u64 {
    RandomState::new().hash_one(std::time::SystemTime::now())
}

fn new_uid() -> String {
    let (a, b) = (random_u64(), random_u64());
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | (b >> 48) & 0x3fff,
        b & 0xffff_ffff_ffff
    )
}

/// apiserver `SimpleNameGenerator`: five characters from an alphabet without vowels.
fn generate_name(prefix: &str) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut r = random_u64();
    let suffix: String = (0..5)
        .map(|_| {
            let c = ALPHABET[(r % ALPHABET.len() as u64) as usize] as char;
            r /= ALPHABET.len() as u64;
            c
        })
        .collect();
    format!("{prefix}{suffix}")
}

fn meta(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

pub(crate) fn rv_of(obj: &Value) -> &str {
    obj.pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
}

impl State {
    pub(crate) fn get(&self, key: &Key) -> Option<Value> {
        self.objects.get(key).map(|s| s.obj.clone())
    }

    pub(crate) fn list(
        &self,
        kind: Kind,
        ns: Option<&str>,
        selector: &super::Selector,
    ) -> Vec<Value> {
        self.objects
            .iter()
            .filter(|(k, s)| {
                k.kind == kind && ns.is_none_or(|ns| k.ns == ns) && selector.matches(&s.obj)
            })
            .map(|(_, s)| s.obj.clone())
            .collect()
    }

    /// Every Event, in creation order.
    pub(crate) fn events(&self) -> Vec<Value> {
        let mut events: Vec<&Stored> = self
            .objects
            .iter()
            .filter(|(k, _)| k.kind == Kind::Event)
            .map(|(_, s)| s)
            .collect();
        events.sort_by_key(|s| s.seq);
        events.into_iter().map(|s| s.obj.clone()).collect()
    }

    fn record(&mut self, change: Change) {
        self.history.push_back(change);
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
    }

    /// Drops the whole watch history, as an etcd compaction does.
    pub(crate) fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// POST: the registry's create. `obj` is in core/v1 form.
    pub(crate) fn create(
        &mut self,
        kind: Kind,
        group: Group,
        ns: &str,
        mut obj: Value,
        reset_status: bool,
    ) -> Result<Value, ApiError> {
        if !obj.is_object() {
            return Err(ApiError::bad_request(
                "the body of the request is not a JSON object".into(),
            ));
        }
        let m = meta(&mut obj);
        if kind.namespaced() {
            match m.get("namespace").and_then(Value::as_str) {
                Some(body_ns) if !body_ns.is_empty() && body_ns != ns => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request".into(),
                    ));
                }
                _ => {
                    m.insert("namespace".into(), json!(ns));
                }
            }
        } else {
            m.remove("namespace");
        }
        let name = m.get("name").and_then(Value::as_str).unwrap_or_default();
        let generate = m
            .get("generateName")
            .and_then(Value::as_str)
            .unwrap_or_default();
        if name.is_empty() && !generate.is_empty() {
            let generated = generate_name(generate);
            m.insert("name".into(), json!(generated));
        }
        m.insert("uid".into(), json!(new_uid()));
        m.insert("creationTimestamp".into(), json!(now_rfc3339()));
        m.remove("resourceVersion");
        resources::set_type_meta(&mut obj, kind, Group::Core);
        if reset_status && kind == Kind::Pod {
            obj["status"] = json!({"phase": "Pending"});
        }
        resources::normalize_and_validate(kind, group, &mut obj, None)?;
        let key = Key {
            kind,
            ns: if kind.namespaced() {
                ns.to_owned()
            } else {
                String::new()
            },
            name: obj["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        };
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(kind, &key.name));
        }
        self.rv += 1;
        meta(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.seq += 1;
        self.objects.insert(
            key,
            Stored {
                obj: obj.clone(),
                seq: self.seq,
            },
        );
        self.record(Change {
            rv: self.rv,
            kind,
            ty: ChangeType::Added,
            obj: obj.clone(),
            prev: None,
        });
        Ok(obj)
    }

    /// PUT and PATCH: `new` is the whole intended object in core/v1 form.
    pub(crate) fn update(
        &mut self,
        key: &Key,
        group: Group,
        mut new: Value,
        sub: Sub,
    ) -> Result<Value, ApiError> {
        let old = self
            .get(key)
            .ok_or_else(|| ApiError::not_found(key.kind, &key.name))?;
        if !new.is_object() {
            return Err(ApiError::unprocessable(
                "the patched object is not a JSON object".into(),
            ));
        }
        let wanted_rv = rv_of(&new);
        if !wanted_rv.is_empty() && wanted_rv != rv_of(&old) {
            return Err(ApiError::conflict(key.kind, &key.name));
        }
        let new_name = new.pointer("/metadata/name").and_then(Value::as_str);
        if new_name.is_some_and(|n| n != key.name) {
            return Err(ApiError::invalid(
                key.kind,
                &key.name,
                vec![super::error::Cause::invalid(
                    "metadata.name",
                    new_name.unwrap_or_default(),
                    "field is immutable",
                )],
            ));
        }
        if key.kind.has_status() {
            // The registries' PrepareForUpdate: the main resource keeps the old status,
            // the status subresource keeps everything but the status.
            let (mut base, from) = match sub {
                Sub::Main => (new.clone(), &old),
                Sub::Status => (old.clone(), &new),
            };
            match from.get("status") {
                Some(status) => base["status"] = status.clone(),
                None => {
                    base.as_object_mut().map(|m| m.remove("status"));
                }
            }
            new = base;
        }
        let old_meta = old["metadata"].as_object().cloned().unwrap_or_default();
        let m = meta(&mut new);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
        ] {
            match old_meta.get(field) {
                Some(v) => m.insert(field.into(), v.clone()),
                None => m.remove(field),
            };
        }
        resources::set_type_meta(&mut new, key.kind, Group::Core);
        resources::normalize_and_validate(key.kind, group, &mut new, Some(&old))?;
        if new == old {
            // A no-op write: same resourceVersion, no watch event (as etcd3's GuaranteedUpdate).
            return Ok(old);
        }
        self.rv += 1;
        meta(&mut new).insert("resourceVersion".into(), json!(self.rv.to_string()));
        if let Some(stored) = self.objects.get_mut(key) {
            stored.obj = new.clone();
        }
        self.record(Change {
            rv: self.rv,
            kind: key.kind,
            ty: ChangeType::Modified,
            obj: new.clone(),
            prev: Some(old),
        });
        Ok(new)
    }

    pub(crate) fn delete(&mut self, key: &Key) -> Result<Value, ApiError> {
        let stored = self
            .objects
            .remove(key)
            .ok_or_else(|| ApiError::not_found(key.kind, &key.name))?;
        self.rv += 1;
        let mut obj = stored.obj;
        meta(&mut obj).insert("resourceVersion".into(), json!(self.rv.to_string()));
        self.record(Change {
            rv: self.rv,
            kind: key.kind,
            ty: ChangeType::Deleted,
            obj: obj.clone(),
            prev: None,
        });
        Ok(obj)
    }

    /// The first injected failure matching this request, used up by one.
    pub(crate) fn take_failure(&mut self, method: &str, path: &str) -> Option<u16> {
        let f = self.failures.iter_mut().find(|f| {
            f.remaining > 0
                && f.method.eq_ignore_ascii_case(method)
                && if f.exact {
                    path == f.prefix
                } else {
                    path.starts_with(&f.prefix)
                }
        })?;
        f.remaining -= 1;
        let code = f.code;
        self.failures.retain(|f| f.remaining > 0);
        Some(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_api::Selector;

    fn node(name: &str) -> Value {
        json!({"metadata": {"name": name}, "status": {"capacity": {"cpu": "2"}}})
    }

    #[test]
    fn writes_bump_the_revision_and_noops_do_not() {
        let mut st = State {
            rv: 1,
            compacted: 1,
            ..State::default()
        };
        let created = st
            .create(Kind::Node, Group::Core, "", node("a"), false)
            .unwrap();
        assert_eq!(rv_of(&created), "2");
        let key = Key {
            kind: Kind::Node,
            ns: String::new(),
            name: "a".into(),
        };
        let same = st
            .update(&key, Group::Core, created.clone(), Sub::Status)
            .unwrap();
        assert_eq!(rv_of(&same), "2");
        let mut changed = created.clone();
        changed["status"]["capacity"]["cpu"] = json!("4");
        changed["spec"] = json!({"unschedulable": true});
        let after = st
            .update(&key, Group::Core, changed.clone(), Sub::Status)
            .unwrap();
        assert_eq!(after["status"]["capacity"]["cpu"], "4");
        assert!(
            after.get("spec").is_none(),
            "the status subresource must not change spec"
        );
        changed["metadata"]["resourceVersion"] = json!("3");
        changed["status"]["capacity"]["cpu"] = json!("8");
        let main = st.update(&key, Group::Core, changed, Sub::Main).unwrap();
        assert_eq!(
            main["status"]["capacity"]["cpu"], "4",
            "the main resource must not change status"
        );
        assert_eq!(main["spec"]["unschedulable"], true);
        let mut stale = main.clone();
        stale["metadata"]["resourceVersion"] = json!("2");
        assert_eq!(
            st.update(&key, Group::Core, stale, Sub::Main)
                .unwrap_err()
                .code,
            409
        );
        assert_eq!(
            st.create(Kind::Node, Group::Core, "", node("a"), false)
                .unwrap_err()
                .code,
            409
        );
        assert_eq!(st.list(Kind::Node, None, &Selector::default()).len(), 1);
    }

    #[test]
    fn history_is_bounded() {
        let mut st = State {
            rv: 1,
            compacted: 1,
            ..State::default()
        };
        for i in 0..HISTORY_LIMIT + 10 {
            st.create(Kind::Node, Group::Core, "", node(&format!("n{i}")), false)
                .unwrap();
        }
        assert_eq!(st.history.len(), HISTORY_LIMIT);
        assert_eq!(st.compacted, 11);
    }
}
