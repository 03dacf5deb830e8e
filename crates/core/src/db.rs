//! The one seam between the two storage backends for Intake's fixed tables: which database a
//! URL names, connection pools with per-backend session set-up, and migrations under a lock.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, anyhow};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::r2d2::{ConnectionManager, CustomizeConnection, PooledConnection};
use diesel::sqlite::SqliteConnection;
use diesel::{Connection, RunQueryDsl};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};

use crate::settings::DatabaseSettings;

const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/postgres");
const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("../../migrations/sqlite");

/// Arbitrary constant naming Intake's migration lock among PostgreSQL advisory locks.
const MIGRATION_LOCK_KEY: i64 = 0x1A7A_4E00_0001;

/// Which database a `database.url` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseTarget {
    Postgres(String),
    /// A SQLite database file.
    Sqlite(PathBuf),
}

impl DatabaseTarget {
    /// `postgres://` and `postgresql://` URLs are PostgreSQL; `sqlite://PATH`, `sqlite:PATH`
    /// and a bare path are SQLite files.
    pub fn parse(url: &str) -> anyhow::Result<DatabaseTarget> {
        let url = url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(DatabaseTarget::Postgres(url.to_owned()));
        }
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        if path.is_empty() || path.contains("://") {
            return Err(anyhow!(
                "database.url {url:?} is neither a postgres:// URL nor a SQLite file path"
            ));
        }
        Ok(DatabaseTarget::Sqlite(PathBuf::from(path)))
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self, DatabaseTarget::Sqlite(_))
    }

    /// A description safe to log: PostgreSQL passwords are masked.
    pub fn redacted(&self) -> String {
        match self {
            DatabaseTarget::Sqlite(path) => format!("SQLite file {}", path.display()),
            DatabaseTarget::Postgres(url) => format!("PostgreSQL {}", redact_url_password(url)),
        }
    }
}

fn redact_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((userinfo, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// Asks libpq to try a PostgreSQL on this machine without TLS first (`sslmode=allow`), unless
/// the URL says anything about TLS, names its host in its parameters, or `PGSSLMODE` is set.
/// libpq's own default (`prefer`) encrypts even loopback traffic, which never leaves the
/// machine, on both sides of the connection: in the benchmarks that cost about 3.5% of the
/// load's rate and 7% of the ingest's (docs/benchmarks.md). A server that accepts only TLS still gets it: `allow`
/// falls back to an encrypted connection.
fn with_local_sslmode(url: &str) -> String {
    let (rest, query) = url.split_once('?').unwrap_or((url, ""));
    let chooses = query.contains("ssl") || query.contains("host");
    if chooses || std::env::var_os("PGSSLMODE").is_some() || !on_this_machine(rest) {
        return url.to_owned();
    }
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}sslmode=allow")
}

/// Whether every host of a `postgres://` URL (without its parameters) is a loopback address or
/// `localhost`. A URL without a host uses the Unix socket, where TLS never applies.
fn on_this_machine(url: &str) -> bool {
    let Some((_, after_scheme)) = url.split_once("://") else {
        return false;
    };
    let authority = after_scheme.split('/').next().unwrap_or("");
    let hosts = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    !hosts.is_empty()
        && hosts.split(',').all(|host| {
            let name = match host.strip_prefix('[') {
                Some(bracketed) => bracketed.split(']').next().unwrap_or(""),
                None => host.split(':').next().unwrap_or(""),
            };
            name.eq_ignore_ascii_case("localhost")
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        })
}

/// Adds libpq's `connect_timeout` (whole seconds, at least 1) unless the URL sets one, so that
/// a database host that does not answer cannot hold a connection attempt for minutes.
fn with_connect_timeout(url: &str, timeout: Duration) -> String {
    if url.contains("connect_timeout=") {
        return url.to_owned();
    }
    let secs = timeout.as_secs().max(1);
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}connect_timeout={secs}")
}

type PgManager = ConnectionManager<PgConnection>;
type SqliteManager = ConnectionManager<SqliteConnection>;

/// A pooled connection to either backend. Code that must write different SQL per backend
/// matches on it; everything else just passes it along.
pub enum DbConn {
    Pg(PooledConnection<PgManager>),
    Sqlite(PooledConnection<SqliteManager>),
}

/// A connection pool to either backend, cheap to clone.
#[derive(Clone)]
pub enum DbPool {
    Pg(diesel::r2d2::Pool<PgManager>),
    Sqlite(diesel::r2d2::Pool<SqliteManager>),
}

/// Why a connection could not be had: callers on the request path turn this into a 503.
#[derive(Debug, thiserror::Error)]
#[error("database unavailable: {0}")]
pub struct PoolError(String);

#[derive(Debug)]
struct PgSession {
    statement_timeout_ms: u64,
}

impl CustomizeConnection<PgConnection, diesel::r2d2::Error> for PgSession {
    fn on_acquire(&self, conn: &mut PgConnection) -> Result<(), diesel::r2d2::Error> {
        conn.batch_execute(&format!(
            "SET statement_timeout = {}; SET lock_timeout = {}; SET application_name = 'intake'",
            self.statement_timeout_ms, self.statement_timeout_ms
        ))
        .map_err(diesel::r2d2::Error::QueryError)
    }
}

#[derive(Debug)]
struct SqliteSession {
    busy_timeout_ms: u64,
}

impl CustomizeConnection<SqliteConnection, diesel::r2d2::Error> for SqliteSession {
    fn on_acquire(&self, conn: &mut SqliteConnection) -> Result<(), diesel::r2d2::Error> {
        sqlite_session_setup(conn, self.busy_timeout_ms)
            .map_err(diesel::r2d2::Error::QueryError)?;
        // SQLite silently opens a file it cannot write read-only, and such a connection stays
        // read-only after the file is writable again. Refuse it here (the request gets a 503
        // and a later connection is made) rather than keep it in the pool for good.
        // (Taking the write lock is allowed on a read-only connection; writing the header, even
        // inside a transaction that is rolled back, is not.)
        conn.batch_execute("BEGIN IMMEDIATE; PRAGMA user_version = 0; ROLLBACK;")
            .map_err(diesel::r2d2::Error::QueryError)
    }
}

/// Puts this process's SQLite into multi-thread mode (no mutex per connection) and turns off
/// its memory statistics (a global mutex around every allocation). The system library is
/// built serialized, so every call locks the connection's mutex, and binding a chunk's
/// parameters one by one made those locks about 8% of the SQLite loader's CPU (`perf
/// record`). Safe because no connection is used by two threads at once: diesel's connections
/// take `&mut` for every call and are not `Sync`, and a pool lends each to one user at a time.
/// Call it first thing in `main`: SQLite accepts it only before it initializes, and otherwise
/// refuses and stays serialized, which is slower but just as correct. Returns whether SQLite
/// took both options.
#[allow(unsafe_code)]
pub fn sqlite_connections_without_mutexes() -> bool {
    use libsqlite3_sys::{SQLITE_CONFIG_MEMSTATUS, SQLITE_CONFIG_MULTITHREAD, SQLITE_OK};
    // SAFETY: sqlite3_config changes process-wide options without a lock, so it must not race
    // another SQLite call: it runs first in `main`, before any other thread exists. Once
    // SQLite is initialized it returns SQLITE_MISUSE and changes nothing. Each option gets
    // the arguments its documentation names (none; one int).
    let (threads, statistics) = unsafe {
        (
            libsqlite3_sys::sqlite3_config(SQLITE_CONFIG_MULTITHREAD),
            libsqlite3_sys::sqlite3_config(SQLITE_CONFIG_MEMSTATUS, 0 as std::ffi::c_int),
        )
    };
    threads == SQLITE_OK && statistics == SQLITE_OK
}

/// Bytes SQLite counts as allocated in this process (always 0 once
/// [`sqlite_connections_without_mutexes`] has turned its statistics off).
#[allow(unsafe_code)]
pub fn sqlite_memory_counted() -> i64 {
    // SAFETY: reads one counter; callable at any time from any thread.
    unsafe { libsqlite3_sys::sqlite3_memory_used() }
}

/// WAL lets readers run beside the writer; `synchronous = FULL` makes every commit durable
/// before it returns, which is what a 201 promises.
pub fn sqlite_session_setup(
    conn: &mut SqliteConnection,
    busy_timeout_ms: u64,
) -> diesel::QueryResult<()> {
    conn.batch_execute(&format!(
        "PRAGMA busy_timeout = {busy_timeout_ms}; PRAGMA journal_mode = WAL; \
         PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON;"
    ))
}

impl DbPool {
    /// A one-connection pool for command-line tools (see [`DbPool::sized`]).
    pub fn single(target: &DatabaseTarget, settings: &DatabaseSettings) -> anyhow::Result<DbPool> {
        DbPool::sized(target, settings, 1)
    }

    /// A pool of at most `size` connections for a tool that knows how many it uses at once.
    /// It opens them only when asked, never in the background: a connection still
    /// mid-handshake when a short-lived process exits can crash it. A tool is no request with
    /// a client waiting, so it waits for a connection as long as a statement may wait
    /// (`statement_timeout_ms`): opening a SQLite connection briefly takes the write lock,
    /// which another loader may be holding for a whole chunk.
    pub fn sized(
        target: &DatabaseTarget,
        settings: &DatabaseSettings,
        size: u32,
    ) -> anyhow::Result<DbPool> {
        let settings = DatabaseSettings {
            pool_size: size.max(1),
            checkout_timeout_ms: settings
                .checkout_timeout_ms
                .max(settings.statement_timeout_ms),
            ..settings.clone()
        };
        DbPool::build(target, &settings, 0)
    }

    /// Builds a pool without connecting, so that a process can start (and report not-ready)
    /// while the database is down; connections are made on demand, and two kept ready.
    pub fn new(target: &DatabaseTarget, settings: &DatabaseSettings) -> anyhow::Result<DbPool> {
        DbPool::build(target, settings, settings.pool_size.min(2))
    }

    fn build(
        target: &DatabaseTarget,
        settings: &DatabaseSettings,
        min_idle: u32,
    ) -> anyhow::Result<DbPool> {
        let checkout = Duration::from_millis(settings.checkout_timeout_ms.max(1));
        Ok(match target {
            DatabaseTarget::Postgres(url) => DbPool::Pg(
                diesel::r2d2::Pool::builder()
                    .max_size(settings.pool_size)
                    .min_idle(Some(min_idle))
                    .connection_timeout(checkout)
                    .test_on_check_out(true)
                    .connection_customizer(Box::new(PgSession {
                        statement_timeout_ms: settings.statement_timeout_ms,
                    }))
                    .build_unchecked(PgManager::new(with_connect_timeout(
                        &with_local_sslmode(url),
                        checkout,
                    ))),
            ),
            DatabaseTarget::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)
                        .with_context(|| format!("creating directory {}", dir.display()))?;
                }
                DbPool::Sqlite(
                    diesel::r2d2::Pool::builder()
                        .max_size(settings.pool_size)
                        .min_idle(Some(min_idle))
                        .connection_timeout(checkout)
                        .test_on_check_out(false)
                        .max_lifetime(Some(Duration::from_secs(600)))
                        .connection_customizer(Box::new(SqliteSession {
                            busy_timeout_ms: settings.statement_timeout_ms,
                        }))
                        .build_unchecked(SqliteManager::new(path.to_string_lossy())),
                )
            }
        })
    }

    /// A connection, waiting at most `timeout` for one (and at most the pool's own
    /// checkout timeout).
    pub fn get_timeout(&self, timeout: Duration) -> Result<DbConn, PoolError> {
        match self {
            DbPool::Pg(pool) => pool.get_timeout(timeout).map(DbConn::Pg),
            DbPool::Sqlite(pool) => pool.get_timeout(timeout).map(DbConn::Sqlite),
        }
        .map_err(|e| PoolError(e.to_string()))
    }

    pub fn get(&self) -> Result<DbConn, PoolError> {
        match self {
            DbPool::Pg(pool) => pool.get().map(DbConn::Pg),
            DbPool::Sqlite(pool) => pool.get().map(DbConn::Sqlite),
        }
        .map_err(|e| PoolError(e.to_string()))
    }

    pub fn is_sqlite(&self) -> bool {
        matches!(self, DbPool::Sqlite(_))
    }
}

/// A round trip to the database: what `GET /ready` reports.
pub fn ping(conn: &mut DbConn) -> diesel::QueryResult<()> {
    match conn {
        DbConn::Pg(c) => diesel::sql_query("SELECT 1").execute(&mut **c)?,
        DbConn::Sqlite(c) => diesel::sql_query("SELECT 1").execute(&mut **c)?,
    };
    Ok(())
}

/// Applies pending migrations. On PostgreSQL an advisory lock makes concurrent starts wait
/// for one another; on SQLite the file's write lock does, and a process that loses the race
/// re-checks and finds nothing left to do.
pub fn run_migrations(target: &DatabaseTarget, settings: &DatabaseSettings) -> anyhow::Result<()> {
    match target {
        DatabaseTarget::Postgres(url) => {
            let mut conn = PgConnection::establish(&with_local_sslmode(url))
                .with_context(|| format!("connecting to {}", target.redacted()))?;
            diesel::sql_query(format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
                .execute(&mut conn)?;
            let result = conn.run_pending_migrations(PG_MIGRATIONS).map(|_| ());
            diesel::sql_query(format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})"))
                .execute(&mut conn)?;
            result.map_err(|e| anyhow!("migrating {}: {e}", target.redacted()))
        }
        DatabaseTarget::Sqlite(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating directory {}", dir.display()))?;
            }
            let mut conn = SqliteConnection::establish(&path.to_string_lossy())
                .with_context(|| format!("opening {}", target.redacted()))?;
            sqlite_session_setup(&mut conn, settings.statement_timeout_ms.max(5_000))?;
            let mut last_error = None;
            for _ in 0..5 {
                match conn.run_pending_migrations(SQLITE_MIGRATIONS) {
                    Ok(_) => return Ok(()),
                    Err(e) => {
                        last_error = Some(e.to_string());
                        std::thread::sleep(Duration::from_millis(200));
                        if !conn
                            .has_pending_migration(SQLITE_MIGRATIONS)
                            .unwrap_or(true)
                        {
                            return Ok(());
                        }
                    }
                }
            }
            Err(anyhow!(
                "migrating {}: {}",
                target.redacted(),
                last_error.unwrap_or_default()
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_backend() {
        assert_eq!(
            DatabaseTarget::parse("postgres://u:p@h/db").unwrap_or_else(|e| panic!("{e}")),
            DatabaseTarget::Postgres("postgres://u:p@h/db".into())
        );
        assert_eq!(
            DatabaseTarget::parse("sqlite://data/intake.db").unwrap_or_else(|e| panic!("{e}")),
            DatabaseTarget::Sqlite("data/intake.db".into())
        );
        assert_eq!(
            DatabaseTarget::parse("/tmp/x.db").unwrap_or_else(|e| panic!("{e}")),
            DatabaseTarget::Sqlite("/tmp/x.db".into())
        );
        assert!(DatabaseTarget::parse("mysql://h/db").is_err());
        assert!(DatabaseTarget::parse("sqlite://").is_err());
    }

    #[test]
    fn connect_timeouts_are_added_once() {
        let t = Duration::from_millis(1500);
        assert_eq!(
            with_connect_timeout("postgres://h/db", t),
            "postgres://h/db?connect_timeout=1"
        );
        assert_eq!(
            with_connect_timeout("postgres://h/db?sslmode=disable", t),
            "postgres://h/db?sslmode=disable&connect_timeout=1"
        );
        assert_eq!(
            with_connect_timeout("postgres://h/db?connect_timeout=9", t),
            "postgres://h/db?connect_timeout=9"
        );
    }

    #[test]
    fn a_postgresql_on_this_machine_is_tried_without_tls_first() {
        if std::env::var_os("PGSSLMODE").is_some() {
            // The environment chooses; nothing is added (and nothing to check here).
            assert_eq!(with_local_sslmode("postgres://h/db"), "postgres://h/db");
            return;
        }
        for local in [
            "postgres://postgres@127.0.0.1:5432/test",
            "postgresql://bob:pw@localhost/db",
            "postgres://[::1]:5433/db",
            "postgres://LOCALHOST,127.0.0.2:5433/db",
        ] {
            assert_eq!(
                with_local_sslmode(local),
                format!("{local}?sslmode=allow"),
                "{local}"
            );
        }
        assert_eq!(
            with_local_sslmode("postgres://127.0.0.1/db?application_name=x"),
            "postgres://127.0.0.1/db?application_name=x&sslmode=allow"
        );
        for kept in [
            "postgres://db.example.com/db",
            "postgres://10.0.0.5:5432/db",
            "postgres://localhost,db.example.com/db",
            "postgres://127.0.0.1/db?sslmode=require",
            "postgres://127.0.0.1/db?sslrootcert=/etc/ca.pem",
            "postgres://localhost/db?host=/var/run/postgresql",
            "postgres:///db",
            "postgres://user@/db",
        ] {
            assert_eq!(with_local_sslmode(kept), kept, "{kept}");
        }
    }

    #[test]
    fn passwords_are_masked() {
        let t = DatabaseTarget::Postgres("postgres://bob:hunter2@db:5432/x".into());
        assert_eq!(t.redacted(), "PostgreSQL postgres://bob:***@db:5432/x");
    }
}
