//! The `UsageBackfill` custom resource (`usage.multica.ai/v1alpha1`).
//!
//! The Rust types are the source of truth: the CRD under `crds/` is generated
//! from them by [`crd_yaml`], and `tests/packaging/crd.rs` fails when the two drift.
//! Field doc comments are what `kubectl explain usagebackfill.spec` shows,
//! so they are written for operators of the resource, not for Rust readers.
//!
//! [`UsageBackfillSpec::validate`] is the pure check the controller runs before
//! acting; it catches what the schema cannot (cross-field rules, values the
//! apiserver saw before a schema change) with messages naming the field.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use usage_backfill_limits::{MAX_DURATION_LEN, MAX_PARALLELISM, duration};

/// `as_str()` of enums whose names strum derives (spelled as serde spells
/// them, which the tests check).
macro_rules! as_str {
    ($($t:ty),+) => {$(
        impl $t {
            pub fn as_str(self) -> &'static str {
                self.into()
            }
        }
    )+};
}

pub mod run_state;

pub use run_state::{ConditionStatus, ConditionType, Reason, RunState};
pub mod rules;

/// A Secret's name: a DNS-1123 subdomain.
const SECRET_NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A key of a Secret's data.
const SECRET_KEY_PATTERN: &str = r"^[-._a-zA-Z0-9]+$";
/// Printable ASCII: PostgreSQL replaces anything else in application_name with '?'.
const APPLICATION_NAME_PATTERN: &str = r"^[ -~]+$";

/// Default key of the DSN in the database Secret.
pub const DEFAULT_SECRET_KEY: &str = "DATABASE_URL";
/// Default key of the CA bundle in the CA Secret.
pub const DEFAULT_CA_KEY: &str = "ca.crt";
/// Default lag threshold of mode `IfLagging`.
pub const DEFAULT_LAG_THRESHOLD: &str = "1h";
/// Default pause between slices.
pub const DEFAULT_SLEEP_BETWEEN_SLICES: &str = "0s";
/// Default retries of a failed attempt.
pub const DEFAULT_BACKOFF_LIMIT: u32 = 6;
/// PostgreSQL `application_name` of the backfill session when none is given.
pub const DEFAULT_APPLICATION_NAME: &str = "usage-backfill";
/// PostgreSQL keeps at most NAMEDATALEN - 1 bytes of `application_name`.
const MAX_APPLICATION_NAME_LEN: usize = 63;
/// Longest Secret name or key Kubernetes accepts.
const MAX_SECRET_NAME_LEN: usize = 253;
/// Longest DNS name.
const MAX_HOST_LEN: usize = 253;
/// PostgreSQL keeps at most NAMEDATALEN - 1 bytes of a role or database name.
const MAX_IDENTIFIER_LEN: usize = 63;
/// Default of spec.parallelism (the engine's measured default).
pub const DEFAULT_PARALLELISM: u32 = usage_backfill_limits::DEFAULT_PARALLELISM;

mod crd;
mod spec;
mod status;
#[cfg(test)]
mod tests;
mod validation;

pub use crd::*;
pub use spec::*;
pub use status::*;
pub use validation::*;
