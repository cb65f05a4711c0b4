//! The run itself: the reference's hook and command flows over one
//! [`Session`], with the lock released on every path.

use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio_util::sync::CancellationToken;

use super::parallel::{SettingChoice, Walk};
use super::plan::{self, Decision, GUARD_TOLERANCE, Slice, Snapshot};
use super::session::Session;
use super::sizing::{self, Piece};
use super::tuning::{self, TuningReport};
use super::{
    Database, DatabaseIdentity, Error, Event, MAX_PARALLELISM, Mode, Options, Outcome, Performance,
    PlannedSlice, Result, Resume, SkipReason,
};

/// Runs one backfill attempt against `db`.
///
/// `on_event` sees progress as it happens (slice by slice). `cancel` stops
/// the run between slices, during a slice (the slice rolls back) and while
/// waiting for the lock; the lock is released before this returns, and
/// nothing is stamped. With `opts.resume`, slices before the cursor are not
/// walked again and counts continue from the resumed ones.
/// `opts.performance` changes how fast, never what is written.
pub async fn run(
    db: &Database,
    opts: &Options,
    cancel: &CancellationToken,
    on_event: &mut (dyn FnMut(&Event) + Send),
) -> Result<Outcome> {
    let perf = &opts.performance;
    let settings = opts.effective_settings();
    for (name, _) in &settings {
        validate_setting_name(name)?;
    }
    let started = Instant::now();
    // The pooling check's second connection opens alongside the session,
    // so that it adds no wait.
    let (session, other) = tokio::join!(Session::connect(db), Session::connect(db));
    let session = session?;
    // First, before any other statement: whether lock 4246 can work at all.
    let (pinned_pid, pin_warning) = session.check_pinned(other, db.connect_timeout()).await?;
    let database = session.identity().await?;
    on_event(&Event::Connected {
        server_version: session.server_version().await?,
        database,
    });
    session.apply_settings(&settings).await?;
    let mut run = Run {
        db,
        session: &session,
        opts,
        perf,
        settings: &settings,
        cancel,
        on_event,
        pinned_pid,
        database,
        outcome: Outcome {
            dry_run: opts.dry_run,
            settings: settings.clone(),
            warnings: pin_warning.into_iter().collect(),
            ..Outcome::default()
        },
    };
    run.execute().await?;
    let mut outcome = run.outcome;
    outcome.elapsed_ms = millis(started.elapsed());
    Ok(outcome)
}

struct Run<'a> {
    db: &'a Database,
    session: &'a Session,
    opts: &'a Options,
    perf: &'a Performance,
    /// Settings of every session of the run (tuning, then the user's).
    settings: &'a [(String, String)],
    cancel: &'a CancellationToken,
    on_event: &'a mut (dyn FnMut(&Event) + Send),
    /// Backend pid of the session, as checked by `check_pinned`.
    pinned_pid: i32,
    /// The database the session is on: a resume from elsewhere is not used.
    database: DatabaseIdentity,
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
        match plan::decide_if_lagging(&snap, threshold)? {
            // A skip that stamps rolls up up to its stamp first, under the
            // lock (below); one that does not stamp, or a dry run, is done.
            Decision::Skip { reason, stamp } if !stamp || self.opts.dry_run => {
                self.outcome.skipped = Some(reason);
                return Ok(());
            }
            Decision::Skip { .. } => self.require_window_function().await?,
            Decision::Walk { from } => {
                self.refuse_future_events(&snap, threshold).await?;
                self.require_window_function().await?;
                if self.opts.dry_run {
                    return self.dry_run(from, &snap).await;
                }
            }
        }
        self.require_privileges().await?;
        self.acquire().await?;
        let result = self.if_lagging_locked(threshold).await;
        self.session.unlock().await;
        result
    }

    async fn if_lagging_locked(&mut self, threshold: Duration) -> Result<()> {
        let snap = self.session.snapshot().await?;
        self.observe(&snap);
        match plan::decide_if_lagging(&snap, threshold)? {
            Decision::Skip { reason, stamp } => self.skip(reason, stamp, &snap).await,
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
        self.require_privileges().await?;
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
            Decision::Skip { reason, stamp } => self.skip(reason, stamp, &snap).await,
            Decision::Walk { from } => self.walk_and_stamp(from, &snap).await,
        }
    }

    /// Takes lock 4246, checks it went to the backend checked before, and
    /// arms the slice timeout. On success the caller holds the lock and
    /// must call `unlock` whatever happens next; on failure the lock is not
    /// held.
    async fn acquire(&mut self) -> Result<()> {
        let on_event = &mut *self.on_event;
        let waited = self
            .session
            .lock(self.opts.lock_timeout, self.cancel, |holder| {
                on_event(&Event::WaitingForLock { holder })
            })
            .await?;
        let taken_on = self.session.lock_pid();
        if taken_on != Some(self.pinned_pid) {
            self.session.unlock().await;
            return Err(Error::pooling_before_lock(format!(
                "advisory lock 4246 was taken on server backend pid {}, not on the backend the session was checked on (pid {})",
                taken_on.map_or_else(|| "?".to_string(), |p| p.to_string()),
                self.pinned_pid
            )));
        }
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

    /// A skip, under the lock. One that stamps first rolls up the window
    /// from the watermark to the stamp: the application's tick starts at
    /// the watermark, and inserts and updates are not queued, so a stamp
    /// passing an event not yet rolled up would lose that event for good
    /// (the reference's skip does). That window is one tick's work: the
    /// events in it are at most the lag, which is within the threshold (or
    /// none, on an empty history). It is the walk's last slice, alone, so
    /// it ends (and the stamp names) five minutes before the clock read
    /// just before it, as every walk does.
    async fn skip(&mut self, reason: SkipReason, stamp: bool, snap: &Snapshot) -> Result<()> {
        self.outcome.skipped = Some(reason);
        if !stamp || self.opts.dry_run {
            return Ok(());
        }
        // No state row (an empty history only; the stamp then updates
        // nothing): the window starts where the tick's would, at the epoch.
        let from = snap.watermark.unwrap_or(Timestamp::UNIX_EPOCH);
        let end = plan::walk_end(snap.now);
        if from >= end {
            // The watermark already stands at (or past) the instant a stamp
            // would name: nothing lies between, and a stamp would move it back.
            return Ok(());
        }
        let last = Piece {
            slice: Slice { from, to: end },
            events: 0,
        };
        self.walk_pieces(from, end, Vec::new(), Some(last), None)
            .await
    }

    async fn require_window_function(&mut self) -> Result<()> {
        match self.session.schema().await? {
            (_, true) => Ok(()),
            (_, false) => Err(Error::SchemaMissing {
                what: "function rollup_task_usage_hourly_window(timestamptz, timestamptz)".into(),
            }),
        }
    }

    async fn require_privileges(&mut self) -> Result<()> {
        let missing = self.session.missing_privileges().await?;
        if missing.is_empty() {
            return Ok(());
        }
        Err(Error::PermissionDenied {
            message: format!("the role lacks {}; nothing was written", missing.join(", ")),
        })
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

    /// The plan only: the slices the walk would start with (sized from the
    /// counts), each with its estimated events.
    async fn dry_run(&mut self, from: Timestamp, snap: &Snapshot) -> Result<()> {
        let max_event = snap.max_event.expect("a walk is only decided on history");
        let end = plan::walk_end(snap.now);
        let slices = plan::slices(from, max_event, end);
        let (historical, last) = self.size(&slices).await?;
        let pieces: Vec<Piece> = historical.into_iter().chain(last).collect();
        self.announce(from, end, pieces.len() as u64);
        for piece in pieces {
            let planned = PlannedSlice {
                slice: piece.slice,
                estimated_events: piece.events,
            };
            (self.on_event)(&Event::SlicePlanned(planned.clone()));
            self.outcome.planned.push(planned);
        }
        Ok(())
    }

    /// The slices before the last, sized ([`sizing::by_counts`]), and the
    /// last, each with its estimated events.
    async fn size(&mut self, slices: &[Slice]) -> Result<(Vec<Piece>, Option<Piece>)> {
        let Some(first) = slices.first() else {
            return Ok((Vec::new(), None));
        };
        // Sizing only saves time: without counts, the calendar months stay.
        let months = match self.session.month_counts(first.from).await {
            Ok(months) => Some(months),
            Err(e) => {
                tracing::warn!(error = %e, "cannot count events per month; walking calendar months");
                self.outcome.warnings.push(format!(
                    "slice sizing skipped: cannot count events per month ({e})"
                ));
                None
            }
        };
        let mut pieces = Vec::with_capacity(slices.len());
        for slice in slices {
            let whole_months = slice.from == plan::month_floor(slice.from)
                && (slice.to == plan::month_floor(slice.to) || slice == slices.last().unwrap());
            let events = match &months {
                None => 0,
                Some(months) if whole_months => sizing::events_from_months(slice, months),
                // A slice starting at a resume cursor: count it.
                Some(_) => self.session.estimate(slice).await?,
            };
            pieces.push(Piece {
                slice: *slice,
                events,
            });
        }
        let last = pieces.pop();
        let workers = self.perf.parallelism.clamp(1, MAX_PARALLELISM) as usize;
        let mut historical = match months {
            Some(_) => sizing::by_counts(
                pieces,
                workers,
                !matches!(self.perf.tuning, crate::tuning::Tuning::Off),
            ),
            None => pieces,
        };
        if self.perf.max_slice_duration.is_some() {
            historical = sizing::probe_first(historical);
        }
        Ok((historical, last))
    }

    fn announce(&mut self, from: Timestamp, to: Timestamp, total: u64) {
        self.outcome.from = Some(from);
        self.outcome.to = Some(to);
        self.outcome.slices_total = total;
        (self.on_event)(&Event::Planned {
            from,
            to,
            slices_total: self.outcome.slices_total,
        });
    }

    /// Walks up to the instant five minutes before the clock read under the
    /// lock, and stamps that same instant (the last-slice drain,
    /// [`plan::walk_end`]); the
    /// last slice reads the clock again before it runs and ends there, so a
    /// long walk stamps the present.
    async fn walk_and_stamp(&mut self, from: Timestamp, snap: &Snapshot) -> Result<()> {
        let max_event = snap.max_event.expect("a walk is only decided on history");
        let end = plan::walk_end(snap.now);
        let all = plan::slices(from, max_event, end);
        let resume = self.usable_resume(from);
        let slices = plan::resume_slices(all, resume.as_ref());
        let (historical, last) = self.size(&slices).await?;
        self.walk_pieces(from, end, historical, last, resume).await
    }

    /// Walks sized slices (the last alone, last; counts continue from
    /// `resume`) and stamps where the last one ended.
    async fn walk_pieces(
        &mut self,
        from: Timestamp,
        end: Timestamp,
        historical: Vec<Piece>,
        last: Option<Piece>,
        resume: Option<Resume>,
    ) -> Result<()> {
        self.outcome.walk_end = Some(end);
        let already = resume.map_or(0, |r| r.slices_processed);
        let already_rows = resume.map_or(0, |r| r.rows_touched);
        self.outcome.slices_processed = already;
        self.outcome.rows_touched = already_rows;
        let total = already + historical.len() as u64 + u64::from(last.is_some());
        self.announce(from, end, total);
        self.outcome.cursor = historical.first().or(last.as_ref()).map(|p| p.slice.from);

        let wanted = self.perf.parallelism.clamp(1, MAX_PARALLELISM) as usize;
        let extra = wanted.min(historical.len()).saturating_sub(1);
        let workers = self.connect_workers(extra).await?;
        let probe = self
            .perf
            .tuning
            .probes_plan_cache_mode(&self.opts.session_settings);
        self.outcome.sessions = 1 + workers.len() as u32;
        let walked = Walk {
            lock: self.session,
            workers: &workers,
            lock_pid: self.pinned_pid,
            historical,
            last,
            slice_timeout: self.opts.slice_timeout,
            sleep: self.opts.sleep_between_slices,
            cap: self.perf.max_slice_duration,
            measure_width: !matches!(self.perf.tuning, crate::tuning::Tuning::Off),
            probe,
            setting_probes: self.setting_choices(),
            already_processed: already,
            already_rows,
        }
        .run(self.cancel, &mut *self.on_event)
        .await;
        // Workers end with the walk, before the stamp: only the lock
        // session writes the watermark.
        drop(workers);
        let walked = walked?;
        let end = walked.end.unwrap_or(end);
        self.outcome.walk_end = Some(end);
        self.outcome.to = Some(end);
        self.outcome.slices_processed = walked.slices_processed;
        self.outcome.rows_touched = walked.rows_touched;
        self.outcome.slices_total = walked.slices_total;
        self.outcome.cursor = walked.cursor.or(self.outcome.cursor);
        self.outcome.slice_retries = walked.retries;
        self.outcome.slice_stats = sizing::stats(&walked.durations_ms);
        self.outcome.tuning = Some(TuningReport {
            preset: self.perf.tuning.name().to_string(),
            plan_cache_mode: walked.plan_cache_mode,
            probes: walked.probes,
            work_mem: walked.work_mem,
            enable_nestloop: walked.enable_nestloop,
            slice_width: walked.width,
        });
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        self.stamp(end).await
    }

    /// The settings the walk chooses by measurement, in the order they are
    /// probed: `work_mem` (the tuning's against [`tuning::WORK_MEM_PROBE`]),
    /// then `enable_nestloop` (the tuning's against
    /// [`tuning::NESTLOOP_PROBE`]). None that the user sets.
    fn setting_choices(&self) -> Vec<SettingChoice> {
        let tuning = &self.perf.tuning;
        let user = &self.opts.session_settings;
        let default = |name: &str| {
            tuning
                .settings()
                .into_iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        };
        let mut choices = Vec::new();
        if tuning.probes_work_mem(user)
            && let Some(value) = default(tuning::WORK_MEM)
        {
            choices.push(SettingChoice::work_mem(value));
        }
        if tuning.probes_nestloop(user)
            && let Some(value) = default(tuning::ENABLE_NESTLOOP)
        {
            choices.push(SettingChoice::nestloop(value));
        }
        choices
    }

    /// `opts.resume` when it belongs to this walk ([`plan::resume_mismatch`]);
    /// otherwise the walk starts over, which is always safe, and says why.
    fn usable_resume(&mut self, from: Timestamp) -> Option<Resume> {
        let resume = self.opts.resume?;
        let Some(why) = plan::resume_mismatch(&resume, from, &self.database) else {
            return Some(resume);
        };
        tracing::warn!(cursor = %resume.cursor, reason = %why, "the resume point is not used; walking from the start");
        self.outcome.warnings.push(format!(
            "the resume point {} was not used ({why}); walked from the start",
            resume.cursor
        ));
        None
    }

    /// Up to `n` more sessions with the run's settings. A worker that
    /// cannot connect (e.g. the server's connection limit) costs speed,
    /// not the run: it is left out, with a warning.
    async fn connect_workers(&mut self, n: usize) -> Result<Vec<Session>> {
        let attempts = futures::future::join_all((0..n).map(|_| async {
            let session = Session::connect(self.db).await?;
            session.apply_settings(self.settings).await?;
            if let Some(t) = self.opts.slice_timeout {
                session
                    .set("statement_timeout", &format!("{}ms", t.as_millis().max(1)))
                    .await?;
            }
            Ok::<_, Error>(session)
        }))
        .await;
        let mut workers = Vec::with_capacity(n);
        for attempt in attempts {
            match attempt {
                Ok(session) => workers.push(session),
                Err(e) => {
                    tracing::warn!(error = %e, "a worker session could not be opened; walking with fewer");
                    self.outcome.warnings.push(format!(
                        "a worker session could not be opened ({e}); walked with fewer"
                    ));
                }
            }
        }
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        Ok(workers)
    }

    /// Sets the watermark to `at` (an instant of the database clock).
    async fn stamp(&mut self, at: Timestamp) -> Result<()> {
        let after = self.session.stamp(at).await?;
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

fn validate_setting_name(name: &str) -> Result<()> {
    if usage_backfill_limits::is_setting_name(name) {
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
