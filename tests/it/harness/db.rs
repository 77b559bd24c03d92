//! The test's own connection to the relay's database, on either backend.
//!
//! Tests read and write the tables through [`TestEnv`](super::TestEnv)'s helpers, which
//! go through [`Db`]: one SQL text for both backends wherever the dialects agree, the
//! few differences (placeholders, timestamps, UUID columns, table listing) handled here.
//! Rows decode into the same Rust types on both: SQLite's TEXT timestamps and JSON
//! decode as they are, and its hyphenated-text UUIDs are turned into the 16 bytes sqlx
//! reads a `Uuid` from by [`Db::uuid_column`].

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{FromRow, PgPool, QueryBuilder, SqlitePool};
use uuid::Uuid;

use super::pg::{test_db, TestDb};

/// Which store a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

pub enum Db {
    Postgres(TestDb),
    Sqlite {
        /// `sqlite://<work dir>/outbox.db`
        url: String,
        pool: SqlitePool,
    },
}

/// A row as a producer writes it.
#[derive(Clone, Debug)]
pub struct NewRow {
    pub entity_type: String,
    pub entity_id: Uuid,
    pub payload: Value,
    /// `None` lets the database derive it.
    pub ordering_key: Option<String>,
}

impl NewRow {
    pub fn new(entity_type: &str, entity_id: Uuid, payload: Value) -> NewRow {
        NewRow {
            entity_type: entity_type.to_string(),
            entity_id,
            payload,
            ordering_key: None,
        }
    }

    pub fn keyed(mut self, ordering_key: impl Into<String>) -> NewRow {
        self.ordering_key = Some(ordering_key.into());
        self
    }
}

/// Rows per INSERT statement in [`Db::insert`]: 4 parameters each, well under both
/// backends' parameter limits.
const INSERT_CHUNK: usize = 1000;

impl Db {
    /// A fresh database on `backend`; a SQLite file lives in `dir`.
    pub async fn new(backend: Backend, dir: &Path) -> Db {
        match backend {
            Backend::Postgres => Db::Postgres(test_db().await),
            Backend::Sqlite => Db::sqlite(dir).await,
        }
    }

    /// `dir/outbox.db`, created empty. WAL and a busy timeout, as the relay opens it,
    /// so the test's reads and writes wait for the relay instead of failing.
    async fn sqlite(dir: &Path) -> Db {
        let url = format!("sqlite://{}", dir.join("outbox.db").display());
        let options = SqliteConnectOptions::from_str(&url)
            .unwrap_or_else(|e| panic!("bad SQLite url {url}: {e}"))
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(options)
            .await
            .unwrap_or_else(|e| panic!("open {url}: {e}"));
        Db::Sqlite { url, pool }
    }

    pub fn backend(&self) -> Backend {
        match self {
            Db::Postgres(_) => Backend::Postgres,
            Db::Sqlite { .. } => Backend::Sqlite,
        }
    }

    /// The relay's `database.url`.
    pub fn url(&self) -> &str {
        match self {
            Db::Postgres(db) => &db.url,
            Db::Sqlite { url, .. } => url,
        }
    }

    /// The pool of a PostgreSQL-only test.
    #[track_caller]
    pub fn pg(&self) -> &PgPool {
        match self {
            Db::Postgres(db) => &db.pool,
            Db::Sqlite { .. } => panic!("a PostgreSQL-only helper was used on SQLite"),
        }
    }

    /// A transaction that holds `LOCK TABLE table IN ACCESS EXCLUSIVE MODE` (as a
    /// migration or an operator would): every other session's statement on the
    /// table waits until it ends (commit or roll it back, or drop it).
    pub async fn hold_lock(&self, table: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
        let mut holder = self.pg().begin().await.expect("a transaction");
        sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
            .execute(&mut *holder)
            .await
            .expect("the lock");
        holder
    }

    /// A `select` expression for the UUID column `column` that sqlx decodes as a
    /// `Uuid` on this backend (SQLite keeps it as hyphenated text).
    pub fn uuid_column(&self, column: &str) -> String {
        match self {
            Db::Postgres(_) => column.to_string(),
            Db::Sqlite { .. } => format!("unhex(replace({column}, '-', '')) AS {column}"),
        }
    }

    /// An SQL expression for the database clock plus `seconds` (may be negative), in
    /// the form the backend stores and compares timestamps in.
    pub fn now_plus(&self, seconds: i64) -> String {
        match self {
            Db::Postgres(_) => format!("(now() + interval '{seconds} seconds')"),
            Db::Sqlite { .. } => {
                format!("strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '{seconds:+} seconds')")
            }
        }
    }

    /// Run a statement written for both dialects (`$n` placeholders are not allowed:
    /// format values into the text, or add a helper).
    pub async fn execute(&self, sql: &str) -> u64 {
        let done = match self {
            Db::Postgres(db) => sqlx::raw_sql(sql)
                .execute(&db.pool)
                .await
                .map(|d| d.rows_affected()),
            Db::Sqlite { pool, .. } => sqlx::raw_sql(sql)
                .execute(pool)
                .await
                .map(|d| d.rows_affected()),
        };
        done.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// One integer, e.g. a `count(*)`.
    pub async fn scalar(&self, sql: &str) -> i64 {
        let value = match self {
            Db::Postgres(db) => sqlx::query_scalar(sql).fetch_one(&db.pool).await,
            Db::Sqlite { pool, .. } => sqlx::query_scalar(sql).fetch_one(pool).await,
        };
        value.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Rows of a query written for both dialects, decoded into `T`.
    pub async fn rows<T>(&self, sql: &str) -> Vec<T>
    where
        T: Send + Unpin + for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow>,
    {
        let rows = match self {
            Db::Postgres(db) => sqlx::query_as(sql).fetch_all(&db.pool).await,
            Db::Sqlite { pool, .. } => sqlx::query_as(sql).fetch_all(pool).await,
        };
        rows.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Tables of the application schema (0 before `migrate`).
    pub async fn table_count(&self) -> i64 {
        self.scalar(match self {
            Db::Postgres(_) => {
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            }
            Db::Sqlite { .. } => {
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            }
        })
        .await
    }

    /// Insert rows the way producers do (the database fills in the defaults and the
    /// ordering key), a thousand per statement; returns their ids, ascending.
    pub async fn insert(&self, rows: &[NewRow]) -> Vec<i64> {
        let mut ids = Vec::with_capacity(rows.len());
        for chunk in rows.chunks(INSERT_CHUNK) {
            let sql = "INSERT INTO sync_outbox (entity_type, entity_id, payload, ordering_key) ";
            let inserted: Result<Vec<i64>, sqlx::Error> = match self {
                Db::Postgres(db) => {
                    QueryBuilder::new(sql)
                        .push_values(chunk, |mut b, r| {
                            b.push_bind(r.entity_type.clone())
                                .push_bind(r.entity_id)
                                .push_bind(r.payload.clone())
                                .push_bind(r.ordering_key.clone());
                        })
                        .push(" RETURNING id")
                        .build_query_scalar()
                        .fetch_all(&db.pool)
                        .await
                }
                // SQLite keeps the id as hyphenated text and the payload as JSON text.
                Db::Sqlite { pool, .. } => {
                    QueryBuilder::new(sql)
                        .push_values(chunk, |mut b, r| {
                            b.push_bind(r.entity_type.clone())
                                .push_bind(r.entity_id.hyphenated().to_string())
                                .push_bind(r.payload.to_string())
                                .push_bind(r.ordering_key.clone());
                        })
                        .push(" RETURNING id")
                        .build_query_scalar()
                        .fetch_all(pool)
                        .await
                }
            };
            ids.extend(inserted.unwrap_or_else(|e| panic!("insert outbox rows: {e}")));
        }
        ids.sort_unstable();
        ids
    }
}
