//! What the project ships besides the binary, checked offline: the CRD
//! generated from `crates/api`, its admission rules evaluated with CEL, and
//! the Helm chart in step with both (one test binary; each module is what a
//! test binary of its own used to be). Rendering the chart and validating
//! its manifests is `.ci/chart-check`'s.
//!
//! - [`crd`]: the committed CRD in sync, structural, documented defaults.
//! - [`cel`]: every `x-kubernetes-validations` rule against valid and
//!   invalid objects.
//! - [`chart`]: the chart's CRD copy and RBAC.

mod cel;
mod chart;
mod crd;
