//! Slice widths: where the calendar months of the reference are kept,
//! merged or split. Pure, so every rule is a plain `#[test]`.
//!
//! What the measurements say (fixture and upstream, `docs/performance.md`):
//! under hash plans a window call costs a fixed part that grows with the
//! whole history (it scans task_usage and agent_task_queue) plus a part per
//! dirty key. Narrow slices multiply the fixed part (upstream even 200k:
//! weekly 3x, daily 15x slower than monthly); on our 3M-row history a month
//! took 48 s, two half months 46 s and four weeks 56 s, so below a month
//! splitting saves nothing; one window over everything loses again
//! (upstream 3M: 2.2x slower). Hence:
//!
//! 1. By counts (before the walk, deterministic): calendar months; a month
//!    with fewer than a quarter of the median month's events is merged into
//!    its neighbour (its cost is mostly the fixed part), as long as the
//!    merged slice stays within a median month; a month with more than 3x
//!    the median (and at least [`SPLIT_MIN_EVENTS`]) is split into
//!    median-sized parts, so one outsized month does not keep every other
//!    worker idle; and while there are fewer slices than workers, the
//!    largest slice of at least [`SPLIT_MIN_EVENTS`] is halved. These are
//!    the walk's units; with tuned (hash) plans and no cap, how many units
//!    one slice takes is chosen during the walk by measurement
//!    (`super::width`).
//! 2. By measured times (during the walk, only with a cap on a single
//!    transaction's duration): from the slices already committed, a model
//!    `time = fixed + per_event x events` predicts the pending slices;
//!    those predicted above the cap are split, adjacent ones predicted
//!    together below half the cap are merged. The first slice is cut to an
//!    eighth of its width, so the first measurement comes before any
//!    transaction can overrun the cap by much.
//!
//! One session with the server's planner settings (`parallelism 1`,
//! `tuning off`) is the reference's walk and keeps its calendar months.
//!
//! The slice that reaches the present (and drains the dirty queue) is never
//! resized: it is not part of what these functions see.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use serde::Serialize;

use super::plan::Slice;

/// A slice with its estimated number of events (rows whose
/// `COALESCE(updated_at, created_at)` falls in it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub(crate) struct Piece {
    pub slice: Slice,
    pub events: i64,
}

/// A month below this share of the median month is cheap (merged).
pub(crate) const MERGE_BELOW: f64 = 0.25;
/// A month above this multiple of the median month is outsized (split).
pub(crate) const SPLIT_ABOVE: f64 = 3.0;
/// Count-based splits leave smaller slices alone: their cost is mostly the
/// fixed part, which splitting multiplies.
pub(crate) const SPLIT_MIN_EVENTS: i64 = 20_000;
/// No slice is made narrower than this.
pub(crate) const MIN_WIDTH: SignedDuration = SignedDuration::from_hours(1);
/// Upper bound of parts one slice is split into at a time.
pub(crate) const MAX_PARTS: i64 = 64;
/// The first slice is cut into this many parts when a cap is set.
pub(crate) const PROBE_PARTS: i64 = 8;

/// Step 1: widths from counts. `pieces` are contiguous calendar months.
/// `hash_plans`: the sessions run with nested loops off (tuned); under the
/// server's nested loops with one session the months stay as they are.
pub(crate) fn by_counts(pieces: Vec<Piece>, workers: usize, hash_plans: bool) -> Vec<Piece> {
    // One session under the server's plans is the reference's own walk, and
    // walks its calendar months: a split gains no second worker, and under
    // nested loops a call's fixed part is too small for a merge to pay. This
    // keeps `parallelism 1, tuning off` comparable to the reference, slice
    // for slice (measured within 2 %).
    if workers == 1 && !hash_plans {
        return pieces;
    }
    let mut out = pieces;
    if out.len() >= 3 {
        let median = median(out.iter().map(|p| p.events)).max(1);
        out = merge_cheap(out, median);
        out = split_outsized(out, median);
    }
    balance(out, workers)
}

fn merge_cheap(pieces: Vec<Piece>, median: i64) -> Vec<Piece> {
    let cheap = |e: i64| (e as f64) < MERGE_BELOW * median as f64;
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        match out.last_mut() {
            Some(last)
                if (cheap(p.events) || cheap(last.events)) && last.events + p.events <= median =>
            {
                *last = join(*last, p);
            }
            _ => out.push(p),
        }
    }
    out
}

fn split_outsized(pieces: Vec<Piece>, median: i64) -> Vec<Piece> {
    pieces
        .into_iter()
        .flat_map(|p| {
            if p.events >= SPLIT_MIN_EVENTS && p.events as f64 > SPLIT_ABOVE * median as f64 {
                let parts = (p.events + median - 1) / median;
                split_even(p, parts)
            } else {
                vec![p]
            }
        })
        .collect()
}

/// Halves the largest slice while there are fewer slices than workers.
fn balance(mut pieces: Vec<Piece>, workers: usize) -> Vec<Piece> {
    while pieces.len() < workers {
        let Some((i, _)) = pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.events >= SPLIT_MIN_EVENTS && max_parts(p) >= 2)
            .max_by_key(|(_, p)| p.events)
        else {
            break;
        };
        let halves = split_even(pieces[i], 2);
        pieces.splice(i..=i, halves);
    }
    pieces
}

/// Two adjacent pieces as one.
pub(crate) fn join(a: Piece, b: Piece) -> Piece {
    debug_assert_eq!(a.slice.to, b.slice.from, "only adjacent pieces join");
    Piece {
        slice: Slice {
            from: a.slice.from,
            to: b.slice.to,
        },
        events: a.events + b.events,
    }
}

/// How many parts of at least [`MIN_WIDTH`] a piece can be cut into.
fn max_parts(p: &Piece) -> i64 {
    let width = p.slice.to.duration_since(p.slice.from);
    (width.as_secs() / MIN_WIDTH.as_secs()).clamp(1, MAX_PARTS)
}

/// `p` cut into `parts` slices of equal width (boundaries on whole
/// seconds, never narrower than [`MIN_WIDTH`]), the events shared out in
/// proportion (their sum is kept).
pub(crate) fn split_even(p: Piece, parts: i64) -> Vec<Piece> {
    let parts = parts.clamp(1, max_parts(&p));
    if parts == 1 {
        return vec![p];
    }
    let width = p.slice.to.duration_since(p.slice.from).as_secs() / parts;
    let mut out = Vec::with_capacity(parts as usize);
    let mut from = p.slice.from;
    let mut given = 0;
    for i in 0..parts {
        let to = if i + 1 == parts {
            p.slice.to
        } else {
            from + SignedDuration::from_secs(width)
        };
        let events = p.events * (i + 1) / parts - given;
        given += events;
        out.push(Piece {
            slice: Slice { from, to },
            events,
        });
        from = to;
    }
    out
}

/// `p` cut in two at about `events` events from its start (the time in
/// proportion, on a whole second): the head and the rest. None when the
/// cut would leave either part narrower than [`MIN_WIDTH`] or without
/// events.
pub(crate) fn split_head(p: Piece, events: i64) -> Option<(Piece, Piece)> {
    if events <= 0 || events >= p.events {
        return None;
    }
    let width = p.slice.to.duration_since(p.slice.from).as_secs();
    let secs = (i128::from(width) * i128::from(events) / i128::from(p.events)) as i64;
    let min = MIN_WIDTH.as_secs();
    if secs < min || width - secs < min {
        return None;
    }
    let cut = p.slice.from + SignedDuration::from_secs(secs);
    Some((
        Piece {
            slice: Slice {
                from: p.slice.from,
                to: cut,
            },
            events,
        },
        Piece {
            slice: Slice {
                from: cut,
                to: p.slice.to,
            },
            events: p.events - events,
        },
    ))
}

/// With a cap: the first piece cut into [`PROBE_PARTS`], so the first
/// measurement is cheap.
pub(crate) fn probe_first(mut pieces: Vec<Piece>) -> Vec<Piece> {
    if let Some(first) = pieces.first().copied() {
        let parts = split_even(first, PROBE_PARTS);
        pieces.splice(0..1, parts);
    }
    pieces
}

/// The measured cost of committed slices.
#[derive(Debug, Clone, Default)]
pub(crate) struct Model {
    /// (events, milliseconds), the most recent last.
    observed: Vec<(f64, f64)>,
}

/// Observations kept for the fit.
const MODEL_WINDOW: usize = 16;

impl Model {
    pub(crate) fn observe(&mut self, events: i64, elapsed: Duration) {
        if self.observed.len() == MODEL_WINDOW {
            self.observed.remove(0);
        }
        self.observed
            .push((events.max(0) as f64, elapsed.as_secs_f64() * 1000.0));
    }

    /// (fixed ms per slice, ms per event). With slices of one size only,
    /// the fixed part cannot be told apart and counts as zero.
    pub(crate) fn fit(&self) -> Option<(f64, f64)> {
        let n = self.observed.len() as f64;
        if n == 0.0 {
            return None;
        }
        let (min_e, max_e) = self
            .observed
            .iter()
            .fold((f64::MAX, 0f64), |(lo, hi), (e, _)| {
                (lo.min(*e), hi.max(*e))
            });
        let min_t = self
            .observed
            .iter()
            .map(|(_, t)| *t)
            .fold(f64::MAX, f64::min);
        let mean_e = self.observed.iter().map(|(e, _)| e).sum::<f64>() / n;
        let mean_t = self.observed.iter().map(|(_, t)| t).sum::<f64>() / n;
        if self.observed.len() >= 2 && max_e >= 1.5 * min_e.max(1.0) {
            let cov: f64 = self
                .observed
                .iter()
                .map(|(e, t)| (e - mean_e) * (t - mean_t))
                .sum();
            let var: f64 = self
                .observed
                .iter()
                .map(|(e, _)| (e - mean_e).powi(2))
                .sum();
            let per_event = (cov / var).max(0.0);
            let fixed = (mean_t - per_event * mean_e).clamp(0.0, min_t);
            if per_event > 0.0 {
                return Some((fixed, per_event));
            }
        }
        let total_e: f64 = self.observed.iter().map(|(e, _)| e).sum();
        if total_e <= 0.0 {
            return Some((mean_t, 0.0));
        }
        Some((
            0.0,
            self.observed.iter().map(|(_, t)| t).sum::<f64>() / total_e,
        ))
    }

    #[cfg(test)]
    pub(crate) fn predict_ms(&self, events: i64) -> Option<f64> {
        self.fit()
            .map(|(fixed, per_event)| fixed + per_event * events.max(0) as f64)
    }
}

/// Step 2: with a cap, split pending pieces predicted above it and merge
/// adjacent ones predicted together below half of it.
pub(crate) fn fit_cap(pending: Vec<Piece>, model: &Model, cap: Duration) -> Vec<Piece> {
    let Some((fixed, per_event)) = model.fit() else {
        return pending;
    };
    let cap_ms = cap.as_secs_f64() * 1000.0;
    let predict = |e: i64| fixed + per_event * e as f64;
    // Aim below the cap: estimates are proportional within a month.
    let aim = 0.8 * cap_ms - fixed;
    let split: Vec<Piece> = pending
        .into_iter()
        .flat_map(|p| {
            if predict(p.events) > cap_ms && per_event > 0.0 && aim > 0.0 {
                let parts = (per_event * p.events as f64 / aim).ceil() as i64;
                split_even(p, parts)
            } else {
                vec![p]
            }
        })
        .collect();
    let mut out: Vec<Piece> = Vec::with_capacity(split.len());
    for p in split {
        match out.last_mut() {
            Some(last) if predict(last.events + p.events) <= cap_ms / 2.0 => *last = join(*last, p),
            _ => out.push(p),
        }
    }
    out
}

/// The distribution of slice times of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SliceStats {
    pub slices: u64,
    pub median_ms: u64,
    pub max_ms: u64,
    pub total_ms: u64,
}

pub fn stats(durations_ms: &[u64]) -> Option<SliceStats> {
    if durations_ms.is_empty() {
        return None;
    }
    let mut sorted = durations_ms.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    let median_ms = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2
    };
    Some(SliceStats {
        slices: n as u64,
        median_ms,
        max_ms: sorted[n - 1],
        total_ms: sorted.iter().sum(),
    })
}

pub(crate) fn median(values: impl Iterator<Item = i64>) -> i64 {
    let mut v: Vec<i64> = values.collect();
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

/// A piece's events from per-month counts: the events of the months that
/// start inside it.
pub(crate) fn events_from_months(slice: &Slice, months: &[(Timestamp, i64)]) -> i64 {
    months
        .iter()
        .filter(|(m, _)| *m >= slice.from && *m < slice.to)
        .map(|(_, n)| n)
        .sum()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::plan::add_months;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// Consecutive calendar months from January 2026 with these counts.
    pub(crate) fn months(counts: &[i64]) -> Vec<Piece> {
        let start = ts("2026-01-01T00:00:00Z");
        counts
            .iter()
            .enumerate()
            .map(|(i, &events)| Piece {
                slice: Slice {
                    from: add_months(start, i as i64),
                    to: add_months(start, i as i64 + 1),
                },
                events,
            })
            .collect()
    }

    fn contiguous(pieces: &[Piece]) {
        for w in pieces.windows(2) {
            assert_eq!(w[0].slice.to, w[1].slice.from, "{pieces:?}");
        }
    }

    fn counts(pieces: &[Piece]) -> Vec<i64> {
        pieces.iter().map(|p| p.events).collect()
    }

    #[test]
    fn an_even_history_keeps_its_months() {
        let m = months(&[33_000, 34_000, 32_000, 33_500, 33_000, 34_000]);
        assert_eq!(by_counts(m.clone(), 2, true), m);
        let small = months(&[150, 140, 160, 155]);
        assert_eq!(by_counts(small.clone(), 2, true), small);
    }

    #[test]
    fn cheap_months_merge_up_to_a_median_month() {
        // A thin start (100, 200, 300 events) before the real history.
        let m = months(&[100, 200, 300, 10_000, 10_000, 10_000, 10_000]);
        let got = by_counts(m.clone(), 1, true);
        contiguous(&got);
        assert_eq!(counts(&got), vec![600, 10_000, 10_000, 10_000, 10_000]);
        assert_eq!(got[0].slice.from, m[0].slice.from);
        assert_eq!(got[0].slice.to, m[3].slice.from);
        // A quiet month in the middle joins its (normal) predecessor only
        // while the result stays within a median month.
        let m = months(&[9_000, 500, 10_000, 10_000, 10_000]);
        assert_eq!(
            counts(&by_counts(m, 1, true)),
            vec![9_500, 10_000, 10_000, 10_000]
        );
    }

    #[test]
    fn thin_even_months_stay_units_for_the_width_search() {
        // How many months a slice takes is measured during the walk
        // (`width`), not fixed here.
        let m = months(&[7_700; 26]);
        assert_eq!(by_counts(m.clone(), 2, true), m);
        assert_eq!(by_counts(m.clone(), 2, false), m);
    }

    #[test]
    fn one_untuned_session_walks_the_reference_months() {
        // Thin, outsized and growing months alike stay calendar months.
        for m in [
            vec![100, 200, 300, 10_000, 10_000, 10_000, 10_000],
            vec![30_000, 30_000, 150_000, 30_000, 30_000],
            vec![7_700; 26],
        ] {
            let m = months(&m);
            assert_eq!(by_counts(m.clone(), 1, false), m);
        }
        // Tuned, the thin months merge and the outsized one splits.
        let m = months(&[100, 200, 300, 10_000, 10_000, 10_000, 10_000]);
        assert_ne!(by_counts(m.clone(), 1, true), m);
        let m = months(&[30_000, 30_000, 150_000, 30_000, 30_000]);
        assert_ne!(by_counts(m.clone(), 1, true), m);
    }

    #[test]
    fn outsized_months_split_into_median_parts() {
        let m = months(&[30_000, 30_000, 150_000, 30_000, 30_000]);
        let got = by_counts(m.clone(), 2, true);
        contiguous(&got);
        assert_eq!(got.len(), 9);
        assert_eq!(counts(&got)[2..7], [30_000; 5]);
        assert_eq!(got.iter().map(|p| p.events).sum::<i64>(), 270_000);
        assert_eq!(got[2].slice.from, m[2].slice.from);
        assert_eq!(got[6].slice.to, m[2].slice.to);
        // Small histories are never split: their cost is the fixed part.
        let m = months(&[1_000, 1_000, 9_000, 1_000]);
        assert_eq!(by_counts(m.clone(), 2, true), m);
    }

    #[test]
    fn fewer_slices_than_workers_halves_the_largest() {
        let m = months(&[100_000]);
        let got = by_counts(m.clone(), 4, true);
        contiguous(&got);
        assert_eq!(counts(&got), vec![25_000; 4]);
        let tiny = months(&[500]);
        assert_eq!(by_counts(tiny.clone(), 4, true), tiny);
    }

    #[test]
    fn splits_keep_the_sum_and_whole_seconds() {
        let p = months(&[7])[0];
        let parts = split_even(p, 3);
        assert_eq!(counts(&parts), vec![2, 2, 3]);
        contiguous(&parts);
        assert_eq!(parts[2].slice.to, p.slice.to);
        for part in &parts {
            assert_eq!(part.slice.from.subsec_nanosecond(), 0);
        }
        // Never narrower than an hour.
        let hour = Piece {
            slice: Slice {
                from: ts("2026-01-01T00:00:00Z"),
                to: ts("2026-01-01T01:30:00Z"),
            },
            events: 10,
        };
        assert_eq!(split_even(hour, 4), vec![hour]);
        // A head of a given number of events: the time in proportion.
        let (head, rest) = split_head(months(&[1_000])[0], 250).unwrap();
        assert_eq!((head.events, rest.events), (250, 750));
        contiguous(&[head, rest]);
        assert_eq!(head.slice.from.subsec_nanosecond(), 0);
        let p = months(&[1_000])[0];
        let quarter = p.slice.to.duration_since(p.slice.from) / 4;
        assert_eq!(head.slice.to, p.slice.from + quarter);
        // Nothing to cut: all or none of the events, or under an hour.
        assert_eq!(split_head(p, 1_000), None);
        assert_eq!(split_head(p, 0), None);
        assert_eq!(split_head(hour, 5), None);
    }

    #[test]
    fn the_model_separates_fixed_and_per_event_cost() {
        let mut m = Model::default();
        assert_eq!(m.fit(), None);
        m.observe(1000, Duration::from_millis(300));
        // One size only: all of it per event.
        let (fixed, per_event) = m.fit().unwrap();
        assert_eq!(fixed, 0.0);
        assert!((per_event - 0.3).abs() < 1e-9);
        m.observe(3000, Duration::from_millis(500));
        let (fixed, per_event) = m.fit().unwrap();
        assert!((fixed - 200.0).abs() < 1e-6, "{fixed}");
        assert!((per_event - 0.1).abs() < 1e-9, "{per_event}");
        assert!((m.predict_ms(10_000).unwrap() - 1200.0).abs() < 1e-6);
    }

    #[test]
    fn a_cap_splits_expensive_and_merges_cheap_pending_slices() {
        let mut model = Model::default();
        // 1 ms per event, no fixed part.
        model.observe(1000, Duration::from_secs(1));
        let pending = months(&[10_000, 200, 200, 200, 1_000]);
        let got = fit_cap(pending.clone(), &model, Duration::from_secs(4));
        contiguous(&got);
        assert_eq!(got.first().unwrap().slice.from, pending[0].slice.from);
        assert_eq!(got.last().unwrap().slice.to, pending[4].slice.to);
        // 10k events = 10 s: split into parts aimed at 0.8 x 4 s.
        assert_eq!(counts(&got[..4]), vec![2500; 4]);
        // 200 + 200 + 200 + 1000 = 1.6 s <= 2 s: merged.
        assert_eq!(counts(&got[4..]), vec![1600]);
        // A fixed cost above the cap: splitting cannot help, nothing splits.
        let mut slow = Model::default();
        slow.observe(10, Duration::from_secs(5));
        slow.observe(1000, Duration::from_millis(5100));
        let pending = months(&[1000, 1000]);
        assert_eq!(
            fit_cap(pending.clone(), &slow, Duration::from_secs(4)),
            pending
        );
    }

    #[test]
    fn the_first_slice_is_probed_in_eighths() {
        let m = months(&[8000, 8000]);
        let got = probe_first(m.clone());
        assert_eq!(got.len(), 9);
        assert_eq!(got[0].events, 1000);
        assert_eq!(got[8], m[1]);
        contiguous(&got);
    }

    #[test]
    fn stats_report_median_and_max() {
        assert_eq!(stats(&[]), None);
        let s = stats(&[30, 10, 20]).unwrap();
        assert_eq!(
            (s.slices, s.median_ms, s.max_ms, s.total_ms),
            (3, 20, 30, 60)
        );
        assert_eq!(stats(&[10, 20, 30, 40]).unwrap().median_ms, 25);
    }

    #[test]
    fn piece_events_come_from_month_counts() {
        let m = vec![
            (ts("2026-01-01T00:00:00Z"), 5),
            (ts("2026-02-01T00:00:00Z"), 7),
            (ts("2026-03-01T00:00:00Z"), 11),
        ];
        let s = Slice {
            from: ts("2026-01-01T00:00:00Z"),
            to: ts("2026-03-01T00:00:00Z"),
        };
        assert_eq!(events_from_months(&s, &m), 12);
    }
}
