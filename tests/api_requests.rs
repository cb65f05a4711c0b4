//! The load a running backfill puts on the API server: the requests the
//! whole controller (watch, reconciles, run task) makes against the fake
//! API server while a slow, many-slice walk runs, and a real PostgreSQL.
//!
//! The figures per minute are a measurement (wall-clock rates vary with
//! the machine): `cargo test --test api_requests -- --ignored --nocapture`
//! prints them. The checks that always run count requests per slice and
//! per write, which no timing changes.

use usage_backfill_testkit as support;

use std::collections::BTreeMap;
use std::time::Duration;

use usage_backfill_api::{Phase, TuningPreset, UsageBackfillSpec};
use usage_backfill_controller::{RunnerSettings, Settings};
use usage_backfill_standin::fixture::HistorySpec;
use usage_backfill_testkit::apiserver::{Recorded, rbac};

use support::harness::{Harness, UsageBackfillBuilder};
use support::instrument::{instrument, slow_window};
use support::settings;

/// How long the measurement counts requests.
const WINDOW: Duration = Duration::from_secs(30);

/// Many month slices, each slowed by the instrumented window function.
fn long_history() -> HistorySpec {
    HistorySpec {
        rows: 600,
        months: 60,
        ..HistorySpec::default()
    }
}

/// One session walking month after month, so that progress moves at the
/// pace of the slowed slices.
fn serial(s: &mut UsageBackfillSpec) {
    s.parallelism = 1;
    s.tuning.get_or_insert_with(Default::default).preset = TuningPreset::ServerDefaults;
}

/// `verb resource[/subresource]` of a request, as RBAC names it.
fn verb_of(r: &Recorded) -> String {
    let verb = rbac::verb(&r.method, r.name.is_some(), r.is_watch());
    match &r.subresource {
        Some(sub) => format!("{verb} {}/{sub}", r.resource),
        None => format!("{verb} {}", r.resource),
    }
}

fn by_verb(requests: &[Recorded]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in requests {
        *out.entry(verb_of(r)).or_default() += 1;
    }
    out
}

/// The controller with the production timings of the run task.
fn production_timings() -> Settings {
    let mut s = settings();
    let defaults = RunnerSettings::default();
    s.runner.progress_interval = defaults.progress_interval;
    s.runner.heartbeat_interval = defaults.heartbeat_interval;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement: prints the API requests per minute of a running backfill"]
async fn requests_per_minute_of_a_running_backfill() {
    let h = Harness::with_settings(Some(long_history()), production_timings()).await;
    instrument(&h.pg).await;
    slow_window(&h.pg, 0.7).await;
    h.put_secret();
    let (cancel, controller) = h.start_controller().await;
    h.apply(UsageBackfillBuilder::new("measured").edit(serial));
    let start = h.wait_running("measured", 1).await;
    let from = h.fake.requests().len();
    tokio::time::sleep(WINDOW).await;
    let window: Vec<Recorded> = h.fake.requests()[from..].to_vec();
    let end = h.status("measured");
    assert_eq!(end.phase, Some(Phase::Running), "still running: {end:?}");
    let slices = end.slices_processed.unwrap_or(0) - start.slices_processed.unwrap_or(0);
    let per_minute = 60.0 / WINDOW.as_secs_f64();
    eprintln!(
        "API requests of a running backfill over {WINDOW:?} ({slices} slices, progress every {:?}):",
        RunnerSettings::default().progress_interval
    );
    for (verb, n) in by_verb(&window) {
        eprintln!("  {verb:<40} {:>6.1}/min", n as f64 * per_minute);
    }
    eprintln!(
        "  {:<40} {:>6.1}/min",
        "total",
        window.len() as f64 * per_minute
    );
    cancel.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(60), controller).await;
}
