//! The walk's progress record: a ConfigMap per database, in the namespace
//! of the UsageBackfills that walk it, which outlives them.
//!
//! A run's cursor lives in its object's status, which goes with the object.
//! Helm's `before-hook-creation` deletes a hook object that is still
//! running (after a `--timeout` or an `--atomic` rollback) and creates a new
//! one; Argo CD does the same with its hooks. So every run also keeps its
//! progress here, and a new object's first run for the same database
//! continues from it instead of walking from the start.
//!
//! - Name: `usage-backfill-progress-<16 hex digits>`, the start of the
//!   SHA-256 of the connection target (`host:port/dbname`, never the user
//!   or the password, [`usage_backfill_engine::Database::target`]), so that
//!   every object of the namespace reading that database finds it by
//!   name (`get`, no `list`).
//! - Content: the target, the database's identity as the engine read it
//!   after connecting, the walk's start (`from`), `cursor`, counts, the
//!   plan, when and by which object (namespace/name/uid) it was written.
//!   No secrets. No ownerReference: it must not be garbage collected with
//!   the object that wrote it.
//! - Written by server-side apply when the run's status progress is
//!   written (at most every progress interval, when the cursor moved) and
//!   once when a run ends without stamping (cancelled by deletion or
//!   shutdown, failed), before its finalizer goes. A write that fails costs
//!   only the resume: it is logged, the run goes on.
//! - Deleted when a run stamps the watermark: a later run starts clean.
//! - Read (`get`) when a run starts with no cursor of its own. Offered to
//!   the engine only when younger than [`EXPIRY`] and written for the same
//!   target ([`offer`]); the engine uses it only when its walk starts at
//!   the record's `from` on the database it names
//!   (`resume_mismatch` in the engine's plan).
//!
//! Why resuming is safe beside the running application: docs/reliability.md.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;

use super::writes::FIELD_MANAGER;
use usage_backfill_api::UsageBackfillStatus as Status;
use usage_backfill_engine::{DatabaseIdentity, Event, Mode, Resume};

/// Records older than this are not used. A record matters for the minutes
/// or hours between a timed-out upgrade and the next one; a week covers a
/// weekend's pause, and bounds how long a record can matter for a database
/// restored in place from a volume snapshot taken before its slices ran
/// (same cluster identity and timeline, so the engine cannot tell).
pub(crate) const EXPIRY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Prefix of every record's name.
pub(crate) const NAME_PREFIX: &str = "usage-backfill-progress-";

/// Labels of every record: `kubectl get cm -l app.kubernetes.io/component=backfill-progress`.
pub const LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/managed-by", "usage-backfill-operator"),
    ("app.kubernetes.io/component", "backfill-progress"),
];

/// The record's name for a connection target.
pub fn name_for(target: &str) -> String {
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        format!("usage-backfill-progress\n{target}").as_bytes(),
    );
    let hex: String = digest.as_ref()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{NAME_PREFIX}{hex}")
}

/// The object that wrote a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl fmt::Display for Writer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} (uid {})", self.namespace, self.name, self.uid)
    }
}

/// One record, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Record {
    /// [`usage_backfill_engine::Database::target`].
    pub target: String,
    pub database: DatabaseIdentity,
    pub from: Timestamp,
    pub cursor: Timestamp,
    pub slices_processed: u64,
    pub rows_touched: i64,
    /// `IfLagging` or `Always`, and monthsBack: for people; the engine
    /// compares the walk's start, which is what the cursor belongs to.
    pub mode: String,
    pub months_back: u32,
    pub updated_at: Timestamp,
    pub writer: Writer,
}

impl Record {
    /// The ConfigMap's data.
    pub(crate) fn to_data(&self) -> BTreeMap<String, String> {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: String| data.insert(k.to_owned(), v);
        put("database", self.target.clone());
        if let Some(id) = self.database.system_identifier {
            put("systemIdentifier", id.to_string());
        }
        if let Some(t) = self.database.timeline {
            put("timeline", t.to_string());
        }
        put("databaseOid", self.database.database_oid.to_string());
        put("from", self.from.to_string());
        put("cursor", self.cursor.to_string());
        put("slicesProcessed", self.slices_processed.to_string());
        put("rowsTouched", self.rows_touched.to_string());
        put("mode", self.mode.clone());
        put("monthsBack", self.months_back.to_string());
        put("updatedAt", self.updated_at.to_string());
        put(
            "writer",
            format!("{}/{}", self.writer.namespace, self.writer.name),
        );
        put("writerUid", self.writer.uid.clone());
        data
    }

    /// Reads [`Record::to_data`] back; names the first key that is missing
    /// or does not parse.
    pub(crate) fn from_data(data: &BTreeMap<String, String>) -> Result<Record, String> {
        fn get<'a>(data: &'a BTreeMap<String, String>, key: &str) -> Result<&'a str, String> {
            data.get(key)
                .map(String::as_str)
                .ok_or_else(|| format!("key {key:?} is missing"))
        }
        fn parse<T: std::str::FromStr>(
            data: &BTreeMap<String, String>,
            key: &str,
        ) -> Result<T, String> {
            get(data, key)?
                .parse()
                .map_err(|_| format!("key {key:?} does not parse"))
        }
        fn optional<T: std::str::FromStr>(
            data: &BTreeMap<String, String>,
            key: &str,
        ) -> Result<Option<T>, String> {
            match data.contains_key(key) {
                true => parse(data, key).map(Some),
                false => Ok(None),
            }
        }
        let writer = get(data, "writer")?;
        let Some((namespace, name)) = writer.split_once('/') else {
            return Err("key \"writer\" is not namespace/name".into());
        };
        Ok(Record {
            target: get(data, "database")?.to_owned(),
            database: DatabaseIdentity {
                system_identifier: optional(data, "systemIdentifier")?,
                timeline: optional(data, "timeline")?,
                database_oid: parse(data, "databaseOid")?,
            },
            from: parse(data, "from")?,
            cursor: parse(data, "cursor")?,
            slices_processed: parse(data, "slicesProcessed")?,
            rows_touched: parse(data, "rowsTouched")?,
            mode: get(data, "mode")?.to_owned(),
            months_back: parse(data, "monthsBack")?,
            updated_at: parse(data, "updatedAt")?,
            writer: Writer {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                uid: get(data, "writerUid")?.to_owned(),
            },
        })
    }

    /// How the status and the Event name it.
    pub(crate) fn describe(&self) -> String {
        format!(
            "resuming at {} with the progress {} left for this database on {} (walk from {})",
            show(self.cursor),
            self.writer,
            show(self.updated_at),
            show(self.from)
        )
    }
}

/// UTC, to the second, as the status shows times.
fn show(ts: Timestamp) -> String {
    jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", ts).unwrap_or_else(|_| ts.to_string())
}

/// The plan a record notes: the mode's name and monthsBack.
pub(crate) fn plan_of(mode: &Mode) -> (&'static str, u32) {
    match mode {
        Mode::IfLagging { .. } => ("IfLagging", 0),
        Mode::Always { months_back, .. } => ("Always", *months_back),
    }
}

/// The resume `record` offers a run on `target` at `now`, or why none.
pub(crate) fn offer(record: &Record, target: &str, now: Timestamp) -> Result<Resume, String> {
    if record.target != target {
        return Err(format!(
            "it was written for {}, this run connects to {target}",
            record.target
        ));
    }
    let age = now.duration_since(record.updated_at);
    if age > SignedDuration::try_from(EXPIRY).unwrap_or(SignedDuration::MAX) {
        return Err(format!(
            "it was written on {}, more than {} days ago",
            show(record.updated_at),
            EXPIRY.as_secs() / 86_400
        ));
    }
    Ok(Resume {
        from: record.from,
        database: Some(record.database),
        cursor: record.cursor,
        slices_processed: record.slices_processed,
        rows_touched: record.rows_touched,
    })
}

/// What a run's record says besides its progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub target: String,
    pub mode: &'static str,
    pub months_back: u32,
    pub writer: Writer,
}

/// Keeps one run's record: written as its progress is, deleted when it
/// stamps. Failures are logged (the first as a warning) and cost only the
/// resume.
pub(crate) struct Keeper {
    records: Records,
    plan: Plan,
    /// As the engine read it after connecting: nothing is written before.
    database: Option<DatabaseIdentity>,
    /// The walk start and cursor last written.
    written: Option<(Timestamp, Timestamp)>,
    warned: bool,
}

impl Keeper {
    pub(crate) fn new(client: Client, namespace: &str, plan: Plan) -> Self {
        Keeper {
            records: Records::new(client, namespace),
            plan,
            database: None,
            written: None,
            warned: false,
        }
    }

    /// Notes what the run's events tell about the database.
    pub(crate) fn observe(&mut self, event: &Event) {
        if let Event::Connected { database, .. } = event {
            self.database = Some(*database);
        }
    }

    /// Writes the progress of `status` (the run's, as it stands) when its
    /// cursor moved since the last write.
    pub(crate) async fn save(&mut self, status: &Status) {
        let (Some(database), Some(from), Some(cursor)) =
            (self.database, status.from.as_ref(), status.cursor.as_ref())
        else {
            return;
        };
        let (from, cursor) = (from.0, cursor.0);
        if self.written == Some((from, cursor)) {
            return;
        }
        let record = Record {
            target: self.plan.target.clone(),
            database,
            from,
            cursor,
            slices_processed: u64::from(status.slices_processed.unwrap_or(0)),
            rows_touched: status.rows_touched.unwrap_or(0),
            mode: self.plan.mode.to_owned(),
            months_back: self.plan.months_back,
            updated_at: Timestamp::now(),
            writer: self.plan.writer.clone(),
        };
        match self.records.write(&record).await {
            Ok(()) => self.written = Some((from, cursor)),
            Err(e) => self.failed("cannot write the progress record", &e),
        }
    }

    /// The run stamped the watermark: the walk is done, nothing to resume.
    pub(crate) async fn stamped(&mut self) {
        if let Err(e) = self.records.delete(&self.plan.target).await {
            self.failed("cannot delete the progress record", &e);
        }
    }

    fn failed(&mut self, what: &str, e: &kube::Error) {
        let name = name_for(&self.plan.target);
        if self.warned {
            tracing::debug!(configmap = %name, error = %e, "{what}");
        } else {
            self.warned = true;
            tracing::warn!(configmap = %name, error = %e,
                "{what}; the run goes on, a recreated object may walk from the start");
        }
    }
}

/// The records of one namespace.
#[derive(Clone)]
pub(crate) struct Records {
    api: Api<ConfigMap>,
}

impl Records {
    pub(crate) fn new(client: Client, namespace: &str) -> Self {
        Records {
            api: Api::namespaced(client, namespace),
        }
    }

    /// The record for `target`. None when there is none; an unreadable
    /// record is an error (the run then walks from the start).
    pub(crate) async fn read(&self, target: &str) -> Result<Option<Record>, String> {
        let name = name_for(target);
        let cm = self
            .api
            .get_opt(&name)
            .await
            .map_err(|e| format!("cannot read ConfigMap {name}: {e}"))?;
        let Some(cm) = cm else { return Ok(None) };
        let data = cm.data.unwrap_or_default();
        Record::from_data(&data)
            .map(Some)
            .map_err(|e| format!("ConfigMap {name}: {e}"))
    }

    /// Creates or replaces the record of `record.target` (server-side
    /// apply: one request either way).
    pub(crate) async fn write(&self, record: &Record) -> kube::Result<()> {
        let name = name_for(&record.target);
        let labels: BTreeMap<&str, &str> = LABELS.into_iter().collect();
        let cm = json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": name, "labels": labels },
            "data": record.to_data(),
        });
        self.api
            .patch(
                &name,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&cm),
            )
            .await?;
        Ok(())
    }

    /// Deletes the record of `target`; one that is not there is fine.
    pub(crate) async fn delete(&self, target: &str) -> kube::Result<()> {
        match self
            .api
            .delete(&name_for(target), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    fn record() -> Record {
        Record {
            target: "shop-postgres:5432/multica".into(),
            database: DatabaseIdentity {
                system_identifier: Some(7_316_000_000_000_000_001),
                timeline: Some(1),
                database_oid: 16_384,
            },
            from: ts("2025-01-01T00:00:00Z"),
            cursor: ts("2025-07-01T00:00:00Z"),
            slices_processed: 6,
            rows_touched: 123_456,
            mode: "IfLagging".into(),
            months_back: 0,
            updated_at: ts("2026-03-10T12:00:00Z"),
            writer: Writer {
                namespace: "shop".into(),
                name: "usage-backfill".into(),
                uid: "0f1e2d3c".into(),
            },
        }
    }

    #[test]
    fn names_follow_the_target_and_are_valid_configmap_names() {
        let a = name_for("shop-postgres:5432/multica");
        assert_eq!(a, name_for("shop-postgres:5432/multica"));
        assert_ne!(a, name_for("shop-postgres:5432/other"));
        assert_ne!(a, name_for("shop-postgres:6432/multica"));
        assert_eq!(a.len(), NAME_PREFIX.len() + 16);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'),
            "{a}"
        );
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let r = record();
        assert_eq!(Record::from_data(&r.to_data()), Ok(r.clone()));
        // Without the control data (EXECUTE revoked), the oid alone.
        let mut bare = r.clone();
        bare.database.system_identifier = None;
        bare.database.timeline = None;
        assert_eq!(Record::from_data(&bare.to_data()), Ok(bare));
        let mut broken = r.to_data();
        broken.insert("cursor".into(), "yesterday".into());
        assert_eq!(
            Record::from_data(&broken),
            Err("key \"cursor\" does not parse".into())
        );
        broken.remove("writerUid");
        broken.insert("cursor".into(), r.cursor.to_string());
        assert_eq!(
            Record::from_data(&broken),
            Err("key \"writerUid\" is missing".into())
        );
    }

    #[test]
    fn a_record_is_offered_for_its_target_within_the_expiry() {
        let r = record();
        let now = ts("2026-03-11T12:00:00Z");
        let resume = offer(&r, &r.target, now).unwrap();
        assert_eq!(
            resume,
            Resume {
                from: r.from,
                database: Some(r.database),
                cursor: r.cursor,
                slices_processed: 6,
                rows_touched: 123_456,
            }
        );
        let why = offer(&r, "other:5432/multica", now).unwrap_err();
        assert!(
            why.contains("written for shop-postgres:5432/multica"),
            "{why}"
        );
        let week = ts("2026-03-17T12:00:00Z");
        assert!(offer(&r, &r.target, week).is_ok(), "exactly a week old");
        let why = offer(&r, &r.target, ts("2026-03-17T12:00:01Z")).unwrap_err();
        assert!(why.contains("more than 7 days ago"), "{why}");
    }

    #[test]
    fn the_description_names_the_writer_and_the_cursor() {
        assert_eq!(
            record().describe(),
            "resuming at 2025-07-01T00:00:00Z with the progress shop/usage-backfill (uid 0f1e2d3c) \
             left for this database on 2026-03-10T12:00:00Z (walk from 2025-01-01T00:00:00Z)"
        );
    }
}
