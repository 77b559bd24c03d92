//! Leases: a dead relay's rows are taken over when its lease expires, with no
//! operator action; a live relay on a slow sink renews its lease and keeps its rows,
//! and tries a renewal the database refused again within a second.

use std::time::{Duration, Instant};

use super::support::{by_id, insert_one, seed_adjacent_calls, tables};
use crate::harness::relay::{Output, Running};
use crate::harness::{wait_until, MetricsEndpoint, Mode, Reply, Sink, TestEnv};

const LEASE: Duration = Duration::from_secs(2);

/// (claim_token, seconds of lease left) of every row still in the outbox.
async fn leases(env: &TestEnv) -> Vec<(Option<i64>, Option<f64>)> {
    sqlx::query_as(
        "SELECT claim_token, EXTRACT(EPOCH FROM lease_until - now())::float8 \
         FROM sync_outbox ORDER BY id",
    )
    .fetch_all(env.db.pg())
    .await
    .expect("select leases")
}

/// Relay A, with leases of `lease`, whose first request is out; the Frontend answers
/// it after `secs` seconds (A waits for it: `ingest.timeout` is longer).
async fn a_relay_whose_request_is_answered_after(
    env: &mut TestEnv,
    secs: u64,
    lease: &str,
) -> Running {
    let delay = Duration::from_secs(secs);
    env.sink.set_mode(Mode::Reply(Reply::ok().delay(delay)));
    env.config
        .set("dispatch.lease_duration", lease)
        .set("dispatch.poll_interval", "50ms")
        .set("dispatch.concurrency", 1)
        .set("ingest.timeout", format!("{}s", 2 * secs + 2));
    let a = env.spawn_run(&[]);
    env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
    a
}

/// Once `n` rows are delivered, relays `a` and `b` are stopped, cleanly; `a`'s
/// output.
async fn both_stopped_once_sent(env: &TestEnv, n: usize, a: Running, b: Running) -> Output {
    wait_until(Duration::from_secs(20), "the rows delivered", || async {
        env.count("sync_outbox_sent").await == n as i64
    })
    .await;
    let a_out = a.terminate(Duration::from_secs(10)).await;
    a_out.assert_success().assert_no_panic();
    b.stop_cleanly().await;
    a_out
}

#[tokio::test]
async fn a_killed_relays_batch_is_taken_over_when_its_lease_expires() {
    let mut env = TestEnv::migrated().await;
    let n = 50;
    for _ in 0..n {
        insert_one(&env).await;
    }
    // Relay A's sink never answers within the test.
    let hanging = Sink::start();
    hanging.set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(300))));
    env.config
        .set("dispatch.lease_duration", "2s")
        .set("dispatch.poll_interval", "100ms")
        .set("dispatch.concurrency", 1)
        .set("ingest.timeout", "60s");
    let mut a = env.spawn_run(&["--ingest-url", hanging.url()]);
    hanging.wait_for_requests(1, Duration::from_secs(15)).await;
    assert_eq!(
        hanging.all_entries().len(),
        n,
        "A sent the whole backlog in one batch"
    );
    assert!(a.is_running(), "A waits for its sink\n{}", a.stderr());

    a.signal(libc::SIGKILL);
    let killed_at = Instant::now();
    let held = leases(&env).await;
    let left = held
        .iter()
        .map(|(token, left)| {
            assert!(token.is_some(), "every row is claimed by A: {held:?}");
            left.expect("a claimed row has a lease")
        })
        .fold(f64::INFINITY, f64::min);
    assert!(
        left > 0.0,
        "A's lease is still running when it dies: {left}s"
    );
    assert!(a.wait(Duration::from_secs(5)).await.code.is_none());

    let b = env.spawn_run(&[]);
    let deadline = LEASE + Duration::from_millis(100) + Duration::from_secs(3);
    env.sink.wait_for_entries(n, deadline).await;
    let first = env.sink.sync_requests()[0].received_at;
    let expiry = killed_at + Duration::from_secs_f64(left);
    assert!(
        first + Duration::from_millis(300) >= expiry,
        "B delivered A's rows {:?} before A's lease expired",
        expiry.saturating_duration_since(first)
    );
    wait_until(Duration::from_secs(5), "B to settle the rows", || async {
        env.count("sync_outbox_sent").await == n as i64
    })
    .await;
    b.stop_cleanly().await;

    let received = by_id(env.sink.entries());
    assert_eq!(received.len(), n);
    assert!(received.values().all(|copies| copies.len() == 1));
    assert_eq!(
        tables(&env).await,
        (0, n as i64, 0),
        "(pending, sent, dead)"
    );
    let charged: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM sync_outbox_sent")
        .fetch_all(env.db.pg())
        .await
        .unwrap();
    assert!(
        charged.iter().all(|a| *a == 1),
        "a relay that died mid-request charged no attempt: {charged:?}"
    );
    drop(hanging);
    eprintln!(
        "lease takeover: A's rows delivered by B {:?} after the kill",
        first - killed_at
    );
}

#[tokio::test]
async fn a_slow_but_alive_relay_renews_its_lease_and_keeps_its_batch() {
    let mut env = TestEnv::migrated().await;
    let n = 20;
    for _ in 0..n {
        insert_one(&env).await;
    }
    let a = a_relay_whose_request_is_answered_after(&mut env, 4, "1500ms").await;
    let arrived = Instant::now();
    let claimed = leases(&env).await;
    assert_eq!(claimed.len(), n);
    let token = claimed[0].0.expect("claimed by A");
    assert!(
        claimed.iter().all(|(t, _)| *t == Some(token)),
        "{claimed:?}"
    );

    // A second relay polls all along, looking for expired leases.
    let b = env.spawn_run(&[]);
    // Well past the original lease: still A's claim, with a lease in the future.
    tokio::time::sleep_until((arrived + Duration::from_millis(2_800)).into()).await;
    let held = leases(&env).await;
    assert!(
        held.iter()
            .all(|(t, left)| *t == Some(token) && left.is_some_and(|s| s > 0.0)),
        "A's lease was not renewed while its request was in flight: {held:?}"
    );

    wait_until(Duration::from_secs(15), "A to settle its batch", || async {
        env.count("sync_outbox_sent").await == n as i64
    })
    .await;
    let a_out = a.terminate(Duration::from_secs(10)).await;
    a_out.assert_success().assert_no_panic();
    let b_out = b.terminate(Duration::from_secs(10)).await;
    b_out.assert_success().assert_no_panic();
    assert!(
        !a_out.stderr.contains("lease lost"),
        "A lost its lease\n{a_out}"
    );

    let requests = env.sink.sync_requests();
    assert_eq!(
        requests.len(),
        1,
        "only A's one request, B took nothing over: {:?}",
        requests
            .iter()
            .map(|r| r.entries().len())
            .collect::<Vec<_>>()
    );
    let received = by_id(env.sink.all_entries());
    assert_eq!(received.len(), n);
    assert!(received.values().all(|copies| copies.len() == 1));
    assert_eq!(
        tables(&env).await,
        (0, n as i64, 0),
        "(pending, sent, dead)"
    );
}

/// A relay that stalls (here: stopped by SIGSTOP, as a VM pause would) loses its
/// lease, and another relay takes the rows over. When the stalled one wakes up and
/// settles what it had (its Frontend accepted the batch, long ago), the settle is
/// fenced on the lease: it is reported as lost and leaves the rows to their new
/// holder, whose own outcome (a failure, to be retried) stands. Unfenced, the stale
/// settle would have taken them out of the outbox behind the new holder's back.
/// The stalled relay's metrics count the rows as lost, not as delivered, and its log
/// names them.
#[tokio::test]
async fn a_stalled_relay_that_wakes_up_after_a_takeover_cannot_overwrite_the_outcome() {
    a_stalled_relay_wakes_up_to_a_stale(20, Reply::ok()).await;
}

/// The same when the stale answer would have dead-lettered the row (a 400 for a
/// batch of one): it is not dead-lettered, and neither logged nor counted as such by
/// the stalled relay.
#[tokio::test]
async fn a_stalled_relay_whose_stale_answer_is_a_400_dead_letters_nothing() {
    a_stalled_relay_wakes_up_to_a_stale(1, Reply::status(400).body(r#"{"error":"bad"}"#)).await;
}

/// Relay A stalls with a batch of `n` rows out, B takes them over and fails with
/// them, and A wakes up to its Frontend's `stale` answer.
async fn a_stalled_relay_wakes_up_to_a_stale(n: usize, stale: Reply) {
    let mut env = TestEnv::migrated().await;
    for _ in 0..n {
        insert_one(&env).await;
    }
    let answer_after = Duration::from_secs(6);
    let slow = Sink::start();
    let accepted = stale.status == 200;
    slow.set_mode(Mode::Reply(stale.delay(answer_after)));
    env.sink.set_mode(Mode::Always(503));
    env.config
        .set("dispatch.lease_duration", "2s")
        .set("dispatch.poll_interval", "100ms")
        .set("dispatch.concurrency", 1)
        .set("dispatch.outage_threshold", 1000)
        .set("retry.max_attempts", 1000)
        .set("retry.base_delay", "100ms")
        .set("retry.max_delay", "200ms")
        .set("ingest.timeout", "60s");
    let a_metrics = MetricsEndpoint::enable(&mut env);
    let a = env.spawn_run(&[
        "--ingest-url",
        slow.url(),
        a_metrics.flag()[0],
        a_metrics.flag()[1],
    ]);
    slow.wait_for_requests(1, Duration::from_secs(15)).await;
    let sent_at = Instant::now();
    a.signal(libc::SIGSTOP);
    // the batch out keeps its 200; once awake, A delivers nothing more
    slow.set_mode(Mode::Always(503));

    // B takes the rows over once A's lease expires, and fails with them.
    let b_metrics = MetricsEndpoint::enable(&mut env);
    let b = env.spawn_run(&b_metrics.flag());
    wait_until(
        Duration::from_secs(10),
        "B to take the rows over",
        || async { env.sink.sync_requests().len() >= 2 },
    )
    .await;
    // A wakes up once its Frontend has answered: the 200 is there to be read.
    tokio::time::sleep_until((sent_at + answer_after + Duration::from_millis(300)).into()).await;
    a.signal(libc::SIGCONT);
    wait_until(
        Duration::from_secs(10),
        "A to report its lost lease",
        || async { a.stderr().contains("lease lost") },
    )
    .await;
    a_metrics
        .wait_for_sample(
            "serversync_lease_lost_total",
            n as f64,
            Duration::from_secs(5),
        )
        .await;
    // the settle is counted right after the lost lease is: give it the time to show
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, a_scrape) = a_metrics.get("/metrics").await.expect("A's metrics");
    let delivered: Vec<&str> = a_scrape
        .lines()
        .filter(|l| {
            l.starts_with("serversync_deliveries_total{")
                && !l.contains(r#"outcome="retry""#)
                && !l.ends_with(" 0")
        })
        .collect();
    assert!(
        delivered.is_empty(),
        "A settled nothing it no longer held: {delivered:?}"
    );
    assert!(
        !a.stderr().contains("dead-lettered"),
        "A dead-lettered nothing: {}",
        a.stderr()
    );
    let first = sqlx::query_scalar::<_, i64>("SELECT min(id) FROM sync_outbox")
        .fetch_one(env.db.pg())
        .await
        .expect("first id");
    assert!(
        a.stderr().contains(&format!("outbox_ids={first}")),
        "the lost rows are named: {}",
        a.stderr()
    );
    assert_eq!(
        tables(&env).await,
        (n as i64, 0, 0),
        "(pending, sent, dead): A's stale outcome took nothing out of the outbox"
    );
    let failed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync_outbox WHERE last_error_type = 'http_5xx' AND attempts >= 1",
    )
    .fetch_one(env.db.pg())
    .await
    .expect("count B's outcome");
    assert_eq!(failed, n as i64, "B's outcome stands");

    env.sink.set_mode(Mode::Accept);
    both_stopped_once_sent(&env, n, a, b).await;
    assert_eq!(
        tables(&env).await,
        (0, n as i64, 0),
        "(pending, sent, dead)"
    );
    let received = by_id(env.sink.entries());
    assert_eq!(received.len(), n);
    assert!(received.values().all(|copies| copies.len() == 1));
    assert_eq!(
        slow.accepted_batches().len(),
        usize::from(accepted),
        "A's Frontend accepted only the stale batch, if it was a 200"
    );
}

#[tokio::test]
async fn a_renewal_refused_by_the_database_is_tried_again_within_a_second() {
    let mut env = TestEnv::migrated().await;
    insert_one(&env).await;
    // The first three renewals fail (a database in trouble; a sequence, since a
    // failed statement rolls back anything else it wrote).
    env.db
        .execute(
            "CREATE SEQUENCE renewals;
             CREATE FUNCTION refuse_renewals() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF nextval('renewals') <= 3 THEN
                     RAISE EXCEPTION 'renewal refused by the test';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_renewals BEFORE UPDATE ON sync_outbox FOR EACH ROW
                 WHEN (OLD.claim_token IS NOT DISTINCT FROM NEW.claim_token
                       AND NEW.lease_until > OLD.lease_until)
                 EXECUTE FUNCTION refuse_renewals();",
        )
        .await;
    // A lease of 6 s is renewed every 2 s. Retried only as often, the renewals at
    // 2, 4 and 6 s would fail and the lease lapse before the one at 8 s; retried
    // within a second (3, 4, 5 s), it never does.
    let a = a_relay_whose_request_is_answered_after(&mut env, 9, "6s").await;
    // A second relay polls all along, looking for expired leases.
    let b = env.spawn_run(&[]);
    let a_out = both_stopped_once_sent(&env, 1, a, b).await;

    assert!(
        env.db.scalar("SELECT last_value FROM renewals").await >= 4,
        "three renewals refused, then one that went through"
    );
    assert!(
        a_out.stderr.contains("renewing leases failed")
            && a_out.stderr.contains("renewing leases works again"),
        "{a_out}"
    );
    assert!(!a_out.stderr.contains("lease lost"), "{a_out}");
    assert_eq!(
        env.sink.sync_requests().len(),
        1,
        "B took nothing over: A's lease never lapsed"
    );
}

/// A claim that took more than a second (here held up by a lock on the outbox; in
/// the field, most often a plan made with statistics that a vacuum in a quiet
/// moment left saying the outbox is empty) makes the relay refresh the outbox's
/// planner statistics at once, instead of claiming with that plan until
/// autovacuum's next analyze.
#[tokio::test]
async fn a_slow_claim_refreshes_the_outboxs_statistics() {
    let env = TestEnv::migrated().await;
    let relay = env.spawn_run(&[]);
    insert_one(&env).await;
    env.sink.wait_for_entries(1, Duration::from_secs(15)).await;
    let analyzed = || async {
        sqlx::query_scalar::<_, bool>(
            "SELECT last_analyze IS NOT NULL FROM pg_stat_user_tables WHERE relname = 'sync_outbox'",
        )
        .fetch_one(env.db.pg())
        .await
        .expect("pg_stat_user_tables")
    };
    assert!(!analyzed().await, "no manual ANALYZE yet");
    let holder = env.db.hold_lock("sync_outbox").await;
    // the relay polls every 50 ms: its next claim waits for the lock
    tokio::time::sleep(Duration::from_secs(2)).await;
    drop(holder);
    wait_until(Duration::from_secs(15), "ANALYZE sync_outbox", || async {
        analyzed().await
    })
    .await;
    let out = relay.stop_cleanly().await;
    assert!(out.stderr.contains("a claim was slow"), "{out}");
}

/// A burst after a quiet spell on an outbox that a vacuum emptied is claimed at once.
/// An idle relay claims again and again; PostgreSQL then caches a generic plan for
/// the claim, made while the table had no pages: sequential scans, the head-of-key
/// probe one per candidate. The burst was then claimed with that plan, every row
/// probed by a scan of the whole table: 20,000 rows took 30–40 s before their first
/// claim returned (an audit), with nothing to see but the growing age of the oldest
/// row. The relay's sessions plan each statement for the table as it is.
#[tokio::test]
async fn a_burst_after_an_idle_spell_on_an_emptied_outbox_is_claimed_at_once() {
    let env = TestEnv::migrated().await;
    let relay = env.spawn_run(&[]);
    insert_one(&env).await;
    env.sink.wait_for_entries(1, Duration::from_secs(15)).await;
    // emptied, truncated to no pages and analyzed, as autovacuum leaves it
    env.db.execute("VACUUM ANALYZE sync_outbox").await;
    let pages: i64 = env
        .db
        .scalar("SELECT relpages::bigint FROM pg_class WHERE relname = 'sync_outbox'")
        .await;
    assert_eq!(pages, 0, "the vacuum truncated the emptied outbox");
    // idle: a claim every 50 ms, a few dozen on each of the pool's connections
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.db
        .execute(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
             SELECT 'call_log', gen_random_uuid(), '{}' FROM generate_series(1, 20000)",
        )
        .await;
    let inserted = Instant::now();
    env.sink.wait_for_entries(2, Duration::from_secs(30)).await;
    let took = inserted.elapsed();
    let out = relay.stop_cleanly().await;
    assert!(
        took < Duration::from_secs(5),
        "the burst's first rows arrived {took:?} after its commit\n{out}"
    );
}

/// A relay paused (SIGSTOP; a VM or cgroup freeze does the same) for longer than
/// `ingest.timeout` but not a lease, while the sink answers its requests 2xx: on
/// waking, the answers waiting in its sockets are taken, not the timers that ran
/// out meanwhile. It used to see the timeouts first, and send every row of those
/// batches again (seen in an audit: 61 rows twice after a 3 s pause), with no crash
/// and no lease lost (SPEC 3.3).
#[tokio::test]
async fn a_relay_paused_past_its_request_timeout_takes_the_answers_waiting() {
    let mut env = TestEnv::migrated().await;
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_millis(300))));
    env.config
        .set("ingest.timeout", "1s")
        .set("dispatch.batch_size", 10)
        .set("dispatch.lease_duration", "30s");
    let mut ids = Vec::new();
    for _ in 0..200 {
        ids.push(insert_one(&env).await);
    }
    let relay = env.spawn_run(&[]);
    env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
    relay.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(2)).await;
    relay.signal(libc::SIGCONT);
    wait_until(Duration::from_secs(30), "every row settled", || async {
        env.count("sync_outbox").await == 0
    })
    .await;
    let out = relay.stop_cleanly().await;
    let received = by_id(env.sink.entries());
    let twice: Vec<&i64> = ids
        .iter()
        .filter(|id| received.get(id).map_or(0, Vec::len) != 1)
        .collect();
    assert!(twice.is_empty(), "not sent exactly once: {twice:?}\n{out}");
}

/// A relay paused (SIGSTOP) for longer than its lease while it holds batches claimed
/// and not yet sent (claimed ahead, left for its queued workers): another relay takes
/// the rows over and delivers them, and their calls' later rows after them. On
/// waking, the paused relay must not send those batches: they would reach the
/// Frontend a second time, after their keys' later rows (SPEC 3.4). Only the rows of
/// requests already out when it stopped may arrive twice (they were sent).
#[tokio::test]
async fn a_relay_paused_past_its_lease_sends_nothing_it_claimed_before() {
    let mut env = TestEnv::migrated().await;
    let n = 3000;
    seed_adjacent_calls(&env, n, 3).await;
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_millis(400))));
    env.config
        .set("dispatch.lease_duration", "2s")
        .set("dispatch.poll_interval", "50ms")
        .set("dispatch.batch_size", 10)
        .set("ingest.timeout", "30s");
    let a = env.spawn_run(&[]);
    env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
    // its workers claim ahead while their first requests are out
    tokio::time::sleep(Duration::from_millis(300)).await;
    a.signal(libc::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let paused_at = Instant::now();
    let b = env.spawn_run(&[]);
    wait_until(
        Duration::from_secs(60),
        "every row settled by B",
        || async { env.count("sync_outbox").await == 0 },
    )
    .await;
    a.signal(libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let a_out = a.terminate(Duration::from_secs(10)).await;
    a_out.assert_success().assert_no_panic();
    b.stop_cleanly().await;

    let requests = env.sink.sync_requests();
    let mut arrivals: Vec<(u64, Instant, i64)> = Vec::new();
    for request in &requests {
        for entry in request.entries() {
            arrivals.push((request.seq, request.received_at, entry.outbox_id));
        }
    }
    arrivals.sort_by_key(|(seq, _, _)| *seq);
    let mut first_at: std::collections::HashMap<i64, Instant> = Default::default();
    let mut twice_after_the_pause = Vec::new();
    for (_, at, id) in &arrivals {
        match first_at.get(id) {
            Some(first) if *first > paused_at => twice_after_the_pause.push(*id),
            Some(_) => {}
            None => {
                first_at.insert(*id, *at);
            }
        }
    }
    assert_eq!(first_at.len(), n as usize, "every row delivered");
    assert!(
        twice_after_the_pause.is_empty(),
        "{} rows first delivered after A stopped arrived twice, e.g. {:?}\n{a_out}",
        twice_after_the_pause.len(),
        &twice_after_the_pause[..twice_after_the_pause.len().min(10)]
    );
    // a call's rows (ids 3k+1..3k+3) never arrive before an earlier one's last copy
    let mut last_of: std::collections::HashMap<i64, i64> = Default::default();
    for (_, _, id) in &arrivals {
        let call = (id - 1) / 3;
        let latest = last_of.entry(call).or_insert(*id);
        assert!(
            *id >= *latest,
            "row {id} arrived after row {latest} of its call\n{a_out}"
        );
        *latest = *id;
    }
    assert!(
        a_out
            .stderr
            .contains("the lease of their claim ended before their requests could start"),
        "{a_out}"
    );
}

/// Every claim takes 1.3 s in the database (a statement trigger sleeps before its
/// update), longer than the lease (1 s): the database gives each claimed row a whole
/// lease from the claim's end, so the relay delivers them. By its own clock, counted
/// from before the claim was sent, the lease had ended on arrival, and it gave every
/// claim back unsent, for ever; it now confirms such a lease with a renewal of the
/// claim's rows.
#[tokio::test]
async fn claims_slower_than_a_lease_are_still_delivered() {
    let mut env = TestEnv::migrated().await;
    env.db
        .execute(
            "CREATE FUNCTION slow_claims() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN IF current_query() LIKE '%WITH cand AS%' THEN PERFORM pg_sleep(1.3); \
             END IF; RETURN NULL; END $$; \
             CREATE TRIGGER slow_claims BEFORE UPDATE ON sync_outbox \
             FOR EACH STATEMENT EXECUTE FUNCTION slow_claims();",
        )
        .await;
    env.config
        .set("dispatch.lease_duration", "1s")
        .set("dispatch.poll_interval", "50ms");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(insert_one(&env).await);
    }
    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(30), "every row delivered", || async {
        env.count("sync_outbox_sent").await == ids.len() as i64
    })
    .await;
    let out = relay.stop_cleanly().await;
    let received = by_id(env.sink.entries());
    assert!(
        ids.iter()
            .all(|id| received.get(id).map_or(0, Vec::len) == 1),
        "each row once: {received:?}\n{out}"
    );
    assert!(!out.stderr.contains("are not sent"), "{out}");
}
