//! One reconcile: fetch (the object and its Secrets) → decide
//! ([`decide`], pure) → act (start, cancel or observe a run task; add or
//! remove the finalizer) → status (server-side apply, only when it
//! changed, with an Event on each change). It never waits for a backfill.
//!
//! The object is the reflector's copy the controller hands over, which can
//! lag behind the API server (a write of this process not yet back through
//! the watch). A decision that leaves everything as it is (observe a run,
//! wait, nothing to do) is safe on it: a newer version of the object
//! brings another reconcile. Anything else (a write, a cancel, a start) is
//! decided again on a fresh GET before it is done. So the reconcile each
//! progress write of a run triggers through the watch makes no request.

use std::sync::Arc;

use jiff::Timestamp;
use kube::api::Api;
use kube::runtime::controller::Action as Requeue;
use kube::{Resource, ResourceExt};
use tracing::Instrument;

use super::Context;
use super::decide::{self, Action, Identity, Observed, SecretLookup, TaskView};
use super::errors::{Error, Result};
use super::events::EventReason;
use super::inputs::{self, Inputs};
use super::progress;
use super::runner::{CancelReason, ObjectKey, RunSpec};
use super::status;
use super::writes;
use usage_backfill_api::{
    ConditionStatus, ConditionType, Phase, UsageBackfill, UsageBackfillStatus as Status,
};
use usage_backfill_engine::Resume;

/// Reconciles one UsageBackfill; the entry point of the controller.
pub async fn reconcile(obj: Arc<UsageBackfill>, ctx: Arc<Context>) -> Result<Requeue> {
    let (Some(namespace), Some(name)) = (obj.namespace(), obj.meta().name.clone()) else {
        let e = Error::MissingMetadata(if obj.namespace().is_none() {
            "namespace"
        } else {
            "name"
        });
        ctx.metrics.reconciled(Err(&e));
        return Err(e);
    };
    let key = ObjectKey::new(namespace, name);
    // Not `name`: the JSON log format writes the span's own name under that key.
    let span =
        tracing::info_span!("reconcile", namespace = %key.namespace, usagebackfill = %key.name);
    let result = reconcile_key(&key, &obj, &ctx).instrument(span).await;
    ctx.metrics.reconciled(result.as_ref().map(drop));
    match &result {
        Ok(_) => ctx.forget_failures(&key),
        Err(e) => {
            tracing::warn!(object = %key, error = %usage_backfill_engine::error_chain(e), "reconcile failed");
            if let Some((write, refusal)) = e.refused_write() {
                report_refusal(&ctx, &obj, write, refusal).await;
            }
        }
    }
    result
}

/// A status or finalizer write refused as invalid (422) would otherwise
/// fail every reconcile with nothing on the object to say why: count it
/// and say it in a Warning Event, with the API server's message (which
/// names the field and the rule; it can quote values of the spec or of the
/// status sent, neither of which holds a secret value).
async fn report_refusal(
    ctx: &Context,
    obj: &UsageBackfill,
    write: &'static str,
    refusal: &kube::core::Status,
) {
    ctx.metrics.write_refused(write);
    let retry = usage_backfill_limits::duration::format(ctx.settings.refused_recheck_interval);
    let note = format!(
        "The API server refused the {write} write as invalid: {}. Only a change of the object, \
         its CRD or the cluster ends this; tried again every {retry}",
        refusal.message.trim_end_matches('.')
    );
    ctx.events
        .publish(&obj.object_ref(&()), EventReason::WriteRefused, note)
        .await;
}

/// On a reconcile error (the API server, not a run): retry with a
/// per-object exponential backoff, 1 s doubling up to 2 min; a write
/// refused as invalid is tried again only every
/// `refused_recheck_interval` (retrying sooner cannot succeed).
pub fn error_policy(obj: Arc<UsageBackfill>, error: &Error, ctx: Arc<Context>) -> Requeue {
    let key = ObjectKey::new(obj.namespace().unwrap_or_default(), obj.name_any());
    if error.refused_write().is_some() {
        ctx.forget_failures(&key);
        return Requeue::requeue(ctx.settings.refused_recheck_interval);
    }
    Requeue::requeue(ctx.next_failure_delay(&key))
}

/// What a reconcile decided from one read of the object.
struct Plan {
    identity: Identity,
    status: Status,
    deleting: bool,
    has_finalizer: bool,
    valid: bool,
    inputs: Inputs,
    now: Timestamp,
    action: Action,
    /// The status to write and the Event to publish of a report action.
    report: Option<(Status, EventReason)>,
}

impl Plan {
    /// Reads the Secrets `obj` needs (unless a task runs or it is being
    /// deleted) and decides.
    async fn of(
        ctx: &Context,
        key: &ObjectKey,
        obj: &UsageBackfill,
        task: &TaskView,
    ) -> Result<Plan> {
        let identity = Identity::new(
            obj.meta().generation.unwrap_or_default(),
            obj.spec.run_id.clone(),
        );
        let status = obj.status.clone().unwrap_or_default();
        let deleting = obj.meta().deletion_timestamp.is_some();
        let has_finalizer = writes::has_finalizer(obj);
        let valid = obj.spec.validate();
        let inputs = match &valid {
            Ok(v) if !deleting && !matches!(task, TaskView::Active { .. }) => {
                inputs::read(&ctx.client, &key.namespace, &obj.spec, v).await?
            }
            _ => Inputs::not_read(),
        };
        let now = Timestamp::now();
        let action = decide::decide(&Observed {
            identity: identity.clone(),
            spec: valid.as_ref(),
            status: &status,
            deleting,
            has_finalizer,
            task,
            secret: &inputs.lookup,
            now,
            backoff: ctx.settings.runner.backoff,
        });
        let report = report_of(&action, &status, &identity, &inputs, now);
        Ok(Plan {
            identity,
            status,
            deleting,
            has_finalizer,
            valid: valid.is_ok(),
            inputs,
            now,
            action,
            report,
        })
    }

    /// Whether acting on this plan makes no request and changes nothing,
    /// so that the reflector's copy of the object may be out of date.
    fn is_quiet(&self, ctx: &Context, key: &ObjectKey, task: &TaskView) -> bool {
        let acts = match &self.action {
            Action::NothingToDo | Action::Observe | Action::WaitBackoff(_) => false,
            Action::ReportInvalid(_)
            | Action::ReportSecretProblem(_)
            | Action::ReportUnusableSecret(_)
            | Action::Suspended => self
                .report
                .as_ref()
                .is_some_and(|(new, _)| *new != self.status),
            Action::StartRun(_)
            | Action::CancelObsolete
            | Action::CancelForDeletion
            | Action::RemoveFinalizer
            | Action::SettleFinished => true,
        };
        // An unsettled task is settled or forgotten by its identity, and a
        // finalizer without a run is removed: both by what the object is now.
        !acts
            && !matches!(task, TaskView::Unsettled { .. })
            && !self.drops_stray_finalizer(ctx, key)
    }

    /// A finalizer with no run behind it (a crash between the final status
    /// and its removal) only blocks deletion: it is dropped.
    fn drops_stray_finalizer(&self, ctx: &Context, key: &ObjectKey) -> bool {
        self.has_finalizer && !self.deleting && !ctx.runner.is_active(key)
    }
}

/// The status and Event of a report action (and of Suspended).
fn report_of(
    action: &Action,
    status: &Status,
    identity: &Identity,
    inputs: &Inputs,
    now: Timestamp,
) -> Option<(Status, EventReason)> {
    match action {
        Action::ReportInvalid(e) => Some((
            status::invalid_spec(status, identity, e, now),
            EventReason::InvalidSpec,
        )),
        Action::ReportSecretProblem(p) => {
            let reason = match p.reason() {
                usage_backfill_api::Reason::SecretNotFound => EventReason::SecretNotFound,
                _ => EventReason::SecretKeyMissing,
            };
            Some((status::secret_problem(status, identity, p, now), reason))
        }
        Action::ReportUnusableSecret(e) => {
            let (versions, digest) = match &inputs.lookup {
                SecretLookup::Unusable {
                    versions, digest, ..
                } => (versions.as_str(), Some(digest.clone())),
                _ => ("", None),
            };
            let mut new =
                status::unusable_secret(status, identity, e, versions, &inputs.redactor, now);
            new.secret_digest = digest;
            Some((new, EventReason::Failed))
        }
        Action::Suspended => Some((
            status::suspended(status, identity, now),
            EventReason::Suspended,
        )),
        _ => None,
    }
}

async fn reconcile_key(key: &ObjectKey, cached: &UsageBackfill, ctx: &Context) -> Result<Requeue> {
    let api: Api<UsageBackfill> = Api::namespaced(ctx.client.clone(), &key.namespace);
    // The task first, the object second: a task that ends in between has
    // written its final status before leaving, so the fresh read sees it
    // (and a stale copy never decides more than to wait).
    let task = ctx.runner.view(key);
    let plan = Plan::of(ctx, key, cached, &task).await?;
    let (obj, plan) = if plan.is_quiet(ctx, key, &task) {
        (cached.clone(), plan)
    } else {
        let read = |source| Error::Read {
            kind: "UsageBackfill",
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            source,
        };
        let Some(fresh) = api.get_opt(&key.name).await.map_err(read)? else {
            ctx.runner.cancel(key, CancelReason::Deletion);
            ctx.runner.forget(key);
            return Ok(Requeue::await_change());
        };
        // The same version decides the same: no second read of the Secrets.
        let plan = if fresh.resource_version() == cached.resource_version() {
            plan
        } else {
            Plan::of(ctx, key, &fresh, &task).await?
        };
        (fresh, plan)
    };
    let Plan {
        identity,
        status,
        deleting,
        has_finalizer,
        valid,
        inputs,
        now,
        action,
        report,
    } = plan;
    tracing::debug!(object = %key, ?action, "decided");
    if matches!(task, TaskView::Unsettled { .. }) && action != Action::SettleFinished {
        ctx.runner.forget(key);
    }

    let act = Act {
        ctx,
        key,
        api: &api,
        obj: &obj,
        identity: &identity,
        status: &status,
        now,
    };
    let requeue = match action {
        // A Failed run restarts when its Secret's value changes: read it
        // again on the recheck schedule (decide() compares the digest, so
        // an unchanged value changes nothing, and writes nothing).
        Action::NothingToDo if status.phase == Some(Phase::Failed) && valid => {
            Requeue::requeue(ctx.settings.secret_recheck_interval)
        }
        Action::NothingToDo => Requeue::await_change(),
        Action::Observe => Requeue::requeue(ctx.settings.observe_interval),
        // A changed Secret retries at once (decide()): look before the
        // backoff ends when it is longer than the recheck interval.
        Action::WaitBackoff(wait) => {
            Requeue::requeue(wait.min(ctx.settings.secret_recheck_interval))
        }
        Action::StartRun(start) => {
            act.start(start, inputs).await?;
            Requeue::requeue(ctx.settings.observe_interval)
        }
        Action::ReportInvalid(_) | Action::Suspended => {
            if let Some((new, reason)) = report {
                act.report(new, reason).await?;
            }
            Requeue::await_change()
        }
        // Without the Secret watch, this is what brings us back; an
        // unusable Secret stays Failed until it (or the spec) changes.
        Action::ReportSecretProblem(_) | Action::ReportUnusableSecret(_) => {
            if let Some((new, reason)) = report {
                act.report(new, reason).await?;
            }
            Requeue::requeue(ctx.settings.secret_recheck_interval)
        }
        Action::CancelObsolete => {
            ctx.runner.cancel(key, CancelReason::Obsolete);
            // The task wakes us when it has left; this is the fallback.
            Requeue::requeue(ctx.settings.cancel_recheck_interval)
        }
        Action::CancelForDeletion => {
            ctx.runner.cancel(key, CancelReason::Deletion);
            Requeue::requeue(ctx.settings.cancel_recheck_interval)
        }
        Action::RemoveFinalizer => {
            act.remove_finalizer().await?;
            Requeue::await_change()
        }
        Action::SettleFinished => {
            if let TaskView::Unsettled { final_status, .. } = &task {
                let uid = ctx.runner.run_uid(key);
                let mut seen = Some(obj.clone());
                let final_status = final_status.as_deref();
                super::runner::settle(&api, &key.name, uid.as_deref(), final_status, &mut seen)
                    .await
                    .map_err(|source| Error::WriteStatus {
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        source,
                    })?;
            }
            ctx.runner.forget(key);
            Requeue::await_change()
        }
    };
    // A finalizer with no run behind it (a crash between the final status
    // and its removal) only blocks deletion: drop it.
    if has_finalizer && !deleting && !ctx.runner.is_active(key) {
        act.remove_finalizer().await?;
    }
    Ok(requeue)
}

struct Act<'a> {
    ctx: &'a Context,
    key: &'a ObjectKey,
    api: &'a Api<UsageBackfill>,
    obj: &'a UsageBackfill,
    identity: &'a Identity,
    status: &'a Status,
    now: Timestamp,
}

impl Act<'_> {
    /// Writes `new`; returns the object as written.
    async fn write_status(&self, new: &Status) -> Result<UsageBackfill> {
        writes::apply_status(self.api, &self.key.name, new)
            .await
            .map_err(|source| Error::WriteStatus {
                namespace: self.key.namespace.clone(),
                name: self.key.name.clone(),
                source,
            })
    }

    /// Writes `new` and publishes `reason`, only when the status changed.
    async fn report(&self, new: Status, reason: EventReason) -> Result<()> {
        if new == *self.status {
            return Ok(());
        }
        self.write_status(&new).await?;
        let note = [
            ConditionType::Stalled,
            ConditionType::Reconciling,
            ConditionType::Ready,
        ]
        .into_iter()
        .find_map(|t| {
            new.condition(t)
                .filter(|c| ConditionStatus::is_true(c) || t == ConditionType::Ready)
        })
        .map(|c| c.message.clone())
        .unwrap_or_default();
        self.ctx
            .events
            .publish(&self.obj.object_ref(&()), reason, note)
            .await;
        Ok(())
    }

    /// Removes the finalizer, guarded by the object as read (a 409 reads
    /// it again).
    async fn remove_finalizer(&self) -> Result<()> {
        let mut seen = Some(self.obj.clone());
        writes::remove_finalizer_of(self.api, &self.key.name, None, &mut seen)
            .await
            .map(drop)
            .map_err(|source| Error::Finalizer {
                namespace: self.key.namespace.clone(),
                name: self.key.name.clone(),
                source,
            })
    }

    /// Finalizer first (the task must never run without it), then the
    /// starting status, the Event, and the task.
    async fn start(&self, start: decide::Start, inputs: Inputs) -> Result<()> {
        let (Ok(valid), Some(database), SecretLookup::Found { versions, digest }) =
            (self.obj.spec.validate(), inputs.database, &inputs.lookup)
        else {
            // decide() starts runs only with a valid spec and a usable Secret.
            return Ok(());
        };
        writes::add_finalizer(self.api, self.obj)
            .await
            .map_err(|source| Error::Finalizer {
                namespace: self.key.namespace.clone(),
                name: self.key.name.clone(),
                source,
            })?;
        let target = database.target();
        // A run without a cursor of its own continues the progress another
        // object left for this database, if any (see `progress`).
        let offered = match start.resume {
            None if !valid.dry_run => self.offered_progress(&target).await,
            _ => None,
        };
        let resume = start.resume.or(offered.as_ref().map(|(r, _)| *r));
        let options = inputs::options(&valid, &self.ctx.settings.session_settings, resume);
        let mut new = status::starting(
            self.status,
            self.identity,
            &start,
            versions,
            &options.effective_settings(),
            self.now,
        );
        if let Some((_, note)) = &offered {
            status::offered_progress(&mut new, note, self.now);
        }
        new.secret_digest = Some(digest.clone());
        let written = self.write_status(&new).await?;
        let note = new.message(ConditionType::Reconciling);
        let regarding = self.obj.object_ref(&());
        self.ctx
            .events
            .publish(&regarding, EventReason::Started, note)
            .await;
        tracing::info!(object = %self.key, attempt = start.attempt, kind = ?start.kind,
            resume = ?resume.map(|r| r.cursor), "starting a run");
        let (mode, months_back) = progress::plan_of(&options.mode);
        let progress = (!valid.dry_run).then(|| progress::Plan {
            target,
            mode,
            months_back,
            writer: progress::Writer {
                namespace: self.key.namespace.clone(),
                name: self.key.name.clone(),
                uid: self.obj.uid().unwrap_or_default(),
            },
        });
        self.ctx.runner.start(RunSpec {
            key: self.key.clone(),
            identity: self.identity.clone(),
            regarding,
            database,
            options,
            status: new,
            max_attempts: start.max_attempts,
            redactor: inputs.redactor,
            progress,
            object: Some(written),
        });
        Ok(())
    }

    /// The resume the progress record of `target` offers, with how the
    /// status names it. A record that is missing, unreadable, expired or
    /// for another target offers none: the run walks from the start.
    async fn offered_progress(&self, target: &str) -> Option<(Resume, String)> {
        let records = progress::Records::new(self.ctx.client.clone(), &self.key.namespace);
        let record = match records.read(target).await {
            Ok(record) => record?,
            Err(e) => {
                tracing::warn!(object = %self.key, error = %e,
                    "cannot read the progress record; walking from the start");
                return None;
            }
        };
        match progress::offer(&record, target, Timestamp::now()) {
            Ok(resume) => Some((resume, record.describe())),
            Err(why) => {
                tracing::info!(object = %self.key, writer = %record.writer, reason = %why,
                    "the progress record is not used; walking from the start");
                None
            }
        }
    }
}
