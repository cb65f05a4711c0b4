//! The Status bodies of the refusals the test API server answers with, worded as kube-apiserver words them.

use super::*;

/// Who every client of this server is: the operator's ServiceAccount.
pub(super) const OPERATOR_USER: &str = "system:serviceaccount:usage-system:usage-backfill";

pub(super) fn drop_status(v: &mut Value) {
    if let Some(m) = v.as_object_mut() {
        m.remove("status");
    }
}

/// 422 Invalid with one cause per field: (field, reason, message).
pub(super) fn invalid(name: &str, causes: &[(&str, &str, &str)]) -> (StatusCode, FakeBody) {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        full(&invalid_status(name, causes)),
    )
}

/// 422 Invalid for an Event, of either API group: both store core
/// Events, and kube-apiserver names the core kind in the refusal
/// (`Event "x" is invalid`) whichever group was asked.
pub(super) fn invalid_event(
    name: &str,
    _group: &str,
    causes: &[(String, String)],
) -> (StatusCode, FakeBody) {
    let causes: Vec<(&str, &str, &str)> = causes
        .iter()
        .map(|(f, m)| (f.as_str(), cause_reason(m), m.as_str()))
        .collect();
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        full(&invalid_status_of("Event", "", name, &causes)),
    )
}

/// The Status of a 422 Invalid of a UsageBackfill.
pub(super) fn invalid_status(name: &str, causes: &[(&str, &str, &str)]) -> Value {
    invalid_status_of("UsageBackfill", "usage.multica.ai", name, causes)
}

/// The Status of a 422 Invalid, as apimachinery's `NewInvalid` builds it:
/// one cause per field error, and a message listing them as its error
/// aggregate does (one bare, several in brackets, each text once).
pub(super) fn invalid_status_of(
    kind: &str,
    group: &str,
    name: &str,
    causes: &[(&str, &str, &str)],
) -> Value {
    let mut text: Vec<String> = Vec::new();
    for (f, _, m) in causes {
        let t = format!("{f}: {m}");
        if !text.contains(&t) {
            text.push(t);
        }
    }
    let listed = match text.as_slice() {
        [one] => one.clone(),
        _ => format!("[{}]", text.join(", ")),
    };
    let qualified = if group.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}.{group}")
    };
    json!({
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": format!("{qualified} \"{name}\" is invalid: {listed}"),
        "reason": "Invalid",
        "code": 422,
        "details": details_of(name, group, kind, causes),
    })
}

/// A Status's `details`, as apimachinery fills them: empty fields left out.
fn details_of(name: &str, group: &str, kind: &str, causes: &[(&str, &str, &str)]) -> Value {
    let mut details = json!({
        "kind": kind,
        "causes": causes.iter().map(|(f, r, m)| json!({
            "reason": r,
            "message": m,
            "field": f,
        })).collect::<Vec<_>>(),
    });
    if !name.is_empty() {
        details["name"] = json!(name);
    }
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    details
}

/// A cause's reason, from the start of its message as field.Error prints it.
pub(super) fn cause_reason(message: &str) -> &'static str {
    if message.starts_with("Required value") {
        "FieldValueRequired"
    } else if message.starts_with("Forbidden") {
        "FieldValueForbidden"
    } else {
        "FieldValueInvalid"
    }
}

pub(super) fn full(v: &Value) -> FakeBody {
    FakeBody::Full(Some(Bytes::from(serde_json::to_vec(v).unwrap())))
}

pub(super) fn ok(v: &Value) -> (StatusCode, FakeBody) {
    (StatusCode::OK, full(v))
}

pub(super) fn status_error(code: u16, reason: &str, message: &str) -> (StatusCode, FakeBody) {
    let body = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    (StatusCode::from_u16(code).unwrap(), full(&body))
}

/// 404, naming the resource with its group as the apiserver does
/// (`usagebackfills.usage.multica.ai "x" not found`; core resources bare).
pub(super) fn not_found(resource: &str, name: &str) -> (StatusCode, FakeBody) {
    status_with_details(
        404,
        "NotFound",
        &format!("{} \"{name}\" not found", qualified(resource)),
        resource_details(resource, Some(name)),
    )
}

/// The API group of a resource this server serves.
pub(super) fn group_of(resource: &str) -> &'static str {
    match resource {
        "usagebackfills" => "usage.multica.ai",
        "leases" => "coordination.k8s.io",
        "events" => "events.k8s.io",
        _ => "",
    }
}

/// As the apiserver names a resource in a message:
/// `usagebackfills.usage.multica.ai`; core resources bare.
pub(super) fn qualified(resource: &str) -> String {
    match group_of(resource) {
        "" => resource.to_owned(),
        group => format!("{resource}.{group}"),
    }
}

/// `details` naming the resource (and the object, when there is one), as
/// the apiserver's NotFound, AlreadyExists, Conflict and Forbidden carry.
pub(super) fn resource_details(resource: &str, name: Option<&str>) -> Value {
    let mut details = json!({"kind": resource});
    if let Some(name) = name {
        details["name"] = json!(name);
    }
    let group = group_of(resource);
    if !group.is_empty() {
        details["group"] = json!(group);
    }
    details
}

/// A failure Status with `details`.
pub(super) fn status_with_details(
    code: u16,
    reason: &str,
    message: &str,
    details: Value,
) -> (StatusCode, FakeBody) {
    let body = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": details,
        "code": code,
    });
    (StatusCode::from_u16(code).unwrap(), full(&body))
}

/// 409 for a write whose resourceVersion is not the stored one.
pub(super) fn stale(resource: &str, name: &str) -> (StatusCode, FakeBody) {
    status_with_details(
        409,
        "Conflict",
        &format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            qualified(resource)
        ),
        resource_details(resource, Some(name)),
    )
}

/// 403 as the RBAC authorizer words it: `usagebackfills.usage.multica.ai
/// "x" is forbidden: User "..." cannot patch resource
/// "usagebackfills/status" in API group "usage.multica.ai" in the
/// namespace "ns"` (the name left out for a list, a watch or a create).
pub(super) fn forbidden(
    user: &str,
    verb: &str,
    resource: &str,
    subresource: Option<&str>,
    namespace: Option<&str>,
    name: Option<&str>,
) -> (StatusCode, FakeBody) {
    let object = match name {
        Some(name) => format!("{} \"{name}\"", qualified(resource)),
        None => qualified(resource),
    };
    let rbac_resource = match subresource {
        Some(sub) => format!("{resource}/{sub}"),
        None => resource.to_owned(),
    };
    let scope = match namespace {
        Some(ns) => format!("in the namespace \"{ns}\""),
        None => "at the cluster scope".to_owned(),
    };
    status_with_details(
        403,
        "Forbidden",
        &format!(
            "{object} is forbidden: User \"{user}\" cannot {verb} resource \"{rbac_resource}\" \
             in API group \"{}\" {scope}",
            group_of(resource)
        ),
        resource_details(resource, name),
    )
}

/// 409 of a server-side apply that conflicts, for kinds whose owners are
/// kept per field as [`printed_manager`]s: worded and detailed as
/// apimachinery's `NewConflictError` (one cause each; the message lists
/// the fields, grouped by owner when there are several conflicts).
pub(super) fn apply_conflicts(conflicts: &[(String, String)]) -> (StatusCode, FakeBody) {
    let mut conflicts = conflicts.to_vec();
    conflicts.sort_by(|a, b| (&a.1, &a.0).cmp(&(&b.1, &b.0)));
    let message = match conflicts.as_slice() {
        [(field, owner)] => format!("Apply failed with 1 conflict: conflict with {owner}: {field}"),
        _ => {
            let mut lines = Vec::new();
            let mut last: Option<&str> = None;
            for (field, owner) in &conflicts {
                if last != Some(owner.as_str()) {
                    lines.push(format!("conflicts with {owner}:"));
                    last = Some(owner);
                }
                lines.push(format!("- {field}"));
            }
            format!(
                "Apply failed with {} conflicts: {}",
                conflicts.len(),
                lines.join("\n")
            )
        }
    };
    let body = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": "Conflict",
        "details": {
            "causes": conflicts.iter().map(|(field, owner)| json!({
                "reason": "FieldManagerConflict",
                "message": format!("conflict with {owner}"),
                "field": field,
            })).collect::<Vec<_>>(),
        },
        "code": 409,
    });
    (StatusCode::CONFLICT, full(&body))
}

/// A field owner as a conflict names it: `"m"` for a manager that
/// applied, `"m" using v1` for one that updated (a patch or a create).
pub(super) fn printed_manager(manager: &str, applied: bool, api_version: &str) -> String {
    if applied {
        format!("{manager:?}")
    } else {
        format!("{manager:?} using {api_version}")
    }
}

/// 409 of a server-side apply of a UsageBackfill that conflicts, as the
/// apiserver words it: `Apply failed with 1 conflict: conflict with "m"
/// with subresource "status": .status.phase`, and one FieldManagerConflict
/// cause each.
pub(super) fn apply_conflict(conflicts: &[ssa::Conflict]) -> (StatusCode, FakeBody) {
    let conflicts: Vec<(String, String)> = conflicts
        .iter()
        .map(|c| {
            let owner = c.owner();
            let owner = owner.strip_prefix("conflict with ").unwrap_or(&owner);
            (c.field.clone(), owner.to_owned())
        })
        .collect();
    apply_conflicts(&conflicts)
}

/// What the fake does not implement: 418, and recorded as unexpected.
pub(super) fn teapot(r: &Recorded) -> (StatusCode, FakeBody) {
    status_error(
        418,
        "Unexpected",
        &format!("fake API server: no route for {} {}", r.method, r.path),
    )
}
