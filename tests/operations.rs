//! What an operator relies on: keys never reach the logs while every request does, a dead
//! database gives fast 503s instead of hangs, concurrent pushes to one table get distinct,
//! consecutive sequence numbers, the loader's memory settings yield to the environment, and a
//! PostgreSQL on the same machine is reached without TLS unless asked for. Each test runs on
//! SQLite and on PostgreSQL, except the last, which is about PostgreSQL alone.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use diesel::QueryableByName;
use diesel::sql_types::{Bool, Text};
use serde_json::Value;
use support::{
    Backend, DbConnection, LoaderProcess, Reply, Server, TestDb, both_backends, issue_key, poll,
    secret_of, staged_rows, unknown_key,
};

both_backends!(
    api_keys_never_reach_the_logs_but_every_request_does,
    an_unreachable_database_answers_503_quickly,
    one_key_used_concurrently_gets_fast_503s_while_the_database_is_down,
    concurrent_pushes_get_distinct_consecutive_seqs,
    the_loader_opts_out_of_huge_pages_unless_its_environment_says_otherwise,
);

const CLIENT: i64 = 11;

/// The `name=value` fields of an access log line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|word| word.split_once('='))
        .collect()
}

fn api_keys_never_reach_the_logs_but_every_request_does(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "logging");
    let secret = secret_of(&key).to_owned();
    let wrong_key = format!("{}{}", &key[..key.len() - 4], "WXYZ");
    let wrong_secret = secret_of(&wrong_key).to_owned();
    let bearer = format!("Bearer {key}");
    let one = r#"{"id":1,"keys":["id"]}"#;
    let three = r#"[{"id":1,"keys":["id"]},{"id":2,"keys":["id"]},{"id":3,"keys":["id"]}]"#;
    let json = ("Content-Type", "application/json");
    let data = format!("/v2/client/{CLIENT}/table/logged/data");
    let auth = format!("/v2/client/{CLIENT}/authenticate");

    // (request, expected status, expected records, text the logged path must contain)
    let exchanges: Vec<(Reply, u16, u64, String)> = vec![
        (
            server.get(&format!("{auth}?apikey={key}")),
            200,
            0,
            format!("path={auth}?apikey=[redacted]"),
        ),
        (
            server.request(
                "POST",
                &format!("{data}?apikey={key}"),
                &[json],
                Some(three.as_bytes()),
            ),
            201,
            3,
            format!("path={data}?apikey=[redacted]"),
        ),
        (
            server.get_with(&auth, &[("Authorization", &bearer)]),
            200,
            0,
            format!("path={auth} "),
        ),
        (
            server.request(
                "POST",
                &data,
                &[json, ("X-Api-Key", &key)],
                Some(three.as_bytes()),
            ),
            201,
            3,
            format!("path={data} "),
        ),
        (
            server.request(
                "POST",
                &format!("{data}?b=1&APIKEY={key}"),
                &[json],
                Some(one.as_bytes()),
            ),
            201,
            1,
            format!("path={data}?b=1&APIKEY=[redacted]"),
        ),
        (
            server.get(&format!("{auth}?apikey={wrong_key}")),
            401,
            0,
            format!("path={auth}?apikey=[redacted]"),
        ),
        (
            server.request(
                "POST",
                &format!("{data}?apikey={key}"),
                &[json],
                Some(b"[{\"id\":1}]"),
            ),
            400,
            0,
            format!("path={data}?apikey=[redacted]"),
        ),
        // A key pasted where it does not belong is redacted too.
        (
            server.get(&format!("/v2/client/{key}/authenticate?token={key}")),
            401,
            0,
            "path=/v2/client/[redacted]/authenticate?token=[redacted]".to_owned(),
        ),
    ];

    let mut request_ids = HashSet::new();
    for (reply, status, records, logged_path) in &exchanges {
        reply.assert_status(*status);
        let request_id = reply
            .header("x-request-id")
            .unwrap_or_else(|| panic!("no X-Request-Id on a {status} answer"))
            .to_owned();
        assert!(!request_id.is_empty());
        assert!(
            request_ids.insert(request_id.clone()),
            "request ids are unique"
        );
        let line = server.wait_for_log(&format!("for request {request_id}"), |l| {
            fields(l).get("request_id") == Some(&request_id.as_str())
        });
        let f = fields(&line);
        assert_eq!(
            f.get("status"),
            Some(&status.to_string().as_str()),
            "{line}"
        );
        assert_eq!(
            f.get("records"),
            Some(&records.to_string().as_str()),
            "{line}"
        );
        let latency: f64 = f
            .get("latency_ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no numeric latency_ms in {line}"));
        assert!(latency >= 0.0, "{line}");
        assert!(
            line.contains(logged_path.as_str()),
            "{logged_path} in {line}"
        );
    }

    server.assert_logs_lack(&[&secret, &wrong_secret, &key]);
    assert_eq!(staged_rows(&db).len(), 7);
}

fn an_unreachable_database_answers_503_quickly(backend: Backend) {
    let db = TestDb::unreachable(backend);
    let server = Server::start_unreachable(&db);
    let quick = Duration::from_secs(5);
    let timed = |what: &str, request: &dyn Fn() -> Reply| {
        let started = Instant::now();
        let reply = request();
        assert!(
            started.elapsed() < quick,
            "{what} took {:?}: the database being down must not make requests hang",
            started.elapsed()
        );
        reply
    };

    // The process is alive...
    server.get("/").assert_status(200);
    server.get("/health").assert_status(200);
    // ...but not ready.
    let ready = timed("GET /ready", &|| server.get("/ready"));
    ready.assert_error(503);
    assert_eq!(ready.header("retry-after"), Some("3"));

    // A well-formed key cannot be checked without the database: that is the database's
    // fault, not the client's, so 503 (retry later) rather than 401 (your key is bad).
    let key = unknown_key();
    let record = r#"{"id":1,"keys":["id"]}"#;
    for (what, reply) in [
        (
            "push",
            timed("push", &|| server.push(CLIENT, "t", &key, record)),
        ),
        (
            "sandbox push",
            timed("sandbox push", &|| {
                server.push_sandbox(CLIENT, "t", &key, record)
            }),
        ),
        (
            "authenticate",
            timed("authenticate", &|| server.authenticate(CLIENT, &key)),
        ),
    ] {
        let (message, _) = reply.assert_error(503);
        assert!(message.contains("retry"), "{what}: {message}");
        assert_eq!(reply.header("retry-after"), Some("3"), "{what}");
    }

    // What needs no database is still answered as usual.
    server
        .request(
            "POST",
            &format!("/v2/client/{CLIENT}/table/t/data"),
            &[("Content-Type", "application/json")],
            Some(record.as_bytes()),
        )
        .assert_error(401);
    server.authenticate(CLIENT, "not-a-key").assert_error(401);
    server.get("/nope").assert_error(404);
}

/// An uploader with many parallel workers shares one key. While the database is down, each of
/// its requests must still be answered 503 within about one checkout timeout, not queued
/// behind the others' failed key lookups.
fn one_key_used_concurrently_gets_fast_503s_while_the_database_is_down(backend: Backend) {
    const PARALLEL: usize = 12;
    let db = TestDb::unreachable(backend);
    let server = Server::start(
        &db,
        &[
            ("INTAKE__DATABASE__MIGRATE_ON_START", "false"),
            ("INTAKE__DATABASE__CHECKOUT_TIMEOUT_MS", "500"),
        ],
    );
    // Four checkout timeouts: ample for one failed lookup plus waiting for a free connection.
    let quick = Duration::from_millis(2000);
    let key = unknown_key();
    let record = r#"{"id":1,"keys":["id"]}"#;
    let slow: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..PARALLEL)
            .map(|n| {
                let (server, key) = (&server, &key);
                scope.spawn(move || {
                    let started = Instant::now();
                    let reply = server.push(CLIENT, "t", key, record);
                    let took = started.elapsed();
                    reply.assert_error(503);
                    (took >= quick).then(|| format!("request {n}: 503 after {took:?}"))
                })
            })
            .collect();
        workers
            .into_iter()
            .filter_map(|w| w.join().expect("a worker thread"))
            .collect()
    });
    assert!(
        slow.is_empty(),
        "{} of {PARALLEL} concurrent requests with one key waited {quick:?} or more for \
         their 503: {slow:#?}",
        slow.len()
    );
}

fn concurrent_pushes_get_distinct_consecutive_seqs(backend: Backend) {
    const THREADS: u64 = 8;
    const REQUESTS: u64 = 20;
    const RECORDS: u64 = 10;
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[]);
    let (_, key) = issue_key(&db, CLIENT, "busy");

    std::thread::scope(|scope| {
        for t in 0..THREADS {
            let (server, key) = (&server, &key);
            scope.spawn(move || {
                for r in 0..REQUESTS {
                    let records: Vec<String> = (0..RECORDS)
                        .map(|i| format!(r#"{{"t":{t},"r":{r},"i":{i},"keys":["t","r","i"]}}"#))
                        .collect();
                    let body = format!("[{}]", records.join(","));
                    let reply = server.push(CLIENT, "busy", key, &body);
                    assert_eq!(reply.assert_created(), RECORDS, "thread {t} request {r}");
                }
            });
        }
    });

    let rows = staged_rows(&db);
    let total = (THREADS * REQUESTS * RECORDS) as usize;
    assert_eq!(rows.len(), total);
    let seqs: HashSet<i64> = rows.iter().map(|(_, _, seq, _)| *seq).collect();
    assert_eq!(seqs.len(), total, "every record has its own seq");

    // (thread, request) -> [(index in the request, seq)]
    let mut requests: BTreeMap<(u64, u64), Vec<(u64, i64)>> = BTreeMap::new();
    for (client, table, seq, record) in &rows {
        assert_eq!((*client, table.as_str()), (CLIENT, "busy"));
        let value: Value = serde_json::from_str(record).expect("a staged record is JSON");
        let field = |name: &str| value[name].as_u64().expect("pushed numbers");
        requests
            .entry((field("t"), field("r")))
            .or_default()
            .push((field("i"), *seq));
    }
    assert_eq!(requests.len(), (THREADS * REQUESTS) as usize);
    for ((t, r), mut members) in requests.clone() {
        members.sort_by_key(|(_, seq)| *seq);
        let order: Vec<u64> = members.iter().map(|(i, _)| *i).collect();
        assert_eq!(
            order,
            (0..RECORDS).collect::<Vec<_>>(),
            "thread {t} request {r}: seq order is array order"
        );
        let first = members[0].1;
        for (k, (_, seq)) in members.iter().enumerate() {
            assert_eq!(
                *seq,
                first + k as i64,
                "thread {t} request {r}: seqs are consecutive: {members:?}"
            );
        }
    }
    // A request sent after another was acknowledged gets higher seqs ("later wins").
    for t in 0..THREADS {
        for r in 1..REQUESTS {
            let max_before = requests[&(t, r - 1)].iter().map(|m| m.1).max();
            let min_after = requests[&(t, r)].iter().map(|m| m.1).min();
            assert!(
                max_before < min_after,
                "thread {t}: request {r} must come after request {}",
                r - 1
            );
        }
    }
}

/// `intake-loader` opts out of transparent huge pages, which the kernel zeroes 2 MiB at a time
/// when first touched (docs/configuration.md), unless its environment sets mimalloc's own
/// `MIMALLOC_ALLOW_THP`: then the process keeps what it was started with.
fn the_loader_opts_out_of_huge_pages_unless_its_environment_says_otherwise(backend: Backend) {
    let db = TestDb::new(backend);
    let _server = Server::start(&db, &[]);
    let thp_enabled_of = |name: &str, env: &[(&str, &str)]| {
        let watcher = LoaderProcess::spawn_with_env(&db, name, &["watch"], env);
        poll(
            "the loader to start watching",
            Duration::from_secs(10),
            || {
                let log = watcher.stderr();
                if log.contains("watching") {
                    Ok(())
                } else {
                    Err(log)
                }
            },
        );
        let flag = thp_enabled(watcher.id());
        watcher.terminate();
        flag
    };
    assert_eq!(thp_enabled_of("default", &[]), 0);
    let inherited = thp_enabled(std::process::id());
    assert_eq!(
        thp_enabled_of("told", &[("MIMALLOC_ALLOW_THP", "1")]),
        inherited
    );
}

/// The `THP_enabled` field of a process's `/proc/<pid>/status` (Linux 5.0 and later).
fn thp_enabled(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("reading /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix("THP_enabled:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no THP_enabled in /proc/{pid}/status:\n{status}"))
}

#[derive(QueryableByName)]
struct SessionTls {
    #[diesel(sql_type = Bool)]
    ssl: bool,
}

#[derive(QueryableByName)]
struct SettingText {
    #[diesel(sql_type = Text)]
    value: String,
}

/// Whether each session a server holds on the test database is encrypted.
fn server_sessions_tls(db: &TestDb) -> Vec<bool> {
    DbConnection::open(db)
        .load::<SessionTls>(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() \
             AND a.backend_type = 'client backend'",
        )
        .into_iter()
        .map(|s| s.ssl)
        .collect()
}

/// Starts a server with `url` as its database and waits until it holds sessions there.
fn sessions_of_a_server_at(db: &TestDb, url: &str) -> Vec<bool> {
    let server = Server::start(db, &[("DATABASE_URL", url)]);
    assert_eq!(
        server.get("/ready").status,
        200,
        "the server reaches PostgreSQL"
    );
    let sessions = poll("the server's sessions", Duration::from_secs(10), || {
        let sessions = server_sessions_tls(db);
        if sessions.is_empty() {
            Err("none yet".into())
        } else {
            Ok(sessions)
        }
    });
    drop(server);
    poll(
        "the server's sessions to end",
        Duration::from_secs(10),
        || match server_sessions_tls(db).len() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        },
    );
    sessions
}

/// A PostgreSQL on the same machine is reached without TLS, which would encrypt traffic that
/// never leaves it (docs/configuration.md, "Database URLs"), and with TLS when the URL asks.
#[test]
fn a_postgresql_on_this_machine_is_reached_without_tls_unless_the_url_asks() {
    assert!(
        std::env::var_os("PGSSLMODE").is_none(),
        "PGSSLMODE is set: it chooses TLS for every connection, and this test checks the default"
    );
    let db = TestDb::new(Backend::Postgres);
    let tls_offered = DbConnection::open(&db)
        .load::<SettingText>("SELECT current_setting('ssl') AS value")
        .into_iter()
        .any(|s| s.value == "on");
    let plain = sessions_of_a_server_at(&db, &db.url);
    assert!(plain.iter().all(|ssl| !ssl), "{plain:?}");
    if tls_offered {
        // The same server, asked for TLS, gets it (and so would get it by `prefer` too).
        let separator = if db.url.contains('?') { '&' } else { '?' };
        let required =
            sessions_of_a_server_at(&db, &format!("{}{separator}sslmode=require", db.url));
        assert!(required.iter().all(|ssl| *ssl), "{required:?}");
    } else {
        println!("PostgreSQL offers no TLS here: only the plain default was checked");
    }
}
