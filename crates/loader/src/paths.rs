//! The field paths and array paths of one chunk, each stored once with its JSON text.
//!
//! Flattening meets the same few dozen paths in every record of a table. Cells name their
//! path by number: a field costs a lookup of its name under its parent rather than a string
//! of its own, and a table's rows find a path's column by index. The JSON text
//! (`["customer","address","city"]`) stays the catalog's key and the lossless record of the
//! original names; it is made once per path and chunk.

use std::borrow::Borrow;
use std::hash::Hash;

use rustc_hash::FxHashMap;

/// A field path's number in its chunk's [`Paths`].
pub type PathId = u32;
/// An array path's number in its chunk's [`Paths`]: one child table of the record's family
/// (see [`crate::flatten::ChildRow`]).
pub type ArrayId = u32;

/// The empty path: the root table among array paths, and a scalar array element's value
/// among field paths. Its text is [`crate::flatten::EMPTY_PATH`].
pub const ROOT: u32 = 0;

/// Numbered paths; see the module documentation.
#[derive(Debug, Clone)]
pub struct Paths {
    /// Field paths: a step is a field name.
    fields: Tree<Box<str>>,
    /// Array paths: a step is the field path of an array within the element above it.
    arrays: Tree<PathId>,
}

/// Paths as a tree of steps from [`ROOT`]; every node knows its text.
#[derive(Debug, Clone)]
struct Tree<S> {
    nodes: Vec<Node<S>>,
}

#[derive(Debug, Clone)]
struct Node<S> {
    parent: u32,
    step: S,
    text: Box<str>,
    /// Whether a name on the way holds a NUL character (PostgreSQL cannot store it).
    has_nul: bool,
    next: FxHashMap<S, u32>,
    /// Guesses from the record before (field paths only; [`ROOT`] for none): the first
    /// field of the object at this path, and the field that followed this one.
    first: u32,
    after: u32,
}

impl<S: Hash + Eq + Clone + Default> Tree<S> {
    fn new() -> Tree<S> {
        Tree {
            nodes: vec![Node {
                parent: ROOT,
                step: S::default(),
                text: "[]".into(),
                has_nul: false,
                next: FxHashMap::default(),
                first: ROOT,
                after: ROOT,
            }],
        }
    }

    fn find<Q: Hash + Eq + ?Sized>(&self, parent: u32, step: &Q) -> Option<u32>
    where
        S: Borrow<Q>,
    {
        self.nodes[parent as usize].next.get(step).copied()
    }

    /// Adds the node one `step` below `parent`, whose text ends in `item`.
    fn add(&mut self, parent: u32, step: S, item: &str, has_nul: bool) -> u32 {
        let above = &self.nodes[parent as usize];
        let open = &above.text[..above.text.len() - 1];
        let mut text = String::with_capacity(open.len() + item.len() + 2);
        text.push_str(open);
        if open.len() > 1 {
            text.push(',');
        }
        text.push_str(item);
        text.push(']');
        let has_nul = has_nul || above.has_nul;
        let id = self.nodes.len() as u32;
        self.nodes[parent as usize].next.insert(step.clone(), id);
        self.nodes.push(Node {
            parent,
            step,
            text: text.into(),
            has_nul,
            next: FxHashMap::default(),
            first: ROOT,
            after: ROOT,
        });
        id
    }
}

impl Default for Paths {
    fn default() -> Self {
        Paths::new()
    }
}

/// Where the numbers of one [`Paths`] went when it was merged into another.
pub struct Renumbering {
    pub fields: Vec<PathId>,
    pub arrays: Vec<ArrayId>,
}

impl Paths {
    pub fn new() -> Paths {
        Paths {
            fields: Tree::new(),
            arrays: Tree::new(),
        }
    }

    /// The path of field `name` inside the object at `parent`.
    pub fn field(&mut self, parent: PathId, name: &str) -> PathId {
        if let Some(id) = self.fields.find(parent, name) {
            return id;
        }
        let mut item = String::new();
        push_json_string(&mut item, name);
        self.fields
            .add(parent, name.into(), &item, name.contains('\0'))
    }

    /// [`Paths::field`] for the fields of an object in their order, `previous` being the
    /// one before (`None` for the first). Records of a table mostly share their shape, so
    /// the field that came next last time is tried first, before any hashing.
    pub fn next_field(&mut self, parent: PathId, previous: Option<PathId>, name: &str) -> PathId {
        let nodes = &self.fields.nodes;
        let guess = match previous {
            Some(p) => nodes[p as usize].after,
            None => nodes[parent as usize].first,
        };
        let candidate = &nodes[guess as usize];
        if guess != ROOT && candidate.parent == parent && *candidate.step == *name {
            return guess;
        }
        let id = self.field(parent, name);
        match previous {
            Some(p) => self.fields.nodes[p as usize].after = id,
            None => self.fields.nodes[parent as usize].first = id,
        }
        id
    }

    /// The path of field `name` inside the object at `parent`, if some record had it.
    pub fn find_field(&self, parent: PathId, name: &str) -> Option<PathId> {
        self.fields.find(parent, name)
    }

    /// The array path one array level below `parent`, for the array at field path `path`
    /// of the element above.
    pub fn array(&mut self, parent: ArrayId, path: PathId) -> ArrayId {
        if let Some(id) = self.arrays.find(parent, &path) {
            return id;
        }
        let item = &self.fields.nodes[path as usize];
        let (item, has_nul) = (item.text.clone(), item.has_nul);
        self.arrays.add(parent, path, &item, has_nul)
    }

    /// A field path's JSON text (`["customer","name"]`).
    pub fn text(&self, path: PathId) -> &str {
        &self.fields.nodes[path as usize].text
    }

    /// An array path's JSON text (`[["items"],["tags"]]`): its child table's catalog key.
    pub fn array_text(&self, array: ArrayId) -> &str {
        &self.arrays.nodes[array as usize].text
    }

    /// Whether a name in the field path holds a NUL character.
    pub fn has_nul(&self, path: PathId) -> bool {
        self.fields.nodes[path as usize].has_nul
    }

    /// How many field paths there are (numbers run from 0 to this, exclusive).
    pub fn field_count(&self) -> usize {
        self.fields.nodes.len()
    }

    /// How many array paths there are (numbers run from 0 to this, exclusive).
    pub fn array_count(&self) -> usize {
        self.arrays.nodes.len()
    }

    /// Adds `other`'s paths to these, and says which number each of `other`'s now has.
    pub fn merge(&mut self, other: &Paths) -> Renumbering {
        // A node's parent always has a lower number, so it is placed first.
        let mut fields = vec![ROOT; other.fields.nodes.len()];
        for (id, node) in other.fields.nodes.iter().enumerate().skip(1) {
            fields[id] = self.field(fields[node.parent as usize], &node.step);
        }
        let mut arrays = vec![ROOT; other.arrays.nodes.len()];
        for (id, node) in other.arrays.nodes.iter().enumerate().skip(1) {
            arrays[id] = self.array(arrays[node.parent as usize], fields[node.step as usize]);
        }
        Renumbering { fields, arrays }
    }
}

/// Appends `s` as a JSON string. Field names rarely need escaping, so the common case is a
/// plain copy.
fn push_json_string(text: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        text.push('"');
        text.push_str(s);
        text.push('"');
    } else {
        text.push_str(&serde_json::to_string(s).unwrap_or_default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_numbered_once_with_their_json_text() {
        let mut paths = Paths::new();
        let customer = paths.field(ROOT, "customer");
        let city = paths.field(customer, "city");
        assert_eq!(paths.field(customer, "city"), city);
        assert_eq!(paths.text(city), r#"["customer","city"]"#);
        assert_eq!(paths.text(ROOT), "[]");
        assert_eq!(paths.find_field(ROOT, "customer"), Some(customer));
        assert_eq!(paths.find_field(ROOT, "city"), None);
        let items = paths.field(ROOT, "items");
        let tags = paths.field(ROOT, "tags");
        let outer = paths.array(ROOT, items);
        let inner = paths.array(outer, tags);
        assert_eq!(paths.array(outer, tags), inner);
        assert_eq!(paths.array_text(inner), r#"[["items"],["tags"]]"#);
        assert_eq!(paths.array_text(ROOT), "[]");
    }

    #[test]
    fn next_field_finds_the_same_paths_as_field() {
        let mut paths = Paths::new();
        let shapes: [&[&str]; 4] = [&["a", "b", "c"], &["a", "c"], &["b", "c", "d"], &["a", "b"]];
        for parent in [ROOT, 1] {
            for shape in shapes {
                let mut previous = None;
                for name in shape {
                    let id = paths.next_field(parent, previous, name);
                    assert_eq!(paths.find_field(parent, name), Some(id), "{name}");
                    previous = Some(id);
                }
            }
        }
        // The same names under another parent are other paths.
        let a = paths.find_field(ROOT, "a");
        let nested = paths.find_field(1, "a");
        assert!(a.is_some() && nested.is_some() && a != nested);
    }

    #[test]
    fn names_are_escaped_as_serde_json_would() {
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
            let mut paths = Paths::new();
            let id = paths.field(ROOT, name);
            let expected = serde_json::to_string(&[name]).expect("serializes");
            assert_eq!(paths.text(id), expected, "{name:?}");
            assert_eq!(paths.has_nul(id), name.contains('\0'));
        }
    }

    #[test]
    fn a_nul_in_a_name_marks_every_path_below_it() {
        let mut paths = Paths::new();
        let odd = paths.field(ROOT, "a\0");
        let below = paths.field(odd, "b");
        let array = paths.array(ROOT, below);
        let plain = paths.field(ROOT, "c");
        assert!(paths.has_nul(below));
        assert!(!paths.has_nul(plain));
        assert_eq!(paths.array_text(array), r#"[["a\u0000","b"]]"#);
    }

    #[test]
    fn merging_renumbers_the_other_paths_by_their_names() {
        let mut left = Paths::new();
        let a = left.field(ROOT, "a");
        let mut right = Paths::new();
        let b = right.field(ROOT, "b");
        let a_in_right = right.field(ROOT, "a");
        let ab = right.field(a_in_right, "x");
        let arr = right.array(ROOT, ab);
        let moved = left.merge(&right);
        assert_eq!(moved.fields[a_in_right as usize], a);
        assert_eq!(left.text(moved.fields[b as usize]), r#"["b"]"#);
        assert_eq!(left.text(moved.fields[ab as usize]), r#"["a","x"]"#);
        assert_eq!(
            left.array_text(moved.arrays[arr as usize]),
            r#"[["a","x"]]"#
        );
        assert_eq!(left.field(ROOT, "b"), moved.fields[b as usize]);
    }
}
