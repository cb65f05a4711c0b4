//! The controller test harness: the controller settings tests run with
//! ([`settings`]), one controller [`Context`] against the
//! fake API server (granting the Secret access the settings need), a PostgreSQL database the Secret points to, and the
//! steps controller-level tests take (create an object, reconcile, wait
//! for a run, read its status), each bounded by [`WAIT`]. Objects are
//! built with [`UsageBackfillBuilder`], from the defaults.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use kube::runtime::controller::Action;
use tokio_postgres::Client as PgClient;
use usage_backfill_api::{
    Mode, Phase, TlsSpec, TuningSpec, UsageBackfill, UsageBackfillSpec, UsageBackfillStatus,
};
use usage_backfill_controller::{
    self as controller, Backoff, Context, ObjectKey, RunnerSettings, Settings,
};
use usage_backfill_standin::fixture::{self, HistorySpec};

use crate::apiserver::rbac::SecretAccess;
use crate::{FakeApiServer, TestDatabase};

/// The namespace of every object and Secret.
pub const NS: &str = "tenant-a";
/// The database Secret objects read (key DATABASE_URL).
pub const SECRET: &str = "app-db";
/// The bound of every wait.
pub const WAIT: Duration = Duration::from_secs(30);

/// Controller settings for tests: every slice's progress is written (so
/// short runs show it), retries come quickly, no session settings.
pub fn settings() -> Settings {
    Settings {
        runner: RunnerSettings {
            progress_interval: Duration::ZERO,
            heartbeat_interval: Duration::from_secs(15),
            backoff: Backoff {
                base: Duration::from_millis(100),
                max: Duration::from_millis(400),
            },
            concurrency: 4,
            settle_pause: Duration::from_millis(20),
        },
        session_settings: Vec::new(),
        observe_interval: Duration::from_secs(60),
        secret_recheck_interval: Duration::from_secs(60),
        cancel_recheck_interval: Duration::from_millis(100),
        refused_recheck_interval: Duration::from_secs(60),
        watch_secrets: false,
    }
}

impl FakeApiServer {
    /// Replaces the status directly, as an earlier controller left it (by
    /// the controller's field manager).
    pub fn set_status(&self, namespace: &str, name: &str, status: &UsageBackfillStatus) {
        self.set_status_as(controller::FIELD_MANAGER, namespace, name, status);
    }
}

/// A UsageBackfill for a test, built from the defaults of
/// [`UsageBackfillSpec::new`] with the database Secret [`SECRET`]:
/// `UsageBackfillBuilder::new("x").mode(Mode::Always).months_back(2)`.
#[derive(Debug, Clone)]
pub struct UsageBackfillBuilder {
    name: String,
    spec: UsageBackfillSpec,
}

impl UsageBackfillBuilder {
    pub fn new(name: impl Into<String>) -> Self {
        UsageBackfillBuilder {
            name: name.into(),
            spec: UsageBackfillSpec::new(SECRET),
        }
    }

    /// The database Secret's name.
    pub fn secret(mut self, name: impl Into<String>) -> Self {
        self.spec.database = UsageBackfillSpec::new(name).database;
        self
    }

    pub fn tls(mut self, tls: TlsSpec) -> Self {
        self.spec.database.tls = Some(tls);
        self
    }

    pub fn mode(mut self, mode: Mode) -> Self {
        self.spec.mode = mode;
        self
    }

    pub fn months_back(mut self, months: i64) -> Self {
        self.spec.months_back = months;
        self
    }

    pub fn dry_run(mut self) -> Self {
        self.spec.dry_run = true;
        self
    }

    pub fn suspend(mut self) -> Self {
        self.spec.suspend = true;
        self
    }

    pub fn run_id(mut self, run_id: impl Into<String>) -> Self {
        self.spec.run_id = run_id.into();
        self
    }

    pub fn backoff_limit(mut self, limit: i64) -> Self {
        self.spec.backoff_limit = limit;
        self
    }

    /// Go-style duration, e.g. "200ms".
    pub fn sleep_between_slices(mut self, pause: &str) -> Self {
        self.spec.sleep_between_slices = pause.into();
        self
    }

    pub fn slice_timeout(mut self, timeout: &str) -> Self {
        self.spec.slice_timeout = Some(timeout.into());
        self
    }

    pub fn application_name(mut self, name: &str) -> Self {
        self.spec.application_name = Some(name.into());
        self
    }

    pub fn tuning(mut self, tuning: TuningSpec) -> Self {
        self.spec.tuning = Some(tuning);
        self
    }

    /// Any other change to the spec.
    pub fn edit(mut self, edit: impl FnOnce(&mut UsageBackfillSpec)) -> Self {
        edit(&mut self.spec);
        self
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn spec(&self) -> &UsageBackfillSpec {
        &self.spec
    }
}

/// A controller, the fake API server it talks to and a database.
pub struct Harness {
    pub fake: FakeApiServer,
    pub ctx: Arc<Context>,
    /// The database URL the Secret holds ([`Harness::put_secret`]).
    pub url: String,
    /// A session of the test on that database.
    pub pg: PgClient,
    /// The database password, which must never reach the API server.
    pub password: String,
    db: Option<TestDatabase>,
}

impl Harness {
    /// A fresh test database with `history`, and the [`settings`] of tests.
    pub async fn new(history: Option<HistorySpec>) -> Harness {
        Self::with_settings(history, settings()).await
    }

    /// A fresh test database with `history`, and `settings`.
    pub async fn with_settings(history: Option<HistorySpec>, settings: Settings) -> Harness {
        let (db, pg) = match history {
            Some(spec) => crate::database_with(&spec).await,
            None => {
                let db = crate::fresh_database().await;
                let pg = db.client().await;
                (db, pg)
            }
        };
        let mut h = Self::connect(db.url(), pg, settings);
        assert!(
            h.password.len() >= 8,
            "the harness password is distinctive enough to search for"
        );
        h.db = Some(db);
        h
    }

    /// A harness on a database of another server, already prepared.
    pub async fn on(url: &str, settings: Settings) -> Harness {
        Self::connect(url, crate::client(url).await, settings)
    }

    /// The fake grants the Secret access `settings` need, as the chart
    /// does for them: a stray list or watch of Secrets fails with 403.
    fn connect(url: &str, pg: PgClient, settings: Settings) -> Harness {
        let (client, fake) = FakeApiServer::start();
        fake.set_secret_access(SecretAccess::of(settings.watch_secrets));
        Harness {
            fake,
            ctx: Context::new(client, settings),
            url: url.to_owned(),
            pg,
            password: password_of(url),
            db: None,
        }
    }

    /// The same API server and database with a new controller (fresh
    /// context, nothing in memory), as after a restart.
    pub fn restarted(self, settings: Settings) -> Harness {
        self.fake
            .set_secret_access(SecretAccess::of(settings.watch_secrets));
        Harness {
            ctx: Context::new(self.ctx.client.clone(), settings),
            ..self
        }
    }

    /// The test database (not for [`Harness::on`]).
    pub fn db(&self) -> &TestDatabase {
        self.db.as_ref().expect("a harness on a test database")
    }

    /// The database Secret, holding [`Harness::url`].
    pub fn put_secret(&self) {
        self.fake.put_secret(NS, SECRET, "DATABASE_URL", &self.url);
    }

    /// Creates UsageBackfill `name`: the defaults, changed by `edit`.
    pub fn create(&self, name: &str, edit: impl FnOnce(&mut UsageBackfillSpec)) -> UsageBackfill {
        self.apply(UsageBackfillBuilder::new(name).edit(edit))
    }

    /// Creates the UsageBackfill `object` describes.
    pub fn apply(&self, object: UsageBackfillBuilder) -> UsageBackfill {
        self.fake.create(NS, &object.name, object.spec)
    }

    pub fn key(name: &str) -> ObjectKey {
        ObjectKey::new(NS, name)
    }

    /// The status of `name` as stored (the default when there is none).
    pub fn status(&self, name: &str) -> UsageBackfillStatus {
        self.fake
            .get(NS, name)
            .and_then(|o| o.status)
            .unwrap_or_default()
    }

    /// The whole controller (all namespaces, 4 at once) on this harness,
    /// until the returned token is cancelled; returns once its cache is
    /// synced. The task ends with the number of runs it left behind.
    pub async fn start_controller(
        &self,
    ) -> (
        usage_backfill_engine::CancellationToken,
        tokio::task::JoinHandle<usize>,
    ) {
        let cancel = usage_backfill_engine::CancellationToken::new();
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let run = tokio::spawn(controller::run_controllers(
            self.ctx.clone(),
            Vec::new(),
            4,
            ready.clone(),
            WAIT,
            cancel.clone(),
        ));
        self.fake
            .wait_for("the cache to sync", WAIT, |_| {
                ready
                    .load(std::sync::atomic::Ordering::Acquire)
                    .then_some(())
            })
            .await;
        (cancel, run)
    }

    /// One reconcile, as the controller would run it.
    pub async fn reconcile(&self, name: &str) -> Action {
        let obj = self.fake.get(NS, name).expect("object exists");
        tokio::time::timeout(WAIT, controller::reconcile(Arc::new(obj), self.ctx.clone()))
            .await
            .expect("reconcile returns quickly")
            .expect("reconcile succeeds")
    }

    /// One reconcile, then waits for the run it started (if any) to end.
    pub async fn attempt(&self, name: &str) -> UsageBackfillStatus {
        self.reconcile(name).await;
        self.status_after_attempt(name).await
    }

    /// Waits for the run in progress to end; its status.
    pub async fn status_after_attempt(&self, name: &str) -> UsageBackfillStatus {
        tokio::time::timeout(WAIT, self.ctx.runner.wait_idle(&Self::key(name)))
            .await
            .expect("the attempt ends");
        self.status(name)
    }

    /// Reconciles until the run for the current generation is finished
    /// and its task and finalizer are gone.
    pub async fn run_to_end(&self, name: &str) -> UsageBackfillStatus {
        let key = Self::key(name);
        let done = tokio::time::timeout(WAIT, async {
            loop {
                self.reconcile(name).await;
                self.ctx.runner.wait_idle(&key).await;
                let obj = self.fake.get(NS, name).unwrap();
                let status = obj.status.clone().unwrap_or_default();
                let current = status.observed_generation == obj.metadata.generation.unwrap();
                if current
                    && status.phase.is_some_and(Phase::is_finished)
                    && !self.ctx.runner.is_active(&key)
                    && !controller::has_finalizer(&obj)
                {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
        .await;
        done.unwrap_or_else(|_| {
            panic!(
                "{name} did not finish within {WAIT:?}; requests:\n{}",
                self.fake.describe_requests()
            )
        })
    }

    /// Reconciles `name`, being deleted: waits until its run (if any) has
    /// stopped and the object is gone with its finalizer.
    pub async fn reconcile_deletion(&self, name: &str) {
        self.reconcile(name).await;
        tokio::time::timeout(WAIT, self.ctx.runner.wait_idle(&Self::key(name)))
            .await
            .expect("the run stops");
        self.fake
            .wait_for("the object to go", WAIT, |f| {
                f.get(NS, name).is_none().then_some(())
            })
            .await;
    }

    /// Waits until `name` is Running with at least `slices` slices done.
    pub async fn wait_running(&self, name: &str, slices: u32) -> UsageBackfillStatus {
        self.fake
            .wait_for(
                &format!("{name} Running, {slices} slices done"),
                WAIT,
                |f| {
                    let s = f.get(NS, name)?.status?;
                    (s.phase == Some(Phase::Running) && s.slices_processed? >= slices).then_some(s)
                },
            )
            .await
    }

    /// No request the API server saw carries any of `secrets`, and none
    /// was unexpected.
    pub fn assert_never_sent(&self, secrets: &[&str]) {
        for r in self.fake.requests() {
            for secret in secrets {
                assert!(
                    !r.raw_body.contains(secret),
                    "{} {} {:?} sent a password",
                    r.method,
                    r.resource,
                    r.name
                );
            }
        }
        assert!(
            self.fake.unexpected().is_empty(),
            "{:?}",
            self.fake.unexpected()
        );
    }

    /// No request body the API server saw holds the database password.
    pub fn assert_password_never_sent(&self) {
        self.assert_never_sent(&[&self.password]);
    }

    /// The rollup watermark.
    pub async fn watermark(&self) -> Option<Timestamp> {
        fixture::watermark(&self.pg).await.unwrap()
    }

    /// Sessions holding (true) or waiting for (false) lock 4246.
    pub async fn lock_4246(&self) -> Vec<(i32, bool, String)> {
        crate::lock_4246(&self.pg).await
    }

    /// The rollup equals an independent recompute.
    pub async fn assert_rollup_correct(&self) {
        crate::engine::assert_correct(&self.pg).await;
    }
}

/// The password of a database URL (empty when it has none).
pub fn password_of(url: &str) -> String {
    let config: tokio_postgres::Config = url.parse().unwrap();
    String::from_utf8(config.get_password().unwrap_or_default().to_vec()).unwrap()
}
