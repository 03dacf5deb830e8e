//! The loader as an analyst meets it: records pushed through the real `intake-server`, moved by
//! the real `intake-loader`, then read straight out of the warehouse tables with SQL. Each test
//! checks a promise of docs/warehouse.md, on SQLite and on PostgreSQL.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Double, Nullable, Text};
use serde_json::{Value, json};
use support::{
    Backend, DbConnection, LoaderProcess, Server, TestDb, both_backends, column_types,
    declared_type, issue_key, load, loader_status, poll, primary_key, run_cli, run_loader,
    sql_literal, staged_rows, staged_times, table_ref, warehouse_columns, warehouse_count,
    warehouse_rows, warehouse_tables,
};

both_backends!(
    a_large_chunk_loads_alike_with_one_writer_or_two,
    a_schema_that_grows_chunk_by_chunk_loads_alike_with_or_without_read_ahead,
    a_database_error_in_a_shared_chunk_rejects_only_the_record_at_fault,
    a_share_that_fails_holds_up_no_later_chunk_and_reorders_no_version,
    a_chunk_holds_no_more_bytes_than_configured,
    records_read_apart_for_their_size_load_whole,
    child_rows_left_by_a_root_deleted_by_hand_do_not_block_its_next_version,
    a_nested_record_becomes_typed_columns,
    integers_beyond_64_bits_are_kept_exactly_as_text,
    arrays_become_child_tables,
    an_array_in_an_object_and_an_array_in_array_elements_stay_apart,
    the_newest_version_of_a_key_wins,
    a_new_version_replaces_the_whole_record_and_its_child_rows,
    keys_below_between_and_above_the_stored_ones_load_in_one_go,
    many_updates_with_a_few_new_keys_among_them_load_in_one_go,
    an_older_record_never_overwrites_a_newer_one,
    a_value_of_another_type_goes_to_a_typed_sibling_column,
    lossless_conversions_stay_in_the_first_column,
    an_integer_column_made_mid_chunk_takes_every_later_integer,
    column_names_are_cleaned_shortened_and_recorded,
    fields_whose_names_collide_get_distinct_columns,
    hostile_field_names_load_without_touching_system_columns,
    records_that_cannot_be_loaded_are_rejected_and_the_rest_loads,
    status_reports_pending_records_then_loads_and_rejections,
    watch_loads_new_records_until_stopped,
    the_embedded_loader_loads_without_a_separate_loader,
    the_embedded_loader_is_on_by_default_for_sqlite_only,
    a_pushed_table_never_mixes_with_a_child_or_system_table_of_the_same_name,
    a_database_error_rejects_only_the_records_at_fault,
    a_table_that_cannot_be_loaded_fails_the_run_but_not_the_others,
    the_chunk_size_comes_from_the_flag_or_the_configuration,
    more_than_1500_columns_overflow_into_one_json_column,
    run_fails_when_the_database_is_unreachable,
    the_loader_names_postgresql_settings_that_slow_a_large_load,
);

const CLIENT: i64 = 42;

/// The system columns every warehouse table has.
/// (Root tables also have `_intake_client_seq` and `_intake_table_version`, NULL for RJMetrics
/// records.)
const SYSTEM_COLUMNS: [&str; 5] = [
    "_intake_seq",
    "_intake_received_at",
    "_intake_loaded_at",
    "_intake_client_seq",
    "_intake_table_version",
];

/// A server with the embedded loader off, and an API key for [`CLIENT`].
fn start(db: &TestDb) -> (Server, String) {
    let server = Server::start(db, &[]);
    let (_, key) = issue_key(db, CLIENT, "loader tests");
    (server, key)
}

/// Pushes `records` to `table` in one request; all must be accepted.
#[track_caller]
fn push(server: &Server, key: &str, table: &str, records: &[Value]) {
    let body = Value::Array(records.to_vec()).to_string();
    let accepted = server.push(CLIENT, table, key, &body).assert_created();
    assert_eq!(accepted, records.len() as u64, "records accepted");
}

/// Pushes each record in a request of its own, in order.
#[track_caller]
fn push_each(server: &Server, key: &str, table: &str, records: &[Value]) {
    for record in records {
        push(server, key, table, std::slice::from_ref(record));
    }
}

/// The columns of a table that hold pushed data (not the system columns).
fn data_columns(db: &TestDb, table: &str) -> BTreeSet<String> {
    column_types(db, CLIENT, table)
        .into_keys()
        .filter(|c| !SYSTEM_COLUMNS.contains(&c.as_str()))
        .collect()
}

/// The tables of [`CLIENT`] that hold pushed data (not `_intake_*`).
fn data_tables(db: &TestDb) -> Vec<String> {
    warehouse_tables(db, CLIENT)
        .into_iter()
        .filter(|t| !t.starts_with("_intake_"))
        .collect()
}

/// The rows of one of [`CLIENT`]'s tables.
/// Checks a child table two array levels deep whose elements are scalars: its primary key,
/// the type of its `value` column, and its rows as `[root id, outer position, inner
/// position, value]`.
fn assert_two_level_values(db: &TestDb, table: &str, value_type: String, expected: &[Value]) {
    let positions = ["_intake_root_id", "_intake_pos_0", "_intake_pos_1"];
    assert_eq!(primary_key(db, CLIENT, table), positions, "{table}");
    assert_eq!(
        column_types(db, CLIENT, table)["value"],
        value_type,
        "{table}"
    );
    let order: Vec<String> = positions.iter().map(|c| format!("\"{c}\"")).collect();
    let found: Vec<Value> = rows(db, table, &order.join(", "))
        .iter()
        .map(|r| pick(r, &[positions[0], positions[1], positions[2], "value"]))
        .collect();
    assert_eq!(found, expected, "{table}");
}

/// The row's values of `columns`, as one array.
fn pick(row: &Value, columns: &[&str]) -> Value {
    Value::Array(columns.iter().map(|c| row[*c].clone()).collect())
}

fn rows(db: &TestDb, table: &str, order_by: &str) -> Vec<Value> {
    warehouse_rows(db, CLIENT, table, order_by)
}

/// The row whose `column` equals `value`.
#[track_caller]
fn row_where<'a>(rows: &'a [Value], column: &str, value: &Value) -> &'a Value {
    rows.iter()
        .find(|r| &r[column] == value)
        .unwrap_or_else(|| panic!("no row with {column} = {value} in {rows:#?}"))
}

/// One row of `_intake_columns`: `(table_name, source_path, value_type, column_name)`.
type Mapping = (String, Vec<String>, String, String);

/// Every recorded column mapping of [`CLIENT`].
fn mappings(db: &TestDb) -> Vec<Mapping> {
    rows(db, "_intake_columns", "\"id\"")
        .into_iter()
        .filter_map(|m| {
            let text = |f: &str| {
                m[f].as_str()
                    .unwrap_or_else(|| panic!("_intake_columns.{f} is not text: {m}"))
                    .to_owned()
            };
            // Checked on its own by `assert_source_paths_are_field_paths`.
            let path: Vec<String> = serde_json::from_str(&text("source_path")).ok()?;
            Some((
                text("table_name"),
                path,
                text("value_type"),
                text("column_name"),
            ))
        })
        .collect()
}

/// docs/warehouse.md: "`source_path` is the JSON array of original field names".
#[track_caller]
fn assert_source_paths_are_field_paths(db: &TestDb) {
    let odd: Vec<Value> = rows(db, "_intake_columns", "\"id\"")
        .into_iter()
        .filter(|m| {
            let path = m["source_path"].as_str().unwrap_or_default();
            !matches!(serde_json::from_str(path), Ok(Value::Array(parts))
                if parts.iter().all(Value::is_string))
        })
        .collect();
    assert!(
        odd.is_empty(),
        "_intake_columns rows whose source_path is not a JSON array of field names: {odd:#?}"
    );
}

/// The columns recorded for a field path of a table (one per value type it arrived as).
#[track_caller]
fn columns_of(mappings: &[Mapping], table: &str, path: &[&str]) -> Vec<String> {
    let found: Vec<String> = mappings
        .iter()
        .filter(|(t, p, _, _)| t == table && *p == path)
        .map(|(_, _, _, c)| c.clone())
        .collect();
    assert!(
        !found.is_empty(),
        "_intake_columns has nothing for {table} {path:?}: {mappings:#?}"
    );
    found
}

/// The one column recorded for a field path of a table.
#[track_caller]
fn column_of(mappings: &[Mapping], table: &str, path: &[&str]) -> String {
    let found = columns_of(mappings, table, path);
    assert_eq!(found.len(), 1, "{table} {path:?} has one column: {found:?}");
    found[0].clone()
}

/// `name` is `<head>_<8 lower-case hex digits>` and at most 63 bytes.
fn is_hash_suffixed(name: &str, head: &str) -> bool {
    name.len() <= 63
        && name.len() == head.len() + 9
        && name.starts_with(head)
        && name[head.len()..].starts_with('_')
        && name[head.len() + 1..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Every record loaded: nothing left in staging.
#[track_caller]
fn assert_staging_empty(db: &TestDb) {
    let left = staged_rows(db);
    assert!(left.is_empty(), "staging must be empty: {left:?}");
}

fn a_nested_record_becomes_typed_columns(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    push(
        &server,
        &key,
        "orders",
        &[
            json!({
                "id": 7, "keys": ["id"],
                "count": 3, "ratio": 0.25, "thousand": 1e3,
                "paid": true, "gift": false, "status": "paid",
                "at_utc": "2024-03-01T10:20:30Z",
                "at_naive": "2024-03-01 10:20:30",
                "at_offset": "2024-03-01T12:20:30+02:00",
                "at_fraction": "2024-03-01 08:50:30.25-0130",
                "just_a_date": "2024-03-01",
                "customer": {"name": "Ann", "address": {"city": "Zürich", "zip": null}},
                "empty": {},
                "nothing": null
            }),
            json!({"id": 8, "keys": ["id"], "status": "new"}),
        ],
    );
    // A key field keeps strings as text even when they look like date-times.
    push(
        &server,
        &key,
        "days",
        &[json!({"day": "2024-03-01T00:00:00Z", "keys": ["day"], "visits": 12})],
    );
    let received = staged_times(&db, CLIENT, "orders");
    assert_eq!(received.len(), 2);
    load(&db);
    assert_staging_empty(&db);

    let ty = |t| declared_type(backend, t).to_owned();
    let expected: BTreeMap<String, String> = [
        ("id", "bigint"),
        ("count", "bigint"),
        ("ratio", "double"),
        ("thousand", "double"),
        ("paid", "boolean"),
        ("gift", "boolean"),
        ("status", "text"),
        ("at_utc", "timestamptz"),
        ("at_naive", "timestamptz"),
        ("at_offset", "timestamptz"),
        ("at_fraction", "timestamptz"),
        ("just_a_date", "text"),
        ("customer__name", "text"),
        ("customer__address__city", "text"),
        ("_intake_seq", "bigint"),
        ("_intake_received_at", "timestamptz"),
        ("_intake_loaded_at", "timestamptz"),
        ("_intake_client_seq", "bigint"),
        ("_intake_table_version", "bigint"),
    ]
    .into_iter()
    .map(|(c, t)| (c.to_owned(), ty(t)))
    .collect();
    // No column for `keys`, for the empty object, or for fields that were only ever null.
    assert_eq!(column_types(&db, CLIENT, "orders"), expected);
    assert_eq!(primary_key(&db, CLIENT, "orders"), ["id"]);
    assert_eq!(
        warehouse_tables(&db, CLIENT),
        [
            "_intake_columns",
            "_intake_load_history",
            "_intake_rejected",
            "_intake_tables",
            "days",
            "orders",
        ]
    );

    let orders = rows(&db, "orders", "\"id\"");
    assert_eq!(orders.len(), 2, "{orders:#?}");
    let first = &orders[0];
    let loaded_at = first["_intake_loaded_at"].clone();
    let expected_first = json!({
        "id": 7, "count": 3, "ratio": 0.25, "thousand": 1000.0,
        "paid": true, "gift": false, "status": "paid",
        "at_utc": "2024-03-01T10:20:30.000000Z",
        "at_naive": "2024-03-01T10:20:30.000000Z",
        "at_offset": "2024-03-01T10:20:30.000000Z",
        "at_fraction": "2024-03-01T10:20:30.250000Z",
        "just_a_date": "2024-03-01",
        "customer__name": "Ann",
        "customer__address__city": "Zürich",
        "_intake_seq": received[0].0,
        "_intake_received_at": received[0].1,
        "_intake_loaded_at": loaded_at,
        // Only Stitch records have a client sequence and a table version.
        "_intake_client_seq": null,
        "_intake_table_version": null,
    });
    assert_eq!(first, &expected_first);
    // The second record lacks most fields: they are NULL.
    let second = &orders[1];
    assert_eq!(second["id"], 8);
    assert_eq!(second["status"], "new");
    assert_eq!(second["_intake_seq"], received[1].0);
    assert_eq!(second["_intake_received_at"], received[1].1);
    for column in ["count", "ratio", "paid", "at_utc", "customer__name"] {
        assert_eq!(second[column], Value::Null, "{column} of record 8");
    }
    // Loaded after it was received.
    for row in &orders {
        let received = row["_intake_received_at"]
            .as_str()
            .expect("a received time");
        let loaded = row["_intake_loaded_at"].as_str().expect("a loaded time");
        assert!(
            loaded >= received,
            "loaded {loaded} before received {received}"
        );
    }

    let days = column_types(&db, CLIENT, "days");
    assert_eq!(days["day"], ty("text"), "{days:?}");
    assert_eq!(days["visits"], ty("bigint"), "{days:?}");
    assert_eq!(primary_key(&db, CLIENT, "days"), ["day"]);
    let day_rows = rows(&db, "days", "\"day\"");
    assert_eq!(day_rows.len(), 1);
    assert_eq!(day_rows[0]["day"], "2024-03-01T00:00:00Z");
}

fn integers_beyond_64_bits_are_kept_exactly_as_text(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    // Sent as raw text: these numbers must reach the loader exactly as written.
    let record = r#"{"id":1,"keys":["id"],"small":9223372036854775807,"unsigned":18446744073709551615,"huge":123456789012345678901234567890,"negative":-98765432109876543210}"#;
    server
        .push(CLIENT, "numbers", &key, record)
        .assert_created();
    load(&db);
    assert_staging_empty(&db);

    let types = column_types(&db, CLIENT, "numbers");
    let row = &rows(&db, "numbers", "\"id\"")[0];
    assert_eq!(types["small"], declared_type(backend, "bigint"));
    assert_eq!(row["small"], i64::MAX);
    for (column, digits) in [
        ("unsigned", "18446744073709551615"),
        ("huge", "123456789012345678901234567890"),
        ("negative", "-98765432109876543210"),
    ] {
        assert_eq!(
            (types[column].as_str(), &row[column]),
            (declared_type(backend, "text"), &json!(digits)),
            "{column}: an integer beyond 64 bits must be text with its exact digits"
        );
    }
}

/// A row of the join docs/warehouse.md shows under "Querying".
#[derive(Debug, PartialEq, QueryableByName)]
struct OrderItem {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = Nullable<Text>)]
    status: Option<String>,
    #[diesel(sql_type = Nullable<Double>)]
    total: Option<f64>,
    #[diesel(sql_type = Nullable<Text>)]
    sku: Option<String>,
    #[diesel(sql_type = Nullable<BigInt>)]
    qty: Option<i64>,
}

fn arrays_become_child_tables(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    // The example of docs/warehouse.md, plus arrays of arrays and an array in a nested object.
    push(
        &server,
        &key,
        "orders",
        &[
            json!({"id": 7, "keys": ["id"],
                   "status": "paid", "total": 19.99, "gift": false,
                   "created_at": "2026-03-01 10:20:30",
                   "customer": {"name": "Ann", "address": {"city": "Zürich"}, "phones": ["+41 1", "+41 2"]},
                   "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-9", "qty": 1, "tags": ["red", "xl"]}],
                   "matrix": [[1, 2], [3]]}),
            json!({"id": 8, "keys": ["id"], "status": "new", "items": [{"sku": "C-3", "qty": 5}]}),
        ],
    );
    // A composite key, with a name that needs cleaning, reaches every child table.
    push(
        &server,
        &key,
        "lines",
        &[
            json!({"shop": "zh", "Order ID": 1, "keys": ["shop", "Order ID"], "parts": [{"n": 1}, {"n": 2}]}),
        ],
    );
    let seqs = staged_times(&db, CLIENT, "orders");
    load(&db);
    assert_staging_empty(&db);

    // An element that is itself an array has no fields of its own; whether its level gets a
    // table of key columns only (`orders__matrix`) is not specified, so it may or may not exist.
    let mut tables = data_tables(&db);
    tables.retain(|t| t != "orders__matrix");
    assert_eq!(
        tables,
        [
            "lines",
            "lines__parts",
            "orders",
            "orders__customer__phones",
            "orders__items",
            "orders__items__tags",
            "orders__matrix__value",
        ]
    );
    assert!(
        !data_columns(&db, "orders")
            .iter()
            .any(|c| c.starts_with("items")
                || c.starts_with("matrix")
                || c.starts_with("customer__phones")),
        "arrays are not columns of the root: {:?}",
        data_columns(&db, "orders")
    );

    let ty = |t| declared_type(backend, t).to_owned();
    let items = column_types(&db, CLIENT, "orders__items");
    assert_eq!(
        items,
        [
            ("_intake_root_id", "bigint"),
            ("_intake_pos_0", "bigint"),
            ("sku", "text"),
            ("qty", "bigint"),
            ("_intake_seq", "bigint"),
            ("_intake_received_at", "timestamptz"),
            ("_intake_loaded_at", "timestamptz"),
        ]
        .into_iter()
        .map(|(c, t)| (c.to_owned(), ty(t)))
        .collect::<BTreeMap<_, _>>()
    );
    assert_eq!(
        primary_key(&db, CLIENT, "orders__items"),
        ["_intake_root_id", "_intake_pos_0"]
    );
    let item_rows = rows(
        &db,
        "orders__items",
        "\"_intake_root_id\", \"_intake_pos_0\"",
    );
    assert_eq!(
        item_rows
            .iter()
            .map(|r| pick(
                r,
                &[
                    "_intake_root_id",
                    "_intake_pos_0",
                    "sku",
                    "qty",
                    "_intake_seq"
                ]
            ))
            .collect::<Vec<_>>(),
        [
            json!([7, 0, "A-1", 2, seqs[0].0]),
            json!([7, 1, "B-9", 1, seqs[0].0]),
            json!([8, 0, "C-3", 5, seqs[1].0]),
        ]
    );
    for row in &item_rows {
        let root = row["_intake_root_id"].as_i64().expect("a root id");
        let seq = if root == 7 { &seqs[0] } else { &seqs[1] };
        assert_eq!(row["_intake_received_at"], seq.1, "{row}");
        assert!(row["_intake_loaded_at"].is_string(), "{row}");
    }

    assert_two_level_values(
        &db,
        "orders__items__tags",
        ty("text"),
        &[json!([7, 1, 0, "red"]), json!([7, 1, 1, "xl"])],
    );
    assert_two_level_values(
        &db,
        "orders__matrix__value",
        ty("bigint"),
        &[
            json!([7, 0, 0, 1]),
            json!([7, 0, 1, 2]),
            json!([7, 1, 0, 3]),
        ],
    );

    let phones = rows(&db, "orders__customer__phones", "\"_intake_pos_0\"");
    assert_eq!(
        phones
            .iter()
            .map(|r| pick(r, &["_intake_root_id", "_intake_pos_0", "value"]))
            .collect::<Vec<_>>(),
        [json!([7, 0, "+41 1"]), json!([7, 1, "+41 2"])]
    );

    assert_eq!(primary_key(&db, CLIENT, "lines"), ["shop", "order_id"]);
    assert_eq!(
        primary_key(&db, CLIENT, "lines__parts"),
        [
            "_intake_root_shop",
            "_intake_root_order_id",
            "_intake_pos_0"
        ]
    );
    let parts = rows(&db, "lines__parts", "\"_intake_pos_0\"");
    assert_eq!(
        parts
            .iter()
            .map(|r| pick(
                r,
                &[
                    "_intake_root_shop",
                    "_intake_root_order_id",
                    "_intake_pos_0",
                    "n"
                ]
            ))
            .collect::<Vec<_>>(),
        [json!(["zh", 1, 0, 1]), json!(["zh", 1, 1, 2])]
    );

    // `_intake_tables` says what each table holds and where it hangs.
    let catalog = rows(&db, "_intake_tables", "\"table_name\"");
    let described = |table: &str| -> (Value, Value) {
        let entry = row_where(&catalog, "table_name", &json!(table));
        let parse = |field: &str| match entry[field].as_str() {
            Some(text) => serde_json::from_str(text)
                .unwrap_or_else(|e| panic!("{table}.{field} is not JSON ({e}): {entry}")),
            None => Value::Null,
        };
        (parse("source"), parse("parent"))
    };
    assert_eq!(described("orders"), (json!(["orders"]), Value::Null));
    assert_eq!(
        described("orders__items"),
        (json!(["orders", ["items"]]), json!(["orders"]))
    );
    assert_eq!(
        described("orders__items__tags"),
        (
            json!(["orders", ["items"], ["tags"]]),
            json!(["orders", ["items"]])
        )
    );

    // The query of docs/warehouse.md works as written.
    let (orders, items) = (
        table_ref(backend, CLIENT, "orders"),
        table_ref(backend, CLIENT, "orders__items"),
    );
    let joined: Vec<OrderItem> = DbConnection::open(&db).load(&format!(
        "SELECT o.id, o.status, o.total, i.sku, i.qty FROM {orders} o \
         JOIN {items} i ON i._intake_root_id = o.id ORDER BY o.id, i._intake_pos_0"
    ));
    let item = |id, status: &str, total, sku: &str, qty| OrderItem {
        id,
        status: Some(status.to_owned()),
        total,
        sku: Some(sku.to_owned()),
        qty: Some(qty),
    };
    assert_eq!(
        joined,
        [
            item(7, "paid", Some(19.99), "A-1", 2),
            item(7, "paid", Some(19.99), "B-9", 1),
            item(8, "new", None, "C-3", 5),
        ]
    );
}

fn an_array_in_an_object_and_an_array_in_array_elements_stay_apart(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    // `customer` is an object holding an array in one record, and an array of objects holding
    // arrays in another: real feeds do this. Both are valid; neither may be lost or mixed up.
    push(
        &server,
        &key,
        "orders",
        &[
            json!({"id": 1, "keys": ["id"], "customer": {"phones": ["a", "b"]}}),
            json!({"id": 2, "keys": ["id"], "customer": [{"phones": ["c"]}, {"phones": ["d", "e"]}]}),
        ],
    );
    load(&db);
    // The same shapes in separate loads, the other way round.
    push(
        &server,
        &key,
        "accounts",
        &[
            json!({"id": 2, "keys": ["id"], "customer": [{"phones": ["c"]}, {"phones": ["d", "e"]}]}),
        ],
    );
    load(&db);
    push(
        &server,
        &key,
        "accounts",
        &[json!({"id": 1, "keys": ["id"], "customer": {"phones": ["a", "b"]}})],
    );
    load(&db);
    assert_staging_empty(&db);

    let rejected: Vec<Value> = rows(&db, "_intake_rejected", "\"seq\"")
        .iter()
        .map(|r| json!([r["table_name"], r["reason"]]))
        .collect();
    assert_eq!(rejected, Vec::<Value>::new(), "valid records were rejected");
    for root in ["orders", "accounts"] {
        // Every phone, wherever it went, with its root key and positions.
        let mut phones: Vec<Value> = Vec::new();
        for table in data_tables(&db)
            .iter()
            .filter(|t| t.starts_with(&format!("{root}__")))
        {
            let columns = data_columns(&db, table);
            if !columns.contains("value") {
                continue;
            }
            for r in rows(&db, table, "\"_intake_root_id\", \"_intake_pos_0\"") {
                let level_1 = columns
                    .contains("_intake_pos_1")
                    .then(|| r["_intake_pos_1"].clone());
                phones.push(json!([
                    r["_intake_root_id"],
                    r["_intake_pos_0"],
                    level_1,
                    r["value"]
                ]));
            }
        }
        phones.sort_by_key(|p| p.to_string());
        assert_eq!(
            phones,
            [
                json!([1, 0, null, "a"]),
                json!([1, 1, null, "b"]),
                json!([2, 0, 0, "c"]),
                json!([2, 1, 0, "d"]),
                json!([2, 1, 1, "e"]),
            ],
            "{root}: (root id, position, position in the inner array, phone)"
        );
    }

    // The one seen first keeps the plain name, the later one gets the hash suffix, and
    // `_intake_tables` tells them apart: one path per array level in `source`, one position
    // column per level in `key_columns`.
    let catalog = rows(&db, "_intake_tables", "\"table_name\"");
    let depth = |entry: &Value| -> usize {
        let keys: Vec<(String, String)> =
            serde_json::from_str(entry["key_columns"].as_str().unwrap_or("[]")).unwrap_or_default();
        keys.iter()
            .filter(|(name, _)| name.starts_with("_intake_pos_"))
            .count()
    };
    for (root, first_depth) in [("orders", 1), ("accounts", 2)] {
        // A source is the pushed table, then one path per array level; both tables hold
        // the field path customer → phones, split differently.
        let names = |entry: &Value| -> Vec<String> {
            let source: Value = serde_json::from_str(entry["source"].as_str().unwrap_or("null"))
                .unwrap_or_default();
            let mut names = Vec::new();
            for part in source.as_array().into_iter().flatten() {
                match part {
                    Value::String(name) => names.push(name.clone()),
                    Value::Array(path) => {
                        names.extend(path.iter().filter_map(|n| n.as_str()).map(str::to_owned))
                    }
                    _ => {}
                }
            }
            names
        };
        let mut phone_tables: Vec<(usize, String)> = catalog
            .iter()
            .filter(|t| names(t) == [root, "customer", "phones"])
            .map(|t| {
                (
                    depth(t),
                    t["table_name"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        phone_tables.sort();
        assert_eq!(
            phone_tables.iter().map(|t| t.0).collect::<Vec<_>>(),
            [1, 2],
            "{root}: {catalog:#?}"
        );
        let plain = format!("{root}__customer__phones");
        let (first, later) = if first_depth == 1 {
            (&phone_tables[0].1, &phone_tables[1].1)
        } else {
            (&phone_tables[1].1, &phone_tables[0].1)
        };
        assert_eq!(first, &plain, "{root}");
        let source_of = |table: &str| -> Value {
            let entry = row_where(&catalog, "table_name", &json!(table));
            serde_json::from_str(entry["source"].as_str().unwrap_or("null")).unwrap_or_default()
        };
        assert_eq!(
            (source_of(&phone_tables[0].1), source_of(&phone_tables[1].1)),
            (
                json!([root, ["customer", "phones"]]),
                json!([root, ["customer"], ["phones"]])
            ),
            "{root}: the sources docs/warehouse.md describes"
        );
        let suffix = &later[later.len().saturating_sub(9)..];
        assert!(
            later.starts_with(&plain)
                && later.len() <= 63
                && suffix.starts_with('_')
                && suffix[1..].bytes().all(|b| b.is_ascii_hexdigit()),
            "{root}: {later} is not {plain} with a hash suffix"
        );
    }

    // A table's parent is the table it hangs from: for an array inside an object, the table
    // holding the object. `contacts` has no array of customers, so no `contacts__customer`.
    push(
        &server,
        &key,
        "contacts",
        &[json!({"id": 1, "keys": ["id"], "customer": {"phones": ["a"]}})],
    );
    load(&db);
    let catalog = rows(&db, "_intake_tables", "\"table_name\"");
    let phones = row_where(&catalog, "table_name", &json!("contacts__customer__phones"));
    assert_eq!(
        phones["parent"].as_str(),
        Some(json!(["contacts"]).to_string().as_str()),
        "parent of an array inside an object: {phones}"
    );
    let sources: Vec<&str> = catalog
        .iter()
        .filter_map(|t| t["source"].as_str())
        .collect();
    let mut distinct = sources.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        sources.len(),
        "two tables with one source: {sources:?}"
    );
    for entry in &catalog {
        if let Some(parent) = entry["parent"].as_str() {
            assert!(
                sources.contains(&parent),
                "{} names the parent {parent}, which is no table's source",
                entry["table_name"]
            );
        }
    }
}

/// From staging, before a load: the `(v, seq)` of the newest record of each `id`.
fn newest_in_staging(db: &TestDb, table: &str) -> BTreeMap<i64, (i64, i64)> {
    let mut newest = BTreeMap::new();
    for (_, t, seq, record) in staged_rows(db) {
        if t != table {
            continue;
        }
        let record: Value = serde_json::from_str(&record).expect("staged records are JSON");
        let id = record["id"].as_i64().expect("an integer id");
        let v = record["v"].as_i64().expect("an integer v");
        newest.insert(id, (v, seq));
    }
    newest
}

/// `id` → `(v, _intake_seq)` of every row of a table.
fn loaded_versions(db: &TestDb, table: &str) -> BTreeMap<i64, (i64, i64)> {
    rows(db, table, "\"id\"")
        .into_iter()
        .map(|r| {
            let int = |c: &str| r[c].as_i64().unwrap_or_else(|| panic!("{c} of {r}"));
            (int("id"), (int("v"), int("_intake_seq")))
        })
        .collect()
}

fn the_newest_version_of_a_key_wins(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let rec = |id: i64, v: i64| json!({"id": id, "keys": ["id"], "v": v});

    // Several versions of a key in one request, and of another key across requests.
    push(
        &server,
        &key,
        "versions",
        &[rec(1, 1), rec(1, 2), rec(2, 1), rec(1, 3)],
    );
    push_each(&server, &key, "versions", &[rec(3, 1), rec(3, 2)]);
    let expected = newest_in_staging(&db, "versions");
    assert_eq!(
        expected
            .iter()
            .map(|(id, (v, _))| (*id, *v))
            .collect::<Vec<_>>(),
        [(1, 3), (2, 1), (3, 2)]
    );
    load(&db);
    assert_eq!(loaded_versions(&db, "versions"), expected);

    // Later runs: newer versions replace what an earlier run loaded.
    push_each(&server, &key, "versions", &[rec(3, 3), rec(1, 4)]);
    let mut expected_after = expected.clone();
    expected_after.extend(newest_in_staging(&db, "versions"));
    load(&db);
    assert_eq!(loaded_versions(&db, "versions"), expected_after);
    assert_eq!(expected_after[&3].0, 3);
    assert_eq!(expected_after[&1].0, 4);

    // Versions spread over several chunks of one run, one record a chunk.
    // Each version has as many items as its number, so its child rows show which one won.
    let with_items = |id: i64, v: i64| {
        let mut record = rec(id, v);
        record["items"] = json!(vec![v; v as usize]);
        record
    };
    push_each(
        &server,
        &key,
        "chunked",
        &[
            with_items(4, 1),
            with_items(5, 1),
            with_items(4, 3),
            with_items(4, 2),
        ],
    );
    let expected = newest_in_staging(&db, "chunked");
    let out = run_loader(&db, &["run", "--chunk-size", "1"]);
    out.assert_success();
    assert_eq!(loaded_versions(&db, "chunked"), expected);
    assert_eq!(expected[&4].0, 2);
    let items: Vec<Value> = rows(
        &db,
        "chunked__items",
        "\"_intake_root_id\", \"_intake_pos_0\"",
    )
    .iter()
    .map(|r| json!([r["_intake_root_id"], r["_intake_pos_0"], r["value"]]))
    .collect();
    assert_eq!(
        items,
        [json!([4, 0, 2]), json!([4, 1, 2]), json!([5, 0, 1])]
    );
    assert_staging_empty(&db);
}

/// Integer keys below, between and above the stored ones, and stored ones including the
/// largest, in one chunk: the new ones are inserted and the stored ones replaced, with their
/// child rows, in one go (no failed write isolating records: one history row for the chunk).
/// On PostgreSQL only keys up to the largest stored one are looked up; this pins that
/// neither a stored key nor a gap between stored keys is taken for a new one.
fn keys_below_between_and_above_the_stored_ones_load_in_one_go(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    push(
        &server,
        &key,
        "orders",
        &[versioned(10, "a"), versioned(20, "a"), versioned(30, "a")],
    );
    load(&db);
    let chunks_before = rows(&db, "_intake_load_history", "\"id\"").len();

    push(
        &server,
        &key,
        "orders",
        &[
            versioned(5, "b"),
            versioned(20, "b"),
            versioned(25, "b"),
            versioned(30, "b"),
            versioned(40, "b"),
        ],
    );
    load(&db);
    assert_staging_empty(&db);
    assert!(rows(&db, "_intake_rejected", "\"seq\"").is_empty());
    let history = rows(&db, "_intake_load_history", "\"id\"");
    let second: Vec<(Value, Value)> = history[chunks_before..]
        .iter()
        .map(|h| (h["records_loaded"].clone(), h["error"].clone()))
        .collect();
    assert_eq!(second, [(json!(5), Value::Null)], "{history:#?}");
    let expected = [
        (5, "b"),
        (10, "a"),
        (20, "b"),
        (25, "b"),
        (30, "b"),
        (40, "b"),
    ];
    assert_versions(&db, &expected.map(|(id, v)| (id, v.to_owned())));
}

/// A record of `orders` whose version `v` shows in a column and in its one item's `sku`.
fn versioned(id: i64, v: &str) -> Value {
    json!({"id": id, "keys": ["id"], "v": v, "items": [{"sku": v}]})
}

/// Checks that `orders` holds exactly the keys of `expected`, each at its version (see
/// [`versioned`]), with one item of that version.
#[track_caller]
fn assert_versions(db: &TestDb, expected: &[(i64, String)]) {
    let versions: Vec<(i64, String)> = rows(db, "orders", "\"id\"")
        .iter()
        .map(|r| {
            (
                r["id"].as_i64().unwrap_or(-1),
                r["v"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    assert_eq!(versions, expected);
    let items: Vec<(i64, String)> = rows(db, "orders__items", "\"_intake_root_id\"")
        .iter()
        .map(|r| {
            let id = r["_intake_root_id"].as_i64().unwrap_or(-1);
            (id, r["sku"].as_str().unwrap_or("?").to_owned())
        })
        .collect();
    assert_eq!(items, expected, "one item per key, of its newest version");
}

/// Hundreds of updates of stored keys with a few new keys between them, then hundreds of
/// new keys between stored ones, each in one chunk: every key ends with its newest version
/// and its child rows, and no write fails into isolating records (one history row a chunk).
/// On PostgreSQL a sample of the keys decides whether the rest are looked up one by one; in
/// the first chunk it finds nearly all stored and the upsert writes them all, new keys too;
/// in the second it finds them new and the rest are looked up.
fn many_updates_with_a_few_new_keys_among_them_load_in_one_go(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    // Odd keys 1..=599.
    let first: Vec<Value> = (0..300).map(|i| versioned(2 * i + 1, "a")).collect();
    push(&server, &key, "orders", &first);
    load(&db);
    // Updates of 290 odd keys, and 10 even keys between them.
    let mut second: Vec<Value> = (0..290).map(|i| versioned(2 * i + 1, "b")).collect();
    second.extend((1..=10).map(|i| versioned(40 * i, "b")));
    push(&server, &key, "orders", &second);
    load(&db);
    // Every even key below 600 not loaded yet: all new, all below the largest stored key.
    let third: Vec<Value> = (1..300)
        .map(|i| 2 * i)
        .filter(|id| id % 40 != 0 || *id > 400)
        .map(|id| versioned(id, "c"))
        .collect();
    push(&server, &key, "orders", &third);
    load(&db);

    assert_staging_empty(&db);
    assert!(rows(&db, "_intake_rejected", "\"seq\"").is_empty());
    let chunks: Vec<(Value, Value)> = rows(&db, "_intake_load_history", "\"id\"")
        .iter()
        .map(|h| (h["records_loaded"].clone(), h["error"].clone()))
        .collect();
    assert_eq!(
        chunks,
        [
            (json!(300), Value::Null),
            (json!(300), Value::Null),
            (json!(third.len()), Value::Null)
        ]
    );
    let expected: Vec<(i64, String)> = (1..600)
        .map(|id| {
            let v = if id % 2 == 1 {
                if id < 580 { "b" } else { "a" }
            } else if id % 40 == 0 && id <= 400 {
                "b"
            } else {
                "c"
            };
            (id, v.to_owned())
        })
        .collect();
    assert_versions(&db, &expected);
}

fn a_new_version_replaces_the_whole_record_and_its_child_rows(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    push(
        &server,
        &key,
        "orders",
        &[
            json!({"id": 1, "keys": ["id"], "a": "x", "b": 5, "nested": {"c": true},
                   "items": [{"sku": "A"}, {"sku": "B"}, {"sku": "C", "tags": ["t1", "t2"]}],
                   "labels": ["p", "q"]}),
            json!({"id": 2, "keys": ["id"], "a": "other", "items": [{"sku": "Z", "tags": ["z"]}],
                   "labels": ["z"]}),
        ],
    );
    load(&db);
    assert_eq!(warehouse_count(&db, CLIENT, "orders__items"), 4);
    assert_eq!(warehouse_count(&db, CLIENT, "orders__items__tags"), 3);
    assert_eq!(warehouse_count(&db, CLIENT, "orders__labels"), 3);

    // Version 2 of record 1: fewer fields, fewer items, no labels, no tags.
    push(
        &server,
        &key,
        "orders",
        &[json!({"id": 1, "keys": ["id"], "a": "y", "items": [{"sku": "N"}]})],
    );
    load(&db);
    let orders = rows(&db, "orders", "\"id\"");
    let one = row_where(&orders, "id", &json!(1));
    assert_eq!(
        (&one["a"], &one["b"], &one["nested__c"]),
        (&json!("y"), &Value::Null, &Value::Null),
        "fields the new version lacks become NULL: {one}"
    );
    let children = |table: &str, value: &str| -> Vec<(i64, Value)> {
        rows(&db, table, "\"_intake_root_id\", \"_intake_pos_0\"")
            .iter()
            .map(|r| {
                (
                    r["_intake_root_id"].as_i64().expect("a root id"),
                    r[value].clone(),
                )
            })
            .collect()
    };
    assert_eq!(
        children("orders__items", "sku"),
        [(1, json!("N")), (2, json!("Z"))],
        "record 1's old items are gone, its new one is there, record 2's are untouched"
    );
    assert_eq!(children("orders__labels", "value"), [(2, json!("z"))]);
    assert_eq!(children("orders__items__tags", "value"), [(2, json!("z"))]);
    let seq_of_v2 = one["_intake_seq"].clone();
    assert_eq!(
        rows(&db, "orders__items", "\"_intake_root_id\"")[0]["_intake_seq"],
        seq_of_v2
    );

    // Version 3 has no arrays at all: record 1 has no child rows left.
    push(
        &server,
        &key,
        "orders",
        &[json!({"id": 1, "keys": ["id"], "b": 6})],
    );
    load(&db);
    let orders = rows(&db, "orders", "\"id\"");
    let one = row_where(&orders, "id", &json!(1));
    assert_eq!((&one["a"], &one["b"]), (&Value::Null, &json!(6)), "{one}");
    assert_eq!(children("orders__items", "sku"), [(2, json!("Z"))]);
    assert_eq!(children("orders__labels", "value"), [(2, json!("z"))]);
    assert_eq!(children("orders__items__tags", "value"), [(2, json!("z"))]);
    let two = row_where(&orders, "id", &json!(2));
    assert_eq!(two["a"], "other");
    assert_staging_empty(&db);

    // The same with a composite key of a text and a boolean.
    let flag = |k: &str, on: bool, v: i64, parts: &[i64]| json!({"k": k, "on": on, "keys": ["k", "on"], "v": v, "parts": parts});
    push(
        &server,
        &key,
        "flags",
        &[
            flag("a", true, 1, &[1, 2, 3]),
            flag("a", false, 1, &[4]),
            flag("007", true, 1, &[5]),
        ],
    );
    load(&db);
    push(&server, &key, "flags", &[flag("a", true, 2, &[6])]);
    load(&db);
    let parts: Vec<Value> = rows(
        &db,
        "flags__parts",
        "\"_intake_root_k\", \"_intake_root_on\", \"_intake_pos_0\"",
    )
    .iter()
    .map(|r| {
        json!([
            r["_intake_root_k"],
            r["_intake_root_on"],
            r["_intake_pos_0"],
            r["value"]
        ])
    })
    .collect();
    assert_eq!(
        parts,
        [
            json!(["007", true, 0, 5]),
            json!(["a", false, 0, 4]),
            json!(["a", true, 0, 6]),
        ]
    );
    let versions: Vec<Value> = rows(&db, "flags", "\"k\", \"on\"")
        .iter()
        .map(|r| json!([r["k"], r["on"], r["v"]]))
        .collect();
    assert_eq!(
        versions,
        [
            json!(["007", true, 1]),
            json!(["a", false, 1]),
            json!(["a", true, 2])
        ]
    );
}

fn an_older_record_never_overwrites_a_newer_one(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    push_each(
        &server,
        &key,
        "orders",
        &[
            json!({"id": 1, "keys": ["id"], "v": 1, "old_only": "x", "items": [{"n": 1}, {"n": 2}]}),
            json!({"id": 1, "keys": ["id"], "v": 2, "items": [{"n": 3}]}),
        ],
    );
    // The API hands out increasing sequences, so an older record can only reach the loader
    // after a newer one if it was held back. Hold v1 back: take it out of staging, load v2,
    // then put v1 back exactly as it was and load again.
    let staged = staged_rows(&db);
    let times = staged_times(&db, CLIENT, "orders");
    assert_eq!((staged.len(), times.len()), (2, 2));
    let (_, _, old_seq, old_record) = staged[0].clone();
    let old_received = times[0].1.clone();
    let mut conn = DbConnection::open(&db);
    let removed = conn.execute(&format!(
        "DELETE FROM staged_records WHERE client_id = {CLIENT} AND table_name = 'orders' AND seq = {old_seq}"
    ));
    assert_eq!(removed, 1);
    load(&db);
    let received = match backend {
        Backend::Postgres => format!("CAST({} AS timestamptz)", sql_literal(&old_received)),
        Backend::Sqlite => sql_literal(&old_received),
    };
    conn.execute(&format!(
        "INSERT INTO staged_records (client_id, table_name, seq, received_at, record) \
         VALUES ({CLIENT}, 'orders', {old_seq}, {received}, {})",
        sql_literal(&old_record)
    ));
    load(&db);
    assert_staging_empty(&db);

    let orders = rows(&db, "orders", "\"id\"");
    assert_eq!(orders.len(), 1);
    assert_eq!(orders[0]["v"], 2, "v1 overwrote v2: {}", orders[0]);
    assert_eq!(orders[0]["old_only"], Value::Null, "{}", orders[0]);
    assert_eq!(orders[0]["_intake_seq"], staged[1].2);
    let items: Vec<Value> = rows(&db, "orders__items", "\"_intake_pos_0\"")
        .iter()
        .map(|r| json!([r["_intake_pos_0"], r["n"], r["_intake_seq"]]))
        .collect();
    assert_eq!(items, [json!([0, 3, staged[1].2])], "v2's items must stay");
}

fn a_value_of_another_type_goes_to_a_typed_sibling_column(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let ty = |t| declared_type(backend, t).to_owned();

    // In one load.
    push(
        &server,
        &key,
        "prices",
        &[
            json!({"id": 1, "keys": ["id"], "price": 10}),
            json!({"id": 2, "keys": ["id"], "price": 1.5}),
            json!({"id": 3, "keys": ["id"], "price": "free"}),
        ],
    );
    load(&db);
    let types = column_types(&db, CLIENT, "prices");
    assert_eq!(
        (&types["price"], &types["price__fl"], &types["price__st"]),
        (&ty("bigint"), &ty("double"), &ty("text")),
        "{types:?}"
    );
    let prices: Vec<Value> = rows(&db, "prices", "\"id\"")
        .iter()
        .map(|r| json!([r["id"], r["price"], r["price__fl"], r["price__st"]]))
        .collect();
    assert_eq!(
        prices,
        [
            json!([1, 10, null, null]),
            json!([2, null, 1.5, null]),
            json!([3, null, null, "free"]),
        ]
    );

    // Across loads, with every sibling type; then a key whose new version has another type.
    let loads = [
        json!({"id": 1, "keys": ["id"], "price": 10}),
        json!({"id": 2, "keys": ["id"], "price": 1.5}),
        json!({"id": 3, "keys": ["id"], "price": "free"}),
        json!({"id": 4, "keys": ["id"], "price": true}),
        json!({"id": 5, "keys": ["id"], "price": "2024-03-01T10:20:30Z"}),
        json!({"id": 6, "keys": ["id"], "price": 7}),
        json!({"id": 1, "keys": ["id"], "price": 2.5}),
    ];
    for record in &loads {
        push(&server, &key, "tariffs", std::slice::from_ref(record));
        load(&db);
    }
    let types = column_types(&db, CLIENT, "tariffs");
    let expected: BTreeMap<String, String> = [
        ("id", "bigint"),
        ("price", "bigint"),
        ("price__fl", "double"),
        ("price__st", "text"),
        ("price__bo", "boolean"),
        ("price__ti", "timestamptz"),
        ("_intake_seq", "bigint"),
        ("_intake_received_at", "timestamptz"),
        ("_intake_loaded_at", "timestamptz"),
        ("_intake_client_seq", "bigint"),
        ("_intake_table_version", "bigint"),
    ]
    .into_iter()
    .map(|(c, t)| (c.to_owned(), ty(t)))
    .collect();
    assert_eq!(types, expected);
    let tariffs: Vec<Value> = rows(&db, "tariffs", "\"id\"")
        .iter()
        .map(|r| {
            json!([
                r["id"],
                r["price"],
                r["price__fl"],
                r["price__st"],
                r["price__bo"],
                r["price__ti"]
            ])
        })
        .collect();
    assert_eq!(
        tariffs,
        [
            json!([1, null, 2.5, null, null, null]),
            json!([2, null, 1.5, null, null, null]),
            json!([3, null, null, "free", null, null]),
            json!([4, null, null, null, true, null]),
            json!([5, null, null, null, null, "2024-03-01T10:20:30.000000Z"]),
            json!([6, 7, null, null, null, null]),
        ]
    );
    let maps = mappings(&db);
    let mut price_columns = columns_of(&maps, "tariffs", &["price"]);
    price_columns.sort();
    assert_eq!(
        price_columns,
        ["price", "price__bo", "price__fl", "price__st", "price__ti"]
    );

    // The sibling of a column whose name was shortened still fits, and says its type.
    let long = "amount_in_the_currency_of_the_customer_".repeat(3);
    let mut first = json!({"id": 1, "keys": ["id"]});
    first[&long] = json!(10);
    let mut second = json!({"id": 2, "keys": ["id"]});
    second[&long] = json!("ten");
    push(&server, &key, "long_prices", &[first, second]);
    load(&db);
    let maps = mappings(&db);
    let mut columns = columns_of(&maps, "long_prices", &[&long]);
    columns.sort_by_key(|c| c.ends_with("__st"));
    assert_eq!(columns.len(), 2, "{columns:?}");
    assert!(columns.iter().all(|c| c.len() <= 63), "{columns:?}");
    assert!(columns[1].ends_with("__st"), "{columns:?}");
    let long_rows: Vec<Value> = rows(&db, "long_prices", "\"id\"")
        .iter()
        .map(|r| json!([r[columns[0].as_str()], r[columns[1].as_str()]]))
        .collect();
    assert_eq!(long_rows, [json!([10, null]), json!([null, "ten"])]);
}

fn lossless_conversions_stay_in_the_first_column(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    push(
        &server,
        &key,
        "measures",
        &[
            json!({"id": 1, "keys": ["id"], "amount": 2.5, "note": "hello", "when": "2024-03-01T10:20:30Z"}),
        ],
    );
    load(&db);
    push(
        &server,
        &key,
        "measures",
        &[
            // An integer into a double column, and a date-time string into a text column.
            json!({"id": 2, "keys": ["id"], "amount": 3, "note": "2024-03-01 10:20:30+0200"}),
            json!({"id": 3, "keys": ["id"], "amount": -9007199254740992_i64}),
            // Beyond 2^53 a double cannot hold it exactly: a sibling column.
            json!({"id": 4, "keys": ["id"], "amount": 9007199254740993_i64}),
            // Once the integer sibling exists, integers go there, later in the same chunk too.
            json!({"id": 5, "keys": ["id"], "amount": 7}),
        ],
    );
    load(&db);
    let ty = |t| declared_type(backend, t).to_owned();
    let types = column_types(&db, CLIENT, "measures");
    assert_eq!(types["amount"], ty("double"));
    assert_eq!(types["note"], ty("text"));
    assert_eq!(types["when"], ty("timestamptz"));
    assert!(!types.contains_key("note__ti"), "{types:?}");
    assert_eq!(types.get("amount__it"), Some(&ty("bigint")), "{types:?}");
    let measures: Vec<Value> = rows(&db, "measures", "\"id\"")
        .iter()
        .map(|r| json!([r["id"], r["amount"], r["note"], r["amount__it"]]))
        .collect();
    assert_eq!(
        measures,
        [
            json!([1, 2.5, "hello", null]),
            json!([2, 3.0, "2024-03-01 10:20:30+0200", null]),
            json!([3, -9007199254740992.0, null, null]),
            json!([4, null, null, 9007199254740993_i64]),
            json!([5, null, null, 7]),
        ]
    );
}

/// A chunk large enough to be written in shares (PostgreSQL): the integer column made for a
/// value a double cannot hold takes every later integer of the chunk, whichever share it is in.
fn an_integer_column_made_mid_chunk_takes_every_later_integer(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    push(
        &server,
        &key,
        "measures",
        &[json!({"id": 0, "keys": ["id"], "amount": 2.5})],
    );
    load(&db);
    const BIG: i64 = 9_007_199_254_740_993;
    let records: Vec<Value> = (1..=1500)
        .map(|id| json!({"id": id, "keys": ["id"], "amount": if id == 750 { BIG } else { id }}))
        .collect();
    push(&server, &key, "measures", &records);
    load(&db);
    let measures = rows(&db, "measures", "\"id\"");
    assert_eq!(measures.len(), 1501);
    for row in &measures[1..] {
        let id = row["id"].as_i64().unwrap_or(-1);
        let expected = if id < 750 {
            json!([id, id as f64, null])
        } else {
            json!([id, null, if id == 750 { BIG } else { id }])
        };
        assert_eq!(
            json!([row["id"], row["amount"], row["amount__it"]]),
            expected,
            "id {id}"
        );
    }
}

fn column_names_are_cleaned_shortened_and_recorded(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let long = "Field".repeat(20);
    let long_twin = format!("{}{}", "Field".repeat(19), "Other");
    let long_array = "list".repeat(25);
    let mut record = json!({"id": 1, "keys": ["id"], "Customer Name": "Ann", "ZIP-code": "8000",
                            "Shipping": {"Street Address": "Main"}});
    record[&long] = json!(1);
    record[&long_twin] = json!("twin");
    record[&long_array] = json!([{"x": 1}]);
    push(&server, &key, "people", &[record]);
    load(&db);

    let columns = data_columns(&db, "people");
    for name in ["customer_name", "zip_code", "shipping__street_address"] {
        assert!(columns.contains(name), "{name} missing from {columns:?}");
    }
    let head = "field".repeat(20)[..54].to_owned();
    let long_columns: Vec<&String> = columns.iter().filter(|c| c.starts_with(&head)).collect();
    assert_eq!(
        long_columns.len(),
        2,
        "two long fields, two columns: {columns:?}"
    );
    for name in &long_columns {
        assert!(
            is_hash_suffixed(name, &head),
            "{name} is not 54 bytes + _ + 8 hex"
        );
        assert_eq!(name.len(), 63);
    }
    let maps = mappings(&db);
    let long_column = column_of(&maps, "people", &[&long]);
    assert_ne!(long_column, column_of(&maps, "people", &[&long_twin]));
    assert_eq!(
        column_of(&maps, "people", &["Customer Name"]),
        "customer_name"
    );
    assert_eq!(column_of(&maps, "people", &["ZIP-code"]), "zip_code");
    assert_eq!(
        column_of(&maps, "people", &["Shipping", "Street Address"]),
        "shipping__street_address"
    );
    let child = data_tables(&db)
        .into_iter()
        .find(|t| t.starts_with("people__list"))
        .expect("a child table for the long array");
    assert!(child.len() <= 63, "{child} is longer than 63 bytes");

    // A second load, and another table, give the long field the same name.
    let mut again = json!({"id": 2, "keys": ["id"]});
    again[&long] = json!(2);
    push(&server, &key, "people", std::slice::from_ref(&again));
    push(&server, &key, "others", &[again]);
    load(&db);
    assert_eq!(data_columns(&db, "people"), columns, "no new column");
    let people = rows(&db, "people", "\"id\"");
    let longs: Vec<&Value> = people.iter().map(|r| &r[long_column.as_str()]).collect();
    assert_eq!(longs, [&json!(1), &json!(2)]);
    assert!(data_columns(&db, "others").contains(&long_column));

    // Every column that holds pushed data is recorded, with where it came from.
    let maps = mappings(&db);
    for table in data_tables(&db) {
        for column in data_columns(&db, &table) {
            if column.starts_with("_intake_root_") || column.starts_with("_intake_pos_") {
                continue;
            }
            assert!(
                maps.iter().any(|(t, _, _, c)| *t == table && *c == column),
                "{table}.{column} is not in _intake_columns: {maps:#?}"
            );
        }
    }
    assert_eq!(column_of(&maps, &child, &["x"]), "x");
    let tables = rows(&db, "_intake_tables", "\"table_name\"");
    let recorded = row_where(&tables, "table_name", &json!(child));
    let source: Value =
        serde_json::from_str(recorded["source"].as_str().expect("source")).expect("source is JSON");
    assert_eq!(source, json!(["people", [long_array]]));

    // A long key name, and the longest table name, with child tables: every name fits.
    let long_key = "Key".repeat(30);
    let longest_table = "t".repeat(63);
    let mut keyed = json!({"keys": [long_key.clone()], "items": [1, 2]});
    keyed[&long_key] = json!(1);
    push(&server, &key, "keyed", std::slice::from_ref(&keyed));
    push(&server, &key, &longest_table, &[keyed]);
    load(&db);
    assert_staging_empty(&db);
    for table in ["keyed".to_owned(), longest_table.clone()] {
        let child = table_for(&db, &[table.as_str(), "items"]);
        for name in [&table, &child] {
            assert!(name.len() <= 63, "table {name} is longer than 63 bytes");
            let columns = warehouse_columns(&db, CLIENT, name);
            assert!(!columns.is_empty(), "no table {name}");
            for c in &columns {
                assert!(
                    c.name.len() <= 63,
                    "{name}.{} is longer than 63 bytes",
                    c.name
                );
            }
        }
        let key_column = primary_key(&db, CLIENT, &table);
        assert_eq!(key_column.len(), 1);
        let child_key = primary_key(&db, CLIENT, &child);
        assert_eq!(child_key.len(), 2, "{child_key:?}");
        assert_ne!(child_key[0], child_key[1]);
        let items: Vec<Value> = rows(&db, &child, "\"_intake_pos_0\"")
            .iter()
            .map(|r| json!([r[child_key[0].as_str()], r["value"]]))
            .collect();
        assert_eq!(items, [json!([1, 1]), json!([1, 2])], "{table}");
    }
}

fn fields_whose_names_collide_get_distinct_columns(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    push(
        &server,
        &key,
        "things",
        &[json!({"id": 1, "keys": ["id"], "a_b": 1, "Name": "upper"})],
    );
    load(&db);
    push(
        &server,
        &key,
        "things",
        &[
            json!({"id": 2, "keys": ["id"], "a b": 2, "name": "lower", "ID": "shadow"}),
            json!({"id": 3, "keys": ["id"], "x y": "first", "x_y": "second"}),
        ],
    );
    load(&db);
    assert_staging_empty(&db);

    let maps = mappings(&db);
    let column = |path: &str| column_of(&maps, "things", &[path]);
    // The first one seen keeps the plain name; later ones get the hash suffix.
    assert_eq!(column("a_b"), "a_b");
    assert!(is_hash_suffixed(&column("a b"), "a_b"), "{}", column("a b"));
    assert_eq!(column("Name"), "name");
    assert!(
        is_hash_suffixed(&column("name"), "name"),
        "{}",
        column("name")
    );
    assert_eq!(column("id"), "id");
    assert!(is_hash_suffixed(&column("ID"), "id"), "{}", column("ID"));
    // In one record both get a column of their own.
    let (xy_space, xy_underscore) = (column("x y"), column("x_y"));
    assert_ne!(xy_space, xy_underscore);
    assert!(xy_space == "x_y" || xy_underscore == "x_y");

    let things = rows(&db, "things", "\"id\"");
    let value =
        |id: i64, field: &str| row_where(&things, "id", &json!(id))[column(field).as_str()].clone();
    assert_eq!(value(1, "a_b"), 1);
    assert_eq!(value(2, "a b"), 2);
    assert_eq!(value(2, "a_b"), Value::Null);
    assert_eq!(value(1, "Name"), "upper");
    assert_eq!(value(2, "name"), "lower");
    assert_eq!(value(2, "ID"), "shadow");
    assert_eq!(value(2, "id"), 2);
    assert_eq!(value(3, "x y"), "first");
    assert_eq!(value(3, "x_y"), "second");

    // A nested field and a flat one spelled with `__` would both be `p__q`.
    push(
        &server,
        &key,
        "things",
        &[json!({"id": 4, "keys": ["id"], "p": {"q": "nested"}, "p__q": "flat"})],
    );
    load(&db);
    let maps = mappings(&db);
    let (nested, flat) = (
        column_of(&maps, "things", &["p", "q"]),
        column_of(&maps, "things", &["p__q"]),
    );
    assert_ne!(nested, flat);
    let things = rows(&db, "things", "\"id\"");
    let four = row_where(&things, "id", &json!(4));
    assert_eq!(
        (&four[nested.as_str()], &four[flat.as_str()]),
        (&json!("nested"), &json!("flat"))
    );
}

fn hostile_field_names_load_without_touching_system_columns(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let drop_table = "\"; DROP TABLE x; --";
    let bobby = "Robert'); DROP TABLE staged_records;--";
    let mut record = json!({
        "id": 1, "keys": ["id"],
        "select": "keyword", "order": 5, "": "empty name", "名前": "kanji",
        "_intake_seq": 999,
        "_intake_received_at": "1999-01-01T00:00:00Z",
        "_intake_loaded_at": "never",
        "_intake_overflow": {"a": 1},
        "items": [{"_intake_pos_0": 99, "_intake_root_id": -1, "_intake_seq": -5, "value": "v"}]
    });
    record[drop_table] = json!("boom");
    record[bobby] = json!(1);
    push(&server, &key, "hostile", &[record]);
    // Key fields with hostile names too.
    push(
        &server,
        &key,
        "select",
        &[json!({"from": 1, "Robert'); --": "k", "keys": ["from", "Robert'); --"], "where": [1]})],
    );
    let times = staged_times(&db, CLIENT, "hostile");
    let out = run_loader(&db, &["run"]);
    out.assert_success();
    assert_staging_empty(&db);
    // The staging table is still there, and nothing named x appeared.
    assert!(warehouse_tables(&db, CLIENT).iter().all(|t| t != "x"));

    let row = &rows(&db, "hostile", "\"id\"")[0];
    assert_eq!(row["_intake_seq"], times[0].0, "{row}");
    assert_eq!(row["_intake_received_at"], times[0].1, "{row}");
    let loaded = row["_intake_loaded_at"].as_str().unwrap_or_default();
    assert!(
        loaded.starts_with("20") && loaded >= times[0].1.as_str(),
        "{row}"
    );

    let maps = mappings(&db);
    let value_of = |path: &[&str]| {
        let column = column_of(&maps, "hostile", path);
        assert!(
            !matches!(
                column.as_str(),
                "_intake_seq"
                    | "_intake_received_at"
                    | "_intake_loaded_at"
                    | "_intake_overflow"
                    | "id"
            ),
            "{path:?} was given the system or key column {column}"
        );
        row[column.as_str()].clone()
    };
    assert_eq!(value_of(&[drop_table]), "boom");
    assert_eq!(value_of(&[bobby]), 1);
    assert_eq!(value_of(&["select"]), "keyword");
    assert_eq!(value_of(&["order"]), 5);
    assert_eq!(value_of(&[""]), "empty name");
    assert_eq!(value_of(&["名前"]), "kanji");
    assert_eq!(value_of(&["_intake_seq"]), 999);
    assert_eq!(
        value_of(&["_intake_received_at"]),
        "1999-01-01T00:00:00.000000Z"
    );
    assert_eq!(value_of(&["_intake_loaded_at"]), "never");
    assert_eq!(value_of(&["_intake_overflow", "a"]), 1);

    let items = rows(&db, "hostile__items", "\"_intake_pos_0\"");
    assert_eq!(items.len(), 1);
    let item = &items[0];
    assert_eq!(
        (
            &item["_intake_root_id"],
            &item["_intake_pos_0"],
            &item["_intake_seq"]
        ),
        (&json!(1), &json!(0), &json!(times[0].0)),
        "{item}"
    );
    let item_value =
        |field: &str| item[column_of(&maps, "hostile__items", &[field]).as_str()].clone();
    assert_eq!(item_value("_intake_pos_0"), 99);
    assert_eq!(item_value("_intake_root_id"), -1);
    assert_eq!(item_value("_intake_seq"), -5);
    assert_eq!(item_value("value"), "v");

    let selected = rows(&db, "select", "\"from\"");
    assert_eq!(selected.len(), 1);
    assert_eq!(primary_key(&db, CLIENT, "select"), ["from", "robert______"]);
    assert_eq!(selected[0]["robert______"], "k");
    assert_eq!(
        primary_key(&db, CLIENT, "select__where"),
        [
            "_intake_root_from",
            "_intake_root_robert______",
            "_intake_pos_0"
        ]
    );
}

fn records_that_cannot_be_loaded_are_rejected_and_the_rest_loads(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let wrong_keys = r#"{ "id": 2, "sku" : "x", "keys": ["id", "sku"] }"#;
    let wrong_type = r#"{"id":"7","keys":["id"],"n":7}"#;
    let with_nul = r#"{"id":4,"keys":["id"],"note":"a\u0000b"}"#;
    let body = format!(
        "[{},\n {wrong_keys},{wrong_type}, {}, {with_nul}]",
        r#"{"id":1,"keys":["id"],"n":1}"#, r#"{"id":3,"keys":["id"],"n":3}"#
    );
    assert_eq!(
        server.push(CLIENT, "orders", &key, &body).assert_created(),
        5
    );
    let times = staged_times(&db, CLIENT, "orders");
    let out = run_loader(&db, &["run"]);
    out.assert_success();
    assert_staging_empty(&db);

    let ids: Vec<Value> = rows(&db, "orders", "\"id\"")
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    let rejected = rows(&db, "_intake_rejected", "\"seq\"");
    let reasons: BTreeMap<i64, (String, String)> = rejected
        .iter()
        .map(|r| {
            assert_eq!(r["table_name"], "orders", "{r}");
            let seq = r["seq"].as_i64().expect("a seq");
            let at = times.iter().find(|(s, _)| *s == seq).expect("a staged seq");
            assert_eq!(r["received_at"], at.1, "{r}");
            assert!(
                r["rejected_at"]
                    .as_str()
                    .is_some_and(|t| t >= at.1.as_str()),
                "{r}"
            );
            let text = |f: &str| r[f].as_str().unwrap_or_default().to_owned();
            (seq, (text("reason"), text("record")))
        })
        .collect();
    let (key_seq, type_seq, nul_seq) = (times[1].0, times[2].0, times[4].0);
    let (reason, record) = &reasons[&key_seq];
    assert!(
        reason.contains("keys") || reason.contains("key"),
        "{reason}"
    );
    assert_eq!(record, wrong_keys, "the record exactly as received");
    let (reason, record) = &reasons[&type_seq];
    assert!(reason.contains("id") && !reason.is_empty(), "{reason}");
    assert_eq!(record, wrong_type);
    match backend {
        Backend::Postgres => {
            assert_eq!(ids, [json!(1), json!(3)]);
            let (reason, record) = &reasons[&nul_seq];
            assert!(!reason.is_empty());
            assert_eq!(record, with_nul);
            assert_eq!(reasons.len(), 3, "{reasons:?}");
        }
        Backend::Sqlite => {
            // SQLite text can hold NUL; either way the record is not lost.
            let loaded_nul = ids.contains(&json!(4));
            assert_ne!(
                loaded_nul,
                reasons.contains_key(&nul_seq),
                "{ids:?} {reasons:?}"
            );
            assert!(ids.starts_with(&[json!(1), json!(3)]), "{ids:?}");
        }
    }

    // A later load checks records against the table made by the first.
    let body =
        r#"[{"id":5,"keys":["id"]},{"id":6,"other":1,"keys":["other"]},{"id":true,"keys":["id"]}]"#;
    server.push(CLIENT, "orders", &key, body).assert_created();
    let out = run_loader(&db, &["run"]);
    out.assert_success();
    assert_staging_empty(&db);
    let ids: Vec<Value> = rows(&db, "orders", "\"id\"")
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    assert!(ids.contains(&json!(5)), "{ids:?}");
    assert!(!ids.contains(&json!(6)), "{ids:?}");
    let rejected: Vec<Value> = rows(&db, "_intake_rejected", "\"seq\"")
        .into_iter()
        .map(|r| r["record"].clone())
        .collect();
    assert!(
        rejected.contains(&json!(r#"{"id":6,"other":1,"keys":["other"]}"#)),
        "{rejected:?}"
    );
    assert!(
        rejected.contains(&json!(r#"{"id":true,"keys":["id"]}"#)),
        "{rejected:?}"
    );

    // The history counts them.
    let history = rows(&db, "_intake_load_history", "\"id\"");
    let sum = |f: &str| {
        history
            .iter()
            .map(|h| h[f].as_i64().unwrap_or(0))
            .sum::<i64>()
    };
    assert_eq!(
        sum("records_loaded") + sum("records_rejected"),
        8,
        "{history:#?}"
    );
    assert_eq!(
        sum("records_rejected"),
        rows(&db, "_intake_rejected", "\"seq\"").len() as i64
    );
}

fn status_reports_pending_records_then_loads_and_rejections(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let (_, other_key) = issue_key(&db, CLIENT + 1, "another client");
    let before = loader_status(&db);
    assert_eq!(
        before,
        json!({"pending": [], "recent_loads": [], "rejected": []})
    );

    let body = r#"[{"id":1,"keys":["id"]},{"id":2,"keys":["id"]},{"id":"x","keys":["id"]}]"#;
    server.push(CLIENT, "orders", &key, body).assert_created();
    push(
        &server,
        &key,
        "users",
        &[
            json!({"u": 1, "keys": ["u"]}),
            json!({"u": 2, "keys": ["u"]}),
        ],
    );
    server
        .push(
            CLIENT + 1,
            "orders",
            &other_key,
            r#"{"id":1,"keys":["id"]}"#,
        )
        .assert_created();

    let pending = loader_status(&db);
    assert_eq!(
        pending["pending"],
        json!([
            {"client_id": CLIENT, "table_name": "orders", "pending": 3},
            {"client_id": CLIENT, "table_name": "users", "pending": 2},
            {"client_id": CLIENT + 1, "table_name": "orders", "pending": 1},
        ])
    );
    assert_eq!(pending["recent_loads"], json!([]));

    let out = load(&db);
    // Not on a terminal: one log line per table.
    for (client, table) in [
        (CLIENT, "orders"),
        (CLIENT, "users"),
        (CLIENT + 1, "orders"),
    ] {
        let lines = out
            .stderr
            .lines()
            .filter(|l| {
                l.contains(&format!("client {client} ")) && l.contains(&format!("table {table}"))
            })
            .count();
        assert_eq!(
            lines, 1,
            "one line for client {client} table {table}:\n{}",
            out.stderr
        );
    }
    let after = loader_status(&db);
    assert_eq!(after["pending"], json!([]), "{after:#}");
    let loads = after["recent_loads"]
        .as_array()
        .expect("recent_loads is a list");
    let totals = |client: i64, table: &str| -> (i64, i64) {
        loads
            .iter()
            .filter(|l| l["client_id"] == client && l["table_name"] == table)
            .map(|l| {
                assert_eq!(l["error"], Value::Null, "{l}");
                assert!(
                    l["started_at"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("20")),
                    "{l}"
                );
                assert!(l["duration_ms"].as_i64().is_some_and(|d| d >= 0), "{l}");
                (
                    l["records_loaded"].as_i64().unwrap_or(-1),
                    l["records_rejected"].as_i64().unwrap_or(-1),
                )
            })
            .fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    };
    assert_eq!(totals(CLIENT, "orders"), (2, 1), "{after:#}");
    assert_eq!(totals(CLIENT, "users"), (2, 0), "{after:#}");
    assert_eq!(totals(CLIENT + 1, "orders"), (1, 0), "{after:#}");
    assert_eq!(
        after["rejected"],
        json!([{"client_id": CLIENT, "table_name": "orders", "rejected": 1}])
    );

    // The plain report names what it shows.
    let plain = run_loader(&db, &["status"]);
    plain.assert_success();
    for word in [
        "orders",
        "users",
        &CLIENT.to_string(),
        &(CLIENT + 1).to_string(),
    ] {
        assert!(
            plain.stdout.contains(word),
            "status must mention {word}:\n{}",
            plain.stdout
        );
    }

    // The two clients' `orders` are separate tables, and both are listed.
    assert_eq!(warehouse_count(&db, CLIENT, "orders"), 2);
    assert_eq!(warehouse_count(&db, CLIENT + 1, "orders"), 1);
    let clients: Vec<ClientId> = DbConnection::open(&db)
        .load("SELECT CAST(client_id AS BIGINT) AS client_id FROM warehouse_clients ORDER BY 1");
    assert_eq!(
        clients.iter().map(|c| c.client_id).collect::<Vec<_>>(),
        [CLIENT, CLIENT + 1]
    );
}

#[derive(QueryableByName)]
struct ClientId {
    #[diesel(sql_type = BigInt)]
    client_id: i64,
}

fn watch_loads_new_records_until_stopped(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let mut watcher = LoaderProcess::spawn(&db, "watch", &["watch", "--interval", "1s"]);
    let count_when = |wanted: i64| {
        poll(
            "rows to appear in the warehouse",
            Duration::from_secs(10),
            || {
                let exists = !warehouse_columns(&db, CLIENT, "events").is_empty();
                let n = if exists {
                    warehouse_count(&db, CLIENT, "events")
                } else {
                    -1
                };
                if n == wanted {
                    Ok(n)
                } else {
                    Err(format!("{n} rows"))
                }
            },
        )
    };

    push(
        &server,
        &key,
        "events",
        &[json!({"id": 1, "keys": ["id"], "v": 1})],
    );
    count_when(1);
    push(
        &server,
        &key,
        "events",
        &[
            json!({"id": 2, "keys": ["id"], "v": 1}),
            json!({"id": 1, "keys": ["id"], "v": 2}),
        ],
    );
    count_when(2);
    poll(
        "the new version to replace the old",
        Duration::from_secs(10),
        || {
            let events = rows(&db, "events", "\"id\"");
            if events[0]["v"] == 2 {
                Ok(())
            } else {
                Err(events[0].to_string())
            }
        },
    );
    assert_staging_empty(&db);

    watcher.terminate();
    let out = watcher
        .wait(Duration::from_secs(5))
        .expect("intake-loader watch must exit within 5 s of SIGTERM");
    assert!(
        out.status.success(),
        "watch must exit 0 on SIGTERM, got {}: {}",
        out.status,
        out.stderr
    );

    // Ctrl-C (SIGINT) stops it the same way.
    let mut watcher = LoaderProcess::spawn(&db, "watch-int", &["watch", "--interval", "1s"]);
    push(
        &server,
        &key,
        "events",
        &[json!({"id": 3, "keys": ["id"], "v": 1})],
    );
    count_when(3);
    watcher.signal("INT");
    let out = watcher
        .wait(Duration::from_secs(5))
        .expect("intake-loader watch must exit within 5 s of SIGINT");
    assert!(
        out.status.success(),
        "watch must exit 0 on SIGINT, got {}: {}",
        out.status,
        out.stderr
    );
}

/// A server whose embedded loader (`loader.embedded` = `mode`) runs every second.
fn with_embedded_loader(db: &TestDb, mode: &str) -> Server {
    Server::start(
        db,
        &[
            ("INTAKE__LOADER__EMBEDDED", mode),
            ("INTAKE__LOADER__EMBEDDED_INTERVAL_SECS", "1"),
        ],
    )
}

fn the_embedded_loader_loads_without_a_separate_loader(backend: Backend) {
    let db = TestDb::new(backend);
    let server = with_embedded_loader(&db, "on");
    let (_, key) = issue_key(&db, CLIENT, "embedded");
    push(
        &server,
        &key,
        "events",
        &[json!({"id": 1, "keys": ["id"], "what": "signup", "tags": ["a", "b"]})],
    );
    let events = poll(
        "the embedded loader to load the record",
        Duration::from_secs(10),
        || {
            if warehouse_columns(&db, CLIENT, "events").is_empty() {
                return Err("no table yet".into());
            }
            let events = rows(&db, "events", "\"id\"");
            if events.is_empty() {
                Err("no rows yet".into())
            } else {
                Ok(events)
            }
        },
    );
    assert_eq!(events[0]["what"], "signup");
    poll(
        "the child rows and an empty staging table",
        Duration::from_secs(10),
        || {
            let tags = warehouse_columns(&db, CLIENT, "events__tags").len();
            let staged = staged_rows(&db).len();
            if tags > 0 && staged == 0 {
                Ok(())
            } else {
                Err(format!("{tags} tag columns, {staged} staged"))
            }
        },
    );
    assert_eq!(warehouse_count(&db, CLIENT, "events__tags"), 2);
}

fn the_embedded_loader_is_on_by_default_for_sqlite_only(backend: Backend) {
    let db = TestDb::new(backend);
    let server = with_embedded_loader(&db, "auto");
    let (_, key) = issue_key(&db, CLIENT, "embedded auto");
    push(&server, &key, "events", &[json!({"id": 1, "keys": ["id"]})]);
    match backend {
        Backend::Sqlite => {
            poll(
                "the embedded loader to load the record",
                Duration::from_secs(10),
                || {
                    if staged_rows(&db).is_empty() {
                        Ok(())
                    } else {
                        Err("still staged".into())
                    }
                },
            );
            assert_eq!(warehouse_count(&db, CLIENT, "events"), 1);
        }
        Backend::Postgres => {
            // Three intervals' worth: nothing may load it.
            std::thread::sleep(Duration::from_secs(3));
            assert_eq!(
                staged_rows(&db).len(),
                1,
                "PostgreSQL has no embedded loader by default"
            );
            assert!(warehouse_columns(&db, CLIENT, "events").is_empty());
        }
    }
}

/// The physical name `_intake_tables` records for a pushed table or one of its top-level
/// arrays (`["orders", "items"]` means the source `["orders", ["items"]]`).
#[track_caller]
fn table_for(db: &TestDb, source: &[&str]) -> String {
    let expected = match source {
        [table] => json!([table]),
        [table, array @ ..] => json!([table, array]),
        [] => json!([]),
    };
    let tables = rows(db, "_intake_tables", "\"table_name\"");
    let found: Vec<String> = tables
        .iter()
        .filter(|t| {
            let recorded: Value =
                serde_json::from_str(t["source"].as_str().unwrap_or("null")).unwrap_or_default();
            recorded == expected
        })
        .map(|t| t["table_name"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(found.len(), 1, "one table for {source:?} in {tables:#?}");
    found[0].clone()
}

fn a_pushed_table_never_mixes_with_a_child_or_system_table_of_the_same_name(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    // `orders` loads first in a pass and its `items` array wants the name `orders__items`,
    // which is also a table pushed in its own right.
    push(
        &server,
        &key,
        "orders__items",
        &[json!({"id": 1, "keys": ["id"], "x": "pushed"})],
    );
    push(
        &server,
        &key,
        "orders",
        &[json!({"id": 1, "keys": ["id"], "items": [{"x": "child"}]})],
    );
    // Pushed tables named like the system tables.
    push(
        &server,
        &key,
        "_intake_columns",
        &[json!({"id": 1, "keys": ["id"], "table_name": "orders", "column_name": "evil"})],
    );
    push(
        &server,
        &key,
        "_intake_rejected",
        &[json!({"id": 1, "keys": ["id"], "seq": 5})],
    );
    load(&db);
    assert_staging_empty(&db);

    let child = table_for(&db, &["orders", "items"]);
    let pushed = table_for(&db, &["orders__items"]);
    assert_ne!(child, pushed);
    let child_rows = rows(&db, &child, "\"_intake_pos_0\"");
    assert_eq!(child_rows.len(), 1, "{child_rows:#?}");
    assert_eq!(
        (&child_rows[0]["_intake_root_id"], &child_rows[0]["x"]),
        (&json!(1), &json!("child"))
    );
    let pushed_rows = rows(&db, &pushed, "\"id\"");
    assert_eq!(pushed_rows.len(), 1, "{pushed_rows:#?}");
    assert_eq!(pushed_rows[0]["x"], "pushed");

    // Later loads keep finding each in its own table.
    push(
        &server,
        &key,
        "orders__items",
        &[json!({"id": 2, "keys": ["id"], "x": "pushed 2"})],
    );
    push(
        &server,
        &key,
        "orders",
        &[json!({"id": 2, "keys": ["id"], "items": [{"x": "child 2"}]})],
    );
    load(&db);
    assert_eq!(table_for(&db, &["orders", "items"]), child);
    assert_eq!(table_for(&db, &["orders__items"]), pushed);
    let xs = |table: &str, order: &str| -> Vec<Value> {
        rows(&db, table, order)
            .iter()
            .map(|r| r["x"].clone())
            .collect()
    };
    assert_eq!(
        xs(&child, "\"_intake_root_id\""),
        [json!("child"), json!("child 2")]
    );
    assert_eq!(xs(&pushed, "\"id\""), [json!("pushed"), json!("pushed 2")]);

    // The system tables are intact, and the look-alikes hold their own rows.
    for (name, field, value) in [
        ("_intake_columns", "column_name", json!("evil")),
        ("_intake_rejected", "seq", json!(5)),
    ] {
        let physical = table_for(&db, &[name]);
        assert_ne!(
            physical, name,
            "a pushed table took the system table's name"
        );
        let look_alike = rows(&db, &physical, "\"id\"");
        assert_eq!(look_alike.len(), 1);
        let column = column_of(&mappings(&db), &physical, &[field]);
        assert_eq!(look_alike[0][column.as_str()], value);
    }
    assert_eq!(warehouse_count(&db, CLIENT, "_intake_rejected"), 0);
    assert!(
        mappings(&db).iter().all(|(_, _, _, c)| c != "evil"),
        "a pushed record was written into _intake_columns"
    );
}

fn a_database_error_rejects_only_the_records_at_fault(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    push(
        &server,
        &key,
        "orders",
        &[json!({"id": 1, "keys": ["id"], "n": 1})],
    );
    push(&server, &key, "others", &[json!({"id": 1, "keys": ["id"]})]);
    load(&db);
    refuse_n_from(&db, "orders", 100);
    let records: Vec<Value> = (2..=11)
        .map(|id| {
            let n = if id == 5 || id == 9 { 500 } else { id };
            json!({"id": id, "keys": ["id"], "n": n, "items": [id]})
        })
        .collect();
    push(&server, &key, "orders", &records);
    push(&server, &key, "others", &[json!({"id": 2, "keys": ["id"]})]);
    let times = staged_times(&db, CLIENT, "orders");
    let out = run_loader(&db, &["run"]);
    out.assert_success();
    assert_staging_empty(&db);

    let ids: Vec<i64> = rows(&db, "orders", "\"id\"")
        .iter()
        .map(|r| r["id"].as_i64().unwrap_or(0))
        .collect();
    assert_eq!(ids, [1, 2, 3, 4, 6, 7, 8, 10, 11]);
    let item_roots: Vec<Value> = rows(&db, "orders__items", "\"_intake_root_id\"")
        .iter()
        .map(|r| r["_intake_root_id"].clone())
        .collect();
    assert_eq!(item_roots, [2, 3, 4, 6, 7, 8, 10, 11].map(|i| json!(i)));
    let rejected = rows(&db, "_intake_rejected", "\"seq\"");
    let seqs: Vec<Value> = rejected.iter().map(|r| r["seq"].clone()).collect();
    assert_eq!(seqs, [json!(times[3].0), json!(times[7].0)]);
    for r in &rejected {
        let reason = r["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("n_below_100"),
            "the database's message: {reason}"
        );
        assert!(
            r["record"].as_str().is_some_and(|t| t.contains("500")),
            "{r}"
        );
    }
    assert_eq!(
        warehouse_count(&db, CLIENT, "others"),
        2,
        "other tables load too"
    );
}

/// A rule the loader cannot know about: the database refuses rows of `table` whose `n` is
/// `limit` or more, with a message naming `{table}_n_below_{limit}`.
/// Makes each table (with its columns and child tables) from one record shaped like `seed`,
/// then has the database refuse any `n` of 1,000 or more in it. Tables and columns come
/// first because a chunk that changes the schema is written by one connection: the chunks
/// that follow are shared between connections.
fn tables_refusing_large_n(
    db: &TestDb,
    server: &Server,
    key: &str,
    tables: &[(&str, i64)],
    seed: &Value,
) {
    for (table, _) in tables {
        push(server, key, table, std::slice::from_ref(seed));
    }
    load(db);
    for (table, _) in tables {
        refuse_n_from(db, table, 1000);
    }
}

fn refuse_n_from(db: &TestDb, table: &str, limit: i64) {
    let target = table_ref(db.backend, CLIENT, table);
    let rule = format!("{table}_n_below_{limit}");
    DbConnection::open(db).execute(&match db.backend {
        Backend::Postgres => {
            format!("ALTER TABLE {target} ADD CONSTRAINT {rule} CHECK (n < {limit})")
        }
        Backend::Sqlite => format!(
            "CREATE TRIGGER {rule} BEFORE INSERT ON {target} WHEN NEW.n >= {limit} \
             BEGIN SELECT RAISE(ABORT, '{rule} violated'); END"
        ),
    });
}

fn a_table_that_cannot_be_loaded_fails_the_run_but_not_the_others(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    push(&server, &key, "orders", &[json!({"id": 1, "keys": ["id"]})]);
    load(&db);
    // The database refuses to store rejected records, so a bad record cannot be set aside.
    let rejected = table_ref(backend, CLIENT, "_intake_rejected");
    let mut conn = DbConnection::open(&db);
    conn.execute(&match backend {
        Backend::Postgres => {
            format!("ALTER TABLE {rejected} ADD CONSTRAINT refuse_all CHECK (false)")
        }
        Backend::Sqlite => format!(
            "CREATE TRIGGER refuse_all BEFORE INSERT ON {rejected} \
             BEGIN SELECT RAISE(ABORT, 'refuse_all'); END"
        ),
    });
    let bad = r#"{"id":"not a number","keys":["id"]}"#;
    let body = format!(r#"[{{"id":2,"keys":["id"]}},{bad},{{"id":3,"keys":["id"]}}]"#);
    server.push(CLIENT, "orders", &key, &body).assert_created();
    push(&server, &key, "users", &[json!({"u": 1, "keys": ["u"]})]);

    let out = run_loader(&db, &["run"]);
    assert!(
        !out.status.success(),
        "run must fail when a table fails: {out:?}"
    );
    let failure = out
        .stderr
        .lines()
        .find(|l| {
            l.contains(&format!("client {CLIENT} "))
                && l.contains("orders")
                && !l.contains("loaded")
        })
        .unwrap_or_else(|| panic!("no message about the failed table:\n{}", out.stderr));
    assert!(!failure.contains("users"), "{failure}");
    assert_eq!(
        warehouse_count(&db, CLIENT, "users"),
        1,
        "the other table still loads"
    );
    let staged: Vec<String> = staged_rows(&db).into_iter().map(|r| r.3).collect();
    assert!(
        staged.iter().any(|r| r == bad),
        "the bad record must stay staged: {staged:?}"
    );

    // Once the database accepts rejections again, the next run finishes the job.
    conn.execute(&match backend {
        Backend::Postgres => format!("ALTER TABLE {rejected} DROP CONSTRAINT refuse_all"),
        Backend::Sqlite => "DROP TRIGGER refuse_all".to_owned(),
    });
    load(&db);
    assert_staging_empty(&db);
    let ids: Vec<Value> = rows(&db, "orders", "\"id\"")
        .iter()
        .map(|r| r["id"].clone())
        .collect();
    assert_eq!(ids, [json!(1), json!(2), json!(3)]);
    let kept: Vec<Value> = rows(&db, "_intake_rejected", "\"seq\"")
        .iter()
        .map(|r| r["record"].clone())
        .collect();
    assert_eq!(kept, [json!(bad)]);
}

fn the_chunk_size_comes_from_the_flag_or_the_configuration(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let config = config_file(&db, "small-chunks.toml", "[loader]\nchunk_size = 2\n");
    let rec = |id: i64| json!({"id": id, "keys": ["id"]});

    push(
        &server,
        &key,
        "events",
        &[rec(1), rec(2), rec(3), rec(4), rec(5)],
    );
    let seqs: Vec<i64> = staged_times(&db, CLIENT, "events")
        .iter()
        .map(|t| t.0)
        .collect();
    run_loader(&db, &["run", "--config", &config]).assert_success();
    push(&server, &key, "events", &[rec(6), rec(7), rec(8)]);
    let more: Vec<i64> = staged_times(&db, CLIENT, "events")
        .iter()
        .map(|t| t.0)
        .collect();
    run_loader(&db, &["--config", &config, "run", "--chunk-size", "3"]).assert_success();
    assert_staging_empty(&db);
    assert_eq!(warehouse_count(&db, CLIENT, "events"), 8);

    // One history row per chunk: 2 + 2 + 1 from the file, then 3 from the flag.
    let chunks: Vec<Value> = rows(&db, "_intake_load_history", "\"id\"")
        .iter()
        .map(|h| {
            assert_eq!(h["table_name"], "events", "{h}");
            assert_eq!(h["error"], Value::Null, "{h}");
            assert_eq!(h["records_rejected"], 0, "{h}");
            json!([h["records_loaded"], h["first_seq"], h["last_seq"]])
        })
        .collect();
    assert_eq!(
        chunks,
        [
            json!([2, seqs[0], seqs[1]]),
            json!([2, seqs[2], seqs[3]]),
            json!([1, seqs[4], seqs[4]]),
            json!([3, more[0], more[2]]),
        ]
    );
}

#[derive(QueryableByName)]
struct TextValue {
    #[diesel(sql_type = Nullable<Text>)]
    v: Option<String>,
}

fn more_than_1500_columns_overflow_into_one_json_column(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let field = |i: usize| format!("f{i:04}");
    let mut wide = json!({"id": 1, "keys": ["id"]});
    for i in 0..1600 {
        wide[field(i)] = json!(i);
    }
    push(&server, &key, "wide", &[wide]);
    load(&db);
    let rejected: Vec<Value> = rows(&db, "_intake_rejected", "\"seq\"")
        .iter()
        .map(|r| r["reason"].clone())
        .collect();
    assert_eq!(
        rejected,
        Vec::<Value>::new(),
        "nothing fails: the wide record was rejected"
    );
    let columns = warehouse_columns(&db, CLIENT, "wide");
    assert!(
        (1500..=1501).contains(&columns.len()),
        "{} columns: it stops at about 1,500",
        columns.len()
    );
    assert!(columns.iter().any(|c| c.name == "_intake_overflow"));

    // A later record: a field with a column, one already in the overflow, and a new one.
    let later = json!({"id": 2, "keys": ["id"], "f0000": 7, "f1599": 8, "brand_new": "x"});
    push(&server, &key, "wide", &[later]);
    load(&db);
    assert_staging_empty(&db);
    assert_eq!(
        warehouse_columns(&db, CLIENT, "wide").len(),
        columns.len(),
        "no new column"
    );

    // Every field is recorded, and its value is where the record says.
    let maps = mappings(&db);
    let overflow_text = match backend {
        Backend::Postgres => "CAST(\"_intake_overflow\" AS TEXT)",
        Backend::Sqlite => "\"_intake_overflow\"",
    };
    let table = table_ref(backend, CLIENT, "wide");
    let overflow = |id: i64| -> serde_json::Map<String, Value> {
        let found: Vec<TextValue> = DbConnection::open(&db).load(&format!(
            "SELECT {overflow_text} AS v FROM {table} WHERE id = {id}"
        ));
        let text = found
            .first()
            .and_then(|r| r.v.clone())
            .unwrap_or_else(|| "{}".into());
        match serde_json::from_str(&text) {
            Ok(Value::Object(fields)) => fields,
            other => panic!("_intake_overflow of {id} is not an object: {other:?}"),
        }
    };
    let cell = |id: i64, column: &str| -> Option<String> {
        let found: Vec<TextValue> = DbConnection::open(&db).load(&format!(
            "SELECT CAST({} AS TEXT) AS v FROM {table} WHERE id = {id}",
            support::sql_ident(column)
        ));
        found.first().and_then(|r| r.v.clone())
    };
    let (first, second) = (overflow(1), overflow(2));
    let mut in_columns = 0;
    let mut in_overflow = 0;
    for i in 0..1600 {
        let name = field(i);
        let column = column_of(&maps, "wide", &[&name]);
        if column == "_intake_overflow" {
            in_overflow += 1;
            assert_eq!(first.get(&name), Some(&json!(i)), "{name} in the overflow");
        } else {
            in_columns += 1;
            if i % 97 == 0 {
                // On PostgreSQL a value that would push the row past the 8 KB page limit is
                // kept in the row's overflow instead (docs/warehouse.md); never lost.
                match cell(1, &column) {
                    Some(v) => assert_eq!(v, i.to_string(), "{name}"),
                    None => assert_eq!(first.get(&name), Some(&json!(i)), "{name} spilled"),
                }
            }
        }
    }
    assert_eq!(in_columns + in_overflow, 1600);
    assert!(in_overflow >= 99, "{in_overflow} fields in the overflow");
    assert_eq!(column_of(&maps, "wide", &["brand_new"]), "_intake_overflow");
    assert_eq!(second.get("brand_new"), Some(&json!("x")));
    let f1599 = column_of(&maps, "wide", &["f1599"]);
    if f1599 == "_intake_overflow" || cell(2, &f1599).is_none() {
        assert_eq!(second.get("f1599"), Some(&json!(8)));
    } else {
        assert_eq!(cell(2, &f1599), Some("8".into()));
    }
    assert_eq!(
        cell(2, &column_of(&maps, "wide", &["f0000"])),
        Some("7".into())
    );
    assert_source_paths_are_field_paths(&db);
}

fn run_fails_when_the_database_is_unreachable(backend: Backend) {
    let db = TestDb::unreachable(backend);
    let started = std::time::Instant::now();
    let out = run_loader(&db, &["run"]);
    assert!(!out.status.success(), "run must fail: {out:?}");
    assert!(!out.stderr.trim().is_empty(), "and say why: {out:?}");
    assert!(started.elapsed() < Duration::from_secs(30), "quickly");
}

/// PostgreSQL: a column whose type was changed by hand to one that PostgreSQL converts Intake's
/// values to (bigint to numeric, say) still takes new rows, in root and child tables alike,
/// new keys and replaced ones, with the values converted. (New rows go by binary COPY, which
/// converts nothing and would store the 6 below as 0; the loader must notice the changed type
/// and write that table's rows by INSERT, which converts.)
#[test]
fn a_column_retyped_by_hand_still_loads_on_postgres() {
    let backend = Backend::Postgres;
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let record =
        |id: i64, n: i64, q: i64| json!({"id": id, "keys": ["id"], "n": n, "items": [{"qty": q}]});
    push(&server, &key, "orders", &[record(1, 5, 1)]);
    load(&db);
    let mut conn = DbConnection::open(&db);
    for (table, column) in [("orders", "n"), ("orders__items", "qty")] {
        conn.execute(&format!(
            "ALTER TABLE {} ALTER COLUMN \"{column}\" TYPE numeric",
            table_ref(backend, CLIENT, table)
        ));
    }
    push(&server, &key, "orders", &[record(2, 6, 2), record(1, 7, 3)]);
    load(&db);
    assert_staging_empty(&db);
    assert_eq!(
        rows(&db, "_intake_rejected", "\"seq\"").len(),
        0,
        "nothing rejected"
    );
    let values = |table: &str, column: &str| -> Vec<f64> {
        rows(&db, table, "\"_intake_seq\"")
            .iter()
            .map(|r| r[column].as_f64().unwrap_or(f64::NAN))
            .collect()
    };
    assert_eq!(values("orders", "n"), [6.0, 7.0]);
    assert_eq!(values("orders__items", "qty"), [2.0, 3.0]);
}

/// A root row deleted by hand leaves its child rows behind. The next version of that key is a
/// new root row, whose child rows must still replace the old ones, not collide with them.
fn child_rows_left_by_a_root_deleted_by_hand_do_not_block_its_next_version(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let version = |v: &str, skus: &[&str]| {
        json!({"id": 1, "keys": ["id"], "v": v,
               "items": skus.iter().map(|s| json!({"sku": s})).collect::<Vec<_>>()})
    };
    push(&server, &key, "orders", &[version("one", &["A", "B", "C"])]);
    push(
        &server,
        &key,
        "orders",
        &[json!({"id": 2, "keys": ["id"], "items": [{"sku": "Z"}]})],
    );
    load(&db);
    DbConnection::open(&db).execute(&format!(
        "DELETE FROM {} WHERE \"id\" = 1",
        table_ref(backend, CLIENT, "orders")
    ));
    assert_eq!(
        warehouse_count(&db, CLIENT, "orders__items"),
        4,
        "orphans stay"
    );

    // Key 1 comes back (a new root row) beside a brand-new key 3, in one chunk.
    push(
        &server,
        &key,
        "orders",
        &[
            version("two", &["N"]),
            json!({"id": 3, "keys": ["id"], "items": [{"sku": "Y"}]}),
        ],
    );
    load(&db);
    assert_staging_empty(&db);
    assert_eq!(
        rows(&db, "_intake_rejected", "\"seq\"").len(),
        0,
        "nothing rejected"
    );
    let items: Vec<(i64, String)> = rows(
        &db,
        "orders__items",
        "\"_intake_root_id\", \"_intake_pos_0\"",
    )
    .iter()
    .map(|r| {
        (
            r["_intake_root_id"].as_i64().unwrap_or(-1),
            r["sku"].as_str().unwrap_or("?").to_owned(),
        )
    })
    .collect();
    assert_eq!(
        items,
        [
            (1, "N".to_owned()),
            (2, "Z".to_owned()),
            (3, "Y".to_owned())
        ]
    );
}

/// `loader.chunk_max_bytes` cuts chunks by size as well as by count, so large records cannot
/// make a chunk (and the loader) huge; a record larger than the budget loads alone.
fn a_chunk_holds_no_more_bytes_than_configured(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let config = config_file(
        &db,
        "small-bytes.toml",
        "[loader]\nchunk_size = 100\nchunk_max_bytes = 1000\n",
    );
    let rec = |id: i64, size: usize| json!({"id": id, "keys": ["id"], "pad": "x".repeat(size)});
    let mut records: Vec<Value> = (1..=9).map(|id| rec(id, 250)).collect();
    records.insert(4, rec(100, 3000));
    push(&server, &key, "sized", &records);
    let staged: Vec<(i64, usize)> = staged_rows(&db)
        .iter()
        .map(|(_, _, seq, record)| (*seq, record.len()))
        .collect();
    assert_eq!(staged.len(), 10);

    run_loader(&db, &["run", "--config", &config]).assert_success();
    assert_staging_empty(&db);
    assert_eq!(warehouse_count(&db, CLIENT, "sized"), 10);
    let sizes: std::collections::HashMap<i64, usize> = staged.into_iter().collect();
    let chunks = assert_chunks_fit(&db, &sizes, 1000);
    assert!(chunks.len() >= 4, "chunks cut by size: {chunks:?}");
    let covered: i64 = chunks.iter().map(|(first, last)| last - first + 1).sum();
    assert_eq!(covered, 10, "every record in exactly one chunk: {chunks:?}");
}

/// A chunk read returns records no larger than an equal part of the byte budget with the
/// rows, and reads larger ones apart: a mix of both loads whole, in chunks within the budget.
fn records_read_apart_for_their_size_load_whole(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    // 300 bytes a record read with the rows.
    let config = config_file(
        &db,
        "mixed-sizes.toml",
        "[loader]\nchunk_size = 4\nchunk_max_bytes = 1200\n",
    );
    let pads: Vec<usize> = vec![100, 500, 100, 100, 700, 500, 100, 2000, 100, 100, 500];
    let records: Vec<Value> = pads
        .iter()
        .enumerate()
        .map(|(i, pad)| json!({"id": i + 1, "keys": ["id"], "pad": "é".repeat(*pad / 2)}))
        .collect();
    push(&server, &key, "mixed", &records);
    let sizes: std::collections::HashMap<i64, usize> = staged_rows(&db)
        .iter()
        .map(|(_, _, seq, record)| (*seq, record.len()))
        .collect();
    assert!(sizes.values().any(|s| *s <= 300) && sizes.values().any(|s| *s > 300));

    run_loader(&db, &["run", "--config", &config]).assert_success();
    assert_staging_empty(&db);
    let loaded: Vec<(i64, usize)> = rows(&db, "mixed", "\"id\"")
        .iter()
        .map(|r| {
            let pad = r["pad"].as_str().unwrap_or_default();
            (r["id"].as_i64().unwrap_or(-1), pad.chars().count() * 2)
        })
        .collect();
    let expected: Vec<(i64, usize)> = (1i64..).zip(pads.iter().copied()).collect();
    assert_eq!(loaded, expected);
    assert_chunks_fit(&db, &sizes, 1200);
}

/// Writes a configuration file into the test's directory; its path.
fn config_file(db: &TestDb, name: &str, text: &str) -> String {
    let path = db.dir().join(name);
    std::fs::write(&path, text).expect("writing a config file");
    path.to_string_lossy().into_owned()
}

/// The sequence range of every chunk in the load history, each checked to hold no more than
/// `budget` bytes of staged records (`sizes` by sequence) unless it holds one record.
fn assert_chunks_fit(
    db: &TestDb,
    sizes: &std::collections::HashMap<i64, usize>,
    budget: usize,
) -> Vec<(i64, i64)> {
    let chunks: Vec<(i64, i64)> = rows(db, "_intake_load_history", "\"id\"")
        .iter()
        .map(|h| {
            (
                h["first_seq"].as_i64().unwrap_or(-1),
                h["last_seq"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    for (first, last) in &chunks {
        let bytes: usize = (*first..=*last).filter_map(|s| sizes.get(&s)).sum();
        assert!(
            bytes <= budget || first == last,
            "chunk {first}..={last} holds {bytes} bytes"
        );
    }
    chunks
}

/// Records whose schema grows as they arrive: every ten bring a new field, then a field
/// with values of two types, an array, an array nested in its elements and a double where
/// integers were; every fifth record is a new version of an earlier key.
fn growing_schema() -> Vec<Value> {
    (0..70i64)
        .map(|i| {
            let group = i / 10;
            let id = if i % 5 == 4 { i / 3 + 1 } else { i + 1 };
            let mut record = json!({"id": id, "keys": ["id"], "n": i});
            let fields = record.as_object_mut().expect("an object");
            if group >= 1 {
                fields.insert(format!("field_{group}"), json!(i));
            }
            if group >= 2 {
                let amount = if i % 2 == 0 {
                    json!(i)
                } else {
                    json!(format!("{i} EUR"))
                };
                fields.insert("amount".into(), amount);
            }
            if group >= 3 {
                fields.insert("lines".into(), json!([{"sku": format!("s{i}"), "qty": i}]));
            }
            if group >= 4 {
                fields.insert(
                    "lines".into(),
                    json!([{"sku": "x", "parts": [{"p": i}, {"p": i + 1}]}, {"sku": "y"}]),
                );
            }
            if group >= 5 {
                fields.insert("n".into(), json!(i as f64 + 0.5));
            }
            record
        })
        .collect()
}

/// On PostgreSQL a loader places the next chunk's rows while the current one is written,
/// against the schema as the current one leaves it. Loaded in small chunks whose schema
/// keeps growing, the warehouse (tables, columns, rows) must come out as when every chunk is
/// loaded by a run of its own (nothing read or placed ahead), and the chunks placed ahead
/// must be used rather than placed again.
fn a_schema_that_grows_chunk_by_chunk_loads_alike_with_or_without_read_ahead(backend: Backend) {
    const CHUNK: usize = 7;
    let records = growing_schema();
    let mut loaded = Vec::new();
    for one_run in [true, false] {
        let db = TestDb::new(backend);
        let (server, key) = start(&db);
        let mut logs = String::new();
        for part in records.chunks(CHUNK) {
            push(&server, &key, "orders", part);
            if !one_run {
                logs.push_str(&load_in_chunks(&db, CHUNK));
            }
        }
        if one_run {
            logs = load_in_chunks(&db, CHUNK);
        }
        assert_staging_empty(&db);
        let ahead = logs.matches("(ahead)").count();
        if backend == Backend::Postgres && one_run {
            // Ten chunks: each but the first is read, and placed, during the one before.
            assert_eq!(ahead, records.len() / CHUNK - 1, "{logs}");
            assert!(!logs.contains("placed again"), "{logs}");
        } else {
            assert_eq!(ahead, 0, "{logs}");
        }
        let mut tables = BTreeMap::new();
        for table in warehouse_tables(&db, CLIENT) {
            if table.starts_with("_intake_") {
                continue;
            }
            let mut table_rows = rows_as_loaded(&db, &table, "1");
            table_rows.sort_by_key(|r| r.to_string());
            tables.insert(table, table_rows);
        }
        loaded.push((tables, mappings(&db)));
    }
    let (tables, catalog) = &loaded[0];
    assert!(
        tables.len() >= 3,
        "a root and two child tables: {tables:#?}"
    );
    assert!(
        catalog.iter().any(|(_, _, t, _)| t == "text")
            && catalog.iter().any(|(_, _, t, _)| t == "double"),
        "typed siblings and a widened column: {catalog:#?}"
    );
    assert_eq!(loaded[0], loaded[1]);
}

/// `intake-loader run` in chunks of `records`, which must succeed; its debug log.
fn load_in_chunks(db: &TestDb, records: usize) -> String {
    let out = run_cli(
        env!("CARGO_BIN_EXE_intake-loader"),
        db,
        &["run", "--chunk-size", &records.to_string()],
        &[("RUST_LOG", "intake_loader=debug")],
    );
    out.assert_success();
    out.stderr
}

/// 3,000 order records over 2,200 keys: later versions of 800 keys change their fields and
/// grow, shrink or drop their arrays. Deterministic.
fn many_versions() -> Vec<Value> {
    (0..3000i64)
        .map(|i| {
            let (id, version) = if i < 2200 {
                (i + 1, 0)
            } else {
                ((i * 7) % 2200 + 1, 1)
            };
            let items: Vec<Value> = (0..(id + version) % 4)
                .map(|n| json!({"sku": format!("S{id}-{n}-{version}"), "qty": n + version}))
                .collect();
            let mut record = json!({
                "id": id, "keys": ["id"], "version": version,
                "customer": {"name": format!("c{}", id % 97), "vip": id % 5 == 0},
                "items": items,
            });
            if (id + version) % 3 == 0 {
                record["tags"] = json!([format!("t{version}"), "x"]);
            }
            record
        })
        .collect()
}

/// A table's rows without the load and receive times, which differ between two loads.
fn rows_as_loaded(db: &TestDb, table: &str, order_by: &str) -> Vec<Value> {
    rows(db, table, order_by)
        .into_iter()
        .map(|mut r| {
            if let Some(fields) = r.as_object_mut() {
                fields.remove("_intake_loaded_at");
                fields.remove("_intake_received_at");
            }
            r
        })
        .collect()
}

/// `loader.writers`: on PostgreSQL a chunk's keys are shared between connections that write
/// at once, each in its own transaction. The warehouse must come out exactly as one writer
/// leaves it, and every record must be accounted for once.
fn a_large_chunk_loads_alike_with_one_writer_or_two(backend: Backend) {
    let records = many_versions();
    let mut loaded = Vec::new();
    for writers in ["1", "2"] {
        let db = TestDb::new(backend);
        let (server, key) = start(&db);
        // The first records make the tables and columns: a chunk that changes the schema is
        // written by one connection, as the others could not see the change yet.
        push(&server, &key, "orders", &records[..10]);
        load(&db);
        for part in records[10..].chunks(1000) {
            push(&server, &key, "orders", part);
        }
        run_cli(
            env!("CARGO_BIN_EXE_intake-loader"),
            &db,
            &["run"],
            &[("INTAKE__LOADER__WRITERS", writers)],
        )
        .assert_success();
        assert_staging_empty(&db);
        let history = rows(&db, "_intake_load_history", "\"id\"");
        let loaded_records: i64 = history
            .iter()
            .map(|h| h["records_loaded"].as_i64().unwrap_or(0))
            .sum();
        assert_eq!(loaded_records, 3000, "{history:#?}");
        // One history row per transaction: the shares of a chunk are noted apart.
        let expected_rows = if writers == "2" && backend == Backend::Postgres {
            3
        } else {
            2
        };
        assert_eq!(history.len(), expected_rows, "{history:#?}");
        loaded.push((
            rows_as_loaded(&db, "orders", "\"id\""),
            rows_as_loaded(
                &db,
                "orders__items",
                "\"_intake_root_id\", \"_intake_pos_0\"",
            ),
            rows_as_loaded(
                &db,
                "orders__tags",
                "\"_intake_root_id\", \"_intake_pos_0\"",
            ),
        ));
    }
    let (orders, items, tags) = &loaded[0];
    assert_eq!(orders.len(), 2200);
    // The newest version of every key, with exactly its own child rows.
    let newest: BTreeMap<i64, &Value> = records
        .iter()
        .map(|r| (r["id"].as_i64().unwrap_or(0), r))
        .collect();
    for row in orders {
        let record = newest[&row["id"].as_i64().unwrap_or(0)];
        assert_eq!(row["version"], record["version"], "{row}");
    }
    let expected_items: usize = newest
        .values()
        .map(|r| r["items"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(items.len(), expected_items);
    let expected_tags: usize = newest
        .values()
        .map(|r| r["tags"].as_array().map_or(0, Vec::len))
        .sum();
    assert_eq!(tags.len(), expected_tags);
    assert!(
        loaded[0] == loaded[1],
        "one writer and two leave different tables"
    );
}

/// A record the database refuses, in a chunk written by two connections at once: only that
/// record is rejected, whichever share it fell in; the other share's rows are loaded once.
/// Helpers go on to later chunks while the loader's own connection writes its share, so on
/// PostgreSQL a share can fail after later chunks were handed out: its records, and any
/// share given to the same helper after it, must still load (the one at fault rejected),
/// and a key's later version, in a later chunk, must win over its earlier one.
fn a_share_that_fails_holds_up_no_later_chunk_and_reorders_no_version(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    let tables = [
        ("lines", 17),
        ("lines_b", 18),
        ("lines_c", 19),
        ("lines_d", 20),
    ];
    let seed = json!({"id": 0, "keys": ["id"], "n": 0, "v": 0, "items": [0]});
    tables_refusing_large_n(&db, &server, &key, &tables, &seed);
    // Two versions of 2,500 keys, in chunks of 1,000: the failing record (version 1 of its
    // key) is in the first chunk, its key's version 2 in the fourth.
    for (table, bad) in tables {
        let records: Vec<Value> = (1..=2)
            .flat_map(|v| (1..=2500).map(move |id| (v, id)))
            .map(|(v, id)| {
                let n = if (v, id) == (1, bad) { 5000 } else { id % 1000 };
                json!({"id": id, "keys": ["id"], "n": n, "v": v, "items": [id, v]})
            })
            .collect();
        push(&server, &key, table, &records);
    }
    let out = run_loader(&db, &["run", "--chunk-size", "1000"]);
    out.assert_success();
    assert_staging_empty(&db);
    for (table, _) in tables {
        let line = format!("client {CLIENT} table {table}: loaded 4999 records, rejected 1");
        assert!(
            out.stderr.lines().any(|l| l.ends_with(&line)),
            "expected {line:?} in:\n{}",
            out.stderr
        );
        let loaded: Vec<(i64, i64)> = rows(&db, table, "\"id\"")
            .iter()
            .map(|r| {
                (
                    r["id"].as_i64().unwrap_or(-1),
                    r["v"].as_i64().unwrap_or(-1),
                )
            })
            .collect();
        let expected: Vec<(i64, i64)> = std::iter::once((0, 0))
            .chain((1..=2500).map(|id| (id, 2)))
            .collect();
        assert_eq!(loaded, expected, "{table}: every key at its last version");
        assert_eq!(
            warehouse_count(&db, CLIENT, &format!("{table}__items")),
            1 + 2 * 2500,
            "{table}: the child rows of the last versions only"
        );
    }
    assert_eq!(rows(&db, "_intake_rejected", "\"seq\"").len(), tables.len());
}

fn a_database_error_in_a_shared_chunk_rejects_only_the_record_at_fault(backend: Backend) {
    let db = TestDb::new(backend);
    let (server, key) = start(&db);
    // On PostgreSQL the chunk is written in two shares, each in a transaction of its own: the
    // share without the failing record commits, whichever connection wrote it. The four
    // tables put the failing record in different shares (the share is a hash of the key), so
    // both the loader's own connection and its helper meet a failure.
    let tables = [
        ("orders", 777),
        ("orders_b", 778),
        ("orders_c", 779),
        ("orders_d", 780),
    ];
    let seed = json!({"id": 0, "keys": ["id"], "n": 0, "items": [0]});
    tables_refusing_large_n(&db, &server, &key, &tables, &seed);
    for (table, bad) in tables {
        let records: Vec<Value> = (1..=1500)
            .map(|id| {
                let n = if id == bad { 5000 } else { id % 1000 };
                json!({"id": id, "keys": ["id"], "n": n, "items": [id, -id]})
            })
            .collect();
        push(&server, &key, table, &records);
    }
    let out = load(&db);
    assert_staging_empty(&db);

    let history = rows(&db, "_intake_load_history", "\"id\"");
    for (table, bad) in tables {
        // The count the loader prints includes a share that committed before the chunk failed.
        let expected_line =
            format!("client {CLIENT} table {table}: loaded 1499 records, rejected 1");
        assert!(
            out.stderr.lines().any(|l| l.ends_with(&expected_line)),
            "expected {expected_line:?} in:\n{}",
            out.stderr
        );
        let ids: Vec<i64> = rows(&db, table, "\"id\"")
            .iter()
            .map(|r| r["id"].as_i64().unwrap_or(-1))
            .collect();
        let expected: Vec<i64> = (0..=1500).filter(|id| *id != bad).collect();
        assert_eq!(ids, expected, "{table}");
        assert_eq!(
            warehouse_count(&db, CLIENT, &format!("{table}__items")),
            1 + 2 * 1499,
            "{table}: child rows of every loaded record, once"
        );
        let of_table: Vec<&Value> = history
            .iter()
            .filter(|h| h["table_name"] == table)
            .collect();
        let sum = |f: &str| {
            of_table
                .iter()
                .map(|h| h[f].as_i64().unwrap_or(0))
                .sum::<i64>()
        };
        assert_eq!(sum("records_loaded"), 1 + 1499, "{table}: {of_table:#?}");
        assert_eq!(sum("records_rejected"), 1, "{table}: {of_table:#?}");
    }
    let rejected = rows(&db, "_intake_rejected", "\"seq\"");
    assert_eq!(rejected.len(), tables.len(), "{rejected:#?}");
    for (_, bad) in tables {
        assert!(
            rejected.iter().any(|r| r["record"]
                .as_str()
                .is_some_and(|r| r.contains(&format!("\"id\":{bad},")))),
            "{bad}: {rejected:#?}"
        );
    }
}

#[derive(QueryableByName)]
struct SettingBytes {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
}

/// A loader says which of the two PostgreSQL settings that set the pace of a large backlog
/// are still at PostgreSQL's defaults (read here from `pg_settings`, since the server may be
/// tuned), and names none on SQLite.
fn the_loader_names_postgresql_settings_that_slow_a_large_load(backend: Backend) {
    let db = TestDb::new(backend);
    let out = load(&db);
    let named = |setting: &str| {
        out.stderr
            .lines()
            .any(|l| l.contains(&format!("PostgreSQL's {setting} is at its default")))
    };
    if backend == Backend::Sqlite {
        assert!(!out.stderr.contains("PostgreSQL's"), "{}", out.stderr);
        return;
    }
    let settings: Vec<SettingBytes> = DbConnection::open(&db).load(
        "SELECT name, setting::bigint * CASE unit WHEN '8kB' THEN 8192 WHEN 'MB' THEN 1048576 \
           ELSE NULL END AS bytes \
         FROM pg_settings WHERE name IN ('shared_buffers', 'max_wal_size')",
    );
    assert_eq!(settings.len(), 2);
    for SettingBytes { name, bytes } in settings {
        let default = if name == "shared_buffers" {
            128 << 20
        } else {
            1 << 30
        };
        assert_eq!(
            named(&name),
            bytes <= default,
            "{name} = {bytes} bytes:\n{}",
            out.stderr
        );
    }
}
