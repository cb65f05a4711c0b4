//! The Helm chart stays in step with the crate: its CRD copy is the
//! generated CRD byte for byte, and its RBAC grants what the controller uses.
//! (Rendering, schema validation and the rest: `.ci/chart-check`.)
//!
//! Sync the copy with `cp crds/*.yaml charts/usage-backfill-operator/crds/`,
//! or `UPDATE_CRDS=1 cargo test --test packaging chart`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use usage_backfill::cli::controller::ControllerArgs;
use usage_backfill_api as api;

const CRD_FILE: &str = "usagebackfills.usage.multica.ai.yaml";
const SYNC: &str = "cp crds/*.yaml charts/usage-backfill-operator/crds/ \
                    (or UPDATE_CRDS=1 cargo test --test packaging chart)";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/usage-backfill-operator")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

#[test]
fn chart_crd_is_the_generated_crd() {
    let copy = chart().join("crds").join(CRD_FILE);
    if std::env::var("UPDATE_CRDS").as_deref() == Ok("1") {
        // From the generator, not from crds/: tests/packaging/crd.rs may rewrite that
        // file after this test has run.
        std::fs::write(&copy, api::crd_yaml()).unwrap();
        return;
    }
    let source = root().join("crds").join(CRD_FILE);
    let (a, b) = (read(&source), read(&copy));
    if a != b {
        let line = a
            .lines()
            .zip(b.lines())
            .position(|(x, y)| x != y)
            .unwrap_or_else(|| a.lines().count().min(b.lines().count()));
        panic!(
            "{} differs from {} (first difference at line {}); sync it with: {SYNC}",
            copy.display(),
            source.display(),
            line + 1
        );
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    api_groups: Vec<String>,
    resources: Vec<String>,
    verbs: Vec<String>,
}

/// (apiGroup, resource) -> verbs, from a YAML list of RBAC rules.
fn grants(rules_yaml: &str) -> BTreeMap<(String, String), BTreeSet<String>> {
    let rules: Vec<Rule> = serde_saphyr::from_str(rules_yaml)
        .unwrap_or_else(|e| panic!("RBAC rules are not a YAML list of rules: {e}\n{rules_yaml}"));
    let mut out: BTreeMap<_, BTreeSet<String>> = BTreeMap::new();
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

/// The body of a named template of `_helpers.tpl`.
fn define<'a>(helpers: &'a str, name: &str) -> &'a str {
    let start = format!("{{{{- define \"{name}\" -}}}}");
    let body = helpers
        .split_once(&start)
        .unwrap_or_else(|| panic!("_helpers.tpl defines no {name}"))
        .1;
    body.split_once("{{- end }}")
        .unwrap_or_else(|| panic!("{name} in _helpers.tpl has no end"))
        .0
}

/// What the controller does with each resource it touches, per watched
/// namespace: reconcile UsageBackfills (list and watch, get before acting,
/// finalizer patch, status by server-side apply), read the Secrets they
/// name (get; with `secrets.watch`, also the metadata watch:
/// [`SECRET_WATCH_NEEDS`]), create Events (kube's Recorder: events.k8s.io
/// only), keep the walk's progress records (ConfigMaps: get by name,
/// server-side apply, which also creates, delete once stamped).
const WATCH_NEEDS: &[(&str, &str, &[&str])] = &[
    (
        "usage.multica.ai",
        "usagebackfills",
        &["get", "list", "watch", "patch"],
    ),
    ("usage.multica.ai", "usagebackfills/status", &["patch"]),
    ("", "secrets", &["get"]),
    ("events.k8s.io", "events", &["create"]),
    ("", "configmaps", &["get", "create", "patch", "delete"]),
];

/// Added with `secrets.watch` (`--watch-secrets`): the Secret metadata
/// watch and its paginated lists.
const SECRET_WATCH_NEEDS: &[(&str, &str, &[&str])] = &[("", "secrets", &["list", "watch"])];

/// Built-in kinds a controller might start using, with their API group and
/// resource; a kind of this table imported under `src/` or
/// `crates/controller/src/` must be granted.
const KNOWN_KINDS: &[(&str, &str, &str)] = &[
    ("Secret", "", "secrets"),
    ("ConfigMap", "", "configmaps"),
    ("Event", "events.k8s.io", "events"),
    ("Lease", "coordination.k8s.io", "leases"),
    ("Pod", "", "pods"),
    ("Namespace", "", "namespaces"),
    ("Service", "", "services"),
    ("ServiceAccount", "", "serviceaccounts"),
    ("Job", "batch", "jobs"),
    ("Deployment", "apps", "deployments"),
];

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Kinds of [`KNOWN_KINDS`] that `src/` or the controller crate imports
/// from `k8s_openapi::api`.
fn kinds_used_by_the_crate() -> BTreeSet<&'static str> {
    let mut files = Vec::new();
    rust_sources(&root().join("src"), &mut files);
    rust_sources(&root().join("crates/controller/src"), &mut files);
    let mut used = BTreeSet::new();
    for file in files {
        let text = read(&file);
        let mut rest = text.as_str();
        while let Some(i) = rest.find("k8s_openapi::api::") {
            rest = &rest[i..];
            let path = rest.split([';', '>', ')']).next().unwrap_or("");
            for (kind, _, _) in KNOWN_KINDS {
                let named = path
                    .split(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                    .any(|word| word == *kind);
                if named {
                    used.insert(*kind);
                }
            }
            rest = &rest["k8s_openapi::api::".len()..];
        }
    }
    used
}

#[test]
fn chart_rbac_grants_what_the_controller_uses() {
    let templates = chart().join("templates");
    let helpers = read(&templates.join("_helpers.tpl"));
    let rbac = read(&templates.join("rbac.yaml"));
    let watch = grants(define(&helpers, "usage-backfill-operator.watchRules"));

    let mut missing = Vec::new();
    for (group, resource, verbs) in WATCH_NEEDS {
        let have = watch
            .get(&((*group).to_owned(), (*resource).to_owned()))
            .cloned()
            .unwrap_or_default();
        for verb in *verbs {
            if !have.contains(*verb) {
                missing.push(format!("{verb} {group}/{resource}"));
            }
        }
    }
    for kind in kinds_used_by_the_crate() {
        let (_, group, resource) = KNOWN_KINDS.iter().find(|(k, _, _)| *k == kind).unwrap();
        let granted = watch.contains_key(&((*group).to_owned(), (*resource).to_owned()))
            || rbac.contains(&format!("resources: [\"{resource}\"]"));
        if !granted {
            missing.push(format!("src/ uses {kind}: grant {group}/{resource}"));
        }
    }
    assert!(
        missing.is_empty(),
        "charts/usage-backfill-operator/templates/_helpers.tpl (watchRules) lacks: {}",
        missing.join(", ")
    );
    for (key, verbs) in &watch {
        assert!(
            !key.0.contains('*') && !key.1.contains('*') && !verbs.contains("*"),
            "no wildcards in the chart's RBAC: {key:?} {verbs:?}"
        );
    }
    assert_eq!(
        watch.get(&(String::new(), "secrets".to_owned())),
        Some(&BTreeSet::from(["get".to_owned()])),
        "by default the chart grants get, and only get, on Secrets"
    );
    let secret_watch = grants(define(&helpers, "usage-backfill-operator.secretWatchRules"));
    let want: BTreeMap<_, BTreeSet<_>> = SECRET_WATCH_NEEDS
        .iter()
        .map(|(g, r, verbs)| {
            let verbs = verbs.iter().map(|v| (*v).to_owned()).collect();
            (((*g).to_owned(), (*r).to_owned()), verbs)
        })
        .collect();
    assert_eq!(
        secret_watch, want,
        "secretWatchRules grant exactly the Secret watch's needs"
    );

    // Both modes use the same rules: the ClusterRole, and one Role per
    // watched namespace.
    let uses = rbac
        .matches("include \"usage-backfill-operator.watchRules\"")
        .count();
    assert_eq!(
        uses, 2,
        "rbac.yaml must use watchRules in the ClusterRole and the per-namespace Role"
    );
    let uses = rbac
        .matches("include \"usage-backfill-operator.secretWatchRules\"")
        .count();
    assert_eq!(
        uses, 2,
        "rbac.yaml must add secretWatchRules to the ClusterRole and the per-namespace Role"
    );
    for needle in [
        "kind: ClusterRole",
        "kind: Role",
        "range $i, $ns := .Values.watchNamespaces",
    ] {
        assert!(rbac.contains(needle), "rbac.yaml lacks {needle:?}");
    }

    // Leader election: the Lease in the release namespace, read by name
    // and written by patch (kube-lease-manager), created when missing.
    let lease_rule = rbac
        .split("---")
        .find(|doc| doc.contains("resources: [\"leases\"]"))
        .expect("rbac.yaml grants no leases (leader election)");
    assert!(
        lease_rule.contains("kind: Role")
            && lease_rule.contains("namespace: {{ .Release.Namespace }}")
    );
    assert!(lease_rule.contains("apiGroups: [\"coordination.k8s.io\"]"));
    for verb in ["get", "create", "patch"] {
        assert!(
            lease_rule.contains(&format!("\"{verb}\"")),
            "leases lack {verb}"
        );
    }
    for verb in ["list", "watch", "update"] {
        assert!(
            !lease_rule.contains(&format!("\"{verb}\"")),
            "the controller does not {verb} Leases"
        );
    }
}

/// The pattern values.schema.json refuses `extraArgs` items with, and the
/// names it refuses in `extraEnv`.
fn extra_guards() -> (regex::Regex, BTreeSet<String>) {
    let schema: serde_json::Value =
        serde_json::from_str(&read(&chart().join("values.schema.json"))).unwrap();
    let props = &schema["properties"];
    let pattern = props["extraArgs"]["items"]["not"]["pattern"]
        .as_str()
        .expect("extraArgs items have a `not` pattern");
    let env = props["extraEnv"]["items"]["properties"]["name"]["not"]["enum"]
        .as_array()
        .expect("extraEnv names have a `not` enum")
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    (regex::Regex::new(pattern).unwrap(), env)
}

/// The long flags (`--name=`) and environment variables (`- name: X`)
/// the chart's Deployment sets for the controller.
fn deployment_sets() -> (BTreeSet<String>, BTreeSet<String>) {
    let deployment = read(&chart().join("templates/deployment.yaml"));
    let flag = regex::Regex::new(r"(?m)^\s*- --([a-z-]+)").unwrap();
    let env = regex::Regex::new(r"(?m)^\s*- name: ([A-Z_]+)\s*$").unwrap();
    let flags = flag
        .captures_iter(&deployment)
        .map(|c| c[1].to_owned())
        .collect();
    let envs = env
        .captures_iter(&deployment)
        .map(|c| c[1].to_owned())
        .collect();
    (flags, envs)
}

/// `extraArgs` and `extraEnv` cannot override what the chart sets, in any
/// spelling clap accepts: RBAC, probes and the Lease follow the chart's
/// values, so an override would break them quietly.
#[test]
fn extra_args_and_env_cannot_override_what_the_chart_sets() {
    let (refused, refused_env) = extra_guards();
    let (chart_flags, chart_env) = deployment_sets();
    for needed in ["namespace", "health-addr", "lease-name", "watch-secrets"] {
        assert!(
            chart_flags.contains(needed),
            "the Deployment passes --{needed}: {chart_flags:?}"
        );
    }
    let command = <ControllerArgs as clap::Args>::augment_args(clap::Command::new("controller"));
    let mut checked = 0;
    for arg in command.get_arguments() {
        let Some(long) = arg.get_long() else { continue };
        // Set by the chart as a flag, or through the variable the flag
        // reads (--lease-namespace: POD_NAMESPACE, where the Lease's Role is).
        let set_by_chart = chart_flags.contains(long)
            || arg
                .get_env()
                .is_some_and(|e| chart_env.contains(e.to_str().unwrap()));
        if set_by_chart {
            let longs = std::iter::once(long).chain(arg.get_all_aliases().unwrap_or_default());
            for name in longs {
                for spelling in [format!("--{name}"), format!("--{name}=x")] {
                    assert!(
                        refused.is_match(&spelling),
                        "extraArgs lets {spelling} through"
                    );
                }
            }
            if let Some(short) = arg.get_short() {
                for spelling in [
                    format!("-{short}"),
                    format!("-{short}x"),
                    format!("-{short}=x"),
                ] {
                    assert!(
                        refused.is_match(&spelling),
                        "extraArgs lets {spelling} through"
                    );
                }
            }
            checked += 1;
        }
        if let Some(env) = arg.get_env() {
            let env = env.to_str().unwrap();
            assert!(
                refused_env.contains(env),
                "extraEnv may set {env}, which --{long} reads: refuse it in values.schema.json"
            );
        }
    }
    assert!(checked >= 6, "{checked} flags checked");
    for env in &chart_env {
        assert!(
            refused_env.contains(env),
            "extraEnv may override {env}, which the chart sets"
        );
    }
    for allowed in [
        "--retry-backoff=30s",
        "--set=work_mem=64MB",
        "--lease-duration=20s",
    ] {
        assert!(!refused.is_match(allowed), "{allowed} is refused");
    }
}

/// Two releases in one namespace get two Leases: the Deployment passes the
/// release's full name as `--lease-name`, and the leader-election Role
/// grants get and patch on that name only (create cannot be limited by
/// name). The rendered result, two releases side by side: .ci/chart-check.
#[test]
fn each_release_elects_its_leader_on_a_lease_of_its_own() {
    let templates = chart().join("templates");
    let deployment = read(&templates.join("deployment.yaml"));
    assert!(
        deployment.contains("- --lease-name={{ include \"usage-backfill-operator.fullname\" . }}"),
        "the Deployment passes the release's full name as --lease-name"
    );
    let helpers = read(&templates.join("_helpers.tpl"));
    assert!(
        define(&helpers, "usage-backfill-operator.fullname").contains(".Release.Name"),
        "the full name is per release"
    );
    let rbac = read(&templates.join("rbac.yaml"));
    assert!(rbac.contains("{{- $fullname := include \"usage-backfill-operator.fullname\" . }}"));
    let lease_role = rbac
        .split("---")
        .find(|doc| doc.contains("resources: [\"leases\"]"))
        .unwrap();
    let rules: Vec<&str> = lease_role.split("  - apiGroups:").skip(1).collect();
    assert_eq!(rules.len(), 2, "{lease_role}");
    assert!(
        rules[0].contains("verbs: [\"create\"]") && !rules[0].contains("resourceNames"),
        "create, unnamed: {}",
        rules[0]
    );
    assert!(
        rules[1].contains("resourceNames: [{{ $fullname | quote }}]")
            && rules[1].contains("verbs: [\"get\", \"patch\"]"),
        "get and patch on the release's Lease only: {}",
        rules[1]
    );
}
