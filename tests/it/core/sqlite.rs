//! What only the SQLite store has: one relay per database file (a lock file keeps a
//! second one out, while the read-only commands still work), and a database file that
//! `migrate` creates.

use std::time::Duration;

use serde_json::json;
use uuid::Uuid;

use crate::harness::{Backend, TestEnv};

const ALREADY_RUNNING: &str = "another serversync relay is already running";

#[tokio::test]
async fn a_second_relay_on_the_same_file_is_refused_while_reads_still_work() {
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    let relay = env.spawn_run(&[]);
    // A delivered row means the relay is past start-up, holding the lock.
    let first = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.sink.wait_for_entries(1, Duration::from_secs(20)).await;

    for command in ["run", "drain"] {
        let out = env
            .cmd([command])
            .timeout(Duration::from_secs(30))
            .output()
            .await;
        out.assert_fails_with(ALREADY_RUNNING)
            .assert_single_stderr_line();
    }

    // status and dlq do not take the lock.
    let status = env.run(&["status", "--json"]).await;
    status.assert_success().assert_no_panic();
    assert_eq!(status.json()["pending"], json!(0), "{status}");
    let dlq = env.run(&["dlq", "list", "--json"]).await;
    dlq.assert_success().assert_no_panic();
    assert_eq!(dlq.json(), json!([]), "{dlq}");

    // The running relay is undisturbed.
    let second = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 2}))
        .await;
    env.sink.wait_for_entries(2, Duration::from_secs(20)).await;
    relay.stop_cleanly().await;
    let delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(delivered, [first, second], "each once, by the one relay");

    // Once it has stopped, the lock is free again.
    env.drain().await.assert_success();
}

#[tokio::test]
async fn migrate_creates_a_missing_database_file() {
    let mut env = TestEnv::new_on(Backend::Sqlite).await;
    let path = env.work_dir().join("fresh.db");
    assert!(!path.exists());
    env.config
        .set("database.url", format!("sqlite://{}", path.display()));

    env.migrate().await;

    assert!(path.is_file(), "{} was not created", path.display());
    let status = env.run(&["status", "--json"]).await;
    status.assert_success().assert_no_panic();
    assert_eq!(status.json()["pending"], json!(0), "{status}");
    env.run(&["drain"]).await.assert_success();
}

/// Several `migrate`s of one new file at once (every instance of a deployment
/// running it at start) all succeed, as on PostgreSQL (one opening the file while
/// another created it, or switched it to WAL, used to fail with `database is
/// locked`); a file in a directory that
/// does not exist is refused naming the directory, which `migrate` does not create.
#[tokio::test]
async fn concurrent_migrates_of_a_new_file_all_succeed() {
    let mut env = TestEnv::new_on(Backend::Sqlite).await;
    for round in 0..8 {
        let path = env.work_dir().join(format!("fresh-{round}.db"));
        env.config
            .set("database.url", format!("sqlite://{}", path.display()));
        let runs: Vec<_> = (0..5).map(|_| env.cmd(["migrate"]).output()).collect();
        for out in futures_util::future::join_all(runs).await {
            out.assert_success().assert_no_panic();
        }
        let status = env.run(&["status", "--json"]).await;
        status.assert_success();
        assert_eq!(status.json()["pending"], json!(0), "{status}");
    }
    let missing = env.work_dir().join("no-such-dir");
    env.config.set(
        "database.url",
        format!("sqlite://{}", missing.join("o.db").display()),
    );
    env.run(&["migrate"])
        .await
        .assert_fails_with(&format!(
            "its directory {} does not exist",
            missing.display()
        ))
        .assert_single_stderr_line();
}

/// SQLite does not enforce `entity_id uuid` or `payload jsonb`: a producer can write
/// anything. Such a row is dead-lettered as `payload_invalid`, and the dead letters
/// must still list and show, with the values as the producer wrote them.
#[tokio::test]
async fn a_dead_letter_with_an_id_that_is_no_uuid_still_lists_and_shows() {
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    env.db
        .execute(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
             VALUES ('call_log', 'not-a-uuid', '{}')",
        )
        .await;
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.drain().await.assert_code(3);
    assert_eq!(env.sink.entries().len(), 1, "the good row went through");

    let out = env.run(&["dlq", "list", "--json"]).await;
    out.assert_success();
    let list = out.json();
    let dead = list.as_array().expect("an array");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["entityId"], json!("not-a-uuid"));
    assert_eq!(dead[0]["errorType"], json!("payload_invalid"));
    let id = dead[0]["id"].as_i64().expect("id").to_string();
    env.run(&["dlq", "show", &id]).await.assert_success();
    env.run(&["dlq", "list"]).await.assert_success();
}

/// SQLite keeps values as producers bind them: a UUID as 16 bytes (sqlx's encoding of
/// `uuid::Uuid`), JSON as bytes, a UUID in upper case or in braces. Such rows are
/// delivered like any other, with the UUID in its canonical spelling, and a call's
/// rows share one ordering key however its id is spelled. (A blob used to fail every
/// claim, so nothing at all was delivered; an upper-case id keyed its call apart from
/// the lower-case `callLogId` of its recording.)
#[tokio::test]
async fn values_bound_as_bytes_or_spelled_otherwise_are_delivered_in_order() {
    let mut env = TestEnv::migrated_on(Backend::Sqlite).await;
    env.config
        .set("dispatch.batch_size", 1)
        .set("retry.policy", "fixed")
        .set("retry.base_delay", "100ms")
        .set("retry.max_delay", "100ms");
    let a = Uuid::new_v4();
    let b = Uuid::new_v4();
    let c = Uuid::new_v4();
    let hex = a.simple().to_string();
    let upper_a = a.to_string().to_uppercase();
    env.db
        .execute(&format!(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload) VALUES \
             ('call_log', X'{hex}', CAST('{{\"call\":\"a\"}}' AS BLOB)), \
             ('call_log', '{{{upper_b}}}', '{{\"call\":\"b\"}}'), \
             ('recording', '{rec_a}', '{{\"callLogId\":\"{upper_a}\"}}'), \
             ('recording', '{rec_b}', '{{\"callLogId\":\"{simple_b}\"}}')",
            upper_b = b.to_string().to_uppercase(),
            rec_a = Uuid::new_v4().to_string().to_uppercase(),
            rec_b = Uuid::new_v4(),
            simple_b = b.simple(),
        ))
        .await;
    // a key the producer sets itself, bound as 16 bytes, and the call's recording
    // keyed by its `callLogId`
    env.db
        .execute(&format!(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload, ordering_key) VALUES \
             ('call_log', '{c}', '{{\"call\":\"c\"}}', X'{c_hex}'); \
             INSERT INTO sync_outbox (entity_type, entity_id, payload) VALUES \
             ('recording', '{rec_c}', '{{\"callLogId\":\"{c}\"}}')",
            c_hex = c.simple(),
            rec_c = Uuid::new_v4(),
        ))
        .await;
    // a key of 16 printable characters bound as bytes is its text, as bound as text
    env.db
        .execute(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload, ordering_key) VALUES \
             ('note', '00000000-0000-4000-8000-000000000001', '{}', CAST('order-0000000042' AS BLOB)), \
             ('note', '00000000-0000-4000-8000-000000000002', '{}', 'order-0000000042'), \
             ('note', '00000000-0000-4000-8000-000000000003', '{}', \
              X'00eebc999c0b4ef8bb6d6bb9bd380a11')",
        )
        .await;
    let mut rows = env.outbox().await;
    let notes = rows.split_off(6);
    let note_keys: Vec<Option<&str>> = notes.iter().map(|r| r.ordering_key.as_deref()).collect();
    assert_eq!(
        note_keys,
        [
            Some("order-0000000042"),
            Some("order-0000000042"),
            // a UUID whose first byte is 0 is still a UUID
            Some("00eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        ]
    );
    env.db
        .execute("DELETE FROM sync_outbox WHERE entity_type = 'note'")
        .await;
    let keys: Vec<Option<String>> = rows.iter().map(|r| r.ordering_key.clone()).collect();
    assert_eq!(
        keys,
        [a, b, a, b, c, c].map(|id| Some(id.to_string())),
        "one canonical key per call"
    );
    assert_eq!(rows[0].entity_id, a);
    assert_eq!(rows[1].entity_id, b);

    // the first request fails: that call's recording waits for its call log
    env.sink.fail_next(1, 500);
    super::drain_until(&env, "every row delivered", || async {
        env.count("sync_outbox").await == 0
    })
    .await;

    let entries = env.sink.entries();
    assert_eq!(entries.len(), 6, "{entries:#?}");
    let position = |id: i64| entries.iter().position(|e| e.outbox_id == id);
    for (log, recording) in [
        (rows[0].id, rows[2].id),
        (rows[1].id, rows[3].id),
        (rows[4].id, rows[5].id),
    ] {
        assert!(
            matches!((position(log), position(recording)), (Some(l), Some(r)) if l < r),
            "both delivered, the call log first: {entries:#?}"
        );
    }
    let a_entry = entries
        .iter()
        .find(|e| e.outbox_id == rows[0].id)
        .expect("the blob row delivered");
    assert_eq!(a_entry.entity_id, a.to_string());
    assert_eq!(a_entry.payload, json!({"call": "a"}));
}
