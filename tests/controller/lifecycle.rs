//! The upgrade lifecycle, end to end, as Helm and Argo CD drive it: the
//! whole controller on the fake API server, real PostgreSQL, and the
//! application writing and ticking from the moment its schema exists.
//!
//! 1. Install: the UsageBackfill (an Argo CD sync wave after the database)
//!    exists before its database does; it retries, and once the empty
//!    database is there it skips (`rollup_state_missing`). The application
//!    then migrates and runs.
//! 2. Syncs: every GitOps sync recreates the hook object; after a pause of
//!    the application's ticks each is a skip within the threshold, which
//!    must roll up to its stamp.
//! 3. An upgrade with history: the hourly rollup is new (empty table,
//!    watermark at the epoch); the hook walks the whole history.
//! 4. A Helm timeout mid-walk: the hook object is deleted (the next
//!    upgrade's `before-hook-creation`) and created again; the new object
//!    continues from the slices already done.
//! 5. A rollback (no hook runs) and another upgrade (a skip).
//! 6. A second release in the same namespace, with its own database and
//!    hook object, beside the first.
//!
//! After each step: with the application paused, one catch-up window (its
//! next tick) leaves no bucket missing or extra (so no stamp passed an
//! event that was not rolled up), lock 4246 is free, and every object is
//! finished for its generation with no finalizer left.

use std::time::Duration;

use tokio_postgres::Client;
use usage_backfill_api::{BackfillResult, Phase, SkipReason, TuningPreset, UsageBackfillStatus};
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_testkit::{self as testkit, SchemaLevel, TestDatabase};

use testkit::application::{
    Application, TICK_PACE, catch_up, fall_behind, rolled_up, stale_buckets,
};
use testkit::engine::{assert_correct, walk_all};
use testkit::harness::{Harness, NS, UsageBackfillBuilder};
use testkit::instrument::{Call, calls, instrument, overlapping, slow_window};
use testkit::status::secs;

testkit::at_both_levels!(multi_thread: the_upgrade_lifecycle_loses_nothing_and_leaves_nothing_stuck);

/// How long a step may take before the test calls it stuck.
const STEP: Duration = Duration::from_secs(120);

/// One release of the application: its database, the Secret naming it,
/// and its hook object's name.
struct Release {
    name: &'static str,
    db: TestDatabase,
    pg: Client,
    secret: String,
    hook: String,
}

impl Release {
    fn hook(&self, application_name: &str, run_id: &str) -> UsageBackfillBuilder {
        UsageBackfillBuilder::new(&self.hook)
            .secret(&self.secret)
            .application_name(application_name)
            .run_id(run_id)
    }
}

async fn the_upgrade_lifecycle_loses_nothing_and_leaves_nothing_stuck(level: SchemaLevel) {
    // The second release's database carries the harness; the first one's
    // is dropped before the controller starts and created later.
    let db2 = testkit::fresh_database_at(level).await;
    let h = Harness::on(db2.url(), testkit::settings()).await;
    let db1 = testkit::fresh_database_at(level).await;
    let admin = testkit::client(db1.admin_url()).await;
    admin
        .batch_execute(&format!("DROP DATABASE {} WITH (FORCE)", db1.name()))
        .await
        .unwrap();
    h.fake.put_secret(NS, "shop-db", "DATABASE_URL", db1.url());
    let (stop_controller, controller) = h.start_controller().await;

    // 1. Install: the hook object before its database.
    let shop_hook = "shop-usage-backfill";
    h.apply(
        UsageBackfillBuilder::new(shop_hook)
            .secret("shop-db")
            .application_name("shop-install")
            .run_id("install")
            .backoff_limit(20),
    );
    let retrying = h
        .fake
        .wait_for("the install hook to retry", STEP, |f| {
            let s = f.get(NS, shop_hook)?.status?;
            (s.phase == Some(Phase::Pending) && s.last_error.is_some()).then_some(s)
        })
        .await;
    assert_eq!(
        testkit::status::cond(&retrying, usage_backfill_api::ConditionType::Ready),
        testkit::status::is("False", "RetryScheduled"),
        "{retrying:?}"
    );
    admin
        .batch_execute(&format!("CREATE DATABASE {}", db1.name()))
        .await
        .unwrap();
    let done = finished(&h, shop_hook).await;
    assert_eq!(
        done.skipped,
        Some(SkipReason::RollupStateMissing),
        "{done:?}"
    );
    // The backend migrates and the application runs (its history rolled up
    // by its ticks so far, which the walk below stands for).
    let pg1 = db1.client().await;
    fixture::install_at(&pg1, level).await.unwrap();
    fixture::generate(&pg1, &history(6)).await.unwrap();
    walk_all(db1.url()).await;
    instrument(&pg1).await;
    let shop = Release {
        name: "shop",
        db: db1,
        pg: pg1,
        secret: "shop-db".into(),
        hook: shop_hook.into(),
    };
    let app = Application::start(shop.db.url(), 21).await;
    check("install", &h, &app, &shop, &[shop_hook]).await;

    // 2. Syncs: each recreates the hook; the ticks fell behind before each.
    for sync in 0..3 {
        let paused = app.pause_ticks().await;
        let (before, models) = fall_behind(&shop.pg, &format!("sync-{sync}"), 4).await;
        recreate(&h, shop.hook("shop-sync", &format!("sync-{sync}"))).await;
        let done = finished(&h, shop_hook).await;
        assert_eq!(
            rolled_up(&shop.pg, &models).await,
            4,
            "sync {sync}: before any tick"
        );
        drop(paused);
        assert_eq!(
            done.skipped,
            Some(SkipReason::WatermarkWithinThreshold),
            "sync {sync}: {done:?}"
        );
        check(&format!("sync {sync}"), &h, &app, &shop, &[shop_hook]).await;
        assert_eq!(
            done.from,
            Some(secs(before)),
            "sync {sync}: from the watermark"
        );
        assert_eq!(done.watermark_after, done.walk_end, "sync {sync}");
    }

    // 3. An upgrade that brings the hourly rollup to an existing history.
    new_rollup(&app, &shop.pg).await;
    recreate(&h, shop.hook("shop-upgrade", "upgrade-1")).await;
    let done = finished(&h, shop_hook).await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled), "{done:?}");
    assert_eq!(done.slices_processed, done.slices_total, "{done:?}");
    check("upgrade with history", &h, &app, &shop, &[shop_hook]).await;

    // 4. A Helm timeout mid-walk: slow windows, the hook object deleted
    //    after some slices and created again.
    new_rollup(&app, &shop.pg).await;
    slow_window(&shop.pg, 0.3).await;
    // One session walking calendar months, so that the deletion falls
    // between slices of a walk of several.
    let serial = |s: &mut usage_backfill_api::UsageBackfillSpec| {
        s.parallelism = 1;
        s.tuning.get_or_insert_with(Default::default).preset = TuningPreset::ServerDefaults;
    };
    recreate(&h, shop.hook("shop-timeout", "upgrade-2").edit(serial)).await;
    h.wait_running(shop_hook, 2).await;
    h.fake.delete(NS, shop_hook);
    gone(&h, shop_hook).await;
    let first = backfill_calls(&shop.pg, "shop-timeout").await;
    assert!(
        first.len() >= 2,
        "slices done before the timeout: {first:?}"
    );
    h.apply(shop.hook("shop-resumed", "upgrade-2").edit(serial));
    let done = finished(&h, shop_hook).await;
    slow_window(&shop.pg, 0.0).await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled), "{done:?}");
    let second = backfill_calls(&shop.pg, "shop-resumed").await;
    let redone = overlapping(&first, &second);
    eprintln!(
        "timeout: {} slices before, {} after the recreation, {redone} walked twice",
        first.len(),
        second.len()
    );
    assert_eq!(redone, 0, "slices walked twice: {first:?} then {second:?}");
    check("timeout and recreation", &h, &app, &shop, &[shop_hook]).await;

    // 5. A rollback runs no hook: nothing changes for the object; then
    //    another upgrade, a skip.
    let paused = app.pause_ticks().await;
    fall_behind(&shop.pg, "upgrade-3", 4).await;
    recreate(&h, shop.hook("shop-upgrade", "upgrade-3")).await;
    let done = finished(&h, shop_hook).await;
    drop(paused);
    assert_eq!(done.skipped, Some(SkipReason::WatermarkWithinThreshold));
    check("rollback and upgrade", &h, &app, &shop, &[shop_hook]).await;

    // 6. A second release in the same namespace, beside the first.
    let pg2 = db2.client().await;
    fixture::generate(&pg2, &history(3)).await.unwrap();
    instrument(&pg2).await;
    h.fake.put_secret(NS, "shop2-db", "DATABASE_URL", db2.url());
    let shop2 = Release {
        name: "shop2",
        db: db2,
        pg: pg2,
        secret: "shop2-db".into(),
        hook: "shop2-usage-backfill".into(),
    };
    let app2 = Application::start(shop2.db.url(), 22).await;
    h.apply(shop2.hook("shop2-install", "upgrade-1"));
    recreate(&h, shop.hook("shop-upgrade", "upgrade-4")).await;
    let done2 = finished(&h, &shop2.hook).await;
    let done1 = finished(&h, shop_hook).await;
    assert_eq!(done2.result, Some(BackfillResult::Backfilled), "{done2:?}");
    assert_eq!(done1.result, Some(BackfillResult::Skipped), "{done1:?}");
    let hooks = [shop_hook, shop2.hook.as_str()];
    check("second release (shop)", &h, &app, &shop, &hooks).await;
    check("second release (shop2)", &h, &app2, &shop2, &hooks).await;

    stop_controller.cancel();
    assert_eq!(controller.await.unwrap(), 0, "no run left behind");
    for (app, release) in [(app, &shop), (app2, &shop2)] {
        let (writes, ticks) = app.stop().await;
        eprintln!("{}: writes {writes:?}, {ticks} ticks", release.name);
        assert!(ticks > 0);
    }
    h.assert_password_never_sent();
}

/// A history of `months` months, written by the application before the
/// hourly rollup caught up with it.
fn history(months: u32) -> HistorySpec {
    HistorySpec {
        rows: 600,
        months,
        dirty_queue_entries: 0,
        ..HistorySpec::default()
    }
}

/// The upgrade to a version that brings the hourly rollup: its table
/// empty, its watermark at the epoch (the application paused meanwhile).
async fn new_rollup(app: &Application, pg: &Client) {
    let _paused = app.pause().await;
    pg.batch_execute(
        "TRUNCATE task_usage_hourly;
         UPDATE task_usage_hourly_rollup_state
            SET watermark_at = '1970-01-01 00:00:00+00' WHERE id = 1;",
    )
    .await
    .unwrap();
}

/// Helm's `before-hook-creation`, or an Argo CD hook's new sync: the
/// previous hook object is deleted (if any) and `object` created.
async fn recreate(h: &Harness, object: UsageBackfillBuilder) {
    let name = object.name().to_owned();
    if h.fake.get(NS, &name).is_some() {
        h.fake.delete(NS, &name);
        gone(h, &name).await;
    }
    h.apply(object);
}

async fn gone(h: &Harness, name: &str) {
    h.fake
        .wait_for(&format!("{name} to be deleted"), STEP, |f| {
            f.get(NS, name).is_none().then_some(())
        })
        .await;
}

/// Waits until `name`'s run for its current generation has finished and
/// its finalizer is gone; a run that does not is stuck.
async fn finished(h: &Harness, name: &str) -> UsageBackfillStatus {
    h.fake
        .wait_for(&format!("{name} to finish"), STEP, |f| {
            let obj = f.get(NS, name)?;
            let s = obj.status.clone()?;
            let current = Some(s.observed_generation) == obj.metadata.generation;
            let no_finalizer = obj
                .metadata
                .finalizers
                .as_ref()
                .is_none_or(|f| f.is_empty());
            (current && s.phase.is_some_and(Phase::is_finished) && no_finalizer).then_some(s)
        })
        .await
}

/// After a step: every hook object finished and Succeeded for its
/// generation; with the application paused, lock 4246 free and one
/// catch-up window (the next tick) leaving no bucket missing or extra.
async fn check(step: &str, h: &Harness, app: &Application, release: &Release, hooks: &[&str]) {
    for hook in hooks {
        let s = finished(h, hook).await;
        assert_eq!(s.phase, Some(Phase::Succeeded), "{step}: {hook}: {s:?}");
    }
    let _paused = app.pause().await;
    assert!(
        testkit::lock_4246(&release.pg).await.is_empty(),
        "{step}: lock 4246 held"
    );
    catch_up(&release.pg).await;
    assert_eq!(
        stale_buckets(&release.pg).await,
        (0, 0),
        "{step} ({}): stale buckets (missing, extra) after one tick",
        release.name
    );
    assert_correct(&release.pg).await;
    drop(_paused);
    tokio::time::sleep(TICK_PACE).await;
}

/// Committed window calls of the backfill sessions named `application_name`.
async fn backfill_calls(pg: &Client, application_name: &str) -> Vec<Call> {
    calls(pg)
        .await
        .into_iter()
        .filter(|c| c.app == application_name)
        .collect()
}
