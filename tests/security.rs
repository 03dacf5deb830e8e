//! What an API key can and cannot do, and where its secret may go. A revocation reaches every
//! server within the key cache TTL; a key pushes for its own client only and reads nothing
//! back; the secret is never printed, logged, answered or stored anywhere (only shown once by
//! `intake-key-admin issue`); an unusable key gets one and the same `401` whatever is wrong
//! with it; and key listings never show a hash. Each test runs on SQLite and on PostgreSQL.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::cluster::{
    database_dump, key_admin_with_env, loader_with_env, start_server_keeping_stdout,
};
use support::{
    Backend, CliOutput, Reply, Server, TestDb, both_backends, issue_key, list_keys, revoke_key,
    run_loader, secret_of, staged_rows, unknown_key, warehouse_tables,
};

both_backends!(
    revocation_reaches_every_server_within_the_ttl,
    a_key_pushes_for_its_own_client_and_reads_nothing_back,
    the_secret_never_appears_in_any_output_answer_log_or_table,
    unknown_wrong_and_revoked_keys_get_identical_401s,
    key_listings_never_show_a_hash_or_a_secret,
    a_key_pasted_into_the_path_is_neither_echoed_nor_stored,
);

const CLIENT: i64 = 51;
const OTHER_CLIENT: i64 = 52;
/// `auth.cache_ttl_secs` of the servers in these tests.
const TTL: Duration = Duration::from_secs(1);
const TTL_ENV: (&str, &str) = ("INTAKE__AUTH__CACHE_TTL_SECS", "1");
/// The most a revocation may take to reach a server: the TTL, plus time for the round trips.
const REVOKED_WITHIN: Duration = Duration::from_millis(2500);
/// Every process logs all it can.
const TRACE: (&str, &str) = ("RUST_LOG", "trace");

/// The same key with one character of its secret changed.
fn with_wrong_secret(api_key: &str) -> String {
    let (prefix, last) = api_key.split_at(api_key.len() - 1);
    format!("{prefix}{}", if last == "A" { "B" } else { "A" })
}

fn record(marker: &str) -> String {
    format!(r#"{{"id":"{marker}","keys":["id"],"note":"security test"}}"#)
}

/// Polls `server` with `key` until it answers 401, and returns how long after `since` that
/// was. Until then the key must keep working (200); fails the test after [`REVOKED_WITHIN`].
fn time_until_refused(server: &Server, key: &str, since: Instant, name: &str) -> Duration {
    loop {
        let reply = server.get_with(
            &format!("/v2/client/{CLIENT}/authenticate"),
            &[("X-Api-Key", key)],
        );
        let elapsed = since.elapsed();
        if reply.status == 401 {
            reply.assert_error(401);
            return elapsed;
        }
        reply.assert_status(200);
        assert!(
            elapsed < REVOKED_WITHIN,
            "server {name} still accepts the revoked key {elapsed:?} after revocation \
             (auth.cache_ttl_secs = {TTL:?})"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn revocation_reaches_every_server_within_the_ttl(backend: Backend) {
    let db = TestDb::new(backend);
    // Two servers on one database, as behind a load balancer; each has its own key cache.
    let servers = [
        Server::start(&db, &[TTL_ENV]),
        Server::start(&db, &[TTL_ENV]),
    ];
    let (key_id, key) = issue_key(&db, CLIENT, "shared by two servers");
    for (n, server) in servers.iter().enumerate() {
        server.authenticate(CLIENT, &key).assert_status(200);
        let body = record(&format!("before-{n}"));
        assert_eq!(server.push(CLIENT, "t", &key, &body).assert_created(), 1);
    }

    revoke_key(&db, &key_id, "rotated").assert_success();
    let revoked = Instant::now();
    // Both at once: each server is polled on its own thread from the same moment.
    let took: Vec<Duration> = std::thread::scope(|scope| {
        let polls: Vec<_> = servers
            .iter()
            .enumerate()
            .map(|(n, server)| {
                let key = &key;
                scope.spawn(move || time_until_refused(server, key, revoked, &n.to_string()))
            })
            .collect();
        polls
            .into_iter()
            .map(|p| p.join().expect("a polling thread"))
            .collect()
    });
    println!("revoked key refused by the two servers after {took:?}");

    // Refused for good, on every endpoint and with every key placement; nothing stored.
    for server in &servers {
        for _ in 0..3 {
            server.authenticate(CLIENT, &key).assert_error(401);
            server
                .push(CLIENT, "t", &key, &record("after"))
                .assert_error(401);
            server
                .request(
                    "POST",
                    &format!("/v2/client/{CLIENT}/table/t/data"),
                    &[
                        ("Content-Type", "application/json"),
                        ("Authorization", &format!("Bearer {key}")),
                    ],
                    Some(record("after").as_bytes()),
                )
                .assert_error(401);
            std::thread::sleep(TTL / 2);
        }
    }
    assert_eq!(
        staged_rows(&db).len(),
        2,
        "nothing was stored after revocation"
    );
}

fn a_key_pushes_for_its_own_client_and_reads_nothing_back(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "own client only");
    let (_, other_key) = issue_key(&db, OTHER_CLIENT, "the other client");
    let marker = "MARKER-7f3c2a-only-in-staging";

    // Its own client: pushed and stored, and the answer does not echo the record.
    let mut answers: Vec<(String, Reply)> = Vec::new();
    let pushed = server.push(CLIENT, "secrets", &key, &record(marker));
    assert_eq!(pushed.assert_created(), 1);
    answers.push(("push".into(), pushed));
    server
        .push(
            OTHER_CLIENT,
            "secrets",
            &other_key,
            &record("other-client-data"),
        )
        .assert_created();

    // Another client's id, in every spelling, on every endpoint: 403 and nothing stored.
    for cid in [
        OTHER_CLIENT.to_string(),
        format!("+{CLIENT}"),
        format!("0{CLIENT}"),
        "0".to_owned(),
        "-1".to_owned(),
    ] {
        let data = format!("/v2/client/{cid}/table/secrets/data");
        for (what, reply) in [
            (
                "authenticate",
                server.get_with(
                    &format!("/v2/client/{cid}/authenticate"),
                    &[("X-Api-Key", &key)],
                ),
            ),
            (
                "push",
                server.request(
                    "POST",
                    &data,
                    &[("Content-Type", "application/json"), ("X-Api-Key", &key)],
                    Some(record(&format!("stolen-{cid}")).as_bytes()),
                ),
            ),
            (
                "sandbox push",
                server.request(
                    "POST",
                    &format!("/sandbox{data}"),
                    &[("Content-Type", "application/json"), ("X-Api-Key", &key)],
                    Some(record("sandboxed").as_bytes()),
                ),
            ),
        ] {
            let (message, _) = reply.assert_error(403);
            assert!(
                message.contains("not valid for the client id"),
                "{what} {cid}: {message}"
            );
            answers.push((format!("{what} as client {cid}"), reply));
        }
    }
    let stored = staged_rows(&db);
    assert_eq!(
        stored.len(),
        2,
        "only the two legitimate pushes: {stored:?}"
    );
    assert!(
        stored
            .iter()
            .all(|(_, _, _, record)| !record.contains("stolen")),
        "{stored:?}"
    );

    // Nothing reads data back: the data route knows only POST, and no other route exists.
    let auth_headers: [(&str, String); 3] = [
        ("X-Api-Key", key.clone()),
        ("Authorization", format!("Bearer {key}")),
        ("", String::new()), // the key in the query string instead
    ];
    let reads: Vec<(&str, String)> = vec![
        ("GET", format!("/v2/client/{CLIENT}/table/secrets/data")),
        ("HEAD", format!("/v2/client/{CLIENT}/table/secrets/data")),
        ("PUT", format!("/v2/client/{CLIENT}/table/secrets/data")),
        ("PATCH", format!("/v2/client/{CLIENT}/table/secrets/data")),
        ("DELETE", format!("/v2/client/{CLIENT}/table/secrets/data")),
        ("OPTIONS", format!("/v2/client/{CLIENT}/table/secrets/data")),
        (
            "GET",
            format!("/sandbox/v2/client/{CLIENT}/table/secrets/data"),
        ),
        ("POST", format!("/v2/client/{CLIENT}/authenticate")),
        ("GET", format!("/v2/client/{CLIENT}/table/secrets")),
        ("GET", format!("/v2/client/{CLIENT}/table/secrets/data/1")),
        ("GET", format!("/v2/client/{CLIENT}/table/secrets/records")),
        ("GET", format!("/v2/client/{CLIENT}/table/secrets/export")),
        ("GET", format!("/v2/client/{CLIENT}/table")),
        ("GET", format!("/v2/client/{CLIENT}/tables")),
        ("GET", format!("/v2/client/{CLIENT}/data")),
        ("GET", format!("/v2/client/{CLIENT}/keys")),
        ("GET", format!("/v2/client/{CLIENT}/export")),
        ("GET", format!("/v2/client/{CLIENT}")),
        ("GET", "/v2/client".to_owned()),
        ("GET", "/v2".to_owned()),
        ("GET", format!("/v2/client/{CLIENT}/staging")),
        ("GET", "/staged_records".to_owned()),
        ("GET", "/admin".to_owned()),
        ("GET", "/metrics".to_owned()),
        ("GET", "/debug".to_owned()),
    ];
    for (method, path) in &reads {
        for (header, value) in &auth_headers {
            let (target, headers): (String, Vec<(&str, &str)>) = if header.is_empty() {
                let sep = if path.contains('?') { '&' } else { '?' };
                (format!("{path}{sep}apikey={key}"), vec![])
            } else {
                (path.clone(), vec![(*header, value.as_str())])
            };
            let reply = server.request(method, &target, &headers, None);
            assert!(
                matches!(reply.status, 404 | 405),
                "{method} {path} with the key in {header:?}: {} {}",
                reply.status,
                reply.text
            );
            if *method != "HEAD" {
                reply.assert_error(reply.status);
            }
            answers.push((format!("{method} {path}"), reply));
        }
    }
    // The sanctioned read: authenticate says who the key is for, and nothing else.
    let who = server.authenticate(CLIENT, &key);
    who.assert_status(200);
    assert_eq!(
        who.json(),
        serde_json::json!({"client_id": CLIENT, "code": 200, "message": "authenticated"})
    );
    answers.push(("authenticate".into(), who));

    for (what, reply) in &answers {
        for text in [reply.text.as_str(), &headers_text(reply)] {
            for leaked in [marker, "other-client-data"] {
                assert!(
                    !text.contains(leaked),
                    "{what}: the answer carries stored data ({leaked}): {text}"
                );
            }
        }
    }
}

/// Status line and headers of an answer, one per line.
fn headers_text(reply: &Reply) -> String {
    let mut text = format!("HTTP {}\n", reply.status);
    for (name, value) in &reply.headers {
        text.push_str(&format!(
            "{name}: {}\n",
            String::from_utf8_lossy(value.as_bytes())
        ));
    }
    text
}

/// Everything a session showed anyone: each process's output, each HTTP answer.
#[derive(Default)]
struct Transcript {
    parts: Vec<(String, String)>,
}

impl Transcript {
    fn reply(&mut self, what: &str, reply: Reply) -> Reply {
        self.parts.push((
            format!("HTTP answer to {what}"),
            format!("{}{}", headers_text(&reply), reply.text),
        ));
        reply
    }

    fn cli(&mut self, what: &str, out: CliOutput) -> CliOutput {
        self.parts
            .push((format!("stdout of {what}"), out.stdout.clone()));
        self.parts
            .push((format!("stderr of {what}"), out.stderr.clone()));
        out
    }

    fn text(&mut self, what: &str, text: String) {
        self.parts.push((what.to_owned(), text));
    }

    /// Fails the test if any part contains `needle` (an ASCII secret), ignoring case so that a
    /// lower-cased copy counts too. The failure shows the line with the secret masked.
    #[track_caller]
    fn assert_absent(&self, needle: &str, name: &str) {
        let needle = needle.to_ascii_lowercase();
        for (what, text) in &self.parts {
            // ASCII lower-casing keeps every byte offset.
            if let Some(at) = text.to_ascii_lowercase().find(&needle) {
                let from = text[..at].rfind('\n').map_or(0, |i| i + 1);
                let to = text[at..].find('\n').map_or(text.len(), |i| at + i);
                panic!(
                    "{name} appears in {what}: {}[{name}]{}",
                    &text[from..at],
                    &text[at + needle.len()..to]
                );
            }
        }
    }
}

fn the_secret_never_appears_in_any_output_answer_log_or_table(backend: Backend) {
    let db = TestDb::new(backend);
    let stdout_file = db.dir().join("server.stdout");
    // The most verbose logging there is: the secret must not show even then.
    let server = start_server_keeping_stdout(&db, &[TTL_ENV, TRACE], &stdout_file);
    let mut seen = Transcript::default();

    // The one output allowed to show the key.
    let label = "secret-test";
    let issued = key_admin_with_env(
        &db,
        &[
            "issue",
            "--client",
            &CLIENT.to_string(),
            "--label",
            label,
            "--json",
        ],
        &[TRACE],
    );
    issued.assert_success();
    let issued: Value = serde_json::from_str(issued.stdout.trim()).expect("issue --json");
    let key = issued["api_key"].as_str().expect("the key").to_owned();
    let key_id = issued["key_id"].as_str().expect("the key id").to_owned();
    let secret = secret_of(&key).to_owned();
    let wrong_key = with_wrong_secret(&key);
    let wrong_secret = secret_of(&wrong_key).to_owned();

    for args in [
        &["list"][..],
        &["list", "--json"],
        &["list", "--client", &CLIENT.to_string()],
        &["list", "--client", &CLIENT.to_string(), "--json"],
    ] {
        let out = seen.cli(
            &format!("intake-key-admin {}", args.join(" ")),
            key_admin_with_env(&db, args, &[TRACE]),
        );
        out.assert_success();
        assert!(out.stdout.contains(&key_id), "{}", out.stdout);
    }

    let auth = format!("/v2/client/{CLIENT}/authenticate");
    let data = format!("/v2/client/{CLIENT}/table/orders/data");
    let json = ("Content-Type", "application/json");
    let bearer = format!("Bearer {key}");
    let wrong_bearer = format!("Bearer {wrong_key}");
    // Authenticate and push with every placement of the key.
    let placements: [(String, Vec<(&str, &str)>); 3] = [
        (format!("?apikey={key}"), vec![]),
        (String::new(), vec![("Authorization", bearer.as_str())]),
        (String::new(), vec![("X-Api-Key", key.as_str())]),
    ];
    for (n, (query, headers)) in placements.iter().enumerate() {
        seen.reply(
            "authenticate",
            server.get_with(&format!("{auth}{query}"), headers),
        )
        .assert_status(200);
        let mut with_json = headers.clone();
        with_json.push(json);
        let body = record(&format!("order-{n}"));
        for prefix in ["", "/sandbox"] {
            let reply = seen.reply(
                "push",
                server.request(
                    "POST",
                    &format!("{prefix}{data}{query}"),
                    &with_json,
                    Some(body.as_bytes()),
                ),
            );
            reply.assert_status(201);
        }
    }
    // A refused body, a wrong secret (each placement), another client, a key where it does
    // not belong.
    seen.reply(
        "invalid push",
        server.request(
            "POST",
            &data,
            &[json, ("X-Api-Key", &key)],
            Some(br#"[{"id":1}]"#),
        ),
    )
    .assert_error(400);
    for (what, reply) in [
        (
            "wrong secret in the query",
            server.get(&format!("{auth}?apikey={wrong_key}")),
        ),
        (
            "wrong secret as bearer",
            server.get_with(&auth, &[("Authorization", &wrong_bearer)]),
        ),
        (
            "wrong secret in X-Api-Key",
            server.request(
                "POST",
                &data,
                &[json, ("X-Api-Key", &wrong_key)],
                Some(record("nope").as_bytes()),
            ),
        ),
    ] {
        seen.reply(what, reply).assert_error(401);
    }
    seen.reply(
        "another client",
        server.request(
            "POST",
            &format!("/v2/client/{OTHER_CLIENT}/table/orders/data?apikey={key}"),
            &[json],
            Some(record("elsewhere").as_bytes()),
        ),
    )
    .assert_error(403);
    seen.reply(
        "key in another query parameter",
        server.get(&format!("{auth}?token={key}")),
    )
    .assert_error(401);
    seen.reply(
        "key in the client id",
        server.get_with(
            &format!("/v2/client/{key}/authenticate"),
            &[("X-Api-Key", &key)],
        ),
    )
    .assert_error(403);

    // Revoked: refused within the TTL.
    let revoked = seen.cli(
        "intake-key-admin revoke",
        key_admin_with_env(
            &db,
            &["revoke", &key_id, "--reason", "end of session"],
            &[TRACE],
        ),
    );
    revoked.assert_success();
    let deadline = Instant::now() + REVOKED_WITHIN;
    loop {
        let reply = seen.reply(
            "after revocation",
            server.get_with(&auth, &[("Authorization", &bearer)]),
        );
        if reply.status == 401 {
            break;
        }
        reply.assert_status(200);
        assert!(Instant::now() < deadline, "the revoked key still works");
        std::thread::sleep(Duration::from_millis(100));
    }
    let last = seen.reply(
        "push after revocation",
        server.push(CLIENT, "orders", &key, &record("late")),
    );
    last.assert_error(401);
    let last_request = last
        .header("x-request-id")
        .expect("answers carry a request id")
        .to_owned();
    for args in [&["list"][..], &["list", "--json"]] {
        seen.cli(
            &format!("intake-key-admin {}", args.join(" ")),
            key_admin_with_env(&db, args, &[TRACE]),
        )
        .assert_success();
    }
    seen.text("the database before loading", database_dump(&db));

    // The loader, in its ordinary modes.
    seen.cli(
        "intake-loader run",
        loader_with_env(&db, &["run"], &[TRACE]),
    )
    .assert_success();
    seen.cli(
        "intake-loader status --json",
        loader_with_env(&db, &["status", "--json"], &[TRACE]),
    )
    .assert_success();
    let after_load = database_dump(&db);
    assert!(
        after_load.contains(&key_id) && after_load.contains("order-2"),
        "the dump holds the keys and the loaded data"
    );
    seen.text("the database after loading", after_load);

    // Every line the server wrote, once the last request is logged.
    server.wait_for_log("for the last request", |line| {
        line.contains(&format!("request_id={last_request}"))
    });
    let log = server.logs().join("\n");
    assert!(
        log.contains("intake::access"),
        "the access log was captured"
    );
    drop(server);
    seen.text("the server's log (stderr)", log);
    seen.text(
        "the server's stdout",
        std::fs::read_to_string(&stdout_file).expect("reading the server's stdout"),
    );

    assert!(seen.parts.len() > 40, "the session was captured");
    seen.assert_absent(&secret, "the key's secret");
    seen.assert_absent(&wrong_secret, "a wrong secret that was tried");
}

/// Status, body and headers (but the request id, date and connection) of an answer.
type Refusal = (u16, String, Vec<String>);

/// The parts of a 401 that must not differ with the reason for it.
fn refusal(reply: &Reply) -> Refusal {
    reply.assert_error(401);
    let mut headers: Vec<String> = reply
        .headers
        .iter()
        // `connection: close` depends on whether the server had read the unread body by the
        // time it answered, which is a matter of timing, not of what was wrong with the key.
        .filter(|(name, _)| !matches!(name.as_str(), "x-request-id" | "date" | "connection"))
        .map(|(name, value)| format!("{name}: {}", String::from_utf8_lossy(value.as_bytes())))
        .collect();
    headers.sort();
    (reply.status, reply.text.clone(), headers)
}

fn unknown_wrong_and_revoked_keys_get_identical_401s(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[TTL_ENV]);
    let (_, key) = issue_key(&db, CLIENT, "good");
    let (revoked_id, revoked) = issue_key(&db, CLIENT, "to be revoked");
    server.authenticate(CLIENT, &revoked).assert_status(200);
    revoke_key(&db, &revoked_id, "gone").assert_success();
    let since = Instant::now();
    time_until_refused(&server, &revoked, since, "the only one");

    let cases = [
        ("unknown key id", unknown_key()),
        ("wrong secret", with_wrong_secret(&key)),
        ("revoked key", revoked.clone()),
        ("malformed key", "intake_short_secret".to_owned()),
        ("no key", String::new()),
    ];
    // endpoint -> [(what was wrong, the answer)]
    let mut seen: BTreeMap<&str, Vec<(&str, Refusal)>> = BTreeMap::new();
    for (what, bad) in &cases {
        let headers: Vec<(&str, &str)> = if bad.is_empty() {
            vec![]
        } else {
            vec![("X-Api-Key", bad.as_str())]
        };
        let mut with_json = headers.clone();
        with_json.push(("Content-Type", "application/json"));
        for (endpoint, reply) in [
            (
                "authenticate",
                server.get_with(&format!("/v2/client/{CLIENT}/authenticate"), &headers),
            ),
            (
                "push",
                server.request(
                    "POST",
                    &format!("/v2/client/{CLIENT}/table/t/data"),
                    &with_json,
                    Some(record("x").as_bytes()),
                ),
            ),
            (
                "push for another client",
                server.request(
                    "POST",
                    &format!("/v2/client/{OTHER_CLIENT}/table/t/data"),
                    &with_json,
                    Some(record("x").as_bytes()),
                ),
            ),
            (
                "sandbox push",
                server.request(
                    "POST",
                    &format!("/sandbox/v2/client/{CLIENT}/table/t/data"),
                    &with_json,
                    Some(record("x").as_bytes()),
                ),
            ),
        ] {
            seen.entry(endpoint)
                .or_default()
                .push((what, refusal(&reply)));
        }
        if !bad.is_empty() {
            let reply = server.authenticate(CLIENT, bad);
            seen.entry("authenticate, key in the query")
                .or_default()
                .push((what, refusal(&reply)));
        }
    }
    // On each endpoint, the answer is the same whatever was wrong with the key, and the body
    // is the same on every endpoint.
    let body = &seen["authenticate"][0].1.1;
    for (endpoint, answers) in &seen {
        let (first_what, first) = &answers[0];
        for (what, answer) in &answers[1..] {
            assert_eq!(
                answer, first,
                "{endpoint}: the 401 for {what} differs from the one for {first_what}"
            );
        }
        assert_eq!(&first.1, body, "{endpoint}: another 401 body");
    }
    // Nothing was stored by any of them.
    assert!(staged_rows(&db).is_empty());
}

fn key_listings_never_show_a_hash_or_a_secret(backend: Backend) {
    let db = TestDb::new(backend);
    let (id_a, key_a) = issue_key(&db, CLIENT, "listed a");
    let (id_b, key_b) = issue_key(&db, OTHER_CLIENT, "listed b");
    revoke_key(&db, &id_b, "for the listing").assert_success();
    // What is stored is a hash: the string we look for is the right one.
    assert!(database_dump(&db).contains("$argon2id$"));

    let client = CLIENT.to_string();
    for args in [
        &["list"][..],
        &["list", "--json"],
        &["list", "--client", &client],
        &["list", "--client", &client, "--json"],
    ] {
        let out = list_keys(&db, &args[1..]);
        out.assert_success();
        assert!(out.stdout.contains(&id_a), "{args:?}: {}", out.stdout);
        let everything = format!("{}{}", out.stdout, out.stderr);
        for forbidden in [
            "$argon2",
            "argon2",
            "secret_hash",
            secret_of(&key_a),
            secret_of(&key_b),
        ] {
            assert!(
                !everything.contains(forbidden),
                "{args:?} shows {forbidden:?}: {everything}"
            );
        }
    }
}

/// Pieces of a secret this long count as leaked (about 48 bits of it).
const FRAGMENT: usize = 8;

/// Whether `text` holds [`FRAGMENT`] characters in a row of `secret`, ignoring case (ASCII).
fn holds_secret_fragment(text: &str, secret: &str) -> bool {
    let text = text.to_ascii_lowercase();
    let secret = secret.to_ascii_lowercase();
    (0..=secret.len() - FRAGMENT).any(|start| text.contains(&secret[start..start + FRAGMENT]))
}

/// `text` with every character that belongs to a piece of `secret` (as found by
/// [`holds_secret_fragment`]) replaced by `*`, so that a failure message leaks nothing.
fn masked(text: &str, secret: &str) -> String {
    let lower = text.to_ascii_lowercase();
    let secret = secret.to_ascii_lowercase();
    let mut hidden = vec![false; text.len()];
    for start in 0..=secret.len() - FRAGMENT {
        let fragment = &secret[start..start + FRAGMENT];
        for (at, _) in lower.match_indices(fragment) {
            hidden[at..at + FRAGMENT].iter_mut().for_each(|h| *h = true);
        }
    }
    text.char_indices()
        .map(|(i, c)| if hidden[i] { '*' } else { c })
        .collect()
}

/// A client that pastes its key where the client id or the table name belongs (a
/// configuration slip) must not have the key, or a piece of it, echoed in answers, written to
/// logs, or stored as a name in staging or the warehouse, where analysts would read it. The
/// access log already redacts such keys; answers and the database must not undo that.
fn a_key_pasted_into_the_path_is_neither_echoed_nor_stored(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "pasted");
    let secret = secret_of(&key).to_owned();
    let json = ("Content-Type", "application/json");
    let mut leaks = Vec::new();
    let attempts = [
        (
            "key as the client id",
            server.get_with(
                &format!("/v2/client/{key}/authenticate"),
                &[("X-Api-Key", &key)],
            ),
        ),
        (
            "key as the client id of a push",
            server.request(
                "POST",
                &format!("/v2/client/{key}/table/t/data"),
                &[json, ("X-Api-Key", &key)],
                Some(record("a").as_bytes()),
            ),
        ),
        (
            "key as the table name",
            server.request(
                "POST",
                &format!("/v2/client/{CLIENT}/table/{key}/data"),
                &[json, ("X-Api-Key", &key)],
                Some(record("b").as_bytes()),
            ),
        ),
        (
            "key as the table name, and in the query",
            server.push(CLIENT, &key, &key, &record("c")),
        ),
    ];
    for (what, reply) in &attempts {
        assert!(
            matches!(reply.status, 201 | 400 | 403 | 404),
            "{what}: {} {}",
            reply.status,
            masked(&reply.text, &secret)
        );
        if holds_secret_fragment(&reply.text, &secret)
            || holds_secret_fragment(&headers_text(reply), &secret)
        {
            leaks.push(format!(
                "{what}: the answer ({}) echoes part of the secret: {}",
                reply.status,
                masked(&reply.text, &secret)
            ));
        }
    }
    let staged: Vec<String> = staged_rows(&db)
        .into_iter()
        .map(|(_, table, _, _)| table)
        .collect();
    run_loader(&db, &["run"]).assert_success();
    if holds_secret_fragment(&database_dump(&db), &secret) {
        leaks.push(format!(
            "part of the secret ({FRAGMENT} characters in a row, ignoring case) is stored in the \
             database; staged table names: {}; warehouse tables: {}",
            masked(&format!("{staged:?}"), &secret),
            masked(&format!("{:?}", warehouse_tables(&db, CLIENT)), &secret)
        ));
    }
    if let Some(line) = server
        .logs()
        .into_iter()
        .find(|line| holds_secret_fragment(line, &secret))
    {
        leaks.push(format!(
            "part of the secret is in the server's log: {}",
            masked(&line, &secret)
        ));
    }
    assert!(
        leaks.is_empty(),
        "a key pasted into the path leaks:\n{}",
        leaks.join("\n")
    );
}
