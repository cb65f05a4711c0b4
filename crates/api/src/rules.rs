//! The cross-field rules of a UsageBackfill, in one table: the CRD carries
//! them as `x-kubernetes-validations` (CEL), so that the API server refuses
//! a contradictory object at `kubectl apply`, and
//! [`UsageBackfillSpec::validate`](crate::UsageBackfillSpec::validate)
//! checks the same conditions with the same words, as the second line of
//! defence (objects stored before the rules existed, servers that skip them).
//!
//! The rules use only what every Kubernetes since 1.26 evaluates (`has`, comparisons,
//! `duration`), carry only `rule` and `message` (no `messageExpression` or
//! `reason`, which came later), and walk no lists or maps, so their
//! estimated cost stays far below the API server's limits.
//!
//! A rule about one field but attached to its parent (it reads a sibling)
//! names the field with `fieldPath`, so that the API server's refusal
//! points at it, once the oldest Kubernetes the chart claims
//! ([`MIN_KUBERNETES_MINOR`]) has `fieldPath` (1.28,
//! [`FIELD_PATH_SINCE_MINOR`]): an older API server does not know the key
//! and refuses the CRD under strict field validation (`kubectl apply`).
//! (The chart claims 1.34, the oldest version tested against a real API
//! server, so the rules carry `fieldPath`.)

use schemars::Schema;
use serde_json::json;

/// One CEL rule and what it says when it refuses an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// Path of the field the message is about, below `spec`.
    pub field: &'static str,
    /// What is wrong and how to fix it.
    pub problem: &'static str,
    /// The CEL expression, true for an acceptable object; `self` is the
    /// object the rule is attached to.
    pub rule: &'static str,
}

impl Rule {
    /// The message the API server shows: `spec.<field>: <problem>`, the
    /// same text as the controller's `InvalidSpec` condition.
    pub fn message(&self) -> String {
        format!("spec.{}: {}", self.field, self.problem)
    }
}

pub(crate) const ONLY_ALWAYS: &str =
    "applies to mode Always only; remove it or set spec.mode: Always";

pub const MONTHS_BACK_ONLY_ALWAYS: Rule = Rule {
    field: "monthsBack",
    problem: ONLY_ALWAYS,
    rule: "(has(self.mode) && self.mode == 'Always') || !has(self.monthsBack) || self.monthsBack == 0",
};
pub const FORCE_PARTIAL_ONLY_ALWAYS: Rule = Rule {
    field: "forcePartial",
    problem: ONLY_ALWAYS,
    rule: "(has(self.mode) && self.mode == 'Always') || !has(self.forcePartial) || !self.forcePartial",
};
pub const FORCE_PARTIAL_NEEDS_MONTHS_BACK: Rule = Rule {
    field: "forcePartial",
    problem: "has no effect without spec.monthsBack above 0 (the whole history is walked); remove it or set monthsBack",
    rule: "!has(self.forcePartial) || !self.forcePartial || (has(self.monthsBack) && self.monthsBack > 0)",
};
pub const SLICE_TIMEOUT_MIN: Rule = Rule {
    field: "sliceTimeout",
    problem: "must be at least 1ms (omit the field for no timeout)",
    rule: "!has(self.sliceTimeout) || duration(self.sliceTimeout) >= duration('1ms')",
};
pub const MAX_SLICE_DURATION_MIN: Rule = Rule {
    field: "maxSliceDuration",
    problem: concat!(
        "must be at least ",
        usage_backfill_limits::min_max_slice_duration!(),
        " (omit the field for no target)"
    ),
    rule: concat!(
        "!has(self.maxSliceDuration) || duration(self.maxSliceDuration) >= duration('",
        usage_backfill_limits::min_max_slice_duration!(),
        "')"
    ),
};

/// Rules on `spec`.
pub const SPEC_RULES: &[Rule] = &[
    MONTHS_BACK_ONLY_ALWAYS,
    FORCE_PARTIAL_ONLY_ALWAYS,
    FORCE_PARTIAL_NEEDS_MONTHS_BACK,
    SLICE_TIMEOUT_MIN,
    MAX_SLICE_DURATION_MIN,
];

pub const ONE_FORM: Rule = Rule {
    field: "database",
    problem: "secretRef (a whole connection string) cannot be combined with host, port, database, user or passwordFrom (the connection in parts); use one form",
    rule: "!has(self.secretRef) || !(has(self.host) || has(self.hostFrom) || has(self.port) || has(self.portFrom) || has(self.database) || has(self.databaseFrom) || has(self.user) || has(self.userFrom) || has(self.passwordFrom))",
};
pub const SOME_FORM: Rule = Rule {
    field: "database",
    problem: "set secretRef (a Secret holding the connection string) or the connection in parts (host or hostFrom, user or userFrom, passwordFrom)",
    rule: "has(self.secretRef) || has(self.host) || has(self.hostFrom)",
};
pub const PARTS_NEED_USER: Rule = Rule {
    field: "database",
    problem: "the connection in parts needs user or userFrom",
    rule: "has(self.secretRef) || !(has(self.host) || has(self.hostFrom)) || has(self.user) || has(self.userFrom)",
};
pub const HOST_ONCE: Rule = Rule {
    field: "database.host",
    problem: "give host or hostFrom, not both",
    rule: "!has(self.host) || !has(self.hostFrom)",
};
pub const PORT_ONCE: Rule = Rule {
    field: "database.port",
    problem: "give port or portFrom, not both",
    rule: "!has(self.port) || !has(self.portFrom)",
};
pub const DATABASE_ONCE: Rule = Rule {
    field: "database.database",
    problem: "give database or databaseFrom, not both",
    rule: "!has(self.database) || !has(self.databaseFrom)",
};
pub const USER_ONCE: Rule = Rule {
    field: "database.user",
    problem: "give user or userFrom, not both",
    rule: "!has(self.user) || !has(self.userFrom)",
};

/// Rules on `spec.database`.
pub const DATABASE_RULES: &[Rule] = &[
    ONE_FORM,
    SOME_FORM,
    PARTS_NEED_USER,
    HOST_ONCE,
    PORT_ONCE,
    DATABASE_ONCE,
    USER_ONCE,
];

pub const CA_NOT_WITH_DISABLE: Rule = Rule {
    field: "database.tls.caSecretRef",
    problem: "has no effect with tls.mode disable; remove it or choose a TLS mode",
    rule: "!has(self.caSecretRef) || !has(self.mode) || self.mode != 'disable'",
};

/// Rules on `spec.database.tls`.
pub const TLS_RULES: &[Rule] = &[CA_NOT_WITH_DISABLE];

/// The oldest Kubernetes minor version the chart claims (its `kubeVersion`,
/// which tests/packaging/crd.rs keeps equal).
pub const MIN_KUBERNETES_MINOR: u32 = 34;

/// The Kubernetes minor version that added `fieldPath` to CRD validation
/// rules (its v1.28.0 release notes).
pub const FIELD_PATH_SINCE_MINOR: u32 = 28;

/// A rule's entry of `x-kubernetes-validations` on the node at `node`
/// (below `spec`, "" for `spec` itself), for Kubernetes 1.`minor` on.
pub fn validation(rule: &Rule, node: &str, minor: u32) -> serde_json::Value {
    let mut entry = json!({ "rule": rule.rule, "message": rule.message() });
    let below = match node {
        "" => Some(rule.field),
        node => rule
            .field
            .strip_prefix(node)
            .and_then(|rest| rest.strip_prefix('.')),
    };
    if minor >= FIELD_PATH_SINCE_MINOR
        && let Some(relative) = below
    {
        entry["fieldPath"] = json!(format!(".{relative}"));
    }
    entry
}

fn extend(schema: &mut Schema, rules: &[Rule], node: &str) {
    let list: Vec<_> = rules
        .iter()
        .map(|r| validation(r, node, MIN_KUBERNETES_MINOR))
        .collect();
    schema.insert("x-kubernetes-validations".into(), list.into());
}

pub(crate) fn spec_schema(schema: &mut Schema) {
    extend(schema, SPEC_RULES, "");
}

pub(crate) fn database_schema(schema: &mut Schema) {
    extend(schema, DATABASE_RULES, "database");
}

pub(crate) fn tls_schema(schema: &mut Schema) {
    extend(schema, TLS_RULES, "database.tls");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_paths_only_where_the_claimed_version_has_them() {
        let before = validation(&MONTHS_BACK_ONLY_ALWAYS, "", 27);
        assert!(before.get("fieldPath").is_none(), "{before}");
        assert_eq!(
            validation(&MONTHS_BACK_ONLY_ALWAYS, "", 28)["fieldPath"],
            ".monthsBack"
        );
        assert_eq!(validation(&HOST_ONCE, "database", 28)["fieldPath"], ".host");
        assert_eq!(
            validation(&CA_NOT_WITH_DISABLE, "database.tls", 28)["fieldPath"],
            ".caSecretRef"
        );
        // A rule about its own node needs none.
        assert!(
            validation(&ONE_FORM, "database", 28)
                .get("fieldPath")
                .is_none()
        );
    }
}
