//! serversync: an outbox relay. See ARCHITECTURE.md for the map.

/// `println!` that never panics: when stdout is closed (`serversync status | head -1`)
/// what cannot be written is dropped instead of aborting the command mid-way.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

/// `eprintln!` that never panics on a closed stderr (see [`say!`]).
macro_rules! say_err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

pub mod admin;
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
