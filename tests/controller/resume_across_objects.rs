//! A UsageBackfill deleted mid-walk and created again (Helm's
//! `before-hook-creation` after a `--timeout` or an `--atomic` rollback,
//! Argo CD's hooks) continues from the slices already committed, through
//! the progress record the runs keep beside the objects
//! (`usage_backfill_controller::progress`); a record that does not belong
//! to the new walk is not used; success removes it. The controller runs
//! against the fake API server and a real PostgreSQL whose window function
//! logs every committed call (the test kit's instrumentation).

use std::collections::BTreeMap;
use usage_backfill_testkit as testkit;

use jiff::{Timestamp, ToSpan};
use serde_json::Value;
use usage_backfill_api::{BackfillResult, ConditionType, Mode, Phase};
use usage_backfill_controller::{PROGRESS_LABELS as LABELS, progress_record_name};
use usage_backfill_engine::Database;
use usage_backfill_engine::add_months;
use usage_backfill_standin::fixture::HistorySpec;

use testkit::harness::{Harness, NS, UsageBackfillBuilder};
use testkit::instrument::{calls, instrument, overlapping};
use testkit::status::message;

/// Eight months of history: nine slices or so.
fn history() -> HistorySpec {
    HistorySpec {
        rows: 400,
        months: 8,
        ..HistorySpec::default()
    }
}

/// The harness's database, as the progress record keys it.
fn target(h: &Harness) -> String {
    Database::parse(&h.url).unwrap().target()
}

fn record(h: &Harness) -> Option<Value> {
    h.fake.config_map(NS, &progress_record_name(&target(h)))
}

fn record_data(v: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(v["data"].clone()).unwrap()
}

/// One walk, serial so that "no slice twice" is exact (on several
/// sessions a later slice may commit before an earlier one is cancelled,
/// and is then walked again: redone, not lost).
fn walk(name: &str) -> UsageBackfillBuilder {
    UsageBackfillBuilder::new(name)
        .sleep_between_slices("300ms")
        .edit(|s| s.parallelism = 1)
}

async fn harness() -> Harness {
    let h = Harness::new(Some(history())).await;
    instrument(&h.pg).await;
    h.put_secret();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_object_continues_the_deleted_ones_walk_without_redoing_a_slice() {
    let h = harness().await;
    let watermark = h.watermark().await;
    let first = h.apply(walk("first"));
    h.reconcile("first").await;
    h.wait_running("first", 3).await;

    // The upgrade timed out; the next one's before-hook-creation deletes
    // the hook object mid-walk.
    h.fake.delete(NS, "first");
    h.reconcile_deletion("first").await;
    assert_eq!(h.watermark().await, watermark, "nothing stamped");
    let before = calls(&h.pg).await;
    let stored = record(&h).expect("the deleted object's run left a progress record");
    let data = record_data(&stored);
    // Its cursor is where the committed slices end, contiguous from the start.
    let from: Timestamp = data["from"].parse().unwrap();
    let cursor: Timestamp = data["cursor"].parse().unwrap();
    let mut end = from;
    while let Some(c) = before.iter().find(|c| c.from == end) {
        end = c.to;
    }
    assert_eq!(cursor, end, "the last committed cursor: {before:?}");
    assert_eq!(data["slicesProcessed"], before.len().to_string());
    assert_eq!(
        data["writer"],
        format!("{NS}/first"),
        "written by the deleted object"
    );
    assert_eq!(data["writerUid"], first.metadata.uid.clone().unwrap());
    assert_eq!(data["database"], target(&h));
    assert!(data.contains_key("systemIdentifier") && data.contains_key("databaseOid"));
    assert_eq!(data["mode"], "IfLagging");
    for (k, v) in LABELS {
        assert_eq!(stored["metadata"]["labels"][k], v);
    }
    assert!(
        stored["metadata"]["ownerReferences"].is_null(),
        "not garbage collected with the object"
    );

    // The next upgrade's hook object: another name, another uid.
    let second = h.apply(walk("second"));
    assert_ne!(second.metadata.uid, first.metadata.uid);
    let done = h.run_to_end("second").await;
    let after = calls(&h.pg).await[before.len()..].to_vec();
    assert_eq!(
        overlapping(&before, &after),
        0,
        "slices walked twice: {after:?}"
    );
    assert_eq!(after.first().map(|c| c.from), Some(cursor), "{after:?}");
    let starting = h
        .fake
        .statuses("second")
        .into_iter()
        .find(|s| s.phase == Some(Phase::Pending))
        .unwrap();
    let shown = jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%SZ", cursor).unwrap();
    assert_eq!(
        message(&starting, ConditionType::Reconciling).split(" left for").next(),
        Some(
            format!(
                "starting attempt 1 of 7, resuming at {shown} with the progress {NS}/first (uid {})",
                first.metadata.uid.clone().unwrap()
            )
            .as_str()
        )
    );
    assert!(
        h.fake.events("second")[0].2.contains("resuming at"),
        "the Started Event says so"
    );
    // The counts continue: the first run's slices plus the second's.
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    assert_eq!(
        done.slices_processed,
        Some(u32::try_from(before.len() + after.len()).unwrap())
    );
    assert_eq!(done.slices_processed, done.slices_total);
    assert!(done.warnings.is_empty(), "{:?}", done.warnings);
    assert_eq!(done.watermark_stamped, Some(true));
    h.assert_rollup_correct().await;
    // Stamped: nothing left to resume.
    assert!(record(&h).is_none(), "success removes the record");
    h.assert_password_never_sent();
}

/// Data keys of a record and their new values.
type Edit = Vec<(&'static str, String)>;

/// A record of the same database written by hand from `base`, changed by
/// `edit`.
fn put_record(h: &Harness, base: &BTreeMap<String, String>, edit: &[(&str, String)]) {
    let mut data = base.clone();
    for (k, v) in edit {
        data.insert((*k).to_owned(), v.clone());
    }
    let labels = LABELS
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    h.fake
        .put_config_map(NS, &progress_record_name(&target(h)), &labels, &data);
}

/// Runs a new `Always` object to the end: its first window call and its
/// final status.
async fn run_fresh(
    h: &Harness,
    name: &str,
) -> (Timestamp, usage_backfill_api::UsageBackfillStatus) {
    let seen = calls(&h.pg).await.len();
    h.apply(
        UsageBackfillBuilder::new(name)
            .mode(Mode::Always)
            .edit(|s| s.parallelism = 1),
    );
    let done = h.run_to_end(name).await;
    assert_eq!(done.result, Some(BackfillResult::Backfilled));
    (calls(&h.pg).await[seen].from, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_record_one_of_another_database_or_another_walk_start_is_not_used() {
    let h = harness().await;
    // A run without any record: where walks start, and what the database is.
    let (start, plain) = run_fresh(&h, "plain").await;
    assert_eq!(plain.from.as_ref().map(|t| t.0), Some(start));
    let row =
        h.pg.query_one(
            "SELECT (SELECT system_identifier FROM pg_control_system())::text,
                    (SELECT timeline_id FROM pg_control_checkpoint())::text,
                    (SELECT oid FROM pg_database WHERE datname = current_database())::text",
            &[],
        )
        .await
        .unwrap();
    let (system, timeline, oid): (String, String, String) = (row.get(0), row.get(1), row.get(2));
    let cursor = add_months(start, 3);
    let now = Timestamp::now();
    let valid: BTreeMap<String, String> = [
        ("database", target(&h)),
        ("systemIdentifier", system),
        ("timeline", timeline),
        ("databaseOid", oid.clone()),
        ("from", start.to_string()),
        ("cursor", cursor.to_string()),
        ("slicesProcessed", "3".into()),
        ("rowsTouched", "100".into()),
        ("mode", "IfLagging".into()),
        ("monthsBack", "0".into()),
        ("updatedAt", now.to_string()),
        ("writer", format!("{NS}/gone")),
        ("writerUid", "00000000-0000-0000-0000-00000000dead".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();

    let eight_days_ago = now.checked_sub(192.hours()).unwrap();
    let other_oid = (oid.parse::<u32>().unwrap() + 1).to_string();
    let an_earlier_start = add_months(start, -1);
    // (object, what differs from the valid record, why the engine refuses
    // it when it is offered at all)
    let cases: [(&str, Edit, Option<&str>); 3] = [
        // Not offered: the status does not mention it.
        (
            "expired",
            vec![("updatedAt", eight_days_ago.to_string())],
            None,
        ),
        // Offered, refused by the engine once it has read the database's
        // identity (the database was dropped and created again).
        (
            "other-db",
            vec![("databaseOid", other_oid)],
            Some("written on another database"),
        ),
        // Offered, refused: the record's walk started a month earlier.
        (
            "other-start",
            vec![("from", an_earlier_start.to_string())],
            Some("belongs to a walk from"),
        ),
    ];
    for (name, edit, refusal) in cases {
        put_record(&h, &valid, &edit);
        let (first_call, done) = run_fresh(&h, name).await;
        assert_eq!(first_call, start, "{name}: walked from the start");
        assert_eq!(done.slices_processed, plain.slices_processed, "{name}");
        let starting = h
            .fake
            .statuses(name)
            .into_iter()
            .find(|s| s.phase == Some(Phase::Pending))
            .unwrap();
        let offered = message(&starting, ConditionType::Reconciling).contains("resuming at");
        assert_eq!(offered, refusal.is_some(), "{name}");
        if let Some(why) = refusal {
            assert!(
                done.warnings
                    .iter()
                    .any(|w| w.contains(why) && w.contains("walked from the start")),
                "{name}: {:?}",
                done.warnings
            );
        }
        assert!(record(&h).is_none(), "{name}: success removes the record");
        h.assert_rollup_correct().await;
    }
    // The valid record is used (the same check as the other test, here
    // with a record another writer left).
    put_record(&h, &valid, &[]);
    let (first_call, done) = run_fresh(&h, "valid").await;
    assert_eq!(first_call, cursor);
    assert!(done.warnings.is_empty(), "{:?}", done.warnings);
    assert!(record(&h).is_none());
    h.assert_rollup_correct().await;
    h.assert_password_never_sent();
}
