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
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| GateError::Busy)?
            .map_err(|_| GateError::Busy)?;
        let pool = self.pool.clone();
        let outcome = web::block(move || {
            let _permit = permit;
            let mut conn = pool.get().map_err(|e| GateError::Database(e.to_string()))?;
            work(&mut conn).map_err(|e| GateError::Database(e.to_string()))
        })
        .await;
        match outcome {
            Ok(result) => result,
            Err(e) => Err(GateError::Database(format!("blocking task failed: {e}"))),
        }
    }
}
