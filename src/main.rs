//! The `usage-backfill` binary: everything lives in the library.
fn main() -> std::process::ExitCode {
    usage_backfill::cli::main()
}
