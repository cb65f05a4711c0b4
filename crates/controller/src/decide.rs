//! The pure middle of a reconcile: from what was observed (the object, its
//! status, the run task of this process, the Secret lookup, the clock) to
//! one [`Action`]. No I/O here, so every branch is a plain `#[test]`.
//!
//! The status is the durable memory: which generation and runId it
//! describes (`observedGeneration`, `runId`), how far the run got
//! (`cursor` and counts), how many attempts failed and when (`attempts`,
//! `finishedAt`, the Ready reason `RetryScheduled`). So a restarted
//! controller takes the same decisions as the one before it: backoff
//! timings survive restarts, and a run the status calls Running is resumed
//! from its cursor instead of being started over.
//!
//! # Terminal or retryable
//!
//! | failure | reason | handling |
//! |---|---|---|
//! | Secret (connection string, a part of the connection, or CA) missing | `SecretNotFound` | wait, Reconciling=True; not an attempt, never exhausts backoffLimit; the Secret is read again every recheck interval (at once with the Secret watch), the run starts once it exists |
//! | Secret key missing, value empty or not UTF-8 | `SecretKeyMissing` | as above |
//! | spec invalid (cross-field rules, durations, names) | `InvalidSpec` | terminal: Failed, Stalled=True, until the spec changes |
//! | connection string unparseable, bad TLS settings | `InvalidConnectionString`, `InvalidTlsConfig` | terminal until the spec or the Secret changes |
//! | cannot connect: refused, DNS, timeout, TLS handshake, wrong password, unknown database | `DatabaseUnreachable`, `ConnectTimeout`, `TlsHandshakeFailed`, `AuthenticationFailed`, `DatabaseNotFound`, `ConnectFailed` | retryable with backoff (a rotated Secret or a database coming up fixes them) |
//! | lock 4246 not acquired within lockTimeout | `LockTimeout` | retryable |
//! | a slice failed or hit sliceTimeout, other database errors | `SliceFailed`, `SliceTimeout`, `DatabaseError` | retryable, resuming from the cursor |
//! | rollup schema missing, function missing, privileges missing | `RollupStateMissing`, `SchemaMissing`, `PermissionDenied` | terminal (a migration or a GRANT is needed) |
//! | a session setting the server refuses (spec.tuning.settings, `--set`) | `InvalidSessionSetting` | terminal until the spec changes |
//! | watermark NULL / state row missing | `ManualInterventionRequired` | terminal |
//! | monthsBack would skip history without forcePartial | `PartialRangeRefused` | terminal |
//! | future-dated events (writer clock skew) | `FutureDatedEvents` | terminal: every retry would walk everything and still fail the guard |
//! | a transaction- or statement-pooling pooler between us and PostgreSQL | `TransactionPooling` | terminal: lock 4246 guards nothing through it; refused before the lock, or by a slice's check |
//! | retryable failures, backoffLimit + 1 attempts made | `BackoffLimitExceeded` | terminal |
//!
//! Backoff before retry *n* (after *n* failed attempts) is
//! `base · 2^(n-1)`, capped (default 10 s, capped at 5 min), counted from
//! `finishedAt` of the failed attempt. A retry resumes from `status.cursor`
//! with the counts (the slices before it were committed). "Terminal"
//! means: until the spec changes (new generation) or, for a Failed run,
//! the referenced Secret's value changes (`secretDigest`), which starts a
//! fresh sequence of attempts at once.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use usage_backfill_api::{Phase, Reason, RunState, SpecError, UsageBackfillStatus, ValidSpec};
use usage_backfill_engine::{self as engine, Resume};

/// What a status describes: one run per generation and runId.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub generation: i64,
    pub run_id: String,
}

impl Identity {
    pub fn new(generation: i64, run_id: impl Into<String>) -> Self {
        Identity {
            generation,
            run_id: run_id.into(),
        }
    }

    /// Whether `status` describes this generation and runId.
    pub fn is_described_by(&self, status: &UsageBackfillStatus) -> bool {
        status.observed_generation == self.generation
            && status.run_id.as_deref().unwrap_or_default() == self.run_id
    }
}

/// Per-object exponential backoff between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(300),
        }
    }
}

impl Backoff {
    /// The wait after `failed` failed attempts: base · 2^(failed-1), capped.
    pub fn delay(&self, failed: u32) -> Duration {
        let exp = failed.saturating_sub(1).min(32);
        self.base
            .checked_mul(1u32 << exp.min(31))
            .unwrap_or(self.max)
            .min(self.max)
    }
}

/// The run task of this process for the object, if any.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskView {
    None,
    Active {
        identity: Identity,
    },
    /// Finished, but writing its final status or removing the finalizer
    /// failed; the reconcile finishes the job.
    Unsettled {
        identity: Identity,
        final_status: Option<Box<UsageBackfillStatus>>,
    },
}

/// Why a referenced Secret (connection string, a part of the connection in
/// parts, CA bundle) cannot be used yet. Names the Secret and key, never a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SecretProblem {
    #[error("Secret {name:?} does not exist in this namespace")]
    NotFound { name: String },
    #[error("Secret {name:?} has no key {key:?}")]
    KeyMissing { name: String, key: String },
    #[error("key {key:?} of Secret {name:?} is empty")]
    Empty { name: String, key: String },
    #[error("key {key:?} of Secret {name:?} is not UTF-8 text")]
    NotUtf8 { name: String, key: String },
}

impl SecretProblem {
    pub(crate) fn reason(&self) -> Reason {
        match self {
            SecretProblem::NotFound { .. } => Reason::SecretNotFound,
            _ => Reason::SecretKeyMissing,
        }
    }
}

/// What reading the referenced Secrets gave.
#[derive(Debug, Clone)]
pub(crate) enum SecretLookup {
    /// Not read: the spec is invalid or the object is being deleted.
    NotRead,
    /// Usable; `versions` and `digest` as in `status.secretResourceVersions`
    /// and `status.secretDigest`.
    Found {
        versions: String,
        digest: String,
    },
    Problem(SecretProblem),
    /// Present, but the connection string or TLS settings are unusable.
    Unusable {
        versions: String,
        digest: String,
        error: engine::Error,
    },
}

impl SecretLookup {
    fn digest(&self) -> Option<&str> {
        match self {
            SecretLookup::Found { digest, .. } | SecretLookup::Unusable { digest, .. } => {
                Some(digest)
            }
            _ => None,
        }
    }
}

/// Everything a decision depends on.
#[derive(Debug, Clone)]
pub(crate) struct Observed<'a> {
    /// metadata.generation and spec.runId now.
    pub identity: Identity,
    pub spec: Result<&'a ValidSpec, &'a SpecError>,
    pub status: &'a UsageBackfillStatus,
    pub deleting: bool,
    pub has_finalizer: bool,
    pub task: &'a TaskView,
    pub secret: &'a SecretLookup,
    pub now: Timestamp,
    pub backoff: Backoff,
}

/// How a run starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartKind {
    /// First attempt for this generation/runId.
    New,
    /// After a failed attempt's backoff.
    Retry,
    /// The status says a run was in flight, but no task runs it: the
    /// controller restarted. Not a new attempt.
    Restart,
    /// The Secret changed after failures: a fresh sequence of attempts.
    SecretChanged,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Start {
    pub kind: StartKind,
    /// 1-based attempt number, as stored in status.attempts.
    pub attempt: u32,
    /// backoffLimit + 1.
    pub max_attempts: u32,
    pub resume: Option<Resume>,
}

/// What a reconcile does.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Finished for this generation/runId, or nothing observable changed.
    NothingToDo,
    /// This process runs the current run; it reports by itself.
    Observe,
    StartRun(Start),
    /// A failed attempt waits this long before the next.
    WaitBackoff(Duration),
    ReportInvalid(SpecError),
    ReportSecretProblem(SecretProblem),
    /// The Secret's connection string or TLS settings are unusable: terminal.
    ReportUnusableSecret(engine::Error),
    Suspended,
    /// The running task belongs to an older generation/runId.
    CancelObsolete,
    CancelForDeletion,
    /// Deleting, no run: let the object go.
    RemoveFinalizer,
    /// Write the final status of a task whose own writes failed.
    SettleFinished,
}

/// The decision. See the module documentation for the rules.
pub(crate) fn decide(o: &Observed<'_>) -> Action {
    if o.deleting {
        return match o.task {
            TaskView::Active { .. } => Action::CancelForDeletion,
            _ if o.has_finalizer => Action::RemoveFinalizer,
            _ => Action::NothingToDo,
        };
    }
    match o.task {
        TaskView::Active { identity } if *identity == o.identity => return Action::Observe,
        TaskView::Active { .. } => return Action::CancelObsolete,
        TaskView::Unsettled { identity, .. } if *identity == o.identity => {
            return Action::SettleFinished;
        }
        _ => {}
    }
    let spec = match o.spec {
        Ok(spec) => spec,
        Err(e) => return Action::ReportInvalid(e.clone()),
    };
    let max_attempts = spec.backoff_limit.saturating_add(1);
    let state = Seen::of(o.status, &o.identity);
    // The value, not the Secret's resourceVersion: a label or another
    // controller's annotation must not restart a Failed run at attempt 1.
    let secret_changed = o.secret.digest().is_some_and(|d| {
        o.status
            .secret_digest
            .as_deref()
            .is_some_and(|old| old != d)
    });
    if let Seen::Finished(phase) = state {
        // Failed stays failed unless the Secret changed since, or the spec
        // now passes the validation it failed (a newer controller).
        let revisit = phase == Phase::Failed
            && (secret_changed
                || RunState::of(o.status) == Some(RunState::Failed(Reason::InvalidSpec)));
        if !revisit {
            return Action::NothingToDo;
        }
    }
    if spec.suspend {
        return Action::Suspended;
    }
    match o.secret {
        SecretLookup::Found { .. } => {}
        SecretLookup::Problem(p) => return Action::ReportSecretProblem(p.clone()),
        SecretLookup::Unusable { error, .. } => {
            return Action::ReportUnusableSecret(error.clone());
        }
        // The caller reads the Secrets whenever the spec is valid.
        SecretLookup::NotRead => return Action::NothingToDo,
    }
    let attempts = o.status.attempts.unwrap_or(0);
    let start = |kind, attempt| {
        Action::StartRun(Start {
            kind,
            attempt,
            max_attempts,
            resume: match kind {
                StartKind::New => None,
                _ => resume_point(o.status),
            },
        })
    };
    match state {
        Seen::Other => start(StartKind::New, 1),
        Seen::Finished(_) if secret_changed => start(StartKind::SecretChanged, 1),
        Seen::Finished(_) => start(StartKind::New, 1),
        Seen::InFlight => start(StartKind::Restart, attempts.max(1)),
        Seen::WaitingForSecret if attempts == 0 => start(StartKind::New, 1),
        Seen::WaitingForSecret => start(StartKind::Retry, attempts + 1),
        Seen::RetryPending if secret_changed => start(StartKind::SecretChanged, 1),
        Seen::RetryPending => {
            let due = retry_due(o.status, o.backoff);
            match due.map(|due| due.duration_since(o.now)) {
                Some(wait) if wait > SignedDuration::ZERO => {
                    Action::WaitBackoff(Duration::try_from(wait).unwrap_or(o.backoff.max))
                }
                _ => start(StartKind::Retry, attempts + 1),
            }
        }
    }
}

/// When the next attempt of a status waiting for its retry is due.
pub(crate) fn retry_due(status: &UsageBackfillStatus, backoff: Backoff) -> Option<Timestamp> {
    let finished = status.finished_at.as_ref()?.0;
    let delay = SignedDuration::try_from(backoff.delay(status.attempts.unwrap_or(1))).ok()?;
    finished.checked_add(delay).ok()
}

/// Where a status says the next attempt resumes, with the counts so far,
/// for the walk from `status.from` (the engine checks that the next walk
/// starts there too).
pub(crate) fn resume_point(status: &UsageBackfillStatus) -> Option<Resume> {
    Some(Resume {
        from: status.from.as_ref()?.0,
        database: None,
        cursor: status.cursor.as_ref()?.0,
        slices_processed: u64::from(status.slices_processed.unwrap_or(0)),
        rows_touched: status.rows_touched.unwrap_or(0),
    })
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    Retry {
        delay: Duration,
    },
    /// Give up; the Stalled reason.
    Terminal {
        reason: Reason,
    },
}

/// Classifies a failed attempt (number `attempt` of `max_attempts`).
pub(crate) fn after_failure(
    error: &engine::Error,
    attempt: u32,
    max_attempts: u32,
    backoff: Backoff,
) -> AfterFailure {
    if !error.is_retryable() {
        return AfterFailure::Terminal {
            reason: super::convert::reason(error),
        };
    }
    if attempt >= max_attempts {
        return AfterFailure::Terminal {
            reason: Reason::BackoffLimitExceeded,
        };
    }
    AfterFailure::Retry {
        delay: backoff.delay(attempt),
    }
}

/// What the status says about the run for `identity`, as far as deciding
/// goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    /// Describes another generation/runId, or nothing yet.
    Other,
    Finished(Phase),
    /// Running, waiting for the lock, or launched (attempts > 0, Pending).
    InFlight,
    RetryPending,
    WaitingForSecret,
}

impl Seen {
    fn of(status: &UsageBackfillStatus, identity: &Identity) -> Self {
        if !identity.is_described_by(status) {
            return Seen::Other;
        }
        if let Some(p) = status.phase.filter(|p| p.is_finished()) {
            return Seen::Finished(p);
        }
        match RunState::of(status) {
            Some(RunState::WaitingForLock | RunState::Running) => Seen::InFlight,
            Some(RunState::RetryScheduled(_)) => Seen::RetryPending,
            Some(RunState::WaitingForSecret(_)) => Seen::WaitingForSecret,
            Some(RunState::Suspended) => Seen::Other,
            _ if status.attempts.unwrap_or(0) > 0 => Seen::InFlight,
            _ => Seen::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status;
    use usage_backfill_api::UsageBackfillSpec;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const NOW: &str = "2026-05-10T12:00:00Z";

    fn valid() -> ValidSpec {
        UsageBackfillSpec::new("app-db").validate().unwrap()
    }

    fn id() -> Identity {
        Identity::new(3, "r1")
    }

    fn found() -> SecretLookup {
        SecretLookup::Found {
            versions: "100".into(),
            digest: "d100".into(),
        }
    }

    struct Case {
        spec: ValidSpec,
        status: UsageBackfillStatus,
        deleting: bool,
        has_finalizer: bool,
        task: TaskView,
        secret: SecretLookup,
        now: Timestamp,
    }

    impl Case {
        fn new(status: UsageBackfillStatus) -> Self {
            Case {
                spec: valid(),
                status,
                deleting: false,
                has_finalizer: false,
                task: TaskView::None,
                secret: found(),
                now: ts(NOW),
            }
        }

        fn decide(&self) -> Action {
            decide(&Observed {
                identity: id(),
                spec: Ok(&self.spec),
                status: &self.status,
                deleting: self.deleting,
                has_finalizer: self.has_finalizer,
                task: &self.task,
                secret: &self.secret,
                now: self.now,
                backoff: Backoff::default(),
            })
        }
    }

    fn start(action: Action) -> Start {
        match action {
            Action::StartRun(s) => s,
            other => panic!("expected StartRun, got {other:?}"),
        }
    }

    /// A status in flight for `id()` with a cursor and counts, as the runner
    /// leaves it after some slices.
    fn running(attempt: u32) -> UsageBackfillStatus {
        let begin = Start {
            kind: StartKind::New,
            attempt,
            max_attempts: 7,
            resume: None,
        };
        let mut s = status::starting(&Default::default(), &id(), &begin, "100", &[], ts(NOW));
        s.secret_digest = Some("d100".into());
        s.attempts = Some(attempt);
        status::apply_event(
            &mut s,
            &engine::Event::LockAcquired { waited_ms: 0 },
            ts(NOW),
        );
        status::apply_event(
            &mut s,
            &engine::Event::Planned {
                from: ts("2025-12-01T00:00:00Z"),
                to: ts("2026-06-01T00:00:00Z"),
                slices_total: 6,
            },
            ts(NOW),
        );
        status::apply_event(
            &mut s,
            &engine::Event::SliceDone {
                slice: engine::Slice {
                    from: ts("2026-01-01T00:00:00Z"),
                    to: ts("2026-02-01T00:00:00Z"),
                },
                rows: 40,
                elapsed_ms: 5,
                slices_processed: 2,
                slices_total: 6,
                rows_touched: 90,
                cursor: ts("2026-02-01T00:00:00Z"),
            },
            ts(NOW),
        );
        s
    }

    fn retry_pending(failed: u32, finished_at: &str) -> UsageBackfillStatus {
        let mut s = running(failed);
        let err = engine::Error::Slice {
            slice: engine::Slice {
                from: ts("2026-02-01T00:00:00Z"),
                to: ts("2026-03-01T00:00:00Z"),
            },
            message: "ERROR: boom".into(),
        };
        status::retry_scheduled(
            &mut s,
            &err,
            Backoff::default().delay(failed),
            &status::Redactor::default(),
            ts(finished_at),
        );
        s
    }

    #[test]
    fn backoff_doubles_from_the_base_and_is_capped() {
        let b = Backoff::default();
        let secs: Vec<u64> = (1..=8).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(secs, [10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(b.delay(0), Duration::from_secs(10));
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(300));
        let tiny = Backoff {
            base: Duration::from_millis(50),
            max: Duration::from_millis(120),
        };
        assert_eq!(tiny.delay(2), Duration::from_millis(100));
        assert_eq!(tiny.delay(3), Duration::from_millis(120));
    }

    #[test]
    fn a_fresh_object_starts_attempt_one_without_resume() {
        let s = start(Case::new(UsageBackfillStatus::default()).decide());
        assert_eq!(
            s,
            Start {
                kind: StartKind::New,
                attempt: 1,
                max_attempts: 7,
                resume: None
            }
        );
    }

    #[test]
    fn a_status_of_an_older_generation_or_run_id_means_a_new_run() {
        let mut old = running(2);
        old.phase = Some(Phase::Succeeded);
        old.observed_generation = 2;
        let s = start(Case::new(old.clone()).decide());
        assert_eq!((s.kind, s.attempt, s.resume), (StartKind::New, 1, None));

        old.observed_generation = 3;
        old.run_id = Some("r0".into());
        assert_eq!(start(Case::new(old).decide()).kind, StartKind::New);
    }

    #[test]
    fn finished_runs_are_left_alone() {
        for phase in [Phase::Succeeded, Phase::Failed] {
            let mut s = running(1);
            s.phase = Some(phase);
            assert_eq!(Case::new(s).decide(), Action::NothingToDo, "{phase:?}");
        }
    }

    #[test]
    fn a_changed_secret_restarts_a_failed_run_but_not_a_succeeded_one() {
        let mut failed = running(7);
        failed.phase = Some(Phase::Failed);
        let mut case = Case::new(failed.clone());
        case.secret = SecretLookup::Found {
            versions: "101".into(),
            digest: "d101".into(),
        };
        let s = start(case.decide());
        assert_eq!((s.kind, s.attempt), (StartKind::SecretChanged, 1));
        assert_eq!(s.resume.unwrap().cursor, ts("2026-02-01T00:00:00Z"));
        // Finding 2: a new resourceVersion with the same value (a label,
        // an annotation) leaves a Failed run failed.
        case.secret = SecretLookup::Found {
            versions: "102".into(),
            digest: "d100".into(),
        };
        assert_eq!(case.decide(), Action::NothingToDo);

        let mut ok = failed;
        ok.phase = Some(Phase::Succeeded);
        let mut case = Case::new(ok);
        case.secret = SecretLookup::Found {
            versions: "101".into(),
            digest: "d101".into(),
        };
        assert_eq!(case.decide(), Action::NothingToDo);
    }

    #[test]
    fn a_still_unusable_secret_is_reported_again_when_it_changed() {
        let err = engine::Error::InvalidConnectionString("expected a postgres:// URL".into());
        let mut failed = status::unusable_secret(
            &Default::default(),
            &id(),
            &err,
            "100",
            &status::Redactor::default(),
            ts(NOW),
        );
        failed.secret_digest = Some("d100".into());
        let mut case = Case::new(failed);
        case.secret = SecretLookup::Unusable {
            versions: "100".into(),
            digest: "d100".into(),
            error: err.clone(),
        };
        assert_eq!(case.decide(), Action::NothingToDo);
        case.secret = SecretLookup::Unusable {
            versions: "101".into(),
            digest: "d101".into(),
            error: err,
        };
        assert!(matches!(case.decide(), Action::ReportUnusableSecret(_)));
        case.secret = found();
        case.status.secret_digest = Some("d100".into());
        case.secret = SecretLookup::Found {
            versions: "102".into(),
            digest: "d102".into(),
        };
        assert_eq!(start(case.decide()).kind, StartKind::SecretChanged);
    }

    #[test]
    fn restart_resumes_from_the_cursor_with_the_counts_and_the_same_attempt() {
        for phase in [Phase::Running, Phase::WaitingForLock] {
            let mut s = running(2);
            s.phase = Some(phase);
            let got = start(Case::new(s).decide());
            assert_eq!(got.kind, StartKind::Restart);
            assert_eq!(got.attempt, 2);
            assert_eq!(
                got.resume,
                Some(Resume {
                    from: ts("2025-12-01T00:00:00Z"),
                    database: None,
                    cursor: ts("2026-02-01T00:00:00Z"),
                    slices_processed: 2,
                    rows_touched: 90
                })
            );
        }
        // Launched (attempts written) but the task never reported: in flight.
        let launched = status::starting(
            &Default::default(),
            &id(),
            &Start {
                kind: StartKind::New,
                attempt: 1,
                max_attempts: 7,
                resume: None,
            },
            "100",
            &[],
            ts(NOW),
        );
        let got = start(Case::new(launched).decide());
        assert_eq!(
            (got.kind, got.attempt, got.resume),
            (StartKind::Restart, 1, None)
        );
    }

    #[test]
    fn retries_wait_for_their_backoff_from_finished_at() {
        // Two failed attempts: the third waits 20 s after the second ended.
        let s = retry_pending(2, "2026-05-10T11:59:50Z");
        assert_eq!(
            Case::new(s.clone()).decide(),
            Action::WaitBackoff(Duration::from_secs(10))
        );
        let mut case = Case::new(s);
        case.now = ts("2026-05-10T12:00:10Z");
        let got = start(case.decide());
        assert_eq!(got.kind, StartKind::Retry);
        assert_eq!(got.attempt, 3);
        assert_eq!(got.resume.unwrap().rows_touched, 90);
    }

    #[test]
    fn a_changed_secret_cuts_the_backoff_short() {
        let mut case = Case::new(retry_pending(3, NOW));
        case.secret = SecretLookup::Found {
            versions: "105".into(),
            digest: "d105".into(),
        };
        let got = start(case.decide());
        assert_eq!((got.kind, got.attempt), (StartKind::SecretChanged, 1));
    }

    #[test]
    fn failures_are_classified_by_the_table() {
        let b = Backoff::default();
        let unreachable = engine::Error::Connect {
            kind: engine::ConnectFailure::Unreachable,
            target: "u@h:5432/db".into(),
            message: "connection refused".into(),
        };
        assert_eq!(
            after_failure(&unreachable, 1, 7, b),
            AfterFailure::Retry {
                delay: Duration::from_secs(10)
            }
        );
        assert_eq!(
            after_failure(&unreachable, 3, 7, b),
            AfterFailure::Retry {
                delay: Duration::from_secs(40)
            }
        );
        assert_eq!(
            after_failure(&unreachable, 7, 7, b),
            AfterFailure::Terminal {
                reason: Reason::BackoffLimitExceeded
            }
        );
        // backoffLimit 0: the first failure is final.
        assert_eq!(
            after_failure(&unreachable, 1, 1, b),
            AfterFailure::Terminal {
                reason: Reason::BackoffLimitExceeded
            }
        );
        let terminal = [
            (
                engine::Error::InvalidConnectionString("x".into()),
                "InvalidConnectionString",
            ),
            (
                engine::Error::WatermarkMissing,
                "ManualInterventionRequired",
            ),
            (
                engine::Error::TransactionPooling {
                    evidence: "a second connection ran on server backend pid 7".into(),
                    consequence: "nothing was written",
                },
                "TransactionPooling",
            ),
            (
                engine::Error::MonthsBackSkipsHistory {
                    months_back: 2,
                    start: ts(NOW),
                    earliest: ts(NOW),
                },
                "PartialRangeRefused",
            ),
            (
                engine::Error::FutureDatedEvents(engine::FutureEvents {
                    rows: 1,
                    latest: ts(NOW),
                    ahead_seconds: 7200,
                }),
                "FutureDatedEvents",
            ),
            (engine::Error::RollupStateMissing, "RollupStateMissing"),
        ];
        for (e, reason) in terminal {
            assert_eq!(
                after_failure(&e, 1, 7, b),
                AfterFailure::Terminal {
                    reason: reason.parse().unwrap()
                },
                "{e}"
            );
        }
        let lock = engine::Error::LockTimeout {
            waited: Duration::from_secs(1),
        };
        assert!(matches!(
            after_failure(&lock, 1, 7, b),
            AfterFailure::Retry { .. }
        ));
    }

    #[test]
    fn secret_problems_are_reported_not_attempted() {
        let mut case = Case::new(UsageBackfillStatus::default());
        case.secret = SecretLookup::Problem(SecretProblem::NotFound {
            name: "app-db".into(),
        });
        assert!(matches!(case.decide(), Action::ReportSecretProblem(_)));
        // Once it exists: the first attempt.
        let waiting = status::secret_problem(
            &Default::default(),
            &id(),
            &SecretProblem::NotFound {
                name: "app-db".into(),
            },
            ts(NOW),
        );
        let mut case = Case::new(waiting);
        assert_eq!(start(case.decide()).attempt, 1);
        // Vanished while a retry waited: the next attempt continues the count.
        case.status = status::secret_problem(
            &retry_pending(2, NOW),
            &id(),
            &SecretProblem::KeyMissing {
                name: "app-db".into(),
                key: "DATABASE_URL".into(),
            },
            ts(NOW),
        );
        let got = start(case.decide());
        assert_eq!((got.kind, got.attempt), (StartKind::Retry, 3));
    }

    #[test]
    fn invalid_spec_and_suspend_come_before_the_secret() {
        let err = SpecError::Invalid {
            field: "monthsBack",
            problem: "nope".into(),
        };
        let status = UsageBackfillStatus::default();
        let task = TaskView::None;
        let secret = SecretLookup::NotRead;
        let o = Observed {
            identity: id(),
            spec: Err(&err),
            status: &status,
            deleting: false,
            has_finalizer: false,
            task: &task,
            secret: &secret,
            now: ts(NOW),
            backoff: Backoff::default(),
        };
        assert_eq!(decide(&o), Action::ReportInvalid(err.clone()));

        let mut case = Case::new(UsageBackfillStatus::default());
        case.spec.suspend = true;
        case.secret = SecretLookup::Problem(SecretProblem::NotFound { name: "x".into() });
        assert_eq!(case.decide(), Action::Suspended);
    }

    #[test]
    fn a_failed_invalid_spec_status_is_revisited_once_the_spec_validates() {
        let s = status::invalid_spec(
            &Default::default(),
            &id(),
            &SpecError::Invalid {
                field: "x",
                problem: "y".into(),
            },
            ts(NOW),
        );
        assert_eq!(start(Case::new(s).decide()).kind, StartKind::New);
    }

    #[test]
    fn tasks_are_observed_or_cancelled() {
        let mut case = Case::new(running(1));
        case.task = TaskView::Active { identity: id() };
        assert_eq!(case.decide(), Action::Observe);
        case.task = TaskView::Active {
            identity: Identity::new(2, "r1"),
        };
        assert_eq!(case.decide(), Action::CancelObsolete);
        case.task = TaskView::Unsettled {
            identity: id(),
            final_status: None,
        };
        assert_eq!(case.decide(), Action::SettleFinished);
        case.task = TaskView::Unsettled {
            identity: Identity::new(2, "r1"),
            final_status: None,
        };
        assert_eq!(start(case.decide()).kind, StartKind::Restart);
    }

    #[test]
    fn deletion_cancels_then_lets_go() {
        let mut case = Case::new(running(1));
        case.deleting = true;
        case.has_finalizer = true;
        case.task = TaskView::Active { identity: id() };
        assert_eq!(case.decide(), Action::CancelForDeletion);
        case.task = TaskView::None;
        assert_eq!(case.decide(), Action::RemoveFinalizer);
        case.has_finalizer = false;
        assert_eq!(case.decide(), Action::NothingToDo);
    }
}
