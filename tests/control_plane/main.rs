//! Tests on a real etcd and kube-apiserver (Kubernetes 1.34 and 1.37) and
//! the real helm, built from the Go modules of `tests/cluster/` by
//! `tests/cluster/build.sh` (one test binary, which shares each version's
//! control plane between its modules: `testkit::cluster::ControlPlane::shared`).
//!
//! - [`cluster`]: the CRD applied for real, the controller's API semantics.
//! - [`helm`]: the chart and the Helm hook recipes installed and upgraded
//!   with the real helm.
//! - [`differential`]: the test API server's answers compared with the
//!   real one's, request by request.
//! - [`e2e_cluster`]: the whole operator end to end, on these control planes
//!   or on a disposable cluster of yours.

mod cluster;
mod differential;
mod e2e_cluster;
mod helm;
