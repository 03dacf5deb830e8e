//! `intake-server`: the HTTP ingest server (RJMetrics Data Import API v2 compatible).

pub mod access_log;
pub mod app;
pub mod auth;
pub mod db_gate;
pub mod errors;
pub mod group_commit;
pub mod health;
pub mod ingest;
pub mod rate_limit;
pub mod stitch;
pub mod stitch_body;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use actix_web::{App, HttpServer, middleware, web};
use anyhow::Context;
use clap::{Parser, Subcommand};
use intake_core::db::{self, DatabaseTarget, DbPool};
use intake_core::settings::{EmbeddedLoader, Settings};

use crate::app::AppState;
use crate::auth::KeyVerifier;
use crate::db_gate::DbGate;
use crate::group_commit::GroupCommitter;
use crate::rate_limit::RateLimiter;

#[derive(Parser)]
#[command(name = "intake-server", version, about = "Intake's HTTP ingest server")]
struct Cli {
    /// Configuration file (TOML), layered over config/default.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
}

/// Entry point of the `intake-server` binary.
pub fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let outcome = Settings::load(cli.config.as_deref()).and_then(|settings| match cli.command {
        Some(Command::Migrate) => {
            let target = DatabaseTarget::parse(&settings.database.url)?;
            db::run_migrations(&target, &settings.database)?;
            log::info!("migrations applied to {}", target.redacted());
            Ok(())
        }
        None | Some(Command::Serve) => serve(settings),
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("{e:#}");
            eprintln!("intake-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr at `info` unless `RUST_LOG` says otherwise.
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("info,actix_server=warn"),
    )
    .try_init();
}

/// Runs the server with the given settings until it is stopped (SIGTERM / Ctrl-C).
pub fn serve(settings: Settings) -> anyhow::Result<()> {
    let target = DatabaseTarget::parse(&settings.database.url)?;
    if settings.database.migrate_on_start {
        db::run_migrations(&target, &settings.database)?;
    }
    let pool = DbPool::new(&target, &settings.database)?;
    let embedded = match settings.loader.embedded {
        EmbeddedLoader::On => true,
        EmbeddedLoader::Off => false,
        EmbeddedLoader::Auto => target.is_sqlite(),
    };
    if embedded {
        let loader_pool =
            DbPool::sized(&target, &settings.database, settings.loader.connections())?;
        let every = Duration::from_secs(settings.loader.embedded_interval_secs.max(1));
        let limits =
            intake_loader::queue::ChunkLimits::from_settings(&settings.loader, target.is_sqlite());
        intake_loader::embedded::spawn(loader_pool, every, limits)?;
        log::info!(
            "in-process loader: a pass every {}s (loader.embedded)",
            every.as_secs()
        );
    }
    // Staging writes go through the group committer; a couple of connections stay free for
    // key lookups and readiness checks. SQLite has one writer at a time anyway: more writer
    // threads would only take turns through its busy handler's sleeps.
    let writers = if target.is_sqlite() {
        1
    } else {
        (settings.database.pool_size as usize)
            .saturating_sub(2)
            .max(1)
    };
    let committer = GroupCommitter::start(
        pool.clone(),
        writers,
        Duration::from_millis(settings.database.checkout_timeout_ms),
    )?;
    let gate = DbGate::new(
        pool,
        settings.database.pool_size as usize,
        Duration::from_millis(settings.database.checkout_timeout_ms),
    );
    let keys = Arc::new(KeyVerifier::new(
        gate.clone(),
        Duration::from_secs(settings.auth.cache_ttl_secs),
    ));
    let state = web::Data::new(AppState {
        committer,
        settings: settings.clone(),
        gate,
        keys: keys.clone(),
        rate_limiter: RateLimiter::from_settings(&settings.rate_limit),
    });

    if settings.rate_limit.enabled {
        log::info!(
            "rate limit: {} requests/s per API key, bursts of {} (rate_limit)",
            settings.rate_limit.requests_per_sec,
            settings.rate_limit.burst
        );
    }

    let workers = match settings.server.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let system = actix_web::rt::System::new();
    system.block_on(async move {
        let server = HttpServer::new(move || {
            App::new()
                .app_data(state.clone())
                .wrap(middleware::from_fn(access_log::access_log))
                .configure(app::configure)
                .default_service(web::to(app::not_found))
        })
        .workers(workers)
        .worker_max_blocking_threads((settings.database.pool_size as usize * 2).max(8))
        .client_request_timeout(Duration::from_secs(
            settings.server.client_request_timeout_secs,
        ))
        .shutdown_timeout(settings.server.shutdown_timeout_secs)
        .bind(&settings.server.bind)
        .with_context(|| format!("binding {}", settings.server.bind))?;
        for addr in server.addrs() {
            log::info!(
                "intake-server listening on http://{addr} ({})",
                target.redacted()
            );
        }
        let running = server.run();
        let flush_every = Duration::from_secs(settings.auth.last_used_flush_secs.max(1));
        let flusher = keys.clone();
        actix_web::rt::spawn(async move {
            let mut tick = tokio::time::interval(flush_every);
            loop {
                tick.tick().await;
                flusher.flush_last_used().await;
            }
        });
        let outcome = running.await.context("server failed");
        // Keys used since the last batch get their last-use time on a clean stop too.
        keys.flush_last_used().await;
        outcome
    })
}
