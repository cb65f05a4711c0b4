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
            // Required, and then a qualified name all the same (so an
            // empty one gets the name part's errors too).
            if e.reporting_controller.is_empty() {
                errors.push(required("reportingController"));
            }
            for detail in qualified_name_errors(e.reporting_controller) {
                errors.push(invalid(
                    "reportingController",
                    e.reporting_controller,
                    &detail,
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

/// What an events.k8s.io Event holds once stored: the fields of the core
/// Event it is kept as, which the events.k8s.io API shows as
/// `deprecated*` (null, and an empty source, for an Event that never set
/// them).
pub fn fill_deprecated_fields(ev: &mut Value, group: &str) {
    if group.is_empty() {
        return;
    }
    for field in ["deprecatedFirstTimestamp", "deprecatedLastTimestamp"] {
        if ev.get(field).is_none() {
            ev[field] = Value::Null;
        }
    }
    if ev.get("deprecatedSource").is_none() {
        ev["deprecatedSource"] = serde_json::json!({});
    }
}

/// What apimachinery's `IsQualifiedName` says of `s` (`[prefix/]name`: a
/// DNS subdomain prefix, a name of at most 63 characters); empty when it
/// is one. (The name part's wording is compared with kube-apiserver's by
/// `tests/control_plane/differential.rs`.)
fn qualified_name_errors(s: &str) -> Vec<String> {
    const NAME_FORMAT: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must \
        start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', \
        regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')";
    let mut errors = Vec::new();
    let parts: Vec<&str> = s.split('/').collect();
    let name = match parts.as_slice() {
        [name] => *name,
        [prefix, name] => {
            if prefix.is_empty() {
                errors.push("prefix part must be non-empty".to_owned());
            } else if !is_dns_subdomain(prefix) {
                errors.push(
                    "prefix part a lowercase RFC 1123 subdomain must consist of lower case alphanumeric \
                     characters, '-' or '.', and must start and end with an alphanumeric character \
                     (e.g. 'example.com', regex used for validation is \
                     '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
                        .to_owned(),
                );
            }
            name
        }
        _ => {
            return vec![format!(
                "a qualified name {NAME_FORMAT} with an optional DNS subdomain prefix and '/' \
                 (e.g. 'example.com/MyName')"
            )];
        }
    };
    if name.is_empty() {
        errors.push("name part must be non-empty".to_owned());
    } else if name.len() > 63 {
        errors.push("name part must be no more than 63 bytes".to_owned());
    }
    let alnum = |c: char| c.is_ascii_alphanumeric();
    let matches = name.starts_with(alnum)
        && name.ends_with(alnum)
        && name
            .chars()
            .all(|c| alnum(c) || c == '-' || c == '_' || c == '.');
    if !matches {
        errors.push(format!("name part {NAME_FORMAT}"));
    }
    errors
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
