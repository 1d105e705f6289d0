//! Failures as the API server reports them: a `Status` object with the HTTP code, the
//! `reason` clients switch on, and the message format of
//! k8s.io/apimachinery/pkg/api/errors (v0.34).

use serde_json::{Value, json};

use super::resources::Kind;

#[derive(Debug, Clone)]
pub(crate) struct ApiError {
    pub(crate) code: u16,
    pub(crate) reason: &'static str,
    pub(crate) message: String,
    pub(crate) details: Option<Value>,
}

/// One field error of an `Invalid` status.
pub(crate) struct Cause {
    reason: &'static str,
    field: String,
    message: String,
}

impl Cause {
    pub(crate) fn required(field: &str, detail: &str) -> Cause {
        let message = if detail.is_empty() {
            "Required value".to_owned()
        } else {
            format!("Required value: {detail}")
        };
        Cause {
            reason: "FieldValueRequired",
            field: field.to_owned(),
            message,
        }
    }

    pub(crate) fn invalid(field: &str, value: &str, detail: &str) -> Cause {
        Cause {
            reason: "FieldValueInvalid",
            field: field.to_owned(),
            message: format!("Invalid value: {value:?}: {detail}"),
        }
    }
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String) -> ApiError {
        ApiError {
            code,
            reason,
            message,
            details: None,
        }
    }

    pub(crate) fn not_found(kind: Kind, name: &str) -> ApiError {
        ApiError {
            details: Some(json!({"name": name, "kind": kind.plural()})),
            ..Self::new(
                404,
                "NotFound",
                format!("{} {name:?} not found", kind.plural()),
            )
        }
    }

    /// A path no handler serves (the real server answers a bare 404 "page not found").
    pub(crate) fn no_route(path: &str) -> ApiError {
        Self::new(
            404,
            "NotFound",
            format!("the server could not find the requested resource ({path})"),
        )
    }

    pub(crate) fn already_exists(kind: Kind, name: &str) -> ApiError {
        ApiError {
            details: Some(json!({"name": name, "kind": kind.plural()})),
            ..Self::new(
                409,
                "AlreadyExists",
                format!("{} {name:?} already exists", kind.qualified()),
            )
        }
    }

    pub(crate) fn conflict(kind: Kind, name: &str) -> ApiError {
        ApiError {
            details: Some(json!({"name": name, "kind": kind.plural()})),
            ..Self::new(
                409,
                "Conflict",
                format!(
                    "Operation cannot be fulfilled on {} {name:?}: the object has been modified; please apply your changes to the latest version and try again",
                    kind.qualified()
                ),
            )
        }
    }

    pub(crate) fn invalid(kind: Kind, name: &str, causes: Vec<Cause>) -> ApiError {
        let list: Vec<String> = causes
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        let joined = if list.len() == 1 {
            list[0].clone()
        } else {
            format!("[{}]", list.join(", "))
        };
        let causes: Vec<Value> = causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect();
        ApiError {
            details: Some(json!({"name": name, "kind": kind.name(), "causes": causes})),
            ..Self::new(
                422,
                "Invalid",
                format!("{} {name:?} is invalid: {joined}", kind.name()),
            )
        }
    }

    /// A patch that cannot be applied (a failing JSON patch `test`, a list item without its
    /// merge key): 422, as `interpretStrategicMergePatchError`/`jsonpatch` errors are.
    pub(crate) fn unprocessable(message: String) -> ApiError {
        Self::new(422, "Invalid", message)
    }

    pub(crate) fn bad_request(message: String) -> ApiError {
        Self::new(400, "BadRequest", message)
    }

    pub(crate) fn method_not_allowed(method: &str) -> ApiError {
        Self::new(
            405,
            "MethodNotAllowed",
            format!("{method} is not supported on this resource"),
        )
    }

    pub(crate) fn unsupported_media_type(content_type: &str) -> ApiError {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format ({content_type:?}) - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json"
            ),
        )
    }

    /// pkg/registry/core/pod/storage/eviction.go: a PodDisruptionBudget forbids it.
    pub(crate) fn disruption_budget(pod: &str) -> ApiError {
        ApiError {
            details: Some(json!({"causes": [{
                "reason": "DisruptionBudget",
                "message": format!("The disruption budget {pod}-pdb needs 1 healthy pods and has 1 currently"),
            }]})),
            ..Self::new(
                429,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.".into(),
            )
        }
    }

    /// A watch from a resourceVersion the history no longer holds (the etcd compaction
    /// case); sent as an `ERROR` watch event, which makes kube's watcher re-list.
    pub(crate) fn expired(requested: u64, oldest: u64) -> ApiError {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {requested} ({oldest})"),
        )
    }

    /// An error injected by a test.
    pub(crate) fn injected(code: u16) -> ApiError {
        let reason = match code {
            403 => "Forbidden",
            409 => "Conflict",
            429 => "TooManyRequests",
            500 => "InternalError",
            503 => "ServiceUnavailable",
            504 => "Timeout",
            _ => "",
        };
        Self::new(code, reason, format!("injected failure (HTTP {code})"))
    }

    pub(crate) fn status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}
