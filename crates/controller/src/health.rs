//! `/healthz`, `/readyz` and `/metrics` over HTTP/1 (hyper), enough for
//! the kubelet's `httpGet` probes and a Prometheus scrape, with no web
//! framework. One request per connection, answered within 5 s.
//!
//! - `/healthz` (and `/livez`): 200 while the process serves; a standby
//!   replica is healthy, so Kubernetes never restarts it for waiting.
//! - `/readyz`: the leader (or the only replica, without leader election)
//!   is ready once its UsageBackfill cache has synced; a standby replica is
//!   ready too ("ready, standby"), so that a rolling update, which waits for
//!   new pods to be Ready while the old leader still holds the Lease, does
//!   not stall, and so that its `/metrics` stay behind the Service.
//! - `/metrics`: the Prometheus text format ([`super::metrics`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::metrics::{self, Metrics};

/// What the endpoints report.
#[derive(Debug)]
pub struct State {
    leader_election: bool,
    leading: AtomicBool,
    synced: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
}

impl State {
    /// Not leading, not synced. Without leader election, call
    /// [`set_leading`](Self::set_leading)`(true)` once.
    pub fn new(leader_election: bool, metrics: Arc<Metrics>) -> Arc<Self> {
        Arc::new(State {
            leader_election,
            leading: AtomicBool::new(false),
            synced: Arc::new(AtomicBool::new(false)),
            metrics,
        })
    }

    /// Set by the controllers once the UsageBackfill cache has synced.
    pub fn synced(&self) -> Arc<AtomicBool> {
        self.synced.clone()
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Release);
        if !leading {
            self.synced.store(false, Ordering::Release);
        }
        self.metrics.set_leader(leading);
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Status and body of `/readyz`.
    fn readiness(&self) -> (StatusCode, &'static str) {
        let synced = self.synced.load(Ordering::Acquire);
        let leading = self.leading.load(Ordering::Acquire);
        match (self.leader_election, leading, synced) {
            (true, false, _) => (StatusCode::OK, "ok: standby (another replica leads)\n"),
            (true, true, true) => (StatusCode::OK, "ok: leader\n"),
            (false, _, true) => (StatusCode::OK, "ok\n"),
            (_, _, false) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the UsageBackfill cache has not synced yet\n",
            ),
        }
    }
}

/// Serves the endpoints until `cancel`.
pub async fn serve(listener: TcpListener, state: Arc<State>, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "health listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = cancel.cancelled() => return,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let response = respond(request.method(), request.uri().path(), &state);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .keep_alive(false)
                // `Content-Type`, not `content-type`: what raw readers match.
                .title_case_headers(true)
                .serve_connection(TokioIo::new(stream), service);
            // A client that stalls loses its connection; nothing to report.
            let _ = tokio::time::timeout(Duration::from_secs(5), connection).await;
        });
    }
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The response to `method` on `path` (hyper leaves out the body of a
/// HEAD response).
fn respond(method: &Method, path: &str, state: &State) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static(content_type),
        );
        response
    };
    let text = |status, body: &str| reply(status, TEXT, body.to_owned());
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/healthz" | "/livez" => text(StatusCode::OK, "ok\n"),
        "/readyz" => {
            let (status, body) = state.readiness();
            text(status, body)
        }
        "/metrics" => reply(
            StatusCode::OK,
            metrics::CONTENT_TYPE,
            state.metrics.encode(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    fn status(method: Method, path: &str, state: &State) -> StatusCode {
        respond(&method, path, state).status()
    }

    #[test]
    fn routes() {
        let state = State::new(false, Metrics::new());
        assert_eq!(status(Method::GET, "/healthz", &state), StatusCode::OK);
        assert_eq!(
            status(Method::GET, "/readyz", &state),
            StatusCode::SERVICE_UNAVAILABLE
        );
        state.synced.store(true, Ordering::Release);
        assert_eq!(status(Method::GET, "/readyz", &state), StatusCode::OK);
        let m = respond(&Method::GET, "/metrics", &state);
        assert_eq!(m.status(), StatusCode::OK);
        assert_eq!(m.headers()[header::CONTENT_TYPE], metrics::CONTENT_TYPE);
        assert_eq!(status(Method::GET, "/nope", &state), StatusCode::NOT_FOUND);
        assert_eq!(
            status(Method::POST, "/healthz", &state),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }

    #[test]
    fn a_standby_is_ready_and_a_new_leader_once_synced() {
        let state = State::new(true, Metrics::new());
        let readyz = |s: &State| s.readiness();
        assert_eq!(readyz(&state).0, StatusCode::OK);
        assert!(readyz(&state).1.contains("standby"));
        state.set_leading(true);
        assert_eq!(readyz(&state).0, StatusCode::SERVICE_UNAVAILABLE);
        assert!(state.metrics.encode().contains("usage_backfill_leader 1\n"));
        state.synced.store(true, Ordering::Release);
        assert_eq!(readyz(&state), (StatusCode::OK, "ok: leader\n"));
        state.set_leading(false);
        assert!(readyz(&state).1.contains("standby"));
        assert!(
            !state.synced.load(Ordering::Acquire),
            "the next term syncs again"
        );
        assert!(state.metrics.encode().contains("usage_backfill_leader 0\n"));
    }

    #[tokio::test]
    async fn serves_probes_and_metrics_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = State::new(false, Metrics::new());
        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(listener, state.clone(), cancel.clone()));
        let request = async |method: &str, path: &str| {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let get = async |path: &str| request("GET", path).await;
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        state.synced.store(true, Ordering::Release);
        let r = get("/readyz?verbose").await;
        assert!(
            r.starts_with("HTTP/1.1 200 OK\r\n") && r.ends_with("\r\n\r\nok\n"),
            "{r}"
        );
        let m = get("/metrics").await;
        assert!(
            m.starts_with("HTTP/1.1 200 OK\r\n")
                && m.contains("Content-Type: text/plain; version=0.0.4")
                && m.contains("\r\n\r\n# HELP "),
            "{m}"
        );
        let head = request("HEAD", "/healthz").await;
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\n")
                && head.contains("Content-Length: 3\r\n")
                && head.ends_with("\r\n\r\n"),
            "{head}"
        );
        cancel.cancel();
        server.await.unwrap();
    }
}
