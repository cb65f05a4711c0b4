//! Observability end to end: a replica (no leader election) runs the
//! controllers against the fake API server (`crates/testkit`) and a real
//! PostgreSQL, serving `/healthz`, `/readyz` and `/metrics` on a loopback
//! port; the scrape after a backfill and a failed run must show every
//! series with its labels and values matching the statuses. JSON logs carry
//! the `reconcile{namespace,usagebackfill}` span and the engine's `slice`
//! spans inside `run{namespace,usagebackfill}`.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use usage_backfill_api::{Phase, UsageBackfill, UsageBackfillSpec, UsageBackfillStatus};
use usage_backfill_controller::{
    HealthState, Metrics, Replica, Settings, serve_health, watermark_lag,
};
use usage_backfill_standin::fixture::HistorySpec;
use usage_backfill_testkit as testkit;

use testkit::FakeApiServer;

const NS: &str = "tenant-a";
const WAIT: Duration = Duration::from_secs(30);

fn settings() -> Settings {
    Settings {
        session_settings: vec![("enable_nestloop".into(), "off".into())],
        ..testkit::settings()
    }
}

/// Log lines, as the JSON formatter writes them.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn json(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let code = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_owned();
    (code, content_type, body.to_owned())
}

/// Sample lines of a scrape: `name{labels}` -> value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// Every metric the chart's alerts (templates/prometheusrule.yaml) and
/// Grafana dashboard (dashboards/*.json) name is in `scraped`, a scrape of
/// a controller that has run a backfill and failed another.
fn chart_names_are_exported(scraped: &BTreeMap<String, f64>) {
    let chart =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/usage-backfill-operator");
    let mut sources = vec![chart.join("templates/prometheusrule.yaml")];
    for entry in std::fs::read_dir(chart.join("dashboards")).unwrap() {
        sources.push(entry.unwrap().path());
    }
    let exported: std::collections::BTreeSet<&str> = scraped
        .keys()
        .map(|series| series.split('{').next().unwrap())
        .collect();
    let name = regex::Regex::new(r"\busage_backfill_[a-z_]+").unwrap();
    let mut used = 0;
    for path in &sources {
        let text = std::fs::read_to_string(path).unwrap();
        for m in name.find_iter(&text) {
            used += 1;
            assert!(
                exported.contains(m.as_str()),
                "{} names {}, which the controller does not export (it exports {exported:?})",
                path.display(),
                m.as_str()
            );
        }
    }
    assert!(used >= 10, "only {used} metric names found in {sources:?}");
}

async fn wait_for_status(
    fake: &FakeApiServer,
    name: &str,
    check: impl Fn(&UsageBackfill) -> bool,
) -> UsageBackfillStatus {
    fake.wait_for(name, WAIT, |f| {
        let o = f.get(NS, name)?;
        (check(&o) && o.metadata.finalizers.as_ref().is_none_or(Vec::is_empty))
            .then(|| o.status.clone().unwrap_or_default())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_after_runs_shows_every_series_and_logs_carry_the_spans() {
    let logs = Logs::default();
    let writer = logs.clone();
    // A line when a span closes, so that spans are seen whatever the
    // engine logs inside them.
    tracing_subscriber::fmt()
        .json()
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .with_env_filter("usage_backfill=info")
        .with_writer(move || writer.clone())
        .init();

    let (db, _pg) = testkit::database_with(&HistorySpec {
        rows: 300,
        months: 4,
        ..HistorySpec::default()
    })
    .await;
    let (client, fake) = FakeApiServer::start();
    fake.put_secret(NS, "app-db", "DATABASE_URL", db.url());
    // Nothing listens on port 1: every attempt fails as DatabaseUnreachable.
    fake.put_secret(
        NS,
        "nowhere",
        "DATABASE_URL",
        "postgres://app:secret@127.0.0.1:1/app?connect_timeout=2",
    );

    let state = HealthState::new(false, Metrics::new());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cancel = CancellationToken::new();
    let server = tokio::spawn(serve_health(listener, state.clone(), cancel.clone()));
    assert_eq!(get(addr, "/healthz").await.0, 200);
    assert_eq!(get(addr, "/readyz").await.0, 503, "not synced yet");

    let replica = Arc::new(Replica {
        client,
        settings: settings(),
        namespaces: Vec::new(),
        concurrency: 4,
        shutdown_timeout: WAIT,
        state: state.clone(),
    });
    let running = tokio::spawn({
        let (replica, cancel) = (replica.clone(), cancel.clone());
        async move { replica.lead(cancel).await }
    });
    fake.wait_for("/readyz", WAIT, |_| {
        state
            .synced()
            .load(std::sync::atomic::Ordering::Acquire)
            .then_some(())
    })
    .await;
    let (code, _, body) = get(addr, "/readyz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));

    fake.create(NS, "observed", UsageBackfillSpec::new("app-db"));
    let mut unreachable = UsageBackfillSpec::new("nowhere");
    unreachable.backoff_limit = 1;
    fake.create(NS, "unreachable", unreachable);
    let done = wait_for_status(&fake, "observed", |o| {
        o.status.as_ref().and_then(|s| s.phase) == Some(Phase::Succeeded)
    })
    .await;
    let failed = wait_for_status(&fake, "unreachable", |o| {
        o.status.as_ref().and_then(|s| s.phase) == Some(Phase::Failed)
    })
    .await;
    assert_eq!(failed.attempts, Some(2));
    // A run task leaves just after its final status write (which checks
    // the object's UID first, then removes the finalizer).
    fake.wait_for("the run tasks to leave", WAIT, |_| {
        state
            .metrics()
            .encode()
            .lines()
            .any(|l| l == "usage_backfill_runs_active 0")
            .then_some(())
    })
    .await;

    let (code, content_type, text) = get(addr, "/metrics").await;
    assert_eq!(code, 200);
    assert_eq!(content_type, "text/plain; version=0.0.4; charset=utf-8");
    let m = samples(&text);
    let value = |series: &str| -> f64 {
        *m.get(series)
            .unwrap_or_else(|| panic!("{series} missing from\n{text}"))
    };
    for (name, kind) in [
        ("usage_backfill_reconciles_total", "counter"),
        ("usage_backfill_reconcile_failures_total", "counter"),
        ("usage_backfill_runs_total", "counter"),
        ("usage_backfill_run_failures_total", "counter"),
        ("usage_backfill_run_duration_seconds", "histogram"),
        ("usage_backfill_slices_total", "counter"),
        ("usage_backfill_rows_touched_total", "counter"),
        ("usage_backfill_lock_wait_seconds", "histogram"),
        ("usage_backfill_watermark_lag_seconds", "gauge"),
        ("usage_backfill_object_phase", "gauge"),
        ("usage_backfill_object_slices_processed", "gauge"),
        ("usage_backfill_runs_active", "gauge"),
        ("usage_backfill_leader", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}\n")),
            "{name} {kind} missing from\n{text}"
        );
    }
    assert!(value("usage_backfill_reconciles_total{result=\"ok\"}") >= 4.0);
    assert_eq!(
        value("usage_backfill_reconciles_total{result=\"error\"}"),
        0.0
    );
    for reason in usage_backfill_controller::Error::reconcile_labels() {
        assert_eq!(
            value(&format!(
                "usage_backfill_reconcile_failures_total{{reason=\"{reason}\"}}"
            )),
            0.0
        );
    }
    assert_eq!(
        value("usage_backfill_runs_total{outcome=\"backfilled\"}"),
        1.0
    );
    assert_eq!(value("usage_backfill_runs_total{outcome=\"retry\"}"), 1.0);
    assert_eq!(value("usage_backfill_runs_total{outcome=\"failed\"}"), 1.0);
    for outcome in ["skipped", "dry_run", "cancelled"] {
        assert_eq!(
            value(&format!(
                "usage_backfill_runs_total{{outcome=\"{outcome}\"}}"
            )),
            0.0
        );
    }
    assert_eq!(
        value("usage_backfill_run_failures_total{reason=\"DatabaseUnreachable\"}"),
        2.0
    );
    assert_eq!(value("usage_backfill_run_duration_seconds_count"), 3.0);
    assert!(value("usage_backfill_run_duration_seconds_sum") > 0.0);
    assert_eq!(
        value("usage_backfill_run_duration_seconds_bucket{le=\"+Inf\"}"),
        3.0
    );
    assert_eq!(
        value("usage_backfill_slices_total"),
        f64::from(done.slices_processed.unwrap())
    );
    assert_eq!(
        value("usage_backfill_rows_touched_total"),
        done.rows_touched.unwrap() as f64
    );
    assert!(done.rows_touched.unwrap() > 0);
    assert_eq!(value("usage_backfill_lock_wait_seconds_count"), 1.0);
    let lag =
        value("usage_backfill_watermark_lag_seconds{namespace=\"tenant-a\",name=\"observed\"}");
    assert_eq!(Some(lag as i64), watermark_lag(&done));
    assert!(
        (0.0..3600.0).contains(&lag),
        "the backfill caught the watermark up: {lag}"
    );
    assert!(
        !text.contains(
            "usage_backfill_watermark_lag_seconds{namespace=\"tenant-a\",name=\"unreachable\"}"
        ),
        "no watermark read, no lag series"
    );
    let phase = |name: &str, phase: &str| {
        value(&format!(
            "usage_backfill_object_phase{{namespace=\"tenant-a\",name=\"{name}\",phase=\"{phase}\"}}"
        ))
    };
    assert_eq!(phase("observed", "Succeeded"), 1.0);
    assert_eq!(phase("observed", "Running"), 0.0);
    assert_eq!(phase("unreachable", "Failed"), 1.0);
    assert_eq!(
        value("usage_backfill_object_slices_processed{namespace=\"tenant-a\",name=\"observed\"}"),
        f64::from(done.slices_processed.unwrap())
    );
    chart_names_are_exported(&m);
    assert_eq!(value("usage_backfill_runs_active"), 0.0);
    assert_eq!(value("usage_backfill_leader"), 1.0);

    // A deleted object takes its series with it.
    fake.delete(NS, "observed");
    fake.wait_for("the lag series to go", WAIT, |_| {
        (!state.metrics().encode().contains("name=\"observed\"")).then_some(())
    })
    .await;

    // Logs: JSON, reconciles in their span, slices in the run's.
    let lines = logs.json();
    let in_span = |l: &serde_json::Value, name: &str| {
        l["spans"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["name"] == name))
    };
    let started = lines
        .iter()
        .find(|l| l["fields"]["message"] == "starting a run")
        .expect("a 'starting a run' line");
    assert_eq!(started["span"]["name"], "reconcile");
    assert_eq!(started["span"]["namespace"], NS);
    assert!(
        ["observed", "unreachable"].contains(&started["span"]["usagebackfill"].as_str().unwrap()),
        "{started}"
    );
    let slices: Vec<_> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "close" && l["span"]["name"] == "slice")
        .collect();
    assert!(
        slices.len() as u32 >= done.slices_processed.unwrap(),
        "{} slice spans for {:?} slices",
        slices.len(),
        done.slices_processed
    );
    for l in &slices {
        assert!(l["span"]["from"].is_string() && l["span"]["to"].is_string());
        assert!(in_span(l, "run"), "{l}");
        let run = l["spans"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == "run")
            .unwrap();
        assert_eq!(run["namespace"], NS);
        assert_eq!(run["usagebackfill"], "observed");
    }
    let reconciles = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "close" && l["span"]["name"] == "reconcile")
        .count();
    assert!(reconciles >= 4, "{reconciles} reconcile spans");

    cancel.cancel();
    let left = tokio::time::timeout(WAIT, running).await.unwrap().unwrap();
    assert_eq!(left, 0);
    server.await.unwrap();
    assert!(fake.unexpected().is_empty(), "{:?}", fake.unexpected());
}
