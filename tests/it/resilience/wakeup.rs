//! An idle relay picks up a new row within a second: through LISTEN/NOTIFY when a
//! poll is seconds away, and through polling when listening is off.

use std::time::{Duration, Instant};

use super::support::{insert_one, someone_listens};
use crate::harness::relay::Running;
use crate::harness::{wait_until, TestEnv};

const PROMPT: Duration = Duration::from_secs(1);

/// Insert one row and return how long the sink took to receive it (bounded by
/// `within`; `None` if it did not arrive in time).
async fn pick_up(env: &TestEnv, within: Duration) -> Option<Duration> {
    let id = insert_one(env).await;
    let inserted = Instant::now();
    let deadline = inserted + within;
    loop {
        if env.sink.all_entries().iter().any(|e| e.outbox_id == id) {
            return Some(inserted.elapsed());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Wait for the rows inserted so far to be settled, then let the relay go idle: after
/// a settle a worker looks once more for due rows, and only then waits for a
/// notification or its next poll. That last look has no outside sign, hence the nap.
async fn idle(env: &TestEnv) {
    wait_until(Duration::from_secs(10), "every row settled", || async {
        env.count("sync_outbox").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
}

/// Start `run` with `id` pending and wait until it has been delivered.
async fn start_with(env: &TestEnv, id: i64) -> Running {
    let relay = env.spawn_run(&[]);
    wait_until(
        Duration::from_secs(15),
        "the pending row delivered",
        || async { env.sink.all_entries().iter().any(|e| e.outbox_id == id) },
    )
    .await;
    relay
}

#[tokio::test]
async fn an_idle_relay_is_woken_by_notify_and_falls_back_to_polling() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("dispatch.concurrency", 1)
        .set("dispatch.poll_interval", "5s");

    // LISTEN on: a notification, not the 5 s poll, brings each row.
    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(15), "the relay to LISTEN", || {
        someone_listens(env.db.pg())
    })
    .await;
    pick_up(&env, Duration::from_secs(10))
        .await
        .expect("the warm-up row arrives");
    for round in 0..3 {
        idle(&env).await;
        let took = pick_up(&env, PROMPT).await;
        assert!(
            took.is_some(),
            "round {round}: with LISTEN, a row inserted into an idle relay's outbox \
             did not arrive within {PROMPT:?}\n{}",
            relay.stderr()
        );
    }
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();

    // Control: without LISTEN a 5 s poll is too slow, so the rounds above were NOTIFY.
    env.config.set("dispatch.listen", false);
    let pending = insert_one(&env).await;
    let relay = start_with(&env, pending).await;
    idle(&env).await;
    assert!(
        pick_up(&env, PROMPT).await.is_none(),
        "without LISTEN and with a 5s poll the row should wait for the poll"
    );
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();

    // Fallback: without LISTEN, a short poll still brings rows promptly.
    env.config.set("dispatch.poll_interval", "200ms");
    let left = env.outbox().await;
    assert_eq!(left.len(), 1, "the control row waits for the next relay");
    let relay = start_with(&env, left[0].id).await;
    for round in 0..3 {
        idle(&env).await;
        let took = pick_up(&env, PROMPT).await;
        assert!(
            took.is_some(),
            "round {round}: polling every 200ms, the row did not arrive within {PROMPT:?}\n{}",
            relay.stderr()
        );
    }
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();
}

/// A row that failed is sent again when its retry is due, not at the idle relay's
/// next poll: with a 30 s `poll_interval` (LISTEN makes polling rare), a retry due in
/// 300 ms used to wait the whole 30 s, while the log said `retry_in=300ms`.
#[tokio::test]
async fn an_idle_relay_sends_a_retry_when_it_is_due_not_at_its_next_poll() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("dispatch.poll_interval", "30s")
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "300ms")
        .set("retry.max_delay", "300ms");
    env.sink.fail_next(1, 500);
    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(15), "the relay to LISTEN", || {
        someone_listens(env.db.pg())
    })
    .await;
    let id = insert_one(&env).await;
    wait_until(Duration::from_secs(10), "the row sent again", || async {
        env.sink.entries().iter().any(|e| e.outbox_id == id)
    })
    .await;
    let tries: Vec<_> = env.sink.sync_requests();
    assert_eq!(tries.len(), 2, "one failure, one retry: {tries:?}");
    let gap = tries[1].received_at - tries[0].received_at;
    assert!(
        gap >= Duration::from_millis(250) && gap < Duration::from_secs(5),
        "the retry went out {gap:?} after the failure; it was due after 300ms\n{}",
        relay.stderr()
    );
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    assert_eq!(env.count("sync_outbox").await, 0);
}

/// `database.max_connections = 1` leaves nothing to LISTEN on: the relay polls
/// instead, and says so. The listener used to hold the pool's one connection for
/// good: nothing was delivered, and the relay reported the database as unavailable.
#[tokio::test]
async fn a_relay_with_one_database_connection_polls_and_delivers() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("database.max_connections", 1)
        .set("dispatch.poll_interval", "100ms");
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(insert_one(&env).await);
    }
    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(15), "the rows delivered", || async {
        let got = env.sink.entries();
        ids.iter().all(|id| got.iter().any(|e| e.outbox_id == *id))
    })
    .await;
    // and a row inserted later, found by a poll
    let later = insert_one(&env).await;
    wait_until(
        Duration::from_secs(10),
        "the later row delivered",
        || async { env.sink.entries().iter().any(|e| e.outbox_id == later) },
    )
    .await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    assert!(
        out.stderr.contains("leaves no connection to LISTEN on"),
        "{}",
        out.stderr
    );
    assert!(
        !out.stderr.contains("database unavailable"),
        "{}",
        out.stderr
    );
}
