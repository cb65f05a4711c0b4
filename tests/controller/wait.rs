//! `usage-backfill wait` against the fake API server (`crates/testkit`): the
//! statuses a controller writes are set directly, and the outcome, the exit
//! code and the progress lines are checked. Every wait is bounded.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use usage_backfill_testkit as testkit;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use tokio_util::sync::CancellationToken;
use usage_backfill::cli::wait::{self, Outcome, WaitArgs};
use usage_backfill_api::{
    ConditionStatus, ConditionType, LockHolder, Phase, Reason, UsageBackfillSpec,
    UsageBackfillStatus,
};

use testkit::{FakeApiServer, Outage};

const NS: &str = "tenant-a";

fn args(name: &str) -> WaitArgs {
    WaitArgs {
        name: name.into(),
        namespace: Some(NS.into()),
        timeout: Duration::from_secs(20),
        poll: Duration::from_millis(100),
        not_found_grace: Duration::from_secs(5),
    }
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// A status for `generation` as the controller writes it.
fn status(generation: i64, phase: Phase) -> UsageBackfillStatus {
    let mut s = UsageBackfillStatus {
        observed_generation: generation,
        phase: Some(phase),
        ..Default::default()
    };
    let t = now();
    match phase {
        Phase::Pending => {
            s.set_condition(
                ConditionType::Ready,
                ConditionStatus::False,
                Reason::Pending,
                "queued",
                &t,
            );
            s.set_condition(
                ConditionType::Reconciling,
                ConditionStatus::True,
                Reason::Pending,
                "starting attempt 1 of 7",
                &t,
            );
        }
        Phase::WaitingForLock => {
            s.lock_holder = Some(LockHolder {
                pid: Some(4711),
                application_name: Some("pg_cron rollup".into()),
                client_addr: Some("10.0.0.7".into()),
                since: None,
            });
            s.set_condition(
                ConditionType::Reconciling,
                ConditionStatus::True,
                Reason::WaitingForLock,
                "waiting for advisory lock 4246",
                &t,
            );
        }
        Phase::Running => {
            s.set_condition(
                ConditionType::Reconciling,
                ConditionStatus::True,
                Reason::Running,
                "walking slices",
                &t,
            );
        }
        Phase::Succeeded => {
            s.set_condition(
                ConditionType::Ready,
                ConditionStatus::True,
                Reason::Backfilled,
                "backfilled 5 slices, 120 rows touched",
                &t,
            );
        }
        Phase::Failed => {
            s.last_error = Some("permission denied for function rollup".into());
            s.set_condition(
                ConditionType::Ready,
                ConditionStatus::False,
                Reason::BackoffLimitExceeded,
                "gave up",
                &t,
            );
            s.set_condition(
                ConditionType::Stalled,
                ConditionStatus::True,
                Reason::BackoffLimitExceeded,
                "attempt 7 of 7 failed (PermissionDenied): permission denied",
                &t,
            );
        }
    }
    s
}

/// The output of a wait, shared with the test.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Lines {
    fn get(&self) -> Vec<String> {
        String::from_utf8(self.0.lock().unwrap().clone())
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

/// A wait running in the background.
struct Waiting {
    lines: Lines,
    task: tokio::task::JoinHandle<Outcome>,
    cancel: CancellationToken,
}

fn start(client: kube::Client, args: WaitArgs) -> Waiting {
    let lines = Lines::default();
    let cancel = CancellationToken::new();
    let task = tokio::spawn({
        let mut out = lines.clone();
        let cancel = cancel.clone();
        async move { wait::wait(client, &args, &mut out, &cancel).await }
    });
    Waiting {
        lines,
        task,
        cancel,
    }
}

impl Waiting {
    async fn outcome(self) -> (Outcome, Vec<String>) {
        let outcome = tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the wait ends")
            .unwrap();
        (outcome, self.lines.get())
    }

    /// Waits until a printed line contains `text`.
    async fn until_printed(&self, text: &str) {
        let found = tokio::time::timeout(Duration::from_secs(10), async {
            while !self.lines.get().iter().any(|l| l.contains(text)) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "{text:?} never printed: {:?}",
            self.lines.get()
        );
    }
}

#[tokio::test]
async fn ready_for_the_current_generation_exits_0_at_once() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "done", UsageBackfillSpec::new("db"));
    fake.set_status(NS, "done", &status(1, Phase::Succeeded));
    let started = Instant::now();
    let (outcome, lines) = start(client, args("done")).outcome().await;
    assert_eq!(
        outcome,
        Outcome::Ready {
            reason: "Backfilled".into(),
            message: "backfilled 5 slices, 120 rows touched".into()
        }
    );
    assert_eq!(outcome.exit_code(), 0);
    assert!(lines.is_empty(), "nothing to report on the way: {lines:?}");
    assert!(started.elapsed() < Duration::from_secs(2));
    let gets: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.resource == "usagebackfills")
        .collect();
    assert_eq!(gets.len(), 1, "one GET");
    assert_eq!(
        (gets[0].method.as_str(), gets[0].namespace.as_deref()),
        ("GET", Some(NS))
    );
    assert_eq!(
        wait::describe(&outcome, &args("done")),
        "Ready (Backfilled): backfilled 5 slices, 120 rows touched"
    );
}

#[tokio::test]
async fn a_stale_generation_is_waited_out_with_progress_then_exits_0() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "upgrade", UsageBackfillSpec::new("db"));
    fake.set_status(NS, "upgrade", &status(1, Phase::Succeeded));
    // helm upgrade changes the spec: generation 2, the status still says 1.
    fake.edit_spec(NS, "upgrade", |s| s.run_id = "v2".into());
    let w = start(client, args("upgrade"));
    w.until_printed("generation 2 not observed yet").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !w.task.is_finished(),
        "a Ready of generation 1 does not count"
    );

    fake.set_status(NS, "upgrade", &status(2, Phase::Pending));
    w.until_printed("Pending [Pending]").await;
    fake.set_status(NS, "upgrade", &status(2, Phase::WaitingForLock));
    w.until_printed("lock 4246 held by pid 4711").await;
    let mut running = status(2, Phase::Running);
    running.set_slices(2, 5);
    running.rows_touched = Some(48);
    fake.set_status(NS, "upgrade", &running);
    w.until_printed("Running 2/5 slices, 48 rows").await;
    // Unchanged progress prints nothing new.
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.set_status(NS, "upgrade", &status(2, Phase::Succeeded));

    let (outcome, lines) = w.outcome().await;
    assert_eq!(outcome.exit_code(), 0, "{outcome:?}");
    assert_eq!(
        lines,
        [
            "usagebackfill tenant-a/upgrade: generation 2 not observed yet (the status describes generation 1)",
            "usagebackfill tenant-a/upgrade: Pending [Pending]: starting attempt 1 of 7",
            "usagebackfill tenant-a/upgrade: WaitingForLock, lock 4246 held by pid 4711 (pg_cron rollup) from 10.0.0.7 [WaitingForLock]: waiting for advisory lock 4246",
            "usagebackfill tenant-a/upgrade: Running 2/5 slices, 48 rows [Running]: walking slices",
        ]
    );
}

#[tokio::test]
async fn stalled_exits_3_with_the_condition_message() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "broken", UsageBackfillSpec::new("db"));
    let w = start(client, args("broken"));
    w.until_printed("not picked up by the controller yet").await;
    fake.set_status(NS, "broken", &status(1, Phase::Failed));
    let (outcome, _) = w.outcome().await;
    assert_eq!(
        outcome,
        Outcome::Failed {
            reason: "BackoffLimitExceeded".into(),
            message: "attempt 7 of 7 failed (PermissionDenied): permission denied".into()
        }
    );
    assert_eq!(outcome.exit_code(), 3);
    assert_eq!(
        wait::describe(&outcome, &args("broken")),
        "failed (BackoffLimitExceeded): attempt 7 of 7 failed (PermissionDenied): permission denied"
    );
}

#[tokio::test]
async fn failed_phase_without_stalled_exits_3_with_the_last_error() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "failed", UsageBackfillSpec::new("db"));
    let mut s = status(1, Phase::Failed);
    s.remove_condition(ConditionType::Stalled);
    fake.set_status(NS, "failed", &s);
    let (outcome, _) = start(client, args("failed")).outcome().await;
    assert_eq!(
        outcome,
        Outcome::Failed {
            reason: "BackoffLimitExceeded".into(),
            message: "permission denied for function rollup".into()
        }
    );
    assert_eq!(outcome.exit_code(), 3);
}

#[tokio::test]
async fn a_stalled_previous_generation_is_not_a_failure_of_this_one() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "fixed", UsageBackfillSpec::new("db"));
    fake.set_status(NS, "fixed", &status(1, Phase::Failed));
    fake.edit_spec(NS, "fixed", |s| s.run_id = "retry".into());
    let w = start(client, args("fixed"));
    w.until_printed("generation 2 not observed yet").await;
    fake.set_status(NS, "fixed", &status(2, Phase::Succeeded));
    let (outcome, _) = w.outcome().await;
    assert_eq!(outcome.exit_code(), 0, "{outcome:?}");
}

#[tokio::test]
async fn timeout_exits_1_with_the_last_progress() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "slow", UsageBackfillSpec::new("db"));
    let mut running = status(1, Phase::Running);
    running.set_slices(1, 40);
    fake.set_status(NS, "slow", &running);
    let mut a = args("slow");
    a.timeout = Duration::from_millis(400);
    let started = Instant::now();
    let (outcome, lines) = start(client, a.clone()).outcome().await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert_eq!(
        outcome,
        Outcome::TimedOut {
            last: "Running 1/40 slices [Running]: walking slices".into()
        }
    );
    assert_eq!(outcome.exit_code(), 1);
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(
        wait::describe(&outcome, &a),
        "not Ready within 400ms; last seen: Running 1/40 slices [Running]: walking slices"
    );
}

#[tokio::test]
async fn a_missing_resource_is_waited_for_within_the_grace_period_only() {
    let (client, fake) = FakeApiServer::start();
    let mut a = args("nope");
    a.not_found_grace = Duration::from_millis(300);
    let (outcome, lines) = start(client.clone(), a).outcome().await;
    assert_eq!(outcome, Outcome::NotFound { deleted: false });
    assert_eq!(outcome.exit_code(), 3);
    assert_eq!(
        lines,
        [
            "usagebackfill tenant-a/nope: does not exist yet; waiting up to 300ms for it to be created"
        ]
    );

    // Created within the grace period: waited for.
    let w = start(client, args("late"));
    w.until_printed("does not exist yet").await;
    fake.create(NS, "late", UsageBackfillSpec::new("db"));
    fake.set_status(NS, "late", &status(1, Phase::Succeeded));
    assert_eq!(w.outcome().await.0.exit_code(), 0);
}

#[tokio::test]
async fn deletion_while_waiting_exits_3() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "doomed", UsageBackfillSpec::new("db"));
    fake.set_status(NS, "doomed", &status(1, Phase::Running));
    let w = start(client, args("doomed"));
    w.until_printed("Running").await;
    fake.delete(NS, "doomed");
    let (outcome, _) = w.outcome().await;
    assert_eq!(outcome, Outcome::NotFound { deleted: true });
    assert_eq!(outcome.exit_code(), 3);
}

#[tokio::test]
async fn api_errors_are_retried_and_forbidden_is_final() {
    let (client, fake) = FakeApiServer::start();
    let (other, other_id) = fake.connect();
    fake.create(NS, "flaky", UsageBackfillSpec::new("db"));
    fake.set_status(NS, "flaky", &status(1, Phase::Running));
    fake.cut(0, Some(Outage::Fail));
    let w = start(client, args("flaky"));
    w.until_printed("cannot read it").await;
    fake.cut(0, None);
    w.until_printed("Running").await;
    fake.set_status(NS, "flaky", &status(1, Phase::Succeeded));
    assert_eq!(w.outcome().await.0.exit_code(), 0);

    fake.cut(other_id, Some(Outage::Forbid));
    let (outcome, _) = start(other, args("flaky")).outcome().await;
    assert!(matches!(outcome, Outcome::Forbidden { .. }), "{outcome:?}");
    assert_eq!(outcome.exit_code(), 3);
}

#[tokio::test]
async fn a_signal_interrupts_the_wait_with_130() {
    let (client, fake) = FakeApiServer::start();
    fake.create(NS, "long", UsageBackfillSpec::new("db"));
    let w = start(client, args("long"));
    w.until_printed("not picked up").await;
    w.cancel.cancel();
    let (outcome, _) = w.outcome().await;
    assert_eq!(outcome, Outcome::Interrupted);
    assert_eq!(outcome.exit_code(), 130);
}

#[tokio::test]
async fn the_namespace_defaults_to_the_clients() {
    let (client, fake) = FakeApiServer::start();
    fake.create("default", "here", UsageBackfillSpec::new("db"));
    fake.set_status("default", "here", &status(1, Phase::Succeeded));
    let mut a = args("here");
    a.namespace = None;
    assert_eq!(start(client, a).outcome().await.0.exit_code(), 0);
}
