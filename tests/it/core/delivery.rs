//! Delivery end to end: shapes on the wire, order, exactly-once in steady state.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use super::{a_recording_file_row, file_payload, parse_time, write_recording};
use crate::harness::relay::Running;
use crate::harness::sink::Incoming;
use crate::harness::{both_stores, wait_until, Backend, Mode, NewRow, Reply, TestEnv};

both_stores!(a_call_log_its_recording_and_its_file_arrive_in_order_and_intact);
async fn a_call_log_its_recording_and_its_file_arrive_in_order_and_intact(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let call = Uuid::new_v4();
    let recording = Uuid::new_v4();
    let (audio, meta) = write_recording(&env, call);
    let call_payload = json!({
        "id": call, "callerNumber": "+4930123456", "durationSeconds": 42,
        "answered": true, "tags": ["support", "de"], "notes": null, "agent": {"id": 7, "name": "Ana"}
    });
    let recording_payload =
        json!({"id": recording, "callLogId": call, "durationMs": 4200, "format": "wav"});
    let file_payload = json!({"callLogId": call, "recordingId": recording, "filePath": format!("{call}/mixed.wav")});
    let log_id = env.insert("call_log", call, call_payload.clone()).await;
    let rec_id = env
        .insert("recording", recording, recording_payload.clone())
        .await;
    let file_id = env.insert("recording_file", recording, file_payload).await;
    // what the producer's row says, before the relay touches it
    let created: HashMap<i64, DateTime<Utc>> = env
        .outbox()
        .await
        .into_iter()
        .map(|r| (r.id, r.created_at))
        .collect();

    env.run(&["drain", "--migrate"])
        .await
        .assert_success()
        .assert_no_panic();

    // JSON entities: exact shape, same payload, RFC 3339 timestamps, id order.
    let entries = env.sink.entries();
    assert_eq!(entries.len(), 2, "{entries:#?}");
    let expected = [
        (log_id, "call_log", call, &call_payload),
        (rec_id, "recording", recording, &recording_payload),
    ];
    for (entry, (id, entity_type, entity_id, payload)) in entries.iter().zip(expected) {
        let keys: BTreeSet<&str> = entry
            .raw
            .as_object()
            .expect("entry is an object")
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            BTreeSet::from(["outboxId", "entityType", "entityId", "payload", "createdAt"])
        );
        assert_eq!(
            entry.raw["outboxId"],
            json!(id),
            "outboxId is the row id, as a JSON number"
        );
        assert_eq!(entry.entity_type, entity_type);
        assert_eq!(entry.entity_id, entity_id.to_string());
        assert_eq!(&entry.payload, payload);
        // the row's own time, in UTC (`Z`), to the millisecond at least
        let sent_created = parse_time(&entry.created_at);
        let diff = (sent_created - created[&id])
            .num_microseconds()
            .unwrap_or(i64::MAX);
        assert!(
            entry.created_at.ends_with('Z') && diff.abs() < 1000,
            "createdAt {} is not the row's created_at {}",
            entry.created_at,
            created[&id]
        );
    }
    for request in env.sink.sync_requests() {
        let key = request.headers.get("idempotency-key").unwrap_or_default();
        assert!(
            !key.is_empty(),
            "every /sync request carries an Idempotency-Key"
        );
        let content_type = request.headers.get("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "content-type {content_type:?}"
        );
        let ids: Vec<i64> = request.entries().iter().map(|e| e.outbox_id).collect();
        assert!(
            ids.windows(2).all(|w| w[0] < w[1]),
            "entries of a request are in id order: {ids:?}"
        );
    }

    // The file: one multipart request, byte-identical, the right parts.
    let uploads = env.sink.uploads();
    assert_eq!(uploads.len(), 1, "{uploads:#?}");
    let upload = &uploads[0];
    assert_eq!(
        upload.headers.get("idempotency-key"),
        Some(format!("recording_file:{file_id}").as_str())
    );
    let content_type = upload.headers.get("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("multipart/form-data"),
        "content-type {content_type:?}"
    );
    assert_eq!(upload.text("callLogId"), Some(call.to_string()));
    assert_eq!(upload.text("recordingId"), Some(recording.to_string()));
    let audio_part = upload.part("audio").expect("an audio part");
    assert_eq!(audio_part.file_name.as_deref(), Some("mixed.wav"));
    assert_eq!(audio_part.content_type.as_deref(), Some("audio/wav"));
    assert!(
        audio_part.bytes == audio,
        "audio differs: {} bytes sent, {} on disk",
        audio_part.bytes.len(),
        audio.len()
    );
    let meta_part = upload
        .part("meta")
        .expect("a meta part (meta.json lies beside the audio)");
    assert_eq!(meta_part.content_type.as_deref(), Some("application/json"));
    assert_eq!(meta_part.bytes, meta);

    // Call order: log, then recording, then file.
    let position = |id: i64| {
        entries
            .iter()
            .find(|e| e.outbox_id == id)
            .map(|e| (e.seq, e.index))
            .unwrap()
    };
    assert!(
        position(log_id) < position(rec_id),
        "call_log before recording"
    );
    assert!(position(rec_id).0 < upload.seq, "recording before its file");

    assert!(
        env.sink.strays().is_empty(),
        "requests to unknown paths: {:?}",
        env.sink.strays()
    );
    assert_eq!(env.count("sync_outbox").await, 0);
    assert_eq!(env.sent_ids().await, [log_id, rec_id, file_id]);
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);
}

/// The `ordering_key` of every row in the outbox, in id order.
async fn outbox_keys(env: &TestEnv) -> Vec<Option<String>> {
    env.outbox()
        .await
        .into_iter()
        .map(|r| r.ordering_key)
        .collect()
}

both_stores!(a_call_id_spelled_otherwise_in_a_payload_keys_the_call_together);
/// The key a recording and its file get from `payload.callLogId` is the call log's
/// (its `entity_id` as text) however the producer spelled the UUID: upper case, in
/// braces, without hyphens, with hyphens elsewhere (as PostgreSQL's `uuid` reads
/// them: after any four digits; the two stores used to disagree there). A field
/// that is no UUID is the key as written.
async fn a_call_id_spelled_otherwise_in_a_payload_keys_the_call_together(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let call = Uuid::new_v4();
    env.insert("call_log", call, json!({"id": call})).await;
    let simple = call.simple().to_string();
    let grouped_by_eight: Vec<&str> = (0..4).map(|i| &simple[i * 8..i * 8 + 8]).collect();
    let grouped_by_four: Vec<&str> = (0..8).map(|i| &simple[i * 4..i * 4 + 4]).collect();
    for spelled in [
        call.to_string().to_uppercase(),
        format!("{{{call}}}"),
        simple.clone(),
        format!("urn:uuid:{call}"),
        grouped_by_eight.join("-"),
        format!("{{{}}}", grouped_by_four.join("-").to_uppercase()),
    ] {
        env.insert("recording", Uuid::new_v4(), json!({"callLogId": spelled}))
            .await;
    }
    env.insert("recording", Uuid::new_v4(), json!({"callLogId": "Call-7"}))
        .await;
    let keys = outbox_keys(&env).await;
    let mut expected = vec![Some(call.to_string()); 7];
    expected.push(Some("Call-7".to_string()));
    assert_eq!(keys, expected);
}

/// A producer needs INSERT on `sync_outbox` (and USAGE on its id sequence), nothing
/// more (SPEC 1.1): not SELECT on `sync_outbox_ordering_rules`, which the insert
/// trigger reads, nor the outbox's schema on its search_path. Both used to fail every
/// insert ("permission denied for table sync_outbox_ordering_rules", "relation
/// … does not exist"). The keys are derived all the same.
#[tokio::test]
async fn a_producer_with_insert_alone_can_write_the_outbox() {
    let env = TestEnv::migrated().await;
    let role = format!("producer_{}", Uuid::new_v4().simple());
    let pool = env.db.pg();
    for grant in [
        format!("CREATE ROLE {role} NOLOGIN"),
        format!("GRANT USAGE ON SCHEMA public TO {role}"),
        format!("GRANT INSERT ON public.sync_outbox TO {role}"),
        format!("GRANT USAGE ON SEQUENCE public.sync_outbox_id_seq TO {role}"),
    ] {
        sqlx::query(&grant)
            .execute(pool)
            .await
            .expect("set up the role");
    }
    let call = Uuid::new_v4();
    let mut producer = pool.acquire().await.expect("a connection");
    sqlx::query(&format!("SET ROLE {role}"))
        .execute(&mut *producer)
        .await
        .expect("SET ROLE");
    let mut written = Vec::new();
    for search_path in ["public", "pg_catalog"] {
        sqlx::query(&format!("SET search_path = {search_path}"))
            .execute(&mut *producer)
            .await
            .expect("SET search_path");
        for (entity_type, entity_id) in [("call_log", call), ("recording", Uuid::new_v4())] {
            let inserted = sqlx::query(
                "INSERT INTO public.sync_outbox (entity_type, entity_id, payload) \
                 VALUES ($1, $2, jsonb_build_object('callLogId', $3::text))",
            )
            .bind(entity_type)
            .bind(entity_id)
            .bind(call.to_string())
            .execute(&mut *producer)
            .await;
            written.push(format!("{search_path} {entity_type}: {inserted:?}"));
        }
    }
    // not back to the pool as the producer
    drop(producer.detach());
    for cleanup in [
        format!("REVOKE ALL ON public.sync_outbox FROM {role}"),
        format!("REVOKE ALL ON SEQUENCE public.sync_outbox_id_seq FROM {role}"),
        format!("REVOKE ALL ON SCHEMA public FROM {role}"),
        format!("DROP ROLE {role}"),
    ] {
        let _ = sqlx::query(&cleanup).execute(pool).await;
    }
    assert!(written.iter().all(|w| w.contains(": Ok(")), "{written:#?}");
    let keys = outbox_keys(&env).await;
    assert_eq!(keys, vec![Some(call.to_string()); 4]);
}

both_stores!(a_recording_id_defaults_to_the_entity_id_and_no_meta_part_without_a_meta_file);
async fn a_recording_id_defaults_to_the_entity_id_and_no_meta_part_without_a_meta_file(
    backend: Backend,
) {
    let env = TestEnv::migrated_on(backend).await;
    let call = Uuid::new_v4();
    let recording = Uuid::new_v4();
    let audio = crate::harness::fixtures::wav(100);
    crate::harness::fixtures::write_file(&env.root, &format!("{call}/mixed.wav"), &audio);
    env.insert(
        "recording_file",
        recording,
        file_payload(call, &format!("{call}/mixed.wav")),
    )
    .await;

    env.drain().await.assert_success();

    let uploads = env.sink.uploads();
    assert_eq!(uploads.len(), 1);
    assert_eq!(uploads[0].text("recordingId"), Some(recording.to_string()));
    assert!(
        uploads[0].part("meta").is_none(),
        "no meta part when there is no meta file"
    );
    assert_eq!(uploads[0].part("audio").unwrap().bytes, audio);
}

both_stores!(a_file_of_several_read_chunks_arrives_byte_identical);
async fn a_file_of_several_read_chunks_arrives_byte_identical(backend: Backend) {
    // uploads are read in 512 KiB chunks: cross several, and end mid-chunk
    let env = TestEnv::migrated_on(backend).await;
    let call = Uuid::new_v4();
    let mut audio = crate::harness::fixtures::wav(1_400_000);
    audio.extend((0..7_u8).map(|b| b.wrapping_mul(37)));
    // vary every byte so a chunk sent twice or out of order cannot compare equal
    for (i, b) in audio.iter_mut().enumerate().skip(44) {
        *b ^= (i % 251) as u8;
    }
    crate::harness::fixtures::write_file(&env.root, &format!("{call}/long.wav"), &audio);
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        file_payload(call, &format!("{call}/long.wav")),
    )
    .await;

    env.drain().await.assert_success();

    let uploads = env.sink.uploads();
    assert_eq!(uploads.len(), 1);
    let sent = &uploads[0].part("audio").expect("an audio part").bytes;
    assert!(audio.len() > 5 * 512 * 1024);
    assert!(
        *sent == audio,
        "audio differs: {} bytes sent, {} on disk",
        sent.len(),
        audio.len()
    );
}

both_stores!(file_concurrency_bounds_uploads_across_all_workers);
/// `dispatch.file_concurrency` bounds the uploads of the whole relay, not of each
/// batch: with four workers each holding a batch of files, no more than two are in
/// flight at once (each upload keeps a few MiB of its file in flight, so the bound is
/// what keeps a backlog of recordings from growing memory with the worker count),
/// and every file still arrives byte for byte.
async fn file_concurrency_bounds_uploads_across_all_workers(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.file_concurrency", 2)
        .set("dispatch.concurrency", 4)
        .set("dispatch.batch_size", 3);
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::File(_) => Reply::ok().delay(Duration::from_millis(150)),
        Incoming::Sync(_) => Reply::ok(),
    }));
    let mut files = HashMap::new();
    for n in 0..12_u8 {
        let call = Uuid::new_v4();
        let mut audio = crate::harness::fixtures::wav(20_000);
        audio.push(n);
        let path = format!("{call}/mixed.wav");
        crate::harness::fixtures::write_file(&env.root, &path, &audio);
        files.insert(call.to_string(), audio);
        env.insert("recording_file", Uuid::new_v4(), file_payload(call, &path))
            .await;
    }

    env.drain().await.assert_success();

    let uploads = env.sink.uploads();
    assert_eq!(uploads.len(), 12);
    for upload in &uploads {
        let call = upload.text("callLogId").expect("a callLogId part");
        let sent = &upload.part("audio").expect("an audio part").bytes;
        assert!(*sent == files[&call], "audio of call {call} differs");
    }
    let spans: Vec<_> = uploads
        .iter()
        .map(|u| (u.received_at, u.answered_at))
        .collect();
    let most_at_once = most_at_once(&spans);
    assert_eq!(
        most_at_once, 2,
        "dispatch.file_concurrency = 2 across 4 workers: {most_at_once} uploads were in flight at once"
    );
    assert_eq!(env.count("sync_outbox").await, 0);
}

both_stores!(a_worker_settles_its_batches_together_within_the_concurrency);
/// `dispatch.batches_per_settle = 3` with `concurrency = 3`: one worker claims three
/// batches at once, sends them as three requests of at most `batch_size` entries in
/// id order, all in flight together, and settles them together: it sends nothing
/// more until the slowest of the three is answered (three workers of one batch each
/// would have sent the last rows while it was still out). Meanwhile, its claim having
/// been full, it claims the rest ahead. The requests in flight stay within
/// `concurrency`.
async fn a_worker_settles_its_batches_together_within_the_concurrency(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.batch_size", 2)
        .set("dispatch.batches_per_settle", 3)
        .set("dispatch.concurrency", 3)
        .set("dispatch.claim_concurrency", 1);
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(
            env.insert("call_log", Uuid::new_v4(), json!({"n": n}))
                .await,
        );
    }
    let first = ids[0];
    env.sink
        .set_mode(Mode::custom(move |incoming| match incoming {
            Incoming::Sync(r) if r.entries().iter().any(|e| e.outbox_id == first) => {
                Reply::ok().delay(Duration::from_millis(900))
            }
            _ => Reply::ok().delay(Duration::from_millis(100)),
        }));

    let drain = env.cmd(["drain"]).spawn();
    env.sink.wait_for_requests(1, Duration::from_secs(20)).await;
    // the slow request is out for 900 ms: the worker claims the last 2 rows ahead
    wait_until(
        Duration::from_millis(700),
        "the worker to claim its next rows while its batches are out",
        || async {
            env.db
                .scalar("SELECT count(*) FROM sync_outbox WHERE claim_token IS NOT NULL")
                .await
                == 8
        },
    )
    .await;
    drain
        .wait(Duration::from_secs(60))
        .await
        .assert_success()
        .assert_no_panic();

    let requests = env.sink.sync_requests();
    let delivered: Vec<i64> = requests
        .iter()
        .flat_map(|r| r.entries())
        .map(|e| e.outbox_id)
        .collect();
    assert_eq!(
        delivered.iter().copied().collect::<BTreeSet<_>>().len(),
        8,
        "every row delivered: {delivered:?}"
    );
    let first_claim: BTreeSet<i64> = requests
        .iter()
        .take(3)
        .flat_map(|r| r.entries())
        .map(|e| e.outbox_id)
        .collect();
    assert_eq!(
        first_claim,
        ids[..6].iter().copied().collect(),
        "the worker's first claim is 3 batches of 2 rows, sent at once"
    );
    assert_eq!(delivered.len(), 8, "none twice: {delivered:?}");
    for request in &requests {
        let batch: Vec<i64> = request.entries().iter().map(|e| e.outbox_id).collect();
        assert!(
            !batch.is_empty() && batch.len() <= 2,
            "a request carries at most dispatch.batch_size entries: {batch:?}"
        );
        assert!(
            batch.windows(2).all(|w| w[0] < w[1]),
            "in id order: {batch:?}"
        );
    }
    let spans: Vec<_> = requests
        .iter()
        .map(|r| (r.received_at, r.answered_at))
        .collect();
    assert_eq!(
        most_at_once(&spans),
        3,
        "the worker's three batches are in flight together, and no more than concurrency"
    );
    let slow = requests
        .iter()
        .find(|r| r.entries().iter().any(|e| e.outbox_id == first))
        .and_then(|r| r.answered_at)
        .expect("the slow request was answered");
    let last = requests
        .iter()
        .find(|r| r.entries().iter().any(|e| e.outbox_id == ids[7]))
        .expect("the last rows were sent");
    assert!(
        last.received_at >= slow,
        "the last rows went out while the worker's slow batch was still in flight: \
         its batches were not settled together"
    );
    assert_eq!(env.count("sync_outbox").await, 0);
    assert_eq!(env.sent_ids().await, ids);
}

both_stores!(ten_thousand_mixed_rows_are_each_delivered_exactly_once);
async fn ten_thousand_mixed_rows_are_each_delivered_exactly_once(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.batch_size", 100)
        .set("dispatch.concurrency", 4);
    // 5,000 calls, each a call_log (odd n) then a recording (even n) keyed by the call.
    let calls: Vec<Uuid> = (0..5_000).map(|_| Uuid::new_v4()).collect();
    let rows: Vec<NewRow> = (1..=10_000_usize)
        .map(|n| {
            let call = calls[(n - 1) / 2];
            let payload = json!({"n": n, "callLogId": call});
            if n % 2 == 1 {
                NewRow::new("call_log", call, payload)
            } else {
                NewRow::new("recording", Uuid::new_v4(), payload)
            }
        })
        .collect();
    env.insert_rows(&rows).await;

    let out = env
        .cmd(["drain"])
        .timeout(Duration::from_secs(180))
        .output()
        .await;
    out.assert_success().assert_no_panic();

    let entries = env.sink.entries();
    let distinct: BTreeSet<i64> = entries.iter().map(|e| e.outbox_id).collect();
    assert_eq!(distinct.len(), 10_000, "every row delivered");
    assert_eq!(entries.len(), 10_000, "no row delivered twice");
    assert_eq!(
        env.sink.all_entries().len(),
        10_000,
        "no request was rejected or repeated"
    );
    let numbers: BTreeSet<i64> = entries
        .iter()
        .map(|e| e.payload["n"].as_i64().unwrap())
        .collect();
    assert_eq!(numbers, (1..=10_000).collect());
    for request in env.sink.sync_requests() {
        assert!(
            request.entries().len() <= 100,
            "batch of {} > batch_size",
            request.entries().len()
        );
    }
    // Per call: the log is delivered before the recording.
    let mut log_at = HashMap::new();
    for e in entries.iter().filter(|e| e.entity_type == "call_log") {
        log_at.insert(e.entity_id.clone(), (e.seq, e.index));
    }
    for e in entries.iter().filter(|e| e.entity_type == "recording") {
        let call = e.payload["callLogId"].as_str().unwrap();
        assert!(
            log_at[call] < (e.seq, e.index),
            "recording {} of call {call} overtook its call_log",
            e.outbox_id
        );
    }
    assert_eq!(env.count("sync_outbox").await, 0);
    assert_eq!(env.count("sync_outbox_sent").await, 10_000);
}

both_stores!(enqueue_inserts_a_row_that_drain_delivers);
async fn enqueue_inserts_a_row_that_drain_delivers(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let id = Uuid::new_v4();
    let payload = json!({"id": id, "total": 12.5, "items": [1, 2]});
    env.run(&[
        "enqueue",
        "--entity-type",
        "call_log",
        "--entity-id",
        &id.to_string(),
        "--payload",
        &payload.to_string(),
    ])
    .await
    .assert_success()
    .assert_no_panic();
    let keyed = Uuid::new_v4();
    env.run(&[
        "enqueue",
        "--entity-type",
        "invoice",
        "--entity-id",
        &keyed.to_string(),
        "--payload",
        "{}",
        "--ordering-key",
        "customer-9",
    ])
    .await
    .assert_success();

    let rows = env.outbox().await;
    assert_eq!(rows.len(), 2);
    assert_eq!(
        (rows[0].entity_type.as_str(), rows[0].entity_id),
        ("call_log", id)
    );
    assert_eq!(rows[0].payload, payload);
    assert_eq!(
        rows[0].ordering_key.as_deref(),
        Some(id.to_string().as_str()),
        "derived from entity_id"
    );
    assert_eq!(rows[0].status, "pending");
    assert_eq!(rows[0].attempts, 0);
    assert_eq!(rows[1].ordering_key.as_deref(), Some("customer-9"));

    env.drain().await.assert_success();
    let entries = env.sink.entries();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0].outbox_id, rows[0].id);
    assert_eq!(entries[0].payload, payload);
    assert_eq!(entries[1].entity_type, "invoice");
}

both_stores!(enqueue_rejects_bad_json_and_bad_uuids_with_one_line);
/// Also a payload the relay could only dead-letter (no JSON object) or PostgreSQL's
/// jsonb would refuse without saying why (`\u0000`): one line naming `--payload`.
async fn enqueue_rejects_bad_json_and_bad_uuids_with_one_line(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let id = Uuid::new_v4().to_string();
    for (payload, needles) in [
        ("{not json", &["payload"][..]),
        (
            r#""just a string""#,
            &["--payload", "must be a JSON object"][..],
        ),
        ("[1, 2]", &["--payload", "must be a JSON object"][..]),
        (r#"{"note": "a\u0000b"}"#, &["--payload", "\\u0000"][..]),
    ] {
        let out = env
            .run(&[
                "enqueue",
                "--entity-type",
                "call_log",
                "--entity-id",
                &id,
                "--payload",
                payload,
            ])
            .await;
        for needle in needles {
            out.assert_fails_with(needle);
        }
        out.assert_single_stderr_line();
    }
    env.run(&[
        "enqueue",
        "--entity-type",
        "call_log",
        "--entity-id",
        "not-a-uuid",
        "--payload",
        "{}",
    ])
    .await
    .assert_fails_with("entity-id")
    .assert_single_stderr_line();
    // an entity type no relay can route, and an empty ordering key (a key all the
    // same: every row given it would wait for the one before)
    let long_type = "a".repeat(150);
    for (flag, value, needle) in [
        ("--entity-type", long_type.as_str(), "invalid --entity-type"),
        ("--entity-type", "call\nlog", "invalid --entity-type"),
        (
            "--ordering-key",
            "",
            "invalid --ordering-key: must not be empty",
        ),
    ] {
        let mut args = vec!["enqueue", "--entity-type", "call_log", "--entity-id", &id];
        args.extend(["--payload", "{}"]);
        if flag == "--entity-type" {
            args[2] = value;
        } else {
            args.extend([flag, value]);
        }
        env.run(&args)
            .await
            .assert_fails_with(needle)
            .assert_single_stderr_line();
    }
    assert_eq!(env.count("sync_outbox").await, 0, "nothing inserted");
}

both_stores!(run_delivers_rows_as_they_come_and_exits_0_on_sigterm);
async fn run_delivers_rows_as_they_come_and_exits_0_on_sigterm(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let relay = env.spawn_run(&[]);
    let first = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.sink.wait_for_entries(1, Duration::from_secs(10)).await;
    let second = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 2}))
        .await;
    env.sink.wait_for_entries(2, Duration::from_secs(10)).await;

    let out = relay.terminate(Duration::from_secs(10)).await;
    out.assert_success().assert_no_panic();
    let delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(delivered, [first, second]);
    assert_eq!(env.count("sync_outbox").await, 0);
}

both_stores!(a_start_that_changes_the_ordering_rules_says_so);
/// The rules producers' inserts derive ordering keys by live in the database, for
/// every relay: one started with other `[ordering]` settings (here a drain with
/// ordering off) changes them for all, and says so; one with the same settings says
/// nothing.
async fn a_start_that_changes_the_ordering_rules_says_so(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let out = env.drain().await;
    out.assert_success();
    assert!(!out.stderr.contains("ordering rules changed"), "{out}");
    assert!(key_of_a_new_call_log(&env).await.is_some());

    env.config.set("ordering.enabled", false);
    let out = env.drain().await;
    assert!(
        out.stderr.contains("ordering rules changed") && out.stderr.contains("now=none"),
        "{out}"
    );
    assert_eq!(
        key_of_a_new_call_log(&env).await,
        None,
        "no key derived now"
    );

    env.config.set("ordering.enabled", true);
    let out = env.drain().await;
    assert!(
        out.stderr.contains("ordering rules changed") && out.stderr.contains("before=none"),
        "{out}"
    );
    assert!(key_of_a_new_call_log(&env).await.is_some());
}

/// The ordering key a call log inserted now gets from the database's rules.
async fn key_of_a_new_call_log(env: &TestEnv) -> Option<String> {
    let id = env.insert("call_log", Uuid::new_v4(), json!({})).await;
    env.outbox()
        .await
        .into_iter()
        .find(|r| r.id == id)
        .and_then(|r| r.ordering_key)
}

both_stores!(a_requeued_head_waits_for_its_keys_row_in_flight);
/// A call's log is dead-lettered (422) and its recording goes on, as a dead row
/// does not block its successors; the Frontend takes 3 s to answer the recording.
/// Requeued meanwhile, the log is its key's oldest row again, and a claim takes it:
/// it is not sent while the recording is still out (two rows of one key are never
/// in flight at once), but once the recording is answered. Before, both were out
/// together (found by a black-box audit; the same holds for rows of one key that
/// producers commit out of id order).
async fn a_requeued_head_waits_for_its_keys_row_in_flight(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("ingest.timeout", "10s");
    let answers = |reject_log: bool| {
        Mode::custom(move |incoming| match incoming {
            Incoming::Sync(req) if req.entries().iter().any(|e| e.entity_type == "recording") => {
                Reply::ok().delay(Duration::from_secs(3))
            }
            Incoming::Sync(req) if reject_log && !req.entries().is_empty() => {
                Reply::status(422).body(r#"{"error":"no such caller"}"#)
            }
            _ => Reply::ok(),
        })
    };
    env.sink.set_mode(answers(true));
    let call = Uuid::new_v4();
    let ids = env
        .insert_rows(&[
            NewRow::new("call_log", call, json!({"id": call})),
            NewRow::new("recording", Uuid::new_v4(), json!({"callLogId": call})),
        ])
        .await;
    let (log, recording) = (ids[0], ids[1]);
    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(10), "the recording out", || async {
        env.sink
            .sync_requests()
            .iter()
            .any(|r| r.entries().iter().any(|e| e.outbox_id == recording))
    })
    .await;
    env.sink.set_mode(answers(false));
    let dead = env.dead_letter_id(log).await.to_string();
    env.run(&["dlq", "requeue", &dead]).await.assert_success();
    wait_until(Duration::from_secs(20), "both sent", || async {
        let sent = env.sent_ids().await;
        sent.contains(&log) && sent.contains(&recording)
    })
    .await;
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();
    let requests = env.sink.sync_requests();
    let holding = |id: i64| {
        requests
            .iter()
            .filter(|r| r.entries().iter().any(|e| e.outbox_id == id))
            .collect::<Vec<_>>()
    };
    let recording_out = holding(recording);
    let answered = recording_out[0]
        .answered_at
        .expect("the recording answered");
    let log_again = holding(log);
    assert_eq!(log_again.len(), 2, "refused once, then sent once");
    assert!(
        log_again[1].received_at >= answered,
        "the requeued log went out while its call's recording was still out"
    );
}

both_stores!(rows_of_one_key_go_one_at_a_time_in_id_order_and_a_dead_one_does_not_block);
async fn rows_of_one_key_go_one_at_a_time_in_id_order_and_a_dead_one_does_not_block(
    backend: Backend,
) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.concurrency", 4)
        .set("dispatch.batch_size", 10);
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::Sync(r) if r.entries().iter().any(|e| e.payload["poison"] == true) => {
            Reply::status(400)
        }
        _ => Reply::ok().delay(Duration::from_millis(30)),
    }));
    let calls = [Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4()];
    let mut poison = 0;
    for round in 0..4 {
        for (i, call) in calls.iter().enumerate() {
            let bad = i == 0 && round == 1;
            let id = env
                .insert(
                    "recording",
                    Uuid::new_v4(),
                    json!({"callLogId": call, "round": round, "poison": bad}),
                )
                .await;
            if bad {
                poison = id;
            }
        }
    }

    env.drain().await.assert_code(3);

    let dead = env.dead_letters().await;
    assert_eq!(
        dead.iter().map(|d| d.outbox_id).collect::<Vec<_>>(),
        [poison]
    );
    let delivered: BTreeSet<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(
        delivered.len(),
        11,
        "every other row, its successors on the dead row's key included"
    );
    assert_eq!(env.sink.entries().len(), 11, "each once");
    assert_each_key_one_at_a_time_in_id_order(&env.sink.sync_requests(), &calls);
}

/// For each call (the rows' `payload.callLogId`): no request carried two of its rows,
/// its rows arrived in id order, and none was sent before the previous one's answer.
fn assert_each_key_one_at_a_time_in_id_order(
    requests: &[crate::harness::sink::SyncRequest],
    calls: &[Uuid],
) {
    for call in calls {
        let key = call.to_string();
        // Every request that carried a row of this key, in arrival order.
        let mut carrying: Vec<(&crate::harness::sink::SyncRequest, i64)> = Vec::new();
        for r in requests {
            let of_key: Vec<i64> = r
                .entries()
                .iter()
                .filter(|e| e.payload["callLogId"] == key.as_str())
                .map(|e| e.outbox_id)
                .collect();
            assert!(
                of_key.len() <= 1,
                "two rows of key {key} in one request: {of_key:?}"
            );
            if let Some(id) = of_key.first() {
                carrying.push((r, *id));
            }
        }
        for pair in carrying.windows(2) {
            let ((earlier, a), (later, b)) = (pair[0], pair[1]);
            assert!(a <= b, "key {key}: row {b} went before row {a}");
            let answered = earlier.answered_at.expect("answered");
            assert!(
                later.received_at >= answered,
                "key {key}: row {b} was sent while row {a} was in flight"
            );
        }
    }
}

both_stores!(drain_exits_0_only_when_nothing_due_is_left);
async fn drain_exits_0_only_when_nothing_due_is_left(backend: Backend) {
    // Chains of rows on a few keys: each row becomes claimable only when its
    // predecessor settles, while idle workers look for work. A drain must not take
    // "nothing claimable right now" for "nothing left".
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.concurrency", 8)
        .set("dispatch.batch_size", 10);
    for round in 0..3 {
        let rows: Vec<NewRow> = (1..=30)
            .map(|n| {
                NewRow::new("event", Uuid::new_v4(), json!({"n": n}))
                    .keyed(format!("chain-{}", n % 2))
            })
            .collect();
        env.insert_rows(&rows).await;
        let out = env.drain().await;
        let left = env.count("sync_outbox").await;
        assert_eq!(
            (out.code, left),
            (Some(0), 0),
            "round {round}: drain ended with {left} rows left\n{out}"
        );
    }
    assert_eq!(env.sink.entries().len(), 90);
}

/// `retention.delete_sent = true` (PostgreSQL's own settle statement for it): rows
/// are delivered and leave no record; a failed one is still retried.
#[tokio::test]
async fn with_delete_sent_delivered_rows_leave_no_record() {
    let mut env = TestEnv::migrated().await;
    env.config.set("retention.delete_sent", true);
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            env.insert("call_log", Uuid::new_v4(), json!({ "n": n }))
                .await,
        );
    }
    env.sink.fail_next(1, 500);
    env.config.set("dispatch.batch_size", 10);
    let out = env.drain().await;
    out.assert_no_panic();
    wait_until(Duration::from_secs(10), "the retry to fall due", || async {
        env.count_waiting().await == 0
    })
    .await;
    env.drain().await.assert_success();
    let mut delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    delivered.sort();
    delivered.dedup();
    assert_eq!(delivered, ids);
    assert_eq!(env.count("sync_outbox").await, 0);
    assert_eq!(env.count("sync_outbox_sent").await, 0, "no record kept");
}

/// Concurrent workers must not together claim more than `--max-rows`.
#[tokio::test]
async fn drain_max_rows_claims_exactly_that_many() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("dispatch.concurrency", 8)
        .set("dispatch.batch_size", 7);
    for n in 0..200 {
        env.insert("call_log", Uuid::new_v4(), json!({ "n": n }))
            .await;
    }
    let out = env.run(&["drain", "--max-rows", "50"]).await;
    out.assert_success().assert_no_panic();
    assert_eq!(env.sink.entries().len(), 50, "{}", out.stdout);
    assert_eq!(env.count("sync_outbox").await, 150);
}

/// In a claim lane one worker claims at a time, for the lane's workers queued behind
/// it too, yet batches stay in flight together (the gate is around the claim, never
/// around the POST), every row goes once, and a key's rows still go one at a time in
/// id order: with one lane, and with two lanes (the default) claiming from their own
/// shares of the keys at once. A claim concurrency of 0 is refused, named.
#[tokio::test]
async fn one_claim_at_a_time_still_keeps_batches_in_flight_together() {
    let mut env = TestEnv::migrated_on(Backend::Postgres).await;
    env.config.set("dispatch.claim_concurrency", 0);
    env.run(&["drain"])
        .await
        .assert_fails_with("dispatch.claim_concurrency")
        .assert_single_stderr_line();
    for lanes in [1, 2] {
        env.config
            .set("dispatch.claim_concurrency", lanes)
            .set("dispatch.concurrency", 4)
            .set("dispatch.batch_size", 5);
        env.sink.clear();
        env.sink.set_mode(Mode::custom(|_| {
            Reply::ok().delay(Duration::from_millis(100))
        }));
        let calls: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
        let ids = insert_rounds(&env, &calls, 4).await;

        env.drain().await.assert_success();

        let mut delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
        delivered.sort_unstable();
        assert_eq!(delivered, ids, "{lanes} lane(s): every row once");
        let requests = env.sink.sync_requests();
        assert!(
            requests.iter().all(|r| r.entries().len() <= 5),
            "a claim made for several workers is split into batches of dispatch.batch_size"
        );
        assert_each_key_one_at_a_time_in_id_order(&requests, &calls);
        let most_at_once = most_in_flight_at_once(&requests);
        assert!(
            most_at_once >= 2,
            "{lanes} lane(s), 4 workers: batches overlapped at most {most_at_once} at a time"
        );
        assert_eq!(env.count("sync_outbox").await, 0);
    }
}

/// The most requests the sink was handling at one moment.
fn most_in_flight_at_once(requests: &[crate::harness::sink::SyncRequest]) -> usize {
    let spans: Vec<_> = requests
        .iter()
        .map(|r| (r.received_at, r.answered_at))
        .collect();
    most_at_once(&spans)
}

/// The most of these (received, answered) spans that overlapped at one moment.
fn most_at_once(spans: &[(std::time::Instant, Option<std::time::Instant>)]) -> usize {
    spans
        .iter()
        .map(|&(start, _)| {
            spans
                .iter()
                .filter(|(s, end)| *s <= start && end.is_some_and(|e| e > start))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// `rounds` rows of every call, round by round (so a call's rows are far apart in id
/// order); returns their ids, ascending.
async fn insert_rounds(env: &TestEnv, calls: &[Uuid], rounds: u32) -> Vec<i64> {
    let mut ids = Vec::new();
    for round in 0..rounds {
        for call in calls {
            let payload = json!({"callLogId": call, "round": round});
            ids.push(env.insert("recording", Uuid::new_v4(), payload).await);
        }
    }
    ids
}

/// With two claim lanes draining a backlog, keys that all hash into one lane's share
/// are all delivered, in key order, by more than that lane's workers (the other lane,
/// finding nothing in its own share, claims from all keys), and the drain ends with
/// nothing left, neither cut short by the empty share nor waiting on it.
#[tokio::test]
async fn a_backlog_in_one_lanes_share_is_drained_by_every_lane() {
    let mut env = TestEnv::migrated_on(Backend::Postgres).await;
    env.config
        .set("dispatch.claim_concurrency", 2)
        .set("dispatch.concurrency", 4)
        .set("dispatch.batch_size", 3);
    env.sink.set_mode(Mode::custom(|_| {
        Reply::ok().delay(Duration::from_millis(100))
    }));
    // keys of the lower half of hashtext's range: the first lane's share
    let mut calls = Vec::new();
    while calls.len() < 12 {
        let call = Uuid::new_v4();
        let hash = env
            .db
            .scalar(&format!("SELECT hashtext('{call}')::bigint"))
            .await;
        if hash < 0 {
            calls.push(call);
        }
    }
    let ids = insert_rounds(&env, &calls, 3).await;

    let out = env.drain().await;
    out.assert_success();

    let mut delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    delivered.sort_unstable();
    assert_eq!(delivered, ids, "every row once: {}", out.stdout);
    let requests = env.sink.sync_requests();
    assert_each_key_one_at_a_time_in_id_order(&requests, &calls);
    // The first claim (every worker at one gate, from every key) finds a backlog; the
    // later rounds are claimed by lanes. Their 12 rows a round in batches of 3 are 4
    // batches: the first lane's two workers alone have at most two in flight at once.
    let later: Vec<_> = requests
        .into_iter()
        .filter(|r| r.entries().iter().all(|e| e.payload["round"] != 0))
        .collect();
    let most_at_once = most_in_flight_at_once(&later);
    assert!(
        most_at_once >= 3,
        "the other lane did not help: at most {most_at_once} batches in flight at once"
    );
    assert_eq!(env.count("sync_outbox").await, 0);
}

/// Draining a backlog, each claim lane starts its claims at its last full claim's
/// first row instead of the oldest row. A row that falls due behind the lanes (here a
/// retry whose time comes while the backlog is drained) is still claimed within about
/// `RESCAN_EVERY` (1 s), while the backlog is being drained, not once it is gone.
#[tokio::test]
async fn a_row_falling_due_behind_the_claim_lanes_is_claimed_within_the_backlog() {
    let mut env = TestEnv::migrated_on(Backend::Postgres).await;
    env.config
        .set("dispatch.claim_concurrency", 2)
        .set("dispatch.concurrency", 2)
        .set("dispatch.batches_per_settle", 1)
        .set("dispatch.batch_size", 10);
    // at most 2 requests of 10 rows per 20 ms: 1,000 rows/s
    env.sink.set_mode(Mode::custom(|_| {
        Reply::ok().delay(Duration::from_millis(20))
    }));
    let late = env
        .insert("call_log", Uuid::new_v4(), json!({"late": true}))
        .await;
    env.db
        .execute(&format!(
            "UPDATE sync_outbox SET next_attempt_at = now() + interval '1 hour' WHERE id = {late}"
        ))
        .await;
    let n = 3_000;
    env.db
        .execute(&format!(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
             SELECT 'call_log', gen_random_uuid(), jsonb_build_object('n', g) \
             FROM generate_series(1, {n}) AS g"
        ))
        .await;

    let relay = env.spawn_run(&[]);
    env.sink
        .wait_for_entries(300, Duration::from_secs(30))
        .await;
    env.db
        .execute(&format!(
            "UPDATE sync_outbox SET next_attempt_at = now() WHERE id = {late}"
        ))
        .await;
    env.sink
        .wait_for_entries(n + 1, Duration::from_secs(60))
        .await;
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();

    let order: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    let mut sorted = order.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), n + 1, "every row once");
    let position = order
        .iter()
        .position(|id| *id == late)
        .expect("the late row was delivered");
    assert!(
        position < n * 3 / 4,
        "the row that fell due behind the lanes went out only as the {position}th of {}",
        order.len()
    );
}

both_stores!(a_delivered_id_archived_already_is_settled_and_its_record_replaced);
/// When the outbox's id sequence went back (`TRUNCATE … RESTART IDENTITY`, a restore)
/// while `sync_outbox_sent` kept its records, a delivered row's id can have a record
/// already. The settle still lands, alone (one statement) and together with a dead
/// letter (one transaction), and the new delivery's record replaces the old one.
async fn a_delivered_id_archived_already_is_settled_and_its_record_replaced(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    for with_dead_letter in [false, true] {
        let entity = Uuid::new_v4();
        let id = env.insert("call_log", entity, json!({"n": 1})).await;
        let dead = if with_dead_letter {
            let denied = file_payload(Uuid::new_v4(), "../x.wav");
            Some(env.insert("recording_file", Uuid::new_v4(), denied).await)
        } else {
            None
        };
        let long_ago = env.db.now_plus(-2 * 86_400);
        env.db
            .execute(&format!(
                "INSERT INTO sync_outbox_sent (id, entity_type, entity_id, created_at, sent_at, attempts) \
                 VALUES ({id}, 'recording', '{}', {long_ago}, {long_ago}, 7)",
                Uuid::new_v4()
            ))
            .await;
        let before = env.db_now().await;

        let out = env.drain().await;
        out.assert_code(if with_dead_letter { 3 } else { 0 });

        assert!(
            env.sink.entries().iter().any(|e| e.outbox_id == id),
            "{out}"
        );
        assert_eq!(env.count("sync_outbox").await, 0, "settled: {out}");
        let sent = env.sent().await;
        let records: Vec<_> = sent.iter().filter(|r| r.id == id).collect();
        assert_eq!(records.len(), 1, "{sent:?}");
        let record = records[0];
        assert_eq!(record.entity_type, "call_log");
        assert_eq!(record.entity_id, entity);
        assert_eq!(record.attempts, 1);
        assert!(
            record.sent_at >= before - chrono::Duration::seconds(5),
            "the new delivery's record: {record:?}"
        );
        if let Some(dead) = dead {
            let letters = env.dead_letters().await;
            assert!(letters.iter().any(|d| d.outbox_id == dead), "{letters:?}");
        }
    }
}

/// A daemon runs until `later` is settled; `first` was settled before it, while
/// `later` was still out; it stops cleanly.
async fn settled_first_while_the_other_is_out(env: &TestEnv, first: i64, later: i64) {
    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(10), "the first row settled", || async {
        env.sent_ids().await.contains(&first)
    })
    .await;
    assert!(
        !env.sent_ids().await.contains(&later),
        "the later row was settled with the first, not after it"
    );
    wait_until(Duration::from_secs(20), "the later row settled", || async {
        env.sent_ids().await.contains(&later)
    })
    .await;
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();
}

both_stores!(rows_answered_are_settled_without_waiting_for_the_uploads_claimed_with_them);
/// One worker claims a call's recording file, whose upload takes 3 s (the Frontend
/// leaves the body unread), with another call's log: the log is settled as soon as
/// its request is answered, while the upload is still out, so the later rows of its
/// call do not wait for an unrelated upload. They used to be settled together, after
/// the upload.
async fn rows_answered_are_settled_without_waiting_for_the_uploads_claimed_with_them(
    backend: Backend,
) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("dispatch.concurrency", 1);
    let call = Uuid::new_v4();
    let file = a_recording_file_row(&env, call).await;
    let log = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.sink.stall_file_bodies(Duration::from_secs(3));
    settled_first_while_the_other_is_out(&env, log, file).await;
    assert_eq!(env.sink.uploads().len(), 1);
    assert_eq!(env.sink.entries().len(), 1);
}

/// Two workers (one batch each) on a relay whose Frontend answers every upload only
/// after 6 s (within `ingest.upload_timeout`), with `file_concurrency` upload slots.
async fn uploads_held_for_six_seconds(backend: Backend, file_concurrency: u32) -> TestEnv {
    let mut env = TestEnv::migrated_on(backend).await;
    uploads_answered_after(&mut env, 2, file_concurrency, Duration::from_secs(6));
    env
}

/// `workers` workers of one batch each, `file_concurrency` upload slots, and a
/// Frontend that answers every upload after `delay` (within `ingest.upload_timeout`)
/// and JSON at once.
fn uploads_answered_after(env: &mut TestEnv, workers: u32, file_concurrency: u32, delay: Duration) {
    env.config
        .set("dispatch.concurrency", workers)
        .set("dispatch.batches_per_settle", 1)
        .set("dispatch.file_concurrency", file_concurrency)
        .set("ingest.upload_timeout", "20s");
    env.sink
        .set_mode(Mode::custom(move |incoming| match incoming {
            Incoming::File(_) => Reply::ok().delay(delay),
            Incoming::Sync(_) => Reply::ok(),
        }));
}

/// The call log `log` was the first entry delivered, while the uploads so far (at
/// most `uploads`) were all still unanswered.
#[track_caller]
fn went_out_before_the_uploads_ended(env: &TestEnv, log: i64, uploads: usize) {
    assert_eq!(env.sink.entries()[0].outbox_id, log);
    let out = env.sink.all_uploads();
    assert!(
        out.len() <= uploads && out.iter().all(|u| u.answered_at.is_none()),
        "the log went out while the uploads were still out: {out:#?}"
    );
}

/// Every one of `files` is settled as sent, each uploaded once; the relay then
/// stops cleanly.
async fn every_file_uploaded_once(env: &TestEnv, files: &[i64], relay: Running) {
    wait_until(Duration::from_secs(60), "every file settled", || async {
        let sent = env.sent_ids().await;
        files.iter().all(|id| sent.contains(id))
    })
    .await;
    assert_eq!(
        env.sink.uploads().len(),
        files.len(),
        "each file uploaded once"
    );
    relay
        .terminate(Duration::from_secs(10))
        .await
        .assert_success();
}

both_stores!(uploads_holding_every_worker_do_not_hold_back_other_rows);
/// Two workers, each held by a recording upload the Frontend answers only after
/// 6 s (each file its own claim, as rows trickle in): a call log committed
/// meanwhile goes out within a couple of seconds, while both uploads are still
/// unanswered, and the relay still has its workers once they are. Before, every
/// worker waited for its upload, and nothing of any key went out until one ended.
async fn uploads_holding_every_worker_do_not_hold_back_other_rows(backend: Backend) {
    let env = uploads_held_for_six_seconds(backend, 4).await;
    let relay = env.spawn_run(&[]);
    let mut files = Vec::new();
    for n in 1..=2 {
        files.push(a_recording_file_row(&env, Uuid::new_v4()).await);
        wait_until(Duration::from_secs(10), "the upload under way", || async {
            env.sink.all_uploads().len() >= n
        })
        .await;
    }
    let log = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.sink.wait_for_entries(1, Duration::from_secs(4)).await;
    went_out_before_the_uploads_ended(&env, log, 2);
    wait_until(Duration::from_secs(20), "the uploads settled", || async {
        let sent = env.sent_ids().await;
        files.iter().all(|id| sent.contains(id))
    })
    .await;
    // the workers that stood in carry on; the ones they stood in for are gone
    let later = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 2}))
        .await;
    wait_until(Duration::from_secs(10), "a later row settled", || async {
        env.sent_ids().await.contains(&later)
    })
    .await;
    every_file_uploaded_once(&env, &files, relay).await;
}

both_stores!(recording_files_wait_in_the_outbox_while_every_upload_slot_is_taken);
/// One upload slot (`file_concurrency = 1`), taken by an upload the Frontend answers
/// only after 6 s; three more recording files come meanwhile, then a call log. The
/// files are not claimed while the slot is taken (a worker holding them would wait
/// for the slot, and with them every worker), so the log goes out at once; the
/// files follow one at a time once the slot is free, each uploaded once.
async fn recording_files_wait_in_the_outbox_while_every_upload_slot_is_taken(backend: Backend) {
    let env = uploads_held_for_six_seconds(backend, 1).await;
    let relay = env.spawn_run(&[]);
    let mut files = vec![a_recording_file_row(&env, Uuid::new_v4()).await];
    wait_until(
        Duration::from_secs(10),
        "the first upload under way",
        || async { !env.sink.all_uploads().is_empty() },
    )
    .await;
    for _ in 0..3 {
        files.push(a_recording_file_row(&env, Uuid::new_v4()).await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // past the stand-in's start: a claim of its own for the log
    tokio::time::sleep(Duration::from_secs(2)).await;
    let log = env
        .insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.sink.wait_for_entries(1, Duration::from_secs(6)).await;
    went_out_before_the_uploads_ended(&env, log, 1);
    every_file_uploaded_once(&env, &files, relay).await;
}

both_stores!(a_stopping_relay_starts_no_more_uploads_and_gives_their_rows_back);
/// SIGTERM while a relay uploads five recording files one at a time
/// (`file_concurrency = 1`, the Frontend answering each after 3 s): the upload out
/// is finished and settled; the four others are not started (before, one after
/// another was until the grace ran out, and the one out then was cut off), and their
/// rows are released at once (while the upload out still is), unleased and
/// uncharged. The next drain delivers them,
/// each file uploaded once in all.
async fn a_stopping_relay_starts_no_more_uploads_and_gives_their_rows_back(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.file_concurrency", 1)
        .set("ingest.upload_timeout", "20s")
        .set("shutdown.grace", "20s");
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::File(_) => Reply::ok().delay(Duration::from_secs(3)),
        Incoming::Sync(_) => Reply::ok(),
    }));
    let mut files = Vec::new();
    for _ in 0..5 {
        files.push(a_recording_file_row(&env, Uuid::new_v4()).await);
    }
    let mut relay = env.spawn_run(&[]);
    wait_until(
        Duration::from_secs(10),
        "the first upload under way",
        || async { !env.sink.all_uploads().is_empty() },
    )
    .await;
    relay.signal(libc::SIGTERM);
    let signalled = std::time::Instant::now();
    // at once: while the upload out (3 s) still is, not when it ends
    wait_until(
        Duration::from_secs(2),
        "the rows not uploaded given back",
        || async {
            env.db
                .scalar("SELECT count(*) FROM sync_outbox WHERE claim_token IS NULL")
                .await
                == 4
        },
    )
    .await;
    assert!(
        relay.is_running()
            && env
                .sink
                .all_uploads()
                .iter()
                .all(|u| u.answered_at.is_none()),
        "given back only once the upload out ended"
    );
    let out = relay.wait(Duration::from_secs(40)).await;
    let took = signalled.elapsed();
    out.assert_success().assert_no_panic();
    assert_eq!(
        env.sink.all_uploads().len(),
        1,
        "an upload was started after SIGTERM\n{out}"
    );
    assert!(
        took < Duration::from_secs(8),
        "exit {took:?} after SIGTERM: it waited for more than the upload out\n{out}"
    );
    assert!(out.stderr.contains("released for redelivery"), "{out}");
    // `recording_file:<outboxId>`
    let outbox_id = |u: &crate::harness::sink::Upload| -> i64 {
        let key = u.headers.get("idempotency-key").unwrap_or_default();
        key.rsplit(':')
            .next()
            .and_then(|id| id.parse().ok())
            .unwrap_or(-1)
    };
    let uploaded = outbox_id(&env.sink.uploads()[0]);
    assert_eq!(
        env.sent_ids().await,
        vec![uploaded],
        "the upload out is settled"
    );
    let given_back = env
        .db
        .scalar(
            "SELECT count(*) FROM sync_outbox WHERE claim_token IS NULL AND lease_until IS NULL \
             AND attempts = 0 AND last_error_type IS NULL",
        )
        .await;
    assert_eq!(
        given_back, 4,
        "the rows not uploaded wait, unleased and uncharged"
    );

    env.sink.set_mode(Mode::Accept);
    env.drain().await.assert_success();
    let mut sent = env.sent_ids().await;
    sent.sort_unstable();
    assert_eq!(sent, files);
    let mut uploads: Vec<i64> = env.sink.uploads().iter().map(outbox_id).collect();
    uploads.sort_unstable();
    assert_eq!(uploads, files, "each file uploaded once");
}

both_stores!(a_batch_claimed_ahead_is_given_back_when_uploads_hold_its_worker);
/// One worker (`concurrency = 1`) claims a full batch of five rows whose last is a
/// recording file the Frontend answers only after 15 s, and claims the next five
/// (call logs) ahead while it is out. A worker stands in for it a second into the
/// upload; the batch claimed ahead is given back then, and the stand-in delivers it
/// long before the upload ends. Before, it stayed with the held worker until
/// `ingest.timeout` (10 s here) or the upload's end.
async fn a_batch_claimed_ahead_is_given_back_when_uploads_hold_its_worker(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.concurrency", 1)
        .set("dispatch.batches_per_settle", 1)
        .set("dispatch.batch_size", 5)
        .set("ingest.timeout", "10s")
        .set("ingest.upload_timeout", "30s");
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::File(_) => Reply::ok().delay(Duration::from_secs(15)),
        Incoming::Sync(_) => Reply::ok(),
    }));
    for n in 0..4 {
        env.insert("call_log", Uuid::new_v4(), json!({ "n": n }))
            .await;
    }
    let file = a_recording_file_row(&env, Uuid::new_v4()).await;
    let mut later = Vec::new();
    for n in 0..5 {
        later.push(
            env.insert("call_log", Uuid::new_v4(), json!({ "later": n }))
                .await,
        );
    }
    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(10), "the upload under way", || async {
        !env.sink.all_uploads().is_empty()
    })
    .await;
    let upload_began = std::time::Instant::now();
    wait_until(
        Duration::from_secs(30),
        "the rows claimed ahead delivered",
        || async {
            let sent = env.sent_ids().await;
            later.iter().all(|id| sent.contains(id))
        },
    )
    .await;
    let took = upload_began.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "the rows claimed ahead waited {took:?} for the upload's worker"
    );
    assert!(
        env.sink
            .all_uploads()
            .iter()
            .all(|u| u.answered_at.is_none()),
        "delivered while the upload was still out"
    );
    every_file_uploaded_once(&env, &[file], relay).await;
}

both_stores!(rows_answered_are_settled_while_a_slow_request_of_their_claim_is_out);
/// One worker claims two rows for two requests; the Frontend answers one at once and
/// the other after 4 s (well within `ingest.timeout`). The first is settled about a
/// second later, while the second is still out, instead of waiting for it.
async fn rows_answered_are_settled_while_a_slow_request_of_their_claim_is_out(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config
        .set("dispatch.concurrency", 2)
        .set("dispatch.batches_per_settle", 2)
        .set("dispatch.batch_size", 1)
        .set("ingest.timeout", "10s");
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::Sync(req) if req.entries().iter().any(|e| e.payload["slow"] == true) => {
            Reply::ok().delay(Duration::from_secs(4))
        }
        _ => Reply::ok(),
    }));
    let slow = env
        .insert("call_log", Uuid::new_v4(), json!({"slow": true}))
        .await;
    let quick = env
        .insert("call_log", Uuid::new_v4(), json!({"slow": false}))
        .await;
    settled_first_while_the_other_is_out(&env, quick, slow).await;
    let batches = env.sink.accepted_batches();
    assert_eq!(batches.len(), 2, "one request each: {batches:?}");
}

/// One worker's recording files wait for the only upload slot, one after another,
/// for longer than a lease (1.5 s; each upload is answered after 1 s): the relay is
/// alive and renews the claim's lease, so each upload starts when its turn comes,
/// once. A relay checks its claim's lease before each request (`Relay::lease_holds`,
/// for one that was paused past it), and that check follows the renewals.
#[tokio::test]
async fn uploads_waiting_longer_than_a_lease_for_their_slot_go_once_each() {
    uploads_wait_longer_than_a_lease("1500ms", false).await;
}

/// As above, while each lease renewal takes 1.3 s in the database (a statement
/// trigger sleeps; leases of 3 s, renewed every second): renewals are a third of a
/// lease apart from their starts, not from their ends, so each comes back before the
/// lease the one before confirmed has ended by the relay's clock. From their ends,
/// one came back after it, and the uploads waiting for their slot went back unsent.
#[tokio::test]
async fn uploads_waiting_while_renewals_are_slow_go_once_each() {
    uploads_wait_longer_than_a_lease("3s", true).await;
}

/// One worker, four recording files uploaded one at a time, each answered after
/// 1 s, with leases of `lease`; eight, and renewals slowed down by 1.3 s, when
/// `slow_renewals`.
async fn uploads_wait_longer_than_a_lease(lease: &str, slow_renewals: bool) {
    let mut env = TestEnv::migrated().await;
    if slow_renewals {
        env.db
            .execute(
                "CREATE FUNCTION slow_renewals() RETURNS trigger LANGUAGE plpgsql AS $$ \
                 BEGIN IF current_query() LIKE '%SET lease_until = clock_timestamp()%' THEN \
                 PERFORM pg_sleep(1.3); END IF; RETURN NULL; END $$; \
                 CREATE TRIGGER slow_renewals BEFORE UPDATE ON sync_outbox \
                 FOR EACH STATEMENT EXECUTE FUNCTION slow_renewals();",
            )
            .await;
    }
    uploads_answered_after(&mut env, 1, 1, Duration::from_secs(1));
    env.config.set("dispatch.lease_duration", lease);
    let mut files = Vec::new();
    let files_waiting = if slow_renewals { 8 } else { 4 };
    for _ in 0..files_waiting {
        files.push(a_recording_file_row(&env, Uuid::new_v4()).await);
    }
    let relay = env.spawn_run(&[]);
    wait_until(Duration::from_secs(30), "every file settled", || async {
        let sent = env.sent_ids().await;
        files.iter().all(|id| sent.contains(id))
    })
    .await;
    let out = relay.stop_cleanly().await;
    assert_eq!(
        env.sink.uploads().len(),
        files.len(),
        "each file uploaded once\n{out}"
    );
    assert!(!out.stderr.contains("lease ended"), "{out}");
    assert!(!out.stderr.contains("lease lost"), "{out}");
}
