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

/// A claim of up to 10 rows, leased for `lease`.
async fn claim_ten(store: &Store, lease: Duration) -> serversync::store::Claim {
    store
        .claim(Want::rows(10), lease, "commits-test", None, 0)
        .await
        .expect("claim")
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
        let claim = claim_ten(&store, Duration::from_secs(60)).await;
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

/// A claim held up (here by a lock on the outbox; in the field by a stale plan or a
/// stalled server) still gets a whole lease, counted from its end: counted from its
/// start, a claim slower than the lease committed rows already expired, which any
/// other claim could take while the first was sending them.
#[tokio::test]
async fn a_claim_held_up_longer_than_its_lease_still_gets_a_whole_lease() {
    let env = TestEnv::migrated_on(Backend::Postgres).await;
    let store = relay_pool(env.db.url(), true).await;
    // prepared once, so that the wait below is the claim's execution's, as a
    // relay's claims are (a first claim would wait while being prepared, in a
    // transaction of its own)
    let none = claim_ten(&store, Duration::from_secs(2)).await;
    assert!(none.rows.is_empty());
    env.insert("call_log", Uuid::new_v4(), json!({})).await;
    let holder = env.db.hold_lock("sync_outbox").await;
    let claim = tokio::spawn(async move { claim_ten(&store, Duration::from_secs(2)).await });
    tokio::time::sleep(Duration::from_secs(3)).await;
    drop(holder);
    let claim = claim.await.expect("the claim task");
    assert_eq!(claim.rows.len(), 1);
    let left: f64 = sqlx::query_scalar(
        "SELECT extract(epoch FROM lease_until - clock_timestamp())::float8 FROM sync_outbox",
    )
    .fetch_one(env.db.pg())
    .await
    .expect("the lease");
    assert!(
        left > 1.0,
        "the lease ends {left:.1} s from now: it ran from the claim's start"
    );
}
