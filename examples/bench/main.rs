//! Benchmark of the backfill: the reference walk against the operator, on
//! identical synthetic databases of one throwaway PostgreSQL.
//!
//! ```sh
//! cargo run --release --example bench -- --scale standard   # even 200k, few-agents 20k, realistic 200k
//! cargo run --release --example bench -- --scale large      # + even 3M, realistic 3M (long: the reference takes a while)
//! cargo run --example bench -- --scale tiny                 # CI smoke: correctness only
//! ```
//!
//! Every history runs at each schema level of `--schema` (the stand-in's
//! `hourly-pipeline` and `current`, see `fixture::SchemaLevel`; default
//! both). For each history one source database is generated (fixed seed)
//! and copied (`CREATE DATABASE … TEMPLATE`) for every variant:
//!
//! - `reference`: the reference walk, written here with plain tokio-postgres
//!   (not the engine): one session, advisory lock 4246, serial calendar
//!   months from MIN(created_at) to the month after the newest event, the
//!   server's planner settings, stamp, unlock;
//! - `operator`: `engine::run` with its defaults (tuned, parallel, sized);
//! - `p1-off`: the engine with parallelism 1 and tuning off (our own
//!   overhead, against the reference);
//! - `set-based`: one INSERT … SELECT … GROUP BY over all history (the
//!   practical lower bound, `fixture::rollup_full_set_based`).
//!
//! Every variant's hourly table must have the reference's checksum, and the
//! operator's must match an independent recompute (at the current level
//! the cost split too); any difference fails the
//! run (exit code 1). Wall times and ratios are printed, never asserted.
//! The operator's peak RSS is this process's VmHWM, reset before its run.
//! The controller's idle RSS is measured on the `usage-backfill controller`
//! binary against a stub API server ([`idle`]), with 0 and 1000 finished
//! UsageBackfills. With `RUST_LOG=usage_backfill_engine=debug` every walk
//! logs its slices (times, settings, width levels) on stderr.
//!
//! `--schema-db URL` measures on a schema that is not the stand-in's: the
//! variants run on copies of that database (empty tables, for example
//! migrated by the application itself), on its server, instead of the
//! stand-in on a throwaway server. The URL's role must be allowed to
//! `CREATE DATABASE`; the level is read from the schema. This is how the
//! stand-in is checked against the real schema by hand: nothing here loads
//! or knows another schema.

mod idle;
mod matrix;

use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};
use usage_backfill_engine::{
    self as engine, CancellationToken, Database, Mode, Options, Outcome, Performance, Tuning,
};
use usage_backfill_standin::fixture::{self, HistorySpec, HourlyState, SchemaLevel};
use usage_backfill_standin::pgtemp::{TempPostgres, TempPostgresOptions};

const USAGE: &str = "usage: bench [--scale tiny|standard|large] [--schema hourly-pipeline|current|both] [--schema-db URL] [--only NAME] [--variants LIST] [--repeat N] [--sweep]
       bench --matrix [--rows N] [--months N] [--shapes LIST] [--states LIST] [--reference-cap SECS] [--schema …] [--schema-db URL] [--repeat N]
  tiny      even 3k, few-agents 1.5k, mixed 2k (with a dirty queue), realistic 3k: correctness smoke
  standard  even 200k, few-agents 20k, realistic 200k (26 months each)
  large     standard + even 3M, realistic 3M (26 months)
  --schema LEVEL  the stand-in's schema level(s) (default both)
  --schema-db URL run on copies of this database (schema installed, tables empty) on its
                  own server instead of the stand-in; its role must be able to CREATE DATABASE
  --only NAME     run only the histories whose name contains NAME
  --variants LIST comma-separated subset of reference,p1-off,operator,set-based
  --repeat N      run every variant N times (alternating), report medians
  --sweep         also time operator variants (parallelism 1/3, tuning presets)
  --matrix        reference, operator and set-based bound on every named shape × hourly-table
                  state, with worst and median ratios (no idle-RSS measurement); with
                  --variants p1-off also p1-off against the reference (same cap); with
                  --variants operator,set-based no reference
  --rows N        matrix size (default 200000); --months N (default 26)
  --shapes LIST   matrix shapes (default all: even,few-agents,realistic,many-small-tasks,
                  one-workspace,fat-tasks,wide,crowded,skewed)
  --states LIST   hourly table at the start: empty, tick (half the span rolled up by the tick),
                  tick-N%, full (default empty,tick,full)
  --reference-cap SECS  stop a reference after SECS (reported as > SECS, ratios as bounds)";

struct Args {
    scale: String,
    levels: Vec<SchemaLevel>,
    schema_db: Option<String>,
    only: Option<String>,
    sweep: bool,
    variants: Option<Vec<String>>,
    repeat: usize,
    matrix: Option<matrix::MatrixArgs>,
}

fn args() -> Result<Args, String> {
    let mut out = Args {
        scale: "standard".into(),
        levels: SchemaLevel::ALL.to_vec(),
        schema_db: None,
        only: None,
        sweep: false,
        variants: None,
        repeat: 1,
        matrix: None,
    };
    let mut matrix = matrix::MatrixArgs::default();
    let mut is_matrix = false;
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut number = |what: &str| {
            it.next()
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n >= 1)
                .ok_or(format!("{what} needs a number >= 1"))
        };
        match a.as_str() {
            "--matrix" => is_matrix = true,
            "--rows" => matrix.rows = number("--rows")?,
            "--months" => matrix.months = number("--months")? as u32,
            "--reference-cap" => {
                matrix.reference_cap = Some(Duration::from_secs(number("--reference-cap")?))
            }
            "--shapes" => {
                let list = it.next().ok_or("--shapes needs a value")?;
                matrix.shapes = list.split(',').map(|v| v.trim().to_string()).collect();
                if let Some(bad) = matrix
                    .shapes
                    .iter()
                    .find(|s| HistorySpec::named(s, 1, 1).is_none())
                {
                    return Err(format!("unknown shape {bad:?}"));
                }
            }
            "--states" => {
                let list = it.next().ok_or("--states needs a value")?;
                matrix.states = list
                    .split(',')
                    .map(|v| v.parse::<HourlyState>())
                    .collect::<Result<_, _>>()?;
            }
            "--scale" => out.scale = it.next().ok_or("--scale needs a value")?,
            "--only" => out.only = Some(it.next().ok_or("--only needs a value")?),
            "--schema" => {
                let level = it.next().ok_or("--schema needs a value")?;
                out.levels = match level.as_str() {
                    "both" => SchemaLevel::ALL.to_vec(),
                    one => vec![one.parse::<SchemaLevel>()?],
                };
            }
            "--schema-db" => out.schema_db = Some(it.next().ok_or("--schema-db needs a URL")?),
            "--sweep" => out.sweep = true,
            "--variants" => {
                let list = it.next().ok_or("--variants needs a value")?;
                out.variants = Some(list.split(',').map(|v| v.trim().to_string()).collect());
            }
            "--repeat" => {
                out.repeat = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|n| *n >= 1)
                    .ok_or("--repeat needs a number >= 1")?
            }
            // `cargo bench` passes this to harness = false targets.
            "--bench" => {}
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if !["tiny", "standard", "large"].contains(&out.scale.as_str()) {
        return Err(format!("unknown scale {:?}", out.scale));
    }
    if is_matrix {
        matrix.p1_off = out
            .variants
            .as_ref()
            .is_some_and(|v| v.iter().any(|v| v == "p1-off"));
        matrix.reference = out
            .variants
            .as_ref()
            .is_none_or(|v| v.iter().any(|v| v == "reference"));
        out.matrix = Some(matrix);
    }
    Ok(out)
}

fn histories(scale: &str) -> Vec<(&'static str, HistorySpec)> {
    match scale {
        "tiny" => vec![
            ("even-3k-3m", HistorySpec::even(3_000, 3)),
            ("few-agents-1.5k-3m", HistorySpec::few_agents(1_500, 3)),
            // Every special case: legacy rows, later updates, a dirty queue.
            ("mixed-2k-6m", HistorySpec::default()),
            ("realistic-3k-24m", HistorySpec::realistic(3_000, 24)),
        ],
        "standard" => vec![
            ("even-200k-26m", HistorySpec::even(200_000, 26)),
            ("few-agents-20k-26m", HistorySpec::few_agents(20_000, 26)),
            ("realistic-200k-26m", HistorySpec::realistic(200_000, 26)),
        ],
        _ => vec![
            ("even-200k-26m", HistorySpec::even(200_000, 26)),
            ("few-agents-20k-26m", HistorySpec::few_agents(20_000, 26)),
            ("realistic-200k-26m", HistorySpec::realistic(200_000, 26)),
            ("even-3M-26m", HistorySpec::even(3_000_000, 26)),
            ("realistic-3M-26m", HistorySpec::realistic(3_000_000, 26)),
        ],
    }
}

struct Row {
    history: String,
    variant: String,
    wall: Duration,
    checksum: String,
    note: String,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    // RUST_LOG=usage_backfill_engine=debug prints every walk's slices with
    // their times on stderr: what a walk's time went to.
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args = match args() {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("error: {e}");
            }
            eprintln!("{USAGE}");
            return std::process::ExitCode::from(2);
        }
    };
    match bench(&args).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            let mut message = e.to_string();
            let mut source = e.source();
            while let Some(cause) = source {
                message += &format!(": {cause}");
                source = cause.source();
            }
            eprintln!("error: {message}");
            std::process::ExitCode::FAILURE
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the databases of a run live, and which one each level copies.
enum Server {
    /// A throwaway server with the stand-in installed at every level.
    Temp(TempPostgres),
    /// The server of `--schema-db`: its database is the one template.
    External { url: String, template: String },
}

impl Server {
    fn admin_url(&self, dbname: &str) -> String {
        match self {
            Server::Temp(pg) => pg.admin_url(dbname),
            Server::External { url, .. } => with_database(url, dbname),
        }
    }

    fn template(&self, level: SchemaLevel) -> String {
        match self {
            Server::Temp(_) => template_name(level),
            Server::External { template, .. } => template.clone(),
        }
    }
}

async fn bench(args: &Args) -> Result<bool, BoxError> {
    let mut levels = args.levels.clone();
    let pg = match &args.schema_db {
        None => Server::Temp(TempPostgres::start(TempPostgresOptions::default()).await?),
        Some(url) => {
            let template =
                database_of(url).ok_or("--schema-db needs a URL that names a database")?;
            levels = vec![fixture::schema_level(&connect(url).await?).await?];
            Server::External {
                url: url.clone(),
                template,
            }
        }
    };
    let admin = connect(&pg.admin_url("postgres")).await?;
    let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    eprintln!(
        "PostgreSQL {version} ({}); {} CPU(s); scale {}",
        match &pg {
            Server::Temp(_) => "throwaway, the stand-in".to_string(),
            Server::External { template, .. } => format!("copies of {template}"),
        },
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        args.scale
    );
    if let Server::Temp(_) = pg {
        for level in &levels {
            let template = template_name(*level);
            admin
                .batch_execute(&format!("CREATE DATABASE {template}"))
                .await?;
            let c = connect(&pg.admin_url(&template)).await?;
            fixture::install_at(&c, *level).await?;
        }
    }
    if let Some(m) = &args.matrix {
        return matrix::run(m, &levels, &pg, &admin, args.repeat).await;
    }
    let mut rows: Vec<Row> = Vec::new();
    let mut ok = true;
    let mut rss: Vec<(String, u64)> = Vec::new();
    let runs = levels.iter().flat_map(|level| {
        histories(&args.scale)
            .into_iter()
            .map(move |(name, spec)| (*level, name, spec))
    });
    for (level, shape_name, spec) in runs {
        if args
            .only
            .as_deref()
            .is_some_and(|o| !shape_name.contains(o))
        {
            continue;
        }
        let name = format!("{shape_name} {level}");
        let name = name.as_str();
        let source = db_name(name, "source");
        // A run stopped half-way leaves its copies behind (on `--schema-db`'s
        // server, which outlives the run): start from fresh ones.
        generate_source(&admin, &pg, level, &source, &spec, name).await?;

        // The reference and our serial untuned walk side by side: (d)
        // compares them under the same machine conditions.
        let mut variants: Vec<(&str, Variant)> = vec![
            ("reference", Variant::Reference),
            ("p1-off", Variant::Engine(Performance::reference())),
            ("operator", Variant::Engine(Performance::default())),
            ("set-based", Variant::SetBased),
        ];
        if args.sweep {
            for p in [1, 3] {
                variants.push((
                    if p == 1 { "tuned-p1" } else { "tuned-p3" },
                    Variant::Engine(Performance {
                        parallelism: p,
                        ..Performance::default()
                    }),
                ));
            }
            variants.push((
                "nestloop-off-p1",
                Variant::Engine(Performance {
                    tuning: Tuning::Custom(vec![("enable_nestloop".into(), "off".into())]),
                    parallelism: 1,
                    max_slice_duration: None,
                }),
            ));
            variants.push((
                "nestloop-off-p2",
                Variant::Engine(Performance {
                    tuning: Tuning::Custom(vec![("enable_nestloop".into(), "off".into())]),
                    ..Performance::default()
                }),
            ));
            // What measuring plan_cache_mode costs where generic wins.
            variants.push((
                "static-generic-p2",
                Variant::Engine(Performance {
                    tuning: Tuning::Custom(
                        engine::DEFAULT_TUNING_SETTINGS
                            .iter()
                            .chain(&[("plan_cache_mode", "force_generic_plan")])
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                    ),
                    ..Performance::default()
                }),
            ));
        }
        if let Some(keep) = &args.variants {
            variants.retain(|(v, _)| keep.iter().any(|k| k == v));
        }
        let order: Vec<usize> = (0..args.repeat).flat_map(|_| 0..variants.len()).collect();

        for i in order {
            let (variant, how) = &variants[i];
            let variant = *variant;
            let db = db_name(name, variant);
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await?;
            admin
                .batch_execute(&format!("CREATE DATABASE {db} TEMPLATE {source}"))
                .await?;
            let url = pg.admin_url(&db);
            prewarm(&url).await;
            let is_operator = variant == "operator";
            if is_operator {
                reset_peak_rss();
            }
            let rss_before = vm_kib("VmRSS");
            let started = Instant::now();
            let note = match how {
                Variant::Reference => {
                    let slices = reference_walk(&url).await?;
                    format!("{slices} monthly slices")
                }
                Variant::SetBased => {
                    let c = connect(&url).await?;
                    let buckets = fixture::rollup_full_set_based(&c).await?;
                    format!("{buckets} buckets")
                }
                Variant::Engine(perf) => describe(&operator(&url, perf).await?),
            };
            let wall = started.elapsed();
            if is_operator {
                let peak = vm_kib("VmHWM");
                eprintln!(
                    "  operator peak RSS {} KiB (RSS before {} KiB)",
                    peak.unwrap_or(0),
                    rss_before.unwrap_or(0)
                );
                if let Some(peak) = peak {
                    match rss.iter_mut().find(|(h, _)| h == name) {
                        Some((_, max)) => *max = (*max).max(peak),
                        None => rss.push((name.to_string(), peak)),
                    }
                }
            }
            let c = connect(&url).await?;
            let checksum = fixture::hourly_checksum(&c).await?;
            let mut note = note;
            if matches!(how, Variant::Engine(_)) {
                let mismatches = fixture::recompute_mismatches(&c).await?;
                if mismatches != 0 {
                    ok = false;
                    note += &format!("; {mismatches} MISMATCHES against a recompute");
                }
            }
            eprintln!("  {variant:<16} {:>9.3}s  {note}", wall.as_secs_f64());
            rows.push(Row {
                history: name.to_string(),
                variant: variant.to_string(),
                wall,
                checksum,
                note,
            });
            drop(c);
            admin
                .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
                .await?;
        }
        admin
            .batch_execute(&format!("DROP DATABASE {source} WITH (FORCE)"))
            .await?;
    }

    println!("\n| history | variant | runs | wall time (median) | ratio | hourly table |");
    println!("|---|---|---:|---:|---:|---|");
    let mut histories: Vec<&str> = rows.iter().map(|r| r.history.as_str()).collect();
    histories.dedup();
    for h in histories {
        let of_h: Vec<&Row> = rows.iter().filter(|r| r.history == h).collect();
        let mut names: Vec<&str> = of_h.iter().map(|r| r.variant.as_str()).collect();
        let mut seen = std::collections::HashSet::new();
        names.retain(|n| seen.insert(*n));
        let median = |variant: &str| {
            let mut walls: Vec<f64> = of_h
                .iter()
                .filter(|r| r.variant == variant)
                .map(|r| r.wall.as_secs_f64())
                .collect();
            walls.sort_by(f64::total_cmp);
            (walls.len(), walls[walls.len() / 2])
        };
        let base = ["reference", "p1-off", "operator"]
            .into_iter()
            .find(|b| names.contains(b))
            .unwrap_or(names[0]);
        let base_checksum = &of_h.iter().find(|r| r.variant == base).unwrap().checksum;
        let (_, base_wall) = median(base);
        for name in names {
            let different: Vec<&&Row> = of_h
                .iter()
                .filter(|r| r.variant == name && r.checksum != *base_checksum)
                .collect();
            ok &= different.is_empty();
            let (runs, wall) = median(name);
            println!(
                "| {h} | {name} | {runs} | {wall:.2} s | {:.3}x {base} | {} |",
                wall / base_wall,
                match different.first() {
                    None => "identical".to_string(),
                    Some(r) => format!("DIFFERENT ({})", r.note),
                }
            );
        }
    }
    if !rss.is_empty() {
        println!("\noperator peak RSS (VmHWM of this process during its run):");
        for (h, kib) in &rss {
            println!("  {h}: {:.1} MiB", *kib as f64 / 1024.0);
        }
    }
    // The controller, idle: its own process against a stub API server.
    let settle = Duration::from_secs(if args.scale == "tiny" { 2 } else { 10 });
    let mut idle_rss = Vec::new();
    for objects in [0, 1000] {
        let idle = idle::controller_idle(objects, settle).await?;
        if idle.writes > 0 {
            println!(
                "FAILED: the idle controller made {} write(s) with {objects} finished objects",
                idle.writes
            );
            ok = false;
        }
        idle_rss.push(idle);
    }
    println!(
        "\ncontroller idle RSS (usage-backfill controller, caches synced, {} s settled):",
        settle.as_secs()
    );
    let base = idle_rss[0].rss_kib as f64;
    for i in &idle_rss {
        println!(
            "  {:>4} finished UsageBackfills: RSS {:.1} MiB (peak {:.1} MiB), {:.2}x the empty cluster's",
            i.objects,
            i.rss_kib as f64 / 1024.0,
            i.peak_kib as f64 / 1024.0,
            i.rss_kib as f64 / base
        );
    }
    println!(
        "{}",
        if ok {
            "all hourly tables identical, operator tables match an independent recompute"
        } else {
            "FAILED: hourly tables differ"
        }
    );
    Ok(ok)
}

enum Variant {
    Reference,
    Engine(Performance),
    SetBased,
}

async fn operator(url: &str, perf: &Performance) -> Result<Outcome, BoxError> {
    engine_run(url, perf, Mode::default()).await
}

async fn engine_run(url: &str, perf: &Performance, mode: Mode) -> Result<Outcome, BoxError> {
    let db = Database::parse(url)?;
    let opts = Options {
        mode,
        performance: perf.clone(),
        ..Options::default()
    };
    Ok(engine::run(&db, &opts, &CancellationToken::new(), &mut |_| {}).await?)
}

fn describe(o: &Outcome) -> String {
    let mut s = format!("{} slices on {} session(s)", o.slices_processed, o.sessions);
    if let Some(st) = &o.slice_stats {
        s += &format!(", slice median {} ms / max {} ms", st.median_ms, st.max_ms);
    }
    // A plan or setting entry's time, ms per 1000 events.
    let rate = |p: &engine::PlanProbe| p.elapsed_ms as f64 * 1000.0 / p.events.max(1) as f64;
    if let Some(t) = &o.tuning
        && let Some(m) = t.plan_cache_mode.as_deref()
    {
        // Every plan entry in order, ms per 1000 events: the two probes,
        // then a slice or pool that sent the sessions to the generic plan.
        let plans: Vec<String> = t
            .probes
            .iter()
            .filter(|p| p.at_defaults())
            .map(|p| {
                let mode = p.plan_cache_mode.trim_start_matches("force_");
                let mode = mode.trim_end_matches("_plan");
                let given_up = if p.completed { "" } else { " given up" };
                format!("{mode} {:.0}{given_up}", rate(p))
            })
            .collect();
        s += &format!(", {m} ({})", plans.join(" / "));
    }
    if let Some(t) = &o.tuning {
        // Each setting probed: the value kept, then every entry made for
        // it at the alternative (the probe, then a slice that sent the
        // sessions back), ms per 1000 events. An entry belongs to the last
        // setting in probing order that it tried: the nested-loop probe
        // under a kept 4MB is not a work_mem entry.
        let order = ["work_mem", "enable_nestloop"];
        for (i, (name, kept)) in order
            .iter()
            .zip([&t.work_mem, &t.enable_nestloop])
            .enumerate()
        {
            let Some(kept) = kept else { continue };
            let tried: Vec<String> = t
                .probes
                .iter()
                .filter(|p| order[i + 1..].iter().all(|later| p.tried(later).is_none()))
                .filter_map(|p| {
                    let value = p.tried(name)?;
                    let given_up = if p.completed { "" } else { " given up" };
                    Some(format!("{value}: {:.0}{given_up}", rate(p)))
                })
                .collect();
            s += &format!(", {name} {kept}");
            if !tried.is_empty() {
                s += &format!(" ({})", tried.join(" / "));
            }
        }
    }
    if let Some(w) = o.tuning.as_ref().and_then(|t| t.slice_width.as_ref()) {
        // Each width tried: events per slice, and ms per 1000 events.
        let tried: Vec<String> = w
            .levels
            .iter()
            .map(|l| {
                format!(
                    "{}k:{:.0}",
                    l.events_per_slice / 1000,
                    l.elapsed_ms as f64 * 1000.0 / l.events.max(1) as f64
                )
            })
            .collect();
        s += &format!(
            ", width {} events/slice (ms per 1000 events at each width tried: {}; trying cost {} ms)",
            w.events_per_slice,
            tried.join(" "),
            w.explore_cost_ms
        );
    }
    if o.slice_retries > 0 {
        s += &format!(", {} retries", o.slice_retries);
    }
    s
}

/// The reference walk, as the reference hook runs it: one session, lock
/// 4246, calendar months from MIN(created_at) through the month of the
/// newest event, the server's settings, stamp, unlock.
async fn reference_walk(url: &str) -> Result<u64, BoxError> {
    let c = connect(url).await?;
    c.execute("SELECT pg_advisory_lock(4246)", &[]).await?;
    let row = c
        .query_one(
            "SELECT date_trunc('month', min(created_at) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC',
                    date_trunc('month', max(COALESCE(updated_at, created_at)) AT TIME ZONE 'UTC')
                        AT TIME ZONE 'UTC' + interval '1 month'
               FROM task_usage",
            &[],
        )
        .await?;
    let (from, to): (jiff::Timestamp, jiff::Timestamp) = (row.get(0), row.get(1));
    let mut cursor = from;
    let mut slices = 0;
    while cursor < to {
        let next = engine::add_months(cursor, 1);
        c.query_one(
            "SELECT rollup_task_usage_hourly_window($1, $2)",
            &[&cursor, &next],
        )
        .await?;
        slices += 1;
        cursor = next;
    }
    c.execute(
        "UPDATE task_usage_hourly_rollup_state SET watermark_at = now() - interval '5 minutes' WHERE id = 1",
        &[],
    )
    .await?;
    c.execute("SELECT pg_advisory_unlock(4246)", &[]).await?;
    Ok(slices)
}

/// Reads every table and index of the copy into the OS cache, so no
/// variant pays for a cold start the others do not.
async fn prewarm(url: &str) {
    if let Ok(c) = connect(url).await {
        let _ = c
            .batch_execute(
                "SELECT pg_prewarm(c.oid, 'read')
                   FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                  WHERE n.nspname = 'public' AND c.relkind IN ('r', 'i')",
            )
            .await;
    }
}

/// Makes the database `source` afresh from the stand-in's template of
/// `level` and generates `spec`'s history in it (`label` names it in the
/// log): what each variant's copy is made from.
async fn generate_source(
    admin: &Client,
    pg: &Server,
    level: SchemaLevel,
    source: &str,
    spec: &HistorySpec,
    label: &str,
) -> Result<fixture::HistoryStats, BoxError> {
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {source} WITH (FORCE)"))
        .await?;
    admin
        .batch_execute(&format!(
            "CREATE DATABASE {source} TEMPLATE {}",
            pg.template(level)
        ))
        .await?;
    let started = Instant::now();
    let c = connect(&pg.admin_url(source)).await?;
    // Optional: warms every copy's tables before its timed run.
    if let Err(e) = c.batch_execute("CREATE EXTENSION pg_prewarm").await {
        eprintln!("pg_prewarm unavailable ({e}): runs start with cold caches");
    }
    let stats = fixture::generate(&c, spec).await?;
    eprintln!(
        "\n{label}: {stats} (generated in {:.1}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(stats)
}

async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

fn db_name(history: &str, variant: &str) -> String {
    format!("bench_{history}_{variant}")
        .to_ascii_lowercase()
        .replace(['-', '.', ' '], "_")
        .replace('%', "pct")
}

fn template_name(level: SchemaLevel) -> String {
    db_name("template", level.name())
}

/// The database a `postgres://…/DB?…` URL names.
fn database_of(url: &str) -> Option<String> {
    let (_, rest) = url.split_once("://")?;
    let (_, path) = rest.split_once('/')?;
    let db = path.split('?').next()?;
    (!db.is_empty()).then(|| db.to_string())
}

/// `url` with its database replaced by `dbname`.
fn with_database(url: &str, dbname: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("postgres", url));
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let query = path
        .split_once('?')
        .map(|(_, q)| format!("?{q}"))
        .unwrap_or_default();
    format!("{scheme}://{authority}/{dbname}{query}")
}

/// A `Vm…:` line of this process's status, in KiB.
fn vm_kib(field: &str) -> Option<u64> {
    proc_status_kib("self", field)
}

/// A `Vm…:` line of /proc/<pid>/status, in KiB.
fn proc_status_kib(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resets VmHWM to the current RSS (Linux 4.0+), so the next reading is
/// the peak of what runs in between.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
