//! A fast stand-in for the Frontend's ingest API: answers 200 at once and records
//! what arrived. It runs on a thread of its own with a current-thread runtime, so its
//! cost is one core at most and the bench's own tasks never delay it.
//!
//! - `POST /api/ingest/sync` records, per `outboxId`, the wall-clock arrival time
//!   (`SystemTime`, because latencies are compared with commit times taken in the
//!   bench's producers); duplicates are kept, to be counted.
//! - `POST /api/ingest/recording-file` streams the multipart body and counts the bytes
//!   of each part; nothing is buffered.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use serde::Deserialize;
use tokio::sync::oneshot;

/// JSON batches larger than this are refused (batch_size 10,000 × ~1 KiB fits).
const SYNC_BODY_LIMIT: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub id: i64,
    /// Microseconds since the Unix epoch.
    pub at_us: i64,
    /// The request that carried it (numbered in arrival order).
    pub request: u64,
}

#[derive(Debug, Clone)]
pub struct Upload {
    /// Bytes of each part, in order: (name, bytes).
    pub parts: Vec<(String, u64)>,
    /// From the handler's start (headers in) to the last byte of the body.
    pub duration: Duration,
    pub complete: bool,
}

impl Upload {
    pub fn part(&self, name: &str) -> Option<u64> {
        self.parts.iter().find(|(n, _)| n == name).map(|(_, b)| *b)
    }
}

#[derive(Default)]
struct Shared {
    arrivals: Mutex<Vec<Arrival>>,
    /// When each JSON request was answered: (request, microseconds since the epoch).
    answered: Mutex<Vec<(u64, i64)>>,
    uploads: Mutex<Vec<Upload>>,
    requests: AtomicU64,
    rejected: AtomicU64,
    /// How long `/api/ingest/sync` takes to answer (a Frontend's work and network).
    delay: Duration,
}

pub struct Sink {
    pub url: String,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sink {
    /// `delay`: how long each `/api/ingest/sync` request takes to answer, after its
    /// arrival is recorded (0: at once).
    pub fn start(delay: Duration) -> anyhow::Result<Sink> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the sink")?;
        listener.set_nonblocking(true)?;
        let addr: SocketAddr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            delay,
            ..Shared::default()
        });
        let app = Router::new()
            .route(
                "/api/ingest/sync",
                post(sync).layer(DefaultBodyLimit::max(SYNC_BODY_LIMIT)),
            )
            .route(
                "/api/ingest/recording-file",
                post(recording_file).layer(DefaultBodyLimit::disable()),
            )
            .with_state(Arc::clone(&shared));
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("sink".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::new(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(anyhow::Error::new(e)));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let serve = axum::serve(listener, app).with_graceful_shutdown(async {
                        let _ = stop_rx.await;
                    });
                    if let Err(e) = serve.await {
                        eprintln!("sink: {e}");
                    }
                });
            })
            .context("spawning the sink thread")?;
        ready_rx.recv().context("the sink thread died")??;
        Ok(Sink {
            url: format!("http://{addr}"),
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Forget everything recorded so far.
    pub fn clear(&self) {
        lock(&self.shared.arrivals).clear();
        lock(&self.shared.answered).clear();
        lock(&self.shared.uploads).clear();
        self.shared.requests.store(0, Ordering::Relaxed);
        self.shared.rejected.store(0, Ordering::Relaxed);
    }

    pub fn arrivals(&self) -> Vec<Arrival> {
        lock(&self.shared.arrivals).clone()
    }

    /// When each JSON request was answered, by request number.
    pub fn answered(&self) -> HashMap<u64, i64> {
        lock(&self.shared.answered).iter().copied().collect()
    }

    pub fn arrival_count(&self) -> usize {
        lock(&self.shared.arrivals).len()
    }

    pub fn has_arrived(&self, id: i64) -> bool {
        lock(&self.shared.arrivals).iter().rev().any(|a| a.id == id)
    }

    pub fn uploads(&self) -> Vec<Upload> {
        lock(&self.shared.uploads).clone()
    }

    /// Requests answered, and those refused as malformed.
    pub fn requests(&self) -> (u64, u64) {
        (
            self.shared.requests.load(Ordering::Relaxed),
            self.shared.rejected.load(Ordering::Relaxed),
        )
    }

    /// Wait until `done()` holds, checking every millisecond, for at most `limit`.
    pub async fn wait_until(&self, limit: Duration, mut done: impl FnMut(&Sink) -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        done(self)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            // graceful shutdown waits for open connections; do not hang on one
            for _ in 0..200 {
                if thread.is_finished() {
                    let _ = thread.join();
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

#[derive(Deserialize)]
struct Batch {
    entries: Vec<Entry>,
}

/// Only the id is read; serde skips the rest of each entry.
#[derive(Deserialize)]
struct Entry {
    #[serde(rename = "outboxId")]
    outbox_id: i64,
}

async fn sync(State(shared): State<Arc<Shared>>, body: Bytes) -> StatusCode {
    let request = shared.requests.fetch_add(1, Ordering::Relaxed);
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(_) => {
            shared.rejected.fetch_add(1, Ordering::Relaxed);
            return StatusCode::BAD_REQUEST;
        }
    };
    let at_us = now_us();
    lock(&shared.arrivals).extend(batch.entries.iter().map(|e| Arrival {
        id: e.outbox_id,
        at_us,
        request,
    }));
    if !shared.delay.is_zero() {
        tokio::time::sleep(shared.delay).await;
    }
    // before the answer leaves: a row sent after it was read arrives later than this
    lock(&shared.answered).push((request, now_us()));
    StatusCode::OK
}

async fn recording_file(State(shared): State<Arc<Shared>>, mut form: Multipart) -> StatusCode {
    shared.requests.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let mut parts = Vec::new();
    let mut complete = true;
    // bounded: a part per iteration, and a form has a handful
    for _ in 0..64 {
        let mut field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) => {
                complete = false;
                break;
            }
        };
        let name = field.name().unwrap_or("").to_string();
        let mut bytes = 0u64;
        loop {
            match field.chunk().await {
                Ok(Some(chunk)) => bytes += chunk.len() as u64,
                Ok(None) => break,
                Err(_) => {
                    complete = false;
                    break;
                }
            }
        }
        parts.push((name, bytes));
        if !complete {
            break;
        }
    }
    let upload = Upload {
        parts,
        duration: started.elapsed(),
        complete,
    };
    lock(&shared.uploads).push(upload);
    if complete {
        StatusCode::OK
    } else {
        shared.rejected.fetch_add(1, Ordering::Relaxed);
        StatusCode::BAD_REQUEST
    }
}

/// Rows that reached the sink out of their ordering key's order: while an earlier
/// row of the key was still unanswered (in the same request, or in one still out),
/// or before it (the earlier row arrived later, or not at all). `keyed` is every
/// keyed row as (key, id), sorted; a row's first arrival counts. SPEC 3.4: rows of
/// one key are delivered one at a time, in id order.
pub fn out_of_order(
    arrivals: &[Arrival],
    answered: &HashMap<u64, i64>,
    keyed: &[(i64, i64)],
) -> usize {
    let mut first: HashMap<i64, Arrival> = HashMap::with_capacity(arrivals.len());
    for a in arrivals {
        first
            .entry(a.id)
            .and_modify(|f| {
                if a.at_us < f.at_us {
                    *f = *a;
                }
            })
            .or_insert(*a);
    }
    keyed
        .windows(2)
        .filter(|pair| pair[0].0 == pair[1].0)
        .filter(|pair| {
            let Some(later) = first.get(&pair[1].1) else {
                return false;
            };
            match first.get(&pair[0].1) {
                // the earlier row never arrived, the later one did
                None => true,
                Some(earlier) => match answered.get(&earlier.request) {
                    Some(done) => later.at_us <= *done,
                    // never answered (the relay gave up on it): judge by arrival
                    None => later.at_us <= earlier.at_us,
                },
            }
        })
        .count()
}

/// What the sink saw of a set of expected ids.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub expected: usize,
    pub distinct: usize,
    pub duplicates: usize,
    pub lost: usize,
    /// Ids that were never enqueued (should be 0).
    pub unexpected: usize,
    pub first_us: i64,
    pub last_us: i64,
}

/// Compare arrivals with the ids that were enqueued. `expected` must be sorted.
pub fn tally(arrivals: &[Arrival], expected: &[i64]) -> Tally {
    let mut ids: Vec<i64> = arrivals.iter().map(|a| a.id).collect();
    ids.sort_unstable();
    let received = ids.len();
    ids.dedup();
    let distinct = ids.len();
    let found = ids
        .iter()
        .filter(|id| expected.binary_search(id).is_ok())
        .count();
    Tally {
        expected: expected.len(),
        distinct,
        duplicates: received - distinct,
        lost: expected.len() - found,
        unexpected: distinct - found,
        first_us: arrivals.iter().map(|a| a.at_us).min().unwrap_or(0),
        last_us: arrivals.iter().map(|a| a.at_us).max().unwrap_or(0),
    }
}

impl Tally {
    pub fn problems(&self, what: &str) -> Vec<String> {
        let mut out = Vec::new();
        if self.lost > 0 {
            out.push(format!(
                "{what}: {} of {} rows never reached the sink",
                self.lost, self.expected
            ));
        }
        if self.duplicates > 0 {
            out.push(format!("{what}: {} duplicate deliveries", self.duplicates));
        }
        if self.unexpected > 0 {
            out.push(format!(
                "{what}: {} ids arrived that were never enqueued",
                self.unexpected
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{out_of_order, Arrival};

    fn at(id: i64, at_us: i64, request: u64) -> Arrival {
        Arrival { id, at_us, request }
    }

    #[test]
    fn a_row_counts_as_out_of_order_unless_it_came_after_its_predecessor_was_answered() {
        // key 7: ids 1, 2, 3; key 9: id 4
        let keyed = [(7, 1), (7, 2), (7, 3), (9, 4)];
        let answered: HashMap<u64, i64> = [(0, 150), (1, 250), (2, 350), (3, 120)].into();
        let in_order = [at(1, 100, 0), at(4, 110, 3), at(2, 200, 1), at(3, 300, 2)];
        assert_eq!(out_of_order(&in_order, &answered, &keyed), 0);

        let same_request = [at(1, 100, 0), at(2, 100, 0), at(3, 300, 2)];
        assert_eq!(out_of_order(&same_request, &answered, &keyed), 1);

        // sent while the request with its predecessor was still out
        let overlapping = [at(1, 100, 0), at(2, 140, 1), at(3, 300, 2)];
        assert_eq!(out_of_order(&overlapping, &answered, &keyed), 1);

        let reversed = [at(2, 100, 1), at(1, 200, 0), at(3, 300, 2)];
        assert_eq!(out_of_order(&reversed, &answered, &keyed), 1);

        let predecessor_never_came = [at(1, 100, 0), at(3, 300, 2)];
        assert_eq!(out_of_order(&predecessor_never_came, &answered, &keyed), 1);

        // a duplicate delivered later does not count against the next row
        let duplicate = [at(1, 100, 0), at(2, 200, 1), at(1, 260, 1), at(3, 300, 2)];
        assert_eq!(out_of_order(&duplicate, &answered, &keyed), 0);
    }
}
