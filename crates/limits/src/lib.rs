//! The input rules the command line, the engine and the `UsageBackfill`
//! resource share, in one place so that the three accept the same values:
//! the duration syntax ([`duration`]), the bounds of parallelism, the
//! shortest slice target ([`parse_max_slice_duration`]), and which session
//! setting names are accepted ([`is_setting_name`]).
//!
//! Pure functions and constants only: no I/O, no PostgreSQL driver, no
//! Kubernetes, so that the CRD types can depend on it without linking the
//! engine's driver and TLS stack.

pub mod duration;

use std::time::Duration;

/// Sessions running window calls at once unless told otherwise: measured
/// best on 2 cores (`docs/performance.md`). The default of `--parallelism`
/// and of `spec.parallelism`.
pub const DEFAULT_PARALLELISM: u32 = 2;

/// Upper bound of the parallelism (connections are a shared, limited
/// resource of the database), of `--parallelism` and `spec.parallelism`.
pub const MAX_PARALLELISM: u32 = 16;

/// The shortest slice target, as a manifest and the CRD's CEL rule write
/// it: a macro, so that the rule's text can be assembled with `concat!`
/// at compile time (see [`MIN_MAX_SLICE_DURATION`]).
#[macro_export]
macro_rules! min_max_slice_duration {
    () => {
        "1s"
    };
}

/// The shortest slice target (`--max-slice-duration`,
/// `spec.maxSliceDuration`): shorter targets split every slice into
/// thousands of window calls. [`min_max_slice_duration!`] spells it.
pub const MIN_MAX_SLICE_DURATION: Duration = Duration::from_secs(1);

/// Longest duration string of a field a CEL rule reads (bounds the rule's
/// cost); the CLI keeps to it too, so that both accept the same values.
pub const MAX_DURATION_LEN: usize = 64;

/// Why a slice target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SliceTargetError {
    #[error(transparent)]
    Duration(#[from] duration::ParseError),
    #[error("must be at most {MAX_DURATION_LEN} characters long")]
    TooLong,
    #[error("must be at least {}", min_max_slice_duration!())]
    TooShort,
}

/// Parses a slice target (`--max-slice-duration`, `spec.maxSliceDuration`):
/// a duration of at least [`MIN_MAX_SLICE_DURATION`], written in at most
/// [`MAX_DURATION_LEN`] characters. The one rule both the command line and
/// the resource apply (the CRD's CEL rule and schema say the same).
pub fn parse_max_slice_duration(input: &str) -> Result<Duration, SliceTargetError> {
    if input.len() > MAX_DURATION_LEN {
        return Err(SliceTargetError::TooLong);
    }
    let d = duration::parse(input)?;
    if d < MIN_MAX_SLICE_DURATION {
        return Err(SliceTargetError::TooShort);
    }
    Ok(d)
}

/// Setting names are PostgreSQL identifiers, optionally dotted
/// (`enable_nestloop`, `work_mem`, `pg_hint_plan.enable_hint`): anything
/// else is refused before it reaches the server.
pub fn is_setting_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && !name.starts_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_names() {
        for ok in ["enable_nestloop", "work_mem", "pg_hint_plan.enable_hint"] {
            assert!(is_setting_name(ok), "{ok}");
        }
        for bad in ["", "work mem", "x;drop", ".a", &"a".repeat(64)] {
            assert!(!is_setting_name(bad), "{bad}");
        }
    }

    #[test]
    fn the_macro_spells_the_minimum() {
        assert_eq!(
            duration::parse(min_max_slice_duration!()),
            Ok(MIN_MAX_SLICE_DURATION)
        );
    }

    #[test]
    fn slice_targets() {
        assert_eq!(parse_max_slice_duration("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(
            parse_max_slice_duration("999ms"),
            Err(SliceTargetError::TooShort)
        );
        assert!(matches!(
            parse_max_slice_duration("1x"),
            Err(SliceTargetError::Duration(_))
        ));
        assert_eq!(
            parse_max_slice_duration(&"1s".repeat(33)),
            Err(SliceTargetError::TooLong)
        );
    }
}
