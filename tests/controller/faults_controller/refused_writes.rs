//! Writes the API server refuses as invalid.

use super::*;

// ---------------------------------------------------------------------------
// Writes the API server refuses as invalid
// ---------------------------------------------------------------------------

/// How many writes of `name` the fake refused as invalid.
fn refused(fake: &FakeApiServer, name: &str) -> usize {
    fake.requests()
        .iter()
        .filter(|r| r.code == 422 && r.name.as_deref() == Some(name))
        .count()
}

fn write_refusals(ctx: &Context, write: &str) -> String {
    let series = format!("usage_backfill_write_refusals_total{{write=\"{write}\"}} ");
    ctx.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix(&series).map(str::to_owned))
        .unwrap_or_default()
}

/// Kubernetes without validation ratcheting (before 1.30) refuses every
/// write to an object stored before a CEL rule it breaks, the controller's
/// InvalidSpec status included. The refusal is not a transient error: the
/// controller says so in a Warning Event carrying the API server's message,
/// counts it, and tries again every `refused_recheck_interval`, not in the
/// fast error backoff.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_write_refused_as_invalid_is_reported_and_retried_slowly() {
    use usage_backfill_api::rules;
    use usage_backfill_testkit::apiserver::Refused;

    let (client, fake) = FakeApiServer::start();
    let ctx = Context::new(client, testkit::settings());
    // monthsBack in mode Once: what the CRD's rules refuse now.
    let mut spec = UsageBackfillSpec::new(SECRET);
    spec.months_back = 3;
    fake.create_legacy(NS, "old", serde_json::to_value(&spec).unwrap());
    let rule = rules::MONTHS_BACK_ONLY_ALWAYS;
    let cause = format!("Invalid value: \"object\": {}", rule.message());
    fake.refuse_writes(Refused::Status, usize::MAX, &[("spec", &cause)]);

    let obj = Arc::new(fake.get(NS, "old").unwrap());
    let e = controller::reconcile(obj.clone(), ctx.clone())
        .await
        .expect_err("the InvalidSpec status is refused");
    assert_eq!(e.refused_write().map(|r| r.0), Some("status"));
    assert_eq!(
        controller::error_policy(obj, &e, ctx.clone()),
        kube::runtime::controller::Action::requeue(ctx.settings.refused_recheck_interval),
        "a refusal is retried slowly, not in the error backoff"
    );
    let events = fake.events("old");
    assert_eq!(events.len(), 1, "{events:?}");
    let (reason, kind, note) = &events[0];
    assert_eq!(
        (reason.as_str(), kind.as_str()),
        ("WriteRefused", "Warning")
    );
    assert!(
        note.starts_with(
            "The API server refused the status write as invalid: \
             UsageBackfill.usage.multica.ai \"old\" is invalid: spec: Invalid value: \"object\": spec.monthsBack: "
        ),
        "{note}"
    );
    assert!(note.contains(rule.problem), "{note}");
    assert!(note.ends_with("tried again every 1m"), "{note}");
    assert_eq!(write_refusals(&ctx, "status"), "1");

    // The whole controller, for a few seconds: the error backoff (1 s, 2 s)
    // would try three times; the refusal's slow requeue, once.
    let before = refused(&fake, "old");
    let cancel = tokio_util::sync::CancellationToken::new();
    let ready = Arc::new(AtomicBool::new(false));
    let run = tokio::spawn(controller::run_controllers(
        ctx.clone(),
        Vec::new(),
        2,
        ready,
        WAIT,
        cancel.clone(),
    ));
    tokio::time::sleep(Duration::from_millis(3500)).await;
    cancel.cancel();
    tokio::time::timeout(WAIT, run).await.unwrap().unwrap();
    assert_eq!(
        refused(&fake, "old") - before,
        1,
        "one try, then a slow requeue:\n{}",
        fake.describe_requests()
    );
    assert_eq!(fake.event_reasons("old"), ["WriteRefused", "WriteRefused"]);
    assert_eq!(write_refusals(&ctx, "status"), "2");
    let status = fake.get(NS, "old").unwrap().status.unwrap_or_default();
    assert_eq!(status.phase, None, "no status stored");
}

/// The same for the finalizer, which a run needs before it starts: no run
/// starts, the refusal is said and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finalizer_write_refused_as_invalid_starts_no_run_and_is_reported() {
    use usage_backfill_testkit::apiserver::Refused;

    let (client, fake) = FakeApiServer::start();
    let ctx = Context::new(client, testkit::settings());
    fake.put_secret(
        NS,
        SECRET,
        "DATABASE_URL",
        "postgres://app:pw@db.example/app",
    );
    fake.create(NS, "start", UsageBackfillSpec::new(SECRET));
    fake.refuse_writes(
        Refused::Object,
        1,
        &[("spec", "Invalid value: \"object\": a rule added since")],
    );
    let obj = Arc::new(fake.get(NS, "start").unwrap());
    let e = controller::reconcile(obj, ctx.clone())
        .await
        .expect_err("the finalizer is refused");
    assert_eq!(e.refused_write().map(|r| r.0), Some("finalizer"));
    assert_eq!(ctx.runner.active(), 0, "no run without the finalizer");
    assert!(fake.status_writes("start").is_empty());
    assert_eq!(fake.event_reasons("start"), ["WriteRefused"]);
    assert!(
        fake.events("start")[0]
            .2
            .starts_with("The API server refused the finalizer write as invalid: "),
        "{:?}",
        fake.events("start")
    );
    assert_eq!(write_refusals(&ctx, "finalizer"), "1");
    assert_eq!(write_refusals(&ctx, "status"), "0");
}
