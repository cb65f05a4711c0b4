//! `usage-backfill demo`: the whole story on a fresh machine. Starts a
//! throwaway PostgreSQL, installs the stand-in rollup pipeline with sample
//! history, shows the migration guard refusing, backfills with visible
//! progress, proves the result with an independent recompute, cleans up.

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::backfill::{Progress, render_text, report_error};
use super::exit;
use usage_backfill_engine::{self as engine, Database, Options};
use usage_backfill_standin::fixture::{self, HistorySpec};
use usage_backfill_standin::pgtemp::{TempPostgres, TempPostgresOptions};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// task_usage rows of sample history.
    #[arg(long, default_value_t = 20_000)]
    pub rows: u64,
    /// Months of sample history, ending last month.
    #[arg(long, default_value_t = 12)]
    pub months: u32,
    /// Seed of the history generator (same seed, same history).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

pub(super) async fn run(args: DemoArgs, cancel: CancellationToken) -> u8 {
    match demo(args, cancel).await {
        Ok(code) => code,
        Err(DemoError::Engine(e)) => report_error(&e),
        Err(DemoError::Setup(msg)) => {
            eprintln!("error: {msg}");
            exit::RETRYABLE
        }
    }
}

enum DemoError {
    Setup(String),
    Engine(engine::Error),
}

fn setup<E: std::fmt::Display>(what: &'static str) -> impl FnOnce(E) -> DemoError {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

async fn demo(args: DemoArgs, cancel: CancellationToken) -> Result<u8, DemoError> {
    println!("== starting a throwaway PostgreSQL");
    let pg = TempPostgres::start(TempPostgresOptions::default())
        .await
        .map_err(setup("starting PostgreSQL"))?;
    println!("   PostgreSQL {} on 127.0.0.1:{}", pg.version(), pg.port());
    let admin = connect(&pg.admin_url("postgres")).await?;
    admin
        .batch_execute("CREATE DATABASE usage_demo")
        .await
        .map_err(setup("creating the demo database"))?;
    drop(admin);
    let url = pg.admin_url("usage_demo");
    let client = connect(&url).await?;

    println!("== installing the rollup pipeline and sample history");
    fixture::install(&client)
        .await
        .map_err(setup("installing the fixture"))?;
    let spec = HistorySpec {
        seed: args.seed,
        rows: args.rows,
        months: args.months,
        ..HistorySpec::default()
    };
    let stats = fixture::generate(&client, &spec)
        .await
        .map_err(setup("generating history"))?;
    println!("   {stats}");
    match fixture::guard(&client)
        .await
        .map_err(setup("running the guard"))?
    {
        Err(msg) => println!("   migration guard before the backfill: {msg}"),
        Ok(()) => println!("   migration guard before the backfill: passes"),
    }

    println!("== backfilling (mode IfLagging, lag threshold 1h)");
    let db = Database::parse(&url).map_err(DemoError::Engine)?;
    let mut progress = Progress::new();
    let outcome = engine::run(&db, &Options::default(), &cancel, &mut |e| {
        progress.on_event(e)
    })
    .await;
    progress.finish();
    let outcome = outcome.map_err(DemoError::Engine)?;
    print!("{}", render_text(&outcome));

    println!("== checking");
    let mismatches = fixture::recompute_mismatches(&client)
        .await
        .map_err(setup("recomputing"))?;
    let guard = fixture::guard(&client)
        .await
        .map_err(setup("running the guard"))?;
    println!(
        "   independent recompute vs task_usage_hourly: {}",
        if mismatches == 0 {
            "identical".to_string()
        } else {
            format!("{mismatches} differing keys")
        }
    );
    println!(
        "   migration guard after the backfill: {}",
        match &guard {
            Ok(()) => "passes",
            Err(_) => "still refuses",
        }
    );
    drop(client);
    pg.stop().map_err(setup("stopping PostgreSQL"))?;
    println!("== done: the throwaway server is stopped and removed");
    Ok(if mismatches == 0 && guard.is_ok() {
        exit::OK
    } else {
        exit::RETRYABLE
    })
}

async fn connect(url: &str) -> Result<tokio_postgres::Client, DemoError> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(setup("connecting to the demo server"))?;
    tokio::spawn(conn);
    Ok(client)
}
