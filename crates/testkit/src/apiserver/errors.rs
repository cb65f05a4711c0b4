//! The Status bodies of the refusals the test API server answers with, worded as kube-apiserver words them.

use super::*;

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

/// 422 Invalid for an Event of API group `group`.
pub(super) fn invalid_event(
    name: &str,
    group: &str,
    causes: &[(String, String)],
) -> (StatusCode, FakeBody) {
    let causes: Vec<(&str, &str, &str)> = causes
        .iter()
        .map(|(f, m)| (f.as_str(), cause_reason(m), m.as_str()))
        .collect();
    let group = if group.is_empty() {
        ""
    } else {
        "events.k8s.io"
    };
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        full(&invalid_status_of("Event", group, name, &causes)),
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
        "details": {
            "name": name,
            "group": group,
            "kind": kind,
            "causes": causes.iter().map(|(f, r, m)| json!({
                "reason": r,
                "message": m,
                "field": f,
            })).collect::<Vec<_>>(),
        },
    })
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
    let qualified = match resource {
        "usagebackfills" => "usagebackfills.usage.multica.ai",
        "leases" => "leases.coordination.k8s.io",
        other => other,
    };
    status_error(
        404,
        "NotFound",
        &format!("{qualified} \"{name}\" not found"),
    )
}

/// 409 of a server-side apply that conflicts, as the apiserver words it:
/// `Apply failed with 1 conflict: conflict with "m" with subresource
/// "status": .status.phase`, and one FieldManagerConflict cause each.
pub(super) fn apply_conflict(name: &str, conflicts: &[ssa::Conflict]) -> (StatusCode, FakeBody) {
    let listed: Vec<String> = conflicts
        .iter()
        .map(|c| format!("{}: {}", c.owner(), c.field))
        .collect();
    let count = match conflicts.len() {
        1 => "1 conflict".to_owned(),
        n => format!("{n} conflicts"),
    };
    let body = json!({
        "apiVersion": "v1",
        "kind": "Status",
        "status": "Failure",
        "message": format!("Apply failed with {count}: {}", listed.join("\n")),
        "reason": "Conflict",
        "code": 409,
        "details": {
            "name": name,
            "group": "usage.multica.ai",
            "kind": "usagebackfills",
            "causes": conflicts.iter().map(|c| json!({
                "reason": "FieldManagerConflict",
                "message": c.owner(),
                "field": c.field,
            })).collect::<Vec<_>>(),
        },
    });
    (StatusCode::CONFLICT, full(&body))
}

/// What the fake does not implement: 418, and recorded as unexpected.
pub(super) fn teapot(r: &Recorded) -> (StatusCode, FakeBody) {
    status_error(
        418,
        "Unexpected",
        &format!("fake API server: no route for {} {}", r.method, r.path),
    )
}
