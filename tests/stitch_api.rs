//! The Stitch Import API v2 (`/v2/import/status`, `/push`, `/batch`, `/validate`) as a client
//! sees it, end to end: the real `intake-server` takes the requests, the real `intake-loader`
//! moves what was staged into the warehouse, and the warehouse is read back with SQL. Every
//! test runs on SQLite and on PostgreSQL.
//!
//! Covered: the status endpoint (also with the database down), authentication and the
//! client check, every refusal of a push with its status and record index (nothing of a
//! refused request is staged), the body limit of its own, the client's `sequence` deciding
//! which version of a key wins, validate storing nothing, batch validation against the JSON
//! Schema and typing of columns by it, full-table replacement with `activate_version`, both
//! protocols feeding one table, and the key staying out of the log.

mod support;

use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use serde_json::{Value, json};
use support::{
    Backend, DbConnection, Reply, Server, TestDb, both_backends, column_types, declared_type,
    issue_key, load, secret_of, staged_records, staged_rows, unknown_key, warehouse_count,
    warehouse_rows,
};

both_backends!(
    tables_made_before_the_stitch_columns_get_them,
    stream_names_with_punctuation_become_table_names,
    a_batch_without_key_names_appends_every_record,
    status_answers_ok_without_a_key,
    status_answers_503_with_retry_after_when_the_database_is_down,
    push_stages_each_data_object_and_loads_several_tables,
    push_needs_a_valid_key_for_the_records_client,
    unusable_push_records_are_422_with_their_index_and_nothing_is_staged,
    malformed_bodies_wrong_media_types_and_methods_are_refused,
    the_stitch_body_limit_is_its_own,
    a_stored_record_is_replaced_only_by_a_higher_sequence,
    validate_checks_like_push_and_batch_and_stores_nothing,
    batch_records_must_conform_to_the_schema,
    batch_schema_decides_the_column_types,
    activate_version_removes_older_versions_and_their_child_rows,
    both_protocols_feed_one_table_and_rjmetrics_counts_as_sequence_0,
    the_key_never_reaches_the_log,
);

const CLIENT: i64 = 42;

const PUSH: &str = "/v2/import/push";
const BATCH: &str = "/v2/import/batch";
const VALIDATE: &str = "/v2/import/validate";
const STATUS: &str = "/v2/import/status";

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A server with the embedded loader off, and an API key for [`CLIENT`].
fn start(db: &TestDb, env: &[(&str, &str)]) -> (Server, String) {
    let server = Server::start(db, env);
    let (_, key) = issue_key(db, CLIENT, "stitch tests");
    (server, key)
}

/// `POST path` with a JSON body and the key as a Bearer token, as Stitch clients send it.
fn post(server: &Server, path: &str, key: &str, body: &str) -> Reply {
    let bearer = format!("Bearer {key}");
    server.request(
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &bearer),
        ],
        Some(body.as_bytes()),
    )
}

/// A push record for [`CLIENT`] keyed by `id`.
fn record(table: &str, sequence: i64, data: Value) -> Value {
    json!({
        "client_id": CLIENT,
        "table_name": table,
        "sequence": sequence,
        "action": "upsert",
        "key_names": ["id"],
        "data": data,
    })
}

/// Pushes `records` in one request, which must be accepted exactly as Stitch answers.
#[track_caller]
fn push_ok(server: &Server, key: &str, records: &[Value]) {
    let reply = post(
        server,
        PUSH,
        key,
        &Value::Array(records.to_vec()).to_string(),
    );
    reply.assert_status(201);
    assert_eq!(
        reply.json(),
        json!({"status": "OK", "message": "Batch Accepted!"})
    );
}

/// Sends a batch body, which must be accepted.
#[track_caller]
fn batch_ok(server: &Server, key: &str, body: &Value) {
    let reply = post(server, BATCH, key, &body.to_string());
    reply.assert_status(201);
    assert_eq!(
        reply.json(),
        json!({"status": "OK", "message": "Batch Accepted!"})
    );
}

/// Asserts a Stitch error answer, `{"status": "ERROR", "error": "...", "errors": [...]}` as
/// JSON, and returns the message and the listed problems.
#[track_caller]
fn assert_stitch_error(reply: &Reply, status: u16) -> (String, Vec<Value>) {
    reply.assert_status(status);
    let content_type = reply.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("application/json"),
        "a {status} answer must be JSON, got Content-Type {content_type:?}"
    );
    let body = reply.json();
    let object = body
        .as_object()
        .unwrap_or_else(|| panic!("a Stitch error body is an object: {body}"));
    let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
    fields.sort_unstable();
    assert_eq!(
        fields,
        ["error", "errors", "status"],
        "Stitch error fields: {body}"
    );
    assert_eq!(body["status"], "ERROR", "{body}");
    let message = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("error must be a string: {body}"))
        .to_owned();
    assert!(!message.trim().is_empty(), "empty error message: {body}");
    let problems = body["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("errors must be an array: {body}"))
        .clone();
    for problem in &problems {
        assert!(
            problem["message"]
                .as_str()
                .is_some_and(|m| !m.trim().is_empty()),
            "every listed problem has a message: {body}"
        );
    }
    (message, problems)
}

/// The record indexes a refusal lists, in order.
fn indexes(problems: &[Value]) -> Vec<u64> {
    problems
        .iter()
        .map(|p| {
            p["index"]
                .as_u64()
                .unwrap_or_else(|| panic!("a record's problem names its index: {p}"))
        })
        .collect()
}

#[track_caller]
fn assert_nothing_staged(db: &TestDb, what: &str) {
    let staged = staged_rows(db);
    assert!(staged.is_empty(), "{what}: staged {staged:?}");
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// How many tables have a stored batch schema.
fn stored_schemas(db: &TestDb) -> i64 {
    let rows: Vec<Count> =
        DbConnection::open(db).load("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM table_schemas");
    rows.first().map_or(0, |r| r.n)
}

/// The rows of one of [`CLIENT`]'s tables.
fn rows(db: &TestDb, table: &str, order_by: &str) -> Vec<Value> {
    warehouse_rows(db, CLIENT, table, order_by)
}

/// `(id, name, _intake_client_seq)` of every row of a table keyed by `id`.
fn names(db: &TestDb, table: &str) -> Vec<(i64, String, Option<i64>)> {
    rows(db, table, "\"id\"")
        .into_iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap_or_else(|| panic!("id: {r}")),
                r["name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("name: {r}"))
                    .to_owned(),
                r["_intake_client_seq"].as_i64(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Status.

fn status_answers_ok_without_a_key(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);

    let status = server.get(STATUS);
    status.assert_status(200);
    assert!(
        status
            .header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{:?}",
        status.headers
    );
    assert_eq!(status.json(), json!({"status": "OK"}));

    // Another method is 405 in the Stitch shape, naming the accepted one.
    let post = server.request("POST", STATUS, &[], Some(b"{}"));
    assert_stitch_error(&post, 405);
    assert_eq!(post.header("allow"), Some("GET"));
}

/// The server starts without a reachable database when it is not asked to migrate (as
/// tests/operations.rs does), so the 503 can be seen from outside.
fn status_answers_503_with_retry_after_when_the_database_is_down(backend: Backend) {
    let db = TestDb::unreachable(backend);
    let server = Server::start_unreachable(&db);
    let timed = |what: &str, request: &dyn Fn() -> Reply| {
        let started = Instant::now();
        let reply = request();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{what} took {:?}: a database that is down must not make requests hang",
            started.elapsed()
        );
        reply
    };

    let status = timed("status", &|| server.get(STATUS));
    let (message, _) = assert_stitch_error(&status, 503);
    assert!(message.contains("database"), "{message}");
    assert_eq!(status.header("retry-after"), Some("3"));

    // A key cannot be checked without the database: 503 too, not 401.
    let body = json!([record("t", 1, json!({"id": 1}))]).to_string();
    for path in [PUSH, BATCH, VALIDATE] {
        let reply = timed(path, &|| post(&server, path, &unknown_key(), &body));
        assert_stitch_error(&reply, 503);
        assert_eq!(reply.header("retry-after"), Some("3"), "{path}");
    }
    // What needs no database is still answered.
    let no_key = server.request(
        "POST",
        PUSH,
        &[("Content-Type", "application/json")],
        Some(body.as_bytes()),
    );
    assert_stitch_error(&no_key, 401);
}

// ---------------------------------------------------------------------------------------------
// Push.

fn push_stages_each_data_object_and_loads_several_tables(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);

    // Odd spacing in `data`, to show that the stored record is its text exactly; `keys` in
    // `data` is a field like any other (RJMetrics' meaning of it does not apply).
    let customer = r#"{"id": 1,  "keys": "k-1", "name": "Ann" }"#;
    let order = r#"{"order_id":"A-7","total":19.5,"items":[{"sku":"x","qty":2}]}"#;
    let body = format!(
        r#"[
        {{"client_id": {CLIENT}, "table_name": "Customers", "sequence": 1700000000000,
          "action": "upsert", "key_names": ["id"], "data": {customer}}},
        {{"client_id": {CLIENT}, "table_name": "orders", "sequence": 5,
          "action": "upsert", "key_names": ["order_id"], "data": {order}}},
        {{"client_id": {CLIENT}, "table_name": "customers", "sequence": 1700000000001,
          "action": "upsert", "key_names": ["id"], "data": {{"id": 2, "name": "Bob"}}}}
    ]"#
    );
    let reply = post(&server, PUSH, &key, &body);
    reply.assert_status(201);
    assert_eq!(
        reply.json(),
        json!({"status": "OK", "message": "Batch Accepted!"})
    );

    // Table names are case-insensitive; each record is its `data`, byte for byte.
    assert_eq!(
        staged_records(&db, CLIENT, "customers"),
        [customer, r#"{"id": 2, "name": "Bob"}"#]
    );
    assert_eq!(staged_records(&db, CLIENT, "orders"), [order]);
    assert_eq!(staged_rows(&db).len(), 3, "nothing else is staged");

    load(&db);
    assert_nothing_staged(&db, "after a loader pass");

    let customers = rows(&db, "customers", "\"id\"");
    assert_eq!(customers.len(), 2, "{customers:#?}");
    assert_eq!(customers[0]["id"], 1);
    assert_eq!(customers[0]["name"], "Ann");
    assert_eq!(
        customers[0]["keys"], "k-1",
        "a data field named keys is a column"
    );
    assert_eq!(customers[0]["_intake_client_seq"], 1_700_000_000_000_i64);
    assert_eq!(customers[0]["_intake_table_version"], Value::Null);
    assert_eq!(customers[1]["id"], 2);
    assert_eq!(customers[1]["name"], "Bob");
    assert_eq!(customers[1]["keys"], Value::Null);
    assert_eq!(customers[1]["_intake_client_seq"], 1_700_000_000_001_i64);
    assert_eq!(support::primary_key(&db, CLIENT, "customers"), ["id"]);

    let orders = rows(&db, "orders", "\"order_id\"");
    assert_eq!(orders.len(), 1, "{orders:#?}");
    assert_eq!(orders[0]["order_id"], "A-7");
    assert_eq!(orders[0]["total"], json!(19.5));
    assert_eq!(orders[0]["_intake_client_seq"], 5);
    assert_eq!(support::primary_key(&db, CLIENT, "orders"), ["order_id"]);
    let items = rows(&db, "orders__items", "\"_intake_pos_0\"");
    assert_eq!(items.len(), 1, "{items:#?}");
    assert_eq!(items[0]["_intake_root_order_id"], "A-7");
    assert_eq!(items[0]["sku"], "x");
    assert_eq!(items[0]["qty"], 2);
}

fn push_needs_a_valid_key_for_the_records_client(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    let body = json!([record("people", 1, json!({"id": 1, "name": "Ann"}))]).to_string();

    let no_key = server.request(
        "POST",
        PUSH,
        &[("Content-Type", "application/json")],
        Some(body.as_bytes()),
    );
    let unknown = post(&server, PUSH, &unknown_key(), &body);
    let mut wrong_secret = key.clone();
    let last = wrong_secret.pop().expect("a key is not empty");
    wrong_secret.push(if last == 'A' { 'B' } else { 'A' });
    let wrong = post(&server, PUSH, &wrong_secret, &body);
    for (what, reply) in [
        ("no key", &no_key),
        ("an unknown key", &unknown),
        ("a wrong secret", &wrong),
    ] {
        let (message, problems) = assert_stitch_error(reply, 401);
        assert!(problems.is_empty(), "{what}: {problems:?}");
        assert!(message.contains("API key"), "{what}: {message}");
        assert!(!reply.text.contains(&key), "{what}: the key is not echoed");
        assert_eq!(reply.text, no_key.text, "{what}: every 401 is the same");
    }
    assert_nothing_staged(&db, "401");

    // A record for another client refuses the whole request, the valid records too; also
    // with a key that is valid for that other client, since the key decides.
    let (_, other_key) = issue_key(&db, CLIENT + 1, "another client");
    let mixed = json!([
        record("people", 1, json!({"id": 1, "name": "Ann"})),
        record("people", 2, json!({"id": 2, "name": "Bob"})),
        {"client_id": CLIENT + 1, "table_name": "people", "sequence": 3, "action": "upsert",
         "key_names": ["id"], "data": {"id": 3, "name": "Eve"}},
    ])
    .to_string();
    for (what, k) in [
        ("the records' client's key", &key),
        ("the other client's key", &other_key),
    ] {
        let reply = post(&server, PUSH, k, &mixed);
        let (message, _) = assert_stitch_error(&reply, 403);
        assert!(message.contains("client"), "{what}: {message}");
        assert_nothing_staged(&db, what);
    }

    // The key's own records are accepted (the key works, the 403 was about the client).
    let reply = post(&server, PUSH, &key, &body);
    reply.assert_status(201);
    assert_eq!(staged_rows(&db).len(), 1);
    assert_eq!(staged_rows(&db)[0].0, CLIENT);
}

fn unusable_push_records_are_422_with_their_index_and_nothing_is_staged(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    let good = |id: i64| record("things", id, json!({"id": id, "name": "fine"}));
    let without = |field: &str| {
        let mut r = good(9);
        r.as_object_mut().expect("an object").remove(field);
        r
    };
    let with = |field: &str, value: Value| {
        let mut r = good(9);
        r[field] = value;
        r
    };
    let long_key = "k".repeat(1025);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("key_names missing", without("key_names"), "key_names"),
        ("key_names empty", with("key_names", json!([])), "key_names"),
        (
            "a null key value",
            with("data", json!({"id": null, "name": "x"})),
            "null",
        ),
        (
            "a missing key field",
            with("data", json!({"name": "x"})),
            "missing",
        ),
        ("data an array", with("data", json!([{"id": 9}])), "object"),
        ("data a string", with("data", json!("id=9")), "object"),
        ("data missing", without("data"), "data"),
        (
            "a key of 1025 bytes",
            with("data", json!({"id": long_key})),
            "1024",
        ),
        (
            "a string sequence",
            with("sequence", json!("9")),
            "sequence",
        ),
        (
            "a fractional sequence",
            with("sequence", json!(9.5)),
            "sequence",
        ),
        ("sequence missing", without("sequence"), "sequence"),
        ("action delete", with("action", json!("delete")), "action"),
        ("action missing", without("action"), "action"),
        (
            "table_name invalid",
            with("table_name", json!("naïve")),
            "table",
        ),
    ];
    for (what, bad, expected) in &cases {
        // The bad record is the third of four; the others are valid.
        let body = json!([good(1), good(2), bad, good(3)]).to_string();
        let reply = post(&server, PUSH, &key, &body);
        let (message, problems) = assert_stitch_error(&reply, 422);
        assert_eq!(indexes(&problems), [2], "{what}: {}", reply.text);
        let listed = problems[0]["message"].as_str().unwrap_or_default();
        assert!(
            listed.contains(expected),
            "{what}: the problem says {listed:?}, which lacks {expected:?}"
        );
        assert!(message.contains("nothing was stored"), "{what}: {message}");
        assert_nothing_staged(&db, what);
    }

    // Several bad records are each listed with their index.
    let body = json!([good(1), cases[2].1, good(2), cases[9].1]).to_string();
    let (_, problems) = assert_stitch_error(&post(&server, PUSH, &key, &body), 422);
    assert_eq!(indexes(&problems), [1, 3]);
    assert_nothing_staged(&db, "two bad records");

    // The limit is 1024 bytes: a key of exactly 1024 is fine.
    let at_limit = "k".repeat(1024);
    push_ok(
        &server,
        &key,
        &[record("things", 1, json!({"id": at_limit}))],
    );
    assert_eq!(staged_rows(&db).len(), 1);
}

fn malformed_bodies_wrong_media_types_and_methods_are_refused(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    let valid = json!([record("t", 1, json!({"id": 1}))]).to_string();

    for (what, body) in [
        ("malformed JSON", r#"[{"client_id": 42, "#.to_owned()),
        ("trailing garbage", format!("{valid} x")),
        (
            "an object",
            json!(record("t", 1, json!({"id": 1}))).to_string(),
        ),
        ("a string", r#""records""#.to_owned()),
        ("an array of numbers", "[1, 2]".to_owned()),
        ("an empty array", "[]".to_owned()),
        ("an empty body", String::new()),
        ("only whitespace", "  \n ".to_owned()),
    ] {
        let reply = post(&server, PUSH, &key, &body);
        assert_stitch_error(&reply, 400);
        assert_nothing_staged(&db, what);
    }
    // A batch must be an object.
    assert_stitch_error(&post(&server, BATCH, &key, &valid), 400);

    // The body must be JSON when a Content-Type is given.
    let bearer = format!("Bearer {key}");
    for path in [PUSH, BATCH, VALIDATE] {
        let reply = server.request(
            "POST",
            path,
            &[("Content-Type", "text/plain"), ("Authorization", &bearer)],
            Some(valid.as_bytes()),
        );
        let (message, _) = assert_stitch_error(&reply, 415);
        assert!(message.contains("JSON"), "{path}: {message}");
    }
    assert_nothing_staged(&db, "415");

    // Known paths, other methods: 405 with Allow.
    for (method, path) in [
        ("GET", PUSH),
        ("PUT", PUSH),
        ("DELETE", PUSH),
        ("GET", BATCH),
        ("GET", VALIDATE),
    ] {
        let reply = server.request(method, path, &[("Authorization", &bearer)], None);
        assert_stitch_error(&reply, 405);
        assert_eq!(reply.header("allow"), Some("POST"), "{method} {path}");
    }

    // The same valid body is accepted.
    push_ok(&server, &key, &[record("t", 1, json!({"id": 1}))]);
}

fn the_stitch_body_limit_is_its_own(backend: Backend) {
    let db = TestDb::new(backend);
    // The RJMetrics endpoints take at most 1000 bytes, the Stitch ones 2000.
    let (server, key) = start(
        &db,
        &[
            ("INTAKE__STITCH__MAX_BODY_BYTES", "2000"),
            ("INTAKE__SERVER__MAX_BODY_BYTES", "1000"),
        ],
    );
    let body_of = |size: usize| {
        let bare = json!([record("sized", 1, json!({"id": 1, "pad": ""}))]).to_string();
        let padded = json!([record(
            "sized",
            1,
            json!({"id": 1, "pad": "p".repeat(size - bare.len())})
        )])
        .to_string();
        assert_eq!(padded.len(), size);
        padded
    };

    let over = body_of(3000);
    let (message, _) = assert_stitch_error(&post(&server, PUSH, &key, &over), 413);
    assert!(
        message.contains("2000"),
        "the Stitch limit is named: {message}"
    );
    assert_stitch_error(&post(&server, VALIDATE, &key, &over), 413);
    assert_nothing_staged(&db, "413");

    // Over the RJMetrics limit but within the Stitch one: the Stitch limit is what applies.
    let within = body_of(1500);
    push_ok(
        &server,
        &key,
        &serde_json::from_str::<Vec<Value>>(&within).expect("JSON"),
    );
    assert_eq!(staged_rows(&db).len(), 1);

    // ...while the RJMetrics endpoint keeps its own 1000 bytes.
    let bare = r#"[{"id": 2, "keys": ["id"], "pad": ""}]"#;
    let rjmetrics = bare.replace(r#""""#, &format!(r#""{}""#, "p".repeat(1500 - bare.len())));
    assert_eq!(rjmetrics.len(), 1500);
    server
        .push(CLIENT, "sized", &key, &rjmetrics)
        .assert_error(413);
    assert_eq!(staged_rows(&db).len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Sequences.

fn a_stored_record_is_replaced_only_by_a_higher_sequence(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    let version = |id: i64, seq: i64, name: &str, tags: &[&str]| {
        record("seqs", seq, json!({"id": id, "name": name, "tags": tags}))
    };

    // Key 1, across loader passes: 10, then a lower 5 in a later request, then 11.
    push_ok(&server, &key, &[version(1, 10, "ten", &["x", "y"])]);
    load(&db);
    push_ok(&server, &key, &[version(1, 5, "five", &["z"])]);
    load(&db);
    assert_nothing_staged(&db, "after the lower sequence's pass");
    assert_eq!(names(&db, "seqs"), [(1, "ten".to_owned(), Some(10))]);
    let tags = |db: &TestDb| -> Vec<(i64, String)> {
        rows(db, "seqs__tags", "\"_intake_root_id\", \"_intake_pos_0\"")
            .into_iter()
            .map(|r| {
                (
                    r["_intake_root_id"].as_i64().unwrap_or(-1),
                    r["value"].as_str().unwrap_or("?").to_owned(),
                )
            })
            .collect()
    };
    assert_eq!(
        tags(&db),
        [(1, "x".to_owned()), (1, "y".to_owned())],
        "the ignored version's child rows are not written either"
    );

    // Key 2, one loader pass: 10 and then a lower 5 in separate requests.
    push_ok(&server, &key, &[version(2, 10, "ten", &["x"])]);
    push_ok(&server, &key, &[version(2, 5, "five", &["z"])]);
    // Key 3, one request: the higher sequence wins wherever it is in the array.
    push_ok(
        &server,
        &key,
        &[version(3, 7, "b", &["b"]), version(3, 3, "a", &["a"])],
    );
    // Key 4, one request, the usual order: the later and higher one wins.
    push_ok(
        &server,
        &key,
        &[version(4, 3, "a", &["a"]), version(4, 7, "b", &["b"])],
    );
    load(&db);
    assert_eq!(
        names(&db, "seqs"),
        [
            (1, "ten".to_owned(), Some(10)),
            (2, "ten".to_owned(), Some(10)),
            (3, "b".to_owned(), Some(7)),
            (4, "b".to_owned(), Some(7)),
        ]
    );

    // A higher sequence replaces the row whole, child rows included.
    push_ok(&server, &key, &[version(1, 11, "eleven", &["w"])]);
    push_ok(&server, &key, &[version(3, 6, "six", &["s"])]);
    load(&db);
    assert_eq!(
        names(&db, "seqs"),
        [
            (1, "eleven".to_owned(), Some(11)),
            (2, "ten".to_owned(), Some(10)),
            (3, "b".to_owned(), Some(7)),
            (4, "b".to_owned(), Some(7)),
        ]
    );
    assert_eq!(
        tags(&db),
        [
            (1, "w".to_owned()),
            (2, "x".to_owned()),
            (3, "b".to_owned()),
            (4, "b".to_owned()),
        ]
    );

    // An equal sequence is not higher: the stored record stays, across passes (key 1) and
    // within one request (key 5).
    push_ok(&server, &key, &[version(1, 11, "eleven again", &["v"])]);
    push_ok(
        &server,
        &key,
        &[
            version(5, 4, "first", &["f"]),
            version(5, 4, "second", &["s"]),
        ],
    );
    load(&db);
    let stored = names(&db, "seqs");
    assert_eq!(stored[0], (1, "eleven".to_owned(), Some(11)));
    assert_eq!(stored[4], (5, "first".to_owned(), Some(4)));
}

// ---------------------------------------------------------------------------------------------
// Validate.

fn validate_checks_like_push_and_batch_and_stores_nothing(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);

    let push_body = json!([
        record("checked", 1, json!({"id": 1, "name": "Ann"})),
        record("other", 2, json!({"id": 2})),
    ])
    .to_string();
    let valid = post(&server, VALIDATE, &key, &push_body);
    valid.assert_status(200);
    assert_eq!(
        valid.json(),
        json!({"status": "OK", "message": "Batch is valid!"})
    );

    let batch_body = json!({
        "table_name": "checked",
        "key_names": ["id"],
        "schema": {"type": "object", "properties": {"id": {"type": "integer"}, "price": {"type": "number"}}},
        "messages": [{"action": "upsert", "sequence": 1, "data": {"id": 1, "price": 2.5}}],
    });
    let valid = post(&server, VALIDATE, &key, &batch_body.to_string());
    valid.assert_status(200);
    assert_eq!(
        valid.json(),
        json!({"status": "OK", "message": "Batch is valid!"})
    );
    assert_nothing_staged(&db, "valid bodies sent to validate");
    assert_eq!(stored_schemas(&db), 0, "validate keeps no schema");

    // Invalid bodies: validate answers exactly what push (an array) or batch (an object) does.
    let mut bad_price = batch_body.clone();
    bad_price["messages"][0]["data"]["price"] = json!("cheap");
    let mut no_keys = batch_body.clone();
    no_keys["key_names"] = json!("id");
    let cases: Vec<(&str, &str, String, u16)> = vec![
        (
            "a null key",
            PUSH,
            json!([record("checked", 1, json!({"id": null}))]).to_string(),
            422,
        ),
        (
            "an action other than upsert",
            PUSH,
            {
                let mut deleting = record("checked", 2, json!({"id": 2}));
                deleting["action"] = json!("delete");
                json!([record("checked", 1, json!({"id": 1})), deleting]).to_string()
            },
            422,
        ),
        (
            "another client",
            PUSH,
            json!([{"client_id": CLIENT + 1, "table_name": "checked", "sequence": 1,
                    "action": "upsert", "key_names": ["id"], "data": {"id": 1}}])
            .to_string(),
            403,
        ),
        ("malformed JSON", PUSH, "[{".to_owned(), 400),
        ("an empty array", PUSH, "[]".to_owned(), 400),
        (
            "a record failing the schema",
            BATCH,
            bad_price.to_string(),
            400,
        ),
        (
            "a batch whose key_names is no array",
            BATCH,
            no_keys.to_string(),
            400,
        ),
    ];
    for (what, path, body, status) in &cases {
        let stored = post(&server, path, &key, body);
        let checked = post(&server, VALIDATE, &key, body);
        assert_stitch_error(&stored, *status);
        assert_stitch_error(&checked, *status);
        assert_eq!(
            checked.json(),
            stored.json(),
            "{what}: validate answers as {path} does"
        );
    }
    // The batch-shaped body went through the schema: its problem names the schema path.
    let (_, problems) =
        assert_stitch_error(&post(&server, VALIDATE, &key, &bad_price.to_string()), 400);
    assert!(
        problems[0]["schema_path"]
            .as_str()
            .is_some_and(|p| p.contains("/properties/price/type")),
        "{problems:?}"
    );

    // Validate needs a key like the others.
    let no_key = server.request(
        "POST",
        VALIDATE,
        &[("Content-Type", "application/json")],
        Some(push_body.as_bytes()),
    );
    assert_stitch_error(&no_key, 401);

    assert_nothing_staged(&db, "after validating");
    assert_eq!(stored_schemas(&db), 0);
}

// ---------------------------------------------------------------------------------------------
// Batch.

fn batch_records_must_conform_to_the_schema(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    let schema = json!({
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "price": {"type": "number"},
            "at": {"type": ["null", "string"], "format": "date-time"},
        },
    });
    let batch = |messages: Value| json!({"table_name": "priced", "key_names": ["id"], "schema": schema, "messages": messages});
    let upsert = |seq: i64, data: Value| json!({"action": "upsert", "sequence": seq, "data": data});

    let bad = batch(json!([
        upsert(1, json!({"id": 1, "price": 1.5})),
        upsert(2, json!({"id": 2, "price": "cheap"})),
        upsert(3, json!({"id": 3, "price": 3, "at": "last tuesday"})),
    ]));
    let reply = post(&server, BATCH, &key, &bad.to_string());
    let (message, problems) = assert_stitch_error(&reply, 400);
    assert!(message.contains("nothing was stored"), "{message}");
    assert_eq!(indexes(&problems), [1, 2], "{}", reply.text);
    let first = &problems[0];
    let schema_path = first["schema_path"].as_str().unwrap_or_default();
    assert!(
        schema_path.contains("/properties/price/type"),
        "schema_path {schema_path:?}"
    );
    assert_eq!(first["instance_path"], "/price", "{first}");
    let second = &problems[1];
    assert!(
        second["schema_path"]
            .as_str()
            .is_some_and(|p| p.contains("/properties/at/format")),
        "{second}"
    );
    assert_eq!(second["instance_path"], "/at", "{second}");
    assert_nothing_staged(&db, "a batch with records failing the schema");
    assert_eq!(stored_schemas(&db), 0, "a refused batch keeps no schema");

    // Key names must be field names.
    let mut numbered = batch(json!([upsert(1, json!({"id": 1, "price": 1.5}))]));
    numbered["key_names"] = json!([1]);
    let (message, _) = assert_stitch_error(&post(&server, BATCH, &key, &numbered.to_string()), 400);
    assert!(message.contains("key_names"), "{message}");
    // A record missing its key field is refused like in a push.
    let (_, problems) = assert_stitch_error(
        &post(
            &server,
            BATCH,
            &key,
            &batch(json!([upsert(1, json!({"price": 1.5}))])).to_string(),
        ),
        400,
    );
    assert_eq!(indexes(&problems), [0]);
    assert_nothing_staged(&db, "refused batches");

    // The valid records alone are accepted, and go to the key's client.
    let (one, two) = (
        json!({"id": 1, "price": 1.5}),
        json!({"id": 2, "price": 2, "at": null}),
    );
    batch_ok(
        &server,
        &key,
        &batch(json!([upsert(1, one.clone()), upsert(2, two.clone())])),
    );
    assert_eq!(
        staged_records(&db, CLIENT, "priced"),
        [one.to_string(), two.to_string()]
    );
    assert_eq!(stored_schemas(&db), 1);
}

fn batch_schema_decides_the_column_types(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    let data = [
        json!({"id": 1, "price": 5, "code": "2026-01-02T03:04:05Z", "at": "2026-03-01T10:20:30Z",
               "qty": 3, "paid": true}),
        json!({"id": 2, "price": 7, "code": "2026-02-02T00:00:00Z", "at": "2026-03-01T12:20:30+02:00",
               "qty": null, "paid": false}),
    ];
    batch_ok(
        &server,
        &key,
        &json!({
            "table_name": "typed",
            "key_names": ["id"],
            "schema": {"type": "object", "properties": {
                "id": {"type": "integer"},
                "price": {"type": "number"},
                "code": {"type": "string"},
                "at": {"type": "string", "format": "date-time"},
                "qty": {"type": ["null", "integer"]},
                "paid": {"type": "boolean"},
            }},
            "messages": [
                {"action": "upsert", "sequence": 1, "data": data[0], "time_extracted": "2026-03-01T10:21:00Z"},
                {"action": "upsert", "sequence": 2, "data": data[1]},
            ],
        }),
    );
    // The same values pushed without a schema, for contrast: typed by their values.
    push_ok(
        &server,
        &key,
        &[
            record("guessed", 1, data[0].clone()),
            record("guessed", 2, data[1].clone()),
        ],
    );
    load(&db);
    assert_nothing_staged(&db, "after the pass");

    let ty = |t| declared_type(backend, t).to_owned();
    let typed = column_types(&db, CLIENT, "typed");
    for (column, expected) in [
        ("id", "bigint"),
        ("price", "double"),
        ("code", "text"),
        ("at", "timestamptz"),
        ("qty", "bigint"),
        ("paid", "boolean"),
    ] {
        assert_eq!(
            typed.get(column),
            Some(&ty(expected)),
            "typed.{column}: {typed:?}"
        );
    }
    assert!(
        !typed.keys().any(|c| c.contains("__")),
        "no typed sibling columns: {typed:?}"
    );
    let guessed = column_types(&db, CLIENT, "guessed");
    assert_eq!(guessed.get("price"), Some(&ty("bigint")), "{guessed:?}");
    assert_eq!(guessed.get("code"), Some(&ty("timestamptz")), "{guessed:?}");

    let loaded = rows(&db, "typed", "\"id\"");
    assert_eq!(loaded.len(), 2, "{loaded:#?}");
    assert_eq!(loaded[0]["price"], json!(5.0));
    assert_eq!(loaded[1]["price"], json!(7.0));
    assert_eq!(loaded[0]["code"], "2026-01-02T03:04:05Z");
    assert_eq!(loaded[0]["at"], "2026-03-01T10:20:30.000000Z");
    assert_eq!(loaded[1]["at"], "2026-03-01T10:20:30.000000Z");
    assert_eq!(loaded[0]["qty"], 3);
    assert_eq!(loaded[1]["qty"], Value::Null);
    assert_eq!(loaded[0]["paid"], true);
    assert_eq!(loaded[1]["paid"], false);
    assert_eq!(loaded[0]["_intake_client_seq"], 1);
    assert_eq!(loaded[1]["_intake_client_seq"], 2);
}

fn activate_version_removes_older_versions_and_their_child_rows(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    let schema = json!({"type": "object", "properties": {
        "sku": {"type": "string"},
        "price": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}},
    }});
    let upsert = |seq: i64, data: Value| json!({"action": "upsert", "sequence": seq, "data": data});
    let version = |v: Option<i64>, messages: Value| {
        let mut body = json!({"table_name": "products", "key_names": ["sku"], "schema": schema,
                              "messages": messages});
        if let Some(v) = v {
            body["table_version"] = json!(v);
        }
        body
    };
    let products = |db: &TestDb| -> Vec<(String, f64, Option<i64>)> {
        rows(db, "products", "\"sku\"")
            .into_iter()
            .map(|r| {
                (
                    r["sku"].as_str().unwrap_or("?").to_owned(),
                    r["price"].as_f64().unwrap_or(f64::NAN),
                    r["_intake_table_version"].as_i64(),
                )
            })
            .collect()
    };
    let tags = |db: &TestDb| -> Vec<(String, String)> {
        rows(
            db,
            "products__tags",
            "\"_intake_root_sku\", \"_intake_pos_0\"",
        )
        .into_iter()
        .map(|r| {
            (
                r["_intake_root_sku"].as_str().unwrap_or("?").to_owned(),
                r["value"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
    };

    // activate_version needs the batch's table_version.
    let no_version = version(
        None,
        json!([upsert(1, json!({"sku": "A", "price": 1})),
                                          {"action": "activate_version", "sequence": 2}]),
    );
    let (_, problems) =
        assert_stitch_error(&post(&server, BATCH, &key, &no_version.to_string()), 400);
    assert_eq!(indexes(&problems), [1], "{problems:?}");
    assert!(
        problems[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("table_version"),
        "{problems:?}"
    );
    assert_nothing_staged(&db, "an activate_version without table_version");

    // Version 1: A and B (B with tags, so with child rows).
    batch_ok(
        &server,
        &key,
        &version(
            Some(1),
            json!([
                upsert(10, json!({"sku": "A", "price": 1, "tags": ["a1"]})),
                upsert(11, json!({"sku": "B", "price": 2, "tags": ["red", "xl"]})),
                {"action": "activate_version", "sequence": 12},
            ]),
        ),
    );
    load(&db);
    assert_eq!(
        products(&db),
        [
            ("A".to_owned(), 1.0, Some(1)),
            ("B".to_owned(), 2.0, Some(1))
        ]
    );
    assert_eq!(
        tags(&db),
        [
            ("A".to_owned(), "a1".to_owned()),
            ("B".to_owned(), "red".to_owned()),
            ("B".to_owned(), "xl".to_owned()),
        ]
    );

    // Version 2: only A; until its marker is loaded, B stays.
    batch_ok(
        &server,
        &key,
        &version(
            Some(2),
            json!([upsert(20, json!({"sku": "A", "price": 3, "tags": ["a2"]}))]),
        ),
    );
    load(&db);
    assert_eq!(
        products(&db),
        [
            ("A".to_owned(), 3.0, Some(2)),
            ("B".to_owned(), 2.0, Some(1))
        ],
        "B stays until version 2 is activated"
    );
    batch_ok(
        &server,
        &key,
        &version(
            Some(2),
            json!([{"action": "activate_version", "sequence": 21}]),
        ),
    );
    load(&db);
    assert_nothing_staged(&db, "the marker leaves staging");
    assert_eq!(products(&db), [("A".to_owned(), 3.0, Some(2))]);
    let loaded = rows(&db, "products", "\"sku\"");
    assert_eq!(loaded[0]["_intake_client_seq"], 20);
    assert_eq!(
        tags(&db),
        [("A".to_owned(), "a2".to_owned())],
        "B's child rows went with it"
    );

    // Version 3 sent and activated in one request, loaded in one pass with a push of a row
    // without any version: only version 3 remains, with its child rows.
    push_ok(
        &server,
        &key,
        &[
            json!({"client_id": CLIENT, "table_name": "products", "sequence": 1, "action": "upsert",
                  "key_names": ["sku"], "data": {"sku": "P", "price": 9, "tags": ["p"]}}),
        ],
    );
    batch_ok(
        &server,
        &key,
        &version(
            Some(3),
            json!([
                upsert(30, json!({"sku": "C", "price": 4, "tags": ["c1", "c2"]})),
                {"action": "activate_version", "sequence": 31},
            ]),
        ),
    );
    load(&db);
    assert_eq!(products(&db), [("C".to_owned(), 4.0, Some(3))]);
    assert_eq!(
        tags(&db),
        [
            ("C".to_owned(), "c1".to_owned()),
            ("C".to_owned(), "c2".to_owned())
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Both protocols.

/// docs/api.md, "Both protocols together": RJMetrics records have no client sequence and count
/// as 0, so an RJMetrics record never replaces a row written by a Stitch record with a positive
/// sequence, whenever it arrives; a Stitch record with a positive sequence replaces an
/// RJMetrics row.
fn both_protocols_feed_one_table_and_rjmetrics_counts_as_sequence_0(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    let rjmetrics = |records: Value| {
        let accepted = server
            .push(CLIENT, "accounts", &key, &records.to_string())
            .assert_created();
        assert_eq!(accepted as usize, records.as_array().map_or(1, Vec::len));
    };

    // One loader pass over both: Stitch 1 (seq 100) then an RJMetrics 1 committed later.
    push_ok(
        &server,
        &key,
        &[
            record("accounts", 100, json!({"id": 1, "name": "stitch-1"})),
            record("accounts", 1, json!({"id": 4, "name": "stitch-only"})),
        ],
    );
    rjmetrics(json!([
        {"id": 1, "keys": ["id"], "name": "rjmetrics-late"},
        {"id": 2, "keys": ["id"], "name": "rjmetrics-2"},
        {"id": 3, "keys": ["id"], "name": "rjmetrics-only"},
    ]));
    load(&db);
    assert_eq!(
        names(&db, "accounts"),
        [
            (1, "stitch-1".to_owned(), Some(100)),
            (2, "rjmetrics-2".to_owned(), None),
            (3, "rjmetrics-only".to_owned(), None),
            (4, "stitch-only".to_owned(), Some(1)),
        ]
    );
    assert_eq!(support::primary_key(&db, CLIENT, "accounts"), ["id"]);

    // Across passes: an RJMetrics record still does not replace the Stitch row...
    rjmetrics(json!([{"id": 1, "keys": ["id"], "name": "rjmetrics-again"}]));
    load(&db);
    // ...while a Stitch record with a positive sequence replaces an RJMetrics row, and an
    // RJMetrics record replaces an RJMetrics row as before.
    push_ok(
        &server,
        &key,
        &[record("accounts", 1, json!({"id": 2, "name": "stitch-2"}))],
    );
    rjmetrics(json!([{"id": 3, "keys": ["id"], "name": "rjmetrics-newer"}]));
    load(&db);
    assert_eq!(
        names(&db, "accounts"),
        [
            (1, "stitch-1".to_owned(), Some(100)),
            (2, "stitch-2".to_owned(), Some(1)),
            (3, "rjmetrics-newer".to_owned(), None),
            (4, "stitch-only".to_owned(), Some(1)),
        ]
    );
    assert_nothing_staged(&db, "after the passes");

    // Sequence 0 stands below every RJMetrics record, so the winner of three versions does
    // not depend on whether they meet in one chunk or across passes.
    for (id, one_pass) in [(5, true), (6, false)] {
        rjmetrics(json!([{"id": id, "keys": ["id"], "name": "rj-first"}]));
        load(&db);
        push_ok(
            &server,
            &key,
            &[record("accounts", 0, json!({"id": id, "name": "zero"}))],
        );
        if !one_pass {
            load(&db);
        }
        rjmetrics(json!([{"id": id, "keys": ["id"], "name": "rj-last"}]));
        load(&db);
    }
    let rows = names(&db, "accounts");
    assert_eq!(rows[4], (5, "rj-last".to_owned(), None));
    assert_eq!(rows[5], (6, "rj-last".to_owned(), None));
}

// ---------------------------------------------------------------------------------------------
// Logs.

fn the_key_never_reaches_the_log(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[("RUST_LOG", "debug")]);
    let secret = secret_of(&key).to_owned();
    let body = json!([record("logged", 1, json!({"id": 1}))]).to_string();
    let batch = json!({"table_name": "logged", "key_names": ["id"],
                       "schema": {"properties": {"id": {"type": "integer"}}},
                       "messages": [{"action": "upsert", "sequence": 2, "data": {"id": 2}}]})
    .to_string();
    let mut wrong = key.clone();
    wrong.truncate(key.len() - 4);
    wrong.push_str("WXYZ");

    let replies = [
        (post(&server, PUSH, &key, &body), 201),
        (post(&server, BATCH, &key, &batch), 201),
        (post(&server, VALIDATE, &key, &body), 200),
        (post(&server, PUSH, &key, "[{"), 400),
        (post(&server, PUSH, &wrong, &body), 401),
        // A key in the query string is accepted too, and must be redacted from the access log.
        (
            server.request(
                "POST",
                &format!("{PUSH}?apikey={key}"),
                &[("Content-Type", "application/json")],
                Some(body.as_bytes()),
            ),
            201,
        ),
    ];
    for (reply, status) in &replies {
        reply.assert_status(*status);
        let request_id = reply
            .header("x-request-id")
            .unwrap_or_else(|| panic!("no X-Request-Id on a {status} answer"))
            .to_owned();
        server.wait_for_log(&format!("for request {request_id}"), |l| {
            l.contains(&format!("request_id={request_id} "))
        });
    }
    server.assert_logs_lack(&[&key, &secret, &wrong]);
    assert_eq!(staged_rows(&db).len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Append-only tables.

/// A batch without key names (a Singer stream without key properties) makes an append-only
/// table: every record is a row of its own, keyed by `__sdc_primary_key`.
fn a_batch_without_key_names_appends_every_record(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    let schema = json!({"properties": {"kind": {"type": "string"}, "n": {"type": "number"}}});
    let event = |seq: i64, kind: &str| json!({"action": "upsert", "sequence": seq, "data": {"kind": kind, "n": 1, "__sdc_primary_key": "mine"}});
    let without_keys = json!({"table_name": "events", "schema": schema,
                              "messages": [event(1, "a"), event(2, "b")]});
    let mut empty_keys = without_keys.clone();
    empty_keys["key_names"] = json!([]);
    empty_keys["messages"] = json!([event(1, "a"), event(3, "c")]);
    batch_ok(&server, &key, &without_keys);
    load(&db);
    batch_ok(&server, &key, &empty_keys);
    load(&db);
    assert_nothing_staged(&db, "after loading the append-only batches");

    let events = rows(&db, "events", "\"__sdc_primary_key\"");
    let kinds: Vec<&str> = events
        .iter()
        .map(|r| r["kind"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        kinds,
        ["a", "b", "a", "c"],
        "every record is a row, repeats too"
    );
    let keys: Vec<i64> = events
        .iter()
        .map(|r| r["__sdc_primary_key"].as_i64().unwrap_or(-1))
        .collect();
    assert!(
        keys.windows(2).all(|w| w[0] < w[1]),
        "distinct, in arrival order: {keys:?}"
    );
    assert_eq!(
        support::primary_key(&db, CLIENT, "events"),
        ["__sdc_primary_key"]
    );
    let types = column_types(&db, CLIENT, "events");
    assert_eq!(types["n"], declared_type(backend, "double"), "{types:?}");
}

/// Singer streams are often named `schema-table`: punctuation becomes `_`.
fn stream_names_with_punctuation_become_table_names(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    push_ok(
        &server,
        &key,
        &[
            record("Public-Users", 1, json!({"id": 1})),
            record("db.orders v2", 1, json!({"id": 2})),
        ],
    );
    load(&db);
    assert_eq!(warehouse_count(&db, CLIENT, "public_users"), 1);
    assert_eq!(warehouse_count(&db, CLIENT, "db_orders_v2"), 1);
}

/// A root table created by a build before the Stitch protocol has no `_intake_client_seq` or
/// `_intake_table_version`: the loader adds them, and loads as usual.
fn tables_made_before_the_stitch_columns_get_them(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db, &[]);
    server
        .push(
            CLIENT,
            "legacy",
            &key,
            r#"[{"id": 1, "name": "old", "keys": ["id"]}]"#,
        )
        .assert_created();
    load(&db);
    let table = support::table_ref(backend, CLIENT, "legacy");
    let mut direct = DbConnection::open(&db);
    for column in ["_intake_client_seq", "_intake_table_version"] {
        direct.execute(&format!("ALTER TABLE {table} DROP COLUMN {column}"));
    }
    assert!(!column_types(&db, CLIENT, "legacy").contains_key("_intake_client_seq"));

    server
        .push(
            CLIENT,
            "legacy",
            &key,
            r#"[{"id": 2, "name": "rj", "keys": ["id"]}]"#,
        )
        .assert_created();
    push_ok(
        &server,
        &key,
        &[record("legacy", 5, json!({"id": 1, "name": "stitch"}))],
    );
    load(&db);
    assert_nothing_staged(&db, "after loading into the upgraded table");
    let types = column_types(&db, CLIENT, "legacy");
    for column in ["_intake_client_seq", "_intake_table_version"] {
        assert_eq!(types[column], declared_type(backend, "bigint"), "{types:?}");
    }
    assert_eq!(
        names(&db, "legacy"),
        [
            (1, "stitch".to_owned(), Some(5)),
            (2, "rj".to_owned(), None)
        ]
    );
}
