//! A fake Frontend: the two ingest endpoints on 127.0.0.1, port 0, recording every
//! request, answering as the test says.
//!
//! It runs on a thread and runtime of its own, so it keeps serving whatever the test
//! thread is doing, and stops when the [`Sink`] is dropped.
//!
//! Each request is answered by the first queued [`Reply`] ([`Sink::fail_next`],
//! [`Sink::push_reply`]), else by the current [`Mode`] ([`Sink::set_mode`]).

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::Value;
use tokio::sync::oneshot;

/// How the sink answers requests that no queued reply covers.
#[derive(Clone, Default)]
pub enum Mode {
    /// 200 `{"ok":true}`.
    #[default]
    Accept,
    /// This status for every request, with a short body naming it.
    Always(u16),
    /// This reply for every request.
    Reply(Reply),
    /// 400 for a whole `/sync` request when any of its entries has a payload with
    /// `"poison": true`; 200 otherwise (uploads included).
    RejectPoison,
    /// Decided per request. Called with the sink's lock held: must not call the sink.
    Custom(Arc<dyn Fn(&Incoming<'_>) -> Reply + Send + Sync>),
}

impl Mode {
    pub fn custom(f: impl Fn(&Incoming<'_>) -> Reply + Send + Sync + 'static) -> Mode {
        Mode::Custom(Arc::new(f))
    }

    fn decide(&self, incoming: &Incoming<'_>) -> Reply {
        match self {
            Mode::Accept => Reply::ok(),
            Mode::Always(status) => Reply::status(*status),
            Mode::Reply(reply) => reply.clone(),
            Mode::RejectPoison => match incoming {
                Incoming::Sync(req)
                    if req.entries().iter().any(|e| e.payload["poison"] == true) =>
                {
                    Reply::status(400).body(r#"{"error":"poison entry in batch"}"#)
                }
                _ => Reply::ok(),
            },
            Mode::Custom(f) => f(incoming),
        }
    }
}

/// One answer: status, extra headers, body, and how long to wait before sending it.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub delay: Duration,
    /// After `body`, 64 KiB of `x` every 10 ms, for a minute (a Frontend that never
    /// stops answering).
    pub endless: bool,
    /// After `body`, the connection is cut: the answer never ends properly.
    pub cut: bool,
    /// After `body`, nothing for this long before the answer ends.
    pub stall: Duration,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::status(200).body(r#"{"ok":true}"#)
    }

    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: format!(r#"{{"error":"sink says {status}"}}"#).into_bytes(),
            delay: Duration::ZERO,
            endless: false,
            cut: false,
            stall: Duration::ZERO,
        }
    }

    /// A body that stops after `body`, the connection open, for `stall`.
    pub fn stall(mut self, stall: Duration) -> Reply {
        self.stall = stall;
        self
    }

    /// A body cut off after `body`: see [`Reply::cut`].
    pub fn cut(mut self) -> Reply {
        self.cut = true;
        self
    }

    /// A body that does not end (for a minute): see [`Reply::endless`].
    pub fn endless(mut self) -> Reply {
        self.endless = true;
        self
    }

    /// Any bytes, not only UTF-8 (what a broken Frontend might send).
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Answer only after `delay` (to provoke client timeouts).
    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// The request a [`Mode::Custom`] decides on.
pub enum Incoming<'a> {
    Sync(&'a SyncRequest),
    File(&'a Upload),
}

/// Request headers, names lowercased, in arrival order.
#[derive(Clone, Debug, Default)]
pub struct Headers(pub Vec<(String, String)>);

impl Headers {
    fn from_map(map: &HeaderMap) -> Headers {
        Headers(
            map.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        )
    }

    /// The first value of `name` (case-insensitive).
    pub fn get(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One `POST /api/ingest/sync`.
#[derive(Clone, Debug)]
pub struct SyncRequest {
    /// Arrival order across both endpoints, from 1.
    pub seq: u64,
    pub headers: Headers,
    pub raw_body: Vec<u8>,
    /// The body, when it is JSON.
    pub body: Option<Value>,
    /// The status the sink chose.
    pub status: u16,
    /// When the body had been read, and when the reply went out (`None` while its
    /// delay runs, or if the client hung up first).
    pub received_at: Instant,
    pub answered_at: Option<Instant>,
}

impl SyncRequest {
    /// The entries of the body, leniently parsed (missing fields become defaults;
    /// [`Entry::raw`] keeps the exact object).
    pub fn entries(&self) -> Vec<Entry> {
        let Some(list) = self.body.as_ref().and_then(|b| b["entries"].as_array()) else {
            return Vec::new();
        };
        list.iter()
            .enumerate()
            .map(|(index, raw)| Entry {
                seq: self.seq,
                index,
                outbox_id: raw["outboxId"].as_i64().unwrap_or(-1),
                entity_type: raw["entityType"].as_str().unwrap_or_default().to_string(),
                entity_id: raw["entityId"].as_str().unwrap_or_default().to_string(),
                payload: raw["payload"].clone(),
                created_at: raw["createdAt"].as_str().unwrap_or_default().to_string(),
                raw: raw.clone(),
            })
            .collect()
    }

    /// Answered with a 2xx that reached the client.
    pub fn accepted(&self) -> bool {
        self.answered_at.is_some() && (200..300).contains(&self.status)
    }
}

/// One entry of a `/sync` body.
#[derive(Clone, Debug)]
pub struct Entry {
    /// `seq` of the request that carried it, and its position in that request.
    pub seq: u64,
    pub index: usize,
    pub outbox_id: i64,
    pub entity_type: String,
    pub entity_id: String,
    pub payload: Value,
    pub created_at: String,
    pub raw: Value,
}

/// One `POST /api/ingest/recording-file`.
#[derive(Clone, Debug)]
pub struct Upload {
    pub seq: u64,
    pub headers: Headers,
    /// The multipart body as it arrived.
    pub raw_body: Vec<u8>,
    pub parts: Vec<Part>,
    /// Why the multipart body could not be read, if it could not (answered 400).
    pub error: Option<String>,
    pub status: u16,
    pub received_at: Instant,
    pub answered_at: Option<Instant>,
}

impl Upload {
    pub fn part(&self, name: &str) -> Option<&Part> {
        self.parts.iter().find(|p| p.name == name)
    }

    /// A part's content as text.
    pub fn text(&self, name: &str) -> Option<String> {
        self.part(name)
            .map(|p| String::from_utf8_lossy(&p.bytes).into_owned())
    }

    pub fn accepted(&self) -> bool {
        self.answered_at.is_some() && (200..300).contains(&self.status)
    }
}

#[derive(Clone, Debug)]
pub struct Part {
    pub name: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub bytes: Vec<u8>,
}

/// A request to any other path (answered 404).
#[derive(Clone, Debug)]
pub struct Stray {
    pub seq: u64,
    pub method: String,
    pub path: String,
}

#[derive(Default)]
struct Inner {
    seq: u64,
    syncs: Vec<SyncRequest>,
    uploads: Vec<Upload>,
    strays: Vec<Stray>,
    queue: VecDeque<Reply>,
    mode: Mode,
    /// Wait this long before reading a file upload's body (the client's sends back up).
    file_stall: Duration,
    /// TLS handshakes that failed ([`Sink::start_tls`]).
    failed_handshakes: usize,
}

impl Inner {
    fn next_reply(&mut self, incoming: &Incoming<'_>) -> Reply {
        match self.queue.pop_front() {
            Some(reply) => reply,
            None => self.mode.decide(incoming),
        }
    }
}

#[derive(Default)]
struct Shared {
    inner: Mutex<Inner>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panicking test thread must not take the sink down with it.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The fake Frontend. Stops serving when dropped.
pub struct Sink {
    url: String,
    shared: Arc<Shared>,
    shutdown: Option<oneshot::Sender<()>>,
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sink").field("url", &self.url).finish()
    }
}

impl Sink {
    /// Listen on 127.0.0.1, port 0, answering 200 to everything until told otherwise.
    pub fn start() -> Sink {
        Sink::serve(None)
    }

    /// As [`Sink::start`], over TLS with the certificate `server.pem` of
    /// `tests/fixtures/tls` (for 127.0.0.1 and localhost, issued by the test CA in
    /// `ca.pem`, which no client trusts unless told to). A failed handshake is not a
    /// request: it is counted in [`Sink::failed_handshakes`].
    pub fn start_tls() -> Sink {
        Sink::serve(Some(tls::acceptor("server.pem")))
    }

    /// As [`Sink::start_tls`], with `other-name.pem`: issued by the same CA, for
    /// `frontend.example` only.
    pub fn start_tls_for_another_name() -> Sink {
        Sink::serve(Some(tls::acceptor("other-name.pem")))
    }

    fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Sink {
        let shared = Arc::new(Shared::default());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind sink");
        listener
            .set_nonblocking(true)
            .expect("nonblocking sink socket");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{}", listener.local_addr().expect("sink addr"));
        let app = Router::new()
            .route("/api/ingest/sync", post(sync))
            .route("/api/ingest/recording-file", post(recording_file))
            .fallback(stray)
            .layer(DefaultBodyLimit::max(512 * 1024 * 1024))
            .with_state(Arc::clone(&shared));
        let (tx, rx) = oneshot::channel::<()>();
        let handshakes = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("fake-frontend".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("sink runtime");
                rt.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("sink listener");
                    let served = async move {
                        match tls {
                            None => axum::serve(listener, app).await,
                            Some(acceptor) => {
                                let listener = tls::Listener {
                                    tcp: listener,
                                    acceptor,
                                    shared: handshakes,
                                };
                                axum::serve(listener, app).await
                            }
                        }
                    };
                    tokio::select! {
                        result = served => {
                            if let Err(e) = result {
                                eprintln!("fake frontend stopped: {e}");
                            }
                        }
                        _ = rx => {}
                    }
                });
                // Dropping the runtime here cancels requests still in flight.
            })
            .expect("spawn sink thread");
        Sink {
            url,
            shared,
            shutdown: Some(tx),
        }
    }

    /// TLS handshakes that failed (a client that refused the certificate).
    pub fn failed_handshakes(&self) -> usize {
        self.shared.lock().failed_handshakes
    }

    /// `http://127.0.0.1:<port>`: the relay's `ingest.base_url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// How requests are answered once the queue of replies is empty.
    pub fn set_mode(&self, mode: Mode) {
        self.shared.lock().mode = mode;
    }

    /// Hold every file upload's body unread for `stall` before reading it, so the
    /// client's sending backs up (zero: read at once).
    pub fn stall_file_bodies(&self, stall: Duration) {
        self.shared.lock().file_stall = stall;
    }

    /// Answer the next `n` requests (either endpoint) with `status`.
    pub fn fail_next(&self, n: usize, status: u16) {
        let mut inner = self.shared.lock();
        inner
            .queue
            .extend(std::iter::repeat_n(Reply::status(status), n));
    }

    /// Answer the next unanswered request with `reply`.
    pub fn push_reply(&self, reply: Reply) {
        self.shared.lock().queue.push_back(reply);
    }

    /// Every `/sync` request, in arrival order.
    pub fn sync_requests(&self) -> Vec<SyncRequest> {
        self.shared.lock().syncs.clone()
    }

    /// The `Authorization` header of every `/sync` request, in arrival order.
    pub fn sync_authorizations(&self) -> Vec<Option<String>> {
        self.sync_requests()
            .iter()
            .map(|r| r.headers.get("authorization").map(str::to_string))
            .collect()
    }

    /// Every upload, in arrival order, whatever the answer.
    pub fn all_uploads(&self) -> Vec<Upload> {
        self.shared.lock().uploads.clone()
    }

    /// Uploads answered with a 2xx.
    pub fn uploads(&self) -> Vec<Upload> {
        self.shared
            .lock()
            .uploads
            .iter()
            .filter(|u| u.accepted())
            .cloned()
            .collect()
    }

    /// Requests to paths that are not ingest endpoints.
    pub fn strays(&self) -> Vec<Stray> {
        self.shared.lock().strays.clone()
    }

    /// The outbox ids of each `/sync` request answered with a 2xx, request by
    /// request, in arrival order (which rows went out together, and in what order).
    pub fn accepted_batches(&self) -> Vec<Vec<i64>> {
        self.sync_requests()
            .iter()
            .filter(|r| r.accepted())
            .map(|r| r.entries().iter().map(|e| e.outbox_id).collect())
            .collect()
    }

    /// Entries of requests answered with a 2xx (= delivered), in arrival order.
    pub fn entries(&self) -> Vec<Entry> {
        let inner = self.shared.lock();
        inner
            .syncs
            .iter()
            .filter(|r| r.accepted())
            .flat_map(|r| r.entries())
            .collect()
    }

    /// Entries of every request, rejected ones included.
    pub fn all_entries(&self) -> Vec<Entry> {
        let inner = self.shared.lock();
        inner.syncs.iter().flat_map(|r| r.entries()).collect()
    }

    /// Requests received on any path.
    pub fn request_count(&self) -> usize {
        let inner = self.shared.lock();
        inner.syncs.len() + inner.uploads.len() + inner.strays.len()
    }

    /// Forget every recorded request (the mode and queued replies stay).
    pub fn clear(&self) {
        let mut inner = self.shared.lock();
        inner.syncs.clear();
        inner.uploads.clear();
        inner.strays.clear();
    }

    /// Wait until at least `n` entries were delivered (2xx).
    pub async fn wait_for_entries(&self, n: usize, timeout: Duration) {
        super::wait_until(timeout, &format!("{n} delivered entries"), || async {
            self.entries().len() >= n
        })
        .await
    }

    /// Wait until at least `n` uploads were delivered (2xx).
    pub async fn wait_for_uploads(&self, n: usize, timeout: Duration) {
        super::wait_until(timeout, &format!("{n} delivered uploads"), || async {
            self.uploads().len() >= n
        })
        .await
    }

    /// Wait until at least `n` requests arrived, whatever their answer.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) {
        super::wait_until(timeout, &format!("{n} requests"), || async {
            self.request_count() >= n
        })
        .await
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

enum Kind {
    Sync,
    File,
}

async fn sync(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    let (index, reply) = {
        let mut inner = shared.lock();
        inner.seq += 1;
        let mut request = SyncRequest {
            seq: inner.seq,
            headers: Headers::from_map(&headers),
            body: serde_json::from_slice(&body).ok(),
            raw_body: body.to_vec(),
            status: 0,
            received_at: Instant::now(),
            answered_at: None,
        };
        let reply = inner.next_reply(&Incoming::Sync(&request));
        request.status = reply.status;
        inner.syncs.push(request);
        (inner.syncs.len() - 1, reply)
    };
    respond(&shared, Kind::Sync, index, reply).await
}

async fn recording_file(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let headers = Headers::from_map(request.headers());
    let stall = shared.lock().file_stall;
    if !stall.is_zero() {
        tokio::time::sleep(stall).await;
    }
    // the whole body first (test files are small), kept for signature checks
    let (head, body) = request.into_parts();
    let (raw_body, parts, error) = match axum::body::to_bytes(body, 64 << 20).await {
        Ok(raw) => {
            let rebuilt = Request::from_parts(head, axum::body::Body::from(raw.clone()));
            let (parts, error) = read_parts(rebuilt).await;
            (raw.to_vec(), parts, error)
        }
        Err(e) => (
            Vec::new(),
            Vec::new(),
            Some(format!("reading the body: {e}")),
        ),
    };
    let (index, reply) = {
        let mut inner = shared.lock();
        inner.seq += 1;
        let mut upload = Upload {
            seq: inner.seq,
            headers,
            raw_body,
            parts,
            error,
            status: 0,
            received_at: Instant::now(),
            answered_at: None,
        };
        let reply = match &upload.error {
            Some(e) => Reply::status(400).body(format!("bad multipart body: {e}")),
            None => inner.next_reply(&Incoming::File(&upload)),
        };
        upload.status = reply.status;
        inner.uploads.push(upload);
        (inner.uploads.len() - 1, reply)
    };
    respond(&shared, Kind::File, index, reply).await
}

async fn read_parts(request: Request) -> (Vec<Part>, Option<String>) {
    let mut parts = Vec::new();
    let mut multipart = match Multipart::from_request(request, &()).await {
        Ok(m) => m,
        Err(e) => return (parts, Some(e.body_text())),
    };
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) => {
                let name = field.name().unwrap_or_default().to_string();
                let file_name = field.file_name().map(str::to_string);
                let content_type = field.content_type().map(str::to_string);
                match field.bytes().await {
                    Ok(bytes) => parts.push(Part {
                        name,
                        file_name,
                        content_type,
                        bytes: bytes.to_vec(),
                    }),
                    Err(e) => return (parts, Some(e.body_text())),
                }
            }
            Ok(None) => return (parts, None),
            Err(e) => return (parts, Some(e.body_text())),
        }
    }
}

async fn stray(State(shared): State<Arc<Shared>>, request: Request) -> Response {
    let mut inner = shared.lock();
    inner.seq += 1;
    let stray = Stray {
        seq: inner.seq,
        method: request.method().to_string(),
        path: request.uri().path().to_string(),
    };
    inner.strays.push(stray);
    StatusCode::NOT_FOUND.into_response()
}

async fn respond(shared: &Shared, kind: Kind, index: usize, reply: Reply) -> Response {
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    {
        let mut inner = shared.lock();
        let now = Some(Instant::now());
        match kind {
            Kind::Sync => inner.syncs[index].answered_at = now,
            Kind::File => inner.uploads[index].answered_at = now,
        }
    }
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    for (name, value) in &reply.headers {
        let name = HeaderName::from_bytes(name.as_bytes()).expect("valid header name");
        headers.insert(
            name,
            HeaderValue::from_str(value).expect("valid header value"),
        );
    }
    let status = StatusCode::from_u16(reply.status).expect("valid status");
    if reply.cut {
        let body = futures_util::stream::iter([
            Ok::<_, std::io::Error>(Bytes::from(reply.body)),
            Err(std::io::Error::other("the sink cuts its answer")),
        ]);
        return (status, headers, axum::body::Body::from_stream(body)).into_response();
    }
    if !reply.stall.is_zero() {
        let stall = reply.stall;
        let head = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(reply.body))]);
        let tail = futures_util::stream::once(async move {
            tokio::time::sleep(stall).await;
            Ok::<_, std::io::Error>(Bytes::new())
        });
        let body = axum::body::Body::from_stream(futures_util::StreamExt::chain(head, tail));
        return (status, headers, body).into_response();
    }
    if reply.endless {
        let head = futures_util::stream::iter([Ok::<_, std::io::Error>(Bytes::from(reply.body))]);
        let tail = futures_util::stream::unfold(0u32, |sent| async move {
            (sent < 6000).then_some(())?;
            tokio::time::sleep(Duration::from_millis(10)).await;
            Some((Ok(Bytes::from(vec![b'x'; 64 * 1024])), sent + 1))
        });
        let body = axum::body::Body::from_stream(futures_util::StreamExt::chain(head, tail));
        return (status, headers, body).into_response();
    }
    (status, headers, reply.body).into_response()
}

/// The TLS side of [`Sink::start_tls`].
mod tls {
    use std::net::SocketAddr;
    use std::sync::Arc;
    use std::time::Duration;

    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::ServerConfig;
    use tokio_rustls::server::TlsStream;
    use tokio_rustls::TlsAcceptor;

    use super::Shared;

    /// `tests/fixtures/tls`: the test CA, and a server certificate it issued.
    pub const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls");

    /// A TLS server with `certificate` (a file of [`DIR`]) and `server.key`.
    pub fn acceptor(certificate: &str) -> TlsAcceptor {
        let chain = CertificateDer::pem_file_iter(format!("{DIR}/{certificate}"))
            .expect("read the certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("parse the certificate");
        let key =
            PrivateKeyDer::from_pem_file(format!("{DIR}/server.key")).expect("read server.key");
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server certificate");
        TlsAcceptor::from(Arc::new(config))
    }

    /// Accepts TCP connections and completes their handshakes one at a time (a test
    /// sink's load), counting the ones that fail.
    pub struct Listener {
        pub tcp: TcpListener,
        pub acceptor: TlsAcceptor,
        pub shared: Arc<Shared>,
    }

    impl axum::serve::Listener for Listener {
        type Io = TlsStream<TcpStream>;
        type Addr = SocketAddr;

        async fn accept(&mut self) -> (Self::Io, Self::Addr) {
            loop {
                let Ok((tcp, addr)) = self.tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let handshake = self.acceptor.accept(tcp);
                match tokio::time::timeout(Duration::from_secs(5), handshake).await {
                    Ok(Ok(stream)) => return (stream, addr),
                    _ => self.shared.lock().failed_handshakes += 1,
                }
            }
        }

        fn local_addr(&self) -> std::io::Result<Self::Addr> {
            self.tcp.local_addr()
        }
    }
}
