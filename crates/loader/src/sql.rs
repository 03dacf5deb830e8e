//! Dynamic SQL against either backend: values are always bound, never interpolated.
//!
//! The loader builds statements whose shape depends on the data (column lists, row counts),
//! so it cannot use diesel's static query builder; this module binds a list of [`Param`]s to
//! such a statement on whichever backend the connection is.

use chrono::{DateTime, Utc};
use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Nullable, Text, Timestamptz};
use diesel::sqlite::{Sqlite, SqliteConnection};

use crate::dialect::Dialect;
use crate::pg_array::PgArray;

/// A value to bind. Array variants are for PostgreSQL's `unnest`.
#[derive(Debug, Clone)]
pub enum Param {
    Int(Option<i64>),
    Float(Option<f64>),
    Bool(Option<bool>),
    Text(Option<String>),
    Time(Option<DateTime<Utc>>),
    IntArray(Vec<Option<i64>>),
    FloatArray(Vec<Option<f64>>),
    BoolArray(Vec<Option<bool>>),
    TextArray(Vec<Option<String>>),
    TimeArray(Vec<Option<DateTime<Utc>>>),
}

/// A connection to the database that holds staging and the warehouse.
pub enum Conn<'a> {
    Pg(&'a mut PgConnection),
    Sqlite(&'a mut SqliteConnection),
}

impl Conn<'_> {
    pub fn dialect(&self) -> Dialect {
        match self {
            Conn::Pg(_) => Dialect::Postgres,
            Conn::Sqlite(_) => Dialect::Sqlite,
        }
    }

    pub fn reborrow(&mut self) -> Conn<'_> {
        match self {
            Conn::Pg(c) => Conn::Pg(c),
            Conn::Sqlite(c) => Conn::Sqlite(c),
        }
    }

    /// Runs a statement without results.
    pub fn execute(&mut self, sql: &str, params: impl Into<Vec<Param>>) -> QueryResult<usize> {
        let params = params.into();
        match self {
            Conn::Pg(c) => bind_pg(diesel::sql_query(sql).into_boxed(), params).execute(*c),
            Conn::Sqlite(c) => bind_sqlite(diesel::sql_query(sql).into_boxed(), params).execute(*c),
        }
    }

    /// Runs a query returning rows of type `R`.
    pub fn load<R>(&mut self, sql: &str, params: impl Into<Vec<Param>>) -> QueryResult<Vec<R>>
    where
        R: QueryableByName<Pg> + QueryableByName<Sqlite> + 'static,
    {
        let params = params.into();
        match self {
            Conn::Pg(c) => bind_pg(diesel::sql_query(sql).into_boxed(), params).load(*c),
            Conn::Sqlite(c) => bind_sqlite(diesel::sql_query(sql).into_boxed(), params).load(*c),
        }
    }

    /// Runs several statements separated by `;` (DDL without parameters).
    pub fn batch(&mut self, sql: &str) -> QueryResult<()> {
        use diesel::connection::SimpleConnection;
        match self {
            Conn::Pg(c) => c.batch_execute(sql),
            Conn::Sqlite(c) => c.batch_execute(sql),
        }
    }
}

fn bind_pg<'a>(
    mut q: diesel::query_builder::BoxedSqlQuery<'a, Pg, diesel::query_builder::SqlQuery>,
    params: Vec<Param>,
) -> diesel::query_builder::BoxedSqlQuery<'a, Pg, diesel::query_builder::SqlQuery> {
    for p in params {
        q = match p {
            Param::Int(v) => q.bind::<Nullable<BigInt>, _>(v),
            Param::Float(v) => q.bind::<Nullable<Double>, _>(v),
            Param::Bool(v) => q.bind::<Nullable<Bool>, _>(v),
            Param::Text(v) => q.bind::<Nullable<Text>, _>(v),
            Param::Time(v) => q.bind::<Nullable<Timestamptz>, _>(v),
            Param::IntArray(v) => q.bind::<Array<Nullable<BigInt>>, _>(PgArray(v)),
            Param::FloatArray(v) => q.bind::<Array<Nullable<Double>>, _>(PgArray(v)),
            Param::BoolArray(v) => q.bind::<Array<Nullable<Bool>>, _>(PgArray(v)),
            Param::TextArray(v) => q.bind::<Array<Nullable<Text>>, _>(PgArray(v)),
            Param::TimeArray(v) => q.bind::<Array<Nullable<Timestamptz>>, _>(PgArray(v)),
        };
    }
    q
}

fn bind_sqlite<'a>(
    mut q: diesel::query_builder::BoxedSqlQuery<'a, Sqlite, diesel::query_builder::SqlQuery>,
    params: Vec<Param>,
) -> diesel::query_builder::BoxedSqlQuery<'a, Sqlite, diesel::query_builder::SqlQuery> {
    for p in params {
        q = match p {
            Param::Int(v) => q.bind::<Nullable<BigInt>, _>(v),
            Param::Float(v) => q.bind::<Nullable<Double>, _>(v),
            Param::Bool(v) => q.bind::<Nullable<Bool>, _>(v),
            Param::Text(v) => q.bind::<Nullable<Text>, _>(v),
            Param::Time(v) => {
                q.bind::<Nullable<Text>, _>(v.map(intake_core::timestamps::sqlite_text))
            }
            // SQLite has no arrays: callers pass lists as JSON text for json_each().
            Param::IntArray(v) => q.bind::<Text, _>(serde_json::to_string(&v).unwrap_or_default()),
            Param::FloatArray(v) => {
                q.bind::<Text, _>(serde_json::to_string(&v).unwrap_or_default())
            }
            Param::BoolArray(v) => q.bind::<Text, _>(serde_json::to_string(&v).unwrap_or_default()),
            Param::TextArray(v) => q.bind::<Text, _>(serde_json::to_string(&v).unwrap_or_default()),
            Param::TimeArray(v) => q.bind::<Text, _>(
                serde_json::to_string(
                    &v.into_iter()
                        .map(|t| t.map(intake_core::timestamps::sqlite_text))
                        .collect::<Vec<_>>(),
                )
                .unwrap_or_default(),
            ),
        };
    }
    q
}

/// A point in time as each backend stores it: `timestamptz` on PostgreSQL, read in binary
/// (formatting it as text cost the database more than reading the row), and the UTC text of
/// `intake_core::timestamps` on SQLite.
#[derive(diesel::sql_types::SqlType, diesel::query_builder::QueryId)]
#[diesel(postgres_type(name = "timestamptz"))]
#[diesel(sqlite_type(name = "Text"))]
pub struct Moment;

impl diesel::deserialize::FromSql<Moment, Pg> for DateTime<Utc> {
    fn from_sql(bytes: diesel::pg::PgValue<'_>) -> diesel::deserialize::Result<Self> {
        <DateTime<Utc> as diesel::deserialize::FromSql<Timestamptz, Pg>>::from_sql(bytes)
    }
}

impl diesel::deserialize::FromSql<Moment, Sqlite> for DateTime<Utc> {
    fn from_sql(
        bytes: <Sqlite as diesel::backend::Backend>::RawValue<'_>,
    ) -> diesel::deserialize::Result<Self> {
        let text = <String as diesel::deserialize::FromSql<Text, Sqlite>>::from_sql(bytes)?;
        // Intake writes these itself; one edited by hand must not stop its table loading.
        Ok(
            intake_core::timestamps::parse_sqlite_text(&text).unwrap_or_else(|| {
                log::warn!("unreadable timestamp {text:?} read as the epoch");
                DateTime::default()
            }),
        )
    }
}

/// A single `bigint` column result.
#[derive(QueryableByName)]
pub struct I64Row {
    #[diesel(sql_type = BigInt)]
    pub v: i64,
}

/// A single `boolean` column result.
#[derive(QueryableByName)]
pub struct BoolRow {
    #[diesel(sql_type = Bool)]
    pub v: bool,
}

/// Runs `work` in a transaction: `BEGIN IMMEDIATE` on SQLite (take the write lock up front,
/// so two writers never deadlock upgrading), an ordinary transaction on PostgreSQL.
pub fn in_transaction<T>(
    conn: &mut Conn<'_>,
    work: impl FnOnce(&mut Conn<'_>) -> QueryResult<T>,
) -> QueryResult<T> {
    match conn {
        Conn::Pg(c) => c.transaction(|c| work(&mut Conn::Pg(c))),
        Conn::Sqlite(c) => c.immediate_transaction(|c| work(&mut Conn::Sqlite(c))),
    }
}

/// A round trip, to tell a broken connection from a failing statement.
pub fn ping(conn: &mut Conn<'_>) -> QueryResult<()> {
    conn.execute("SELECT 1", []).map(|_| ())
}
