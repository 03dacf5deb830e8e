//! Column types declared by a Stitch batch's JSON Schema. Batch records arrive with a schema;
//! where it names one type for a field, that type decides the column instead of the value's
//! look: a plain `string` that happens to look like a date stays text, a `number` that arrives
//! as `5` goes into a double column, a `date-time` string becomes a timestamp.
//!
//! The server keeps the newest schema per (client, table) in `table_schemas`; hints are keyed
//! like flattened cells: the child table's array path and the cell's field path (see
//! [`crate::flatten`]).

use diesel::QueryResult;
use diesel::prelude::*;
use diesel::sql_types::Text;
use rustc_hash::FxHashMap;
use serde_json::{Map, Value};

use crate::flatten::{ELEMENT_SEGMENT, EMPTY_PATH, FlatRecord, path_key};
use crate::paths::{PathId, Paths, ROOT};
use crate::sql::{Conn, Param};
use crate::value_types::{Cell, ColType, parse_datetime};

/// Nesting of the schema followed at most (deeper parts give no hints).
const MAX_SCHEMA_DEPTH: usize = 64;

/// Declared types by (array path, field path); `None` where the schema allows several.
#[derive(Debug, Default)]
pub struct SchemaTypes {
    hints: FxHashMap<(String, String), Option<ColType>>,
}

#[derive(QueryableByName)]
struct StoredSchema {
    #[diesel(sql_type = Text)]
    json_schema: String,
}

impl SchemaTypes {
    /// The hints of a table's newest schema, if a Stitch batch ever sent one.
    pub fn load(conn: &mut Conn<'_>, client_id: i64, table: &str) -> QueryResult<SchemaTypes> {
        let d = conn.dialect();
        let rows: Vec<StoredSchema> = conn.load(
            &format!(
                "SELECT json_schema FROM table_schemas WHERE client_id = {} AND table_name = {}",
                d.placeholder(1),
                d.placeholder(2)
            ),
            &[
                Param::Int(Some(client_id)),
                Param::Text(Some(table.to_owned())),
            ],
        )?;
        Ok(rows
            .first()
            .and_then(|r| serde_json::from_str::<Value>(&r.json_schema).ok())
            .map(|schema| SchemaTypes::from_schema(&schema))
            .unwrap_or_default())
    }

    pub fn from_schema(schema: &Value) -> SchemaTypes {
        let mut types = SchemaTypes::default();
        types.walk(schema, &[], &mut Vec::new(), 0);
        types
    }

    pub fn is_empty(&self) -> bool {
        self.hints.is_empty()
    }

    /// The declared type of a cell, if the schema names exactly one.
    pub fn declared(&self, array_path: &str, path: &str) -> Option<ColType> {
        self.hints
            .get(&(array_path.to_owned(), path.to_owned()))
            .copied()
            .flatten()
    }

    /// Converts a flattened record's cells to their declared types where that loses nothing.
    /// Key fields keep the type their value has: the server checked them as keys (a string,
    /// a 64-bit integer or a boolean), and a key column's type is fixed by the first record.
    pub fn apply(&self, flat: &mut FlatRecord, paths: &Paths) {
        if self.is_empty() {
            return;
        }
        let keys: Vec<PathId> = flat
            .keys
            .iter()
            .filter_map(|k| paths.find_field(ROOT, k))
            .collect();
        for (path, cell) in &mut flat.root.cells {
            if keys.contains(path) {
                continue;
            }
            if let Some(t) = self.declared(EMPTY_PATH, paths.text(*path)) {
                retype(cell, t);
            }
        }
        for child in &mut flat.children {
            for (path, cell) in &mut child.row.cells {
                if let Some(t) = self.declared(paths.array_text(child.array), paths.text(*path)) {
                    retype(cell, t);
                }
            }
        }
    }

    fn walk(
        &mut self,
        schema: &Value,
        levels: &[Vec<String>],
        path: &mut Vec<String>,
        depth: usize,
    ) {
        let Some(fields) = schema.as_object() else {
            return;
        };
        if depth > MAX_SCHEMA_DEPTH {
            return;
        }
        for combinator in ["anyOf", "oneOf", "allOf"] {
            if let Some(Value::Array(members)) = fields.get(combinator) {
                for member in members {
                    self.walk(member, levels, path, depth + 1);
                }
            }
        }
        let types = declared_types(fields);
        let allows = |t: &str| types.is_empty() || types.contains(&t);
        if allows("object")
            && let Some(Value::Object(properties)) = fields.get("properties")
        {
            for (name, sub) in properties {
                path.push(name.clone());
                self.walk(sub, levels, path, depth + 1);
                path.pop();
            }
        }
        if allows("array")
            && let Some(items) = fields.get("items")
        {
            // An array directly inside array elements sits at the element path "value".
            let at = if path.is_empty() && !levels.is_empty() {
                vec![ELEMENT_SEGMENT.to_owned()]
            } else {
                path.clone()
            };
            let mut deeper = levels.to_vec();
            deeper.push(at);
            self.walk(items, &deeper, &mut Vec::new(), depth + 1);
        }
        if let Some(t) = scalar_type(&types, fields) {
            let key = (
                serde_json::to_string(levels).unwrap_or_default(),
                path_key(path),
            );
            let entry = self.hints.entry(key).or_insert(Some(t));
            if *entry != Some(t) {
                *entry = None;
            }
        }
    }
}

/// The non-null types a schema names (`"type": "x"` or `"type": ["null", "x"]`).
fn declared_types(fields: &Map<String, Value>) -> Vec<&str> {
    match fields.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
    .into_iter()
    .filter(|t| *t != "null")
    .collect()
}

/// The column type of a scalar schema, when it names exactly one kind of scalar.
fn scalar_type(types: &[&str], fields: &Map<String, Value>) -> Option<ColType> {
    let mut scalars: Vec<&str> = types
        .iter()
        .copied()
        .filter(|t| !matches!(*t, "object" | "array"))
        .collect();
    scalars.sort_unstable();
    scalars.dedup();
    match scalars.as_slice() {
        ["integer"] => Some(ColType::BigInt),
        ["number"] | ["integer", "number"] => Some(ColType::Double),
        ["boolean"] => Some(ColType::Boolean),
        ["string"] => Some(match fields.get("format").and_then(Value::as_str) {
            Some("date-time") => ColType::Timestamp,
            _ => ColType::Text,
        }),
        _ => None,
    }
}

/// The cell in its declared type, when converting loses nothing; otherwise unchanged (it
/// then lands in a typed sibling column, as any other value of another type).
fn retype(cell: &mut Cell, declared: ColType) {
    let converted = match (&*cell, declared) {
        (Cell::Time(_, text), ColType::Text) => Some(Cell::Text(text.clone())),
        (Cell::Text(text), ColType::Timestamp) => {
            parse_datetime(text).map(|t| Cell::Time(t, text.clone()))
        }
        (Cell::Int(_), ColType::Double) => cell.coerce_to(ColType::Double),
        // JSON Schema's `integer` accepts `5.0`.
        (Cell::Float(f), ColType::BigInt)
            if f.fract() == 0.0 && f.abs() < 9_007_199_254_740_992.0 =>
        {
            Some(Cell::Int(*f as i64))
        }
        _ => None,
    };
    if let Some(converted) = converted {
        *cell = converted;
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::flatten::flatten_with_keys;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "id": {"type": ["null", "number"]},
                "price": {"type": ["null", "number"]},
            "count": {"type": "integer"},
                "looks_like_a_date": {"type": "string"},
                "at": {"type": ["null", "string"], "format": "date-time"},
                "address": {"type": "object", "properties": {"city": {"type": "string"}}},
                "items": {"type": "array", "items": {"type": "object", "properties": {
                    "qty": {"type": "number"},
                    "tags": {"type": "array", "items": {"type": "string"}}
                }}},
                "grid": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
                "either": {"anyOf": [{"type": "integer"}, {"type": "string"}]}
            }
        })
    }

    #[test]
    fn hints_follow_the_flattened_paths() {
        let types = SchemaTypes::from_schema(&schema());
        assert_eq!(types.declared("[]", r#"["id"]"#), Some(ColType::Double));
        assert_eq!(types.declared("[]", r#"["price"]"#), Some(ColType::Double));
        assert_eq!(types.declared("[]", r#"["at"]"#), Some(ColType::Timestamp));
        assert_eq!(
            types.declared("[]", r#"["address","city"]"#),
            Some(ColType::Text)
        );
        assert_eq!(
            types.declared(r#"[["items"]]"#, r#"["qty"]"#),
            Some(ColType::Double)
        );
        assert_eq!(
            types.declared(r#"[["items"],["tags"]]"#, "[]"),
            Some(ColType::Text)
        );
        assert_eq!(
            types.declared(r#"[["grid"],["value"]]"#, "[]"),
            Some(ColType::Double)
        );
        assert_eq!(types.declared("[]", r#"["either"]"#), None);
    }

    #[test]
    fn cells_take_their_declared_types() {
        let types = SchemaTypes::from_schema(&schema());
        let mut paths = Paths::new();
        let mut flat = flatten_with_keys(
            r#"{"id": 1, "price": 5, "count": 5.0, "looks_like_a_date": "2026-11-26", "at": "2026-11-26T10:00:00Z",
                "items": [{"qty": 2, "tags": ["2026-01-01"]}], "keys": "data, not keys"}"#,
            Some(r#"["id"]"#),
            &mut paths,
        )
        .expect("flattens");
        types.apply(&mut flat, &paths);
        let root: FxHashMap<&str, &Cell> = flat
            .root
            .cells
            .iter()
            .map(|(p, c)| (paths.text(*p), c))
            .collect();
        assert_eq!(root[r#"["price"]"#], &Cell::Float(5.0));
        assert_eq!(root[r#"["count"]"#], &Cell::Int(5));
        assert_eq!(
            root[r#"["looks_like_a_date"]"#],
            &Cell::Text("2026-11-26".into())
        );
        assert!(matches!(root[r#"["at"]"#], Cell::Time(..)));
        assert_eq!(root[r#"["keys"]"#], &Cell::Text("data, not keys".into()));
        assert_eq!(
            root[r#"["id"]"#],
            &Cell::Int(1),
            "key fields keep their type"
        );
        let qty = &flat
            .children
            .iter()
            .find(|c| paths.array_text(c.array) == r#"[["items"]]"#);
        assert_eq!(qty.map(|c| &c.row.cells[0].1), Some(&Cell::Float(2.0)));
        let tag = flat
            .children
            .iter()
            .find(|c| paths.array_text(c.array) == r#"[["items"],["tags"]]"#)
            .map(|c| &c.row.cells[0].1);
        assert_eq!(tag, Some(&Cell::Text("2026-01-01".into())));
    }
}
