//! An idle relay picks up a new row within a second: through LISTEN/NOTIFY when a
//! poll is seconds away, and through polling when listening is off.

use std::time::{Duration, Instant};

use serde_json::json;

use super::support::{insert_one, someone_listens};
use crate::harness::relay::Running;
use crate::harness::{wait_until, NewRow, TestEnv};

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

/// Rows that failed are sent again when their retries are due, not at the idle
/// relay's next poll: with a 30 s `poll_interval` (LISTEN makes polling rare), a
/// retry due in 300 ms used to wait the whole 30 s, while the log said
/// `retry_in=300ms`; and of two rows failed together, only the earlier retry was
/// remembered (an audit: the other waited for the poll).
#[tokio::test]
async fn an_idle_relay_sends_its_retries_when_they_are_due_not_at_its_next_poll() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("dispatch.poll_interval", "30s")
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "300ms")
        .set("retry.max_delay", "300ms")
        .set("retry.overrides.recording.base_delay", "1500ms")
        .set("retry.overrides.recording.max_delay", "1500ms");
    // 408: retried with the row's own delay, no search for a bad entry
    env.sink.fail_next(1, 408);
    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(15), "the relay to LISTEN", || {
        someone_listens(env.db.pg())
    })
    .await;
    let call = uuid::Uuid::new_v4();
    let other_call = uuid::Uuid::new_v4();
    let ids = env
        .insert_rows(&[
            NewRow::new("call_log", call, json!({"id": call})),
            NewRow::new(
                "recording",
                uuid::Uuid::new_v4(),
                json!({"callLogId": other_call}),
            ),
        ])
        .await;
    wait_until(Duration::from_secs(10), "both rows sent again", || async {
        let sent = env.sink.entries();
        ids.iter().all(|id| sent.iter().any(|e| e.outbox_id == *id))
    })
    .await;
    let tries = env.sink.sync_requests();
    let failed = tries
        .iter()
        .find(|r| r.status == 408)
        .expect("the failed request")
        .received_at;
    for (id, due) in [(ids[0], 300), (ids[1], 1500)] {
        let sent = tries
            .iter()
            .find(|r| r.status == 200 && r.entries().iter().any(|e| e.outbox_id == id))
            .expect("the retry")
            .received_at;
        let gap = sent - failed;
        let due = Duration::from_millis(due);
        assert!(
            gap >= due - Duration::from_millis(50) && gap < due + Duration::from_secs(3),
            "row {id}'s retry went out {gap:?} after the failure; it was due after {due:?}\n{}",
            relay.stderr()
        );
    }
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
