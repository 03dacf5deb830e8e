//! Table names in push URLs: the one place their rules live.
//!
//! A table name is 1–63 characters of `[A-Za-z0-9_]` (63 bytes is PostgreSQL's identifier
//! limit) and is case-insensitive: `Orders` and `orders` are the same table, stored and loaded
//! as `orders`.

/// Longest table name accepted, in characters (all ASCII, so also bytes).
pub const MAX_TABLE_NAME_LEN: usize = 63;

/// Checks a table name from a URL and returns its normalised (lower-case) form, or a message
/// saying what is wrong with it.
pub fn normalize_table_name(raw: &str) -> Result<String, String> {
    if raw.is_empty() {
        return Err("table name is empty".into());
    }
    if raw.len() > MAX_TABLE_NAME_LEN {
        return Err(format!(
            "table name is {} characters long; the limit is {MAX_TABLE_NAME_LEN}",
            raw.chars().count()
        ));
    }
    if let Some(bad) = raw
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_'))
    {
        return Err(format!(
            "table name contains {bad:?}; only letters A-Z, digits and '_' are allowed"
        ));
    }
    if crate::keys::parse_key(raw).is_some() {
        // A key pasted into the wrong place must not become a table name (and so be stored).
        return Err("table name looks like an API key; keys go in ?apikey= or a header".into());
    }
    Ok(raw.to_ascii_lowercase())
}

/// A Stitch `table_name`: Singer streams are often named `schema-table` or `schema.table`, so
/// ASCII punctuation and spaces (`-`, `.`, ` `, ...) become `_` before the rules of
/// [`normalize_table_name`] apply; anything else they refuse is refused here too.
pub fn normalize_stitch_table_name(raw: &str) -> Result<String, String> {
    let mapped: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_punctuation() || c == ' ' {
                '_'
            } else {
                c
            }
        })
        .collect();
    normalize_table_name(&mapped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stitch_names_map_punctuation_to_underscores() {
        assert_eq!(
            normalize_stitch_table_name("public-Users").as_deref(),
            Ok("public_users")
        );
        assert_eq!(
            normalize_stitch_table_name("db.orders v2").as_deref(),
            Ok("db_orders_v2")
        );
        for bad in ["", "ünï", "a\u{0}b", &"a".repeat(64)] {
            assert!(normalize_stitch_table_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn accepts_and_lowercases_valid_names() {
        assert_eq!(
            normalize_table_name("Orders_2024").as_deref(),
            Ok("orders_2024")
        );
        assert_eq!(normalize_table_name("_").as_deref(), Ok("_"));
        let longest = "a".repeat(63);
        assert_eq!(
            normalize_table_name(&longest).as_deref(),
            Ok(longest.as_str())
        );
    }

    #[test]
    fn rejects_invalid_names() {
        for bad in [
            "",
            "a-b",
            "a b",
            "tab;le",
            "t\"x",
            "ünï",
            "a.b",
            &"a".repeat(64),
        ] {
            assert!(
                normalize_table_name(bad).is_err(),
                "{bad:?} must be rejected"
            );
        }
    }
}
