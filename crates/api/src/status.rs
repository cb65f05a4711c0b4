//! The observed state: `UsageBackfillStatus` and the types it is made of.

use super::*;

/// Observed state of a UsageBackfill, written by the operator only.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(default, rename_all = "camelCase")]
pub struct UsageBackfillStatus {
    /// metadata.generation of the spec this status describes. -1 until the
    /// operator has looked at the resource, so that a fresh object is never
    /// considered current (kstatus).
    pub observed_generation: i64,

    /// Where the current run is: Pending (accepted, not started yet or
    /// waiting for a retry), WaitingForLock (advisory lock 4246 is held
    /// elsewhere, see lockHolder), Running (walking slices), Succeeded (see
    /// result) or Failed (see the Stalled condition).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(transform = optional_enum)]
    pub phase: Option<Phase>,

    /// Outcome of a Succeeded run: Backfilled (the walk ran and the watermark
    /// was stamped), Skipped (nothing to walk, see skipped) or DryRun
    /// (planned only, nothing written).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(transform = optional_enum)]
    pub result: Option<BackfillResult>,

    /// Why an IfLagging run was Skipped, in the reference hook's words:
    /// rollup_state_missing (the rollup state table does not exist yet;
    /// nothing done), task_usage_empty (no events; the watermark was stamped)
    /// or watermark_within_threshold (lag within lagThreshold; the watermark
    /// was stamped). A skip that stamps first rolls up, under advisory lock
    /// 4246, the one window from the old watermark to the stamp (from, to,
    /// rowsTouched, slices 1/1), so that the stamp passes no event that is
    /// not rolled up.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(transform = optional_enum)]
    pub skipped: Option<SkipReason>,

    /// Month slices completed (or planned, in a dry run) so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slices_processed: Option<u32>,

    /// Month slices the walk covers in total, once the range is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slices_total: Option<u32>,

    /// slicesProcessed/slicesTotal as text, e.g. "3/12", for kubectl get.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,

    /// Rollup rows upserted or deleted so far, summed over slices (in a dry
    /// run: the estimated task_usage rows in range).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows_touched: Option<i64>,

    /// Start of the walk (UTC, start of a month; for a skip, the old
    /// watermark).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<Time>,

    /// End of the walk, exclusive (UTC).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<Time>,

    /// The instant the finished walk ended at (UTC): the database clock read
    /// once under advisory lock 4246, minus five minutes (the margin of the
    /// application's own rollup tick). No window ended later and the
    /// watermark was stamped with it, so writes committed while the walk ran
    /// stay in the dirty queue or after the watermark, for the application's
    /// next tick.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub walk_end: Option<Time>,

    /// Start of the first slice not yet completed: where a retried attempt
    /// resumes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Time>,

    /// Whether the run stamped the rollup watermark.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark_stamped: Option<bool>,

    /// Rollup watermark (watermark_at) read before the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark_before: Option<Time>,

    /// Rollup watermark read back after the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watermark_after: Option<Time>,

    /// Newest event of task_usage, MAX(COALESCE(updated_at, created_at)).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_event: Option<Time>,

    /// maxEvent minus the watermark, in seconds, as last measured (database
    /// clock; negative when the watermark is ahead).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lag_seconds: Option<i64>,

    /// When the current (or last) run started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<Time>,

    /// When the last run ended, successfully or not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,

    /// Refreshed while a run is in progress; a stale heartbeat means the
    /// operator stopped watching over it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_time: Option<Time>,

    /// Attempts made for the current spec, including the one in progress.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,

    /// Error of the last failed attempt. Never contains credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,

    /// While waiting for advisory lock 4246: the session holding it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lock_holder: Option<LockHolder>,

    /// spec.runId of the run this status describes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,

    /// resourceVersion of the database Secret the last attempt read (then,
    /// after a comma, of the CA Secret, when one is used), for reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_resource_versions: Option<String>,

    /// Digest of the values the last attempt read from the referenced
    /// Secret keys (a salted, slow PBKDF2-HMAC-SHA256, truncated; never the
    /// values). When it changes, a Failed run, or one waiting for its
    /// retry, starts a fresh attempt at once: fixing the Secret is how a
    /// connection problem is fixed. A change to the Secret's metadata alone
    /// (a label, an annotation) changes nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_digest: Option<String>,

    /// Session planner settings the run applied (e.g. enable_nestloop: "off"):
    /// the tuning preset's, the operator's, then spec.tuning.settings.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,

    /// How a run that walked slices went: sessions, the measured
    /// plan_cache_mode, retried slices and slice times.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub performance: Option<PerformanceStatus>,

    /// Events dated beyond the database clock (writer clock skew), which no
    /// walk can bring within the lag threshold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub future_events: Option<FutureEvents>,

    /// Things worth a look that did not fail the run.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,

    /// Ready, Reconciling and Stalled, following kstatus: Reconciling=True
    /// while work is pending or running (also while a failed attempt waits to
    /// be retried), Ready=True on success, Stalled=True on terminal failure.
    /// A failed attempt's reason names the failure (e.g. DatabaseUnreachable,
    /// AuthenticationFailed, SliceFailed, FutureDatedEvents).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl Default for UsageBackfillStatus {
    fn default() -> Self {
        Self {
            observed_generation: -1,
            phase: None,
            result: None,
            skipped: None,
            slices_processed: None,
            slices_total: None,
            progress: None,
            rows_touched: None,
            from: None,
            to: None,
            walk_end: None,
            cursor: None,
            watermark_stamped: None,
            watermark_before: None,
            watermark_after: None,
            max_event: None,
            lag_seconds: None,
            started_at: None,
            finished_at: None,
            heartbeat_time: None,
            attempts: None,
            last_error: None,
            lock_holder: None,
            run_id: None,
            secret_resource_versions: None,
            secret_digest: None,
            settings: BTreeMap::new(),
            performance: None,
            future_events: None,
            warnings: Vec::new(),
            conditions: Vec::new(),
        }
    }
}

impl UsageBackfillStatus {
    /// Sets slicesProcessed and slicesTotal, and the progress text derived
    /// from them.
    pub fn set_slices(&mut self, processed: u32, total: u32) {
        self.slices_processed = Some(processed);
        self.slices_total = Some(total);
        self.progress = Some(format!("{processed}/{total}"));
    }
}

/// Where a run is.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, strum::IntoStaticStr,
)]
pub enum Phase {
    /// Accepted, not started (or waiting for a retry).
    Pending,
    /// Waiting for advisory lock 4246; see lockHolder.
    WaitingForLock,
    /// Walking slices.
    Running,
    /// Done; see result.
    Succeeded,
    /// Given up: invalid spec, refused range or backoffLimit exhausted.
    Failed,
}

impl Phase {
    /// Whether the run for the observed generation is over.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Outcome of a Succeeded run.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, strum::IntoStaticStr,
)]
pub enum BackfillResult {
    /// The walk ran and the watermark was stamped.
    Backfilled,
    /// Nothing to walk (see skipped); the watermark may have been stamped.
    Skipped,
    /// Planned only; nothing written.
    DryRun,
}

/// Why an IfLagging run skipped the walk (the reference hook's words).
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema, strum::IntoStaticStr,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum SkipReason {
    /// The rollup state table does not exist yet: nothing to backfill into.
    RollupStateMissing,
    /// task_usage is empty: the watermark was stamped.
    TaskUsageEmpty,
    /// The watermark lags by no more than lagThreshold: it was stamped.
    WatermarkWithinThreshold,
}

/// The session holding advisory lock 4246, from pg_locks / pg_stat_activity.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(default, rename_all = "camelCase")]
pub struct LockHolder {
    /// Backend process id of the holding session.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<i32>,

    /// Its application_name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub application_name: Option<String>,

    /// Its client address, if it connected over the network.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<String>,

    /// When the holder's current transaction or, failing that, its session
    /// began: a lower bound of how long it has held the lock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
}

/// How the walk of a run went.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(default, rename_all = "camelCase")]
pub struct PerformanceStatus {
    /// Database sessions that ran window calls (1 = serial).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sessions: Option<u32>,

    /// plan_cache_mode kept after timing the largest slices under each mode
    /// (tuning preset Tuned); absent when not measured or inconclusive.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub plan_cache_mode: Option<String>,

    /// work_mem kept after timing one slice at the alternative (4MB)
    /// against the winning plan probe at the tuned default (64MB);
    /// absent when not measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub work_mem: Option<String>,

    /// enable_nestloop kept after timing one small slice with nested loops
    /// allowed ("on") against the settings then in force ("off");
    /// absent when not measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enable_nestloop: Option<String>,

    /// Window calls run again after a deadlock or serialization failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice_retries: Option<i64>,

    /// Median duration of a window call (one slice) in the last attempt,
    /// in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice_median_millis: Option<i64>,

    /// Longest window call in the last attempt, in milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice_max_millis: Option<i64>,

    /// How many events a slice took, chosen by timing the walk's own
    /// slices at several widths (tuning preset Tuned without
    /// maxSliceDuration); absent when not measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice_width: Option<SliceWidthStatus>,
}

/// The slice width a walk measured and kept.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SliceWidthStatus {
    /// Events per slice kept: the width with the lowest time per event.
    pub events_per_slice: i64,

    /// Every width that ran, narrowest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub measured: Vec<SliceWidthMeasurement>,

    /// What trying the slower widths cost beyond the kept one, in
    /// milliseconds: each width's first slice, but not the width a walk
    /// starts at (the probes' width, else a month's; after its settings
    /// changed, the width kept before).
    pub explore_millis: i64,
}

/// One width as measured: its slices, their events and their time.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SliceWidthMeasurement {
    /// The events a slice of this width aims at.
    pub events_per_slice: i64,
    /// Slices that came out at about this width.
    pub slices: i64,
    /// The events of those slices together.
    pub events: i64,
    /// Their window calls' time together, in milliseconds.
    pub millis: i64,
}

/// task_usage rows dated beyond the database clock.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(default, rename_all = "camelCase")]
pub struct FutureEvents {
    /// How many rows have COALESCE(updated_at, created_at) after now().
    pub rows: i64,

    /// How far the latest of them is ahead of now(), in seconds.
    pub max_ahead_seconds: i64,

    /// The latest of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latest: Option<Time>,
}
