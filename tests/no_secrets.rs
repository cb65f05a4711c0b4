//! A full backfill with logging at the most verbose level: the password
//! appears in no log line, outcome, event or error. A test binary of its
//! own, so that the only statements logged are the operator's (the test
//! harness's own `CREATE ROLE … PASSWORD` runs before logging starts).

use std::io::Write;
use std::sync::{Arc, Mutex};

use usage_backfill_engine::{self as engine, CancellationToken, Database, Options};
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_testkit as testkit;

const PASSWORD: &str = "NoLeak-5b1f-SECRET";
const WRONG: &str = "Wrong-PW-SECRET";

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_password_appears_in_no_log_line_even_at_trace_level() {
    let db = testkit::fresh_database().await;
    let client = db.client().await;
    fixture::generate(
        &client,
        &HistorySpec {
            rows: 500,
            months: 3,
            ..HistorySpec::default()
        },
    )
    .await
    .unwrap();
    let role = db
        .create_role(
            "noleak",
            PASSWORD,
            "GRANT ALL ON ALL TABLES IN SCHEMA public TO {role};
             GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA public TO {role};",
        )
        .await;

    let buffer = Arc::new(Mutex::new(Vec::new()));
    let sink = buffer.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || SharedWriter(sink.clone()))
        .with_ansi(false)
        .init();

    let mut events = Vec::new();
    let database = Database::parse(&role.url).unwrap();
    tracing::debug!(?database, "connecting");
    let outcome = engine::run(
        &database,
        &Options::default(),
        &CancellationToken::new(),
        &mut |e| events.push(e.clone()),
    )
    .await
    .unwrap();
    assert!(outcome.watermark_stamped);
    // A failing attempt too: its messages come from the server.
    let wrong = Database::parse(&role.url.replace(PASSWORD, WRONG)).unwrap();
    let err = engine::run(
        &wrong,
        &Options::default(),
        &CancellationToken::new(),
        &mut |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(err.reason(), "AuthenticationFailed");

    let logs = String::from_utf8_lossy(&buffer.lock().unwrap()).into_owned();
    assert!(logs.contains("TRACE"), "trace logging is on");
    assert!(
        logs.contains("executing statement"),
        "driver statements are logged"
    );
    for (what, text) in [
        ("logs", logs),
        (
            "outcome",
            format!("{outcome:?} {}", serde_json::to_string(&outcome).unwrap()),
        ),
        ("events", format!("{events:?}")),
        ("error", format!("{err} {err:?}")),
    ] {
        for secret in [PASSWORD, WRONG] {
            if let Some(at) = text.find(secret) {
                let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                panic!("a password leaked into the {what}: {}", &text[start..end]);
            }
        }
    }
    assert_eq!(fixture::recompute_mismatches(&client).await.unwrap(), 0);
}
