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

/// A lock held on the outbox (an operator's `LOCK TABLE`, a long migration) holds
/// every statement of the relay, the releases after the grace too: the relay stops
/// anyway, soon after the grace, instead of when the lock is let go (it used to wait
/// for it, however long). Nothing is lost: the rows come back when their lease
/// expires, or at once once the lock is gone and a relay releases them.
#[tokio::test]
async fn a_lock_held_on_the_outbox_does_not_hold_the_shutdown_past_the_grace() {
    let mut env = TestEnv::migrated().await;
    let n = 300;
    seed_calls(&env, n, 300).await;
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(2))));
    env.config
        .set("shutdown.grace", "1s")
        .set("dispatch.lease_duration", "2s");

    let relay = env.spawn_run(&[]);
    env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
    // the settles of the batches out, and every later statement, now wait on this
    let lock = env.db.hold_lock("sync_outbox").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    relay.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let out = relay.wait(Duration::from_secs(40)).await;
    let took = signalled.elapsed();
    lock.rollback().await.unwrap();
    out.assert_success().assert_no_panic();
    assert!(
        took < Duration::from_secs(15),
        "exit {took:?} after SIGTERM, with grace 1s, held by the lock\n{out}"
    );
    assert!(
        out.stderr.contains("stopping anyway"),
        "says why the leases were not released\n{out}"
    );

    // the rows out when the relay stopped come back when their 2 s leases expire
    env.sink.set_mode(Mode::Accept);
    crate::harness::wait_until(Duration::from_secs(60), "every row delivered", || async {
        env.drain().await;
        tables(&env).await == (0, n, 0)
    })
    .await;
    let received = by_id(env.sink.all_entries());
    assert_all_received(&received, n);
}

/// SIGHUP (a foreground relay's terminal closed, a stray `kill -HUP`) stops the
/// relay as SIGTERM does: the batch out is settled, nothing is left leased, exit 0.
/// It used to end the process at once, silently (129), its rows leased until the
/// lease ran out.
#[tokio::test]
async fn sighup_stops_the_relay_as_sigterm_does() {
    let mut env = TestEnv::migrated().await;
    seed_calls(&env, 100, 100).await;
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_millis(1_500))));
    env.config
        .set("shutdown.grace", "10s")
        .set("ingest.timeout", "5s");
    let relay = env.spawn_run(&[]);
    env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
    relay.signal(libc::SIGHUP);
    let out = relay.wait(Duration::from_secs(15)).await;
    out.assert_success().assert_no_panic();
    assert!(out.stderr.contains("SIGHUP: stopping"), "{out}");
    let leased: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync_outbox WHERE claim_token IS NOT NULL OR lease_until IS NOT NULL",
    )
    .fetch_one(env.db.pg())
    .await
    .unwrap();
    assert_eq!(leased, 0, "rows left leased\n{out}");
    assert!(
        !env.sink.entries().is_empty(),
        "the batch out was delivered"
    );
}

/// A second SIGTERM or SIGINT during the grace exits at once (130), without waiting
/// for the batches in flight: their rows return when their lease expires.
#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut env = TestEnv::migrated().await;
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(30))));
    env.config
        .set("shutdown.grace", "30s")
        .set("ingest.timeout", "60s");

    for second in [libc::SIGTERM, libc::SIGINT] {
        // new rows each time: the last relay's stay leased
        seed_calls(&env, 100, 100).await;
        let relay = env.spawn_run(&[]);
        env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
        relay.signal(libc::SIGTERM);
        tokio::time::sleep(Duration::from_millis(300)).await;
        relay.signal(second);
        let signalled = Instant::now();
        let out = relay.wait(Duration::from_secs(20)).await;
        out.assert_code(130).assert_no_panic();
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "{:?}\n{out}",
            signalled.elapsed()
        );
        assert!(out.stderr.contains("second signal"), "{out}");
        env.sink.clear();
    }
}

/// A lock held on the outbox (an operator's `LOCK TABLE`, a long migration) holds a
/// drain's claim. `--timeout` then still ends the drain within the timeout, the grace
/// and the bookkeeping's bound: its closing count of the rows left is not waited for
/// (it used to wait, and the drain with it, for as long as the lock was held). The
/// claim that commits once the lock is gone leases its rows to a relay that has
/// exited: they come back when the lease expires, and nothing is lost.
#[tokio::test]
async fn a_drain_held_by_a_lock_on_the_outbox_still_ends_at_its_timeout() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("shutdown.grace", "1s")
        .set("dispatch.lease_duration", "2s");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(super::support::insert_one(&env).await);
    }
    let holder = env.db.hold_lock("sync_outbox").await;

    let started = Instant::now();
    let out = env.run(&["drain", "--timeout", "1s"]).await;
    let took = started.elapsed();
    holder.commit().await.expect("release the lock");
    out.assert_code(3).assert_no_panic();
    assert!(
        took < Duration::from_secs(20),
        "the drain waited {took:?} for the lock\n{out}"
    );
    assert!(
        out.stdout.contains("stopped before the outbox was empty"),
        "{out}"
    );

    // whatever the held claim leased expires in 2 s
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.drain().await.assert_success();
    let mut sent = env.sent_ids().await;
    sent.sort_unstable();
    assert_eq!(sent, ids, "every row delivered once the lock is gone");
}

/// SIGTERM while a claim is held up in the database (here a statement trigger
/// that sleeps; a lock or a stall does the same): the claim that ends after the
/// signal starts nothing, and its rows go back to the outbox unleased and
/// uncharged (SPEC 3.7: stop claiming). They used to be sent after the signal,
/// seen in an audit, which with a short grace makes redeliveries.
#[tokio::test]
async fn a_claim_that_ends_after_sigterm_sends_nothing() {
    let env = TestEnv::migrated().await;
    let n = 50;
    env.db
        .execute(&format!(
            "CREATE TABLE claim_stalls (on_ boolean);
             INSERT INTO claim_stalls VALUES (true);
             CREATE FUNCTION claim_stall() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF EXISTS (SELECT 1 FROM claim_stalls) THEN
                     PERFORM pg_sleep(3);
                 END IF;
                 RETURN NULL;
             END $$;
             CREATE TRIGGER stalling_claims BEFORE UPDATE ON sync_outbox
                 FOR EACH STATEMENT EXECUTE FUNCTION claim_stall();
             INSERT INTO sync_outbox (entity_type, entity_id, payload)
             SELECT 'call_log', gen_random_uuid(), '{{}}' FROM generate_series(1, {n});"
        ))
        .await;
    let relay = env.spawn_run(&[]);
    crate::harness::wait_until(Duration::from_secs(15), "a claim stalled", || async {
        let stalled: i64 = env
            .db
            .scalar("SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep'")
            .await;
        stalled > 0
    })
    .await;
    relay.signal(libc::SIGTERM);
    env.db.execute("DELETE FROM claim_stalls").await;
    let out = relay.wait(Duration::from_secs(20)).await;
    out.assert_success().assert_no_panic();
    assert!(
        env.sink.entries().is_empty(),
        "nothing sent after SIGTERM\n{out}"
    );
    let outbox = env.outbox().await;
    assert_eq!(outbox.len(), n as usize);
    assert!(
        outbox.iter().all(|r| r.attempts == 0),
        "uncharged: {outbox:#?}"
    );
    let leased: i64 = env
        .db
        .scalar("SELECT count(*) FROM sync_outbox WHERE lease_until IS NOT NULL")
        .await;
    assert_eq!(leased, 0, "given back unleased\n{out}");
}
