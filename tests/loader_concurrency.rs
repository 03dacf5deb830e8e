//! Several loaders at once: two `intake-loader run` processes started together over a staged
//! backlog load every record exactly once, on SQLite and on PostgreSQL; and on PostgreSQL a
//! pass keeps a table to itself from its first chunk to its last.

mod support;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use intake_core::db::{DatabaseTarget, DbPool};
use intake_core::settings::DatabaseSettings;
use intake_loader::pass::{Event, run_pass};
use intake_loader::queue::ChunkLimits;
use serde_json::{Value, json};
use support::faults::DirectDb;
use support::{
    Backend, LoaderProcess, Server, TestDb, both_backends, issue_key, staged_rows, warehouse_count,
    warehouse_rows,
};

both_backends!(two_loaders_at_once_load_every_record_exactly_once);

const CLIENT: i64 = 42;
const TABLES: [&str; 3] = ["alpha", "beta", "gamma"];
const RECORDS_PER_TABLE: i64 = 3000;
const RECORDS_PER_REQUEST: usize = 500;

/// A small deterministic generator, so that a failure can be reproduced exactly.
struct Lcg(u64);

impl Lcg {
    /// A number in `0..bound`.
    fn below(&mut self, bound: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % bound
    }
}

/// The record with version `v` of key `id`: as many items as `v % 3`, each naming `v`.
fn record(table: &str, id: i64, v: i64) -> Value {
    let items: Vec<Value> = (0..v % 3).map(|k| json!({"v": v, "k": k})).collect();
    json!({"id": id, "keys": ["id"], "v": v, "label": format!("{table}-{v}"), "items": items})
}

fn two_loaders_at_once_load_every_record_exactly_once(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "backlog");

    // Per table, 3000 records of which about a fifth repeat an earlier key; the expected
    // warehouse holds, per key, the version pushed last.
    let mut rng = Lcg(20_240_301);
    let mut expected: BTreeMap<&str, BTreeMap<i64, i64>> = BTreeMap::new();
    for table in TABLES {
        let mut records = Vec::new();
        let newest = expected.entry(table).or_default();
        let mut next_id = 1;
        for v in 0..RECORDS_PER_TABLE {
            let id = if next_id > 1 && rng.below(5) == 0 {
                1 + rng.below(next_id as u64 - 1) as i64
            } else {
                next_id += 1;
                next_id - 1
            };
            newest.insert(id, v);
            records.push(record(table, id, v));
        }
        for batch in records.chunks(RECORDS_PER_REQUEST) {
            let body = Value::Array(batch.to_vec()).to_string();
            let accepted = server.push(CLIENT, table, &key, &body).assert_created();
            assert_eq!(accepted, batch.len() as u64);
        }
    }
    assert_eq!(staged_rows(&db).len() as i64, 3 * RECORDS_PER_TABLE);
    for (table, newest) in &expected {
        let repeats = RECORDS_PER_TABLE - newest.len() as i64;
        assert!(
            (400..=800).contains(&repeats),
            "{table}: {repeats} repeated keys"
        );
    }

    let args = ["run", "--chunk-size", "200"];
    let mut first = LoaderProcess::spawn(&db, "loader-1", &args);
    let mut second = LoaderProcess::spawn(&db, "loader-2", &args);
    for (name, loader) in [("first", &mut first), ("second", &mut second)] {
        let out = loader
            .wait(Duration::from_secs(180))
            .unwrap_or_else(|| panic!("the {name} loader did not finish within 180 s"));
        eprintln!("[{name} loader]\n{}", out.stderr);
        assert!(
            out.status.success(),
            "the {name} loader failed ({}):\n{}",
            out.status,
            out.stderr
        );
    }

    let left = staged_rows(&db);
    assert!(left.is_empty(), "{} records left in staging", left.len());
    for (table, newest) in &expected {
        let rows = warehouse_rows(&db, CLIENT, table, "\"id\"");
        let loaded: BTreeMap<i64, i64> = rows
            .iter()
            .map(|r| {
                let id = r["id"].as_i64().expect("an integer id");
                let v = r["v"].as_i64().expect("an integer v");
                assert_eq!(r["label"], format!("{table}-{v}"), "{r}");
                (id, v)
            })
            .collect();
        assert_eq!(loaded.len(), rows.len(), "{table}: duplicate keys");
        let wrong: Vec<(i64, Option<&i64>, Option<&i64>)> = newest
            .keys()
            .chain(loaded.keys())
            .filter(|id| newest.get(id) != loaded.get(id))
            .map(|id| (*id, newest.get(id), loaded.get(id)))
            .collect();
        assert!(
            wrong.is_empty(),
            "{table}: {} keys with the wrong version (id, expected v, loaded v), e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(10)]
        );

        // Each key's items are those of its newest version, and only those.
        let child = format!("{table}__items");
        let items = warehouse_rows(
            &db,
            CLIENT,
            &child,
            "\"_intake_root_id\", \"_intake_pos_0\"",
        );
        let mut by_key: BTreeMap<i64, Vec<(i64, i64)>> = BTreeMap::new();
        for item in &items {
            let int = |c: &str| item[c].as_i64().unwrap_or_else(|| panic!("{c} of {item}"));
            assert_eq!(int("_intake_pos_0"), int("k"), "{item}");
            by_key
                .entry(int("_intake_root_id"))
                .or_default()
                .push((int("k"), int("v")));
        }
        let expected_items: BTreeMap<i64, Vec<(i64, i64)>> = newest
            .iter()
            .filter(|(_, v)| *v % 3 > 0)
            .map(|(id, v)| (*id, (0..v % 3).map(|k| (k, *v)).collect()))
            .collect();
        let wrong_items: Vec<i64> = expected_items
            .keys()
            .chain(by_key.keys())
            .filter(|id| expected_items.get(id) != by_key.get(id))
            .copied()
            .collect();
        assert!(
            wrong_items.is_empty(),
            "{child}: {} keys with wrong items, e.g. {:?}",
            wrong_items.len(),
            wrong_items
                .iter()
                .take(5)
                .map(|id| (id, expected_items.get(id), by_key.get(id)))
                .collect::<Vec<_>>()
        );
        assert_eq!(
            items.len(),
            expected_items.values().map(Vec::len).sum::<usize>()
        );
    }

    // Every record was taken by exactly one chunk of one loader.
    let history = warehouse_rows(&db, CLIENT, "_intake_load_history", "\"id\"");
    for table in TABLES {
        let chunks: Vec<&Value> = history
            .iter()
            .filter(|h| h["table_name"] == table)
            .collect();
        let sum = |f: &str| {
            chunks
                .iter()
                .map(|h| h[f].as_i64().unwrap_or(0))
                .sum::<i64>()
        };
        assert_eq!(
            (sum("records_loaded"), sum("records_rejected")),
            (RECORDS_PER_TABLE, 0),
            "{table}: load history {chunks:#?}"
        );
        let mut ranges: Vec<(i64, i64)> = chunks
            .iter()
            .map(|h| {
                (
                    h["first_seq"].as_i64().unwrap_or(0),
                    h["last_seq"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        ranges.sort_unstable();
        assert!(
            ranges.windows(2).all(|w| w[0].1 < w[1].0),
            "{table}: chunks overlap: {ranges:?}"
        );
    }
    assert_eq!(warehouse_count(&db, CLIENT, "_intake_rejected"), 0);
}

/// PostgreSQL: a pass holds a table's load lock from its first chunk to its last, so no other
/// loader takes the table between two chunks (which is why the pass may use a chunk it read
/// ahead without checking that it is still staged), and frees it when it is done, although
/// its pooled connections stay open. A table whose lock another session holds is skipped and
/// its records stay staged.
#[test]
fn a_pass_holds_its_table_from_first_chunk_to_last_on_postgres() {
    let db = TestDb::new(Backend::Postgres);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "held");
    let push = |ids: std::ops::Range<i64>| {
        let body: Vec<Value> = ids.map(|id| record("held", id, id)).collect();
        server
            .push(CLIENT, "held", &key, &Value::Array(body).to_string())
            .assert_created();
    };
    push(1..31);
    let settings = DatabaseSettings {
        url: db.url.clone(),
        pool_size: 4,
        checkout_timeout_ms: 10_000,
        statement_timeout_ms: 30_000,
        migrate_on_start: false,
    };
    let target = DatabaseTarget::parse(&db.url).expect("a database URL");
    let pool = DbPool::single(&target, &settings).expect("a pool");
    let limits = ChunkLimits {
        records: 5,
        bytes: 1 << 20,
        writers: 2,
    };
    let stop = AtomicBool::new(false);
    let mut other = DirectDb::open(&db);
    let lock = format!("hashtext('intake.load'), hashtext('{CLIENT}/held')");
    let try_lock = format!(
        "SELECT CAST(CASE WHEN pg_try_advisory_lock({lock}) THEN 1 ELSE 0 END AS BIGINT) AS n"
    );
    let unlock = format!("SELECT pg_advisory_unlock({lock})");

    // Another session tries the lock after every chunk: never free while the pass runs.
    let mut tries = Vec::new();
    let report = run_pass(&pool, limits, &stop, &mut |event| {
        if let Event::Chunk { .. } = event {
            tries.push(other.count(&try_lock));
        }
    })
    .expect("a pass");
    assert_eq!(report.tables.len(), 1);
    assert_eq!(report.tables[0].loaded, 30, "{:?}", report.tables[0]);
    assert!(tries.len() >= 6, "chunks of 5: {tries:?}");
    assert!(
        tries.iter().all(|&t| t == 0),
        "taken between chunks: {tries:?}"
    );
    assert!(staged_rows(&db).is_empty());
    assert_eq!(warehouse_count(&db, CLIENT, "held"), 30);

    // Free after the pass; held by the other session, the next pass leaves the table alone.
    assert_eq!(other.count(&try_lock), 1, "the lock is free after the pass");
    push(31..36);
    let report = run_pass(&pool, limits, &stop, &mut |_| {}).expect("a pass");
    assert!(report.tables[0].skipped_busy, "{:?}", report.tables[0]);
    assert_eq!(staged_rows(&db).len(), 5);
    other.exec(&unlock);
    let report = run_pass(&pool, limits, &stop, &mut |_| {}).expect("a pass");
    assert_eq!(report.tables[0].loaded, 5, "{:?}", report.tables[0]);
    assert_eq!(warehouse_count(&db, CLIENT, "held"), 35);
}
