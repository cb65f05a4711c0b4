//! The UsageBackfill specs that keep or break the CRD's CEL rules, shared
//! by the fake API server's rule tests (`tests/packaging/cel.rs`) and the real
//! kube-apiserver's (`tests/control_plane/cluster.rs`), so that both judge the same
//! objects.

use serde_json::{Value, json};
use usage_backfill_api::rules;

/// The application chart's default install: built-in PostgreSQL, only the
/// password in Secret multica-secrets.
pub(crate) fn builtin() -> Value {
    json!({
        "host": "shop-postgres",
        "user": "multica",
        "database": "multica",
        "passwordFrom": {"secretKeyRef": {"name": "multica-secrets", "key": "POSTGRES_PASSWORD"}},
        "tls": {"mode": "disable"},
    })
}

pub(crate) fn external() -> Value {
    json!({"secretRef": {"name": "multica-secrets", "key": "DATABASE_URL"}})
}

pub(crate) fn valid_specs() -> Vec<(&'static str, Value)> {
    vec![
        (
            "minimal secretRef",
            json!({"database": {"secretRef": {"name": "app-db"}}}),
        ),
        (
            "external database (app chart)",
            json!({"database": external()}),
        ),
        (
            "built-in database (app chart)",
            json!({"database": builtin()}),
        ),
        (
            "parts from Secrets",
            json!({"database": {
                "hostFrom": {"secretKeyRef": {"name": "db", "key": "host"}},
                "portFrom": {"secretKeyRef": {"name": "db", "key": "port"}},
                "databaseFrom": {"secretKeyRef": {"name": "db", "key": "dbname"}},
                "userFrom": {"secretKeyRef": {"name": "db", "key": "user"}},
                "tls": {"mode": "verify-full", "caSecretRef": {"name": "db-ca"}},
            }}),
        ),
        (
            "Always with monthsBack and forcePartial",
            json!({"database": external(), "mode": "Always", "monthsBack": 3, "forcePartial": true}),
        ),
        (
            "Always with monthsBack only",
            json!({"database": external(), "mode": "Always", "monthsBack": 1}),
        ),
        (
            "explicit zero and false in IfLagging",
            json!({"database": external(), "mode": "IfLagging", "monthsBack": 0, "forcePartial": false}),
        ),
        (
            "durations at their minimum",
            json!({"database": external(), "sliceTimeout": "1ms", "maxSliceDuration": "1s", "lockTimeout": "0"}),
        ),
        (
            "longer durations",
            json!({"database": external(), "sliceTimeout": "2m30s", "maxSliceDuration": "1.5h"}),
        ),
        (
            "a CA without an explicit mode",
            json!({"database": {"secretRef": {"name": "app-db"}, "tls": {"caSecretRef": {"name": "db-ca"}}}}),
        ),
    ]
}

/// Invalid specs and the one message each must be refused with.
pub(crate) fn invalid_specs() -> Vec<(&'static str, Value, rules::Rule)> {
    let with = |extra: Value| {
        let mut db = builtin();
        db.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        json!({ "database": db })
    };
    vec![
        (
            "both forms",
            with(json!({"secretRef": {"name": "multica-secrets", "key": "DATABASE_URL"}})),
            rules::ONE_FORM,
        ),
        (
            "secretRef with only a password",
            json!({"database": {
                "secretRef": {"name": "app-db"},
                "passwordFrom": {"secretKeyRef": {"name": "multica-secrets", "key": "POSTGRES_PASSWORD"}},
            }}),
            rules::ONE_FORM,
        ),
        (
            "no form at all",
            json!({"database": {"tls": {"mode": "require"}}}),
            rules::SOME_FORM,
        ),
        (
            "parts without a host",
            json!({"database": {"user": "multica", "port": 5432}}),
            rules::SOME_FORM,
        ),
        (
            "parts without a user",
            json!({"database": {"host": "shop-postgres"}}),
            rules::PARTS_NEED_USER,
        ),
        (
            "host twice",
            with(json!({"hostFrom": {"secretKeyRef": {"name": "db", "key": "host"}}})),
            rules::HOST_ONCE,
        ),
        (
            "port twice",
            with(
                json!({"port": 5432, "portFrom": {"secretKeyRef": {"name": "db", "key": "port"}}}),
            ),
            rules::PORT_ONCE,
        ),
        (
            "database twice",
            with(json!({"databaseFrom": {"secretKeyRef": {"name": "db", "key": "dbname"}}})),
            rules::DATABASE_ONCE,
        ),
        (
            "user twice",
            with(json!({"userFrom": {"secretKeyRef": {"name": "db", "key": "user"}}})),
            rules::USER_ONCE,
        ),
        (
            "a CA with TLS disabled",
            json!({"database": {"secretRef": {"name": "app-db"}, "tls": {"mode": "disable", "caSecretRef": {"name": "db-ca"}}}}),
            rules::CA_NOT_WITH_DISABLE,
        ),
        (
            "monthsBack in IfLagging (the default mode)",
            json!({"database": external(), "monthsBack": 3}),
            rules::MONTHS_BACK_ONLY_ALWAYS,
        ),
        (
            "forcePartial without monthsBack",
            json!({"database": external(), "mode": "Always", "forcePartial": true}),
            rules::FORCE_PARTIAL_NEEDS_MONTHS_BACK,
        ),
        (
            "forcePartial in IfLagging",
            json!({"database": external(), "mode": "IfLagging", "monthsBack": 0, "forcePartial": true}),
            rules::FORCE_PARTIAL_ONLY_ALWAYS,
        ),
        (
            "a zero slice timeout",
            json!({"database": external(), "sliceTimeout": "0s"}),
            rules::SLICE_TIMEOUT_MIN,
        ),
        (
            "a sub-millisecond slice timeout",
            json!({"database": external(), "sliceTimeout": "900us"}),
            rules::SLICE_TIMEOUT_MIN,
        ),
        (
            "a slice duration target under a second",
            json!({"database": external(), "maxSliceDuration": "500ms"}),
            rules::MAX_SLICE_DURATION_MIN,
        ),
    ]
}
