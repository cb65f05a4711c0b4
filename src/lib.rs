//! usage-backfill: the engine, the controller and the command line of the
//! usage-rollup backfill operator.
//!
//! - [`engine`] speaks PostgreSQL only: it runs the backfill walk.
//! - [`api`] holds the `UsageBackfill` custom resource types.
//! - [`controller`] reconciles `UsageBackfill` resources by driving the engine.
//! - [`cli`] is the `usage-backfill` command line.
//! - [`duration`] parses and prints Go-style durations shared by CLI and CRD.
//! - [`pgtemp`] starts throwaway PostgreSQL servers (demo, tests, benchmarks).
//! - [`fixture`] installs a stand-in of the application's rollup pipeline
//!   and generates synthetic history (demo, tests, benchmarks).
//! - [`testkit`] gives each test its own database.

pub mod api;
pub mod cli;
pub mod controller;
pub mod duration;
pub mod engine;
pub mod fixture;
pub mod pgtemp;
pub mod testkit;
