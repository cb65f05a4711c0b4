//! Kubernetes Events about a UsageBackfill (`kubectl describe ubf`), with
//! reasons from a fixed set. Publishing is best effort: an Event that
//! cannot be written is logged, never a reason to fail a run.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// The reporting controller of every Event.
pub(crate) const REPORTER: &str = "usage-backfill-operator";

/// Why an Event was published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray)]
pub enum EventReason {
    /// A run (attempt) started.
    Started,
    /// The engine found nothing to walk.
    Skipped,
    /// The backfill (or the dry run) finished.
    Succeeded,
    /// Terminal failure.
    Failed,
    /// An attempt failed; another follows after the backoff.
    RetryScheduled,
    /// Advisory lock 4246 is held elsewhere.
    WaitingForLock,
    InvalidSpec,
    SecretNotFound,
    SecretKeyMissing,
    Suspended,
    /// The API server refused a status or finalizer write as invalid.
    WriteRefused,
}

impl EventReason {
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    pub fn event_type(self) -> EventType {
        match self {
            Self::Started
            | Self::Skipped
            | Self::Succeeded
            | Self::WaitingForLock
            | Self::Suspended => EventType::Normal,
            Self::Failed
            | Self::RetryScheduled
            | Self::InvalidSpec
            | Self::SecretNotFound
            | Self::SecretKeyMissing
            | Self::WriteRefused => EventType::Warning,
        }
    }
}

/// Publishes Events as the operator. Cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    reporter: Reporter,
}

impl Publisher {
    /// `instance` names this replica (the pod name), when known.
    pub fn new(client: Client, instance: Option<String>) -> Self {
        Publisher {
            client,
            reporter: Reporter {
                controller: REPORTER.into(),
                instance,
            },
        }
    }

    /// Publishes one Event; failures are logged.
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        reason: EventReason,
        note: impl Into<String>,
    ) {
        // A Recorder per Event: kube's Recorder folds a repeated reason into
        // the first Event's series and keeps the first note, which would
        // show "attempt 1 failed" for every later attempt.
        let recorder = Recorder::new(self.client.clone(), self.reporter.clone());
        publish(&recorder, regarding, reason, note).await;
    }
}

async fn publish(
    recorder: &Recorder,
    regarding: &ObjectReference,
    reason: EventReason,
    note: impl Into<String>,
) {
    let mut note: String = note.into();
    // The Events API caps the note at 1 kB.
    if note.len() > 1000 {
        let mut end = 997;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    let event = Event {
        type_: reason.event_type(),
        reason: reason.as_str().to_owned(),
        note: Some(note),
        action: "Backfill".to_owned(),
        secondary: None,
    };
    if let Err(e) = recorder.publish(&event, regarding).await {
        tracing::warn!(
            reason = reason.as_str(),
            object = regarding.name.as_deref().unwrap_or(""),
            error = %e,
            "cannot publish an Event"
        );
    }
}
