//! Go-style duration strings (`90s`, `1h`, `2m30s`, `1.5h`, `250ms`), the one
//! duration syntax of both the command line and the `UsageBackfill` spec.
//!
//! Go's syntax is used because it is what Kubernetes users already write in
//! manifests; the parser is strict (no spaces, no negative values) so that a
//! typo is an error rather than a surprise.

use std::time::Duration;

/// A regular expression accepting what [`parse`] accepts, for CRD schemas.
pub const PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

/// Why a duration string was rejected. The offending text is echoed only
/// when short, and durations never carry secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 90s, 1h, 2m30s)")]
pub struct ParseError {
    input: String,
    reason: &'static str,
}

fn err(input: &str, reason: &'static str) -> ParseError {
    let input: String = input.chars().take(40).collect();
    ParseError { input, reason }
}

/// Parses a Go-style duration. `0` alone is allowed without a unit.
pub fn parse(input: &str) -> Result<Duration, ParseError> {
    if input.is_empty() {
        return Err(err(input, "empty"));
    }
    if input == "0" {
        return Ok(Duration::ZERO);
    }
    if input.starts_with('-') {
        return Err(err(input, "negative durations are not allowed"));
    }
    let mut rest = input;
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let int_len = rest.bytes().take_while(u8::is_ascii_digit).count();
        let (int_part, after) = rest.split_at(int_len);
        let (frac_part, after) = match after.strip_prefix('.') {
            Some(f) => {
                let n = f.bytes().take_while(u8::is_ascii_digit).count();
                if n == 0 {
                    return Err(err(input, "a '.' must be followed by digits"));
                }
                f.split_at(n)
            }
            None => ("", after),
        };
        if int_part.is_empty() {
            return Err(err(input, "expected a number"));
        }
        let unit_len = after
            .char_indices()
            .find(|(_, c)| c.is_ascii_digit() || *c == '.')
            .map_or(after.len(), |(i, _)| i);
        let (unit, after) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "µs" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60 * 1_000_000_000,
            "h" => 3_600 * 1_000_000_000,
            "" => return Err(err(input, "missing unit (ns, us, ms, s, m, h)")),
            _ => return Err(err(input, "unknown unit (use ns, us, ms, s, m or h)")),
        };
        let whole: u128 = int_part
            .parse()
            .map_err(|_| err(input, "number too large"))?;
        let mut nanos = whole
            .checked_mul(unit_nanos)
            .ok_or_else(|| err(input, "number too large"))?;
        if !frac_part.is_empty() {
            // Digits beyond nanosecond precision are dropped, as in Go.
            let digits = &frac_part[..frac_part.len().min(18)];
            let frac: u128 = digits.parse().map_err(|_| err(input, "bad fraction"))?;
            nanos = nanos
                .checked_add(frac * unit_nanos / 10u128.pow(digits.len() as u32))
                .ok_or_else(|| err(input, "number too large"))?;
        }
        total_nanos = total_nanos
            .checked_add(nanos)
            .ok_or_else(|| err(input, "number too large"))?;
        rest = after;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| err(input, "too large"))?;
    Ok(Duration::new(secs, (total_nanos % 1_000_000_000) as u32))
}

/// Prints a duration the way [`parse`] reads it back (`1h2m3s`, `250ms`, `0s`).
pub fn format(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    if secs == 0 && nanos == 0 {
        return "0s".into();
    }
    if secs == 0 {
        return if nanos.is_multiple_of(1_000_000) {
            format!("{}ms", nanos / 1_000_000)
        } else {
            format!("{nanos}ns")
        };
    }
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let mut out = String::new();
    if h > 0 {
        out += &format!("{h}h");
    }
    if m > 0 {
        out += &format!("{m}m");
    }
    if s > 0 || nanos > 0 {
        if nanos > 0 {
            let frac = format!("{nanos:09}");
            out += &format!("{s}.{}s", frac.trim_end_matches('0'));
        } else {
            out += &format!("{s}s");
        }
    }
    out
}

/// A clap value parser, so flags reject bad durations with the same message.
pub fn clap_parse(s: &str) -> Result<Duration, String> {
    parse(s).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_style() {
        assert_eq!(parse("0").unwrap(), Duration::ZERO);
        assert_eq!(parse("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse("2m30s").unwrap(), Duration::from_secs(150));
        assert_eq!(parse("1.5h").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("1h0m0.5s").unwrap(), Duration::from_millis(3_600_500));
        assert_eq!(parse("3us").unwrap(), Duration::from_micros(3));
        assert_eq!(parse("3µs").unwrap(), Duration::from_micros(3));
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        for (input, reason) in [
            ("", "empty"),
            ("-1s", "negative"),
            ("10", "missing unit"),
            ("1d", "unknown unit"),
            ("1 h", "unknown unit"),
            ("h", "expected a number"),
            ("1.s", "followed by digits"),
            ("99999999999999999999999h", "too large"),
        ] {
            let e = parse(input).unwrap_err().to_string();
            assert!(e.contains(reason), "{input:?}: {e}");
        }
    }

    #[test]
    fn format_round_trips() {
        for d in [
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(3600),
            Duration::from_secs(3661),
            Duration::from_millis(1500),
            Duration::from_millis(250),
            Duration::from_nanos(7),
        ] {
            assert_eq!(parse(&format(d)).unwrap(), d, "{}", format(d));
        }
        assert_eq!(format(Duration::from_secs(5400)), "1h30m");
    }

    #[test]
    fn pattern_agrees_with_parser() {
        let re = regex::Regex::new(PATTERN).unwrap();
        for sample in [
            "0", "90s", "1h30m", "1.5h", "250ms", "3us", "", "-1s", "10", "1d", "1 h", "h", "1.s",
            "0s", "00", "1h1",
        ] {
            assert_eq!(re.is_match(sample), parse(sample).is_ok(), "{sample:?}");
        }
    }
}
