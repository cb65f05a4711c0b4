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

// ---------------------------------------------------------------------------
// e. Watches and lists
// ---------------------------------------------------------------------------

#[tokio::test]
async fn watches_send_bookmarks_when_asked_and_close_after_their_timeout() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    let from = rv(&fake, "x");
    let mut with = api
        .watch(&WatchParams::default().timeout(1), &from)
        .await
        .unwrap()
        .boxed();
    let mut without = api
        .watch(&WatchParams::default().disable_bookmarks(), &from)
        .await
        .unwrap()
        .boxed();
    fake.bookmark();
    match tokio::time::timeout(WAIT, with.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Bookmark(b)) => assert_eq!(b.metadata.resource_version, from),
        other => panic!("expected a BOOKMARK, got {other:?}"),
    }
    fake.edit_spec(NS, "x", |s| s.run_id = "2".into());
    match tokio::time::timeout(WAIT, without.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Modified(_)) => {}
        other => panic!("no BOOKMARK without allowWatchBookmarks, got {other:?}"),
    }
    // The server ends the first watch after its timeoutSeconds.
    let rest: Vec<_> = tokio::time::timeout(WAIT, with.collect::<Vec<_>>())
        .await
        .expect("the server closes the watch");
    assert!(!rest.is_empty(), "the change, then a last BOOKMARK");
}

#[tokio::test]
async fn a_watch_from_a_compacted_resource_version_is_gone() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    let old = rv(&fake, "x");
    fake.edit_spec(NS, "x", |s| s.run_id = "2".into());
    // Within history: the change is replayed as it happened.
    let mut replay = api
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, replay.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Modified(o)) => assert_eq!(o.spec.run_id, "2"),
        other => panic!("expected the replayed change, got {other:?}"),
    }
    fake.compact();
    let mut gone = api
        .watch(&WatchParams::default(), &old)
        .await
        .unwrap()
        .boxed();
    match tokio::time::timeout(WAIT, gone.try_next())
        .await
        .unwrap()
        .unwrap()
    {
        Some(WatchEvent::Error(e)) => assert_eq!(e.code, 410),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, gone.try_next())
            .await
            .unwrap()
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn lists_page_and_an_expired_continue_token_is_gone() {
    let (client, fake) = FakeApiServer::start();
    for name in ["a", "b", "c"] {
        fake.create(NS, name, spec());
    }
    let api = ubfs(&client);
    let first = api.list(&ListParams::default().limit(2)).await.unwrap();
    assert_eq!(first.items.len(), 2);
    let token = first.metadata.continue_.clone().expect("a continue token");
    let second = api
        .list(&ListParams::default().limit(2).continue_token(&token))
        .await
        .unwrap();
    assert_eq!(second.items.len(), 1);
    assert!(second.metadata.continue_.is_none());
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );

    // resourceVersion=0 comes from the watch cache, whole, whatever the
    // limit (kube itself never sends the two together).
    let request = http::Request::get(format!(
        "/apis/usage.multica.ai/v1alpha1/namespaces/{NS}/usagebackfills?limit=1&resourceVersion=0"
    ))
    .body(Vec::new())
    .unwrap();
    let cached: kube::core::ObjectList<UsageBackfill> = client.request(request).await.unwrap();
    assert_eq!(cached.items.len(), 3);
    assert!(cached.metadata.continue_.is_none());

    let first = api.list(&ListParams::default().limit(1)).await.unwrap();
    fake.edit_spec(NS, "a", |s| s.run_id = "2".into());
    fake.compact();
    let e = refusal(
        api.list(
            &ListParams::default()
                .limit(1)
                .continue_token(first.metadata.continue_.as_deref().unwrap()),
        )
        .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
}

/// The controller's watches meet 410 Gone after a compaction; it lists
/// again and carries on reconciling.
#[tokio::test]
async fn the_controller_relists_after_410_gone_and_carries_on() {
    let (client, fake) = FakeApiServer::start();
    let ctx = controller::Context::new(client, settings());
    let cancel = tokio_util::sync::CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let run = tokio::spawn(controller::run_controllers(
        ctx,
        Vec::new(),
        2,
        ready.clone(),
        WAIT,
        cancel.clone(),
    ));
    fake.wait_for("the cache to sync", WAIT, |_| {
        ready.load(Ordering::Acquire).then_some(())
    })
    .await;
    // No Secret: the object waits, and the status says for which spec.
    fake.create(NS, "x", spec());
    let observed = |f: &FakeApiServer, g: i64| {
        (f.get(NS, "x")?.status?.observed_generation == g).then_some(())
    };
    fake.wait_for("generation 1 observed", WAIT, |f| observed(f, 1))
        .await;
    let lists_before = list_count(&fake);

    fake.compact();
    fake.close_watches();
    fake.edit_spec(NS, "x", |s| s.run_id = "2".into());
    fake.wait_for("generation 2 observed after a relist", WAIT, |f| {
        observed(f, 2)
    })
    .await;
    let gone = fake
        .requests()
        .into_iter()
        .filter(|r| r.is_watch() && r.resource == "usagebackfills")
        .count();
    assert!(gone >= 2, "the controller watched again");
    assert!(
        list_count(&fake) > lists_before,
        "and listed again after 410 Gone"
    );
    cancel.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
}

fn list_count(fake: &FakeApiServer) -> usize {
    fake.requests()
        .into_iter()
        .filter(|r| {
            r.method == "GET" && r.name.is_none() && !r.is_watch() && r.resource == "usagebackfills"
        })
        .count()
}

// ---------------------------------------------------------------------------
// f. Events
// ---------------------------------------------------------------------------

#[tokio::test]
async fn an_event_under_a_taken_name_is_already_exists() {
    let (client, _fake) = FakeApiServer::start();
    let gvk = kube::core::GroupVersionKind::gvk("events.k8s.io", "v1", "Event");
    let resource = kube::core::ApiResource::from_gvk_with_plural(&gvk, "events");
    let events: Api<DynamicObject> = Api::namespaced_with(client, NS, &resource);
    let event: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": { "name": "x.1" },
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reason": "Testing",
        "action": "Test",
        "type": "Normal",
        "reportingController": "t",
        "reportingInstance": "t",
        "regarding": { "namespace": NS, "name": "x" },
    }))
    .unwrap();
    events.create(&PostParams::default(), &event).await.unwrap();
    let e = refusal(events.create(&PostParams::default(), &event).await);
    assert_eq!((e.code, e.reason.as_str()), (409, "AlreadyExists"));
}

/// Events are validated as the apiserver validates events.k8s.io/v1:
/// required fields, the namespace of the object they regard, and a series
/// update that changes nothing but the series.
#[tokio::test]
async fn an_invalid_event_is_refused_with_its_fields_named() {
    let (client, _fake) = FakeApiServer::start();
    let gvk = kube::core::GroupVersionKind::gvk("events.k8s.io", "v1", "Event");
    let resource = kube::core::ApiResource::from_gvk_with_plural(&gvk, "events");
    let events: Api<DynamicObject> = Api::namespaced_with(client, NS, &resource);
    let event = json!({
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": { "name": "x.1" },
        "eventTime": "2026-01-01T00:00:00.000000Z",
        "reason": "Testing",
        "action": "Test",
        "type": "Normal",
        "note": "first",
        "reportingController": "usage-backfill-operator",
        "reportingInstance": "pod-a",
        "regarding": { "namespace": NS, "name": "x" },
    });
    let create = |edit: &dyn Fn(&mut Value)| {
        let mut v = event.clone();
        edit(&mut v);
        let obj: DynamicObject = serde_json::from_value(v).unwrap();
        let events = events.clone();
        async move { events.create(&PostParams::default(), &obj).await }
    };
    let e = refusal(
        create(&|v| {
            let m = v.as_object_mut().unwrap();
            m.remove("reportingController");
            m.remove("eventTime");
            v["regarding"]["namespace"] = json!("elsewhere");
        })
        .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(
        causes(&e),
        [
            (
                "involvedObject.namespace".to_owned(),
                "Invalid value: \"elsewhere\": does not match event.namespace".to_owned()
            ),
            ("eventTime".to_owned(), "Required value".to_owned())
        ],
        "without an eventTime, the legacy rules apply and the namespaces must agree"
    );
    assert!(
        e.message
            .starts_with("Event.events.k8s.io \"x.1\" is invalid: ["),
        "{}",
        e.message
    );
    let e = refusal(create(&|v| v["reportingController"] = json!("")).await);
    assert_eq!(
        causes(&e),
        [(
            "reportingController".to_owned(),
            "Required value".to_owned()
        )]
    );
    let e = refusal(create(&|v| v["type"] = json!("Error")).await);
    assert_eq!(causes(&e)[0].0, "type");

    create(&|_| {}).await.unwrap();
    // A series update (kube's Recorder publishing a reason again) is not
    // granted: the operator publishes each Event with a Recorder of its
    // own, so it only ever creates.
    let series =
        json!({ "series": { "count": 2, "lastObservedTime": "2026-01-01T00:01:00.000000Z" } });
    let e = refusal(
        events
            .patch("x.1", &PatchParams::default(), &Patch::Merge(&series))
            .await,
    );
    assert_eq!(e.code, 403, "{}", e.message);
}

// ---------------------------------------------------------------------------
// g. RBAC
// ---------------------------------------------------------------------------

#[tokio::test]
async fn what_the_chart_does_not_grant_is_forbidden() {
    let (client, fake) = FakeApiServer::start();
    fake.put_secret(NS, "app-db", "DATABASE_URL", "postgres://u:p@h/db");
    let api = ubfs(&client);
    let obj = UsageBackfill::new("new", spec());
    assert_eq!(
        refusal(api.create(&PostParams::default(), &obj).await).code,
        403
    );
    fake.create(NS, "x", spec());
    assert_eq!(
        refusal(api.delete("x", &Default::default()).await).code,
        403
    );
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), NS);
    assert!(secrets.get("app-db").await.is_ok(), "get is granted");
    let e = refusal(
        secrets
            .patch(
                "app-db",
                &PatchParams::default(),
                &Patch::Merge(json!({ "data": {} })),
            )
            .await,
    );
    assert_eq!(e.code, 403);
    assert!(
        e.message.contains("cannot patch resource \"secrets\""),
        "{}",
        e.message
    );
    // Granted verbs pass.
    api.patch_status(
        "x",
        &apply("a"),
        &Patch::Apply(status_apply(json!({ "phase": "Pending" }))),
    )
    .await
    .unwrap();
}

/// With `watchNamespaces` the chart grants the watch rules in a Role per
/// watched namespace, and the Lease's in the release namespace: a request
/// in any other namespace, or across all of them, is forbidden.
#[tokio::test]
async fn a_namespaced_install_is_denied_outside_its_namespaces() {
    use usage_backfill_testkit::apiserver::rbac::Scope;
    let (client, fake) = FakeApiServer::start();
    fake.set_rbac_scope(Scope::namespaced(&[NS], "ops"));
    fake.create(NS, "x", spec());
    fake.create("other", "y", spec());
    assert!(ubfs(&client).get("x").await.is_ok(), "a watched namespace");
    let other: Api<UsageBackfill> = Api::namespaced(client.clone(), "other");
    let e = refusal(other.get("y").await);
    assert_eq!(e.code, 403);
    assert!(
        e.message
            .ends_with("cannot get resource \"usagebackfills\" in API group \"usage.multica.ai\" in the namespace \"other\""),
        "{}",
        e.message
    );
    let all: Api<UsageBackfill> = Api::all(client.clone());
    assert_eq!(refusal(all.list(&ListParams::default()).await).code, 403);
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), NS);
    let lease = serde_json::from_value(json!({ "metadata": { "name": "l" }, "spec": {} })).unwrap();
    assert_eq!(
        refusal(leases.create(&PostParams::default(), &lease).await).code,
        403,
        "the Lease Role is in the release namespace only"
    );
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> = Api::namespaced(client, "ops");
    leases.create(&PostParams::default(), &lease).await.unwrap();
}

/// A namespaced controller works within its Roles: it watches and writes
/// per namespace, never across all of them.
#[tokio::test]
async fn a_namespaced_controller_stays_within_its_roles() {
    use usage_backfill_testkit::apiserver::rbac::Scope;
    let (client, fake) = FakeApiServer::start();
    fake.set_rbac_scope(Scope::namespaced(&[NS], "ops"));
    let ctx = controller::Context::new(client, settings());
    let cancel = tokio_util::sync::CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let run = tokio::spawn(controller::run_controllers(
        ctx,
        vec![NS.to_owned()],
        2,
        ready.clone(),
        WAIT,
        cancel.clone(),
    ));
    fake.wait_for("the cache to sync", WAIT, |_| {
        ready.load(Ordering::Acquire).then_some(())
    })
    .await;
    fake.create(NS, "x", spec());
    fake.wait_for("a status", WAIT, |f| f.get(NS, "x")?.status.map(drop))
        .await;
    cancel.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    let denied: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.code == 403)
        .collect();
    assert!(denied.is_empty(), "{denied:?}");
}

/// Finalizer patches carry the operator's field manager, as its status
/// applies do: managedFields name the operator as the finalizer's holder.
#[tokio::test]
async fn finalizer_patches_carry_the_operators_field_manager() {
    use controller::writes::{self, FIELD_MANAGER};
    let (client, fake) = FakeApiServer::start();
    let obj = fake.create(NS, "x", spec());
    let api = ubfs(&client);
    writes::add_finalizer(&api, &obj).await.unwrap();
    let stored = fake.get_raw(NS, "x").unwrap();
    let holder = stored["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["fieldsV1"]["f:metadata"]["f:finalizers"].is_object())
        .expect("an entry owns the finalizers");
    assert_eq!(holder["manager"], FIELD_MANAGER);
    assert_eq!(holder["operation"], "Update");
    writes::remove_finalizer(&api, "x").await.unwrap();
    let patches: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.subresource.is_none())
        .collect();
    assert_eq!(patches.len(), 2);
    for p in &patches {
        assert_eq!(p.field_manager(), Some(FIELD_MANAGER), "{}", p.raw_body);
    }
}

// ---------------------------------------------------------------------------
// h. Creates, and refusals on demand
// ---------------------------------------------------------------------------

/// The status subresource makes the apiserver drop `status` on a create
/// (only `status` writes set it); reads default it as the schema says.
#[tokio::test]
async fn a_create_keeps_no_status() {
    let (_client, fake) = FakeApiServer::start();
    fake.try_create_object(json!({
        "apiVersion": "usage.multica.ai/v1alpha1",
        "kind": "UsageBackfill",
        "metadata": { "name": "x", "namespace": NS },
        "spec": { "database": external() },
        "status": { "phase": "Succeeded" },
    }))
    .unwrap();
    let stored = fake.get_raw(NS, "x").unwrap();
    // What was sent is gone; what a read shows is the schema's default.
    assert_eq!(
        stored["status"],
        json!({ "observedGeneration": -1 }),
        "{stored}"
    );
    assert_eq!(stored["metadata"]["generation"], 1);
}

/// [`FakeApiServer::refuse_writes`] answers as kube-apiserver refuses a
/// write to an object stored under older rules: a Status of kind Status,
/// reason Invalid, the causes in details, and nothing stored.
#[tokio::test]
async fn refused_writes_get_the_apiservers_422() {
    use usage_backfill_testkit::apiserver::Refused;
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let before = fake.get_raw(NS, "x").unwrap();
    let cause = format!(
        "Invalid value: \"object\": {}",
        rules::MONTHS_BACK_ONLY_ALWAYS.message()
    );
    fake.refuse_writes(Refused::Status, 1, &[("spec", &cause)]);
    let api = ubfs(&client);
    let e = refusal(
        api.patch_status(
            "x",
            &apply("m"),
            &Patch::Apply(status_apply(json!({ "phase": "Pending" }))),
        )
        .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(causes(&e), [("spec".to_owned(), cause.clone())]);
    assert_eq!(
        e.message,
        format!("UsageBackfill.usage.multica.ai \"x\" is invalid: spec: {cause}")
    );
    let details = e.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("x", "UsageBackfill")
    );
    assert_eq!(details.causes[0].reason, "FieldValueInvalid");
    assert_eq!(fake.get_raw(NS, "x").unwrap(), before, "nothing stored");
    // Only as many as asked, only of the kind asked.
    api.patch_status(
        "x",
        &apply("m"),
        &Patch::Apply(status_apply(json!({ "phase": "Pending" }))),
    )
    .await
    .unwrap();
}

/// The progress records: server-side apply creates and updates, drops what
/// its manager stops sending and keeps other managers' fields; the
/// apiserver's validation; get and delete; nothing else is granted.
#[tokio::test]
async fn config_maps_are_applied_read_and_deleted_as_the_apiserver_does() {
    use k8s_openapi::api::core::v1::ConfigMap;
    let (client, fake) = FakeApiServer::start();
    let api: Api<ConfigMap> = Api::namespaced(client, NS);
    let cm = |name: &str, data: Value| {
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": name, "labels": { "app.kubernetes.io/component": "x" } },
            "data": data,
        })
    };
    let data = |c: &ConfigMap| c.data.clone().unwrap_or_default();
    let created = api
        .patch(
            "rec",
            &apply("op").force(),
            &Patch::Apply(cm("rec", json!({ "a": "1", "b": "2" }))),
        )
        .await
        .unwrap();
    assert_eq!(data(&created).len(), 2);
    assert!(created.metadata.uid.is_some());
    // Another manager's key stays when "op" applies without it; "op"'s own
    // key it stops sending goes.
    api.patch(
        "rec",
        &apply("other"),
        &Patch::Apply(cm("rec", json!({ "c": "3" }))),
    )
    .await
    .unwrap();
    let updated = api
        .patch(
            "rec",
            &apply("op").force(),
            &Patch::Apply(cm("rec", json!({ "a": "10" }))),
        )
        .await
        .unwrap();
    assert_eq!(
        data(&updated),
        [("a", "10"), ("c", "3")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .into()
    );
    // Changing another manager's field conflicts unless forced.
    let e = refusal(
        api.patch(
            "rec",
            &apply("op"),
            &Patch::Apply(cm("rec", json!({ "a": "10", "c": "4" }))),
        )
        .await,
    );
    assert_eq!(e.code, 409);
    // What the apiserver refuses.
    let e = refusal(
        api.patch(
            "rec",
            &apply("op").force(),
            &Patch::Apply(cm("other-name", json!({}))),
        )
        .await,
    );
    assert_eq!(e.code, 400, "{}", e.message);
    let e = refusal(
        api.patch(
            "rec",
            &apply("op").force(),
            &Patch::Apply(cm("rec", json!({ "not/a key": "x" }))),
        )
        .await,
    );
    assert_eq!(
        (e.code, e.reason.as_str()),
        (422, "Invalid"),
        "{}",
        e.message
    );
    let e = refusal(
        api.patch(
            "rec",
            &apply("op").force(),
            &Patch::Apply(cm("rec", json!({ "n": 7 }))),
        )
        .await,
    );
    assert_eq!(e.code, 400, "{}", e.message);
    let big = "x".repeat(1024 * 1024);
    let e = refusal(
        api.patch(
            "rec",
            &apply("op").force(),
            &Patch::Apply(cm("rec", json!({ "big": big }))),
        )
        .await,
    );
    assert_eq!(e.code, 422, "{}", e.message);
    let e = refusal(
        api.patch(
            "Not_A_Name",
            &apply("op").force(),
            &Patch::Apply(cm("Not_A_Name", json!({}))),
        )
        .await,
    );
    assert_eq!(e.code, 422, "{}", e.message);
    assert_eq!(
        data(&api.get("rec").await.unwrap())
            .get("a")
            .map(String::as_str),
        Some("10"),
        "refused writes changed nothing"
    );
    // Not granted: list, watch, update.
    assert_eq!(refusal(api.list(&ListParams::default()).await).code, 403);
    let stored = api.get("rec").await.unwrap();
    assert_eq!(
        refusal(api.replace("rec", &PostParams::default(), &stored).await).code,
        403
    );
    api.delete("rec", &Default::default()).await.unwrap();
    assert!(fake.config_map(NS, "rec").is_none());
    assert_eq!(
        refusal(api.delete("rec", &Default::default()).await).code,
        404
    );
    assert!(api.get_opt("rec").await.unwrap().is_none());
}

// ---------------------------------------------------------------------------
// Finding 3: a run's writes land only on the object the run is for
// ---------------------------------------------------------------------------

/// Helm or Argo CD recreate a hook object under the same name: a write
/// meant for the old object must not land on the new one. The guard is
/// the UID checked on a read plus that read's resourceVersion sent as a
/// precondition (the apiserver ignores a UID sent to `status`).
#[tokio::test]
async fn a_runs_writes_land_only_on_the_object_with_its_uid() {
    use controller::writes::{self, Guarded};
    let (client, fake) = FakeApiServer::start();
    let api = ubfs(&client);
    let old = fake.create(NS, "hook", spec());
    let uid = old.metadata.uid.clone().unwrap();
    let running = usage_backfill_api::UsageBackfillStatus {
        phase: Some(usage_backfill_api::Phase::Running),
        ..Default::default()
    };
    // Other changes to the same object do not stop the run's writes.
    fake.edit_spec(NS, "hook", |s| s.run_id = "2".into());
    assert_eq!(
        writes::apply_status_of(&api, "hook", &uid, &running, &mut None)
            .await
            .unwrap(),
        Guarded::Written
    );
    assert_eq!(
        fake.get_raw(NS, "hook").unwrap()["status"]["phase"],
        "Running"
    );

    // The precondition the guard relies on: an apply carrying a stale
    // resourceVersion is refused.
    let stale = rv(&fake, "hook");
    fake.edit_spec(NS, "hook", |s| s.run_id = "3".into());
    let mut body = status_apply(json!({ "phase": "Failed" }));
    body["metadata"] = json!({ "resourceVersion": stale });
    let e = refusal(
        api.patch_status("hook", &apply("a").force(), &Patch::Apply(body))
            .await,
    );
    assert_eq!(e.code, 409);

    // Deleted and created again under the name: the old run writes nothing.
    api.patch(
        "hook",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": [writes::FINALIZER] } })),
    )
    .await
    .unwrap();
    fake.delete(NS, "hook");
    // Held by the finalizer, being deleted: no status is written to it.
    assert_eq!(
        writes::apply_status_of(&api, "hook", &uid, &running, &mut None)
            .await
            .unwrap(),
        Guarded::Deleting
    );
    api.patch(
        "hook",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": null } })),
    )
    .await
    .unwrap();
    assert!(fake.get_raw(NS, "hook").is_none());
    assert_eq!(
        writes::apply_status_of(&api, "hook", &uid, &running, &mut None)
            .await
            .unwrap(),
        Guarded::Gone
    );
    fake.create(NS, "hook", spec());
    api.patch(
        "hook",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": [writes::FINALIZER] } })),
    )
    .await
    .unwrap();
    let before = fake.get_raw(NS, "hook").unwrap();
    assert_eq!(
        writes::apply_status_of(&api, "hook", &uid, &running, &mut None)
            .await
            .unwrap(),
        Guarded::Recreated
    );
    assert!(
        !writes::remove_finalizer_of(&api, "hook", Some(&uid), &mut None)
            .await
            .unwrap(),
        "the new object's finalizer is not the old run's to remove"
    );
    assert_eq!(
        fake.get_raw(NS, "hook").unwrap(),
        before,
        "the new object is untouched"
    );
}

/// Finding 4: an explicit null in an optional enum (`tls.mode`,
/// `status.phase`) is accepted, as absent.
#[tokio::test]
async fn an_explicit_null_in_an_optional_enum_is_accepted() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "x", spec());
    let api = ubfs(&client);
    api.patch(
        "x",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "database": { "tls": { "mode": null } } } })),
    )
    .await
    .unwrap();
    api.patch_status(
        "x",
        &apply("a"),
        &Patch::Apply(status_apply(
            json!({ "phase": null, "result": null, "skipped": null }),
        )),
    )
    .await
    .unwrap();
    let v = fake.get_raw(NS, "x").unwrap();
    assert!(v["status"].get("phase").is_none(), "{v}");
    assert!(v["status"].get("result").is_none(), "{v}");
}
