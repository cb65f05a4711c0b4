//! Per-verb RBAC for the fake API server, from the rules the chart grants
//! (`rbac-rules.yaml`, which `.ci/chart-check` proves equal to the
//! rendered chart's in both Secret access modes). Every client of the fake
//! is the operator's ServiceAccount: a request the rules do not allow gets
//! the apiserver's 403 Forbidden.

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
    secret_watch_rules: Vec<Rule>,
    lease_rules: Vec<Rule>,
}

/// How the operator may read Secrets: the chart's `secrets.watch`, the
/// controller's `--watch-secrets`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SecretAccess {
    /// `get` only (the default).
    #[default]
    Get,
    /// `get`, `list` and `watch`.
    Watch,
}

impl SecretAccess {
    /// The access a controller with these settings needs.
    pub fn of(watch_secrets: bool) -> Self {
        if watch_secrets {
            SecretAccess::Watch
        } else {
            SecretAccess::Get
        }
    }
}

/// (apiGroup, resource[/subresource]) -> verbs.
pub type Grants = BTreeMap<(String, String), BTreeSet<String>>;

/// What the chart grants the operator (watched namespaces and the
/// leader-election Lease together) with `access` to Secrets.
pub fn grants(access: SecretAccess) -> &'static Grants {
    static GET: OnceLock<Grants> = OnceLock::new();
    static WATCH: OnceLock<Grants> = OnceLock::new();
    let build = |access| {
        let file: RulesFile = serde_saphyr::from_str(RULES_YAML).expect("rbac-rules.yaml parses");
        let extra = match access {
            SecretAccess::Get => &[][..],
            SecretAccess::Watch => &file.secret_watch_rules[..],
        };
        let mut out = Grants::new();
        for r in file
            .watch_rules
            .iter()
            .chain(extra)
            .chain(&file.lease_rules)
        {
            for g in &r.api_groups {
                for res in &r.resources {
                    out.entry((g.clone(), res.clone()))
                        .or_default()
                        .extend(r.verbs.iter().cloned());
                }
            }
        }
        out
    };
    match access {
        SecretAccess::Get => GET.get_or_init(|| build(access)),
        SecretAccess::Watch => WATCH.get_or_init(|| build(access)),
    }
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

/// Whether the chart's rules, with `access` to Secrets, allow `verb` on
/// `group`/`resource`.
pub fn allowed(access: SecretAccess, group: &str, resource: &str, verb: &str) -> bool {
    grants(access)
        .get(&(group.to_owned(), resource.to_owned()))
        .is_some_and(|v| v.contains(verb) || v.contains("*"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_get_only_unless_watched() {
        for verb in ["get", "list", "watch"] {
            assert_eq!(
                allowed(SecretAccess::Get, "", "secrets", verb),
                verb == "get",
                "{verb}"
            );
            assert!(allowed(SecretAccess::Watch, "", "secrets", verb), "{verb}");
        }
        let (get, watch) = (grants(SecretAccess::Get), grants(SecretAccess::Watch));
        let others = |g: &Grants| {
            g.iter()
                .filter(|(k, _)| k.1 != "secrets")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(others(get), others(watch), "only Secrets differ");
    }
}
