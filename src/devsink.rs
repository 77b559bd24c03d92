//! `serversync dev-sink`: a development stand-in for the Frontend's ingest API.
//!
//! It checks the request shapes of SPEC §2, stores what it accepts under a directory
//! (`entries.jsonl`, `files/<callLogId>/…`), and answers 400 with a reason when a
//! shape is wrong. It is a tool for trying a configuration and for the demo, never a
//! production endpoint: it has no authentication and keeps everything on local disk.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::extract::{DefaultBodyLimit, Multipart, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
struct Sink {
    dir: PathBuf,
    seen: Arc<Mutex<HashSet<i64>>>,
    journal: Arc<tokio::sync::Mutex<()>>,
}

type Reply = (StatusCode, Json<Value>);

fn reject(reason: impl Into<String>) -> Reply {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": reason.into() })),
    )
}

/// A running dev sink; dropping the handle does not stop it, `stop` does.
pub struct DevSinkHandle {
    pub addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl DevSinkHandle {
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Start on `listen` (port 0 picks one), storing under `dir`.
pub async fn start(listen: SocketAddr, dir: PathBuf) -> anyhow::Result<DevSinkHandle> {
    tokio::fs::create_dir_all(dir.join("files"))
        .await
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let sink = Sink {
        dir,
        seen: Arc::default(),
        journal: Arc::default(),
    };
    let app = Router::new()
        .route("/api/ingest/sync", post(sync))
        .route(
            "/api/ingest/recording-file",
            post(recording_file).layer(DefaultBodyLimit::disable()),
        )
        .with_state(sink);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let stop = CancellationToken::new();
    let shutdown = stop.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
        {
            tracing::error!(error = %e, "dev sink failed");
        }
    });
    Ok(DevSinkHandle { addr, stop, task })
}

pub async fn serve_until_signal(listen: SocketAddr, dir: PathBuf) -> anyhow::Result<()> {
    let handle = start(listen, dir.clone()).await?;
    say_err!(
        "dev-sink: DEVELOPMENT ONLY stand-in for the Frontend ingest API on http://{} (storing under {}); Ctrl-C stops",
        handle.addr,
        dir.display()
    );
    crate::app::shutdown_signal().cancelled().await;
    handle.stop().await;
    Ok(())
}

async fn sync(State(sink): State<Sink>, headers: HeaderMap, body: axum::body::Bytes) -> Reply {
    if headers.get("idempotency-key").is_none() {
        return reject("missing Idempotency-Key header");
    }
    let content_type = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type.starts_with("application/json") {
        return reject("Content-Type must be application/json");
    }
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return reject("body is not JSON");
    };
    let Some(entries) = value.get("entries").and_then(Value::as_array) else {
        return reject("body must be {\"entries\": [...]}");
    };
    let mut last_id = i64::MIN;
    for (i, entry) in entries.iter().enumerate() {
        if let Err(reason) = check_entry(entry) {
            return reject(format!("entries[{i}]: {reason}"));
        }
        let id = entry["outboxId"].as_i64().unwrap_or_default();
        if id <= last_id {
            return reject(format!("entries[{i}]: entries must be in outboxId order"));
        }
        last_id = id;
    }
    let mut lines = String::new();
    {
        let Ok(mut seen) = sink.seen.lock() else {
            return reject("internal error");
        };
        for entry in entries {
            // at-least-once delivery: deduplicate on outboxId
            if seen.insert(entry["outboxId"].as_i64().unwrap_or_default()) {
                lines.push_str(&entry.to_string());
                lines.push('\n');
            }
        }
    }
    if let Err(e) = append(&sink, &lines).await {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": e.to_string() })),
        );
    }
    (StatusCode::OK, Json(json!({ "accepted": entries.len() })))
}

fn check_entry(entry: &Value) -> Result<(), String> {
    let keys = ["outboxId", "entityType", "entityId", "payload", "createdAt"];
    let obj = entry.as_object().ok_or("not an object")?;
    if let Some(extra) = obj.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(format!("unexpected key `{extra}`"));
    }
    entry["outboxId"]
        .as_i64()
        .ok_or("outboxId must be an integer")?;
    entry["entityType"]
        .as_str()
        .filter(|s| !s.is_empty())
        .ok_or("entityType must be a string")?;
    let id = entry["entityId"]
        .as_str()
        .ok_or("entityId must be a string")?;
    uuid::Uuid::parse_str(id).map_err(|_| "entityId must be a UUID")?;
    if !entry["payload"].is_object() {
        return Err("payload must be an object".into());
    }
    let created = entry["createdAt"]
        .as_str()
        .ok_or("createdAt must be a string")?;
    chrono::DateTime::parse_from_rfc3339(created).map_err(|_| "createdAt must be RFC 3339")?;
    Ok(())
}

async fn append(sink: &Sink, lines: &str) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let _guard = sink.journal.lock().await;
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(sink.dir.join("entries.jsonl"))
        .await?;
    file.write_all(lines.as_bytes()).await?;
    file.flush().await
}

/// A path component we are willing to create: no separators, no dot-dot.
fn safe_name(name: &str) -> Option<&str> {
    let ok = !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0']);
    ok.then_some(name)
}

async fn recording_file(
    State(sink): State<Sink>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Reply {
    let key = headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !key.starts_with("recording_file:") {
        return reject("Idempotency-Key must be recording_file:<outboxId>");
    }
    let mut call_log_id = None;
    let mut recording_id = None;
    let mut audio: Option<(String, PathBuf, u64)> = None;
    let mut meta: Option<Vec<u8>> = None;
    let staging = sink
        .dir
        .join("files")
        .join(format!(".incoming-{}", uuid::Uuid::new_v4()));
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return reject(format!("bad multipart body: {e}")),
        };
        match field.name().unwrap_or("") {
            "callLogId" => call_log_id = field.text().await.ok(),
            "recordingId" => recording_id = field.text().await.ok(),
            "audio" => {
                let Some(name) = field.file_name().and_then(safe_name).map(str::to_string) else {
                    return reject("audio part needs a plain filename");
                };
                match stream_to(&staging, field).await {
                    Ok(len) => audio = Some((name, staging.clone(), len)),
                    Err(e) => return reject(format!("reading audio: {e}")),
                }
            }
            "meta" => match field.bytes().await {
                Ok(b) if serde_json::from_slice::<Value>(&b).is_ok() => meta = Some(b.to_vec()),
                Ok(_) => return reject("meta part is not JSON"),
                Err(e) => return reject(format!("reading meta: {e}")),
            },
            other => return reject(format!("unexpected part `{other}`")),
        }
    }
    let (Some(call_log_id), Some(recording_id), Some((name, path, len))) =
        (call_log_id, recording_id, audio)
    else {
        let _ = tokio::fs::remove_file(&staging).await;
        return reject("parts callLogId, recordingId and audio are required");
    };
    let Some(dir_name) = safe_name(&call_log_id) else {
        let _ = tokio::fs::remove_file(&staging).await;
        return reject("callLogId is not a plain name");
    };
    let dir = sink.dir.join("files").join(dir_name);
    let stored = async {
        tokio::fs::create_dir_all(&dir).await?;
        tokio::fs::rename(&path, dir.join(&name)).await?;
        if let Some(meta) = &meta {
            tokio::fs::write(dir.join("meta.json"), meta).await?;
        }
        std::io::Result::Ok(())
    };
    if let Err(e) = stored.await {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": e.to_string() })),
        );
    }
    let line = json!({"recordingFile": {"callLogId": call_log_id, "recordingId": recording_id, "file": name, "bytes": len, "meta": meta.is_some()}});
    if let Err(e) = append(&sink, &format!("{line}\n")).await {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": e.to_string() })),
        );
    }
    (StatusCode::OK, Json(json!({ "stored": len })))
}

async fn stream_to(
    path: &Path,
    mut field: axum::extract::multipart::Field<'_>,
) -> anyhow::Result<u64> {
    let mut file = tokio::fs::File::create(path).await?;
    let mut len = 0u64;
    while let Some(chunk) = field.chunk().await? {
        len += chunk.len() as u64;
        file.write_all(&chunk).await?;
    }
    file.flush().await?;
    Ok(len)
}
