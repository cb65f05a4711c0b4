//! One dedicated PostgreSQL session and the statements the engine sends on
//! it. Advisory lock 4246 is session-level, so the lock, every window call
//! and the stamp all go through the same [`Session`], and the session must
//! be one server backend for its whole life: [`Session::check_pinned`]
//! refuses a connection pooler that hands transactions to shared server
//! backends, and every window call checks where lock 4246 is.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use tokio_postgres::error::SqlState;
use tokio_postgres::{CancelToken, Client, SimpleQueryMessage};
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_util::sync::CancellationToken;

use super::plan::{Slice, Snapshot};
use super::{
    ADVISORY_LOCK_KEY, ConnectFailure, Database, DatabaseIdentity, Error, FutureEvents, LockHolder,
    Result,
};

/// How often, and how many times, a cancel request is sent before the session
/// is given up for dead (closing it releases the lock server-side). It is
/// repeated because a request that overtakes its statement cancels nothing.
const CANCEL_RETRY: Duration = Duration::from_secs(1);
const CANCEL_ATTEMPTS: u32 = 10;

/// Rounds of the pinning check. Measured against PgBouncer 1.18 in
/// transaction mode with a pool of 4 and 6 other clients busy: one round
/// told 78 to 95 of 100 probes, three rounds 100 of 100 (idle, or a pool
/// of 1: every probe in one round).
const PIN_ROUNDS: u32 = 3;
/// Key class of the pinning probe's advisory lock. As a two-int key,
/// (4246, k) is classid 4246 / objsubid 2 in pg_locks and never collides
/// with the bigint key 4246 (classid 0, objid 4246, objsubid 1).
const PROBE_CLASS: i32 = 4246;
/// Tries to run an unlock on the backend holding the lock, when the
/// statements of a pooled session land on other backends.
const RELEASE_ATTEMPTS: u32 = 50;
const RELEASE_PAUSE: Duration = Duration::from_millis(10);

pub(crate) struct Session {
    client: Client,
    cancel_token: CancelToken,
    tls: MakeRustlsConnect,
    /// Kept to scrub it from every message that leaves this module.
    password: Option<String>,
    connection: tokio::task::JoinHandle<()>,
    /// Server backend pid that took lock 4246 (0: not held). The unlock
    /// runs there.
    lock_pid: AtomicI32,
}

/// What a window call checks first, in the same statement: where lock 4246
/// is, against the pid of the backend that took it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Guard {
    /// The lock session: runs on that backend, which still holds the lock.
    Holder(i32),
    /// A worker: runs on another backend, while that one holds the lock.
    Worker(i32),
}

/// A failed window call of the parallel walk.
pub(crate) struct SliceError {
    pub error: Error,
    /// A deadlock or serialization failure: running the slice again is
    /// the remedy (its transaction rolled back).
    pub conflict: bool,
}

/// The outcome of a statement raced against cancellation.
enum Raced<T> {
    Done(T),
    /// Cancelled; holds the statement's own result if it came back in time.
    Cancelled(Option<T>),
}

impl Session {
    pub(crate) async fn connect(db: &Database) -> Result<Session> {
        let (tls, ssl_mode) = super::tls::connector(db)?;
        let mut config = db.config.clone();
        config.ssl_mode(ssl_mode);
        let password = db.password();
        let target = db.describe();
        // tokio-postgres bounds only the TCP connect; a server that accepts
        // and then says nothing must fail within the timeout too.
        let attempt = tokio::time::timeout(db.connect_timeout(), config.connect(tls.clone())).await;
        let (client, connection) = match attempt {
            Err(_) => {
                return Err(Error::Connect {
                    kind: ConnectFailure::Timeout,
                    target,
                    message: format!(
                        "no answer within the connect timeout of {}",
                        crate::duration::format(db.connect_timeout())
                    ),
                });
            }
            Ok(Err(e)) => {
                return Err(Error::Connect {
                    kind: classify_connect(&e),
                    target,
                    message: scrub(describe(&e), password.as_deref()),
                });
            }
            Ok(Ok(pair)) => pair,
        };
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "database connection closed with an error");
            }
        });
        Ok(Session {
            cancel_token: client.cancel_token(),
            client,
            tls,
            password,
            connection,
            lock_pid: AtomicI32::new(0),
        })
    }

    /// Checks that this session keeps one server backend across its
    /// transactions and shares it with no other connection, as a direct
    /// connection or a session-pooling pooler does; a transaction- or
    /// statement-pooling pooler does not, and then lock 4246 would guard
    /// nothing. Run first: only simple-protocol statements (a pooler sends
    /// the halves of an extended-protocol statement to different backends,
    /// which fails with an obscure "prepared statement does not exist"),
    /// and no setting is changed before the verdict.
    ///
    /// This session takes a session-level advisory lock on a random probe
    /// key; a second connection (`other`, opened alongside this one, to the
    /// same database) tries the same key as a
    /// transaction-level lock, which succeeds only on the same backend
    /// (a backend's advisory locks are re-entrant); and this session checks
    /// it still runs on its first backend. The probe lock is released on
    /// every path. Returns this session's backend pid, and a warning when
    /// the second connection could not be used (the checks of every window
    /// call remain).
    pub(crate) async fn check_pinned(
        &self,
        other: Result<Session>,
        wait: Duration,
    ) -> Result<(i32, Option<String>)> {
        const CONTEXT: &str = "checking for a transaction-pooling connection pooler";
        let key = probe_key();
        let row = self
            .simple_row(
                CONTEXT,
                &format!("SELECT pg_backend_pid(), pg_try_advisory_lock({PROBE_CLASS}, {key})"),
            )
            .await?;
        let pid = self.int(CONTEXT, &row[0])?;
        if row[1].as_deref() != Some("t") {
            // Someone holds this random key; another probe will do.
            return Ok((
                pid,
                Some(format!(
                    "the pooling check found its random advisory key ({PROBE_CLASS}, {key}) taken and was skipped"
                )),
            ));
        }
        let verdict = self.probe(other, wait, pid, key).await;
        let unlock = format!("pg_advisory_unlock({PROBE_CLASS}, {key})");
        if !self.release_on(pid, &unlock).await {
            tracing::warn!(
                pid,
                key,
                "could not release the pooling probe's advisory lock; it goes with its server connection"
            );
        }
        match verdict? {
            Probe::Pinned => Ok((pid, None)),
            Probe::Inconclusive(warning) => Ok((pid, Some(warning))),
            Probe::Shared(evidence) => Err(Error::pooling_before_lock(evidence)),
        }
    }

    async fn probe(
        &self,
        other: Result<Session>,
        wait: Duration,
        pid: i32,
        key: i32,
    ) -> Result<Probe> {
        const CONTEXT: &str = "checking for a transaction-pooling connection pooler";
        let other = match other {
            Ok(other) => other,
            Err(e) => {
                return Ok(Probe::Inconclusive(format!(
                    "the pooling check could not open a second connection ({e}); each slice still checks where lock 4246 is"
                )));
            }
        };
        let try_key =
            format!("SELECT pg_backend_pid(), pg_try_advisory_xact_lock({PROBE_CLASS}, {key})");
        for _ in 0..PIN_ROUNDS {
            match tokio::time::timeout(wait, other.simple_row(CONTEXT, &try_key)).await {
                Ok(Ok(row)) => {
                    if row[1].as_deref() == Some("t") && other.int(CONTEXT, &row[0])? == pid {
                        return Ok(Probe::Shared(format!(
                            "a second connection ran on server backend pid {pid}, the backfill session's own, while both were open"
                        )));
                    }
                }
                Ok(Err(e)) => {
                    return Ok(Probe::Inconclusive(format!(
                        "the pooling check's second connection failed ({e}); each slice still checks where lock 4246 is"
                    )));
                }
                Err(_) => {
                    return Ok(Probe::Inconclusive(format!(
                        "the pooling check's second connection got no answer within {} (a session pooler without a free server connection?); each slice still checks where lock 4246 is",
                        crate::duration::format(wait)
                    )));
                }
            }
            let row = self.simple_row(CONTEXT, "SELECT pg_backend_pid()").await?;
            let now = self.int(CONTEXT, &row[0])?;
            if now != pid {
                return Ok(Probe::Shared(format!(
                    "two transactions of the backfill's session ran on different server backends (pids {pid} and {now})"
                )));
            }
        }
        Ok(Probe::Pinned)
    }

    /// Runs `unlock` (an unlock call) on backend `pid`, again while the
    /// statement lands on other backends (a pooled session); false when it
    /// never got there.
    async fn release_on(&self, pid: i32, unlock: &str) -> bool {
        let sql = format!("SELECT CASE WHEN pg_backend_pid() = {pid} THEN {unlock} END");
        for _ in 0..RELEASE_ATTEMPTS {
            match self.simple_row("releasing an advisory lock", &sql).await {
                Ok(row) if row[0].is_some() => return true,
                Ok(_) => tokio::time::sleep(RELEASE_PAUSE).await,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot release an advisory lock");
                    return false;
                }
            }
        }
        false
    }

    /// The first row of a simple-protocol statement, as text.
    async fn simple_row(&self, context: &'static str, sql: &str) -> Result<Vec<Option<String>>> {
        let messages = self
            .client
            .simple_query(sql)
            .await
            .map_err(|e| self.db_error(context, &e))?;
        messages
            .into_iter()
            .find_map(|m| match m {
                SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .ok_or_else(|| Error::Database {
                context,
                message: "the statement returned no row".into(),
            })
    }

    fn int(&self, context: &'static str, text: &Option<String>) -> Result<i32> {
        text.as_deref()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| Error::Database {
                context,
                message: format!("expected an integer, got {text:?}"),
            })
    }

    /// Turns a driver error into an engine error, scrubbed.
    fn db_error(&self, context: &'static str, e: &tokio_postgres::Error) -> Error {
        let message = scrub(describe(e), self.password.as_deref());
        match e.code() {
            Some(c) if *c == SqlState::INSUFFICIENT_PRIVILEGE => {
                Error::PermissionDenied { message }
            }
            Some(c) if *c == SqlState::UNDEFINED_TABLE || *c == SqlState::UNDEFINED_FUNCTION => {
                Error::SchemaMissing { what: message }
            }
            _ => Error::Database { context, message },
        }
    }

    pub(crate) async fn server_version(&self) -> Result<String> {
        let row = self
            .client
            .query_one("SHOW server_version", &[])
            .await
            .map_err(|e| self.db_error("reading the server version", &e))?;
        Ok(row.get(0))
    }

    /// Which database this session is on. The control-data functions are
    /// optional: where EXECUTE on them is revoked (some managed services),
    /// the database's oid is all that is known.
    pub(crate) async fn identity(&self) -> Result<DatabaseIdentity> {
        let database_oid: u32 = self
            .client
            .query_one(
                "SELECT oid FROM pg_database WHERE datname = current_database()",
                &[],
            )
            .await
            .map_err(|e| self.db_error("reading the database's oid", &e))?
            .get(0);
        let control = self
            .client
            .query_one(
                "SELECT (SELECT system_identifier FROM pg_control_system()),
                        (SELECT timeline_id FROM pg_control_checkpoint())",
                &[],
            )
            .await
            .ok();
        Ok(DatabaseIdentity {
            system_identifier: control.as_ref().map(|r| r.get(0)),
            timeline: control.as_ref().map(|r| r.get(1)),
            database_oid,
        })
    }

    /// Applies `set_config(name, value, false)` for each setting.
    pub(crate) async fn apply_settings(&self, settings: &[(String, String)]) -> Result<()> {
        for (name, value) in settings {
            self.client
                .query_one("SELECT set_config($1, $2, false)", &[name, value])
                .await
                .map_err(|e| Error::InvalidSetting {
                    name: name.clone(),
                    message: scrub(describe(&e), self.password.as_deref()),
                })?;
        }
        // If our process dies mid-slice, the server notices the closed socket
        // within seconds and rolls back, freeing lock 4246 for the next
        // attempt, instead of finishing a window nobody waits for. Older
        // servers lack the setting; that only costs time, so it is optional.
        let _ = self
            .client
            .query_one(
                "SELECT set_config('client_connection_check_interval', '5s', false)",
                &[],
            )
            .await;
        Ok(())
    }

    /// Whether the state table and the window function exist.
    pub(crate) async fn schema(&self) -> Result<(bool, bool)> {
        let row = self
            .client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM information_schema.tables
                                 WHERE table_schema = 'public'
                                   AND table_name = 'task_usage_hourly_rollup_state'),
                        to_regprocedure('public.rollup_task_usage_hourly_window(timestamptz, timestamptz)') IS NOT NULL",
                &[],
            )
            .await
            .map_err(|e| self.db_error("checking the rollup schema", &e))?;
        Ok((row.get(0), row.get(1)))
    }

    /// The privileges the engine itself uses that the role lacks: EXECUTE
    /// on the window function and SELECT and UPDATE on the state table (the
    /// stamp). Checked before the lock, so that a role that could walk but
    /// not stamp fails before writing anything. What the function needs
    /// beyond that depends on how it is defined (SECURITY INVOKER or
    /// DEFINER) and shows when it runs.
    pub(crate) async fn missing_privileges(&self) -> Result<Vec<&'static str>> {
        let row = self
            .client
            .query_one(
                "SELECT current_user::text,
                        has_function_privilege('public.rollup_task_usage_hourly_window(timestamptz, timestamptz)', 'EXECUTE'),
                        has_any_column_privilege('public.task_usage_hourly_rollup_state', 'SELECT'),
                        has_any_column_privilege('public.task_usage_hourly_rollup_state', 'UPDATE')",
                &[],
            )
            .await
            .map_err(|e| self.db_error("checking the role's privileges", &e))?;
        let needed = [
            (1, "EXECUTE on function rollup_task_usage_hourly_window"),
            (2, "SELECT on table task_usage_hourly_rollup_state"),
            (3, "UPDATE on table task_usage_hourly_rollup_state"),
        ];
        Ok(needed
            .into_iter()
            .filter(|(i, _)| !row.get::<_, bool>(*i))
            .map(|(_, what)| what)
            .collect())
    }

    /// The database clock: `now()`, the start of a fresh transaction.
    pub(crate) async fn clock(&self) -> Result<Timestamp> {
        Ok(self
            .client
            .query_one("SELECT now()", &[])
            .await
            .map_err(|e| self.db_error("reading the database clock", &e))?
            .get(0))
    }

    /// Reads the range of history and the watermark in one round trip. The
    /// maximum is computed per index (updated_at, and created_at of legacy
    /// rows) instead of MAX(COALESCE(..)), which would scan the table.
    pub(crate) async fn snapshot(&self) -> Result<Snapshot> {
        let (state_table, _) = self.schema().await?;
        if !state_table {
            // Nothing else is read: without the rollup schema the source
            // tables may be missing too, and the hook skips anyway.
            let now = self.clock().await?;
            return Ok(Snapshot {
                state_table,
                min_event: None,
                max_event: None,
                watermark: None,
                now,
            });
        }
        let sql = "SELECT LEAST((SELECT min(created_at) FROM public.task_usage),
                          (SELECT min(updated_at) FROM public.task_usage)),
                    GREATEST((SELECT max(updated_at) FROM public.task_usage),
                             (SELECT max(created_at) FROM public.task_usage WHERE updated_at IS NULL)),
                    (SELECT watermark_at FROM public.task_usage_hourly_rollup_state WHERE id = 1),
                    now()";
        let row = self
            .client
            .query_one(sql, &[])
            .await
            .map_err(|e| self.db_error("reading the task_usage range", &e))?;
        Ok(Snapshot {
            state_table,
            min_event: row.get(0),
            max_event: row.get(1),
            watermark: row.get(2),
            now: row.get(3),
        })
    }

    /// Rows whose event time lies beyond `horizon` (future-dated events), if any.
    pub(crate) async fn future_events(
        &self,
        horizon: Timestamp,
        now: Timestamp,
    ) -> Result<Option<FutureEvents>> {
        let row = self
            .client
            .query_one(
                "SELECT count(*), max(COALESCE(updated_at, created_at))
                   FROM public.task_usage
                  WHERE updated_at > $1 OR (updated_at IS NULL AND created_at > $1)",
                &[&horizon],
            )
            .await
            .map_err(|e| self.db_error("looking for future-dated events", &e))?;
        let rows: i64 = row.get(0);
        let latest: Option<Timestamp> = row.get(1);
        Ok(match latest {
            Some(latest) if rows > 0 => Some(FutureEvents {
                rows,
                latest,
                ahead_seconds: latest.duration_since(now).as_secs(),
            }),
            _ => None,
        })
    }

    /// Events and queued keys a slice would pick up (dry-run estimate).
    pub(crate) async fn estimate(&self, slice: &Slice) -> Result<i64> {
        let row = self
            .client
            .query_one(
                "SELECT (SELECT count(*) FROM public.task_usage
                          WHERE (updated_at >= $1 AND updated_at < $2)
                             OR (updated_at IS NULL AND created_at >= $1 AND created_at < $2))",
                &[&slice.from, &slice.to],
            )
            .await
            .map_err(|e| self.db_error("estimating a slice", &e))?;
        Ok(row.get(0))
    }

    async fn try_lock(&self) -> Result<bool> {
        let row = self
            .client
            .query_one(
                "SELECT pg_try_advisory_lock($1), pg_backend_pid()",
                &[&ADVISORY_LOCK_KEY],
            )
            .await
            .map_err(|e| self.db_error("trying advisory lock 4246", &e))?;
        if row.get(0) {
            self.lock_pid.store(row.get(1), Ordering::Relaxed);
        }
        Ok(row.get(0))
    }

    /// The server backend pid that took lock 4246, while this session holds it.
    pub(crate) fn lock_pid(&self) -> Option<i32> {
        Some(self.lock_pid.load(Ordering::Relaxed)).filter(|pid| *pid != 0)
    }

    /// Who holds lock 4246 in this database, if anyone visible does.
    pub(crate) async fn lock_holder(&self) -> Result<Option<LockHolder>> {
        // A bigint advisory key is stored as classid = high half, objid = low
        // half, objsubid = 1.
        let row = self
            .client
            .query_opt(
                "SELECT a.pid, a.application_name, host(a.client_addr), a.backend_start
                   FROM pg_locks l
                   JOIN pg_stat_activity a ON a.pid = l.pid
                  WHERE l.locktype = 'advisory' AND l.granted
                    AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                    AND l.classid = ($1::bigint >> 32)::oid
                    AND l.objid = ($1::bigint & 4294967295)::oid
                    AND l.objsubid = 1
                  LIMIT 1",
                &[&ADVISORY_LOCK_KEY],
            )
            .await
            .map_err(|e| self.db_error("reading the holder of lock 4246", &e))?;
        Ok(row.map(|r| LockHolder {
            pid: r.get(0),
            application_name: r.get::<_, Option<String>>(1).filter(|s| !s.is_empty()),
            client_addr: r.get(2),
            since: r.get(3),
        }))
    }

    /// Takes lock 4246, waiting in PostgreSQL's lock queue (fair, and
    /// visible in pg_locks) for at most `timeout`. `on_wait` is told who
    /// holds it before the wait begins. Returns how long it waited.
    pub(crate) async fn lock(
        &self,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
        on_wait: impl FnOnce(Option<LockHolder>),
    ) -> Result<Duration> {
        let started = Instant::now();
        if self.try_lock().await? {
            return Ok(Duration::ZERO);
        }
        // Who holds it is information for the status, not a reason to fail.
        let holder = self.lock_holder().await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "cannot read the holder of lock 4246");
            None
        });
        on_wait(holder);
        if timeout == Some(Duration::ZERO) {
            return Err(Error::LockTimeout {
                waited: Duration::ZERO,
            });
        }
        if let Some(t) = timeout {
            self.set("lock_timeout", &format!("{}ms", t.as_millis().max(1)))
                .await?;
        }
        let wait = self.client.query_one(
            "SELECT pg_backend_pid() FROM pg_advisory_lock($1)",
            &[&ADVISORY_LOCK_KEY],
        );
        let raced = self.race(wait, cancel).await;
        if timeout.is_some() {
            // Best effort: the window calls must not inherit the lock timeout.
            let _ = self.set("lock_timeout", "0").await;
        }
        if let Raced::Done(Ok(row)) | Raced::Cancelled(Some(Ok(row))) = &raced {
            self.lock_pid.store(row.get(0), Ordering::Relaxed);
        }
        match raced {
            Raced::Done(Ok(_)) => Ok(started.elapsed()),
            Raced::Done(Err(e)) if e.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
                Err(Error::LockTimeout {
                    waited: started.elapsed(),
                })
            }
            Raced::Done(Err(e)) => Err(self.db_error("waiting for advisory lock 4246", &e)),
            Raced::Cancelled(Some(Ok(_))) => {
                // Granted just before the cancel landed: give it back.
                self.unlock().await;
                Err(Error::Cancelled)
            }
            Raced::Cancelled(_) => Err(Error::Cancelled),
        }
    }

    /// Releases lock 4246, on the backend that took it. Never cancellable:
    /// it runs on every exit path. If it fails the session is dead, and so
    /// is the lock.
    pub(crate) async fn unlock(&self) {
        let pid = self.lock_pid.swap(0, Ordering::Relaxed);
        if pid == 0 {
            return;
        }
        let unlock = format!("pg_advisory_unlock({ADVISORY_LOCK_KEY}::bigint)");
        if !self.release_on(pid, &unlock).await {
            tracing::warn!(
                pid,
                "could not release advisory lock 4246; it is released when its server session closes"
            );
        }
    }

    pub(crate) async fn set(&self, name: &str, value: &str) -> Result<()> {
        again_after_stray_cancel(|| async {
            self.client
                .query_one("SELECT set_config($1, $2, false)", &[&name, &value])
                .await
                .map(drop)
        })
        .await
        .map_err(|e| self.db_error("changing a session setting", &e))
    }

    /// Whether the connection is gone (no round trip: usable while a
    /// statement of this session is running).
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Events per UTC calendar month from `from` on, in one scan: the
    /// slice sizes, by the same rule as [`Session::estimate`].
    pub(crate) async fn month_counts(&self, from: Timestamp) -> Result<Vec<(Timestamp, i64)>> {
        let rows = self
            .client
            .query(
                "SELECT date_trunc('month', COALESCE(updated_at, created_at) AT TIME ZONE 'UTC')
                            AT TIME ZONE 'UTC' AS month,
                        count(*)
                   FROM public.task_usage
                  WHERE COALESCE(updated_at, created_at) >= $1
                  GROUP BY 1
                  ORDER BY 1",
                &[&from],
            )
            .await
            .map_err(|e| self.db_error("counting events per month", &e))?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Sets (or, with None, resets to the server's default) the plan cache
    /// mode of this session.
    pub(crate) async fn set_plan_cache_mode(&self, mode: Option<&str>) -> Result<()> {
        match mode {
            Some(m) => self.set("plan_cache_mode", m).await,
            None => again_after_stray_cancel(|| self.client.batch_execute("RESET plan_cache_mode"))
                .await
                .map_err(|e| self.db_error("resetting plan_cache_mode", &e)),
        }
    }

    /// Sets a planner setting and forgets the session's cached plans: the
    /// window function's generic plan is cached per session and would keep
    /// the join order planned under the old value.
    pub(crate) async fn set_and_replan(&self, name: &str, value: &str) -> Result<()> {
        self.set(name, value).await?;
        again_after_stray_cancel(|| self.client.batch_execute("DISCARD PLANS"))
            .await
            .map_err(|e| self.db_error("discarding cached plans", &e))
    }

    /// One window call, for the parallel walk, run only if `guard` holds:
    /// the check and the call are one statement, so a slice never runs on
    /// a backend that does not hold lock 4246 (the lock session, e.g. moved
    /// by a pooler) or after the lock session lost it (a worker). The error
    /// says whether the slice may simply be run again (deadlock,
    /// serialization failure).
    pub(crate) async fn rollup_attempt(
        &self,
        slice: &Slice,
        timeout: Option<Duration>,
        cancel: &CancellationToken,
        guard: Guard,
    ) -> std::result::Result<i64, SliceError> {
        let (pid, holder) = match guard {
            Guard::Holder(pid) => (pid, true),
            Guard::Worker(pid) => (pid, false),
        };
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 5] =
            [&slice.from, &slice.to, &pid, &ADVISORY_LOCK_KEY, &holder];
        // CASE evaluates the call only when the check passes.
        let call = self.client.query_one(
            "SELECT g.me, g.held,
                    CASE WHEN g.held AND (g.me = $3) = $5
                         THEN public.rollup_task_usage_hourly_window($1, $2) END
               FROM (SELECT pg_backend_pid() AS me,
                            EXISTS (
                               SELECT 1 FROM pg_catalog.pg_locks l
                                WHERE l.locktype = 'advisory' AND l.granted AND l.pid = $3
                                  AND l.database = (SELECT oid FROM pg_catalog.pg_database
                                                     WHERE datname = current_database())
                                  AND l.classid = ($4::bigint >> 32)::oid
                                  AND l.objid = ($4::bigint & 4294967295)::oid
                                  AND l.objsubid = 1) AS held) g",
            &params,
        );
        let row = match self.race(call, cancel).await {
            // A call that finished before the cancel reached the server has
            // committed its slice: it counts as done (a probe given up too
            // late is a completed probe, not a slice to run twice).
            Raced::Done(Ok(row)) | Raced::Cancelled(Some(Ok(row))) => row,
            Raced::Done(Err(e)) => return Err(self.slice_error(slice, timeout, &e)),
            Raced::Cancelled(_) => {
                return Err(SliceError {
                    error: Error::Cancelled,
                    conflict: false,
                });
            }
        };
        let (me, held): (i32, bool) = (row.get(0), row.get(1));
        if held && (me == pid) == holder {
            return Ok(row.get::<_, Option<i64>>(2).unwrap_or(0));
        }
        let window = format!("[{}, {})", slice.from, slice.to);
        let error = match guard {
            Guard::Holder(_) if me != pid => Error::pooling_in_walk(format!(
                "slice {window} would have run on server backend pid {me}, but lock 4246 was taken on pid {pid}"
            )),
            Guard::Holder(_) => Error::pooling_in_walk(format!(
                "the server backend of the backfill's session (pid {pid}) no longer held advisory lock 4246 at slice {window}"
            )),
            Guard::Worker(_) if me == pid => Error::pooling_in_walk(format!(
                "a worker's slice {window} would have run on the server backend holding lock 4246 (pid {pid})"
            )),
            Guard::Worker(_) => Error::LockLost {
                message: format!("the session holding it (pid {pid}) no longer does"),
            },
        };
        Err(SliceError {
            error,
            conflict: false,
        })
    }

    /// The error of a failed window call: a timeout, a missing privilege or
    /// function (as such), else a slice failure.
    fn slice_error(
        &self,
        slice: &Slice,
        timeout: Option<Duration>,
        e: &tokio_postgres::Error,
    ) -> SliceError {
        // A cancel request is signalled to the backend asynchronously: one
        // of ours (a probe given up; `race` may send several) can arrive
        // after the statement it was meant for and cancel the next one on
        // this session. We cancel only through `race`, which reports its
        // own cancels as `Cancelled`, so a statement cancelled "due to user
        // request" here runs again, like a deadlock, a bounded number of
        // times.
        let stray_cancel = is_stray_cancel(e);
        let conflict = stray_cancel
            || matches!(
                e.code(),
                Some(c) if *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
            );
        let error = match (e.code(), timeout) {
            (Some(c), Some(timeout)) if *c == SqlState::QUERY_CANCELED && !stray_cancel => {
                Error::SliceTimeout {
                    slice: *slice,
                    timeout,
                }
            }
            (Some(c), _)
                if *c == SqlState::INSUFFICIENT_PRIVILEGE || *c == SqlState::UNDEFINED_FUNCTION =>
            {
                self.db_error("calling the window function", e)
            }
            _ => Error::Slice {
                slice: *slice,
                message: scrub(describe(e), self.password.as_deref()),
            },
        };
        SliceError { error, conflict }
    }

    /// Stamps the watermark with `at`, an instant of the database clock read
    /// by the run ([`super::plan::walk_end`]), returning the new value (None
    /// when no state row exists).
    pub(crate) async fn stamp(&self, at: Timestamp) -> Result<Option<Timestamp>> {
        let row = self
            .client
            .query_opt(
                "UPDATE public.task_usage_hourly_rollup_state
                    SET watermark_at = $1
                  WHERE id = 1
              RETURNING watermark_at",
                &[&at],
            )
            .await
            .map_err(|e| self.db_error("stamping the watermark", &e))?;
        Ok(row.map(|r| r.get(0)))
    }

    /// Runs `fut` until it finishes or `cancel` fires; on cancel, asks the
    /// server to cancel the statement and waits briefly for it to return.
    async fn race<T>(&self, fut: impl Future<Output = T>, cancel: &CancellationToken) -> Raced<T> {
        tokio::pin!(fut);
        tokio::select! {
            biased;
            out = &mut fut => Raced::Done(out),
            _ = cancel.cancelled() => {
                for _ in 0..CANCEL_ATTEMPTS {
                    if let Err(e) = self.cancel_token.cancel_query(self.tls.clone()).await {
                        tracing::debug!(error = %e, "cancel request failed");
                    }
                    if let Ok(out) = tokio::time::timeout(CANCEL_RETRY, &mut fut).await {
                        return Raced::Cancelled(Some(out));
                    }
                }
                Raced::Cancelled(None)
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Dropping the client ends the session; the connection task then
        // finishes by itself. Abort it in case the socket is stuck.
        self.connection.abort();
    }
}

/// A statement cancelled "due to user request": on our sessions only
/// `Session::race` cancels, and reports its own cancels, so an error like
/// this elsewhere is a stray one ([`Session::slice_error`]).
fn is_stray_cancel(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&SqlState::QUERY_CANCELED)
        && e.as_db_error()
            .is_some_and(|d| d.message().contains("user request"))
}

/// Runs a statement that may simply run again (a session setting), again
/// while a stray cancel of ours hits it: a probe given up whose call
/// committed before the cancel reached the server leaves the cancel to
/// land on the session's next statement, and that is the setting for its
/// next slice (seen on one-workspace 200k: the walk failed with
/// "changing a session setting: canceling statement due to user
/// request"). At most one statement per cancel request sent.
async fn again_after_stray_cancel<T, F, Fut>(
    statement: F,
) -> std::result::Result<T, tokio_postgres::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, tokio_postgres::Error>>,
{
    again_while(statement, is_stray_cancel, CANCEL_ATTEMPTS).await
}

/// `statement`, run again while its error is `retry`'s, at most `times`
/// more times.
async fn again_while<T, E, F, Fut>(
    mut statement: F,
    retry: impl Fn(&E) -> bool,
    times: u32,
) -> std::result::Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = std::result::Result<T, E>>,
{
    let mut left = times;
    loop {
        match statement().await {
            Err(e) if left > 0 && retry(&e) => left -= 1,
            done => return done,
        }
    }
}

/// What the pinning check saw.
enum Probe {
    Pinned,
    /// Evidence of a shared or moving server backend.
    Shared(String),
    /// The second connection could not be used: a warning.
    Inconclusive(String),
}

/// A random positive probe key, fresh per call (std's per-process random
/// hash keys, advanced per `RandomState`).
fn probe_key() -> i32 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (hasher.finish() % i32::MAX as u64) as i32 + 1
}

fn classify_connect(e: &tokio_postgres::Error) -> ConnectFailure {
    if let Some(code) = e.code() {
        return if *code == SqlState::INVALID_PASSWORD
            || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
        {
            ConnectFailure::Authentication
        } else if *code == SqlState::INVALID_CATALOG_NAME {
            ConnectFailure::DatabaseNotFound
        } else {
            ConnectFailure::Other
        };
    }
    let text = describe(e).to_ascii_lowercase();
    if text.contains("tls") || text.contains("certificate") || text.contains("ssl") {
        return ConnectFailure::Tls;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return match io.kind() {
                std::io::ErrorKind::TimedOut => ConnectFailure::Timeout,
                _ => ConnectFailure::Unreachable,
            };
        }
        if s.downcast_ref::<rustls::Error>().is_some() {
            return ConnectFailure::Tls;
        }
        source = s.source();
    }
    if text.contains("timed out") {
        ConnectFailure::Timeout
    } else {
        ConnectFailure::Other
    }
}

/// A driver error as one line: the server's message (and detail) for
/// database errors, the error chain otherwise.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut s = format!("{}: {}", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            s += &format!(" ({detail})");
        }
        return s;
    }
    let mut s = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s += &format!(": {text}");
        }
        source = inner.source();
    }
    s
}

/// Removes the password from a message, wherever a server or driver put it.
pub(crate) fn scrub(message: String, password: Option<&str>) -> String {
    match password {
        Some(p) if !p.is_empty() => message.replace(p, "****"),
        _ => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statement failing `fails` times with `error`, then succeeding:
    /// the result of `again_while` (retrying "stray" errors up to twice)
    /// and how many times it ran.
    fn run(fails: u32, error: &'static str) -> (std::result::Result<u32, &'static str>, u32) {
        let mut ran = 0;
        let mut statement = || {
            ran += 1;
            let out = if ran <= fails { Err(error) } else { Ok(ran) };
            std::future::ready(out)
        };
        let out = futures::executor::block_on(again_while(&mut statement, |e| *e == "stray", 2));
        (out, ran)
    }

    #[test]
    fn a_statement_runs_again_only_after_a_stray_cancel_and_a_bounded_number_of_times() {
        assert_eq!(run(0, "stray"), (Ok(1), 1));
        assert_eq!(run(2, "stray"), (Ok(3), 3));
        assert_eq!(run(3, "stray"), (Err("stray"), 3));
        assert_eq!(run(1, "other"), (Err("other"), 1));
    }
}
