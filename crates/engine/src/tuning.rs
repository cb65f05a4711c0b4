//! Planner settings for the backfill's own sessions (against the
//! nested-loop recompute, `docs/contract.md`).
//!
//! The application's window function is not ours, its plan is: the reference
//! runs it with the server's defaults, where the planner underestimates the
//! dirty keys and the recompute degenerates into nested loops (cost grows
//! with the square of an agent's history). Every choice below was measured
//! on the fixture; `docs/performance.md` has the figures.
//!
//! - `enable_nestloop = off`: the fix. Hash joins instead of nested loops.
//!   Last of the settings chosen by measurement: after `work_mem`, a small
//!   slice ([`NESTLOOP_PROBE_SHARE`] of the walk) runs with nested loops
//!   allowed, under the settings then in force, and is given up as soon as
//!   it can no longer win; nested loops are kept when faster per event by
//!   [`SETTING_MARGIN`], and a later slice under them that grows slower
//!   (their cost grows with an agent's history) sends every session back
//!   (see `parallel`).
//! - `work_mem = 64MB`: raised for our sessions. The recompute's estimates
//!   collapse to one row (a CTE of dirty keys joined on correlated
//!   columns), so two join orders cost almost the same to the planner and
//!   `work_mem` tips the balance. Realistic 3M rows, one month: at 4MB or
//!   16MB the dirty keys meet every task of their agent first (36M
//!   intermediate rows, a hash that overran `work_mem` to 751 MiB; 105 s),
//!   at 32MB or more they meet `task_usage` on (hour, provider, model)
//!   first (5.7M rows; 21-31 s); the whole walk was 3.8x faster and the
//!   backends' peak memory lower. It is a trade: on even 3M both plans
//!   get slower and the walk takes 1.4x as long as at 4MB; on the 200k
//!   histories it changes nothing measurable. So 64MB is the start, and
//!   after `plan_cache_mode` one slice runs at [`WORK_MEM_PROBE`] (4MB)
//!   under the mode kept; 4MB is kept when it is faster per event than
//!   the winning plan probe by [`SETTING_MARGIN`] (see `parallel`).
//! - `plan_cache_mode`: chosen per run by measurement. The window function
//!   is PL/pgSQL, so its statement is plan-cached per session, and a generic
//!   plan (estimates without the slice bounds) picks a much better join
//!   order on the histories measured (faithful stand-in: 2-3x per month on
//!   even 200k, 14x on realistic 200k) while a custom plan won on one
//!   history of the previous stand-in. Two adjacent historical slices with
//!   the most events together are run one with each mode; the generic plan
//!   is kept unless the custom one is faster per event by
//!   [`PLAN_MODE_MARGIN`]; a probe that can no longer win settles the
//!   mode at once and is cancelled (its slice re-run) only once it has run
//!   1.25x the winner's time; and a custom plan kept that later grows slower than
//!   its probe by `PROBE_MARGIN`, or whose later slices of the probes'
//!   width are no faster than the generic probe, sends every session to
//!   the generic plan (see `parallel`).
//!
//! Settings measured and left out because they did not pay: `jit = off`
//! (no difference beyond noise; JIT compiles in under 0.1 s per slice),
//! `enable_mergejoin = off` (no merge join in any plan once generated ids
//! are random, as the application's are), `max_parallel_workers_per_gather`
//! (irrelevant: a statement with data-modifying CTEs never runs a parallel
//! plan).

use std::fmt;
use std::str::FromStr;

use serde::Serialize;

use super::width::WidthReport;

/// Which planner settings the backfill's sessions get. The user's
/// `Options::session_settings` always win over these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Tuning {
    /// [`DEFAULT_SETTINGS`], and `plan_cache_mode` chosen by measurement.
    #[default]
    Default,
    /// The server's defaults, exactly as the reference runs.
    Off,
    /// Exactly these settings (no measured `plan_cache_mode`).
    Custom(Vec<(String, String)>),
}

/// The static settings of [`Tuning::Default`].
pub const DEFAULT_SETTINGS: &[(&str, &str)] = &[("enable_nestloop", "off"), ("work_mem", "64MB")];

/// The setting [`Tuning::Default`] chooses by measurement.
pub(crate) const PLAN_CACHE_MODE: &str = "plan_cache_mode";

/// The values tried, in this order, on the largest historical slices.
pub(crate) const PROBE_MODES: [&str; 2] = ["force_generic_plan", "force_custom_plan"];

/// A mode other than the generic plan is kept only when faster per event
/// by more than this factor. The two probes run on different months and
/// slices of one plan vary by about ±15 %; and the generic plan is the one
/// whose parts grow least as the hourly table fills: the custom plan's
/// empty-bucket delete can become a merge join that meets every hourly row
/// of a key's agent (even 1M, a full table, one two-month call: custom
/// 39.2 s, 20.3 s of it the delete, generic 18.3 s), while the probes run
/// early, on a table still nearly empty (`docs/performance.md`).
pub(crate) const PLAN_MODE_MARGIN: f64 = 1.1;

/// A probe slice smaller than this says more about noise than about plans.
pub(crate) const PROBE_MIN_EVENTS: i64 = 2000;

/// The setting [`Tuning::Default`] also chooses by measurement.
pub(crate) const WORK_MEM: &str = "work_mem";

/// The `work_mem` tried against the default's on one slice, under the
/// `plan_cache_mode` kept. The recompute's two join orders cost almost the
/// same to the planner and `work_mem` tips the balance: on even 3M rows
/// 4MB walked 1.4x faster than 64MB, on realistic 3M 3.8-5.2x slower
/// (`docs/performance.md`); which one a history needs is measured.
pub(crate) const WORK_MEM_PROBE: &str = "4MB";

/// The alternative value of a setting probed on one slice (`work_mem`,
/// `enable_nestloop`) is kept only when it is faster per event by more
/// than this factor: slices of one plan vary by about ±15 %, and the
/// default is the one measured on most histories.
pub(crate) const SETTING_MARGIN: f64 = 1.1;

/// The setting [`Tuning::Default`] also chooses by measurement, last.
pub(crate) const ENABLE_NESTLOOP: &str = "enable_nestloop";

/// The value of `enable_nestloop` tried against the default's (`off`) on
/// one slice: the server's own, under which the planner may pick nested
/// loops again where it thinks them cheaper. On every history measured
/// they lost by far (the reference walks 5-25x slower than the tuned
/// walk), but the estimates that mislead the planner are the user's data,
/// not ours, so it is measured rather than assumed.
pub(crate) const NESTLOOP_PROBE: &str = "on";

/// The nested-loop probe's slice: this share of the walk's events (at
/// least [`PROBE_MIN_EVENTS`]), cut from the largest unit. A losing probe
/// is given up as soon as it can no longer win, so what it costs is at
/// most its slice's time under the settings in force: about this share of
/// the walk. Its slice is narrower than the probe it is compared with,
/// which favours the hash plans (their fixed part per call is spread over
/// more events), never nested loops.
pub(crate) const NESTLOOP_PROBE_SHARE: f64 = 0.01;

impl Tuning {
    /// The static settings, before the user's override them.
    pub fn settings(&self) -> Vec<(String, String)> {
        match self {
            Tuning::Default => DEFAULT_SETTINGS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            Tuning::Off => Vec::new(),
            Tuning::Custom(list) => list.clone(),
        }
    }

    /// Whether `plan_cache_mode` is chosen by measurement in this run.
    pub fn probes_plan_cache_mode(&self, user: &[(String, String)]) -> bool {
        matches!(self, Tuning::Default) && !sets(user, PLAN_CACHE_MODE)
    }

    /// Whether `work_mem` is chosen by measurement in this run (after
    /// `plan_cache_mode`, against the plan probe that won).
    pub fn probes_work_mem(&self, user: &[(String, String)]) -> bool {
        self.probes_plan_cache_mode(user) && !sets(user, WORK_MEM)
    }

    /// Whether `enable_nestloop` is chosen by measurement in this run
    /// (after `work_mem`, against the settings then in force).
    pub fn probes_nestloop(&self, user: &[(String, String)]) -> bool {
        self.probes_plan_cache_mode(user) && !sets(user, ENABLE_NESTLOOP)
    }

    pub fn name(&self) -> &'static str {
        match self {
            Tuning::Default => "default",
            Tuning::Off => "off",
            Tuning::Custom(_) => "custom",
        }
    }
}

impl fmt::Display for Tuning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tuning::Custom(list) => {
                let parts: Vec<String> = list.iter().map(|(k, v)| format!("{k}={v}")).collect();
                f.write_str(&parts.join(","))
            }
            other => f.write_str(other.name()),
        }
    }
}

impl FromStr for Tuning {
    type Err = String;

    /// `default`, `off`, or a custom list `name=value[,name=value…]`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "default" | "on" => Ok(Tuning::Default),
            "off" | "none" => Ok(Tuning::Off),
            list => {
                let mut out = Vec::new();
                for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                    match part.split_once('=') {
                        Some((k, v)) if !k.trim().is_empty() => {
                            out.push((k.trim().to_string(), v.trim().to_string()))
                        }
                        _ => {
                            return Err(format!(
                                "expected default, off or NAME=VALUE[,NAME=VALUE…], got {part:?}"
                            ));
                        }
                    }
                }
                if out.is_empty() {
                    return Err("expected default, off or NAME=VALUE[,NAME=VALUE…]".into());
                }
                Ok(Tuning::Custom(out))
            }
        }
    }
}

fn sets(user: &[(String, String)], name: &str) -> bool {
    user.iter().any(|(k, _)| k.eq_ignore_ascii_case(name))
}

/// The settings a session gets: the tuning's, minus those the user sets,
/// then the user's in their order (the user wins; names compare
/// case-insensitively, as PostgreSQL's do).
pub fn effective(tuning: &[(String, String)], user: &[(String, String)]) -> Vec<(String, String)> {
    let overridden = |name: &str| user.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    tuning
        .iter()
        .filter(|(k, _)| !overridden(k))
        .chain(user.iter())
        .cloned()
        .collect()
}

/// One slice run under one `plan_cache_mode` (and, for the `work_mem`
/// probe, another `work_mem`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanProbe {
    pub plan_cache_mode: String,
    /// The `work_mem` tried; None: the sessions' own.
    pub work_mem: Option<String>,
    /// The `enable_nestloop` tried; None: the sessions' own.
    pub enable_nestloop: Option<String>,
    pub events: i64,
    pub elapsed_ms: u64,
    /// False when given up because the other mode had already won (its
    /// slice ran again under the winner); `elapsed_ms` is then how long it
    /// ran before that.
    pub completed: bool,
}

impl PlanProbe {
    fn ms_per_event(&self) -> Option<f64> {
        (self.events > 0).then(|| self.elapsed_ms as f64 / self.events as f64)
    }

    /// The value of a probed setting this entry ran at, when not the
    /// sessions' own.
    pub fn tried(&self, setting: &str) -> Option<&str> {
        match setting {
            WORK_MEM => self.work_mem.as_deref(),
            ENABLE_NESTLOOP => self.enable_nestloop.as_deref(),
            _ => None,
        }
    }

    /// A plan probe: every probed setting at the sessions' own value.
    pub fn at_defaults(&self) -> bool {
        self.work_mem.is_none() && self.enable_nestloop.is_none()
    }
}

/// What tuning did in a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TuningReport {
    /// `default`, `off` or `custom`.
    pub preset: String,
    /// The `plan_cache_mode` kept after probing; None when not probed (or
    /// inconclusive, in which case the server's default stays).
    pub plan_cache_mode: Option<String>,
    /// The `work_mem` kept after probing; None when not probed.
    pub work_mem: Option<String>,
    /// The `enable_nestloop` kept after probing; None when not probed.
    pub enable_nestloop: Option<String>,
    pub probes: Vec<PlanProbe>,
    /// How many events a slice took, chosen by measurement (tuned plans
    /// without a cap on a slice's duration); None when not measured.
    pub slice_width: Option<WidthReport>,
}

/// The faster mode per event among completed probes, or None when a probe
/// saw no events. The generic plan (the first mode, the one every session
/// runs before the verdict) stays unless another is faster per event by
/// more than [`PLAN_MODE_MARGIN`].
pub(crate) fn choose_plan_mode(probes: &[PlanProbe]) -> Option<String> {
    let mut best: Option<(&PlanProbe, f64)> = None;
    for p in probes.iter().filter(|p| p.completed && p.at_defaults()) {
        let rate = p.ms_per_event()?;
        // The margin counts against the other modes wherever they stand.
        let weighed = if p.plan_cache_mode == PROBE_MODES[0] {
            rate
        } else {
            rate * PLAN_MODE_MARGIN
        };
        if best.is_none_or(|(_, r)| weighed < r) {
            best = Some((p, weighed));
        }
    }
    best.map(|(p, _)| p.plan_cache_mode.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_user_wins_over_the_tuning() {
        let tuning = Tuning::Default.settings();
        assert_eq!(
            effective(&tuning, &[]),
            kv(&[("enable_nestloop", "off"), ("work_mem", "64MB")])
        );
        let user = kv(&[("WORK_MEM", "8MB"), ("application_name", "x")]);
        assert_eq!(
            effective(&tuning, &user),
            kv(&[
                ("enable_nestloop", "off"),
                ("WORK_MEM", "8MB"),
                ("application_name", "x")
            ])
        );
        assert_eq!(effective(&Tuning::Off.settings(), &user), user);
    }

    #[test]
    fn only_the_default_preset_probes_and_not_over_the_user() {
        assert!(Tuning::Default.probes_plan_cache_mode(&[]));
        assert!(!Tuning::Off.probes_plan_cache_mode(&[]));
        assert!(!Tuning::Custom(kv(&[("a", "b")])).probes_plan_cache_mode(&[]));
        assert!(!Tuning::Default.probes_plan_cache_mode(&kv(&[("plan_cache_mode", "auto")])));
        assert!(Tuning::Default.probes_work_mem(&[]));
        assert!(!Tuning::Default.probes_work_mem(&kv(&[("WORK_MEM", "8MB")])));
        assert!(!Tuning::Default.probes_work_mem(&kv(&[("plan_cache_mode", "auto")])));
        assert!(!Tuning::Off.probes_work_mem(&[]));
        assert!(Tuning::Default.probes_nestloop(&kv(&[("work_mem", "8MB")])));
        assert!(!Tuning::Default.probes_nestloop(&kv(&[("Enable_NestLoop", "off")])));
        assert!(!Tuning::Default.probes_nestloop(&kv(&[("plan_cache_mode", "auto")])));
        assert!(!Tuning::Custom(kv(&[("a", "b")])).probes_nestloop(&[]));
    }

    #[test]
    fn parses_presets_and_lists() {
        assert_eq!("default".parse::<Tuning>().unwrap(), Tuning::Default);
        assert_eq!("off".parse::<Tuning>().unwrap(), Tuning::Off);
        assert_eq!(
            "enable_nestloop=off, work_mem=8MB"
                .parse::<Tuning>()
                .unwrap(),
            Tuning::Custom(kv(&[("enable_nestloop", "off"), ("work_mem", "8MB")]))
        );
        assert!("fast".parse::<Tuning>().is_err());
        assert!("=x".parse::<Tuning>().is_err());
        let custom = Tuning::Custom(kv(&[("a", "1"), ("b", "2")]));
        assert_eq!(custom.to_string().parse::<Tuning>().unwrap(), custom);
    }

    #[test]
    fn the_faster_mode_per_event_wins() {
        let p = |mode: &str, events, ms| PlanProbe {
            plan_cache_mode: mode.into(),
            work_mem: None,
            enable_nestloop: None,
            events,
            elapsed_ms: ms,
            completed: true,
        };
        // (generic events, ms), (custom events, ms), the mode kept.
        let cases = [
            // Custom 0.022 ms an event against 0.033: custom wins.
            ((30_000, 1000), (90_000, 2000), "force_custom_plan"),
            ((30_000, 700), (30_000, 3000), "force_generic_plan"),
            // Custom 5 % faster: within the margin, generic stays.
            ((30_000, 1000), (30_000, 950), "force_generic_plan"),
            // Custom 20 % faster wins, whichever probe is listed first.
            ((30_000, 1000), (30_000, 800), "force_custom_plan"),
        ];
        for ((ge, gms), (ce, cms), kept) in cases {
            let generic = p("force_generic_plan", ge, gms);
            let custom = p("force_custom_plan", ce, cms);
            for probes in [[generic.clone(), custom.clone()], [custom, generic]] {
                assert_eq!(
                    choose_plan_mode(&probes).as_deref(),
                    Some(kept),
                    "{probes:?}"
                );
            }
        }
        assert_eq!(
            choose_plan_mode(&[p("force_generic_plan", 0, 7), p("force_custom_plan", 10, 3)]),
            None
        );
        let given_up = PlanProbe {
            completed: false,
            ..p("force_custom_plan", 30_000, 100)
        };
        assert_eq!(
            choose_plan_mode(&[p("force_generic_plan", 30_000, 700), given_up]),
            Some("force_generic_plan".into())
        );
    }
}
