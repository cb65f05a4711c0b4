//! The `usage-backfill` binary's command line: flags, exit codes, logging
//! and one module per subcommand. The work lives in the workspace crates:
//!
//! - `usage_backfill_engine` (`crates/engine`): the backfill over PostgreSQL;
//! - `usage_backfill_api` (`crates/api`): the `UsageBackfill` resource;
//! - `usage_backfill_controller` (`crates/controller`): the controller;
//! - `usage_backfill_standin` (`crates/standin`): throwaway PostgreSQL and the
//!   application's pipeline, for `demo` only (the `demo` feature, on by
//!   default; the production image builds without it).

pub mod cli;
