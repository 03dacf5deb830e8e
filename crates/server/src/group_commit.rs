//! Group commit: concurrent pushes share transactions.
//!
//! Each request's validated records go on a bounded queue; a few writer threads each take
//! every job waiting (up to a record cap), write them all in ONE transaction
//! (`staging::append_all`: one statement per table, one commit, one fsync) and only then
//! answer every job. A 201 still means "committed"; under load many requests ride on the same
//! commit instead of queueing for the same per-table counter row one by one.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use intake_core::db::DbPool;
use intake_core::staging::{self, SeqRange, StagedBatch};
use tokio::sync::{mpsc, oneshot};

/// Most records written by one group transaction.
const MAX_GROUP_RECORDS: usize = 20_000;

/// One request's records: the body they came in, and each record's byte range in it (so no
/// record is copied on the way to the database).
pub struct Job {
    pub client_id: i64,
    pub table: String,
    pub received_at: DateTime<Utc>,
    pub body: String,
    pub records: Vec<(usize, usize)>,
    reply: oneshot::Sender<Result<SeqRange, String>>,
}

/// Why a job was not committed.
#[derive(Debug)]
pub enum CommitError {
    /// The queue stayed full for the whole wait: the database is not keeping up.
    Busy,
    /// The transaction failed (the database is down, or refused the write).
    Failed(String),
}

#[derive(Clone)]
pub struct GroupCommitter {
    queue: mpsc::Sender<Job>,
    wait: Duration,
}

impl GroupCommitter {
    /// Starts `writers` writer threads. The queue holds at most `2 × writers` jobs, so memory
    /// stays bounded; a request that cannot enqueue within `wait` is refused (503).
    pub fn start(pool: DbPool, writers: usize, wait: Duration) -> std::io::Result<GroupCommitter> {
        let writers = writers.max(1);
        let (queue, receiver) = mpsc::channel::<Job>(writers * 2);
        let receiver = Arc::new(Mutex::new(receiver));
        for n in 0..writers {
            let (pool, receiver) = (pool.clone(), receiver.clone());
            std::thread::Builder::new()
                .name(format!("intake-commit-{n}"))
                .spawn(move || writer_loop(&pool, &receiver))?;
        }
        Ok(GroupCommitter { queue, wait })
    }

    /// Commits one request's records; returns their sequence numbers once durable.
    pub async fn commit(
        &self,
        client_id: i64,
        table: String,
        received_at: DateTime<Utc>,
        body: String,
        records: Vec<(usize, usize)>,
    ) -> Result<SeqRange, CommitError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            client_id,
            table,
            received_at,
            body,
            records,
            reply,
        };
        tokio::time::timeout(self.wait, self.queue.send(job))
            .await
            .map_err(|_| CommitError::Busy)?
            .map_err(|_| CommitError::Failed("the commit writers have stopped".into()))?;
        match answer.await {
            Ok(Ok(range)) => Ok(range),
            Ok(Err(e)) => Err(CommitError::Failed(e)),
            Err(_) => Err(CommitError::Failed("the commit writer went away".into())),
        }
    }
}

fn writer_loop(pool: &DbPool, receiver: &Mutex<mpsc::Receiver<Job>>) {
    loop {
        let group = {
            let mut receiver = receiver.lock().unwrap_or_else(|p| p.into_inner());
            let Some(first) = receiver.blocking_recv() else {
                return;
            };
            let mut total = first.records.len();
            let mut group = vec![first];
            while total < MAX_GROUP_RECORDS {
                match receiver.try_recv() {
                    Ok(job) => {
                        total += job.records.len();
                        group.push(job);
                    }
                    Err(_) => break,
                }
            }
            group
        };
        let outcome = write_group(pool, &group);
        match outcome {
            Ok(ranges) => {
                for (job, range) in group.into_iter().zip(ranges) {
                    let _ = job.reply.send(Ok(range));
                }
            }
            Err(e) => {
                log::error!("group commit of {} requests failed: {e}", group.len());
                for job in group {
                    let _ = job.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn write_group(pool: &DbPool, group: &[Job]) -> Result<Vec<SeqRange>, String> {
    let mut conn = pool.get().map_err(|e| e.to_string())?;
    let records: Vec<Vec<&str>> = group
        .iter()
        .map(|job| {
            job.records
                .iter()
                .map(|&(start, end)| &job.body[start..end])
                .collect()
        })
        .collect();
    let batches: Vec<StagedBatch<'_>> = group
        .iter()
        .zip(&records)
        .map(|(job, records)| StagedBatch {
            client_id: job.client_id,
            table: &job.table,
            received_at: job.received_at,
            records,
        })
        .collect();
    staging::append_all(&mut conn, &batches).map_err(|e| e.to_string())
}
