//! The controller's errors: talking to the API server, serving health
//! checks. Failures of a backfill run are not errors here: they are
//! outcomes, reported in the status (see [`super::decide`]).

use std::net::SocketAddr;

/// Everything that can fail a reconcile or the controller itself.
///
/// Each variant has a fixed name, its [`ErrorKind`] in snake_case: the
/// `reason` label of `usage_backfill_reconcile_failures_total` for the
/// kinds a reconcile can fail with ([`ErrorKind::in_reconcile`]).
#[derive(Debug, thiserror::Error, strum::EnumDiscriminants)]
#[strum_discriminants(
    name(ErrorKind),
    derive(strum::IntoStaticStr, strum::VariantArray),
    strum(serialize_all = "snake_case")
)]
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

impl ErrorKind {
    /// Whether a reconcile can fail with this kind; the others stop the
    /// controller. Exhaustive, so that a new kind is sorted here.
    pub const fn in_reconcile(self) -> bool {
        match self {
            ErrorKind::Read
            | ErrorKind::WriteStatus
            | ErrorKind::Finalizer
            | ErrorKind::MissingMetadata => true,
            ErrorKind::Client
            | ErrorKind::Health
            | ErrorKind::RunsOutlivedLeadership
            | ErrorKind::ElectionEnded => false,
        }
    }

    /// The kind's fixed name (snake_case).
    pub fn label(self) -> &'static str {
        self.into()
    }
}

impl Error {
    /// The labels a reconcile can fail with (see [`Error::label`]), in
    /// declaration order: derived from the enum, never listed by hand.
    pub fn reconcile_labels() -> impl Iterator<Item = &'static str> {
        <ErrorKind as strum::VariantArray>::VARIANTS
            .iter()
            .filter(|k| k.in_reconcile())
            .map(|k| k.label())
    }

    /// A fixed name per variant (its name in snake_case), for logs and
    /// metric labels.
    pub fn label(&self) -> &'static str {
        ErrorKind::from(self).label()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconcile_labels_are_the_reconcile_kinds_in_snake_case() {
        assert_eq!(
            Error::reconcile_labels().collect::<Vec<_>>(),
            ["read", "write_status", "finalizer", "missing_metadata"]
        );
        assert_eq!(
            Error::MissingMetadata("namespace").label(),
            "missing_metadata"
        );
        assert_eq!(Error::ElectionEnded.label(), "election_ended");
    }
}
