//! Turns one JSON record into rows: the root row (nested objects flattened into
//! `parent__child` paths) and one row per array element for the child tables
//! (`<table>__<field>`, recursively for arrays inside arrays).
//!
//! Field paths and array paths are numbered in the chunk's [`Paths`], which keeps their JSON
//! text (`["customer","address","city"]`): the catalog's lookup key and a lossless record of
//! the original names, which are only decoded when a new column has to be named.

use std::borrow::Cow;

use crate::json_tree::{self, Json};
use crate::paths::{ArrayId, PathId, Paths, ROOT, Renumbering};
use crate::value_types::{Cell, scalar_cell};

/// A row of one table: its non-null cells by field path.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Row {
    pub cells: Vec<(PathId, Cell)>,
}

/// One array element's row in a child table.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildRow {
    /// Where the array is: one field path per enclosing array level, outermost first, each
    /// relative to the element above it (text `[["items"],["tags"]]`). It identifies the
    /// child table within the record's table family without ambiguity: an array inside an
    /// object (`[["customer","phones"]]`) differs from one inside array elements
    /// (`[["customer"],["phones"]]`).
    pub array: ArrayId,
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

impl FlatRecord {
    /// Gives the record's paths the numbers they have after their [`Paths`] was merged into
    /// another (see [`Paths::merge`]).
    pub fn renumber(&mut self, to: &Renumbering) {
        let rows = std::iter::once(&mut self.root).chain(self.children.iter_mut().map(|c| {
            c.array = to.arrays[c.array as usize];
            &mut c.row
        }));
        for row in rows {
            for (path, _) in &mut row.cells {
                *path = to.fields[*path as usize];
            }
        }
    }
}

/// Deepest array nesting that gets child tables: a child table's primary key is the root's
/// keys (at most 16) plus one position per level, and PostgreSQL indexes at most 32 columns.
/// Arrays nested deeper are kept whole, as JSON text, in a column of the deepest table.
pub const MAX_ARRAY_LEVELS: usize = 15;

/// Path segment used for arrays nested directly in arrays, and the column of scalar elements.
pub const ELEMENT_SEGMENT: &str = "value";
/// The text of the table family's root (and of a scalar array element's value): the text of
/// [`ROOT`] among array paths and field paths.
pub const EMPTY_PATH: &str = "[]";

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
pub fn flatten_record(text: &str, paths: &mut Paths) -> Result<FlatRecord, String> {
    flatten_with_keys(text, None, paths)
}

/// Flattens a record, numbering its paths in `paths`. `key_names` (a JSON array of field
/// names) comes with Stitch records, whose data is all fields: a field named `keys` is then
/// data like any other.
pub fn flatten_with_keys(
    text: &str,
    key_names: Option<&str>,
    paths: &mut Paths,
) -> Result<FlatRecord, String> {
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
    let mut flattening = Flattening {
        paths,
        out: FlatRecord {
            has_nul: keys.iter().any(|k| k.contains('\0')),
            keys,
            ..FlatRecord::default()
        },
    };
    let mut root = Row::default();
    let at = ArrayContext {
        array: ROOT,
        positions: Vec::new(),
    };
    flattening.object(fields, ROOT, &at, &mut root);
    flattening.out.root = root;
    Ok(flattening.out)
}

/// Where the row being filled lives: its table's array path and element positions.
struct ArrayContext {
    array: ArrayId,
    positions: Vec<i64>,
}

/// One record being flattened.
struct Flattening<'p> {
    paths: &'p mut Paths,
    out: FlatRecord,
}

impl Flattening<'_> {
    fn object(
        &mut self,
        fields: Vec<(Cow<'_, str>, Json<'_>)>,
        prefix: PathId,
        at: &ArrayContext,
        row: &mut Row,
    ) {
        // Sized up front: growing these vectors one push at a time cost more than filling them.
        row.cells.reserve(fields.len());
        let mut previous = None;
        for (name, value) in fields {
            if matches!(value, Json::Null) {
                // Stores nothing, but a NUL in its name marks the record as in any field.
                self.out.has_nul |= name.contains('\0');
                continue;
            }
            let path = self.paths.next_field(prefix, previous, &name);
            previous = Some(path);
            self.out.has_nul |= self.paths.has_nul(path);
            self.value(value, path, at, row);
        }
    }

    fn value(&mut self, value: Json<'_>, path: PathId, at: &ArrayContext, row: &mut Row) {
        match value {
            Json::Null => {}
            Json::Object(fields) => self.object(fields, path, at, row),
            Json::Array(items) if at.positions.len() >= MAX_ARRAY_LEVELS => {
                let text = Json::Array(items).into_value().to_string();
                self.out.has_nul |= text.contains("\\u0000");
                row.cells.push((path, Cell::Text(text)));
            }
            Json::Array(items) => self.array(items, path, at),
            scalar => self.scalar(scalar, path, row),
        }
    }

    /// One child row per element of the array at `path`.
    fn array(&mut self, items: Vec<Json<'_>>, path: PathId, at: &ArrayContext) {
        let array = self.paths.array(at.array, path);
        self.out.children.reserve(items.len());
        for (index, item) in items.into_iter().enumerate() {
            let mut positions = Vec::with_capacity(at.positions.len() + 1);
            positions.extend_from_slice(&at.positions);
            positions.push(index as i64);
            let inner = ArrayContext { array, positions };
            let mut child = Row::default();
            match item {
                Json::Object(fields) => self.object(fields, ROOT, &inner, &mut child),
                Json::Array(_) => {
                    let element = self.paths.field(ROOT, ELEMENT_SEGMENT);
                    self.value(item, element, &inner, &mut child)
                }
                scalar => self.scalar(scalar, ROOT, &mut child),
            }
            self.out.children.push(ChildRow {
                array,
                positions: inner.positions,
                row: child,
            });
        }
    }

    fn scalar(&mut self, value: Json<'_>, path: PathId, row: &mut Row) {
        if let Some(cell) = scalar_cell(value) {
            if let Cell::Text(s) | Cell::Time(_, s) = &cell {
                self.out.has_nul |= s.contains('\0');
            }
            row.cells.push((path, cell));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(text: &str) -> (FlatRecord, Paths) {
        let mut paths = Paths::new();
        let rec = flatten_record(text, &mut paths).expect("flattens");
        (rec, paths)
    }

    #[test]
    fn objects_flatten_and_arrays_become_child_rows() {
        let (rec, paths) = flat(
            r#"{"id": 1, "keys": ["id"], "customer": {"name": "Ann", "address": {"zip": "123"}},
                "items": [{"sku": "a", "qty": 2, "tags": ["x", "y"]}, {"sku": "b"}], "n": null,
                "grid": [[1, 2]]}"#,
        );
        assert_eq!(rec.keys, vec!["id"]);
        let root: Vec<&str> = rec.root.cells.iter().map(|(p, _)| paths.text(*p)).collect();
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
            .map(|c| (paths.array_text(c.array), c.positions.clone()))
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
        let (path, cell) = &rec.children[4].row.cells[0];
        assert_eq!(
            (paths.text(*path), cell),
            (EMPTY_PATH, &Cell::Text("y".into()))
        );
        assert_eq!(paths.text(rec.children[5].row.cells[1].0), r#"["sku"]"#);
        assert!(!rec.has_nul);
    }

    #[test]
    fn odd_field_names_round_trip_through_path_keys() {
        let (rec, paths) = flat(r#"{"k": 1, "keys": ["k"], "a\"b": {"[,]": true}}"#);
        let key = paths.text(rec.root.cells[0].0);
        assert_eq!(
            path_segments(key),
            vec!["a\"b".to_owned(), "[,]".to_owned()]
        );
        assert_eq!(path_key(&path_segments(key)), key);
    }

    #[test]
    fn arrays_nested_too_deep_are_kept_as_json_text() {
        let depth = MAX_ARRAY_LEVELS + 2;
        let text = format!(
            r#"{{"k": 1, "keys": ["k"], "a": {}7{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let (rec, _) = flat(&text);
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
        for text in [
            r#"{"id": "a\u0000b", "keys": ["id"]}"#,
            r#"{"id": 1, "keys": ["id"], "a\u0000": 2}"#,
            r#"{"id": 1, "keys": ["id"], "a\u0000": null}"#,
            r#"{"id": 1, "keys": ["id"], "a\u0000": {"b": [1]}}"#,
            r#"{"id": 1, "keys": ["id"], "list": [{"\u0000": 1}]}"#,
        ] {
            assert!(flat(text).0.has_nul, "{text}");
        }
        assert!(
            !flat(r#"{"id": 1, "keys": ["id"], "a": {"b": [1]}}"#)
                .0
                .has_nul
        );
    }

    #[test]
    fn records_numbered_apart_agree_once_renumbered() {
        let text = r#"{"id": 1, "keys": ["id"], "c": {"n": "x"}, "items": [{"t": [true]}]}"#;
        let (alone, alone_paths) = flat(text);
        let mut paths = Paths::new();
        flatten_record(r#"{"id": 2, "keys": ["id"], "z": [1]}"#, &mut paths).expect("flattens");
        let (mut moved, other) = flat(text);
        let renumbering = paths.merge(&other);
        moved.renumber(&renumbering);
        let texts = |rec: &FlatRecord, paths: &Paths| {
            let mut all: Vec<(String, String)> = rec
                .root
                .cells
                .iter()
                .map(|(p, _)| (String::new(), paths.text(*p).to_owned()))
                .collect();
            for child in &rec.children {
                for (p, _) in &child.row.cells {
                    let table = paths.array_text(child.array).to_owned();
                    all.push((table, paths.text(*p).to_owned()));
                }
            }
            all
        };
        assert_eq!(texts(&moved, &paths), texts(&alone, &alone_paths));
        assert_ne!(
            moved.root.cells, alone.root.cells,
            "numbers differ between the two"
        );
    }

    #[test]
    fn non_records_are_refused() {
        let mut paths = Paths::new();
        assert!(flatten_record("[1]", &mut paths).is_err());
        assert!(flatten_record(r#"{"a": 1}"#, &mut paths).is_err());
    }
}
