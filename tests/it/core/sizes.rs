//! Large payloads: `dispatch.max_batch_bytes` bounds the payload bytes of each JSON
//! request and of each claim, so memory and request bodies stay bounded whatever the
//! producers write, and nothing is held back for its size.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::{both_stores, Backend, Mode, Reply, TestEnv};

const MAX_BATCH_BYTES: usize = 100 * 1024;

/// A payload of about `len` bytes that PostgreSQL cannot compress much (random hex).
fn bulky(n: usize, len: usize) -> Value {
    let blob: String = (0..len.div_ceil(32))
        .map(|_| Uuid::new_v4().simple().to_string())
        .collect();
    json!({"n": n, "blob": &blob[..len]})
}

/// `max_batch_bytes` at 100 KiB, one worker of `requests` requests at a time, and a
/// sink that answers after `delay`.
fn one_worker(env: &mut TestEnv, requests: u32, delay: Duration) {
    env.config
        .set("dispatch.max_batch_bytes", MAX_BATCH_BYTES as u32)
        .set("dispatch.concurrency", requests)
        .set("dispatch.batches_per_settle", requests)
        .set("dispatch.claim_concurrency", 1);
    env.sink.set_mode(Mode::Reply(Reply::ok().delay(delay)));
}

/// The payload bytes of each request the sink accepted, with its outbox ids.
fn accepted_requests(env: &TestEnv) -> Vec<(Vec<i64>, usize)> {
    env.sink
        .sync_requests()
        .iter()
        .filter(|r| r.accepted())
        .map(|r| {
            let entries = r.entries();
            let bytes = entries.iter().map(|e| e.payload.to_string().len()).sum();
            (entries.iter().map(|e| e.outbox_id).collect(), bytes)
        })
        .collect()
}

both_stores!(large_payloads_go_in_requests_of_at_most_max_batch_bytes);
/// Twelve rows of 40 KB and one of 150 KB, with `max_batch_bytes` at 100 KiB: no
/// request carries more than 100 KiB of payloads but the one whose only entry is
/// the large row, and every row is delivered once.
async fn large_payloads_go_in_requests_of_at_most_max_batch_bytes(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.max_batch_bytes", MAX_BATCH_BYTES as u32);
    let mut ids = Vec::new();
    for n in 0..13 {
        let len = if n == 6 { 150_000 } else { 40_000 };
        ids.push(env.insert("call_log", Uuid::new_v4(), bulky(n, len)).await);
    }
    let large = ids[6];

    env.drain().await.assert_success();

    let requests = accepted_requests(&env);
    let mut delivered: Vec<i64> = requests.iter().flat_map(|(ids, _)| ids.clone()).collect();
    delivered.sort();
    assert_eq!(delivered, ids, "every row, once");
    for (outbox_ids, bytes) in &requests {
        if outbox_ids.contains(&large) {
            assert_eq!(outbox_ids, &[large], "the large row goes alone");
        } else {
            assert!(
                *bytes <= MAX_BATCH_BYTES,
                "{bytes} payload bytes in one request: {outbox_ids:?}"
            );
        }
    }
    assert!(
        requests.len() >= 7,
        "40 KB rows go two at a time: {requests:?}"
    );
    assert_eq!(env.count("sync_outbox").await, 0);
}

both_stores!(a_claim_leases_no_more_payload_bytes_than_its_requests_carry);
/// One worker, one request at a time, a sink that takes 200 ms: a claim of up to 100
/// rows takes only the two 40 KB rows that fit in `max_batch_bytes`, so at no moment
/// are more than a couple of rows leased (held in memory); before, all twenty were.
async fn a_claim_leases_no_more_payload_bytes_than_its_requests_carry(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    one_worker(&mut env, 1, Duration::from_millis(200));
    for n in 0..20 {
        env.insert("call_log", Uuid::new_v4(), bulky(n, 40_000))
            .await;
    }
    let relay = env.spawn_run(&[]);
    let leased = "SELECT count(*) FROM sync_outbox WHERE lease_until IS NOT NULL";
    let mut most_leased = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while env.count("sync_outbox").await > 0 {
        most_leased = most_leased.max(env.db.scalar(leased).await);
        assert!(Instant::now() < deadline, "not delivered in 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();

    assert!(
        (1..=4).contains(&most_leased),
        "{most_leased} rows leased at once"
    );
    let requests = accepted_requests(&env);
    assert_eq!(requests.iter().map(|(ids, _)| ids.len()).sum::<usize>(), 20);
    assert!(
        requests.iter().all(|(ids, _)| ids.len() <= 2),
        "{requests:?}"
    );
}

both_stores!(large_rows_keep_to_the_requests_in_flight);
/// Rows of 60 KB that PostgreSQL compresses to a few KB each, one worker of two
/// requests (`batches_per_settle = concurrency = 2`), `max_batch_bytes` 100 KiB: the
/// claim, bounded by the stored size, takes them all, and each is a request of its
/// own (two would be 120 KB); on SQLite, which counts the text, three (180 KB of 200
/// KiB). Still at most two requests are out at once, as `concurrency` says.
async fn large_rows_keep_to_the_requests_in_flight(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    one_worker(&mut env, 2, Duration::from_millis(100));
    for n in 0..12 {
        let payload = json!({"n": n, "text": "a".repeat(60_000)});
        env.insert("call_log", Uuid::new_v4(), payload).await;
    }
    env.drain().await.assert_success();

    let requests = env.sink.sync_requests();
    assert_eq!(requests.iter().filter(|r| r.accepted()).count(), 12);
    let most_at_once = requests
        .iter()
        .map(|r| {
            requests
                .iter()
                .filter(|o| {
                    o.received_at <= r.received_at
                        && o.answered_at.is_some_and(|a| a > r.received_at)
                })
                .count()
        })
        .max();
    assert_eq!(most_at_once, Some(2), "requests in flight at once");
}
