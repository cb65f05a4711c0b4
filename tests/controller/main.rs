//! The controller against a fake API server (HTTP level, `crates/testkit`)
//! and a real PostgreSQL (`usage_backfill_testkit`): the status a user
//! sees through every phase, retries, Secrets, suspend, deletion during a
//! run, restart safety, shutdown and leader election. Assertions read the meaning of the
//! recorded requests (resource, subresource, field manager, status JSON),
//! never exact query strings; every wait has a timeout.
//!
//! One test binary for everything that drives the controller, so that the
//! kube and PostgreSQL stacks are linked once; besides the tests here and
//! in [`leader`] and [`whole`], each module is what a test binary of its
//! own used to be:
//!
//! - [`faults_controller`]: faults and bad input as a user sees them in the
//!   status and the Events, the operator process killed and restarted.
//! - [`secrets_access`]: Secrets by `get` with rechecks, or watched.
//! - [`resume_across_objects`]: a recreated object resumes the walk.
//! - [`lifecycle`]: one application's upgrade lifecycle, end to end.
//! - [`wait`]: the `usage-backfill wait` command of the hook Job.
//! - [`apiserver`]: the test API server refuses what a real one refuses.
//! - [`api_requests`], [`rbac_verbs`]: opt-in measurement and the RBAC
//!   granted-vs-used check `.ci/run` runs after the suite.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use usage_backfill_api::{
    BackfillResult, ConditionType, DatabaseSpec, Mode, Phase, SkipReason, TuningPreset, TuningSpec,
    UsageBackfill, UsageBackfillStatus, ValueFrom,
};
use usage_backfill_controller::{
    self as controller, Election, Error as ControllerError, FIELD_MANAGER, FINALIZER, HealthState,
    LEASE_NAME, LeaseSettings, Metrics, Replica,
};
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_testkit as testkit;

use testkit::harness::{Harness, NS, SECRET, UsageBackfillBuilder, WAIT};
use testkit::status::{
    cond, conds, in_progress, is, message, ready, retry_scheduled, secs, stalled,
};
use testkit::{FakeApiServer, Outage, settings};

fn small() -> HistorySpec {
    HistorySpec {
        rows: 400,
        months: 4,
        ..HistorySpec::default()
    }
}

fn writes_has_finalizer(obj: &UsageBackfill) -> bool {
    controller::has_finalizer(obj)
}

/// What `kubectl get ubf` prints for it (the CRD's printer columns).
fn kubectl_row(name: &str, s: &UsageBackfillStatus) -> String {
    let watermark = s
        .watermark_after
        .as_ref()
        .map(|t| jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", t.0).unwrap())
        .unwrap_or_default();
    format!(
        "NAME       PHASE       SLICES   ROWS   WATERMARK              AGE\n{:<10} {:<11} {:<8} {:<6} {:<22} 5s",
        name,
        s.phase.map(|p| p.as_str()).unwrap_or(""),
        s.progress.as_deref().unwrap_or(""),
        s.rows_touched.map(|r| r.to_string()).unwrap_or_default(),
        watermark
    )
}

// ---------------------------------------------------------------------------
// The main path
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_goes_pending_running_succeeded_with_the_engines_counts() {
    let h = Harness::new(Some(small())).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("backfill").sleep_between_slices("20ms"));

    // The first reconcile: finalizer, Pending, Started; it returns at once.
    h.reconcile("backfill").await;
    let first = h.fake.requests();
    let finalizer_patch = first
        .iter()
        .find(|r| r.method == "PATCH" && r.subresource.is_none() && r.resource == "usagebackfills")
        .expect("the finalizer is added with a patch");
    assert_eq!(
        finalizer_patch.body.as_ref().unwrap()["metadata"]["finalizers"],
        serde_json::json!([FINALIZER])
    );
    assert!(
        finalizer_patch.body.as_ref().unwrap()["metadata"]["resourceVersion"].is_string(),
        "guarded by the resourceVersion"
    );
    let pending = &h.fake.statuses("backfill")[0];
    assert_eq!(pending.phase, Some(Phase::Pending));
    assert_eq!(pending.observed_generation, 1);
    assert_eq!(pending.attempts, Some(1));
    assert_eq!(conds(pending), in_progress("Pending"));
    let finalizer_at = first
        .iter()
        .position(|r| std::ptr::eq(r, finalizer_patch))
        .unwrap();
    let pending_at = first.iter().position(|r| r.is_status_apply()).unwrap();
    assert!(
        finalizer_at < pending_at,
        "the finalizer is in place before the run starts"
    );

    let done = h.run_to_end("backfill").await;

    // Phases in order, with progress in between.
    let statuses = h.fake.statuses("backfill");
    let mut phases: Vec<Phase> = statuses.iter().filter_map(|s| s.phase).collect();
    phases.dedup();
    assert_eq!(phases, [Phase::Pending, Phase::Running, Phase::Succeeded]);
    let progress: Vec<(u32, u32, i64)> = statuses
        .iter()
        .filter(|s| s.phase == Some(Phase::Running))
        .filter_map(|s| Some((s.slices_processed?, s.slices_total?, s.rows_touched?)))
        .collect();
    let total = done.slices_total.unwrap();
    assert!(
        progress.iter().any(|(p, t, _)| *p > 0 && p < t),
        "mid-run progress: {progress:?}"
    );
    assert!(
        progress
            .windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].2 <= w[1].2),
        "{progress:?}"
    );
    for s in statuses.iter().filter(|s| s.phase == Some(Phase::Running)) {
        assert_eq!(conds(s), in_progress("Running"));
        assert!(s.heartbeat_time.is_some());
    }

    // The final status: the engine's counts, the database's watermark.
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(conds(&done), ready("Backfilled"));
    assert_eq!(done.observed_generation, 1);
    assert_eq!(done.run_id.as_deref(), Some(""));
    assert_eq!(done.slices_processed, Some(total));
    assert!(total >= 4, "four months of history and the current month");
    assert_eq!(done.progress, Some(format!("{total}/{total}")));
    let last_progress = progress.last().unwrap();
    assert_eq!(
        (last_progress.0, last_progress.2),
        (total, done.rows_touched.unwrap())
    );
    assert!(done.rows_touched.unwrap() > 0);
    assert_eq!(done.watermark_stamped, Some(true));
    assert_eq!(done.watermark_after, h.watermark().await.map(secs));
    assert_eq!(
        done.watermark_before,
        Some(secs("1970-01-01T00:00:00Z".parse().unwrap()))
    );
    let max_event: Timestamp =
        h.pg.query_one(
            "SELECT max(coalesce(updated_at, created_at)) FROM task_usage",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(done.max_event, Some(secs(max_event)));
    assert_eq!(
        done.lag_seconds,
        Some(max_event.as_second()),
        "newest event minus the epoch watermark"
    );
    assert_eq!(
        done.cursor, done.to,
        "the cursor reached the end of the walk"
    );
    assert_eq!(done.attempts, Some(1));
    assert_eq!(done.last_error, None);
    assert_eq!(done.lock_holder, None);
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    // The tuned preset by default, and how the walk went.
    assert_eq!(
        done.settings,
        [
            ("enable_nestloop".to_owned(), "off".to_owned()),
            ("work_mem".to_owned(), "64MB".to_owned())
        ]
        .into()
    );
    let perf = done
        .performance
        .clone()
        .expect("a walk reports its performance");
    assert!(matches!(perf.sessions, Some(1..=2)), "{perf:?}");
    assert_eq!(perf.slice_retries, Some(0));
    assert!(
        perf.slice_median_millis <= perf.slice_max_millis,
        "{perf:?}"
    );
    h.assert_rollup_correct().await;

    // Every status write: SSA on /status under the one field manager, forced.
    for r in h.fake.status_writes("backfill") {
        assert_eq!(r.field_manager(), Some(FIELD_MANAGER));
        assert_eq!(r.query.get("force").map(String::as_str), Some("true"));
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
    }
    assert_eq!(h.fake.event_reasons("backfill"), ["Started", "Succeeded"]);
    let (_, kind, note) = &h.fake.events("backfill")[1];
    assert_eq!(kind, "Normal");
    assert!(
        note.starts_with(&format!("backfilled {total} slices from ")),
        "{note}"
    );

    // Finished for this generation: further reconciles change nothing.
    let writes = h.fake.status_writes("backfill").len();
    h.reconcile("backfill").await;
    assert_eq!(h.fake.status_writes("backfill").len(), writes);
    assert!(!writes_has_finalizer(&h.fake.get(NS, "backfill").unwrap()));
    h.assert_password_never_sent();

    eprintln!(
        "--- kubectl get ubf -n {NS}\n{}",
        kubectl_row("backfill", &done)
    );
    eprintln!(
        "--- status of a finished run\n{}",
        serde_saphyr::to_string(&done).unwrap()
    );
}

// ---------------------------------------------------------------------------
// Skips
// ---------------------------------------------------------------------------

async fn assert_skipped(
    h: &Harness,
    name: &str,
    reason: SkipReason,
    stamped: bool,
) -> UsageBackfillStatus {
    let checksum = fixture::hourly_checksum(&h.pg).await.unwrap();
    h.put_secret();
    h.apply(UsageBackfillBuilder::new(name));
    let done = h.run_to_end(name).await;
    assert_eq!(done.phase, Some(Phase::Succeeded));
    assert_eq!(done.result, Some(BackfillResult::Skipped));
    assert_eq!(done.skipped, Some(reason));
    assert_eq!(conds(&done), ready("Skipped"));
    assert!(
        message(&done, ConditionType::Ready).starts_with(&format!("skipped ({})", reason.as_str())),
        "{}",
        message(&done, ConditionType::Ready)
    );
    assert_eq!(done.watermark_stamped, Some(stamped));
    assert_eq!(
        fixture::hourly_checksum(&h.pg).await.unwrap(),
        checksum,
        "nothing rolled up"
    );
    assert_eq!(h.fake.event_reasons(name), ["Started", "Skipped"]);
    h.assert_password_never_sent();
    done
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_rollup_state_missing() {
    let h = Harness::new(Some(small())).await;
    fixture::drop_rollup_state_table(&h.pg).await.unwrap();
    let done = assert_skipped(&h, "skip", SkipReason::RollupStateMissing, false).await;
    assert_eq!(done.watermark_after, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_task_usage_empty() {
    let h = Harness::new(None).await;
    let done = assert_skipped(&h, "skip", SkipReason::TaskUsageEmpty, true).await;
    assert_eq!(done.watermark_after, h.watermark().await.map(secs));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_watermark_within_threshold() {
    let h = Harness::new(Some(small())).await;
    let now: Timestamp = h.pg.query_one("SELECT now()", &[]).await.unwrap().get(0);
    fixture::set_watermark(&h.pg, Some(now)).await.unwrap();
    // The watermark stands past the instant a stamp would name (five
    // minutes before the clock): nothing lies between them to roll up, and
    // the skip does not move the watermark back.
    let done = assert_skipped(&h, "skip", SkipReason::WatermarkWithinThreshold, false).await;
    assert_eq!(h.watermark().await, Some(now));
    assert_eq!(done.watermark_after, Some(secs(now)));
    assert!(done.lag_seconds.unwrap() <= 3600);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_plans_and_writes_nothing() {
    let h = Harness::new(Some(small())).await;
    let before = (
        fixture::hourly_checksum(&h.pg).await.unwrap(),
        h.watermark().await,
    );
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("plan").dry_run());
    let done = h.run_to_end("plan").await;
    assert_eq!(done.result, Some(BackfillResult::DryRun));
    assert_eq!(conds(&done), ready("DryRun"));
    assert_eq!(done.watermark_stamped, Some(false));
    assert_eq!(
        done.watermark_after,
        before.1.map(secs),
        "the watermark as it was"
    );
    let (p, t) = (done.slices_processed.unwrap(), done.slices_total.unwrap());
    assert!(p == t && t >= 4, "{p}/{t} slices planned");
    let rows: i64 =
        h.pg.query_one("SELECT count(*) FROM task_usage", &[])
            .await
            .unwrap()
            .get(0);
    assert!(done.rows_touched.unwrap() > 0 && done.rows_touched.unwrap() <= rows);
    assert!(
        message(&done, ConditionType::Ready)
            .starts_with(&format!("dry run: would walk {t} slices"))
    );
    assert_eq!(
        (
            fixture::hourly_checksum(&h.pg).await.unwrap(),
            h.watermark().await
        ),
        before,
        "nothing written"
    );
    assert_eq!(h.fake.event_reasons("plan"), ["Started", "Succeeded"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_bounds_the_runs_in_progress() {
    let mut settings = settings();
    settings.runner.concurrency = 1;
    let h = Harness::with_settings(Some(slow_history()), settings).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("first").sleep_between_slices("200ms"));
    h.apply(UsageBackfillBuilder::new("second").sleep_between_slices("200ms"));
    h.reconcile("first").await;
    h.wait_running("first", 1).await;
    h.reconcile("second").await;
    assert!(
        h.ctx.runner.is_active(&Harness::key("second")),
        "started, waiting for a slot"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        h.status("second").phase,
        Some(Phase::Pending),
        "no slot, so not even waiting for the lock yet"
    );
    let first = h.run_to_end("first").await;
    assert_eq!(first.result, Some(BackfillResult::Backfilled));
    let second = h.run_to_end("second").await;
    // The first run stamped a fresh watermark: nothing left to do.
    assert_eq!(second.skipped, Some(SkipReason::WatermarkWithinThreshold));
    assert!(
        h.fake
            .statuses("second")
            .iter()
            .all(|s| s.phase != Some(Phase::WaitingForLock))
    );
}

// ---------------------------------------------------------------------------
// Secrets and terminal input problems
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_secret_waits_then_runs_once_it_appears() {
    let h = Harness::new(Some(small())).await;
    h.apply(UsageBackfillBuilder::new("waits"));
    h.reconcile("waits").await;
    let s = h.status("waits");
    assert_eq!(s.phase, Some(Phase::Pending));
    assert_eq!(conds(&s), in_progress("SecretNotFound"));
    assert!(
        message(&s, ConditionType::Reconciling)
            .starts_with("Secret \"app-db\" does not exist in this namespace"),
        "{}",
        message(&s, ConditionType::Reconciling)
    );
    assert_eq!(s.observed_generation, 1);
    assert_eq!(s.attempts, None, "not an attempt");
    assert!(!h.ctx.runner.is_active(&Harness::key("waits")));
    assert!(!writes_has_finalizer(&h.fake.get(NS, "waits").unwrap()));
    let secret_reads = h
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.resource == "secrets" && r.namespace.as_deref() == Some(NS))
        .count();
    assert!(
        secret_reads >= 1,
        "the Secret is read in the object's own namespace"
    );

    // Requeued: no new write, no new Event (no write loop).
    let writes = h.fake.status_writes("waits").len();
    h.reconcile("waits").await;
    assert_eq!(h.fake.status_writes("waits").len(), writes);
    assert_eq!(h.fake.event_reasons("waits"), ["SecretNotFound"]);

    // A Secret without the key: still waiting, with its own reason.
    h.fake.put_secret(NS, SECRET, "OTHER_KEY", "x");
    h.reconcile("waits").await;
    let s = h.status("waits");
    assert_eq!(
        cond(&s, ConditionType::Reconciling),
        is("True", "SecretKeyMissing")
    );

    h.put_secret();
    let done = h.run_to_end("waits").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(1));
    assert_eq!(
        h.fake.event_reasons("waits"),
        ["SecretNotFound", "SecretKeyMissing", "Started", "Succeeded"]
    );
    h.assert_rollup_correct().await;
    h.assert_password_never_sent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_dsn_is_stalled_with_a_specific_message_until_the_secret_is_fixed() {
    let h = Harness::new(Some(small())).await;
    h.fake.put_secret(
        NS,
        SECRET,
        "DATABASE_URL",
        "postgres://app:Zq9-secret-Zq9@db.example/app?sslmode=verify-everything",
    );
    h.apply(UsageBackfillBuilder::new("bad-dsn"));
    h.reconcile("bad-dsn").await;
    let s = h.status("bad-dsn");
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(conds(&s), stalled("InvalidConnectionString"));
    let msg = message(&s, ConditionType::Stalled);
    assert!(
        msg.starts_with("invalid database connection string: "),
        "{msg}"
    );
    assert!(
        msg.contains("unknown sslmode \"verify-everything\""),
        "names what is wrong: {msg}"
    );
    assert!(!msg.contains("Zq9-secret-Zq9"));
    assert_eq!(s.observed_generation, 1);
    assert!(s.secret_resource_versions.is_some());
    assert!(
        !writes_has_finalizer(&h.fake.get(NS, "bad-dsn").unwrap()),
        "no run, no finalizer"
    );
    assert_eq!(h.fake.event_reasons("bad-dsn"), ["Failed"]);
    // Terminal: nothing more happens while nothing changes.
    h.reconcile("bad-dsn").await;
    assert_eq!(h.fake.status_writes("bad-dsn").len(), 1);

    // Fixing the Secret retries at once.
    h.put_secret();
    let done = h.run_to_end("bad-dsn").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(1));
    assert_eq!(done.last_error, None);
    for r in h.fake.requests() {
        assert!(!r.raw_body.contains("Zq9-secret-Zq9"));
    }
    h.assert_password_never_sent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_spec_is_stalled_and_a_fixed_spec_runs() {
    let h = Harness::new(Some(small())).await;
    h.put_secret();
    // The CRD's CEL rules refuse monthsBack in IfLagging, so the object
    // is one stored before they existed: validate() is what stops it.
    let invalid = UsageBackfillBuilder::new("invalid").months_back(3);
    h.fake
        .create_legacy(NS, "invalid", serde_json::to_value(invalid.spec()).unwrap());
    h.reconcile("invalid").await;
    let s = h.status("invalid");
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(conds(&s), stalled("InvalidSpec"));
    assert_eq!(
        message(&s, ConditionType::Stalled),
        "spec.monthsBack: applies to mode Always only; remove it or set spec.mode: Always"
    );
    assert_eq!(h.fake.event_reasons("invalid"), ["InvalidSpec"]);
    h.fake.edit_spec(NS, "invalid", |s| s.months_back = 0);
    let done = h.run_to_end("invalid").await;
    assert_eq!(done.observed_generation, 2);
    assert_eq!(conds(&done), ready("Backfilled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spec_tuning_and_parallelism_reach_the_run_and_a_refused_setting_stalls_it() {
    let h = Harness::new(Some(small())).await;
    h.put_secret();
    h.apply(
        UsageBackfillBuilder::new("tuned")
            .tuning(TuningSpec {
                preset: TuningPreset::ServerDefaults,
                settings: [("work_mem".to_owned(), "8MB".to_owned())].into(),
            })
            .edit(|s| s.parallelism = 1),
    );
    let done = h.run_to_end("tuned").await;
    assert_eq!(conds(&done), ready("Backfilled"));
    assert_eq!(
        done.settings,
        [("work_mem".to_owned(), "8MB".to_owned())].into(),
        "the server's settings plus the spec's, nothing of the tuned preset"
    );
    let perf = done.performance.clone().unwrap();
    assert_eq!(perf.sessions, Some(1));
    assert_eq!(
        perf.plan_cache_mode, None,
        "measured by the tuned preset only"
    );
    h.assert_rollup_correct().await;

    // A value the server refuses: terminal, named, and nothing written.
    let watermark = h.watermark().await;
    h.fake.edit_spec(NS, "tuned", |s| {
        s.tuning.as_mut().unwrap().settings = [("work_mem".to_owned(), "lots".to_owned())].into();
        s.mode = Mode::Always;
    });
    let failed = h.run_to_end("tuned").await;
    assert_eq!(failed.phase, Some(Phase::Failed));
    assert_eq!(conds(&failed), stalled("InvalidSessionSetting"));
    let msg = message(&failed, ConditionType::Stalled);
    assert!(
        msg.contains("\"work_mem\"") && msg.contains("lots"),
        "{msg}"
    );
    assert_eq!(failed.attempts, Some(1), "not retried");
    assert_eq!(h.watermark().await, watermark, "nothing stamped");
    assert!(
        h.fake.event_reasons("tuned").contains(&"Failed".to_owned()),
        "{:?}",
        h.fake.event_reasons("tuned")
    );
    h.assert_password_never_sent();
}

// ---------------------------------------------------------------------------
// Retries
// ---------------------------------------------------------------------------

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_retry_with_backoff_then_fail_after_the_backoff_limit() {
    let h = Harness::new(None).await;
    let port = closed_port().await;
    h.fake.put_secret(
        NS,
        SECRET,
        "DATABASE_URL",
        &format!("postgres://app:Kx7-unreachable@127.0.0.1:{port}/app?connect_timeout=3"),
    );
    h.apply(UsageBackfillBuilder::new("flaky").backoff_limit(2));
    let done = h.run_to_end("flaky").await;

    assert_eq!(done.phase, Some(Phase::Failed));
    assert_eq!(done.attempts, Some(3), "backoffLimit 2: three attempts");
    assert_eq!(conds(&done), stalled("BackoffLimitExceeded"));
    let msg = message(&done, ConditionType::Stalled);
    assert!(
        msg.starts_with("3 attempts failed (backoffLimit 2); last error (DatabaseUnreachable): cannot connect to app@127.0.0.1"),
        "{msg}"
    );
    assert!(
        done.last_error
            .as_ref()
            .unwrap()
            .starts_with("cannot connect")
    );

    // Between attempts: Reconciling=True with the failure's reason, not Stalled.
    let retries: Vec<UsageBackfillStatus> = h
        .fake
        .statuses("flaky")
        .into_iter()
        .filter(|s| cond(s, ConditionType::Ready) == is("False", "RetryScheduled"))
        .collect();
    assert_eq!(
        retries
            .iter()
            .map(|s| s.attempts.unwrap())
            .collect::<Vec<_>>(),
        [1, 2]
    );
    for s in &retries {
        assert_eq!(conds(s), retry_scheduled("DatabaseUnreachable"));
        assert!(message(s, ConditionType::Reconciling).contains("retrying in"));
        assert!(s.finished_at.is_some());
    }
    assert_eq!(
        h.fake.event_reasons("flaky"),
        [
            "Started",
            "RetryScheduled",
            "Started",
            "RetryScheduled",
            "Started",
            "Failed"
        ]
    );
    let events = h.fake.events("flaky");
    assert_eq!(events[1].1, "Warning");
    for r in h.fake.requests() {
        assert!(!r.raw_body.contains("Kx7-unreachable"));
    }
    h.assert_password_never_sent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_fails_without_ever_showing_it() {
    let h = Harness::new(Some(small())).await;
    let url = h.db().url().replace(&h.password, "Wr0ng-Pa55-word");
    h.fake.put_secret(NS, SECRET, "DATABASE_URL", &url);
    h.apply(UsageBackfillBuilder::new("auth").backoff_limit(0));
    let done = h.run_to_end("auth").await;
    assert_eq!(done.phase, Some(Phase::Failed));
    assert_eq!(
        cond(&done, ConditionType::Stalled),
        is("True", "BackoffLimitExceeded")
    );
    assert!(
        message(&done, ConditionType::Stalled).contains("last error (AuthenticationFailed)"),
        "{}",
        message(&done, ConditionType::Stalled)
    );
    for r in h.fake.requests() {
        assert!(
            !r.raw_body.contains("Wr0ng-Pa55-word"),
            "{} {:?}",
            r.method,
            r.body
        );
    }
    // Rotating the Secret to the right password retries at once.
    h.put_secret();
    let done = h.run_to_end("auth").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    h.assert_password_never_sent();
}

/// The application chart's default install keeps only POSTGRES_PASSWORD in
/// Secret multica-secrets; here the user comes from a second Secret. The
/// run waits for the missing Secret and key (naming them, never a value),
/// runs, fails after a password rotation in the database, and runs again
/// once the Secret holds the new password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_in_parts_from_two_secrets_and_a_rotated_password() {
    const FIRST: &str = "Pw-5e0a-FIRST";
    const SECOND: &str = "Pw-77b2-SECOND";
    const JWT: &str = "Jw-0c4d-not-a-password";
    let h = Harness::new(Some(small())).await;
    let role = h
        .db()
        .create_role(
            "parts",
            FIRST,
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role};",
        )
        .await;
    let config = h.db().config();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(host) => host.clone(),
        other => panic!("{other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    h.fake.put_secret(NS, "db-user", "USER", &role.name);
    h.create("parts", |s| {
        s.backoff_limit = 0;
        s.database = DatabaseSpec {
            host: Some(host.clone()),
            port: Some(port.into()),
            database: Some(h.db().name().to_owned()),
            user_from: Some(ValueFrom::secret("db-user", "USER")),
            password_from: Some(ValueFrom::secret("multica-secrets", "POSTGRES_PASSWORD")),
            ..DatabaseSpec::default()
        };
    });

    h.reconcile("parts").await;
    let s = h.status("parts");
    assert_eq!(
        cond(&s, ConditionType::Reconciling),
        is("True", "SecretNotFound")
    );
    assert!(
        message(&s, ConditionType::Reconciling)
            .starts_with(r#"Secret "multica-secrets" does not exist"#),
        "{}",
        message(&s, ConditionType::Reconciling)
    );
    h.fake.put_secret(NS, "multica-secrets", "JWT_SECRET", JWT);
    h.reconcile("parts").await;
    let s = h.status("parts");
    assert_eq!(
        cond(&s, ConditionType::Reconciling),
        is("True", "SecretKeyMissing")
    );
    assert!(
        message(&s, ConditionType::Reconciling)
            .starts_with(r#"Secret "multica-secrets" has no key "POSTGRES_PASSWORD""#),
        "{}",
        message(&s, ConditionType::Reconciling)
    );

    h.fake
        .put_secret(NS, "multica-secrets", "POSTGRES_PASSWORD", FIRST);
    let done = h.run_to_end("parts").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled), "{done:?}");
    assert_eq!(
        done.secret_resource_versions
            .as_deref()
            .map(|v| v.split(',').count()),
        Some(2),
        "both Secrets are tracked"
    );
    h.assert_rollup_correct().await;

    // The database's password is rotated; the Secret still has the old one.
    h.pg.batch_execute(&format!("ALTER ROLE \"{}\" PASSWORD '{SECOND}'", role.name))
        .await
        .unwrap();
    h.fake
        .edit_spec(NS, "parts", |s| s.run_id = "after-rotation".into());
    let failed = h.run_to_end("parts").await;
    assert_eq!(failed.phase, Some(Phase::Failed));
    assert!(
        message(&failed, ConditionType::Stalled).contains("AuthenticationFailed"),
        "{}",
        message(&failed, ConditionType::Stalled)
    );
    // The Secret catches up: the failed run starts afresh at once.
    h.fake
        .put_secret(NS, "multica-secrets", "POSTGRES_PASSWORD", SECOND);
    let done = h.run_to_end("parts").await;
    assert_eq!(done.phase, Some(Phase::Succeeded), "{done:?}");
    assert_eq!(done.attempts, Some(1));

    for r in h.fake.requests() {
        for secret in [FIRST, SECOND, JWT] {
            assert!(
                !r.raw_body.contains(secret),
                "{} {} sent {secret}",
                r.method,
                r.resource
            );
        }
    }
    h.assert_password_never_sent();
}

// ---------------------------------------------------------------------------
// Once per generation/runId, suspend
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_run_id_runs_again() {
    let h = Harness::new(Some(small())).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("rerun").run_id("first"));
    let first = h.run_to_end("rerun").await;
    assert_eq!(first.run_id.as_deref(), Some("first"));
    let first_watermark = first.watermark_after.clone().unwrap();

    // The same generation again: nothing.
    h.reconcile("rerun").await;
    assert_eq!(h.fake.event_reasons("rerun"), ["Started", "Succeeded"]);

    h.fake
        .edit_spec(NS, "rerun", |s| s.run_id = "second".into());
    h.reconcile("rerun").await;
    let pending = h.status("rerun");
    assert_eq!(pending.observed_generation, 2);
    assert_eq!(pending.run_id.as_deref(), Some("second"));
    assert_eq!(pending.phase, Some(Phase::Pending));
    assert_eq!(
        pending.rows_touched, None,
        "counts of the first run are gone"
    );
    assert_eq!(pending.attempts, Some(1));
    let second = h.run_to_end("rerun").await;
    assert_eq!(second.observed_generation, 2);
    assert_eq!(second.run_id.as_deref(), Some("second"));
    // The watermark was fresh, so the hook's lag check now skips.
    assert_eq!(second.result, Some(BackfillResult::Skipped));
    assert_eq!(second.skipped, Some(SkipReason::WatermarkWithinThreshold));
    assert!(second.watermark_after.unwrap() >= first_watermark);
    assert_eq!(
        h.fake.event_reasons("rerun"),
        ["Started", "Succeeded", "Started", "Skipped"]
    );
    h.assert_password_never_sent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_prevents_a_run() {
    let h = Harness::new(Some(small())).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("paused").suspend());
    h.reconcile("paused").await;
    let s = h.status("paused");
    assert_eq!(s.phase, Some(Phase::Pending));
    assert_eq!(
        conds(&s),
        [is("False", "Suspended"), is("False", "Suspended"), None]
    );
    assert_eq!(s.observed_generation, 1);
    assert!(!h.ctx.runner.is_active(&Harness::key("paused")));
    assert!(!writes_has_finalizer(&h.fake.get(NS, "paused").unwrap()));
    h.reconcile("paused").await;
    assert_eq!(h.fake.status_writes("paused").len(), 1, "no write loop");
    assert_eq!(h.fake.event_reasons("paused"), ["Suspended"]);
    assert_eq!(
        h.watermark().await,
        Some("1970-01-01T00:00:00Z".parse().unwrap()),
        "untouched"
    );

    h.fake.edit_spec(NS, "paused", |s| s.suspend = false);
    let done = h.run_to_end("paused").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.observed_generation, 2);
}

// ---------------------------------------------------------------------------
// The lock, deletion, restart, shutdown
// ---------------------------------------------------------------------------

/// Six months of history walked slowly: a run that lasts a few seconds.
fn slow_history() -> HistorySpec {
    HistorySpec {
        rows: 300,
        months: 6,
        ..HistorySpec::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_the_lock_shows_the_holder_and_keeps_a_heartbeat() {
    let mut settings = settings();
    settings.runner.heartbeat_interval = Duration::from_millis(300);
    let h = Harness::with_settings(Some(small()), settings).await;
    // Someone else (the cron tick, another backfill) holds lock 4246.
    let holder = h.db().client().await;
    holder
        .batch_execute("SET application_name = 'pg_cron rollup'; SELECT pg_advisory_lock(4246)")
        .await
        .unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("queued"));
    h.reconcile("queued").await;

    let waiting = h
        .fake
        .wait_for("WaitingForLock", WAIT, |f| {
            let s = f.get(NS, "queued")?.status?;
            (s.phase == Some(Phase::WaitingForLock)).then_some(s)
        })
        .await;
    let lock_holder = waiting.lock_holder.clone().unwrap();
    assert_eq!(lock_holder.pid, Some(holder_pid));
    assert_eq!(
        lock_holder.application_name.as_deref(),
        Some("pg_cron rollup")
    );
    assert_eq!(conds(&waiting), in_progress("WaitingForLock"));
    assert!(
        message(&waiting, ConditionType::Reconciling)
            .contains(&format!("pid {holder_pid} (pg_cron rollup)"))
    );
    assert!(
        h.fake
            .event_reasons("queued")
            .contains(&"WaitingForLock".to_owned())
    );

    // While it waits, heartbeatTime moves on.
    let first_beat = waiting.heartbeat_time.clone().unwrap();
    h.fake
        .wait_for("a later heartbeat", WAIT, |f| {
            let s = f.get(NS, "queued")?.status?;
            (s.phase == Some(Phase::WaitingForLock) && s.heartbeat_time? > first_beat).then_some(())
        })
        .await;

    holder
        .batch_execute("SELECT pg_advisory_unlock(4246)")
        .await
        .unwrap();
    let done = h.run_to_end("queued").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.lock_holder, None);
    h.assert_rollup_correct().await;
    h.assert_password_never_sent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletion_during_a_run_releases_the_lock_and_the_finalizer_and_stamps_nothing() {
    let h = Harness::new(Some(slow_history())).await;
    let watermark = h.watermark().await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("doomed").sleep_between_slices("400ms"));
    h.reconcile("doomed").await;
    h.wait_running("doomed", 1).await;
    let locks = h.lock_4246().await;
    assert_eq!(locks.len(), 1, "{locks:?}");
    assert!(
        locks[0].1 && locks[0].2 == "usage-backfill",
        "held by the run: {locks:?}"
    );
    assert!(writes_has_finalizer(&h.fake.get(NS, "doomed").unwrap()));

    h.fake.delete(NS, "doomed");
    let writes_before = h.fake.status_writes("doomed").len();
    h.reconcile_deletion("doomed").await;
    assert!(h.lock_4246().await.is_empty(), "lock 4246 released");
    assert_eq!(h.watermark().await, watermark, "nothing stamped");
    assert_eq!(
        h.fake.status_writes("doomed").len(),
        writes_before,
        "no status for a deleted object"
    );
    assert!(
        !h.fake
            .event_reasons("doomed")
            .contains(&"Succeeded".to_owned())
    );
    h.assert_password_never_sent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_controller_resumes_from_the_cursor() {
    let h = Harness::new(Some(slow_history())).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("resumable").sleep_between_slices("300ms"));
    h.reconcile("resumable").await;
    h.wait_running("resumable", 2).await;

    // The first controller stops (SIGTERM): the run is cancelled, saves its
    // status with the cursor, releases the lock and drops the finalizer.
    let left = h.ctx.runner.shutdown(WAIT).await;
    assert_eq!(left, 0);
    let saved = h.status("resumable");
    assert_eq!(
        saved.phase,
        Some(Phase::Running),
        "the phase stays for the next controller"
    );
    let cursor = saved.cursor.clone().expect("a cursor");
    let (done_before, rows_before) = (saved.slices_processed.unwrap(), saved.rows_touched.unwrap());
    assert!(
        done_before >= 2 && done_before < saved.slices_total.unwrap(),
        "{saved:?}"
    );
    assert!(message(&saved, ConditionType::Reconciling).contains("controller stopped"));
    assert!(h.lock_4246().await.is_empty(), "lock released on shutdown");
    assert!(!writes_has_finalizer(&h.fake.get(NS, "resumable").unwrap()));
    let watermark = h.watermark().await;
    assert_eq!(
        watermark,
        Some("1970-01-01T00:00:00Z".parse().unwrap()),
        "nothing stamped"
    );

    // A new controller (fresh context, nothing in memory) finds it Running.
    let writes_before = h.fake.status_writes("resumable").len();
    let h2 = h.restarted(settings());
    let done = h2.run_to_end("resumable").await;
    let after: Vec<UsageBackfillStatus> = h2.fake.statuses("resumable")[writes_before..].to_vec();
    let starting = &after[0];
    assert_eq!(starting.attempts, Some(1), "a restart is not a new attempt");
    assert_eq!(
        message(starting, ConditionType::Reconciling),
        format!(
            "continuing attempt 1 of 7 after a controller restart, resuming at {}",
            jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", cursor.0).unwrap()
        )
    );
    let first_slice = after
        .iter()
        .find(|s| s.phase == Some(Phase::Running) && s.cursor.as_ref() > Some(&cursor))
        .expect("a slice after the restart");
    assert_eq!(
        first_slice.slices_processed,
        Some(done_before + 1),
        "counting on, not over"
    );
    assert!(first_slice.rows_touched.unwrap() >= rows_before);
    assert_eq!(done.slices_processed, done.slices_total);
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(1));

    // The counts equal an uninterrupted run on an identical database.
    let (reference, rc) = testkit::database_with(&slow_history()).await;
    let full = usage_backfill_engine::run(
        &usage_backfill_engine::Database::parse(reference.url()).unwrap(),
        &usage_backfill_engine::Options::default(),
        &usage_backfill_engine::CancellationToken::new(),
        &mut |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        u64::from(done.slices_processed.unwrap()),
        full.slices_processed
    );
    assert_eq!(
        done.rows_touched,
        Some(full.rows_touched),
        "old + new = a full run"
    );
    assert_eq!(
        fixture::hourly_checksum(&h2.pg).await.unwrap(),
        fixture::hourly_checksum(&rc).await.unwrap()
    );
    h2.assert_rollup_correct().await;
    h2.assert_password_never_sent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_final_write_is_settled_by_the_next_reconcile() {
    let h = Harness::new(None).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("unsettled"));
    h.reconcile("unsettled").await;
    // Every try of the task's final status write fails (5 tries).
    h.fake.fail_status_writes("Succeeded", 5);
    let key = Harness::key("unsettled");
    tokio::time::timeout(WAIT, h.ctx.runner.wait_idle(&key))
        .await
        .unwrap();
    assert!(matches!(
        h.ctx.runner.view(&key),
        controller::TaskView::Unsettled { .. }
    ));
    assert_ne!(h.status("unsettled").phase, Some(Phase::Succeeded));
    let done = h.run_to_end("unsettled").await;
    assert_eq!(done.skipped, Some(SkipReason::TaskUsageEmpty));
    assert_eq!(h.ctx.runner.view(&key), controller::TaskView::None);
}

mod api_requests;
mod apiserver;
mod faults_controller;
mod leader;
mod lifecycle;
mod rbac_verbs;
mod resume_across_objects;
mod secrets_access;
mod wait;
mod whole;
