//! The CRD's structural schema, applied to UsageBackfills the way the
//! apiextensions-apiserver does on every create, update and patch:
//! prune unknown fields, drop nulls the schema does not allow, apply
//! defaults, then validate (the schema, then its CEL rules, [`super::cel`]),
//! answering 422 with field paths.
//!
//! Validation is the `jsonschema` crate's, on a JSON Schema derived from
//! the CRD's `openAPIV3Schema`. What differs between the two is handled
//! here, explicitly:
//! - `nullable: true` becomes `type: [T, "null"]` (an `enum` still has to
//!   list `null` for null to pass, as in the apiserver);
//! - `x-kubernetes-int-or-string` becomes `anyOf: [integer, string]`;
//! - formats the apiserver does not know (e.g. `uint32`) are dropped, as it
//!   ignores them; `date-time` is checked;
//! - `x-kubernetes-preserve-unknown-fields` stops pruning below it;
//! - `x-kubernetes-validations` (CEL) are left to [`super::cel`]; as in
//!   the apiserver, they do not run when the schema found an error of a
//!   kind that blocks them ([`Structural::validate_rules`]).
//!
//! The root keeps `apiVersion`, `kind` and `metadata`; metadata is the
//! apiserver's own (ObjectMeta), not the CRD's.

use std::sync::OnceLock;

use jsonschema::error::ValidationErrorKind;
use serde_json::{Map, Value, json};

use super::cel;

/// Formats the apiserver's OpenAPI validation knows (the CRD generator's
/// list, for tests that walk the schema).
pub use usage_backfill_api::KUBERNETES_FORMATS;

/// Formats checked here (the rest are accepted as the strings they are).
const CHECKED_FORMATS: &[&str] = &["date-time", "ipv4", "ipv6", "uuid", "hostname", "email"];

/// One field error, as in a 422's `details.causes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// `spec.database.tls.mode`, `status.conditions[0].type`.
    pub field: String,
    /// `FieldValueInvalid`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    pub message: String,
    /// Of a kind after which the apiserver does not run the CEL rules
    /// (NotSupported, Required, TooLong, TooMany, TypeInvalid:
    /// `hasBlockingErr` in apiextensions' `customresource/strategy.go`).
    pub blocks_rules: bool,
}

/// A CRD version's structural schema and its compiled validator.
pub struct Structural {
    schema: Value,
    validator: jsonschema::Validator,
    rules: Vec<cel::Rule>,
}

impl Structural {
    /// The UsageBackfill schema, from `usage_backfill_api::crd()`.
    pub fn usage_backfill() -> &'static Structural {
        static SCHEMA: OnceLock<Structural> = OnceLock::new();
        SCHEMA.get_or_init(|| {
            let crd = usage_backfill_api::crd();
            let schema = crd.spec.versions[0]
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref())
                .map(|s| serde_json::to_value(s).expect("a schema serializes"))
                .expect("the CRD has an openAPIV3Schema");
            Structural::new(schema)
        })
    }

    pub fn new(schema: Value) -> Structural {
        let mut json_schema = to_json_schema(&schema);
        json_schema["properties"]["apiVersion"] = json!({"type": "string"});
        json_schema["properties"]["kind"] = json!({"type": "string"});
        json_schema["properties"]["metadata"] = json!({"type": "object"});
        let validator = jsonschema::draft4::options()
            .should_validate_formats(true)
            .should_ignore_unknown_formats(true)
            .build(&json_schema)
            .expect("the CRD schema compiles as JSON Schema");
        // Compiled now, so that a rule the interpreter cannot handle
        // fails the first test that touches the schema.
        let rules = cel::rules(&schema);
        Structural {
            schema,
            validator,
            rules,
        }
    }

    /// The `openAPIV3Schema` as the CRD states it.
    pub fn schema(&self) -> &Value {
        &self.schema
    }

    /// The schema's CEL rules (`x-kubernetes-validations`).
    pub fn rules(&self) -> &[cel::Rule] {
        &self.rules
    }

    /// What the apiserver does to a decoded object before validating it:
    /// prune, drop disallowed nulls, default.
    pub fn normalize(&self, obj: &mut Value) {
        if let Some(root) = obj.as_object_mut() {
            let props = self.schema["properties"].as_object();
            root.retain(|k, _| {
                ["apiVersion", "kind", "metadata"].contains(&k.as_str())
                    || props.is_some_and(|p| p.contains_key(k))
            });
            for (k, v) in root.iter_mut() {
                if let Some(s) = props.and_then(|p| p.get(k)) {
                    prune(v, s);
                }
            }
        }
        default(obj, &self.schema);
    }

    /// Errors of `obj` against the schema, in field order.
    pub fn validate(&self, obj: &Value) -> Vec<FieldError> {
        let mut errors: Vec<FieldError> = self
            .validator
            .iter_errors(obj)
            .map(|e| {
                let field = field_path(e.instance_path().as_str());
                let (reason, message) = worded(&field, e.kind(), e.instance(), e.to_string());
                FieldError {
                    blocks_rules: matches!(
                        e.kind(),
                        ValidationErrorKind::Enum { .. }
                            | ValidationErrorKind::Required { .. }
                            | ValidationErrorKind::MaxLength { .. }
                            | ValidationErrorKind::MaxItems { .. }
                            | ValidationErrorKind::Type { .. }
                            // A TypeInvalid error in the apiserver too.
                            | ValidationErrorKind::Format { .. }
                    ),
                    field,
                    reason,
                    message,
                }
            })
            .collect();
        errors.sort_by(|a, b| a.field.cmp(&b.field));
        errors
    }

    /// The errors of the CEL rules on `obj` (`old`: the stored object, on
    /// an update; see [`cel`] for ratcheting and transition rules), run
    /// after the schema's `errors` (those the write is refused for), or
    /// the apiserver's one error saying they did not run when one of
    /// those blocks them.
    pub fn validate_rules(
        &self,
        obj: &Value,
        old: Option<&Value>,
        errors: &[FieldError],
    ) -> Vec<FieldError> {
        if errors.iter().any(|e| e.blocks_rules) {
            // `field.Invalid(nil, nil, ...)`: no field, a null value.
            return vec![FieldError {
                field: "<nil>".into(),
                reason: "FieldValueInvalid",
                message: "Invalid value: null: some validation rules were not checked because \
                          the object was invalid; correct the existing errors to complete validation"
                    .into(),
                blocks_rules: false,
            }];
        }
        cel::broken(&self.rules, obj, old)
            .iter()
            .map(cel::Broken::field_error)
            .collect()
    }

    /// The `x-kubernetes-list-map-keys` of the list at `path` (field
    /// names from the root; list items are stepped over), when it is a
    /// `map` list.
    pub fn list_map_keys(&self, path: &[&str]) -> Option<Vec<String>> {
        let mut s = &self.schema;
        for p in path {
            s = &s["properties"][*p];
            if s.is_null() {
                return None;
            }
        }
        if s["x-kubernetes-list-type"] != json!("map") {
            return None;
        }
        s["x-kubernetes-list-map-keys"].as_array().map(|keys| {
            keys.iter()
                .filter_map(|k| k.as_str().map(str::to_owned))
                .collect()
        })
    }
}

/// The reason and message the apiserver gives a schema error, as
/// kube-apiserver 1.34 and 1.37 word them (apiextensions turns OpenAPI
/// errors into field errors: an enum is NotSupported, a format TypeInvalid
/// naming the property only, a bound Invalid naming the whole path); the
/// kinds no test has compared with a real server keep the validator's own
/// words, as FieldValueInvalid.
fn worded(
    field: &str,
    kind: &ValidationErrorKind,
    value: &Value,
    fallback: String,
) -> (&'static str, String) {
    let shown = go_value(value);
    match kind {
        ValidationErrorKind::Enum { options } => {
            let supported: Vec<String> = options
                .as_array()
                .into_iter()
                .flatten()
                .map(go_value)
                .collect();
            (
                "FieldValueNotSupported",
                format!(
                    "Unsupported value: {shown}: supported values: {}",
                    supported.join(", ")
                ),
            )
        }
        ValidationErrorKind::Minimum { limit } => (
            "FieldValueInvalid",
            format!(
                "Invalid value: {shown}: {field} in body should be greater than or equal to {}",
                go_value(limit)
            ),
        ),
        ValidationErrorKind::Maximum { limit } => (
            "FieldValueInvalid",
            format!(
                "Invalid value: {shown}: {field} in body should be less than or equal to {}",
                go_value(limit)
            ),
        ),
        ValidationErrorKind::Format { format } => {
            let property = field.rsplit('.').next().unwrap_or(field);
            (
                "FieldValueTypeInvalid",
                format!(
                    "Invalid value: {shown}: {property} in body must be of type {format}: {shown}"
                ),
            )
        }
        _ => ("FieldValueInvalid", fallback),
    }
}

/// A value as Go's `%v`/`%q` print it in a field error: strings quoted,
/// whole floats without a fraction.
fn go_value(value: &Value) -> String {
    match value {
        Value::Number(n) => match n.as_f64() {
            Some(f) if !n.is_i64() && !n.is_u64() && f.fract() == 0.0 => format!("{f:.0}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

/// `/status/conditions/0/type` -> `status.conditions[0].type`.
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').filter(|s| !s.is_empty()) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if seg.chars().all(|c| c.is_ascii_digit()) {
            out.push_str(&format!("[{seg}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    if out.is_empty() { "<root>".into() } else { out }
}

fn preserves_unknown(s: &Value) -> bool {
    s["x-kubernetes-preserve-unknown-fields"] == json!(true)
}

/// Drops fields the schema does not name (apiextensions pruning).
fn prune(v: &mut Value, s: &Value) {
    match v {
        Value::Object(map) => {
            let props = s["properties"].as_object();
            let additional = s.get("additionalProperties").filter(|a| a.is_object());
            if !preserves_unknown(s) && additional.is_none() && props.is_some() {
                map.retain(|k, _| props.is_some_and(|p| p.contains_key(k)));
            } else if !preserves_unknown(s) && additional.is_none() && props.is_none() {
                // An object without properties and not preserving: empty.
                if s["type"] == json!("object") {
                    map.clear();
                }
            }
            for (k, child) in map.iter_mut() {
                if let Some(cs) = props.and_then(|p| p.get(k)).or(additional) {
                    prune(child, cs);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = s.get("items") {
                for item in items {
                    prune(item, is);
                }
            }
        }
        _ => {}
    }
}

/// Applies defaults where a field is missing or null without
/// `nullable`, and drops nulls the schema does not allow (apiextensions
/// structural defaulting, then PruneNonNullableNullsWithoutDefaults).
fn default(v: &mut Value, s: &Value) {
    match v {
        Value::Object(map) => {
            if let Some(props) = s["properties"].as_object() {
                for (k, ps) in props {
                    let nullable = ps["nullable"] == json!(true);
                    let present = map.get(k);
                    let wants_default = match present {
                        None => true,
                        Some(Value::Null) => !nullable,
                        Some(_) => false,
                    };
                    if wants_default {
                        if let Some(d) = ps.get("default") {
                            map.insert(k.clone(), d.clone());
                        } else if present.is_some() {
                            map.remove(k);
                        }
                    }
                }
                for (k, child) in map.iter_mut() {
                    if let Some(ps) = props.get(k) {
                        default(child, ps);
                    }
                }
            } else if let Some(add) = s.get("additionalProperties").filter(|a| a.is_object()) {
                for child in map.values_mut() {
                    default(child, add);
                }
            }
        }
        Value::Array(items) => {
            if let Some(is) = s.get("items") {
                for item in items {
                    default(item, is);
                }
            }
        }
        _ => {}
    }
}

/// The CRD's OpenAPI v3 schema as a Draft 4 JSON Schema (see the module
/// doc for what changes).
fn to_json_schema(s: &Value) -> Value {
    let Some(obj) = s.as_object() else {
        return s.clone();
    };
    let mut out = Map::new();
    for (k, v) in obj {
        match k.as_str() {
            "properties" => {
                let props = v
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, ps)| (name.clone(), to_json_schema(ps)))
                    .collect();
                out.insert(k.clone(), Value::Object(props));
            }
            "items" | "additionalProperties" if v.is_object() => {
                out.insert(k.clone(), to_json_schema(v));
            }
            "allOf" | "anyOf" | "oneOf" => {
                let list = v.as_array().into_iter().flatten().map(to_json_schema);
                out.insert(k.clone(), Value::Array(list.collect()));
            }
            "not" => {
                out.insert(k.clone(), to_json_schema(v));
            }
            "format" => {
                let f = v.as_str().unwrap_or_default();
                if CHECKED_FORMATS.contains(&f) {
                    out.insert(k.clone(), v.clone());
                }
            }
            "nullable" | "description" | "default" | "example" | "externalDocs" | "title" => {}
            _ if k.starts_with("x-kubernetes-") => {}
            _ => {
                out.insert(k.clone(), v.clone());
            }
        }
    }
    if s["x-kubernetes-int-or-string"] == json!(true) {
        out.remove("type");
        out.insert(
            "anyOf".into(),
            json!([{"type": "integer"}, {"type": "string"}]),
        );
    }
    if s["nullable"] == json!(true) {
        if let Some(t) = out.get("type").cloned() {
            out.insert("type".into(), json!([t, "null"]));
        } else if let Some(any) = out.get_mut("anyOf").and_then(Value::as_array_mut) {
            any.push(json!({"type": "null"}));
        }
    }
    Value::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pointers_become_field_paths() {
        assert_eq!(field_path("/spec/mode"), "spec.mode");
        assert_eq!(
            field_path("/status/conditions/0/type"),
            "status.conditions[0].type"
        );
        assert_eq!(field_path(""), "<root>");
    }
}
