//! The `usage-backfill` binary end to end, against testkit databases with
//! generated history: exit codes, text and JSON output, signals, and the
//! side commands (`crd`, `demo`, `--help`).

use std::process::{ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio_postgres::Client;
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_testkit::{self as testkit, TestDatabase, lock_4246_held};

const BIN: &str = env!("CARGO_BIN_EXE_usage-backfill");

/// A distinctive password for the role the CLI connects as.
const PASSWORD: &str = "Pw-7f3c-SECRET";

const FULL_GRANTS: &str = "GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
     GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO {role};
     GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role};";

/// The binary with a clean environment for what it reads: no inherited
/// DATABASE_URL or RUST_LOG, info logs on stderr.
fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    cmd
}

struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn show(&self) -> String {
        format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(self.code, Some(code), "{}", self.show());
        self
    }
}

impl From<Output> for Ran {
    fn from(o: Output) -> Self {
        Ran {
            code: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

async fn run_cli(args: &[&str]) -> Ran {
    run_with(command().args(args)).await
}

async fn run_with(cmd: &mut Command) -> Ran {
    let out = tokio::time::timeout(Duration::from_secs(300), cmd.output())
        .await
        .expect("the binary finished within 5 minutes")
        .expect("the binary runs");
    out.into()
}

/// A test database with 500 rows over the 3 months before this one.
async fn database_with_history() -> (TestDatabase, Client) {
    let db = testkit::fresh_database().await;
    let client = db.client().await;
    fixture::generate(
        &client,
        &HistorySpec {
            rows: 600,
            months: 6,
            ..HistorySpec::default()
        },
    )
    .await
    .expect("generating history");
    (db, client)
}

#[derive(Debug, PartialEq)]
struct State {
    checksum: String,
    watermark: Option<Timestamp>,
}

async fn state(client: &Client) -> State {
    State {
        checksum: fixture::hourly_checksum(client).await.unwrap(),
        watermark: fixture::watermark(client).await.unwrap(),
    }
}

fn json(ran: &Ran) -> Value {
    serde_json::from_str(&ran.stdout)
        .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{}", ran.show()))
}

fn ts(v: &Value) -> Option<Timestamp> {
    v.as_str().map(|s| s.parse().expect("a timestamp"))
}

// ---------------------------------------------------------------------------
// backfill
// ---------------------------------------------------------------------------

#[tokio::test]
async fn backfill_text_then_json_then_skip() {
    let (db, client) = database_with_history().await;
    assert!(
        fixture::guard(&client).await.unwrap().is_err(),
        "the guard refuses before the backfill"
    );

    // Text summary.
    let ran = run_cli(&["backfill", "--database-url", db.url()]).await;
    ran.expect_code(0);
    for want in [
        "result:",
        "backfilled",
        "slices:",
        "rows touched:",
        "watermark:",
        "(stamped)",
        "walk ended at:",
        "slice width:",
    ] {
        assert!(
            ran.stdout.contains(want),
            "{want:?} missing:\n{}",
            ran.show()
        );
    }
    assert!(ran.stderr.contains("slice done"), "{}", ran.show());
    assert_eq!(fixture::recompute_mismatches(&client).await.unwrap(), 0);
    assert_eq!(fixture::guard(&client).await.unwrap(), Ok(()));

    // Again, lagging, with JSON output: its fields match the database.
    fixture::set_watermark(&client, Some("2000-01-01T00:00:00Z".parse().unwrap()))
        .await
        .unwrap();
    let ran = run_cli(&["backfill", "--database-url", db.url(), "--output", "json"]).await;
    ran.expect_code(0);
    let out = json(&ran);
    assert_eq!(out["skipped"], Value::Null, "{}", ran.show());
    assert_eq!(out["dry_run"], Value::Bool(false));
    let processed = out["slices_processed"].as_u64().expect("slices_processed");
    assert!(processed >= 3, "three months of history: {}", ran.show());
    assert_eq!(out["slices_total"].as_u64(), Some(processed));
    let rows_touched = out["rows_touched"].as_i64().expect("rows_touched");
    let buckets: i64 = client
        .query_one("SELECT count(*) FROM task_usage_hourly", &[])
        .await
        .unwrap()
        .get(0);
    assert!(buckets > 0);
    assert!(
        rows_touched >= buckets,
        "every bucket was written by the walk: {rows_touched} < {buckets}"
    );
    assert_eq!(out["watermark_stamped"], Value::Bool(true));
    let after = fixture::watermark(&client).await.unwrap();
    assert_eq!(ts(&out["watermark_after"]), after, "{}", ran.show());
    assert_eq!(
        ts(&out["walk_end"]),
        after,
        "the stamp names the walk's end"
    );
    assert_eq!(
        ts(&out["watermark_before"]),
        Some("2000-01-01T00:00:00Z".parse().unwrap())
    );
    assert_eq!(fixture::recompute_mismatches(&client).await.unwrap(), 0);
    assert_eq!(fixture::guard(&client).await.unwrap(), Ok(()));

    // A second run has nothing to do.
    let ran = run_cli(&["backfill", "--database-url", db.url(), "--output", "json"]).await;
    ran.expect_code(0);
    let out = json(&ran);
    assert_eq!(
        out["skipped"],
        Value::String("watermark_within_threshold".into()),
        "{}",
        ran.show()
    );
    // One window, from the watermark to the stamp, before the stamp.
    assert_eq!(out["slices_processed"].as_u64(), Some(1));
    assert_eq!(ts(&out["from"]), after, "from the watermark");
    assert_eq!(ts(&out["watermark_after"]), ts(&out["walk_end"]));
    let ran = run_cli(&["backfill", "--database-url", db.url()]).await;
    ran.expect_code(0);
    assert!(
        ran.stdout.contains("skipped (watermark_within_threshold)"),
        "{}",
        ran.show()
    );
}

#[tokio::test]
async fn dry_run_writes_nothing() {
    let (db, client) = database_with_history().await;
    let before = state(&client).await;
    for output in ["text", "json"] {
        let ran = run_cli(&[
            "backfill",
            "--database-url",
            db.url(),
            "--dry-run",
            "--output",
            output,
        ])
        .await;
        ran.expect_code(0);
        if output == "json" {
            let out = json(&ran);
            assert_eq!(out["dry_run"], Value::Bool(true));
            assert_eq!(out["watermark_stamped"], Value::Bool(false));
            assert_eq!(out["slices_processed"].as_u64(), Some(0));
            let planned = out["planned"].as_array().expect("planned slices");
            assert!(!planned.is_empty(), "{}", ran.show());
            let estimated: i64 = planned
                .iter()
                .map(|p| p["estimated_events"].as_i64().unwrap())
                .sum();
            assert!(estimated >= 500, "every row is in some slice: {estimated}");
        } else {
            assert!(
                ran.stdout.contains("dry run (nothing written)"),
                "{}",
                ran.show()
            );
            assert!(ran.stdout.contains("planned slice:"), "{}", ran.show());
        }
        assert_eq!(state(&client).await, before, "{output}");
    }
}

#[tokio::test]
async fn usage_errors_exit_2() {
    let url = "postgres://u@127.0.0.1:1/d";
    let ran = run_cli(&[
        "backfill",
        "--database-url",
        url,
        "--mode",
        "if-lagging",
        "--months-back",
        "2",
    ])
    .await;
    ran.expect_code(2);
    assert!(ran.stderr.contains("--mode always"), "{}", ran.show());
    assert!(ran.stdout.is_empty(), "{}", ran.show());

    let ran = run_cli(&["backfill", "--database-url", url, "--lag-threshold", "1x"]).await;
    ran.expect_code(2);
    assert!(ran.stderr.contains("--lag-threshold"), "{}", ran.show());
    assert!(ran.stderr.contains("unknown unit"), "{}", ran.show());

    let ran = run_cli(&["backfill", "--database-url", url, "--no-such-flag"]).await;
    ran.expect_code(2);

    // No database at all.
    let ran = run_cli(&["backfill"]).await;
    ran.expect_code(2);
    assert!(ran.stderr.contains("--database-url"), "{}", ran.show());
}

#[tokio::test]
async fn bad_connection_string_exits_3() {
    for dsn in [
        format!("postgres://u:{PASSWORD}@127.0.0.1:99999/d"),
        format!("postgres://u:{PASSWORD}@127.0.0.1/d?sslmode=bogus"),
        "not a dsn".to_string(),
    ] {
        let ran = run_cli(&["backfill", "--database-url", &dsn]).await;
        ran.expect_code(3);
        assert!(
            ran.stderr.contains("invalid database connection string"),
            "{}",
            ran.show()
        );
        assert!(!ran.stdout.contains(PASSWORD), "{}", ran.show());
        assert!(!ran.stderr.contains(PASSWORD), "{}", ran.show());
    }
    // verify-full without a CA is a TLS configuration error: also 3.
    let ran = run_cli(&[
        "backfill",
        "--database-url",
        "postgres://u@127.0.0.1:1/d",
        "--tls-mode",
        "verify-full",
    ])
    .await;
    ran.expect_code(3);
    assert!(ran.stderr.contains("needs a CA bundle"), "{}", ran.show());
}

#[tokio::test]
async fn wrong_password_exits_1_without_showing_it() {
    let (db, client) = database_with_history().await;
    let role = db.create_role("cli", PASSWORD, FULL_GRANTS).await;
    let before = state(&client).await;
    let wrong = "Pw-9d2e-WRONG";
    let url = role.url.replace(PASSWORD, wrong);
    for output in ["text", "json"] {
        let ran = run_cli(&[
            "backfill",
            "--database-url",
            &url,
            "--output",
            output,
            "--log-format",
            output,
        ])
        .await;
        ran.expect_code(1);
        assert!(
            ran.stderr.contains("password authentication failed"),
            "{}",
            ran.show()
        );
        for secret in [wrong, PASSWORD] {
            assert!(!ran.stdout.contains(secret), "{}", ran.show());
            assert!(!ran.stderr.contains(secret), "{}", ran.show());
        }
    }
    assert_eq!(state(&client).await, before);
}

#[tokio::test]
async fn lock_timeout_exits_4() {
    let (db, client) = database_with_history().await;
    let holder = db.client().await;
    holder
        .execute("SELECT pg_advisory_lock(4246)", &[])
        .await
        .unwrap();
    let before = state(&client).await;
    let started = Instant::now();
    let ran = run_cli(&[
        "backfill",
        "--database-url",
        db.url(),
        "--lock-timeout",
        "1s",
    ])
    .await;
    ran.expect_code(4);
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "gave up after about a second"
    );
    assert!(ran.stderr.contains("advisory lock 4246"), "{}", ran.show());
    assert!(ran.stderr.contains("not acquired"), "{}", ran.show());
    assert_eq!(state(&client).await, before);

    // With the lock free again it runs.
    holder
        .execute("SELECT pg_advisory_unlock(4246)", &[])
        .await
        .unwrap();
    let ran = run_cli(&[
        "backfill",
        "--database-url",
        db.url(),
        "--lock-timeout",
        "1s",
    ])
    .await;
    ran.expect_code(0);
}

#[tokio::test]
async fn sigterm_during_a_slow_run_exits_130() {
    let (db, client) = database_with_history().await;
    let before = state(&client).await;
    let mut child = command()
        .args([
            "backfill",
            "--database-url",
            db.url(),
            "--mode",
            "always",
            "--sleep-between-slices",
            "2s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id().expect("running");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = Vec::new();
    let first_slice = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            let done = line.contains("slice done");
            seen.push(line);
            if done {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    assert!(first_slice, "no slice line on stderr:\n{}", seen.join("\n"));
    let kill = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    // Drain stderr while waiting, so the child never blocks on a full pipe.
    let rest = tokio::spawn(async move {
        let mut rest = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            rest.push(line);
        }
        rest
    });
    let status: ExitStatus = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("exits soon after SIGTERM")
        .unwrap();
    let rest = rest.await.unwrap();
    let all = format!("{}\n{}", seen.join("\n"), rest.join("\n"));
    assert_eq!(status.code(), Some(130), "{status:?}\n{all}");
    assert!(all.contains("cancelled"), "{all}");
    // Lock released (explicitly, or at worst with the session).
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock_4246_held(&client).await {
        assert!(Instant::now() < deadline, "lock 4246 still held");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fixture::watermark(&client).await.unwrap(),
        before.watermark,
        "nothing stamped"
    );
}

#[tokio::test]
async fn database_url_from_the_environment() {
    let (db, client) = database_with_history().await;
    let ran = run_with(
        command()
            .env("DATABASE_URL", db.url())
            .args(["backfill", "--output", "json"]),
    )
    .await;
    ran.expect_code(0);
    let out = json(&ran);
    assert_eq!(
        out["watermark_stamped"],
        Value::Bool(true),
        "{}",
        ran.show()
    );
    assert_eq!(
        ts(&out["watermark_after"]),
        fixture::watermark(&client).await.unwrap()
    );
    assert_eq!(fixture::recompute_mismatches(&client).await.unwrap(), 0);
    // The environment value is not echoed (clap's hide_env_values).
    let help = run_with(
        command()
            .env("DATABASE_URL", db.url())
            .args(["backfill", "--help"]),
    )
    .await;
    help.expect_code(0);
    assert!(!help.stdout.contains(db.url()), "{}", help.show());
}

/// Host, port and database name of a test database's URL.
fn coordinates(db: &TestDatabase) -> (String, String, String) {
    let config = db.config();
    let host = match &config.get_hosts()[0] {
        tokio_postgres::config::Host::Tcp(h) => h.clone(),
        other => panic!("testkit databases are reached over TCP, not {other:?}"),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    (host, port.to_string(), db.name().to_owned())
}

#[tokio::test]
async fn the_connection_in_parts_with_pgpassword_or_a_password_file() {
    let (db, client) = database_with_history().await;
    let role = db.create_role("parts", PASSWORD, FULL_GRANTS).await;
    let (host, port, dbname) = coordinates(&db);
    let parts = [
        "--host", &host, "--port", &port, "--dbname", &dbname, "--user", &role.name,
    ];
    let backfill = |extra: &[&str]| {
        let mut cmd = command();
        cmd.arg("backfill").args(parts).args(extra);
        cmd
    };

    // The password from PGPASSWORD.
    let ran =
        run_with(backfill(&["--mode", "always", "--output", "json"]).env("PGPASSWORD", PASSWORD))
            .await;
    ran.expect_code(0);
    let out = json(&ran);
    assert_eq!(
        out["watermark_stamped"],
        Value::Bool(true),
        "{}",
        ran.show()
    );
    assert_eq!(fixture::recompute_mismatches(&client).await.unwrap(), 0);
    assert!(
        ran.stderr
            .contains(&format!("{}@{host}:{port}/{dbname}", role.name)),
        "the target is named: {}",
        ran.show()
    );

    // From a file with a trailing newline; PGPASSWORD, wrong, is ignored.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    let ran = run_with(
        backfill(&[
            "--password-file",
            file.to_str().unwrap(),
            "--output",
            "json",
        ])
        .env("PGPASSWORD", "Pw-1111-WRONG"),
    )
    .await;
    ran.expect_code(0);
    assert_eq!(
        json(&ran)["skipped"],
        "watermark_within_threshold",
        "{}",
        ran.show()
    );

    // A wrong password: retryable, and neither password is shown.
    let before = state(&client).await;
    let ran = run_with(backfill(&[]).env("PGPASSWORD", "Pw-2222-WRONG")).await;
    ran.expect_code(1);
    assert!(
        ran.stderr.contains("password authentication failed"),
        "{}",
        ran.show()
    );
    for secret in ["Pw-2222-WRONG", PASSWORD] {
        assert!(!ran.stdout.contains(secret), "{}", ran.show());
        assert!(!ran.stderr.contains(secret), "{}", ran.show());
    }
    assert_eq!(state(&client).await, before);
}

#[tokio::test]
async fn a_dsn_and_parts_together_or_half_the_parts_exit_2() {
    let url = "postgres://u@127.0.0.1:1/d";
    let ran = run_cli(&["backfill", "--database-url", url, "--host", "127.0.0.1"]).await;
    ran.expect_code(2);
    assert!(ran.stderr.contains("not both"), "{}", ran.show());
    // DATABASE_URL in the environment counts as a DSN too.
    let ran = run_with(command().env("DATABASE_URL", url).args([
        "backfill",
        "--host",
        "127.0.0.1",
        "--user",
        "u",
    ]))
    .await;
    ran.expect_code(2);
    assert!(ran.stderr.contains("DATABASE_URL"), "{}", ran.show());
    let ran = run_cli(&["backfill", "--host", "127.0.0.1"]).await;
    ran.expect_code(2);
    assert!(ran.stderr.contains("needs --user"), "{}", ran.show());
    // There is no password flag.
    let ran = run_cli(&["backfill", "--host", "h", "--user", "u", "--password", "x"]).await;
    ran.expect_code(2);
}

#[tokio::test]
async fn logs_written_to_a_file_carry_no_colour_codes() {
    let (db, _client) = database_with_history().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stderr.log");
    let file = std::fs::File::create(&path).unwrap();
    let mut cmd = command();
    // Nothing asks for plain text but the file itself.
    cmd.env_remove("NO_COLOR")
        .env_remove("TERM")
        .args(["backfill", "--database-url", db.url(), "--dry-run"])
        .stdout(Stdio::null())
        .stderr(Stdio::from(file));
    // Not output(): tokio's would pipe stderr instead of the file.
    let status = tokio::time::timeout(Duration::from_secs(300), cmd.spawn().unwrap().wait())
        .await
        .expect("the binary finished within 5 minutes")
        .unwrap();
    assert!(status.success(), "{status}");
    let log = std::fs::read_to_string(&path).unwrap();
    assert!(log.contains("starting backfill"), "{log}");
    assert!(log.contains("INFO"), "{log}");
    assert!(
        !log.contains('\x1b'),
        "ANSI escape codes in a file:\n{log:?}"
    );
}

// ---------------------------------------------------------------------------
// Side commands
// ---------------------------------------------------------------------------

/// The README's exit-code table is the CLI's own, word for word.
#[test]
fn the_readme_lists_the_exit_codes_of_the_cli() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let table = usage_backfill::cli::exit_codes_markdown();
    assert!(
        readme.contains(&table),
        "README.md's exit-code table differs from src/cli/mod.rs EXIT_CODES; it should read:\n{table}"
    );
}

#[tokio::test]
async fn help_lists_the_exit_codes() {
    for args in [&["--help"][..], &["backfill", "--help"][..]] {
        let ran = run_cli(args).await;
        ran.expect_code(0);
        assert!(ran.stdout.contains("Exit codes:"), "{}", ran.show());
        for code in ["0 ", "1 ", "2 ", "3 ", "4 ", "130"] {
            assert!(
                ran.stdout.contains(&format!("  {code}")),
                "{args:?}: code {code:?} missing:\n{}",
                ran.show()
            );
        }
        assert!(ran.stdout.contains("SIGTERM"), "{}", ran.show());
    }
    let ran = run_cli(&["backfill", "--help"]).await;
    for flag in [
        "--database-url",
        "--mode",
        "--lag-threshold",
        "--dry-run",
        "--months-back",
        "--force-partial",
        "--sleep-between-slices",
        "--lock-timeout",
        "--output",
        "DATABASE_URL",
    ] {
        assert!(ran.stdout.contains(flag), "{flag}:\n{}", ran.show());
    }
}

#[tokio::test]
async fn crd_prints_the_custom_resource_definition() {
    let ran = run_cli(&["crd"]).await;
    ran.expect_code(0);
    assert!(
        ran.stdout.contains("kind: CustomResourceDefinition"),
        "{}",
        ran.show()
    );
    assert!(ran.stdout.contains("UsageBackfill"), "{}", ran.show());
}

#[cfg(feature = "demo")]
#[tokio::test]
async fn demo_runs_end_to_end() {
    let ran = run_cli(&["demo", "--rows", "300", "--months", "2"]).await;
    ran.expect_code(0);
    assert!(ran.stdout.contains("identical"), "{}", ran.show());
    assert!(ran.stdout.contains("passes"), "{}", ran.show());
    assert!(
        ran.stdout
            .contains("migration guard after the backfill: passes"),
        "{}",
        ran.show()
    );
}

/// Without the `demo` feature (the production image) the subcommand says
/// why it is absent, a usage error, whatever its arguments
/// (`cargo test --no-default-features --test engine demo_without`).
#[cfg(not(feature = "demo"))]
#[tokio::test]
async fn demo_without_the_feature_names_it() {
    for args in [&["demo"][..], &["demo", "--rows", "300"]] {
        let ran = run_cli(args).await;
        ran.expect_code(2);
        assert!(
            ran.stderr.contains("without the `demo` feature"),
            "{}",
            ran.show()
        );
        assert!(ran.stderr.contains("cargo run -- demo"), "{}", ran.show());
    }
    let help = run_cli(&["--help"]).await;
    help.expect_code(0);
    assert!(help.stdout.contains("Not in this build"), "{}", help.show());
}
