//! A stand-in of the application's database, for the demo, the tests and
//! the benchmark (never for the controller):
//!
//! - [`pgtemp`] starts throwaway PostgreSQL servers;
//! - [`fixture`] installs the application's rollup pipeline as
//!   `shared/contract.md` describes it, and generates synthetic history.

pub mod fixture;
pub mod pgtemp;
