//! Running the engine in tests: a run with every event it reported, and
//! what the events and the database show afterwards.

use tokio_postgres::Client;
use usage_backfill_engine::{
    self as engine, CancellationToken, Database, Error, Event, Mode, Options, Outcome, Resume,
};
use usage_backfill_standin::fixture;

/// One engine run, with every event it reported.
pub async fn run(
    database: &Database,
    opts: &Options,
    cancel: &CancellationToken,
) -> (Result<Outcome, Error>, Vec<Event>) {
    let mut events = Vec::new();
    let result = engine::run(database, opts, cancel, &mut |e: &Event| {
        events.push(e.clone())
    })
    .await;
    (result, events)
}

/// Options of an `Always` run over the whole history (monthsBack 0).
pub fn always() -> Options {
    Options {
        mode: Mode::Always {
            months_back: 0,
            force_partial: false,
        },
        ..Options::default()
    }
}

/// Where a run would resume after the last slice it reported done (its own
/// cursor: no database named).
pub fn last_resume(events: &[Event]) -> Option<Resume> {
    let from = planned_from(events)?;
    events.iter().rev().find_map(|e| match e {
        Event::SliceDone {
            cursor,
            slices_processed,
            rows_touched,
            ..
        } => Some(Resume {
            from,
            database: None,
            cursor: *cursor,
            slices_processed: *slices_processed,
            rows_touched: *rows_touched,
        }),
        _ => None,
    })
}

/// The start of the walk a run planned.
pub fn planned_from(events: &[Event]) -> Option<jiff::Timestamp> {
    events.iter().find_map(|e| match e {
        Event::Planned { from, .. } => Some(*from),
        _ => None,
    })
}

/// The hourly table equals an independent recompute (at the current level
/// the cost split too), and the migration guard passes.
pub async fn assert_correct(client: &Client) {
    assert_eq!(
        fixture::recompute_mismatches(client).await.unwrap(),
        0,
        "hourly table differs from an independent recompute"
    );
    assert_eq!(
        fixture::guard(client).await.unwrap(),
        Ok(()),
        "the migration guard refuses"
    );
}

/// One full walk and stamp of the database at `url` (an `Always` run),
/// standing for the application's ticks since its history began.
pub async fn walk_all(url: &str) {
    let (outcome, _) = run(
        &Database::parse(url).unwrap(),
        &always(),
        &CancellationToken::new(),
    )
    .await;
    assert!(outcome.unwrap().watermark_stamped);
}
