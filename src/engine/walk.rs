//! The run itself: the reference's hook and command flows over one
//! [`Session`], with the lock released on every path.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::plan::{self, Decision, GUARD_TOLERANCE, Snapshot};
use super::session::Session;
use super::{Database, Error, Event, Mode, Options, Outcome, PlannedSlice, Result, SkipReason};

/// Runs one backfill attempt against `db`.
///
/// `on_event` sees progress as it happens (slice by slice). `cancel` stops
/// the run between slices, during a slice (the slice rolls back) and while
/// waiting for the lock; the lock is released before this returns, and
/// nothing is stamped. With `opts.resume`, slices before the cursor are not
/// walked again and counts continue from the resumed ones.
pub async fn run(
    db: &Database,
    opts: &Options,
    cancel: &CancellationToken,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<Outcome> {
    for (name, _) in &opts.session_settings {
        validate_setting_name(name)?;
    }
    let started = Instant::now();
    let session = Session::connect(db).await?;
    on_event(&Event::Connected {
        server_version: session.server_version().await?,
    });
    session.apply_settings(&opts.session_settings).await?;
    let mut run = Run {
        session: &session,
        opts,
        cancel,
        on_event,
        outcome: Outcome {
            dry_run: opts.dry_run,
            settings: opts.session_settings.clone(),
            ..Outcome::default()
        },
    };
    run.execute().await?;
    let mut outcome = run.outcome;
    outcome.elapsed_ms = millis(started.elapsed());
    Ok(outcome)
}

struct Run<'a> {
    session: &'a Session,
    opts: &'a Options,
    cancel: &'a CancellationToken,
    on_event: &'a mut (dyn FnMut(&Event) + Send),
    outcome: Outcome,
}

impl Run<'_> {
    async fn execute(&mut self) -> Result<()> {
        match self.opts.mode {
            Mode::IfLagging { lag_threshold } => self.if_lagging(lag_threshold).await,
            Mode::Always { .. } => self.always().await,
        }
    }

    /// The migration-time hook: decide without the lock, then decide again
    /// under it, since another backfill may have finished while we waited.
    async fn if_lagging(&mut self, threshold: Duration) -> Result<()> {
        let snap = self.session.snapshot().await?;
        self.observe(&snap);
        let from = match plan::decide_if_lagging(&snap, threshold)? {
            Decision::Skip { reason, stamp } => return self.skip(reason, stamp).await,
            Decision::Walk { from } => from,
        };
        self.refuse_future_events(&snap, threshold).await?;
        self.require_window_function().await?;
        if self.opts.dry_run {
            return self.dry_run(from, &snap).await;
        }
        self.acquire().await?;
        let result = self.if_lagging_locked(threshold).await;
        self.session.unlock().await;
        result
    }

    async fn if_lagging_locked(&mut self, threshold: Duration) -> Result<()> {
        let snap = self.session.snapshot().await?;
        self.observe(&snap);
        match plan::decide_if_lagging(&snap, threshold)? {
            Decision::Skip { reason, stamp } => self.skip(reason, stamp).await,
            Decision::Walk { from } => self.walk_and_stamp(from, &snap).await,
        }
    }

    /// The operator command: lock first, then read the range, then walk.
    async fn always(&mut self) -> Result<()> {
        let (state_table, _) = self.session.schema().await?;
        if !state_table {
            return Err(Error::RollupStateMissing);
        }
        self.require_window_function().await?;
        if self.opts.dry_run {
            let snap = self.session.snapshot().await?;
            self.observe(&snap);
            return match plan::decide(&snap, &self.opts.mode)? {
                Decision::Skip { reason, .. } => {
                    self.outcome.skipped = Some(reason);
                    Ok(())
                }
                Decision::Walk { from } => self.dry_run(from, &snap).await,
            };
        }
        self.acquire().await?;
        let result = self.always_locked().await;
        self.session.unlock().await;
        result
    }

    async fn always_locked(&mut self) -> Result<()> {
        let snap = self.session.snapshot().await?;
        self.observe(&snap);
        let decision = plan::decide(&snap, &self.opts.mode)?;
        // Reported, not fatal: the user asked for the full walk.
        let horizon = snap.future_horizon(GUARD_TOLERANCE);
        if snap.max_event.is_some_and(|m| m > horizon) {
            self.outcome.future_events = self.session.future_events(horizon, snap.now).await?;
        }
        match decision {
            Decision::Skip { reason, stamp } => self.skip(reason, stamp).await,
            Decision::Walk { from } => self.walk_and_stamp(from, &snap).await,
        }
    }

    /// Takes lock 4246 and arms the slice timeout. On success the caller
    /// holds the lock and must call `unlock` whatever happens next; on
    /// failure the lock is not held.
    async fn acquire(&mut self) -> Result<()> {
        let on_event = &mut *self.on_event;
        let waited = self
            .session
            .lock(self.opts.lock_timeout, self.cancel, |holder| {
                on_event(&Event::WaitingForLock { holder })
            })
            .await?;
        self.outcome.lock_waited_ms = millis(waited);
        (self.on_event)(&Event::LockAcquired {
            waited_ms: millis(waited),
        });
        if let Err(e) = self.slice_timeout_on().await {
            self.session.unlock().await;
            return Err(e);
        }
        Ok(())
    }

    async fn slice_timeout_on(&mut self) -> Result<()> {
        match self.opts.slice_timeout {
            Some(t) => {
                self.session
                    .set("statement_timeout", &format!("{}ms", t.as_millis().max(1)))
                    .await
            }
            None => Ok(()),
        }
    }

    fn observe(&mut self, snap: &Snapshot) {
        self.outcome.watermark_before = snap.watermark;
        self.outcome.max_event = snap.max_event;
        self.outcome.lag_seconds = snap.lag().map(|l| l.as_secs());
    }

    async fn skip(&mut self, reason: SkipReason, stamp: bool) -> Result<()> {
        self.outcome.skipped = Some(reason);
        if stamp && !self.opts.dry_run {
            self.stamp().await?;
        }
        Ok(())
    }

    async fn require_window_function(&mut self) -> Result<()> {
        match self.session.schema().await? {
            (_, true) => Ok(()),
            (_, false) => Err(Error::SchemaMissing {
                what: "function rollup_task_usage_hourly_window(timestamptz, timestamptz)".into(),
            }),
        }
    }

    async fn refuse_future_events(&mut self, snap: &Snapshot, threshold: Duration) -> Result<()> {
        let horizon = snap.future_horizon(threshold);
        if snap.max_event.is_some_and(|m| m > horizon)
            && let Some(future) = self.session.future_events(horizon, snap.now).await?
        {
            return Err(Error::FutureDatedEvents(future));
        }
        Ok(())
    }

    async fn dry_run(&mut self, from: jiff::Timestamp, snap: &Snapshot) -> Result<()> {
        let max_event = snap.max_event.expect("a walk is only decided on history");
        let slices = plan::slices(from, max_event, snap.now);
        self.announce(from, &slices, 0);
        for slice in slices {
            let planned = PlannedSlice {
                slice,
                estimated_events: self.session.estimate(&slice).await?,
            };
            (self.on_event)(&Event::SlicePlanned(planned.clone()));
            self.outcome.planned.push(planned);
        }
        Ok(())
    }

    fn announce(&mut self, from: jiff::Timestamp, slices: &[plan::Slice], already: u64) {
        let to = slices.last().map_or(from, |s| s.to);
        self.outcome.from = Some(from);
        self.outcome.to = Some(to);
        self.outcome.slices_total = already + slices.len() as u64;
        (self.on_event)(&Event::Planned {
            from,
            to,
            slices_total: self.outcome.slices_total,
        });
    }

    async fn walk_and_stamp(&mut self, from: jiff::Timestamp, snap: &Snapshot) -> Result<()> {
        let max_event = snap.max_event.expect("a walk is only decided on history");
        let all = plan::slices(from, max_event, snap.now);
        let resume = self.opts.resume.as_ref();
        let slices = plan::resume_slices(all, resume);
        let already = resume.map_or(0, |r| r.slices_processed);
        self.outcome.slices_processed = already;
        self.outcome.rows_touched = resume.map_or(0, |r| r.rows_touched);
        self.announce(from, &slices, already);
        self.outcome.cursor = slices.first().map(|s| s.from);
        for (i, slice) in slices.iter().enumerate() {
            if self.cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            if i > 0 && !self.opts.sleep_between_slices.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(self.opts.sleep_between_slices) => {}
                    _ = self.cancel.cancelled() => return Err(Error::Cancelled),
                }
            }
            (self.on_event)(&Event::SliceStarted { slice: *slice });
            let span = tracing::info_span!("slice", from = %slice.from, to = %slice.to);
            let started = Instant::now();
            let rows = self
                .session
                .rollup(slice, self.opts.slice_timeout, self.cancel)
                .instrument(span.clone())
                .await?;
            let elapsed = started.elapsed();
            tracing::debug!(parent: &span, rows, elapsed_ms = millis(elapsed), "slice done");
            self.outcome.slices_processed += 1;
            self.outcome.rows_touched += rows;
            self.outcome.cursor = Some(slice.to);
            (self.on_event)(&Event::SliceDone {
                slice: *slice,
                rows,
                elapsed_ms: millis(elapsed),
                slices_processed: self.outcome.slices_processed,
                slices_total: self.outcome.slices_total,
                rows_touched: self.outcome.rows_touched,
                cursor: slice.to,
            });
        }
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        self.stamp().await
    }

    async fn stamp(&mut self) -> Result<()> {
        let after = self.session.stamp().await?;
        self.outcome.watermark_stamped = after.is_some();
        self.outcome.watermark_after = after;
        if after.is_none() {
            self.outcome.warnings.push(
                "no rollup state row (id = 1) was updated: the watermark is not stamped".into(),
            );
        }
        (self.on_event)(&Event::Stamped { watermark: after });
        Ok(())
    }
}

/// Setting names are PostgreSQL identifiers, optionally dotted
/// (`enable_nestloop`, `work_mem`, `pg_hint_plan.enable_hint`).
fn validate_setting_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidSetting {
            name: name.chars().take(63).collect(),
            message: "not a PostgreSQL setting name".into(),
        })
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The controller spawns runs on a multi-threaded runtime: keep `run` Send.
#[allow(dead_code)]
fn assert_run_is_send(db: &Database, opts: &Options, cancel: &CancellationToken) {
    fn is_send<T: Send>(_: T) {}
    is_send(run(db, opts, cancel, &mut |_| {}));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_names() {
        for ok in ["enable_nestloop", "work_mem", "pg_hint_plan.enable_hint"] {
            assert!(validate_setting_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", "work mem", "x;drop", ".a", &"a".repeat(64)] {
            assert!(validate_setting_name(bad).is_err(), "{bad}");
        }
    }
}
