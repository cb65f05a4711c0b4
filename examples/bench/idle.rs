//! The controller's idle RSS: the real `usage-backfill controller` binary,
//! started against a stub Kubernetes API server whose UsageBackfills have
//! all finished, so that once its caches are synced it has nothing to do.
//!
//! The stub answers lists (with `objects` finished UsageBackfills and their
//! Secret) and holds watches open without events; any other request is a
//! write the idle controller should not make, answered 500 and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::{BoxError, proc_status_kib};

/// What one idle measurement saw.
pub(crate) struct Idle {
    pub objects: usize,
    pub rss_kib: u64,
    pub peak_kib: u64,
    /// Requests other than list/watch (should be none).
    pub writes: u64,
}

/// Starts the controller against a stub holding `objects` finished
/// UsageBackfills, waits for `/readyz`, lets it settle for `settle`, and
/// reads its VmRSS and VmHWM.
pub(crate) async fn controller_idle(objects: usize, settle: Duration) -> Result<Idle, BoxError> {
    let binary = controller_binary()?;
    let stub = TcpListener::bind("127.0.0.1:0").await?;
    let api = stub.local_addr()?;
    let writes = Arc::new(AtomicU64::new(0));
    let body = Arc::new(Lists::new(objects));
    let server = tokio::spawn(serve(stub, body, writes.clone()));

    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: stub, cluster: {{server: 'http://{api}'}}}}]\n\
             users: [{{name: stub, user: {{token: bench}}}}]\n\
             contexts: [{{name: stub, context: {{cluster: stub, user: stub}}}}]\n\
             current-context: stub\n"
        ),
    )?;
    let health = free_port().await?;
    let mut child = tokio::process::Command::new(&binary)
        .args([
            "controller",
            "--leader-election=false",
            &format!("--health-addr=127.0.0.1:{health}"),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().ok_or("the controller exited at once")?;

    let ready = async {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if get_status(health, "/readyz").await.as_deref() == Some("200") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        false
    };
    let ready = tokio::select! {
        r = ready => r,
        status = child.wait() => return Err(format!("the controller exited: {status:?}").into()),
    };
    if !ready {
        return Err("the controller did not become ready within 60 s".into());
    }
    tokio::time::sleep(settle).await;
    let rss_kib = proc_status_kib(&pid.to_string(), "VmRSS").ok_or("no VmRSS")?;
    let peak_kib = proc_status_kib(&pid.to_string(), "VmHWM").ok_or("no VmHWM")?;
    // SIGTERM: the controller's graceful path; SIGKILL after 10 s.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    if tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
    server.abort();
    Ok(Idle {
        objects,
        rss_kib,
        peak_kib,
        writes: writes.load(Ordering::Relaxed),
    })
}

/// The `usage-backfill` binary of this build's profile, built if missing
/// or stale (cargo makes that a no-op when it is fresh).
fn controller_binary() -> Result<std::path::PathBuf, BoxError> {
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/bench → target/<profile>/usage-backfill
    let profile_dir = exe
        .parent()
        .and_then(|p| p.parent())
        .ok_or("cannot locate the target directory")?;
    let mut build = std::process::Command::new(env!("CARGO"));
    build.args(["build", "--quiet", "--bin", "usage-backfill"]);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    build.current_dir(env!("CARGO_MANIFEST_DIR"));
    let status = build.status()?;
    if !status.success() {
        return Err(format!("cargo build --bin usage-backfill failed: {status}").into());
    }
    let binary = profile_dir.join("usage-backfill");
    if !binary.exists() {
        return Err(format!("{} not found after the build", binary.display()).into());
    }
    Ok(binary)
}

async fn free_port() -> Result<u16, BoxError> {
    let l = TcpListener::bind("127.0.0.1:0").await?;
    Ok(l.local_addr()?.port())
}

/// The status code of a plain HTTP GET, if the server answered.
async fn get_status(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    let text = String::from_utf8_lossy(&buf);
    text.split_whitespace().nth(1).map(str::to_owned)
}

/// What the stub serves: lists, and single objects by name.
struct Lists {
    usage_backfills: Vec<u8>,
    secret: Vec<u8>,
    secrets: Vec<u8>,
    empty: Vec<u8>,
    objects: usize,
}

impl Lists {
    fn new(objects: usize) -> Lists {
        let items: Vec<Value> = (0..objects).map(finished).collect();
        let list = |kind: &str, api_version: &str, items: Vec<Value>| {
            serde_json::to_vec(&json!({
                "apiVersion": api_version,
                "kind": kind,
                "metadata": {"resourceVersion": "100"},
                "items": items,
            }))
            .unwrap()
        };
        let secret = json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "app-db", "namespace": "bench", "uid": "secret-uid",
                         "resourceVersion": "7"},
            "data": {"DATABASE_URL": "cG9zdGdyZXM6Ly9iZW5jaEBkYi9hcHA="},
        });
        Lists {
            usage_backfills: list("UsageBackfillList", "usage.multica.ai/v1alpha1", items),
            secret: serde_json::to_vec(&secret).unwrap(),
            secrets: list(
                "SecretList",
                "v1",
                if objects > 0 { vec![secret] } else { vec![] },
            ),
            empty: list("List", "v1", Vec::new()),
            objects,
        }
    }

    /// The body of a GET, or None for 404.
    fn get(&self, path: &str) -> Option<Vec<u8>> {
        let path = path.split('?').next().unwrap_or_default();
        if let Some((_, name)) = path.split_once("/usagebackfills/") {
            let i: usize = name
                .split('/')
                .next()?
                .strip_prefix("backfill-")?
                .parse()
                .ok()?;
            return (i < self.objects).then(|| serde_json::to_vec(&finished(i)).unwrap());
        }
        if path.ends_with("/secrets/app-db") {
            return (self.objects > 0).then(|| self.secret.clone());
        }
        Some(if path.ends_with("/usagebackfills") {
            self.usage_backfills.clone()
        } else if path.ends_with("/secrets") {
            self.secrets.clone()
        } else {
            self.empty.clone()
        })
    }
}

/// A UsageBackfill whose run for its generation has succeeded.
fn finished(i: usize) -> Value {
    let at = "2026-11-28T00:00:00Z";
    json!({
        "apiVersion": "usage.multica.ai/v1alpha1",
        "kind": "UsageBackfill",
        "metadata": {
            "name": format!("backfill-{i}"), "namespace": "bench",
            "uid": format!("uid-{i}"), "generation": 1,
            "resourceVersion": "50", "creationTimestamp": at,
        },
        "spec": {"database": {"secretRef": {"name": "app-db"}}},
        "status": {
            "observedGeneration": 1, "phase": "Succeeded", "result": "Backfilled",
            "runId": "", "slicesProcessed": 13, "slicesTotal": 13, "progress": "13/13",
            "rowsTouched": 18907, "watermarkStamped": true, "attempts": 1,
            "startedAt": at, "finishedAt": at, "heartbeatTime": at,
            "secretResourceVersions": "7",
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Backfilled",
                "message": "backfilled 13 slices", "observedGeneration": 1,
                "lastTransitionTime": at,
            }],
        },
    })
}

async fn serve(listener: TcpListener, lists: Arc<Lists>, writes: Arc<AtomicU64>) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(connection(stream, lists.clone(), writes.clone()));
    }
}

/// HTTP/1.1 keep-alive: lists answered, watches held open, anything else
/// counted and refused.
async fn connection(mut stream: TcpStream, lists: Arc<Lists>, writes: Arc<AtomicU64>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        let mut parts = head.split_whitespace();
        let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let response = if method == "GET" && path.contains("watch=true") {
            // Headers now, no events ever: the watch stays quiet.
            let _ = stream
                .write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\
                      Transfer-Encoding: chunked\r\n\r\n",
                )
                .await;
            std::future::pending::<()>().await;
            return;
        } else if method == "GET" {
            let (status, body) = match lists.get(path) {
                Some(body) => ("200 OK", body),
                None => (
                    "404 Not Found",
                    br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#
                        .to_vec(),
                ),
            };
            let mut r = format!(
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(&body);
            r
        } else {
            writes.fetch_add(1, Ordering::Relaxed);
            let body = br#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":500}"#;
            let mut r = format!(
                "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            r.extend_from_slice(body);
            r
        };
        if stream.write_all(&response).await.is_err() {
            return;
        }
    }
}
