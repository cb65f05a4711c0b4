//! Per-verb RBAC for the fake API server, from the rules the chart grants
//! (`rbac-rules.yaml`, which `.ci/chart-check` proves equal to the
//! rendered chart's in both Secret access modes). Every client of the fake
//! is the operator's ServiceAccount: a request the rules do not allow gets
//! the apiserver's 403 Forbidden.
//!
//! Rules apply where the chart binds them ([`Scope`]): the watch rules in
//! a ClusterRole (every namespace, and cluster-wide lists and watches) or,
//! with `watchNamespaces`, in a Role per watched namespace (that namespace
//! only, so a request elsewhere or across all namespaces is denied); the
//! leader-election rules in a Role of the release namespace.
//!
//! Every request allowed is also noted, when [`LOG_ENV`] names a file, as
//! one line of its Secret mode, scope, group, resource and verb: the
//! whole suite's union of them shows which granted verbs the code uses
//! (`tests/controller/rbac_verbs.rs` compares it with the rules).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::sync::{Mutex, OnceLock};

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

/// Where the chart binds its rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scope {
    /// The watched namespaces (`watchNamespaces`), each with a Role of the
    /// watch rules; empty: a ClusterRole (the chart's default).
    pub watched: Vec<String>,
    /// The namespace of the leader-election Role (the release namespace);
    /// `None` stands for whichever namespace a test puts its Lease in.
    pub lease_namespace: Option<String>,
}

impl Scope {
    /// A namespaced install: Roles in `watched`, the Lease's in `release`.
    pub fn namespaced(watched: &[&str], release: &str) -> Self {
        Scope {
            watched: watched.iter().map(|n| (*n).to_owned()).collect(),
            lease_namespace: Some(release.to_owned()),
        }
    }
}

/// (apiGroup, resource[/subresource]) -> verbs.
pub type Grants = BTreeMap<(String, String), BTreeSet<String>>;

/// The watch rules (with `access` to Secrets) and the leader-election
/// rules, apart: they are bound in different places.
fn rule_sets(access: SecretAccess) -> &'static (Grants, Grants) {
    static GET: OnceLock<(Grants, Grants)> = OnceLock::new();
    static WATCH: OnceLock<(Grants, Grants)> = OnceLock::new();
    let build = |access| {
        let file: RulesFile = serde_saphyr::from_str(RULES_YAML).expect("rbac-rules.yaml parses");
        let extra = match access {
            SecretAccess::Get => &[][..],
            SecretAccess::Watch => &file.secret_watch_rules[..],
        };
        (
            grants_of(file.watch_rules.iter().chain(extra)),
            grants_of(file.lease_rules.iter()),
        )
    };
    match access {
        SecretAccess::Get => GET.get_or_init(|| build(access)),
        SecretAccess::Watch => WATCH.get_or_init(|| build(access)),
    }
}

fn grants_of<'a>(rules: impl Iterator<Item = &'a Rule>) -> Grants {
    let mut out = Grants::new();
    for r in rules {
        for g in &r.api_groups {
            for res in &r.resources {
                out.entry((g.clone(), res.clone()))
                    .or_default()
                    .extend(r.verbs.iter().cloned());
            }
        }
    }
    out
}

/// What the chart grants the operator (watched namespaces and the
/// leader-election Lease together) with `access` to Secrets, wherever.
pub fn grants(access: SecretAccess) -> Grants {
    let (watch, lease) = rule_sets(access);
    let mut out = watch.clone();
    for (k, v) in lease {
        out.entry(k.clone()).or_default().extend(v.iter().cloned());
    }
    out
}

/// The environment variable naming the file allowed requests are noted in
/// (appended to, one tab-separated line per distinct use; see
/// [`Use::line`]).
pub const LOG_ENV: &str = "USAGE_BACKFILL_RBAC_LOG";

/// One use of a granted verb, as noted in the [`LOG_ENV`] file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Use {
    /// `get` or `watch` ([`SecretAccess`]).
    pub secrets: String,
    /// `cluster` (a ClusterRole) or `namespaced` (`watchNamespaces`).
    pub scope: String,
    pub group: String,
    pub resource: String,
    pub verb: String,
}

impl Use {
    fn new(access: SecretAccess, scope: &Scope, group: &str, resource: &str, verb: &str) -> Self {
        Use {
            secrets: secrets_name(access).to_owned(),
            scope: scope_name(scope).to_owned(),
            group: group.to_owned(),
            resource: resource.to_owned(),
            verb: verb.to_owned(),
        }
    }

    /// `secrets<TAB>scope<TAB>group<TAB>resource<TAB>verb`.
    pub fn line(&self) -> String {
        [
            &self.secrets,
            &self.scope,
            &self.group,
            &self.resource,
            &self.verb,
        ]
        .map(String::as_str)
        .join("\t")
    }

    pub fn parse(line: &str) -> Option<Use> {
        let mut f = line.split('\t').map(str::to_owned);
        let u = Use {
            secrets: f.next()?,
            scope: f.next()?,
            group: f.next()?,
            resource: f.next()?,
            verb: f.next()?,
        };
        f.next().is_none().then_some(u)
    }
}

/// How the [`LOG_ENV`] file names a Secret mode.
pub fn secrets_name(access: SecretAccess) -> &'static str {
    match access {
        SecretAccess::Get => "get",
        SecretAccess::Watch => "watch",
    }
}

/// How the [`LOG_ENV`] file names a scope.
pub fn scope_name(scope: &Scope) -> &'static str {
    if scope.watched.is_empty() {
        "cluster"
    } else {
        "namespaced"
    }
}

/// Notes `u` in the [`LOG_ENV`] file, once per process. Lines are short
/// appends, whole even with several test processes writing.
fn note(u: Use) {
    static NOTED: Mutex<BTreeSet<Use>> = Mutex::new(BTreeSet::new());
    let Some(path) = std::env::var_os(LOG_ENV) else {
        return;
    };
    let mut noted = NOTED.lock().unwrap_or_else(|p| p.into_inner());
    if noted.contains(&u) {
        return;
    }
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .unwrap_or_else(|e| panic!("{LOG_ENV}={}: {e}", path.to_string_lossy()));
    file.write_all(format!("{}\n", u.line()).as_bytes())
        .unwrap_or_else(|e| panic!("{LOG_ENV}={}: {e}", path.to_string_lossy()));
    noted.insert(u);
}

/// [`allowed`], noting an allowed request (see [`LOG_ENV`]): what the fake
/// API server asks for every request it authorizes.
pub fn authorize(
    access: SecretAccess,
    scope: &Scope,
    namespace: Option<&str>,
    group: &str,
    resource: &str,
    verb: &str,
) -> bool {
    let ok = allowed(access, scope, namespace, group, resource, verb);
    if ok {
        note(Use::new(access, scope, group, resource, verb));
    }
    ok
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

/// Whether the chart's rules, with `access` to Secrets and bound as in
/// `scope`, allow `verb` on `group`/`resource` in `namespace` (`None`: a
/// cluster-wide request, which only a ClusterRole can allow).
pub fn allowed(
    access: SecretAccess,
    scope: &Scope,
    namespace: Option<&str>,
    group: &str,
    resource: &str,
    verb: &str,
) -> bool {
    let grant = |g: &Grants| {
        g.get(&(group.to_owned(), resource.to_owned()))
            .is_some_and(|v| v.contains(verb) || v.contains("*"))
    };
    let (watch, lease) = rule_sets(access);
    let watched = match namespace {
        _ if scope.watched.is_empty() => true,
        Some(ns) => scope.watched.iter().any(|w| w == ns),
        None => false,
    };
    let lease_ns = namespace.is_some_and(|ns| {
        scope
            .lease_namespace
            .as_deref()
            .is_none_or(|release| release == ns)
    });
    (watched && grant(watch)) || (lease_ns && grant(lease))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_get_only_unless_watched() {
        let all = Scope::default();
        for verb in ["get", "list", "watch"] {
            assert_eq!(
                allowed(SecretAccess::Get, &all, Some("shop"), "", "secrets", verb),
                verb == "get",
                "{verb}"
            );
            assert!(
                allowed(SecretAccess::Watch, &all, Some("shop"), "", "secrets", verb),
                "{verb}"
            );
        }
        let (get, watch) = (grants(SecretAccess::Get), grants(SecretAccess::Watch));
        let others = |g: &Grants| {
            g.iter()
                .filter(|(k, _)| k.1 != "secrets")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(others(&get), others(&watch), "only Secrets differ");
    }

    #[test]
    fn roles_grant_in_their_namespace_only() {
        let a = SecretAccess::Get;
        let ns = Scope::namespaced(&["shop"], "ops");
        let ubf = |scope: &Scope, namespace, verb| {
            allowed(
                a,
                scope,
                namespace,
                "usage.multica.ai",
                "usagebackfills",
                verb,
            )
        };
        assert!(ubf(&ns, Some("shop"), "watch"));
        assert!(!ubf(&ns, Some("other"), "watch"), "a namespace not watched");
        assert!(!ubf(&ns, None, "watch"), "across all namespaces");
        assert!(
            !ubf(&ns, Some("ops"), "get"),
            "the release namespace is not watched"
        );
        let lease = |scope: &Scope, namespace| {
            allowed(
                a,
                scope,
                namespace,
                "coordination.k8s.io",
                "leases",
                "create",
            )
        };
        assert!(lease(&ns, Some("ops")));
        assert!(
            !lease(&ns, Some("shop")),
            "the Lease Role is in the release namespace"
        );
        assert!(!lease(&ns, None));
        // A ClusterRole: everywhere, cluster-wide requests included.
        let cluster = Scope::default();
        assert!(ubf(&cluster, None, "watch") && ubf(&cluster, Some("other"), "watch"));
    }
}
