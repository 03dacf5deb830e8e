//! Turns one JSON record into rows: the root row (nested objects flattened into
//! `parent__child` paths) and one row per array element for the child tables
//! (`<table>__<field>`, recursively for arrays inside arrays).
//!
//! Field paths are carried as their JSON text (`["customer","address","city"]`): one string
//! per cell that is at once the catalog's lookup key and a lossless record of the original
//! names, which are only decoded when a new column has to be named.

use std::borrow::Cow;

use crate::json_tree::{self, Json};
use crate::value_types::{Cell, scalar_cell};

/// A row of one table: its non-null cells by field path (JSON text of the path).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Row {
    pub cells: Vec<(String, Cell)>,
}

/// One array element's row in a child table.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildRow {
    /// Where the array is: the JSON text of one path per enclosing array level, outermost
    /// first, each relative to the element above it (`[["items"],["tags"]]`). It identifies
    /// the child table within the record's table family without ambiguity: an array inside an
    /// object (`[["customer","phones"]]`) differs from one inside array elements
    /// (`[["customer"],["phones"]]`).
    pub array_path: String,
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

/// Deepest array nesting that gets child tables: a child table's primary key is the root's
/// keys (at most 16) plus one position per level, and PostgreSQL indexes at most 32 columns.
/// Arrays nested deeper are kept whole, as JSON text, in a column of the deepest table.
pub const MAX_ARRAY_LEVELS: usize = 15;

/// Path segment used for arrays nested directly in arrays, and the column of scalar elements.
pub const ELEMENT_SEGMENT: &str = "value";
/// The path of the table family's root (and of a scalar array element's value).
pub const EMPTY_PATH: &str = "[]";

/// A path under construction: its JSON text without the closing bracket.
#[derive(Clone)]
struct OpenPath(String);

impl OpenPath {
    fn root() -> OpenPath {
        OpenPath("[".to_owned())
    }

    fn child(&self, segment: &str) -> OpenPath {
        OpenPath(self.extended(segment, 0))
    }

    /// `child(segment).closed()` in one allocation: the path of a scalar field.
    fn closed_child(&self, segment: &str) -> String {
        let mut text = self.extended(segment, 1);
        text.push(']');
        text
    }

    fn extended(&self, segment: &str, spare: usize) -> String {
        let mut text = String::with_capacity(self.0.len() + segment.len() + 3 + spare);
        text.push_str(&self.0);
        if self.0.len() > 1 {
            text.push(',');
        }
        push_json_string(&mut text, segment);
        text
    }

    fn closed(&self) -> String {
        close(&self.0)
    }
}

/// A JSON array's text from its text without the closing bracket.
fn close(open: &str) -> String {
    let mut text = String::with_capacity(open.len() + 1);
    text.push_str(open);
    text.push(']');
    text
}

/// Appends `s` as a JSON string. Field names rarely need escaping, so the common case is a
/// plain copy (this runs for every field of every record).
fn push_json_string(text: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        text.push('"');
        text.push_str(s);
        text.push('"');
    } else {
        text.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

/// A child table's location under construction: [`ChildRow::array_path`] without its closing
/// bracket.
#[derive(Clone)]
struct OpenLevels(String);

impl OpenLevels {
    fn root() -> OpenLevels {
        OpenLevels("[".to_owned())
    }

    /// One array level deeper, at `path` relative to the current element.
    fn deeper(&self, path: &OpenPath) -> OpenLevels {
        let mut text = String::with_capacity(self.0.len() + path.0.len() + 2);
        text.push_str(&self.0);
        if text.len() > 1 {
            text.push(',');
        }
        text.push_str(&path.closed());
        OpenLevels(text)
    }

    fn closed(&self) -> String {
        close(&self.0)
    }
}

/// The JSON text of a path made of `segments`.
pub fn path_key(segments: &[String]) -> String {
    serde_json::to_string(segments).unwrap_or_else(|_| EMPTY_PATH.to_owned())
}

/// The segments of a path's JSON text.
pub fn path_segments(key: &str) -> Vec<String> {
    serde_json::from_str(key).unwrap_or_default()
}

/// Flattens an RJMetrics record, which names its key fields in its own `"keys"` field;
/// `Err` says why it cannot be loaded.
pub fn flatten_record(text: &str) -> Result<FlatRecord, String> {
    flatten_with_keys(text, None)
}

/// Flattens a record. `key_names` (a JSON array of field names) comes with Stitch records,
/// whose data is all fields: a field named `keys` is then data like any other.
pub fn flatten_with_keys(text: &str, key_names: Option<&str>) -> Result<FlatRecord, String> {
    let value = json_tree::parse(text).map_err(|e| format!("record is not valid JSON: {e}"))?;
    let Json::Object(mut fields) = value else {
        return Err("record is not a JSON object".into());
    };
    let declared = match key_names {
        Some(names) => {
            Some(json_tree::parse(names).map_err(|e| format!("key_names is not JSON: {e}"))?)
        }
        None => fields
            .iter()
            .position(|(name, _)| name == "keys")
            .map(|i| fields.remove(i).1),
    };
    let keys: Vec<String> = match declared {
        Some(Json::Array(names)) => names
            .into_iter()
            .map(|n| match n {
                Json::Str(s) => Ok(s.into_owned()),
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
    let context = ArrayContext {
        table_path: OpenLevels::root(),
        positions: Vec::new(),
    };
    flatten_object(fields, &OpenPath::root(), &context, &mut root, &mut out);
    out.root = root;
    out.has_nul |= out.keys.iter().any(|k| k.contains('\0'));
    Ok(out)
}

/// Where the row being filled lives: its table's array path and element positions.
struct ArrayContext {
    table_path: OpenLevels,
    positions: Vec<i64>,
}

fn flatten_object(
    fields: Vec<(Cow<'_, str>, Json<'_>)>,
    prefix: &OpenPath,
    at: &ArrayContext,
    row: &mut Row,
    out: &mut FlatRecord,
) {
    // Sized up front: growing these vectors one push at a time cost more than filling them.
    row.cells.reserve(fields.len());
    for (name, value) in fields {
        out.has_nul |= name.contains('\0');
        match value {
            Json::Null => {}
            Json::Object(_) | Json::Array(_) => {
                flatten_value(value, &prefix.child(&name), at, row, out)
            }
            scalar => push_scalar(scalar, prefix.closed_child(&name), row, out),
        }
    }
}

fn push_scalar(value: Json<'_>, path: String, row: &mut Row, out: &mut FlatRecord) {
    if let Some(cell) = scalar_cell(value) {
        note_nul(&cell, out);
        row.cells.push((path, cell));
    }
}

fn flatten_value(
    value: Json<'_>,
    path: &OpenPath,
    at: &ArrayContext,
    row: &mut Row,
    out: &mut FlatRecord,
) {
    match value {
        Json::Null => {}
        Json::Object(fields) => flatten_object(fields, path, at, row, out),
        Json::Array(items) if at.positions.len() >= MAX_ARRAY_LEVELS => {
            let text = Json::Array(items).into_value().to_string();
            out.has_nul |= text.contains("\\u0000");
            row.cells.push((path.closed(), Cell::Text(text)));
        }
        Json::Array(items) => {
            let table_path = at.table_path.deeper(path);
            let array_path = table_path.closed();
            out.children.reserve(items.len());
            for (index, item) in items.into_iter().enumerate() {
                let mut positions = Vec::with_capacity(at.positions.len() + 1);
                positions.extend_from_slice(&at.positions);
                positions.push(index as i64);
                let inner = ArrayContext {
                    table_path: table_path.clone(),
                    positions,
                };
                let mut child = Row::default();
                match item {
                    Json::Object(fields) => {
                        flatten_object(fields, &OpenPath::root(), &inner, &mut child, out)
                    }
                    Json::Array(_) => flatten_value(
                        item,
                        &OpenPath::root().child(ELEMENT_SEGMENT),
                        &inner,
                        &mut child,
                        out,
                    ),
                    scalar => push_scalar(scalar, EMPTY_PATH.to_owned(), &mut child, out),
                }
                out.children.push(ChildRow {
                    array_path: array_path.clone(),
                    positions: inner.positions,
                    row: child,
                });
            }
        }
        scalar => push_scalar(scalar, path.closed(), row, out),
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

    #[test]
    fn objects_flatten_and_arrays_become_child_rows() {
        let rec = flatten_record(
            r#"{"id": 1, "keys": ["id"], "customer": {"name": "Ann", "address": {"zip": "123"}},
                "items": [{"sku": "a", "qty": 2, "tags": ["x", "y"]}, {"sku": "b"}], "n": null,
                "grid": [[1, 2]]}"#,
        )
        .expect("flattens");
        assert_eq!(rec.keys, vec!["id"]);
        let root: Vec<&str> = rec.root.cells.iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            root,
            vec![
                r#"["customer","address","zip"]"#,
                r#"["customer","name"]"#,
                r#"["id"]"#
            ]
        );
        let tables: Vec<(&str, Vec<i64>)> = rec
            .children
            .iter()
            .map(|c| (c.array_path.as_str(), c.positions.clone()))
            .collect();
        assert_eq!(
            tables,
            vec![
                (r#"[["grid"],["value"]]"#, vec![0, 0]),
                (r#"[["grid"],["value"]]"#, vec![0, 1]),
                (r#"[["grid"]]"#, vec![0]),
                (r#"[["items"],["tags"]]"#, vec![0, 0]),
                (r#"[["items"],["tags"]]"#, vec![0, 1]),
                (r#"[["items"]]"#, vec![0]),
                (r#"[["items"]]"#, vec![1]),
            ]
        );
        assert_eq!(
            rec.children[4].row.cells[0],
            (EMPTY_PATH.to_owned(), Cell::Text("y".into()))
        );
        assert_eq!(rec.children[5].row.cells[1].0, r#"["sku"]"#);
        assert!(!rec.has_nul);
    }

    #[test]
    fn odd_field_names_round_trip_through_path_keys() {
        let rec =
            flatten_record(r#"{"k": 1, "keys": ["k"], "a\"b": {"[,]": true}}"#).expect("flattens");
        let key = &rec.root.cells[0].0;
        assert_eq!(
            path_segments(key),
            vec!["a\"b".to_owned(), "[,]".to_owned()]
        );
        assert_eq!(&path_key(&path_segments(key)), key);
    }

    #[test]
    fn path_segments_are_escaped_as_serde_json_would() {
        for name in [
            "plain",
            "café ✓",
            "a\"b",
            "back\\slash",
            "tab\there",
            "nul\0",
            "del\u{7f}",
            "",
        ] {
            let mut text = String::new();
            push_json_string(&mut text, name);
            assert_eq!(
                text,
                serde_json::to_string(name).expect("serializes"),
                "{name:?}"
            );
        }
    }

    #[test]
    fn arrays_nested_too_deep_are_kept_as_json_text() {
        let depth = MAX_ARRAY_LEVELS + 2;
        let text = format!(
            r#"{{"k": 1, "keys": ["k"], "a": {}7{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let rec = flatten_record(&text).expect("flattens");
        let deepest = rec.children.iter().map(|c| c.positions.len()).max();
        assert_eq!(deepest, Some(MAX_ARRAY_LEVELS));
        let kept: Vec<&Cell> = rec
            .children
            .iter()
            .flat_map(|c| c.row.cells.iter().map(|(_, v)| v))
            .collect();
        assert_eq!(kept, vec![&Cell::Text("[[7]]".into())]);
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
