//! The CustomResourceDefinition generated from the types, with the schema fixes Kubernetes needs.

use super::*;

/// Schema of an `Option<SomeEnum>` field as Kubernetes wants it: one
/// `{type: string, enum: [...]}` keeping the field's own description. Not
/// `nullable`: the apiserver checks a nullable field's null against the
/// `enum` and refuses it, while it drops an explicit null of a field that
/// is not nullable (as absent, which is what `None` means). schemars gives either `null` inside `enum` or, when variants
/// carry docs, an `anyOf`/`oneOf` that kube flattens with the enum's
/// description in place of the field's.
pub(crate) fn optional_enum(schema: &mut schemars::Schema) {
    use serde_json::Value;
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::Array(any_of)) = obj.remove("anyOf") {
        for sub in any_of {
            let Value::Object(sub) = sub else { continue };
            if sub.get("enum") == Some(&serde_json::json!([null])) {
                continue;
            }
            for (k, v) in sub {
                obj.entry(k).or_insert(v);
            }
        }
    }
    let mut values = match obj.remove("enum") {
        Some(Value::Array(values)) => values,
        _ => Vec::new(),
    };
    if let Some(Value::Array(one_of)) = obj.remove("oneOf") {
        for variant in one_of {
            if let Some(c) = variant.get("const") {
                values.push(c.clone());
            } else if let Some(Value::Array(e)) = variant.get("enum") {
                values.extend(e.iter().cloned());
            }
        }
    }
    values.retain(|v| !v.is_null());
    obj.insert("type".into(), "string".into());
    obj.insert("enum".into(), values.into());
    obj.remove("nullable");
}

/// The `format`s the apiserver knows (kube-openapi's string formats and
/// the numeric ones). It ignores any other (newer servers warn), so the
/// CRD keeps none: e.g. schemars' `uint32` goes, its range stays as
/// `minimum`/`maximum`.
pub const KUBERNETES_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
    "int32",
    "int64",
    "float",
    "double",
];

/// Drops formats Kubernetes does not know, keeping an unsigned integer's
/// range as a `maximum`.
pub(crate) fn kubernetes_formats_only(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(obj) => {
            let unknown = obj
                .get("format")
                .and_then(Value::as_str)
                .filter(|f| !KUBERNETES_FORMATS.contains(f))
                .map(str::to_owned);
            if let Some(format) = unknown {
                obj.remove("format");
                let max = match format.as_str() {
                    "uint8" => Some(f64::from(u8::MAX)),
                    "uint16" => Some(f64::from(u16::MAX)),
                    "uint32" => Some(f64::from(u32::MAX)),
                    _ => None,
                };
                if let Some(max) = max {
                    obj.entry("maximum").or_insert(max.into());
                }
            }
            for child in obj.values_mut() {
                kubernetes_formats_only(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(kubernetes_formats_only),
        _ => {}
    }
}

/// The CustomResourceDefinition of [`UsageBackfill`].
pub fn crd() -> CustomResourceDefinition {
    let mut crd = UsageBackfill::crd();
    // The apiserver applies schema defaults when it reads an object from
    // storage, including to a missing `status`: a just-created object then
    // reads `observedGeneration: -1` and kstatus (Flux, Helm 4 --wait) never
    // calls it Current before the controller has looked at it. The -1
    // default of the field itself applies only once a status exists.
    for version in &mut crd.spec.versions {
        let status = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("status"));
        if let Some(status) = status {
            status.default = Some(
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON(
                    serde_json::json!({ "observedGeneration": -1 }),
                ),
            );
        }
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            let mut v = serde_json::to_value(&*schema).expect("a schema serializes");
            kubernetes_formats_only(&mut v);
            *schema = serde_json::from_value(v).expect("a schema without formats is a schema");
        }
    }
    crd
}

/// The CRD as the YAML committed under `crds/`.
pub fn crd_yaml() -> String {
    let yaml = serde_saphyr::to_string(&crd()).expect("a CRD always serializes to YAML");
    format!("# Generated by usage-backfill crd; do not edit.\n{yaml}")
}
