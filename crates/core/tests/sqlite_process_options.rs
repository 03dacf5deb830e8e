//! SQLite's process-wide options (`db::sqlite_connections_without_mutexes`), in a test binary
//! of their own: SQLite takes them only before its first connection, so this file holds one
//! test, and no other test of its process opens SQLite first.

use diesel::connection::SimpleConnection;
use diesel::{Connection, SqliteConnection};
use intake_core::db::{sqlite_connections_without_mutexes, sqlite_memory_counted};

#[test]
fn sqlite_takes_its_process_options_before_its_first_connection_only() {
    assert!(
        sqlite_connections_without_mutexes(),
        "the linked SQLite refused multi-thread mode or turning its statistics off"
    );
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("options.db");
    let mut conn =
        SqliteConnection::establish(&path.to_string_lossy()).expect("a SQLite connection");
    conn.batch_execute(
        "CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT);
         INSERT INTO t (v) VALUES ('one'), ('two'), ('three');",
    )
    .expect("statements run");
    // With its statistics on, SQLite counts the connection's memory (tens of KiB).
    assert_eq!(sqlite_memory_counted(), 0, "SQLite still counts its memory");
    assert!(
        !sqlite_connections_without_mutexes(),
        "SQLite took the options again after it initialized"
    );
}
