//! Resilience, black box (SPEC §3): the real binary killed, stopped, run side by side,
//! starved of its database or its sink, and the delivery guarantees checked from what
//! the fake Frontend received and what the tables hold afterwards.
//!
//! Every wait has a deadline; every process and server listens on 127.0.0.1 only.

mod commits;
mod concurrency;
mod crash;
mod leases;
mod outages;
mod retention;
mod shutdown;
mod support;
mod wakeup;
