//! A record's JSON parsed for flattening: field names and plain strings borrow the record's
//! text, objects are vectors, and numbers keep their text. It reads what serde_json reads,
//! and gives what a `serde_json::Value` would: object fields sorted by name, the last of
//! duplicate names winning, numbers exact. Parsing records is the loader's largest cost, and
//! a `Value` spends most of it on map nodes and on copies of field names that the flattening
//! immediately drops.
//!
//! Well-formed text is read by a parser of its own, about twice as fast as serde_json's
//! visitor interface (which hands every number that is not a 64-bit integer over as a map, and
//! copies it). Anything it does not accept at once (bad JSON above all, but also deep nesting
//! and surrogate escapes) goes to serde_json, whose answers and error messages stay the
//! reference; tests hold the two to the same results.

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
    /// Any other number, as written: larger integers, decimals, exponents (borrowed from the
    /// record unless its exponent had to be respelled as serde_json writes it).
    Number(Cow<'a, str>),
    Str(Cow<'a, str>),
    Array(Vec<Json<'a>>),
    /// Fields sorted by name, each name once.
    Object(Vec<(Cow<'a, str>, Json<'a>)>),
}

/// Parses a whole JSON text (nothing may follow the value).
pub fn parse(text: &str) -> Result<Json<'_>, serde_json::Error> {
    match Reader::new(text).document() {
        Some(value) => Ok(value),
        None => parse_with_serde(text),
    }
}

/// The same as [`parse`], by serde_json alone.
fn parse_with_serde(text: &str) -> Result<Json<'_>, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_str(text);
    let value = Json::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// Nesting beyond which the reader leaves the text to serde_json (which refuses more than 128).
const MAX_DEPTH: usize = 100;

/// A reader of well-formed JSON text. Every method answers `None` for anything it does not
/// take, without saying why: serde_json then reads the text again, and says.
struct Reader<'a> {
    text: &'a str,
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl<'a> Reader<'a> {
    fn new(text: &'a str) -> Self {
        Reader {
            text,
            bytes: text.as_bytes(),
            pos: 0,
            depth: 0,
        }
    }

    fn document(mut self) -> Option<Json<'a>> {
        let value = self.value()?;
        self.skip_space();
        (self.pos == self.bytes.len()).then_some(value)
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.pos).copied()
    }

    fn skip_space(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.pos += 1;
        }
    }

    /// Consumes `byte` after optional whitespace.
    fn expect(&mut self, byte: u8) -> Option<()> {
        self.skip_space();
        (self.peek()? == byte).then(|| self.pos += 1)
    }

    fn value(&mut self) -> Option<Json<'a>> {
        self.skip_space();
        match self.peek()? {
            b'{' => self.object(),
            b'[' => self.array(),
            b'"' => self.string().map(Json::Str),
            b't' => self.word("true", Json::Bool(true)),
            b'f' => self.word("false", Json::Bool(false)),
            b'n' => self.word("null", Json::Null),
            b'-' | b'0'..=b'9' => self.number(),
            _ => None,
        }
    }

    fn word(&mut self, word: &str, value: Json<'a>) -> Option<Json<'a>> {
        let end = self.pos + word.len();
        (self.bytes.get(self.pos..end)? == word.as_bytes()).then(|| {
            self.pos = end;
            value
        })
    }

    /// A number as serde_json (with `arbitrary_precision`) gives it: an integer that fits 64
    /// signed bits, except `-0`, is an integer; anything else keeps its text.
    fn number(&mut self) -> Option<Json<'a>> {
        let start = self.pos;
        if self.peek() == Some(b'-') {
            self.pos += 1;
        }
        match self.peek()? {
            b'0' => self.pos += 1,
            b'1'..=b'9' => self.digits(),
            _ => return None,
        }
        let mut integer = true;
        if self.peek() == Some(b'.') {
            self.pos += 1;
            self.some_digits()?;
            integer = false;
        }
        let mut exponent = None;
        if let Some(b'e' | b'E') = self.peek() {
            exponent = Some(self.pos);
            self.pos += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.pos += 1;
            }
            self.some_digits()?;
            integer = false;
        }
        let text = &self.text[start..self.pos];
        if integer
            && text != "-0"
            && let Ok(i) = text.parse::<i64>()
        {
            return Some(Json::Int(i));
        }
        Some(Json::Number(match exponent {
            // serde_json writes an exponent as `e`, then its sign, `+` if none was given.
            Some(at)
                if !text[at - start..].starts_with("e+")
                    && !text[at - start..].starts_with("e-") =>
            {
                let (mantissa, rest) = text.split_at(at - start);
                let digits = rest[1..].trim_start_matches(['+', '-']);
                let sign = if rest[1..].starts_with('-') { '-' } else { '+' };
                Cow::Owned(format!("{mantissa}e{sign}{digits}"))
            }
            _ => Cow::Borrowed(text),
        }))
    }

    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.pos += 1;
        }
    }

    fn some_digits(&mut self) -> Option<()> {
        let start = self.pos;
        self.digits();
        (self.pos > start).then_some(())
    }

    /// A string, at its opening quote: borrowed from the text unless it holds escapes.
    fn string(&mut self) -> Option<Cow<'a, str>> {
        self.pos += 1;
        let start = self.pos;
        self.plain_run();
        match self.peek()? {
            b'"' => {
                let s = &self.text[start..self.pos];
                self.pos += 1;
                Some(Cow::Borrowed(s))
            }
            b'\\' => self.escaped(start).map(Cow::Owned),
            _ => None,
        }
    }

    /// Steps over characters that stand for themselves in a string. It stops only at ASCII
    /// bytes, so the text around them splits at character boundaries.
    fn plain_run(&mut self) {
        let rest = self.bytes.get(self.pos..).unwrap_or_default();
        self.pos += rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)
            .unwrap_or(rest.len());
    }

    /// The rest of a string that holds escapes, from its first character at `start`.
    fn escaped(&mut self, start: usize) -> Option<String> {
        let mut out = String::with_capacity(self.pos - start + 16);
        out.push_str(&self.text[start..self.pos]);
        loop {
            match self.peek()? {
                b'"' => {
                    self.pos += 1;
                    return Some(out);
                }
                b'\\' => {
                    let escape = *self.bytes.get(self.pos + 1)?;
                    self.pos += 2;
                    out.push(match escape {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        // Surrogate pairs, and serde_json's ways with broken ones, are left
                        // to serde_json.
                        b'u' => char::from_u32(self.hex4()?)?,
                        _ => return None,
                    });
                }
                b if b < 0x20 => return None,
                _ => {
                    let run = self.pos;
                    self.plain_run();
                    out.push_str(&self.text[run..self.pos]);
                }
            }
        }
    }

    fn hex4(&mut self) -> Option<u32> {
        let digits = self.bytes.get(self.pos..self.pos + 4)?;
        let mut code = 0;
        for &d in digits {
            code = code * 16 + char::from(d).to_digit(16)?;
        }
        self.pos += 4;
        Some(code)
    }

    fn enter(&mut self) -> Option<()> {
        self.pos += 1;
        self.depth += 1;
        (self.depth <= MAX_DEPTH).then_some(())
    }

    /// At a container's start: whether it is empty (its `close` is next, and consumed).
    fn empty(&mut self, close: u8) -> Option<bool> {
        self.skip_space();
        let empty = self.peek()? == close;
        if empty {
            self.pos += 1;
        }
        Some(empty)
    }

    /// After an item or field: whether another follows (a comma), or the container ends
    /// (its `close`, consumed).
    fn another(&mut self, close: u8) -> Option<bool> {
        self.skip_space();
        let next = self.peek()?;
        self.pos += 1;
        match next {
            b',' => Some(true),
            b if b == close => Some(false),
            _ => None,
        }
    }

    fn array(&mut self) -> Option<Json<'a>> {
        self.enter()?;
        let mut items = Vec::new();
        if !self.empty(b']')? {
            loop {
                items.push(self.value()?);
                if !self.another(b']')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Some(Json::Array(items))
    }

    fn object(&mut self) -> Option<Json<'a>> {
        self.enter()?;
        // Most objects in records are small; starting at 8 saves most regrowth.
        let mut fields = Vec::with_capacity(8);
        if !self.empty(b'}')? {
            loop {
                self.skip_space();
                if self.peek()? != b'"' {
                    return None;
                }
                let name = self.string()?;
                // serde_json's own spelling of a number: its reading decides.
                if fields.is_empty() && name == NUMBER_TOKEN {
                    return None;
                }
                self.expect(b':')?;
                fields.push((name, self.value()?));
                if !self.another(b'}')? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Some(Json::Object(by_name(fields)))
    }
}

/// Object fields as a map would hold them: by name, the last of equal names kept. Many
/// writers already sort their fields (serde_json does), and then there is nothing to do.
fn by_name<'a>(mut fields: Vec<(Cow<'a, str>, Json<'a>)>) -> Vec<(Cow<'a, str>, Json<'a>)> {
    if !fields.is_sorted_by(|a, b| a.0 < b.0) {
        // Reversed first, so that the stable sort puts the last of equal names first, where
        // dedup keeps it.
        fields.reverse();
        fields.sort_by(|a, b| a.0.cmp(&b.0));
        fields.dedup_by(|later, kept| later.0 == kept.0);
    }
    fields
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
                .unwrap_or_else(|_| Value::String(text.into_owned())),
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
        Ok(i64::try_from(u).map_or_else(|_| Json::Number(u.to_string().into()), Json::Int))
    }

    fn visit_f64<E>(self, f: f64) -> Result<Json<'de>, E> {
        Ok(serde_json::Number::from_f64(f)
            .map_or(Json::Null, |n| Json::Number(n.to_string().into())))
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
            return Ok(Json::Number(text.into()));
        }
        // Most objects in records are small; starting at 8 saves most regrowth.
        let mut fields = Vec::with_capacity(8);
        fields.push((first, map.next_value()?));
        while let Some(name) = map.next_key_seed(FieldName)? {
            fields.push((name, map.next_value()?));
        }
        Ok(Json::Object(by_name(fields)))
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

    /// The reader takes ordinary records itself rather than leaving them to serde_json.
    #[test]
    fn the_reader_takes_well_formed_records() {
        for text in [
            r#"{"id": 7, "keys": ["id"], "name": "Zoë \"Z\" \u00e9\n", "n": null, "ok": true}"#,
            r#" {"a": [1, -2, 3.5, -0, 1e3, 2E-2, 18446744073709551616], "b": {"c": {}}} "#,
            r#"[[], [[]], {"": false}]"#,
        ] {
            let read = Reader::new(text)
                .document()
                .expect("read without serde_json");
            assert_eq!(read, parse_with_serde(text).expect("parses"), "{text}");
        }
    }

    /// Whatever the text, well-formed or broken, `parse` and serde_json agree: the same value,
    /// or both refuse it. Texts are made from valid records by random edits that favour the
    /// characters JSON's grammar turns on.
    #[test]
    fn random_texts_read_as_serde_json_reads_them() {
        let seeds = [
            r#"{"id": 12, "name": "caf\u00e9 \"x\"", "tags": ["a", "b\\c"], "price": -12.50, "n": null}"#,
            r#"{"o": {"p": [1, 2.0e+5, -0, true, false], "q": {"r": "\ud83d\ude00"}}, "o": 1}"#,
            r#"[0, 9223372036854775807, -9223372036854775808, 9223372036854775808, 1E400, ""]"#,
        ];
        let alphabet: Vec<char> = "{}[]\",:\\/0123456789-+.eEtrufalsn u\t\nabcd\u{1}é😀"
            .chars()
            .collect();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = |bound: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % bound as u64) as usize
        };
        let (mut same_values, mut both_refused) = (0, 0);
        for round in 0..20_000 {
            let mut chars: Vec<char> = seeds[round % seeds.len()].chars().collect();
            for _ in 0..1 + next(3) {
                let at = next(chars.len() + 1);
                match next(3) {
                    0 if at < chars.len() => {
                        chars.remove(at);
                    }
                    1 if at < chars.len() => chars[at] = alphabet[next(alphabet.len())],
                    _ => chars.insert(at, alphabet[next(alphabet.len())]),
                }
            }
            let text: String = chars.into_iter().collect();
            let ours = parse(&text).map(Json::into_value);
            let theirs = serde_json::from_str::<serde_json::Value>(&text);
            match (ours, theirs) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(a, b, "{text}");
                    assert_eq!(a.to_string(), b.to_string(), "{text}");
                    same_values += 1;
                }
                (Err(a), Err(b)) => {
                    assert_eq!(a.to_string(), b.to_string(), "{text}");
                    both_refused += 1;
                }
                (a, b) => panic!("{text}: ours {a:?}, serde_json's {b:?}"),
            }
        }
        // Both outcomes were exercised, many times.
        assert!(
            same_values > 1_000 && both_refused > 1_000,
            "{same_values} / {both_refused}"
        );
    }
}
