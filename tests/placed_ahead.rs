//! A chunk placed ahead (checked and cut into rows while the chunk before it was written) is
//! used only if the catalog has not moved since. Here it has: between placing and writing,
//! another table of the same client took the name the chunk's new child table was going to
//! get. The chunk must then be placed again, not written with the names it was placed with.
//!
//! A loader reaches this only when another loader changes the client's tables between two
//! of its chunks, so the test drives the loader's library steps (read, parse, place, load)
//! itself, in that order, against a real database.

mod support;

use intake_core::db::{DatabaseTarget, DbPool};
use intake_core::settings::DatabaseSettings;
use intake_loader::catalog::Catalog;
use intake_loader::load_chunk::{
    ChunkOptions, PlacedAhead, Prepared, load_chunk, parse_chunk, place_records,
};
use intake_loader::pass::conn_of;
use intake_loader::queue::{ChunkLimits, read_chunk};
use intake_loader::share_writers::ShareWriters;
use intake_loader::sql::{Conn, in_transaction};
use serde_json::{Value, json};
use support::{
    Backend, Server, TestDb, both_backends, issue_key, load, staged_rows, warehouse_rows,
    warehouse_tables,
};

both_backends!(a_chunk_placed_against_an_outdated_catalog_is_placed_again);

const CLIENT: i64 = 7;
/// The name `orders`' child table for `lines` prefers (docs/warehouse.md).
const CHILD_NAME: &str = "orders__lines";

fn a_chunk_placed_against_an_outdated_catalog_is_placed_again(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "placed ahead");
    let push = |table: &str, records: Value| {
        server
            .push(CLIENT, table, &key, &records.to_string())
            .assert_created();
    };

    // `orders` exists without child tables.
    push(
        "orders",
        json!([{"id": 1, "keys": ["id"], "note": "first"}]),
    );
    load(&db).assert_success();
    // Its next chunk brings an array, so a child table `orders__lines`; a pushed table of
    // that very name is staged too.
    push(
        "orders",
        json!([
            {"id": 1, "keys": ["id"], "note": "second", "lines": [{"sku": "a"}, {"sku": "b"}]},
            {"id": 2, "keys": ["id"], "lines": [{"sku": "c"}]},
        ]),
    );
    push(
        CHILD_NAME,
        json!([{"id": 9, "keys": ["id"], "sku": "pushed"}]),
    );

    let pool = pool(&db);
    let mut db_conn = pool.get().expect("a connection");
    let conn = &mut conn_of(&mut db_conn);
    let limits = ChunkLimits {
        records: 100,
        bytes: 1 << 20,
        writers: 1,
    };

    // As the read-ahead thread does: read, parse and place `orders`' chunk against the
    // catalog as it is now, in which `orders__lines` is free.
    let (orders_chunk, _) = read_chunk(conn, CLIENT, "orders", 0, limits).expect("reading");
    assert_eq!(orders_chunk.len(), 2);
    let parsed = parse_chunk(conn, CLIENT, "orders", &orders_chunk).expect("parsing");
    let base = Catalog::load(conn, CLIENT, "orders").expect("reading the catalog");
    assert!(!base.taken_names.contains(CHILD_NAME));
    let placed = place_records(
        base.clone(),
        &orders_chunk,
        &parsed.paths,
        parsed.records,
        0,
    )
    .expect("placing");

    // Meanwhile another loader loads the pushed table `orders__lines`, which takes the name.
    load_one_chunk(conn, CHILD_NAME, limits, None);
    assert!(warehouse_tables(&db, CLIENT).contains(&CHILD_NAME.to_owned()));

    // The chunk placed ahead is handed to the load as the pass would hand it.
    let ahead = Prepared::Placed(Box::new(PlacedAhead { base, placed }));
    load_one_chunk(conn, "orders", limits, Some((orders_chunk, ahead)));

    assert!(staged_rows(&db).is_empty(), "every staged record loaded");
    // The pushed table holds its own record and nothing of `orders`.
    let pushed = warehouse_rows(&db, CLIENT, CHILD_NAME, "\"id\"");
    assert_eq!(pushed.len(), 1, "{pushed:#?}");
    assert_eq!(pushed[0]["sku"], "pushed");
    // `orders`' lines went to a child table of their own, under another name.
    let tables = warehouse_tables(&db, CLIENT);
    let children: Vec<&String> = tables
        .iter()
        .filter(|t| t.starts_with("orders__lines_"))
        .collect();
    assert_eq!(children.len(), 1, "one child table for lines: {tables:?}");
    let lines = warehouse_rows(
        &db,
        CLIENT,
        children[0],
        "\"_intake_root_id\", \"_intake_pos_0\"",
    );
    let skus: Vec<(i64, &str)> = lines
        .iter()
        .map(|r| {
            (
                r["_intake_root_id"].as_i64().expect("a root id"),
                r["sku"].as_str().expect("a sku"),
            )
        })
        .collect();
    assert_eq!(skus, [(1, "a"), (1, "b"), (2, "c")]);
    let orders = warehouse_rows(&db, CLIENT, "orders", "\"id\"");
    let notes: Vec<&Value> = orders.iter().map(|r| &r["note"]).collect();
    assert_eq!(notes, [&json!("second"), &Value::Null]);
}

/// A pool of the loader's own kind on the test's database.
fn pool(db: &TestDb) -> DbPool {
    let settings = DatabaseSettings {
        url: db.url.clone(),
        pool_size: 1,
        checkout_timeout_ms: 10_000,
        statement_timeout_ms: 30_000,
        migrate_on_start: false,
    };
    let target = DatabaseTarget::parse(&db.url).expect("a database URL");
    DbPool::single(&target, &settings).expect("a pool")
}

/// Loads `table`'s first staged chunk in a transaction of its own: the chunk given (read
/// earlier and prepared as given), or else the chunk read and parsed now. All of it must load.
fn load_one_chunk(
    conn: &mut Conn<'_>,
    table: &str,
    limits: ChunkLimits,
    given: Option<(Vec<intake_loader::queue::Staged>, Prepared)>,
) {
    let outcome = in_transaction(conn, |c| {
        let (chunk, prepared) = match given {
            Some(given) => given,
            None => {
                let (chunk, _) = read_chunk(c, CLIENT, table, 0, limits)?;
                let parsed = parse_chunk(c, CLIENT, table, &chunk)?;
                (chunk, Prepared::Parsed(parsed))
            }
        };
        let outcome = load_chunk(
            c,
            &mut ShareWriters::none(),
            (CLIENT, table),
            &chunk,
            prepared,
            ChunkOptions::default(),
        )?;
        Ok((outcome, chunk.len()))
    });
    let (outcome, records) = outcome.unwrap_or_else(|e| panic!("loading {table}: {e}"));
    assert_eq!((outcome.loaded, outcome.rejected), (records, 0), "{table}");
}
