//! TLS to the Frontend (SPEC §2.3): verified by default, so a certificate from a CA
//! the relay does not trust is refused before anything is sent, as a `connect` error
//! that charges no attempt; `ingest.ca_file` trusts a private CA without turning
//! verification off; so do the operating system's CA certificates
//! (`ingest.system_roots`, on by default; `SSL_CERT_FILE` stands in for the store
//! here); `ingest.danger_accept_invalid_certs` does turn it off.
//! The fake Frontend serves a certificate for 127.0.0.1 issued by the test CA of
//! `tests/fixtures/tls`.

use serde_json::json;
use uuid::Uuid;

use super::{a_call_with_its_recording, retry_in_an_hour};
use crate::harness::config::TomlValue;
use crate::harness::env::OutboxRow;
use crate::harness::{Sink, TestEnv};

const CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls/ca.pem");

/// A migrated PostgreSQL environment whose Frontend speaks only TLS.
async fn behind_tls() -> TestEnv {
    let mut env = TestEnv::migrated().await;
    env.sink = Sink::start_tls();
    env.config.set("ingest.base_url", env.sink.url());
    assert!(env.sink.url().starts_with("https://127.0.0.1:"));
    env
}

/// Both rows arrived over TLS: the entry as sent, the audio byte for byte.
#[track_caller]
fn assert_delivered(env: &TestEnv, call: Uuid, audio: &[u8]) {
    let entries = env.sink.entries();
    assert_eq!(entries.len(), 1, "{entries:#?}");
    assert_eq!(entries[0].entity_type, "call_log");
    assert_eq!(entries[0].payload, json!({"id": call}));
    let uploads = env.sink.uploads();
    assert_eq!(uploads.len(), 1, "one upload");
    let part = uploads[0].part("audio").expect("an audio part");
    assert!(part.bytes == audio, "the audio arrived byte for byte");
    assert_eq!(env.sink.failed_handshakes(), 0);
}

/// A migrated environment behind TLS with `key` set to `value`, whose drain
/// delivered a call's log and recording over it.
async fn a_call_delivered_over_tls_with(key: &str, value: impl Into<TomlValue>) -> TestEnv {
    let mut env = behind_tls().await;
    env.config.set(key, value);
    let (call, audio, _meta) = a_call_with_its_recording(&env).await;

    env.drain().await.assert_success();
    assert_delivered(&env, call, &audio);
    env
}

/// A drain whose one row could not be sent because the relay refused the sink's
/// certificate: nothing went over the connection, and the row is left as `connect`,
/// charged nothing, not dead-lettered. Returns the row.
async fn refused_before_anything_was_sent(env: &TestEnv) -> OutboxRow {
    let out = env.drain().await;
    out.assert_code(3);
    assert!(
        env.sink.failed_handshakes() >= 1,
        "a handshake was tried\n{out}"
    );
    assert_eq!(env.sink.request_count(), 0, "nothing was sent over it");

    let mut rows = env.outbox().await;
    assert_eq!(rows.len(), 1, "the row stays in sync_outbox: {rows:#?}");
    let row = rows.remove(0);
    assert_eq!(row.last_error_type.as_deref(), Some("connect"), "{row:#?}");
    assert_eq!(
        row.attempts, 0,
        "a refused handshake is the sink's: {row:#?}"
    );
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);
    row
}

#[tokio::test]
async fn a_certificate_from_an_untrusted_ca_is_refused_and_charges_nothing() {
    let mut env = behind_tls().await;
    retry_in_an_hour(&mut env);
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;

    let row = refused_before_anything_was_sent(&env).await;
    let message = row.last_error.as_deref().unwrap_or_default();
    assert!(
        message.contains("certificate"),
        "the error says it was the certificate: {message:?}"
    );

    let out = env.run(&["check"]).await;
    out.assert_code(1).assert_no_panic();
    assert!(
        out.stdout.contains("FAIL  ingest")
            && out.stdout.contains("certificate")
            && out.stdout.contains("ingest.ca_file"),
        "check names the certificate, and the key that trusts its CA\n{out}"
    );
}

#[tokio::test]
async fn a_private_ca_in_ingest_ca_file_is_trusted_and_verification_stays_on() {
    let mut env = a_call_delivered_over_tls_with("ingest.ca_file", CA).await;
    assert_eq!(env.count("sync_outbox").await, 0);
    env.run(&["check"]).await.assert_success();

    // the CA vouches for 127.0.0.1 and localhost only: its certificate for another
    // name is refused, so trusting the CA did not turn verification off
    env.sink = Sink::start_tls_for_another_name();
    env.config.set("ingest.base_url", env.sink.url());
    env.insert("call_log", Uuid::new_v4(), json!({"n": 2}))
        .await;
    refused_before_anything_was_sent(&env).await;
}

#[tokio::test]
async fn the_systems_ca_certificates_are_trusted_unless_ingest_system_roots_is_off() {
    let mut env = behind_tls().await;
    retry_in_an_hour(&mut env);
    // the operating system's store as the daemon finds it holds the test CA
    let (call, audio, _meta) = a_call_with_its_recording(&env).await;
    let out = env.cmd(["drain"]).env("SSL_CERT_FILE", CA).output().await;
    out.assert_success();
    assert_delivered(&env, call, &audio);

    env.config.set("ingest.system_roots", false);
    env.insert("call_log", Uuid::new_v4(), json!({"n": 2}))
        .await;
    let out = env.cmd(["drain"]).env("SSL_CERT_FILE", CA).output().await;
    out.assert_code(3);
    assert!(env.sink.failed_handshakes() >= 1, "{out}");
    assert_eq!(env.sink.entries().len(), 1, "nothing more was sent\n{out}");
    assert_eq!(env.count("sync_outbox").await, 1);
}

/// And says so: at every start, and in `check`, which otherwise finds all well.
#[tokio::test]
async fn danger_accept_invalid_certs_turns_verification_off_and_says_so() {
    let mut env = behind_tls().await;
    env.config.set("ingest.danger_accept_invalid_certs", true);
    let (call, audio, _meta) = a_call_with_its_recording(&env).await;
    let out = env.drain().await;
    out.assert_success();
    assert_delivered(&env, call, &audio);
    let warning = "ingest.danger_accept_invalid_certs = true: the Frontend's TLS \
                   certificate is not verified";
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("WARN") && l.contains(warning)),
        "the drain warns\n{out}"
    );
    let out = env.run(&["check"]).await;
    out.assert_success();
    assert!(
        out.stdout.contains(&format!("warn  {warning}")),
        "check warns\n{out}"
    );
}

#[tokio::test]
async fn a_bad_ingest_ca_file_is_named_at_start() {
    let mut env = TestEnv::migrated().await;
    let not_pem = env.work_dir().join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello\n").expect("write");
    let not_a_certificate = env.work_dir().join("garbled-ca.pem");
    std::fs::write(
        &not_a_certificate,
        "-----BEGIN CERTIFICATE-----\naGVsbG8=\n-----END CERTIFICATE-----\n",
    )
    .expect("write");
    let missing = env.work_dir().join("missing.pem");
    for (path, why) in [
        (&missing, "cannot read"),
        (&not_pem, "no PEM certificate"),
        (&not_a_certificate, "cannot be read (BadEncoding)"),
    ] {
        env.config
            .set("ingest.ca_file", path.to_string_lossy().to_string());
        for command in ["drain", "check"] {
            env.run(&[command])
                .await
                .assert_fails_with("ingest.ca_file")
                .assert_fails_with(why)
                .assert_single_stderr_line();
        }
    }
    env.insert("call_log", Uuid::new_v4(), json!({"n": 1}))
        .await;
    env.config.set("ingest.ca_file", CA);
    env.drain().await.assert_success();
    assert_eq!(
        env.sink.entries().len(),
        1,
        "the row was kept for the good config"
    );
}

/// An `https://` URL for a Frontend that speaks plain HTTP: `check` says what is
/// likely wrong, where rustls says only "received corrupt message of type
/// InvalidContentType".
#[tokio::test]
async fn check_names_an_https_url_given_for_a_plain_http_server() {
    let mut env = TestEnv::migrated().await;
    let plain = env.sink.url();
    assert!(plain.starts_with("http://127.0.0.1:"));
    env.config
        .set("ingest.base_url", plain.replacen("http://", "https://", 1));
    let out = env.run(&["check"]).await;
    out.assert_code(1).assert_no_panic();
    assert!(
        out.stdout.contains("FAIL  ingest") && out.stdout.contains("does not speak TLS"),
        "{out}"
    );
}
