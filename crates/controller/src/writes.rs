//! Writes to the API server: the status by server-side apply under one
//! field manager, the finalizer by merge patches guarded by the
//! resourceVersion (so a concurrent change to the list is never lost).
//!
//! A run's writes are also guarded by the object's UID: Helm or Argo CD
//! may delete a hook object and create a new one under the same name
//! while a run for the old one is still writing. The apiserver ignores a
//! UID sent to the `status` subresource (its status strategy copies the
//! stored metadata over the request's), so the guard is the
//! resourceVersion it does honour: check the UID of the object as last
//! seen, and write with that object's resourceVersion; a 409 (anything
//! changed since) reads it again. A write can then only land on the object
//! whose UID was checked.
//!
//! The object "as last seen" is the answer to the caller's previous write
//! (or the reflector's copy), never a GET made just for the write: during
//! a run nothing else writes the object, so a write costs one request, and
//! only a change made by someone else (a 409) costs a read.

use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use usage_backfill_api::{UsageBackfill, UsageBackfillStatus};

/// The field manager of every write: the status and the finalizer.
pub const FIELD_MANAGER: &str = "usage-backfill-operator";

/// Present only while a run task is active: its cleanup cancels the run so
/// that advisory lock 4246 is released before the object goes.
pub const FINALIZER: &str = "usage.multica.ai/run-cleanup";

/// How often a finalizer patch is retried on a resourceVersion conflict.
const CONFLICT_RETRIES: usize = 5;

/// Applies the complete status. Server-side apply removes whatever this
/// manager stops sending, so `status` must be the whole status. Returns
/// the object as written.
pub(crate) async fn apply_status(
    api: &Api<UsageBackfill>,
    name: &str,
    status: &UsageBackfillStatus,
) -> kube::Result<UsageBackfill> {
    let patch = json!({
        "apiVersion": UsageBackfill::api_version(&()),
        "kind": UsageBackfill::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// What became of a write guarded by the object's UID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guarded {
    Written,
    /// The object is gone.
    Gone,
    /// The object is being deleted: a status written now tells no one.
    Deleting,
    /// Another object has the name now: the run's object is gone.
    Recreated,
}

/// The object of `name` as last seen, taken out of `seen`; read when
/// there is none. `None` when it is gone.
async fn last_seen(
    api: &Api<UsageBackfill>,
    name: &str,
    seen: &mut Option<UsageBackfill>,
) -> kube::Result<Option<UsageBackfill>> {
    match seen.take() {
        Some(obj) => Ok(Some(obj)),
        None => api.get_opt(name).await,
    }
}

/// Applies the complete status to `name` only while it is the object
/// with `uid` (see the module doc). `seen` is the object as last seen
/// (`None`: read it first); it is left holding the object as written, for
/// the next write, or `None` when the next write has to read it.
pub async fn apply_status_of(
    api: &Api<UsageBackfill>,
    name: &str,
    uid: &str,
    status: &UsageBackfillStatus,
    seen: &mut Option<UsageBackfill>,
) -> kube::Result<Guarded> {
    let mut tries = 0;
    loop {
        let Some(obj) = last_seen(api, name, seen).await? else {
            return Ok(Guarded::Gone);
        };
        if obj.uid().as_deref() != Some(uid) {
            return Ok(Guarded::Recreated);
        }
        if obj.metadata.deletion_timestamp.is_some() {
            return Ok(Guarded::Deleting);
        }
        let patch = json!({
            "apiVersion": UsageBackfill::api_version(&()),
            "kind": UsageBackfill::kind(&()),
            "metadata": { "resourceVersion": obj.resource_version() },
            "status": status,
        });
        let written = api
            .patch_status(
                name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await;
        match written {
            Ok(written) => {
                *seen = Some(written);
                return Ok(Guarded::Written);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Guarded::Gone),
            Err(kube::Error::Api(e)) if e.code == 409 && tries < CONFLICT_RETRIES => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

pub fn has_finalizer(obj: &UsageBackfill) -> bool {
    obj.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds the finalizer to `obj` (as read), unless it is there.
pub async fn add_finalizer(api: &Api<UsageBackfill>, obj: &UsageBackfill) -> kube::Result<()> {
    if has_finalizer(obj) {
        return Ok(());
    }
    let mut finalizers = obj.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    patch_finalizers(api, obj, finalizers).await.map(drop)
}

/// Removes the finalizer, reading the object first; retried on conflicts.
/// Returns false when the object is gone.
pub async fn remove_finalizer(api: &Api<UsageBackfill>, name: &str) -> kube::Result<bool> {
    remove_finalizer_of(api, name, None, &mut None).await
}

/// As [`remove_finalizer`], only from the object with `uid` when given
/// (another object under the name counts as gone), and from `seen`, the
/// object as last seen, when there is one (see [`apply_status_of`]).
pub async fn remove_finalizer_of(
    api: &Api<UsageBackfill>,
    name: &str,
    uid: Option<&str>,
    seen: &mut Option<UsageBackfill>,
) -> kube::Result<bool> {
    let mut tries = 0;
    loop {
        let Some(obj) = last_seen(api, name, seen).await? else {
            return Ok(false);
        };
        if uid.is_some_and(|u| obj.uid().as_deref() != Some(u)) {
            return Ok(false);
        }
        if !has_finalizer(&obj) {
            return Ok(true);
        }
        let rest: Vec<String> = obj
            .finalizers()
            .iter()
            .filter(|f| *f != FINALIZER)
            .cloned()
            .collect();
        match patch_finalizers(api, &obj, rest).await {
            Ok(written) => {
                *seen = Some(written);
                return Ok(true);
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(false),
            Err(kube::Error::Api(e)) if e.code == 409 && tries < CONFLICT_RETRIES => tries += 1,
            Err(e) => return Err(e),
        }
    }
}

async fn patch_finalizers(
    api: &Api<UsageBackfill>,
    obj: &UsageBackfill,
    finalizers: Vec<String>,
) -> kube::Result<UsageBackfill> {
    let patch = json!({
        "metadata": {
            "resourceVersion": obj.resource_version(),
            "finalizers": finalizers,
        }
    });
    // Under our field manager, so that managedFields name the operator as
    // the holder of the finalizer (without one, the API server makes up a
    // manager from the client's User-Agent).
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    };
    api.patch(&obj.name_any(), &params, &Patch::Merge(&patch))
        .await
}
