//! The application beside the backfill, as tests run it: a writer of
//! small transactions (inserts dated in the history, updates with a new
//! `updated_at`, deletes, re-attributions of tasks to an issue of another
//! project) and a ticker calling the periodic entry
//! `rollup_task_usage_hourly()`, each on its own connection; and the two
//! checks that say whether the rollup lost anything: one catch-up window
//! (the application's next tick) and the stale buckets against an
//! independent recompute.
//!
//! A pre-upgrade hook runs while the old version of the application still
//! serves, so every claim about a backfill's result is tested with both
//! running. Either can be paused (a guard), e.g. to read a consistent state
//! or to let the ticks fall behind as when the application was paused.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use jiff::Timestamp;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Mutex, MutexGuard};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Transaction};
use usage_backfill_engine::CancellationToken;

/// How long [`Application::start`] waits for the first writes.
const WAIT: Duration = Duration::from_secs(60);
/// Pause between two write transactions of the writer.
const WRITE_PACE: Duration = Duration::from_millis(5);
/// Pause between two calls of the periodic entry.
pub const TICK_PACE: Duration = Duration::from_millis(100);
/// Writes committed before [`Application::start`] returns, so that a
/// backfill starts beside a busy application.
const WARM_UP_WRITES: u64 = 20;

/// What the writer committed, per kind of write.
#[derive(Debug, Default, Clone, Copy)]
pub struct Writes {
    pub inserts: u64,
    pub updates: u64,
    pub deletes: u64,
    pub reattributions: u64,
    /// Rolled back (deadlock with a window call, or the like).
    pub failed: u64,
}

/// The application beside the backfill, until stopped.
pub struct Application {
    stop: CancellationToken,
    committed: Arc<AtomicU64>,
    /// Held by the writer around each transaction and by the ticker around
    /// each call: whoever holds one has paused that side.
    writes: Arc<Mutex<()>>,
    ticks: Arc<Mutex<()>>,
    writer: JoinHandle<Writes>,
    ticker: JoinHandle<u64>,
}

/// Both sides of the application paused, until dropped.
pub struct Paused<'a> {
    _writes: MutexGuard<'a, ()>,
    _ticks: MutexGuard<'a, ()>,
}

impl Application {
    /// Starts both on the database at `url` (the writer picks rows, tasks
    /// and issues from what is there, from `seed`) and returns once the
    /// writer has committed a few writes.
    pub async fn start(url: &str, seed: u64) -> Application {
        let stop = CancellationToken::new();
        let committed = Arc::new(AtomicU64::new(0));
        let writes = Arc::new(Mutex::new(()));
        let ticks = Arc::new(Mutex::new(()));
        let writer = tokio::spawn(write(
            url.to_owned(),
            seed,
            stop.clone(),
            committed.clone(),
            writes.clone(),
        ));
        let ticker = tokio::spawn(tick(url.to_owned(), stop.clone(), ticks.clone()));
        let app = Application {
            stop,
            committed,
            writes,
            ticks,
            writer,
            ticker,
        };
        tokio::time::timeout(WAIT, async {
            while app.committed() < WARM_UP_WRITES {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the writer commits");
        app
    }

    /// Write transactions committed so far.
    pub fn committed(&self) -> u64 {
        self.committed.load(Ordering::SeqCst)
    }

    /// Pauses the ticks (once a tick under way has returned) until the
    /// guard is dropped; the writer goes on.
    pub async fn pause_ticks(&self) -> MutexGuard<'_, ()> {
        self.ticks.lock().await
    }

    /// Pauses both sides (once the transaction and the tick under way have
    /// ended) until the guard is dropped.
    pub async fn pause(&self) -> Paused<'_> {
        Paused {
            _writes: self.writes.lock().await,
            _ticks: self.ticks.lock().await,
        }
    }

    /// Stops both; what was written and how many ticks were called.
    pub async fn stop(self) -> (Writes, u64) {
        self.stop.cancel();
        (self.writer.await.unwrap(), self.ticker.await.unwrap())
    }
}

/// A task the writer may re-attribute.
struct Task {
    id: String,
    workspace: String,
    issue: Option<String>,
}

/// One write transaction, chosen before it runs.
enum Write {
    /// A new usage row of a task, created `days_ago` (updated now).
    Insert {
        task: String,
        days_ago: f64,
    },
    /// A new updated_at (and token count) for a row.
    Update {
        row: String,
    },
    Delete {
        row: String,
    },
    /// Task number `task` moves to `issue` (of another project).
    Reattribute {
        task: usize,
        issue: String,
    },
}

/// The writer's view of the rows it may touch, kept up to date with what it
/// commits.
struct Writer {
    rng: SmallRng,
    seed: u64,
    serial: u64,
    usage: Vec<String>,
    tasks: Vec<Task>,
    /// Issues per workspace.
    issues: HashMap<String, Vec<String>>,
    project: HashMap<String, Option<String>>,
    done: Writes,
}

impl Writer {
    async fn new(client: &Client, seed: u64) -> Writer {
        let rows = |sql: &'static str| client.query(sql, &[]);
        let usage = rows("SELECT id::text FROM task_usage ORDER BY id")
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        let tasks = rows(
            "SELECT q.id::text, a.workspace_id::text, q.issue_id::text
               FROM agent_task_queue q JOIN agent a ON a.id = q.agent_id
              WHERE q.runtime_id IS NOT NULL ORDER BY q.id",
        )
        .await
        .unwrap()
        .iter()
        .map(|r| Task {
            id: r.get(0),
            workspace: r.get(1),
            issue: r.get(2),
        })
        .collect();
        let mut issues: HashMap<String, Vec<String>> = HashMap::new();
        let mut project = HashMap::new();
        for r in
            rows("SELECT id::text, workspace_id::text, project_id::text FROM issue ORDER BY id")
                .await
                .unwrap()
        {
            issues.entry(r.get(1)).or_default().push(r.get(0));
            project.insert(r.get(0), r.get(2));
        }
        Writer {
            rng: SmallRng::seed_from_u64(seed),
            seed,
            serial: 0,
            usage,
            tasks,
            issues,
            project,
            done: Writes::default(),
        }
    }

    fn project_of(&self, issue: Option<&String>) -> Option<String> {
        issue.and_then(|i| self.project[i].clone())
    }

    fn next(&mut self) -> Write {
        let any_row = |w: &mut Writer| w.usage[w.rng.random_range(0..w.usage.len())].clone();
        match self.rng.random_range(0..4u8) {
            0 => Write::Insert {
                task: self.tasks[self.rng.random_range(0..self.tasks.len())]
                    .id
                    .clone(),
                days_ago: self.rng.random_range(0.0..90.0),
            },
            1 => Write::Update { row: any_row(self) },
            2 => Write::Delete { row: any_row(self) },
            _ => {
                let task = self.rng.random_range(0..self.tasks.len());
                let t = &self.tasks[task];
                let current = self.project_of(t.issue.as_ref());
                let others: Vec<&String> = self.issues[&t.workspace]
                    .iter()
                    .filter(|i| self.project[*i] != current)
                    .collect();
                let issue = others[self.rng.random_range(0..others.len())].clone();
                Write::Reattribute { task, issue }
            }
        }
    }

    /// Runs `write` in `tx`; for an insert, the new row's id.
    async fn apply(
        &mut self,
        tx: &Transaction<'_>,
        write: &Write,
    ) -> Result<Option<String>, tokio_postgres::Error> {
        match write {
            Write::Insert { task, days_ago } => {
                self.serial += 1;
                let model = format!("writer-{}-{}", self.seed, self.serial);
                let row = tx
                    .query_one(
                        "INSERT INTO task_usage
                             (task_id, provider, model, input_tokens, output_tokens, created_at)
                         VALUES ($1::text::uuid, 'writer', $2, 500, 50,
                                 now() - $3::float8 * interval '1 day')
                         RETURNING id::text",
                        &[task, &model, days_ago],
                    )
                    .await?;
                Ok(Some(row.get(0)))
            }
            Write::Update { row } => tx
                .execute(
                    "UPDATE task_usage SET input_tokens = input_tokens + 11, updated_at = now()
                      WHERE id = $1::text::uuid",
                    &[row],
                )
                .await
                .map(|_| None),
            Write::Delete { row } => tx
                .execute("DELETE FROM task_usage WHERE id = $1::text::uuid", &[row])
                .await
                .map(|_| None),
            Write::Reattribute { task, issue } => tx
                .execute(
                    "UPDATE agent_task_queue SET issue_id = $2::text::uuid WHERE id = $1::text::uuid",
                    &[&self.tasks[*task].id, issue],
                )
                .await
                .map(|_| None),
        }
    }

    /// Bookkeeping of a committed write.
    fn committed(&mut self, write: Write, inserted: Option<String>) {
        match write {
            Write::Insert { .. } => {
                self.usage.extend(inserted);
                self.done.inserts += 1;
            }
            Write::Update { .. } => self.done.updates += 1,
            Write::Delete { row } => {
                self.usage.retain(|u| *u != row);
                self.done.deletes += 1;
            }
            Write::Reattribute { task, issue } => {
                self.tasks[task].issue = Some(issue);
                self.done.reattributions += 1;
            }
        }
    }
}

/// Small transactions, one after the other, until stopped: inserts (rows
/// dated in the history, updated now), updates (new updated_at), deletes,
/// and re-attributions of tasks to an issue of another project.
async fn write(
    url: String,
    seed: u64,
    stop: CancellationToken,
    committed: Arc<AtomicU64>,
    gate: Arc<Mutex<()>>,
) -> Writes {
    let mut client = crate::client(&url).await;
    let mut writer = Writer::new(&client, seed).await;
    while !stop.is_cancelled() {
        let paused = gate.lock().await;
        let write = writer.next();
        let tx = client.transaction().await.unwrap();
        let result = match writer.apply(&tx, &write).await {
            Ok(inserted) => tx.commit().await.map(|_| inserted),
            Err(e) => Err(e),
        };
        match result {
            Ok(inserted) => {
                writer.committed(write, inserted);
                committed.fetch_add(1, Ordering::SeqCst);
            }
            // A deadlock with a window call, say: rolled back, nothing changed.
            Err(_) => writer.done.failed += 1,
        }
        drop(paused);
        tokio::time::sleep(WRITE_PACE).await;
    }
    writer.done
}

/// Calls the periodic entry until stopped (it gets nothing while a backfill
/// holds lock 4246); returns how many calls it made.
async fn tick(url: String, stop: CancellationToken, gate: Arc<Mutex<()>>) -> u64 {
    let client = crate::client(&url).await;
    let mut calls = 0;
    while !stop.is_cancelled() {
        let paused = gate.lock().await;
        // An error (a conflict with the writer, say) is the tick's to log;
        // the next call starts from the same watermark.
        let _ = client
            .query_one("SELECT rollup_task_usage_hourly()", &[])
            .await;
        drop(paused);
        calls += 1;
        tokio::time::sleep(TICK_PACE).await;
    }
    calls
}

/// The application's next tick once the writes have stopped, without its
/// five-minute margin (the test does not wait five minutes): one window
/// from the watermark to now().
pub async fn catch_up(client: &Client) {
    client
        .query_one(
            "SELECT rollup_task_usage_hourly_window(watermark_at, now())
               FROM task_usage_hourly_rollup_state WHERE id = 1",
            &[],
        )
        .await
        .unwrap();
}

/// Buckets of an independent recompute missing from the hourly table (or
/// different there), and hourly rows that an independent recompute does not
/// have (or has different): the stale buckets, counted both ways.
pub async fn stale_buckets(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "WITH expected AS (
                 SELECT date_trunc('hour', u.created_at AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                        a.workspace_id, q.runtime_id, q.agent_id, i.project_id, u.provider, u.model,
                        sum(u.input_tokens)::bigint, sum(u.output_tokens)::bigint,
                        sum(u.cache_read_tokens)::bigint, sum(u.cache_write_tokens)::bigint,
                        count(DISTINCT u.task_id)::bigint, count(*)::bigint
                   FROM task_usage u
                   JOIN agent_task_queue q ON q.id = u.task_id
                   JOIN agent a ON a.id = q.agent_id
                   LEFT JOIN issue i ON i.id = q.issue_id
                  WHERE q.runtime_id IS NOT NULL
                  GROUP BY 1, 2, 3, 4, 5, 6, 7),
             actual AS (
                 SELECT bucket_hour, workspace_id, runtime_id, agent_id, project_id, provider, model,
                        input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
                        task_count::bigint, event_count::bigint
                   FROM task_usage_hourly)
             SELECT (SELECT count(*) FROM (SELECT * FROM expected EXCEPT SELECT * FROM actual) m),
                    (SELECT count(*) FROM (SELECT * FROM actual EXCEPT SELECT * FROM expected) e)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// The application paused for 40 minutes: its watermark stays where its
/// last tick left it (set 45 minutes back) while `events` usage rows are
/// written, dated from 39 to 10 minutes ago (updated when created), each
/// in a bucket of its own (a model of its own, named after `tag`). Returns
/// the watermark and the models.
pub async fn fall_behind(pg: &Client, tag: &str, events: u32) -> (Timestamp, Vec<String>) {
    let watermark: Timestamp = pg
        .query_one(
            "UPDATE task_usage_hourly_rollup_state
                SET watermark_at = now() - interval '45 minutes' WHERE id = 1
             RETURNING watermark_at",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let task = a_task(pg).await;
    let mut models = Vec::new();
    for k in 0..events {
        let model = format!("paused-{tag}-{k}");
        let minutes_ago = f64::from(10 + (29 * k) / events.max(1));
        pg.execute(
            "INSERT INTO task_usage (task_id, provider, model, input_tokens, output_tokens,
                                     created_at, updated_at)
             SELECT $1::text::uuid, 'paused', $2, 100, 10, t, t
               FROM (SELECT now() - $3::float8 * interval '1 minute' AS t) m",
            &[&task, &model, &minutes_ago],
        )
        .await
        .unwrap();
        models.push(model);
    }
    (watermark, models)
}

/// How many of `models` have a bucket in the hourly table.
pub async fn rolled_up(pg: &Client, models: &[String]) -> usize {
    let n: i64 = pg
        .query_one(
            "SELECT count(*) FROM task_usage_hourly WHERE model = ANY($1)",
            &[&models],
        )
        .await
        .unwrap()
        .get(0);
    n as usize
}

/// A task whose usage rolls up (it has a runtime): the first by id.
pub async fn a_task(pg: &Client) -> String {
    pg.query_one(
        "SELECT id::text FROM agent_task_queue WHERE runtime_id IS NOT NULL ORDER BY id LIMIT 1",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}
