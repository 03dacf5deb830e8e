//! Plain inserts on PostgreSQL by `COPY ... FROM STDIN (FORMAT binary)`.
//!
//! PostgreSQL writes COPY's rows a page at a time (one heap call and one WAL record per page
//! filled), where `INSERT ... SELECT unnest(...)` inserts row by row and first expands every
//! column array. In psql, 600,000 child-table rows took 735–855 ms by binary COPY against
//! 937–1,311 ms by unnest. COPY has no `ON CONFLICT` and no `RETURNING`, so upserts keep the
//! `INSERT` of [`crate::bulk`].

use std::cell::RefCell;
use std::io::Write;

use diesel::pg::{CopyFormat, CopyTarget, Pg, PgConnection};
use diesel::query_builder::AstPass;
use diesel::serialize;
use diesel::{ExecuteCopyFromDsl, QueryResult};

use crate::bulk::{Shared, Val};
use crate::pg_array::Element;
use crate::value_types::ColType;

diesel::table! {
    /// Never created or read. diesel's COPY needs a table type to start from; the statement's
    /// real target comes from `TARGET`.
    intake_copy_placeholder (id) {
        id -> BigInt,
    }
}

thread_local! {
    /// The target (`table (columns)`) of the COPY that this thread is starting. diesel takes a
    /// COPY's target from a type, statically, and Intake's tables are known only at run time:
    /// [`copy_rows`] sets it, and [`DynamicTarget`] reads it while diesel builds the statement
    /// (in the same call, on the same thread).
    static TARGET: RefCell<String> = const { RefCell::new(String::new()) };
}

/// A COPY target read from [`TARGET`]. `walk_target` is a hidden part of diesel's API: the
/// version is pinned by Cargo.lock, and `tests/pg_arrays.rs` would catch a change.
struct DynamicTarget;

impl CopyTarget for DynamicTarget {
    type Table = intake_copy_placeholder::table;
    type SqlType = diesel::sql_types::BigInt;

    fn walk_target(mut pass: AstPass<'_, '_, Pg>) -> QueryResult<()> {
        TARGET.with_borrow(|target| pass.push_sql(target));
        Ok(())
    }
}

/// The start of binary COPY data: its 11-byte signature, then 32 bits of flags and 32 bits of
/// header-extension length, all zero.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The field count that ends binary COPY data.
const TRAILER: [u8; 2] = (-1i16).to_be_bytes();

/// Bytes of COPY data encoded before they are handed to libpq: large enough that the calls
/// cost nothing, small enough that a share's rows are never all encoded at once.
const PIECE: usize = 64 * 1024;

/// Inserts rows given column by column (as [`crate::bulk::insert_rows`] takes them:
/// `data[i]` holds column `columns[i]`, then come the `shared` columns, the same in every row)
/// into `target`, the table and its column list (`"s"."t" ("a", "b")`), quoted.
pub fn copy_rows(
    conn: &mut PgConnection,
    target: &str,
    columns: &[(String, ColType)],
    shared: &[Shared<'_>],
    data: &[Vec<Val>],
) -> QueryResult<usize> {
    let fields = i16::try_from(columns.len() + shared.len())
        .map_err(|_| serialization("too many columns for one COPY"))?
        .to_be_bytes();
    let mut shared_fields = Vec::new();
    for s in shared {
        write_field(&mut shared_fields, &s.value, s.col_type)?;
    }
    let rows = data.first().map_or(0, Vec::len);
    TARGET.set(target.to_owned());
    diesel::copy_from(intake_copy_placeholder::table)
        .from_raw_data(DynamicTarget, |sink: &mut dyn Write| {
            let mut piece = Vec::with_capacity(PIECE + 4096);
            piece.extend_from_slice(HEADER);
            for row in 0..rows {
                piece.extend_from_slice(&fields);
                for (column, (_, t)) in data.iter().zip(columns) {
                    write_field(&mut piece, column.get(row).unwrap_or(&Val::Null), *t)?;
                }
                piece.extend_from_slice(&shared_fields);
                if piece.len() >= PIECE {
                    sink.write_all(&piece).map_err(io_error)?;
                    piece.clear();
                }
            }
            piece.extend_from_slice(&TRAILER);
            sink.write_all(&piece).map_err(io_error)
        })
        .with_format(CopyFormat::Binary)
        .execute(conn)
}

/// One field: its length and binary value, or -1 for NULL. A value of the wrong type for the
/// column is a bug upstream; it becomes NULL, as in [`crate::bulk`]'s arrays.
fn write_field(out: &mut Vec<u8>, v: &Val, t: ColType) -> QueryResult<()> {
    let written: serialize::Result = match (v, t) {
        (Val::Int(x), ColType::BigInt) => x.write(out),
        (Val::Float(x), ColType::Double) => x.write(out),
        (Val::Bool(x), ColType::Boolean) => x.write(out),
        (Val::Time(x), ColType::Timestamp) => x.write(out),
        (Val::Text(s) | Val::Json(s), ColType::Text) => s.write(out),
        (Val::Text(s) | Val::Json(s), ColType::Json) => {
            // jsonb's binary form: a version byte (1), then the JSON text.
            let length = i32::try_from(s.len() + 1).map_err(|_| serialization("JSON too long"))?;
            out.extend_from_slice(&length.to_be_bytes());
            out.push(1);
            out.extend_from_slice(s.as_bytes());
            Ok(serialize::IsNull::No)
        }
        _ => {
            out.extend_from_slice(&(-1i32).to_be_bytes());
            Ok(serialize::IsNull::Yes)
        }
    };
    written
        .map(|_| ())
        .map_err(diesel::result::Error::SerializationError)
}

fn io_error(e: std::io::Error) -> diesel::result::Error {
    diesel::result::Error::SerializationError(Box::new(e))
}

fn serialization(why: &str) -> diesel::result::Error {
    diesel::result::Error::SerializationError(why.into())
}
