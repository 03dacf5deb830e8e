//! Hostile input against the Stitch endpoints (`/v2/import/push`, `/batch`, `/validate`), on the
//! real server and both databases: every answer is a 2xx or a 4xx in Stitch's error shape,
//! never a 5xx; whatever was accepted loads or is rejected by the loader, and the server keeps
//! serving. A bounded proptest campaign mutates valid bodies byte by byte and field by field.

mod support;

use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestRunner};
use serde_json::{Value, json};
use support::{Backend, Reply, Server, TestDb, both_backends, issue_key, load, loader_status};

both_backends!(
    hostile_stitch_bodies_get_a_2xx_or_a_4xx_never_a_5xx,
    the_stitch_parsers_survive_random_mutations,
);

const CLIENT: i64 = 31;
/// Servers here take hundreds of requests; only warnings and errors are logged.
const QUIET: (&str, &str) = ("RUST_LOG", "warn,intake_server=info,intake::access=off");

fn post(server: &Server, path: &str, key: &str, body: &[u8]) -> Reply {
    server.request(
        "POST",
        path,
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &format!("Bearer {key}")),
        ],
        Some(body),
    )
}

fn push_record(table: &str, sequence: Value, data: Value) -> Value {
    json!({"client_id": CLIENT, "table_name": table, "sequence": sequence,
           "action": "upsert", "key_names": ["id"], "data": data})
}

fn batch(schema: Value, messages: Value) -> Value {
    json!({"table_name": "hostile_batch", "key_names": ["id"], "schema": schema,
           "table_version": 1, "messages": messages})
}

/// (what, path, body). The outcome is checked by the rules, not per case: any 2xx or 4xx.
fn hostile_cases() -> Vec<(String, &'static str, Vec<u8>)> {
    let push = "/v2/import/push";
    let batch_path = "/v2/import/batch";
    let mut cases: Vec<(String, &'static str, Vec<u8>)> = Vec::new();
    let mut add = |what: &str, path: &'static str, body: Vec<u8>| {
        cases.push((what.to_owned(), path, body));
    };
    let simple_schema = json!({"properties": {"id": {"type": "integer"}}});
    add("empty body", push, vec![]);
    add("invalid UTF-8", push, b"[{\"a\": \"\xff\xfe\"}]".to_vec());
    add("raw NUL byte", push, b"[\x00]".to_vec());
    add("10 MB of whitespace", push, vec![b' '; 10_000_000]);
    add("100k-deep nesting", push, "[".repeat(100_000).into_bytes());
    add(
        "deep nesting in data",
        push,
        format!(
            r#"[{{"client_id": {CLIENT}, "table_name": "t", "sequence": 1, "action": "upsert", "key_names": ["id"], "data": {{"id": 1, "x": {}1{}}}}}]"#,
            "[".repeat(99),
            "]".repeat(99)
        )
        .into_bytes(),
    );
    for (what, sequence) in [
        (
            "sequence beyond 64 bits",
            json!(18446744073709551616u128 as f64),
        ),
        ("sequence as a huge literal", Value::String("9".repeat(400))),
        ("negative sequence", json!(-5)),
        ("fractional sequence", json!(1.5)),
        ("sequence i64::MAX", json!(i64::MAX)),
    ] {
        add(
            what,
            push,
            Value::Array(vec![push_record("seqs", sequence, json!({"id": 1}))])
                .to_string()
                .into_bytes(),
        );
    }
    add(
        "huge integer in a sequence field text",
        push,
        format!(
            r#"[{{"client_id": {CLIENT}, "table_name": "t", "sequence": 1{}, "action": "upsert", "key_names": ["id"], "data": {{"id": 1}}}}]"#,
            "0".repeat(500)
        )
        .into_bytes(),
    );
    for (what, data) in [
        (
            "lone surrogate in data",
            r#"{"id": 1, "s": "\ud800"}"#.to_owned(),
        ),
        (
            "escaped NUL in data",
            r#"{"id": 1, "s": "a\u0000b"}"#.to_owned(),
        ),
        (
            "NUL in a field name",
            r#"{"id": 1, "a\u0000b": 1}"#.to_owned(),
        ),
        (
            "duplicate fields in data",
            r#"{"id": 1, "id": 2}"#.to_owned(),
        ),
        ("1e400 in data", r#"{"id": 1, "big": 1e400}"#.to_owned()),
        (
            "a field named keys",
            r#"{"id": 1, "keys": ["x"]}"#.to_owned(),
        ),
        (
            "10,000 fields",
            format!(
                "{{\"id\": 1, {}}}",
                (0..10_000)
                    .map(|i| format!("\"f{i}\": {i}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        (
            "SQL in a field name",
            r#"{"id": 1, "x\"; DROP TABLE staged_records; --": 1}"#.to_owned(),
        ),
        ("float key", r#"{"id": 1.5}"#.to_owned()),
        ("object key", r#"{"id": {"a": 1}}"#.to_owned()),
    ] {
        add(
            what,
            push,
            format!(
                r#"[{{"client_id": {CLIENT}, "table_name": "hostile_push", "sequence": 1, "action": "upsert", "key_names": ["id"], "data": {data}}}]"#
            )
            .into_bytes(),
        );
    }
    for (what, key_names) in [
        (
            "17 key names",
            json!((0..17).map(|i| format!("k{i}")).collect::<Vec<_>>()),
        ),
        ("duplicate key names", json!(["id", "id"])),
        ("non-string key names", json!([1])),
        ("empty key names", json!([])),
        ("key_names a string", json!("id")),
    ] {
        let mut record = push_record("t", json!(1), json!({"id": 1}));
        record["key_names"] = key_names;
        add(what, push, json!([record]).to_string().into_bytes());
    }
    for (what, table) in [
        ("table name with SQL", "t; DROP TABLE api_keys"),
        ("table name 10 KB", &*"t".repeat(10_000)),
        ("table name empty", ""),
        ("table name unicode", "名前"),
        (
            "table name like a key",
            "intake_abcdefghijkl_ABCDEFGHIJKLMNOPQRSTUVWXYZ012345",
        ),
    ] {
        add(
            what,
            push,
            json!([push_record(table, json!(1), json!({"id": 1}))])
                .to_string()
                .into_bytes(),
        );
    }
    let one = json!([{"action": "upsert", "sequence": 1, "data": {"id": 1}}]);
    for (what, schema) in [
        (
            "schema with a remote $ref",
            json!({"properties": {"id": {"$ref": "http://127.0.0.1:9/x"}}}),
        ),
        (
            "schema with a file $ref",
            json!({"properties": {"id": {"$ref": "file:///etc/passwd"}}}),
        ),
        (
            "recursive schema",
            json!({"properties": {"id": {"type": "integer"}, "n": {"$ref": "#"}}}),
        ),
        (
            "schema with an invalid regex",
            json!({"properties": {"id": {"type": "integer"}, "s": {"pattern": "("}}}),
        ),
        (
            "schema with a catastrophic regex",
            json!({"properties": {"id": {"type": "integer"}, "s": {"pattern": "^(a+)+$"}}}),
        ),
        (
            "schema of the wrong type",
            json!({"properties": {"id": {"type": 5}}}),
        ),
        ("schema properties not an object", json!({"properties": []})),
        ("schema a string", json!("schema")),
        ("schema 64 levels deep", {
            let mut s = json!({"type": "integer"});
            for _ in 0..64 {
                s = json!({"type": "object", "properties": {"a": s}});
            }
            json!({"properties": {"id": {"type": "integer"}, "a": s}})
        }),
    ] {
        add(
            what,
            batch_path,
            batch(schema, one.clone()).to_string().into_bytes(),
        );
    }
    let catastrophic =
        json!({"properties": {"id": {"type": "integer"}, "s": {"pattern": "^(a+)+$"}}});
    add(
        "catastrophic regex against a long string",
        batch_path,
        batch(
            catastrophic,
            json!([{"action": "upsert", "sequence": 1, "data": {"id": 1, "s": format!("{}!", "a".repeat(5000))}}]),
        )
        .to_string()
        .into_bytes(),
    );
    for (what, messages) in [
        ("messages not an array", json!({"action": "upsert"})),
        ("message a string", json!(["upsert"])),
        (
            "unknown action",
            json!([{"action": "delete", "sequence": 1, "data": {"id": 1}}]),
        ),
        (
            "activate_version with data",
            json!([{"action": "activate_version", "sequence": 1, "data": {"id": 1}}]),
        ),
        (
            "time_extracted a number",
            json!([{"action": "upsert", "sequence": 1, "data": {"id": 1}, "time_extracted": 5}]),
        ),
        (
            "20,001 messages",
            Value::Array(vec![
                json!({"action": "upsert", "sequence": 1, "data": {"id": 1}});
                20_001
            ]),
        ),
    ] {
        add(
            what,
            batch_path,
            batch(simple_schema.clone(), messages)
                .to_string()
                .into_bytes(),
        );
    }
    add(
        "batch body to validate",
        "/v2/import/validate",
        batch(simple_schema.clone(), one.clone())
            .to_string()
            .into_bytes(),
    );
    add("scalar to validate", "/v2/import/validate", b"42".to_vec());
    cases
}

/// Checks one answer: a 2xx, or a 4xx in Stitch's error shape. Returns a problem, if any.
fn check_answer(what: &str, reply: &Reply, took: Duration) -> Option<String> {
    if took > Duration::from_secs(10) {
        return Some(format!("{what}: took {took:?}"));
    }
    match reply.status {
        200 | 201 => None,
        400..=499 => {
            let body: Value = serde_json::from_str(&reply.text).unwrap_or(Value::Null);
            let shaped = body["status"] == "ERROR"
                && body["error"].as_str().is_some_and(|e| !e.is_empty())
                && body["errors"].is_array();
            (!shaped).then(|| {
                format!(
                    "{what}: {} without the Stitch error shape: {}",
                    reply.status, reply.text
                )
            })
        }
        status => Some(format!("{what}: status {status}: {}", short(&reply.text))),
    }
}

fn short(text: &str) -> String {
    text.chars().take(300).collect()
}

/// Loads everything accepted: the pass must succeed and leave nothing staged.
fn assert_everything_accepted_loads(db: &TestDb) {
    load(db);
    let status = loader_status(db);
    let pending = status["pending"]
        .as_array()
        .map(|p| {
            p.iter()
                .map(|t| t["pending"].as_i64().unwrap_or(0))
                .sum::<i64>()
        })
        .unwrap_or(0);
    assert_eq!(pending, 0, "records left in staging after a pass: {status}");
}

fn hostile_stitch_bodies_get_a_2xx_or_a_4xx_never_a_5xx(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[QUIET]);
    let (_, key) = issue_key(&db, CLIENT, "hostile stitch");
    let cases = hostile_cases();
    let mut problems = Vec::new();
    let (mut accepted, mut refused) = (0, 0);
    for (what, path, body) in &cases {
        let started = Instant::now();
        let reply = post(&server, path, &key, body);
        if let Some(problem) = check_answer(what, &reply, started.elapsed()) {
            problems.push(problem);
        }
        if reply.status < 300 {
            eprintln!("accepted: {what}");
            accepted += 1;
        } else {
            refused += 1;
        }
    }
    server.get("/v2/import/status").assert_status(200);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_everything_accepted_loads(&db);
    eprintln!(
        "{backend:?}: {} hostile Stitch bodies: {accepted} accepted, {refused} refused with a 4xx, no 5xx",
        cases.len()
    );
    // Refusals must be the majority here; a server accepting everything would be broken too.
    assert!(refused > accepted, "{refused} refused, {accepted} accepted");
}

/// One valid body and a mutation of it.
#[derive(Debug, Clone)]
enum Mutation {
    /// Overwrite a byte at a relative position.
    Byte(prop::sample::Index, u8),
    /// Cut the body at a relative position.
    Truncate(prop::sample::Index),
    /// Replace one field's value with another JSON value.
    Field(usize, Value),
}

fn any_json() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| json!(i)),
        any::<f64>().prop_map(|f| json!(f)),
        "\\PC{0,12}".prop_map(Value::String),
        Just(json!([])),
        Just(json!({})),
        Just(json!(["id"])),
        Just(json!({"id": null})),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<prop::sample::Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Byte(i, b)),
        any::<prop::sample::Index>().prop_map(Mutation::Truncate),
        (0usize..16, any_json()).prop_map(|(f, v)| Mutation::Field(f, v)),
    ]
}

const FIELDS: [&str; 8] = [
    "client_id",
    "table_name",
    "sequence",
    "action",
    "key_names",
    "data",
    "schema",
    "messages",
];

fn mutate(base: &Value, mutation: &Mutation) -> Vec<u8> {
    match mutation {
        Mutation::Byte(at, byte) => {
            let mut bytes = base.to_string().into_bytes();
            let i = at.index(bytes.len());
            bytes[i] = *byte;
            bytes
        }
        Mutation::Truncate(at) => {
            let bytes = base.to_string().into_bytes();
            let i = at.index(bytes.len());
            bytes[..i].to_vec()
        }
        Mutation::Field(f, value) => {
            let mut body = base.clone();
            let field = FIELDS[f % FIELDS.len()];
            let target = match &mut body {
                Value::Array(items) => items.first_mut(),
                other => Some(other),
            };
            if let Some(Value::Object(fields)) = target {
                fields.insert(field.to_owned(), value.clone());
            }
            body.to_string().into_bytes()
        }
    }
}

fn the_stitch_parsers_survive_random_mutations(backend: Backend) {
    const CASES: u32 = 400;
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[QUIET]);
    let (_, key) = issue_key(&db, CLIENT, "fuzz stitch");
    let push_body = json!([
        push_record(
            "fuzz_push",
            json!(5),
            json!({"id": 1, "a": {"b": [1, 2]}, "t": "2026-11-26T10:00:00Z"})
        ),
        push_record("fuzz_other", json!(6), json!({"id": "k", "x": true})),
    ]);
    let batch_body = json!({
        "table_name": "fuzz_batch", "key_names": ["id"], "table_version": 2,
        "schema": {"properties": {"id": {"type": "integer"}, "at": {"type": ["null", "string"], "format": "date-time"},
                                   "tags": {"type": "array", "items": {"type": "string"}}}},
        "messages": [
            {"action": "upsert", "sequence": 1, "data": {"id": 1, "at": "2026-11-26T10:00:00Z", "tags": ["a"]}},
            {"action": "activate_version", "sequence": 2}
        ]
    });
    let mut runner = TestRunner::new(Config {
        cases: CASES,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x0057_17c4),
        // ChaCha is slow unoptimised; the seed only needs to be reproducible.
        rng_algorithm: RngAlgorithm::XorShift,
        max_shrink_iters: 64,
        source_file: None,
        ..Config::default()
    });
    let problems = std::cell::RefCell::new(Vec::new());
    let counts = std::cell::RefCell::new([0usize; 2]);
    let started = Instant::now();
    let outcome = runner.run(&(any::<bool>(), mutation()), |(is_batch, m)| {
        let (path, base) = if is_batch {
            ("/v2/import/batch", &batch_body)
        } else {
            ("/v2/import/push", &push_body)
        };
        let body = mutate(base, &m);
        let begun = Instant::now();
        let reply = post(&server, path, &key, &body);
        counts.borrow_mut()[usize::from(reply.status >= 300)] += 1;
        if let Some(problem) = check_answer(&format!("{path} {m:?}"), &reply, begun.elapsed()) {
            problems.borrow_mut().push(problem);
        }
        Ok(())
    });
    let (problems, counts) = (problems.into_inner(), counts.into_inner());
    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    server.get("/v2/import/status").assert_status(200);
    assert_everything_accepted_loads(&db);
    eprintln!(
        "{backend:?}: {CASES} mutated Stitch bodies in {:?}: {} accepted, {} refused with a 4xx, no 5xx",
        started.elapsed(),
        counts[0],
        counts[1]
    );
    assert!(
        counts[0] > 0 && counts[1] > 0,
        "mutations should both pass and fail: {counts:?}"
    );
}
