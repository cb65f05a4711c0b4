//! `UsageBackfillSpec::validate`: the pure check of a spec into a `ValidSpec`, with errors naming the field.

use super::*;

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
            .find(|name| !usage_backfill_limits::is_setting_name(name))
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
            .map(parse_max_slice_duration)
            .transpose()?;

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
pub(crate) fn broken(rule: rules::Rule) -> SpecError {
    invalid(rule.field, rule.problem)
}

/// Field paths and limits of one value of the connection in parts.
pub(crate) struct PartFields {
    literal: &'static str,
    name: &'static str,
    key: &'static str,
    once: rules::Rule,
    max_len: usize,
}

pub(crate) const HOST: PartFields = PartFields {
    literal: "database.host",
    name: "database.hostFrom.secretKeyRef.name",
    key: "database.hostFrom.secretKeyRef.key",
    once: rules::HOST_ONCE,
    max_len: MAX_HOST_LEN,
};
pub(crate) const PORT: PartFields = PartFields {
    literal: "database.port",
    name: "database.portFrom.secretKeyRef.name",
    key: "database.portFrom.secretKeyRef.key",
    once: rules::PORT_ONCE,
    max_len: 5,
};
pub(crate) const DATABASE: PartFields = PartFields {
    literal: "database.database",
    name: "database.databaseFrom.secretKeyRef.name",
    key: "database.databaseFrom.secretKeyRef.key",
    once: rules::DATABASE_ONCE,
    max_len: MAX_IDENTIFIER_LEN,
};
pub(crate) const USER: PartFields = PartFields {
    literal: "database.user",
    name: "database.userFrom.secretKeyRef.name",
    key: "database.userFrom.secretKeyRef.key",
    once: rules::USER_ONCE,
    max_len: MAX_IDENTIFIER_LEN,
};

/// Exactly one form: the connection string in a Secret, or the parts.
pub(crate) fn connection(db: &DatabaseSpec) -> Result<Connection, SpecError> {
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
pub(crate) fn part(
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

pub(crate) fn invalid(field: &'static str, problem: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        field,
        problem: problem.into(),
    }
}

/// A count of the spec: stored as i64 so that any integer the API server
/// accepts deserializes (one undecodable object would fail the controller's
/// whole list), checked here.
pub(crate) fn count(field: &'static str, value: i64) -> Result<u32, SpecError> {
    u32::try_from(value).map_err(|_| {
        invalid(
            field,
            format!("must be a whole number from 0 to {}, not {value}", u32::MAX),
        )
    })
}

/// spec.maxSliceDuration by the rule the command line applies too.
fn parse_max_slice_duration(value: &str) -> Result<Duration, SpecError> {
    use usage_backfill_limits::SliceTargetError;
    const FIELD: &str = "maxSliceDuration";
    usage_backfill_limits::parse_max_slice_duration(value).map_err(|e| match e {
        SliceTargetError::Duration(error) => SpecError::Duration {
            field: FIELD,
            error,
        },
        SliceTargetError::TooShort => broken(rules::MAX_SLICE_DURATION_MIN),
        SliceTargetError::TooLong => invalid(FIELD, e.to_string()),
    })
}

pub(crate) fn parse_duration(field: &'static str, value: &str) -> Result<Duration, SpecError> {
    duration::parse(value).map_err(|error| SpecError::Duration { field, error })
}

/// DNS-1123 subdomain, as [`SECRET_NAME_PATTERN`] plus the length limit.
pub(crate) fn check_secret_name(field: &'static str, name: &str) -> Result<(), SpecError> {
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
pub(crate) fn check_secret_key(field: &'static str, key: &str) -> Result<(), SpecError> {
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
pub(crate) fn check_application_name(name: &str) -> Result<(), SpecError> {
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
