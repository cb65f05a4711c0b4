//! The last-slice drain and the blind skip stamp (docs/contract.md): a
//! backfill beside the running application loses no update.
//!
//! The application keeps writing while a backfill runs (a pre-upgrade hook
//! runs while the old version still serves): usage rows are inserted,
//! updated and deleted, tasks are re-attributed to other issues, and the
//! periodic entry `rollup_task_usage_hourly()` is called all along. Deletes
//! and re-attributions reach the rollup only through the dirty queue, which
//! the window function drains in a statement of its own after the
//! recompute: a window ending in the future drains the entries of writes
//! that commit while it recomputes, without recomputing them. Here a writer
//! and a ticker run throughout a full walk on two sessions; once they stop,
//! one catch-up window (the application's next tick) must leave the hourly
//! table equal to an independent recompute.
//!
//! The last slice is made long (thousands of keys updated in the current
//! month) so that writes commit while it recomputes; the test checks that
//! they did, so it cannot pass without exercising the race.

use std::time::Duration;

use jiff::Timestamp;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use usage_backfill_api::BackfillResult;
use usage_backfill_engine::{self as engine, Database, Event, Outcome, Performance};
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_testkit::{self as testkit, SchemaLevel, TestDatabase, harness::Harness};

testkit::at_both_levels!(
    multi_thread: a_walk_beside_the_writing_application_loses_no_update,
    a_controller_run_beside_the_writing_application_loses_no_update,
    every_sync_rolls_up_to_its_stamp_beside_the_writing_application,
    a_skip_waits_for_lock_4246_and_rolls_up_what_arrived_meanwhile,
);

use testkit::application::{
    Application, TICK_PACE, a_task, catch_up, fall_behind, rolled_up, stale_buckets,
};
use testkit::engine::{always, assert_correct, walk_all};

const WAIT: Duration = Duration::from_secs(60);

/// Three months of history before the current one, and 3000 of its rows
/// updated in the current month (up to now): the last slice recomputes
/// thousands of keys, long enough for writes to commit while it runs.
async fn busy_database(level: SchemaLevel) -> (TestDatabase, Client) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    fixture::generate(
        &client,
        &HistorySpec {
            rows: 8000,
            months: 3,
            dirty_queue_entries: 0,
            ..HistorySpec::default()
        },
    )
    .await
    .unwrap();
    client
        .batch_execute(
            "UPDATE task_usage SET updated_at = m.start + random() * (now() - m.start)
               FROM (SELECT date_trunc('month', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS start) m
              WHERE id IN (SELECT id FROM task_usage WHERE updated_at IS NOT NULL
                            ORDER BY md5(id::text) LIMIT 3000);
             ANALYZE task_usage;",
        )
        .await
        .unwrap();
    (db, client)
}

/// Writes committed while the last slice ran, counted from the events.
#[derive(Default)]
struct LastSlice {
    end: Option<Timestamp>,
    committed_at_start: Option<u64>,
    committed_at_end: Option<u64>,
}

impl LastSlice {
    fn observe(&mut self, event: &Event, committed: u64) {
        match event {
            Event::Planned { to, .. } => self.end = Some(*to),
            // The last slice ends at the planned end or, the clock read
            // again just before it, a little later.
            Event::SliceStarted { slice } if self.end.is_some_and(|end| slice.to >= end) => {
                self.committed_at_start = Some(committed)
            }
            Event::SliceDone { slice, .. } if self.end.is_some_and(|end| slice.to >= end) => {
                self.committed_at_end = Some(committed)
            }
            _ => {}
        }
    }

    fn writes_during(&self) -> u64 {
        self.committed_at_end.unwrap() - self.committed_at_start.unwrap()
    }
}

async fn a_walk_beside_the_writing_application_loses_no_update(level: SchemaLevel) {
    let (db, client) = busy_database(level).await;
    let app = Application::start(db.url(), 14).await;
    let before = app.committed();
    let mut last = LastSlice::default();
    let opts = engine::Options {
        performance: Performance {
            parallelism: 2,
            ..Performance::default()
        },
        ..always()
    };
    let outcome: Outcome = engine::run(
        &Database::parse(db.url()).unwrap(),
        &opts,
        &CancellationToken::new(),
        &mut |e: &Event| last.observe(e, app.committed()),
    )
    .await
    .unwrap();
    let during_walk = app.committed() - before;
    let (writes, ticks) = app.stop().await;
    let after_walk = stale_buckets(&client).await;
    catch_up(&client).await;
    let after_catch_up = stale_buckets(&client).await;
    eprintln!(
        "writes {writes:?}, {during_walk} committed during the walk, {} during the last slice \
         ({} slices, {} sessions, {} ms); {ticks} ticks; stale buckets (missing/extra): \
         {}/{} after the walk, {}/{} after the catch-up window",
        last.writes_during(),
        outcome.slices_processed,
        outcome.sessions,
        outcome.elapsed_ms,
        after_walk.0,
        after_walk.1,
        after_catch_up.0,
        after_catch_up.1,
    );
    assert_eq!(outcome.sessions, 2, "a parallel walk");
    // Three months of history and the current one; a run in the first five
    // minutes of a month ends in the previous month (its end is five
    // minutes before the clock), so the current month is not walked.
    let current_month = engine::month_floor(outcome.max_event.unwrap());
    let months = if outcome.walk_end.unwrap() > current_month {
        4
    } else {
        3
    };
    assert!(outcome.slices_processed >= months, "{outcome:?}");
    // The last window ends where the stamp begins.
    assert!(outcome.walk_end.is_some());
    assert_eq!(outcome.to, outcome.walk_end);
    assert_eq!(outcome.watermark_after, outcome.walk_end);
    assert!(
        last.writes_during() >= 1,
        "writes committed while the last slice ran: {}",
        last.writes_during()
    );
    assert_eq!(after_catch_up, (0, 0), "stale buckets (missing, extra)");
    assert_eq!(fixture::dirty_queue_len(&client).await.unwrap(), 0);
    assert_correct(&client).await;
}

/// The same at the controller level: a UsageBackfill in the hook's mode
/// (IfLagging, two sessions) reconciled to the end while the application
/// writes and ticks.
async fn a_controller_run_beside_the_writing_application_loses_no_update(level: SchemaLevel) {
    let (db, client) = busy_database(level).await;
    let h = Harness::on(db.url(), testkit::settings()).await;
    h.put_secret();
    h.create("beside-the-app", |s| s.parallelism = 2);
    let app = Application::start(db.url(), 41).await;
    let before = app.committed();
    let done = h.run_to_end("beside-the-app").await;
    let during_run = app.committed() - before;
    let (writes, ticks) = app.stop().await;
    let after_run = stale_buckets(&client).await;
    catch_up(&client).await;
    let after_catch_up = stale_buckets(&client).await;
    eprintln!(
        "writes {writes:?}, {during_run} committed during the run ({:?} slices); {ticks} \
         ticks; stale buckets (missing/extra): {}/{} after the run, {}/{} after the \
         catch-up window",
        done.slices_processed, after_run.0, after_run.1, after_catch_up.0, after_catch_up.1,
    );
    assert_eq!(done.result, Some(BackfillResult::Backfilled), "{done:?}");
    assert_eq!(done.performance.as_ref().and_then(|p| p.sessions), Some(2));
    assert!(done.walk_end.is_some());
    assert_eq!(
        done.walk_end, done.watermark_after,
        "the stamp names the walk's end"
    );
    assert!(
        during_run >= 5,
        "writes committed during the run: {during_run}"
    );
    assert_eq!(after_catch_up, (0, 0), "stale buckets (missing, extra)");
    assert_eq!(fixture::dirty_queue_len(&client).await.unwrap(), 0);
    assert_correct(&client).await;
}

/// A database whose history is rolled up and stamped, as after a backfill
/// and the application's ticks; its tasks are the writer's to use.
async fn rolled_up_database(level: SchemaLevel) -> (TestDatabase, Client) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    fixture::generate(
        &client,
        &HistorySpec {
            rows: 2000,
            months: 2,
            dirty_queue_entries: 0,
            ..HistorySpec::default()
        },
    )
    .await
    .unwrap();
    walk_all(db.url()).await;
    (db, client)
}

/// Every GitOps sync runs the hook in `IfLagging` mode; after a pause of
/// the application's ticks each is a skip within the threshold. A skip
/// must roll up from the watermark to its stamp before stamping: the tick
/// starts at the watermark and inserts are not queued, so a stamp that
/// passes the paused application's events loses them for good. Three
/// syncs, the writer running throughout and the ticker between syncs.
async fn every_sync_rolls_up_to_its_stamp_beside_the_writing_application(level: SchemaLevel) {
    let (db, client) = rolled_up_database(level).await;
    let database = Database::parse(db.url()).unwrap();
    let app = Application::start(db.url(), 7).await;
    for sync in 0..3 {
        let paused = app.pause_ticks().await;
        let (before, models) = fall_behind(&client, &sync.to_string(), 4).await;
        let (outcome, _) = testkit::engine::run(
            &database,
            &engine::Options::default(),
            &CancellationToken::new(),
        )
        .await;
        let outcome = outcome.unwrap();
        assert_eq!(
            outcome.skipped,
            Some(engine::SkipReason::WatermarkWithinThreshold),
            "sync {sync}: {outcome:?}"
        );
        assert!(outcome.watermark_stamped, "sync {sync}");
        // Before any tick: the stamp passed the paused events, and every
        // one of them is rolled up.
        assert_eq!(
            rolled_up(&client, &models).await,
            models.len(),
            "sync {sync}: buckets rolled up of the {} events before the stamp ({outcome:?})",
            models.len()
        );
        assert_eq!(
            outcome.from,
            Some(before),
            "sync {sync}: from the watermark"
        );
        assert_eq!(outcome.watermark_after, outcome.walk_end, "sync {sync}");
        drop(paused);
        tokio::time::sleep(TICK_PACE * 3).await;
    }
    let (writes, ticks) = app.stop().await;
    catch_up(&client).await;
    let stale = stale_buckets(&client).await;
    eprintln!("writes {writes:?}, {ticks} ticks; stale buckets (missing/extra) {stale:?}");
    assert!(ticks > 0);
    assert_eq!(stale, (0, 0), "stale buckets (missing, extra)");
    assert_eq!(fixture::dirty_queue_len(&client).await.unwrap(), 0);
    assert_correct(&client).await;
}

/// A skip decided while another session holds lock 4246 (a second
/// release's backfill, say) waits for the lock, reads the state again
/// under it, and rolls up what arrived meanwhile before it stamps. Legacy
/// rows (no updated_at) arriving during the wait; then the same on an
/// empty history, whose stamp the reference makes at once, unlocked.
async fn a_skip_waits_for_lock_4246_and_rolls_up_what_arrived_meanwhile(level: SchemaLevel) {
    let (db, client) = rolled_up_database(level).await;
    let database = Database::parse(db.url()).unwrap();
    client
        .batch_execute(
            "UPDATE task_usage_hourly_rollup_state
                SET watermark_at = now() - interval '45 minutes' WHERE id = 1",
        )
        .await
        .unwrap();
    let (outcome, models) = run_while_locked(&database, &client, "locked").await;
    assert_eq!(
        outcome.skipped,
        Some(engine::SkipReason::WatermarkWithinThreshold),
        "{outcome:?}"
    );
    assert!(outcome.lock_waited_ms > 0);
    assert!(outcome.watermark_stamped);
    assert_eq!(rolled_up(&client, &models).await, models.len());

    // An empty history: the skip decided before the lock finds rows under it.
    client
        .batch_execute(
            "TRUNCATE task_usage, task_usage_hourly, task_usage_hourly_dirty;
             UPDATE task_usage_hourly_rollup_state
                SET watermark_at = '1970-01-01 00:00:00+00' WHERE id = 1;",
        )
        .await
        .unwrap();
    let (outcome, models) = run_while_locked(&database, &client, "empty").await;
    assert!(outcome.lock_waited_ms > 0);
    assert!(outcome.watermark_stamped);
    assert_eq!(
        rolled_up(&client, &models).await,
        models.len(),
        "{outcome:?}"
    );
    catch_up(&client).await;
    assert_eq!(stale_buckets(&client).await, (0, 0));
    assert_correct(&client).await;
}

/// Runs an `IfLagging` backfill while this test's own session holds lock
/// 4246; once the run waits for it, three legacy rows dated 20 minutes ago
/// are written, then the lock is released. The outcome, and the rows'
/// models.
async fn run_while_locked(
    database: &Database,
    client: &Client,
    tag: &str,
) -> (Outcome, Vec<String>) {
    client
        .query_one("SELECT pg_advisory_lock(4246)", &[])
        .await
        .unwrap();
    let (waiting_tx, waiting_rx) = tokio::sync::oneshot::channel();
    let database = database.clone();
    let run = tokio::spawn(async move {
        let mut waiting = Some(waiting_tx);
        engine::run(
            &database,
            &engine::Options::default(),
            &CancellationToken::new(),
            &mut |e: &Event| {
                if matches!(e, Event::WaitingForLock { .. })
                    && let Some(tx) = waiting.take()
                {
                    let _ = tx.send(());
                }
            },
        )
        .await
    });
    // Err: the run ended (dropping the sender) or never waited in time.
    let waited = matches!(tokio::time::timeout(WAIT, waiting_rx).await, Ok(Ok(())));
    let mut models = Vec::new();
    if waited {
        let task = a_task(client).await;
        for k in 0..3 {
            let model = format!("waited-{tag}-{k}");
            client
                .execute(
                    "INSERT INTO task_usage (task_id, provider, model, input_tokens, output_tokens,
                                             created_at, updated_at)
                     VALUES ($1::text::uuid, 'waited', $2, 100, 10,
                             now() - interval '20 minutes' - $3::int * interval '1 minute', NULL)",
                    &[&task, &model, &k],
                )
                .await
                .unwrap();
            models.push(model);
        }
    }
    client
        .query_one("SELECT pg_advisory_unlock(4246)", &[])
        .await
        .unwrap();
    let outcome = run.await.unwrap().unwrap();
    assert!(
        waited,
        "the run did not wait for lock 4246 before it stamped: {outcome:?}"
    );
    (outcome, models)
}
