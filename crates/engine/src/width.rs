//! How many events one slice takes, chosen during the walk by measuring the
//! walk's own slices (tuned plans, no cap on one transaction's duration).
//!
//! Why by measurement: a window call costs a part that grows with the whole
//! history (full scans of task_usage and agent_task_queue, and a hash of
//! the whole hourly table for the empty-bucket delete) plus a part per key.
//! How the two compare depends on the shape of the history (tasks, rows and
//! keys per event) and on how full the hourly table already is, none of
//! which the counts before the walk show; and on big histories a call's
//! time grows faster than its range. A fixed number of slices was right
//! for some of the shapes we generate and wrong for others
//! (`docs/performance.md`).
//!
//! How: widths form a ladder in events per slice, `base × 2^level`, where
//! `base` is the median unit of `super::sizing::by_counts` (a calendar month,
//! thin months merged, outsized ones split). Every slice of the walk is cut
//! at a level and, once committed, adds its time and events to the level
//! nearest to its events; levels are compared by time per event only, so
//! nothing is assumed about how cost grows with width. The probe the
//! sessions' settings were chosen by counts like a slice
//! ([`WidthSearch::record`]); without one the first two slices take levels
//! 0 and 1. After that a slice takes the best level so far, except that
//! the best level's untried neighbour, in the direction the measurements
//! improve, is tried once (wider first; a narrower one only once the wider
//! one has lost by more than [`NARROWER_AFTER`]), and settings that change
//! mid-walk start at the level the earlier ones found best; while a kept
//! custom plan awaits its review, slices hold the generic probe's width
//! ([`WidthSearch::claim_near`]). A trial (the
//! first slice of a level other than the start: level 0, or that level
//! after a change) runs only while what the
//! trial slices cost so far (their time beyond the best level's time per
//! event), plus what this one could lose ([`TRIAL_RISK`] of its time),
//! stays within [`EXPLORE_BUDGET`] of the walk's predicted time. Nothing runs
//! twice: a trial is a slice of the walk. Later slices keep adding to their
//! level, so a level that looked best by chance loses its place when its
//! average rises.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use serde::Serialize;

use super::sizing::{self, Piece};

/// Trying stops once the trial slices have cost this share of the walk's
/// predicted time beyond the best width.
pub(crate) const EXPLORE_BUDGET: f64 = 0.05;
/// What a trial is assumed to lose, as a share of its time at the best
/// rate, when the budget decides whether it may run: neighbouring widths
/// differed by 5-25 % per event on the histories measured.
const TRIAL_RISK: f64 = 0.25;
/// A narrower level is tried only once the wider neighbour lost by more
/// than this factor per event: slices of one width vary by about ±15 %.
const NARROWER_AFTER: f64 = 1.1;
/// The narrowest level: an eighth of a median unit.
const MIN_LEVEL: i32 = -3;
/// A level below this many events per slice is not tried: such a call is
/// all fixed part.
const MIN_TARGET_EVENTS: f64 = 1000.0;
/// A slice takes further units while it stays within this many targets…
const JOIN_WITHIN: f64 = 1.1;
/// …and a unit of more than this many targets is split.
const SPLIT_ABOVE: f64 = 1.5;
/// A slice short of its target by at least this share of it, whose next
/// unit does not fit whole, takes the part of that unit that fills it.
const FILL_SHORT: f64 = 0.25;
/// A unit, or what a slice would leave of it, smaller than this many
/// targets at the end of a run of adjacent units is taken whole by the
/// slice before it (within [`SPLIT_ABOVE`] targets).
const FRAGMENT: f64 = 0.5;

#[derive(Debug, Clone, Default)]
struct Level {
    slices: u64,
    events: i64,
    ms: f64,
    /// Slices of this level under way.
    running: u32,
}

impl Level {
    fn rate(&self) -> Option<f64> {
        (self.slices > 0 && self.events > 0).then(|| self.ms / self.events as f64)
    }
}

/// The search over the ladder of widths during one walk.
#[derive(Debug, Clone)]
pub(crate) struct WidthSearch {
    /// Events per slice at level 0.
    base: f64,
    total_events: i64,
    min_level: i32,
    /// At least one slice per session.
    max_level: i32,
    levels: BTreeMap<i32, Level>,
    /// Trial slices (claimed at a level not measured before): their events
    /// and time, for what trying cost.
    trials: Vec<(i64, f64)>,
    /// Measurements start over when a setting of the sessions changes.
    epoch: u32,
    /// What trying cost before the last restart.
    spent_before: f64,
    /// Where the settings in force start, measured or not: level 0 (a
    /// median unit) for the walk's first, and after a switch the level
    /// the settings before found best. Its first slice is no trial.
    start: i32,
    /// The levels measured under the sessions' earlier settings, by those
    /// settings: a setting sent back to a value it had brings them back.
    filed: BTreeMap<String, BTreeMap<i32, Level>>,
}

/// A slice's claim on a level, handed back when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Claim {
    pub level: i32,
    /// The level had not been measured: a trial.
    trial: bool,
    epoch: u32,
}

/// One level of the ladder as measured in a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WidthLevel {
    /// The events a slice of this level aims at.
    pub events_per_slice: i64,
    pub slices: u64,
    pub events: i64,
    pub elapsed_ms: u64,
}

/// What the width search measured and chose.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct WidthReport {
    /// The width kept at the end: the level with the lowest time per event.
    pub events_per_slice: i64,
    /// Every level that ran, narrowest first.
    pub levels: Vec<WidthLevel>,
    /// What the trial slices (each width's first, but not the width a
    /// walk starts at: the probes' width, else level 0; after its settings
    /// changed, the width kept before) cost beyond the kept width's time
    /// per event.
    pub explore_cost_ms: u64,
}

impl WidthSearch {
    /// None when there is nothing to choose: fewer than three units, or no
    /// events.
    pub(crate) fn new(units: &[Piece], sessions: usize) -> Option<Self> {
        if units.len() < 3 {
            return None;
        }
        let base = sizing::median(units.iter().map(|p| p.events)) as f64;
        let total_events: i64 = units.iter().map(|p| p.events).sum();
        if base < 1.0 {
            return None;
        }
        let share = total_events as f64 / sessions.max(1) as f64;
        let mut max_level = 0;
        while base * 2f64.powi(max_level + 1) <= share {
            max_level += 1;
        }
        let mut min_level = 0;
        while min_level > MIN_LEVEL && base * 2f64.powi(min_level - 1) >= MIN_TARGET_EVENTS {
            min_level -= 1;
        }
        Some(WidthSearch {
            base,
            total_events,
            min_level,
            max_level,
            levels: BTreeMap::new(),
            trials: Vec::new(),
            epoch: 0,
            spent_before: 0.0,
            start: 0,
            filed: BTreeMap::new(),
        })
    }

    /// Events a slice of `level` aims at.
    pub(crate) fn target(&self, level: i32) -> f64 {
        self.base * 2f64.powi(level)
    }

    /// The measured level with the lowest time per event.
    pub(crate) fn best(&self) -> Option<i32> {
        self.levels
            .iter()
            .filter_map(|(l, m)| m.rate().map(|r| (*l, r)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(l, _)| l)
    }

    fn sampled(&self, level: i32) -> bool {
        self.levels.get(&level).is_some_and(|l| l.slices > 0)
    }

    fn open(&self, level: i32) -> bool {
        (self.min_level..=self.max_level).contains(&level)
            && self
                .levels
                .get(&level)
                .is_none_or(|l| l.slices == 0 && l.running == 0)
    }

    /// The level for the next slice, held as running until
    /// [`WidthSearch::observe`] or [`WidthSearch::release`].
    pub(crate) fn claim(&mut self) -> Claim {
        let level = self.choose();
        self.claim_at(level)
    }

    /// A claim on the level nearest to `events`, whatever the search
    /// would try: for slices that must measure the settings in force at
    /// one width ([`super::parallel`]'s review of a kept custom plan).
    pub(crate) fn claim_near(&mut self, events: i64) -> Claim {
        let level = self.level_of(events);
        self.claim_at(level)
    }

    fn claim_at(&mut self, level: i32) -> Claim {
        // Level 0 is where a walk starts, measured or not (a median unit:
        // calendar months, the reference's own width), and after a switch
        // the level the settings before found best, so its first slice
        // is not a trial: what it costs beyond the best width is the price
        // of starting anywhere, not of searching. Counted, it spent a
        // budget the wider trials then lacked: on one-workspace 200k with
        // a full hourly table 330 of 750 ms, so four months (predicted 25 %
        // cheaper per event than two) were never tried.
        let trial = level != self.start && !self.sampled(level);
        self.levels.entry(level).or_default().running += 1;
        Claim {
            level,
            trial,
            epoch: self.epoch,
        }
    }

    /// The sessions' settings changed from `from` to `to` (a probe kept an
    /// alternative, or a guard sent one back): what was measured under
    /// `from` no longer applies and is filed under it; what was measured
    /// under `to` before, if anything, applies again (a setting sent back
    /// returns to the value the first slices were measured at, and
    /// starting over would pay their trials twice). What trying cost so
    /// far still counts, and slices claimed before are not measured.
    pub(crate) fn switch(&mut self, from: String, to: String) {
        self.spent_before = self.explore_cost_ms();
        self.start = self.best().unwrap_or(self.start);
        self.epoch += 1;
        let mut levels = std::mem::take(&mut self.levels);
        levels.retain(|_, l| l.slices > 0);
        for l in levels.values_mut() {
            l.running = 0;
        }
        self.filed.insert(from, levels);
        self.levels = self.filed.remove(&to).unwrap_or_default();
        self.trials.clear();
    }

    fn choose(&self) -> i32 {
        let start = self.start;
        let Some(best) = self.best() else {
            // Nothing measured yet: the first trials, then the start.
            return [start, start + 1, start - 1]
                .into_iter()
                .find(|&l| self.open(l) && self.wider_known(l, start))
                .unwrap_or(start);
        };
        // New settings begin where the ones before found their best width,
        // beside the width of the probe they were chosen by: what the
        // trials before had found is not thrown away with their figures.
        // Started over with the probe's width alone, a walk whose budget
        // the first settings' trials had spent could not try wider again
        // (wide 200k, empty hourly table: the custom plan kept and sent
        // back, then 27 slices of one month).
        if self.epoch > 0 && start != best && self.open(start) && self.wider_known(start, best) {
            return start;
        }
        // On in the direction the measurements improve; wider first (the
        // fixed part per call dominated on every 200k history).
        let next = if self.sampled(best - 1) {
            [best + 1, best + 1]
        } else if self.sampled(best + 1) {
            [best - 1, best - 1]
        } else {
            [best + 1, best - 1]
        };
        next.into_iter()
            .find(|&l| self.open(l) && self.wider_known(l, best) && self.affordable(l, best))
            .unwrap_or(best)
    }

    /// Whether `level` may be tried from `from`: a wider level at once, a
    /// narrower one only once the wider neighbour of `from` has been
    /// measured and lost by more than [`NARROWER_AFTER`], or lies beyond
    /// the ladder. While the wider trial runs its result is unknown, and on
    /// every history measured the narrowest width was the slowest (on a
    /// full hourly table up to 3.6x the kept width's time per event):
    /// trying it then spent the budget the wider trials needed. A wider
    /// level that lost by less says the cost per event is flat there, not
    /// that it falls towards narrower slices: on one-workspace 200k with a
    /// full hourly table two months lost to one by 4 %, and the half month
    /// tried next ran at 176 ms per 1000 events against 75.
    fn wider_known(&self, level: i32, from: i32) -> bool {
        let rate = |level: i32| self.levels.get(&level).and_then(Level::rate);
        let lost = matches!((rate(from + 1), rate(from)),
            (Some(wider), Some(at)) if wider > NARROWER_AFTER * at);
        level >= from || from + 1 > self.max_level || lost
    }

    /// Whether a trial at `level` fits in what is left of the budget if
    /// it loses [`TRIAL_RISK`] of its time: the budget is spent before a
    /// trial is known to lose, so a wide trial is judged by what it could
    /// cost (even 3M: an eight-month trial lost 22 % of 107 s).
    fn affordable(&self, level: i32, best: i32) -> bool {
        let rate = self.levels[&best].rate().unwrap_or(0.0);
        let risk = TRIAL_RISK * self.target(level) * rate;
        self.explore_cost_ms() + risk <= EXPLORE_BUDGET * self.predicted_ms(best)
    }

    /// The walk's time at the best level's rate.
    fn predicted_ms(&self, best: i32) -> f64 {
        let rate = self.levels[&best].rate().unwrap_or(0.0);
        rate * self.total_events as f64
    }

    /// What the trial slices cost beyond the best level's time per event.
    /// Slices that came out narrow without being trials (a thin unit, a
    /// leftover) are data, not trying.
    fn explore_cost_ms(&self) -> f64 {
        let Some(best) = self.best().and_then(|b| self.levels[&b].rate()) else {
            return self.spent_before;
        };
        self.spent_before
            + self
                .trials
                .iter()
                .map(|(events, ms)| (ms - best * *events as f64).max(0.0))
                .sum::<f64>()
    }

    /// The level whose width is nearest to `events` (a slice cut at one
    /// level can come out at another: a unit left over by a split, or
    /// units that are not adjacent because a plan probe took the one
    /// between).
    fn level_of(&self, events: i64) -> i32 {
        let ratio = (events.max(1) as f64 / self.base).log2().round() as i32;
        ratio.clamp(self.min_level, self.max_level)
    }

    /// The time per event measured at the level nearest to `events`, since
    /// the search last started over (under the sessions' settings now).
    pub(crate) fn rate_near(&self, events: i64) -> Option<f64> {
        self.levels.get(&self.level_of(events))?.rate()
    }

    /// A slice committed; it counts for the level nearest to its events.
    pub(crate) fn observe(&mut self, claim: Claim, events: i64, elapsed: Duration) {
        if claim.epoch != self.epoch {
            return;
        }
        self.release(claim);
        // A trial that came out at another level (a probe took the unit it
        // was to join) tried nothing: its level stays untried, and its
        // slice is data where it belongs, not trying.
        if claim.trial && self.level_of(events) == claim.level {
            self.trials
                .push((events.max(0), elapsed.as_secs_f64() * 1000.0));
        }
        self.record(events, elapsed);
    }

    /// A slice that committed, claimed or not (a probe the settings in
    /// force were chosen by): data for the level nearest to its events.
    pub(crate) fn record(&mut self, events: i64, elapsed: Duration) {
        let before = self.best();
        let l = self.levels.entry(self.level_of(events)).or_default();
        l.slices += 1;
        l.events += events.max(0);
        l.ms += elapsed.as_secs_f64() * 1000.0;
        let after = self.best();
        if after != before
            && let Some(best) = after
        {
            tracing::info!(
                events_per_slice = self.target(best) as i64,
                ms_per_1000_events = self.levels[&best].rate().unwrap_or(0.0) * 1000.0,
                "slice width: best measured so far"
            );
        }
    }

    /// A slice that did not commit (failed or cancelled).
    pub(crate) fn release(&mut self, claim: Claim) {
        if claim.epoch != self.epoch {
            return;
        }
        if let Some(l) = self.levels.get_mut(&claim.level) {
            l.running = l.running.saturating_sub(1);
        }
    }

    /// The width slices are cut at now: the best level, or level 0 before
    /// any measurement.
    pub(crate) fn current_target(&self) -> f64 {
        self.target(self.best().unwrap_or(0))
    }

    pub(crate) fn report(&self) -> Option<WidthReport> {
        let best = self.best()?;
        Some(WidthReport {
            events_per_slice: self.target(best).round() as i64,
            levels: self
                .levels
                .iter()
                .filter(|(_, l)| l.slices > 0)
                .map(|(level, l)| WidthLevel {
                    events_per_slice: self.target(*level).round() as i64,
                    slices: l.slices,
                    events: l.events,
                    elapsed_ms: l.ms.round() as u64,
                })
                .collect(),
            explore_cost_ms: self.explore_cost_ms().round() as u64,
        })
    }
}

/// The next slice from the front of `pending`, about `target` events: the
/// front unit split when it holds more than [`SPLIT_ABOVE`] targets,
/// otherwise joined with the units after it while the slice stays within
/// [`JOIN_WITHIN`] targets, and then, when it is still short by
/// [`FILL_SHORT`] of its target, with the first part of the next unit
/// that fills it. Without that a unit left over by a split made a slice of
/// half its level's width: on realistic 200k (full hourly table) one
/// session split each month at level 0 while the other's level-1 claims
/// took the halves left over, so level 1 was never measured, every one of
/// its claims was a trial, and the walk ran in half months at 1.6x the
/// per-event time of the two-month width.
pub(crate) fn take(pending: &mut VecDeque<Piece>, target: f64) -> Option<Piece> {
    let first = pending.pop_front()?;
    if first.events as f64 > SPLIT_ABOVE * target {
        let parts = (first.events as f64 / target).round() as i64;
        let mut parts = sizing::split_even(first, parts).into_iter();
        let head = parts.next().expect("split_even returns at least one piece");
        for p in parts.rev() {
            pending.push_front(p);
        }
        return Some(head);
    }
    let mut slice = first;
    while let Some(&next) = pending.front() {
        if next.slice.from != slice.slice.to {
            break;
        }
        let fits = (slice.events + next.events) as f64 <= JOIN_WITHIN * target;
        if fits || leaves_fragment(pending, slice.events, 0.0, target) {
            pending.pop_front();
            slice = sizing::join(slice, next);
        }
        if !fits {
            break;
        }
    }
    let room = target - slice.events as f64;
    if room >= FILL_SHORT * target
        && let Some(next) = pending.front().copied()
        && next.slice.from == slice.slice.to
    {
        if leaves_fragment(pending, slice.events, room, target) {
            pending.pop_front();
            slice = sizing::join(slice, next);
        } else if let Some((head, rest)) = sizing::split_head(next, room.round() as i64) {
            pending[0] = rest;
            slice = sizing::join(slice, head);
        }
    }
    Some(slice)
}

/// Whether a slice of `events` that takes `taking` events of the front
/// unit of `pending` (adjacent to it) would leave of that unit a fragment,
/// under [`FRAGMENT`] of `target`, that nothing after it joins, where
/// taking the whole unit keeps the slice within [`SPLIT_ABOVE`] targets.
/// A fragment is a call of its own, nearly all fixed part: on realistic
/// 200k with a full hourly table 1936 events took 390 ms, and 3875 took
/// 346, where the kept width ran at 36-48 ms per 1000.
fn leaves_fragment(pending: &VecDeque<Piece>, events: i64, taking: f64, target: f64) -> bool {
    let Some(next) = pending.front() else {
        return false;
    };
    let rest = next.events as f64 - taking;
    let joined_after = pending
        .get(1)
        .is_some_and(|after| after.slice.from == next.slice.to);
    rest > 0.0
        && rest < FRAGMENT * target
        && !joined_after
        && (events + next.events) as f64 <= SPLIT_ABOVE * target
}

/// How many slices `pending` makes at `target`.
pub(crate) fn count(pending: &VecDeque<Piece>, target: f64) -> usize {
    let mut rest = pending.clone();
    let mut n = 0;
    while take(&mut rest, target).is_some() {
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sizing::tests::months;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Runs a whole walk of `units` on one session against a cost model
    /// `cost(events)` in ms, and returns (levels slices were cut at, total ms).
    fn simulate(units: &[Piece], cost: impl Fn(i64) -> f64) -> (Vec<i32>, f64, WidthSearch) {
        let mut search = WidthSearch::new(units, 1).unwrap();
        let mut pending: VecDeque<Piece> = units.iter().copied().collect();
        let mut levels = Vec::new();
        let mut total = 0.0;
        while !pending.is_empty() {
            let claim = search.claim();
            let piece = take(&mut pending, search.target(claim.level)).unwrap();
            let t = cost(piece.events);
            total += t;
            search.observe(claim, piece.events, Duration::from_secs_f64(t / 1000.0));
            levels.push(claim.level);
        }
        (levels, total, search)
    }

    /// Claims the next level and ends it with `events` in `millis`.
    fn step(s: &mut WidthSearch, events: i64, millis: u64) -> i32 {
        let claim = s.claim();
        s.observe(claim, events, ms(millis));
        claim.level
    }

    #[test]
    fn the_first_two_slices_try_one_and_two_units() {
        let units = months(&[10_000; 24]);
        let mut s = WidthSearch::new(&units, 2).unwrap();
        assert_eq!(s.claim().level, 0);
        assert_eq!(s.claim().level, 1);
        // A third session, before anything is measured: the base width (a
        // narrower trial waits for the wider one's result).
        assert_eq!(s.claim().level, 0);
        assert_eq!(s.claim().level, 0);
        // Where two units exceed a session's share, the second trial is
        // half a unit.
        let mut s = WidthSearch::new(&months(&[10_000; 3]), 2).unwrap();
        assert_eq!((s.claim().level, s.claim().level), (0, -1));
    }

    #[test]
    fn a_narrower_width_waits_for_the_wider_trial() {
        let mut s = WidthSearch::new(&months(&[10_000; 100]), 2).unwrap();
        let (a, b) = (s.claim(), s.claim());
        assert_eq!((a.level, b.level), (0, 1));
        s.observe(a, 10_000, ms(1_000));
        // Two units still running: the base width again, not half a unit.
        let c = s.claim();
        assert_eq!((c.level, c.trial), (0, false));
        // Two units lost: now half a unit is tried.
        s.observe(b, 20_000, ms(2_400));
        assert_eq!(s.claim().level, -1);
        // Where the ladder ends above the best width, narrower at once.
        let mut s = WidthSearch::new(&months(&[10_000; 3]), 2).unwrap();
        assert_eq!(step(&mut s, 10_000, 1_000), 0);
        assert_eq!(s.claim().level, -1);
    }

    #[test]
    fn a_narrower_width_waits_for_a_clear_loss() {
        let mut s = WidthSearch::new(&months(&[10_000; 100]), 2).unwrap();
        assert_eq!(step(&mut s, 10_000, 1_000), 0);
        // Two units lose by 4 %: within the noise, the cost is flat there.
        assert_eq!(step(&mut s, 20_000, 2_080), 1);
        let c = s.claim();
        assert_eq!(c.level, 0);
        s.observe(c, 10_000, ms(1_000));
        // Once they have lost by more than a tenth, half a unit is tried.
        s.record(20_000, ms(2_600));
        assert_eq!(s.claim().level, -1);
    }

    #[test]
    fn new_settings_start_where_the_old_ones_found_their_best() {
        let mut s = WidthSearch::new(&months(&[10_000; 100]), 2).unwrap();
        assert_eq!(step(&mut s, 10_000, 1_000), 0);
        assert_eq!(step(&mut s, 20_000, 1_600), 1);
        assert_eq!(step(&mut s, 40_000, 2_800), 2);
        assert_eq!(s.best(), Some(2));
        s.switch("old".into(), "new".into());
        // The probe the new settings were chosen by ran one unit.
        s.record(10_000, ms(700));
        assert_eq!(s.best(), Some(0));
        // The next slice takes four units, where the old settings were
        // best, as no trial; then the search goes on from the better one.
        let c = s.claim();
        assert_eq!((c.level, c.trial), (2, false));
        s.observe(c, 40_000, ms(2_000));
        assert_eq!(s.best(), Some(2));
        assert_eq!(s.claim().level, 3);
        // Not in the walk's first settings: there the probe's width is the
        // start (a_probe_kept_measures_its_width_and_the_walk_tries_wider_at_once).
    }

    #[test]
    fn a_large_fixed_part_climbs_to_wider_slices_and_stops_where_it_loses() {
        // 600 ms per call plus 0.05 ms per event, and beyond 40k events per
        // call the per-event part doubles (a hash spilling): 4 units best.
        let cost = |e: i64| {
            let per = if e > 40_000 { 0.1 } else { 0.05 };
            600.0 + per * e as f64
        };
        let (levels, _, search) = simulate(&months(&[10_000; 200]), cost);
        assert_eq!(&levels[..4], &[0, 1, 2, 3], "{levels:?}");
        assert_eq!(search.best(), Some(2));
        assert!(levels[4..].iter().all(|&l| l == 2), "{levels:?}");
        let report = search.report().unwrap();
        assert_eq!(report.events_per_slice, 40_000);
        assert_eq!(report.levels.len(), 4);
        assert_eq!(
            report.levels.iter().map(|l| l.events).sum::<i64>(),
            2_000_000
        );
        // The trials of 2 and 8 units beyond the kept rate (1 unit, where
        // the walk starts, is no trial): 300 + 3400 ms at 0.065 ms per
        // event, a little more since the last slice took the one unit
        // left over (5 units, past the 40k where the cost doubles) and
        // raised the kept width's rate.
        assert_eq!(report.explore_cost_ms, 3_576);
        // On a quarter of that history the budget cannot afford the trial
        // of 8 units (what it could lose): the walk stays at 4.
        let (levels, _, search) = simulate(&months(&[10_000; 48]), cost);
        assert_eq!(&levels[..3], &[0, 1, 2], "{levels:?}");
        assert!(levels[3..].iter().all(|&l| l == 2), "{levels:?}");
        // (300 ms, less what the last slice of 5 units added to the rate.)
        assert_eq!(search.report().unwrap().explore_cost_ms, 196);
    }

    #[test]
    fn a_superlinear_cost_goes_below_a_unit() {
        // A fixed part, a part per event and one growing with the square
        // of the slice: two units lose, a quarter unit wins.
        let cost = |e: i64| 160.0 + 0.1 * e as f64 + 1e-5 * (e as f64).powi(2);
        let (levels, total, search) = simulate(&months(&[16_000; 96]), cost);
        assert_eq!(&levels[..5], &[0, 1, -1, -2, -3], "{levels:?}");
        assert_eq!(search.best(), Some(-2), "{levels:?}");
        // Against walking every unit whole (what a fixed rule would do).
        let monthly = 96.0 * cost(16_000);
        assert!(total < 0.9 * monthly, "{total} vs {monthly}");
    }

    #[test]
    fn exploring_stops_within_its_budget() {
        let mut s = WidthSearch::new(&months(&[10_000; 100]), 1).unwrap();
        assert_eq!(step(&mut s, 10_000, 1_000), 0);
        assert_eq!(step(&mut s, 20_000, 8_000), 1);
        // Two units cost 6,000 ms beyond level 0's rate: more than 5 % of
        // the 100,000 ms walk; no further level is tried.
        assert!(s.explore_cost_ms() > EXPLORE_BUDGET * s.predicted_ms(0));
        assert_eq!(s.claim().level, 0);
        assert_eq!(s.claim().level, 0);
    }

    #[test]
    fn narrow_slices_that_are_not_trials_cost_no_budget() {
        let mut s = WidthSearch::new(&months(&[10_000; 100]), 1).unwrap();
        assert_eq!(step(&mut s, 10_000, 1_000), 0);
        assert_eq!(step(&mut s, 20_000, 1_800), 1);
        assert_eq!(step(&mut s, 40_000, 3_000), 2);
        assert_eq!(step(&mut s, 80_000, 6_400), 3);
        // Trials of 2 and 8 units beyond level 2's 0.075 ms per event.
        assert_eq!(s.explore_cost_ms().round(), 300.0 + 400.0);
        // Claimed at the best level, a slice comes out thin (a leftover):
        // it counts for the narrowest level, as data, not as trying.
        let claim = s.claim();
        assert_eq!((claim.level, claim.trial), (2, false));
        s.observe(claim, 1_250, ms(900));
        assert_eq!(s.levels[&-3].slices, 1);
        assert_eq!(s.explore_cost_ms().round(), 700.0);
    }

    #[test]
    fn a_trial_that_came_out_at_another_level_tried_nothing() {
        let mut s = WidthSearch::new(&months(&[10_000; 100]), 2).unwrap();
        let (a, b) = (s.claim(), s.claim());
        assert_eq!((a.level, a.trial, b.level, b.trial), (0, false, 1, true));
        // The first slice, at the base width, is data but no trial.
        s.observe(a, 10_000, ms(1_000));
        assert_eq!(s.explore_cost_ms(), 0.0);
        // Level 1's claim came out one unit wide (a probe took the unit it
        // was to join): it counts for level 0, costs no budget, and level
        // 1 is tried again by the next slice.
        s.observe(b, 10_000, ms(1_500));
        assert_eq!((s.levels[&0].slices, s.levels[&1].slices), (2, 0));
        assert_eq!(s.explore_cost_ms(), 0.0);
        let again = s.claim();
        assert_eq!((again.level, again.trial), (1, true));
        s.observe(again, 20_000, ms(3_000));
        // Beyond level 0's 0.125 ms per event now.
        assert_eq!(s.explore_cost_ms().round(), 500.0);
    }

    #[test]
    fn a_level_that_won_by_chance_loses_its_place() {
        let mut s = WidthSearch::new(&months(&[10_000; 100]), 2).unwrap();
        let (a, b) = (s.claim(), s.claim());
        assert_eq!((a.level, b.level), (0, 1));
        s.observe(a, 10_000, ms(1_000));
        s.observe(b, 20_000, ms(1_900));
        assert_eq!(s.best(), Some(1));
        assert_eq!(step(&mut s, 40_000, 4_400), 2);
        let again = s.claim();
        assert_eq!(again.level, 1);
        // Level 1's later slices are slower: level 0 is best again.
        s.observe(again, 20_000, ms(2_400));
        assert_eq!(s.best(), Some(0));
    }

    #[test]
    fn new_settings_start_over_and_old_ones_come_back() {
        let old = || "generic 64MB".to_string();
        let new = || "generic 4MB".to_string();
        let mut s = WidthSearch::new(&months(&[10_000; 100]), 2).unwrap();
        let (a, b) = (s.claim(), s.claim());
        s.observe(a, 10_000, ms(1_000));
        let running = s.claim();
        s.observe(b, 20_000, ms(2_400));
        let spent = s.explore_cost_ms();
        assert!(spent > 0.0);
        s.switch(old(), new());
        assert_eq!(s.best(), None);
        assert_eq!(s.explore_cost_ms(), spent);
        // A slice claimed before the switch is not measured.
        s.observe(running, 10_000, ms(1));
        assert_eq!(s.best(), None);
        assert_eq!(s.rate_near(10_000), None);
        // The trials start again at the base width.
        assert_eq!(step(&mut s, 10_000, 500), 0);
        assert_eq!(step(&mut s, 20_000, 600), 1);
        let spent = s.explore_cost_ms();
        // Back to the old settings: their levels apply again, with nothing
        // running and nothing to try twice; what was measured under the
        // new ones is filed, and the cost still counts.
        let running = s.claim();
        s.switch(new(), old());
        assert_eq!(s.best(), Some(0));
        assert_eq!(s.rate_near(9_000), Some(0.1));
        assert_eq!(s.rate_near(20_000), Some(0.12));
        assert_eq!(s.explore_cost_ms(), spent);
        s.observe(running, 40_000, ms(1));
        assert_eq!(s.rate_near(40_000), None);
        assert!(s.levels.values().all(|l| l.running == 0 && l.slices == 1));
        // Level 1 lost: the next slice tries narrower, not level 1 again.
        assert_eq!(s.claim().level, -1);
        s.switch(old(), new());
        assert_eq!(s.rate_near(20_000), Some(0.03));
    }

    #[test]
    fn levels_stay_within_one_slice_per_session_and_an_eighth_of_a_unit() {
        let s = WidthSearch::new(&months(&[10_000; 8]), 2).unwrap();
        assert_eq!((s.min_level, s.max_level), (-3, 2));
        // Small units are not cut below MIN_TARGET_EVENTS.
        let s = WidthSearch::new(&months(&[3_000; 8]), 2).unwrap();
        assert_eq!(s.min_level, -1);
        assert!(WidthSearch::new(&months(&[10_000; 2]), 1).is_none());
        assert!(WidthSearch::new(&months(&[0; 5]), 1).is_none());
    }

    #[test]
    fn take_joins_and_splits_units_around_the_target() {
        let all = months(&[10_000, 10_000, 10_000, 50_000, 1_000]);
        let mut pending: VecDeque<Piece> = all.iter().copied().collect();
        assert_eq!(count(&pending, 20_000.0), 4);
        let a = take(&mut pending, 20_000.0).unwrap();
        assert_eq!(a.events, 20_000);
        assert_eq!(
            (a.slice.from, a.slice.to),
            (all[0].slice.from, all[1].slice.to)
        );
        // 10k is half the target and the 50k month does not fit whole: the
        // slice takes the month's first fifth (of its time) to fill it.
        let b = take(&mut pending, 20_000.0).unwrap();
        let fifth = all[3].slice.to.duration_since(all[3].slice.from) / 5;
        assert_eq!(
            (b.events, b.slice.from, b.slice.to),
            (20_000, all[2].slice.from, all[3].slice.from + fifth)
        );
        // The 40k left is split in two…
        let c = take(&mut pending, 20_000.0).unwrap();
        assert_eq!((c.events, c.slice.from), (20_000, b.slice.to));
        // …and its second half takes the thin month after it (within 1.1x).
        let d = take(&mut pending, 20_000.0).unwrap();
        assert_eq!((d.events, d.slice.to), (21_000, all[4].slice.to));
        assert!(pending.is_empty());
        // A slice short by less than a quarter of its target stays as it is.
        let near = months(&[16_000, 10_000]);
        let mut pending: VecDeque<Piece> = near.iter().copied().collect();
        assert_eq!(take(&mut pending, 20_000.0).unwrap(), near[0]);
        assert_eq!(pending.len(), 1);
        // Pieces that are not adjacent (a probe took the one between) stay apart.
        let mut gap: VecDeque<Piece> = [all[0], all[2]].into_iter().collect();
        assert_eq!(take(&mut gap, 100_000.0).unwrap(), all[0]);
    }

    #[test]
    fn take_leaves_no_fragment_at_the_end_of_a_run() {
        // Filling the 10k slice to 20k from the 13k month would leave 3k of
        // it alone at the end of the run (the next piece is not adjacent):
        // the slice takes the whole month (23k, within 1.5 targets).
        let all = months(&[10_000, 13_000, 5_000, 5_000]);
        let mut pending: VecDeque<Piece> = [all[0], all[1], all[3]].into_iter().collect();
        let a = take(&mut pending, 20_000.0).unwrap();
        assert_eq!((a.events, a.slice.to), (23_000, all[1].slice.to));
        assert_eq!(pending.len(), 1);
        // With a month after it the 3k left joins the next slice: filled.
        let mut pending: VecDeque<Piece> = all.iter().copied().collect();
        assert_eq!(take(&mut pending, 20_000.0).unwrap().events, 20_000);
        assert_eq!(pending[0].events, 3_000);
        // And the whole month is not taken beyond 1.5 targets.
        let big = months(&[10_000, 19_000]);
        let mut pending: VecDeque<Piece> = big.iter().copied().collect();
        assert_eq!(take(&mut pending, 18_000.0).unwrap().events, 18_000);
        assert_eq!(pending[0].events, 11_000);
        // A thin unit that does not fit within 1.1 targets, last of its
        // run, joins the slice before it rather than run alone.
        let thin = months(&[11_440, 3_875]);
        let mut pending: VecDeque<Piece> = thin.iter().copied().collect();
        assert_eq!(take(&mut pending, 13_000.0).unwrap().events, 15_315);
        assert!(pending.is_empty());
        // Not when another unit follows it: it starts the next slice.
        let mut pending: VecDeque<Piece> = months(&[11_440, 3_875, 9_000]).into();
        assert_eq!(take(&mut pending, 13_000.0).unwrap().events, 11_440);
    }

    #[test]
    fn a_probe_kept_measures_its_width_and_the_walk_tries_wider_at_once() {
        let mut s = WidthSearch::new(&months(&[10_000; 24]), 2).unwrap();
        // The probe that won ran two months, under the settings in force.
        s.record(20_000, Duration::from_millis(1_600));
        assert_eq!(s.best(), Some(1));
        assert_eq!(s.explore_cost_ms(), 0.0);
        // The first claim tries four months, not one.
        let c = s.claim();
        assert_eq!((c.level, c.trial), (2, true));
        // The other session, while it runs, stays at the probes' width: a
        // narrower level waits until the wider one has lost.
        assert_eq!(s.claim().level, 1);
        s.observe(c, 40_000, Duration::from_millis(2_400));
        assert_eq!(s.best(), Some(2));
    }

    #[test]
    fn a_width_held_for_a_review_is_no_trial_and_spends_nothing() {
        let mut s = WidthSearch::new(&months(&[10_000; 24]), 2).unwrap();
        s.record(10_000, Duration::from_millis(800));
        // The search would try two months; the review holds one.
        for _ in 0..3 {
            let c = s.claim_near(9_500);
            assert_eq!((c.level, c.trial), (0, false));
            s.observe(c, 10_000, Duration::from_millis(900));
        }
        assert_eq!(s.explore_cost_ms(), 0.0);
        // Afterwards the search goes on where it was.
        assert_eq!(s.claim().level, 1);
    }
}
