//! Background run tasks, one per object at most, keyed by namespace/name
//! and remembering the generation/runId they run for.
//!
//! A task waits for a run slot (`--concurrency`), calls [`engine::run`],
//! keeps the complete desired status in memory and applies it: at once on
//! a phase change, at most every `progress_interval` for slice progress,
//! and at least every `heartbeat_interval` (heartbeatTime) while running or
//! waiting for lock 4246. At the end it writes the final status, publishes
//! the Event, removes the finalizer, leaves the map and wakes the
//! reconciler. When one of those writes keeps failing it leaves its final
//! status behind ([`TaskView::Unsettled`]) for the reconcile to settle.
//!
//! Cancellation says why: deletion and a superseded spec write no status
//! (the object is going, or the next run writes its own); shutdown writes
//! the status as it stands, phase included, so that the next controller
//! resumes from the cursor.
//!
//! Beside the status, a run keeps its database's progress record
//! ([`progress`]) at the same points, once more when it ends unstamped
//! (whatever the reason), and deletes it when it stamps.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::channel::mpsc as wake;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::api::Api;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::decide::{self, AfterFailure, Backoff, Identity, TaskView};
use super::events::{EventReason, Publisher};
use super::metrics::{Metrics, RunOutcome};
use super::progress::{self, Keeper};
use super::status::{self, Change, Redactor};
use super::writes::{self, Guarded};
use usage_backfill_api::{ConditionType, UsageBackfill, UsageBackfillStatus as Status};
use usage_backfill_engine::{self as engine, Database, Event, Options};

/// Which object: its namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: String,
    pub name: String,
}

impl ObjectKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a task is cancelled; decides what it writes on the way out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The object is being deleted: no status, remove the finalizer.
    Deletion,
    /// The spec changed: no status (the next run writes its own).
    Obsolete,
    /// The controller stops: keep the phase and cursor for the next one.
    Shutdown,
}

/// Default of [`RunnerSettings::progress_interval`]: each progress write
/// is a status apply, a progress-record apply and a watch event to every
/// watcher of UsageBackfills; every 5 s keeps a running backfill at about
/// 24 requests a minute, and `kubectl get ubf -w` still moves visibly.
pub const DEFAULT_PROGRESS_INTERVAL: Duration = Duration::from_secs(5);

/// Timings of the run tasks.
#[derive(Debug, Clone, Copy)]
pub struct RunnerSettings {
    /// Slice progress is written at most this often.
    pub progress_interval: Duration,
    /// heartbeatTime is refreshed at least this often.
    pub heartbeat_interval: Duration,
    pub backoff: Backoff,
    /// Runs in progress at once; more wait (Pending) for a slot.
    pub concurrency: usize,
    /// First pause between tries of the final writes (doubles, 5 tries).
    pub settle_pause: Duration,
}

impl Default for RunnerSettings {
    fn default() -> Self {
        RunnerSettings {
            progress_interval: DEFAULT_PROGRESS_INTERVAL,
            heartbeat_interval: Duration::from_secs(15),
            backoff: Backoff::default(),
            concurrency: 4,
            settle_pause: Duration::from_millis(500),
        }
    }
}

/// Everything a task needs, prepared by the reconcile.
#[derive(Debug)]
pub struct RunSpec {
    pub key: ObjectKey,
    pub identity: Identity,
    pub regarding: ObjectReference,
    pub database: Database,
    pub options: Options,
    /// The status as written just before the start.
    pub status: Status,
    pub max_attempts: u32,
    pub redactor: Redactor,
    /// The progress record to keep; None for a dry run.
    pub progress: Option<progress::Plan>,
    /// The object as the starting status left it: it guards the run's
    /// first write (see [`writes`]); `None` reads it first.
    pub object: Option<UsageBackfill>,
}

/// The run tasks of this process. Cheap to clone.
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    events: Publisher,
    metrics: Arc<Metrics>,
    settings: RunnerSettings,
    slots: Arc<Semaphore>,
    tasks: Mutex<HashMap<ObjectKey, Entry>>,
    /// Signalled whenever a task leaves (or settles).
    changed: Notify,
    wake: Mutex<Vec<wake::UnboundedSender<ObjectKey>>>,
}

struct Entry {
    identity: Identity,
    /// UID of the object the run is for: its writes land on no other.
    uid: Option<String>,
    cancel: CancellationToken,
    why: Option<CancelReason>,
    /// Set when the task ended with writes still to do.
    unsettled: Option<Option<Box<Status>>>,
}

impl Runner {
    /// A runner with metrics of its own (not served anywhere).
    pub fn new(client: Client, events: Publisher, settings: RunnerSettings) -> Self {
        Self::with_metrics(client, events, settings, Metrics::new())
    }

    pub fn with_metrics(
        client: Client,
        events: Publisher,
        settings: RunnerSettings,
        metrics: Arc<Metrics>,
    ) -> Self {
        Runner {
            inner: Arc::new(Inner {
                client,
                events,
                metrics,
                slots: Arc::new(Semaphore::new(settings.concurrency.max(1))),
                settings,
                tasks: Mutex::new(HashMap::new()),
                changed: Notify::new(),
                wake: Mutex::new(Vec::new()),
            }),
        }
    }

    pub fn settings(&self) -> &RunnerSettings {
        &self.inner.settings
    }

    /// What this process does for `key`.
    pub fn view(&self, key: &ObjectKey) -> TaskView {
        match self.inner.tasks().get(key) {
            None => TaskView::None,
            Some(Entry {
                identity,
                unsettled: None,
                ..
            }) => TaskView::Active {
                identity: identity.clone(),
            },
            Some(Entry {
                identity,
                unsettled: Some(final_status),
                ..
            }) => TaskView::Unsettled {
                identity: identity.clone(),
                final_status: final_status.clone(),
            },
        }
    }

    /// Whether a task runs for `key` (not counting an unsettled one).
    pub fn is_active(&self, key: &ObjectKey) -> bool {
        matches!(self.view(key), TaskView::Active { .. })
    }

    /// Number of tasks running.
    pub fn active(&self) -> usize {
        self.inner.active()
    }

    /// Starts the task of `spec`. Any unsettled leftover of the key is
    /// replaced; an active task of the key is a caller bug and is kept.
    pub fn start(&self, spec: RunSpec) {
        let cancel = CancellationToken::new();
        {
            let mut tasks = self.inner.tasks();
            if let Some(e) = tasks.get(&spec.key)
                && e.unsettled.is_none()
            {
                tracing::error!(object = %spec.key, "a run task is already active; not starting another");
                return;
            }
            tasks.insert(
                spec.key.clone(),
                Entry {
                    identity: spec.identity.clone(),
                    uid: spec.regarding.uid.clone(),
                    cancel: cancel.clone(),
                    why: None,
                    unsettled: None,
                },
            );
        }
        self.inner.metrics.set_runs_active(self.inner.active());
        let inner = self.inner.clone();
        // The engine's `slice` spans nest in this one.
        let span = tracing::info_span!("run", namespace = %spec.key.namespace,
            usagebackfill = %spec.key.name);
        tokio::spawn(
            async move {
                let key = spec.key.clone();
                let mut guard = Leave {
                    inner: inner.clone(),
                    key: key.clone(),
                    unsettled: None,
                };
                guard.unsettled = run(&inner, spec, cancel).await;
                drop(guard);
            }
            .instrument(span),
        );
    }

    /// Cancels the task of `key`, if any; the first reason given sticks.
    pub fn cancel(&self, key: &ObjectKey, why: CancelReason) {
        if let Some(e) = self.inner.tasks().get_mut(key)
            && e.unsettled.is_none()
        {
            e.why.get_or_insert(why);
            e.cancel.cancel();
        }
    }

    /// UID of the object the task of `key` (active or unsettled) is for.
    pub fn run_uid(&self, key: &ObjectKey) -> Option<String> {
        self.inner.tasks().get(key).and_then(|e| e.uid.clone())
    }

    /// Drops an unsettled leftover of `key`.
    pub fn forget(&self, key: &ObjectKey) {
        let mut tasks = self.inner.tasks();
        if tasks.get(key).is_some_and(|e| e.unsettled.is_some()) {
            tasks.remove(key);
        }
    }

    /// Keys of objects whose task left: feed them to the controller.
    pub fn subscribe(&self) -> wake::UnboundedReceiver<ObjectKey> {
        let (tx, rx) = wake::unbounded();
        self.inner
            .wake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(tx);
        rx
    }

    /// Waits until no task is active for `key`.
    pub async fn wait_idle(&self, key: &ObjectKey) {
        loop {
            let changed = self.inner.changed.notified();
            if !self.is_active(key) {
                return;
            }
            changed.await;
        }
    }

    /// Cancels every task (the engine releases lock 4246 and stamps
    /// nothing), waits for them to save their status and remove their
    /// finalizer, at most `timeout`. Returns how many did not finish.
    pub async fn shutdown(&self, timeout: Duration) -> usize {
        let keys: Vec<ObjectKey> = self.inner.tasks().keys().cloned().collect();
        for key in &keys {
            self.cancel(key, CancelReason::Shutdown);
        }
        let all_done = async {
            loop {
                let changed = self.inner.changed.notified();
                if self.active() == 0 {
                    return;
                }
                changed.await;
            }
        };
        let _ = tokio::time::timeout(timeout, all_done).await;
        self.active()
    }
}

impl Inner {
    fn tasks(&self) -> MutexGuard<'_, HashMap<ObjectKey, Entry>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cancel_reason(&self, key: &ObjectKey) -> Option<CancelReason> {
        self.tasks().get(key).and_then(|e| e.why)
    }

    fn active(&self) -> usize {
        self.tasks()
            .values()
            .filter(|e| e.unsettled.is_none())
            .count()
    }
}

/// Takes the task out of the map however it ends (a panic included: the
/// status still says Running, so the next reconcile resumes the run).
struct Leave {
    inner: Arc<Inner>,
    key: ObjectKey,
    unsettled: Option<Option<Box<Status>>>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        {
            let mut tasks = self.inner.tasks();
            match self.unsettled.take() {
                Some(final_status) => {
                    if let Some(e) = tasks.get_mut(&self.key) {
                        e.unsettled = Some(final_status);
                    }
                }
                None => {
                    tasks.remove(&self.key);
                }
            }
        }
        self.inner.metrics.set_runs_active(self.inner.active());
        self.inner.changed.notify_waiters();
        self.inner
            .wake
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|tx| tx.unbounded_send(self.key.clone()).is_ok());
    }
}

/// The task body. Returns the final status when it could not be settled.
async fn run(
    inner: &Arc<Inner>,
    spec: RunSpec,
    cancel: CancellationToken,
) -> Option<Option<Box<Status>>> {
    let api: Api<UsageBackfill> = Api::namespaced(inner.client.clone(), &spec.key.namespace);
    let started = Instant::now();
    let mut desired = spec.status.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let engine_run = {
        let slots = inner.slots.clone();
        let cancel = cancel.clone();
        let (db, opts) = (&spec.database, &spec.options);
        async move {
            let tx = tx;
            let permit = tokio::select! {
                p = slots.acquire_owned() => p.ok(),
                () = cancel.cancelled() => None,
            };
            let Some(_permit) = permit else {
                return Err(engine::Error::Cancelled);
            };
            let mut on_event = |e: &Event| {
                let _ = tx.send(e.clone());
            };
            engine::run(db, opts, &cancel, &mut on_event).await
        }
    };
    let mut keeper = spec
        .progress
        .clone()
        .map(|plan| Keeper::new(inner.client.clone(), &spec.key.namespace, plan));
    // The object as this run last saw it: the answer to its last write.
    let mut seen = spec.object.clone();
    let writer = report_progress(
        inner,
        &api,
        &spec,
        &mut desired,
        &mut keeper,
        &mut seen,
        &mut rx,
    );
    let (result, ()) = tokio::join!(engine_run, writer);
    // Before the finalizer goes: whoever recreates the object finds the
    // last committed cursor, or no record once the watermark is stamped.
    if let Some(keeper) = &mut keeper {
        match &result {
            Ok(outcome) if outcome.watermark_stamped => keeper.stamped().await,
            _ => keeper.save(&desired).await,
        }
    }

    let why = inner.cancel_reason(&spec.key);
    let now = Timestamp::now();
    let attempt = desired.attempts.unwrap_or(1);
    let (final_status, event) = match result {
        Err(_) if matches!(why, Some(CancelReason::Deletion | CancelReason::Obsolete)) => {
            tracing::info!(object = %spec.key, reason = ?why, "run cancelled");
            inner
                .metrics
                .run_ended(RunOutcome::Cancelled, None, started.elapsed());
            (None, None)
        }
        Err(engine::Error::Cancelled) => {
            tracing::info!(object = %spec.key, "run interrupted by shutdown; it resumes from the cursor");
            inner
                .metrics
                .run_ended(RunOutcome::Cancelled, None, started.elapsed());
            status::interrupted(&mut desired, now);
            (Some(desired), None)
        }
        Ok(outcome) => {
            let counted = match (outcome.skipped, outcome.dry_run) {
                (Some(_), _) => RunOutcome::Skipped,
                (None, true) => RunOutcome::DryRun,
                (None, false) => RunOutcome::Backfilled,
            };
            inner.metrics.run_ended(counted, None, started.elapsed());
            let s = status::succeeded(&desired, &outcome, now);
            let reason = if outcome.skipped.is_some() {
                EventReason::Skipped
            } else {
                EventReason::Succeeded
            };
            tracing::info!(object = %spec.key, slices = outcome.slices_processed,
                rows = outcome.rows_touched, skipped = ?outcome.skipped, "run succeeded");
            let note = s.message(ConditionType::Ready);
            (Some(s), Some((reason, note)))
        }
        Err(e) => {
            let backoff = inner.settings.backoff;
            match decide::after_failure(&e, attempt, spec.max_attempts, backoff) {
                AfterFailure::Retry { delay } => {
                    inner
                        .metrics
                        .run_ended(RunOutcome::Retry, Some(e.reason()), started.elapsed());
                    tracing::warn!(object = %spec.key, reason = e.reason(), attempt,
                        retry_in = ?delay, error = %spec.redactor.redact(&e.to_string()), "attempt failed");
                    status::retry_scheduled(&mut desired, &e, delay, &spec.redactor, now);
                    let note = desired.message(ConditionType::Reconciling);
                    (Some(desired), Some((EventReason::RetryScheduled, note)))
                }
                AfterFailure::Terminal { reason } => {
                    inner.metrics.run_ended(
                        RunOutcome::Failed,
                        Some(e.reason()),
                        started.elapsed(),
                    );
                    tracing::warn!(object = %spec.key, reason = reason.as_str(), attempt,
                        error = %spec.redactor.redact(&e.to_string()), "run failed");
                    status::failed(
                        &mut desired,
                        &e,
                        reason,
                        spec.max_attempts,
                        &spec.redactor,
                        now,
                    );
                    let note = desired.message(ConditionType::Stalled);
                    (Some(desired), Some((EventReason::Failed, note)))
                }
            }
        }
    };

    let mut pause = inner.settings.settle_pause;
    let mut settled = false;
    for try_ in 0..5 {
        let uid = spec.regarding.uid.as_deref();
        match settle(&api, &spec.key.name, uid, final_status.as_ref(), &mut seen).await {
            Ok(()) => {
                settled = true;
                break;
            }
            Err(e) => {
                tracing::warn!(object = %spec.key, error = %e, try_, "cannot write the final status or remove the finalizer");
                if try_ < 4 {
                    tokio::time::sleep(pause).await;
                    pause *= 2;
                }
            }
        }
    }
    if let Some((reason, note)) = event {
        inner.events.publish(&spec.regarding, reason, note).await;
    }
    if settled {
        None
    } else {
        Some(final_status.map(Box::new))
    }
}

/// Writes the final status (when there is one) and removes the finalizer,
/// on the object with `uid` only (when known). A vanished or recreated
/// object counts as settled; one being deleted gets no status, only its
/// finalizer removed. `seen` is the object as last seen (see [`writes`]).
pub(crate) async fn settle(
    api: &Api<UsageBackfill>,
    name: &str,
    uid: Option<&str>,
    final_status: Option<&Status>,
    seen: &mut Option<UsageBackfill>,
) -> kube::Result<()> {
    if let Some(s) = final_status
        && let Guarded::Gone | Guarded::Recreated = write_status(api, name, uid, s, seen).await?
    {
        return Ok(());
    }
    writes::remove_finalizer_of(api, name, uid, seen).await?;
    Ok(())
}

/// A run's status write: guarded by the object's UID when known.
async fn write_status(
    api: &Api<UsageBackfill>,
    name: &str,
    uid: Option<&str>,
    s: &Status,
    seen: &mut Option<UsageBackfill>,
) -> kube::Result<Guarded> {
    match uid {
        Some(uid) => writes::apply_status_of(api, name, uid, s, seen).await,
        None => match writes::apply_status(api, name, s).await {
            Ok(written) => {
                *seen = Some(written);
                Ok(Guarded::Written)
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(Guarded::Gone),
            Err(e) => Err(e),
        },
    }
}

/// Folds engine events into `desired` and writes it: at once on a phase
/// change, throttled for progress, and as a heartbeat when quiet.
async fn report_progress(
    inner: &Inner,
    api: &Api<UsageBackfill>,
    spec: &RunSpec,
    desired: &mut Status,
    keeper: &mut Option<Keeper>,
    seen: &mut Option<UsageBackfill>,
    rx: &mut mpsc::UnboundedReceiver<Event>,
) {
    let settings = &inner.settings;
    let tick = (settings.progress_interval.min(settings.heartbeat_interval) / 4)
        .clamp(Duration::from_millis(20), Duration::from_secs(1));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The reconcile wrote the starting status just before.
    let mut throttle = Throttle::new(
        Instant::now(),
        settings.progress_interval,
        settings.heartbeat_interval,
    );
    // Set once the object of the run is gone or replaced under its name.
    let mut orphaned = false;
    loop {
        let write = tokio::select! {
            event = rx.recv() => {
                let Some(event) = event else { break };
                match &event {
                    Event::SliceDone { rows, .. } => inner.metrics.slice_done(*rows),
                    Event::LockAcquired { waited_ms } => {
                        inner.metrics.lock_acquired(Duration::from_millis(*waited_ms));
                    }
                    _ => {}
                }
                if let Some(keeper) = keeper.as_mut() {
                    keeper.observe(&event);
                }
                let change = status::apply_event(desired, &event, Timestamp::now());
                if let Event::WaitingForLock { .. } = event {
                    let note = desired.message(ConditionType::Reconciling);
                    inner.events.publish(&spec.regarding, EventReason::WaitingForLock, note).await;
                }
                throttle.on_change(change, Instant::now())
            }
            _ = ticker.tick() => throttle.on_tick(Instant::now()),
        };
        if !write {
            continue;
        }
        if !orphaned {
            let now = Timestamp::now();
            status::heartbeat(desired, now);
            let uid = spec.regarding.uid.as_deref();
            match write_status(api, &spec.key.name, uid, desired, seen).await {
                // Being deleted: the reconcile is about to cancel the run.
                Ok(Guarded::Written | Guarded::Deleting) => {}
                Ok(outcome) => {
                    tracing::warn!(object = %spec.key, ?outcome,
                        "the run's object is gone or was replaced; its status gets no more writes");
                    orphaned = true;
                }
                Err(e) => tracing::warn!(object = %spec.key, error = %e, "cannot write progress"),
            }
        }
        // The record also once the object is gone: its slices are
        // committed all the same, and a recreated object resumes from them.
        if let Some(keeper) = keeper.as_mut() {
            keeper.save(desired).await;
        }
        throttle.written(Instant::now());
    }
}

/// When to write a run's status: phase changes at once, progress at most
/// every `progress`, something at least every `heartbeat`.
#[derive(Debug, Clone)]
pub(crate) struct Throttle {
    last: Instant,
    dirty: bool,
    progress: Duration,
    heartbeat: Duration,
}

impl Throttle {
    pub(crate) fn new(last_write: Instant, progress: Duration, heartbeat: Duration) -> Self {
        Throttle {
            last: last_write,
            dirty: false,
            progress,
            heartbeat,
        }
    }

    /// Whether to write now, after an event made `change`.
    pub(crate) fn on_change(&mut self, change: Change, now: Instant) -> bool {
        match change {
            Change::None => false,
            Change::Phase => true,
            Change::Progress => {
                self.dirty = true;
                now.duration_since(self.last) >= self.progress
            }
        }
    }

    /// Whether to write now, on a timer tick.
    pub(crate) fn on_tick(&mut self, now: Instant) -> bool {
        let since = now.duration_since(self.last);
        (self.dirty && since >= self.progress) || since >= self.heartbeat
    }

    pub(crate) fn written(&mut self, now: Instant) {
        self.last = now;
        self.dirty = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_writes_phases_at_once_progress_at_most_each_interval() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut t = Throttle::new(t0, s, Duration::from_secs(15));
        assert!(t.on_change(Change::Phase, t0));
        t.written(t0);
        assert!(!t.on_change(Change::Progress, t0 + s / 2));
        assert!(!t.on_change(Change::None, t0 + s / 2));
        assert!(!t.on_tick(t0 + s / 2));
        // The pending progress goes out on the first tick after a second.
        assert!(t.on_tick(t0 + s));
        t.written(t0 + s);
        assert!(!t.on_tick(t0 + 2 * s), "nothing new, no heartbeat due");
        assert!(t.on_change(Change::Progress, t0 + 3 * s));
        t.written(t0 + 3 * s);
        // Quiet (e.g. waiting for the lock): a heartbeat every 15 s.
        assert!(!t.on_tick(t0 + 17 * s));
        assert!(t.on_tick(t0 + 18 * s));
    }

    #[test]
    fn object_keys_print_as_namespace_slash_name() {
        assert_eq!(ObjectKey::new("ns", "a").to_string(), "ns/a");
    }
}
