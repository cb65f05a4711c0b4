//! `usage-backfill demo` in a build without the `demo` feature (the
//! production image): the subcommand is still known, so that running it
//! says why it is absent instead of clap's "unrecognized subcommand".

use clap::Args;
use tokio_util::sync::CancellationToken;

use super::exit;

/// Whatever the demo would take: the answer is the same.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub args: Vec<String>,
}

/// What `usage-backfill demo` says in a build without the `demo` feature.
const ABSENT: &str = "this usage-backfill was built without the `demo` feature (as the production image is), so it carries no throwaway PostgreSQL or sample history; run the demo from the source tree: cargo run -- demo";

pub(super) async fn run(_: DemoArgs, _: CancellationToken) -> u8 {
    eprintln!("error: {ABSENT}");
    exit::USAGE
}
