//! The CRD and the controller on a real kube-apiserver (and etcd), built
//! from Go modules by `tests/cluster/build.sh`: each scenario runs on the
//! oldest and the newest Kubernetes release the project claims
//! (`usage_backfill_testkit::cluster::VERSIONS`), on a control plane this
//! test process shares between its scenarios (each in namespaces of its
//! own). Unbuilt binaries are a failure saying how to build them.
//!
//! - the CRD is applied by server-side apply and established (so its
//!   schema is structural and every CEL rule compiles within the cost
//!   budget), its printer columns are served, and every object of
//!   `tests/support/cel_cases.rs` gets the same answer from the real API
//!   server as from the fake one (`usage_backfill_testkit::apiserver`): the
//!   stored spec and status of a valid object, pruned and defaulted; the
//!   code, reason, message and causes of a refusal, CEL rules and schema
//!   errors alike; and the outcome of each step of a sequence of writes
//!   (spec and status apart, server-side apply conflicts, stale
//!   resourceVersions, finalizers and deletion);
//! - the whole controller (`run_controllers`) runs a backfill against the
//!   real API server and the test kit's PostgreSQL to Succeeded;
//! - the real `helm` (built from `helm.sh/helm/v4`) installs the chart,
//!   upgrades it to namespaced mode and uninstalls it;
//! - the Helm hook recipes of docs/packaging.md, in the stand-in
//!   application chart, installed and upgraded with that helm, the
//!   controller in this process and the test in the place of the Job
//!   controller and the kubelet (see [`the_hook_recipe_runs_with_helm`],
//!   [`the_job_recipe_runs_with_helm`] and docs/testing.md for which steps
//!   of an upgrade this covers).
//!
//! Where the two servers answer differently, the test prints every
//! difference before it fails.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, Status};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use testkit::cluster::ControlPlane;
use usage_backfill_api::{self as api, BackfillResult, Phase, UsageBackfill, UsageBackfillSpec};
use usage_backfill_controller::{self as controller, Context};
use usage_backfill_standin::fixture::HistorySpec;
use usage_backfill_testkit::{self as testkit, FakeApiServer, on_both_versions};

#[path = "../support/cel_cases.rs"]
mod cel_cases;

const MANAGER: &str = "usage-backfill-cluster-test";
const WAIT: Duration = Duration::from_secs(60);

on_both_versions!(
    the_crd_is_established_with_its_printer_columns,
    valid_objects_are_stored_as_the_fake_stores_them,
    refusals_match_the_fake_api_server,
    write_sequences_match_the_fake_api_server,
    the_controller_runs_a_backfill_to_success,
    the_chart_installs_upgrades_and_uninstalls_with_helm,
    the_hook_recipe_runs_with_helm,
    the_job_recipe_runs_with_helm,
);

/// Polls `check` every 200 ms until it gives `Some`, or panics after [`WAIT`].
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let polled = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    polled.unwrap_or_else(|_| panic!("timed out after {WAIT:?} waiting for {what}"))
}

/// The shared control plane of `version`, with the CRD applied (as
/// `kubectl apply --server-side` would) and established, and its admin.
async fn with_crd(version: &str) -> (&'static ControlPlane, Client) {
    let plane = ControlPlane::shared(version);
    let client = plane.client();
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = api::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .unwrap_or_else(|e| panic!("Kubernetes {version} refuses the CRD: {e}"));
    eventually("the CRD to be established", || {
        let crds = crds.clone();
        let name = crd.name_any();
        async move {
            let conditions = crds.get(&name).await.ok()?.status?.conditions?;
            let is_true = |t: &str| {
                conditions
                    .iter()
                    .any(|c| c.type_ == t && c.status == "True")
            };
            (is_true("Established") && is_true("NamesAccepted")).then_some(())
        }
    })
    .await;
    (plane, client)
}

/// A namespace of this scenario's own on the shared control plane.
async fn namespace(client: &Client, prefix: &str) -> String {
    let created = Api::<Namespace>::all(client.clone())
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"generateName": format!("{prefix}-")}}))
                .unwrap(),
        )
        .await
        .expect("creating a namespace");
    created.name_any()
}

/// A Secret `name` with the string data `data`.
fn secret(name: &str, data: Value) -> Secret {
    let mut s: Secret = serde_json::from_value(json!({ "stringData": data })).unwrap();
    s.metadata.name = Some(name.into());
    s
}

/// A throwaway database with six months of history, and the Secret `name`
/// in `ns` holding its URL (`DATABASE_URL`) beside the `extra` keys.
async fn database_and_secret(
    client: &Client,
    ns: &str,
    name: &str,
    extra: Value,
) -> (testkit::TestDatabase, tokio_postgres::Client) {
    let (db, pg) = testkit::database_with(&HistorySpec {
        rows: 300,
        months: 6,
        ..HistorySpec::default()
    })
    .await;
    let mut data = json!({ "DATABASE_URL": db.url() });
    data.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &secret(name, data))
        .await
        .unwrap_or_else(|e| panic!("creating the Secret {name}: {e}"));
    (db, pg)
}

fn ubf_resource() -> ApiResource {
    ApiResource::erase::<UsageBackfill>(&())
}

/// POSTs a UsageBackfill with `spec` exactly as given.
async fn create_raw(client: &Client, ns: &str, name: &str, spec: &Value) -> kube::Result<Value> {
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), ns, &ubf_resource());
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "usage.multica.ai/v1alpha1",
        "kind": "UsageBackfill",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap();
    api.create(&PostParams::default(), &object)
        .await
        .map(|o| serde_json::to_value(o).unwrap())
}

/// What a refusal says, for comparing servers: code, reason, message, and
/// each cause as `reason field: message`. The apiserver lists the causes
/// in the order its validator met them, which follows Go's map iteration:
/// they are compared as a set, and the message with its list of them
/// replaced by `[…]` once checked to list exactly those.
fn refusal_of(status: &Status) -> Value {
    let found: Vec<_> = status
        .details
        .iter()
        .flat_map(|d| d.causes.iter())
        .collect();
    let mut causes: Vec<String> = found
        .iter()
        .map(|c| format!("{} {}: {}", c.reason, c.field, c.message))
        .collect();
    causes.sort();
    let mut message = status.message.clone();
    if found.len() > 1 {
        let listed: Vec<String> = found
            .iter()
            .map(|c| format!("{}: {}", c.field, c.message))
            .collect();
        if let Some(prefix) = message.strip_suffix(&format!("[{}]", listed.join(", "))) {
            message = format!("{prefix}[…]");
        }
    }
    json!({
        "code": status.code,
        "reason": status.reason,
        "message": message,
        "causes": causes,
    })
}

/// `real` as the fake words it: kube-apiserver 1.34 shows a CEL rule's
/// node by its schema type (`Invalid value: "object": <message>`), where
/// 1.37, and the fake, show nothing (`Invalid value: <message>`).
fn as_the_fake_words_it(version: &str, real: Value) -> Value {
    if version != "1.34" {
        return real;
    }
    let text = real
        .to_string()
        .replace(r#"Invalid value: \"object\": "#, "Invalid value: ");
    serde_json::from_str(&text).unwrap()
}

fn refused<T: std::fmt::Debug>(what: &str, r: kube::Result<T>) -> Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("{what}: expected a refusal, got {other:?}"),
    }
}

/// Fails listing every difference, each as (case, real, fake).
fn assert_no_differences(version: &str, differences: &[(String, Value, Value)]) {
    if differences.is_empty() {
        return;
    }
    let mut text = String::new();
    for (case, real, fake) in differences {
        text.push_str(&format!(
            "\n- {case}\n  kube-apiserver {version}: {real}\n  fake:           {fake}"
        ));
    }
    panic!(
        "the fake API server differs from kube-apiserver {version} in {} case(s):{text}",
        differences.len()
    );
}

// ---------------------------------------------------------------------------
// The CRD
// ---------------------------------------------------------------------------

async fn the_crd_is_established_with_its_printer_columns(version: &str) {
    let (_plane, client) = with_crd(version).await;
    let ns = namespace(&client, "columns").await;
    create_raw(
        &client,
        &ns,
        "shown",
        &json!({"database": {"secretRef": {"name": "db"}}}),
    )
    .await
    .expect("a minimal UsageBackfill is accepted");

    // `kubectl get usagebackfills` asks for a Table.
    let request = http::Request::get(format!(
        "/apis/usage.multica.ai/v1alpha1/namespaces/{ns}/usagebackfills"
    ))
    .header(
        "Accept",
        "application/json;as=Table;v=v1;g=meta.k8s.io,application/json",
    )
    .body(Vec::new())
    .unwrap();
    let table: Value = client.request(request).await.expect("a Table");
    let served: Vec<&str> = table["columnDefinitions"]
        .as_array()
        .expect("column definitions")
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    let crd = api::crd();
    let declared: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| c.name.clone())
        .collect();
    let mut expected = vec!["Name".to_owned()];
    expected.extend(declared);
    assert_eq!(served, expected, "the printer columns, after Name");
    let rows = table["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["cells"][0], "shown");
}

/// Each valid spec, stored by both servers: the same spec and status,
/// pruned (an unknown field is dropped) and defaulted.
async fn valid_objects_are_stored_as_the_fake_stores_them(version: &str) {
    let (_plane, client) = with_crd(version).await;
    let ns = namespace(&client, "valid").await;
    let (_fake_client, fake) = FakeApiServer::start();
    let mut cases = cel_cases::valid_specs();
    cases.push((
        "unknown fields, a null to default",
        json!({
            "database": {"secretRef": {"name": "app-db"}, "unknownField": 1},
            "mode": null,
            "bogus": "dropped",
        }),
    ));
    let mut differences = Vec::new();
    for (i, (case, spec)) in cases.into_iter().enumerate() {
        let name = format!("valid-{i}");
        let real = create_raw(&client, &ns, &name, &spec)
            .await
            .unwrap_or_else(|e| panic!("{case}: kube-apiserver {version} refuses it: {e}"));
        fake.try_create_raw(&ns, &name, spec.clone())
            .unwrap_or_else(|e| panic!("{case}: the fake refuses it: {}", e.message));
        let stored = fake.get_raw(&ns, &name).unwrap();
        let pick = |v: &Value| json!({"spec": v["spec"], "status": v["status"]});
        if pick(&real) != pick(&stored) {
            differences.push((case.to_owned(), pick(&real), pick(&stored)));
        }
    }
    assert_no_differences(version, &differences);
}

/// Every object one rule refuses, and the schema errors the fake's own
/// tests show: the same code, reason, message and causes from both.
async fn refusals_match_the_fake_api_server(version: &str) {
    let (_plane, client) = with_crd(version).await;
    let ns = namespace(&client, "refusals").await;
    let (fake_client, fake) = FakeApiServer::start();
    let mut differences = Vec::new();

    for (i, (case, spec, _rule)) in cel_cases::invalid_specs().into_iter().enumerate() {
        let name = format!("invalid-{i}");
        let real = refused(case, create_raw(&client, &ns, &name, &spec).await);
        let fake_says = fake
            .try_create_raw(&ns, &name, spec.clone())
            .expect_err("the fake refuses it too");
        let real = as_the_fake_words_it(version, refusal_of(&real));
        let fake_says = refusal_of(&fake_says);
        if real != fake_says {
            differences.push((format!("create: {case}"), real, fake_says));
        }
    }

    // Writes to a stored valid object, through a client on both servers.
    let stored = serde_json::to_value(UsageBackfillSpec::new("app-db")).unwrap();
    create_raw(&client, &ns, "x", &stored).await.unwrap();
    fake.create(&ns, "x", UsageBackfillSpec::new("app-db"));
    let merge = |spec: Value| Patch::Merge(json!({"spec": spec}));
    let status_apply = |status: Value| {
        Patch::Apply(json!({
            "apiVersion": "usage.multica.ai/v1alpha1",
            "kind": "UsageBackfill",
            "status": status,
        }))
    };
    let writes: Vec<(&str, bool, Patch<Value>)> = vec![
        (
            "an enum and a minimum broken",
            false,
            merge(json!({"mode": "Sometimes", "backoffLimit": -1})),
        ),
        (
            "an enum error blocks the CEL rules",
            false,
            merge(json!({"mode": "Sometimes", "monthsBack": 3})),
        ),
        (
            "a minimum does not block them",
            false,
            merge(json!({"backoffLimit": -1, "monthsBack": 3})),
        ),
        (
            "a merge patch breaking a rule",
            false,
            merge(json!({"mode": "Always", "forcePartial": true})),
        ),
        (
            "an apply joining a second form",
            false,
            Patch::Apply(json!({
                "apiVersion": "usage.multica.ai/v1alpha1",
                "kind": "UsageBackfill",
                "spec": {"database": {"host": "shop-postgres", "user": "multica"}},
            })),
        ),
        (
            "a status apply with a bad enum and date",
            true,
            status_apply(json!({"phase": "Bogus", "startedAt": "yesterday"})),
        ),
    ];
    let real_api: Api<UsageBackfill> = Api::namespaced(client.clone(), &ns);
    let fake_api: Api<UsageBackfill> = Api::namespaced(fake_client, &ns);
    for (case, status, patch) in &writes {
        let params = match patch {
            Patch::Apply(_) => PatchParams::apply("kubectl"),
            _ => PatchParams::default(),
        };
        let (real, fake_says) = if *status {
            (
                real_api.patch_status("x", &params, patch).await,
                fake_api.patch_status("x", &params, patch).await,
            )
        } else {
            (
                real_api.patch("x", &params, patch).await,
                fake_api.patch("x", &params, patch).await,
            )
        };
        let real = as_the_fake_words_it(version, refusal_of(&refused(case, real)));
        let fake_says = refusal_of(&refused(case, fake_says));
        if real != fake_says {
            differences.push((format!("write: {case}"), real, fake_says));
        }
    }
    assert_no_differences(version, &differences);
}

/// The outcome of one step, for comparing servers: a refusal as
/// [`refusal_of`] gives it, or what the object holds after it.
fn outcome(result: kube::Result<UsageBackfill>) -> Value {
    match result {
        Ok(o) => json!({
            "generation": o.metadata.generation,
            "finalizers": o.metadata.finalizers,
            "deleting": o.metadata.deletion_timestamp.is_some(),
            "spec": o.spec,
            "status": o.status,
        }),
        Err(kube::Error::Api(s)) => refusal_of(&s),
        Err(e) => json!({"error": e.to_string()}),
    }
}

/// The writes the controller and its tests make, in order, on both
/// servers: each step's outcome (the object after it, or the refusal)
/// must be the same. (A PUT of a UsageBackfill is not among them: the fake
/// does not serve it.)
async fn write_sequences_match_the_fake_api_server(version: &str) {
    let (_plane, client) = with_crd(version).await;
    let ns = namespace(&client, "sequences").await;
    let (fake_client, fake) = FakeApiServer::start();
    create_raw(
        &client,
        &ns,
        "s",
        &serde_json::to_value(UsageBackfillSpec::new("app-db")).unwrap(),
    )
    .await
    .unwrap();
    fake.create(&ns, "s", UsageBackfillSpec::new("app-db"));
    let servers = [
        (
            "kube-apiserver",
            Api::<UsageBackfill>::namespaced(client.clone(), &ns),
        ),
        ("fake", Api::<UsageBackfill>::namespaced(fake_client, &ns)),
    ];
    let mut outcomes: Vec<Vec<(String, Value)>> = vec![Vec::new(), Vec::new()];
    for (i, (_, api)) in servers.iter().enumerate() {
        let mut step = |what: &str, result: kube::Result<UsageBackfill>| {
            outcomes[i].push((what.to_owned(), outcome(result)));
        };
        let status = |manager: &str, phase: &str| {
            (
                PatchParams::apply(manager),
                Patch::Apply(json!({
                    "apiVersion": "usage.multica.ai/v1alpha1",
                    "kind": "UsageBackfill",
                    "status": {"phase": phase},
                })),
            )
        };
        step("get a missing object", api.get("missing").await);
        step(
            "a spec change moves the generation",
            api.patch(
                "s",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"backoffLimit": 2}})),
            )
            .await,
        );
        let (params, patch) = status("controller", "Running");
        step(
            "a status apply",
            api.patch_status("s", &params, &patch).await,
        );
        let (params, patch) = status("intruder", "Failed");
        step(
            "a status apply conflicting with another manager",
            api.patch_status("s", &params, &patch).await,
        );
        step(
            "a main-resource write ignores the status",
            api.patch(
                "s",
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {"phase": "Failed"}})),
            )
            .await,
        );
        step(
            "a status write ignores the spec",
            api.patch_status(
                "s",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"backoffLimit": 5}})),
            )
            .await,
        );
        step(
            "a finalizer added",
            api.patch(
                "s",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": ["usage.multica.ai/run"]}})),
            )
            .await,
        );
        // The fake's client is the operator's ServiceAccount, which may not
        // delete: its test deletes as `kubectl` would, in the store.
        let deleted = if i == 0 {
            api.delete("s", &Default::default())
                .await
                .map(|d| d.left().expect("the object, waiting for its finalizer"))
        } else {
            fake.delete(&ns, "s");
            api.get("s").await
        };
        step("a delete waits for the finalizer", deleted);
        step(
            "no finalizer may be added while deleting",
            api.patch(
                "s",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": ["usage.multica.ai/run", "x/y"]}})),
            )
            .await,
        );
        step(
            "the last finalizer removed",
            api.patch(
                "s",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"finalizers": null}})),
            )
            .await,
        );
        step("then the object is gone", api.get("s").await);
    }
    let differences: Vec<(String, Value, Value)> = outcomes[0]
        .iter()
        .zip(&outcomes[1])
        .filter(|((_, real), (_, fake))| real != fake)
        .map(|((what, real), (_, fake))| (what.clone(), real.clone(), fake.clone()))
        .collect();
    assert_no_differences(version, &differences);
}

// ---------------------------------------------------------------------------
// The controller
// ---------------------------------------------------------------------------

/// The whole controller, as the admin, watching one namespace: a
/// UsageBackfill over a database with history ends Succeeded, the rollup
/// correct, the finalizer gone, the status written by server-side apply.
async fn the_controller_runs_a_backfill_to_success(version: &str) {
    let (_plane, client) = with_crd(version).await;
    let ns = namespace(&client, "controller").await;
    let (_db, pg) = database_and_secret(&client, &ns, "app-db", json!({})).await;
    let objects: Api<UsageBackfill> = Api::namespaced(client.clone(), &ns);
    objects
        .create(
            &PostParams::default(),
            &UsageBackfill::new("backfill", UsageBackfillSpec::new("app-db")),
        )
        .await
        .expect("creating the UsageBackfill");

    let ctx = Context::new(client.clone(), testkit::settings());
    let ready = Arc::new(AtomicBool::new(false));
    let cancel = usage_backfill_engine::CancellationToken::new();
    let run = tokio::spawn(controller::run_controllers(
        ctx,
        vec![ns.clone()],
        4,
        ready.clone(),
        WAIT,
        cancel.clone(),
    ));
    let done = eventually("the backfill to succeed, its finalizer gone", || {
        let objects = objects.clone();
        async move {
            let o = objects.get("backfill").await.ok()?;
            let s = o.status.as_ref()?;
            let current = Some(s.observed_generation) == o.metadata.generation;
            let finished = current && s.phase.is_some_and(Phase::is_finished);
            (finished && !controller::has_finalizer(&o)).then_some(o)
        }
    })
    .await;
    assert!(ready.load(Ordering::Acquire), "the cache synced");
    let status = done.status.clone().unwrap();
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:?}");
    assert_eq!(status.result, Some(BackfillResult::Backfilled));
    assert_eq!(status.slices_processed, status.slices_total);
    testkit::engine::assert_correct(&pg).await;
    let status_managers: Vec<&str> = done
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter_map(|m| m.manager.as_deref())
        .collect();
    assert_eq!(status_managers, [controller::FIELD_MANAGER]);

    cancel.cancel();
    let left = tokio::time::timeout(WAIT, run)
        .await
        .expect("the controller stops")
        .expect("the controller does not panic");
    assert_eq!(left, 0, "no run left behind");
}

// ---------------------------------------------------------------------------
// The chart, with the real helm
// ---------------------------------------------------------------------------

/// Runs the built `helm` against `plane` as its admin, with Helm's own
/// directories in `home`: whether it succeeded, and its output. Killed
/// when the future is dropped (a test that fails while helm waits).
async fn try_helm(plane: &ControlPlane, home: &std::path::Path, args: &[&str]) -> (bool, String) {
    let bin = testkit::cluster::helm_binary().unwrap_or_else(|e| panic!("{e}"));
    let output = tokio::process::Command::new(bin)
        .args(args)
        .arg("--kubeconfig")
        .arg(plane.kubeconfig())
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .kill_on_drop(true)
        .output()
        .await
        .expect("running helm");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// [`try_helm`], panicking with its output when it fails.
async fn helm(plane: &ControlPlane, home: &std::path::Path, args: &[&str]) -> String {
    let (ok, text) = try_helm(plane, home, args).await;
    assert!(ok, "helm {} failed:\n{text}", args.join(" "));
    text
}

/// `helm install`, `upgrade` (to namespaced mode, two replicas) and
/// `uninstall` of the chart: every object it renders is accepted by the
/// API server (schemas, RBAC escalation checks: the admin holds what the
/// roles grant), the release records its revisions. No kubelet runs the
/// Deployment: what a pod would do is the e2e test's part.
async fn the_chart_installs_upgrades_and_uninstalls_with_helm(version: &str) {
    let (plane, client) = with_crd(version).await;
    let home = tempfile::tempdir().unwrap();
    let release_ns = namespace(&client, "helm").await;
    let watched = [
        namespace(&client, "team").await,
        namespace(&client, "team").await,
    ];
    let chart = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/usage-backfill-operator"
    );
    let release = format!("ubf-{}", &release_ns[release_ns.len() - 5..]);
    // The chart's fullname: `<release>-<chart>`.
    let fullname = format!("{release}-usage-backfill-operator");
    let ns_flag = ["--namespace", release_ns.as_str()];

    let installed = helm(
        plane,
        home.path(),
        &[&["install", &release, chart], &ns_flag[..]].concat(),
    )
    .await;
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &release_ns);
    let deployment = deployments.get(&fullname).await.expect("the Deployment");
    assert_eq!(deployment.spec.unwrap().replicas, Some(1));
    let cluster_roles: Api<k8s_openapi::api::rbac::v1::ClusterRole> = Api::all(client.clone());
    cluster_roles
        .get(&fullname)
        .await
        .expect("the cluster-wide mode's ClusterRole");

    let watch = format!("watchNamespaces={{{},{}}}", watched[0], watched[1]);
    let upgraded = helm(
        plane,
        home.path(),
        &[
            &[
                "upgrade",
                &release,
                chart,
                "--set",
                &watch,
                "--set",
                "replicaCount=2",
            ],
            &ns_flag[..],
        ]
        .concat(),
    )
    .await;
    assert!(upgraded.contains("REVISION: 2"), "{upgraded}");
    let deployment = deployments.get(&fullname).await.expect("the Deployment");
    assert_eq!(deployment.spec.unwrap().replicas, Some(2));
    for ns in &watched {
        Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(client.clone(), ns)
            .get(&fullname)
            .await
            .unwrap_or_else(|e| panic!("the namespaced mode's Role in {ns}: {e}"));
    }
    assert!(
        cluster_roles.get_opt(&fullname).await.unwrap().is_none(),
        "the upgrade removed the cluster-wide ClusterRole"
    );

    let history = helm(
        plane,
        home.path(),
        &[&["history", &release], &ns_flag[..]].concat(),
    )
    .await;
    assert_eq!(
        history.lines().count(),
        3,
        "a header and two revisions:\n{history}"
    );
    helm(
        plane,
        home.path(),
        &[&["uninstall", &release], &ns_flag[..]].concat(),
    )
    .await;
    assert!(deployments.get_opt(&fullname).await.unwrap().is_none());
}

// ---------------------------------------------------------------------------
// The Helm hook recipes of docs/packaging.md, with the real helm
// ---------------------------------------------------------------------------

/// The stand-in of the application's chart (`.ci/app-chart`) with the
/// recipe of docs/packaging.md added as a user would, as `.ci/chart_check.py`
/// adds it: its templates as files, its values block appended to
/// `values.yaml`, its schema entry merged into the top-level properties.
fn app_chart_with_recipe(dir: &std::path::Path) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let app = dir.join("app-chart");
    for entry in ["", "templates"] {
        std::fs::create_dir_all(app.join(entry)).unwrap();
        for file in std::fs::read_dir(root.join(".ci/app-chart").join(entry)).unwrap() {
            let file = file.unwrap();
            if file.file_type().unwrap().is_file() {
                std::fs::copy(file.path(), app.join(entry).join(file.file_name())).unwrap();
            }
        }
    }
    let docs = std::fs::read_to_string(root.join("docs/packaging.md")).unwrap();
    let blocks = |marker: &str, lang: &str| -> Vec<(String, String)> {
        let re = regex::Regex::new(&format!(
            r"(?s)<!-- {marker}: (\S+(?: \S+)?) -->\n```{lang}\n(.*?)```"
        ))
        .unwrap();
        re.captures_iter(&docs)
            .map(|c| (c[1].to_owned(), c[2].to_owned()))
            .collect()
    };
    let templates: Vec<_> = blocks("example-file", "yaml")
        .into_iter()
        .filter(|(path, _)| path.starts_with("app-chart/templates/"))
        .collect();
    assert!(
        templates.len() >= 3,
        "the recipe's templates in docs/packaging.md"
    );
    for (path, body) in templates {
        std::fs::write(dir.join(path), body).unwrap();
    }
    let appended = blocks("example-append", "yaml");
    assert_eq!(appended.len(), 1, "one values block to append");
    let values = app.join("values.yaml");
    let mut text = std::fs::read_to_string(&values).unwrap();
    text.push_str(&appended[0].1);
    std::fs::write(&values, text).unwrap();
    let edit = blocks("example-schema", "json");
    assert_eq!(edit.len(), 1, "one schema entry");
    let schema_path = app.join("values.schema.json");
    let mut schema: Value =
        serde_json::from_str(&std::fs::read_to_string(&schema_path).unwrap()).unwrap();
    let edit: Value = serde_json::from_str(&edit[0].1).unwrap();
    for (key, value) in edit.as_object().unwrap() {
        schema["properties"][key] = value.clone();
    }
    std::fs::write(&schema_path, schema.to_string()).unwrap();
    app
}

/// A kubeconfig acting as ServiceAccount `namespace/name` (what a pod of
/// that account gets), its context namespace the pod's namespace.
fn pod_kubeconfig(
    plane: &ControlPlane,
    namespace: &str,
    name: &str,
    dir: &std::path::Path,
) -> std::path::PathBuf {
    let path = dir.join(format!("kubeconfig-{namespace}-{name}"));
    let text = format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testkit
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: pod
  user:
    token: {token}
    as: system:serviceaccount:{namespace}:{name}
    as-groups: [system:serviceaccounts, 'system:serviceaccounts:{namespace}', system:authenticated]
contexts:
- name: pod
  context: {{cluster: testkit, user: pod, namespace: {namespace}}}
current-context: pod
",
        server = plane.url(),
        ca = plane.ca_file().display(),
        token = plane.admin_token(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// What the test does in place of the Job controller and the kubelet,
/// for one hook Job: what it ran, and how it ended.
#[derive(Debug)]
struct HookRun {
    /// The Job's `metadata.uid`.
    uid: String,
    args: Vec<String>,
    exit: i32,
    output: String,
}

/// Plays the Job controller and the kubelet for the wait Job `name` in
/// `ns`: once helm has created it, runs what its container would run (the
/// `usage-backfill` binary with the Job's own args, as the Job's
/// ServiceAccount, in the Job's namespace), then writes the Job's status as
/// the Job controller would for that exit code: Complete on 0, Failed
/// otherwise.
async fn play_the_job_controller(
    plane: &ControlPlane,
    client: &Client,
    ns: &str,
    name: &str,
    dir: &std::path::Path,
) -> HookRun {
    use k8s_openapi::api::batch::v1::Job;
    let jobs: Api<Job> = Api::namespaced(client.clone(), ns);
    let job = eventually(&format!("helm to create the hook Job {name}"), || {
        let jobs = jobs.clone();
        async move { jobs.get_opt(name).await.ok().flatten() }
    })
    .await;
    let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    assert_eq!(pod.containers.len(), 1, "one container");
    let container = &pod.containers[0];
    let args = container.args.clone().unwrap_or_default();
    let account = pod.service_account_name.clone().unwrap_or("default".into());
    // The container's environment as the kubelet builds it: values, and
    // Secret keys read from the Job's namespace; nothing of this process's.
    let mut env = vec![
        ("PATH".to_owned(), "/usr/bin:/bin".to_owned()),
        ("RUST_LOG".to_owned(), "warn".to_owned()),
    ];
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(v), _) => v.clone(),
            (None, Some(from)) => {
                let key = from
                    .secret_key_ref
                    .as_ref()
                    .expect("only secretKeyRef is resolved");
                let secret = secrets.get(&key.name).await.expect("the Job's Secret");
                let bytes = secret
                    .data
                    .unwrap_or_default()
                    .remove(&key.key)
                    .expect("the Secret's key");
                String::from_utf8(bytes.0).unwrap()
            }
            (None, None) => String::new(),
        };
        env.push((var.name.clone(), value));
    }
    if pod.automount_service_account_token != Some(false) {
        let kubeconfig = pod_kubeconfig(plane, ns, &account, dir);
        env.push(("KUBECONFIG".to_owned(), kubeconfig.display().to_string()));
    }
    let started = k8s_openapi::jiff::Timestamp::now();
    let run = tokio::process::Command::new(env!("CARGO_BIN_EXE_usage-backfill"))
        .args(&args)
        .env_clear()
        .envs(env)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(WAIT * 3, run)
        .await
        .unwrap_or_else(|_| panic!("the hook's `usage-backfill {}` did not end", args.join(" ")))
        .expect("running usage-backfill");
    let exit = output.status.code().unwrap_or(-1);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // What the Job controller writes when its one pod has ended (Kubernetes
    // 1.34+ refuse Complete without SuccessCriteriaMet first, and Failed
    // without FailureTarget).
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let condition = |type_: &str, reason: &str, message: &str| {
        json!({"type": type_, "status": "True", "reason": reason, "message": message,
               "lastProbeTime": now, "lastTransitionTime": now})
    };
    let status = if exit == 0 {
        json!({
            "startTime": started.to_string(),
            "completionTime": now,
            "succeeded": 1,
            "active": 0,
            "ready": 0,
            "terminating": 0,
            "uncountedTerminatedPods": {},
            "conditions": [
                condition("SuccessCriteriaMet", "CompletionsReached", "Reached expected number of succeeded pods"),
                condition("Complete", "CompletionsReached", "Reached expected number of succeeded pods"),
            ],
        })
    } else {
        json!({
            "startTime": started.to_string(),
            "failed": 1,
            "active": 0,
            "ready": 0,
            "terminating": 0,
            "uncountedTerminatedPods": {},
            "conditions": [
                condition("FailureTarget", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
                condition("Failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit"),
            ],
        })
    };
    jobs.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await
    .unwrap_or_else(|e| {
        panic!("kube-apiserver refuses the Job status the Job controller would write: {e}")
    });
    HookRun {
        uid: job.uid().unwrap(),
        args,
        exit,
        output: text,
    }
}

/// The hook recipe of docs/packaging.md (pattern A: a UsageBackfill and a
/// Job that waits for it), in the stand-in application chart, installed
/// and upgraded by the real helm, the controller running in this process
/// against the test kit's PostgreSQL, and the test in the place of the Job
/// controller and the kubelet (there are none): it runs the hook Job's
/// `usage-backfill wait` with the Job's own args as the Job's
/// ServiceAccount, and writes the Job's status from its exit code.
///
/// - an install with the built-in database runs no hook: no UsageBackfill,
///   no Job, nothing for helm to wait on;
/// - an upgrade (external database: the built-in one would be the Service
///   `<release>-postgres`, which nothing here serves or resolves) runs the
///   hooks in weight order: the wait Job's RBAC, the UsageBackfill, the
///   Job; the controller backfills, `wait` exits 0 reading the object as
///   the Job's ServiceAccount, helm proceeds and deletes the succeeded Job
///   (`hook-succeeded`), the UsageBackfill stays Succeeded;
/// - an upgrade whose backfill cannot succeed (the Secret's connection
///   string broken): helm replaces the previous UsageBackfill
///   (`before-hook-creation`), the new one ends Stalled, `wait` exits 3, the Job fails, the upgrade
///   fails and the release is `failed`; the failed Job and the
///   UsageBackfill stay, for their logs and status.
async fn the_hook_recipe_runs_with_helm(version: &str) {
    use k8s_openapi::api::batch::v1::Job;
    use k8s_openapi::api::rbac::v1::{Role, RoleBinding};
    let (plane, client) = with_crd(version).await;
    let ns = namespace(&client, "shop").await;
    let home = tempfile::tempdir().unwrap();
    let chart = app_chart_with_recipe(home.path());
    let chart = chart.to_str().unwrap();
    let release = "shop";
    let hook = "shop-usage-backfill";
    let wait_job = format!("{hook}-wait");
    let flags = ["--namespace", ns.as_str(), "--timeout", "35m"];

    let built_in_password = json!({ "POSTGRES_PASSWORD": "built-in-database-password" });
    let (_db, pg) =
        database_and_secret(&client, &ns, "multica-secrets", built_in_password.clone()).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);

    // The install, built-in database: no hook at all.
    let installed = helm(
        plane,
        home.path(),
        &[&["install", release, chart], &flags[..]].concat(),
    )
    .await;
    assert!(installed.contains("STATUS: deployed"), "{installed}");
    let objects: Api<UsageBackfill> = Api::namespaced(client.clone(), &ns);
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    assert!(
        objects
            .list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "no UsageBackfill on install"
    );
    assert!(
        jobs.list(&Default::default())
            .await
            .unwrap()
            .items
            .is_empty(),
        "no Job on install"
    );
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &ns);
    for name in ["shop-backend", "shop-postgres"] {
        deployments
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("the release's {name}: {e}"));
    }

    // The controller, as the chart's would run it, watching the namespace.
    let ctx = Context::new(client.clone(), testkit::settings());
    let ready = Arc::new(AtomicBool::new(false));
    let cancel = usage_backfill_engine::CancellationToken::new();
    let run = tokio::spawn(controller::run_controllers(
        ctx,
        vec![ns.clone()],
        4,
        ready,
        WAIT,
        cancel.clone(),
    ));

    // An upgrade: the hooks run, the backfill succeeds, helm carries on.
    let upgrade = [
        &[
            "upgrade",
            release,
            chart,
            "--set",
            "postgres.external.enabled=true",
        ],
        &flags[..],
    ]
    .concat();
    let (upgraded, hook_run) = tokio::join!(
        try_helm(plane, home.path(), &upgrade),
        play_the_job_controller(plane, &client, &ns, &wait_job, home.path()),
    );
    assert_eq!(
        hook_run.args,
        ["wait", hook, "--timeout", "1800s"],
        "the Job's args"
    );
    assert_eq!(
        hook_run.exit, 0,
        "`usage-backfill wait` succeeds:\n{}",
        hook_run.output
    );
    assert!(upgraded.0, "helm upgrade:\n{}", upgraded.1);
    assert!(upgraded.1.contains("REVISION: 2"), "{}", upgraded.1);
    let first = objects
        .get(hook)
        .await
        .expect("the hook's UsageBackfill stays");
    assert_eq!(first.spec.run_id, "revision-2");
    let status = first.status.clone().unwrap();
    assert_eq!(status.phase, Some(Phase::Succeeded), "{status:?}");
    assert_eq!(status.result, Some(BackfillResult::Backfilled));
    testkit::engine::assert_correct(&pg).await;
    assert!(
        jobs.get_opt(&wait_job).await.unwrap().is_none(),
        "helm deleted the succeeded Job (hook-succeeded)"
    );
    let account = format!("{hook}-wait");
    Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), &ns)
        .get(&account)
        .await
        .expect("the wait Job's ServiceAccount stays (before-hook-creation)");
    Api::<Role>::namespaced(client.clone(), &ns)
        .get(&account)
        .await
        .expect("its Role");
    Api::<RoleBinding>::namespaced(client.clone(), &ns)
        .get(&account)
        .await
        .expect("its RoleBinding");

    // An upgrade whose backfill cannot succeed: the hook fails, so does helm.
    secrets
        .replace("multica-secrets", &PostParams::default(), &{
            let mut data = built_in_password.clone();
            data["DATABASE_URL"] = json!("this is not a connection string");
            let mut s = secret("multica-secrets", data);
            s.metadata.resource_version = secrets
                .get("multica-secrets")
                .await
                .unwrap()
                .metadata
                .resource_version;
            s
        })
        .await
        .expect("breaking the Secret");
    let (failed, hook_run) = tokio::join!(
        try_helm(plane, home.path(), &upgrade),
        play_the_job_controller(plane, &client, &ns, &wait_job, home.path()),
    );
    assert_eq!(
        hook_run.exit, 3,
        "`usage-backfill wait` reports the stall:\n{}",
        hook_run.output
    );
    assert!(
        hook_run.output.contains("InvalidConnectionString"),
        "{}",
        hook_run.output
    );
    assert!(!failed.0, "helm upgrade fails with its hook:\n{}", failed.1);
    assert!(
        failed.1.contains("pre-upgrade hooks failed"),
        "{}",
        failed.1
    );
    let second = objects
        .get(hook)
        .await
        .expect("the new UsageBackfill stays");
    assert_ne!(
        second.uid(),
        first.uid(),
        "before-hook-creation replaced the UsageBackfill"
    );
    assert_eq!(second.spec.run_id, "revision-3");
    assert_eq!(second.status.unwrap().phase, Some(Phase::Failed));
    let job = jobs
        .get(&wait_job)
        .await
        .expect("the failed Job stays, for its logs");
    assert_eq!(job.uid().as_deref(), Some(hook_run.uid.as_str()));
    let history = helm(
        plane,
        home.path(),
        &[&["history", release], &flags[..2]].concat(),
    )
    .await;
    let last = history.lines().last().unwrap_or_default().to_owned();
    assert!(last.contains("failed"), "revision 3 is failed:\n{history}");

    cancel.cancel();
    let left = tokio::time::timeout(WAIT, run)
        .await
        .expect("the controller stops")
        .expect("the controller does not panic");
    assert_eq!(left, 0, "no run left behind");
}

/// Pattern B of docs/packaging.md (the hook Job runs `usage-backfill
/// backfill` itself, no operator), with an external database, so that the
/// install runs it as a `pre-install` hook: helm creates the Job, the test
/// runs its container's command with the container's environment (the
/// connection string from the application's Secret, as the kubelet would
/// set it) and writes the Job's status; the walk fills the rollup, helm
/// deletes the succeeded Job and the release is deployed. The upgrade runs
/// it again, as `pre-upgrade`: nothing lags, it skips.
async fn the_job_recipe_runs_with_helm(version: &str) {
    use k8s_openapi::api::batch::v1::Job;
    let (plane, client) = with_crd(version).await;
    let ns = namespace(&client, "shop").await;
    let home = tempfile::tempdir().unwrap();
    let chart = app_chart_with_recipe(home.path());
    let chart = chart.to_str().unwrap();
    let (db, pg) = database_and_secret(&client, &ns, "multica-secrets", json!({})).await;
    let job = "shop-usage-backfill";
    let values = [
        "--set",
        "usageBackfill.via=job",
        "--set",
        "postgres.external.enabled=true",
        "--namespace",
        ns.as_str(),
        "--timeout",
        "35m",
    ];
    let jobs: Api<Job> = Api::namespaced(client.clone(), &ns);
    for (verb, revision) in [("install", 1), ("upgrade", 2)] {
        let args = [&[verb, "shop", chart], &values[..]].concat();
        let (helmed, run) = tokio::join!(
            try_helm(plane, home.path(), &args),
            play_the_job_controller(plane, &client, &ns, job, home.path()),
        );
        assert_eq!(run.args[0], "backfill", "{:?}", run.args);
        assert_eq!(run.exit, 0, "the backfill hook ({verb}):\n{}", run.output);
        assert!(
            !run.output.contains(db.url()),
            "no connection string in the log"
        );
        assert!(helmed.0, "helm {verb}:\n{}", helmed.1);
        assert!(
            helmed.1.contains(&format!("REVISION: {revision}")),
            "{}",
            helmed.1
        );
        assert!(
            jobs.get_opt(job).await.unwrap().is_none(),
            "helm deleted the succeeded Job (hook-succeeded)"
        );
        let outcome = if revision == 1 {
            "backfilled"
        } else {
            "skipped"
        };
        assert!(
            run.output.contains(outcome),
            "{verb}: {outcome}:\n{}",
            run.output
        );
        testkit::engine::assert_correct(&pg).await;
    }
}
