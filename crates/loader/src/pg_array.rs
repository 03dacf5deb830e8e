//! Column arrays for PostgreSQL, written straight into its binary array format. The loader
//! binds every column of a bulk upsert as one array; diesel's own array writer serializes each
//! element into a scratch buffer through a fresh output and copies it over, which cost about
//! 9% of the loader's instructions. The bytes are the same: a one-dimensional array with lower
//! bound 1, each element as its length (-1 for NULL) and then its binary value. A field of
//! binary COPY data has that same form, so [`crate::pg_copy`] writes its fields with
//! [`Element`] too.

use std::io::Write;

use chrono::{DateTime, Utc};
use diesel::pg::Pg;
use diesel::serialize::{self, IsNull, Output, ToSql};
use diesel::sql_types::{Array, BigInt, Bool, Double, HasSqlType, Nullable, Text, Timestamptz};

/// A column's values as one array parameter of `Array<Nullable<T::Sql>>`.
#[derive(Debug)]
pub struct PgArray<T>(pub Vec<Option<T>>);

/// A value that can be an element of a [`PgArray`].
pub trait Element: std::fmt::Debug {
    /// The element's SQL type.
    type Sql;
    /// Writes the value's length and binary form.
    fn write(&self, out: &mut impl Write) -> serialize::Result;
}

fn write_fixed<const N: usize>(out: &mut impl Write, bytes: [u8; N]) -> serialize::Result {
    let mut element = [0u8; 12];
    element[..4].copy_from_slice(&(N as i32).to_be_bytes());
    element[4..4 + N].copy_from_slice(&bytes);
    out.write_all(&element[..4 + N])?;
    Ok(IsNull::No)
}

impl Element for i64 {
    type Sql = BigInt;
    fn write(&self, out: &mut impl Write) -> serialize::Result {
        write_fixed(out, self.to_be_bytes())
    }
}

impl Element for f64 {
    type Sql = Double;
    fn write(&self, out: &mut impl Write) -> serialize::Result {
        write_fixed(out, self.to_bits().to_be_bytes())
    }
}

impl Element for bool {
    type Sql = Bool;
    fn write(&self, out: &mut impl Write) -> serialize::Result {
        write_fixed(out, [u8::from(*self)])
    }
}

impl Element for String {
    type Sql = Text;
    fn write(&self, out: &mut impl Write) -> serialize::Result {
        out.write_all(&i32::try_from(self.len())?.to_be_bytes())?;
        out.write_all(self.as_bytes())?;
        Ok(IsNull::No)
    }
}

/// PostgreSQL's epoch, 2000-01-01 00:00 UTC, in microseconds since the Unix epoch.
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

impl Element for DateTime<Utc> {
    type Sql = Timestamptz;
    /// Microseconds since PostgreSQL's epoch.
    fn write(&self, out: &mut impl Write) -> serialize::Result {
        let micros = self
            .timestamp_micros()
            .checked_sub(PG_EPOCH_MICROS)
            .ok_or_else(|| format!("{self:?} as microseconds does not fit 64 bits"))?;
        write_fixed(out, micros.to_be_bytes())
    }
}

impl<T> ToSql<Array<Nullable<T::Sql>>, Pg> for PgArray<T>
where
    T: Element,
    T::Sql: 'static,
    Pg: HasSqlType<T::Sql>,
{
    fn to_sql<'b>(&'b self, out: &mut Output<'b, '_, Pg>) -> serialize::Result {
        let element_oid = <Pg as HasSqlType<T::Sql>>::metadata(out.metadata_lookup()).oid()?;
        let mut header = [0u8; 20];
        header[..4].copy_from_slice(&1i32.to_be_bytes()); // dimensions
        header[4..8].copy_from_slice(&0i32.to_be_bytes()); // flags (PostgreSQL ignores them)
        header[8..12].copy_from_slice(&element_oid.to_be_bytes());
        header[12..16].copy_from_slice(&i32::try_from(self.0.len())?.to_be_bytes());
        header[16..20].copy_from_slice(&1i32.to_be_bytes()); // lower bound
        out.write_all(&header)?;
        for value in &self.0 {
            match value {
                Some(v) => {
                    v.write(out)?;
                }
                None => out.write_all(&(-1i32).to_be_bytes())?,
            }
        }
        Ok(IsNull::No)
    }
}
