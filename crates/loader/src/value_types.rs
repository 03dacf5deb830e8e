//! The warehouse types of JSON values, and the one rule for recognising date-times.

use std::borrow::Cow;

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::json_tree::Json;

/// A warehouse column type. Each backend spells it in [`crate::dialect`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColType {
    BigInt,
    Double,
    Boolean,
    Text,
    Timestamp,
    /// Only the overflow column of a table that reached its column limit.
    Json,
}

impl ColType {
    /// The name stored in the `_intake_columns` mapping table.
    pub fn as_str(self) -> &'static str {
        match self {
            ColType::BigInt => "bigint",
            ColType::Double => "double",
            ColType::Boolean => "boolean",
            ColType::Text => "text",
            ColType::Timestamp => "timestamp",
            ColType::Json => "json",
        }
    }

    pub fn parse(text: &str) -> Option<ColType> {
        Some(match text {
            "bigint" => ColType::BigInt,
            "double" => ColType::Double,
            "boolean" => ColType::Boolean,
            "text" => ColType::Text,
            "timestamp" => ColType::Timestamp,
            "json" => ColType::Json,
            _ => return None,
        })
    }

    /// Suffix of the sibling column that holds values of this type when a field's first
    /// column has another type (the Stitch convention).
    pub fn sibling_suffix(self) -> &'static str {
        match self {
            ColType::BigInt => "__it",
            ColType::Double => "__fl",
            ColType::Boolean => "__bo",
            ColType::Text => "__st",
            ColType::Timestamp => "__ti",
            ColType::Json => "__js",
        }
    }
}

/// One typed, non-null scalar from a record.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Int(i64),
    Float(f64),
    Bool(bool),
    Text(String),
    /// A date-time string, with its original text (kept if it lands in a text column).
    Time(DateTime<Utc>, String),
}

impl Cell {
    pub fn col_type(&self) -> ColType {
        match self {
            Cell::Int(_) => ColType::BigInt,
            Cell::Float(_) => ColType::Double,
            Cell::Bool(_) => ColType::Boolean,
            Cell::Text(_) => ColType::Text,
            Cell::Time(..) => ColType::Timestamp,
        }
    }

    /// The cell as it would go into a column of `target` type without losing anything, if
    /// that is possible: integers into double columns when exactly representable, date-time
    /// strings into text columns as their original text.
    pub fn coerce_to(&self, target: ColType) -> Option<Cell> {
        if self.col_type() == target {
            return Some(self.clone());
        }
        match (self, target) {
            (Cell::Int(i), ColType::Double) if i.unsigned_abs() <= (1u64 << 53) => {
                Some(Cell::Float(*i as f64))
            }
            (Cell::Time(_, text), ColType::Text) => Some(Cell::Text(text.clone())),
            _ => None,
        }
    }

    /// The cell as a JSON value (for the overflow column).
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Cell::Int(i) => (*i).into(),
            Cell::Float(f) => {
                serde_json::Number::from_f64(*f).map_or(serde_json::Value::Null, Into::into)
            }
            Cell::Bool(b) => (*b).into(),
            Cell::Text(s) | Cell::Time(_, s) => s.clone().into(),
        }
    }
}

/// The cell for a JSON scalar. Integers beyond 64 bits stay exact as text; strings that are
/// ISO-8601 date-times (with `T` or a space, naive ones read as UTC) become timestamps.
pub fn scalar_cell(value: Json<'_>) -> Option<Cell> {
    match value {
        Json::Bool(b) => Some(Cell::Bool(b)),
        Json::Int(i) => Some(Cell::Int(i)),
        Json::Number(text) => Some(number_cell(text)),
        Json::Str(s) => {
            let s = s.into_owned();
            Some(match parse_datetime(&s) {
                Some(t) => Cell::Time(t, s),
                None => Cell::Text(s),
            })
        }
        Json::Null | Json::Array(_) | Json::Object(_) => None,
    }
}

/// A number as written in the record: an integer that fits 64 bits, a finite decimal, or
/// else (integers beyond 64 bits, numbers no double can hold, like 1e400) its exact text.
fn number_cell(text: Cow<'_, str>) -> Cell {
    if let Ok(i) = text.parse::<i64>() {
        return Cell::Int(i);
    }
    match text.parse::<f64>() {
        Ok(f) if f.is_finite() && text.contains(['.', 'e', 'E']) => Cell::Float(f),
        _ => Cell::Text(text.into_owned()),
    }
}

/// Recognises `YYYY-MM-DD[T ]HH:MM:SS[.fraction][Z|±HH:MM|±HHMM]` with a year in 0001–9999.
pub fn parse_datetime(s: &str) -> Option<DateTime<Utc>> {
    let b = s.as_bytes();
    let shape_ok = b.len() >= 19
        && b.len() <= 40
        && b[4] == b'-'
        && b[7] == b'-'
        && (b[10] == b'T' || b[10] == b' ')
        && b[13] == b':'
        && b[16] == b':'
        && b[..4].iter().all(u8::is_ascii_digit);
    if !shape_ok || &s[..4] == "0000" {
        return None;
    }
    let normalized: Cow<'_, str> = if b[10] == b' ' {
        Cow::Owned(format!("{}T{}", &s[..10], &s[11..]))
    } else {
        Cow::Borrowed(s)
    };
    if let Ok(t) = DateTime::parse_from_rfc3339(&normalized) {
        return Some(t.with_timezone(&Utc));
    }
    if let Ok(t) = DateTime::parse_from_str(&normalized, "%Y-%m-%dT%H:%M:%S%.f%z") {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(&normalized, "%Y-%m-%dT%H:%M:%S%.f")
        .ok()
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn date_times_are_recognised() {
        let utc = |s: &str| parse_datetime(s).map(|t| t.to_rfc3339());
        assert_eq!(
            utc("2024-03-01T10:20:30Z").as_deref(),
            Some("2024-03-01T10:20:30+00:00")
        );
        assert_eq!(
            utc("2024-03-01 10:20:30").as_deref(),
            Some("2024-03-01T10:20:30+00:00")
        );
        assert_eq!(
            utc("2024-03-01T12:20:30+02:00").as_deref(),
            Some("2024-03-01T10:20:30+00:00")
        );
        assert_eq!(
            utc("2024-03-01T10:20:30.5+0000").as_deref(),
            Some("2024-03-01T10:20:30.500+00:00")
        );
        for not in [
            "2024-03-01",
            "hello",
            "2024-13-01T00:00:00Z",
            "2024-03-01T10:20",
            "0000-01-01T00:00:00Z",
        ] {
            assert_eq!(parse_datetime(not), None, "{not}");
        }
    }

    #[test]
    fn scalars_get_types_without_losing_anything() {
        let cell = |text: &str| scalar_cell(crate::json_tree::parse(text).expect("parses"));
        assert_eq!(cell("7"), Some(Cell::Int(7)));
        assert_eq!(cell("-0"), Some(Cell::Int(0)));
        assert_eq!(cell("1.5"), Some(Cell::Float(1.5)));
        assert_eq!(cell("1e3"), Some(Cell::Float(1000.0)));
        assert_eq!(
            cell(&u64::MAX.to_string()),
            Some(Cell::Text(u64::MAX.to_string()))
        );
        // serde_json writes the exponent's sign.
        assert_eq!(cell("1e400"), Some(Cell::Text("1e+400".into())));
        assert_eq!(
            cell("123456789012345678901234567890.5"),
            Some(Cell::Float(123456789012345678901234567890.5))
        );
        assert_eq!(cell("true"), Some(Cell::Bool(true)));
        assert_eq!(cell("null"), None);
        assert_eq!(cell("[1]"), None);
        assert_eq!(Cell::Float(1.5).coerce_to(ColType::BigInt), None);
        assert_eq!(
            Cell::Int(3).coerce_to(ColType::Double),
            Some(Cell::Float(3.0))
        );
        assert_eq!(Cell::Int(i64::MAX).coerce_to(ColType::Double), None);
        let t = cell(r#""2024-01-01 00:00:00""#).expect("cell");
        assert_eq!(
            t.coerce_to(ColType::Text),
            Some(Cell::Text("2024-01-01 00:00:00".into()))
        );
    }
}
