//! Warehouse identifiers: the one place where user-supplied names become SQL names.
//!
//! Rules: lower-case; characters outside `[a-z0-9_]` become `_`; nested field paths join with
//! `__`; names longer than PostgreSQL's 63-byte limit keep a readable head and end in an
//! 8-hex-digit hash of the full original path; a name already taken by another path (or by a
//! system column) gets the same hash suffix. Every assignment is recorded in the client's
//! `_intake_columns` table, so nothing is renamed without a record.

use sha2::{Digest, Sha256};

/// PostgreSQL's identifier limit in bytes; SQLite follows it too, for one rule everywhere.
pub const MAX_IDENTIFIER_BYTES: usize = 63;
/// Prefix reserved for Intake's own columns and tables.
pub const SYSTEM_PREFIX: &str = "_intake_";

/// Lower-cases a name and replaces characters outside `[a-z0-9_]` with `_`.
pub fn sanitize(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if cleaned.is_empty() {
        "_".to_owned()
    } else {
        cleaned
    }
}

/// The preferred column (or child-table) name for a path of field names.
pub fn preferred_name(path: &[String]) -> String {
    let joined = joined(path);
    fit(&joined, path)
}

/// The name to use when the preferred one is taken: head plus a hash of the original path.
pub fn disambiguated_name(path: &[String]) -> String {
    with_hash(&joined(path), path)
}

/// The cleaned segments of a path joined with `__` (nested fields: `parent__child`).
fn joined(path: &[String]) -> String {
    path.iter()
        .map(|p| sanitize(p))
        .collect::<Vec<_>>()
        .join("__")
}

/// Appends `suffix` (e.g. `__st`) to a base name, keeping the result within the limit.
pub fn with_suffix(base: &str, suffix: &str, path: &[String]) -> String {
    let full = format!("{base}{suffix}");
    if full.len() <= MAX_IDENTIFIER_BYTES {
        full
    } else {
        let hashed = with_hash(base, path);
        let keep = MAX_IDENTIFIER_BYTES - suffix.len() - 9;
        format!(
            "{}_{}{suffix}",
            &hashed[..keep],
            &hashed[hashed.len() - 8..]
        )
    }
}

fn fit(name: &str, path: &[String]) -> String {
    if name.len() <= MAX_IDENTIFIER_BYTES {
        name.to_owned()
    } else {
        with_hash(name, path)
    }
}

/// `name` cut to fit, plus `_` and 8 hex digits identifying `identity` (the original names).
pub fn with_hash(name: &str, path: &[String]) -> String {
    let hash = path_hash(path);
    let keep = name.len().min(MAX_IDENTIFIER_BYTES - 9);
    format!("{}_{hash}", &name[..keep])
}

/// 8 hex digits identifying an original path (before any sanitising).
fn path_hash(path: &[String]) -> String {
    let mut hasher = Sha256::new();
    for part in path {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    let digest = hasher.finalize();
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Quotes an identifier for SQL. Names reaching here were produced by [`sanitize`] and so
/// hold no quotes, but quoting keeps reserved words (`order`, `select`) usable as names.
pub fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(parts: &[&str]) -> Vec<String> {
        parts.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn names_are_lowercased_and_cleaned() {
        assert_eq!(preferred_name(&path(&["Customer Name"])), "customer_name");
        assert_eq!(
            preferred_name(&path(&["address", "ZIP-code"])),
            "address__zip_code"
        );
        assert_eq!(preferred_name(&path(&["ünï"])), "_n_");
        assert_eq!(preferred_name(&path(&[""])), "_");
        assert_eq!(
            preferred_name(&path(&["a\"; DROP TABLE x; --"])),
            "a___drop_table_x____"
        );
    }

    #[test]
    fn long_names_are_shortened_deterministically() {
        let long = path(&[&"x".repeat(100)]);
        let a = preferred_name(&long);
        assert_eq!(a.len(), MAX_IDENTIFIER_BYTES);
        assert_eq!(a, preferred_name(&long));
        assert!(a.starts_with("xxxxxxxx"));
        let other = path(&[&format!("{}y", "x".repeat(100))]);
        assert_ne!(a, preferred_name(&other));
    }

    #[test]
    fn colliding_paths_get_distinct_names() {
        let a = disambiguated_name(&path(&["A b"]));
        let b = disambiguated_name(&path(&["a_b"]));
        assert_ne!(a, b);
        assert!(a.starts_with("a_b_") && a.len() == 12);
    }

    #[test]
    fn suffixes_fit_the_limit() {
        let long = path(&[&"p".repeat(70)]);
        let base = preferred_name(&long);
        let sibling = with_suffix(&base, "__st", &long);
        assert!(sibling.len() <= MAX_IDENTIFIER_BYTES && sibling.ends_with("__st"));
        assert_eq!(with_suffix("price", "__fl", &path(&["price"])), "price__fl");
    }

    #[test]
    fn quoting_escapes_quotes() {
        assert_eq!(quote("order"), "\"order\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}
