//! A stand-in of the application's database, for the demo, the tests and
//! the benchmark (never for the controller):
//!
//! - [`pgtemp`] starts throwaway PostgreSQL servers;
//! - [`pgbouncer`] starts a throwaway PgBouncer in front of one (tests of
//!   connection poolers);
//! - [`fixture`] installs the application's rollup pipeline as
//!   `docs/contract.md` describes it, and generates synthetic history.

pub mod fixture;
pub mod pgbouncer;
pub mod pgtemp;
