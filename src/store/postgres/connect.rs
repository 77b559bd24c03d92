//! Connecting to PostgreSQL: the URL's parameters sqlx would ignore named and dropped,
//! one direct connection first (for a clear error), then the pool with the relay's
//! session settings.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPoolOptions};
use sqlx::ConnectOptions as _;
use sqlx::Connection;

use super::PgStore;
use crate::store::ConnectOptions;

/// The connection parameters sqlx reads from a URL's query (and `options[…]`); it
/// ignores any other, with a warning that quotes its value (a misspelt `passwd=`
/// would be logged).
const KNOWN_PARAMETERS: [&str; 18] = [
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "application_name",
    "options",
];

/// `url` without the query parameters sqlx would ignore (all but
/// `KNOWN_PARAMETERS`), each named in a warning without its value.
fn without_unknown_parameters(url: &str) -> String {
    let Ok(mut parsed) = reqwest::Url::parse(url) else {
        return url.to_string();
    };
    if parsed.query().is_none() {
        return url.to_string();
    }
    let known = |key: &str| KNOWN_PARAMETERS.contains(&key) || key.starts_with("options[");
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if pairs.iter().all(|(key, _)| known(key)) {
        return url.to_string();
    }
    for (key, _) in pairs.iter().filter(|(key, _)| !known(key)) {
        tracing::warn!(
            parameter = %key,
            "ignoring an unrecognized connection parameter of database.url (its value is not shown)"
        );
    }
    parsed
        .query_pairs_mut()
        .clear()
        .extend_pairs(pairs.iter().filter(|(key, _)| known(key)));
    if parsed.query() == Some("") {
        parsed.set_query(None);
    }
    parsed.to_string()
}

impl PgStore {
    pub async fn connect(url: &str, options: &ConnectOptions) -> anyhow::Result<PgStore> {
        let synchronous_commit = options.synchronous_commit;
        let lock_timeout = options.lock_timeout;
        let url = without_unknown_parameters(url);
        let mut connect_options = PgConnectOptions::from_str(&url)?.application_name("serversync");
        if lock_timeout.is_some() {
            // an operator's command: a statement held up by a lock ends in one line
            // saying so, which sqlx's slow-statement warning, with the statement's
            // whole SQL, would come before
            connect_options = connect_options.disable_statement_logging();
        }
        // One direct connection first: a pool would retry until its timeout and
        // report only "timed out", hiding the cause (refused, auth, unknown db).
        let probe = connect_one(&connect_options, options.acquire_timeout).await?;
        let _ = probe.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .after_connect(move |conn, _| {
                Box::pin(
                    async move { session_settings(conn, synchronous_commit, lock_timeout).await },
                )
            })
            .connect_lazy_with(connect_options);
        Ok(PgStore { pool })
    }
}

/// Turn JIT compilation off for the relay's sessions. Its statements are short, but
/// the claim's estimated cost grows with the backlog and with how few rows look due
/// (a backlog mostly waiting for retries): past `jit_above_cost` every claim was
/// compiled, and a 600-row claim took 196 ms instead of 82 (docs/BENCHMARKS.md).
/// Plan every statement for the outbox as it is now (`plan_cache_mode =
/// force_custom_plan`): an idle relay's claims, repeated every poll, otherwise get a
/// generic plan cached, and one made while a vacuum had left the emptied outbox
/// without pages (sequential scans, the head-of-key probe a scan per candidate)
/// served the next burst: 20,000 rows waited 30–40 s for their first claim. Under
/// load the claim was planned anew each time already (its `LIMIT` keeps the custom
/// plan the cheaper); the other statements are small to plan.
/// Unless `synchronous_commit`, also stop the session's commits waiting for the WAL
/// flush (`ConnectOptions::synchronous_commit`). `SET`s rather than startup options,
/// which poolers such as PgBouncer refuse; a server that refuses them too only keeps
/// its defaults.
async fn session_settings(
    conn: &mut PgConnection,
    synchronous_commit: bool,
    lock_timeout: Option<Duration>,
) -> Result<(), sqlx::Error> {
    if let Some(wait) = lock_timeout {
        let set = format!("SET lock_timeout = '{}ms'", wait.as_millis());
        if let Err(e) = sqlx::query(&set).execute(&mut *conn).await {
            tracing::debug!(error = %e, "cannot set lock_timeout for this session");
        }
    }
    if let Err(e) = sqlx::query("SET jit = off").execute(&mut *conn).await {
        tracing::debug!(error = %e, "cannot turn JIT off for this session");
    }
    if let Err(e) = sqlx::query("SET plan_cache_mode = force_custom_plan")
        .execute(&mut *conn)
        .await
    {
        tracing::debug!(error = %e, "cannot turn cached generic plans off for this session");
    }
    if !synchronous_commit {
        if let Err(e) = sqlx::query("SET synchronous_commit = off")
            .execute(&mut *conn)
            .await
        {
            tracing::debug!(error = %e, "cannot turn synchronous_commit off for this session");
        }
    }
    Ok(())
}

/// One direct connection, waited for at most `wait`, its error described.
pub(super) async fn connect_one(
    options: &PgConnectOptions,
    wait: Duration,
) -> anyhow::Result<PgConnection> {
    tokio::time::timeout(wait, PgConnection::connect_with(options))
        .await
        .map_err(|_| anyhow::anyhow!("timed out after {wait:?}"))?
        .map_err(describe_connect_error)
}

/// sqlx's "error communicating with database: Connection refused (os error 111)" is
/// clear enough; only name the common cases more plainly.
fn describe_connect_error(err: sqlx::Error) -> anyhow::Error {
    match &err {
        sqlx::Error::PoolTimedOut => anyhow::anyhow!("timed out waiting for a database connection"),
        _ => anyhow::Error::new(err),
    }
}
