//! The controller's errors: talking to the API server, serving health
//! checks. Failures of a backfill run are not errors here: they are
//! outcomes, reported in the status (see [`super::decide`]).

use std::net::SocketAddr;

/// Everything that can fail a reconcile or the controller itself.
#[derive(Debug, thiserror::Error, strum::IntoStaticStr)]
#[strum(serialize_all = "snake_case")]
pub enum Error {
    #[error("cannot read {kind} {namespace}/{name}")]
    Read {
        kind: &'static str,
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot write the status of {namespace}/{name}")]
    WriteStatus {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot update the finalizer of {namespace}/{name}")]
    Finalizer {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("the object has no {0}")]
    MissingMetadata(&'static str),
    #[error("cannot set up the Kubernetes client")]
    Client(#[source] kube::Error),
    #[error("cannot serve health checks on {addr}")]
    Health {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "lost the leader Lease and {runs} run(s) did not stop within the shutdown timeout; exiting so that no run outlives leadership"
    )]
    RunsOutlivedLeadership { runs: usize },
    #[error("the leader election task ended")]
    ElectionEnded,
}

impl Error {
    /// The labels a reconcile can fail with (see [`Error::label`]).
    pub const RECONCILE_LABELS: [&'static str; 4] =
        ["read", "write_status", "finalizer", "missing_metadata"];

    /// A fixed name per variant (its name in snake_case), for logs and
    /// metric labels.
    pub fn label(&self) -> &'static str {
        self.into()
    }

    /// The write the API server refused as invalid (422), and its answer:
    /// `("status" | "finalizer", status)`. Such a refusal is about the
    /// object as stored (e.g. a Kubernetes without validation ratcheting
    /// checks a rule added since the object was stored on every write to
    /// it), so trying again soon changes nothing.
    pub fn refused_write(&self) -> Option<(&'static str, &kube::core::Status)> {
        let (write, source) = match self {
            Error::WriteStatus { source, .. } => ("status", source),
            Error::Finalizer { source, .. } => ("finalizer", source),
            _ => return None,
        };
        match source {
            kube::Error::Api(status) if status.code == 422 => Some((write, status.as_ref())),
            _ => None,
        }
    }
}

/// The writes [`Error::refused_write`] names.
pub(crate) const REFUSABLE_WRITES: [&str; 2] = ["status", "finalizer"];

pub type Result<T, E = Error> = std::result::Result<T, E>;
