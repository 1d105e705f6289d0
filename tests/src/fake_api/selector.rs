//! `fieldSelector` and `labelSelector` query parameters.
//!
//! Field selectors: `path=value`, `path==value`, `path!=value`, comma-separated, on any
//! dotted path (the real server allows only a few paths per type and answers 400 for
//! others; the fake is more lenient). A missing field compares as "" (so
//! `spec.nodeName=` matches unscheduled pods, as on the real server).
//! Label selectors: the equality-based forms (`k=v`, `k==v`, `k!=v`, `k`, `!k`); the
//! set-based forms (`k in (a,b)`, `k notin (a)`) are accepted and ignored.

use serde_json::Value;

use super::error::ApiError;

#[derive(Default, Debug)]
pub(crate) struct Selector {
    fields: Vec<(String, bool, String)>,
    labels: Vec<Label>,
}

#[derive(Debug)]
enum Label {
    Eq(String, String),
    Ne(String, String),
    Exists(String),
    Absent(String),
}

/// Splits on commas outside parentheses.
fn terms(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(s[start..].trim());
    out.into_iter().filter(|t| !t.is_empty()).collect()
}

impl Selector {
    pub(crate) fn parse(fields: Option<&str>, labels: Option<&str>) -> Result<Selector, ApiError> {
        let mut sel = Selector::default();
        for term in terms(fields.unwrap_or_default()) {
            let (path, eq, value) = if let Some((p, v)) = term.split_once("!=") {
                (p, false, v)
            } else if let Some((p, v)) = term.split_once("==") {
                (p, true, v)
            } else if let Some((p, v)) = term.split_once('=') {
                (p, true, v)
            } else {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: invalid field selector {term:?}"
                )));
            };
            sel.fields
                .push((path.trim().to_owned(), eq, value.trim().to_owned()));
        }
        for term in terms(labels.unwrap_or_default()) {
            if term.contains('(') {
                continue;
            }
            let label = if let Some((k, v)) = term.split_once("!=") {
                Label::Ne(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Label::Eq(k.trim().into(), v.trim().into())
            } else if let Some(k) = term.strip_prefix('!') {
                Label::Absent(k.trim().into())
            } else {
                Label::Exists(term.into())
            };
            sel.labels.push(label);
        }
        Ok(sel)
    }

    pub(crate) fn matches(&self, obj: &Value) -> bool {
        let field = |path: &str| -> String {
            let pointer: String = path.split('.').map(|p| format!("/{p}")).collect();
            match obj.pointer(&pointer) {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            }
        };
        let label = |k: &str| {
            obj.pointer("/metadata/labels")
                .and_then(|l| l.get(k))
                .and_then(Value::as_str)
        };
        self.fields
            .iter()
            .all(|(path, eq, value)| (field(path) == *value) == *eq)
            && self.labels.iter().all(|l| match l {
                Label::Eq(k, v) => label(k) == Some(v.as_str()),
                Label::Ne(k, v) => label(k) != Some(v.as_str()),
                Label::Exists(k) => label(k).is_some(),
                Label::Absent(k) => label(k).is_none(),
            })
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn field_and_label_selectors() {
        let pod = json!({"metadata": {"name": "p", "labels": {"app": "web"}}, "spec": {"nodeName": "n1"}});
        let yes = |f: &str, l: &str| Selector::parse(Some(f), Some(l)).unwrap().matches(&pod);
        assert!(yes("spec.nodeName=n1", ""));
        assert!(yes("spec.nodeName==n1,metadata.name!=q", "app=web"));
        assert!(!yes("spec.nodeName=n2", ""));
        assert!(!yes("", "app!=web"));
        assert!(yes("", "app,!tier,env in (a,b)"));
        assert!(yes("status.phase=", ""));
        assert!(Selector::parse(Some("nonsense"), None).is_err());
    }
}
