//! Settling a claim: its sent rows archived (or deleted), its failures given their
//! retry or moved to the dead letters, in one transaction, each statement fenced on
//! the claim's token.

use super::PgStore;
use crate::store::{millis, tally, SettleReport, Settlement};

/// The archive statement: sent rows leave the outbox (fenced on the claim token) and
/// their records go to `sync_outbox_sent`, followed by `$tail`; it returns the ids it
/// archived (as every settle statement does: the rest had lost their lease). One
/// text for both forms below, so that they cannot drift apart.
macro_rules! sent_archive_sql {
    ($tail:literal) => {
        concat!(
            r#"
WITH d AS (
    DELETE FROM sync_outbox WHERE id = ANY($1) AND claim_token = $2
    RETURNING id, entity_type, entity_id, created_at, attempts
), a AS (
INSERT INTO sync_outbox_sent (id, entity_type, entity_id, created_at, attempts)
SELECT id, entity_type, entity_id, created_at, GREATEST(LEAST(attempts, 2147483646), 0) + 1 FROM d
"#,
            $tail,
            "RETURNING id) SELECT array_agg(id) FROM a"
        )
    };
}

/// Sent rows move to the archive with a plain `INSERT`: an id is normally archived
/// once, and `ON CONFLICT` (a speculative insertion per row) cost the database 5–12 %
/// more CPU per row in pgbench (docs/BENCHMARKS.md). An id can be archived already
/// only when the outbox's sequence went back (`TRUNCATE … RESTART IDENTITY`, a
/// restore) while its records were kept: the unique violation that follows rolls the
/// settle back, and `settle` runs it again with `SENT_ARCHIVE_UPSERT_SQL`.
const SENT_ARCHIVE_SQL: &str = sent_archive_sql!("");

/// The archive for ids whose records are there already: the newer delivery's record
/// replaces the older.
const SENT_ARCHIVE_UPSERT_SQL: &str = sent_archive_sql!(
    "ON CONFLICT (id) DO UPDATE SET entity_type = excluded.entity_type,
    entity_id = excluded.entity_id, created_at = excluded.created_at,
    sent_at = excluded.sent_at, attempts = excluded.attempts
"
);

const SENT_DELETE_SQL: &str =
    "WITH d AS (DELETE FROM sync_outbox WHERE id = ANY($1) AND claim_token = $2 \
    RETURNING id) SELECT array_agg(id) FROM d";

const RETRY_SQL: &str = r#"
WITH r AS (
UPDATE sync_outbox o SET
    attempts = GREATEST(LEAST(o.attempts, 2147483646), 0) + CASE WHEN u.charged THEN 1 ELSE 0 END,
    next_attempt_at = now() + u.delay_ms * interval '1 millisecond',
    last_error_type = u.error_type,
    last_error = u.message,
    last_http_status = u.http_status,
    attempt_errors = CASE WHEN u.charged THEN o.attempt_errors || jsonb_build_array(u.entry) ELSE o.attempt_errors END,
    first_attempt_at = CASE WHEN u.charged THEN COALESCE(o.first_attempt_at, now()) ELSE o.first_attempt_at END,
    claim_token = NULL, lease_owner = NULL, lease_until = NULL
FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::int[], $6::bool[], $7::jsonb[])
    AS u(id, delay_ms, error_type, message, http_status, charged, entry)
WHERE o.id = u.id AND o.claim_token = $8
RETURNING o.id
) SELECT array_agg(id) FROM r
"#;

const DEAD_SQL: &str = r#"
WITH u AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::int[], $4::text[], $5::text[], $6::jsonb[], $7::int[])
        AS u(id, error_type, http_status, message, response_body, entry, max_attempts)
), d AS (
    DELETE FROM sync_outbox o USING u
    WHERE o.id = u.id AND o.claim_token = $8
    RETURNING o.id, o.entity_type, o.entity_id, o.payload, o.ordering_key, o.created_at, o.attempts,
              o.attempt_errors, o.first_attempt_at,
              u.error_type, u.http_status, u.message, u.response_body, u.entry, u.max_attempts
), a AS (
INSERT INTO sync_outbox_dead_letters
    (outbox_id, entity_type, entity_id, payload, ordering_key, created_at, error_type, http_status,
     error_message, response_body, attempts, max_attempts, attempt_errors, first_attempt_at, last_attempt_at)
SELECT id, entity_type, entity_id, payload, ordering_key, created_at, error_type, http_status,
       message, response_body, GREATEST(LEAST(attempts, 2147483646), 0) + 1, max_attempts, attempt_errors || jsonb_build_array(entry),
       COALESCE(first_attempt_at, now()), now()
FROM d
RETURNING outbox_id
) SELECT array_agg(outbox_id) FROM a
"#;

impl PgStore {
    /// One transaction; when only one statement is needed (the common case: every
    /// row sent) it runs alone, a statement being atomic by itself, which saves the
    /// BEGIN and COMMIT round trips.
    pub async fn settle(&self, s: &Settlement, keep_sent: bool) -> anyhow::Result<SettleReport> {
        let archive = if keep_sent {
            Archive::Insert
        } else {
            Archive::None
        };
        match self.settle_with(s, archive).await {
            Err(e) if keep_sent && is_archived_already(&e) => {
                tracing::warn!(
                    "delivered rows' ids are in sync_outbox_sent already (the outbox's id \
                     sequence went back?): their records are replaced"
                );
                self.settle_with(s, Archive::Upsert).await
            }
            other => other,
        }
    }

    async fn settle_with(&self, s: &Settlement, archive: Archive) -> anyhow::Result<SettleReport> {
        let parts = [
            !s.sent.is_empty(),
            !s.retries.is_empty(),
            !s.dead.is_empty(),
        ]
        .iter()
        .filter(|p| **p)
        .count();
        if parts > 1 {
            let mut tx = self.pool.begin().await?;
            let report = write_settlement(&mut tx, s, archive).await?;
            tx.commit().await?;
            Ok(report)
        } else {
            let mut conn = self.pool.acquire().await?;
            write_settlement(&mut conn, s, archive).await
        }
    }
}

/// How a settle removes its sent rows from the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Archive {
    /// `retention.delete_sent`: no record kept.
    None,
    /// Into `sync_outbox_sent`, ids new there (the common case).
    Insert,
    /// Into `sync_outbox_sent`, replacing records of the same ids.
    Upsert,
}

/// Whether a settle failed on a unique violation: a sent row's id in
/// `sync_outbox_sent` already (`sync_outbox_sent_pkey`), the only unique key an
/// archiving settle can collide on. Not matched by the constraint's name, which a
/// pooler or a renamed constraint may not report: were the violation another one, the
/// settle with the upsert fails again and its error is the one reported.
fn is_archived_already(e: &anyhow::Error) -> bool {
    crate::store::is_unique_violation(e)
}

async fn write_settlement(
    conn: &mut sqlx::PgConnection,
    s: &Settlement,
    archive: Archive,
) -> anyhow::Result<SettleReport> {
    let mut report = SettleReport::default();
    if !s.sent.is_empty() {
        let sql = match archive {
            Archive::None => SENT_DELETE_SQL,
            Archive::Insert => SENT_ARCHIVE_SQL,
            Archive::Upsert => SENT_ARCHIVE_UPSERT_SQL,
        };
        let written: Option<Vec<i64>> = sqlx::query_scalar(sql)
            .bind(&s.sent)
            .bind(s.token)
            .fetch_one(&mut *conn)
            .await?;
        report.sent = tally(
            &mut report.lost,
            s.sent.iter().copied(),
            &written.unwrap_or_default(),
        );
    }
    if !s.retries.is_empty() {
        let r = &s.retries;
        let written: Option<Vec<i64>> = sqlx::query_scalar(RETRY_SQL)
            .bind(r.iter().map(|x| x.id).collect::<Vec<_>>())
            .bind(r.iter().map(|x| millis(x.delay)).collect::<Vec<_>>())
            .bind(
                r.iter()
                    .map(|x| x.error.error_type.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                r.iter()
                    .map(|x| x.error.message.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(r.iter().map(|x| x.error.http_status).collect::<Vec<_>>())
            .bind(r.iter().map(|x| x.charged).collect::<Vec<_>>())
            .bind(
                r.iter()
                    .map(|x| x.error.history_entry.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(s.token)
            .fetch_one(&mut *conn)
            .await?;
        report.retried = tally(
            &mut report.lost,
            r.iter().map(|x| x.id),
            &written.unwrap_or_default(),
        );
    }
    if !s.dead.is_empty() {
        let d = &s.dead;
        let written: Option<Vec<i64>> = sqlx::query_scalar(DEAD_SQL)
            .bind(d.iter().map(|x| x.id).collect::<Vec<_>>())
            .bind(
                d.iter()
                    .map(|x| x.error.error_type.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(d.iter().map(|x| x.error.http_status).collect::<Vec<_>>())
            .bind(
                d.iter()
                    .map(|x| x.error.message.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|x| x.error.response_body.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(
                d.iter()
                    .map(|x| x.error.history_entry.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(d.iter().map(|x| x.max_attempts).collect::<Vec<_>>())
            .bind(s.token)
            .fetch_one(&mut *conn)
            .await?;
        report.dead = tally(
            &mut report.lost,
            d.iter().map(|x| x.id),
            &written.unwrap_or_default(),
        );
    }
    Ok(report)
}
