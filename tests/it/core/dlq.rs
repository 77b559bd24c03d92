//! `serversync dlq`: list, show, requeue, purge.

use serde_json::{json, Value};
use uuid::Uuid;

use super::file_payload;
use crate::harness::sink::Incoming;
use crate::harness::{both_stores, Backend, Mode, NewRow, Reply, TestEnv};

/// Dead-letter `n` rows of type `fax` as `unknown_entity_type` (no HTTP involved);
/// returns their outbox ids. Leaves `fax` outside the allow-list.
async fn dead_faxes(env: &mut TestEnv, n: usize) -> Vec<i64> {
    env.config.set("dispatch.json_entity_types", ["call_log"]);
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(env.insert("fax", Uuid::new_v4(), json!({"page": i})).await);
    }
    env.drain().await.assert_code(3);
    assert_eq!(env.count("sync_outbox_dead_letters").await, n as i64);
    ids
}

/// A `path_denied` dead letter; returns its outbox id.
async fn dead_path(env: &TestEnv) -> i64 {
    let id = env
        .insert(
            "recording_file",
            Uuid::new_v4(),
            file_payload(Uuid::new_v4(), "../x.wav"),
        )
        .await;
    env.drain().await.assert_code(3);
    id
}

async fn list(env: &TestEnv, extra: &[&str]) -> Vec<Value> {
    let mut args = vec!["dlq", "list", "--json"];
    args.extend_from_slice(extra);
    let out = env.run(&args).await;
    out.assert_success().assert_no_panic();
    match out.json() {
        Value::Array(items) => items,
        other => panic!("dlq list --json prints an array, not {other}"),
    }
}

/// The outbox ids `dlq list --json <extra…>` shows, in order.
async fn listed(env: &TestEnv, extra: &[&str]) -> Vec<i64> {
    list(env, extra)
        .await
        .iter()
        .map(|d| d["outboxId"].as_i64().expect("outboxId"))
        .collect()
}

/// Run `dlq requeue` with `args`; then the outbox holds the rows `back` (by outbox
/// id, in order) and the dead letters the rows `left`.
async fn requeue_moves(env: &TestEnv, args: &[&str], back: &[i64], left: &[i64]) {
    let mut command = vec!["dlq", "requeue"];
    command.extend_from_slice(args);
    env.run(&command).await.assert_success();
    let outbox: Vec<i64> = env.outbox().await.iter().map(|r| r.id).collect();
    assert_eq!(outbox, back, "back in the outbox after {args:?}");
    assert_eq!(dead_outbox_ids(env).await, left, "left dead after {args:?}");
}

/// Each command fails, without a panic.
async fn refused_all(env: &TestEnv, commands: &[&[&str]]) {
    for args in commands {
        let out = env.run(args).await;
        assert_ne!(out.code, Some(0), "{args:?} succeeded\n{out}");
        out.assert_no_panic();
    }
}

/// The outbox ids of the dead letters, in order.
async fn dead_outbox_ids(env: &TestEnv) -> Vec<i64> {
    env.dead_letters()
        .await
        .iter()
        .map(|d| d.outbox_id)
        .collect()
}

both_stores!(requeue_by_id_puts_the_row_back_and_the_next_drain_delivers_it);
async fn requeue_by_id_puts_the_row_back_and_the_next_drain_delivers_it(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let outbox_id = dead_faxes(&mut env, 1).await[0];
    let id = env.dead_letter_id(outbox_id).await;
    let first_attempt_at = env.dead_letters().await[0].first_attempt_at;
    assert!(first_attempt_at.is_some());

    env.run(&["dlq", "requeue", &id.to_string()])
        .await
        .assert_success()
        .assert_no_panic();

    let rows = env.outbox().await;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].id, outbox_id, "the same outbox id comes back");
    assert_eq!(rows[0].attempts, 0, "attempts reset");
    assert_eq!(rows[0].status, "pending");
    assert_eq!(rows[0].payload, json!({"page": 0}));
    let history = rows[0]
        .attempt_errors
        .as_array()
        .unwrap_or_else(|| panic!("attempt_errors is an array: {:#?}", rows[0]));
    assert_eq!(
        history.len(),
        1,
        "the dead letter's history, nothing added: {history:#?}"
    );
    assert_eq!(history[0]["attempt"], 1, "{history:#?}");
    assert_eq!(
        history[0]["errorType"], "unknown_entity_type",
        "{history:#?}"
    );
    let requeued_at = history[0]["requeuedAt"]
        .as_str()
        .unwrap_or_else(|| panic!("the last attempt carries requeuedAt: {history:#?}"));
    super::parse_time(requeued_at);
    // written as the attempts' `at` are, on both stores: UTC, milliseconds, `Z`
    let shape = |t: &str| {
        t.chars()
            .map(|c| if c.is_ascii_digit() { '0' } else { c })
            .collect::<String>()
    };
    assert_eq!(
        shape(requeued_at),
        "0000-00-00T00:00:00.000Z",
        "{history:#?}"
    );
    assert_eq!(
        shape(history[0]["at"].as_str().unwrap_or_default()),
        "0000-00-00T00:00:00.000Z"
    );
    assert_eq!(
        rows[0].first_attempt_at, first_attempt_at,
        "the history goes on, and so does its first attempt"
    );
    assert!(rows[0].next_attempt_at <= env.db_now().await, "due at once");
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);

    env.config.remove("dispatch.json_entity_types");
    env.drain().await.assert_success();
    let delivered: Vec<i64> = env.sink.entries().iter().map(|e| e.outbox_id).collect();
    assert_eq!(delivered, [outbox_id]);
    assert_eq!(env.sent_ids().await, [outbox_id]);
}

both_stores!(requeue_by_error_type_moves_only_that_type);
async fn requeue_by_error_type_moves_only_that_type(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let faxes = dead_faxes(&mut env, 2).await;
    let denied = dead_path(&env).await;

    requeue_moves(
        &env,
        &["--error-type", "unknown_entity_type"],
        &faxes,
        &[denied],
    )
    .await;
}

both_stores!(requeue_by_http_status_moves_only_the_rows_that_answer_had);
/// A Frontend that refused two rows with 401 (say, a token it had revoked) and one
/// with 422: `dlq list --http-status 401` shows the two, and `dlq requeue --error-type
/// http_4xx --http-status 401` brings back only them, which the next drain delivers;
/// the 422 stays dead. Selectors that make no sense together, or no status, fail.
async fn requeue_by_http_status_moves_only_the_rows_that_answer_had(backend: Backend) {
    let env = TestEnv::migrated_on(backend).await;
    env.sink.set_mode(Mode::custom(|incoming| match incoming {
        Incoming::Sync(req) if req.entries().iter().any(|e| e.payload["auth"] == true) => {
            Reply::status(401)
        }
        Incoming::Sync(req) if req.entries().iter().any(|e| e.payload["bad"] == true) => {
            Reply::status(422)
        }
        _ => Reply::ok(),
    }));
    let mut refused = Vec::new();
    for n in 0..2 {
        refused.push(
            env.insert("call_log", Uuid::new_v4(), json!({"auth": true, "n": n}))
                .await,
        );
    }
    let bad = env
        .insert("call_log", Uuid::new_v4(), json!({"bad": true}))
        .await;
    env.drain().await.assert_code(3);
    assert_eq!(env.count("sync_outbox_dead_letters").await, 3);

    assert_eq!(listed(&env, &["--http-status", "401"]).await, refused);
    refused_all(
        &env,
        &[
            &["dlq", "requeue", "--all", "--http-status", "401"],
            &["dlq", "requeue", "1", "--http-status", "401"],
            &["dlq", "requeue", "--http-status", "99"],
            &["dlq", "list", "--http-status", "four-oh-one"],
        ],
    )
    .await;
    assert_eq!(
        env.count("sync_outbox_dead_letters").await,
        3,
        "nothing moved"
    );

    let both = ["--error-type", "http_4xx", "--http-status", "401"];
    requeue_moves(&env, &both, &refused, &[bad]).await;

    env.sink.set_mode(Mode::Accept);
    env.drain().await.assert_code(0);
    assert_eq!(env.sent_ids().await, refused);
}

both_stores!(requeue_all_empties_the_dead_letters);
async fn requeue_all_empties_the_dead_letters(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let mut ids = dead_faxes(&mut env, 2).await;
    ids.push(dead_path(&env).await);

    requeue_moves(&env, &["--all"], &ids, &[]).await;
}

both_stores!(a_requeue_whose_id_is_taken_in_the_outbox_says_so_and_moves_nothing);
/// A dead letter whose outbox id a row in `sync_outbox` has already (inserted with
/// that id, or the sequence set back): `dlq requeue` moves nothing, exits 1, and says
/// why in one line, not only the database's duplicate key error.
async fn a_requeue_whose_id_is_taken_in_the_outbox_says_so_and_moves_nothing(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let ids = dead_faxes(&mut env, 2).await;
    env.db
        .execute(&format!(
            "INSERT INTO sync_outbox (id, entity_type, entity_id, payload) \
             VALUES ({}, 'call_log', '{}', '{{}}')",
            ids[1],
            Uuid::new_v4()
        ))
        .await;
    let out = env.run(&["dlq", "requeue", "--all"]).await;
    out.assert_code(1).assert_no_panic();
    let said: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(said.len(), 1, "{out}");
    assert!(said[0].contains("nothing was requeued"), "{out}");
    assert!(said[0].contains("in sync_outbox already"), "{out}");
    assert_eq!(dead_outbox_ids(&env).await, ids, "both still dead letters");
}

both_stores!(a_requeued_row_goes_before_the_later_rows_of_its_key);
/// `dlq requeue` puts a row back under its original id, older than the rows its key
/// got while it was dead: it is the key's head again, and they wait for it.
async fn a_requeued_row_goes_before_the_later_rows_of_its_key(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let key = "call-7";
    let dead = dead_row_of_key(&mut env, key).await;
    // the key's later row, queued while its older row is dead: nothing holds it back
    // yet, so this drain would deliver it; leave it queued behind the requeue instead
    let later = env
        .insert_rows(&[NewRow::new("call_log", Uuid::new_v4(), json!({"n": 2})).keyed(key)])
        .await[0];
    assert!(dead < later);
    requeue_and_drain(&mut env, dead).await;
    let requests = env.sink.accepted_batches();
    assert_eq!(
        requests,
        [vec![dead], vec![later]],
        "the requeued row first, alone, then the later row of its key"
    );
}

both_stores!(a_requeued_row_goes_before_a_later_row_whose_predecessor_went_meanwhile);
/// The same when the rows queued behind the dead one were written together and the
/// first of them was delivered while it was dead: the second waits for the requeued
/// row too.
async fn a_requeued_row_goes_before_a_later_row_whose_predecessor_went_meanwhile(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let key = "call-8";
    let dead = dead_row_of_key(&mut env, key).await;
    // a call's two rows, written together while the older row is dead
    let later = env
        .insert_rows(&[
            NewRow::new("call_log", Uuid::new_v4(), json!({"n": 2})).keyed(key),
            NewRow::new("call_log", Uuid::new_v4(), json!({"n": 3})).keyed(key),
        ])
        .await;
    env.run(&["drain", "--max-rows", "1"])
        .await
        .assert_success();
    assert_eq!(env.sink.accepted_batches(), [vec![later[0]]]);

    requeue_and_drain(&mut env, dead).await;
    assert_eq!(
        env.sink.accepted_batches(),
        [vec![later[0]], vec![dead], vec![later[1]]],
        "the requeued row, alone, before the key's row still queued"
    );
}

/// A row of ordering key `key` dead-lettered by a drain (an entity type outside
/// `dispatch.json_entity_types`, which stays set to `call_log` until the test removes
/// it); returns its outbox id.
async fn dead_row_of_key(env: &mut TestEnv, key: &str) -> i64 {
    env.config.set("dispatch.json_entity_types", ["call_log"]);
    let dead = env
        .insert_rows(&[NewRow::new("fax", Uuid::new_v4(), json!({"page": 1})).keyed(key)])
        .await[0];
    env.drain().await.assert_code(3);
    assert_eq!(env.count("sync_outbox_dead_letters").await, 1);
    dead
}

/// Put the row `dead_row_of_key` made back with `dlq requeue ID`, let every entity
/// type through again, and drain.
async fn requeue_and_drain(env: &mut TestEnv, dead: i64) {
    let id = env.dead_letter_id(dead).await;
    env.run(&["dlq", "requeue", &id.to_string()])
        .await
        .assert_success();
    env.config.remove("dispatch.json_entity_types");
    env.drain().await.assert_success();
}

both_stores!(purge_deletes_by_id_by_age_and_all);
async fn purge_deletes_by_id_by_age_and_all(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let ids = dead_faxes(&mut env, 3).await;
    let first = env.dead_letter_id(ids[0]).await;

    env.run(&["dlq", "purge", "--older-than", "1h"])
        .await
        .assert_success();
    assert_eq!(
        env.count("sync_outbox_dead_letters").await,
        3,
        "nothing is an hour old"
    );

    env.run(&["dlq", "purge", &first.to_string()])
        .await
        .assert_success();
    // a second time: nothing left to do, said on stderr, still a success (SPEC §5)
    let again = env.run(&["dlq", "purge", &first.to_string()]).await;
    again.assert_success();
    assert!(
        again
            .stderr
            .contains("1 of the 1 id(s) given named no dead letter"),
        "{}",
        again.stderr
    );
    // an error type that does not exist is a mistake, not an empty selection
    env.run(&["dlq", "requeue", "--error-type", "http_4x"])
        .await
        .assert_fails_with("one of: timeout, connect, http_5xx");
    env.run(&["dlq", "list", "--error-type", "bogus"])
        .await
        .assert_fails_with("no such error type");
    assert_eq!(dead_outbox_ids(&env).await, &ids[1..]);

    let two_hours_ago = env.db.now_plus(-2 * 3600);
    env.db
        .execute(&format!(
            "UPDATE sync_outbox_dead_letters SET dead_at = {two_hours_ago} WHERE outbox_id = {}",
            ids[1]
        ))
        .await;
    env.run(&["dlq", "purge", "--older-than", "1h"])
        .await
        .assert_success();
    assert_eq!(dead_outbox_ids(&env).await, &ids[2..]);

    env.run(&["dlq", "purge", "--all"]).await.assert_success();
    assert_eq!(env.count("sync_outbox_dead_letters").await, 0);
    assert_eq!(
        env.count("sync_outbox").await,
        0,
        "purged rows do not come back"
    );
}

both_stores!(purge_by_error_type_and_age_deletes_only_what_matches_all);
/// `dlq purge --error-type T [--http-status N] [--older-than DUR]` deletes the dead
/// letters that match every filter given; ids and `--all` go with none of them.
async fn purge_by_error_type_and_age_deletes_only_what_matches_all(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let faxes = dead_faxes(&mut env, 2).await;
    let denied = dead_path(&env).await;
    let two_hours_ago = env.db.now_plus(-2 * 3600);
    env.db
        .execute(&format!(
            "UPDATE sync_outbox_dead_letters SET dead_at = {two_hours_ago} \
             WHERE outbox_id IN ({}, {denied})",
            faxes[0]
        ))
        .await;

    refused_all(
        &env,
        &[
            &["dlq", "purge", "--all", "--error-type", "path_denied"],
            &["dlq", "purge", "1", "--older-than", "1h"],
            &["dlq", "purge", "--http-status", "99"],
            &["dlq", "purge", "--error-type", "bogus"],
        ],
    )
    .await;
    assert_eq!(
        dead_outbox_ids(&env).await,
        [faxes[0], faxes[1], denied],
        "nothing purged"
    );

    // `dlq list` with the same filters shows what that purge will delete
    let filters = ["--error-type", "unknown_entity_type", "--older-than", "1h"];
    assert_eq!(listed(&env, &filters).await, [faxes[0]]);
    assert_eq!(
        listed(&env, &["--older-than", "1h"]).await,
        [faxes[0], denied]
    );

    let purge = [&["dlq", "purge"][..], &filters].concat();
    env.run(&purge).await.assert_success();
    assert_eq!(
        dead_outbox_ids(&env).await,
        [faxes[1], denied],
        "only the old one of that type"
    );

    // none of them had an HTTP answer
    env.run(&["dlq", "purge", "--http-status", "401"])
        .await
        .assert_success();
    assert_eq!(dead_outbox_ids(&env).await, [faxes[1], denied]);

    env.run(&["dlq", "purge", "--error-type", "path_denied"])
        .await
        .assert_success();
    assert_eq!(dead_outbox_ids(&env).await, [faxes[1]]);
}

/// `dlq list` shows `--limit` dead letters (100 by default), oldest first; when
/// more match it says so on stderr (the `--json` array stays whole and parseable).
#[tokio::test]
async fn list_says_when_its_limit_cut_it() {
    let mut env = TestEnv::migrated().await;
    let ids = dead_faxes(&mut env, 3).await;
    assert_eq!(listed(&env, &["--limit", "2"]).await, ids[..2]);
    let out = env.run(&["dlq", "list", "--json", "--limit", "2"]).await;
    out.assert_success();
    assert!(out.stderr.contains("the first 2 shown"), "{out}");
    let out = env.run(&["dlq", "list", "--limit", "2"]).await;
    out.assert_success();
    assert!(out.stderr.contains("the first 2 shown"), "{out}");
    for limit in ["3", "4"] {
        let out = env.run(&["dlq", "list", "--limit", limit]).await;
        out.assert_success();
        assert!(!out.stderr.contains("shown"), "all listed: {out}");
        assert_eq!(out.stdout.lines().count(), 4, "a header and 3 rows\n{out}");
    }
}

both_stores!(show_prints_one_dead_letter_and_fails_for_a_missing_id);
async fn show_prints_one_dead_letter_and_fails_for_a_missing_id(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let outbox_id = dead_faxes(&mut env, 1).await[0];
    let id = env.dead_letter_id(outbox_id).await;

    let out = env.run(&["dlq", "show", &id.to_string(), "--json"]).await;
    out.assert_success();
    let shown = out.json();
    assert_eq!(shown["id"], json!(id));
    assert_eq!(shown["outboxId"], json!(outbox_id));
    assert_eq!(shown["errorType"], "unknown_entity_type");
    assert_eq!(
        shown["attemptErrors"].as_array().map(Vec::len),
        Some(1),
        "{shown:#}"
    );

    let human = env.run(&["dlq", "show", &id.to_string()]).await;
    human.assert_success();
    assert!(human.stdout.contains("unknown_entity_type"), "{human}");
    let dead_since = human
        .stdout
        .lines()
        .find(|l| l.starts_with("dead since:"))
        .unwrap_or_default();
    assert!(
        dead_since.ends_with('Z'),
        "UTC with a Z, as `dlq list` shows it: {human}"
    );

    env.run(&["dlq", "show", "999999"])
        .await
        .assert_fails_with("999999");
}

/// An entity type a producer wrote with terminal control sequences in it is shown
/// escaped by `dlq list` and `dlq show`, so that it cannot recolour, retitle or
/// clear the operator's terminal; `--json` keeps it as written (JSON escapes it).
#[tokio::test]
async fn list_and_show_escape_control_characters() {
    let mut env = TestEnv::migrated().await;
    env.config.set("dispatch.json_entity_types", ["call_log"]);
    let hostile = "fax\u{1b}[31mRED\u{1b}]0;TITLE\u{7}\u{202e}";
    let outbox_id = env.insert(hostile, Uuid::new_v4(), json!({"n": 1})).await;
    env.drain().await.assert_code(3);
    let id = env.dead_letter_id(outbox_id).await.to_string();
    for args in [vec!["dlq", "list"], vec!["dlq", "show", &id]] {
        let out = env.run(&args).await;
        out.assert_success();
        assert!(
            !out.stdout.contains(['\u{1b}', '\u{7}', '\u{202e}']),
            "{args:?} printed control characters\n{out}"
        );
        assert!(
            out.stdout
                .contains("fax\\u{1b}[31mRED\\u{1b}]0;TITLE\\u{7}\\u{202e}"),
            "{args:?} shows the type escaped\n{out}"
        );
    }
    let listed = list(&env, &[]).await;
    assert_eq!(listed[0]["entityType"], hostile);
}

both_stores!(list_json_has_the_columns_in_camel_case_and_filters);
async fn list_json_has_the_columns_in_camel_case_and_filters(backend: Backend) {
    let mut env = TestEnv::migrated_on(backend).await;
    let faxes = dead_faxes(&mut env, 2).await;
    let denied = dead_path(&env).await;

    let all = list(&env, &[]).await;
    assert_eq!(all.len(), 3);
    let keys = [
        "id",
        "outboxId",
        "entityType",
        "entityId",
        "payload",
        "orderingKey",
        "createdAt",
        "errorType",
        "httpStatus",
        "errorMessage",
        "responseBody",
        "attempts",
        "maxAttempts",
        "attemptErrors",
        "firstAttemptAt",
        "lastAttemptAt",
        "deadAt",
    ];
    for item in &all {
        for key in keys {
            assert!(item.get(key).is_some(), "`{key}` missing from {item:#}");
        }
    }
    let db = env.dead_letters().await;
    let fax = all
        .iter()
        .find(|i| i["outboxId"] == json!(faxes[0]))
        .expect("listed by outboxId");
    let row = db.iter().find(|d| d.outbox_id == faxes[0]).unwrap();
    assert_eq!(fax["id"], json!(row.id));
    assert_eq!(fax["entityType"], "fax");
    assert_eq!(fax["entityId"], json!(row.entity_id.to_string()));
    assert_eq!(fax["payload"], row.payload);
    assert_eq!(fax["errorType"], "unknown_entity_type");
    assert_eq!(fax["httpStatus"], Value::Null);
    assert_eq!(fax["attempts"], json!(row.attempts));
    assert_eq!(fax["maxAttempts"], json!(row.max_attempts));
    assert_eq!(fax["attemptErrors"], row.attempt_errors);
    for time_key in ["createdAt", "deadAt"] {
        super::parse_time(
            fax[time_key]
                .as_str()
                .unwrap_or_else(|| panic!("{time_key} is a string")),
        );
    }

    let by_type = list(&env, &["--error-type", "path_denied"]).await;
    assert_eq!(
        by_type
            .iter()
            .map(|i| i["outboxId"].clone())
            .collect::<Vec<_>>(),
        [json!(denied)]
    );
    assert_eq!(list(&env, &["--entity-type", "fax"]).await.len(), 2);
    assert_eq!(list(&env, &["--limit", "1"]).await.len(), 1);
    assert!(
        list(&env, &["--error-type", "http_5xx"]).await.is_empty(),
        "no match is an empty array"
    );
}
