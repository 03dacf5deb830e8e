//! A client's warehouse catalog: which tables exist, their key columns, and which column holds
//! each (field path, value type). It is read at the start of every chunk (under the table's
//! load lock, so it is authoritative) and evolved as new fields and types arrive; every new
//! table and column is recorded in `_intake_tables` / `_intake_columns`.

use std::collections::HashSet;

use diesel::QueryResult;
use diesel::prelude::*;
use diesel::sql_types::Text;
use rustc_hash::FxHashMap;

use crate::dialect::{Dialect, namespace};
use crate::flatten::{EMPTY_PATH, path_key, path_segments};
use crate::identifiers::{self, SYSTEM_PREFIX, quote};
use crate::sql::{Conn, Param};
use crate::value_types::{Cell, ColType};

/// Above this many columns, new fields of a table go into its JSON overflow column.
pub const MAX_COLUMNS: usize = 1500;
pub const SEQ_COLUMN: &str = "_intake_seq";
pub const RECEIVED_COLUMN: &str = "_intake_received_at";
pub const LOADED_COLUMN: &str = "_intake_loaded_at";
pub const OVERFLOW_COLUMN: &str = "_intake_overflow";
/// Root tables: the Stitch client's `sequence` of the stored record (NULL for RJMetrics
/// records, which count as 0 when versions of a key are compared).
pub const CLIENT_SEQ_COLUMN: &str = "_intake_client_seq";
/// The key field of an append-only table (a Stitch batch without key names): the record's
/// staging sequence number. Stitch names its own such column the same way.
pub const APPEND_ONLY_KEY: &str = "__sdc_primary_key";
/// Root tables: the Stitch `table_version` the row belongs to (full-table replication).
pub const VERSION_COLUMN: &str = "_intake_table_version";
/// Per-client system tables.
pub const TABLES_TABLE: &str = "_intake_tables";
pub const COLUMNS_TABLE: &str = "_intake_columns";
pub const HISTORY_TABLE: &str = "_intake_load_history";
pub const REJECTED_TABLE: &str = "_intake_rejected";

/// A warehouse table of one pushed table family (the root or one of its child tables).
#[derive(Debug, Clone, PartialEq)]
pub struct TableInfo {
    /// Physical name inside the client's namespace.
    pub name: String,
    /// Where the table's rows come from (see [`source_text`]).
    pub source: String,
    /// Key columns: the root's declared keys, or for a child table the root keys
    /// (`_intake_root_<key>`) then the element positions (`_intake_pos_<level>`).
    pub key_columns: Vec<(String, ColType)>,
    /// For a root table, the declared key field names in key-column order.
    pub key_fields: Vec<String>,
    /// Field path (JSON text) → its columns by value type; the first is the path's "home"
    /// column, the others its typed siblings.
    pub columns: FxHashMap<String, Vec<(ColType, String)>>,
    /// Every column name in use, system columns included, with its type.
    pub used: FxHashMap<String, ColType>,
    /// Whether the `_intake_overflow` column exists (or is being added by this chunk).
    pub overflow: bool,
    pub exists: bool,
}

impl TableInfo {
    fn new(
        name: String,
        source: String,
        key_columns: Vec<(String, ColType)>,
        exists: bool,
    ) -> TableInfo {
        let mut used: FxHashMap<String, ColType> = FxHashMap::default();
        for (system, t) in [
            (SEQ_COLUMN, ColType::BigInt),
            (RECEIVED_COLUMN, ColType::Timestamp),
            (LOADED_COLUMN, ColType::Timestamp),
            (OVERFLOW_COLUMN, ColType::Json),
            (CLIENT_SEQ_COLUMN, ColType::BigInt),
            (VERSION_COLUMN, ColType::BigInt),
        ] {
            used.insert(system.to_owned(), t);
        }
        for (n, t) in &key_columns {
            used.insert(n.clone(), *t);
        }
        TableInfo {
            name,
            source,
            key_columns,
            key_fields: Vec::new(),
            columns: FxHashMap::default(),
            used,
            overflow: false,
            exists,
        }
    }

    /// Whether the overflow column exists (or is being added by this chunk).
    pub fn has_overflow(&self) -> bool {
        self.overflow
    }
}

/// Columns or tables that the current chunk must create before writing.
#[derive(Debug, Default, Clone)]
pub struct PendingDdl {
    /// Array paths (family keys) of new tables.
    pub new_tables: Vec<String>,
    pub new_columns: Vec<NewColumn>,
}

impl PendingDdl {
    pub fn is_empty(&self) -> bool {
        self.new_tables.is_empty() && self.new_columns.is_empty()
    }
}

/// A catalog entry to record, and the column to add if it is a new one.
#[derive(Debug, Clone)]
pub struct NewColumn {
    pub table_key: String,
    pub column: String,
    pub value_type: ColType,
    /// Source path as JSON; `None` for the overflow column itself, which holds many paths
    /// (each recorded separately when it is first sent there).
    pub path: Option<String>,
    /// Whether the column must be added (false for key columns, made with the table, and for
    /// paths mapped into the existing overflow column).
    pub add: bool,
}

#[derive(QueryableByName)]
struct TableRow {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    source: String,
    #[diesel(sql_type = Text)]
    key_columns: String,
}

#[derive(QueryableByName)]
struct ColumnRow {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    source_path: String,
    #[diesel(sql_type = Text)]
    value_type: String,
    #[diesel(sql_type = Text)]
    column_name: String,
}

/// What a chunk needs to know about one pushed table and its child tables.
#[derive(Debug, Clone)]
pub struct Catalog {
    pub client_id: i64,
    pub dialect: Dialect,
    pub table: String,
    /// By array path (JSON text; the root is `[]`).
    pub tables: FxHashMap<String, TableInfo>,
    /// Every physical table name of the client (all families), to avoid collisions.
    pub taken_names: HashSet<String>,
    pub ddl: PendingDdl,
}

/// Prefix of a child table's element-position key columns.
pub const POSITION_PREFIX: &str = "_intake_pos_";

/// The `_intake_tables.source` of a table: the pushed table's name, then for a child table
/// one path per array level (`["orders",["items"],["tags"]]`), as JSON.
pub fn source_text(table: &str, array_path: &str) -> String {
    let table = serde_json::to_string(table).unwrap_or_default();
    match array_path.strip_prefix('[').filter(|rest| *rest != "]") {
        Some(levels) => format!("[{table},{levels}"),
        None => format!("[{table}]"),
    }
}

/// The array path of the table enclosing a child table's array (`[]` for the root).
fn parent_array_path(array_path: &str) -> String {
    let mut levels: Vec<serde_json::Value> = serde_json::from_str(array_path).unwrap_or_default();
    levels.pop();
    serde_json::to_string(&levels).unwrap_or_else(|_| EMPTY_PATH.to_owned())
}

/// Every field name along an array path, for naming its table.
fn array_path_names(array_path: &str) -> Vec<String> {
    let levels: Vec<Vec<String>> = serde_json::from_str(array_path).unwrap_or_default();
    levels.into_iter().flatten().collect()
}

/// Creates the client's namespace and system tables if they do not exist yet.
pub fn ensure_namespace(conn: &mut Conn<'_>, client_id: i64) -> QueryResult<()> {
    let d = conn.dialect();
    let t = |name: &str| d.table_ref(client_id, name);
    let ts = d.sql_type(ColType::Timestamp);
    let big = d.sql_type(ColType::BigInt);
    let id = match d {
        Dialect::Postgres => "bigserial PRIMARY KEY",
        Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
    };
    let mut sql = String::new();
    if d == Dialect::Postgres {
        sql.push_str(&format!(
            "CREATE SCHEMA IF NOT EXISTS {};",
            quote(&namespace(client_id))
        ));
    }
    sql.push_str(&format!(
        "CREATE TABLE IF NOT EXISTS {tables} (table_name TEXT PRIMARY KEY NOT NULL, source TEXT NOT NULL, \
           parent TEXT, key_columns TEXT NOT NULL, created_at {ts} NOT NULL);\
         CREATE TABLE IF NOT EXISTS {columns} (id {id}, table_name TEXT NOT NULL, source_path TEXT NOT NULL, \
           value_type TEXT NOT NULL, column_name TEXT NOT NULL, created_at {ts} NOT NULL, \
           UNIQUE (table_name, source_path, value_type));\
         CREATE TABLE IF NOT EXISTS {history} (id {id}, table_name TEXT NOT NULL, started_at {ts} NOT NULL, \
           duration_ms {big} NOT NULL, records_loaded {big} NOT NULL, records_rejected {big} NOT NULL, \
           first_seq {big}, last_seq {big}, error TEXT);\
         CREATE TABLE IF NOT EXISTS {rejected} (table_name TEXT NOT NULL, seq {big} NOT NULL, \
           received_at {ts} NOT NULL, rejected_at {ts} NOT NULL, reason TEXT NOT NULL, record TEXT NOT NULL, \
           PRIMARY KEY (table_name, seq));",
        tables = t(TABLES_TABLE),
        columns = t(COLUMNS_TABLE),
        history = t(HISTORY_TABLE),
        rejected = t(REJECTED_TABLE),
    ));
    conn.batch(&sql)?;
    let ph = d.placeholder(1);
    conn.execute(
        &format!("INSERT INTO warehouse_clients (client_id) VALUES ({ph}) ON CONFLICT (client_id) DO NOTHING"),
        vec![Param::Int(Some(client_id))],
    )?;
    Ok(())
}

impl Catalog {
    /// Whether two catalogs describe the same tables and columns, with nothing pending:
    /// rows placed against one are placed as they would be against the other.
    pub fn same_as(&self, other: &Catalog) -> bool {
        self.ddl.is_empty()
            && other.ddl.is_empty()
            && self.client_id == other.client_id
            && self.dialect == other.dialect
            && self.table == other.table
            && self.tables == other.tables
            && self.taken_names == other.taken_names
    }

    /// Reads the catalog entries of one pushed table's family.
    pub fn load(conn: &mut Conn<'_>, client_id: i64, table: &str) -> QueryResult<Catalog> {
        let dialect = conn.dialect();
        let tables: Vec<TableRow> = conn.load(
            &format!(
                "SELECT table_name, source, key_columns FROM {}",
                dialect.table_ref(client_id, TABLES_TABLE)
            ),
            [],
        )?;
        let taken_names = tables.iter().map(|t| t.table_name.clone()).collect();
        let mut family: FxHashMap<String, TableInfo> = FxHashMap::default();
        let mut by_name: FxHashMap<String, String> = FxHashMap::default();
        for row in tables {
            let source: Vec<serde_json::Value> =
                serde_json::from_str(&row.source).unwrap_or_default();
            if source.first().and_then(|t| t.as_str()) != Some(table) {
                continue;
            }
            let stored: Vec<(String, String)> =
                serde_json::from_str(&row.key_columns).unwrap_or_default();
            let key_columns: Vec<(String, ColType)> = stored
                .into_iter()
                .filter_map(|(n, t)| ColType::parse(&t).map(|t| (n, t)))
                .collect();
            let key = serde_json::to_string(&source[1..]).unwrap_or_else(|_| EMPTY_PATH.to_owned());
            by_name.insert(row.table_name.clone(), key.clone());
            family.insert(
                key,
                TableInfo::new(row.table_name, row.source, key_columns, true),
            );
        }
        if !by_name.is_empty() {
            let names: Vec<Option<String>> = by_name.keys().cloned().map(Some).collect();
            let columns: Vec<ColumnRow> = conn.load(
                &format!(
                    "SELECT table_name, source_path, value_type, column_name FROM {} \
                     WHERE table_name IN ({}) ORDER BY id",
                    dialect.table_ref(client_id, COLUMNS_TABLE),
                    dialect.list_param(1, ColType::Text)
                ),
                vec![Param::TextArray(names)],
            )?;
            for c in columns {
                let Some(info) = by_name.get(&c.table_name).and_then(|k| family.get_mut(k)) else {
                    continue;
                };
                let Some(t) = ColType::parse(&c.value_type) else {
                    continue;
                };
                if c.column_name == OVERFLOW_COLUMN {
                    info.overflow = true;
                } else {
                    info.used.insert(c.column_name.clone(), t);
                }
                info.columns
                    .entry(c.source_path)
                    .or_default()
                    .push((t, c.column_name));
            }
        }
        // Key field names of the root, recovered from its key columns' paths.
        if let Some(root) = family.get_mut(EMPTY_PATH) {
            let mut fields = Vec::new();
            for (col, _) in &root.key_columns {
                let field = root
                    .columns
                    .iter()
                    .find(|(_, cols)| cols.first().is_some_and(|(_, c)| c == col))
                    .and_then(|(path, _)| path_segments(path).into_iter().next());
                fields.push(field.unwrap_or_default());
            }
            root.key_fields = fields;
        }
        Ok(Catalog {
            client_id,
            dialect,
            table: table.to_owned(),
            tables: family,
            taken_names,
            ddl: PendingDdl::default(),
        })
    }

    /// Physical name for a new table at `array_path` (`[]` for the root), unique among the
    /// client's tables: `<table>__<field>...`, or with a hash suffix when that is taken (an
    /// array inside an object and one inside array elements can share field names).
    fn allocate_table_name(&mut self, array_path: &str) -> String {
        let mut names = vec![self.table.clone()];
        names.extend(array_path_names(array_path));
        let preferred = identifiers::preferred_name(&names);
        let taken = &self.taken_names;
        let name = if taken.contains(&preferred) || preferred.starts_with(SYSTEM_PREFIX) {
            unused_hashed(&preferred, &[source_text(&self.table, array_path)], |n| {
                taken.contains(n)
            })
        } else {
            preferred
        };
        self.taken_names.insert(name.clone());
        name
    }

    /// Creates (in the catalog; DDL follows) the root table with the given key fields.
    pub fn create_root(&mut self, key_fields: &[String], key_types: &[ColType]) {
        let name = self.allocate_table_name(EMPTY_PATH);
        let mut info = TableInfo::new(
            name,
            source_text(&self.table, EMPTY_PATH),
            Vec::new(),
            false,
        );
        info.key_fields = key_fields.to_vec();
        let mut key_columns = Vec::new();
        for (field, t) in key_fields.iter().zip(key_types) {
            let path = path_key(std::slice::from_ref(field));
            let col = assign_column(&mut info, &path, *t, &mut self.ddl, EMPTY_PATH, true);
            key_columns.push((col, *t));
        }
        info.key_columns = key_columns;
        self.ddl.new_tables.push(EMPTY_PATH.to_owned());
        self.tables.insert(EMPTY_PATH.to_owned(), info);
    }

    /// The child table for an array path (see [`crate::flatten::ChildRow::array`]), with
    /// `levels` enclosing arrays, created in the catalog if new. Its key in the family is the
    /// array path.
    pub fn child_table(&mut self, array_path: &str, levels: usize) -> QueryResult<()> {
        if !self.tables.contains_key(array_path) {
            let key = array_path.to_owned();
            let root = self
                .tables
                .get(EMPTY_PATH)
                .ok_or(diesel::result::Error::NotFound)?;
            let mut key_columns: Vec<(String, ColType)> = root
                .key_columns
                .iter()
                .map(|(col, t)| (fit_system_name(&format!("_intake_root_{col}"), col), *t))
                .collect();
            for level in 0..levels {
                key_columns.push((format!("{POSITION_PREFIX}{level}"), ColType::BigInt));
            }
            let name = self.allocate_table_name(array_path);
            let source = source_text(&self.table, array_path);
            self.ddl.new_tables.push(key.clone());
            self.tables.insert(
                key.clone(),
                TableInfo::new(name, source, key_columns, false),
            );
        }
        Ok(())
    }

    /// Writes pending DDL and catalog rows.
    pub fn apply_ddl(&mut self, conn: &mut Conn<'_>) -> QueryResult<()> {
        let d = self.dialect;
        let client = self.client_id;
        for key in std::mem::take(&mut self.ddl.new_tables) {
            let Some(info) = self.tables.get_mut(&key) else {
                continue;
            };
            let ts = d.sql_type(ColType::Timestamp);
            let mut cols: Vec<String> = info
                .key_columns
                .iter()
                .map(|(n, t)| format!("{} {} NOT NULL", quote(n), d.sql_type(*t)))
                .collect();
            cols.push(format!(
                "{} {} NOT NULL",
                quote(SEQ_COLUMN),
                d.sql_type(ColType::BigInt)
            ));
            cols.push(format!("{} {ts} NOT NULL", quote(RECEIVED_COLUMN)));
            cols.push(format!("{} {ts} NOT NULL", quote(LOADED_COLUMN)));
            if key == EMPTY_PATH {
                for system in [CLIENT_SEQ_COLUMN, VERSION_COLUMN] {
                    cols.push(format!("{} {}", quote(system), d.sql_type(ColType::BigInt)));
                }
            }
            let pk: Vec<String> = info.key_columns.iter().map(|(n, _)| quote(n)).collect();
            conn.batch(&format!(
                "CREATE TABLE {} ({}, PRIMARY KEY ({}))",
                d.table_ref(client, &info.name),
                cols.join(", "),
                pk.join(", ")
            ))?;
            let parent =
                (key != EMPTY_PATH).then(|| source_text(&self.table, &parent_array_path(&key)));
            let key_columns: Vec<(String, &str)> = info
                .key_columns
                .iter()
                .map(|(n, t)| (n.clone(), t.as_str()))
                .collect();
            let ph: Vec<String> = (1..=4).map(|i| d.placeholder(i)).collect();
            conn.execute(
                &format!(
                    "INSERT INTO {} (table_name, source, parent, key_columns, created_at) VALUES ({}, {})",
                    d.table_ref(client, TABLES_TABLE),
                    ph.join(", "),
                    d.now()
                ),
                vec![
                    Param::Text(Some(info.name.clone())),
                    Param::Text(Some(info.source.clone())),
                    Param::Text(parent),
                    Param::Text(Some(serde_json::to_string(&key_columns).unwrap_or_default())),
                ],
            )?;
            info.exists = true;
        }
        let mut additions: FxHashMap<String, Vec<String>> = FxHashMap::default();
        for NewColumn {
            table_key,
            column,
            value_type: t,
            path,
            add,
        } in std::mem::take(&mut self.ddl.new_columns)
        {
            let Some(info) = self.tables.get(&table_key) else {
                continue;
            };
            let is_key = info.key_columns.iter().any(|(n, _)| *n == column);
            if add && !is_key {
                additions
                    .entry(table_key.clone())
                    .or_default()
                    .push(format!("ADD COLUMN {} {}", quote(&column), d.sql_type(t)));
            }
            let Some(path) = path else { continue };
            let ph: Vec<String> = (1..=4).map(|i| d.placeholder(i)).collect();
            conn.execute(
                &format!(
                    "INSERT INTO {} (table_name, source_path, value_type, column_name, created_at) \
                     VALUES ({}, {}) ON CONFLICT DO NOTHING",
                    d.table_ref(client, COLUMNS_TABLE),
                    ph.join(", "),
                    d.now()
                ),
                vec![
                    Param::Text(Some(info.name.clone())),
                    Param::Text(Some(path)),
                    Param::Text(Some(t.as_str().to_owned())),
                    Param::Text(Some(column)),
                ],
            )?;
        }
        for (table_key, clauses) in additions {
            let Some(info) = self.tables.get(&table_key) else {
                continue;
            };
            let table = d.table_ref(client, &info.name);
            match d {
                // One statement for all of a table's new columns.
                Dialect::Postgres => {
                    conn.batch(&format!("ALTER TABLE {table} {}", clauses.join(", ")))?
                }
                Dialect::Sqlite => {
                    for clause in clauses {
                        conn.batch(&format!("ALTER TABLE {table} {clause}"))?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[derive(QueryableByName)]
struct ColumnName {
    #[diesel(sql_type = Text)]
    name: String,
}

/// Root tables checked for the Stitch system columns by this process.
static UPGRADED: std::sync::Mutex<std::collections::BTreeSet<(i64, String)>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

impl Catalog {
    /// Root tables created before the Stitch protocol lack its system columns
    /// ([`CLIENT_SEQ_COLUMN`], [`VERSION_COLUMN`]): adds them. Looked at once per table per
    /// process, so a chunk costs nothing after the first. Returns whether it altered the table.
    pub fn upgrade_root(&self, conn: &mut Conn<'_>) -> QueryResult<bool> {
        let Some(root) = self.tables.get(EMPTY_PATH).filter(|r| r.exists) else {
            return Ok(false);
        };
        let id = (self.client_id, root.name.clone());
        let checked = || UPGRADED.lock().unwrap_or_else(|p| p.into_inner());
        if checked().contains(&id) {
            return Ok(false);
        }
        let d = self.dialect;
        let present: Vec<ColumnName> = match d {
            Dialect::Postgres => conn.load(
                "SELECT column_name::text AS name FROM information_schema.columns \
                 WHERE table_schema = $1 AND table_name = $2",
                vec![
                    Param::Text(Some(namespace(self.client_id))),
                    Param::Text(Some(root.name.clone())),
                ],
            )?,
            Dialect::Sqlite => conn.load(
                "SELECT name FROM pragma_table_info(?1)",
                vec![Param::Text(Some(format!(
                    "{}__{}",
                    namespace(self.client_id),
                    root.name
                )))],
            )?,
        };
        let mut complete = true;
        for column in [CLIENT_SEQ_COLUMN, VERSION_COLUMN] {
            if !present.iter().any(|p| p.name == column) {
                complete = false;
                conn.batch(&format!(
                    "ALTER TABLE {} ADD COLUMN {} {}",
                    d.table_ref(self.client_id, &root.name),
                    quote(column),
                    d.sql_type(ColType::BigInt)
                ))?;
            }
        }
        // Only a table found complete is remembered: columns added here roll back with the
        // chunk if it fails, and must then be added again.
        if complete {
            checked().insert(id);
        }
        Ok(!complete)
    }
}

/// `_intake_root_<key>` kept within the identifier limit.
fn fit_system_name(name: &str, original: &str) -> String {
    if name.len() <= identifiers::MAX_IDENTIFIER_BYTES {
        name.to_owned()
    } else {
        identifiers::disambiguated_name(&[name.to_owned(), original.to_owned()])
    }
}

/// Where a cell goes: a column, with the cell converted for it when the column has another
/// type (`None`: stored as it is), or the overflow column.
pub enum Placement {
    Column(String, Option<Cell>),
    Overflow,
}

/// Finds or allocates the column for a cell at `path` (JSON text) in table `table_key`.
pub fn place_cell(catalog: &mut Catalog, table_key: &str, path: &str, cell: &Cell) -> Placement {
    let Catalog { tables, ddl, .. } = catalog;
    let Some(info) = tables.get_mut(table_key) else {
        return Placement::Overflow;
    };
    let t = cell.col_type();
    if let Some(columns) = info.columns.get(path) {
        if let Some((_, col)) = columns.iter().find(|(ct, _)| *ct == t) {
            return if col == OVERFLOW_COLUMN {
                Placement::Overflow
            } else {
                Placement::Column(col.clone(), None)
            };
        }
        if let Some((home_type, home)) = columns.first()
            && home != OVERFLOW_COLUMN
            && let Some(coerced) = cell.coerce_to(*home_type)
        {
            return Placement::Column(home.clone(), Some(coerced));
        }
    }
    if info.used.len() >= MAX_COLUMNS {
        ensure_overflow(info, ddl, table_key);
        info.columns
            .entry(path.to_owned())
            .or_default()
            .push((t, OVERFLOW_COLUMN.to_owned()));
        ddl.new_columns.push(NewColumn {
            table_key: table_key.to_owned(),
            column: OVERFLOW_COLUMN.to_owned(),
            value_type: t,
            path: Some(path.to_owned()),
            add: false,
        });
        return Placement::Overflow;
    }
    let home = info
        .columns
        .get(path)
        .and_then(|c| c.first())
        .map(|(_, n)| n.clone());
    let column = match home {
        Some(home) => assign_sibling(info, path, &home, t, ddl, table_key),
        None => assign_column(info, path, t, ddl, table_key, false),
    };
    Placement::Column(column, None)
}

/// Adds the overflow column to a table (once).
pub fn ensure_overflow(info: &mut TableInfo, ddl: &mut PendingDdl, table_key: &str) {
    if !info.overflow {
        info.overflow = true;
        ddl.new_columns.push(NewColumn {
            table_key: table_key.to_owned(),
            column: OVERFLOW_COLUMN.to_owned(),
            value_type: ColType::Json,
            path: None,
            add: true,
        });
    }
}

/// A new home column for a path: its preferred name, or the hashed one if that is taken or
/// reserved. Key columns are created with their table, not added.
fn assign_column(
    info: &mut TableInfo,
    path: &str,
    t: ColType,
    ddl: &mut PendingDdl,
    table_key: &str,
    key: bool,
) -> String {
    let segments = path_segments(path);
    let preferred = if segments.is_empty() {
        crate::flatten::ELEMENT_SEGMENT.to_owned()
    } else {
        identifiers::preferred_name(&segments)
    };
    let name = if info.used.contains_key(&preferred) || preferred.starts_with(SYSTEM_PREFIX) {
        let head = identifiers::disambiguated_name(&with_marker(segments.clone()));
        if info.used.contains_key(&head) {
            unused_hashed(&preferred, &with_marker(segments), |n| {
                info.used.contains_key(n)
            })
        } else {
            head
        }
    } else {
        preferred
    };
    register(info, path, t, name, ddl, table_key, !key)
}

fn assign_sibling(
    info: &mut TableInfo,
    path: &str,
    home: &str,
    t: ColType,
    ddl: &mut PendingDdl,
    table_key: &str,
) -> String {
    let segments = path_segments(path);
    let mut name = identifiers::with_suffix(home, t.sibling_suffix(), &segments);
    if info.used.contains_key(&name) {
        let mut marked = with_marker(segments);
        marked.push(t.as_str().to_owned());
        name = identifiers::disambiguated_name(&marked);
        if info.used.contains_key(&name) {
            name = unused_hashed(home, &marked, |n| info.used.contains_key(n));
        }
    }
    register(info, path, t, name, ddl, table_key, true)
}

/// `head` with a hash of `identity` and a counter, the first such name not `taken`: a user
/// can send a field literally named like another field's hashed name.
fn unused_hashed(head: &str, identity: &[String], taken: impl Fn(&str) -> bool) -> String {
    let mut salted = identity.to_vec();
    salted.push(String::new());
    for salt in 1u64.. {
        if let Some(last) = salted.last_mut() {
            *last = format!("#{salt}");
        }
        let name = identifiers::with_hash(head, &salted);
        if !taken(&name) {
            return name;
        }
    }
    identifiers::with_hash(head, identity)
}

/// Paths of scalar array elements are empty; give hashing something to work with.
fn with_marker(segments: Vec<String>) -> Vec<String> {
    if segments.is_empty() {
        vec![crate::flatten::ELEMENT_SEGMENT.to_owned(), String::new()]
    } else {
        segments
    }
}

fn register(
    info: &mut TableInfo,
    path: &str,
    t: ColType,
    name: String,
    ddl: &mut PendingDdl,
    table_key: &str,
    add: bool,
) -> String {
    info.used.insert(name.clone(), t);
    info.columns
        .entry(path.to_owned())
        .or_default()
        .push((t, name.clone()));
    ddl.new_columns.push(NewColumn {
        table_key: table_key.to_owned(),
        column: name.clone(),
        value_type: t,
        path: Some(path.to_owned()),
        add,
    });
    name
}
