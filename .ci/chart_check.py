#!/usr/bin/env python3
"""The chart, docs-example and sample checks of .ci/chart-check: Helm lint and
render of the operator chart in every documented configuration, the rendered
manifests validated against the Kubernetes JSON schemas, the recipes of
docs/packaging.md rendered into a stand-in of the application's chart
(.ci/app-chart), the alert rules unit-tested with promtool, and the samples
validated against the CRD. Run by .ci/chart-check inside its virtualenv
(helm-python-sdk, kubernetes-validate), from the repository's root."""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import helm_python as helm
import jsonschema
import kubernetes_validate as kv
import kubernetes_validate.version as kv_version
import yaml

CHART = "charts/usage-backfill-operator"
CRD = "crds/usagebackfills.usage.multica.ai.yaml"
# The oldest version Chart.yaml allows, and the API the controller is built against.
KUBE_VERSIONS = ["1.34", "1.37"]
RELEASE, NAMESPACE = "usage-backfill", "usage-system"
# Kinds kubernetes-validate has no schema for, each skipped on purpose;
# anything else without a schema is a failure.
SKIP_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator CRD (asserted field by field below)",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "Prometheus Operator CRD (its rules go through promtool below)",
    ("kustomize.toolkit.fluxcd.io/v1", "Kustomization"): "Flux CRD (documentation example)",
    ("helm.toolkit.fluxcd.io/v2", "HelmRelease"): "Flux CRD (documentation example, asserted field by field)",
    ("argoproj.io/v1alpha1", "Application"): "Argo CD CRD (documentation example, asserted field by field)",
}
OWN_KIND = ("usage.multica.ai/v1alpha1", "UsageBackfill")

failures = []


def section(title):
    print(f"\n== {title}")


def check(ok, what, detail=""):
    if ok:
        print(f"ok   {what}")
    else:
        failures.append(what)
        print(f"FAIL {what}" + (f": {detail}" if detail else ""))
    return ok


def ident(doc):
    ns = doc["metadata"].get("namespace")
    return f"{doc['kind']}/{ns + '/' if ns else ''}{doc['metadata']['name']}"


# --- the CRD's own schema, for UsageBackfills --------------------------------
def strict_openapi(node, top=True):
    """OpenAPI v3 (nullable) to JSON Schema, with unknown fields refused
    below the root: the apiserver would silently prune them."""
    if isinstance(node, list):
        return [strict_openapi(n, False) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: strict_openapi(v, False) for k, v in node.items()
           if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("nullable") and "type" in node:
        out["type"] = [node["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not top:
        out["additionalProperties"] = False
    return out


crd = yaml.safe_load(open(CRD))
own_schema = strict_openapi(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
own_validator = jsonschema.Draft7Validator(own_schema)


def validate(docs, label):
    """Every object against the Kubernetes schemas (strict: unknown fields fail)."""
    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = f"{label}: {ident(doc)}"
        if key in SKIP_KINDS:
            print(f"skip {name} ({SKIP_KINDS[key]})")
            continue
        if key == OWN_KIND:
            errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in own_validator.iter_errors(doc)]
            check(not errors, f"{name} valid against the UsageBackfill CRD schema", "; ".join(errors))
            continue
        for version in KUBE_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                check(False, f"{name} valid for Kubernetes {version}",
                      f"{'.'.join(map(str, e.path))}: {e.message}")
                break
            except kv.SchemaNotFoundError as e:
                check(False, f"{name} has a schema", e.message + " (add it to SKIP_KINDS deliberately)")
                break
        else:
            check(True, f"{name} valid for Kubernetes {', '.join(KUBE_VERSIONS)} (strict)")


def load_docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def render(chart_dir, values=None, **opts):
    with helm.Chart.load(chart_dir) as chart:
        out = chart.render(values, **opts)
        crds = [load_docs(c["data"]) for c in chart.crds]
    docs = []
    for path in sorted(out):
        if path.endswith("NOTES.txt"):
            continue
        docs += load_docs(out[path])
    return [d for group in crds for d in group] + docs, out


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def one(docs, kind):
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def lint(values, label):
    for version in KUBE_VERSIONS:
        report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{version}.0")
        bad = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        for m in report["messages"]:
            if m["severity"] < 2:
                print(f"     lint info ({version}): {m['path']}: {m['error']}")
        check(not bad, f"helm lint --strict ({label}, Kubernetes {version})", json.dumps(bad))


def rules_of(role):
    got = {}
    for r in role.get("rules", []):
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                got.setdefault((g, res), set()).update(r.get("verbs", []))
    return got


# The controller's needs, exactly: nothing missing, nothing more. The same
# file is what the tests' fake API server enforces (403 for anything else),
# so the rendered chart must grant exactly these rules.
RBAC_RULES = yaml.safe_load(open("crates/testkit/src/rbac-rules.yaml"))
WATCH_RULES = rules_of({"rules": RBAC_RULES["watchRules"]})
# With secrets.watch: true, watchRules plus secretWatchRules.
SECRET_WATCH_RULES = rules_of({"rules": RBAC_RULES["watchRules"] + RBAC_RULES["secretWatchRules"]})
# The Lease Role names the Lease: the rules file says the default
# --lease-name, the chart each release's full name.
DEFAULT_LEASE_NAME = "usage-backfill-operator"


def lease_rules_of(role, lease_name=DEFAULT_LEASE_NAME):
    """(apiGroup, resource, resourceNames, verb) of each grant, the default
    Lease name replaced by lease_name."""
    got = set()
    for r in role.get("rules", []):
        names = tuple(sorted(lease_name if n == DEFAULT_LEASE_NAME else n for n in r.get("resourceNames", [])))
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                got.update((g, res, names, v) for v in r.get("verbs", []))
    return got


LEASE_RULES_FILE = {"rules": RBAC_RULES["leaseRules"]}
AGGREGATE_LABELS = ("rbac.authorization.k8s.io/aggregate-to-edit", "rbac.authorization.k8s.io/aggregate-to-view")


def aggregated(role):
    return any(role["metadata"].get("labels", {}).get(k) == "true" for k in AGGREGATE_LABELS)


def operator_cluster_roles(docs):
    """The operator's own ClusterRoles: the aggregated ones are for people."""
    return [r for r in by_kind(docs, "ClusterRole") if not aggregated(r)]


def lease_name_arg(dep):
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    names = [a.split("=", 1)[1] for a in args if a.startswith("--lease-name=")]
    return names[0] if len(names) == 1 else None


def check_lease_role(docs, label):
    """The Lease Role grants create (unnamed) and get/patch on the Lease the
    Deployment passes as --lease-name: the release's full name."""
    dep = one(docs, "Deployment")
    name = lease_name_arg(dep)
    check(name == dep["metadata"]["name"], f"{label}: --lease-name is the release's full name", str(name))
    roles = [r for r in by_kind(docs, "Role") if any(
        res == "leases" for rule in r.get("rules", []) for res in rule.get("resources", []))]
    got = lease_rules_of(roles[0]) if len(roles) == 1 else set()
    want = lease_rules_of(LEASE_RULES_FILE, name)
    check(len(roles) == 1 and roles[0]["metadata"]["namespace"] == NAMESPACE and got == want,
          f"{label}: one Lease Role, in the release namespace, exactly the rules file's rules for Lease {name}",
          json.dumps(sorted(got)))
    return roles[0] if roles else None


def check_hardening(dep, label):
    pod = dep["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser") == 65532
          and psc.get("fsGroup") == 65532
          and psc.get("seccompProfile", {}).get("type") == "RuntimeDefault",
          f"{label}: pod runAsNonRoot, runAsUser/fsGroup 65532, seccomp RuntimeDefault", json.dumps(psc))
    c = pod["containers"][0]
    sc = c.get("securityContext", {})
    check(sc.get("allowPrivilegeEscalation") is False and sc.get("readOnlyRootFilesystem") is True
          and sc.get("capabilities", {}).get("drop") == ["ALL"] and not sc.get("capabilities", {}).get("add")
          and sc.get("privileged") in (None, False),
          f"{label}: container no privilege escalation, read-only root, drops ALL", json.dumps(sc))
    res = c.get("resources", {})
    check(bool(res.get("requests", {}).get("cpu")) and bool(res.get("requests", {}).get("memory"))
          and bool(res.get("limits", {}).get("memory")),
          f"{label}: resource requests and memory limit set", json.dumps(res))
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    check(ports == {"http": 8080}, f"{label}: container port 8080 named http", json.dumps(ports))
    probes = (c.get("livenessProbe", {}).get("httpGet", {}), c.get("readinessProbe", {}).get("httpGet", {}))
    check(probes == ({"path": "/healthz", "port": "http"}, {"path": "/readyz", "port": "http"}),
          f"{label}: liveness /healthz and readiness /readyz on port http", json.dumps(probes))
    env = {e["name"]: e for e in c.get("env", [])}
    check(env.get("POD_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.name",
          f"{label}: POD_NAME from the downward API (Event reporter, Lease holder)")
    sel = dep["spec"]["selector"]["matchLabels"]
    labels = dep["spec"]["template"]["metadata"]["labels"]
    check(all(labels.get(k) == v for k, v in sel.items()), f"{label}: selector matches the pod labels")
    return c


def check_service(docs, dep, label):
    svc = one(docs, "Service")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    check(all(pod_labels.get(k) == v for k, v in svc["spec"]["selector"].items()),
          f"{label}: Service selects the controller pods")
    check([(p["name"], p["port"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("http", 8080, "http")],
          f"{label}: Service port 8080 named http")
    return svc


failures_before = 0

section("CRD copy")
check(open(CRD, "rb").read() == open(f"{CHART}/crds/usagebackfills.usage.multica.ai.yaml", "rb").read(),
      f"{CHART}/crds/ equals {CRD}", "sync with: cp crds/*.yaml charts/usage-backfill-operator/crds/")

section(f"tools: helm-python-sdk {helm.__version__} (Helm SDK {helm.helm_sdk_version()}), "
        f"kubernetes-validate {kv_version.__version__}, Kubernetes schemas {', '.join(KUBE_VERSIONS)}")

# --- default values -------------------------------------------------------
section("chart, default values")
lint(None, "default values")
default_docs, default_out = render(CHART, name=RELEASE, namespace=NAMESPACE)
print("rendered: " + ", ".join(ident(d) for d in default_docs))
validate(default_docs, "default")
dep = one(default_docs, "Deployment")
c = check_hardening(dep, "default")
FULLNAME = f"{RELEASE}-usage-backfill-operator"
check(c["args"] == ["controller", "--health-addr=0.0.0.0:8080", "--log-format=json", "--concurrency=4",
                    f"--lease-name={FULLNAME}"],
      f"default: args controller --health-addr=0.0.0.0:8080 --log-format=json --concurrency=4 --lease-name={FULLNAME}",
      json.dumps(c["args"]))
check(dep["spec"]["replicas"] == 1, "default: replicaCount 1")
check(c["image"] == "ghcr.io/multica-ai/usage-backfill:0.1.0", "default: image tag is the appVersion", c["image"])
check_service(default_docs, dep, "default")
check(not by_kind(default_docs, "ServiceMonitor"), "default: no ServiceMonitor")
check(not by_kind(default_docs, "PrometheusRule") and not by_kind(default_docs, "ConfigMap"),
      "default: no PrometheusRule, no dashboard ConfigMap")
cr = operator_cluster_roles(default_docs)
check(len(cr) == 1 and rules_of(cr[0]) == WATCH_RULES, "default: one operator ClusterRole with exactly the controller's rules",
      json.dumps({f"{g}/{r}": sorted(v) for (g, r), v in (rules_of(cr[0]) if cr else {}).items()}))
crb = by_kind(default_docs, "ClusterRoleBinding")
sa = one(default_docs, "ServiceAccount")
check(len(crb) == 1 and crb[0]["roleRef"]["name"] == cr[0]["metadata"]["name"]
      and crb[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}],
      "default: ClusterRoleBinding binds it to the ServiceAccount")
check(len(by_kind(default_docs, "Role")) == 1, "default: the only Role is the Lease one")
lease_role = check_lease_role(default_docs, "default")
lease_rb = [b for b in by_kind(default_docs, "RoleBinding") if lease_role and b["roleRef"]["name"] == lease_role["metadata"]["name"]]
check(len(lease_rb) == 1 and lease_rb[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}],
      "default: the Lease Role is bound to the ServiceAccount")
check(dep["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"],
      "default: the Deployment runs as the chart's ServiceAccount")
check(len(by_kind(default_docs, "CustomResourceDefinition")) == 1, "default: the CRD is installed from crds/")

# --- non-default values ----------------------------------------------------
section("chart, ci/namespaced-values.yaml (2 namespaces, ServiceMonitor, 2 replicas, extraArgs)")
ns_values = helm.values_from_yaml(open(f"{CHART}/ci/namespaced-values.yaml").read())
lint(ns_values, "namespaced")
ns_docs, ns_out = render(CHART, ns_values, name=RELEASE, namespace=NAMESPACE)
print("rendered: " + ", ".join(ident(d) for d in ns_docs))
validate(ns_docs, "namespaced")
dep = one(ns_docs, "Deployment")
c = check_hardening(dep, "namespaced")
check(c["args"] == ["controller", "--health-addr=0.0.0.0:8080", "--log-format=text", "--concurrency=2",
                    f"--lease-name={FULLNAME}", "--namespace=team-a", "--namespace=team-b",
                    "--retry-backoff=30s", "--set=work_mem=64MB"],
      "namespaced: one --namespace per watched namespace, then extraArgs", json.dumps(c["args"]))
check(dep["spec"]["replicas"] == 2, "namespaced: replicaCount 2")
check(c["image"].endswith("@sha256:" + "0123456789abcdef" * 4) and c["imagePullPolicy"] == "Always",
      "namespaced: image by digest, pullPolicy Always", c["image"])
check(not operator_cluster_roles(ns_docs) and not by_kind(ns_docs, "ClusterRoleBinding"),
      "namespaced: no ClusterRoleBinding, no ClusterRole but the aggregated ones for people (bound to nobody)")
sa = one(ns_docs, "ServiceAccount")
for ns in ("team-a", "team-b"):
    role = [r for r in by_kind(ns_docs, "Role") if r["metadata"]["namespace"] == ns]
    rb = [r for r in by_kind(ns_docs, "RoleBinding") if r["metadata"]["namespace"] == ns]
    check(len(role) == 1 and rules_of(role[0]) == WATCH_RULES, f"namespaced: Role in {ns} with exactly the controller's rules")
    check(len(rb) == 1 and rb[0]["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                                 "name": role[0]["metadata"]["name"] if role else None}
          and rb[0]["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}],
          f"namespaced: RoleBinding in {ns} to the ServiceAccount in {NAMESPACE}")
check_lease_role(ns_docs, "namespaced")
svc = check_service(ns_docs, dep, "namespaced")
sm = by_kind(ns_docs, "ServiceMonitor")
check(len(sm) == 1, "namespaced: ServiceMonitor rendered")
if sm:
    s = sm[0]["spec"]
    check(all(svc["metadata"]["labels"].get(k) == v for k, v in s["selector"]["matchLabels"].items())
          and s["namespaceSelector"] == {"matchNames": [NAMESPACE]}
          and [(e["port"], e["path"], e["interval"]) for e in s["endpoints"]] == [("http", "/metrics", "15s")]
          and sm[0]["metadata"]["labels"].get("release") == "prometheus",
          "namespaced: ServiceMonitor selects the Service, port http, /metrics, interval, extra labels", json.dumps(s))
check(replicas_note := "replicaCount is 2" in ns_out[f"{CHART.split('/')[-1]}/templates/NOTES.txt"],
      "namespaced: NOTES warn that more replicas need leader election")

# --- Secret access ------------------------------------------------------------
section("chart, secrets.watch: get only on Secrets by default; list/watch and --watch-secrets when true")
check(WATCH_RULES.get(("", "secrets")) == {"get"}, "rbac-rules.yaml: watchRules grant get, and only get, on Secrets")
check(SECRET_WATCH_RULES.get(("", "secrets")) == {"get", "list", "watch"}
      and {k: v for k, v in SECRET_WATCH_RULES.items() if k != ("", "secrets")}
      == {k: v for k, v in WATCH_RULES.items() if k != ("", "secrets")},
      "rbac-rules.yaml: secretWatchRules add list and watch on Secrets, nothing else")
for label, base in (("cluster-wide", {}), ("namespaced", ns_values)):
    for watch in (False, True):
        values = {**base, "secrets": {"watch": watch}}
        mode = f"{label}, secrets.watch={str(watch).lower()}"
        lint(values, mode)
        docs, _ = render(CHART, values, name=RELEASE, namespace=NAMESPACE)
        validate(docs, mode)
        want = SECRET_WATCH_RULES if watch else WATCH_RULES
        roles = operator_cluster_roles(docs) + [r for r in by_kind(docs, "Role")
                                                 if r["metadata"]["namespace"] != NAMESPACE]
        check(len(roles) == (1 if label == "cluster-wide" else 2)
              and all(rules_of(r) == want for r in roles),
              f"{mode}: every watch-scope role grants exactly the rules file's rules for this mode",
              json.dumps([{f"{g}/{res}": sorted(v) for (g, res), v in rules_of(r).items()} for r in roles]))
        args = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]
        check(("--watch-secrets" in args) == watch, f"{mode}: --watch-secrets passed iff secrets.watch",
              json.dumps(args))

# --- aggregated ClusterRoles for people ----------------------------------------
section("chart, rbac.aggregateClusterRoles: UsageBackfills in the built-in edit/admin and view roles")
want_edit = {("usage.multica.ai", "usagebackfills"): {"get", "list", "watch", "create", "update", "patch", "delete"},
             ("usage.multica.ai", "usagebackfills/status"): {"get", "list", "watch"}}
want_view = {("usage.multica.ai", "usagebackfills"): {"get", "list", "watch"},
             ("usage.multica.ai", "usagebackfills/status"): {"get", "list", "watch"}}
for label, docs in (("default", default_docs), ("namespaced", ns_docs)):
    agg = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole") if aggregated(r)}
    edit, view = agg.get(f"{FULLNAME}-edit"), agg.get(f"{FULLNAME}-view")
    check(len(agg) == 2 and edit is not None and view is not None, f"{label}: two aggregated ClusterRoles", ", ".join(agg))
    if edit and view:
        el, vl = edit["metadata"]["labels"], view["metadata"]["labels"]
        check(el.get("rbac.authorization.k8s.io/aggregate-to-edit") == "true"
              and el.get("rbac.authorization.k8s.io/aggregate-to-admin") == "true"
              and "rbac.authorization.k8s.io/aggregate-to-view" not in el
              and rules_of(edit) == want_edit,
              f"{label}: {FULLNAME}-edit aggregates to edit and admin: UsageBackfills read and written, status read",
              json.dumps({f"{g}/{r}": sorted(v) for (g, r), v in rules_of(edit).items()}))
        check(vl.get("rbac.authorization.k8s.io/aggregate-to-view") == "true"
              and "rbac.authorization.k8s.io/aggregate-to-edit" not in vl
              and rules_of(view) == want_view,
              f"{label}: {FULLNAME}-view aggregates to view: UsageBackfills and their status read only",
              json.dumps({f"{g}/{r}": sorted(v) for (g, r), v in rules_of(view).items()}))
    bound = {b["roleRef"]["name"] for b in by_kind(docs, "ClusterRoleBinding") + by_kind(docs, "RoleBinding")}
    check(not bound & set(agg), f"{label}: the aggregated roles are bound to nobody by the chart")
for values, label in (({"rbac": {"aggregateClusterRoles": False}}, "rbac.aggregateClusterRoles=false"),
                      ({"rbac": {"create": False}}, "rbac.create=false")):
    lint(values, label)
    docs, _ = render(CHART, values, name=RELEASE, namespace=NAMESPACE)
    validate(docs, label)
    check(not [r for r in by_kind(docs, "ClusterRole") if aggregated(r)], f"{label}: no aggregated ClusterRole")

# --- two releases in one namespace ------------------------------------------------
section("chart, two releases in one namespace: a Lease each, nothing shared")
pair = {}
for release in ("shop", "billing"):
    docs, _ = render(CHART, {"watchNamespaces": [release]}, name=release, namespace=NAMESPACE)
    validate(docs, f"release {release}")
    check_lease_role(docs, f"release {release}")
    pair[release] = docs
leases = {r: lease_name_arg(one(d, "Deployment")) for r, d in pair.items()}
check(leases == {"shop": "shop-usage-backfill-operator", "billing": "billing-usage-backfill-operator"},
      "two releases: two distinct --lease-name values", json.dumps(leases))
names = [ident(d) for docs in pair.values() for d in docs if d["kind"] != "CustomResourceDefinition"]
check(len(names) == len(set(names)), "two releases: no object of one has the name of the other's",
      ", ".join(n for n in names if names.count(n) > 1))

# --- alerts and dashboard -----------------------------------------------------
section("chart, alerts and dashboard on: PrometheusRule through promtool, Grafana dashboard")
mon_values = {"metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True},
                          "grafanaDashboard": {"enabled": True}}}
lint(mon_values, "monitoring")
mon_docs, _ = render(CHART, mon_values, name=RELEASE, namespace=NAMESPACE)
validate(mon_docs, "monitoring")
job = f'job="{one(mon_docs, "Service")["metadata"]["name"]}"'
sm = one(mon_docs, "ServiceMonitor")
check(sm["spec"]["endpoints"][0].get("honorLabels") is True,
      "monitoring: the ServiceMonitor keeps the per-object namespace/name labels (honorLabels)")
rule = one(mon_docs, "PrometheusRule")
rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
alerts = sorted(r["alert"] for r in rules)
print("alerts: " + ", ".join(alerts))
check(all(job in r["expr"] for r in rules), f"monitoring: every rule selects the controller's series ({job})")
check(all(r.get("labels", {}).get("severity") and r.get("annotations", {}).get("summary")
          and r.get("annotations", {}).get("description") for r in rules),
      "monitoring: every alert has a severity, a summary and a description")
PROMTOOL = shutil.which("promtool")
check(PROMTOOL is not None, "promtool is installed (Debian package prometheus; .ci/run installs it)")
tests = yaml.safe_load(open(".ci/alerts.test.yaml"))
fires, quiet = set(), set()
for test in tests["tests"]:
    for case in test.get("alert_rule_test", []):
        (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
check(fires == set(alerts) and quiet == set(alerts),
      "every alert has a unit test where it fires and one where it does not",
      f"alerts {alerts}, firing tests {sorted(fires)}, quiet tests {sorted(quiet)}")
if PROMTOOL:
    work = "target/ci-alerts"
    os.makedirs(work, exist_ok=True)
    with open(f"{work}/rules.yaml", "w") as f:
        yaml.safe_dump({"groups": rule["spec"]["groups"]}, f, sort_keys=False)
    shutil.copy(".ci/alerts.test.yaml", f"{work}/alerts.test.yaml")
    for args in (["check", "rules", "rules.yaml"], ["test", "rules", "alerts.test.yaml"]):
        run = subprocess.run([PROMTOOL, *args], cwd=work, capture_output=True, text=True)
        output = (run.stdout + run.stderr).strip()
        check(run.returncode == 0, f"promtool {' '.join(args)}: {output.splitlines()[-1] if output else ''}", output)
dash_cm = one(mon_docs, "ConfigMap")
check(dash_cm["metadata"]["labels"].get("grafana_dashboard") == "1",
      "monitoring: the dashboard ConfigMap carries the Grafana sidecar's label")
dashboard = json.loads(dash_cm["data"]["usage-backfill.json"])
panels = [p["title"] for p in dashboard["panels"]]
print("dashboard panels: " + "; ".join(panels))
check({"Runs by outcome", "Rows per second", "Slices per second", "Lock wait (advisory lock 4246)",
       "Watermark lag per UsageBackfill"} <= set(panels),
      "monitoring: the dashboard shows runs by outcome, rows and slices per second, lock wait, lag per resource")
check(all(t.get("expr") for p in dashboard["panels"] for t in p["targets"]),
      "monitoring: every dashboard panel has a query")
# That every metric these name is exported: tests/metrics.rs, on a live scrape.

# --- values.schema.json ------------------------------------------------------
section("values.schema.json rejects bad values (lint and render must both fail)")
invalid = sorted(glob.glob(f"{CHART}/ci/invalid/*.yaml"))
check(len(invalid) >= 5, f"{len(invalid)} invalid values files")
for path in invalid:
    values = helm.values_from_yaml(open(path).read())
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    lint_failed = bool(report["errors"]) or any(m["severity"] >= 3 for m in report["messages"])
    try:
        with helm.Chart.load(CHART) as chart:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        render_error = None
    except helm.HelmValuesError as e:
        render_error = str(e).strip().splitlines()[-1]
    check(lint_failed and render_error is not None,
          f"{os.path.basename(path)} rejected: {render_error}",
          f"lint failed: {lint_failed}, render error: {render_error}")

# --- docs/packaging.md examples ---------------------------------------------
# The recipes are rendered in .ci/app-chart, a stand-in for the application's
# chart with the properties they depend on: a values schema that refuses
# unknown top-level keys, the built-in database as a regular Deployment and
# Service <release>-postgres, a backend that migrates when it starts, and
# postgres.external.enabled switching to DATABASE_URL from the Secret. The
# docs' files are added to it as a user would: templates as files, the
# values block appended to values.yaml, the schema entry merged into the
# top-level properties, the database's sync-wave annotations put on the
# database's objects.
section("docs/packaging.md examples, rendered in the stand-in application chart (.ci/app-chart)")
APP_STANDIN = ".ci/app-chart"
text = open("docs/packaging.md").read()


def blocks(marker, lang):
    return dict(re.findall(rf"<!-- {marker}: (\S+(?: \S+)?) -->\n```{lang}\n(.*?)```", text, re.S))


examples = blocks("example-file", "yaml")
appended = blocks("example-append", "yaml")
schema_edit = blocks("example-schema", "json")
db_annotations = blocks("example-annotations", "yaml")
check({"app-chart/templates/_usage-backfill.tpl", "app-chart/templates/usage-backfill-hook.yaml",
       "app-chart/templates/usage-backfill-job.yaml", "app-chart/templates/usage-backfill-argocd.yaml",
       "argocd/application.yaml", "argocd/usage-backfill.yaml", "flux/operator.yaml",
       "flux/helmrelease.yaml", "flux/kustomizations.yaml", "flux/usage-backfill.yaml"} <= set(examples)
      and set(appended) == {"app-chart/values.yaml"} and set(schema_edit) == {"app-chart/values.schema.json"}
      and set(db_annotations) == {"app-chart database"},
      "examples found: " + ", ".join(sorted([*examples, *appended, *schema_edit, *db_annotations])))
DB_ANNOTATIONS = yaml.safe_load(db_annotations.get("app-chart database", "{}"))
APP_VERSION = yaml.safe_load(open(f"{APP_STANDIN}/Chart.yaml"))["appVersion"]
# helm upgrade --timeout of the docs' command, and the Flux HelmRelease's.
helm_timeouts = re.findall(r"^helm upgrade --install shop .* --timeout (\d+)m$", text, re.M)
check(len(helm_timeouts) == 1, "the docs give the helm upgrade command of the recipe with its --timeout",
      json.dumps(helm_timeouts))
HELM_TIMEOUT = int(helm_timeouts[0]) * 60 if helm_timeouts else 0


def app_chart(tmp, with_recipe=True):
    """The stand-in chart, with the docs' recipe added (or without it)."""
    app = os.path.join(tmp, "with-recipe" if with_recipe else "without-recipe", "app-chart")
    shutil.copytree(APP_STANDIN, app)
    if not with_recipe:
        return app
    for path, body in examples.items():
        if path.startswith("app-chart/"):
            with open(os.path.join(os.path.dirname(app), path), "w") as f:
                f.write(body)
    with open(os.path.join(app, "values.yaml"), "a") as f:
        f.write(appended.get("app-chart/values.yaml", ""))
    schema = json.load(open(os.path.join(app, "values.schema.json")))
    edit = json.loads(schema_edit.get("app-chart/values.schema.json", "{}"))
    check(not set(edit) & set(schema["properties"]), "the schema edit adds keys, it overrides none", json.dumps(sorted(edit)))
    schema["properties"].update(edit)
    with open(os.path.join(app, "values.schema.json"), "w") as f:
        json.dump(schema, f, indent=2)
    return app


def annotations(doc):
    return doc["metadata"].get("annotations") or {}


def hook_events(doc):
    return set(filter(None, annotations(doc).get("helm.sh/hook", "").split(",")))


def is_database(doc):
    return doc["metadata"]["name"].endswith("-postgres") and doc["kind"] in ("Deployment", "Service")


def render_app(app, values, event, revision):
    docs, _ = render(app, values, name="shop", namespace="shop", revision=revision,
                     is_install=event == "install", is_upgrade=event == "upgrade")
    return docs


def check_app_model(docs, label, external):
    """The stand-in itself has the properties the recipes rely on."""
    db = [d for d in docs if is_database(d)]
    backend = [d for d in by_kind(docs, "Deployment") if d["metadata"]["name"] == "shop-backend"]
    check(len(backend) == 1 and "migrate up" in " ".join(backend[0]["spec"]["template"]["spec"]["containers"][0]["command"]),
          f"{label}: the stand-in's backend runs 'migrate up' when it starts")
    if external:
        env = backend[0]["spec"]["template"]["spec"]["containers"][0]["env"] if backend else []
        check(not db and env == [{"name": "DATABASE_URL", "valueFrom": {"secretKeyRef": {
            "name": "multica-secrets", "key": "DATABASE_URL"}}}],
              f"{label}: external database: no database in the release, DATABASE_URL from multica-secrets")
    else:
        check(sorted(ident(d) for d in db) == ["Deployment/shop-postgres", "Service/shop-postgres"]
              and not any(hook_events(d) for d in db),
              f"{label}: the built-in database is a regular Deployment and Service shop-postgres (no hook)")


expected_db = lambda external: ({"secretRef": {"name": "multica-secrets", "key": "DATABASE_URL"}} if external else
                                {"host": "shop-postgres", "port": 5432, "database": "multica", "user": "multica",
                                 "passwordFrom": {"secretKeyRef": {"name": "multica-secrets", "key": "POSTGRES_PASSWORD"}},
                                 "tls": {"mode": "disable"}})

with tempfile.TemporaryDirectory() as tmp:
    app = app_chart(tmp)
    bare = app_chart(tmp, with_recipe=False)
    doc_values = yaml.safe_load(appended.get("app-chart/values.yaml", "{}")) or {}
    recipe = doc_values.get("usageBackfill", {})
    timeout_s = recipe.get("timeoutSeconds", 0)

    # --- the strict values schema ---------------------------------------------
    schema = json.load(open(f"{APP_STANDIN}/values.schema.json"))
    check(schema.get("additionalProperties") is False and "usageBackfill" not in schema["properties"],
          "stand-in: values.schema.json refuses unknown top-level keys (additionalProperties: false)")
    try:
        with helm.Chart.load(bare) as chart:
            chart.render(doc_values, name="shop", namespace="shop")
        refused = None
    except helm.HelmValuesError as e:
        refused = str(e).strip().splitlines()[-1]
    check(refused is not None, f"stand-in without the schema edit refuses the usageBackfill values: {refused}")
    argo_app = load_docs(examples.get("argocd/application.yaml", ""))
    flux_hr = [d for d in load_docs(examples.get("flux/helmrelease.yaml", "")) if d["kind"] == "HelmRelease"]
    documented = {"values.yaml block": None,
                  "argocd/application.yaml valuesObject": argo_app[0]["spec"]["source"]["helm"]["valuesObject"] if argo_app else {},
                  "flux/helmrelease.yaml values": flux_hr[0]["spec"]["values"] if flux_hr else {}}
    for what, values in documented.items():
        report = helm.lint(app, values, strict=True, namespace="shop")
        bad = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        check(not bad, f"schema edit: helm lint --strict of the stand-in with the {what}", json.dumps(bad))
    for bad_values, what in (({"usageBackfill": {"timeoutSecond": 1800}}, "a misspelled key under usageBackfill"),
                             ({"usageBackfill": {"via": "argo"}}, "an unknown via"),
                             ({"usageBackfill": {"timeoutSeconds": "30m"}}, "timeoutSeconds as a duration string")):
        try:
            with helm.Chart.load(app) as chart:
                chart.render(bad_values, name="shop", namespace="shop")
            err = None
        except helm.HelmValuesError as e:
            err = str(e).strip().splitlines()[-1]
        check(err is not None, f"schema edit: {what} is refused: {err}")

    # --- Helm: patterns A and B, install and upgrade ---------------------------
    check(HELM_TIMEOUT > timeout_s + 120 > timeout_s >= 60,
          f"timeouts: wait {timeout_s}s < the Job's deadline {timeout_s + 120}s < helm --timeout {HELM_TIMEOUT}s")
    rendered_doc = re.search(r"<!-- example-rendered: app-chart via=operator -->\n```yaml\n(.*?)```", text, re.S)
    check(rendered_doc is not None, "the rendered UsageBackfill of an upgrade is shown")
    for via, external, event in [(v, x, e) for v in ("operator", "job") for x in (False, True)
                                 for e in ("install", "upgrade")]:
        values = {"usageBackfill": {"via": via}, "postgres": {"external": {"enabled": external}}}
        label = f"helm {event} via={via} {'external' if external else 'built-in'} database"
        revision = 1 if event == "install" else 3
        docs = render_app(app, values, event, revision)
        print(f"{label}: " + ", ".join(ident(d) for d in docs))
        validate(docs, f"app-chart {label}")
        check_app_model(docs, label, external)
        recipe_docs = [d for d in docs if d["metadata"]["name"].startswith("shop-usage-backfill")]
        check(recipe_docs and all(hook_events(d) for d in recipe_docs)
              and not any("argocd.argoproj.io/sync-wave" in annotations(d) for d in recipe_docs),
              f"{label}: every object of the recipe is a Helm hook, none has a sync wave")
        hook_name = f"pre-{event}"
        runs_now = sorted(ident(d) for d in docs if hook_name in hook_events(d))
        if event == "install" and not external:
            check(runs_now == [], f"{label}: no {hook_name} hook at all: nothing reaches for the database "
                                  "before the release creates it", json.dumps(runs_now))
        else:
            check(runs_now == sorted(ident(d) for d in recipe_docs),
                  f"{label}: every object of the recipe runs as a {hook_name} hook", json.dumps(runs_now))
        events = {frozenset(hook_events(d)) for d in recipe_docs}
        want = {"pre-install", "pre-upgrade"} if external else {"pre-upgrade"}
        check(events == {frozenset(want)}, f"{label}: hook events {','.join(sorted(want))}",
              json.dumps([sorted(e) for e in events]))
        job = one(docs, "Job")
        deadline = job["spec"].get("activeDeadlineSeconds") or 0
        check(deadline == timeout_s + 120 and timeout_s < deadline < HELM_TIMEOUT,
              f"{label}: the Job's activeDeadlineSeconds {deadline}: timeoutSeconds + 120, "
              f"between the wait's {timeout_s}s and helm's --timeout {HELM_TIMEOUT}s")
        container = job["spec"]["template"]["spec"]["containers"][0]
        args = container["args"]
        if via == "operator":
            ubf = one(docs, "UsageBackfill")
            hooks = {d["kind"]: annotations(d) for d in recipe_docs}
            weights = {k: a.get("helm.sh/hook-weight") for k, a in hooks.items()}
            check(weights == {"ServiceAccount": "-10", "Role": "-10", "RoleBinding": "-10",
                              "UsageBackfill": "-5", "Job": "0"}, f"{label}: hook weights -10, -5, 0", json.dumps(weights))
            check(hooks["UsageBackfill"].get("helm.sh/hook-delete-policy") == "before-hook-creation",
                  f"{label}: UsageBackfill delete policy before-hook-creation")
            # `usage-backfill wait` GETs the object by name and nothing else
            # (src/cli/wait.rs; tests/controller/wait.rs counts its requests).
            wait_rules = [r for d in recipe_docs if d["kind"] == "Role" for r in d.get("rules", [])]
            check(wait_rules == [{"apiGroups": ["usage.multica.ai"], "resources": ["usagebackfills"], "verbs": ["get"]}],
                  f"{label}: the wait Job's Role grants get on UsageBackfills only", json.dumps(wait_rules))
            check(args == ["wait", ubf["metadata"]["name"], "--timeout", f"{timeout_s}s"],
                  f"{label}: the Job runs 'wait <the UsageBackfill> --timeout {timeout_s}s'", json.dumps(args))
            check(ubf["spec"]["runId"] == f"revision-{revision}", f"{label}: runId names the release revision")
            check(ubf["spec"]["database"] == expected_db(external),
                  f"{label}: spec.database reads the application's own Secret", json.dumps(ubf["spec"]["database"]))
            if event == "upgrade" and not external and rendered_doc:
                shown = yaml.safe_load(rendered_doc.group(1))
                bare_ubf = {k: v for k, v in ubf.items()}
                bare_ubf["metadata"] = {"name": ubf["metadata"]["name"]}
                check(shown == bare_ubf, "the UsageBackfill shown for an upgrade is what the hook renders",
                      json.dumps(bare_ubf))
        else:
            env = container["env"]
            if external:
                check(args[0] == "backfill" and env == [{"name": "DATABASE_URL", "valueFrom": {
                    "secretKeyRef": {"name": "multica-secrets", "key": "DATABASE_URL"}}}],
                      f"{label}: the Job runs 'backfill' with DATABASE_URL from the application's Secret")
            else:
                check(args[0] == "backfill" and {"--host=shop-postgres", "--dbname=multica", "--user=multica",
                                                 "--tls-mode=disable"} <= set(args)
                      and env == [{"name": "PGPASSWORD", "valueFrom": {
                          "secretKeyRef": {"name": "multica-secrets", "key": "POSTGRES_PASSWORD"}}}]
                      and not any("PASSWORD" in a.upper() for a in args),
                      f"{label}: the Job runs 'backfill' with the parts, the password in PGPASSWORD only",
                      json.dumps({"args": args, "env": env}))

    # --- Argo CD: sync waves ----------------------------------------------------
    check(DB_ANNOTATIONS == {"argocd.argoproj.io/sync-wave": "-2"},
          "argocd: the database's objects go into wave -2", json.dumps(DB_ANNOTATIONS))
    argo_values = argo_app[0]["spec"]["source"]["helm"]["valuesObject"] if argo_app else {}
    check(argo_values.get("usageBackfill", {}).get("via") == "argocd",
          "argocd: the Application sets usageBackfill.via: argocd")
    for external, tag in ((False, ""), (True, ""), (False, "2.15.1")):
        values = {**argo_values, "postgres": {"external": {"enabled": external}},
                  "backend": {"image": {"tag": tag}}}
        label = f"argocd {'external' if external else 'built-in'} database{', backend tag ' + tag if tag else ''}"
        # Argo CD renders like helm template: an install, revision 1, every sync.
        docs = render_app(app, values, "install", 1)
        for d in docs:
            if is_database(d):
                d["metadata"].setdefault("annotations", {}).update(DB_ANNOTATIONS)
        print(f"{label}: " + ", ".join(ident(d) for d in docs))
        validate(docs, f"app-chart {label}")
        check_app_model(docs, label, external)
        check(not any(hook_events(d) or "argocd.argoproj.io/hook" in annotations(d) for d in docs)
              and not by_kind(docs, "Job"),
              f"{label}: no hook of any kind (Argo CD would run it on every sync) and no Job")
        wave = {ident(d): int(annotations(d).get("argocd.argoproj.io/sync-wave", "0")) for d in docs}
        ubf = one(docs, "UsageBackfill")
        w_ubf = wave[ident(ubf)]
        w_db = [wave[ident(d)] for d in docs if is_database(d)]
        w_rest = [wave[ident(d)] for d in docs if not is_database(d) and d is not ubf]
        check(all(w < w_ubf for w in w_db) and all(w_ubf < w for w in w_rest) and w_rest,
              f"{label}: sync waves: database {w_db} < UsageBackfill {w_ubf} < everything else {sorted(set(w_rest))}",
              json.dumps(wave))
        check(ubf["spec"]["runId"] == (tag or APP_VERSION),
              f"{label}: runId is the backend's version ({tag or APP_VERSION}): one run per version",
              ubf["spec"]["runId"])
        check(ubf["spec"]["database"] == expected_db(external), f"{label}: spec.database reads the application's own Secret")

    # --- Flux -----------------------------------------------------------------
    flux_docs = {p: load_docs(examples.get(p, "")) for p in ("flux/operator.yaml", "flux/helmrelease.yaml",
                                                             "flux/kustomizations.yaml")}
    named = {(d["kind"], d["metadata"]["name"]): d for docs in flux_docs.values() for d in docs}
    op_ks = named.get(("Kustomization", "usage-backfill-operator"), {}).get("spec", {})
    op_hr = named.get(("HelmRelease", "usage-backfill-operator"), {})
    check(op_ks.get("wait") is True, "flux: the operator's Kustomization waits for its HelmRelease (wait: true)")
    check(op_hr.get("spec", {}).get("install", {}).get("crds") == "CreateReplace"
          and op_hr.get("spec", {}).get("upgrade", {}).get("crds") == "CreateReplace"
          and op_hr.get("spec", {}).get("chart", {}).get("spec", {}).get("chart") == "./" + CHART,
          "flux: the operator's HelmRelease installs and updates the CRD (install/upgrade.crds: CreateReplace)")
    app_hr = named.get(("HelmRelease", "shop"), {}).get("spec", {})
    hr_timeout = re.fullmatch(r"(\d+)m", str(app_hr.get("timeout", "")))
    check(app_hr.get("dependsOn") == [{"name": "usage-backfill-operator",
                                       "namespace": op_hr.get("metadata", {}).get("namespace")}],
          "flux: the application's HelmRelease dependsOn the operator's", json.dumps(app_hr.get("dependsOn")))
    check(hr_timeout is not None and int(hr_timeout.group(1)) * 60 > timeout_s + 120,
          f"flux: the application's HelmRelease timeout {app_hr.get('timeout')} > the wait Job's deadline {timeout_s + 120}s")
    if flux_hr:
        hr_values = app_hr.get("values", {})
        docs = render_app(app, hr_values, "install", 1)
        check(not any("pre-install" in hook_events(d) for d in docs)
              and by_kind(render_app(app, hr_values, "upgrade", 2), "UsageBackfill"),
              "flux: the HelmRelease's values: no pre-install hook (built-in database), a UsageBackfill hook on upgrade")
    ks_bf = named.get(("Kustomization", "app-usage-backfill"), {}).get("spec", {})
    ks_db = named.get(("Kustomization", "app-database"), {}).get("spec", {})
    ks_app = named.get(("Kustomization", "app"), {}).get("spec", {})
    check(ks_db.get("wait") is True, "flux: app-database waits for the database to be ready")
    check(sorted(d["name"] for d in ks_bf.get("dependsOn", [])) == ["app-database", "usage-backfill-operator"]
          and ks_bf.get("wait") is True and bool(ks_bf.get("timeout")) and ks_bf.get("healthCheckExprs"),
          "flux: app-usage-backfill dependsOn the operator and the database, waits (wait, timeout, healthCheckExprs)")
    check([d["name"] for d in ks_app.get("dependsOn", [])] == ["app-usage-backfill"],
          "flux: app dependsOn app-usage-backfill")
    ks_names = {name for kind, name in named if kind == "Kustomization"}
    hr_names = {(d["metadata"]["name"], d["metadata"].get("namespace")) for d in named.values() if d["kind"] == "HelmRelease"}
    check(all(dep["name"] in ks_names for kind, _ in named if kind == "Kustomization"
              for dep in named[(kind, _)]["spec"].get("dependsOn", []))
          and all((dep["name"], dep.get("namespace")) in hr_names for (kind, _), d in named.items() if kind == "HelmRelease"
                  for dep in d["spec"].get("dependsOn", [])),
          "flux: every dependsOn names a documented object of the same kind (Flux orders only within a kind)")

for path in sorted(p for p in examples if not p.startswith("app-chart/")):
    validate(load_docs(examples[path]), path)
argo = load_docs(examples.get("argocd/usage-backfill.yaml", ""))
check(len(argo) == 1 and "argocd.argoproj.io/hook" not in annotations(argo[0])
      and annotations(argo[0]).get("argocd.argoproj.io/sync-wave") == "-1" and argo[0]["spec"].get("runId"),
      "argocd (plain manifests): the UsageBackfill is no hook, in wave -1, with a runId")

# --- Argo CD health samples ---------------------------------------------------
section("health/argocd/test samples are UsageBackfills as the CRD defines them")
samples = sorted(p for p in glob.glob("health/argocd/test/*.json") if not p.endswith("health_test.json"))
validate([json.load(open(p)) for p in samples], "sample")

print()
if failures:
    print(f"chart-check: {len(failures)} check(s) failed:")
    for f in failures:
        print(f"  - {f}")
    sys.exit(1)
print("chart-check: all checks passed")
