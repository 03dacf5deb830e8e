//! Turns one JSON record into rows: the root row (nested objects flattened into
//! `parent__child` paths) and one row per array element for the child tables
//! (`<table>__<field>`, recursively for arrays inside arrays).

use serde_json::{Map, Value};

use crate::value_types::{Cell, scalar_cell};

/// A field path from the record (or array element) root, e.g. `["address", "zip"]`.
pub type Path = Vec<String>;

/// A row of one table: its non-null cells by field path.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Row {
    pub cells: Vec<(Path, Cell)>,
}

/// One array element's row in a child table.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildRow {
    /// Path of the array from the record root, through enclosing arrays; names the table.
    pub array_path: Path,
    /// Position of the element in each enclosing array, outermost first.
    pub positions: Vec<i64>,
    pub row: Row,
}

/// A record flattened for loading.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FlatRecord {
    /// The declared key fields, in the order the record listed them.
    pub keys: Vec<String>,
    pub root: Row,
    pub children: Vec<ChildRow>,
    /// Whether any string holds a NUL character (PostgreSQL text cannot store it).
    pub has_nul: bool,
}

/// Path segment used for arrays nested directly in arrays, and the column of scalar elements.
pub const ELEMENT_SEGMENT: &str = "value";

/// Flattens a record; `Err` says why it cannot be loaded.
pub fn flatten_record(text: &str) -> Result<FlatRecord, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("record is not valid JSON: {e}"))?;
    let Value::Object(mut fields) = value else {
        return Err("record is not a JSON object".into());
    };
    let keys: Vec<String> = match fields.remove("keys") {
        Some(Value::Array(names)) => names
            .into_iter()
            .map(|n| match n {
                Value::String(s) => Ok(s),
                _ => Err("\"keys\" holds a non-string".to_owned()),
            })
            .collect::<Result<_, _>>()?,
        _ => return Err("record has no \"keys\" array".into()),
    };
    let mut out = FlatRecord {
        keys,
        ..FlatRecord::default()
    };
    let mut root = Row::default();
    flatten_object(&fields, &mut Vec::new(), &[], &[], &mut root, &mut out);
    out.root = root;
    out.has_nul |= out.keys.iter().any(|k| k.contains('\0'));
    Ok(out)
}

/// Adds an object's fields to `row` under `prefix`; arrays become child rows.
fn flatten_object(
    fields: &Map<String, Value>,
    prefix: &mut Path,
    array_path: &[String],
    positions: &[i64],
    row: &mut Row,
    out: &mut FlatRecord,
) {
    for (name, value) in fields {
        out.has_nul |= name.contains('\0');
        prefix.push(name.clone());
        flatten_value(value, prefix, array_path, positions, row, out);
        prefix.pop();
    }
}

fn flatten_value(
    value: &Value,
    path: &mut Path,
    array_path: &[String],
    positions: &[i64],
    row: &mut Row,
    out: &mut FlatRecord,
) {
    match value {
        Value::Null => {}
        Value::Object(fields) => flatten_object(fields, path, array_path, positions, row, out),
        Value::Array(items) => {
            let mut child_path = array_path.to_vec();
            child_path.extend(path.iter().cloned());
            for (index, item) in items.iter().enumerate() {
                let mut child_positions = positions.to_vec();
                child_positions.push(index as i64);
                let mut child = Row::default();
                match item {
                    Value::Object(fields) => flatten_object(
                        fields,
                        &mut Vec::new(),
                        &child_path,
                        &child_positions,
                        &mut child,
                        out,
                    ),
                    Value::Array(_) => {
                        let mut element = vec![ELEMENT_SEGMENT.to_owned()];
                        flatten_value(
                            item,
                            &mut element,
                            &child_path,
                            &child_positions,
                            &mut child,
                            out,
                        );
                    }
                    scalar => {
                        if let Some(cell) = scalar_cell(scalar) {
                            note_nul(&cell, out);
                            child.cells.push((Vec::new(), cell));
                        }
                    }
                }
                out.children.push(ChildRow {
                    array_path: child_path.clone(),
                    positions: child_positions,
                    row: child,
                });
            }
        }
        scalar => {
            if let Some(cell) = scalar_cell(scalar) {
                note_nul(&cell, out);
                row.cells.push((path.clone(), cell));
            }
        }
    }
}

fn note_nul(cell: &Cell, out: &mut FlatRecord) {
    if let Cell::Text(s) | Cell::Time(_, s) = cell {
        out.has_nul |= s.contains('\0');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(parts: &[&str]) -> Path {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn objects_flatten_and_arrays_become_child_rows() {
        let rec = flatten_record(
            r#"{"id": 1, "keys": ["id"], "customer": {"name": "Ann", "address": {"zip": "123"}},
                "items": [{"sku": "a", "qty": 2, "tags": ["x", "y"]}, {"sku": "b"}], "n": null,
                "grid": [[1, 2]]}"#,
        )
        .expect("flattens");
        assert_eq!(rec.keys, vec!["id"]);
        let root: Vec<Path> = rec.root.cells.iter().map(|(p, _)| p.clone()).collect();
        assert_eq!(
            root,
            vec![
                p(&["customer", "address", "zip"]),
                p(&["customer", "name"]),
                p(&["id"])
            ]
        );
        let tables: Vec<(Path, Vec<i64>)> = rec
            .children
            .iter()
            .map(|c| (c.array_path.clone(), c.positions.clone()))
            .collect();
        assert_eq!(
            tables,
            vec![
                (p(&["grid", "value"]), vec![0, 0]),
                (p(&["grid", "value"]), vec![0, 1]),
                (p(&["grid"]), vec![0]),
                (p(&["items", "tags"]), vec![0, 0]),
                (p(&["items", "tags"]), vec![0, 1]),
                (p(&["items"]), vec![0]),
                (p(&["items"]), vec![1]),
            ]
        );
        let tag = &rec.children[4].row.cells[0];
        assert_eq!(tag, &(Vec::new(), Cell::Text("y".into())));
        assert!(!rec.has_nul);
    }

    #[test]
    fn nul_characters_are_noticed() {
        let rec = flatten_record(r#"{"id": "a\u0000b", "keys": ["id"]}"#).expect("flattens");
        assert!(rec.has_nul);
    }

    #[test]
    fn non_records_are_refused() {
        assert!(flatten_record("[1]").is_err());
        assert!(flatten_record(r#"{"a": 1}"#).is_err());
    }
}
