//! Creates, refusals on demand, and what a run writes to.

use super::*;

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
    use controller::Guarded;
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
        controller::apply_status_of(&api, "hook", &uid, &running, &mut None)
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
        &Patch::Merge(json!({ "metadata": { "finalizers": [controller::FINALIZER] } })),
    )
    .await
    .unwrap();
    fake.delete(NS, "hook");
    // Held by the finalizer, being deleted: no status is written to it.
    assert_eq!(
        controller::apply_status_of(&api, "hook", &uid, &running, &mut None)
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
        controller::apply_status_of(&api, "hook", &uid, &running, &mut None)
            .await
            .unwrap(),
        Guarded::Gone
    );
    fake.create(NS, "hook", spec());
    api.patch(
        "hook",
        &PatchParams::default(),
        &Patch::Merge(json!({ "metadata": { "finalizers": [controller::FINALIZER] } })),
    )
    .await
    .unwrap();
    let before = fake.get_raw(NS, "hook").unwrap();
    assert_eq!(
        controller::apply_status_of(&api, "hook", &uid, &running, &mut None)
            .await
            .unwrap(),
        Guarded::Recreated
    );
    assert!(
        !controller::remove_finalizer_of(&api, "hook", Some(&uid), &mut None)
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
