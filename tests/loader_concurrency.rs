//! Several loaders at once: two `intake-loader run` processes started together over a staged
//! backlog load every record exactly once, on SQLite and on PostgreSQL.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
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
