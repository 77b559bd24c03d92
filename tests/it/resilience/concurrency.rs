//! Several relays on one database: disjoint batches, and per-key order across all of
//! them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::support::{
    by_id, log_events, log_field, ordering_keys, seed_adjacent_calls, seed_keyed, tables,
};
use crate::harness::relay::Output;
use crate::harness::sink::SyncRequest;
use crate::harness::{wait_until, Mode, Reply, TestEnv};
use serversync::store::{KeyShare, PgStore};

const ROWS: i64 = 20_000;
const KEYS: i64 = 500;
const RELAYS: usize = 3;

#[tokio::test]
async fn three_relays_share_the_outbox_without_duplicates_and_in_key_order() {
    let env = TestEnv::migrated().await;
    seed_keyed(&env, ROWS, KEYS).await;
    let key_of = ordering_keys(&env).await;
    assert_eq!(key_of.len(), ROWS as usize);

    let started = Instant::now();
    let outputs = run_relays_until_settled(&env, ROWS).await;
    let took = started.elapsed();
    let mut per_relay = Vec::new();
    for out in outputs {
        let stopped = log_events(&out.stderr, "stopped");
        assert_eq!(stopped.len(), 1, "one `stopped` summary\n{out}");
        per_relay.push(log_field(&stopped[0], "delivered").unwrap_or_else(|| panic!("{out}")));
    }

    let requests = env.sink.sync_requests();
    let received = by_id(env.sink.all_entries());
    let twice: Vec<(&i64, usize)> = received
        .iter()
        .filter(|(_, copies)| copies.len() > 1)
        .map(|(id, copies)| (id, copies.len()))
        .take(20)
        .collect();
    assert!(
        twice.is_empty(),
        "rows delivered more than once (id, times): {twice:?}"
    );
    assert_eq!(received.len(), ROWS as usize);
    assert_eq!(tables(&env).await, (0, ROWS, 0), "(pending, sent, dead)");
    assert_eq!(per_relay.iter().sum::<u64>(), ROWS as u64, "{per_relay:?}");
    assert!(
        per_relay.iter().all(|n| *n > 0),
        "every relay took part: {per_relay:?}"
    );

    assert_key_order(&requests, &key_of);
    eprintln!("{RELAYS} relays: {ROWS} rows in {took:?}, per relay {per_relay:?}");
}

/// Calls written as applications write them, each call's rows one after the other
/// in the queue (the claim steps over a call's later rows while its first is out):
/// three relays still deliver every row once, each call's rows in order and one at
/// a time.
#[tokio::test]
async fn three_relays_deliver_calls_written_together_in_order() {
    let env = TestEnv::migrated().await;
    let rows = 9_000;
    seed_adjacent_calls(&env, rows, 3).await;
    let key_of = ordering_keys(&env).await;

    run_relays_until_settled(&env, rows).await;
    let received = by_id(env.sink.all_entries());
    assert_eq!(received.len(), rows as usize);
    assert!(
        received.values().all(|copies| copies.len() == 1),
        "a row delivered twice"
    );
    assert_key_order(&env.sink.sync_requests(), &key_of);
}

/// With a sink that takes longer than `PREFETCH_AFTER` to answer, each worker claims
/// its next rows while its requests are out: still every row once, each key's rows
/// in order and one at a time, and a drain that ends with nothing left.
#[tokio::test]
async fn a_slow_sink_drains_in_key_order_while_workers_claim_ahead() {
    let env = TestEnv::migrated().await;
    let (rows, keys) = (12_000, 4_000);
    seed_keyed(&env, rows, keys).await;
    drain_through_a_slow_sink_in_key_order(&env, rows).await;
}

/// The same with each call's rows next to each other in the queue: a claim made
/// ahead starts past the rows still out, and their calls' later rows, left behind
/// it, are still all delivered, in order, by the claims from the oldest row.
#[tokio::test]
async fn a_slow_sink_drains_calls_written_together_while_workers_claim_ahead() {
    let env = TestEnv::migrated().await;
    let rows = 6_000;
    seed_adjacent_calls(&env, rows, 3).await;
    drain_through_a_slow_sink_in_key_order(&env, rows).await;
}

/// `RELAYS` relays running until all `rows` queued rows are delivered and settled;
/// their outputs once stopped, each a clean exit.
async fn run_relays_until_settled(env: &TestEnv, rows: i64) -> Vec<Output> {
    let relays: Vec<_> = (0..RELAYS)
        .map(|_| env.cmd(["--log-format", "json", "run"]).spawn())
        .collect();
    env.sink
        .wait_for_entries(rows as usize, Duration::from_secs(90))
        .await;
    wait_until(
        Duration::from_secs(10),
        "every delivered row settled",
        || async { env.count("sync_outbox_sent").await == rows },
    )
    .await;
    let mut outputs = Vec::with_capacity(RELAYS);
    for relay in relays {
        let out = relay.terminate(Duration::from_secs(10)).await;
        out.assert_success().assert_no_panic();
        outputs.push(out);
    }
    outputs
}

/// One drain of the `rows` queued rows through a sink that answers in 30 ms (longer
/// than `PREFETCH_AFTER`, so workers claim ahead): every row delivered once, nothing
/// left, each key's rows in order and one at a time.
async fn drain_through_a_slow_sink_in_key_order(env: &TestEnv, rows: i64) {
    let key_of = ordering_keys(env).await;
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_millis(30))));

    let out = env
        .cmd(["drain"])
        .timeout(Duration::from_secs(120))
        .output()
        .await;
    out.assert_success().assert_no_panic();

    let received = by_id(env.sink.all_entries());
    assert_eq!(received.len(), rows as usize, "{out}");
    assert!(
        received.values().all(|copies| copies.len() == 1),
        "a row delivered twice\n{out}"
    );
    assert_eq!(tables(env).await, (0, rows, 0), "(pending, sent, dead)");
    assert_key_order(&env.sink.sync_requests(), &key_of);
}

/// For every key, its rows arrived in strictly increasing id order, each request
/// after the previous row's request was answered (one row of a key in flight at a
/// time, across all relays).
#[track_caller]
fn assert_key_order(requests: &[SyncRequest], key_of: &HashMap<i64, String>) {
    let mut last: HashMap<&str, (i64, &SyncRequest)> = HashMap::new();
    for request in requests {
        for entry in request.entries() {
            let key = key_of[&entry.outbox_id].as_str();
            if let Some((prev_id, prev)) = last.get(key) {
                assert!(
                    entry.outbox_id > *prev_id,
                    "key {key}: row {} arrived after row {prev_id}",
                    entry.outbox_id
                );
                let answered = prev.answered_at.unwrap_or_else(|| {
                    panic!("key {key}: row {prev_id}'s request was never answered")
                });
                assert!(
                    request.received_at >= answered,
                    "key {key}: row {} was sent while row {prev_id} was still in flight",
                    entry.outbox_id
                );
            }
            last.insert(key, (entry.outbox_id, request));
        }
    }
    assert_eq!(
        last.len(),
        key_of
            .values()
            .collect::<std::collections::HashSet<_>>()
            .len()
    );
}

/// The claim as a lane makes it on a backlog (issue 3: an index path, no sequential
/// scan): the queue walked by primary key, and the head-of-key check an index-only
/// lookup of the key's 64-bit hash, not a comparison of text keys.
#[tokio::test]
async fn the_claim_walks_the_primary_key_and_probes_heads_by_key_hash() {
    let env = TestEnv::migrated().await;
    seed_keyed(&env, ROWS, KEYS).await;
    env.db.execute("VACUUM ANALYZE sync_outbox").await;
    let share = KeyShare { index: 0, of: 3 };
    let plan = PgStore::explain_claim(env.db.pg(), "COSTS OFF", 100, Some(share))
        .await
        .expect("EXPLAIN of the claim");
    assert!(!plan.contains("Seq Scan"), "{plan}");
    assert!(
        plan.contains("Index Scan using sync_outbox_pkey on sync_outbox o"),
        "{plan}"
    );
    assert!(
        plan.contains("Index Only Scan using sync_outbox_ordering_key_hash_id on sync_outbox p"),
        "{plan}"
    );
}
