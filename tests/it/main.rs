//! The integration test binary: one process, tests in parallel threads, each with its
//! own database (on a throwaway PostgreSQL, or a fresh SQLite file), its own fake
//! Frontend on port 0 and its own `serversync` processes.
//!
//! Run: `cargo test --test it` (add a name filter to pick tests, e.g. `core::dlq`).
//! - Tests of behaviour both stores share run on each: `<test>::postgres` and
//!   `<test>::sqlite` (see `harness::both_stores!`); filter with `sqlite` or `postgres`.
//!   PostgreSQL-only tests (its URLs, several relays, restarts, LISTEN) and SQLite-only
//!   ones (`core::sqlite`: the one-relay lock) have plain names.
//! - PostgreSQL: `initdb` and `postgres` from PATH (or `PG_BIN_DIR`, or
//!   /usr/lib/postgresql/<v>/bin); as root they run as the `postgres` user. Set
//!   `DATABASE_URL` to use an existing server instead (a superuser URL: each test
//!   creates a database `t_<random>` there and does not drop it).
//! - `IT_SHOW_OUTPUT=1 cargo test --test it NAME -- --nocapture` prints the output of
//!   every `serversync` command a test runs.

mod core;
mod harness;
mod harness_smoke;
mod ops;
mod resilience;
