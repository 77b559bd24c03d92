//! Relay core, black box: the real binary against a real database and the fake
//! Frontend. Each file covers one area of the contract (SPEC §1–6). Behaviour both
//! stores share is tested on both ([`both_stores!`](crate::harness::both_stores)); what
//! only one store has (a PostgreSQL URL, SQLite's one-relay lock) is tested on that one.

mod cli;
mod delivery;
mod dlq;
mod errors;
mod hangs;
mod secrets;
mod sizes;
mod sqlite;
mod status;
mod tls;

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::env::{DeadLetter, OutboxRow};
use crate::harness::{fixtures, wait_until, Output, TestEnv};

/// Run `drain` until `done` holds, at most 8 times. A drain ends when nothing is due;
/// a retry scheduled a few milliseconds out may still be pending then, so the next run
/// waits for it to fall due. Returns the last run's output.
async fn drain_until<F, Fut>(env: &TestEnv, what: &str, done: F) -> Output
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    drain_until_with(env, &[], what, done)
        .await
        .pop()
        .expect("ran")
}

/// [`drain_until`] with extra arguments for `drain`; returns every run's output.
async fn drain_until_with<F, Fut>(
    env: &TestEnv,
    args: &[&str],
    what: &str,
    mut done: F,
) -> Vec<Output>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut runs = Vec::new();
    for _ in 0..8 {
        let out = env.cmd(["drain"].iter().chain(args)).output().await;
        out.assert_no_panic();
        runs.push(out);
        if done().await {
            return runs;
        }
        wait_until(Duration::from_secs(5), "the retry to fall due", || async {
            env.count_waiting().await == 0
        })
        .await;
    }
    panic!(
        "still not {what} after 8 drains; last one:\n{}",
        runs.pop().expect("ran")
    );
}

/// Retryable failures wait an hour: a single drain leaves them pending.
fn retry_in_an_hour(env: &mut TestEnv) {
    env.config
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "1h")
        .set("retry.max_delay", "1h");
}

/// A call's recording file on disk: `<call>/mixed.wav` and `<call>/meta.json`.
/// Returns (audio bytes, meta bytes).
fn write_recording(env: &TestEnv, call: Uuid) -> (Vec<u8>, Vec<u8>) {
    let audio = fixtures::wav(4000);
    let meta = serde_json::to_vec(&json!({"callLogId": call, "channels": 1, "codec": "pcm_s16le"}))
        .unwrap();
    fixtures::write_file(&env.root, &format!("{call}/mixed.wav"), &audio);
    fixtures::write_file(&env.root, &format!("{call}/meta.json"), &meta);
    (audio, meta)
}

/// A recording file (`<call>/mixed.wav`, with its meta.json) on disk and its
/// `recording_file` row. Returns the row's id.
async fn a_recording_file_row(env: &TestEnv, call: Uuid) -> i64 {
    write_recording(env, call);
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        file_payload(call, &format!("{call}/mixed.wav")),
    )
    .await
}

/// A call's log (`{"id": call}`) and its recording file (`<call>/mixed.wav`, with its
/// meta.json), written to the outbox and the recordings root.
/// Returns (the call's id, audio bytes, meta bytes).
async fn a_call_with_its_recording(env: &TestEnv) -> (Uuid, Vec<u8>, Vec<u8>) {
    let call = Uuid::new_v4();
    let (audio, meta) = write_recording(env, call);
    env.insert("call_log", call, json!({"id": call})).await;
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        file_payload(call, &format!("{call}/mixed.wav")),
    )
    .await;
    (call, audio, meta)
}

fn file_payload(call: Uuid, file_path: &str) -> Value {
    json!({"callLogId": call, "filePath": file_path})
}

/// The only row left in `sync_outbox` after one failed attempt: retried, not lost,
/// with `error_type` recorded, one attempt charged and its history entry.
async fn the_row_left_for_retry(env: &TestEnv, error_type: &str) -> OutboxRow {
    let mut rows = env.outbox().await;
    assert_eq!(
        rows.len(),
        1,
        "the row stays in sync_outbox to be retried: {rows:#?}"
    );
    let row = rows.remove(0);
    assert_eq!(row.last_error_type.as_deref(), Some(error_type), "{row:#?}");
    assert_eq!(row.attempts, 1, "{row:#?}");
    assert_history(&row.attempt_errors, error_type, 1);
    row
}

/// One dead letter for `outbox_id`, with the expected type, attempt count and a
/// history of one well-formed entry per attempt.
#[track_caller]
fn assert_dead<'a>(
    dead: &'a [DeadLetter],
    outbox_id: i64,
    error_type: &str,
    attempts: i32,
) -> &'a DeadLetter {
    let matching: Vec<&DeadLetter> = dead.iter().filter(|d| d.outbox_id == outbox_id).collect();
    assert_eq!(
        matching.len(),
        1,
        "expected one dead letter for outbox row {outbox_id}: {dead:#?}"
    );
    let d = matching[0];
    assert_eq!(d.error_type, error_type, "{d:#?}");
    assert_eq!(d.attempts, attempts, "{d:#?}");
    assert!(
        !d.error_message.trim().is_empty(),
        "error_message is empty: {d:#?}"
    );
    assert_history(&d.attempt_errors, error_type, attempts as usize);
    assert!(d.dead_at >= d.created_at, "{d:#?}");
    if let (Some(first), Some(last)) = (d.first_attempt_at, d.last_attempt_at) {
        assert!(
            first <= last && last <= d.dead_at,
            "attempt timestamps out of order: {d:#?}"
        );
    } else {
        panic!("first_attempt_at and last_attempt_at must be set on a dead letter: {d:#?}");
    }
    d
}

/// `[{"attempt":1,"at":…,"errorType":…,"httpStatus":…,"message":…}, …]`, the last
/// one of type `last_type`.
#[track_caller]
fn assert_history(history: &Value, last_type: &str, len: usize) {
    let entries = history
        .as_array()
        .unwrap_or_else(|| panic!("attempt_errors is not an array: {history}"));
    assert_eq!(
        entries.len(),
        len,
        "one history entry per attempt: {history:#}"
    );
    for (i, entry) in entries.iter().enumerate() {
        assert_eq!(
            entry["attempt"],
            json!(i + 1),
            "attempts are numbered from 1: {history:#}"
        );
        let at = entry["at"]
            .as_str()
            .unwrap_or_else(|| panic!("`at` is not a string: {history:#}"));
        DateTime::parse_from_rfc3339(at)
            .unwrap_or_else(|e| panic!("`at` {at:?} is not RFC 3339: {e}"));
        assert!(
            entry["errorType"].is_string(),
            "errorType missing: {history:#}"
        );
        assert!(
            entry.get("httpStatus").is_some(),
            "httpStatus missing (null when none): {history:#}"
        );
        assert!(entry["message"].is_string(), "message missing: {history:#}");
    }
    if let Some(last) = entries.last() {
        assert_eq!(last["errorType"], last_type, "{history:#}");
    }
}

fn parse_time(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap_or_else(|e| panic!("{text:?} is not RFC 3339: {e}"))
        .with_timezone(&Utc)
}
