//! The loader writes every column to PostgreSQL as one array parameter in the binary format
//! (`intake_loader::pg_array`). PostgreSQL must read each array exactly as it reads diesel's
//! own encoding of the same values: this sends both to a real server and compares what it
//! makes of them, for every element type, with NULLs, empty and extreme values.

mod support;

use chrono::{DateTime, TimeZone, Utc};
use diesel::pg::PgConnection;
use diesel::prelude::*;
use diesel::sql_types::{Array, BigInt, Bool, Double, Nullable, Text, Timestamptz};
use intake_loader::pg_array::PgArray;
use support::{Backend, TestDb};

#[derive(QueryableByName)]
struct Shown {
    #[diesel(sql_type = Text)]
    ours: String,
    #[diesel(sql_type = Text)]
    theirs: String,
}

/// What PostgreSQL makes of an array of `$values` (of SQL type `$st`, cast to `$cast[]`), as
/// its text output: once from our encoding and once from diesel's.
macro_rules! read_back {
    ($conn:expr, $st:ty, $cast:literal, $values:expr) => {{
        let values = $values;
        let shown: Shown = diesel::sql_query(concat!(
            "SELECT ($1::",
            $cast,
            "[])::text AS ours, ($2::",
            $cast,
            "[])::text AS theirs"
        ))
        .bind::<Array<Nullable<$st>>, _>(PgArray(values.clone()))
        .bind::<Array<Nullable<$st>>, _>(values)
        .get_result($conn)
        .expect("PostgreSQL reads both arrays");
        (shown.ours, shown.theirs)
    }};
}

#[test]
fn postgres_reads_our_arrays_as_it_reads_diesels() {
    let db = TestDb::new(Backend::Postgres);
    let mut conn = PgConnection::establish(&db.url).expect("connects");
    let moments: Vec<Option<DateTime<Utc>>> = vec![
        Some(
            Utc.with_ymd_and_hms(2026, 11, 26, 16, 2, 3)
                .single()
                .expect("a time"),
        ),
        Some(DateTime::from_timestamp_micros(946_684_799_999_999).expect("just before 2000")),
        Some(DateTime::from_timestamp_micros(-1).expect("just before 1970")),
        None,
        Some(
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
                .single()
                .expect("a time"),
        ),
    ];
    let cases = [
        read_back!(
            &mut conn,
            BigInt,
            "int8",
            vec![Some(0i64), Some(-1), Some(i64::MAX), None, Some(i64::MIN)]
        ),
        read_back!(
            &mut conn,
            Double,
            "float8",
            vec![
                Some(1.5f64),
                Some(-0.0),
                Some(f64::NAN),
                Some(f64::INFINITY),
                None,
                Some(f64::MIN_POSITIVE),
                Some(1e308),
            ]
        ),
        read_back!(&mut conn, Bool, "bool", vec![Some(true), None, Some(false)]),
        read_back!(
            &mut conn,
            Text,
            "text",
            vec![
                Some(String::new()),
                None,
                Some("Zoë, \"quoted\", {braces}, back\\slash".into()),
                Some("😀".repeat(1000)),
            ]
        ),
        read_back!(&mut conn, Timestamptz, "timestamptz", moments),
        read_back!(&mut conn, Text, "text", Vec::<Option<String>>::new()),
        read_back!(&mut conn, BigInt, "int8", vec![None::<i64>, None]),
    ];
    for (ours, theirs) in cases {
        assert_eq!(ours, theirs);
    }
    // The comparison has substance: PostgreSQL saw the values, not two empty arrays.
    let (ours, _) = read_back!(&mut conn, BigInt, "int8", vec![Some(7i64), None]);
    assert_eq!(ours, "{7,NULL}");
}
