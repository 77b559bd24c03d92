//! HTTP delivery to the Frontend's ingest API (SPEC §2). The only module that knows
//! reqwest: it builds the requests, and turns every response or transport error into
//! `Ok(())` or one classified `Failure`.

use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use hmac::{Hmac, Mac};
use reqwest::{Client, Response, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::IngestSettings;
use crate::files::{audio_mime, RecordingsRoot, META_LIMIT};
use crate::metrics::Metrics;
use crate::retry::parse_retry_after;
use crate::store::ClaimedRow;
use crate::taxonomy::{error_chain, Failure, RESPONSE_BODY_LIMIT};

#[derive(Clone)]
pub struct Dispatcher {
    client: Client,
    sync_url: Url,
    file_url: Url,
    auth_token: Option<SecretString>,
    signing_key: Option<Vec<u8>>,
    timeout: Duration,
    upload_timeout: Option<Duration>,
    root: RecordingsRoot,
    metrics: Metrics,
}

/// What a `recording_file` payload asks for (SPEC §2.2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileJob {
    pub call_log_id: String,
    pub recording_id: String,
    pub file_path: String,
    pub meta_path: Option<String>,
}

impl FileJob {
    /// Read the payload's fields, or say which one is missing or mistyped.
    pub fn from_row(row: &ClaimedRow) -> Result<FileJob, Failure> {
        #[derive(serde::Deserialize)]
        struct Fields {
            #[serde(rename = "callLogId")]
            call_log_id: Option<serde_json::Value>,
            #[serde(rename = "recordingId")]
            recording_id: Option<serde_json::Value>,
            #[serde(rename = "filePath")]
            file_path: Option<serde_json::Value>,
            #[serde(rename = "metaPath")]
            meta_path: Option<serde_json::Value>,
        }
        let fields: Fields = serde_json::from_str(row.payload.get())
            .map_err(|_| Failure::payload_invalid("recording_file payload is not a JSON object"))?;
        let text = |name: &str,
                    v: Option<serde_json::Value>,
                    required: bool|
         -> Result<Option<String>, Failure> {
            match v {
                None | Some(serde_json::Value::Null) if !required => Ok(None),
                None | Some(serde_json::Value::Null) => Err(Failure::payload_invalid(format!(
                    "recording_file payload lacks `{name}`"
                ))),
                Some(serde_json::Value::String(s)) if !s.is_empty() => Ok(Some(s)),
                Some(_) => Err(Failure::payload_invalid(format!(
                    "recording_file payload field `{name}` must be a non-empty string"
                ))),
            }
        };
        Ok(FileJob {
            call_log_id: text("callLogId", fields.call_log_id, true)?.unwrap_or_default(),
            recording_id: text("recordingId", fields.recording_id, false)?
                .unwrap_or_else(|| row.entity_id.to_string()),
            file_path: text("filePath", fields.file_path, true)?.unwrap_or_default(),
            meta_path: text("metaPath", fields.meta_path, false)?,
        })
    }

    /// The meta file to send: the explicit one, or `meta.json` beside the audio.
    fn meta_path(&self) -> (String, bool) {
        match &self.meta_path {
            Some(p) => (p.clone(), true),
            None => {
                let beside = match self.file_path.rsplit_once('/') {
                    Some((dir, _)) => format!("{dir}/meta.json"),
                    None => "meta.json".to_string(),
                };
                (beside, false)
            }
        }
    }
}

#[derive(Serialize)]
struct SyncBody<'a> {
    entries: Vec<SyncEntry<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct SyncEntry<'a> {
    outbox_id: i64,
    entity_type: &'a str,
    entity_id: &'a Uuid,
    payload: &'a RawValue,
    #[serde(serialize_with = "rfc3339")]
    created_at: &'a chrono::DateTime<chrono::Utc>,
}

/// RFC 3339 in UTC with `Z` and as many fraction digits as needed (0, 3, 6 or 9), the
/// same text as `to_rfc3339_opts(SecondsFormat::AutoSi, true)`, written straight into
/// the request body instead of through a `String` per row.
///
/// Digits are written by hand into a stack buffer: chrono's `format` re-parses its
/// format string for every call (3.5 % of the relay's CPU in a drain profile). Years
/// outside 0000–9999 and leap seconds take chrono's path.
fn rfc3339<S: serde::Serializer>(
    at: &&chrono::DateTime<chrono::Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    use chrono::{Datelike, Timelike};
    let (year, nanos) = (at.year(), at.nanosecond());
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return serializer.collect_str(&at.format("%Y-%m-%dT%H:%M:%S%.fZ"));
    }
    fn put(buf: &mut [u8], at: usize, value: u32, digits: usize) {
        let mut v = value;
        for i in (0..digits).rev() {
            buf[at + i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    }
    let mut buf = *b"0000-00-00T00:00:00.000000000Z";
    put(&mut buf, 0, year as u32, 4);
    put(&mut buf, 5, at.month(), 2);
    put(&mut buf, 8, at.day(), 2);
    put(&mut buf, 11, at.hour(), 2);
    put(&mut buf, 14, at.minute(), 2);
    put(&mut buf, 17, at.second(), 2);
    let len = if nanos == 0 {
        19
    } else if nanos % 1_000_000 == 0 {
        put(&mut buf, 20, nanos / 1_000_000, 3);
        23
    } else if nanos % 1_000 == 0 {
        put(&mut buf, 20, nanos / 1_000, 6);
        26
    } else {
        put(&mut buf, 20, nanos, 9);
        29
    };
    buf[len] = b'Z';
    let text = std::str::from_utf8(&buf[..=len]).map_err(serde::ser::Error::custom)?;
    serializer.serialize_str(text)
}

impl Dispatcher {
    pub fn new(
        settings: &IngestSettings,
        root: RecordingsRoot,
        metrics: Metrics,
    ) -> anyhow::Result<Dispatcher> {
        let base = Url::parse(&settings.base_url).context("invalid value for ingest.base_url")?;
        let join = |path: &str| -> anyhow::Result<Url> {
            let mut url = base.clone();
            let prefix = url.path().trim_end_matches('/').to_string();
            url.set_path(&format!("{prefix}{path}"));
            Ok(url)
        };
        let client = Client::builder()
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(64)
            .tcp_nodelay(true)
            .user_agent(concat!("serversync/", env!("CARGO_PKG_VERSION")))
            // a redirect is an answer that did not accept the rows: followed, a 301 or
            // 302 becomes a GET without the body whose 200 would mark them sent
            .redirect(reqwest::redirect::Policy::none())
            .danger_accept_invalid_certs(settings.danger_accept_invalid_certs)
            .build()
            .context("building the HTTP client")?;
        let signing_key = settings
            .signing_secret
            .as_ref()
            .map(|s| signing_key(s.expose_secret()));
        Ok(Dispatcher {
            client,
            sync_url: join("/api/ingest/sync")?,
            file_url: join("/api/ingest/recording-file")?,
            auth_token: settings.auth_token.clone(),
            signing_key,
            timeout: settings.timeout,
            upload_timeout: settings.upload_timeout,
            root,
            metrics,
        })
    }

    /// How long one upload of a `len`-byte file may take, answer included:
    /// `ingest.upload_timeout` when set, else `ingest.timeout` plus the transfer at
    /// [`UPLOAD_FLOOR_RATE`].
    fn upload_deadline(&self, len: u64) -> Duration {
        self.upload_timeout.unwrap_or_else(|| {
            self.timeout + Duration::from_secs_f64(len as f64 / UPLOAD_FLOOR_RATE as f64)
        })
    }

    /// POST one batch of JSON entities (in id order) to `/api/ingest/sync`.
    pub async fn send_json(&self, rows: &[&ClaimedRow]) -> Result<(), Failure> {
        let body = SyncBody {
            entries: rows
                .iter()
                .map(|r| SyncEntry {
                    outbox_id: r.id,
                    entity_type: &r.entity_type,
                    entity_id: &r.entity_id,
                    payload: &r.payload,
                    created_at: &r.created_at,
                })
                .collect(),
        };
        let bytes = serde_json::to_vec(&body)
            .map_err(|e| Failure::payload_invalid(format!("cannot serialize the batch: {e}")))?;
        let key = batch_key(rows.iter().map(|r| r.id));
        let mut request = self
            .client
            .post(self.sync_url.clone())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", &key);
        if let Some(signing_key) = &self.signing_key {
            for (name, value) in sign(signing_key, &key, chrono::Utc::now().timestamp(), &bytes) {
                request = request.header(name, value);
            }
        }
        request = self.authorize(request);
        self.execute(request.body(bytes), "sync").await
    }

    /// Stream one recording file (and its meta file) to `/api/ingest/recording-file`.
    /// The file is reopened on every attempt.
    pub async fn send_file(&self, row: &ClaimedRow, job: &FileJob) -> Result<(), Failure> {
        let audio = self.root.open(&job.file_path)?;
        let (meta_path, explicit) = job.meta_path();
        let meta = if explicit || self.root.exists(&meta_path) {
            Some(self.read_meta(&meta_path).await?)
        } else {
            None
        };
        let form = UploadForm::new(job, &audio.name, meta);
        let idempotency_key = format!("recording_file:{}", row.id);
        let mut file = audio.file;
        let mut request = self
            .client
            .post(self.file_url.clone())
            .timeout(self.upload_deadline(audio.len))
            .header(reqwest::header::CONTENT_TYPE, form.content_type())
            .header(reqwest::header::CONTENT_LENGTH, form.len(audio.len))
            .header("Idempotency-Key", &idempotency_key);
        if let Some(key) = &self.signing_key {
            // the signature covers the exact body, file included: one pass over the
            // file to sign it, a second to send it
            let timestamp = chrono::Utc::now().timestamp();
            let (key, head, tail, len, id) = (
                key.clone(),
                form.head.clone(),
                form.tail.clone(),
                audio.len,
                idempotency_key.clone(),
            );
            let path = job.file_path.clone();
            let signed = tokio::task::spawn_blocking(move || {
                let headers = sign_file(&key, &id, timestamp, &head, &mut file, len, &tail);
                (file, headers)
            })
            .await
            .map_err(|e| Failure::file_unreadable(format!("{path}: signing it failed: {e}")))?;
            file = signed.0;
            let headers = signed.1.map_err(|e| {
                Failure::file_unreadable(format!(
                    "{}: reading it to sign it failed: {e}",
                    job.file_path
                ))
            })?;
            for (name, value) in headers {
                request = request.header(name, value);
            }
        }
        // a read error mid-upload reaches reqwest as a broken body, which it reports
        // like a transport error; the reader also leaves it here so the failure is
        // classified as the file's (file_unreadable), not the sink's (connect)
        let read_error = ReadError::default();
        let chunks = file_chunks(file, audio.len, read_error.clone());
        let around = |bytes: bytes::Bytes| {
            futures_util::stream::once(std::future::ready(Ok::<_, std::io::Error>(bytes)))
        };
        let body = futures_util::StreamExt::chain(
            futures_util::StreamExt::chain(around(form.head), chunks),
            around(form.tail),
        );
        let request = request.body(reqwest::Body::wrap_stream(body));
        let result = self
            .execute(self.authorize(request), "recording_file")
            .await;
        match (result, read_error.take()) {
            (Err(_), Some(cause)) => Err(Failure::file_unreadable(format!(
                "{}: reading it during the upload failed: {cause}",
                job.file_path
            ))),
            (result, _) => result,
        }
    }

    async fn read_meta(&self, path: &str) -> Result<(String, Vec<u8>), Failure> {
        let opened = self.root.open(path)?;
        if opened.len > META_LIMIT {
            return Err(Failure::file_unreadable(format!(
                "{path}: meta file larger than {META_LIMIT} bytes"
            )));
        }
        let name = opened.name.clone();
        let mut file = tokio::fs::File::from_std(opened.file);
        let mut bytes = Vec::with_capacity(opened.len as usize);
        tokio::io::AsyncReadExt::read_to_end(&mut file, &mut bytes)
            .await
            .map_err(|e| Failure::file_unreadable(format!("{path}: {e}")))?;
        Ok((name, bytes))
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.auth_token {
            Some(token) => request.bearer_auth(token.expose_secret()),
            None => request,
        }
    }

    async fn execute(
        &self,
        request: reqwest::RequestBuilder,
        endpoint: &str,
    ) -> Result<(), Failure> {
        let started = Instant::now();
        let result = request.send().await;
        let outcome = match result {
            Err(e) => Err(Failure::from_transport(&e.without_url())),
            Ok(response) if response.status().is_success() => {
                // drain the body so the connection goes back to the pool
                let _ = response.bytes().await;
                Ok(())
            }
            Ok(response) => Err(failure_from_response(response).await),
        };
        self.metrics
            .http_duration
            .with_label_values(&[endpoint])
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// Is anything listening at the base URL? (for `check`)
    pub async fn probe(&self) -> anyhow::Result<u16> {
        let mut url = self.sync_url.clone();
        url.set_path("/");
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| anyhow::anyhow!(error_chain(&e.without_url())))?;
        Ok(response.status().as_u16())
    }
}

async fn failure_from_response(mut response: Response) -> Failure {
    let status = response.status().as_u16();
    let location = if response.status().is_redirection() {
        redirect_target(&response)
    } else {
        None
    };
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
    let mut body = Vec::new();
    while body.len() < RESPONSE_BODY_LIMIT {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(RESPONSE_BODY_LIMIT);
    let text = if body.is_empty() {
        None
    } else {
        Some(String::from_utf8_lossy(&body).into_owned())
    };
    let mut failure = Failure::from_status(status, text, retry_after);
    if let Some(to) = location {
        failure.message = format!("{}; it pointed to {to}", failure.message);
    }
    failure
}

/// Where a redirect points, without its query or credentials (they may hold tokens).
fn redirect_target(response: &Response) -> Option<String> {
    let value = response
        .headers()
        .get(reqwest::header::LOCATION)?
        .to_str()
        .ok()?;
    let mut url = response.url().join(value).ok()?;
    url.set_query(None);
    url.set_fragment(None);
    let _ = url.set_username("");
    let _ = url.set_password(None);
    Some(url.to_string())
}

/// `Idempotency-Key` of a JSON batch: stable for the same set of outbox ids.
pub fn batch_key(ids: impl Iterator<Item = i64>) -> String {
    let mut hasher = Sha256::new();
    for id in ids {
        hasher.update(id.to_be_bytes());
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("sync:{hex}")
}

/// Standard Webhooks secrets look like `whsec_<base64>`; anything else is used as is.
fn signing_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// Standard Webhooks headers: HMAC-SHA256 over `id.timestamp.body`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> [(&'static str, String); 3] {
    let mut mac = signer(key, id, timestamp);
    mac.update(body);
    signature_headers(id, timestamp, mac)
}

/// An HMAC that has taken `id.timestamp.`; the body follows.
fn signer(key: &[u8], id: &str, timestamp: i64) -> Hmac<Sha256> {
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac
}

fn signature_headers(id: &str, timestamp: i64, mac: Hmac<Sha256>) -> [(&'static str, String); 3] {
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    [
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", timestamp.to_string()),
        ("webhook-signature", format!("v1,{signature}")),
    ]
}

/// The slowest transfer an upload without `ingest.upload_timeout` is allowed, in
/// bytes per second (1 MiB/s: a 1 GiB recording gets 17 minutes plus `ingest.timeout`).
const UPLOAD_FLOOR_RATE: u64 = 1024 * 1024;

/// Bytes read ahead of the socket per upload: `READ_AHEAD` chunks of `CHUNK`.
const CHUNK: usize = 512 * 1024;
const READ_AHEAD: usize = 4;

/// The `multipart/form-data` body of one upload (SPEC §2.2), written by hand around
/// the streamed audio file so its exact bytes are known before it is sent: its
/// length (`Content-Length`) and, when signing, the signature over all of it.
/// `head` is everything before the audio bytes, `tail` everything after them.
struct UploadForm {
    boundary: String,
    head: bytes::Bytes,
    tail: bytes::Bytes,
}

impl UploadForm {
    fn new(job: &FileJob, audio_name: &str, meta: Option<(String, Vec<u8>)>) -> UploadForm {
        let boundary = format!("serversync-{}", Uuid::new_v4().simple());
        let mut head = Vec::with_capacity(512);
        for (name, value) in [
            ("callLogId", job.call_log_id.as_str()),
            ("recordingId", job.recording_id.as_str()),
        ] {
            head.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                )
                .as_bytes(),
            );
        }
        head.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"audio\"; filename=\"{}\"\r\n\
                 Content-Type: {}\r\n\r\n",
                quote_file_name(audio_name),
                audio_mime(audio_name)
            )
            .as_bytes(),
        );
        let mut tail = Vec::with_capacity(256);
        tail.extend_from_slice(b"\r\n");
        if let Some((name, bytes)) = meta {
            tail.extend_from_slice(
                format!(
                    "--{boundary}\r\nContent-Disposition: form-data; name=\"meta\"; filename=\"{}\"\r\n\
                     Content-Type: application/json\r\n\r\n",
                    quote_file_name(&name)
                )
                .as_bytes(),
            );
            tail.extend_from_slice(&bytes);
            tail.extend_from_slice(b"\r\n");
        }
        tail.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
        UploadForm {
            boundary,
            head: head.into(),
            tail: tail.into(),
        }
    }

    fn content_type(&self) -> String {
        format!("multipart/form-data; boundary={}", self.boundary)
    }

    /// The whole body's length around a file of `file_len` bytes.
    fn len(&self, file_len: u64) -> u64 {
        self.head.len() as u64 + file_len + self.tail.len() as u64
    }
}

/// A file name inside a quoted `Content-Disposition` parameter, escaped as browsers
/// do (WHATWG): `"` → `%22`, CR → `%0D`, LF → `%0A`.
fn quote_file_name(name: &str) -> String {
    name.replace('"', "%22")
        .replace('\r', "%0D")
        .replace('\n', "%0A")
}

/// [`sign`] over a body of `head`, `len` bytes of `file` and `tail`, read in
/// `CHUNK`s; leaves the file where it was. Fails if the file is shorter than `len`.
fn sign_file(
    key: &[u8],
    id: &str,
    timestamp: i64,
    head: &[u8],
    file: &mut std::fs::File,
    len: u64,
    tail: &[u8],
) -> std::io::Result<[(&'static str, String); 3]> {
    use std::io::Seek;
    let start = file.stream_position()?;
    let mut mac = signer(key, id, timestamp);
    mac.update(head);
    let mut left = len;
    while left > 0 {
        let chunk = next_chunk(file, left)?;
        mac.update(&chunk);
        left -= chunk.len() as u64;
    }
    mac.update(tail);
    file.seek(std::io::SeekFrom::Start(start))?;
    Ok(signature_headers(id, timestamp, mac))
}

/// The next at most `CHUNK` of the `left` bytes still expected from `file`. A file
/// that ends before them is an error: it is shorter than when it was opened, and
/// the declared length can no longer be met.
fn next_chunk(file: &mut std::fs::File, left: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let want = left.min(CHUNK as u64);
    // read_to_end fills spare capacity without zeroing it first
    let mut buf = Vec::with_capacity(want as usize);
    file.take(want).read_to_end(&mut buf)?;
    if buf.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the file is {left} bytes shorter than when it was opened"),
        ));
    }
    Ok(buf)
}

/// Where the upload's reader thread leaves the first read error it met.
#[derive(Debug, Clone, Default)]
struct ReadError(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl ReadError {
    fn set(&self, e: &std::io::Error) {
        if let Ok(mut slot) = self.0.lock() {
            slot.get_or_insert_with(|| e.to_string());
        }
    }

    fn take(&self) -> Option<String> {
        self.0.lock().ok().and_then(|mut slot| slot.take())
    }
}

/// Stream a file as `CHUNK`-sized chunks read by one blocking thread, at most `READ_AHEAD`
/// chunks ahead of the socket: plain blocking reads straight into the buffers the
/// request sends (no per-64-KiB hop to the blocking pool, no second copy), and
/// memory bounded at a few MiB whatever the file's size. `len` bytes at most.
fn file_chunks(
    mut file: std::fs::File,
    len: u64,
    read_error: ReadError,
) -> impl futures_util::Stream<Item = std::io::Result<bytes::Bytes>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(READ_AHEAD);
    tokio::task::spawn_blocking(move || {
        let mut left = len;
        while left > 0 {
            // a file that shrank fails the request rather than sending it truncated
            let buf = match next_chunk(&mut file, left) {
                Ok(buf) => buf,
                Err(e) => {
                    read_error.set(&e);
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            };
            left -= buf.len() as u64;
            // the receiver is gone when the request ended early: stop reading
            if tx.blocking_send(Ok(bytes::Bytes::from(buf))).is_err() {
                return;
            }
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_at_is_written_as_rfc3339_with_the_digits_it_needs() {
        use chrono::TimeZone;
        let base = chrono::Utc
            .with_ymd_and_hms(2026, 2, 7, 10, 5, 30)
            .single()
            .expect("a valid time");
        let far = [
            chrono::Utc.with_ymd_and_hms(1, 1, 1, 0, 0, 0).single(),
            chrono::Utc
                .with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
                .single(),
            chrono::Utc.with_ymd_and_hms(12345, 6, 7, 8, 9, 10).single(),
        ];
        let times = [
            0,
            120_000_000,
            123_456_000,
            123_456_789,
            1_000,
            999_999_999,
            7,
        ]
        .map(|nanos| base + chrono::Duration::nanoseconds(nanos))
        .into_iter()
        .chain(far.into_iter().flatten());
        for at in times {
            let nanos = at.timestamp_subsec_nanos();
            let mut out = Vec::new();
            rfc3339(&&at, &mut serde_json::Serializer::new(&mut out)).expect("serializes");
            let expected = format!(
                "\"{}\"",
                at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
            );
            assert_eq!(String::from_utf8_lossy(&out), expected, "{nanos} ns");
        }
    }

    #[tokio::test]
    async fn file_chunks_stream_the_file_and_report_a_file_that_shrank() {
        use futures_util::StreamExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.wav");
        let bytes: Vec<u8> = (0..(CHUNK * 2 + 123)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).expect("write");

        let open = || std::fs::File::open(&path).expect("open");
        let whole = ReadError::default();
        let chunks: Vec<_> = file_chunks(open(), bytes.len() as u64, whole.clone())
            .collect()
            .await;
        let sent: Vec<u8> = chunks
            .into_iter()
            .flat_map(|c| c.expect("no read error").to_vec())
            .collect();
        assert!(
            sent == bytes,
            "{} bytes streamed of {}",
            sent.len(),
            bytes.len()
        );
        assert_eq!(whole.take(), None);

        // opened when it was 1,000 bytes longer: the stream ends in an error
        let shrank = ReadError::default();
        let items: Vec<_> = file_chunks(open(), bytes.len() as u64 + 1_000, shrank.clone())
            .collect()
            .await;
        assert!(items.last().is_some_and(|i| i.is_err()));
        let streamed: usize = items
            .iter()
            .filter_map(|i| i.as_ref().ok())
            .map(|b| b.len())
            .sum();
        assert_eq!(streamed, bytes.len());
        let cause = shrank
            .take()
            .expect("the read error is kept for classification");
        assert!(cause.contains("1000 bytes shorter"), "{cause}");
    }

    fn row(payload: &str) -> ClaimedRow {
        ClaimedRow {
            id: 7,
            entity_type: "recording_file".into(),
            entity_id: Uuid::nil(),
            payload: RawValue::from_string(payload.into()).unwrap(),
            created_at: chrono::Utc::now(),
            attempts: 0,
            ordering_key: None,
            defect: None,
        }
    }

    #[test]
    fn an_upload_form_frames_the_file_and_counts_every_byte() {
        let job = FileJob {
            call_log_id: "c1".into(),
            recording_id: "r1".into(),
            file_path: "c1/a.wav".into(),
            meta_path: None,
        };
        let form = UploadForm::new(
            &job,
            "we\"ird\r\nname.wav",
            Some(("meta.json".into(), b"{}".to_vec())),
        );
        let head = String::from_utf8(form.head.to_vec()).unwrap();
        let tail = String::from_utf8(form.tail.to_vec()).unwrap();
        let boundary = &form.boundary;
        assert!(head.starts_with(&format!("--{boundary}\r\n")));
        assert!(head.contains("name=\"callLogId\"\r\n\r\nc1\r\n"));
        assert!(head.contains("name=\"recordingId\"\r\n\r\nr1\r\n"));
        assert!(
            head.ends_with(
                "filename=\"we%22ird%0D%0Aname.wav\"\r\nContent-Type: audio/wav\r\n\r\n"
            ),
            "{head}"
        );
        assert!(tail.starts_with("\r\n--"));
        assert!(tail.contains(
            "name=\"meta\"; filename=\"meta.json\"\r\nContent-Type: application/json\r\n\r\n{}\r\n"
        ));
        assert!(tail.ends_with(&format!("--{boundary}--\r\n")));
        assert_eq!(form.len(10), (head.len() + 10 + tail.len()) as u64);
        assert_eq!(
            form.content_type(),
            format!("multipart/form-data; boundary={boundary}")
        );
    }

    #[test]
    fn file_payloads_are_checked() {
        let job =
            FileJob::from_row(&row(r#"{"callLogId":"c1","filePath":"c1/mixed.wav"}"#)).unwrap();
        assert_eq!(job.recording_id, Uuid::nil().to_string());
        assert_eq!(job.meta_path(), ("c1/meta.json".to_string(), false));
        for bad in [
            r#"{"callLogId":"c1"}"#,
            r#"{"filePath":"a.wav"}"#,
            r#"{"callLogId":"c1","filePath":5}"#,
            "[1]",
        ] {
            let f = FileJob::from_row(&row(bad)).unwrap_err();
            assert_eq!(
                f.error_type,
                crate::taxonomy::ErrorType::PayloadInvalid,
                "{bad}"
            );
        }
    }

    #[test]
    fn batch_key_is_stable_and_distinct() {
        assert_eq!(
            batch_key([1, 2, 3].into_iter()),
            batch_key([1, 2, 3].into_iter())
        );
        assert_ne!(
            batch_key([1, 2, 3].into_iter()),
            batch_key([1, 2].into_iter())
        );
    }

    #[test]
    fn signature_matches_the_standard_webhooks_example() {
        // test vector from the Standard Webhooks specification
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw");
        let body = br#"{"test": 2432232314}"#;
        let headers = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        assert_eq!(
            headers[2].1,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
    }
}
