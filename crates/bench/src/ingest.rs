//! The `ingest` and `auth` scenarios: HTTP against a real server process.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use diesel::RunQueryDsl;
use diesel::pg::CopyFormat;
use intake_core::db::DbConn;
use intake_core::key_store;
use intake_core::keys;
use intake_core::staging::{self, StagedBatch};

use crate::data::Generator;
use crate::fresh_db::FreshDb;
use crate::fsync_probe::FsyncProbe;
use crate::http_load::{self, Request};
use crate::server_child::ServerChild;

const CLIENT: i64 = 1;

diesel::table! {
    /// Same columns as staging, for the COPY baseline.
    bench_copy (client_id, table_name, seq) {
        client_id -> Int8,
        table_name -> Text,
        seq -> Int8,
        received_at -> Timestamptz,
        record -> Text,
    }
}

/// Issues a key straight into the database (what `intake-key-admin issue` does).
pub fn issue_key(conn: &mut DbConn) -> anyhow::Result<String> {
    let key = keys::generate_key()?;
    key_store::insert_key(conn, &key, CLIENT, "bench")?;
    Ok(key.api_key)
}

/// `ingest`: records/s committed and latency for 100-record pushes at a fixed concurrency,
/// against the storage's own bulk-write speed for the same records.
pub fn ingest(
    postgres: bool,
    connections: usize,
    seconds: u64,
    batch: usize,
    paced_records: f64,
) -> anyhow::Result<()> {
    let name = if postgres { "PostgreSQL" } else { "SQLite" };
    let db = FreshDb::create(postgres)?;
    let pool = db.pool()?;
    let key = issue_key(&mut pool.get()?)?;
    let mut generator = Generator::new();
    let bodies: Vec<Vec<String>> = (0..2000).map(|_| generator.records(batch)).collect();
    let server = ServerChild::start(db.url())?;
    let url = format!(
        "{}/v2/client/{CLIENT}/table/events/data?apikey={key}",
        server.base_url
    );
    let requests: Vec<Request> = bodies
        .iter()
        .map(|records| Request::Post {
            url: url.clone(),
            body: Arc::new(format!("[{}]", records.join(","))),
        })
        .collect();
    // The paced run first, on a fresh database: the ceiling run writes far more, and the
    // checkpoints that follow it would otherwise land in the paced run's latencies.
    let pace = Some(paced_records / batch as f64);
    // One untimed second first: every connection's first request waited for the key's first
    // verification (argon2, about 35 ms, which `auth` reports on its own), and those few
    // dozen cold requests alone made the paced p99.
    http_load::run(connections, Duration::from_secs(1), &requests, 201, pace);
    // The disk's own commit latency over the same seconds (see `fsync_probe`).
    let probe = db.log_dir().map(|dir| FsyncProbe::start(&dir));
    let mut paced = http_load::run(
        connections,
        Duration::from_secs(seconds),
        &requests,
        201,
        pace,
    );
    let disk = match probe {
        Some(Ok(probe)) => probe.finish().map_err(|e| e.to_string()),
        Some(Err(e)) => Err(e.to_string()),
        None => Err("the database's directory is not on this machine, or not readable".into()),
    };
    let mut result = http_load::run(
        connections,
        Duration::from_secs(seconds),
        &requests,
        201,
        None,
    );
    let acknowledged = result.ok() * batch;
    let rate = acknowledged as f64 / result.elapsed.as_secs_f64();
    let (p50, p99) = (result.quantile(0.5), result.quantile(0.99));
    let paced_rate = (paced.ok() * batch) as f64 / paced.elapsed.as_secs_f64();
    let (paced_p50, paced_p99) = (paced.quantile(0.5), paced.quantile(0.99));
    let acknowledged = acknowledged + paced.ok() * batch;
    let rss = server.peak_rss_mib();
    drop(server);
    let staged = staged_count(&mut pool.get()?)?;
    if staged < acknowledged as i64 {
        bail!("{acknowledged} records were acknowledged but only {staged} are in staging");
    }

    // Baseline: the same records written by the storage's own bulk path.
    let all: Vec<&str> = bodies.iter().flatten().map(String::as_str).collect();
    let baseline_db = FreshDb::create(postgres)?;
    let mut conn = baseline_db.pool()?.get()?;
    let started = Instant::now();
    match &mut conn {
        DbConn::Pg(c) => {
            diesel::sql_query(
                "CREATE TABLE bench_copy (client_id bigint NOT NULL, table_name text NOT NULL, seq bigint NOT NULL, \
                 received_at timestamptz NOT NULL, record text NOT NULL, PRIMARY KEY (client_id, table_name, seq))",
            )
            .execute(&mut **c)?;
            let now = chrono::Utc::now().to_rfc3339();
            let copy = diesel::copy_from(bench_copy::table)
                .from_raw_data(bench_copy::table, |out| {
                    for (i, record) in all.iter().enumerate() {
                        writeln!(
                            out,
                            "{CLIENT}\tevents\t{}\t{now}\t{}",
                            i + 1,
                            copy_escape(record)
                        )
                        .map_err(|e| diesel::result::Error::SerializationError(Box::new(e)))?;
                    }
                    Ok::<_, diesel::result::Error>(())
                })
                .with_format(CopyFormat::Text);
            diesel::ExecuteCopyFromDsl::execute(copy, &mut **c)?;
        }
        DbConn::Sqlite(_) => {
            staging::append(
                &mut conn,
                &StagedBatch {
                    client_id: CLIENT,
                    table: "events",
                    received_at: intake_core::timestamps::now(),
                    records: &all,
                    stitch: None,
                },
            )?;
        }
    }
    let baseline_rate = all.len() as f64 / started.elapsed().as_secs_f64();
    let baseline_name = if postgres {
        "COPY of the same records"
    } else {
        "one bulk transaction"
    };
    println!(
        "\ningest on {name}: {batch}-record requests, {connections} connections, {seconds} s \
         ({} bytes a request on average)",
        requests
            .iter()
            .map(|r| if let Request::Post { body, .. } = r {
                body.len()
            } else {
                0
            })
            .sum::<usize>()
            / requests.len().max(1)
    );
    println!(
        "  {:<34} {:>9.0} records/s  ({} requests ok, {} not: {:?})  p50 {:.1} ms  p99 {:.1} ms  server peak RSS {rss} MiB",
        "intake-server (201 = committed)",
        rate,
        result.ok(),
        result.failures,
        result.statuses,
        p50.as_secs_f64() * 1000.0,
        p99.as_secs_f64() * 1000.0
    );
    println!(
        "  {:<34} {:>9.0} records/s  ({} requests ok, {} not: {:?})  p50 {:.1} ms  p99 {:.1} ms",
        format!("paced at {paced_records:.0} records/s"),
        paced_rate,
        paced.ok(),
        paced.failures,
        paced.statuses,
        paced_p50.as_secs_f64() * 1000.0,
        paced_p99.as_secs_f64() * 1000.0
    );
    match disk {
        Ok(mut latencies) => {
            // A stall holds up every commit waiting behind it, so its length counts more
            // than its share of the samples: a 200 ms stall is one sample in a thousand
            // but delays every request that arrives during it.
            let stalls = latencies
                .iter()
                .filter(|l| **l >= Duration::from_millis(50));
            let stall_count = stalls.clone().count();
            let stalled_ms = stalls.sum::<Duration>().as_secs_f64() * 1000.0;
            let mut ms = |q| http_load::quantile(&mut latencies, q).as_secs_f64() * 1000.0;
            println!(
                "  {:<34} {:>9} p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms; {} stalls of 50 ms or more, {stalled_ms:.0} ms in all (8 KiB + fdatasync beside the log, every 10 ms)",
                "the disk's own fsync, while paced",
                "",
                ms(0.5),
                ms(0.99),
                ms(1.0),
                stall_count,
            );
        }
        Err(why) => println!("  the disk's own fsync was not measured: {why}"),
    }
    println!(
        "  {:<34} {:>9.0} records/s  ({} records)",
        format!("baseline ({baseline_name})"),
        baseline_rate,
        all.len()
    );
    println!(
        "  ratio: {:.2}x baseline; staging holds {staged} records",
        rate / baseline_rate
    );
    Ok(())
}

/// `auth`: authenticate requests/s with a warm key cache, against `GET /health` (the HTTP
/// floor) in the same run; and the cost of a key's first use (argon2).
pub fn auth(connections: usize, seconds: u64) -> anyhow::Result<()> {
    let db = FreshDb::create(false)?;
    let pool = db.pool()?;
    let mut conn = pool.get()?;
    let key = issue_key(&mut conn)?;
    let cold_keys: Vec<String> = (0..10)
        .map(|_| issue_key(&mut conn))
        .collect::<Result<_, _>>()?;
    drop(conn);
    let server = ServerChild::start(db.url())?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .proxy(None)
        .build()
        .into();
    let mut cold = Vec::new();
    for k in &cold_keys {
        let started = Instant::now();
        let status = agent
            .get(&format!(
                "{}/v2/client/{CLIENT}/authenticate?apikey={k}",
                server.base_url
            ))
            .call()?
            .status();
        if status != 200 {
            bail!("a fresh key was refused ({status})");
        }
        cold.push(started.elapsed());
    }
    let mut warm_again = Vec::new();
    for k in &cold_keys {
        let started = Instant::now();
        agent
            .get(&format!(
                "{}/v2/client/{CLIENT}/authenticate?apikey={k}",
                server.base_url
            ))
            .call()?;
        warm_again.push(started.elapsed());
    }
    let auth_url = format!(
        "{}/v2/client/{CLIENT}/authenticate?apikey={key}",
        server.base_url
    );
    let mut warm = http_load::run(
        connections,
        Duration::from_secs(seconds),
        &[Request::Get(auth_url)],
        200,
        None,
    );
    let mut floor = http_load::run(
        connections,
        Duration::from_secs(seconds),
        &[Request::Get(format!("{}/health", server.base_url))],
        200,
        None,
    );
    let warm_rate = warm.ok() as f64 / warm.elapsed.as_secs_f64();
    let floor_rate = floor.ok() as f64 / floor.elapsed.as_secs_f64();
    let mean = |d: &[Duration]| {
        d.iter().map(Duration::as_secs_f64).sum::<f64>() / d.len().max(1) as f64 * 1000.0
    };
    println!("\nauth: {connections} connections, {seconds} s each");
    println!(
        "  {:<34} {:>9.0} requests/s  p99 {:.1} ms ({} failed)",
        "authenticate, warm key cache",
        warm_rate,
        warm.quantile(0.99).as_secs_f64() * 1000.0,
        warm.failures
    );
    println!(
        "  {:<34} {:>9.0} requests/s  p99 {:.1} ms",
        "baseline: GET /health",
        floor_rate,
        floor.quantile(0.99).as_secs_f64() * 1000.0
    );
    println!("  ratio: {:.2}x baseline", warm_rate / floor_rate);
    println!(
        "  a key's first use (argon2 verify + lookup): {:.1} ms mean over {}; its second use {:.2} ms",
        mean(&cold),
        cold.len(),
        mean(&warm_again)
    );
    Ok(())
}

fn copy_escape(text: &str) -> String {
    text.replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn staged_count(conn: &mut DbConn) -> anyhow::Result<i64> {
    let sql = "SELECT COUNT(*) AS n FROM staged_records";
    let row: Count = match conn {
        DbConn::Pg(c) => diesel::sql_query(sql).get_result(&mut **c)?,
        DbConn::Sqlite(c) => diesel::sql_query(sql).get_result(&mut **c)?,
    };
    Ok(row.n)
}
