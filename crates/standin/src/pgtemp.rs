//! Throwaway PostgreSQL servers for the demo command, the tests and the
//! benchmarks.
//!
//! This module owns the whole life of one server: finding the server
//! binaries, `initdb` into a temporary directory (superuser `postgres` with a
//! random password, scram over TCP, trust over the unix socket), starting it
//! on a free 127.0.0.1 port with settings tuned for speed rather than
//! durability, and tearing it down again. Teardown happens on `Drop`, and —
//! because test binaries keep a shared server in a `static` that is never
//! dropped — also by a small watchdog shell loop that outlives us and removes
//! the server once our process is gone.
//!
//! PostgreSQL refuses to run as root, so when this process is root the
//! server commands run as the `postgres` OS user (or `nobody`).

use std::fmt;
use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::TcpListener;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Oldest major version the fixture schema can run on (it needs
/// `UNIQUE NULLS NOT DISTINCT`).
const MIN_MAJOR_VERSION: u32 = 15;

/// How many times a start is retried when the chosen port was taken between
/// picking it and the postmaster binding it.
const START_ATTEMPTS: u32 = 5;

/// Seconds `pg_ctl -w` waits for start/stop/restart.
const PG_CTL_TIMEOUT_SECS: &str = "120";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; tried {tried}. \
         Install them (Debian/Ubuntu: `apt-get install postgresql-15`) or put the \
         `pg_config` of a PostgreSQL 15+ installation on PATH"
    )]
    BinariesNotFound { tried: String },

    #[error(
        "PostgreSQL in {bindir} is version {version}; {MIN_MAJOR_VERSION} or newer is required \
         (UNIQUE NULLS NOT DISTINCT). Install `postgresql-15` (apt-get install postgresql-15)"
    )]
    TooOld { bindir: PathBuf, version: String },

    #[error(
        "running as root, but neither a `postgres` nor a `nobody` user exists in /etc/passwd \
         to run the server as (PostgreSQL refuses to run as root)"
    )]
    NoServerUser,

    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },

    #[error(
        "PostgreSQL did not start after {attempts} attempt(s): {reason}\n--- tail of {log} ---\n{tail}",
        log = log.display()
    )]
    Start {
        attempts: u32,
        reason: String,
        log: PathBuf,
        tail: String,
    },

    #[error("the blocking task that starts the server failed")]
    Join(#[source] tokio::task::JoinError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// Certificate and key the server presents when TLS is on (PEM text).
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert_pem", &format_args!("<{} bytes>", self.cert_pem.len()))
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// How to start a [`TempPostgres`]. The default is a plain (no TLS) server
/// under the system temporary directory.
#[derive(Debug, Clone, Default)]
pub struct TempPostgresOptions {
    /// Serve TLS with this certificate (`ssl = on`).
    pub tls: Option<ServerTls>,
    /// Parent of the temporary directory (default: `std::env::temp_dir()`).
    /// When running as root it must be traversable by the server user.
    pub base_dir: Option<PathBuf>,
    /// Extra `postgresql.conf` settings, e.g. `("log_min_duration_statement", "0")`.
    /// Values are written verbatim (quote strings yourself: `"'all'"`).
    pub extra_settings: Vec<(String, String)>,
}

/// The OS account the server runs as when we are root.
#[derive(Debug, Clone)]
pub struct ServerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

/// A running throwaway PostgreSQL server. Stopped and deleted on drop.
pub struct TempPostgres {
    /// `None` once stopped.
    dir: Option<tempfile::TempDir>,
    root: PathBuf,
    bindir: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    port: u16,
    password: String,
    version: String,
    run_as: Option<ServerUser>,
    tls: bool,
    watchdog: Option<Child>,
}

impl fmt::Debug for TempPostgres {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TempPostgres")
            .field("version", &self.version)
            .field("port", &self.port)
            .field("data_dir", &self.data_dir)
            .field("log_path", &self.log_path)
            .field("run_as", &self.run_as.as_ref().map(|u| &u.name))
            .field("tls", &self.tls)
            .field("password", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl TempPostgres {
    /// Initialise and start a server (the blocking work runs on tokio's
    /// blocking pool).
    pub async fn start(opts: TempPostgresOptions) -> Result<TempPostgres> {
        tokio::task::spawn_blocking(move || Self::start_blocking(opts))
            .await
            .map_err(Error::Join)?
    }

    /// Same as [`start`](Self::start) without needing a tokio runtime.
    pub fn start_blocking(opts: TempPostgresOptions) -> Result<TempPostgres> {
        let bindir = find_bindir()?;
        let version = server_version(&bindir)?;

        let run_as = if effective_uid()? == 0 {
            Some(find_server_user()?)
        } else {
            None
        };

        let base = opts.base_dir.clone().unwrap_or_else(std::env::temp_dir);
        let dir = tempfile::Builder::new()
            .prefix("pgtemp-")
            .tempdir_in(&base)
            .map_err(io_err(format!(
                "creating a temporary directory in {}",
                base.display()
            )))?;
        let root = dir.path().to_path_buf();
        let data_dir = root.join("data");
        let log_path = root.join("postgres.log");

        let mut server = TempPostgres {
            dir: Some(dir),
            root,
            bindir,
            data_dir,
            log_path,
            port: 0,
            password: random_password()?,
            version,
            run_as,
            tls: opts.tls.is_some(),
            watchdog: None,
        };
        // From here on, an early return drops `server`, which stops whatever
        // was started and removes the directory.
        server.chown(&server.root.clone())?;
        server.initdb()?;
        server.write_static_settings(&opts)?;
        server.start_on_free_port()?;
        server.watchdog = Some(server.spawn_watchdog()?);
        tracing::debug!(port = server.port, dir = %server.root.display(), "temporary PostgreSQL started");
        Ok(server)
    }

    /// TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Password of the `postgres` superuser.
    pub fn password(&self) -> &str {
        &self.password
    }

    /// Server version as printed by `postgres --version` (e.g. `15.18`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Whether the server was started with TLS.
    pub fn tls(&self) -> bool {
        self.tls
    }

    /// `postgres://postgres:<password>@127.0.0.1:<port>/<dbname>`.
    pub fn admin_url(&self, dbname: &str) -> String {
        self.url_for("postgres", &self.password, dbname)
    }

    /// URL for another role (user, password and database are percent-encoded).
    pub fn url_for(&self, user: &str, password: &str, dbname: &str) -> String {
        format!(
            "postgres://{}:{}@127.0.0.1:{}/{}",
            percent_encode(user),
            percent_encode(password),
            self.port,
            percent_encode(dbname)
        )
    }

    /// Connection settings of the superuser over TCP.
    pub fn admin_config(&self, dbname: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .password(&self.password)
            .dbname(dbname);
        config
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Directory holding the unix socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The server log.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Directory of the server binaries used.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Restart the server (`pg_ctl restart -m fast`), same port and settings.
    /// Existing connections are terminated. Blocks until the server accepts
    /// connections again.
    pub fn restart(&self) -> Result<()> {
        let mut cmd = self.pg_ctl();
        cmd.arg("-l").arg(&self.log_path).args([
            "-w",
            "-t",
            PG_CTL_TIMEOUT_SECS,
            "restart",
            "-m",
            "fast",
        ]);
        run(cmd, "pg_ctl restart")
    }

    /// Stop the server gracefully (`pg_ctl stop -m fast`) and delete its
    /// directory. Dropping does the same with `-m immediate`.
    pub fn stop(mut self) -> Result<()> {
        self.kill_watchdog();
        let mut cmd = self.pg_ctl();
        cmd.args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "stop", "-m", "fast"]);
        let result = run(cmd, "pg_ctl stop");
        if let Some(dir) = self.dir.take() {
            dir.close()
                .map_err(io_err("removing the temporary PostgreSQL directory"))?;
        }
        result
    }

    // ----- internals -----------------------------------------------------

    /// A command for a server binary, run as the server user when we are root.
    fn server_command(&self, binary: &str) -> Command {
        let mut cmd = Command::new(self.bindir.join(binary));
        cmd.current_dir(&self.root)
            .env("LC_ALL", "C")
            .env("LANG", "C")
            .stdin(Stdio::null());
        if let Some(user) = &self.run_as {
            // std clears the supplementary groups when root sets a uid.
            cmd.uid(user.uid).gid(user.gid);
            if let Some(home) = passwd_home(&user.name) {
                cmd.env("HOME", home);
            }
        }
        cmd
    }

    fn pg_ctl(&self) -> Command {
        let mut cmd = self.server_command("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir);
        cmd
    }

    fn chown(&self, path: &Path) -> Result<()> {
        if let Some(user) = &self.run_as {
            std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
                .map_err(io_err(format!("chown {} to {}", path.display(), user.name)))?;
        }
        Ok(())
    }

    /// Write a file readable only by the server user.
    fn write_private_file(&self, path: &Path, contents: &str) -> Result<()> {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(io_err(format!("creating {}", path.display())))?;
        file.write_all(contents.as_bytes())
            .map_err(io_err(format!("writing {}", path.display())))?;
        self.chown(path)
    }

    fn initdb(&self) -> Result<()> {
        let pwfile = self.root.join("pwfile");
        self.write_private_file(&pwfile, &format!("{}\n", self.password))?;
        let mut cmd = self.server_command("initdb");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .args(["-U", "postgres"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .args([
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
            ]);
        let result = run(cmd, "initdb");
        let _ = fs::remove_file(&pwfile);
        result
    }

    /// Settings that never change for this server; the port lives in its
    /// own include file because it is re-picked on a bind collision.
    fn write_static_settings(&self, opts: &TempPostgresOptions) -> Result<()> {
        let mut settings = vec![
            ("listen_addresses".to_owned(), "'127.0.0.1'".to_owned()),
            (
                "unix_socket_directories".to_owned(),
                quote_conf(&self.root.to_string_lossy()),
            ),
            // Durability is worthless for a throwaway server.
            ("fsync".to_owned(), "off".to_owned()),
            ("synchronous_commit".to_owned(), "off".to_owned()),
            ("full_page_writes".to_owned(), "off".to_owned()),
            ("max_connections".to_owned(), "200".to_owned()),
            ("shared_buffers".to_owned(), "'128MB'".to_owned()),
            // Fewer checkpoints while benchmarks bulk-load millions of rows.
            ("max_wal_size".to_owned(), "'2GB'".to_owned()),
            ("log_timezone".to_owned(), "'UTC'".to_owned()),
        ];
        if let Some(tls) = &opts.tls {
            let cert = self.data_dir.join("server.crt");
            let key = self.data_dir.join("server.key");
            fs::write(&cert, &tls.cert_pem)
                .map_err(io_err(format!("writing {}", cert.display())))?;
            self.chown(&cert)?;
            // PostgreSQL refuses a key readable by group/other or owned by
            // someone other than the server user.
            self.write_private_file(&key, &tls.key_pem)?;
            settings.push(("ssl".to_owned(), "on".to_owned()));
            settings.push(("ssl_cert_file".to_owned(), "'server.crt'".to_owned()));
            settings.push(("ssl_key_file".to_owned(), "'server.key'".to_owned()));
        }
        settings.extend(opts.extra_settings.iter().cloned());

        let mut text = String::from("\n# --- pgtemp ---\n");
        for (name, value) in &settings {
            text.push_str(&format!("{name} = {value}\n"));
        }
        text.push_str("include 'pgtemp_port.conf'\n");

        let conf = self.data_dir.join("postgresql.conf");
        let mut file = fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .map_err(io_err(format!("opening {}", conf.display())))?;
        file.write_all(text.as_bytes())
            .map_err(io_err(format!("writing {}", conf.display())))
    }

    fn start_on_free_port(&mut self) -> Result<()> {
        let mut last_reason = String::new();
        let mut last_tail = String::new();
        for attempt in 1..=START_ATTEMPTS {
            self.port = free_port()?;
            let port_conf = self.data_dir.join("pgtemp_port.conf");
            fs::write(&port_conf, format!("port = {}\n", self.port))
                .map_err(io_err(format!("writing {}", port_conf.display())))?;
            self.chown(&port_conf)?;

            let log_offset = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
            let mut cmd = self.pg_ctl();
            cmd.arg("-l")
                .arg(&self.log_path)
                .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]);
            match run(cmd, "pg_ctl start") {
                Ok(()) => return Ok(()),
                Err(err) => {
                    // If pg_ctl gave up while a postmaster is still starting,
                    // make sure it does not linger.
                    let mut stop = self.pg_ctl();
                    stop.args(["stop", "-m", "immediate"]);
                    let _ = stop.output();

                    let new_log = read_from(&self.log_path, log_offset);
                    last_reason = err.to_string();
                    last_tail = tail(&new_log, 30);
                    let port_taken = new_log.contains("could not bind")
                        || new_log.contains("Address already in use");
                    if !port_taken {
                        return Err(Error::Start {
                            attempts: attempt,
                            reason: last_reason,
                            log: self.log_path.clone(),
                            tail: last_tail,
                        });
                    }
                    tracing::debug!(port = self.port, attempt, "port taken, retrying");
                }
            }
        }
        Err(Error::Start {
            attempts: START_ATTEMPTS,
            reason: format!("every picked port was taken; last error: {last_reason}"),
            log: self.log_path.clone(),
            tail: last_tail,
        })
    }

    /// Start the watchdog: a detached `sh` loop that, once our process has
    /// gone, shuts the server down immediately and deletes the directory.
    ///
    /// It sends SIGQUIT to the postmaster itself — exactly what
    /// `pg_ctl stop -m immediate` does — because pg_ctl refuses to run as
    /// root and the watchdog must run as our own user to be allowed to
    /// `kill -0` our pid.
    fn spawn_watchdog(&self) -> Result<Child> {
        const SCRIPT: &str = r#"
trap '' HUP INT TERM
owner=$1; root=$2; data=$3
while kill -0 "$owner" 2>/dev/null && [ -d "$data" ]; do sleep 1; done
if [ -f "$data/postmaster.pid" ]; then
    pm=$(head -n 1 "$data/postmaster.pid")
    if [ -n "$pm" ] && [ "$(cat "/proc/$pm/comm" 2>/dev/null)" = postgres ]; then
        kill -QUIT "$pm" 2>/dev/null
        i=0
        # Gone, or a zombie nobody reaps yet (its parent, pg_ctl, has exited).
        while kill -0 "$pm" 2>/dev/null && [ "$i" -lt 100 ] &&
              ! grep -q '^State:[[:space:]]*Z' "/proc/$pm/status" 2>/dev/null; do
            sleep 0.1; i=$((i+1))
        done
    fi
fi
rm -rf "$root"
"#;
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(SCRIPT)
            .arg("pgtemp-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.root)
            .arg(&self.data_dir)
            // Never hold the test harness's stdout/stderr pipes open, or
            // `cargo test` waits for us forever.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: a Ctrl-C on the terminal must not kill the
            // watchdog before it has cleaned up.
            .process_group(0);
        cmd.spawn().map_err(io_err("starting the pgtemp watchdog"))
    }

    fn kill_watchdog(&mut self) {
        if let Some(mut child) = self.watchdog.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        self.kill_watchdog();
        if let Some(dir) = self.dir.take() {
            if self.data_dir.join("postmaster.pid").exists() {
                let mut cmd = self.pg_ctl();
                cmd.args(["-w", "-t", "30", "stop", "-m", "immediate"]);
                let _ = cmd.output();
            }
            drop(dir);
        }
    }
}

/// Run a command to completion; a non-zero exit becomes [`Error::Command`]
/// carrying its output.
fn run(mut cmd: Command, what: &str) -> Result<()> {
    let output = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(io_err(format!("running {what}")))?;
    if output.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Err(Error::Command {
        command: what.to_owned(),
        status: output.status.to_string(),
        output: text.trim_end().to_owned(),
    })
}

/// The directory with initdb/pg_ctl/postgres: `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/<major>/bin`.
fn find_bindir() -> Result<PathBuf> {
    let has_binaries = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|b| dir.join(b).is_file())
    };
    let mut tried = Vec::new();

    match Command::new("pg_config").arg("--bindir").output() {
        Ok(out) if out.status.success() => {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if has_binaries(&dir) {
                return Ok(dir);
            }
            tried.push(format!("`pg_config --bindir` ({})", dir.display()));
        }
        _ => tried.push("`pg_config --bindir` (not on PATH)".to_owned()),
    }

    let mut candidates: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let major = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((major, entry.path().join("bin")))
        })
        .collect();
    candidates.sort_by_key(|c| std::cmp::Reverse(c.0));
    for (_, dir) in candidates {
        if has_binaries(&dir) {
            return Ok(dir);
        }
    }
    tried.push("/usr/lib/postgresql/*/bin".to_owned());
    Err(Error::BinariesNotFound {
        tried: tried.join(", "),
    })
}

/// `postgres --version` → "15.18"; errors if older than 15.
fn server_version(bindir: &Path) -> Result<String> {
    let output = Command::new(bindir.join("postgres"))
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("running postgres --version"))?;
    // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    let text = String::from_utf8_lossy(&output.stdout);
    let version = text
        .split_whitespace()
        .nth(2)
        .unwrap_or_default()
        .to_owned();
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse::<u32>().ok())
        .unwrap_or(0);
    if major < MIN_MAJOR_VERSION {
        return Err(Error::TooOld {
            bindir: bindir.to_owned(),
            version: text.trim().to_owned(),
        });
    }
    Ok(version)
}

/// Effective uid, from the `Uid:` line of /proc/self/status (real, effective,
/// saved, fs), falling back to the owner of /proc/self.
pub fn effective_uid() -> Result<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        let euid = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok());
        if let Some(euid) = euid {
            return Ok(euid);
        }
    }
    fs::metadata("/proc/self")
        .map(|m| m.uid())
        .map_err(io_err("reading the effective uid from /proc/self"))
}

fn passwd_entries() -> Vec<Vec<String>> {
    fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .map(|l| l.split(':').map(str::to_owned).collect::<Vec<_>>())
        .filter(|fields| fields.len() >= 6)
        .collect()
}

pub(crate) fn find_server_user() -> Result<ServerUser> {
    ["postgres", "nobody"]
        .into_iter()
        .find_map(os_user)
        .ok_or(Error::NoServerUser)
}

/// The OS account `name`, from /etc/passwd.
pub fn os_user(name: &str) -> Option<ServerUser> {
    let entries = passwd_entries();
    let fields = entries.iter().find(|f| f[0] == name)?;
    Some(ServerUser {
        name: name.to_owned(),
        uid: fields[2].parse().ok()?,
        gid: fields[3].parse().ok()?,
    })
}

fn passwd_home(user: &str) -> Option<String> {
    passwd_entries()
        .into_iter()
        .find(|f| f[0] == user)
        .map(|f| f[5].clone())
}

/// 24 alphanumeric characters from /dev/urandom (URL-safe, no escaping).
fn random_password() -> Result<String> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 24];
    fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(io_err("reading /dev/urandom for the server password"))?;
    Ok(bytes
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

/// A port that was free a moment ago (the listener is released again; the
/// caller retries if someone else grabs it first).
pub(crate) fn free_port() -> Result<u16> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(io_err("binding 127.0.0.1:0 to pick a port"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(io_err("reading the picked port"))
}

fn quote_conf(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// RFC 3986 unreserved characters: everything else is percent-encoded.
const NOT_UNRESERVED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Percent-encode everything but RFC 3986 unreserved characters.
pub fn percent_encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, NOT_UNRESERVED).to_string()
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = fs::File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    async fn connect(
        config: &tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    #[tokio::test]
    async fn starts_and_checks_passwords() {
        let server = TempPostgres::start(TempPostgresOptions::default())
            .await
            .expect("start a temporary PostgreSQL (install postgresql-15)");
        assert!(!format!("{server:?}").contains(server.password()));

        let client = connect(&server.admin_config("postgres")).await.unwrap();
        let row = client
            .query_one("SELECT current_user::text, current_setting('fsync')", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), "postgres");
        assert_eq!(row.get::<_, String>(1), "off");

        // The URL form works too.
        let url_config: tokio_postgres::Config = server.admin_url("postgres").parse().unwrap();
        connect(&url_config).await.unwrap();

        let mut wrong = server.admin_config("postgres");
        wrong.password("not-the-password");
        let err = connect(&wrong)
            .await
            .expect_err("a wrong password must be rejected");
        let db = err
            .as_db_error()
            .expect("a server-side authentication error");
        assert_eq!(
            db.code(),
            &tokio_postgres::error::SqlState::INVALID_PASSWORD
        );

        let data_dir = server.data_dir().to_owned();
        drop(client);
        server.stop().unwrap();
        assert!(!data_dir.exists());
    }

    #[tokio::test]
    async fn restart_keeps_the_port() {
        let server = TempPostgres::start(TempPostgresOptions::default())
            .await
            .unwrap();
        let port = server.port();
        let client = connect(&server.admin_config("postgres")).await.unwrap();
        client.simple_query("SELECT 1").await.unwrap();
        let server = tokio::task::spawn_blocking(move || {
            server.restart().unwrap();
            server
        })
        .await
        .unwrap();
        assert!(
            client.simple_query("SELECT 1").await.is_err(),
            "old session ended"
        );
        assert_eq!(server.port(), port);
        let client = connect(&server.admin_config("postgres")).await.unwrap();
        client.simple_query("SELECT 1").await.unwrap();
        let root = server.socket_dir().to_owned();
        drop(server);
        assert!(!root.exists(), "drop removes the directory");
    }

    #[tokio::test]
    async fn serves_tls_with_the_given_certificate() {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let tls = ServerTls {
            cert_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
        };
        assert!(!format!("{tls:?}").contains("PRIVATE KEY"));
        let server = TempPostgres::start(TempPostgresOptions {
            tls: Some(tls),
            ..TempPostgresOptions::default()
        })
        .await
        .unwrap();
        let key_mode = fs::metadata(server.data_dir().join("server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(key_mode & 0o777, 0o600);

        let mut roots = rustls::RootCertStore::empty();
        roots.add(certified.cert.der().clone()).unwrap();
        let client_config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let mut config = server.admin_config("postgres");
        config.ssl_mode(tokio_postgres::config::SslMode::Require);
        let (client, connection) = config
            .connect(tokio_postgres_rustls::MakeRustlsConnect::new(client_config))
            .await
            .unwrap();
        tokio::spawn(connection);
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(ssl);
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("a b:c@d/é"), "a%20b%3Ac%40d%2F%C3%A9");
    }
}
