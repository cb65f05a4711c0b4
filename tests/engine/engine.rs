//! The engine against a real PostgreSQL: every reference branch, the walk's
//! correctness (an independent recompute), locking, cancellation, resume,
//! and one scenario per closed reference gap.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::{SignedDuration, Timestamp, ToSpan};
use tokio_postgres::Client;
use usage_backfill_engine::{
    self as engine, CancellationToken, Database, Error, Event, Mode, Options, Outcome, Performance,
    Resume, SkipReason,
};
use usage_backfill_standin::fixture::{self, HistorySpec, Scenario, SchemaLevel, UsageRow};
use usage_backfill_testkit::{self as testkit, TestDatabase, lock_4246};

use testkit::engine::{always, assert_correct};

// Every scenario below runs at both schema levels of the stand-in.
testkit::at_both_levels!(
    lagging_history_is_backfilled_and_the_guard_then_passes,
    rollup_state_missing_skips_without_writing,
    empty_task_usage_stamps_and_skips,
    missing_state_row_needs_manual_intervention,
    lag_threshold_boundary,
    always_walks_even_when_within_threshold,
    months_back_refuses_unless_forced,
    dry_run_changes_nothing,
    a_second_run_waits_for_lock_4246_then_skips,
    lock_timeout_gives_up_without_writing,
    cancellation_mid_walk_releases_the_lock_and_stamps_nothing,
    cancellation_while_waiting_for_the_lock,
    a_slice_committed_as_the_cancel_arrives_counts_as_done,
    a_failing_slice_aborts_without_stamping_and_a_resume_completes,
    resume_from_a_cursor_gives_the_same_table_as_a_full_run,
    row_updated_in_a_later_month_is_counted,
    walk_starts_at_the_earliest_of_created_and_updated,
    dirty_queue_is_drained_up_to_now,
    a_key_queued_while_the_run_goes_on_is_left_for_the_tick,
    future_dated_events_are_refused_with_a_precise_message,
    session_settings_apply_to_the_backfill_session,
);

const HOUR: Duration = Duration::from_secs(3600);

/// Runs the engine, collecting its events.
async fn run_engine(
    db: &TestDatabase,
    opts: &Options,
    cancel: &CancellationToken,
) -> (Result<Outcome, Error>, Vec<Event>) {
    testkit::engine::run(&Database::parse(db.url()).unwrap(), opts, cancel).await
}

async fn run(db: &TestDatabase, opts: Options) -> (Result<Outcome, Error>, Vec<Event>) {
    run_engine(db, &opts, &CancellationToken::new()).await
}

/// Checksum of the hourly table and the watermark: "nothing was written".
async fn state(client: &Client) -> (String, Option<Timestamp>) {
    (
        fixture::hourly_checksum(client).await.unwrap(),
        fixture::watermark(client).await.unwrap(),
    )
}

async fn db_now(client: &Client) -> Timestamp {
    client.query_one("SELECT now()", &[]).await.unwrap().get(0)
}

fn ts(s: &str) -> Timestamp {
    s.parse().unwrap()
}

async fn with_history(level: SchemaLevel, spec: HistorySpec) -> (TestDatabase, Client) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    fixture::generate(&client, &spec).await.unwrap();
    (db, client)
}

fn small() -> HistorySpec {
    HistorySpec {
        rows: 600,
        months: 4,
        ..HistorySpec::default()
    }
}

// ---------------------------------------------------------------------------
// Reference branches (IfLagging = the migration-time hook)
// ---------------------------------------------------------------------------

async fn lagging_history_is_backfilled_and_the_guard_then_passes(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    assert!(
        fixture::guard(&client)
            .await
            .unwrap()
            .unwrap_err()
            .starts_with("refusing to drop legacy daily rollups"),
        "the guard must refuse before the backfill"
    );
    let before = db_now(&client).await;
    let (outcome, events) = run(&db, Options::default()).await;
    let outcome = outcome.unwrap();
    assert_eq!(outcome.skipped, None);
    assert!(outcome.watermark_stamped);
    // Slices: 4 history months + the current month (later updates and the
    // dirty queue reach into it).
    assert_eq!(outcome.slices_total, outcome.slices_processed);
    assert!(outcome.slices_processed >= 4, "{outcome:?}");
    assert!(outcome.rows_touched > 0);
    // Stamped by the database clock: now() - 5 minutes, at some instant of
    // the run (which takes a few seconds on a busy machine).
    let after = outcome.watermark_after.unwrap();
    let finished = db_now(&client).await;
    assert!(
        after >= before - SignedDuration::from_mins(5)
            && after <= finished - SignedDuration::from_mins(5),
        "stamp {after} vs db now {before} .. {finished}"
    );
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        Some(after),
        "read back"
    );
    assert_eq!(outcome.watermark_before, Some(ts("1970-01-01T00:00:00Z")));
    assert_correct(&client).await;
    // Events: one SliceDone per slice, counts cumulative, cursor advancing.
    let done: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::SliceDone {
                slices_processed,
                rows_touched,
                cursor,
                slice,
                ..
            } => Some((*slices_processed, *rows_touched, *cursor, *slice)),
            _ => None,
        })
        .collect();
    assert_eq!(done.len() as u64, outcome.slices_processed);
    assert_eq!(done.last().unwrap().1, outcome.rows_touched);
    for w in done.windows(2) {
        assert_eq!(w[0].2, w[1].3.from, "slices are contiguous");
        assert_eq!(w[0].0 + 1, w[1].0);
    }
    assert!(events.iter().any(|e| matches!(e, Event::Stamped { .. })));
}

async fn rollup_state_missing_skips_without_writing(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    fixture::drop_rollup_state_table(&client).await.unwrap();
    let checksum = fixture::hourly_checksum(&client).await.unwrap();
    let outcome = run(&db, Options::default()).await.0.unwrap();
    assert_eq!(outcome.skipped, Some(SkipReason::RollupStateMissing));
    assert!(!outcome.watermark_stamped);
    assert_eq!(outcome.slices_processed, 0);
    assert_eq!(fixture::hourly_checksum(&client).await.unwrap(), checksum);
}

async fn empty_task_usage_stamps_and_skips(level: SchemaLevel) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    let outcome = run(&db, Options::default()).await.0.unwrap();
    assert_eq!(outcome.skipped, Some(SkipReason::TaskUsageEmpty));
    assert!(outcome.watermark_stamped);
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        outcome.watermark_after
    );
    assert_eq!(fixture::guard(&client).await.unwrap(), Ok(()));
    // The operator command does the same (reference: empty stamps).
    fixture::set_watermark(&client, Some(ts("2000-01-01T00:00:00Z")))
        .await
        .unwrap();
    let outcome = run(&db, always()).await.0.unwrap();
    assert_eq!(outcome.skipped, Some(SkipReason::TaskUsageEmpty));
    assert!(outcome.watermark_stamped);
}

async fn missing_state_row_needs_manual_intervention(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    fixture::set_watermark(&client, None).await.unwrap();
    let before = state(&client).await;
    let err = run(&db, Options::default()).await.0.unwrap_err();
    assert!(matches!(err, Error::WatermarkMissing), "{err}");
    assert!(err.to_string().contains("manual intervention required"));
    assert!(!err.is_retryable());
    assert_eq!(state(&client).await, before);
}

async fn lag_threshold_boundary(level: SchemaLevel) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    let s = Scenario::create(&client).await.unwrap();
    let newest = ts("2026-03-10T12:00:00Z");
    s.usage(&client, UsageRow::new(ts("2026-03-01T08:00:00Z")))
        .await
        .unwrap();
    s.usage(
        &client,
        UsageRow::new(ts("2026-03-02T08:00:00Z")).with_updated_at(Some(newest)),
    )
    .await
    .unwrap();
    // Lag exactly 1h: within the threshold. Skip the walk; before the stamp,
    // roll up the window from the watermark (the row updated at `newest`,
    // after it: its bucket), not the row updated before the watermark.
    fixture::set_watermark(&client, Some(newest - 1.hour()))
        .await
        .unwrap();
    let outcome = run(&db, Options::default()).await.0.unwrap();
    assert_eq!(outcome.skipped, Some(SkipReason::WatermarkWithinThreshold));
    assert_eq!(outcome.lag_seconds, Some(3600));
    assert!(outcome.watermark_stamped);
    assert_eq!(outcome.from, Some(newest - 1.hour()));
    assert_eq!(outcome.watermark_after, outcome.walk_end);
    assert_eq!((outcome.slices_processed, outcome.slices_total), (1, 1));
    let hourly: i64 = client
        .query_one("SELECT count(*) FROM task_usage_hourly", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(hourly, 1, "the window from the watermark to the stamp only");
    // One microsecond more: walk.
    fixture::set_watermark(&client, Some(newest - 1.hour() - 1.microsecond()))
        .await
        .unwrap();
    let outcome = run(&db, Options::default()).await.0.unwrap();
    assert_eq!(outcome.skipped, None);
    assert!(outcome.slices_processed >= 1);
    assert_correct(&client).await;
    // A larger threshold skips the same lag.
    fixture::set_watermark(&client, Some(newest - 2.hours()))
        .await
        .unwrap();
    let opts = Options {
        mode: Mode::IfLagging {
            lag_threshold: 3 * HOUR,
        },
        ..Options::default()
    };
    assert_eq!(
        run(&db, opts).await.0.unwrap().skipped,
        Some(SkipReason::WatermarkWithinThreshold)
    );
}

// ---------------------------------------------------------------------------
// The operator command (Always)
// ---------------------------------------------------------------------------

async fn always_walks_even_when_within_threshold(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    let first = run(&db, Options::default()).await.0.unwrap();
    assert_eq!(first.skipped, None);
    let again = run(&db, Options::default()).await.0.unwrap();
    assert_eq!(again.skipped, Some(SkipReason::WatermarkWithinThreshold));
    let checksum = fixture::hourly_checksum(&client).await.unwrap();
    let full = run(&db, always()).await.0.unwrap();
    assert_eq!(full.skipped, None);
    assert_eq!(full.slices_processed, first.slices_processed);
    assert_eq!(
        fixture::hourly_checksum(&client).await.unwrap(),
        checksum,
        "idempotent"
    );
    assert_correct(&client).await;
}

async fn months_back_refuses_unless_forced(level: SchemaLevel) {
    let (db, client) = with_history(
        level,
        HistorySpec {
            rows: 600,
            months: 6,
            ..HistorySpec::default()
        },
    )
    .await;
    let before = state(&client).await;
    let opts = Options {
        mode: Mode::Always {
            months_back: 2,
            force_partial: false,
        },
        ..Options::default()
    };
    let err = run(&db, opts.clone()).await.0.unwrap_err();
    assert!(
        matches!(err, Error::MonthsBackSkipsHistory { months_back: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("force-partial"), "{err}");
    assert_eq!(
        state(&client).await,
        before,
        "refused before touching anything"
    );
    assert!(lock_4246(&client).await.is_empty(), "lock released");
    // Forced: starts two months before the current month.
    let now = db_now(&client).await;
    let forced = Options {
        mode: Mode::Always {
            months_back: 2,
            force_partial: true,
        },
        ..Options::default()
    };
    let outcome = run(&db, forced).await.0.unwrap();
    let start = engine::add_months(engine::month_floor(now), -2);
    assert_eq!(outcome.from, Some(start));
    assert!(outcome.watermark_stamped);
    // A months-back reaching before the history is not partial.
    let wide = Options {
        mode: Mode::Always {
            months_back: 24,
            force_partial: false,
        },
        ..Options::default()
    };
    assert!(run(&db, wide).await.0.is_ok());
    assert_correct(&client).await;
}

// ---------------------------------------------------------------------------
// Dry run
// ---------------------------------------------------------------------------

async fn dry_run_changes_nothing(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    let before = state(&client).await;
    for mode in [Mode::default(), always().mode] {
        let opts = Options {
            mode,
            dry_run: true,
            ..Options::default()
        };
        let (outcome, events) = run(&db, opts).await;
        let outcome = outcome.unwrap();
        assert!(outcome.dry_run);
        assert!(!outcome.watermark_stamped);
        assert_eq!(outcome.slices_processed, 0);
        assert_eq!(outcome.planned.len() as u64, outcome.slices_total);
        let estimated: i64 = outcome.planned.iter().map(|p| p.estimated_events).sum();
        assert_eq!(
            estimated, 600,
            "every event falls in exactly one planned slice"
        );
        assert_eq!(
            events
                .iter()
                .filter(|e| matches!(e, Event::SlicePlanned(_)))
                .count(),
            outcome.planned.len()
        );
        assert_eq!(state(&client).await, before);
    }
}

// ---------------------------------------------------------------------------
// Locking
// ---------------------------------------------------------------------------

/// Starts a run in the background; its events go to `log` tagged `tag`.
fn spawn_run(
    db: &TestDatabase,
    opts: Options,
    tag: u8,
    log: &Arc<Mutex<Vec<(u8, Event)>>>,
) -> tokio::task::JoinHandle<Result<Outcome, Error>> {
    let url = db.url().to_string();
    let log = log.clone();
    tokio::spawn(async move {
        let database = Database::parse(&url).unwrap();
        engine::run(&database, &opts, &CancellationToken::new(), &mut |e| {
            log.lock().unwrap().push((tag, e.clone()))
        })
        .await
    })
}

fn position(
    log: &Arc<Mutex<Vec<(u8, Event)>>>,
    tag: u8,
    pred: impl Fn(&Event) -> bool,
) -> Option<usize> {
    log.lock()
        .unwrap()
        .iter()
        .position(|(t, e)| *t == tag && pred(e))
}

async fn a_second_run_waits_for_lock_4246_then_skips(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    let log = Arc::new(Mutex::new(Vec::new()));
    // Run 1 is slowed down so run 2 starts while it holds the lock.
    let slow = Options {
        sleep_between_slices: Duration::from_millis(300),
        ..Options::default()
    };
    let first = spawn_run(&db, slow, 1, &log);
    wait_for(|| position(&log, 1, |e| matches!(e, Event::LockAcquired { .. })).is_some()).await;
    let holder_pid = lock_4246(&client).await;
    assert_eq!(holder_pid.len(), 1, "run 1 holds the lock: {holder_pid:?}");
    // A cron tick gets nothing while the backfill holds the lock.
    let wm = fixture::watermark(&client).await.unwrap();
    assert_eq!(fixture::rollup_tick(&client).await.unwrap(), 0);
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        wm,
        "the tick did not advance the watermark"
    );

    let second = spawn_run(&db, Options::default(), 2, &log);
    wait_for(|| position(&log, 2, |e| matches!(e, Event::WaitingForLock { .. })).is_some()).await;
    // Run 2 is queued in pg_locks, not granted, while run 1 works. The
    // event fires before run 2's blocking request reaches the server, so
    // look until the request shows.
    let locks = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let locks = lock_4246(&client).await;
            if locks.iter().any(|(_, g, _)| !g) {
                break locks;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("run 2's lock request never showed in pg_locks");
    assert!(
        locks.iter().any(|&(pid, g, _)| pid == holder_pid[0].0 && g),
        "{locks:?}"
    );
    let holder = log.lock().unwrap().iter().find_map(|(_, e)| match e {
        Event::WaitingForLock { holder } => holder.clone(),
        _ => None,
    });
    let holder = holder.expect("the waiting run names the holder");
    assert_eq!(holder.pid, holder_pid[0].0);
    assert_eq!(holder.application_name.as_deref(), Some("usage-backfill"));

    let first = first.await.unwrap().unwrap();
    let second = second.await.unwrap().unwrap();
    assert_eq!(first.skipped, None);
    // Run 2 re-reads under the lock and finds the work done.
    assert_eq!(second.skipped, Some(SkipReason::WatermarkWithinThreshold));
    assert!(second.lock_waited_ms > 0);
    // Never interleaved: run 2 got the lock only after run 1 stamped.
    let stamped = position(&log, 1, |e| matches!(e, Event::Stamped { .. })).unwrap();
    let acquired = position(&log, 2, |e| matches!(e, Event::LockAcquired { .. })).unwrap();
    assert!(
        stamped < acquired,
        "run 2 acquired the lock before run 1 finished"
    );
    assert!(lock_4246(&client).await.is_empty());
    // The next tick works again.
    fixture::rollup_tick(&client).await.unwrap();
    let finished: Option<Timestamp> = client
        .query_one(
            "SELECT last_run_finished_at FROM task_usage_hourly_rollup_state WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(finished.is_some(), "the tick after the backfill ran");
    assert_correct(&client).await;
}

async fn lock_timeout_gives_up_without_writing(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    let holder = db.client().await;
    holder
        .execute("SELECT pg_advisory_lock(4246)", &[])
        .await
        .unwrap();
    let before = state(&client).await;
    let opts = Options {
        lock_timeout: Some(Duration::from_millis(300)),
        ..Options::default()
    };
    let (result, events) = run(&db, opts).await;
    let err = result.unwrap_err();
    assert!(matches!(err, Error::LockTimeout { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::WaitingForLock { holder: Some(_) }))
    );
    assert_eq!(state(&client).await, before);
    assert_eq!(
        lock_4246(&client).await.len(),
        1,
        "only the test's session holds it"
    );
}

// ---------------------------------------------------------------------------
// Cancellation, failure, resume
// ---------------------------------------------------------------------------

async fn cancellation_mid_walk_releases_the_lock_and_stamps_nothing(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    let before = state(&client).await;
    let cancel = CancellationToken::new();
    let opts = Options {
        sleep_between_slices: Duration::from_secs(30),
        ..Options::default()
    };
    let database = Database::parse(db.url()).unwrap();
    let token = cancel.clone();
    let mut cursor = None;
    let result = engine::run(&database, &opts, &cancel, &mut |e| {
        if let Event::SliceDone { cursor: c, .. } = e {
            cursor = Some(*c);
            token.cancel();
        }
    })
    .await;
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert!(cursor.is_some());
    assert!(lock_4246(&client).await.is_empty(), "lock released");
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        before.1,
        "nothing stamped"
    );
    // A plain rerun completes correctly.
    let outcome = run(&db, Options::default()).await.0.unwrap();
    assert_eq!(outcome.skipped, None);
    assert_correct(&client).await;
}

async fn cancellation_while_waiting_for_the_lock(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    let holder = db.client().await;
    holder
        .execute("SELECT pg_advisory_lock(4246)", &[])
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let database = Database::parse(db.url()).unwrap();
    let result = engine::run(&database, &Options::default(), &cancel, &mut |e| {
        if matches!(e, Event::WaitingForLock { .. }) {
            token.cancel();
        }
    })
    .await;
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    // Only the holder remains; the waiter left the queue.
    let locks = lock_4246(&client).await;
    assert_eq!(locks.len(), 1, "{locks:?}");
}

/// A slice whose call commits although the cancel was already sent (the
/// cancel reached the server too late) is reported done: its work happened,
/// and the resume point must not send it round again.
async fn a_slice_committed_as_the_cancel_arrives_counts_as_done(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    // The call outlives the cancel: it does the real work, sleeps,
    // swallows the cancel, and commits. (The real work comes first: after
    // the sleep it could meet the engine's second cancel request, sent
    // when the call has not returned a second after the first, as on a
    // loaded CI machine.)
    client
        .batch_execute(
            "CREATE TABLE window_calls (p_from timestamptz);
             ALTER FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) RENAME TO real_window;
             CREATE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
             RETURNS bigint LANGUAGE plpgsql AS $$
             DECLARE
               v_rows bigint;
             BEGIN
               INSERT INTO window_calls VALUES (p_from);
               v_rows := real_window(p_from, p_to);
               -- The postmaster signals a cancelled backend and its process
               -- group: one cancel can arrive twice, so the short sleeps
               -- after the long one swallow a second delivery.
               FOR i IN 1..3 LOOP
                 BEGIN
                   PERFORM pg_sleep(CASE WHEN i = 1 THEN 5 ELSE 0.05 END);
                 EXCEPTION WHEN query_canceled THEN NULL;
                 END;
               END LOOP;
               RETURN v_rows;
             END $$;",
        )
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let watcher = Arc::new(db.client().await);
    let database = Database::parse(db.url()).unwrap();
    let mut done = Vec::new();
    // One session: one call in flight when the cancel comes.
    let opts = Options {
        performance: Performance::reference(),
        ..Options::default()
    };
    let result = engine::run(&database, &opts, &cancel, &mut |e| match e {
        // Cancelled once the call is inside its sleep (a cancel before it
        // would cancel the call itself).
        Event::SliceStarted { .. } => {
            let (token, watcher) = (token.clone(), watcher.clone());
            tokio::spawn(async move {
                while watcher
                    .query_opt(
                        "SELECT 1 FROM pg_stat_activity
                          WHERE wait_event = 'PgSleep' AND datname = current_database()",
                        &[],
                    )
                    .await
                    .unwrap()
                    .is_none()
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                token.cancel();
            });
        }
        Event::SliceDone { slice, cursor, .. } => done.push((*slice, *cursor)),
        _ => {}
    })
    .await;
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    let committed: Vec<Timestamp> = client
        .query("SELECT p_from FROM window_calls", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        committed.len(),
        1,
        "one call started, and it committed: {done:?}"
    );
    assert_eq!(done.len(), 1, "the committed slice is reported: {done:?}");
    assert_eq!(done[0].0.from, committed[0]);
    assert_eq!(done[0].1, done[0].0.to, "the resume point is past it");
    assert!(lock_4246(&client).await.is_empty(), "lock released");
}

/// Makes the window function fail for slices starting at or after `from`.
async fn break_window_from(client: &Client, from: Timestamp) {
    client
        .batch_execute(&format!(
            "ALTER FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) RENAME TO real_window;
             CREATE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
             RETURNS bigint LANGUAGE plpgsql AS $$
             BEGIN
               IF p_from >= '{from}' THEN RAISE EXCEPTION 'injected slice failure'; END IF;
               RETURN real_window(p_from, p_to);
             END $$;"
        ))
        .await
        .unwrap();
}

async fn repair_window(client: &Client) {
    client
        .batch_execute(
            "DROP FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz);
             ALTER FUNCTION real_window(timestamptz, timestamptz) RENAME TO rollup_task_usage_hourly_window;",
        )
        .await
        .unwrap();
}

async fn a_failing_slice_aborts_without_stamping_and_a_resume_completes(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    let now = db_now(&client).await;
    let third = engine::add_months(engine::month_floor(now), -2);
    break_window_from(&client, third).await;
    let wm = fixture::watermark(&client).await.unwrap();
    let (result, events) = run(&db, Options::default()).await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, Error::Slice { slice, .. } if slice.from == third),
        "{err}"
    );
    assert!(err.to_string().contains("injected slice failure"), "{err}");
    assert!(err.is_retryable());
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        wm,
        "not stamped"
    );
    assert!(lock_4246(&client).await.is_empty());
    let (processed, rows, cursor) = events
        .iter()
        .rev()
        .find_map(|e| match e {
            Event::SliceDone {
                slices_processed,
                rows_touched,
                cursor,
                ..
            } => Some((*slices_processed, *rows_touched, *cursor)),
            _ => None,
        })
        .unwrap();
    assert_eq!(cursor, third);
    repair_window(&client).await;
    let resume = Resume {
        from: testkit::engine::planned_from(&events).unwrap(),
        database: None,
        cursor,
        slices_processed: processed,
        rows_touched: rows,
    };
    let (result, events) = run(
        &db,
        Options {
            resume: Some(resume),
            ..Options::default()
        },
    )
    .await;
    let outcome = result.unwrap();
    let first_slice = events.iter().find_map(|e| match e {
        Event::SliceStarted { slice } => Some(*slice),
        _ => None,
    });
    assert_eq!(
        first_slice.unwrap().from,
        third,
        "resumed at the cursor, not from the start"
    );
    assert!(outcome.slices_processed > processed);
    assert!(outcome.rows_touched >= rows);
    assert!(outcome.watermark_stamped);
    assert_correct(&client).await;
}

async fn resume_from_a_cursor_gives_the_same_table_as_a_full_run(level: SchemaLevel) {
    let spec = HistorySpec {
        rows: 800,
        months: 5,
        seed: 7,
        ..HistorySpec::default()
    };
    let (full_db, full) = with_history(level, spec.clone()).await;
    let (part_db, part) = with_history(level, spec).await;
    run(&full_db, Options::default()).await.0.unwrap();

    // Interrupt the second after two slices, then resume from its cursor.
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let mut last = None;
    let mut from = None;
    let database = Database::parse(part_db.url()).unwrap();
    let result = engine::run(&database, &Options::default(), &cancel, &mut |e| {
        if let Event::Planned { from: f, .. } = e {
            from = Some(*f);
        }
        if let Event::SliceDone {
            slices_processed,
            rows_touched,
            cursor,
            ..
        } = e
        {
            last = Some(Resume {
                from: from.unwrap(),
                database: None,
                cursor: *cursor,
                slices_processed: *slices_processed,
                rows_touched: *rows_touched,
            });
            if *slices_processed == 2 {
                token.cancel();
            }
        }
    })
    .await;
    assert!(matches!(result, Err(Error::Cancelled)));
    let resume = last.unwrap();
    assert_eq!(resume.slices_processed, 2);
    let outcome = run(
        &part_db,
        Options {
            resume: Some(resume),
            ..Options::default()
        },
    )
    .await
    .0
    .unwrap();
    assert!(outcome.watermark_stamped);
    assert_eq!(
        fixture::hourly_checksum(&part).await.unwrap(),
        fixture::hourly_checksum(&full).await.unwrap()
    );
    assert_correct(&part).await;
}

// ---------------------------------------------------------------------------
// The reference's known gaps
// ---------------------------------------------------------------------------

/// A row created in January and updated in March is rolled up (by the March
/// slice), and the walk reaches March although no row was created there.
async fn row_updated_in_a_later_month_is_counted(level: SchemaLevel) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    let s = Scenario::create(&client).await.unwrap();
    s.usage(&client, UsageRow::new(ts("2026-01-10T10:30:00Z")))
        .await
        .unwrap();
    s.usage(
        &client,
        UsageRow::new(ts("2026-01-20T11:00:00Z"))
            .with_updated_at(Some(ts("2026-03-05T09:00:00Z")))
            .with_tokens(7, 7, 7, 7),
    )
    .await
    .unwrap();
    let outcome = run(&db, Options::default()).await.0.unwrap();
    assert!(outcome.to.unwrap() >= ts("2026-04-01T00:00:00Z"));
    let tokens: i64 = client
        .query_one(
            "SELECT sum(input_tokens)::bigint FROM task_usage_hourly WHERE bucket_hour = '2026-01-20T11:00:00Z'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tokens, 7);
    assert_correct(&client).await;
}

/// Early updates: a row whose updated_at precedes the month of MIN(created_at).
async fn walk_starts_at_the_earliest_of_created_and_updated(level: SchemaLevel) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    let s = Scenario::create(&client).await.unwrap();
    s.usage(
        &client,
        UsageRow::new(ts("2026-03-10T10:00:00Z")).with_updated_at(Some(ts("2026-01-05T00:00:00Z"))),
    )
    .await
    .unwrap();
    s.usage(&client, UsageRow::new(ts("2026-03-12T10:00:00Z")))
        .await
        .unwrap();
    let outcome = run(&db, Options::default()).await.0.unwrap();
    assert_eq!(outcome.from, Some(ts("2026-01-01T00:00:00Z")));
    assert_correct(&client).await;
}

/// History three months old, all rolled up, then one row deleted: its
/// bucket is stale and queued now. Returns the database's now.
async fn stale_bucket_queued_now(client: &tokio_postgres::Client) -> Timestamp {
    let s = Scenario::create(client).await.unwrap();
    let now = db_now(client).await;
    let old = engine::add_months(engine::month_floor(now), -3) + 48.hours();
    s.usage(client, UsageRow::new(old)).await.unwrap();
    let gone = s
        .usage(client, UsageRow::new(old + 1.hour()))
        .await
        .unwrap();
    fixture::rollup_window(client, old - 24.hours(), now)
        .await
        .unwrap();
    client
        .execute("DELETE FROM task_usage WHERE id = $1::text::uuid", &[&gone])
        .await
        .unwrap();
    assert_eq!(fixture::dirty_queue_len(client).await.unwrap(), 1);
    assert_ne!(
        fixture::recompute_mismatches(client).await.unwrap(),
        0,
        "stale bucket"
    );
    now
}

/// The stranded queue: the newest event is months old, but keys queued since (deletes,
/// re-attributions; here ten minutes ago) must be drained by the backfill.
async fn dirty_queue_is_drained_up_to_now(level: SchemaLevel) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    let now = stale_bucket_queued_now(&client).await;
    client
        .execute(
            "UPDATE task_usage_hourly_dirty SET enqueued_at = now() - interval '10 minutes'",
            &[],
        )
        .await
        .unwrap();
    let outcome = run(&db, Options::default()).await.0.unwrap();
    assert_eq!(outcome.skipped, None);
    assert!(
        outcome.to.unwrap() >= now - 5.minutes(),
        "the walk reaches five minutes before the present"
    );
    assert_eq!(fixture::dirty_queue_len(&client).await.unwrap(), 0);
    assert_correct(&client).await;
}

/// The stranded queue and the last-slice drain, during the run: a key queued after the run read the clock
/// (a delete committed while the walk goes on) is not drained by the walk,
/// whose last window ends five minutes before that reading, as the tick's
/// does; it stays queued, after the stamped watermark, and the
/// application's next tick drains it.
async fn a_key_queued_while_the_run_goes_on_is_left_for_the_tick(level: SchemaLevel) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    let now = stale_bucket_queued_now(&client).await;
    // As if the delete commits 30 s into the run, after its snapshot.
    client
        .execute(
            "UPDATE task_usage_hourly_dirty SET enqueued_at = now() + interval '30 seconds'",
            &[],
        )
        .await
        .unwrap();
    let outcome = run(&db, Options::default()).await.0.unwrap();
    let end = outcome.walk_end.expect("a walk");
    assert!(
        end >= now - 5.minutes() && end < now - 4.minutes(),
        "the walk ends five minutes before its clock reading: {end} (now {now})"
    );
    assert_eq!(outcome.to, Some(end), "the last window ends there");
    assert_eq!(outcome.watermark_after, Some(end), "and the stamp names it");
    assert_eq!(fixture::dirty_queue_len(&client).await.unwrap(), 1);
    assert_ne!(fixture::recompute_mismatches(&client).await.unwrap(), 0);
    // The tick that runs once the clock has passed the entry.
    fixture::rollup_window(&client, end, now + 1.minutes())
        .await
        .unwrap();
    assert_eq!(fixture::dirty_queue_len(&client).await.unwrap(), 0);
    assert_correct(&client).await;
}

/// Future-dated events: reported precisely and nothing is walked
/// (a walk could never satisfy the guard, so retries would loop).
async fn future_dated_events_are_refused_with_a_precise_message(level: SchemaLevel) {
    let (db, client) = with_history(level, small()).await;
    let now = db_now(&client).await;
    let s = Scenario::create(&client).await.unwrap();
    for h in [3, 5] {
        s.usage(
            &client,
            UsageRow::new(now - 24.hours()).with_updated_at(Some(now + (h as i64).hours())),
        )
        .await
        .unwrap();
    }
    let before = state(&client).await;
    let err = run(&db, Options::default()).await.0.unwrap_err();
    let Error::FutureDatedEvents(future) = &err else {
        panic!("{err}")
    };
    assert_eq!(future.rows, 2);
    assert!(
        (5 * 3600 - 5..=5 * 3600).contains(&future.ahead_seconds),
        "{future:?}"
    );
    let text = err.to_string();
    assert!(
        text.contains("2 task_usage row(s) are dated in the future"),
        "{text}"
    );
    assert!(!err.is_retryable());
    assert_eq!(
        state(&client).await,
        before,
        "nothing walked, nothing stamped"
    );
    // The full command walks anyway and reports them.
    let outcome = run(&db, always()).await.0.unwrap();
    assert_eq!(outcome.future_events.as_ref().map(|f| f.rows), Some(2));
    assert!(outcome.watermark_stamped);
}

/// The nested-loop recompute: session settings reach the backfill's own session only, and the
/// result is the same.
async fn session_settings_apply_to_the_backfill_session(level: SchemaLevel) {
    let spec = HistorySpec {
        rows: 1500,
        months: 3,
        seed: 11,
        ..HistorySpec::few_agents(1500, 3)
    };
    let (plain_db, plain) = with_history(level, spec.clone()).await;
    let (tuned_db, tuned) = with_history(level, spec).await;
    run(&plain_db, Options::default()).await.0.unwrap();
    let settings = vec![
        ("enable_nestloop".to_string(), "off".to_string()),
        ("work_mem".to_string(), "8MB".to_string()),
        ("application_name".to_string(), "tuned-backfill".to_string()),
    ];
    let observer = tuned_db.client().await;
    let seen = Arc::new(Mutex::new(None));
    let cancel = CancellationToken::new();
    let database = Database::parse(tuned_db.url()).unwrap();
    let opts = Options {
        session_settings: settings.clone(),
        // Slow enough for the observer to look at pg_stat_activity.
        sleep_between_slices: Duration::from_millis(300),
        ..Options::default()
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let handle = tokio::spawn(async move {
        engine::run(&database, &opts, &cancel, &mut |e| {
            if matches!(e, Event::LockAcquired { .. }) {
                let _ = tx.send(());
            }
        })
        .await
    });
    if rx.recv().await.is_some() {
        // The session announces the name it was given.
        let names: Vec<String> = observer
            .query(
                "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        *seen.lock().unwrap() = Some(names);
    }
    let outcome = handle.await.unwrap().unwrap();
    assert_eq!(outcome.settings, settings);
    let names = seen.lock().unwrap().clone().unwrap_or_default();
    assert!(names.iter().any(|n| n == "tuned-backfill"), "{names:?}");
    let observer_nestloop: String = observer
        .query_one("SHOW enable_nestloop", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(observer_nestloop, "on", "other sessions keep the default");
    assert_eq!(
        fixture::hourly_checksum(&tuned).await.unwrap(),
        fixture::hourly_checksum(&plain).await.unwrap()
    );
    assert_correct(&tuned).await;
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    tokio::time::timeout(Duration::from_secs(30), async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("condition not reached within 30s");
}

/// A resume point is used only by the walk it belongs to: the same start,
/// the same database. Otherwise the walk starts over and says why.
#[tokio::test]
async fn a_resume_from_another_walk_or_database_is_not_used() {
    let (db, client) = with_history(SchemaLevel::HourlyPipeline, small()).await;
    let (first, events) = run(&db, always()).await;
    first.unwrap();
    let database = events
        .iter()
        .find_map(|e| match e {
            Event::Connected { database, .. } => Some(*database),
            _ => None,
        })
        .unwrap();
    // A role without any grant sees the same identity: PUBLIC may run the
    // control-data functions (the run itself then fails on privileges).
    let plain = db.create_role("plain", "plain-Pw-5521", "").await;
    let plain_db = Database::parse(&plain.url).unwrap();
    let (_, plain_events) =
        testkit::engine::run(&plain_db, &always(), &CancellationToken::new()).await;
    let seen = plain_events.iter().find_map(|e| match e {
        Event::Connected { database, .. } => Some(*database),
        _ => None,
    });
    assert_eq!(seen, Some(database));
    assert!(
        database.system_identifier.is_some() && database.timeline.is_some(),
        "{database:?}"
    );
    let from = testkit::engine::planned_from(&events).unwrap();
    let ours = Resume {
        from,
        database: Some(database),
        cursor: engine::add_months(from, 2),
        slices_processed: 2,
        rows_touched: 10,
    };
    let first_slice = |events: &[Event]| {
        events.iter().find_map(|e| match e {
            Event::SliceStarted { slice } => Some(slice.from),
            _ => None,
        })
    };
    let cases = [
        (
            Resume {
                from: engine::add_months(from, -1),
                ..ours
            },
            "belongs to a walk from",
        ),
        (
            Resume {
                database: Some(engine::DatabaseIdentity {
                    database_oid: database.database_oid + 1,
                    ..database
                }),
                ..ours
            },
            "written on another database",
        ),
    ];
    for (resume, why) in cases {
        let opts = Options {
            resume: Some(resume),
            ..always()
        };
        let (outcome, events) = run(&db, opts).await;
        let outcome = outcome.unwrap();
        assert_eq!(first_slice(&events), Some(from), "walked from the start");
        assert_eq!(outcome.slices_processed, outcome.slices_total);
        assert!(
            outcome.warnings.iter().any(|w| w.contains(why)),
            "{why}: {:?}",
            outcome.warnings
        );
    }
    let opts = Options {
        resume: Some(ours),
        ..always()
    };
    let (outcome, events) = run(&db, opts).await;
    let outcome = outcome.unwrap();
    assert_eq!(first_slice(&events), Some(ours.cursor), "resumed");
    assert!(outcome.warnings.is_empty(), "{:?}", outcome.warnings);
    assert_correct(&client).await;
}
