//! Reading a UsageBackfill status in assertions: its conditions as
//! `(status, reason)` pairs, their messages, and times as the status
//! carries them.

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use strum::VariantArray;
use usage_backfill_api::{ConditionType, UsageBackfillStatus};

/// Condition `t` as `(status, reason)`, if set.
pub fn cond(s: &UsageBackfillStatus, t: ConditionType) -> Option<(String, String)> {
    s.condition(t).map(|c| (c.status.clone(), c.reason.clone()))
}

/// The expected value of a condition: `cond(s, t) == is("True", "Running")`.
pub fn is(status: &str, reason: &str) -> Option<(String, String)> {
    Some((status.into(), reason.into()))
}

/// What [`conds`] reads in progress: Ready False, Reconciling True, both
/// for `reason`.
pub fn in_progress(reason: &str) -> [Option<(String, String)>; 3] {
    [is("False", reason), is("True", reason), None]
}

/// What [`conds`] reads while a failed attempt waits for its retry: Ready
/// False RetryScheduled, Reconciling True for the `failure`.
pub fn retry_scheduled(failure: &str) -> [Option<(String, String)>; 3] {
    [is("False", "RetryScheduled"), is("True", failure), None]
}

/// What [`conds`] reads after a success: Ready True for `reason` alone.
pub fn ready(reason: &str) -> [Option<(String, String)>; 3] {
    [is("True", reason), None, None]
}

/// What [`conds`] reads after a terminal failure: Ready False and Stalled
/// True for `reason`.
pub fn stalled(reason: &str) -> [Option<(String, String)>; 3] {
    [is("False", reason), None, is("True", reason)]
}

/// Every condition: Ready, Reconciling, Stalled.
pub fn conds(s: &UsageBackfillStatus) -> [Option<(String, String)>; 3] {
    std::array::from_fn(|i| cond(s, ConditionType::VARIANTS[i]))
}

/// The message of condition `t` (empty when it is not set).
pub fn message(s: &UsageBackfillStatus, t: ConditionType) -> String {
    s.message(t)
}

/// A database time as the status carries it (RFC 3339, whole seconds).
pub fn secs(ts: Timestamp) -> Time {
    Time(Timestamp::from_second(ts.as_second()).unwrap())
}
