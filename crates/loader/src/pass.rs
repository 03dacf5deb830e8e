//! One loader pass: every (client, table) with staged records, chunk by chunk, each chunk in
//! its own transaction. A table is loaded by one loader at a time (a PostgreSQL advisory lock
//! per chunk transaction, SQLite's single writer); a loader that finds a table locked skips it.
//! A chunk that fails is split until the record at fault is found and rejected, so one bad
//! record or table never blocks the rest.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Receiver;

use diesel::QueryResult;
use intake_core::db::{DbConn, DbPool};

use crate::catalog::{Catalog, ensure_namespace};
use crate::dialect::Dialect;
use crate::load_chunk::{
    ChunkOptions, ChunkOutcome, PlacedAhead, Prepared, chunk_session, load_chunk, parse_chunk,
    place_records, record_history, record_rejections,
};
use crate::queue::{self, ChunkLimits, Staged};
use crate::share_writers::ShareWriters;
use crate::sql::{BoolRow, Conn, Param, in_transaction};

/// The result of loading one table in a pass.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TableReport {
    pub client_id: i64,
    pub table: String,
    pub loaded: usize,
    pub rejected: usize,
    /// Another loader held the table; it was left to that loader.
    pub skipped_busy: bool,
    pub error: Option<String>,
}

/// What a pass did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PassReport {
    pub tables: Vec<TableReport>,
}

impl PassReport {
    pub fn loaded(&self) -> usize {
        self.tables.iter().map(|t| t.loaded).sum()
    }
    pub fn rejected(&self) -> usize {
        self.tables.iter().map(|t| t.rejected).sum()
    }
    pub fn errors(&self) -> Vec<String> {
        self.tables
            .iter()
            .filter_map(|t| {
                t.error
                    .as_ref()
                    .map(|e| format!("client {} table {}: {e}", t.client_id, t.table))
            })
            .collect()
    }
}

/// Progress notifications, for a progress bar or log lines.
pub enum Event<'a> {
    TableStarted { client_id: i64, table: &'a str },
    Chunk { records: usize },
    TableFinished(&'a TableReport),
}

/// Borrows the diesel connection inside a pooled connection.
pub fn conn_of(db: &mut DbConn) -> Conn<'_> {
    match db {
        DbConn::Pg(c) => Conn::Pg(c),
        DbConn::Sqlite(c) => Conn::Sqlite(c),
    }
}

/// SQLite page cache of a loading connection. A chunk touches the staging table, the
/// warehouse tables and their indexes; with SQLite's default 2 MiB most of that was read
/// again from the operating system on every chunk (about 9% of the loader's CPU).
const SQLITE_CACHE_KIB: u32 = 32 * 1024;

/// Loads everything pending, or stops between chunks once `stop` is set.
pub fn run_pass(
    pool: &DbPool,
    limits: ChunkLimits,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Event<'_>),
) -> anyhow::Result<PassReport> {
    let mut db = pool.get()?;
    let mut conn = conn_of(&mut db);
    if conn.dialect() == Dialect::Sqlite {
        conn.batch(&format!("PRAGMA cache_size = -{SQLITE_CACHE_KIB}"))?;
    }
    let mut extra = spare_connections(pool, limits.writers);
    let mut spare = extra.iter_mut().map(conn_of);
    let mut reader = spare.next();
    let mut helpers: Vec<Conn<'_>> = spare.collect();
    let mut report = PassReport::default();
    let mut ready = HashSet::new();
    for (client_id, table) in queue::pending_tables(&mut conn)? {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        progress(Event::TableStarted {
            client_id,
            table: &table,
        });
        let mut result = TableReport {
            client_id,
            table: table.clone(),
            ..TableReport::default()
        };
        if !ready.contains(&client_id) {
            match prepare_namespace(&mut conn, client_id) {
                Ok(()) => {
                    ready.insert(client_id);
                }
                Err(e) => {
                    result.error = Some(format!("could not prepare the client's namespace: {e}"))
                }
            }
        }
        // A spare connection that broke would fail every chunk it shares: drop it.
        helpers.retain_mut(|h| crate::sql::ping(h).is_ok());
        if reader
            .as_mut()
            .is_some_and(|r| crate::sql::ping(r).is_err())
        {
            reader = None;
        }
        if result.error.is_none() {
            let mut conns = Connections {
                main: &mut conn,
                reader: reader.as_mut(),
                helpers: &mut helpers,
            };
            load_table(&mut conns, &mut result, limits, stop, progress);
        }
        progress(Event::TableFinished(&result));
        report.tables.push(result);
    }
    Ok(report)
}

/// The connections a pass uses besides its main one (PostgreSQL only): first one that reads
/// the next chunk while the current one is written, then the other `writers - 1` writers of a
/// chunk. As many as the pool gives at once: with fewer, the pass simply reads ahead less or
/// splits chunks fewer ways. SQLite gets none: it has one writer, and reading ahead bought
/// nothing there (19,100–20,900 records/s with it, 20,000–20,700 without) but 40 MiB.
fn spare_connections(pool: &DbPool, writers: usize) -> Vec<DbConn> {
    let wanted = if pool.is_sqlite() { 0 } else { writers };
    (0..wanted)
        .map_while(|_| pool.get_timeout(std::time::Duration::from_secs(1)).ok())
        .collect()
}

/// The connections loading one table.
struct Connections<'c, 'a> {
    /// Holds the table's load lock; writes the chunk (or its first share).
    main: &'c mut Conn<'a>,
    reader: Option<&'c mut Conn<'a>>,
    helpers: &'c mut [Conn<'a>],
}

/// A chunk read and parsed on the reader connection while the chunk before it was written.
struct Ahead {
    /// The sequence it was read from.
    from: i64,
    chunk: Vec<Staged>,
    more: bool,
    prepared: Prepared,
}

impl Ahead {
    fn read(
        conn: &mut Conn<'_>,
        client_id: i64,
        table: &str,
        from: i64,
        limits: ChunkLimits,
    ) -> QueryResult<Ahead> {
        let (chunk, more) = queue::read_chunk(conn, client_id, table, from, limits)?;
        let parsed = parse_chunk(conn, client_id, table, &chunk)?;
        Ok(Ahead {
            from,
            chunk,
            more,
            prepared: Prepared::Parsed(parsed),
        })
    }

    /// Places the chunk's rows once the chunk being written sends its catalog (see
    /// [`load_chunk`]), so that its transaction has only to write them. Left parsed if none
    /// comes (the chunk had markers or failed) or this chunk has markers.
    fn place(mut self, catalog: &Receiver<Catalog>, helpers: usize) -> QueryResult<Ahead> {
        if self.chunk.iter().any(Staged::is_activation) {
            return Ok(self);
        }
        let Ok(base) = catalog.recv() else {
            return Ok(self);
        };
        if let Prepared::Parsed(parsed) = self.prepared {
            let placed = place_records(
                base.clone(),
                &self.chunk,
                &parsed.paths,
                parsed.records,
                helpers,
            )?;
            self.prepared = Prepared::Placed(Box::new(PlacedAhead { base, placed }));
        }
        Ok(self)
    }
}

/// Creates the namespace, retrying once: two loaders creating it at once may collide.
fn prepare_namespace(conn: &mut Conn<'_>, client_id: i64) -> QueryResult<()> {
    match in_transaction(conn, |c| ensure_namespace(c, client_id)) {
        Ok(()) => Ok(()),
        Err(_) => in_transaction(conn, |c| ensure_namespace(c, client_id)),
    }
}

enum Step {
    Done,
    /// Outcome, records, first and last sequence, and whether more may be waiting.
    Loaded(ChunkOutcome, usize, i64, i64, bool),
}

/// Loads a table's pending records chunk by chunk, holding its load lock for the whole pass
/// (see [`hold_table`]); skips it if another loader holds it.
fn load_table(
    conns: &mut Connections<'_, '_>,
    result: &mut TableReport,
    limits: ChunkLimits,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Event<'_>),
) {
    let (client_id, table) = (result.client_id, result.table.clone());
    match hold_table(conns.main, client_id, &table) {
        Ok(true) => {}
        Ok(false) => {
            result.skipped_busy = true;
            return;
        }
        Err(e) => {
            result.error = Some(format!("could not take the table's load lock: {e}"));
            return;
        }
    }
    let Connections {
        main,
        reader,
        helpers,
    } = conns;
    std::thread::scope(|scope| {
        let mut writers = ShareWriters::start(scope, helpers);
        let mut conns = ChunkConnections {
            main,
            reader: reader.as_deref_mut(),
            writers: &mut writers,
        };
        load_chunks(&mut conns, result, limits, stop, progress);
    });
    if let Err(e) = release_table(conns.main, client_id, &table) {
        // A connection that broke has released it with its session.
        log::warn!("releasing the load lock of client {client_id} table {table} failed: {e}");
    }
}

/// The connections loading one table's chunks: the helpers are behind `writers`.
struct ChunkConnections<'c, 'a> {
    main: &'c mut Conn<'a>,
    reader: Option<&'c mut Conn<'a>>,
    writers: &'c mut ShareWriters,
}

/// Loads chunks until the table is caught up, fails or `stop` is set. A failure (of the main
/// connection's transaction or of a helper's share) sends the oldest staged records through
/// [`salvage`], and the pass goes on from the oldest record still staged.
fn load_chunks(
    conns: &mut ChunkConnections<'_, '_>,
    result: &mut TableReport,
    limits: ChunkLimits,
    stop: &AtomicBool,
    progress: &mut dyn FnMut(Event<'_>),
) {
    let (client_id, table) = (result.client_id, result.table.clone());
    let mut cursor = TableCursor {
        client_id,
        table: &table,
        limits,
        from: i64::MIN,
        ahead: None,
    };
    loop {
        let ChunkConnections {
            main,
            reader,
            writers,
        } = conns;
        let step = if stop.load(Ordering::Relaxed) {
            Ok(Step::Done)
        } else {
            in_transaction(main, |c| {
                chunk_session(c)?;
                cursor.load_next(c, reader.as_deref_mut(), writers)
            })
        };
        let conn = &mut **main;
        let mut last = true;
        let mut failure = None;
        match step {
            Ok(Step::Done) => {}
            Ok(Step::Loaded(outcome, n, first, end, more)) => {
                result.loaded += outcome.loaded;
                result.rejected += outcome.rejected;
                progress(Event::Chunk { records: n });
                log::debug!("client {client_id} table {table}: loaded seq {first}..={end}");
                cursor.from = end.saturating_add(1);
                // Caught up otherwise; records arriving now wait for the next pass.
                last = !more;
            }
            Err(e) => failure = Some(e),
        }
        // A helper's failure is a chunk's failure; and before the pass leaves the table every
        // share handed out must have been written (or not).
        let helpers = if last || failure.is_some() {
            writers.settle()
        } else {
            writers.failed()
        };
        // Shares that helpers committed stay loaded (and out of staging) whatever follows.
        result.loaded += writers.take_committed();
        let Some(e) = failure.or(helpers.err()) else {
            if last {
                return;
            }
            continue;
        };
        if crate::sql::ping(conn).is_err() {
            result.error = Some(format!("database unavailable: {e}"));
            return;
        }
        if is_transient(&e) {
            // Lock or statement timeouts, deadlocks, a busy SQLite file: nothing is wrong
            // with the records, so they stay staged for the next pass.
            result.error = Some(format!("database busy, will retry next pass: {e}"));
            return;
        }
        log::warn!(
            "loading client {client_id} table {table} failed ({e}); isolating the records at fault"
        );
        match salvage(conn, client_id, &table, limits, &e.to_string()) {
            Ok(Some((outcome, n))) => {
                result.loaded += outcome.loaded;
                result.rejected += outcome.rejected;
                progress(Event::Chunk { records: n });
            }
            Ok(None) => return,
            Err(e2) => {
                result.error = Some(e2.to_string());
                return;
            }
        }
        // A helper that failed left its share, and any it was given after it, staged below
        // where the main connection got to.
        cursor.from = i64::MIN;
    }
}

/// Where a pass is in one table.
struct TableCursor<'t> {
    client_id: i64,
    table: &'t str,
    limits: ChunkLimits,
    /// Everything below this sequence has been loaded by this pass.
    from: i64,
    /// The next chunk, if it was read while the one before it was written.
    ahead: Option<Ahead>,
}

impl TableCursor<'_> {
    /// Loads the next chunk in the caller's transaction (which holds the table's lock), and
    /// meanwhile reads the one after it on `reader`.
    fn load_next(
        &mut self,
        conn: &mut Conn<'_>,
        reader: Option<&mut Conn<'_>>,
        writers: &mut ShareWriters,
    ) -> QueryResult<Step> {
        let (client_id, table, limits) = (self.client_id, self.table, self.limits);
        let reading = std::time::Instant::now();
        let Ahead {
            chunk,
            more,
            prepared,
            ..
        } = self.take_next(conn)?;
        log::debug!(
            "{} staged records ready in {:?}",
            chunk.len(),
            reading.elapsed()
        );
        let (Some(first), Some(last)) = (chunk.first().map(|s| s.seq), chunk.last().map(|s| s.seq))
        else {
            return Ok(Step::Done);
        };
        let next = last.saturating_add(1);
        let helper_count = writers.count();
        let (outcome, read_ahead) = std::thread::scope(|scope| {
            let (catalog_out, catalog_in) = std::sync::mpsc::channel();
            let reading = match (more, reader) {
                (true, Some(r)) => Some(scope.spawn(move || {
                    Ahead::read(r, client_id, table, next, limits)?.place(&catalog_in, helper_count)
                })),
                _ => None,
            };
            // Only a chunk read ahead is placed ahead.
            let catalog_out = reading.as_ref().map(|_| catalog_out);
            let outcome = load_chunk(
                conn,
                writers,
                (client_id, table),
                &chunk,
                prepared,
                ChunkOptions {
                    next_catalog: catalog_out,
                    salvaging: false,
                },
            );
            // A read-ahead that failed is not used; the next chunk is then read anew.
            let read_ahead = reading.and_then(|r| r.join().ok()).and_then(Result::ok);
            (outcome, read_ahead)
        });
        self.ahead = read_ahead;
        Ok(Step::Loaded(outcome?, chunk.len(), first, last, more))
    }

    /// The chunk read ahead if it starts where this pass is (not if the chunk before it
    /// failed); else the chunk read now. Its records are all still staged: it was read outside
    /// a chunk's transaction, but the pass holds the table (see [`hold_table`]), and only
    /// PostgreSQL, which has that lock, reads ahead.
    fn take_next(&mut self, conn: &mut Conn<'_>) -> QueryResult<Ahead> {
        let (client_id, table) = (self.client_id, self.table);
        if let Some(ahead) = self.ahead.take() {
            if ahead.from == self.from {
                return Ok(ahead);
            }
            log::debug!("client {client_id} table {table}: read-ahead dropped, reading again");
        }
        Ahead::read(conn, client_id, table, self.from, self.limits)
    }
}

/// Re-reads the failed chunk and loads it in halves, recursively, rejecting single records
/// that still fail. Returns `None` if nothing is staged any more.
fn salvage(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    limits: ChunkLimits,
    first_error: &str,
) -> QueryResult<Option<(ChunkOutcome, usize)>> {
    let (chunk, _) = queue::read_chunk(conn, client_id, table, i64::MIN, limits)?;
    let (Some(first), Some(last)) = (chunk.first().map(|s| s.seq), chunk.last().map(|s| s.seq))
    else {
        return Ok(None);
    };
    let mut total = ChunkOutcome::default();
    let seqs: Vec<i64> = chunk.iter().map(|s| s.seq).collect();
    log::debug!(
        "salvaging client {client_id} table {table} seq {first}..={last} after: {first_error}"
    );
    load_split(conn, client_id, table, &seqs, &mut total)?;
    Ok(Some((total, chunk.len())))
}

fn load_split(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    seqs: &[i64],
    total: &mut ChunkOutcome,
) -> QueryResult<()> {
    let (Some(&first), Some(&last)) = (seqs.first(), seqs.last()) else {
        return Ok(());
    };
    let attempt = in_transaction(conn, |c| {
        chunk_session(c)?;
        let records = queue::read_range(c, client_id, table, first, last)?;
        if records.is_empty() {
            return Ok(ChunkOutcome::default());
        }
        let parsed = Prepared::Parsed(parse_chunk(c, client_id, table, &records)?);
        load_chunk(
            c,
            &mut ShareWriters::none(),
            (client_id, table),
            &records,
            parsed,
            ChunkOptions {
                next_catalog: None,
                salvaging: true,
            },
        )
    });
    match attempt {
        Ok(outcome) => {
            total.loaded += outcome.loaded;
            total.rejected += outcome.rejected;
            Ok(())
        }
        Err(e) if seqs.len() == 1 => {
            let reason = format!("could not be loaded: {e}");
            let started_at = intake_core::timestamps::now();
            in_transaction(conn, |c| {
                let records: Vec<Staged> = queue::read_range(c, client_id, table, first, last)?;
                let refs: Vec<(&Staged, String)> =
                    records.iter().map(|s| (s, reason.clone())).collect();
                record_rejections(c, client_id, table, &refs)?;
                queue::delete_range(c, client_id, table, first, last)?;
                if !refs.is_empty() {
                    // Every record leaves staging with a history row, this one too.
                    record_history(
                        c,
                        client_id,
                        table,
                        started_at,
                        0,
                        0,
                        refs.len(),
                        (first, last),
                        Some(&reason),
                    )?;
                }
                total.rejected += refs.len();
                Ok(())
            })
        }
        Err(_) => {
            let (left, right) = seqs.split_at(seqs.len() / 2);
            load_split(conn, client_id, table, left, total)?;
            load_split(conn, client_id, table, right, total)
        }
    }
}

/// Whether a failed chunk failed because of contention or timeouts rather than its data.
fn is_transient(error: &diesel::result::Error) -> bool {
    use diesel::result::{DatabaseErrorKind, Error};
    match error {
        Error::DatabaseError(
            DatabaseErrorKind::SerializationFailure | DatabaseErrorKind::ClosedConnection,
            _,
        ) => true,
        Error::DatabaseError(_, info) => {
            let message = info.message().to_ascii_lowercase();
            [
                "deadlock detected",
                "lock timeout",
                "statement timeout",
                "database is locked",
                "database table is locked",
                "canceling statement",
            ]
            .iter()
            .any(|m| message.contains(m))
        }
        _ => false,
    }
}

/// Takes the table's load lock for the session (PostgreSQL), so that no other loader takes
/// the table while this pass loads it, not even between two of its chunks (a lock per chunk
/// transaction left the pass to count, under the lock, whether the chunk it had read ahead
/// was still staged: about 3% of a load's time). Released by [`release_table`], or with the
/// session; the chunks' transactions take no lock of their own.
fn hold_table(conn: &mut Conn<'_>, client_id: i64, table: &str) -> QueryResult<bool> {
    table_lock(conn, "pg_try_advisory_lock", client_id, table)
}

/// Releases what [`hold_table`] took, every time this session took it (a pass that ended in
/// a panic may have left one behind on a pooled connection).
fn release_table(conn: &mut Conn<'_>, client_id: i64, table: &str) -> QueryResult<()> {
    while table_lock(conn, "pg_advisory_unlock", client_id, table)? {}
    Ok(())
}

/// Calls one of PostgreSQL's advisory lock functions (`call` ends with its name) on the
/// table's load lock; SQLite has none and answers true, except to an unlock.
fn table_lock(conn: &mut Conn<'_>, call: &str, client_id: i64, table: &str) -> QueryResult<bool> {
    if let Conn::Sqlite(_) = conn {
        return Ok(!call.ends_with("unlock"));
    }
    let rows: Vec<BoolRow> = conn.load(
        &format!("SELECT {call}(hashtext('intake.load'), hashtext($1)) AS v"),
        &[Param::Text(Some(format!("{client_id}/{table}")))],
    )?;
    Ok(rows.first().is_some_and(|r| r.v))
}
