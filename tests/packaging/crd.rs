//! The CRD generated from `crates/api`: committed copy in sync, schema the
//! apiserver will accept (structural, defaults valid), and manifests users
//! write deserialize with the documented defaults.
//!
//! Regenerate the committed CRD with `UPDATE_CRDS=1 cargo test --test packaging crd`.

use std::{path::Path, process::Command, time::Duration};

use kube::core::CustomResourceExt;
use serde_json::{Value, json};
use usage_backfill_api::{
    self as api, BackfillResult, DatabaseSecretRef, Mode, ModeSettings, Phase, SkipReason, TlsMode,
    UsageBackfill, UsageBackfillSpec, UsageBackfillStatus,
};
use usage_backfill_limits::duration;

const CRD_PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/usagebackfills.usage.multica.ai.yaml"
);
const REGENERATE: &str = "UPDATE_CRDS=1 cargo test --test packaging crd";

#[test]
fn committed_crd_matches_the_rust_types() {
    let generated = api::crd_yaml();
    if std::env::var("UPDATE_CRDS").as_deref() == Ok("1") {
        std::fs::write(CRD_PATH, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(CRD_PATH)
        .unwrap_or_else(|e| panic!("cannot read {CRD_PATH} ({e}); generate it with: {REGENERATE}"));
    if committed != generated {
        let line = committed
            .lines()
            .zip(generated.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| committed.lines().count().min(generated.lines().count()));
        panic!(
            "{CRD_PATH} is out of date with crates/api (first difference at line {}); \
             regenerate it with: {REGENERATE}",
            line + 1
        );
    }
}

fn crd_json() -> Value {
    serde_json::to_value(api::crd()).unwrap()
}

fn schema() -> Value {
    crd_json()["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn at<'a>(v: &'a Value, pointer: &str) -> &'a Value {
    v.pointer(pointer)
        .unwrap_or_else(|| panic!("{pointer} missing from the schema"))
}

const SPEC: &str = "/properties/spec/properties";
const STATUS: &str = "/properties/status/properties";

#[test]
fn names_scope_and_subresources() {
    let crd = crd_json();
    // api::crd() is the derived CRD plus a default for a missing status.
    assert_eq!(api::crd().spec.names, UsageBackfill::crd().spec.names);
    assert_eq!(crd["metadata"]["name"], "usagebackfills.usage.multica.ai");
    let spec = &crd["spec"];
    assert_eq!(spec["group"], "usage.multica.ai");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], "UsageBackfill");
    assert_eq!(spec["names"]["plural"], "usagebackfills");
    assert_eq!(spec["names"]["singular"], "usagebackfill");
    assert_eq!(spec["names"]["shortNames"], json!(["ubf"]));
    let versions = spec["versions"].as_array().unwrap();
    assert_eq!(versions.len(), 1);
    let v = &versions[0];
    assert_eq!(v["name"], "v1alpha1");
    assert_eq!((&v["served"], &v["storage"]), (&json!(true), &json!(true)));
    assert_eq!(v["subresources"], json!({"status": {}}));
}

#[test]
fn printer_columns() {
    let crd = crd_json();
    let columns: Vec<(String, String, String, i64)> =
        crd["spec"]["versions"][0]["additionalPrinterColumns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["name"].as_str().unwrap().to_owned(),
                    c["type"].as_str().unwrap().to_owned(),
                    c["jsonPath"].as_str().unwrap().to_owned(),
                    c["priority"].as_i64().unwrap_or(0),
                )
            })
            .collect();
    let expected = [
        ("Phase", "string", ".status.phase", 0),
        ("Slices", "string", ".status.progress", 0),
        ("Rows", "integer", ".status.rowsTouched", 0),
        ("Watermark", "date", ".status.watermarkAfter", 0),
        ("Age", "date", ".metadata.creationTimestamp", 0),
        ("Result", "string", ".status.result", 1),
        (
            "Reason",
            "string",
            r#".status.conditions[?(@.type=="Ready")].reason"#,
            1,
        ),
        (
            "Message",
            "string",
            r#".status.conditions[?(@.type=="Ready")].message"#,
            1,
        ),
    ]
    .map(|(n, t, p, prio)| (n.to_owned(), t.to_owned(), p.to_owned(), prio));
    assert_eq!(columns, expected);

    // Every .status path a column reads exists in the schema.
    let schema = schema();
    for (_, _, path, _) in &columns {
        if let Some(field) = path.strip_prefix(".status.") {
            let field = field.split(['.', '[']).next().unwrap();
            at(&schema, &format!("{STATUS}/{field}"));
        }
    }
}

#[test]
fn status_defaults_observed_generation_to_minus_one() {
    let schema = schema();
    let og = at(&schema, &format!("{STATUS}/observedGeneration"));
    assert_eq!(og["default"], json!(-1));
    assert_eq!(og["type"], "integer");
    assert_eq!(og["format"], "int64");
    // A missing status is defaulted too, so a fresh object is never Current.
    assert_eq!(
        at(&schema, "/properties/status")["default"],
        json!({"observedGeneration": -1})
    );
}

#[test]
fn durations_carry_the_pattern() {
    let schema = schema();
    for field in [
        "lagThreshold",
        "sleepBetweenSlices",
        "lockTimeout",
        "sliceTimeout",
    ] {
        let s = at(&schema, &format!("{SPEC}/{field}"));
        assert_eq!(s["type"], "string", "{field}");
        assert_eq!(s["pattern"], duration::PATTERN, "{field}");
    }
    assert_eq!(at(&schema, &format!("{SPEC}/lagThreshold/default")), "1h");
    assert_eq!(
        at(&schema, &format!("{SPEC}/sleepBetweenSlices/default")),
        "0s"
    );
    for optional in ["lockTimeout", "sliceTimeout", "applicationName"] {
        let s = at(&schema, &format!("{SPEC}/{optional}"));
        assert!(
            s.get("default").is_none(),
            "{optional} must have no default"
        );
    }
}

#[test]
fn enums_minimums_and_required_fields() {
    let schema = schema();
    let mode = at(&schema, &format!("{SPEC}/mode"));
    assert_eq!(mode["enum"], json!(["IfLagging", "Always"]));
    assert_eq!(mode["default"], "IfLagging");
    assert_eq!(
        at(
            &schema,
            &format!("{SPEC}/database/properties/tls/properties/mode/enum")
        ),
        &json!(["disable", "prefer", "require", "verify-ca", "verify-full"])
    );
    assert_eq!(
        at(&schema, &format!("{STATUS}/phase/enum")),
        &json!([
            "Pending",
            "WaitingForLock",
            "Running",
            "Succeeded",
            "Failed"
        ])
    );
    assert_eq!(
        at(&schema, &format!("{STATUS}/result/enum")),
        &json!(["Backfilled", "Skipped", "DryRun"])
    );
    assert_eq!(
        at(&schema, &format!("{STATUS}/skipped/enum")),
        &json!([
            "rollup_state_missing",
            "task_usage_empty",
            "watermark_within_threshold"
        ])
    );

    for (path, default) in [
        (format!("{SPEC}/monthsBack"), Some(0)),
        (format!("{SPEC}/backoffLimit"), Some(6)),
        (format!("{STATUS}/slicesProcessed"), None),
        (format!("{STATUS}/slicesTotal"), None),
        (format!("{STATUS}/attempts"), None),
    ] {
        let s = at(&schema, &path);
        assert_eq!(s["type"], "integer", "{path}");
        assert_eq!(s["minimum"].as_f64(), Some(0.0), "{path}");
        assert_eq!(s["default"].as_i64(), default, "{path}");
    }

    assert_eq!(at(&schema, "/required"), &json!(["spec"]));
    assert_eq!(
        at(&schema, "/properties/spec/required"),
        &json!(["database"])
    );
    // secretRef or the connection in parts: the choice is a CEL rule
    // (tests/packaging/cel.rs), so no database field is required by the schema.
    assert!(
        at(&schema, &format!("{SPEC}/database"))
            .get("required")
            .is_none()
    );
    for part in [
        "hostFrom",
        "portFrom",
        "databaseFrom",
        "userFrom",
        "passwordFrom",
    ] {
        let r = at(
            &schema,
            &format!("{SPEC}/database/properties/{part}/properties/secretKeyRef"),
        );
        assert_eq!(r["required"], json!(["key", "name"]), "{part}");
        assert_eq!(r["properties"]["name"]["maxLength"], 253, "{part}");
    }
    assert_eq!(
        at(&schema, &format!("{SPEC}/database/properties/port/maximum")),
        &json!(65535.0)
    );
    let secret_ref = at(&schema, &format!("{SPEC}/database/properties/secretRef"));
    assert_eq!(secret_ref["required"], json!(["name"]));
    assert_eq!(secret_ref["properties"]["key"]["default"], "DATABASE_URL");
    assert_eq!(secret_ref["properties"]["name"]["minLength"], 1);
    let ca = at(
        &schema,
        &format!("{SPEC}/database/properties/tls/properties/caSecretRef"),
    );
    assert_eq!(ca["required"], json!(["name"]));
    assert_eq!(ca["properties"]["key"]["default"], "ca.crt");
    assert!(
        at(
            &schema,
            &format!("{SPEC}/database/properties/secretRef/properties")
        )
        .get("namespace")
        .is_none(),
        "a same-namespace reference has no namespace field"
    );

    let conditions = at(&schema, &format!("{STATUS}/conditions"));
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
}

/// Every field carries a description for `kubectl explain`.
#[test]
fn every_field_is_documented() {
    fn walk(node: &Value, path: &str) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let p = format!("{path}.{name}");
                let documented = prop
                    .get("description")
                    .and_then(Value::as_str)
                    .is_some_and(|d| d.len() > 10);
                // apiVersion/kind/metadata are documented by Kubernetes itself.
                if !matches!(p.as_str(), ".apiVersion" | ".kind" | ".metadata") {
                    assert!(documented, "{p} has no useful description");
                }
                walk(prop, &p);
            }
        }
        if let Some(items) = node.get("items") {
            walk(items, &format!("{path}[]"));
        }
    }
    walk(&schema(), "");
}

/// The rules of a structural schema (what the apiserver insists on), plus
/// a check that every default passes the node's own validation, since the
/// apiserver rejects a CRD whose defaults do not.
#[test]
fn schema_is_structural_and_defaults_are_valid() {
    fn check(node: &Value, path: &str) {
        let obj = node
            .as_object()
            .unwrap_or_else(|| panic!("{path}: not a schema object"));
        for banned in [
            "$ref",
            "$defs",
            "definitions",
            "$schema",
            "anyOf",
            "oneOf",
            "allOf",
            "not",
            "const",
            "uniqueItems",
        ] {
            assert!(!obj.contains_key(banned), "{path}: has {banned}");
        }
        let ty = obj
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("{path}: no single type"));
        assert!(
            ["object", "array", "string", "integer", "number", "boolean"].contains(&ty),
            "{path}: type {ty}"
        );
        if let Some(n) = obj.get("nullable") {
            assert!(n.is_boolean(), "{path}: nullable");
        }
        if let Some(values) = obj.get("enum") {
            for v in values.as_array().unwrap() {
                assert!(has_type(v, ty), "{path}: enum value {v} is not a {ty}");
            }
        }
        if let Some(default) = obj.get("default") {
            check_value(node, default, &format!("{path} default"));
        }
        match ty {
            "object" => {
                let props = obj.get("properties").and_then(Value::as_object);
                let extra = obj.get("additionalProperties");
                assert!(
                    !(props.is_some() && extra.is_some()),
                    "{path}: properties and additionalProperties"
                );
                for r in obj
                    .get("required")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let r = r.as_str().unwrap();
                    assert!(
                        props.is_some_and(|p| p.contains_key(r)),
                        "{path}: required {r} undefined"
                    );
                }
                for (name, prop) in props.into_iter().flatten() {
                    check(prop, &format!("{path}.{name}"));
                }
                if let Some(extra) = extra {
                    check(extra, &format!("{path}.*"));
                }
            }
            "array" => {
                let items = obj
                    .get("items")
                    .unwrap_or_else(|| panic!("{path}: no items"));
                check(items, &format!("{path}[]"));
                if obj.get("x-kubernetes-list-type") == Some(&json!("map")) {
                    for key in obj["x-kubernetes-list-map-keys"].as_array().unwrap() {
                        assert!(
                            items["required"].as_array().unwrap().contains(key),
                            "{path}: list-map key {key} must be required"
                        );
                    }
                }
            }
            _ => {}
        }
    }
    check(&schema(), "");
}

fn has_type(v: &Value, ty: &str) -> bool {
    match ty {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        _ => false,
    }
}

/// Validates a value against the subset of JSON Schema this CRD uses.
fn check_value(schema: &Value, v: &Value, path: &str) {
    let ty = schema["type"].as_str().unwrap();
    assert!(has_type(v, ty), "{path}: {v} is not a {ty}");
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        assert!(values.contains(v), "{path}: {v} not in enum");
    }
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
        assert!(v.as_f64().unwrap() >= min, "{path}: {v} below minimum");
    }
    if let Some(s) = v.as_str() {
        if let Some(p) = schema.get("pattern").and_then(Value::as_str) {
            assert!(
                regex::Regex::new(p).unwrap().is_match(s),
                "{path}: {s:?} !~ {p}"
            );
        }
        let len = s.chars().count() as u64;
        if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
            assert!(len >= min, "{path}: {s:?} too short");
        }
        if let Some(max) = schema.get("maxLength").and_then(Value::as_u64) {
            assert!(len <= max, "{path}: {s:?} too long");
        }
    }
    if let Some(obj) = v.as_object() {
        for (k, val) in obj {
            let prop = schema["properties"]
                .get(k)
                .or_else(|| schema.get("additionalProperties"))
                .unwrap_or_else(|| panic!("{path}: unknown field {k}"));
            check_value(prop, val, &format!("{path}.{k}"));
        }
    }
    if let Some(items) = v.as_array() {
        for (i, item) in items.iter().enumerate() {
            check_value(&schema["items"], item, &format!("{path}[{i}]"));
        }
    }
}

/// What the apiserver fills in from the schema defaults is what serde fills
/// in from `#[serde(default)]`: both readers of a manifest agree.
#[test]
fn schema_defaults_agree_with_serde_defaults() {
    fn collect(node: &Value, path: &str, out: &mut Vec<(String, Value)>) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (name, prop) in props {
                let p = format!("{path}/{name}");
                if let Some(d) = prop.get("default") {
                    out.push((p.clone(), d.clone()));
                }
                collect(prop, &p, out);
            }
        }
    }
    let mut defaults = Vec::new();
    collect(&schema()["properties"]["spec"], "", &mut defaults);
    collect(&schema()["properties"]["status"], "", &mut defaults);
    let mut found = defaults.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>();
    found.sort();
    assert_eq!(
        found,
        [
            "/backoffLimit",
            "/database/secretRef/key",
            "/database/tls/caSecretRef/key",
            "/dryRun",
            "/forcePartial",
            "/futureEvents/maxAheadSeconds",
            "/futureEvents/rows",
            "/lagThreshold",
            "/mode",
            "/monthsBack",
            "/observedGeneration",
            "/parallelism",
            "/runId",
            "/sleepBetweenSlices",
            "/suspend",
            "/tuning/preset",
        ]
    );

    // Minimal objects: serde fills the same values the apiserver would.
    let spec: UsageBackfillSpec = serde_json::from_value(json!({
        "database": {"secretRef": {"name": "db"}, "tls": {"caSecretRef": {"name": "ca"}}},
        "tuning": {}
    }))
    .unwrap();
    let status: UsageBackfillStatus = serde_json::from_value(json!({"futureEvents": {}})).unwrap();
    let spec = serde_json::to_value(spec).unwrap();
    let status = serde_json::to_value(status).unwrap();
    for (path, default) in &defaults {
        let got = spec.pointer(path).or_else(|| status.pointer(path));
        assert_eq!(got, Some(default), "{path}");
    }
}

#[test]
fn secret_name_pattern_agrees_with_validate() {
    let schema = schema();
    let name = at(
        &schema,
        &format!("{SPEC}/database/properties/secretRef/properties/name"),
    );
    let key = at(
        &schema,
        &format!("{SPEC}/database/properties/secretRef/properties/key"),
    );
    let name_re = regex::Regex::new(name["pattern"].as_str().unwrap()).unwrap();
    let key_re = regex::Regex::new(key["pattern"].as_str().unwrap()).unwrap();
    for sample in [
        "db", "app-db", "app.db", "a", "0", "App", "-db", "db-", "a..b", ".db", "db.", "a_b", "ü",
        "a b",
    ] {
        let mut spec = UsageBackfillSpec::new(sample);
        assert_eq!(
            name_re.is_match(sample),
            spec.validate().is_ok(),
            "secret name {sample:?}"
        );
        let secret_ref = spec.database.secret_ref.as_mut().unwrap();
        secret_ref.name = "db".into();
        secret_ref.key = sample.into();
        assert_eq!(
            key_re.is_match(sample),
            spec.validate().is_ok(),
            "secret key {sample:?}"
        );
    }
}

const MINIMAL: &str = r#"
apiVersion: usage.multica.ai/v1alpha1
kind: UsageBackfill
metadata:
  name: usage-hourly
  namespace: multica
spec:
  database:
    secretRef:
      name: multica-db
"#;

#[test]
fn minimal_manifest_gets_the_documented_defaults() {
    let ubf: UsageBackfill = serde_saphyr::from_str(MINIMAL).unwrap();
    assert_eq!(ubf.metadata.name.as_deref(), Some("usage-hourly"));
    assert_eq!(ubf.metadata.namespace.as_deref(), Some("multica"));
    assert!(ubf.status.is_none());
    let spec = &ubf.spec;
    assert_eq!(spec, &UsageBackfillSpec::new("multica-db"));
    assert_eq!(
        spec.database.secret_ref.as_ref().unwrap().key,
        "DATABASE_URL"
    );
    assert_eq!(spec.database.tls, None);
    assert_eq!(spec.mode, Mode::IfLagging);
    assert_eq!(spec.lag_threshold, "1h");
    assert_eq!(
        (spec.months_back, spec.force_partial, spec.dry_run),
        (0, false, false)
    );
    assert_eq!(spec.sleep_between_slices, "0s");
    assert_eq!((&spec.lock_timeout, &spec.slice_timeout), (&None, &None));
    assert_eq!(spec.application_name, None);
    assert_eq!(
        (spec.run_id.as_str(), spec.backoff_limit, spec.suspend),
        ("", 6, false)
    );

    let valid = spec.validate().unwrap();
    assert_eq!(
        valid.mode,
        ModeSettings::IfLagging {
            lag_threshold: Duration::from_secs(3600)
        }
    );
    assert_eq!(valid.application_name, "usage-backfill");
    assert_eq!(valid.tls_mode(None), TlsMode::Prefer);
    assert_eq!(
        valid.tls_mode(TlsMode::from_sslmode("require")),
        TlsMode::Require
    );
}

#[test]
fn full_manifest_round_trips() {
    let yaml = r#"
apiVersion: usage.multica.ai/v1alpha1
kind: UsageBackfill
metadata:
  name: full-walk
spec:
  database:
    secretRef:
      name: multica-db
      key: url
    tls:
      mode: verify-full
      caSecretRef:
        name: rds-ca
  mode: Always
  monthsBack: 3
  forcePartial: true
  dryRun: true
  sleepBetweenSlices: 250ms
  lockTimeout: 10m
  sliceTimeout: 30m
  applicationName: usage-backfill-manual
  runId: "2025-06-01"
  backoffLimit: 0
  suspend: true
status:
  observedGeneration: 3
  phase: Succeeded
  result: Skipped
  skipped: watermark_within_threshold
  progress: 2/2
  slicesProcessed: 2
  slicesTotal: 2
  rowsTouched: 1234
  from: "2025-05-01T00:00:00Z"
  watermarkAfter: "2025-06-01T11:55:00Z"
  lockHolder:
    pid: 4242
    applicationName: pg_cron scheduler
  settings:
    enable_nestloop: "off"
  futureEvents:
    rows: 2
    maxAheadSeconds: 7200
  warnings: [two events are dated in the future]
  conditions:
  - type: Ready
    status: "True"
    reason: Skipped
    message: watermark within threshold
    observedGeneration: 3
    lastTransitionTime: "2025-06-01T12:00:00Z"
"#;
    let ubf: UsageBackfill = serde_saphyr::from_str(yaml).unwrap();
    let spec = &ubf.spec;
    assert_eq!(
        spec.database.secret_ref,
        Some(DatabaseSecretRef {
            name: "multica-db".into(),
            key: "url".into()
        })
    );
    let tls = spec.database.tls.as_ref().unwrap();
    assert_eq!(tls.mode, Some(TlsMode::VerifyFull));
    assert_eq!(tls.ca_secret_ref.as_ref().unwrap().key, "ca.crt");
    let valid = spec.validate().unwrap();
    assert_eq!(
        valid.mode,
        ModeSettings::Always {
            months_back: 3,
            force_partial: true
        }
    );
    assert_eq!(valid.sleep_between_slices, Duration::from_millis(250));
    assert_eq!(valid.lock_timeout, Some(Duration::from_secs(600)));
    assert_eq!(valid.slice_timeout, Some(Duration::from_secs(1800)));
    assert_eq!(valid.tls_mode(Some(TlsMode::Disable)), TlsMode::VerifyFull);
    assert_eq!(
        (valid.backoff_limit, valid.dry_run, valid.suspend),
        (0, true, true)
    );

    let status = ubf.status.as_ref().unwrap();
    assert_eq!(status.observed_generation, 3);
    assert_eq!(status.phase, Some(Phase::Succeeded));
    assert_eq!(status.result, Some(BackfillResult::Skipped));
    assert_eq!(status.skipped, Some(SkipReason::WatermarkWithinThreshold));
    assert_eq!(
        status.watermark_after.as_ref().unwrap().0.to_string(),
        "2025-06-01T11:55:00Z"
    );
    assert_eq!(status.settings["enable_nestloop"], "off");
    assert_eq!(status.conditions[0].reason, "Skipped");

    // The object survives serialization unchanged, and what it serializes
    // passes the CRD's own schema.
    let json = serde_json::to_value(&ubf).unwrap();
    let back: UsageBackfill = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, ubf);
    let schema = schema();
    check_value(&schema["properties"]["spec"], &json["spec"], "spec");
    check_value(&schema["properties"]["status"], &json["status"], "status");
}

#[test]
fn unknown_enum_values_are_rejected() {
    let bad = MINIMAL.replace(
        "      name: multica-db",
        "      name: multica-db\n  mode: Sometimes",
    );
    let e = serde_saphyr::from_str::<UsageBackfill>(&bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("Sometimes"), "{e}");
}

/// kubectl (Go's YAML parser) reads the committed file as exactly the CRD
/// the Rust types describe. `kubectl create --dry-run=client` would need an
/// apiserver for discovery; `label --local` parses and prints offline.
#[test]
fn kubectl_reads_the_committed_crd() {
    if std::env::var("SKIP_KUBECTL").as_deref() == Ok("1") {
        eprintln!("SKIP_KUBECTL=1: not checking the CRD with kubectl");
        return;
    }
    assert!(
        Path::new(CRD_PATH).exists(),
        "{CRD_PATH} missing; generate it with: {REGENERATE}"
    );
    let out = Command::new("kubectl")
        .args([
            "label",
            "--local",
            "-o",
            "json",
            "-f",
            CRD_PATH,
            "crd-check=1",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run kubectl ({e}); install it or set SKIP_KUBECTL=1 to skip this check")
        });
    assert!(
        out.status.success(),
        "kubectl rejected {CRD_PATH}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut parsed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let meta = parsed["metadata"].as_object_mut().unwrap();
    assert_eq!(meta.remove("labels"), Some(json!({"crd-check": "1"})));
    if let Some(at) = first_difference(&normalize(parsed), &normalize(crd_json()), "") {
        panic!(
            "kubectl reads {CRD_PATH} differently from crd() at {at}; regenerate it with: {REGENERATE}"
        );
    }
}

/// JSON pointer of the first place where `a` and `b` differ.
fn first_difference(a: &Value, b: &Value, path: &str) -> Option<String> {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<_> = x.keys().chain(y.keys()).collect();
            keys.into_iter().find_map(|k| match (x.get(k), y.get(k)) {
                (Some(u), Some(v)) => first_difference(u, v, &format!("{path}/{k}")),
                _ => Some(format!("{path}/{k}")),
            })
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => x
            .iter()
            .zip(y)
            .enumerate()
            .find_map(|(i, (u, v))| first_difference(u, v, &format!("{path}/{i}"))),
        _ => (a != b).then(|| format!("{path} ({a} vs {b})")),
    }
}

/// JSON numbers as f64, since Go prints 0.0 as 0.
fn normalize(v: Value) -> Value {
    match v {
        Value::Number(n) => json!(n.as_f64().unwrap()),
        Value::Array(a) => Value::Array(a.into_iter().map(normalize).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, normalize(v))).collect()),
        v => v,
    }
}

/// Every node of the schema with its JSON pointer.
fn walk_schema<'a>(v: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    out.push((path.clone(), v));
    for key in ["properties", "additionalProperties", "items"] {
        match v.get(key) {
            Some(Value::Object(props)) if key == "properties" => {
                for (name, child) in props {
                    walk_schema(child, format!("{path}/properties/{name}"), out);
                }
            }
            Some(child @ Value::Object(_)) => walk_schema(child, format!("{path}/{key}"), out),
            _ => {}
        }
    }
}

/// Only formats the apiserver knows (it ignores others, newer ones warn),
/// and no nullable enum (the apiserver refuses an explicit null there,
/// while it drops the null of a field that is not nullable).
#[test]
fn only_kubernetes_formats_and_no_nullable_enums() {
    // What the apiserver knows, as the test kit's apiserver models it
    // (not the api crate's own list, which this test checks).
    const KNOWN: &[&str] = usage_backfill_testkit::apiserver::schema::KUBERNETES_FORMATS;
    let schema = schema();
    let mut nodes = Vec::new();
    walk_schema(&schema, String::new(), &mut nodes);
    assert!(nodes.len() > 50, "the walk reaches the whole schema");
    let mut formats = 0;
    for (path, node) in &nodes {
        if let Some(f) = node.get("format") {
            formats += 1;
            let f = f.as_str().unwrap_or_default();
            assert!(
                KNOWN.contains(&f),
                "{path}: format {f:?} is not one Kubernetes knows"
            );
        }
        if node.get("enum").is_some() {
            assert_ne!(
                node.get("nullable"),
                Some(&json!(true)),
                "{path}: a nullable enum"
            );
        }
    }
    assert!(formats > 5, "formats are kept where Kubernetes knows them");
    // Unsigned ranges survive the dropped uint32.
    let attempts = at(&schema, &format!("{STATUS}/attempts"));
    assert_eq!(attempts["maximum"], json!(f64::from(u32::MAX)));
    assert_eq!(attempts["minimum"], json!(0.0));
}

/// The CEL rules are written for the oldest Kubernetes the chart claims:
/// `api::rules::MIN_KUBERNETES_MINOR` is the chart's `kubeVersion`.
#[test]
fn the_rules_target_the_charts_oldest_kubernetes() {
    let chart = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/usage-backfill-operator/Chart.yaml"
    ))
    .unwrap();
    let claim = chart
        .lines()
        .find_map(|l| l.strip_prefix("kubeVersion: "))
        .expect("Chart.yaml claims a kubeVersion");
    assert_eq!(
        claim,
        format!(
            "\">=1.{}.0-0\"",
            usage_backfill_api::rules::MIN_KUBERNETES_MINOR
        )
    );
}
