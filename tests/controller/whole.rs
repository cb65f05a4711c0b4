//! The whole controller: watches, the Secret mapping, graceful shutdown.

use super::*;

// ---------------------------------------------------------------------------
// The whole controller: watches, the Secret mapping, graceful shutdown
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_reacts_to_secrets_and_shuts_down_gracefully() {
    // With the Secret watch (--watch-secrets); the default, get-only mode:
    // tests/controller/secrets_access.rs.
    let mut settings = settings();
    settings.watch_secrets = true;
    let h = Harness::with_settings(Some(slow_history()), settings).await;
    let (cancel, controller) = h.start_controller().await;

    // No Secret yet: waiting, reported.
    h.apply(UsageBackfillBuilder::new("watched"));
    h.fake
        .wait_for("SecretNotFound", WAIT, |f| {
            let s = f.get(NS, "watched")?.status?;
            (cond(&s, ConditionType::Reconciling) == is("True", "SecretNotFound")).then_some(())
        })
        .await;
    // The Secret appears: the Secret watch maps it to the object, which runs.
    h.put_secret();
    let done = h
        .fake
        .wait_for("Succeeded", WAIT, |f| {
            let o = f.get(NS, "watched")?;
            let s = o.status.clone()?;
            (s.phase == Some(Phase::Succeeded) && !writes_has_finalizer(&o)).then_some(s)
        })
        .await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    let secret_watch = h
        .fake
        .requests()
        .into_iter()
        .any(|r| r.resource == "secrets" && r.is_watch());
    assert!(secret_watch, "Secrets are watched");

    // A slow run, then SIGTERM: the run saves its cursor and lets go.
    fixture::set_watermark(&h.pg, Some("1970-01-01T00:00:00Z".parse().unwrap()))
        .await
        .unwrap();
    h.apply(UsageBackfillBuilder::new("interrupted").sleep_between_slices("300ms"));
    h.wait_running("interrupted", 1).await;
    cancel.cancel();
    tokio::time::timeout(WAIT, controller)
        .await
        .expect("the controller stops")
        .unwrap();
    let s = h.status("interrupted");
    assert_eq!(s.phase, Some(Phase::Running));
    assert!(s.cursor.is_some());
    assert!(message(&s, ConditionType::Reconciling).contains("controller stopped"));
    assert!(!writes_has_finalizer(
        &h.fake.get(NS, "interrupted").unwrap()
    ));
    assert!(h.lock_4246().await.is_empty());
    assert_eq!(h.ctx.runner.active(), 0);
    h.assert_password_never_sent();
}
