//! The backfill engine: drives the application's rollup pipeline in
//! PostgreSQL exactly as the reference does (`docs/contract.md`), and
//! closes the reference's known gaps. It knows nothing of Kubernetes: the
//! controller and the CLI both call [`run`].
//!
//! Shape of a run: connect one dedicated session → check that it keeps one
//! server session to itself (no transaction-pooling pooler) → apply session
//! settings → read a snapshot → decide (module `plan`, pure) → check
//! the role's privileges → take advisory lock 4246 → walk the slices, one
//! window call (one transaction) each, each checking where the lock is, the
//! last ending five minutes before the database clock read under the lock →
//! stamp the watermark with that same instant → unlock. Progress is
//! reported through an [`Event`] callback, cancellation
//! through a [`CancellationToken`], and a run can resume from a cursor
//! ([`Resume`]).
//!
//! How fast it goes is [`Performance`]: planner settings for our sessions
//! (module `tuning`), historical slices on several sessions at once while the
//! lock session holds lock 4246 (module `parallel`), and slice widths from counts
//! and measured times (module `sizing`). `docs/performance.md` has the figures.
//! The modules are private: the crate root re-exports what other crates use.

mod dsn;
mod parallel;
mod plan;
mod session;
mod sizing;
mod tls;
mod tuning;
mod walk;
mod width;

use std::time::Duration;

use jiff::Timestamp;
use serde::Serialize;
pub use tokio_util::sync::CancellationToken;
use usage_backfill_limits::{DEFAULT_PARALLELISM, MAX_PARALLELISM, duration};

// What the binary, the controller, the tests and the benchmark use; the
// plan, sizing and session internals stay inside the crate.
pub use dsn::{ConnectionParts, Database, Password, TlsMode, password_candidates};
pub use plan::{Slice, add_months, month_floor};
pub use sizing::{SliceStats, stats as slice_stats};
pub use tuning::{
    DEFAULT_SETTINGS as DEFAULT_TUNING_SETTINGS, PlanProbe, Tuning, TuningReport,
    effective as effective_settings,
};
pub use walk::run;
pub use width::{WidthLevel, WidthReport};

/// The advisory lock every writer of `task_usage_hourly` takes.
pub const ADVISORY_LOCK_KEY: i64 = 4246;

/// Which reference behaviour to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// The migration-time hook: skip when the watermark is within
    /// `lag_threshold` of the newest event.
    IfLagging { lag_threshold: Duration },
    /// The full operator-command walk, unconditional. `months_back` > 0
    /// starts that many months before the current month.
    Always {
        months_back: u32,
        force_partial: bool,
    },
}

impl Default for Mode {
    fn default() -> Self {
        Mode::IfLagging {
            lag_threshold: Duration::from_secs(3600),
        }
    }
}

/// Where a previous attempt stopped; counts continue from it. The engine
/// uses it only for the walk it belongs to: one starting at `from`, on the
/// database `database` (when given); otherwise it walks from the start and
/// says so in [`Outcome::warnings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Resume {
    /// Start of the walk the cursor belongs to.
    pub from: Timestamp,
    /// The database the slices before the cursor were committed in, when
    /// known (a previous object's progress record); None is not checked
    /// (an attempt resuming its own object's cursor).
    pub database: Option<DatabaseIdentity>,
    /// Start of the first slice not yet committed.
    pub cursor: Timestamp,
    pub slices_processed: u64,
    pub rows_touched: i64,
}

/// Which database a session is on, as PostgreSQL itself tells: the
/// cluster's `system_identifier` (made by initdb, kept by physical copies
/// and replicas), its timeline (moved on by a point-in-time recovery and by
/// a promotion), and the database's oid (new when a database is dropped and
/// created again, or restored from a dump). The first two are None where
/// the role may not run `pg_control_system()` or `pg_control_checkpoint()`
/// (PUBLIC may by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DatabaseIdentity {
    pub system_identifier: Option<i64>,
    pub timeline: Option<i32>,
    pub database_oid: u32,
}

/// How to run.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub mode: Mode,
    /// Plan only: report slices and estimates, write nothing, stamp nothing.
    pub dry_run: bool,
    pub sleep_between_slices: Duration,
    /// How long to wait for lock 4246; None waits forever.
    pub lock_timeout: Option<Duration>,
    /// statement_timeout for each window call; None means no limit.
    pub slice_timeout: Option<Duration>,
    /// Session settings (`set_config(name, value, false)`) for the
    /// backfill's own session only, e.g. planner settings (against the
    /// nested-loop recompute).
    pub session_settings: Vec<(String, String)>,
    pub resume: Option<Resume>,
    /// How fast: tuning, parallel sessions, slice sizing.
    pub performance: Performance,
}

impl Options {
    /// The settings every backfill session gets: the tuning's, then
    /// `session_settings` (which win).
    pub fn effective_settings(&self) -> Vec<(String, String)> {
        tuning::effective(&self.performance.tuning.settings(), &self.session_settings)
    }
}

/// How fast a run goes; none of it changes what a run writes.
#[derive(Debug, Clone, PartialEq)]
pub struct Performance {
    /// Planner settings for the backfill's own sessions
    /// (`Options::session_settings` win over them).
    pub tuning: Tuning,
    /// Sessions running historical slices at once, the lock session
    /// included; 1 is the reference's serial walk on the lock session. The
    /// slice that reaches the present always runs alone, last.
    pub parallelism: u32,
    /// Optional target for one window call (one transaction): slices
    /// predicted longer, from the times measured so far, are split (for
    /// busy production databases). A target, not a limit: `slice_timeout`
    /// is the limit.
    pub max_slice_duration: Option<Duration>,
}

impl Default for Performance {
    fn default() -> Self {
        Performance {
            tuning: Tuning::Default,
            parallelism: DEFAULT_PARALLELISM,
            max_slice_duration: None,
        }
    }
}

impl Performance {
    /// The reference's way: one session, the server's planner settings.
    pub fn reference() -> Self {
        Performance {
            tuning: Tuning::Off,
            parallelism: 1,
            max_slice_duration: None,
        }
    }
}

/// Why a run did nothing; the words are the reference's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, strum::IntoStaticStr)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum SkipReason {
    RollupStateMissing,
    TaskUsageEmpty,
    WatermarkWithinThreshold,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The session holding lock 4246, from `pg_locks` and `pg_stat_activity`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LockHolder {
    pub pid: i32,
    pub application_name: Option<String>,
    pub client_addr: Option<String>,
    /// When the holder's session started (PostgreSQL does not record when
    /// a session-level advisory lock was granted).
    pub since: Option<Timestamp>,
}

/// Rows dated beyond what a stamp made now can cover (future-dated events).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FutureEvents {
    pub rows: i64,
    /// The latest COALESCE(updated_at, created_at).
    pub latest: Timestamp,
    /// How far `latest` is ahead of the database clock, in seconds.
    pub ahead_seconds: i64,
}

/// A slice of a dry run, with the number of events it would pick up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedSlice {
    #[serde(flatten)]
    pub slice: Slice,
    pub estimated_events: i64,
}

/// Progress, reported as it happens.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Connected {
        server_version: String,
        database: DatabaseIdentity,
    },
    WaitingForLock {
        holder: Option<LockHolder>,
    },
    LockAcquired {
        waited_ms: u64,
    },
    /// The walk is decided: `slices_total` includes slices of a resumed attempt.
    Planned {
        from: Timestamp,
        to: Timestamp,
        slices_total: u64,
    },
    SlicePlanned(PlannedSlice),
    SliceStarted {
        slice: Slice,
    },
    SliceDone {
        slice: Slice,
        rows: i64,
        elapsed_ms: u64,
        slices_processed: u64,
        slices_total: u64,
        rows_touched: i64,
        /// The resume point: the start of the next slice.
        cursor: Timestamp,
    },
    Stamped {
        watermark: Option<Timestamp>,
    },
}

/// What a run did, mirroring the reference Result plus read-back state.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Outcome {
    pub skipped: Option<SkipReason>,
    pub dry_run: bool,
    pub slices_processed: u64,
    pub slices_total: u64,
    pub rows_touched: i64,
    pub from: Option<Timestamp>,
    pub to: Option<Timestamp>,
    /// Start of the first slice not yet completed; equals `to` when done.
    pub cursor: Option<Timestamp>,
    /// The instant the walk ended at, and the watermark it stamped: the
    /// database clock read under the lock just before the last slice, minus
    /// five minutes. Writes committed while the walk ran are after it
    /// (queued or updated later), for the application's next tick (the
    /// last-slice drain).
    /// None when nothing was walked.
    pub walk_end: Option<Timestamp>,
    pub watermark_stamped: bool,
    pub watermark_before: Option<Timestamp>,
    pub watermark_after: Option<Timestamp>,
    pub max_event: Option<Timestamp>,
    /// max_event - watermark_before, in seconds, as read before the run.
    pub lag_seconds: Option<i64>,
    /// Only in `Always` mode, where they do not stop the walk.
    pub future_events: Option<FutureEvents>,
    /// The session settings of the backfill's sessions: the tuning's, then
    /// the user's (which win).
    pub settings: Vec<(String, String)>,
    /// What tuning did (preset, measured plan_cache_mode); None in a dry run
    /// or when nothing was walked.
    pub tuning: Option<TuningReport>,
    /// Sessions that ran window calls (1 = serial).
    pub sessions: u32,
    /// Window calls run again after a deadlock or serialization failure.
    pub slice_retries: u64,
    /// Slice times of this attempt (median, max).
    pub slice_stats: Option<SliceStats>,
    pub planned: Vec<PlannedSlice>,
    pub lock_waited_ms: u64,
    pub elapsed_ms: u64,
    pub warnings: Vec<String>,
}

/// How a connection attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFailure {
    Authentication,
    DatabaseNotFound,
    Unreachable,
    Timeout,
    Tls,
    Other,
}

/// Everything that can stop a run. Messages never hold the password;
/// server messages are scrubbed of it before they are stored.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("invalid database connection string: {0}")]
    InvalidConnectionString(String),
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error("cannot connect to {target}: {message}")]
    Connect {
        kind: ConnectFailure,
        target: String,
        message: String,
    },
    #[error("invalid session setting {name:?}: {message}")]
    InvalidSetting { name: String, message: String },
    #[error(
        "table task_usage_hourly_rollup_state does not exist: run the application's hourly-rollup migrations first"
    )]
    RollupStateMissing,
    #[error("{what} is missing: run the application's hourly-rollup migrations first")]
    SchemaMissing { what: String },
    #[error(
        "permission denied: {message} (the backfill role needs EXECUTE on rollup_task_usage_hourly_window and UPDATE on task_usage_hourly_rollup_state)"
    )]
    PermissionDenied { message: String },
    #[error(
        "the rollup watermark is NULL or its state row (id = 1) is missing: manual intervention required"
    )]
    WatermarkMissing,
    #[error(
        "starting {months_back} month(s) back, at {start}, skips history: the earliest event is at {earliest}, and the stamped watermark would abandon the older buckets for good; force a partial walk to accept that (spec.forcePartial: true, or --force-partial)"
    )]
    MonthsBackSkipsHistory {
        months_back: u32,
        start: Timestamp,
        earliest: Timestamp,
    },
    #[error(
        "{} task_usage row(s) are dated in the future, the latest at {} ({}s ahead of the database clock): no watermark stamped now can cover them, so the drop-legacy guard would still refuse; fix the writers' clocks or those rows' timestamps, then run again",
        .0.rows, .0.latest, .0.ahead_seconds
    )]
    FutureDatedEvents(FutureEvents),
    #[error("advisory lock 4246 not acquired within {}", crate::duration::format(*waited))]
    LockTimeout { waited: Duration },
    #[error("cancelled")]
    Cancelled,
    #[error(
        "advisory lock 4246 was lost mid-run ({message}); the workers were stopped and nothing was stamped"
    )]
    LockLost { message: String },
    #[error(
        "slice [{}, {}) exceeded the statement timeout of {}",
        slice.from, slice.to, crate::duration::format(*timeout)
    )]
    SliceTimeout { slice: Slice, timeout: Duration },
    #[error("slice [{}, {}) failed: {message}", slice.from, slice.to)]
    Slice { slice: Slice, message: String },
    /// The connection does not keep one server session across
    /// transactions (a transaction- or statement-pooling pooler), so lock
    /// 4246 would not keep the backfill exclusive. `consequence` says what
    /// was left: nothing, or the slices committed before it was noticed.
    #[error(
        "{evidence}: the backfill's connection does not keep one PostgreSQL server session to itself, as behind a transaction- or statement-pooling connection pooler (e.g. PgBouncer with pool_mode = transaction), so session-level advisory lock 4246 cannot keep the backfill exclusive; {consequence}. Connect to PostgreSQL directly, or through a pooler in session mode (PgBouncer: pool_mode = session)"
    )]
    TransactionPooling {
        evidence: String,
        consequence: &'static str,
    },
    #[error("{context}: {message}")]
    Database {
        context: &'static str,
        message: String,
    },
}

/// The name of a failure, one per way a run can fail: the one vocabulary
/// of failure reasons. Condition reasons (the API's `Reason`, parsed from
/// [`Error::reason`]) and metric labels come from here, never from message
/// text; [`strum::VariantArray`] lists them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
pub enum Failure {
    InvalidConnectionString,
    InvalidTlsConfig,
    AuthenticationFailed,
    DatabaseNotFound,
    DatabaseUnreachable,
    ConnectTimeout,
    TlsHandshakeFailed,
    ConnectFailed,
    InvalidSessionSetting,
    RollupStateMissing,
    SchemaMissing,
    PermissionDenied,
    /// A NULL watermark or a missing state row.
    ManualInterventionRequired,
    /// `monthsBack` would skip history and a partial walk was not forced.
    PartialRangeRefused,
    FutureDatedEvents,
    LockTimeout,
    Cancelled,
    LockLost,
    SliceTimeout,
    SliceFailed,
    TransactionPooling,
    DatabaseError,
}

impl Failure {
    /// The CamelCase name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl Error {
    /// Which failure this is.
    pub fn failure(&self) -> Failure {
        match self {
            Error::InvalidConnectionString(_) => Failure::InvalidConnectionString,
            Error::Tls(_) => Failure::InvalidTlsConfig,
            Error::Connect { kind, .. } => match kind {
                ConnectFailure::Authentication => Failure::AuthenticationFailed,
                ConnectFailure::DatabaseNotFound => Failure::DatabaseNotFound,
                ConnectFailure::Unreachable => Failure::DatabaseUnreachable,
                ConnectFailure::Timeout => Failure::ConnectTimeout,
                ConnectFailure::Tls => Failure::TlsHandshakeFailed,
                ConnectFailure::Other => Failure::ConnectFailed,
            },
            Error::InvalidSetting { .. } => Failure::InvalidSessionSetting,
            Error::RollupStateMissing => Failure::RollupStateMissing,
            Error::SchemaMissing { .. } => Failure::SchemaMissing,
            Error::PermissionDenied { .. } => Failure::PermissionDenied,
            Error::WatermarkMissing => Failure::ManualInterventionRequired,
            Error::MonthsBackSkipsHistory { .. } => Failure::PartialRangeRefused,
            Error::FutureDatedEvents(_) => Failure::FutureDatedEvents,
            Error::LockTimeout { .. } => Failure::LockTimeout,
            Error::Cancelled => Failure::Cancelled,
            Error::LockLost { .. } => Failure::LockLost,
            Error::SliceTimeout { .. } => Failure::SliceTimeout,
            Error::TransactionPooling { .. } => Failure::TransactionPooling,
            Error::Slice { .. } => Failure::SliceFailed,
            Error::Database { .. } => Failure::DatabaseError,
        }
    }

    /// The [`Failure`]'s CamelCase name: condition reasons and metric
    /// labels.
    pub fn reason(&self) -> &'static str {
        self.failure().as_str()
    }

    /// Whether trying again later may succeed without anyone changing the
    /// input or the database schema. Authentication failures count as
    /// retryable: a rotated Secret fixes them.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Connect { .. }
            | Error::LockTimeout { .. }
            | Error::SliceTimeout { .. }
            | Error::Slice { .. }
            | Error::LockLost { .. }
            | Error::Database { .. } => true,
            Error::InvalidConnectionString(_)
            | Error::Tls(_)
            | Error::InvalidSetting { .. }
            | Error::RollupStateMissing
            | Error::SchemaMissing { .. }
            | Error::PermissionDenied { .. }
            | Error::WatermarkMissing
            | Error::MonthsBackSkipsHistory { .. }
            | Error::FutureDatedEvents(_)
            | Error::TransactionPooling { .. }
            | Error::Cancelled => false,
        }
    }
}

impl Error {
    /// Pooling noticed before the lock: nothing was written.
    pub(crate) fn pooling_before_lock(evidence: String) -> Error {
        Error::TransactionPooling {
            evidence,
            consequence: "nothing was written and lock 4246 is not held",
        }
    }

    /// Pooling noticed by a slice's check: that slice did not run.
    pub(crate) fn pooling_in_walk(evidence: String) -> Error {
        Error::TransactionPooling {
            evidence,
            consequence: "the run stopped before that slice; the slices committed before it are kept (each recomputes whole buckets) and the watermark was not stamped",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources on one line, `outer: inner: innermost` (for
/// logs and exit messages of every crate of the operator).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}
