//! Loading one chunk of a table's staged records inside one transaction: flatten, check keys,
//! keep the newest record per key, evolve the schema, upsert the root rows (an older record
//! never overwrites a newer one), replace the winners' child rows, record rejections, remove
//! the chunk from staging and note the load in the history.

use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use diesel::QueryResult;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::bulk::{Shared, Val, insert_rows};
use crate::catalog::{
    APPEND_ONLY_KEY, CLIENT_SEQ_COLUMN, Catalog, HISTORY_TABLE, LOADED_COLUMN, OVERFLOW_COLUMN,
    Placement, RECEIVED_COLUMN, REJECTED_TABLE, SEQ_COLUMN, TableInfo, VERSION_COLUMN,
    ensure_overflow, place_cell,
};
use crate::dialect::Dialect;
use crate::flatten::{EMPTY_PATH, FlatRecord, flatten_with_keys, path_segments};
use crate::identifiers::quote;
use crate::paths::{ArrayId, PathId, Paths, ROOT};
use crate::queue::{self, Staged};
use crate::schema_types::SchemaTypes;
use crate::share_writers::{ShareJob, ShareWriters};
use crate::sql::{Conn, I64Row, Param};
use crate::value_types::{Cell, ColType};

/// What one chunk did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ChunkOutcome {
    /// Records applied (including ones superseded by a newer record in the same chunk).
    pub loaded: usize,
    pub rejected: usize,
}

/// A record that passed the checks, with its key.
struct Accepted<'a> {
    staged: &'a Staged,
    flat: FlatRecord,
    key_values: Vec<Val>,
}

/// Rows being assembled for one table, column by column, as they will be written (one array
/// per column): no vector per row, and nothing to transpose later. Every vector but `data`'s
/// holds one entry per row; a data column ends at the last row that had a value in it and is
/// padded with NULLs when written.
#[derive(Default)]
pub(crate) struct TableRows {
    /// The table's key in the catalog (its array path).
    table_key: String,
    /// Data columns by index, in the order this chunk met them.
    columns: Vec<String>,
    index: FxHashMap<String, usize>,
    /// Values of each entry of `columns`.
    data: Vec<Vec<Val>>,
    /// Key values, a vector per key column.
    keys: Vec<Vec<Val>>,
    /// Each row's overflow fields as a JSON object's text, if it has any.
    overflow: Vec<Option<String>>,
    /// The sequence and received-at time of the record each row came from.
    seqs: Vec<i64>,
    received: Vec<Val>,
    /// The client sequence and table version of a Stitch record (root rows only).
    stitch: Vec<Option<(i64, Option<i64>)>>,
    /// Rows expected, to size columns that appear once rows exist.
    expected: usize,
    /// Where this chunk's cells went, by field path (its number) and type: later cells of
    /// the same path and type go the same way without asking the catalog again (see
    /// [`Placed`]).
    placed: Vec<Vec<(ColType, Placed)>>,
}

/// Where cells of one path and type went, when that cannot change while the chunk loads: a
/// type's own column stays its column, and overflow stays overflow. A cell converted for a
/// column of another type is not remembered: whether an integer fits a double column exactly
/// depends on its value, and once one does not, the integer column made for it (perhaps by
/// another share of the chunk, with rows of its own) is where integers go from then on.
#[derive(Clone, Copy)]
enum Placed {
    Column(usize),
    Overflow,
}

impl TableRows {
    /// The column (by index) a cell goes to, with the cell converted for it where it must
    /// be; `None`: the overflow column. Asks the catalog only for what it cannot remember
    /// (see [`Placed`]).
    fn place(
        &mut self,
        catalog: &mut Catalog,
        paths: &Paths,
        path: PathId,
        cell: &Cell,
    ) -> Option<(usize, Option<Cell>)> {
        let t = cell.col_type();
        let known = self
            .placed
            .get(path as usize)
            .and_then(|seen| seen.iter().find(|(ct, _)| *ct == t))
            .map(|(_, placed)| *placed);
        match known {
            Some(Placed::Column(i)) => return Some((i, None)),
            Some(Placed::Overflow) => return None,
            None => {}
        }
        let (placed, answer) = match place_cell(catalog, &self.table_key, paths.text(path), cell) {
            Placement::Column(name, Some(converted)) => {
                return Some((self.column(&name), Some(converted)));
            }
            Placement::Column(name, None) => {
                let i = self.column(&name);
                (Placed::Column(i), Some((i, None)))
            }
            Placement::Overflow => (Placed::Overflow, None),
        };
        // The chunk's paths are all known once it is parsed: one slot for each.
        if self.placed.is_empty() {
            self.placed.resize_with(paths.field_count(), Vec::new);
        }
        self.placed[path as usize].push((t, placed));
        answer
    }

    fn column(&mut self, name: &str) -> usize {
        if let Some(i) = self.index.get(name) {
            return *i;
        }
        self.columns.push(name.to_owned());
        self.data.push(Vec::with_capacity(self.expected));
        self.index.insert(name.to_owned(), self.columns.len() - 1);
        self.columns.len() - 1
    }

    fn new(table_key: String, rows: usize) -> TableRows {
        TableRows {
            table_key,
            overflow: Vec::with_capacity(rows),
            seqs: Vec::with_capacity(rows),
            received: Vec::with_capacity(rows),
            stitch: Vec::with_capacity(rows),
            expected: rows,
            ..TableRows::default()
        }
    }

    fn len(&self) -> usize {
        self.seqs.len()
    }

    /// Adds a row: places its cells into columns; on PostgreSQL, values that would push the
    /// row past [`PG_ROW_BUDGET`] go to the overflow column instead of failing the row.
    fn push(
        &mut self,
        catalog: &mut Catalog,
        paths: &Paths,
        keys: impl Iterator<Item = Val>,
        cells: Vec<(PathId, Cell)>,
        from: RowSource,
    ) {
        let row = self.len();
        let budget = (catalog.dialect == Dialect::Postgres).then_some(PG_ROW_BUDGET);
        let mut size = 0usize;
        let mut overflow = serde_json::Map::new();
        for (path, cell) in cells {
            let Some((column, converted)) = self.place(catalog, paths, path, &cell) else {
                overflow.insert(path_segments(paths.text(path)).join("."), cell.to_json());
                continue;
            };
            let width = inline_width(converted.as_ref().unwrap_or(&cell));
            if budget.is_some_and(|b| size + width > b) {
                overflow.insert(path_segments(paths.text(path)).join("."), cell.to_json());
                continue;
            }
            size += width;
            // Padded to this row (or cut back to it: a later cell for the same column wins).
            let values = &mut self.data[column];
            values.resize(row, Val::Null);
            values.push(to_val(converted.unwrap_or(cell)));
        }
        if !overflow.is_empty() {
            let Catalog { tables, ddl, .. } = catalog;
            if let Some(info) = tables.get_mut(&self.table_key) {
                ensure_overflow(info, ddl, &self.table_key);
            }
        }
        for (i, value) in keys.enumerate() {
            if i == self.keys.len() {
                self.keys
                    .push(Vec::with_capacity(self.expected.max(row + 1)));
            }
            self.keys[i].push(value);
        }
        self.overflow
            .push((!overflow.is_empty()).then(|| serde_json::Value::Object(overflow).to_string()));
        self.seqs.push(from.seq);
        self.received.push(from.received);
        self.stitch.push(from.stitch);
    }

    /// Splits the rows in two: those `marks` (one per row) picks, and the others.
    fn split(mut self, marks: &[bool]) -> (TableRows, TableRows) {
        /// Moves the marked values out, in order; the others stay where they are.
        fn take<T>(values: &mut Vec<T>, marks: &[bool]) -> Vec<T> {
            let mut row = 0;
            values
                .extract_if(.., |_| {
                    row += 1;
                    marks.get(row - 1).copied().unwrap_or(false)
                })
                .collect()
        }
        let rows = self.len();
        let mut picked = TableRows {
            table_key: self.table_key.clone(),
            columns: self.columns.clone(),
            index: self.index.clone(),
            expected: self.expected,
            ..TableRows::default()
        };
        for column in &mut self.data {
            column.resize(rows, Val::Null);
            picked.data.push(take(column, marks));
        }
        for column in &mut self.keys {
            picked.keys.push(take(column, marks));
        }
        picked.overflow = take(&mut self.overflow, marks);
        picked.seqs = take(&mut self.seqs, marks);
        picked.received = take(&mut self.received, marks);
        picked.stitch = take(&mut self.stitch, marks);
        (picked, self)
    }

    /// Keeps only the rows whose sequence `keep` accepts.
    fn retain(&mut self, keep: impl Fn(i64) -> bool) {
        let dropped: Vec<bool> = self.seqs.iter().map(|s| !keep(*s)).collect();
        if dropped.contains(&true) {
            // The dropped rows are moved out; the kept ones stay in place.
            let (_, kept) = std::mem::take(self).split(&dropped);
            *self = kept;
        }
    }
}

/// The record a row comes from.
struct RowSource {
    seq: i64,
    received: Val,
    stitch: Option<(i64, Option<i64>)>,
}

/// How far a chunk was prepared before its transaction began.
pub enum Prepared {
    /// Parsed and flattened ([`parse_chunk`]).
    Parsed(ParsedChunk),
    /// Also checked and placed into rows, on the read-ahead thread while the chunk before
    /// was written. Used only if the transaction that writes it reads the same catalog as
    /// the one it was placed against.
    Placed(Box<PlacedAhead>),
}

/// A chunk placed against `base`, the catalog as the chunk before it left it.
pub struct PlacedAhead {
    pub base: Catalog,
    pub placed: PlacedChunk,
}

/// How [`load_chunk`] runs besides its records.
#[derive(Debug, Default)]
pub struct ChunkOptions {
    /// Receives the catalog as the chunk leaves it as soon as its schema changes are made, so
    /// that the next chunk can be placed while this one is written (not sent for a chunk with
    /// markers).
    pub next_catalog: Option<Sender<Catalog>>,
    /// The chunk failed before and is loaded again ([`crate::pass`]'s salvage): child rows
    /// are deleted for every root key written, also for keys not stored yet, whose child rows
    /// may have outlived a root row deleted by hand. A normal pass trusts that a key not
    /// stored has none, and a chunk that meets such rows fails into the salvage.
    pub salvaging: bool,
}

/// Loads `chunk` (in sequence order) for one table. Runs in the caller's transaction;
/// `writers`' helper connections (PostgreSQL) may each write a share of a large chunk in a
/// transaction of their own, and may still be writing when this returns (see
/// [`ShareWriters`]): the outcome counts only what the caller's transaction wrote.
/// An activate_version marker splits the chunk: the records before it are loaded, then the
/// table's older versions are removed, then the records after it are loaded.
/// `prepared` holds the chunk parsed (or placed) in order.
/// `options` says where to send the catalog for the next chunk and whether this is a salvage.
pub fn load_chunk(
    conn: &mut Conn<'_>,
    writers: &mut ShareWriters,
    (client_id, table): (i64, &str),
    chunk: &[Staged],
    prepared: Prepared,
    options: ChunkOptions,
) -> QueryResult<ChunkOutcome> {
    let ChunkOptions {
        next_catalog,
        salvaging,
    } = options;
    // Whether this transaction altered the root table (helpers would wait on it).
    let mut upgraded = false;
    let parsed = match prepared {
        Prepared::Parsed(parsed) => parsed,
        Prepared::Placed(ahead) => {
            let PlacedAhead { base, placed } = *ahead;
            let started = Instant::now();
            let (catalog, altered) = current_catalog(conn, client_id, table)?;
            upgraded = altered;
            if !upgraded && catalog.same_as(&base) {
                let writing = WriteChunk {
                    ids: (client_id, table),
                    chunk,
                    upgraded,
                    started,
                    ahead: true,
                    next_catalog: next_catalog.as_ref(),
                    salvaging,
                };
                return write_placed(conn, writers, writing, placed);
            }
            // The schema moved since (another loader, or a chunk that failed): place anew.
            log::debug!("client {client_id} table {table}: chunk placed ahead is placed again");
            parse_chunk(conn, client_id, table, chunk)?
        }
    };
    // A marker's deletes hold row locks in the caller's transaction that a helper could wait
    // on while the caller waits for the helper: such a chunk is written by one connection,
    // after the helpers have finished what they were given.
    let has_markers = chunk.iter().any(Staged::is_activation);
    let mut alone;
    let (writers, next_catalog) = if has_markers {
        writers.settle()?;
        alone = ShareWriters::none();
        (&mut alone, None)
    } else {
        (writers, next_catalog)
    };
    let mut outcome = ChunkOutcome::default();
    let mut rest = chunk;
    let ParsedChunk { paths, records } = parsed;
    let mut flat = records.into_iter();
    while !rest.is_empty() {
        let split = rest.iter().position(Staged::is_activation);
        if split == Some(0) {
            activate_version(conn, client_id, table, &rest[0])?;
            rest = &rest[1..];
            flat.next();
            continue;
        }
        let (records, after) = rest.split_at(split.unwrap_or(rest.len()));
        let parsed: Vec<Parsed> = flat.by_ref().take(records.len()).collect();
        let started = Instant::now();
        let (catalog, altered) = current_catalog(conn, client_id, table)?;
        upgraded |= altered;
        let placed = place_records(catalog, records, &paths, parsed, writers.count())?;
        let writing = WriteChunk {
            ids: (client_id, table),
            chunk: records,
            upgraded,
            started,
            ahead: false,
            next_catalog: next_catalog.as_ref(),
            salvaging,
        };
        let done = write_placed(conn, writers, writing, placed)?;
        outcome.loaded += done.loaded;
        outcome.rejected += done.rejected;
        rest = after;
    }
    Ok(outcome)
}

/// The table family's catalog as this transaction sees it, with the root table given the
/// Stitch system columns if it lacked them; and whether that altered the table.
fn current_catalog(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
) -> QueryResult<(Catalog, bool)> {
    let catalog = Catalog::load(conn, client_id, table)?;
    let altered = catalog.upgrade_root(conn)?;
    Ok((catalog, altered))
}

/// Applies an activate_version marker: rows of the table whose version is older than the
/// marker's (or that have none) go, with their child rows. The marker leaves staging.
fn activate_version(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    marker: &Staged,
) -> QueryResult<()> {
    let version = marker.stitch.as_ref().and_then(|m| m.table_version);
    let catalog = Catalog::load(conn, client_id, table)?;
    catalog.upgrade_root(conn)?;
    if let (Some(version), Some(root)) = (version, catalog.tables.get(EMPTY_PATH)) {
        let d = catalog.dialect;
        let root_ref = d.table_ref(client_id, &root.name);
        let removed = conn.execute(
            &format!(
                "DELETE FROM {root_ref} WHERE {v} IS NULL OR {v} < {}",
                d.placeholder(1),
                v = quote(VERSION_COLUMN),
            ),
            vec![Param::Int(Some(version))],
        )?;
        if removed > 0 {
            for (key, child) in &catalog.tables {
                if key == EMPTY_PATH {
                    continue;
                }
                let matches: Vec<String> = child
                    .key_columns
                    .iter()
                    .zip(&root.key_columns)
                    .map(|((c, _), (r, _))| format!("r.{} = c.{}", quote(r), quote(c)))
                    .collect();
                conn.execute(
                    &format!(
                        "DELETE FROM {} AS c WHERE NOT EXISTS (SELECT 1 FROM {root_ref} AS r WHERE {})",
                        d.table_ref(client_id, &child.name),
                        matches.join(" AND ")
                    ),
                    vec![],
                )?;
            }
        }
        log::info!(
            "client {client_id} table {table}: version {version} activated, {removed} rows of older versions removed"
        );
    }
    queue::delete_range(conn, client_id, table, marker.seq, marker.seq)?;
    Ok(())
}

/// A record parsed and flattened, or why it cannot be.
pub type Parsed = Result<FlatRecord, String>;

/// A chunk's records parsed and flattened, in order, with the paths they are numbered in.
pub struct ParsedChunk {
    pub paths: Paths,
    pub records: Vec<Parsed>,
}

/// Parses and flattens a chunk's records, typed by the table's Stitch schema if it has one.
/// Needs no lock: a loader does it for the next chunk while it writes the current one.
pub fn parse_chunk(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    chunk: &[Staged],
) -> QueryResult<ParsedChunk> {
    let declared = if chunk.iter().any(|s| s.stitch.is_some()) {
        SchemaTypes::load(conn, client_id, table)?
    } else {
        SchemaTypes::default()
    };
    Ok(flatten_all(chunk, &declared))
}

/// A chunk's records checked and placed into rows, share by share, ready to write. It
/// borrows nothing (rejected records are named by their index in the chunk), so that the
/// read-ahead thread can make it while the chunk before is written.
pub struct PlacedChunk {
    /// The catalog with this chunk's new tables and columns (pending, not yet made).
    catalog: Catalog,
    /// Tables (by array path) that existed before this chunk: only they can hold old rows.
    pre_existing: Vec<String>,
    parts: Vec<Share>,
    /// Records turned away, by index in the chunk, and why.
    rejected: Vec<(usize, String)>,
    accepted: usize,
    checks: Duration,
    placing: Duration,
}

/// Checks a chunk's records (no activate_version markers among them), keeps the newest
/// record per key, and places their cells into rows against `catalog`, which grows with new
/// tables and columns: CPU only, no database. `helpers` sets how many shares it is cut into.
pub fn place_records(
    mut catalog: Catalog,
    chunk: &[Staged],
    paths: &Paths,
    parsed: Vec<Parsed>,
    helpers: usize,
) -> QueryResult<PlacedChunk> {
    let started = Instant::now();
    let dialect = catalog.dialect;
    let mut rejected: Vec<(usize, String)> = Vec::new();
    let mut accepted: Vec<Accepted<'_>> = Vec::with_capacity(chunk.len());
    // The root's key fields as cell paths, once the root table is known (`None`: a field
    // no record of the chunk has).
    let mut key_paths: Vec<Option<PathId>> = Vec::new();
    for (index, (staged, flat)) in chunk.iter().zip(parsed).enumerate() {
        let flat = match flat {
            Ok(flat) => flat,
            Err(why) => {
                rejected.push((index, why));
                continue;
            }
        };
        if dialect == Dialect::Postgres && flat.has_nul {
            rejected.push((
                index,
                "holds a NUL character (\\u0000), which PostgreSQL text cannot store".into(),
            ));
            continue;
        }
        if !catalog.tables.contains_key(EMPTY_PATH) {
            match key_types(&flat, paths) {
                Ok(types) => catalog.create_root(&flat.keys, &types),
                Err(why) => {
                    rejected.push((index, why));
                    continue;
                }
            }
        }
        let Some(root) = catalog.tables.get(EMPTY_PATH) else {
            continue;
        };
        if key_paths.is_empty() {
            key_paths = root
                .key_fields
                .iter()
                .map(|f| paths.find_field(ROOT, f))
                .collect();
        }
        match key_values(&flat, root, &key_paths) {
            Ok(key_values) => accepted.push(Accepted {
                staged,
                flat,
                key_values,
            }),
            Err(why) => rejected.push((index, why)),
        }
    }
    let checks = started.elapsed();
    // Newest record per key wins within the chunk (see `Staged::supersedes`). Every key
    // belongs to one share of the chunk.
    let shares = share_count(dialect, helpers, accepted.len());
    let mut share_of: Vec<usize> = Vec::with_capacity(accepted.len());
    let mut newest: FxHashMap<KeyOf<'_>, usize> = FxHashMap::default();
    newest.reserve(accepted.len());
    for (i, a) in accepted.iter().enumerate() {
        let key = KeyOf(&a.key_values);
        share_of.push(share_for(&key, shares));
        let best = newest.entry(key).or_insert(i);
        if a.staged.supersedes(accepted[*best].staged) {
            *best = i;
        }
    }
    let mut candidates: Vec<usize> = newest.into_values().collect();
    candidates.sort_unstable();

    let pre_existing: Vec<String> = catalog
        .tables
        .iter()
        .filter(|(_, t)| t.exists)
        .map(|(k, _)| k.clone())
        .collect();
    let mut parts: Vec<Share> = (0..shares).map(|_| Share::default()).collect();
    for (i, a) in accepted.iter().enumerate() {
        parts[share_of[i]].seqs.push(a.staged.seq);
    }
    // Rows sized up front: a chunk's rows are large, and growing copied them over again.
    let mut roots_per_share = vec![0usize; shares];
    let mut children_per_share = vec![vec![0usize; paths.array_count()]; shares];
    for &i in &candidates {
        roots_per_share[share_of[i]] += 1;
        for child in &accepted[i].flat.children {
            children_per_share[share_of[i]][child.array as usize] += 1;
        }
    }
    for (part, roots) in parts.iter_mut().zip(roots_per_share) {
        part.root = TableRows::new(EMPTY_PATH.to_owned(), roots);
    }
    for &i in &candidates {
        let a = &mut accepted[i];
        let part = &mut parts[share_of[i]];
        let child_rows = &children_per_share[share_of[i]];
        let seq = a.staged.seq;
        let received = Val::Time(a.staged.received_at);
        // The cells move into the rows: text is most of a chunk's bytes.
        let mut cells = std::mem::take(&mut a.flat.root.cells);
        cells.retain(|(path, _)| !key_paths.contains(&Some(*path)));
        let from = RowSource {
            seq,
            received: received.clone(),
            stitch: a
                .staged
                .stitch
                .as_ref()
                .map(|m| (m.client_seq, m.table_version)),
        };
        part.root.push(
            &mut catalog,
            paths,
            a.key_values.iter().cloned(),
            cells,
            from,
        );
        for child in std::mem::take(&mut a.flat.children) {
            let table_key = paths.array_text(child.array);
            catalog.child_table(table_key, child.positions.len())?;
            let keys = a
                .key_values
                .iter()
                .cloned()
                .chain(child.positions.iter().map(|p| Val::Int(*p)));
            let from = RowSource {
                seq,
                received: received.clone(),
                stitch: None,
            };
            let rows = part.children.entry(child.array).or_insert_with(|| {
                TableRows::new(table_key.to_owned(), child_rows[child.array as usize])
            });
            rows.push(&mut catalog, paths, keys, child.row.cells, from);
        }
    }
    Ok(PlacedChunk {
        catalog,
        pre_existing,
        parts,
        rejected,
        accepted: accepted.len(),
        checks,
        placing: started.elapsed() - checks,
    })
}

/// What writing a placed chunk needs besides its rows.
struct WriteChunk<'a, 'c> {
    ids: (i64, &'a str),
    chunk: &'c [Staged],
    /// Whether this transaction altered the root table.
    upgraded: bool,
    started: Instant,
    /// Whether the chunk was placed ahead (for the log).
    ahead: bool,
    next_catalog: Option<&'a Sender<Catalog>>,
    /// See [`ChunkOptions::salvaging`].
    salvaging: bool,
}

/// Makes a placed chunk's schema changes, then writes its shares (handing all but the first
/// to the helpers where they can take them, see [`ShareWriters`]), its rejections, its
/// staging delete and its history row.
fn write_placed(
    conn: &mut Conn<'_>,
    writers: &mut ShareWriters,
    writing: WriteChunk<'_, '_>,
    placed: PlacedChunk,
) -> QueryResult<ChunkOutcome> {
    let WriteChunk {
        ids: (client_id, table),
        chunk,
        upgraded,
        started,
        ahead,
        next_catalog,
        salvaging,
    } = writing;
    let started_at = intake_core::timestamps::now();
    let PlacedChunk {
        mut catalog,
        pre_existing,
        parts,
        rejected,
        accepted,
        checks,
        placing,
    } = placed;
    let rejected: Vec<(&Staged, String)> = rejected
        .into_iter()
        .map(|(index, why)| (&chunk[index], why))
        .collect();
    let t_place = started.elapsed();
    let shares = parts.len();
    // Helpers cannot see (and would wait on) tables and columns this transaction creates;
    // and share i + 1 goes to helper i only while every chunk has one share per connection.
    // (A root table is upgraded only by its first chunk in a process, before any share of
    // its was handed out, so no helper can be waiting on that ALTER while this settles.)
    let parallel =
        shares > 1 && shares == writers.count() + 1 && catalog.ddl.is_empty() && !upgraded;
    if !parallel {
        writers.settle()?;
    }
    catalog.apply_ddl(conn)?;
    if let Some(next) = next_catalog {
        // The next chunk is placed against this while this chunk is written. Not sent
        // again: a receiver that is gone just means nobody reads ahead.
        let _ = next.send(catalog.clone());
    }
    let catalog = Arc::new(catalog);
    let pre_existing = Arc::new(pre_existing);
    let loaded_at = Val::Time(intake_core::timestamps::now());
    let writing = Writing {
        catalog: &catalog,
        pre_existing: &pre_existing,
        loaded_at: loaded_at.clone(),
        salvaging,
    };
    let mut parts = parts.into_iter();
    let mut seqs = Vec::new();
    let mut loaded = accepted;
    if parallel {
        let mine = parts.next().unwrap_or_default();
        for (helper, share) in parts.by_ref().enumerate() {
            let job = ShareJob {
                client_id,
                table: table.to_owned(),
                share,
                catalog: Arc::clone(&catalog),
                pre_existing: Arc::clone(&pre_existing),
                loaded_at: loaded_at.clone(),
                started_at,
                started,
            };
            writers.send(helper, job)?;
        }
        loaded = mine.seqs.len();
        seqs = mine.seqs;
        seqs.extend(rejected.iter().map(|(s, _)| s.seq));
        // Staging first, while the chunk's pages are likeliest still in the buffer cache.
        queue::delete_seqs(conn, client_id, table, &seqs)?;
        write_share(conn, &writing, mine.root, mine.children)?;
    } else {
        if let (Some(first), Some(last)) = (chunk.first(), chunk.last()) {
            seqs = vec![first.seq, last.seq];
            queue::delete_range(conn, client_id, table, first.seq, last.seq)?;
        }
        for part in parts {
            write_share(conn, &writing, part.root, part.children)?;
        }
    }
    record_rejections(conn, client_id, table, &rejected)?;
    if let (Some(&first), Some(&last)) = (seqs.iter().min(), seqs.iter().max()) {
        record_history(
            conn,
            client_id,
            table,
            started_at,
            started.elapsed().as_millis() as i64,
            loaded,
            rejected.len(),
            (first, last),
            None,
        )?;
    }
    log::debug!(
        "chunk of {}: key checks {checks:?}, place {placing:?}{}, write {:?} ({} shares{})",
        chunk.len(),
        if ahead { " (ahead)" } else { "" },
        started.elapsed() - t_place,
        shares,
        if parallel {
            ", the others handed to helpers"
        } else {
            ""
        },
    );
    Ok(ChunkOutcome {
        loaded,
        rejected: rejected.len(),
    })
}

/// Records per share below which a chunk is not split: splitting costs statements.
const MIN_SHARE_RECORDS: usize = 500;

/// Shares per writing connection (any beyond the first of each go to whichever connection is
/// free first; see [`ShareWriters`]). One: two per writer balanced the writers' ends when
/// rows went by `INSERT`, but with COPY the extra statements cost more than the waiting saved
/// (PostgreSQL 15 spends time per COPY statement in bookkeeping that grows with its rows up to
/// 1,000). Load bench, seven rounds in turns: 0.62–0.66x the baseline against 0.59–0.61x.
const SHARES_PER_WRITER: usize = 1;

/// How many shares a chunk of `records` is written in: [`SHARES_PER_WRITER`] per connection
/// available (PostgreSQL), as long as each gets at least [`MIN_SHARE_RECORDS`].
fn share_count(dialect: Dialect, helpers: usize, records: usize) -> usize {
    if dialect != Dialect::Postgres {
        return 1;
    }
    ((helpers + 1) * SHARES_PER_WRITER)
        .min(records / MIN_SHARE_RECORDS)
        .max(1)
}

/// The share a key belongs to: the same key, always the same share, so that its versions
/// are ordered within one transaction, and across chunks too, since share i always goes to
/// the same connection. (A split by position in the chunk, which would let each share's
/// staging delete read only its own stretch, sends a key's versions in consecutive chunks to
/// different connections: a helper a chunk behind then still holds the earlier version, and
/// a key new in it is taken for new again and collides. Tried; the failures were salvaged.)
fn share_for(key: &KeyOf<'_>, shares: usize) -> usize {
    let mut hasher = rustc_hash::FxHasher::default();
    key.hash(&mut hasher);
    (hasher.finish() % shares as u64) as usize
}

/// A record's key values as a map key. Key columns are integers, text or booleans
/// (`key_types`), which compare exactly; a float, never a key, would compare by its bits.
#[derive(Clone, Copy)]
struct KeyOf<'a>(&'a [Val]);

impl PartialEq for KeyOf<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.0.len() == other.0.len()
            && self.0.iter().zip(other.0).all(|(a, b)| match (a, b) {
                (Val::Float(x), Val::Float(y)) => x.to_bits() == y.to_bits(),
                _ => a == b,
            })
    }
}

impl Eq for KeyOf<'_> {}

impl Hash for KeyOf<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        for value in self.0 {
            std::mem::discriminant(value).hash(state);
            match value {
                Val::Null => {}
                Val::Int(i) => i.hash(state),
                Val::Float(f) => f.to_bits().hash(state),
                Val::Bool(b) => b.hash(state),
                Val::Text(s) | Val::Json(s) => s.hash(state),
                Val::Time(t) => t.hash(state),
            }
        }
    }
}

/// The rows of the keys one share holds (the root table's, and the child tables' by array
/// path), and the staged records they came from (including ones superseded within the chunk).
#[derive(Default)]
pub(crate) struct Share {
    pub root: TableRows,
    pub children: FxHashMap<ArrayId, TableRows>,
    pub seqs: Vec<i64>,
}

/// What every share's writes need.
pub(crate) struct Writing<'a> {
    pub catalog: &'a Catalog,
    /// Tables (by array path) that existed before this chunk: only they can hold old rows.
    pub pre_existing: &'a [String],
    pub loaded_at: Val,
    /// See [`ChunkOptions::salvaging`].
    pub salvaging: bool,
}

/// Writes one share: writes its root rows, removes the old child rows of the roots that
/// replaced stored ones, in every child table of the family, and inserts the new child rows.
/// A stored row is replaced only by a newer record. On PostgreSQL the share's keys are looked
/// up first, and rows whose key is not stored are inserted without `ON CONFLICT` (its
/// speculative insertion costs more than the lookup) and have no old child rows to remove,
/// unless the chunk is salvaged (see [`ChunkOptions::salvaging`]).
pub(crate) fn write_share(
    conn: &mut Conn<'_>,
    writing: &Writing<'_>,
    root_rows: TableRows,
    children: FxHashMap<ArrayId, TableRows>,
) -> QueryResult<()> {
    let catalog = writing.catalog;
    let Some(root) = catalog.tables.get(EMPTY_PATH) else {
        return Ok(());
    };
    let started = Instant::now();
    let roots = root_rows.len();
    // For the key lookup and the child-row deletes below.
    let planning = index_lookups_only(conn, true)?;
    let (stored_rows, new_rows) = split_by_stored_key(conn, writing, root, root_rows)?;
    let mut written = new_rows.seqs.clone();
    // Keys whose old child rows go, by key column as the deletes bind them.
    let mut replaced: Vec<Vec<Val>> = if writing.salvaging {
        new_rows.keys.clone()
    } else {
        Vec::new()
    };
    write_table(
        conn,
        catalog,
        root,
        new_rows,
        &writing.loaded_at,
        RowWrite::RootInsert,
    )?;
    let row_of: FxHashMap<i64, usize> = stored_rows
        .seqs
        .iter()
        .enumerate()
        .map(|(row, seq)| (*seq, row))
        .collect();
    // The key columns outlive the write, which takes the rows.
    let stored_keys = stored_rows.keys.clone();
    let winners = write_table(
        conn,
        catalog,
        root,
        stored_rows,
        &writing.loaded_at,
        RowWrite::RootUpsert,
    )?;
    let t_root = started.elapsed();
    let winner_rows: Vec<usize> = winners
        .iter()
        .filter_map(|s| row_of.get(s).copied())
        .collect();
    // Each row is a winner once.
    let winner_keys = stored_keys.into_iter().map(|mut column| {
        winner_rows
            .iter()
            .map(|&row| std::mem::replace(&mut column[row], Val::Null))
            .collect::<Vec<Val>>()
    });
    if replaced.is_empty() {
        replaced = winner_keys.collect();
    } else {
        for (column, mut more) in replaced.iter_mut().zip(winner_keys) {
            column.append(&mut more);
        }
    }
    written.extend(winners);
    let child_tables: Vec<&TableInfo> = writing
        .pre_existing
        .iter()
        .filter(|k| *k != EMPTY_PATH)
        .filter_map(|k| catalog.tables.get(k))
        .collect();
    if replaced.first().is_some_and(|keys| !keys.is_empty()) {
        for info in child_tables {
            delete_children(conn, catalog, root, info, &replaced)?;
        }
    }
    if planning {
        index_lookups_only(conn, false)?;
    }
    let t_deletes = started.elapsed();
    let written: FxHashSet<i64> = written.into_iter().collect();
    for mut rows in children.into_values() {
        let Some(info) = catalog.tables.get(&rows.table_key) else {
            continue;
        };
        rows.retain(|seq| written.contains(&seq));
        write_table(
            conn,
            catalog,
            info,
            rows,
            &writing.loaded_at,
            RowWrite::ChildInsert,
        )?;
    }
    log::debug!(
        "share of {} roots: root {:?}, child deletes {:?}, child inserts {:?}",
        roots,
        t_root,
        t_deletes - t_root,
        started.elapsed() - t_deletes
    );
    Ok(())
}

/// Splits a share's root rows into those whose key the root table holds already and the
/// others, on PostgreSQL (see [`write_share`]). SQLite checks the key on any insert and has no
/// speculative insertion to save, so there every row counts as stored. Keys above the largest
/// stored one are new (see [`largest_integer_key`]); the others are looked up through the
/// primary key's index, unless a sample of them finds nearly all stored (updates of earlier
/// records): then all of them go to the upsert, which inserts the few that are not.
fn split_by_stored_key(
    conn: &mut Conn<'_>,
    writing: &Writing<'_>,
    root: &TableInfo,
    rows: TableRows,
) -> QueryResult<(TableRows, TableRows)> {
    let d = writing.catalog.dialect;
    if d != Dialect::Postgres || rows.len() == 0 {
        return Ok((rows, TableRows::default()));
    }
    if !writing.pre_existing.iter().any(|k| k == EMPTY_PATH) {
        // Created by this chunk, whose shares hold other keys.
        return Ok((TableRows::default(), rows));
    }
    let table_ref = d.table_ref(writing.catalog.client_id, &root.name);
    // The rows whose key may be stored: all of them, or those not above the largest key.
    let candidates: Vec<usize> = match largest_integer_key(conn, root, &table_ref)? {
        Some(largest) => rows.keys[0]
            .iter()
            .enumerate()
            .filter(|(_, key)| !matches!(key, Val::Int(k) if largest.is_none_or(|l| *k > l)))
            .map(|(i, _)| i)
            .collect(),
        None => (0..rows.len()).collect(),
    };
    let mut stored = vec![false; rows.len()];
    if candidates.len() >= 2 * LOOKUP_SAMPLE {
        let step = candidates.len() / LOOKUP_SAMPLE;
        let sample: Vec<usize> = candidates
            .iter()
            .step_by(step)
            .take(LOOKUP_SAMPLE)
            .copied()
            .collect();
        let found = stored_among(conn, root, &table_ref, &rows.keys, &sample)?;
        if found.len() * 10 >= sample.len() * 9 {
            for &i in &candidates {
                stored[i] = true;
            }
            return Ok(rows.split(&stored));
        }
    }
    for i in stored_among(conn, root, &table_ref, &rows.keys, &candidates)? {
        stored[i] = true;
    }
    Ok(rows.split(&stored))
}

/// How many of a share's keys [`split_by_stored_key`] looks up first to tell whether looking
/// up the rest pays: it did not for the benchmark's updates (all stored; 4.6 µs a key, 5% of
/// PostgreSQL's time in the load's statements), and does for keys that are mostly new.
const LOOKUP_SAMPLE: usize = 64;

/// Which of the rows `among` (indexes into the key columns `keys`) have a key the root table
/// holds, by one statement through its primary key's index.
fn stored_among(
    conn: &mut Conn<'_>,
    root: &TableInfo,
    table_ref: &str,
    keys: &[Vec<Val>],
    among: &[usize],
) -> QueryResult<Vec<usize>> {
    if among.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<Vec<Val>> = keys
        .iter()
        .map(|column| among.iter().map(|&i| column[i].clone()).collect())
        .collect();
    let (arrays, params) = key_arrays(Dialect::Postgres, root, &keys);
    let (mut names, mut matches) = (Vec::new(), Vec::new());
    for (i, (column, _)) in root.key_columns.iter().enumerate() {
        names.push(format!("k{i}"));
        matches.push(format!("r.{} = u.k{i}", quote(column)));
    }
    let found: Vec<I64Row> = conn.load(
        &format!(
            "SELECT u.pos AS v FROM unnest({}) WITH ORDINALITY AS u({}, pos) \
             WHERE EXISTS (SELECT 1 FROM {table_ref} AS r WHERE {})",
            arrays.join(", "),
            names.join(", "),
            matches.join(" AND ")
        ),
        params,
    )?;
    // Positions count from 1.
    Ok(found
        .iter()
        .filter_map(|row| usize::try_from(row.v - 1).ok())
        .filter_map(|p| among.get(p).copied())
        .collect())
}

/// For a root table keyed by one integer column: its largest key (`Some(None)` if it holds
/// none), one step down the primary key's index. New records mostly bring keys above every
/// stored one (ids counting up), and those need no lookup: about 80% of the lookups in the
/// benchmark's data. Other keys (text, several columns) are all looked up.
fn largest_integer_key(
    conn: &mut Conn<'_>,
    root: &TableInfo,
    table_ref: &str,
) -> QueryResult<Option<Option<i64>>> {
    let [(column, ColType::BigInt)] = root.key_columns.as_slice() else {
        return Ok(None);
    };
    let column = quote(column);
    let largest: Vec<I64Row> = conn.load(
        &format!("SELECT {column} AS v FROM {table_ref} ORDER BY {column} DESC LIMIT 1"),
        [],
    )?;
    Ok(Some(largest.first().map(|r| r.v)))
}

/// Settings of a transaction that writes a chunk or a share (PostgreSQL): no synchronous
/// commit, which is safe as the warehouse rows and their staging delete commit together (a
/// commit lost in a crash loses both, and the records are simply loaded again), and spares an
/// fsync wait per chunk. SQLite's `BEGIN IMMEDIATE` already made its transaction the only
/// writer. A helper can only wait on the main connection, which may be waiting for it to
/// settle, through someone else's lock queued between them (an ALTER TABLE by hand, say); the
/// session's statement and lock timeouts (`database.statement_timeout_ms`) end that as a
/// retryable error.
pub(crate) fn chunk_session(conn: &mut Conn<'_>) -> QueryResult<()> {
    if let Conn::Pg(_) = conn {
        conn.execute("SET LOCAL synchronous_commit = off", [])?;
    }
    Ok(())
}

/// Bytes of column data a PostgreSQL row may take before further values go to the overflow
/// column: a heap row must fit in an 8 KB page, and short values cannot be moved out of line.
const PG_ROW_BUDGET: usize = 6000;

/// Roughly how many bytes a value takes inside a PostgreSQL row (long text is moved out of
/// line and leaves a pointer).
fn inline_width(cell: &Cell) -> usize {
    match cell {
        Cell::Bool(_) => 1,
        Cell::Int(_) | Cell::Float(_) | Cell::Time(..) => 8,
        Cell::Text(s) if s.len() > 2000 => 20,
        Cell::Text(s) => s.len() + 4,
    }
}

/// Parses and flattens every record of a chunk, on two threads for large chunks (each
/// numbering paths its own way until the second half is renumbered into the first's).
fn flatten_all(chunk: &[Staged], declared: &SchemaTypes) -> ParsedChunk {
    const PARALLEL_ABOVE: usize = 512;
    let flatten = |part: &[Staged]| {
        let mut paths = Paths::new();
        let records = part
            .iter()
            .map(|s| {
                let keys = s.stitch.as_ref().map(|m| m.key_names.as_str());
                let mut flat = flatten_with_keys(&s.record, keys, &mut paths)?;
                // The schema types Stitch records only: RJMetrics records are typed by their
                // values, whatever chunk they share.
                if s.stitch.is_some() {
                    declared.apply(&mut flat, &paths);
                    if flat.keys.is_empty() {
                        key_by_sequence(&mut flat, s.seq, &mut paths);
                    }
                }
                Ok(flat)
            })
            .collect::<Vec<_>>();
        ParsedChunk { paths, records }
    };
    if chunk.len() <= PARALLEL_ABOVE {
        return flatten(chunk);
    }
    let (first, second) = chunk.split_at(chunk.len() / 2);
    std::thread::scope(|scope| {
        let other = scope.spawn(|| flatten(second));
        let mut parsed = flatten(first);
        // A panic in the other half: redo it here, where it will surface normally.
        let rest = other.join().unwrap_or_else(|_| flatten(second));
        let renumbering = parsed.paths.merge(&rest.paths);
        parsed
            .records
            .extend(rest.records.into_iter().map(|mut record| {
                if let Ok(flat) = &mut record {
                    flat.renumber(&renumbering);
                }
                record
            }));
        parsed
    })
}

/// Gives a record of an append-only table (a Stitch batch without key names) its staging
/// sequence number as its key, in the field [`APPEND_ONLY_KEY`]: every record becomes a row
/// of its own. A field of that name in the data is replaced.
fn key_by_sequence(flat: &mut FlatRecord, seq: i64, paths: &mut Paths) {
    let path = paths.field(ROOT, APPEND_ONLY_KEY);
    flat.root.cells.retain(|(p, _)| *p != path);
    flat.root.cells.push((path, Cell::Int(seq)));
    flat.keys = vec![APPEND_ONLY_KEY.to_owned()];
}

/// Key column types for a new table, from the first record that declares its keys.
fn key_types(flat: &FlatRecord, paths: &Paths) -> Result<Vec<ColType>, String> {
    flat.keys
        .iter()
        .map(|k| match cell_at(flat, paths.find_field(ROOT, k)) {
            Some(Cell::Int(_)) => Ok(ColType::BigInt),
            Some(Cell::Text(_) | Cell::Time(..)) => Ok(ColType::Text),
            Some(Cell::Bool(_)) => Ok(ColType::Boolean),
            Some(Cell::Float(_)) => Err(format!("key field {k:?} is not an integer")),
            None => Err(format!("key field {k:?} is missing or null")),
        })
        .collect()
}

/// The root cell at `path`, if the record has one (`None`: a path no record has).
fn cell_at(flat: &FlatRecord, path: Option<PathId>) -> Option<&Cell> {
    let path = path?;
    flat.root
        .cells
        .iter()
        .find(|(p, _)| *p == path)
        .map(|(_, c)| c)
}

/// The record's key values in the table's key-column order, or why they do not fit.
/// `key_paths` are the paths of the table's key fields, in that order.
fn key_values(
    flat: &FlatRecord,
    root: &TableInfo,
    key_paths: &[Option<PathId>],
) -> Result<Vec<Val>, String> {
    // The same names, as sets: a handful at most, so no hashing.
    let within = |a: &[String], b: &[String]| a.iter().all(|name| b.contains(name));
    if !(within(&flat.keys, &root.key_fields) && within(&root.key_fields, &flat.keys)) {
        return Err(format!(
            "its keys {:?} differ from the table's primary key {:?}",
            flat.keys, root.key_fields
        ));
    }
    root.key_fields
        .iter()
        .zip(key_paths)
        .zip(&root.key_columns)
        .map(|((field, path), (_, t))| {
            let cell = cell_at(flat, *path)
                .ok_or_else(|| format!("key field {field:?} is missing or null"))?;
            cell.coerce_to(*t).map(to_val).ok_or_else(|| {
                format!(
                    "key field {field:?} is a {} here but the table's key column is {}",
                    cell.col_type().as_str(),
                    t.as_str()
                )
            })
        })
        .collect()
}

fn to_val(cell: Cell) -> Val {
    match cell {
        Cell::Int(i) => Val::Int(i),
        Cell::Float(f) => Val::Float(f),
        Cell::Bool(b) => Val::Bool(b),
        Cell::Text(s) => Val::Text(s),
        Cell::Time(t, _) => Val::Time(t),
    }
}

fn column_types(info: &TableInfo) -> FxHashMap<&str, ColType> {
    let mut types: FxHashMap<&str, ColType> = FxHashMap::default();
    for columns in info.columns.values() {
        for (t, name) in columns {
            if name != OVERFLOW_COLUMN {
                types.insert(name, *t);
            }
        }
    }
    if info.has_overflow() {
        types.insert(OVERFLOW_COLUMN, ColType::Json);
    }
    types
}

/// How [`write_table`] writes rows.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RowWrite {
    /// Child rows: inserted.
    ChildInsert,
    /// Root rows whose key is not stored: inserted.
    RootInsert,
    /// Root rows whose key may be stored: upserted, keeping the newer record.
    RootUpsert,
}

/// Writes a table's rows; an upsert returns the sequences of the rows it actually wrote. Plain
/// inserts go by binary COPY on PostgreSQL where the table's columns kept their types (see
/// [`crate::pg_copy`]).
fn write_table(
    conn: &mut Conn<'_>,
    catalog: &Catalog,
    info: &TableInfo,
    rows: TableRows,
    loaded_at: &Val,
    how: RowWrite,
) -> QueryResult<Vec<i64>> {
    let upsert = how == RowWrite::RootUpsert;
    let root = how != RowWrite::ChildInsert;
    let count = rows.len();
    if count == 0 {
        return Ok(Vec::new());
    }
    let TableRows {
        columns: names,
        data,
        keys,
        overflow,
        seqs,
        received,
        stitch,
        ..
    } = rows;
    let types = column_types(info);
    let has_overflow = overflow.iter().any(Option::is_some);
    let mut columns: Vec<(String, ColType)> = info.key_columns.clone();
    for name in names {
        let t = types.get(name.as_str()).copied().unwrap_or(ColType::Text);
        columns.push((name, t));
    }
    if has_overflow {
        columns.push((OVERFLOW_COLUMN.to_owned(), ColType::Json));
    }
    columns.push((SEQ_COLUMN.to_owned(), ColType::BigInt));
    columns.push((RECEIVED_COLUMN.to_owned(), ColType::Timestamp));
    if root {
        columns.push((CLIENT_SEQ_COLUMN.to_owned(), ColType::BigInt));
        columns.push((VERSION_COLUMN.to_owned(), ColType::BigInt));
    }
    let mut values: Vec<Vec<Val>> = Vec::with_capacity(columns.len());
    values.extend(keys);
    for mut column in data {
        column.resize(count, Val::Null);
        values.push(column);
    }
    if has_overflow {
        values.push(
            overflow
                .into_iter()
                .map(|o| o.map_or(Val::Null, Val::Json))
                .collect(),
        );
    }
    values.push(seqs.into_iter().map(Val::Int).collect());
    values.push(received);
    if root {
        let (client_seqs, versions) = stitch
            .into_iter()
            .map(|s| match s {
                Some((client_seq, version)) => {
                    (Val::Int(client_seq), version.map_or(Val::Null, Val::Int))
                }
                None => (Val::Null, Val::Null),
            })
            .unzip();
        values.push(client_seqs);
        values.push(versions);
    }
    let table_ref = catalog.dialect.table_ref(catalog.client_id, &info.name);
    let shared = [Shared {
        name: LOADED_COLUMN,
        col_type: ColType::Timestamp,
        value: loaded_at.clone(),
    }];
    if !upsert {
        if crate::pg_copy::types_unchanged(conn, &table_ref, &columns, &shared)? {
            return crate::pg_copy::copy_rows(conn, &table_ref, &columns, &shared, &values)
                .map(|_| Vec::new());
        }
        return insert_rows(conn, &table_ref, &columns, &shared, values, "", false);
    }
    let keys: Vec<&str> = info.key_columns.iter().map(|(n, _)| n.as_str()).collect();
    let written: FxHashSet<&str> = columns.iter().map(|(n, _)| n.as_str()).collect();
    let mut all_columns: Vec<&str> = types
        .keys()
        .copied()
        .filter(|n| !keys.contains(n))
        .collect();
    all_columns.sort_unstable();
    let mut sets: Vec<String> = all_columns
        .iter()
        .map(|n| {
            if written.contains(n) {
                format!("{} = excluded.{}", quote(n), quote(n))
            } else {
                format!("{} = NULL", quote(n))
            }
        })
        .collect();
    for system in [
        SEQ_COLUMN,
        RECEIVED_COLUMN,
        LOADED_COLUMN,
        CLIENT_SEQ_COLUMN,
        VERSION_COLUMN,
    ] {
        sets.push(format!("{} = excluded.{}", quote(system), quote(system)));
    }
    // `Staged::order` in SQL: (client sequence or 0, 1 for RJMetrics records, their commit
    // order), compared as row values.
    let order = |row: &str| {
        format!(
            "(COALESCE({row}.{cs}, 0), CASE WHEN {row}.{cs} IS NULL THEN 1 ELSE 0 END, \
              CASE WHEN {row}.{cs} IS NULL THEN {row}.{seq} ELSE 0 END)",
            cs = quote(CLIENT_SEQ_COLUMN),
            seq = quote(SEQ_COLUMN),
        )
    };
    let tail = format!(
        "ON CONFLICT ({}) DO UPDATE SET {} WHERE {} < {} RETURNING {} AS v",
        keys.iter().map(|k| quote(k)).collect::<Vec<_>>().join(", "),
        sets.join(", "),
        order("t"),
        order("excluded"),
        quote(SEQ_COLUMN),
    );
    insert_rows(conn, &table_ref, &columns, &shared, values, &tail, true)
}

/// Makes PostgreSQL find rows by their key through the index, whatever its statistics say
/// (`on`), or lets it plan freely again (`off`); returns whether it applies here. A child
/// table that grew since it was last analyzed (always, while a large backlog loads) is
/// otherwise read whole, and hash-joined with the chunk's keys, on every chunk: a cost that
/// grows with the table. Scoped to the transaction, and switched off after use.
fn index_lookups_only(conn: &mut Conn<'_>, on: bool) -> QueryResult<bool> {
    if conn.dialect() != Dialect::Postgres {
        return Ok(false);
    }
    let value = if on { "off" } else { "DEFAULT" };
    let statements: Vec<String> = ["enable_seqscan", "enable_hashjoin", "enable_mergejoin"]
        .iter()
        .map(|name| format!("SET LOCAL {name} TO {value};"))
        .collect();
    conn.batch(&statements.join(" "))?;
    Ok(true)
}

/// The root table's key values (`keys`, a vector per key column) as PostgreSQL array
/// parameters `$1`, `$2`, ...: the placeholders, cast to the columns' types, and the values.
fn key_arrays(d: Dialect, root: &TableInfo, keys: &[Vec<Val>]) -> (Vec<String>, Vec<Param>) {
    root.key_columns
        .iter()
        .enumerate()
        .map(|(i, (_, t))| {
            let values = keys.get(i).cloned().unwrap_or_default();
            (
                format!("${}::{}[]", i + 1, d.sql_type(*t)),
                crate::bulk::column_param(values, *t),
            )
        })
        .unzip()
}

/// Deletes the child rows of the root records just replaced, by their key values (so the
/// child table's primary key index finds them; no scan).
fn delete_children(
    conn: &mut Conn<'_>,
    catalog: &Catalog,
    root: &TableInfo,
    child: &TableInfo,
    winner_keys: &[Vec<Val>],
) -> QueryResult<usize> {
    let d = catalog.dialect;
    let width = root.key_columns.len();
    let child_keys: Vec<String> = child
        .key_columns
        .iter()
        .take(width)
        .map(|(n, _)| quote(n))
        .collect();
    let (condition, params) = match d {
        Dialect::Postgres => {
            let (arrays, params) = key_arrays(d, root, winner_keys);
            let condition = if let [only] = arrays.as_slice() {
                // One key column (the usual case): `= ANY` walks the index once for the
                // whole array, about three times faster than a semi-join.
                format!("{} = ANY({only})", child_keys[0])
            } else {
                let unnested: Vec<String> = arrays.iter().map(|a| format!("unnest({a})")).collect();
                format!(
                    "({}) IN (SELECT {})",
                    child_keys.join(", "),
                    unnested.join(", ")
                )
            };
            (condition, params)
        }
        Dialect::Sqlite => {
            let picks: Vec<String> = (0..width)
                .map(|i| format!("json_extract(value, '$[{i}]')"))
                .collect();
            let rows = winner_keys.first().map_or(0, Vec::len);
            let tuples: Vec<serde_json::Value> = (0..rows)
                .map(|row| {
                    serde_json::Value::Array(
                        winner_keys
                            .iter()
                            .map(|column| crate::bulk::key_json(&column[row]))
                            .collect(),
                    )
                })
                .collect();
            (
                format!(
                    "({}) IN (SELECT {} FROM json_each(?1))",
                    child_keys.join(", "),
                    picks.join(", ")
                ),
                vec![Param::Text(Some(
                    serde_json::Value::Array(tuples).to_string(),
                ))],
            )
        }
    };
    conn.execute(
        &format!(
            "DELETE FROM {} WHERE {condition}",
            d.table_ref(catalog.client_id, &child.name),
        ),
        params,
    )
}

/// Keeps rejected records, with the reason and the record as received.
pub fn record_rejections(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    rejected: &[(&Staged, String)],
) -> QueryResult<()> {
    if rejected.is_empty() {
        return Ok(());
    }
    let d = conn.dialect();
    let now = intake_core::timestamps::now();
    let columns: Vec<(String, ColType)> = [
        ("seq", ColType::BigInt),
        ("received_at", ColType::Timestamp),
        ("reason", ColType::Text),
        ("record", ColType::Text),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), *t))
    .collect();
    let shared = [
        Shared {
            name: "table_name",
            col_type: ColType::Text,
            value: Val::Text(table.to_owned()),
        },
        Shared {
            name: "rejected_at",
            col_type: ColType::Timestamp,
            value: Val::Time(now),
        },
    ];
    let columns_data = vec![
        rejected.iter().map(|(s, _)| Val::Int(s.seq)).collect(),
        rejected
            .iter()
            .map(|(s, _)| Val::Time(s.received_at))
            .collect(),
        rejected
            .iter()
            .map(|(_, why)| Val::Text(why.clone()))
            .collect(),
        rejected
            .iter()
            .map(|(s, _)| Val::Text(s.record.replace('\0', "\\u0000")))
            .collect(),
    ];
    insert_rows(
        conn,
        &d.table_ref(client_id, REJECTED_TABLE),
        &columns,
        &shared,
        columns_data,
        "ON CONFLICT DO NOTHING",
        false,
    )?;
    Ok(())
}

/// Appends a row to the client's load history.
#[allow(clippy::too_many_arguments)]
pub fn record_history(
    conn: &mut Conn<'_>,
    client_id: i64,
    table: &str,
    started_at: chrono::DateTime<chrono::Utc>,
    duration_ms: i64,
    loaded: usize,
    rejected: usize,
    seqs: (i64, i64),
    error: Option<&str>,
) -> QueryResult<()> {
    let d = conn.dialect();
    let ph: Vec<String> = (1..=8).map(|i| d.placeholder(i)).collect();
    conn.execute(
        &format!(
            "INSERT INTO {} (table_name, started_at, duration_ms, records_loaded, records_rejected, first_seq, last_seq, error) \
             VALUES ({})",
            d.table_ref(client_id, HISTORY_TABLE),
            ph.join(", ")
        ),
        &[
            Param::Text(Some(table.to_owned())),
            Param::Time(Some(started_at)),
            Param::Int(Some(duration_ms)),
            Param::Int(Some(loaded as i64)),
            Param::Int(Some(rejected as i64)),
            Param::Int(Some(seqs.0)),
            Param::Int(Some(seqs.1)),
            Param::Text(error.map(str::to_owned)),
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_of(key: KeyOf<'_>) -> u64 {
        let mut hasher = rustc_hash::FxHasher::default();
        key.hash(&mut hasher);
        hasher.finish()
    }

    #[test]
    fn key_values_match_by_value_and_type() {
        let a = [Val::Int(1), Val::Text("x".into())];
        let same = [Val::Int(1), Val::Text("x".into())];
        assert!(KeyOf(&a) == KeyOf(&same));
        assert_eq!(hash_of(KeyOf(&a)), hash_of(KeyOf(&same)));
        for other in [
            vec![Val::Int(1), Val::Text("y".into())],
            vec![Val::Text("1".into()), Val::Text("x".into())],
            vec![Val::Int(1)],
        ] {
            assert!(KeyOf(&a) != KeyOf(&other), "{other:?}");
        }
        // The same key always lands in the same share.
        for shares in 1..5 {
            assert_eq!(
                share_for(&KeyOf(&a), shares),
                share_for(&KeyOf(&same), shares)
            );
            assert!(share_for(&KeyOf(&a), shares) < shares);
        }
    }
}

#[cfg(test)]
mod flatten_all_tests {
    use super::*;

    /// Each cell as (table text, path text, cell), so records numbered in different tables of
    /// paths can be compared.
    fn cells_by_text(flat: &FlatRecord, paths: &Paths) -> Vec<(String, String, Cell)> {
        let mut all: Vec<(String, String, Cell)> = flat
            .root
            .cells
            .iter()
            .map(|(p, c)| (EMPTY_PATH.to_owned(), paths.text(*p).to_owned(), c.clone()))
            .collect();
        for child in &flat.children {
            let table = paths.array_text(child.array).to_owned();
            for (p, c) in &child.row.cells {
                all.push((table.clone(), paths.text(*p).to_owned(), c.clone()));
            }
        }
        all
    }

    #[test]
    fn a_chunk_parsed_in_two_halves_reads_as_each_record_alone() {
        // Shapes that differ between the halves, so that the second half numbers its paths in
        // another order and has paths the first half never saw.
        let chunk: Vec<Staged> = (0..1200i64)
            .map(|i| {
                let record = if i < 600 {
                    format!(r#"{{"keys": ["id"], "id": {i}, "a": {{"b": {i}}}, "list": [{{"x": 1}}]}}"#)
                } else {
                    format!(
                        r#"{{"keys": ["id"], "zz": "late", "id": {i}, "list": [{{"y": [true]}}], "a": {{"c": "{i}"}}}}"#
                    )
                };
                Staged {
                    seq: i,
                    received_at: chrono::Utc::now(),
                    record,
                    stitch: None,
                }
            })
            .collect();
        let parsed = flatten_all(&chunk, &SchemaTypes::default());
        assert_eq!(parsed.records.len(), chunk.len());
        for (staged, record) in chunk.iter().zip(&parsed.records) {
            let mut alone_paths = Paths::new();
            let alone =
                flatten_with_keys(&staged.record, None, &mut alone_paths).expect("flattens");
            let together = record.as_ref().expect("flattens");
            assert_eq!(
                cells_by_text(together, &parsed.paths),
                cells_by_text(&alone, &alone_paths),
                "record {}",
                staged.seq
            );
        }
    }
}
