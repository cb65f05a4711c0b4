//! Validation of Events as kube-apiserver does it
//! (`pkg/apis/core/validation/events.go`), for what a client sends: an
//! Event of `events.k8s.io/v1` passes the legacy checks and the strict
//! ones; one of core `v1` only the legacy checks. Field paths are those of
//! the internal type the apiserver validates (`involvedObject` for
//! `regarding`, `message` for `note`), as its 422 causes name them.

use serde_json::Value;

const REPORTING_INSTANCE_LIMIT: usize = 128;
const ACTION_LIMIT: usize = 128;
const REASON_LIMIT: usize = 128;
const NOTE_LIMIT: usize = 1024;

/// The Event's fields under their internal names, whichever API sent it.
struct Internal<'a> {
    namespace: &'a str,
    name: &'a str,
    involved_namespace: &'a str,
    event_time: Option<&'a str>,
    reporting_controller: &'a str,
    reporting_instance: &'a str,
    action: &'a str,
    reason: &'a str,
    message: &'a str,
    type_: &'a str,
    series: Option<&'a Value>,
    first_timestamp: bool,
    last_timestamp: bool,
    count: bool,
    source: bool,
}

fn internal<'a>(ev: &'a Value, namespace: &'a str, strict: bool) -> Internal<'a> {
    let s = |v: &'a Value| v.as_str().unwrap_or_default();
    let set = |v: &Value| !v.is_null() && *v != 0 && *v != "";
    let (involved, message, first, last, count, source) = if strict {
        (
            &ev["regarding"],
            &ev["note"],
            &ev["deprecatedFirstTimestamp"],
            &ev["deprecatedLastTimestamp"],
            &ev["deprecatedCount"],
            &ev["deprecatedSource"],
        )
    } else {
        (
            &ev["involvedObject"],
            &ev["message"],
            &ev["firstTimestamp"],
            &ev["lastTimestamp"],
            &ev["count"],
            &ev["source"],
        )
    };
    Internal {
        namespace,
        name: s(&ev["metadata"]["name"]),
        involved_namespace: s(&involved["namespace"]),
        event_time: ev["eventTime"].as_str().filter(|t| !t.is_empty()),
        reporting_controller: s(&ev["reportingController"]),
        reporting_instance: s(&ev["reportingInstance"]),
        action: s(&ev["action"]),
        reason: s(&ev["reason"]),
        message: s(message),
        type_: s(&ev["type"]),
        series: Some(&ev["series"]).filter(|v| !v.is_null()),
        first_timestamp: set(first),
        last_timestamp: set(last),
        count: set(count),
        source: source.as_object().is_some_and(|o| o.values().any(set)),
    }
}

/// The causes of a refused create of `ev` in `namespace`, sent to API
/// group `group` ("" or "events.k8s.io"); empty when it is valid.
pub fn validate_create(ev: &Value, namespace: &str, group: &str) -> Vec<(String, String)> {
    let strict = group == "events.k8s.io";
    let e = internal(ev, namespace, strict);
    let mut errors = legacy(&e);
    if !strict {
        return errors;
    }
    if !is_dns_subdomain(e.name) {
        errors.push(invalid(
            "metadata.name",
            e.name,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', \
             and must start and end with an alphanumeric character",
        ));
    }
    errors.extend(series(&e));
    if e.event_time.is_none() {
        errors.push(required("eventTime"));
    }
    if e.type_ != "Normal" && e.type_ != "Warning" {
        errors.push(invalid(
            "type",
            "",
            &format!("has invalid value: {}", e.type_),
        ));
    }
    for (set, field) in [
        (e.first_timestamp, "firstTimestamp"),
        (e.last_timestamp, "lastTimestamp"),
        (e.count, "count"),
        (e.source, "source"),
    ] {
        if set {
            errors.push(invalid(field, "", "needs to be unset"));
        }
    }
    errors
}

/// The causes of a refused update of `old` to `new`.
pub fn validate_update(
    new: &Value,
    old: &Value,
    namespace: &str,
    group: &str,
) -> Vec<(String, String)> {
    let strict = group == "events.k8s.io";
    let e = internal(new, namespace, strict);
    let mut errors = legacy(&e);
    if !strict {
        return errors;
    }
    if new["series"] != old["series"] {
        errors.extend(series(&e));
    }
    for (field, path) in [
        ("regarding", "involvedObject"),
        ("reason", "reason"),
        ("note", "message"),
        ("deprecatedSource", "source"),
        ("deprecatedFirstTimestamp", "firstTimestamp"),
        ("deprecatedLastTimestamp", "lastTimestamp"),
        ("deprecatedCount", "count"),
        ("type", "type"),
        ("eventTime", "eventTime"),
        ("action", "action"),
        ("related", "related"),
        ("reportingController", "reportingController"),
        ("reportingInstance", "reportingInstance"),
    ] {
        if new[field] != old[field] {
            errors.push((
                path.to_owned(),
                "Invalid value: field is immutable".to_owned(),
            ));
        }
    }
    errors
}

fn series(e: &Internal) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    if let Some(s) = e.series {
        if s["count"].as_i64().unwrap_or(0) < 2 {
            errors.push(invalid("series.count", "", "should be at least 2"));
        }
        if s["lastObservedTime"].as_str().is_none_or(str::is_empty) {
            errors.push(required("series.lastObservedTime"));
        }
    }
    errors
}

fn legacy(e: &Internal) -> Vec<(String, String)> {
    let mut errors = Vec::new();
    let mismatch = || {
        invalid(
            "involvedObject.namespace",
            e.involved_namespace,
            "does not match event.namespace",
        )
    };
    match e.event_time {
        None => {
            let fine = if e.involved_namespace.is_empty() {
                e.namespace.is_empty() || e.namespace == "default"
            } else {
                e.namespace == e.involved_namespace
            };
            if !fine {
                errors.push(mismatch());
            }
        }
        Some(_) => {
            if e.involved_namespace.is_empty()
                && e.namespace != "default"
                && e.namespace != "kube-system"
            {
                errors.push(mismatch());
            }
            if e.reporting_controller.is_empty() {
                errors.push(required("reportingController"));
            } else if !is_qualified_name(e.reporting_controller) {
                errors.push(invalid(
                    "reportingController",
                    e.reporting_controller,
                    "must be a qualified name (an optional DNS subdomain prefix and '/', then at most 63 \
                     alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character)",
                ));
            }
            for (value, field, limit) in [
                (
                    e.reporting_instance,
                    "reportingInstance",
                    REPORTING_INSTANCE_LIMIT,
                ),
                (e.action, "action", ACTION_LIMIT),
                (e.reason, "reason", REASON_LIMIT),
            ] {
                if value.is_empty() {
                    errors.push(required(field));
                }
                if value.len() > limit {
                    errors.push(invalid(
                        field,
                        "",
                        &format!("can have at most {limit} characters"),
                    ));
                }
            }
            if e.message.len() > NOTE_LIMIT {
                errors.push(invalid(
                    "message",
                    "",
                    &format!("can have at most {NOTE_LIMIT} characters"),
                ));
            }
        }
    }
    if !is_dns_subdomain(e.namespace) {
        errors.push(invalid(
            "namespace",
            e.namespace,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
        ));
    }
    errors
}

fn required(field: &str) -> (String, String) {
    (field.to_owned(), "Required value".to_owned())
}

fn invalid(field: &str, value: &str, detail: &str) -> (String, String) {
    (
        field.to_owned(),
        format!("Invalid value: {value:?}: {detail}"),
    )
}

fn is_dns_subdomain(s: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    !s.is_empty()
        && s.len() <= 253
        && s.starts_with(alnum)
        && s.ends_with(alnum)
        && s.chars().all(|c| alnum(c) || c == '-' || c == '.')
}

/// `[prefix/]name`: a DNS subdomain prefix, a name of at most 63
/// characters.
fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let alnum = |c: char| c.is_ascii_alphanumeric();
    prefix.is_none_or(is_dns_subdomain)
        && !name.is_empty()
        && name.len() <= 63
        && name.starts_with(alnum)
        && name.ends_with(alnum)
        && name
            .chars()
            .all(|c| alnum(c) || c == '-' || c == '_' || c == '.')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// What kube's Recorder sends (events.k8s.io/v1).
    fn recorded() -> Value {
        json!({
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": "upgrade.18a2b", "namespace": "shop"},
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "action": "Backfill",
            "reason": "Started",
            "note": "attempt 1",
            "type": "Normal",
            "regarding": {"kind": "UsageBackfill", "namespace": "shop", "name": "upgrade"},
            "reportingController": "usage-backfill-operator",
            "reportingInstance": "usage-backfill-operator-6d9f-x2",
        })
    }

    fn fields(errors: &[(String, String)]) -> Vec<&str> {
        errors.iter().map(|e| e.0.as_str()).collect::<Vec<_>>()
    }

    #[test]
    fn what_the_recorder_sends_is_valid() {
        assert_eq!(validate_create(&recorded(), "shop", "events.k8s.io"), []);
    }

    #[test]
    fn required_fields_and_limits() {
        for (field, path) in [
            ("eventTime", "eventTime"),
            ("action", "action"),
            ("reason", "reason"),
            ("reportingController", "reportingController"),
            ("reportingInstance", "reportingInstance"),
        ] {
            let mut ev = recorded();
            ev.as_object_mut().unwrap().remove(field);
            let errors = validate_create(&ev, "shop", "events.k8s.io");
            assert!(fields(&errors).contains(&path), "{field}: {errors:?}");
        }
        let mut ev = recorded();
        ev["note"] = json!("x".repeat(1025));
        ev["type"] = json!("Error");
        ev["regarding"]["namespace"] = json!(null);
        ev["series"] = json!({"count": 1});
        ev["reportingController"] = json!("no spaces allowed");
        assert_eq!(
            fields(&validate_create(&ev, "shop", "events.k8s.io")),
            [
                "involvedObject.namespace",
                "reportingController",
                "message",
                "series.count",
                "series.lastObservedTime",
                "type"
            ]
        );
        // Core v1 gets only the legacy checks: without an eventTime, the
        // namespaces must agree.
        let core = json!({
            "metadata": {"name": "x.1"},
            "involvedObject": {"namespace": "shop"},
            "reason": "R",
            "message": "m",
        });
        assert_eq!(validate_create(&core, "shop", ""), []);
        assert_eq!(
            fields(&validate_create(&core, "other", "")),
            ["involvedObject.namespace"]
        );
    }

    #[test]
    fn an_update_changes_only_the_series() {
        let old = recorded();
        let mut new = old.clone();
        new["series"] = json!({"count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z"});
        assert_eq!(validate_update(&new, &old, "shop", "events.k8s.io"), []);
        new["note"] = json!("attempt 2");
        assert_eq!(
            fields(&validate_update(&new, &old, "shop", "events.k8s.io")),
            ["message"]
        );
    }
}
