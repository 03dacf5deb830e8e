//! Parsing and validation of a push request body (RJMetrics Import API v2 wire format).
//!
//! A body is one JSON object or an array of objects. Every record declares its primary key in
//! `keys`; the whole request is rejected if any record is invalid, with one reason per problem.
//! Records are kept as the exact bytes received, so staging holds them byte-for-byte.

use std::collections::HashMap;

use serde_json::value::RawValue;

/// Longest string value accepted in a key field, in bytes.
pub const MAX_STRING_KEY_BYTES: usize = 1024;
/// Most reasons listed in one error answer; the rest are counted.
pub const MAX_REASONS: usize = 100;
/// Most key fields a record may declare (a primary key wider than this is no key; PostgreSQL
/// indexes at most 32 columns, and child tables add position columns to the root's keys).
pub const MAX_KEY_FIELDS: usize = 16;

/// Limits a body must respect; they come from `[server]` settings.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_records: usize,
    pub max_depth: usize,
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyRejection {
    /// More records than allowed: HTTP 413.
    TooManyRecords { count: usize, max: usize },
    /// Malformed, wrongly shaped or invalid records: HTTP 400.
    Invalid {
        message: String,
        reasons: Vec<String>,
    },
}

impl BodyRejection {
    fn invalid(message: impl Into<String>, reasons: Vec<String>) -> BodyRejection {
        BodyRejection::Invalid {
            message: message.into(),
            reasons,
        }
    }
}

/// Parses `body` and validates every record, returning each record's exact JSON text in order.
pub fn parse_push_body(body: &[u8], limits: BodyLimits) -> Result<Vec<&str>, BodyRejection> {
    check_depth(body, limits.max_depth)?;
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let records: Vec<&RawValue> = match first {
        None => return Err(BodyRejection::invalid("request body is empty", vec![])),
        Some(b'[') => serde_json::from_slice(body).map_err(malformed)?,
        Some(b'{') => vec![serde_json::from_slice(body).map_err(malformed)?],
        Some(_) => {
            // Either malformed JSON or a scalar; say which.
            serde_json::from_slice::<&RawValue>(body).map_err(malformed)?;
            return Err(BodyRejection::invalid(
                "request body must be a JSON object or an array of JSON objects",
                vec![],
            ));
        }
    };
    if records.is_empty() {
        return Err(BodyRejection::invalid(
            "request body holds no records",
            vec![],
        ));
    }
    if records.len() > limits.max_records {
        return Err(BodyRejection::TooManyRecords {
            count: records.len(),
            max: limits.max_records,
        });
    }
    let mut reasons = Vec::new();
    let mut problems = 0usize;
    for (index, record) in records.iter().enumerate() {
        if let Err(problem) = validate_record(record) {
            problems += 1;
            if reasons.len() < MAX_REASONS {
                reasons.push(format!("record {index}: {problem}"));
            }
        }
    }
    if problems > 0 {
        if problems > reasons.len() {
            reasons.push(format!(
                "... and {} more invalid records",
                problems - reasons.len()
            ));
        }
        let message = if problems == 1 {
            "1 record is invalid; nothing was stored".to_owned()
        } else {
            format!("{problems} records are invalid; nothing was stored")
        };
        return Err(BodyRejection::invalid(message, reasons));
    }
    Ok(records.into_iter().map(RawValue::get).collect())
}

fn malformed(e: serde_json::Error) -> BodyRejection {
    BodyRejection::invalid("request body is not valid JSON", vec![e.to_string()])
}

/// Rejects bodies nested deeper than `max_depth` before any recursive parsing happens.
fn check_depth(body: &[u8], max_depth: usize) -> Result<(), BodyRejection> {
    check_nesting(body, max_depth).map_err(|message| BodyRejection::invalid(message, vec![]))
}

/// Says whether `body` nests JSON deeper than `max_depth`, without parsing it recursively.
pub fn check_nesting(body: &[u8], max_depth: usize) -> Result<(), String> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max_depth {
                    return Err(format!(
                        "JSON nesting is deeper than the limit of {max_depth} levels"
                    ));
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// Checks one record's shape and declared keys; `Err` says what is wrong, for a human.
fn validate_record(record: &RawValue) -> Result<(), String> {
    if !record.get().starts_with('{') {
        return Err("must be a JSON object".into());
    }
    check_unicode_escapes(record.get())?;
    let fields: HashMap<String, &RawValue> =
        serde_json::from_str(record.get()).map_err(|e| format!("is not a valid object: {e}"))?;
    let keys_raw = fields
        .get("keys")
        .ok_or("has no \"keys\" field (a non-empty array naming its key fields)")?;
    let keys: Vec<serde_json::Value> = serde_json::from_str(keys_raw.get())
        .map_err(|_| "\"keys\" must be a non-empty array of field names")?;
    let names = check_key_names(&keys, "\"keys\"")?;
    if names.contains(&"keys") {
        return Err("\"keys\" cannot name the \"keys\" field itself".into());
    }
    check_key_values(&names, |name| fields.get(name).copied())
}

/// Checks a declared list of key field names (`what` names the list in messages: `"keys"` or
/// `"key_names"`): 1 to [`MAX_KEY_FIELDS`] distinct strings. Shared by both protocols.
pub fn check_key_names<'k>(
    keys: &'k [serde_json::Value],
    what: &str,
) -> Result<Vec<&'k str>, String> {
    if keys.is_empty() {
        return Err(format!("{what} must be a non-empty array of field names"));
    }
    if keys.len() > MAX_KEY_FIELDS {
        return Err(format!(
            "{what} names {} fields; at most {MAX_KEY_FIELDS} are allowed",
            keys.len()
        ));
    }
    let mut seen: Vec<&str> = Vec::with_capacity(keys.len());
    for key in keys {
        let serde_json::Value::String(name) = key else {
            return Err(format!("{what} must contain only strings (field names)"));
        };
        if seen.contains(&name.as_str()) {
            return Err(format!("{what} names {} more than once", shown(name)));
        }
        seen.push(name);
    }
    Ok(seen)
}

/// Checks that every key field is present with a usable value: a non-null string (at most
/// [`MAX_STRING_KEY_BYTES`]), a 64-bit integer or a boolean.
pub fn check_key_values<'f>(
    names: &[&str],
    field: impl Fn(&str) -> Option<&'f RawValue>,
) -> Result<(), String> {
    for name in names {
        let value = field(name).ok_or_else(|| format!("key field {} is missing", shown(name)))?;
        check_key_value(name, value)?;
    }
    Ok(())
}

fn check_key_value(name: &str, value: &RawValue) -> Result<(), String> {
    let text = value.get();
    let wrong = |what: &str| {
        format!(
            "key field {} must be a non-null string, integer or boolean, not {what}",
            shown(name)
        )
    };
    match text.as_bytes().first() {
        Some(b'n') => Err(format!("key field {} is null", shown(name))),
        Some(b't' | b'f') => Ok(()),
        Some(b'{') => Err(wrong("an object")),
        Some(b'[') => Err(wrong("an array")),
        Some(b'"') => {
            let s: String = serde_json::from_str(text).map_err(|e| e.to_string())?;
            if s.len() > MAX_STRING_KEY_BYTES {
                Err(format!(
                    "key field {} is {} bytes long; string keys are limited to {MAX_STRING_KEY_BYTES} bytes",
                    shown(name),
                    s.len()
                ))
            } else {
                Ok(())
            }
        }
        _ => {
            if text.contains(['.', 'e', 'E']) {
                Err(wrong("a number with a fraction or exponent"))
            } else if text.parse::<i64>().is_err() {
                Err(format!(
                    "key field {} is an integer outside the 64-bit signed range",
                    shown(name)
                ))
            } else {
                Ok(())
            }
        }
    }
}

/// Refuses `\\u` escapes that are not Unicode text: a lone surrogate (`\\ud800` without its
/// pair) is valid JSON syntax but no string can hold it, so the record could never load.
pub fn check_unicode_escapes(text: &str) -> Result<(), String> {
    let bytes = text.as_bytes();
    let hex4 = |at: usize| -> Option<u32> {
        let digits = bytes.get(at..at + 4)?;
        u32::from_str_radix(std::str::from_utf8(digits).ok()?, 16).ok()
    };
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'\\' {
            i += 1;
            continue;
        }
        if bytes.get(i + 1) != Some(&b'u') {
            i += 2;
            continue;
        }
        let unit = hex4(i + 2).ok_or("holds a malformed \\u escape")?;
        i += 6;
        match unit {
            0xD800..=0xDBFF => {
                let low = if bytes.get(i) == Some(&b'\\') && bytes.get(i + 1) == Some(&b'u') {
                    hex4(i + 2)
                } else {
                    None
                };
                match low {
                    Some(0xDC00..=0xDFFF) => i += 6,
                    _ => {
                        return Err(format!(
                            "holds a lone surrogate escape \\u{unit:04x}, which is not text"
                        ));
                    }
                }
            }
            0xDC00..=0xDFFF => {
                return Err(format!(
                    "holds a lone surrogate escape \\u{unit:04x}, which is not text"
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// A field name as shown in a reason: quoted, and cut short if it is huge.
fn shown(name: &str) -> String {
    const LIMIT: usize = 64;
    if name.chars().count() <= LIMIT {
        format!("{name:?}")
    } else {
        let head: String = name.chars().take(LIMIT).collect();
        format!("{head:?}...")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BodyLimits = BodyLimits {
        max_records: 3,
        max_depth: 8,
    };

    fn reasons(body: &str) -> Vec<String> {
        match parse_push_body(
            body.as_bytes(),
            BodyLimits {
                max_records: 50,
                ..LIMITS
            },
        ) {
            Err(BodyRejection::Invalid { reasons, message }) => {
                let mut all = vec![message];
                all.extend(reasons);
                all
            }
            other => panic!("expected Invalid for {body}, got {other:?}"),
        }
    }

    #[test]
    fn accepts_an_object_or_an_array_and_keeps_exact_bytes() {
        let one = r#"{"id": 1, "keys": ["id"], "x": {"y": [1, 2.5]}}"#;
        assert_eq!(parse_push_body(one.as_bytes(), LIMITS), Ok(vec![one]));
        let many =
            "[ {\"a\":\"x\",\"keys\":[\"a\"]} ,\n{\"a\":true,\"b\":-3,\"keys\":[\"a\",\"b\"]}]";
        assert_eq!(
            parse_push_body(many.as_bytes(), LIMITS),
            Ok(vec![
                r#"{"a":"x","keys":["a"]}"#,
                r#"{"a":true,"b":-3,"keys":["a","b"]}"#
            ])
        );
    }

    #[test]
    fn names_each_invalid_record_and_its_problem() {
        let r = reasons(
            r#"[{"id":1,"keys":["id"]}, 5, {"id":1}, {"keys":[]}, {"keys":["id"],"id":null},
               {"keys":["id","id"],"id":1}, {"keys":["id"],"id":1.5}, {"keys":["id"],"id":{}},
               {"keys":["id"],"id":99999999999999999999}, {"keys":["nope"]}, {"keys":"id","id":1}]"#,
        );
        assert!(r[0].contains("10 records are invalid"), "{r:?}");
        let expected = [
            "record 1: must be a JSON object",
            "record 2: has no \"keys\"",
            "record 3: \"keys\" must be a non-empty array",
            "record 4: key field \"id\" is null",
            "record 5: \"keys\" names \"id\" more than once",
            "record 6: key field \"id\" must be a non-null string, integer or boolean, not a number",
            "record 7: key field \"id\" must be a non-null string, integer or boolean, not an object",
            "record 8: key field \"id\" is an integer outside",
            "record 9: key field \"nope\" is missing",
            "record 10: \"keys\" must be a non-empty array",
        ];
        for (i, want) in expected.iter().enumerate() {
            assert!(
                r[i + 1].starts_with(want),
                "reason {i}: {:?} should start with {want:?}",
                r[i + 1]
            );
        }
    }

    #[test]
    fn long_string_keys_are_refused() {
        let ok = format!(r#"{{"k":"{}","keys":["k"]}}"#, "x".repeat(1024));
        assert!(parse_push_body(ok.as_bytes(), LIMITS).is_ok());
        let long = format!(r#"{{"k":"{}","keys":["k"]}}"#, "x".repeat(1025));
        assert!(reasons(&long)[1].contains("1025 bytes"));
    }

    #[test]
    fn malformed_shapes_and_limits() {
        assert!(reasons("")[0].contains("empty"));
        assert!(reasons("[]")[0].contains("no records"));
        assert!(reasons("42")[0].contains("object or an array"));
        assert!(reasons("{\"a\":")[0].contains("not valid JSON"));
        assert!(reasons(&"[".repeat(9))[0].contains("deeper than the limit of 8"));
        assert!(reasons(&format!("[{}]", "[".repeat(100_000)))[0].contains("deeper"));
        let four = r#"[{"a":1,"keys":["a"]},{"a":1,"keys":["a"]},{"a":1,"keys":["a"]},{"a":1,"keys":["a"]}]"#;
        assert_eq!(
            parse_push_body(four.as_bytes(), LIMITS),
            Err(BodyRejection::TooManyRecords { count: 4, max: 3 })
        );
        assert!(reasons("[{\"a\":\"\\ud800\",\"keys\":[\"a\"]}]")[0].contains("invalid"));
    }

    #[test]
    fn lone_surrogates_and_too_many_keys_are_refused() {
        let ok = r#"{"k":"\ud83d\ude00 \u00e9 \\ud800","keys":["k"]}"#;
        assert!(
            parse_push_body(ok.as_bytes(), LIMITS).is_ok(),
            "a pair, a plain escape, an escaped backslash"
        );
        for bad in [
            r#"{"k":1,"v":"\ud800","keys":["k"]}"#,
            r#"{"k":1,"v":"\udc00\ud800","keys":["k"]}"#,
            r#"{"k":1,"\ud800x":1,"keys":["k"]}"#,
        ] {
            assert!(reasons(bad)[1].contains("lone surrogate"), "{bad}");
        }
        let fields: Vec<String> = (0..17).map(|i| format!("\"f{i}\":{i}")).collect();
        let names: Vec<String> = (0..17).map(|i| format!("\"f{i}\"")).collect();
        let wide = format!("{{{},\"keys\":[{}]}}", fields.join(","), names.join(","));
        assert!(reasons(&wide)[1].contains("at most 16"));
    }

    #[test]
    fn brackets_inside_strings_do_not_count_as_depth() {
        let body = format!(r#"{{"id":"{}","keys":["id"]}}"#, "[{".repeat(50));
        assert!(parse_push_body(body.as_bytes(), LIMITS).is_ok());
    }

    #[test]
    fn reasons_are_capped() {
        let body = format!("[{}]", ["{}"; 3].join(","));
        let limits = BodyLimits {
            max_records: 500,
            max_depth: 8,
        };
        assert_eq!(reasons(&body).len(), 4);
        let many = format!("[{}]", ["{}"; 250].join(","));
        match parse_push_body(many.as_bytes(), limits) {
            Err(BodyRejection::Invalid { reasons, .. }) => {
                assert_eq!(reasons.len(), MAX_REASONS + 1);
                assert_eq!(reasons[MAX_REASONS], "... and 150 more invalid records");
            }
            other => panic!("{other:?}"),
        }
    }
}
