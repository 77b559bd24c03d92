//! Test data, written by PostgreSQL itself in one `INSERT … SELECT generate_series`.
//!
//! Rows come in calls of three, written together as an application would: a
//! `call_log` (entity_id = the call id) and two `recording`s (payload.callLogId = the
//! call id). The ordering trigger derives the same key for all three, so a call's rows
//! are delivered one at a time, in order — the per-key check the claim query makes is
//! part of what is measured. Payloads are about 300 bytes of JSON.
//!
//! `--layout` changes where a call's rows sit in the queue: `grouped` (the default)
//! puts them next to each other, as when a call is written in one transaction;
//! `spread` puts the three rows a third of the backlog apart, so a row's predecessor
//! is long delivered when the row comes up; `unordered` loads no ordering keys at all.

use anyhow::Context;
use sqlx::PgPool;

use crate::pg::Database;

/// `$1` rows; ids follow the sequence.
/// `$2` is true for the spread layout; `$3` is the number of calls.
const OUTBOX_ROWS_SQL: &str = r#"
INSERT INTO sync_outbox (entity_type, entity_id, payload)
SELECT CASE WHEN k.is_log THEN 'call_log' ELSE 'recording' END,
       CASE WHEN k.is_log THEN c.call_id ELSE md5('rec-' || g)::uuid END,
       CASE WHEN k.is_log THEN jsonb_build_object(
                'id', c.call_id,
                'direction', 'inbound',
                'fromNumber', '+4930' || lpad((g % 9999991)::text, 8, '0'),
                'toNumber', '+4940' || lpad((g % 7777)::text, 8, '0'),
                'startedAt', '2026-02-07T10:05:30Z',
                'endedAt', '2026-02-07T10:09:12Z',
                'durationSeconds', g % 900,
                'agentId', md5('agent-' || (g % 50))::uuid,
                'status', 'completed',
                'tags', jsonb_build_array('bench', 'inbound', 'sales'))
            ELSE jsonb_build_object(
                'id', md5('rec-' || g)::uuid,
                'callLogId', c.call_id,
                'channel', CASE WHEN g % 3 = 1 THEN 'mixed' ELSE 'agent' END,
                'format', 'wav',
                'sampleRate', 8000,
                'durationSeconds', g % 900,
                'sizeBytes', (g % 900) * 16000,
                'checksum', md5('sum-' || g),
                'storagePath', 'calls/' || c.call_id || '/' || g || '.wav')
       END
FROM generate_series(0, $1 - 1) AS g
CROSS JOIN LATERAL (
    SELECT CASE WHEN $2 THEN g % $3 ELSE g / 3 END AS call_no,
           CASE WHEN $2 THEN g < $3 ELSE g % 3 = 0 END AS is_log
) AS k
CROSS JOIN LATERAL (SELECT md5('call-' || k.call_no)::uuid AS call_id) AS c
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    Grouped,
    Spread,
    Unordered,
}

/// `$1` delivered records, ids 1..=$1, sent over the last days.
const SENT_ROWS_SQL: &str = r#"
INSERT INTO sync_outbox_sent (id, entity_type, entity_id, created_at, sent_at, attempts)
SELECT g, CASE WHEN g % 3 = 0 THEN 'call_log' ELSE 'recording' END, md5('old-' || g)::uuid,
       now() - interval '6 days' + g * interval '50 milliseconds',
       now() - interval '6 days' + g * interval '50 milliseconds' + interval '5 milliseconds',
       1
FROM generate_series(1, $1) AS g
"#;

/// What was loaded.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// Every id enqueued, sorted.
    pub ids: Vec<i64>,
    /// Every keyed row as (key, id), sorted: the order the sink must see them in.
    /// The key is the relay's own 64-bit hash of it (`ordering_key_hash`), which
    /// orders two keys of one hash behind each other, as the relay does.
    pub keyed: Vec<(i64, i64)>,
    pub avg_payload_bytes: f64,
    pub ordering_keys: i64,
    pub seconds: f64,
}

/// Enqueue `rows` rows, then VACUUM ANALYZE, CHECKPOINT and `sync` so every run
/// starts from the same state.
pub async fn outbox(db: &Database, rows: u64, layout: Layout) -> anyhow::Result<Loaded> {
    let started = std::time::Instant::now();
    let n = i64::try_from(rows).context("--rows is too large")?;
    if layout == Layout::Unordered {
        db.exec("ALTER TABLE sync_outbox DISABLE TRIGGER sync_outbox_derive_ordering_key")
            .await?;
    }
    let loaded = sqlx::query(OUTBOX_ROWS_SQL)
        .bind(n)
        .bind(layout == Layout::Spread)
        .bind((n + 2) / 3)
        .execute(&db.pool)
        .await
        .context("loading the outbox");
    if layout == Layout::Unordered {
        db.exec("ALTER TABLE sync_outbox ENABLE TRIGGER sync_outbox_derive_ordering_key")
            .await?;
    }
    loaded?;
    settle_table(&db.pool).await?;
    let rows: Vec<(i64, Option<i64>)> =
        sqlx::query_as("SELECT id, ordering_key_hash FROM sync_outbox ORDER BY id")
            .fetch_all(&db.pool)
            .await?;
    let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
    let mut keyed: Vec<(i64, i64)> = rows
        .iter()
        .filter_map(|(id, key)| key.map(|k| (k, *id)))
        .collect();
    keyed.sort_unstable();
    let (avg, keys): (Option<f64>, i64) = sqlx::query_as(
        "SELECT avg(length(payload::text))::float8, count(DISTINCT ordering_key) FROM sync_outbox",
    )
    .fetch_one(&db.pool)
    .await?;
    Ok(Loaded {
        ids,
        keyed,
        avg_payload_bytes: avg.unwrap_or(0.0),
        ordering_keys: keys,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Fill `sync_outbox_sent` with `rows` delivered records and move the outbox's id
/// sequence past them.
pub async fn history(db: &Database, rows: u64) -> anyhow::Result<()> {
    let n = i64::try_from(rows).context("--sent is too large")?;
    sqlx::query(SENT_ROWS_SQL)
        .bind(n)
        .execute(&db.pool)
        .await
        .context("loading sync_outbox_sent")?;
    sqlx::query("SELECT setval('sync_outbox_id_seq', $1)")
        .bind(n.max(1))
        .execute(&db.pool)
        .await?;
    sqlx::raw_sql("VACUUM ANALYZE sync_outbox_sent")
        .execute(&db.pool)
        .await?;
    Ok(())
}

pub async fn settle_table(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::raw_sql("VACUUM ANALYZE sync_outbox")
        .execute(pool)
        .await
        .context("VACUUM ANALYZE")?;
    // needs superuser or pg_checkpoint: best effort on a server that is not ours
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(pool).await {
        eprintln!("note: CHECKPOINT failed ({e}); a checkpoint may land inside a measurement");
    }
    // and what earlier scenarios left for the kernel to write back (a 1 GiB upload's
    // file, pgbench's databases): otherwise that writeback competes with the WAL
    // flushes of the measurement that follows
    match tokio::process::Command::new("sync").status().await {
        Ok(status) if status.success() => {}
        other => {
            eprintln!("note: sync failed ({other:?}); writeback may land inside a measurement")
        }
    }
    Ok(())
}
