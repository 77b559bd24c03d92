//! Retention: records of delivered rows are pruned after `retention.sent_ttl`, a
//! small batch at a time; dead letters are never pruned.

use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use super::support::insert_one;
use crate::harness::{wait_until, Mode, Reply, TestEnv};

#[tokio::test]
async fn delivered_records_are_pruned_after_the_ttl_and_dead_letters_are_kept() {
    let mut env = TestEnv::migrated().await;
    let n = 50;
    for _ in 0..n {
        insert_one(&env).await;
    }
    let poison = 3;
    for _ in 0..poison {
        let id = Uuid::new_v4();
        env.insert("call_log", id, json!({"id": id, "poison": true}))
            .await;
    }
    env.sink.set_mode(Mode::RejectPoison);
    env.config
        .set("retention.sent_ttl", "1s")
        .set("retention.prune_interval", "200ms")
        .set("retention.prune_batch", 10);

    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(10), "50 sent records", || async {
        env.count("sync_outbox_sent").await == n
    })
    .await;
    let recorded = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "the poison rows dead-lettered",
        || async { env.count("sync_outbox_dead_letters").await == poison },
    )
    .await;
    assert_eq!(env.sink.entries().len(), n as usize);

    wait_until(
        Duration::from_secs(10),
        "the sent records pruned",
        || async { env.count("sync_outbox_sent").await == 0 },
    )
    .await;
    let pruned_after = recorded.elapsed();
    // a few more prune rounds must leave the dead letters alone
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(env.count("sync_outbox_dead_letters").await, poison);
    assert_eq!(env.count("sync_outbox").await, 0);
    relay.stop_cleanly().await;
    assert!(
        pruned_after >= Duration::from_millis(500),
        "records pruned {pruned_after:?} after delivery, before their 1s TTL"
    );
}

/// A deployment that only runs `drain` (from cron) keeps retention too: each drain
/// prunes the delivered records past the TTL before it exits, in batches of
/// `prune_batch`, and keeps the younger ones.
#[tokio::test]
async fn a_drain_prunes_records_past_the_ttl_and_keeps_younger_ones() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("retention.sent_ttl", "2s")
        .set("retention.prune_batch", 7);
    let old = 20;
    for _ in 0..old {
        insert_one(&env).await;
    }
    env.drain().await.assert_success();
    assert_eq!(env.count("sync_outbox_sent").await, old);

    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let young = 5;
    for _ in 0..young {
        insert_one(&env).await;
    }
    env.drain().await.assert_success().assert_no_panic();
    assert_eq!(
        env.count("sync_outbox_sent").await,
        young,
        "the 20 records older than 2s are pruned (3 batches of 7), the 5 new ones kept"
    );
    assert_eq!(env.sink.entries().len(), (old + young) as usize);
}

/// A cron drain on a steady stream often ends at its `--timeout`: it prunes all the
/// same (it used to prune only when the outbox ran empty, so the delivered records
/// of such a deployment were never pruned).
#[tokio::test]
async fn a_drain_that_reaches_its_timeout_prunes_too() {
    let mut env = TestEnv::migrated().await;
    env.config.set("retention.sent_ttl", "2s");
    let old = 20;
    for _ in 0..old {
        insert_one(&env).await;
    }
    env.drain().await.assert_success();
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    // a request that outlasts the timeout: the drain stops claiming, settles it
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(1))));
    insert_one(&env).await;
    let out = env.run(&["drain", "--timeout", "300ms"]).await;
    out.assert_success();
    assert!(out.stderr.contains("timeout reached"), "{out}");
    assert_eq!(
        env.count("sync_outbox_sent").await,
        1,
        "the 20 old records pruned, the new one kept\n{out}"
    );
}
