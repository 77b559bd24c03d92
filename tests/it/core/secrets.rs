//! Secrets go where they belong (the Authorization header) and nowhere else: not in
//! logs at debug level, not with payload contents.

use serde_json::json;
use uuid::Uuid;

use super::{a_call_with_its_recording, drain_until_with, write_recording};
use crate::harness::pg::with_password;
use crate::harness::{both_stores, closed_port, serversync, Backend, Output, TestEnv};

const TOKEN: &str = "s3cret-token";
const DB_PASSWORD: &str = "pw-s3cret-db";
const MARKER: &str = "PAYLOAD-MARKER-9f2c";

#[track_caller]
fn assert_nothing_leaks(out: &Output) {
    out.assert_no_panic();
    for secret in [TOKEN, DB_PASSWORD, MARKER] {
        assert!(
            !out.stdout.contains(secret),
            "stdout shows {secret:?}\n{out}"
        );
        assert!(
            !out.stderr.contains(secret),
            "stderr shows {secret:?}\n{out}"
        );
    }
}

both_stores!(the_auth_token_is_sent_and_no_secret_or_payload_reaches_the_output);
async fn the_auth_token_is_sent_and_no_secret_or_payload_reaches_the_output(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("ingest.auth_token", TOKEN);
    // some Frontends take a key in the query: it is sent, never shown
    let keyed = format!("{}/?key={TOKEN}", env.sink.url().trim_end_matches('/'));
    env.config.set("ingest.base_url", keyed);
    if backend == Backend::Postgres {
        env.config
            .set("database.url", with_password(env.db.url(), DB_PASSWORD));
    }
    let call = Uuid::new_v4();
    write_recording(&env, call);
    env.insert("call_log", call, json!({"id": call, "note": MARKER}))
        .await;
    env.insert(
        "recording",
        Uuid::new_v4(),
        json!({"callLogId": call, "note": MARKER}),
    )
    .await;
    env.insert(
        "recording_file",
        Uuid::new_v4(),
        json!({"callLogId": call, "filePath": format!("{call}/mixed.wav"), "note": MARKER}),
    )
    .await;
    // A failure first in every round, so that error paths log too.
    env.sink.fail_next(1, 500);

    let mut outputs = Vec::new();
    for format in ["pretty", "json"] {
        let args = ["--log-level", "debug", "--log-format", format];
        let drained = || async { env.count("sync_outbox").await == 0 };
        outputs.extend(drain_until_with(&env, &args, "delivered", drained).await);
        for command in [&["status", "--json"][..], &["dlq", "list"], &["check"]] {
            outputs.push(env.cmd(command.iter().chain(&args)).output().await);
        }
        env.insert("call_log", Uuid::new_v4(), json!({"note": MARKER}))
            .await;
        env.sink.fail_next(1, 500);
    }
    outputs.extend(
        drain_until_with(&env, &["--log-level", "trace"], "delivered", || async {
            env.count("sync_outbox").await == 0
        })
        .await,
    );
    for out in &outputs {
        assert_nothing_leaks(out);
    }

    assert_eq!(env.sink.uploads().len(), 1);
    assert_eq!(env.sink.entries().len(), 4);
    let mut authorizations = env.sink.sync_authorizations();
    authorizations.extend(
        env.sink
            .all_uploads()
            .iter()
            .map(|u| u.headers.get("authorization").map(str::to_string)),
    );
    let bearer = format!("Bearer {TOKEN}");
    assert!(
        authorizations
            .iter()
            .all(|a| a.as_deref() == Some(bearer.as_str())),
        "every request carries the token: {authorizations:?}"
    );
}

#[tokio::test]
async fn an_unreachable_database_is_reported_without_its_password() {
    let mut env = TestEnv::new().await;
    let url = format!(
        "postgres://postgres:{DB_PASSWORD}@127.0.0.1:{}/x",
        closed_port()
    );
    env.config.set("database.url", url.as_str());
    let out = env.run(&["drain", "--log-level", "debug"]).await;
    out.assert_fails_with("database");
    assert_nothing_leaks(&out);
    let out = env.cmd(["check", "--log-level", "debug"]).output().await;
    assert_eq!(out.code, Some(1), "check fails without a database\n{out}");
    assert_nothing_leaks(&out);

    // a parameter sqlx does not know (a misspelt `password`) is named, not quoted
    env.config.set(
        "database.url",
        format!("{url}?passwd={DB_PASSWORD}").as_str(),
    );
    let out = env.run(&["status", "--log-level", "debug"]).await;
    out.assert_fails_with("database");
    assert!(
        out.stderr.contains("unrecognized connection parameter") && out.stderr.contains("passwd"),
        "{out}"
    );
    assert_nothing_leaks(&out);
    // an ingest URL that does not parse is not quoted when it may hold credentials
    let out = env
        .run(&[
            "--ingest-url",
            &format!("http://u:{DB_PASSWORD}@[::1"),
            "status",
        ])
        .await;
    out.assert_fails_with("invalid value for ingest.base_url: <unparseable URL>")
        .assert_single_stderr_line();
    assert_nothing_leaks(&out);

    // a bad option in the URL: said once (sqlx's message repeats its own prefix)
    env.config
        .set("database.url", format!("{url}?sslmode=bogus").as_str());
    let out = env.run(&["status"]).await;
    out.assert_fails_with("unknown value \"bogus\" for `ssl_mode`")
        .assert_single_stderr_line();
    assert_eq!(
        out.stderr.matches("error with configuration").count(),
        1,
        "{out}"
    );
    assert_nothing_leaks(&out);
}

both_stores!(a_wrong_ingest_token_is_not_echoed);
async fn a_wrong_ingest_token_is_not_echoed(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("ingest.auth_token", TOKEN);
    env.sink.set_mode(crate::harness::Mode::Always(401));
    env.insert("call_log", Uuid::new_v4(), json!({"note": MARKER}))
        .await;
    let out = env.run(&["drain", "--log-level", "debug"]).await;
    out.assert_code(3);
    assert_nothing_leaks(&out);
    let dead = env.dead_letters().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error_type, "http_4xx");
    assert!(
        !dead[0].error_message.contains(TOKEN),
        "error_message shows the token: {:#?}",
        dead[0]
    );
}

/// Standard Webhooks' example secret.
const SIGNING_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// What a Frontend does with a signed request: recompute HMAC-SHA256 over
/// `webhook-id.webhook-timestamp.body` with the secret and compare.
#[track_caller]
fn assert_signed(headers: &crate::harness::sink::Headers, body: &[u8]) {
    use base64::Engine;
    use hmac::Mac;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(SIGNING_SECRET.trim_start_matches("whsec_"))
        .expect("the example secret is base64");
    let id = headers.get("webhook-id").expect("webhook-id");
    let timestamp = headers.get("webhook-timestamp").expect("webhook-timestamp");
    let signature = headers.get("webhook-signature").expect("webhook-signature");
    assert_eq!(
        Some(id),
        headers.get("idempotency-key"),
        "the message id is the Idempotency-Key"
    );
    let age = chrono::Utc::now().timestamp() - timestamp.parse::<i64>().expect("a Unix time");
    assert!((0..120).contains(&age), "a fresh timestamp: {timestamp}");
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", b64.encode(mac.finalize().into_bytes()));
    assert_eq!(signature, expected, "signature over the exact body");
}

both_stores!(batches_and_uploads_are_signed_over_their_exact_bodies);
async fn batches_and_uploads_are_signed_over_their_exact_bodies(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.config.set("ingest.signing_secret", SIGNING_SECRET);
    let (_call, audio, meta) = a_call_with_its_recording(&env).await;

    env.drain().await.assert_success();

    let syncs = env.sink.sync_requests();
    assert_eq!(syncs.len(), 1);
    assert_signed(&syncs[0].headers, &syncs[0].raw_body);
    let uploads = env.sink.uploads();
    assert_eq!(uploads.len(), 1);
    assert_signed(&uploads[0].headers, &uploads[0].raw_body);
    assert_eq!(uploads[0].part("audio").expect("audio").bytes, audio);
    assert_eq!(uploads[0].part("meta").expect("meta").bytes, meta);
    assert_eq!(env.count("sync_outbox").await, 0);
}

both_stores!(an_auth_token_that_cannot_be_a_header_is_a_config_error);
/// A token with a line break (an environment variable written with a trailing
/// newline, say) cannot be sent: one line naming the key, at start-up, and no row
/// charged for it.
async fn an_auth_token_that_cannot_be_a_header_is_a_config_error(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    for token in ["bad\ntoken", "two words", ""] {
        env.config.set("ingest.auth_token", token);
        for command in [&["drain"][..], &["check"]] {
            let out = env.run(command).await;
            out.assert_fails_with("ingest.auth_token")
                .assert_single_stderr_line();
            assert!(
                !out.stderr.contains("two words"),
                "the token is not echoed\n{out}"
            );
        }
    }
    assert_eq!(env.sink.request_count(), 0);
    assert_eq!(env.outbox().await[0].attempts, 0, "nothing charged");
}

/// One secret given twice (a value and a file), or a `whsec_` signing secret that is
/// no base64 (it would be used as raw bytes, and every signature would fail at the
/// Frontend): one line naming the keys, at start-up, nothing sent, nothing echoed.
#[tokio::test]
async fn a_secret_set_twice_or_a_malformed_signing_secret_is_a_config_error() {
    let mut env = TestEnv::migrated_on(Backend::Postgres).await;
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    let file = env.root.join("token");
    std::fs::write(&file, TOKEN).expect("write the token file");
    let file = file.to_string_lossy().to_string();
    env.config
        .set("ingest.auth_token", TOKEN)
        .set("ingest.auth_token_file", file.as_str());
    env.run(&["drain"])
        .await
        .assert_fails_with("ingest.auth_token and ingest.auth_token_file are both set")
        .assert_single_stderr_line();
    env.config.remove("ingest.auth_token");
    for secret in ["whsec_not base64!", "whsec_", ""] {
        env.config.set("ingest.signing_secret", secret);
        let out = env.run(&["drain"]).await;
        out.assert_fails_with("ingest.signing_secret")
            .assert_single_stderr_line();
        assert!(
            !out.stderr.contains("not base64!"),
            "the secret is not echoed\n{out}"
        );
    }
    assert_eq!(env.sink.request_count(), 0);
    assert_eq!(env.outbox().await[0].attempts, 0, "nothing charged");
}

/// A config file that is not valid TOML is told by its line and column alone: the
/// parser's own message quotes the line, and the line can hold a secret. A secret in
/// the environment that is not UTF-8 is refused naming the variable, not quoting it
/// (and `DATABASE_URL` is not taken as unset).
#[tokio::test]
async fn config_errors_never_quote_a_secret() {
    use std::os::unix::ffi::OsStrExt;
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    let file = env.root.join("broken.toml");
    for (text, at) in [
        (
            format!("[ingest]\nauth_token = \"{TOKEN}\n"),
            "line 2, column",
        ),
        (
            format!("[ingest]\nauth_token = \"x\"\nauth_token = \"{TOKEN}\"\n"),
            "line 3, column 1: duplicate key auth_token",
        ),
        (
            format!("[database]\nurl = \"postgres://u:{DB_PASSWORD}@127.0.0.1/x\" more\n"),
            "line 2, column",
        ),
    ] {
        std::fs::write(&file, text).expect("write the config file");
        let out = serversync()
            .arg("--config")
            .arg(&file)
            .arg("drain")
            .output()
            .await;
        out.assert_fails_with(&format!("broken.toml is not valid TOML at {at}"))
            .assert_single_stderr_line();
        assert_nothing_leaks(&out);
    }
    for var in [
        "SERVERSYNC__INGEST__AUTH_TOKEN",
        "SERVERSYNC__INGEST__SIGNING_SECRET",
        "SERVERSYNC__DATABASE__URL",
        "serversync__ingest__auth_token",
        "DATABASE_URL",
    ] {
        let value = [TOKEN.as_bytes(), b"\xff"].concat();
        let out = env
            .cmd(["drain"])
            .env(var, std::ffi::OsStr::from_bytes(&value))
            .output()
            .await;
        out.assert_fails_with(&format!(
            "the environment variable {var} is not valid UTF-8"
        ))
        .assert_single_stderr_line();
        assert_nothing_leaks(&out);
    }
    // a secret file of two lines is not joined into one value
    let two_lines = env.root.join("url");
    std::fs::write(
        &two_lines,
        format!("postgres://u:{DB_PASSWORD}@127.0.0.1/x\nmore\n"),
    )
    .expect("write the url file");
    let out = env
        .cmd(["drain"])
        .env("SERVERSYNC__DATABASE__URL_FILE", &two_lines)
        .output()
        .await;
    out.assert_fails_with(
        "holds more than one line (the file must hold the value alone) \
         (set by the environment variable SERVERSYNC__DATABASE__URL_FILE)",
    )
    .assert_single_stderr_line();
    assert_nothing_leaks(&out);
    // an empty token file is named as the key that points to it
    let empty = env.root.join("token");
    std::fs::write(&empty, "\n").expect("write the token file");
    let out = env
        .cmd(["drain"])
        .env("SERVERSYNC__INGEST__AUTH_TOKEN_FILE", &empty)
        .output()
        .await;
    out.assert_fails_with(&format!(
        "invalid value for ingest.auth_token_file: {} is empty",
        empty.display()
    ))
    .assert_single_stderr_line();
}
