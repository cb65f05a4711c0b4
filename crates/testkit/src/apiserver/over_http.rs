//! The fake API server over real HTTP/1.1 on 127.0.0.1, for a controller
//! running as a subprocess (the `usage-backfill` binary with a kubeconfig
//! pointing at `http://127.0.0.1:PORT`).
//!
//! Each [`HttpServer`] is one client of the fake ([`FakeApiServer::connect`]
//! numbering), so the requests of two processes can be told apart. Request
//! bodies come with a Content-Length or chunked; responses go out with a
//! Content-Length, or chunked for watch streams, which end when the client
//! hangs up. Connections are kept alive.
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

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
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
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (read, mut write) = stream.into_split();
    let mut read = BufReader::new(read);
    loop {
        let mut line = String::new();
        if read.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split(' ');
        let (Some(method), Some(target)) = (words.next(), words.next()) else {
            return Ok(());
        };
        let mut request = Request::builder().method(method).uri(target);
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut header = String::new();
            if read.read_line(&mut header).await? == 0 {
                return Ok(());
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
            request = request.header(name, value);
        }
        let body = if chunked {
            read_chunked(&mut read).await?
        } else {
            let mut body = vec![0; length];
            read.read_exact(&mut body).await?;
            body
        };
        let Ok(request) = request.body(kube::client::Body::from(body)) else {
            return Ok(());
        };
        let (parts, body) = fake.handle(request, client).await.into_parts();
        let head = |framing: &str| {
            format!(
                "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\n{framing}\r\n",
                parts.status.as_u16(),
                parts.status.canonical_reason().unwrap_or("Unknown"),
            )
        };
        match body {
            FakeBody::Full(bytes) => {
                let bytes = bytes.unwrap_or_default();
                let mut out = head(&format!("content-length: {}\r\n", bytes.len())).into_bytes();
                out.extend_from_slice(&bytes);
                write.write_all(&out).await?;
            }
            FakeBody::Stream(mut rx) => {
                write
                    .write_all(head("transfer-encoding: chunked\r\n").as_bytes())
                    .await?;
                let mut probe = [0u8; 512];
                loop {
                    tokio::select! {
                        chunk = rx.recv() => {
                            let Some(chunk) = chunk else { break };
                            let mut out = format!("{:x}\r\n", chunk.len()).into_bytes();
                            out.extend_from_slice(&chunk);
                            out.extend_from_slice(b"\r\n");
                            write.write_all(&out).await?;
                        }
                        // The client hung up (or, unexpectedly, pipelined):
                        // the watch ends with the connection.
                        _ = read.read(&mut probe) => return Ok(()),
                    }
                }
                write.write_all(b"0\r\n\r\n").await?;
            }
        }
        write.flush().await?;
    }
}

async fn read_chunked<R: AsyncBufReadExt + Unpin>(read: &mut R) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        read.read_line(&mut size).await?;
        let size = size.trim_end();
        let size = size.split(';').next().unwrap_or("");
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if size == 0 {
            // Trailers, up to the empty line.
            loop {
                let mut trailer = String::new();
                if read.read_line(&mut trailer).await? == 0 || trailer.trim_end().is_empty() {
                    return Ok(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        read.read_exact(&mut body[start..]).await?;
        let mut crlf = [0u8; 2];
        read.read_exact(&mut crlf).await?;
    }
}
