//! What the resilience tests share beyond the harness: bulk seeding, reading what the
//! fake Frontend received per outbox id, JSON log events, and a
//! TCP switch in front of the sink that can refuse connections on a fixed port.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::harness::relay::Running;
use crate::harness::sink::Entry;
pub use crate::harness::MetricsEndpoint;
use crate::harness::TestEnv;

/// Insert `n` JSON rows in one statement (ids 1..=n on a fresh database): call logs,
/// recordings and contacts whose payloads hold every JSON type, spread over `calls`
/// calls. Call logs and recordings take their ordering key from the call (derived by
/// the trigger); contacts have none.
pub async fn seed_calls(env: &TestEnv, n: i64, calls: i64) {
    sqlx::query(
        "INSERT INTO sync_outbox (entity_type, entity_id, payload) \
         SELECT (ARRAY['call_log', 'recording', 'contact'])[1 + g % 3], \
                CASE WHEN g % 3 = 0 THEN md5('call' || g % $2)::uuid ELSE md5('row' || g)::uuid END, \
                jsonb_build_object( \
                    'seq', g, 'callLogId', md5('call' || g % $2)::uuid, \
                    'name', 'row ' || g || ' ünïcødé \"quoted\" \\ back', \
                    'answered', g % 2 = 0, 'score', g * 1.25, 'notes', NULL, \
                    'tags', jsonb_build_array('a', g, g % 2 = 1, NULL), \
                    'agent', jsonb_build_object('id', g % 17, 'name', 'agent-' || g % 17)) \
         FROM generate_series(1, $1::bigint) AS g ORDER BY g",
    )
    .bind(n)
    .bind(calls)
    .execute(env.db.pg())
    .await
    .expect("seed outbox rows");
}

/// Insert `n` call logs with an explicit ordering key `k<g % keys>`.
pub async fn seed_keyed(env: &TestEnv, n: i64, keys: i64) {
    seed_call_logs_keyed(env, n, keys, "'k' || g % $2").await;
}

/// `n` rows in calls of `per_key`, each call's rows next to each other in the queue
/// (as one transaction writes a call), keyed `k<(g - 1) / per_key>`.
pub async fn seed_adjacent_calls(env: &TestEnv, n: i64, per_key: i64) {
    seed_call_logs_keyed(env, n, per_key, "'k' || (g - 1) / $2").await;
}

/// `n` call logs (`g` = 1..=n) whose ordering key is `key`, an SQL expression of `g`
/// and `$2` = `m`.
async fn seed_call_logs_keyed(env: &TestEnv, n: i64, m: i64, key: &str) {
    sqlx::query(&format!(
        "INSERT INTO sync_outbox (entity_type, entity_id, payload, ordering_key) \
         SELECT 'call_log', md5('row' || g)::uuid, \
                jsonb_build_object('seq', g, 'key', {key}, 'ok', true), {key} \
         FROM generate_series(1, $1::bigint) AS g ORDER BY g"
    ))
    .bind(n)
    .bind(m)
    .execute(env.db.pg())
    .await
    .expect("seed keyed outbox rows");
}

/// Insert one call log of its own ordering key; returns its id.
pub async fn insert_one(env: &TestEnv) -> i64 {
    let id = uuid::Uuid::new_v4();
    env.insert(
        "call_log",
        id,
        serde_json::json!({"id": id, "answered": true}),
    )
    .await
}

/// Whether some session on `pool`'s database is LISTENing (a relay's listener).
pub async fn someone_listens(pool: &sqlx::PgPool) -> bool {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_stat_activity \
         WHERE datname = current_database() AND query ILIKE 'LISTEN%'",
    )
    .fetch_one(pool)
    .await
    .map(|n| n > 0)
    .unwrap_or(false)
}

/// Entries by outbox id, copies in arrival order.
pub fn by_id(entries: Vec<Entry>) -> BTreeMap<i64, Vec<Entry>> {
    let mut map: BTreeMap<i64, Vec<Entry>> = BTreeMap::new();
    for e in entries {
        map.entry(e.outbox_id).or_default().push(e);
    }
    map
}

/// Copies beyond the first, summed over every id.
pub fn duplicates(received: &BTreeMap<i64, Vec<Entry>>) -> usize {
    received.values().map(|copies| copies.len() - 1).sum()
}

/// Every id in `1..=n` was received, and nothing else.
#[track_caller]
pub fn assert_all_received(received: &BTreeMap<i64, Vec<Entry>>, n: i64) {
    let missing: Vec<i64> = (1..=n).filter(|id| !received.contains_key(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {n} rows never reached the sink, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    let strays: Vec<i64> = received
        .keys()
        .copied()
        .filter(|id| !(1..=n).contains(id))
        .collect();
    assert!(
        strays.is_empty(),
        "the sink got ids that were never inserted: {strays:?}"
    );
}

/// `(pending, sent, dead)` row counts.
pub async fn tables(env: &TestEnv) -> (i64, i64, i64) {
    (
        env.count("sync_outbox").await,
        env.count("sync_outbox_sent").await,
        env.count("sync_outbox_dead_letters").await,
    )
}

/// Rows whose lease has not expired yet.
pub async fn live_leases(env: &TestEnv) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM sync_outbox WHERE lease_until > now()")
        .fetch_one(env.db.pg())
        .await
        .expect("count live leases")
}

/// Wait until `relay` exits by itself or `condition` holds; `false` if it exited.
pub async fn until_or_exit<F, Fut>(
    relay: &mut Running,
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if condition().await {
            return true;
        }
        if !relay.is_running() {
            return false;
        }
        if Instant::now() >= deadline {
            panic!(
                "timed out after {timeout:?} waiting for {what}\n--- relay stderr ---\n{}",
                relay.stderr()
            );
        }
        tokio::time::sleep(crate::harness::POLL).await;
    }
}

/// Parse the JSON log lines of a relay started with `--log-format json`; returns the
/// events whose message is `message`.
pub fn log_events(stderr: &str, message: &str) -> Vec<serde_json::Value> {
    stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == message || v["fields"]["message"] == message)
        .collect()
}

/// A numeric field of a JSON log event (flattened or under `fields`).
pub fn log_field(event: &serde_json::Value, name: &str) -> Option<u64> {
    event[name]
        .as_u64()
        .or_else(|| event["fields"][name].as_u64())
}

/// A TCP forwarder on a fixed 127.0.0.1 port in front of the sink. `down()` closes the
/// listener and every forwarded connection, so connecting is *refused*; `up()` listens
/// on the same port again. Runs on its own thread, like the sink.
pub struct TcpSwitch {
    addr: SocketAddr,
    target: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
    current: Option<CancellationToken>,
}

impl TcpSwitch {
    /// Forward to `target_url` (`http://127.0.0.1:<port>`), listening from the start.
    pub fn start(target_url: &str) -> TcpSwitch {
        let target: SocketAddr = target_url
            .trim_start_matches("http://")
            .parse()
            .expect("sink url is http://ip:port");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("tcp-switch")
            .enable_all()
            .build()
            .expect("switch runtime");
        let mut switch = TcpSwitch {
            addr: SocketAddr::from(([127, 0, 0, 1], crate::harness::free_port())),
            target,
            runtime: Some(runtime),
            current: None,
        };
        switch.up();
        switch
    }

    /// `http://127.0.0.1:<port>`: give this to the relay as `ingest.base_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Listen (again) on the same port.
    pub fn up(&mut self) {
        if self.current.is_some() {
            return;
        }
        let runtime = self.runtime.as_ref().expect("runtime");
        let addr = self.addr;
        // registers with the switch's reactor; called from the test's runtime, which
        // forbids `block_on`
        let _context = runtime.enter();
        let listen = || {
            let socket = tokio::net::TcpSocket::new_v4()?;
            // the port has TIME_WAIT leftovers from the connections just cut
            socket.set_reuseaddr(true)?;
            socket.bind(addr)?;
            socket.listen(128)
        };
        let listener: tokio::net::TcpListener =
            listen().unwrap_or_else(|e: std::io::Error| panic!("switch: listen on {addr}: {e}"));
        let cancel = CancellationToken::new();
        runtime.spawn(forward(listener, self.target, cancel.clone()));
        self.current = Some(cancel);
    }

    /// Stop listening and cut every forwarded connection: new connections are refused.
    pub fn down(&mut self) {
        if let Some(cancel) = self.current.take() {
            cancel.cancel();
        }
        // the listener is dropped by its task; wait until the port refuses
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(100)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "switch: {} still accepts",
                self.addr
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for TcpSwitch {
    fn drop(&mut self) {
        if let Some(cancel) = self.current.take() {
            cancel.cancel();
        }
        if let Some(runtime) = self.runtime.take() {
            // may be dropped inside the test's runtime: do not block
            runtime.shutdown_background();
        }
    }
}

async fn forward(listener: tokio::net::TcpListener, target: SocketAddr, cancel: CancellationToken) {
    loop {
        let (mut inbound, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
        };
        let cancel = cancel.clone();
        tokio::spawn(async move {
            let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await else {
                return;
            };
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            }
        });
    }
}

/// Id → ordering key of every row still in the outbox.
pub async fn ordering_keys(env: &TestEnv) -> HashMap<i64, String> {
    sqlx::query_as::<_, (i64, Option<String>)>("SELECT id, ordering_key FROM sync_outbox")
        .fetch_all(env.db.pg())
        .await
        .expect("select ordering keys")
        .into_iter()
        .filter_map(|(id, key)| key.map(|k| (id, k)))
        .collect()
}
