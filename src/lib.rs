//! serversync: an outbox relay. See ARCHITECTURE.md for the map.

pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod devsink;
pub mod dispatch;
pub mod files;
pub mod metrics;
pub mod relay;
pub mod retry;
pub mod sink_health;
pub mod store;
pub mod systemd;
pub mod taxonomy;
pub mod telemetry;
