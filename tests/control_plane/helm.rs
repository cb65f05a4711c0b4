//! The chart and the Helm hook recipes with the real `helm` (built from
//! `helm.sh/helm/v4`) on the real kube-apiserver of [`crate::cluster`],
//! on the oldest and the newest Kubernetes release the project claims:
//!
//! - the operator's chart is installed, upgraded to namespaced mode and
//!   uninstalled;
//! - the Helm hook recipes of docs/packaging.md, in the stand-in
//!   application chart, are installed and upgraded with that helm, the
//!   controller in this process and the test in the place of the Job
//!   controller and the kubelet (see [`the_hook_recipe_runs_with_helm`],
//!   [`the_job_recipe_runs_with_helm`] and docs/testing.md for which steps
//!   of an upgrade this covers).

use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use testkit::cluster::ControlPlane;
use usage_backfill_api::{BackfillResult, Phase, UsageBackfill};
use usage_backfill_controller::{self as controller, Context};
use usage_backfill_testkit::{self as testkit, on_both_versions};

use crate::cluster::{WAIT, database_and_secret, eventually, namespace, secret, with_crd};

on_both_versions!(
    the_chart_installs_upgrades_and_uninstalls_with_helm,
    the_hook_recipe_runs_with_helm,
    the_job_recipe_runs_with_helm,
);

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
