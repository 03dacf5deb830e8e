//! The disk's own commit latency, measured beside the database while a scenario runs.
//!
//! A `201` waits for the database's commit, and a commit waits for an `fdatasync` of its
//! write-ahead log. On a shared virtual disk that `fdatasync` can stall for hundreds of
//! milliseconds now and then, and no server can answer sooner than its disk. So the ingest
//! scenario prints, beside its latencies, the latencies of a plain 8 KiB write and
//! `fdatasync` in the directory that holds the log, repeated every 10 ms by a thread of its
//! own: the floor a durable commit has on this disk at that moment.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A running probe; [`FsyncProbe::finish`] stops it and gives its latencies.
pub struct FsyncProbe {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<Vec<Duration>>>>,
}

impl FsyncProbe {
    /// Starts probing with a file of its own in `dir` (removed when the probe ends).
    pub fn start(dir: &Path) -> std::io::Result<FsyncProbe> {
        let path = dir.join(format!("intake-bench-fsync-probe-{}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || probe(&file, &stop))
        };
        Ok(FsyncProbe {
            path,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the probe and returns one latency per write and `fdatasync`.
    pub fn finish(mut self) -> std::io::Result<Vec<Duration>> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(result)) => result,
            _ => Err(std::io::Error::other("the fsync probe's thread panicked")),
        }
    }
}

impl Drop for FsyncProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Rewrites the same 8 KiB (one PostgreSQL page) in place, so the file's size never changes
/// and the `fdatasync` has only data to flush, as for a preallocated WAL segment.
fn probe(file: &File, stop: &AtomicBool) -> std::io::Result<Vec<Duration>> {
    let page = [0x5a_u8; 8192];
    let mut latencies = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        file.write_all_at(&page, 0)?;
        file.sync_data()?;
        latencies.push(started.elapsed());
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(latencies)
}

/// Where PostgreSQL's write-ahead log lives, if that is a directory on this machine: the
/// directory holding `pg_wal` (the data directory, or the disk `pg_wal` links to).
pub fn pg_wal_parent(data_directory: &str) -> Option<PathBuf> {
    let wal = std::fs::canonicalize(Path::new(data_directory).join("pg_wal")).ok()?;
    wal.parent().map(Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fresh_db::tempdir::TempDir;

    /// A scratch directory of this test's own, removed when the test ends.
    fn scratch(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("fsync-probe-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        TempDir(dir)
    }

    #[test]
    fn a_probe_measures_and_removes_its_file() {
        let dir = scratch("measures");
        let probe = FsyncProbe::start(&dir.0).expect("the probe starts");
        let path = probe.path.clone();
        assert!(path.exists());
        std::thread::sleep(Duration::from_millis(50));
        let latencies = probe.finish().expect("the probe ends cleanly");
        assert!(!latencies.is_empty());
        assert!(latencies.iter().all(|l| *l > Duration::ZERO));
        assert!(!path.exists(), "the probe's file is removed");
    }

    #[test]
    fn a_probe_dropped_unfinished_still_removes_its_file() {
        let dir = scratch("dropped");
        let probe = FsyncProbe::start(&dir.0).expect("the probe starts");
        let path = probe.path.clone();
        drop(probe);
        assert!(!path.exists(), "the probe's file is removed");
    }

    #[test]
    fn the_log_directory_is_the_one_holding_pg_wal() {
        let dir = scratch("wal");
        let text = dir.0.to_str().expect("a UTF-8 path");
        assert_eq!(pg_wal_parent(text), None, "no pg_wal, no directory");
        std::fs::create_dir(dir.0.join("pg_wal")).expect("pg_wal");
        assert_eq!(
            pg_wal_parent(text),
            Some(std::fs::canonicalize(&dir.0).expect("canonical"))
        );
    }
}
