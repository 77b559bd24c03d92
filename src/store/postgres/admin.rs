//! PostgreSQL: the operator's queries (`status`, `enqueue`, `dlq`), beside the
//! relay's claim and settle in the parent module.

use super::*;

/// The dead letter's columns, read so that one odd row cannot fail a whole listing:
/// the payload as text (a `Value` refuses nesting past 128 levels, which the relay
/// sends as it is), and a `created_at` that is `infinity` or past what the wire's
/// time type holds as null (its decode would panic).
const DLQ_COLUMNS: &str = "id, outbox_id, entity_type, entity_id, payload::text AS payload, ordering_key, \
    CASE WHEN created_at > '-infinity' AND created_at < '262000-01-01+00' THEN created_at END AS created_at, \
    error_type, http_status, error_message, response_body, attempts, max_attempts, attempt_errors, \
    first_attempt_at, last_attempt_at, dead_at";

enum SelectionBind {
    Ids(Vec<i64>),
    None,
    Matching(Option<String>, Option<i32>, Option<i64>),
}

impl PgStore {
    pub async fn status(&self) -> anyhow::Result<Status> {
        let row = sqlx::query(
            "SELECT count(*) AS pending, \
               count(*) FILTER (WHERE next_attempt_at <= now() AND (lease_until IS NULL OR lease_until < now())) AS due, \
               count(*) FILTER (WHERE lease_until >= now()) AS in_flight, \
               count(ordering_key_hash) - count(DISTINCT ordering_key_hash) AS behind_key, \
               EXTRACT(EPOCH FROM now() - min(created_at) FILTER (WHERE isfinite(created_at)))::float8 AS oldest \
             FROM sync_outbox",
        )
        .fetch_one(&self.pool)
        .await?;
        let by_type = self.dead_by_type().await?;
        let sent_last_5m: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM sync_outbox_sent WHERE sent_at > now() - interval '5 minutes'",
        )
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

    pub async fn enqueue(&self, row: &NewRow) -> anyhow::Result<i64> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO sync_outbox (entity_type, entity_id, payload, ordering_key) \
             VALUES ($1, $2, $3, $4) RETURNING id",
        )
        .bind(&row.entity_type)
        .bind(row.entity_id)
        .bind(&row.payload)
        .bind(&row.ordering_key)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    pub async fn dlq_list(&self, f: &DlqFilter) -> anyhow::Result<Vec<DeadLetter>> {
        let (filter, bind) = selection_filter(&f.matching());
        let sql = format!(
            "SELECT {DLQ_COLUMNS} FROM sync_outbox_dead_letters \
             WHERE {filter} AND ($4::text IS NULL OR entity_type = $4) \
             ORDER BY id LIMIT $5"
        );
        let rows = bind_selection(sqlx::query(&sql), bind)
            .bind(&f.entity_type)
            .bind(f.limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    pub async fn dlq_get(&self, id: i64) -> anyhow::Result<Option<DeadLetter>> {
        let sql = format!("SELECT {DLQ_COLUMNS} FROM sync_outbox_dead_letters WHERE id = $1");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(dead_letter_from_row).transpose()
    }

    pub async fn dlq_requeue(&self, sel: &DlqSelection) -> anyhow::Result<u64> {
        let (filter, bind) = selection_filter(sel);
        let sql = format!(
            "WITH d AS (DELETE FROM sync_outbox_dead_letters WHERE {filter} \
                RETURNING outbox_id, entity_type, entity_id, payload, ordering_key, created_at, \
                          attempt_errors, first_attempt_at) \
             INSERT INTO sync_outbox (id, entity_type, entity_id, payload, ordering_key, created_at, \
                                      attempt_errors, first_attempt_at) \
             SELECT outbox_id, entity_type, entity_id, payload, ordering_key, created_at, \
                    jsonb_set(attempt_errors, '{{-1,requeuedAt}}', \
                              to_jsonb(to_char(now() AT TIME ZONE 'UTC', \
                                               'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'))), \
                    first_attempt_at FROM d"
        );
        let done = bind_selection(sqlx::query(&sql), bind)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    pub async fn dlq_purge(&self, sel: &DlqSelection) -> anyhow::Result<u64> {
        let (filter, bind) = selection_filter(sel);
        let sql = format!("DELETE FROM sync_outbox_dead_letters WHERE {filter}");
        let done = bind_selection(sqlx::query(&sql), bind)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }
}

fn selection_filter(sel: &DlqSelection) -> (&'static str, SelectionBind) {
    match sel {
        DlqSelection::Ids(ids) => ("id = ANY($1)", SelectionBind::Ids(ids.clone())),
        DlqSelection::All => ("true", SelectionBind::None),
        DlqSelection::Matching {
            error_type,
            http_status,
            older_than,
        } => (
            "($1::text IS NULL OR error_type = $1) AND ($2::int IS NULL OR http_status = $2) \
             AND ($3::bigint IS NULL OR dead_at < now() - $3 * interval '1 millisecond')",
            SelectionBind::Matching(error_type.clone(), *http_status, older_than.map(millis)),
        ),
    }
}

fn bind_selection<'q>(
    q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    bind: SelectionBind,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    match bind {
        SelectionBind::Ids(ids) => q.bind(ids),
        SelectionBind::None => q,
        SelectionBind::Matching(t, status, ms) => q.bind(t).bind(status).bind(ms),
    }
}

fn dead_letter_from_row(row: &sqlx::postgres::PgRow) -> anyhow::Result<DeadLetter> {
    Ok(DeadLetter {
        id: row.try_get("id")?,
        outbox_id: row.try_get("outbox_id")?,
        entity_type: row.try_get("entity_type")?,
        entity_id: row.try_get::<Uuid, _>("entity_id")?.to_string(),
        payload: {
            let text: String = row.try_get("payload")?;
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text))
        },
        ordering_key: row.try_get("ordering_key")?,
        created_at: row.try_get::<Option<DateTime<Utc>>, _>("created_at")?,
        error_type: row.try_get("error_type")?,
        http_status: row.try_get("http_status")?,
        error_message: row.try_get("error_message")?,
        response_body: row.try_get("response_body")?,
        attempts: row.try_get("attempts")?,
        max_attempts: row.try_get("max_attempts")?,
        attempt_errors: row.try_get("attempt_errors")?,
        first_attempt_at: row.try_get::<Option<DateTime<Utc>>, _>("first_attempt_at")?,
        last_attempt_at: row.try_get::<Option<DateTime<Utc>>, _>("last_attempt_at")?,
        dead_at: row.try_get("dead_at")?,
    })
}
