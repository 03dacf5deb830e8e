//! The `intake-loader` command line: `run`, `watch` and `status`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use intake_core::db::{self, DatabaseTarget, DbPool};
use intake_core::settings::Settings;

use crate::pass::{Event, PassReport, conn_of, run_pass};
use crate::pg_settings;
use crate::queue::ChunkLimits;

#[derive(Parser)]
#[command(
    name = "intake-loader",
    version,
    about = "Load staged records into warehouse tables"
)]
struct Cli {
    /// Configuration file (TOML), layered over config/default.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load everything pending once, then exit (non-zero if anything could not be loaded).
    Run {
        /// Staged records per chunk (transaction); default from loader.chunk_size, else
        /// 10000 on PostgreSQL and 5000 on SQLite.
        #[arg(long)]
        chunk_size: Option<usize>,
    },
    /// Run passes until stopped (SIGTERM / Ctrl-C finish the current chunk first).
    Watch {
        /// Pause between passes, e.g. 30s, 5m, 1h; default from loader.interval_secs.
        #[arg(long, value_parser = parse_interval)]
        interval: Option<Duration>,
        /// Staged records per chunk, as for `run`.
        #[arg(long)]
        chunk_size: Option<usize>,
    },
    /// Show pending records, recent loads and rejected-record counts.
    Status {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
}

fn parse_interval(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(
        text.find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len()),
    );
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 5m or 1h"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{text:?} is not a duration like 30s, 5m or 1h")),
    };
    if secs == 0 {
        return Err("the interval must be at least 1s".into());
    }
    Ok(Duration::from_secs(secs))
}

/// Entry point of the `intake-loader` binary.
pub fn main() -> ExitCode {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .try_init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("intake-loader: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let settings = Settings::load(cli.config.as_deref())?;
    let target = DatabaseTarget::parse(&settings.database.url)?;
    if settings.database.migrate_on_start {
        db::run_migrations(&target, &settings.database)?;
    }
    let pool = DbPool::sized(&target, &settings.database, settings.loader.connections())?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    match cli.command {
        Command::Run { chunk_size } => {
            advise_on_settings(&pool);
            let limits = chunk_limits(&settings, chunk_size, pool.is_sqlite());
            let report = one_pass(&pool, limits, &stop)?;
            Ok(exit_code(&report))
        }
        Command::Watch {
            interval,
            chunk_size,
        } => {
            let interval =
                interval.unwrap_or(Duration::from_secs(settings.loader.interval_secs.max(1)));
            let limits = chunk_limits(&settings, chunk_size, pool.is_sqlite());
            log::info!("watching: a pass every {}s", interval.as_secs());
            advise_on_settings(&pool);
            while !stop.load(Ordering::Relaxed) {
                match one_pass(&pool, limits, &stop) {
                    Ok(_) => {}
                    Err(e) => log::error!("pass failed: {e:#}"),
                }
                let resume = Instant::now() + interval;
                while Instant::now() < resume && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
            log::info!("stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { json } => {
            print_status(&pool, json)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Says, once, which PostgreSQL settings would slow the load of a large backlog (see
/// [`pg_settings`]). A database that cannot be asked now is the pass's to report.
fn advise_on_settings(pool: &DbPool) {
    let Ok(mut db) = pool.get() else {
        return;
    };
    match pg_settings::advice(&mut conn_of(&mut db)) {
        Ok(lines) => lines.iter().for_each(|line| log::info!("{line}")),
        Err(e) => log::debug!("could not read PostgreSQL's settings: {e}"),
    }
}

fn exit_code(report: &PassReport) -> ExitCode {
    if report.errors().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The chunk limits the settings give, with `--chunk-size` in place of `loader.chunk_size` if given.
fn chunk_limits(settings: &Settings, chunk_size: Option<usize>, sqlite: bool) -> ChunkLimits {
    let limits = ChunkLimits::from_settings(&settings.loader, sqlite);
    ChunkLimits {
        records: chunk_size.map_or(limits.records, |n| n.max(1)),
        ..limits
    }
}

/// One pass with a progress bar on a terminal, plain log lines otherwise.
fn one_pass(pool: &DbPool, limits: ChunkLimits, stop: &AtomicBool) -> anyhow::Result<PassReport> {
    let started = Instant::now();
    let bar = std::io::stderr().is_terminal().then(|| {
        let total = intake_core::staging::pending_counts(&mut pool.get().ok()?)
            .ok()
            .map(|c| c.iter().map(|p| p.pending as u64).sum::<u64>())?;
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} records {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Some(bar)
    });
    let bar = bar.flatten();
    let report = run_pass(pool, limits, stop, &mut |event| match event {
        Event::TableStarted { client_id, table } => {
            if let Some(bar) = &bar {
                bar.set_message(format!("client {client_id} / {table}"));
            }
        }
        Event::Chunk { records } => {
            if let Some(bar) = &bar {
                bar.inc(records as u64);
            }
        }
        Event::TableFinished(t) => {
            let line = match (&t.error, t.skipped_busy) {
                (Some(e), _) => format!("client {} table {}: FAILED: {e}", t.client_id, t.table),
                (None, true) => format!(
                    "client {} table {}: skipped (another loader has it)",
                    t.client_id, t.table
                ),
                (None, false) => format!(
                    "client {} table {}: loaded {} records, rejected {}",
                    t.client_id, t.table, t.loaded, t.rejected
                ),
            };
            match &bar {
                Some(bar) => bar.println(line),
                None => log::info!("{line}"),
            }
        }
    })?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    let errors = report.errors();
    log::info!(
        "pass done in {:.1}s: loaded {} records, rejected {}, {} tables, {} failed",
        started.elapsed().as_secs_f64(),
        report.loaded(),
        report.rejected(),
        report.tables.len(),
        errors.len()
    );
    for e in &errors {
        log::error!("{e}");
    }
    Ok(report)
}

fn print_status(pool: &DbPool, as_json: bool) -> anyhow::Result<()> {
    let mut db = pool.get()?;
    let status = crate::status::status(&mut db).context("reading status")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&status)?);
        return Ok(());
    }
    println!("Pending records:");
    if status.pending.is_empty() {
        println!("  none");
    }
    for p in &status.pending {
        println!(
            "  client {:>8}  {:<40} {:>10}",
            p.client_id, p.table_name, p.pending
        );
    }
    println!("Recent loads:");
    if status.recent_loads.is_empty() {
        println!("  none");
    }
    for l in &status.recent_loads {
        println!(
            "  client {:>8}  {:<30} {}  {:>8} loaded {:>6} rejected {:>7} ms{}",
            l.client_id,
            l.table_name,
            l.started_at,
            l.records_loaded,
            l.records_rejected,
            l.duration_ms,
            l.error
                .as_deref()
                .map(|e| format!("  ERROR: {e}"))
                .unwrap_or_default()
        );
    }
    println!("Rejected records:");
    if status.rejected.is_empty() {
        println!("  none");
    }
    for r in &status.rejected {
        println!(
            "  client {:>8}  {:<40} {:>10}",
            r.client_id, r.table_name, r.rejected
        );
    }
    Ok(())
}
