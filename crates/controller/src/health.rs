//! `/healthz`, `/readyz` and `/metrics`: a few lines of HTTP/1 over a TCP
//! listener, enough for the kubelet's `httpGet` probes and a Prometheus
//! scrape, with no web framework.
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

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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

    /// Status line and body of `/readyz`.
    fn readiness(&self) -> (&'static str, &'static str) {
        let synced = self.synced.load(Ordering::Acquire);
        let leading = self.leading.load(Ordering::Acquire);
        match (self.leader_election, leading, synced) {
            (true, false, _) => ("200 OK", "ok: standby (another replica leads)\n"),
            (true, true, true) => ("200 OK", "ok: leader\n"),
            (false, _, true) => ("200 OK", "ok\n"),
            (_, _, false) => (
                "503 Service Unavailable",
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
            let _ = tokio::time::timeout(Duration::from_secs(5), answer(stream, &state)).await;
        });
    }
}

async fn answer(mut stream: TcpStream, state: &State) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < 8192 {
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request = String::from_utf8_lossy(&buf);
    let response = respond(request.lines().next().unwrap_or(""), state);
    let head = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    if !response.head_only {
        stream.write_all(response.body.as_bytes()).await?;
    }
    stream.shutdown().await
}

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    head_only: bool,
}

const TEXT: &str = "text/plain; charset=utf-8";

/// The response to a request line such as `GET /readyz HTTP/1.1`.
fn respond(request_line: &str, state: &State) -> Response {
    let mut parts = request_line.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let text = |status, body: &str| Response {
        status,
        content_type: TEXT,
        body: body.to_owned(),
        head_only: method == "HEAD",
    };
    if method != "GET" && method != "HEAD" {
        return text("405 Method Not Allowed", "method not allowed\n");
    }
    match path {
        "/healthz" | "/livez" => text("200 OK", "ok\n"),
        "/readyz" => {
            let (status, body) = state.readiness();
            text(status, body)
        }
        "/metrics" => Response {
            status: "200 OK",
            content_type: metrics::CONTENT_TYPE,
            body: state.metrics.encode(),
            head_only: method == "HEAD",
        },
        _ => text("404 Not Found", "not found\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(line: &str, state: &State) -> &'static str {
        respond(line, state).status
    }

    #[test]
    fn routes() {
        let state = State::new(false, Metrics::new());
        assert_eq!(status("GET /healthz HTTP/1.1", &state), "200 OK");
        assert_eq!(
            status("GET /readyz HTTP/1.1", &state),
            "503 Service Unavailable"
        );
        state.synced.store(true, Ordering::Release);
        assert_eq!(status("GET /readyz?verbose HTTP/1.1", &state), "200 OK");
        let m = respond("GET /metrics HTTP/1.1", &state);
        assert_eq!(
            (m.status, m.content_type),
            ("200 OK", metrics::CONTENT_TYPE)
        );
        assert!(m.body.contains("usage_backfill_reconciles_total"));
        assert_eq!(status("GET /nope HTTP/1.1", &state), "404 Not Found");
        assert_eq!(
            status("POST /healthz HTTP/1.1", &state),
            "405 Method Not Allowed"
        );
        assert_eq!(status("", &state), "405 Method Not Allowed");
        assert!(respond("HEAD /metrics HTTP/1.1", &state).head_only);
    }

    #[test]
    fn a_standby_is_ready_and_a_new_leader_once_synced() {
        let state = State::new(true, Metrics::new());
        let readyz = |s: &State| s.readiness();
        assert_eq!(readyz(&state).0, "200 OK");
        assert!(readyz(&state).1.contains("standby"));
        state.set_leading(true);
        assert_eq!(readyz(&state).0, "503 Service Unavailable");
        assert!(state.metrics.encode().contains("usage_backfill_leader 1\n"));
        state.synced.store(true, Ordering::Release);
        assert_eq!(readyz(&state), ("200 OK", "ok: leader\n"));
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
        let get = async |path: &str| {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(get("/readyz").await.starts_with("HTTP/1.1 503"));
        state.synced.store(true, Ordering::Release);
        let r = get("/readyz").await;
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
        cancel.cancel();
        server.await.unwrap();
    }
}
