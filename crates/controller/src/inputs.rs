//! What a run needs besides the spec: the connection string (and the CA
//! bundle) from Secrets of the object's own namespace, turned into the
//! engine's [`Database`] and [`Options`]. Reading is one GET per Secret;
//! everything else here is pure.

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::decide::{SecretLookup, SecretProblem};
use super::errors::{Error, Result};
use super::status::Redactor;
use usage_backfill_api::{ModeSettings, TlsMode, TuningPreset, UsageBackfillSpec, ValidSpec};
use usage_backfill_engine::{self as engine, Database, Options, Performance, Resume, Tuning};

/// The Secrets, resolved.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub lookup: SecretLookup,
    /// Present when `lookup` is `Found`.
    pub database: Option<Database>,
    /// Knows the password of the DSN read, if any.
    pub redactor: Redactor,
}

impl Inputs {
    pub fn not_read() -> Self {
        Inputs {
            lookup: SecretLookup::NotRead,
            database: None,
            redactor: Redactor::default(),
        }
    }
}

/// Reads the database Secret and, when configured, the CA Secret.
pub async fn read(
    client: &Client,
    namespace: &str,
    spec: &UsageBackfillSpec,
    valid: &ValidSpec,
) -> Result<Inputs> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let get = async |name: &str| {
        secrets.get_opt(name).await.map_err(|source| Error::Read {
            kind: "Secret",
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        })
    };
    let db_secret = get(&valid.secret.name).await?;
    let ca_secret = match (&valid.ca, &db_secret) {
        (Some(ca), Some(_)) => Some(get(&ca.name).await?),
        _ => None,
    };
    Ok(resolve(
        spec.application_name.is_some(),
        valid,
        db_secret.as_ref(),
        ca_secret.as_ref().map(Option::as_ref),
    ))
}

/// Turns the Secrets into a [`Database`]. `ca_secret` is `None` when no CA
/// Secret is configured, `Some(None)` when it is configured but missing.
pub fn resolve(
    explicit_application_name: bool,
    valid: &ValidSpec,
    db_secret: Option<&Secret>,
    ca_secret: Option<Option<&Secret>>,
) -> Inputs {
    let problem = |p| Inputs {
        lookup: SecretLookup::Problem(p),
        ..Inputs::not_read()
    };
    let Some(db_secret) = db_secret else {
        return problem(SecretProblem::NotFound {
            name: valid.secret.name.clone(),
        });
    };
    let dsn = match value(db_secret, &valid.secret.name, &valid.secret.key) {
        Ok(bytes) => match String::from_utf8(bytes.to_vec()) {
            Ok(dsn) => dsn,
            Err(_) => {
                return problem(SecretProblem::NotUtf8 {
                    name: valid.secret.name.clone(),
                    key: valid.secret.key.clone(),
                });
            }
        },
        Err(p) => return problem(p),
    };
    let mut versions = version(db_secret);
    let mut digest_input = vec![(&valid.secret.name, &valid.secret.key, dsn.as_bytes())];
    let ca_pem = match (&valid.ca, ca_secret) {
        (Some(ca), Some(Some(secret))) => match value(secret, &ca.name, &ca.key) {
            Ok(pem) => {
                versions = format!("{versions},{}", version(secret));
                digest_input.push((&ca.name, &ca.key, pem));
                Some(pem.to_vec())
            }
            Err(p) => return problem(p),
        },
        (Some(ca), _) => {
            return problem(SecretProblem::NotFound {
                name: ca.name.clone(),
            });
        }
        (None, _) => None,
    };
    let digest = digest(&digest_input);
    let redactor = Redactor::for_dsn(&dsn);
    match database(&dsn, explicit_application_name, valid, ca_pem) {
        Ok(db) => Inputs {
            lookup: SecretLookup::Found { versions, digest },
            database: Some(db),
            redactor,
        },
        Err(error) => Inputs {
            lookup: SecretLookup::Unusable {
                versions,
                digest,
                error: engine::Error::InvalidConnectionString(redactor.redact(&match error {
                    engine::Error::InvalidConnectionString(m) => m,
                    other => other.to_string(),
                })),
            },
            database: None,
            redactor,
        },
    }
}

fn value<'a>(secret: &'a Secret, name: &str, key: &str) -> Result<&'a [u8], SecretProblem> {
    let data = secret.data.as_ref().and_then(|d| d.get(key));
    match data {
        None => Err(SecretProblem::KeyMissing {
            name: name.to_owned(),
            key: key.to_owned(),
        }),
        Some(v) if v.0.iter().all(u8::is_ascii_whitespace) => Err(SecretProblem::Empty {
            name: name.to_owned(),
            key: key.to_owned(),
        }),
        Some(v) => Ok(&v.0),
    }
}

/// PBKDF2 rounds of [`digest`]: slow enough that guessing a password from
/// a status is expensive, fast enough for a reconcile.
const DIGEST_ROUNDS: u32 = 10_000;

/// A digest of the referenced values, for `status.secretDigest`: what
/// tells a changed value from a Secret whose metadata alone changed. A
/// DSN holds a password, which may be guessable: hence a slow, salted
/// PBKDF2-HMAC-SHA256 rather than a plain hash, truncated to 128 bits.
fn digest(values: &[(&String, &String, &[u8])]) -> String {
    let mut secret = Vec::new();
    let mut salt = b"usage-backfill/secret-digest".to_vec();
    for (name, key, value) in values {
        for part in [name.as_bytes(), key.as_bytes()] {
            salt.extend_from_slice(&(part.len() as u64).to_be_bytes());
            salt.extend_from_slice(part);
        }
        secret.extend_from_slice(&(value.len() as u64).to_be_bytes());
        secret.extend_from_slice(value);
    }
    let mut out = [0u8; 16];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA256,
        std::num::NonZeroU32::new(DIGEST_ROUNDS).expect("non-zero rounds"),
        &salt,
        &secret,
        &mut out,
    );
    let hex: String = out.iter().map(|b| format!("{b:02x}")).collect();
    format!("pbkdf2-sha256:{hex}")
}

fn version(secret: &Secret) -> String {
    secret
        .metadata
        .resource_version
        .clone()
        .unwrap_or_else(|| "0".into())
}

fn database(
    dsn: &str,
    explicit_application_name: bool,
    valid: &ValidSpec,
    ca_pem: Option<Vec<u8>>,
) -> engine::Result<Database> {
    let mut db = Database::parse(dsn)?;
    // A path in the controller's filesystem is not the user's to choose.
    if db.names_ca_file() {
        return Err(engine::Error::InvalidConnectionString(
            "sslrootcert is not supported by the controller; use spec.database.tls.caSecretRef"
                .into(),
        ));
    }
    if let Some(mode) = valid.tls_mode {
        db = db.with_tls_mode(tls_mode(mode));
    }
    if let Some(pem) = ca_pem {
        db = db.with_ca_pem(pem);
    }
    if explicit_application_name {
        db = db.with_application_name(&valid.application_name);
    }
    Ok(db)
}

fn tls_mode(mode: TlsMode) -> engine::TlsMode {
    match mode {
        TlsMode::Disable => engine::TlsMode::Disable,
        TlsMode::Prefer => engine::TlsMode::Prefer,
        TlsMode::Require => engine::TlsMode::Require,
        TlsMode::VerifyCa => engine::TlsMode::VerifyCa,
        TlsMode::VerifyFull => engine::TlsMode::VerifyFull,
    }
}

/// The engine options of a run of `valid`. `session_settings` are the
/// controller's (`--set`); spec.tuning.settings win over them.
pub fn options(
    valid: &ValidSpec,
    session_settings: &[(String, String)],
    resume: Option<Resume>,
) -> Options {
    Options {
        mode: match valid.mode {
            ModeSettings::IfLagging { lag_threshold } => engine::Mode::IfLagging { lag_threshold },
            ModeSettings::Always {
                months_back,
                force_partial,
            } => engine::Mode::Always {
                months_back,
                force_partial,
            },
        },
        dry_run: valid.dry_run,
        sleep_between_slices: valid.sleep_between_slices,
        lock_timeout: valid.lock_timeout,
        slice_timeout: valid.slice_timeout,
        session_settings: engine::tuning::effective(session_settings, &valid.tuning_settings),
        resume,
        performance: Performance {
            tuning: match valid.tuning {
                TuningPreset::Tuned => Tuning::Default,
                TuningPreset::ServerDefaults => Tuning::Off,
            },
            parallelism: valid.parallelism,
            max_slice_duration: valid.max_slice_duration,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    use std::time::Duration;

    use super::*;
    use usage_backfill_api::{CaSecretRef, TlsSpec};

    fn secret(rv: &str, data: &[(&str, &[u8])]) -> Secret {
        Secret {
            metadata: ObjectMeta {
                name: Some("app-db".into()),
                resource_version: Some(rv.into()),
                ..ObjectMeta::default()
            },
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.to_vec())))
                    .collect::<BTreeMap<_, _>>(),
            ),
            ..Secret::default()
        }
    }

    fn spec() -> UsageBackfillSpec {
        UsageBackfillSpec::new("app-db")
    }

    fn problem(i: &Inputs) -> &SecretProblem {
        match &i.lookup {
            SecretLookup::Problem(p) => p,
            other => panic!("expected a problem, got {other:?}"),
        }
    }

    #[test]
    fn missing_secret_key_and_empty_values_are_problems() {
        let v = spec().validate().unwrap();
        let i = resolve(false, &v, None, None);
        assert_eq!(
            problem(&i),
            &SecretProblem::NotFound {
                name: "app-db".into()
            }
        );
        let s = secret("1", &[("OTHER", b"x")]);
        assert!(matches!(
            problem(&resolve(false, &v, Some(&s), None)),
            SecretProblem::KeyMissing { key, .. } if key == "DATABASE_URL"
        ));
        let s = secret("1", &[("DATABASE_URL", b"  \n")]);
        assert!(matches!(
            problem(&resolve(false, &v, Some(&s), None)),
            SecretProblem::Empty { .. }
        ));
        let s = secret("1", &[("DATABASE_URL", &[0xff, 0xfe])]);
        assert!(matches!(
            problem(&resolve(false, &v, Some(&s), None)),
            SecretProblem::NotUtf8 { .. }
        ));
    }

    #[test]
    fn a_good_secret_gives_a_database_and_its_versions() {
        let mut s = spec();
        s.application_name = Some("migrations".into());
        s.database.tls = Some(TlsSpec {
            mode: Some(TlsMode::VerifyFull),
            ca_secret_ref: Some(CaSecretRef {
                name: "db-ca".into(),
                key: "ca.crt".into(),
            }),
        });
        let v = s.validate().unwrap();
        let db = secret(
            "41",
            &[(
                "DATABASE_URL",
                b"postgres://app:pw@db.example/app?sslmode=disable",
            )],
        );
        let ca = secret("7", &[("ca.crt", b"-----BEGIN CERTIFICATE-----")]);
        let i = resolve(true, &v, Some(&db), Some(Some(&ca)));
        assert!(matches!(&i.lookup, SecretLookup::Found { versions, .. } if versions == "41,7"));
        let d = i.database.unwrap();
        assert_eq!(d.tls_mode, engine::TlsMode::VerifyFull);
        assert_eq!(d.application_name(), "migrations");
        assert_eq!(i.redactor.redact("pw"), "****");
        // The CA Secret configured but missing.
        let i = resolve(true, &v, Some(&db), Some(None));
        assert_eq!(
            problem(&i),
            &SecretProblem::NotFound {
                name: "db-ca".into()
            }
        );
    }

    #[test]
    fn the_digest_follows_the_value_not_the_resource_version() {
        let v = spec().validate().unwrap();
        let dsn = b"postgres://app:hunter2@db.example/app";
        let digest = |s: &Secret| match resolve(false, &v, Some(s), None).lookup {
            SecretLookup::Found { digest, .. } => digest,
            other => panic!("{other:?}"),
        };
        let first = digest(&secret("1", &[("DATABASE_URL", dsn)]));
        // A label or annotation moves the resourceVersion only.
        assert_eq!(digest(&secret("2", &[("DATABASE_URL", dsn)])), first);
        // Another key of the Secret is not ours.
        assert_eq!(
            digest(&secret("3", &[("DATABASE_URL", dsn), ("OTHER", b"x")])),
            first
        );
        let changed = digest(&secret(
            "4",
            &[("DATABASE_URL", b"postgres://app:hunter3@db.example/app")],
        ));
        assert_ne!(changed, first);
        assert!(
            first.starts_with("pbkdf2-sha256:") && first.len() == 14 + 32,
            "{first}"
        );
        assert!(!first.contains("hunter2"));
    }

    #[test]
    fn unusable_connection_strings_are_reported_without_the_password() {
        let v = spec().validate().unwrap();
        for dsn in [
            "not a dsn",
            "postgres://u:hunter2@db/app?sslmode=bogus",
            "postgres://u:hunter2@db/app?sslrootcert=/var/run/secrets/token",
        ] {
            let s = secret("3", &[("DATABASE_URL", dsn.as_bytes())]);
            let i = resolve(false, &v, Some(&s), None);
            match &i.lookup {
                SecretLookup::Unusable {
                    versions, error, ..
                } => {
                    assert_eq!(versions, "3");
                    assert_eq!(error.reason(), "InvalidConnectionString");
                    assert!(!error.to_string().contains("hunter2"), "{error}");
                }
                other => panic!("{dsn}: {other:?}"),
            }
        }
    }

    #[test]
    fn options_follow_the_spec() {
        let mut s = spec();
        s.mode = usage_backfill_api::Mode::Always;
        s.months_back = 2;
        s.dry_run = true;
        s.lock_timeout = Some("30s".into());
        let o = options(
            &s.validate().unwrap(),
            &[("enable_nestloop".into(), "off".into())],
            None,
        );
        assert_eq!(
            o.mode,
            engine::Mode::Always {
                months_back: 2,
                force_partial: false
            }
        );
        assert!(o.dry_run);
        assert_eq!(o.lock_timeout, Some(Duration::from_secs(30)));
        assert_eq!(o.session_settings.len(), 1);
        assert_eq!(o.performance, Performance::default());
    }

    #[test]
    fn performance_follows_the_spec_and_its_settings_win() {
        let kv = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let mut s = spec();
        s.tuning = Some(usage_backfill_api::TuningSpec {
            preset: TuningPreset::ServerDefaults,
            settings: [kv("work_mem", "64MB")].into(),
        });
        s.parallelism = 1;
        s.max_slice_duration = Some("90s".into());
        let o = options(
            &s.validate().unwrap(),
            &[kv("WORK_MEM", "8MB"), kv("jit", "off")],
            None,
        );
        assert_eq!(
            o.performance,
            Performance {
                tuning: Tuning::Off,
                parallelism: 1,
                max_slice_duration: Some(Duration::from_secs(90)),
            }
        );
        // The controller's --set first, the spec's winning (names compare
        // case-insensitively, as PostgreSQL's do).
        assert_eq!(
            o.session_settings,
            [kv("jit", "off"), kv("work_mem", "64MB")]
        );
        assert_eq!(o.effective_settings(), o.session_settings);
        // The default preset's settings come first and lose to both.
        s.tuning = Some(usage_backfill_api::TuningSpec {
            preset: TuningPreset::Tuned,
            settings: [kv("enable_nestloop", "on")].into(),
        });
        let o = options(&s.validate().unwrap(), &[], None);
        assert_eq!(
            o.effective_settings(),
            [kv("work_mem", "4MB"), kv("enable_nestloop", "on")]
        );
    }
}
