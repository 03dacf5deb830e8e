//! `intake-key-admin` as an operator uses it: issue, list and revoke keys, and see that no
//! secret or hash ever comes back out. Each test runs on SQLite and on PostgreSQL.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{
    Backend, Server, TestDb, both_backends, issue_key, key_admin, list_keys, revoke_key, secret_of,
};

both_backends!(
    list_shows_keys_and_revocations_but_never_secrets,
    revoking_is_idempotent_and_unknown_keys_fail,
    issue_refuses_client_ids_that_are_not_positive,
    issued_keys_work_and_their_last_use_is_recorded,
    key_admin_exits_cleanly_every_time,
    revoke_never_echoes_a_secret_pasted_by_mistake,
);

/// `list --json` (with extra arguments), parsed.
fn listed(db: &TestDb, args: &[&str]) -> Vec<Value> {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = list_keys(db, &all);
    out.assert_success();
    match serde_json::from_str(&out.stdout) {
        Ok(Value::Array(keys)) => keys,
        other => panic!(
            "list --json must print an array, got {other:?}: {}",
            out.stdout
        ),
    }
}

fn entry<'a>(keys: &'a [Value], key_id: &str) -> &'a Value {
    keys.iter()
        .find(|k| k["key_id"] == key_id)
        .unwrap_or_else(|| panic!("key {key_id} not listed: {keys:?}"))
}

fn list_shows_keys_and_revocations_but_never_secrets(backend: Backend) {
    let db = TestDb::new(backend);
    let (id_a, key_a) = issue_key(&db, 7, "shop frontend");
    let (id_b, key_b) = issue_key(&db, 7, "batch job");
    let (id_c, key_c) = issue_key(&db, 8, "other client");
    assert!(key_a.starts_with(&format!("intake_{id_a}_")));
    let revoked = revoke_key(&db, &id_b, "leaked in CI logs");
    revoked.assert_success();
    assert!(revoked.stdout.contains(&id_b), "{}", revoked.stdout);

    let keys = listed(&db, &[]);
    assert_eq!(keys.len(), 3, "{keys:?}");
    for key in &keys {
        let mut fields: Vec<&str> = key
            .as_object()
            .expect("each key is an object")
            .keys()
            .map(String::as_str)
            .collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            [
                "client_id",
                "created_at",
                "key_id",
                "label",
                "last_used_at",
                "revoked_at",
                "revoked_reason"
            ],
            "no secret or hash field: {key}"
        );
        assert!(key["created_at"].is_string(), "{key}");
    }
    let a = entry(&keys, &id_a);
    assert_eq!(a["client_id"], 7);
    assert_eq!(a["label"], "shop frontend");
    assert!(
        a["revoked_at"].is_null() && a["revoked_reason"].is_null(),
        "{a}"
    );
    let b = entry(&keys, &id_b);
    assert!(b["revoked_at"].is_string(), "{b}");
    assert_eq!(b["revoked_reason"], "leaked in CI logs");
    assert_eq!(entry(&keys, &id_c)["client_id"], 8);

    let only_7 = listed(&db, &["--client", "7"]);
    assert_eq!(only_7.len(), 2);
    assert!(only_7.iter().all(|k| k["client_id"] == 7), "{only_7:?}");

    // Neither the JSON nor the table ever shows a secret or a hash.
    let json = list_keys(&db, &["--json"]);
    let table = list_keys(&db, &[]);
    table.assert_success();
    assert!(table.stdout.contains(&id_a) && table.stdout.contains("leaked in CI logs"));
    for out in [&json, &table] {
        let everything = format!("{}{}", out.stdout, out.stderr);
        for key in [&key_a, &key_b, &key_c] {
            assert!(
                !everything.contains(secret_of(key)),
                "a secret was listed: {everything}"
            );
        }
        assert!(
            !everything.contains("$argon2"),
            "a hash was listed: {everything}"
        );
    }
}

fn revoking_is_idempotent_and_unknown_keys_fail(backend: Backend) {
    let db = TestDb::new(backend);
    let (key_id, _) = issue_key(&db, 3, "revoke me");

    let unknown = revoke_key(&db, "zzzzzzzzzzzz", "no such key");
    assert!(
        !unknown.status.success(),
        "revoking an unknown key id must fail"
    );
    assert!(
        unknown.stderr.contains("zzzzzzzzzzzz"),
        "{}",
        unknown.stderr
    );
    let not_an_id = revoke_key(&db, "Not-A-Key-Id", "typo");
    assert!(!not_an_id.status.success(), "a malformed key id must fail");

    revoke_key(&db, &key_id, "first reason").assert_success();
    // Revoking again succeeds and keeps the original record.
    revoke_key(&db, &key_id, "second reason").assert_success();
    let keys = listed(&db, &[]);
    assert_eq!(entry(&keys, &key_id)["revoked_reason"], "first reason");
    assert_eq!(keys.len(), 1, "failed revocations created nothing");
}

fn issue_refuses_client_ids_that_are_not_positive(backend: Backend) {
    let db = TestDb::new(backend);
    for client in ["0", "-3", "seven"] {
        let out = key_admin(&db, &["issue", "--client", client, "--json"]);
        assert!(!out.status.success(), "client {client} must be refused");
        assert!(
            !out.stdout.contains("intake_"),
            "no key printed: {}",
            out.stdout
        );
    }
    assert!(listed(&db, &[]).is_empty());
}

fn issued_keys_work_and_their_last_use_is_recorded(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[("INTAKE__AUTH__LAST_USED_FLUSH_SECS", "1")]);

    // Without --json the key is printed on a line of its own.
    let out = key_admin(&db, &["issue", "--client", "5", "--label", "plain text"]);
    out.assert_success();
    let key = out
        .stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("intake_"))
        .unwrap_or_else(|| panic!("no key printed: {}", out.stdout))
        .to_owned();
    let (unused_id, _) = issue_key(&db, 5, "never used");

    let keys = listed(&db, &[]);
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k["last_used_at"].is_null()), "{keys:?}");
    let used_id = keys
        .iter()
        .find(|k| k["label"] == "plain text")
        .and_then(|k| k["key_id"].as_str())
        .expect("the plain-text key is listed")
        .to_owned();
    assert!(key.starts_with(&format!("intake_{used_id}_")), "{key}");

    server.authenticate(5, &key).assert_status(200);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let keys = listed(&db, &[]);
        if entry(&keys, &used_id)["last_used_at"].is_string() {
            assert!(entry(&keys, &unused_id)["last_used_at"].is_null());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "last_used_at never recorded: {keys:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A script or cron job runs the CLI and trusts its exit status, so the CLI must never crash,
/// even on the way out. Run as shipped (default pool settings), many times, two at once.
fn key_admin_exits_cleanly_every_time(backend: Backend) {
    const THREADS: usize = 2;
    const RUNS_PER_THREAD: usize = 40;
    let db = TestDb::new(backend);
    let (key_id, _) = issue_key(&db, 4, "exit status");
    let commands: [&[&str]; 4] = [
        &["list", "--json"],
        &["list", "--client", "4"],
        &["revoke", &key_id, "--reason", "again and again"],
        &["revoke", "zzzzzzzzzzzz"],
    ];
    let crashes: Vec<String> = std::thread::scope(|scope| {
        let runners: Vec<_> = (0..THREADS)
            .map(|t| {
                let (db, commands) = (&db, &commands);
                scope.spawn(move || {
                    let mut crashes = Vec::new();
                    for run in 0..RUNS_PER_THREAD {
                        let args = commands[(t + run) % commands.len()];
                        let out = key_admin(db, args);
                        // An exit code (0, or 1 for the unknown key) is fine; a signal is not.
                        if out.status.code().is_none() {
                            crashes.push(format!("{args:?}: {}", out.status));
                        }
                    }
                    crashes
                })
            })
            .collect();
        runners
            .into_iter()
            .flat_map(|runner| runner.join().expect("a runner thread"))
            .collect()
    });
    assert!(
        crashes.is_empty(),
        "intake-key-admin was killed by a signal in {} of {} runs: {crashes:#?}",
        crashes.len(),
        THREADS * RUNS_PER_THREAD
    );
}

/// An operator who pastes the whole API key instead of its key id must not see the secret
/// printed back (into a terminal, a CI log): either the key is revoked, or the CLI refuses
/// without repeating it.
fn revoke_never_echoes_a_secret_pasted_by_mistake(backend: Backend) {
    let db = TestDb::new(backend);
    let (key_id, key) = issue_key(&db, 6, "pasted");
    let out = revoke_key(&db, &key, "leaked");
    let everything = format!("{}{}", out.stdout, out.stderr);
    assert!(
        !everything.contains(secret_of(&key)),
        "revoke printed the secret back (exit {}): {everything}",
        out.status
    );
    // Whatever it did, it must say truthfully whether the key is now revoked.
    let revoked = entry(&listed(&db, &[]), &key_id)["revoked_at"].is_string();
    assert_eq!(
        out.status.success(),
        revoked,
        "exit status and revocation disagree: {everything}"
    );
}
