//! Which commits wait for PostgreSQL's WAL flush (`database.synchronous_commit`).
//! The one place the suite drives the library instead of the binary: a session's
//! settings are visible only from inside it, so the test asks the relay's own pool.

use std::time::Duration;

use secrecy::SecretString;
use serde_json::json;
use serversync::config::Settings;
use serversync::store::{ConnectOptions, Store, Want};
use uuid::Uuid;

use crate::harness::{Backend, TestEnv};

/// A pool of one connection, so every statement below runs in the same session.
async fn relay_pool(url: &str, synchronous_commit: bool) -> Store {
    let options = ConnectOptions {
        max_connections: 1,
        acquire_timeout: Duration::from_secs(10),
        create: false,
        synchronous_commit,
        lock_timeout: None,
    };
    Store::connect(&SecretString::from(url.to_owned()), &options)
        .await
        .unwrap_or_else(|e| panic!("connect: {e:#}"))
}

async fn setting(store: &Store) -> String {
    store
        .session_setting("synchronous_commit")
        .await
        .expect("SHOW")
        .expect("a PostgreSQL store")
}

/// The test server may run with `synchronous_commit = off` (the harness's does, for
/// speed); the sessions here start with it on, as a production server's do, so that
/// what the relay turns off, and what leaks, shows.
fn with_commits_on(url: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}options[synchronous_commit]=on")
}

#[tokio::test]
async fn relay_commits_skip_the_flush_unless_configured_and_operators_keep_the_servers() {
    let env = TestEnv::migrated_on(Backend::Postgres).await;
    let url = with_commits_on(env.db.url());

    for (configured, expected) in [(false, "off"), (true, "on")] {
        let store = relay_pool(&url, configured).await;
        assert_eq!(
            setting(&store).await,
            expected,
            "synchronous_commit = {configured}"
        );
        env.insert("call_log", Uuid::new_v4(), json!({})).await;
        let claim = store
            .claim(
                Want::rows(10),
                Duration::from_secs(60),
                "commits-test",
                None,
                0,
            )
            .await
            .expect("claim");
        assert_eq!(claim.rows.len(), 1, "the new row is claimed");
        // the claim's commit skips the flush for its own transaction only
        assert_eq!(
            setting(&store).await,
            expected,
            "a claim changed the session's setting (synchronous_commit = {configured})"
        );
    }

    // Operator commands (enqueue, dlq …) connect with the server's setting, whatever
    // the relay's is.
    let mut settings = Settings::default();
    assert!(settings.database.synchronous_commit, "the default");
    settings.database.synchronous_commit = false;
    settings.database.url = Some(SecretString::from(url));
    let operator = serversync::app::connect(&settings, false)
        .await
        .expect("connect");
    assert_eq!(setting(&operator).await, "on");
}
