//! Fault injection against the real binaries and real databases: the server killed with
//! SIGKILL under load, the loader killed mid-chunk, far more clients than database capacity,
//! clients that never finish a request, hostile bodies and names, and a fuzzed request
//! parser. What is promised (docs/api.md, docs/warehouse.md): every `201` is durable, a load
//! takes effect exactly once, overload gets fast answers with `Retry-After`, and no input
//! gets a 5xx or reaches SQL as anything but data.
//!
//! Every test is bounded in time and talks only to 127.0.0.1. Figures are printed so that
//! they show in the test output (`--no-capture` or `--success-output immediate`).

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngAlgorithm, RngSeed, TestRunner};
use serde_json::{Value, json};
use support::faults::{
    CrashingServer, DirectDb, current_url, ident, literal, loader_to_end, raw_connect, raw_read,
    rss_kib, split_records, warehouse_table,
};
use support::{
    Backend, LoaderProcess, Reply, Server, TestDb, both_backends, http_agent, issue_key,
};

both_backends!(
    acknowledged_records_survive_server_crashes_under_load,
    a_loader_killed_mid_chunk_loses_and_duplicates_nothing,
    overload_gets_fast_answers_and_loses_nothing,
    hostile_bodies_get_a_201_or_a_4xx_never_a_5xx,
    hostile_field_and_key_names_load_as_data,
    the_push_parser_survives_random_documents_and_mutations,
);

/// `POST /v2/client/{cid}/table/{table}/data` with the key in a header and raw body bytes.
fn push_bytes(server: &Server, client_id: i64, table: &str, key: &str, body: &[u8]) -> Reply {
    server.request(
        "POST",
        &format!("/v2/client/{client_id}/table/{table}/data"),
        &[("Content-Type", "application/json"), ("X-Api-Key", key)],
        Some(body),
    )
}

// ---------------------------------------------------------------------------------------------
// 1. The server killed with SIGKILL under load.

const CRASH_CLIENT: i64 = 21;
const CRASH_TABLES: [&str; 3] = ["crash_a", "crash_b", "crash_c"];
/// The table of [`CRASH_TABLES`] pushed through the Stitch endpoint (the others use RJMetrics).
const STITCH_TABLE: usize = 2;
const CRASH_CLIENT_THREADS: usize = 6;
const RECORDS_PER_REQUEST: usize = 20;

/// Servers here take thousands of requests; their access log would bury the figures these
/// tests print (errors and start-up lines still show).
const QUIET: (&str, &str) = ("RUST_LOG", "warn,intake_server=info,intake::access=off");

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// `201`: committed before the answer.
    Acked,
    /// The connection broke (the server was killed): stored or not, nobody knows.
    NoAnswer,
    /// Another status: not stored (save for the one PostgreSQL case docs/api.md describes).
    Refused(u16),
}

/// One request a client thread sent: every record in it has the same version `v`.
struct Sent {
    table: usize,
    ids: Vec<i64>,
    v: i64,
    outcome: Outcome,
}

/// A client that pushes requests of new records and updates of its own earlier ones, one
/// request at a time, to whichever server is up, until told to stop. Each thread has ids of
/// its own, so the versions of an id only grow, in the order their requests were answered.
fn push_until_stopped(
    thread: usize,
    url: Arc<RwLock<String>>,
    key: String,
    stop: Arc<AtomicBool>,
    versions: Arc<AtomicI64>,
) -> Vec<Sent> {
    let agent = http_agent();
    let mut known: [Vec<i64>; 3] = Default::default();
    let mut next_id = thread as i64 * 10_000_000;
    let mut sent = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let table = rand::random_range(0..CRASH_TABLES.len());
        let v = versions.fetch_add(1, Ordering::Relaxed);
        let mut ids = Vec::with_capacity(RECORDS_PER_REQUEST);
        while ids.len() < RECORDS_PER_REQUEST {
            let ours = &mut known[table];
            let id = if !ours.is_empty() && rand::random_bool(0.25) {
                ours[rand::random_range(0..ours.len())]
            } else {
                next_id += 1;
                ours.push(next_id);
                next_id
            };
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        // The last table is pushed with the Stitch protocol, its version as the sequence.
        let stitch = table == STITCH_TABLE;
        let records: Vec<String> = ids
            .iter()
            .map(|id| {
                if stitch {
                    format!(
                        r#"{{"client_id":{CRASH_CLIENT},"table_name":"{}","sequence":{v},"action":"upsert","key_names":["id"],"data":{{"id":{id},"v":{v}}}}}"#,
                        CRASH_TABLES[table]
                    )
                } else {
                    format!(r#"{{"id":{id},"v":{v},"keys":["id"]}}"#)
                }
            })
            .collect();
        let body = format!("[{}]", records.join(","));
        let target = if stitch {
            format!("{}/v2/import/push", current_url(&url))
        } else {
            format!(
                "{}/v2/client/{CRASH_CLIENT}/table/{}/data",
                current_url(&url),
                CRASH_TABLES[table]
            )
        };
        let outcome = match agent
            .post(&target)
            .header("Content-Type", "application/json")
            .header("Authorization", &format!("Bearer {key}"))
            .send(body.as_str())
        {
            // The status line is sent only after the commit.
            Ok(response) => {
                let status = response.status().as_u16();
                let _ = response.into_body().read_to_string();
                if status == 201 {
                    Outcome::Acked
                } else {
                    Outcome::Refused(status)
                }
            }
            Err(_) => Outcome::NoAnswer,
        };
        if outcome != Outcome::Acked {
            // The server is probably down: do not spin against a closed port.
            std::thread::sleep(Duration::from_millis(20));
        }
        sent.push(Sent {
            table,
            ids,
            v,
            outcome,
        });
    }
    sent
}

fn acknowledged_records_survive_server_crashes_under_load(backend: Backend) {
    let (kills_wanted, budget) = match backend {
        Backend::Postgres => (25, Duration::from_secs(40)),
        Backend::Sqlite => (15, Duration::from_secs(30)),
    };
    let db = TestDb::new(backend);
    let mut server = CrashingServer::start(&db, &[QUIET]);
    let (_, key) = issue_key(&db, CRASH_CLIENT, "crash");

    let stop = Arc::new(AtomicBool::new(false));
    let versions = Arc::new(AtomicI64::new(1));
    let clients: Vec<_> = (0..CRASH_CLIENT_THREADS)
        .map(|thread| {
            let (url, key, stop, versions) = (
                server.shared_url(),
                key.clone(),
                stop.clone(),
                versions.clone(),
            );
            std::thread::spawn(move || push_until_stopped(thread, url, key, stop, versions))
        })
        .collect();

    let started = Instant::now();
    while server.kills < kills_wanted && started.elapsed() < budget {
        std::thread::sleep(Duration::from_millis(rand::random_range(150..1000)));
        server.kill_and_restart();
    }
    // The last server takes traffic for a moment too; then everything stops.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let sent: Vec<Sent> = clients
        .into_iter()
        .flat_map(|c| c.join().expect("a client thread panicked"))
        .collect();
    server.stop();
    let kills = server.kills;
    let pushing = started.elapsed();
    assert!(
        kills >= kills_wanted,
        "only {kills} kills in {budget:?}: server restarts are too slow"
    );

    let loaded = loader_to_end(&db, "loader", &["run"], Duration::from_secs(120));
    loaded.assert_success();

    // For each table and id, every version sent, in order, and how its request ended.
    let mut history: Vec<BTreeMap<i64, Vec<(i64, Outcome)>>> = vec![BTreeMap::new(); 3];
    for s in &sent {
        for id in &s.ids {
            history[s.table]
                .entry(*id)
                .or_default()
                .push((s.v, s.outcome));
        }
    }
    let mut direct = DirectDb::open(&db);
    let mut problems = Vec::new();
    let (mut acked_ids, mut unanswered_ids_present, mut rows_total) = (0usize, 0usize, 0usize);
    for (t, table) in CRASH_TABLES.iter().enumerate() {
        let rows = direct.id_versions(backend, CRASH_CLIENT, table);
        rows_total += rows.len();
        let mut by_id = HashMap::new();
        let mut seqs = HashSet::new();
        for row in &rows {
            if by_id.insert(row.id, *row).is_some() {
                problems.push(format!("{table}: id {} is in the warehouse twice", row.id));
            }
            if !seqs.insert(row.seq) {
                problems.push(format!("{table}: _intake_seq {} used twice", row.seq));
            }
            if !history[t].contains_key(&row.id) {
                problems.push(format!("{table}: id {} was never sent", row.id));
            }
        }
        for (id, versions) in &history[t] {
            let last_acked = versions
                .iter()
                .filter(|(_, o)| *o == Outcome::Acked)
                .map(|(v, _)| *v)
                .max();
            acked_ids += usize::from(last_acked.is_some());
            match (last_acked, by_id.get(id)) {
                (Some(acked), None) => problems.push(format!(
                    "LOST: {table} id {id}: v{acked} was acknowledged, the id is not in the warehouse"
                )),
                (Some(acked), Some(row)) if row.v < acked => problems.push(format!(
                    "LOST: {table} id {id}: v{acked} was acknowledged, the warehouse has the older v{}",
                    row.v
                )),
                (_, Some(row)) if !versions.iter().any(|(v, _)| *v == row.v) => problems.push(
                    format!("{table} id {id}: v{} was never sent for it", row.v),
                ),
                (None, Some(_)) => unanswered_ids_present += 1,
                _ => {}
            }
        }
    }
    let staged_left = direct.staged_count();
    let rejected = direct.rejected(backend, CRASH_CLIENT);
    let load_errors: Vec<_> = direct
        .load_history(backend, CRASH_CLIENT)
        .into_iter()
        .filter(|h| h.error.is_some())
        .collect();

    let requests = sent.len();
    let acked: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.outcome == Outcome::Acked)
        .collect();
    let unanswered = sent
        .iter()
        .filter(|s| s.outcome == Outcome::NoAnswer)
        .count();
    let mut refused: BTreeMap<u16, usize> = BTreeMap::new();
    for s in &sent {
        if let Outcome::Refused(status) = s.outcome {
            *refused.entry(status).or_default() += 1;
        }
    }
    let lost = problems.iter().filter(|p| p.starts_with("LOST")).count();
    println!(
        "server crash under load ({backend:?}): {kills} SIGKILLs in {:.1}s; {requests} requests \
         sent, {} acknowledged ({} records, {acked_ids} distinct ids), {unanswered} unanswered, \
         refused by status {refused:?}; warehouse rows {rows_total}, of which \
         {unanswered_ids_present} ids only ever sent unanswered; records lost: {lost}",
        pushing.as_secs_f64(),
        acked.len(),
        acked.len() * RECORDS_PER_REQUEST,
    );

    assert!(
        acked.len() >= kills,
        "too few requests acknowledged ({}) for the test to mean anything",
        acked.len()
    );
    assert!(
        problems.is_empty(),
        "{} problems after {kills} crashes, e.g.:\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(staged_left, 0, "staging must be empty after a loader run");
    assert!(rejected.is_empty(), "rejected records: {rejected:?}");
    assert!(
        load_errors.is_empty(),
        "load history errors: {load_errors:?}"
    );
    assert!(
        refused.keys().all(|s| *s == 503),
        "the only refusal a valid push may get is 503: {refused:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// 2. The loader killed with SIGKILL mid-chunk.

const BACKLOG_CLIENT: i64 = 22;
const BACKLOG_TABLES: [&str; 3] = ["backlog_a", "backlog_b", "backlog_c"];
const BACKLOG_REQUESTS_PER_TABLE: usize = 15;
const BACKLOG_RECORDS_PER_REQUEST: usize = 1000;
const LOADER_KILLS: usize = 10;

fn a_loader_killed_mid_chunk_loses_and_duplicates_nothing(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[QUIET]);
    let (_, key) = issue_key(&db, BACKLOG_CLIENT, "backlog");

    // id → latest version, per table; every record also carries an array (a child table
    // whose rows must be replaced, never duplicated or orphaned, whatever is killed when).
    let mut expected: Vec<BTreeMap<i64, i64>> = vec![BTreeMap::new(); BACKLOG_TABLES.len()];
    let mut v = 0i64;
    let mut updates = 0usize;
    for (t, table) in BACKLOG_TABLES.iter().enumerate() {
        let mut next_id = 0i64;
        for _ in 0..BACKLOG_REQUESTS_PER_TABLE {
            let mut records = Vec::with_capacity(BACKLOG_RECORDS_PER_REQUEST);
            for _ in 0..BACKLOG_RECORDS_PER_REQUEST {
                v += 1;
                let id = if next_id > 0 && rand::random_bool(0.2) {
                    updates += 1;
                    rand::random_range(1..=next_id)
                } else {
                    next_id += 1;
                    next_id
                };
                expected[t].insert(id, v);
                records.push(format!(
                    r#"{{"id":{id},"v":{v},"tags":["a{v}","b{v}"],"keys":["id"]}}"#
                ));
            }
            let body = format!("[{}]", records.join(","));
            assert_eq!(
                push_bytes(&server, BACKLOG_CLIENT, table, &key, body.as_bytes()).assert_created(),
                BACKLOG_RECORDS_PER_REQUEST as u64
            );
        }
    }
    drop(server);

    let mut direct = DirectDb::open(&db);
    let staged_total = direct.staged_count();
    assert_eq!(staged_total, v);
    let mut left = vec![staged_total];
    let (mut kills, mut runs) = (0, 0);
    while kills < LOADER_KILLS {
        runs += 1;
        assert!(
            runs <= 4 * LOADER_KILLS,
            "the loader kept finishing before it could be killed"
        );
        // Small chunks and an early kill, so that the backlog outlasts ten kills however
        // fast the loader has become (at 500 records and up to 400 ms it once drained after
        // eight).
        let mut loader = LoaderProcess::spawn(
            &db,
            &format!("killed-{runs}"),
            &["run", "--chunk-size", "250"],
        );
        std::thread::sleep(Duration::from_millis(rand::random_range(40..=250)));
        match loader.sigkill() {
            None => kills += 1,
            Some(out) => {
                out.assert_success();
            }
        }
        // The killed loader's transaction must be rolled back (on PostgreSQL: its session
        // gone) before the next loader, or the next one would find the table locked.
        direct.wait_until_alone(Duration::from_secs(10));
        let now = direct.staged_count();
        left.push(now);
        if now == 0 {
            break;
        }
    }
    let history_before_clean = direct.load_history(backend, BACKLOG_CLIENT).len();
    let clean = loader_to_end(&db, "clean", &["run"], Duration::from_secs(120));
    clean.assert_success();
    println!(
        "loader crash ({backend:?}): {} records staged ({updates} updates) in {} tables; \
         {kills} SIGKILLs over {runs} loader runs, staged records left after each: {left:?}; \
         {history_before_clean} chunks had committed before the clean run",
        staged_total,
        BACKLOG_TABLES.len()
    );
    assert!(
        kills >= LOADER_KILLS,
        "only {kills} loaders were killed mid-run before the backlog was gone: {left:?}"
    );

    assert_eq!(direct.staged_count(), 0, "staging must be empty");
    let rejected = direct.rejected(backend, BACKLOG_CLIENT);
    assert!(rejected.is_empty(), "rejected records: {rejected:?}");
    for (t, table) in BACKLOG_TABLES.iter().enumerate() {
        let rows = direct.id_versions(backend, BACKLOG_CLIENT, table);
        let got: BTreeMap<i64, i64> = rows.iter().map(|r| (r.id, r.v)).collect();
        assert_eq!(got.len(), rows.len(), "{table}: duplicate ids");
        let missing: Vec<_> = expected[t]
            .keys()
            .filter(|id| !got.contains_key(id))
            .collect();
        let wrong: Vec<_> = expected[t]
            .iter()
            .filter_map(|(id, v)| got.get(id).filter(|g| *g != v).map(|g| (id, v, g)))
            .collect();
        assert!(
            missing.is_empty() && wrong.is_empty() && got.len() == expected[t].len(),
            "{table}: {} ids missing (e.g. {:?}), {} with the wrong version (id, expected, got: \
             {:?}), {} rows for {} ids",
            missing.len(),
            missing.iter().take(5).collect::<Vec<_>>(),
            wrong.len(),
            wrong.iter().take(5).collect::<Vec<_>>(),
            got.len(),
            expected[t].len()
        );

        let child = direct
            .physical_table(backend, BACKLOG_CLIENT, &[table, "tags"])
            .unwrap_or_else(|| panic!("no child table for {table}.tags"));
        let tags = direct.child_values(backend, BACKLOG_CLIENT, &child);
        let want: Vec<(i64, i64, String)> = expected[t]
            .iter()
            .flat_map(|(id, v)| [(*id, 0, format!("a{v}")), (*id, 1, format!("b{v}"))])
            .collect();
        if tags != want {
            let extra: Vec<_> = tags.iter().filter(|r| !want.contains(r)).take(5).collect();
            let absent: Vec<_> = want.iter().filter(|r| !tags.contains(r)).take(5).collect();
            panic!(
                "{child}: {} rows, expected {}; unexpected e.g. {extra:?}; missing e.g. {absent:?}",
                tags.len(),
                want.len()
            );
        }
    }

    // Each staged record was loaded exactly once: the committed chunks' sequence ranges tile
    // 1..=N per table, their counts add up, and none recorded an error. (The shares of a chunk
    // written by several connections have interleaved ranges: together they cover the chunk.)
    let history = direct.load_history(backend, BACKLOG_CLIENT);
    let errors: Vec<_> = history.iter().filter(|h| h.error.is_some()).collect();
    assert!(errors.is_empty(), "load history errors: {errors:?}");
    for table in BACKLOG_TABLES {
        let mut ranges: Vec<(i64, i64, i64)> = history
            .iter()
            .filter(|h| h.table_name == table)
            .map(|h| {
                assert_eq!(h.records_rejected, 0, "{h:?}");
                (
                    h.first_seq.expect("first_seq"),
                    h.last_seq.expect("last_seq"),
                    h.records_loaded,
                )
            })
            .collect();
        ranges.sort_unstable();
        let mut chunks: Vec<(i64, i64, i64)> = Vec::new();
        for (first, last, loaded) in ranges {
            match chunks.last_mut() {
                Some(chunk) if first <= chunk.1 => {
                    chunk.1 = chunk.1.max(last);
                    chunk.2 += loaded;
                }
                _ => chunks.push((first, last, loaded)),
            }
        }
        let mut next = 1;
        for (first, last, loaded) in &chunks {
            assert_eq!(
                *first, next,
                "{table}: chunk ranges must tile the sequence: {chunks:?}"
            );
            assert_eq!(*loaded, last - first + 1, "{table}: chunk {first}..={last}");
            next = last + 1;
        }
        let per_table = (BACKLOG_REQUESTS_PER_TABLE * BACKLOG_RECORDS_PER_REQUEST) as i64;
        assert_eq!(next - 1, per_table, "{table}: loaded sequence range");
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Far more clients than database capacity.

const OVERLOAD_CLIENT: i64 = 23;
const OVERLOAD_THREADS: usize = 200;
const OVERLOAD_REQUESTS: usize = 3;
const OVERLOAD_RECORDS: usize = 100;
/// A refusal must come at most this long after the request was sent.
const FAST_REFUSAL: Duration = Duration::from_secs(3);
const RSS_LIMIT_KIB: u64 = 200 * 1024;

/// One overload request: its records, how long its answer took, and the answer.
type Exchange = (Vec<String>, Duration, Result<Reply, String>);

/// `OVERLOAD_THREADS` clients released at once, each pushing `OVERLOAD_REQUESTS` requests
/// one after the other. `phase` keeps the ids of different floods apart.
fn flood(url: &str, key: &str, phase: usize, stall: Option<&dyn Fn()>) -> Vec<Exchange> {
    let start = Arc::new(Barrier::new(OVERLOAD_THREADS + 1));
    let workers: Vec<_> = (0..OVERLOAD_THREADS)
        .map(|thread| {
            let (start, url, key) = (start.clone(), url.to_owned(), key.to_owned());
            std::thread::spawn(move || {
                let agent = http_agent();
                start.wait();
                (0..OVERLOAD_REQUESTS)
                    .map(|request| {
                        let first = ((phase * OVERLOAD_THREADS + thread) * OVERLOAD_REQUESTS
                            + request)
                            * OVERLOAD_RECORDS;
                        let records: Vec<String> = (first..first + OVERLOAD_RECORDS)
                            .map(|id| format!(r#"{{"id":{id},"thread":{thread},"keys":["id"]}}"#))
                            .collect();
                        let body = format!("[{}]", records.join(","));
                        let sent = Instant::now();
                        let reply = agent
                            .post(&url)
                            .header("Content-Type", "application/json")
                            .header("X-Api-Key", &key)
                            .send(body.as_str())
                            .map(Reply::read)
                            .map_err(|e| e.to_string());
                        (records, sent.elapsed(), reply)
                    })
                    .collect::<Vec<Exchange>>()
            })
        })
        .collect();
    start.wait();
    if let Some(stall) = stall {
        stall();
    }
    workers
        .into_iter()
        .flat_map(|w| w.join().expect("a client thread panicked"))
        .collect()
}

/// Holds the staging table's write lock for `STALL`, from another connection: every push
/// that has a database permit waits, so the others queue for permits, as when the database
/// is slow. Returns once the lock is taken.
fn stall_staging(db: &TestDb) -> std::thread::JoinHandle<()> {
    let mut direct = DirectDb::open(db);
    let (begin, lock) = match db.backend {
        Backend::Postgres => ("BEGIN", "LOCK TABLE staged_records IN SHARE MODE"),
        Backend::Sqlite => ("BEGIN IMMEDIATE", "SELECT 1"),
    };
    direct.exec(begin);
    direct.exec(lock);
    std::thread::spawn(move || {
        std::thread::sleep(STALL);
        direct.exec("COMMIT");
    })
}

/// How long [`stall_staging`] holds the lock: longer than the checkout timeout (2 s), shorter
/// than the statement timeout (5 s).
const STALL: Duration = Duration::from_secs(3);

fn overload_gets_fast_answers_and_loses_nothing(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[QUIET]);
    let (_, key) = issue_key(&db, OVERLOAD_CLIENT, "overload");
    let pid = server.os_pid();
    let url = server.url(&format!("/v2/client/{OVERLOAD_CLIENT}/table/flood/data"));
    let rss_before = rss_kib(pid).unwrap_or(0);

    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !done.load(Ordering::Relaxed) {
                peak = peak.max(rss_kib(pid).unwrap_or(0));
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    // First on a healthy database, then on one that stalls every write for a while.
    let began = Instant::now();
    let mut exchanges = flood(&url, &key, 0, None);
    let healthy_took = began.elapsed();
    let stalled_began = Instant::now();
    let release = std::cell::RefCell::new(None);
    let stall = || *release.borrow_mut() = Some(stall_staging(&db));
    let stalled = flood(&url, &key, 1, Some(&stall));
    if let Some(release) = release.into_inner() {
        release.join().expect("the lock holder panicked");
    }
    let stalled_took = stalled_began.elapsed();
    let stalled_refusals = stalled
        .iter()
        .filter(|(_, _, r)| r.as_ref().is_ok_and(|r| r.status != 201))
        .count();
    exchanges.extend(stalled);
    done.store(true, Ordering::Relaxed);
    let rss_peak = sampler.join().expect("the memory sampler panicked");

    let mut acked: Vec<&String> = Vec::new();
    let mut refused_records: HashSet<&String> = HashSet::new();
    let mut by_status: BTreeMap<u16, usize> = BTreeMap::new();
    let (mut slowest_refusal, mut slowest_created) = (Duration::ZERO, Duration::ZERO);
    let mut problems = Vec::new();
    for (records, elapsed, reply) in &exchanges {
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                problems.push(format!("no answer after {elapsed:?}: {e}"));
                continue;
            }
        };
        *by_status.entry(reply.status).or_default() += 1;
        match reply.status {
            201 => {
                assert_eq!(reply.assert_created(), OVERLOAD_RECORDS as u64);
                slowest_created = slowest_created.max(*elapsed);
                acked.extend(records);
            }
            503 | 429 => {
                reply.assert_error(reply.status);
                slowest_refusal = slowest_refusal.max(*elapsed);
                if *elapsed > FAST_REFUSAL {
                    problems.push(format!(
                        "{} after {elapsed:?} (more than {FAST_REFUSAL:?}): {}",
                        reply.status, reply.text
                    ));
                }
                match reply.header("retry-after").map(str::parse::<u64>) {
                    Some(Ok(secs)) if secs >= 1 => {}
                    other => problems.push(format!(
                        "{} without a usable Retry-After ({other:?}): {}",
                        reply.status, reply.text
                    )),
                }
                refused_records.extend(records);
            }
            other => problems.push(format!("status {other}: {}", reply.text)),
        }
    }

    let staged = DirectDb::open(&db).staged(OVERLOAD_CLIENT, "flood");
    let mut staged_count: HashMap<&str, usize> = HashMap::new();
    for (_, record) in &staged {
        *staged_count.entry(record.as_str()).or_default() += 1;
    }
    let lost = acked
        .iter()
        .filter(|r| staged_count.get(r.as_str()) != Some(&1))
        .count();
    let stored_though_refused = refused_records
        .iter()
        .filter(|r| staged_count.contains_key(r.as_str()))
        .count();
    println!(
        "overload ({backend:?}): twice {OVERLOAD_THREADS} clients x {OVERLOAD_REQUESTS} \
         requests of {OVERLOAD_RECORDS} records, in {:.1}s on a healthy database and in {:.1}s \
         on one stalled for {STALL:?} ({stalled_refusals} refusals); answers by status \
         {by_status:?}; slowest 201 {slowest_created:?}, slowest refusal {slowest_refusal:?}; \
         {} records acknowledged, lost {lost}, stored despite a refusal \
         {stored_though_refused}; server RSS {} KiB before, peak {rss_peak} KiB",
        healthy_took.as_secs_f64(),
        stalled_took.as_secs_f64(),
        acked.len(),
        rss_before
    );
    assert!(
        problems.is_empty(),
        "{} bad answers, e.g.:\n{}",
        problems.len(),
        problems
            .iter()
            .take(10)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        lost, 0,
        "acknowledged records missing from staging (or doubled)"
    );
    assert_eq!(
        stored_though_refused, 0,
        "records of refused requests were stored"
    );
    assert_eq!(
        staged.len(),
        acked.len(),
        "staging holds exactly the acknowledged records"
    );
    assert!(
        rss_peak < RSS_LIMIT_KIB,
        "server RSS peaked at {rss_peak} KiB (limit {RSS_LIMIT_KIB} KiB)"
    );
    server.get("/ready").assert_status(200);
}

// ---------------------------------------------------------------------------------------------
// 4. Clients that never finish a request.

const SLOW_CLIENT: i64 = 24;
/// The head and body timeouts the server runs with in this test.
const SLOW_TIMEOUT: Duration = Duration::from_secs(2);
/// How much later than the timeout the server may act, on a busy 2-core machine.
const SLOW_GRACE: Duration = Duration::from_millis(2500);

/// GET / must answer 200 within 2 s whatever other connections do.
#[track_caller]
fn assert_still_serving(server: &Server, what: &str) {
    let started = Instant::now();
    server.get("/").assert_status(200);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "GET / took {:?} {what}",
        started.elapsed()
    );
}

/// Slowloris (heads that never end, or trickle in) and bodies that never end: each is cut off
/// by its timeout, and nobody else notices. The HTTP layer does not depend on the backend, so
/// this runs on SQLite only.
#[test]
fn slow_clients_are_cut_off_and_starve_nobody() {
    let db = TestDb::new(Backend::Sqlite);
    let server = Server::start(
        &db,
        &[
            QUIET,
            ("INTAKE__SERVER__BODY_TIMEOUT_SECS", "2"),
            ("INTAKE__SERVER__CLIENT_REQUEST_TIMEOUT_SECS", "2"),
        ],
    );
    let (_, key) = issue_key(&db, SLOW_CLIENT, "slow");
    let base = server.base_url().to_owned();
    server
        .push(SLOW_CLIENT, "slow", &key, r#"{"id":0,"keys":["id"]}"#)
        .assert_created();

    // (a) 50 connections send part of a head, then nothing; 5 more trickle a byte of header
    // every 200 ms, which never adds up to a whole head.
    let partial_head = format!(
        "POST /v2/client/{SLOW_CLIENT}/table/slow/data HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         X-Api-Key: {key}\r\nContent-Le"
    );
    let opened = Instant::now();
    let mut stalled: Vec<TcpStream> = (0..50)
        .map(|_| raw_connect(&base, partial_head.as_bytes()))
        .collect();
    let tricklers: Vec<_> = (0..5)
        .map(|_| {
            let base = base.clone();
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut stream = raw_connect(&base, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n");
                while started.elapsed() < Duration::from_secs(8) {
                    std::thread::sleep(Duration::from_millis(200));
                    if stream.write_all(b"X").is_err() {
                        return (started.elapsed(), None);
                    }
                    let answer = raw_read(&mut stream, Instant::now(), Duration::from_millis(1));
                    if answer.closed || answer.status.is_some() {
                        return (started.elapsed(), answer.status);
                    }
                }
                (started.elapsed(), Some(0))
            })
        })
        .collect();
    for _ in 0..5 {
        assert_still_serving(&server, "while 55 connections stall their heads");
        std::thread::sleep(Duration::from_millis(250));
    }
    let push_started = Instant::now();
    server
        .push(SLOW_CLIENT, "slow", &key, r#"{"id":1,"keys":["id"]}"#)
        .assert_created();
    assert!(push_started.elapsed() < Duration::from_secs(2));

    let mut cut_after = Duration::ZERO;
    for (i, stream) in stalled.iter_mut().enumerate() {
        let answer = raw_read(
            stream,
            opened,
            SLOW_TIMEOUT + SLOW_GRACE + Duration::from_secs(1),
        );
        assert!(
            answer.closed || answer.status == Some(408),
            "stalled head {i}: not cut off within {:?}: {answer:?}",
            opened.elapsed()
        );
        let after = answer.after.unwrap_or_default();
        assert!(
            after <= SLOW_TIMEOUT + SLOW_GRACE,
            "stalled head {i} cut off only after {after:?}"
        );
        cut_after = cut_after.max(after);
    }
    let mut trickle_cut = Duration::ZERO;
    for (i, trickler) in tricklers.into_iter().enumerate() {
        let (after, status) = trickler.join().expect("a trickling client panicked");
        assert!(
            status != Some(0) && after <= SLOW_TIMEOUT + SLOW_GRACE,
            "trickled head {i}: still open after {after:?} (status {status:?}); the head \
             timeout must bound the whole head, not each read"
        );
        trickle_cut = trickle_cut.max(after);
    }

    // (b) A body that never ends: Content-Length 1000, 10 bytes sent. And the same with a
    // chunked body whose last chunk never comes.
    let head = |framing: &str| {
        format!(
            "POST /v2/client/{SLOW_CLIENT}/table/slow/data HTTP/1.1\r\nHost: 127.0.0.1\r\n\
             Content-Type: application/json\r\nX-Api-Key: {key}\r\n{framing}\r\n\r\n"
        )
    };
    let mut body_cut = Vec::new();
    for (what, request) in [
        (
            "Content-Length 1000, 10 bytes sent",
            format!("{}{}", head("Content-Length: 1000"), r#"{"id":2,"k"#),
        ),
        (
            "chunked, last chunk never sent",
            format!(
                "{}a\r\n{}\r\n",
                head("Transfer-Encoding: chunked"),
                r#"{"id":3,"k"#
            ),
        ),
    ] {
        let sent = Instant::now();
        let mut stream = raw_connect(&base, request.as_bytes());
        assert_still_serving(&server, &format!("while a body stalls ({what})"));
        let answer = raw_read(
            &mut stream,
            sent,
            SLOW_TIMEOUT + SLOW_GRACE + Duration::from_secs(1),
        );
        let after = answer.after.unwrap_or(sent.elapsed());
        assert!(
            answer.status == Some(408) || (answer.closed && answer.status.is_none()),
            "{what}: expected 408 or a closed connection, got {answer:?}"
        );
        assert!(
            after <= SLOW_TIMEOUT + SLOW_GRACE,
            "{what}: answered only after {after:?}"
        );
        if answer.status == Some(408) {
            let body: Value = serde_json::from_str(answer.body())
                .unwrap_or_else(|e| panic!("{what}: the 408 body is not JSON ({e}): {answer:?}"));
            assert_eq!(body["code"], 408, "{what}: {body}");
            assert!(body["message"].is_string() && body["reasons"].is_array());
        }
        body_cut.push((what, answer.status, after));
    }
    assert_still_serving(&server, "after the slow clients");
    let staged = DirectDb::open(&db).staged(SLOW_CLIENT, "slow");
    assert_eq!(
        staged.len(),
        2,
        "only the two complete pushes are stored: {staged:?}"
    );
    println!(
        "slow clients: 50 stalled heads cut off within {cut_after:?}, 5 trickled heads within \
         {trickle_cut:?}; stalled bodies: {body_cut:?}; GET / stayed under 2 s"
    );
}

// ---------------------------------------------------------------------------------------------
// 5a. Hostile bodies.

const HOSTILE_CLIENT: i64 = 25;

/// What a hostile body may get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// `201`, and the loader loads it: docs/warehouse.md gives no reason to reject it (save
    /// NUL characters on PostgreSQL, which it documents).
    Loads,
    /// `201`; the loader may reject it for a database limit ("the database refused it").
    Created,
    ClientError,
    /// Either is a defensible answer; a 5xx or a hang is not.
    Either,
}

/// A record with the given extra fields (already JSON text), keyed by `id`.
fn record_with(id: i64, extra: &str) -> Vec<u8> {
    format!(r#"{{"id":{id},"keys":["id"],{extra}}}"#).into_bytes()
}

fn hostile_bodies() -> Vec<(String, String, Vec<u8>, Expect)> {
    use Expect::{ClientError, Created, Either, Loads};
    let mut cases: Vec<(&str, Vec<u8>, Expect)> = Vec::new();
    let many_fields: Vec<String> = (0..10_000).map(|i| format!(r#""f{i}":{i}"#)).collect();
    cases.push((
        "10,000 fields",
        record_with(1, &many_fields.join(",")),
        Loads,
    ));
    cases.push(("1e400", record_with(2, r#""x":1e400"#), Either));
    cases.push(("-1e400", record_with(3, r#""x":-1e400"#), Either));
    cases.push(("1e-400", record_with(4, r#""x":1e-400"#), Either));
    cases.push((
        "a 30-digit integer",
        record_with(5, r#""x":123456789012345678901234567890"#),
        Loads,
    ));
    cases.push((
        "a 30-digit integer key",
        br#"{"id":123456789012345678901234567890,"keys":["id"]}"#.to_vec(),
        ClientError,
    ));
    cases.push((
        "1e400 as the key",
        br#"{"id":1e400,"keys":["id"]}"#.to_vec(),
        ClientError,
    ));
    cases.push((
        "i64::MIN key",
        br#"{"id":-9223372036854775808,"keys":["id"]}"#.to_vec(),
        Loads,
    ));
    cases.push((
        "i64::MAX + 1 key",
        br#"{"id":9223372036854775808,"keys":["id"]}"#.to_vec(),
        ClientError,
    ));
    cases.push(("-0 key", br#"{"id":-0,"keys":["id"]}"#.to_vec(), Loads));
    cases.push(("100k [", "[".repeat(100_000).into_bytes(), ClientError));
    cases.push((
        "100k [ closed",
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)).into_bytes(),
        ClientError,
    ));
    cases.push((
        "100k nested objects in a record",
        record_with(
            6,
            &format!(
                r#""x":{}1{}"#,
                r#"{"a":"#.repeat(100_000),
                "}".repeat(100_000)
            ),
        ),
        ClientError,
    ));
    cases.push((
        "depth 64 exactly",
        format!(
            r#"[{{"id":7,"keys":["id"],"x":{}{}}}]"#,
            "[".repeat(62),
            "]".repeat(62)
        )
        .into_bytes(),
        Created,
    ));
    cases.push((
        "depth 65",
        format!(
            r#"[{{"id":8,"keys":["id"],"x":{}{}}}]"#,
            "[".repeat(63),
            "]".repeat(63)
        )
        .into_bytes(),
        ClientError,
    ));
    cases.push((
        "invalid UTF-8 in a value",
        [br#"{"id":9,"keys":["id"],"x":""#.as_slice(), b"\xff\xfe\"}"].concat(),
        ClientError,
    ));
    cases.push((
        "invalid UTF-8 in a field name",
        [br#"{"id":10,"keys":["id"],"#.as_slice(), b"\"\xfe\xff\":1}"].concat(),
        ClientError,
    ));
    cases.push((
        "overlong UTF-8",
        [
            br#"{"id":11,"keys":["id"],"x":""#.as_slice(),
            b"\xc0\xaf\"}",
        ]
        .concat(),
        ClientError,
    ));
    cases.push((
        "a surrogate encoded in UTF-8",
        [
            br#"{"id":12,"keys":["id"],"x":""#.as_slice(),
            b"\xed\xa0\x80\"}",
        ]
        .concat(),
        ClientError,
    ));
    cases.push((
        "a truncated UTF-8 sequence",
        [
            br#"{"id":13,"keys":["id"],"x":""#.as_slice(),
            b"\xe2\x82\"}",
        ]
        .concat(),
        ClientError,
    ));
    cases.push((
        "invalid UTF-8 in a string key",
        [br#"{"keys":["id"],"id":""#.as_slice(), b"\x80\"}"].concat(),
        ClientError,
    ));
    cases.push((
        "a raw NUL in a string",
        [br#"{"id":14,"keys":["id"],"x":"a"#.as_slice(), b"\x00b\"}"].concat(),
        ClientError,
    ));
    cases.push((
        "a raw NUL between tokens",
        [br#"{"id":15,"keys":["id"],"#.as_slice(), b"\x00\"x\":1}"].concat(),
        ClientError,
    ));
    cases.push(("a lone NUL", b"\x00".to_vec(), ClientError));
    cases.push((
        "\\u0000 in a value",
        record_with(16, r#""x":"a\u0000b""#),
        Loads,
    ));
    cases.push((
        "\\u0000 in a field name",
        record_with(17, r#""a\u0000b":1"#),
        Loads,
    ));
    cases.push((
        "\\u0000 in a string key",
        br#"{"id":"k\u0000","keys":["id"]}"#.to_vec(),
        Loads,
    ));
    cases.push((
        "\\u0000 as a key name",
        br#"{"\u0000":1,"keys":["\u0000"]}"#.to_vec(),
        Loads,
    ));
    cases.push((
        "a duplicate key field",
        br#"{"id":18,"id":19,"keys":["id"]}"#.to_vec(),
        Loads,
    ));
    cases.push((
        "a duplicate key field, the first one invalid",
        br#"{"id":null,"id":20,"keys":["id"]}"#.to_vec(),
        Either,
    ));
    cases.push((
        "a duplicate key field, the last one invalid",
        br#"{"id":21,"id":null,"keys":["id"]}"#.to_vec(),
        ClientError,
    ));
    cases.push((
        "duplicate keys lists, the last one invalid",
        br#"{"id":22,"keys":["id"],"keys":["nope"]}"#.to_vec(),
        ClientError,
    ));
    cases.push((
        "duplicate keys lists, the first one invalid",
        br#"{"id":23,"keys":["nope"],"keys":["id"]}"#.to_vec(),
        Either,
    ));
    cases.push((
        "a duplicate field of different types",
        record_with(24, r#""x":1,"x":"two","x":{"three":3}"#),
        Loads,
    ));
    cases.push((
        "a lone high surrogate",
        record_with(25, r#""x":"\ud800""#),
        Either,
    ));
    cases.push((
        "a lone low surrogate",
        record_with(26, r#""x":"\udc00""#),
        Either,
    ));
    cases.push((
        "surrogates in the wrong order",
        record_with(27, r#""x":"\udc00\ud800""#),
        Either,
    ));
    cases.push((
        "a high surrogate then a letter",
        record_with(28, r#""x":"\ud800\u0041""#),
        Either,
    ));
    cases.push((
        "a lone surrogate in a string key",
        br#"{"id":"\ud800","keys":["id"]}"#.to_vec(),
        ClientError,
    ));
    cases.push((
        "a lone surrogate in a field name",
        record_with(29, r#""\udbff":1"#),
        Either,
    ));
    cases.push((
        "a lone surrogate as a key name",
        br#"{"\ud800":1,"keys":["\ud800"]}"#.to_vec(),
        Either,
    ));
    cases.push((
        "a byte order mark",
        [b"\xef\xbb\xbf".as_slice(), br#"{"id":30,"keys":["id"]}"#].concat(),
        Either,
    ));
    cases.push(("an empty body", Vec::new(), ClientError));
    cases.push(("whitespace only", b" \n\t\r ".to_vec(), ClientError));
    cases.push((
        "trailing garbage",
        br#"[{"id":31,"keys":["id"]}]garbage"#.to_vec(),
        ClientError,
    ));
    cases.push((
        "two objects",
        br#"{"id":32,"keys":["id"]}{"id":33,"keys":["id"]}"#.to_vec(),
        ClientError,
    ));
    cases.push((
        "a 1 MiB string",
        record_with(34, &format!(r#""x":"{}""#, "y".repeat(1 << 20))),
        Loads,
    ));
    cases.push((
        "a 100 KB field name",
        record_with(35, &format!(r#""{}":1"#, "z".repeat(100_000))),
        Loads,
    ));
    cases.push((
        "every escape",
        record_with(36, r#""x":"\"\\\/\b\f\n\r\t\u001f\u00e9\ud83d\ude00""#),
        Loads,
    ));
    let names: Vec<String> = (0..1000).map(|i| format!("k{i}")).collect();
    let fields: Vec<String> = names.iter().map(|n| format!(r#""{n}":1"#)).collect();
    cases.push((
        // More than 16 key fields is no primary key (and more than PostgreSQL can index).
        "1000 key fields",
        format!(
            r#"{{{},"keys":{}}}"#,
            fields.join(","),
            serde_json::to_string(&names).expect("JSON")
        )
        .into_bytes(),
        ClientError,
    ));
    let tiny = |n: usize| {
        let records: Vec<String> = (0..n)
            .map(|i| format!(r#"{{"id":{i},"keys":["id"]}}"#))
            .collect();
        format!("[{}]", records.join(",")).into_bytes()
    };
    cases.push(("10,000 records", tiny(10_000), Loads));
    cases.push(("10,001 records", tiny(10_001), ClientError));
    cases.push((
        "keys naming a 10 KB missing field",
        format!(r#"{{"keys":["{}"]}}"#, "q".repeat(10_240)).into_bytes(),
        ClientError,
    ));

    let mut all: Vec<(String, String, Vec<u8>, Expect)> = cases
        .into_iter()
        .enumerate()
        .map(|(i, (what, body, expect))| (what.to_owned(), format!("hostile_{i}"), body, expect))
        .collect();
    // Hostile table names in the path (a valid record each).
    let record = br#"{"id":1,"keys":["id"]}"#.to_vec();
    for (table, expect) in [
        ("select", Loads),
        ("_intake_columns", Loads),
        ("_intake_load_history", Loads),
        ("staged_records", Loads),
        ("warehouse_clients", Loads),
        (
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_",
            Loads,
        ),
        ("t%00", ClientError),
        ("t%27%3B%20DROP%20TABLE%20canary", ClientError),
        ("..%2F..%2Fetc", ClientError),
        ("%FF", ClientError),
        ("%C3%A9", ClientError),
    ] {
        all.push((
            format!("table name {table}"),
            table.to_owned(),
            record.clone(),
            expect,
        ));
    }
    all
}

fn hostile_bodies_get_a_201_or_a_4xx_never_a_5xx(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[QUIET]);
    let (_, key) = issue_key(&db, HOSTILE_CLIENT, "hostile");
    let mut direct = DirectDb::open(&db);
    let cases = hostile_bodies();
    let mut problems = Vec::new();
    let (mut created, mut refused) = (0, 0);
    let mut slowest = Duration::ZERO;
    for (what, table, body, expect) in &cases {
        let started = Instant::now();
        let reply = push_bytes(&server, HOSTILE_CLIENT, table, &key, body);
        let took = started.elapsed();
        slowest = slowest.max(took);
        if took > Duration::from_secs(10) {
            problems.push(format!("{what}: took {took:?}"));
        }
        match reply.status {
            201 => {
                created += 1;
                let accepted = reply.assert_created();
                let sent = split_records(body);
                let staged: Vec<String> = direct
                    .staged(HOSTILE_CLIENT, &table.to_ascii_lowercase())
                    .into_iter()
                    .map(|(_, r)| r)
                    .collect();
                if accepted != sent.len() as u64 || staged != sent {
                    problems.push(format!(
                        "{what}: 201 for {accepted} records, but staging does not hold the \
                         records exactly as sent ({} staged, {} sent)",
                        staged.len(),
                        sent.len()
                    ));
                }
                if *expect == Expect::ClientError {
                    problems.push(format!("{what}: 201, expected a 4xx"));
                }
            }
            400..=499 => {
                refused += 1;
                reply.assert_error(reply.status);
                if matches!(expect, Expect::Created | Expect::Loads) {
                    problems.push(format!(
                        "{what}: {} {}, expected 201",
                        reply.status, reply.text
                    ));
                }
            }
            status => problems.push(format!("{what}: status {status}: {}", reply.text)),
        }
    }
    server.get("/ready").assert_status(200);

    // The loader takes whatever was accepted: loads it or rejects it, never fails on it.
    let loaded = loader_to_end(&db, "loader", &["run"], Duration::from_secs(120));
    let staged_left = direct.staged_count();
    let rejected = direct.rejected(backend, HOSTILE_CLIENT);
    for (table, seq, reason) in &rejected {
        let Some((what, _, _, expect)) = cases.iter().find(|c| c.1.eq_ignore_ascii_case(table))
        else {
            continue;
        };
        let documented = backend == Backend::Postgres && reason.contains("NUL character");
        if reason.contains("not valid JSON") {
            // The server parsed it and answered 201: it cannot be invalid JSON now.
            problems.push(format!(
                "{what}: answered 201, then rejected by the loader as invalid JSON (record \
                 {seq}): {}",
                short(reason)
            ));
        } else if *expect == Expect::Loads && !documented {
            problems.push(format!(
                "{what}: answered 201, then rejected by the loader (record {seq}): {}",
                short(reason)
            ));
        }
    }
    // Values the docs say how to store: exact digits beyond 64 bits, escapes decoded, the
    // extreme key, a 100 KB field name.
    let table_of = |what: &str| {
        cases
            .iter()
            .find(|c| c.0 == what)
            .map(|c| c.1.clone())
            .expect("a hostile case")
    };
    let stored = [
        Expected::new(
            &table_of("a 30-digit integer"),
            &[("id", json!(5))],
            vec![(vec!["x".into()], json!("123456789012345678901234567890"))],
        ),
        Expected::new(
            &table_of("every escape"),
            &[("id", json!(36))],
            vec![(
                vec!["x".into()],
                json!("\"\\/\u{8}\u{c}\n\r\t\u{1f}\u{e9}\u{1f600}"),
            )],
        ),
        Expected::new(
            &table_of("i64::MIN key"),
            &[("id", json!(i64::MIN))],
            vec![],
        ),
        Expected::new(
            &table_of("a 100 KB field name"),
            &[("id", json!(35))],
            vec![(vec!["z".repeat(100_000)], json!(1))],
        ),
    ];
    let seqs: HashMap<String, i64> = stored.iter().map(|e| (e.text.clone(), 1)).collect();
    problems.extend(check_loaded(
        &mut direct,
        backend,
        HOSTILE_CLIENT,
        &stored,
        &seqs,
    ));
    println!(
        "hostile bodies ({backend:?}): {} sent, {created} answered 201, {refused} answered 4xx, \
         slowest answer {slowest:?}; the loader then rejected {} records: {:?}",
        cases.len(),
        rejected.len(),
        rejected
            .iter()
            .map(|(t, s, r)| format!("{t}#{s}: {}", r.chars().take(100).collect::<String>()))
            .collect::<Vec<_>>()
    );
    assert!(
        problems.is_empty(),
        "hostile bodies:\n{}",
        problems.join("\n")
    );
    loaded.assert_success();
    assert_eq!(staged_left, 0, "the loader left records in staging");
}

// ---------------------------------------------------------------------------------------------
// 5b. Hostile field, key and table names, loaded.

const NAMES_CLIENT: i64 = 26;
/// Learns the loader's hashed names before the collisions are staged for `NAMES_CLIENT`.
const PROBE_CLIENT: i64 = 126;

/// Field names that are SQL, reserved words, collide once normalised, or are absurdly long.
fn hostile_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "a'b",
        "a\"b",
        "a\"; DROP TABLE canary; --",
        "'); DROP TABLE canary; --",
        "\"); DROP TABLE canary; --",
        "x -- y",
        "/* c */",
        "a;b",
        "select",
        "from",
        "order",
        "table",
        "group",
        "user",
        "where",
        "null",
        "Name",
        "name",
        "NAME",
        "na me",
        "na-me",
        "na_me",
        "a.b",
        "a__b",
        "ID",
        "id ",
        "_intake_seq",
        "_INTAKE_SEQ",
        "_intake_received_at",
        "_intake_loaded_at",
        "_intake_overflow",
        "_intake_root_id",
        "_intake_pos_0",
        "value",
        "",
        "_",
        " ",
        "名前",
        "é",
        "🙂",
        "\\",
        "`tick`",
        "[br]",
        "$1",
        "?1",
        "?",
        "%s",
        "\n",
        "\t",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.push("n".repeat(10 * 1024));
    names.push("N".repeat(10 * 1024));
    names.push("m".repeat(63));
    names.push("m".repeat(64));
    names.push(format!("{}x", "m".repeat(54)));
    names
}

/// A record to look up in the warehouse: its key (path, value) pairs, the other values, and
/// the staged sequence number its row must carry.
struct Expected {
    table: String,
    keys: Vec<(Vec<String>, Value)>,
    cells: Vec<(Vec<String>, Value)>,
    text: String,
}

impl Expected {
    /// A root record of `table` with the given top-level key fields and other fields.
    fn new(table: &str, keys: &[(&str, Value)], cells: Vec<(Vec<String>, Value)>) -> Expected {
        let mut object = serde_json::Map::new();
        for (name, value) in keys {
            object.insert(name.to_string(), value.clone());
        }
        for (path, value) in &cells {
            // Nested paths become nested objects.
            let mut slot = &mut object;
            for part in &path[..path.len() - 1] {
                slot = slot
                    .entry(part.clone())
                    .or_insert_with(|| Value::Object(Default::default()))
                    .as_object_mut()
                    .expect("an object on the way");
            }
            slot.insert(path[path.len() - 1].clone(), value.clone());
        }
        let names: Vec<&str> = keys.iter().map(|(n, _)| *n).collect();
        object.insert("keys".into(), json!(names));
        Expected {
            table: table.to_owned(),
            keys: keys
                .iter()
                .map(|(n, v)| (vec![n.to_string()], v.clone()))
                .collect(),
            cells,
            text: Value::Object(object).to_string(),
        }
    }
}

fn value_type(value: &Value) -> &'static str {
    match value {
        Value::Number(_) => "bigint",
        _ => "text",
    }
}

fn as_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Checks that every record is in the warehouse, each value in the column `_intake_columns`
/// names for it, and `_intake_seq` is the record's staged sequence number. Returns problems.
fn check_loaded(
    direct: &mut DirectDb,
    backend: Backend,
    client_id: i64,
    records: &[Expected],
    seqs: &HashMap<String, i64>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut rows_per_table: BTreeMap<&str, usize> = BTreeMap::new();
    for record in records {
        *rows_per_table.entry(record.table.as_str()).or_default() += 1;
        let Some(physical) = direct.physical_table(backend, client_id, &[record.table.as_str()])
        else {
            problems.push(format!("{}: no warehouse table", record.table));
            continue;
        };
        let table_ref = warehouse_table(backend, client_id, &physical);
        let columns = direct.column_map(backend, client_id, &physical);
        let mut distinct = HashSet::new();
        for c in &columns {
            if !distinct.insert(c.column.as_str()) {
                problems.push(format!(
                    "{}: column {} holds two fields",
                    record.table, c.column
                ));
            }
        }
        let column_of = |path: &[String], value: &Value| {
            columns
                .iter()
                .find(|c| c.path == path && c.value_type == value_type(value))
                .map(|c| c.column.clone())
        };
        let mut condition = Vec::new();
        for (path, value) in &record.keys {
            match column_of(path, value) {
                Some(column) => condition.push(format!(
                    "{} = {}",
                    ident(&column),
                    match value {
                        Value::Number(n) => n.to_string(),
                        other => literal(&as_text(other)),
                    }
                )),
                None => problems.push(format!(
                    "{}: no column for key field {:?}",
                    record.table,
                    short(path)
                )),
            }
        }
        if condition.len() < record.keys.len() {
            continue;
        }
        let condition = condition.join(" AND ");
        let seq = seqs.get(&record.text).copied();
        let got_seq = direct.cells(&table_ref, "_intake_seq", &condition);
        if got_seq.len() != 1 {
            problems.push(format!(
                "{}: {} rows for key {:?}, expected 1",
                record.table,
                got_seq.len(),
                short(&record.keys)
            ));
            continue;
        }
        if got_seq[0] != seq.map(|s| s.to_string()) {
            problems.push(format!(
                "{}: _intake_seq is {:?}, the record was staged as {seq:?}",
                record.table, got_seq[0]
            ));
        }
        for system in ["_intake_received_at", "_intake_loaded_at"] {
            if direct.cells(&table_ref, system, &condition)[0].is_none() {
                problems.push(format!("{}: {system} is NULL", record.table));
            }
        }
        for (path, value) in &record.cells {
            let Some(column) = column_of(path, value) else {
                problems.push(format!(
                    "{}: no column for field {:?} ({}) among {:?}",
                    record.table,
                    short(path),
                    value_type(value),
                    columns
                        .iter()
                        .map(|c| format!("{} {}", short(&c.path), c.value_type))
                        .collect::<Vec<_>>()
                ));
                continue;
            };
            let got = direct.cells(&table_ref, &column, &condition);
            if got != [Some(as_text(value))] {
                problems.push(format!(
                    "{}: field {:?} in column {column}: expected {:?}, found {:?}",
                    record.table,
                    short(path),
                    short(value),
                    short(&got)
                ));
            }
        }
    }
    for (table, rows) in rows_per_table {
        if let Some(physical) = direct.physical_table(backend, client_id, &[table]) {
            let count = direct.count(&format!(
                "SELECT CAST(COUNT(*) AS BIGINT) AS n FROM {}",
                warehouse_table(backend, client_id, &physical)
            ));
            if count != rows as i64 {
                problems.push(format!("{table}: {count} rows, expected {rows}"));
            }
        }
    }
    problems
}

/// Debug text cut to a readable length (some names are 10 KB).
fn short(value: &impl std::fmt::Debug) -> String {
    let text = format!("{value:?}");
    if text.chars().count() > 80 {
        format!("{}...", text.chars().take(80).collect::<String>())
    } else {
        text
    }
}

/// Loads, for a client of its own, `"a b"` then `"a_b"` into table `collide` and arrays
/// `"x y"` then `"x_y"` into table `nest`, and returns the names the loader gave the second
/// of each pair: the column of `a_b`, and the child table of `x_y`.
fn probe_hashed_names(db: &TestDb, server: &Server, backend: Backend) -> (String, String) {
    let (_, key) = issue_key(db, PROBE_CLIENT, "probe");
    for (first, second) in [
        (
            r#"{"id":1,"keys":["id"],"a b":"p"}"#,
            r#"{"id":2,"keys":["id"],"a_b":"q"}"#,
        ),
        (
            r#"{"id":1,"keys":["id"],"x y":["p"]}"#,
            r#"{"id":2,"keys":["id"],"x_y":["q"]}"#,
        ),
    ] {
        let table = if first.contains("a b") {
            "collide"
        } else {
            "nest"
        };
        push_bytes(server, PROBE_CLIENT, table, &key, first.as_bytes()).assert_created();
        loader_to_end(db, "probe-1", &["run"], Duration::from_secs(60)).assert_success();
        push_bytes(server, PROBE_CLIENT, table, &key, second.as_bytes()).assert_created();
        loader_to_end(db, "probe-2", &["run"], Duration::from_secs(60)).assert_success();
    }
    let mut direct = DirectDb::open(db);
    let collide = direct
        .physical_table(backend, PROBE_CLIENT, &["collide"])
        .expect("the probe's collide table");
    let column = direct
        .column_map(backend, PROBE_CLIENT, &collide)
        .into_iter()
        .find(|c| c.path == ["a_b"])
        .expect("a column for a_b")
        .column;
    let child = direct
        .physical_table(backend, PROBE_CLIENT, &["nest", "x_y"])
        .expect("a child table for x_y");
    (column, child)
}

fn hostile_field_and_key_names_load_as_data(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[QUIET]);
    let (_, key) = issue_key(&db, NAMES_CLIENT, "names");
    let mut direct = DirectDb::open(&db);
    direct.exec("CREATE TABLE canary (x INTEGER NOT NULL)");
    direct.exec("INSERT INTO canary (x) VALUES (42)");

    let names = hostile_names();
    let mut first: Vec<Expected> = Vec::new();
    for id in 1..=3i64 {
        let mut cells: Vec<(Vec<String>, Value)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| (vec![n.clone()], json!(format!("v{i}'r{id}"))))
            .collect();
        // A nested path that normalises like the flat field "a__b".
        cells.push((vec!["a".into(), "b".into()], json!(format!("nested r{id}"))));
        cells.push((vec!["sql".into()], json!("'); DROP TABLE canary; --")));
        cells.push((vec!["n".into()], json!(id * 1000)));
        first.push(Expected::new("names", &[("id", json!(id))], cells));
    }
    let keyed: Vec<(&str, Vec<(&str, Value)>)> = vec![
        ("keysql", vec![("id'; DROP TABLE canary; --", json!(5))]),
        (
            "keyselect",
            vec![
                ("select", json!("a'b")),
                ("from", json!("'); DROP TABLE canary; --")),
            ],
        ),
        ("keyseq", vec![("_intake_seq", json!(7))]),
        (
            "keyfold",
            vec![("K", json!("upper")), ("k", json!("lower"))],
        ),
        ("keyquote", vec![("\"", json!("dq")), ("'", json!("sq"))]),
        ("keyempty", vec![("", json!(0))]),
        ("keyunicode", vec![("ключ", json!("значение"))]),
    ];
    let long_key = "k".repeat(10 * 1024);
    for (table, keys) in &keyed {
        for n in 0..2i64 {
            let keys: Vec<(&str, Value)> = keys
                .iter()
                .map(|(k, v)| match v {
                    Value::Number(x) => (*k, json!(x.as_i64().unwrap_or(0) + n)),
                    other => (*k, json!(format!("{}{n}", as_text(other)))),
                })
                .collect();
            let cells = vec![
                (vec!["_intake_loaded_at".into()], json!("not a time")),
                (vec!["v".into()], json!(format!("{table} {n}"))),
            ];
            first.push(Expected::new(table, &keys, cells));
        }
    }
    first.push(Expected::new(
        "keylong",
        &[(long_key.as_str(), json!(1))],
        vec![(vec!["v".into()], json!("long"))],
    ));

    // Names chosen to collide with the hashed name a later field gets: "a_b" is taken by
    // "a b", so "a_b" (loaded later) gets a hashed name, which a literal field already holds.
    // The same for child tables: the array "x_y" of "nest" gets a hashed table name (as
    // "x y" has the plain one), which a pushed table of that name already holds. The hashed
    // names are learnt from a probe client first.
    let (hashed, hashed_child) = probe_hashed_names(&db, &server, backend);
    let squatting = !hashed_child.is_empty()
        && hashed_child.len() <= 63
        && hashed_child
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if squatting {
        first.push(Expected::new(
            &hashed_child,
            &[("id", json!(1))],
            vec![(vec!["v".into()], json!("squatter"))],
        ));
    }
    first.push(Expected::new(
        "collide",
        &[("id", json!(1))],
        vec![
            (vec!["a b".into()], json!("spaced")),
            (vec![hashed.clone()], json!("literal")),
        ],
    ));
    let later = vec![Expected::new(
        "collide",
        &[("id", json!(2))],
        vec![(vec!["a_b".into()], json!("underscored"))],
    )];
    let nest_first = r#"{"id":1,"keys":["id"],"x y":["spaced"]}"#;
    let nest_later = r#"{"id":2,"keys":["id"],"x_y":["underscored"]}"#;

    for record in &first {
        push_bytes(
            &server,
            NAMES_CLIENT,
            &record.table,
            &key,
            record.text.as_bytes(),
        )
        .assert_created();
    }
    push_bytes(&server, NAMES_CLIENT, "nest", &key, nest_first.as_bytes()).assert_created();
    let mut seqs: HashMap<String, i64> = HashMap::new();
    for record in &first {
        for (seq, text) in direct.staged(NAMES_CLIENT, &record.table) {
            seqs.insert(text, seq);
        }
    }
    let first_load = loader_to_end(&db, "first", &["run"], Duration::from_secs(60));
    for record in &later {
        push_bytes(
            &server,
            NAMES_CLIENT,
            &record.table,
            &key,
            record.text.as_bytes(),
        )
        .assert_created();
        for (seq, text) in direct.staged(NAMES_CLIENT, &record.table) {
            seqs.insert(text, seq);
        }
    }
    push_bytes(&server, NAMES_CLIENT, "nest", &key, nest_later.as_bytes()).assert_created();
    let second_load = loader_to_end(&db, "second", &["run"], Duration::from_secs(60));

    let mut problems = Vec::new();
    for (what, out) in [("first", &first_load), ("second", &second_load)] {
        if !out.status.success() {
            problems.push(format!("{what} loader run failed: {}", out.stderr));
        }
    }
    let canary = direct.table_exists("canary");
    if !canary || direct.count("SELECT CAST(SUM(x) AS BIGINT) AS n FROM canary") != 42 {
        problems.push("the canary table was dropped or changed".to_owned());
    }
    if direct.staged_count() != 0 {
        problems.push(format!("{} records left in staging", direct.staged_count()));
    }
    for (table, seq, reason) in direct.rejected(backend, NAMES_CLIENT) {
        problems.push(format!("rejected {table}#{seq}: {}", short(&reason)));
    }
    let all: Vec<Expected> = first.into_iter().chain(later).collect();
    problems.extend(check_loaded(
        &mut direct,
        backend,
        NAMES_CLIENT,
        &all,
        &seqs,
    ));

    // The child tables of "nest": two arrays, two tables, each with its own element.
    for (array, root, element) in [("x y", 1, "spaced"), ("x_y", 2, "underscored")] {
        match direct.physical_table(backend, NAMES_CLIENT, &["nest", array]) {
            None => problems.push(format!("nest.{array}: no child table")),
            Some(physical) => {
                let rows = direct.child_values(backend, NAMES_CLIENT, &physical);
                if rows != [(root, 0, element.to_owned())] {
                    problems.push(format!("nest.{array} ({physical}): rows {rows:?}"));
                }
            }
        }
    }
    let columns = direct
        .physical_table(backend, NAMES_CLIENT, &["names"])
        .map(|p| direct.column_map(backend, NAMES_CLIENT, &p).len())
        .unwrap_or(0);
    println!(
        "hostile names ({backend:?}): {} field names, {} hostile key sets, {} records loaded \
         into {columns} columns of \"names\"; problems: {}",
        names.len() + 3,
        keyed.len() + 1,
        all.len() + 2,
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "hostile names:\n{}",
        problems.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 6. Property-based fuzzing of the request parser.

const FUZZ_CLIENT: i64 = 27;
const FUZZ_CASES: u32 = 2000;

/// A JSON value to render, with its text chosen at render time (escapes, whitespace).
#[derive(Debug, Clone)]
enum Doc {
    Null,
    Bool(bool),
    Int(i64),
    /// An integer or a number with fraction/exponent, as its literal text.
    Number(String),
    Str(String),
    Arr(Vec<Doc>),
    Obj(Vec<(String, Doc)>),
}

/// A key value that breaks the rules of docs/api.md, or a `keys` field that does.
#[derive(Debug, Clone)]
enum Flaw {
    NoKeys,
    EmptyKeys,
    KeysNotAnArray,
    NonStringName,
    NameTwice,
    NamesKeys,
    MissingField,
    Null,
    Fraction,
    Exponent,
    Object,
    Array,
    OutOfRange(String),
    LongString,
}

#[derive(Debug, Clone)]
enum KeyValue {
    Int(i64),
    Str(String),
    Bool(bool),
}

#[derive(Debug, Clone)]
struct GenRecord {
    fields: Vec<(String, Doc)>,
    keys: Vec<(String, KeyValue)>,
    flaw: Option<Flaw>,
}

#[derive(Debug, Clone)]
struct GenBody {
    records: Vec<GenRecord>,
    /// A single object instead of an array (used when there is one record).
    bare: bool,
    /// Drives the choice of whitespace, escapes and field order when rendering.
    style: u64,
}

#[derive(Debug, Clone)]
enum Mutation {
    FlipBit(Index, u8),
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
    Duplicate(Index, usize),
}

#[derive(Debug, Clone)]
enum FuzzInput {
    Document(GenBody),
    Mutated(GenBody, Vec<Mutation>),
    Bytes(Vec<u8>),
}

fn nasty_char() -> impl Strategy<Value = char> {
    prop_oneof![
        4 => proptest::char::range('a', 'z'),
        1 => Just('"'),
        1 => Just('\\'),
        1 => Just('/'),
        1 => Just('\u{0}'),
        1 => Just('\u{1f}'),
        1 => Just('\u{7f}'),
        1 => Just('é'),
        1 => Just('🙂'),
        1 => Just('\u{2028}'),
        1 => Just('\u{feff}'),
        1 => Just('\u{fffe}'),
        1 => Just(' '),
        1 => Just('\''),
        1 => Just(';'),
        2 => any::<char>(),
    ]
}

fn nasty_string(max: usize) -> impl Strategy<Value = String> {
    proptest::collection::vec(nasty_char(), 0..max).prop_map(String::from_iter)
}

fn doc() -> impl Strategy<Value = Doc> {
    let leaf = prop_oneof![
        Just(Doc::Null),
        any::<bool>().prop_map(Doc::Bool),
        any::<i64>().prop_map(Doc::Int),
        prop_oneof![
            Just("1e400".to_owned()),
            Just("-0.0".to_owned()),
            Just("123456789012345678901234567890".to_owned()),
            Just("1E-7".to_owned()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| format!("{f:e}")),
        ]
        .prop_map(Doc::Number),
        nasty_string(12).prop_map(Doc::Str),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Doc::Arr),
            proptest::collection::vec((nasty_string(8), inner), 0..5).prop_map(Doc::Obj),
        ]
    })
}

fn key_value() -> impl Strategy<Value = KeyValue> {
    prop_oneof![
        any::<i64>().prop_map(KeyValue::Int),
        Just(KeyValue::Int(i64::MIN)),
        Just(KeyValue::Int(i64::MAX)),
        nasty_string(10).prop_map(KeyValue::Str),
        any::<bool>().prop_map(KeyValue::Bool),
    ]
}

fn flaw() -> impl Strategy<Value = Flaw> {
    prop_oneof![
        Just(Flaw::NoKeys),
        Just(Flaw::EmptyKeys),
        Just(Flaw::KeysNotAnArray),
        Just(Flaw::NonStringName),
        Just(Flaw::NameTwice),
        Just(Flaw::NamesKeys),
        Just(Flaw::MissingField),
        Just(Flaw::Null),
        Just(Flaw::Fraction),
        Just(Flaw::Exponent),
        Just(Flaw::Object),
        Just(Flaw::Array),
        prop_oneof![
            Just("9223372036854775808".to_owned()),
            Just("-9223372036854775809".to_owned()),
            Just("123456789012345678901234567890".to_owned()),
        ]
        .prop_map(Flaw::OutOfRange),
        Just(Flaw::LongString),
    ]
}

fn gen_record() -> impl Strategy<Value = GenRecord> {
    (
        proptest::collection::vec((nasty_string(8), doc()), 0..6),
        proptest::collection::vec((nasty_string(6), key_value()), 1..3),
        proptest::option::weighted(0.15, flaw()),
    )
        .prop_map(|(fields, keys, flaw)| {
            // Names are distinct within a record, and none is "keys".
            let mut seen = HashSet::new();
            seen.insert("keys".to_owned());
            let keys: Vec<(String, KeyValue)> = keys
                .into_iter()
                .filter(|(n, _)| seen.insert(n.clone()))
                .collect();
            let fields = fields
                .into_iter()
                .filter(|(n, _)| seen.insert(n.clone()))
                .collect();
            // Every key name may have been "keys": fall back to one that cannot be.
            let keys = if keys.is_empty() {
                vec![("id".to_owned(), KeyValue::Int(1))]
            } else {
                keys
            };
            GenRecord { fields, keys, flaw }
        })
}

fn gen_body() -> impl Strategy<Value = GenBody> {
    (
        proptest::collection::vec(gen_record(), 1..5),
        any::<bool>(),
        any::<u64>(),
    )
        .prop_map(|(records, bare, style)| GenBody {
            bare: bare && records.len() == 1,
            records,
            style,
        })
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let snippet = prop_oneof![
        Just(b"\\ud800".to_vec()),
        Just(b"\\u0000".to_vec()),
        Just(b"\x00".to_vec()),
        Just(b"\xff".to_vec()),
        Just(b"\xc3".to_vec()),
        Just(b"\\".to_vec()),
        Just(b"\"".to_vec()),
        Just(b"[".to_vec()),
        Just(b"]".to_vec()),
        Just(b"{".to_vec()),
        Just(b"}".to_vec()),
        Just(b",".to_vec()),
        Just(b":".to_vec()),
        Just(b"1e400".to_vec()),
        Just(b"null".to_vec()),
        Just(br#""keys":[]"#.to_vec()),
        Just(br#""keys":["keys"]"#.to_vec()),
        Just(br#"{"id":1,"keys":["id"]}"#.to_vec()),
        Just(b"[".repeat(70)),
        proptest::collection::vec(any::<u8>(), 1..8),
    ];
    prop_oneof![
        (any::<Index>(), 0u8..8).prop_map(|(i, b)| Mutation::FlipBit(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        (any::<Index>(), snippet).prop_map(|(i, s)| Mutation::Insert(i, s)),
        (any::<Index>(), 1usize..16).prop_map(|(i, n)| Mutation::Delete(i, n)),
        any::<Index>().prop_map(Mutation::Truncate),
        (any::<Index>(), 1usize..32).prop_map(|(i, n)| Mutation::Duplicate(i, n)),
    ]
}

fn fuzz_input() -> impl Strategy<Value = FuzzInput> {
    prop_oneof![
        9 => gen_body().prop_map(FuzzInput::Document),
        9 => (gen_body(), proptest::collection::vec(mutation(), 1..4))
            .prop_map(|(body, mutations)| FuzzInput::Mutated(body, mutations)),
        2 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(FuzzInput::Bytes),
    ]
}

/// Deterministic choices for rendering, from a body's `style`.
struct Style(u64);

impl Style {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn chance(&mut self, in_eight: u64) -> bool {
        self.next() % 8 < in_eight
    }

    fn ws(&mut self) -> &'static str {
        const WS: [&str; 8] = ["", "", "", " ", "\n", "\t", "\r\n", "  \n "];
        WS[(self.next() % 8) as usize]
    }
}

fn render_string(s: &str, style: &mut Style) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' if style.chance(4) => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            '/' if style.chance(4) => out.push_str("\\/"),
            c if style.chance(1) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    if style.chance(4) {
                        out.push_str(&format!("\\u{unit:04X}"));
                    } else {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn render_doc(doc: &Doc, style: &mut Style) -> String {
    match doc {
        Doc::Null => "null".into(),
        Doc::Bool(b) => b.to_string(),
        Doc::Int(i) => i.to_string(),
        Doc::Number(n) => n.clone(),
        Doc::Str(s) => render_string(s, style),
        Doc::Arr(items) => {
            let parts: Vec<String> = items.iter().map(|i| render_doc(i, style)).collect();
            let sep = format!("{},{}", style.ws(), style.ws());
            format!("[{}{}{}]", style.ws(), parts.join(&sep), style.ws())
        }
        Doc::Obj(fields) => {
            let parts: Vec<String> = fields
                .iter()
                .map(|(name, value)| render_member(name, &render_doc(value, style), style))
                .collect();
            let sep = format!("{},{}", style.ws(), style.ws());
            format!("{{{}{}{}}}", style.ws(), parts.join(&sep), style.ws())
        }
    }
}

fn render_member(name: &str, value: &str, style: &mut Style) -> String {
    format!(
        "{}{}:{}{value}",
        render_string(name, style),
        style.ws(),
        style.ws()
    )
}

fn render_key_value(value: &KeyValue, style: &mut Style) -> String {
    match value {
        KeyValue::Int(i) => i.to_string(),
        KeyValue::Str(s) => render_string(s, style),
        KeyValue::Bool(b) => b.to_string(),
    }
}

/// A record's text, and whether it is valid by the rules of docs/api.md.
fn render_record(record: &GenRecord, style: &mut Style) -> (String, bool) {
    let mut members: Vec<String> = record
        .fields
        .iter()
        .map(|(name, value)| render_member(name, &render_doc(value, style), style))
        .collect();
    let names: Vec<String> = record
        .keys
        .iter()
        .map(|(n, _)| render_string(n, style))
        .collect();
    let mut key_list = format!("[{}]", names.join(","));
    let mut key_values: Vec<String> = record
        .keys
        .iter()
        .map(|(_, v)| render_key_value(v, style))
        .collect();
    let mut with_keys = true;
    let mut drop_first_field = false;
    match &record.flaw {
        None => {}
        Some(Flaw::NoKeys) => with_keys = false,
        Some(Flaw::EmptyKeys) => key_list = "[]".into(),
        Some(Flaw::KeysNotAnArray) => key_list = render_string(&record.keys[0].0, style),
        Some(Flaw::NonStringName) => key_list = format!("[{},1]", names.join(",")),
        Some(Flaw::NameTwice) => key_list = format!("[{},{}]", names.join(","), names[0]),
        Some(Flaw::NamesKeys) => key_list = format!("[{},\"keys\"]", names.join(",")),
        Some(Flaw::MissingField) => drop_first_field = true,
        Some(Flaw::Null) => key_values[0] = "null".into(),
        Some(Flaw::Fraction) => key_values[0] = "1.5".into(),
        Some(Flaw::Exponent) => key_values[0] = "1e3".into(),
        Some(Flaw::Object) => key_values[0] = "{}".into(),
        Some(Flaw::Array) => key_values[0] = "[1]".into(),
        Some(Flaw::OutOfRange(digits)) => key_values[0] = digits.clone(),
        Some(Flaw::LongString) => key_values[0] = format!("\"{}\"", "é".repeat(513)),
    }
    for (i, ((name, _), value)) in record.keys.iter().zip(&key_values).enumerate() {
        if !(drop_first_field && i == 0) {
            members.push(render_member(name, value, style));
        }
    }
    if with_keys {
        members.push(format!("\"keys\"{}:{}{key_list}", style.ws(), style.ws()));
    }
    // Any field order.
    for i in (1..members.len()).rev() {
        let j = (style.next() % (i as u64 + 1)) as usize;
        members.swap(i, j);
    }
    let sep = format!("{},{}", style.ws(), style.ws());
    let text = format!("{{{}{}{}}}", style.ws(), members.join(&sep), style.ws());
    (text, record.flaw.is_none())
}

/// The body's bytes, each record's text, and whether every record is valid.
fn render_body(body: &GenBody) -> (Vec<u8>, Vec<String>, bool) {
    let mut style = Style(body.style | 1);
    let rendered: Vec<(String, bool)> = body
        .records
        .iter()
        .map(|r| render_record(r, &mut style))
        .collect();
    let valid = rendered.iter().all(|(_, ok)| *ok);
    let texts: Vec<String> = rendered.into_iter().map(|(t, _)| t).collect();
    let text = if body.bare {
        format!("{}{}{}", style.ws(), texts[0], style.ws())
    } else {
        let sep = format!("{},{}", style.ws(), style.ws());
        format!(
            "{}[{}{}{}]{}",
            style.ws(),
            style.ws(),
            texts.join(&sep),
            style.ws(),
            style.ws()
        )
    };
    (text.into_bytes(), texts, valid)
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::FlipBit(i, bit) if len > 0 => bytes[i.index(len)] ^= 1 << bit,
            Mutation::Set(i, b) if len > 0 => bytes[i.index(len)] = *b,
            Mutation::Insert(i, snippet) => {
                let at = i.index(len + 1);
                bytes.splice(at..at, snippet.iter().copied());
            }
            Mutation::Delete(i, n) if len > 0 => {
                let at = i.index(len);
                bytes.drain(at..(at + n).min(len));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(len + 1)),
            Mutation::Duplicate(i, n) if len > 0 => {
                let at = i.index(len);
                let span: Vec<u8> = bytes[at..(at + n).min(len)].to_vec();
                bytes.splice(at..at, span);
            }
            _ => {}
        }
    }
    bytes
}

fn the_push_parser_survives_random_documents_and_mutations(backend: Backend) {
    let db = TestDb::new(backend);
    let server = Server::start(&db, &[QUIET]);
    let (_, key) = issue_key(&db, FUZZ_CLIENT, "fuzz");
    let direct = std::cell::RefCell::new(DirectDb::open(&db));
    let tried = AtomicUsize::new(0);
    let kinds: [AtomicUsize; 6] = Default::default();
    let started = Instant::now();

    let mut runner = TestRunner::new(Config {
        cases: FUZZ_CASES,
        failure_persistence: None,
        rng_seed: RngSeed::Fixed(0x1a7a_4e00_f022),
        // ChaCha is slow unoptimised; the seed only needs to be reproducible.
        rng_algorithm: RngAlgorithm::XorShift,
        max_shrink_iters: 256,
        max_shrink_time: 30_000,
        source_file: None,
        ..Config::default()
    });
    let result = runner.run(&fuzz_input(), |input| {
        let n = tried.fetch_add(1, Ordering::Relaxed);
        let table = format!("fz{n}");
        let (body, expected_records, must_be_created) = match &input {
            FuzzInput::Document(body) => {
                let (bytes, texts, valid) = render_body(body);
                (bytes, Some(texts), Some(valid))
            }
            FuzzInput::Mutated(body, mutations) => {
                (mutate(render_body(body).0, mutations), None, None)
            }
            FuzzInput::Bytes(bytes) => (bytes.clone(), None, None),
        };
        let reply = push_bytes(&server, FUZZ_CLIENT, &table, &key, &body);
        let kind = match (&input, reply.status) {
            (FuzzInput::Document(_), 201) => 0,
            (FuzzInput::Document(_), _) => 1,
            (FuzzInput::Mutated(..), 201) => 2,
            (FuzzInput::Mutated(..), _) => 3,
            (FuzzInput::Bytes(_), 201) => 4,
            (FuzzInput::Bytes(_), _) => 5,
        };
        kinds[kind].fetch_add(1, Ordering::Relaxed);
        prop_assert!(
            reply.status == 201 || (400..500).contains(&reply.status),
            "status {} for {:?}: {}",
            reply.status,
            String::from_utf8_lossy(&body),
            reply.text
        );
        if let Some(valid) = must_be_created {
            prop_assert_eq!(
                reply.status == 201,
                valid,
                "{}: {}",
                String::from_utf8_lossy(&body),
                reply.text
            );
            if !valid {
                prop_assert_eq!(reply.status, 400, "{}", reply.text);
            }
        }
        if reply.status == 201 {
            let sent = expected_records.unwrap_or_else(|| split_records(&body));
            prop_assert_eq!(reply.assert_created(), sent.len() as u64);
            let staged: Vec<String> = direct
                .borrow_mut()
                .staged(FUZZ_CLIENT, &table)
                .into_iter()
                .map(|(_, r)| r)
                .collect();
            prop_assert_eq!(staged, sent, "staged records differ from the records sent");
        } else {
            reply.assert_error(reply.status);
        }
        Ok(())
    });
    let count = |i: usize| kinds[i].load(Ordering::Relaxed);
    println!(
        "fuzz ({backend:?}): {} inputs tried in {:.1}s: generated documents {} created / {} \
         refused, mutated bodies {} created / {} refused, random bytes {} created / {} refused",
        tried.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64(),
        count(0),
        count(1),
        count(2),
        count(3),
        count(4),
        count(5)
    );
    if let Err(failure) = result {
        panic!("{failure}");
    }
}
