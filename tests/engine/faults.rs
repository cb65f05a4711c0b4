//! Faults at the database level, and least privilege. Every fault case ends
//! with an hourly table equal to an independent recompute, lock 4246
//! released and the watermark stamped exactly once (by the run that
//! finished).

use std::time::Duration;

use jiff::Timestamp;
use tokio_postgres::Client;
use usage_backfill_engine::{CancellationToken, Database, Error, Event, Options, Outcome};
use usage_backfill_standin::fixture::{self, HistorySpec, SchemaLevel};
use usage_backfill_standin::pgtemp::{TempPostgres, TempPostgresOptions};
use usage_backfill_testkit::{self as testkit, TestDatabase};

use testkit::engine::{assert_correct, last_resume};

// Every scenario below runs at both schema levels of the stand-in.
testkit::at_both_levels!(
    session_killed_mid_slice_fails_cleanly_and_the_retry_completes,
    a_stalled_slice_becomes_a_retryable_timeout,
    postgres_restarted_mid_run_then_the_retry_completes,
    rotated_password_takes_effect_on_the_next_attempt,
    the_minimal_role_is_enough_and_less_fails_clearly,
);

const PASSWORD: &str = "Fault-9d2e-SECRET";

/// Sessions of this database holding or waiting for lock 4246.
async fn lock_holders(client: &Client) -> usize {
    testkit::lock_4246(client).await.len()
}

async fn assert_recovered(client: &Client) {
    assert_correct(client).await;
    assert_eq!(lock_holders(client).await, 0, "lock 4246 released");
}

async fn run(url: &str, opts: &Options) -> (Result<Outcome, Error>, Vec<Event>) {
    let db = Database::parse(url).unwrap();
    testkit::engine::run(&db, opts, &CancellationToken::new()).await
}

/// A test database with history and a login role (password [`PASSWORD`])
/// holding full rights on the fixture.
async fn setup(level: SchemaLevel) -> (TestDatabase, Client, String) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    fixture::generate(
        &client,
        &HistorySpec {
            rows: 800,
            months: 4,
            ..HistorySpec::default()
        },
    )
    .await
    .unwrap();
    let role = db
        .create_role(
            "faults",
            PASSWORD,
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role};",
        )
        .await;
    (db, client, role.url)
}

/// Slows each window call down so a fault can hit it mid-slice.
async fn slow_window(client: &Client, seconds: f64) {
    client
        .batch_execute(&format!(
            "ALTER FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) RENAME TO real_window;
             CREATE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
             RETURNS bigint LANGUAGE plpgsql AS $$
             BEGIN PERFORM pg_sleep({seconds}); RETURN real_window(p_from, p_to); END $$;
             GRANT EXECUTE ON FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) TO PUBLIC;"
        ))
        .await
        .unwrap();
}

async fn restore_window(client: &Client) {
    client
        .batch_execute(
            "DROP FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz);
             ALTER FUNCTION real_window(timestamptz, timestamptz) RENAME TO rollup_task_usage_hourly_window;",
        )
        .await
        .unwrap();
}

/// Waits until a session of `application_name` runs the window function,
/// then returns its pid.
async fn backend_in_window(client: &Client) -> i32 {
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let row = client
                .query_opt(
                    "SELECT pid FROM pg_stat_activity
                      WHERE datname = current_database() AND application_name = 'usage-backfill'
                        AND query LIKE '%rollup_task_usage_hourly_window%' AND state = 'active'
                      LIMIT 1",
                    &[],
                )
                .await
                .unwrap();
            if let Some(row) = row {
                return row.get(0);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the backfill never reached a window call")
}

async fn session_killed_mid_slice_fails_cleanly_and_the_retry_completes(level: SchemaLevel) {
    let (_db, client, url) = setup(level).await;
    slow_window(&client, 0.5).await;
    let watermark = fixture::watermark(&client).await.unwrap();
    let opts = Options::default();
    let attempt = tokio::spawn({
        let url = url.clone();
        async move { run(&url, &opts).await }
    });
    let pid = backend_in_window(&client).await;
    client
        .execute("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap();
    let (result, events) = attempt.await.unwrap();
    let err = result.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        watermark,
        "not stamped"
    );
    assert_eq!(
        lock_holders(&client).await,
        0,
        "the lock died with the session"
    );
    restore_window(&client).await;
    let resume = last_resume(&events);
    let outcome = run(
        &url,
        &Options {
            resume,
            ..Options::default()
        },
    )
    .await
    .0
    .unwrap();
    assert!(outcome.watermark_stamped);
    assert_recovered(&client).await;
}

async fn a_stalled_slice_becomes_a_retryable_timeout(level: SchemaLevel) {
    let (_db, client, url) = setup(level).await;
    slow_window(&client, 3600.0).await;
    let watermark = fixture::watermark(&client).await.unwrap();
    let opts = Options {
        slice_timeout: Some(Duration::from_millis(500)),
        ..Options::default()
    };
    let (result, _) = run(&url, &opts).await;
    let err = result.unwrap_err();
    assert!(matches!(err, Error::SliceTimeout { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(
        err.to_string().contains("statement timeout of 500ms"),
        "{err}"
    );
    assert_eq!(fixture::watermark(&client).await.unwrap(), watermark);
    assert_eq!(lock_holders(&client).await, 0);
    restore_window(&client).await;
    run(&url, &opts).await.0.unwrap();
    assert_recovered(&client).await;
}

async fn postgres_restarted_mid_run_then_the_retry_completes(level: SchemaLevel) {
    // A server of our own: restarting the shared one would break other tests.
    let pg = TempPostgres::start(TempPostgresOptions::default())
        .await
        .unwrap();
    let (url, client) = testkit::fixture_database_at(&pg, "restart_test", level).await;
    fixture::generate(
        &client,
        &HistorySpec {
            rows: 500,
            months: 4,
            ..HistorySpec::default()
        },
    )
    .await
    .unwrap();
    slow_window(&client, 0.5).await;
    drop(client);
    let attempt = tokio::spawn({
        let url = url.clone();
        async move { run(&url, &Options::default()).await }
    });
    backend_in_window(&testkit::client(&url).await).await;
    let pg = tokio::task::spawn_blocking(move || {
        pg.restart().unwrap();
        pg
    })
    .await
    .unwrap();
    let (result, events) = attempt.await.unwrap();
    let err = result.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let client = testkit::client(&url).await;
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        Some(Timestamp::UNIX_EPOCH),
        "not stamped"
    );
    restore_window(&client).await;
    let outcome = run(
        &url,
        &Options {
            resume: last_resume(&events),
            ..Options::default()
        },
    )
    .await
    .0
    .unwrap();
    assert!(outcome.watermark_stamped);
    assert_recovered(&client).await;
    drop(pg);
}

async fn rotated_password_takes_effect_on_the_next_attempt(level: SchemaLevel) {
    let (db, client, url) = setup(level).await;
    let role = format!("{}_faults", db.name());
    client
        .batch_execute(&format!(
            "ALTER ROLE \"{role}\" PASSWORD 'Rotated-41aa-SECRET'"
        ))
        .await
        .unwrap();
    let err = run(&url, &Options::default()).await.0.unwrap_err();
    assert_eq!(err.reason(), "AuthenticationFailed");
    assert!(err.is_retryable(), "a rotated Secret can fix it");
    let rotated = url.replace(PASSWORD, "Rotated-41aa-SECRET");
    run(&rotated, &Options::default()).await.0.unwrap();
    assert_recovered(&client).await;
}

/// The minimal role documented in the README: exactly what the window
/// function (SECURITY INVOKER) and the stamp need, no more.
const MINIMAL_GRANTS: &str = "
    GRANT USAGE ON SCHEMA public TO {role};
    GRANT SELECT ON task_usage, agent_task_queue, agent, issue TO {role};
    GRANT SELECT, INSERT, UPDATE, DELETE ON task_usage_hourly TO {role};
    GRANT SELECT, DELETE ON task_usage_hourly_dirty TO {role};
    GRANT SELECT, UPDATE ON task_usage_hourly_rollup_state TO {role};
    GRANT EXECUTE ON FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) TO {role};";

async fn the_minimal_role_is_enough_and_less_fails_clearly(level: SchemaLevel) {
    let db = testkit::fresh_database_at(level).await;
    let client = db.client().await;
    fixture::generate(
        &client,
        &HistorySpec {
            rows: 400,
            months: 3,
            ..HistorySpec::default()
        },
    )
    .await
    .unwrap();
    // Functions are executable by PUBLIC by default; the minimal role must
    // not rely on that.
    client
        .batch_execute("REVOKE EXECUTE ON FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) FROM PUBLIC")
        .await
        .unwrap();
    let hourly_before = fixture::hourly_checksum(&client).await.unwrap();
    let without_stamp = db
        .create_role(
            "nostamp",
            PASSWORD,
            &MINIMAL_GRANTS.replace(
                "SELECT, UPDATE ON task_usage_hourly_rollup_state",
                "SELECT ON task_usage_hourly_rollup_state",
            ),
        )
        .await;
    let err = run(&without_stamp.url, &Options::default())
        .await
        .0
        .unwrap_err();
    assert_eq!(err.reason(), "PermissionDenied", "{err}");
    assert!(
        err.to_string()
            .contains("lacks UPDATE on table task_usage_hourly_rollup_state; nothing was written"),
        "{err}"
    );
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        Some(Timestamp::UNIX_EPOCH)
    );
    assert_eq!(
        fixture::hourly_checksum(&client).await.unwrap(),
        hourly_before,
        "checked before the walk: no hourly row written"
    );
    let no_exec = db
        .create_role(
            "noexec",
            PASSWORD,
            &MINIMAL_GRANTS.replace("GRANT EXECUTE", "-- GRANT EXECUTE"),
        )
        .await;
    let err = run(&no_exec.url, &Options::default()).await.0.unwrap_err();
    assert_eq!(err.reason(), "PermissionDenied", "{err}");
    assert!(
        err.to_string()
            .contains("lacks EXECUTE on function rollup_task_usage_hourly_window"),
        "{err}"
    );
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        Some(Timestamp::UNIX_EPOCH)
    );
    let minimal = db.create_role("minimal", PASSWORD, MINIMAL_GRANTS).await;
    let outcome = run(&minimal.url, &Options::default()).await.0.unwrap();
    assert!(outcome.watermark_stamped);
    assert_recovered(&client).await;
}
