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
//!   real API server and the test kit's PostgreSQL to Succeeded.
//!
//! The chart and the hook recipes with the real helm are in [`crate::helm`],
//! which shares the helpers here.
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
pub(crate) const WAIT: Duration = Duration::from_secs(60);

on_both_versions!(
    the_crd_is_established_with_its_printer_columns,
    valid_objects_are_stored_as_the_fake_stores_them,
    refusals_match_the_fake_api_server,
    write_sequences_match_the_fake_api_server,
    the_controller_runs_a_backfill_to_success,
);

/// Polls `check` every 200 ms until it gives `Some`, or panics after [`WAIT`].
pub(crate) async fn eventually<T, F: Future<Output = Option<T>>>(
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
pub(crate) async fn with_crd(version: &str) -> (&'static ControlPlane, Client) {
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
pub(crate) async fn namespace(client: &Client, prefix: &str) -> String {
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
pub(crate) fn secret(name: &str, data: Value) -> Secret {
    let mut s: Secret = serde_json::from_value(json!({ "stringData": data })).unwrap();
    s.metadata.name = Some(name.into());
    s
}

/// A throwaway database with six months of history, and the Secret `name`
/// in `ns` holding its URL (`DATABASE_URL`) beside the `extra` keys.
pub(crate) async fn database_and_secret(
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
