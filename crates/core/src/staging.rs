//! The staging queue: accepted records wait here, exactly as received, until a loader moves
//! them to the warehouse.
//!
//! Sequence numbers come from a per-(client, table) counter row that the writing transaction
//! updates first. Its row lock is held until commit, so for each table a record that commits
//! later always has a higher sequence: "later wins" means "acknowledged later wins".

use chrono::{DateTime, Utc};
use diesel::connection::SimpleConnection;
use diesel::pg::{Pg, PgConnection};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz};
use diesel::sqlite::{Sqlite, SqliteConnection};

use crate::db::DbConn;
use crate::timestamps::sqlite_text;

/// Rows per multi-row INSERT on SQLite (5 bound values each, 9 with the Stitch columns: at
/// most 4,500, far below SQLite's limit).
const SQLITE_ROWS_PER_INSERT: usize = 500;

/// One request's worth of validated records for one table.
pub struct StagedBatch<'a> {
    pub client_id: i64,
    /// Normalised table name (see [`crate::table_name`]).
    pub table: &'a str,
    pub received_at: DateTime<Utc>,
    /// Each record's exact JSON text, in the order received.
    pub records: &'a [&'a str],
    /// What the Stitch protocol adds; `None` for RJMetrics pushes.
    pub stitch: Option<StitchParts<'a>>,
}

/// The Stitch protocol's additions to a batch: per-record metadata and the table's schema.
#[derive(Clone, Copy)]
pub struct StitchParts<'a> {
    /// One entry per record, in the same order.
    pub meta: &'a [RecordMeta],
    /// The batch's JSON Schema, kept as the table's newest schema (the loader types by it).
    pub schema: Option<&'a str>,
}

/// A Stitch record's ordering, keys and version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    /// The client's `sequence`: a stored record is replaced only by a higher one.
    pub client_seq: i64,
    /// The key field names, as a JSON array of strings.
    pub key_names: String,
    pub table_version: Option<i64>,
    /// An `activate_version` marker rather than a record.
    pub activate: bool,
}

/// The `action` stored for an activate_version marker.
pub const ACTIVATE_VERSION: &str = "activate_version";

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
    append_all(conn, std::slice::from_ref(batch), None)?
        .pop()
        .ok_or(diesel::result::Error::NotFound)
}

/// Appends several batches (possibly for several tables) in ONE transaction, so that
/// concurrent requests can share a commit (group commit). Returns each batch's sequence
/// numbers, in the order given, once committed. Tables are written in (client, table) order,
/// so two such transactions never wait on each other's counter rows in a cycle.
///
/// With a `budget`, the database gives up (and rolls back) once that much time has gone by
/// waiting for locks or running statements, and the transaction is rolled back rather than
/// committed if its statements together took longer: a caller answering "not stored" at its
/// deadline is telling the truth (unless the commit itself stalls).
pub fn append_all(
    conn: &mut DbConn,
    batches: &[StagedBatch<'_>],
    budget: Option<std::time::Duration>,
) -> QueryResult<Vec<SeqRange>> {
    let give_up = budget.map(|b| std::time::Instant::now() + b);
    let mut order: Vec<usize> = (0..batches.len()).collect();
    order.sort_by_key(|&i| (batches[i].client_id, batches[i].table));
    let write = |conn: &mut RawConn<'_>| -> QueryResult<Vec<SeqRange>> {
        let mut ranges = vec![SeqRange { first: 0, last: 0 }; batches.len()];
        for group in order.chunk_by(|&a, &b| {
            (batches[a].client_id, batches[a].table) == (batches[b].client_id, batches[b].table)
        }) {
            let first_batch = &batches[group[0]];
            let mut records = Vec::new();
            let mut times = Vec::new();
            let any_stitch = group.iter().any(|&i| batches[i].stitch.is_some());
            let mut meta: Vec<Option<&RecordMeta>> = Vec::new();
            let mut schema = None;
            for &i in group {
                let batch = &batches[i];
                records.extend_from_slice(batch.records);
                times.extend(std::iter::repeat_n(batch.received_at, batch.records.len()));
                if any_stitch {
                    match batch.stitch {
                        Some(parts) => {
                            meta.extend(parts.meta.iter().map(Some));
                            schema = parts.schema.or(schema);
                        }
                        None => meta.extend(std::iter::repeat_n(None, batch.records.len())),
                    }
                }
            }
            if meta.len() != records.len() && any_stitch {
                return Err(diesel::result::Error::QueryBuilderError(
                    "a Stitch batch needs one metadata entry per record".into(),
                ));
            }
            let staged = TableRecords {
                client_id: first_batch.client_id,
                table: first_batch.table,
                records: &records,
                times: &times,
                meta: any_stitch.then_some(&meta[..]),
            };
            let last = append_table(conn, &staged)?;
            if let Some(schema) = schema {
                save_schema(conn, staged.client_id, staged.table, schema)?;
            }
            let mut next = last - records.len() as i64 + 1;
            for &i in group {
                let n = batches[i].records.len() as i64;
                ranges[i] = SeqRange {
                    first: next,
                    last: next + n - 1,
                };
                next += n;
            }
        }
        // Each statement had the whole budget; several may have used more between them.
        if give_up.is_some_and(|t| std::time::Instant::now() >= t) {
            return Err(diesel::result::Error::QueryBuilderError(
                "the write outlasted its time budget; rolled back".into(),
            ));
        }
        Ok(ranges)
    };
    let budget_ms = budget.map(|b| b.as_millis().max(1));
    match conn {
        DbConn::Pg(c) => c.transaction(|c| {
            if let Some(ms) = budget_ms {
                c.batch_execute(&format!(
                    "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"
                ))?;
            }
            write(&mut RawConn::Pg(c))
        }),
        DbConn::Sqlite(c) => {
            let Some(ms) = budget_ms else {
                return c.immediate_transaction(|c| write(&mut RawConn::Sqlite(c)));
            };
            // The write lock is taken at BEGIN IMMEDIATE: that is where the wait is. The
            // connection's own busy timeout is put back afterwards.
            let BusyTimeout { timeout: usual } =
                diesel::sql_query("PRAGMA busy_timeout").get_result(&mut **c)?;
            c.batch_execute(&format!("PRAGMA busy_timeout = {ms}"))?;
            let outcome = c.immediate_transaction(|c| write(&mut RawConn::Sqlite(c)));
            c.batch_execute(&format!("PRAGMA busy_timeout = {usual}"))?;
            outcome
        }
    }
}

#[derive(QueryableByName)]
struct BusyTimeout {
    #[diesel(sql_type = BigInt)]
    timeout: i64,
}

/// A connection inside a transaction.
enum RawConn<'a> {
    Pg(&'a mut PgConnection),
    Sqlite(&'a mut SqliteConnection),
}

/// One table's records of a group transaction, in sequence order.
struct TableRecords<'a> {
    client_id: i64,
    table: &'a str,
    records: &'a [&'a str],
    times: &'a [DateTime<Utc>],
    /// Per record, when any record of the group came through the Stitch protocol.
    meta: Option<&'a [Option<&'a RecordMeta>]>,
}

impl TableRecords<'_> {
    fn client_seqs(&self) -> Vec<Option<i64>> {
        self.meta_field(|m| Some(m.client_seq))
    }

    fn key_names(&self) -> Vec<Option<&str>> {
        self.meta_field(|m| Some(m.key_names.as_str()))
    }

    fn versions(&self) -> Vec<Option<i64>> {
        self.meta_field(|m| m.table_version)
    }

    fn actions(&self) -> Vec<Option<&'static str>> {
        self.meta_field(|m| m.activate.then_some(ACTIVATE_VERSION))
    }

    fn meta_field<'m, T>(&'m self, f: impl Fn(&'m RecordMeta) -> Option<T>) -> Vec<Option<T>> {
        self.meta
            .unwrap_or_default()
            .iter()
            .map(|m| m.and_then(&f))
            .collect()
    }
}

/// Writes one table's records and returns the last sequence number used. Must run inside a
/// transaction: the counter row stays locked until commit.
fn append_table(conn: &mut RawConn<'_>, t: &TableRecords<'_>) -> QueryResult<i64> {
    let count = t.records.len() as i64;
    match conn {
        RawConn::Pg(c) => {
            // One statement: bump the counter (taking its row lock) and insert every record.
            let counter = "WITH s AS ( \
                   INSERT INTO staging_sequences AS q (client_id, table_name, last_seq) \
                   VALUES ($1, $2, $3) \
                   ON CONFLICT (client_id, table_name) DO UPDATE SET last_seq = q.last_seq + EXCLUDED.last_seq \
                   RETURNING q.last_seq), ";
            // The Stitch columns only when some record has them: RJMetrics pushes, the hot
            // path, bind nothing more.
            let (columns, values, arrays, names) = if t.meta.is_some() {
                (
                    ", client_seq, key_names, table_version, action",
                    ", r.cs, r.kn, r.tv, r.act",
                    ", $6::bigint[], $7::text[], $8::bigint[], $9::text[]",
                    ", cs, kn, tv, act",
                )
            } else {
                ("", "", "", "")
            };
            let mut query = diesel::sql_query(format!(
                "{counter} ins AS ( \
                   INSERT INTO staged_records (client_id, table_name, seq, received_at, record{columns}) \
                   SELECT $1, $2, s.last_seq - $3 + r.ord, r.at, r.rec{values} \
                   FROM s, unnest($4::text[], $5::timestamptz[]{arrays}) \
                     WITH ORDINALITY AS r(rec, at{names}, ord)) \
                 SELECT last_seq FROM s"
            ))
            .into_boxed::<Pg>()
            .bind::<BigInt, _>(t.client_id)
            .bind::<Text, _>(t.table)
            .bind::<BigInt, _>(count)
            .bind::<Array<Text>, _>(t.records)
            .bind::<Array<Timestamptz>, _>(t.times);
            if t.meta.is_some() {
                query = query
                    .bind::<Array<Nullable<BigInt>>, _>(t.client_seqs())
                    .bind::<Array<Nullable<Text>>, _>(t.key_names())
                    .bind::<Array<Nullable<BigInt>>, _>(t.versions())
                    .bind::<Array<Nullable<Text>>, _>(t.actions());
            }
            let rows: Vec<LastSeq> = query.load(*c)?;
            rows.first()
                .map(|r| r.last_seq)
                .ok_or(diesel::result::Error::NotFound)
        }
        RawConn::Sqlite(c) => {
            let LastSeq { last_seq: last } = diesel::sql_query(
                "INSERT INTO staging_sequences (client_id, table_name, last_seq) VALUES ($1, $2, $3) \
                 ON CONFLICT (client_id, table_name) DO UPDATE SET last_seq = last_seq + excluded.last_seq \
                 RETURNING last_seq",
            )
            .bind::<BigInt, _>(t.client_id)
            .bind::<Text, _>(t.table)
            .bind::<BigInt, _>(count)
            .get_result(*c)?;
            let first = last - count + 1;
            let (seqs, names, versions, actions) =
                (t.client_seqs(), t.key_names(), t.versions(), t.actions());
            let with_meta = t.meta.is_some();
            let (columns, one_row) = if with_meta {
                (
                    "client_id, table_name, seq, received_at, record, client_seq, key_names, table_version, action",
                    "(?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
            } else {
                (
                    "client_id, table_name, seq, received_at, record",
                    "(?, ?, ?, ?, ?)",
                )
            };
            for (chunk_no, chunk) in t.records.chunks(SQLITE_ROWS_PER_INSERT).enumerate() {
                let mut sql = format!("INSERT INTO staged_records ({columns}) VALUES ");
                for i in 0..chunk.len() {
                    if i > 0 {
                        sql.push_str(", ");
                    }
                    sql.push_str(one_row);
                }
                let mut query = diesel::sql_query(sql).into_boxed::<Sqlite>();
                let base = chunk_no * SQLITE_ROWS_PER_INSERT;
                for (i, record) in chunk.iter().enumerate() {
                    let n = base + i;
                    query = query
                        .bind::<BigInt, _>(t.client_id)
                        .bind::<Text, _>(t.table)
                        .bind::<BigInt, _>(first + n as i64)
                        .bind::<Text, _>(sqlite_text(t.times[n]))
                        .bind::<Text, _>(*record);
                    if with_meta {
                        query = query
                            .bind::<Nullable<BigInt>, _>(seqs[n])
                            .bind::<Nullable<Text>, _>(names[n])
                            .bind::<Nullable<BigInt>, _>(versions[n])
                            .bind::<Nullable<Text>, _>(actions[n]);
                    }
                }
                query.execute(*c)?;
            }
            Ok(last)
        }
    }
}

/// Keeps `schema` as the table's newest JSON Schema, in the batch's transaction.
fn save_schema(
    conn: &mut RawConn<'_>,
    client_id: i64,
    table: &str,
    schema: &str,
) -> QueryResult<()> {
    let sql = "INSERT INTO table_schemas (client_id, table_name, json_schema, updated_at) \
               VALUES ($1, $2, $3, $4) ON CONFLICT (client_id, table_name) \
               DO UPDATE SET json_schema = excluded.json_schema, updated_at = excluded.updated_at";
    let now = crate::timestamps::now();
    match conn {
        RawConn::Pg(c) => diesel::sql_query(sql)
            .bind::<BigInt, _>(client_id)
            .bind::<Text, _>(table)
            .bind::<Text, _>(schema)
            .bind::<Timestamptz, _>(now)
            .execute(*c)?,
        RawConn::Sqlite(c) => diesel::sql_query(sql)
            .bind::<BigInt, _>(client_id)
            .bind::<Text, _>(table)
            .bind::<Text, _>(schema)
            .bind::<Text, _>(sqlite_text(now))
            .execute(*c)?,
    };
    Ok(())
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
