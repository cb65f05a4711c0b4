//! End to end against a real cluster (kind, k3d, anything with a
//! kubeconfig). Opt-in: runs only with `USAGE_BACKFILL_E2E=1`; otherwise
//! it returns at once, saying why. Compiled always, so it never rots.
//!
//! It applies the CRD (server-side), creates a throwaway namespace, a
//! Secret and a UsageBackfill, runs the controller in this process and
//! waits for Ready=True at the current generation, then checks the status
//! manager, the Events and that deleting the object lets it go.
//!
//! The controller runs here, not in the cluster, so the database must be
//! reachable from this machine: by default the test starts its own
//! throwaway PostgreSQL with the rollup fixture and some history (needs the
//! PostgreSQL server binaries, as every other test); set
//! `USAGE_BACKFILL_E2E_DATABASE_URL` to use a database of yours instead
//! (its rollup schema installed; it is backfilled for real).
//!
//! ```sh
//! kind create cluster --name ubf-e2e
//! USAGE_BACKFILL_E2E=1 cargo test --test e2e_cluster -- --nocapture
//! kind delete cluster --name ubf-e2e
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use usage_backfill_api::{
    self as api, ConditionStatus, ConditionType, Phase, UsageBackfill, UsageBackfillSpec,
};
use usage_backfill_controller::{self as controller, Context, Settings, writes};
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_testkit as testkit;

const ENABLE: &str = "USAGE_BACKFILL_E2E";
const DATABASE_URL: &str = "USAGE_BACKFILL_E2E_DATABASE_URL";
const MANAGER: &str = "usage-backfill-e2e";
const TIMEOUT: Duration = Duration::from_secs(180);

/// Polls `check` every 500 ms until it gives `Some`, or panics after `TIMEOUT`.
async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let polled = tokio::time::timeout(TIMEOUT, async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    polled.unwrap_or_else(|_| panic!("timed out after {TIMEOUT:?} waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_usage_backfill_becomes_ready_in_a_real_cluster() {
    if std::env::var(ENABLE).as_deref() != Ok("1") {
        eprintln!(
            "skipping the real-cluster end-to-end test: set {ENABLE}=1 (and point KUBECONFIG at a disposable cluster, e.g. kind) to run it"
        );
        return;
    }
    let client = Client::try_default()
        .await
        .expect("a kubeconfig (KUBECONFIG or ~/.kube/config) for the e2e cluster");

    // The CRD, applied like `kubectl apply --server-side`, and established.
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = api::crd();
    crds.patch(
        &crd.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("applying the CRD");
    eventually("the CRD to be established", || {
        let crds = crds.clone();
        let name = crd.name_any();
        async move {
            let c = crds.get(&name).await.ok()?;
            let established = c
                .status?
                .conditions?
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established.then_some(())
        }
    })
    .await;

    // A throwaway namespace.
    let ns = format!("ubf-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .expect("creating the test namespace");

    // The database: yours, or a throwaway one with history.
    let (url, _db) = match std::env::var(DATABASE_URL) {
        Ok(url) if !url.trim().is_empty() => (url, None),
        _ => {
            let db = testkit::fresh_database().await;
            let pg = db.client().await;
            let spec = HistorySpec {
                rows: 500,
                months: 3,
                ..HistorySpec::default()
            };
            fixture::generate(&pg, &spec).await.unwrap();
            (db.url().to_owned(), Some(db))
        }
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "app-db"},
                "stringData": {"DATABASE_URL": url},
            }))
            .unwrap(),
        )
        .await
        .expect("creating the Secret");

    let objects: Api<UsageBackfill> = Api::namespaced(client.clone(), &ns);
    let mut spec = UsageBackfillSpec::new("app-db");
    spec.run_id = "e2e".into();
    objects
        .create(
            &PostParams::default(),
            &UsageBackfill::new("backfill", spec),
        )
        .await
        .expect("creating the UsageBackfill");
    // Before any controller looked at it, the apiserver defaults the missing
    // status, so kstatus cannot call the fresh object Current.
    let fresh = objects
        .get("backfill")
        .await
        .expect("reading the UsageBackfill");
    assert_eq!(
        fresh.status.map(|s| s.observed_generation),
        Some(-1),
        "a fresh object reads observedGeneration -1"
    );

    // The controller, in this process, watching the test namespace only.
    let ctx = Context::new(client.clone(), Settings::default());
    let cancel = tokio_util::sync::CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let running = tokio::spawn(controller::run_controllers(
        ctx.clone(),
        vec![ns.clone()],
        2,
        ready.clone(),
        Duration::from_secs(25),
        cancel.clone(),
    ));

    let obj = eventually("Ready=True at the current generation", || {
        let objects = objects.clone();
        async move {
            let o = objects.get("backfill").await.ok()?;
            let s = o.status.as_ref()?;
            let ready = s.condition_status(ConditionType::Ready) == Some(ConditionStatus::True);
            (ready && Some(s.observed_generation) == o.metadata.generation).then_some(o)
        }
    })
    .await;
    assert!(ready.load(Ordering::Acquire), "/readyz would say ready");
    let status = obj.status.clone().unwrap();
    eprintln!(
        "status:\n{}",
        serde_saphyr::to_string(&status).unwrap_or_default()
    );
    assert_eq!(status.phase, Some(Phase::Succeeded));
    assert_eq!(status.run_id.as_deref(), Some("e2e"));
    assert!(status.condition(ConditionType::Stalled).is_none());
    // The status belongs to the operator's field manager (server-side apply).
    let managers: Vec<String> = obj
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == writes::FIELD_MANAGER),
        "{managers:?}"
    );
    assert!(
        !writes::has_finalizer(&obj),
        "no finalizer once the run is over"
    );
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> = events
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("backfill"))
        .filter_map(|e| e.reason)
        .collect();
    assert!(reasons.iter().any(|r| r == "Started"), "{reasons:?}");

    // Deleting it lets it go.
    objects
        .delete("backfill", &DeleteParams::default())
        .await
        .unwrap();
    eventually("the UsageBackfill to be gone", || {
        let objects = objects.clone();
        async move {
            objects
                .get_opt("backfill")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;

    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(60), running)
        .await
        .expect("the controller stops")
        .unwrap();
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
