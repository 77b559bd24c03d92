//! A Frontend that hangs on one entry (never answers, in time, a request that holds
//! it) while it answers everything else, an empty batch included: that entry is
//! isolated and dead-lettered as `timeout`, like an entry it answers 500 to, and
//! holds up nothing but its own key. A Frontend that hangs on everything is an
//! outage (`resilience/outages.rs`).

use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use super::assert_dead;
use super::errors::{
    a_frontend_failing_on, a_lone_row_the_sink_fails_on_dies, a_row_charged_before_goes_apart,
    Fault,
};
use crate::harness::{both_stores, wait_until, Backend, NewRow, Reply, TestEnv};

/// Requests holding an entry `{"hang": true}`, or an upload whose `recordingId` is
/// `hang`, are answered after 5 s, far past `ingest.timeout` and
/// `ingest.upload_timeout` (300 ms); anything else at once. Retries and probes come
/// every 50–200 ms.
fn a_frontend_hanging_on_hang_rows(env: &mut TestEnv, max_attempts: u32) {
    let hang = Reply::ok().delay(Duration::from_secs(5));
    a_frontend_failing_on(env, "hang", hang, max_attempts);
    env.config
        .set("ingest.timeout", "300ms")
        .set("ingest.upload_timeout", "300ms")
        .set("dispatch.probe_interval", "100ms")
        .set("dispatch.max_probe_interval", "200ms");
}

/// While a worker's batch is searched for an entry that hangs the Frontend (a
/// timeout per level: 2 × 3 s here), the batch the worker claimed ahead meanwhile
/// goes back once a timeout has passed, and another worker delivers it; it used to
/// wait for the whole search.
#[tokio::test]
async fn rows_claimed_ahead_by_a_worker_searching_for_a_hang_go_to_another_worker() {
    let mut env = TestEnv::migrated().await;
    let hang = Reply::ok().delay(Duration::from_secs(30));
    a_frontend_failing_on(&mut env, "hang", hang, 10);
    env.config
        .set("ingest.timeout", "3s")
        .set("dispatch.batch_size", 10)
        .set("dispatch.batches_per_settle", 2)
        .set("dispatch.concurrency", 4)
        .set("dispatch.claim_concurrency", 1);
    let others = 200;
    env.insert("call_log", Uuid::new_v4(), json!({"hang": true}))
        .await;
    for n in 0..others {
        env.insert("call_log", Uuid::new_v4(), json!({"n": n}))
            .await;
    }
    let relay = env.spawn_run(&[]);
    env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
    let started = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "every row but the hanging one delivered",
        || async { distinct(&delivered(&env)) >= others },
    )
    .await;
    let took = started.elapsed();
    eprintln!("every row but the hanging one delivered {took:?} after the first request");
    relay.stop_cleanly().await;
    assert!(
        took < Duration::from_millis(5_500),
        "the rows claimed ahead waited {took:?}: the search itself takes 6 s"
    );
    let ids = delivered(&env);
    assert_eq!(ids.len(), others, "each delivered once: {ids:?}");
    assert_eq!(distinct(&ids), others);
}

/// How many distinct ids sorted `ids` holds.
fn distinct(ids: &[i64]) -> usize {
    let mut ids = ids.to_vec();
    ids.dedup();
    ids.len()
}

fn delivered(env: &TestEnv) -> Vec<i64> {
    let mut ids: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    ids.sort();
    ids
}

both_stores!(a_lone_row_the_sink_hangs_on_dies_and_the_sink_is_never_taken_as_down);
/// The only rows to send are a call's log, which the Frontend hangs on, and its
/// recording (then an upload it hangs on). A daemon used to take the sink as down
/// after `outage_threshold` timeouts, probe with the same row, uncharged, for ever,
/// and hold everything behind it. Now the empty batch says the sink works: the row
/// is charged until it is dead-lettered, and the recording follows.
async fn a_lone_row_the_sink_hangs_on_dies_and_the_sink_is_never_taken_as_down(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    a_frontend_hanging_on_hang_rows(&mut env, 4);
    let fault = Fault {
        marker: "hang",
        error_type: "timeout",
        http_status: None,
    };
    a_lone_row_the_sink_fails_on_dies(env, fault, 4).await;
}

both_stores!(an_entry_the_sink_hangs_on_charges_no_other_entry_of_its_batch);
/// One entry of a batch of eight hangs the Frontend. The batch is split until that
/// entry is alone (an empty batch having said the sink works), as for a 500: the
/// seven others are delivered on their first attempt, and only the hanging one is
/// charged, until it is dead-lettered. Before, timed-out batches were retried whole,
/// and every entry in them was charged until all eight were dead.
async fn an_entry_the_sink_hangs_on_charges_no_other_entry_of_its_batch(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    a_frontend_hanging_on_hang_rows(&mut env, 3);
    env.config.set("dispatch.batch_size", 8);
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(
            env.insert("call_log", Uuid::new_v4(), json!({"n": n, "hang": n == 5}))
                .await,
        );
    }
    let hanging = ids.remove(5);
    let relay = env.spawn_run(&[]);
    wait_until(
        Duration::from_secs(60),
        "the hanging row dead-lettered",
        || async { env.count("sync_outbox_dead_letters").await == 1 },
    )
    .await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();

    assert_eq!(delivered(&env), ids, "every other entry, each once");
    for record in env.sent().await {
        assert_eq!(record.attempts, 1, "charged for another entry: {record:#?}");
    }
    assert_dead(&env.dead_letters().await, hanging, "timeout", 3);
    assert_eq!(env.count("sync_outbox").await, 0);
    assert!(
        !out.stderr.contains("ingest sink is DOWN"),
        "one hanging entry is not an outage:\n{}",
        out.stderr
    );
}

both_stores!(a_row_charged_before_for_a_hang_is_retried_apart_from_rows_that_never_failed);
/// A row the Frontend hangs on, charged once already, is retried in a request of its
/// own: one `ingest.timeout` wasted, not four, and the seven rows claimed with it do
/// not wait for them (`a_row_charged_before_goes_apart`).
async fn a_row_charged_before_for_a_hang_is_retried_apart_from_rows_that_never_failed(
    backend: Backend,
) {
    let mut env = TestEnv::migrated_on(backend).await;
    a_frontend_hanging_on_hang_rows(&mut env, 2);
    let fault = Fault {
        marker: "hang",
        error_type: "timeout",
        http_status: None,
    };
    a_row_charged_before_goes_apart(env, fault).await;
}

/// The requests the sink saw that held a `{"hang": true}` entry.
fn requests_holding_the_hang(env: &TestEnv) -> usize {
    env.sink
        .sync_requests()
        .iter()
        .filter(|req| req.entries().iter().any(|e| e.payload["hang"] == true))
        .count()
}

both_stores!(an_entry_the_sink_hangs_on_is_found_in_three_timeouts_in_a_batch_of_64);
/// A batch that times out while the sink answers an empty batch is cut into about
/// √rows parts sent at once, not halved: the entry that hangs the Frontend is alone
/// after three requests that held it (64 rows, 8, 1), each waiting `ingest.timeout`,
/// where halving took seven (64, 32, 16, 8, 4, 2, 1). The 63 others go through once.
async fn an_entry_the_sink_hangs_on_is_found_in_three_timeouts_in_a_batch_of_64(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    a_frontend_hanging_on_hang_rows(&mut env, 1);
    env.config.set("dispatch.batch_size", 64);
    let rows: Vec<NewRow> = (0..64)
        .map(|n| NewRow::new("call_log", Uuid::new_v4(), json!({"n": n, "hang": n == 41})))
        .collect();
    let mut ids = env.insert_rows(&rows).await;
    let hanging = ids.remove(41);

    let out = env.drain().await;
    out.assert_code(3);
    assert_eq!(requests_holding_the_hang(&env), 3, "{out}");
    assert_eq!(delivered(&env), ids, "every other entry, each once");
    for record in env.sent().await {
        assert_eq!(record.attempts, 1, "charged for another entry: {record:#?}");
    }
    assert_dead(&env.dead_letters().await, hanging, "timeout", 1);
}

both_stores!(a_batch_every_part_of_which_hangs_costs_one_row_one_attempt_not_the_batch);
/// A Frontend that answers empty batches but hangs on every entry (its storage
/// stuck, say): the batch times out, its parts (its 16 rows, each alone) time out
/// too, and the search stops there. One row is charged for it (as a lone failing
/// row is), the other 15 are not, and nothing more is sent for them in that round.
async fn a_batch_every_part_of_which_hangs_costs_one_row_one_attempt_not_the_batch(
    backend: Backend,
) {
    let mut env = TestEnv::migrated_on(backend).await;
    a_frontend_hanging_on_hang_rows(&mut env, 5);
    env.config.set("dispatch.batch_size", 16);
    let rows: Vec<NewRow> = (0..16)
        .map(|n| NewRow::new("call_log", Uuid::new_v4(), json!({"n": n, "hang": true})))
        .collect();
    env.insert_rows(&rows).await;

    let out = env.run(&["drain", "--max-rows", "16"]).await;
    out.assert_code(3);
    assert_eq!(
        requests_holding_the_hang(&env),
        1 + 16,
        "the batch, then its rows, each alone, at once\n{out}"
    );
    let attempts: Vec<i32> = env.outbox().await.iter().map(|r| r.attempts).collect();
    assert_eq!(attempts.len(), 16, "nothing delivered, nothing dead");
    assert_eq!(
        attempts.iter().sum::<i32>(),
        1,
        "one row charged: {attempts:?}"
    );
}

both_stores!(rows_answered_while_their_batch_searches_for_a_hang_are_settled_before_it_ends);
/// The search for an entry that hangs the Frontend waits `ingest.timeout` per level
/// (3 s here, two levels for a batch of 16): the rows its parts got through are
/// settled a second after their answers, while the search goes on, not once it
/// ends with the hanging row charged.
async fn rows_answered_while_their_batch_searches_for_a_hang_are_settled_before_it_ends(
    backend: Backend,
) {
    let mut env = TestEnv::migrated_on(backend).await;
    a_frontend_hanging_on_hang_rows(&mut env, 1);
    env.config
        .set("ingest.timeout", "3s")
        .set("dispatch.batch_size", 16);
    let rows: Vec<NewRow> = (0..16)
        .map(|n| NewRow::new("call_log", Uuid::new_v4(), json!({"n": n, "hang": n == 9})))
        .collect();
    let mut ids = env.insert_rows(&rows).await;
    let hanging = ids.remove(9);

    let relay = env.spawn_run(&[]);
    // the 15 other rows, each sent alone at the second level
    wait_until(
        Duration::from_secs(20),
        "the parts' rows settled",
        || async { env.sent_ids().await.len() == 15 },
    )
    .await;
    assert_eq!(
        env.count("sync_outbox_dead_letters").await,
        0,
        "settled only when the search ended"
    );
    assert!(env.outbox().await.iter().any(|r| r.id == hanging));
    wait_until(Duration::from_secs(20), "the hanging row dead", || async {
        env.count("sync_outbox_dead_letters").await == 1
    })
    .await;
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();
    assert_eq!(env.sent_ids().await, ids);
    assert_dead(&env.dead_letters().await, hanging, "timeout", 1);
}
