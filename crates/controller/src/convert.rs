//! Every conversion between the API's types and the engine's, in one
//! place (the controller is the adapter between the two crates, neither of
//! which knows the other): what a spec asks of the engine, what the engine
//! reports into a status, and the condition reason of each engine failure.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use usage_backfill_api::{
    FutureEvents, LockHolder, ModeSettings, Reason, SkipReason, SliceWidthMeasurement,
    SliceWidthStatus, TlsMode, TuningPreset,
};
use usage_backfill_engine as engine;

pub(crate) fn tls_mode(m: TlsMode) -> engine::TlsMode {
    match m {
        TlsMode::Disable => engine::TlsMode::Disable,
        TlsMode::Prefer => engine::TlsMode::Prefer,
        TlsMode::Require => engine::TlsMode::Require,
        TlsMode::VerifyCa => engine::TlsMode::VerifyCa,
        TlsMode::VerifyFull => engine::TlsMode::VerifyFull,
    }
}

/// The inverse of [`tls_mode`] (the tests check the two agree by name).
#[cfg(test)]
fn api_tls_mode(m: engine::TlsMode) -> TlsMode {
    match m {
        engine::TlsMode::Disable => TlsMode::Disable,
        engine::TlsMode::Prefer => TlsMode::Prefer,
        engine::TlsMode::Require => TlsMode::Require,
        engine::TlsMode::VerifyCa => TlsMode::VerifyCa,
        engine::TlsMode::VerifyFull => TlsMode::VerifyFull,
    }
}

pub(crate) fn mode(m: ModeSettings) -> engine::Mode {
    match m {
        ModeSettings::IfLagging { lag_threshold } => engine::Mode::IfLagging { lag_threshold },
        ModeSettings::Always {
            months_back,
            force_partial,
        } => engine::Mode::Always {
            months_back,
            force_partial,
        },
    }
}

pub(crate) fn tuning(p: TuningPreset) -> engine::Tuning {
    match p {
        TuningPreset::Tuned => engine::Tuning::Default,
        TuningPreset::ServerDefaults => engine::Tuning::Off,
    }
}

pub(crate) fn skip_reason(r: engine::SkipReason) -> SkipReason {
    match r {
        engine::SkipReason::RollupStateMissing => SkipReason::RollupStateMissing,
        engine::SkipReason::TaskUsageEmpty => SkipReason::TaskUsageEmpty,
        engine::SkipReason::WatermarkWithinThreshold => SkipReason::WatermarkWithinThreshold,
    }
}

pub(crate) fn lock_holder(h: &engine::LockHolder) -> LockHolder {
    LockHolder {
        pid: Some(h.pid),
        application_name: h.application_name.clone(),
        client_addr: h.client_addr.clone(),
        since: h.since.map(Time),
    }
}

pub(crate) fn future_events(f: &engine::FutureEvents) -> FutureEvents {
    FutureEvents {
        rows: f.rows,
        max_ahead_seconds: f.ahead_seconds,
        latest: Some(Time(f.latest)),
    }
}

pub(crate) fn slice_width(w: &engine::WidthReport) -> SliceWidthStatus {
    let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    SliceWidthStatus {
        events_per_slice: w.events_per_slice,
        measured: w
            .levels
            .iter()
            .map(|l| SliceWidthMeasurement {
                events_per_slice: l.events_per_slice,
                slices: int(l.slices),
                events: l.events,
                millis: int(l.elapsed_ms),
            })
            .collect(),
        explore_millis: int(w.explore_cost_ms),
    }
}

/// The condition reason of a failure: the engine's fixed name
/// ([`engine::Error::reason`]), the one vocabulary of failure reasons.
pub(crate) fn reason(e: &engine::Error) -> Reason {
    e.reason()
        .parse()
        .expect("every engine failure reason is a condition reason (tested)")
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    /// Every engine failure name (the `reason` label of the run-failure
    /// metrics) is a condition reason of the same name, and [`reason`]
    /// gives it: one vocabulary, checked over every name, so a new
    /// `Failure` that is no `Reason` fails here.
    #[test]
    fn every_failure_reason_is_the_engines_name() {
        let at = ts("2026-01-01T00:00:00Z");
        for &f in <engine::Failure as strum::VariantArray>::VARIANTS {
            assert_eq!(
                f.as_str().parse::<Reason>().map(Reason::as_str),
                Ok(f.as_str()),
                "the engine's failure {f:?} is not a condition reason"
            );
        }
        // The two whose names once differed between metrics and conditions.
        assert_eq!(
            reason(&engine::Error::WatermarkMissing),
            Reason::ManualInterventionRequired
        );
        assert_eq!(
            reason(&engine::Error::MonthsBackSkipsHistory {
                months_back: 1,
                start: at,
                earliest: at,
            }),
            Reason::PartialRangeRefused
        );
    }

    #[test]
    fn tls_modes_convert_both_ways_by_name() {
        for &m in <TlsMode as strum::VariantArray>::VARIANTS {
            let e = tls_mode(m);
            assert_eq!(e.as_str(), m.as_str());
            assert_eq!(api_tls_mode(e), m);
        }
    }

    #[test]
    fn skip_reasons_convert_by_name() {
        for r in [
            engine::SkipReason::RollupStateMissing,
            engine::SkipReason::TaskUsageEmpty,
            engine::SkipReason::WatermarkWithinThreshold,
        ] {
            assert_eq!(skip_reason(r).as_str(), r.as_str());
        }
    }
}
