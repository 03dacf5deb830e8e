//! The helper connections of a pass (PostgreSQL), each writing its share of every chunk in a
//! transaction of its own while the main connection goes on with its share and then its next
//! chunk. A chunk's shares cost different times (PostgreSQL's own pace varies by tens of
//! milliseconds from share to share); when every connection waited for the slowest at the end
//! of each chunk, one core idled for up to a fifth of each chunk's write.
//!
//! A key always falls in the same share, and share `i + 1` always goes to helper `i`, so
//! each key's versions are still written in order, by one connection; a helper is at most two
//! chunks behind (one share queued, one being written). Whatever cannot go this way (a chunk
//! that changes the schema, has activate_version markers or is cut into fewer shares) is
//! written by the main connection once every helper has finished ([`ShareWriters::settle`]).

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::thread::Scope;
use std::time::Instant;

use diesel::QueryResult;
use diesel::result::Error;

use crate::bulk::Val;
use crate::catalog::Catalog;
use crate::load_chunk::{Share, Writing, chunk_session, record_history, write_share};
use crate::queue;
use crate::sql::{Conn, in_transaction};

/// One share of a chunk, with what writing it needs.
pub(crate) struct ShareJob {
    pub client_id: i64,
    pub table: String,
    pub share: Share,
    pub catalog: Arc<Catalog>,
    pub pre_existing: Arc<Vec<String>>,
    pub loaded_at: Val,
    /// When the chunk's write began, for its history row.
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub started: Instant,
}

/// A share as a helper receives it: with how many failures the main connection had taken
/// note of when it sent it (see [`write_shares`]).
type Sent = (ShareJob, u64);

/// The helpers' queues, and what they report back.
pub struct ShareWriters {
    queues: Vec<SyncSender<Sent>>,
    reports: Receiver<QueryResult<usize>>,
    /// Shares sent and not yet reported on.
    outstanding: usize,
    /// Records the helpers committed and nobody has counted yet.
    committed: usize,
    failure: Option<Error>,
    /// Failures handed to the caller so far (see [`write_shares`]).
    epoch: u64,
}

impl ShareWriters {
    /// Starts one writer thread per helper connection, within `scope`.
    pub fn start<'scope, 'c: 'scope>(
        scope: &'scope Scope<'scope, '_>,
        helpers: &'scope mut [Conn<'c>],
    ) -> ShareWriters {
        let (report, reports) = channel();
        let queues = helpers
            .iter_mut()
            .map(|conn| {
                // One share waiting besides the one being written: the main connection is
                // not held up by a helper's slower share, and memory stays bounded.
                let (queue, jobs) = sync_channel(1);
                let report = report.clone();
                scope.spawn(move || write_shares(conn, jobs, report));
                queue
            })
            .collect();
        ShareWriters {
            queues,
            reports,
            outstanding: 0,
            committed: 0,
            failure: None,
            epoch: 0,
        }
    }

    /// No helpers: everything is written by the main connection.
    pub fn none() -> ShareWriters {
        ShareWriters {
            queues: Vec::new(),
            reports: channel().1,
            outstanding: 0,
            committed: 0,
            failure: None,
            epoch: 0,
        }
    }

    /// How many helpers there are.
    pub fn count(&self) -> usize {
        self.queues.len()
    }

    /// Hands `job` to helper `helper`, waiting while that helper has one share queued already.
    pub(crate) fn send(&mut self, helper: usize, job: ShareJob) -> QueryResult<()> {
        self.failed()?;
        let epoch = self.epoch;
        let sent = self
            .queues
            .get(helper)
            .map(|queue| queue.send((job, epoch)).is_ok());
        if sent != Some(true) {
            return Err(gone());
        }
        self.outstanding += 1;
        Ok(())
    }

    /// The first failure of any helper since the last one this returned. The failed share
    /// was not written, nor were the shares sent to that helper before this returned it:
    /// their records stay staged. Shares sent afterwards are written again.
    pub fn failed(&mut self) -> QueryResult<()> {
        self.collect(false);
        match self.failure.take() {
            Some(e) => {
                self.epoch += 1;
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Waits until every share sent has been written (or not, after a failure); then as
    /// [`ShareWriters::failed`].
    pub fn settle(&mut self) -> QueryResult<()> {
        self.collect(true);
        self.failed()
    }

    /// Records the helpers committed since this was last asked.
    pub fn take_committed(&mut self) -> usize {
        self.collect(false);
        std::mem::take(&mut self.committed)
    }

    fn collect(&mut self, wait: bool) {
        while self.outstanding > 0 {
            let report = if wait {
                self.reports.recv().map_err(|_| gone())
            } else {
                match self.reports.try_recv() {
                    Ok(report) => Ok(report),
                    Err(_) => return,
                }
            };
            self.outstanding -= 1;
            match report.and_then(|r| r) {
                Ok(records) => self.committed += records,
                Err(e) => {
                    self.failure.get_or_insert(e);
                }
            }
        }
    }
}

fn gone() -> Error {
    Error::QueryBuilderError("a writer thread ended early".into())
}

/// A helper's loop: each share in a transaction of its own that also takes its records out of
/// staging and notes them in the history. After a failure it skips (and reports as writing no
/// records) the shares sent before the main connection took note of the failure: they may
/// hold later versions of the failed share's keys, which must not be written before those.
fn write_shares(conn: &mut Conn<'_>, jobs: Receiver<Sent>, report: Sender<QueryResult<usize>>) {
    let mut failed_in = None;
    for (job, epoch) in jobs {
        let result = if failed_in == Some(epoch) {
            Ok(0)
        } else {
            let result = write_job(conn, job);
            if result.is_err() {
                failed_in = Some(epoch);
            }
            result
        };
        if report.send(result).is_err() {
            return;
        }
    }
}

fn write_job(conn: &mut Conn<'_>, job: ShareJob) -> QueryResult<usize> {
    let ShareJob {
        client_id,
        table,
        share,
        catalog,
        pre_existing,
        loaded_at,
        started_at,
        started,
    } = job;
    let writing = Writing {
        catalog: &catalog,
        pre_existing: &pre_existing,
        loaded_at,
        salvaging: false,
    };
    in_transaction(conn, |c| {
        chunk_session(c)?;
        let Share {
            root,
            children,
            seqs,
        } = share;
        queue::delete_seqs(c, client_id, &table, &seqs)?;
        write_share(c, &writing, root, children)?;
        if let (Some(&first), Some(&last)) = (seqs.iter().min(), seqs.iter().max()) {
            record_history(
                c,
                client_id,
                &table,
                started_at,
                started.elapsed().as_millis() as i64,
                seqs.len(),
                0,
                (first, last),
                None,
            )?;
        }
        Ok(seqs.len())
    })
}
