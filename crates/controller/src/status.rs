//! Pure builders of the UsageBackfill status. The phase and the kstatus
//! conditions of each state are [`RunState::record`]'s (the table is in
//! `usage_backfill_api::run_state`); the builders add the counts, times and
//! messages of the state from the engine's events and outcome.
//!
//! Every builder sets `observedGeneration` and `runId` to the run the
//! status describes. The controller always sends the complete status
//! (server-side apply drops what a manager stops sending), so these
//! functions return whole statuses, starting from the previous one only
//! where it describes the same run. Messages pass through a [`Redactor`]:
//! the engine already scrubs the password, this is the second line.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::convert;
use super::decide::{Identity, SecretProblem, Start, StartKind};
use usage_backfill_api::{
    BackfillResult, ConditionType, PerformanceStatus, Phase, Reason, RunState, SpecError,
    UsageBackfillStatus as Status,
};
use usage_backfill_engine::{self as engine, Event, Outcome};

/// Longest condition message or lastError kept (the apiserver allows 32 KiB).
const MAX_MESSAGE: usize = 2048;

/// Removes a DSN's password from text, in every spelling found in the DSN.
#[derive(Clone, Default)]
pub struct Redactor {
    words: Vec<String>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Redactor({} words)", self.words.len())
    }
}

impl Redactor {
    /// Everything in `dsn` that is, or may be, its password: the parsed
    /// password, the raw and percent-decoded URL password, the raw and
    /// unquoted `password=` value. Works on DSNs that do not parse, too.
    pub fn for_dsn(dsn: &str) -> Self {
        let mut words = engine::password_candidates(dsn);
        // Longest first, so that no shorter word splits a longer one.
        words.sort_by_key(|w| std::cmp::Reverse(w.len()));
        words.dedup();
        Redactor { words }
    }

    /// A password of the connection in parts, as read from its Secret
    /// (and trimmed, as a server might echo it).
    pub fn for_password(password: &[u8]) -> Self {
        let raw = String::from_utf8_lossy(password).into_owned();
        let mut words = vec![raw.trim().to_owned(), raw];
        words.retain(|w| !w.is_empty());
        words.sort_by_key(|w| std::cmp::Reverse(w.len()));
        words.dedup();
        Redactor { words }
    }

    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for w in &self.words {
            if out.contains(w.as_str()) {
                out = out.replace(w.as_str(), "****");
            }
        }
        out
    }

    /// Redacted and bounded, fit for a condition message.
    pub fn message(&self, text: &str) -> String {
        truncate(self.redact(text))
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_MESSAGE {
        let mut end = MAX_MESSAGE - 3;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn time(ts: Timestamp) -> Time {
    Time(ts)
}

/// UTC, to the second: how times read in messages.
fn show(ts: Timestamp) -> String {
    jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", ts).unwrap_or_else(|_| ts.to_string())
}

fn count(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A status for `id` with nothing but the condition history of `prev`
/// (kept so that lastTransitionTime moves only on flips).
fn fresh(prev: &Status, id: &Identity) -> Status {
    Status {
        observed_generation: id.generation,
        run_id: Some(id.run_id.clone()),
        conditions: prev.conditions.clone(),
        ..Status::default()
    }
}

/// `prev` when it describes `id`, else [`fresh`].
fn continuing(prev: &Status, id: &Identity) -> Status {
    if id.is_described_by(prev) {
        prev.clone()
    } else {
        fresh(prev, id)
    }
}

/// Records `state` with `message` as the status of every condition.
fn record(s: &mut Status, state: RunState, message: &str, now: Timestamp) {
    state.record(s, message, &time(now));
}

/// A terminal failure: no lock holder to show any more.
fn terminal(s: &mut Status, reason: Reason, message: &str, now: Timestamp) {
    s.lock_holder = None;
    record(s, RunState::Failed(reason), message, now);
}

/// The spec failed validation: terminal until the spec changes.
pub(crate) fn invalid_spec(
    prev: &Status,
    id: &Identity,
    error: &SpecError,
    now: Timestamp,
) -> Status {
    let mut s = fresh(prev, id);
    terminal(
        &mut s,
        Reason::InvalidSpec,
        &truncate(error.to_string()),
        now,
    );
    s
}

/// A Secret is missing or lacks its key: waiting, not failing.
pub(crate) fn secret_problem(
    prev: &Status,
    id: &Identity,
    problem: &SecretProblem,
    now: Timestamp,
) -> Status {
    let mut s = continuing(prev, id);
    s.lock_holder = None;
    let message = format!("{problem}; the run starts once it is there");
    record(
        &mut s,
        RunState::WaitingForSecret(problem.reason()),
        &message,
        now,
    );
    s
}

/// The Secret's connection string or TLS settings cannot be used: terminal
/// until the spec or the Secret changes.
pub(crate) fn unusable_secret(
    prev: &Status,
    id: &Identity,
    error: &engine::Error,
    versions: &str,
    redactor: &Redactor,
    now: Timestamp,
) -> Status {
    let mut s = fresh(prev, id);
    let message = redactor.message(&format!(
        "{error} (fix the database Secret or spec.database; a change to either retries)"
    ));
    s.last_error = Some(redactor.message(&error.to_string()));
    s.secret_resource_versions = Some(versions.to_owned());
    s.finished_at = Some(time(now));
    terminal(&mut s, convert::reason(error), &message, now);
    s
}

/// spec.suspend: no run starts.
pub(crate) fn suspended(prev: &Status, id: &Identity, now: Timestamp) -> Status {
    let mut s = fresh(prev, id);
    let message = "spec.suspend is true: no run starts until it is false";
    record(&mut s, RunState::Suspended, message, now);
    s
}

/// The status written just before a run task starts.
pub(crate) fn starting(
    prev: &Status,
    id: &Identity,
    start: &Start,
    versions: &str,
    settings: &[(String, String)],
    now: Timestamp,
) -> Status {
    let mut s = match start.kind {
        StartKind::New => fresh(prev, id),
        _ => continuing(prev, id),
    };
    s.attempts = Some(start.attempt);
    s.secret_resource_versions = Some(versions.to_owned());
    s.settings = settings.iter().cloned().collect::<BTreeMap<_, _>>();
    s.lock_holder = None;
    s.finished_at = None;
    s.heartbeat_time = Some(time(now));
    if s.started_at.is_none() || start.kind == StartKind::New {
        s.started_at = Some(time(now));
    }
    let at = |r: &Option<engine::Resume>| match r {
        Some(r) => format!(", resuming at {}", show(r.cursor)),
        None => String::new(),
    };
    let message = match start.kind {
        StartKind::New => format!("starting attempt 1 of {}", start.max_attempts),
        StartKind::Retry => format!(
            "starting attempt {} of {}{}",
            start.attempt,
            start.max_attempts,
            at(&start.resume)
        ),
        StartKind::Restart => format!(
            "continuing attempt {} of {} after a controller restart{}",
            start.attempt,
            start.max_attempts,
            at(&start.resume)
        ),
        StartKind::SecretChanged => format!(
            "the Secret changed: starting attempt 1 of {}{}",
            start.max_attempts,
            at(&start.resume)
        ),
    };
    record(&mut s, RunState::Starting, &message, now);
    s
}

/// A starting status whose run is offered the progress another object
/// left for its database (`note`, [`crate::progress::Record::describe`]).
pub(crate) fn offered_progress(s: &mut Status, note: &str, now: Timestamp) {
    let message = format!("{}, {note}", s.message(ConditionType::Reconciling));
    record(s, RunState::Starting, &message, now);
}

/// How much an engine event changed the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Change {
    None,
    /// Counts moved: worth a (throttled) write.
    Progress,
    /// The phase or the plan changed: write now.
    Phase,
}

/// Folds one engine event into the status of a run in progress.
pub(crate) fn apply_event(s: &mut Status, event: &Event, now: Timestamp) -> Change {
    match event {
        Event::Connected { .. } => Change::None,
        Event::SliceStarted { slice } => {
            // The last slice ends at the clock read just before it, after
            // the end planned at the start: `to` follows, so the cursor it
            // reports never passes `to`.
            if s.to.as_ref().is_some_and(|to| to.0 < slice.to) {
                s.to = Some(time(slice.to));
            }
            Change::None
        }
        Event::WaitingForLock { holder } => {
            s.lock_holder = holder.as_ref().map(convert::lock_holder);
            let message = waiting_message(holder.as_ref());
            record(s, RunState::WaitingForLock, &message, now);
            Change::Phase
        }
        Event::LockAcquired { waited_ms } => {
            s.lock_holder = None;
            let message = if *waited_ms > 0 {
                format!(
                    "advisory lock 4246 acquired after {}",
                    usage_backfill_limits::duration::format(Duration::from_millis(*waited_ms))
                )
            } else {
                "advisory lock 4246 acquired".to_owned()
            };
            record(s, RunState::Running, &message, now);
            Change::Phase
        }
        Event::Planned {
            from,
            to,
            slices_total,
        } => {
            s.lock_holder = None;
            // Another start than the cursor's walk: the engine did not use
            // that cursor, and the slices before it are not this walk's.
            if s.from.as_ref().is_some_and(|f| f.0 != *from) {
                s.cursor = None;
                s.slices_processed = None;
                s.rows_touched = None;
            }
            s.from = Some(time(*from));
            s.to = Some(time(*to));
            let done = s.slices_processed.unwrap_or(0);
            s.set_slices(done, count(*slices_total));
            if s.rows_touched.is_none() {
                s.rows_touched = Some(0);
            }
            let message = format!(
                "walking {} slices from {} to {} ({} done)",
                slices_total,
                show(*from),
                show(*to),
                done
            );
            record(s, RunState::Running, &message, now);
            Change::Phase
        }
        Event::SlicePlanned(planned) => {
            let done = s.slices_processed.unwrap_or(0).saturating_add(1);
            let total = s.slices_total.unwrap_or(done).max(done);
            s.set_slices(done, total);
            s.rows_touched = Some(s.rows_touched.unwrap_or(0) + planned.estimated_events);
            Change::Progress
        }
        Event::SliceDone {
            slice,
            rows,
            slices_processed,
            slices_total,
            rows_touched,
            cursor,
            ..
        } => {
            s.set_slices(count(*slices_processed), count(*slices_total));
            s.rows_touched = Some(*rows_touched);
            s.cursor = Some(time(*cursor));
            let message = format!(
                "slice {}/{} done: [{}, {}) touched {} rows; {} rows so far",
                slices_processed,
                slices_total,
                show(slice.from),
                show(slice.to),
                rows,
                rows_touched
            );
            record(s, RunState::Running, &message, now);
            Change::Progress
        }
        Event::Stamped { watermark } => {
            s.watermark_stamped = Some(watermark.is_some());
            s.watermark_after = watermark.map(time);
            Change::Progress
        }
    }
}

fn waiting_message(holder: Option<&engine::LockHolder>) -> String {
    let Some(h) = holder else {
        return "waiting for advisory lock 4246, held by a session this role cannot see".into();
    };
    let mut m = format!("waiting for advisory lock 4246, held by pid {}", h.pid);
    if let Some(app) = &h.application_name {
        m += &format!(" ({app})");
    }
    if let Some(addr) = &h.client_addr {
        m += &format!(" from {addr}");
    }
    if let Some(since) = h.since {
        m += &format!(", session started {}", show(since));
    }
    m
}

/// Refreshes heartbeatTime; every write of a run in progress does.
pub(crate) fn heartbeat(s: &mut Status, now: Timestamp) {
    s.heartbeat_time = Some(time(now));
}

/// The status of a successful run.
pub(crate) fn succeeded(prev: &Status, outcome: &Outcome, now: Timestamp) -> Status {
    let mut s = prev.clone();
    let skipped = outcome.skipped.map(convert::skip_reason);
    let result = match (skipped, outcome.dry_run) {
        (Some(_), _) => BackfillResult::Skipped,
        (None, true) => BackfillResult::DryRun,
        (None, false) => BackfillResult::Backfilled,
    };
    s.result = Some(result);
    s.skipped = skipped;
    if outcome.dry_run && skipped.is_none() {
        let planned = count(outcome.planned.len() as u64);
        s.set_slices(planned, count(outcome.slices_total).max(planned));
        s.rows_touched = Some(outcome.planned.iter().map(|p| p.estimated_events).sum());
        s.cursor = None;
    } else {
        s.set_slices(count(outcome.slices_processed), count(outcome.slices_total));
        s.rows_touched = Some(outcome.rows_touched);
        s.cursor = outcome.cursor.map(time);
    }
    s.from = outcome.from.map(time);
    s.to = outcome.to.map(time);
    s.walk_end = outcome.walk_end.map(time);
    s.watermark_stamped = Some(outcome.watermark_stamped);
    s.watermark_before = outcome.watermark_before.map(time);
    // Unstamped, the watermark is what it was before the run.
    s.watermark_after = outcome
        .watermark_after
        .or(if outcome.watermark_stamped {
            None
        } else {
            outcome.watermark_before
        })
        .map(time);
    s.max_event = outcome.max_event.map(time);
    s.lag_seconds = outcome.lag_seconds;
    s.future_events = outcome.future_events.as_ref().map(convert::future_events);
    s.settings = outcome.settings.iter().cloned().collect();
    s.performance = performance(outcome);
    s.warnings = outcome.warnings.clone();
    s.lock_holder = None;
    s.last_error = None;
    s.finished_at = Some(time(now));
    s.heartbeat_time = Some(time(now));
    let message = success_message(outcome, &s);
    record(&mut s, RunState::Succeeded(result), &message, now);
    s
}

/// Present when the run walked slices (not for a skip or a dry run).
fn performance(outcome: &Outcome) -> Option<PerformanceStatus> {
    let stats = outcome.slice_stats?;
    let millis = |ms: u64| Some(i64::try_from(ms).unwrap_or(i64::MAX));
    Some(PerformanceStatus {
        sessions: Some(outcome.sessions),
        plan_cache_mode: outcome
            .tuning
            .as_ref()
            .and_then(|t| t.plan_cache_mode.clone()),
        work_mem: outcome.tuning.as_ref().and_then(|t| t.work_mem.clone()),
        enable_nestloop: outcome
            .tuning
            .as_ref()
            .and_then(|t| t.enable_nestloop.clone()),
        slice_retries: Some(i64::try_from(outcome.slice_retries).unwrap_or(i64::MAX)),
        slice_median_millis: millis(stats.median_ms),
        slice_max_millis: millis(stats.max_ms),
        slice_width: outcome
            .tuning
            .as_ref()
            .and_then(|t| t.slice_width.as_ref())
            .map(convert::slice_width),
    })
}

fn success_message(outcome: &Outcome, s: &Status) -> String {
    let stamped = match outcome.watermark_after {
        Some(w) if outcome.watermark_stamped => format!("watermark stamped at {}", show(w)),
        _ => "watermark not stamped".to_owned(),
    };
    let range = match (outcome.from, outcome.to) {
        (Some(f), Some(t)) => format!(" from {} to {}", show(f), show(t)),
        _ => String::new(),
    };
    // A skip that stamps first rolls up the window from the old watermark
    // to the stamp (the tick's own work), so that no event is passed over.
    let rolled_up = match outcome.slices_processed {
        0 => String::new(),
        _ => format!("rolled up{range} ({} rows), ", outcome.rows_touched),
    };
    match outcome.skipped {
        Some(engine::SkipReason::RollupStateMissing) => {
            "skipped (rollup_state_missing): table task_usage_hourly_rollup_state does not exist; nothing done".into()
        }
        Some(engine::SkipReason::TaskUsageEmpty) => {
            format!("skipped (task_usage_empty): task_usage is empty; {rolled_up}{stamped}")
        }
        Some(engine::SkipReason::WatermarkWithinThreshold) => format!(
            "skipped (watermark_within_threshold): the watermark lags the newest event by {}s, within the threshold; {rolled_up}{stamped}",
            outcome.lag_seconds.unwrap_or(0)
        ),
        None if outcome.dry_run => format!(
            "dry run: would walk {} slices{range} (about {} task_usage rows); nothing written",
            s.slices_total.unwrap_or(0),
            s.rows_touched.unwrap_or(0)
        ),
        None => format!(
            "backfilled {} slices{range}, {} rows touched; {stamped}",
            outcome.slices_processed, outcome.rows_touched
        ),
    }
}

/// A failed attempt that will be retried after `delay`.
pub(crate) fn retry_scheduled(
    s: &mut Status,
    error: &engine::Error,
    delay: Duration,
    redactor: &Redactor,
    now: Timestamp,
) {
    let attempt = s.attempts.unwrap_or(1);
    s.lock_holder = None;
    s.last_error = Some(redactor.message(&error.to_string()));
    s.finished_at = Some(time(now));
    s.heartbeat_time = Some(time(now));
    let message = redactor.message(&format!(
        "attempt {attempt} failed, retrying in {}: {error}",
        usage_backfill_limits::duration::format(delay)
    ));
    record(
        s,
        RunState::RetryScheduled(convert::reason(error)),
        &message,
        now,
    );
}

/// A failed attempt that is final: `reason` from [`crate::decide::after_failure`].
pub(crate) fn failed(
    s: &mut Status,
    error: &engine::Error,
    reason: Reason,
    max_attempts: u32,
    redactor: &Redactor,
    now: Timestamp,
) {
    s.last_error = Some(redactor.message(&error.to_string()));
    s.finished_at = Some(time(now));
    s.heartbeat_time = Some(time(now));
    let message = if reason == Reason::BackoffLimitExceeded {
        format!(
            "{max_attempts} attempts failed (backoffLimit {}); last error ({}): {error}",
            max_attempts.saturating_sub(1),
            convert::reason(error)
        )
    } else {
        error.to_string()
    };
    terminal(s, reason, &redactor.message(&message), now);
}

/// The controller stops while the run is in flight: the phase stays, so
/// that the next controller resumes from the cursor.
pub(crate) fn interrupted(s: &mut Status, now: Timestamp) {
    s.heartbeat_time = Some(time(now));
    s.lock_holder = None;
    let at = match &s.cursor {
        Some(c) => format!("resumes at {}", show(c.0)),
        None => "starts again".to_owned(),
    };
    let message = format!(
        "the controller stopped during the run (lock released, nothing stamped); it {at} when the controller is back"
    );
    let state = match s.phase {
        Some(Phase::WaitingForLock) => RunState::WaitingForLock,
        Some(Phase::Running) => RunState::Running,
        _ => RunState::Starting,
    };
    record(s, state, &message, now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::VariantArray;
    use usage_backfill_api::{ConditionType, SliceWidthMeasurement, SliceWidthStatus};

    use crate::decide::{self, Backoff};

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const T0: &str = "2026-05-10T12:00:00Z";
    const T1: &str = "2026-05-10T12:05:00Z";

    fn id() -> Identity {
        Identity::new(4, "again")
    }

    fn cond(s: &Status, t: ConditionType) -> Option<(String, String)> {
        s.condition(t).map(|c| (c.status.clone(), c.reason.clone()))
    }

    fn conds(s: &Status) -> [Option<(String, String)>; 3] {
        std::array::from_fn(|i| cond(s, ConditionType::VARIANTS[i]))
    }

    fn is(status: &str, reason: &str) -> Option<(String, String)> {
        Some((status.into(), reason.into()))
    }

    /// observedGeneration on the status and on each condition.
    fn assert_observed(s: &Status, generation: i64) {
        assert_eq!(s.observed_generation, generation);
        for c in &s.conditions {
            assert_eq!(c.observed_generation, Some(generation), "{}", c.type_);
        }
        assert_eq!(s.run_id.as_deref(), Some("again"));
    }

    fn new_start() -> Start {
        Start {
            kind: StartKind::New,
            attempt: 1,
            max_attempts: 3,
            resume: None,
        }
    }

    fn settings() -> Vec<(String, String)> {
        vec![("enable_nestloop".into(), "off".into())]
    }

    fn started() -> Status {
        starting(
            &Status::default(),
            &id(),
            &new_start(),
            "7",
            &settings(),
            ts(T0),
        )
    }

    fn slice_done(n: u64, cursor: &str) -> Event {
        Event::SliceDone {
            slice: engine::Slice {
                from: ts("2026-01-01T00:00:00Z"),
                to: ts(cursor),
            },
            rows: 10,
            elapsed_ms: 3,
            slices_processed: n,
            slices_total: 3,
            rows_touched: 10 * n as i64,
            cursor: ts(cursor),
        }
    }

    fn outcome() -> Outcome {
        Outcome {
            slices_processed: 3,
            slices_total: 3,
            rows_touched: 30,
            from: Some(ts("2026-01-01T00:00:00Z")),
            to: Some(ts("2026-05-10T11:00:00Z")),
            cursor: Some(ts("2026-05-10T11:00:00Z")),
            watermark_stamped: true,
            watermark_before: Some(ts("1970-01-01T00:00:00Z")),
            watermark_after: Some(ts("2026-05-10T11:55:00Z")),
            walk_end: Some(ts("2026-05-10T11:55:00Z")),
            max_event: Some(ts("2026-04-30T00:00:00Z")),
            lag_seconds: Some(1_777_507_200),
            settings: settings(),
            ..Outcome::default()
        }
    }

    #[test]
    fn pending_is_reconciling_not_ready() {
        let s = started();
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(
            conds(&s),
            [is("False", "Pending"), is("True", "Pending"), None]
        );
        assert_observed(&s, 4);
        assert_eq!(s.attempts, Some(1));
        assert_eq!(s.started_at, Some(time(ts(T0))));
        assert_eq!(s.heartbeat_time, Some(time(ts(T0))));
        assert_eq!(s.secret_resource_versions.as_deref(), Some("7"));
        assert_eq!(
            s.settings.get("enable_nestloop").map(String::as_str),
            Some("off")
        );
    }

    #[test]
    fn waiting_for_lock_shows_the_holder() {
        let mut s = started();
        let holder = engine::LockHolder {
            pid: 4711,
            application_name: Some("pg_cron".into()),
            client_addr: Some("10.0.0.9".into()),
            since: Some(ts(T0)),
        };
        let change = apply_event(
            &mut s,
            &Event::WaitingForLock {
                holder: Some(holder),
            },
            ts(T1),
        );
        assert_eq!(change, Change::Phase);
        assert_eq!(s.phase, Some(Phase::WaitingForLock));
        assert_eq!(s.lock_holder.as_ref().unwrap().pid, Some(4711));
        assert_eq!(
            conds(&s),
            [
                is("False", "WaitingForLock"),
                is("True", "WaitingForLock"),
                None
            ]
        );
        let msg = &s.condition(ConditionType::Reconciling).unwrap().message;
        assert!(msg.contains("pid 4711 (pg_cron) from 10.0.0.9"), "{msg}");
        // Reconciling stayed True: its transition time did not move.
        assert_eq!(
            s.condition(ConditionType::Reconciling)
                .unwrap()
                .last_transition_time,
            time(ts(T0))
        );

        apply_event(&mut s, &Event::LockAcquired { waited_ms: 1500 }, ts(T1));
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(s.lock_holder, None);
    }

    #[test]
    fn running_tracks_plan_progress_and_cursor() {
        let mut s = started();
        apply_event(&mut s, &Event::LockAcquired { waited_ms: 0 }, ts(T0));
        let change = apply_event(
            &mut s,
            &Event::Planned {
                from: ts("2026-01-01T00:00:00Z"),
                to: ts("2026-05-10T11:00:00Z"),
                slices_total: 3,
            },
            ts(T0),
        );
        assert_eq!(change, Change::Phase);
        assert_eq!(s.progress.as_deref(), Some("0/3"));
        assert_eq!(
            apply_event(&mut s, &slice_done(2, "2026-03-01T00:00:00Z"), ts(T1)),
            Change::Progress
        );
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(s.progress.as_deref(), Some("2/3"));
        assert_eq!(s.rows_touched, Some(20));
        assert_eq!(s.cursor, Some(time(ts("2026-03-01T00:00:00Z"))));
        assert_eq!(
            conds(&s),
            [is("False", "Running"), is("True", "Running"), None]
        );
        assert_observed(&s, 4);
        // The last slice, its end read again just before it: `to` follows.
        let last = engine::Slice {
            from: ts("2026-05-01T00:00:00Z"),
            to: ts("2026-05-10T11:40:00Z"),
        };
        let change = apply_event(&mut s, &Event::SliceStarted { slice: last }, ts(T1));
        assert_eq!(change, Change::None);
        assert_eq!(s.to, Some(time(last.to)));
        assert_eq!(s.from, Some(time(ts("2026-01-01T00:00:00Z"))));
    }

    #[test]
    fn a_walk_from_another_start_drops_the_old_cursor_and_counts() {
        let plan = |from: &str| Event::Planned {
            from: ts(from),
            to: ts("2026-05-10T11:00:00Z"),
            slices_total: 5,
        };
        let mut s = started();
        apply_event(&mut s, &plan("2026-01-01T00:00:00Z"), ts(T0));
        apply_event(&mut s, &slice_done(2, "2026-03-01T00:00:00Z"), ts(T0));
        // The same start again (a retry the engine resumes): kept.
        apply_event(&mut s, &plan("2026-01-01T00:00:00Z"), ts(T1));
        assert_eq!(s.cursor, Some(time(ts("2026-03-01T00:00:00Z"))));
        assert_eq!(s.progress.as_deref(), Some("2/5"));
        // An older event moved the start back: the engine walks from it,
        // and a cursor of the other walk must not outlive the plan.
        apply_event(&mut s, &plan("2025-12-01T00:00:00Z"), ts(T1));
        assert_eq!(s.cursor, None);
        assert_eq!(
            (s.progress.as_deref(), s.rows_touched),
            (Some("0/5"), Some(0))
        );
    }

    #[test]
    fn an_offered_progress_is_named_in_the_starting_message() {
        let mut s = started();
        offered_progress(&mut s, "resuming at 2026-03-01T00:00:00Z with …", ts(T0));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(
            s.message(ConditionType::Reconciling),
            "starting attempt 1 of 3, resuming at 2026-03-01T00:00:00Z with …"
        );
    }

    #[test]
    fn success_is_ready_without_reconciling_or_stalled() {
        let mut s = started();
        apply_event(&mut s, &slice_done(2, "2026-03-01T00:00:00Z"), ts(T0));
        let done = succeeded(&s, &outcome(), ts(T1));
        assert_eq!(done.phase, Some(Phase::Succeeded));
        assert_eq!(done.result, Some(BackfillResult::Backfilled));
        assert_eq!(conds(&done), [is("True", "Backfilled"), None, None]);
        assert_observed(&done, 4);
        assert_eq!(done.progress.as_deref(), Some("3/3"));
        assert_eq!(done.rows_touched, Some(30));
        assert_eq!(done.watermark_after, Some(time(ts("2026-05-10T11:55:00Z"))));
        assert_eq!(done.walk_end, done.watermark_after);
        assert_eq!(done.watermark_stamped, Some(true));
        assert_eq!(done.finished_at, Some(time(ts(T1))));
        assert_eq!(done.last_error, None);
        assert_eq!(done.performance, None, "no slice times, no performance");
        let msg = &done.condition(ConditionType::Ready).unwrap().message;
        assert!(
            msg.starts_with("backfilled 3 slices from 2026-01-01T00:00:00Z"),
            "{msg}"
        );
    }

    #[test]
    fn a_walk_reports_its_sessions_plan_mode_and_slice_times() {
        let o = Outcome {
            sessions: 2,
            slice_retries: 1,
            slice_stats: engine::slice_stats(&[40, 10, 25]),
            tuning: Some(engine::TuningReport {
                preset: "default".into(),
                plan_cache_mode: Some("force_generic_plan".into()),
                probes: Vec::new(),
                work_mem: Some("4MB".into()),
                enable_nestloop: Some("off".into()),
                slice_width: Some(engine::WidthReport {
                    events_per_slice: 20_000,
                    levels: vec![
                        engine::WidthLevel {
                            events_per_slice: 10_000,
                            slices: 1,
                            events: 10_000,
                            elapsed_ms: 40,
                        },
                        engine::WidthLevel {
                            events_per_slice: 20_000,
                            slices: 2,
                            events: 40_000,
                            elapsed_ms: 35,
                        },
                    ],
                    explore_cost_ms: 22,
                }),
            }),
            ..outcome()
        };
        let done = succeeded(&started(), &o, ts(T1));
        assert_eq!(
            done.performance,
            Some(PerformanceStatus {
                sessions: Some(2),
                plan_cache_mode: Some("force_generic_plan".into()),
                work_mem: Some("4MB".into()),
                enable_nestloop: Some("off".into()),
                slice_retries: Some(1),
                slice_median_millis: Some(25),
                slice_max_millis: Some(40),
                slice_width: Some(SliceWidthStatus {
                    events_per_slice: 20_000,
                    measured: vec![
                        SliceWidthMeasurement {
                            events_per_slice: 10_000,
                            slices: 1,
                            events: 10_000,
                            millis: 40,
                        },
                        SliceWidthMeasurement {
                            events_per_slice: 20_000,
                            slices: 2,
                            events: 40_000,
                            millis: 35,
                        },
                    ],
                    explore_millis: 22,
                }),
            })
        );
        // A later run of a new spec starts without it.
        let again = starting(
            &done,
            &Identity::new(5, "again"),
            &new_start(),
            "7",
            &settings(),
            ts(T1),
        );
        assert_eq!(again.performance, None);
    }

    #[test]
    fn skips_and_dry_runs_are_successes_with_their_result() {
        for (reason, word) in [
            (
                engine::SkipReason::RollupStateMissing,
                "rollup_state_missing",
            ),
            (engine::SkipReason::TaskUsageEmpty, "task_usage_empty"),
            (
                engine::SkipReason::WatermarkWithinThreshold,
                "watermark_within_threshold",
            ),
        ] {
            let o = Outcome {
                skipped: Some(reason),
                watermark_stamped: reason != engine::SkipReason::RollupStateMissing,
                ..Outcome::default()
            };
            let done = succeeded(&started(), &o, ts(T1));
            assert_eq!(done.result, Some(BackfillResult::Skipped));
            assert_eq!(done.skipped.map(|r| r.as_str()), Some(word));
            assert_eq!(conds(&done), [is("True", "Skipped"), None, None]);
            let msg = &done.condition(ConditionType::Ready).unwrap().message;
            assert!(msg.starts_with(&format!("skipped ({word})")), "{msg}");
        }
        let o = Outcome {
            dry_run: true,
            slices_total: 2,
            watermark_before: Some(ts(T0)),
            planned: vec![
                engine::PlannedSlice {
                    slice: engine::Slice {
                        from: ts("2026-01-01T00:00:00Z"),
                        to: ts("2026-02-01T00:00:00Z"),
                    },
                    estimated_events: 5,
                },
                engine::PlannedSlice {
                    slice: engine::Slice {
                        from: ts("2026-02-01T00:00:00Z"),
                        to: ts("2026-03-01T00:00:00Z"),
                    },
                    estimated_events: 7,
                },
            ],
            ..Outcome::default()
        };
        let done = succeeded(&started(), &o, ts(T1));
        assert_eq!(done.result, Some(BackfillResult::DryRun));
        assert_eq!(done.progress.as_deref(), Some("2/2"));
        assert_eq!(done.rows_touched, Some(12));
        assert_eq!(done.watermark_stamped, Some(false));
        assert_eq!(
            done.watermark_after,
            Some(time(ts(T0))),
            "unchanged watermark"
        );
        assert_eq!(conds(&done), [is("True", "DryRun"), None, None]);
    }

    #[test]
    fn retryable_failure_is_reconciling_with_the_error_reason() {
        let mut s = started();
        apply_event(&mut s, &slice_done(1, "2026-02-01T00:00:00Z"), ts(T0));
        let e = engine::Error::Connect {
            kind: engine::ConnectFailure::Unreachable,
            target: "app@db:5432/app".into(),
            message: "connection refused".into(),
        };
        retry_scheduled(
            &mut s,
            &e,
            Duration::from_secs(10),
            &Redactor::default(),
            ts(T1),
        );
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(
            conds(&s),
            [
                is("False", "RetryScheduled"),
                is("True", "DatabaseUnreachable"),
                None
            ]
        );
        assert_eq!(s.finished_at, Some(time(ts(T1))));
        assert_eq!(
            s.cursor,
            Some(time(ts("2026-02-01T00:00:00Z"))),
            "kept for the resume"
        );
        assert_eq!(s.rows_touched, Some(10));
        assert!(
            s.last_error
                .as_ref()
                .unwrap()
                .contains("connection refused")
        );
        let msg = &s.condition(ConditionType::Reconciling).unwrap().message;
        assert!(
            msg.starts_with("attempt 1 failed, retrying in 10s: cannot connect"),
            "{msg}"
        );
        assert_observed(&s, 4);
    }

    #[test]
    fn terminal_failure_is_stalled_not_reconciling() {
        let mut s = started();
        s.attempts = Some(3);
        let e = engine::Error::Slice {
            slice: engine::Slice {
                from: ts("2026-01-01T00:00:00Z"),
                to: ts("2026-02-01T00:00:00Z"),
            },
            message: "ERROR: out of memory".into(),
        };
        let reason = match decide::after_failure(&e, 3, 3, Backoff::default()) {
            decide::AfterFailure::Terminal { reason } => reason,
            other => panic!("{other:?}"),
        };
        failed(&mut s, &e, reason, 3, &Redactor::default(), ts(T1));
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(
            conds(&s),
            [
                is("False", "BackoffLimitExceeded"),
                None,
                is("True", "BackoffLimitExceeded")
            ]
        );
        let msg = &s.condition(ConditionType::Stalled).unwrap().message;
        assert!(
            msg.starts_with("3 attempts failed (backoffLimit 2); last error (SliceFailed): slice"),
            "{msg}"
        );
        assert_observed(&s, 4);

        let mut s = started();
        failed(
            &mut s,
            &engine::Error::WatermarkMissing,
            Reason::ManualInterventionRequired,
            3,
            &Redactor::default(),
            ts(T1),
        );
        assert_eq!(
            conds(&s),
            [
                is("False", "ManualInterventionRequired"),
                None,
                is("True", "ManualInterventionRequired")
            ]
        );
    }

    #[test]
    fn invalid_spec_is_stalled_for_the_new_generation() {
        let done = succeeded(&started(), &outcome(), ts(T0));
        let next = Identity::new(5, "again");
        let e = SpecError::Invalid {
            field: "monthsBack",
            problem: "applies to mode Always only".into(),
        };
        let s = invalid_spec(&done, &next, &e, ts(T1));
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(s.observed_generation, 5);
        assert_eq!(s.rows_touched, None, "counts of the old run are gone");
        assert_eq!(
            conds(&s),
            [is("False", "InvalidSpec"), None, is("True", "InvalidSpec")]
        );
        assert_eq!(
            s.condition(ConditionType::Stalled).unwrap().message,
            "spec.monthsBack: applies to mode Always only"
        );
        // Ready flipped True -> False: its transition time moved.
        assert_eq!(
            s.condition(ConditionType::Ready)
                .unwrap()
                .last_transition_time,
            time(ts(T1))
        );
    }

    #[test]
    fn secret_problems_and_suspend() {
        let p = SecretProblem::NotFound {
            name: "app-db".into(),
        };
        let s = secret_problem(&Status::default(), &id(), &p, ts(T0));
        assert_eq!(s.phase, Some(Phase::Pending));
        assert_eq!(
            conds(&s),
            [
                is("False", "SecretNotFound"),
                is("True", "SecretNotFound"),
                None
            ]
        );
        assert!(
            s.condition(ConditionType::Reconciling)
                .unwrap()
                .message
                .starts_with("Secret \"app-db\" does not exist in this namespace")
        );
        // Rebuilding from itself changes nothing (no write loop).
        assert_eq!(secret_problem(&s, &id(), &p, ts(T1)), s);

        let s = suspended(&Status::default(), &id(), ts(T0));
        assert_eq!(
            conds(&s),
            [is("False", "Suspended"), is("False", "Suspended"), None]
        );
        assert_observed(&s, 4);
        assert_eq!(suspended(&s, &id(), ts(T1)), s);
    }

    #[test]
    fn retries_and_restarts_keep_counts_new_runs_reset_them() {
        let mut s = started();
        let planned = Event::Planned {
            from: ts("2026-01-01T00:00:00Z"),
            to: ts("2026-05-10T11:00:00Z"),
            slices_total: 3,
        };
        apply_event(&mut s, &planned, ts(T0));
        apply_event(&mut s, &slice_done(2, "2026-03-01T00:00:00Z"), ts(T0));
        let resume = decide::resume_point(&s);
        let retry = Start {
            kind: StartKind::Retry,
            attempt: 2,
            max_attempts: 3,
            resume,
        };
        let r = starting(&s, &id(), &retry, "7", &settings(), ts(T1));
        assert_eq!(r.attempts, Some(2));
        assert_eq!(r.rows_touched, Some(20));
        assert_eq!(
            r.started_at,
            Some(time(ts(T0))),
            "the run started with attempt 1"
        );
        let msg = &r.condition(ConditionType::Reconciling).unwrap().message;
        assert_eq!(
            msg,
            "starting attempt 2 of 3, resuming at 2026-03-01T00:00:00Z"
        );

        let n = starting(
            &s,
            &Identity::new(5, "again"),
            &new_start(),
            "7",
            &[],
            ts(T1),
        );
        assert_eq!(
            (n.rows_touched, n.cursor.clone(), n.attempts),
            (None, None, Some(1))
        );
        assert_eq!(n.observed_generation, 5);
    }

    #[test]
    fn interrupted_keeps_the_phase_and_cursor_for_the_next_controller() {
        let mut s = started();
        apply_event(&mut s, &slice_done(2, "2026-03-01T00:00:00Z"), ts(T0));
        interrupted(&mut s, ts(T1));
        assert_eq!(s.phase, Some(Phase::Running));
        assert_eq!(s.cursor, Some(time(ts("2026-03-01T00:00:00Z"))));
        assert_eq!(
            conds(&s),
            [is("False", "Running"), is("True", "Running"), None]
        );
        assert_eq!(s.heartbeat_time, Some(time(ts(T1))));
    }

    #[test]
    fn redactor_finds_passwords_in_every_spelling() {
        let url = "postgres://app:s3cr%40t@db.example:5432/app?sslmode=require";
        let r = Redactor::for_dsn(url);
        assert_eq!(
            r.redact("auth failed for app with s3cr@t (s3cr%40t)"),
            "auth failed for app with **** (****)"
        );
        let kv = r"host=db user=app password='it\'s secret' dbname=app";
        let r = Redactor::for_dsn(kv);
        assert_eq!(r.redact("pw: it's secret"), "pw: ****");
        assert_eq!(r.redact(r"raw: it\'s secret"), "raw: ****");
        let r = Redactor::for_dsn("host=db password=plain dbname=app");
        assert_eq!(r.redact("password=plain"), "password=****");
        // Unparseable DSNs still lose their password.
        let r = Redactor::for_dsn("postgres://u:hunter2@[bad");
        assert_eq!(r.redact("near hunter2"), "near ****");
        assert_eq!(Redactor::for_dsn("postgres://h/db").redact("x"), "x");
        assert_eq!(format!("{r:?}"), "Redactor(1 words)");
    }

    #[test]
    fn status_messages_are_scrubbed_of_the_password() {
        let r = Redactor::for_dsn("postgres://app:Tr0ub4dor@db/app");
        let e = engine::Error::Database {
            context: "reading",
            message: "server said Tr0ub4dor".into(),
        };
        let mut s = started();
        retry_scheduled(&mut s, &e, Duration::from_secs(1), &r, ts(T1));
        let text = serde_json::to_string(&s).unwrap();
        assert!(!text.contains("Tr0ub4dor"), "{text}");
        let mut s = started();
        failed(&mut s, &e, Reason::DatabaseError, 1, &r, ts(T1));
        assert!(!serde_json::to_string(&s).unwrap().contains("Tr0ub4dor"));
        let s = unusable_secret(
            &Status::default(),
            &id(),
            &engine::Error::InvalidConnectionString("near Tr0ub4dor".into()),
            "1",
            &r,
            ts(T1),
        );
        assert!(!serde_json::to_string(&s).unwrap().contains("Tr0ub4dor"));
        assert_eq!(
            conds(&s),
            [
                is("False", "InvalidConnectionString"),
                None,
                is("True", "InvalidConnectionString")
            ]
        );
    }

    #[test]
    fn long_messages_are_bounded() {
        let long = "é".repeat(5000);
        let m = Redactor::default().message(&long);
        assert!(m.len() <= MAX_MESSAGE && m.ends_with("..."));
    }
}
