//! Start-up failures: bad configuration, no or unreachable database, outdated schema.
//! Each is one clear `error:` line and exit 1, never a panic.

use std::time::Duration;

use uuid::Uuid;

use crate::harness::config::TomlValue;
use crate::harness::{both_stores, closed_port, serversync, Backend, Mode, Reply, TestEnv};

both_stores!(an_unknown_config_key_is_named);
async fn an_unknown_config_key_is_named(backend: Backend) {
    let mut env = TestEnv::new_on(backend).await;
    for (key, named) in [
        ("ingest.bsae_url", "ingest.bsae_url"),
        ("ingset.base_url", "ingset"),
        (
            "retry.overrides.call_log.max_attemps",
            "retry.overrides.call_log.max_attemps",
        ),
    ] {
        env.config.set(key, "x");
        env.run(&["drain"])
            .await
            .assert_fails_with(named)
            .assert_single_stderr_line();
        env.config.remove(key);
    }
}

/// A bad value, or an unknown key, says where it was set (the flag, the environment
/// variable or the config file), so that an operator looks in the right place.
#[tokio::test]
async fn a_bad_key_says_where_it_was_set() {
    let mut env = TestEnv::new_on(Backend::Sqlite).await;
    env.config.set("dispatch.batch_size", 0);
    let out = env.run(&["drain"]).await;
    out.assert_fails_with("invalid value for dispatch.batch_size: 0 (expected 1..=10000) (in /")
        .assert_single_stderr_line();
    assert!(out.stderr.contains(".toml)"), "the file named\n{out}");
    env.run(&["--batch-size", "20000", "drain"])
        .await
        .assert_fails_with("20000 (expected 1..=10000) (from --batch-size)");
    env.config.remove("dispatch.batch_size");
    env.cmd(["drain"])
        .env("SERVERSYNC__DISPATCH__BATCH_SIZE", "abc")
        .output()
        .await
        .assert_fails_with(
            "for key `dispatch.batch_size` (set by the environment variable \
             SERVERSYNC__DISPATCH__BATCH_SIZE)",
        )
        .assert_single_stderr_line();
    env.cmd(["drain"])
        .env("SERVERSYNC__BOGUS__X", "1")
        .output()
        .await
        .assert_fails_with(
            "unknown configuration key `bogus` (set by the environment variable \
             SERVERSYNC__BOGUS__X)",
        );
    // set but empty, or with the prefix in lower case, still named
    env.cmd(["drain"])
        .env("SERVERSYNC__INGEST__TIMEOUT", "")
        .output()
        .await
        .assert_fails_with("(set by the environment variable SERVERSYNC__INGEST__TIMEOUT)");
    env.cmd(["drain"])
        .env("serversync__ingest__timeout", "soon")
        .output()
        .await
        .assert_fails_with("(set by the environment variable serversync__ingest__timeout)");
    // a flag's value is the one in effect, whatever the file or the environment
    // says for its key, even a value of the wrong type
    env.config.set("dispatch.batch_size", "abc");
    env.run(&["--batch-size", "5", "drain", "--migrate"])
        .await
        .assert_success();
    env.config.remove("dispatch.batch_size");
    env.cmd(["--concurrency", "2", "drain"])
        .env("SERVERSYNC__DISPATCH__CONCURRENCY", "many")
        .output()
        .await
        .assert_success();
}

/// A config file that cannot be reached is an error saying why, also at the default
/// path (not a reason to run on the defaults); `/dev/zero` given by mistake is
/// refused by its size instead of filling the memory; a FIFO nobody writes to reads
/// as empty at once instead of hanging; a pipe (`--config <(…)`) is read.
#[tokio::test]
async fn config_files_that_are_no_files_are_refused_or_read_without_hanging() {
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    let dir = env.work_dir();
    let lp = dir.join("loop");
    std::os::unix::fs::symlink(&lp, &lp).expect("a link loop");
    serversync()
        .arg("--config")
        .arg(&lp)
        .arg("status")
        .output()
        .await
        .assert_fails_with("cannot read config file")
        .assert_single_stderr_line();
    let cwd = tempfile::tempdir().expect("a working directory");
    std::fs::create_dir(cwd.path().join("config")).expect("mkdir config");
    std::os::unix::fs::symlink("serversync.toml", cwd.path().join("config/serversync.toml"))
        .expect("a link loop at the default path");
    let url = format!("sqlite://{}", env.work_dir().join("none.db").display());
    serversync()
        .args(["--database-url", url.as_str(), "status"])
        .current_dir(cwd.path())
        .output()
        .await
        .assert_fails_with("cannot read config file config/serversync.toml")
        .assert_single_stderr_line();
    env.cmd(["status"]).output().await.assert_success();
    serversync()
        .args(["--config", "/dev/zero", "status"])
        .output()
        .await
        .assert_fails_with("cannot read config file /dev/zero: larger than 1048576 bytes")
        .assert_single_stderr_line();
    let fifo = dir.join("fifo.toml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let config = env.write_config();
    let out = serversync()
        .arg("--config")
        .arg(&fifo)
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.join("fifo.db").display()))
        .arg("status")
        .timeout(std::time::Duration::from_secs(20))
        .output()
        .await;
    out.assert_fails_with("the file does not exist; `serversync migrate` creates it");
    let piped = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} --config <(cat {}) status --json",
            env!("CARGO_BIN_EXE_serversync"),
            config.display()
        ))
        .output()
        .expect("bash");
    assert!(
        piped.status.success(),
        "{}",
        String::from_utf8_lossy(&piped.stderr)
    );
}

/// Output that cannot be written (a full disk: `status --json > out.json`) fails the
/// command with a line saying so, instead of exit 0 over an empty file. A closed pipe
/// (`status | head -1`) is not a failure.
#[tokio::test]
async fn output_that_cannot_be_written_fails_the_command() {
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    let config = env.write_config();
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .expect("/dev/full");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_serversync"))
        .arg("--config")
        .arg(&config)
        .args(["status", "--json"])
        .stdout(full)
        .output()
        .expect("run serversync");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: writing the output failed") && stderr.lines().count() == 1,
        "{stderr}"
    );

    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_serversync"))
        .arg("--config")
        .arg(&config)
        .arg("status")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run serversync");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(
        out.status.code(),
        Some(0),
        "a closed pipe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

both_stores!(a_bad_duration_names_its_key);
/// Not a duration, or one too long to mean anything (it would fail later, as an
/// interval the database cannot hold, and a drain would retry that forever).
async fn a_bad_duration_names_its_key(backend: Backend) {
    let mut env = TestEnv::new_on(backend).await;
    for key in ["ingest.timeout", "retry.base_delay", "shutdown.grace"] {
        env.config.set(key, "soon");
        env.run(&["drain"])
            .await
            .assert_fails_with(key)
            .assert_single_stderr_line();
        env.config.remove(key);
    }
    for key in ["dispatch.lease_duration", "retention.sent_ttl"] {
        env.config.set(key, "500000000y");
        env.run(&["drain"])
            .await
            .assert_fails_with(key)
            .assert_fails_with("longer than 100 years")
            .assert_single_stderr_line();
        env.config.remove(key);
    }
    // zero where it would make a busy loop, or fail every connection
    for key in [
        "database.acquire_timeout",
        "metrics.refresh_interval",
        "retention.prune_interval",
    ] {
        env.config.set(key, "0s");
        env.run(&["drain"])
            .await
            .assert_fails_with(key)
            .assert_fails_with("greater than zero")
            .assert_single_stderr_line();
        env.config.remove(key);
    }
    env.cmd(["drain"])
        .env("SERVERSYNC__DISPATCH__LEASE_DURATION", "500000000y")
        .output()
        .await
        .assert_fails_with("dispatch.lease_duration")
        .assert_single_stderr_line();
}

#[tokio::test]
async fn an_unreachable_database_fails_fast_with_one_line() {
    let mut env = TestEnv::new().await;
    env.config.set(
        "database.url",
        format!("postgres://postgres@127.0.0.1:{}/x", closed_port()),
    );
    let (drain, status) = tokio::join!(env.run(&["drain"]), env.run(&["status", "--json"]));
    for out in [drain, status] {
        out.assert_fails_with("database");
        assert!(
            out.elapsed < Duration::from_secs(20),
            "gave up only after {:?}\n{out}",
            out.elapsed
        );
        assert!(out.stdout.trim().is_empty(), "nothing on stdout\n{out}");
    }
}

#[tokio::test]
async fn a_missing_database_url_is_a_clear_error() {
    let mut env = TestEnv::new().await;
    env.config.remove("database.url");
    env.run(&["drain"])
        .await
        .assert_fails_with("database")
        .assert_single_stderr_line();
    env.run(&["status"])
        .await
        .assert_fails_with("database")
        .assert_single_stderr_line();
}

#[tokio::test]
async fn the_database_url_may_come_from_the_environment() {
    let mut env = TestEnv::new().await;
    env.config.remove("database.url");
    env.cmd(["migrate"])
        .env("DATABASE_URL", env.db.url())
        .output()
        .await
        .assert_success();
    env.cmd(["status", "--json"])
        .env("SERVERSYNC__DATABASE__URL", env.db.url())
        .output()
        .await
        .assert_success();
    env.cmd(["--database-url", env.db.url(), "status"])
        .output()
        .await
        .assert_success();
}

#[tokio::test]
async fn the_environment_overrides_the_config_file_and_flags_override_both() {
    let mut env = TestEnv::migrated().await;
    let nowhere = format!(
        "postgres://nobody@127.0.0.1:{}/nothing",
        crate::harness::closed_port()
    );
    env.config.set("database.url", nowhere.as_str());
    // file wrong, DATABASE_URL right
    env.cmd(["status", "--json"])
        .env("DATABASE_URL", env.db.url())
        .output()
        .await
        .assert_success();
    // SERVERSYNC__DATABASE__URL is the more specific variable and wins over DATABASE_URL
    env.cmd(["status", "--json"])
        .env("DATABASE_URL", nowhere.as_str())
        .env("SERVERSYNC__DATABASE__URL", env.db.url())
        .output()
        .await
        .assert_success();
    env.cmd(["status", "--json"])
        .env("DATABASE_URL", env.db.url())
        .env("SERVERSYNC__DATABASE__URL", nowhere.as_str())
        .output()
        .await
        .assert_fails_with("database");
    // the flag beats the environment
    env.cmd(["--database-url", env.db.url(), "status"])
        .env("DATABASE_URL", nowhere.as_str())
        .output()
        .await
        .assert_success();
}

both_stores!(drain_refuses_an_unmigrated_database);
async fn drain_refuses_an_unmigrated_database(backend: Backend) {
    let env = TestEnv::new_on(backend).await;
    env.run(&["drain"])
        .await
        .assert_fails_with("serversync migrate");
    let run = env
        .cmd(["run"])
        .timeout(Duration::from_secs(30))
        .output()
        .await;
    run.assert_fails_with("serversync migrate");
    let tables = env.db.table_count().await;
    assert_eq!(
        tables, 0,
        "refusing means not migrating behind the operator's back"
    );
}

#[tokio::test]
async fn only_commands_that_migrate_create_a_missing_sqlite_file() {
    let mut env = TestEnv::new().await;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("not-yet.db");
    env.config
        .set("database.url", format!("sqlite://{}", path.display()));
    let entity_id = uuid::Uuid::new_v4().to_string();
    let enqueue = [
        "enqueue",
        "--entity-type",
        "call_log",
        "--entity-id",
        &entity_id,
        "--payload",
        "{}",
    ];
    for args in [&["status"][..], &["dlq", "list"], &["drain"], &enqueue] {
        env.run(args)
            .await
            .assert_fails_with("serversync migrate")
            .assert_single_stderr_line()
            .assert_no_panic();
        assert!(!path.exists(), "{args:?} created {}", path.display());
    }
    env.run(&["migrate"]).await.assert_success();
    assert!(path.exists(), "migrate creates the file");
    env.run(&["status"]).await.assert_success();
}

both_stores!(migrate_is_idempotent);
async fn migrate_is_idempotent(backend: Backend) {
    let env = TestEnv::new_on(backend).await;
    env.migrate().await;
    env.migrate().await;
    let id = env
        .insert("call_log", Uuid::new_v4(), serde_json::json!({"n": 1}))
        .await;
    env.migrate().await;
    assert_eq!(
        env.outbox().await.len(),
        1,
        "migrating again keeps the data"
    );

    env.run(&["drain"]).await.assert_success();
    assert_eq!(env.sent_ids().await, [id]);
    env.run(&["drain", "--migrate"]).await.assert_success();
}

/// A migration that takes a while (a large outbox to rewrite, here a lock another
/// session holds on the migrations table for 1.5 s) says so in one line, with how
/// long it took, instead of sqlx's warning with the whole migration's SQL in it.
#[tokio::test]
async fn a_slow_migration_is_reported_in_one_line_without_its_sql() {
    let env = TestEnv::migrated().await;
    let holder = env.db.hold_lock("_sqlx_migrations").await;
    let release = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        holder.commit().await.expect("commit");
    };
    let (out, ()) = tokio::join!(env.run(&["migrate"]), release);
    out.assert_success();
    assert!(
        !out.stderr.contains("slow statement") && !out.stderr.contains("CREATE"),
        "no statement text in the logs\n{out}"
    );
    assert!(
        out.stdout
            .contains("migrations applied: the schema is current"),
        "{out}"
    );
    assert!(
        out.stderr.contains("the migrations took"),
        "how long it took is said\n{out}"
    );
}

/// The same on a SQLite file: another connection holds its write lock for 1.5 s,
/// so the migrations' first statement waits that long. It used to come out as
/// sqlx's warning with the statement's SQL in it.
#[tokio::test]
async fn a_slow_migration_of_a_sqlite_file_is_reported_in_one_line_without_its_sql() {
    use sqlx::Connection;
    let env = TestEnv::new_on(Backend::Sqlite).await;
    let mut holder = sqlx::SqliteConnection::connect(env.db.url())
        .await
        .expect("a connection to the file");
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut holder)
        .await
        .expect("the write lock");
    let release = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sqlx::query("COMMIT")
            .execute(&mut holder)
            .await
            .expect("commit");
    };
    let (out, ()) = tokio::join!(env.run(&["migrate"]), release);
    out.assert_success();
    assert!(
        !out.stderr.contains("slow statement") && !out.stderr.contains("CREATE"),
        "no statement text in the logs\n{out}"
    );
    assert!(out.stderr.contains("the migrations took"), "{out}");
    assert_eq!(
        env.run(&["status", "--json"]).await.assert_success().json()["pending"],
        0,
        "the schema is there"
    );
}

both_stores!(global_flags_may_follow_the_subcommand);
async fn global_flags_may_follow_the_subcommand(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let out = env
        .run(&[
            "status",
            "--json",
            "--log-level",
            "warn",
            "--log-format",
            "json",
        ])
        .await;
    out.assert_success();
    assert_eq!(out.json()["pending"], serde_json::json!(0));
}

#[tokio::test]
async fn bad_arguments_name_what_is_wrong_on_one_line() {
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    for (args, needles) in [
        (
            &["enqueue", "--entity-type", "call_log"][..],
            &["--entity-id", "--payload"][..],
        ),
        (&["dlq", "requeue"][..], &["--all"][..]),
        (
            &["drain", "--max-rows", "abc"][..],
            &["--max-rows", "abc"][..],
        ),
        (&["drain", "--bogus"][..], &["--bogus"][..]),
        (
            &["--batch-size", "-1", "status"][..],
            &["--batch-size", "-1"][..],
        ),
        (
            &["drain", "--max-rows", "-5"][..],
            &["--max-rows", "-5"][..],
        ),
        (&["drain", "--max-rows", "0"][..], &["--max-rows", "0"][..]),
        (
            &["dlq", "list", "--limit", "-1"][..],
            &["--limit", "-1"][..],
        ),
        (
            &["dlq", "purge", "--older-than", "500000000y"][..],
            &["--older-than", "longer than 100 years"][..],
        ),
        (&[][..], &["error: a command is required"][..]),
        (&["dlq"][..], &["error: a command is required"][..]),
    ] {
        let out = env.run(args).await;
        for needle in needles {
            out.assert_fails_with(needle);
        }
        out.assert_single_stderr_line();
    }
}

both_stores!(a_schema_newer_than_the_binary_is_refused_by_every_command_saying_so);
/// A database a newer serversync migrated (a rollback of the binary, a mixed fleet):
/// `migrate` has nothing to apply and says why in the words `status` and `drain`
/// use, instead of the migrator's "previously applied but is missing in the
/// resolved migrations".
async fn a_schema_newer_than_the_binary_is_refused_by_every_command_saying_so(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    let checksum = match backend {
        Backend::Postgres => "'\\x00'::bytea",
        Backend::Sqlite => "x'00'",
    };
    env.db
        .execute(&format!(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
             VALUES (20991231000000, 'from a newer serversync', true, {checksum}, 1)"
        ))
        .await;
    for command in [&["migrate"][..], &["status"], &["drain"]] {
        env.run(command)
            .await
            .assert_fails_with("schema is newer than this binary")
            .assert_fails_with("20991231000000")
            .assert_fails_with("upgrade serversync")
            .assert_single_stderr_line();
    }
}

#[tokio::test]
async fn check_reports_each_part_and_exits_1_when_one_is_wrong() {
    let mut env = TestEnv::new().await;

    let out = env.run(&["check"]).await;
    out.assert_code(1).assert_no_panic();
    assert!(
        out.stdout.contains("ok    database reachable")
            && out.stdout.contains("FAIL  schema outdated")
            && out.stdout.contains("serversync migrate"),
        "an unmigrated database is named, with what to run\n{out}"
    );
    assert_eq!(env.db.table_count().await, 0, "check never migrates");

    env.migrate().await;
    let out = env.run(&["check"]).await;
    out.assert_success();
    for line in [
        "ok    configuration",
        "ok    database reachable",
        "ok    schema current",
        "ok    ingest",
        "ok    recordings root",
    ] {
        assert!(out.stdout.contains(line), "missing {line:?}\n{out}");
    }
    // a recordings root that is a file, or is not there, is a warning naming it
    let file = env.work_dir().join("not-a-dir");
    std::fs::write(&file, "x").expect("write");
    for (root, says) in [
        (file.clone(), "is not a directory"),
        (file.join("gone"), "does not exist"),
    ] {
        env.config.set("storage.recordings_root", root.as_path());
        let out = env.run(&["check"]).await;
        out.assert_success();
        let line = format!("warn  recordings root {} {says}", root.display());
        assert!(out.stdout.contains(&line), "missing {line:?}\n{out}");
    }
    env.config
        .set("storage.recordings_root", env.root.as_path());

    env.config.set(
        "ingest.base_url",
        format!("http://127.0.0.1:{}", closed_port()),
    );
    let out = env.run(&["check"]).await;
    out.assert_code(1);
    assert!(
        out.stdout.contains("ok    schema current") && out.stdout.contains("FAIL  ingest"),
        "an unreachable sink fails the check, the rest still reported\n{out}"
    );

    env.config.set("ingest.tiemout", "1s");
    env.run(&["check"])
        .await
        .assert_fails_with("ingest.tiemout")
        .assert_single_stderr_line();
}

/// A relay started without its recordings root says so once, naming the key: a
/// mount missing used to show only as each recording's `file_missing`, retried
/// until dead. Not when no entity type is a file type (no recordings to read).
#[tokio::test]
async fn a_relay_started_without_its_recordings_root_says_so() {
    let mut env = TestEnv::migrated().await;
    let gone = env.work_dir().join("no-such-root");
    env.config.set("storage.recordings_root", gone.as_path());
    let out = env.drain().await;
    out.assert_success();
    let line = format!("storage.recordings_root {} does not exist", gone.display());
    assert!(out.stderr.contains(&line), "missing {line:?}\n{out}");

    env.config
        .set("dispatch.file_entity_types", [] as [&str; 0]);
    let out = env.drain().await;
    out.assert_success();
    assert!(!out.stderr.contains("recordings_root"), "{out}");
}

/// `check` sends the ingest API what the relay sends it when the outbox is empty
/// (an empty batch, with the token): a Frontend that fails, refuses the token or is
/// not at `ingest.base_url`'s path fails the check, naming what to look at. (It used
/// to `GET /` and call any answer, a 503 included, reachable.)
#[tokio::test]
async fn check_tries_the_ingest_api_itself() {
    let mut env = TestEnv::migrated_on(Backend::Sqlite).await;
    env.config.set("ingest.auth_token", "t0ken");
    let out = env.run(&["check"]).await;
    out.assert_success();
    assert!(out.stdout.contains("ok    ingest"), "{out}");
    let probe = env.sink.sync_requests();
    assert_eq!(probe.len(), 1, "{probe:#?}");
    assert_eq!(probe[0].entries().len(), 0, "an empty batch");
    assert_eq!(
        probe[0].headers.get("authorization"),
        Some("Bearer t0ken"),
        "with the token"
    );
    for (status, hint) in [
        (503, "failing"),
        (401, "ingest.auth_token"),
        (404, "ingest.base_url"),
    ] {
        env.sink.set_mode(crate::harness::Mode::Always(status));
        let out = env.run(&["check"]).await;
        out.assert_code(1);
        assert!(
            out.stdout.contains("FAIL  ingest") && out.stdout.contains(hint),
            "HTTP {status}\n{out}"
        );
    }
    // refusing the empty batch, or asking to slow down, it answers: a warning
    for (status, says) in [(422, "refused an empty batch"), (429, "asks to slow down")] {
        env.sink.set_mode(crate::harness::Mode::Always(status));
        let out = env.run(&["check"]).await;
        out.assert_success();
        assert!(
            out.stdout.contains("warn  ingest") && out.stdout.contains(says),
            "HTTP {status}\n{out}"
        );
    }
    assert_eq!(
        env.count("sync_outbox").await,
        0,
        "nothing enqueued or sent"
    );
}

/// Output that goes nowhere (`serversync status | head -1`, `drain 2>&1 | head`) must
/// neither panic a command nor hang a drain: a log line that panicked on a closed
/// stderr used to kill a worker mid-batch (its rows stayed leased, the drain waited for
/// it for ever) and the signal handler with it.
#[tokio::test]
async fn closed_output_pipes_neither_panic_nor_hang_a_drain() {
    let mut env = TestEnv::migrated().await;
    for _ in 0..15 {
        env.insert("call_log", Uuid::new_v4(), serde_json::json!({"n": 1}))
            .await;
    }
    env.config.set(
        "ingest.base_url",
        format!("http://127.0.0.1:{}", closed_port()),
    );
    for args in [
        ["--log-level", "debug", "drain"],
        ["--log-format", "json", "drain"],
    ] {
        let code = env
            .cmd(args)
            .timeout(Duration::from_secs(30))
            .output_to_closed_pipes()
            .await;
        assert_eq!(code, Some(3), "`{}`: rows left for retry", args.join(" "));
    }
    let leased: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM sync_outbox WHERE lease_until > now() OR last_error_type IS NULL",
    )
    .fetch_one(env.db.pg())
    .await
    .expect("count");
    assert_eq!(
        leased, 0,
        "the drains settled what they tried and left no lease"
    );
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["dlq", "list"],
        &["check"],
    ] {
        let code = env.cmd(args).output_to_closed_pipes().await;
        assert!(
            matches!(code, Some(0 | 1)),
            "`{}` exited with {code:?}",
            args.join(" ")
        );
    }
}

/// A JSON array in an environment variable is split on commas by the config loader
/// (`["call_log"` and `"recording"]`): taken as names, every row would be misrouted.
/// It is refused, naming the key; comma-separated names work.
#[tokio::test]
async fn a_json_array_in_an_environment_list_is_refused_naming_the_key() {
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    for (key, name) in [
        (
            "SERVERSYNC__DISPATCH__JSON_ENTITY_TYPES",
            "dispatch.json_entity_types",
        ),
        (
            "SERVERSYNC__DISPATCH__FILE_ENTITY_TYPES",
            "dispatch.file_entity_types",
        ),
    ] {
        let out = env
            .cmd(["drain"])
            .env(key, r#"["call_log","recording"]"#)
            .output()
            .await;
        out.assert_fails_with(name).assert_single_stderr_line();
    }
    env.cmd(["drain"])
        .env(
            "SERVERSYNC__DISPATCH__JSON_ENTITY_TYPES",
            "call_log,recording",
        )
        .output()
        .await
        .assert_success();
    // a type in both lists would go to the upload endpoint whatever JSON says
    env.cmd(["drain"])
        .env(
            "SERVERSYNC__DISPATCH__JSON_ENTITY_TYPES",
            "call_log,recording_file",
        )
        .output()
        .await
        .assert_fails_with(
            "invalid value for dispatch.json_entity_types: \"recording_file\" is in \
             dispatch.file_entity_types too",
        )
        .assert_single_stderr_line();
}

/// A wrong retry policy names the key and the policies there are, not a Rust type.
#[tokio::test]
async fn a_wrong_retry_policy_lists_the_right_ones() {
    let mut env = TestEnv::migrated_on(Backend::Sqlite).await;
    for key in ["retry.policy", "retry.overrides.call_log.policy"] {
        env.config.set(key, "linear");
        env.run(&["drain"])
            .await
            .assert_fails_with(key)
            .assert_fails_with("expected exponential, equal_jitter or fixed")
            .assert_single_stderr_line();
        env.config.remove(key);
    }
}

/// A number or a switch of the wrong kind is refused, naming the key, in the file and
/// in the environment: the config crate used to round `1.5` to 2 and read `"yes"` as
/// true without a word. The right kinds still load, also as environment strings.
#[tokio::test]
async fn numbers_and_switches_of_the_wrong_kind_are_refused_by_name() {
    let mut env = TestEnv::migrated_on(Backend::Sqlite).await;
    for (key, value) in [
        ("retry.max_attempts", "1.5"),
        ("retry.overrides.call_log.max_attempts", "2.5"),
        ("dispatch.batch_size", "-5"),
        ("dispatch.batches_per_settle", "0"),
        ("dispatch.max_batch_bytes", "100"),
        ("dispatch.max_batch_bytes", "\"1MiB\""),
        ("retention.delete_sent", "\"yes\""),
        ("dispatch.listen", "1"),
        ("database.synchronous_commit", "\"off\""),
    ] {
        env.config.set(key, TomlValue::raw(value));
        env.run(&["drain"])
            .await
            .assert_fails_with(key)
            .assert_single_stderr_line();
        env.config.remove(key);
    }
    for (var, value, key) in [
        (
            "SERVERSYNC__RETRY__MAX_ATTEMPTS",
            "1.5",
            "retry.max_attempts",
        ),
        (
            "SERVERSYNC__RETENTION__DELETE_SENT",
            "yes",
            "retention.delete_sent",
        ),
    ] {
        env.cmd(["drain"])
            .env(var, value)
            .output()
            .await
            .assert_fails_with(key)
            .assert_single_stderr_line();
    }
    let id = env
        .insert(
            "call_log",
            uuid::Uuid::new_v4(),
            serde_json::json!({"n": 1}),
        )
        .await;
    env.cmd(["drain"])
        .env("SERVERSYNC__RETRY__MAX_ATTEMPTS", "7")
        .env("SERVERSYNC__RETENTION__DELETE_SENT", "true")
        .env("SERVERSYNC__DATABASE__SYNCHRONOUS_COMMIT", "false")
        .output()
        .await
        .assert_success();
    // taken as written: delivered, and no record kept (SPEC 1.2, delete_sent)
    let delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(delivered, [id]);
    assert_eq!(env.count("sync_outbox").await, 0);
    assert_eq!(
        env.count("sync_outbox_sent").await,
        0,
        "delete_sent keeps no record"
    );
}

/// A `retry.max_attempts` (or an override's) below `dispatch.outage_threshold` lets an
/// outage dead-letter rows before it is recognised: the relay says so at start,
/// naming the keys, and says nothing with the defaults.
#[tokio::test]
async fn max_attempts_below_the_outage_threshold_is_warned_about_by_name() {
    let mut env = TestEnv::migrated_on(Backend::Sqlite).await;
    let quiet = env.drain().await;
    quiet.assert_success();
    assert!(
        !quiet.stderr.contains("outage_threshold"),
        "no warning with the defaults:\n{quiet}"
    );

    env.config
        .set("retry.max_attempts", 2)
        .set("retry.overrides.call_log.max_attempts", 1)
        .set("retry.overrides.recording.max_attempts", 5);
    let out = env.drain().await;
    out.assert_success();
    let warning = out
        .stderr_lines()
        .into_iter()
        .find(|l| l.contains("dispatch.outage_threshold = 3"))
        .unwrap_or_else(|| panic!("a warning naming the threshold:\n{out}"));
    assert!(warning.contains("retry.max_attempts = 2"), "{warning}");
    assert!(
        warning.contains("retry.overrides.call_log.max_attempts = 1"),
        "{warning}"
    );
    assert!(
        !warning.contains("recording"),
        "5 is not below 3: {warning}"
    );
}

/// Rows queued before the migration that hashes ordering keys (under the schema of
/// the releases before it) get their hash from it, and are delivered in key order.
#[tokio::test]
async fn rows_queued_before_the_key_hash_migration_keep_their_order() {
    let env = TestEnv::new().await;
    let before = tempfile::tempdir().expect("a temporary directory");
    let all = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
    for file in std::fs::read_dir(&all).expect("migrations/postgres") {
        let path = file.expect("a migration").path();
        let name = path.file_name().expect("a file name").to_owned();
        if name.to_string_lossy().as_ref() < "20261206000001" {
            std::fs::copy(&path, before.path().join(name)).expect("copy a migration");
        }
    }
    sqlx::migrate::Migrator::new(before.path())
        .await
        .expect("the migrations before the key hash")
        .run(env.db.pg())
        .await
        .expect("apply the migrations before the key hash");
    let mut ids = Vec::new();
    for _ in 0..2 {
        let call = Uuid::new_v4();
        ids.push(vec![
            env.insert("call_log", call, serde_json::json!({"id": call}))
                .await,
            env.insert(
                "recording",
                Uuid::new_v4(),
                serde_json::json!({"callLogId": call}),
            )
            .await,
        ]);
    }

    env.migrate().await;
    assert_eq!(
        env.db
            .scalar(
                "SELECT count(*) FROM sync_outbox WHERE ordering_key IS NOT NULL \
                 AND ordering_key_hash IS NOT DISTINCT FROM hashtextextended(ordering_key, 0)"
            )
            .await,
        4,
        "every queued row has its key's hash"
    );
    assert_eq!(
        env.db
            .scalar("SELECT count(*) FROM pg_class WHERE relname = 'sync_outbox_ordering_key_id'")
            .await,
        0,
        "the text key's index is gone"
    );

    env.run(&["drain"]).await.assert_success();
    let requests = env.sink.accepted_batches();
    for call in &ids {
        let first = requests.iter().position(|r| r.contains(&call[0]));
        let second = requests.iter().position(|r| r.contains(&call[1]));
        assert!(
            matches!((first, second), (Some(a), Some(b)) if a < b),
            "a call's log in an earlier request than its recording: {call:?} in {requests:?}"
        );
    }
}

/// An environment value is taken as written, whatever it looks like: a token `007`
/// is not the number 7, nor `1e3` a thousand (the config loader used to parse every
/// environment value as a number first, and the Frontend got `Bearer 7`).
#[tokio::test]
async fn environment_values_are_taken_as_written() {
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    let tokens = ["007", "1e3", "1.50", "true"];
    for token in tokens {
        env.insert("call_log", Uuid::new_v4(), serde_json::json!({"n": token}))
            .await;
        env.cmd(["drain"])
            .env("SERVERSYNC__INGEST__AUTH_TOKEN", token)
            .output()
            .await
            .assert_success();
    }
    let sent = env.sink.sync_authorizations();
    let expected: Vec<Option<String>> =
        tokens.iter().map(|t| Some(format!("Bearer {t}"))).collect();
    assert_eq!(sent, expected);
}

/// The environment overrides the config file for a secret given in the other form:
/// `…_FILE` in the environment beats the value written in the file (and the other
/// way round), where it used to be ignored or refused as "both set".
#[tokio::test]
async fn a_secret_in_the_environment_overrides_the_file_in_either_form() {
    let mut env = TestEnv::migrated_on(Backend::Postgres).await;
    let secrets = tempfile::tempdir().expect("a temporary directory");
    let url_file = secrets.path().join("database-url");
    std::fs::write(&url_file, format!("{}\n", env.db.url())).expect("write the url file");
    let token_file = secrets.path().join("token");
    std::fs::write(&token_file, "from-the-environment\n").expect("write the token file");
    let nowhere = format!("postgres://nobody@127.0.0.1:{}/nothing", closed_port());
    env.config
        .set("database.url", nowhere.as_str())
        .set("ingest.auth_token", "from-the-file");
    env.insert("call_log", Uuid::new_v4(), serde_json::json!({"n": 1}))
        .await;
    env.cmd(["drain"])
        .env("SERVERSYNC__DATABASE__URL_FILE", &url_file)
        .env("SERVERSYNC__INGEST__AUTH_TOKEN_FILE", &token_file)
        .output()
        .await
        .assert_success();
    // and a value in the environment beats a file named in the config file
    env.config
        .remove("database.url")
        .remove("ingest.auth_token")
        .set("database.url_file", nowhere.as_str())
        .set(
            "ingest.auth_token_file",
            token_file.to_string_lossy().as_ref(),
        );
    env.insert("call_log", Uuid::new_v4(), serde_json::json!({"n": 2}))
        .await;
    env.cmd(["drain"])
        .env("SERVERSYNC__DATABASE__URL", env.db.url())
        .env(
            "SERVERSYNC__INGEST__AUTH_TOKEN",
            "plain-from-the-environment",
        )
        .output()
        .await
        .assert_success();
    let sent = env.sink.sync_authorizations();
    assert_eq!(
        sent,
        [
            Some("Bearer from-the-environment".to_string()),
            Some("Bearer plain-from-the-environment".to_string())
        ]
    );
}

/// A drain that ends before its `--timeout` ends then: it neither waits for the
/// timer nor warns that the timeout was reached (it used to do both, for up to half
/// a second after the last row).
#[tokio::test]
async fn a_drain_that_ends_before_its_timeout_does_not_report_reaching_it() {
    let env = TestEnv::migrated_on(Backend::Sqlite).await;
    env.insert("call_log", Uuid::new_v4(), serde_json::json!({"n": 1}))
        .await;
    // The timer fires 400 ms after the start: before the fix, a drain that was done
    // sooner still waited up to 500 ms for it, and it fired in that wait.
    let mut finished_in_time = 0;
    for _ in 0..5 {
        let out = env.run(&["drain", "--timeout", "400ms"]).await;
        out.assert_no_panic();
        if out.code != Some(0) {
            continue; // a slow machine: the drain really was stopped by its timeout
        }
        finished_in_time += 1;
        assert!(
            !out.stderr.contains("timeout reached"),
            "a drain that was done reported its timeout\n{out}"
        );
        assert!(out.stdout.contains("drain: delivered"), "{out}");
    }
    assert!(finished_in_time > 0, "no drain finished within 400 ms");
    assert_eq!(env.sink.entries().len(), 1);
}

/// A drain whose `--timeout` comes while its last request is out waits for the
/// answer (within `shutdown.grace`) and settles it: everything due was delivered, so
/// it exits 0 instead of 3 "stopped before the outbox was empty". One cut short with
/// rows still due does exit 3, and says so.
#[tokio::test]
async fn a_drain_stopped_by_its_timeout_exits_3_only_if_rows_are_still_due() {
    let mut env = TestEnv::migrated().await;
    env.config
        .set("ingest.timeout", "10s")
        .set("dispatch.batch_size", 2)
        .set("dispatch.concurrency", 1);
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_millis(1500))));
    for n in 0..2 {
        env.insert("call_log", Uuid::new_v4(), serde_json::json!({"n": n}))
            .await;
    }
    let out = env.run(&["drain", "--timeout", "300ms"]).await;
    out.assert_code(0);
    assert!(out.stderr.contains("timeout reached"), "{out}");
    assert!(!out.stdout.contains("stopped before"), "{out}");
    assert_eq!(env.sink.entries().len(), 2);
    assert_eq!(env.count("sync_outbox").await, 0);

    for n in 0..4 {
        env.insert("call_log", Uuid::new_v4(), serde_json::json!({"n": n}))
            .await;
    }
    let out = env.run(&["drain", "--timeout", "300ms"]).await;
    out.assert_code(3);
    assert!(
        out.stdout.contains("stopped before the outbox was empty"),
        "{out}"
    );
    assert_eq!(
        env.count("sync_outbox").await,
        2,
        "the batch not claimed is left"
    );

    env.db.execute("DELETE FROM sync_outbox").await;
    let out = env.run(&["drain", "--timeout", "1ms"]).await;
    out.assert_code(0);
    assert!(
        !out.stdout.contains("stopped before"),
        "an empty outbox: {out}"
    );
}

/// Without a TTY a drain prints a progress line every 5 s. Rows out in requests are
/// work ahead, not nothing: a drain whose only batch is still at a slow sink used to
/// say "0/0 rows settled".
#[tokio::test]
async fn a_drain_progress_line_counts_the_rows_it_has_out() {
    let mut env = TestEnv::migrated().await;
    env.config.set("ingest.timeout", "30s");
    env.sink
        .set_mode(Mode::Reply(Reply::ok().delay(Duration::from_secs(7))));
    for n in 0..3 {
        env.insert("call_log", Uuid::new_v4(), serde_json::json!({"n": n}))
            .await;
    }
    let out = env.drain().await;
    out.assert_code(0);
    assert!(
        out.stderr.contains("drain: 0/3 rows settled"),
        "the line at 5 s counts the 3 rows out\n{out}"
    );
    assert!(
        out.stdout.contains("(0.4 rows/s)") || out.stdout.contains("(0.3 rows/s)"),
        "3 rows in 7 s are not 0 rows/s\n{out}"
    );
    assert_eq!(env.sink.entries().len(), 3);
}
