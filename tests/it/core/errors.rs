//! Every error type of SPEC §4 produced for real, and found where it belongs: still
//! pending with the failure recorded, or dead-lettered with its history.

use std::time::Duration;

use chrono::Duration as Span;
use serde_json::json;
use uuid::Uuid;

use super::{
    a_recording_file_row, assert_dead, assert_history, drain_until, file_payload, retry_in_an_hour,
    the_row_left_for_retry, write_recording,
};
use crate::harness::{
    both_stores, closed_port, fixtures, Backend, Incoming, MetricsEndpoint, Mode, Reply, TestEnv,
};

both_stores!(a_500_until_out_of_attempts_is_dead_lettered_with_its_history);
async fn a_500_until_out_of_attempts_is_dead_lettered_with_its_history(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("retry.max_attempts", 2);
    env.sink.set_mode(Mode::Reply(
        Reply::status(500).body("upstream exploded: marker-500"),
    ));
    let id = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;

    let out = drain_until(&env, "dead-lettered", || async {
        env.count("sync_outbox_dead_letters").await == 1
    })
    .await;
    out.assert_code(3);

    let dead = env.dead_letters().await;
    let d = assert_dead(&dead, id, "http_5xx", 2);
    assert_eq!(d.max_attempts, 2);
    assert_eq!(d.http_status, Some(500));
    assert!(
        d.response_body
            .as_deref()
            .unwrap_or_default()
            .contains("marker-500"),
        "response_body keeps the sink's body: {d:#?}"
    );
    for attempt in d.attempt_errors.as_array().unwrap() {
        assert_eq!(attempt["httpStatus"], 500);
    }
    assert_eq!(env.count("sync_outbox").await, 0);
    let requests = env.sink.sync_requests();
    assert_eq!(requests.len(), 2, "one request per attempt");
    let keys: Vec<_> = requests
        .iter()
        .map(|r| r.headers.get("idempotency-key").map(str::to_string))
        .collect();
    assert!(
        keys[0].is_some() && keys[0] == keys[1],
        "same rows, same Idempotency-Key: {keys:?}"
    );
}

both_stores!(retry_overrides_apply_per_entity_type);
/// `[retry.overrides.<type>]` end to end: a 500 for everything; the file row's
/// override allows one attempt (dead at once, its limit recorded), the call log's
/// sets its own policy and delay (due again exactly 7 s on), and a type without one
/// keeps `[retry]`.
async fn retry_overrides_apply_per_entity_type(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    env.config
        .set("retry.max_attempts", 5)
        .set("dispatch.outage_threshold", 10)
        .set("retry.overrides.recording_file.max_attempts", 1)
        .set("retry.overrides.call_log.policy", "fixed")
        .set("retry.overrides.call_log.base_delay", "7s")
        .set("retry.overrides.call_log.max_delay", "7s");
    env.sink.set_mode(Mode::Always(500));
    let call = Uuid::new_v4();
    let file = a_recording_file_row(&env, call).await;
    let log = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    let other = env.insert("fax", Uuid::new_v4(), json!({"n": 2})).await;
    let before = env.db_now().await;

    env.drain().await.assert_code(3);
    let after = env.db_now().await;

    let dead = env.dead_letters().await;
    let d = assert_dead(&dead, file, "http_5xx", 1);
    assert_eq!(d.max_attempts, 1, "the override's limit is recorded");
    let rows = env.outbox().await;
    let row = |id: i64| rows.iter().find(|r| r.id == id).expect("still pending");
    assert_eq!(row(log).attempts, 1);
    let due = row(log).next_attempt_at;
    assert!(
        due >= before + Span::seconds(7) && due <= after + Span::seconds(7),
        "the call log's fixed 7 s: due {due}, drained {before} … {after}"
    );
    assert_eq!(row(other).attempts, 1);
    assert!(
        row(other).next_attempt_at >= after + Span::minutes(59),
        "[retry]'s hour for a type without an override"
    );
}

both_stores!(a_429_leaves_the_row_pending_until_after_retry_after);
async fn a_429_leaves_the_row_pending_until_after_retry_after(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    env.sink
        .set_mode(Mode::Reply(Reply::status(429).header("Retry-After", "30")));
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    let before = env.db_now().await;

    let out = env.drain().await;
    out.assert_code(3);
    assert!(
        out.elapsed < Duration::from_secs(20),
        "drain does not sit out a Retry-After\n{out}"
    );

    let rows = env.outbox().await;
    assert_eq!(rows.len(), 1, "the row stays in sync_outbox");
    let row = &rows[0];
    assert_eq!(row.last_error_type.as_deref(), Some("http_429"), "{row:#?}");
    assert_eq!(row.last_http_status, Some(429));
    assert_eq!(row.attempts, 1, "{row:#?}");
    assert_history(&row.attempt_errors, "http_429", 1);
    let earliest = before + Span::seconds(30) - Span::seconds(1);
    assert!(
        row.next_attempt_at >= earliest,
        "next_attempt_at {} ignores Retry-After (>= {earliest})",
        row.next_attempt_at
    );
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);
}

both_stores!(a_404_is_dead_lettered_at_once);
async fn a_404_is_dead_lettered_at_once(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    env.sink.set_mode(Mode::Reply(
        Reply::status(404).body("no such route: marker-404"),
    ));
    let id = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;

    env.drain().await.assert_code(3);

    let dead = env.dead_letters().await;
    let d = assert_dead(&dead, id, "http_4xx", 1);
    assert_eq!(d.http_status, Some(404));
    assert_eq!(d.max_attempts, 10, "the default limit applied");
    assert!(d
        .response_body
        .as_deref()
        .unwrap_or_default()
        .contains("marker-404"));
    assert_eq!(env.sink.request_count(), 1, "no retry");
    assert_eq!(env.count("sync_outbox").await, 0);
}

both_stores!(a_400_for_one_entry_dead_letters_only_that_entry);
async fn a_400_for_one_entry_dead_letters_only_that_entry(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    env.sink.set_mode(Mode::RejectPoison);
    let mut ids = Vec::new();
    for n in 0..5 {
        let payload = if n == 2 {
            json!({"n": n, "poison": true})
        } else {
            json!({"n": n})
        };
        ids.push(env.insert("call_log", Uuid::new_v4(), payload).await);
    }
    let poison = ids.remove(2);

    env.drain().await.assert_code(3);

    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1, "only the poison entry: {dead:#?}");
    let d = assert_dead(&dead, poison, "http_4xx", 1);
    assert_eq!(d.http_status, Some(400));
    assert!(d
        .response_body
        .as_deref()
        .unwrap_or_default()
        .contains("poison entry"));
    let mut delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    delivered.sort();
    assert_eq!(delivered, ids, "the other entries, each once");
    assert_eq!(env.sent_ids().await, ids);
    assert_eq!(env.count("sync_outbox").await, 0);
}

both_stores!(rows_a_producer_wrote_oddly_never_hold_up_the_others);
/// Values a producer can write that the relay cannot send as they are: a
/// `created_at` of `infinity` (PostgreSQL; its decode panicked the worker, and with
/// every worker gone the daemon exited 0) or not a time at all (SQLite, where a
/// claim that failed on it failed every claim), an `attempts` at int's maximum (its
/// `+ 1` failed every settle of the batch) or not a number; one below zero counts
/// from 0. The unsendable rows are
/// dead-lettered as `payload_invalid`, the others delivered, and the operator's
/// commands still read them.
async fn rows_a_producer_wrote_oddly_never_hold_up_the_others(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let odd_time = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    let max_attempts = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 2}))
        .await;
    let fine = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 3}))
        .await;
    // below zero: delivered, and counted from 0 (it would have had about 2^31 retries)
    let negative = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 5}))
        .await;
    env.db
        .execute(&format!(
            "UPDATE sync_outbox SET attempts = -2147483648 WHERE id = {negative}"
        ))
        .await;
    let (time, odd_count) = match backend {
        Backend::Postgres => ("'infinity'", None),
        Backend::Sqlite => (
            "1700000000",
            Some(
                env.insert("call_log", Uuid::new_v4(), json!({"n": 4}))
                    .await,
            ),
        ),
    };
    env.db
        .execute(&format!(
            "UPDATE sync_outbox SET created_at = {time} WHERE id = {odd_time}"
        ))
        .await;
    env.db
        .execute(&format!(
            "UPDATE sync_outbox SET attempts = 2147483647 WHERE id = {max_attempts}"
        ))
        .await;
    if let Some(id) = odd_count {
        env.db
            .execute(&format!(
                "UPDATE sync_outbox SET attempts = 'many' WHERE id = {id}"
            ))
            .await;
    }

    let out = env.drain().await;
    out.assert_code(3).assert_no_panic();

    // read through the product's own command, which must cope with the odd time
    let listed = env.run(&["dlq", "list", "--json"]).await;
    listed.assert_success().assert_no_panic();
    let dead = listed.json();
    let dead_as = |id: i64| {
        dead.as_array()
            .into_iter()
            .flatten()
            .find(|d| d["outboxId"] == id)
            .map(|d| (d["errorType"].clone(), d["errorMessage"].clone()))
    };
    let (error_type, message) = dead_as(odd_time).expect("the odd time is dead-lettered");
    assert_eq!(error_type, "payload_invalid");
    assert!(
        message.as_str().unwrap_or_default().contains("created_at"),
        "{message}"
    );
    if let Some(id) = odd_count {
        assert_eq!(dead_as(id).map(|d| d.0), Some(json!("payload_invalid")));
    }
    // the odd time is shown as none, not as a time it is not (1970-01-01)
    let odd = dead
        .as_array()
        .into_iter()
        .flatten()
        .find(|d| d["outboxId"] == odd_time)
        .expect("listed");
    assert_eq!(odd["createdAt"], json!(null), "{odd:#}");
    let dead_id = odd["id"].as_i64().expect("id").to_string();
    let shown = env.run(&["dlq", "show", &dead_id]).await;
    shown.assert_success().assert_no_panic();
    assert!(
        shown.stdout.contains("not a time this program can show") && !shown.stdout.contains("1970"),
        "{shown}"
    );
    let mut sent = vec![fine, max_attempts, negative];
    sent.sort();
    assert_eq!(env.sent_ids().await, sent);
    let counted: i64 = env
        .db
        .scalar(&format!(
            "SELECT CAST(attempts AS BIGINT) FROM sync_outbox_sent WHERE id = {negative}"
        ))
        .await;
    assert_eq!(counted, 1, "a count below zero counts from 0");
    assert_eq!(env.count("sync_outbox").await, 0);
    env.run(&["status", "--json"])
        .await
        .assert_success()
        .assert_no_panic();
}

both_stores!(a_response_body_of_any_bytes_is_kept_as_at_most_4_kib_of_text);
/// A Frontend that answers with a NUL and invalid UTF-8 in its body: PostgreSQL's
/// `text` refuses a NUL, which used to roll the whole settle back, so the rejected
/// row was never dead-lettered and the batch's delivered rows never settled (sent
/// again every lease, for ever). The body is kept as text, cut to 4 KiB after its
/// invalid bytes became U+FFFD.
async fn a_response_body_of_any_bytes_is_kept_as_at_most_4_kib_of_text(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let mut body = b"bad\0entry ".to_vec();
    body.extend(std::iter::repeat_n(0xFF_u8, 5000));
    env.sink
        .set_mode(Mode::custom(move |incoming| match incoming {
            Incoming::Sync(req) if req.entries().iter().any(|e| e.payload["poison"] == true) => {
                Reply::status(400).body(body.clone())
            }
            _ => Reply::ok(),
        }));
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            env.insert(
                "call_log",
                Uuid::new_v4(),
                json!({"n": n, "poison": n == 2}),
            )
            .await,
        );
    }
    let poison = ids.remove(2);

    env.drain().await.assert_code(3);

    let dead = env.dead_letters().await;
    let d = assert_dead(&dead, poison, "http_4xx", 1);
    let kept = d.response_body.as_deref().unwrap_or_default();
    assert!(kept.starts_with("bad\u{FFFD}entry \u{FFFD}"), "{kept:?}");
    // the first 4 KiB: all of it, less at most a character cut at the end
    assert!(
        (4093..=4096).contains(&kept.len()),
        "{} bytes kept",
        kept.len()
    );
    assert!(!kept.contains('\0'));
    assert_eq!(env.sent_ids().await, ids, "the batch's other rows settled");
    assert_eq!(env.count("sync_outbox").await, 0);
}

/// Quick fixed retries up to `max_attempts`, and a Frontend that answers 500 to every
/// request holding a `"crash": true` entry or a recording `"crash"`, and 200 to
/// anything else (an empty batch included).
fn a_frontend_failing_on_crash_rows(env: &mut TestEnv, max_attempts: u32) {
    let crash = Reply::status(500).body("NullPointerException: marker-crash");
    a_frontend_failing_on(env, "crash", crash, max_attempts);
}

/// Quick fixed retries up to `max_attempts`, and a Frontend that answers `reply` to
/// every request holding a `{marker: true}` entry or a recording `marker`, and 200 to
/// anything else (an empty batch included).
pub(super) fn a_frontend_failing_on(
    env: &mut TestEnv,
    marker: &'static str,
    reply: Reply,
    max_attempts: u32,
) {
    env.config
        .set("retry.max_attempts", max_attempts)
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "50ms")
        .set("retry.max_delay", "50ms")
        .set("dispatch.poll_interval", "50ms");
    env.sink
        .set_mode(Mode::custom(move |incoming| match incoming {
            Incoming::Sync(req) if req.entries().iter().any(|e| e.payload[marker] == true) => {
                reply.clone()
            }
            Incoming::File(upload) if upload.text("recordingId").as_deref() == Some(marker) => {
                reply.clone()
            }
            _ => Reply::ok(),
        }));
}

both_stores!(a_lone_row_the_sink_fails_on_dies_and_the_sink_is_never_taken_as_down);
/// The only rows to send make the Frontend fail: 500 for every request that holds
/// the call's log (later, a recording file), while anything else, an empty batch
/// included, is answered. A daemon with nothing else to send used to take the sink
/// as down after `outage_threshold` such requests, probe with the same row,
/// uncharged, for ever, and hold the call's later rows behind it. Now the empty
/// batch says the sink works: the row is charged until it is dead-lettered, the
/// call's recording follows, and the sink is never taken as down; the same for an
/// upload.
async fn a_lone_row_the_sink_fails_on_dies_and_the_sink_is_never_taken_as_down(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    a_frontend_failing_on_crash_rows(&mut env, 5);
    let fault = Fault {
        marker: "crash",
        error_type: "http_5xx",
        http_status: Some(500),
    };
    a_lone_row_the_sink_fails_on_dies(env, fault, 5).await;
}

/// As above, with a Frontend that refuses an empty batch (422: "no entries"), as
/// one validating its input may. A refusal is an answer: the sink works, and the row
/// is charged. (Only a 2xx used to count: the sink was taken as down, and the lone
/// row probed it uncharged for as long as nothing else came to send.)
#[tokio::test]
async fn a_lone_row_the_sink_fails_on_dies_also_when_the_frontend_refuses_empty_batches() {
    let mut env = TestEnv::migrated().await;
    a_frontend_failing_on_crash_rows(&mut env, 5);
    let crash = Reply::status(500).body("NullPointerException: marker-crash");
    env.sink
        .set_mode(Mode::custom(move |incoming| match incoming {
            Incoming::Sync(req) if req.entries().is_empty() => {
                Reply::status(422).body(r#"{"error":"no entries"}"#)
            }
            Incoming::Sync(req) if req.entries().iter().any(|e| e.payload["crash"] == true) => {
                crash.clone()
            }
            Incoming::File(upload) if upload.text("recordingId").as_deref() == Some("crash") => {
                crash.clone()
            }
            _ => Reply::ok(),
        }));
    let fault = Fault {
        marker: "crash",
        error_type: "http_5xx",
        http_status: Some(500),
    };
    a_lone_row_the_sink_fails_on_dies(env, fault, 5).await;
}

/// How the fake Frontend fails the rows it cannot take: a payload `{marker: true}`,
/// or an upload whose `recordingId` is `marker`, fails its request as `error_type`.
pub(super) struct Fault {
    pub marker: &'static str,
    pub error_type: &'static str,
    pub http_status: Option<i32>,
}

/// The only rows to send are a call's log the Frontend fails on (`fault`) and the
/// call's recording; then an upload it fails on. Both are charged until they are
/// dead-lettered after `max_attempts`, the recording follows its dead log, and the
/// sink is never taken as down. `env` is configured for `fault` and its retries.
pub(super) async fn a_lone_row_the_sink_fails_on_dies(
    env: TestEnv,
    fault: Fault,
    max_attempts: i32,
) {
    let call = Uuid::new_v4();
    let log = env
        .insert("call_log", call, json!({fault.marker: true}))
        .await;
    let recording = env
        .insert("recording", Uuid::new_v4(), json!({"callLogId": call}))
        .await;
    let relay = env.spawn_run(&[]);
    env.sink.wait_for_entries(1, Duration::from_secs(30)).await;

    let other = Uuid::new_v4();
    write_recording(&env, other);
    let mut failing_file = file_payload(other, &format!("{other}/mixed.wav"));
    failing_file["recordingId"] = json!(fault.marker);
    let file = env
        .insert("recording_file", Uuid::new_v4(), failing_file)
        .await;
    crate::harness::wait_until(
        Duration::from_secs(30),
        "both rows dead-lettered",
        || async { env.count("sync_outbox_dead_letters").await == 2 },
    )
    .await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();

    let dead = env.dead_letters().await;
    for id in [log, file] {
        let d = assert_dead(&dead, id, fault.error_type, max_attempts);
        assert_eq!(d.http_status, fault.http_status);
    }
    let delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(
        delivered,
        [recording],
        "the call's recording follows its dead log"
    );
    assert_eq!(env.count("sync_outbox").await, 0);
    assert!(
        !out.stderr.contains("ingest sink is DOWN"),
        "the sink was taken as down:\n{}",
        out.stderr
    );
}

/// A call's log the Frontend fails on (`fault`) is charged once in a drain of its
/// own; its retry then falls due with seven rows that never failed, in one claim of
/// eight (one worker, batches of eight). It goes in a request of its own again, and
/// is dead-lettered at its second attempt; the seven go together in one request that
/// does not wait for it. They used to go together and be split anew on every retry:
/// four more requests held the failing row (8, 4, 2, 1 entries), each waiting
/// `ingest.timeout` when the Frontend hangs on it. `env` is configured for `fault`
/// with `max_attempts` 2.
pub(super) async fn a_row_charged_before_goes_apart(mut env: TestEnv, fault: Fault) {
    retry_in_an_hour(&mut env);
    env.config
        .set("dispatch.concurrency", 1)
        .set("dispatch.batch_size", 8);
    let failing = env
        .insert("call_log", Uuid::new_v4(), json!({fault.marker: true}))
        .await;
    let first = env.drain().await;
    first.assert_code(3);
    assert!(
        !first.stderr.contains("recorded as down"),
        "one row failing is not an outage, though it was the drain's last request\n{first}"
    );
    the_row_left_for_retry(&env, fault.error_type).await;
    let due = format!(
        "UPDATE sync_outbox SET next_attempt_at = {} WHERE id = {failing}",
        env.db.now_plus(-1)
    );
    assert_eq!(env.db.execute(&due).await, 1);
    let mut fresh = Vec::new();
    for n in 0..7 {
        fresh.push(
            env.insert("call_log", Uuid::new_v4(), json!({"n": n}))
                .await,
        );
    }
    env.drain().await.assert_code(3);

    let holding: Vec<Vec<i64>> = env
        .sink
        .sync_requests()
        .iter()
        .map(|r| r.entries().iter().map(|e| e.outbox_id).collect::<Vec<_>>())
        .filter(|ids| ids.contains(&failing))
        .collect();
    assert_eq!(
        holding,
        [vec![failing], vec![failing]],
        "the failing row, alone, once per drain"
    );
    let accepted: Vec<Vec<i64>> = env
        .sink
        .accepted_batches()
        .into_iter()
        .filter(|ids| !ids.is_empty())
        .collect();
    assert_eq!(
        accepted,
        [fresh],
        "the rows that never failed, together, once (empty batches asked aside)"
    );
    for record in env.sent().await {
        assert_eq!(record.attempts, 1, "charged for another entry: {record:#?}");
    }
    let dead = env.dead_letters().await;
    let d = assert_dead(&dead, failing, fault.error_type, 2);
    assert_eq!(d.http_status, fault.http_status);
}

both_stores!(a_row_charged_before_for_a_500_is_retried_apart_from_rows_that_never_failed);
/// See `a_row_charged_before_goes_apart`.
async fn a_row_charged_before_for_a_500_is_retried_apart_from_rows_that_never_failed(
    backend: Backend,
) {
    let mut env = TestEnv::migrated_on(backend).await;
    a_frontend_failing_on_crash_rows(&mut env, 2);
    let fault = Fault {
        marker: "crash",
        error_type: "http_5xx",
        http_status: Some(500),
    };
    a_row_charged_before_goes_apart(env, fault).await;
}

both_stores!(two_rows_the_frontend_always_fails_on_die_without_taking_the_sink_down);
/// Two rows the Frontend always fails on, nothing else to send: at the outage
/// threshold the relay asks the sink with an empty batch, and as it answers, the
/// failures are the rows' (fewer than three different rows): each is charged, the
/// sink stays up, until both are dead-lettered. They used to be probed uncharged for
/// ever; then, until this was asked at the threshold, they took the sink as down
/// (`serversync_sink_up` 0, "rows are not charged") while its probes charged them.
/// A sink that fails the empty batch too is down for real: probes charge nothing
/// (`a_sink_down_as_a_whole_…`).
async fn two_rows_the_frontend_always_fails_on_die_without_taking_the_sink_down(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    a_frontend_failing_on_crash_rows(&mut env, 4);
    env.config
        .set("dispatch.probe_interval", "100ms")
        .set("dispatch.max_probe_interval", "200ms");
    let mut ids = Vec::new();
    for n in 0..2 {
        ids.push(
            env.insert("call_log", Uuid::new_v4(), json!({"crash": true, "n": n}))
                .await,
        );
    }
    let relay = env.spawn_run(&[]);
    crate::harness::wait_until(
        Duration::from_secs(30),
        "both rows dead-lettered",
        || async { env.count("sync_outbox_dead_letters").await == 2 },
    )
    .await;
    let fine = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 9}))
        .await;
    env.sink.wait_for_entries(1, Duration::from_secs(10)).await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    assert!(
        !out.stderr.contains("ingest sink is DOWN"),
        "two rows failing are no outage:\n{}",
        out.stderr
    );
    let dead = env.dead_letters().await;
    for id in ids {
        assert_dead(&dead, id, "http_5xx", 4);
    }
    let delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(delivered, [fine], "and delivery goes on");
}

/// Quick fixed retries up to 4 attempts, an outage taken after 3 failures, and
/// probes every 50–100 ms: an outage of a few seconds would dead-letter rows that
/// were charged for it.
async fn an_outage_of_many_quick_retries(backend: Backend) -> TestEnv {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("retry.max_attempts", 4)
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "50ms")
        .set("retry.max_delay", "50ms")
        .set("dispatch.poll_interval", "50ms")
        .set("dispatch.outage_threshold", 3)
        .set("dispatch.probe_interval", "50ms")
        .set("dispatch.max_probe_interval", "100ms");
    env
}

/// After `requests` to a failing sink, no row is dead-lettered, and none has used
/// its 4 attempts.
async fn no_attempts_burnt(env: &TestEnv, requests: usize) {
    assert_eq!(
        env.count("sync_outbox_dead_letters").await,
        0,
        "nothing dead-lettered"
    );
    let most = env.outbox().await.iter().map(|r| r.attempts).max();
    assert!(
        most.is_some_and(|a| a < 4),
        "attempts burnt on the outage: at most {most:?}, after {requests} requests"
    );
}

both_stores!(a_frontend_failing_every_row_while_it_answers_empty_batches_burns_no_attempts);
/// A Frontend whose storage is down while its request handler is up: 500 to every
/// batch with entries, and 502 to every upload, but 200 to an empty batch. Rows of
/// five calls, and five recording files: the sink is taken as down, and its probes
/// charge nothing once three different rows have failed (they used to charge one
/// row per probe, and dead-letter the oldest rows, one after another, for as long
/// as the outage lasted). When it is back, everything goes.
async fn a_frontend_failing_every_row_while_it_answers_empty_batches_burns_no_attempts(
    backend: Backend,
) {
    let env = an_outage_of_many_quick_retries(backend).await;
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::Sync(req) if req.entries().is_empty() => Reply::ok(),
        Incoming::Sync(_) => Reply::status(500).body("database unavailable"),
        Incoming::File(_) => Reply::status(502),
    }));
    let mut calls = Vec::new();
    for n in 0..5 {
        let call = Uuid::new_v4();
        let log = env.insert("call_log", call, json!({"n": n})).await;
        let file = a_recording_file_row(&env, call).await;
        calls.push([log, file]);
    }
    let relay = env.spawn_run(&[]);
    // a few seconds of probes: dozens at this interval
    tokio::time::sleep(Duration::from_secs(6)).await;
    let probes = env.sink.sync_requests().len() + env.sink.all_uploads().len();
    no_attempts_burnt(&env, probes).await;
    assert!(probes > 20, "the sink was probed: {probes} requests");

    env.sink.set_mode(Mode::Accept);
    crate::harness::wait_until(Duration::from_secs(20), "every row delivered", || async {
        env.count("sync_outbox_sent").await == 10
    })
    .await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    assert!(out.stderr.contains("ingest sink is DOWN"), "{}", out.stderr);
    let uploads: Vec<i64> = env
        .sink
        .uploads()
        .iter()
        .filter_map(|u| {
            u.headers
                .get("idempotency-key")?
                .rsplit(':')
                .next()?
                .parse()
                .ok()
        })
        .collect();
    for [log, file] in calls {
        assert!(uploads.contains(&file), "file {file} uploaded");
        assert!(
            env.sink.entries().iter().any(|e| e.outbox_id == log),
            "log {log} delivered"
        );
    }
}

both_stores!(an_upload_endpoint_failing_every_upload_while_json_goes_burns_no_attempts);
/// The Frontend takes JSON, but its file storage is down: every upload fails (500).
/// Five recording files of five calls, whose logs go; more call logs keep coming.
/// The sink as a whole stays up (JSON goes), so the file rows used to be charged
/// for the outage until dead-lettered. Once three different files failed, the upload
/// endpoint is taken as down: files wait in the outbox, tried now and then, charged
/// nothing more, while JSON goes on; when uploads work again, they all go.
async fn an_upload_endpoint_failing_every_upload_while_json_goes_burns_no_attempts(
    backend: Backend,
) {
    let mut env = an_outage_of_many_quick_retries(backend).await;
    let metrics = MetricsEndpoint::enable(&mut env);
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::File(_) => Reply::status(500).body("blob storage unavailable"),
        Incoming::Sync(_) => Reply::ok(),
    }));
    let mut files = Vec::new();
    for n in 0..5 {
        let call = Uuid::new_v4();
        env.insert("call_log", call, json!({"n": n})).await;
        files.push(a_recording_file_row(&env, call).await);
    }
    let relay = env.spawn_run(&metrics.flag());
    metrics
        .wait_for_sample("serversync_upload_up", 0.0, Duration::from_secs(15))
        .await;
    assert_eq!(
        metrics.sample("serversync_sink_up").await,
        Some(1.0),
        "the sink as a whole is up: JSON goes"
    );
    let mut logs = Vec::new();
    for n in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        logs.push(
            env.insert("call_log", Uuid::new_v4(), json!({"later": n}))
                .await,
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    no_attempts_burnt(&env, env.sink.all_uploads().len()).await;
    let sent = env.sent_ids().await;
    assert!(
        logs.iter().all(|id| sent.contains(id)),
        "JSON rows went on meanwhile"
    );

    assert_eq!(metrics.sample("serversync_upload_up").await, Some(0.0));
    env.sink.set_mode(Mode::Accept);
    crate::harness::wait_until(Duration::from_secs(20), "every file delivered", || async {
        let sent = env.sent_ids().await;
        files.iter().all(|id| sent.contains(id))
    })
    .await;
    metrics
        .wait_for_sample("serversync_upload_up", 1.0, Duration::from_secs(5))
        .await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    assert!(
        out.stderr
            .contains("the recording-file endpoint fails every upload")
            && out.stderr.contains("takes uploads again"),
        "{}",
        out.stderr
    );
}

both_stores!(a_drain_on_a_sink_recorded_as_down_goes_past_a_row_the_frontend_fails_on);
/// A drain that starts on a sink recorded as down probes with its oldest due row. When
/// that row is one the Frontend fails on (500) while it answers an empty batch, the
/// row is charged, and the next probe, another row, goes at once: the drain delivers
/// the rest. It used to stop there, "ingest sink is down", run after run, until the
/// row was dead-lettered.
async fn a_drain_on_a_sink_recorded_as_down_goes_past_a_row_the_frontend_fails_on(
    backend: Backend,
) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "200ms")
        .set("retry.max_delay", "200ms")
        .set("ingest.timeout", "300ms");
    // a drain whose requests time out records the sink as down
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(5))));
    let poison = env
        .insert("call_log", Uuid::new_v4(), json!({"crash": true}))
        .await;
    env.drain().await.assert_code(3);
    env.config.set("ingest.timeout", "5s");
    // the row is due again
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut good = Vec::new();
    for n in 0..3 {
        good.push(
            env.insert("call_log", Uuid::new_v4(), json!({"n": n}))
                .await,
        );
    }
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::Sync(req) if req.entries().iter().any(|e| e.payload["crash"] == true) => {
            Reply::status(500).body("NullPointerException")
        }
        _ => Reply::ok(),
    }));
    let out = env.drain().await;
    out.assert_no_panic();
    let sent = env.sent_ids().await;
    assert!(
        good.iter().all(|id| sent.contains(id)),
        "the rows after the failing one were delivered\n{out}"
    );
    assert!(!sent.contains(&poison));
    assert!(!out.stderr.contains("drain stops"), "{out}");
}

both_stores!(a_500_caused_by_one_entry_holds_back_only_that_entry);
async fn a_500_caused_by_one_entry_holds_back_only_that_entry(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("retry.max_attempts", 2);
    // a Frontend that crashes on one entity: 500 for every batch that holds it
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::Sync(req) if req.entries().iter().any(|e| e.payload["crash"] == true) => {
            Reply::status(500).body("NullPointerException: marker-crash")
        }
        _ => Reply::ok(),
    }));
    let mut ids = Vec::new();
    for n in 0..7 {
        let payload = if n == 4 {
            json!({"n": n, "crash": true})
        } else {
            json!({"n": n})
        };
        ids.push(env.insert("call_log", Uuid::new_v4(), payload).await);
    }
    let poison = ids.remove(4);

    // the other rows go at once; the crashing one is retried and dead-lettered at
    // its second failure (by this drain or, if its retry was not yet due, the next)
    let out = env.drain().await;
    out.assert_code(3);
    let mut delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    delivered.sort();
    assert_eq!(
        delivered, ids,
        "every other entry, each once, by the first drain"
    );
    assert_eq!(env.sent_ids().await, ids);
    drain_until(&env, "the crashing row dead-lettered", || async {
        env.count("sync_outbox_dead_letters").await == 1
    })
    .await;
    assert_eq!(env.count("sync_outbox").await, 0);
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1, "{dead:#?}");
    let d = assert_dead(&dead, poison, "http_5xx", 2);
    assert_eq!(d.http_status, Some(500));
    assert_history(&d.attempt_errors, "http_5xx", 2);
    assert!(
        !out.stderr.contains("sink is DOWN"),
        "one bad row is not a sink outage\n{out}"
    );
}

both_stores!(entries_failing_first_in_a_batch_charge_no_other_entry);
/// Entries that make the Frontend answer 500, first in their batch: splitting finds
/// the first (its sibling, sent alone, goes through, so the sink works), and when
/// the isolating gives up (two bad entries side by side), the halves never sent are
/// not charged. The other entries are delivered on their first attempt, the bad ones
/// dead-lettered; before, with a batch of a power of two, the other entries were
/// charged with the bad one, the sink taken as down, and delivery stalled for good.
async fn entries_failing_first_in_a_batch_charge_no_other_entry(backend: Backend) {
    for (batch_size, rows, bad) in [(2, 2, 1_usize), (8, 8, 1), (4, 4, 2)] {
        let mut env = TestEnv::migrated_on(backend).await;
        env.config
            .set("dispatch.batch_size", batch_size)
            .set("retry.max_attempts", 2)
            .set("retry.policy", "fixed")
            .set("retry.base_delay", "100ms")
            .set("retry.max_delay", "100ms");
        env.sink.set_mode(Mode::custom(|incoming| match incoming {
            Incoming::Sync(req) if req.entries().iter().any(|e| e.payload["crash"] == true) => {
                Reply::status(500).body("NullPointerException")
            }
            _ => Reply::ok(),
        }));
        let mut ids = Vec::new();
        for n in 0..rows {
            ids.push(
                env.insert(
                    "call_log",
                    Uuid::new_v4(),
                    json!({"n": n, "crash": n < bad}),
                )
                .await,
            );
        }
        let good: Vec<i64> = ids.split_off(bad);

        drain_until(&env, "the bad entries dead-lettered", || async {
            env.count("sync_outbox_dead_letters").await == bad as i64
        })
        .await;

        assert_eq!(env.count("sync_outbox").await, 0, "batch of {batch_size}");
        let sent = env.sent().await;
        let mut sent_ids: Vec<i64> = sent.iter().map(|r| r.id).collect();
        sent_ids.sort();
        assert_eq!(sent_ids, good, "batch of {batch_size}");
        for record in &sent {
            assert_eq!(record.attempts, 1, "charged for another entry: {record:#?}");
        }
        let dead = env.dead_letters().await;
        for id in &ids {
            assert_dead(&dead, *id, "http_5xx", 2);
        }
    }
}

both_stores!(a_503_is_retried_whole_not_split);
/// A Frontend that answers 503 says it is unavailable: the batch is not split to
/// look for a bad entry (which would multiply the requests it refuses, as it does
/// for a 500), but retried whole, under the same `Idempotency-Key`.
async fn a_503_is_retried_whole_not_split(backend: Backend) {
    for reply in [
        Reply::status(503),
        Reply::status(503).header("Retry-After", "1"),
    ] {
        let mut env = TestEnv::migrated_on(backend).await;
        env.config
            .set("retry.policy", "fixed")
            .set("retry.base_delay", "300ms")
            .set("retry.max_delay", "300ms");
        env.sink.set_mode(Mode::Reply(reply));
        for n in 0..5 {
            env.insert("call_log", Uuid::new_v4(), json!({"n": n}))
                .await;
        }

        env.drain().await.assert_code(3);

        let rows = env.outbox().await;
        assert_eq!(rows.len(), 5, "every row left for retry");
        for row in &rows {
            assert_eq!(row.last_error_type.as_deref(), Some("http_5xx"), "{row:#?}");
            assert!(row.attempts >= 1, "{row:#?}");
        }
        env.sink.set_mode(Mode::Reply(Reply::ok()));
        drain_until(&env, "the rows delivered", || async {
            env.count("sync_outbox").await == 0
        })
        .await;
        // the refused requests (once the sink is back, its probe is one row)
        let requests: Vec<_> = env
            .sink
            .sync_requests()
            .into_iter()
            .filter(|r| !r.accepted())
            .collect();
        assert!(!requests.is_empty(), "{requests:#?}");
        let key = |n: usize| {
            requests[n]
                .headers
                .get("idempotency-key")
                .map(str::to_string)
        };
        for (n, request) in requests.iter().enumerate() {
            let sizes: Vec<usize> = requests.iter().map(|r| r.entries().len()).collect();
            assert_eq!(
                request.entries().len(),
                5,
                "request {n} carried every row: {sizes:?}"
            );
            assert_eq!(key(n), key(0), "the same rows, the same key");
        }
    }
}

both_stores!(a_sink_slower_than_ingest_timeout_is_a_timeout);
async fn a_sink_slower_than_ingest_timeout_is_a_timeout(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    env.config.set("ingest.timeout", "500ms");
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(5))));
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;

    let out = env.drain().await;
    out.assert_code(3);
    assert!(
        out.elapsed < Duration::from_secs(5),
        "the timeout cut the request short\n{out}"
    );

    let row = the_row_left_for_retry(&env, "timeout").await;
    assert_eq!(row.last_http_status, None);
}

both_stores!(an_answer_whose_body_never_ends_is_read_only_as_far_as_needed);
/// A Frontend that answers and then streams its body without end (a proxy gone
/// wrong): a 2xx is taken after at most 64 KiB of its body, and a 500 keeps the first
/// 4 KiB of its body; neither waits for the end (here, `ingest.timeout`).
async fn an_answer_whose_body_never_ends_is_read_only_as_far_as_needed(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    env.config.set("ingest.timeout", "20s");
    env.sink
        .set_mode(Mode::Reply(Reply::ok().body("accepted").endless()));
    let sent = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    let out = env.drain().await;
    out.assert_success();
    assert!(
        out.elapsed < Duration::from_secs(10),
        "the answer was taken without waiting for its end\n{out}"
    );
    assert_eq!(env.sent_ids().await, vec![sent]);

    env.config.set("retry.max_attempts", 1);
    env.sink.set_mode(Mode::Reply(
        Reply::status(500)
            .body("upstream broke: marker-endless")
            .endless(),
    ));
    let failed = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 2}))
        .await;
    let out = env.drain().await;
    out.assert_code(3);
    assert!(out.elapsed < Duration::from_secs(10), "{out}");
    let dead = env.dead_letters().await;
    let d = assert_dead(&dead, failed, "http_5xx", 1);
    let body = d.response_body.as_deref().unwrap_or_default();
    assert!(
        body.starts_with("upstream broke: marker-endless"),
        "{body:?}"
    );
    assert!(
        body.len() <= 4096,
        "the body kept is cut: {} bytes",
        body.len()
    );
}

both_stores!(an_upload_to_a_hung_sink_times_out_after_ingest_timeout);
async fn an_upload_to_a_hung_sink_times_out_after_ingest_timeout(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    // no ingest.upload_timeout: a small file gets ingest.timeout plus its transfer
    // time at 1 MiB/s, not minutes
    env.config
        .set("ingest.timeout", "500ms")
        .remove("ingest.upload_timeout");
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(10))));
    let call = Uuid::new_v4();
    a_recording_file_row(&env, call).await;

    let out = env.drain().await;
    out.assert_code(3);
    assert!(
        out.elapsed < Duration::from_secs(5),
        "the upload was cut short near ingest.timeout\n{out}"
    );
    the_row_left_for_retry(&env, "timeout").await;
}

both_stores!(a_refused_connection_is_connect);
async fn a_refused_connection_is_connect(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    env.config.set(
        "ingest.base_url",
        format!("http://127.0.0.1:{}", closed_port()),
    );
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;

    let out = env.drain().await;
    out.assert_code(3);
    assert!(out.elapsed < Duration::from_secs(10), "{out}");

    // a refused connection is the sink's, never the row's: classified, recorded,
    // and no attempt charged for it (SPEC 3.6)
    let rows = env.outbox().await;
    assert_eq!(rows.len(), 1, "the row stays in sync_outbox: {rows:#?}");
    let row = &rows[0];
    assert_eq!(row.last_error_type.as_deref(), Some("connect"), "{row:#?}");
    assert_eq!(row.last_http_status, None);
    assert_eq!(row.attempts, 0, "{row:#?}");
    assert_eq!(row.attempt_errors, json!([]), "{row:#?}");
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);
}

/// A listener on 127.0.0.1 whose accept queue is full: the kernel drops further
/// handshakes, so a connection to it hangs until the client gives up. The returned
/// connections fill the queue (keep them open).
fn a_listener_dropping_handshakes() -> (std::net::TcpListener, Vec<std::net::TcpStream>) {
    use std::os::fd::AsRawFd;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    // the smallest backlog (std listens with a large one); never accepted
    // SAFETY: listen(2) on a socket this function owns, with a plain integer
    let rc = unsafe { libc::listen(listener.as_raw_fd(), 0) };
    assert_eq!(rc, 0, "listen");
    let addr = listener.local_addr().expect("addr");
    let mut held = Vec::new();
    for _ in 0..16 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(stream) => held.push(stream),
            Err(_) => return (listener, held),
        }
    }
    panic!("the accept queue never filled ({} connections)", held.len());
}

/// A connection the sink's host never completes (its handshake dropped) is
/// `connect` when `ingest.connect_timeout` runs out, not `timeout` (a request sent
/// and not answered), and no attempt is charged: the request never left.
#[tokio::test]
async fn a_connection_never_completed_is_connect_not_timeout() {
    let mut env = TestEnv::migrated().await;
    retry_in_an_hour(&mut env);
    let (listener, _held) = a_listener_dropping_handshakes();
    let addr = listener.local_addr().expect("addr");
    env.config
        .set("ingest.base_url", format!("http://{addr}"))
        .set("ingest.connect_timeout", "300ms");
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;

    let out = env.drain().await;
    out.assert_code(3);
    let rows = env.outbox().await;
    assert_eq!(rows.len(), 1, "the row stays in sync_outbox: {rows:#?}");
    let row = &rows[0];
    assert_eq!(row.last_error_type.as_deref(), Some("connect"), "{row:#?}");
    assert_eq!(row.attempts, 0, "{row:#?}");
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);
}

both_stores!(a_missing_file_is_retried);
async fn a_missing_file_is_retried(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    let call = Uuid::new_v4();
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        file_payload(call, &format!("{call}/mixed.wav")),
    )
    .await;

    env.drain().await.assert_code(3);

    // a missing file may still appear: the row stays
    the_row_left_for_retry(&env, "file_missing").await;
    assert_eq!(env.sink.request_count(), 0, "nothing to send");
}

both_stores!(a_missing_file_out_of_attempts_is_dead_lettered);
async fn a_missing_file_out_of_attempts_is_dead_lettered(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("retry.max_attempts", 1);
    let no_dir = Uuid::new_v4();
    let no_file = Uuid::new_v4();
    fixtures::write_file(&env.root, &format!("{no_file}/other.wav"), b"x");
    let a = env
        .insert(
            "recording_file",
            Uuid::new_v4(),
            file_payload(no_dir, &format!("{no_dir}/mixed.wav")),
        )
        .await;
    let b = env
        .insert(
            "recording_file",
            Uuid::new_v4(),
            file_payload(no_file, &format!("{no_file}/mixed.wav")),
        )
        .await;

    env.drain().await.assert_code(3);

    let dead = env.dead_letters().await;
    for id in [a, b] {
        let d = assert_dead(&dead, id, "file_missing", 1);
        assert_eq!(d.max_attempts, 1);
        assert_eq!(d.http_status, None);
    }
    assert_eq!(env.count("sync_outbox").await, 0);
    assert_eq!(env.sink.request_count(), 0);
}

both_stores!(paths_out_of_the_recordings_root_are_denied);
async fn paths_out_of_the_recordings_root_are_denied(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let outside = env.work_dir().join("outside.wav");
    std::fs::write(&outside, fixtures::wav(10)).unwrap();
    std::fs::write(env.work_dir().join("outside.json"), b"{}").unwrap();
    let inside = Uuid::new_v4();
    write_recording(&env, inside);
    let cases = [
        file_payload(Uuid::new_v4(), "../outside.wav"),
        file_payload(inside, &format!("{inside}/../../outside.wav")),
        file_payload(Uuid::new_v4(), outside.to_str().unwrap()),
        json!({"callLogId": inside, "filePath": format!("{inside}/mixed.wav"), "metaPath": "../outside.json"}),
    ];
    let mut ids = Vec::new();
    for payload in cases {
        ids.push(env.insert("recording_file", Uuid::new_v4(), payload).await);
    }

    let out = env.drain().await;
    out.assert_code(3);

    let dead = env.dead_letters().await;
    for id in &ids {
        let d = assert_dead(&dead, *id, "path_denied", 1);
        assert!(
            d.error_message.contains("outside"),
            "the path is in the dead letter: {d:#?}"
        );
    }
    assert_eq!(
        env.sink.request_count(),
        0,
        "nothing outside the root is sent"
    );
    // the logs name the rows and the error type, not the payload's paths
    assert!(out.stderr.contains("path_denied"), "{out}");
    assert!(
        !out.stderr.contains("outside.wav"),
        "a payload's path in the logs\n{out}"
    );
}

both_stores!(symlinks_out_of_the_recordings_root_are_denied);
async fn symlinks_out_of_the_recordings_root_are_denied(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let outside_dir = env.work_dir().join("elsewhere");
    fixtures::write_file(&outside_dir, "mixed.wav", &fixtures::wav(10));
    let linked_file = Uuid::new_v4();
    std::fs::create_dir_all(env.root.join(linked_file.to_string())).unwrap();
    std::os::unix::fs::symlink(
        outside_dir.join("mixed.wav"),
        env.root.join(format!("{linked_file}/mixed.wav")),
    )
    .unwrap();
    let linked_dir = Uuid::new_v4();
    std::os::unix::fs::symlink(&outside_dir, env.root.join(linked_dir.to_string())).unwrap();
    let a = env
        .insert(
            "recording_file",
            Uuid::new_v4(),
            file_payload(linked_file, &format!("{linked_file}/mixed.wav")),
        )
        .await;
    let b = env
        .insert(
            "recording_file",
            Uuid::new_v4(),
            file_payload(linked_dir, &format!("{linked_dir}/mixed.wav")),
        )
        .await;

    env.drain().await.assert_code(3);

    let dead = env.dead_letters().await;
    assert_dead(&dead, a, "path_denied", 1);
    assert_dead(&dead, b, "path_denied", 1);
    assert_eq!(env.sink.request_count(), 0);
}

both_stores!(an_absolute_symlink_that_stays_inside_the_root_is_followed);
/// Only symlinks that lead out of the root are denied: one with an absolute target
/// inside it (as `ln -s "$PWD/take1.wav" mixed.wav` makes) is uploaded, byte for byte,
/// under the name the payload gave.
async fn an_absolute_symlink_that_stays_inside_the_root_is_followed(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let call = Uuid::new_v4();
    let audio = fixtures::wav(5000);
    fixtures::write_file(&env.root.join(call.to_string()), "take1.wav", &audio);
    std::os::unix::fs::symlink(
        env.root.join(format!("{call}/take1.wav")),
        env.root.join(format!("{call}/mixed.wav")),
    )
    .unwrap();
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        file_payload(call, &format!("{call}/mixed.wav")),
    )
    .await;

    env.drain().await.assert_success();

    let uploads = env.sink.uploads();
    assert_eq!(uploads.len(), 1);
    let part = uploads[0].part("audio").expect("audio part");
    assert_eq!(part.bytes, audio, "the file's bytes");
    assert_eq!(part.file_name.as_deref(), Some("mixed.wav"));
}

both_stores!(file_payloads_without_required_fields_are_invalid);
async fn file_payloads_without_required_fields_are_invalid(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let call = Uuid::new_v4();
    write_recording(&env, call);
    let cases = [
        json!({"callLogId": Uuid::new_v4()}),
        json!({"callLogId": Uuid::new_v4(), "filePath": 42}),
        json!({"filePath": format!("{call}/mixed.wav")}),
        json!(["not", "an", "object"]),
        // the file exists, but a path ending with `/` names a directory
        json!({"callLogId": call, "filePath": format!("{call}/mixed.wav/")}),
    ];
    let mut ids = Vec::new();
    for payload in cases {
        ids.push(env.insert("recording_file", Uuid::new_v4(), payload).await);
    }

    env.drain().await.assert_code(3);

    let dead = env.dead_letters().await;
    for id in ids {
        assert_dead(&dead, id, "payload_invalid", 1);
    }
    assert_eq!(env.sink.request_count(), 0);
}

both_stores!(a_type_outside_the_json_allow_list_is_an_unknown_entity_type);
async fn a_type_outside_the_json_allow_list_is_an_unknown_entity_type(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("dispatch.json_entity_types", ["call_log"]);
    let fax = env.insert("fax", Uuid::new_v4(), json!({"pages": 3})).await;
    let log = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;

    env.drain().await.assert_code(3);

    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    let d = assert_dead(&dead, fax, "unknown_entity_type", 1);
    assert_eq!(d.http_status, None);
    let delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(delivered, [log], "the routable row still goes through");
    assert!(
        env.sink
            .all_entries()
            .iter()
            .all(|e| e.entity_type != "fax"),
        "fax never reaches the sink"
    );
}

both_stores!(a_drain_sits_out_a_short_retry_after_and_goes_on);
/// One 429 with `Retry-After: 1` in the middle of a drain: the drain waits the
/// second and delivers everything, the held-back batch included, instead of
/// stopping with most of the backlog untried (it stops only for a long one).
async fn a_drain_sits_out_a_short_retry_after_and_goes_on(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.batch_size", 10)
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "100ms")
        .set("retry.max_delay", "100ms");
    let mut rows = Vec::new();
    for n in 0..200 {
        rows.push(crate::harness::NewRow::new(
            "call_log",
            Uuid::new_v4(),
            json!({"n": n}),
        ));
    }
    let mut ids = env.insert_rows(&rows).await;
    env.sink
        .push_reply(Reply::status(429).header("Retry-After", "1"));

    let out = env.drain().await;
    out.assert_success();

    assert!(
        out.elapsed >= Duration::from_millis(900),
        "the pause was sat out\n{out}"
    );
    let mut delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    delivered.sort();
    delivered.dedup();
    ids.sort();
    assert_eq!(delivered, ids);
    assert_eq!(env.count("sync_outbox").await, 0);
}

both_stores!(a_429_honours_an_http_date_retry_after);
async fn a_429_honours_an_http_date_retry_after(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let before = env.db_now().await;
    let date = (chrono::Utc::now() + Span::seconds(40))
        .format("%a, %d %b %Y %H:%M:%S GMT")
        .to_string();
    env.sink
        .set_mode(Mode::Reply(Reply::status(429).header("Retry-After", &date)));
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;

    env.drain().await.assert_code(3);

    let rows = env.outbox().await;
    assert_eq!(rows[0].last_error_type.as_deref(), Some("http_429"));
    let earliest = before + Span::seconds(40) - Span::seconds(2);
    assert!(
        rows[0].next_attempt_at >= earliest,
        "next_attempt_at {} ignores Retry-After {date}",
        rows[0].next_attempt_at
    );
}

both_stores!(a_408_is_retried_not_dead_lettered);
async fn a_408_is_retried_not_dead_lettered(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    env.sink.set_mode(Mode::Always(408));
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;

    env.drain().await.assert_code(3);

    assert_eq!(
        env.count("sync_outbox_dead_letters").await,
        0,
        "408 retries (SPEC §4)"
    );
    let rows = env.outbox().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].last_http_status, Some(408));
    assert_eq!(rows[0].attempts, 1);
}

both_stores!(a_redirect_is_not_followed_and_not_taken_as_delivered);
/// A login proxy or an http→https redirect in front of the Frontend: followed, a 302
/// turns into a GET without the entries whose 200 would mark the rows sent. The relay
/// does not follow it: the rows stay pending, retried like a 408, and the message says
/// where it pointed (without the query, which may hold a token).
async fn a_redirect_is_not_followed_and_not_taken_as_delivered(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    env.sink.set_mode(Mode::Reply(
        Reply::status(302).header("Location", "/login?next=%2Fapi&token=s3cr3t"),
    ));
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    let call = Uuid::new_v4();
    a_recording_file_row(&env, call).await;

    env.drain().await.assert_code(3).assert_no_panic();

    assert!(env.sink.strays().is_empty(), "no redirect was followed");
    assert_eq!(
        env.count("sync_outbox_sent").await,
        0,
        "nothing taken as delivered"
    );
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);
    let rows = env.outbox().await;
    assert_eq!(rows.len(), 2);
    for row in rows {
        assert_eq!(row.last_http_status, Some(302));
        assert_eq!(row.last_error_type.as_deref(), Some("http_4xx"));
        assert_eq!(row.attempts, 1);
        let message = row.last_error.unwrap_or_default();
        assert!(
            message.contains("redirect") && message.contains("/login"),
            "{message}"
        );
        assert!(!message.contains("s3cr3t"), "{message}");
    }
}

both_stores!(answers_that_are_no_complete_http_answer_are_retried);
/// A 2xx whose body is cut off (a proxy that sends the status line before its
/// upstream is done, a connection reset) is no complete response (SPEC 4): the row
/// is not taken as delivered, and goes again. A status that is no HTTP status (600)
/// is a broken server's, retried as `http_5xx`, not dead-lettered as a refusal.
async fn answers_that_are_no_complete_http_answer_are_retried(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    // the cut answer last: a drain whose last request got no answer records the
    // sink as down, and the next drain's probe would charge nothing
    for (reply, error_type, http_status) in [
        (Reply::status(600), "http_5xx", Some(600)),
        (Reply::ok().cut(), "connect", None),
    ] {
        env.sink.set_mode(Mode::Reply(reply));
        let id = env
            .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
            .await;
        env.drain().await.assert_code(3).assert_no_panic();
        let sent_with_it = env
            .sink
            .all_entries()
            .iter()
            .filter(|e| e.outbox_id == id)
            .count();
        assert_eq!(sent_with_it, 1, "{error_type}");
        assert_eq!(env.count("sync_outbox_sent").await, 0, "{error_type}");
        assert_eq!(
            env.count("sync_outbox_dead_letters").await,
            0,
            "{error_type}"
        );
        let rows = env.outbox().await;
        let row = rows.iter().find(|r| r.id == id).expect("the row waits");
        assert_eq!(row.last_error_type.as_deref(), Some(error_type));
        assert_eq!(row.last_http_status, http_status);
        assert_eq!(row.attempts, 1, "{error_type}");
        env.db.execute("DELETE FROM sync_outbox").await;
        env.sink.clear();
    }
}

both_stores!(an_error_status_whose_body_stalls_is_that_status);
/// A 400 whose body stops after its first bytes, the connection left open, past
/// `ingest.timeout`: the status line is the Frontend's answer, so the row is a dead
/// letter `http_4xx` at once, with what came of the body. It used to be a `timeout`,
/// retried for ever (the same 400 cut off mid-body was an `http_4xx`). A 2xx whose
/// body stalls stays no complete answer (`answers_that_are_no_complete_http_answer_are_retried`).
async fn an_error_status_whose_body_stalls_is_that_status(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("ingest.timeout", "1s");
    env.sink.set_mode(Mode::Reply(
        Reply::status(400)
            .body(r#"{"error":"callLogId is"#)
            .stall(Duration::from_secs(5)),
    ));
    let id = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    let out = env.drain().await;
    out.assert_code(3).assert_no_panic();
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1, "{out}");
    assert_eq!(dead[0].outbox_id, id);
    assert_eq!(dead[0].error_type, "http_4xx", "{out}");
    assert_eq!(dead[0].http_status, Some(400));
    assert_eq!(
        dead[0].response_body.as_deref(),
        Some(r#"{"error":"callLogId is"#)
    );
    assert!(
        out.elapsed < Duration::from_secs(4),
        "the drain waited for the body: {:?}",
        out.elapsed
    );
}

both_stores!(a_file_that_cannot_be_read_is_unreadable);
async fn a_file_that_cannot_be_read_is_unreadable(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    let call = Uuid::new_v4();
    // A directory where the audio file should be: it exists, but is no readable file.
    std::fs::create_dir_all(env.root.join(format!("{call}/mixed.wav"))).unwrap();
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        file_payload(call, &format!("{call}/mixed.wav")),
    )
    .await;

    env.drain().await.assert_code(3);

    let rows = env.outbox().await;
    assert_eq!(rows.len(), 1, "file_unreadable retries (bounded)");
    assert_eq!(
        rows[0].last_error_type.as_deref(),
        Some("file_unreadable"),
        "{:#?}",
        rows[0]
    );
    assert_eq!(env.sink.request_count(), 0);
}

both_stores!(a_fifo_where_a_recording_should_be_is_unreadable_and_holds_up_nothing);
/// A FIFO (or socket, or device) in place of the audio file: opening it for reading
/// would wait for a writer that never comes. It is refused at once as
/// `file_unreadable`, and the rows claimed with it are delivered and settled (the open
/// used to block a runtime thread: the drain never ended, not even on SIGTERM).
async fn a_fifo_where_a_recording_should_be_is_unreadable_and_holds_up_nothing(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    let fifo_call = Uuid::new_v4();
    std::fs::create_dir_all(env.root.join(fifo_call.to_string())).expect("a call directory");
    let fifo = env.root.join(format!("{fifo_call}/mixed.wav"));
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("run mkfifo");
    assert!(made.success(), "mkfifo {}", fifo.display());
    let fifo_row = env
        .insert(
            "recording_file",
            Uuid::new_v4(),
            file_payload(fifo_call, &format!("{fifo_call}/mixed.wav")),
        )
        .await;
    let good_call = Uuid::new_v4();
    let (audio, _) = write_recording(&env, good_call);
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        file_payload(good_call, &format!("{good_call}/mixed.wav")),
    )
    .await;
    for _ in 0..2 {
        env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
            .await;
    }

    let out = env
        .cmd(["drain"])
        .timeout(Duration::from_secs(60))
        .output()
        .await;
    out.assert_code(3);

    let rows = env.outbox().await;
    assert_eq!(rows.len(), 1, "only the FIFO's row is left: {rows:#?}");
    assert_eq!(rows[0].id, fifo_row);
    assert_eq!(rows[0].last_error_type.as_deref(), Some("file_unreadable"));
    let message = rows[0].last_error.clone().unwrap_or_default();
    assert!(message.contains("not a regular file"), "{message}");
    assert_eq!(env.sink.entries().len(), 2, "both call logs delivered");
    let uploads = env.sink.uploads();
    assert_eq!(uploads.len(), 1, "the other recording uploaded");
    assert_eq!(
        uploads[0].part("audio").map(|p| p.bytes.as_slice()),
        Some(audio.as_slice())
    );
}

both_stores!(a_sink_down_as_a_whole_does_not_burn_attempts);
async fn a_sink_down_as_a_whole_does_not_burn_attempts(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.outage_threshold", 2)
        .set("retry.max_attempts", 3);
    env.sink.set_mode(Mode::Always(503));
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            env.insert("call_log", Uuid::new_v4(), json!({"n": n}))
                .await,
        );
    }
    let relay = env.spawn_run(&[]);

    // Well past the threshold: the relay is probing a sink it takes as down.
    env.sink
        .wait_for_requests(10, Duration::from_secs(20))
        .await;
    assert_eq!(
        env.count("sync_outbox_dead_letters").await,
        0,
        "an outage kills no row"
    );
    for row in env.outbox().await {
        assert!(
            row.attempts < 2,
            "charged from the failure that took the sink as down on: {row:#?}"
        );
    }

    env.sink.set_mode(Mode::Accept);
    env.sink.wait_for_entries(3, Duration::from_secs(20)).await;
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();
    let mut delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    delivered.sort();
    assert_eq!(delivered, ids);
    assert_eq!(env.count("sync_outbox").await, 0);
}

both_stores!(a_default_meta_file_linked_out_of_the_root_is_not_sent);
async fn a_default_meta_file_linked_out_of_the_root_is_not_sent(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let secret = b"{\"secret\":\"outside-the-root\"}";
    std::fs::write(env.work_dir().join("secret.json"), secret).unwrap();
    let call = Uuid::new_v4();
    fixtures::write_file(&env.root, &format!("{call}/mixed.wav"), &fixtures::wav(10));
    std::os::unix::fs::symlink(
        env.work_dir().join("secret.json"),
        env.root.join(format!("{call}/meta.json")),
    )
    .unwrap();
    let id = env
        .insert(
            "recording_file",
            Uuid::new_v4(),
            file_payload(call, &format!("{call}/mixed.wav")),
        )
        .await;

    env.drain().await.assert_code(3);

    for upload in env.sink.all_uploads() {
        for part in &upload.parts {
            assert_ne!(
                part.bytes, secret,
                "a file outside the root was sent as `{}`",
                part.name
            );
        }
    }
    assert_dead(&env.dead_letters().await, id, "path_denied", 1);
}

/// A recording file that shrinks while it is being uploaded: the upload breaks, and
/// the failure is the file's (`file_unreadable`, retried), not the sink's (`connect`,
/// which would count towards taking the sink as down).
#[tokio::test]
async fn a_file_that_shrinks_during_its_upload_is_unreadable() {
    let mut env = TestEnv::migrated().await;
    retry_in_an_hour(&mut env);
    env.config.set("dispatch.outage_threshold", 1);
    let call = Uuid::new_v4();
    let relative = format!("{call}/mixed.wav");
    // far more than the relay reads ahead plus what the sockets buffer
    let audio = vec![7u8; 64 * 1024 * 1024];
    crate::harness::fixtures::write_file(&env.root, &relative, &audio);
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        file_payload(call, &relative),
    )
    .await;
    // the sink leaves the body unread for a while, so the upload stalls part-way
    env.sink.stall_file_bodies(Duration::from_secs(3));

    let relay = env.cmd(["drain"]).spawn();
    crate::harness::wait_until(Duration::from_secs(20), "the row to be claimed", || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM sync_outbox WHERE claim_token IS NOT NULL",
        )
        .fetch_one(env.db.pg())
        .await
        .unwrap_or(0)
            == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(env.root.join(&relative))
        .unwrap();
    file.set_len(1024 * 1024).unwrap();
    drop(file);
    let out = relay.wait(Duration::from_secs(30)).await;
    out.assert_code(3).assert_no_panic();

    let rows = env.outbox().await;
    assert_eq!(rows.len(), 1, "retried, not lost\n{out}");
    let row = &rows[0];
    assert_eq!(
        row.last_error_type.as_deref(),
        Some("file_unreadable"),
        "{row:#?}\n{out}"
    );
    assert_eq!(row.attempts, 1, "{row:#?}");
    let message = row.last_error.as_deref().unwrap_or_default();
    assert!(
        message.contains(&relative) && message.contains("shorter"),
        "the message names the file and what happened: {message}"
    );
    assert!(
        !out.stderr.contains("ingest sink is down"),
        "a file's failure does not take the sink down\n{out}"
    );
}

both_stores!(any_named_entity_type_goes_to_sync_and_a_blank_one_is_unknown);
async fn any_named_entity_type_goes_to_sync_and_a_blank_one_is_unknown(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let mut routable = Vec::new();
    for t in ["billing:invoice", "crm/contact", "Call Log", "überweisung"] {
        routable.push(env.insert(t, Uuid::new_v4(), json!({"t": t})).await);
    }
    let blank = env.insert(" ", Uuid::new_v4(), json!({"n": 1})).await;
    // a line break in the name would also forge a log line, were it logged raw
    let forged = "FORGED serversync::app: all rows delivered";
    let control = env
        .insert(&format!("call\n{forged}"), Uuid::new_v4(), json!({"n": 2}))
        .await;

    let out = env.drain().await;
    out.assert_code(3);
    assert!(
        !out.stderr.lines().any(|line| line.starts_with(forged)),
        "a forged log line\n{out}"
    );

    let mut delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    delivered.sort();
    assert_eq!(
        delivered, routable,
        "every named type goes to /api/ingest/sync"
    );
    let types: Vec<String> = env
        .sink
        .entries()
        .iter()
        .map(|e| e.entity_type.clone())
        .collect();
    assert!(types.contains(&"billing:invoice".to_string()), "{types:?}");
    let dead = env.dead_letters().await;
    assert_dead(&dead, blank, "unknown_entity_type", 1);
    assert_dead(&dead, control, "unknown_entity_type", 1);
}

/// A 10 KB entity type is not routable, and its dead-lettering logs a line of normal
/// length: the name's first 100 bytes (it used to log all 10 KB, and quote them all
/// in the message).
#[tokio::test]
async fn a_huge_entity_type_is_dead_lettered_with_a_log_line_of_normal_length() {
    let env = TestEnv::migrated().await;
    let huge = "t".repeat(10_000);
    let id = env.insert(&huge, Uuid::new_v4(), json!({"n": 1})).await;
    let out = env.drain().await;
    out.assert_code(3);
    let longest = out.stderr.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 1_000, "a {longest}-byte log line\n{out}");
    let dead = env.dead_letters().await;
    let d = assert_dead(&dead, id, "unknown_entity_type", 1);
    assert!(
        d.error_message.contains("(10000 bytes) is not routable") && d.error_message.len() < 300,
        "{}",
        d.error_message
    );
}

both_stores!(the_upload_endpoint_is_no_longer_taken_as_down_once_no_file_waits);
/// The upload endpoint is taken as down (three files failed); then the files leave
/// the outbox by other means (here deleted, as another relay's delivery or an
/// operator would): with no file waiting, `serversync_upload_up` is 1 again, not 0
/// for good with nothing held back (audit).
async fn the_upload_endpoint_is_no_longer_taken_as_down_once_no_file_waits(backend: Backend) {
    let mut env = an_outage_of_many_quick_retries(backend).await;
    let metrics = MetricsEndpoint::enable(&mut env);
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::File(_) => Reply::status(500).body("blob storage unavailable"),
        Incoming::Sync(_) => Reply::ok(),
    }));
    for n in 0..3 {
        let call = Uuid::new_v4();
        env.insert("call_log", call, json!({"n": n})).await;
        a_recording_file_row(&env, call).await;
    }
    let relay = env.spawn_run(&metrics.flag());
    metrics
        .wait_for_sample("serversync_upload_up", 0.0, Duration::from_secs(15))
        .await;
    env.db
        .execute("DELETE FROM sync_outbox WHERE entity_type = 'recording_file'")
        .await;
    metrics
        .wait_for_sample("serversync_upload_up", 1.0, Duration::from_secs(10))
        .await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    assert!(
        out.stderr
            .contains("no recording files wait in the outbox any more"),
        "{}",
        out.stderr
    );
}

both_stores!(a_row_retried_while_its_claims_other_rows_are_out_goes_again_without_waiting);
/// A row fails (500) and is settled for a retry while the other rows of its claim
/// are still out (a slow sink): once due, another worker claims it and sends it at
/// once. It used to stay listed as this relay's in flight, so the new claim took it
/// for a row given out twice, waited for the first claim's end, and logged that the
/// database had lost a claim (audit).
async fn a_row_retried_while_its_claims_other_rows_are_out_goes_again_without_waiting(
    backend: Backend,
) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.batch_size", 1)
        .set("ingest.timeout", "10s")
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "50ms")
        .set("retry.max_delay", "50ms")
        .set("dispatch.outage_threshold", 10);
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::Sync(req) if req.entries().iter().any(|e| e.payload["flaky"] == true) => {
            Reply::status(500)
        }
        _ => Reply::ok().delay(Duration::from_secs(3)),
    }));
    let flaky = env
        .insert("call_log", Uuid::new_v4(), json!({"flaky": true}))
        .await;
    for n in 0..5 {
        env.insert("call_log", Uuid::new_v4(), json!({"n": n}))
            .await;
    }
    let relay = env.spawn_run(&[]);
    // the flaky row is tried a few times while the slow requests are out
    crate::harness::wait_until(
        Duration::from_secs(10),
        "the flaky row tried thrice",
        || async {
            env.sink
                .sync_requests()
                .iter()
                .filter(|r| r.entries().iter().any(|e| e.outbox_id == flaky))
                .count()
                >= 3
        },
    )
    .await;
    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success();
    assert!(!out.stderr.contains("claimed again"), "{}", out.stderr);
}
