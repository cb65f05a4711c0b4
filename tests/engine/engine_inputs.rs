//! Bad input to the engine: every case fails (or skips) with a specific
//! error, writes nothing to the database, and never shows the password in
//! an error (Display or Debug) or an event.
//!
//! Runs against the testkit's PostgreSQL (one fresh database per test) and,
//! for TLS, against throwaway servers started with certificates from a test
//! CA generated here.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use proptest::prelude::*;
use tokio_postgres::Client;
use usage_backfill_engine::{
    CancellationToken, ConnectFailure, ConnectionParts, Database, Error, Event, Mode, Options,
    Outcome, Password, SkipReason, TlsMode,
};
use usage_backfill_limits::duration;
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_standin::pgtemp::{ServerTls, TempPostgres};
use usage_backfill_testkit::{self as testkit, TestDatabase, TestRole, lock_4246_held};

use testkit::engine::always;
use testkit::tls::{self, TestCa};

/// The distinctive password of the backfill role in these tests.
const PASSWORD: &str = "Pw-7f3c-SECRET";

/// Grants the backfill needs (and more): the role may do everything the
/// admin may do in the fixture schema, so no failure here is a permission one.
const FULL_GRANTS: &str = "GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
     GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};
     GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role};
     GRANT USAGE, CREATE ON SCHEMA public TO {role};";

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

/// A fresh test database with a little history (three months ending where
/// the current month begins; the fixture's watermark is 1970, so it lags),
/// and a role with full grants and the distinctive password.
async fn database_with_history() -> (TestDatabase, TestRole, Client) {
    let db = testkit::fresh_database().await;
    let client = db.client().await;
    fixture::generate(
        &client,
        &HistorySpec {
            rows: 200,
            months: 3,
            ..HistorySpec::default()
        },
    )
    .await
    .expect("generating history");
    let role = db.create_role("bf", PASSWORD, FULL_GRANTS).await;
    (db, role, client)
}

/// What "no writes" is measured by.
#[derive(Debug, PartialEq)]
struct State {
    checksum: String,
    /// `None`: no state row; `Some(None)`: a NULL watermark (read directly,
    /// since `fixture::watermark` expects the column's NOT NULL).
    watermark: Option<Option<Timestamp>>,
}

async fn state(client: &Client) -> State {
    let watermark = client
        .query_opt(
            "SELECT watermark_at FROM task_usage_hourly_rollup_state WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .map(|r| r.get::<_, Option<Timestamp>>(0));
    let state = State {
        checksum: fixture::hourly_checksum(client).await.unwrap(),
        watermark,
    };
    if let Some(Some(w)) = state.watermark {
        assert_eq!(fixture::watermark(client).await.unwrap(), Some(w));
    }
    state
}

/// One engine run, with every event it reported.
async fn run(db: &Database, opts: &Options) -> (Result<Outcome, Error>, Vec<Event>) {
    testkit::engine::run(db, opts, &CancellationToken::new()).await
}

/// `secret` is in no error text and no event.
fn assert_secret_free(secret: &str, err: Option<&Error>, events: &[Event]) {
    assert!(!secret.is_empty());
    if let Some(err) = err {
        let display = err.to_string();
        let debug = format!("{err:?}");
        assert!(
            !display.contains(secret),
            "the error shows the password: {display}"
        );
        assert!(
            !debug.contains(secret),
            "the error's Debug shows the password: {debug}"
        );
    }
    for event in events {
        let debug = format!("{event:?}");
        let json = serde_json::to_string(event).unwrap();
        assert!(
            !debug.contains(secret),
            "an event shows the password: {debug}"
        );
        assert!(
            !json.contains(secret),
            "an event shows the password: {json}"
        );
    }
}

/// Asserts the run failed with `reason` and a message containing `phrase`
/// (case-insensitive), without the password anywhere; returns the error.
fn expect_failure(
    what: &str,
    result: Result<Outcome, Error>,
    events: &[Event],
    reason: &str,
    phrase: &str,
    secret: &str,
) -> Error {
    let err = match result {
        Ok(outcome) => panic!("{what}: expected {reason}, got success: {outcome:?}"),
        Err(e) => e,
    };
    eprintln!("{what}: {}: {err}", err.reason());
    assert_eq!(err.reason(), reason, "{what}: {err} ({err:?})");
    let message = err.to_string();
    assert!(
        message.to_lowercase().contains(&phrase.to_lowercase()),
        "{what}: expected {phrase:?} in {message:?}"
    );
    assert_secret_free(secret, Some(&err), events);
    err
}

/// `url` with its database replaced (URL form, as the testkit makes them).
fn with_dbname(url: &str, dbname: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let (authority, _) = base.rsplit_once('/').expect("a URL with a database");
    format!("{authority}/{dbname}{query}")
}

/// `url` with an extra query parameter.
fn with_param(url: &str, param: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{param}")
}

// ---------------------------------------------------------------------------
// Connection strings
// ---------------------------------------------------------------------------

#[tokio::test]
async fn garbage_connection_strings_are_rejected_before_connecting() {
    let (db, _role, client) = database_with_history().await;
    let before = state(&client).await;
    let cfg = db.config();
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let cases = [
        (String::new(), "empty"),
        ("   ".to_string(), "empty"),
        ("not a dsn".to_string(), "expected a postgres:// URL"),
        (
            format!("mysql://u:{PASSWORD}@127.0.0.1:{port}/d"),
            "expected a postgres:// URL",
        ),
        (
            format!("postgres://u:{PASSWORD}@127.0.0.1:99999/d"),
            "invalid value for option `port`",
        ),
        (
            format!("postgres://u:{PASSWORD}@127.0.0.1:{port}/d?connect_timeout=soon"),
            "connect_timeout",
        ),
        (
            format!("postgres://u:{PASSWORD}@127.0.0.1:{port}/d?no_such_option=1"),
            "unknown option",
        ),
        (
            format!("postgres://u:{PASSWORD}@127.0.0.1:{port}/d?sslcert=/tmp/c.pem"),
            "client certificates",
        ),
        (format!("postgres://u:{PASSWORD}@/d"), "no host"),
        (
            format!("host=127.0.0.1 port=notaport user=u password={PASSWORD}"),
            "invalid value for option `port`",
        ),
        (
            format!("host=127.0.0.1 user=u password='{PASSWORD}"),
            "unterminated",
        ),
        (
            format!("host=127.0.0.1 user=u password={PASSWORD} dbname"),
            "word 4 has no '='",
        ),
        (format!("user=u password={PASSWORD}"), "no host"),
        (
            format!("host=127.0.0.1 user=u password={PASSWORD} sslkey=/tmp/k.pem"),
            "client certificates",
        ),
    ];
    // Every case is checked; vague messages are listed together at the end.
    let mut vague = Vec::new();
    for (dsn, phrase) in cases {
        let err = Database::parse(&dsn).expect_err(&dsn);
        assert!(
            matches!(err, Error::InvalidConnectionString(_)),
            "{dsn:?}: {err:?}"
        );
        assert_eq!(err.reason(), "InvalidConnectionString");
        assert!(!err.is_retryable(), "{dsn:?}");
        let message = err.to_string();
        assert!(
            message.contains("invalid database connection string"),
            "{dsn:?}: {message}"
        );
        assert_secret_free(PASSWORD, Some(&err), &[]);
        if !message.contains(phrase) {
            vague.push(format!("{dsn:?}: {phrase:?} not in {message:?}"));
        }
    }
    assert_eq!(state(&client).await, before);
    assert!(
        vague.is_empty(),
        "messages that do not say what is wrong:\n{}",
        vague.join("\n")
    );
}

#[tokio::test]
async fn unknown_sslmode_is_rejected() {
    for dsn in [
        format!("postgres://u:{PASSWORD}@127.0.0.1/d?sslmode=bogus"),
        format!("postgres://u:{PASSWORD}@127.0.0.1/d?sslmode=VERIFY-FULL"),
        format!("host=127.0.0.1 user=u password={PASSWORD} sslmode=maybe"),
        format!("host=127.0.0.1 user=u password={PASSWORD} sslmode=''"),
    ] {
        let err = Database::parse(&dsn).expect_err(&dsn);
        assert_eq!(err.reason(), "InvalidConnectionString", "{dsn}");
        let message = err.to_string();
        assert!(message.contains("unknown sslmode"), "{dsn}: {message}");
        assert!(
            message.contains("verify-full"),
            "lists the valid modes: {message}"
        );
        assert_secret_free(PASSWORD, Some(&err), &[]);
    }
    // The valid ones parse, and the parsed value's Debug hides the password.
    for (mode, want) in [
        ("disable", TlsMode::Disable),
        ("allow", TlsMode::Prefer),
        ("prefer", TlsMode::Prefer),
        ("require", TlsMode::Require),
        ("verify-ca", TlsMode::VerifyCa),
        ("verify-full", TlsMode::VerifyFull),
    ] {
        let db = Database::parse(&format!(
            "postgres://u:{PASSWORD}@127.0.0.1/d?sslmode={mode}"
        ))
        .unwrap();
        assert_eq!(db.tls_mode, want);
        assert!(!format!("{db:?}").contains(PASSWORD));
    }
}

// ---------------------------------------------------------------------------
// Connecting
// ---------------------------------------------------------------------------

#[tokio::test]
async fn wrong_password_is_an_authentication_failure() {
    let (_db, role, client) = database_with_history().await;
    let before = state(&client).await;
    let wrong = "Pw-9d2e-WRONG";
    let url = role.url.replace(PASSWORD, wrong);
    assert!(url.contains(wrong));
    let target = Database::parse(&url).unwrap();
    let (result, events) = run(&target, &Options::default()).await;
    let err = expect_failure(
        "wrong password",
        result,
        &events,
        "AuthenticationFailed",
        "password authentication failed",
        wrong,
    );
    assert!(
        matches!(
            err,
            Error::Connect {
                kind: ConnectFailure::Authentication,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&role.name),
        "names the user: {err}"
    );
    assert_secret_free(PASSWORD, Some(&err), &events);
    assert!(events.is_empty(), "nothing happened: {events:?}");
    assert_eq!(state(&client).await, before);

    // The right password works (the role is able to run at all).
    let ok = Database::parse(&role.url).unwrap();
    let (result, events) = run(
        &ok,
        &Options {
            dry_run: true,
            ..Options::default()
        },
    )
    .await;
    let outcome = result.expect("the right password connects");
    assert!(outcome.dry_run);
    assert_secret_free(PASSWORD, None, &events);
    assert_eq!(state(&client).await, before, "a dry run writes nothing");
}

/// The connection in parts, as the controller builds it from the
/// application chart's Secret: a wrong password fails like one in a DSN,
/// without showing it; the right one walks and stamps.
#[tokio::test]
async fn the_connection_in_parts_connects_and_never_shows_its_password() {
    let (db, role, client) = database_with_history().await;
    let config = db.config();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("testkit databases are reached over TCP, not {other:?}"),
    };
    let parts = |password: &str| ConnectionParts {
        host: host.clone(),
        port: config.get_ports().first().copied(),
        dbname: Some(db.name().to_owned()),
        user: role.name.clone(),
        password: Some(Password::new(password)),
    };
    let before = state(&client).await;
    let wrong = "Pw-41c0-WRONG";
    let target = Database::from_parts(parts(wrong)).unwrap();
    assert!(!format!("{target:?}").contains(wrong));
    let (result, events) = run(&target, &Options::default()).await;
    let err = expect_failure(
        "wrong password in parts",
        result,
        &events,
        "AuthenticationFailed",
        "password authentication failed",
        wrong,
    );
    assert!(
        err.to_string().contains(&role.name),
        "names the user: {err}"
    );
    assert_eq!(state(&client).await, before);

    let target = Database::from_parts(parts(PASSWORD)).unwrap();
    let (result, events) = run(&target, &always()).await;
    let outcome = result.expect("the right password walks");
    assert!(
        outcome.watermark_stamped && outcome.slices_processed > 0,
        "{outcome:?}"
    );
    assert_secret_free(PASSWORD, None, &events);
    assert_eq!(fixture::recompute_mismatches(&client).await.unwrap(), 0);
}

#[tokio::test]
async fn closed_port_is_unreachable() {
    // A privileged port nothing here listens on: an ephemeral port freed
    // again could be taken meanwhile by a server another test starts.
    let port = 1;
    let probe = std::net::TcpStream::connect(("127.0.0.1", port));
    assert_eq!(
        probe.err().map(|e| e.kind()),
        Some(std::io::ErrorKind::ConnectionRefused),
        "port {port} of 127.0.0.1 must be closed for this test"
    );
    for mode in ["disable", "prefer", "require"] {
        let target = Database::parse(&format!(
            "postgres://u:{PASSWORD}@127.0.0.1:{port}/d?sslmode={mode}&connect_timeout=5"
        ))
        .unwrap();
        let (result, events) = run(&target, &Options::default()).await;
        let err = expect_failure(
            mode,
            result,
            &events,
            "DatabaseUnreachable",
            "refused",
            PASSWORD,
        );
        assert!(err.is_retryable());
        assert!(
            err.to_string().contains(&format!("127.0.0.1:{port}")),
            "names the target: {err}"
        );
        assert!(events.is_empty());
    }
}

#[tokio::test]
async fn silent_server_times_out() {
    // Accepts connections and never says a word.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    for mode in ["disable", "prefer", "require"] {
        let target = Database::parse(&format!(
            "postgres://u:{PASSWORD}@127.0.0.1:{port}/d?connect_timeout=1&sslmode={mode}"
        ))
        .unwrap();
        assert_eq!(target.connect_timeout(), Duration::from_secs(1));
        let started = Instant::now();
        let (result, events) = run(&target, &Options::default()).await;
        let elapsed = started.elapsed();
        let err = expect_failure(
            mode,
            result,
            &events,
            "ConnectTimeout",
            "connect timeout",
            PASSWORD,
        );
        assert!(
            matches!(
                err,
                Error::Connect {
                    kind: ConnectFailure::Timeout,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            elapsed < Duration::from_secs(10),
            "{mode}: took {elapsed:?} with connect_timeout=1"
        );
        assert!(events.is_empty());
    }
    silent.abort();
}

#[tokio::test]
async fn database_that_does_not_exist() {
    let (db, role, client) = database_with_history().await;
    let before = state(&client).await;
    let missing = format!("{}_nope", db.name());
    let target = Database::parse(&with_dbname(&role.url, &missing)).unwrap();
    let (result, events) = run(&target, &Options::default()).await;
    let err = expect_failure(
        "missing database",
        result,
        &events,
        "DatabaseNotFound",
        "does not exist",
        PASSWORD,
    );
    assert!(err.to_string().contains(&missing), "names it: {err}");
    assert!(events.is_empty());
    assert_eq!(state(&client).await, before);
}

// ---------------------------------------------------------------------------
// Database state
// ---------------------------------------------------------------------------

#[tokio::test]
async fn database_without_the_rollup_tables() {
    let db = testkit::fresh_database().await;
    let admin = testkit::client(db.admin_url()).await;
    let empty = format!("{}_empty", db.name());
    admin
        .batch_execute(&format!("CREATE DATABASE {empty}"))
        .await
        .unwrap();
    let url = with_dbname(db.url(), &empty);
    let secret = db
        .config()
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let secret = secret.expect("testkit URLs carry a password");
    let empty_client = testkit::client(&url).await;
    let tables = async |c: &Client| -> i64 {
        c.query_one(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
              WHERE n.nspname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
    };
    assert_eq!(tables(&empty_client).await, 0);
    let target = Database::parse(&url).unwrap();

    // The operator command refuses.
    let (result, events) = run(&target, &always()).await;
    let err = expect_failure(
        "always on an empty database",
        result,
        &events,
        "RollupStateMissing",
        "task_usage_hourly_rollup_state does not exist",
        &secret,
    );
    assert!(!err.is_retryable());
    assert!(
        events.iter().all(|e| matches!(e, Event::Connected { .. })),
        "{events:?}"
    );

    // The hook skips, as the reference does (step 1), dry run or not.
    let mut hook = Vec::new();
    for dry_run in [false, true] {
        let opts = Options {
            dry_run,
            ..Options::default()
        };
        hook.push((dry_run, run(&target, &opts).await));
    }
    let tables_after = tables(&empty_client).await;
    let lock_held = lock_4246_held(&empty_client).await;
    drop(empty_client);
    admin
        .batch_execute(&format!("DROP DATABASE {empty} WITH (FORCE)"))
        .await
        .unwrap();

    assert_eq!(tables_after, 0, "nothing was created");
    assert!(!lock_held);
    for (dry_run, (result, events)) in hook {
        assert_secret_free(&secret, result.as_ref().err(), &events);
        let outcome = result.unwrap_or_else(|e| {
            panic!(
                "if-lagging (dry run: {dry_run}) must skip with rollup_state_missing \
                 when the rollup state table is missing, got {e:?}"
            )
        });
        assert_eq!(outcome.skipped, Some(SkipReason::RollupStateMissing));
        assert!(!outcome.watermark_stamped);
        assert_eq!(outcome.slices_processed, 0);
        assert!(
            events.iter().all(|e| matches!(e, Event::Connected { .. })),
            "{events:?}"
        );
    }
}

#[tokio::test]
async fn missing_window_function_is_named() {
    let (_db, role, client) = database_with_history().await;
    fixture::set_watermark(&client, Some("2000-01-01T00:00:00Z".parse().unwrap()))
        .await
        .unwrap();
    fixture::drop_window_function(&client).await.unwrap();
    let before = state(&client).await;
    let target = Database::parse(&role.url).unwrap();
    for (what, opts) in [
        ("if-lagging", Options::default()),
        (
            "if-lagging dry run",
            Options {
                dry_run: true,
                ..Options::default()
            },
        ),
        ("always", always()),
    ] {
        let (result, events) = run(&target, &opts).await;
        let err = expect_failure(
            what,
            result,
            &events,
            "SchemaMissing",
            "rollup_task_usage_hourly_window",
            PASSWORD,
        );
        assert!(err.to_string().contains("migrations"), "{err}");
        assert!(!err.is_retryable());
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::SliceStarted { .. } | Event::Stamped { .. })),
            "{what}: {events:?}"
        );
        assert_eq!(state(&client).await, before, "{what}");
        assert!(!lock_4246_held(&client).await, "{what}");
    }
}

#[tokio::test]
async fn missing_state_row_or_null_watermark() {
    let (_db, role, client) = database_with_history().await;
    let target = Database::parse(&role.url).unwrap();

    fixture::set_watermark(&client, None).await.unwrap();
    let before = state(&client).await;
    assert_eq!(before.watermark, None);
    let (result, events) = run(&target, &Options::default()).await;
    expect_failure(
        "missing state row",
        result,
        &events,
        "ManualInterventionRequired",
        "manual intervention required",
        PASSWORD,
    );
    assert_eq!(state(&client).await, before);

    // A schema where the column is nullable, holding NULL.
    client
        .batch_execute(
            "ALTER TABLE task_usage_hourly_rollup_state ALTER COLUMN watermark_at DROP NOT NULL;
             INSERT INTO task_usage_hourly_rollup_state (id, watermark_at) VALUES (1, NULL);",
        )
        .await
        .unwrap();
    let before = state(&client).await;
    let (result, events) = run(&target, &Options::default()).await;
    expect_failure(
        "NULL watermark",
        result,
        &events,
        "ManualInterventionRequired",
        "watermark is NULL",
        PASSWORD,
    );
    let null_left: bool = client
        .query_one(
            "SELECT watermark_at IS NULL FROM task_usage_hourly_rollup_state WHERE id = 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(null_left, "the NULL watermark was left alone");
    assert_eq!(state(&client).await, before);
    assert!(!lock_4246_held(&client).await);
}

#[tokio::test]
async fn invalid_session_settings() {
    let (_db, role, client) = database_with_history().await;
    let before = state(&client).await;
    let target = Database::parse(&role.url).unwrap();
    for (name, phrase) in [
        ("x;drop", "not a PostgreSQL setting name"),
        ("", "not a PostgreSQL setting name"),
        ("work mem", "not a PostgreSQL setting name"),
        ("no_such_setting", "unrecognized configuration parameter"),
    ] {
        let opts = Options {
            session_settings: vec![
                ("enable_nestloop".into(), "off".into()),
                (name.into(), "1".into()),
            ],
            ..Options::default()
        };
        let (result, events) = run(&target, &opts).await;
        let err = expect_failure(
            name,
            result,
            &events,
            "InvalidSessionSetting",
            phrase,
            PASSWORD,
        );
        match &err {
            Error::InvalidSetting { name: n, .. } => assert_eq!(n, name),
            other => panic!("{name:?}: {other:?}"),
        }
        assert!(!err.is_retryable());
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::LockAcquired { .. })),
            "{name:?}: {events:?}"
        );
        assert_eq!(state(&client).await, before, "{name:?}");
    }
    // A bad value for a real setting is refused the same way.
    let opts = Options {
        session_settings: vec![("enable_nestloop".into(), "sideways".into())],
        ..Options::default()
    };
    let (result, events) = run(&target, &opts).await;
    expect_failure(
        "bad value",
        result,
        &events,
        "InvalidSessionSetting",
        "enable_nestloop",
        PASSWORD,
    );
    assert_eq!(state(&client).await, before);
}

#[tokio::test]
async fn months_back_that_skips_history_is_refused() {
    let (_db, role, client) = database_with_history().await;
    let before = state(&client).await;
    let target = Database::parse(&role.url).unwrap();
    let opts = Options {
        mode: Mode::Always {
            months_back: 1,
            force_partial: false,
        },
        ..Options::default()
    };
    let (result, events) = run(&target, &opts).await;
    let err = expect_failure(
        "months-back 1",
        result,
        &events,
        "PartialRangeRefused",
        "force-partial",
        PASSWORD,
    );
    match err {
        Error::MonthsBackSkipsHistory {
            months_back,
            start,
            earliest,
        } => {
            assert_eq!(months_back, 1);
            assert!(earliest < start, "{earliest} < {start}");
        }
        other => panic!("{other:?}"),
    }
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::SliceStarted { .. } | Event::Stamped { .. })),
        "{events:?}"
    );
    assert_eq!(
        state(&client).await,
        before,
        "watermark and rollup unchanged"
    );
    assert!(
        !lock_4246_held(&client).await,
        "lock 4246 is released after the refusal"
    );
}

// ---------------------------------------------------------------------------
// TLS against real servers
// ---------------------------------------------------------------------------

/// A TLS server with the fixture and lagging history in database `usage`.
async fn tls_server(tls: ServerTls) -> TempPostgres {
    let server = tls::postgres(tls).await;
    assert!(server.tls());
    let (_, client) = testkit::fixture_database(&server, "usage").await;
    fixture::generate(
        &client,
        &HistorySpec {
            rows: 100,
            months: 2,
            ..HistorySpec::default()
        },
    )
    .await
    .unwrap();
    server
}

/// Resets the watermark so the next if-lagging run walks, runs, and
/// returns the outcome.
async fn walk_over_tls(
    what: &str,
    server: &TempPostgres,
    target: &Database,
) -> (Result<Outcome, Error>, Vec<Event>) {
    let client = testkit::client(&server.admin_url("usage")).await;
    fixture::set_watermark(&client, Some("2000-01-01T00:00:00Z".parse().unwrap()))
        .await
        .unwrap();
    let (result, events) = run(target, &Options::default()).await;
    assert_secret_free(server.password(), result.as_ref().err(), &events);
    if let Ok(outcome) = &result {
        assert!(outcome.watermark_stamped, "{what}: {outcome:?}");
        assert!(outcome.slices_processed > 0, "{what}: {outcome:?}");
        assert_eq!(
            fixture::watermark(&client).await.unwrap(),
            outcome.watermark_after,
            "{what}"
        );
        assert_eq!(fixture::recompute_mismatches(&client).await.unwrap(), 0);
    } else {
        let after = fixture::watermark(&client).await.unwrap();
        assert_eq!(
            after,
            Some("2000-01-01T00:00:00Z".parse().unwrap()),
            "{what}: a failed connect writes nothing"
        );
    }
    (result, events)
}

#[tokio::test]
async fn tls_with_a_test_ca() {
    let ca = TestCa::new("usage-backfill");
    let server = tls_server(ca.server_cert(&["localhost", "127.0.0.1"])).await;
    let url = server.admin_url("usage");

    // verify-full on 127.0.0.1, CA given as bytes.
    let target = Database::parse(&with_param(&url, "sslmode=verify-full"))
        .unwrap()
        .with_ca_pem(ca.pem.clone());
    let (result, _) = walk_over_tls("verify-full", &server, &target).await;
    result.expect("verify-full with the right CA");

    // verify-full with the CA from sslrootcert.
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca.pem).unwrap();
    let target = Database::parse(&with_param(
        &url,
        &format!("sslmode=verify-full&sslrootcert={}", ca_file.display()),
    ))
    .unwrap();
    let (result, _) = walk_over_tls("verify-full sslrootcert", &server, &target).await;
    result.expect("verify-full with sslrootcert");

    // verify-ca.
    let target = Database::parse(&with_param(&url, "sslmode=verify-ca"))
        .unwrap()
        .with_ca_pem(ca.pem.clone());
    let (result, _) = walk_over_tls("verify-ca", &server, &target).await;
    result.expect("verify-ca with the right CA");

    // require without a CA: encrypted, unverified.
    let target = Database::parse(&with_param(&url, "sslmode=require")).unwrap();
    let (result, _) = walk_over_tls("require", &server, &target).await;
    result.expect("require without a CA");

    // A CA that did not sign the server certificate.
    let other = TestCa::new("someone-else");
    for mode in ["verify-full", "verify-ca", "require"] {
        let target = Database::parse(&with_param(&url, &format!("sslmode={mode}")))
            .unwrap()
            .with_ca_pem(other.pem.clone());
        let (result, events) = walk_over_tls(mode, &server, &target).await;
        let err = expect_failure(
            &format!("{mode} with a foreign CA"),
            result,
            &events,
            "TlsHandshakeFailed",
            "certificate",
            server.password(),
        );
        assert!(
            matches!(
                err,
                Error::Connect {
                    kind: ConnectFailure::Tls,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(events.is_empty());
    }

    // verify-full without any CA is a configuration error, found before
    // connecting.
    for mode in ["verify-full", "verify-ca"] {
        let target = Database::parse(&with_param(&url, &format!("sslmode={mode}"))).unwrap();
        let (result, events) = walk_over_tls(mode, &server, &target).await;
        let err = expect_failure(
            &format!("{mode} without a CA"),
            result,
            &events,
            "InvalidTlsConfig",
            "needs a CA bundle",
            server.password(),
        );
        assert!(matches!(err, Error::Tls(_)), "{err:?}");
        assert!(!err.is_retryable());
        assert!(events.is_empty());
    }

    // A CA file that is not PEM.
    let target = Database::parse(&with_param(&url, "sslmode=verify-full"))
        .unwrap()
        .with_ca_pem(b"not a certificate".to_vec());
    let (result, events) = walk_over_tls("garbage CA", &server, &target).await;
    expect_failure(
        "garbage CA",
        result,
        &events,
        "InvalidTlsConfig",
        "no PEM certificate",
        server.password(),
    );
}

#[tokio::test]
async fn tls_certificate_for_another_name() {
    let ca = TestCa::new("usage-backfill");
    let server = tls_server(ca.server_cert(&["db.example"])).await;
    let url = server.admin_url("usage");

    let target = Database::parse(&with_param(&url, "sslmode=verify-full"))
        .unwrap()
        .with_ca_pem(ca.pem.clone());
    let (result, events) = walk_over_tls("verify-full, wrong name", &server, &target).await;
    let err = expect_failure(
        "verify-full, wrong name",
        result,
        &events,
        "TlsHandshakeFailed",
        "certificate",
        server.password(),
    );
    let message = err.to_string();
    assert!(
        message.contains("name") || message.contains("127.0.0.1"),
        "says the name does not match: {message}"
    );
    assert!(events.is_empty());

    // verify-ca does not check the name: the chain is right, so it connects.
    let target = Database::parse(&with_param(&url, "sslmode=verify-ca"))
        .unwrap()
        .with_ca_pem(ca.pem.clone());
    let (result, _) = walk_over_tls("verify-ca, other name", &server, &target).await;
    result.expect("verify-ca ignores the name");

    // require with a CA is verify-ca (libpq), so it connects as well.
    let target = Database::parse(&with_param(&url, "sslmode=require"))
        .unwrap()
        .with_ca_pem(ca.pem.clone());
    let (result, _) = walk_over_tls("require + CA, other name", &server, &target).await;
    result.expect("require with a CA checks the chain only");
}

#[tokio::test]
async fn tls_required_but_the_server_has_none() {
    let (db, role, client) = database_with_history().await;
    let before = state(&client).await;
    let ca = TestCa::new("usage-backfill");
    for mode in ["verify-full", "verify-ca", "require"] {
        let target = Database::parse(&with_param(&role.url, &format!("sslmode={mode}")))
            .unwrap()
            .with_ca_pem(ca.pem.clone());
        let (result, events) = run(&target, &Options::default()).await;
        let err = result.expect_err(mode);
        assert!(
            matches!(err.reason(), "TlsHandshakeFailed" | "InvalidTlsConfig"),
            "{mode}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("TLS") || message.contains("tls") || message.contains("SSL"),
            "{mode}: a clear message: {message}"
        );
        assert!(
            message.contains("does not support"),
            "{mode}: says the server has no TLS: {message}"
        );
        assert_secret_free(PASSWORD, Some(&err), &events);
        assert!(events.is_empty());
    }
    // prefer falls back to plain TCP and works.
    let target = Database::parse(&with_param(db.url(), "sslmode=prefer")).unwrap();
    let (result, _) = run(
        &target,
        &Options {
            dry_run: true,
            ..Options::default()
        },
    )
    .await;
    result.expect("prefer without server TLS");
    assert_eq!(state(&client).await, before);
}

// ---------------------------------------------------------------------------
// Parsers: properties
// ---------------------------------------------------------------------------

/// Passwords that cannot appear by chance in fixed message text: upper-case
/// letters and digits only, starting with four letters and two digits.
fn password() -> impl Strategy<Value = String> {
    "[A-Z]{4}[0-9]{2}[A-Z0-9]{0,12}"
}

/// Query parameters (key, value) that make parsing fail. Values are
/// lower-case, so they never contain a password.
fn bad_param() -> impl Strategy<Value = (String, String)> {
    prop_oneof![
        "[a-z]{1,8}".prop_map(|v| ("port".to_string(), v)),
        "9999[0-9]{2,4}".prop_map(|v| ("port".to_string(), v)),
        "[a-z]{1,10}"
            .prop_filter("not a valid sslmode", |v| !matches!(
                v.as_str(),
                "disable" | "allow" | "prefer" | "require"
            ))
            .prop_map(|v| ("sslmode".to_string(), v)),
        "[a-z]{1,6}".prop_map(|v| ("connect_timeout".to_string(), v)),
        "[a-z]{1,6}".prop_map(|v| ("keepalives".to_string(), v)),
        "[a-z]{1,6}".prop_map(|v| ("target_session_attrs".to_string(), v)),
        "/[a-z]{1,8}".prop_map(|v| ("sslcert".to_string(), v)),
        "/[a-z]{1,8}".prop_map(|v| ("sslkey".to_string(), v)),
        "[a-z]{1,6}".prop_map(|v| ("sslpassword".to_string(), v)),
        ("zz_[a-z]{2,6}", "[a-z]{1,6}"),
    ]
}

/// A DSN holding `pw` that must fail to parse.
fn bad_dsn() -> impl Strategy<Value = (String, String)> {
    (password(), bad_param(), 0..6u8, "[a-z]{1,8}").prop_map(|(pw, (k, v), shape, junk)| {
        let dsn = match shape {
            0 => format!("postgres://app:{pw}@db.example:5432/usage?{k}={v}"),
            1 => format!("postgresql://app:{pw}@db.example/usage?application_name=x&{k}={v}"),
            2 => format!("host=db.example user=app password={pw} {k}={v}"),
            3 => format!("host=db.example {k}={v} user=app password='{pw}'"),
            // Shapes that fail whatever the parameter.
            4 => format!("postgres://app:{pw}@db.example:{junk}/usage"),
            _ => format!("host=db.example user=app password='{pw} {k}={v}"),
        };
        (pw, dsn)
    })
}

proptest! {
    #[test]
    fn database_parse_never_panics(s in any::<String>()) {
        let _ = Database::parse(&s);
    }

    #[test]
    fn database_parse_never_panics_on_near_dsns(
        prefix in prop_oneof![
            Just("postgres://"),
            Just("postgresql://"),
            Just("host="),
            Just("postgres://u:p@h/d?"),
            Just("host=h password='"),
        ],
        rest in "[ -~%@:/?&='\\\\\u{e9}\u{1F600}]{0,40}",
    ) {
        let _ = Database::parse(&format!("{prefix}{rest}"));
    }

    #[test]
    fn duration_parse_never_panics(s in any::<String>()) {
        let _ = duration::parse(&s);
    }

    #[test]
    fn duration_parse_never_panics_on_near_durations(s in "[0-9.]{0,42}(ns|us|µs|ms|s|m|h|d|)[0-9.hms]{0,6}") {
        if let Ok(d) = duration::parse(&s) {
            // What parses prints back to the same value.
            prop_assert_eq!(duration::parse(&duration::format(d)).ok(), Some(d));
        }
    }

    #[test]
    fn parse_errors_never_echo_the_password((pw, dsn) in bad_dsn()) {
        let err = match Database::parse(&dsn) {
            Ok(db) => {
                prop_assert!(false, "{:?} parsed: {:?}", dsn, db);
                unreachable!()
            }
            Err(e) => e,
        };
        prop_assert_eq!(err.reason(), "InvalidConnectionString");
        prop_assert!(!err.to_string().contains(&pw), "{} in {}", pw, err);
        let debug = format!("{:?}", err);
        prop_assert!(!debug.contains(&pw), "{} in {}", pw, debug);
    }

    #[test]
    fn parsed_targets_never_show_the_password(
        pw in password(),
        form in 0..3u8,
    ) {
        let dsn = match form {
            0 => format!("postgres://app:{pw}@db.example:5432/usage?sslmode=require"),
            1 => format!("host=db.example user=app password={pw} sslmode=require"),
            _ => format!("postgres://app@db.example/usage?password={pw}"),
        };
        let db = Database::parse(&dsn).unwrap();
        let debug = format!("{:?}", db);
        prop_assert!(!debug.contains(&pw), "{}", debug);
        prop_assert!(!db.describe().contains(&pw));
    }
}

/// Values just below the largest duration with a fraction on top: the sum
/// must be refused as too large, never overflow.
#[test]
fn duration_fraction_at_the_limit_is_refused_not_overflowed() {
    for (unit, unit_nanos) in [
        ("h", 3_600_000_000_000u128),
        ("m", 60_000_000_000),
        ("s", 1_000_000_000),
        ("ms", 1_000_000),
        ("us", 1_000),
    ] {
        let whole = u128::MAX / unit_nanos;
        let input = format!("{whole}.999999999{unit}");
        let result = std::panic::catch_unwind(|| duration::parse(&input));
        let result = result.unwrap_or_else(|_| panic!("duration::parse({input:?}) panicked"));
        let e = result.expect_err(&input).to_string();
        assert!(e.contains("too large"), "{input}: {e}");
    }
}
