//! The four patch formats the API server accepts, applied to JSON values.
//!
//! - JSON merge patch, RFC 7386.
//! - Strategic merge patch (k8s.io/apimachinery/pkg/util/strategicpatch): a merge patch
//!   in which the lists that a type declares with a `patchMergeKey` are merged item by
//!   item by that key, lists declared `patchStrategy: merge` of scalars are merged as
//!   sets, and the directives `$patch` (`replace`, `delete`), `$retainKeys`,
//!   `$setElementOrder/<list>` and `$deleteFromPrimitiveList/<list>` are honoured.
//! - JSON patch, RFC 6902: `add`, `remove`, `replace`, `move`, `copy`, `test`.
//!
//! Server-side apply is treated as a strategic merge by the caller: the fake keeps no
//! managedFields, so fields dropped from a later apply are not removed.

use serde_json::{Map, Value};

/// How a list at a given path merges in a strategic merge patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ListStrategy {
    /// `patchStrategy: merge` with `patchMergeKey`: items are matched by this key.
    MergeKey(&'static str),
    /// `patchStrategy: merge` on a list of scalars: a set union.
    Union,
}

/// The strategy of the list at a dotted path (`status.conditions`); `None` means the
/// list is atomic and a patch replaces it.
pub(crate) type Strategies = fn(&str) -> Option<ListStrategy>;

/// RFC 7386: objects merge recursively, `null` deletes, everything else replaces.
pub(crate) fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Applies a strategic merge patch; the error is the message the server would return.
pub(crate) fn strategic_merge(
    target: &mut Value,
    patch: &Value,
    strategies: Strategies,
) -> Result<(), String> {
    if !patch.is_object() {
        return Err("strategic merge patch must be a JSON object".into());
    }
    merge_value(target, patch, "", strategies)
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn merge_value(target: &mut Value, patch: &Value, path: &str, s: Strategies) -> Result<(), String> {
    match patch {
        Value::Object(p) => merge_map(target, p, path, s),
        Value::Array(items) => merge_list(target, items, path, s),
        other => {
            *target = other.clone();
            Ok(())
        }
    }
}

fn merge_map(
    target: &mut Value,
    patch: &Map<String, Value>,
    path: &str,
    s: Strategies,
) -> Result<(), String> {
    match patch.get("$patch").map(|d| d.as_str()) {
        None => {}
        Some(Some("replace")) => {
            *target = strip_directives(&Value::Object(patch.clone()));
            return Ok(());
        }
        Some(Some("merge")) => {}
        Some(other) => return Err(format!("unknown patch type: {other:?} at {path:?}")),
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        unreachable!("just made an object")
    };
    let mut orders = Vec::new();
    for (key, value) in patch {
        if let Some(list) = key.strip_prefix("$setElementOrder/") {
            orders.push((list.to_owned(), value));
            continue;
        }
        if let Some(list) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let remove = value.as_array().cloned().unwrap_or_default();
            if let Some(Value::Array(items)) = t.get_mut(list) {
                items.retain(|i| !remove.contains(i));
            }
            continue;
        }
        if key == "$patch" || key == "$retainKeys" {
            continue;
        }
        if key.starts_with('$') {
            return Err(format!("unknown patch directive {key:?} at {path:?}"));
        }
        if value.is_null() || value.get("$patch").and_then(Value::as_str) == Some("delete") {
            t.remove(key);
            continue;
        }
        merge_value(
            t.entry(key.clone()).or_insert(Value::Null),
            value,
            &join(path, key),
            s,
        )?;
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        t.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    for (list, order) in orders {
        let strategy = s(&join(path, &list));
        if let (Some(Value::Array(items)), Value::Array(order)) = (t.get_mut(&list), order) {
            set_element_order(items, order, strategy);
        }
    }
    Ok(())
}

fn merge_list(
    target: &mut Value,
    patch: &[Value],
    path: &str,
    s: Strategies,
) -> Result<(), String> {
    let replace = patch
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let strategy = s(path);
    if replace || strategy.is_none() {
        let items = patch
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .map(strip_directives)
            .collect();
        *target = Value::Array(items);
        return Ok(());
    }
    let mut items = match target.take() {
        Value::Array(items) => items,
        _ => Vec::new(),
    };
    match strategy {
        Some(ListStrategy::MergeKey(key)) => {
            for item in patch {
                let Some(id) = item.get(key) else {
                    return Err(format!(
                        "map: {item} does not contain declared merge key: {key}"
                    ));
                };
                let pos = items.iter().position(|i| i.get(key) == Some(id));
                if item.get("$patch").and_then(Value::as_str) == Some("delete") {
                    if let Some(pos) = pos {
                        items.remove(pos);
                    }
                    continue;
                }
                match pos {
                    Some(pos) => merge_value(&mut items[pos], item, path, s)?,
                    None => {
                        let mut new = Value::Null;
                        merge_value(&mut new, item, path, s)?;
                        items.push(new);
                    }
                }
            }
        }
        Some(ListStrategy::Union) => {
            for item in patch {
                if !items.contains(item) {
                    items.push(item.clone());
                }
            }
        }
        None => unreachable!("handled above"),
    }
    *target = Value::Array(items);
    Ok(())
}

/// `$setElementOrder/<list>`: the listed items first, in that order; the others after,
/// in their current order (what apimachinery's `normalizeElementOrder` yields for items
/// the patch does not mention).
fn set_element_order(items: &mut Vec<Value>, order: &[Value], strategy: Option<ListStrategy>) {
    let id = |v: &Value| -> Value {
        match strategy {
            Some(ListStrategy::MergeKey(key)) => v.get(key).cloned().unwrap_or(Value::Null),
            _ => v.clone(),
        }
    };
    let mut rest: Vec<Value> = std::mem::take(items);
    for wanted in order {
        let wanted = id(wanted);
        if let Some(pos) = rest.iter().position(|i| id(i) == wanted) {
            items.push(rest.remove(pos));
        }
    }
    items.append(&mut rest);
}

fn strip_directives(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

/// RFC 6902, all or nothing: on error `doc` is left unchanged.
pub(crate) fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let Value::Array(ops) = ops else {
        return Err("a JSON patch must be an array of operations".into());
    };
    let mut work = doc.clone();
    for op in ops {
        let name = op.get("op").and_then(Value::as_str).unwrap_or_default();
        let path = op
            .get("path")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("operation {op} has no path"))?;
        let value = || {
            op.get("value")
                .cloned()
                .ok_or_else(|| format!("operation {name} on {path} has no value"))
        };
        let from = || {
            op.get("from")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("operation {name} on {path} has no from"))
        };
        match name {
            "add" => add(&mut work, path, value()?)?,
            "remove" => {
                remove(&mut work, path)?;
            }
            "replace" => {
                let slot = work.pointer_mut(path).ok_or_else(|| {
                    format!("replace operation does not apply: doc is missing path: {path}")
                })?;
                *slot = value()?;
            }
            "move" => {
                let moved = remove(&mut work, from()?)?;
                add(&mut work, path, moved)?;
            }
            "copy" => {
                let from = from()?;
                let copied = work.pointer(from).cloned().ok_or_else(|| {
                    format!("copy operation does not apply: doc is missing from path: {from}")
                })?;
                add(&mut work, path, copied)?;
            }
            "test" => {
                if work.pointer(path) != Some(&value()?) {
                    return Err(format!("testing value {path} failed"));
                }
            }
            other => return Err(format!("unexpected kind of operation: {other:?}")),
        }
    }
    *doc = work;
    Ok(())
}

/// Splits a JSON pointer into its parent pointer and its last, unescaped, token.
fn split_pointer(path: &str) -> Result<(&str, String), String> {
    let Some(pos) = path.rfind('/') else {
        return Err(format!("invalid JSON pointer {path:?}"));
    };
    let token = path[pos + 1..].replace("~1", "/").replace("~0", "~");
    Ok((&path[..pos], token))
}

fn add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, token) = split_pointer(path)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            m.insert(token, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            let index = if token == "-" {
                items.len()
            } else {
                token
                    .parse::<usize>()
                    .ok()
                    .filter(|&i| i <= items.len())
                    .ok_or_else(|| {
                        format!(
                            "add operation does not apply: index {token} out of bounds in {path}"
                        )
                    })?
            };
            items.insert(index, value);
            Ok(())
        }
        _ => Err(format!(
            "add operation does not apply: doc is missing path: {path}"
        )),
    }
}

fn remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, token) = split_pointer(path)?;
    let missing = || format!("remove operation does not apply: doc is missing path: {path}");
    match doc.pointer_mut(parent) {
        Some(Value::Object(m)) => m.remove(&token).ok_or_else(missing),
        Some(Value::Array(items)) => match token.parse::<usize>() {
            Ok(i) if i < items.len() => Ok(items.remove(i)),
            _ => Err(missing()),
        },
        _ => Err(missing()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn node_lists(path: &str) -> Option<ListStrategy> {
        match path {
            "status.conditions" | "status.addresses" => Some(ListStrategy::MergeKey("type")),
            "metadata.finalizers" => Some(ListStrategy::Union),
            _ => None,
        }
    }

    #[test]
    fn merge_patch_follows_rfc7386() {
        // RFC 7386 appendix A, a few of its cases.
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
        let mut doc = json!({"a": "foo"});
        merge_patch(&mut doc, &json!("bar"));
        assert_eq!(doc, json!("bar"));
    }

    #[test]
    fn strategic_merges_conditions_by_type() {
        let mut node = json!({"status": {"conditions": [
            {"type": "Ready", "status": "True"},
            {"type": "Foreign", "status": "False"},
        ]}});
        let patch = json!({"status": {
            "$setElementOrder/conditions": [{"type": "Ready"}, {"type": "Other"}],
            "conditions": [{"type": "Ready", "status": "False"}, {"type": "Other", "status": "True"}],
        }});
        strategic_merge(&mut node, &patch, node_lists).unwrap();
        assert_eq!(
            node["status"]["conditions"],
            json!([
                {"type": "Ready", "status": "False"},
                {"type": "Other", "status": "True"},
                {"type": "Foreign", "status": "False"},
            ])
        );
        let delete = json!({"status": {"conditions": [{"type": "Other", "$patch": "delete"}]}});
        strategic_merge(&mut node, &delete, node_lists).unwrap();
        assert_eq!(node["status"]["conditions"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn strategic_replaces_atomic_lists_and_unions_sets() {
        let mut node =
            json!({"metadata": {"finalizers": ["a"]}, "spec": {"taints": [{"key": "x"}]}});
        let patch =
            json!({"metadata": {"finalizers": ["b", "a"]}, "spec": {"taints": [{"key": "y"}]}});
        strategic_merge(&mut node, &patch, node_lists).unwrap();
        assert_eq!(node["metadata"]["finalizers"], json!(["a", "b"]));
        assert_eq!(node["spec"]["taints"], json!([{"key": "y"}]));
    }

    #[test]
    fn strategic_rejects_items_without_the_merge_key() {
        let mut node = json!({});
        let patch = json!({"status": {"conditions": [{"status": "True"}]}});
        assert!(strategic_merge(&mut node, &patch, node_lists).is_err());
    }

    #[test]
    fn json_patch_is_all_or_nothing() {
        let mut doc = json!({"a": {"b": [1, 2]}});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/a/b/-", "value": 3},
                {"op": "replace", "path": "/a/b/0", "value": 0},
                {"op": "copy", "from": "/a/b", "path": "/c"},
                {"op": "move", "from": "/c", "path": "/d"},
                {"op": "test", "path": "/d/2", "value": 3},
                {"op": "remove", "path": "/a/b/1"},
            ]),
        )
        .unwrap();
        assert_eq!(doc, json!({"a": {"b": [0, 3]}, "d": [0, 2, 3]}));
        let before = doc.clone();
        let err = json_patch(
            &mut doc,
            &json!([{"op": "remove", "path": "/a"}, {"op": "replace", "path": "/zz", "value": 1}]),
        );
        assert!(err.is_err());
        assert_eq!(doc, before);
    }
}
