//! Bad input through the controller.

use super::*;

// ---------------------------------------------------------------------------
// Bad input through the controller
// ---------------------------------------------------------------------------

/// One reconcile of a fresh object whose input is bad: the status, the
/// Events, and proof that the database was not written.
async fn bad_input(
    h: &Harness,
    name: &str,
    edit: impl FnOnce(&mut UsageBackfillSpec),
) -> (UsageBackfillStatus, Vec<(String, String, String)>) {
    let before = untouched(&h.pg).await;
    h.create(name, edit);
    settle_bad_input(h, name, before).await
}

/// As [`bad_input`], for a spec the CRD's schema refuses: an object
/// stored before the schema forbade it, which the apiserver still serves.
async fn bad_stored_input(
    h: &Harness,
    name: &str,
    edit: impl FnOnce(&mut UsageBackfillSpec),
) -> (UsageBackfillStatus, Vec<(String, String, String)>) {
    let before = untouched(&h.pg).await;
    let mut spec = UsageBackfillSpec::new(SECRET);
    edit(&mut spec);
    h.fake
        .create_legacy(NS, name, serde_json::to_value(&spec).unwrap());
    settle_bad_input(h, name, before).await
}

async fn settle_bad_input(
    h: &Harness,
    name: &str,
    before: Untouched,
) -> (UsageBackfillStatus, Vec<(String, String, String)>) {
    let status = h.attempt(name).await;
    // Terminal (or waiting) input problems settle: a second reconcile
    // writes nothing new.
    let writes = h.fake.status_writes(name).len();
    h.reconcile(name).await;
    assert_eq!(
        h.fake.status_writes(name).len(),
        writes,
        "{name}: no write loop"
    );
    assert_eq!(untouched(&h.pg).await, before, "{name}: no database write");
    assert!(lock_4246(&h.pg).await.is_empty());
    (status, h.fake.events(name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_secret_values_are_reported_specifically_without_a_database_write() {
    let h = instrumented(Some(history())).await;

    // An empty value: waiting for the Secret to be fixed, not failed.
    h.fake.put_secret(NS, SECRET, "DATABASE_URL", " \n");
    let (s, events) = bad_input(&h, "empty", |_| {}).await;
    assert_eq!(s.phase, Some(Phase::Pending));
    assert_eq!(conds(&s), in_progress("SecretKeyMissing"));
    assert!(
        message(&s, ConditionType::Reconciling)
            .starts_with("key \"DATABASE_URL\" of Secret \"app-db\" is empty"),
        "{}",
        message(&s, ConditionType::Reconciling)
    );
    assert_eq!(s.attempts, None, "not an attempt");
    assert_eq!(events.len(), 1);
    assert_eq!(
        (events[0].0.as_str(), events[0].1.as_str()),
        ("SecretKeyMissing", "Warning")
    );

    // Garbage: terminal until the Secret changes.
    for (name, dsn, says) in [
        (
            "garbage",
            "this is not a connection string",
            "invalid database connection string",
        ),
        (
            "garbage-url",
            "postgres://app:Gb7-secret-Gb7@db.example:notaport/app",
            "invalid database connection string",
        ),
        (
            "no-host",
            "postgres://app:Gb7-secret-Gb7@/app",
            "invalid database connection string",
        ),
    ] {
        h.fake.put_secret(NS, SECRET, "DATABASE_URL", dsn);
        let (s, events) = bad_input(&h, name, |_| {}).await;
        assert_eq!(s.phase, Some(Phase::Failed), "{name}: {s:?}");
        assert_eq!(conds(&s), stalled("InvalidConnectionString"), "{name}");
        let msg = message(&s, ConditionType::Stalled);
        assert!(msg.starts_with(says), "{name}: {msg}");
        assert!(!msg.contains("Gb7-secret-Gb7"), "{name}: {msg}");
        assert_eq!(events.len(), 1, "{name}: {events:?}");
        assert_eq!(
            (events[0].0.as_str(), events[0].1.as_str()),
            ("Failed", "Warning")
        );
        assert!(!controller::has_finalizer(&h.fake.get(NS, name).unwrap()));
    }
    h.assert_never_sent(&["Gb7-secret-Gb7"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_durations_in_the_spec_are_stalled_with_the_field_named() {
    let h = instrumented(Some(history())).await;
    h.put_secret();
    for (name, edit, field) in [
        (
            "lag",
            Box::new(|s: &mut UsageBackfillSpec| s.lag_threshold = "1x".into())
                as Box<dyn FnOnce(&mut UsageBackfillSpec)>,
            "spec.lagThreshold",
        ),
        (
            "sleep",
            Box::new(|s: &mut UsageBackfillSpec| s.sleep_between_slices = "-5s".into()),
            "spec.sleepBetweenSlices",
        ),
        (
            "lock",
            Box::new(|s: &mut UsageBackfillSpec| s.lock_timeout = Some("forever".into())),
            "spec.lockTimeout",
        ),
        (
            "slice",
            Box::new(|s: &mut UsageBackfillSpec| s.slice_timeout = Some("0s".into())),
            "spec.sliceTimeout",
        ),
    ] {
        let (s, events) = bad_stored_input(&h, name, edit).await;
        assert_eq!(s.phase, Some(Phase::Failed), "{name}");
        assert_eq!(conds(&s), stalled("InvalidSpec"), "{name}");
        let msg = message(&s, ConditionType::Stalled);
        assert!(msg.starts_with(&format!("{field}: ")), "{name}: {msg}");
        assert_eq!(
            events.iter().map(|e| e.0.as_str()).collect::<Vec<_>>(),
            ["InvalidSpec"],
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_state_problems_are_stalled_with_a_specific_reason_and_no_write() {
    let h = instrumented(Some(history())).await;
    h.put_secret();

    // Months back without forcePartial would abandon older history.
    let (s, events) = bad_input(&h, "partial", |s| {
        s.mode = Mode::Always;
        s.months_back = 1;
    })
    .await;
    assert_eq!(s.phase, Some(Phase::Failed));
    assert_eq!(conds(&s), stalled("PartialRangeRefused"));
    let msg = message(&s, ConditionType::Stalled);
    assert!(msg.starts_with("starting 1 month(s) back, at "), "{msg}");
    assert!(
        msg.contains("spec.forcePartial: true"),
        "the resource's own field is named: {msg}"
    );
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("Failed"));

    // A NULL watermark needs a person.
    h.pg.batch_execute(
        "ALTER TABLE task_usage_hourly_rollup_state ALTER COLUMN watermark_at DROP NOT NULL;
         UPDATE task_usage_hourly_rollup_state SET watermark_at = NULL;",
    )
    .await
    .unwrap();
    let (s, events) = bad_input(&h, "null-watermark", |_| {}).await;
    assert_eq!(conds(&s), stalled("ManualInterventionRequired"));
    assert!(message(&s, ConditionType::Stalled).contains("watermark is NULL"));
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("Failed"));
    fixture::set_watermark(&h.pg, Some(Timestamp::UNIX_EPOCH))
        .await
        .unwrap();

    // The window function missing (migrations not run).
    h.pg.batch_execute(
        "ALTER FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) RENAME TO not_yet",
    )
    .await
    .unwrap();
    let (s, events) = bad_input(&h, "no-function", |_| {}).await;
    assert_eq!(conds(&s), stalled("SchemaMissing"));
    assert!(
        message(&s, ConditionType::Stalled).contains(
            "function rollup_task_usage_hourly_window(timestamptz, timestamptz) is missing"
        ),
        "{}",
        message(&s, ConditionType::Stalled)
    );
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("Failed"));

    // No rollup tables at all, with the command (Always) that needs them.
    fixture::drop_rollup_state_table(&h.pg).await.unwrap();
    let (s, events) = bad_input(&h, "no-tables", |s| s.mode = Mode::Always).await;
    assert_eq!(conds(&s), stalled("RollupStateMissing"));
    assert!(message(&s, ConditionType::Stalled).contains("does not exist"));
    assert_eq!(events.last().map(|e| e.0.as_str()), Some("Failed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_verify_full_refuses_a_foreign_ca_and_a_wrong_name_then_connects() {
    let ca = TestCa::new("usage-backfill");
    // The certificate names localhost only, not 127.0.0.1.
    let server = tls::postgres(ca.server_cert(&["localhost"])).await;
    let (by_ip, pg) = testkit::fixture_database(&server, "usage").await;
    let by_name = by_ip.replace("@127.0.0.1:", "@localhost:");
    fixture::generate(&pg, &history()).await.unwrap();
    instrument(&pg).await;
    drop(pg);
    let h = Harness::on(&by_ip, settings()).await;
    let before = untouched(&h.pg).await;
    let tls = TlsSpec {
        mode: Some(TlsMode::VerifyFull),
        ca_secret_ref: Some(CaSecretRef {
            name: "db-ca".into(),
            key: "ca.crt".into(),
        }),
    };

    // 1. The right name, a CA that did not sign the server certificate.
    let foreign = TestCa::new("someone-else");
    h.fake.put_secret(NS, SECRET, "DATABASE_URL", &by_name);
    h.fake.put_secret(NS, "db-ca", "ca.crt", &foreign.pem);
    h.apply(UsageBackfillBuilder::new("tls").tls(tls));
    let s = h.attempt("tls").await;
    assert_eq!(conds(&s), retry_scheduled("TlsHandshakeFailed"), "{s:?}");
    let error = s.last_error.clone().unwrap();
    assert!(error.contains("certificate"), "{error}");
    assert_eq!(untouched(&h.pg).await, before, "no database write");
    assert_eq!(h.fake.event_reasons("tls"), ["Started", "RetryScheduled"]);

    // 2. The right CA, the server reached by an address its certificate
    //    does not name.
    h.fake.put_secret(NS, "db-ca", "ca.crt", &ca.pem);
    h.fake.put_secret(NS, SECRET, "DATABASE_URL", &by_ip);
    let s = h.attempt("tls").await;
    assert_eq!(
        cond(&s, ConditionType::Reconciling),
        is("True", "TlsHandshakeFailed"),
        "{s:?}"
    );
    let error = s.last_error.clone().unwrap();
    assert!(
        error.contains("name") || error.contains("127.0.0.1"),
        "says the name does not match: {error}"
    );
    assert_ne!(s.last_error.as_deref(), None);
    assert_eq!(untouched(&h.pg).await, before, "no database write");

    // 3. The right CA and the right name: verify-full connects and runs.
    h.fake.put_secret(NS, SECRET, "DATABASE_URL", &by_name);
    let done = h.run_to_end("tls").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled), "{done:?}");
    assert_recovered(&h.pg, 1).await;
    h.assert_never_sent(&[server.password()]);
}

/// Numbers the typed spec cannot hold. The CRD schema rejects a negative
/// backoffLimit (minimum 0) but has no maximum, so 2^32 reaches the
/// controller through a real API server too; -1 does with a CRD installed
/// without its schema. Either must be reported on the object itself, and
/// must not stop the controller from serving the other objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_out_of_range_are_reported_and_do_not_block_other_objects() {
    let h = instrumented(Some(history())).await;
    h.put_secret();
    let secret_ref = json!({ "secretRef": { "name": SECRET } });
    // Both refused by today's schema: stored under an older one.
    h.fake.create_legacy(
        NS,
        "negative",
        json!({ "database": secret_ref, "backoffLimit": -1 }),
    );
    h.fake.create_legacy(
        NS,
        "huge",
        json!({ "database": secret_ref, "mode": "Always", "monthsBack": 4294967296u64 }),
    );
    h.apply(UsageBackfillBuilder::new("healthy"));
    let cancel = tokio_util::sync::CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let controller = tokio::spawn(controller::run_controllers(
        h.ctx.clone(),
        vec![NS.to_owned()],
        4,
        ready.clone(),
        WAIT,
        cancel.clone(),
    ));

    // The well-formed object is served, and each malformed one says what
    // is wrong with it.
    let check = || {
        let synced = ready.load(Ordering::Acquire);
        let served = h
            .fake
            .get(NS, "healthy")
            .and_then(|o| o.status)
            .and_then(|s| s.phase)
            == Some(Phase::Succeeded);
        let reported: Vec<(&str, bool, Option<serde_json::Value>)> =
            [("negative", "backoffLimit"), ("huge", "monthsBack")]
                .into_iter()
                .map(|(name, field)| {
                    let status = h.fake.get_raw(NS, name).unwrap()["status"].clone();
                    let stalled = status["conditions"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|c| c["type"] == "Stalled" && c["status"] == "True")
                        .cloned();
                    let ok = stalled.as_ref().is_some_and(|c| {
                        c["reason"] == "InvalidSpec"
                            && c["message"].as_str().is_some_and(|m| m.contains(field))
                    }) && h
                        .fake
                        .event_reasons(name)
                        .contains(&"InvalidSpec".to_owned());
                    (name, ok, stalled)
                })
                .collect();
        (synced, served, reported)
    };
    let _ = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let (synced, served, reported) = check();
            if synced && served && reported.iter().all(|r| r.1) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let (synced, served, reported) = check();
    cancel.cancel();
    // (Bounded: see the next test for a controller that never stops.)
    let stopped = tokio::time::timeout(Duration::from_secs(5), controller).await;
    assert!(
        synced && served,
        "one malformed UsageBackfill stops the controller for every object in its \
         namespace (cache synced: {synced}, healthy served: {served}); requests:\n{}",
        h.fake.describe_requests()
    );
    for (name, ok, stalled) in reported {
        assert!(
            ok,
            "{name}: no InvalidSpec status naming the field: {stalled:?}"
        );
    }
    assert!(stopped.is_ok(), "the controller stops when cancelled");
    assert_recovered(&h.pg, 1).await;
}

/// SIGTERM (or the loss of leadership) before the UsageBackfill cache has
/// synced, e.g. while the API server does not answer (or RBAC denies the
/// list, or a malformed object fails it): the controller must stop
/// within the shutdown timeout, not hang until the kubelet's SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_never_synced_stops_when_cancelled() {
    let (client, fake) = FakeApiServer::start();
    // The API server does not answer the client start() returned
    // (client 0): a partition at startup.
    fake.cut(0, Some(testkit::Outage::Hang));
    let ctx = Context::new(client, settings());
    let cancel = tokio_util::sync::CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let controller = tokio::spawn(controller::run_controllers(
        ctx,
        vec![NS.to_owned()],
        4,
        ready.clone(),
        Duration::from_secs(2),
        cancel.clone(),
    ));
    fake.wait_for("the list to hang", WAIT, |f| {
        (f.hung_requests() >= 1).then_some(())
    })
    .await;
    cancel.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(10), controller).await;
    assert!(!ready.load(Ordering::Acquire));
    assert!(
        stopped.is_ok(),
        "run_controllers did not return within 10 s of its cancellation \
         (shutdown timeout 2 s) because the cache never synced"
    );
}

/// The command line's side of "negative numbers": clap's range check names
/// the flag and the allowed range; exit code 2 (usage), nothing run.
#[test]
fn cli_rejects_negative_and_out_of_range_numbers_with_exit_2() {
    let url = "postgres://u@127.0.0.1:1/d";
    for (args, says) in [
        (
            vec!["--mode", "always", "--months-back=-1"],
            "invalid value '-1' for '--months-back <MONTHS_BACK>'",
        ),
        (
            vec!["--mode", "always", "--months-back", "4294967296"],
            "invalid value '4294967296' for '--months-back <MONTHS_BACK>'",
        ),
        (
            vec!["--sleep-between-slices=-5s"],
            "negative durations are not allowed",
        ),
        (vec!["--lock-timeout", "1x"], "--lock-timeout"),
        // A bare -1 reads as a flag: still exit 2, naming it.
        (vec!["--mode", "always", "--months-back", "-1"], "'-1'"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_usage-backfill"))
            .args(["backfill", "--database-url", url])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
