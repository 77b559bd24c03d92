//! `serversync status --json` on a known backlog, and what a drain says it left.

use serde_json::{json, Value};
use uuid::Uuid;

use super::retry_in_an_hour;
use crate::harness::{both_stores, Backend, Mode, Reply, TestEnv};

async fn status(env: &TestEnv) -> Value {
    let out = env.run(&["status", "--json"]).await;
    out.assert_success().assert_no_panic();
    out.json()
}

both_stores!(status_of_an_empty_outbox);
async fn status_of_an_empty_outbox(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let s = status(&env).await;
    for key in [
        "pending",
        "due",
        "in_flight",
        "dead_letters",
        "sent_last_5m",
    ] {
        assert_eq!(s[key], json!(0), "{key} in {s:#}");
    }
    assert!(
        s.get("oldest_pending_age_seconds")
            .is_some_and(Value::is_null),
        "null when empty: {s:#}"
    );
    assert_eq!(s["dead_letters_by_error_type"], json!({}), "{s:#}");
}

/// With `retention.delete_sent`, delivered rows leave no record to count: the text
/// says so rather than reading as "nothing sent" (`--json` keeps its number).
#[tokio::test]
async fn status_says_sent_rows_are_not_counted_when_no_records_are_kept() {
    let mut env = TestEnv::migrated().await;
    env.config.set("retention.delete_sent", true);
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.drain().await.assert_success();
    let out = env.run(&["status"]).await;
    out.assert_success();
    assert!(
        out.stdout
            .contains("sent (last 5m): 0 (not counted: retention.delete_sent = true"),
        "{out}"
    );
    assert_eq!(status(&env).await["sent_last_5m"], json!(0));

    env.config.set("retention.delete_sent", false);
    env.insert("call_log", Uuid::new_v4(), json!({"n": 2}))
        .await;
    env.drain().await.assert_success();
    let out = env.run(&["status"]).await;
    assert!(out.stdout.contains("sent (last 5m): 1\n"), "{out}");
}

/// An operator's command that meets a lock held on the outbox (a migration, a `LOCK
/// TABLE`, a long transaction) says so after 10 s, in one line, instead of hanging
/// for as long as the lock is held.
#[tokio::test]
async fn status_says_what_holds_it_up_instead_of_waiting_on_a_lock_for_ever() {
    let env = TestEnv::migrated().await;
    let holder = env.db.hold_lock("sync_outbox").await;
    let started = std::time::Instant::now();
    let out = env.run(&["status"]).await;
    let took = started.elapsed();
    holder.rollback().await.expect("release");
    out.assert_fails_with("held a lock on the outbox's tables")
        .assert_single_stderr_line();
    assert!(
        took < std::time::Duration::from_secs(30),
        "waited {took:?}\n{out}"
    );
    env.run(&["status"]).await.assert_success();
}

both_stores!(status_reports_a_known_backlog);
async fn status_reports_a_known_backlog(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    // Two delivered now, one long ago.
    for _ in 0..2 {
        env.insert("call_log", Uuid::new_v4(), json!({})).await;
    }
    env.drain().await.assert_success();
    // Timestamps and ids are written in each backend's own form.
    let at = |seconds: i64| env.db.now_plus(seconds);
    let id = || format!("'{}'", Uuid::new_v4());
    env.db
        .execute(&format!(
            "INSERT INTO sync_outbox_sent (id, entity_type, entity_id, created_at, sent_at, attempts)
             VALUES (900000, 'call_log', {}, {}, {}, 1)",
            id(),
            at(-3600),
            at(-600)
        ))
        .await;
    // Five pending: three due (the oldest two minutes old), two backing off.
    let pending = [
        ("call_log", -120, -1),
        ("call_log", 0, 0),
        ("recording", 0, 0),
        ("call_log", 0, 3600),
        ("call_log", 0, 3600),
    ];
    for (entity_type, created, next_attempt) in pending {
        env.db
            .execute(&format!(
                "INSERT INTO sync_outbox (entity_type, entity_id, payload, created_at, next_attempt_at)
                 VALUES ('{entity_type}', {}, '{{}}', {}, {})",
                id(),
                at(created),
                at(next_attempt)
            ))
            .await;
    }
    // Three dead letters of two types.
    let dead = [
        (800001, "call_log", "http_4xx", "HTTP 400"),
        (800002, "call_log", "http_4xx", "HTTP 422"),
        (800003, "recording_file", "path_denied", "escapes root"),
    ];
    for (outbox_id, entity_type, error_type, message) in dead {
        env.db
            .execute(&format!(
                "INSERT INTO sync_outbox_dead_letters
                   (outbox_id, entity_type, entity_id, payload, created_at, error_type, error_message,
                    attempts, max_attempts)
                 VALUES ({outbox_id}, '{entity_type}', {}, '{{}}', {}, '{error_type}', '{message}', 1, 10)",
                id(),
                at(0)
            ))
            .await;
    }

    let s = status(&env).await;
    assert_eq!(s["pending"], json!(5), "{s:#}");
    assert_eq!(s["due"], json!(3), "{s:#}");
    assert_eq!(s["in_flight"], json!(0), "{s:#}");
    let age = s["oldest_pending_age_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("a number: {s:#}"));
    assert!(
        (120.0..180.0).contains(&age),
        "oldest pending is ~120 s old: {s:#}"
    );
    assert_eq!(s["dead_letters"], json!(3), "{s:#}");
    assert_eq!(
        s["dead_letters_by_error_type"],
        json!({"http_4xx": 2, "path_denied": 1}),
        "{s:#}"
    );
    assert_eq!(s["sent_last_5m"], json!(2), "{s:#}");
    assert_eq!(
        s["waiting_behind_key"],
        json!(0),
        "keys all different: {s:#}"
    );
}

/// A call's log and its recording, for a sink that fails everything with a 500 and
/// retries an hour later.
async fn a_call_log_and_its_recording_behind_a_failing_sink(backend: Backend) -> (TestEnv, Uuid) {
    let mut env = TestEnv::migrated_on(backend).await;
    retry_in_an_hour(&mut env);
    env.sink.set_mode(Mode::Always(500));
    let call = Uuid::new_v4();
    env.insert("call_log", call, json!({"id": call})).await;
    env.insert("recording", Uuid::new_v4(), json!({"callLogId": call}))
        .await;
    (env, call)
}

both_stores!(status_counts_the_rows_behind_an_older_row_of_their_key);
/// A call's log the Frontend failed, waiting an hour for its retry, holds back the
/// call's recording and file; another call's log, also waiting, holds back nothing.
async fn status_counts_the_rows_behind_an_older_row_of_their_key(backend: Backend) {
    let (env, call) = a_call_log_and_its_recording_behind_a_failing_sink(backend).await;
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        json!({"callLogId": call, "filePath": "a.wav"}),
    )
    .await;
    let other = Uuid::new_v4();
    env.insert("call_log", other, json!({"id": other})).await;
    env.drain().await.assert_code(3);

    let s = status(&env).await;
    assert_eq!(s["pending"], json!(4), "{s:#}");
    assert_eq!(s["waiting_behind_key"], json!(2), "{s:#}");
    let out = env.run(&["status"]).await;
    out.assert_success();
    assert!(
        out.stdout
            .contains("behind key:     2 (waiting for an older row of their ordering key)"),
        "{out}"
    );
}

both_stores!(a_drain_says_how_many_rows_it_left_that_were_not_due);
/// A call's log the Frontend failed, waiting an hour for its retry, and the call's
/// recording behind it: a later drain finds nothing due and exits 0, as "everything
/// due now" was delivered, but says that two rows are still in the outbox, where a
/// cron job's log used to read as if it were empty. An empty outbox adds nothing.
async fn a_drain_says_how_many_rows_it_left_that_were_not_due(backend: Backend) {
    let (env, _) = a_call_log_and_its_recording_behind_a_failing_sink(backend).await;
    let out = env.drain().await;
    out.assert_code(3);
    assert!(
        out.stdout.contains("left for retry 1")
            && out.stdout.contains(
                "drain: 1 more row is in the outbox, not due during this drain (behind an \
                 older row of their ordering key)"
            ),
        "the log left for retry, the recording behind it\n{out}"
    );

    env.sink.set_mode(Mode::Accept);
    let out = env.drain().await;
    out.assert_code(0);
    assert!(
        out.stdout.contains("drain: delivered 0")
            && out.stdout.contains(
                "drain: 2 more rows are in the outbox, not due during this drain (1 behind \
                     an older row of its ordering key, the rest waiting for a retry or held by \
                     another relay)"
            ),
        "{out}"
    );

    env.db.execute("DELETE FROM sync_outbox").await;
    let out = env.drain().await;
    out.assert_code(0);
    assert!(!out.stdout.contains("in the outbox"), "{out}");
}

/// `status` says, in JSON and text, that no relay has the sink recorded as down.
async fn no_sink_recorded_down(env: &TestEnv) {
    let s = status(env).await;
    assert_eq!(s["sinks_down"], json!([]), "{s:#}");
    let out = env.run(&["status"]).await;
    assert!(
        out.stdout.contains("ingest sink:    not recorded as down"),
        "{out}"
    );
}

both_stores!(status_and_check_say_which_sink_a_relay_recorded_as_down_until_it_answers);
/// A drain against a Frontend that answers nothing in time (an empty batch neither)
/// records the sink as down; `status`, which is what an operator runs first, says so
/// (which sink, since when), in text and JSON, until a relay sees it answer again, and
/// `check` warns that relays will probe it first.
async fn status_and_check_say_which_sink_a_relay_recorded_as_down_until_it_answers(
    backend: Backend,
) {
    let mut env = TestEnv::migrated_on(backend).await;
    no_sink_recorded_down(&env).await;

    env.config.set("ingest.timeout", "300ms");
    env.sink.set_mode(Mode::Reply(
        Reply::ok().delay(std::time::Duration::from_secs(5)),
    ));
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.drain().await.assert_code(3);

    let s = status(&env).await;
    let sink = env.sink.url().trim_end_matches('/').to_string() + "/";
    let down = s["sinks_down"].as_array().expect("a list");
    assert_eq!(down.len(), 1, "{s:#}");
    assert_eq!(down[0]["sink"], json!(sink), "{s:#}");
    let since = down[0]["down_since"].as_str().expect("a time");
    let since = chrono::DateTime::parse_from_rfc3339(since).expect("RFC 3339");
    let age = chrono::Utc::now() - since.to_utc();
    assert!(age.num_seconds().abs() < 60, "recorded just now: {since}");
    assert_eq!(down[0]["configured"], json!(true), "{s:#}");
    let out = env.run(&["status"]).await;
    assert!(
        out.stdout.contains("ingest sink:    DOWN since") && out.stdout.contains(&sink),
        "{out}"
    );
    assert!(!out.stdout.contains("not this configuration's"), "{out}");
    // seen from a configuration with another ingest.base_url (after a move, say):
    // listed still, and said not to be its own
    let elsewhere = ["--ingest-url", "http://127.0.0.1:9/"];
    let out = env
        .run(&[&elsewhere[..], &["status", "--json"]].concat())
        .await;
    out.assert_success();
    assert_eq!(
        out.json()["sinks_down"][0]["configured"],
        json!(false),
        "{out}"
    );
    let out = env.run(&[&elsewhere[..], &["status"]].concat()).await;
    assert!(
        out.stdout.contains(&sink)
            && out
                .stdout
                .contains("not this configuration's ingest.base_url"),
        "{out}"
    );
    let out = env.run(&["check"]).await;
    assert!(
        out.stdout.contains("recorded as down by a relay since"),
        "{out}"
    );

    // back: the next drain's probe finds it answering, and clears the record
    env.sink.set_mode(Mode::Accept);
    env.drain().await.assert_code(0);
    no_sink_recorded_down(&env).await;
    let out = env.run(&["check"]).await;
    out.assert_success();
    assert!(!out.stdout.contains("recorded as down"), "{out}");
}

/// SQLite keeps `created_at` as the producer wrote it, and text times in different
/// spellings do not sort by time (`2026-12-07 17:00:00` sorts before
/// `2026-12-07T15:00:00Z`): the oldest pending age is the oldest time, not the
/// smallest text (it said 0 s for a row two hours old). A `created_at` that is no
/// time text is left out, as PostgreSQL leaves out infinity.
#[tokio::test]
async fn status_finds_the_oldest_created_at_however_sqlite_spells_it() {
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    env.db
        .execute(&format!(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload, created_at) VALUES \
             ('call_log', '{}', '{{}}', strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-2 hours')), \
             ('call_log', '{}', '{{}}', CURRENT_TIMESTAMP), \
             ('call_log', '{}', '{{}}', 1770458730)",
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        ))
        .await;
    let s = status(&env).await;
    assert_eq!(s["pending"], json!(3), "{s:#}");
    let age = s["oldest_pending_age_seconds"]
        .as_f64()
        .unwrap_or_else(|| panic!("a number: {s:#}"));
    assert!(
        (7190.0..7300.0).contains(&age),
        "the oldest row is two hours old: {s:#}"
    );
}
