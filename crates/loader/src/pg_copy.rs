//! Plain inserts on PostgreSQL by `COPY ... FROM STDIN (FORMAT binary)`.
//!
//! PostgreSQL writes COPY's rows a page at a time (one heap call and one WAL record per page
//! filled), where `INSERT ... SELECT unnest(...)` inserts row by row and first expands every
//! column array. In psql, 600,000 child-table rows took 735–855 ms by binary COPY against
//! 937–1,311 ms by unnest. COPY has no `ON CONFLICT` and no `RETURNING`, so upserts keep the
//! `INSERT` of [`crate::bulk`].
//!
//! Binary COPY converts nothing: each value must arrive in its column's own binary form, and
//! a value sent for another type is misread, not refused (a `bigint` 6 sent to a column
//! changed by hand to `numeric` is stored as 0). So rows go by COPY only into columns that
//! still have exactly the types Intake made them with ([`types_unchanged`]); otherwise by the
//! `INSERT`, whose casts convert or refuse.

use std::cell::RefCell;
use std::io::Write;

use diesel::pg::{CopyFormat, CopyTarget, Pg};
use diesel::query_builder::AstPass;
use diesel::serialize;
use diesel::{ExecuteCopyFromDsl, QueryResult};

use crate::bulk::{Shared, Val, column_list};
use crate::dialect::Dialect;
use crate::pg_array::Element;
use crate::sql::{Conn, I64Row, Param};
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

/// Whether the columns of `table_ref` that a write names (`columns`, then `shared`) all have
/// exactly the types Intake gives them, so that their rows may go by binary COPY. Locks the
/// table first (`ROW EXCLUSIVE`, as any insert does), so that no `ALTER TABLE` can change a
/// type between this check and the end of the transaction. Always false on SQLite.
pub fn types_unchanged(
    conn: &mut Conn<'_>,
    table_ref: &str,
    columns: &[(String, ColType)],
    shared: &[Shared<'_>],
) -> QueryResult<bool> {
    if conn.dialect() != Dialect::Postgres {
        return Ok(false);
    }
    conn.batch(&format!("LOCK TABLE {table_ref} IN ROW EXCLUSIVE MODE"))?;
    let written = columns
        .iter()
        .map(|(n, t)| (n.as_str(), *t))
        .chain(shared.iter().map(|s| (s.name, s.col_type)));
    let (names, types): (Vec<Option<String>>, Vec<Option<String>>) = written
        .map(|(n, t)| {
            (
                Some(n.to_owned()),
                Some(Dialect::Postgres.sql_type(t).to_owned()),
            )
        })
        .unzip();
    let differing: Vec<I64Row> = conn.load(
        "SELECT COUNT(*) AS v FROM unnest($1::text[], $2::text[]) AS w(name, type) \
         WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = $3::regclass \
           AND a.attname = w.name AND NOT a.attisdropped \
           AND a.atttypid = w.type::regtype AND a.atttypmod = -1)",
        vec![
            Param::TextArray(names),
            Param::TextArray(types),
            Param::Text(Some(table_ref.to_owned())),
        ],
    )?;
    Ok(differing.first().is_some_and(|d| d.v == 0))
}

/// Inserts rows given column by column (as [`crate::bulk::insert_rows`] takes them:
/// `data[i]` holds column `columns[i]`, then come the `shared` columns, the same in every row)
/// into `table_ref`, whose columns [`types_unchanged`] has checked in this transaction.
pub fn copy_rows(
    conn: &mut Conn<'_>,
    table_ref: &str,
    columns: &[(String, ColType)],
    shared: &[Shared<'_>],
    data: &[Vec<Val>],
) -> QueryResult<usize> {
    let Conn::Pg(conn) = conn else {
        return Err(serialization("COPY is for PostgreSQL"));
    };
    let fields = i16::try_from(columns.len() + shared.len())
        .map_err(|_| serialization("too many columns for one COPY"))?
        .to_be_bytes();
    let mut shared_fields = Vec::new();
    for s in shared {
        write_field(&mut shared_fields, &s.value, s.col_type)?;
    }
    let rows = data.first().map_or(0, Vec::len);
    TARGET.set(format!(
        "{table_ref} ({})",
        column_list(columns, shared).join(", ")
    ));
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
        .execute(&mut **conn)
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
