//! SIGTERM while a batch is in flight: the batch is finished and settled, the
//! process exits 0 within the grace, and nothing is delivered twice afterwards.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::support::{assert_all_received, by_id, seed_calls, tables};
use crate::harness::{Mode, Reply, TestEnv};

#[tokio::test]
async fn sigterm_mid_batch_settles_the_batch_and_exits_zero_within_the_grace() {
    let mut env = TestEnv::migrated().await;
    let n = 1_000;
    seed_calls(&env, n, 300).await;
    let delay = Duration::from_millis(1_500);
    let grace = Duration::from_secs(10);
    env.sink.set_mode(Mode::Reply(Reply::ok().delay(delay)));
    env.config
        .set("shutdown.grace", "10s")
        .set("ingest.timeout", "5s");

    let mut relay = env.spawn_run(&[]);
    env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
    relay.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let in_flight: BTreeSet<i64> = env.sink.all_entries().iter().map(|e| e.outbox_id).collect();
    assert!(relay.is_running());
    let out = relay.wait(grace + Duration::from_secs(5)).await;
    let took = signalled.elapsed();
    out.assert_success().assert_no_panic();
    assert!(
        took < grace,
        "exit {took:?} after SIGTERM, beyond shutdown.grace {grace:?}\n{out}"
    );

    // Every request that left was answered and its rows settled as sent.
    let requests = env.sink.sync_requests();
    assert!(
        requests.iter().all(|r| r.answered_at.is_some()),
        "the relay hung up on a request in flight\n{out}"
    );
    let delivered: BTreeSet<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert!(delivered.is_superset(&in_flight));
    let sent: BTreeSet<i64> = env.sent_ids().await.into_iter().collect();
    assert_eq!(
        sent, delivered,
        "exactly what the sink accepted is recorded as sent"
    );
    assert!(
        delivered.len() < n as usize,
        "the relay stopped claiming after SIGTERM: {} of {n} delivered",
        delivered.len()
    );
    let leased: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync_outbox WHERE claim_token IS NOT NULL")
            .fetch_one(env.db.pg())
            .await
            .unwrap();
    assert_eq!(leased, 0, "no row is left claimed by the stopped relay");

    env.sink.set_mode(Mode::Accept);
    env.drain().await.assert_success();
    let received = by_id(env.sink.all_entries());
    assert_all_received(&received, n);
    let twice: Vec<&i64> = received
        .iter()
        .filter(|(_, copies)| copies.len() > 1)
        .map(|(id, _)| id)
        .collect();
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    assert_eq!(tables(&env).await, (0, n, 0), "(pending, sent, dead)");
    eprintln!(
        "SIGTERM: {} rows in flight, exit after {took:?}",
        in_flight.len()
    );
}

#[tokio::test]
async fn past_the_grace_the_batch_in_flight_is_released_for_redelivery() {
    let mut env = TestEnv::migrated().await;
    let n = 300;
    seed_calls(&env, n, 300).await;
    // the sink holds the request far longer than the grace
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(30))));
    env.config
        .set("shutdown.grace", "1s")
        .set("ingest.timeout", "60s")
        .set("dispatch.concurrency", 1);

    let relay = env.spawn_run(&[]);
    env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
    let claimed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync_outbox WHERE claim_token IS NOT NULL")
            .fetch_one(env.db.pg())
            .await
            .unwrap();
    assert!(claimed > 0, "a batch is in flight");
    relay.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let out = relay.wait(Duration::from_secs(15)).await;
    let took = signalled.elapsed();
    out.assert_success().assert_no_panic();
    assert!(
        took < Duration::from_secs(5),
        "exit {took:?} after SIGTERM\n{out}"
    );
    assert!(
        out.stderr.contains("released in-flight rows"),
        "says it released the batch\n{out}"
    );
    // released, not waiting for the lease (60 s) to expire: claimable at once
    let (leased, pending): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE claim_token IS NOT NULL OR lease_until IS NOT NULL), count(*) \
         FROM sync_outbox",
    )
    .fetch_one(env.db.pg())
    .await
    .unwrap();
    assert_eq!((leased, pending), (0, n), "(still leased, pending)");

    env.sink.set_mode(Mode::Accept);
    env.drain().await.assert_success();
    let received = by_id(env.sink.all_entries());
    assert_all_received(&received, n);
    assert_eq!(tables(&env).await, (0, n, 0), "(pending, sent, dead)");
}
