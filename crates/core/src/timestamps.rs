//! How Intake writes times: `timestamptz` on PostgreSQL, RFC 3339 UTC text on SQLite (which
//! sorts in time order and is what SQLite's date functions read).

use chrono::{DateTime, SecondsFormat, Utc};

/// The SQLite text form of a time, e.g. `2026-11-26T06:36:52.123456Z`.
pub fn sqlite_text(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Reads a time written by [`sqlite_text`] (or any RFC 3339 time).
pub fn parse_sqlite_text(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Now, truncated to the microsecond precision that both backends store.
pub fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips_and_sorts() {
        let a = now();
        let b = a + chrono::Duration::microseconds(1);
        assert_eq!(parse_sqlite_text(&sqlite_text(a)), Some(a));
        assert!(sqlite_text(a) < sqlite_text(b));
    }
}
