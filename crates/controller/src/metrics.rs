//! Prometheus metrics of the controller, served as text on `/metrics`.
//!
//! Every label value comes from a fixed set (an enum's static name), so
//! the number of series is bounded; the per-object gauges (watermark lag,
//! phase, slices processed; labels namespace and name) are read from the
//! leader's UsageBackfill cache at scrape time, so their series go with the
//! object and survive a controller restart. The chart's alerts and
//! dashboard are built on them (tests/metrics.rs checks every name they use).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::ResourceExt;
use kube::runtime::reflector::Store;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use strum::VariantArray;

use super::errors::{Error, REFUSABLE_WRITES};
use usage_backfill_api::{Phase, UsageBackfill};

/// Content-Type of [`Metrics::encode`]: the Prometheus text format 0.0.4.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How a run (one attempt) ended: the `outcome` label of
/// `usage_backfill_runs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
#[strum(serialize_all = "snake_case")]
pub enum RunOutcome {
    /// The walk ran and the watermark was stamped.
    Backfilled,
    /// Nothing to walk.
    Skipped,
    /// A dry run planned the walk.
    DryRun,
    /// Terminal failure (the object is Failed/Stalled).
    Failed,
    /// The attempt failed and another follows after the backoff.
    Retry,
    /// Cancelled: deletion, a new spec, shutdown or lost leadership.
    Cancelled,
}

impl RunOutcome {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct WriteLabel {
    write: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ObjectLabels {
    namespace: String,
    name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PhaseLabels {
    namespace: String,
    name: String,
    phase: &'static str,
}

/// The registry and a handle on every metric. Shared by the health server,
/// every reconcile and every run task (of every leadership term).
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ResultLabel, Counter>,
    reconcile_failures: Family<ReasonLabel, Counter>,
    runs: Family<OutcomeLabel, Counter>,
    run_failures: Family<ReasonLabel, Counter>,
    run_duration: Histogram,
    slices: Counter,
    rows_touched: Counter,
    lock_wait: Histogram,
    runs_active: Gauge,
    leader: Gauge,
    leader_transitions: Counter,
    write_refusals: Family<WriteLabel, Counter>,
    lag: Arc<ObjectGauges>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("usage_backfill");
        let reconciles = Family::<ResultLabel, Counter>::default();
        let reconcile_failures = Family::<ReasonLabel, Counter>::default();
        let runs = Family::<OutcomeLabel, Counter>::default();
        let run_failures = Family::<ReasonLabel, Counter>::default();
        // 1 s to about 4.5 h.
        let run_duration = Histogram::new(exponential_buckets(1.0, 2.0, 15));
        let slices = Counter::default();
        let rows_touched = Counter::default();
        // 10 ms to about 45 min.
        let lock_wait = Histogram::new(exponential_buckets(0.01, 4.0, 10));
        let runs_active = Gauge::default();
        let leader = Gauge::default();
        let leader_transitions = Counter::default();
        let write_refusals = Family::<WriteLabel, Counter>::default();
        let lag = Arc::new(ObjectGauges::default());

        // Counters get their `_total` suffix from the encoder.
        registry.register(
            "reconciles",
            "Reconciles of UsageBackfills by result (ok, error)",
            reconciles.clone(),
        );
        registry.register(
            "reconcile_failures",
            format!(
                "Failed reconciles by reason ({}): errors talking to the API server, not failed backfills",
                Error::reconcile_labels().collect::<Vec<_>>().join(", ")
            ),
            reconcile_failures.clone(),
        );
        registry.register(
            "runs",
            format!(
                "Backfill runs (attempts) ended, by outcome: {}",
                RunOutcome::VARIANTS
                    .iter()
                    .map(|o| o.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            runs.clone(),
        );
        registry.register(
            "run_failures",
            "Failed backfill attempts by reason (the condition reason, e.g. DatabaseUnreachable, SliceFailed)",
            run_failures.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "Wall time of a backfill run (attempt), from its start to its end, whatever the outcome",
            run_duration.clone(),
        );
        registry.register(
            "slices",
            "Month slices committed by backfill runs",
            slices.clone(),
        );
        registry.register(
            "rows_touched",
            "Rollup rows upserted or deleted by backfill runs",
            rows_touched.clone(),
        );
        registry.register(
            "lock_wait_seconds",
            "Time a run waited for advisory lock 4246 before it got it",
            lock_wait.clone(),
        );
        registry.register(
            "runs_active",
            "Backfill runs in progress in this process (including those waiting for a slot or the lock)",
            runs_active.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease (or runs without leader election), else 0",
            leader.clone(),
        );
        registry.register(
            "leader_transitions",
            "Times this replica started or stopped leading (usage_backfill_leader changed); a handover counts once on each side",
            leader_transitions.clone(),
        );
        registry.register(
            "write_refusals",
            "Status or finalizer writes the API server refused as invalid (422), by write (status, finalizer): the object is retried slowly, with a Warning Event WriteRefused",
            write_refusals.clone(),
        );
        registry.register_collector(Box::new(lag.clone()));

        // Every fixed label value from the start, so that rate() and
        // absence alerts see zeros rather than missing series.
        for result in ["ok", "error"] {
            let _ = reconciles.get_or_create(&ResultLabel { result });
        }
        for reason in Error::reconcile_labels() {
            let _ = reconcile_failures.get_or_create(&ReasonLabel { reason });
        }
        for write in REFUSABLE_WRITES {
            let _ = write_refusals.get_or_create(&WriteLabel { write });
        }
        for &outcome in RunOutcome::VARIANTS {
            let _ = runs.get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            });
        }

        Arc::new(Metrics {
            registry,
            reconciles,
            reconcile_failures,
            runs,
            run_failures,
            run_duration,
            slices,
            rows_touched,
            lock_wait,
            runs_active,
            leader,
            leader_transitions,
            write_refusals,
            lag,
        })
    }

    /// The whole registry in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }

    pub fn reconciled(&self, result: Result<(), &Error>) {
        let result = match result {
            Ok(()) => "ok",
            Err(e) => {
                self.reconcile_failures
                    .get_or_create(&ReasonLabel { reason: e.label() })
                    .inc();
                "error"
            }
        };
        self.reconciles.get_or_create(&ResultLabel { result }).inc();
    }

    /// A run ended after `elapsed`; `failure` is the engine's reason when
    /// the attempt failed (outcome failed or retry).
    pub fn run_ended(&self, outcome: RunOutcome, failure: Option<&'static str>, elapsed: Duration) {
        self.runs
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str(),
            })
            .inc();
        if let Some(reason) = failure {
            self.run_failures
                .get_or_create(&ReasonLabel { reason })
                .inc();
        }
        self.run_duration.observe(elapsed.as_secs_f64());
    }

    pub fn slice_done(&self, rows: i64) {
        self.slices.inc();
        self.rows_touched.inc_by(u64::try_from(rows).unwrap_or(0));
    }

    pub fn lock_acquired(&self, waited: Duration) {
        self.lock_wait.observe(waited.as_secs_f64());
    }

    pub fn set_runs_active(&self, n: usize) {
        self.runs_active.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// Whether this replica leads; a change is counted as a transition.
    pub fn set_leader(&self, leading: bool) {
        let before = self.leader.set(i64::from(leading));
        if before != i64::from(leading) {
            self.leader_transitions.inc();
        }
    }

    /// The API server refused a `write` (one of `REFUSABLE_WRITES`) as
    /// invalid.
    pub fn write_refused(&self, write: &'static str) {
        self.write_refusals
            .get_or_create(&WriteLabel { write })
            .inc();
    }

    /// The caches the lag gauge is read from (the current leadership
    /// term's); empty when not leading.
    pub fn set_lag_source(&self, stores: Vec<Store<UsageBackfill>>) {
        *self.lag.stores.lock().unwrap_or_else(|p| p.into_inner()) = stores;
    }
}

/// The per-object gauges, computed from the cached objects at each scrape:
/// `usage_backfill_watermark_lag_seconds{namespace,name}`,
/// `usage_backfill_object_phase{namespace,name,phase}` (1 for the object's
/// phase, 0 for the other four) and
/// `usage_backfill_object_slices_processed{namespace,name}`.
#[derive(Debug, Default)]
struct ObjectGauges {
    stores: Mutex<Vec<Store<UsageBackfill>>>,
}

/// Every phase, so that each object has one series per phase.
const PHASES: [Phase; 5] = [
    Phase::Pending,
    Phase::WaitingForLock,
    Phase::Running,
    Phase::Succeeded,
    Phase::Failed,
];

impl Collector for ObjectGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let lags = Family::<ObjectLabels, Gauge>::default();
        let phases = Family::<PhaseLabels, Gauge>::default();
        let slices = Family::<ObjectLabels, Gauge>::default();
        let stores = self
            .stores
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (mut any_lag, mut any_object, mut any_slices) = (false, false, false);
        for obj in stores.iter().flat_map(Store::state) {
            let labels = ObjectLabels {
                namespace: obj.namespace().unwrap_or_default(),
                name: obj.name_any(),
            };
            let status = obj.status.as_ref();
            if let Some(lag) = status.and_then(watermark_lag) {
                lags.get_or_create(&labels).set(lag);
                any_lag = true;
            }
            let current = status.and_then(|s| s.phase);
            for phase in PHASES {
                phases
                    .get_or_create(&PhaseLabels {
                        namespace: labels.namespace.clone(),
                        name: labels.name.clone(),
                        phase: phase.as_str(),
                    })
                    .set(i64::from(current == Some(phase)));
            }
            any_object = true;
            if let Some(n) = status.and_then(|s| s.slices_processed) {
                slices.get_or_create(&labels).set(n.into());
                any_slices = true;
            }
        }
        if any_lag {
            let metric = encoder.encode_descriptor(
                "watermark_lag_seconds",
                "How far the rollup watermark is behind the newest task_usage event, in seconds, as the last run of the UsageBackfill left them (status maxEvent - watermarkAfter, else status lagSeconds; 0 when the watermark is ahead)",
                None,
                lags.metric_type(),
            )?;
            lags.encode(metric)?;
        }
        if any_object {
            let metric = encoder.encode_descriptor(
                "object_phase",
                "1 for the phase each UsageBackfill is in (status.phase: Pending, WaitingForLock, Running, Succeeded, Failed), 0 for the others",
                None,
                phases.metric_type(),
            )?;
            phases.encode(metric)?;
        }
        if any_slices {
            let metric = encoder.encode_descriptor(
                "object_slices_processed",
                "Month slices the current or last run of each UsageBackfill has completed (status.slicesProcessed)",
                None,
                slices.metric_type(),
            )?;
            slices.encode(metric)?;
        }
        Ok(())
    }
}

/// The lag a finished run left: the newest event minus the watermark read
/// back after the run (status.lagSeconds is measured before the run, so
/// after a backfill it says how far behind the rollup *was*), and 0 when
/// the watermark is ahead of the newest event: nothing is behind.
pub fn watermark_lag(s: &usage_backfill_api::UsageBackfillStatus) -> Option<i64> {
    let lag = match (&s.max_event, &s.watermark_after) {
        (Some(max), Some(after)) => Some(max.0.as_second() - after.0.as_second()),
        _ => s.lag_seconds,
    };
    lag.map(|l| l.max(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_series_exist_from_the_start() {
        let m = Metrics::new();
        let text = m.encode();
        assert!(text.contains("usage_backfill_reconciles_total{result=\"ok\"} 0\n"));
        assert!(
            text.contains("usage_backfill_reconcile_failures_total{reason=\"write_status\"} 0\n")
        );
        assert!(text.contains("usage_backfill_runs_total{outcome=\"dry_run\"} 0\n"));
        assert!(text.contains("# TYPE usage_backfill_run_duration_seconds histogram\n"));
        assert!(text.contains("usage_backfill_leader 0\n"));
        assert!(text.contains("usage_backfill_leader_transitions_total 0\n"));
        assert!(text.contains("usage_backfill_write_refusals_total{write=\"status\"} 0\n"));
        assert!(text.contains("usage_backfill_write_refusals_total{write=\"finalizer\"} 0\n"));
        assert!(!text.contains("watermark_lag"), "no objects, no series");
        assert!(!text.contains("# EOF"), "Prometheus text, not OpenMetrics");
    }

    #[test]
    fn counts_and_histograms() {
        let m = Metrics::new();
        m.run_ended(
            RunOutcome::Retry,
            Some("SliceFailed"),
            Duration::from_millis(1500),
        );
        m.run_ended(RunOutcome::Backfilled, None, Duration::from_secs(3));
        m.slice_done(7);
        m.slice_done(-1);
        m.lock_acquired(Duration::from_millis(20));
        m.set_runs_active(2);
        m.set_leader(true);
        m.set_leader(true);
        m.write_refused("finalizer");
        let text = m.encode();
        for line in [
            "usage_backfill_runs_total{outcome=\"retry\"} 1\n",
            "usage_backfill_runs_total{outcome=\"backfilled\"} 1\n",
            "usage_backfill_run_failures_total{reason=\"SliceFailed\"} 1\n",
            "usage_backfill_run_duration_seconds_count 2\n",
            "usage_backfill_run_duration_seconds_sum 4.5\n",
            "usage_backfill_run_duration_seconds_bucket{le=\"2\"} 1\n",
            "usage_backfill_slices_total 2\n",
            "usage_backfill_rows_touched_total 7\n",
            "usage_backfill_lock_wait_seconds_count 1\n",
            "usage_backfill_runs_active 2\n",
            "usage_backfill_leader 1\n",
            "usage_backfill_leader_transitions_total 1\n",
            "usage_backfill_write_refusals_total{write=\"finalizer\"} 1\n",
            "usage_backfill_write_refusals_total{write=\"status\"} 0\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
    }

    #[test]
    fn object_gauges_come_from_the_cache() {
        use kube::runtime::{reflector::store::Writer, watcher::Event};
        use usage_backfill_api::{UsageBackfillSpec, UsageBackfillStatus};
        let mut writer = Writer::<UsageBackfill>::default();
        let mut o = UsageBackfill::new("upgrade", UsageBackfillSpec::new("db"));
        o.metadata.namespace = Some("shop".into());
        o.status = Some(UsageBackfillStatus {
            phase: Some(Phase::Running),
            slices_processed: Some(3),
            ..Default::default()
        });
        writer.apply_watcher_event(&Event::Apply(o));
        let mut fresh = UsageBackfill::new("fresh", UsageBackfillSpec::new("db"));
        fresh.metadata.namespace = Some("shop".into());
        writer.apply_watcher_event(&Event::Apply(fresh));
        let m = Metrics::new();
        m.set_lag_source(vec![writer.as_reader()]);
        let text = m.encode();
        for line in [
            "# TYPE usage_backfill_object_phase gauge\n",
            "usage_backfill_object_phase{namespace=\"shop\",name=\"upgrade\",phase=\"Running\"} 1\n",
            "usage_backfill_object_phase{namespace=\"shop\",name=\"upgrade\",phase=\"Failed\"} 0\n",
            "usage_backfill_object_phase{namespace=\"shop\",name=\"fresh\",phase=\"Pending\"} 0\n",
            "usage_backfill_object_slices_processed{namespace=\"shop\",name=\"upgrade\"} 3\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(!text.contains("slices_processed{namespace=\"shop\",name=\"fresh\"}"));
        assert!(!text.contains("watermark_lag"), "no lag measured yet");
    }

    /// Condition reasons that name no failure: the states of a run, and
    /// a cancellation (the next attempt or a deletion follows).
    const NOT_FAILURES: [&str; 9] = [
        "Pending",
        "Suspended",
        "WaitingForLock",
        "Running",
        "RetryScheduled",
        "Backfilled",
        "Skipped",
        "DryRun",
        "Cancelled",
    ];

    fn read(path: &str) -> String {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// The backticked names in column `column` of the table under `heading`.
    fn table_names(doc: &str, heading: &str, column: usize) -> Vec<String> {
        let table = doc
            .split_once(heading)
            .unwrap_or_else(|| panic!("no {heading:?}"))
            .1
            .lines()
            .skip_while(|l| !l.starts_with('|'))
            .take_while(|l| l.starts_with('|'))
            .skip(2);
        table
            .flat_map(|row| {
                let cell = row.split('|').nth(column + 1).unwrap_or("").to_owned();
                cell.split('`')
                    .skip(1)
                    .step_by(2)
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// docs/resource.md's table of failures names every failure reason
    /// once, and nothing else: a new `Reason` or engine `Failure` fails
    /// here until the table (or [`NOT_FAILURES`]) has it.
    #[test]
    fn the_resource_guide_lists_every_failure_reason() {
        use std::collections::BTreeSet;
        use usage_backfill_api::Reason;
        let listed = table_names(&read("docs/resource.md"), "## Retries", 1);
        let unique: BTreeSet<&str> = listed.iter().map(String::as_str).collect();
        assert_eq!(
            unique.len(),
            listed.len(),
            "a reason listed twice: {listed:?}"
        );
        let failures: BTreeSet<&str> = Reason::VARIANTS
            .iter()
            .map(|r| r.as_str())
            .filter(|r| !NOT_FAILURES.contains(r))
            .collect();
        assert_eq!(unique, failures, "docs/resource.md, ## Retries");
        for r in NOT_FAILURES {
            assert!(r.parse::<Reason>().is_ok(), "{r} is no longer a reason");
        }
    }

    /// The reasons the Argo CD health script and its test objects spell
    /// out are condition reasons.
    #[test]
    fn the_health_check_spells_reasons_as_the_api_does() {
        use usage_backfill_api::Reason;
        let lua = read("health/argocd/usagebackfill.lua");
        let mut names: Vec<String> = lua
            .split("reason ~= \"")
            .skip(1)
            .map(|rest| rest.split('"').next().unwrap_or("").to_owned())
            .collect();
        assert!(names.len() >= 2, "the script compares reasons: {names:?}");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../health/argocd/test");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
            names.extend(
                text.split("\"reason\": \"")
                    .skip(1)
                    .map(|rest| rest.split('"').next().unwrap_or("").to_owned()),
            );
        }
        for name in names {
            assert!(
                name.parse::<Reason>().is_ok(),
                "{name:?} is not a condition reason"
            );
        }
    }

    #[test]
    fn lag_prefers_the_watermark_read_back() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
        use usage_backfill_api::UsageBackfillStatus;
        let t = |s: &str| Some(Time(s.parse().unwrap()));
        let mut s = UsageBackfillStatus {
            lag_seconds: Some(1_000_000),
            ..Default::default()
        };
        assert_eq!(watermark_lag(&s), Some(1_000_000));
        s.max_event = t("2026-01-01T01:00:00Z");
        s.watermark_after = t("2026-01-01T00:00:00Z");
        assert_eq!(watermark_lag(&s), Some(3600));
        s.watermark_after = t("2026-01-01T02:00:00Z");
        assert_eq!(watermark_lag(&s), Some(0), "ahead: nothing behind");
        assert_eq!(watermark_lag(&UsageBackfillStatus::default()), None);
    }
}
