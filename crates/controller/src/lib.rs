//! The Kubernetes controller (`usage-backfill controller`): watches
//! UsageBackfills (all namespaces, or the ones given), reads the Secrets
//! they reference by name, and runs each backfill once per generation/runId
//! as a background task, reporting in the status.
//!
//! Secrets are read with `get` only by default: an object waiting for its
//! Secret, waiting for a retry, or Failed (a changed value restarts it) is
//! reconciled again every `secret_recheck_interval`, which re-reads its
//! Secrets. With
//! [`Settings::watch_secrets`] the controller also watches Secret metadata
//! (paginated initial list) and reacts at once; that needs list/watch on
//! every Secret of the watched namespaces (see the threat model in
//! docs/reliability.md).
//!
//! Its modules (private; the crate root re-exports what other crates use):
//!
//! - `reconcile`: the pipeline fetch → decide → act → status.
//! - `decide`: the pure decision, including the retry table.
//! - `status`: pure status builders following kstatus.
//! - `runner`: the background run tasks.
//! - `inputs`: Secrets → engine database and options.
//! - `writes`: status by server-side apply, the finalizer.
//! - `events`: Kubernetes Events.
//! - `health`: `/healthz`, `/readyz` and `/metrics`.
//! - `metrics`: the Prometheus metrics.
//! - `leader`: leader election on a Lease.
//! - `progress`: the walk's progress record per database (a ConfigMap),
//!   which a recreated object resumes from.
//! - `convert`: the API's types to the engine's and back.
//!
//! On SIGTERM the controllers stop taking work, then every run is cancelled
//! (lock 4246 released, nothing stamped), saves its status with the cursor
//! and drops its finalizer; the next controller resumes from there.
//!
//! With leader election (the default) every replica serves the HTTP
//! endpoints, and only the holder of the Lease `usage-backfill-operator`
//! runs the controllers, each leadership term with a fresh [`Context`].
//! Losing the Lease ends the term like a SIGTERM does (runs cancelled,
//! cursors saved) and the replica goes back to standby; if a run does not
//! stop within `--shutdown-timeout`, the process exits with code 1 instead
//! (the Deployment restarts it, as a standby), so that no backfill outlives
//! its leadership: PostgreSQL ends a dead process's session and its lock.

mod convert;
mod decide;
mod errors;
mod events;
mod health;
mod inputs;
mod leader;
mod metrics;
mod progress;
mod reconcile;
mod runner;
mod status;
mod writes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

// What the binary, the test kit, the tests and the benchmark use; the
// rest stays inside the crate.
pub use decide::{Backoff, TaskView};
pub use errors::{Error, ErrorKind, Result};
pub use health::{State as HealthState, serve as serve_health};
pub use leader::{Election, LEASE_NAME, LeaseSettings, default_identity};
pub use metrics::{Metrics, watermark_lag};
pub use progress::{LABELS as PROGRESS_LABELS, name_for as progress_record_name};
pub use reconcile::{error_policy, reconcile};
pub use runner::{DEFAULT_PROGRESS_INTERVAL, ObjectKey, Runner, RunnerSettings};
pub use writes::{
    FIELD_MANAGER, FINALIZER, Guarded, add_finalizer, apply_status_of, has_finalizer,
    remove_finalizer, remove_finalizer_of,
};

use usage_backfill_api::UsageBackfill;

/// Default of [`Settings::secret_recheck_interval`]: a Secret created after
/// its UsageBackfill (a hook ordering, an external-secrets sync) is picked
/// up within a minute, well inside the 30 min a hook Job waits, for one GET
/// per referenced Secret per waiting or Failed object per minute.
pub const DEFAULT_SECRET_RECHECK_INTERVAL: Duration = Duration::from_secs(60);

/// Default of [`Settings::refused_recheck_interval`]: an edit of the object
/// is seen at once by the watch; this only paces the retries (one write and
/// one Warning Event per object per interval) of an object left as it was.
pub const DEFAULT_REFUSED_RECHECK_INTERVAL: Duration = Duration::from_secs(300);

/// Bounds of [`Settings::secret_recheck_interval`]: often enough to matter,
/// rare enough not to load the API server with GETs.
pub const SECRET_RECHECK_BOUNDS: (Duration, Duration) =
    (Duration::from_secs(1), Duration::from_secs(3600));

/// Page size of the Secret watch's lists: metadata only, yet a Secret's
/// metadata can carry its data (a `last-applied-configuration` annotation,
/// up to 256 KiB), so a page is kept well below the 256Mi memory limit
/// and the list is never one response of every Secret of the cluster.
pub const SECRET_LIST_PAGE_SIZE: u32 = 100;

/// Tunables of the controller (tests shorten them).
#[derive(Debug, Clone)]
pub struct Settings {
    pub runner: RunnerSettings,
    /// Applied to every backfill session (see `--set`).
    pub session_settings: Vec<(String, String)>,
    /// Fallback requeue while this process runs the object's backfill.
    pub observe_interval: Duration,
    /// How often an object waiting for a Secret or a retry, or Failed, is
    /// reconciled again (re-reading its Secrets): the longest delay before
    /// a created or rotated Secret is noticed without the Secret watch.
    pub secret_recheck_interval: Duration,
    /// Fallback requeue after cancelling a task.
    pub cancel_recheck_interval: Duration,
    /// How soon an object is reconciled again after the API server refused
    /// its status or finalizer write as invalid (422): not the error
    /// backoff, since only a change (of the object, the CRD or the cluster)
    /// can end such a refusal.
    pub refused_recheck_interval: Duration,
    /// Watch Secret metadata (list/watch on Secrets) to react to a created
    /// or rotated Secret at once instead of at the next recheck.
    pub watch_secrets: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            runner: RunnerSettings::default(),
            session_settings: Vec::new(),
            observe_interval: Duration::from_secs(300),
            secret_recheck_interval: DEFAULT_SECRET_RECHECK_INTERVAL,
            cancel_recheck_interval: Duration::from_secs(2),
            refused_recheck_interval: DEFAULT_REFUSED_RECHECK_INTERVAL,
            watch_secrets: false,
        }
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub events: events::Publisher,
    pub runner: Runner,
    pub settings: Settings,
    pub metrics: Arc<Metrics>,
    /// Consecutive reconcile errors per object, for [`error_policy`].
    failures: Mutex<HashMap<ObjectKey, u32>>,
}

impl Context {
    /// A context with metrics of its own (not served anywhere).
    pub fn new(client: Client, settings: Settings) -> Arc<Self> {
        Self::with_metrics(client, settings, Metrics::new())
    }

    /// A context recording into `metrics`.
    pub fn with_metrics(client: Client, settings: Settings, metrics: Arc<Metrics>) -> Arc<Self> {
        let events = events::Publisher::new(client.clone(), std::env::var("POD_NAME").ok());
        let runner = Runner::with_metrics(
            client.clone(),
            events.clone(),
            settings.runner,
            metrics.clone(),
        );
        Arc::new(Context {
            client,
            events,
            runner,
            settings,
            metrics,
            failures: Mutex::new(HashMap::new()),
        })
    }

    fn next_failure_delay(&self, key: &ObjectKey) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        (Duration::from_secs(1) * 2u32.saturating_pow(n.saturating_sub(1).min(7)))
            .min(Duration::from_secs(120))
    }

    fn forget_failures(&self, key: &ObjectKey) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// The UsageBackfills of `objects` in `namespace` that read Secret `name`
/// (connection string, any part of the connection in parts, CA bundle).
pub fn referencing(
    objects: &[Arc<UsageBackfill>],
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<UsageBackfill>> {
    objects
        .iter()
        .filter(|o| o.namespace().as_deref() == Some(namespace))
        .filter(|o| o.spec.database.secret_names().contains(&name))
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// What the controller runs with; the binary builds it from its flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// Namespaces to watch; empty for all.
    pub namespaces: Vec<String>,
    /// Backfill runs (and reconciles) in progress at once.
    pub concurrency: u16,
    /// Address of the /healthz, /readyz and /metrics endpoints.
    pub health_addr: SocketAddr,
    pub settings: Settings,
    /// How long a shutdown (or the loss of leadership) waits for runs to
    /// save their cursor.
    pub shutdown_timeout: Duration,
    /// Leader election on a Lease; `None` runs a single replica.
    pub lease: Option<LeaseSettings>,
}

/// Runs the controller until `cancel`, then shuts down.
pub async fn run(config: Config, cancel: CancellationToken) -> Result<()> {
    let kube_config = kube::Config::infer()
        .await
        .map_err(|e| Error::Client(kube::Error::InferConfig(e)))?;
    run_with(kube_config, config, cancel).await
}

/// [`run`] with the API server connection given rather than inferred (the
/// real-cluster test runs replicas as the chart's ServiceAccount, by
/// impersonation).
pub async fn run_with(
    kube_config: kube::Config,
    config: Config,
    cancel: CancellationToken,
) -> Result<()> {
    let Config {
        namespaces,
        concurrency,
        health_addr,
        settings,
        shutdown_timeout,
        lease,
    } = config;
    let config = kube_config;
    let client = Client::try_from(config.clone()).map_err(Error::Client)?;
    let listener = tokio::net::TcpListener::bind(health_addr)
        .await
        .map_err(|source| Error::Health {
            addr: health_addr,
            source,
        })?;
    let metrics = Metrics::new();
    let state = health::State::new(lease.is_some(), metrics.clone());
    let stop_serving = CancellationToken::new();
    let server = tokio::spawn(health::serve(listener, state.clone(), stop_serving.clone()));
    let replica = Replica {
        client: client.clone(),
        settings,
        namespaces: namespaces.clone(),
        concurrency,
        shutdown_timeout,
        state: state.clone(),
    };
    tracing::info!(?namespaces, concurrency,
        http = %health_addr, leader_election = lease.is_some(),
        watch_secrets = replica.settings.watch_secrets,
        secret_recheck = %usage_backfill_limits::duration::format(replica.settings.secret_recheck_interval),
        "controller starting");
    let result = match lease {
        None => {
            replica.lead(cancel).await;
            Ok(())
        }
        Some(lease) => {
            // The Lease gets a client of its own with short timeouts, so
            // that a hung renewal fails fast and is retried.
            let mut lease_config = config;
            let timeout = Some(lease.request_timeout());
            lease_config.connect_timeout = timeout;
            lease_config.read_timeout = timeout;
            lease_config.write_timeout = timeout;
            let lease_client = Client::try_from(lease_config).map_err(Error::Client)?;
            tracing::info!(lease = %lease.name, namespace = %lease.namespace,
                identity = %lease.identity, "standing by until elected");
            let election = Election::start(lease_client, lease);
            let result = replica
                .lead_while_elected(election.subscribe(), cancel)
                .await;
            // Released only now, once our runs have stopped.
            election.stop().await;
            result
        }
    };
    stop_serving.cancel();
    let _ = server.await;
    result
}

/// One replica of the operator: what it runs while it leads.
pub struct Replica {
    pub client: Client,
    pub settings: Settings,
    /// Namespaces to watch; empty for all.
    pub namespaces: Vec<String>,
    pub concurrency: u16,
    pub shutdown_timeout: Duration,
    /// Readiness, leadership and metrics, as the HTTP endpoints show them.
    pub state: Arc<health::State>,
}

impl Replica {
    /// Runs the controllers, with a fresh context, until `stop`; returns
    /// the number of runs that did not stop in time.
    pub async fn lead(&self, stop: CancellationToken) -> usize {
        let ctx = Context::with_metrics(
            self.client.clone(),
            self.settings.clone(),
            self.state.metrics().clone(),
        );
        self.state.set_leading(true);
        let left = run_controllers(
            ctx,
            self.namespaces.clone(),
            self.concurrency,
            self.state.synced(),
            self.shutdown_timeout,
            stop,
        )
        .await;
        self.state.set_leading(false);
        left
    }

    /// Stands by until `leading` says this replica leads, leads until it
    /// says otherwise, and again, until `cancel`. Fails when runs outlive a
    /// lost leadership (see the module docs) or the election ends.
    pub async fn lead_while_elected(
        &self,
        mut leading: watch::Receiver<bool>,
        cancel: CancellationToken,
    ) -> Result<()> {
        loop {
            // (The guard `wait_for` returns is not Send: keep it inside.)
            let elected = async { leading.wait_for(|l| *l).await.is_ok() };
            tokio::select! {
                () = cancel.cancelled() => return Ok(()),
                elected = elected => if !elected {
                    return Err(Error::ElectionEnded);
                },
            }
            tracing::info!("elected: starting the controllers");
            let stop = cancel.child_token();
            let run = self.lead(stop.clone());
            tokio::pin!(run);
            let lost = async {
                let _ = leading.wait_for(|l| !*l).await;
            };
            let left = tokio::select! {
                left = &mut run => left,
                () = lost => {
                    tracing::warn!("leadership lost: stopping the controllers and cancelling runs");
                    stop.cancel();
                    run.await
                }
            };
            if cancel.is_cancelled() {
                return Ok(());
            }
            if left > 0 {
                return Err(Error::RunsOutlivedLeadership { runs: left });
            }
            tracing::info!("standing by until elected again");
        }
    }
}

/// Runs one controller per watched namespace (one for all when
/// `namespaces` is empty) until `cancel`, then cancels the runs and waits
/// up to `shutdown_timeout` for them to save their cursor. Returns the
/// number of runs still finishing at the end.
pub async fn run_controllers(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    concurrency: u16,
    ready: Arc<AtomicBool>,
    shutdown_timeout: Duration,
    cancel: CancellationToken,
) -> usize {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut stores = Vec::new();
    let mut controllers = Vec::new();
    for scope in scopes {
        let client = ctx.client.clone();
        let (objects, secrets): (Api<UsageBackfill>, Api<PartialObjectMeta<Secret>>) = match &scope
        {
            None => (Api::all(client.clone()), Api::all(client)),
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client, ns),
            ),
        };
        let controller = Controller::new(objects, watcher::Config::default().any_semantic());
        let store = controller.store();
        stores.push(store.clone());
        let controller = if ctx.settings.watch_secrets {
            // Metadata only: Secret values never pass through the watch.
            // The most recent semantic, not `any_semantic()`: a list at
            // resourceVersion 0 is served whole from the watch cache,
            // whatever the limit.
            let config = watcher::Config::default().page_size(SECRET_LIST_PAGE_SIZE);
            let secret_events = watcher(secrets, config).touched_objects();
            controller.watches_stream(secret_events, move |secret: PartialObjectMeta<Secret>| {
                let namespace = secret.namespace().unwrap_or_default();
                referencing(&store.state(), &namespace, &secret.name_any())
            })
        } else {
            controller
        };
        let wake = ctx.runner.subscribe().filter_map(move |key: ObjectKey| {
            let mine = scope.as_deref().is_none_or(|ns| ns == key.namespace);
            futures::future::ready(
                mine.then(|| ObjectRef::<UsageBackfill>::new(&key.name).within(&key.namespace)),
            )
        });
        let run = controller
            .reconcile_on(wake)
            .with_config(ControllerConfig::default().concurrency(concurrency))
            .graceful_shutdown_on(cancel.clone().cancelled_owned())
            .run(reconcile, error_policy, ctx.clone())
            .for_each(|result| async move {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "controller");
                }
            });
        controllers.push(run);
    }
    ctx.metrics.set_lag_source(stores.clone());
    let readiness = async move {
        for store in stores {
            // The store's readiness wakes one waiter only, and the
            // controller itself waits on it: poll instead of relying on it.
            loop {
                let wait =
                    tokio::time::timeout(Duration::from_millis(200), store.wait_until_ready());
                match wait.await {
                    Ok(Ok(())) => break,
                    Ok(Err(_)) => return,
                    Err(_) => {}
                }
            }
        }
        ready.store(true, Ordering::Release);
        tracing::info!("UsageBackfill cache synced; ready");
    };
    let readiness = tokio::spawn(readiness);
    // Boxed, so that dropping it below really drops (aborts) the controllers.
    let mut controllers = Box::pin(futures::future::join_all(controllers));
    // The controllers finish the reconciles in flight before they stop; one
    // stuck on an unreachable API server must not hold up the cancelling of
    // the runs, so they get a fifth of the time, then are dropped (which
    // aborts those reconciles, as a crash would).
    let reconciles_grace = shutdown_timeout / 5;
    let stopping = async {
        cancel.cancelled().await;
        let started = tokio::time::Instant::now();
        tokio::time::sleep(reconciles_grace).await;
        started
    };
    let stopped_at = tokio::select! {
        _ = &mut controllers => None,
        started = stopping => {
            tracing::warn!(grace = ?reconciles_grace, "reconciles still in flight at shutdown; abandoning them");
            Some(started)
        }
    };
    drop(controllers);
    readiness.abort();
    tracing::info!(
        runs = ctx.runner.active(),
        "controllers stopped; cancelling runs"
    );
    let left_for_runs = stopped_at.map_or(shutdown_timeout, |t| {
        shutdown_timeout.saturating_sub(t.elapsed())
    });
    let left = ctx.runner.shutdown(left_for_runs).await;
    ctx.metrics.set_lag_source(Vec::new());
    if left > 0 {
        tracing::warn!(
            runs = left,
            "runs still finishing at exit; PostgreSQL releases their lock when the sessions close"
        );
    } else {
        tracing::info!("all runs saved their status");
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;
    use usage_backfill_api::{CaSecretRef, DatabaseSpec, TlsSpec, UsageBackfillSpec, ValueFrom};

    fn ubf(ns: &str, name: &str, secret: &str, ca: Option<&str>) -> Arc<UsageBackfill> {
        let mut spec = UsageBackfillSpec::new(secret);
        spec.database.tls = ca.map(|ca| TlsSpec {
            mode: None,
            ca_secret_ref: Some(CaSecretRef {
                name: ca.into(),
                key: "ca.crt".into(),
            }),
        });
        let mut o = UsageBackfill::new(name, spec);
        o.metadata.namespace = Some(ns.into());
        Arc::new(o)
    }

    #[test]
    fn secrets_map_to_the_objects_of_their_namespace_that_use_them() {
        let objects = [
            ubf("a", "one", "db", None),
            ubf("a", "two", "other", Some("db")),
            ubf("a", "three", "other", None),
            ubf("b", "four", "db", None),
        ];
        let names = |ns, secret| -> Vec<String> {
            referencing(&objects, ns, secret)
                .into_iter()
                .map(|r| format!("{}/{}", r.namespace.unwrap(), r.name))
                .collect()
        };
        assert_eq!(names("a", "db"), ["a/one", "a/two"]);
        assert_eq!(names("b", "db"), ["b/four"]);
        assert!(names("c", "db").is_empty());
    }

    #[test]
    fn every_secret_key_ref_of_the_parts_maps_to_its_object() {
        let mut spec = UsageBackfillSpec::new("unused");
        spec.database = DatabaseSpec {
            host: Some("shop-postgres".into()),
            user_from: Some(ValueFrom::secret("db-user", "USER")),
            password_from: Some(ValueFrom::secret("multica-secrets", "POSTGRES_PASSWORD")),
            ..DatabaseSpec::default()
        };
        let mut o = UsageBackfill::new("parts", spec);
        o.metadata.namespace = Some("shop".into());
        let objects = [Arc::new(o)];
        for secret in ["db-user", "multica-secrets"] {
            assert_eq!(referencing(&objects, "shop", secret).len(), 1, "{secret}");
        }
        assert!(referencing(&objects, "shop", "unused").is_empty());
    }
}
