//! Per-key rate limiting (`[rate_limit]`) as a client meets it: a burst passes, the next
//! request gets `429` with `Retry-After`, waiting that long is enough, other keys are not
//! affected, and with the default settings there is no limit at all. Each test runs on SQLite
//! and on PostgreSQL.

mod support;

use std::time::Duration;

use support::{Backend, Reply, Server, TestDb, both_backends, issue_key, staged_rows};

both_backends!(
    a_burst_passes_then_429_with_retry_after,
    other_keys_are_not_affected,
    off_by_default,
);

/// One token a second, three at once: the burst fits in any reasonable test timing, and
/// `Retry-After` right after it is exactly one second.
const LIMITED: &[(&str, &str)] = &[
    ("INTAKE__RATE_LIMIT__ENABLED", "true"),
    ("INTAKE__RATE_LIMIT__REQUESTS_PER_SEC", "1"),
    ("INTAKE__RATE_LIMIT__BURST", "3"),
];

const RECORD: &str = r#"{"id": 1, "keys": ["id"], "status": "new"}"#;

/// Asserts a rate-limit `429` in the API's error shape and returns its `Retry-After`.
#[track_caller]
fn assert_limited(reply: &Reply) -> u64 {
    let (message, reasons) = reply.assert_error(429);
    assert!(message.contains("rate limit"), "429 message: {message}");
    assert!(reasons.is_empty(), "{reasons:?}");
    let retry_after = reply
        .header("retry-after")
        .unwrap_or_else(|| panic!("a 429 must say when to retry: {:?}", reply.headers));
    let secs: u64 = retry_after
        .parse()
        .unwrap_or_else(|e| panic!("Retry-After must be whole seconds, got {retry_after:?}: {e}"));
    assert!(secs >= 1, "Retry-After must be at least 1, got {secs}");
    secs
}

fn a_burst_passes_then_429_with_retry_after(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, LIMITED);
    let (_, key) = issue_key(&db, 7, "limited");

    // Every authenticated route draws on the same allowance of the key.
    server.authenticate(7, &key).assert_status(200);
    assert_eq!(server.push(7, "orders", &key, RECORD).assert_created(), 1);
    server
        .push_sandbox(7, "orders", &key, RECORD)
        .assert_status(201);

    let refused = server.push(7, "orders", &key, RECORD);
    assert_eq!(assert_limited(&refused), 1, "one token a second");
    assert_limited(&server.get(&format!("/sandbox/v2/client/7/authenticate?apikey={key}")));
    assert_limited(&server.authenticate(7, &key));
    assert_eq!(staged_rows(&db).len(), 1, "a refused push stores nothing");

    // Waiting as long as Retry-After says is enough.
    std::thread::sleep(Duration::from_secs(assert_limited(
        &server.authenticate(7, &key),
    )));
    assert_eq!(server.push(7, "orders", &key, RECORD).assert_created(), 1);
    assert_eq!(staged_rows(&db).len(), 2);
}

fn other_keys_are_not_affected(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, LIMITED);
    let (_, busy) = issue_key(&db, 7, "busy");
    let (_, same_client) = issue_key(&db, 7, "same client, other key");
    let (_, other_client) = issue_key(&db, 8, "other client");

    for _ in 0..3 {
        server.authenticate(7, &busy).assert_status(200);
    }
    assert_limited(&server.authenticate(7, &busy));

    for (client, key) in [(7, &same_client), (8, &other_client)] {
        server.authenticate(client, key).assert_status(200);
        assert_eq!(
            server.push(client, "orders", key, RECORD).assert_created(),
            1
        );
        server
            .push_sandbox(client, "orders", key, RECORD)
            .assert_status(201);
    }
    assert_limited(&server.push(7, "orders", &busy, RECORD));
}

/// More requests than the default burst (100) and rate (50/s) would allow, without a `429`.
fn off_by_default(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, 7, "unlimited");
    for i in 0..200 {
        let reply = server.authenticate(7, &key);
        assert_eq!(reply.status, 200, "request {i}: {}", reply.text);
    }
    for _ in 0..5 {
        server.push(7, "orders", &key, RECORD).assert_created();
    }
}
