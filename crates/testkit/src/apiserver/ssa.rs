//! Field ownership of UsageBackfills (`metadata.managedFields`), as
//! structured-merge-diff keeps it for the apiserver: server-side apply
//! merges the applied configuration into the object, answers 409 when it
//! would change a field another manager owns (unless `force`), and
//! removes fields its manager no longer applies that nobody else owns;
//! updates (merge patches, PUT) take ownership of the fields they change.
//!
//! Lists marked `x-kubernetes-list-type: map` merge item by item, keyed by
//! their `x-kubernetes-list-map-keys` (`status.conditions` by `type`);
//! every other list is atomic. A field set holds every node of the
//! applied configuration (as paths like `f:status`, `f:conditions`,
//! `k:{"type":"Ready"}`); conflicts are checked on leaves only.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Map, Value, json};

use super::schema::Structural;

/// One step of a field path: `f:name` or `k:{"type":"Ready"}`.
pub type Path = Vec<String>;

/// A manager's entry: who, how, and for which subresource.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Manager {
    pub name: String,
    /// `Apply` or `Update`.
    pub operation: String,
    /// `""` for the main resource, `status` for the subresource.
    pub subresource: String,
}

/// The managed fields of one object.
pub type Owners = BTreeMap<Manager, BTreeSet<Path>>;

/// A conflict: the field and the manager owning it.
pub struct Conflict {
    pub manager: String,
    /// The owner's subresource (`status`), or empty.
    pub subresource: String,
    pub field: String,
}

impl Conflict {
    /// `conflict with "m" with subresource "status"`, as the apiserver
    /// words an owner (its cause's message; the Status message adds
    /// `: <field>`).
    pub fn owner(&self) -> String {
        match self.subresource.as_str() {
            "" => format!("conflict with {:?}", self.manager),
            sub => format!("conflict with {:?} with subresource {sub:?}", self.manager),
        }
    }
}

/// Reads `metadata.managedFields`.
pub fn owners_of(obj: &Value) -> Owners {
    let mut out = Owners::new();
    for entry in obj["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let manager = Manager {
            name: entry["manager"].as_str().unwrap_or_default().to_owned(),
            operation: entry["operation"].as_str().unwrap_or_default().to_owned(),
            subresource: entry["subresource"].as_str().unwrap_or_default().to_owned(),
        };
        let mut set = BTreeSet::new();
        collect_fields_v1(&entry["fieldsV1"], &mut Vec::new(), &mut set);
        out.insert(manager, set);
    }
    out
}

/// Writes `metadata.managedFields` (empty field sets dropped).
pub fn set_owners(obj: &mut Value, owners: &Owners, api_version: &str) {
    let entries: Vec<Value> = owners
        .iter()
        .filter(|(_, set)| !set.is_empty())
        .map(|(m, set)| {
            let mut e = json!({
                "manager": m.name,
                "operation": m.operation,
                "apiVersion": api_version,
                "time": "2026-01-01T00:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(set),
            });
            if !m.subresource.is_empty() {
                e["subresource"] = json!(m.subresource);
            }
            e
        })
        .collect();
    if entries.is_empty() {
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("managedFields");
        }
    } else {
        obj["metadata"]["managedFields"] = Value::Array(entries);
    }
}

fn to_fields_v1(set: &BTreeSet<Path>) -> Value {
    let mut root = json!({});
    for path in set {
        let mut node = &mut root;
        for step in path {
            node = node
                .as_object_mut()
                .unwrap()
                .entry(step.clone())
                .or_insert(json!({}));
        }
        node.as_object_mut()
            .unwrap()
            .entry(".")
            .or_insert(json!({}));
    }
    root
}

fn collect_fields_v1(v: &Value, path: &mut Path, out: &mut BTreeSet<Path>) {
    let Some(map) = v.as_object() else { return };
    for (k, child) in map {
        if k == "." {
            out.insert(path.clone());
        } else {
            path.push(k.clone());
            collect_fields_v1(child, path, out);
            path.pop();
        }
    }
}

/// Every node of `v` as a field path (`names` are the schema's field
/// names from the root, for list-map keys).
pub fn field_set(v: &Value, schema: &Structural) -> BTreeSet<Path> {
    let mut out = BTreeSet::new();
    walk(v, schema, &mut Vec::new(), &mut Vec::new(), &mut out);
    out
}

fn walk(
    v: &Value,
    schema: &Structural,
    names: &mut Vec<String>,
    path: &mut Path,
    out: &mut BTreeSet<Path>,
) {
    if !path.is_empty() {
        out.insert(path.clone());
    }
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                names.push(k.clone());
                path.push(format!("f:{k}"));
                walk(child, schema, names, path, out);
                path.pop();
                names.pop();
            }
        }
        Value::Array(items) => {
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            if let Some(keys) = schema.list_map_keys(&refs) {
                for item in items {
                    path.push(item_key(item, &keys));
                    walk(item, schema, names, path, out);
                    path.pop();
                }
            }
        }
        _ => {}
    }
}

fn item_key(item: &Value, keys: &[String]) -> String {
    let mut m = Map::new();
    for k in keys {
        m.insert(k.clone(), item[k.as_str()].clone());
    }
    format!("k:{}", Value::Object(m))
}

/// The value at `path` in `v`, if any.
pub fn value_at<'a>(v: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = v;
    for step in path {
        if let Some(f) = step.strip_prefix("f:") {
            cur = cur.as_object()?.get(f)?;
        } else if let Some(k) = step.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(k).ok()?;
            cur = cur
                .as_array()?
                .iter()
                .find(|item| want.iter().all(|(wk, wv)| item[wk.as_str()] == *wv))?;
        } else {
            return None;
        }
    }
    Some(cur)
}

fn remove_at(v: &mut Value, path: &[String]) {
    let Some((last, parent)) = path.split_last() else {
        return;
    };
    let mut cur = v;
    for step in parent {
        let next = if let Some(f) = step.strip_prefix("f:") {
            cur.as_object_mut().and_then(|m| m.get_mut(f))
        } else if let Some(k) = step.strip_prefix("k:") {
            let want: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            cur.as_array_mut().and_then(|items| {
                items
                    .iter_mut()
                    .find(|item| want.iter().all(|(wk, wv)| item[wk.as_str()] == *wv))
            })
        } else {
            None
        };
        match next {
            Some(n) => cur = n,
            None => return,
        }
    }
    if let Some(f) = last.strip_prefix("f:") {
        if let Some(m) = cur.as_object_mut() {
            m.remove(f);
        }
    } else if let Some(k) = last.strip_prefix("k:") {
        let want: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
        if let Some(items) = cur.as_array_mut() {
            items.retain(|item| !want.iter().all(|(wk, wv)| item[wk.as_str()] == *wv));
        }
    }
}

/// A leaf of `set`: no other path in it extends this one.
fn is_leaf(set: &BTreeSet<Path>, p: &Path) -> bool {
    set.range(p.clone()..)
        .nth(1)
        .is_none_or(|next| !next.starts_with(p))
}

/// Merges `applied` into `live` (objects by field, map lists by key,
/// everything else replaced).
pub fn merge_applied(
    live: &mut Value,
    applied: &Value,
    schema: &Structural,
    names: &mut Vec<String>,
) {
    match (live.as_object_mut(), applied) {
        (Some(l), Value::Object(a)) => {
            for (k, av) in a {
                names.push(k.clone());
                match l.get_mut(k) {
                    Some(lv) => merge_applied(lv, av, schema, names),
                    None => {
                        l.insert(k.clone(), av.clone());
                    }
                }
                names.pop();
            }
            return;
        }
        (None, _) => {}
        (Some(_), _) => {}
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    if let (Some(keys), Some(litems), Value::Array(aitems)) =
        (schema.list_map_keys(&refs), live.as_array_mut(), applied)
    {
        for aitem in aitems {
            let found = litems
                .iter_mut()
                .find(|li| keys.iter().all(|k| li[k.as_str()] == aitem[k.as_str()]));
            match found {
                Some(li) => merge_applied(li, aitem, schema, names),
                None => litems.push(aitem.clone()),
            }
        }
        return;
    }
    *live = applied.clone();
}

/// Server-side apply of `applied` (already limited to what the endpoint
/// may change) by `manager` onto `live`: the new object and owners, or
/// the conflicts.
pub fn apply(
    live: &Value,
    applied: &Value,
    manager: &Manager,
    force: bool,
    schema: &Structural,
) -> Result<(Value, Owners), Vec<Conflict>> {
    let mut owners = owners_of(live);
    let fields = field_set(applied, schema);
    let mut conflicts = Vec::new();
    for (other, set) in owners.iter_mut() {
        if other.name == manager.name && other.subresource == manager.subresource {
            continue;
        }
        let clashing: Vec<Path> = set
            .iter()
            .filter(|p| fields.contains(*p) && is_leaf(&fields, p))
            .filter(|p| value_at(live, p) != value_at(applied, p))
            .cloned()
            .collect();
        if force {
            for p in &clashing {
                set.remove(p);
            }
        } else {
            conflicts.extend(clashing.iter().map(|p| Conflict {
                manager: other.name.clone(),
                subresource: other.subresource.clone(),
                field: display(p),
            }));
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let mine = owners.remove(manager).unwrap_or_default();
    let mut obj = live.clone();
    merge_applied(&mut obj, applied, schema, &mut Vec::new());
    // Fields this manager stopped applying and nobody else owns go (a
    // dropped node takes its subtree along: its own fields name it).
    let others: BTreeSet<&Path> = owners.values().flatten().collect();
    let mut dropped: Vec<&Path> = mine
        .iter()
        .filter(|p| !fields.contains(*p) && !others.contains(p))
        .collect();
    dropped.sort_by_key(|p| p.len());
    let mut removed: Vec<&Path> = Vec::new();
    for p in dropped {
        if removed.iter().any(|r| p.starts_with(r)) {
            continue;
        }
        remove_at(&mut obj, p);
        removed.push(p);
    }
    owners.insert(manager.clone(), fields);
    Ok((obj, owners))
}

/// An update (merge patch or PUT) by `manager` from `old` to `new`: it
/// takes the fields it changed, which other managers lose.
pub fn update(old: &Value, new: &Value, manager: &Manager, schema: &Structural) -> Owners {
    let mut owners = owners_of(old);
    let old_set = field_set(&strip_meta(old), schema);
    let new_set = field_set(&strip_meta(new), schema);
    let changed: BTreeSet<Path> = new_set
        .iter()
        .filter(|p| is_leaf(&new_set, p) && value_at(old, p) != value_at(new, p))
        .cloned()
        .collect();
    let gone: BTreeSet<&Path> = old_set.difference(&new_set).collect();
    for set in owners.values_mut() {
        set.retain(|p| !changed.contains(p) && !gone.contains(p));
    }
    if !changed.is_empty() {
        let entry = owners.entry(manager.clone()).or_default();
        for p in changed {
            for i in 1..=p.len() {
                entry.insert(p[..i].to_vec());
            }
        }
    }
    owners
}

/// What field ownership covers: everything but the apiserver's own
/// metadata.
fn strip_meta(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        meta.retain(|k, _| {
            ["labels", "annotations", "finalizers", "ownerReferences"].contains(&k.as_str())
        });
    }
    v
}

/// `.status.conditions[type="Ready"].status`.
pub fn display(p: &Path) -> String {
    let mut out = String::new();
    for step in p {
        if let Some(f) = step.strip_prefix("f:") {
            out.push('.');
            out.push_str(f);
        } else if let Some(k) = step.strip_prefix("k:") {
            let keys: Map<String, Value> = serde_json::from_str(k).unwrap_or_default();
            let inner: Vec<String> = keys.iter().map(|(k, v)| format!("{k}={v}")).collect();
            out.push_str(&format!("[{}]", inner.join(",")));
        }
    }
    out
}

/// The applied configuration limited to what ownership covers.
pub fn applied_fields(body: &Value) -> Value {
    strip_meta(body)
}
