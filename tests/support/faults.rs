//! Fault injection: the real server and loader killed with SIGKILL at chosen moments and
//! started again on the same database, direct reads of staging, the warehouse and its system
//! tables, a process's resident memory, and raw TCP for clients that misbehave below HTTP.
//!
//! Declared from `support/mod.rs`, so it can reach that module's private parts (the server's
//! child process, the shared process environment).

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::unix::process::ExitStatusExt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Nullable, Text};
use diesel::sqlite::SqliteConnection;
use diesel::{QueryableByName, RunQueryDsl};

use super::{Backend, CliOutput, DbConnection, LoaderProcess, Server, TestDb};

// ---------------------------------------------------------------------------------------------
// Killing and restarting processes.

impl Server {
    /// The server's process id, e.g. to read its memory use from `/proc`.
    pub fn os_pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the server with SIGKILL (no chance to flush or clean up) and waits until it is
    /// gone. Fails the test if it had already died by itself.
    pub fn sigkill(mut self) {
        let pid = self.child.id();
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "intake-server {pid} had already exited ({status}) before it was killed; its log:\n{}",
                self.logs().join("\n")
            );
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("waiting for the killed server");
        assert_eq!(
            status.signal(),
            Some(9),
            "intake-server {pid} should have died of SIGKILL, ended with {status}"
        );
    }
}

/// A server that is killed and restarted on the same database, on a new port each time.
/// Clients read the current base URL from [`CrashingServer::shared_url`] before each request.
pub struct CrashingServer<'a> {
    db: &'a TestDb,
    env: Vec<(String, String)>,
    server: Option<Server>,
    url: Arc<RwLock<String>>,
    /// How many times it has been killed.
    pub kills: usize,
}

impl<'a> CrashingServer<'a> {
    pub fn start(db: &'a TestDb, env: &[(&str, &str)]) -> CrashingServer<'a> {
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let mut crashing = CrashingServer {
            db,
            env,
            server: None,
            url: Arc::new(RwLock::new(String::new())),
            kills: 0,
        };
        crashing.boot();
        crashing
    }

    fn boot(&mut self) {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let server = Server::start(self.db, &env);
        *self.url.write().unwrap_or_else(|p| p.into_inner()) = server.base_url().to_owned();
        self.server = Some(server);
    }

    /// The base URL of whichever server is running now (`http://127.0.0.1:PORT`).
    pub fn shared_url(&self) -> Arc<RwLock<String>> {
        self.url.clone()
    }

    /// SIGKILL, then a new server on the same database.
    pub fn kill_and_restart(&mut self) {
        if let Some(server) = self.server.take() {
            server.sigkill();
            self.kills += 1;
        }
        self.boot();
    }

    /// Kills the current server for good (also with SIGKILL: nothing may depend on a clean
    /// shutdown).
    pub fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.sigkill();
        }
    }
}

/// The base URL clients should use now.
pub fn current_url(url: &RwLock<String>) -> String {
    url.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// `intake-loader ARGS` to the end (at most `timeout`).
pub fn loader_to_end(db: &TestDb, name: &str, args: &[&str], timeout: Duration) -> CliOutput {
    LoaderProcess::spawn(db, name, args)
        .wait(timeout)
        .unwrap_or_else(|| panic!("intake-loader {args:?} did not finish within {timeout:?}"))
}

/// Resident memory of a process in KiB (`VmRSS` in `/proc/PID/status`), if it is alive.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Reading the database directly.

/// A direct connection to a test database, for reading staging and the warehouse.
pub enum DirectDb {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

impl DirectDb {
    pub fn open(db: &TestDb) -> DirectDb {
        match DbConnection::open(db) {
            DbConnection::Pg(conn) => DirectDb::Pg(conn),
            DbConnection::Sqlite(conn) => DirectDb::Sqlite(conn),
        }
    }

    /// Runs a query without bound values.
    pub fn try_rows<T>(&mut self, sql: &str) -> diesel::QueryResult<Vec<T>>
    where
        T: QueryableByName<diesel::pg::Pg> + QueryableByName<diesel::sqlite::Sqlite> + 'static,
    {
        match self {
            DirectDb::Pg(c) => diesel::sql_query(sql).load(c),
            DirectDb::Sqlite(c) => diesel::sql_query(sql).load(c),
        }
    }

    #[track_caller]
    pub fn rows<T>(&mut self, sql: &str) -> Vec<T>
    where
        T: QueryableByName<diesel::pg::Pg> + QueryableByName<diesel::sqlite::Sqlite> + 'static,
    {
        self.try_rows(sql).unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs a statement without bound values.
    #[track_caller]
    pub fn exec(&mut self, sql: &str) -> usize {
        let result = match self {
            DirectDb::Pg(c) => diesel::sql_query(sql).execute(c),
            DirectDb::Sqlite(c) => diesel::sql_query(sql).execute(c),
        };
        result.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// `SELECT COUNT(*) ...` or any query with one BIGINT column named `n`.
    #[track_caller]
    pub fn count(&mut self, sql: &str) -> i64 {
        self.rows::<Count>(sql).first().map_or(0, |r| r.n)
    }

    /// Records waiting in staging, all clients and tables.
    pub fn staged_count(&mut self) -> i64 {
        self.count("SELECT CAST(COUNT(*) AS BIGINT) AS n FROM staged_records")
    }

    /// The records of one staged table, in sequence order, as `(seq, record)`.
    pub fn staged(&mut self, client_id: i64, table: &str) -> Vec<(i64, String)> {
        self.rows::<SeqRecord>(&format!(
            "SELECT CAST(seq AS BIGINT) AS seq, record FROM staged_records \
             WHERE client_id = {client_id} AND table_name = {} ORDER BY seq",
            literal(table)
        ))
        .into_iter()
        .map(|r| (r.seq, r.record))
        .collect()
    }

    /// Whether a table exists: `name` is a plain table name on SQLite, `schema.name` or a
    /// plain name (schema `public`) on PostgreSQL.
    pub fn table_exists(&mut self, name: &str) -> bool {
        match self {
            DirectDb::Pg(_) => {
                let (schema, table) = name.split_once('.').unwrap_or(("public", name));
                self.count(&format!(
                    "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM information_schema.tables \
                     WHERE table_schema = {} AND table_name = {}",
                    literal(schema),
                    literal(table)
                )) > 0
            }
            DirectDb::Sqlite(_) => {
                self.count(&format!(
                    "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM sqlite_master \
                     WHERE type = 'table' AND name = {}",
                    literal(name)
                )) > 0
            }
        }
    }

    /// Sessions on this PostgreSQL database other than this one (0 on SQLite). A loader
    /// killed with SIGKILL leaves its session until the server notices the broken socket.
    pub fn other_sessions(&mut self) -> i64 {
        match self {
            DirectDb::Pg(_) => self.count(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM pg_stat_activity \
                 WHERE datname = current_database() AND pid <> pg_backend_pid()",
            ),
            DirectDb::Sqlite(_) => 0,
        }
    }

    /// Waits (at most `timeout`) until no other session uses the database: a killed
    /// process's transaction has then been rolled back and its locks released.
    pub fn wait_until_alone(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let others = self.other_sessions();
            if others == 0 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{others} sessions of killed processes still use the database after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `(id, v, _intake_seq)` of every row of a warehouse table with integer columns `id`
    /// and `v`, ordered by id.
    pub fn id_versions(&mut self, backend: Backend, client_id: i64, table: &str) -> Vec<IdVersion> {
        self.rows(&format!(
            "SELECT CAST(id AS BIGINT) AS id, CAST(v AS BIGINT) AS v, \
                    CAST(_intake_seq AS BIGINT) AS seq FROM {} ORDER BY id",
            warehouse_table(backend, client_id, table)
        ))
    }

    /// The rows of a client's `_intake_load_history`.
    pub fn load_history(&mut self, backend: Backend, client_id: i64) -> Vec<HistoryRow> {
        self.rows(&format!(
            "SELECT table_name, CAST(records_loaded AS BIGINT) AS records_loaded, \
                    CAST(records_rejected AS BIGINT) AS records_rejected, \
                    CAST(first_seq AS BIGINT) AS first_seq, CAST(last_seq AS BIGINT) AS last_seq, \
                    error FROM {} ORDER BY id",
            warehouse_table(backend, client_id, "_intake_load_history")
        ))
    }

    /// `(table_name, seq, reason)` of a client's rejected records.
    pub fn rejected(&mut self, backend: Backend, client_id: i64) -> Vec<(String, i64, String)> {
        let sql = format!(
            "SELECT table_name, CAST(seq AS BIGINT) AS seq, reason FROM {} ORDER BY table_name, seq",
            warehouse_table(backend, client_id, "_intake_rejected")
        );
        match self.try_rows::<RejectedRow>(&sql) {
            Ok(rows) => rows
                .into_iter()
                .map(|r| (r.table_name, r.seq, r.reason))
                .collect(),
            // No namespace yet: nothing was ever loaded, so nothing was rejected.
            Err(_) => Vec::new(),
        }
    }

    /// The physical table holding a pushed table (`[table]`) or one of its arrays
    /// (`[table, field, ...]`), from `_intake_tables`. The recorded source is compared with
    /// its nesting flattened, so `["t", ["items"]]` and `["t", "items"]` both match
    /// `["t", "items"]`.
    pub fn physical_table(
        &mut self,
        backend: Backend,
        client_id: i64,
        source: &[&str],
    ) -> Option<String> {
        fn names(value: &serde_json::Value, out: &mut Vec<String>) {
            match value {
                serde_json::Value::String(s) => out.push(s.clone()),
                serde_json::Value::Array(items) => items.iter().for_each(|i| names(i, out)),
                _ => {}
            }
        }
        self.rows::<TableRow>(&format!(
            "SELECT table_name, source FROM {}",
            warehouse_table(backend, client_id, "_intake_tables")
        ))
        .into_iter()
        .find(|t| {
            let mut flat = Vec::new();
            if let Ok(recorded) = serde_json::from_str::<serde_json::Value>(&t.source) {
                names(&recorded, &mut flat);
            }
            flat == source
        })
        .map(|t| t.table_name)
    }

    /// Every `_intake_columns` entry of a physical table: `(source path, value type, column)`.
    pub fn column_map(
        &mut self,
        backend: Backend,
        client_id: i64,
        physical: &str,
    ) -> Vec<ColumnEntry> {
        self.rows::<ColumnRow>(&format!(
            "SELECT source_path, value_type, column_name FROM {} WHERE table_name = {}",
            warehouse_table(backend, client_id, "_intake_columns"),
            literal(physical)
        ))
        .into_iter()
        .map(|c| ColumnEntry {
            path: serde_json::from_str(&c.source_path).unwrap_or_else(|e| {
                panic!("_intake_columns.source_path is not a JSON array of names ({e}): {c:?}")
            }),
            value_type: c.value_type,
            column: c.column_name,
        })
        .collect()
    }

    /// One column of the rows matching `condition`, as text (`NULL` as `None`).
    #[track_caller]
    pub fn cells(&mut self, table_ref: &str, column: &str, condition: &str) -> Vec<Option<String>> {
        self.rows::<Cell>(&format!(
            "SELECT CAST({} AS TEXT) AS t FROM {table_ref} WHERE {condition}",
            ident(column)
        ))
        .into_iter()
        .map(|c| c.t)
        .collect()
    }

    /// `(root id, position, element)` of a child table of scalar elements under a root keyed
    /// by an integer `id` (columns `_intake_root_id`, `_intake_pos_0`, `value`), ordered.
    pub fn child_values(
        &mut self,
        backend: Backend,
        client_id: i64,
        physical: &str,
    ) -> Vec<(i64, i64, String)> {
        self.rows::<ChildValue>(&format!(
            "SELECT CAST(_intake_root_id AS BIGINT) AS id, CAST(_intake_pos_0 AS BIGINT) AS pos, \
                    CAST(value AS TEXT) AS value FROM {} ORDER BY 1, 2",
            warehouse_table(backend, client_id, physical)
        ))
        .into_iter()
        .map(|r| (r.id, r.pos, r.value))
        .collect()
    }
}

#[derive(QueryableByName)]
struct ChildValue {
    #[diesel(sql_type = BigInt)]
    id: i64,
    #[diesel(sql_type = BigInt)]
    pos: i64,
    #[diesel(sql_type = Text)]
    value: String,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct SeqRecord {
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    record: String,
}

#[derive(QueryableByName)]
struct RejectedRow {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    reason: String,
}

#[derive(QueryableByName)]
struct TableRow {
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = Text)]
    source: String,
}

#[derive(QueryableByName, Debug)]
struct ColumnRow {
    #[diesel(sql_type = Text)]
    source_path: String,
    #[diesel(sql_type = Text)]
    value_type: String,
    #[diesel(sql_type = Text)]
    column_name: String,
}

#[derive(QueryableByName)]
struct Cell {
    #[diesel(sql_type = Nullable<Text>)]
    t: Option<String>,
}

/// A warehouse row's key, version and sequence number.
#[derive(QueryableByName, Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdVersion {
    #[diesel(sql_type = BigInt)]
    pub id: i64,
    #[diesel(sql_type = BigInt)]
    pub v: i64,
    #[diesel(sql_type = BigInt)]
    pub seq: i64,
}

/// One row of `_intake_load_history`.
#[derive(QueryableByName, Debug, Clone)]
pub struct HistoryRow {
    #[diesel(sql_type = Text)]
    pub table_name: String,
    #[diesel(sql_type = BigInt)]
    pub records_loaded: i64,
    #[diesel(sql_type = BigInt)]
    pub records_rejected: i64,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub first_seq: Option<i64>,
    #[diesel(sql_type = Nullable<BigInt>)]
    pub last_seq: Option<i64>,
    #[diesel(sql_type = Nullable<Text>)]
    pub error: Option<String>,
}

/// One `_intake_columns` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnEntry {
    /// The original field names, outermost first.
    pub path: Vec<String>,
    pub value_type: String,
    pub column: String,
}

/// The quoted reference to a table in a client's namespace, as docs/warehouse.md spells it:
/// `client_<id>.<table>` on PostgreSQL, `client_<id>__<table>` on SQLite.
pub fn warehouse_table(backend: Backend, client_id: i64, table: &str) -> String {
    match backend {
        Backend::Postgres => format!("{}.{}", ident(&format!("client_{client_id}")), ident(table)),
        Backend::Sqlite => ident(&format!("client_{client_id}__{table}")),
    }
}

/// `text` as an SQL string literal.
pub fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `name` as a quoted SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

// ---------------------------------------------------------------------------------------------
// Raw TCP.

/// `127.0.0.1:PORT` of a base URL `http://127.0.0.1:PORT`.
pub fn socket_address(base_url: &str) -> String {
    base_url
        .strip_prefix("http://")
        .unwrap_or(base_url)
        .trim_end_matches('/')
        .to_owned()
}

/// What came back on a raw connection.
#[derive(Debug, Default)]
pub struct RawAnswer {
    /// The status of the first response, if a status line arrived.
    pub status: Option<u16>,
    /// Everything received, lossily decoded.
    pub text: String,
    /// The server closed the connection (EOF or reset).
    pub closed: bool,
    /// When the first byte (or the close) arrived.
    pub after: Option<Duration>,
}

impl RawAnswer {
    /// The `Retry-After` header of the response, if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        let head = self.text.split("\r\n\r\n").next().unwrap_or("");
        head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }

    /// The body of the first response (whatever followed the head).
    pub fn body(&self) -> &str {
        self.text.split_once("\r\n\r\n").map_or("", |(_, b)| b)
    }
}

/// Opens a connection to the server and writes `bytes` (no more).
pub fn raw_connect(base_url: &str, bytes: &[u8]) -> TcpStream {
    let addr = socket_address(base_url);
    let mut stream = TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connecting {addr}: {e}"));
    stream.set_nodelay(true).expect("TCP_NODELAY");
    stream.write_all(bytes).expect("writing to the server");
    stream
}

/// Reads what the server sends on `stream` until it closes the connection, a complete
/// response has arrived (head plus `Content-Length` bytes), or `timeout` has passed since
/// `since`.
pub fn raw_read(stream: &mut TcpStream, since: Instant, timeout: Duration) -> RawAnswer {
    let mut answer = RawAnswer::default();
    let mut received = Vec::new();
    let deadline = since + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let now = Instant::now();
        if now >= deadline || complete_response(&received) {
            break;
        }
        stream
            .set_read_timeout(Some((deadline - now).max(Duration::from_millis(1))))
            .expect("setting a read timeout");
        match stream.read(&mut buf) {
            Ok(0) => {
                answer.closed = true;
                answer.after.get_or_insert(since.elapsed());
                break;
            }
            Ok(n) => {
                answer.after.get_or_insert(since.elapsed());
                received.extend_from_slice(&buf[..n]);
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => {
                answer.closed = true;
                answer.after.get_or_insert(since.elapsed());
                break;
            }
        }
    }
    answer.text = String::from_utf8_lossy(&received).into_owned();
    answer.status = answer
        .text
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| answer.text.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok());
    answer
}

/// Whether `bytes` hold a whole response with a `Content-Length` body.
fn complete_response(bytes: &[u8]) -> bool {
    let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&bytes[..end]);
    let length = head.lines().find_map(|line| {
        let (n, v) = line.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())
            .flatten()
    });
    length.is_some_and(|len| bytes.len() >= end + 4 + len)
}

// ---------------------------------------------------------------------------------------------
// What a push body holds.

/// The records of a push body that the server accepted, each as its exact text: the body
/// itself if it is one object, else each element of the top-level array, without the
/// whitespace around it. Written independently of the server's parser, as a test oracle;
/// it assumes valid JSON.
pub fn split_records(body: &[u8]) -> Vec<String> {
    let is_space = |b: &u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let trim = |mut s: &[u8]| {
        while s.first().is_some_and(is_space) {
            s = &s[1..];
        }
        while s.last().is_some_and(is_space) {
            s = &s[..s.len() - 1];
        }
        String::from_utf8(s.to_vec()).expect("an accepted body is UTF-8")
    };
    let whole = trim(body);
    if !whole.starts_with('[') {
        return vec![whole];
    }
    let inner = &whole.as_bytes()[1..whole.len() - 1];
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    let mut records = Vec::new();
    let mut start = 0;
    for (i, &b) in inner.iter().enumerate() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => depth += 1,
            b']' | b'}' => depth -= 1,
            b',' if depth == 0 => {
                records.push(trim(&inner[start..i]));
                start = i + 1;
            }
            _ => {}
        }
    }
    let last = trim(&inner[start..]);
    if !last.is_empty() {
        records.push(last);
    }
    records
}
