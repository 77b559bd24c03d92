//! A relay killed with SIGKILL at random points of a drain loses nothing, and what
//! it delivers twice is bounded by what it can have in flight. Some rows are refused
//! by the sink, so that kills also land in the moves to the dead letters: each row
//! ends in exactly one table.

use std::time::{Duration, Instant};

use super::support::{
    assert_all_received, by_id, duplicates, live_leases, seed_calls, tables, until_or_exit,
};
use crate::harness::{wait_until, Mode, TestEnv};

const ROWS: i64 = 20_000;
const KILLS: usize = 10;
const BATCH_SIZE: usize = 100;
const CONCURRENCY: usize = 4;
/// Every this-many-th row is refused by the sink (400), so dead-lettered.
const POISON_EVERY: i64 = 400;

#[tokio::test]
async fn drains_killed_ten_times_lose_nothing_and_duplicate_a_bounded_amount() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("dispatch.batch_size", BATCH_SIZE)
        .set("dispatch.concurrency", CONCURRENCY)
        // leases of a killed drain expire fast
        .set("dispatch.lease_duration", "2s");
    seed_calls(&env, ROWS, 3_000).await;
    env.db
        .execute(&format!(
            "UPDATE sync_outbox SET payload = jsonb_set(payload, '{{poison}}', 'true') \
             WHERE id % {POISON_EVERY} = 7"
        ))
        .await;
    let poison: Vec<i64> = (1..=ROWS).filter(|id| id % POISON_EVERY == 7).collect();
    env.sink.set_mode(Mode::RejectPoison);

    let mut killed = 0;
    for round in 0..KILLS {
        let before = env.sink.request_count();
        let more = rand::random_range(1..=4);
        let mut relay = env.cmd(["drain"]).spawn();
        let delivering = until_or_exit(
            &mut relay,
            Duration::from_secs(30),
            &format!("round {round}: {more} more requests at the sink"),
            || async { env.sink.request_count() >= before + more },
        )
        .await;
        if delivering {
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..120))).await;
        }
        relay.signal(libc::SIGKILL);
        let out = relay.wait(Duration::from_secs(10)).await;
        out.assert_no_panic();
        match out.code {
            None => killed += 1,
            // it finished first: everything it could claim was settled (3: with
            // dead letters)
            Some(code) => assert!(code == 0 || code == 3, "round {round}: drain failed\n{out}"),
        }
    }
    let (pending, _, _) = tables(&env).await;
    assert!(
        pending > 0 && killed >= KILLS / 2,
        "the kills must land mid-drain to test anything: {killed} kills, {pending} rows left"
    );

    // What the killed drains held comes back when their leases expire.
    let started = Instant::now();
    for attempt in 0.. {
        wait_until(
            Duration::from_secs(5),
            "the killed drains' leases to expire",
            || async { live_leases(&env).await == 0 },
        )
        .await;
        let out = env
            .cmd(["drain"])
            .timeout(Duration::from_secs(60))
            .output()
            .await;
        out.assert_no_panic();
        assert!(matches!(out.code, Some(0 | 3)), "drain failed\n{out}");
        if env.count("sync_outbox").await == 0 {
            break;
        }
        assert!(attempt < 4, "the outbox is still not empty after 5 drains");
    }
    assert!(started.elapsed() < Duration::from_secs(60));

    let mut received = by_id(env.sink.entries());
    for id in &poison {
        assert!(
            received.remove(id).is_none(),
            "poison row {id} was accepted"
        );
    }
    // every other row, as if the poison had never been there
    for id in &poison {
        received.insert(*id, Vec::new());
    }
    assert_all_received(&received, ROWS);
    received.retain(|_, copies| !copies.is_empty());
    let dead = poison.len() as i64;
    assert_eq!(
        tables(&env).await,
        (0, ROWS - dead, dead),
        "(pending, sent, dead)"
    );
    // each row in exactly one table: no dead letter twice, none also delivered
    let dead_ids: Vec<i64> =
        sqlx::query_scalar("SELECT outbox_id FROM sync_outbox_dead_letters ORDER BY outbox_id")
            .fetch_all(env.db.pg())
            .await
            .expect("dead letters");
    assert_eq!(dead_ids, poison, "each refused row dead-lettered once");
    let both: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync_outbox_sent s JOIN sync_outbox_dead_letters d ON d.outbox_id = s.id",
    )
    .fetch_one(env.db.pg())
    .await
    .expect("overlap");
    assert_eq!(both, 0, "no row both delivered and dead");
    let dup = duplicates(&received);
    let bound = killed * BATCH_SIZE * CONCURRENCY;
    assert!(
        dup <= bound,
        "{dup} duplicate deliveries after {killed} kills: more than {bound} \
         ({BATCH_SIZE} rows × {CONCURRENCY} batches in flight per kill)"
    );
    for (id, copies) in &received {
        for copy in &copies[1..] {
            assert_eq!(
                copy.raw, copies[0].raw,
                "outbox row {id} was delivered twice with different content"
            );
        }
    }
    eprintln!("kill -9 × {killed}: {dup} duplicate deliveries (bound {bound})");
}
