#![allow(dead_code, unused_imports)] // each test uses a part; later tests use the rest

//! Everything the tests share: a PostgreSQL per test process ([`pg`]), a fake Frontend
//! ([`sink`]), the real binary as a child process ([`relay`]), a per-test bundle of the
//! three ([`env`]) and small fixtures.

pub mod config;
pub mod db;
pub mod env;
pub mod fixtures;
pub mod metrics;
pub mod pg;
pub mod relay;
pub mod sink;

use std::future::Future;
use std::time::{Duration, Instant};

pub use config::ConfigToml;
pub use db::{Backend, NewRow};
pub use env::TestEnv;
pub use metrics::MetricsEndpoint;
pub use relay::{serversync, Output};
pub use sink::{Incoming, Mode, Reply, Sink};

/// Run a test on each store. A test written once as a function of the backend,
///
/// ```ignore
/// both_stores!(requeue_by_id);
/// async fn requeue_by_id(backend: Backend) {
///     let env = TestEnv::migrated_on(backend).await;
///     …
/// }
/// ```
///
/// gets two `#[tokio::test]`s calling it, `requeue_by_id::postgres` and
/// `requeue_by_id::sqlite` (a module may share a function's name). Pick one store with
/// a filter: `cargo test --test it sqlite`.
macro_rules! both_stores {
    ($name:ident) => {
        mod $name {
            #[tokio::test]
            async fn postgres() {
                super::$name($crate::harness::Backend::Postgres).await
            }

            #[tokio::test]
            async fn sqlite() {
                super::$name($crate::harness::Backend::Sqlite).await
            }
        }
    };
}
pub(crate) use both_stores;

/// How often [`wait_until`] re-checks its condition.
pub const POLL: Duration = Duration::from_millis(20);

/// Await `condition` becoming true, re-checking every 20 ms; panic naming `what` when
/// it is still false after `timeout`. Use this instead of sleeping for an event.
pub async fn wait_until<F, Fut>(timeout: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A TCP port on 127.0.0.1 that refuses connections for the rest of the test
/// process: a socket stays bound to it without listening, so no other test's sink can
/// be handed the same port and answer in its place.
pub fn closed_port() -> u16 {
    let socket = socket_bound_to_any_port();
    let port = socket.local_addr().expect("local addr").port();
    // keep the port reserved (and refusing) until the process exits
    std::mem::forget(socket);
    port
}

/// A free TCP port on 127.0.0.1 for something the test binds later (a metrics
/// listener, a switchable proxy).
pub fn free_port() -> u16 {
    socket_bound_to_any_port()
        .local_addr()
        .expect("local addr")
        .port()
}

fn socket_bound_to_any_port() -> tokio::net::TcpSocket {
    let socket = tokio::net::TcpSocket::new_v4().expect("create a TCP socket");
    socket
        .bind(std::net::SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind 127.0.0.1:0");
    socket
}
