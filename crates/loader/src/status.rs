//! `intake-loader status`: what is waiting, what the last loads did, what was rejected.

use diesel::QueryResult;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Nullable, Text};

use crate::catalog::{HISTORY_TABLE, REJECTED_TABLE};
use intake_core::db::DbConn;
use intake_core::staging::PendingCount;

use crate::pass::conn_of;

#[derive(Debug, Clone, serde::Serialize, QueryableByName)]
pub struct LoadEntry {
    #[diesel(sql_type = BigInt)]
    pub client_id: i64,
    #[diesel(sql_type = Text)]
    pub table_name: String,
    #[diesel(sql_type = Text)]
    pub started_at: String,
    #[diesel(sql_type = BigInt)]
    pub duration_ms: i64,
    #[diesel(sql_type = BigInt)]
    pub records_loaded: i64,
    #[diesel(sql_type = BigInt)]
    pub records_rejected: i64,
    #[diesel(sql_type = Nullable<Text>)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, QueryableByName)]
pub struct RejectedCount {
    #[diesel(sql_type = BigInt)]
    pub client_id: i64,
    #[diesel(sql_type = Text)]
    pub table_name: String,
    #[diesel(sql_type = BigInt)]
    pub rejected: i64,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Status {
    pub pending: Vec<PendingCount>,
    pub recent_loads: Vec<LoadEntry>,
    pub rejected: Vec<RejectedCount>,
}

#[derive(QueryableByName)]
struct ClientRow {
    #[diesel(sql_type = BigInt)]
    client_id: i64,
}

/// Most recent loads shown per client.
const RECENT_LOADS: usize = 10;

pub fn status(db: &mut DbConn) -> QueryResult<Status> {
    let pending = intake_core::staging::pending_counts(db)?;
    let conn = &mut conn_of(db);
    let d = conn.dialect();
    let clients: Vec<ClientRow> = conn.load(
        "SELECT client_id FROM warehouse_clients ORDER BY client_id",
        &[],
    )?;
    let mut status = Status {
        pending,
        ..Status::default()
    };
    for ClientRow { client_id } in clients {
        let loads: Vec<LoadEntry> = conn.load(
            &format!(
                "SELECT CAST({client_id} AS BIGINT) AS client_id, table_name, CAST(started_at AS TEXT) AS started_at, \
                 duration_ms, records_loaded, records_rejected, error FROM {} ORDER BY id DESC LIMIT {RECENT_LOADS}",
                d.table_ref(client_id, HISTORY_TABLE)
            ),
            &[],
        )?;
        status.recent_loads.extend(loads);
        let rejected: Vec<RejectedCount> = conn.load(
            &format!(
                "SELECT CAST({client_id} AS BIGINT) AS client_id, table_name, COUNT(*) AS rejected FROM {} \
                 GROUP BY table_name ORDER BY table_name",
                d.table_ref(client_id, REJECTED_TABLE)
            ),
            &[],
        )?;
        status.rejected.extend(rejected);
    }
    Ok(status)
}
