//! A database made for one benchmark run and removed after it.

use std::path::PathBuf;

use anyhow::Context;
use diesel::{Connection, RunQueryDsl};
use intake_core::db::{self, DatabaseTarget, DbPool};
use intake_core::settings::DatabaseSettings;

/// Where PostgreSQL is; override with INTAKE_BENCH_PG_URL (a server URL without database).
fn pg_server() -> String {
    std::env::var("INTAKE_BENCH_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A connection to the server's `postgres` database, for creating and dropping databases
/// and reading settings.
fn admin_connection() -> anyhow::Result<diesel::PgConnection> {
    diesel::PgConnection::establish(&format!("{}/postgres", pg_server()))
        .context("connecting to PostgreSQL (set INTAKE_BENCH_PG_URL)")
}

pub struct FreshDb {
    url: String,
    pg_name: Option<String>,
    dir: Option<tempdir::TempDir>,
    owned: bool,
}

pub(crate) mod tempdir {
    /// A directory removed on drop.
    pub struct TempDir(pub std::path::PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[derive(diesel::QueryableByName)]
struct ServerSettings {
    #[diesel(sql_type = diesel::sql_types::Text)]
    line: String,
}

/// PostgreSQL's version and the two settings that set the pace of a large load (see
/// docs/configuration.md), for the heading of a run: figures mean little without them.
pub fn pg_server_line() -> anyhow::Result<String> {
    let mut admin = admin_connection()?;
    let row: ServerSettings = diesel::sql_query(
        "SELECT 'PostgreSQL ' || current_setting('server_version') || ': shared_buffers ' || \
           current_setting('shared_buffers') || ', max_wal_size ' || \
           current_setting('max_wal_size') AS line",
    )
    .get_result(&mut admin)?;
    Ok(row.line)
}

pub fn settings() -> DatabaseSettings {
    DatabaseSettings {
        url: String::new(),
        pool_size: 4,
        checkout_timeout_ms: 10_000,
        statement_timeout_ms: 600_000,
        migrate_on_start: true,
    }
}

impl FreshDb {
    /// Creates and migrates a new database.
    pub fn create(postgres: bool) -> anyhow::Result<FreshDb> {
        let tag = format!("{}_{}", std::process::id(), rand::random::<u32>());
        let db = if postgres {
            let name = format!("intake_bench_{tag}");
            let mut admin = admin_connection()?;
            diesel::sql_query(format!("CREATE DATABASE {name}")).execute(&mut admin)?;
            // Start from a clean slate: flush what earlier runs left dirty, so that their
            // checkpoint does not land in this run's figures. (Needs a superuser; best effort.)
            let _ = diesel::sql_query("CHECKPOINT").execute(&mut admin);
            FreshDb {
                url: format!("{}/{name}", pg_server()),
                pg_name: Some(name),
                dir: None,
                owned: true,
            }
        } else {
            let dir = std::env::temp_dir().join(format!("intake-bench-{tag}"));
            std::fs::create_dir_all(&dir)?;
            let url = format!("sqlite://{}", dir.join("intake.db").display());
            FreshDb {
                url,
                pg_name: None,
                dir: Some(tempdir::TempDir(dir)),
                owned: true,
            }
        };
        db::run_migrations(&DatabaseTarget::parse(&db.url)?, &settings())?;
        Ok(db)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The PostgreSQL database's name (None for SQLite).
    pub fn pg_name(&self) -> Option<&str> {
        self.pg_name.as_deref()
    }

    /// The directory on this machine where the database's commits are flushed to disk:
    /// SQLite's own directory, or the one holding PostgreSQL's `pg_wal` when the server runs
    /// here (reading `data_directory` needs a superuser; `None` otherwise).
    pub fn log_dir(&self) -> Option<PathBuf> {
        match &self.dir {
            Some(dir) => Some(dir.0.clone()),
            None => {
                let mut admin = admin_connection().ok()?;
                let row: ServerSettings =
                    diesel::sql_query("SELECT current_setting('data_directory') AS line")
                        .get_result(&mut admin)
                        .ok()?;
                crate::fsync_probe::pg_wal_parent(&row.line)
            }
        }
    }

    pub fn pool(&self) -> anyhow::Result<DbPool> {
        DbPool::new(&DatabaseTarget::parse(&self.url)?, &settings())
    }
}

impl Drop for FreshDb {
    fn drop(&mut self) {
        if let (true, Some(name)) = (self.owned, &self.pg_name)
            && let Ok(mut admin) = admin_connection()
        {
            let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut admin);
        }
    }
}
