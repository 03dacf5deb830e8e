//! A deterministic generator of realistic records: nested objects, arrays, mixed types,
//! unicode, about 20% updates of earlier keys and about 400 bytes a record. Every scenario
//! uses the same stream, so figures are comparable.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

const NAMES: &[&str] = &[
    "Ann", "Björn", "Chloé", "Dmitri", "Eun-ji", "Fatima", "Gustavo", "Hana", "Ίρις", "Jürgen",
];
const CITIES: &[&str] = &[
    "Zürich",
    "São Paulo",
    "Kraków",
    "Osaka",
    "Montréal",
    "Reykjavík",
    "Lagos",
    "Austin",
];
const TAGS: &[&str] = &[
    "new",
    "vip",
    "returning",
    "promo",
    "wholesale",
    "gift",
    "priority",
];

/// The record stream: record `i` of a run is always the same.
pub struct Generator {
    rng: StdRng,
    issued: u64,
}

impl Generator {
    pub fn new() -> Generator {
        Generator {
            rng: StdRng::seed_from_u64(0x1A7A4E),
            issued: 0,
        }
    }

    /// The next record's JSON text.
    pub fn next_record(&mut self) -> String {
        let rng = &mut self.rng;
        let id = if self.issued > 10 && rng.random_bool(0.2) {
            rng.random_range(1..self.issued) as i64
        } else {
            self.issued += 1;
            self.issued as i64
        };
        let items: Vec<Value> = (0..rng.random_range(1..4))
            .map(|i| {
                json!({
                    "sku": format!("SKU-{:05}", rng.random_range(0..50_000)),
                    "qty": rng.random_range(1..10),
                    "unit_price": (rng.random_range(100..100_000) as f64) / 100.0,
                    "line": i,
                })
            })
            .collect();
        let tags: Vec<&str> = (0..rng.random_range(0..3))
            .map(|_| TAGS[rng.random_range(0..TAGS.len())])
            .collect();
        let record = json!({
            "keys": ["id"],
            "id": id,
            "customer": {
                "name": NAMES[rng.random_range(0..NAMES.len())],
                "email": format!("user{}@example.com", rng.random_range(0..1_000_000)),
                "address": {"city": CITIES[rng.random_range(0..CITIES.len())], "zip": format!("{:05}", rng.random_range(0..99_999))},
            },
            "status": if rng.random_bool(0.8) { "paid" } else { "pending" },
            "total": (rng.random_range(100..500_000) as f64) / 100.0,
            "quantity": rng.random_range(1..20),
            "gift": rng.random_bool(0.1),
            "created_at": format!("2026-{:02}-{:02}T{:02}:{:02}:{:02}Z", rng.random_range(1..13), rng.random_range(1..29),
                rng.random_range(0..24), rng.random_range(0..60), rng.random_range(0..60)),
            "items": items,
            "tags": tags,
            "note": if rng.random_bool(0.3) { Value::String("Thanks — à bientôt ✓".into()) } else { Value::Null },
        });
        record.to_string()
    }

    /// `n` records.
    pub fn records(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.next_record()).collect()
    }
}

impl Default for Generator {
    fn default() -> Self {
        Generator::new()
    }
}
