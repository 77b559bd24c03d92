//! serversync: an outbox relay. See ARCHITECTURE.md for the map.

pub mod config;
pub mod retry;
pub mod store;
pub mod taxonomy;
