//! SQLite: the operator's queries (`status`, `enqueue`, `dlq`), beside the relay's
//! claim and settle in the parent module.

use super::*;

const DLQ_COLUMNS: &str = "id, outbox_id, entity_type, entity_id, payload, ordering_key, created_at, error_type, \
    http_status, error_message, response_body, attempts, max_attempts, attempt_errors, first_attempt_at, \
    last_attempt_at, dead_at";

enum SelectionBind {
    None,
    Text(String),
    Matching(Option<String>, Option<i32>, Option<i64>),
}

impl SqliteStore {
    pub async fn status(&self) -> anyhow::Result<Status> {
        let sql = concat!(
            "SELECT count(*) AS pending, count(*) FILTER (WHERE next_attempt_at <= ",
            now!(),
            " AND (lease_until IS NULL OR lease_until < ",
            now!(),
            ")) AS due, count(*) FILTER (WHERE lease_until >= ",
            now!(),
            ") AS in_flight, count(ordering_key) - count(DISTINCT ordering_key) AS behind_key, \
             (julianday('now') - min(CASE WHEN typeof(created_at) = 'text' \
             THEN julianday(created_at) END)) * 86400.0 AS oldest FROM sync_outbox"
        );
        let row = sqlx::query(sql).fetch_one(&self.pool).await?;
        let by_type = self.dead_by_type().await?;
        let sent_last_5m: i64 = sqlx::query_scalar(concat!(
            "SELECT count(*) FROM sync_outbox_sent WHERE sent_at > ",
            now_plus_ms!("?1")
        ))
        .bind(-300_000_i64)
        .fetch_one(&self.pool)
        .await?;
        Ok(Status {
            pending: row.try_get("pending")?,
            due: row.try_get("due")?,
            in_flight: row.try_get("in_flight")?,
            waiting_behind_key: row.try_get("behind_key")?,
            oldest_pending_age_seconds: row
                .try_get::<Option<f64>, _>("oldest")?
                .map(|a| a.max(0.0)),
            dead_letters: by_type.values().sum(),
            dead_letters_by_error_type: by_type,
            sent_last_5m,
        })
    }

    /// The entity id is stored as hyphenated text (what producers write, and what the
    /// ordering trigger copies), never as sqlx's default 16-byte blob.
    pub async fn enqueue(&self, row: &NewRow) -> anyhow::Result<i64> {
        let mut tx = self.write_tx().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload, ordering_key) \
             VALUES (?1, ?2, ?3, ?4) RETURNING id",
        )
        .bind(&row.entity_type)
        .bind(row.entity_id.hyphenated().to_string())
        .bind(row.payload.to_string())
        .bind(&row.ordering_key)
        .fetch_one(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(id)
    }

    pub async fn dlq_list(&self, f: &DlqFilter) -> anyhow::Result<Vec<DeadLetter>> {
        let (filter, bind) = selection_filter(&f.matching())?;
        let sql = format!(
            "SELECT {DLQ_COLUMNS} FROM sync_outbox_dead_letters \
             WHERE {filter} AND (?4 IS NULL OR entity_type = ?4) \
             ORDER BY id LIMIT ?5"
        );
        let rows = bind_selection(sqlx::query(&sql), bind)
            .bind(&f.entity_type)
            .bind(f.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    pub async fn dlq_get(&self, id: i64) -> anyhow::Result<Option<DeadLetter>> {
        let sql = format!("SELECT {DLQ_COLUMNS} FROM sync_outbox_dead_letters WHERE id = ?1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(dead_letter_from_row).transpose()
    }

    /// The selection is resolved to ids first, so the copy and the delete see exactly
    /// the same rows even when the filter reads the clock.
    pub async fn dlq_requeue(&self, sel: &DlqSelection) -> anyhow::Result<u64> {
        let (filter, bind) = selection_filter(sel)?;
        let mut tx = self.write_tx().await?;
        let select = format!("SELECT id FROM sync_outbox_dead_letters WHERE {filter}");
        let rows = bind_selection(sqlx::query(&select), bind)
            .fetch_all(&mut *tx)
            .await?;
        let ids = rows
            .iter()
            .map(|r| r.try_get::<i64, _>(0))
            .collect::<Result<Vec<_>, _>>()?;
        if ids.is_empty() {
            return Ok(0);
        }
        let ids = serde_json::to_string(&ids)?;
        // the history is kept, its last attempt marked with the requeue (as on PostgreSQL)
        sqlx::query(concat!(
            "INSERT INTO sync_outbox (id, entity_type, entity_id, payload, ordering_key, created_at, \
                                      attempt_errors, first_attempt_at) \
             SELECT outbox_id, entity_type, entity_id, payload, ordering_key, created_at, \
               json_set(attempt_errors, '$[#-1].requeuedAt', ",
            now!(),
            "), first_attempt_at FROM sync_outbox_dead_letters WHERE id IN (SELECT value FROM json_each(?1)) ORDER BY id"
        ))
        .bind(&ids)
        .execute(&mut *tx)
        .await
        .context("moving dead letters back to the outbox")?;
        let done = sqlx::query(
            "DELETE FROM sync_outbox_dead_letters WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }

    pub async fn dlq_purge(&self, sel: &DlqSelection) -> anyhow::Result<u64> {
        let (filter, bind) = selection_filter(sel)?;
        let sql = format!("DELETE FROM sync_outbox_dead_letters WHERE {filter}");
        let mut tx = self.write_tx().await?;
        let done = bind_selection(sqlx::query(&sql), bind)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected())
    }
}

fn selection_filter(sel: &DlqSelection) -> anyhow::Result<(&'static str, SelectionBind)> {
    Ok(match sel {
        DlqSelection::Ids(ids) => (
            "id IN (SELECT value FROM json_each(?1))",
            SelectionBind::Text(serde_json::to_string(ids)?),
        ),
        DlqSelection::All => ("1", SelectionBind::None),
        DlqSelection::Matching {
            error_type,
            http_status,
            older_than,
        } => (
            concat!(
                "(?1 IS NULL OR error_type = ?1) AND (?2 IS NULL OR http_status = ?2) \
                 AND (?3 IS NULL OR dead_at < ",
                now_plus_ms!("?3"),
                ")"
            ),
            SelectionBind::Matching(
                error_type.clone(),
                *http_status,
                older_than.map(|d| -offset_ms(d)),
            ),
        ),
    })
}

fn bind_selection<'q>(
    q: sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>>,
    bind: SelectionBind,
) -> sqlx::query::Query<'q, Sqlite, SqliteArguments<'q>> {
    match bind {
        SelectionBind::None => q,
        SelectionBind::Text(t) => q.bind(t),
        SelectionBind::Matching(t, status, ms) => q.bind(t).bind(status).bind(ms),
    }
}

fn dead_letter_from_row(row: &SqliteRow) -> anyhow::Result<DeadLetter> {
    let id: i64 = row.try_get("id")?;
    let json = |col: &str| -> anyhow::Result<serde_json::Value> {
        let text = get_text(row, col)?;
        serde_json::from_str(&text).with_context(|| format!("dead letter {id}: {col} is not JSON"))
    };
    Ok(DeadLetter {
        id,
        outbox_id: row.try_get("outbox_id")?,
        entity_type: get_text_lossy(row, "entity_type")?,
        entity_id: get_text_lossy(row, "entity_id")?,
        // as the producer wrote it, when that was no JSON (it is why the row died)
        payload: json("payload")
            .or_else(|_| get_text_lossy(row, "payload").map(serde_json::Value::String))?,
        ordering_key: get_opt_text_lossy(row, "ordering_key")?,
        // what a producer wrote, possibly no time at all (the reason it died)
        created_at: get_time(row, "created_at").ok(),
        error_type: row.try_get("error_type")?,
        http_status: row.try_get("http_status")?,
        error_message: row.try_get("error_message")?,
        response_body: row.try_get("response_body")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        attempt_errors: json("attempt_errors")?,
        first_attempt_at: get_opt_time(row, "first_attempt_at")?,
        last_attempt_at: get_opt_time(row, "last_attempt_at")?,
        dead_at: get_time(row, "dead_at")?,
    })
}
