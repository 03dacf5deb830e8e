//! Parsing and validation of Stitch Import API v2 request bodies (`/v2/import/push` and
//! `/v2/import/batch`), kept apart from HTTP so that every rule is unit-tested.
//!
//! A valid body becomes [`Parts`]: per table, each record's byte range in the body (the
//! record stored is the message's `data` object exactly as received) and its Stitch metadata.

use std::collections::HashMap;

use intake_core::push_body::{
    MAX_REASONS, check_key_names, check_key_values, check_nesting, check_unicode_escapes,
};
use intake_core::staging::RecordMeta;
use intake_core::table_name::normalize_stitch_table_name;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

/// Deepest JSON nesting accepted in a Stitch body (serde_json's own parser stops at 128).
pub const MAX_DEPTH: usize = 100;
/// Most distinct tables one push may write: each costs a statement in the commit.
pub const MAX_TABLES_PER_REQUEST: usize = 100;

/// One problem found in a body, tied to a record where there is one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Problem {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    pub message: String,
    /// Where in the schema the record failed (batch validation), as a JSON pointer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema_path: Option<String>,
    /// Where in the record, as a JSON pointer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_path: Option<String>,
}

impl Problem {
    fn at(index: usize, message: impl Into<String>) -> Problem {
        Problem {
            index: Some(index),
            message: message.into(),
            schema_path: None,
            instance_path: None,
        }
    }
}

/// Why a body was refused; each maps to one HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 400: not JSON, the wrong shape, too many records, or (batch) records that fail the
    /// schema.
    BadRequest(String, Vec<Problem>),
    /// 403: a push record names another client than the key's.
    Forbidden(String),
    /// 422: push records that are well formed JSON but unusable.
    Unprocessable(String, Vec<Problem>),
}

/// One table's records of a request, in the order received.
#[derive(Debug, Default)]
pub struct TablePart {
    pub table: String,
    /// Byte range of each record's text in the body.
    pub ranges: Vec<(usize, usize)>,
    pub meta: Vec<RecordMeta>,
    /// The batch's JSON Schema, as JSON text.
    pub schema: Option<String>,
}

/// A validated request: what to stage, and whether an activate_version marker needs the
/// text `{}` appended to the body (markers have no data; their range points at it).
#[derive(Debug, Default)]
pub struct Parts {
    pub tables: Vec<TablePart>,
    pub marker_range: Option<(usize, usize)>,
}

impl Parts {
    pub fn record_count(&self) -> usize {
        self.tables.iter().map(|t| t.ranges.len()).sum()
    }
}

/// Where a body came from: the limits it must respect.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_records: usize,
}

/// Text appended to the body for activate_version markers.
pub const MARKER_TEXT: &str = "{}";

// ---------------------------------------------------------------------------------------
// Push: a JSON array of {client_id, table_name, sequence, action, key_names, data}.

#[derive(Deserialize)]
struct PushMessage<'a> {
    client_id: Option<Value>,
    table_name: Option<Value>,
    sequence: Option<Value>,
    action: Option<Value>,
    key_names: Option<Value>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
}

/// Validates a push body for the key's client. Nothing is partial: any problem refuses all.
pub fn parse_push(body: &str, client_id: i64, limits: Limits) -> Result<Parts, Refusal> {
    let raw: Vec<&RawValue> = parse_json(body, "a JSON array of records")?;
    check_count(raw.len(), limits)?;
    let messages: Vec<PushMessage<'_>> = objects(&raw)?;
    // The key decides the client: a record for another client refuses the whole request.
    for message in &messages {
        // (A client_id that is no integer is a 422 of that record, below.)
        if let Some(Value::Number(n)) = &message.client_id
            && n.as_i64().is_some_and(|id| id != client_id)
        {
            return Err(Refusal::Forbidden(format!(
                "a record names client_id {n}, but this API key belongs to client {client_id}"
            )));
        }
    }
    let mut problems = Problems::default();
    let mut parts = PartsBuilder::default();
    for (index, message) in messages.iter().enumerate() {
        match check_push_message(message) {
            Ok((table, meta, data)) => parts.add(body, &table, data, meta),
            Err(why) => problems.add(Problem::at(index, why)),
        }
    }
    problems.into_result(Refusal::Unprocessable, messages.len())?;
    let parts = parts.finish();
    if parts.tables.len() > MAX_TABLES_PER_REQUEST {
        return Err(Refusal::BadRequest(
            format!(
                "the request writes {} tables; at most {MAX_TABLES_PER_REQUEST} are allowed per \
                 request",
                parts.tables.len()
            ),
            vec![],
        ));
    }
    Ok(parts)
}

fn check_push_message<'a>(m: &PushMessage<'a>) -> Result<(String, RecordMeta, &'a str), String> {
    match &m.client_id {
        Some(Value::Number(n)) if n.as_i64().is_some() => {}
        None => return Err("client_id is missing".into()),
        Some(_) => return Err("client_id must be an integer".into()),
    }
    let table = match &m.table_name {
        Some(Value::String(name)) => normalize_stitch_table_name(name)?,
        None => return Err("table_name is missing".into()),
        Some(_) => return Err("table_name must be a string".into()),
    };
    let sequence = sequence_of(m.sequence.as_ref())?;
    match &m.action {
        Some(Value::String(a)) if a == "upsert" => {}
        None => return Err("action is missing (it must be \"upsert\")".into()),
        Some(_) => return Err("action must be \"upsert\"".into()),
    }
    let key_names = match &m.key_names {
        Some(Value::Array(names)) => names,
        None => return Err("key_names is missing (a non-empty array of field names)".into()),
        Some(_) => return Err("key_names must be a non-empty array of field names".into()),
    };
    let data = m.data.ok_or("data is missing (it must be a JSON object)")?;
    check_data(data, key_names, "key_names")?;
    Ok((
        table,
        RecordMeta {
            client_seq: sequence,
            key_names: Value::Array(key_names.clone()).to_string(),
            table_version: None,
            activate: false,
        },
        data.get(),
    ))
}

// ---------------------------------------------------------------------------------------
// Batch: one table, a JSON Schema, and messages.

#[derive(Deserialize)]
struct BatchBody<'a> {
    table_name: Option<Value>,
    schema: Option<Value>,
    #[serde(borrow)]
    messages: Option<Vec<&'a RawValue>>,
    key_names: Option<Value>,
    table_version: Option<Value>,
    bookmark_names: Option<Value>,
}

#[derive(Deserialize)]
struct BatchMessage<'a> {
    action: Option<Value>,
    sequence: Option<Value>,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    time_extracted: Option<Value>,
}

/// Validates a batch body; every record is checked against the batch's JSON Schema.
pub fn parse_batch(body: &str, limits: Limits) -> Result<Parts, Refusal> {
    if !body.trim_start().starts_with('{') {
        parse_json::<&RawValue>(body, "a JSON object")?;
        return Err(Refusal::BadRequest(
            "request body must be a JSON object (one table's batch)".into(),
            vec![],
        ));
    }
    let batch: BatchBody<'_> = parse_json(body, "a JSON object")?;
    let bad = |why: String| Refusal::BadRequest(why, vec![]);
    let table = match &batch.table_name {
        Some(Value::String(name)) => {
            normalize_stitch_table_name(name).map_err(|why| bad(format!("table_name: {why}")))?
        }
        None => return Err(bad("table_name is missing".into())),
        Some(_) => return Err(bad("table_name must be a string".into())),
    };
    let schema = match &batch.schema {
        Some(schema @ Value::Object(fields))
            if fields.get("properties").is_some_and(Value::is_object) =>
        {
            schema
        }
        None => {
            return Err(bad(
                "schema is missing (a JSON Schema with \"properties\")".into()
            ));
        }
        Some(_) => {
            return Err(bad(
                "schema must be a JSON Schema object with a \"properties\" object".into(),
            ));
        }
    };
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .map_err(|e| bad(format!("schema is not a usable JSON Schema: {e}")))?;
    // No key names: an append-only table (every record becomes a row of its own).
    let key_names: Vec<Value> = match &batch.key_names {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(names)) => names.clone(),
        Some(_) => return Err(bad("key_names must be an array of field names".into())),
    };
    if !key_names.is_empty() {
        check_key_names(&key_names, "key_names").map_err(bad)?;
    }
    let table_version = match &batch.table_version {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => Some(
            n.as_i64()
                .ok_or_else(|| bad("table_version must be a 64-bit integer".into()))?,
        ),
        Some(_) => return Err(bad("table_version must be an integer".into())),
    };
    match &batch.bookmark_names {
        None | Some(Value::Null) => {}
        Some(Value::Array(names)) if names.iter().all(Value::is_string) => {}
        Some(_) => return Err(bad("bookmark_names must be an array of field names".into())),
    }
    let raw = batch
        .messages
        .as_ref()
        .ok_or_else(|| bad("messages is missing (an array of messages)".into()))?;
    check_count(raw.len(), limits)?;
    let messages: Vec<BatchMessage<'_>> = objects(raw)?;
    let key_text = Value::Array(key_names.clone()).to_string();
    let mut problems = Problems::default();
    let mut parts = PartsBuilder::default();
    for (index, message) in messages.iter().enumerate() {
        let sequence = match sequence_of(message.sequence.as_ref()) {
            Ok(s) => s,
            Err(why) => {
                problems.add(Problem::at(index, why));
                continue;
            }
        };
        if let Some(t) = &message.time_extracted
            && !(t.is_string() || t.is_null())
        {
            problems.add(Problem::at(
                index,
                "time_extracted must be a date-time string",
            ));
            continue;
        }
        let meta = |activate| RecordMeta {
            client_seq: sequence,
            key_names: key_text.clone(),
            table_version,
            activate,
        };
        match message.action.as_ref().and_then(Value::as_str) {
            Some("upsert") => {}
            Some("activate_version") => {
                if table_version.is_none() {
                    problems.add(Problem::at(
                        index,
                        "activate_version needs the batch's table_version",
                    ));
                } else {
                    parts.add_marker(body, &table, meta(true));
                }
                continue;
            }
            _ => {
                problems.add(Problem::at(
                    index,
                    "action must be \"upsert\" or \"activate_version\"",
                ));
                continue;
            }
        }
        let Some(data) = message.data else {
            problems.add(Problem::at(
                index,
                "data is missing (it must be a JSON object)",
            ));
            continue;
        };
        let checked = if key_names.is_empty() {
            check_object(data)
        } else {
            check_data(data, &key_names, "key_names")
        };
        if let Err(why) = checked {
            problems.add(Problem::at(index, why));
            continue;
        }
        let value: Value = match serde_json::from_str(data.get()) {
            Ok(v) => v,
            Err(e) => {
                problems.add(Problem::at(index, format!("data is not valid JSON: {e}")));
                continue;
            }
        };
        let mut failed = false;
        for error in validator.iter_errors(&value) {
            failed = true;
            problems.add(Problem {
                index: Some(index),
                message: format!("record does not conform to the schema: {error}"),
                schema_path: Some(error.schema_path().to_string()),
                instance_path: Some(error.instance_path().to_string()),
            });
        }
        if !failed {
            parts.add(body, &table, data.get(), meta(false));
        }
    }
    problems.into_result(Refusal::BadRequest, messages.len())?;
    let mut parts = parts.finish();
    if let Some(part) = parts.tables.first_mut() {
        part.schema = Some(schema.to_string());
    }
    Ok(parts)
}

// ---------------------------------------------------------------------------------------
// Shared rules.

/// Parses the body as `T`, refusing malformed JSON, the wrong shape and deep nesting (400).
fn parse_json<'a, T: Deserialize<'a>>(body: &'a str, shape: &str) -> Result<T, Refusal> {
    if body.trim().is_empty() {
        return Err(Refusal::BadRequest("request body is empty".into(), vec![]));
    }
    check_nesting(body.as_bytes(), MAX_DEPTH).map_err(|why| Refusal::BadRequest(why, vec![]))?;
    serde_json::from_str(body).map_err(|e| {
        let what = if e.is_data() {
            format!("request body must be {shape}: {e}")
        } else {
            format!("request body is not valid JSON: {e}")
        };
        Refusal::BadRequest(what, vec![])
    })
}

/// Each element as a `T`, which must be written as a JSON object (serde would also take an
/// array of its fields in order).
fn objects<'a, T: Deserialize<'a>>(items: &[&'a RawValue]) -> Result<Vec<T>, Refusal> {
    let wrong = |index: usize, why: String| {
        Refusal::BadRequest(
            format!("record {index} {why}"),
            vec![Problem::at(index, why)],
        )
    };
    items
        .iter()
        .enumerate()
        .map(|(index, item)| {
            if !item.get().starts_with('{') {
                return Err(wrong(index, "must be a JSON object".into()));
            }
            serde_json::from_str(item.get())
                .map_err(|e| wrong(index, format!("is not usable: {e}")))
        })
        .collect()
}

fn check_count(count: usize, limits: Limits) -> Result<(), Refusal> {
    if count == 0 {
        return Err(Refusal::BadRequest(
            "the request holds no records".into(),
            vec![],
        ));
    }
    if count > limits.max_records {
        return Err(Refusal::BadRequest(
            format!(
                "the request holds {count} records; the limit is {} per request",
                limits.max_records
            ),
            vec![],
        ));
    }
    Ok(())
}

/// A message's `sequence`: a 64-bit integer.
fn sequence_of(value: Option<&Value>) -> Result<i64, String> {
    match value {
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| "sequence must be an integer within the 64-bit signed range".into()),
        None => Err("sequence is missing (an integer)".into()),
        Some(_) => Err("sequence must be an integer".into()),
    }
}

/// A record's `data`: a JSON object of Unicode text.
fn check_object(data: &RawValue) -> Result<(), String> {
    if !data.get().starts_with('{') {
        return Err("data must be a JSON object".into());
    }
    check_unicode_escapes(data.get()).map_err(|why| format!("data {why}"))
}

/// A keyed record's `data`: an object whose key fields are all present and usable.
fn check_data(data: &RawValue, key_names: &[Value], what: &str) -> Result<(), String> {
    check_object(data)?;
    let names = check_key_names(key_names, what)?;
    let fields: HashMap<String, &RawValue> =
        serde_json::from_str(data.get()).map_err(|e| format!("data is not a valid object: {e}"))?;
    check_key_values(&names, |name| fields.get(name).copied())
        .map_err(|why| why.replace("key field", "data's key field"))
}

/// Problems collected over all records, capped at [`MAX_REASONS`].
#[derive(Default)]
struct Problems {
    listed: Vec<Problem>,
    records: std::collections::BTreeSet<usize>,
    more: usize,
}

impl Problems {
    fn add(&mut self, problem: Problem) {
        if let Some(i) = problem.index {
            self.records.insert(i);
        }
        if self.listed.len() < MAX_REASONS {
            self.listed.push(problem);
        } else {
            self.more += 1;
        }
    }

    fn into_result(
        self,
        refusal: fn(String, Vec<Problem>) -> Refusal,
        total: usize,
    ) -> Result<(), Refusal> {
        if self.listed.is_empty() {
            return Ok(());
        }
        let bad = self.records.len();
        let first = self.listed[0].clone();
        let counted = match (bad, total) {
            (1, 1) => "the record is invalid".to_owned(),
            (1, _) => format!("1 of {total} records is invalid"),
            _ => format!("{bad} of {total} records are invalid"),
        };
        let mut message = format!(
            "{counted}; nothing was stored. Record {}: {}",
            first.index.unwrap_or(0),
            first.message
        );
        if let Some(path) = &first.schema_path {
            message.push_str(&format!(" (schema path {path})"));
        }
        if self.more > 0 {
            message.push_str(&format!("; {} further problems are not listed", self.more));
        }
        Err(refusal(message, self.listed))
    }
}

/// Collects records into per-table parts, tables in order of first appearance.
#[derive(Default)]
struct PartsBuilder {
    parts: Parts,
    by_table: HashMap<String, usize>,
}

impl PartsBuilder {
    fn part(&mut self, table: &str) -> &mut TablePart {
        let next = self.parts.tables.len();
        let i = *self.by_table.entry(table.to_owned()).or_insert(next);
        if i == next {
            self.parts.tables.push(TablePart {
                table: table.to_owned(),
                ..TablePart::default()
            });
        }
        &mut self.parts.tables[i]
    }

    fn add(&mut self, body: &str, table: &str, record: &str, meta: RecordMeta) {
        let start = record.as_ptr() as usize - body.as_ptr() as usize;
        let part = self.part(table);
        part.ranges.push((start, start + record.len()));
        part.meta.push(meta);
    }

    /// An activate_version marker: its text is [`MARKER_TEXT`], appended after the body.
    fn add_marker(&mut self, body: &str, table: &str, meta: RecordMeta) {
        let range = (body.len(), body.len() + MARKER_TEXT.len());
        self.parts.marker_range = Some(range);
        let part = self.part(table);
        part.ranges.push(range);
        part.meta.push(meta);
    }

    fn finish(self) -> Parts {
        self.parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_records: 100 };

    fn push_record(extra: &str) -> String {
        format!(
            r#"{{"client_id": 7, "table_name": "users", "sequence": 1, "action": "upsert", "key_names": ["id"], "data": {{"id": 1, "name": "Ann"}}{extra}}}"#
        )
    }

    #[test]
    fn a_valid_push_keeps_each_data_object_exactly_and_groups_tables() {
        let body = format!(
            r#"[{}, {{"client_id": 7, "table_name": "Orders", "sequence": 5, "action": "upsert", "key_names": ["n"], "data": {{"n": "x"}}}}]"#,
            push_record("")
        );
        let parts = parse_push(&body, 7, LIMITS).expect("valid");
        assert_eq!(parts.tables.len(), 2);
        let users = &parts.tables[0];
        let (a, b) = users.ranges[0];
        assert_eq!(&body[a..b], r#"{"id": 1, "name": "Ann"}"#);
        assert_eq!(users.meta[0].client_seq, 1);
        assert_eq!(users.meta[0].key_names, r#"["id"]"#);
        assert_eq!(parts.tables[1].table, "orders");
        assert_eq!(parts.tables[1].meta[0].client_seq, 5);
    }

    #[test]
    fn a_record_for_another_client_is_forbidden() {
        let body = format!(
            "[{}]",
            push_record("").replace("\"client_id\": 7", "\"client_id\": 8")
        );
        assert!(matches!(
            parse_push(&body, 7, LIMITS),
            Err(Refusal::Forbidden(_))
        ));
    }

    #[test]
    fn unusable_push_records_are_422_with_their_index() {
        let cases = [
            (
                push_record("").replace(r#""key_names": ["id"], "#, ""),
                "key_names is missing",
            ),
            (
                push_record("").replace(r#""id": 1"#, r#""id": null"#),
                "is null",
            ),
            (
                push_record("").replace(r#"{"id": 1, "name": "Ann"}"#, "[1]"),
                "data must be a JSON object",
            ),
            (
                push_record("").replace(r#""id": 1"#, &format!(r#""id": "{}""#, "k".repeat(1025))),
                "limited to 1024 bytes",
            ),
            (
                push_record("").replace(r#""sequence": 1"#, r#""sequence": "1""#),
                "sequence",
            ),
            (push_record("").replace("upsert", "delete"), "action"),
            (push_record("").replace("users", "tablé"), "table name"),
        ];
        for (record, expected) in cases {
            let body = format!("[{}, {record}]", push_record(""));
            match parse_push(&body, 7, LIMITS) {
                Err(Refusal::Unprocessable(message, problems)) => {
                    assert_eq!(problems[0].index, Some(1), "{record}");
                    assert!(message.contains(expected), "{message} lacks {expected}");
                }
                other => panic!("{record}: expected 422, got {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_or_misshapen_push_bodies_are_400() {
        let positional = r#"[[7, "users", 1, "upsert", ["id"], {"id": 1}]]"#;
        for body in [
            "",
            "{",
            "{}",
            "[]",
            "[1]",
            "\"x\"",
            &"[".repeat(500),
            positional,
        ] {
            assert!(
                matches!(parse_push(body, 7, LIMITS), Err(Refusal::BadRequest(..))),
                "{body:?}"
            );
        }
        let many = format!("[{}]", vec![push_record(""); 101].join(","));
        assert!(matches!(
            parse_push(&many, 7, LIMITS),
            Err(Refusal::BadRequest(..))
        ));
    }

    fn batch(messages: &str, extra: &str) -> String {
        format!(
            r#"{{"table_name": "events", "key_names": ["id"], "schema": {{"properties": {{"id": {{"type": "integer"}}, "at": {{"type": ["null", "string"], "format": "date-time"}}}}}}, "messages": [{messages}]{extra}}}"#
        )
    }

    #[test]
    fn a_valid_batch_keeps_its_schema_version_and_markers() {
        let body = batch(
            r#"{"action": "upsert", "sequence": 10, "data": {"id": 1, "at": "2026-11-26T10:00:00Z"}, "time_extracted": "2026-11-26T10:00:01Z"},
               {"action": "activate_version", "sequence": 11}"#,
            r#", "table_version": 3, "bookmark_names": ["at"]"#,
        );
        let parts = parse_batch(&body, LIMITS).expect("valid");
        let part = &parts.tables[0];
        assert_eq!(part.table, "events");
        assert!(
            part.schema
                .as_deref()
                .is_some_and(|s| s.contains("date-time"))
        );
        assert_eq!(part.meta[0].table_version, Some(3));
        assert!(!part.meta[0].activate);
        assert!(part.meta[1].activate);
        assert_eq!(part.ranges[1], (body.len(), body.len() + 2));
        assert_eq!(parts.marker_range, Some(part.ranges[1]));
    }

    #[test]
    fn records_that_fail_the_schema_are_400_with_index_and_schema_path() {
        let body = batch(
            r#"{"action": "upsert", "sequence": 1, "data": {"id": 1}},
               {"action": "upsert", "sequence": 2, "data": {"id": 2, "at": "yesterday"}}"#,
            "",
        );
        match parse_batch(&body, LIMITS) {
            Err(Refusal::BadRequest(message, problems)) => {
                assert_eq!(problems[0].index, Some(1));
                assert!(
                    problems[0]
                        .schema_path
                        .as_deref()
                        .is_some_and(|p| p.contains("format"))
                );
                assert_eq!(problems[0].instance_path.as_deref(), Some("/at"));
                assert!(message.contains("Record 1"), "{message}");
            }
            other => panic!("expected 400, got {other:?}"),
        }
    }

    #[test]
    fn a_batch_without_key_names_is_an_append_only_table() {
        let body = batch(
            r#"{"action": "upsert", "sequence": 1, "data": {"x": 1}}"#,
            "",
        );
        for without in [
            body.replace(r#""key_names": ["id"], "#, ""),
            body.replace(r#""key_names": ["id"]"#, r#""key_names": []"#),
        ] {
            let parts = parse_batch(&without, LIMITS).expect("valid");
            assert_eq!(parts.tables[0].meta[0].key_names, "[]");
        }
        // With key names, the key must be there.
        assert!(matches!(
            parse_batch(&body, LIMITS),
            Err(Refusal::BadRequest(..))
        ));
    }

    #[test]
    fn batch_shape_errors_are_400() {
        let cases = [
            batch(r#"{"action": "activate_version", "sequence": 1}"#, ""),
            batch(r#"{"action": "upsert", "sequence": 1, "data": {"x": 1}}"#, ""),
            batch(r#"{"action": "upsert", "data": {"id": 1}}"#, ""),
            batch("", ""),
            r#"{"table_name": "t", "key_names": ["id"], "messages": []}"#.to_owned(),
            batch(r#"["upsert", 1, {"id": 1}]"#, ""),
            r#"{"table_name": "t", "key_names": ["id"], "schema": {"properties": {"id": {"type": "bogus"}}}, "messages": [{"action": "upsert", "sequence": 1, "data": {"id": 1}}]}"#.to_owned(),
        ];
        for body in cases {
            assert!(
                matches!(parse_batch(&body, LIMITS), Err(Refusal::BadRequest(..))),
                "{body}"
            );
        }
    }
}
