//! The Kubernetes controller (`usage-backfill controller`): watches
//! UsageBackfills (all namespaces, or the ones given) and the Secrets they
//! reference, and runs each backfill once per generation/runId as a
//! background task, reporting in the status.
//!
//! - [`reconcile`]: the pipeline fetch → decide → act → status.
//! - [`decide`]: the pure decision, including the retry table.
//! - [`status`]: pure status builders following kstatus.
//! - [`runner`]: the background run tasks.
//! - [`inputs`]: Secrets → engine database and options.
//! - [`writes`]: status by server-side apply, the finalizer.
//! - [`events`]: Kubernetes Events.
//! - [`health`]: `/healthz` and `/readyz`.
//!
//! On SIGTERM the controllers stop taking work, then every run is cancelled
//! (lock 4246 released, nothing stamped), saves its status with the cursor
//! and drops its finalizer; the next controller resumes from there.

pub mod decide;
pub mod errors;
pub mod events;
pub mod health;
pub mod inputs;
pub mod reconcile;
pub mod runner;
pub mod status;
pub mod writes;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::controller::{Config as ControllerConfig, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tokio_util::sync::CancellationToken;

pub use errors::{Error, Result};
pub use reconcile::{error_policy, reconcile};
pub use runner::{ObjectKey, Runner, RunnerSettings};

use crate::api::UsageBackfill;
use crate::cli::exit;
use crate::duration;

/// Flags of `usage-backfill controller`.
#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    /// Namespace to watch; repeat (or separate with commas) for several.
    /// Default: all namespaces.
    #[arg(
        long = "namespace",
        short = 'n',
        env = "WATCH_NAMESPACE",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// Backfill runs (and reconciles) in progress at once; more runs wait
    /// in phase Pending for a slot.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    pub concurrency: u16,
    /// Address of the /healthz and /readyz endpoints.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
    /// Session setting of every backfill session, NAME=VALUE; repeatable.
    /// Replaces the default, which turns nested loops off for the window
    /// calls (about 40x faster on agents with many tasks, same results).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = parse_setting,
          default_value = "enable_nestloop=off")]
    pub session_settings: Vec<(String, String)>,
    /// Backoff before the first retry of a failed attempt; doubles per
    /// failure.
    #[arg(long, value_parser = duration::clap_parse, default_value = "10s")]
    pub retry_backoff: Duration,
    /// Longest backoff between attempts.
    #[arg(long, value_parser = duration::clap_parse, default_value = "5m")]
    pub retry_backoff_max: Duration,
    /// How long a shutdown waits for runs to save their cursor.
    #[arg(long, value_parser = duration::clap_parse, default_value = "25s")]
    pub shutdown_timeout: Duration,
}

fn parse_setting(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected NAME=VALUE".to_owned()),
    }
}

/// Tunables of the controller (tests shorten them).
#[derive(Debug, Clone)]
pub struct Settings {
    pub runner: RunnerSettings,
    /// Applied to every backfill session (see `--set`).
    pub session_settings: Vec<(String, String)>,
    /// Fallback requeue while this process runs the object's backfill.
    pub observe_interval: Duration,
    /// Fallback requeue while a Secret is missing (the watch comes first).
    pub secret_recheck_interval: Duration,
    /// Fallback requeue after cancelling a task.
    pub cancel_recheck_interval: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            runner: RunnerSettings::default(),
            session_settings: vec![("enable_nestloop".into(), "off".into())],
            observe_interval: Duration::from_secs(300),
            secret_recheck_interval: Duration::from_secs(300),
            cancel_recheck_interval: Duration::from_secs(2),
        }
    }
}

impl Settings {
    pub fn from_args(args: &ControllerArgs) -> Self {
        let mut s = Settings::default();
        s.runner.concurrency = usize::from(args.concurrency);
        s.runner.backoff = decide::Backoff {
            base: args.retry_backoff,
            max: args.retry_backoff_max.max(args.retry_backoff),
        };
        s.session_settings = args.session_settings.clone();
        s
    }
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub events: events::Publisher,
    pub runner: Runner,
    pub settings: Settings,
    /// Consecutive reconcile errors per object, for [`error_policy`].
    failures: Mutex<HashMap<ObjectKey, u32>>,
}

impl Context {
    pub fn new(client: Client, settings: Settings) -> Arc<Self> {
        let events = events::Publisher::new(client.clone(), std::env::var("POD_NAME").ok());
        let runner = Runner::new(client.clone(), events.clone(), settings.runner);
        Arc::new(Context {
            client,
            events,
            runner,
            settings,
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
/// (as database Secret or CA Secret).
pub fn referencing(
    objects: &[Arc<UsageBackfill>],
    namespace: &str,
    name: &str,
) -> Vec<ObjectRef<UsageBackfill>> {
    objects
        .iter()
        .filter(|o| o.namespace().as_deref() == Some(namespace))
        .filter(|o| {
            let db = &o.spec.database;
            db.secret_ref.name == name
                || db
                    .tls
                    .as_ref()
                    .and_then(|t| t.ca_secret_ref.as_ref())
                    .is_some_and(|ca| ca.name == name)
        })
        .map(|o| ObjectRef::from_obj(o.as_ref()))
        .collect()
}

/// `usage-backfill controller`: runs until `cancel`, then shuts down.
pub async fn run(args: ControllerArgs, cancel: CancellationToken) -> u8 {
    match serve(&args, cancel).await {
        Ok(()) => exit::OK,
        Err(e) => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text += &format!(": {s}");
                source = s.source();
            }
            eprintln!("error: {text}");
            exit::RETRYABLE
        }
    }
}

async fn serve(args: &ControllerArgs, cancel: CancellationToken) -> Result<()> {
    let client = Client::try_default().await.map_err(Error::Client)?;
    let listener = tokio::net::TcpListener::bind(args.health_addr)
        .await
        .map_err(|source| Error::Health {
            addr: args.health_addr,
            source,
        })?;
    let ready = Arc::new(AtomicBool::new(false));
    let health = tokio::spawn(health::serve(listener, ready.clone(), cancel.clone()));
    let ctx = Context::new(client, Settings::from_args(args));
    tracing::info!(namespaces = ?args.namespaces, concurrency = args.concurrency,
        health = %args.health_addr, "controller starting");
    run_controllers(
        ctx,
        args.namespaces.clone(),
        args.concurrency,
        ready,
        args.shutdown_timeout,
        cancel,
    )
    .await;
    let _ = health.await;
    Ok(())
}

/// Runs one controller per watched namespace (one for all when
/// `namespaces` is empty) until `cancel`, then cancels the runs and waits
/// up to `shutdown_timeout` for them to save their cursor.
pub async fn run_controllers(
    ctx: Arc<Context>,
    namespaces: Vec<String>,
    concurrency: u16,
    ready: Arc<AtomicBool>,
    shutdown_timeout: Duration,
    cancel: CancellationToken,
) {
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
        // Metadata only: Secret values never pass through the watch.
        let secret_events =
            watcher(secrets, watcher::Config::default().any_semantic()).touched_objects();
        let wake = ctx.runner.subscribe().filter_map(move |key: ObjectKey| {
            let mine = scope.as_deref().is_none_or(|ns| ns == key.namespace);
            futures::future::ready(
                mine.then(|| ObjectRef::<UsageBackfill>::new(&key.name).within(&key.namespace)),
            )
        });
        let run = controller
            .watches_stream(secret_events, move |secret: PartialObjectMeta<Secret>| {
                let namespace = secret.namespace().unwrap_or_default();
                referencing(&store.state(), &namespace, &secret.name_any())
            })
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
    futures::future::join_all(controllers).await;
    readiness.abort();
    tracing::info!(
        runs = ctx.runner.active(),
        "controllers stopped; cancelling runs"
    );
    let left = ctx.runner.shutdown(shutdown_timeout).await;
    if left > 0 {
        tracing::warn!(
            runs = left,
            "runs still finishing at exit; PostgreSQL releases their lock when the sessions close"
        );
    } else {
        tracing::info!("all runs saved their status; bye");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{CaSecretRef, TlsSpec, UsageBackfillSpec};
    use clap::Parser;

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

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        args: ControllerArgs,
    }

    #[test]
    fn flags_and_defaults() {
        let w = Wrap::try_parse_from(["x"]).unwrap();
        assert!(w.args.namespaces.is_empty());
        assert_eq!(w.args.concurrency, 4);
        assert_eq!(w.args.health_addr.to_string(), "0.0.0.0:8080");
        assert_eq!(
            w.args.session_settings,
            [("enable_nestloop".to_owned(), "off".to_owned())]
        );
        let s = Settings::from_args(&w.args);
        assert_eq!(s.runner.backoff.base, Duration::from_secs(10));
        assert_eq!(s.runner.backoff.max, Duration::from_secs(300));

        let w = Wrap::try_parse_from([
            "x",
            "-n",
            "a,b",
            "--namespace",
            "c",
            "--concurrency",
            "2",
            "--set",
            "work_mem=64MB",
        ])
        .unwrap();
        assert_eq!(w.args.namespaces, ["a", "b", "c"]);
        assert_eq!(
            w.args.session_settings,
            [("work_mem".to_owned(), "64MB".to_owned())]
        );
        assert!(Wrap::try_parse_from(["x", "--concurrency", "0"]).is_err());
    }
}
