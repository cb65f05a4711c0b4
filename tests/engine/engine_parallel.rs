//! The fast engine against a real PostgreSQL: parallel slices give the
//! serial result, the slice reaching the present runs alone and last,
//! cancellation and a lost lock stop every session, resume works after an
//! out-of-order interruption, conflicts are retried, tuning reaches our
//! sessions only, and slice sizing and width follow measured times.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use tokio_postgres::Client;
use usage_backfill_engine::{
    self as engine, CancellationToken, Database, Error, Event, Options, Outcome, Performance,
    Slice, Tuning,
};
use usage_backfill_standin::fixture::{self, HistorySpec, SchemaLevel};
use usage_backfill_testkit::{self as testkit, TestDatabase};

use testkit::engine::{assert_correct, last_resume};

// Every scenario below runs at both schema levels of the stand-in.
testkit::at_both_levels!(
    parallel_slices_give_the_serial_table,
    the_slice_reaching_the_present_runs_alone_and_last_on_the_lock_session,
    a_long_walk_ends_at_the_clock_read_before_its_last_slice,
    cancellation_stops_every_session_and_releases_the_lock,
    resume_after_an_out_of_order_interruption,
    deadlocks_and_serialization_failures_are_retried,
    losing_the_lock_session_stops_the_workers,
    tuning_reaches_our_sessions_only_and_the_user_wins,
    plan_cache_mode_is_chosen_by_measurement,
    a_losing_probe_completes_unless_it_runs_well_past_the_winners_time,
    a_cap_on_slice_duration_splits_by_measured_time,
    slice_width_is_chosen_by_measurement,
    work_mem_is_chosen_by_measurement,
    nested_loops_are_chosen_by_measurement,
    a_custom_plan_that_grows_slower_gives_way_to_the_generic_plan,
    a_custom_plan_no_faster_than_the_generic_probe_gives_way,
    a_slice_at_a_kept_alternative_is_given_up_at_its_deadline,
    a_stray_cancel_runs_the_slice_again,
);

async fn run_perf(
    db: &TestDatabase,
    opts: &Options,
    perf: &Performance,
    cancel: &CancellationToken,
) -> (Result<Outcome, Error>, Vec<Event>) {
    let database = Database::parse(db.url()).unwrap();
    let opts = Options {
        performance: perf.clone(),
        ..opts.clone()
    };
    testkit::engine::run(&database, &opts, cancel).await
}

/// A walk with the default options on two sessions, which must succeed.
async fn walk_two_sessions(db: &TestDatabase) -> Outcome {
    walk_two_sessions_with(db, &Options::default()).await
}

/// A walk with `opts` on two sessions, which must succeed.
async fn walk_two_sessions_with(db: &TestDatabase, opts: &Options) -> Outcome {
    run_perf(db, opts, &parallel(2), &CancellationToken::new())
        .await
        .0
        .unwrap()
}

/// A session setting, as `Options::session_settings` holds it.
fn kv(name: &str, value: &str) -> (String, String) {
    (name.to_string(), value.to_string())
}

fn parallel(n: u32) -> Performance {
    Performance {
        parallelism: n,
        ..Performance::default()
    }
}

fn with_parallelism(n: u32) -> Options {
    Options {
        performance: parallel(n),
        ..Options::default()
    }
}

async fn with_history(level: SchemaLevel, spec: &HistorySpec) -> (TestDatabase, Client) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    fixture::generate(&client, spec).await.unwrap();
    (db, client)
}

/// Rows updated in later months (keys shared between slices), legacy rows
/// and a dirty queue: what makes concurrent slices overlap.
fn overlapping() -> HistorySpec {
    HistorySpec {
        rows: 3000,
        months: 6,
        seed: 42,
        later_update_share: 0.3,
        dirty_queue_entries: 20,
        ..HistorySpec::default()
    }
}

/// Sessions of this database holding or waiting for lock 4246.
async fn lock_holders(client: &Client) -> Vec<i32> {
    testkit::lock_4246(client)
        .await
        .into_iter()
        .map(|(pid, ..)| pid)
        .collect()
}

/// Backfill sessions of this database still connected.
async fn our_sessions(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND application_name = 'usage-backfill'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn eventually_no_sessions(client: &Client) {
    for _ in 0..100 {
        if our_sessions(client).await == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("backfill sessions still connected after the run returned");
}

/// Replaces the window function by a wrapper that counts calls (a
/// sequence: not rolled back), runs `before` (PL/pgSQL), calls the real
/// one and logs the call (rolled back with a failed slice).
async fn wrap_window(client: &Client, before: &str) {
    client
        .batch_execute(&format!(
            "CREATE SEQUENCE window_calls;
             CREATE TABLE window_log (
                 p_from timestamptz, p_to timestamptz, pid int,
                 started timestamptz, finished timestamptz, holds_lock bool,
                 nestloop text, work_mem text, plan_mode text);
             ALTER FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) RENAME TO real_window;
             CREATE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
             RETURNS bigint LANGUAGE plpgsql AS $$
             DECLARE
                 v bigint;
                 t0 timestamptz := clock_timestamp();
                 -- The settings the call was made with.
                 nestloop text := current_setting('enable_nestloop');
                 mem text := current_setting('work_mem');
                 mode text := current_setting('plan_cache_mode');
             BEGIN
                 PERFORM nextval('window_calls');
                 {before}
                 v := real_window(p_from, p_to);
                 INSERT INTO window_log VALUES (
                     p_from, p_to, pg_backend_pid(), t0, clock_timestamp(),
                     EXISTS (SELECT 1 FROM pg_locks
                              WHERE locktype = 'advisory' AND classid = 0 AND objid = 4246
                                AND objsubid = 1 AND granted AND pid = pg_backend_pid()),
                     nestloop, mem, mode);
                 RETURN v;
             END $$;"
        ))
        .await
        .unwrap();
}

#[derive(Debug)]
struct Call {
    slice: Slice,
    pid: i32,
    started: Timestamp,
    finished: Timestamp,
    holds_lock: bool,
    nestloop: String,
    work_mem: String,
    plan_mode: String,
}

/// A window body slowed by 0.4 s a call while `setting` is `slow`, and
/// under any other value by 0.4 ms an event once the hourly table holds
/// 16,000 rows: the other value wins its probe on a small table and loses
/// as the table fills (as a merge delete does).
fn slow_at_then_as_filled(setting: &str, slow: &str) -> String {
    format!(
        "PERFORM pg_sleep(CASE WHEN current_setting('{setting}') = '{slow}' THEN 0.4
                               WHEN (SELECT count(*) FROM task_usage_hourly) > 16000
                               THEN 0.0004 * (SELECT count(*) FROM task_usage
                                               WHERE COALESCE(updated_at, created_at) >= p_from
                                                 AND COALESCE(updated_at, created_at) < p_to)
                               ELSE 0 END);"
    )
}

async fn calls(client: &Client) -> Vec<Call> {
    client
        .query("SELECT * FROM window_log ORDER BY started", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| Call {
            slice: Slice {
                from: r.get(0),
                to: r.get(1),
            },
            pid: r.get(2),
            started: r.get(3),
            finished: r.get(4),
            holds_lock: r.get(5),
            nestloop: r.get(6),
            work_mem: r.get(7),
            plan_mode: r.get(8),
        })
        .collect()
}

/// The call of the slice that ends latest: the last slice, which reaches
/// the present.
fn last_call(calls: &[Call]) -> &Call {
    calls.iter().max_by_key(|c| c.slice.to).expect("slices ran")
}

async fn window_calls(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM window_calls",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn done_slices(events: &[Event]) -> Vec<(Slice, u64, Timestamp)> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::SliceDone {
                slice,
                slices_processed,
                cursor,
                ..
            } => Some((*slice, *slices_processed, *cursor)),
            _ => None,
        })
        .collect()
}

fn overlap(a: &Call, b: &Call) -> bool {
    a.started < b.finished && b.started < a.finished
}

// ---------------------------------------------------------------------------

async fn parallel_slices_give_the_serial_table(level: SchemaLevel) {
    let spec = overlapping();
    let (serial_db, serial) = with_history(level, &spec).await;
    let (par_db, par) = with_history(level, &spec).await;
    let opts = Options::default();
    let cancel = CancellationToken::new();
    let one = run_perf(&serial_db, &opts, &Performance::reference(), &cancel)
        .await
        .0
        .unwrap();
    assert_eq!(one.sessions, 1);
    wrap_window(&par, "PERFORM pg_sleep(0.1);").await;
    let (three, events) = run_perf(&par_db, &opts, &parallel(3), &cancel).await;
    let three = three.unwrap();
    assert_eq!(three.sessions, 3);
    assert!(three.watermark_stamped);
    assert_eq!(
        fixture::hourly_checksum(&par).await.unwrap(),
        fixture::hourly_checksum(&serial).await.unwrap()
    );
    assert_eq!(fixture::dirty_queue_len(&par).await.unwrap(), 0);
    assert_correct(&par).await;
    // It really ran concurrently, and every slice was reported once, in order.
    let calls = calls(&par).await;
    assert!(
        calls
            .iter()
            .enumerate()
            .any(|(i, a)| calls[i + 1..].iter().any(|b| overlap(a, b))),
        "no two window calls overlapped"
    );
    let done = done_slices(&events);
    assert_eq!(done.len() as u64, three.slices_processed);
    for w in done.windows(2) {
        assert_eq!(w[0].2, w[1].0.from, "reported in slice order");
        assert_eq!(w[0].1 + 1, w[1].1);
    }
    assert_eq!(three.cursor, three.to);
    let stats = three.slice_stats.unwrap();
    assert_eq!(stats.slices, three.slices_processed);
    assert!(stats.median_ms <= stats.max_ms && stats.max_ms >= 100);
}

/// The overlapping history walked on 2 sessions, every window call first
/// sleeping `seconds` (and logged, see [`wrap_window`]).
async fn slow_windows_on_two_sessions(
    level: SchemaLevel,
    seconds: &str,
) -> (TestDatabase, Client, Outcome, Vec<Event>) {
    let (db, client) = with_history(level, &overlapping()).await;
    wrap_window(&client, &format!("PERFORM pg_sleep({seconds});")).await;
    let (outcome, events) = run_perf(
        &db,
        &Options::default(),
        &parallel(2),
        &CancellationToken::new(),
    )
    .await;
    (db, client, outcome.unwrap(), events)
}

/// A walk that takes long (an hour at 3M rows on a slow server) must not
/// stamp the clock it read before it began: the watermark would trail the
/// newest event by more than the guard's hour straight after the run. The
/// last slice reads the clock again and ends five minutes before it.
async fn a_long_walk_ends_at_the_clock_read_before_its_last_slice(level: SchemaLevel) {
    let (_db, client, outcome, _) = slow_windows_on_two_sessions(level, "1").await;
    let calls = calls(&client).await;
    assert!(
        calls.len() >= 4,
        "several historical slices: {}",
        calls.len()
    );
    let last = last_call(&calls);
    let end = outcome.walk_end.expect("a walk");
    assert_eq!(
        last.slice.to, end,
        "the last window ends where the walk ends"
    );
    assert_eq!(outcome.to, Some(end));
    assert_eq!(outcome.watermark_after, Some(end), "and the stamp names it");
    assert_eq!(outcome.cursor, Some(end));
    // The clock was read just before the last call began, after the
    // historical slices had taken their seconds.
    let read = end + jiff::SignedDuration::from_mins(5);
    let first = calls.iter().map(|c| c.started).min().unwrap();
    let walked = last.started.duration_since(first);
    assert!(
        read <= last.started,
        "read {read}, last call began {}",
        last.started
    );
    assert!(
        last.started.duration_since(read) < walked / 2,
        "the end was read {} before the last call, the historical slices took {walked}",
        last.started.duration_since(read)
    );
    assert_correct(&client).await;
}

async fn the_slice_reaching_the_present_runs_alone_and_last_on_the_lock_session(
    level: SchemaLevel,
) {
    let (_db, client, outcome, events) = slow_windows_on_two_sessions(level, "0.15").await;
    let calls = calls(&client).await;
    assert_eq!(calls.len() as u64, outcome.slices_processed);
    let last = last_call(&calls);
    assert_eq!(Some(last.slice.to), outcome.to);
    assert_eq!(outcome.to, outcome.walk_end, "the last slice ends the walk");
    assert!(last.slice.to >= Timestamp::now() - jiff::SignedDuration::from_mins(6));
    for other in calls.iter().filter(|c| c.slice != last.slice) {
        assert!(
            other.finished <= last.started,
            "slice {:?} overlapped the last slice",
            other.slice
        );
    }
    assert!(last.holds_lock, "the last slice runs on the lock session");
    assert_eq!(
        calls
            .iter()
            .map(|c| c.pid)
            .collect::<std::collections::HashSet<_>>()
            .len(),
        2
    );
    // Events: the last slice starts after every other slice was reported.
    let started_last = events
        .iter()
        .position(|e| matches!(e, Event::SliceStarted { slice } if slice.to == last.slice.to))
        .unwrap();
    let done_others = events
        .iter()
        .rposition(|e| matches!(e, Event::SliceDone { slice, .. } if slice.to != last.slice.to))
        .unwrap();
    assert!(done_others < started_last);
    assert!(matches!(events.last(), Some(Event::Stamped { .. })));
}

async fn cancellation_stops_every_session_and_releases_the_lock(level: SchemaLevel) {
    let (db, client) = with_history(level, &overlapping()).await;
    wrap_window(&client, "PERFORM pg_sleep(30);").await;
    let watermark = fixture::watermark(&client).await.unwrap();
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let database = Database::parse(db.url()).unwrap();
    let started = Arc::new(Mutex::new(0));
    let seen = started.clone();
    let run = tokio::spawn(async move {
        engine::run(&database, &with_parallelism(3), &cancel, &mut |e| {
            if matches!(e, Event::SliceStarted { .. }) {
                *seen.lock().unwrap() += 1;
            }
        })
        .await
    });
    // Three window calls under way, then cancel.
    tokio::time::timeout(Duration::from_secs(30), async {
        while window_calls(&client).await < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("three sessions in the window");
    let t0 = std::time::Instant::now();
    token.cancel();
    let result = run.await.unwrap();
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "statements were cancelled, not awaited"
    );
    assert_eq!(*started.lock().unwrap(), 3);
    assert!(lock_holders(&client).await.is_empty(), "lock released");
    eventually_no_sessions(&client).await;
    assert_eq!(fixture::watermark(&client).await.unwrap(), watermark);
    assert!(calls(&client).await.is_empty(), "every slice rolled back");
}

/// Slice 2 is slow, so slices 3 and 4 commit before it: nothing after
/// slice 1 is reported, the cursor stays at slice 2, and resuming from it
/// gives the full run's table.
async fn resume_after_an_out_of_order_interruption(level: SchemaLevel) {
    let spec = overlapping();
    let (full_db, full) = with_history(level, &spec).await;
    let (part_db, part) = with_history(level, &spec).await;
    let opts = Options::default();
    wrap_window(&full, "").await;
    run_perf(&full_db, &opts, &parallel(2), &CancellationToken::new())
        .await
        .0
        .unwrap();

    // Where slice 2 starts: the first two slices are cut before anything
    // is measured, so the full run's are the next run's.
    let mut starts: Vec<Timestamp> = calls(&full).await.iter().map(|c| c.slice.from).collect();
    starts.sort();
    let second = starts[1];
    wrap_window(
        &part,
        &format!("IF p_from = '{second}' THEN PERFORM pg_sleep(30); END IF;"),
    )
    .await;
    let cancel = CancellationToken::new();
    let token = cancel.clone();
    let database = Database::parse(part_db.url()).unwrap();
    let watcher = part_db.client().await;
    let handle = tokio::spawn(async move {
        let mut events = Vec::new();
        let opts = Options {
            performance: parallel(2),
            ..opts
        };
        let result = engine::run(&database, &opts, &cancel, &mut |e| events.push(e.clone())).await;
        (result, events)
    });
    // Wait until two later slices committed while slice 2 sleeps.
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let later: i64 = watcher
                .query_one(
                    "SELECT count(*) FROM window_log WHERE p_from > $1",
                    &[&second],
                )
                .await
                .unwrap()
                .get(0);
            if later >= 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("later slices committed");
    token.cancel();
    let (result, events) = handle.await.unwrap();
    assert!(matches!(result, Err(Error::Cancelled)), "{result:?}");
    let done = done_slices(&events);
    assert_eq!(done.len(), 1, "only slice 1 continues the committed prefix");
    let resume = last_resume(&events).unwrap();
    assert_eq!(resume.cursor, second);
    assert_eq!(resume.slices_processed, 1);
    assert!(lock_holders(&part).await.is_empty());

    part.batch_execute(
        "CREATE OR REPLACE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
         RETURNS bigint LANGUAGE sql AS $$ SELECT real_window(p_from, p_to) $$",
    )
    .await
    .unwrap();
    let (outcome, events) = run_perf(
        &part_db,
        &Options {
            resume: Some(resume),
            ..Options::default()
        },
        &parallel(2),
        &CancellationToken::new(),
    )
    .await;
    let outcome = outcome.unwrap();
    let first_started = events.iter().find_map(|e| match e {
        Event::SliceStarted { slice } => Some(slice.from),
        _ => None,
    });
    assert_eq!(first_started, Some(second), "resumed at the cursor");
    assert_eq!(outcome.slices_processed, outcome.slices_total);
    assert_eq!(
        fixture::hourly_checksum(&part).await.unwrap(),
        fixture::hourly_checksum(&full).await.unwrap()
    );
    assert_correct(&part).await;
}

/// Each slice's first attempt (per session) fails with a deadlock.
const DEADLOCK_ONCE: &str = "
    IF NOT EXISTS (SELECT 1 FROM pg_locks
                    WHERE locktype = 'advisory' AND classid = 777 AND objsubid = 2
                      AND objid = (extract(epoch FROM p_from)::bigint / 3600)::int::oid
                      AND pid = pg_backend_pid()) THEN
        PERFORM pg_advisory_lock(777, (extract(epoch FROM p_from)::bigint / 3600)::int);
        RAISE EXCEPTION 'injected deadlock' USING ERRCODE = '40P01';
    END IF;";

async fn deadlocks_and_serialization_failures_are_retried(level: SchemaLevel) {
    let spec = overlapping();
    let (plain_db, plain) = with_history(level, &spec).await;
    let (db, client) = with_history(level, &spec).await;
    run_perf(
        &plain_db,
        &Options::default(),
        &Performance::reference(),
        &CancellationToken::new(),
    )
    .await
    .0
    .unwrap();
    wrap_window(&client, DEADLOCK_ONCE).await;
    let outcome = walk_two_sessions(&db).await;
    assert_eq!(outcome.slice_retries, outcome.slices_processed);
    assert_eq!(
        window_calls(&client).await,
        2 * outcome.slices_processed as i64
    );
    assert_eq!(
        fixture::hourly_checksum(&client).await.unwrap(),
        fixture::hourly_checksum(&plain).await.unwrap()
    );
    assert_correct(&client).await;

    // A conflict that never clears: bounded, then a retryable slice error.
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
             RETURNS bigint LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM nextval('window_calls');
                 RAISE EXCEPTION 'injected serialization failure' USING ERRCODE = '40001';
             END $$;
             ALTER SEQUENCE window_calls RESTART;",
        )
        .await
        .unwrap();
    let watermark = fixture::watermark(&client).await.unwrap();
    let err = run_perf(
        &db,
        &Options {
            mode: engine::Mode::Always {
                months_back: 0,
                force_partial: false,
            },
            ..Options::default()
        },
        &parallel(1),
        &CancellationToken::new(),
    )
    .await
    .0
    .unwrap_err();
    assert!(matches!(err, Error::Slice { .. }), "{err}");
    assert!(err.to_string().contains("injected serialization failure"));
    assert!(err.is_retryable());
    assert_eq!(window_calls(&client).await, 5, "bounded attempts");
    assert_eq!(fixture::watermark(&client).await.unwrap(), watermark);
    assert!(lock_holders(&client).await.is_empty());
}

async fn losing_the_lock_session_stops_the_workers(level: SchemaLevel) {
    let (db, client) = with_history(level, &overlapping()).await;
    wrap_window(&client, "PERFORM pg_sleep(1);").await;
    let watermark = fixture::watermark(&client).await.unwrap();
    let database = Database::parse(db.url()).unwrap();
    let handle = tokio::spawn(async move {
        engine::run(
            &database,
            &with_parallelism(3),
            &CancellationToken::new(),
            &mut |_| {},
        )
        .await
    });
    tokio::time::timeout(Duration::from_secs(30), async {
        while window_calls(&client).await < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("three sessions in the window");
    let holder = lock_holders(&client).await;
    assert_eq!(holder.len(), 1);
    client
        .execute("SELECT pg_terminate_backend($1)", &[&holder[0]])
        .await
        .unwrap();
    let calls_at_kill = window_calls(&client).await;
    let err = handle.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::LockLost { .. }), "{err}");
    assert!(err.is_retryable());
    assert_eq!(err.reason(), "LockLost");
    assert_eq!(
        window_calls(&client).await,
        calls_at_kill,
        "no window call started after the lock was lost"
    );
    eventually_no_sessions(&client).await;
    assert_eq!(fixture::watermark(&client).await.unwrap(), watermark);
    // The next attempt completes.
    client
        .batch_execute(
            "CREATE OR REPLACE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
             RETURNS bigint LANGUAGE sql AS $$ SELECT real_window(p_from, p_to) $$",
        )
        .await
        .unwrap();
    run_perf(
        &db,
        &Options::default(),
        &parallel(3),
        &CancellationToken::new(),
    )
    .await
    .0
    .unwrap();
    assert_correct(&client).await;
}

async fn tuning_reaches_our_sessions_only_and_the_user_wins(level: SchemaLevel) {
    let (db, client) = with_history(level, &overlapping()).await;
    wrap_window(&client, "").await;
    let outcome = walk_two_sessions(&db).await;
    assert_eq!(
        outcome.settings,
        vec![kv("enable_nestloop", "off"), kv("work_mem", "64MB")]
    );
    assert_eq!(outcome.tuning.as_ref().unwrap().preset, "default");
    for c in calls(&client).await {
        assert_eq!((c.nestloop.as_str(), c.work_mem.as_str()), ("off", "64MB"));
    }
    let other: String = client
        .query_one("SHOW enable_nestloop", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(other, "on", "other sessions keep the server's settings");

    // The user's settings win; tuning off leaves the server's.
    client.batch_execute("TRUNCATE window_log").await.unwrap();
    let opts = Options {
        mode: engine::Mode::Always {
            months_back: 0,
            force_partial: false,
        },
        session_settings: vec![kv("work_mem", "8MB")],
        ..Options::default()
    };
    let outcome = walk_two_sessions_with(&db, &opts).await;
    assert_eq!(
        outcome.settings,
        vec![kv("enable_nestloop", "off"), kv("work_mem", "8MB")]
    );
    for c in calls(&client).await {
        assert_eq!((c.nestloop.as_str(), c.work_mem.as_str()), ("off", "8MB"));
    }
    client.batch_execute("TRUNCATE window_log").await.unwrap();
    let off = Performance {
        tuning: Tuning::Off,
        ..parallel(2)
    };
    let outcome = run_perf(
        &db,
        &Options {
            session_settings: vec![],
            ..opts
        },
        &off,
        &CancellationToken::new(),
    )
    .await
    .0
    .unwrap();
    assert!(outcome.settings.is_empty());
    assert_eq!(outcome.tuning.unwrap().preset, "off");
    for c in calls(&client).await {
        assert_eq!(c.nestloop, "on");
    }
    assert_correct(&client).await;
}

/// With enough events per slice, the first two slices run one under each
/// plan_cache_mode and the rest under the faster (once known).
async fn plan_cache_mode_is_chosen_by_measurement(level: SchemaLevel) {
    let (db, client) = with_history(level, &HistorySpec::even(16_000, 4)).await;
    wrap_window(&client, "").await;
    let outcome = walk_two_sessions(&db).await;
    let tuning = outcome.tuning.unwrap();
    // The plan probes (the setting probes after them have their own
    // tests).
    let probed: Vec<&str> = tuning
        .probes
        .iter()
        .filter(|p| p.at_defaults())
        .map(|p| p.plan_cache_mode.as_str())
        .collect();
    assert_eq!(probed.len(), 2);
    assert!(probed.contains(&"force_generic_plan") && probed.contains(&"force_custom_plan"));
    let chosen = tuning.plan_cache_mode.clone().expect("a mode was chosen");
    assert!(
        tuning
            .probes
            .iter()
            .any(|p| p.completed && p.plan_cache_mode == chosen),
        "{tuning:?}"
    );
    // A probe that could no longer win was given up, and its slice ran
    // again under the winner; committed calls ran under their probe's mode
    // or the winner's.
    let mut calls = calls(&client).await;
    calls.sort_by_key(|c| c.slice.from);
    assert_eq!(calls.len() as u64, outcome.slices_processed);
    // The probes ran on two adjacent historical months with the most
    // events together, generic on the larger: found by their events.
    let mut historical = Vec::new();
    for c in &calls[..calls.len() - 1] {
        // The events the walk counted for the slice (the slice reaching
        // the present is last).
        let events: i64 = client
            .query_one(
                "SELECT count(*) FROM task_usage
                 WHERE COALESCE(updated_at, created_at) >= $1
                   AND COALESCE(updated_at, created_at) < $2",
                &[&c.slice.from, &c.slice.to],
            )
            .await
            .unwrap()
            .get(0);
        historical.push((events, c.slice, c.plan_mode.clone()));
    }
    // A probe given up ran again as part of a slice of the winner: only a
    // completed probe is one slice of its own.
    let probe_slice = |mode: &str| {
        let p = tuning
            .probes
            .iter()
            .find(|p| p.plan_cache_mode == mode && p.at_defaults())
            .unwrap();
        p.completed.then(|| {
            historical
                .iter()
                .find(|(events, _, m)| *events == p.events && m == mode)
                .unwrap_or_else(|| panic!("no slice of the {mode} probe: {historical:?}"))
                .clone()
        })
    };
    let probed: Vec<Slice> = match (
        probe_slice("force_generic_plan"),
        probe_slice("force_custom_plan"),
    ) {
        (Some(generic), Some(custom)) => {
            assert!(
                generic.1.to == custom.1.from || custom.1.to == generic.1.from,
                "{generic:?} {custom:?}"
            );
            assert!(generic.0 >= custom.0, "{generic:?} {custom:?}");
            vec![generic.1, custom.1]
        }
        (one, other) => one.or(other).map(|p| p.1).into_iter().collect(),
    };
    // Until the verdict nobody waits: slices run under the first mode (the
    // provisional best); the last slice runs under the chosen one.
    for c in calls.iter().filter(|c| !probed.contains(&c.slice)) {
        assert!(
            c.plan_mode == chosen || c.plan_mode == "force_generic_plan",
            "{:?}: {}",
            c.slice,
            c.plan_mode
        );
    }
    assert_eq!(calls.last().unwrap().plan_mode, chosen);
    assert_correct(&client).await;
}

/// A plan probe that can no longer win settles the mode at once but runs on,
/// its slice's work kept, unless it reaches 1.25x what the winner's time
/// per event predicts for it: a custom plan about 1.1x slower than the
/// generic one (a near tie) completes and its call commits; one about 3x
/// slower is given up, no call under it commits, and its slice runs again
/// under the generic plan.
async fn a_losing_probe_completes_unless_it_runs_well_past_the_winners_time(level: SchemaLevel) {
    for (custom_sleep, completes) in [(0.55, true), (1.6, false)] {
        let (db, client) = with_history(level, &HistorySpec::even(16_000, 4)).await;
        wrap_window(
            &client,
            &format!(
                "PERFORM pg_sleep(CASE WHEN current_setting('plan_cache_mode') = 'force_custom_plan'
                                       THEN {custom_sleep} ELSE 0.5 END);"
            ),
        )
        .await;
        let outcome = walk_two_sessions(&db).await;
        let tuning = outcome.tuning.clone().unwrap();
        assert_eq!(
            tuning.plan_cache_mode.as_deref(),
            Some("force_generic_plan"),
            "{tuning:?}"
        );
        let custom = tuning
            .probes
            .iter()
            .find(|p| p.at_defaults() && p.plan_cache_mode == "force_custom_plan")
            .expect("the custom plan was probed");
        assert_eq!(custom.completed, completes, "{tuning:?}");
        let calls = calls(&client).await;
        let under_custom = calls
            .iter()
            .filter(|c| c.plan_mode == "force_custom_plan")
            .count();
        assert_eq!(under_custom, usize::from(completes), "{tuning:?}");
        assert_eq!(last_call(&calls).plan_mode, "force_generic_plan");
        assert_eq!(outcome.slices_processed, outcome.slices_total);
        assert_correct(&client).await;
    }
}

/// Window time proportional to a slice's events (0.2 ms each): with a cap
/// of 300 ms the months (about 2700 events, 540 ms) are split, and the
/// probed first month's cheap eighths are merged again.
async fn a_cap_on_slice_duration_splits_by_measured_time(level: SchemaLevel) {
    let (db, client) = with_history(level, &HistorySpec::even(8_000, 3)).await;
    wrap_window(
        &client,
        "PERFORM pg_sleep(0.0002 * (SELECT count(*) FROM task_usage
                                     WHERE COALESCE(updated_at, created_at) >= p_from
                                       AND COALESCE(updated_at, created_at) < p_to));",
    )
    .await;
    let perf = Performance {
        max_slice_duration: Some(Duration::from_millis(300)),
        ..parallel(1)
    };
    let (outcome, events) =
        run_perf(&db, &Options::default(), &perf, &CancellationToken::new()).await;
    let outcome = outcome.unwrap();
    let months = 3 + 1;
    assert!(
        outcome.slices_processed > months + 4,
        "split: {} slices",
        outcome.slices_processed
    );
    // Fewer than all eighths of every month: cheap neighbours were merged.
    assert!(outcome.slices_processed < 3 * 8 + 1, "{outcome:?}");
    let done = done_slices(&events);
    for w in done.windows(2) {
        assert_eq!(w[0].2, w[1].0.from);
    }
    let stats = outcome.slice_stats.unwrap();
    assert!(stats.max_ms < 600, "{stats:?}");
    assert_correct(&client).await;
}

/// How many events a slice takes follows the time per event measured on
/// the walk's own slices: a window call made slow by a fixed part (a
/// `pg_sleep` per call) is walked in slices of several months. (Narrower
/// widths, and the budget, are `width`'s unit tests: a history that makes
/// half months win needs about fifty months before the budget affords
/// the trials, too slow for this suite.)
async fn slice_width_is_chosen_by_measurement(level: SchemaLevel) {
    // About 2500 events a month over 24 months.
    let spec = HistorySpec::even(60_000, 24);
    {
        let (db, client) = with_history(level, &spec).await;
        wrap_window(&client, "PERFORM pg_sleep(1.0);").await;
        let outcome = walk_two_sessions(&db).await;
        let width = outcome
            .tuning
            .as_ref()
            .and_then(|t| t.slice_width.clone())
            .expect("the width was measured");
        let widest = width.levels.last().unwrap().events_per_slice;
        assert!(width.levels.len() >= 2, "{width:?}");
        assert!(
            width.levels.iter().all(|l| l.slices >= 1 && l.events > 0),
            "{width:?}"
        );
        // A median month is the ladder's level 0, at about 2500 events.
        let month = width
            .levels
            .iter()
            .map(|l| l.events_per_slice)
            .find(|e| (2_000..3_000).contains(e))
            .expect("a month's width was measured");
        let rate = |e: i64| {
            let l = width
                .levels
                .iter()
                .find(|l| l.events_per_slice == e)
                .unwrap();
            l.elapsed_ms as f64 / l.events as f64
        };
        assert!(width.events_per_slice >= 2 * month, "{width:?}");
        assert_eq!(width.events_per_slice, widest, "{width:?}");
        assert!(outcome.slices_processed < 24, "{outcome:?}");
        // The kept width is the one with the lowest time per event.
        for l in &width.levels {
            assert!(rate(width.events_per_slice) <= rate(l.events_per_slice));
        }
        assert_correct(&client).await;
    }
    // Not measured under the server's plans (the reference's months), nor
    // with a cap (the cap's own model sizes the slices).
    let (db, _client) = with_history(level, &HistorySpec::even(6_000, 6)).await;
    for perf in [
        Performance {
            tuning: Tuning::Off,
            ..parallel(2)
        },
        Performance {
            max_slice_duration: Some(Duration::from_secs(60)),
            ..parallel(2)
        },
    ] {
        let outcome = run_perf(&db, &Options::default(), &perf, &CancellationToken::new())
            .await
            .0
            .unwrap();
        assert_eq!(outcome.tuning.unwrap().slice_width, None);
    }
}

/// After plan_cache_mode, one slice runs at work_mem 4MB and is compared
/// per event with the plan probe that won (64MB): a window call made slow
/// at 4MB keeps 64MB for every other slice; one made slow at 64MB switches
/// every later slice, the last included, to 4MB. The user's work_mem is
/// never probed.
async fn work_mem_is_chosen_by_measurement(level: SchemaLevel) {
    for (slow, kept) in [("4MB", "64MB"), ("64MB", "4MB")] {
        let (db, client) = with_history(level, &HistorySpec::even(24_000, 6)).await;
        // The custom plan is made to lose its probe: with the two modes
        // equal, it could win on noise and be reversed later by the plan
        // review, and this test is about work_mem alone.
        wrap_window(
            &client,
            &format!(
                "PERFORM pg_sleep(CASE WHEN current_setting('work_mem') = '{slow}' THEN 0.4 ELSE 0 END
                                + CASE WHEN current_setting('plan_cache_mode') = 'force_custom_plan'
                                       THEN 0.2 ELSE 0 END);"
            ),
        )
        .await;
        let outcome = walk_two_sessions(&db).await;
        let tuning = outcome.tuning.clone().unwrap();
        assert_eq!(tuning.work_mem.as_deref(), Some(kept), "{tuning:?}");
        let tried: Vec<_> = tuning
            .probes
            .iter()
            .filter(|p| p.work_mem.is_some() && p.enable_nestloop.is_none())
            .collect();
        assert_eq!(tried.len(), 1, "{tuning:?}");
        assert_eq!(tried[0].work_mem.as_deref(), Some("4MB"));
        assert_eq!(
            Some(&tried[0].plan_cache_mode),
            tuning.plan_cache_mode.as_ref(),
            "the work_mem probe runs under the mode kept"
        );
        // Given up only once it ran 1.25x what the 64MB figure it is
        // compared with (the winning plan probe's time per event, or a
        // width level's when lower) predicts for it; checked against the
        // lowest of them at the end with no factor, since a level's rate
        // when the probe ran can be below its final average: never given
        // up before it was slower than 64MB.
        if !tried[0].completed {
            let won = tuning
                .probes
                .iter()
                .find(|p| {
                    p.completed
                        && p.at_defaults()
                        && Some(&p.plan_cache_mode) == tuning.plan_cache_mode.as_ref()
                })
                .unwrap();
            let widths = tuning.slice_width.iter().flat_map(|w| &w.levels);
            let lowest = widths
                .map(|l| l.elapsed_ms as f64 / l.events as f64)
                .fold(rate(won), f64::min);
            let predicted = lowest * tried[0].events as f64;
            assert!(tried[0].elapsed_ms as f64 >= predicted, "{tuning:?}");
        }
        let calls = calls(&client).await;
        let last = last_call(&calls);
        assert_eq!(last.work_mem, kept);
        let at_4mb = calls.iter().filter(|c| c.work_mem == "4MB").count();
        if kept == "64MB" {
            // Only the probe, if it was not given up (then it left no call).
            assert!(at_4mb <= 1, "{at_4mb} calls at 4MB");
        } else {
            assert!(at_4mb >= 2, "the probe and the slices after it");
        }
        assert_correct(&client).await;
    }
    // 4MB wins its probe while the hourly table is small and loses once
    // it has filled (as a merge delete does): every session goes back to
    // 64MB, the last slice included, and the slices that lost (one per
    // session at most, given up at their deadline or slower than 1.5x
    // the probe once committed) are listed.
    let (db, client) = with_history(level, &HistorySpec::even(40_000, 10)).await;
    wrap_window(&client, &slow_at_then_as_filled("work_mem", "64MB")).await;
    let outcome = walk_two_sessions(&db).await;
    let tuning = outcome.tuning.clone().unwrap();
    assert_eq!(tuning.work_mem.as_deref(), Some("64MB"), "{tuning:?}");
    let at_4mb: Vec<_> = tuning
        .probes
        .iter()
        .filter(|p| p.work_mem.is_some() && p.enable_nestloop.is_none())
        .collect();
    assert!(
        (2..=3).contains(&at_4mb.len()),
        "the probe and the slices that lost: {tuning:?}"
    );
    for lost in &at_4mb[1..] {
        assert!(rate(lost) > 1.5 * rate(at_4mb[0]), "{tuning:?}");
    }
    let calls = calls(&client).await;
    assert_eq!(last_call(&calls).work_mem, "64MB");
    assert_correct(&client).await;
    // The user's work_mem: no probe.
    let tuning = tuning_at_the_users(level, "work_mem", "8MB").await;
    assert_eq!(tuning.work_mem, None);
    assert!(tuning.probes.iter().all(|p| p.work_mem.is_none()));
}

/// Last of the settings, one small slice runs with nested loops allowed
/// (`enable_nestloop = on`) under the settings kept before it, compared per
/// event with the entry that ran under them: slow nested loops are given up
/// as soon as they can no longer win (the slice runs again, and no call
/// with them commits); fast ones are kept for every later slice, the last
/// included; ones that win early and lose as the hourly table fills (as a
/// nested loop over an agent's growing history does) send every session
/// back. The user's enable_nestloop is never probed.
async fn nested_loops_are_chosen_by_measurement(level: SchemaLevel) {
    // 4MB made faster than 64MB, nested loops slower than either: 4MB is
    // kept, and the nested-loop probe runs at 4MB against the 4MB entry.
    // Months of about 6000 events: the probe takes a third of one. (Real
    // nested loops cost more than half a millisecond an event on these
    // histories, given up after 1.2 s on 2000 events of the 24k one, and
    // the real 4MB plan can be slower than 64MB: the calls themselves run
    // with nested loops off, the sleeps alone differ.)
    let (db, client) = with_history(level, &HistorySpec::even(36_000, 6)).await;
    wrap_window(
        &client,
        "PERFORM pg_sleep(CASE WHEN current_setting('work_mem') = '64MB' THEN 1.5 ELSE 0 END
                        + CASE WHEN current_setting('enable_nestloop') = 'on' THEN 0.5 ELSE 0 END
                        + CASE WHEN current_setting('plan_cache_mode') = 'force_custom_plan'
                               THEN 0.2 ELSE 0 END);
         PERFORM set_config('enable_nestloop', 'off', true);",
    )
    .await;
    let outcome = walk_two_sessions(&db).await;
    let tuning = outcome.tuning.clone().unwrap();
    assert_eq!(tuning.work_mem.as_deref(), Some("4MB"), "{tuning:?}");
    assert_eq!(tuning.enable_nestloop.as_deref(), Some("off"), "{tuning:?}");
    let at_4mb = tuning
        .probes
        .iter()
        .find(|p| p.completed && p.work_mem.as_deref() == Some("4MB"))
        .expect("the work_mem probe");
    let tried: Vec<_> = tuning
        .probes
        .iter()
        .filter(|p| p.enable_nestloop.is_some())
        .collect();
    assert_eq!(tried.len(), 1, "{tuning:?}");
    let nl = tried[0];
    assert_eq!(nl.enable_nestloop.as_deref(), Some("on"));
    assert_eq!(nl.work_mem.as_deref(), Some("4MB"), "under the value kept");
    assert_eq!(Some(&nl.plan_cache_mode), tuning.plan_cache_mode.as_ref());
    // Given up, and only once it could no longer win by the margin; on a
    // slice of its own, smaller than a month.
    assert!(!nl.completed, "{tuning:?}");
    assert!(
        nl.elapsed_ms as f64 >= rate(at_4mb) * nl.events as f64 / 1.1,
        "{tuning:?}"
    );
    assert!(
        nl.events >= 2_000 && nl.events < at_4mb.events,
        "{tuning:?}"
    );
    let logged = calls(&client).await;
    assert!(logged.iter().all(|c| c.nestloop == "off"));
    assert_eq!(last_call(&logged).work_mem, "4MB");
    assert_correct(&client).await;

    // Nested loops made faster: kept from the probe on, the last slice
    // included. (The user's work_mem, so no work_mem probe joins in.)
    let user_work_mem = Options {
        session_settings: vec![kv("work_mem", "64MB")],
        ..Options::default()
    };
    let (db, client) = with_history(level, &HistorySpec::even(24_000, 6)).await;
    wrap_window(
        &client,
        "PERFORM pg_sleep(CASE WHEN current_setting('enable_nestloop') = 'off' THEN 0.4 ELSE 0 END
                        + CASE WHEN current_setting('plan_cache_mode') = 'force_custom_plan'
                               THEN 0.2 ELSE 0 END);
         PERFORM set_config('enable_nestloop', 'off', true);",
    )
    .await;
    let outcome = walk_two_sessions_with(&db, &user_work_mem).await;
    let tuning = outcome.tuning.clone().unwrap();
    assert_eq!(tuning.enable_nestloop.as_deref(), Some("on"), "{tuning:?}");
    let won = tuning
        .probes
        .iter()
        .find(|p| {
            p.completed
                && p.at_defaults()
                && Some(&p.plan_cache_mode) == tuning.plan_cache_mode.as_ref()
        })
        .unwrap();
    let nl: Vec<_> = tuning
        .probes
        .iter()
        .filter(|p| p.enable_nestloop.is_some())
        .collect();
    assert_eq!(nl.len(), 1, "{tuning:?}");
    assert!(
        nl[0].completed && 1.1 * rate(nl[0]) < rate(won),
        "{tuning:?}"
    );
    let logged = calls(&client).await;
    let last = last_call(&logged);
    assert_eq!(last.nestloop, "on");
    // Every call that started after the probe had finished ran with them.
    let probe_finished = logged.iter().find(|c| c.nestloop == "on").unwrap().finished;
    for c in logged.iter().filter(|c| c.started > probe_finished) {
        assert_eq!(c.nestloop, "on", "{:?}", c.slice);
    }
    assert_correct(&client).await;

    // Faster while the hourly table is small, slower once it has filled:
    // every session goes back to nested loops off, the last slice
    // included, and the slice that lost is listed.
    let (db, client) = with_history(level, &HistorySpec::even(40_000, 10)).await;
    wrap_window(
        &client,
        &format!(
            "{} PERFORM set_config('enable_nestloop', 'off', true);",
            slow_at_then_as_filled("enable_nestloop", "off")
        ),
    )
    .await;
    let outcome = walk_two_sessions_with(&db, &user_work_mem).await;
    let tuning = outcome.tuning.clone().unwrap();
    assert_eq!(tuning.enable_nestloop.as_deref(), Some("off"), "{tuning:?}");
    let nl: Vec<_> = tuning
        .probes
        .iter()
        .filter(|p| p.enable_nestloop.is_some())
        .collect();
    assert!(
        (2..=3).contains(&nl.len()),
        "the probe and the slices that lost: {tuning:?}"
    );
    for lost in &nl[1..] {
        assert!(rate(lost) > 1.5 * rate(nl[0]), "{tuning:?}");
    }
    let logged = calls(&client).await;
    assert_eq!(last_call(&logged).nestloop, "off");
    assert_correct(&client).await;

    // The user's enable_nestloop: no probe.
    let tuning = tuning_at_the_users(level, "enable_nestloop", "off").await;
    assert_eq!(tuning.enable_nestloop, None);
    assert!(tuning.probes.iter().all(|p| p.enable_nestloop.is_none()));
}

/// The custom plan wins its probe while the hourly table is small and
/// loses once the table has filled (as its merge delete does): every
/// session goes over to the generic plan, the last slice included, and the
/// slice that lost is listed with the probes. (The user's work_mem and
/// enable_nestloop, so no setting probe joins in.)
async fn a_custom_plan_that_grows_slower_gives_way_to_the_generic_plan(level: SchemaLevel) {
    let (db, client) = with_history(level, &HistorySpec::even(40_000, 10)).await;
    wrap_window(
        &client,
        &slow_at_then_as_filled("plan_cache_mode", "force_generic_plan"),
    )
    .await;
    let (tuning, custom) = walk_back_to_generic(&db, &client).await;
    // The probe won; each slice that lost ran at least 1.5x its time per
    // event: given up at its deadline, or committed on at least half its
    // events (a narrower one is not compared after its commit).
    for lost in &custom[1..] {
        assert!(rate(lost) > 1.5 * rate(&custom[0]), "{tuning:?}");
        assert!(
            !lost.completed || lost.events >= custom[0].events / 2,
            "{tuning:?}"
        );
    }
    assert_correct(&client).await;
}

/// A walk on two sessions at the user's work_mem and enable_nestloop (so
/// no setting probe joins in) that must end on the generic plan, its last call included,
/// with the custom-plan entries listed with the probes: the probe that
/// won (completed) and what lost after it (one slice or pool, or one
/// slice per session given up at its deadline). Returns the tuning and
/// those entries.
async fn walk_back_to_generic(
    db: &TestDatabase,
    client: &Client,
) -> (engine::TuningReport, Vec<engine::PlanProbe>) {
    let opts = Options {
        session_settings: vec![kv("work_mem", "64MB"), kv("enable_nestloop", "off")],
        ..Options::default()
    };
    let outcome = walk_two_sessions_with(db, &opts).await;
    let tuning = outcome.tuning.clone().unwrap();
    assert_eq!(
        tuning.plan_cache_mode.as_deref(),
        Some("force_generic_plan"),
        "{tuning:?}"
    );
    let custom: Vec<_> = tuning
        .probes
        .iter()
        .filter(|p| p.plan_cache_mode == "force_custom_plan")
        .cloned()
        .collect();
    assert!(
        (2..=3).contains(&custom.len()),
        "the probe and what lost after it: {tuning:?}"
    );
    assert!(custom[0].completed && custom.iter().all(|p| p.at_defaults()));
    let calls = calls(client).await;
    assert_eq!(last_call(&calls).plan_mode, "force_generic_plan");
    (tuning, custom)
}

/// An alternative kept from its probe can turn catastrophic later in the
/// walk (the statistics a session's plan is made from change as the
/// hourly table is rewritten): a slice under it is cancelled once it has
/// run [`PROBE_MARGIN`](1.5) times what the entry it was kept against
/// predicts, plus half a second, instead of running to the end; every
/// session goes back to the default, the slice runs again under it, and
/// what was given up is listed with the probes. Here a call at the
/// alternative sleeps 30 s once the hourly table holds 16,000 rows, and
/// 0.4 s at the default: for `work_mem` (4MB kept) and for the custom plan.
async fn a_slice_at_a_kept_alternative_is_given_up_at_its_deadline(level: SchemaLevel) {
    let user = |settings: &[(&str, &str)]| Options {
        session_settings: settings.iter().map(|(k, v)| kv(k, v)).collect(),
        ..Options::default()
    };
    for (setting, default, alternative, opts) in [
        (
            "work_mem",
            "64MB",
            "4MB",
            user(&[("enable_nestloop", "off")]),
        ),
        (
            "plan_cache_mode",
            "force_generic_plan",
            "force_custom_plan",
            user(&[("work_mem", "64MB"), ("enable_nestloop", "off")]),
        ),
    ] {
        let (db, client) = with_history(level, &HistorySpec::even(40_000, 10)).await;
        wrap_window(
            &client,
            &format!(
                "PERFORM pg_sleep(CASE WHEN current_setting('{setting}') = '{default}' THEN 0.4
                                       WHEN (SELECT count(*) FROM task_usage_hourly) > 16000 THEN 30
                                       ELSE 0 END);"
            ),
        )
        .await;
        let outcome = walk_two_sessions_with(&db, &opts).await;
        let tuning = outcome.tuning.clone().unwrap();
        let at = |p: &engine::PlanProbe| match setting {
            "work_mem" => p.work_mem.as_deref() == Some(alternative),
            _ => p.plan_cache_mode == alternative && p.at_defaults(),
        };
        let tried: Vec<_> = tuning.probes.iter().filter(|p| at(p)).collect();
        assert!(tried[0].completed, "the probe won: {tuning:?}");
        let given_up: Vec<_> = tried[1..].iter().filter(|p| !p.completed).collect();
        assert!(
            !given_up.is_empty() && given_up.len() + 1 == tried.len(),
            "every slice at {alternative} after the table filled was given up: {tuning:?}"
        );
        for p in given_up {
            assert!(
                p.elapsed_ms < 10_000,
                "cut long before its 30 s: {tuning:?}"
            );
        }
        let kept = match setting {
            "work_mem" => tuning.work_mem.clone(),
            _ => tuning.plan_cache_mode.clone(),
        };
        assert_eq!(kept.as_deref(), Some(default), "{tuning:?}");
        // No call at the alternative committed once the table had filled,
        // and the last one ran at the default.
        let calls = calls(&client).await;
        let value = |c: &Call| match setting {
            "work_mem" => c.work_mem.clone(),
            _ => c.plan_mode.clone(),
        };
        assert!(
            calls.iter().all(|c| value(c) == default
                || c.finished.duration_since(c.started) < jiff::SignedDuration::from_secs(5)),
            "{calls:?}"
        );
        assert_eq!(value(last_call(&calls)), default);
        assert_correct(&client).await;
    }
}

/// What tuning did in a walk on two sessions of a fresh history (large
/// enough for every probe) with the user's `name = value`.
async fn tuning_at_the_users(level: SchemaLevel, name: &str, value: &str) -> engine::TuningReport {
    let (db, _client) = with_history(level, &HistorySpec::even(24_000, 6)).await;
    let opts = Options {
        session_settings: vec![kv(name, value)],
        ..Options::default()
    };
    walk_two_sessions_with(&db, &opts).await.tuning.unwrap()
}

/// A plan entry's time per event.
fn rate(p: &engine::PlanProbe) -> f64 {
    p.elapsed_ms as f64 / p.events as f64
}

/// The custom plan wins its probe by about a fifth (1.4 s against 1.7 s
/// a month, plus the real call's time in both: within the 1.25x at which
/// a losing probe is given up, and above the 1.1 margin even when the
/// custom plan's real call costs 0.1 s more, as under CI load, where
/// sleeps half as long let it win by only 1.099x), and every later call
/// under it costs 1.9 s a month (15 % more per event for wider slices,
/// less never): no faster than the generic probe, yet within 1.5x its own
/// probe, so the guard against a plan that grows slower stays quiet.
/// While the review is pending no other width is tried under the custom
/// plan (a two-month trial would lose its 15 %); after three month-wide
/// slices every session goes over to the generic plan, and the pooled
/// slices are listed with the probes. (The user's work_mem and
/// enable_nestloop, so no setting probe joins in.)
async fn a_custom_plan_no_faster_than_the_generic_probe_gives_way(level: SchemaLevel) {
    let (db, client) = with_history(level, &HistorySpec::even(36_000, 15)).await;
    wrap_window(
        &client,
        "PERFORM pg_sleep(CASE
             WHEN current_setting('plan_cache_mode') = 'force_generic_plan' THEN 1.7
             WHEN NOT EXISTS (SELECT 1 FROM task_usage_hourly) THEN 1.4
             ELSE GREATEST(n, 2400) / 2400.0 * CASE WHEN n > 3000 THEN 1.15 * 1.9 ELSE 1.9 END
           END)
           FROM (SELECT count(*) AS n FROM task_usage
                  WHERE COALESCE(updated_at, created_at) >= p_from
                    AND COALESCE(updated_at, created_at) < p_to) AS events;",
    )
    .await;
    let (tuning, custom) = walk_back_to_generic(&db, &client).await;
    let generic: Vec<_> = tuning
        .probes
        .iter()
        .filter(|p| p.plan_cache_mode == "force_generic_plan")
        .collect();
    assert_eq!(generic.len(), 1, "{tuning:?}");
    // The probe won by the margin; the pool, at least three slices of about
    // the generic probe's width, was no faster than the generic probe.
    assert!(1.1 * rate(&custom[0]) < rate(generic[0]), "{tuning:?}");
    assert_eq!(custom.len(), 2, "the probe and the pool: {tuning:?}");
    assert!(custom[1].completed, "{tuning:?}");
    assert!(rate(&custom[1]) >= rate(generic[0]), "{tuning:?}");
    assert!(
        custom[1].events as f64 >= 3.0 * 0.7 * generic[0].events as f64,
        "{tuning:?}"
    );
    let calls = calls(&client).await;
    let month = jiff::SignedDuration::from_hours(31 * 24);
    assert!(
        calls
            .iter()
            .filter(|c| c.plan_mode == "force_custom_plan")
            .all(|c| c.slice.to.duration_since(c.slice.from) <= month),
        "{calls:?}"
    );
    assert_correct(&client).await;
}

/// A cancel request reaches its backend asynchronously, so one of ours (a
/// probe given up) can cancel the next statement on the session: a window
/// call cancelled "due to user request" that we did not cancel runs again.
async fn a_stray_cancel_runs_the_slice_again(level: SchemaLevel) {
    let (db, client) = with_history(level, &HistorySpec::even(3_000, 4)).await;
    client
        .batch_execute("CREATE SEQUENCE stray_cancel")
        .await
        .unwrap();
    wrap_window(
        &client,
        "IF nextval('stray_cancel') = 1 THEN
             PERFORM pg_cancel_backend(pg_backend_pid());
             PERFORM pg_sleep(5);
         END IF;",
    )
    .await;
    let outcome = walk_two_sessions(&db).await;
    assert!(outcome.slice_retries >= 1, "{outcome:?}");
    assert_correct(&client).await;
}
