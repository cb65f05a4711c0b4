//! ConfigMaps as the test API server serves them to the progress records: server-side apply, get, delete, and the apiserver's validation.

use super::*;

/// The fields of a ConfigMap a manager can own: labels, annotations, data
/// and binaryData entries, as `section.key`.
pub(super) const CONFIG_MAP_SECTIONS: [(&str, &str); 4] = [
    ("labels", "/metadata/labels"),
    ("annotations", "/metadata/annotations"),
    ("data", "/data"),
    ("binaryData", "/binaryData"),
];

/// ConfigMaps, in the shape they share with Leases.
pub(super) const CONFIG_MAPS: NamedKind = NamedKind {
    resource: "configmaps",
    group: "",
    api_version: "v1",
    kind: "ConfigMap",
    uid_tag: 4,
};

/// Largest ConfigMap the apiserver stores (data and binaryData together).
pub(super) const CONFIG_MAP_MAX_BYTES: usize = 1024 * 1024;

impl State {
    /// Writes to ConfigMaps (reads take the common path): `None` when the
    /// request is not one of those.
    pub(super) fn config_map_request(
        &mut self,
        r: &Recorded,
        route: &Route,
    ) -> Option<(StatusCode, FakeBody)> {
        let namespace = route.namespace.clone().unwrap_or_default();
        let key = |name: &str| CONFIG_MAPS.key(&namespace, name);
        let body = r.body.clone().unwrap_or_default();
        Some(match (r.method.as_str(), &route.name) {
            ("POST", None) => {
                let manager = r.field_manager().unwrap_or("unknown").to_owned();
                self.create_named(
                    &CONFIG_MAPS,
                    &namespace,
                    body,
                    &printed_manager(&manager, false, "v1"),
                    config_map_checked,
                    |v| config_map_fields(v).collect(),
                )
            }
            ("PATCH", Some(name)) => {
                if r.content_type.as_deref() != Some("application/apply-patch+yaml") {
                    // Merge and strategic-merge patches: not used, not served.
                    return None;
                }
                let manager = r.field_manager().unwrap_or("").to_owned();
                if manager.is_empty() {
                    return Some(status_error(
                        422,
                        "Invalid",
                        "PATCH with apply requires a fieldManager",
                    ));
                }
                if body["apiVersion"] != json!("v1") || body["kind"] != json!("ConfigMap") {
                    return Some(status_error(
                        400,
                        "BadRequest",
                        "apply needs apiVersion and kind",
                    ));
                }
                if let Some(applied) = body["metadata"]["name"].as_str()
                    && applied != name
                {
                    return Some(status_error(
                        400,
                        "BadRequest",
                        &format!(
                            "the name of the object ({applied}) does not match the name on the URL ({name})"
                        ),
                    ));
                }
                let old = self.objects.get(&key(name)).cloned();
                // An apply that creates is also a create: the apiserver
                // authorizes both verbs.
                if old.is_none()
                    && !rbac::authorize(
                        self.secret_access,
                        &self.rbac_scope,
                        route.namespace.as_deref(),
                        "",
                        "configmaps",
                        "create",
                    )
                {
                    return Some(forbidden(
                        OPERATOR_USER,
                        "create",
                        "configmaps",
                        None,
                        route.namespace.as_deref(),
                        Some(name),
                    ));
                }
                if let Some(old) = &old {
                    let want = &body["metadata"]["resourceVersion"];
                    if !want.is_null() && *want != old["metadata"]["resourceVersion"] {
                        return Some(stale("configmaps", name));
                    }
                }
                let mut v = match &old {
                    Some(old) => old.clone(),
                    None => self.new_named(&CONFIG_MAPS, &namespace, name, json!({})),
                };
                let owners = self.owners.entry(key(name)).or_default();
                let applied: BTreeMap<String, Value> = CONFIG_MAP_SECTIONS
                    .iter()
                    .flat_map(|(section, path)| {
                        body.pointer(path)
                            .and_then(Value::as_object)
                            .into_iter()
                            .flatten()
                            .map(move |(k, value)| (format!("{section}.{k}"), value.clone()))
                    })
                    .collect();
                let force = r.query.get("force").map(String::as_str) == Some("true");
                let applier = printed_manager(&manager, true, "v1");
                let conflicts: Vec<(String, String)> = applied
                    .iter()
                    .filter(|(f, value)| {
                        owners.get(*f).is_some_and(|o| *o != applier)
                            && config_map_field(&v, f) != Some(*value)
                    })
                    .map(|(f, _)| (format!(".{f}"), owners[f].clone()))
                    .collect();
                if !conflicts.is_empty() && !force {
                    return Some(apply_conflicts(&conflicts));
                }
                // What this manager owned and no longer sends goes.
                let dropped: Vec<String> = owners
                    .iter()
                    .filter(|(f, o)| **o == applier && !applied.contains_key(*f))
                    .map(|(f, _)| f.clone())
                    .collect();
                for f in dropped {
                    owners.remove(&f);
                    set_config_map_field(&mut v, &f, None);
                }
                for (f, value) in applied {
                    set_config_map_field(&mut v, &f, Some(value));
                    owners.insert(f, applier.clone());
                }
                if let Err(e) = config_map_checked(name, &v) {
                    return Some(e);
                }
                match old {
                    Some(old) if old == v => ok(&old),
                    Some(_) => {
                        self.store(key(name), v, "MODIFIED");
                        ok(&self.objects[&key(name)])
                    }
                    None => {
                        self.store(key(name), v, "ADDED");
                        (StatusCode::CREATED, full(&self.objects[&key(name)]))
                    }
                }
            }
            ("DELETE", Some(name)) => self.delete_named(&CONFIG_MAPS, &namespace, name),
            _ => return None,
        })
    }
}

/// `section.key` of every owned field of a stored ConfigMap.
pub(super) fn config_map_fields(v: &Value) -> impl Iterator<Item = String> + '_ {
    CONFIG_MAP_SECTIONS.iter().flat_map(move |(section, path)| {
        v.pointer(path)
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .map(move |(k, _)| format!("{section}.{k}"))
    })
}

pub(super) fn config_map_field<'a>(v: &'a Value, field: &str) -> Option<&'a Value> {
    let (section, k) = field.split_once('.')?;
    let (_, path) = CONFIG_MAP_SECTIONS.iter().find(|(s, _)| *s == section)?;
    v.pointer(path)?.get(k)
}

/// Sets (Some) or removes (None) `section.key`; an emptied map goes.
pub(super) fn set_config_map_field(v: &mut Value, field: &str, value: Option<Value>) {
    let Some((section, k)) = field.split_once('.') else {
        return;
    };
    let (parent, child) = match section {
        "labels" | "annotations" => ("metadata", section),
        _ => ("", section),
    };
    let holder = if parent.is_empty() { v } else { &mut v[parent] };
    match value {
        Some(value) => holder[child][k] = value,
        None => {
            if let Some(map) = holder.get_mut(child).and_then(Value::as_object_mut) {
                map.remove(k);
                if map.is_empty()
                    && let Some(o) = holder.as_object_mut()
                {
                    o.remove(child);
                }
            }
        }
    }
}

/// The apiserver's ConfigMap validation: the name, label values, data
/// keys and values (strings only), the 1 MiB bound.
pub(super) fn config_map_checked(name: &str, v: &Value) -> Result<(), (StatusCode, FakeBody)> {
    let mut causes: Vec<(String, String)> = Vec::new();
    let subdomain = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            })
    };
    if !subdomain(name) {
        causes.push((
            "metadata.name".into(),
            format!("Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"),
        ));
    }
    for value in v["metadata"]["labels"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(_, v)| v)
    {
        let text = value.as_str().unwrap_or_default();
        let ok = value.is_string()
            && text.len() <= 63
            && text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !ok {
            causes.push((
                "metadata.labels".into(),
                format!("Invalid value: {text:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.' (at most 63)"),
            ));
        }
    }
    let mut size = 0;
    for section in ["data", "binaryData"] {
        for (k, value) in v[section].as_object().into_iter().flatten() {
            let valid_key = !k.is_empty()
                && k.len() <= 253
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
            if !valid_key {
                causes.push((
                    format!("{section}[{k}]"),
                    format!("Invalid value: {k:?}: a valid config key must consist of alphanumeric characters, '-', '_' or '.' \
                             (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"),
                ));
            }
            let Some(text) = value.as_str() else {
                return Err(status_error(
                    400,
                    "BadRequest",
                    &format!(
                        "json: cannot unmarshal {} into Go struct field ConfigMap.{section} of type string",
                        kind_of_json(value)
                    ),
                ));
            };
            size += k.len() + text.len();
        }
    }
    if size > CONFIG_MAP_MAX_BYTES {
        causes.push((
            "[]".into(),
            format!("Too long: must have at most {CONFIG_MAP_MAX_BYTES} bytes"),
        ));
    }
    if causes.is_empty() {
        return Ok(());
    }
    let causes: Vec<(&str, &str)> = causes
        .iter()
        .map(|(f, m)| (f.as_str(), m.as_str()))
        .collect();
    Err(config_map_invalid(name, &causes))
}

pub(super) fn kind_of_json(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// 422 Invalid for a ConfigMap, one cause per field.
pub(super) fn config_map_invalid(name: &str, causes: &[(&str, &str)]) -> (StatusCode, FakeBody) {
    let text: Vec<String> = causes.iter().map(|(f, m)| format!("{f}: {m}")).collect();
    let body = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": format!("ConfigMap \"{name}\" is invalid: {}", text.join(", ")),
        "reason": "Invalid",
        "code": 422,
        "details": {
            "name": name,
            "kind": "ConfigMap",
            "causes": causes.iter().map(|(f, m)| json!({
                "reason": "FieldValueInvalid",
                "message": m,
                "field": f,
            })).collect::<Vec<_>>(),
        },
    });
    (StatusCode::UNPROCESSABLE_ENTITY, full(&body))
}
