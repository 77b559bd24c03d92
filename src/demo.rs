//! `serversync demo`: the whole job on one machine with no setup. A temporary SQLite
//! outbox, a few realistic calls (with real WAV files), the dev sink as the
//! Frontend, one poison row, and a real drain through the real relay.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::app::{connect, drain, DrainOptions};
use crate::config::Settings;
use crate::store::{DlqFilter, NewRow, Store};

const CALLS: usize = 3;

pub async fn run(keep: bool) -> anyhow::Result<ExitCode> {
    let tmp = tempfile::Builder::new()
        .prefix("serversync-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let dir = tmp.path().to_path_buf();
    let recordings = dir.join("recordings");
    let received = dir.join("received");
    let db_path = dir.join("outbox.db");
    let db_url = format!("sqlite://{}", db_path.display());

    let sink = crate::devsink::start("127.0.0.1:0".parse()?, received.clone()).await?;
    say!("serversync demo");
    say!("  outbox:        {db_url} (SQLite, temporary)");
    say!("  recordings:    {}", recordings.display());
    say!(
        "  frontend:      http://{} (stand-in ingest API)",
        sink.addr
    );
    say!();

    let mut settings = Settings::default();
    settings.database.url = Some(db_url.clone().into());
    settings.ingest.base_url = format!("http://{}", sink.addr);
    settings.ingest.timeout = Duration::from_secs(5);
    settings.storage.recordings_root = recordings.clone();
    settings.metrics.enabled = false;
    settings.validate()?;
    let settings = Arc::new(settings);

    let store = connect(&settings, true).await?;
    store.migrate().await?;
    let seeded = seed(&store, &recordings).await?;
    say!("seeded {} outbox rows: {CALLS} calls (call_log, recording, recording_file) and 1 poison row", seeded);
    say!();

    let summary = drain(settings, DrainOptions::default(), CancellationToken::new()).await?;
    sink.stop().await;

    let dead = store
        .dlq_list(&DlqFilter {
            limit: 100,
            ..Default::default()
        })
        .await?;
    say!();
    say!(
        "delivered {} rows; {} dead letter(s):",
        summary.delivered,
        dead.len()
    );
    for d in &dead {
        say!(
            "  #{} outbox {} {}: {} — {}",
            d.id,
            d.outbox_id,
            d.entity_type,
            d.error_type,
            d.error_message
        );
    }
    say!();
    say!("the Frontend stand-in received:");
    say!("  {}", received.join("entries.jsonl").display());
    for call in list_dirs(&received.join("files")) {
        say!("  {}", call.display());
    }
    let ok = summary.delivered == (seeded - 1) as u64
        && dead.len() == 1
        && dead[0].error_type == "path_denied";
    say!();
    if keep {
        let kept = tmp.keep();
        say!("kept {}; look around with:", kept.display());
        say!("  serversync --database-url {db_url} status");
        say!("  serversync --database-url {db_url} dlq list");
        say!(
            "  serversync --database-url {db_url} dlq show {}",
            dead.first().map_or(1, |d| d.id)
        );
    } else {
        say!("cleaned up (pass --keep to keep the database and the received files, then try");
        say!("  serversync --database-url sqlite://<dir>/outbox.db status   and   … dlq list)");
    }
    if ok {
        Ok(ExitCode::SUCCESS)
    } else {
        say_err!("error: the demo did not end as expected");
        Ok(ExitCode::FAILURE)
    }
}

/// Three calls with a log, a recording and its file, then one poison row whose
/// path tries to leave the recordings root.
async fn seed(store: &Store, recordings: &Path) -> anyhow::Result<usize> {
    let mut rows = 0;
    let started = chrono::Utc::now() - chrono::Duration::minutes(10);
    for i in 0..CALLS {
        let call_id = Uuid::new_v4();
        let recording_id = Uuid::new_v4();
        let duration = 1 + i as u32;
        let call_dir = recordings.join(call_id.to_string());
        std::fs::create_dir_all(&call_dir)?;
        std::fs::write(
            call_dir.join("mixed.wav"),
            wav(duration, 440.0 + 110.0 * i as f64),
        )?;
        std::fs::write(
            call_dir.join("meta.json"),
            serde_json::to_vec_pretty(
                &json!({"callLogId": call_id, "codec": "pcm_s16le", "sampleRate": 8000, "channels": 1}),
            )?,
        )?;
        let begin = started + chrono::Duration::minutes(i as i64);
        let items = [
            (
                "call_log",
                call_id,
                json!({
                    "id": call_id, "direction": if i % 2 == 0 { "inbound" } else { "outbound" },
                    "from": format!("+4930123456{i}"), "to": "+4940987654", "startedAt": begin,
                    "endedAt": begin + chrono::Duration::seconds(duration as i64), "durationSeconds": duration,
                }),
            ),
            (
                "recording",
                recording_id,
                json!({
                    "id": recording_id, "callLogId": call_id, "format": "wav", "durationSeconds": duration,
                }),
            ),
            (
                "recording_file",
                recording_id,
                json!({
                    "callLogId": call_id, "recordingId": recording_id,
                    "filePath": format!("{call_id}/mixed.wav"), "metaPath": format!("{call_id}/meta.json"),
                }),
            ),
        ];
        for (entity_type, entity_id, payload) in items {
            store
                .enqueue(&NewRow {
                    entity_type: entity_type.into(),
                    entity_id,
                    payload,
                    ordering_key: None,
                })
                .await?;
            rows += 1;
        }
    }
    let poison = Uuid::new_v4();
    store
        .enqueue(&NewRow {
            entity_type: "recording_file".into(),
            entity_id: poison,
            payload: json!({"callLogId": poison, "filePath": "../../etc/passwd"}),
            ordering_key: None,
        })
        .await?;
    Ok(rows + 1)
}

/// A mono 16-bit PCM WAV of a sine tone.
fn wav(seconds: u32, freq: f64) -> Vec<u8> {
    let rate = 8000u32;
    let samples = rate * seconds;
    let data_len = samples * 2;
    let mut out = Vec::with_capacity(44 + data_len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + data_len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes()); // PCM
    out.extend_from_slice(&1u16.to_le_bytes()); // mono
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&data_len.to_le_bytes());
    for n in 0..samples {
        let t = f64::from(n) / f64::from(rate);
        let v = ((t * freq * std::f64::consts::TAU).sin() * 8000.0) as i16;
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

fn list_dirs(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}
