//! The `usage-backfill` command line: parses flags, sets up logging and
//! signals, and hands over to one subcommand module each.

mod backfill;
pub mod controller;
#[cfg(feature = "demo")]
mod demo;
#[cfg(not(feature = "demo"))]
#[path = "demo_absent.rs"]
mod demo;
pub mod wait;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

pub use backfill::BackfillArgs;
pub use demo::DemoArgs;

/// Parses a `--set NAME=VALUE` flag (the backfill's and the controller's).
pub fn parse_setting(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err("expected NAME=VALUE".to_owned()),
    }
}

/// Exit codes a Helm hook Job or a script can rely on.
pub mod exit {
    /// Backfilled, skipped (nothing to do) or planned (dry run).
    pub const OK: u8 = 0;
    /// A failure that may pass on retry: connection, slice, database error.
    pub const RETRYABLE: u8 = 1;
    /// Bad flags (clap's own code too).
    pub const USAGE: u8 = 2;
    /// Bad input or a database state that needs a person: invalid DSN or
    /// TLS settings, missing rollup schema, NULL watermark, months-back
    /// refusal, future-dated events, missing privileges.
    pub const NEEDS_ATTENTION: u8 = 3;
    /// Advisory lock 4246 was not acquired within --lock-timeout.
    pub const LOCK_TIMEOUT: u8 = 4;
    /// Interrupted by SIGINT or SIGTERM (lock released, nothing stamped).
    pub const INTERRUPTED: u8 = 130;
}

/// What each exit code of `backfill` means: the one source of its help
/// text and of the README's table (a test keeps the README in step).
pub const EXIT_CODES: [(u8, &str); 6] = [
    (
        exit::OK,
        "backfilled, skipped (nothing to do) or planned (`--dry-run`)",
    ),
    (
        exit::RETRYABLE,
        "retryable failure: connection lost, slice failed, database error",
    ),
    (exit::USAGE, "usage error: bad flags or values"),
    (
        exit::NEEDS_ATTENTION,
        "needs a person: invalid connection string or TLS settings, rollup schema missing, NULL watermark, `--months-back` refusal, future-dated events, missing privileges, a transaction-pooling connection pooler",
    ),
    (
        exit::LOCK_TIMEOUT,
        "advisory lock 4246 not acquired within `--lock-timeout`",
    ),
    (
        exit::INTERRUPTED,
        "interrupted by SIGINT/SIGTERM (lock released, nothing stamped)",
    ),
];

/// [`EXIT_CODES`] as the help text shows them, wrapped at 78 columns.
fn exit_codes_help() -> String {
    let mut text = String::from("Exit codes:");
    for (code, meaning) in EXIT_CODES {
        let mut line = format!("\n  {code:<5}");
        for word in meaning.replace('`', "").split(' ') {
            if line.len() + 1 + word.len() > 78 {
                text.push_str(&line);
                line = format!("\n{:7}", "");
            } else if !line.ends_with(' ') {
                line.push(' ');
            }
            line.push_str(word);
        }
        text.push_str(&line);
    }
    text
}

/// [`EXIT_CODES`] as the README's Markdown table.
pub fn exit_codes_markdown() -> String {
    let mut table = String::from("| exit code | meaning |\n|---|---|\n");
    for (code, meaning) in EXIT_CODES {
        table.push_str(&format!("| {code} | {meaning} |\n"));
    }
    table
}

#[derive(Debug, Parser)]
#[command(
    name = "usage-backfill",
    version,
    about = "Safely runs the usage-rollup backfill of a PostgreSQL-backed application",
    after_help = exit_codes_help()
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the backfill once against a database, then exit.
    #[command(after_help = exit_codes_help())]
    Backfill(BackfillArgs),
    #[cfg_attr(
        feature = "demo",
        doc = "Start a throwaway PostgreSQL with sample history, backfill it, clean up."
    )]
    #[cfg_attr(
        not(feature = "demo"),
        doc = "Not in this build (built without the `demo` feature, as the production image is); `cargo run -- demo` from the source tree."
    )]
    Demo(DemoArgs),
    /// Print the UsageBackfill CustomResourceDefinition (YAML).
    Crd,
    /// Run the Kubernetes controller of UsageBackfill resources.
    Controller(controller::ControllerArgs),
    /// Wait until a UsageBackfill is Ready for its current generation
    /// (for a Helm hook Job); print progress, fail on Stalled/Failed.
    #[command(after_help = wait::EXIT_CODES_HELP)]
    Wait(wait::WaitArgs),
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(exit::RETRYABLE);
        }
    };
    runtime.block_on(async move {
        let cancel = cancel_on_signals();
        let code = match cli.command {
            Command::Backfill(args) => backfill::run(args, cancel).await,
            Command::Demo(args) => demo::run(args, cancel).await,
            Command::Crd => {
                print!("{}", usage_backfill_api::crd_yaml());
                exit::OK
            }
            Command::Controller(args) => controller::run(args, cancel).await,
            Command::Wait(args) => wait::run(args, cancel).await,
        };
        ExitCode::from(code)
    })
}

/// Logs go to stderr, so stdout carries only the result (text or JSON).
/// `RUST_LOG` overrides the default level (info).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = colour(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Colour for a person at a terminal only: escape codes in a file, a pipe
/// or `kubectl logs` are noise. NO_COLOR set to anything but the empty
/// string turns it off everywhere (no-color.org).
fn colour(stderr_is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    stderr_is_terminal && no_color.is_none_or(|v| v.is_empty())
}

/// A token cancelled by the first SIGINT or SIGTERM.
fn cancel_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let child = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::warn!("signal received: cancelling (the lock is released, nothing is stamped)");
        child.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use super::colour;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(
            colour(true, Some(OsStr::new(""))),
            "an empty NO_COLOR is unset"
        );
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new(""))));
    }
}
