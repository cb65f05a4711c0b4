//! Differential check of the test API server
//! (`usage_backfill_testkit::apiserver`) against a real kube-apiserver
//! (the test kit's throwaway control plane, on the oldest and the newest
//! Kubernetes release the project claims): the same HTTP requests, in the
//! same order, sent to both as the operator's ServiceAccount
//! (`system:serviceaccount:usage-system:usage-backfill`, which the test
//! API server always is, and which the real one is by impersonation, with
//! the chart's RBAC from `crates/testkit/src/rbac-rules.yaml` bound to it:
//! the watch rules by a ClusterRole, the Lease rules by a Role of the
//! namespace the Lease is in). Each answer is compared: the status code,
//! and the body as [`normalized`] keeps it.
//!
//! The sequences are those the operator and its tests make, request by
//! request: the progress records' ConfigMaps (get, server-side apply that
//! creates, a no-op apply, an apply by another manager that conflicts,
//! invalid keys, a name that is not the URL's, a duplicate create, delete),
//! the leader Lease as `kube-lease-manager` drives it (get, create,
//! duplicate create, apply, renewal and release by strategic merge, a
//! takeover by apply that conflicts, a merge patch with a stale
//! resourceVersion), events.k8s.io Events (create, duplicate, refusals),
//! UsageBackfills (status by server-side apply, finalizer patches, a stale
//! resourceVersion), list paging with `limit`/`continue`, a watch from a
//! list's resourceVersion, and the RBAC refusals of what the chart does not
//! grant; and, with `secrets.watch: true` granted (in the namespace only),
//! the Secret metadata of `--watch-secrets`: metadata-only pages, a get,
//! and a metadata watch that sees a rotation.
//!
//! Noise, deliberately not compared: `metadata.uid`, `resourceVersion`,
//! `creationTimestamp`, `managedFields` (the owners they record are
//! compared through the conflicts they cause), a list's `resourceVersion`
//! and the text of its `continue` token (whether there is one is
//! compared), a Status's `details.uid`, and watch BOOKMARKs (the real
//! server sends them when its watch cache decides to, about once a minute;
//! the test API server's are tested on their own in
//! `tests/controller/apiserver/`), and in a list across namespaces the
//! objects of other namespaces (the other tests of this binary share the
//! control plane).
//!
//! Where the servers differ, the test fails listing every difference:
//! fix the test API server, or list the difference in
//! [`NOT_MODELLED`] with the reason.

use std::collections::BTreeMap;

use http::Request;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use testkit::cluster::ControlPlane;
use usage_backfill_api::{self as api, UsageBackfill, UsageBackfillSpec};
use usage_backfill_testkit::{self as testkit, FakeApiServer, on_both_versions};

const RULES_YAML: &str = include_str!("../../crates/testkit/src/rbac-rules.yaml");
/// Who the test API server's clients are.
const SA_NAMESPACE: &str = "usage-system";
const SA_NAME: &str = "usage-backfill";
/// The Lease the Lease Role names (the default `--lease-name`).
const LEASE: &str = "usage-backfill-operator";
const ADMIN: &str = "usage-backfill-differential";

/// Differences known and kept: (step, why). A step listed here is still
/// sent to both servers; its answers are not compared.
const NOT_MODELLED: &[(&str, &str)] = &[(
    "lease: get another Lease (not granted)",
    "RBAC `resourceNames`: the chart's Lease Role grants get and patch on its release's \
     Lease only, so kube-apiserver answers 403 for another name; the test API server \
     checks verbs, not names (its clients are all one ServiceAccount, and its tests run \
     several installations with Leases of their own names), and answers 404",
)];

on_both_versions!(
    the_test_api_server_answers_as_kube_apiserver,
    secret_metadata_answers_as_kube_apiserver,
);

/// One server under comparison: a client as the operator's ServiceAccount
/// and the namespace the requests go to.
struct Server {
    client: Client,
    ns: String,
    /// Every answer so far: (step, code, normalized body).
    answers: Vec<(String, u16, Value)>,
}

impl Server {
    /// Sends one request; records and returns its code and raw body.
    async fn send(
        &mut self,
        step: &str,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.send_accepting(step, method, path, content_type, None, body)
            .await
    }

    /// [`send`](Self::send), asking for `accept` (e.g. metadata only).
    async fn send_accepting(
        &mut self,
        step: &str,
        method: &str,
        path: &str,
        content_type: Option<&str>,
        accept: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let path = path.replace("{ns}", &self.ns);
        let mut request = Request::builder().method(method).uri(&path);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let body = body
            .map(|b| serde_json::to_vec(&b).unwrap())
            .unwrap_or_default();
        // Bounded: a request one server answers and the other keeps open
        // (a watch it allows) fails the test instead of hanging it.
        let answer = async {
            let response = self
                .client
                .send(request.body(body.into()).unwrap())
                .await
                .unwrap_or_else(|e| panic!("{step}: {method} {path}: {e}"));
            let code = response.status().as_u16();
            (code, response.into_body().collect_bytes().await.unwrap())
        };
        let (code, bytes) = tokio::time::timeout(std::time::Duration::from_secs(60), answer)
            .await
            .unwrap_or_else(|_| panic!("{step}: {method} {path}: no whole answer within a minute"));
        let value: Value = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}));
        self.answers
            .push((step.to_owned(), code, normalized(&value, &self.ns)));
        (code, value)
    }

    /// Opens a watch and reads `events` events other than BOOKMARKs, each
    /// recorded as one answer.
    async fn watch(&mut self, step: &str, path: &str, accept: Option<&str>, events: usize) {
        use futures::{AsyncBufReadExt, TryStreamExt};
        let path = path.replace("{ns}", &self.ns);
        let mut request = Request::get(&path);
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let request = request.body(Vec::new()).unwrap();
        let mut lines = self
            .client
            .request_stream(request)
            .await
            .unwrap_or_else(|e| panic!("{step}: watch {path}: {e}"))
            .lines();
        let mut seen = 0;
        while seen < events {
            let line = tokio::time::timeout(std::time::Duration::from_secs(60), lines.try_next())
                .await
                .unwrap_or_else(|_| panic!("{step}: no watch event within a minute"))
                .unwrap_or_else(|e| panic!("{step}: reading the watch: {e}"))
                .unwrap_or_else(|| panic!("{step}: the watch ended after {seen} events"));
            let event: Value = serde_json::from_str(&line).unwrap();
            if event["type"] == "BOOKMARK" {
                continue;
            }
            seen += 1;
            self.answers.push((
                format!("{step}, event {seen}"),
                200,
                json!({"type": event["type"], "object": normalized(&event["object"], &self.ns)}),
            ));
        }
    }
}

/// What is compared of a body: everything but the noise of the module doc.
fn normalized(v: &Value, ns: &str) -> Value {
    let mut v = v.clone();
    // The namespaces differ by name only.
    let text = v.to_string().replace(ns, "{ns}");
    v = serde_json::from_str(&text).unwrap();
    if let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) {
        for noise in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "managedFields",
        ] {
            meta.remove(noise);
        }
        if meta.get("continue").is_some_and(|t| t != "") {
            meta.insert("continue".into(), json!("<token>"));
        }
        if meta.is_empty() {
            v.as_object_mut().unwrap().remove("metadata");
        }
    }
    if let Some(items) = v.get_mut("items").and_then(Value::as_array_mut) {
        // A list across namespaces on the shared control plane also holds
        // the objects other tests of this binary made, each in namespaces
        // of its own: only this scenario's namespace is compared.
        items.retain(|item| {
            item["metadata"]["namespace"]
                .as_str()
                .is_none_or(|n| n == "{ns}")
        });
        for item in items.iter_mut() {
            *item = normalized(item, ns);
        }
    }
    if let Some(details) = v.get_mut("details").and_then(Value::as_object_mut) {
        details.remove("uid");
        if let Some(causes) = details.get_mut("causes").and_then(Value::as_array_mut) {
            causes.sort_by_key(|c| c.to_string());
        }
    }
    v
}

/// The shared control plane of `version`, the CRD established, and the
/// chart's RBAC for the ServiceAccount: the watch rules cluster-wide, the
/// Lease rules in `ns`.
async fn real_server(version: &str, extra: &[&str]) -> (Client, String) {
    let plane = ControlPlane::shared(version);
    let admin = plane.client();
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let crd = api::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply(ADMIN).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("applying the CRD");
    for _ in 0..600 {
        let established = crds
            .get(&crd.name_any())
            .await
            .ok()
            .and_then(|c| c.status?.conditions)
            .is_some_and(|c| {
                c.iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
            });
        if established {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let ns = Api::<Namespace>::all(admin.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"generateName": "differential-"}}))
                .unwrap(),
        )
        .await
        .expect("creating a namespace")
        .name_any();
    let sets: BTreeMap<String, Vec<PolicyRule>> =
        serde_saphyr::from_str(RULES_YAML).expect("rbac-rules.yaml");
    let subject = json!([{"kind": "ServiceAccount", "name": SA_NAME, "namespace": SA_NAMESPACE}]);
    let role_name = format!("{ns}-operator");
    let cluster_role = ClusterRole {
        metadata: serde_json::from_value(json!({"name": role_name})).unwrap(),
        rules: Some(sets["watchRules"].clone()),
        ..Default::default()
    };
    Api::<ClusterRole>::all(admin.clone())
        .create(&PostParams::default(), &cluster_role)
        .await
        .expect("the operator's ClusterRole");
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": role_name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
        "subjects": subject,
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&PostParams::default(), &binding)
        .await
        .expect("its binding");
    // Rule sets of an opt-in mode in a Role of this namespace only: the
    // ServiceAccount is shared by the scenarios on this control plane, and
    // another's requests must still be refused. Bound before the Lease
    // Role, whose binding the wait below looks for.
    if !extra.is_empty() {
        let role = Role {
            metadata: serde_json::from_value(json!({"name": "extra"})).unwrap(),
            rules: Some(extra.iter().flat_map(|set| sets[*set].clone()).collect()),
        };
        Api::<Role>::namespaced(admin.clone(), &ns)
            .create(&PostParams::default(), &role)
            .await
            .expect("the opt-in Role");
        let binding: RoleBinding = serde_json::from_value(json!({
            "metadata": {"name": "extra"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "extra"},
            "subjects": subject,
        }))
        .unwrap();
        Api::<RoleBinding>::namespaced(admin.clone(), &ns)
            .create(&PostParams::default(), &binding)
            .await
            .expect("its binding");
    }
    let lease_role = Role {
        metadata: serde_json::from_value(json!({"name": "lease"})).unwrap(),
        rules: Some(sets["leaseRules"].clone()),
    };
    Api::<Role>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &lease_role)
        .await
        .expect("the Lease Role");
    let binding: RoleBinding = serde_json::from_value(json!({
        "metadata": {"name": "lease"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "lease"},
        "subjects": subject,
    }))
    .unwrap();
    Api::<RoleBinding>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &binding)
        .await
        .expect("its binding");
    // RBAC takes effect when the authorizer's informers have seen the
    // bindings: wait until the ServiceAccount may get the Lease.
    let sa = Client::try_from(plane.as_service_account(SA_NAMESPACE, SA_NAME)).unwrap();
    for _ in 0..600 {
        let request = Request::get(format!(
            "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{LEASE}"
        ))
        .body(Vec::new().into())
        .unwrap();
        let code = sa.send(request).await.unwrap().status().as_u16();
        if code == 404 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    (sa, ns)
}

/// UsageBackfills the sequences find, created as `kubectl` would (not
/// compared: the ServiceAccount may not create them).
async fn seed_usage_backfills(admin: &Client, fake: &FakeApiServer, ns: &str) {
    let api: Api<UsageBackfill> = Api::namespaced(admin.clone(), ns);
    for name in ["a", "b", "c"] {
        api.create(
            &PostParams::default(),
            &UsageBackfill::new(name, UsageBackfillSpec::new("app-db")),
        )
        .await
        .unwrap();
        fake.create(ns, name, UsageBackfillSpec::new("app-db"));
    }
}

const CM: &str = "/api/v1/namespaces/{ns}/configmaps";
const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases";
const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/{ns}/events";
const UBF: &str = "/apis/usage.multica.ai/v1alpha1/namespaces/{ns}/usagebackfills";
const APPLY: Option<&str> = Some("application/apply-patch+yaml");
const MERGE: Option<&str> = Some("application/merge-patch+json");
const STRATEGIC: Option<&str> = Some("application/strategic-merge-patch+json");
const JSON: Option<&str> = Some("application/json");

/// The requests, in order, on one server.
async fn replay(s: &mut Server) {
    // --- ConfigMaps: the progress records ------------------------------
    let record = "usage-backfill-progress-0123456789abcdef";
    let cm = |data: Value| {
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": record, "labels": {"app.kubernetes.io/managed-by": "usage-backfill-operator"}},
               "data": data})
    };
    s.send(
        "configmap: get, missing",
        "GET",
        &format!("{CM}/{record}"),
        None,
        None,
    )
    .await;
    s.send(
        "configmap: an apply creates it",
        "PATCH",
        &format!("{CM}/{record}?fieldManager=usage-backfill-operator&force=true"),
        APPLY,
        Some(cm(json!({"cursor": "2026-01-01T00:00:00Z", "slices": "3"}))),
    )
    .await;
    s.send(
        "configmap: the same apply changes nothing",
        "PATCH",
        &format!("{CM}/{record}?fieldManager=usage-backfill-operator&force=true"),
        APPLY,
        Some(cm(json!({"cursor": "2026-01-01T00:00:00Z", "slices": "3"}))),
    )
    .await;
    s.send(
        "configmap: an apply dropping a key removes it",
        "PATCH",
        &format!("{CM}/{record}?fieldManager=usage-backfill-operator&force=true"),
        APPLY,
        Some(cm(json!({"cursor": "2026-02-01T00:00:00Z"}))),
    )
    .await;
    s.send(
        "configmap: another manager's apply conflicts",
        "PATCH",
        &format!("{CM}/{record}?fieldManager=intruder"),
        APPLY,
        Some(cm(json!({"cursor": "1999-01-01T00:00:00Z"}))),
    )
    .await;
    s.send(
        "configmap: an invalid data key",
        "PATCH",
        &format!("{CM}/{record}?fieldManager=usage-backfill-operator&force=true"),
        APPLY,
        Some(cm(json!({"cursor": "x", "bad key": "y"}))),
    )
    .await;
    s.send(
        "configmap: an applied name that is not the URL's",
        "PATCH",
        &format!("{CM}/other-name?fieldManager=usage-backfill-operator&force=true"),
        APPLY,
        Some(cm(json!({"cursor": "x"}))),
    )
    .await;
    s.send(
        "configmap: a create of an existing one",
        "POST",
        CM,
        JSON,
        Some(cm(json!({"cursor": "x"}))),
    )
    .await;
    s.send(
        "configmap: get",
        "GET",
        &format!("{CM}/{record}"),
        None,
        None,
    )
    .await;
    s.send(
        "configmap: delete",
        "DELETE",
        &format!("{CM}/{record}"),
        None,
        None,
    )
    .await;
    s.send(
        "configmap: delete again",
        "DELETE",
        &format!("{CM}/{record}"),
        None,
        None,
    )
    .await;
    s.send(
        "configmap: a create without a name",
        "POST",
        CM,
        JSON,
        Some(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {}, "data": {"a": "b"}})),
    )
    .await;
    s.send("configmap: list (not granted)", "GET", CM, None, None)
        .await;

    // --- The leader Lease, as kube-lease-manager drives it ---------------
    let lease = format!("{LEASES}/{LEASE}");
    let lease_body = |spec: Value| json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "spec": spec});
    s.send("lease: get, missing", "GET", &lease, None, None)
        .await;
    s.send(
        "lease: create",
        "POST",
        LEASES,
        JSON,
        Some(
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": LEASE}, "spec": {}}),
        ),
    )
    .await;
    s.send(
        "lease: create again",
        "POST",
        LEASES,
        JSON,
        Some(
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": LEASE}, "spec": {}}),
        ),
    )
    .await;
    s.send(
        "lease: replica a acquires it by apply",
        "PATCH",
        &format!("{lease}?fieldManager=replica-a"),
        APPLY,
        Some(lease_body(json!({
            "acquireTime": "2026-01-01T00:00:00.000000Z",
            "renewTime": "2026-01-01T00:00:00.000000Z",
            "holderIdentity": "replica-a",
            "leaseDurationSeconds": 15,
        }))),
    )
    .await;
    s.send(
        "lease: a counts the transition",
        "PATCH",
        &format!("{lease}?fieldManager=replica-a"),
        STRATEGIC,
        Some(lease_body(json!({"leaseTransitions": 1}))),
    )
    .await;
    s.send(
        "lease: a renews it",
        "PATCH",
        &format!("{lease}?fieldManager=replica-a"),
        STRATEGIC,
        Some(lease_body(json!({
            "renewTime": "2026-01-01T00:00:05.000000Z",
            "leaseDurationSeconds": 15,
        }))),
    )
    .await;
    s.send(
        "lease: replica b's apply conflicts",
        "PATCH",
        &format!("{lease}?fieldManager=replica-b"),
        APPLY,
        Some(lease_body(json!({
            "acquireTime": "2026-01-01T00:00:06.000000Z",
            "renewTime": "2026-01-01T00:00:06.000000Z",
            "holderIdentity": "replica-b",
            "leaseDurationSeconds": 15,
        }))),
    )
    .await;
    s.send(
        "lease: a merge patch with a stale resourceVersion",
        "PATCH",
        &format!("{lease}?fieldManager=replica-b"),
        MERGE,
        Some(
            json!({"metadata": {"resourceVersion": "1"}, "spec": {"holderIdentity": "replica-b"}}),
        ),
    )
    .await;
    s.send(
        "lease: a releases it",
        "PATCH",
        &format!("{lease}?fieldManager=replica-a"),
        STRATEGIC,
        Some(lease_body(json!({
            "acquireTime": null, "renewTime": null,
            "holderIdentity": null, "leaseDurationSeconds": null,
        }))),
    )
    .await;
    s.send(
        "lease: then b's apply takes it",
        "PATCH",
        &format!("{lease}?fieldManager=replica-b"),
        APPLY,
        Some(lease_body(json!({
            "acquireTime": "2026-01-01T00:00:07.000000Z",
            "renewTime": "2026-01-01T00:00:07.000000Z",
            "holderIdentity": "replica-b",
            "leaseDurationSeconds": 15,
        }))),
    )
    .await;
    s.send("lease: get", "GET", &lease, None, None).await;
    s.send(
        "lease: a create without a name",
        "POST",
        LEASES,
        JSON,
        Some(json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": {}, "spec": {}})),
    )
    .await;
    s.send(
        "lease: a replace (update is not granted)",
        "PUT",
        &lease,
        JSON,
        Some(
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": LEASE}, "spec": {}}),
        ),
    )
    .await;
    s.send(
        "lease: get another Lease (not granted)",
        "GET",
        &format!("{LEASES}/other"),
        None,
        None,
    )
    .await;
    s.send(
        "lease: create in another namespace (not granted)",
        "POST",
        "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases",
        JSON,
        Some(
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": LEASE}, "spec": {}}),
        ),
    )
    .await;

    // --- Events ------------------------------------------------------------
    let ns = s.ns.clone();
    let event = |name: &str, controller: Option<&str>| {
        let mut e = json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": name, "namespace": ns},
            "eventTime": "2026-01-01T00:00:00.000000Z",
            "action": "Backfill", "reason": "Started", "type": "Normal",
            "note": "backfill started",
            "reportingInstance": "usage-backfill-operator-0",
            "regarding": {"apiVersion": "usage.multica.ai/v1alpha1", "kind": "UsageBackfill",
                          "name": "a", "namespace": ns},
        });
        if let Some(c) = controller {
            e["reportingController"] = json!(c);
        }
        e
    };
    s.send(
        "event: create",
        "POST",
        EVENTS,
        JSON,
        Some(event("a.1", Some("usage.multica.ai/controller"))),
    )
    .await;
    s.send(
        "event: the same name again",
        "POST",
        EVENTS,
        JSON,
        Some(event("a.1", Some("usage.multica.ai/controller"))),
    )
    .await;
    s.send(
        "event: no reportingController",
        "POST",
        EVENTS,
        JSON,
        Some(event("a.2", None)),
    )
    .await;
    s.send(
        "event: no eventTime",
        "POST",
        EVENTS,
        JSON,
        Some({
            let mut e = event("a.3", Some("usage.multica.ai/controller"));
            e.as_object_mut().unwrap().remove("eventTime");
            e
        }),
    )
    .await;
    s.send("event: list (not granted)", "GET", EVENTS, None, None)
        .await;

    // --- UsageBackfills ----------------------------------------------------
    let (_, listed) = s.send("usagebackfills: list", "GET", UBF, None, None).await;
    let list_rv = listed["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, page) = s
        .send(
            "usagebackfills: first page of 2",
            "GET",
            &format!("{UBF}?limit=2"),
            None,
            None,
        )
        .await;
    let token = page["metadata"]["continue"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    s.send(
        "usagebackfills: the next page",
        "GET",
        &format!("{UBF}?limit=2&continue={token}"),
        None,
        None,
    )
    .await;
    s.send(
        "usagebackfills: a status apply",
        "PATCH",
        &format!("{UBF}/a/status?fieldManager=usage-backfill-operator&force=true"),
        APPLY,
        Some(
            json!({"apiVersion": "usage.multica.ai/v1alpha1", "kind": "UsageBackfill",
                    "status": {"phase": "Running", "observedGeneration": 1}}),
        ),
    )
    .await;
    s.send(
        "usagebackfills: a finalizer added",
        "PATCH",
        &format!("{UBF}/a"),
        MERGE,
        Some(json!({"metadata": {"finalizers": ["usage.multica.ai/run-cleanup"]}})),
    )
    .await;
    s.send(
        "usagebackfills: a merge patch with a stale resourceVersion",
        "PATCH",
        &format!("{UBF}/b"),
        MERGE,
        Some(json!({"metadata": {"resourceVersion": "1", "finalizers": ["usage.multica.ai/run-cleanup"]}})),
    )
    .await;
    s.send(
        "usagebackfills: an invalid status",
        "PATCH",
        &format!("{UBF}/b/status?fieldManager=usage-backfill-operator&force=true"),
        APPLY,
        Some(
            json!({"apiVersion": "usage.multica.ai/v1alpha1", "kind": "UsageBackfill",
                    "status": {"phase": "Bogus"}}),
        ),
    )
    .await;
    s.send(
        "usagebackfills: delete (not granted)",
        "DELETE",
        &format!("{UBF}/c"),
        None,
        None,
    )
    .await;
    s.send(
        "usagebackfills: create (not granted)",
        "POST",
        UBF,
        JSON,
        Some(json!({
            "apiVersion": "usage.multica.ai/v1alpha1", "kind": "UsageBackfill",
            "metadata": {"name": "d"}, "spec": {"database": {"secretRef": {"name": "db"}}},
        })),
    )
    .await;
    s.send(
        "usagebackfills: list all namespaces",
        "GET",
        "/apis/usage.multica.ai/v1alpha1/usagebackfills",
        None,
        None,
    )
    .await;
    // The watch from the first list: the changes since, in order.
    s.watch(
        "usagebackfills: a watch from the list's resourceVersion",
        &format!("{UBF}?watch=true&resourceVersion={list_rv}&allowWatchBookmarks=true"),
        None,
        2,
    )
    .await;

    // --- Secrets -----------------------------------------------------------
    s.send(
        "secret: get, missing",
        "GET",
        "/api/v1/namespaces/{ns}/secrets/db",
        None,
        None,
    )
    .await;
    s.send(
        "secret: list (not granted by default)",
        "GET",
        "/api/v1/namespaces/{ns}/secrets",
        None,
        None,
    )
    .await;
    s.send(
        "secret: watch (not granted by default)",
        "GET",
        "/api/v1/namespaces/{ns}/secrets?watch=true",
        None,
        None,
    )
    .await;
}

async fn the_test_api_server_answers_as_kube_apiserver(version: &str) {
    let (real_client, ns) = real_server(version, &[]).await;
    let (fake_client, fake) = FakeApiServer::start();
    fake.set_rbac_scope(testkit::apiserver::rbac::Scope {
        watched: Vec::new(),
        lease_namespace: Some(ns.clone()),
    });
    seed_usage_backfills(&ControlPlane::shared(version).client(), &fake, &ns).await;
    let mut real = Server {
        client: real_client,
        ns: ns.clone(),
        answers: Vec::new(),
    };
    let mut ours = Server {
        client: fake_client,
        ns: ns.clone(),
        answers: Vec::new(),
    };
    replay(&mut real).await;
    replay(&mut ours).await;

    assert_same(version, &real.answers, &ours.answers);
}

/// Fails listing every answer that differs (but those of [`NOT_MODELLED`]).
fn assert_same(version: &str, real: &[(String, u16, Value)], ours: &[(String, u16, Value)]) {
    assert_eq!(real.len(), ours.len());
    let mut differences = String::new();
    let mut count = 0;
    for ((step, real_code, real_body), (_, code, body)) in real.iter().zip(ours) {
        if NOT_MODELLED.iter().any(|(s, _)| s == step) {
            continue;
        }
        if (real_code, real_body) != (code, body) {
            count += 1;
            differences.push_str(&format!(
                "\n- {step}\n  kube-apiserver {version}: {real_code} {real_body}\n  test API server:     {code} {body}"
            ));
        }
    }
    assert!(
        count == 0,
        "the test API server differs from kube-apiserver {version} in {count} of {} answers:{differences}",
        real.len()
    );
}

/// What the controller asks for with `--watch-secrets`: Secret metadata
/// only, listed in pages and watched from the list's resourceVersion.
const METADATA: Option<&str> =
    Some("application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json");
const METADATA_WATCH: Option<&str> =
    Some("application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json");
const SECRETS: &str = "/api/v1/namespaces/{ns}/secrets";

/// The Secret metadata watch of `--watch-secrets` (the chart's
/// `secrets.watch: true`, its list and watch rules bound): metadata-only
/// pages, and a watch from the list's resourceVersion that sees a Secret
/// rotated.
async fn secret_metadata_answers_as_kube_apiserver(version: &str) {
    let (real_client, ns) = real_server(version, &["secretWatchRules"]).await;
    let (fake_client, fake) = FakeApiServer::start();
    fake.set_secret_access(testkit::apiserver::rbac::SecretAccess::Watch);
    let admin = ControlPlane::shared(version).client();
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(admin, &ns);
    let put = |name: &str, value: &str| {
        serde_json::from_value::<k8s_openapi::api::core::v1::Secret>(json!({
            "metadata": {"name": name}, "type": "Opaque",
            "stringData": {"DATABASE_URL": value},
        }))
        .unwrap()
    };
    for name in ["db-a", "db-b", "db-c"] {
        secrets
            .create(&PostParams::default(), &put(name, "postgres://x"))
            .await
            .unwrap();
        fake.put_secret(&ns, name, "DATABASE_URL", "postgres://x");
    }
    let mut answers = Vec::new();
    for (client, real) in [(real_client, true), (fake_client, false)] {
        let mut s = Server {
            client,
            ns: ns.clone(),
            answers: Vec::new(),
        };
        let (_, first) = s
            .send_accepting(
                "secrets: metadata, first page of 2",
                "GET",
                &format!("{SECRETS}?limit=2"),
                None,
                METADATA,
                None,
            )
            .await;
        let rv = first["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .to_owned();
        let token = first["metadata"]["continue"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        s.send_accepting(
            "secrets: metadata, the next page",
            "GET",
            &format!("{SECRETS}?limit=2&continue={token}"),
            None,
            METADATA,
            None,
        )
        .await;
        s.send_accepting(
            "secrets: get one's metadata",
            "GET",
            &format!("{SECRETS}/db-a"),
            None,
            METADATA_WATCH,
            None,
        )
        .await;
        // A rotation, as `kubectl` would make it.
        if real {
            secrets
                .replace("db-b", &PostParams::default(), &{
                    let mut new = put("db-b", "postgres://y");
                    new.metadata.resource_version =
                        secrets.get("db-b").await.unwrap().metadata.resource_version;
                    new
                })
                .await
                .unwrap();
        } else {
            fake.put_secret(&ns, "db-b", "DATABASE_URL", "postgres://y");
        }
        s.watch(
            "secrets: a metadata watch from the list's resourceVersion",
            &format!("{SECRETS}?watch=true&resourceVersion={rv}&allowWatchBookmarks=true"),
            METADATA_WATCH,
            1,
        )
        .await;
        answers.push(s.answers);
    }
    assert_same(version, &answers[0], &answers[1]);
}
