//! What a run needs besides the spec: the connection string, or the
//! connection in parts, and the CA bundle from Secrets of the object's own
//! namespace, turned into the engine's [`Database`] and [`Options`]. Reading
//! is one GET per Secret; everything else here is pure. A password read
//! from a Secret goes to the engine as bytes, never into a string.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{Api, Client};

use super::convert;
use super::decide::{SecretLookup, SecretProblem};
use super::errors::{Error, Result};
use super::status::Redactor;
use usage_backfill_api::{Connection, Part, PartsSpec, SecretKeyRef, UsageBackfillSpec, ValidSpec};
use usage_backfill_engine::{
    self as engine, ConnectionParts, Database, Options, Password, Performance, Resume,
};

/// The Secrets, resolved.
#[derive(Debug, Clone)]
pub(crate) struct Inputs {
    pub lookup: SecretLookup,
    /// Present when `lookup` is `Found`.
    pub database: Option<Database>,
    /// Knows the password of the DSN read, if any.
    pub redactor: Redactor,
}

impl Inputs {
    pub(crate) fn not_read() -> Self {
        Inputs {
            lookup: SecretLookup::NotRead,
            database: None,
            redactor: Redactor::default(),
        }
    }
}

/// Reads every Secret the spec references (connection string or parts,
/// CA bundle), one GET each.
pub(crate) async fn read(
    client: &Client,
    namespace: &str,
    spec: &UsageBackfillSpec,
    valid: &ValidSpec,
) -> Result<Inputs> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut found = Secrets::new();
    for name in spec.database.secret_names() {
        let secret = secrets.get_opt(name).await.map_err(|source| Error::Read {
            kind: "Secret",
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            source,
        })?;
        if let Some(secret) = secret {
            found.insert(name.to_owned(), secret);
        }
    }
    Ok(resolve(spec.application_name.is_some(), valid, &found))
}

/// The referenced Secrets that exist, by name.
pub(crate) type Secrets = BTreeMap<String, Secret>;

/// Turns the Secrets into a [`Database`]: the first missing Secret or key,
/// in spec order, is the problem reported.
pub(crate) fn resolve(
    explicit_application_name: bool,
    valid: &ValidSpec,
    secrets: &Secrets,
) -> Inputs {
    let problem = |p| Inputs {
        lookup: SecretLookup::Problem(p),
        ..Inputs::not_read()
    };
    let mut read = Read {
        secrets,
        versions: Vec::new(),
        values: Vec::new(),
    };
    let built = match &valid.connection {
        Connection::Dsn(secret) => read
            .text(&SecretKeyRef::new(&secret.name, &secret.key))
            .map(Built::Dsn),
        Connection::Parts(parts) => read.parts(parts).map(Built::Parts),
    };
    let built = match built {
        Ok(b) => b,
        Err(p) => return problem(p),
    };
    let ca_pem = match &valid.ca {
        Some(ca) => match read.bytes(&SecretKeyRef::new(&ca.name, &ca.key)) {
            Ok(pem) => Some(pem.to_vec()),
            Err(p) => return problem(p),
        },
        None => None,
    };
    let versions: Vec<&str> = read.versions.iter().map(|(_, v)| v.as_str()).collect();
    let versions = versions.join(",");
    let digest = digest(&read.values);
    let (redactor, db) = match built {
        Built::Dsn(dsn) => (Redactor::for_dsn(&dsn), Database::parse(&dsn)),
        Built::Parts(Ok(parts)) => (
            Redactor::for_password(parts.password_bytes.as_deref().unwrap_or_default()),
            Database::from_parts(parts.engine),
        ),
        Built::Parts(Err(error)) => (Redactor::default(), Err(error)),
    };
    match db.and_then(|db| configure(db, explicit_application_name, valid, ca_pem)) {
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

/// What the Secrets gave for the connection.
enum Built {
    Dsn(String),
    /// Err: a value read is unusable (e.g. a port that is not a number).
    Parts(engine::Result<ResolvedParts>),
}

struct ResolvedParts {
    engine: ConnectionParts,
    /// A copy for the redactor only.
    password_bytes: Option<Vec<u8>>,
}

/// Reads keys of the fetched Secrets, noting the resourceVersion of each
/// Secret used, once, in the order used, and each key's value for the
/// [`digest`].
struct Read<'a> {
    secrets: &'a Secrets,
    versions: Vec<(String, String)>,
    values: Vec<(String, String, &'a [u8])>,
}

impl<'a> Read<'a> {
    fn bytes(&mut self, r: &SecretKeyRef) -> Result<&'a [u8], SecretProblem> {
        let Some(secret) = self.secrets.get(&r.name) else {
            return Err(SecretProblem::NotFound {
                name: r.name.clone(),
            });
        };
        if !self.versions.iter().any(|(n, _)| *n == r.name) {
            self.versions.push((r.name.clone(), version(secret)));
        }
        let bytes = value(secret, &r.name, &r.key)?;
        if !self
            .values
            .iter()
            .any(|(n, k, _)| *n == r.name && *k == r.key)
        {
            self.values.push((r.name.clone(), r.key.clone(), bytes));
        }
        Ok(bytes)
    }

    fn text(&mut self, r: &SecretKeyRef) -> Result<String, SecretProblem> {
        let bytes = self.bytes(r)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| SecretProblem::NotUtf8 {
            name: r.name.clone(),
            key: r.key.clone(),
        })
    }

    fn part(&mut self, part: &Part) -> Result<String, SecretProblem> {
        match part {
            Part::Literal(v) => Ok(v.clone()),
            Part::FromSecret(r) => Ok(self.text(r)?.trim().to_owned()),
        }
    }

    fn parts(&mut self, p: &PartsSpec) -> Result<engine::Result<ResolvedParts>, SecretProblem> {
        let host = self.part(&p.host)?;
        let port = match &p.port {
            Some(part) => Some((self.part(part)?, part)),
            None => None,
        };
        let dbname = p.database.as_ref().map(|d| self.part(d)).transpose()?;
        let user = self.part(&p.user)?;
        let password = p
            .password
            .as_ref()
            .map(|r| self.bytes(r).map(<[u8]>::to_vec))
            .transpose()?;
        let port = match port {
            None => None,
            Some((text, part)) => match text.parse::<u16>() {
                Ok(n) if n > 0 => Some(n),
                // Never echo the value: the key may hold anything.
                _ => {
                    return Ok(Err(engine::Error::InvalidConnectionString(match part {
                        Part::FromSecret(r) => format!(
                            "key {:?} of Secret {:?} is not a port number (1 to 65535)",
                            r.key, r.name
                        ),
                        Part::Literal(_) => "the port is not a number from 1 to 65535".into(),
                    })));
                }
            },
        };
        Ok(Ok(ResolvedParts {
            engine: ConnectionParts {
                host,
                port,
                dbname,
                user,
                password: password.clone().map(Password::new),
            },
            password_bytes: password,
        }))
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
fn digest(values: &[(String, String, &[u8])]) -> String {
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

/// The spec's TLS settings, CA bundle and application name on top of what
/// the Secrets gave.
fn configure(
    mut db: Database,
    explicit_application_name: bool,
    valid: &ValidSpec,
    ca_pem: Option<Vec<u8>>,
) -> engine::Result<Database> {
    // A path in the controller's filesystem is not the user's to choose.
    if db.names_ca_file() {
        return Err(engine::Error::InvalidConnectionString(
            "sslrootcert is not supported by the controller; use spec.database.tls.caSecretRef"
                .into(),
        ));
    }
    if let Some(mode) = valid.tls_mode {
        db = db.with_tls_mode(convert::tls_mode(mode));
    }
    if let Some(pem) = ca_pem {
        db = db.with_ca_pem(pem);
    }
    if explicit_application_name {
        db = db.with_application_name(&valid.application_name);
    }
    Ok(db)
}

/// The engine options of a run of `valid`. `session_settings` are the
/// controller's (`--set`); spec.tuning.settings win over them.
pub(crate) fn options(
    valid: &ValidSpec,
    session_settings: &[(String, String)],
    resume: Option<Resume>,
) -> Options {
    Options {
        mode: convert::mode(valid.mode),
        dry_run: valid.dry_run,
        sleep_between_slices: valid.sleep_between_slices,
        lock_timeout: valid.lock_timeout,
        slice_timeout: valid.slice_timeout,
        session_settings: engine::effective_settings(session_settings, &valid.tuning_settings),
        resume,
        performance: Performance {
            tuning: convert::tuning(valid.tuning),
            parallelism: valid.parallelism,
            max_slice_duration: valid.max_slice_duration,
        },
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    use std::time::Duration;

    use super::*;
    use usage_backfill_api::{
        CaSecretRef, DatabaseSpec, TlsMode, TlsSpec, TuningPreset, ValueFrom,
    };
    use usage_backfill_engine::Tuning;

    /// The Secrets by name.
    fn secrets(list: &[(&str, &Secret)]) -> Secrets {
        list.iter()
            .map(|(n, s)| (n.to_string(), (*s).clone()))
            .collect()
    }

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
        let i = resolve(false, &v, &Secrets::new());
        assert_eq!(
            problem(&i),
            &SecretProblem::NotFound {
                name: "app-db".into()
            }
        );
        let s = secret("1", &[("OTHER", b"x")]);
        assert!(matches!(
            problem(&resolve(false, &v, &secrets(&[("app-db", &s)]))),
            SecretProblem::KeyMissing { key, .. } if key == "DATABASE_URL"
        ));
        let s = secret("1", &[("DATABASE_URL", b"  \n")]);
        assert!(matches!(
            problem(&resolve(false, &v, &secrets(&[("app-db", &s)]))),
            SecretProblem::Empty { .. }
        ));
        let s = secret("1", &[("DATABASE_URL", &[0xff, 0xfe])]);
        assert!(matches!(
            problem(&resolve(false, &v, &secrets(&[("app-db", &s)]))),
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
        let i = resolve(true, &v, &secrets(&[("app-db", &db), ("db-ca", &ca)]));
        assert!(matches!(&i.lookup, SecretLookup::Found { versions, .. } if versions == "41,7"));
        let d = i.database.unwrap();
        assert_eq!(d.tls_mode, engine::TlsMode::VerifyFull);
        assert_eq!(d.application_name(), "migrations");
        assert_eq!(i.redactor.redact("pw"), "****");
        // The CA Secret configured but missing.
        let i = resolve(true, &v, &secrets(&[("app-db", &db)]));
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
        let digest = |s: &Secret| match resolve(false, &v, &secrets(&[("app-db", s)])).lookup {
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
            let i = resolve(false, &v, &secrets(&[("app-db", &s)]));
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

    /// The application chart's default install: host, user and database
    /// literal, the password in multica-secrets; here the user comes from a
    /// second Secret.
    fn parts_spec() -> UsageBackfillSpec {
        let mut s = spec();
        s.database = DatabaseSpec {
            host: Some("shop-postgres".into()),
            port_from: Some(ValueFrom::secret("db-coords", "PORT")),
            database: Some("multica".into()),
            user_from: Some(ValueFrom::secret("db-coords", "USER")),
            password_from: Some(ValueFrom::secret("multica-secrets", "POSTGRES_PASSWORD")),
            ..DatabaseSpec::default()
        };
        s
    }

    #[test]
    fn parts_from_two_secrets_give_a_database_and_both_versions() {
        let v = parts_spec().validate().unwrap();
        let coords = secret("12", &[("PORT", b"6432\n"), ("USER", b"multica")]);
        let app = secret("5", &[("POSTGRES_PASSWORD", b"Rt-93a1-pass word")]);
        let i = resolve(
            false,
            &v,
            &secrets(&[("db-coords", &coords), ("multica-secrets", &app)]),
        );
        assert!(
            matches!(&i.lookup, SecretLookup::Found { versions, .. } if versions == "12,5"),
            "{:?}",
            i.lookup
        );
        let d = i.database.unwrap();
        assert_eq!(d.describe(), "multica@shop-postgres:6432/multica");
        assert_eq!(d.tls_mode, engine::TlsMode::Prefer);
        assert!(!format!("{d:?}").contains("Rt-93a1"));
        assert_eq!(i.redactor.redact("x Rt-93a1-pass word y"), "x **** y");
    }

    #[test]
    fn parts_problems_name_the_secret_and_key_never_the_values() {
        let v = parts_spec().validate().unwrap();
        let coords = secret("12", &[("PORT", b"5432"), ("USER", b"multica")]);
        // The password's Secret is missing.
        let i = resolve(false, &v, &secrets(&[("db-coords", &coords)]));
        assert_eq!(
            problem(&i),
            &SecretProblem::NotFound {
                name: "multica-secrets".into()
            }
        );
        // It exists without the key.
        let app = secret("5", &[("JWT_SECRET", b"Jw-5511-token")]);
        let i = resolve(
            false,
            &v,
            &secrets(&[("db-coords", &coords), ("multica-secrets", &app)]),
        );
        assert_eq!(
            problem(&i),
            &SecretProblem::KeyMissing {
                name: "multica-secrets".into(),
                key: "POSTGRES_PASSWORD".into()
            }
        );
        assert_eq!(
            problem(&i).to_string(),
            r#"Secret "multica-secrets" has no key "POSTGRES_PASSWORD""#
        );
        // A port that is no number: unusable, the value not echoed.
        let coords = secret("13", &[("PORT", b"Pw-0042-oops"), ("USER", b"multica")]);
        let app = secret("5", &[("POSTGRES_PASSWORD", b"pw")]);
        let i = resolve(
            false,
            &v,
            &secrets(&[("db-coords", &coords), ("multica-secrets", &app)]),
        );
        match &i.lookup {
            SecretLookup::Unusable {
                versions, error, ..
            } => {
                assert_eq!(versions, "13,5");
                let text = error.to_string();
                assert!(
                    text.contains(r#"key "PORT" of Secret "db-coords" is not a port number"#),
                    "{text}"
                );
                assert!(!text.contains("Pw-0042"), "{text}");
            }
            other => panic!("{other:?}"),
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
            [kv("work_mem", "64MB"), kv("enable_nestloop", "on")]
        );
    }
}
