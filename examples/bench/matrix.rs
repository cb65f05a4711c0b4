//! `--matrix`: the reference, the operator and the set-based bound on every
//! named history shape (`HistorySpec::NAMES`) at one size, in every state of
//! the hourly table at the start (`HourlyState`), with the worst and the
//! median ratio over all of them.
//!
//! Per shape and schema level one history is generated (fixed seed); per
//! hourly state a copy of it is filled (`fixture::fill_hourly`), and every
//! variant runs on its own copy of that, warmed, in the order reference,
//! operator, set-based (`--repeat N`: N rounds of that order, medians).
//! With `--variants …,p1-off` the engine with parallelism 1 and tuning
//! off also runs, after the reference and under the same cap, and a second
//! table compares the two: what our own machinery costs on each shape.
//! `--variants` without `reference` leaves the reference out: the
//! operator against the bound alone, to compare two builds of the engine
//! cell by cell.
//! The operator's peak RSS (this process's VmHWM, reset before each of its
//! runs) is printed over all cells.
//! The engine runs in `Mode::Always` (over a full table the hook would
//! skip). The reference may be capped (`--reference-cap SECS`): a capped
//! reference is reported as `> cap` and its ratio as an upper bound. Every
//! operator table must equal the set-based rebuild's and an independent
//! recompute, every completed reference's the set-based rebuild's, or the
//! run fails.

use std::time::{Duration, Instant};

use usage_backfill_engine::{Mode, Outcome, Performance};
use usage_backfill_standin::fixture::{self, HistorySpec, HourlyState, SchemaLevel};

use super::{
    BoxError, Server, connect, db_name, describe, generate_source, prewarm, reference_walk,
    reset_peak_rss, vm_kib,
};

pub(crate) struct MatrixArgs {
    pub rows: u64,
    pub months: u32,
    pub shapes: Vec<String>,
    pub states: Vec<HourlyState>,
    pub reference_cap: Option<Duration>,
    /// Also run `p1-off` (parallelism 1, tuning off) against the reference.
    pub p1_off: bool,
    /// Run the reference (`--variants` without it: the operator against
    /// the bound alone, for comparing two builds of the engine cell by
    /// cell without the reference's minutes).
    pub reference: bool,
}

impl Default for MatrixArgs {
    fn default() -> Self {
        MatrixArgs {
            rows: 200_000,
            months: 26,
            shapes: HistorySpec::NAMES.iter().map(|s| s.to_string()).collect(),
            states: vec![
                HourlyState::Empty,
                HourlyState::Tick { through: 0.5 },
                HourlyState::Full,
            ],
            reference_cap: None,
            p1_off: false,
            reference: true,
        }
    }
}

/// One cell of the matrix.
struct Cell {
    shape: String,
    level: SchemaLevel,
    stats: String,
    state: String,
    /// Median wall time; `capped` when every run hit the cap.
    reference: Option<(f64, bool)>,
    /// As `reference`, for `p1-off` when it ran.
    p1_off: Option<(f64, bool)>,
    operator: f64,
    bound: f64,
    chosen: String,
    /// The benchmark process's peak RSS during the operator's runs, KiB.
    peak_rss_kib: Option<u64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub(crate) async fn run(
    m: &MatrixArgs,
    levels: &[SchemaLevel],
    pg: &Server,
    admin: &tokio_postgres::Client,
    repeat: usize,
) -> Result<bool, BoxError> {
    let mut ok = true;
    let mut cells: Vec<Cell> = Vec::new();
    for level in levels {
        for shape in &m.shapes {
            let spec = HistorySpec::named(shape, m.rows, m.months)
                .ok_or_else(|| format!("unknown shape {shape:?}"))?;
            let name = format!("m {shape} {level}");
            let base = db_name(&name, "base");
            let label = format!("{shape} {level}");
            let stats = generate_source(admin, pg, *level, &base, &spec, &label).await?;
            let summary = format!(
                "{} rows, {} tasks, {} ws × {} agents",
                stats.rows, stats.tasks, stats.workspaces, spec.agents_per_workspace
            );
            for state in &m.states {
                let source = db_name(&name, &format!("src {}", state.name()));
                admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {source} WITH (FORCE)"))
                    .await?;
                admin
                    .batch_execute(&format!("CREATE DATABASE {source} TEMPLATE {base}"))
                    .await?;
                {
                    let c = connect(&pg.admin_url(&source)).await?;
                    let watermark = fixture::fill_hourly(&c, *state).await?;
                    c.batch_execute("ANALYZE task_usage_hourly").await?;
                    let filled: i64 = c
                        .query_one("SELECT count(*) FROM task_usage_hourly", &[])
                        .await?
                        .get(0);
                    eprintln!(
                        "  hourly table {}: {filled} rows{}",
                        state.name(),
                        watermark.map_or(String::new(), |w| format!(", watermark {w}"))
                    );
                }
                let cell = run_cell(m, pg, admin, &name, &source, repeat, &mut ok).await?;
                admin
                    .batch_execute(&format!("DROP DATABASE {source} WITH (FORCE)"))
                    .await?;
                cells.push(Cell {
                    shape: shape.clone(),
                    level: *level,
                    stats: summary.clone(),
                    state: state.name(),
                    ..cell
                });
            }
            admin
                .batch_execute(&format!("DROP DATABASE {base} WITH (FORCE)"))
                .await?;
        }
    }
    print_table(&cells);
    print_p1_off(&cells);
    let peaks: Vec<u64> = cells.iter().filter_map(|c| c.peak_rss_kib).collect();
    if let (Some(low), Some(high)) = (peaks.iter().min(), peaks.iter().max()) {
        println!(
            "operator peak RSS (this process's VmHWM, reset before each operator run) over {} cells: lowest {:.1} MiB, highest {:.1} MiB",
            peaks.len(),
            *low as f64 / 1024.0,
            *high as f64 / 1024.0
        );
    }
    println!(
        "{}",
        if ok {
            "all operator tables identical to the set-based rebuild's and to an independent recompute; every completed reference identical too"
        } else {
            "FAILED: hourly tables differ"
        }
    );
    Ok(ok)
}

async fn run_cell(
    m: &MatrixArgs,
    pg: &Server,
    admin: &tokio_postgres::Client,
    name: &str,
    source: &str,
    repeat: usize,
    ok: &mut bool,
) -> Result<Cell, BoxError> {
    let mut reference = Vec::new();
    let mut capped = 0;
    let mut p1_off = Vec::new();
    let mut p1_capped = 0;
    let mut operator = Vec::new();
    let mut bound = Vec::new();
    let mut chosen = String::new();
    let mut peak_rss_kib: Option<u64> = None;
    let mut sums: Vec<(&str, String)> = Vec::new();
    for _ in 0..repeat {
        let variants = [
            (m.reference, "reference"),
            (m.p1_off, "p1-off"),
            (true, "operator"),
            (true, "set-based"),
        ];
        for variant in variants.into_iter().filter_map(|(run, v)| run.then_some(v)) {
            let db = db_name(name, variant);
            admin
                .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
                .await?;
            admin
                .batch_execute(&format!("CREATE DATABASE {db} TEMPLATE {source}"))
                .await?;
            let url = pg.admin_url(&db);
            prewarm(&url).await;
            let started = Instant::now();
            let mut complete = true;
            let note = match variant {
                "reference" => match within_cap(m.reference_cap, reference_walk(&url)).await? {
                    Some(slices) => format!("{slices} monthly slices"),
                    None => {
                        complete = false;
                        stopped(m.reference_cap)
                    }
                },
                "p1-off" => {
                    match within_cap(m.reference_cap, always(&url, Performance::reference()))
                        .await?
                    {
                        Some(outcome) => describe(&outcome),
                        None => {
                            complete = false;
                            stopped(m.reference_cap)
                        }
                    }
                }
                "operator" => {
                    reset_peak_rss();
                    let outcome = always(&url, Performance::default()).await?;
                    if let Some(peak) = vm_kib("VmHWM") {
                        peak_rss_kib = Some(peak_rss_kib.unwrap_or(0).max(peak));
                    }
                    chosen = describe(&outcome);
                    chosen.clone()
                }
                _ => {
                    let c = connect(&url).await?;
                    format!("{} buckets", fixture::rollup_full_set_based(&c).await?)
                }
            };
            let wall = started.elapsed().as_secs_f64();
            if complete {
                let c = connect(&url).await?;
                sums.push((variant, fixture::hourly_checksum(&c).await?));
                if variant == "operator" {
                    let mismatches = fixture::recompute_mismatches(&c).await?;
                    if mismatches != 0 {
                        *ok = false;
                        eprintln!("  operator: {mismatches} MISMATCHES against a recompute");
                    }
                }
            }
            eprintln!("  {variant:<10} {wall:>9.3}s  {note}");
            match (variant, complete) {
                ("reference", true) => reference.push(wall),
                ("reference", false) => capped += 1,
                ("p1-off", true) => p1_off.push(wall),
                ("p1-off", false) => p1_capped += 1,
                ("operator", _) => operator.push(wall),
                _ => bound.push(wall),
            }
            // The cap's walk is still running on the server: FORCE ends it.
            admin
                .batch_execute(&format!("DROP DATABASE {db} WITH (FORCE)"))
                .await?;
        }
    }
    let truth = sums
        .iter()
        .find(|(v, _)| *v == "set-based")
        .map(|(_, s)| s.clone())
        .unwrap_or_default();
    for (variant, sum) in &sums {
        if *sum != truth {
            *ok = false;
            eprintln!("  {variant}: hourly table DIFFERENT from the set-based rebuild's");
        }
    }
    let timed = |walls: Vec<f64>, capped: usize| {
        if !walls.is_empty() {
            Some((median(walls), false))
        } else if capped > 0 {
            m.reference_cap.map(|c| (c.as_secs_f64(), true))
        } else {
            None
        }
    };
    let reference = timed(reference, capped);
    let p1_off = timed(p1_off, p1_capped);
    Ok(Cell {
        shape: String::new(),
        level: SchemaLevel::HourlyPipeline,
        stats: String::new(),
        state: String::new(),
        reference,
        p1_off,
        operator: median(operator),
        bound: median(bound),
        chosen,
        peak_rss_kib,
    })
}

/// `walk`'s result, or None when `cap` ran out first (the walk's statement
/// keeps running on the server until its database is dropped).
async fn within_cap<T, E>(
    cap: Option<Duration>,
    walk: impl std::future::Future<Output = Result<T, E>>,
) -> Result<Option<T>, E> {
    match cap {
        None => walk.await.map(Some),
        Some(cap) => match tokio::time::timeout(cap, walk).await {
            Ok(result) => result.map(Some),
            Err(_) => Ok(None),
        },
    }
}

/// The note of a walk stopped at the cap.
fn stopped(cap: Option<Duration>) -> String {
    format!("stopped at the cap of {} s", cap.map_or(0, |c| c.as_secs()))
}

/// The engine with `perf`, as the operator command (`--mode always`).
async fn always(url: &str, perf: Performance) -> Result<Outcome, BoxError> {
    super::engine_run(
        url,
        &perf,
        Mode::Always {
            months_back: 0,
            force_partial: false,
        },
    )
    .await
}

/// `p1-off` against the reference, cell by cell, where both completed.
fn print_p1_off(cells: &[Cell]) {
    if cells.iter().all(|c| c.p1_off.is_none()) {
        return;
    }
    println!("\n| shape | level | hourly table | reference | p1-off | p1-off / reference |");
    println!("|---|---|---|---:|---:|---:|");
    let shown = |t: Option<(f64, bool)>| match t {
        None => "not run".to_string(),
        Some((s, true)) => format!("> {s:.2} s"),
        Some((s, false)) => format!("{s:.2} s"),
    };
    let mut ratios = Vec::new();
    for c in cells {
        let ratio = match (c.reference, c.p1_off) {
            (Some((r, false)), Some((p, false))) => {
                ratios.push(p / r);
                format!("{:.3}x", p / r)
            }
            _ => String::new(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {ratio} |",
            c.shape,
            c.level,
            c.state,
            shown(c.reference),
            shown(c.p1_off)
        );
    }
    if !ratios.is_empty() {
        ratios.sort_by(f64::total_cmp);
        println!(
            "p1-off / reference over {} cells where both completed: lowest {:.3}x, median {:.3}x, highest {:.3}x",
            ratios.len(),
            ratios[0],
            ratios[ratios.len() / 2],
            ratios[ratios.len() - 1]
        );
    }
}

fn print_table(cells: &[Cell]) {
    println!(
        "\n| shape | level | size | hourly table | reference | operator | set-based bound | operator / reference | operator / bound | the run chose |"
    );
    println!("|---|---|---|---|---:|---:|---:|---:|---:|---|");
    let mut vs_ref = Vec::new();
    let mut vs_bound = Vec::new();
    for c in cells {
        let (reference, ratio) = match c.reference {
            None => ("not run".to_string(), "".to_string()),
            Some((r, capped)) => {
                let ratio = c.operator / r;
                vs_ref.push((ratio, capped, c));
                let lt = if capped { "< " } else { "" };
                let gt = if capped { "> " } else { "" };
                (format!("{gt}{r:.2} s"), format!("{lt}{ratio:.3}x"))
            }
        };
        let to_bound = c.operator / c.bound;
        vs_bound.push((to_bound, false, c));
        println!(
            "| {} | {} | {} | {} | {reference} | {:.2} s | {:.2} s | {ratio} | {to_bound:.2}x | {} |",
            c.shape, c.level, c.stats, c.state, c.operator, c.bound, c.chosen
        );
    }
    for (what, mut list) in [
        ("operator / reference", vs_ref),
        ("operator / bound", vs_bound),
    ] {
        if list.is_empty() {
            continue;
        }
        list.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (worst, worst_capped, w) = list[list.len() - 1];
        let (med, med_capped, _) = list[list.len() / 2];
        let any_capped = list.iter().any(|(_, c, _)| *c);
        let le = |capped: bool| if capped { "≤ " } else { "" };
        println!(
            "{what} over {} cells: worst {}{worst:.3}x ({} {} {}), median {}{med:.3}x{}",
            list.len(),
            le(worst_capped),
            w.shape,
            w.level,
            w.state,
            le(med_capped || any_capped),
            if any_capped {
                " (capped references count as their cap: the ratios are upper bounds)"
            } else {
                ""
            }
        );
    }
}
