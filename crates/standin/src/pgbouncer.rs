//! Throwaway PgBouncer in front of a PostgreSQL server, for the tests of
//! connection poolers.
//!
//! This module owns one `pgbouncer` process: its configuration and auth
//! file in a temporary directory, a free 127.0.0.1 port, the pool mode and
//! pool size, and its end: killed on drop, and by a small watchdog shell
//! loop once our process is gone (test binaries may exit without dropping).
//! Clients authenticate with SCRAM against the users given; PgBouncer logs
//! into the server with the same passwords. Like PostgreSQL, PgBouncer
//! refuses to run as root: when this process is root it runs as the
//! `postgres` OS user (or `nobody`), as [`crate::pgtemp`] does.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::net::TcpStream;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::pgtemp::{self, ServerUser, percent_encode};

/// How long a start may take before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Starts retried when the picked port was taken before PgBouncer bound it.
const START_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "pgbouncer not found on PATH nor in /usr/sbin; install it (Debian/Ubuntu: \
         `apt-get install pgbouncer`); `.ci/run` does"
    )]
    NotInstalled,
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    User(#[from] pgtemp::Error),
    #[error("the upstream connection settings lack {0}")]
    Upstream(&'static str),
    #[error("pgbouncer did not start: {reason}\n--- tail of {log} ---\n{tail}", log = log.display())]
    Start {
        reason: String,
        log: PathBuf,
        tail: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// PgBouncer's `pool_mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolMode {
    /// A client keeps one server connection until it disconnects.
    Session,
    /// A server connection is the client's for one transaction only.
    Transaction,
    /// ... for one statement only.
    Statement,
}

impl PoolMode {
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
            PoolMode::Statement => "statement",
        }
    }
}

/// How to start a [`TempPgBouncer`].
#[derive(Clone)]
pub struct PgBouncerOptions {
    pub pool_mode: PoolMode,
    /// Server connections per database and user (`default_pool_size`).
    pub pool_size: u32,
    /// Seconds a client waits for a server connection (`query_wait_timeout`).
    pub query_wait_timeout_secs: u32,
}

impl PgBouncerOptions {
    pub fn new(pool_mode: PoolMode, pool_size: u32) -> Self {
        PgBouncerOptions {
            pool_mode,
            pool_size,
            query_wait_timeout_secs: 120,
        }
    }
}

/// A running PgBouncer. Killed, and its directory deleted, on drop.
pub struct TempPgBouncer {
    dir: Option<tempfile::TempDir>,
    child: Option<Child>,
    watchdog: Option<Child>,
    port: u16,
    log_path: PathBuf,
    mode: PoolMode,
}

impl fmt::Debug for TempPgBouncer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempPgBouncer")
            .field("port", &self.port)
            .field("mode", &self.mode)
            .field("log_path", &self.log_path)
            .finish_non_exhaustive()
    }
}

impl TempPgBouncer {
    /// Starts PgBouncer in front of the server of `upstream` (host, port,
    /// user and password), for that user and every database.
    pub fn start(upstream: &tokio_postgres::Config, opts: PgBouncerOptions) -> Result<Self> {
        let binary = find_binary()?;
        let (host, port) = upstream_address(upstream)?;
        let user = upstream.get_user().ok_or(Error::Upstream("a user"))?;
        let password = upstream
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .ok_or(Error::Upstream("a password"))?;
        let run_as = if pgtemp::effective_uid()? == 0 {
            Some(pgtemp::find_server_user()?)
        } else {
            None
        };
        let dir = tempfile::Builder::new()
            .prefix("pgbouncer-")
            .tempdir()
            .map_err(io_err("creating a temporary directory for pgbouncer"))?;
        let root = dir.path().to_path_buf();
        let mut bouncer = TempPgBouncer {
            log_path: root.join("pgbouncer.log"),
            dir: Some(dir),
            child: None,
            watchdog: None,
            port: 0,
            mode: opts.pool_mode,
        };
        chown(&root, run_as.as_ref())?;
        write_private(
            &root.join("userlist.txt"),
            &format!("{} {}\n", quote(user), quote(&password)),
            run_as.as_ref(),
        )?;
        let mut last = String::new();
        for _ in 0..START_ATTEMPTS {
            bouncer.port = pgtemp::free_port()?;
            let ini = root.join("pgbouncer.ini");
            let _ = fs::remove_file(&ini);
            write_private(
                &ini,
                &config(&root, bouncer.port, &host, port, &opts),
                run_as.as_ref(),
            )?;
            let _ = fs::remove_file(&bouncer.log_path);
            let mut cmd = Command::new(&binary);
            cmd.arg(&ini)
                .current_dir(&root)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(user) = &run_as {
                cmd.uid(user.uid).gid(user.gid);
            }
            let child = cmd.spawn().map_err(io_err("starting pgbouncer"))?;
            bouncer.child = Some(child);
            match bouncer.wait_ready() {
                Ok(()) => {
                    bouncer.watchdog = Some(bouncer.spawn_watchdog()?);
                    return Ok(bouncer);
                }
                Err(reason) => {
                    bouncer.kill();
                    last = reason;
                    if !bouncer.log().contains("Address already in use") {
                        break;
                    }
                }
            }
        }
        Err(Error::Start {
            reason: last,
            tail: bouncer.log(),
            log: bouncer.log_path.clone(),
        })
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pool_mode(&self) -> PoolMode {
        self.mode
    }

    /// `upstream_url` (a postgres:// URL of the upstream server) through
    /// this PgBouncer: same user, password and database.
    pub fn url_via(&self, upstream_url: &str) -> String {
        let config: tokio_postgres::Config = upstream_url
            .parse()
            .unwrap_or_else(|e| panic!("not a connection URL: {e}"));
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            percent_encode(config.get_user().unwrap_or_default()),
            percent_encode(&password),
            self.port,
            percent_encode(config.get_dbname().unwrap_or_default())
        )
    }

    /// What PgBouncer logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Until PgBouncer accepts connections, or it exits, or the timeout.
    fn wait_ready(&mut self) -> Result<(), String> {
        let started = Instant::now();
        while started.elapsed() < START_TIMEOUT {
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                return Err(format!("pgbouncer exited ({status})"));
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.log().contains("process up")
            {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("not accepting connections after {START_TIMEOUT:?}"))
    }

    /// A detached `sh` loop that kills PgBouncer once our process is gone
    /// (a test binary may exit without running destructors).
    fn spawn_watchdog(&self) -> Result<Child> {
        const SCRIPT: &str = r#"
trap '' HUP INT TERM
owner=$1; child=$2; root=$3
while kill -0 "$owner" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 1; done
kill -KILL "$child" 2>/dev/null
rm -rf "$root"
"#;
        let child = self.child.as_ref().map_or(0, Child::id);
        let root = self
            .dir
            .as_ref()
            .map(|d| d.path().to_path_buf())
            .unwrap_or_default();
        Command::new("/bin/sh")
            .arg("-c")
            .arg(SCRIPT)
            .arg("pgbouncer-watchdog")
            .arg(std::process::id().to_string())
            .arg(child.to_string())
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(io_err("starting the pgbouncer watchdog"))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TempPgBouncer {
    fn drop(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        self.kill();
        drop(self.dir.take());
    }
}

fn config(root: &Path, port: u16, host: &str, upstream: u16, opts: &PgBouncerOptions) -> String {
    format!(
        "[databases]\n\
         * = host={host} port={upstream}\n\
         [pgbouncer]\n\
         listen_addr = 127.0.0.1\n\
         listen_port = {port}\n\
         unix_socket_dir =\n\
         auth_type = scram-sha-256\n\
         auth_file = {auth}\n\
         pool_mode = {mode}\n\
         default_pool_size = {size}\n\
         max_client_conn = 200\n\
         query_wait_timeout = {wait}\n\
         logfile = {log}\n",
        auth = root.join("userlist.txt").display(),
        mode = opts.pool_mode.as_str(),
        size = opts.pool_size,
        wait = opts.query_wait_timeout_secs,
        log = root.join("pgbouncer.log").display(),
    )
}

fn upstream_address(config: &tokio_postgres::Config) -> Result<(String, u16)> {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        _ => return Err(Error::Upstream("a TCP host")),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    Ok((host, port))
}

/// `pgbouncer` on PATH, else Debian's /usr/sbin/pgbouncer.
fn find_binary() -> Result<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("pgbouncer"));
    on_path
        .chain([PathBuf::from("/usr/sbin/pgbouncer")])
        .find(|p| p.is_file())
        .ok_or(Error::NotInstalled)
}

/// A userlist.txt field: double quotes, inner quotes doubled.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

fn chown(path: &Path, user: Option<&ServerUser>) -> Result<()> {
    if let Some(user) = user {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid)).map_err(io_err(format!(
            "chown {} to {}",
            path.display(),
            user.name
        )))?;
    }
    Ok(())
}

/// A file only PgBouncer's user can read (it holds a password).
fn write_private(path: &Path, contents: &str, user: Option<&ServerUser>) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    file.write_all(contents.as_bytes())
        .map_err(io_err(format!("writing {}", path.display())))?;
    chown(path, user)
}
