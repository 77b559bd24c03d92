//! HTTP delivery to the Frontend's ingest API (SPEC §2). The only module that knows
//! reqwest: it builds the requests, and turns every response or transport error into
//! `Ok(())` or one classified `Failure`. The multipart body and the file streaming
//! behind it live in `upload`, the Standard Webhooks signature in `signing`; this file
//! keeps the requests themselves and how their answers are classified.

use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::{Client, Response, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::config::IngestSettings;
use crate::files::{RecordingsRoot, META_LIMIT, OPEN_LIMIT};
use crate::metrics::Metrics;
use crate::retry::parse_retry_after;
use crate::store::ClaimedRow;
use crate::taxonomy::{response_body_text, Failure, RESPONSE_BODY_LIMIT};

mod signing;
mod upload;

pub use signing::sign;
use signing::signing_key;
use upload::{file_chunks, sign_file, ReadError, UploadForm, UPLOAD_FLOOR_RATE};

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
        let payload = row.payload.get();
        let fields: Fields = serde_json::from_str(payload).map_err(|e| {
            if payload.trim_start().starts_with('{') {
                // a syntax error or a duplicate field: serde names the place or the
                // field, never a value
                Failure::payload_invalid(format!("recording_file payload cannot be read: {e}"))
            } else {
                Failure::payload_invalid("recording_file payload is not a JSON object")
            }
        })?;
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
        // a path ending in `/` can only name a directory: never a file to send
        let file = |name: &str, v: Option<serde_json::Value>, required: bool| {
            let path = text(name, v, required)?;
            match path {
                Some(p) if p.ends_with('/') => Err(Failure::payload_invalid(format!(
                    "recording_file payload field `{name}` ends with `/`: it names a \
                     directory, not a file"
                ))),
                other => Ok(other),
            }
        };
        Ok(FileJob {
            call_log_id: text("callLogId", fields.call_log_id, true)?.unwrap_or_default(),
            recording_id: text("recordingId", fields.recording_id, false)?
                .unwrap_or_else(|| row.entity_id.to_string()),
            file_path: file("filePath", fields.file_path, true)?.unwrap_or_default(),
            meta_path: file("metaPath", fields.meta_path, false)?,
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
        let mut client = Client::builder().tls_built_in_native_certs(settings.system_roots);
        for certificate in &settings.ca_certificates {
            client = client.add_root_certificate(certificate.clone());
        }
        // the whole request's deadline is `Dispatcher::execute`'s own, not the
        // client's (`answer_within`)
        let client = client
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
        self.execute(request.body(bytes), "sync", self.timeout)
            .await
    }

    /// Stream one recording file (and its meta file) to `/api/ingest/recording-file`.
    /// The file is reopened on every attempt.
    pub async fn send_file(&self, row: &ClaimedRow, job: &FileJob) -> Result<(), Failure> {
        let audio = self.root.open_within(&job.file_path, OPEN_LIMIT).await?;
        let (meta_path, explicit) = job.meta_path();
        let meta = if explicit || self.root.exists_within(&meta_path, OPEN_LIMIT).await? {
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
            // bounded like the upload itself: a read that hangs (a mount that stopped
            // answering) must not hold the worker, its leases renewed, for ever
            let limit = self.upload_deadline(len);
            let signing = tokio::task::spawn_blocking(move || {
                let headers = sign_file(&key, &id, timestamp, &head, &mut file, len, &tail);
                (file, headers)
            });
            let signed = tokio::time::timeout(limit, signing)
                .await
                .map_err(|_| {
                    Failure::file_unreadable(format!(
                        "{path}: reading it to sign it took longer than {limit:?}"
                    ))
                })?
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
            .execute(
                self.authorize(request),
                "recording_file",
                self.upload_deadline(audio.len),
            )
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
        let opened = self.root.open_within(path, OPEN_LIMIT).await?;
        if opened.len > META_LIMIT {
            return Err(Failure::file_unreadable(format!(
                "{path}: meta file larger than {META_LIMIT} bytes"
            )));
        }
        let file = tokio::fs::File::from_std(opened.file);
        // bounded by what is read, not by the size seen at the open: a file that
        // grows meanwhile is not read into memory past the limit
        let read = tokio::time::timeout(OPEN_LIMIT, read_at_most(file, META_LIMIT, opened.len));
        let Ok(read) = read.await else {
            return Err(Failure::file_unreadable(format!(
                "{path}: reading the meta file took longer than {OPEN_LIMIT:?}"
            )));
        };
        match read {
            Ok(Some(bytes)) => Ok((opened.name, bytes)),
            Ok(None) => Err(Failure::file_unreadable(format!(
                "{path}: meta file grew past {META_LIMIT} bytes while it was read"
            ))),
            Err(e) => Err(Failure::file_unreadable(format!("{path}: {e}"))),
        }
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
        deadline: Duration,
    ) -> Result<(), Failure> {
        let started = Instant::now();
        let body_by = tokio::time::Instant::now() + deadline;
        let outcome = answer_within(deadline, Self::exchange(request, body_by)).await;
        self.metrics
            .http_duration
            .with_label_values(&[endpoint])
            .observe(started.elapsed().as_secs_f64());
        outcome
    }

    /// Send `request` and read its answer to the end (for an error status, until
    /// `body_by`: `failure_from_response`).
    async fn exchange(
        request: reqwest::RequestBuilder,
        body_by: tokio::time::Instant,
    ) -> Result<(), Failure> {
        let result = request.send().await;
        match result {
            Err(e) => Err(Failure::from_transport(&e.without_url())),
            Ok(mut response) if response.status().is_success() => {
                // read a short body to its end, so the connection goes back to the
                // pool; past 64 KiB (no ingest API says that much) it is dropped, the
                // connection with it, instead of held in memory. A body cut off or
                // not finished within `ingest.timeout` is no complete response (SPEC
                // 4: `connect`, `timeout`): the rows go again, under the same
                // Idempotency-Key, rather than be taken as delivered on a status line
                // alone (a proxy may send one before its upstream is done)
                let mut read = 0usize;
                let mut cut = None;
                while read <= ACK_BODY_LIMIT {
                    match response.chunk().await {
                        Ok(Some(chunk)) => read += chunk.len(),
                        Ok(None) => break,
                        Err(e) => {
                            cut = Some(e);
                            break;
                        }
                    }
                }
                match cut {
                    None => Ok(()),
                    Some(e) => {
                        let mut f = Failure::from_transport(&e.without_url());
                        f.message = format!(
                            "sink answered HTTP {} but its response was cut off: {}",
                            response.status().as_u16(),
                            f.message
                        );
                        f.unsent = false;
                        Err(f)
                    }
                }
            }
            Ok(response) => Err(failure_from_response(response, body_by).await),
        }
    }
}

/// How long an answer is still waited for once its request's deadline has passed.
/// An answer can be in the socket, unread, when the deadline's timer fires: the
/// process was paused (a VM or cgroup freeze, SIGSTOP) or starved while the sink
/// answered, and on waking the timer may be seen before the answer. Taken as a
/// timeout, the rows of a batch the sink had accepted went again (seen in an audit:
/// every row of the batches out during a 3 s pause delivered twice).
const LATE_ANSWER_GRACE: Duration = Duration::from_millis(100);

/// `exchange` within `deadline` (`ingest.timeout`, or an upload's), plus
/// `LATE_ANSWER_GRACE` for an answer already there when the deadline passes. The
/// client has no timeout of its own: its timer would win that race.
async fn answer_within(
    deadline: Duration,
    exchange: impl std::future::Future<Output = Result<(), Failure>>,
) -> Result<(), Failure> {
    tokio::pin!(exchange);
    tokio::select! {
        biased;
        done = &mut exchange => return done,
        () = tokio::time::sleep(deadline) => {}
    }
    match tokio::time::timeout(LATE_ANSWER_GRACE, &mut exchange).await {
        Ok(done) => done,
        Err(_) => Err(Failure::timeout(format!(
            "operation timed out: no complete answer within {}",
            // in whole milliseconds: an upload's deadline is computed to the nanosecond
            humantime::format_duration(Duration::from_millis(
                u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX)
            ))
        ))),
    }
}

/// The most of a 2xx answer's body read (and thrown away) before the connection is
/// dropped instead.
const ACK_BODY_LIMIT: usize = 64 * 1024;

/// The failure an error status says, with the start of its body, read until
/// `body_by` (the request's deadline) at the latest: a body that stalls after the
/// status line does not turn the answer into a timeout. A 400 whose body never ended
/// used to be retried as `timeout` for ever instead of dead-lettered (the same 400
/// cut off mid-body was an `http_4xx`).
async fn failure_from_response(mut response: Response, body_by: tokio::time::Instant) -> Failure {
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
        match tokio::time::timeout_at(body_by, response.chunk()).await {
            Ok(Ok(Some(chunk))) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(RESPONSE_BODY_LIMIT);
    let text = (!body.is_empty()).then(|| response_body_text(&body));
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

/// All of `reader` if it holds at most `limit` bytes, else `None`, never holding
/// more than `limit + 1` bytes; `expected` sizes the buffer.
async fn read_at_most(
    reader: impl tokio::io::AsyncRead + Unpin,
    limit: u64,
    expected: u64,
) -> std::io::Result<Option<Vec<u8>>> {
    use tokio::io::AsyncReadExt;
    let mut bytes = Vec::with_capacity(expected.min(limit) as usize);
    reader.take(limit + 1).read_to_end(&mut bytes).await?;
    Ok((bytes.len() as u64 <= limit).then_some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_meta_read_stops_past_its_limit() {
        let exactly = [1u8; 100];
        let read = read_at_most(&exactly[..], 100, 10).await.unwrap();
        assert_eq!(read.as_deref(), Some(&exactly[..]));
        let more = [1u8; 101];
        assert_eq!(read_at_most(&more[..], 100, 10).await.unwrap(), None);
    }

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
            // a directory's path, never a file's
            r#"{"callLogId":"c1","filePath":"c1/mixed.wav/"}"#,
            r#"{"callLogId":"c1","filePath":"c1/mixed.wav","metaPath":"c1/"}"#,
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
}
