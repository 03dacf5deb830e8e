//! The `api_keys` table: issuing, listing, revoking and looking up keys.

use chrono::{DateTime, Utc};
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Nullable, Text, Timestamptz};

use crate::db::DbConn;
use crate::keys::NewKey;
use crate::timestamps::{self, parse_sqlite_text, sqlite_text};

/// What `intake-key-admin list` shows: everything about a key except its secret and hash.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KeyInfo {
    pub key_id: String,
    pub client_id: i64,
    pub label: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_reason: Option<String>,
}

/// What the server needs to decide whether a presented key is good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyCredentials {
    pub client_id: i64,
    pub secret_hash: String,
    pub revoked: bool,
}

/// Outcome of a revocation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    AlreadyRevoked,
    UnknownKey,
}

#[derive(QueryableByName)]
struct PgKeyRow {
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = BigInt)]
    client_id: i64,
    #[diesel(sql_type = Text)]
    label: String,
    #[diesel(sql_type = Timestamptz)]
    created_at: DateTime<Utc>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    last_used_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Timestamptz>)]
    revoked_at: Option<DateTime<Utc>>,
    #[diesel(sql_type = Nullable<Text>)]
    revoked_reason: Option<String>,
}

#[derive(QueryableByName)]
struct SqliteKeyRow {
    #[diesel(sql_type = Text)]
    key_id: String,
    #[diesel(sql_type = BigInt)]
    client_id: i64,
    #[diesel(sql_type = Text)]
    label: String,
    #[diesel(sql_type = Text)]
    created_at: String,
    #[diesel(sql_type = Nullable<Text>)]
    last_used_at: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    revoked_at: Option<String>,
    #[diesel(sql_type = Nullable<Text>)]
    revoked_reason: Option<String>,
}

#[derive(QueryableByName)]
struct CredentialsRow {
    #[diesel(sql_type = BigInt)]
    client_id: i64,
    #[diesel(sql_type = Text)]
    secret_hash: String,
    #[diesel(sql_type = diesel::sql_types::Bool)]
    revoked: bool,
}

const KEY_COLUMNS: &str =
    "key_id, client_id, label, created_at, last_used_at, revoked_at, revoked_reason";

/// Stores a newly generated key (its hash only).
pub fn insert_key(conn: &mut DbConn, key: &NewKey, client_id: i64, label: &str) -> QueryResult<()> {
    let now = timestamps::now();
    let sql = "INSERT INTO api_keys (key_id, client_id, label, secret_hash, created_at) \
               VALUES ($1, $2, $3, $4, $5)";
    match conn {
        DbConn::Pg(c) => diesel::sql_query(sql)
            .bind::<Text, _>(&key.key_id)
            .bind::<BigInt, _>(client_id)
            .bind::<Text, _>(label)
            .bind::<Text, _>(&key.secret_hash)
            .bind::<Timestamptz, _>(now)
            .execute(&mut **c),
        DbConn::Sqlite(c) => diesel::sql_query(sql)
            .bind::<Text, _>(&key.key_id)
            .bind::<BigInt, _>(client_id)
            .bind::<Text, _>(label)
            .bind::<Text, _>(&key.secret_hash)
            .bind::<Text, _>(sqlite_text(now))
            .execute(&mut **c),
    }
    .map(|_| ())
}

/// All keys, or one client's, oldest first.
pub fn list_keys(conn: &mut DbConn, client_id: Option<i64>) -> QueryResult<Vec<KeyInfo>> {
    let filter = if client_id.is_some() {
        "WHERE client_id = $1"
    } else {
        ""
    };
    let sql = format!("SELECT {KEY_COLUMNS} FROM api_keys {filter} ORDER BY created_at, key_id");
    match conn {
        DbConn::Pg(c) => {
            let rows: Vec<PgKeyRow> = match client_id {
                Some(id) => diesel::sql_query(sql)
                    .bind::<BigInt, _>(id)
                    .load(&mut **c)?,
                None => diesel::sql_query(sql).load(&mut **c)?,
            };
            Ok(rows
                .into_iter()
                .map(|r| KeyInfo {
                    key_id: r.key_id,
                    client_id: r.client_id,
                    label: r.label,
                    created_at: r.created_at,
                    last_used_at: r.last_used_at,
                    revoked_at: r.revoked_at,
                    revoked_reason: r.revoked_reason,
                })
                .collect())
        }
        DbConn::Sqlite(c) => {
            let rows: Vec<SqliteKeyRow> = match client_id {
                Some(id) => diesel::sql_query(sql)
                    .bind::<BigInt, _>(id)
                    .load(&mut **c)?,
                None => diesel::sql_query(sql).load(&mut **c)?,
            };
            let time = |t: &str| parse_sqlite_text(t).unwrap_or_default();
            Ok(rows
                .into_iter()
                .map(|r| KeyInfo {
                    created_at: time(&r.created_at),
                    last_used_at: r.last_used_at.as_deref().map(time),
                    revoked_at: r.revoked_at.as_deref().map(time),
                    key_id: r.key_id,
                    client_id: r.client_id,
                    label: r.label,
                    revoked_reason: r.revoked_reason,
                })
                .collect())
        }
    }
}

/// Marks a key revoked with a reason and time. Revoking twice keeps the first record.
pub fn revoke_key(conn: &mut DbConn, key_id: &str, reason: &str) -> QueryResult<Revocation> {
    let now = timestamps::now();
    let sql = "UPDATE api_keys SET revoked_at = $1, revoked_reason = $2 \
               WHERE key_id = $3 AND revoked_at IS NULL";
    let changed = match conn {
        DbConn::Pg(c) => diesel::sql_query(sql)
            .bind::<Timestamptz, _>(now)
            .bind::<Text, _>(reason)
            .bind::<Text, _>(key_id)
            .execute(&mut **c)?,
        DbConn::Sqlite(c) => diesel::sql_query(sql)
            .bind::<Text, _>(sqlite_text(now))
            .bind::<Text, _>(reason)
            .bind::<Text, _>(key_id)
            .execute(&mut **c)?,
    };
    if changed > 0 {
        return Ok(Revocation::Revoked);
    }
    Ok(match find_credentials(conn, key_id)? {
        Some(_) => Revocation::AlreadyRevoked,
        None => Revocation::UnknownKey,
    })
}

/// The hash, client and revocation state of a key id, if it exists.
pub fn find_credentials(conn: &mut DbConn, key_id: &str) -> QueryResult<Option<KeyCredentials>> {
    let sql = "SELECT client_id, secret_hash, revoked_at IS NOT NULL AS revoked \
               FROM api_keys WHERE key_id = $1";
    let row: Option<CredentialsRow> = match conn {
        DbConn::Pg(c) => diesel::sql_query(sql)
            .bind::<Text, _>(key_id)
            .get_result(&mut **c)
            .optional()?,
        DbConn::Sqlite(c) => diesel::sql_query(sql)
            .bind::<Text, _>(key_id)
            .get_result(&mut **c)
            .optional()?,
    };
    Ok(row.map(|r| KeyCredentials {
        client_id: r.client_id,
        secret_hash: r.secret_hash,
        revoked: r.revoked,
    }))
}

/// Records that keys were used, in one statement for a whole batch of keys.
pub fn touch_last_used(
    conn: &mut DbConn,
    key_ids: &[String],
    at: DateTime<Utc>,
) -> QueryResult<()> {
    if key_ids.is_empty() {
        return Ok(());
    }
    match conn {
        DbConn::Pg(c) => diesel::sql_query(
            "UPDATE api_keys SET last_used_at = $1 WHERE key_id = ANY($2) \
             AND (last_used_at IS NULL OR last_used_at < $1)",
        )
        .bind::<Timestamptz, _>(at)
        .bind::<Array<Text>, _>(key_ids)
        .execute(&mut **c)?,
        DbConn::Sqlite(c) => {
            let ids = serde_json::to_string(key_ids).unwrap_or_else(|_| "[]".into());
            diesel::sql_query(
                "UPDATE api_keys SET last_used_at = $1 \
                 WHERE key_id IN (SELECT value FROM json_each($2)) \
                 AND (last_used_at IS NULL OR last_used_at < $1)",
            )
            .bind::<Text, _>(sqlite_text(at))
            .bind::<Text, _>(ids)
            .execute(&mut **c)?
        }
    };
    Ok(())
}
