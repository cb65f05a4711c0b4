//! `usage-backfill backfill`: one run of the engine from flags, with a
//! progress bar on a terminal, log lines otherwise, and the result on stdout.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use tokio_util::sync::CancellationToken;

use super::exit;
use usage_backfill_engine::{
    self as engine, ConnectionParts, Database, Error, Event, Mode, Options, Outcome, Password,
    Performance, TlsMode, Tuning,
};
use usage_backfill_limits::duration;

#[derive(Debug, Clone, Args)]
pub struct BackfillArgs {
    /// Database to backfill: a libpq URL (postgres://…) or key=value DSN.
    /// Or give the connection in parts (--host, --user, …) instead.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Connection in parts: the server's host name or address.
    #[arg(long, help_heading = "Connection in parts (instead of --database-url)")]
    pub host: Option<String>,
    /// Connection in parts: the server's port [default: 5432].
    #[arg(long, help_heading = "Connection in parts (instead of --database-url)",
          value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Connection in parts: the database [default: the user name].
    #[arg(long, help_heading = "Connection in parts (instead of --database-url)")]
    pub dbname: Option<String>,
    /// Connection in parts: the role to log in as.
    #[arg(long, help_heading = "Connection in parts (instead of --database-url)")]
    pub user: Option<String>,
    /// Connection in parts: a file holding the password (one trailing
    /// newline is ignored). Without it, the PGPASSWORD environment variable.
    /// There is no password flag: command lines are visible to every user
    /// of the machine.
    #[arg(long, help_heading = "Connection in parts (instead of --database-url)")]
    pub password_file: Option<PathBuf>,
    /// if-lagging: the migration-time hook (skips when the watermark is
    /// within --lag-threshold); always: the full walk, unconditionally.
    #[arg(long, value_enum, default_value_t = CliMode::IfLagging)]
    pub mode: CliMode,
    /// if-lagging only: the lag (newest event minus watermark) that is fine.
    #[arg(long, value_parser = duration::clap_parse, default_value = "1h")]
    pub lag_threshold: Duration,
    /// Plan only: print the slices and estimates; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// always only: start N months before the current month (0 = all history).
    // Negative numbers are values here, so that `--months-back -1` gets the
    // range message naming the flag, not "unexpected argument '-1'".
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub months_back: u32,
    /// always only: accept that --months-back abandons older buckets.
    #[arg(long)]
    pub force_partial: bool,
    /// Pause between slices, to spare a busy database.
    #[arg(long, value_parser = duration::clap_parse, default_value = "0s")]
    pub sleep_between_slices: Duration,
    /// Give up if advisory lock 4246 is not acquired within this (default: wait).
    #[arg(long, value_parser = duration::clap_parse)]
    pub lock_timeout: Option<Duration>,
    /// statement_timeout of each window call (default: none).
    #[arg(long, value_parser = duration::clap_parse)]
    pub slice_timeout: Option<Duration>,
    /// TLS mode; overrides the DSN's sslmode (default: the DSN's, else prefer).
    #[arg(long, value_enum)]
    pub tls_mode: Option<CliTlsMode>,
    /// PEM CA bundle for verify-ca / verify-full.
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Session setting for the backfill session, NAME=VALUE; repeatable
    /// (e.g. --set enable_nestloop=off).
    #[arg(long = "set", value_name = "NAME=VALUE", value_parser = super::parse_setting)]
    pub settings: Vec<(String, String)>,
    /// Planner settings of the backfill's sessions: default (measured, see
    /// docs/performance.md), off (the server's, as the reference), or
    /// NAME=VALUE[,NAME=VALUE…]. --set wins over them.
    #[arg(long, default_value = "default", value_parser = |s: &str| s.parse::<Tuning>())]
    pub tuning: Tuning,
    /// Sessions running historical slices at once (1 = serial).
    #[arg(long, default_value_t = usage_backfill_limits::DEFAULT_PARALLELISM, allow_negative_numbers = true,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(usage_backfill_limits::MAX_PARALLELISM)))]
    pub parallelism: u32,
    /// Target duration of one window call (transaction): slices predicted
    /// longer, from measured times, are split (default: no target). At
    /// least 1s, as spec.maxSliceDuration.
    #[arg(long, value_parser = |s: &str| usage_backfill_limits::parse_max_slice_duration(s).map_err(|e| e.to_string()))]
    pub max_slice_duration: Option<Duration>,
    /// Result format on stdout.
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CliMode {
    IfLagging,
    Always,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CliTlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl From<CliTlsMode> for TlsMode {
    fn from(m: CliTlsMode) -> Self {
        match m {
            CliTlsMode::Disable => TlsMode::Disable,
            CliTlsMode::Prefer => TlsMode::Prefer,
            CliTlsMode::Require => TlsMode::Require,
            CliTlsMode::VerifyCa => TlsMode::VerifyCa,
            CliTlsMode::VerifyFull => TlsMode::VerifyFull,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

impl BackfillArgs {
    /// Cross-flag rules clap cannot express, with a message naming the flag.
    pub fn options(&self) -> Result<Options, String> {
        let mode = match self.mode {
            CliMode::IfLagging => {
                if self.months_back != 0 || self.force_partial {
                    return Err(
                        "--months-back and --force-partial apply to --mode always only".into(),
                    );
                }
                Mode::IfLagging {
                    lag_threshold: self.lag_threshold,
                }
            }
            CliMode::Always => Mode::Always {
                months_back: self.months_back,
                force_partial: self.force_partial,
            },
        };
        Ok(Options {
            mode,
            dry_run: self.dry_run,
            sleep_between_slices: self.sleep_between_slices,
            lock_timeout: self.lock_timeout,
            slice_timeout: self.slice_timeout,
            session_settings: self.settings.clone(),
            resume: None,
            performance: Performance {
                tuning: self.tuning.clone(),
                parallelism: self.parallelism,
                max_slice_duration: self.max_slice_duration,
            },
        })
    }

    /// Exactly one way to the database: the DSN or the parts, with the
    /// parts' required host and user. A usage error otherwise.
    pub fn check_connection(&self) -> Result<(), String> {
        let parts = self.host.is_some()
            || self.port.is_some()
            || self.dbname.is_some()
            || self.user.is_some()
            || self.password_file.is_some();
        match (&self.database_url, parts) {
            (Some(_), true) => Err(
                "give either --database-url (or DATABASE_URL in the environment) or the connection \
                 in parts (--host, --port, --dbname, --user, --password-file), not both"
                    .into(),
            ),
            (None, false) => Err(
                "no database given: use --database-url (or DATABASE_URL in the environment), \
                 or --host and --user (password from --password-file or PGPASSWORD)"
                    .into(),
            ),
            (None, true) if self.host.is_none() => {
                Err("the connection in parts needs --host".into())
            }
            (None, true) if self.user.is_none() => {
                Err("the connection in parts needs --user".into())
            }
            _ => Ok(()),
        }
    }

    /// The database of the flags (after [`check_connection`](Self::check_connection));
    /// `pgpassword` is the PGPASSWORD environment variable, used by the
    /// connection in parts when there is no --password-file.
    pub fn database(&self, pgpassword: Option<std::ffi::OsString>) -> Result<Database, Error> {
        let mut db = match &self.database_url {
            Some(dsn) => Database::parse(dsn)?,
            None => Database::from_parts(ConnectionParts {
                host: self.host.clone().unwrap_or_default(),
                port: self.port,
                dbname: self.dbname.clone(),
                user: self.user.clone().unwrap_or_default(),
                password: self.password(pgpassword)?,
            })?,
        };
        if let Some(mode) = self.tls_mode {
            db = db.with_tls_mode(mode.into());
        }
        if let Some(path) = &self.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Error::Tls(format!("cannot read --ca-file {}: {e}", path.display()))
            })?;
            db = db.with_ca_pem(pem);
        }
        Ok(db)
    }

    fn password(&self, pgpassword: Option<std::ffi::OsString>) -> Result<Option<Password>, Error> {
        use std::os::unix::ffi::OsStringExt;
        let Some(path) = &self.password_file else {
            return Ok(pgpassword.map(|p| Password::new(p.into_vec())));
        };
        let mut bytes = std::fs::read(path).map_err(|e| {
            Error::InvalidConnectionString(format!(
                "cannot read --password-file {}: {e}",
                path.display()
            ))
        })?;
        // Files end with a newline; passwords do not.
        if bytes.ends_with(b"\n") {
            bytes.pop();
            if bytes.ends_with(b"\r") {
                bytes.pop();
            }
        }
        Ok(Some(Password::new(bytes)))
    }
}

pub(super) async fn run(args: BackfillArgs, cancel: CancellationToken) -> u8 {
    let opts = match args.options() {
        Ok(o) => o,
        Err(msg) => {
            eprintln!("error: {msg}");
            return exit::USAGE;
        }
    };
    if let Err(msg) = args.check_connection() {
        eprintln!("error: {msg}");
        return exit::USAGE;
    }
    let db = match args.database(std::env::var_os("PGPASSWORD")) {
        Ok(db) => db,
        Err(e) => return report_error(&e),
    };
    tracing::info!(target = %db.describe(), tls = db.tls_mode.as_str(), "starting backfill");
    let mut progress = Progress::new();
    let result = engine::run(&db, &opts, &cancel, &mut |e| progress.on_event(e)).await;
    progress.finish();
    match result {
        Ok(outcome) => {
            print_outcome(&outcome, args.output);
            exit::OK
        }
        Err(e) => report_error(&e),
    }
}

/// Prints the error on stderr and picks the exit code.
pub(crate) fn report_error(e: &Error) -> u8 {
    eprintln!("error: {e}");
    exit_code(e)
}

pub(crate) fn exit_code(e: &Error) -> u8 {
    match e {
        Error::Cancelled => exit::INTERRUPTED,
        Error::LockTimeout { .. } => exit::LOCK_TIMEOUT,
        e if e.is_retryable() => exit::RETRYABLE,
        _ => exit::NEEDS_ATTENTION,
    }
}

/// Shows engine events: a bar on a terminal, log lines elsewhere (a Job's
/// log, CI), so both a person and `kubectl logs` see each slice.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    pub(crate) fn new() -> Self {
        Progress { bar: None }
    }

    fn interactive() -> bool {
        std::io::stderr().is_terminal()
    }

    pub(crate) fn on_event(&mut self, event: &Event) {
        match event {
            Event::Connected { server_version, .. } => {
                tracing::info!(server_version = %server_version, "connected")
            }
            Event::WaitingForLock { holder } => match holder {
                Some(h) => tracing::warn!(
                    pid = h.pid,
                    application_name = h.application_name.as_deref().unwrap_or(""),
                    client_addr = h.client_addr.as_deref().unwrap_or(""),
                    "waiting for advisory lock 4246, held by another session"
                ),
                None => tracing::warn!("waiting for advisory lock 4246"),
            },
            Event::LockAcquired { waited_ms } => {
                tracing::info!(waited_ms, "advisory lock 4246 acquired")
            }
            Event::Planned {
                from,
                to,
                slices_total,
            } => {
                tracing::info!(%from, %to, slices_total, "walk planned");
                if Self::interactive() {
                    let bar = ProgressBar::new(*slices_total);
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} slices  {msg}",
                        )
                        .expect("static template"),
                    );
                    self.bar = Some(bar);
                }
            }
            Event::SlicePlanned(p) => tracing::info!(
                from = %p.slice.from,
                to = %p.slice.to,
                estimated_events = p.estimated_events,
                "slice planned (dry run)"
            ),
            Event::SliceStarted { slice } => {
                if let Some(bar) = &self.bar {
                    bar.set_message(format!("{} …", slice.from.strftime("%Y-%m")));
                }
            }
            Event::SliceDone {
                slice,
                rows,
                elapsed_ms,
                slices_processed,
                slices_total,
                rows_touched,
                ..
            } => match &self.bar {
                Some(bar) => {
                    // Slice sizing may re-plan the walk as it measures.
                    bar.set_length(*slices_total);
                    bar.set_position(*slices_processed);
                    bar.set_message(format!("{rows_touched} rows"));
                }
                None => tracing::info!(
                    from = %slice.from,
                    to = %slice.to,
                    rows,
                    elapsed_ms,
                    progress = %format!("{slices_processed}/{slices_total}"),
                    rows_touched,
                    "slice done"
                ),
            },
            Event::Stamped { watermark } => match watermark {
                Some(w) => tracing::info!(watermark = %w, "watermark stamped"),
                None => tracing::warn!("no rollup state row: watermark not stamped"),
            },
        }
    }

    pub(crate) fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn print_outcome(outcome: &Outcome, format: OutputFormat) {
    match format {
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(outcome).expect("an outcome always serializes")
        ),
        OutputFormat::Text => print!("{}", render_text(outcome)),
    }
}

/// The human summary of an outcome.
pub(crate) fn render_text(o: &Outcome) -> String {
    let ts = |t: Option<jiff::Timestamp>| t.map_or("-".to_string(), |t| t.to_string());
    let result = match (o.skipped, o.dry_run) {
        (Some(reason), _) => format!("skipped ({})", reason.as_str()),
        (None, true) => "dry run (nothing written)".to_string(),
        (None, false) => "backfilled".to_string(),
    };
    let mut out = String::new();
    let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18}{v}\n"));
    line("result:", result);
    line(
        "slices:",
        format!("{}/{}", o.slices_processed, o.slices_total),
    );
    line("rows touched:", o.rows_touched.to_string());
    line("range:", format!("{} .. {}", ts(o.from), ts(o.to)));
    if let Some(end) = o.walk_end {
        line(
            "walk ended at:",
            format!("{end} (later writes are left to the tick)"),
        );
    }
    line("max event:", ts(o.max_event));
    line(
        "lag before:",
        o.lag_seconds.map_or("-".into(), |s| {
            if s < 0 {
                format!(
                    "-{}",
                    duration::format(Duration::from_secs(s.unsigned_abs()))
                )
            } else {
                duration::format(Duration::from_secs(s as u64))
            }
        }),
    );
    line(
        "watermark:",
        format!(
            "{} -> {}{}",
            ts(o.watermark_before),
            ts(o.watermark_after),
            if o.watermark_stamped {
                " (stamped)"
            } else {
                " (not stamped)"
            }
        ),
    );
    if !o.settings.is_empty() {
        let s: Vec<String> = o.settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        line("session settings:", s.join(" "));
    }
    if let Some(t) = &o.tuning {
        let mut plan = t.plan_cache_mode.as_deref().map_or(String::new(), |m| {
            format!(", plan_cache_mode={m} (measured)")
        });
        if let Some(w) = &t.work_mem {
            plan += &format!(", work_mem={w} (measured)");
        }
        if let Some(n) = &t.enable_nestloop {
            plan += &format!(", enable_nestloop={n} (measured)");
        }
        line("tuning:", format!("{}{plan}", t.preset));
        if let Some(w) = &t.slice_width {
            let measured: Vec<String> = w
                .levels
                .iter()
                .map(|l| {
                    format!(
                        "{} ({} slice(s), {:.1} ms per 1000 events)",
                        l.events_per_slice,
                        l.slices,
                        l.elapsed_ms as f64 * 1000.0 / l.events.max(1) as f64
                    )
                })
                .collect();
            line(
                "slice width:",
                format!(
                    "~{} events per slice (measured: {}; trying the slower widths cost {})",
                    w.events_per_slice,
                    measured.join(", "),
                    duration::format(Duration::from_millis(w.explore_cost_ms))
                ),
            );
        }
    }
    if o.sessions > 1 {
        line("sessions:", o.sessions.to_string());
    }
    if let Some(st) = &o.slice_stats {
        line(
            "slice times:",
            format!(
                "median {}, max {} over {} slice(s)",
                duration::format(Duration::from_millis(st.median_ms)),
                duration::format(Duration::from_millis(st.max_ms)),
                st.slices
            ),
        );
    }
    if o.slice_retries > 0 {
        line("slice retries:", o.slice_retries.to_string());
    }
    for p in &o.planned {
        line(
            "planned slice:",
            format!(
                "{} .. {}  ~{} events",
                p.slice.from, p.slice.to, p.estimated_events
            ),
        );
    }
    if let Some(f) = &o.future_events {
        line(
            "future events:",
            format!(
                "{} row(s), latest {} ({}s ahead of the database clock)",
                f.rows, f.latest, f.ahead_seconds
            ),
        );
    }
    for w in &o.warnings {
        line("warning:", w.clone());
    }
    line(
        "lock waited:",
        duration::format(Duration::from_millis(o.lock_waited_ms)),
    );
    line(
        "elapsed:",
        duration::format(Duration::from_millis(o.elapsed_ms)),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<BackfillArgs, clap::Error> {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: BackfillArgs,
        }
        let mut full = vec!["x", "--database-url", "postgres://u@h/d"];
        full.extend_from_slice(args);
        Wrap::try_parse_from(full).map(|w| w.args)
    }

    #[test]
    fn flags_map_to_options() {
        let a = parse(&[
            "--mode",
            "always",
            "--months-back",
            "3",
            "--force-partial",
            "--sleep-between-slices",
            "2s",
            "--lock-timeout",
            "1m",
            "--set",
            "enable_nestloop=off",
        ])
        .unwrap();
        let o = a.options().unwrap();
        assert_eq!(
            o.mode,
            Mode::Always {
                months_back: 3,
                force_partial: true
            }
        );
        assert_eq!(o.sleep_between_slices, Duration::from_secs(2));
        assert_eq!(o.lock_timeout, Some(Duration::from_secs(60)));
        assert_eq!(
            o.session_settings,
            vec![("enable_nestloop".to_string(), "off".to_string())]
        );
        let o = parse(&[]).unwrap().options().unwrap();
        assert_eq!(
            o.mode,
            Mode::IfLagging {
                lag_threshold: Duration::from_secs(3600)
            }
        );
    }

    #[test]
    fn performance_flags() {
        assert_eq!(
            parse(&[]).unwrap().options().unwrap().performance,
            Performance::default()
        );
        let p = parse(&[
            "--tuning",
            "off",
            "--parallelism",
            "1",
            "--max-slice-duration",
            "30s",
        ])
        .unwrap()
        .options()
        .unwrap()
        .performance;
        assert_eq!(
            p,
            Performance {
                tuning: Tuning::Off,
                parallelism: 1,
                max_slice_duration: Some(Duration::from_secs(30)),
            }
        );
        let p = parse(&["--tuning", "enable_nestloop=off,work_mem=8MB"])
            .unwrap()
            .options()
            .unwrap()
            .performance;
        assert_eq!(p.tuning.settings().len(), 2);
        assert!(parse(&["--parallelism", "0"]).is_err());
        assert!(parse(&["--tuning", "fast"]).is_err());
    }

    #[test]
    fn bad_flags_are_rejected_with_the_reason() {
        let e = parse(&["--lag-threshold", "1x"]).err().unwrap().to_string();
        assert!(e.contains("unknown unit"), "{e}");
        for spelling in [&["--months-back", "-1"][..], &["--months-back=-1"]] {
            let e = parse(spelling).err().unwrap().to_string();
            assert!(
                e.contains("invalid value '-1' for '--months-back <MONTHS_BACK>'"),
                "{e}"
            );
        }
        let e = parse(&["--parallelism", "-2"]).err().unwrap().to_string();
        assert!(e.contains("'--parallelism <PARALLELISM>'"), "{e}");
        let e = parse(&["--set", "novalue"]).err().unwrap().to_string();
        assert!(e.contains("NAME=VALUE"), "{e}");
        let e = parse(&["--months-back", "2"])
            .unwrap()
            .options()
            .unwrap_err();
        assert!(e.contains("--mode always"), "{e}");
    }

    fn parse_parts(args: &[&str]) -> Result<BackfillArgs, clap::Error> {
        #[derive(Parser)]
        struct Wrap {
            #[command(flatten)]
            args: BackfillArgs,
        }
        let mut full = vec!["x"];
        full.extend_from_slice(args);
        // Whatever DATABASE_URL the test's environment holds.
        Wrap::try_parse_from(full).map(|w| BackfillArgs {
            database_url: None,
            ..w.args
        })
    }

    #[test]
    fn exactly_one_way_to_the_database() {
        let both = parse(&["--host", "h", "--user", "u"]).unwrap();
        let e = both.check_connection().unwrap_err();
        assert!(e.contains("not both"), "{e}");
        let none = parse_parts(&[]).unwrap();
        assert!(
            none.check_connection()
                .unwrap_err()
                .starts_with("no database given")
        );
        let e = parse_parts(&["--user", "u"])
            .unwrap()
            .check_connection()
            .unwrap_err();
        assert_eq!(e, "the connection in parts needs --host");
        let e = parse_parts(&["--host", "h"])
            .unwrap()
            .check_connection()
            .unwrap_err();
        assert_eq!(e, "the connection in parts needs --user");
        assert!(parse_parts(&["--port", "0", "--host", "h", "--user", "u"]).is_err());
        let a = parse_parts(&[
            "--host", "db", "--port", "6432", "--dbname", "usage", "--user", "app",
        ])
        .unwrap();
        a.check_connection().unwrap();
        let db = a.database(Some("from-env".into())).unwrap();
        assert_eq!(db.describe(), "app@db:6432/usage");
        assert!(!format!("{db:?}").contains("from-env"));
    }

    #[test]
    fn the_password_file_loses_its_trailing_newline_and_wins_over_pgpassword() {
        let dir = std::env::temp_dir().join(format!("ubf-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "s3cret\r\n").unwrap();
        let a = parse_parts(&[
            "--host",
            "h",
            "--user",
            "u",
            "--password-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        let pw = a.password(Some("env-pw".into())).unwrap();
        assert_eq!(pw, Some(Password::new("s3cret")));
        let a = parse_parts(&["--host", "h", "--user", "u"]).unwrap();
        assert_eq!(
            a.password(Some("env-pw".into())).unwrap(),
            Some(Password::new("env-pw"))
        );
        assert_eq!(a.password(None).unwrap(), None);
        let missing = dir.join("missing");
        let a = parse_parts(&[
            "--host",
            "h",
            "--user",
            "u",
            "--password-file",
            missing.to_str().unwrap(),
        ])
        .unwrap();
        let e = a.database(None).unwrap_err().to_string();
        assert!(e.contains("cannot read --password-file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exit_codes_follow_the_table() {
        assert_eq!(exit_code(&Error::Cancelled), exit::INTERRUPTED);
        assert_eq!(
            exit_code(&Error::LockTimeout {
                waited: Duration::ZERO
            }),
            exit::LOCK_TIMEOUT
        );
        assert_eq!(exit_code(&Error::WatermarkMissing), exit::NEEDS_ATTENTION);
        assert_eq!(
            exit_code(&Error::Database {
                context: "x",
                message: "y".into()
            }),
            exit::RETRYABLE
        );
    }
}
