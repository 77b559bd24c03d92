//! The SQLite store's own tests: claims, settles, leases and the dead letters on a
//! temporary file.

use super::*;
use crate::store::{DeadRow, ErrorRecord, RetryRow, Want};
use tempfile::TempDir;

const LEASE: Duration = Duration::from_secs(30);

async fn open(dir: &TempDir) -> anyhow::Result<SqliteStore> {
    let url = format!("sqlite://{}", dir.path().join("outbox.db").display());
    let options = ConnectOptions {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(5),
        create: true,
        synchronous_commit: true,
        lock_timeout: None,
    };
    SqliteStore::connect(&url, &options).await
}

async fn fresh() -> anyhow::Result<(TempDir, SqliteStore)> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir).await?;
    store.migrate().await?;
    Ok((dir, store))
}

async fn enqueue(
    store: &SqliteStore,
    kind: &str,
    id: Uuid,
    payload: serde_json::Value,
) -> anyhow::Result<i64> {
    let row = NewRow {
        entity_type: kind.into(),
        entity_id: id,
        payload,
        ordering_key: None,
    };
    store.enqueue(&row).await
}

async fn claim_ids(store: &SqliteStore, token: i64) -> anyhow::Result<Vec<i64>> {
    Ok(store
        .claim(token, Want::rows(10), LEASE, "test")
        .await?
        .rows
        .iter()
        .map(|r| r.id)
        .collect())
}

fn error(attempt: i32) -> ErrorRecord {
    ErrorRecord {
        error_type: "http_5xx".into(),
        http_status: Some(503),
        message: "unavailable".into(),
        response_body: Some("try later".into()),
        history_entry: serde_json::json!({"attempt": attempt, "errorType": "http_5xx", "httpStatus": 503}),
    }
}

async fn outbox_history(store: &SqliteStore, id: i64) -> anyhow::Result<(i32, usize)> {
    let (attempts, errors): (i32, String) =
        sqlx::query_as("SELECT attempts, attempt_errors FROM sync_outbox WHERE id = ?1")
            .bind(id)
            .fetch_one(&store.pool)
            .await?;
    let errors: Vec<serde_json::Value> = serde_json::from_str(&errors)?;
    Ok((attempts, errors.len()))
}

#[tokio::test]
async fn migrate_is_idempotent_and_schema_state_follows() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let store = open(&dir).await?;
    assert!(matches!(
        store.schema_state().await?,
        SchemaState::Outdated { .. }
    ));
    store.migrate().await?;
    store.migrate().await?;
    assert_eq!(store.schema_state().await?, SchemaState::Current);
    store.ping().await
}

#[tokio::test]
async fn the_sink_state_keeps_the_first_down_since_until_it_is_up() -> anyhow::Result<()> {
    let (_dir, store) = fresh().await?;
    let sink = "http://127.0.0.1:3000/";
    assert_eq!(store.sink_down_since(sink, None).await?, None);
    store.set_sink_down(sink, true).await?;
    let since = store.sink_down_since(sink, None).await?;
    assert!(
        since.as_deref().is_some_and(|t| t.ends_with('Z')),
        "{since:?}"
    );
    store.set_sink_down(sink, true).await?;
    assert_eq!(
        store.sink_down_since(sink, None).await?,
        since,
        "the outage's start is kept"
    );
    assert_eq!(
        store.sink_down_since("http://elsewhere/", None).await?,
        None
    );
    assert_eq!(
        store
            .sink_down_since(sink, Some(Duration::from_secs(60)))
            .await?,
        since,
        "taken as down within the last minute"
    );
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(
        store
            .sink_down_since(sink, Some(Duration::from_millis(10)))
            .await?,
        None,
        "but not within the last 10 ms"
    );
    store.set_sink_down(sink, false).await?;
    assert_eq!(store.sink_down_since(sink, None).await?, None);
    Ok(())
}

/// A claim takes the oldest rows whose payloads fit its byte bound together, and at
/// least one however large; it says it was full when `rows` rows were claimable,
/// whatever the bound left out.
#[tokio::test]
async fn a_claim_holds_at_most_its_bytes_and_at_least_one_row() -> anyhow::Result<()> {
    let (_dir, store) = fresh().await?;
    let mut ids = Vec::new();
    for n in 0..5 {
        // `{"t":"…"}`: 100 bytes each
        let text = format!("{n}").repeat(92);
        let id = enqueue(
            &store,
            "note",
            Uuid::new_v4(),
            serde_json::json!({"t": text}),
        )
        .await?;
        ids.push(id);
    }
    let claim = store
        .claim(
            1,
            Want {
                rows: 5,
                bytes: 250,
                skip_types: &[],
            },
            LEASE,
            "test",
        )
        .await?;
    assert!(claim.rows.iter().all(|r| r.payload.get().len() == 100));
    let claimed: Vec<i64> = claim.rows.iter().map(|r| r.id).collect();
    assert_eq!(claimed, ids[..2], "the two oldest: 200 bytes of 250");
    assert!(claim.full, "five were claimable");

    let claim = store
        .claim(
            2,
            Want {
                rows: 5,
                bytes: 10,
                skip_types: &[],
            },
            LEASE,
            "test",
        )
        .await?;
    let claimed: Vec<i64> = claim.rows.iter().map(|r| r.id).collect();
    assert_eq!(claimed, ids[2..3], "one row, larger than the bound");
    assert!(!claim.full, "three were claimable");

    let claim = store.claim(3, Want::rows(10), LEASE, "test").await?;
    let claimed: Vec<i64> = claim.rows.iter().map(|r| r.id).collect();
    assert_eq!(claimed, ids[3..]);
    assert!(!claim.full);
    Ok(())
}

#[tokio::test]
async fn claim_returns_the_row_and_leases_it() -> anyhow::Result<()> {
    let (_dir, store) = fresh().await?;
    let entity = Uuid::new_v4();
    let id = enqueue(&store, "note", entity, serde_json::json!({"text": "hi"})).await?;
    let claim = store.claim(7, Want::rows(10), LEASE, "test").await?;
    assert_eq!(claim.rows.len(), 1);
    let row = &claim.rows[0];
    assert_eq!((row.id, row.entity_id, row.attempts), (id, entity, 0));
    assert_eq!(row.payload.get(), r#"{"text":"hi"}"#);
    assert!(row.created_at <= Utc::now());
    // leased: not claimable again, counted in flight
    assert!(claim_ids(&store, 8).await?.is_empty());
    let status = store.status().await?;
    assert_eq!((status.pending, status.due, status.in_flight), (1, 0, 1));
    assert!(status.oldest_pending_age_seconds.is_some());
    let held = Held {
        tokens: vec![7],
        ids: vec![id],
    };
    let wrong_token = Held {
        tokens: vec![8],
        ids: vec![id],
    };
    assert!(store.renew(&wrong_token, LEASE).await?.is_empty());
    assert_eq!(store.release(&wrong_token).await?, 0);
    assert_eq!(
        store.renew(&held, LEASE).await?,
        std::collections::HashSet::from([id])
    );
    assert_eq!(store.release(&held).await?, 1);
    assert_eq!(claim_ids(&store, 9).await?, vec![id]);
    Ok(())
}

#[tokio::test]
async fn only_the_head_of_an_ordering_key_is_claimed() -> anyhow::Result<()> {
    let (_dir, store) = fresh().await?;
    let call = Uuid::new_v4();
    let first = enqueue(&store, "call_log", call, serde_json::json!({})).await?;
    let second = enqueue(
        &store,
        "recording",
        Uuid::new_v4(),
        serde_json::json!({"callLogId": call}),
    )
    .await?;
    let third = enqueue(
        &store,
        "recording",
        Uuid::new_v4(),
        serde_json::json!({"callLogId": call}),
    )
    .await?;
    let claim = store.claim(1, Want::rows(10), LEASE, "test").await?;
    assert_eq!(
        claim.rows.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![first]
    );
    assert_eq!(claim.rows[0].ordering_key, Some(call.to_string()));
    let done = store
        .settle(
            &Settlement {
                token: 1,
                sent: vec![first],
                ..Default::default()
            },
            false,
        )
        .await?;
    assert_eq!(
        done,
        SettleReport {
            sent: 1,
            ..Default::default()
        }
    );
    assert_eq!(claim_ids(&store, 2).await?, vec![second]);
    store
        .settle(
            &Settlement {
                token: 2,
                sent: vec![second],
                ..Default::default()
            },
            false,
        )
        .await?;
    assert_eq!(claim_ids(&store, 3).await?, vec![third]);
    Ok(())
}

#[tokio::test]
async fn settle_sent_archives_and_a_wrong_token_is_lost() -> anyhow::Result<()> {
    let (_dir, store) = fresh().await?;
    let id = enqueue(&store, "note", Uuid::new_v4(), serde_json::json!({})).await?;
    let retried = enqueue(&store, "note", Uuid::new_v4(), serde_json::json!({})).await?;
    let dead = enqueue(&store, "note", Uuid::new_v4(), serde_json::json!({})).await?;
    assert_eq!(claim_ids(&store, 5).await?, vec![id, retried, dead]);
    // every part of a settlement under another token is lost, each row by id
    let wrong = Settlement {
        token: 6,
        sent: vec![id],
        retries: vec![RetryRow {
            id: retried,
            delay: Duration::ZERO,
            error: error(1),
            charged: true,
        }],
        dead: vec![DeadRow {
            id: dead,
            error: error(1),
            max_attempts: 1,
        }],
    };
    assert_eq!(
        store.settle(&wrong, true).await?,
        SettleReport {
            lost: vec![id, retried, dead],
            ..Default::default()
        }
    );
    assert_eq!(store.status().await?.pending, 3);
    assert_eq!(outbox_history(&store, retried).await?, (0, 0));
    assert_eq!(store.status().await?.dead_letters, 0);
    // the rest of the test is about the sent row
    sqlx::query("DELETE FROM sync_outbox WHERE id IN (?1, ?2)")
        .bind(retried)
        .bind(dead)
        .execute(&store.pool)
        .await?;
    let right = Settlement {
        token: 5,
        sent: vec![id],
        ..Default::default()
    };
    assert_eq!(
        store.settle(&right, true).await?,
        SettleReport {
            sent: 1,
            ..Default::default()
        }
    );
    let archived: (i64, i32) = sqlx::query_as("SELECT id, attempts FROM sync_outbox_sent")
        .fetch_one(&store.pool)
        .await?;
    assert_eq!(archived, (id, 1));
    let status = store.status().await?;
    assert_eq!((status.pending, status.sent_last_5m), (0, 1));
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(store.prune_sent(Duration::ZERO, 100).await?, 1);
    Ok(())
}

#[tokio::test]
async fn only_a_charged_retry_counts() -> anyhow::Result<()> {
    let (_dir, store) = fresh().await?;
    let id = enqueue(&store, "note", Uuid::new_v4(), serde_json::json!({})).await?;
    for (token, charged) in [(1, true), (2, false)] {
        assert_eq!(claim_ids(&store, token).await?, vec![id]);
        let retry = RetryRow {
            id,
            delay: Duration::ZERO,
            error: error(1),
            charged,
        };
        let s = Settlement {
            token,
            retries: vec![retry],
            ..Default::default()
        };
        assert_eq!(
            store.settle(&s, false).await?,
            SettleReport {
                retried: 1,
                ..Default::default()
            }
        );
        assert_eq!(outbox_history(&store, id).await?, (1, 1));
    }
    // a delayed retry is not due
    claim_ids(&store, 3).await?;
    let retry = RetryRow {
        id,
        delay: Duration::from_secs(60),
        error: error(2),
        charged: true,
    };
    store
        .settle(
            &Settlement {
                token: 3,
                retries: vec![retry],
                ..Default::default()
            },
            false,
        )
        .await?;
    assert_eq!(outbox_history(&store, id).await?, (2, 2));
    assert!(claim_ids(&store, 4).await?.is_empty());
    Ok(())
}

#[tokio::test]
async fn dead_rows_keep_their_history_and_requeue_with_the_same_id() -> anyhow::Result<()> {
    let (_dir, store) = fresh().await?;
    let entity = Uuid::new_v4();
    let id = enqueue(&store, "note", entity, serde_json::json!({"n": 1})).await?;
    claim_ids(&store, 1).await?;
    let dead = DeadRow {
        id,
        error: error(1),
        max_attempts: 1,
    };
    let s = Settlement {
        token: 1,
        dead: vec![dead],
        ..Default::default()
    };
    assert_eq!(
        store.settle(&s, false).await?,
        SettleReport {
            dead: 1,
            ..Default::default()
        }
    );
    assert_eq!(store.status().await?.pending, 0);
    let list = store
        .dlq_list(&DlqFilter {
            limit: 10,
            ..Default::default()
        })
        .await?;
    assert_eq!(list.len(), 1);
    let dl = &list[0];
    assert_eq!(
        (
            dl.outbox_id,
            dl.entity_id.clone(),
            dl.attempts,
            dl.max_attempts
        ),
        (id, entity.to_string(), 1, 1)
    );
    assert_eq!(dl.payload, serde_json::json!({"n": 1}));
    assert_eq!(dl.attempt_errors.as_array().map(Vec::len), Some(1));
    assert_eq!(
        (dl.http_status, dl.response_body.as_deref()),
        (Some(503), Some("try later"))
    );
    assert!(dl.first_attempt_at.is_some() && dl.last_attempt_at.is_some());
    assert!(store.dlq_get(dl.id).await?.is_some());
    assert_eq!(
        store
            .backlog()
            .await?
            .dead_letters_by_error_type
            .get("http_5xx"),
        Some(&1)
    );
    assert_eq!(store.dlq_requeue(&DlqSelection::Ids(vec![dl.id])).await?, 1);
    assert!(store.dlq_get(dl.id).await?.is_none());
    let claim = store.claim(2, Want::rows(10), LEASE, "test").await?;
    assert_eq!(
        claim
            .rows
            .iter()
            .map(|r| (r.id, r.attempts))
            .collect::<Vec<_>>(),
        vec![(id, 0)]
    );
    // the history kept, its last attempt marked with the requeue
    assert_eq!(outbox_history(&store, id).await?, (0, 1));
    Ok(())
}

#[tokio::test]
async fn a_second_relay_on_the_same_file_is_refused() -> anyhow::Result<()> {
    let (dir, store) = fresh().await?;
    let other = open(&dir).await?;
    let guard = store.lock_for_relay()?;
    let Err(refused) = other.lock_for_relay() else {
        bail!("a second relay lock was granted while the first was held");
    };
    assert!(refused.to_string().contains("already running"), "{refused}");
    drop(guard);
    other.lock_for_relay()?;
    Ok(())
}

#[tokio::test]
async fn an_in_memory_database_works_without_a_lock_file() -> anyhow::Result<()> {
    let options = ConnectOptions {
        max_connections: 4,
        acquire_timeout: Duration::from_secs(5),
        create: true,
        synchronous_commit: true,
        lock_timeout: None,
    };
    let store = SqliteStore::connect("sqlite::memory:", &options).await?;
    store.migrate().await?;
    let _guard = store.lock_for_relay()?;
    let _second = store.lock_for_relay()?;
    enqueue(&store, "note", Uuid::new_v4(), serde_json::json!({})).await?;
    assert_eq!(store.status().await?.pending, 1);
    Ok(())
}
