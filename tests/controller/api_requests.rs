//! The load a running backfill puts on the API server: the requests the
//! whole controller (watch, reconciles, run task) makes against the fake
//! API server while a slow, many-slice walk runs, and a real PostgreSQL.
//!
//! The figures per minute are a measurement (wall-clock rates vary with
//! the machine): `cargo test --test controller api_requests -- --ignored --nocapture`
//! prints them. The checks that always run count requests per slice and
//! per write, which no timing changes.

use usage_backfill_testkit as testkit;

use std::collections::BTreeMap;
use std::time::Duration;

use testkit::apiserver::{Recorded, rbac};
use usage_backfill_api::{Mode, Phase, TuningPreset, UsageBackfillSpec};
use usage_backfill_controller::{RunnerSettings, Settings, has_finalizer};
use usage_backfill_standin::fixture::HistorySpec;

use testkit::harness::{Harness, NS, UsageBackfillBuilder, WAIT};
use testkit::instrument::{instrument, slow_window};
use testkit::settings;

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

// ---------------------------------------------------------------------------
// The bounds, by count: per slice and per write, never per second
// ---------------------------------------------------------------------------

fn short_history() -> HistorySpec {
    HistorySpec {
        rows: 300,
        months: 12,
        ..HistorySpec::default()
    }
}

/// The run's settings with progress written at most every `every`, and a
/// heartbeat too rare to show within a test.
fn progress_every(every: Duration) -> Settings {
    let mut s = settings();
    s.runner.progress_interval = every;
    s.runner.heartbeat_interval = Duration::from_secs(3600);
    s
}

/// Status writes of `name` that carry progress short of the end.
fn mid_run_writes(h: &Harness, name: &str) -> Vec<u32> {
    h.fake
        .statuses(name)
        .iter()
        .filter_map(|s| Some((s.slices_processed?, s.slices_total?)))
        .filter(|(done, total)| 0 < *done && done < total)
        .map(|(done, _)| done)
        .collect()
}

fn ubf_gets(requests: &[Recorded]) -> usize {
    requests
        .iter()
        .filter(|r| r.resource == "usagebackfills" && verb_of(r) == "get usagebackfills")
        .count()
}

fn conflicts(requests: &[Recorded]) -> usize {
    requests
        .iter()
        .filter(|r| r.resource == "usagebackfills" && r.code == 409)
        .count()
}

/// With a progress interval longer than the run, slice progress is never
/// written on its own: the status writes are the phase changes, however
/// many slices; with the tests' interval of zero, every slice is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_written_at_most_once_per_interval_and_phases_at_once() {
    let h = Harness::with_settings(
        Some(short_history()),
        progress_every(Duration::from_secs(3600)),
    )
    .await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("rare").edit(serial));
    let done = h.run_to_end("rare").await;
    let total = done.slices_total.unwrap();
    assert!(total >= 12, "a walk of many slices: {done:?}");
    assert_eq!(done.slices_processed, Some(total));
    assert_eq!(
        mid_run_writes(&h, "rare"),
        Vec::<u32>::new(),
        "no progress-only write within the interval"
    );
    let phases: Vec<Option<Phase>> = h.fake.statuses("rare").iter().map(|s| s.phase).collect();
    assert!(
        phases.len() <= 4,
        "Pending, Running (lock acquired, walk planned), Succeeded: {phases:?}"
    );
    assert_eq!(phases.last(), Some(&Some(Phase::Succeeded)));

    // The tests' settings: every slice's progress is written.
    let h = h.restarted(settings());
    h.apply(
        UsageBackfillBuilder::new("every")
            .edit(serial)
            .mode(Mode::Always),
    );
    let done = h.run_to_end("every").await;
    let total = done.slices_total.unwrap();
    let written = mid_run_writes(&h, "every");
    assert_eq!(
        written,
        (1..total).collect::<Vec<_>>(),
        "one write per slice, in order"
    );
}

/// A run's status writes are one request each: guarded by the answer to
/// the previous write, not by a GET; only a 409 (the object changed under
/// the run) reads it again, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runs_writes_read_the_object_only_after_a_conflict() {
    let h = Harness::with_settings(Some(short_history()), settings()).await;
    instrument(&h.pg).await;
    slow_window(&h.pg, 0.2).await;
    h.put_secret();
    h.apply(UsageBackfillBuilder::new("guarded").edit(serial));
    h.reconcile("guarded").await;
    let started = h.fake.requests().len();
    h.wait_running("guarded", 2).await;
    // Someone else changes the object mid-run (nothing reconciles here).
    h.fake
        .edit_spec(NS, "guarded", |s| s.run_id = "edited".into());
    slow_window(&h.pg, 0.0).await;
    let done = h.status_after_attempt("guarded").await;
    assert_eq!(done.phase, Some(Phase::Succeeded), "{done:?}");
    let run: Vec<Recorded> = h.fake.requests()[started..].to_vec();
    let writes = run.iter().filter(|r| r.is_status_apply()).count();
    assert!(
        writes as u32 > done.slices_total.unwrap(),
        "every slice written: {writes}"
    );
    assert_eq!(conflicts(&run), 1, "one write met the edit");
    assert_eq!(
        ubf_gets(&run),
        1,
        "one GET, after the 409:\n{}",
        h.fake.describe_requests()
    );
    let obj = h.fake.get(NS, "guarded").unwrap();
    assert!(!has_finalizer(&obj), "the finalizer is gone");
}

/// Under the whole controller, each progress write comes back through the
/// watch and is reconciled from the reflector's copy: while the run goes
/// on, no reconcile reads the object (it observes the run), so the object
/// is read only after a 409.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciles_of_a_running_backfill_read_nothing() {
    let h = Harness::with_settings(Some(short_history()), settings()).await;
    h.put_secret();
    let (cancel, controller) = h.start_controller().await;
    h.apply(
        UsageBackfillBuilder::new("watched")
            .edit(serial)
            .sleep_between_slices("50ms"),
    );
    let done = h
        .fake
        .wait_for("Succeeded", WAIT, |f| {
            let s = f.get(NS, "watched")?.status?;
            (s.phase == Some(Phase::Succeeded)).then_some(s)
        })
        .await;
    cancel.cancel();
    let _ = tokio::time::timeout(WAIT, controller).await;
    let requests = h.fake.requests();
    let status_of = |r: &Recorded| r.status().and_then(|s| s.phase);
    let first = requests
        .iter()
        .position(|r| status_of(r) == Some(Phase::Running))
        .expect("Running written");
    let last = requests
        .iter()
        .position(|r| status_of(r) == Some(Phase::Succeeded))
        .expect("Succeeded written");
    let run = &requests[first..=last];
    let writes = run.iter().filter(|r| r.is_status_apply()).count();
    assert!(
        writes as u32 >= done.slices_total.unwrap(),
        "every slice written, each a watch event and a reconcile: {writes}"
    );
    assert_eq!(
        ubf_gets(run),
        conflicts(run),
        "a GET only after a 409:\n{}",
        h.fake.describe_requests()
    );
}
