//! Runs blocking database work off the async workers, with a bounded wait.
//!
//! A semaphore sized like the connection pool keeps requests from queueing without limit in
//! the blocking thread pool: a request that cannot start its database work within the
//! checkout timeout is answered 503 at once instead of hanging.

use std::sync::Arc;
use std::time::Duration;

use actix_web::web;
use intake_core::db::{DbConn, DbPool};
use tokio::sync::Semaphore;

/// Why gated database work failed.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("no database capacity within the timeout")]
    Busy,
    #[error("{0}")]
    Database(String),
}

#[derive(Clone)]
pub struct DbGate {
    pool: DbPool,
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl DbGate {
    pub fn new(pool: DbPool, permits: usize, wait: Duration) -> DbGate {
        DbGate {
            pool,
            permits: Arc::new(Semaphore::new(permits.max(1))),
            wait,
        }
    }

    pub fn pool(&self) -> &DbPool {
        &self.pool
    }

    /// Runs `work` with a pooled connection on a blocking thread.
    pub async fn run<T, E, F>(&self, work: F) -> Result<T, GateError>
    where
        F: FnOnce(&mut DbConn) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        // One deadline for every stage: a permit, a connection, the work itself.
        let deadline = std::time::Instant::now() + self.wait;
        let tokio_deadline = tokio::time::Instant::from_std(deadline);
        let permit = tokio::time::timeout_at(tokio_deadline, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| GateError::Busy)?
            .map_err(|_| GateError::Busy)?;
        let pool = self.pool.clone();
        let task = web::block(move || {
            let _permit = permit;
            let wait = deadline
                .saturating_duration_since(std::time::Instant::now())
                .max(Duration::from_millis(1));
            let mut conn = pool
                .get_timeout(wait)
                .map_err(|e| GateError::Database(e.to_string()))?;
            work(&mut conn).map_err(|e| GateError::Database(e.to_string()))
        });
        // A database that stops answering (not refusing) would hold the blocking task; the
        // request is answered at its deadline all the same, and the task ends on its own.
        match tokio::time::timeout_at(tokio_deadline, task).await {
            Err(_) => Err(GateError::Busy),
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(GateError::Database(format!("blocking task failed: {e}"))),
        }
    }
}
