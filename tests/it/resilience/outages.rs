//! Outages of what the relay depends on: PostgreSQL stopped under a drain, and the
//! sink failing as a whole (5xx on everything, or refusing connections).

use std::time::{Duration, Instant};

use super::support::{
    assert_all_received, by_id, insert_one, seed_calls, someone_listens, tables, MetricsEndpoint,
    TcpSwitch,
};
use crate::harness::pg::PrivatePg;
use crate::harness::relay::Running;
use crate::harness::{wait_until, Incoming, Mode, NewRow, Output, Reply, Sink, TestEnv};

/// `rows` rows of `calls` calls on a PostgreSQL server of the test's own (to stop
/// and start), for a drain of a few seconds: small batches, a sink that answers
/// after `delay`, and a dead server reported after 1 s rather than waited out in
/// the pool.
async fn a_slow_drain_on_a_private_server(
    rows: i64,
    calls: i64,
    delay: Duration,
) -> (PrivatePg, TestEnv) {
    let pg = PrivatePg::start_new().await;
    let mut env = TestEnv::with_db(pg.create_database().await);
    env.migrate().await;
    seed_calls(&env, rows, calls).await;
    env.sink.set_mode(Mode::Reply(Reply::ok().delay(delay)));
    env.config
        .set("dispatch.batch_size", 50)
        .set("database.acquire_timeout", "1s");
    (pg, env)
}

#[tokio::test]
async fn a_drain_rides_out_postgresql_stopping_and_starting_again() {
    let rows = 20_000;
    let (pg, mut env) =
        a_slow_drain_on_a_private_server(rows, 4_000, Duration::from_millis(25)).await;

    // A daemon on a database and a sink of its own, for /readyz and for LISTEN
    // after the restart; it polls only every 5 s and refreshes its gauges hourly, so
    // only /readyz asking the database itself sees the outage and the recovery soon.
    let idle_db = pg.create_database().await;
    let idle_sink = Sink::start();
    let metrics = MetricsEndpoint::enable(&mut env);
    let daemon = env
        .cmd(["run", "--migrate"])
        .args(metrics.flag())
        .args([
            "--database-url",
            &idle_db.url,
            "--ingest-url",
            idle_sink.url(),
        ])
        .env("SERVERSYNC__DISPATCH__POLL_INTERVAL", "5s")
        .env("SERVERSYNC__METRICS__REFRESH_INTERVAL", "1h")
        .spawn();
    metrics
        .wait_for_status("/readyz", 200, Duration::from_secs(15))
        .await;

    let mut drain = env.cmd(["drain"]).spawn();
    env.sink
        .wait_for_entries(2_000, Duration::from_secs(30))
        .await;
    assert!(
        drain.is_running(),
        "the drain must still be running\n{}",
        drain.stderr()
    );
    pg.stop().await;
    let down = Instant::now();
    let stopped_at = env.sink.entries().len();
    metrics
        .wait_for_status("/readyz", 503, Duration::from_secs(3))
        .await;
    // The outage lasts at least 2 s.
    tokio::time::sleep_until((down + Duration::from_secs(2)).into()).await;
    assert!(
        drain.is_running(),
        "the drain gave up on the database\n{}",
        drain.stderr()
    );
    pg.start().await;

    let out = drain.wait(Duration::from_secs(60)).await;
    out.assert_success().assert_no_panic();
    metrics
        .wait_for_status("/readyz", 200, Duration::from_secs(3))
        .await;
    wait_until(
        Duration::from_secs(15),
        "the daemon to LISTEN again",
        || someone_listens(&idle_db.pool),
    )
    .await;
    for round in 0..2 {
        // let the daemon's last look for due rows pass (no outside sign of it)
        tokio::time::sleep(Duration::from_millis(150)).await;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
             VALUES ('call_log', gen_random_uuid(), '{}') RETURNING id",
        )
        .fetch_one(&idle_db.pool)
        .await
        .unwrap();
        let what = format!("round {round}: row {id} notified to the daemon after the restart");
        wait_until(Duration::from_secs(1), &what, || async {
            idle_sink.entries().iter().any(|e| e.outbox_id == id)
        })
        .await;
    }
    daemon.stop_cleanly().await;

    assert!(stopped_at < rows as usize, "PostgreSQL went down mid-drain");
    assert_all_received(&by_id(env.sink.entries()), rows);
    assert_eq!(tables(&env).await, (0, rows, 0), "(pending, sent, dead)");
    let charged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync_outbox_sent WHERE attempts <> 1")
            .fetch_one(env.db.pg())
            .await
            .unwrap();
    assert_eq!(charged, 0, "database errors never cost an attempt");
    eprintln!(
        "PostgreSQL stopped after {stopped_at} of {rows} rows; drain took {:?}",
        out.elapsed
    );
}

/// An idle relay's `serversync_db_up` follows the database both ways within a poll:
/// its empty claims say whether the database answers. It used to stay 0 after the
/// database came back until the next gauge refresh (`metrics.refresh_interval`),
/// while `/readyz`, asking the database itself, already said 200.
#[tokio::test]
async fn an_idle_relays_db_up_follows_the_database_within_a_poll() {
    let pg = PrivatePg::start_new().await;
    let mut env = TestEnv::with_db(pg.create_database().await);
    env.migrate().await;
    let metrics = MetricsEndpoint::enable(&mut env);
    env.config
        .set("dispatch.poll_interval", "200ms")
        .set("metrics.refresh_interval", "1h")
        .set("database.acquire_timeout", "1s");
    let relay = env.spawn_run(metrics.flag().as_slice());
    metrics
        .wait_for_sample("serversync_db_up", 1.0, Duration::from_secs(15))
        .await;
    pg.stop().await;
    metrics
        .wait_for_sample("serversync_db_up", 0.0, Duration::from_secs(10))
        .await;
    pg.start().await;
    metrics
        .wait_for_sample("serversync_db_up", 1.0, Duration::from_secs(5))
        .await;
    relay.stop_cleanly().await;
}

/// A sink that answers 500 to every request while a backlog's batches are out: a
/// batch that fails whole asks the sink with an empty batch before it is searched
/// for an entry that causes the 500, and once that fails too (or the sink is taken
/// as down meanwhile) its parts are not sent: they wait, uncharged, with one row
/// standing for the batch. Each of the 24 batches out used to go on halving down
/// to single rows, every part failing in turn, before any of it counted towards the
/// outage (216 failing requests in an audit, nine seconds before the sink was
/// taken as down with a Frontend slow to fail).
#[tokio::test]
async fn batches_out_stop_searching_for_a_bad_entry_once_the_sink_is_down() {
    let mut env = TestEnv::migrated().await;
    env.sink.set_mode(Mode::Reply(
        Reply::status(500).delay(Duration::from_millis(300)),
    ));
    env.config
        .set("dispatch.probe_interval", "10s")
        .set("dispatch.max_probe_interval", "10s");
    seed_calls(&env, 2_400, 2_400).await;
    let relay = env.spawn_run(&[]);
    wait_until(
        Duration::from_secs(15),
        "the sink taken as down",
        || async { relay.stderr().contains("ingest sink is DOWN") },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let out = relay.stop_cleanly().await;
    let requests = env.sink.sync_requests();
    let parts = requests
        .iter()
        .filter(|r| (2..100).contains(&r.entries().len()))
        .count();
    assert!(
        parts <= 12,
        "{parts} parts of batches were sent after the sink failed them all ({} requests)\n{out}",
        requests.len()
    );
    assert_eq!(env.count("sync_outbox").await, 2_400, "nothing lost");
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);
}

/// A Frontend that fails every request holding more than two entries with a 500
/// (a size limit it breaks on) and takes smaller ones: every row is delivered,
/// none is charged or dead-lettered. The search for a bad entry used to run out of
/// requests on parts of several rows and charge them all, rows never sent alone;
/// retried together, they failed together, and some were dead-lettered (an audit:
/// 6 of 1,000 rows as `http_5xx`).
#[tokio::test]
async fn rows_failing_only_in_large_requests_are_delivered_and_never_charged() {
    let mut env = TestEnv::migrated().await;
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::Sync(req) if req.entries().len() > 2 => Reply::status(500),
        _ => Reply::ok(),
    }));
    env.config.set("retry.max_attempts", 3);
    seed_calls(&env, 300, 300).await;
    env.drain().await.assert_success();
    assert_eq!(tables(&env).await, (0, 300, 0), "(pending, sent, dead)");
    let charged: i64 =
        sqlx::query_scalar("SELECT count(*) FROM sync_outbox_sent WHERE attempts <> 1")
            .fetch_one(env.db.pg())
            .await
            .unwrap();
    assert_eq!(charged, 0, "rows never sent alone were charged");
}

/// Delivery attempts recorded for each delivered row (`attempts` of the sent record
/// counts the successful one too).
async fn sent_attempts(env: &TestEnv) -> Vec<i32> {
    sqlx::query_scalar("SELECT attempts FROM sync_outbox_sent ORDER BY id")
        .fetch_all(env.db.pg())
        .await
        .expect("select sent attempts")
}

/// `n` rows queued for a sink whose connections are refused (the switch is down and
/// `ingest.base_url` points through it).
async fn backlog_behind_a_refusing_sink(env: &mut TestEnv, n: usize) -> TcpSwitch {
    for _ in 0..n {
        insert_one(env).await;
    }
    let mut switch = TcpSwitch::start(env.sink.url());
    switch.down();
    env.config.set("ingest.base_url", switch.url());
    switch
}

/// A drain stopped by a refusing sink (quick probes, an outage from the first
/// failure), the outage recorded, and then the outbox emptied: the sink is still
/// refusing, and recorded as down, with no row to probe it.
async fn an_outage_recorded_then_the_outbox_emptied(env: &mut TestEnv) -> TcpSwitch {
    let switch = backlog_behind_a_refusing_sink(env, 1).await;
    env.config
        .set("dispatch.outage_threshold", 1)
        .set("dispatch.probe_interval", "100ms")
        .set("dispatch.max_probe_interval", "300ms");
    drain_stopped_by_the_outage(env).await;
    assert_eq!(sinks_recorded_down(env).await, 1, "the outage is recorded");
    env.db.execute("DELETE FROM sync_outbox").await;
    switch
}

/// Sinks `sync_outbox_sink_state` records as down.
async fn sinks_recorded_down(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sync_outbox_sink_state WHERE down_since IS NOT NULL")
        .fetch_one(env.db.pg())
        .await
        .expect("sink state")
}

/// Four drains, `pause` apart, through an outage the sink state records: each says
/// it probes first, charges nothing (the most attempts a row has stay at `charged`)
/// and stops; the `n` rows stay pending.
async fn drains_charge_nothing_for_a_recorded_outage(
    env: &TestEnv,
    n: usize,
    pause: Duration,
    charged: i32,
) {
    for round in 0..4 {
        tokio::time::sleep(pause).await;
        let out = drain_stopped_by_the_outage(env).await;
        assert!(
            out.stderr.contains("taken as down by a relay"),
            "drain {round} says why it probes first\n{out}"
        );
        assert_eq!(
            max_pending_attempts(env).await,
            charged,
            "drain {round} charged attempts for a known outage"
        );
    }
    assert_eq!(tables(env).await, (n as i64, 0, 0), "(pending, sent, dead)");
}

/// Once the sink is back: a drain delivers all `n` rows and records the recovery.
async fn a_drain_delivers_everything_and_records_the_recovery(env: &TestEnv, n: usize) {
    env.cmd(["drain"])
        .timeout(Duration::from_secs(30))
        .output()
        .await
        .assert_success();
    assert_eq!(tables(env).await, (0, n as i64, 0), "(pending, sent, dead)");
    assert_eq!(
        sinks_recorded_down(env).await,
        0,
        "the recovery is recorded"
    );
}

/// `serversync drain`, given 20 s to end by itself.
async fn a_drain(env: &TestEnv) -> Output {
    env.cmd(["drain"])
        .timeout(Duration::from_secs(20))
        .output()
        .await
}

/// `serversync drain` against a sink that is down: it must stop by itself, with 3.
async fn drain_stopped_by_the_outage(env: &TestEnv) -> Output {
    let out = a_drain(env).await;
    out.assert_code(3).assert_no_panic();
    assert_eq!(
        out.stderr
            .matches("ingest sink is down: drain stops")
            .count(),
        1,
        "said once, not once per worker\n{out}"
    );
    out
}

async fn max_pending_attempts(env: &TestEnv) -> i32 {
    sqlx::query_scalar("SELECT coalesce(max(attempts), 0) FROM sync_outbox")
        .fetch_one(env.db.pg())
        .await
        .expect("max attempts")
}

#[tokio::test]
async fn a_sink_answering_503_to_everything_costs_rows_no_more_than_the_threshold() {
    an_outage_costs_rows_no_more_than_the_threshold(Mode::Always(503), "503").await;
}

/// A Frontend that answers nothing in time, an empty batch included: an outage like
/// any other, although a batch that times out while the sink answers an empty one
/// is split to find an entry that hangs it (`core/hangs.rs`).
#[tokio::test]
async fn a_sink_hanging_on_everything_costs_rows_no_more_than_the_threshold() {
    let hang = Mode::Reply(Reply::ok().delay(Duration::from_secs(5)));
    an_outage_costs_rows_no_more_than_the_threshold(hang, "hanging").await;
}

/// 300 rows, a sink that fails every request as `outage` says, then answers again.
async fn an_outage_costs_rows_no_more_than_the_threshold(outage: Mode, what: &str) {
    let mut env = TestEnv::migrated().await;
    let threshold = 2;
    let n = 300;
    for _ in 0..n {
        insert_one(&env).await;
    }
    env.sink.set_mode(outage);
    env.config
        .set("ingest.timeout", "300ms")
        .set("dispatch.outage_threshold", threshold)
        // one more than a row can be charged before the sink is taken as down
        .set("retry.max_attempts", threshold + 1)
        .set("dispatch.probe_interval", "100ms")
        .set("dispatch.max_probe_interval", "500ms");
    let metrics = MetricsEndpoint::enable(&mut env);
    let relay = env.spawn_run(&metrics.flag());

    metrics
        .wait_for_sample("serversync_sink_up", 0.0, Duration::from_secs(15))
        .await;
    let down_at = Instant::now();
    // Down for a while: probes keep coming, nothing is charged, nothing dies.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(metrics.sample("serversync_sink_up").await, Some(0.0));
    // (batches claimed before the trip may still arrive just after it)
    let since = down_at + Duration::from_millis(300);
    let probes: Vec<usize> = env
        .sink
        .sync_requests()
        .iter()
        .filter(|r| r.received_at > since)
        .map(|r| r.entries().len())
        .collect();
    // A probe is one batch of at most 10 rows; a failing one is halved a few times
    // (in case one entry makes the sink fail): at most 5 requests per probe.
    assert!(
        (1..=60).contains(&probes.len()),
        "one probe at a time on a 100ms…500ms schedule: {} requests in 2.7s",
        probes.len()
    );
    assert!(
        probes.iter().all(|n| *n <= 10),
        "probes are small batches: {probes:?}"
    );
    let charged = max_pending_attempts(&env).await;
    // at most the failures before the one that takes the sink as down
    assert!(
        charged < threshold,
        "rows were charged {charged} attempts while the sink was down (threshold {threshold})"
    );
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);

    env.sink.set_mode(Mode::Accept);
    env.sink.wait_for_entries(n, Duration::from_secs(15)).await;
    let recovered = down_at.elapsed();
    metrics
        .wait_for_sample("serversync_sink_up", 1.0, Duration::from_secs(5))
        .await;
    wait_until(Duration::from_secs(5), "every row settled", || async {
        env.count("sync_outbox_sent").await == n as i64
    })
    .await;
    relay.stop_cleanly().await;

    assert_eq!(
        tables(&env).await,
        (0, n as i64, 0),
        "(pending, sent, dead)"
    );
    let attempts = sent_attempts(&env).await;
    let worst = attempts.iter().max().copied().unwrap_or(0);
    assert!(
        worst <= threshold,
        "a row was charged {} failed attempts for one outage (threshold {threshold}): {attempts:?}",
        worst - 1
    );
    eprintln!(
        "{what} outage: {} probes in 2.7s, recovered {recovered:?} after the trip",
        probes.len()
    );
}

#[tokio::test]
async fn a_sink_refusing_connections_stops_drain_and_pauses_run_without_charging() {
    let mut env = TestEnv::migrated().await;
    let n = 300;
    let mut switch = backlog_behind_a_refusing_sink(&mut env, n).await;
    env.config
        // Each process charges at most `outage_threshold - 1` (2) failing requests
        // before it takes the sink as down (with 10 ms retries the same rows may be in
        // both); two processes here, so 5 attempts can never be exhausted by the outage.
        .set("retry.max_attempts", 5)
        .set("dispatch.probe_interval", "100ms")
        .set("dispatch.max_probe_interval", "500ms");

    // drain stops as soon as the sink is down, and says so with exit 3.
    let out = drain_stopped_by_the_outage(&env).await;
    assert_eq!(
        env.count("sync_outbox").await,
        n as i64,
        "nothing lost, nothing dead"
    );
    assert!(
        out.stdout.contains("(none charged an attempt), dead 0"),
        "the summary says the retries cost no attempt\n{out}"
    );
    assert_eq!(
        max_pending_attempts(&env).await,
        0,
        "a refused connection is never a row's: no attempt charged"
    );

    let metrics = MetricsEndpoint::enable(&mut env);
    let relay = env.spawn_run(&metrics.flag());
    metrics
        .wait_for_sample("serversync_sink_up", 0.0, Duration::from_secs(15))
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(metrics.sample("serversync_sink_up").await, Some(0.0));
    assert_eq!(
        max_pending_attempts(&env).await,
        0,
        "no attempt charged for the outage, by either process"
    );
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);
    assert_eq!(
        env.sink.request_count(),
        0,
        "nothing got through the switch"
    );

    switch.up();
    env.sink.wait_for_entries(n, Duration::from_secs(15)).await;
    metrics
        .wait_for_sample("serversync_sink_up", 1.0, Duration::from_secs(5))
        .await;
    wait_until(Duration::from_secs(5), "every row settled", || async {
        env.count("sync_outbox_sent").await == n as i64
    })
    .await;
    relay.stop_cleanly().await;
    assert_eq!(
        tables(&env).await,
        (0, n as i64, 0),
        "(pending, sent, dead)"
    );
    assert!(
        sent_attempts(&env).await.iter().all(|a| *a == 1),
        "each row delivered on its first charged attempt"
    );
}

/// A cron `drain` during an outage that sends one batch per run never sees the
/// threshold in one process; it still records the outage when its last request
/// failed, so the next run probes first and charges nothing: a row pays one attempt
/// for the whole outage, not one per run until it is dead.
#[tokio::test]
async fn a_drain_whose_last_request_failed_records_the_outage_below_the_threshold() {
    let mut env = TestEnv::migrated().await;
    let n = 15;
    let mut switch = backlog_behind_a_refusing_sink(&mut env, n).await;
    env.config
        .set("dispatch.outage_threshold", 3)
        .set("retry.max_attempts", 3)
        // retried after the drain has ended, as with a real backoff and cron
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "500ms")
        .set("retry.max_delay", "500ms")
        .set("dispatch.probe_interval", "100ms")
        .set("dispatch.max_probe_interval", "200ms");

    drain_stopped_by_the_outage(&env).await;
    assert_eq!(
        max_pending_attempts(&env).await,
        0,
        "a refused connection is charged nothing"
    );
    assert_eq!(
        sinks_recorded_down(&env).await,
        1,
        "recorded below the threshold"
    );
    // each after the rows' retry delay, as cron would run it
    drains_charge_nothing_for_a_recorded_outage(&env, n, Duration::from_millis(600), 0).await;

    switch.up();
    tokio::time::sleep(Duration::from_millis(600)).await;
    a_drain_delivers_everything_and_records_the_recovery(&env, n).await;
}

/// One row, a sink that answers every request after `hang` (past `ingest.timeout`,
/// `timeout`), and retries an hour apart: one drain sends the row once.
async fn one_row_behind_a_sink_hanging_for(hang: Duration, timeout: &str) -> TestEnv {
    let mut env = TestEnv::migrated().await;
    insert_one(&env).await;
    env.sink.set_mode(Mode::Reply(Reply::ok().delay(hang)));
    env.config
        .set("ingest.timeout", timeout)
        .set("dispatch.outage_threshold", 3)
        .set("retry.max_attempts", 3)
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "1h")
        .set("retry.max_delay", "1h");
    env
}

/// The same with a sink that hangs on every request. One entry can hang a Frontend
/// that answers everything else (`core/hangs.rs`), so a drain whose last request
/// timed out asks the sink with an empty batch before it stops; that hangs too, and
/// the outage is recorded for the next run.
#[tokio::test]
async fn a_drain_whose_last_request_hung_records_the_outage_when_an_empty_batch_hangs_too() {
    let env = one_row_behind_a_sink_hanging_for(Duration::from_secs(5), "300ms").await;

    let out = env.drain().await;
    out.assert_code(3);
    assert!(
        out.stderr.contains("recorded as down"),
        "the drain says it records the outage\n{out}"
    );
    assert_eq!(sinks_recorded_down(&env).await, 1);
    let asked = env
        .sink
        .sync_requests()
        .iter()
        .filter(|r| r.entries().is_empty())
        .count();
    assert_eq!(asked, 1, "one empty batch asked before stopping");
}

/// A signal while a stopping drain asks its empty batch cuts the question short: the
/// drain exits at once instead of waiting up to `ingest.timeout` more, and records
/// the sink as down, as it would have without asking.
#[tokio::test]
async fn a_signal_cuts_short_the_empty_batch_a_stopping_drain_asks() {
    let env = one_row_behind_a_sink_hanging_for(Duration::from_secs(30), "3s").await;
    let drain = env.cmd(["drain"]).spawn();
    // the row's request times out after 3 s; then the empty batch goes out
    wait_until(Duration::from_secs(15), "the empty batch asked", || async {
        env.sink
            .sync_requests()
            .iter()
            .any(|r| r.entries().is_empty())
    })
    .await;
    let asked = Instant::now();
    let out = drain.terminate(Duration::from_secs(10)).await;
    out.assert_code(3).assert_no_panic();
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "the drain waited {:?} for its empty batch after SIGTERM\n{out}",
        asked.elapsed()
    );
    assert_eq!(sinks_recorded_down(&env).await, 1, "{out}");
}

/// An idle daemon follows the sink's state too: with nothing due it probes with an
/// empty batch, so `serversync_sink_up` stays 0 while the sink is down and returns to
/// 1, with the recorded outage cleared, once it answers, without waiting for a row to
/// carry the probe.
#[tokio::test]
async fn an_idle_daemon_sees_the_sink_come_back_without_a_row_to_probe_with() {
    let mut env = TestEnv::migrated().await;
    // the outbox empties (say, the row was dead-lettered by an operator's purge)
    let mut switch = an_outage_recorded_then_the_outbox_emptied(&mut env).await;

    let metrics = MetricsEndpoint::enable(&mut env);
    let relay = env.spawn_run(&metrics.flag());
    metrics
        .wait_for_sample("serversync_sink_up", 0.0, Duration::from_secs(15))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        metrics.sample("serversync_sink_up").await,
        Some(0.0),
        "refused probes keep it down"
    );
    assert_eq!(sinks_recorded_down(&env).await, 1);

    switch.up();
    metrics
        .wait_for_sample("serversync_sink_up", 1.0, Duration::from_secs(5))
        .await;
    wait_until(
        Duration::from_secs(5),
        "the recovery to be recorded",
        || async { sinks_recorded_down(&env).await == 0 },
    )
    .await;
    let probes = env.sink.sync_requests();
    assert!(
        !probes.is_empty() && probes.iter().all(|r| r.entries().is_empty()),
        "the sink saw empty batches only: {} requests",
        probes.len()
    );
    relay.stop_cleanly().await;
}

/// A drain without `--timeout` whose database goes away for good does not run for
/// ever: it waits a lease (at least 10 s), then stops with 1 and says why; nothing
/// is lost, and the next drain, once the database is back, delivers the rest.
#[tokio::test]
async fn a_drain_gives_up_on_a_database_that_stays_away() {
    let rows = 5_000;
    // slow enough that workers claim ahead while their requests are out
    let (pg, mut env) =
        a_slow_drain_on_a_private_server(rows, 1_000, Duration::from_millis(300)).await;
    env.config.set("dispatch.lease_duration", "2s");
    let drain = env.cmd(["drain"]).spawn();
    env.sink.wait_for_entries(50, Duration::from_secs(30)).await;
    pg.stop().await;
    let down = Instant::now();
    let before_outage = env.sink.request_count();

    let out = drain.wait(Duration::from_secs(40)).await;
    out.assert_code(1).assert_no_panic();
    assert_eq!(
        out.stderr
            .matches("the database stayed unreachable")
            .count(),
        1,
        "says why, once\n{out}"
    );
    let waited = down.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(35),
        "waited {waited:?} for the database"
    );
    // batches claimed ahead before the outage are not sent during it
    let during = env.sink.request_count() - before_outage;
    assert!(
        during <= 12,
        "{during} requests went out while the database was down"
    );

    pg.start().await;
    // it says how many rows it left leased: those it was settling, delivering, or
    // had claimed ahead (it used to leave out the last two, saying 1,195 of 1,995).
    // Within one claim's rows (8 batches of 50): a claim cut off as the server
    // stopped can have committed without the relay hearing of it (one run in four
    // or so here), and those rows are leased all the same
    let leased: i64 = env
        .db
        .scalar("SELECT count(*) FROM sync_outbox WHERE claim_token IS NOT NULL")
        .await;
    let said: i64 = out
        .stdout
        .split("left leased ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the summary says how many rows it left leased\n{out}"));
    assert!(
        leased > 0 && (said - leased).abs() <= 400,
        "said {said} rows left leased, {leased} are\n{out}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await; // the leases it held expire
    env.cmd(["drain"])
        .timeout(Duration::from_secs(60))
        .output()
        .await
        .assert_success();
    assert_all_received(&by_id(env.sink.entries()), rows);
    assert_eq!(tables(&env).await, (0, rows, 0), "(pending, sent, dead)");
}

/// A probe whose rows all fail before any request is sent (a missing recording)
/// learnt nothing about the sink: another probe must follow. It used to leave the
/// relay waiting for that probe's answer for ever, delivering nothing more.
#[tokio::test]
async fn a_probe_that_sends_no_request_does_not_stall_the_relay() {
    let mut env = TestEnv::migrated().await;
    let mut switch = an_outage_recorded_then_the_outbox_emptied(&mut env).await;
    // the oldest row, so the first probe's only row: its file is not there
    let call = uuid::Uuid::new_v4();
    let payload = serde_json::json!({"callLogId": call, "filePath": format!("{call}/mixed.wav")});
    env.db
        .execute(&format!(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
             VALUES ('recording_file', '{}', '{payload}')",
            uuid::Uuid::new_v4()
        ))
        .await;
    switch.up();

    let relay = env.spawn_run(&[]);
    wait_until(
        Duration::from_secs(10),
        "the probe to try the file",
        || async { env.outbox().await.iter().any(|r| r.attempts > 0) },
    )
    .await;
    let later = insert_one(&env).await;
    env.sink.wait_for_entries(1, Duration::from_secs(10)).await;
    relay.stop_cleanly().await;
    let delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(delivered, [later]);
}

/// The strict reading of SPEC §3.6 with the defaults' threshold: one row, three
/// attempts allowed, three failures to take the sink as down. Every failure of this
/// row is part of the outage, so none may bring it to the dead letters.
#[tokio::test]
async fn a_sink_outage_never_dead_letters_a_lone_row_with_max_attempts_at_the_threshold() {
    let mut env = TestEnv::migrated().await;
    let (id, _metrics, relay) =
        a_lone_row_behind_an_outage(&mut env, Mode::Always(503), 3, "500ms").await;
    // a few probes
    tokio::time::sleep(Duration::from_secs(1)).await;
    let dead = env.dead_letters().await;
    if !dead.is_empty() {
        let out = relay.terminate(Duration::from_secs(10)).await;
        panic!(
            "row {id} was dead-lettered by a sink outage ({} attempts, {}): the failure that \
             took the sink as down was charged as the row's last attempt\n{out}",
            dead[0].attempts, dead[0].error_type
        );
    }
    env.sink.set_mode(Mode::Accept);
    the_row_delivered(&env, id, relay).await;
}

/// One row, a sink failing as `outage`, `threshold` failures to take it as down and
/// as many attempts allowed, probes from every 100 ms to every `max_probe`: a relay
/// running until the sink is taken as down. Returns the row, the relay's metrics
/// endpoint and the relay.
async fn a_lone_row_behind_an_outage(
    env: &mut TestEnv,
    outage: Mode,
    threshold: u32,
    max_probe: &str,
) -> (i64, MetricsEndpoint, Running) {
    let id = insert_one(env).await;
    env.sink.set_mode(outage);
    env.config
        .set("dispatch.outage_threshold", threshold)
        .set("retry.max_attempts", threshold)
        .set("dispatch.probe_interval", "100ms")
        .set("dispatch.max_probe_interval", max_probe);
    let metrics = MetricsEndpoint::enable(env);
    let relay = env.spawn_run(&metrics.flag());
    metrics
        .wait_for_sample("serversync_sink_up", 0.0, Duration::from_secs(15))
        .await;
    (id, metrics, relay)
}

/// The only row, `id`, reaches the sink and is settled as sent; then the relay stops.
async fn the_row_delivered(env: &TestEnv, id: i64, relay: Running) {
    env.sink.wait_for_entries(1, Duration::from_secs(10)).await;
    wait_until(Duration::from_secs(5), "the row settled", || async {
        env.count("sync_outbox_sent").await == 1
    })
    .await;
    relay.stop_cleanly().await;
    assert_eq!(tables(env).await, (0, 1, 0), "(pending, sent, dead)");
    let ids: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(ids, [id]);
}

/// A Frontend that hangs on everything comes back while a probe's request waits for
/// its answer. The probe times out, and the empty batch asked after it is answered:
/// the row, sent again, goes through, and the sink is up. Before, the row was
/// charged as one the Frontend hangs on, so an outage could cost a row one attempt
/// more than `outage_threshold - 1` (here, with one attempt allowed, its only one).
#[tokio::test]
async fn an_outage_that_ends_during_a_probe_costs_the_probes_row_nothing() {
    let mut env = TestEnv::migrated().await;
    env.config.set("ingest.timeout", "1500ms");
    let hang = Mode::Reply(Reply::ok().delay(Duration::from_secs(10)));
    let (id, metrics, relay) = a_lone_row_behind_an_outage(&mut env, hang, 1, "100ms").await;
    let first_probe = env.sink.sync_requests().len() + 1;
    wait_until(
        Duration::from_secs(10),
        "a probe waiting for its answer",
        || async {
            let requests = env.sink.sync_requests();
            requests.len() >= first_probe
                && requests.last().is_some_and(|r| r.answered_at.is_none())
        },
    )
    .await;
    env.sink.set_mode(Mode::Accept);
    metrics
        .wait_for_sample("serversync_sink_up", 1.0, Duration::from_secs(10))
        .await;
    the_row_delivered(&env, id, relay).await;
}

/// A drain started right after one that stopped on a down sink finds the sink
/// recorded as down and no row due to probe it with (the first drain put them off
/// to its next probe time): the rows are still undelivered, so it says so and exits
/// 3, not 0, and a script looping until a drain succeeds goes on looping. With the
/// outbox empty, there is nothing left to deliver, and it exits 0.
/// A backlog of `n` rows, and a drain stopped by the sink refusing it, with probes a
/// minute apart: the outage is recorded, and the rows it held are due again at once
/// (not at the next probe), uncharged.
async fn a_drain_stopped_by_an_outage_probed_every_minute(
    env: &mut TestEnv,
    n: usize,
) -> TcpSwitch {
    let switch = backlog_behind_a_refusing_sink(env, n).await;
    env.config
        .set("dispatch.outage_threshold", 1)
        .set("dispatch.probe_interval", "1m")
        .set("dispatch.max_probe_interval", "1m");
    drain_stopped_by_the_outage(env).await;
    assert_eq!(sinks_recorded_down(env).await, 1, "the outage is recorded");
    assert_eq!(
        env.count_waiting().await,
        0,
        "the rows the outage held are due"
    );
    assert_eq!(max_pending_attempts(env).await, 0, "nothing charged");
    switch
}

/// The sink is back and an operator runs `drain` at once, well before the next probe
/// the last relay scheduled: it probes, finds the sink answering, and delivers every
/// row, those the outage held included, with exit 0.
#[tokio::test]
async fn a_drain_run_as_soon_as_the_sink_is_back_delivers_every_row() {
    let mut env = TestEnv::migrated().await;
    let n = 3;
    let mut switch = a_drain_stopped_by_an_outage_probed_every_minute(&mut env, n).await;
    switch.up();
    a_drain_delivers_everything_and_records_the_recovery(&env, n).await;
    assert_eq!(
        sent_attempts(&env).await,
        vec![1; n],
        "charged nothing for the outage"
    );
}

/// The outage was a wrong `ingest.base_url`: a drain against the right one, right
/// after, delivers every row (the rows the wrong one held are not left for later).
#[tokio::test]
async fn a_drain_against_the_right_sink_right_after_a_wrong_one_delivers_every_row() {
    let mut env = TestEnv::migrated().await;
    let n = 3;
    let _switch = a_drain_stopped_by_an_outage_probed_every_minute(&mut env, n).await;
    env.config.set("ingest.base_url", env.sink.url());
    a_drain(&env).await.assert_success();
    assert_eq!(
        tables(&env).await,
        (0, n as i64, 0),
        "(pending, sent, dead)"
    );
    assert_eq!(
        sent_attempts(&env).await,
        vec![1; n],
        "charged nothing for the outage"
    );
}

/// A drain that finds the sink recorded as down and no row due to probe it with
/// (they wait for their retries) says so and exits 3, not 0 ("all delivered").
#[tokio::test]
async fn a_drain_finding_a_recorded_outage_and_nothing_due_to_probe_with_exits_3() {
    let mut env = TestEnv::migrated().await;
    let n = 3;
    let _switch = a_drain_stopped_by_an_outage_probed_every_minute(&mut env, n).await;
    env.db
        .execute(&format!(
            "UPDATE sync_outbox SET next_attempt_at = {}",
            env.db.now_plus(3600)
        ))
        .await;
    let charged = max_pending_attempts(&env).await;

    let out = a_drain(&env).await;
    out.assert_code(3).assert_no_panic();
    assert!(
        out.stderr.contains("no row went out to probe it")
            && out.stdout.contains("stopped: the ingest sink is down"),
        "the drain says why it delivered nothing\n{out}"
    );
    assert_eq!(max_pending_attempts(&env).await, charged, "nothing charged");
    assert_eq!(
        tables(&env).await,
        (n as i64, 0, 0),
        "(pending, sent, dead)"
    );

    env.db.execute("DELETE FROM sync_outbox").await;
    let out = a_drain(&env).await;
    out.assert_success();
    assert_eq!(sinks_recorded_down(&env).await, 1, "still recorded as down");
}

/// Cron runs `drain` every few minutes through an outage: only the first drain can
/// charge attempts (it has to see the outage threshold itself); the ones after it
/// find the sink recorded as down, probe it, charge nothing and stop. When the sink
/// is back, a probe finds it answering and the backlog goes.
#[tokio::test]
async fn drains_started_during_an_outage_probe_first_and_charge_nothing() {
    let mut env = TestEnv::migrated().await;
    let n = 250;
    let mut switch = backlog_behind_a_refusing_sink(&mut env, n).await;
    env.config
        .set("retry.max_attempts", 3)
        .set("dispatch.outage_threshold", 3);

    drain_stopped_by_the_outage(&env).await;
    let after_first = max_pending_attempts(&env).await;
    assert!(
        after_first <= 2,
        "the first drain charges below the threshold only: {after_first}"
    );
    assert_eq!(
        sinks_recorded_down(&env).await,
        1,
        "the outage is recorded for the next relay"
    );

    drains_charge_nothing_for_a_recorded_outage(&env, n, Duration::ZERO, after_first).await;

    switch.up();
    // the last probe's rows are due again at once: the next drain delivers them all
    a_drain_delivers_everything_and_records_the_recovery(&env, n).await;
}

/// A claim lost in a crash of PostgreSQL itself (a claim's commit does not wait for
/// the WAL flush) gives its rows out again while the relay's request for them is
/// still out. The relay that claims them again waits for that request to end before
/// sending them again: no row, and so no key, is ever in flight twice at once.
/// Before, the same rows went out again at once, overlapping the first request.
#[tokio::test]
async fn rows_whose_claim_a_database_crash_lost_are_not_sent_twice_at_once() {
    let pg = PrivatePg::start_new().await;
    let mut env = TestEnv::with_db(pg.create_database().await);
    env.migrate().await;
    // the claim's commit stays in the server's WAL buffers until the crash
    env.db
        .execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        .await;
    env.db.execute("SELECT pg_reload_conf()").await;
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(3))));
    env.config
        .set("ingest.timeout", "10s")
        .set("database.acquire_timeout", "1s");
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(insert_one(&env).await);
    }
    let relay = env.spawn_run(&[]);
    env.sink.wait_for_requests(1, Duration::from_secs(15)).await;
    pg.crash().await;
    pg.start().await;
    wait_until(Duration::from_secs(40), "every row settled", || async {
        let sent = env.sent_ids().await;
        ids.iter().all(|id| sent.contains(id))
    })
    .await;
    let requests = env.sink.sync_requests();
    let carrying = |id: i64| -> Vec<_> {
        requests
            .iter()
            .filter(|r| r.entries().iter().any(|e| e.outbox_id == id))
            .collect()
    };
    assert!(
        ids.iter().all(|id| carrying(*id).len() >= 2),
        "the crash lost the claim: every row went out again\n{requests:#?}"
    );
    for id in &ids {
        let out = carrying(*id);
        for pair in out.windows(2) {
            let answered = pair[0].answered_at.expect("the first request was answered");
            assert!(
                pair[1].received_at >= answered,
                "row {id} was out twice at once\n{out:#?}"
            );
        }
    }
    relay.stop_cleanly().await;
}

/// A batch is answered 2xx, and its settle fails on the database and is retried
/// (here a serialization failure injected by a trigger; an outage does the same),
/// while its leases cannot be renewed and run out. A claim made meanwhile took the
/// relay's own rows again, and once the settle got through it found their lease
/// lost, and the rows went out a second time: seen in an audit, after an outage
/// longer than the lease, for every row answered during it. Claims now wait for the
/// settles retrying on the database: each row is sent once.
#[tokio::test]
async fn rows_whose_settle_retries_on_the_database_are_not_claimed_again() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("dispatch.lease_duration", "1s")
        .set("dispatch.poll_interval", "100ms");
    env.db
        .execute(
            "CREATE TABLE injected_failures (on_ boolean);
             INSERT INTO injected_failures VALUES (true);
             CREATE FUNCTION injected_failure() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF EXISTS (SELECT 1 FROM injected_failures) THEN
                     RAISE EXCEPTION 'injected failure' USING ERRCODE = '40001';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER failing_archive BEFORE INSERT ON sync_outbox_sent
                 FOR EACH ROW EXECUTE FUNCTION injected_failure();
             CREATE TRIGGER failing_renewal BEFORE UPDATE ON sync_outbox FOR EACH ROW
                 WHEN (OLD.claim_token IS NOT DISTINCT FROM NEW.claim_token
                       AND OLD.lease_until IS DISTINCT FROM NEW.lease_until)
                 EXECUTE FUNCTION injected_failure();",
        )
        .await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(insert_one(&env).await);
    }
    let relay = env.spawn_run(&[]);
    env.sink.wait_for_entries(20, Duration::from_secs(15)).await;
    // the settle retries; the leases run out; idle workers poll
    tokio::time::sleep(Duration::from_secs(3)).await;
    env.db.execute("DELETE FROM injected_failures").await;
    wait_until(Duration::from_secs(30), "every row settled", || async {
        let sent = env.sent_ids().await;
        ids.iter().all(|id| sent.contains(id))
    })
    .await;
    let out = relay.stop_cleanly().await;
    let received: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    for id in &ids {
        assert_eq!(
            received.iter().filter(|r| *r == id).count(),
            1,
            "row {id} sent once: {received:?}\n{}",
            out.stderr
        );
    }
    assert!(
        out.stderr
            .contains("claims wait for the settles retrying on the database")
            && !out.stderr.contains("claimed again"),
        "{}",
        out.stderr
    );
}

/// Another relay has recorded the sink as down while this one, running, still
/// takes it as up (it had nothing to send): its first failures are the outage's,
/// and it charges none of them; it takes the sink as down too and probes. Each
/// relay used to charge up to `outage_threshold - 1` failures of its own before it
/// found the outage itself, so with several relays a row could use up its attempts
/// in one outage (seen in an audit with three relays and `max_attempts = 4`).
#[tokio::test]
async fn a_relay_charges_nothing_for_an_outage_another_relay_recorded() {
    let mut env = TestEnv::migrated().await;
    env.sink.set_mode(Mode::Reply(Reply::status(503)));
    env.config
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "100ms")
        .set("retry.max_delay", "100ms")
        .set("dispatch.outage_threshold", 1)
        .set("dispatch.probe_interval", "200ms")
        .set("dispatch.max_probe_interval", "400ms");
    // a drain records the outage, which gives the sink's name as recorded
    insert_one(&env).await;
    env.drain().await.assert_code(3);
    assert_eq!(sinks_recorded_down(&env).await, 1);
    env.db.execute("DELETE FROM sync_outbox").await;
    // the sink came back, as far as the table knows; a relay starts and sees it up
    env.db
        .execute("UPDATE sync_outbox_sink_state SET down_since = NULL")
        .await;
    env.config.set("dispatch.outage_threshold", 3);
    let relay = env.spawn_run(&[]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // another relay takes it as down
    env.db
        .execute("UPDATE sync_outbox_sink_state SET down_since = now()")
        .await;
    // in one statement, so that they fail in one request: requests failing at once
    // can reach the outage threshold before the recorded state has been read (none
    // charged all the same, but taken as down by this relay's own count)
    let rows: Vec<NewRow> = (0..5)
        .map(|_| {
            let id = uuid::Uuid::new_v4();
            NewRow::new(
                "call_log",
                id,
                serde_json::json!({"id": id, "answered": true}),
            )
        })
        .collect();
    env.insert_rows(&rows).await;
    env.sink.wait_for_requests(2, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    let charged: Vec<(i64, i32)> = env
        .outbox()
        .await
        .iter()
        .filter(|r| r.attempts > 0)
        .map(|r| (r.id, r.attempts))
        .collect();
    assert!(
        charged.is_empty(),
        "charged for the outage another relay recorded: {charged:?}\n{out}"
    );
    assert!(
        out.stderr.contains("as another relay found"),
        "{}",
        out.stderr
    );
}

/// One settle that keeps failing while the database answers (a row it cannot
/// archive: here a trigger refusing one entity with a serialization failure) holds
/// its own worker, retrying, but no other claim: lease renewals go through, so its
/// rows keep their leases and no claim can take them again. (The first form of the
/// wait for settles retrying stopped every claim of the relay for as long as that
/// settle failed, the relay looking healthy meanwhile; audit.)
#[tokio::test]
async fn a_settle_failing_while_the_database_answers_holds_no_other_claim() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("dispatch.lease_duration", "3s")
        .set("dispatch.poll_interval", "100ms");
    let poison = uuid::Uuid::new_v4();
    env.db
        .execute(&format!(
            "CREATE FUNCTION refuse_archive() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF NEW.entity_id = '{poison}' THEN
                     RAISE EXCEPTION 'injected failure' USING ERRCODE = '40001';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refusing_archive BEFORE INSERT ON sync_outbox_sent
                 FOR EACH ROW EXECUTE FUNCTION refuse_archive();"
        ))
        .await;
    env.insert("call_log", poison, serde_json::json!({"n": 0}))
        .await;
    let relay = env.spawn_run(&[]);
    env.sink.wait_for_entries(1, Duration::from_secs(15)).await;
    // its settle retries; a lease renewal goes through meanwhile
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(insert_one(&env).await);
    }
    wait_until(
        Duration::from_secs(10),
        "the other rows delivered",
        || async {
            let sent = env.sent_ids().await;
            ids.iter().all(|id| sent.contains(id))
        },
    )
    .await;
    env.db
        .execute("DROP TRIGGER refusing_archive ON sync_outbox_sent")
        .await;
    wait_until(
        Duration::from_secs(20),
        "the poison row settled",
        || async { env.count("sync_outbox").await == 0 },
    )
    .await;
    let out = relay.stop_cleanly().await;
    let received = by_id(env.sink.entries());
    assert!(
        received.values().all(|e| e.len() == 1),
        "each row sent once: {received:?}\n{out}"
    );
}

/// A record of the sink as down that is older than this relay's last answer from
/// it is stale (a relay that stopped while the sink was down leaves one): a row the
/// Frontend fails on is charged as usual, and the relay does not pause. (It read
/// any record as another relay's outage, and one bad row's 500 paused it, its
/// `serversync_sink_up` 0, for as long as that row was all it had to send; audit.)
#[tokio::test]
async fn a_stale_record_of_the_sink_as_down_does_not_pause_a_relay() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "100ms")
        .set("retry.max_delay", "100ms")
        .set("retry.max_attempts", 3)
        .set("dispatch.outage_threshold", 1);
    // a drain records the outage, naming the sink as relays do; it is an hour old
    env.sink.set_mode(Mode::Reply(Reply::status(503)));
    insert_one(&env).await;
    env.drain().await.assert_code(3);
    assert_eq!(sinks_recorded_down(&env).await, 1);
    env.db.execute("DELETE FROM sync_outbox").await;
    env.config.set("dispatch.outage_threshold", 5);
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        crate::harness::Incoming::Sync(req)
            if req.entries().iter().any(|e| e.payload["crash"] == true) =>
        {
            Reply::status(500)
        }
        _ => Reply::ok(),
    }));
    let relay = env.spawn_run(&[]);
    let fine = insert_one(&env).await;
    env.sink.wait_for_entries(1, Duration::from_secs(15)).await;
    // the sink answered this relay, which recorded it as up; then the record says
    // down, since an hour ago
    wait_until(
        Duration::from_secs(5),
        "the sink recorded as up",
        || async { sinks_recorded_down(&env).await == 0 },
    )
    .await;
    env.db
        .execute("UPDATE sync_outbox_sink_state SET down_since = now() - interval '1 hour'")
        .await;
    let poison = env
        .insert(
            "call_log",
            uuid::Uuid::new_v4(),
            serde_json::json!({"crash": true}),
        )
        .await;
    wait_until(Duration::from_secs(15), "the poison row dead", || async {
        env.count("sync_outbox_dead_letters").await == 1
    })
    .await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    assert!(env.sent_ids().await.contains(&fine));
    assert!(
        !out.stderr.contains("as another relay found"),
        "one row's 500 paused the relay on a stale record (row {poison})\n{}",
        out.stderr
    );
}
