//! serversync: an outbox relay. See ARCHITECTURE.md for the map.

/// `println!` that never panics: when stdout is closed (`serversync status | head -1`)
/// what cannot be written is dropped instead of aborting the command mid-way. Any
/// other write error (a full disk) fails the command at its end (`main`).
macro_rules! say {
    () => {{
        $crate::telemetry::say(format_args!(""));
    }};
    ($($arg:tt)*) => {{
        $crate::telemetry::say(format_args!($($arg)*));
    }};
}

/// `eprintln!` that never panics on a closed stderr (see [`say!`]).
macro_rules! say_err {
    ($($arg:tt)*) => {{
        $crate::telemetry::say_err(format_args!($($arg)*));
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
