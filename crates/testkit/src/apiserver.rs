//! A fake Kubernetes API server at the HTTP level, for controller tests,
//! as strict as the apiserver where the controller meets it.
//!
//! `kube::Client::new` runs over a tower-test mock service; a task answers
//! each request from an in-memory store of UsageBackfills, Secrets, Events
//! and Leases. The rules it holds, each shown by a test of
//! `tests/controller/apiserver/`:
//! - UsageBackfills are pruned, defaulted and validated by the CRD's own
//!   schema ([`schema`]) and its CEL rules ([`cel`]); an invalid write
//!   gets 422 with field paths;
//! - the main resource and the `status` subresource are separate both
//!   ways: a main-resource write keeps the stored status, a status write
//!   keeps everything but the status;
//! - server-side apply with field managers and `managedFields` ([`ssa`]):
//!   409 on a conflict with another manager unless `force`, list-map merge
//!   of `conditions` by `type`, removal of fields a manager stops applying;
//!   a write that changes nothing changes nothing (no resourceVersion, no
//!   watch event);
//! - `metadata.generation` moves on spec changes and when a deletion waits
//!   for finalizers; 409 on a stale resourceVersion; 422 when a finalizer
//!   is added to an object being deleted;
//! - watches replay history from their resourceVersion (ADDED, MODIFIED,
//!   DELETED as they happened), send BOOKMARKs when asked to, end with an
//!   ERROR 410 Gone when the resourceVersion is older than the retained
//!   history ([`FakeApiServer::compact`]), and close after `timeoutSeconds`;
//!   lists page with `limit`/`continue` (410 for an expired token), except
//!   at `resourceVersion=0`, served whole as from the watch cache;
//! - Events are created under their name: 409 AlreadyExists on a clash;
//! - per-verb RBAC from the rules the chart grants ([`rbac`]), with get
//!   only or also list/watch on Secrets
//!   ([`FakeApiServer::set_secret_access`]), bound cluster-wide or in the
//!   watched namespaces only ([`FakeApiServer::set_rbac_scope`]): 403 for
//!   anything else;
//! - Events validated as the apiserver validates them ([`events`]): 422
//!   for a missing reportingController, an eventTime-less events.k8s.io
//!   Event, a namespace mismatch, a changed note on a series update;
//! - a create keeps no `status` (the status subresource drops it).
//!
//! ConfigMaps (the operator's progress records): get, create, patch by
//! server-side apply (which creates a missing one, and then needs the
//! `create` verb too), delete; names, data keys and the 1 MiB size
//! validated as the apiserver does (422), an applied name that is not the
//! URL's refused (400), and an apply drops the fields its manager stops
//! sending while keeping other managers' ones.
//!
//! Leases (`coordination.k8s.io/v1`) for leader election: get, create,
//! replace (resourceVersion-guarded) and patch, where a server-side apply
//! conflicts (409) when it would change a field another field manager owns
//! with a different value, and a strategic-merge or merge patch takes the
//! fields it sets (and drops those it nulls): what makes two simultaneous
//! acquisitions of a Lease fail for one of them.
//!
//! Several clients can talk to one server ([`FakeApiServer::connect`]),
//! and each can be cut off ([`FakeApiServer::cut`]): its requests hang
//! until restored and then fail, never reaching the server (a partition),
//! or fail at once with a 503 or a 403.
//!
//! Every request is recorded (method, resource, namespace, name,
//! subresource, query, content type, JSON body, response code) so tests
//! assert what requests mean, not how kube spells them.
//!
//! Files: this one holds the server, its test-facing API and the request
//! dispatch; `usage_backfills`, `config_maps`, `leases` and `events` the
//! per-resource handling; `store` the writes, watch events and routes;
//! `errors` the refusal bodies; `schema`, `cel`, `ssa` and `rbac` the
//! apiserver's rules; `over_http` the same server on a TCP port.
//!
//! `tests/control_plane/cluster.rs` compares this server with a real kube-apiserver (1.34
//! and 1.37): stored objects, refusals (code, reason, message, causes) and
//! the outcome of each step of the controller's writes must match.
//! `tests/control_plane/differential.rs` replays the operator's other requests on both,
//! as its ServiceAccount with the chart's RBAC, and compares every answer
//! (code and body, Status `details` included): ConfigMaps, the Lease,
//! Events, list paging, a watch, RBAC refusals. Not modelled,
//! deliberately: 1.34's wording of a CEL refusal (`Invalid value:
//! "object": ...`; this server words it as 1.37 does), the order of a
//! refusal's causes (the real one follows Go's map iteration; this one
//! sorts them by field), a PUT of a UsageBackfill (the controller never
//! replaces one), RBAC `resourceNames` (the Lease Role names one Lease;
//! this server checks verbs only, so another Lease's name gets 404 where
//! kube-apiserver answers 403), and when the watch cache sends BOOKMARKs.
//! What a real server cannot be made to do on demand stays this server's
//! job: 410 Gone at a chosen moment, cut or slow connections, failing
//! writes, Lease clock skew.

pub mod cel;
mod config_maps;
mod errors;
pub mod events;
mod leases;
pub mod over_http;
pub mod rbac;
pub mod schema;
pub mod ssa;
mod store;
mod usage_backfills;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use usage_backfill_api::{UsageBackfill, UsageBackfillSpec, UsageBackfillStatus};

use errors::*;
use schema::Structural;
use store::*;
use usage_backfills::*;

/// A response body: all at once, or a stream of watch events.
pub enum FakeBody {
    Full(Option<Bytes>),
    Stream(mpsc::UnboundedReceiver<Bytes>),
}

impl http_body::Body for FakeBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            FakeBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            FakeBody::Stream(rx) => rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, FakeBody::Full(None))
    }

    /// Exact for a whole body (sent with a Content-Length over HTTP).
    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            FakeBody::Full(b) => {
                http_body::SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64))
            }
            FakeBody::Stream(_) => http_body::SizeHint::default(),
        }
    }
}

/// One request as the fake API server saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Which client sent it (see [`FakeApiServer::connect`]).
    pub client: ClientId,
    pub method: String,
    pub path: String,
    /// Plural resource: usagebackfills, secrets, events.
    pub resource: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    pub query: BTreeMap<String, String>,
    pub content_type: Option<String>,
    pub body: Option<Value>,
    pub raw_body: String,
    pub code: u16,
}

impl Recorded {
    pub fn field_manager(&self) -> Option<&str> {
        self.query.get("fieldManager").map(String::as_str)
    }

    /// A server-side apply of the status subresource.
    pub fn is_status_apply(&self) -> bool {
        self.method == "PATCH"
            && self.resource == "usagebackfills"
            && self.subresource.as_deref() == Some("status")
            && self.content_type.as_deref() == Some("application/apply-patch+yaml")
    }

    /// The status sent, when this is a status write.
    pub fn status(&self) -> Option<UsageBackfillStatus> {
        if !self.is_status_apply() {
            return None;
        }
        serde_json::from_value(self.body.as_ref()?.get("status")?.clone()).ok()
    }

    pub fn is_watch(&self) -> bool {
        self.query.get("watch").map(String::as_str) == Some("true")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Key {
    resource: String,
    namespace: String,
    name: String,
}

struct Watch {
    id: u64,
    resource: String,
    namespace: Option<String>,
    meta_only: bool,
    /// `allowWatchBookmarks=true`.
    bookmarks: bool,
    tx: mpsc::UnboundedSender<Bytes>,
}

/// One change, as a watch from an older resourceVersion replays it.
struct Change {
    rv: u64,
    key: Key,
    verb: &'static str,
    object: Value,
}

/// How many changes the server keeps for watches to resume from (etcd
/// compacts its history the same way).
const HISTORY: usize = 10_000;

/// A client of the fake, as numbered by [`FakeApiServer::connect`].
pub type ClientId = u64;

/// How a cut-off client's requests fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// No answer until restored, then a 503: the request never reached
    /// the server (a partition).
    Hang,
    /// 503 Service Unavailable at once.
    Fail,
    /// 403 Forbidden at once (RBAC says no).
    Forbid,
}

/// Which writes of a UsageBackfill [`FakeApiServer::refuse_writes`]
/// refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Writes of the `status` subresource.
    Status,
    /// Writes of the main resource (the finalizer's merge patches).
    Object,
}

/// A refusal to come: which writes, how many more, the causes.
struct Refusal {
    which: Refused,
    left: usize,
    causes: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<Key, Value>,
    /// Leases only: spec field -> the field manager owning it.
    owners: BTreeMap<Key, BTreeMap<String, String>>,
    clients: u64,
    outages: BTreeMap<ClientId, Outage>,
    /// Requests of a cut-off client waiting for it to be restored.
    hung: BTreeSet<u64>,
    next_hung: u64,
    requests: Vec<Recorded>,
    last_rv: u64,
    uid: u64,
    watches: Vec<Watch>,
    next_watch: u64,
    /// Changes after `floor`, oldest first.
    history: VecDeque<Change>,
    /// A watch or a continued list from before this resourceVersion gets
    /// 410 Gone.
    floor: u64,
    /// The rest of paginated lists: continue token -> (the list's
    /// resourceVersion, items still to send).
    pages: BTreeMap<u64, (u64, Vec<Value>)>,
    next_page: u64,
    /// Answer this many status writes of this phase with a 500.
    fail_status_writes: Option<(String, usize)>,
    /// Answer writes with a 422 Invalid.
    refusal: Option<Refusal>,
    /// The RBAC mode of the operator's Secret access.
    secret_access: rbac::SecretAccess,
    /// Where the operator's Roles and ClusterRoles apply.
    rbac_scope: rbac::Scope,
}

/// The fake API server; cheap to clone.
#[derive(Clone)]
pub struct FakeApiServer {
    state: Arc<Mutex<State>>,
}

const UBF_API: &str = "usage.multica.ai/v1alpha1";

impl FakeApiServer {
    /// Starts the server; the client talks to it with default namespace
    /// "default".
    pub fn start() -> (kube::Client, FakeApiServer) {
        let fake = FakeApiServer {
            state: Arc::new(Mutex::new(State::default())),
        };
        let (client, _) = fake.connect();
        (client, fake)
    }

    /// Another client of the same server (default namespace "default"),
    /// e.g. a second replica of the operator.
    pub fn connect(&self) -> (kube::Client, ClientId) {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<FakeBody>>();
        let id = {
            let mut st = self.state();
            st.clients += 1;
            st.clients - 1
        };
        let server = self.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let server = server.clone();
                tokio::spawn(async move {
                    let response = server.handle(request, id).await;
                    respond.send_response(response);
                });
            }
        });
        (kube::Client::new(service, "default"), id)
    }

    /// Cuts `client` off (`Some`) or restores it (`None`).
    pub fn cut(&self, client: ClientId, outage: Option<Outage>) {
        let mut st = self.state();
        match outage {
            Some(o) => st.outages.insert(client, o),
            None => st.outages.remove(&client),
        };
    }

    /// Grants the operator Secret access as the chart does in `access`
    /// mode (get only, the default, or also list and watch).
    pub fn set_secret_access(&self, access: rbac::SecretAccess) {
        self.state().secret_access = access;
    }

    /// Binds the operator's rules as the chart does in `scope`: by default
    /// a ClusterRole (every namespace) and the Lease's Role wherever the
    /// Lease is; [`rbac::Scope::namespaced`] for `watchNamespaces`.
    pub fn set_rbac_scope(&self, scope: rbac::Scope) {
        self.state().rbac_scope = scope;
    }

    /// Requests hanging because their client is cut off.
    pub fn hung_requests(&self) -> usize {
        self.state().hung.len()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    // -----------------------------------------------------------------
    // The test's side: arrange and inspect
    // -----------------------------------------------------------------

    /// Creates a UsageBackfill (generation 1, a uid, no status).
    pub fn create(&self, namespace: &str, name: &str, spec: UsageBackfillSpec) -> UsageBackfill {
        let mut obj = serde_json::to_value(UsageBackfill::new(name, spec)).unwrap();
        obj["metadata"]["namespace"] = json!(namespace);
        obj["metadata"]["generation"] = json!(1);
        obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        let mut st = self.state();
        st.uid += 1;
        obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", st.uid));
        let key = Key {
            resource: "usagebackfills".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        let obj =
            admitted(obj, None).unwrap_or_else(|e| panic!("the API server refuses {name}: {e:?}"));
        st.store(key, obj, "ADDED");
        drop(st);
        self.get(namespace, name).unwrap()
    }

    pub fn get(&self, namespace: &str, name: &str) -> Option<UsageBackfill> {
        let st = self.state();
        let v = st.objects.get(&Key {
            resource: "usagebackfills".into(),
            namespace: namespace.into(),
            name: name.into(),
        })?;
        Some(serde_json::from_value(v.clone()).unwrap())
    }

    /// Changes the spec (a new generation), as `kubectl apply` would.
    pub fn edit_spec(
        &self,
        namespace: &str,
        name: &str,
        edit: impl FnOnce(&mut UsageBackfillSpec),
    ) {
        let mut obj = self.get(namespace, name).expect("object exists");
        edit(&mut obj.spec);
        let spec = serde_json::to_value(&obj.spec).unwrap();
        let mut st = self.state();
        let key = Key {
            resource: "usagebackfills".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        let old = st.objects.get(&key).unwrap().clone();
        let mut v = old.clone();
        v["spec"] = spec;
        let v = admitted(v, Some(&old))
            .unwrap_or_else(|e| panic!("the API server refuses the edit of {name}: {e:?}"));
        st.store_if_changed(key, &old, v);
    }

    /// Replaces the status directly, applied (forced) by the field manager
    /// `manager`: as an earlier controller left it.
    pub fn set_status_as(
        &self,
        manager: &str,
        namespace: &str,
        name: &str,
        status: &UsageBackfillStatus,
    ) {
        let mut st = self.state();
        let key = Key {
            resource: "usagebackfills".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        let old = st.objects.get(&key).unwrap().clone();
        let applied = json!({ "status": serde_json::to_value(status).unwrap() });
        let manager = ssa::Manager {
            name: manager.to_owned(),
            operation: "Apply".into(),
            subresource: "status".into(),
        };
        let (mut v, owners) =
            ssa::apply(&old, &applied, &manager, true, Structural::usage_backfill())
                .unwrap_or_else(|_| unreachable!("a forced apply has no conflicts"));
        ssa::set_owners(&mut v, &owners, UBF_API);
        let v = admitted(v, Some(&old))
            .unwrap_or_else(|e| panic!("the API server refuses this status of {name}: {e:?}"));
        st.store_if_changed(key, &old, v);
    }

    /// `kubectl delete`: marks the object deleted; it goes once no
    /// finalizer holds it.
    pub fn delete(&self, namespace: &str, name: &str) {
        let mut st = self.state();
        let key = Key {
            resource: "usagebackfills".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        let Some(mut v) = st.objects.get(&key).cloned() else {
            return;
        };
        if !v["metadata"]["deletionTimestamp"].is_null() {
            return;
        }
        v["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:01Z");
        // A deletion that waits for finalizers is a change of the object's
        // desired state: the apiserver bumps the generation.
        let g = v["metadata"]["generation"].as_i64().unwrap_or(1);
        v["metadata"]["generation"] = json!(g + 1);
        st.store_or_finish_deletion(key, v);
    }

    /// Drops the change history (as etcd compaction does): a watch or a
    /// continued list from an older resourceVersion then gets 410 Gone.
    pub fn compact(&self) {
        let mut st = self.state();
        st.floor = st.last_rv;
        st.history.clear();
    }

    /// Ends every open watch from the server's side (an apiserver restart,
    /// a load balancer's idle timeout): clients resume from their last
    /// resourceVersion.
    pub fn close_watches(&self) {
        self.state().watches.clear();
    }

    /// Sends a BOOKMARK at the current resourceVersion to every watch that
    /// allowed them (the apiserver does so about once a minute).
    pub fn bookmark(&self) {
        let mut st = self.state();
        let rv = st.last_rv;
        st.watches.retain(|w| {
            !w.bookmarks
                || w.tx
                    .send(bookmark_line(&w.resource, w.meta_only, rv))
                    .is_ok()
        });
    }

    /// Watches open now (of any client).
    pub fn open_watches(&self) -> usize {
        let mut st = self.state();
        st.watches.retain(|w| !w.tx.is_closed());
        st.watches.len()
    }

    /// Creates or replaces an Opaque Secret with one key.
    pub fn put_secret(&self, namespace: &str, name: &str, key: &str, value: &str) {
        // ByteString serializes as base64, like the apiserver's data.
        let data =
            serde_json::to_value(k8s_openapi::ByteString(value.as_bytes().to_vec())).unwrap();
        let mut st = self.state();
        st.uid += 1;
        let obj = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": format!("00000000-0000-0000-0001-{:012}", st.uid),
            },
            "type": "Opaque",
            "data": { key: data },
        });
        let k = Key {
            resource: "secrets".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        st.upsert(k, obj);
    }

    /// The Lease `namespace/name`, as stored.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&Key {
                resource: "leases".into(),
                namespace: namespace.into(),
                name: name.into(),
            })
            .cloned()
    }

    /// Who holds the Lease, per its spec.
    pub fn lease_holder(&self, namespace: &str, name: &str) -> Option<String> {
        self.lease(namespace, name)?["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_owned)
    }

    /// The ConfigMap `namespace/name`, as stored.
    pub fn config_map(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&Key {
                resource: "configmaps".into(),
                namespace: namespace.into(),
                name: name.into(),
            })
            .cloned()
    }

    /// Names of the ConfigMaps of `namespace`.
    pub fn config_map_names(&self, namespace: &str) -> Vec<String> {
        self.state()
            .objects
            .keys()
            .filter(|k| k.resource == "configmaps" && k.namespace == namespace)
            .map(|k| k.name.clone())
            .collect()
    }

    /// Creates or replaces ConfigMap `namespace/name` with `data` and
    /// `labels`, as `kubectl apply` of someone else would.
    pub fn put_config_map(
        &self,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        data: &BTreeMap<String, String>,
    ) {
        let mut st = self.state();
        st.uid += 1;
        let obj = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "uid": format!("00000000-0000-0000-0004-{:012}", st.uid),
                "labels": labels,
            },
            "data": data,
        });
        let k = Key {
            resource: "configmaps".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        st.owners.remove(&k);
        st.upsert(k, obj);
    }

    /// Answer the next `count` status writes of `phase` with a 500.
    pub fn fail_status_writes(&self, phase: &str, count: usize) {
        self.state().fail_status_writes = Some((phase.to_owned(), count));
    }

    /// Answer the next `count` writes of `which` with the 422 Invalid a
    /// Kubernetes without validation ratcheting (before 1.30) gives every
    /// write to an object stored before a rule it breaks: a Status of
    /// reason Invalid, one cause per `(field, message)`, and the message
    /// kube-apiserver builds from them. Nothing is stored.
    pub fn refuse_writes(&self, which: Refused, count: usize, causes: &[(&str, &str)]) {
        self.state().refusal = Some(Refusal {
            which,
            left: count,
            causes: causes
                .iter()
                .map(|(f, m)| ((*f).to_owned(), (*m).to_owned()))
                .collect(),
        });
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Status writes to `name`, in order.
    pub fn status_writes(&self, name: &str) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_status_apply() && r.name.as_deref() == Some(name) && r.code < 300)
            .collect()
    }

    /// The statuses written to `name`, in order.
    pub fn statuses(&self, name: &str) -> Vec<UsageBackfillStatus> {
        self.status_writes(name)
            .iter()
            .filter_map(Recorded::status)
            .collect()
    }

    /// Events about `name` (reason, type, note), in order; a repeat
    /// folded into an Event's series (a PATCH) counts as one more.
    pub fn events(&self, name: &str) -> Vec<(String, String, String)> {
        self.requests()
            .into_iter()
            .filter(|r| r.resource == "events" && ["POST", "PATCH"].contains(&r.method.as_str()))
            .filter(|r| r.code < 300)
            .filter_map(|r| r.body)
            .filter(|b| b["regarding"]["name"] == json!(name))
            .map(|b| {
                let s = |k: &str| b[k].as_str().unwrap_or_default().to_owned();
                (s("reason"), s("type"), s("note"))
            })
            .collect()
    }

    pub fn event_reasons(&self, name: &str) -> Vec<String> {
        self.events(name).into_iter().map(|e| e.0).collect()
    }

    /// Requests the server could not route (a test bug or a new API use).
    pub fn unexpected(&self) -> Vec<Recorded> {
        self.requests()
            .into_iter()
            .filter(|r| r.code == 418)
            .collect()
    }

    /// Polls `check` every 20 ms until it gives `Some`, failing the test
    /// after `timeout` with `what`.
    pub async fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&FakeApiServer) -> Option<T>,
    ) -> T {
        let polled = tokio::time::timeout(timeout, async {
            loop {
                if let Some(v) = check(self) {
                    return v;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await;
        match polled {
            Ok(v) => v,
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}; requests so far:\n{}",
                self.describe_requests()
            ),
        }
    }

    /// One line per request, for failure messages.
    pub fn describe_requests(&self) -> String {
        self.requests()
            .iter()
            .map(|r| {
                let phase = r
                    .status()
                    .and_then(|s| s.phase)
                    .map(|p| format!(" phase={}", p.as_str()))
                    .unwrap_or_default();
                format!(
                    "{} {} {}/{}{} -> {}{}",
                    r.method,
                    r.resource,
                    r.namespace.as_deref().unwrap_or("-"),
                    r.name.as_deref().unwrap_or("-"),
                    r.subresource
                        .as_ref()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                    r.code,
                    phase
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    // -----------------------------------------------------------------
    // The API server's side
    // -----------------------------------------------------------------

    fn handle(
        &self,
        request: Request<kube::client::Body>,
        client: ClientId,
    ) -> impl Future<Output = Response<FakeBody>> + Send + 'static {
        let this = self.clone();
        async move {
            let outage = this.state().outages.get(&client).copied();
            match outage {
                Some(o @ (Outage::Fail | Outage::Forbid)) => {
                    let (code, body) = if o == Outage::Fail {
                        status_error(503, "ServiceUnavailable", "injected outage")
                    } else {
                        status_error(403, "Forbidden", "injected: RBAC denies this request")
                    };
                    return Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(body)
                        .unwrap();
                }
                Some(Outage::Hang) => {
                    let ticket = {
                        let mut st = this.state();
                        st.next_hung += 1;
                        let t = st.next_hung;
                        st.hung.insert(t);
                        t
                    };
                    // Removed from `hung` however this ends (the client may
                    // give up and drop the request).
                    struct Unhang(FakeApiServer, u64);
                    impl Drop for Unhang {
                        fn drop(&mut self) {
                            self.0.state().hung.remove(&self.1);
                        }
                    }
                    let _unhang = Unhang(this.clone(), ticket);
                    while this.state().outages.get(&client) == Some(&Outage::Hang) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    // It never reached the server: the connection broke.
                    let (code, body) =
                        status_error(503, "ServiceUnavailable", "connection lost in a partition");
                    return Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(body)
                        .unwrap();
                }
                None => {}
            }
            let (parts, body) = request.into_parts();
            let raw = body.collect_bytes().await.unwrap_or_default();
            let raw_body = String::from_utf8_lossy(&raw).into_owned();
            let body: Option<Value> = serde_json::from_slice(&raw).ok();
            let query: BTreeMap<String, String> = parts
                .uri
                .query()
                .unwrap_or("")
                .split('&')
                .filter(|p| !p.is_empty())
                .map(|p| {
                    let (k, v) = p.split_once('=').unwrap_or((p, ""));
                    (k.to_owned(), v.to_owned())
                })
                .collect();
            let route = Route::parse(parts.uri.path());
            let header = |h: http::header::HeaderName| {
                parts
                    .headers
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let mut rec = Recorded {
                client,
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                resource: route.resource.clone().unwrap_or_default(),
                namespace: route.namespace.clone(),
                name: route.name.clone(),
                subresource: route.subresource.clone(),
                query,
                content_type: header(http::header::CONTENT_TYPE),
                body: body.clone(),
                raw_body,
                code: 0,
            };
            let meta_only = header(http::header::ACCEPT)
                .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
            // Answered and recorded under one lock: a test reading the
            // requests right after a change of its own (a delete) must not
            // count as later a write the server applied before it.
            let (code, response) = {
                let mut st = this.state();
                let answer = this.respond(&mut st, &rec, &route, meta_only);
                rec.code = answer.0.as_u16();
                st.requests.push(rec);
                answer
            };
            Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(response)
                .unwrap()
        }
    }

    /// The answer to `r`, computed under the caller's lock on the state.
    fn respond(
        &self,
        st: &mut State,
        r: &Recorded,
        route: &Route,
        meta_only: bool,
    ) -> (StatusCode, FakeBody) {
        let Some(resource) = route.resource.clone() else {
            return teapot(r);
        };
        if ![
            "usagebackfills",
            "secrets",
            "events",
            "leases",
            "configmaps",
        ]
        .contains(&resource.as_str())
        {
            return teapot(r);
        }
        let verb = rbac::verb(&r.method, route.name.is_some(), r.is_watch());
        let rbac_resource = match &route.subresource {
            Some(sub) => format!("{resource}/{sub}"),
            None => resource.clone(),
        };
        if !rbac::authorize(
            st.secret_access,
            &st.rbac_scope,
            route.namespace.as_deref(),
            &route.group,
            &rbac_resource,
            verb,
        ) {
            // A list, a watch or a create is refused without a name.
            let name = route.name.as_deref().filter(|_| verb != "create");
            return forbidden(
                OPERATOR_USER,
                verb,
                &resource,
                route.subresource.as_deref(),
                route.namespace.as_deref(),
                name,
            );
        }
        if resource == "leases"
            && let Some(answer) = st.lease_request(r, route)
        {
            return answer;
        }
        if resource == "configmaps"
            && let Some(answer) = st.config_map_request(r, route)
        {
            return answer;
        }
        let key = |name: &str| Key {
            resource: resource.clone(),
            namespace: route.namespace.clone().unwrap_or_default(),
            name: name.to_owned(),
        };
        let in_scope = |k: &Key| {
            k.resource == resource && route.namespace.as_ref().is_none_or(|ns| *ns == k.namespace)
        };
        match (r.method.as_str(), &route.name, route.subresource.as_deref()) {
            ("GET", None, None) if r.is_watch() => {
                let (tx, rx) = mpsc::unbounded_channel();
                let since = r.query.get("resourceVersion").map(String::as_str);
                match since.unwrap_or("") {
                    // No resourceVersion, or 0: the current state as ADDED.
                    "" | "0" => {
                        for (k, v) in &st.objects {
                            if in_scope(k) {
                                let _ = tx.send(watch_line("ADDED", v, meta_only));
                            }
                        }
                    }
                    n => {
                        let n: u64 = n.parse().unwrap_or(0);
                        if n < st.floor {
                            let gone = json!({
                                "type": "ERROR",
                                "object": {
                                    "apiVersion": "v1",
                                    "kind": "Status",
                                    "metadata": {},
                                    "status": "Failure",
                                    "message": format!("too old resource version: {n} ({})", st.floor),
                                    "reason": "Expired",
                                    "code": 410,
                                },
                            });
                            let mut line = serde_json::to_vec(&gone).unwrap();
                            line.push(b'\n');
                            let _ = tx.send(Bytes::from(line));
                            // The stream ends after the error.
                            return (StatusCode::OK, FakeBody::Stream(rx));
                        }
                        for c in &st.history {
                            if c.rv > n && in_scope(&c.key) {
                                let _ = tx.send(watch_line(c.verb, &c.object, meta_only));
                            }
                        }
                    }
                }
                st.next_watch += 1;
                let id = st.next_watch;
                let bookmarks =
                    r.query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
                st.watches.push(Watch {
                    id,
                    resource: resource.clone(),
                    namespace: route.namespace.clone(),
                    meta_only,
                    bookmarks,
                    tx,
                });
                if let Some(secs) = r
                    .query
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    let this = self.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(secs)).await;
                        let mut st = this.state();
                        let rv = st.last_rv;
                        // A last BOOKMARK, then the server closes the watch.
                        st.watches.retain(|w| {
                            if w.id == id && w.bookmarks {
                                let _ = w.tx.send(bookmark_line(&w.resource, w.meta_only, rv));
                            }
                            w.id != id
                        });
                    });
                }
                (StatusCode::OK, FakeBody::Stream(rx))
            }
            ("GET", None, None) => {
                let (list_rv, mut items) = if let Some(token) =
                    r.query.get("continue").filter(|t| !t.is_empty())
                {
                    let page = token
                        .strip_prefix("page-")
                        .and_then(|id| id.parse::<u64>().ok())
                        .and_then(|id| st.pages.remove(&id));
                    match page {
                        Some((rv, items)) if rv >= st.floor => (rv, items),
                        _ => {
                            return status_error(
                                410,
                                "Expired",
                                "The provided continue parameter is too old to display a consistent list result. \
                                 You can start a new list without the continue parameter.",
                            );
                        }
                    }
                } else {
                    let items = st
                        .objects
                        .iter()
                        .filter(|(k, _)| in_scope(k))
                        .map(|(_, v)| if meta_only { meta(v) } else { v.clone() })
                        .collect::<Vec<_>>();
                    (st.last_rv, items)
                };
                // resourceVersion=0 is served from the watch cache, which
                // ignores `limit`: one response with everything.
                let from_cache = r.query.get("resourceVersion").map(String::as_str) == Some("0");
                let limit = r
                    .query
                    .get("limit")
                    .and_then(|l| l.parse::<usize>().ok())
                    .filter(|l| *l > 0 && !from_cache);
                let mut continue_token = None;
                let mut remaining = None;
                if let Some(limit) = limit
                    && items.len() > limit
                {
                    let rest = items.split_off(limit);
                    remaining = Some(rest.len());
                    st.next_page += 1;
                    let id = st.next_page;
                    st.pages.insert(id, (list_rv, rest));
                    continue_token = Some(format!("page-{id}"));
                }
                let kind = if meta_only {
                    "PartialObjectMetadataList".to_owned()
                } else {
                    format!("{}List", kind_of(&resource))
                };
                let mut metadata = json!({ "resourceVersion": list_rv.to_string() });
                if let Some(t) = continue_token {
                    metadata["continue"] = json!(t);
                    metadata["remainingItemCount"] = json!(remaining);
                } else if resource == "usagebackfills" && !meta_only {
                    // A custom resource's list is unstructured: its
                    // metadata keeps the empty token.
                    metadata["continue"] = json!("");
                }
                let list = json!({
                    "apiVersion": if meta_only { "meta.k8s.io/v1" } else { api_version_of(&resource) },
                    "kind": kind,
                    "metadata": metadata,
                    "items": items,
                });
                ok(&list)
            }
            ("GET", Some(name), None) => match st.objects.get(&key(name)) {
                Some(v) => ok(&if meta_only { meta(v) } else { v.clone() }),
                None => not_found(&resource, name),
            },
            ("GET", Some(name), Some("status")) if resource == "usagebackfills" => {
                match st.objects.get(&key(name)) {
                    Some(v) => ok(v),
                    None => not_found(&resource, name),
                }
            }
            ("POST", None, None) if resource == "events" => {
                let mut v = r.body.clone().unwrap_or_default();
                let name = match (
                    v["metadata"]["name"].as_str(),
                    v["metadata"]["generateName"].as_str(),
                ) {
                    (Some(n), _) => n.to_owned(),
                    (None, Some(prefix)) => format!("{prefix}{:05x}", st.last_rv + 1),
                    (None, None) => {
                        return status_error(
                            422,
                            "Invalid",
                            "metadata.name: Required value: name or generateName is required",
                        );
                    }
                };
                if st.objects.contains_key(&key(&name)) {
                    return status_with_details(
                        409,
                        "AlreadyExists",
                        &format!("{} \"{name}\" already exists", qualified(&resource)),
                        resource_details(&resource, Some(&name)),
                    );
                }
                v["metadata"]["name"] = json!(name);
                let namespace = route.namespace.clone().unwrap_or_default();
                let causes = events::validate_create(&v, &namespace, &route.group);
                if !causes.is_empty() {
                    return invalid_event(&name, &route.group, &causes);
                }
                v["metadata"]["name"] = json!(name);
                v["metadata"]["namespace"] = json!(route.namespace.clone().unwrap_or_default());
                events::fill_deprecated_fields(&mut v, &route.group);
                st.uid += 1;
                v["metadata"]["uid"] = json!(format!("00000000-0000-0000-0003-{:012}", st.uid));
                st.store(key(&name), v.clone(), "ADDED");
                (StatusCode::CREATED, full(&st.objects[&key(&name)]))
            }
            ("PATCH", Some(name), None) if resource == "events" => {
                let Some(mut v) = st.objects.get(&key(name)).cloned() else {
                    return not_found(&resource, name);
                };
                let old = v.clone();
                merge(&mut v, r.body.as_ref().unwrap_or(&Value::Null));
                let namespace = route.namespace.clone().unwrap_or_default();
                let causes = events::validate_update(&v, &old, &namespace, &route.group);
                if !causes.is_empty() {
                    return invalid_event(name, &route.group, &causes);
                }
                st.store(key(name), v.clone(), "MODIFIED");
                ok(&v)
            }
            ("PATCH", Some(name), sub @ (None | Some("status")))
                if resource == "usagebackfills" =>
            {
                let status_write = sub.is_some();
                let which = if status_write {
                    Refused::Status
                } else {
                    Refused::Object
                };
                if let Some(refusal) = &mut st.refusal
                    && refusal.which == which
                    && refusal.left > 0
                {
                    refusal.left -= 1;
                    let causes: Vec<(&str, &str, &str)> = refusal
                        .causes
                        .iter()
                        .map(|(f, m)| (f.as_str(), cause_reason(m), m.as_str()))
                        .collect();
                    return invalid(name, &causes);
                }
                if status_write {
                    let phase = r.body.as_ref().and_then(|b| b["status"]["phase"].as_str());
                    if let Some((failing, left)) = &mut st.fail_status_writes
                        && *left > 0
                        && phase == Some(failing.as_str())
                    {
                        *left -= 1;
                        return status_error(500, "InternalError", "injected failure");
                    }
                }
                let Some(old) = st.objects.get(&key(name)).cloned() else {
                    return not_found(&resource, name);
                };
                match patch_usage_backfill(r, &old, status_write) {
                    Ok(v) => {
                        let v = st.store_if_changed(key(name), &old, v);
                        ok(&v)
                    }
                    Err(e) => e,
                }
            }
            _ => teapot(r),
        }
    }
}
