//! Per-verb RBAC for the fake API server, from the rules the chart grants
//! (`rbac-rules.yaml`, which `.ci/chart-check` proves equal to the
//! rendered chart's). Every client of the fake is the operator's
//! ServiceAccount: a request the rules do not allow gets the apiserver's
//! 403 Forbidden.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::OnceLock;

use serde::Deserialize;

/// The rules file, as committed.
pub const RULES_YAML: &str = include_str!("../rbac-rules.yaml");

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RulesFile {
    watch_rules: Vec<Rule>,
    lease_rules: Vec<Rule>,
}

/// (apiGroup, resource[/subresource]) -> verbs.
pub type Grants = BTreeMap<(String, String), BTreeSet<String>>;

/// What the chart grants the operator (watched namespaces and the
/// leader-election Lease together).
pub fn grants() -> &'static Grants {
    static GRANTS: OnceLock<Grants> = OnceLock::new();
    GRANTS.get_or_init(|| {
        let file: RulesFile = serde_saphyr::from_str(RULES_YAML).expect("rbac-rules.yaml parses");
        let mut out = Grants::new();
        for r in file.watch_rules.iter().chain(&file.lease_rules) {
            for g in &r.api_groups {
                for res in &r.resources {
                    out.entry((g.clone(), res.clone()))
                        .or_default()
                        .extend(r.verbs.iter().cloned());
                }
            }
        }
        out
    })
}

/// The RBAC verb of a request, as the apiserver's request-info resolver
/// derives it.
pub fn verb(method: &str, has_name: bool, watch: bool) -> &'static str {
    match (method, has_name) {
        ("GET", _) if watch => "watch",
        ("GET", true) => "get",
        ("GET", false) => "list",
        ("POST", _) => "create",
        ("PUT", _) => "update",
        ("PATCH", _) => "patch",
        ("DELETE", true) => "delete",
        ("DELETE", false) => "deletecollection",
        _ => "unknown",
    }
}

/// Whether the chart's rules allow `verb` on `group`/`resource`.
pub fn allowed(group: &str, resource: &str, verb: &str) -> bool {
    grants()
        .get(&(group.to_owned(), resource.to_owned()))
        .is_some_and(|v| v.contains(verb) || v.contains("*"))
}
