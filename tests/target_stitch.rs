//! A real Singer target against Intake: `target-stitch` (the Python program Stitch's own
//! pipelines run) reads a Singer stream from a file and sends it to the real `intake-server`
//! as Stitch Import API v2 batches (`POST /v2/import/batch`); one `intake-loader` pass then moves
//! it into the warehouse, which is read back with SQL, on SQLite and on PostgreSQL.
//!
//! The stream, tests/fixtures/target-stitch.singer.jsonl, has:
//!
//! - `users` (key `id`) and `orders` (key `order_id`), whose JSON Schemas declare an integer,
//!   a number, a boolean, a `date-time` string, a plain string whose values look like dates
//!   (`legacy_code`: it must stay text, which only typing by the schema can tell), a nested
//!   object (`address`), arrays of strings (`users.tags`) and of objects (`orders.items`) and
//!   nullable types (`["null", "integer"]`, ...). Some numbers are sent without a fraction
//!   (`"score": 7`), which must still land in a double column;
//! - newer versions of earlier keys, in a later request (users 1, order 101) and in the same
//!   request (user 3): the newer one wins, whole, including its array's rows;
//! - `products` (key `sku`), replicated as full tables: version 1 (A, B, C) then version 2
//!   (A, C), each closed by `ACTIVATE_VERSION`, so B must be gone;
//! - `STATE` messages: target-stitch prints a state on stdout only once every batch sent before
//!   it has been answered with a 2xx, so its last output line must be the last state sent.
//!
//! target-stitch runs with `--max-batch-records 3` (and a batch delay long enough never to
//! matter), so the stream goes out as nine requests whose split does not depend on timing.
//!
//! target-stitch itself lives in a Python virtual environment built once, from the pinned
//! tests/python/requirements-target-stitch.txt, under `target/python/target-stitch-<version>`.
//! Without `python3` on the PATH the test says so loudly on stderr and passes without running;
//! any other failure fails it.

mod support;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::BigInt;
use serde_json::{Value, json};
use support::python::{PythonEnv, PythonTool, run_to_end};
use support::{
    Backend, DbConnection, Server, TestDb, both_backends, declared_type, issue_key, load,
    primary_key, warehouse_columns, warehouse_count, warehouse_rows, warehouse_tables,
};

both_backends!(a_singer_stream_sent_by_target_stitch_lands_typed_in_the_warehouse);

const CLIENT: i64 = 77;

/// target-stitch and its pinned dependencies; the environment is rebuilt when they change.
const TARGET_STITCH: PythonTool = PythonTool {
    package: "target-stitch",
    requirements: include_str!("python/requirements-target-stitch.txt"),
};

/// The Singer stream fed to target-stitch on stdin.
const SINGER_STREAM: &str = include_str!("fixtures/target-stitch.singer.jsonl");

/// The system columns of every warehouse table (docs/warehouse.md).
const SYSTEM_COLUMNS: [&str; 3] = ["_intake_seq", "_intake_received_at", "_intake_loaded_at"];

/// The system columns root tables also have once Stitch batches can write them.
const ROOT_SYSTEM_COLUMNS: [&str; 2] = ["_intake_client_seq", "_intake_table_version"];

/// target-stitch sends this stream in well under a second; anything near this is a hang.
const TARGET_TIMEOUT: Duration = Duration::from_secs(60);

fn a_singer_stream_sent_by_target_stitch_lands_typed_in_the_warehouse(backend: Backend) {
    let Some(venv) = TARGET_STITCH.environment("the target-stitch test") else {
        return;
    };
    let started = Instant::now();
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, api_key) = issue_key(&db, CLIENT, "target-stitch");

    let sent = Instant::now();
    let emitted_states = run_target_stitch(&venv, &db, &server, &api_key);
    let target_time = sent.elapsed();
    assert_states(&emitted_states);

    load(&db);
    assert_staging_is_empty(&db);
    assert_nothing_rejected(&db);

    let mut tables: Vec<String> = warehouse_tables(&db, CLIENT)
        .into_iter()
        .filter(|t| !t.starts_with("_intake_"))
        .collect();
    tables.sort();
    assert_eq!(
        tables,
        [
            "orders",
            "orders__items",
            "page_views",
            "products",
            "users",
            "users__tags"
        ],
        "the data tables of client {CLIENT}"
    );

    assert_users(&db);
    assert_orders(&db);
    assert_products(&db);
    assert_page_views(&db);

    eprintln!(
        "target-stitch on {backend:?}: stream sent in {target_time:.2?}, whole test {:.2?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// What the warehouse must hold.

fn assert_users(db: &TestDb) {
    assert_columns(
        db,
        "users",
        &[
            ("id", "bigint"),
            ("name", "text"),
            ("score", "double"),
            ("active", "boolean"),
            ("updated_at", "timestamptz"),
            ("legacy_code", "text"),
            ("age", "bigint"),
            ("address__city", "text"),
            ("address__zip", "text"),
        ],
        true,
    );
    assert_eq!(
        primary_key(db, CLIENT, "users"),
        ["id"],
        "users' primary key"
    );
    let users = warehouse_rows(db, CLIENT, "users", "\"id\"");
    assert_rows(
        "users",
        &users,
        &[
            // Sent first in the first request, then replaced from the fifth.
            json!({"id": 1, "name": "Ann B.", "score": 12.5, "active": false,
                   "updated_at": "2024-03-05T08:00:00.000000Z",
                   "legacy_code": "2024-03-05T08:00:00Z", "age": 34,
                   "address__city": "Basel", "address__zip": "4001",
                   "_intake_table_version": null}),
            json!({"id": 2, "name": "Bob", "score": 7.0, "active": false,
                   "updated_at": "2024-03-02T09:30:00.500000Z",
                   "legacy_code": "2019-12-31 23:59:59", "age": 41,
                   "address__city": "Bern", "address__zip": "3000",
                   "_intake_table_version": null}),
            // Both versions in one request: the later one, whose age is null.
            json!({"id": 3, "name": "Cem v2", "score": 2.5, "active": true,
                   "updated_at": "2024-03-03T01:00:00.000000Z",
                   "legacy_code": "2024-03-03", "age": null,
                   "address__city": "Chur", "address__zip": "7000",
                   "_intake_table_version": null}),
        ],
    );
    let client_seq = |row: &Value| {
        row["_intake_client_seq"]
            .as_i64()
            .unwrap_or_else(|| panic!("users: _intake_client_seq is not an integer in {row:#}"))
    };
    assert!(
        client_seq(&users[0]) > client_seq(&users[1]),
        "user 1's winning version was sent after user 2, so its client sequence is higher: \
         {users:#?}"
    );

    assert_columns(db, "users__tags", &[("value", "text")], false);
    assert_eq!(
        primary_key(db, CLIENT, "users__tags"),
        ["_intake_root_id", "_intake_pos_0"],
        "users__tags' primary key"
    );
    // User 1's first tags (a, b, c) went with its first version; user 2 sent an empty array.
    assert_rows(
        "users__tags",
        &warehouse_rows(
            db,
            CLIENT,
            "users__tags",
            "\"_intake_root_id\", \"_intake_pos_0\"",
        ),
        &[
            json!({"_intake_root_id": 1, "_intake_pos_0": 0, "value": "d"}),
            json!({"_intake_root_id": 3, "_intake_pos_0": 0, "value": "x"}),
            json!({"_intake_root_id": 3, "_intake_pos_0": 1, "value": "y"}),
        ],
    );
}

fn assert_orders(db: &TestDb) {
    assert_columns(
        db,
        "orders",
        &[
            ("order_id", "bigint"),
            ("user_id", "bigint"),
            ("total", "double"),
            ("paid", "boolean"),
            ("placed_at", "timestamptz"),
            ("note", "text"),
        ],
        true,
    );
    assert_eq!(
        primary_key(db, CLIENT, "orders"),
        ["order_id"],
        "orders' primary key"
    );
    assert_rows(
        "orders",
        &warehouse_rows(db, CLIENT, "orders", "\"order_id\""),
        &[
            json!({"order_id": 101, "user_id": 1, "total": 32.75, "paid": true,
                   "placed_at": "2024-03-01T10:05:00.000000Z", "note": "paid late"}),
            json!({"order_id": 102, "user_id": 2, "total": 5.0, "paid": true,
                   "placed_at": "2024-03-02T11:00:00.000000Z", "note": "gift"}),
        ],
    );

    assert_columns(
        db,
        "orders__items",
        &[("sku", "text"), ("qty", "bigint")],
        false,
    );
    assert_eq!(
        primary_key(db, CLIENT, "orders__items"),
        ["_intake_root_order_id", "_intake_pos_0"],
        "orders__items' primary key"
    );
    // Order 101's first items (A×1, B×2) went with its first version.
    assert_rows(
        "orders__items",
        &warehouse_rows(
            db,
            CLIENT,
            "orders__items",
            "\"_intake_root_order_id\", \"_intake_pos_0\"",
        ),
        &[
            json!({"_intake_root_order_id": 101, "_intake_pos_0": 0, "sku": "B", "qty": 5}),
            json!({"_intake_root_order_id": 102, "_intake_pos_0": 0, "sku": "C", "qty": 3}),
        ],
    );
}

/// A stream without key properties is append-only: every record is a row, repeats too.
fn assert_page_views(db: &TestDb) {
    assert_columns(
        db,
        "page_views",
        &[
            ("__sdc_primary_key", "bigint"),
            ("path", "text"),
            ("seen_at", "timestamptz"),
        ],
        true,
    );
    assert_eq!(primary_key(db, CLIENT, "page_views"), ["__sdc_primary_key"]);
    let paths: Vec<String> = warehouse_rows(db, CLIENT, "page_views", "\"__sdc_primary_key\"")
        .iter()
        .map(|r| r["path"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(paths, ["/", "/pricing", "/"]);
}

fn assert_products(db: &TestDb) {
    // Every price that survives was sent without a fraction: only the schema makes it double.
    assert_columns(
        db,
        "products",
        &[("sku", "text"), ("name", "text"), ("price", "double")],
        true,
    );
    assert_eq!(
        primary_key(db, CLIENT, "products"),
        ["sku"],
        "products' primary key"
    );
    // Version 2 held A and C only: activating it removed B, which only version 1 had.
    assert_rows(
        "products",
        &warehouse_rows(db, CLIENT, "products", "\"sku\""),
        &[
            json!({"sku": "A", "name": "Apple", "price": 2.0, "_intake_table_version": 2}),
            json!({"sku": "C", "name": "Cherry", "price": 4.0, "_intake_table_version": 2}),
        ],
    );
}

/// The table's data columns (those not starting with `_intake_`) are exactly `expected`, with
/// those types, and it has the system columns (a root table also the Stitch ones).
#[track_caller]
fn assert_columns(db: &TestDb, table: &str, expected: &[(&str, &str)], root: bool) {
    let columns: BTreeMap<String, String> = warehouse_columns(db, CLIENT, table)
        .into_iter()
        .map(|c| (c.name, c.sql_type))
        .collect();
    let data: BTreeMap<&str, &str> = columns
        .iter()
        .filter(|(name, _)| !name.starts_with("_intake_"))
        .map(|(name, sql_type)| (name.as_str(), sql_type.as_str()))
        .collect();
    let wanted: BTreeMap<&str, &str> = expected
        .iter()
        .map(|(name, t)| (*name, declared_type(db.backend, t)))
        .collect();
    assert_eq!(data, wanted, "{table}: data columns and their types");

    let mut system: Vec<&str> = SYSTEM_COLUMNS.to_vec();
    if root {
        system.extend(ROOT_SYSTEM_COLUMNS);
    }
    let missing: Vec<&str> = system
        .into_iter()
        .filter(|c| !columns.contains_key(*c))
        .collect();
    assert!(
        missing.is_empty(),
        "{table} lacks the system columns {missing:?}; it has {columns:#?}"
    );
}

/// `actual` has as many rows as `expected`, and each row has the expected values in the
/// columns `expected` names (numbers compared as numbers: the column types are checked apart).
#[track_caller]
fn assert_rows(table: &str, actual: &[Value], expected: &[Value]) {
    let projected: Vec<Value> = actual
        .iter()
        .zip(expected)
        .map(|(row, want)| {
            let fields = want.as_object().expect("expected rows are objects");
            Value::Object(
                fields
                    .keys()
                    .map(|k| {
                        (
                            k.clone(),
                            row.get(k).cloned().unwrap_or(json!("<no such column>")),
                        )
                    })
                    .collect(),
            )
        })
        .collect();
    let same = actual.len() == expected.len()
        && projected
            .iter()
            .zip(expected)
            .all(|(got, want)| same_values(got, want));
    assert!(
        same,
        "{table}: expected rows {expected:#?}\ngot {projected:#?}\n(whole rows: {actual:#?})"
    );
}

fn same_values(got: &Value, want: &Value) -> bool {
    match (got, want) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, v)| b.get(k).is_some_and(|w| same_values(v, w)))
        }
        _ => got == want,
    }
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// One loader pass moved everything target-stitch sent, activation markers included.
fn assert_staging_is_empty(db: &TestDb) {
    let left: Vec<Count> =
        DbConnection::open(db).load("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM staged_records");
    assert_eq!(left[0].n, 0, "records still staged after a loader pass");
}

fn assert_nothing_rejected(db: &TestDb) {
    if warehouse_tables(db, CLIENT)
        .iter()
        .any(|t| t == "_intake_rejected")
        && warehouse_count(db, CLIENT, "_intake_rejected") > 0
    {
        panic!(
            "the loader rejected records: {:#?}",
            warehouse_rows(db, CLIENT, "_intake_rejected", "\"seq\"")
        );
    }
}

/// target-stitch wrote only states the stream sent, in the order sent, more than one (so
/// some were emitted while the stream was still being sent), and the last one last.
#[track_caller]
fn assert_states(emitted: &[Value]) {
    let sent: Vec<Value> = SINGER_STREAM
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str::<Value>(l).expect("the fixture is JSON lines"))
        .filter(|m| m["type"] == "STATE")
        .map(|m| m["value"].clone())
        .collect();
    let mut next = 0;
    for state in emitted {
        match sent[next..].iter().position(|s| s == state) {
            Some(at) => next += at + 1,
            None => panic!(
                "target-stitch printed a state that the stream did not send, or out of order: \
                 {state}\nprinted: {emitted:#?}\nsent: {sent:#?}"
            ),
        }
    }
    assert!(
        emitted.len() >= 2,
        "target-stitch printed {} states; with 3 records a batch it emits some before the \
         end: {emitted:#?}",
        emitted.len()
    );
    assert_eq!(
        emitted.last(),
        sent.last(),
        "target-stitch's last line must be the stream's last state"
    );
}

// ---------------------------------------------------------------------------------------------
// Running target-stitch.

/// Sends the fixture through target-stitch to `server`; it must exit 0. Returns the states it
/// printed on stdout, one JSON document a line.
fn run_target_stitch(venv: &PythonEnv, db: &TestDb, server: &Server, api_key: &str) -> Vec<Value> {
    let dir = db.dir();
    let batch_url = server.url("/v2/import/batch");
    let config = json!({
        "token": api_key,
        "client_id": CLIENT,
        "small_batch_url": batch_url,
        "big_batch_url": batch_url,
        "batch_size_preferences": {},
        "disable_collection": true,
    });
    let config_path = dir.join("target-stitch-config.json");
    fs::write(&config_path, config.to_string()).expect("writing the target-stitch config");
    let stream_path = dir.join("singer-stream.jsonl");
    fs::write(&stream_path, SINGER_STREAM).expect("writing the Singer stream");

    let mut cmd = venv.python();
    cmd.arg(venv.script("target-stitch"))
        .arg("--config")
        .arg(&config_path)
        .args(["--max-batch-records", "3", "--batch-delay-seconds", "600"])
        .current_dir(dir)
        .stdin(File::open(&stream_path).expect("opening the Singer stream"));
    let run = run_to_end(cmd, dir, "target-stitch", TARGET_TIMEOUT);
    let server_log_tail = || {
        let logs = server.logs();
        logs[logs.len().saturating_sub(60)..].join("\n")
    };
    assert!(
        run.status.is_some_and(|s| s.success()),
        "target-stitch {} \nstdout:\n{}\nstderr:\n{}\nlast server log lines:\n{}",
        run.outcome(),
        run.stdout,
        run.stderr,
        server_log_tail()
    );
    run.stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| {
                panic!("target-stitch printed a line that is not a JSON state ({e}): {l:?}")
            })
        })
        .collect()
}
