//! The operator's commands beside the relay: `status`, `dlq`, `enqueue` and
//! `check`. Each connects, does one thing, prints it, and says how it went in its
//! exit code; none of them delivers.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;

use crate::app::{causes, connect_operator};
use crate::cli::DlqCommand;
use crate::config::Settings;
use crate::dispatch::Dispatcher;
use crate::files::RecordingsRoot;
use crate::metrics::Metrics;
use crate::store::{DlqFilter, DlqSelection, NewRow, SchemaState};

/// `enqueue`: one outbox row, as a producer would write it, after the checks that
/// spare the operator a row the relay could only dead-letter.
pub async fn enqueue(
    settings: &Settings,
    entity_type: String,
    entity_id: &str,
    payload: &str,
    ordering_key: Option<String>,
) -> anyhow::Result<ExitCode> {
    let entity_id = uuid::Uuid::parse_str(entity_id)
        .map_err(|e| anyhow::anyhow!("invalid --entity-id {entity_id:?}: {e}"))?;
    let payload: serde_json::Value = serde_json::from_str(payload)
        .map_err(|e| anyhow::anyhow!("invalid --payload: not JSON: {e}"))?;
    // what the relay would only dead-letter (`payload_invalid`), or what
    // PostgreSQL's jsonb refuses with a message that does not say where
    if !payload.is_object() {
        bail!("invalid --payload: must be a JSON object (the entity)");
    }
    if has_nul(&payload) {
        bail!("invalid --payload: contains \\u0000, which PostgreSQL's jsonb cannot store");
    }
    if entity_type.trim().is_empty() {
        bail!("invalid --entity-type: must not be empty");
    }
    if !crate::taxonomy::well_formed_entity_type(&entity_type) {
        // the relay would only dead-letter it (`unknown_entity_type`)
        bail!(
            "invalid --entity-type: at most 100 bytes and no control characters \
             (no such type can be routed)"
        );
    }
    if ordering_key.as_deref().is_some_and(|k| k.is_empty()) {
        // an empty key is a key: every row given it would wait for the one before
        bail!(
            "invalid --ordering-key: must not be empty (leave it out for the key \
             derived from the entity type)"
        );
    }
    let store = connect_operator(settings).await?;
    store.require_current_schema().await?;
    let id = store
        .enqueue(&NewRow {
            entity_type,
            entity_id,
            payload,
            ordering_key,
        })
        .await?;
    say!("{id}");
    Ok(ExitCode::SUCCESS)
}

pub async fn status(settings: &Settings, json: bool) -> anyhow::Result<ExitCode> {
    let store = connect_operator(settings).await?;
    store.require_current_schema().await?;
    let s = store.status().await?;
    // recorded by any relay, whatever ingest.base_url this command was given; one
    // that is not this configuration's may be one no relay uses any more
    let sinks_down = store.sinks_down().await?;
    let configured = settings.ingest.base_url_shown();
    if json {
        let mut out = serde_json::to_value(&s)?;
        out["sinks_down"] = sinks_down
            .iter()
            .map(|(sink, since)| {
                serde_json::json!({
                    "sink": sink,
                    "down_since": since,
                    "configured": *sink == configured,
                })
            })
            .collect();
        say!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    say!("pending:        {}", s.pending);
    say!("due now:        {}", s.due);
    say!("in flight:      {}", s.in_flight);
    say!(
        "behind key:     {} (waiting for an older row of their ordering key)",
        s.waiting_behind_key
    );
    match s.oldest_pending_age_seconds {
        Some(age) => say!(
            "oldest pending: {}",
            humantime::format_duration(Duration::from_secs(age as u64))
        ),
        None => say!("oldest pending: -"),
    }
    if settings.retention.delete_sent && s.sent_last_5m == 0 {
        // relays so configured delete what they deliver and keep no record of it
        say!("sent (last 5m): 0 (not counted: retention.delete_sent = true keeps no records)");
    } else {
        say!("sent (last 5m): {}", s.sent_last_5m);
    }
    say!("dead letters:   {}", s.dead_letters);
    for (error_type, n) in &s.dead_letters_by_error_type {
        say!("  {error_type:<20} {n}");
    }
    if sinks_down.is_empty() {
        say!("ingest sink:    not recorded as down");
    }
    for (sink, since) in &sinks_down {
        let ago = chrono::DateTime::parse_from_rfc3339(since)
            .ok()
            .and_then(|t| (chrono::Utc::now() - t.to_utc()).to_std().ok())
            .map(|d| {
                format!(
                    ", {} ago",
                    humantime::format_duration(Duration::from_secs(d.as_secs()))
                )
            })
            .unwrap_or_default();
        if *sink == configured {
            say!("ingest sink:    DOWN since {since}{ago}: {sink} (relays probe it; rows wait, not charged)");
        } else {
            say!(
                "ingest sink:    DOWN since {since}{ago}: {sink} (not this configuration's \
                 ingest.base_url: if no relay uses it any more, delete its row from \
                 sync_outbox_sink_state)"
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn dlq(settings: &Settings, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let store = connect_operator(settings).await?;
    store.require_current_schema().await?;
    match command {
        DlqCommand::List {
            error_type,
            entity_type,
            http_status,
            older_than,
            limit,
            json,
        } => {
            let limit = limit.max(0);
            // one more than shown, to tell whether the listing was cut
            let mut rows = store
                .dlq_list(&DlqFilter {
                    error_type,
                    entity_type,
                    http_status,
                    older_than,
                    limit: limit.saturating_add(1),
                })
                .await?;
            let cut = rows.len() as i64 > limit;
            rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
            if json {
                say!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                say!(
                    "{:>8} {:>10} {:<16} {:<20} {:>6} {:>8}  {:<24} message",
                    "id",
                    "outbox_id",
                    "entity_type",
                    "error_type",
                    "http",
                    "attempts",
                    "dead_at"
                );
                for d in rows {
                    say!(
                        "{:>8} {:>10} {:<16} {:<20} {:>6} {:>8}  {:<24} {}",
                        d.id,
                        d.outbox_id,
                        shown(&d.entity_type),
                        d.error_type,
                        d.http_status
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "-".into()),
                        format!("{}/{}", d.attempts, d.max_attempts),
                        d.dead_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                        one_line(&d.error_message, 100)
                    );
                }
            }
            if cut {
                // on stderr: `--json` output stays one parseable array
                say_err!(
                    "dlq list: the first {limit} shown (oldest first); more match: raise \
                     --limit, or narrow with --error-type, --entity-type, --http-status \
                     or --older-than (`serversync status` counts them by error type)"
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Show { id, json } => {
            let Some(d) = store.dlq_get(id).await? else {
                say_err!("error: no dead letter with id {id}");
                return Ok(ExitCode::FAILURE);
            };
            if json {
                say!("{}", serde_json::to_string_pretty(&d)?);
                return Ok(ExitCode::SUCCESS);
            }
            say!("dead letter {}  (outbox id {})", d.id, d.outbox_id);
            say!("entity:        {} {}", shown(&d.entity_type), d.entity_id);
            say!(
                "error:         {} (HTTP {})",
                d.error_type,
                d.http_status
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "-".into())
            );
            say!("message:       {}", shown(&d.error_message));
            say!("attempts:      {}/{}", d.attempts, d.max_attempts);
            if let (Some(first), Some(last)) = (d.first_attempt_at, d.last_attempt_at) {
                say!("tried:         {} … {}", utc(&first), utc(&last));
            }
            say!(
                "created:       {}",
                d.created_at
                    .as_ref()
                    .map_or_else(|| "(not a time this program can show)".to_owned(), utc)
            );
            say!("dead since:    {}", utc(&d.dead_at));
            if let Some(body) = &d.response_body {
                say!("response body: {}", one_line(body, 400));
            }
            say!("history:");
            for entry in d.attempt_errors.as_array().into_iter().flatten() {
                say!(
                    "  #{} {} {} {} {}",
                    entry["attempt"],
                    entry["at"].as_str().unwrap_or("?"),
                    entry["errorType"].as_str().unwrap_or("?"),
                    entry["httpStatus"]
                        .as_i64()
                        .map_or_else(|| "-".to_string(), |s| s.to_string()),
                    shown(entry["message"].as_str().unwrap_or(""))
                );
                if let Some(at) = entry["requeuedAt"].as_str() {
                    say!("  requeued {at} (attempts counted from 1 again)");
                }
            }
            say!("payload:       {}", d.payload);
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Requeue {
            ids,
            all,
            error_type,
            http_status,
        } => {
            let asked = distinct(&ids);
            let matching = matching(error_type, http_status, None);
            let n = store.dlq_requeue(&selection(ids, all, matching)?).await?;
            say!("requeued {n} dead letter(s)");
            note_missing(asked, n);
            Ok(ExitCode::SUCCESS)
        }
        DlqCommand::Purge {
            ids,
            all,
            older_than,
            error_type,
            http_status,
        } => {
            let asked = distinct(&ids);
            let matching = matching(error_type, http_status, older_than);
            let n = store.dlq_purge(&selection(ids, all, matching)?).await?;
            say!("purged {n} dead letter(s)");
            note_missing(asked, n);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn distinct(ids: &[i64]) -> u64 {
    ids.iter().collect::<std::collections::HashSet<_>>().len() as u64
}

/// Ids given that named no dead letter: said, not failed (SPEC §5: exit 0), since
/// a script that requeues or purges twice has nothing left to do the second time.
fn note_missing(asked: u64, done: u64) {
    if asked > done {
        say_err!(
            "note: {} of the {asked} id(s) given named no dead letter (see `dlq list`)",
            asked - done
        );
    }
}

/// The filters given, if any: a dead letter must match every one.
fn matching(
    error_type: Option<String>,
    http_status: Option<i32>,
    older_than: Option<Duration>,
) -> Option<DlqSelection> {
    (error_type.is_some() || http_status.is_some() || older_than.is_some()).then_some(
        DlqSelection::Matching {
            error_type,
            http_status,
            older_than,
        },
    )
}

fn selection(
    ids: Vec<i64>,
    all: bool,
    other: Option<DlqSelection>,
) -> anyhow::Result<DlqSelection> {
    match (ids.is_empty(), all, other) {
        (false, false, None) => Ok(DlqSelection::Ids(ids)),
        (true, true, None) => Ok(DlqSelection::All),
        (true, false, Some(sel)) => Ok(sel),
        _ => bail!("give exactly one of: dead-letter ids, --all, or a filter"),
    }
}

/// Text a producer or a sink wrote, for a terminal: control characters and the
/// bidirectional overrides escaped (`\u{1b}`, `\u{202e}`), so that an entity type
/// cannot move the cursor, recolour or retitle the operator's terminal, or show
/// itself reversed.
fn shown(text: &str) -> String {
    text.chars()
        .map(|c| {
            let bidi = matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
            if c.is_control() || bidi {
                c.escape_debug().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if flat.chars().count() > max {
        format!("{}…", flat.chars().take(max).collect::<String>())
    } else {
        flat
    }
}

pub async fn check(settings: &Settings) -> anyhow::Result<ExitCode> {
    say!("ok    configuration");
    let mut healthy = true;
    // the store, once its schema is known to be current
    let mut current = None;
    match connect_operator(settings).await {
        Ok(store) => {
            say!("ok    database reachable ({})", store.backend());
            match store.schema_state().await {
                Ok(SchemaState::Current) => {
                    say!("ok    schema current");
                    current = Some(store);
                }
                Ok(SchemaState::Outdated { missing }) => {
                    healthy = false;
                    say!(
                        "FAIL  schema outdated ({} migration(s) missing): run `serversync migrate`",
                        missing.len()
                    );
                }
                Ok(SchemaState::Newer { .. }) => {
                    healthy = false;
                    say!("FAIL  schema newer than this binary: upgrade serversync");
                }
                Err(e) => {
                    healthy = false;
                    say!("FAIL  schema: {}", one_line(&causes(&e), 300));
                }
            }
        }
        Err(e) => {
            healthy = false;
            say!("FAIL  database: {}", one_line(&causes(&e), 300));
        }
    }
    let dispatcher = Dispatcher::new(
        &settings.ingest,
        RecordingsRoot::new(settings.storage.recordings_root.clone()),
        Metrics::new()?,
    )?;
    // What the relay itself sends when it probes an empty outbox: an empty batch to
    // the sync endpoint, with the token and the signature. It tests the path, the
    // token and whether the Frontend answers now, and delivers nothing.
    let base = settings.ingest.base_url_shown();
    match dispatcher.send_json(&[]).await {
        Ok(()) => say!("ok    ingest {base} accepts requests (an empty batch)"),
        Err(f) => match f.http_status {
            // it answered, authorized, and only refused the empty batch itself
            Some(400 | 422) => say!(
                "warn  ingest {base} reachable, but refused an empty batch: {}",
                one_line(&f.message, 300)
            ),
            // it answered, and asks for fewer requests: relays pause, and go on
            Some(429) => say!(
                "warn  ingest {base} reachable, but asks to slow down now (relays pause \
                 as it says, then go on): {}",
                one_line(&f.message, 300)
            ),
            Some(status) => {
                healthy = false;
                let hint = match status {
                    401 | 403 => " (check ingest.auth_token)",
                    404 | 405 => " (check ingest.base_url: the API is not at that path)",
                    300..=399 => "",
                    _ => " (the Frontend is failing now)",
                };
                say!("FAIL  ingest {base}: {}{hint}", one_line(&f.message, 300));
            }
            None => {
                healthy = false;
                let hint = if f.message.contains("UnknownIssuer") {
                    " (a CA the relay does not trust: give its PEM file as ingest.ca_file)"
                } else if f.message.contains("InvalidContentType") {
                    " (the server does not speak TLS: an https:// ingest.base_url for an \
                     http:// server?)"
                } else if f.message.contains("CaUsedAsEndEntity") {
                    " (the Frontend presents a CA certificate as its own, which TLS refuses \
                     even when trusted: give it a certificate issued by that CA)"
                } else {
                    ""
                };
                say!("FAIL  ingest {base}: {}{hint}", one_line(&f.message, 300));
            }
        },
    }
    let ingest = &settings.ingest;
    for warning in [
        ingest.unverified_tls_warning(),
        ingest.cleartext_token_warning(),
    ]
    .into_iter()
    .flatten()
    {
        say!("warn  {warning}");
    }
    // what relays starting now would find: they probe before delivering anything
    if let Some(store) = &current {
        if let Ok(Some(since)) = store.sink_down_since(&base, None).await {
            say!(
                "warn  ingest {base} recorded as down by a relay since {since}: relays \
                 probe it before delivering, until one sees it answer"
            );
        }
    }
    let root = RecordingsRoot::new(settings.storage.recordings_root.clone());
    match root.problem() {
        None => say!("ok    recordings root {}", root.path().display()),
        Some(problem) => say!("warn  recordings root {} {problem}", root.path().display()),
    }
    Ok(if healthy {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Whether a string anywhere in `value` (a key too) holds a NUL character.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// A time as the dead-letter listings show it: UTC, with a `Z`.
fn utc(at: &chrono::DateTime<chrono::Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}
