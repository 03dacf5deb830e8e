//! Group commit: concurrent pushes share transactions.
//!
//! Each request's validated records go on a bounded queue; a few writer threads each take
//! every job waiting (up to a record cap), write them all in ONE transaction
//! (`staging::append_all`: one statement per table, one commit, one fsync) and only then
//! answer every job. A 201 still means "committed"; under load many requests ride on the same
//! commit instead of queueing for the same per-table counter row one by one.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use intake_core::db::{DbConn, DbPool};
use intake_core::staging::{self, RecordMeta, SeqRange, StagedBatch, StitchParts};
use tokio::sync::{mpsc, oneshot};

/// Most records written by one group transaction.
const MAX_GROUP_RECORDS: usize = 20_000;
/// How long before the earliest deadline of a group the database is told to give up, so that
/// the rollback (and the 503) come before the client stops waiting.
const DEADLINE_MARGIN: Duration = Duration::from_millis(300);

/// How long past its deadline a request whose transaction has started waits for the outcome.
/// The database's own timeouts end the transaction [`DEADLINE_MARGIN`] before the deadline;
/// the two together leave the commit itself 0.4 s.
const COMMIT_GRACE: Duration = Duration::from_millis(100);

/// One request's records: the body they came in, and per table each record's byte range in
/// it (so no record is copied on the way to the database). All of a job's tables commit in
/// the same transaction.
pub struct Job {
    pub client_id: i64,
    pub received_at: DateTime<Utc>,
    pub body: String,
    pub parts: Vec<JobPart>,
    /// When the request stops waiting; a writer skips a job whose deadline has passed.
    deadline: Instant,
    reply: oneshot::Sender<Result<Vec<SeqRange>, String>>,
    /// Who decides the job's fate, the writer or the waiting request (see [`Claim`]).
    claim: Arc<AtomicU8>,
}

/// The states of [`Job::claim`]. A writer moves a waiting job to `TAKEN` just before its
/// transaction; a request whose deadline passes moves it to `ABANDONED` and answers 503. Only
/// one of the two moves can succeed, so a 503 means "not stored": a request whose job was
/// taken waits for the commit's outcome, which the database's own time limits (set from the
/// deadline) keep short. Only a database that stops answering mid-commit for longer than
/// [`COMMIT_GRACE`] leaves the outcome unknown.
struct Claim;

impl Claim {
    const WAITING: u8 = 0;
    const TAKEN: u8 = 1;
    const ABANDONED: u8 = 2;

    /// Moves a waiting job to `to`; false if the other side got there first.
    fn settle(claim: &AtomicU8, to: u8) -> bool {
        claim
            .compare_exchange(Claim::WAITING, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// One table's records of a job.
pub struct JobPart {
    pub table: String,
    pub records: Vec<(usize, usize)>,
    /// Stitch metadata, one per record; `None` for RJMetrics pushes.
    pub meta: Option<Vec<RecordMeta>>,
    /// The Stitch batch's JSON Schema.
    pub schema: Option<String>,
}

impl Job {
    fn record_count(&self) -> usize {
        self.parts.iter().map(|p| p.records.len()).sum()
    }
}

/// Why a job was not committed.
#[derive(Debug)]
pub enum CommitError {
    /// The write did not complete before the request's deadline.
    Busy,
    /// The transaction failed (the database is down, or refused the write).
    Failed(String),
}

#[derive(Clone)]
pub struct GroupCommitter {
    queue: mpsc::Sender<Job>,
    /// The longest a request waits for its commit, all stages together.
    wait: Duration,
}

impl GroupCommitter {
    /// Starts `writers` writer threads. The queue holds at most `2 × writers` jobs, so memory
    /// stays bounded; a request whose transaction has not started within `wait` (queueing and
    /// a connection) is refused (503), and one whose transaction has started gets its outcome,
    /// which the database's time limits, set from the same deadline, keep within about `wait`.
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

    /// Commits one request's records for one table; returns their sequence numbers once
    /// durable.
    pub async fn commit(
        &self,
        client_id: i64,
        table: String,
        received_at: DateTime<Utc>,
        body: String,
        records: Vec<(usize, usize)>,
    ) -> Result<SeqRange, CommitError> {
        let part = JobPart {
            table,
            records,
            meta: None,
            schema: None,
        };
        let mut ranges = self
            .commit_parts(client_id, received_at, body, vec![part])
            .await?;
        ranges
            .pop()
            .ok_or_else(|| CommitError::Failed("no sequence range came back".into()))
    }

    /// Commits one request's records for one or more tables in one transaction; returns each
    /// part's sequence numbers once durable.
    pub async fn commit_parts(
        &self,
        client_id: i64,
        received_at: DateTime<Utc>,
        body: String,
        parts: Vec<JobPart>,
    ) -> Result<Vec<SeqRange>, CommitError> {
        let (reply, mut answer) = oneshot::channel();
        let deadline = Instant::now() + self.wait;
        let claim = Arc::new(AtomicU8::new(Claim::WAITING));
        let job = Job {
            client_id,
            received_at,
            body,
            parts,
            deadline,
            reply,
            claim: claim.clone(),
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        tokio::time::timeout_at(deadline, self.queue.send(job))
            .await
            .map_err(|_| CommitError::Busy)?
            .map_err(|_| CommitError::Failed("the commit writers have stopped".into()))?;
        let outcome = match tokio::time::timeout_at(deadline, &mut answer).await {
            Ok(outcome) => outcome,
            // Past the deadline: refuse, unless a writer has taken the job, whose outcome
            // (commit or rollback) is then the answer.
            Err(_)
                if Claim::settle(&claim, Claim::ABANDONED)
                    || claim.load(Ordering::Acquire) == Claim::ABANDONED =>
            {
                return Err(CommitError::Busy);
            }
            // Bounded all the same: a database that stops answering mid-commit must not
            // hang the request (the one case where a 503's records may still land).
            Err(_) => tokio::time::timeout_at(deadline + COMMIT_GRACE, answer)
                .await
                .map_err(|_| CommitError::Busy)?,
        };
        match outcome {
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
            let mut total = first.record_count();
            let mut group = vec![first];
            while total < MAX_GROUP_RECORDS {
                match receiver.try_recv() {
                    Ok(job) => {
                        total += job.record_count();
                        group.push(job);
                    }
                    Err(_) => break,
                }
            }
            group
        };
        // A connection first, then only the requests still waiting are written: those past
        // their deadline were answered 503 and must not be stored behind their back.
        let group = drop_late(group);
        let latest = group.iter().map(|job| job.deadline).max();
        let Some(latest) = latest else { continue };
        let wait = latest
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let mut conn = match pool.get_timeout(wait) {
            Ok(conn) => conn,
            Err(e) => {
                log::error!("no database connection for {} requests: {e}", group.len());
                for job in group {
                    let _ = job.reply.send(Err(e.to_string()));
                }
                continue;
            }
        };
        let group = drop_late(group);
        // The database gives up a little before the earliest deadline, so that a request
        // answered 503 was really not stored (see `staging::append_all`).
        let Some(earliest) = group.iter().map(|job| job.deadline).min() else {
            continue;
        };
        let budget = earliest
            .saturating_duration_since(Instant::now())
            .saturating_sub(DEADLINE_MARGIN);
        if budget.is_zero() {
            drop_expired_now(group);
            continue;
        }
        // From here each request waits for this transaction's outcome; those that already
        // gave up are left out.
        let group: Vec<Job> = group
            .into_iter()
            .filter(|job| Claim::settle(&job.claim, Claim::TAKEN))
            .collect();
        if group.is_empty() {
            continue;
        }
        match write_group(&mut conn, &group, budget) {
            Ok(mut ranges) => {
                for job in group.into_iter().rev() {
                    let mine = ranges.split_off(ranges.len().saturating_sub(job.parts.len()));
                    let _ = job.reply.send(Ok(mine));
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

/// Answers the jobs that can no longer be written in time (less than [`DEADLINE_MARGIN`]
/// left) and keeps the others: a nearly late request must not cut its group's budget.
fn drop_late(group: Vec<Job>) -> Vec<Job> {
    let cutoff = Instant::now() + DEADLINE_MARGIN;
    let (live, late): (Vec<Job>, Vec<Job>) =
        group.into_iter().partition(|job| job.deadline > cutoff);
    drop_expired_now(late);
    live
}

/// Answers every job as past its deadline, and makes sure no writer takes it.
fn drop_expired_now(group: Vec<Job>) {
    for job in group {
        Claim::settle(&job.claim, Claim::ABANDONED);
        let _ = job
            .reply
            .send(Err("the request's deadline passed before its write".into()));
    }
}

fn write_group(
    conn: &mut DbConn,
    group: &[Job],
    budget: Duration,
) -> Result<Vec<SeqRange>, String> {
    let parts: Vec<(&Job, &JobPart)> = group
        .iter()
        .flat_map(|job| job.parts.iter().map(move |part| (job, part)))
        .collect();
    let records: Vec<Vec<&str>> = parts
        .iter()
        .map(|(job, part)| {
            part.records
                .iter()
                .map(|&(start, end)| &job.body[start..end])
                .collect()
        })
        .collect();
    let batches: Vec<StagedBatch<'_>> = parts
        .iter()
        .zip(&records)
        .map(|((job, part), records)| StagedBatch {
            client_id: job.client_id,
            table: &part.table,
            received_at: job.received_at,
            records,
            stitch: part.meta.as_deref().map(|meta| StitchParts {
                meta,
                schema: part.schema.as_deref(),
            }),
        })
        .collect();
    staging::append_all(conn, &batches, Some(budget)).map_err(|e| e.to_string())
}
