//! The engine and the `usage-backfill` binary against a real PostgreSQL
//! (one test binary, so that the kube and PostgreSQL stacks are linked
//! once; each module is what a test binary of its own used to be).
//!
//! - [`engine`]: every reference branch, correctness, locking,
//!   cancellation, resume.
//! - [`engine_parallel`]: parallel slices, the last slice, tuning, sizing.
//! - [`engine_inputs`]: bad input, TLS, property tests of the parsers.
//! - [`faults`]: faults at the database level, least privilege.
//! - [`concurrent_writes`]: a backfill beside the writing, ticking
//!   application.
//! - [`poolers`]: PgBouncer in front of the database.
//! - [`cli`]: the binary end to end: exit codes, output, signals.

mod cli;
mod concurrent_writes;
mod engine;
mod engine_inputs;
mod engine_parallel;
mod faults;
mod poolers;
