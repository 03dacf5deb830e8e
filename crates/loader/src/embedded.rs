//! The in-process loader of `intake-server`: on the embedded default (SQLite) a newcomer sees
//! pushed data in tables without setting up a schedule.

use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use intake_core::db::DbPool;

use crate::queue::ChunkLimits;

/// Runs a pass every `interval` on a background thread for the life of the process.
pub fn spawn(pool: DbPool, interval: Duration, limits: ChunkLimits) -> std::io::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    std::thread::Builder::new()
        .name("intake-embedded-loader".into())
        .spawn(move || {
            loop {
                std::thread::sleep(interval);
                match crate::pass::run_pass(&pool, limits, &stop, &mut |_| {}) {
                    Ok(report) => {
                        if report.loaded() + report.rejected() > 0 {
                            log::info!(
                                "embedded loader: loaded {} records ({} rejected) in {} tables",
                                report.loaded(),
                                report.rejected(),
                                report.tables.len()
                            );
                        }
                        for error in report.errors() {
                            log::error!("embedded loader: {error}");
                        }
                    }
                    Err(e) => log::warn!("embedded loader pass failed: {e:#}"),
                }
            }
        })?;
    Ok(())
}
