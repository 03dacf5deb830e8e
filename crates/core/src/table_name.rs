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

#[cfg(test)]
mod tests {
    use super::*;

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
