//! The desired state: `UsageBackfillSpec` (and the `UsageBackfill` kind it derives), its database, TLS, tuning and mode fields with their defaults.

use super::*;

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

pub(crate) fn default_lag_threshold() -> String {
    DEFAULT_LAG_THRESHOLD.into()
}

pub(crate) fn default_sleep_between_slices() -> String {
    DEFAULT_SLEEP_BETWEEN_SLICES.into()
}

pub(crate) fn default_backoff_limit() -> i64 {
    DEFAULT_BACKOFF_LIMIT.into()
}

pub(crate) fn default_parallelism() -> i64 {
    DEFAULT_PARALLELISM.into()
}

/// Planner settings of the backfill's sessions.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TuningSpec {
    /// Tuned: enable_nestloop off and work_mem 64MB, with which the window
    /// function's recompute uses hash joins instead of nested loops; then
    /// plan_cache_mode, work_mem (4MB tried) and enable_nestloop (on tried)
    /// chosen in turn by timing slices of the walk itself. ServerDefaults:
    /// the server's settings, exactly as the reference runs. Default:
    /// Tuned.
    #[serde(default)]
    pub preset: TuningPreset,

    /// Further session settings (name: value), applied after the preset's
    /// and winning over them; setting plan_cache_mode turns every
    /// measurement of a setting off, setting work_mem or enable_nestloop
    /// turns its own off. Names are PostgreSQL setting names; values are strings (quote
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

pub(crate) fn default_secret_key() -> String {
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

pub(crate) fn default_ca_key() -> String {
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
