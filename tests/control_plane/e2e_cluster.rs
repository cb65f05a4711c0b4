//! End to end against a real Kubernetes API server: by default the
//! throwaway etcd and kube-apiserver of the test kit
//! (`usage_backfill_testkit::cluster`, built by `tests/cluster/build.sh`),
//! on the oldest and the newest Kubernetes release the project claims;
//! unbuilt binaries are a failure that says how to build them. The same
//! scenario runs against any disposable cluster (kind, k3d, anything with
//! a kubeconfig whose user may impersonate, e.g. cluster-admin) as an
//! ignored test. The tests at the bottom (the RBAC built from the rules
//! file, the impersonation, the replicas and the cleanup guard against the
//! fake API server) need no server.
//!
//! Once in cluster-wide mode, then in namespaced mode, it:
//! - installs the chart's RBAC (built from `crates/testkit/src/rbac-rules.yaml`,
//!   which `.ci/chart-check` proves equal to the rendered chart) for a
//!   ServiceAccount in an operator namespace (rule sets named `*lease*` in
//!   the leader-election Role, the others, except [`OPT_IN_RULE_SETS`], in
//!   the operator's ClusterRole or Role), and runs two controller
//!   replicas in this process as that ServiceAccount, by impersonation, with
//!   leader election on: every call the chart does not grant fails;
//! - checks that only the Lease holder runs a backfill, stops (SIGTERM-like)
//!   the leader mid-run, and sees the other replica take over and finish
//!   the same attempt, the rollup correct;
//! - deletes a second UsageBackfill mid-run: the run is cancelled, lock 4246
//!   released, nothing stamped, the finalizer removed, the object gone.
//!
//! Every object it creates is named per run and labelled
//! `usage.multica.ai/e2e=<run>`; a guard deletes them (and the CRD, if this
//! test installed it) even when an assertion fails. In cluster-wide mode the
//! controller sees every UsageBackfill of the cluster: use a disposable one.
//! (The test kit's control plane has no controller-manager: a deleted
//! namespace stays Terminating there, harmlessly, until it is removed.)
//!
//! The controllers run here, not in the cluster, so the databases are the
//! test kit's throwaway PostgreSQL (or the server of its `DATABASE_URL`),
//! with generated history, as in every other test.
//!
//! ```sh
//! bash tests/cluster/build.sh                       # once per machine
//! cargo test --test control_plane                   # on the built control planes
//! kind create cluster --name ubf-e2e                # or on a cluster of your own:
//! cargo test --test control_plane e2e_cluster -- --ignored --nocapture
//! kind delete cluster --name ubf-e2e
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::authentication::v1::SelfSubjectReview;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use testkit::cluster::ControlPlane;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use usage_backfill_api::{
    self as api, BackfillResult, ConditionStatus, ConditionType, Phase, UsageBackfill,
    UsageBackfillSpec, UsageBackfillStatus,
};
use usage_backfill_controller::LEASE_NAME;
use usage_backfill_controller::{self as controller, LeaseSettings, Settings};
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_testkit::{self as testkit, on_both_versions};

const MANAGER: &str = "usage-backfill-e2e";
/// Every object this test creates carries it, valued with the run's name.
const RUN_LABEL: &str = "usage.multica.ai/e2e";
/// The chart's default name for its ServiceAccount, Roles and bindings.
const RELEASE: &str = "usage-backfill-operator";
const TIMEOUT: Duration = Duration::from_secs(180);
/// How long the cleanup may take before it gives up (and says what is left).
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);
const RULES_YAML: &str = include_str!("../../crates/testkit/src/rbac-rules.yaml");
/// Rule sets of the rules file that the default install does not grant
/// (opt-ins); every other set is granted, see [`Grant::of`].
const OPT_IN_RULE_SETS: &[&str] = &["secretWatchRules"];

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

on_both_versions!(the_operator_runs_as_its_service_account);

/// On a control plane of the test kit of its own (the scenario deletes
/// the CRD it installed).
async fn the_operator_runs_as_its_service_account(version: &str) {
    let plane = ControlPlane::start(version).await;
    end_to_end(plane.config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs a disposable cluster: point KUBECONFIG at one and run with --ignored"]
async fn the_operator_runs_as_its_service_account_in_a_real_cluster() {
    let admin_config = kube::Config::infer()
        .await
        .expect("a kubeconfig (KUBECONFIG or ~/.kube/config) for the e2e cluster");
    end_to_end(admin_config).await;
}

async fn end_to_end(admin_config: kube::Config) {
    let admin = Client::try_from(admin_config.clone()).expect("a client for the e2e cluster");
    let run = run_name();
    eprintln!("e2e run {run}: its objects are labelled {RUN_LABEL}={run}");

    // The CRD, applied like `kubectl apply --server-side`; deleted at the
    // end only when it was not there before.
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let crd = api::crd();
    let mut crd_guard = Cleanup::new(admin_config.clone());
    let existed = crds
        .get_opt(&crd.name_any())
        .await
        .expect("reading the CRD")
        .is_some();
    if !existed {
        crd_guard.crd = Some(crd.name_any());
    }
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

    for scope in [Scope::ClusterWide, Scope::Namespaced] {
        eprintln!("e2e run {run}: {scope:?} mode");
        scenario(&admin, &admin_config, &run, scope).await;
    }
    drop(crd_guard);
}

/// Which way the chart is installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scope {
    /// `watchNamespaces: []`: a ClusterRole, the controller watches all.
    ClusterWide,
    /// `watchNamespaces: [app]`: a Role in the watched namespace only.
    Namespaced,
}

/// A name unique to this run, usable in DNS-1123 labels.
fn run_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .subsec_nanos();
    format!("{:08x}", nanos ^ std::process::id().rotate_left(16))
}

/// History walked slowly (one slice per month, a second between slices):
/// a run that lasts about 25 s, long enough to act on it mid-run.
fn slow_history() -> HistorySpec {
    HistorySpec {
        rows: 500,
        months: 24,
        ..HistorySpec::default()
    }
}
const SLEEP_BETWEEN_SLICES: &str = "1s";

async fn scenario(admin: &Client, admin_config: &kube::Config, run: &str, scope: Scope) {
    let tag = match scope {
        Scope::ClusterWide => format!("{run}-cw"),
        Scope::Namespaced => format!("{run}-ns"),
    };
    let op_ns = format!("ubf-e2e-{tag}-op");
    let app_ns = format!("ubf-e2e-{tag}-app");
    let mut guard = Cleanup::new(admin_config.clone());

    // Namespaces, and the chart's ServiceAccount and RBAC.
    let namespaces: Api<Namespace> = Api::all(admin.clone());
    for ns in [&op_ns, &app_ns] {
        guard.namespaces.push(ns.clone());
        namespaces
            .create(
                &PostParams::default(),
                &Namespace {
                    metadata: meta(ns, None, run),
                    ..Namespace::default()
                },
            )
            .await
            .unwrap_or_else(|e| panic!("creating namespace {ns}: {e}"));
    }
    Api::<ServiceAccount>::namespaced(admin.clone(), &op_ns)
        .create(
            &PostParams::default(),
            &ServiceAccount {
                metadata: meta(RELEASE, Some(&op_ns), run),
                ..ServiceAccount::default()
            },
        )
        .await
        .expect("creating the ServiceAccount");
    let rbac = Rbac::build(&rule_sets(), scope, &op_ns, &app_ns, &tag, run);
    guard.cluster_rbac.extend(rbac.cluster_names());
    rbac.install(admin).await;

    // The replicas' identity: the ServiceAccount, as its token would say.
    let sa_config = impersonating(admin_config, &op_ns, RELEASE);
    let sa = Client::try_from(sa_config.clone()).expect("an impersonating client");
    let review = Api::<SelfSubjectReview>::all(sa.clone())
        .create(&PostParams::default(), &SelfSubjectReview::default())
        .await
        .expect("a SelfSubjectReview (Kubernetes 1.28 or later)");
    let username = review
        .status
        .and_then(|s| s.user_info)
        .and_then(|u| u.username);
    assert_eq!(
        username.as_deref(),
        Some(format!("system:serviceaccount:{op_ns}:{RELEASE}").as_str()),
        "the replicas run as the chart's ServiceAccount"
    );
    // RBAC reaches the authorizer's cache a moment after it is created.
    eventually("the ServiceAccount to read UsageBackfills", || {
        let objects: Api<UsageBackfill> = Api::namespaced(sa.clone(), &app_ns);
        async move { objects.list(&ListParams::default()).await.ok().map(|_| ()) }
    })
    .await;
    assert_forbidden(
        Api::<Pod>::namespaced(sa.clone(), &app_ns)
            .list(&ListParams::default())
            .await,
        "listing Pods",
    );
    if scope == Scope::Namespaced {
        assert_forbidden(
            Api::<UsageBackfill>::all(sa.clone())
                .list(&ListParams::default())
                .await,
            "listing UsageBackfills of every namespace",
        );
    }

    // Two databases with history, and their Secrets.
    let (handover_db, handover_pg) = testkit::database_with(&slow_history()).await;
    let (doomed_db, doomed_pg) = testkit::database_with(&slow_history()).await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &app_ns);
    for (name, url) in [
        ("db-handover", handover_db.url()),
        ("db-doomed", doomed_db.url()),
    ] {
        let mut secret: Secret = serde_json::from_value(json!({
            "stringData": {"DATABASE_URL": url},
        }))
        .unwrap();
        secret.metadata = meta(name, Some(&app_ns), run);
        secrets
            .create(&PostParams::default(), &secret)
            .await
            .expect("creating a Secret");
    }
    let objects: Api<UsageBackfill> = Api::namespaced(admin.clone(), &app_ns);
    // Outside the watched namespace, the namespaced controller never sees it.
    let bystander = match scope {
        Scope::Namespaced => {
            let b = create(admin, &op_ns, "bystander", "db-handover", run).await;
            Some(b)
        }
        Scope::ClusterWide => None,
    };

    // Before any controller looked at it, the apiserver defaults the missing
    // status, so kstatus cannot call the fresh object Current.
    create(admin, &app_ns, "handover", "db-handover", run).await;
    let fresh = objects.get("handover").await.expect("reading it");
    assert_eq!(
        fresh.status.map(|s| s.observed_generation),
        Some(-1),
        "a fresh object reads observedGeneration -1"
    );

    // Two replicas, each with its /metrics, under leader election.
    let mut replicas = [
        Replica::start(&sa_config, scope, &op_ns, &app_ns, &format!("{tag}-a")),
        Replica::start(&sa_config, scope, &op_ns, &app_ns, &format!("{tag}-b")),
    ];
    guard
        .replicas
        .extend(replicas.iter().map(|r| r.stop.clone()));
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &op_ns);
    let leader = eventually("a leader, serving as such", || {
        let (leases, replicas) = (leases.clone(), &replicas);
        async move {
            let holder = lease_holder(&leases).await?;
            let i = replicas.iter().position(|r| r.identity == holder)?;
            let leads = replicas[i].metric("usage_backfill_leader").await? == 1.0;
            leads.then_some(i)
        }
    })
    .await;
    let standby = 1 - leader;

    // The backfill, made before any controller runs: only the Lease holder runs it.
    wait_running(&objects, "handover").await;
    for _ in 0..4 {
        let runs = |i: usize| replicas[i].metric("usage_backfill_runs_active");
        assert_eq!(runs(leader).await, Some(1.0), "the leader runs it");
        assert_eq!(runs(standby).await, Some(0.0), "the standby does not");
        assert_eq!(
            replicas[standby].metric("usage_backfill_leader").await,
            Some(0.0)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(
        lease_holder(&leases).await.as_deref(),
        Some(replicas[leader].identity.as_str())
    );
    let locks = testkit::lock_4246(&handover_pg).await;
    assert!(
        locks.len() == 1 && locks[0].1,
        "one session holds lock 4246: {locks:?}"
    );

    // The leader stops mid-run (as on SIGTERM): its run is cancelled with
    // the cursor saved, the Lease released; the standby takes over and
    // finishes the same attempt.
    replicas[leader].stop().await;
    let new_leader = &replicas[standby];
    eventually("the standby to hold the Lease", || {
        let leases = leases.clone();
        async move { (lease_holder(&leases).await? == new_leader.identity).then_some(()) }
    })
    .await;
    let done = eventually("Ready=True at the current generation, no finalizer", || {
        let objects = objects.clone();
        async move {
            let o = objects.get("handover").await.ok()?;
            let s = o.status.as_ref()?;
            let ready = s.condition_status(ConditionType::Ready) == Some(ConditionStatus::True);
            let current = Some(s.observed_generation) == o.metadata.generation;
            (ready && current && !controller::has_finalizer(&o)).then_some(o)
        }
    })
    .await;
    let status = done.status.clone().unwrap();
    eprintln!(
        "status after the handover:\n{}",
        serde_saphyr::to_string(&status).unwrap_or_default()
    );
    assert_eq!(status.phase, Some(Phase::Succeeded));
    assert_eq!(status.result, Some(BackfillResult::Backfilled));
    assert_eq!(
        status.attempts,
        Some(1),
        "a new leader is not a new attempt"
    );
    assert_eq!(status.slices_processed, status.slices_total);
    assert!(status.condition(ConditionType::Stalled).is_none());
    assert_eq!(
        new_leader
            .metric("usage_backfill_runs_total{outcome=\"backfilled\"}")
            .await,
        Some(1.0),
        "the new leader finished it"
    );
    testkit::engine::assert_correct(&handover_pg).await;
    assert!(testkit::lock_4246(&handover_pg).await.is_empty());
    // The status belongs to the operator's field manager (server-side apply).
    let managers: Vec<String> = done
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.subresource.as_deref() == Some("status"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.iter().any(|m| m == controller::FIELD_MANAGER),
        "{managers:?}"
    );
    let reasons = event_reasons(admin, &app_ns, "handover").await;
    assert!(reasons.iter().any(|r| r == "Started"), "{reasons:?}");

    // Deleted mid-run: the finalizer path cancels the run (lock released,
    // nothing stamped), then lets the object go.
    let watermark = fixture::watermark(&doomed_pg).await.unwrap();
    create(admin, &app_ns, "doomed", "db-doomed", run).await;
    wait_running(&objects, "doomed").await;
    let locks = testkit::lock_4246(&doomed_pg).await;
    assert!(
        locks.len() == 1 && locks[0].1,
        "the run holds lock 4246: {locks:?}"
    );
    let running = objects.get("doomed").await.unwrap();
    assert!(
        controller::has_finalizer(&running),
        "a run holds a finalizer"
    );
    objects
        .delete("doomed", &DeleteParams::default())
        .await
        .expect("deleting it");
    eventually("the deleted UsageBackfill to be gone", || {
        let objects = objects.clone();
        async move {
            objects
                .get_opt("doomed")
                .await
                .ok()?
                .is_none()
                .then_some(())
        }
    })
    .await;
    assert!(
        testkit::lock_4246(&doomed_pg).await.is_empty(),
        "lock 4246 released before the finalizer went"
    );
    assert_eq!(
        fixture::watermark(&doomed_pg).await.unwrap(),
        watermark,
        "a cancelled run stamps nothing"
    );
    assert_eq!(
        new_leader
            .metric("usage_backfill_runs_total{outcome=\"cancelled\"}")
            .await,
        Some(1.0),
        "the run was cancelled"
    );
    assert_eq!(
        new_leader.metric("usage_backfill_runs_active").await,
        Some(0.0)
    );

    if let Some(b) = bystander {
        let b = Api::<UsageBackfill>::namespaced(admin.clone(), &op_ns)
            .get(&b.name_any())
            .await
            .unwrap();
        assert_eq!(
            b.status.as_ref().map(|s| s.observed_generation),
            Some(-1),
            "an unwatched namespace is left alone"
        );
        assert!(!controller::has_finalizer(&b));
    }

    // The last replica stops cleanly and releases the Lease.
    replicas[standby].stop().await;
    assert_eq!(lease_holder(&leases).await, None, "the Lease is released");
    drop(guard);
}

/// Standard metadata of the objects this test creates.
fn meta(name: &str, namespace: Option<&str>, run: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(Into::into),
        labels: Some([(RUN_LABEL.to_owned(), run.to_owned())].into()),
        ..ObjectMeta::default()
    }
}

/// Creates UsageBackfill `name`, reading Secret `secret`, walked slowly.
async fn create(admin: &Client, ns: &str, name: &str, secret: &str, run: &str) -> UsageBackfill {
    let mut spec = UsageBackfillSpec::new(secret);
    spec.run_id = format!("e2e-{run}");
    spec.sleep_between_slices = SLEEP_BETWEEN_SLICES.into();
    let mut object = UsageBackfill::new(name, spec);
    object.metadata.labels = Some([(RUN_LABEL.to_owned(), run.to_owned())].into());
    Api::<UsageBackfill>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &object)
        .await
        .unwrap_or_else(|e| panic!("creating UsageBackfill {ns}/{name}: {e}"))
}

async fn wait_running(objects: &Api<UsageBackfill>, name: &str) -> UsageBackfillStatus {
    eventually(&format!("{name} Running, a slice done"), || {
        let objects = objects.clone();
        async move {
            let s = objects.get(name).await.ok()?.status?;
            (s.phase == Some(Phase::Running) && s.slices_processed? >= 1).then_some(s)
        }
    })
    .await
}

async fn lease_holder(leases: &Api<Lease>) -> Option<String> {
    let lease = leases.get_opt(LEASE_NAME).await.ok()??;
    lease.spec?.holder_identity.filter(|h| !h.is_empty())
}

async fn event_reasons(admin: &Client, ns: &str, name: &str) -> Vec<String> {
    Api::<Event>::namespaced(admin.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("listing Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .filter_map(|e| e.reason)
        .collect()
}

fn assert_forbidden<T: std::fmt::Debug>(result: kube::Result<T>, what: &str) {
    match result {
        Err(kube::Error::Api(s)) if s.is_forbidden() => {}
        other => panic!("{what} as the ServiceAccount must be forbidden, got {other:?}"),
    }
}

/// `admin_config`, acting as ServiceAccount `ns/name` with the groups its
/// token would carry (the API server checks that `admin` may impersonate).
fn impersonating(admin_config: &kube::Config, ns: &str, name: &str) -> kube::Config {
    let mut config = admin_config.clone();
    config.auth_info.impersonate = Some(format!("system:serviceaccount:{ns}:{name}"));
    config.auth_info.impersonate_groups = Some(vec![
        "system:serviceaccounts".into(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".into(),
    ]);
    config
}

/// One controller replica, `usage_backfill_controller::run_with` in a task.
struct Replica {
    identity: String,
    health: SocketAddr,
    stop: CancellationToken,
    task: Option<JoinHandle<controller::Result<()>>>,
}

impl Replica {
    fn start(sa_config: &kube::Config, scope: Scope, op_ns: &str, app_ns: &str, id: &str) -> Self {
        let health = free_local_addr();
        let identity = format!("replica-{id}");
        let config = controller::Config {
            namespaces: match scope {
                Scope::ClusterWide => Vec::new(),
                Scope::Namespaced => vec![app_ns.to_owned()],
            },
            concurrency: 2,
            health_addr: health,
            // Every slice's progress (as the other tests): the handover
            // and deletion steps are timed on progress seen mid-run.
            settings: {
                let mut s = Settings::default();
                s.runner.progress_interval = Duration::ZERO;
                s
            },
            shutdown_timeout: Duration::from_secs(25),
            lease: Some(LeaseSettings {
                name: LEASE_NAME.into(),
                namespace: op_ns.to_owned(),
                identity: identity.clone(),
                duration: Duration::from_secs(6),
                grace: Duration::from_secs(4),
            }),
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(controller::run_with(
            sa_config.clone(),
            config,
            stop.clone(),
        ));
        Replica {
            identity,
            health,
            stop,
            task: Some(task),
        }
    }

    /// Stops it as a SIGTERM would, and checks that it stopped cleanly.
    async fn stop(&mut self) {
        self.stop.cancel();
        let task = self.task.take().expect("a replica stops once");
        tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .unwrap_or_else(|_| panic!("{} stops in time", self.identity))
            .expect("the replica's task does not panic")
            .unwrap_or_else(|e| panic!("{} stops cleanly: {e}", self.identity));
    }

    /// A sample of this replica's `/metrics`, like a Prometheus scrape.
    async fn metric(&self, series: &str) -> Option<f64> {
        let text = scrape(self.health).await?;
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }
}

/// A local address nothing listens on (the replica binds it just after).
fn free_local_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free local port");
    listener.local_addr().expect("its address")
}

async fn scrape(addr: SocketAddr) -> Option<String> {
    let read = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            .await
            .ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let text = String::from_utf8(response).ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
}

// ---------------------------------------------------------------------------
// The chart's RBAC, from the rules file
// ---------------------------------------------------------------------------

/// The rules file, read generically: named sets of rules.
fn rule_sets() -> BTreeMap<String, Vec<PolicyRule>> {
    serde_saphyr::from_str(RULES_YAML).expect("rbac-rules.yaml is a map of named rule lists")
}

/// Where the chart grants a rule set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Grant {
    /// The leader-election Role, in the operator's namespace.
    Lease,
    /// The operator's ClusterRole, or its Role in each watched namespace.
    Operator,
    /// Not by default.
    OptIn,
}

impl Grant {
    fn of(set: &str) -> Grant {
        if OPT_IN_RULE_SETS.contains(&set) {
            Grant::OptIn
        } else if set.to_ascii_lowercase().contains("lease") {
            Grant::Lease
        } else {
            Grant::Operator
        }
    }
}

/// The RBAC objects the chart renders for one install.
#[derive(Debug)]
struct Rbac {
    cluster_roles: Vec<ClusterRole>,
    cluster_bindings: Vec<ClusterRoleBinding>,
    roles: Vec<Role>,
    bindings: Vec<RoleBinding>,
}

impl Rbac {
    fn build(
        sets: &BTreeMap<String, Vec<PolicyRule>>,
        scope: Scope,
        op_ns: &str,
        app_ns: &str,
        tag: &str,
        run: &str,
    ) -> Rbac {
        let granted = |grant: Grant| -> Vec<PolicyRule> {
            sets.iter()
                .filter(|(name, _)| Grant::of(name) == grant)
                .flat_map(|(_, rules)| rules.iter().cloned())
                .collect()
        };
        let subjects = Some(vec![Subject {
            kind: "ServiceAccount".into(),
            name: RELEASE.into(),
            namespace: Some(op_ns.to_owned()),
            api_group: None,
        }]);
        let role_ref = |kind: &str, name: &str| RoleRef {
            api_group: "rbac.authorization.k8s.io".into(),
            kind: kind.into(),
            name: name.into(),
        };
        let role = |name: &str, ns: &str, rules: Vec<PolicyRule>| {
            let role = Role {
                metadata: meta(name, Some(ns), run),
                rules: Some(rules),
            };
            let binding = RoleBinding {
                metadata: meta(name, Some(ns), run),
                role_ref: role_ref("Role", name),
                subjects: subjects.clone(),
            };
            (role, binding)
        };
        let mut rbac = Rbac {
            cluster_roles: Vec::new(),
            cluster_bindings: Vec::new(),
            roles: Vec::new(),
            bindings: Vec::new(),
        };
        let lease_name = format!("{RELEASE}-leader-election");
        let (r, b) = role(&lease_name, op_ns, granted(Grant::Lease));
        rbac.roles.push(r);
        rbac.bindings.push(b);
        match scope {
            Scope::ClusterWide => {
                // Cluster-scoped, so named per run like everything else.
                let name = format!("{RELEASE}-e2e-{tag}");
                rbac.cluster_roles.push(ClusterRole {
                    metadata: meta(&name, None, run),
                    rules: Some(granted(Grant::Operator)),
                    aggregation_rule: None,
                });
                rbac.cluster_bindings.push(ClusterRoleBinding {
                    metadata: meta(&name, None, run),
                    role_ref: role_ref("ClusterRole", &name),
                    subjects: subjects.clone(),
                });
            }
            Scope::Namespaced => {
                let (r, b) = role(RELEASE, app_ns, granted(Grant::Operator));
                rbac.roles.push(r);
                rbac.bindings.push(b);
            }
        }
        rbac
    }

    /// Names of the cluster-scoped objects (a ClusterRole and its binding
    /// share a name).
    fn cluster_names(&self) -> Vec<String> {
        self.cluster_roles.iter().map(|r| r.name_any()).collect()
    }

    async fn install(&self, admin: &Client) {
        let pp = PostParams::default();
        for r in &self.cluster_roles {
            Api::<ClusterRole>::all(admin.clone())
                .create(&pp, r)
                .await
                .expect("creating the ClusterRole");
        }
        for b in &self.cluster_bindings {
            Api::<ClusterRoleBinding>::all(admin.clone())
                .create(&pp, b)
                .await
                .expect("creating the ClusterRoleBinding");
        }
        for r in &self.roles {
            Api::<Role>::namespaced(admin.clone(), &r.namespace().unwrap())
                .create(&pp, r)
                .await
                .unwrap_or_else(|e| panic!("creating Role {}: {e}", r.name_any()));
        }
        for b in &self.bindings {
            Api::<RoleBinding>::namespaced(admin.clone(), &b.namespace().unwrap())
                .create(&pp, b)
                .await
                .unwrap_or_else(|e| panic!("creating RoleBinding {}: {e}", b.name_any()));
        }
    }
}

// ---------------------------------------------------------------------------
// Cleanup, also when an assertion fails
// ---------------------------------------------------------------------------

/// What to delete when dropped, by the end of the test or by a panic: the
/// replicas are stopped, the UsageBackfills of the namespaces deleted and
/// their finalizers dropped (no controller may be left to do it, and a
/// finalizer would keep the namespace and the CRD Terminating), then the
/// namespaces, the ClusterRoles and bindings, the CRD.
struct Cleanup {
    admin: kube::Config,
    replicas: Vec<CancellationToken>,
    namespaces: Vec<String>,
    cluster_rbac: Vec<String>,
    crd: Option<String>,
}

impl Cleanup {
    fn new(admin: kube::Config) -> Self {
        Cleanup {
            admin,
            replicas: Vec::new(),
            namespaces: Vec::new(),
            cluster_rbac: Vec::new(),
            crd: None,
        }
    }
}

/// What a [`Cleanup`] deletes, once taken out of it (no `Drop` of its own).
struct Leftovers {
    admin: kube::Config,
    namespaces: Vec<String>,
    cluster_rbac: Vec<String>,
    crd: Option<String>,
}

impl Leftovers {
    fn is_empty(&self) -> bool {
        self.namespaces.is_empty() && self.cluster_rbac.is_empty() && self.crd.is_none()
    }

    /// Deletes everything, going on past errors; returns how many failed.
    async fn delete(self) -> usize {
        let client = match Client::try_from(self.admin) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("e2e cleanup: no client: {e}");
                return 1;
            }
        };
        let mut failed = 0;
        let mut report = |what: String, r: kube::Result<()>| match r {
            Err(kube::Error::Api(s)) if s.is_not_found() => {}
            Err(e) => {
                eprintln!("e2e cleanup: {what}: {e}");
                failed += 1;
            }
            Ok(()) => {}
        };
        let dp = DeleteParams::default();
        for ns in &self.namespaces {
            let objects: Api<UsageBackfill> = Api::namespaced(client.clone(), ns);
            let deleted = objects.delete_collection(&dp, &ListParams::default()).await;
            report(
                format!("deleting the UsageBackfills of {ns}"),
                deleted.map(drop),
            );
            let Ok(left) = objects.list(&ListParams::default()).await else {
                continue;
            };
            let release = json!({"metadata": {"finalizers": null}});
            for o in left.items.iter().filter(|o| !o.finalizers().is_empty()) {
                let name = o.name_any();
                let patched = objects
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&release))
                    .await;
                report(
                    format!("dropping the finalizer of {ns}/{name}"),
                    patched.map(drop),
                );
            }
        }
        for ns in &self.namespaces {
            let deleted = Api::<Namespace>::all(client.clone()).delete(ns, &dp).await;
            report(format!("deleting namespace {ns}"), deleted.map(drop));
        }
        for name in &self.cluster_rbac {
            let deleted = Api::<ClusterRoleBinding>::all(client.clone())
                .delete(name, &dp)
                .await;
            report(
                format!("deleting ClusterRoleBinding {name}"),
                deleted.map(drop),
            );
            let deleted = Api::<ClusterRole>::all(client.clone())
                .delete(name, &dp)
                .await;
            report(format!("deleting ClusterRole {name}"), deleted.map(drop));
        }
        if let Some(name) = &self.crd {
            let deleted = Api::<CustomResourceDefinition>::all(client.clone())
                .delete(name, &dp)
                .await;
            report(format!("deleting CRD {name}"), deleted.map(drop));
        }
        failed
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for stop in &self.replicas {
            stop.cancel();
        }
        let cleanup = Leftovers {
            admin: self.admin.clone(),
            namespaces: std::mem::take(&mut self.namespaces),
            cluster_rbac: std::mem::take(&mut self.cluster_rbac),
            crd: self.crd.take(),
        };
        if cleanup.is_empty() {
            return;
        }
        let left = format!(
            "namespaces {:?}, ClusterRoles and bindings {:?}, CRD {:?}",
            cleanup.namespaces, cleanup.cluster_rbac, cleanup.crd
        );
        // Drop may run while a panic unwinds through the test's runtime,
        // which cannot be blocked on: a thread with a runtime of its own,
        // and a client made there (a client lives on the runtime that made it).
        let done = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the cleanup");
            // (A timeout is made inside the runtime: it needs its timer.)
            runtime
                .block_on(async { tokio::time::timeout(CLEANUP_TIMEOUT, cleanup.delete()).await })
        })
        .join();
        match done {
            Ok(Ok(0)) => eprintln!("e2e cleanup: deleted {left}"),
            Ok(Ok(n)) => eprintln!("e2e cleanup: {n} deletions failed; check {left}"),
            Ok(Err(_)) => eprintln!("e2e cleanup timed out; check {left}"),
            Err(_) => eprintln!("e2e cleanup failed; check {left}"),
        }
    }
}

// ---------------------------------------------------------------------------
// Without a cluster: the RBAC this test installs
// ---------------------------------------------------------------------------

fn grants(rules: &[PolicyRule], group: &str, resource: &str, verb: &str) -> bool {
    let any = |list: &[String], v: &str| list.iter().any(|x| x == v || x == "*");
    rules.iter().any(|r| {
        any(r.api_groups.as_deref().unwrap_or_default(), group)
            && any(r.resources.as_deref().unwrap_or_default(), resource)
            && any(&r.verbs, verb)
    })
}

#[test]
fn the_rules_file_splits_into_the_operators_role_and_the_lease_role() {
    let sets = rule_sets();
    let all = |grant: Grant| -> Vec<PolicyRule> {
        sets.iter()
            .filter(|(n, _)| Grant::of(n) == grant)
            .flat_map(|(_, r)| r.clone())
            .collect()
    };
    let (lease, operator) = (all(Grant::Lease), all(Grant::Operator));
    for verb in ["get", "create", "patch"] {
        assert!(
            grants(&lease, "coordination.k8s.io", "leases", verb),
            "{verb}"
        );
    }
    // get and patch only on the Lease the replicas use (create cannot be
    // limited by name): the one of `--lease-name`, here the default.
    assert!(lease.iter().all(|r| match r.resource_names.as_deref() {
        Some(names) => names == [LEASE_NAME] && !r.verbs.contains(&"create".to_owned()),
        None => r.verbs == ["create"],
    }));
    assert!(
        lease
            .iter()
            .all(|r| r.resources.as_deref() == Some(&["leases".to_owned()][..])),
        "the leader-election Role grants Leases only: {lease:?}"
    );
    for (resource, verb) in [
        ("usagebackfills", "watch"),
        ("usagebackfills", "patch"),
        ("usagebackfills/status", "patch"),
    ] {
        assert!(
            grants(&operator, "usage.multica.ai", resource, verb),
            "{resource} {verb}"
        );
    }
    assert!(grants(&operator, "", "secrets", "get"));
    // Least privilege: the default install reads Secrets by name only.
    for verb in ["list", "watch"] {
        assert!(!grants(&operator, "", "secrets", verb), "secrets {verb}");
    }
    assert!(!grants(&operator, "coordination.k8s.io", "leases", "get"));
}

#[test]
fn cluster_wide_rbac_is_a_cluster_role_and_namespaced_rbac_a_role_in_the_watched_namespace() {
    let sets = rule_sets();
    let subject = |s: &Option<Vec<Subject>>| {
        let s = &s.as_ref().unwrap()[0];
        (s.kind.clone(), s.name.clone(), s.namespace.clone())
    };
    let sa = (
        "ServiceAccount".to_owned(),
        RELEASE.to_owned(),
        Some("op".to_owned()),
    );
    let lease_role = format!("{RELEASE}-leader-election");

    let cw = Rbac::build(&sets, Scope::ClusterWide, "op", "app", "t-cw", "t");
    assert_eq!(cw.cluster_names(), [format!("{RELEASE}-e2e-t-cw")]);
    assert_eq!(cw.cluster_bindings[0].role_ref.name, cw.cluster_names()[0]);
    assert_eq!(cw.cluster_bindings[0].role_ref.kind, "ClusterRole");
    assert_eq!(subject(&cw.cluster_bindings[0].subjects), sa);
    let cluster_rules = cw.cluster_roles[0].rules.clone().unwrap();
    assert!(grants(
        &cluster_rules,
        "usage.multica.ai",
        "usagebackfills",
        "list"
    ));
    assert_eq!(cw.roles.len(), 1, "only the leader-election Role");
    assert_eq!(
        (cw.roles[0].name_any(), cw.roles[0].namespace()),
        (lease_role.clone(), Some("op".to_owned()))
    );

    let ns = Rbac::build(&sets, Scope::Namespaced, "op", "app", "t-ns", "t");
    assert!(ns.cluster_roles.is_empty() && ns.cluster_bindings.is_empty());
    let placed: Vec<(String, Option<String>)> = ns
        .roles
        .iter()
        .map(|r| (r.name_any(), r.namespace()))
        .collect();
    assert_eq!(
        placed,
        [
            (lease_role, Some("op".to_owned())),
            (RELEASE.to_owned(), Some("app".to_owned()))
        ]
    );
    assert_eq!(ns.roles[1].rules, cw.cluster_roles[0].rules);
    for (role, binding) in ns.roles.iter().zip(&ns.bindings) {
        assert_eq!(binding.role_ref.kind, "Role");
        assert_eq!(binding.role_ref.name, role.name_any());
        assert_eq!(binding.namespace(), role.namespace());
        assert_eq!(subject(&binding.subjects), sa);
        assert_eq!(
            role.labels().get(RUN_LABEL).map(String::as_str),
            Some("t"),
            "labelled with the run"
        );
    }
}

#[test]
fn the_replicas_impersonate_the_service_account_with_its_groups() {
    let admin = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
    let c = impersonating(&admin, "op", RELEASE);
    assert_eq!(
        c.auth_info.impersonate.as_deref(),
        Some("system:serviceaccount:op:usage-backfill-operator")
    );
    assert_eq!(
        c.auth_info.impersonate_groups.unwrap(),
        [
            "system:serviceaccounts",
            "system:serviceaccounts:op",
            "system:authenticated"
        ]
    );
    assert_eq!(admin.auth_info.impersonate, None, "the admin stays itself");
}

/// The replicas' plumbing (configuration by `run_with`, the Lease timings,
/// the `/metrics` scrape, a clean stop that hands over) against the fake
/// API server over HTTP, which ignores impersonation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_hand_over_on_the_fake_api_server() {
    let (_, fake) = testkit::FakeApiServer::start();
    let servers = [fake.serve_http().await, fake.serve_http().await];
    let mut replicas = [0, 1].map(|i| {
        let url = servers[i].url().parse().unwrap();
        let config = impersonating(&kube::Config::new(url), "op", RELEASE);
        Replica::start(&config, Scope::Namespaced, "op", "app", &format!("t-{i}"))
    });
    let leader = eventually("a leader, serving as such", || {
        let (fake, replicas) = (&fake, &replicas);
        async move {
            let holder = fake.lease_holder("op", LEASE_NAME)?;
            let i = replicas.iter().position(|r| r.identity == holder)?;
            (replicas[i].metric("usage_backfill_leader").await? == 1.0).then_some(i)
        }
    })
    .await;
    let standby = 1 - leader;
    assert_eq!(
        replicas[standby].metric("usage_backfill_leader").await,
        Some(0.0)
    );
    assert_eq!(
        replicas[leader].metric("usage_backfill_runs_active").await,
        Some(0.0)
    );
    replicas[leader].stop().await;
    let new_leader = &replicas[standby];
    eventually("the standby to lead", || async {
        (new_leader.metric("usage_backfill_leader").await? == 1.0).then_some(())
    })
    .await;
    assert_eq!(
        fake.lease_holder("op", LEASE_NAME).as_deref(),
        Some(new_leader.identity.as_str())
    );
    replicas[standby].stop().await;
    assert_eq!(fake.lease_holder("op", LEASE_NAME), None, "released");
    assert!(fake.unexpected().is_empty(), "{}", fake.describe_requests());
}

/// The guard does its work when an assertion fails inside the test's
/// runtime: the replicas are told to stop, finalizers dropped, and every
/// object deleted (the fake refuses most of it, as a real server would the
/// chart's ServiceAccount, but it sees every request).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cleanup_runs_when_an_assertion_fails() {
    let (client, fake) = testkit::FakeApiServer::start();
    let server = fake.serve_http().await;
    let stuck = fake.create("x", "stuck", UsageBackfillSpec::new("db"));
    controller::add_finalizer(&Api::namespaced(client, "x"), &stuck)
        .await
        .unwrap();
    assert!(controller::has_finalizer(&fake.get("x", "stuck").unwrap()));
    let config = kube::Config::new(server.url().parse().unwrap());
    let replica = CancellationToken::new();
    let failing = tokio::spawn({
        let replica = replica.clone();
        async move {
            let mut guard = Cleanup::new(config);
            guard.replicas.push(replica);
            guard.namespaces.push("x".into());
            guard.cluster_rbac.push("cr".into());
            guard.crd = Some("crd".into());
            panic!("an assertion fails");
        }
    });
    assert!(failing.await.unwrap_err().is_panic());
    assert!(replica.is_cancelled(), "the replicas are stopped");
    assert!(
        !controller::has_finalizer(&fake.get("x", "stuck").unwrap()),
        "the finalizer is dropped"
    );
    let deletes: Vec<(String, Option<String>)> = fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "DELETE")
        .map(|r| (r.resource, r.name))
        .collect();
    for (resource, name) in [
        ("usagebackfills", None),
        ("namespaces", Some("x")),
        ("clusterrolebindings", Some("cr")),
        ("clusterroles", Some("cr")),
        ("customresourcedefinitions", Some("crd")),
    ] {
        let wanted = (resource.to_owned(), name.map(str::to_owned));
        assert!(deletes.contains(&wanted), "{wanted:?} in {deletes:?}");
    }
}
