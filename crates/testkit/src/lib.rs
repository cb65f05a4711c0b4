//! The test kit: what the integration tests share, never linked into the
//! operator.
//!
//! - this module: a PostgreSQL database per test ([`fresh_database`],
//!   [`fresh_database_at`] a schema level), and [`at_both_levels!`];
//! - [`apiserver`]: a fake Kubernetes API server at the HTTP level;
//! - [`application`]: the application writing and ticking beside a backfill;
//! - [`cluster`]: a real etcd and kube-apiserver, built from Go modules,
//!   started per test process;
//! - [`harness`]: the controller test harness and builder fixtures;
//! - [`engine`]: engine runs and the independent correctness check;
//! - [`instrument`]: the window function wrapped, its calls and the stamps logged;
//! - [`status`]: reading conditions of a UsageBackfill status;
//! - [`tls`]: a test CA and a TLS PostgreSQL.
//!
//! This module owns the test databases and their server. With
//! `DATABASE_URL` set, tests use that server (its user needs CREATEDB, and
//! CREATEROLE for [`TestDatabase::create_role`]); otherwise one
//! [`TempPostgres`] is started lazily per test process and shared by all its
//! tests (kept in a `static`, so its watchdog removes it when the process
//! exits). The fixture schema is installed once per schema level into a
//! template database; every [`fresh_database_at`] is a `CREATE DATABASE …
//! TEMPLATE` copy of one ([`fresh_database`]: the hourly-pipeline level).
//!
//! Tests never skip: when no server can be had, [`fresh_database`] panics
//! with what was tried and how to fix it.

pub mod apiserver;
pub mod application;
pub mod cluster;
pub mod engine;
pub mod harness;
pub mod instrument;
pub mod status;
pub mod tls;

pub use apiserver::{FakeApiServer, Outage};
pub use harness::settings;
pub use usage_backfill_standin::fixture::SchemaLevel;

/// Runs each named test scenario at both schema levels: for every
/// `async fn name(level: SchemaLevel)` listed, a module `name` with the
/// tests `hourly_pipeline` and `current`. The scenario's body stays a plain
/// function (one copy, formatted by rustfmt); a module and a function may
/// share a name.
///
/// `at_both_levels!(multi_thread: name, …)` runs them on a two-thread
/// runtime, for scenarios whose own tasks must run beside the engine.
#[macro_export]
macro_rules! at_both_levels {
    (multi_thread: $($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn hourly_pipeline() {
                    super::$name($crate::SchemaLevel::HourlyPipeline).await
                }

                #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn current() {
                    super::$name($crate::SchemaLevel::Current).await
                }
            }
        )*
    };
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[::tokio::test]
                async fn hourly_pipeline() {
                    super::$name($crate::SchemaLevel::HourlyPipeline).await
                }

                #[::tokio::test]
                async fn current() {
                    super::$name($crate::SchemaLevel::Current).await
                }
            }
        )*
    };
}

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use usage_backfill_engine::error_chain as chain;
use usage_backfill_standin::fixture;
use usage_backfill_standin::pgtemp::{TempPostgres, TempPostgresOptions, percent_encode};

/// Set to keep every test database after its test.
pub const KEEP_DATABASES_ENV: &str = "TESTKIT_KEEP_DATABASES";

/// Session advisory lock serialising template builds and database creation
/// between processes sharing one `DATABASE_URL` server.
const TESTKIT_LOCK_KEY: i64 = 0x0074_6573_746b_6974; // "testkit"

static DATABASE_SERVER: OnceLock<Result<DatabaseServer, String>> = OnceLock::new();
/// CREATE DATABASE … TEMPLATE calls of this process, one at a time.
static CREATE_DATABASE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
static NEXT_DATABASE: AtomicU64 = AtomicU64::new(0);

struct DatabaseServer {
    /// `None` when the server comes from `DATABASE_URL`.
    server: Option<TempPostgres>,
    /// URL of the maintenance database, as a user that may create databases.
    admin_url: String,
    /// One template per schema level, in the order of [`SchemaLevel::ALL`].
    templates: Vec<String>,
}

impl DatabaseServer {
    fn template(&self, level: SchemaLevel) -> &str {
        let i = SchemaLevel::ALL
            .iter()
            .position(|l| *l == level)
            .expect("every level has a template");
        &self.templates[i]
    }
}

/// One test's database (a copy of the fixture template). Dropped at the end
/// of the test unless [`KEEP_DATABASES_ENV`] is set (or, on an external
/// server, the test panicked).
#[derive(Debug)]
pub struct TestDatabase {
    name: String,
    url: String,
    admin_url: String,
    roles: Mutex<Vec<String>>,
}

/// A login role made by [`TestDatabase::create_role`].
#[derive(Debug, Clone)]
pub struct TestRole {
    /// The actual role name: `<database>_<name>` (roles are cluster-wide).
    pub name: String,
    pub password: String,
    /// URL of the test database as this role.
    pub url: String,
}

/// A new database with the fixture installed at the hourly-pipeline level.
/// Panics (never skips) when no server is available.
pub async fn fresh_database() -> TestDatabase {
    fresh_database_at(SchemaLevel::HourlyPipeline).await
}

/// A new database with the fixture installed at `level`. Panics (never
/// skips) when no server is available.
pub async fn fresh_database_at(level: SchemaLevel) -> TestDatabase {
    let server = database_server();
    let _serial = CREATE_DATABASE.lock().await;
    let admin = connect(&server.admin_url)
        .await
        .unwrap_or_else(|e| panic!("testkit: connecting to the admin database: {}", chain(&e)));
    if server.server.is_none() {
        admin
            .execute("SELECT pg_advisory_lock($1)", &[&TESTKIT_LOCK_KEY])
            .await
            .unwrap_or_else(|e| panic!("testkit: taking the testkit lock: {}", chain(&e)));
    }
    // Names are never reused: a leftover of an earlier process with the same
    // pid is skipped rather than dropped (it may belong to someone else).
    let name = loop {
        let name = format!(
            "test_{}_{}",
            std::process::id(),
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
        );
        let create = format!("CREATE DATABASE {name} TEMPLATE {}", server.template(level));
        match admin.batch_execute(&create).await {
            Ok(()) => break name,
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {
                continue;
            }
            Err(e) => panic!("testkit: {create}: {}", chain(&e)),
        }
    };
    TestDatabase {
        url: with_dbname(&server.admin_url, &name),
        admin_url: server.admin_url.clone(),
        name,
        roles: Mutex::new(Vec::new()),
    }
}

/// A [`fresh_database`] holding `history` (the stand-in's generator), and
/// a session on it.
pub async fn database_with(history: &fixture::HistorySpec) -> (TestDatabase, Client) {
    let db = fresh_database().await;
    let client = db.client().await;
    fixture::generate(&client, history).await.unwrap();
    (db, client)
}

/// The test kit's own server, when it started one (not with `DATABASE_URL`).
///
/// It is shared by every test of the process, which run in parallel:
/// restarting or stopping it breaks the other tests' sessions. Fault tests
/// that need that should start a [`TempPostgres`] of their own.
pub fn server() -> Option<&'static TempPostgres> {
    database_server().server.as_ref()
}

/// A new connection to `url` (any server, e.g. a [`TempPostgres`] a fault
/// test started itself); its connection task runs on the current runtime.
/// Panics when it cannot connect.
pub async fn client(url: &str) -> Client {
    connect(url)
        .await
        .unwrap_or_else(|e| panic!("connecting to {url:?}: {}", chain(&e)))
}

/// Database `name` with the fixture installed (hourly-pipeline level), on
/// a server the test started itself (a [`TempPostgres`] it may restart or
/// stop): its admin URL and an admin connection to it.
pub async fn fixture_database(server: &TempPostgres, name: &str) -> (String, Client) {
    fixture_database_at(server, name, SchemaLevel::HourlyPipeline).await
}

/// [`fixture_database`] at `level`.
pub async fn fixture_database_at(
    server: &TempPostgres,
    name: &str,
    level: SchemaLevel,
) -> (String, Client) {
    let admin = client(&server.admin_url("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("testkit: CREATE DATABASE {name}: {}", chain(&e)));
    let url = server.admin_url(name);
    let db = client(&url).await;
    fixture::install_at(&db, level)
        .await
        .unwrap_or_else(|e| panic!("testkit: installing the fixture into {name}: {}", chain(&e)));
    (url, db)
}

/// Sessions of the current database holding (`true`) or waiting for
/// (`false`) advisory lock 4246 ([`fixture::ROLLUP_LOCK_KEY`], taken by the
/// backfill and the rollup tick): `(pid, granted, application_name)`.
pub async fn lock_4246(client: &Client) -> Vec<(i32, bool, String)> {
    client
        .query(
            "SELECT l.pid, l.granted, coalesce(a.application_name, '')
               FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.classid = 0 AND l.objid = 4246
                AND l.objsubid = 1
                AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("testkit: reading pg_locks: {}", chain(&e)))
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

/// Whether some session holds advisory lock 4246 in the current database.
pub async fn lock_4246_held(client: &Client) -> bool {
    lock_4246(client)
        .await
        .iter()
        .any(|(_, granted, _)| *granted)
}

impl TestDatabase {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// URL of this database as the admin user.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// URL of the maintenance database (`postgres`, or `DATABASE_URL`'s), as
    /// the admin user.
    pub fn admin_url(&self) -> &str {
        &self.admin_url
    }

    /// Connection settings of [`url`](Self::url).
    pub fn config(&self) -> tokio_postgres::Config {
        self.url.parse().expect("testkit URLs parse")
    }

    /// The test kit's own server, when it started one.
    pub fn server(&self) -> Option<&'static TempPostgres> {
        server()
    }

    /// A new admin connection to this database; its connection task runs on
    /// the current runtime.
    pub async fn client(&self) -> Client {
        connect(&self.url)
            .await
            .unwrap_or_else(|e| panic!("testkit: connecting to {}: {}", self.name, chain(&e)))
    }

    /// Create a login role `<database>_<name>` with `password`, then run
    /// `grants_sql` in this database as admin, with every `{role}` replaced
    /// by the quoted role name (e.g. `GRANT SELECT ON task_usage TO {role}`).
    /// The role is dropped with the database.
    pub async fn create_role(&self, name: &str, password: &str, grants_sql: &str) -> TestRole {
        let role = format!("{}_{name}", self.name);
        let client = self.client().await;
        let fail = |what: &str, e: tokio_postgres::Error| -> ! {
            panic!("testkit: {what} for role {role}: {}", chain(&e))
        };
        let row = client
            .query_one(
                "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text),
                        quote_ident($1::text)",
                &[&role, &password],
            )
            .await
            .unwrap_or_else(|e| fail("quoting", e));
        let (create, quoted): (String, String) = (row.get(0), row.get(1));
        client
            .batch_execute(&create)
            .await
            .unwrap_or_else(|e| fail("CREATE ROLE", e));
        self.roles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(role.clone());
        if !grants_sql.trim().is_empty() {
            client
                .batch_execute(&grants_sql.replace("{role}", &quoted))
                .await
                .unwrap_or_else(|e| fail("granting", e));
        }
        TestRole {
            url: with_credentials(&self.url, &role, password),
            name: role,
            password: password.to_owned(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let external = server_is_external();
        if std::env::var_os(KEEP_DATABASES_ENV).is_some() || (external && std::thread::panicking())
        {
            eprintln!("testkit: kept database {}", self.name);
            return;
        }
        let name = self.name.clone();
        let admin_url = self.admin_url.clone();
        let roles = std::mem::take(&mut *self.roles.lock().unwrap_or_else(|p| p.into_inner()));
        // Drop runs inside the test's runtime, where we cannot block_on:
        // do the cleanup on a plain thread with its own runtime.
        let cleanup = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                let work = async {
                    let admin = connect(&admin_url).await.ok()?;
                    admin
                        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                        .await
                        .ok()?;
                    for role in roles {
                        let drop_role: String = admin
                            .query_one(
                                "SELECT format('DROP ROLE IF EXISTS %I', $1::text)",
                                &[&role],
                            )
                            .await
                            .ok()?
                            .get(0);
                        let _ = admin.batch_execute(&drop_role).await;
                    }
                    Some(())
                };
                let _ = tokio::time::timeout(Duration::from_secs(20), work).await;
            });
        });
        let _ = cleanup.join();
    }
}

fn server_is_external() -> bool {
    matches!(DATABASE_SERVER.get(), Some(Ok(h)) if h.server.is_none())
}

fn database_server() -> &'static DatabaseServer {
    let server = DATABASE_SERVER.get_or_init(|| {
        // Each #[tokio::test] has its own runtime, which dies with its test,
        // and block_on cannot run inside a runtime: build everything on a
        // plain thread with a runtime of its own. The failure is cached so
        // every test fails at once with the same message.
        std::thread::Builder::new()
            .name("testkit-init".into())
            .spawn(init_database_server)
            .map_err(|e| format!("testkit: spawning the init thread: {e}"))
            .and_then(|t| {
                t.join()
                    .unwrap_or_else(|_| Err("testkit: the init thread panicked".into()))
            })
    });
    match server {
        Ok(h) => h,
        Err(message) => panic!("{message}"),
    }
}

fn init_database_server() -> Result<DatabaseServer, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("testkit: building a runtime: {e}"))?;
    let templates: Vec<String> = SchemaLevel::ALL
        .iter()
        .map(|level| format!("fixture_template_{:016x}", fnv1a(level.sql().as_bytes())))
        .collect();

    if let Some(url) = std::env::var("DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
    {
        rt.block_on(prepare_templates(&url, &templates, true)).map_err(|e| {
            format!(
                "testkit: DATABASE_URL is set, but preparing the fixture template on it failed: {e}\n\
                 Its user needs CREATEDB (and CREATEROLE for role tests), and the server must be \
                 PostgreSQL 15+ reachable without TLS. Unset DATABASE_URL to let the tests start \
                 their own server (needs `apt-get install postgresql-15`)."
            )
        })?;
        return Ok(DatabaseServer {
            server: None,
            admin_url: url,
            templates,
        });
    }

    let server = TempPostgres::start_blocking(TempPostgresOptions::default()).map_err(|e| {
        format!(
            "testkit: DATABASE_URL is not set, and starting a temporary PostgreSQL server failed: {}\n\
             Fix: install PostgreSQL 15+ server binaries (Debian/Ubuntu: `apt-get install postgresql-15`; \
             they are found via `pg_config --bindir` or /usr/lib/postgresql/*/bin), or set \
             DATABASE_URL to a PostgreSQL 15+ server whose user may CREATE DATABASE.",
            chain(&e)
        )
    })?;
    let admin_url = server.admin_url("postgres");
    rt.block_on(prepare_templates(&admin_url, &templates, false))
        .map_err(|e| format!("testkit: installing the fixture template: {e}"))?;
    Ok(DatabaseServer {
        server: Some(server),
        admin_url,
        templates,
    })
}

/// [`prepare_template`] for every level.
async fn prepare_templates(
    admin_url: &str,
    templates: &[String],
    shared: bool,
) -> Result<(), String> {
    for (level, template) in SchemaLevel::ALL.iter().zip(templates) {
        prepare_template(admin_url, template, *level, shared).await?;
    }
    Ok(())
}

/// Build the template database once (under a cross-process advisory lock
/// on shared servers); built under a temporary name and renamed, so a
/// crashed build never leaves a half-installed template behind.
async fn prepare_template(
    admin_url: &str,
    template: &str,
    level: SchemaLevel,
    shared: bool,
) -> Result<(), String> {
    let admin = connect(admin_url)
        .await
        .map_err(|e| format!("connecting: {}", chain(&e)))?;
    let version: i32 = admin
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(|e| chain(&e))?
        .get(0);
    if version < 150000 {
        return Err(format!(
            "server_version_num is {version}; PostgreSQL 15+ is required"
        ));
    }
    if shared {
        admin
            .execute("SELECT pg_advisory_lock($1)", &[&TESTKIT_LOCK_KEY])
            .await
            .map_err(|e| chain(&e))?;
    }
    let exists = admin
        .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&template])
        .await
        .map_err(|e| chain(&e))?
        .is_some();
    if !exists {
        let building = format!("{template}_build");
        let step = |what: String| move |e: tokio_postgres::Error| format!("{what}: {}", chain(&e));
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)"))
            .await
            .map_err(step(format!("dropping {building}")))?;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {building} TEMPLATE template0 ENCODING 'UTF8' \
                 LC_COLLATE 'C' LC_CTYPE 'C'"
            ))
            .await
            .map_err(step(format!("creating {building}")))?;
        {
            let (client, connection) =
                tokio_postgres::connect(&with_dbname(admin_url, &building), NoTls)
                    .await
                    .map_err(step(format!("connecting to {building}")))?;
            let connection = tokio::spawn(connection);
            fixture::install_at(&client, level)
                .await
                .map_err(|e| chain(&e))?;
            // Wait for the session to end: a template must have no connections.
            drop(client);
            let _ = connection.await;
        }
        admin
            .batch_execute(&format!("ALTER DATABASE {building} RENAME TO {template}"))
            .await
            .map_err(step(format!("renaming {building}")))?;
    }
    if shared {
        let _ = admin
            .execute("SELECT pg_advisory_unlock($1)", &[&TESTKIT_LOCK_KEY])
            .await;
    }
    Ok(())
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "testkit connection ended with an error");
        }
    });
    Ok(client)
}

/// Replace the database of a libpq URL (`postgres://…/db?…`) or key=value
/// DSN (a later `dbname=` wins).
fn with_dbname(url: &str, dbname: &str) -> String {
    match split_url(url) {
        Some((head, authority, _path, query)) => {
            format!("{head}{authority}/{}{query}", percent_encode(dbname))
        }
        None => format!("{url} dbname='{dbname}'"),
    }
}

/// Replace user and password of a URL or key=value DSN.
fn with_credentials(url: &str, user: &str, password: &str) -> String {
    match split_url(url) {
        Some((head, authority, path, query)) => {
            let hosts = authority
                .rsplit_once('@')
                .map_or(authority, |(_, hosts)| hosts);
            format!(
                "{head}{}:{}@{hosts}{path}{query}",
                percent_encode(user),
                percent_encode(password)
            )
        }
        None => format!(
            "{url} user='{}' password='{}'",
            dsn_escape(user),
            dsn_escape(password)
        ),
    }
}

/// `postgres://user@host:5432/db?x=y` → (`postgres://`, `user@host:5432`,
/// `/db`, `?x=y`); `None` for key=value DSNs.
fn split_url(url: &str) -> Option<(&str, &str, &str, &str)> {
    let scheme_end = ["postgres://", "postgresql://"]
        .iter()
        .find(|s| url.starts_with(**s))
        .map(|s| s.len())?;
    let (head, rest) = url.split_at(scheme_end);
    let (before_query, query) = rest.find('?').map_or((rest, ""), |i| rest.split_at(i));
    let (authority, path) = before_query
        .find('/')
        .map_or((before_query, ""), |i| before_query.split_at(i));
    Some((head, authority, path, query))
}

fn dsn_escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "\\'")
}

/// Stable hash of the schema text (names the template, so a changed
/// fixture never reuses an old template on a shared server).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_rewriting() {
        assert_eq!(
            with_dbname("postgres://u:p@h:5432/db?sslmode=disable", "t_1"),
            "postgres://u:p@h:5432/t_1?sslmode=disable"
        );
        assert_eq!(with_dbname("postgresql://h", "t"), "postgresql://h/t");
        assert_eq!(
            with_dbname("host=h user=u", "t"),
            "host=h user=u dbname='t'"
        );
        assert_eq!(
            with_credentials("postgres://u:p@h:1/db", "r", "p w"),
            "postgres://r:p%20w@h:1/db"
        );
        assert_eq!(
            with_credentials("postgres://h/db", "r", "x"),
            "postgres://r:x@h/db"
        );
    }

    #[tokio::test]
    async fn databases_are_separate_copies_of_the_template() {
        let a = fresh_database().await;
        let b = fresh_database().await;
        assert_ne!(a.name(), b.name());
        let ca = a.client().await;
        let cb = b.client().await;
        ca.batch_execute("INSERT INTO workspace (name, slug) VALUES ('w', 'w')")
            .await
            .unwrap();
        async fn count(c: &Client) -> i64 {
            c.query_one("SELECT count(*) FROM workspace", &[])
                .await
                .unwrap()
                .get(0)
        }
        assert_eq!(count(&ca).await, 1);
        assert_eq!(count(&cb).await, 0);
        // Each level has its own template.
        for level in SchemaLevel::ALL {
            let db = fresh_database_at(level).await;
            let client = db.client().await;
            assert_eq!(fixture::schema_level(&client).await.unwrap(), level);
        }
    }

    #[tokio::test]
    async fn lock_4246_shows_the_holder_and_the_waiters_of_this_database() {
        /// A session of `db` named `app`, and its pid.
        async fn session(db: &TestDatabase, app: &str) -> (Client, i32) {
            let client = db.client().await;
            client
                .batch_execute(&format!("SET application_name = '{app}'"))
                .await
                .unwrap();
            let pid = client
                .query_one("SELECT pg_backend_pid()", &[])
                .await
                .unwrap()
                .get(0);
            (client, pid)
        }
        /// Waits until `lock_4246` shows `expected` (in any order).
        async fn shows(observer: &Client, expected: &[(i32, bool, &str)]) {
            let mut expected: Vec<_> = expected
                .iter()
                .map(|&(pid, granted, app)| (pid, granted, app.to_owned()))
                .collect();
            expected.sort();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let mut seen = lock_4246(observer).await;
                seen.sort();
                if seen == expected {
                    return;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "lock 4246: {seen:?}, expected {expected:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let db = fresh_database().await;
        let other = fresh_database().await;
        let observer = db.client().await;
        let (holder, holder_pid) = session(&db, "holder").await;
        let (waiter, waiter_pid) = session(&db, "waiter").await;
        let (elsewhere, _) = session(&other, "elsewhere").await;
        shows(&observer, &[]).await;
        assert!(!lock_4246_held(&observer).await);

        let take = "SELECT pg_advisory_lock(4246)";
        holder.batch_execute(take).await.unwrap();
        elsewhere.batch_execute(take).await.unwrap();
        shows(&observer, &[(holder_pid, true, "holder")]).await;
        assert!(lock_4246_held(&observer).await);
        let waiting = tokio::spawn(async move {
            waiter.batch_execute(take).await.unwrap();
            waiter
        });
        shows(
            &observer,
            &[(holder_pid, true, "holder"), (waiter_pid, false, "waiter")],
        )
        .await;

        holder
            .batch_execute("SELECT pg_advisory_unlock(4246)")
            .await
            .unwrap();
        let waiter = waiting.await.unwrap();
        shows(&observer, &[(waiter_pid, true, "waiter")]).await;
        drop(waiter);
        shows(&observer, &[]).await;
        assert!(!lock_4246_held(&observer).await);
    }

    #[tokio::test]
    async fn roles_log_in_with_their_password() {
        let db = fresh_database().await;
        let role = db
            .create_role(
                "reader",
                "s3cret 'quoted'",
                "GRANT SELECT ON task_usage TO {role}",
            )
            .await;
        let (client, connection) = tokio_postgres::connect(&role.url, NoTls).await.unwrap();
        tokio::spawn(connection);
        let n: i64 = client
            .query_one("SELECT count(*) FROM task_usage", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0);
        let denied = client.query_one("SELECT count(*) FROM agent", &[]).await;
        assert!(denied.is_err(), "only the granted table is readable");
    }
}
