//! The staging queue: accepted records wait here, exactly as received, until a loader moves
//! them to the warehouse.
//!
//! Sequence numbers come from a per-(client, table) counter row that the writing transaction
//! updates first. Its row lock is held until commit, so for each table a record that commits
//! later always has a higher sequence: "later wins" means "acknowledged later wins".

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Text, Timestamptz};
use diesel::sqlite::Sqlite;

use crate::db::DbConn;
use crate::timestamps::sqlite_text;

/// Rows per multi-row INSERT on SQLite (5 bound values each, far below SQLite's limit).
const SQLITE_ROWS_PER_INSERT: usize = 500;

/// One request's worth of validated records for one table.
pub struct StagedBatch<'a> {
    pub client_id: i64,
    /// Normalised table name (see [`crate::table_name`]).
    pub table: &'a str,
    pub received_at: DateTime<Utc>,
    /// Each record's exact JSON text, in the order received.
    pub records: &'a [&'a str],
}

/// The sequence numbers a committed batch received (inclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqRange {
    pub first: i64,
    pub last: i64,
}

#[derive(QueryableByName)]
struct LastSeq {
    #[diesel(sql_type = BigInt)]
    last_seq: i64,
}

/// Appends a batch in one transaction and returns its sequence numbers only once committed.
pub fn append(conn: &mut DbConn, batch: &StagedBatch<'_>) -> QueryResult<SeqRange> {
    let count = batch.records.len() as i64;
    match conn {
        DbConn::Pg(c) => {
            // One statement: bump the counter (taking its row lock) and insert every record.
            let rows: Vec<LastSeq> = diesel::sql_query(
                "WITH s AS ( \
                   INSERT INTO staging_sequences AS q (client_id, table_name, last_seq) \
                   VALUES ($1, $2, $3) \
                   ON CONFLICT (client_id, table_name) DO UPDATE SET last_seq = q.last_seq + EXCLUDED.last_seq \
                   RETURNING q.last_seq), \
                 ins AS ( \
                   INSERT INTO staged_records (client_id, table_name, seq, received_at, record) \
                   SELECT $1, $2, s.last_seq - $3 + r.ord, $4, r.rec \
                   FROM s, unnest($5::text[]) WITH ORDINALITY AS r(rec, ord)) \
                 SELECT last_seq FROM s",
            )
            .bind::<BigInt, _>(batch.client_id)
            .bind::<Text, _>(batch.table)
            .bind::<BigInt, _>(count)
            .bind::<Timestamptz, _>(batch.received_at)
            .bind::<Array<Text>, _>(batch.records)
            .load(&mut **c)?;
            let last = rows.first().map(|r| r.last_seq).ok_or(diesel::result::Error::NotFound)?;
            Ok(SeqRange { first: last - count + 1, last })
        }
        DbConn::Sqlite(c) => c.immediate_transaction(|c| {
            let LastSeq { last_seq: last } = diesel::sql_query(
                "INSERT INTO staging_sequences (client_id, table_name, last_seq) VALUES ($1, $2, $3) \
                 ON CONFLICT (client_id, table_name) DO UPDATE SET last_seq = last_seq + excluded.last_seq \
                 RETURNING last_seq",
            )
            .bind::<BigInt, _>(batch.client_id)
            .bind::<Text, _>(batch.table)
            .bind::<BigInt, _>(count)
            .get_result(c)?;
            let first = last - count + 1;
            let received_at = sqlite_text(batch.received_at);
            for (chunk_no, chunk) in batch.records.chunks(SQLITE_ROWS_PER_INSERT).enumerate() {
                let mut sql = String::from(
                    "INSERT INTO staged_records (client_id, table_name, seq, received_at, record) VALUES ",
                );
                for i in 0..chunk.len() {
                    sql.push_str(if i == 0 { "(?, ?, ?, ?, ?)" } else { ", (?, ?, ?, ?, ?)" });
                }
                let mut query = diesel::sql_query(sql).into_boxed::<Sqlite>();
                let base = first + (chunk_no * SQLITE_ROWS_PER_INSERT) as i64;
                for (i, record) in chunk.iter().enumerate() {
                    query = query
                        .bind::<BigInt, _>(batch.client_id)
                        .bind::<Text, _>(batch.table)
                        .bind::<BigInt, _>(base + i as i64)
                        .bind::<Text, _>(received_at.clone())
                        .bind::<Text, _>(*record);
                }
                query.execute(c)?;
            }
            Ok(SeqRange { first, last })
        }),
    }
}

/// Records waiting in staging per (client, table), for status pages and tests.
#[derive(Debug, Clone, PartialEq, Eq, QueryableByName, serde::Serialize)]
pub struct PendingCount {
    #[diesel(sql_type = BigInt)]
    pub client_id: i64,
    #[diesel(sql_type = Text)]
    pub table_name: String,
    #[diesel(sql_type = BigInt)]
    pub pending: i64,
}

/// How many records wait in staging, per (client, table).
pub fn pending_counts(conn: &mut DbConn) -> QueryResult<Vec<PendingCount>> {
    let sql = "SELECT client_id, table_name, COUNT(*) AS pending FROM staged_records \
               GROUP BY client_id, table_name ORDER BY client_id, table_name";
    match conn {
        DbConn::Pg(c) => diesel::sql_query(sql).load(&mut **c),
        DbConn::Sqlite(c) => diesel::sql_query(sql).load(&mut **c),
    }
}
