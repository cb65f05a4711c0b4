//! The run state a status records, typed: condition types, statuses and
//! reasons, and [`RunState`], one row of the kstatus table below with its
//! writer ([`RunState::record`]) and its reader ([`RunState::of`]). The
//! controller writes conditions and reads them back only through here, so
//! the table has one home, and a property test checks that every state
//! survives the round trip through the status JSON.
//!
//! | state | phase | Ready | Reconciling | Stalled |
//! |---|---|---|---|---|
//! | [`Starting`](RunState::Starting) | Pending | False Pending | True Pending | absent |
//! | [`WaitingForSecret`](RunState::WaitingForSecret) | Pending | False *reason* | True *reason* | absent |
//! | [`WaitingForLock`](RunState::WaitingForLock) | WaitingForLock | False WaitingForLock | True WaitingForLock | absent |
//! | [`Running`](RunState::Running) | Running | False Running | True Running | absent |
//! | [`RetryScheduled`](RunState::RetryScheduled) | Pending | False RetryScheduled | True *failure* | absent |
//! | [`Succeeded`](RunState::Succeeded) | Succeeded | True *result* | absent | absent |
//! | [`Failed`](RunState::Failed) | Failed | False *reason* | absent | True *reason* |
//! | [`Suspended`](RunState::Suspended) | Pending | False Suspended | False Suspended | absent |

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use strum::{Display, EnumString, IntoStaticStr, VariantArray};

use crate::{BackfillResult, Phase, UsageBackfillStatus};

/// Condition types, following kstatus, in the order a status lists them.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Display, IntoStaticStr, EnumString, VariantArray,
)]
pub enum ConditionType {
    Ready,
    Reconciling,
    Stalled,
}

/// The status of a condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Display, IntoStaticStr, EnumString)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    /// The status of `c`; anything but True or False reads as Unknown.
    pub fn of(c: &Condition) -> Self {
        c.status.parse().unwrap_or(Self::Unknown)
    }

    /// Whether `c` is True.
    pub fn is_true(c: &Condition) -> bool {
        Self::of(c) == Self::True
    }
}

as_str!(ConditionType, ConditionStatus, Reason);

/// Condition reasons: a fixed set, also used as metric labels. The
/// failures of an attempt are named after the engine's errors (the
/// controller's `convert.rs` maps one to the other).
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Display, IntoStaticStr, EnumString, VariantArray,
)]
pub enum Reason {
    /// Reconciling: the spec was accepted and a run will start.
    Pending,
    /// Ready=False: spec.suspend is true and no run is in progress.
    Suspended,
    /// Reconciling: waiting for advisory lock 4246.
    WaitingForLock,
    /// Reconciling: walking slices.
    Running,
    /// Reconciling: an attempt failed and the next one waits for its backoff.
    RetryScheduled,
    /// Ready: the walk ran and the watermark was stamped.
    Backfilled,
    /// Ready: nothing to walk (see status.skipped).
    Skipped,
    /// Ready: a dry run planned the walk.
    DryRun,
    /// Stalled: the spec fails validation (the message names the field).
    InvalidSpec,
    /// Reconciling: the database or CA Secret does not exist. No attempt is
    /// made (so backoffLimit is not used up); the Secret is read again on
    /// the recheck schedule (at once with the Secret watch) and the run
    /// starts once it appears.
    SecretNotFound,
    /// Reconciling: the Secret exists but lacks the key, or its value is
    /// empty or not UTF-8. Rechecked like SecretNotFound.
    SecretKeyMissing,
    /// Stalled: monthsBack would skip existing history and forcePartial is false.
    PartialRangeRefused,
    /// Stalled: the watermark row is missing; a human must look.
    ManualInterventionRequired,
    /// Stalled: backoffLimit retries failed.
    BackoffLimitExceeded,
    /// Stalled: the Secret's connection string cannot be parsed.
    InvalidConnectionString,
    /// Stalled: the TLS settings cannot be used.
    InvalidTlsConfig,
    /// A failed attempt: the server refused the credentials.
    AuthenticationFailed,
    /// A failed attempt: the database does not exist.
    DatabaseNotFound,
    /// A failed attempt: the server cannot be reached.
    DatabaseUnreachable,
    /// A failed attempt: connecting timed out.
    ConnectTimeout,
    /// A failed attempt: the TLS handshake failed.
    TlsHandshakeFailed,
    /// A failed attempt: connecting failed otherwise.
    ConnectFailed,
    /// Stalled: the server refuses a session setting.
    InvalidSessionSetting,
    /// Stalled: the rollup state table does not exist.
    RollupStateMissing,
    /// Stalled: part of the rollup schema is missing.
    SchemaMissing,
    /// Stalled: the role lacks a privilege the backfill needs.
    PermissionDenied,
    /// Stalled: events are dated beyond the database clock.
    FutureDatedEvents,
    /// A failed attempt: lock 4246 was not acquired within lockTimeout.
    LockTimeout,
    /// The attempt was cancelled.
    Cancelled,
    /// A failed attempt: lock 4246 was lost mid-run.
    LockLost,
    /// A failed attempt: a slice exceeded sliceTimeout.
    SliceTimeout,
    /// A failed attempt: a slice failed.
    SliceFailed,
    /// Stalled: the database connection goes through a transaction- or
    /// statement-pooling connection pooler, where advisory lock 4246
    /// guards nothing; connect directly or through session pooling.
    TransactionPooling,
    /// A failed attempt: another database error.
    DatabaseError,
}

impl From<BackfillResult> for Reason {
    fn from(r: BackfillResult) -> Self {
        match r {
            BackfillResult::Backfilled => Reason::Backfilled,
            BackfillResult::Skipped => Reason::Skipped,
            BackfillResult::DryRun => Reason::DryRun,
        }
    }
}

impl TryFrom<Reason> for BackfillResult {
    type Error = Reason;

    fn try_from(r: Reason) -> Result<Self, Reason> {
        match r {
            Reason::Backfilled => Ok(BackfillResult::Backfilled),
            Reason::Skipped => Ok(BackfillResult::Skipped),
            Reason::DryRun => Ok(BackfillResult::DryRun),
            other => Err(other),
        }
    }
}

impl UsageBackfillStatus {
    /// The condition of the given type, if present.
    pub fn condition(&self, type_: ConditionType) -> Option<&Condition> {
        self.conditions.iter().find(|c| c.type_ == type_.as_str())
    }

    /// The status of a condition, if present.
    pub fn condition_status(&self, type_: ConditionType) -> Option<ConditionStatus> {
        self.condition(type_).map(ConditionStatus::of)
    }

    /// The reason of a condition, if present and one of ours.
    pub fn reason(&self, type_: ConditionType) -> Option<Reason> {
        self.condition(type_).and_then(|c| c.reason.parse().ok())
    }

    /// The message of a condition (empty when it is absent).
    pub fn message(&self, type_: ConditionType) -> String {
        self.condition(type_)
            .map(|c| c.message.clone())
            .unwrap_or_default()
    }

    /// Adds or replaces a condition, stamped with `observed_generation` (set
    /// that first). `lastTransitionTime` moves only when the status flips.
    pub fn set_condition(
        &mut self,
        type_: ConditionType,
        status: ConditionStatus,
        reason: Reason,
        message: impl Into<String>,
        now: &Time,
    ) {
        let last_transition_time = match self.condition(type_) {
            Some(old) if ConditionStatus::of(old) == status => old.last_transition_time.clone(),
            _ => now.clone(),
        };
        let new = Condition {
            type_: type_.as_str().to_owned(),
            status: status.as_str().to_owned(),
            reason: reason.as_str().to_owned(),
            message: message.into(),
            observed_generation: Some(self.observed_generation),
            last_transition_time,
        };
        match self.conditions.iter_mut().find(|c| c.type_ == new.type_) {
            Some(old) => *old = new,
            None => self.conditions.push(new),
        }
    }

    /// Removes a condition (kstatus prefers an absent Reconciling/Stalled to
    /// a False one).
    pub fn remove_condition(&mut self, type_: ConditionType) {
        self.conditions.retain(|c| c.type_ != type_.as_str());
    }

    /// Ready, Reconciling, Stalled: a stable order keeps equal statuses equal.
    fn sort_conditions(&mut self) {
        self.conditions.sort_by_key(|c| {
            ConditionType::VARIANTS
                .iter()
                .position(|t| t.as_str() == c.type_)
                .unwrap_or(usize::MAX)
        });
    }
}

/// Where the run a status describes is: one row of the table in the module
/// documentation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Accepted; an attempt is starting (or waits for a run slot).
    Starting,
    /// The database or CA Secret cannot be read yet: `SecretNotFound` or
    /// `SecretKeyMissing`. Not an attempt.
    WaitingForSecret(Reason),
    /// Advisory lock 4246 is held elsewhere.
    WaitingForLock,
    /// Walking slices.
    Running,
    /// An attempt failed for this reason; the next waits for its backoff.
    RetryScheduled(Reason),
    /// Done, with this result.
    Succeeded(BackfillResult),
    /// Given up, for this reason, until the spec or the Secret changes.
    Failed(Reason),
    /// spec.suspend: no run starts.
    Suspended,
}

impl RunState {
    /// The phase of the state.
    pub fn phase(self) -> Phase {
        match self {
            RunState::Starting
            | RunState::WaitingForSecret(_)
            | RunState::RetryScheduled(_)
            | RunState::Suspended => Phase::Pending,
            RunState::WaitingForLock => Phase::WaitingForLock,
            RunState::Running => Phase::Running,
            RunState::Succeeded(_) => Phase::Succeeded,
            RunState::Failed(_) => Phase::Failed,
        }
    }

    /// Ready, Reconciling and Stalled of the state; `None` is absent.
    fn conditions(self) -> [Option<(ConditionStatus, Reason)>; 3] {
        use ConditionStatus::{False, True};
        let in_progress =
            |ready, reconciling| [Some((False, ready)), Some((True, reconciling)), None];
        match self {
            RunState::Starting => in_progress(Reason::Pending, Reason::Pending),
            RunState::WaitingForSecret(r) => in_progress(r, r),
            RunState::WaitingForLock => in_progress(Reason::WaitingForLock, Reason::WaitingForLock),
            RunState::Running => in_progress(Reason::Running, Reason::Running),
            RunState::RetryScheduled(failure) => in_progress(Reason::RetryScheduled, failure),
            RunState::Succeeded(result) => [Some((True, result.into())), None, None],
            RunState::Failed(r) => [Some((False, r)), None, Some((True, r))],
            RunState::Suspended => [
                Some((False, Reason::Suspended)),
                Some((False, Reason::Suspended)),
                None,
            ],
        }
    }

    /// Writes the state into `s`: the phase and the three conditions, each
    /// with `message`.
    pub fn record(self, s: &mut UsageBackfillStatus, message: &str, now: &Time) {
        s.phase = Some(self.phase());
        for (&type_, condition) in ConditionType::VARIANTS.iter().zip(self.conditions()) {
            match condition {
                Some((status, reason)) => s.set_condition(type_, status, reason, message, now),
                None => s.remove_condition(type_),
            }
        }
        s.sort_conditions();
    }

    /// Reads the state back from the phase and the condition reasons;
    /// `None` when they do not form one of the states.
    pub fn of(s: &UsageBackfillStatus) -> Option<Self> {
        let reason = |t| s.reason(t);
        Some(match s.phase {
            Some(Phase::Succeeded) => {
                RunState::Succeeded(reason(ConditionType::Ready)?.try_into().ok()?)
            }
            Some(Phase::Failed) => RunState::Failed(reason(ConditionType::Stalled)?),
            Some(Phase::WaitingForLock) => RunState::WaitingForLock,
            Some(Phase::Running) => RunState::Running,
            Some(Phase::Pending) | None => match reason(ConditionType::Ready)? {
                Reason::Pending => RunState::Starting,
                Reason::RetryScheduled => {
                    RunState::RetryScheduled(reason(ConditionType::Reconciling)?)
                }
                r @ (Reason::SecretNotFound | Reason::SecretKeyMissing) => {
                    RunState::WaitingForSecret(r)
                }
                Reason::Suspended => RunState::Suspended,
                _ => return None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use proptest::sample::select;

    use super::*;

    fn time(s: &str) -> Time {
        Time(s.parse().unwrap())
    }

    fn reason() -> impl Strategy<Value = Reason> {
        select(Reason::VARIANTS)
    }

    fn state() -> impl Strategy<Value = RunState> {
        prop_oneof![
            Just(RunState::Starting),
            select(&[Reason::SecretNotFound, Reason::SecretKeyMissing][..])
                .prop_map(RunState::WaitingForSecret),
            Just(RunState::WaitingForLock),
            Just(RunState::Running),
            reason().prop_map(RunState::RetryScheduled),
            select(
                &[
                    BackfillResult::Backfilled,
                    BackfillResult::Skipped,
                    BackfillResult::DryRun
                ][..]
            )
            .prop_map(RunState::Succeeded),
            reason().prop_map(RunState::Failed),
            Just(RunState::Suspended),
        ]
    }

    proptest! {
        /// Any sequence of states, each written over the last and read back
        /// from the JSON the API server stores, reads as the last state.
        #[test]
        fn every_state_round_trips_through_the_status_json(
            states in proptest::collection::vec(state(), 1..4),
            generation in 1i64..1000,
            message in "[ -~]{0,40}",
        ) {
            let mut s = UsageBackfillStatus {
                observed_generation: generation,
                ..Default::default()
            };
            for (i, state) in states.iter().enumerate() {
                let now = time(&format!("2025-01-01T00:00:{i:02}Z"));
                state.record(&mut s, &message, &now);
            }
            let json = serde_json::to_string(&s).unwrap();
            let back: UsageBackfillStatus = serde_json::from_str(&json).unwrap();
            let last = *states.last().unwrap();
            prop_assert_eq!(RunState::of(&back), Some(last));
            prop_assert_eq!(back.phase, Some(last.phase()));
            for c in &back.conditions {
                prop_assert_eq!(&c.message, &message);
                prop_assert_eq!(c.observed_generation, Some(generation));
            }
        }
    }

    #[test]
    fn set_condition_moves_transition_time_only_on_flips() {
        let mut status = UsageBackfillStatus {
            observed_generation: 2,
            ..Default::default()
        };
        let t1 = time("2025-01-01T00:00:00Z");
        let t2 = time("2025-01-01T00:05:00Z");
        status.set_condition(
            ConditionType::Reconciling,
            ConditionStatus::True,
            Reason::Pending,
            "queued",
            &t1,
        );
        status.set_condition(
            ConditionType::Reconciling,
            ConditionStatus::True,
            Reason::Running,
            "slice 1/3",
            &t2,
        );
        let c = status.condition(ConditionType::Reconciling).unwrap();
        assert_eq!(
            (c.reason.as_str(), c.message.as_str()),
            ("Running", "slice 1/3")
        );
        assert_eq!(c.last_transition_time, t1);
        assert_eq!(c.observed_generation, Some(2));
        assert_eq!(
            status.condition_status(ConditionType::Reconciling),
            Some(ConditionStatus::True)
        );
        assert_eq!(
            status.reason(ConditionType::Reconciling),
            Some(Reason::Running)
        );

        status.set_condition(
            ConditionType::Reconciling,
            ConditionStatus::False,
            Reason::Backfilled,
            "",
            &t2,
        );
        assert_eq!(
            status
                .condition(ConditionType::Reconciling)
                .unwrap()
                .last_transition_time,
            t2
        );
        status.set_condition(
            ConditionType::Ready,
            ConditionStatus::True,
            Reason::Backfilled,
            "done",
            &t2,
        );
        assert_eq!(status.conditions.len(), 2);

        status.remove_condition(ConditionType::Reconciling);
        assert!(status.condition(ConditionType::Reconciling).is_none());
        assert!(status.condition(ConditionType::Ready).is_some());
        assert_eq!(status.message(ConditionType::Ready), "done");
        assert_eq!(status.message(ConditionType::Stalled), "");
    }

    #[test]
    fn labels_are_unique_identifiers() {
        let reasons: std::collections::BTreeSet<_> =
            Reason::VARIANTS.iter().map(|r| r.as_str()).collect();
        assert_eq!(reasons.len(), Reason::VARIANTS.len());
        // Condition reasons must match the apiserver's pattern for Condition.reason.
        for r in reasons {
            assert!(r.chars().next().unwrap().is_ascii_alphabetic(), "{r}");
            assert!(r.chars().all(|c| c.is_ascii_alphanumeric()), "{r}");
            assert_eq!(r.parse::<Reason>().unwrap().as_str(), r);
        }
        for (t, s) in ConditionType::VARIANTS
            .iter()
            .zip(["Ready", "Reconciling", "Stalled"])
        {
            assert_eq!(t.as_str(), s);
            assert_eq!(t.to_string(), s);
        }
        for (c, s) in [
            (ConditionStatus::True, "True"),
            (ConditionStatus::False, "False"),
            (ConditionStatus::Unknown, "Unknown"),
        ] {
            assert_eq!(c.as_str(), s);
        }
    }

    #[test]
    fn foreign_condition_values_read_as_unknown_or_no_state() {
        let mut s = UsageBackfillStatus::default();
        RunState::Starting.record(&mut s, "x", &time("2025-01-01T00:00:00Z"));
        s.conditions[0].status = "maybe".into();
        assert_eq!(
            s.condition_status(ConditionType::Ready),
            Some(ConditionStatus::Unknown)
        );
        s.conditions[0].reason = "SomethingNew".into();
        assert_eq!(s.reason(ConditionType::Ready), None);
        assert_eq!(RunState::of(&s), None);
        assert_eq!(RunState::of(&UsageBackfillStatus::default()), None);
    }
}
