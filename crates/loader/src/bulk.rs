//! Set-based writes: many rows in one statement, never a statement per record.
//!
//! Rows arrive column by column. PostgreSQL gets one array parameter per column and `unnest`s
//! them (so the parameter count does not grow with the rows); plain inserts into tables whose
//! columns kept their types go by binary COPY instead ([`crate::pg_copy`]). SQLite gets
//! multi-row `VALUES` lists sized to stay under its bind-variable limit.

use chrono::{DateTime, Utc};
use diesel::QueryResult;

use crate::dialect::Dialect;
use crate::identifiers::quote;
use crate::sql::{Conn, I64Row, Param};
use crate::value_types::ColType;

/// A value to write into a warehouse column.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Null,
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    Time(DateTime<Utc>),
    /// JSON text, for the overflow column.
    Json(String),
}

/// Bound variables per SQLite statement (its limit is 32,766).
const SQLITE_MAX_VARIABLES: usize = 32_000;

/// A column that gets one value in every row of an insert (the load time, say): bound once,
/// not once per row.
pub struct Shared<'a> {
    pub name: &'a str,
    pub col_type: ColType,
    pub value: Val,
}

/// Inserts rows given column by column (`data[i]` holds column `columns[i]`'s value for every
/// row, all of one length; then come the `shared` columns) into `table_ref`. Columns, not
/// rows: PostgreSQL takes one array per column, so nothing is transposed on the way. `tail`
/// follows the row source (an `ON CONFLICT` clause and/or `RETURNING _intake_seq`); with
/// `returning`, the returned sequence numbers are collected.
pub fn insert_rows(
    conn: &mut Conn<'_>,
    table_ref: &str,
    columns: &[(String, ColType)],
    shared: &[Shared<'_>],
    data: Vec<Vec<Val>>,
    tail: &str,
    returning: bool,
) -> QueryResult<Vec<i64>> {
    debug_assert_eq!(data.len(), columns.len());
    let rows = data.first().map_or(0, Vec::len);
    debug_assert!(data.iter().all(|c| c.len() == rows));
    if rows == 0 {
        return Ok(Vec::new());
    }
    let names = column_list(columns, shared);
    match conn.dialect() {
        Dialect::Postgres => {
            let mut params: Vec<Param> = data
                .into_iter()
                .zip(columns)
                .map(|(values, (_, t))| typed_array(values, *t))
                .collect();
            // `unnest` in the select list (one per column, in lockstep) streams the rows;
            // `FROM unnest(a, b, ...)` would first copy them all into a tuple store.
            let mut selects: Vec<String> = columns
                .iter()
                .enumerate()
                .map(|(i, (_, t))| match t {
                    ColType::Json => format!("unnest(${}::text[])::jsonb", i + 1),
                    other => format!(
                        "unnest(${}::{}[])",
                        i + 1,
                        Dialect::Postgres.sql_type(*other)
                    ),
                })
                .collect();
            for s in shared {
                params.push(scalar_param(s.value.clone()));
                selects.push(format!(
                    "${}::{}",
                    params.len(),
                    Dialect::Postgres.sql_type(s.col_type)
                ));
            }
            let sql = format!(
                "INSERT INTO {table_ref} AS t ({}) SELECT {} {tail}",
                names.join(", "),
                selects.join(", "),
            );
            run(conn, &sql, params, returning)
        }
        Dialect::Sqlite => {
            let per_statement = (SQLITE_MAX_VARIABLES / names.len().max(1)).max(1);
            let one_row = format!("({})", vec!["?"; names.len()].join(", "));
            let mut returned = Vec::new();
            let mut values: Vec<std::vec::IntoIter<Val>> =
                data.into_iter().map(Vec::into_iter).collect();
            let mut left = rows;
            while left > 0 {
                let take = left.min(per_statement);
                left -= take;
                let sql = format!(
                    "INSERT INTO {table_ref} AS t ({}) VALUES {} {tail}",
                    names.join(", "),
                    vec![one_row.as_str(); take].join(", ")
                );
                let mut params = Vec::with_capacity(take * names.len());
                for _ in 0..take {
                    for column in &mut values {
                        params.push(scalar_param(column.next().unwrap_or(Val::Null)));
                    }
                    params.extend(shared.iter().map(|s| scalar_param(s.value.clone())));
                }
                returned.extend(run(conn, &sql, params, returning)?);
            }
            Ok(returned)
        }
    }
}

/// The quoted names of `columns`, then of the `shared` ones: the column list of a write.
pub fn column_list(columns: &[(String, ColType)], shared: &[Shared<'_>]) -> Vec<String> {
    columns
        .iter()
        .map(|(n, _)| quote(n))
        .chain(shared.iter().map(|s| quote(s.name)))
        .collect()
}

fn run(
    conn: &mut Conn<'_>,
    sql: &str,
    params: Vec<Param>,
    returning: bool,
) -> QueryResult<Vec<i64>> {
    if returning {
        Ok(conn
            .load::<I64Row>(sql, params)?
            .into_iter()
            .map(|r| r.v)
            .collect())
    } else {
        conn.execute(sql, params).map(|_| Vec::new())
    }
}

fn scalar_param(v: Val) -> Param {
    match v {
        Val::Null => Param::Text(None),
        Val::Int(i) => Param::Int(Some(i)),
        Val::Float(f) => Param::Float(Some(f)),
        Val::Bool(b) => Param::Bool(Some(b)),
        Val::Text(s) | Val::Json(s) => Param::Text(Some(s)),
        Val::Time(t) => Param::Time(Some(t)),
    }
}

/// A list of values as one typed array parameter.
pub fn column_param(values: Vec<Val>, t: ColType) -> Param {
    typed_array(values, t)
}

/// A key value as JSON (SQLite reads key lists with json_each).
pub fn key_json(v: &Val) -> serde_json::Value {
    match v {
        Val::Int(i) => (*i).into(),
        Val::Bool(b) => i64::from(*b).into(),
        Val::Text(s) | Val::Json(s) => s.clone().into(),
        Val::Float(f) => {
            serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
        }
        Val::Time(t) => intake_core::timestamps::sqlite_text(*t).into(),
        Val::Null => serde_json::Value::Null,
    }
}

/// A value of the wrong type for the column is a bug upstream; it becomes NULL rather than a
/// panic.
fn typed_array(values: Vec<Val>, t: ColType) -> Param {
    let values = values.into_iter();
    match t {
        ColType::BigInt => Param::IntArray(
            values
                .map(|v| if let Val::Int(x) = v { Some(x) } else { None })
                .collect(),
        ),
        ColType::Double => Param::FloatArray(
            values
                .map(|v| if let Val::Float(x) = v { Some(x) } else { None })
                .collect(),
        ),
        ColType::Boolean => Param::BoolArray(
            values
                .map(|v| if let Val::Bool(x) = v { Some(x) } else { None })
                .collect(),
        ),
        ColType::Timestamp => Param::TimeArray(
            values
                .map(|v| if let Val::Time(x) = v { Some(x) } else { None })
                .collect(),
        ),
        ColType::Text | ColType::Json => Param::TextArray(
            values
                .map(|v| match v {
                    Val::Text(s) | Val::Json(s) => Some(s),
                    _ => None,
                })
                .collect(),
        ),
    }
}
