//! How the controller reads Secrets, in its two modes, against the fake API
//! server holding the chart's RBAC for that mode (a request the mode does
//! not grant is a 403) and a real PostgreSQL.
//!
//! - Default (`get` only): no Secret list or watch, ever; an object waiting
//!   for its Secret, waiting for a retry, or Failed, is reconciled again
//!   every `secret_recheck_interval` and re-reads its Secrets by name; a
//!   Failed run restarts only when the value changed, and an unchanged
//!   Secret writes nothing.
//! - `--watch-secrets`: a created Secret is reacted to at once, and the
//!   watch's initial list comes in pages.

use std::time::{Duration, Instant};
use usage_backfill_testkit as testkit;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ListParams, WatchParams};
use testkit::apiserver::Recorded;
use testkit::apiserver::rbac::SecretAccess;
use usage_backfill_api::{BackfillResult, ConditionType, Phase, UsageBackfillStatus};
use usage_backfill_controller::Backoff;
use usage_backfill_controller::{self as controller, SECRET_LIST_PAGE_SIZE, Settings};
use usage_backfill_standin::fixture::HistorySpec;

use testkit::harness::{Harness, NS, SECRET, UsageBackfillBuilder, WAIT};
use testkit::status::{cond, is, stalled};
use testkit::{FakeApiServer, settings};
use tokio_util::sync::CancellationToken;

/// The recheck interval of the default-mode tests: short, so that a test
/// sees several rechecks.
const RECHECK: Duration = Duration::from_millis(300);

fn small() -> HistorySpec {
    HistorySpec {
        rows: 400,
        months: 4,
        ..HistorySpec::default()
    }
}

fn mode(watch_secrets: bool, recheck: Duration) -> Settings {
    let mut s = settings();
    s.watch_secrets = watch_secrets;
    s.secret_recheck_interval = recheck;
    s
}

/// The whole controller on the harness ([`Harness::start_controller`]).
async fn start(h: &Harness) -> (CancellationToken, tokio::task::JoinHandle<usize>) {
    h.start_controller().await
}

async fn stop(cancel: CancellationToken, run: tokio::task::JoinHandle<usize>) {
    cancel.cancel();
    let left = tokio::time::timeout(WAIT, run)
        .await
        .expect("the controller stops")
        .unwrap();
    assert_eq!(left, 0);
}

fn secret_requests(fake: &FakeApiServer) -> Vec<Recorded> {
    fake.requests()
        .into_iter()
        .filter(|r| r.resource == "secrets")
        .collect()
}

/// GETs of Secret `name` by name.
fn gets_of(fake: &FakeApiServer, name: &str) -> usize {
    secret_requests(fake)
        .iter()
        .filter(|r| r.method == "GET" && r.name.as_deref() == Some(name))
        .count()
}

/// The controller read Secrets by name only: no list, no watch, and
/// nothing RBAC refused.
fn assert_get_only(fake: &FakeApiServer) {
    let requests = secret_requests(fake);
    assert!(!requests.is_empty(), "the Secrets were read");
    for r in &requests {
        assert!(
            r.method == "GET" && r.name.is_some() && !r.is_watch(),
            "{} {} {:?} {:?}: only GETs by name",
            r.method,
            r.path,
            r.query,
            r.name
        );
        assert!([200, 404].contains(&r.code), "{} {}", r.path, r.code);
    }
    assert!(
        fake.requests().iter().all(|r| r.code != 403),
        "nothing refused:\n{}",
        fake.describe_requests()
    );
}

async fn wait_succeeded(h: &Harness, name: &str) -> UsageBackfillStatus {
    h.fake
        .wait_for(&format!("{name} Succeeded"), WAIT, |f| {
            let o = f.get(NS, name)?;
            let s = o.status.clone()?;
            (s.phase == Some(Phase::Succeeded) && !controller::has_finalizer(&o)).then_some(s)
        })
        .await
}

async fn wait_waiting_for_secret(h: &Harness, name: &str) {
    h.fake
        .wait_for("SecretNotFound", WAIT, |f| {
            let s = f.get(NS, name)?.status?;
            (cond(&s, ConditionType::Reconciling) == is("True", "SecretNotFound")).then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_missing_secret_is_picked_up_by_the_recheck_without_listing_secrets() {
    let h = Harness::with_settings(Some(small()), mode(false, RECHECK)).await;
    let (cancel, run) = start(&h).await;

    h.apply(UsageBackfillBuilder::new("late"));
    wait_waiting_for_secret(&h, "late").await;
    // Waiting: read again on every recheck, and nothing written meanwhile.
    let writes = h.fake.status_writes("late").len();
    let gets = gets_of(&h.fake, SECRET);
    tokio::time::sleep(RECHECK * 4).await;
    assert!(
        gets_of(&h.fake, SECRET) >= gets + 2,
        "the missing Secret is read again on the recheck schedule"
    );
    assert_eq!(
        h.fake.status_writes("late").len(),
        writes,
        "an unchanged wait writes nothing"
    );

    h.put_secret();
    let done = wait_succeeded(&h, "late").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(1), "waiting for a Secret is no attempt");

    // Succeeded: nothing left to recheck (once the reconciles that the
    // run's end and the finalizer's removal bring are done).
    tokio::time::sleep(RECHECK * 2).await;
    let gets = gets_of(&h.fake, SECRET);
    tokio::time::sleep(RECHECK * 4).await;
    assert_eq!(
        gets_of(&h.fake, SECRET),
        gets,
        "a Succeeded object is not rechecked"
    );

    stop(cancel, run).await;
    assert_get_only(&h.fake);
    h.assert_password_never_sent();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_only_a_changed_secret_value_restarts_a_failed_run() {
    const WRONG: &str = "Wr0ng-Pa55-recheck";
    let h = Harness::with_settings(Some(small()), mode(false, RECHECK)).await;
    let wrong = h.db().url().replace(&h.password, WRONG);
    h.fake.put_secret(NS, SECRET, "DATABASE_URL", &wrong);
    h.apply(UsageBackfillBuilder::new("rotated").backoff_limit(0));
    let (cancel, run) = start(&h).await;

    let failed = h
        .fake
        .wait_for("Failed", WAIT, |f| {
            let o = f.get(NS, "rotated")?;
            let s = o.status.clone()?;
            (s.phase == Some(Phase::Failed) && !controller::has_finalizer(&o)).then_some(s)
        })
        .await;
    assert_eq!(
        testkit::status::conds(&failed),
        stalled("BackoffLimitExceeded")
    );
    assert!(failed.secret_digest.is_some());
    // The Failed Event follows the status write: counted after it.
    let deadline = Instant::now() + WAIT;
    while !h
        .fake
        .event_reasons("rotated")
        .contains(&"Failed".to_owned())
    {
        assert!(Instant::now() < deadline, "no Failed Event");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The Secret is rewritten with the same value (as a label or another
    // controller's annotation would: a new resourceVersion): the rechecks
    // read it, and nothing restarts or is written.
    h.fake.put_secret(NS, SECRET, "DATABASE_URL", &wrong);
    let writes = h.fake.status_writes("rotated").len();
    let events = h.fake.events("rotated").len();
    let gets = gets_of(&h.fake, SECRET);
    tokio::time::sleep(RECHECK * 5).await;
    assert!(
        gets_of(&h.fake, SECRET) >= gets + 2,
        "a Failed object's Secret is read again on the recheck schedule"
    );
    assert_eq!(h.fake.status_writes("rotated").len(), writes);
    assert_eq!(h.fake.events("rotated").len(), events);
    assert_eq!(h.status("rotated"), failed, "still Failed, unchanged");

    // The right password: the next recheck restarts the run, at attempt 1.
    let rotated_at = Instant::now();
    h.put_secret();
    let done = wait_succeeded(&h, "rotated").await;
    assert!(rotated_at.elapsed() < WAIT);
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(1), "a fresh sequence of attempts");
    assert_ne!(done.secret_digest, failed.secret_digest);
    let reasons = h.fake.event_reasons("rotated");
    assert_eq!(reasons.first().map(String::as_str), Some("Started"));
    assert!(
        reasons
            .windows(2)
            .any(|w| w[0] == "Failed" && w[1] == "Started"),
        "{reasons:?}"
    );

    stop(cancel, run).await;
    assert_get_only(&h.fake);
    h.assert_never_sent(&[&h.password, WRONG]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_changed_secret_cuts_a_long_retry_backoff_short() {
    const WRONG: &str = "Wr0ng-Pa55-backoff";
    let mut settings = mode(false, RECHECK);
    settings.runner.backoff = Backoff {
        base: Duration::from_secs(3600),
        max: Duration::from_secs(3600),
    };
    let h = Harness::with_settings(Some(small()), settings).await;
    let wrong = h.db().url().replace(&h.password, WRONG);
    h.fake.put_secret(NS, SECRET, "DATABASE_URL", &wrong);
    h.apply(UsageBackfillBuilder::new("retrying").backoff_limit(3));
    let (cancel, run) = start(&h).await;

    h.fake
        .wait_for("RetryScheduled", WAIT, |f| {
            let s = f.get(NS, "retrying")?.status?;
            (cond(&s, ConditionType::Ready) == is("False", "RetryScheduled")).then_some(())
        })
        .await;
    // An hour of backoff ahead; the new value is found by the recheck.
    h.put_secret();
    let done = wait_succeeded(&h, "retrying").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(done.attempts, Some(1), "a fresh sequence of attempts");

    stop(cancel, run).await;
    assert_get_only(&h.fake);
    h.assert_never_sent(&[&h.password, WRONG]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_watch_a_created_secret_is_noticed_at_once_and_secrets_are_listed_in_pages() {
    // A recheck far beyond the test: only the watch can bring the object back.
    let h = Harness::with_settings(Some(small()), mode(true, Duration::from_secs(3600))).await;
    // More Secrets than two pages, none of them referenced.
    let others = 2 * SECRET_LIST_PAGE_SIZE as usize + 50;
    for i in 0..others {
        h.fake
            .put_secret(NS, &format!("other-{i:03}"), "token", "not-ours");
    }
    let (cancel, run) = start(&h).await;

    h.apply(UsageBackfillBuilder::new("watched"));
    wait_waiting_for_secret(&h, "watched").await;
    let created_at = Instant::now();
    h.put_secret();
    let done = wait_succeeded(&h, "watched").await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert!(
        created_at.elapsed() < Duration::from_secs(20),
        "the watch brings the object back, not the hour-long recheck"
    );

    let requests = secret_requests(&h.fake);
    let lists: Vec<&Recorded> = requests
        .iter()
        .filter(|r| r.method == "GET" && r.name.is_none() && !r.is_watch())
        .collect();
    let first = lists.first().expect("the watch lists Secrets first");
    let limit: u32 = first
        .query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .expect("the initial list is paginated: it sends a limit");
    assert!((1..=SECRET_LIST_PAGE_SIZE).contains(&limit), "{limit}");
    assert!(
        lists
            .iter()
            .all(|r| r.query.get("resourceVersion").map(String::as_str) != Some("0")),
        "no list at resourceVersion 0: the watch cache would ignore the limit"
    );
    let continued = lists.iter().filter(|r| r.query.contains_key("continue"));
    assert!(
        continued.count() >= 2,
        "{} Secrets came in pages of {limit}",
        others + 1
    );
    assert!(requests.iter().any(Recorded::is_watch), "then watches");
    assert!(
        requests.iter().all(|r| r.code < 300 || r.code == 404),
        "nothing refused:\n{}",
        h.fake.describe_requests()
    );
    stop(cancel, run).await;
    h.assert_password_never_sent();
}

#[tokio::test]
async fn the_fake_grants_secret_list_and_watch_only_in_watch_mode() {
    let (client, fake) = FakeApiServer::start();
    fake.put_secret(NS, "app-db", "DATABASE_URL", "postgres://u:p@h/db");
    let secrets: Api<Secret> = Api::namespaced(client, NS);
    let code = |e: kube::Error| match e {
        kube::Error::Api(s) => s.code,
        other => panic!("{other}"),
    };

    assert!(secrets.get("app-db").await.is_ok(), "get is granted");
    let e = secrets.list(&ListParams::default()).await.unwrap_err();
    assert_eq!(code(e), 403, "no list by default");
    let e = secrets
        .watch(&WatchParams::default(), "0")
        .await
        .err()
        .expect("no watch by default");
    assert_eq!(code(e), 403);

    fake.set_secret_access(SecretAccess::Watch);
    assert_eq!(
        secrets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert!(secrets.watch(&WatchParams::default(), "0").await.is_ok());
    assert!(secrets.get("app-db").await.is_ok());
}
