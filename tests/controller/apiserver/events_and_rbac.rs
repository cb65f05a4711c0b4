//! Events as the apiserver validates them, and RBAC to the verb and the namespace.

use super::*;

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
        e.message.starts_with("Event \"x.1\" is invalid: ["),
        "{}",
        e.message
    );
    // Required, and then not a qualified name either: kube-apiserver
    // reports all three.
    let e = refusal(create(&|v| v["reportingController"] = json!("")).await);
    let found = causes(&e);
    let expected = [
        "Required value",
        "Invalid value: \"\": name part must be non-empty",
        "Invalid value: \"\": name part must consist of alphanumeric characters",
    ];
    assert_eq!(found.len(), expected.len(), "{found:?}");
    for ((field, message), want) in found.iter().zip(expected) {
        assert_eq!(field, "reportingController");
        assert!(message.starts_with(want), "{message}");
    }
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
    use controller::FIELD_MANAGER;
    let (client, fake) = FakeApiServer::start();
    let obj = fake.create(NS, "x", spec());
    let api = ubfs(&client);
    controller::add_finalizer(&api, &obj).await.unwrap();
    let stored = fake.get_raw(NS, "x").unwrap();
    let holder = stored["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["fieldsV1"]["f:metadata"]["f:finalizers"].is_object())
        .expect("an entry owns the finalizers");
    assert_eq!(holder["manager"], FIELD_MANAGER);
    assert_eq!(holder["operation"], "Update");
    controller::remove_finalizer(&api, "x").await.unwrap();
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
