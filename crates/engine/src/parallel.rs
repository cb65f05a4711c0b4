//! The walk over the planned slices: historical slices on up to
//! `parallelism` sessions at once, then the slice that reaches the present
//! (up to [`super::plan::walk_end`], five minutes before the clock, read
//! again just before it runs) alone, on the lock session, after every other
//! slice has committed.
//!
//! - The lock session (holding lock 4246 for the whole run) is worker 0;
//!   every window call runs inside a statement that first checks the lock:
//!   on the lock session, that its server backend is the one that took
//!   lock 4246 and still holds it; on the other workers, that they run on
//!   another backend while that one holds it. A watchdog stops the workers
//!   (cancelling their statements) as soon as the lock session's
//!   connection is gone. A failed check on the backend (a pooler moving or
//!   sharing sessions) is terminal and stops the walk like a lost lock.
//! - Slices are disjoint in `updated_at` but their keys can overlap (a row
//!   updated in a later month than created); every window call recomputes
//!   whole buckets from all raw rows, so any order gives the same table.
//!   Concurrent upserts of one key may deadlock: a deadlock or
//!   serialization failure runs the slice again, a bounded number of times.
//! - `SliceDone` events come in slice order: a slice that commits before an
//!   earlier one is reported once every earlier slice has committed, so the
//!   cursor (start of the earliest slice not yet committed) and the counts
//!   of every event form a valid [`super::Resume`].
//! - On a failure no further slice starts; slices under way finish (their
//!   work counts), then the earliest failure is returned. On cancellation
//!   every statement is cancelled.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::join_all;
use jiff::Timestamp;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::session::{Guard, Session, SliceError};
use super::sizing::{self, Model, Piece};
use super::tuning::{
    self, ENABLE_NESTLOOP, NESTLOOP_PROBE, NESTLOOP_PROBE_SHARE, PLAN_MODE_MARGIN,
    PROBE_MIN_EVENTS, PROBE_MODES, PlanProbe, SETTING_MARGIN, WORK_MEM, WORK_MEM_PROBE,
};
use super::width::{self, Claim, WidthReport, WidthSearch};
use super::{Error, Event, Result, Slice, plan};

/// Attempts of a slice that keeps hitting deadlocks or serialization
/// failures (each rolls back; the last error is returned).
pub(crate) const CONFLICT_ATTEMPTS: u32 = 5;
const CONFLICT_BACKOFF: Duration = Duration::from_millis(100);
/// How often the lock session's connection is looked at.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// What to walk, and how.
pub(crate) struct Walk<'a> {
    /// Holds lock 4246; runs slices too, and the last slice alone.
    pub lock: &'a Session,
    /// Further sessions with the same settings.
    pub workers: &'a [Session],
    /// Backend pid of the lock session, which took lock 4246 (every
    /// window call's guard).
    pub lock_pid: i32,
    /// Slices before the last, in order, contiguous.
    pub historical: Vec<Piece>,
    /// The slice reaching the present (drains the dirty queue).
    pub last: Option<Piece>,
    pub slice_timeout: Option<Duration>,
    /// Pause of a session between two of its slices.
    pub sleep: Duration,
    pub cap: Option<Duration>,
    /// Choose how many events a slice takes by measurement (`width`);
    /// without it the historical slices run as given.
    pub measure_width: bool,
    /// Choose plan_cache_mode by measurement on the two adjacent slices
    /// with the most events (the first two with a cap).
    pub probe: bool,
    /// Then, one after the other, each of these settings at its
    /// alternative against the sessions' own value on one slice, under the
    /// plan_cache_mode kept and the settings kept before it.
    pub setting_probes: Vec<SettingChoice>,
    /// Counts of the attempt resumed from.
    pub already_processed: u64,
    pub already_rows: i64,
}

/// What the walk did; counts include the resumed attempt's.
#[derive(Debug, Default)]
pub(crate) struct Walked {
    /// Where the last slice ended (its end read from the clock just
    /// before it ran); None without a last slice.
    pub end: Option<Timestamp>,
    pub slices_processed: u64,
    pub rows_touched: i64,
    pub slices_total: u64,
    pub cursor: Option<Timestamp>,
    pub durations_ms: Vec<u64>,
    pub retries: u64,
    /// The plan_cache_mode kept, when probed and conclusive.
    pub plan_cache_mode: Option<String>,
    pub probes: Vec<PlanProbe>,
    /// The work_mem kept, when probed.
    pub work_mem: Option<String>,
    /// The enable_nestloop kept, when probed.
    pub enable_nestloop: Option<String>,
    /// What the width search measured and kept.
    pub width: Option<WidthReport>,
}

enum Msg {
    Started(Slice),
    Done {
        piece: Piece,
        rows: i64,
        elapsed: Duration,
    },
    Failed {
        slice: Slice,
        error: Error,
    },
}

/// The plan_cache_mode a session should have for a slice: None leaves it
/// as it is, Some(None) resets it to the server's default.
type Want = Option<Option<String>>;

/// Shared by the workers: what is left to start, and what was measured.
struct Shared {
    pending: VecDeque<Piece>,
    started: u64,
    stop: bool,
    model: Model,
    cap: Option<Duration>,
    /// plan_cache_mode values not yet probed.
    untried: VecDeque<&'static str>,
    /// Where the next plan probe runs: next to the first.
    probe_partner: Option<Timestamp>,
    running_probes: Vec<RunningProbe>,
    probes: Vec<PlanProbe>,
    decided: Want,
    retries: u64,
    durations_ms: Vec<u64>,
    /// The width search, when measured; `pending` then holds units that
    /// each slice takes some of.
    width: Option<WidthSearch>,
    sessions: usize,
    /// The setting probes, in the order they run (one at a time); empty
    /// when plan_cache_mode is not probed.
    settings: Vec<SettingProbe>,
    /// Events of the historical slices, for the size of a probe's slice.
    total_events: i64,
    /// Probe tickets issued.
    tickets: u64,
    /// Later slices under a kept custom plan at the generic probe's width
    /// and the default work_mem, for [`Shared::plan_mode_review`].
    custom_pool: Pool,
    /// Slices cut at the generic probe's width for the review
    /// ([`Shared::review_width`]).
    review_holds: u32,
    /// The settings (by [`Shared::in_force_key`]) whose probe the width
    /// search has counted ([`Shared::count_probe`]).
    probes_counted: BTreeSet<String>,
}

/// Slices pooled: how many, their events and their time.
#[derive(Debug, Default)]
struct Pool {
    slices: u32,
    events: i64,
    ms: f64,
}

/// A session setting whose two values a walk chooses between by timing
/// one slice at the alternative.
#[derive(Debug, Clone)]
pub(crate) struct SettingChoice {
    pub name: &'static str,
    /// The sessions' own (the tuning's default).
    pub default: String,
    /// Tried on one slice.
    pub alternative: String,
    /// The probe's slice, cut from the largest pending unit: None, as
    /// many events as the entry it is compared with (per event, a wider
    /// slice is cheaper by its fixed part: a 4MB probe of 19k events won
    /// by 10 % against a plan probe of 15k and then ran slower than
    /// 64MB); Some(share), about this share of the walk's events.
    share: Option<f64>,
    /// The probe is given up once it has run this many times what the
    /// settings in force take for its events.
    give_up: f64,
}

impl SettingChoice {
    /// work_mem: the probe takes as many events as the entry it is
    /// compared with, and is given up only at [`PROBE_ABANDON`]: the two
    /// values were within ±15 % of each other on most histories measured,
    /// so a probe that loses by a little still does its slice's work.
    pub(crate) fn work_mem(default: String) -> Self {
        SettingChoice {
            name: WORK_MEM,
            default,
            alternative: WORK_MEM_PROBE.to_string(),
            share: None,
            give_up: PROBE_ABANDON,
        }
    }

    /// enable_nestloop: nested loops lost by 5-25x on every history
    /// measured, so the probe takes a small slice and is given up as soon
    /// as it can no longer win by [`SETTING_MARGIN`]: a losing probe costs
    /// about [`NESTLOOP_PROBE_SHARE`] of the walk.
    pub(crate) fn nestloop(default: String) -> Self {
        SettingChoice {
            name: ENABLE_NESTLOOP,
            default,
            alternative: NESTLOOP_PROBE.to_string(),
            share: Some(NESTLOOP_PROBE_SHARE),
            give_up: 1.0 / SETTING_MARGIN,
        }
    }
}

/// A setting probe's state in a walk.
struct SettingProbe {
    choice: SettingChoice,
    /// Started (at most once).
    started: bool,
    running: Option<RunningProbe>,
    /// What the alternative is compared with, from when it started: the
    /// entry that ran under the settings then in force (its events and
    /// time per event); the width search's slices of about the probe's
    /// size, when faster, count too ([`compared_rate`]). The guard of a
    /// kept alternative compares with this entry alone.
    baseline: Option<(i64, f64)>,
    /// The value every slice now gets.
    decided: Option<String>,
}

impl SettingProbe {
    fn new(choice: SettingChoice) -> Self {
        SettingProbe {
            choice,
            started: false,
            running: None,
            baseline: None,
            decided: None,
        }
    }

    /// What a slice that is not the probe runs with.
    fn want(&self) -> String {
        self.decided
            .clone()
            .unwrap_or_else(|| self.choice.default.clone())
    }

    /// The alternative, when kept.
    fn kept_alternative(&self) -> Option<&str> {
        let alternative = self.choice.alternative.as_str();
        (self.decided.as_deref() == Some(alternative)).then_some(alternative)
    }
}

struct RunningProbe {
    id: u64,
    mode: String,
    /// The probed settings' values it runs with.
    values: Vec<String>,
    events: i64,
    started: Instant,
    /// Cancelled when the probe can no longer win.
    abort: CancellationToken,
}

/// A probe slice under way: which one, and the token that aborts it.
#[derive(Clone)]
struct Ticket {
    id: u64,
    abort: CancellationToken,
}

/// A slice for a session, and how to run it.
struct Job {
    piece: Piece,
    /// The plan_cache_mode it wants.
    mode: Want,
    /// The value of each probed setting it wants.
    settings: Vec<String>,
    /// For a probe, the ticket that aborts it.
    ticket: Option<Ticket>,
    /// Its claim on a width level, when it measures one.
    claim: Option<Claim>,
    /// For a slice under a kept alternative, the deadline it is given up at.
    watch: Option<Watch>,
}

/// A slice under an alternative kept from one probe slice, given up once
/// it has run past what the alternative was kept against predicts for it
/// ([`Shared::watch`]).
struct Watch {
    /// Cancelled at the deadline.
    abort: CancellationToken,
    deadline: Duration,
    kept: Kept,
}

/// Which alternative a [`Watch`] sends back when it trips.
#[derive(Debug, Clone, Copy)]
enum Kept {
    /// The probed setting at this index.
    Setting(usize),
    /// The custom plan.
    Custom,
}

enum Next {
    Run(Job),
    Done,
}

/// A slice under a kept setting or plan is compared with its probe at
/// this many times the probe's time per event: well beyond the noise
/// between two runs of one plan, well below the 3-5x a wrong plan costs
/// where it matters.
const PROBE_MARGIN: f64 = 1.5;

/// A slice at a kept alternative is given up at this many times what its
/// probe predicts ([`Shared::watch`]). Given up, all its time is lost;
/// committed, only what it took beyond the default's time, and the guard
/// after the commit ([`PROBE_MARGIN`]) sends the setting back all the
/// same. So a slice slower than its probe by less than 2.5x loses less by
/// completing; what the watch is for, a plan that grows to 5-30x, is
/// still cut early. At [`PROBE_MARGIN`] it cut slices that were slow at
/// any setting: on one-workspace 200k with a full hourly table (real
/// migrations) 4MB won its probe at 57 ms per 1000 events, two slices at
/// 4MB were given up at 1.4 s and 2.1 s, and the default then ran the
/// same months at 1.2-1.7x the generic probe's rate: 3.5 s of the walk's
/// 18 s of calls thrown away.
const WATCH_MARGIN: f64 = 2.5;

/// A probe that can no longer win still does its slice's work if it
/// completes, so it is abandoned (and its slice runs again under the
/// winner) only once it has run this many times what the winner's time
/// per event predicts for it. A loser that completes costs its own ratio
/// to the winner; one abandoned at this point costs this ratio plus the
/// slice again. Losers are of two kinds: near ties within ±10 % (custom
/// 63 / generic 63, 4MB 44 / 64MB 44 ms per 1000 events in the 200k
/// matrix), which complete here at about 1x, and plans that lose by 2x or
/// more (a custom probe on realistic 200k still running at 2x when given
/// up; 4MB at 3.6x), which cost 2.25x here against the 2.5x of giving up
/// at [`PROBE_MARGIN`] and the 3x of giving up at 2x (tried: realistic
/// 200k walked slower).
const PROBE_ABANDON: f64 = 1.25;

/// A slice's time per event when it ran longer than [`PROBE_MARGIN`] times
/// what `baseline` (a probe's events and ms per event) predicts for it, and
/// by at least [`GUARD_FLOOR`]. A slice under [`PROBE_MIN_EVENTS`], or
/// under half the probe's events, is not compared: its fixed part alone
/// makes it slower per event.
fn slower_than(baseline: (i64, f64), events: i64, elapsed: Duration) -> Option<f64> {
    let (probe_events, probe_rate) = baseline;
    if events < PROBE_MIN_EVENTS.max(probe_events / 2) {
        return None;
    }
    let predicted = PROBE_MARGIN * probe_rate * events as f64;
    let ms = elapsed.as_secs_f64() * 1000.0;
    (ms > predicted + GUARD_FLOOR.as_secs_f64() * 1000.0).then_some(ms / events as f64)
}

/// A setting kept from a probe is given up only for a slice that ran this
/// much longer than [`PROBE_MARGIN`] times the probe predicts: what it
/// guards against grows to seconds per call (a delete of 7.8 s in a 9.2 s
/// call at 200k, 15.5 s of 40 s at 1M), while calls of a tenth of a second
/// vary by half their time on a loaded machine.
const GUARD_FLOOR: Duration = Duration::from_millis(500);

/// How many later slices under a kept custom plan, of about the generic
/// probe's width, [`Shared::plan_mode_review`] waits for before it compares:
/// one slice varies with its month's content; three is a quarter of a
/// short walk at most.
const REVIEW_SLICES: u32 = 3;

/// Where the plan probes run: two adjacent pending pieces with the most
/// events together (the earliest of equals), the larger first; a single
/// piece when none are adjacent. Adjacent, so that the rest of the walk
/// stays in at most two runs of units that the width search can join.
fn probe_pair(pending: &VecDeque<Piece>) -> (usize, Option<usize>) {
    let mut best: Option<(usize, i64)> = None;
    for i in 1..pending.len() {
        let (a, b) = (&pending[i - 1], &pending[i]);
        if a.slice.to == b.slice.from && best.is_none_or(|(_, e)| a.events + b.events > e) {
            best = Some((i - 1, a.events + b.events));
        }
    }
    match best {
        Some((i, _)) if pending[i + 1].events > pending[i].events => (i + 1, Some(i)),
        Some((i, _)) => (i, Some(i + 1)),
        None => {
            let mut largest = 0;
            for (i, p) in pending.iter().enumerate() {
                if p.events > pending[largest].events {
                    largest = i;
                }
            }
            (largest, None)
        }
    }
}

impl Shared {
    fn next(&mut self, stop_all: &CancellationToken) -> Next {
        if self.stop || self.pending.is_empty() {
            return Next::Done;
        }
        if let Some(mode) = self.untried.pop_front() {
            // The probes run on the largest slices: where the time goes, and
            // where the plans differ most (on a growing history the first
            // months are thin, and a thin slice favours the custom plan that
            // loses on the rest). With a cap the first slice stays first, so
            // the first measurement comes before a long transaction.
            let partner = self
                .probe_partner
                .take()
                .and_then(|from| self.pending.iter().position(|p| p.slice.from == from));
            let i = if self.cap.is_some() {
                0
            } else if let Some(i) = partner {
                i
            } else {
                let (first, second) = probe_pair(&self.pending);
                self.probe_partner = second.map(|j| self.pending[j].slice.from);
                first
            };
            let piece = self.pending.remove(i).expect("checked above");
            let ticket = Ticket {
                id: self.new_ticket_id(),
                abort: stop_all.child_token(),
            };
            self.running_probes.push(RunningProbe {
                id: ticket.id,
                mode: mode.to_string(),
                values: self.values(),
                events: piece.events,
                started: Instant::now(),
                abort: ticket.abort.clone(),
            });
            self.started += 1;
            return Next::Run(Job {
                piece,
                mode: Some(Some(mode.to_string())),
                settings: self.values(),
                ticket: Some(ticket),
                claim: None,
                watch: None,
            });
        }
        self.early_verdict();
        if let Some(job) = self.setting_probe(stop_all) {
            return Next::Run(job);
        }
        let want = match &self.decided {
            Some(decided) => Some(decided.clone()),
            // Probes under way: nobody waits for them; the best mode known
            // so far (the first probed before any finished) is used.
            None if self.probing() => Some(Some(self.provisional())),
            None => None,
        };
        let settled = self.decided.is_some() || !self.probing();
        let (piece, claim) = self.take(settled);
        self.started += 1;
        let watch = self.watch(piece.events, stop_all);
        Next::Run(Job {
            piece,
            mode: want,
            settings: self.values(),
            ticket: None,
            claim,
            watch,
        })
    }

    /// The watch of a slice that runs under the settings in force, when
    /// they hold an alternative kept from one probe slice: the settings'
    /// plans are made once per session, and the table statistics they are
    /// made from change during the walk (autovacuum analyzes the hourly
    /// table once a tenth of it is rewritten). On one-workspace 200k with
    /// a full hourly table, `work_mem` 4MB won its probe at 50 ms per 1000
    /// events against 55; two slices later the hourly table had been
    /// analyzed, the empty-bucket delete had become a merge join on
    /// (workspace, agent) that compared 362 million row pairs, and one
    /// slice took 44 s (the guard after the commit then sent `work_mem`
    /// back, too late: a 50 s walk, 27x the bound). A slice is given up
    /// at [`WATCH_MARGIN`] times what the entry the alternative was kept
    /// against predicts for it, plus [`GUARD_FLOOR`]; a slice narrower
    /// than that entry is allowed the entry's whole time (its fixed part
    /// alone makes it slower per event). The alternative kept last is
    /// watched first; the custom plan only at every setting's default, as
    /// [`Shared::plan_mode_recheck`] does.
    fn watch(&self, events: i64, stop_all: &CancellationToken) -> Option<Watch> {
        let setting = (0..self.settings.len()).rev().find_map(|i| {
            let probe = &self.settings[i];
            probe.kept_alternative()?;
            Some((Kept::Setting(i), probe.baseline?))
        });
        let (kept, (base_events, rate)) = match setting {
            Some(watched) => watched,
            // No setting's alternative kept: every setting at its default.
            None if self.custom_kept() => (Kept::Custom, self.baseline()?),
            None => return None,
        };
        let ms = WATCH_MARGIN * rate * events.max(base_events) as f64;
        Some(Watch {
            abort: stop_all.child_token(),
            deadline: Duration::from_secs_f64(ms / 1000.0) + GUARD_FLOOR,
            kept,
        })
    }

    /// A watched slice ran past its deadline and was given up
    /// ([`Shared::watch`]): the alternative it ran under goes back to the
    /// default for every session (unless another slice sent it back
    /// first), the slice is listed with the probes as given up, and it
    /// goes back among the pending ones to run again.
    fn watch_tripped(
        &mut self,
        piece: Piece,
        claim: Option<Claim>,
        kept: Kept,
        (ran_mode, ran_values): (Option<&str>, &[String]),
        elapsed: Duration,
    ) {
        if let (Some(search), Some(claim)) = (self.width.as_mut(), claim) {
            search.release(claim);
        }
        self.started -= 1;
        let lost = self.entry(
            ran_mode.unwrap_or_default().to_string(),
            ran_values,
            piece.events,
            millis(elapsed),
            false,
        );
        match kept {
            Kept::Setting(i) if self.settings[i].kept_alternative().is_some() => {
                let probe = &self.settings[i];
                tracing::info!(setting = probe.choice.name, value = %probe.choice.default,
                    ms = millis(elapsed), events = piece.events,
                    "a slice at the alternative kept ran past its deadline; back to the default, and the slice runs again");
                self.back_to_default(i, lost);
            }
            Kept::Custom if self.custom_kept() => {
                tracing::info!(
                    ms = millis(elapsed),
                    events = piece.events,
                    "plan_cache_mode: a slice under the custom plan kept ran past its deadline; generic from now on, and the slice runs again"
                );
                self.back_to_generic(lost);
            }
            _ => {
                tracing::info!(
                    ms = millis(elapsed),
                    events = piece.events,
                    "a slice at an alternative ran past its deadline, already sent back; the slice runs again"
                );
                self.probes.push(lost);
            }
        }
        put_back(&mut self.pending, piece);
    }

    /// The value kept of a probed setting, once decided.
    fn kept(&self, name: &str) -> Option<String> {
        self.settings
            .iter()
            .find(|p| p.choice.name == name)?
            .decided
            .clone()
    }

    /// The value of each probed setting that a slice other than a probe
    /// runs with.
    fn values(&self) -> Vec<String> {
        self.settings.iter().map(SettingProbe::want).collect()
    }

    /// An entry for the probes' list: a slice under `mode` at `values`
    /// (each probed setting's, in order).
    fn entry(
        &self,
        mode: String,
        values: &[String],
        events: i64,
        elapsed_ms: u64,
        completed: bool,
    ) -> PlanProbe {
        let tried = |name: &str| {
            self.settings
                .iter()
                .zip(values)
                .find(|(s, _)| s.choice.name == name)
                .filter(|(s, v)| **v != s.choice.default)
                .map(|(_, v)| v.clone())
        };
        PlanProbe {
            plan_cache_mode: mode,
            work_mem: tried(WORK_MEM),
            enable_nestloop: tried(ENABLE_NESTLOOP),
            events,
            elapsed_ms,
            completed,
        }
    }

    /// Once plan_cache_mode is kept, each setting probe in turn runs one
    /// slice at its alternative under the mode kept and the values kept
    /// before it, compared per event with the entry that ran under the
    /// settings then in force ([`Shared::in_force`]) and the slices of its
    /// size measured under them since ([`compared_rate`]). One probe at a time;
    /// without a mode kept or an entry to compare with (inconclusive plan
    /// probes), the default stays.
    fn setting_probe(&mut self, stop_all: &CancellationToken) -> Option<Job> {
        let mode = self.decided.clone()?;
        loop {
            let i = self.settings.iter().position(|p| p.decided.is_none())?;
            if self.settings[i].started {
                return None;
            }
            let baseline = self.in_force();
            if mode.is_none() || baseline.is_none() {
                let probe = &mut self.settings[i];
                probe.decided = Some(probe.choice.default.clone());
                continue;
            }
            let piece = self.probe_piece(self.settings[i].choice.share, baseline)?;
            let ticket = Ticket {
                id: self.new_ticket_id(),
                abort: stop_all.child_token(),
            };
            let mut values = self.values();
            let probe = &mut self.settings[i];
            values[i] = probe.choice.alternative.clone();
            probe.started = true;
            probe.baseline = baseline;
            probe.running = Some(RunningProbe {
                id: ticket.id,
                mode: mode.clone().unwrap_or_default(),
                values: values.clone(),
                events: piece.events,
                started: Instant::now(),
                abort: ticket.abort.clone(),
            });
            self.started += 1;
            return Some(Job {
                piece,
                mode: Some(mode),
                settings: values,
                ticket: Some(ticket),
                claim: None,
                watch: None,
            });
        }
    }

    /// A setting probe's slice ([`probe_piece`]): with a `share`, about
    /// that share of the walk's events; without, the events of the entry
    /// it is compared with.
    fn probe_piece(&mut self, share: Option<f64>, baseline: Option<(i64, f64)>) -> Option<Piece> {
        let events = match share {
            Some(share) => (share * self.total_events as f64).max(PROBE_MIN_EVENTS as f64) as i64,
            None => baseline?.0,
        };
        probe_piece(&mut self.pending, events)
    }

    /// A probe's slice starts now: its session may have been busy until
    /// now (a statement given up just before keeps its backend until the
    /// cancel takes effect), so its time counts from here, not from when
    /// it was handed out.
    fn probe_started(&mut self, id: u64) {
        let now = Instant::now();
        for r in self.running_probes.iter_mut().filter(|r| r.id == id) {
            r.started = now;
        }
        for r in self
            .settings
            .iter_mut()
            .filter_map(|p| p.running.as_mut())
            .filter(|r| r.id == id)
        {
            r.started = now;
        }
    }

    /// A probe's ticket id, never reused (`started` is not: a slice given
    /// up is started again).
    fn new_ticket_id(&mut self) -> u64 {
        self.tickets += 1;
        self.tickets
    }

    /// The plan probe that won, at every probed setting's default: its
    /// events and its time per event.
    fn baseline(&self) -> Option<(i64, f64)> {
        self.plan_probe(&self.decided.clone()??)
    }

    /// The completed probe of `mode` at every probed setting's default (the
    /// first such entry: slices listed after it by a guard come later):
    /// its events and its time per event.
    fn plan_probe(&self, mode: &str) -> Option<(i64, f64)> {
        rate_of(
            self.probes
                .iter()
                .find(|p| p.completed && p.at_defaults() && p.plan_cache_mode == mode),
        )
    }

    /// The first completed entry under the settings in force: the mode
    /// kept, each alternative kept, every other setting at its default.
    /// Its events and its time per event.
    fn in_force(&self) -> Option<(i64, f64)> {
        let mode = self.decided.clone()??;
        rate_of(self.probes.iter().find(|p| {
            p.completed
                && p.plan_cache_mode == mode
                && self
                    .settings
                    .iter()
                    .all(|s| p.tried(s.choice.name) == s.kept_alternative())
        }))
    }

    /// Gives the setting probe under way up once it has run longer than
    /// its `give_up` share of what the settings in force take for its
    /// events ([`compared_rate`]; its slice runs again under them).
    fn setting_verdict(&mut self) {
        let width = self.width.as_ref();
        for probe in self.settings.iter_mut().filter(|p| p.decided.is_none()) {
            let Some(r) = &probe.running else {
                continue;
            };
            let Some(rate) = compared_rate(probe.baseline, width, r.events) else {
                continue;
            };
            if r.started.elapsed().as_secs_f64() * 1000.0
                > probe.choice.give_up * rate * r.events as f64 + 1.0
            {
                tracing::info!(setting = probe.choice.name, value = %probe.choice.default,
                    "setting chosen by measurement (the alternative is already slower)");
                r.abort.cancel();
                probe.decided = Some(probe.choice.default.clone());
            }
        }
    }

    /// The next slice from the front of `pending`, and its claim on the
    /// width level it measures: slices that run under a plan_cache_mode
    /// not yet decided measure nothing (the modes differ far more than
    /// widths), nor do the last ones, cut down so that every session gets
    /// a share. Widths are measured under the settings in force; when they
    /// change, the search files its levels under the old ones
    /// ([`Shared::settings_changed`]).
    fn take(&mut self, settled: bool) -> (Piece, Option<Claim>) {
        if settled {
            self.count_probe();
        }
        let review = self.review_width();
        let Some(search) = self.width.as_mut() else {
            let piece = self.pending.pop_front().expect("checked by next");
            return (piece, None);
        };
        // Near the end a wide slice would leave the other sessions idle:
        // no slice takes more than the sessions' share of what is left,
        // down to the ladder's base (below it, splitting only adds calls).
        let remaining: i64 = self.pending.iter().map(|p| p.events).sum();
        let share = (remaining as f64 / self.sessions as f64).max(search.target(0));
        let (target, claim) = if settled {
            let claim = match review {
                Some(events) => {
                    self.review_holds += 1;
                    search.claim_near(events)
                }
                None => search.claim(),
            };
            let target = search.target(claim.level);
            if target > share {
                search.release(claim);
                (share, None)
            } else {
                (target, Some(claim))
            }
        } else {
            (search.current_target().min(share), None)
        };
        let piece = width::take(&mut self.pending, target).expect("checked by next");
        (piece, claim)
    }

    /// While the custom plan kept awaits its review
    /// ([`Shared::plan_mode_review`]), slices are cut at the generic
    /// probe's width (these events) and the width search tries no other:
    /// the review pools only slices of that width, and a custom plan's time
    /// per event can grow with the slice, so a wider trial under it
    /// measures a plan that may be sent back, and its loss is charged to
    /// the trial budget the generic plan's widths then lack. Measured on
    /// the real migrations at 200k with the custom plan kept from every
    /// probe (a diagnostic build): one-workspace with an empty hourly
    /// table spent 797 ms, over its whole budget, on a two- and a
    /// half-month trial under it, and after the review sent every session
    /// to the generic plan walked 13 more slices of one month (27 in all,
    /// 3.3x the set-based bound); over the 24 cells, twice each, holding
    /// the width made walks x0.89 the bound's ratio. At most twice
    /// [`REVIEW_SLICES`] slices, in case slices of that width fall outside
    /// the review's window. None when no review is pending: the custom
    /// plan not kept, a setting's alternative kept (the review pools
    /// slices at every setting's default only), or no generic probe rate.
    fn review_width(&self) -> Option<i64> {
        let pending = self.custom_kept()
            && self.custom_pool.slices < REVIEW_SLICES
            && self.review_holds < 2 * REVIEW_SLICES
            && self.settings.iter().all(|p| p.kept_alternative().is_none());
        pending
            .then(|| self.plan_probe(PROBE_MODES[0]))
            .flatten()
            .map(|(events, _)| events)
    }

    /// The probe the settings in force were chosen by ([`Shared::in_force`]:
    /// the plan probe that won, or the alternative kept) measured a width
    /// like any slice; the width search counts it once per settings. So
    /// the walk starts from the probes' width and tries wider at once.
    /// Not counted, every walk began with slices of level 0 and 1 that the
    /// probes had measured already: on realistic 200k with a full hourly
    /// table, where a call's fixed part is about 350 ms, each month so cut
    /// cost about 250 ms more than at the width kept.
    fn count_probe(&mut self) {
        let key = self.in_force_key();
        if self.probes_counted.contains(&key) {
            return;
        }
        let (Some((events, rate)), Some(search)) = (self.in_force(), self.width.as_mut()) else {
            return;
        };
        search.record(
            events,
            Duration::from_secs_f64(rate * events as f64 / 1000.0),
        );
        self.probes_counted.insert(key);
    }

    /// Slices still to start at the width now chosen.
    fn pending_slices(&self) -> u64 {
        match &self.width {
            Some(search) => width::count(&self.pending, search.current_target()) as u64,
            None => self.pending.len() as u64,
        }
    }

    fn probing(&self) -> bool {
        !self.running_probes.is_empty() || !self.probes.is_empty()
    }

    /// The completed probe with the lowest time per event, if any.
    fn best_probe(&self) -> Option<&PlanProbe> {
        self.probes
            .iter()
            .filter(|p| p.completed && p.events > 0)
            .min_by(|a, b| {
                let ra = a.elapsed_ms as f64 / a.events as f64;
                let rb = b.elapsed_ms as f64 / b.events as f64;
                ra.total_cmp(&rb)
            })
    }

    fn provisional(&self) -> String {
        self.best_probe()
            .map_or(PROBE_MODES[0], |p| p.plan_cache_mode.as_str())
            .to_string()
    }

    /// Decides before every probe has finished once the running ones can no
    /// longer win against a finished one (a custom probe once it has run
    /// 1/[`PLAN_MODE_MARGIN`] of the generic probe's time per event, a
    /// generic one at [`PLAN_MODE_MARGIN`] of the custom probe's): every
    /// later slice runs under the winner. A loser runs on, its slice's work
    /// is not lost, until it has run [`PROBE_ABANDON`] times what the
    /// winner predicts for it; then it is cancelled and its slice runs
    /// again under the winner.
    fn early_verdict(&mut self) {
        if self.running_probes.is_empty() {
            return;
        }
        let Some(best) = self.best_probe().cloned() else {
            return;
        };
        let rate = best.elapsed_ms as f64 / best.events as f64;
        // How many times what the finished probe predicts it has run.
        let ran = |r: &RunningProbe| {
            r.started.elapsed().as_secs_f64() * 1000.0 / (rate * r.events as f64 + 1.0)
        };
        if self.decided.is_none() {
            let needs = if best.plan_cache_mode == PROBE_MODES[0] {
                1.0 / PLAN_MODE_MARGIN
            } else {
                PLAN_MODE_MARGIN
            };
            if self.running_probes.iter().all(|r| ran(r) > needs) {
                tracing::info!(plan_cache_mode = %best.plan_cache_mode,
                    "plan_cache_mode chosen by measurement (the other probe can no longer win)");
                self.decided = Some(Some(best.plan_cache_mode));
            }
        }
        if self.decided.is_some() {
            for r in self
                .running_probes
                .iter()
                .filter(|r| ran(r) > PROBE_ABANDON)
            {
                r.abort.cancel();
            }
        }
    }

    /// A probe given up ([`Shared::early_verdict`],
    /// [`Shared::setting_verdict`]): its slice goes back in its place among
    /// the pending ones, where the width search joins it to its neighbours
    /// again (the nested-loop probe's slice is a part of a unit: run alone
    /// it would be a slice far narrower than the walk's, measured as a
    /// width trial).
    fn aborted(&mut self, piece: Piece, ticket: &Ticket, elapsed: Duration) {
        let r = match self.running_probes.iter().position(|r| r.id == ticket.id) {
            Some(i) => Some(self.running_probes.remove(i)),
            None => self.take_setting_probe(ticket).map(|(_, r)| r),
        };
        if let Some(r) = r {
            let entry = self.entry(r.mode, &r.values, r.events, millis(elapsed), false);
            self.probes.push(entry);
        }
        self.started -= 1;
        put_back(&mut self.pending, piece);
    }

    fn finished(
        &mut self,
        piece: &Piece,
        probe: Option<&Ticket>,
        claim: Option<Claim>,
        (ran_mode, ran_values): (Option<&str>, &[String]),
        elapsed: Option<Duration>,
    ) {
        let running = probe.and_then(|ticket| {
            let i = self.running_probes.iter().position(|r| r.id == ticket.id)?;
            Some(self.running_probes.remove(i))
        });
        let setting_probe = probe.and_then(|ticket| self.take_setting_probe(ticket));
        if let (Some(search), Some(claim)) = (self.width.as_mut(), claim) {
            match elapsed {
                Some(elapsed) => search.observe(claim, piece.events, elapsed),
                None => search.release(claim),
            }
        }
        let Some(elapsed) = elapsed else {
            self.stop = true;
            return;
        };
        self.durations_ms.push(millis(elapsed));
        self.model.observe(piece.events, elapsed);
        if let Some((i, r)) = setting_probe {
            self.setting_finished(i, r, piece.events, elapsed);
        } else if probe.is_none() {
            self.setting_recheck(ran_mode, ran_values, piece.events, elapsed);
            if self.under_kept_custom(ran_mode, ran_values)
                && !self.plan_mode_recheck(piece.events, elapsed)
            {
                self.plan_mode_review(piece.events, elapsed);
            }
        }
        if let Some(r) = running {
            let entry = self.entry(r.mode, &r.values, piece.events, millis(elapsed), true);
            self.probes.push(entry);
            if self.decided.is_none() {
                if self.untried.is_empty() && self.running_probes.is_empty() {
                    let chosen = tuning::choose_plan_mode(&self.probes);
                    tracing::info!(
                        plan_cache_mode = chosen.as_deref().unwrap_or("server default"),
                        probes = ?self.probes,
                        "plan_cache_mode chosen by measurement"
                    );
                    self.decided = Some(chosen);
                } else {
                    self.early_verdict();
                }
            }
        }
        if let Some(cap) = self.cap {
            let pending: Vec<Piece> = self.pending.drain(..).collect();
            self.pending = sizing::fit_cap(pending, &self.model, cap).into();
        }
    }

    /// The setting probe whose running probe holds `ticket`, taken out:
    /// its index and the probe.
    fn take_setting_probe(&mut self, ticket: &Ticket) -> Option<(usize, RunningProbe)> {
        self.settings
            .iter_mut()
            .enumerate()
            .find_map(|(i, p)| Some((i, p.running.take_if(|r| r.id == ticket.id)?)))
    }

    /// An alternative was kept from one slice early in the walk, but a
    /// part of the plan can grow with the hourly table (at 4MB the
    /// empty-bucket delete becomes a merge join that meets every hourly
    /// row of a key's agent) or with an agent's history (a nested loop):
    /// a later slice at the alternative that is slower per event than
    /// [`PROBE_MARGIN`] times the entry the alternative was compared with
    /// ([`slower_than`]) sends every session back to the default, and the
    /// width search takes up again the levels it measured under it. The
    /// slice is listed with the probes. The
    /// alternative kept last is looked at first; one goes back per slice.
    fn setting_recheck(
        &mut self,
        ran_mode: Option<&str>,
        ran_values: &[String],
        events: i64,
        elapsed: Duration,
    ) {
        let mode = self.decided.clone().flatten().unwrap_or_default();
        if ran_mode != Some(mode.as_str()) {
            return;
        }
        for i in (0..self.settings.len()).rev() {
            let probe = &self.settings[i];
            let (Some(alternative), Some(baseline)) = (probe.kept_alternative(), probe.baseline)
            else {
                continue;
            };
            if ran_values.get(i).map(String::as_str) != Some(alternative) {
                continue;
            }
            let Some(rate) = slower_than(baseline, events, elapsed) else {
                continue;
            };
            tracing::info!(setting = probe.choice.name, value = %probe.choice.default,
                ms_per_event = rate, baseline_ms_per_event = baseline.1,
                "the alternative got slower as the walk went on; back to the default");
            let lost = self.entry(mode, ran_values, events, millis(elapsed), true);
            self.back_to_default(i, lost);
            return;
        }
    }

    /// The custom plan was kept from the probes, made early on a small
    /// hourly table, and a part of it can grow as the table fills (its
    /// empty-bucket delete can become a merge join on (workspace, agent)
    /// that meets every hourly row of a key's agent): a later slice under
    /// it, at the default work_mem, slower per event than [`PROBE_MARGIN`]
    /// times its probe ([`slower_than`]) sends every session to the
    /// generic plan, whose delete hashes, and the width search starts over.
    /// Once: the generic plan is kept from then on. The slice is listed
    /// with the probes. For a slice [`Shared::under_kept_custom`]; true when
    /// it sent the sessions to the generic plan.
    fn plan_mode_recheck(&mut self, events: i64, elapsed: Duration) -> bool {
        let Some(baseline) = self.baseline() else {
            return false;
        };
        let Some(rate) = slower_than(baseline, events, elapsed) else {
            return false;
        };
        tracing::info!(
            ms_per_event = rate,
            baseline_ms_per_event = baseline.1,
            "plan_cache_mode: the custom plan got slower as the walk went on; generic from now on"
        );
        self.back_to_generic(custom_at_defaults(events, millis(elapsed)));
        true
    }

    /// Whether a slice ran under the custom plan kept, at every probed
    /// setting's default: what [`Shared::plan_mode_recheck`] and
    /// [`Shared::plan_mode_review`] watch.
    fn under_kept_custom(&self, ran_mode: Option<&str>, ran_values: &[String]) -> bool {
        self.custom_kept()
            && ran_mode == Some(PROBE_MODES[1])
            && self
                .settings
                .iter()
                .zip(ran_values)
                .all(|(p, v)| *v == p.choice.default)
    }

    /// Whether the custom plan is the mode kept.
    fn custom_kept(&self) -> bool {
        self.decided.clone().flatten().as_deref() == Some(PROBE_MODES[1])
    }

    /// Every session goes over to the generic plan for the rest of the
    /// walk, and the width search starts over; what lost under the custom
    /// plan is listed with the probes.
    fn back_to_generic(&mut self, lost: PlanProbe) {
        let from = self.in_force_key();
        self.decided = Some(Some(PROBE_MODES[0].to_string()));
        self.probes.push(lost);
        self.settings_changed(from);
    }

    /// Every session goes back to the default of the probed setting `i`,
    /// and the width search takes up what it measured under it; what lost
    /// at the alternative is listed with the probes.
    fn back_to_default(&mut self, i: usize, lost: PlanProbe) {
        self.probes.push(lost);
        let from = self.in_force_key();
        let probe = &mut self.settings[i];
        probe.decided = Some(probe.choice.default.clone());
        self.settings_changed(from);
    }

    /// The custom plan was kept on one probe slice against one slice of
    /// the generic plan, both about a unit wide; the walk then widens its
    /// slices, and a custom plan's time per event can grow with the slice
    /// where the generic plan's falls (on `wide` at 200k the custom plan
    /// won its probe, lost every wider trial, and walked 1.4x slower than
    /// the generic plan had on the same history). So later slices under
    /// it, at the default work_mem and at the generic probe's level of the
    /// width ladder (within a factor of √2 of its events), are pooled; once
    /// [`REVIEW_SLICES`] of them are together no faster per event than the
    /// generic probe was, the verdict is reversed: every session goes over
    /// to the generic plan, and the width search starts over. Once, like
    /// [`Shared::plan_mode_recheck`]; the pool is listed with the probes.
    /// Not when the generic probe was given up: it lost by [`PROBE_ABANDON`]
    /// and its time per event is not known. For a slice
    /// [`Shared::under_kept_custom`] that the guard let pass.
    fn plan_mode_review(&mut self, events: i64, elapsed: Duration) {
        let Some((probe_events, probe_rate)) = self.plan_probe(PROBE_MODES[0]) else {
            return;
        };
        let ratio = events as f64 / probe_events as f64;
        if !(std::f64::consts::FRAC_1_SQRT_2..=std::f64::consts::SQRT_2).contains(&ratio) {
            return;
        }
        let pool = &mut self.custom_pool;
        pool.slices += 1;
        pool.events += events;
        pool.ms += elapsed.as_secs_f64() * 1000.0;
        let rate = pool.ms / pool.events as f64;
        if pool.slices < REVIEW_SLICES || rate < probe_rate {
            return;
        }
        tracing::info!(
            ms_per_event = rate,
            generic_ms_per_event = probe_rate,
            slices = pool.slices,
            "plan_cache_mode: the custom plan's later slices were no faster than the generic probe; generic from now on"
        );
        let lost = custom_at_defaults(pool.events, pool.ms.round() as u64);
        self.back_to_generic(lost);
    }

    /// A setting probe committed: the alternative is kept when it was
    /// faster per event than what it is compared with ([`compared_rate`])
    /// by [`SETTING_MARGIN`], and the width search starts over. A probe
    /// made under a mode no longer kept
    /// compares with nothing: the default stays.
    fn setting_finished(&mut self, i: usize, r: RunningProbe, events: i64, elapsed: Duration) {
        let mode_kept = self.decided.clone().flatten().as_deref() == Some(r.mode.as_str());
        let entry = self.entry(r.mode, &r.values, events, millis(elapsed), true);
        self.probes.push(entry);
        let from = self.in_force_key();
        let probe = &mut self.settings[i];
        if probe.decided.is_some() {
            return;
        }
        let baseline =
            compared_rate(probe.baseline, self.width.as_ref(), events).filter(|_| mode_kept);
        let rate = elapsed.as_secs_f64() * 1000.0 / events.max(1) as f64;
        let faster = baseline.is_some_and(|b| rate * SETTING_MARGIN < b);
        let kept = if faster {
            probe.choice.alternative.clone()
        } else {
            probe.choice.default.clone()
        };
        tracing::info!(setting = probe.choice.name, value = %kept, ms_per_event = rate,
            baseline_ms_per_event = ?baseline, "setting chosen by measurement");
        probe.decided = Some(kept);
        if faster {
            self.settings_changed(from);
        }
    }

    /// The settings a slice that is not a probe runs with: the mode
    /// decided and each probed setting's value. Width measurements are
    /// filed under it.
    fn in_force_key(&self) -> String {
        let mode = self.decided.clone().flatten().unwrap_or_default();
        format!("{mode} {}", self.values().join(" "))
    }

    /// The settings in force changed from `from`: the width search files
    /// what it measured under them, and takes up what it measured under
    /// the new ones before, if anything ([`WidthSearch::switch`]).
    fn settings_changed(&mut self, from: String) {
        let to = self.in_force_key();
        if let Some(search) = self.width.as_mut() {
            search.switch(from, to);
        }
    }
}

/// What a setting probe of `events` events is compared with: the lower
/// time per event of `baseline` (the entry that ran under the settings in
/// force when the probe started) and of the width search's slices of about
/// the probe's size, all measured under those settings (the search starts
/// over when they change). One entry alone can be off by half: the plan
/// probes run side by side, one of them heavy, and a generic probe measured
/// at 56 ms per 1000 events, where other runs of that history measured
/// 37-41, let 4MB win at 45; its slices then ran at 146 and the guard sent
/// every session back. The lower figure keeps the default unless the
/// alternative beats the best the settings in force have done.
fn compared_rate(
    baseline: Option<(i64, f64)>,
    width: Option<&WidthSearch>,
    events: i64,
) -> Option<f64> {
    let (_, rate) = baseline?;
    let near = width.and_then(|w| w.rate_near(events));
    Some(near.map_or(rate, |near| near.min(rate)))
}

/// Slices under the custom plan at every probed setting's default that
/// committed: `events` in `elapsed_ms`.
fn custom_at_defaults(events: i64, elapsed_ms: u64) -> PlanProbe {
    PlanProbe {
        plan_cache_mode: PROBE_MODES[1].to_string(),
        work_mem: None,
        enable_nestloop: None,
        events,
        elapsed_ms,
        completed: true,
    }
}

/// An entry's events and time per event, when it has events.
fn rate_of(entry: Option<&PlanProbe>) -> Option<(i64, f64)> {
    entry
        .filter(|p| p.events > 0)
        .map(|p| (p.events, p.elapsed_ms as f64 / p.events as f64))
}

/// A setting probe's slice, taken out of `pending`: `events` events of the
/// largest piece (the earliest of equals), the rest left in place; the
/// whole piece when it holds no more. The part taken is the piece's end
/// when only its start touches a pending neighbour, its start otherwise,
/// so the rest stays joinable: a rest between two slices already run is a
/// call of its own, and on a full hourly table a call's fixed part alone
/// took about 250 ms (realistic 200k).
fn probe_piece(pending: &mut VecDeque<Piece>, events: i64) -> Option<Piece> {
    let (i, _) = pending
        .iter()
        .enumerate()
        .max_by_key(|(i, p)| (p.events, std::cmp::Reverse(*i)))?;
    let piece = pending.remove(i).expect("an index of pending");
    let joins_before = i > 0 && pending[i - 1].slice.to == piece.slice.from;
    let joins_after = pending
        .get(i)
        .is_some_and(|next| next.slice.from == piece.slice.to);
    let take_end = joins_before && !joins_after;
    let cut = if take_end {
        piece.events - events
    } else {
        events
    };
    let Some((head, tail)) = sizing::split_head(piece, cut) else {
        return Some(piece);
    };
    let (probe, rest) = if take_end { (tail, head) } else { (head, tail) };
    pending.insert(i, rest);
    Some(probe)
}

/// A slice not run after all goes back among the pending ones in the
/// order of time, next to its neighbours.
fn put_back(pending: &mut VecDeque<Piece>, piece: Piece) {
    let at = pending
        .iter()
        .position(|p| p.slice.from > piece.slice.from)
        .unwrap_or(pending.len());
    pending.insert(at, piece);
}

/// Committed slices not yet reported, and the resume point.
struct Prefix {
    cursor: Timestamp,
    done: BTreeMap<Timestamp, (Piece, i64, Duration)>,
    processed: u64,
    rows: i64,
    /// Cancelled: nothing more is reported.
    quiet: bool,
}

impl Walk<'_> {
    pub(crate) async fn run(
        self,
        cancel: &CancellationToken,
        emit: &mut (dyn FnMut(&Event) + Send),
    ) -> Result<Walked> {
        let Some(start) = self
            .historical
            .first()
            .or(self.last.as_ref())
            .map(|p| p.slice.from)
        else {
            return Ok(Walked {
                slices_processed: self.already_processed,
                rows_touched: self.already_rows,
                slices_total: self.already_processed,
                ..Walked::default()
            });
        };
        let mut sizes: Vec<i64> = self.historical.iter().map(|p| p.events).collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let probe = self.probe
            && self.historical.len() >= 3
            && if self.cap.is_some() {
                self.historical[..2]
                    .iter()
                    .all(|p| p.events >= PROBE_MIN_EVENTS)
            } else {
                sizes[1] >= PROBE_MIN_EVENTS
            };
        let any_historical = !self.historical.is_empty();
        let session_count = 1 + self.workers.len();
        let width = if self.measure_width && self.cap.is_none() {
            WidthSearch::new(&self.historical, session_count)
        } else {
            None
        };
        let shared = Mutex::new(Shared {
            pending: self.historical.iter().copied().collect(),
            started: 0,
            stop: false,
            model: Model::default(),
            cap: self.cap,
            untried: if probe {
                PROBE_MODES.into_iter().collect()
            } else {
                VecDeque::new()
            },
            probe_partner: None,
            running_probes: Vec::new(),
            probes: Vec::new(),
            decided: None,
            retries: 0,
            durations_ms: Vec::new(),
            width,
            sessions: session_count,
            tickets: 0,
            custom_pool: Pool::default(),
            review_holds: 0,
            probes_counted: BTreeSet::new(),
            settings: if probe {
                self.setting_probes
                    .iter()
                    .cloned()
                    .map(SettingProbe::new)
                    .collect()
            } else {
                Vec::new()
            },
            total_events: self.historical.iter().map(|p| p.events).sum(),
        });
        let mut prefix = Prefix {
            cursor: start,
            done: BTreeMap::new(),
            processed: self.already_processed,
            rows: self.already_rows,
            quiet: false,
        };
        // Cancelled by the caller, or by us when the lock is lost.
        let stop_all = cancel.child_token();

        let (tx, rx) = mpsc::unbounded_channel();
        let sessions = std::iter::once((self.lock, Guard::Holder(self.lock_pid))).chain(
            self.workers
                .iter()
                .map(|w| (w, Guard::Worker(self.lock_pid))),
        );
        let workers =
            join_all(sessions.map(|(session, guard)| {
                self.worker(session, guard, &shared, tx.clone(), &stop_all)
            }));
        drop(tx);
        let (_, failure) = tokio::join!(
            workers,
            self.coordinate(rx, &shared, &mut prefix, &stop_all, cancel, emit)
        );
        if cancel.is_cancelled() {
            return Err(Error::Cancelled);
        }
        if let Some(error) = failure {
            return Err(error);
        }

        let mut end = None;
        if let Some(mut last) = self.last {
            if any_historical && !self.sleep.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(self.sleep) => {}
                    _ = cancel.cancelled() => return Err(Error::Cancelled),
                }
            }
            if cancel.is_cancelled() {
                return Err(Error::Cancelled);
            }
            // The stamp names where this slice ends, so it ends at the clock
            // read now, not at the one read before the walk: after a walk of
            // an hour, a stamp from its start would already trail the newest
            // event by more than the guard's hour (the same five minutes
            // before the reading keep the last-slice drain closed).
            last.slice.to = last.slice.to.max(plan::walk_end(self.lock.clock().await?));
            end = Some(last.slice.to);
            let (decided, settings) = {
                let s = shared.lock().unwrap();
                let settings: Vec<_> = s
                    .settings
                    .iter()
                    .map(|p| (p.choice.name, p.want()))
                    .collect();
                (s.decided.clone(), settings)
            };
            if let Some(mode) = decided {
                self.lock.set_plan_cache_mode(mode.as_deref()).await?;
            }
            for (name, value) in settings {
                self.lock.set_and_replan(name, &value).await?;
            }
            emit(&Event::SliceStarted { slice: last.slice });
            let started = Instant::now();
            let rows = self
                .attempt(
                    self.lock,
                    &last.slice,
                    Guard::Holder(self.lock_pid),
                    &shared,
                    cancel,
                )
                .await?;
            let elapsed = started.elapsed();
            tracing::debug!(from = %last.slice.from, to = %last.slice.to,
                events = last.events, ms = millis(elapsed), rows, "last slice committed");
            shared.lock().unwrap().durations_ms.push(millis(elapsed));
            prefix.done.insert(last.slice.from, (last, rows, elapsed));
            self.advance(&mut prefix, &shared, cancel, emit);
        }

        let shared = shared.into_inner().unwrap();
        let (work_mem, enable_nestloop) = (shared.kept(WORK_MEM), shared.kept(ENABLE_NESTLOOP));
        Ok(Walked {
            end,
            slices_processed: prefix.processed,
            rows_touched: prefix.rows,
            slices_total: self.total(&shared),
            cursor: Some(prefix.cursor),
            durations_ms: shared.durations_ms,
            retries: shared.retries,
            plan_cache_mode: shared.decided.flatten(),
            probes: shared.probes,
            work_mem,
            enable_nestloop,
            width: shared.width.as_ref().and_then(WidthSearch::report),
        })
    }

    /// Slices of the whole walk as now planned, the resumed ones included.
    fn total(&self, shared: &Shared) -> u64 {
        self.already_processed
            + shared.started
            + shared.pending_slices()
            + u64::from(self.last.is_some())
    }

    /// One session's loop: take the next slice, run it, report it.
    async fn worker(
        &self,
        session: &Session,
        guard: Guard,
        shared: &Mutex<Shared>,
        tx: mpsc::UnboundedSender<Msg>,
        stop_all: &CancellationToken,
    ) {
        // The plan_cache_mode this session was given; None: the server's.
        let mut mode: Option<String> = None;
        // Its probed settings: the tuning's defaults until a probe changes
        // them.
        let mut values: Vec<String> = self
            .setting_probes
            .iter()
            .map(|c| c.default.clone())
            .collect();
        loop {
            if stop_all.is_cancelled() {
                return;
            }
            let next = shared.lock().unwrap().next(stop_all);
            let Job {
                piece,
                mode: want,
                settings: want_values,
                ticket,
                claim,
                watch,
            } = match next {
                Next::Run(job) => job,
                Next::Done => return,
            };
            // The settings this slice wants, where the session has others.
            let applied = async {
                for (i, value) in want_values.into_iter().enumerate() {
                    if value != values[i] {
                        session
                            .set_and_replan(self.setting_probes[i].name, &value)
                            .await?;
                        values[i] = value;
                    }
                }
                if let Some(want) = want.filter(|w| *w != mode) {
                    session.set_plan_cache_mode(want.as_deref()).await?;
                    mode = want;
                }
                Ok::<(), Error>(())
            }
            .await;
            if let Err(error) = applied {
                shared
                    .lock()
                    .unwrap()
                    .finished(&piece, ticket.as_ref(), claim, (None, &[]), None);
                let _ = tx.send(Msg::Failed {
                    slice: piece.slice,
                    error,
                });
                return;
            }
            let _ = tx.send(Msg::Started(piece.slice));
            if let Some(t) = &ticket {
                shared.lock().unwrap().probe_started(t.id);
            }
            let started = Instant::now();
            let token = match (&ticket, &watch) {
                (Some(t), _) => &t.abort,
                (None, Some(w)) => &w.abort,
                (None, None) => stop_all,
            };
            let attempt = self.attempt(session, &piece.slice, guard, shared, token);
            let result = match &watch {
                Some(w) => {
                    // Cancels the slice at its deadline; `attempt` then
                    // returns (cancelled, or done if it committed first).
                    let deadline = async {
                        tokio::time::sleep(w.deadline).await;
                        w.abort.cancel();
                        std::future::pending::<()>().await
                    };
                    tokio::select! {
                        result = attempt => result,
                        _ = deadline => unreachable!("pending never completes"),
                    }
                }
                None => attempt.await,
            };
            let elapsed = started.elapsed();
            if let (Some(w), Err(Error::Cancelled)) = (&watch, &result)
                && w.abort.is_cancelled()
                && !stop_all.is_cancelled()
            {
                shared.lock().unwrap().watch_tripped(
                    piece,
                    claim,
                    w.kept,
                    (mode.as_deref(), &values),
                    elapsed,
                );
                continue;
            }
            if let (Some(t), Err(Error::Cancelled)) = (&ticket, &result)
                && t.abort.is_cancelled()
                && !stop_all.is_cancelled()
            {
                tracing::info!(from = %piece.slice.from, to = %piece.slice.to,
                    plan_cache_mode = mode.as_deref().unwrap_or(""),
                    settings = ?values,
                    "probe given up: another setting is faster, and this one ran too long to finish; the slice runs again");
                shared.lock().unwrap().aborted(piece, t, elapsed);
                continue;
            }
            shared.lock().unwrap().finished(
                &piece,
                ticket.as_ref(),
                claim,
                (mode.as_deref(), &values),
                result.is_ok().then_some(elapsed),
            );
            match result {
                Ok(rows) => {
                    // What a walk's time went to, slice by slice, for whoever
                    // tunes it (the benchmark's timeline).
                    tracing::debug!(from = %piece.slice.from, to = %piece.slice.to,
                        events = piece.events, ms = millis(elapsed), rows,
                        plan_cache_mode = mode.as_deref().unwrap_or(""), settings = ?values,
                        probe = ticket.is_some(), level = ?claim.map(|c| c.level),
                        "slice committed");
                    let _ = tx.send(Msg::Done {
                        piece,
                        rows,
                        elapsed,
                    });
                }
                Err(error) => {
                    let _ = tx.send(Msg::Failed {
                        slice: piece.slice,
                        error,
                    });
                    return;
                }
            }
            // The pause between two slices of this session, if it gets
            // another one.
            if !self.sleep.is_zero() && !shared.lock().unwrap().pending.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(self.sleep) => {}
                    _ = stop_all.cancelled() => return,
                }
            }
        }
    }

    /// One slice, run again after a deadlock or serialization failure.
    async fn attempt(
        &self,
        session: &Session,
        slice: &Slice,
        guard: Guard,
        shared: &Mutex<Shared>,
        cancel: &CancellationToken,
    ) -> Result<i64> {
        let mut attempt = 1;
        loop {
            let span = tracing::info_span!("slice", from = %slice.from, to = %slice.to, attempt);
            let result = tracing::Instrument::instrument(
                session.rollup_attempt(slice, self.slice_timeout, cancel, guard),
                span,
            )
            .await;
            match result {
                Ok(rows) => return Ok(rows),
                Err(SliceError {
                    conflict: true,
                    error,
                }) if attempt < CONFLICT_ATTEMPTS => {
                    shared.lock().unwrap().retries += 1;
                    // Exponential, with a jitter so two colliding sessions
                    // do not collide again.
                    let jitter = (slice.from.as_second().unsigned_abs() * 7919
                        + u64::from(attempt) * 104_729)
                        % 100;
                    let backoff =
                        CONFLICT_BACKOFF * 2u32.pow(attempt - 1) + Duration::from_millis(jitter);
                    tracing::info!(from = %slice.from, to = %slice.to, attempt, error = %error,
                        backoff_ms = millis(backoff), "slice conflicted with another; running it again");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = cancel.cancelled() => return Err(Error::Cancelled),
                    }
                    attempt += 1;
                }
                Err(e) => return Err(e.error),
            }
        }
    }

    /// Reports progress in slice order and watches the lock session; returns
    /// the error that ends the walk, if any.
    async fn coordinate(
        &self,
        mut rx: mpsc::UnboundedReceiver<Msg>,
        shared: &Mutex<Shared>,
        prefix: &mut Prefix,
        stop_all: &CancellationToken,
        cancel: &CancellationToken,
        emit: &mut (dyn FnMut(&Event) + Send),
    ) -> Option<Error> {
        let mut failures: Vec<(Slice, Error)> = Vec::new();
        let mut lock_lost: Option<Error> = None;
        let mut watch = tokio::time::interval(WATCH_INTERVAL);
        watch.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    None => break,
                    Some(Msg::Started(slice)) => {
                        if !prefix.quiet {
                            emit(&Event::SliceStarted { slice });
                        }
                    }
                    Some(Msg::Done { piece, rows, elapsed }) => {
                        prefix.done.insert(piece.slice.from, (piece, rows, elapsed));
                        self.advance(prefix, shared, cancel, emit);
                    }
                    Some(Msg::Failed { slice, error }) => {
                        tracing::warn!(from = %slice.from, to = %slice.to, error = %error, "slice failed");
                        // Both end the walk at once, before any other failure.
                        let fatal = matches!(
                            error,
                            Error::LockLost { .. } | Error::TransactionPooling { .. }
                        );
                        if fatal && lock_lost.is_none() {
                            stop_all.cancel();
                            lock_lost = Some(error);
                        } else if !matches!(error, Error::Cancelled) {
                            failures.push((slice, error));
                        }
                    }
                },
                _ = watch.tick(), if lock_lost.is_none() => {
                    let mut s = shared.lock().unwrap();
                    s.early_verdict();
                    s.setting_verdict();
                    drop(s);
                    if self.lock.is_closed() {
                        shared.lock().unwrap().stop = true;
                        stop_all.cancel();
                        lock_lost = Some(Error::LockLost {
                            message: "the connection of the session holding it closed".into(),
                        });
                    }
                }
            }
        }
        if lock_lost.is_none() && self.lock.is_closed() {
            lock_lost = Some(Error::LockLost {
                message: "the connection of the session holding it closed".into(),
            });
        }
        if let Some(e) = lock_lost {
            return Some(e);
        }
        failures.sort_by_key(|(slice, _)| slice.from);
        failures
            .into_iter()
            .next()
            .map(|(_, e)| e)
            .or_else(|| stop_all.is_cancelled().then_some(Error::Cancelled))
    }

    /// Reports every committed slice that now continues the committed
    /// prefix, in order.
    fn advance(
        &self,
        prefix: &mut Prefix,
        shared: &Mutex<Shared>,
        cancel: &CancellationToken,
        emit: &mut (dyn FnMut(&Event) + Send),
    ) {
        while let Some((piece, rows, elapsed)) = prefix.done.remove(&prefix.cursor) {
            prefix.processed += 1;
            prefix.rows += rows;
            prefix.cursor = piece.slice.to;
            if prefix.quiet {
                continue;
            }
            let total = self.total(&shared.lock().unwrap());
            emit(&Event::SliceDone {
                slice: piece.slice,
                rows,
                elapsed_ms: millis(elapsed),
                slices_processed: prefix.processed,
                slices_total: total.max(prefix.processed),
                rows_touched: prefix.rows,
                cursor: prefix.cursor,
            });
            // The callback may cancel; what follows is not reported, so the
            // last event stays a valid resume point.
            if cancel.is_cancelled() {
                prefix.quiet = true;
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sizing::tests::months;

    #[test]
    fn a_setting_probe_is_compared_with_the_best_the_settings_in_force_did() {
        let mut width = WidthSearch::new(&months(&[10_000; 12]), 2).unwrap();
        // The plan probe that won: 10k events at 0.056 ms each.
        let baseline = Some((10_000, 0.056));
        assert_eq!(compared_rate(None, Some(&width), 10_000), None);
        assert_eq!(compared_rate(baseline, Some(&width), 10_000), Some(0.056));
        // A one-month slice measured at 0.04 since: a probe of about a
        // month's events is compared with it, a much narrower one is not.
        let claim = width.claim();
        width.observe(claim, 10_000, Duration::from_millis(400));
        assert_eq!(compared_rate(baseline, Some(&width), 9_000), Some(0.04));
        assert_eq!(compared_rate(baseline, Some(&width), 2_000), Some(0.056));
        // A slower slice does not raise what the probe must beat.
        let claim = width.claim();
        width.observe(claim, 20_000, Duration::from_millis(2_000));
        assert_eq!(compared_rate(baseline, Some(&width), 20_000), Some(0.056));
        assert_eq!(compared_rate(baseline, None, 10_000), Some(0.056));
    }

    #[test]
    fn the_nested_loop_probe_takes_a_part_of_the_largest_unit() {
        let mut pending: VecDeque<Piece> = months(&[3_000, 9_000, 4_000]).into();
        let whole = pending[1];
        let probe = probe_piece(&mut pending, 2_000).unwrap();
        // The first 2000 of the 9000 events: the rest stays in its place.
        assert_eq!(probe.events, 2_000);
        assert_eq!(probe.slice.from, whole.slice.from);
        let counts: Vec<i64> = pending.iter().map(|p| p.events).collect();
        assert_eq!(counts, vec![3_000, 7_000, 4_000]);
        assert_eq!(pending[1].slice.from, probe.slice.to);
        assert_eq!(pending[1].slice.to, whole.slice.to);
        // Given up, it goes back in its place: the pieces are contiguous
        // again, and the width search can join them.
        put_back(&mut pending, probe);
        for w in pending.make_contiguous().windows(2) {
            assert_eq!(w[0].slice.to, w[1].slice.from);
        }
        // The work_mem probe takes the events of the entry it is compared
        // with; a largest unit with no more is taken whole.
        let all = months(&[3_000, 9_000]);
        let mut pending: VecDeque<Piece> = all.iter().copied().collect();
        // Only its start touches a pending piece: its end is taken, and
        // the rest joins the piece before it.
        let probe = probe_piece(&mut pending, 7_500).unwrap();
        assert_eq!((probe.events, probe.slice.to), (7_500, all[1].slice.to));
        assert_eq!(pending[1].slice.to, probe.slice.from);
        assert_eq!(probe_piece(&mut pending, 7_500).unwrap().events, 3_000);
        assert_eq!(pending.len(), 1);
    }
}
