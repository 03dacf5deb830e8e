//! `intake-key-admin grant-reader` as an operator and an analyst meet it: data pushed for two
//! clients and loaded by the real loader, a reader role granted for one client, and then what
//! that role can and cannot do when it connects. PostgreSQL only (SQLite has no roles; that it
//! refuses clearly is checked too).
//!
//! Roles belong to the whole PostgreSQL cluster, not to the test database, so each test names
//! its roles after its database and drops them when it ends, whether it passes or fails.

// Not every helper suits a PostgreSQL-only file (`both_backends!` among them).
#[allow(unused_macros, unused_imports)]
mod support;

use std::sync::Once;

use diesel::pg::PgConnection;
use diesel::sql_types::{BigInt, Bool, Text};
use diesel::{Connection, QueryableByName, RunQueryDsl};
use serde_json::Value;
use support::{Backend, Server, TestDb, issue_key, key_admin, load};

/// Every test role's name: `<test database>_<suffix>`, so leftovers can be traced to their
/// (possibly already dropped) database.
const TEST_ROLE_PATTERN: &str = "intake\\_t\\_%\\_r%";

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[derive(QueryableByName)]
struct RoleRow {
    #[diesel(sql_type = Bool)]
    rolcanlogin: bool,
    #[diesel(sql_type = Bool)]
    rolsuper: bool,
    #[diesel(sql_type = Text)]
    rolpassword: String,
}

#[derive(QueryableByName)]
struct Name {
    #[diesel(sql_type = Text)]
    name: String,
}

/// The name of the test's PostgreSQL database (the last segment of its URL).
fn database_name(db: &TestDb) -> String {
    let path = db.url.split('?').next().unwrap_or(&db.url);
    path.rsplit('/').next().unwrap_or_default().to_owned()
}

/// `url` with its user and password replaced.
fn as_user(url: &str, user: &str, password: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a URL with a scheme");
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    format!("{scheme}://{user}:{password}@{host}")
}

fn superuser(db: &TestDb) -> PgConnection {
    PgConnection::establish(&db.url).unwrap_or_else(|e| panic!("connecting to {}: {e}", db.url))
}

/// A reader role of this test, dropped (with its grants) when the test ends.
struct RoleGuard {
    url: String,
    name: String,
}

impl RoleGuard {
    fn new(db: &TestDb, suffix: &str) -> RoleGuard {
        sweep_leftover_roles(db);
        RoleGuard {
            url: db.url.clone(),
            name: format!("{}_{suffix}", database_name(db)),
        }
    }
}

impl Drop for RoleGuard {
    fn drop(&mut self) {
        // Never panic here: this also runs while a failed test unwinds.
        let mut conn = match PgConnection::establish(&self.url) {
            Ok(conn) => conn,
            Err(e) => return eprintln!("cannot connect to drop role {}: {e}", self.name),
        };
        let exists =
            diesel::sql_query("SELECT rolname::text AS name FROM pg_roles WHERE rolname = $1")
                .bind::<Text, _>(&self.name)
                .load::<Name>(&mut conn)
                .map(|rows| !rows.is_empty())
                .unwrap_or(true);
        if !exists {
            return;
        }
        // DROP OWNED revokes the role's grants and default privileges in this database (the
        // only one it has any in); then the role can go.
        let role = format!("\"{}\"", self.name);
        for sql in [
            format!("DROP OWNED BY {role}"),
            format!("DROP ROLE IF EXISTS {role}"),
        ] {
            if let Err(e) = diesel::sql_query(&sql).execute(&mut conn) {
                eprintln!("cleaning up: {sql}: {e}");
            }
        }
    }
}

/// Drops roles left by test runs that were killed outright, once their database is gone
/// (then they hold no privileges anywhere and can simply be dropped).
fn sweep_leftover_roles(db: &TestDb) {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let mut conn = superuser(db);
        let Ok(orphans) = diesel::sql_query(
            "SELECT r.rolname::text AS name FROM pg_roles r WHERE r.rolname LIKE $1 \
             AND NOT EXISTS (SELECT 1 FROM pg_database d \
                             WHERE r.rolname LIKE d.datname || '\\_%')",
        )
        .bind::<Text, _>(TEST_ROLE_PATTERN)
        .load::<Name>(&mut conn) else {
            return;
        };
        for Name { name } in orphans {
            let _ = diesel::sql_query(format!("DROP ROLE IF EXISTS \"{name}\"")).execute(&mut conn);
        }
    });
}

/// `grant-reader --client N --role ROLE --json`, which must succeed; returns the password.
#[track_caller]
fn grant_reader(db: &TestDb, client_id: i64, role: &str) -> String {
    let client = client_id.to_string();
    let out = key_admin(
        db,
        &[
            "grant-reader",
            "--client",
            &client,
            "--role",
            role,
            "--json",
        ],
    );
    out.assert_success();
    let granted: Value = serde_json::from_str(out.stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "grant-reader --json printed no JSON ({e}): {:?}",
            out.stdout
        )
    });
    assert_eq!(granted["role"], role, "{granted}");
    assert_eq!(granted["client_id"], client_id, "{granted}");
    let password = granted["password"]
        .as_str()
        .unwrap_or_else(|| panic!("no password: {granted}"))
        .to_owned();
    assert!(
        password.len() >= 22 && password.bytes().all(|b| b.is_ascii_alphanumeric()),
        "a long alphanumeric password: {password:?}"
    );
    password
}

/// The role's `pg_authid` row, read as the superuser. The test cluster trusts local
/// connections, so logging in proves nothing about the password; this shows it was set.
#[track_caller]
fn role_row(db: &TestDb, role: &str) -> RoleRow {
    diesel::sql_query(
        "SELECT rolcanlogin, rolsuper, COALESCE(rolpassword, '') AS rolpassword \
         FROM pg_authid WHERE rolname = $1",
    )
    .bind::<Text, _>(role)
    .get_result(&mut superuser(db))
    .unwrap_or_else(|e| panic!("role {role} not found: {e}"))
}

/// A connection as the reader role.
struct Reader(PgConnection);

impl Reader {
    fn connect(db: &TestDb, role: &str, password: &str) -> Reader {
        let url = as_user(&db.url, role, password);
        Reader(
            PgConnection::establish(&url).unwrap_or_else(|e| panic!("connecting as {role}: {e}")),
        )
    }

    fn count(&mut self, table: &str) -> Result<i64, String> {
        diesel::sql_query(format!("SELECT COUNT(*) AS n FROM {table}"))
            .get_result::<Count>(&mut self.0)
            .map(|c| c.n)
            .map_err(|e| e.to_string())
    }

    fn execute(&mut self, sql: &str) -> Result<usize, String> {
        diesel::sql_query(sql)
            .execute(&mut self.0)
            .map_err(|e| e.to_string())
    }

    #[track_caller]
    fn assert_count(&mut self, table: &str, expected: i64) {
        match self.count(table) {
            Ok(n) => assert_eq!(n, expected, "rows of {table}"),
            Err(e) => panic!("the reader cannot read {table}: {e}"),
        }
    }

    #[track_caller]
    fn assert_refused(&mut self, sql: &str) {
        match self.execute(sql) {
            Ok(_) => panic!("the reader was allowed: {sql}"),
            Err(e) => assert!(
                e.contains("permission denied") || e.contains("must be owner"),
                "{sql}: {e}"
            ),
        }
    }
}

#[test]
fn a_reader_sees_its_client_and_nothing_else() {
    let db = TestDb::new(Backend::Postgres);
    let role = RoleGuard::new(&db, "r1");
    let server = Server::start(&db, &[]);
    let (_, key_1) = issue_key(&db, 1, "client 1");
    let (_, key_2) = issue_key(&db, 2, "client 2");
    server
        .push(
            1,
            "orders",
            &key_1,
            r#"[{"id": 1, "keys": ["id"], "total": 5}, {"id": 2, "keys": ["id"], "total": 7}]"#,
        )
        .assert_created();
    server
        .push(
            2,
            "orders",
            &key_2,
            r#"{"id": 9, "keys": ["id"], "total": 1}"#,
        )
        .assert_created();
    load(&db);

    let password = grant_reader(&db, 1, &role.name);
    let row = role_row(&db, &role.name);
    assert!(row.rolcanlogin && !row.rolsuper);
    assert!(
        row.rolpassword.starts_with("SCRAM-SHA-256$"),
        "a password was set: {:?}",
        row.rolpassword
    );

    let mut reader = Reader::connect(&db, &role.name, &password);
    reader.assert_count("client_1.orders", 2);
    reader
        .count("client_1._intake_load_history")
        .expect("the client's own system tables are readable too");
    // Other clients, staging, keys and Intake's own tables are out of reach.
    for table in [
        "client_2.orders",
        "staged_records",
        "api_keys",
        "warehouse_clients",
        "staging_sequences",
    ] {
        reader.assert_refused(&format!("SELECT COUNT(*) FROM {table}"));
    }
    // Reading is all it can do, in its own schema too.
    for sql in [
        "INSERT INTO client_1.orders (id, total) VALUES (3, 1)",
        "UPDATE client_1.orders SET total = 0",
        "DELETE FROM client_1.orders",
        "TRUNCATE client_1.orders",
        "CREATE TABLE client_1.mine (x int)",
        "CREATE TABLE public.mine (x int)",
        "DROP TABLE client_1.orders",
    ] {
        reader.assert_refused(sql);
    }

    // A table created by a later load is readable without granting again.
    server
        .push(
            1,
            "refunds",
            &key_1,
            r#"{"id": 1, "keys": ["id"], "amount": 5}"#,
        )
        .assert_created();
    server
        .push(
            2,
            "refunds",
            &key_2,
            r#"{"id": 1, "keys": ["id"], "amount": 5}"#,
        )
        .assert_created();
    load(&db);
    reader.assert_count("client_1.refunds", 1);
    reader.assert_refused("SELECT COUNT(*) FROM client_2.refunds");
    drop(reader);

    // Granting again rotates the password and keeps the access.
    let rotated = grant_reader(&db, 1, &role.name);
    assert_ne!(rotated, password);
    let after = role_row(&db, &role.name);
    assert!(after.rolcanlogin);
    assert_ne!(
        after.rolpassword, row.rolpassword,
        "the stored password changed"
    );
    let mut reader = Reader::connect(&db, &role.name, &rotated);
    reader.assert_count("client_1.orders", 2);
    reader.assert_count("client_1.refunds", 1);
    reader.assert_refused("SELECT COUNT(*) FROM client_2.orders");
    reader.assert_refused("SELECT COUNT(*) FROM staged_records");
}

/// An analyst can be set up before a client's first load: the schema is created empty, and
/// the loader fills it with tables the reader can read.
#[test]
fn a_grant_made_before_the_first_load_covers_it() {
    let db = TestDb::new(Backend::Postgres);
    let role = RoleGuard::new(&db, "r3");
    let password = grant_reader(&db, 3, &role.name);
    let mut reader = Reader::connect(&db, &role.name, &password);
    reader.assert_refused("CREATE TABLE client_3.mine (x int)");

    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, 3, "client 3");
    server
        .push(
            3,
            "events",
            &key,
            r#"{"id": "a", "keys": ["id"], "items": [{"n": 1}]}"#,
        )
        .assert_created();
    load(&db);
    reader.assert_count("client_3.events", 1);
    reader.assert_count("client_3.events__items", 1);
}

/// Mistakes are refused before anything changes: bad client ids and role names, and roles
/// grant-reader did not make (such as the one it connects as).
#[test]
fn grant_reader_refuses_what_it_must_not_touch() {
    let db = TestDb::new(Backend::Postgres);
    let role = RoleGuard::new(&db, "r4");
    let refused = |args: &[&str], why: &str| {
        let mut all = vec!["grant-reader"];
        all.extend_from_slice(args);
        let out = key_admin(&db, &all);
        assert!(!out.status.success(), "{args:?} must be refused");
        assert!(
            out.stderr.contains(why),
            "{args:?}: expected {why:?} in {:?}",
            out.stderr
        );
        assert!(
            out.stdout.trim().is_empty(),
            "nothing printed: {}",
            out.stdout
        );
    };
    refused(&["--client", "0", "--role", &role.name], "positive");
    refused(&["--client", "1", "--role", "Bad-Name"], "not allowed");
    refused(&["--client", "1", "--role", "pg_reader"], "reserved");
    refused(&["--client", "1", "--role", "postgres"], "cannot be");
    // A role that exists but was not made by grant-reader for this client is left alone.
    grant_reader(&db, 1, &role.name);
    refused(&["--client", "2", "--role", &role.name], "already exists");
    let mut conn = superuser(&db);
    let schemas: Vec<Name> = diesel::sql_query(
        "SELECT nspname::text AS name FROM pg_namespace WHERE nspname LIKE 'client\\_%' ORDER BY 1",
    )
    .load(&mut conn)
    .expect("listing schemas");
    let schemas: Vec<String> = schemas.into_iter().map(|n| n.name).collect();
    assert_eq!(schemas, ["client_1"], "refused runs created nothing");
}

/// SQLite has no roles: the command says so, exits non-zero, and does not create a database.
#[test]
fn grant_reader_explains_that_sqlite_has_no_roles() {
    let db = TestDb::new(Backend::Sqlite);
    let out = key_admin(&db, &["grant-reader", "--client", "1"]);
    assert!(!out.status.success(), "must fail on SQLite");
    assert!(
        out.stderr.contains("PostgreSQL") && out.stderr.contains("SQLite"),
        "{}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert!(
        !db.dir().join("data").exists(),
        "no SQLite database was created"
    );
}
