//! Unit tests of the types, the validation and the generated CRD.

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
    let parsed: UsageBackfillSpec =
        serde_json::from_value(serde_json::json!({"database": {"secretRef": {"name": "app-db"}}}))
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
                    == format!("spec.parallelism: must be a whole number from 1 to 16, not {p}"),
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
        err(&s).starts_with(r#"spec.database.secretRef.name: "App_DB" is not a valid Secret name"#)
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
        err(&s).starts_with("spec.database.tls.caSecretRef: has no effect with tls.mode disable")
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
