//! Connection poolers, against a real PgBouncer in front of the
//! harness's PostgreSQL: transaction (and statement) pooling is refused
//! before anything is written, with a small pool (the same server
//! connection comes back) and a larger one; session pooling runs a full
//! backfill; a slice whose backend no longer holds lock 4246 stops the run
//! before the next slice; the controller reports the refusal as Stalled
//! with its own reason and an Event; the CLI exits 3.
//!
//! PgBouncer is required (no skip): `.ci/run` installs Debian's `pgbouncer`.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use tokio_postgres::Client;
use usage_backfill_api::{ConditionType, Phase, UsageBackfillSpec, UsageBackfillStatus};
use usage_backfill_controller::{self as controller, Context, ObjectKey};
use usage_backfill_engine::{
    CancellationToken, Database, Error, Event, Options, Outcome, Performance,
};
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_standin::pgbouncer::{PgBouncerOptions, PoolMode, TempPgBouncer};
use usage_backfill_testkit::{self as testkit, TestDatabase};

use testkit::engine::{always, assert_correct};
use testkit::status::{conds, is, message};
use testkit::{FakeApiServer, settings};

fn small() -> HistorySpec {
    HistorySpec {
        rows: 600,
        months: 4,
        ..HistorySpec::default()
    }
}

async fn with_history() -> (TestDatabase, Client) {
    let db = testkit::fresh_database().await;
    let client = db.client().await;
    fixture::generate(&client, &small()).await.unwrap();
    (db, client)
}

/// A PgBouncer in front of the test database's server; panics (never
/// skips) when pgbouncer is not installed.
fn bouncer(db: &TestDatabase, mode: PoolMode, pool_size: u32) -> TempPgBouncer {
    TempPgBouncer::start(&db.config(), PgBouncerOptions::new(mode, pool_size))
        .unwrap_or_else(|e| panic!("starting PgBouncer ({mode:?}, pool {pool_size}): {e}"))
}

async fn run(url: &str, opts: &Options) -> (Result<Outcome, Error>, Vec<Event>) {
    testkit::engine::run(
        &Database::parse(url).unwrap(),
        opts,
        &CancellationToken::new(),
    )
    .await
}

/// "Nothing was written": the hourly table's checksum and the watermark.
async fn state(client: &Client) -> (String, Option<Timestamp>) {
    (
        fixture::hourly_checksum(client).await.unwrap(),
        fixture::watermark(client).await.unwrap(),
    )
}

/// Advisory locks of any key held in this database (lock 4246, the
/// pooling probe's (4246, k) keys): none after a run.
async fn advisory_locks(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_locks
              WHERE locktype = 'advisory'
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn pooling_evidence(error: &Error) -> &str {
    match error {
        Error::TransactionPooling { evidence, .. } => evidence,
        other => panic!("expected TransactionPooling, got {other:?}"),
    }
}

/// The refusal of one pooler: every run mode, nothing written, no lock left.
async fn assert_refused(mode: PoolMode, pool_size: u32) {
    let (db, client) = with_history().await;
    let pgb = bouncer(&db, mode, pool_size);
    let url = pgb.url_via(db.url());
    let before = state(&client).await;
    let if_lagging = Options::default();
    let dry_run = Options {
        dry_run: true,
        ..always()
    };
    for opts in [always(), if_lagging, dry_run] {
        let (result, events) = run(&url, &opts).await;
        let error = result.expect_err("a transaction pooler must be refused");
        let evidence = pooling_evidence(&error);
        // With one server connection the second client always lands on
        // it; with more, an idle pool hands out the last used one (LIFO),
        // and under load the session may move instead.
        assert!(
            evidence.contains("a second connection ran on server backend pid")
                || (pool_size > 1
                    && evidence.contains("two transactions of the backfill's session ran on different server backends")),
            "{mode:?}/{pool_size}: {evidence}"
        );
        assert!(!error.is_retryable());
        assert_eq!(error.reason(), "TransactionPooling");
        let text = error.to_string();
        assert!(text.contains("nothing was written"), "{text}");
        assert!(
            text.contains("Connect to PostgreSQL directly, or through a pooler in session mode"),
            "{text}"
        );
        assert!(events.is_empty(), "refused before anything: {events:?}");
        assert_eq!(state(&client).await, before, "nothing was written");
        assert!(
            testkit::lock_4246(&client).await.is_empty(),
            "lock 4246 free"
        );
        assert_eq!(advisory_locks(&client).await, 0, "no probe lock left");
    }
    assert!(
        fixture::recompute_mismatches(&client).await.unwrap() > 0,
        "the history is still not rolled up"
    );
}

#[tokio::test]
async fn transaction_pooling_with_a_pool_of_one_is_refused_before_anything_is_written() {
    assert_refused(PoolMode::Transaction, 1).await;
}

#[tokio::test]
async fn transaction_pooling_with_a_larger_pool_is_refused_before_anything_is_written() {
    assert_refused(PoolMode::Transaction, 4).await;
}

#[tokio::test]
async fn statement_pooling_is_refused_before_anything_is_written() {
    assert_refused(PoolMode::Statement, 2).await;
}

#[tokio::test]
async fn session_pooling_runs_a_full_backfill() {
    let (db, client) = with_history().await;
    let pgb = bouncer(&db, PoolMode::Session, 4);
    let url = pgb.url_via(db.url());
    let (result, _) = run(&url, &always()).await;
    let outcome = result.expect("session pooling keeps one server session per client");
    assert!(outcome.watermark_stamped);
    assert_eq!(outcome.slices_processed, outcome.slices_total);
    assert_eq!(outcome.sessions, 2, "the parallel walk works through it");
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    assert_correct(&client).await;
    assert!(testkit::lock_4246(&client).await.is_empty());
    assert_eq!(advisory_locks(&client).await, 0);
}

/// A session pooler whose only server connection is the backfill's: the
/// probe's second connection waits in vain; the run goes on, with a warning.
#[tokio::test]
async fn session_pooling_with_a_pool_of_one_runs_with_a_warning() {
    let (db, client) = with_history().await;
    let pgb = bouncer(&db, PoolMode::Session, 1);
    let url = format!("{}?connect_timeout=2", pgb.url_via(db.url()));
    let opts = Options {
        performance: Performance {
            parallelism: 1,
            ..Performance::default()
        },
        ..always()
    };
    let (result, _) = run(&url, &opts).await;
    let outcome = result.expect("session pooling with one server connection works");
    assert!(outcome.watermark_stamped);
    assert!(
        outcome
            .warnings
            .iter()
            .any(|w| w.contains("the pooling check's second connection got no answer within 2s")),
        "{:?}",
        outcome.warnings
    );
    assert_correct(&client).await;
    assert_eq!(advisory_locks(&client).await, 0);
}

/// The lock session's backend loses lock 4246 during a slice (the window
/// function releases it: what a pooler's other client, or a reset query,
/// can do to a shared backend). The next slice's check refuses to run it.
#[tokio::test]
async fn a_slice_whose_backend_no_longer_holds_the_lock_stops_the_run() {
    let (db, client) = with_history().await;
    client
        .batch_execute(
            "CREATE TABLE window_log (p_from timestamptz, p_to timestamptz);
             ALTER FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz)
                   RENAME TO real_window;
             CREATE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
             RETURNS bigint LANGUAGE plpgsql AS $$
             DECLARE v bigint;
             BEGIN
                 v := real_window(p_from, p_to);
                 INSERT INTO window_log VALUES (p_from, p_to);
                 IF (SELECT count(*) FROM window_log) = 2 THEN
                     PERFORM pg_advisory_unlock(4246);
                 END IF;
                 RETURN v;
             END $$;",
        )
        .await
        .unwrap();
    let watermark = fixture::watermark(&client).await.unwrap();
    let opts = Options {
        performance: Performance {
            parallelism: 1,
            ..Performance::default()
        },
        ..always()
    };
    let (result, events) = run(db.url(), &opts).await;
    let error = result.expect_err("the third slice must not run");
    let evidence = pooling_evidence(&error);
    assert!(
        evidence.contains("no longer held advisory lock 4246 at slice"),
        "{evidence}"
    );
    assert!(!error.is_retryable(), "terminal");
    assert!(
        error
            .to_string()
            .contains("the run stopped before that slice"),
        "{error}"
    );
    let done = events
        .iter()
        .filter(|e| matches!(e, Event::SliceDone { .. }))
        .count();
    let total = events
        .iter()
        .find_map(|e| match e {
            Event::Planned { slices_total, .. } => Some(*slices_total),
            _ => None,
        })
        .unwrap();
    assert!(total > 3, "enough slices to stop in the middle: {total}");
    assert_eq!(done, 2, "the two slices before the loss committed");
    let calls: i64 = client
        .query_one("SELECT count(*) FROM window_log", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(calls, 2, "no window call after the loss");
    assert!(!events.iter().any(|e| matches!(e, Event::Stamped { .. })));
    assert_eq!(fixture::watermark(&client).await.unwrap(), watermark);
    assert!(testkit::lock_4246(&client).await.is_empty());
}

/// The CLI: exit 3 (needs attention), the cause and the remedy on stderr.
#[tokio::test]
async fn the_cli_exits_3_with_the_cause_and_the_remedy() {
    let (db, client) = with_history().await;
    let pgb = bouncer(&db, PoolMode::Transaction, 1);
    let before = state(&client).await;
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_usage-backfill"))
        .args(["backfill", "--mode", "always", "--output", "json"])
        .env("DATABASE_URL", pgb.url_via(db.url()))
        .env_remove("RUST_LOG")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("error: a second connection ran on server backend pid"),
        "{stderr}"
    );
    assert!(stderr.contains("pool_mode = session"), "{stderr}");
    let password = db
        .config()
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .unwrap();
    assert!(!stderr.contains(&password));
    eprintln!("CLI stderr through PgBouncer (transaction, pool 1):\n{stderr}");
    assert_eq!(state(&client).await, before);
    assert_eq!(advisory_locks(&client).await, 0);
}

/// The controller: Failed, Stalled=True with reason TransactionPooling,
/// no retry, a Failed Event with the message, nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reports_stalled_with_its_own_reason_and_an_event() {
    const NS: &str = "tenant-a";
    let (db, client) = with_history().await;
    let pgb = bouncer(&db, PoolMode::Transaction, 4);
    let before = state(&client).await;
    let (kube, fake) = FakeApiServer::start();
    let ctx = Context::new(kube, settings());
    fake.put_secret(NS, "app-db", "DATABASE_URL", &pgb.url_via(db.url()));
    fake.create(NS, "pooled", UsageBackfillSpec::new("app-db"));
    let key = ObjectKey::new(NS, "pooled");
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            let obj = fake.get(NS, "pooled").unwrap();
            controller::reconcile(Arc::new(obj), ctx.clone())
                .await
                .expect("reconcile succeeds");
            ctx.runner.wait_idle(&key).await;
            let status: UsageBackfillStatus =
                fake.get(NS, "pooled").unwrap().status.unwrap_or_default();
            if status.phase.is_some_and(Phase::is_finished) && !ctx.runner.is_active(&key) {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no final status; requests:\n{}", fake.describe_requests()));
    assert_eq!(status.phase, Some(Phase::Failed));
    assert_eq!(
        conds(&status),
        [
            is("False", "TransactionPooling"),
            None,
            is("True", "TransactionPooling")
        ]
    );
    assert_eq!(status.attempts, Some(1), "terminal: not retried");
    let stalled = message(&status, ConditionType::Stalled);
    assert!(
        stalled.contains("a second connection ran on server backend pid"),
        "{stalled}"
    );
    assert!(stalled.contains("pool_mode = session"), "{stalled}");
    eprintln!("Stalled message: {stalled}");
    let events = fake.events("pooled");
    let (reason, kind, note) = events.last().expect("an Event");
    assert_eq!((reason.as_str(), kind.as_str()), ("Failed", "Warning"));
    assert!(note.contains("pool_mode = session"), "{note}");
    assert_eq!(state(&client).await, before, "nothing was written");
    assert!(testkit::lock_4246(&client).await.is_empty());
    assert_eq!(advisory_locks(&client).await, 0);
}
