//! Checks of the harness itself, independent of the relay: if these fail, every
//! other failure is suspect.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::pg::{test_db, PrivatePg};
use crate::harness::{fixtures, Mode, Reply, Sink};

#[tokio::test]
async fn each_test_gets_a_fresh_empty_database() {
    let (a, b) = tokio::join!(test_db(), test_db());
    assert_ne!(a.name, b.name);
    for db in [&a, &b] {
        let current: String = sqlx::query_scalar("SELECT current_database()")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(current, db.name);
        let tables: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(tables, 0, "a new database has no tables");
        assert!(
            db.url.starts_with("postgres://postgres@127.0.0.1:"),
            "{}",
            db.url
        );
    }
}

#[tokio::test]
async fn a_private_cluster_stops_and_restarts_with_its_data() {
    let pg = PrivatePg::start_new().await;
    let db = pg.create_database().await;
    sqlx::raw_sql("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")
        .execute(&db.pool)
        .await
        .unwrap();
    db.pool.close().await;

    pg.stop().await;
    let down = <sqlx::PgConnection as sqlx::Connection>::connect(&db.url).await;
    assert!(down.is_err(), "the server is down after stop()");

    pg.start().await;
    let pool = sqlx::PgPool::connect(&db.url)
        .await
        .expect("reconnect on the same port");
    let v: i32 = sqlx::query_scalar("SELECT v FROM t")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(v, 42);
}

#[tokio::test]
async fn the_sink_records_entries_and_follows_injected_faults() {
    let sink = Sink::start();
    let http = reqwest::Client::new();
    let url = format!("{}/api/ingest/sync", sink.url());
    let body = |id: i64, poison: bool| {
        json!({"entries": [{"outboxId": id, "entityType": "call_log", "entityId": "e",
                            "payload": {"poison": poison}, "createdAt": "2026-01-01T00:00:00Z"}]})
    };
    let post = |b: serde_json::Value| {
        http.post(&url)
            .header("Idempotency-Key", "k")
            .header("Content-Type", "application/json")
            .body(b.to_string())
            .send()
    };

    sink.fail_next(1, 500);
    assert_eq!(post(body(1, false)).await.unwrap().status(), 500);
    assert_eq!(post(body(1, false)).await.unwrap().status(), 200);
    sink.set_mode(Mode::RejectPoison);
    assert_eq!(post(body(2, true)).await.unwrap().status(), 400);
    assert_eq!(post(body(3, false)).await.unwrap().status(), 200);
    sink.push_reply(Reply::status(429).header("Retry-After", "7"));
    let limited = post(body(4, false)).await.unwrap();
    assert_eq!(limited.status(), 429);
    assert_eq!(limited.headers()["retry-after"], "7");

    let ids: Vec<i64> = sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(ids, [1, 3], "only 2xx answers count as delivered");
    assert_eq!(sink.all_entries().len(), 5);
    assert_eq!(sink.request_count(), 5);
    assert_eq!(
        sink.sync_requests()[0].headers.get("idempotency-key"),
        Some("k")
    );

    sink.set_mode(Mode::Reply(Reply::ok().delay(Duration::from_millis(300))));
    let started = Instant::now();
    post(body(5, false)).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    sink.wait_for_entries(3, Duration::from_secs(1)).await;
}

#[tokio::test]
async fn the_sink_records_multipart_parts_byte_for_byte() {
    let sink = Sink::start();
    let audio = fixtures::wav(500);
    let form = reqwest::multipart::Form::new()
        .text("callLogId", "c1")
        .part(
            "audio",
            reqwest::multipart::Part::bytes(audio.clone())
                .file_name("mixed.wav")
                .mime_str("audio/wav")
                .unwrap(),
        );
    let response = reqwest::Client::new()
        .post(format!("{}/api/ingest/recording-file", sink.url()))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let uploads = sink.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].text("callLogId").as_deref(), Some("c1"));
    let part = uploads[0].part("audio").unwrap();
    assert_eq!(part.file_name.as_deref(), Some("mixed.wav"));
    assert_eq!(part.content_type.as_deref(), Some("audio/wav"));
    assert_eq!(part.bytes, audio);
}
