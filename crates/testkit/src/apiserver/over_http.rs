//! The fake API server over real HTTP/1.1 on 127.0.0.1, for a controller
//! running as a subprocess (the `usage-backfill` binary with a kubeconfig
//! pointing at `http://127.0.0.1:PORT`).
//!
//! Each [`HttpServer`] is one client of the fake ([`FakeApiServer::connect`]
//! numbering), so the requests of two processes can be told apart. HTTP/1.1
//! is hyper's: request bodies come with a Content-Length or chunked;
//! responses go out with a Content-Length, or chunked for watch streams,
//! which end when the server closes the watch or the client hangs up.
//! Connections are kept alive.
//!
//! Declared as `support::over_http` (a module named `http` would shadow the
//! `http` crate in `support`).
//!
//! Also here: raw objects ([`FakeApiServer::create_raw`], or
//! [`FakeApiServer::try_create_raw`] to see a refusal), for specs that the
//! typed [`UsageBackfillSpec`] cannot hold (what an API server stores when
//! its CRD schema does not forbid a value), and objects stored under an
//! older, looser schema ([`FakeApiServer::create_legacy`]).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use super::*;

/// The fake, served on 127.0.0.1; stops serving when dropped.
pub struct HttpServer {
    pub addr: SocketAddr,
    /// The client id its requests are recorded under.
    pub client: ClientId,
    accept: JoinHandle<()>,
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl HttpServer {
    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server (default namespace "default")
    /// into `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join(format!("kubeconfig-{}", self.client));
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
    namespace: default
current-context: fake
users:
- name: fake
  user: {{}}
",
            self.url()
        );
        std::fs::write(&path, text).expect("writing the kubeconfig");
        path
    }
}

impl FakeApiServer {
    /// Serves this fake over HTTP on an ephemeral port of 127.0.0.1, as a
    /// client of its own.
    pub async fn serve_http(&self) -> HttpServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().unwrap();
        let client = {
            let mut st = self.state();
            st.clients += 1;
            st.clients - 1
        };
        let fake = self.clone();
        let accept = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fake = fake.clone();
                tokio::spawn(async move {
                    // A connection ends with the client: nothing to report.
                    let _ = serve_connection(fake, stream, client).await;
                });
            }
        });
        HttpServer {
            addr,
            client,
            accept,
        }
    }

    /// Creates a UsageBackfill whose spec is `spec` as given, through the
    /// CRD schema (pruned, defaulted; panics when the API server would
    /// refuse it), generation 1, a uid.
    pub fn create_raw(&self, namespace: &str, name: &str, spec: Value) {
        if let Err(e) = self.try_create_raw(namespace, name, spec) {
            panic!("the API server refuses {name}: {}", e.message);
        }
    }

    /// [`create_raw`](Self::create_raw), or the apiserver's 422 Invalid
    /// when the CRD's schema or its CEL rules refuse the object (then
    /// nothing is stored).
    pub fn try_create_raw(
        &self,
        namespace: &str,
        name: &str,
        spec: Value,
    ) -> Result<(), Box<kube::core::Status>> {
        self.try_create_object(json!({
            "apiVersion": UBF_API,
            "kind": "UsageBackfill",
            "metadata": { "name": name, "namespace": namespace },
            "spec": spec,
        }))
    }

    /// Creates a whole UsageBackfill as `kubectl create -f` sends it
    /// (metadata.name and metadata.namespace set), or the apiserver's 422:
    /// pruned, defaulted, validated, generation 1, a uid, and without the
    /// `status` it may carry (dropped on create, as the status subresource
    /// makes the apiserver do).
    pub fn try_create_object(&self, object: Value) -> Result<(), Box<kube::core::Status>> {
        let mut obj = object;
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let namespace = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        obj["metadata"]["generation"] = json!(1);
        obj["metadata"]["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
        let name = name.as_str();
        let namespace = namespace.as_str();
        let mut obj = admitted(obj, None).map_err(|errors| {
            let causes: Vec<(&str, &str, &str)> = errors
                .iter()
                .map(|e| (e.field.as_str(), e.reason, e.message.as_str()))
                .collect();
            Box::new(
                serde_json::from_value(invalid_status(name, &causes))
                    .expect("a Status deserializes"),
            )
        })?;
        let mut st = self.state();
        st.uid += 1;
        obj["metadata"]["uid"] = json!(format!("00000000-0000-0000-0000-{:012}", st.uid));
        let key = Key {
            resource: "usagebackfills".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        st.store(key, obj, "ADDED");
        Ok(())
    }

    /// Creates a UsageBackfill whose spec the CRD's schema refuses now, as
    /// stored before the schema forbade it: the apiserver validates
    /// writes, not what it reads, so such an object is served as stored
    /// (pruned and defaulted, as every read is). Generation 1, a uid.
    pub fn create_legacy(&self, namespace: &str, name: &str, spec: Value) {
        let mut st = self.state();
        st.uid += 1;
        let mut obj = json!({
            "apiVersion": UBF_API,
            "kind": "UsageBackfill",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "uid": format!("00000000-0000-0000-0000-{:012}", st.uid),
            },
            "spec": spec,
        });
        Structural::usage_backfill().normalize(&mut obj);
        let key = Key {
            resource: "usagebackfills".into(),
            namespace: namespace.into(),
            name: name.into(),
        };
        st.store(key, obj, "ADDED");
    }

    /// A UsageBackfill as stored, untyped (also the ones
    /// [`create_raw`](Self::create_raw) made).
    pub fn get_raw(&self, namespace: &str, name: &str) -> Option<Value> {
        self.state()
            .objects
            .get(&Key {
                resource: "usagebackfills".into(),
                namespace: namespace.into(),
                name: name.into(),
            })
            .cloned()
    }
}

async fn serve_connection(
    fake: FakeApiServer,
    stream: TcpStream,
    client: ClientId,
) -> hyper::Result<()> {
    // Small writes (watch events) go out at once.
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request: Request<Incoming>| {
        let fake = fake.clone();
        async move {
            let (parts, body) = request.into_parts();
            let body = http_body_util::BodyExt::collect(body).await?.to_bytes();
            let request = Request::from_parts(parts, kube::client::Body::from(body.to_vec()));
            let mut response = fake.handle(request, client).await;
            response
                .headers_mut()
                .entry(http::header::CONTENT_TYPE)
                .or_insert(http::HeaderValue::from_static("application/json"));
            // hyper frames by the body: a Content-Length when its size is
            // known (`FakeBody::size_hint`), chunked for a watch.
            Ok::<_, hyper::Error>(response)
        }
    });
    http1::Builder::new()
        .serve_connection(TokioIo::new(stream), service)
        .await
}
