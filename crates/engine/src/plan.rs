//! The pure middle of the engine: given what the database reported, decide
//! whether to walk and which UTC slices to walk. No I/O here, so every
//! reference branch is a plain `#[test]`.

use std::time::Duration;

use jiff::tz::TimeZone;
use jiff::{SignedDuration, Timestamp, ToSpan};
use serde::Serialize;

use super::{DatabaseIdentity, Error, Mode, Resume, SkipReason};

/// How far behind the database clock a walk ends and its stamp puts the
/// watermark: the reference's stamp (`now() - interval '5 minutes'`) and
/// the periodic tick's own margin.
pub(crate) const STAMP_OFFSET: Duration = Duration::from_secs(5 * 60);

/// The migration guard's own tolerance: it refuses while the watermark is
/// more than one hour behind the newest event.
pub(crate) const GUARD_TOLERANCE: Duration = Duration::from_secs(3600);

/// One window `[from, to)` of the walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Slice {
    pub from: Timestamp,
    pub to: Timestamp,
}

/// What the database says before a walk: read in one round trip.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Snapshot {
    /// Whether `task_usage_hourly_rollup_state` exists.
    pub state_table: bool,
    /// Earliest of MIN(created_at) and MIN(updated_at) (early updates).
    pub min_event: Option<Timestamp>,
    /// MAX(COALESCE(updated_at, created_at)).
    pub max_event: Option<Timestamp>,
    /// watermark_at of row 1; None when NULL or the row is missing.
    pub watermark: Option<Timestamp>,
    /// The database's now().
    pub now: Timestamp,
}

/// The instant a walk decided on `now` (the database clock, read once,
/// under the lock) ends at, and the watermark its stamp names:
/// [`STAMP_OFFSET`] before `now`. No window of the walk ends later, so a
/// write committed while the walk runs (its updated_at and enqueued_at are
/// the time its transaction began) is either seen by the walk or left,
/// queued or after the watermark, for the application's next tick; only a
/// transaction open for five minutes escapes, as it does the tick (the
/// last-slice drain).
pub(crate) fn walk_end(now: Timestamp) -> Timestamp {
    now.checked_sub(SignedDuration::try_from(STAMP_OFFSET).unwrap())
        .unwrap_or(now)
}

impl Snapshot {
    /// max_event - watermark, when both exist.
    pub(crate) fn lag(&self) -> Option<SignedDuration> {
        Some(self.max_event?.duration_since(self.watermark?))
    }

    /// Events later than this instant cannot be covered by a stamp made now
    /// while keeping the lag within `threshold` (future-dated events).
    pub(crate) fn future_horizon(&self, threshold: Duration) -> Timestamp {
        let threshold = SignedDuration::try_from(threshold).unwrap_or(SignedDuration::MAX);
        walk_end(self.now)
            .checked_add(threshold)
            .unwrap_or(Timestamp::MAX)
    }
}

/// What to do after looking at a [`Snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Decision {
    /// Do not walk the history. When `stamp` is set, stamp the watermark,
    /// under the lock, after rolling up the window from the watermark to
    /// the stamp (a stamp must never pass an event not rolled up).
    Skip { reason: SkipReason, stamp: bool },
    /// Walk from this instant (month-aligned) to the newest event.
    Walk { from: Timestamp },
}

/// The migration-time hook (`IfLagging`): reference steps 1-5, in order.
pub(crate) fn decide_if_lagging(snap: &Snapshot, threshold: Duration) -> Result<Decision, Error> {
    if !snap.state_table {
        return Ok(Decision::Skip {
            reason: SkipReason::RollupStateMissing,
            stamp: false,
        });
    }
    let (Some(min_event), Some(_)) = (snap.min_event, snap.max_event) else {
        return Ok(Decision::Skip {
            reason: SkipReason::TaskUsageEmpty,
            stamp: true,
        });
    };
    let lag = snap.lag().ok_or(Error::WatermarkMissing)?;
    if lag <= SignedDuration::try_from(threshold).unwrap_or(SignedDuration::MAX) {
        return Ok(Decision::Skip {
            reason: SkipReason::WatermarkWithinThreshold,
            stamp: true,
        });
    }
    Ok(Decision::Walk {
        from: month_floor(min_event),
    })
}

/// The operator command (`Always`): no lag check; months-back may move the
/// start later, which abandons older buckets, hence the refusal.
pub(crate) fn decide_always(
    snap: &Snapshot,
    months_back: u32,
    force_partial: bool,
) -> Result<Decision, Error> {
    if !snap.state_table {
        return Err(Error::RollupStateMissing);
    }
    let Some(min_event) = snap.min_event else {
        return Ok(Decision::Skip {
            reason: SkipReason::TaskUsageEmpty,
            stamp: true,
        });
    };
    let history_from = month_floor(min_event);
    if months_back == 0 {
        return Ok(Decision::Walk { from: history_from });
    }
    let start = add_months(month_floor(snap.now), -i64::from(months_back));
    if start <= history_from {
        return Ok(Decision::Walk { from: history_from });
    }
    if !force_partial {
        return Err(Error::MonthsBackSkipsHistory {
            months_back,
            start,
            earliest: min_event,
        });
    }
    Ok(Decision::Walk { from: start })
}

/// Dispatches on the mode.
pub(crate) fn decide(snap: &Snapshot, mode: &Mode) -> Result<Decision, Error> {
    match *mode {
        Mode::IfLagging { lag_threshold } => decide_if_lagging(snap, lag_threshold),
        Mode::Always {
            months_back,
            force_partial,
        } => decide_always(snap, months_back, force_partial),
    }
}

/// The slices of a walk ending at `end` ([`walk_end`]): UTC calendar months
/// from `from` through the month of the newest event, the last one cut at
/// `end`; when history ends in an earlier month, one tail window from there
/// to `end`, so the dirty queue is drained up to `end` however old the
/// newest event is (the stranded queue). Nothing ends after `end`: the window function
/// drains the queue in a statement after its recompute, so a window ending
/// in the future (the reference's last slice ends with the current month)
/// drains the entries of writes committed while it recomputes without
/// recomputing them (the last-slice drain). Events after `end` (the last five minutes,
/// rows dated ahead of the clock) stay after the stamped watermark, for the
/// application's tick.
pub(crate) fn slices(from: Timestamp, max_event: Timestamp, end: Timestamp) -> Vec<Slice> {
    let history_end = add_months(month_floor(max_event), 1).min(end);
    let mut out = Vec::new();
    let mut cursor = from;
    while cursor < history_end {
        let next = add_months(month_floor(cursor), 1).min(history_end);
        out.push(Slice {
            from: cursor,
            to: next,
        });
        cursor = next;
    }
    if cursor < end {
        out.push(Slice {
            from: cursor,
            to: end,
        });
    }
    out
}

/// Why `resume` does not belong to the walk from `from` on `database`:
/// None when it does. Its cursor says which slices of *its* walk were
/// committed; a walk starting elsewhere has other slices (an older event
/// moved the start back, or another monthsBack), and another database
/// never had them.
pub(crate) fn resume_mismatch(
    resume: &Resume,
    from: Timestamp,
    database: &DatabaseIdentity,
) -> Option<String> {
    if resume.from != from {
        return Some(format!(
            "it belongs to a walk from {}, this walk starts at {from}",
            resume.from
        ));
    }
    match &resume.database {
        Some(theirs) if theirs != database => Some(format!(
            "it was written on another database ({}), this session is on {}",
            describe_identity(theirs),
            describe_identity(database)
        )),
        _ => None,
    }
}

/// `system <id>, timeline <n>, database oid <oid>`, for messages.
pub(crate) fn describe_identity(d: &DatabaseIdentity) -> String {
    let unknown = || "?".to_owned();
    format!(
        "system {}, timeline {}, database oid {}",
        d.system_identifier.map_or_else(unknown, |s| s.to_string()),
        d.timeline.map_or_else(unknown, |t| t.to_string()),
        d.database_oid
    )
}

/// Drops what a previous attempt already committed: slices ending at or
/// before the cursor go, a slice containing it starts at it.
pub(crate) fn resume_slices(all: Vec<Slice>, resume: Option<&Resume>) -> Vec<Slice> {
    let Some(resume) = resume else { return all };
    all.into_iter()
        .filter(|s| s.to > resume.cursor)
        .map(|s| Slice {
            from: s.from.max(resume.cursor),
            to: s.to,
        })
        .collect()
}

/// Start of the UTC calendar month holding `ts`.
pub fn month_floor(ts: Timestamp) -> Timestamp {
    let date = ts.to_zoned(TimeZone::UTC).date().first_of_month();
    date.to_zoned(TimeZone::UTC)
        .expect("the first of a month at midnight exists in UTC")
        .timestamp()
}

/// `ts` moved by whole UTC calendar months.
pub fn add_months(ts: Timestamp, months: i64) -> Timestamp {
    ts.to_zoned(TimeZone::UTC)
        .checked_add(months.months())
        .expect("month arithmetic stays within jiff's range for database times")
        .timestamp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn snap() -> Snapshot {
        Snapshot {
            state_table: true,
            min_event: Some(ts("2026-01-15T10:00:00Z")),
            max_event: Some(ts("2026-03-02T00:00:00Z")),
            watermark: Some(ts("2026-03-01T00:00:00Z")),
            now: ts("2026-06-10T12:00:00Z"),
        }
    }

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn if_lagging_branches_in_reference_order() {
        let mut s = snap();
        s.state_table = false;
        assert_eq!(
            decide_if_lagging(&s, HOUR).unwrap(),
            Decision::Skip {
                reason: SkipReason::RollupStateMissing,
                stamp: false
            }
        );
        let mut s = snap();
        s.min_event = None;
        s.max_event = None;
        s.watermark = None; // empty wins over a missing watermark, as in the reference
        assert_eq!(
            decide_if_lagging(&s, HOUR).unwrap(),
            Decision::Skip {
                reason: SkipReason::TaskUsageEmpty,
                stamp: true
            }
        );
        let mut s = snap();
        s.watermark = None;
        assert!(matches!(
            decide_if_lagging(&s, HOUR),
            Err(Error::WatermarkMissing)
        ));
        assert_eq!(
            decide_if_lagging(&snap(), HOUR).unwrap(),
            Decision::Walk {
                from: ts("2026-01-01T00:00:00Z")
            }
        );
    }

    #[test]
    fn lag_threshold_boundary_is_inclusive() {
        let mut s = snap();
        s.watermark = Some(ts("2026-03-01T23:00:00Z")); // lag exactly 1h
        assert_eq!(
            decide_if_lagging(&s, HOUR).unwrap(),
            Decision::Skip {
                reason: SkipReason::WatermarkWithinThreshold,
                stamp: true
            }
        );
        s.watermark = Some(ts("2026-03-01T22:59:59.999999Z")); // 1h + 1µs
        assert!(matches!(
            decide_if_lagging(&s, HOUR).unwrap(),
            Decision::Walk { .. }
        ));
    }

    #[test]
    fn always_ignores_lag_and_applies_months_back_rule() {
        let mut s = snap();
        s.watermark = Some(ts("2026-03-02T00:00:00Z"));
        assert_eq!(
            decide_always(&s, 0, false).unwrap(),
            Decision::Walk {
                from: ts("2026-01-01T00:00:00Z")
            }
        );
        // now is June: 6 months back is December, before history: allowed.
        assert_eq!(
            decide_always(&s, 6, false).unwrap(),
            Decision::Walk {
                from: ts("2026-01-01T00:00:00Z")
            }
        );
        // 5 months back is January: the history's own month: allowed.
        assert_eq!(
            decide_always(&s, 5, false).unwrap(),
            Decision::Walk {
                from: ts("2026-01-01T00:00:00Z")
            }
        );
        // 4 months back is February: skips January: refused unless forced.
        let e = decide_always(&s, 4, false).unwrap_err();
        assert!(matches!(e, Error::MonthsBackSkipsHistory { .. }), "{e}");
        assert!(e.to_string().contains("force"), "{e}");
        assert_eq!(
            decide_always(&s, 4, true).unwrap(),
            Decision::Walk {
                from: ts("2026-02-01T00:00:00Z")
            }
        );
        let mut s = snap();
        s.state_table = false;
        assert!(matches!(
            decide_always(&s, 0, false),
            Err(Error::RollupStateMissing)
        ));
        let mut s = snap();
        s.min_event = None;
        s.max_event = None;
        assert_eq!(
            decide_always(&s, 0, false).unwrap(),
            Decision::Skip {
                reason: SkipReason::TaskUsageEmpty,
                stamp: true
            }
        );
    }

    #[test]
    fn slices_are_utc_months_plus_a_tail_to_the_walk_end() {
        let got = slices(
            ts("2026-01-01T00:00:00Z"),
            ts("2026-03-02T00:00:00Z"),
            walk_end(ts("2026-06-10T12:00:00Z")),
        );
        let want: Vec<_> = [
            ("2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z"),
            ("2026-02-01T00:00:00Z", "2026-03-01T00:00:00Z"),
            ("2026-03-01T00:00:00Z", "2026-04-01T00:00:00Z"),
            ("2026-04-01T00:00:00Z", "2026-06-10T11:55:00Z"),
        ]
        .iter()
        .map(|(a, b)| Slice {
            from: ts(a),
            to: ts(b),
        })
        .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn the_last_slice_ends_at_the_walk_end_even_with_newer_events() {
        let end = walk_end(ts("2026-06-10T12:00:00Z"));
        assert_eq!(end, ts("2026-06-10T11:55:00Z"));
        // Events of the last five minutes, and of the future, are left after
        // the watermark: no window ends after `end`.
        for max_event in ["2026-06-10T11:58:00Z", "2026-08-03T00:00:00Z"] {
            let got = slices(ts("2026-05-01T00:00:00Z"), ts(max_event), end);
            assert_eq!(
                got,
                vec![
                    Slice {
                        from: ts("2026-05-01T00:00:00Z"),
                        to: ts("2026-06-01T00:00:00Z")
                    },
                    Slice {
                        from: ts("2026-06-01T00:00:00Z"),
                        to: end
                    },
                ],
                "{max_event}"
            );
        }
        // History of the last five minutes of a new month: nothing to walk
        // before the end; the stamp leaves it all to the tick.
        let end = walk_end(ts("2026-07-01T00:02:00Z"));
        assert!(slices(ts("2026-07-01T00:00:00Z"), ts("2026-07-01T00:01:00Z"), end).is_empty());
    }

    #[test]
    fn december_rolls_into_the_next_year() {
        assert_eq!(
            add_months(ts("2025-12-01T00:00:00Z"), 1),
            ts("2026-01-01T00:00:00Z")
        );
        assert_eq!(
            add_months(ts("2026-01-01T00:00:00Z"), -13),
            ts("2024-12-01T00:00:00Z")
        );
        assert_eq!(
            month_floor(ts("2025-12-31T23:59:59.999Z")),
            ts("2025-12-01T00:00:00Z")
        );
    }

    #[test]
    fn resume_clips_to_the_cursor() {
        let all = slices(
            ts("2026-01-01T00:00:00Z"),
            ts("2026-03-02T00:00:00Z"),
            walk_end(ts("2026-03-20T00:00:00Z")),
        );
        let resume = Resume {
            from: ts("2026-01-01T00:00:00Z"),
            database: None,
            cursor: ts("2026-02-01T00:00:00Z"),
            slices_processed: 1,
            rows_touched: 10,
        };
        let got = resume_slices(all.clone(), Some(&resume));
        assert_eq!(got, all[1..].to_vec());
        let mid = Resume {
            cursor: ts("2026-02-15T00:00:00Z"),
            ..resume
        };
        let got = resume_slices(all.clone(), Some(&mid));
        assert_eq!(
            got[0],
            Slice {
                from: ts("2026-02-15T00:00:00Z"),
                to: ts("2026-03-01T00:00:00Z")
            }
        );
        assert_eq!(resume_slices(all.clone(), None), all);
    }

    #[test]
    fn a_resume_is_used_only_for_its_own_walk_on_its_own_database() {
        let db = DatabaseIdentity {
            system_identifier: Some(7_316_000_000_000_000_001),
            timeline: Some(1),
            database_oid: 16_384,
        };
        let resume = Resume {
            from: ts("2026-01-01T00:00:00Z"),
            database: Some(db),
            cursor: ts("2026-03-01T00:00:00Z"),
            slices_processed: 2,
            rows_touched: 40,
        };
        let from = ts("2026-01-01T00:00:00Z");
        assert_eq!(resume_mismatch(&resume, from, &db), None);
        // An older event moved the start back: its slices are not ours.
        let why = resume_mismatch(&resume, ts("2025-12-01T00:00:00Z"), &db).unwrap();
        assert!(why.contains("walk from 2026-01-01T00:00:00Z"), "{why}");
        // Another cluster, a recovery to another timeline, a recreated
        // database: each is another database.
        for other in [
            DatabaseIdentity {
                system_identifier: Some(1),
                ..db
            },
            DatabaseIdentity {
                timeline: Some(2),
                ..db
            },
            DatabaseIdentity {
                database_oid: 16_999,
                ..db
            },
        ] {
            let why = resume_mismatch(&resume, from, &other).unwrap();
            assert!(why.contains("another database"), "{why}");
        }
        // An attempt's own cursor names no database: only the start counts.
        let own = Resume {
            database: None,
            ..resume
        };
        let other = DatabaseIdentity {
            database_oid: 1,
            ..db
        };
        assert_eq!(resume_mismatch(&own, from, &other), None);
    }

    #[test]
    fn future_horizon_is_stamp_plus_threshold() {
        let s = snap();
        assert_eq!(s.future_horizon(HOUR), ts("2026-06-10T12:55:00Z"));
    }
}
