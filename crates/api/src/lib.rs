//! The `UsageBackfill` custom resource (`usage.multica.ai/v1alpha1`).
//!
//! The Rust types are the source of truth: the CRD under `crds/` is generated
//! from them by [`crd_yaml`], and `tests/crd.rs` fails when the two drift.
//! Field doc comments are what `kubectl explain usagebackfill.spec` shows,
//! so they are written for operators of the resource, not for Rust readers.
//!
//! [`UsageBackfillSpec::validate`] is the pure check the controller runs before
//! acting; it catches what the schema cannot (cross-field rules, values the
//! apiserver saw before a schema change) with messages naming the field.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use usage_backfill_engine::duration;

/// `as_str()` of enums whose names strum derives (spelled as serde spells
/// them, which the tests check).
macro_rules! as_str {
    ($($t:ty),+) => {$(
        impl $t {
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    )+};
}

mod convert;
pub mod run_state;

pub use run_state::{ConditionStatus, ConditionType, Reason, RunState};
pub mod rules;

/// A Secret's name: a DNS-1123 subdomain.
const SECRET_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A key of a Secret's data.
const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// Printable ASCII: PostgreSQL replaces anything else in application_name with '?'.
const APPLICATION_NAME_PATTERN: &str = r"^[ -~]+$";

/// Default key of the DSN in the database Secret.
pub const DEFAULT_SECRET_KEY: &str = "DATABASE_URL";
/// Default key of the CA bundle in the CA Secret.
pub const DEFAULT_CA_KEY: &str = "ca.crt";
/// Default lag threshold of mode `IfLagging`.
pub const DEFAULT_LAG_THRESHOLD: &str = "1h";
/// Default pause between slices.
pub const DEFAULT_SLEEP_BETWEEN_SLICES: &str = "0s";
/// Default retries of a failed attempt.
pub const DEFAULT_BACKOFF_LIMIT: u32 = 6;
/// PostgreSQL `application_name` of the backfill session when none is given.
pub const DEFAULT_APPLICATION_NAME: &str = "usage-backfill";
/// PostgreSQL keeps at most NAMEDATALEN - 1 bytes of `application_name`.
const MAX_APPLICATION_NAME_LEN: usize = 63;
/// Longest Secret name or key Kubernetes accepts.
const MAX_SECRET_NAME_LEN: usize = 253;
/// Longest duration string of a field a CEL rule reads (bounds the rule's cost).
const MAX_DURATION_LEN: usize = 64;
/// Longest DNS name.
const MAX_HOST_LEN: usize = 253;
/// PostgreSQL keeps at most NAMEDATALEN - 1 bytes of a role or database name.
const MAX_IDENTIFIER_LEN: usize = 63;
/// Default of spec.parallelism (the engine's measured default).
pub const DEFAULT_PARALLELISM: u32 = usage_backfill_engine::DEFAULT_PARALLELISM;
/// Largest spec.parallelism (the engine's bound).
const MAX_PARALLELISM: u32 = usage_backfill_engine::MAX_PARALLELISM;
/// Shortest spec.maxSliceDuration: shorter targets split every slice.
const MIN_MAX_SLICE_DURATION: Duration = Duration::from_secs(1);

/// Runs the usage-rollup backfill against a PostgreSQL database, once per
/// spec: any change to the spec (for example a new runId) runs it again.
// Several printcolumns share a type or priority, which the lint mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "usage.multica.ai",
    version = "v1alpha1",
    kind = "UsageBackfill",
    plural = "usagebackfills",
    shortname = "ubf",
    namespaced,
    status = "UsageBackfillStatus",
    derive = "PartialEq",
    doc = "UsageBackfill runs the usage-rollup backfill of a PostgreSQL-backed application once per spec, holding advisory lock 4246, and reports progress, the watermark and kstatus conditions (Ready, Reconciling, Stalled) in its status.",
    printcolumn(
        name = "Phase",
        type_ = "string",
        json_path = ".status.phase",
        description = "Pending, WaitingForLock, Running, Succeeded or Failed"
    ),
    printcolumn(
        name = "Slices",
        type_ = "string",
        json_path = ".status.progress",
        description = "Month slices processed / total"
    ),
    printcolumn(
        name = "Rows",
        type_ = "integer",
        json_path = ".status.rowsTouched",
        description = "Rollup rows upserted or deleted so far"
    ),
    printcolumn(
        name = "Watermark",
        type_ = "date",
        json_path = ".status.watermarkAfter",
        description = "Rollup watermark read back after the run, shown as its age"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Result",
        type_ = "string",
        json_path = ".status.result",
        description = "Backfilled, Skipped or DryRun",
        priority = 1
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Reason of the Ready condition",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        description = "Message of the Ready condition",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::spec_schema)]
pub struct UsageBackfillSpec {
    /// The database to backfill: a connection string in a Secret of this
    /// namespace (secretRef), or the connection in parts (host, port,
    /// database, user, passwordFrom), and how to secure the connection.
    pub database: DatabaseSpec,

    /// What to run. `IfLagging` (default) is the migration-time hook: skip
    /// when the rollup state table is missing, when task_usage is empty (only
    /// stamping the watermark) or when the watermark lags the newest event by
    /// no more than lagThreshold; otherwise walk the whole history. `Always`
    /// is the operator command: walk unconditionally, optionally bounded by
    /// monthsBack.
    #[serde(default)]
    pub mode: Mode,

    /// Mode IfLagging only (ignored by Always): the backfill runs when the
    /// newest event is more than this far ahead of the rollup watermark.
    /// Go-style duration such as 90s, 1h or 2m30s. Default 1h.
    #[serde(default = "default_lag_threshold")]
    #[schemars(regex(pattern = duration::PATTERN))]
    pub lag_threshold: String,

    /// Mode Always only (must be 0 with IfLagging): start the walk this many
    /// months before the current UTC month instead of at the oldest event.
    /// When that would leave older history un-rolled-up the run is refused,
    /// unless forcePartial is set. Default 0: walk the whole history.
    #[serde(default)]
    #[schemars(range(min = 0, max = 4294967295u32))]
    pub months_back: i64,

    /// Mode Always only (must be false with IfLagging): allow monthsBack to
    /// skip existing history. The watermark stamped at the end abandons the
    /// skipped buckets for good. Default false.
    #[serde(default)]
    pub force_partial: bool,

    /// Plan only: work out the range and the slices (and an estimate of the
    /// rows), report them in the status, write nothing and stamp nothing.
    /// Applies to both modes. Default false.
    #[serde(default)]
    pub dry_run: bool,

    /// Pause between two slices, to throttle the load on the database.
    /// Go-style duration. Default 0s (no pause). Applies to both modes.
    #[serde(default = "default_sleep_between_slices")]
    #[schemars(regex(pattern = duration::PATTERN))]
    pub sleep_between_slices: String,

    /// How long an attempt waits for PostgreSQL advisory lock 4246 (held by
    /// the periodic rollup or another backfill) before it fails and is
    /// retried under backoffLimit. Go-style duration; 0s means a single try.
    /// Default: unset, wait as long as it takes (the status shows the holder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = duration::PATTERN))]
    pub lock_timeout: Option<String>,

    /// Statement timeout of each window call (one month slice), so that a
    /// stalled connection or a runaway slice fails the attempt, which is then
    /// retried from the first unfinished slice. Go-style duration, at least
    /// 1ms. Default: unset, no timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_DURATION_LEN), regex(pattern = duration::PATTERN))]
    pub slice_timeout: Option<String>,

    /// PostgreSQL application_name of the backfill's session, as shown in
    /// pg_stat_activity and in other sessions' lock waits. Printable ASCII,
    /// at most 63 characters. Default: usage-backfill.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_APPLICATION_NAME_LEN), regex(pattern = APPLICATION_NAME_PATTERN))]
    pub application_name: Option<String>,

    /// Free-form token: changing it runs the backfill again with an otherwise
    /// unchanged spec (any other spec change does too). Default "".
    #[serde(default)]
    pub run_id: String,

    /// Retries of a failed attempt, with exponential backoff between them,
    /// before the resource turns Failed (Stalled). Default 6; 0 means a
    /// failed attempt is final.
    #[serde(default = "default_backoff_limit")]
    #[schemars(range(min = 0, max = 4294967295u32))]
    pub backoff_limit: i64,

    /// Do not start a new run while true. Like any spec change, setting it
    /// cancels a run in progress: advisory lock 4246 is released, the slices
    /// already committed stay, nothing is stamped. Default false.
    #[serde(default)]
    pub suspend: bool,

    /// Planner settings of the backfill's own database sessions (never the
    /// application's). They change how fast the window calls run, never
    /// what they write. Default: preset Tuned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tuning: Option<TuningSpec>,

    /// Database sessions running historical month slices at once while one
    /// session holds advisory lock 4246; 1 walks serially like the
    /// reference. The slice reaching the present always runs alone, after
    /// every other slice has committed. Each session is one connection of
    /// the database's max_connections. Default 2 (measured best on 2 cores;
    /// see docs/performance.md), at most 16.
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1, max = MAX_PARALLELISM))]
    pub parallelism: i64,

    /// Target duration of one window call (one transaction), for busy
    /// production databases: slices predicted longer, from the times
    /// measured so far in the run, are split into narrower ones. A target,
    /// not a limit (sliceTimeout is the limit). Go-style duration, at least
    /// 1s. Default: unset, slices sized for speed alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = MAX_DURATION_LEN), regex(pattern = duration::PATTERN))]
    pub max_slice_duration: Option<String>,
}

fn default_lag_threshold() -> String {
    DEFAULT_LAG_THRESHOLD.into()
}

fn default_sleep_between_slices() -> String {
    DEFAULT_SLEEP_BETWEEN_SLICES.into()
}

fn default_backoff_limit() -> i64 {
    DEFAULT_BACKOFF_LIMIT.into()
}

fn default_parallelism() -> i64 {
    DEFAULT_PARALLELISM.into()
}

/// Planner settings of the backfill's sessions.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TuningSpec {
    /// Tuned: the measured settings (enable_nestloop off, work_mem 64MB, and
    /// plan_cache_mode chosen by timing the largest slices), with which the
    /// window function's recompute uses hash joins instead of nested loops.
    /// ServerDefaults: the server's settings, exactly as the reference
    /// runs. Default: Tuned.
    #[serde(default)]
    pub preset: TuningPreset,

    /// Further session settings (name: value), applied after the preset's
    /// and winning over them; setting plan_cache_mode turns its measurement
    /// off. Names are PostgreSQL setting names; values are strings (quote
    /// "on" and "off", which YAML reads as booleans); a value the server
    /// refuses fails the attempt. Default: none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

/// A set of planner settings. (Not "On"/"Off": YAML 1.1 reads those as
/// booleans.)
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    JsonSchema,
    strum::IntoStaticStr,
)]
pub enum TuningPreset {
    /// Measured settings: see docs/performance.md.
    #[default]
    Tuned,
    /// The server's settings, as the reference runs.
    ServerDefaults,
}

/// Where the database is and how to reach it: either secretRef (a whole
/// connection string in a Secret) or the connection in parts (host, port,
/// database and user, each literal or from a Secret key, and passwordFrom),
/// never both. Every Secret lives in this UsageBackfill's namespace.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::database_schema)]
pub struct DatabaseSpec {
    /// The Secret holding the whole connection string, e.g. the
    /// application chart's external-database mode: {name: multica-secrets,
    /// key: DATABASE_URL}. It must live in the same namespace as this
    /// UsageBackfill; there is deliberately no namespace field. Not with
    /// the connection in parts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<DatabaseSecretRef>,

    /// Connection in parts: host name or address of the server, e.g. the
    /// application chart's built-in database, Service `<release>-postgres`.
    /// Or hostFrom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_HOST_LEN))]
    pub host: Option<String>,

    /// Connection in parts: the host from a Secret key. Or host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_from: Option<ValueFrom>,

    /// Connection in parts: the server's port. Default 5432. Or portFrom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i64>,

    /// Connection in parts: the port from a Secret key. Or port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_from: Option<ValueFrom>,

    /// Connection in parts: the database name. Default: the user name.
    /// Or databaseFrom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_IDENTIFIER_LEN))]
    pub database: Option<String>,

    /// Connection in parts: the database name from a Secret key. Or database.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_from: Option<ValueFrom>,

    /// Connection in parts: the role to log in as, e.g. multica. Required
    /// with the connection in parts, or userFrom.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = MAX_IDENTIFIER_LEN))]
    pub user: Option<String>,

    /// Connection in parts: the user from a Secret key. Or user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_from: Option<ValueFrom>,

    /// Connection in parts: the password, from a Secret key only (e.g.
    /// {secretKeyRef: {name: multica-secrets, key: POSTGRES_PASSWORD}}),
    /// used as it is, byte for byte. A rotated password is picked up like a
    /// rotated connection string. Default: none (the server's
    /// authentication settings decide).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_from: Option<ValueFrom>,

    /// TLS of the database connection. Default: the DSN's sslmode, else prefer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
}

/// A key of a Secret in this namespace holding a libpq connection string.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DatabaseSecretRef {
    /// Name of the Secret, in the same namespace as this UsageBackfill. Required.
    #[schemars(length(min = 1, max = MAX_SECRET_NAME_LEN), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: String,

    /// Key of the Secret's data holding a libpq URL (postgres://user:pass@host/db?sslmode=...)
    /// or a key=value DSN (host=... dbname=...). Default DATABASE_URL.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = MAX_SECRET_NAME_LEN), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

fn default_secret_key() -> String {
    DEFAULT_SECRET_KEY.into()
}

/// A value of the connection in parts read from a Secret.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ValueFrom {
    /// The key of a Secret in this namespace holding the value. Required.
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a Secret in this namespace.
#[derive(
    Deserialize, Serialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret, in the same namespace as this UsageBackfill. Required.
    #[schemars(length(min = 1, max = MAX_SECRET_NAME_LEN), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: String,

    /// Key of the Secret's data. Required.
    #[schemars(length(min = 1, max = MAX_SECRET_NAME_LEN), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

impl SecretKeyRef {
    pub fn new(name: impl Into<String>, key: impl Into<String>) -> Self {
        SecretKeyRef {
            name: name.into(),
            key: key.into(),
        }
    }
}

impl ValueFrom {
    pub fn secret(name: impl Into<String>, key: impl Into<String>) -> Self {
        ValueFrom {
            secret_key_ref: SecretKeyRef::new(name, key),
        }
    }
}

impl DatabaseSpec {
    /// The names of every Secret this spec reads (connection string, parts,
    /// CA bundle), each once, in spec order: a change to any of them is
    /// picked up like a change to the connection string.
    pub fn secret_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = Vec::new();
        let parts = [
            &self.host_from,
            &self.port_from,
            &self.database_from,
            &self.user_from,
            &self.password_from,
        ];
        let all = self
            .secret_ref
            .iter()
            .map(|s| s.name.as_str())
            .chain(
                parts
                    .into_iter()
                    .flatten()
                    .map(|v| v.secret_key_ref.name.as_str()),
            )
            .chain(
                self.tls
                    .iter()
                    .flat_map(|t| &t.ca_secret_ref)
                    .map(|c| c.name.as_str()),
            );
        for name in all {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names
    }
}

/// TLS settings of the database connection.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::tls_schema)]
pub struct TlsSpec {
    /// libpq sslmode: disable, prefer, require, verify-ca or verify-full.
    /// Overrides the DSN's sslmode. Default: the DSN's sslmode (allow is read
    /// as prefer), else prefer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(transform = optional_enum)]
    pub mode: Option<TlsMode>,

    /// CA bundle (PEM) that signs the server's certificate, from a Secret in
    /// this namespace. Used by verify-ca and verify-full; without it they
    /// trust the system roots. Not allowed with mode disable. Default: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_ref: Option<CaSecretRef>,
}

/// A key of a Secret in this namespace holding a PEM CA bundle.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CaSecretRef {
    /// Name of the Secret, in the same namespace as this UsageBackfill. Required.
    #[schemars(length(min = 1, max = MAX_SECRET_NAME_LEN), regex(pattern = SECRET_NAME_PATTERN))]
    pub name: String,

    /// Key of the Secret's data holding the PEM bundle. Default ca.crt.
    #[serde(default = "default_ca_key")]
    #[schemars(length(min = 1, max = MAX_SECRET_NAME_LEN), regex(pattern = SECRET_KEY_PATTERN))]
    pub key: String,
}

fn default_ca_key() -> String {
    DEFAULT_CA_KEY.into()
}

/// libpq sslmode values the operator supports.
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    JsonSchema,
    strum::IntoStaticStr,
    strum::VariantArray,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case")]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    /// Reads a DSN's `sslmode`. libpq's `allow` (plaintext first, TLS as a
    /// fallback) is read as `prefer`, the closest mode supported.
    pub fn from_sslmode(sslmode: &str) -> Option<Self> {
        Some(match sslmode {
            "disable" => Self::Disable,
            "allow" | "prefer" => Self::Prefer,
            "require" => Self::Require,
            "verify-ca" => Self::VerifyCa,
            "verify-full" => Self::VerifyFull,
            _ => return None,
        })
    }
}

/// What a UsageBackfill runs.
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    JsonSchema,
    strum::IntoStaticStr,
)]
pub enum Mode {
    /// The migration-time hook: lag check, skip reasons, then the walk.
    #[default]
    IfLagging,
    /// The operator command: the walk, unconditionally.
    Always,
}

as_str!(
    TuningPreset,
    TlsMode,
    Mode,
    Phase,
    BackfillResult,
    SkipReason
);

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

/// A spec the controller cannot run. The Display text names the field by
/// its path in the manifest and is fit for a condition message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    #[error("spec.{field}: {error}")]
    Duration {
        field: &'static str,
        error: duration::ParseError,
    },
    #[error("spec.{field}: {problem}")]
    Invalid {
        field: &'static str,
        problem: String,
    },
}

impl SpecError {
    /// Path of the offending field below `spec`, e.g. `lagThreshold`.
    pub fn field(&self) -> &'static str {
        match self {
            Self::Duration { field, .. } | Self::Invalid { field, .. } => field,
        }
    }
}

/// A spec that passed [`UsageBackfillSpec::validate`], with durations parsed
/// and defaults resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidSpec {
    pub connection: Connection,
    /// The explicit spec.database.tls.mode; see [`ValidSpec::tls_mode`].
    pub tls_mode: Option<TlsMode>,
    pub ca: Option<CaSecretRef>,
    pub mode: ModeSettings,
    pub dry_run: bool,
    pub sleep_between_slices: Duration,
    /// None: wait for the lock forever.
    pub lock_timeout: Option<Duration>,
    /// None: no statement timeout.
    pub slice_timeout: Option<Duration>,
    pub application_name: String,
    pub run_id: String,
    pub backoff_limit: u32,
    pub suspend: bool,
    pub tuning: TuningPreset,
    /// spec.tuning.settings, in name order.
    pub tuning_settings: Vec<(String, String)>,
    pub parallelism: u32,
    pub max_slice_duration: Option<Duration>,
}

/// How to connect, as the spec says it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Connection {
    /// spec.database.secretRef: a whole connection string.
    Dsn(DatabaseSecretRef),
    /// The connection in parts.
    Parts(PartsSpec),
}

/// The connection in parts, checked; the Secrets are not read yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartsSpec {
    pub host: Part,
    /// None: 5432.
    pub port: Option<Part>,
    /// None: the user's name.
    pub database: Option<Part>,
    pub user: Part,
    pub password: Option<SecretKeyRef>,
}

/// One value of the connection in parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Literal(String),
    FromSecret(SecretKeyRef),
}

/// The mode with the settings that apply to it only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModeSettings {
    IfLagging {
        lag_threshold: Duration,
    },
    Always {
        months_back: u32,
        force_partial: bool,
    },
}

impl ValidSpec {
    /// The TLS mode to use: the spec's, else the DSN's sslmode, else prefer.
    pub fn tls_mode(&self, dsn_sslmode: Option<TlsMode>) -> TlsMode {
        self.tls_mode.or(dsn_sslmode).unwrap_or(TlsMode::Prefer)
    }
}

impl UsageBackfillSpec {
    /// A spec with every default, reading the DSN from `secret_name`.
    pub fn new(secret_name: impl Into<String>) -> Self {
        Self {
            database: DatabaseSpec {
                secret_ref: Some(DatabaseSecretRef {
                    name: secret_name.into(),
                    key: default_secret_key(),
                }),
                ..DatabaseSpec::default()
            },
            mode: Mode::default(),
            lag_threshold: default_lag_threshold(),
            months_back: 0,
            force_partial: false,
            dry_run: false,
            sleep_between_slices: default_sleep_between_slices(),
            lock_timeout: None,
            slice_timeout: None,
            application_name: None,
            run_id: String::new(),
            backoff_limit: DEFAULT_BACKOFF_LIMIT.into(),
            suspend: false,
            tuning: None,
            parallelism: DEFAULT_PARALLELISM.into(),
            max_slice_duration: None,
        }
    }

    /// Checks what the schema cannot (or could not, for objects stored
    /// before a schema change) and resolves defaults. Pure: the Secrets are
    /// not read here.
    ///
    /// Cross-field rules: monthsBack and forcePartial belong to mode Always
    /// and are rejected with IfLagging rather than silently ignored (they
    /// would change what an operator believes the run does); lagThreshold is
    /// defaulted by the apiserver, so it cannot be rejected under Always and
    /// is ignored there. caSecretRef is rejected with tls.mode disable.
    /// verify-ca / verify-full without caSecretRef are accepted: the system
    /// roots are used.
    pub fn validate(&self) -> Result<ValidSpec, SpecError> {
        let db = &self.database;
        let connection = connection(db)?;
        let tls = db.tls.clone().unwrap_or_default();
        if let Some(ca) = &tls.ca_secret_ref {
            check_secret_name("database.tls.caSecretRef.name", &ca.name)?;
            check_secret_key("database.tls.caSecretRef.key", &ca.key)?;
            if tls.mode == Some(TlsMode::Disable) {
                return Err(broken(rules::CA_NOT_WITH_DISABLE));
            }
        }

        let mode = match self.mode {
            Mode::IfLagging => {
                if self.months_back != 0 {
                    return Err(broken(rules::MONTHS_BACK_ONLY_ALWAYS));
                }
                if self.force_partial {
                    return Err(broken(rules::FORCE_PARTIAL_ONLY_ALWAYS));
                }
                ModeSettings::IfLagging {
                    lag_threshold: parse_duration("lagThreshold", &self.lag_threshold)?,
                }
            }
            Mode::Always => {
                if self.force_partial && self.months_back == 0 {
                    return Err(broken(rules::FORCE_PARTIAL_NEEDS_MONTHS_BACK));
                }
                ModeSettings::Always {
                    months_back: count("monthsBack", self.months_back)?,
                    force_partial: self.force_partial,
                }
            }
        };

        let sleep_between_slices =
            parse_duration("sleepBetweenSlices", &self.sleep_between_slices)?;
        let lock_timeout = self
            .lock_timeout
            .as_deref()
            .map(|s| parse_duration("lockTimeout", s))
            .transpose()?;
        let slice_timeout = self
            .slice_timeout
            .as_deref()
            .map(|s| parse_duration("sliceTimeout", s))
            .transpose()?;
        if slice_timeout.is_some_and(|d| d < Duration::from_millis(1)) {
            return Err(broken(rules::SLICE_TIMEOUT_MIN));
        }

        let application_name = match &self.application_name {
            None => DEFAULT_APPLICATION_NAME.to_owned(),
            Some(name) => {
                check_application_name(name)?;
                name.clone()
            }
        };

        let tuning = self.tuning.clone().unwrap_or_default();
        if let Some(name) = tuning
            .settings
            .keys()
            .find(|name| !usage_backfill_engine::tuning::is_setting_name(name))
        {
            return Err(invalid(
                "tuning.settings",
                format!(
                    "{:?} is not a PostgreSQL setting name (letters, digits, '_' and '.', at most 63)",
                    name.chars().take(64).collect::<String>()
                ),
            ));
        }
        let parallelism = u32::try_from(self.parallelism)
            .ok()
            .filter(|p| (1..=MAX_PARALLELISM).contains(p))
            .ok_or_else(|| {
                invalid(
                    "parallelism",
                    format!(
                        "must be a whole number from 1 to {MAX_PARALLELISM}, not {}",
                        self.parallelism
                    ),
                )
            })?;
        let max_slice_duration = self
            .max_slice_duration
            .as_deref()
            .map(|s| parse_duration("maxSliceDuration", s))
            .transpose()?;
        if max_slice_duration.is_some_and(|d| d < MIN_MAX_SLICE_DURATION) {
            return Err(broken(rules::MAX_SLICE_DURATION_MIN));
        }

        Ok(ValidSpec {
            connection,
            tls_mode: tls.mode,
            ca: tls.ca_secret_ref,
            mode,
            dry_run: self.dry_run,
            sleep_between_slices,
            lock_timeout,
            slice_timeout,
            application_name,
            run_id: self.run_id.clone(),
            backoff_limit: count("backoffLimit", self.backoff_limit)?,
            suspend: self.suspend,
            tuning: tuning.preset,
            tuning_settings: tuning.settings.into_iter().collect(),
            parallelism,
            max_slice_duration,
        })
    }
}

/// The error of a broken cross-field rule: the words the API server uses.
fn broken(rule: rules::Rule) -> SpecError {
    invalid(rule.field, rule.problem)
}

/// Field paths and limits of one value of the connection in parts.
struct PartFields {
    literal: &'static str,
    name: &'static str,
    key: &'static str,
    once: rules::Rule,
    max_len: usize,
}

const HOST: PartFields = PartFields {
    literal: "database.host",
    name: "database.hostFrom.secretKeyRef.name",
    key: "database.hostFrom.secretKeyRef.key",
    once: rules::HOST_ONCE,
    max_len: MAX_HOST_LEN,
};
const PORT: PartFields = PartFields {
    literal: "database.port",
    name: "database.portFrom.secretKeyRef.name",
    key: "database.portFrom.secretKeyRef.key",
    once: rules::PORT_ONCE,
    max_len: 5,
};
const DATABASE: PartFields = PartFields {
    literal: "database.database",
    name: "database.databaseFrom.secretKeyRef.name",
    key: "database.databaseFrom.secretKeyRef.key",
    once: rules::DATABASE_ONCE,
    max_len: MAX_IDENTIFIER_LEN,
};
const USER: PartFields = PartFields {
    literal: "database.user",
    name: "database.userFrom.secretKeyRef.name",
    key: "database.userFrom.secretKeyRef.key",
    once: rules::USER_ONCE,
    max_len: MAX_IDENTIFIER_LEN,
};

/// Exactly one form: the connection string in a Secret, or the parts.
fn connection(db: &DatabaseSpec) -> Result<Connection, SpecError> {
    let parts_given = db.host.is_some()
        || db.host_from.is_some()
        || db.port.is_some()
        || db.port_from.is_some()
        || db.database.is_some()
        || db.database_from.is_some()
        || db.user.is_some()
        || db.user_from.is_some()
        || db.password_from.is_some();
    if let Some(secret) = &db.secret_ref {
        if parts_given {
            return Err(broken(rules::ONE_FORM));
        }
        check_secret_name("database.secretRef.name", &secret.name)?;
        check_secret_key("database.secretRef.key", &secret.key)?;
        return Ok(Connection::Dsn(secret.clone()));
    }
    let port_literal = db.port.map(|p| {
        if (1..=65535).contains(&p) {
            Ok(p.to_string())
        } else {
            Err(invalid(
                PORT.literal,
                format!("must be a port number from 1 to 65535, not {p}"),
            ))
        }
    });
    let host = part(&HOST, db.host.clone().map(Ok), db.host_from.as_ref())?;
    let user = part(&USER, db.user.clone().map(Ok), db.user_from.as_ref())?;
    let (Some(host), Some(user)) = (host, user) else {
        return Err(broken(if db.host.is_none() && db.host_from.is_none() {
            rules::SOME_FORM
        } else {
            rules::PARTS_NEED_USER
        }));
    };
    let port = part(&PORT, port_literal, db.port_from.as_ref())?;
    let database = part(
        &DATABASE,
        db.database.clone().map(Ok),
        db.database_from.as_ref(),
    )?;
    let password = match &db.password_from {
        Some(from) => {
            let r = &from.secret_key_ref;
            check_secret_name("database.passwordFrom.secretKeyRef.name", &r.name)?;
            check_secret_key("database.passwordFrom.secretKeyRef.key", &r.key)?;
            Some(r.clone())
        }
        None => None,
    };
    Ok(Connection::Parts(PartsSpec {
        host,
        port,
        database,
        user,
        password,
    }))
}

/// One value of the parts, literal or from a Secret key, not both.
fn part(
    fields: &PartFields,
    literal: Option<Result<String, SpecError>>,
    from: Option<&ValueFrom>,
) -> Result<Option<Part>, SpecError> {
    match (literal, from) {
        (Some(_), Some(_)) => Err(broken(fields.once)),
        (Some(value), None) => {
            let value = value?;
            if value.trim().is_empty() {
                return Err(invalid(fields.literal, "must not be empty"));
            }
            if value.len() > fields.max_len {
                return Err(invalid(
                    fields.literal,
                    format!("must be at most {} characters", fields.max_len),
                ));
            }
            Ok(Some(Part::Literal(value.trim().to_owned())))
        }
        (None, Some(from)) => {
            let r = &from.secret_key_ref;
            check_secret_name(fields.name, &r.name)?;
            check_secret_key(fields.key, &r.key)?;
            Ok(Some(Part::FromSecret(r.clone())))
        }
        (None, None) => Ok(None),
    }
}

fn invalid(field: &'static str, problem: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// A count of the spec: stored as i64 so that any integer the API server
/// accepts deserializes (one undecodable object would fail the controller's
/// whole list), checked here.
fn count(field: &'static str, value: i64) -> Result<u32, SpecError> {
    u32::try_from(value).map_err(|_| {
        invalid(
            field,
            format!("must be a whole number from 0 to {}, not {value}", u32::MAX),
        )
    })
}

fn parse_duration(field: &'static str, value: &str) -> Result<Duration, SpecError> {
    duration::parse(value).map_err(|error| SpecError::Duration { field, error })
}

/// DNS-1123 subdomain, as [`SECRET_NAME_PATTERN`] plus the length limit.
fn check_secret_name(field: &'static str, name: &str) -> Result<(), SpecError> {
    if name.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if name.len() > MAX_SECRET_NAME_LEN {
        return Err(invalid(field, "must be at most 253 characters"));
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        return Err(invalid(
            field,
            format!(
                "{name:?} is not a valid Secret name (lowercase letters, digits, '-' and '.', starting and ending with a letter or digit)"
            ),
        ));
    }
    Ok(())
}

/// As [`SECRET_KEY_PATTERN`] plus the length limit.
fn check_secret_key(field: &'static str, key: &str) -> Result<(), SpecError> {
    if key.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if key.len() > MAX_SECRET_NAME_LEN {
        return Err(invalid(field, "must be at most 253 characters"));
    }
    if !key
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(invalid(
            field,
            format!("{key:?} is not a valid Secret key (letters, digits, '-', '.' and '_')"),
        ));
    }
    Ok(())
}

/// As [`APPLICATION_NAME_PATTERN`] plus the length limit.
fn check_application_name(name: &str) -> Result<(), SpecError> {
    const FIELD: &str = "applicationName";
    if name.is_empty() {
        return Err(invalid(
            FIELD,
            "must not be empty (omit the field for the default)",
        ));
    }
    if name.len() > MAX_APPLICATION_NAME_LEN {
        return Err(invalid(FIELD, "must be at most 63 characters"));
    }
    if !name.bytes().all(|b| (b' '..=b'~').contains(&b)) {
        return Err(invalid(FIELD, "must be printable ASCII"));
    }
    Ok(())
}

/// Schema of an `Option<SomeEnum>` field as Kubernetes wants it: one
/// `{type: string, enum: [...]}` keeping the field's own description. Not
/// `nullable`: the apiserver checks a nullable field's null against the
/// `enum` and refuses it, while it drops an explicit null of a field that
/// is not nullable (as absent, which is what `None` means). schemars gives either `null` inside `enum` or, when variants
/// carry docs, an `anyOf`/`oneOf` that kube flattens with the enum's
/// description in place of the field's.
fn optional_enum(schema: &mut schemars::Schema) {
    use serde_json::Value;
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    if let Some(Value::Array(any_of)) = obj.remove("anyOf") {
        for sub in any_of {
            let Value::Object(sub) = sub else { continue };
            if sub.get("enum") == Some(&serde_json::json!([null])) {
                continue;
            }
            for (k, v) in sub {
                obj.entry(k).or_insert(v);
            }
        }
    }
    let mut values = match obj.remove("enum") {
        Some(Value::Array(values)) => values,
        _ => Vec::new(),
    };
    if let Some(Value::Array(one_of)) = obj.remove("oneOf") {
        for variant in one_of {
            if let Some(c) = variant.get("const") {
                values.push(c.clone());
            } else if let Some(Value::Array(e)) = variant.get("enum") {
                values.extend(e.iter().cloned());
            }
        }
    }
    values.retain(|v| !v.is_null());
    obj.insert("type".into(), "string".into());
    obj.insert("enum".into(), values.into());
    obj.remove("nullable");
}

/// The `format`s the apiserver knows (kube-openapi's string formats and
/// the numeric ones). It ignores any other (newer servers warn), so the
/// CRD keeps none: e.g. schemars' `uint32` goes, its range stays as
/// `minimum`/`maximum`.
pub const KUBERNETES_FORMATS: &[&str] = &[
    "bsonobjectid",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
    "isbn",
    "isbn10",
    "isbn13",
    "creditcard",
    "ssn",
    "hexcolor",
    "rgbcolor",
    "byte",
    "password",
    "date",
    "duration",
    "datetime",
    "date-time",
    "int32",
    "int64",
    "float",
    "double",
];

/// Drops formats Kubernetes does not know, keeping an unsigned integer's
/// range as a `maximum`.
fn kubernetes_formats_only(v: &mut serde_json::Value) {
    use serde_json::Value;
    match v {
        Value::Object(obj) => {
            let unknown = obj
                .get("format")
                .and_then(Value::as_str)
                .filter(|f| !KUBERNETES_FORMATS.contains(f))
                .map(str::to_owned);
            if let Some(format) = unknown {
                obj.remove("format");
                let max = match format.as_str() {
                    "uint8" => Some(f64::from(u8::MAX)),
                    "uint16" => Some(f64::from(u16::MAX)),
                    "uint32" => Some(f64::from(u32::MAX)),
                    _ => None,
                };
                if let Some(max) = max {
                    obj.entry("maximum").or_insert(max.into());
                }
            }
            for child in obj.values_mut() {
                kubernetes_formats_only(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(kubernetes_formats_only),
        _ => {}
    }
}

/// The CustomResourceDefinition of [`UsageBackfill`].
pub fn crd() -> CustomResourceDefinition {
    let mut crd = UsageBackfill::crd();
    // The apiserver applies schema defaults when it reads an object from
    // storage, including to a missing `status`: a just-created object then
    // reads `observedGeneration: -1` and kstatus (Flux, Helm 4 --wait) never
    // calls it Current before the controller has looked at it. The -1
    // default of the field itself applies only once a status exists.
    for version in &mut crd.spec.versions {
        let status = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
            .and_then(|s| s.properties.as_mut())
            .and_then(|p| p.get_mut("status"));
        if let Some(status) = status {
            status.default = Some(
                k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSON(
                    serde_json::json!({ "observedGeneration": -1 }),
                ),
            );
        }
        if let Some(schema) = version
            .schema
            .as_mut()
            .and_then(|s| s.open_api_v3_schema.as_mut())
        {
            let mut v = serde_json::to_value(&*schema).expect("a schema serializes");
            kubernetes_formats_only(&mut v);
            *schema = serde_json::from_value(v).expect("a schema without formats is a schema");
        }
    }
    crd
}

/// The CRD as the YAML committed under `crds/`.
pub fn crd_yaml() -> String {
    let yaml = serde_saphyr::to_string(&crd()).expect("a CRD always serializes to YAML");
    format!("# Generated by usage-backfill crd; do not edit.\n{yaml}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> UsageBackfillSpec {
        UsageBackfillSpec::new("app-db")
    }

    fn err(spec: &UsageBackfillSpec) -> String {
        spec.validate().unwrap_err().to_string()
    }

    #[test]
    fn status_default_is_never_current() {
        let status = UsageBackfillStatus::default();
        assert_eq!(status.observed_generation, -1);
        assert_eq!(
            serde_json::to_value(&status).unwrap(),
            serde_json::json!({"observedGeneration": -1})
        );
        let parsed: UsageBackfillStatus = serde_json::from_str("{}").unwrap();
        assert_eq!(parsed, status);
    }

    #[test]
    fn spec_defaults_match_serde_defaults() {
        let parsed: UsageBackfillSpec = serde_json::from_value(
            serde_json::json!({"database": {"secretRef": {"name": "app-db"}}}),
        )
        .unwrap();
        assert_eq!(parsed, spec());
    }

    #[test]
    fn default_spec_validates_to_documented_defaults() {
        let valid = spec().validate().unwrap();
        assert_eq!(
            valid,
            ValidSpec {
                connection: Connection::Dsn(DatabaseSecretRef {
                    name: "app-db".into(),
                    key: "DATABASE_URL".into()
                }),
                tls_mode: None,
                ca: None,
                mode: ModeSettings::IfLagging {
                    lag_threshold: Duration::from_secs(3600)
                },
                dry_run: false,
                sleep_between_slices: Duration::ZERO,
                lock_timeout: None,
                slice_timeout: None,
                application_name: "usage-backfill".into(),
                run_id: String::new(),
                backoff_limit: 6,
                suspend: false,
                tuning: TuningPreset::Tuned,
                tuning_settings: Vec::new(),
                parallelism: 2,
                max_slice_duration: None,
            }
        );
        assert_eq!(valid.tls_mode(None), TlsMode::Prefer);
        assert_eq!(valid.tls_mode(Some(TlsMode::Require)), TlsMode::Require);
    }

    #[test]
    fn explicit_tls_mode_beats_the_dsn() {
        let mut s = spec();
        s.database.tls = Some(TlsSpec {
            mode: Some(TlsMode::VerifyFull),
            ca_secret_ref: None,
        });
        let valid = s.validate().unwrap();
        assert_eq!(valid.tls_mode(Some(TlsMode::Disable)), TlsMode::VerifyFull);
    }

    #[test]
    fn sslmode_parsing() {
        for &m in <TlsMode as strum::VariantArray>::VARIANTS {
            assert_eq!(TlsMode::from_sslmode(m.as_str()), Some(m));
            assert_eq!(
                serde_json::to_value(m).unwrap(),
                serde_json::json!(m.as_str())
            );
        }
        assert_eq!(TlsMode::from_sslmode("allow"), Some(TlsMode::Prefer));
        assert_eq!(TlsMode::from_sslmode("VERIFY-FULL"), None);
    }

    #[test]
    fn durations_are_parsed_and_errors_name_the_field() {
        let mut s = spec();
        s.mode = Mode::Always;
        s.sleep_between_slices = "250ms".into();
        s.lock_timeout = Some("2m30s".into());
        s.slice_timeout = Some("10m".into());
        let v = s.validate().unwrap();
        assert_eq!(v.sleep_between_slices, Duration::from_millis(250));
        assert_eq!(v.lock_timeout, Some(Duration::from_secs(150)));
        assert_eq!(v.slice_timeout, Some(Duration::from_secs(600)));

        let mut s = spec();
        s.lag_threshold = "1x".into();
        let e = s.validate().unwrap_err();
        assert_eq!(e.field(), "lagThreshold");
        assert!(
            e.to_string()
                .starts_with(r#"spec.lagThreshold: invalid duration "1x": unknown unit"#),
            "{e}"
        );

        for (field, set) in [
            (
                "sleepBetweenSlices",
                (|s| s.sleep_between_slices = "soon".into()) as fn(&mut UsageBackfillSpec),
            ),
            ("lockTimeout", |s| s.lock_timeout = Some("-1s".into())),
            ("sliceTimeout", |s| s.slice_timeout = Some("5".into())),
        ] {
            let mut s = spec();
            set(&mut s);
            let e = s.validate().unwrap_err();
            assert_eq!(e.field(), field);
            assert!(
                e.to_string()
                    .starts_with(&format!("spec.{field}: invalid duration")),
                "{e}"
            );
        }
    }

    #[test]
    fn lag_threshold_is_not_checked_in_always() {
        let mut s = spec();
        s.mode = Mode::Always;
        s.lag_threshold = "whatever".into();
        assert_eq!(
            s.validate().unwrap().mode,
            ModeSettings::Always {
                months_back: 0,
                force_partial: false
            }
        );
    }

    #[test]
    fn always_only_fields_are_rejected_with_if_lagging() {
        let mut s = spec();
        s.months_back = 3;
        assert_eq!(
            err(&s),
            "spec.monthsBack: applies to mode Always only; remove it or set spec.mode: Always"
        );
        let mut s = spec();
        s.force_partial = true;
        assert!(err(&s).starts_with("spec.forcePartial: applies to mode Always only"));

        s.mode = Mode::Always;
        s.months_back = 3;
        assert_eq!(
            s.validate().unwrap().mode,
            ModeSettings::Always {
                months_back: 3,
                force_partial: true
            }
        );
    }

    #[test]
    fn slice_timeout_must_be_positive() {
        let mut s = spec();
        s.slice_timeout = Some("0s".into());
        assert_eq!(
            err(&s),
            "spec.sliceTimeout: must be at least 1ms (omit the field for no timeout)"
        );
        s.slice_timeout = Some("1ms".into());
        assert!(s.validate().is_ok());
    }

    #[test]
    fn performance_fields_are_checked_and_parsed() {
        let parsed: UsageBackfillSpec = serde_json::from_value(serde_json::json!({
            "database": {"secretRef": {"name": "app-db"}},
            "tuning": {"preset": "ServerDefaults", "settings": {"work_mem": "64MB", "jit": "off"}},
            "parallelism": 4,
            "maxSliceDuration": "2m",
        }))
        .unwrap();
        let valid = parsed.validate().unwrap();
        assert_eq!(valid.tuning, TuningPreset::ServerDefaults);
        assert_eq!(
            valid.tuning_settings,
            [
                ("jit".to_owned(), "off".to_owned()),
                ("work_mem".to_owned(), "64MB".to_owned())
            ]
        );
        assert_eq!(valid.parallelism, 4);
        assert_eq!(valid.max_slice_duration, Some(Duration::from_secs(120)));

        let mut s = spec();
        for (p, ok) in [(0, false), (1, true), (16, true), (17, false), (-1, false)] {
            s.parallelism = p;
            match s.validate() {
                Ok(v) => assert!(ok && v.parallelism == p as u32, "{p}"),
                Err(e) => assert!(
                    !ok && e.to_string()
                        == format!(
                            "spec.parallelism: must be a whole number from 1 to 16, not {p}"
                        ),
                    "{p}: {e}"
                ),
            }
        }
        s.parallelism = 2;
        s.max_slice_duration = Some("500ms".into());
        assert_eq!(
            err(&s),
            "spec.maxSliceDuration: must be at least 1s (omit the field for no target)"
        );
        s.max_slice_duration = Some("ten".into());
        assert!(err(&s).starts_with("spec.maxSliceDuration:"), "{}", err(&s));
        s.max_slice_duration = None;
        s.tuning = Some(TuningSpec {
            preset: TuningPreset::Tuned,
            settings: [("work mem; reset all".to_owned(), "1".to_owned())].into(),
        });
        assert_eq!(
            err(&s),
            "spec.tuning.settings: \"work mem; reset all\" is not a PostgreSQL setting name \
             (letters, digits, '_' and '.', at most 63)"
        );
    }

    #[test]
    fn lock_timeout_zero_is_a_single_try() {
        let mut s = spec();
        s.lock_timeout = Some("0".into());
        assert_eq!(s.validate().unwrap().lock_timeout, Some(Duration::ZERO));
    }

    #[test]
    fn secret_references_are_checked() {
        let mut s = spec();
        s.database.secret_ref.as_mut().unwrap().name = String::new();
        assert_eq!(err(&s), "spec.database.secretRef.name: must not be empty");
        s.database.secret_ref.as_mut().unwrap().name = "App_DB".into();
        assert!(
            err(&s).starts_with(
                r#"spec.database.secretRef.name: "App_DB" is not a valid Secret name"#
            )
        );
        s.database.secret_ref.as_mut().unwrap().name = "a".repeat(254);
        assert!(err(&s).contains("at most 253"));
        s.database.secret_ref.as_mut().unwrap().name = "app-db.prod".into();
        s.database.secret_ref.as_mut().unwrap().key = "DATABASE URL".into();
        assert!(err(&s).starts_with("spec.database.secretRef.key: "));
        s.database.secret_ref.as_mut().unwrap().key = "db.url_2-x".into();
        assert!(s.validate().is_ok());
    }

    fn parts() -> UsageBackfillSpec {
        let mut s = spec();
        s.database = DatabaseSpec {
            host: Some("shop-postgres".into()),
            user: Some("multica".into()),
            password_from: Some(ValueFrom::secret("multica-secrets", "POSTGRES_PASSWORD")),
            ..DatabaseSpec::default()
        };
        s
    }

    #[test]
    fn the_connection_in_parts_is_checked_and_resolved() {
        let v = parts().validate().unwrap();
        assert_eq!(
            v.connection,
            Connection::Parts(PartsSpec {
                host: Part::Literal("shop-postgres".into()),
                port: None,
                database: None,
                user: Part::Literal("multica".into()),
                password: Some(SecretKeyRef::new("multica-secrets", "POSTGRES_PASSWORD")),
            })
        );
        let mut s = parts();
        s.database.host = None;
        s.database.host_from = Some(ValueFrom::secret("db-coords", "host"));
        s.database.port = Some(6432);
        s.database.database_from = Some(ValueFrom::secret("db-coords", "dbname"));
        let Connection::Parts(p) = s.validate().unwrap().connection else {
            panic!("parts")
        };
        assert_eq!(
            p.host,
            Part::FromSecret(SecretKeyRef::new("db-coords", "host"))
        );
        assert_eq!(p.port, Some(Part::Literal("6432".into())));
        assert_eq!(
            p.database,
            Some(Part::FromSecret(SecretKeyRef::new("db-coords", "dbname")))
        );
        assert_eq!(
            s.database.secret_names(),
            ["db-coords", "multica-secrets"],
            "each Secret once, in spec order"
        );
    }

    #[test]
    fn the_two_connection_forms_exclude_each_other() {
        let mut s = parts();
        s.database.secret_ref = Some(DatabaseSecretRef {
            name: "app-db".into(),
            key: DEFAULT_SECRET_KEY.into(),
        });
        assert_eq!(err(&s), rules::ONE_FORM.message());
        let mut s = spec();
        s.database.secret_ref = None;
        assert_eq!(err(&s), rules::SOME_FORM.message());
        let mut s = parts();
        s.database.user = None;
        assert_eq!(err(&s), rules::PARTS_NEED_USER.message());
        let mut s = parts();
        s.database.user_from = Some(ValueFrom::secret("x", "user"));
        assert_eq!(err(&s), rules::USER_ONCE.message());
        let mut s = parts();
        s.database.port = Some(70000);
        assert_eq!(
            err(&s),
            "spec.database.port: must be a port number from 1 to 65535, not 70000"
        );
        let mut s = parts();
        s.database.password_from = Some(ValueFrom::secret("Bad_Name", "k"));
        assert!(
            err(&s).starts_with("spec.database.passwordFrom.secretKeyRef.name: "),
            "{}",
            err(&s)
        );
        let mut s = parts();
        s.database.host = Some(" ".into());
        assert_eq!(err(&s), "spec.database.host: must not be empty");
    }

    #[test]
    fn force_partial_needs_months_back() {
        let mut s = spec();
        s.mode = Mode::Always;
        s.force_partial = true;
        assert_eq!(err(&s), rules::FORCE_PARTIAL_NEEDS_MONTHS_BACK.message());
        s.months_back = 1;
        assert!(s.validate().is_ok());
    }

    #[test]
    fn ca_secret_ref_rules() {
        let ca = CaSecretRef {
            name: "db-ca".into(),
            key: DEFAULT_CA_KEY.into(),
        };
        let mut s = spec();
        s.database.tls = Some(TlsSpec {
            mode: Some(TlsMode::Disable),
            ca_secret_ref: Some(ca.clone()),
        });
        assert!(
            err(&s)
                .starts_with("spec.database.tls.caSecretRef: has no effect with tls.mode disable")
        );

        s.database.tls = Some(TlsSpec {
            mode: Some(TlsMode::VerifyCa),
            ca_secret_ref: Some(CaSecretRef {
                name: "-bad".into(),
                ..ca.clone()
            }),
        });
        assert!(err(&s).starts_with("spec.database.tls.caSecretRef.name: "));

        s.database.tls = Some(TlsSpec {
            mode: None,
            ca_secret_ref: Some(ca.clone()),
        });
        let v = s.validate().unwrap();
        assert_eq!(v.ca, Some(ca));
        assert_eq!(v.tls_mode, None);
    }

    #[test]
    fn application_name_rules() {
        let mut s = spec();
        s.application_name = Some("migrations/usage".into());
        assert_eq!(s.validate().unwrap().application_name, "migrations/usage");
        for (bad, msg) in [
            ("", "must not be empty"),
            ("é", "printable ASCII"),
            (&"x".repeat(64), "at most 63"),
        ] {
            s.application_name = Some(bad.to_owned());
            let e = err(&s);
            assert!(
                e.starts_with("spec.applicationName: ") && e.contains(msg),
                "{e}"
            );
        }
    }

    #[test]
    fn set_slices_keeps_progress_in_step() {
        let mut status = UsageBackfillStatus::default();
        status.set_slices(3, 12);
        assert_eq!(status.progress.as_deref(), Some("3/12"));
        assert_eq!(
            (status.slices_processed, status.slices_total),
            (Some(3), Some(12))
        );
    }

    #[test]
    fn enum_names_match_serde() {
        for p in [
            Phase::Pending,
            Phase::WaitingForLock,
            Phase::Running,
            Phase::Succeeded,
            Phase::Failed,
        ] {
            assert_eq!(
                serde_json::to_value(p).unwrap(),
                serde_json::json!(p.as_str())
            );
        }
        for r in [
            BackfillResult::Backfilled,
            BackfillResult::Skipped,
            BackfillResult::DryRun,
        ] {
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::json!(r.as_str())
            );
        }
        for r in [
            SkipReason::RollupStateMissing,
            SkipReason::TaskUsageEmpty,
            SkipReason::WatermarkWithinThreshold,
        ] {
            assert_eq!(
                serde_json::to_value(r).unwrap(),
                serde_json::json!(r.as_str())
            );
        }
        for t in [TuningPreset::Tuned, TuningPreset::ServerDefaults] {
            assert_eq!(
                serde_json::to_value(t).unwrap(),
                serde_json::json!(t.as_str())
            );
        }
        for m in [Mode::IfLagging, Mode::Always] {
            assert_eq!(
                serde_json::to_value(m).unwrap(),
                serde_json::json!(m.as_str())
            );
        }
        assert!(Phase::Failed.is_finished() && !Phase::WaitingForLock.is_finished());
    }
}
