//! `intake-bench <scenario>`: sets up a fresh database, runs the scenario, prints its figures
//! beside a baseline measured in the same invocation, and tears everything down.
//!
//! Scenarios: `load` (staged → warehouse). Run with `cargo run --release -p intake-bench -- load`.

mod binaries;
mod data;
mod fresh_db;
mod fsync_probe;
mod http_load;
mod ingest;
mod measure;
mod server_child;

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use intake_core::db::DbConn;
use intake_core::staging::{self, StagedBatch};

use crate::fresh_db::FreshDb;

#[derive(Parser)]
#[command(
    name = "intake-bench",
    about = "Intake benchmarks, each with a same-run baseline"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Backend {
    Postgres,
    Sqlite,
    Both,
}

#[derive(Subcommand)]
enum Scenario {
    /// Staged → warehouse with flattening, child tables and upserts, against a hand-written
    /// set-based SQL load of the same records into one typed table.
    Load {
        #[arg(long, value_enum, default_value = "both")]
        backend: Backend,
        /// Records to stage (about 20% are updates of earlier keys).
        #[arg(long, default_value_t = 200_000)]
        records: usize,
        /// Records per loader chunk; default: the loader's for the backend (20000 on
        /// PostgreSQL, 5000 on SQLite).
        #[arg(long)]
        chunk_size: Option<usize>,
        /// PostgreSQL connections writing each chunk (loader.writers; SQLite has one).
        #[arg(long, default_value_t = 2)]
        writers: usize,
    },
    /// HTTP pushes of 100-record requests at a fixed concurrency, counting only 201s, against
    /// COPY (PostgreSQL) or one bulk transaction (SQLite) of the same records.
    Ingest {
        #[arg(long, value_enum, default_value = "both")]
        backend: Backend,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Records/s of the paced run, which measures latency at a fixed rate.
        #[arg(long, default_value_t = 50_000.0)]
        paced_records: f64,
    },
    /// Authenticate requests/s with a warm key cache against GET /health, and a cold key's cost.
    Auth {
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
}

fn main() -> ExitCode {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("intake-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.scenario {
        Scenario::Load {
            backend,
            records,
            chunk_size,
            writers,
        } => {
            print_machine(backend != Backend::Sqlite);
            for b in [Backend::Postgres, Backend::Sqlite] {
                if backend == b || backend == Backend::Both {
                    let chunk_size = chunk_size.unwrap_or_else(|| {
                        intake_core::settings::default_chunk_size(b == Backend::Sqlite)
                    });
                    load_scenario(b, records, chunk_size, writers)?;
                }
            }
            Ok(())
        }
        Scenario::Ingest {
            backend,
            connections,
            seconds,
            batch,
            paced_records,
        } => {
            print_machine(backend != Backend::Sqlite);
            for b in [Backend::Postgres, Backend::Sqlite] {
                if backend == b || backend == Backend::Both {
                    ingest::ingest(
                        b == Backend::Postgres,
                        connections,
                        seconds,
                        batch,
                        paced_records,
                    )?;
                }
            }
            Ok(())
        }
        Scenario::Auth {
            connections,
            seconds,
        } => {
            print_machine(false);
            ingest::auth(connections, seconds)
        }
    }
}

/// The machine, and with `postgres` the PostgreSQL server's version and settings.
fn print_machine(postgres: bool) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {cores} cores, {cpu}");
    if postgres {
        match fresh_db::pg_server_line() {
            Ok(line) => println!("{line}"),
            Err(e) => println!("PostgreSQL: settings not read ({e:#})"),
        }
    }
}

const CLIENT: i64 = 1;
const TABLE: &str = "orders";

fn load_scenario(
    backend: Backend,
    records: usize,
    chunk_size: usize,
    writers: usize,
) -> anyhow::Result<()> {
    let name = if backend == Backend::Postgres {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let db = FreshDb::create(backend == Backend::Postgres)?;
    let pool = db.pool()?;
    let mut conn = pool.get()?;
    let mut generator = data::Generator::new();
    let mut bytes = 0usize;
    let mut staged = 0usize;
    while staged < records {
        let batch = generator.records((records - staged).min(1000));
        bytes += batch.iter().map(String::len).sum::<usize>();
        let refs: Vec<&str> = batch.iter().map(String::as_str).collect();
        staging::append(
            &mut conn,
            &StagedBatch {
                client_id: CLIENT,
                table: TABLE,
                received_at: intake_core::timestamps::now(),
                records: &refs,
                stitch: None,
            },
        )?;
        staged += batch.len();
    }
    exec(
        &mut conn,
        "CREATE TABLE bench_source AS SELECT * FROM staged_records",
    )?;
    println!(
        "\nload on {name}: {staged} records staged ({} bytes a record on average), chunk {chunk_size}{}",
        bytes / staged.max(1),
        if backend == Backend::Postgres {
            format!(", {writers} writers")
        } else {
            String::new()
        }
    );

    // The baseline runs once before the loader and once after it, and the loader is compared
    // with their mean: this machine's speed drifts by a quarter within minutes, and a single
    // baseline run on either side made the ratio swing with it.
    let baseline_before = run_baseline(&mut conn, backend)?;
    // Gone before the loader starts, so that no autovacuum of it runs meanwhile.
    exec(&mut conn, "DROP TABLE baseline_orders")?;

    // The real intake-loader binary, so that its time, CPU and peak memory are its own.
    let children_cpu_before = measure::ended_children_cpu_ms();
    let started = Instant::now();
    let mut child = binaries::command("intake-loader")?
        .arg("run")
        .env("DATABASE_URL", db.url())
        .env("INTAKE__LOADER__CHUNK_SIZE", chunk_size.to_string())
        .env("INTAKE__LOADER__WRITERS", writers.to_string())
        .env(
            "RUST_LOG",
            std::env::var("INTAKE_BENCH_LOADER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .spawn()
        .context("starting intake-loader")?;
    let pid = child.id();
    let (mut peak_kib, mut loader_cpu_ms) = (0u64, 0u64);
    let mut database_cpu = db.pg_name().map(measure::DatabaseCpu::start);
    // Waited for on a thread of its own, so that the loader's time ends when it exits, not
    // at the next sample (which added 10 ms on average, half a percent of a load).
    let (exited, exit) = std::sync::mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait();
        let _ = exited.send(());
        status
    });
    loop {
        peak_kib = peak_kib.max(measure::vm_hwm_kib(pid).unwrap_or(0));
        loader_cpu_ms = loader_cpu_ms.max(measure::cpu_ms_of(&pid.to_string()).unwrap_or(0));
        if let Some(tally) = database_cpu.as_mut() {
            tally.sample();
        }
        match exit.recv_timeout(Duration::from_millis(20)) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => break,
        }
    }
    let loader_secs = started.elapsed().as_secs_f64();
    let status = waiter
        .join()
        .map_err(|_| anyhow::anyhow!("waiting for intake-loader panicked"))??;
    if let (Some(before), Some(after)) = (children_cpu_before, measure::ended_children_cpu_ms()) {
        loader_cpu_ms = loader_cpu_ms.max(after.saturating_sub(before));
    }
    if !status.success() {
        bail!("intake-loader failed ({status})");
    }
    let rows = count(
        &mut conn,
        &format!("SELECT COUNT(*) AS n FROM {}", table_ref(backend, TABLE)),
    )?;
    let distinct = rows;

    let baseline_after = run_baseline(&mut conn, backend)?;
    for (rows, when) in [(baseline_before.1, "before"), (baseline_after.1, "after")] {
        if rows != distinct {
            bail!(
                "loader wrote {distinct} rows but the baseline {rows} ({when} it): the runs disagree"
            );
        }
    }
    let loader_rate = staged as f64 / loader_secs;
    let baseline_rates = [baseline_before.0, baseline_after.0].map(|secs| staged as f64 / secs);
    let baseline_rate = (baseline_rates[0] + baseline_rates[1]) / 2.0;
    println!(
        "  {:<42} {:>7.2} s {:>9.0} records/s   loader CPU {:.2} s, peak RSS {} MiB",
        "intake-loader (flatten, children, upsert)",
        loader_secs,
        loader_rate,
        loader_cpu_ms as f64 / 1000.0,
        peak_kib / 1024
    );
    // CPU per record: steadier than the rate on a busy machine, and it shows which side
    // (the loader or the database) a change saved.
    let per_record_us = |ms: u64| ms as f64 * 1000.0 / staged as f64;
    match database_cpu.map(|t| t.used_ms()).filter(|ms| *ms > 0) {
        Some(pg_ms) => println!(
            "  {:<42} loader {:.1} + PostgreSQL {:.1} µs a record",
            "CPU",
            per_record_us(loader_cpu_ms),
            per_record_us(pg_ms)
        ),
        None => println!(
            "  {:<42} loader {:.1} µs a record",
            "CPU",
            per_record_us(loader_cpu_ms)
        ),
    }
    for ((secs, _), (rate, when)) in [baseline_before, baseline_after]
        .iter()
        .zip(baseline_rates.iter().zip(["before", "after"]))
    {
        println!(
            "  {:<42} {:>7.2} s {:>9.0} records/s",
            format!("baseline (set-based SQL, 1 table), {when}"),
            secs,
            rate
        );
    }
    println!(
        "  ratio: {:.2}x baseline (their mean, {:.0} records/s); {rows} distinct keys loaded",
        loader_rate / baseline_rate,
        baseline_rate
    );
    Ok(())
}

fn table_ref(backend: Backend, table: &str) -> String {
    match backend {
        Backend::Postgres => format!("client_{CLIENT}.{table}"),
        _ => format!("client_{CLIENT}__{table}"),
    }
}

/// One run of the baseline into a new `baseline_orders`: its seconds and the rows it left.
fn run_baseline(conn: &mut DbConn, backend: Backend) -> anyhow::Result<(f64, i64)> {
    exec(conn, "DROP TABLE IF EXISTS baseline_orders")?;
    exec(conn, &baseline_ddl(backend))?;
    let started = Instant::now();
    exec(conn, &baseline_load(backend))?;
    let secs = started.elapsed().as_secs_f64();
    let rows = count(conn, "SELECT COUNT(*) AS n FROM baseline_orders")?;
    Ok((secs, rows))
}

/// Baseline: one hand-written set-based statement into one typed table.
fn baseline_ddl(backend: Backend) -> String {
    let (ts, f) = if backend == Backend::Postgres {
        ("timestamptz", "double precision")
    } else {
        ("TEXT", "REAL")
    };
    format!(
        "CREATE TABLE baseline_orders (id bigint PRIMARY KEY, customer__name text, customer__email text, \
         customer__address__city text, customer__address__zip text, status text, total {f}, quantity bigint, \
         gift boolean, created_at {ts}, note text, seq bigint NOT NULL)"
    )
}

fn baseline_load(backend: Backend) -> String {
    let update = "ON CONFLICT (id) DO UPDATE SET customer__name = excluded.customer__name, \
        customer__email = excluded.customer__email, customer__address__city = excluded.customer__address__city, \
        customer__address__zip = excluded.customer__address__zip, status = excluded.status, total = excluded.total, \
        quantity = excluded.quantity, gift = excluded.gift, created_at = excluded.created_at, note = excluded.note, \
        seq = excluded.seq WHERE baseline_orders.seq < excluded.seq";
    match backend {
        Backend::Postgres => format!(
            "INSERT INTO baseline_orders SELECT DISTINCT ON (id) * FROM ( \
               SELECT (r->>'id')::bigint AS id, r#>>'{{customer,name}}', r#>>'{{customer,email}}', \
                 r#>>'{{customer,address,city}}', r#>>'{{customer,address,zip}}', r->>'status', (r->>'total')::float8, \
                 (r->>'quantity')::bigint, (r->>'gift')::boolean, (r->>'created_at')::timestamptz, r->>'note', seq \
               FROM (SELECT seq, record::jsonb AS r FROM bench_source OFFSET 0) s) x \
             ORDER BY id, seq DESC {update}"
        ),
        _ => format!(
            "INSERT INTO baseline_orders SELECT json_extract(record, '$.id'), json_extract(record, '$.customer.name'), \
               json_extract(record, '$.customer.email'), json_extract(record, '$.customer.address.city'), \
               json_extract(record, '$.customer.address.zip'), json_extract(record, '$.status'), \
               json_extract(record, '$.total'), json_extract(record, '$.quantity'), json_extract(record, '$.gift'), \
               json_extract(record, '$.created_at'), json_extract(record, '$.note'), seq \
             FROM bench_source WHERE seq IN (SELECT MAX(seq) FROM bench_source GROUP BY json_extract(record, '$.id')) \
             ORDER BY seq {update}"
        ),
    }
}

#[derive(diesel::QueryableByName)]
struct Count {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    n: i64,
}

fn exec(conn: &mut DbConn, sql: &str) -> anyhow::Result<()> {
    use diesel::RunQueryDsl;
    match conn {
        DbConn::Pg(c) => diesel::sql_query(sql).execute(&mut **c)?,
        DbConn::Sqlite(c) => diesel::sql_query(sql).execute(&mut **c)?,
    };
    Ok(())
}

fn count(conn: &mut DbConn, sql: &str) -> anyhow::Result<i64> {
    use diesel::RunQueryDsl;
    let row: Count = match conn {
        DbConn::Pg(c) => diesel::sql_query(sql).get_result(&mut **c)?,
        DbConn::Sqlite(c) => diesel::sql_query(sql).get_result(&mut **c)?,
    };
    Ok(row.n)
}
