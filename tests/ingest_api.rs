//! The RJMetrics Import API v2 as a client sees it: status endpoints, authentication, pushing
//! records into staging, and every way a push can be refused. Each test runs on SQLite and on
//! PostgreSQL against the real `intake-server` binary.

mod support;

use std::io::Cursor;
use std::time::{Duration, Instant};

use serde_json::json;
use support::{
    Backend, Server, TestDb, both_backends, issue_key, revoke_key, staged_records, staged_rows,
    unknown_key,
};

both_backends!(
    status_endpoints_answer_ok,
    authenticate_accepts_only_a_valid_key_for_its_own_client,
    the_key_may_come_in_the_query_a_bearer_header_or_x_api_key,
    push_stores_records_byte_for_byte_in_order,
    clients_pushing_to_the_same_table_name_are_kept_apart,
    table_names_are_case_insensitive_and_validated,
    one_invalid_record_rejects_the_whole_request,
    malformed_bodies_are_refused_without_harm,
    nesting_deeper_than_the_configured_limit_is_refused,
    requests_over_the_limits_answer_413,
    content_type_must_be_json_when_given,
    unknown_routes_and_wrong_methods_answer_in_the_error_shape,
    sandbox_checks_everything_but_stores_nothing,
    a_revoked_key_is_refused_within_the_cache_ttl,
    guessing_secrets_does_not_lock_out_the_real_key,
);

const CLIENT: i64 = 42;

/// The same key with one character of its secret changed.
fn with_altered_secret(api_key: &str) -> String {
    let mut altered = api_key.to_owned();
    let last = altered.pop().expect("a key is not empty");
    altered.push(if last == 'A' { 'B' } else { 'A' });
    altered
}

fn status_endpoints_answer_ok(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);

    let root = server.get("/");
    root.assert_status(200);
    assert_eq!(root.json(), json!({"status": "ok"}));

    let health = server.get("/health");
    health.assert_status(200);
    assert_eq!(health.json()["status"], "ok");

    let ready = server.get("/ready");
    ready.assert_status(200);
    assert_eq!(ready.json()["status"], "ready");
}

fn authenticate_accepts_only_a_valid_key_for_its_own_client(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (key_id, key) = issue_key(&db, CLIENT, "web shop");
    let (old_id, old_key) = issue_key(&db, CLIENT, "old laptop");
    revoke_key(&db, &old_id, "laptop stolen").assert_success();
    let wrong_secret = with_altered_secret(&key);

    // A wrong secret before the right one was ever seen costs an argon2 check and fails...
    let wrong_first = server.authenticate(CLIENT, &wrong_secret);
    wrong_first.assert_error(401);
    // ...without locking out the real key.
    let ok = server.authenticate(CLIENT, &key);
    ok.assert_status(200);
    assert_eq!(ok.json()["code"], 200);
    assert_eq!(ok.json()["client_id"], CLIENT);
    // Once the right secret is cached, a wrong one is still refused.
    let wrong_later = server.authenticate(CLIENT, &wrong_secret);
    wrong_later.assert_error(401);

    let unknown = server.authenticate(CLIENT, &unknown_key());
    let revoked = server.authenticate(CLIENT, &old_key);
    for (what, reply) in [
        (
            "no key",
            server.get(&format!("/v2/client/{CLIENT}/authenticate")),
        ),
        (
            "an empty key",
            server.get(&format!("/v2/client/{CLIENT}/authenticate?apikey=")),
        ),
        ("a malformed key", server.authenticate(CLIENT, "not-a-key")),
        (
            "a truncated key",
            server.authenticate(CLIENT, &key[..key.len() - 1]),
        ),
        ("an unknown key id", unknown),
        ("a wrong secret", wrong_later),
        ("a revoked key", revoked),
    ] {
        let (message, reasons) = reply.assert_error(401);
        assert!(
            reasons.is_empty(),
            "{what}: a 401 gives no reasons: {reasons:?}"
        );
        assert!(
            !reply.text.contains(&key_id) && !reply.text.contains(&old_id),
            "{what}: a 401 must not echo the key: {message}"
        );
        // Nobody can tell an unknown key id from a wrong secret or a revoked key.
        assert_eq!(
            reply.text, wrong_first.text,
            "{what}: every 401 body is the same"
        );
    }

    // A valid key used for another client is forbidden, not unauthorized.
    let (_, other_key) = issue_key(&db, CLIENT + 1, "someone else");
    let (message, _) = server.authenticate(CLIENT, &other_key).assert_error(403);
    assert!(message.contains("not valid for the client id"), "{message}");
    server.authenticate(CLIENT + 1, &key).assert_error(403);
    server
        .get(&format!("/v2/client/abc/authenticate?apikey={key}"))
        .assert_error(403);
    server
        .authenticate(CLIENT + 1, &other_key)
        .assert_status(200);
    // Nothing above stored anything.
    assert!(staged_rows(&db).is_empty());
}

fn the_key_may_come_in_the_query_a_bearer_header_or_x_api_key(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "placements");
    let bearer = format!("Bearer {key}");
    let placements = [
        ("query", format!("?apikey={key}"), vec![]),
        (
            "bearer",
            String::new(),
            vec![("Authorization", bearer.as_str())],
        ),
        (
            "x-api-key",
            String::new(),
            vec![("X-Api-Key", key.as_str())],
        ),
    ];
    for (n, (placement, query, headers)) in placements.iter().enumerate() {
        let auth = server.get_with(&format!("/v2/client/{CLIENT}/authenticate{query}"), headers);
        auth.assert_status(200);
        assert_eq!(auth.json()["client_id"], CLIENT, "{placement}");

        let mut push_headers = headers.clone();
        push_headers.push(("Content-Type", "application/json"));
        let body = format!(r#"{{"id":{n},"keys":["id"],"via":"{placement}"}}"#);
        let pushed = server.request(
            "POST",
            &format!("/v2/client/{CLIENT}/table/events/data{query}"),
            &push_headers,
            Some(body.as_bytes()),
        );
        assert_eq!(pushed.assert_created(), 1, "{placement}");

        // The same placement with the wrong client or a wrong secret is refused.
        server
            .get_with(
                &format!("/v2/client/{}/authenticate{query}", CLIENT + 1),
                headers,
            )
            .assert_error(403);
    }
    let wrong = format!("Bearer {}", with_altered_secret(&key));
    server
        .get_with(
            &format!("/v2/client/{CLIENT}/authenticate"),
            &[("Authorization", &wrong)],
        )
        .assert_error(401);
    server
        .get_with(
            &format!("/v2/client/{CLIENT}/authenticate"),
            &[("Authorization", &format!("Basic {key}"))],
        )
        .assert_error(401);
    let stored = staged_records(&db, CLIENT, "events");
    assert_eq!(stored.len(), 3, "{stored:?}");
    for placement in ["query", "bearer", "x-api-key"] {
        assert!(
            stored
                .iter()
                .any(|r| r.contains(&format!("\"{placement}\""))),
            "{placement} push not stored: {stored:?}"
        );
    }
}

fn push_stores_records_byte_for_byte_in_order(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "shop");

    // One object on its own.
    let single = r#"{"id": 1, "keys": ["id"], "name": "Ada"}"#;
    let reply = server.push(CLIENT, "orders", &key, &format!("\n  {single}\t\n"));
    assert_eq!(reply.assert_created(), 1);
    assert_eq!(reply.json()["sandbox"], false);

    // An array whose records have odd whitespace, unicode, escapes and numbers that a parser
    // would rewrite (2.50, 1e3, a 23-digit integer): all must be kept exactly as sent.
    let odd = [
        "{ \"id\" :2 ,\n\t\"keys\":[ \"id\" ] , \"note\":\"  spaced  \" }",
        r#"{"id":3,"keys":["id"],"name":"Zoë 🚀 東京","esc":"q \" b \\ n \n t \t é \u00e9 \ud83d\ude80 \/"}"#,
        r#"{"id":-4,"keys":["id"],"nested":{"a":[1,2.50,1e3,{"b":null}]},"big":12345678901234567890123,"t":true}"#,
    ];
    let body = format!("[\n  {} ,{}\r\n,   {}  ]\n", odd[0], odd[1], odd[2]);
    assert_eq!(
        server.push(CLIENT, "orders", &key, &body).assert_created(),
        3
    );

    // A later request's records come after an earlier one's.
    let later = [
        r#"{"id":5,"keys":["id"]}"#,
        r#"{"id":1,"keys":["id"],"name":"Ada Lovelace"}"#,
    ];
    let body = format!("[{},{}]", later[0], later[1]);
    assert_eq!(
        server.push(CLIENT, "orders", &key, &body).assert_created(),
        2
    );

    let rows = staged_rows(&db);
    let expected: Vec<&str> = [single].iter().chain(&odd).chain(&later).copied().collect();
    let records: Vec<&str> = rows.iter().map(|(_, _, _, r)| r.as_str()).collect();
    assert_eq!(records, expected);
    for (client, table, _, _) in &rows {
        assert_eq!((*client, table.as_str()), (CLIENT, "orders"));
    }
    let seqs: Vec<i64> = rows.iter().map(|(_, _, seq, _)| *seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "seqs must increase in push order: {seqs:?}"
    );
}

fn clients_pushing_to_the_same_table_name_are_kept_apart(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key_a) = issue_key(&db, 1, "client one");
    let (_, key_b) = issue_key(&db, 2, "client two");
    let a = r#"{"id":1,"keys":["id"],"owner":"one"}"#;
    let b = r#"{"id":1,"keys":["id"],"owner":"two"}"#;
    server.push(1, "users", &key_a, a).assert_created();
    server.push(2, "users", &key_b, b).assert_created();
    // Client one's key cannot write into client two's tables.
    server.push(2, "users", &key_a, a).assert_error(403);

    assert_eq!(staged_records(&db, 1, "users"), [a]);
    assert_eq!(staged_records(&db, 2, "users"), [b]);
    assert_eq!(staged_rows(&db).len(), 2);
}

fn table_names_are_case_insensitive_and_validated(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "tables");

    for (n, table) in ["Orders", "ORDERS", "orders"].iter().enumerate() {
        let record = format!(r#"{{"id":{n},"keys":["id"],"sent_to":"{table}"}}"#);
        server.push(CLIENT, table, &key, &record).assert_created();
    }
    let longest = format!("Tab_{}", "x".repeat(59));
    assert_eq!(longest.len(), 63);
    server
        .push(CLIENT, &longest, &key, r#"{"id":1,"keys":["id"]}"#)
        .assert_created();

    let orders = staged_records(&db, CLIENT, "orders");
    assert_eq!(orders.len(), 3, "Orders, ORDERS and orders are one table");
    assert!(orders[0].contains("\"Orders\"") && orders[2].contains("\"orders\""));
    assert_eq!(
        staged_records(&db, CLIENT, &longest.to_ascii_lowercase()).len(),
        1
    );

    for bad in [
        "a-b".to_owned(),
        "a".repeat(64),
        "x;drop".to_owned(),
        "a%20b".to_owned(),
        "t%C3%BCr".to_owned(),
    ] {
        let reply = server.push(CLIENT, &bad, &key, r#"{"id":9,"keys":["id"]}"#);
        let (message, _) = reply.assert_error(400);
        assert!(message.contains("table name"), "{bad}: {message}");
    }
    assert_eq!(
        staged_rows(&db).len(),
        4,
        "no bad table name stored anything"
    );
}

fn one_invalid_record_rejects_the_whole_request(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "validation");
    let good = r#"{"id":1,"keys":["id"],"name":"fine"}"#;

    // (what is wrong, the record, a word its reason must contain)
    let cases: Vec<(&str, String, &str)> = vec![
        ("no keys field", r#"{"id":2}"#.into(), "keys"),
        ("empty keys", r#"{"id":2,"keys":[]}"#.into(), "keys"),
        (
            "keys not an array",
            r#"{"id":2,"keys":"id"}"#.into(),
            "keys",
        ),
        (
            "keys naming a number",
            r#"{"id":2,"keys":[7]}"#.into(),
            "keys",
        ),
        (
            "key field missing",
            r#"{"keys":["id"],"other":2}"#.into(),
            "\"id\"",
        ),
        (
            "null key value",
            r#"{"id":null,"keys":["id"]}"#.into(),
            "null",
        ),
        ("float key", r#"{"id":2.5,"keys":["id"]}"#.into(), "\"id\""),
        (
            "exponent key",
            r#"{"id":2e3,"keys":["id"]}"#.into(),
            "\"id\"",
        ),
        (
            "integer key beyond 64 bits",
            r#"{"id":99999999999999999999,"keys":["id"]}"#.into(),
            "\"id\"",
        ),
        (
            "object key",
            r#"{"id":{"a":1},"keys":["id"]}"#.into(),
            "object",
        ),
        ("array key", r#"{"id":[1],"keys":["id"]}"#.into(), "array"),
        (
            "duplicate key names",
            r#"{"id":2,"keys":["id","id"]}"#.into(),
            "\"id\"",
        ),
        (
            "string key over 1024 bytes",
            format!(r#"{{"id":"{}","keys":["id"]}}"#, "x".repeat(1025)),
            "1024",
        ),
        (
            "string key of 513 two-byte characters",
            format!(r#"{{"id":"{}","keys":["id"]}}"#, "é".repeat(513)),
            "1024",
        ),
        ("number element", "42".into(), "object"),
        (
            "array element",
            r#"[{"id":2,"keys":["id"]}]"#.into(),
            "object",
        ),
        ("string element", r#""id""#.into(), "object"),
    ];
    for (n, (what, bad, hint)) in cases.iter().enumerate() {
        let position = 1 + n % 3;
        let mut records = vec![good; 4];
        records.insert(position, bad);
        let reply = server.push(CLIENT, "things", &key, &format!("[{}]", records.join(",")));
        let (message, reasons) = reply.assert_error(400);
        assert!(message.contains("nothing was stored"), "{what}: {message}");
        assert_eq!(reasons.len(), 1, "{what}: one reason: {reasons:?}");
        assert!(
            reasons[0].starts_with(&format!("record {position}:")),
            "{what}: the reason must name record {position}: {reasons:?}"
        );
        assert!(
            reasons[0].contains(hint),
            "{what}: the reason should mention {hint}: {reasons:?}"
        );
    }

    // Every invalid record gets its own reason.
    let body = format!(r#"[{{"id":null,"keys":["id"]}},{good},{{"keys":[]}}]"#);
    let (message, reasons) = server.push(CLIENT, "things", &key, &body).assert_error(400);
    assert!(message.contains('2'), "{message}");
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert!(reasons[0].starts_with("record 0:") && reasons[1].starts_with("record 2:"));

    // A single invalid object is refused the same way.
    let (_, reasons) = server
        .push(CLIENT, "things", &key, r#"{"id":1}"#)
        .assert_error(400);
    assert!(reasons[0].starts_with("record 0:"), "{reasons:?}");

    assert!(
        staged_rows(&db).is_empty(),
        "no invalid request stored anything"
    );

    // Just inside the limits, and every kind of key value: all accepted.
    let fine = [
        format!(r#"{{"id":"{}","keys":["id"]}}"#, "x".repeat(1024)),
        format!(r#"{{"id":"{}","keys":["id"]}}"#, "é".repeat(512)),
        r#"{"id":-9223372036854775808,"keys":["id"]}"#.to_owned(),
        r#"{"id":true,"keys":["id"]}"#.to_owned(),
        r#"{"a":"x","b":0,"c":false,"keys":["a","b","c"],"extra":null}"#.to_owned(),
        r#"{"id":"","keys":["id"]}"#.to_owned(),
    ];
    let body = format!("[{}]", fine.join(","));
    assert_eq!(
        server.push(CLIENT, "things", &key, &body).assert_created(),
        fine.len() as u64
    );
    assert_eq!(staged_records(&db, CLIENT, "things"), fine);
}

fn malformed_bodies_are_refused_without_harm(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "malformed");
    let path = format!("/v2/client/{CLIENT}/table/things/data?apikey={key}");
    let json_header = [("Content-Type", "application/json")];

    let deep_200 = format!("{}{}", "[".repeat(200), "]".repeat(200));
    let deep_100k = "[".repeat(100_000);
    let cases: [(&str, &[u8]); 10] = [
        ("truncated JSON", br#"{"id":1,"keys":["#),
        ("not JSON", b"id=1&keys=id"),
        ("an empty body", b""),
        ("only whitespace", b" \r\n\t "),
        ("an empty array", b"[]"),
        ("a scalar", b"42"),
        ("trailing garbage", br#"{"id":1,"keys":["id"]} x"#),
        ("invalid UTF-8", b"{\"id\":\"\xff\xfe\",\"keys\":[\"id\"]}"),
        ("200 nested arrays", deep_200.as_bytes()),
        ("100000 nested arrays", deep_100k.as_bytes()),
    ];
    for (what, body) in cases {
        let reply = server.request("POST", &path, &json_header, Some(body));
        let (message, _) = reply.assert_error(400);
        if what.contains("nested") {
            assert!(message.contains("64"), "{what}: names the limit: {message}");
        }
    }
    // The server survived all that and still takes a good push.
    server.get("/health").assert_status(200);
    server
        .push(CLIENT, "things", &key, r#"{"id":1,"keys":["id"]}"#)
        .assert_created();
    assert_eq!(staged_rows(&db).len(), 1);
}

fn nesting_deeper_than_the_configured_limit_is_refused(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[("INTAKE__SERVER__MAX_JSON_DEPTH", "3")]);
    let (_, key) = issue_key(&db, CLIENT, "depth");
    // Three levels: the record, "a", and the array in it.
    let record = r#"{"id":1,"keys":["id"],"a":{"b":[1]}}"#;
    server.push(CLIENT, "deep", &key, record).assert_created();
    // Inside an array it is four levels deep, one too many.
    let (message, _) = server
        .push(CLIENT, "deep", &key, &format!("[{record}]"))
        .assert_error(400);
    assert!(message.contains('3'), "names the limit: {message}");
    // Brackets inside strings are not nesting.
    let stringy = r#"[{"id":"[[[{{{","keys":["id"]}]"#;
    server.push(CLIENT, "deep", &key, stringy).assert_created();
    assert_eq!(
        staged_records(&db, CLIENT, "deep"),
        [record, r#"{"id":"[[[{{{","keys":["id"]}"#]
    );
}

fn requests_over_the_limits_answer_413(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(
        &db,
        &[
            ("INTAKE__SERVER__MAX_RECORDS_PER_REQUEST", "5"),
            ("INTAKE__SERVER__MAX_BODY_BYTES", "1000"),
        ],
    );
    let (_, key) = issue_key(&db, CLIENT, "limits");
    let records = |n: usize| {
        let all: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"id":{i},"keys":["id"]}}"#))
            .collect();
        format!("[{}]", all.join(","))
    };

    assert_eq!(
        server.push(CLIENT, "t", &key, &records(5)).assert_created(),
        5
    );
    let (message, _) = server
        .push(CLIENT, "t", &key, &records(6))
        .assert_error(413);
    assert!(message.contains('5'), "names the limit: {message}");

    // A body of exactly the limit is fine; one byte more is not.
    let sized = |len: usize| {
        let shell = r#"{"id":100,"keys":["id"],"pad":""}"#;
        let pad = "p".repeat(len - shell.len());
        format!(r#"{{"id":100,"keys":["id"],"pad":"{pad}"}}"#)
    };
    assert_eq!(sized(1000).len(), 1000);
    server
        .push(CLIENT, "t", &key, &sized(1000))
        .assert_created();
    let (message, _) = server
        .push(CLIENT, "t", &key, &sized(1001))
        .assert_error(413);
    assert!(message.contains("1000"), "names the limit: {message}");

    // Without a Content-Length (chunked), the limit is enforced while reading.
    let big = sized(1500).into_bytes();
    let response = server
        .agent()
        .post(server.url(&format!("/v2/client/{CLIENT}/table/t/data?apikey={key}")))
        .header("Content-Type", "application/json")
        .send(ureq::SendBody::from_owned_reader(Cursor::new(big)))
        .expect("an answer to a chunked push");
    support::Reply::read(response).assert_error(413);

    let stored = staged_records(&db, CLIENT, "t");
    assert_eq!(stored.len(), 6, "5 records, then the 1000-byte one");
    assert_eq!(stored[5].len(), 1000);
}

fn content_type_must_be_json_when_given(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "content types");
    let path = format!("/v2/client/{CLIENT}/table/typed/data?apikey={key}");
    let body = br#"{"id":1,"keys":["id"]}"#;

    for refused in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "text/json",
    ] {
        let reply = server.request("POST", &path, &[("Content-Type", refused)], Some(body));
        reply.assert_error(415);
    }
    assert!(staged_rows(&db).is_empty());

    // Older clients send no Content-Type at all; that is accepted.
    let reply = server.request("POST", &path, &[], Some(body));
    assert!(reply.headers.get("content-type").is_some());
    assert_eq!(reply.assert_created(), 1);
    for accepted in [
        "application/json; charset=utf-8",
        "Application/JSON",
        "application/vnd.api+json",
    ] {
        let reply = server.request("POST", &path, &[("Content-Type", accepted)], Some(body));
        assert_eq!(reply.assert_created(), 1, "{accepted}");
    }
    assert_eq!(staged_records(&db, CLIENT, "typed").len(), 4);
}

fn unknown_routes_and_wrong_methods_answer_in_the_error_shape(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "routes");
    let data = format!("/v2/client/{CLIENT}/table/t/data?apikey={key}");
    let auth = format!("/v2/client/{CLIENT}/authenticate?apikey={key}");

    for (method, path) in [
        ("GET", "/nope".to_owned()),
        (
            "GET",
            format!("/v1/client/{CLIENT}/authenticate?apikey={key}"),
        ),
        ("POST", format!("/v2/client/{CLIENT}/table/t?apikey={key}")),
        (
            "POST",
            format!("/v2/client/{CLIENT}/table/t/data/more?apikey={key}"),
        ),
        (
            "GET",
            format!("/v2/client/{CLIENT}/authenticate/x?apikey={key}"),
        ),
    ] {
        let reply = server.request(method, &path, &[], None);
        reply.assert_error(404);
    }
    for (method, path, allowed) in [
        ("GET", data.clone(), "POST"),
        ("PUT", data.clone(), "POST"),
        ("DELETE", "/".to_owned(), "GET"),
        ("POST", "/health".to_owned(), "GET"),
        ("DELETE", "/ready".to_owned(), "GET"),
        ("POST", auth, "GET"),
        ("GET", format!("/sandbox{data}"), "POST"),
    ] {
        let reply = server.request(method, &path, &[], None);
        reply.assert_error(405);
        assert_eq!(reply.header("allow"), Some(allowed), "{method} {path}");
    }
    assert!(staged_rows(&db).is_empty());
}

fn sandbox_checks_everything_but_stores_nothing(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[("INTAKE__SERVER__MAX_RECORDS_PER_REQUEST", "5")]);
    let (_, key) = issue_key(&db, CLIENT, "sandbox");
    let (revoked_id, revoked_key) = issue_key(&db, CLIENT, "revoked");
    revoke_key(&db, &revoked_id, "testing").assert_success();
    let sandbox_auth = |client: i64, key: &str| {
        server.get(&format!(
            "/sandbox/v2/client/{client}/authenticate?apikey={key}"
        ))
    };

    let ok = sandbox_auth(CLIENT, &key);
    ok.assert_status(200);
    assert_eq!(ok.json()["client_id"], CLIENT);
    sandbox_auth(CLIENT, &revoked_key).assert_error(401);
    sandbox_auth(CLIENT, &unknown_key()).assert_error(401);
    sandbox_auth(CLIENT + 1, &key).assert_error(403);
    server
        .get(&format!("/sandbox/v2/client/{CLIENT}/authenticate"))
        .assert_error(401);

    let body = r#"[{"id":1,"keys":["id"]},{"id":2,"keys":["id"]}]"#;
    let valid = server.push_sandbox(CLIENT, "orders", &key, body);
    assert_eq!(valid.assert_created(), 2);
    assert_eq!(valid.json()["sandbox"], true);

    server
        .push_sandbox(CLIENT, "orders", &revoked_key, body)
        .assert_error(401);
    server
        .push_sandbox(CLIENT + 1, "orders", &key, body)
        .assert_error(403);
    let (_, reasons) = server
        .push_sandbox(
            CLIENT,
            "orders",
            &key,
            r#"[{"id":1,"keys":["id"]},{"id":2}]"#,
        )
        .assert_error(400);
    assert!(reasons[0].starts_with("record 1:"), "{reasons:?}");
    server
        .push_sandbox(CLIENT, "or-ders", &key, body)
        .assert_error(400);
    let six = format!("[{}]", [r#"{"id":1,"keys":["id"]}"#; 6].join(","));
    server
        .push_sandbox(CLIENT, "orders", &key, &six)
        .assert_error(413);
    server
        .request(
            "POST",
            &format!("/sandbox/v2/client/{CLIENT}/table/orders/data?apikey={key}"),
            &[("Content-Type", "text/plain")],
            Some(body.as_bytes()),
        )
        .assert_error(415);

    assert!(staged_rows(&db).is_empty(), "the sandbox stores nothing");

    // The same push to production is stored.
    let stored = server.push(CLIENT, "orders", &key, body);
    assert_eq!(stored.assert_created(), 2);
    assert_eq!(stored.json()["sandbox"], false);
    assert_eq!(staged_records(&db, CLIENT, "orders").len(), 2);
}

fn a_revoked_key_is_refused_within_the_cache_ttl(backend: Backend) {
    const TTL: Duration = Duration::from_secs(1);
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[("INTAKE__AUTH__CACHE_TTL_SECS", "1")]);
    let (key_id, key) = issue_key(&db, CLIENT, "to be revoked");

    // Warm the server's cache with the key.
    server.authenticate(CLIENT, &key).assert_status(200);
    server
        .push(CLIENT, "t", &key, r#"{"id":1,"keys":["id"]}"#)
        .assert_created();

    revoke_key(&db, &key_id, "rotated").assert_success();
    let revoked = Instant::now();
    let limit = TTL + Duration::from_millis(1500);
    loop {
        let reply = server.authenticate(CLIENT, &key);
        if reply.status == 401 {
            reply.assert_error(401);
            break;
        }
        reply.assert_status(200);
        assert!(
            revoked.elapsed() < limit,
            "the revoked key still works {:?} after revocation",
            revoked.elapsed()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(revoked.elapsed() < limit);
    server
        .push(CLIENT, "t", &key, r#"{"id":2,"keys":["id"]}"#)
        .assert_error(401);
    assert_eq!(staged_rows(&db).len(), 1);
}

/// Key ids are not secret. Someone guessing secrets for a key id must not make the server tell
/// the key's real owner that a valid key is invalid (401): at worst it may ask them to retry.
fn guessing_secrets_does_not_lock_out_the_real_key(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "targeted");
    let secret = support::secret_of(&key);
    let prefix = &key[..key.len() - secret.len()];
    for guess in 0..20 {
        let guessed = format!("{prefix}{guess:0>32}");
        let reply = server.authenticate(CLIENT, &guessed);
        // Wrong secrets are refused; once they pile up, refused without hashing (429).
        assert!(
            matches!(reply.status, 401 | 429),
            "guess {guess}: {}",
            reply.status
        );
        reply.assert_error(reply.status);
    }

    let reply = server.authenticate(CLIENT, &key);
    match reply.status {
        200 => assert_eq!(reply.json()["client_id"], CLIENT),
        429 | 503 => {
            reply.assert_error(reply.status);
            assert!(
                reply.header("retry-after").is_some(),
                "a retryable refusal says when to retry"
            );
        }
        other => panic!(
            "after 20 wrong guesses the real key was answered {other} {}: its owner is told \
             the key is invalid",
            reply.text
        ),
    }
}
