//! Read-only PostgreSQL login roles for analysts (`intake-key-admin grant-reader`).
//!
//! A reader role can connect to the database and `SELECT` from one client's warehouse schema,
//! `client_<id>`: the tables there now and, through default privileges of the role the loader
//! creates tables as, every table a later load adds. It gets nothing else: no staging, no keys,
//! no other client's schema, no writes. API keys only push; this is the way to read.
//!
//! SQLite has no roles or per-user permissions, so there this refuses with [`SQLITE_UNSUPPORTED`].

use anyhow::{Context, bail};
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Bool, Text};

use crate::db::DbConn;
use crate::keys::{SECRET_ALPHABET, random_string};

/// Why `grant-reader` cannot work on SQLite, and what to do instead.
pub const SQLITE_UNSUPPORTED: &str = "grant-reader needs PostgreSQL: SQLite has no database \
     roles or permissions. Give analysts a copy of the SQLite file, or use PostgreSQL (see \
     docs/warehouse.md, \"Giving analysts access\")";

/// Characters of a generated password: 32 alphanumerics are 190 bits from the OS RNG. Being
/// alphanumeric it can be written as an SQL literal (PostgreSQL takes no bind parameter in
/// `ALTER ROLE ... PASSWORD`) and in a connection URL without any escaping.
const PASSWORD_LEN: usize = 32;

/// PostgreSQL's identifier limit, in bytes.
const MAX_ROLE_NAME_LEN: usize = 63;

/// Arbitrary constant naming grant-reader's lock among PostgreSQL advisory locks, so that two
/// runs at once take turns instead of one failing half-way through creating the same role.
const GRANT_LOCK_KEY: i64 = 0x1A7A_4E00_0002;

/// A reader role as granted: the password is shown once and not kept anywhere by Intake.
#[derive(Debug)]
pub struct ReaderGrant {
    pub role: String,
    pub password: String,
    pub client_id: i64,
    /// Whether the role was created now (rather than its password rotated).
    pub created: bool,
}

/// The role name used when none is given: `intake_reader_<client id>`.
pub fn default_role_name(client_id: i64) -> String {
    format!("intake_reader_{client_id}")
}

/// A client's warehouse schema, as the loader names it (docs/warehouse.md).
pub fn client_schema(client_id: i64) -> String {
    format!("client_{client_id}")
}

/// Role names must be plain lower-case identifiers, so that they need no quoting in a
/// connection URL or in `psql`, and may not use PostgreSQL's reserved `pg_` prefix.
pub fn check_role_name(name: &str) -> Result<(), String> {
    let first_ok = name
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    let rest_ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !(first_ok && rest_ok) || name.len() > MAX_ROLE_NAME_LEN {
        return Err(format!(
            "role name {name:?} is not allowed: use 1 to {MAX_ROLE_NAME_LEN} characters of \
             a-z, 0-9 and '_', not starting with a digit"
        ));
    }
    if name.starts_with("pg_") {
        return Err(format!(
            "role name {name:?} is not allowed: the pg_ prefix is reserved by PostgreSQL"
        ));
    }
    Ok(())
}

/// Marks a role as made by grant-reader for one client, so that rerunning rotates only roles
/// it made, and never the password of an unrelated (say, the loader's own) role.
fn role_comment(client_id: i64) -> String {
    format!("intake reader role for client {client_id} (intake-key-admin grant-reader)")
}

/// Creates `role`, or rotates its password if grant-reader made it earlier for the same client,
/// and grants it read access to `client_<client_id>` only. `loader_role` is the role the loader
/// connects as, whose future tables the reader must see; `None` means the role this connection
/// uses. Everything happens in one transaction: on error nothing changes.
pub fn grant_reader(
    conn: &mut DbConn,
    client_id: i64,
    role: &str,
    loader_role: Option<&str>,
) -> anyhow::Result<ReaderGrant> {
    if client_id <= 0 {
        bail!("client ids are positive integers, not {client_id}");
    }
    check_role_name(role).map_err(anyhow::Error::msg)?;
    let DbConn::Pg(pg) = conn else {
        bail!(SQLITE_UNSUPPORTED);
    };
    let password = random_string(SECRET_ALPHABET, PASSWORD_LEN)?;
    let created =
        pg.transaction(|pg| grant_in_transaction(pg, client_id, role, loader_role, &password))?;
    Ok(ReaderGrant {
        role: role.to_owned(),
        password,
        client_id,
        created,
    })
}

#[derive(QueryableByName)]
struct Session {
    #[diesel(sql_type = Text)]
    database: String,
    #[diesel(sql_type = Text)]
    role_name: String,
    #[diesel(sql_type = Bool)]
    has_public: bool,
}

#[derive(QueryableByName)]
struct ExistingRole {
    #[diesel(sql_type = Bool)]
    superuser: bool,
    #[diesel(sql_type = Text)]
    comment: String,
}

#[derive(QueryableByName)]
struct Found {
    #[diesel(sql_type = Bool)]
    found: bool,
}

/// Returns whether the role was created (`false`: its password was rotated).
fn grant_in_transaction(
    pg: &mut PgConnection,
    client_id: i64,
    role: &str,
    loader_role: Option<&str>,
    password: &str,
) -> anyhow::Result<bool> {
    diesel::sql_query(format!("SELECT pg_advisory_xact_lock({GRANT_LOCK_KEY})")).execute(pg)?;
    let session: Session = diesel::sql_query(
        "SELECT current_database()::text AS database, current_user::text AS role_name, \
                EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'public') AS has_public",
    )
    .get_result(pg)?;
    let loader_role = loader_role.unwrap_or(&session.role_name);
    if role == session.role_name || role == loader_role {
        bail!("the reader role cannot be {role:?}, the role the loader or this command uses");
    }
    let loader_exists: Found =
        diesel::sql_query("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1) AS found")
            .bind::<Text, _>(loader_role)
            .get_result(pg)?;
    if !loader_exists.found {
        bail!("there is no role {loader_role:?} (--loader-role) in this cluster");
    }
    let existing: Option<ExistingRole> = diesel::sql_query(
        "SELECT rolsuper AS superuser, \
                COALESCE(shobj_description(oid, 'pg_authid'), '') AS comment \
         FROM pg_roles WHERE rolname = $1",
    )
    .bind::<Text, _>(role)
    .get_result(pg)
    .optional()?;

    let comment = role_comment(client_id);
    let (role_q, pw_q) = (quote_ident(role), quote_literal(password));
    let mut sql = String::new();
    let created = match existing {
        None => {
            sql.push_str(&format!(
                "CREATE ROLE {role_q} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOINHERIT \
                 NOREPLICATION NOBYPASSRLS PASSWORD {pw_q};\
                 COMMENT ON ROLE {role_q} IS {};",
                quote_literal(&comment)
            ));
            true
        }
        Some(found) if found.comment == comment && !found.superuser => {
            sql.push_str(&format!("ALTER ROLE {role_q} WITH LOGIN PASSWORD {pw_q};"));
            false
        }
        Some(_) => bail!(
            "a role {role:?} already exists and is not a reader role made by grant-reader for \
             client {client_id}; leaving it alone (choose another name with --role)"
        ),
    };
    let database = quote_ident(&session.database);
    let schema = quote_ident(&client_schema(client_id));
    let loader = quote_ident(loader_role);
    // Revoke first, then grant exactly what a reader needs, so that rerunning also removes
    // anything granted to the role by hand since. Privileges held by PUBLIC (every role) are
    // the database's own policy and are left as they are.
    if session.has_public {
        // Staging, keys and the other fixed tables live in `public`.
        sql.push_str(&format!(
            "REVOKE ALL ON SCHEMA public FROM {role_q};\
             REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role_q};\
             REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role_q};"
        ));
    }
    sql.push_str(&format!(
        "GRANT CONNECT ON DATABASE {database} TO {role_q};\
         CREATE SCHEMA IF NOT EXISTS {schema} AUTHORIZATION {loader};\
         REVOKE ALL ON SCHEMA {schema} FROM {role_q};\
         REVOKE ALL ON ALL TABLES IN SCHEMA {schema} FROM {role_q};\
         GRANT USAGE ON SCHEMA {schema} TO {role_q};\
         GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role_q};\
         ALTER DEFAULT PRIVILEGES FOR ROLE {loader} IN SCHEMA {schema} \
           GRANT SELECT ON TABLES TO {role_q};"
    ));
    pg.batch_execute(&sql)
        .with_context(|| format!("granting {role} read access to schema client_{client_id}"))?;
    Ok(created)
}

/// An SQL identifier in double quotes, inner quotes doubled.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// An SQL string literal, inner quotes doubled. (Passwords are alphanumeric, so this is belt
/// and braces; a backslash is literal because `standard_conforming_strings` is on.)
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_are_plain_identifiers() {
        for ok in ["intake_reader_42", "_r", "a", &"r".repeat(63)] {
            assert_eq!(check_role_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "1abc",
            "Reader",
            "reader-1",
            "r\"; DROP ROLE postgres; --",
            "r r",
            "pg_reader",
            &"r".repeat(64),
        ] {
            assert!(check_role_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(check_role_name(&default_role_name(42)), Ok(()));
        assert_eq!(
            check_role_name(&default_role_name(i64::MAX)),
            Ok(()),
            "the longest default name fits"
        );
    }

    #[test]
    fn quoting_doubles_quotes() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn passwords_are_long_alphanumeric_and_distinct() {
        let a = random_string(SECRET_ALPHABET, PASSWORD_LEN).expect("password");
        let b = random_string(SECRET_ALPHABET, PASSWORD_LEN).expect("password");
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, b);
        // At least 128 bits: log2(62) * 32 ≈ 190.
        assert!((SECRET_ALPHABET.len() as f64).log2() * PASSWORD_LEN as f64 >= 128.0);
    }
}
