//! `serversync status --json` on a known backlog.

use serde_json::{json, Value};
use uuid::Uuid;

use crate::harness::TestEnv;

async fn status(env: &TestEnv) -> Value {
    let out = env.run(&["status", "--json"]).await;
    out.assert_success().assert_no_panic();
    out.json()
}

#[tokio::test]
async fn status_of_an_empty_outbox() {
    let env = TestEnv::migrated().await;
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

#[tokio::test]
async fn status_reports_a_known_backlog() {
    let env = TestEnv::migrated().await;
    // Two delivered now, one long ago.
    for _ in 0..2 {
        env.insert("call_log", Uuid::new_v4(), json!({})).await;
    }
    env.drain().await.assert_success();
    sqlx::query(
        "INSERT INTO sync_outbox_sent (id, entity_type, entity_id, created_at, sent_at, attempts)
         VALUES (900000, 'call_log', gen_random_uuid(), now() - interval '1 hour', now() - interval '10 minutes', 1)",
    )
    .execute(&env.db.pool)
    .await
    .unwrap();
    // Five pending: three due (the oldest two minutes old), two backing off.
    sqlx::query(
        "INSERT INTO sync_outbox (entity_type, entity_id, payload, created_at, next_attempt_at) VALUES
           ('call_log', gen_random_uuid(), '{}', now() - interval '120 seconds', now() - interval '1 second'),
           ('call_log', gen_random_uuid(), '{}', now(), now()),
           ('recording', gen_random_uuid(), '{}', now(), now()),
           ('call_log', gen_random_uuid(), '{}', now(), now() + interval '1 hour'),
           ('call_log', gen_random_uuid(), '{}', now(), now() + interval '1 hour')",
    )
    .execute(&env.db.pool)
    .await
    .unwrap();
    // Three dead letters of two types.
    sqlx::query(
        "INSERT INTO sync_outbox_dead_letters
           (outbox_id, entity_type, entity_id, payload, created_at, error_type, error_message, attempts, max_attempts)
         VALUES (800001, 'call_log', gen_random_uuid(), '{}', now(), 'http_4xx', 'HTTP 400', 1, 10),
                (800002, 'call_log', gen_random_uuid(), '{}', now(), 'http_4xx', 'HTTP 422', 1, 10),
                (800003, 'recording_file', gen_random_uuid(), '{}', now(), 'path_denied', 'escapes root', 1, 10)",
    )
    .execute(&env.db.pool)
    .await
    .unwrap();

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
}
