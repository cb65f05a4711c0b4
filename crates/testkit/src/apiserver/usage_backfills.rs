//! How the test API server admits a UsageBackfill: merge and JSON patches, the schema with its defaults, pruning and CEL rules.

use super::*;

/// A PATCH of a UsageBackfill (main resource or `status`), as the
/// apiserver handles it: the new object, or the error answer.
pub(super) fn patch_usage_backfill(
    r: &Recorded,
    old: &Value,
    status_write: bool,
) -> Result<Value, (StatusCode, FakeBody)> {
    let schema = Structural::usage_backfill();
    let body = r.body.clone().unwrap_or_default();
    let name = old["metadata"]["name"].as_str().unwrap_or_default();
    let want_rv = &body["metadata"]["resourceVersion"];
    if !want_rv.is_null() && *want_rv != old["metadata"]["resourceVersion"] {
        return Err(stale("usagebackfills", name));
    }
    let manager_name = r.field_manager().unwrap_or("unknown").to_owned();
    let subresource = if status_write { "status" } else { "" }.to_owned();
    let (mut new, owners) = match r.content_type.as_deref() {
        Some("application/apply-patch+yaml") => {
            if r.field_manager().is_none_or(str::is_empty) {
                return Err(status_error(
                    422,
                    "Invalid",
                    "PATCH with apply requires a fieldManager",
                ));
            }
            if body["apiVersion"] != json!(UBF_API) || body["kind"] != json!("UsageBackfill") {
                return Err(status_error(
                    400,
                    "BadRequest",
                    "apply needs apiVersion and kind",
                ));
            }
            let mut applied = ssa::applied_fields(&body);
            // What the endpoint may change: the status on `status`,
            // everything else on the main resource.
            if let Some(m) = applied.as_object_mut() {
                if status_write {
                    m.retain(|k, _| k == "status");
                } else {
                    m.remove("status");
                }
            }
            let manager = ssa::Manager {
                name: manager_name.clone(),
                operation: "Apply".into(),
                subresource: subresource.clone(),
            };
            let force = r.query.get("force").map(String::as_str) == Some("true");
            let applied = ssa::apply(old, &applied, &manager, force, schema)
                .map_err(|conflicts| apply_conflict(&conflicts))?;
            (applied.0, Some(applied.1))
        }
        Some("application/merge-patch+json") => {
            let mut new = old.clone();
            let mut patch = body.clone();
            if let Some(m) = patch.get_mut("metadata").and_then(Value::as_object_mut) {
                m.remove("resourceVersion");
            }
            merge(&mut new, &patch);
            (new, None)
        }
        _ => {
            return Err(status_error(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format",
            ));
        }
    };
    if status_write {
        // The status strategy: everything but the status is the old
        // object's.
        let status = new.get("status").cloned();
        new = old.clone();
        match status {
            Some(s) => new["status"] = s,
            None => {
                new.as_object_mut().unwrap().remove("status");
            }
        }
    } else {
        new["status"] = old["status"].clone();
        if old["status"].is_null() {
            new.as_object_mut().unwrap().remove("status");
        }
        if new["metadata"]["uid"] != old["metadata"]["uid"] {
            return Err(invalid(
                name,
                &[("metadata.uid", "FieldValueInvalid", "field is immutable")],
            ));
        }
        if !old["metadata"]["deletionTimestamp"].is_null() {
            let before: Vec<&Value> = old["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .collect();
            let added: Vec<String> = new["metadata"]["finalizers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|f| !before.contains(f))
                .map(|f| f.to_string())
                .collect();
            if !added.is_empty() {
                // Go's %#v of a []string. kube-apiserver 1.34 and 1.37 list
                // this cause twice (the message, deduplicated, once).
                let message = format!(
                    "Forbidden: no new finalizers can be added if the object is being deleted, \
                     found new finalizers []string{{{}}}",
                    added.join(", ")
                );
                let cause = (
                    "metadata.finalizers",
                    "FieldValueForbidden",
                    message.as_str(),
                );
                return Err(invalid(name, &[cause, cause]));
            }
        }
        new["metadata"]["deletionTimestamp"] = old["metadata"]["deletionTimestamp"].clone();
        if old["metadata"]["deletionTimestamp"].is_null() {
            new["metadata"]
                .as_object_mut()
                .unwrap()
                .remove("deletionTimestamp");
        }
    }
    // An update owns what it changed, once the endpoint has dropped
    // what it may not change.
    let owners = owners.unwrap_or_else(|| {
        let manager = ssa::Manager {
            name: manager_name,
            operation: "Update".into(),
            subresource,
        };
        ssa::update(old, &new, &manager, schema)
    });
    ssa::set_owners(&mut new, &owners, UBF_API);
    admitted(new, Some(old)).map_err(|errors| {
        let causes: Vec<(&str, &str, &str)> = errors
            .iter()
            .map(|e| (e.field.as_str(), e.reason, e.message.as_str()))
            .collect();
        invalid(name, &causes)
    })
}

/// What the apiserver makes of a UsageBackfill it is asked to store
/// (`old` for an update): pruned, defaulted, its generation moved when
/// anything but metadata and status changed, and validated (on an update,
/// only the part the endpoint changed: the status, or the rest), then its
/// CEL rules run (ratcheted per node, see [`cel`]).
pub(super) fn admitted(
    mut v: Value,
    old: Option<&Value>,
) -> Result<Value, Vec<schema::FieldError>> {
    let schema = Structural::usage_backfill();
    if old.is_none() {
        // With the status subresource, a create sets no status: the
        // strategy's PrepareForCreate drops it (`status` writes it later).
        drop_status(&mut v);
    }
    schema.normalize(&mut v);
    let desired = |o: &Value| {
        let mut o = o.clone();
        if let Some(m) = o.as_object_mut() {
            m.remove("metadata");
            m.remove("status");
        }
        o
    };
    let mut errors = schema.validate(&v);
    if let Some(old) = old {
        let status_changed = v["status"] != old["status"];
        let rest_changed = desired(&v) != desired(old);
        // Validation ratcheting, roughly: what the write did not touch is
        // not validated again.
        errors.retain(|e| {
            if e.field == "status"
                || e.field.starts_with("status.")
                || e.field.starts_with("status[")
            {
                status_changed
            } else {
                rest_changed
            }
        });
        if rest_changed {
            let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
            v["metadata"]["generation"] = json!(g + 1);
        }
    }
    let rule_errors = schema.validate_rules(&v, old, &errors);
    errors.extend(rule_errors);
    if errors.is_empty() {
        Ok(v)
    } else {
        Err(errors)
    }
}
