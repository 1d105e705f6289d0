//! The resource types the fake serves, with what the real registry does per type: scope,
//! status subresource, patch merge keys, normalisation, validation, and the conversion
//! between core/v1 and events.k8s.io/v1 Events (one stored object, two views).

use serde_json::{Map, Value, json};

use super::{
    error::{ApiError, Cause},
    patch::ListStrategy,
    quantity,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Node,
    Pod,
    Event,
    /// coordination.k8s.io/v1 Lease (namespaced, no status subresource).
    Lease,
}

/// The API group a request came through; Events are served by both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Group {
    Core,
    Events,
    Coordination,
}

impl Kind {
    pub(crate) fn from_plural(group: Group, plural: &str) -> Option<Kind> {
        match (group, plural) {
            (Group::Core, "nodes") => Some(Kind::Node),
            (Group::Core, "pods") => Some(Kind::Pod),
            (Group::Core | Group::Events, "events") => Some(Kind::Event),
            (Group::Coordination, "leases") => Some(Kind::Lease),
            _ => None,
        }
    }

    pub(crate) fn plural(self) -> &'static str {
        match self {
            Kind::Node => "nodes",
            Kind::Pod => "pods",
            Kind::Event => "events",
            Kind::Lease => "leases",
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Event => "Event",
            Kind::Lease => "Lease",
        }
    }

    pub(crate) fn namespaced(self) -> bool {
        self != Kind::Node
    }

    pub(crate) fn has_status(self) -> bool {
        matches!(self, Kind::Node | Kind::Pod)
    }

    /// The resource as error messages name it: group-qualified outside the core group
    /// (`leases.coordination.k8s.io "x" already exists`).
    pub(crate) fn qualified(self) -> &'static str {
        match self {
            Kind::Lease => "leases.coordination.k8s.io",
            other => other.plural(),
        }
    }

    /// The `patchMergeKey`s of k8s.io/api/core/v1/types.go (v1.34) for the fields a node
    /// agent touches.
    pub(crate) fn strategies(self) -> fn(&str) -> Option<ListStrategy> {
        fn metadata(path: &str) -> Option<ListStrategy> {
            match path {
                "metadata.finalizers" => Some(ListStrategy::Union),
                "metadata.ownerReferences" => Some(ListStrategy::MergeKey("uid")),
                _ => None,
            }
        }
        fn node(path: &str) -> Option<ListStrategy> {
            match path {
                "status.conditions" | "status.addresses" => Some(ListStrategy::MergeKey("type")),
                "status.volumesAttached" => Some(ListStrategy::MergeKey("name")),
                "spec.podCIDRs" => Some(ListStrategy::Union),
                _ => metadata(path),
            }
        }
        fn pod(path: &str) -> Option<ListStrategy> {
            match path {
                "spec.containers"
                | "spec.initContainers"
                | "spec.ephemeralContainers"
                | "spec.volumes"
                | "spec.imagePullSecrets"
                | "spec.containers.env"
                | "spec.initContainers.env" => Some(ListStrategy::MergeKey("name")),
                "spec.containers.ports" | "spec.initContainers.ports" => {
                    Some(ListStrategy::MergeKey("containerPort"))
                }
                "spec.containers.volumeMounts" | "spec.initContainers.volumeMounts" => {
                    Some(ListStrategy::MergeKey("mountPath"))
                }
                "status.conditions" => Some(ListStrategy::MergeKey("type")),
                _ => metadata(path),
            }
        }
        match self {
            Kind::Node => node,
            Kind::Pod => pod,
            Kind::Event | Kind::Lease => metadata,
        }
    }
}

pub(crate) fn api_version(kind: Kind, group: Group) -> &'static str {
    match (kind, group) {
        (Kind::Event, Group::Events) => "events.k8s.io/v1",
        // Stored and shown the same whatever `group` the caller passes (storage uses Core).
        (Kind::Lease, _) => "coordination.k8s.io/v1",
        _ => "v1",
    }
}

/// events.k8s.io/v1 field ↔ core/v1 field (pkg/apis/events/v1/conversion.go).
const EVENT_FIELDS: [(&str, &str); 7] = [
    ("regarding", "involvedObject"),
    ("note", "message"),
    ("reportingController", "reportingComponent"),
    ("deprecatedSource", "source"),
    ("deprecatedFirstTimestamp", "firstTimestamp"),
    ("deprecatedLastTimestamp", "lastTimestamp"),
    ("deprecatedCount", "count"),
];

fn rename(obj: &mut Value, pairs: impl Iterator<Item = (&'static str, &'static str)>) {
    if let Value::Object(m) = obj {
        let moved: Vec<(&str, Value)> = pairs
            .filter_map(|(from, to)| m.remove(from).map(|v| (to, v)))
            .collect();
        for (to, v) in moved {
            m.insert(to.to_owned(), v);
        }
    }
}

/// The stored (core/v1) object as `group` shows it, with `apiVersion` and `kind` set.
pub(crate) fn view(kind: Kind, group: Group, stored: &Value) -> Value {
    let mut obj = stored.clone();
    if kind == Kind::Event && group == Group::Events {
        rename(&mut obj, EVENT_FIELDS.iter().map(|&(e, c)| (c, e)));
    }
    set_type_meta(&mut obj, kind, group);
    obj
}

/// The inverse of [`view`]: what a request body through `group` means in core/v1.
pub(crate) fn from_view(kind: Kind, group: Group, mut obj: Value) -> Value {
    if kind == Kind::Event && group == Group::Events {
        rename(&mut obj, EVENT_FIELDS.iter().copied());
    }
    set_type_meta(&mut obj, kind, Group::Core);
    obj
}

pub(crate) fn set_type_meta(obj: &mut Value, kind: Kind, group: Group) {
    if let Value::Object(m) = obj {
        m.insert("apiVersion".into(), json!(api_version(kind, group)));
        m.insert("kind".into(), json!(kind.name()));
    }
}

/// A request body's `apiVersion`/`kind`, when present, must be this endpoint's.
pub(crate) fn check_type_meta(obj: &Value, kind: Kind, group: Group) -> Result<(), ApiError> {
    let want_version = api_version(kind, group);
    let version = obj.get("apiVersion").and_then(Value::as_str);
    let k = obj.get("kind").and_then(Value::as_str);
    if version.is_some_and(|v| v != want_version) || k.is_some_and(|k| k != kind.name()) {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({}) does not match the expected API version ({want_version})",
            version.unwrap_or_default()
        )));
    }
    Ok(())
}

fn str_at<'a>(obj: &'a Value, pointer: &str) -> &'a str {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_default()
}

/// Normalises `obj` as decoding into the Go types would (quantities canonicalised), then
/// validates it as the registry does. `old` is the stored object on update.
pub(crate) fn normalize_and_validate(
    kind: Kind,
    group: Group,
    obj: &mut Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    if !obj.is_object() {
        return Err(ApiError::bad_request(format!(
            "the body of the request is not a {} object",
            kind.name()
        )));
    }
    let name = str_at(obj, "/metadata/name").to_owned();
    if name.is_empty() {
        causes.push(Cause::required(
            "metadata.name",
            "name or generateName is required",
        ));
    } else if !is_dns_subdomain(&name) {
        causes.push(Cause::invalid(
            "metadata.name",
            &name,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ));
    }
    match kind {
        Kind::Node => {
            for field in ["capacity", "allocatable"] {
                if let Some(Value::Object(list)) = obj.pointer_mut(&format!("/status/{field}")) {
                    canonicalize(list, &format!("status.{field}"), &mut causes);
                }
            }
        }
        Kind::Event => validate_event(obj, group, old, &mut causes),
        Kind::Lease => validate_lease(obj, &mut causes),
        Kind::Pod => {}
    }
    if causes.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid(kind, &name, causes))
    }
}

fn canonicalize(list: &mut Map<String, Value>, field: &str, causes: &mut Vec<Cause>) {
    for (resource, value) in list.iter_mut() {
        // Quantity.UnmarshalJSON takes a JSON number as well as a string.
        let text = match &*value {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            other => other.to_string(),
        };
        match quantity::canonical(text.trim()) {
            Some(c) => *value = Value::String(c),
            None => causes.push(Cause::invalid(
                &format!("{field}.{resource}"),
                &text,
                "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
            )),
        }
    }
}

/// pkg/apis/core/validation/events.go (v1.34): `legacyValidateEvent` for every request,
/// the strict rules for creation and update through events.k8s.io/v1.
fn validate_event(ev: &Value, group: Group, old: Option<&Value>, causes: &mut Vec<Cause>) {
    let ns = str_at(ev, "/metadata/namespace");
    let involved_ns = str_at(ev, "/involvedObject/namespace");
    let event_time = ev.get("eventTime").is_some_and(|t| !t.is_null());
    let controller = if group == Group::Core {
        "reportingComponent"
    } else {
        "reportingController"
    };
    let mismatch = || {
        Cause::invalid(
            "involvedObject.namespace",
            involved_ns,
            "does not match event.namespace",
        )
    };
    if !event_time {
        if involved_ns.is_empty() {
            if !ns.is_empty() && ns != "default" {
                causes.push(mismatch());
            }
        } else if ns != involved_ns {
            causes.push(mismatch());
        }
    } else {
        if involved_ns.is_empty() && ns != "default" && ns != "kube-system" {
            causes.push(mismatch());
        }
        for (field, pointer, limit) in [
            (controller, "/reportingComponent", usize::MAX),
            ("reportingInstance", "/reportingInstance", 128),
            ("action", "/action", 128),
            ("reason", "/reason", 128),
        ] {
            let value = str_at(ev, pointer);
            if value.is_empty() {
                causes.push(Cause::required(field, ""));
            } else if value.len() > limit {
                causes.push(Cause::invalid(
                    field,
                    "",
                    &format!("can have at most {limit} characters"),
                ));
            }
        }
        if str_at(ev, "/message").len() > 1024 {
            causes.push(Cause::invalid(
                "message",
                "",
                "can have at most 1024 characters",
            ));
        }
    }
    if group == Group::Core {
        return;
    }
    match old {
        None => {
            if !event_time {
                causes.push(Cause::required("eventTime", ""));
            }
            let ty = str_at(ev, "/type");
            if ty != "Normal" && ty != "Warning" {
                causes.push(Cause::invalid(
                    "type",
                    "",
                    &format!("has invalid value: {ty}"),
                ));
            }
            for (field, pointer) in [
                ("deprecatedFirstTimestamp", "/firstTimestamp"),
                ("deprecatedLastTimestamp", "/lastTimestamp"),
                ("deprecatedCount", "/count"),
                ("deprecatedSource", "/source"),
            ] {
                let set = ev.pointer(pointer).is_some_and(|v| {
                    !(v.is_null() || *v == json!(0) || v.as_object().is_some_and(Map::is_empty))
                });
                if set {
                    causes.push(Cause::invalid(field, "", "needs to be unset"));
                }
            }
        }
        Some(old) => {
            for field in [
                "involvedObject",
                "reason",
                "message",
                "type",
                "action",
                "reportingComponent",
                "reportingInstance",
                "eventTime",
            ] {
                if ev.get(field) != old.get(field) {
                    let shown = EVENT_FIELDS
                        .iter()
                        .find(|(_, c)| *c == field)
                        .map_or(field, |(e, _)| e);
                    causes.push(Cause::invalid(shown, "", "field is immutable"));
                }
            }
        }
    }
}

/// pkg/apis/coordination/validation/validation.go (v1.34) `ValidateLeaseSpec`: the
/// duration must be positive, the transitions count not negative. (Holder identity and
/// times are free-form there too.)
fn validate_lease(lease: &Value, causes: &mut Vec<Cause>) {
    if let Some(d) = lease
        .pointer("/spec/leaseDurationSeconds")
        .filter(|v| !v.is_null())
        && d.as_i64().is_none_or(|d| d <= 0)
    {
        causes.push(Cause::invalid(
            "spec.leaseDurationSeconds",
            &d.to_string(),
            "must be greater than 0",
        ));
    }
    if let Some(t) = lease
        .pointer("/spec/leaseTransitions")
        .filter(|v| !v.is_null())
        && t.as_i64().is_none_or(|t| t < 0)
    {
        causes.push(Cause::invalid(
            "spec.leaseTransitions",
            &t.to_string(),
            "must be greater than or equal to 0",
        ));
    }
}

/// k8s.io/apimachinery/pkg/util/validation `IsDNS1123Subdomain`.
pub(crate) fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|label| {
            let b = label.as_bytes();
            !b.is_empty()
                && b.iter()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_round_trip_between_groups() {
        let v1 = json!({"regarding": {"kind": "Node", "name": "n"}, "note": "hi", "reportingController": "x"});
        let core = from_view(Kind::Event, Group::Events, v1);
        assert_eq!(core["involvedObject"]["name"], "n");
        assert_eq!(core["message"], "hi");
        assert_eq!(core["apiVersion"], "v1");
        let back = view(Kind::Event, Group::Events, &core);
        assert_eq!(back["note"], "hi");
        assert_eq!(back["apiVersion"], "events.k8s.io/v1");
    }

    #[test]
    fn node_events_belong_in_default() {
        let mut ev = json!({"metadata": {"name": "n.1", "namespace": "kube-system"},
            "involvedObject": {"kind": "Node", "name": "n"}, "reason": "R"});
        assert!(normalize_and_validate(Kind::Event, Group::Core, &mut ev, None).is_err());
        ev["metadata"]["namespace"] = json!("default");
        normalize_and_validate(Kind::Event, Group::Core, &mut ev, None).unwrap();
    }

    #[test]
    fn node_quantities_are_canonicalised_or_rejected() {
        let mut node = json!({"metadata": {"name": "n"}, "status": {"capacity": {"memory": "1048576Ki", "cpu": 2}}});
        normalize_and_validate(Kind::Node, Group::Core, &mut node, None).unwrap();
        assert_eq!(
            node["status"]["capacity"],
            json!({"memory": "1Gi", "cpu": "2"})
        );
        node["status"]["capacity"]["memory"] = json!("lots");
        let err = normalize_and_validate(Kind::Node, Group::Core, &mut node, None).unwrap_err();
        assert_eq!(err.code, 422);
    }
}
