//! How each backend spells the warehouse: namespaces, table references, column types and
//! bind placeholders. The rest of the loader writes SQL through these.

use crate::identifiers::quote;
use crate::value_types::ColType;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// A schema `client_<id>` per client.
    Postgres,
    /// One database file: a client's tables are named `client_<id>__<table>`.
    Sqlite,
}

/// The namespace of a client: PostgreSQL schema name, or SQLite table-name prefix.
pub fn namespace(client_id: i64) -> String {
    format!("client_{client_id}")
}

impl Dialect {
    /// The quoted, qualified reference to a client's table.
    pub fn table_ref(self, client_id: i64, table: &str) -> String {
        match self {
            Dialect::Postgres => format!("{}.{}", quote(&namespace(client_id)), quote(table)),
            Dialect::Sqlite => quote(&format!("{}__{table}", namespace(client_id))),
        }
    }

    /// The backend's column type for a warehouse type.
    pub fn sql_type(self, t: ColType) -> &'static str {
        match (self, t) {
            (Dialect::Postgres, ColType::BigInt) => "bigint",
            (Dialect::Postgres, ColType::Double) => "double precision",
            (Dialect::Postgres, ColType::Boolean) => "boolean",
            (Dialect::Postgres, ColType::Text) => "text",
            (Dialect::Postgres, ColType::Timestamp) => "timestamptz",
            (Dialect::Postgres, ColType::Json) => "jsonb",
            // SQLite: declared types give the affinity; timestamps are RFC 3339 UTC text and
            // booleans 0/1, which SQLite's own functions understand.
            (Dialect::Sqlite, ColType::BigInt) => "INTEGER",
            (Dialect::Sqlite, ColType::Double) => "REAL",
            (Dialect::Sqlite, ColType::Boolean) => "BOOLEAN",
            (Dialect::Sqlite, ColType::Text) => "TEXT",
            (Dialect::Sqlite, ColType::Timestamp) => "TIMESTAMPTZ",
            (Dialect::Sqlite, ColType::Json) => "JSON",
        }
    }

    /// The n-th (1-based) bind placeholder.
    pub fn placeholder(self, n: usize) -> String {
        match self {
            Dialect::Postgres => format!("${n}"),
            Dialect::Sqlite => format!("?{n}"),
        }
    }

    /// SQL selecting the elements of a bound list parameter (an array, or JSON on SQLite).
    pub fn list_param(self, n: usize, elem: ColType) -> String {
        match self {
            Dialect::Postgres => format!("SELECT unnest(${n}::{}[])", self.sql_type(elem)),
            Dialect::Sqlite => format!("SELECT value FROM json_each(?{n})"),
        }
    }

    /// Timestamp type of the fixed columns (received/loaded at) as declared.
    pub fn now(self) -> &'static str {
        match self {
            Dialect::Postgres => "now()",
            Dialect::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        }
    }
}
