//! The PostgreSQL settings that set the pace of a large backlog's load, checked once when a
//! loader starts. A million pending records outgrow PostgreSQL's default buffers, and their
//! write-ahead log its default checkpoint distance: in the load bench (docs/benchmarks.md)
//! such a load ran at 0.52–0.55× the set-based baseline with the defaults, 0.64–0.72× with
//! `shared_buffers` at 2 GB and `max_wal_size` at 4 GB. The settings are the database
//! administrator's; the loader only says so, once, at `info` level.

use diesel::QueryResult;
use diesel::QueryableByName;
use diesel::sql_types::{BigInt, Text};

use crate::dialect::Dialect;
use crate::sql::{Conn, Param};

/// A setting, by name, that is still at (or below) PostgreSQL's default.
struct Advised {
    name: &'static str,
    default_bytes: i64,
    default_text: &'static str,
    why: &'static str,
}

const ADVISED: [Advised; 2] = [
    Advised {
        name: "max_wal_size",
        default_bytes: 1 << 30,
        default_text: "1 GB",
        why: "a large load then requests a checkpoint about every half gigabyte of log, and \
              logs each page whole on its first change after one",
    },
    Advised {
        name: "shared_buffers",
        default_bytes: 128 << 20,
        default_text: "128 MB",
        why: "a backlog whose warehouse tables outgrow it loads markedly slower",
    },
];

#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = BigInt)]
    bytes: i64,
}

/// One line of advice for each of the settings above that is at or below PostgreSQL's
/// default; none on SQLite.
pub fn advice(conn: &mut Conn<'_>) -> QueryResult<Vec<String>> {
    if conn.dialect() != Dialect::Postgres {
        return Ok(Vec::new());
    }
    let names = ADVISED.iter().map(|a| Some(a.name.to_owned())).collect();
    let settings: Vec<Setting> = conn.load(
        "SELECT name, pg_size_bytes(current_setting(name)) AS bytes \
         FROM unnest($1::text[]) AS name",
        vec![Param::TextArray(names)],
    )?;
    Ok(settings
        .iter()
        .filter_map(|s| {
            let advised = ADVISED.iter().find(|a| a.name == s.name)?;
            (s.bytes <= advised.default_bytes).then(|| {
                format!(
                    "PostgreSQL's {} is at its default of {} or below: {}; see \
                     docs/configuration.md",
                    advised.name, advised.default_text, advised.why
                )
            })
        })
        .collect())
}
