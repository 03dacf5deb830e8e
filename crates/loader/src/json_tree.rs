//! A record's JSON parsed for flattening: field names and plain strings borrow the record's
//! text, objects are vectors, and numbers keep their text. It reads what serde_json reads,
//! and gives what a `serde_json::Value` would: object fields sorted by name, the last of
//! duplicate names winning, numbers exact. Parsing records is the loader's largest cost, and
//! a `Value` spends most of it on map nodes and on copies of field names that the flattening
//! immediately drops.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// One JSON value.
#[derive(Debug, Clone, PartialEq)]
pub enum Json<'a> {
    Null,
    Bool(bool),
    /// An integer that fits 64 signed bits.
    Int(i64),
    /// Any other number, as written: larger integers, decimals, exponents.
    Number(String),
    Str(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Fields sorted by name, each name once.
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

/// Parses a whole JSON text (nothing may follow the value).
pub fn parse(text: &str) -> Result<Json<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Json::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

impl Json<'_> {
    /// The same value as a `serde_json::Value` (for the rare value written back as JSON).
    pub fn into_value(self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(b),
            Json::Int(i) => Value::from(i),
            Json::Number(text) => serde_json::Number::from_str(&text)
                .map(Value::Number)
                .unwrap_or(Value::String(text)),
            Json::Str(s) => Value::String(s.into_owned()),
            Json::Array(items) => Value::Array(items.into_iter().map(Json::into_value).collect()),
            Json::Object(fields) => Value::Object(
                fields
                    .into_iter()
                    .map(|(k, v)| (k.into_owned(), v.into_value()))
                    .collect(),
            ),
        }
    }
}

/// The field name serde_json (with `arbitrary_precision`) uses to hand over a number that
/// does not fit 64 bits, or has a fraction or exponent, as its text. Tests pin what relies
/// on it: such numbers must come out as [`Json::Number`], not as objects.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

impl<'de> Deserialize<'de> for Json<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(JsonVisitor)
    }
}

struct JsonVisitor;

impl<'de> Visitor<'de> for JsonVisitor {
    type Value = Json<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_none<E>(self) -> Result<Json<'de>, E> {
        Ok(Json::Null)
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Json<'de>, D::Error> {
        Json::deserialize(d)
    }

    fn visit_bool<E>(self, b: bool) -> Result<Json<'de>, E> {
        Ok(Json::Bool(b))
    }

    fn visit_i64<E>(self, i: i64) -> Result<Json<'de>, E> {
        Ok(Json::Int(i))
    }

    fn visit_u64<E>(self, u: u64) -> Result<Json<'de>, E> {
        Ok(i64::try_from(u).map_or_else(|_| Json::Number(u.to_string()), Json::Int))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Json<'de>, E> {
        Ok(serde_json::Number::from_f64(f).map_or(Json::Null, |n| Json::Number(n.to_string())))
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Borrowed(s)))
    }

    fn visit_str<E>(self, s: &str) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(s.to_owned())))
    }

    fn visit_string<E>(self, s: String) -> Result<Json<'de>, E> {
        Ok(Json::Str(Cow::Owned(s)))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json<'de>, A::Error> {
        let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(item) = seq.next_element()? {
            items.push(item);
        }
        Ok(Json::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json<'de>, A::Error> {
        let Some(first) = map.next_key_seed(FieldName)? else {
            return Ok(Json::Object(Vec::new()));
        };
        if first == NUMBER_TOKEN {
            let text: String = map.next_value()?;
            serde_json::Number::from_str(&text).map_err(de::Error::custom)?;
            return Ok(Json::Number(text));
        }
        // Most objects in records are small; starting at 8 saves most regrowth.
        let mut fields = Vec::with_capacity(8);
        fields.push((first, map.next_value()?));
        while let Some(name) = map.next_key_seed(FieldName)? {
            fields.push((name, map.next_value()?));
        }
        // As a map would hold them: by name, the last of equal names kept. Many writers
        // already sort their fields (serde_json does), and then there is nothing to do.
        if !fields.is_sorted_by(|a, b| a.0 < b.0) {
            // Reversed first, so that the stable sort puts the last of equal names first,
            // where dedup keeps it.
            fields.reverse();
            fields.sort_by(|a, b| a.0.cmp(&b.0));
            fields.dedup_by(|later, kept| later.0 == kept.0);
        }
        Ok(Json::Object(fields))
    }
}

/// A field name, borrowed from the text unless it holds escapes.
struct FieldName;

impl<'de> DeserializeSeed<'de> for FieldName {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for FieldName {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a field name")
    }

    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(s))
    }

    fn visit_str<E>(self, s: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s.to_owned()))
    }

    fn visit_string<E>(self, s: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whatever the input, the tree says what serde_json's own `Value` says.
    #[test]
    fn it_reads_json_as_serde_json_does() {
        for text in [
            r#"{"b": 1, "a": [true, null, "x\"y", 2.50, -0, 1e400, 18446744073709551616]}"#,
            r#"{"z": {"k": 1}, "z": {"j": 2}, "a\u0000": "\ud83d\ude00", "": []}"#,
            r#"{"n": 9223372036854775807, "m": -9223372036854775808, "u": 9223372036854775808}"#,
            r#"[1, "two", {"three": 3.0e-2}]"#,
            r#""just a string""#,
            "{}",
        ] {
            let ours = parse(text).expect("parses").into_value();
            let theirs: serde_json::Value = serde_json::from_str(text).expect("parses");
            assert_eq!(ours, theirs, "{text}");
            assert_eq!(ours.to_string(), theirs.to_string(), "{text}");
        }
    }

    #[test]
    fn numbers_keep_their_text_and_duplicates_keep_the_last() {
        let parsed = parse(r#"{"x": 1, "d": 2.50, "x": 3, "big": 123456789012345678901234567890}"#)
            .expect("parses");
        assert_eq!(
            parsed,
            Json::Object(vec![
                (
                    "big".into(),
                    Json::Number("123456789012345678901234567890".into())
                ),
                ("d".into(), Json::Number("2.50".into())),
                ("x".into(), Json::Int(3)),
            ])
        );
    }

    #[test]
    fn bad_json_is_refused_as_serde_json_refuses_it() {
        for text in [
            "{",
            r#"{"a": 1} trailing"#,
            r#"{"a": 01}"#,
            r#"{"$serde_json::private::Number": "not a number"}"#,
            "",
        ] {
            assert!(parse(text).is_err(), "{text}");
            assert!(
                serde_json::from_str::<serde_json::Value>(text).is_err(),
                "{text}"
            );
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(
            parse(&deep).is_err(),
            "serde_json's recursion limit applies"
        );
    }
}
