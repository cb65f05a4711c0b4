//! Faults and bad input at the controller level: the operator process
//! SIGKILLed mid-run (the real binary, against the fake API server served
//! over HTTP), two UsageBackfills on one database, a cron tick during a
//! run, deletion mid-run, a rotated Secret, a stalled slice, PostgreSQL
//! restarted mid-run, and bad input that must end in a specific status
//! reason and an Event without a database write.
//!
//! The test database is instrumented: the window function is wrapped (a
//! configurable sleep or stall, and a log of every committed call with the
//! session's pid, application_name, role and timestamps), and a trigger logs
//! every UPDATE of `watermark_at` (the stamp counter). Every fault case ends
//! with the hourly table equal to an independent recompute, lock 4246
//! released and the watermark stamped exactly once per finished run. Every
//! wait has a timeout; sleeps only pace polling.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use serde_json::json;
use tokio_postgres::Client as PgClient;
use usage_backfill_api::{
    BackfillResult, CaSecretRef, ConditionType, Mode, Phase, SkipReason, TlsMode, TlsSpec,
    UsageBackfillSpec, UsageBackfillStatus,
};
use usage_backfill_controller::{self as controller, Context, Settings};
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_standin::pgtemp::{TempPostgres, TempPostgresOptions};
use usage_backfill_testkit::{self as testkit, lock_4246};

use testkit::FakeApiServer;
use testkit::engine::assert_correct;
use testkit::harness::{Harness, NS, SECRET, UsageBackfillBuilder, WAIT, password_of};
use testkit::instrument::{
    Call, backfill_stamps, calls, instrument, slow_window, stall_window_from,
};
use testkit::status::{cond, conds, in_progress, is, message, retry_scheduled, secs, stalled};
use testkit::tls::{self, TestCa};

// ---------------------------------------------------------------------------
// Database instrumentation: the test kit's (`testkit::instrument`)
// ---------------------------------------------------------------------------

/// The database clock.
async fn db_now(pg: &PgClient) -> Timestamp {
    pg.query_one("SELECT clock_timestamp()", &[])
        .await
        .unwrap()
        .get(0)
}

/// How a fault case must end: the rollup equals an independent recompute,
/// the migration guard passes, lock 4246 is free, and the backfill stamped
/// the watermark exactly `stamps` times (once per finished run).
async fn assert_recovered(pg: &PgClient, stamps: usize) {
    assert_correct(pg).await;
    assert!(lock_4246(pg).await.is_empty(), "lock 4246 released");
    let stamped = backfill_stamps(pg).await;
    assert_eq!(stamped.len(), stamps, "watermark stamps: {stamped:?}");
}

/// What "no database write" is measured by.
#[derive(Debug, PartialEq)]
struct Untouched {
    checksum: String,
    watermark: String,
    calls: usize,
    stamps: usize,
}

async fn untouched(pg: &PgClient) -> Untouched {
    Untouched {
        checksum: fixture::hourly_checksum(pg).await.unwrap(),
        watermark: watermark_text(pg).await,
        calls: calls(pg).await.len(),
        stamps: backfill_stamps(pg).await.len(),
    }
}

/// The watermark as text, also when it is NULL, its row or its table gone.
async fn watermark_text(pg: &PgClient) -> String {
    let table: Option<String> = pg
        .query_one(
            "SELECT to_regclass('task_usage_hourly_rollup_state')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    if table.is_none() {
        return "no table".into();
    }
    let row = pg
        .query_opt(
            "SELECT coalesce(watermark_at::text, 'NULL')
               FROM task_usage_hourly_rollup_state WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
    row.map_or_else(|| "no row".into(), |r| r.get(0))
}

// ---------------------------------------------------------------------------
// The controller, driven reconcile by reconcile
// ---------------------------------------------------------------------------

/// [`testkit::settings`] (every slice is written, so that a fault can be
/// timed on it), with frequent heartbeats and a session setting.
fn settings() -> Settings {
    let mut settings = Settings {
        session_settings: vec![("enable_nestloop".into(), "off".into())],
        ..testkit::settings()
    };
    settings.runner.heartbeat_interval = Duration::from_millis(500);
    settings
}

fn history() -> HistorySpec {
    HistorySpec {
        rows: 300,
        months: 4,
        ..HistorySpec::default()
    }
}

/// A harness on a fresh test database with `history`, instrumented, and
/// [`settings`].
async fn instrumented(history: Option<HistorySpec>) -> Harness {
    let h = Harness::with_settings(history, settings()).await;
    instrument(&h.pg).await;
    h
}

// ---------------------------------------------------------------------------
// The operator process SIGKILLed mid-run, and restarted
// ---------------------------------------------------------------------------

/// `usage-backfill controller` as a subprocess, talking to `server`.
struct Operator {
    child: tokio::process::Child,
    log: PathBuf,
}

impl Operator {
    fn start(
        server: &testkit::apiserver::over_http::HttpServer,
        dir: &Path,
        tag: &str,
    ) -> Operator {
        let kubeconfig = server.write_kubeconfig(dir);
        let log = dir.join(format!("operator-{tag}.log"));
        let stderr = std::fs::File::create(&log).unwrap();
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_usage-backfill"))
            .args([
                "controller",
                "--leader-election=false",
                "--namespace",
                NS,
                "--health-addr",
                "127.0.0.1:0",
                "--retry-backoff",
                "200ms",
                "--shutdown-timeout",
                "10s",
                // Every slice's progress, as in the other tests: the kill
                // is timed on progress recorded mid-run.
                "--progress-interval",
                "0s",
            ])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "trace")
            .env("POD_NAME", format!("usage-backfill-{tag}"))
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("WATCH_NAMESPACE")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("ALL_PROXY")
            .env_remove("all_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("starting usage-backfill controller");
        Operator { child, log }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn pid(&self) -> u32 {
        self.child.id().expect("still running")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_sigkilled_mid_run_resumes_from_the_cursor_when_restarted() {
    let (db, pg) = testkit::database_with(&HistorySpec {
        rows: 300,
        months: 6,
        ..HistorySpec::default()
    })
    .await;
    instrument(&pg).await;
    slow_window(&pg, 0.4).await;
    let password = password_of(db.url());
    let (_, fake) = FakeApiServer::start();
    fake.put_secret(NS, SECRET, "DATABASE_URL", db.url());
    fake.create(NS, "killed", UsageBackfillSpec::new(SECRET));
    let dir = tempfile::tempdir().unwrap();

    // The first operator process: wait until it has recorded progress.
    let first_server = fake.serve_http().await;
    let mut first = Operator::start(&first_server, dir.path(), "first");
    let mid_run = tokio::time::timeout(WAIT, async {
        loop {
            let s = fake.get(NS, "killed").and_then(|o| o.status);
            if let Some(s) = s
                && s.phase == Some(Phase::Running)
                && s.cursor.is_some()
                && s.slices_processed
                    .is_some_and(|p| p >= 1 && Some(p) < s.slices_total)
            {
                return s;
            }
            if let Ok(Some(exit)) = first.child.try_wait() {
                panic!("the operator exited: {exit}\n{}", first.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "no progress recorded; requests:\n{}\nlogs:\n{}",
            fake.describe_requests(),
            first.logs()
        )
    });
    assert!(mid_run.slices_total.unwrap() >= 2, "{mid_run:?}");
    let lock_session = lock_4246(&pg).await;
    assert!(
        matches!(lock_session.as_slice(), [(_, true, app)] if app == "usage-backfill"),
        "{lock_session:?}"
    );
    let lock_session = lock_session[0].0;

    // kill -9: no shutdown, no final status, the finalizer stays.
    first.child.start_kill().unwrap();
    let exit = tokio::time::timeout(WAIT, first.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.signal(), Some(9), "{exit}");
    // Calls started from now on are the second process's.
    let killed_at = db_now(&pg).await;
    drop(first_server);
    let saved = fake.get(NS, "killed").unwrap();
    assert!(
        controller::has_finalizer(&saved),
        "a killed process removes nothing"
    );
    let saved = saved.status.unwrap();
    assert_eq!(saved.phase, Some(Phase::Running));
    let cursor = saved.cursor.clone().unwrap().0;
    let done_before = saved.slices_processed.unwrap();
    assert!(done_before >= 1 && done_before < saved.slices_total.unwrap());
    assert!(
        backfill_stamps(&pg).await.is_empty(),
        "the killed run stamped nothing"
    );

    // The second process finds the status Running with no task behind it
    // and continues the attempt from the saved cursor (it may first wait
    // for lock 4246 until PostgreSQL has ended the killed session).
    let second_server = fake.serve_http().await;
    let mut second = Operator::start(&second_server, dir.path(), "second");
    let done = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(o) = fake.get(NS, "killed")
                && let Some(s) = o.status.clone()
                && s.phase.is_some_and(Phase::is_finished)
                && !controller::has_finalizer(&o)
            {
                return s;
            }
            if let Ok(Some(exit)) = second.child.try_wait() {
                panic!("the operator exited: {exit}\n{}", second.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the second operator did not finish; requests:\n{}\nlogs:\n{}",
            fake.describe_requests(),
            second.logs()
        )
    });
    assert_eq!(done.phase, Some(Phase::Succeeded), "{done:?}");
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(1), "a restart is not a new attempt");
    assert_eq!(done.slices_processed, done.slices_total);
    assert_eq!(done.watermark_stamped, Some(true));

    // What the second process wrote: it continued, from the cursor, counting on.
    let after: Vec<UsageBackfillStatus> = fake
        .status_writes("killed")
        .iter()
        .filter(|r| r.client == second_server.client)
        .filter_map(|r| r.status())
        .collect();
    let show = jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", cursor).unwrap();
    assert_eq!(
        message(&after[0], ConditionType::Reconciling),
        format!("continuing attempt 1 of 7 after a controller restart, resuming at {show}")
    );
    // Progress is written at most once a second by the binary: the counts
    // it shows only ever continue from the saved ones.
    for s in &after {
        assert!(s.slices_processed >= Some(done_before), "{s:?}");
        assert!(s.rows_touched >= saved.rows_touched, "{s:?}");
    }
    let waited: Vec<&UsageBackfillStatus> = after
        .iter()
        .filter(|s| s.phase == Some(Phase::WaitingForLock))
        .collect();
    for s in &waited {
        // Only ever the killed process's session, until PostgreSQL ends it.
        assert_eq!(
            s.lock_holder.as_ref().unwrap().pid,
            Some(lock_session),
            "{s:?}"
        );
    }

    // In the database: the second session's first window call starts at
    // the saved cursor, and it walks exactly the slices after it.
    let all = calls(&pg).await;
    let total = done.slices_total.unwrap() as usize;
    let resumed: Vec<&Call> = all.iter().filter(|c| c.started > killed_at).collect();
    assert_eq!(
        resumed.iter().map(|c| c.from).min(),
        Some(cursor),
        "resumed from the cursor: {all:?}"
    );
    assert_eq!(resumed.len(), total - done_before as usize, "{all:?}");
    assert!(
        all.len() < 2 * total,
        "not walked from the beginning: {all:?}"
    );
    let stamps = backfill_stamps(&pg).await;
    assert_eq!(stamps.len(), 1, "{stamps:?}");
    assert_recovered(&pg, 1).await;

    // SIGTERM: the idle operator exits cleanly.
    let pid = second.pid();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let exit = tokio::time::timeout(WAIT, second.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0), "{exit}\n{}", second.logs());
    for (tag, logs) in [("first", first.logs()), ("second", second.logs())] {
        assert!(logs.contains("TRACE"), "{tag}: trace logging is on");
        assert!(
            !logs.contains(&password),
            "{tag}: the database password is in the operator's logs"
        );
    }
    for r in fake.requests() {
        assert!(!r.raw_body.contains(&password), "{} {}", r.method, r.path);
    }
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
}

// ---------------------------------------------------------------------------
// Two UsageBackfills on one database; a cron tick during a run
// ---------------------------------------------------------------------------

/// Waits until a session of `app` holds (`granted`) or waits for lock 4246.
async fn wait_lock(pg: &PgClient, app: &str, granted: bool) -> i32 {
    tokio::time::timeout(WAIT, async {
        loop {
            let locks = lock_4246(pg).await;
            if let Some((pid, ..)) = locks.iter().find(|(_, g, a)| *g == granted && a == app) {
                return *pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "{app} never {} lock 4246",
            if granted { "held" } else { "waited for" }
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backfills_on_one_database_run_one_after_the_other() {
    let h = instrumented(Some(history())).await;
    slow_window(&h.pg, 0.2).await;
    // The first run's window calls wait (they read fault_knobs) until the
    // other two are seen waiting for lock 4246: on a busy machine the first
    // run could otherwise end before they ask for it.
    let gate = testkit::client(&h.url).await;
    gate.batch_execute("BEGIN; LOCK TABLE fault_knobs IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    h.put_secret();
    // Created together: an IfLagging hook, an Always command, another hook.
    h.apply(UsageBackfillBuilder::new("first").application_name("backfill-first"));
    h.apply(
        UsageBackfillBuilder::new("second")
            .mode(Mode::Always)
            .application_name("backfill-second"),
    );
    h.apply(UsageBackfillBuilder::new("third").application_name("backfill-third"));

    h.reconcile("first").await;
    let holder = wait_lock(&h.pg, "backfill-first", true).await;
    h.reconcile("second").await;
    wait_lock(&h.pg, "backfill-second", false).await;
    h.reconcile("third").await;
    wait_lock(&h.pg, "backfill-third", false).await;
    for name in ["second", "third"] {
        let waiting = h
            .fake
            .wait_for(&format!("{name} WaitingForLock"), WAIT, |f| {
                let s = f.get(NS, name)?.status?;
                (s.phase == Some(Phase::WaitingForLock)).then_some(s)
            })
            .await;
        let lock_holder = waiting.lock_holder.clone().expect("the holder is shown");
        assert_eq!(lock_holder.pid, Some(holder), "{name}");
        assert_eq!(
            lock_holder.application_name.as_deref(),
            Some("backfill-first")
        );
        assert_eq!(conds(&waiting), in_progress("WaitingForLock"));
        assert!(
            message(&waiting, ConditionType::Reconciling)
                .contains(&format!("pid {holder} (backfill-first)")),
            "{}",
            message(&waiting, ConditionType::Reconciling)
        );
        assert!(
            h.fake
                .event_reasons(name)
                .contains(&"WaitingForLock".to_owned())
        );
    }
    gate.batch_execute("COMMIT").await.unwrap();

    let first = h.run_to_end("first").await;
    let second = h.run_to_end("second").await;
    let third = h.run_to_end("third").await;
    assert_eq!(first.result, Some(BackfillResult::Backfilled));
    // Always walks whatever the watermark says.
    assert_eq!(second.result, Some(BackfillResult::Backfilled));
    assert_eq!(second.slices_processed, second.slices_total);
    // The hook re-checks under the lock and finds the work done.
    assert_eq!(third.result, Some(BackfillResult::Skipped));
    assert_eq!(third.skipped, Some(SkipReason::WatermarkWithinThreshold));
    for s in [&first, &second, &third] {
        assert_eq!(s.watermark_stamped, Some(true));
        assert_eq!(s.lock_holder, None);
    }

    // Never interleaved: each run's window calls form one block, and a
    // block starts only after the previous run stamped.
    let all = calls(&h.pg).await;
    let mut blocks: Vec<(&str, Timestamp, Timestamp)> = Vec::new();
    for c in &all {
        match blocks.last_mut() {
            Some((app, _, end)) if *app == c.app => *end = c.finished,
            _ => blocks.push((c.app.as_str(), c.started, c.finished)),
        }
    }
    let order: Vec<&str> = blocks.iter().map(|b| b.0).collect();
    // The hook's skip rolls up the one window from the watermark to its
    // stamp before stamping: a block of its own, last.
    assert_eq!(
        order,
        ["backfill-first", "backfill-second", "backfill-third"],
        "{all:?}"
    );
    let stamps = backfill_stamps(&h.pg).await;
    let stamp_of = |app: &str| -> Timestamp {
        let mine: Vec<_> = stamps.iter().filter(|(a, _)| a == app).collect();
        assert_eq!(mine.len(), 1, "{app} stamped exactly once: {stamps:?}");
        mine[0].1
    };
    let (first_stamp, second_stamp, third_stamp) = (
        stamp_of("backfill-first"),
        stamp_of("backfill-second"),
        stamp_of("backfill-third"),
    );
    assert!(blocks[0].2 < first_stamp && first_stamp < blocks[1].1);
    assert!(blocks[1].2 < second_stamp);
    assert!(
        first_stamp < third_stamp,
        "the hook ran after the first run"
    );
    assert!(second_stamp < blocks[2].1 && blocks[2].2 < third_stamp);
    let third_calls: Vec<_> = all.iter().filter(|c| c.app == "backfill-third").collect();
    assert_eq!(third_calls.len(), 1, "{all:?}");
    assert_eq!(
        Some(secs(third_calls[0].from)),
        second.watermark_after,
        "from the watermark the second run stamped"
    );
    assert_eq!(
        all.iter().filter(|c| c.app == "backfill-first").count(),
        first.slices_total.unwrap() as usize
    );
    assert_eq!(
        all.iter().filter(|c| c.app == "backfill-second").count(),
        second.slices_total.unwrap() as usize
    );
    assert_recovered(&h.pg, 3).await;
    h.assert_never_sent(&[&password_of(&h.url)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cron_tick_during_the_controllers_backfill_gets_nothing_and_the_next_one_works() {
    let h = instrumented(Some(history())).await;
    slow_window(&h.pg, 0.2).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("ticked"));
    h.reconcile("ticked").await;
    h.wait_running("ticked", 1).await;
    let before = fixture::watermark(&h.pg).await.unwrap();
    let calls_before = calls(&h.pg).await.len();

    // pg_cron's tick, while the controller's run holds lock 4246.
    assert_eq!(fixture::rollup_tick(&h.pg).await.unwrap(), 0);
    assert_eq!(fixture::watermark(&h.pg).await.unwrap(), before);
    let tick_calls = calls(&h.pg)
        .await
        .into_iter()
        .filter(|c| c.app.is_empty())
        .count();
    assert_eq!(tick_calls, 0, "the tick called no window");
    assert!(calls(&h.pg).await.len() >= calls_before);

    let done = h.run_to_end("ticked").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_recovered(&h.pg, 1).await;
    let stamped = fixture::watermark(&h.pg).await.unwrap().unwrap();
    assert_eq!(done.watermark_after, Some(secs(stamped)));

    // A late correction just after the watermark: the next tick picks it up.
    h.pg.batch_execute(
        "UPDATE task_usage SET input_tokens = input_tokens + 1000,
                updated_at = (SELECT watermark_at FROM task_usage_hourly_rollup_state WHERE id = 1)
                             + interval '1 millisecond'
          WHERE id = (SELECT id FROM task_usage ORDER BY created_at DESC LIMIT 1)",
    )
    .await
    .unwrap();
    assert_eq!(fixture::recompute_mismatches(&h.pg).await.unwrap(), 1);
    assert!(fixture::rollup_tick(&h.pg).await.unwrap() >= 1);
    assert!(fixture::watermark(&h.pg).await.unwrap().unwrap() > stamped);
    let last_error: Option<String> =
        h.pg.query_one(
            "SELECT last_error FROM task_usage_hourly_rollup_state WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(last_error, None);
    assert_recovered(&h.pg, 1).await;
}

// ---------------------------------------------------------------------------
// Deletion, rotated password, stalled slice, PostgreSQL restart
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_mid_run_cancels_releases_the_lock_and_stamps_nothing() {
    let h = instrumented(Some(history())).await;
    slow_window(&h.pg, 0.3).await;
    let watermark = fixture::watermark(&h.pg).await.unwrap();
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("doomed"));
    h.reconcile("doomed").await;
    let running = h.wait_running("doomed", 1).await;
    assert_eq!(lock_4246(&h.pg).await.len(), 1);

    h.fake.delete(NS, "doomed");
    let writes = h.fake.status_writes("doomed").len();
    h.reconcile_deletion("doomed").await;
    assert!(lock_4246(&h.pg).await.is_empty(), "lock 4246 released");
    assert_eq!(fixture::watermark(&h.pg).await.unwrap(), watermark);
    assert!(backfill_stamps(&h.pg).await.is_empty(), "nothing stamped");
    let walked = calls(&h.pg).await.len();
    assert!(walked < running.slices_total.unwrap() as usize);
    // A progress write already under way when the object was deleted may
    // still land; the cancelled run writes no outcome to it.
    let late = h.fake.statuses("doomed")[writes..].to_vec();
    assert!(
        late.iter().all(|s| s.phase == Some(Phase::Running)),
        "{late:?}"
    );
    assert!(
        !h.fake
            .event_reasons("doomed")
            .contains(&"Succeeded".to_owned())
    );

    // The committed slices stay; a new resource finishes the job.
    slow_window(&h.pg, 0.0).await;
    h.apply(UsageBackfillBuilder::new("again"));
    let done = h.run_to_end("again").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_recovered(&h.pg, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_password_fails_retryably_and_the_updated_secret_is_used_next() {
    const OLD: &str = "Rotate-0ld-8c1e-SECRET";
    const NEW: &str = "Rotate-N3w-8c1e-SECRET";
    let h = instrumented(Some(history())).await;
    let db = h.db();
    let role = db
        .create_role(
            "app",
            OLD,
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role};",
        )
        .await;
    h.fake.put_secret(NS, SECRET, "DATABASE_URL", &role.url);
    // The DBA rotates the role's password; the Secret still has the old one.
    h.pg.batch_execute(&format!("ALTER ROLE \"{}\" PASSWORD '{NEW}'", role.name))
        .await
        .unwrap();
    let before = untouched(&h.pg).await;
    h.apply(UsageBackfillBuilder::new("rotated"));

    let failed = h.attempt("rotated").await;
    assert_eq!(failed.phase, Some(Phase::Pending));
    assert_eq!(
        conds(&failed),
        retry_scheduled("AuthenticationFailed"),
        "retryable, not Stalled"
    );
    assert_eq!(failed.attempts, Some(1));
    assert!(
        failed
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("password authentication failed")),
        "{:?}",
        failed.last_error
    );
    let events = h.fake.events("rotated");
    assert_eq!(events.last().unwrap().0, "RetryScheduled");
    assert_eq!(events.last().unwrap().1, "Warning");
    assert_eq!(untouched(&h.pg).await, before, "no database write");

    // The Secret is updated: the next attempt uses the new password at once
    // (a fresh sequence of attempts, no backoff).
    h.fake
        .put_secret(NS, SECRET, "DATABASE_URL", &role.url.replace(OLD, NEW));
    h.reconcile("rotated").await;
    let starting = h.status("rotated");
    assert!(
        message(&starting, ConditionType::Reconciling)
            .starts_with("the Secret changed: starting attempt 1 of 7"),
        "{}",
        message(&starting, ConditionType::Reconciling)
    );
    let done = h.run_to_end("rotated").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(1));
    assert_eq!(done.last_error, None);
    let walked = calls(&h.pg).await;
    assert!(!walked.is_empty() && walked.iter().all(|c| c.usr == role.name));
    assert_eq!(
        h.fake.event_reasons("rotated"),
        ["Started", "RetryScheduled", "Started", "Succeeded"]
    );
    h.assert_never_sent(&[OLD, NEW]);
    assert_recovered(&h.pg, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_slice_times_out_retryably_and_the_retry_resumes() {
    let h = instrumented(Some(history())).await;
    // Window calls from the third month of history on never return.
    let stall_from: Timestamp =
        h.pg.query_one(
            "SELECT (date_trunc('month', min(least(created_at, coalesce(updated_at, created_at)))
                                 AT TIME ZONE 'UTC') + interval '2 months') AT TIME ZONE 'UTC'
               FROM task_usage",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    stall_window_from(&h.pg, Some(stall_from)).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("stalled").slice_timeout("1s"));

    let failed = h.attempt("stalled").await;
    assert_eq!(conds(&failed), retry_scheduled("SliceTimeout"));
    assert!(
        failed
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("exceeded the statement timeout of 1s")),
        "{:?}",
        failed.last_error
    );
    assert!(failed.slices_processed >= Some(1), "{failed:?}");
    let cursor = failed.cursor.clone().expect("a cursor").0;
    assert!(cursor >= stall_from, "{cursor} {stall_from}");
    let first_attempt = calls(&h.pg).await;
    assert_eq!(first_attempt.len() as u32, failed.slices_processed.unwrap());
    assert!(first_attempt.iter().all(|c| c.from < stall_from));
    assert!(lock_4246(&h.pg).await.is_empty(), "released while it waits");
    assert!(backfill_stamps(&h.pg).await.is_empty());
    assert_eq!(
        h.fake.event_reasons("stalled"),
        ["Started", "RetryScheduled"]
    );

    // Repaired; the retry resumes at the stalled slice.
    stall_window_from(&h.pg, None).await;
    let done = h.run_to_end("stalled").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(2));
    assert_eq!(done.slices_processed, done.slices_total);
    let all = calls(&h.pg).await;
    let retried = &all[first_attempt.len()..];
    assert_eq!(
        retried.iter().map(|c| c.from).min(),
        Some(cursor),
        "the retry resumed at the stalled slice: {all:?}"
    );
    assert_eq!(
        all.len(),
        done.slices_total.unwrap() as usize,
        "every slice walked once"
    );
    assert_recovered(&h.pg, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_session_terminated_under_the_controller_then_the_retry_completes() {
    let h = instrumented(Some(history())).await;
    slow_window(&h.pg, 0.3).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("terminated"));
    h.reconcile("terminated").await;
    h.wait_running("terminated", 1).await;
    let holder = wait_lock(&h.pg, "usage-backfill", true).await;
    let killed: bool =
        h.pg.query_one("SELECT pg_terminate_backend($1)", &[&holder])
            .await
            .unwrap()
            .get(0);
    assert!(killed);
    let failed = h.status_after_attempt("terminated").await;
    assert_eq!(
        cond(&failed, ConditionType::Ready),
        is("False", "RetryScheduled"),
        "{failed:?}"
    );
    let reconciling = cond(&failed, ConditionType::Reconciling).unwrap();
    assert_eq!(reconciling.0, "True");
    assert!(
        ["SliceFailed", "DatabaseError", "LockLost"].contains(&reconciling.1.as_str()),
        "{reconciling:?}"
    );
    assert_eq!(cond(&failed, ConditionType::Stalled), None);
    assert!(
        lock_4246(&h.pg).await.is_empty(),
        "the lock died with the session"
    );
    assert!(backfill_stamps(&h.pg).await.is_empty(), "not stamped");
    let cursor = failed.cursor.clone().expect("a cursor").0;

    slow_window(&h.pg, 0.0).await;
    let retry_from = db_now(&h.pg).await;
    let done = h.run_to_end("terminated").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(2));
    assert_eq!(done.slices_processed, done.slices_total);
    let all = calls(&h.pg).await;
    assert_eq!(
        all.iter()
            .filter(|c| c.started > retry_from)
            .map(|c| c.from)
            .min(),
        Some(cursor),
        "resumed from the cursor: {all:?}"
    );
    assert_recovered(&h.pg, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_under_the_controller_then_the_retry_completes() {
    // A server of our own: restarting the shared one breaks other tests.
    let server = TempPostgres::start(TempPostgresOptions::default())
        .await
        .unwrap();
    let (url, pg) = testkit::fixture_database(&server, "restart").await;
    fixture::generate(&pg, &history()).await.unwrap();
    instrument(&pg).await;
    slow_window(&pg, 0.4).await;
    drop(pg);
    let h = Harness::on(&url, settings()).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("restarted"));
    h.reconcile("restarted").await;
    h.wait_running("restarted", 1).await;

    let server = tokio::task::spawn_blocking(move || {
        server.restart().unwrap();
        server
    })
    .await
    .unwrap();
    let failed = h.status_after_attempt("restarted").await;
    assert_eq!(
        cond(&failed, ConditionType::Ready),
        is("False", "RetryScheduled"),
        "{failed:?}"
    );
    assert_eq!(
        failed
            .condition(ConditionType::Reconciling)
            .map(|c| c.status.as_str()),
        Some("True")
    );
    assert_eq!(cond(&failed, ConditionType::Stalled), None);
    let cursor = failed.cursor.clone().expect("a cursor").0;

    let pg = testkit::client(&url).await;
    assert!(backfill_stamps(&pg).await.is_empty(), "not stamped");
    slow_window(&pg, 0.0).await;
    let retry_from = db_now(&pg).await;
    let done = h.run_to_end("restarted").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(2));
    assert_eq!(done.slices_processed, done.slices_total);
    let all = calls(&pg).await;
    let retried = all.iter().filter(|c| c.started > retry_from);
    assert_eq!(
        retried.map(|c| c.from).min(),
        Some(cursor),
        "resumed from the cursor: {all:?}"
    );
    assert_recovered(&pg, 1).await;
    drop(server);
}

mod bad_input;
mod refused_writes;
