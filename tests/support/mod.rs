//! End-to-end test harness: a fresh database per test (a SQLite file in a temporary directory,
//! or a throw-away PostgreSQL database), the real `intake-server` and `intake-key-admin`
//! binaries run as child processes, an HTTP client that lets tests assert on every status
//! code, and direct reads of the staging table.
//!
//! Each test file includes this with `mod support;`; not every file uses every helper.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Text};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, QueryableByName, RunQueryDsl};
use serde_json::Value;
use tempfile::TempDir;

/// A private PostgreSQL cluster a test may stop and start, immutable files, database dumps.
pub mod cluster;
/// Fault injection: killing and restarting processes, direct warehouse reads, raw TCP.
pub mod faults;
pub mod python;

/// PostgreSQL server the tests create their databases on (trust auth), unless
/// `INTAKE_TEST_PG_URL` names another; the database part of the URL is the one connected to
/// for creating and dropping test databases.
const DEFAULT_PG_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Every test database's name starts with this, then 8 hex digits of its creation time (Unix
/// seconds) and 16 random hex digits, so that leftovers of crashed runs can be recognised.
const PG_DB_PREFIX: &str = "intake_t_";
/// Test databases older than this are leftovers of crashed runs and are dropped.
const STALE_AFTER_SECS: u64 = 3600;
/// How long a server may take to say where it listens.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// No single HTTP exchange in these tests should come anywhere near this.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// Which storage backend a test runs against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// Generates, for each named test body `fn name(backend: Backend)`, a module `name` with two
/// tests, `sqlite` and `postgres`, so that every behaviour is checked on both backends.
#[allow(unused_macros)] // as with dead_code above: not every file runs on both backends
macro_rules! both_backends {
    ($($name:ident),+ $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sqlite() {
                    super::$name($crate::support::Backend::Sqlite);
                }

                #[test]
                fn postgres() {
                    super::$name($crate::support::Backend::Postgres);
                }
            }
        )+
    };
}
#[allow(unused_imports)]
pub(crate) use both_backends;

/// A database of its own for one test, plus the temporary directory the test's processes run
/// in. A PostgreSQL database is dropped when this is dropped.
pub struct TestDb {
    pub backend: Backend,
    /// What the processes get as `DATABASE_URL`.
    pub url: String,
    dir: TempDir,
    /// PostgreSQL only: the database to drop, and the URL to drop it through.
    pg: Option<(String, String)>,
}

impl TestDb {
    /// A fresh, empty database (the processes under test migrate it when they start).
    pub fn new(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        match backend {
            Backend::Sqlite => {
                let url = format!("sqlite://{}/data/intake.db", dir.path().display());
                TestDb {
                    backend,
                    url,
                    dir,
                    pg: None,
                }
            }
            Backend::Postgres => {
                let admin_url = pg_admin_url();
                sweep_stale_pg_databases(&admin_url);
                let name = new_pg_db_name();
                create_pg_database(&admin_url, &name);
                TestDb {
                    backend,
                    url: with_database(&admin_url, &name),
                    dir,
                    pg: Some((admin_url, name)),
                }
            }
        }
    }

    /// A database URL that cannot be used: for PostgreSQL a port nothing listens on, for SQLite
    /// a path that is a directory. Nothing is created, so nothing needs dropping.
    pub fn unreachable(backend: Backend) -> TestDb {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let url = match backend {
            Backend::Postgres => "postgres://postgres@127.0.0.1:1/nope".to_owned(),
            Backend::Sqlite => {
                let not_a_file = dir.path().join("data");
                std::fs::create_dir_all(&not_a_file).expect("creating a directory");
                format!("sqlite://{}", not_a_file.display())
            }
        };
        TestDb {
            backend,
            url,
            dir,
            pg: None,
        }
    }

    /// The working directory of every process run against this database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((admin_url, name)) = &self.pg {
            match PgConnection::establish(admin_url) {
                Ok(mut conn) => {
                    if let Err(e) =
                        diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .execute(&mut conn)
                    {
                        eprintln!("could not drop test database {name}: {e}");
                    }
                }
                Err(e) => eprintln!("could not connect to drop test database {name}: {e}"),
            }
        }
    }
}

fn pg_admin_url() -> String {
    std::env::var("INTAKE_TEST_PG_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_PG_URL.to_owned())
}

/// `base` with its database name replaced by `name` (any `?query` is kept).
fn with_database(base: &str, name: &str) -> String {
    let (url, query) = match base.split_once('?') {
        Some((u, q)) => (u, Some(q)),
        None => (base, None),
    };
    let scheme_end = url.find("://").map_or(0, |i| i + 3);
    let host_part = match url[scheme_end..].find('/') {
        Some(slash) => &url[..scheme_end + slash],
        None => url,
    };
    match query {
        Some(q) => format!("{host_part}/{name}?{q}"),
        None => format!("{host_part}/{name}"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_pg_db_name() -> String {
    format!(
        "{PG_DB_PREFIX}{:08x}{:016x}",
        unix_now() as u32,
        rand::random::<u64>()
    )
}

fn create_pg_database(admin_url: &str, name: &str) {
    let mut conn = PgConnection::establish(admin_url).unwrap_or_else(|e| {
        panic!("cannot reach PostgreSQL at {admin_url} (set INTAKE_TEST_PG_URL): {e}")
    });
    // Concurrent CREATE DATABASE can trip over one another copying the template; retry briefly.
    let mut attempt = 0;
    loop {
        attempt += 1;
        match diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut conn) {
            Ok(_) => return,
            Err(e) if attempt < 5 && e.to_string().contains("being accessed by other users") => {
                std::thread::sleep(Duration::from_millis(100 * attempt));
            }
            Err(e) => panic!("creating test database {name}: {e}"),
        }
    }
}

#[derive(QueryableByName)]
struct DbName {
    #[diesel(sql_type = Text)]
    datname: String,
}

/// Drops test databases left behind by runs that crashed more than an hour ago. Tests never
/// depend on this: each creates and uses only its own database.
fn sweep_stale_pg_databases(admin_url: &str) {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(mut conn) = PgConnection::establish(admin_url) else {
            return;
        };
        let Ok(names) = diesel::sql_query(
            "SELECT datname::text AS datname FROM pg_database WHERE datname LIKE 'intake\\_t\\_%'",
        )
        .load::<DbName>(&mut conn) else {
            return;
        };
        let now = unix_now();
        for DbName { datname } in names {
            let created = datname
                .strip_prefix(PG_DB_PREFIX)
                .and_then(|rest| rest.get(..8))
                .and_then(|hex| u64::from_str_radix(hex, 16).ok());
            let stale = created.is_some_and(|t| now.saturating_sub(t) > STALE_AFTER_SECS);
            let plain = datname
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
            if stale && plain {
                // Another test process may be sweeping the same one; either way it goes.
                let _ =
                    diesel::sql_query(format!("DROP DATABASE IF EXISTS {datname} WITH (FORCE)"))
                        .execute(&mut conn);
            }
        }
    });
}

/// Environment shared by every process under test: the database, and none of the test
/// runner's own `INTAKE__*` settings.
fn base_command(program: &str, db: &TestDb) -> Command {
    let mut cmd = Command::new(program);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("INTAKE__") {
            cmd.env_remove(name);
        }
    }
    cmd.current_dir(db.dir()).env("DATABASE_URL", &db.url);
    cmd
}

/// A running `intake-server`, killed when dropped.
pub struct Server {
    child: Child,
    base_url: String,
    logs: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    agent: ureq::Agent,
}

impl Server {
    /// Starts the real server on a free port against `db`, with the embedded loader off (so
    /// that staging keeps what the tests push), and waits until it listens.
    pub fn start(db: &TestDb, extra_env: &[(&str, &str)]) -> Server {
        let mut cmd = base_command(env!("CARGO_BIN_EXE_intake-server"), db);
        cmd.env("INTAKE__SERVER__BIND", "127.0.0.1:0")
            .env("INTAKE__LOADER__EMBEDDED", "off")
            .env("RUST_LOG", "info")
            .envs(extra_env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        Server::spawn(cmd)
    }

    /// Spawns a prepared `intake-server` command (its standard error piped), collects its log
    /// and waits until it reports its listening address.
    pub fn spawn(mut cmd: Command) -> Server {
        let mut child = cmd.spawn().expect("starting intake-server");
        let stderr = child.stderr.take().expect("the server's stderr is piped");

        let logs = Arc::new(Mutex::new(Vec::new()));
        let (addr_tx, addr_rx) = mpsc::channel();
        let reader = {
            let logs = logs.clone();
            std::thread::spawn(move || {
                let mut addr_tx = Some(addr_tx);
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("[intake-server] {line}");
                    if let Some(addr) = listening_address(&line)
                        && let Some(tx) = addr_tx.take()
                    {
                        let _ = tx.send(addr);
                    }
                    lock(&logs).push(line);
                }
            })
        };

        let mut server = Server {
            child,
            base_url: String::new(),
            logs,
            reader: Some(reader),
            agent: http_agent(),
        };
        match addr_rx.recv_timeout(START_TIMEOUT) {
            Ok(addr) => server.base_url = format!("http://{addr}"),
            Err(e) => {
                let exit = server.child.try_wait().ok().flatten();
                panic!(
                    "intake-server did not report a listening address ({e}; exit status {exit:?}); \
                     its log:\n{}",
                    server.logs().join("\n")
                );
            }
        }
        server
    }

    /// `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Every line the server has written to stderr so far.
    pub fn logs(&self) -> Vec<String> {
        lock(&self.logs).clone()
    }

    /// Waits (up to 10 s) until a log line satisfies `matches`, and returns it. Log lines are
    /// read on another thread, so a line about a request can arrive just after its response.
    /// A server on a database that is not reachable (see [`TestDb::unreachable`]): it is told
    /// not to migrate, so it starts, and to give up on the database after 500 ms; `Retry-After`
    /// is 3 s, so that tests can tell it from the default.
    pub fn start_unreachable(db: &TestDb) -> Server {
        Server::start(
            db,
            &[
                ("INTAKE__DATABASE__MIGRATE_ON_START", "false"),
                ("INTAKE__DATABASE__CHECKOUT_TIMEOUT_MS", "500"),
                ("INTAKE__SERVER__RETRY_AFTER_SECS", "3"),
            ],
        )
    }

    /// Fails if any line the server logged so far contains one of `secrets`.
    #[track_caller]
    pub fn assert_logs_lack(&self, secrets: &[&str]) {
        for line in self.logs() {
            for secret in secrets {
                assert!(
                    !line.contains(secret),
                    "a key's secret reached the log: {line}"
                );
            }
        }
    }

    pub fn wait_for_log(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(line) = lock(&self.logs).iter().find(|l| matches(l)) {
                return line.clone();
            }
            if Instant::now() > deadline {
                panic!(
                    "no server log line {what} within 10 s; the log:\n{}",
                    self.logs().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Any request: `body` `None` sends no body at all. No Content-Type is added.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Reply {
        let mut builder = ureq::http::Request::builder()
            .method(method)
            .uri(self.url(path));
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let outcome = match body {
            None => self
                .agent
                .run(builder.body(()).expect("a well-formed request")),
            Some(bytes) => self
                .agent
                .run(builder.body(bytes.to_vec()).expect("a well-formed request")),
        };
        let response = outcome.unwrap_or_else(|e| panic!("{method} {path}: no HTTP answer: {e}"));
        Reply::read(response)
    }

    pub fn get(&self, path: &str) -> Reply {
        self.request("GET", path, &[], None)
    }

    pub fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request("GET", path, headers, None)
    }

    /// `GET /v2/client/{cid}/authenticate?apikey=KEY`, the way RJMetrics clients check a key.
    pub fn authenticate(&self, client_id: i64, api_key: &str) -> Reply {
        self.get(&format!(
            "/v2/client/{client_id}/authenticate?apikey={api_key}"
        ))
    }

    /// `POST /v2/client/{cid}/table/{table}/data?apikey=KEY` with a JSON body.
    pub fn push(&self, client_id: i64, table: &str, api_key: &str, body: &str) -> Reply {
        self.push_to("/v2", client_id, table, api_key, body)
    }

    /// [`Server::push`] to the sandbox (`/sandbox/v2`).
    pub fn push_sandbox(&self, client_id: i64, table: &str, api_key: &str, body: &str) -> Reply {
        self.push_to("/sandbox/v2", client_id, table, api_key, body)
    }

    fn push_to(&self, prefix: &str, client_id: i64, table: &str, key: &str, body: &str) -> Reply {
        self.request(
            "POST",
            &format!("{prefix}/client/{client_id}/table/{table}/data?apikey={key}"),
            &[("Content-Type", "application/json")],
            Some(body.as_bytes()),
        )
    }

    /// The server's HTTP client, for tests that need to shape a request themselves.
    pub fn agent(&self) -> &ureq::Agent {
        &self.agent
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// The address in the server's `intake-server listening on http://ADDR (...)` line.
fn listening_address(line: &str) -> Option<String> {
    let rest = &line[line.find("listening on http://")? + "listening on http://".len()..];
    let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
    (!addr.is_empty()).then_some(addr)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// An HTTP client that hands back 4xx and 5xx answers instead of turning them into errors,
/// ignores proxy settings (everything is local) and never waits forever.
pub fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .timeout_global(Some(HTTP_TIMEOUT))
        .build()
        .into()
}

/// An HTTP answer, fully read.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: ureq::http::HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn read(response: ureq::http::Response<ureq::Body>) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = response
            .into_body()
            .read_to_string()
            .expect("reading the response body");
        Reply {
            status,
            headers,
            text,
        }
    }

    /// The body as JSON; fails the test if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| {
            panic!(
                "status {} body is not JSON ({e}): {:?}",
                self.status, self.text
            )
        })
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the status, and on failure shows the body.
    #[track_caller]
    pub fn assert_status(&self, expected: u16) -> &Reply {
        assert_eq!(
            self.status, expected,
            "expected status {expected}, got {} with body {:?}",
            self.status, self.text
        );
        self
    }

    /// Asserts that this is an error answer with `status` in the API's one error shape,
    /// `{"code": status, "message": "...", "reasons": ["...", ...]}`, and returns the message
    /// and the reasons.
    #[track_caller]
    pub fn assert_error(&self, status: u16) -> (String, Vec<String>) {
        self.assert_status(status);
        let content_type = self.header("content-type").unwrap_or_default();
        assert!(
            content_type.starts_with("application/json"),
            "a {status} answer must be JSON, got Content-Type {content_type:?}"
        );
        let body = self.json();
        let object = body
            .as_object()
            .unwrap_or_else(|| panic!("error body must be an object: {body}"));
        let mut fields: Vec<&str> = object.keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            ["code", "message", "reasons"],
            "error body fields: {body}"
        );
        assert_eq!(body["code"], status, "error body code: {body}");
        let message = body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("message must be a string: {body}"))
            .to_owned();
        assert!(!message.trim().is_empty(), "empty error message: {body}");
        let reasons = body["reasons"]
            .as_array()
            .unwrap_or_else(|| panic!("reasons must be an array: {body}"))
            .iter()
            .map(|r| {
                r.as_str()
                    .unwrap_or_else(|| panic!("reasons must be strings: {body}"))
                    .to_owned()
            })
            .collect();
        (message, reasons)
    }

    /// Asserts a 201 push answer and returns how many records it says were accepted.
    #[track_caller]
    pub fn assert_created(&self) -> u64 {
        self.assert_status(201);
        let body = self.json();
        assert_eq!(body["code"], 201, "push answer: {body}");
        body["accepted"]
            .as_u64()
            .unwrap_or_else(|| panic!("push answer without a count of accepted records: {body}"))
    }
}

/// What a CLI run printed and how it ended.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    #[track_caller]
    pub fn assert_success(&self) -> &CliOutput {
        assert!(
            self.status.success(),
            "command failed ({}):\nstdout: {}\nstderr: {}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs the real `intake-key-admin` with `args` against `db`, with its default settings.
pub fn key_admin(db: &TestDb, args: &[&str]) -> CliOutput {
    run_key_admin(db, args, &[])
}

fn run_key_admin(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    run_cli(env!("CARGO_BIN_EXE_intake-key-admin"), db, args, env)
}

/// Runs one of the real command-line binaries against `db` to the end and returns its output.
pub fn run_cli(exe: &str, db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let output = base_command(exe, db)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {exe}: {e}"));
    CliOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Issues a key with `intake-key-admin issue --json` and returns `(key_id, api_key)`.
pub fn issue_key(db: &TestDb, client_id: i64, label: &str) -> (String, String) {
    let client = client_id.to_string();
    let out = key_admin(
        db,
        &["issue", "--client", &client, "--label", label, "--json"],
    );
    out.assert_success();
    let issued: Value = serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("issue --json printed no JSON ({e}): {:?}", out.stdout));
    assert_eq!(issued["client_id"], client_id, "issued: {issued}");
    assert_eq!(issued["label"], label, "issued: {issued}");
    let text = |field: &str| {
        issued[field]
            .as_str()
            .unwrap_or_else(|| panic!("issued key has no {field}: {issued}"))
            .to_owned()
    };
    (text("key_id"), text("api_key"))
}

/// `intake-key-admin revoke KEY_ID --reason REASON`.
pub fn revoke_key(db: &TestDb, key_id: &str, reason: &str) -> CliOutput {
    key_admin(db, &["revoke", key_id, "--reason", reason])
}

/// `intake-key-admin list` with extra arguments (e.g. `--json`, `--client N`).
pub fn list_keys(db: &TestDb, args: &[&str]) -> CliOutput {
    let mut all = vec!["list"];
    all.extend_from_slice(args);
    key_admin(db, &all)
}

/// The secret part of an API key (`intake_<key id>_<secret>`).
pub fn secret_of(api_key: &str) -> &str {
    api_key
        .rsplit_once('_')
        .map(|(_, secret)| secret)
        .expect("an API key has a secret part")
}

/// One row of the staging table: `(client_id, table_name, seq, record)`.
pub type StagedRow = (i64, String, i64, String);

#[derive(QueryableByName)]
struct StagedRecord {
    #[diesel(sql_type = BigInt)]
    client_id: i64,
    #[diesel(sql_type = Text)]
    table_name: String,
    #[diesel(sql_type = BigInt)]
    seq: i64,
    #[diesel(sql_type = Text)]
    record: String,
}

/// Everything in `staged_records`, read directly from the database, ordered by client, table
/// and sequence number.
pub fn staged_rows(db: &TestDb) -> Vec<StagedRow> {
    let sql = "SELECT client_id, table_name, seq, record FROM staged_records \
               ORDER BY client_id, table_name, seq";
    let rows: Vec<StagedRecord> = match db.backend {
        Backend::Sqlite => {
            let path = sqlite_path(&db.url);
            assert!(path.exists(), "no SQLite database at {}", path.display());
            let mut conn = SqliteConnection::establish(&path.to_string_lossy())
                .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
            diesel::sql_query(sql)
                .load(&mut conn)
                .expect("reading staged_records")
        }
        Backend::Postgres => {
            let mut conn = PgConnection::establish(&db.url)
                .unwrap_or_else(|e| panic!("connecting to {}: {e}", db.url));
            diesel::sql_query(sql)
                .load(&mut conn)
                .expect("reading staged_records")
        }
    };
    rows.into_iter()
        .map(|r| (r.client_id, r.table_name, r.seq, r.record))
        .collect()
}

/// Just the records in staging for one client and table, in sequence order.
pub fn staged_records(db: &TestDb, client_id: i64, table: &str) -> Vec<String> {
    staged_rows(db)
        .into_iter()
        .filter(|(c, t, _, _)| *c == client_id && t == table)
        .map(|(_, _, _, record)| record)
        .collect()
}

fn sqlite_path(url: &str) -> PathBuf {
    PathBuf::from(url.strip_prefix("sqlite://").unwrap_or(url))
}

/// A key that is well formed but was never issued.
pub fn unknown_key() -> String {
    format!("intake_{}_{}", "zzzzzzzzzzzz", "Q".repeat(32))
}

// ---------------------------------------------------------------------------------------------
// The loader and the warehouse.

/// Runs the real `intake-loader` with `args` (e.g. `["run"]`) against `db`, with its default
/// settings, and waits for it to end.
pub fn run_loader(db: &TestDb, args: &[&str]) -> CliOutput {
    run_cli(env!("CARGO_BIN_EXE_intake-loader"), db, args, &[])
}

/// `intake-loader run`, which must succeed.
#[track_caller]
pub fn load(db: &TestDb) -> CliOutput {
    let out = run_loader(db, &["run"]);
    out.assert_success();
    out
}

/// `intake-loader status --json`, parsed.
#[track_caller]
pub fn loader_status(db: &TestDb) -> Value {
    let out = run_loader(db, &["status", "--json"]);
    out.assert_success();
    serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json printed no JSON ({e}): {:?}", out.stdout))
}

/// An `intake-loader` running in the background; its output goes to files so that it can
/// never block on a full pipe. Killed when dropped if still running.
pub struct LoaderProcess {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl LoaderProcess {
    /// Starts `intake-loader` with `args` against `db`; `name` tells its output files apart.
    pub fn spawn(db: &TestDb, name: &str, args: &[&str]) -> LoaderProcess {
        LoaderProcess::spawn_with_env(db, name, args, &[])
    }

    /// [`LoaderProcess::spawn`] with `env` added to its environment.
    pub fn spawn_with_env(
        db: &TestDb,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> LoaderProcess {
        let stdout = db.dir().join(format!("{name}.stdout"));
        let stderr = db.dir().join(format!("{name}.stderr"));
        let file = |path: &Path| std::fs::File::create(path).expect("creating an output file");
        let child = base_command(env!("CARGO_BIN_EXE_intake-loader"), db)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(file(&stdout))
            .stderr(file(&stderr))
            .spawn()
            .expect("starting intake-loader");
        LoaderProcess {
            child,
            stdout,
            stderr,
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Everything it has written to stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        self.signal("TERM");
    }

    /// Sends a signal by name (`TERM`, `INT`) through `kill`: tests use no unsafe code.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{name} {} failed", self.child.id());
    }

    /// SIGKILL if it is still running; `Some(output)` if it had already ended by itself (also
    /// in the instant between the check and the kill).
    pub fn sigkill(&mut self) -> Option<CliOutput> {
        use std::os::unix::process::ExitStatusExt;
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(self.output(status));
        }
        let _ = self.child.kill();
        let status = self.child.wait().expect("waiting for the killed loader");
        (status.signal() != Some(9)).then(|| self.output(status))
    }

    /// What it printed, and how it ended.
    fn output(&self, status: std::process::ExitStatus) -> CliOutput {
        CliOutput {
            status,
            stdout: std::fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: self.stderr(),
        }
    }

    /// Waits up to `timeout` for it to exit and returns what it printed; `None` (after
    /// killing it) if it was still running.
    pub fn wait(&mut self, timeout: Duration) -> Option<CliOutput> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait().expect("waiting for intake-loader") {
                Some(status) => return Some(self.output(status)),
                None if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return None;
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

impl Drop for LoaderProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some`, for at most `timeout`; panics with
/// `what` and the last value seen otherwise.
#[track_caller]
pub fn poll<T: std::fmt::Debug>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) if Instant::now() > deadline => {
                panic!("{what}: not within {timeout:?}; last seen: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A direct connection to a test database, for reading the warehouse.
pub enum DbConnection {
    Pg(PgConnection),
    Sqlite(SqliteConnection),
}

impl DbConnection {
    pub fn open(db: &TestDb) -> DbConnection {
        match db.backend {
            Backend::Sqlite => {
                let path = sqlite_path(&db.url);
                assert!(path.exists(), "no SQLite database at {}", path.display());
                let mut conn = SqliteConnection::establish(&path.to_string_lossy())
                    .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                // Loaders may be writing at the same time.
                diesel::sql_query("PRAGMA busy_timeout = 10000")
                    .execute(&mut conn)
                    .expect("setting the busy timeout");
                DbConnection::Sqlite(conn)
            }
            Backend::Postgres => DbConnection::Pg(
                PgConnection::establish(&db.url)
                    .unwrap_or_else(|e| panic!("connecting to {}: {e}", db.url)),
            ),
        }
    }

    /// Runs a query without bound values.
    #[track_caller]
    pub fn load<T>(&mut self, sql: &str) -> Vec<T>
    where
        T: QueryableByName<diesel::pg::Pg> + QueryableByName<diesel::sqlite::Sqlite> + 'static,
    {
        let result = match self {
            DbConnection::Pg(c) => diesel::sql_query(sql).load(c),
            DbConnection::Sqlite(c) => diesel::sql_query(sql).load(c),
        };
        result.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// Runs a statement without bound values.
    #[track_caller]
    pub fn execute(&mut self, sql: &str) -> usize {
        let result = match self {
            DbConnection::Pg(c) => diesel::sql_query(sql).execute(c),
            DbConnection::Sqlite(c) => diesel::sql_query(sql).execute(c),
        };
        result.unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

/// `text` as an SQL string literal.
pub fn sql_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// `name` as a quoted SQL identifier.
pub fn sql_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The quoted reference to a client's warehouse table, as docs/warehouse.md spells it:
/// `client_<id>.<table>` on PostgreSQL, `client_<id>__<table>` on SQLite.
pub fn table_ref(backend: Backend, client_id: i64, table: &str) -> String {
    match backend {
        Backend::Postgres => format!(
            "{}.{}",
            sql_ident(&format!("client_{client_id}")),
            sql_ident(table)
        ),
        Backend::Sqlite => sql_ident(&format!("client_{client_id}__{table}")),
    }
}

#[derive(QueryableByName)]
struct NameRow {
    #[diesel(sql_type = Text)]
    name: String,
}

#[derive(QueryableByName)]
struct CountRow {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct JsonRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<Text>)]
    j: Option<String>,
}

/// Every table in a client's namespace (system tables included), without the namespace, sorted.
pub fn warehouse_tables(db: &TestDb, client_id: i64) -> Vec<String> {
    let mut conn = DbConnection::open(db);
    let rows: Vec<NameRow> = match db.backend {
        Backend::Postgres => conn.load(&format!(
            "SELECT table_name::text AS name FROM information_schema.tables \
             WHERE table_schema = {} ORDER BY 1",
            sql_literal(&format!("client_{client_id}"))
        )),
        Backend::Sqlite => conn.load(&format!(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND substr(name, 1, {len}) = {prefix} \
             ORDER BY 1",
            len = format!("client_{client_id}__").len(),
            prefix = sql_literal(&format!("client_{client_id}__")),
        )),
    };
    let prefix = format!("client_{client_id}__");
    let mut names: Vec<String> = rows
        .into_iter()
        .map(|r| match db.backend {
            Backend::Postgres => r.name,
            Backend::Sqlite => r.name[prefix.len()..].to_owned(),
        })
        .collect();
    names.sort();
    names
}

/// The declared type docs/warehouse.md gives a warehouse type (`bigint`, `double`, `boolean`,
/// `text`, `timestamptz`) on each backend, as [`warehouse_columns`] reports it.
pub fn declared_type(backend: Backend, warehouse_type: &str) -> &'static str {
    match (backend, warehouse_type) {
        (Backend::Postgres, "bigint") => "bigint",
        (Backend::Postgres, "double") => "double precision",
        (Backend::Postgres, "boolean") => "boolean",
        (Backend::Postgres, "text") => "text",
        (Backend::Postgres, "timestamptz") => "timestamp with time zone",
        (Backend::Sqlite, "bigint") => "INTEGER",
        (Backend::Sqlite, "double") => "REAL",
        (Backend::Sqlite, "boolean") => "BOOLEAN",
        (Backend::Sqlite, "text") => "TEXT",
        (Backend::Sqlite, "timestamptz") => "TIMESTAMPTZ",
        (_, other) => panic!("no warehouse type {other}"),
    }
}

/// Column name → declared type of one of a client's warehouse tables.
pub fn column_types(
    db: &TestDb,
    client_id: i64,
    table: &str,
) -> std::collections::BTreeMap<String, String> {
    warehouse_columns(db, client_id, table)
        .into_iter()
        .map(|c| (c.name, c.sql_type))
        .collect()
}

/// One column of a warehouse table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarehouseColumn {
    pub name: String,
    /// The declared type: `format_type` on PostgreSQL (`bigint`, `double precision`,
    /// `timestamp with time zone`, ...), the declared type on SQLite (`INTEGER`, `REAL`, ...).
    pub sql_type: String,
    pub not_null: bool,
    /// Position in the primary key, from 1; 0 if not part of it.
    pub pk: i64,
}

#[derive(QueryableByName)]
struct ColumnInfo {
    #[diesel(sql_type = Text)]
    name: String,
    #[diesel(sql_type = Text)]
    sql_type: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    not_null: bool,
    #[diesel(sql_type = BigInt)]
    pk: i64,
}

/// The columns of a client's warehouse table, in table order; empty if there is no such table.
pub fn warehouse_columns(db: &TestDb, client_id: i64, table: &str) -> Vec<WarehouseColumn> {
    let mut conn = DbConnection::open(db);
    let sql = match db.backend {
        Backend::Postgres => format!(
            "SELECT a.attname::text AS name, format_type(a.atttypid, a.atttypmod) AS sql_type, \
                    a.attnotnull AS not_null, \
                    COALESCE((SELECT k.n FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) \
                              WHERE k.attnum = a.attnum), 0)::bigint AS pk \
             FROM pg_attribute a \
             LEFT JOIN pg_index i ON i.indrelid = a.attrelid AND i.indisprimary \
             WHERE a.attrelid = to_regclass({}) AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            sql_literal(&table_ref(db.backend, client_id, table))
        ),
        Backend::Sqlite => format!(
            "SELECT name, type AS sql_type, \"notnull\" <> 0 AS not_null, CAST(pk AS BIGINT) AS pk \
             FROM pragma_table_info({}) ORDER BY cid",
            sql_literal(&format!("client_{client_id}__{table}"))
        ),
    };
    conn.load::<ColumnInfo>(&sql)
        .into_iter()
        .map(|c| WarehouseColumn {
            name: c.name,
            sql_type: c.sql_type,
            not_null: c.not_null,
            pk: c.pk,
        })
        .collect()
}

/// The primary key columns of a client's warehouse table, in key order.
pub fn primary_key(db: &TestDb, client_id: i64, table: &str) -> Vec<String> {
    let mut key: Vec<WarehouseColumn> = warehouse_columns(db, client_id, table)
        .into_iter()
        .filter(|c| c.pk > 0)
        .collect();
    key.sort_by_key(|c| c.pk);
    key.into_iter().map(|c| c.name).collect()
}

/// `SELECT COUNT(*)` of a client's warehouse table.
pub fn warehouse_count(db: &TestDb, client_id: i64, table: &str) -> i64 {
    let mut conn = DbConnection::open(db);
    let rows: Vec<CountRow> = conn.load(&format!(
        "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {}",
        table_ref(db.backend, client_id, table)
    ));
    rows.first().map_or(0, |r| r.n)
}

/// Every row of a client's warehouse table as a JSON object (column name → value), ordered
/// by `order_by` (column names, e.g. `"id", "_intake_pos_0"`), with both backends' values in
/// one shape: integers, floats (as JSON floats), booleans, text, NULL, and timestamps as RFC
/// 3339 UTC text with microseconds (`2024-03-01T10:20:30.000000Z`).
pub fn warehouse_rows(db: &TestDb, client_id: i64, table: &str, order_by: &str) -> Vec<Value> {
    let columns = warehouse_columns(db, client_id, table);
    assert!(
        !columns.is_empty(),
        "no warehouse table {table} for client {client_id}"
    );
    let source = table_ref(db.backend, client_id, table);
    let sql = match db.backend {
        Backend::Postgres => {
            let select: Vec<String> = columns
                .iter()
                .map(|c| {
                    let name = sql_ident(&c.name);
                    if c.sql_type == "timestamp with time zone" {
                        format!(
                            "to_char({name} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"') AS {name}"
                        )
                    } else {
                        name
                    }
                })
                .collect();
            format!(
                "SELECT row_to_json(test_row)::text AS j FROM (SELECT {} FROM {source}) test_row ORDER BY {order_by}",
                select.join(", ")
            )
        }
        Backend::Sqlite => {
            assert!(
                columns.len() <= 60,
                "json_object takes at most 127 arguments; {table} has {} columns",
                columns.len()
            );
            let pairs: Vec<String> = columns
                .iter()
                .map(|c| {
                    let name = sql_ident(&c.name);
                    // json_object writes REAL with 15 significant digits; 17 round-trip.
                    let value = if c.sql_type == "REAL" {
                        format!("CASE WHEN typeof({name}) = 'real' THEN printf('%!.17g', {name}) ELSE {name} END")
                    } else {
                        name
                    };
                    format!("{}, {value}", sql_literal(&c.name))
                })
                .collect();
            format!(
                "SELECT json_object({}) AS j FROM {source} ORDER BY {order_by}",
                pairs.join(", ")
            )
        }
    };
    let mut conn = DbConnection::open(db);
    conn.load::<JsonRow>(&sql)
        .into_iter()
        .map(|row| {
            let text = row.j.unwrap_or_else(|| panic!("{sql}: a NULL row"));
            let mut value: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{sql}: not JSON ({e}): {text}"));
            for column in &columns {
                if let Some(cell) = value.get_mut(&column.name) {
                    normalize_cell(cell, &column.sql_type);
                }
            }
            value
        })
        .collect()
}

/// Floats as floats (PostgreSQL writes `1` for 1.0; SQLite's come as full-precision text), SQLite's
/// 0/1 booleans as booleans, and SQLite's JSON text as JSON.
fn normalize_cell(cell: &mut Value, sql_type: &str) {
    match (sql_type, &*cell) {
        ("double precision" | "REAL", Value::Number(n)) => {
            if let Some(f) = n.as_f64() {
                *cell = Value::from(f);
            }
        }
        ("REAL", Value::String(s)) => {
            if let Ok(f) = s.parse::<f64>() {
                *cell = Value::from(f);
            }
        }
        ("BOOLEAN", Value::Number(n)) => *cell = Value::Bool(n.as_i64() != Some(0)),
        ("JSON", Value::String(s)) => {
            if let Ok(parsed) = serde_json::from_str(s) {
                *cell = parsed;
            }
        }
        _ => {}
    }
}

/// `(seq, received_at)` of a table's staged records, the time as RFC 3339 UTC text with
/// microseconds on both backends.
pub fn staged_times(db: &TestDb, client_id: i64, table: &str) -> Vec<(i64, String)> {
    #[derive(QueryableByName)]
    struct SeqTime {
        #[diesel(sql_type = BigInt)]
        seq: i64,
        #[diesel(sql_type = Text)]
        received_at: String,
    }
    let received = match db.backend {
        Backend::Postgres => {
            "to_char(received_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
        }
        Backend::Sqlite => "received_at",
    };
    let mut conn = DbConnection::open(db);
    conn.load::<SeqTime>(&format!(
        "SELECT CAST(seq AS BIGINT) AS seq, {received} AS received_at FROM staged_records \
         WHERE client_id = {client_id} AND table_name = {} ORDER BY seq",
        sql_literal(table)
    ))
    .into_iter()
    .map(|r| (r.seq, r.received_at))
    .collect()
}
