//! The fake API server refuses what a real apiserver refuses: one test per
//! rule of `usage_backfill_testkit::apiserver`, each through a kube client
//! as the controller talks to it (the test's own arrangements, such as
//! creating an object, go straight to the store as `kubectl` would).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use kube::core::{DynamicObject, Status};
use serde_json::{Value, json};

use usage_backfill_api::{UsageBackfill, UsageBackfillSpec, rules};
use usage_backfill_controller as controller;
use usage_backfill_testkit::{FakeApiServer, settings};

const NS: &str = "tenant-a";
const WAIT: Duration = Duration::from_secs(20);

fn ubfs(client: &kube::Client) -> Api<UsageBackfill> {
    Api::namespaced(client.clone(), NS)
}

fn spec() -> UsageBackfillSpec {
    UsageBackfillSpec::new("app-db")
}

/// The apiserver's answer of a failed call.
fn refusal<T: std::fmt::Debug>(r: kube::Result<T>) -> Status {
    match r {
        Err(kube::Error::Api(e)) => *e,
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}

fn rv(fake: &FakeApiServer, name: &str) -> String {
    fake.get_raw(NS, name).unwrap()["metadata"]["resourceVersion"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn apply(manager: &str) -> PatchParams {
    PatchParams::apply(manager)
}

fn status_apply(status: Value) -> Value {
    json!({
        "apiVersion": "usage.multica.ai/v1alpha1",
        "kind": "UsageBackfill",
        "status": status,
    })
}

fn condition(kind: &str, status: &str) -> Value {
    json!({
        "type": kind,
        "status": status,
        "reason": "Testing",
        "message": "",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    })
}

// ---------------------------------------------------------------------------
// a. The CRD's schema: pruning, defaulting, validation
// ---------------------------------------------------------------------------

#[tokio::test]
async fn creates_are_pruned_and_defaulted_by_the_crd_schema() {
    let (_client, fake) = FakeApiServer::start();
    fake.create_raw(
        NS,
        "minimal",
        json!({
            "database": { "secretRef": { "name": "app-db" }, "unknownField": 1 },
            "mode": null,
            "bogus": "dropped",
        }),
    );
    let v = fake.get_raw(NS, "minimal").unwrap();
    assert_eq!(v["spec"]["database"]["secretRef"]["key"], "DATABASE_URL");
    assert_eq!(
        v["spec"]["mode"], "IfLagging",
        "a null without nullable is defaulted"
    );
    assert_eq!(v["spec"]["backoffLimit"], 6);
    assert!(
        v["spec"].get("bogus").is_none(),
        "unknown fields are pruned"
    );
    assert!(v["spec"]["database"].get("unknownField").is_none());
    assert_eq!(
        v["status"],
        json!({ "observedGeneration": -1 }),
        "the status default applies to a new object"
    );
}

#[tokio::test]
async fn invalid_writes_get_422_with_field_paths() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    let e = refusal(
        api.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "mode": "Sometimes", "backoffLimit": -1 } })),
        )
        .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert!(e.message.contains("spec.mode"), "{}", e.message);
    assert!(e.message.contains("spec.backoffLimit"), "{}", e.message);

    let e = refusal(
        api.patch_status(
            "x",
            &apply("m"),
            &Patch::Apply(status_apply(
                json!({ "phase": "Bogus", "startedAt": "yesterday" }),
            )),
        )
        .await,
    );
    assert_eq!(e.code, 422);
    assert!(e.message.contains("status.phase"), "{}", e.message);
    assert!(e.message.contains("status.startedAt"), "{}", e.message);
    assert_eq!(fake.get_raw(NS, "x").unwrap()["spec"]["mode"], "IfLagging");
}

// ---------------------------------------------------------------------------
// a2. The CRD's CEL rules (`x-kubernetes-validations`)
// ---------------------------------------------------------------------------

/// (field, message) of each cause of a 422.
fn causes(e: &Status) -> Vec<(String, String)> {
    e.details
        .as_ref()
        .map(|d| d.causes.iter())
        .into_iter()
        .flatten()
        .map(|c| (c.field.clone(), c.message.clone()))
        .collect()
}

/// A refusal by one broken rule, as the apiserver words it: the cause at
/// the field the rule's `fieldPath` names (else its node), `Invalid value:
/// <message>` (an object's value is not shown), and the same in the Status
/// message.
fn assert_refused_by(e: &Status, name: &str, field: &str, rule: rules::Rule) {
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"), "{e:?}");
    let body = format!("Invalid value: {}", rule.message());
    assert_eq!(causes(e), [(field.to_owned(), body.clone())]);
    assert_eq!(
        e.message,
        format!("UsageBackfill.usage.multica.ai \"{name}\" is invalid: {field}: {body}")
    );
}

fn external() -> Value {
    json!({ "secretRef": { "name": "app-db" } })
}

#[tokio::test]
async fn a_spec_breaking_a_cel_rule_is_refused_on_create_with_the_rules_message() {
    let (_client, fake) = FakeApiServer::start();
    // No mode: the rule sees the default (IfLagging), so monthsBack is
    // refused.
    let e = fake
        .try_create_raw(
            NS,
            "bad",
            json!({ "database": external(), "monthsBack": 3 }),
        )
        .unwrap_err();
    assert_refused_by(&e, "bad", "spec.monthsBack", rules::MONTHS_BACK_ONLY_ALWAYS);
    assert!(fake.get_raw(NS, "bad").is_none(), "nothing is stored");
    // A rule on a nested node speaks at that node.
    let e = fake
        .try_create_raw(
            NS,
            "bad",
            json!({ "database": {
                "secretRef": { "name": "app-db" },
                "tls": { "mode": "disable", "caSecretRef": { "name": "db-ca" } },
            } }),
        )
        .unwrap_err();
    assert_refused_by(
        &e,
        "bad",
        "spec.database.tls.caSecretRef",
        rules::CA_NOT_WITH_DISABLE,
    );
}

#[tokio::test]
async fn a_merge_patch_breaking_a_cel_rule_is_refused_and_changes_nothing() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let before = fake.get_raw(NS, "x").unwrap();
    let e = refusal(
        ubfs(&client)
            .patch(
                "x",
                &PatchParams::default(),
                &Patch::Merge(json!({ "spec": { "mode": "Always", "forcePartial": true } })),
            )
            .await,
    );
    assert_refused_by(
        &e,
        "x",
        "spec.forcePartial",
        rules::FORCE_PARTIAL_NEEDS_MONTHS_BACK,
    );
    assert_eq!(fake.get_raw(NS, "x").unwrap(), before);
}

#[tokio::test]
async fn an_apply_breaking_a_cel_rule_is_refused() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let before = fake.get_raw(NS, "x").unwrap();
    // The applied parts join the stored secretRef: two forms at once.
    let e = refusal(
        ubfs(&client)
            .patch(
                "x",
                &apply("kubectl"),
                &Patch::Apply(json!({
                    "apiVersion": "usage.multica.ai/v1alpha1",
                    "kind": "UsageBackfill",
                    "spec": { "database": { "host": "shop-postgres", "user": "multica" } },
                })),
            )
            .await,
    );
    assert_refused_by(&e, "x", "spec.database", rules::ONE_FORM);
    assert_eq!(fake.get_raw(NS, "x").unwrap(), before);
}

#[tokio::test]
async fn a_spec_keeping_the_cel_rules_passes_on_create_patch_and_apply() {
    let (client, fake) = FakeApiServer::start();
    fake.try_create_raw(
        NS,
        "x",
        json!({ "database": external(), "mode": "Always", "monthsBack": 3, "forcePartial": true }),
    )
    .unwrap();
    let api = ubfs(&client);
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "monthsBack": 1, "sliceTimeout": "1ms" } })),
    )
    .await
    .unwrap();
    api.patch(
        "x",
        &apply("kubectl"),
        &Patch::Apply(json!({
            "apiVersion": "usage.multica.ai/v1alpha1",
            "kind": "UsageBackfill",
            "spec": { "database": { "tls": { "mode": "verify-full", "caSecretRef": { "name": "db-ca" } } } },
        })),
    )
    .await
    .unwrap();
    let v = fake.get_raw(NS, "x").unwrap();
    assert_eq!(v["spec"]["monthsBack"], 1);
    assert_eq!(v["spec"]["database"]["tls"]["mode"], "verify-full");
    assert_eq!(v["metadata"]["generation"], 3);
}

/// A rule is ratcheted on an update that leaves its node as stored (an
/// object stored before the rule existed): status writes and metadata
/// changes pass, a change of the node is checked. The CRD has no rule
/// under `status` (asserted here), so this is all a status write meets of
/// the rules; no rule reads `oldSelf` either (transition rules are shown
/// by the testkit's own tests, on a schema of their own).
#[tokio::test]
async fn a_node_left_as_stored_is_ratcheted_and_a_changed_one_is_checked() {
    let rules = usage_backfill_testkit::apiserver::schema::Structural::usage_backfill().rules();
    assert!(rules.iter().all(|r| r.path[0] == "spec" && !r.transition));
    let (client, fake) = FakeApiServer::start();
    fake.create_legacy(
        NS,
        "old",
        json!({ "database": external(), "monthsBack": 3 }),
    );
    let api = ubfs(&client);
    api.patch_status(
        "old",
        &apply("m"),
        &Patch::Apply(status_apply(json!({ "phase": "Failed" }))),
    )
    .await
    .unwrap();
    api.patch(
        "old",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": ["usage.multica.ai/run"] } })),
    )
    .await
    .unwrap();
    let e = refusal(
        api.patch(
            "old",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "backoffLimit": 2 } })),
        )
        .await,
    );
    assert_refused_by(&e, "old", "spec.monthsBack", rules::MONTHS_BACK_ONLY_ALWAYS);
    api.patch(
        "old",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "mode": "Always" } })),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn a_schema_error_of_a_blocking_kind_stops_the_rules_and_says_so() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    // An enum error blocks the rules (monthsBack in IfLagging goes unsaid).
    let e = refusal(
        api.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "mode": "Sometimes", "monthsBack": 3 } })),
        )
        .await,
    );
    let found = causes(&e);
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(found[0].0, "spec.mode");
    assert_eq!(
        found[1],
        (
            "<nil>".to_owned(),
            "Invalid value: null: some validation rules were not checked because the object \
             was invalid; correct the existing errors to complete validation"
                .to_owned()
        )
    );
    // A minimum does not block them: both speak.
    let e = refusal(
        api.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "backoffLimit": -1, "monthsBack": 3 } })),
        )
        .await,
    );
    let fields: Vec<String> = causes(&e).into_iter().map(|c| c.0).collect();
    assert_eq!(fields, ["spec.backoffLimit", "spec.monthsBack"]);
    assert!(
        e.message
            .contains(&rules::MONTHS_BACK_ONLY_ALWAYS.message()),
        "{}",
        e.message
    );
}

// ---------------------------------------------------------------------------
// b. Main resource and status subresource
// ---------------------------------------------------------------------------

#[tokio::test]
async fn the_main_resource_and_the_status_subresource_ignore_each_other() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(
            json!({ "status": { "phase": "Succeeded" }, "metadata": { "labels": { "a": "b" } } }),
        ),
    )
    .await
    .unwrap();
    let v = fake.get_raw(NS, "x").unwrap();
    assert_eq!(v["metadata"]["labels"]["a"], "b");
    assert_eq!(
        v["status"],
        json!({ "observedGeneration": -1 }),
        "status untouched"
    );

    let mut body = status_apply(json!({ "phase": "Running" }));
    body["spec"] = json!({ "database": { "secretRef": { "name": "elsewhere" } } });
    body["metadata"] = json!({ "labels": { "a": "changed" } });
    api.patch_status("x", &apply("m"), &Patch::Apply(body))
        .await
        .unwrap();
    let v = fake.get_raw(NS, "x").unwrap();
    assert_eq!(v["status"]["phase"], "Running");
    assert_eq!(v["spec"]["database"]["secretRef"]["name"], "app-db");
    assert_eq!(v["metadata"]["labels"]["a"], "b");
    assert_eq!(v["metadata"]["generation"], 1);
}

// ---------------------------------------------------------------------------
// c. Server-side apply
// ---------------------------------------------------------------------------

#[tokio::test]
async fn apply_conflicts_between_managers_unless_forced() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    api.patch_status(
        "x",
        &apply("a"),
        &Patch::Apply(status_apply(json!({ "phase": "Running" }))),
    )
    .await
    .unwrap();
    // The same value is no conflict: both own it.
    api.patch_status(
        "x",
        &apply("b"),
        &Patch::Apply(status_apply(json!({ "phase": "Running" }))),
    )
    .await
    .unwrap();
    let e = refusal(
        api.patch_status(
            "x",
            &apply("c"),
            &Patch::Apply(status_apply(json!({ "phase": "Failed" }))),
        )
        .await,
    );
    assert_eq!(e.code, 409);
    assert!(
        e.message.contains("\"a\"") && e.message.contains(".status.phase"),
        "{}",
        e.message
    );
    api.patch_status(
        "x",
        &apply("c").force(),
        &Patch::Apply(status_apply(json!({ "phase": "Failed" }))),
    )
    .await
    .unwrap();
    let v = fake.get_raw(NS, "x").unwrap();
    assert_eq!(v["status"]["phase"], "Failed");
    let managers: Vec<&str> = v["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["fieldsV1"]["f:status"].get("f:phase").is_some())
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert_eq!(managers, ["c"], "forcing takes the field from a and b");
    // A status apply needs a field manager.
    let e = refusal(
        api.patch_status(
            "x",
            &PatchParams::default(),
            &Patch::Apply(status_apply(json!({}))),
        )
        .await,
    );
    assert_eq!(e.code, 422);
}

#[tokio::test]
async fn conditions_merge_by_type_and_an_unapplied_field_goes() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    let a = |conds: Value, extra: Value| {
        let mut s = json!({ "conditions": conds });
        if let (Some(s), Some(e)) = (s.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        Patch::Apply(status_apply(s))
    };
    api.patch_status(
        "x",
        &apply("a"),
        &a(
            json!([condition("Ready", "False")]),
            json!({ "lastError": "boom" }),
        ),
    )
    .await
    .unwrap();
    api.patch_status(
        "x",
        &apply("b"),
        &a(json!([condition("Stalled", "True")]), json!({})),
    )
    .await
    .unwrap();
    let types = |v: &Value| -> Vec<String> {
        v["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["type"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(types(&fake.get_raw(NS, "x").unwrap()), ["Ready", "Stalled"]);
    // a stops applying Ready and lastError: both go, b's Stalled stays.
    api.patch_status(
        "x",
        &apply("a"),
        &a(json!([condition("Reconciling", "True")]), json!({})),
    )
    .await
    .unwrap();
    let v = fake.get_raw(NS, "x").unwrap();
    assert_eq!(types(&v), ["Stalled", "Reconciling"]);
    assert!(v["status"].get("lastError").is_none());
}

#[tokio::test]
async fn a_no_op_apply_changes_nothing() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    let body =
        status_apply(json!({ "phase": "Running", "conditions": [condition("Ready", "False")] }));
    api.patch_status("x", &apply("a").force(), &Patch::Apply(body.clone()))
        .await
        .unwrap();
    let before = rv(&fake, "x");
    let mut events = api
        .watch(&WatchParams::default(), &before)
        .await
        .unwrap()
        .boxed();
    api.patch_status("x", &apply("a").force(), &Patch::Apply(body))
        .await
        .unwrap();
    assert_eq!(rv(&fake, "x"), before, "no new resourceVersion");
    // The next event is the next real change, not the no-op.
    fake.edit_spec(NS, "x", |s| s.run_id = "2".into());
    match tokio::time::timeout(WAIT, events.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Modified(o)) => assert_eq!(o.spec.run_id, "2"),
        other => panic!("expected the spec change, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// d. Generation, resourceVersion, finalizers
// ---------------------------------------------------------------------------

#[tokio::test]
async fn generation_moves_on_spec_changes_and_on_a_deletion_held_by_a_finalizer() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    let generation =
        |f: &FakeApiServer| f.get_raw(NS, "x").unwrap()["metadata"]["generation"].clone();
    api.patch_status(
        "x",
        &apply("a"),
        &Patch::Apply(status_apply(json!({ "phase": "Running" }))),
    )
    .await
    .unwrap();
    assert_eq!(generation(&fake), 1, "status writes keep the generation");
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "runId": "2" } })),
    )
    .await
    .unwrap();
    assert_eq!(generation(&fake), 2);
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": ["example.com/hold"] } })),
    )
    .await
    .unwrap();
    assert_eq!(generation(&fake), 2, "metadata changes keep the generation");
    fake.delete(NS, "x");
    assert_eq!(
        generation(&fake),
        3,
        "a deletion waiting for finalizers moves it"
    );
}

#[tokio::test]
async fn stale_resource_versions_conflict_and_a_deleting_object_takes_no_new_finalizer() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    let stale = rv(&fake, "x");
    fake.edit_spec(NS, "x", |s| s.run_id = "2".into());
    let e = refusal(
        api.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(
                json!({ "metadata": { "resourceVersion": stale, "finalizers": ["a/b"] } }),
            ),
        )
        .await,
    );
    assert_eq!(e.code, 409);
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": ["a/b"] } })),
    )
    .await
    .unwrap();
    fake.delete(NS, "x");
    let e = refusal(
        api.patch(
            "x",
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "finalizers": ["a/b", "c/d"] } })),
        )
        .await,
    );
    assert_eq!(e.code, 422);
    assert!(e.message.contains("no new finalizers"), "{}", e.message);
    // Removing the last finalizer lets the object go.
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
    )
    .await
    .unwrap();
    assert!(fake.get_raw(NS, "x").is_none());
}

mod creates;
mod events_and_rbac;
mod watches;
