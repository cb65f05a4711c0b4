//! Instrumentation of a test database: the window function wrapped so
//! that tests can slow or stall it and see every committed call (which
//! session, which range, when), and a log of the watermark's stamps.
//! Calls and stamps are logged in the caller's transaction: a slice that
//! rolls back (killed, timed out, cancelled) leaves no row, exactly like
//! its rollup.

use jiff::Timestamp;
use tokio_postgres::Client;

/// Knobs of the wrapped window function, its call log, and the stamp log.
const INSTRUMENT: &str = "
    CREATE TABLE fault_knobs (
        id            int PRIMARY KEY DEFAULT 1 CHECK (id = 1),
        sleep_seconds float8 NOT NULL DEFAULT 0,
        -- Calls for slices starting at or after this stall (stall_seconds).
        stall_from    timestamptz,
        stall_seconds float8 NOT NULL DEFAULT 3600
    );
    INSERT INTO fault_knobs DEFAULT VALUES;
    CREATE TABLE window_calls (
        id       bigserial PRIMARY KEY,
        pid      int NOT NULL,
        app      text NOT NULL,
        usr      text NOT NULL,
        p_from   timestamptz NOT NULL,
        p_to     timestamptz NOT NULL,
        started  timestamptz NOT NULL,
        finished timestamptz NOT NULL
    );
    CREATE TABLE watermark_stamps (
        id     bigserial PRIMARY KEY,
        pid    int NOT NULL,
        app    text NOT NULL,
        old_at timestamptz,
        new_at timestamptz,
        at     timestamptz NOT NULL DEFAULT clock_timestamp()
    );
    CREATE FUNCTION log_watermark_stamp() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        INSERT INTO watermark_stamps (pid, app, old_at, new_at)
        VALUES (pg_backend_pid(), current_setting('application_name'),
                OLD.watermark_at, NEW.watermark_at);
        RETURN NEW;
    END $$;
    CREATE TRIGGER log_watermark_stamp
        AFTER UPDATE OF watermark_at ON task_usage_hourly_rollup_state
        FOR EACH ROW EXECUTE FUNCTION log_watermark_stamp();
    ALTER FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) RENAME TO real_window;
    CREATE FUNCTION rollup_task_usage_hourly_window(p_from timestamptz, p_to timestamptz)
    RETURNS bigint LANGUAGE plpgsql AS $$
    DECLARE
        k         fault_knobs;
        v_started timestamptz := clock_timestamp();
        v_rows    bigint;
    BEGIN
        SELECT * INTO k FROM fault_knobs WHERE id = 1;
        PERFORM pg_sleep(k.sleep_seconds);
        IF p_from >= k.stall_from THEN
            PERFORM pg_sleep(k.stall_seconds);
        END IF;
        v_rows := real_window(p_from, p_to);
        INSERT INTO window_calls (pid, app, usr, p_from, p_to, started, finished)
        VALUES (pg_backend_pid(), current_setting('application_name'), current_user,
                p_from, p_to, v_started, clock_timestamp());
        RETURN v_rows;
    END $$;
    GRANT SELECT ON fault_knobs, window_calls TO PUBLIC;
    GRANT INSERT ON window_calls, watermark_stamps TO PUBLIC;
    GRANT USAGE ON SEQUENCE window_calls_id_seq, watermark_stamps_id_seq TO PUBLIC;
    GRANT EXECUTE ON FUNCTION rollup_task_usage_hourly_window(timestamptz, timestamptz) TO PUBLIC;";

/// Wraps the window function and adds the logs (as the database owner).
pub async fn instrument(pg: &Client) {
    pg.batch_execute(INSTRUMENT).await.unwrap();
}

/// Every window call sleeps `seconds`.
pub async fn slow_window(pg: &Client, seconds: f64) {
    pg.execute("UPDATE fault_knobs SET sleep_seconds = $1", &[&seconds])
        .await
        .unwrap();
}

/// Window calls for slices starting at or after `from` stall (for an
/// hour); `None` repairs them.
pub async fn stall_window_from(pg: &Client, from: Option<Timestamp>) {
    pg.execute("UPDATE fault_knobs SET stall_from = $1", &[&from])
        .await
        .unwrap();
}

/// One committed window call.
#[derive(Debug, Clone)]
pub struct Call {
    /// The caller's application_name (empty for the test's own sessions).
    pub app: String,
    pub usr: String,
    pub from: Timestamp,
    pub to: Timestamp,
    pub started: Timestamp,
    pub finished: Timestamp,
}

/// Committed window calls, in the order they started.
pub async fn calls(pg: &Client) -> Vec<Call> {
    pg.query(
        "SELECT app, usr, p_from, p_to, started, finished FROM window_calls ORDER BY started, id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| Call {
        app: r.get(0),
        usr: r.get(1),
        from: r.get(2),
        to: r.get(3),
        started: r.get(4),
        finished: r.get(5),
    })
    .collect()
}

/// Watermark stamps by backfill sessions (application_name set; the test's
/// own sessions have none): (application_name, when), in order.
pub async fn backfill_stamps(pg: &Client) -> Vec<(String, Timestamp)> {
    pg.query(
        "SELECT app, at FROM watermark_stamps WHERE app <> '' ORDER BY at, id",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Calls of `later` whose range overlaps a call of `earlier`: slices
/// walked twice.
pub fn overlapping(earlier: &[Call], later: &[Call]) -> usize {
    later
        .iter()
        .filter(|l| earlier.iter().any(|e| l.from < e.to && e.from < l.to))
        .count()
}
