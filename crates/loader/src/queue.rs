//! The loader's side of the staging queue (the ingest side is `intake_core::staging`):
//! which tables have work, reading a chunk in sequence order, and removing loaded records.

use chrono::{DateTime, Utc};
use diesel::QueryResult;
use diesel::deserialize::{FromSql, QueryableByName};
use diesel::row::NamedRow;
use diesel::sql_types::{BigInt, Nullable, Text};

use rustc_hash::FxHashMap;

use crate::dialect::Dialect;
use crate::sql::{Conn, Moment, Param};

/// A record waiting in staging.
#[derive(Debug, Clone, Default)]
pub struct Staged {
    pub seq: i64,
    pub received_at: DateTime<Utc>,
    pub record: String,
    /// What the Stitch protocol adds (all `None`/false for RJMetrics pushes).
    pub stitch: Option<StitchMeta>,
}

/// A Stitch record's client sequence, key names, table version, or an activate_version marker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StitchMeta {
    pub client_seq: i64,
    /// JSON array of the key field names.
    pub key_names: String,
    pub table_version: Option<i64>,
    pub activate: bool,
}

impl Staged {
    /// Where this record stands among the versions of its key; a record replaces a stored one
    /// only if it stands strictly higher. Stitch records stand by their client sequence, and an
    /// equal one does not replace (a retried request changes nothing). RJMetrics records have
    /// no client sequence: they stand at 0, above any Stitch record with sequence 0, and among
    /// themselves by commit order. A total order, so the winner never depends on how records
    /// fall into chunks. The upsert guard in `load_chunk` is the same order in SQL.
    pub fn order(&self) -> (i64, u8, i64) {
        match &self.stitch {
            Some(m) => (m.client_seq, 0, 0),
            None => (0, 1, self.seq),
        }
    }

    /// Whether this record replaces `stored`, a version of the same key.
    pub fn supersedes(&self, stored: &Staged) -> bool {
        self.order() > stored.order()
    }

    pub fn is_activation(&self) -> bool {
        self.stitch.as_ref().is_some_and(|m| m.activate)
    }
}

#[derive(QueryableByName)]
struct PendingTable {
    #[diesel(sql_type = BigInt)]
    client_id: i64,
    #[diesel(sql_type = Text)]
    table_name: String,
}

/// A staged row as a chunk read selects it: `record` is `None` where it was held back for its
/// size (see [`read_chunk_where`]), and `size` is the record's length in bytes.
struct StagedRow {
    seq: i64,
    received_at: DateTime<Utc>,
    record: Option<String>,
    client_seq: Option<i64>,
    key_names: Option<String>,
    table_version: Option<i64>,
    action: Option<String>,
    size: i64,
}

/// Reads the fields by position: the derived reader looks each one up by its name in every
/// row, which was 6% of the loader's instructions (these are the rows it reads most).
impl<DB> QueryableByName<DB> for StagedRow
where
    DB: diesel::backend::Backend,
    i64: FromSql<BigInt, DB>,
    DateTime<Utc>: FromSql<Moment, DB>,
    Option<i64>: FromSql<Nullable<BigInt>, DB>,
    Option<String>: FromSql<Nullable<Text>, DB>,
{
    fn build<'a>(row: &impl NamedRow<'a, DB>) -> diesel::deserialize::Result<Self> {
        Ok(StagedRow {
            seq: row.get_value::<BigInt, _, _>(0)?,
            received_at: row.get_value::<Moment, _, _>(1)?,
            record: row.get_value::<Nullable<Text>, _, _>(2)?,
            client_seq: row.get_value::<Nullable<BigInt>, _, _>(3)?,
            key_names: row.get_value::<Nullable<Text>, _, _>(4)?,
            table_version: row.get_value::<Nullable<BigInt>, _, _>(5)?,
            action: row.get_value::<Nullable<Text>, _, _>(6)?,
            size: row.get_value::<BigInt, _, _>(7)?,
        })
    }
}

/// A record held back by a chunk read, read on its own.
#[derive(QueryableByName)]
struct SeqRecord {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    record: String,
}

/// Every (client, table) with records waiting.
///
/// On PostgreSQL by stepping through the primary key's index from one table to the next (one
/// probe per table) rather than reading every staged record: with 200,000 records pending the
/// `DISTINCT` took 30–55 ms, this 1 ms, and a backlog made every pass start with it. SQLite
/// reads its covering index whole (13 ms for 200,000 records): its row-value comparison does
/// not bound an index search on both columns, so the same steps would read more.
pub fn pending_tables(conn: &mut Conn<'_>) -> QueryResult<Vec<(i64, String)>> {
    let sql = match conn.dialect() {
        Dialect::Postgres => {
            "WITH RECURSIVE pending AS ( \
               (SELECT client_id, table_name FROM staged_records \
                ORDER BY client_id, table_name LIMIT 1) \
               UNION ALL \
               SELECT next.client_id, next.table_name FROM pending AS p, LATERAL ( \
                 SELECT s.client_id, s.table_name FROM staged_records AS s \
                 WHERE (s.client_id, s.table_name) > (p.client_id, p.table_name) \
                 ORDER BY s.client_id, s.table_name LIMIT 1) AS next) \
             SELECT client_id, table_name FROM pending ORDER BY client_id, table_name"
        }
        Dialect::Sqlite => {
            "SELECT DISTINCT client_id, table_name FROM staged_records \
             ORDER BY client_id, table_name"
        }
    };
    let rows: Vec<PendingTable> = conn.load(sql, &[])?;
    Ok(rows
        .into_iter()
        .map(|r| (r.client_id, r.table_name))
        .collect())
}

/// How much one chunk may hold: a number of records, and their total size, so that the
/// loader's memory stays bounded whatever the records' size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLimits {
    pub records: usize,
    /// Total bytes of the records' JSON text; a chunk always holds at least one record.
    pub bytes: usize,
    /// PostgreSQL connections that may write one chunk at once, each its share of the keys
    /// (`loader.writers`).
    pub writers: usize,
}

impl ChunkLimits {
    /// The limits `loader` sets (`chunk_size`, `chunk_max_bytes`, `writers`), for a
    /// database that is SQLite or not (the default chunk size differs).
    pub fn from_settings(
        loader: &intake_core::settings::LoaderSettings,
        sqlite: bool,
    ) -> ChunkLimits {
        ChunkLimits {
            records: loader.chunk_records(sqlite).max(1),
            bytes: loader.chunk_max_bytes,
            writers: loader.writers,
        }
    }
}

/// A table's oldest staged records from sequence `from` on, in sequence order, within
/// `limits`; and whether more may be waiting (the chunk was cut by one of the limits).
/// A loader that has just loaded up to sequence N passes N + 1: the index entries of the
/// records it removed stay behind until vacuum, and a scan from the start would step over
/// all of them on every chunk.
pub fn read_chunk(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    from: i64,
    limits: ChunkLimits,
) -> QueryResult<(Vec<Staged>, bool)> {
    let (chunk, available) =
        read_chunk_where(conn, client_id, table, Some((from, i64::MAX)), limits)?;
    let more = available >= limits.records.max(1) || available > chunk.len();
    Ok((chunk, more))
}

/// Reads records (in `range` if given): the first `limits.records`, then of those the ones
/// that fit in `limits.bytes` (at least one). Also returns how many the first step found.
///
/// One statement reads the rows with their sizes, but only the records that are no larger
/// than an equal part of the byte budget: so the rows it returns hold at most the budget,
/// whatever the records' size. The chunk is cut where the running size passes the budget
/// (the first record always counts), and the records held back within the cut are read by a
/// second statement, which small records never need.
fn read_chunk_where(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    range: Option<(i64, i64)>,
    limits: ChunkLimits,
) -> QueryResult<(Vec<Staged>, usize)> {
    let d = conn.dialect();
    let (from, to) = range.unwrap_or((i64::MIN, i64::MAX));
    let records = limits.records.max(1);
    let inline_max = limits.bytes / records;
    let size = match d {
        // A bigint, as `StagedRow` reads it.
        Dialect::Postgres => "octet_length(record)::bigint",
        Dialect::Sqlite => "length(CAST(record AS BLOB))",
    };
    let mut rows: Vec<StagedRow> = conn.load(
        &format!(
            "SELECT seq, received_at, CASE WHEN {size} <= {inline_max} THEN record END AS record, \
                    client_seq, key_names, table_version, action, {size} AS size \
             FROM staged_records WHERE client_id = {} AND table_name = {} AND seq >= {} AND seq <= {} \
             ORDER BY seq LIMIT {}",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3),
            d.placeholder(4),
            d.placeholder(5),
            inline_max = d.placeholder(6),
        ),
        vec![
            Param::Int(Some(client_id)),
            Param::Text(Some(table.to_owned())),
            Param::Int(Some(from)),
            Param::Int(Some(to)),
            Param::Int(Some(records as i64)),
            Param::Int(Some(i64::try_from(inline_max).unwrap_or(i64::MAX))),
        ],
    )?;
    let available = rows.len();
    // Running sums grow, so the rows that fit are a prefix.
    let mut total = 0usize;
    let fit = rows
        .iter()
        .position(|r| {
            let size = usize::try_from(r.size).unwrap_or(0);
            let over = total > 0 && total.saturating_add(size) > limits.bytes;
            total = total.saturating_add(size);
            over
        })
        .unwrap_or(rows.len());
    rows.truncate(fit);
    let held_back: Vec<i64> = rows
        .iter()
        .filter(|r| r.record.is_none())
        .map(|r| r.seq)
        .collect();
    if !held_back.is_empty() {
        let mut records: FxHashMap<i64, String> = read_records(conn, client_id, table, &held_back)?
            .into_iter()
            .map(|r| (r.seq, r.record))
            .collect();
        for row in rows.iter_mut().filter(|r| r.record.is_none()) {
            row.record = records.remove(&row.seq);
        }
    }
    let chunk = rows
        .into_iter()
        // A record held back and gone by the second read was taken by another loader.
        .filter_map(|r| {
            Some(Staged {
                seq: r.seq,
                received_at: r.received_at,
                record: r.record?,
                stitch: r.client_seq.map(|client_seq| StitchMeta {
                    client_seq,
                    key_names: r.key_names.unwrap_or_default(),
                    table_version: r.table_version,
                    activate: r.action.as_deref() == Some(intake_core::staging::ACTIVATE_VERSION),
                }),
            })
        })
        .collect();
    Ok((chunk, available))
}

/// The records (only) of the given sequences of a table, as far as they are still staged.
fn read_records(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    seqs: &[i64],
) -> QueryResult<Vec<SeqRecord>> {
    let (Some(&first), Some(&last)) = (seqs.iter().min(), seqs.iter().max()) else {
        return Ok(Vec::new());
    };
    let d = conn.dialect();
    let (range, params) = listed_seqs(d, client_id, table, first, last, seqs);
    conn.load(
        &format!("SELECT seq, record FROM staged_records WHERE {range}"),
        params,
    )
}

/// Removes a loaded range of a table's records. Called in the transaction that wrote them.
pub fn delete_range(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    first: i64,
    last: i64,
) -> QueryResult<usize> {
    let (range, params) = seq_range(conn.dialect(), client_id, table, first, last);
    conn.execute(&format!("DELETE FROM staged_records WHERE {range}"), params)
}

/// The condition on `staged_records` that picks a table's sequences `first..=last` (by its
/// primary-key index), and its four parameters.
fn seq_range(
    d: Dialect,
    client_id: i64,
    table: &str,
    first: i64,
    last: i64,
) -> (String, Vec<Param>) {
    (
        format!(
            "client_id = {} AND table_name = {} AND seq >= {} AND seq <= {}",
            d.placeholder(1),
            d.placeholder(2),
            d.placeholder(3),
            d.placeholder(4)
        ),
        vec![
            Param::Int(Some(client_id)),
            Param::Text(Some(table.to_owned())),
            Param::Int(Some(first)),
            Param::Int(Some(last)),
        ],
    )
}

/// Removes the given staged records of a table (a share of a chunk, whose sequences are not
/// one range).
pub fn delete_seqs(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    seqs: &[i64],
) -> QueryResult<usize> {
    let (Some(&first), Some(&last)) = (seqs.iter().min(), seqs.iter().max()) else {
        return Ok(0);
    };
    let (range, params) = listed_seqs(conn.dialect(), client_id, table, first, last, seqs);
    conn.execute(&format!("DELETE FROM staged_records WHERE {range}"), params)
}

/// The condition on `staged_records` that picks the listed sequences of a table, all within
/// `first..=last`; the range bound keeps the plan an index scan whatever the statistics say.
/// On PostgreSQL a list that covers much of its range (a share's records: about every other
/// one of its chunk) is a filter on that one range scan, looked up in a hash table, rather
/// than an index condition, which walks down the index once per listed sequence: for 10,000
/// of 20,000 the walks took 24–28 ms, the filter 9–10 ms (psql, `EXPLAIN ANALYZE`). A sparse
/// list (a few large records held back from a chunk) keeps the walks, which read only its
/// rows.
fn listed_seqs(
    d: Dialect,
    client_id: i64,
    table: &str,
    first: i64,
    last: i64,
    seqs: &[i64],
) -> (String, Vec<Param>) {
    let (range, mut params) = seq_range(d, client_id, table, first, last);
    let listed = match d {
        Dialect::Postgres => {
            params.push(Param::IntArray(seqs.iter().map(|s| Some(*s)).collect()));
            let span = last.saturating_sub(first).saturating_add(1);
            if (seqs.len() as i64).saturating_mul(DENSE_LIST) >= span {
                // `+ 0` keeps it out of the index condition.
                "seq + 0 = ANY($5)"
            } else {
                "seq = ANY($5)"
            }
        }
        Dialect::Sqlite => {
            params.push(Param::Text(Some(
                serde_json::to_string(seqs).unwrap_or_default(),
            )));
            "seq IN (SELECT value FROM json_each(?5))"
        }
    };
    (format!("{range} AND {listed}"), params)
}

/// A list of sequences is dense, for [`listed_seqs`], when it names at least one in this many
/// of its range.
const DENSE_LIST: i64 = 4;

/// The records of a table with sequences in `first..=last` that are still staged.
pub fn read_range(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    first: i64,
    last: i64,
) -> QueryResult<Vec<Staged>> {
    let all = ChunkLimits {
        records: (last - first + 1).max(0) as usize,
        bytes: usize::MAX,
        writers: 1,
    };
    let (mut rows, _) = read_chunk_where(conn, client_id, table, Some((first, last)), all)?;
    rows.retain(|s| s.seq >= first && s.seq <= last);
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn staged(seq: i64, client_seq: Option<i64>) -> Staged {
        Staged {
            seq,
            stitch: client_seq.map(|client_seq| StitchMeta {
                client_seq,
                ..StitchMeta::default()
            }),
            ..Staged::default()
        }
    }

    #[test]
    fn only_a_higher_client_sequence_supersedes() {
        assert!(staged(2, Some(5)).supersedes(&staged(1, Some(4))));
        assert!(
            !staged(2, Some(4)).supersedes(&staged(1, Some(4))),
            "equal is not higher"
        );
        assert!(!staged(2, Some(3)).supersedes(&staged(1, Some(4))));
        // RJMetrics records: the later commit; against Stitch ones they count as 0.
        assert!(staged(2, None).supersedes(&staged(1, None)));
        assert!(!staged(1, None).supersedes(&staged(2, None)));
        assert!(!staged(9, None).supersedes(&staged(1, Some(1))));
        assert!(staged(1, Some(1)).supersedes(&staged(9, None)));
        assert!(!staged(1, Some(0)).supersedes(&staged(9, None)));
        // Sequence 0 stands below every RJMetrics record, so the order is total: which of
        // three versions wins does not depend on which two meet first.
        assert!(staged(9, None).supersedes(&staged(1, Some(0))));
        let mut three = [staged(1, None), staged(2, Some(0)), staged(3, None)];
        three.sort_by_key(Staged::order);
        assert_eq!(three.last().map(|s| s.seq), Some(3));
    }
}
