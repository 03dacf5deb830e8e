//! The loader writes to PostgreSQL in binary: every column of an upsert as one array
//! parameter (`intake_loader::pg_array`), the rows of a plain insert as binary COPY data
//! (`intake_loader::pg_copy`). PostgreSQL must read our arrays exactly as it reads diesel's
//! own encoding of the same values, and our COPY data exactly as the same rows inserted from
//! our arrays: these send both to a real server and compare what it makes of them, for every
//! type, with NULLs, empty and extreme values.

mod support;

use chrono::{DateTime, TimeZone, Utc};
use diesel::connection::SimpleConnection;
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

#[derive(QueryableByName)]
struct Dump {
    #[diesel(sql_type = Nullable<Text>)]
    rows: Option<String>,
}

/// A table's rows as PostgreSQL prints them, in key order.
fn dump(conn: &mut PgConnection, table: &str) -> String {
    diesel::sql_query(format!(
        "SELECT string_agg(r::text, E'\\n' ORDER BY id) AS rows FROM {table} AS r"
    ))
    .get_result::<Dump>(conn)
    .expect("reads the table")
    .rows
    .unwrap_or_default()
}

/// Plain inserts go by binary COPY (`intake_loader::pg_copy`) where the columns kept their
/// types, other writes by `INSERT ... SELECT unnest(...)`. The same rows written both ways must
/// read back the same: every column type, NULLs, values of the wrong type for their column
/// (NULL), extremes, a column shared by all rows, and more rows than one piece of COPY data.
/// A column whose type changed (here by hand, to `numeric`) must be noticed, as COPY would
/// misread the values sent for it.
#[test]
fn copy_writes_rows_as_the_array_insert_does() {
    use intake_loader::bulk::{Shared, Val, insert_rows};
    use intake_loader::pg_copy::{copy_rows, types_unchanged};
    use intake_loader::sql::{Conn, in_transaction};
    use intake_loader::value_types::ColType;

    let db = TestDb::new(Backend::Postgres);
    let mut pg = PgConnection::establish(&db.url).expect("connects");
    pg.batch_execute(
        "SET TimeZone = 'UTC'; CREATE TABLE by_copy (id bigint PRIMARY KEY, f double precision, b boolean, t text, \
           ts timestamptz, j jsonb, loaded timestamptz); \
         CREATE TABLE by_insert (LIKE by_copy INCLUDING ALL)",
    )
    .expect("creates the tables");
    let columns: Vec<(String, ColType)> = [
        ("id", ColType::BigInt),
        ("f", ColType::Double),
        ("b", ColType::Boolean),
        ("t", ColType::Text),
        ("ts", ColType::Timestamp),
        ("j", ColType::Json),
    ]
    .iter()
    .map(|(n, t)| (n.to_string(), *t))
    .collect();
    let floats = [
        Val::Float(1.5),
        Val::Float(-0.0),
        Val::Float(f64::NAN),
        Val::Float(f64::INFINITY),
        Val::Null,
        Val::Float(1e308),
        Val::Text("1.5".into()),
    ];
    let texts = [
        Val::Text(String::new()),
        Val::Null,
        Val::Text("Zoë, \"quoted\", {braces}, back\\slash\ttab\nline".into()),
        Val::Text("😀".repeat(1000)),
        Val::Int(7),
    ];
    let times = [
        Val::Time(DateTime::from_timestamp_micros(946_684_799_999_999).expect("before 2000")),
        Val::Time(DateTime::from_timestamp_micros(-1).expect("before 1970")),
        Val::Null,
        Val::Time(
            Utc.with_ymd_and_hms(9999, 12, 31, 23, 59, 59)
                .single()
                .expect("a time"),
        ),
    ];
    let jsons = [
        Val::Json(r#"{"a": [1, 2.50, "é"], "b": null}"#.into()),
        Val::Json("null".into()),
        Val::Null,
        Val::Json(r#""just text""#.into()),
    ];
    let rows = 3000i64;
    let pick = |list: &[Val], i: i64| list[i as usize % list.len()].clone();
    let data: Vec<Vec<Val>> = vec![
        (0..rows).map(|i| Val::Int(i - 1500)).collect(),
        (0..rows).map(|i| pick(&floats, i)).collect(),
        (0..rows)
            .map(|i| pick(&[Val::Bool(true), Val::Null, Val::Bool(false)], i))
            .collect(),
        (0..rows).map(|i| pick(&texts, i)).collect(),
        (0..rows).map(|i| pick(&times, i)).collect(),
        (0..rows).map(|i| pick(&jsons, i)).collect(),
    ];
    let loaded = Utc
        .with_ymd_and_hms(2026, 11, 27, 1, 2, 3)
        .single()
        .expect("a time");
    let shared = [Shared {
        name: "loaded",
        col_type: ColType::Timestamp,
        value: Val::Time(loaded),
    }];
    let mut conn = Conn::Pg(&mut pg);
    // In a transaction, as the loader writes: the check locks the table until its end.
    let unchanged = in_transaction(&mut conn, |c| {
        let unchanged = types_unchanged(c, "by_copy", &columns, &shared)?;
        copy_rows(c, "by_copy", &columns, &shared, &data)?;
        Ok(unchanged)
    })
    .expect("copies the rows");
    assert!(unchanged, "the table has the types it was made with");
    insert_rows(
        &mut conn,
        "by_insert",
        &columns,
        &shared,
        data.clone(),
        "",
        false,
    )
    .expect("inserts the rows");
    let (copied, inserted) = (dump(&mut pg, "by_copy"), dump(&mut pg, "by_insert"));
    assert_eq!(copied.matches("\n(").count() + 1, rows as usize);
    assert_eq!(copied, inserted);
    // The comparison has substance: the values arrived, and the wrong-typed ones are NULL.
    let first = copied.lines().next().expect("a row");
    assert_eq!(
        first,
        r#"(-1500,1.5,t,"","1999-12-31 23:59:59.999999+00","{""a"": [1, 2.50, ""é""], ""b"": null}","2026-11-27 01:02:03+00")"#
    );
    // Rows as printed start with "(" (the first) or "\n(" (texts may hold line breaks).
    let seventh = copied.split("\n(").nth(6).expect("a row");
    assert!(seventh.starts_with("-1494,,t,,"), "{seventh}");

    // A COPY that fails reports the database's error, and leaves the connection usable.
    let again = copy_rows(&mut Conn::Pg(&mut pg), "by_copy", &columns, &shared, &data);
    assert!(
        matches!(
            again,
            Err(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _
            ))
        ),
        "{again:?}"
    );
    assert_eq!(dump(&mut pg, "by_copy"), copied);

    pg.batch_execute("ALTER TABLE by_insert ALTER COLUMN f TYPE numeric")
        .expect("retypes a column");
    let unknown = [("absent".to_owned(), ColType::Text)];
    let (retyped, absent) = in_transaction(&mut Conn::Pg(&mut pg), |c| {
        Ok((
            types_unchanged(c, "by_insert", &columns, &shared)?,
            types_unchanged(c, "by_copy", &unknown, &[])?,
        ))
    })
    .expect("checks the types");
    assert!(!retyped, "a column retyped by hand");
    assert!(!absent, "a column that is not there");
}
