//! Operations: the metrics and health endpoints, systemd readiness and watchdog
//! against a real notify socket, JSON logs, and the zero-setup demo.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::harness::{both_stores, serversync, wait_until, Backend, TestEnv};

async fn http_get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => {
            let status = r.status().as_u16();
            (status, r.text().await.unwrap_or_default())
        }
        Err(_) => (0, String::new()),
    }
}

#[tokio::test]
async fn metrics_health_and_readiness_follow_the_spec() {
    let mut env = TestEnv::migrated().await;
    let port = crate::harness::free_port();
    env.config
        .set("metrics.enabled", true)
        .set("metrics.listen", format!("127.0.0.1:{port}"))
        .set("metrics.refresh_interval", "100ms");
    // several rows per entity type and outcome: counters add up across a batch
    for n in 1..=3 {
        env.insert("call_log", Uuid::new_v4(), json!({"n": n}))
            .await;
    }
    for _ in 0..2 {
        let call = Uuid::new_v4();
        env.insert("recording", Uuid::new_v4(), json!({"callLogId": call}))
            .await;
        let bad = Uuid::new_v4();
        env.insert(
            "recording_file",
            bad,
            json!({"callLogId": bad, "filePath": "../outside.wav"}),
        )
        .await;
    }
    // the call logs were committed a minute ago: their lag counts from created_at
    env.db
        .execute(
            "UPDATE sync_outbox SET created_at = now() - interval '60 seconds' \
             WHERE entity_type = 'call_log'",
        )
        .await;
    let relay = env.cmd(["run"]).spawn();
    let base = format!("http://127.0.0.1:{port}");
    env.sink.wait_for_entries(1, Duration::from_secs(20)).await;
    // A refresh may fall between the sink's answer and the settle: wait for one after.
    wait_until(
        Duration::from_secs(20),
        "metrics to show the settled backlog",
        || async {
            let text = http_get(&format!("{base}/metrics")).await.1;
            text.contains("serversync_dead_letters{error_type=\"path_denied\"} 2")
                && text.contains("serversync_outbox_pending{entity_type=\"call_log\"} 0")
                && text.contains("serversync_outbox_pending{entity_type=\"recording_file\"} 0")
        },
    )
    .await;
    let (status, text) = http_get(&format!("{base}/metrics")).await;
    assert_eq!(status, 200);
    for (name, kind) in [
        ("serversync_outbox_pending", "gauge"),
        ("serversync_outbox_oldest_pending_age_seconds", "gauge"),
        ("serversync_dead_letters", "gauge"),
        ("serversync_deliveries_total", "counter"),
        ("serversync_delivery_errors_total", "counter"),
        ("serversync_http_request_duration_seconds", "histogram"),
        ("serversync_delivery_lag_seconds", "histogram"),
        ("serversync_batch_size", "histogram"),
        ("serversync_sink_up", "gauge"),
        ("serversync_upload_up", "gauge"),
        ("serversync_lease_lost_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
    ] {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "missing {name} {kind} in:\n{text}"
        );
    }
    for line in [
        "serversync_deliveries_total{entity_type=\"call_log\",outcome=\"sent\"} 3",
        "serversync_deliveries_total{entity_type=\"recording\",outcome=\"sent\"} 2",
        "serversync_deliveries_total{entity_type=\"recording_file\",outcome=\"dead\"} 2",
        "serversync_delivery_errors_total{error_type=\"path_denied\"} 2",
        "serversync_outbox_pending{entity_type=\"call_log\"} 0",
        "serversync_sink_up 1",
        "serversync_upload_up 1",
        "serversync_delivery_lag_seconds_count 5",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    let lag_sum: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("serversync_delivery_lag_seconds_sum "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no lag sum in:\n{text}"));
    assert!(
        (180.0..180.0 + 5.0 * 30.0).contains(&lag_sum),
        "three rows a minute old and two new: lag sum {lag_sum}"
    );
    assert!(text.contains("serversync_http_request_duration_seconds_bucket{endpoint=\"sync\""));
    assert!(
        text.contains("serversync_delivery_lag_seconds_bucket{le=\"0.001\"}"),
        "lag buckets start at 1 ms"
    );
    assert!(
        text.contains("serversync_delivery_lag_seconds_bucket{le=\"3600\"}"),
        "lag buckets reach an hour"
    );
    assert_eq!(http_get(&format!("{base}/healthz")).await.0, 200);
    assert_eq!(http_get(&format!("{base}/readyz")).await.0, 200);
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    assert!(
        !out.stderr.contains("outside.wav") && !out.stderr.contains("callLogId"),
        "no payloads in logs:\n{}",
        out.stderr
    );
}

/// A systemd notify socket in `env`'s work directory (its path, for NOTIFY_SOCKET),
/// read with a short timeout.
fn notify_socket(env: &TestEnv) -> (std::path::PathBuf, UnixDatagram) {
    let path = env.work_dir().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(100)))
        .expect("timeout");
    (path, socket)
}

/// Messages received on a notify socket, until `want` appears or the deadline.
fn await_notify(socket: &UnixDatagram, want: &str, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let found = msg.lines().any(|l| l == want);
            seen.push(msg);
            if found {
                return seen;
            }
        }
    }
    panic!("no {want} on the notify socket within {timeout:?}; got {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_readiness_watchdog_and_stopping_reach_a_real_notify_socket() {
    let env = TestEnv::migrated().await;
    let (path, socket) = notify_socket(&env);
    let relay = env
        .cmd(["run"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "400000")
        .spawn();
    let seen =
        tokio::task::block_in_place(|| await_notify(&socket, "READY=1", Duration::from_secs(20)));
    assert!(
        seen.iter().all(|m| !m.contains("WATCHDOG=1")),
        "readiness comes first: {seen:?}"
    );
    tokio::task::block_in_place(|| await_notify(&socket, "WATCHDOG=1", Duration::from_secs(5)));
    tokio::task::block_in_place(|| await_notify(&socket, "WATCHDOG=1", Duration::from_secs(5)));
    relay.signal(libc::SIGTERM);
    tokio::task::block_in_place(|| await_notify(&socket, "STOPPING=1", Duration::from_secs(10)));
    relay.wait(Duration::from_secs(10)).await.assert_success();
}

/// An idle relay waits `dispatch.poll_interval` between looks at the outbox; a wait
/// longer than the watchdog's interval is the loop alive, not stuck, and the pings
/// go on (they used to stop, and systemd restarted an idle relay that polled slowly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_interval_longer_than_the_watchdog_keeps_it_fed() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("dispatch.poll_interval", "10s")
        .set("dispatch.listen", false);
    let (path, socket) = notify_socket(&env);
    let relay = env
        .cmd(["run"])
        .env("NOTIFY_SOCKET", &path)
        .env("WATCHDOG_USEC", "2000000")
        .spawn();
    tokio::task::block_in_place(|| await_notify(&socket, "READY=1", Duration::from_secs(20)));
    // 5 s idle, past two watchdog intervals: a ping every second all along
    let mut pings = 0;
    let until = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 4096];
    while Instant::now() < until {
        if let Ok(n) = socket.recv(&mut buf) {
            if String::from_utf8_lossy(&buf[..n])
                .lines()
                .any(|l| l == "WATCHDOG=1")
            {
                pings += 1;
            }
        }
    }
    let out = relay.terminate(Duration::from_secs(15)).await;
    out.assert_success();
    assert!(
        !out.stderr.contains("withholding the watchdog ping"),
        "an idle relay is not a stuck one\n{out}"
    );
    assert!(pings >= 4, "{pings} pings in 5 s\n{out}");
}

#[tokio::test]
async fn readiness_is_not_sent_for_an_outdated_schema() {
    let env = TestEnv::new().await; // no migrations
    let (path, socket) = notify_socket(&env);
    let out = env.cmd(["run"]).env("NOTIFY_SOCKET", &path).output().await;
    out.assert_code(1).assert_fails_with("serversync migrate");
    let mut buf = [0u8; 1024];
    let got = socket
        .recv(&mut buf)
        .ok()
        .map(|n| String::from_utf8_lossy(&buf[..n]).to_string());
    assert!(
        !got.unwrap_or_default().contains("READY=1"),
        "READY=1 sent for an unusable database"
    );
}

/// Under `--log-format json` every line on stderr is a JSON object, the closing
/// error of a command that fails included (it used to be a plain `error: …` line).
#[tokio::test]
async fn json_logs_are_json_down_to_the_closing_error() {
    let mut env = TestEnv::migrated().await;
    env.config.set("dispatch.batch_size", 0);
    // a bad configuration, a bad argument, a bad log level, no command at all
    for (args, says) in [
        (
            &["--log-format", "json", "status"][..],
            "dispatch.batch_size",
        ),
        (
            &["--log-format", "json", "--concurrency", "many", "status"][..],
            "--concurrency",
        ),
        (
            &["--log-format=json", "--log-level", "loud", "status"][..],
            "--log-level",
        ),
        (&["--log-format", "json"][..], "a command is required"),
    ] {
        let out = env.run(args).await;
        out.assert_code(1).assert_no_panic();
        let events: Vec<serde_json::Value> = out
            .stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert_eq!(events.len(), 1, "{out}");
        assert_eq!(events[0]["level"], "ERROR", "{out}");
        let message = events[0]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{out}");
    }
}

both_stores!(json_logs_carry_ids_and_error_types_but_no_payload);
async fn json_logs_carry_ids_and_error_types_but_no_payload(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    env.sink.set_mode(crate::harness::Mode::Always(404));
    let id = env
        .insert(
            "call_log",
            Uuid::new_v4(),
            json!({"secretMarker": "PAYLOAD-MARKER-7731"}),
        )
        .await;
    let out = env.run(&["--log-format", "json", "drain"]).await;
    out.assert_code(3);
    assert!(
        !out.stderr.contains("PAYLOAD-MARKER-7731"),
        "payload in logs:\n{}",
        out.stderr
    );
    let events: Vec<serde_json::Value> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let dead = events
        .iter()
        .find(|e| e["outbox_id"] == json!(id))
        .unwrap_or_else(|| panic!("no event for outbox id {id}: {events:?}"));
    assert_eq!(dead["entity_type"], "call_log");
    assert_eq!(dead["error_type"], "http_4xx");
    assert_eq!(dead["attempt"], 1);
    assert_eq!(dead["level"], "WARN");
    // not a terminal: a plain one-line summary on stdout
    assert!(
        out.stdout.contains("drain: delivered 0, retried 0, dead 1"),
        "{}",
        out.stdout
    );
}

#[tokio::test]
async fn the_demo_runs_with_no_configuration_at_all() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = serversync()
        .arg("demo")
        .current_dir(dir.path())
        .env("TMPDIR", dir.path())
        .timeout(Duration::from_secs(120))
        .output()
        .await;
    out.assert_success().assert_no_panic();
    assert!(
        out.stdout.contains("delivered 9 rows; 1 dead letter(s)"),
        "{}",
        out.stdout
    );
    assert!(out.stdout.contains("path_denied"), "{}", out.stdout);
    // cleaned up without --keep
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .expect("read dir")
        .filter_map(Result::ok)
        .collect();
    assert!(left.is_empty(), "demo left files behind: {left:?}");
}

/// Every series SPEC §7 names is scraped from the start, at zero (labelled series for
/// each entity type, outcome, error type and endpoint), before anything is delivered:
/// dashboards and alerts on rates have a series to read from the first scrape.
#[tokio::test]
async fn every_spec_series_is_in_the_first_scrape_at_zero() {
    let mut env = TestEnv::migrated().await;
    let metrics = crate::harness::MetricsEndpoint::enable(&mut env);
    let relay = env.cmd(["run"]).args(metrics.flag()).spawn();
    metrics
        .wait_for_status("/readyz", 200, Duration::from_secs(20))
        .await;
    // the backlog gauges come with the first count of the outbox
    metrics
        .wait_for_sample(
            "serversync_dead_letters{error_type=\"connect\"}",
            0.0,
            Duration::from_secs(20),
        )
        .await;
    let (_, text) = metrics.get("/metrics").await.expect("a scrape");
    for line in [
        "serversync_deliveries_total{entity_type=\"call_log\",outcome=\"sent\"} 0",
        "serversync_deliveries_total{entity_type=\"recording_file\",outcome=\"dead\"} 0",
        "serversync_delivery_errors_total{error_type=\"http_5xx\"} 0",
        "serversync_delivery_errors_total{error_type=\"unknown_entity_type\"} 0",
        "serversync_http_request_duration_seconds_count{endpoint=\"sync\"} 0",
        "serversync_http_request_duration_seconds_count{endpoint=\"recording_file\"} 0",
        "serversync_dead_letters{error_type=\"connect\"} 0",
        "serversync_delivery_lag_seconds_count 0",
        "serversync_batch_size_count 0",
        "serversync_sink_up 1",
    ] {
        assert!(text.contains(line), "missing `{line}` in:\n{text}");
    }
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();
}

/// A scrape shows the outbox as it is: the backlog gauges are counted when scraped
/// (at most once a second), not only every `metrics.refresh_interval` (here an hour).
#[tokio::test]
async fn a_scrape_shows_the_backlog_as_it_is_now() {
    let mut env = TestEnv::migrated().await;
    let metrics = crate::harness::MetricsEndpoint::enable(&mut env);
    env.config.set("metrics.refresh_interval", "1h");
    let relay = env.cmd(["run"]).args(metrics.flag()).spawn();
    metrics
        .wait_for_sample(
            "serversync_outbox_pending{entity_type=\"call_log\"}",
            0.0,
            Duration::from_secs(20),
        )
        .await;
    // not due for an hour: the relay leaves them, and they stay pending
    env.db
        .execute(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload, next_attempt_at) \
             SELECT 'call_log', gen_random_uuid(), '{}', now() + interval '1 hour' \
             FROM generate_series(1, 3)",
        )
        .await;
    metrics
        .wait_for_sample(
            "serversync_outbox_pending{entity_type=\"call_log\"}",
            3.0,
            Duration::from_secs(5),
        )
        .await;
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();
}

/// Past `metrics.backlog_exact_rows` pending rows a refresh counts only that many (by
/// entity type) and scales them to the table's live-row statistics: the gauges stay
/// right in proportion and total without scanning a huge backlog every refresh.
#[tokio::test]
async fn past_backlog_exact_rows_the_pending_gauges_are_estimated() {
    let mut env = TestEnv::migrated().await;
    let metrics = crate::harness::MetricsEndpoint::enable(&mut env);
    env.config
        .set("metrics.backlog_exact_rows", 30)
        // nothing can be delivered: every row stays pending
        .set(
            "ingest.base_url",
            format!("http://127.0.0.1:{}", crate::harness::closed_port()),
        );
    // 60 call_logs and 30 recordings, interleaved two to one
    sqlx::query(
        "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
         SELECT CASE WHEN g % 3 = 2 THEN 'recording' ELSE 'call_log' END, gen_random_uuid(), \
                jsonb_build_object('n', g) \
         FROM generate_series(0, 89) AS g",
    )
    .execute(env.db.pg())
    .await
    .unwrap();
    // the live-row statistic the estimate scales to
    sqlx::query("ANALYZE sync_outbox")
        .execute(env.db.pg())
        .await
        .unwrap();
    let relay = env.cmd(["run"]).args(metrics.flag()).spawn();
    let gauge = |t: &str| format!("serversync_outbox_pending{{entity_type=\"{t}\"}}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let estimated = loop {
        let c = metrics.sample(&gauge("call_log")).await;
        let r = metrics.sample(&gauge("recording")).await;
        if let (Some(c), Some(r)) = (c, r) {
            if c + r > 30.0 {
                break (c, r);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no estimate above the exact count: {c:?} call_log, {r:?} recording"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();
    // which 30 rows a LIMIT reads depends on where claims left row versions: the
    // total is the live-row count, the split follows the rows read
    let (c, r) = estimated;
    assert!(
        (c + r - 90.0).abs() <= 1.0,
        "estimated {c} + {r}, expected 90 in all"
    );
    assert!(
        c > r && r > 0.0,
        "the split follows the counted rows (two call_logs to one recording): {c} / {r}"
    );
    let pending: i64 = sqlx::query_scalar("SELECT count(*) FROM sync_outbox")
        .fetch_one(env.db.pg())
        .await
        .unwrap();
    assert_eq!(pending, 90, "nothing was delivered or lost meanwhile");
}

/// `/readyz` follows the schema while the daemon runs, not only at start: a
/// migration that is rolled back (here: its record removed) makes it 503 until the
/// schema is current again.
#[tokio::test]
async fn readiness_follows_the_schema_while_running() {
    let mut env = TestEnv::migrated().await;
    env.config.set("metrics.refresh_interval", "200ms");
    let metrics = crate::harness::MetricsEndpoint::enable(&mut env);
    let relay = env.spawn_run(&metrics.flag());
    metrics
        .wait_for_status("/readyz", 200, Duration::from_secs(15))
        .await;
    let pool = env.db.pg();
    let newest: i64 = sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations")
        .fetch_one(pool)
        .await
        .expect("newest migration");
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(newest)
        .execute(pool)
        .await
        .expect("forget the newest migration");
    metrics
        .wait_for_status("/readyz", 503, Duration::from_secs(10))
        .await;
    env.run(&["migrate"]).await.assert_success();
    metrics
        .wait_for_status("/readyz", 200, Duration::from_secs(10))
        .await;
    relay.stop_cleanly().await;
}

/// A database re-created empty under a running daemon (dropped and created again,
/// restored without the relay's tables): `/readyz` says 503 "schema not current" and
/// the log says to migrate. The failing gauge query used to leave it 200, and the
/// relay silent. Once migrated, it is ready again and delivers.
#[tokio::test]
async fn readiness_follows_a_database_recreated_without_the_tables() {
    let mut env = TestEnv::migrated().await;
    let metrics = crate::harness::MetricsEndpoint::enable(&mut env);
    let relay = env.spawn_run(&metrics.flag());
    metrics
        .wait_for_status("/readyz", 200, Duration::from_secs(15))
        .await;
    env.db
        .execute(
            "DROP TABLE sync_outbox, sync_outbox_sent, sync_outbox_dead_letters, \
             sync_outbox_ordering_rules, sync_outbox_sink_state, \
             _sqlx_migrations CASCADE",
        )
        .await;
    metrics
        .wait_for_status("/readyz", 503, Duration::from_secs(10))
        .await;
    let (_, body) = metrics.get("/readyz").await.unwrap_or_default();
    assert_eq!(body.trim(), "schema not current");
    env.run(&["migrate"]).await.assert_success();
    metrics
        .wait_for_status("/readyz", 200, Duration::from_secs(10))
        .await;
    let id = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.sink.wait_for_entries(1, Duration::from_secs(15)).await;
    assert_eq!(env.sink.entries()[0].outbox_id, id);
    let out = relay.terminate(Duration::from_secs(15)).await;
    out.assert_success();
    assert!(
        out.stderr.contains("run `serversync migrate`"),
        "the log says what to do\n{out}"
    );
}

/// `metrics.listen = "localhost:PORT"` serves on 127.0.0.1; a host name that would
/// need DNS is refused at start-up by key, with nothing delivered or lost.
#[tokio::test]
async fn metrics_listen_takes_localhost_and_refuses_other_names_by_key() {
    let mut env = TestEnv::migrated().await;
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.config
        .set("metrics.enabled", true)
        .set("metrics.listen", "metrics.example:9464");
    env.run(&["drain"])
        .await
        .assert_fails_with("metrics.listen")
        .assert_single_stderr_line();
    assert_eq!(
        env.outbox().await.len(),
        1,
        "the row waits for a relay that starts"
    );

    let port = crate::harness::free_port();
    env.config
        .set("metrics.listen", format!("localhost:{port}"));
    let relay = env.cmd(["run"]).spawn();
    wait_until(Duration::from_secs(20), "/healthz on 127.0.0.1", || async {
        http_get(&format!("http://127.0.0.1:{port}/healthz"))
            .await
            .0
            == 200
    })
    .await;
    env.sink.wait_for_entries(1, Duration::from_secs(20)).await;
    relay
        .terminate(Duration::from_secs(15))
        .await
        .assert_success();
}

/// Under systemd (stderr is the journal's stream, named by `JOURNAL_STREAM`) each log
/// line starts with its syslog priority, which the journal keeps as the line's level
/// (`journalctl -p warning` finds the relay's warnings and errors) and strips from the
/// text; anywhere else lines are as they were.
#[tokio::test]
async fn under_the_journal_each_log_line_carries_its_priority() {
    let mut env = TestEnv::migrated_on(crate::harness::Backend::Sqlite).await;
    env.config.set(
        "ingest.base_url",
        format!("http://127.0.0.1:{}", crate::harness::closed_port()),
    );
    env.insert(
        "call_log",
        uuid::Uuid::new_v4(),
        serde_json::json!({"n": 1}),
    )
    .await;
    let config = env.write_config();
    for format in ["pretty", "json"] {
        // the journal's stream here is the pipe the test reads: name it as systemd does
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(r#"JOURNAL_STREAM=$(stat -L -c %d:%i /dev/stderr) exec "$0" "$@""#)
            .arg(env!("CARGO_BIN_EXE_serversync"))
            .arg("--config")
            .arg(&config)
            .args(["--log-level", "info", "--log-format", format, "drain"])
            .current_dir(env.work_dir())
            .env("NO_COLOR", "1")
            .stdin(std::process::Stdio::null())
            .output()
            .await
            .expect("run sh");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(lines.len() >= 2, "{stderr}");
        assert!(
            lines.iter().all(|l| l.starts_with('<')),
            "every line prefixed:\n{stderr}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("<3>") && l.contains("ERROR")),
            "errors at priority 3:\n{stderr}"
        );
    }
    let plain = env.run(&["--log-level", "info", "drain"]).await;
    assert!(
        plain.stderr_lines().iter().all(|l| !l.starts_with('<')),
        "no prefix off the journal\n{plain}"
    );
}
