//! A throwaway Kubernetes control plane for a test process, as envtest
//! provides one: a real etcd and kube-apiserver, built from Go modules by
//! `tests/cluster/build.sh` (one module per Kubernetes release, see
//! [`VERSIONS`]), started on free loopback ports in a temporary directory.
//!
//! This module owns the whole life of one control plane: finding the built
//! binaries, generating its credentials (a test CA and the serving
//! certificate it signs, a service-account signing key pair, a static admin
//! token in group `system:masters`, which may impersonate anyone), starting
//! etcd (temporary data dir, no fsync) and kube-apiserver (RBAC
//! authorization, bound to 127.0.0.1 only), waiting for `/readyz`, and
//! removing it all again. There is no controller-manager, scheduler or
//! kubelet: namespaces are never finalized, ServiceAccounts get no token
//! Secrets, Jobs and Pods never run.
//!
//! Teardown happens on `Drop` (a failed or panicking test included) and,
//! because a control plane shared by a test binary lives in a `static`
//! that is never dropped, also by a watchdog shell loop that outlives the
//! test process and removes everything once that process is gone (killed
//! included). When the test process is root, etcd and kube-apiserver run
//! as `nobody`, from hard links (or copies) of the binaries inside the
//! temporary directory, which that user can reach.
//!
//! Tests never skip: binaries that were not built are a panic that says
//! which command builds them.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use kube::config::{KubeConfigOptions, Kubeconfig};
use usage_backfill_standin::pgtemp::{self, ServerUser};

use crate::tls::TestCa;

/// The Kubernetes releases the tests run on: the oldest the chart claims
/// and the newest the Go module proxy serves. Each has a Go module
/// `tests/cluster/kube-<version>/` pinning its patch release.
pub const VERSIONS: [&str; 2] = ["1.34", "1.37"];

/// Overrides where `tests/cluster/build.sh` put the binaries.
pub const CACHE_ENV: &str = "USAGE_BACKFILL_CLUSTER_CACHE";

/// How long kube-apiserver may take to report ready: it installs its
/// bootstrap RBAC and priority levels first, which takes seconds on an idle
/// machine and much longer on two cores shared with compilers.
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// Attempts to start, when a picked port is taken before a server binds it.
const START_ATTEMPTS: u32 = 3;

/// The field manager and user of this module's own writes.
const ADMIN: &str = "testkit-admin";

/// Runs each named scenario on every Kubernetes release of [`VERSIONS`]:
/// for every `async fn name(version: &str)` listed, a module `name` with
/// the tests `oldest_kubernetes` and `newest_kubernetes`, on a two-thread
/// runtime. The scenario picks its control plane, usually
/// [`ControlPlane::shared`].
#[macro_export]
macro_rules! on_both_versions {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn oldest_kubernetes() {
                    super::$name($crate::cluster::VERSIONS[0]).await
                }

                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn newest_kubernetes() {
                    super::$name($crate::cluster::VERSIONS[1]).await
                }
            }
        )*
    };
}

/// Where `tests/cluster/build.sh` caches its builds:
/// `$USAGE_BACKFILL_CLUSTER_CACHE`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/usage-backfill-cluster`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache")
        });
    base.join("usage-backfill-cluster")
}

/// The directory holding `etcd` and `kube-apiserver` of `version`, or what
/// to run to build them.
pub fn binaries(version: &str) -> Result<PathBuf, String> {
    let dir = cache_dir().join(format!("kube-{version}"));
    let missing: Vec<&str> = ["etcd", "kube-apiserver"]
        .into_iter()
        .filter(|b| !dir.join(b).is_file())
        .collect();
    if missing.is_empty() {
        return Ok(dir);
    }
    Err(format!(
        "the Kubernetes {version} control plane is not built ({} missing in {}): run \
         `bash tests/cluster/build.sh kube-{version}` once (needs Go 1.26; it takes minutes, \
         later runs reuse it; `.ci/run` does it), or set {CACHE_ENV} to where it was built",
        missing.join(", "),
        dir.display()
    ))
}

/// The `helm` that `tests/cluster/build.sh` built, or what to run to build it.
pub fn helm_binary() -> Result<PathBuf, String> {
    let path = cache_dir().join("helm/helm");
    if path.is_file() {
        return Ok(path);
    }
    Err(format!(
        "helm is not built ({} is missing): run `bash tests/cluster/build.sh helm` once \
         (needs Go 1.26; `.ci/run` does it), or set {CACHE_ENV} to where it was built",
        path.display()
    ))
}

/// A running throwaway control plane. Stopped and deleted on drop.
pub struct ControlPlane {
    version: String,
    /// `None` once stopped.
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    url: String,
    kubeconfig: PathBuf,
    token: String,
    config: kube::Config,
    etcd: Option<Child>,
    apiserver: Option<Child>,
    watchdog: Option<Child>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("version", &self.version)
            .field("url", &self.url)
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Starts a control plane of `version` (one of [`VERSIONS`]); panics,
    /// saying why and with the logs' tails, when it cannot.
    pub async fn start(version: &str) -> ControlPlane {
        match Self::try_start(version).await {
            Ok(plane) => plane,
            Err(e) => panic!("testkit: starting a Kubernetes {version} control plane: {e}"),
        }
    }

    /// The control plane of `version` that this test process shares
    /// between its tests, started by the first to ask. Tests sharing it
    /// work in namespaces of their own. It is never dropped: the watchdog
    /// removes it when the process exits.
    pub fn shared(version: &str) -> &'static ControlPlane {
        static SHARED: Mutex<BTreeMap<String, &'static OnceLock<Result<ControlPlane, String>>>> =
            Mutex::new(BTreeMap::new());
        let cell = *SHARED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(version.to_owned())
            .or_insert_with(|| Box::leak(Box::new(OnceLock::new())));
        let plane = cell.get_or_init(|| {
            // Each #[tokio::test] has a runtime of its own that dies with
            // its test: start on a thread with a runtime of its own (what
            // is kept is plain data, no client bound to that runtime).
            let version = version.to_owned();
            std::thread::spawn(move || {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| format!("building a runtime: {e}"))?
                    .block_on(Self::try_start(&version))
            })
            .join()
            .unwrap_or_else(|_| Err("the starting thread panicked".into()))
        });
        match plane {
            Ok(plane) => plane,
            Err(e) => panic!("testkit: starting a Kubernetes {version} control plane: {e}"),
        }
    }

    /// [`start`](Self::start), returning the reason it failed.
    pub async fn try_start(version: &str) -> Result<ControlPlane, String> {
        let bin = binaries(version)?;
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            let mut plane = Self::launch(version, &bin)?;
            match plane.wait_ready().await {
                Ok(()) => return Ok(plane),
                Err(e) => {
                    let port_taken = e.contains("address already in use");
                    last = e;
                    if !port_taken {
                        break;
                    }
                    // Dropping `plane` stops it and removes its directory.
                    tracing::debug!(attempt, "a picked port was taken; starting again");
                }
            }
        }
        Err(last)
    }

    /// Kubernetes `major.minor` of this control plane.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig file for the admin (a bearer token in group
    /// `system:masters`, the test CA), e.g. for `helm --kubeconfig`.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The admin's bearer token (as in [`kubeconfig`](Self::kubeconfig)).
    pub fn admin_token(&self) -> &str {
        &self.token
    }

    /// The CA that signed the serving certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.root.join("ca.crt")
    }

    /// Connection settings of the admin.
    pub fn config(&self) -> kube::Config {
        self.config.clone()
    }

    /// A client of the admin, bound to the current tokio runtime.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("a client for the control plane")
    }

    /// The admin's settings, acting as `user` in `groups` (the API server
    /// checks that the admin may impersonate, which `system:masters` may).
    pub fn impersonating(&self, user: &str, groups: &[&str]) -> kube::Config {
        let mut config = self.config();
        config.auth_info.impersonate = Some(user.to_owned());
        config.auth_info.impersonate_groups = Some(groups.iter().map(|g| g.to_string()).collect());
        config
    }

    /// The admin's settings, acting as ServiceAccount `namespace/name`
    /// with the groups its token would carry.
    pub fn as_service_account(&self, namespace: &str, name: &str) -> kube::Config {
        self.impersonating(
            &format!("system:serviceaccount:{namespace}:{name}"),
            &[
                "system:serviceaccounts",
                &format!("system:serviceaccounts:{namespace}"),
                "system:authenticated",
            ],
        )
    }

    /// The last `lines` lines of the kube-apiserver log.
    pub fn apiserver_log_tail(&self, lines: usize) -> String {
        tail(&self.root.join("kube-apiserver.log"), lines)
    }

    // ----- internals -----------------------------------------------------

    /// Writes the credentials and starts both processes and the watchdog.
    fn launch(version: &str, bin: &Path) -> Result<ControlPlane, String> {
        let run_as = unprivileged_user()?;
        let dir = tempfile::Builder::new()
            .prefix(&format!("kube-{version}-"))
            .tempdir()
            .map_err(|e| format!("creating a temporary directory: {e}"))?;
        let root = dir.path().to_path_buf();
        let files = Files {
            root: &root,
            run_as: run_as.as_ref(),
        };
        files.chown(&root)?;
        // The server user must be able to execute the binaries, which sit
        // under the invoking user's home (often mode 700).
        for name in ["etcd", "kube-apiserver"] {
            let to = root.join(name);
            if fs::hard_link(bin.join(name), &to).is_err() {
                fs::copy(bin.join(name), &to)
                    .map_err(|e| format!("copying {} into {}: {e}", name, root.display()))?;
            }
        }

        let ca = TestCa::new("kube-apiserver");
        let serving = ca.server_cert(&["127.0.0.1", "localhost"]);
        files.public("ca.crt", &ca.pem)?;
        files.public("tls.crt", &serving.cert_pem)?;
        files.private("tls.key", &serving.key_pem)?;
        let sa_key = rcgen::KeyPair::generate().map_err(|e| format!("an SA key: {e}"))?;
        files.private("sa.key", &sa_key.serialize_pem())?;
        files.public("sa.pub", &sa_key.public_key_pem())?;
        let token = random_token()?;
        files.private(
            "tokens.csv",
            &format!("{token},{ADMIN},{ADMIN},system:masters\n"),
        )?;

        let [etcd_port, peer_port, port] = [(); 3].map(|_| free_port());
        let (etcd_port, peer_port, port) = (etcd_port?, peer_port?, port?);
        let url = format!("https://127.0.0.1:{port}");
        let kubeconfig = root.join("kubeconfig");
        fs::write(
            &kubeconfig,
            kubeconfig_yaml(&url, &root.join("ca.crt"), &token),
        )
        .map_err(|e| format!("writing {}: {e}", kubeconfig.display()))?;
        let config = config_of(&kubeconfig)?;

        let mut plane = ControlPlane {
            version: version.to_owned(),
            dir: Some(dir),
            root: root.clone(),
            url: url.clone(),
            kubeconfig,
            token,
            config,
            etcd: None,
            apiserver: None,
            watchdog: None,
        };
        // From here on, an early return drops `plane`, which stops what
        // was started and removes the directory.
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        plane.etcd = Some(files.spawn(
            "etcd",
            &[
                "--name=testkit".into(),
                format!("--data-dir={}", root.join("etcd-data").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=testkit={peer_url}"),
                // Durability is worthless for a throwaway store.
                "--unsafe-no-fsync".into(),
                "--log-level=warn".into(),
            ],
        )?);
        let file = |name: &str| root.join(name).display().to_string();
        plane.apiserver = Some(files.spawn(
            "kube-apiserver",
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                format!("--secure-port={port}"),
                format!("--tls-cert-file={}", file("tls.crt")),
                format!("--tls-private-key-file={}", file("tls.key")),
                format!("--cert-dir={}", file("certs")),
                format!("--token-auth-file={}", file("tokens.csv")),
                "--authorization-mode=RBAC".into(),
                format!("--service-account-issuer={url}"),
                format!("--service-account-key-file={}", file("sa.pub")),
                format!("--service-account-signing-key-file={}", file("sa.key")),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                // No kubelet or node to reconcile the `kubernetes` Service to.
                "--endpoint-reconciler-type=none".into(),
                "--profiling=false".into(),
                "--v=1".into(),
            ],
        )?);
        plane.watchdog = Some(plane.spawn_watchdog()?);
        Ok(plane)
    }

    /// Polls `/readyz` as the admin until it answers `ok`; a process that
    /// exits meanwhile is an error with the tail of its log.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let client = kube::Client::try_from(self.config())
            .map_err(|e| format!("a client for {}: {e}", self.url))?;
        let started = Instant::now();
        loop {
            for (name, child) in [
                ("etcd", &mut self.etcd),
                ("kube-apiserver", &mut self.apiserver),
            ] {
                if let Some(status) = child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    let log = self.root.join(format!("{name}.log"));
                    return Err(format!(
                        "{name} exited ({status}); tail of its log:\n{}",
                        tail(&log, 30)
                    ));
                }
            }
            let request = http::Request::get("/readyz").body(Vec::new()).unwrap();
            let last = match client.request_text(request).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => body,
                Err(e) => e.to_string(),
            };
            if started.elapsed() > READY_TIMEOUT {
                return Err(format!(
                    "not ready after {READY_TIMEOUT:?}: {last}\ntail of the kube-apiserver log:\n{}",
                    self.apiserver_log_tail(30)
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Starts the watchdog: a detached `sh` loop that, once this process
    /// has gone, kills both servers and deletes the directory. It checks
    /// each pid's command name first, as a pid may have been reused.
    fn spawn_watchdog(&self) -> Result<Child, String> {
        const SCRIPT: &str = r#"
trap '' HUP INT TERM
owner=$1; root=$2; shift 2
while kill -0 "$owner" 2>/dev/null && [ -d "$root" ]; do sleep 1; done
for entry in "$@"; do
    pid=${entry%%:*}; name=${entry#*:}
    if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$name" ]; then
        kill -KILL "$pid" 2>/dev/null
    fi
done
sleep 0.2
rm -rf "$root"
"#;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("kube-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.root);
        for (child, name) in [(&self.etcd, "etcd"), (&self.apiserver, "kube-apiserver")] {
            if let Some(child) = child {
                cmd.arg(format!("{}:{name}", child.id()));
            }
        }
        // Never hold the test harness's pipes open (`cargo test` would wait
        // for us), and a group of its own: a Ctrl-C must not kill it first.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0);
        cmd.spawn()
            .map_err(|e| format!("starting the control plane's watchdog: {e}"))
    }

    fn stop_processes(&mut self) {
        for child in [self.apiserver.take(), self.etcd.take()]
            .into_iter()
            .flatten()
        {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        self.stop_processes();
        drop(self.dir.take());
    }
}

/// Writes the control plane's files, owned by the server user.
struct Files<'a> {
    root: &'a Path,
    run_as: Option<&'a ServerUser>,
}

impl Files<'_> {
    fn chown(&self, path: &Path) -> Result<(), String> {
        match self.run_as {
            Some(user) => std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                .map_err(|e| format!("chown {} to {}: {e}", path.display(), user.name)),
            None => Ok(()),
        }
    }

    fn write(&self, name: &str, contents: &str, mode: u32) -> Result<(), String> {
        let path = self.root.join(name);
        let written = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(contents.as_bytes()));
        written.map_err(|e| format!("writing {}: {e}", path.display()))?;
        self.chown(&path)
    }

    fn public(&self, name: &str, contents: &str) -> Result<(), String> {
        self.write(name, contents, 0o644)
    }

    fn private(&self, name: &str, contents: &str) -> Result<(), String> {
        self.write(name, contents, 0o600)
    }

    /// Starts binary `name` of the directory, logging to `<name>.log`.
    fn spawn(&self, name: &str, args: &[String]) -> Result<Child, String> {
        let log_path = self.root.join(format!("{name}.log"));
        let log = fs::File::create(&log_path)
            .map_err(|e| format!("creating {}: {e}", log_path.display()))?;
        let err = log
            .try_clone()
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let mut cmd = Command::new(self.root.join(name));
        cmd.args(args)
            .current_dir(self.root)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", self.root)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        if let Some(user) = self.run_as {
            // std clears the supplementary groups when root sets a uid.
            cmd.uid(user.uid).gid(user.gid);
        }
        cmd.spawn().map_err(|e| format!("starting {name}: {e}"))
    }
}

/// `nobody` when this process is root (the servers need no privilege and
/// should have none), else `None`: they run as we do.
fn unprivileged_user() -> Result<Option<ServerUser>, String> {
    match pgtemp::effective_uid() {
        Ok(0) => pgtemp::os_user("nobody")
            .map(Some)
            .ok_or_else(|| "running as root, but there is no `nobody` user to run as".into()),
        Ok(_) => Ok(None),
        Err(e) => Err(format!("reading the effective uid: {e}")),
    }
}

/// A port on 127.0.0.1 that was free a moment ago.
fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| format!("binding 127.0.0.1:0 to pick a port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("reading the picked port: {e}"))
}

/// 32 hex characters from /dev/urandom.
fn random_token() -> Result<String, String> {
    use std::io::Read;
    let mut bytes = [0u8; 16];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("reading /dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn kubeconfig_yaml(url: &str, ca: &Path, token: &str) -> String {
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: testkit
  cluster:
    server: {url}
    certificate-authority: {ca}
users:
- name: {ADMIN}
  user:
    token: {token}
contexts:
- name: testkit
  context:
    cluster: testkit
    user: {ADMIN}
    namespace: default
current-context: testkit
",
        ca = ca.display()
    )
}

/// The settings a kubeconfig file gives (kube reads the CA file now).
fn config_of(kubeconfig: &Path) -> Result<kube::Config, String> {
    let parsed = Kubeconfig::read_from(kubeconfig)
        .map_err(|e| format!("reading {}: {e}", kubeconfig.display()))?;
    // from_custom_kubeconfig is async only by signature for a file like
    // this one (no exec or auth plugin): drive it on a throwaway runtime.
    let built = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?
            .block_on(kube::Config::from_custom_kubeconfig(
                parsed,
                &KubeConfigOptions::default(),
            ))
            .map_err(|e| e.to_string())
    })
    .join()
    .map_err(|_| "building the client settings panicked".to_owned())?;
    built.map_err(|e| format!("client settings from {}: {e}", kubeconfig.display()))
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_else(|e: io::Error| format!("({e})"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every Go module under tests/cluster/ is one of [`VERSIONS`], and
    /// each of those has its module.
    #[test]
    fn versions_match_the_go_modules() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/cluster");
        let mut modules: Vec<String> = fs::read_dir(&here)
            .unwrap()
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                Some(name.strip_prefix("kube-")?.to_owned())
            })
            .collect();
        modules.sort();
        assert_eq!(modules, VERSIONS);
        for version in VERSIONS {
            let go_mod = fs::read_to_string(here.join(format!("kube-{version}/go.mod"))).unwrap();
            assert!(
                go_mod.contains(&format!("k8s.io/kubernetes v{version}.")),
                "kube-{version}/go.mod pins Kubernetes {version}"
            );
        }
    }
}
