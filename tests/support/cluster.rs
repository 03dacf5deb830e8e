//! A PostgreSQL cluster of a test's own, which the test may stop and start at will (the shared
//! PostgreSQL on port 5432 is used by every other test at the same time and is never stopped),
//! files made immutable to stand for a read-only disk, a server whose standard output is kept
//! as well as its log, and whole-database text dumps to search for what must never be stored.
//!
//! Declared from `support/mod.rs`, so it can reach that module's private parts.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

use tempfile::TempDir;

use super::{Backend, CliOutput, Server, TestDb, base_command, run_key_admin, sqlite_path};

/// Every private cluster lives in a temporary directory whose name starts with this, so that
/// the ones a killed test run left behind can be recognised and stopped.
const CLUSTER_DIR_PREFIX: &str = "intake-pgcluster-";
/// A cluster directory older than this belongs to a test run that died without cleaning up.
const CLUSTER_STALE_AFTER: Duration = Duration::from_secs(3600);
/// Longest `pg_ctl` may wait for the server to start or stop.
const PG_CTL_WAIT_SECS: &str = "30";

/// A private PostgreSQL server: `initdb` into a fresh temporary directory, trust
/// authentication, listening on 127.0.0.1 on a free port. Stopped (immediately) and removed
/// when dropped.
pub struct PgCluster {
    /// Owns the directory; removing it removes the cluster.
    root: TempDir,
    bin: PathBuf,
    port: u16,
    /// Run PostgreSQL's programs as the `postgres` OS user (they refuse to run as root).
    as_postgres: bool,
}

impl PgCluster {
    /// Creates and starts a cluster.
    pub fn start() -> PgCluster {
        sweep_stale_clusters();
        let bin = pg_bin_dir();
        let as_postgres = running_as_root();
        let root = tempfile::Builder::new()
            .prefix(CLUSTER_DIR_PREFIX)
            .tempdir()
            .expect("creating a directory for a PostgreSQL cluster");
        std::fs::create_dir(root.path().join("sockets")).expect("creating the socket directory");
        if as_postgres {
            let chown = Command::new("chown")
                .arg("-R")
                .arg("postgres:postgres")
                .arg(root.path())
                .output()
                .expect("running chown");
            assert!(
                chown.status.success(),
                "chown -R postgres {}: {}",
                root.path().display(),
                String::from_utf8_lossy(&chown.stderr)
            );
        }
        let mut cluster = PgCluster {
            root,
            bin,
            port: 0,
            as_postgres,
        };
        let data = cluster.data_dir();
        let out = cluster.run_pg(
            "initdb",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--locale=C".as_ref(),
                "--no-sync".as_ref(),
            ],
        );
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A free port can be taken by someone else between asking and binding; try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            cluster.port = free_port();
            match cluster.pg_ctl_start() {
                Ok(()) => return cluster,
                Err(e) => last_error = e,
            }
        }
        panic!("the private PostgreSQL cluster did not start: {last_error}");
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A [`TestDb`] whose URL is this cluster's `postgres` database (and whose processes run in
    /// a temporary directory of their own). Dropping it drops nothing: the cluster goes as a
    /// whole.
    pub fn test_db(&self) -> TestDb {
        TestDb {
            backend: Backend::Postgres,
            url: self.url(),
            dir: tempfile::tempdir().expect("creating a temporary directory"),
            pg: None,
        }
    }

    /// Stops the server the way a crash or a power cut would (`pg_ctl stop -m immediate`):
    /// connections are cut at once and the next start runs crash recovery. Returns when the
    /// server is gone.
    pub fn stop_immediate(&self) {
        if let Err(e) = self.pg_ctl_stop() {
            panic!("stopping the private PostgreSQL cluster: {e}");
        }
    }

    /// Starts the server again on the same port and data directory; returns when it accepts
    /// connections.
    pub fn start_again(&self) {
        if let Err(e) = self.pg_ctl_start() {
            panic!("restarting the private PostgreSQL cluster: {e}");
        }
    }

    /// Freezes the whole server (SIGSTOP to the postmaster and every backend): the port
    /// still accepts connections, but nothing answers, as when the database host hangs.
    pub fn freeze(&self) {
        self.signal_all("STOP");
    }

    /// Lets a frozen server run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal_all("CONT");
    }

    /// Sends a signal to the postmaster and its children, by process id.
    fn signal_all(&self, signal: &str) {
        let postmaster = std::fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|text| {
                text.lines()
                    .next()
                    .and_then(|l| l.trim().parse::<u32>().ok())
            })
            .expect("the cluster is running (postmaster.pid)");
        let mut pids = vec![postmaster];
        pids.extend(children_of(postmaster));
        for pid in pids {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(pid.to_string())
                .status();
        }
    }

    /// The server's own log so far, for failure messages.
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("postgres.log")).unwrap_or_default()
    }

    fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn pg_ctl_start(&self) -> Result<(), String> {
        let data = self.data_dir();
        let log = self.root.path().join("postgres.log");
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c max_connections=60 \
             -c shared_buffers=16MB",
            self.port,
            self.root.path().join("sockets").display()
        );
        let out = self.run_pg(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-l".as_ref(),
                log.as_os_str(),
                "-o".as_ref(),
                options.as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                PG_CTL_WAIT_SECS.as_ref(),
                "start".as_ref(),
            ],
        );
        if out.status.success() {
            Ok(())
        } else {
            // A half-started server must not linger.
            let _ = self.pg_ctl_stop();
            Err(format!(
                "pg_ctl start on port {} failed ({}): {}{}\nserver log:\n{}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.server_log()
            ))
        }
    }

    fn pg_ctl_stop(&self) -> Result<(), String> {
        let data = self.data_dir();
        let out = self.run_pg(
            "pg_ctl",
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "immediate".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                PG_CTL_WAIT_SECS.as_ref(),
                "stop".as_ref(),
            ],
        );
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pg_ctl stop failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Runs one of PostgreSQL's programs (as `postgres` when we are root), with its output
    /// captured through files: the server `pg_ctl` starts must not inherit a pipe that the
    /// test then waits on.
    fn run_pg(&self, program: &str, args: &[&std::ffi::OsStr]) -> Output {
        run_pg_program(&self.bin, self.root.path(), self.as_postgres, program, args)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data_dir().join("postmaster.pid").exists() {
            // A frozen server cannot stop.
            self.thaw();
        }
        if self.data_dir().join("postmaster.pid").exists()
            && let Err(e) = self.pg_ctl_stop()
        {
            eprintln!("{e}");
            kill_postmaster(&self.data_dir());
        }
    }
}

fn run_pg_program(
    bin: &Path,
    work_dir: &Path,
    as_postgres: bool,
    program: &str,
    args: &[&std::ffi::OsStr],
) -> Output {
    let path = bin.join(program);
    let mut cmd = if as_postgres {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(&path);
        cmd
    } else {
        Command::new(&path)
    };
    // PGDATA or PGPORT from the environment must not point pg_ctl elsewhere.
    for name in ["PGDATA", "PGPORT", "PGHOST", "PGUSER", "PGDATABASE"] {
        cmd.env_remove(name);
    }
    let capture = tempfile::tempfile().expect("creating a capture file");
    let capture_err = tempfile::tempfile().expect("creating a capture file");
    let mut child = cmd
        .args(args)
        .current_dir(work_dir)
        .stdin(Stdio::null())
        .stdout(capture.try_clone().expect("duplicating a file handle"))
        .stderr(capture_err.try_clone().expect("duplicating a file handle"))
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e}", path.display()));
    let status = child
        .wait()
        .unwrap_or_else(|e| panic!("waiting for {}: {e}", path.display()));
    let read = |mut file: std::fs::File| {
        use std::io::{Read, Seek};
        let mut bytes = Vec::new();
        let _ = file.rewind();
        let _ = file.read_to_end(&mut bytes);
        bytes
    };
    Output {
        status,
        stdout: read(capture),
        stderr: read(capture_err),
    }
}

/// Process ids whose parent is `parent`, from `/proc`.
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid ...`; comm may hold spaces, so split after the last ')'.
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|stat| {
                    let rest = &stat[stat.rfind(')')? + 1..];
                    rest.split_whitespace().nth(1)?.parse::<u32>().ok()
                })
                == Some(parent)
        })
        .collect()
}

/// Last resort when `pg_ctl stop` fails: SIGKILL the postmaster named in `postmaster.pid`.
fn kill_postmaster(data: &Path) {
    let pid = std::fs::read_to_string(data.join("postmaster.pid"))
        .ok()
        .and_then(|text| text.lines().next().map(str::trim).map(str::to_owned))
        .filter(|pid| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
    if let Some(pid) = pid {
        let _ = Command::new("kill").args(["-KILL", &pid]).status();
    }
}

/// PostgreSQL's server programs: `INTAKE_TEST_PG_BIN` if set, else the newest
/// `/usr/lib/postgresql/<version>/bin` that has `initdb`.
pub fn pg_bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("INTAKE_TEST_PG_BIN").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).unwrap_or_else(|| {
        panic!(
            "no PostgreSQL server programs in /usr/lib/postgresql/*/bin; \
             set INTAKE_TEST_PG_BIN to the directory holding initdb and pg_ctl"
        )
    })
}

fn running_as_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("finding a free port")
}

/// Stops and removes private clusters left behind by test runs that were killed more than an
/// hour ago (their `Drop` never ran). Tests never depend on this.
fn sweep_stale_clusters() {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for entry in entries.filter_map(Result::ok) {
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|at| SystemTime::now().duration_since(at).ok())
                .is_some_and(|age| age > CLUSTER_STALE_AFTER);
            if name.starts_with(CLUSTER_DIR_PREFIX) && old {
                let data = entry.path().join("data");
                if data.join("postmaster.pid").exists() {
                    kill_postmaster(&data);
                }
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Text dumps of a whole database.

/// Everything a test database holds, as text: `pg_dump` of a PostgreSQL database (schema and
/// data, every schema), or the raw bytes of a SQLite database and its `-wal` and `-shm` files
/// (lossily as text, which keeps ASCII intact: API key secrets are ASCII). Used to prove that
/// some string was never stored anywhere.
pub fn database_dump(db: &TestDb) -> String {
    match db.backend {
        Backend::Postgres => {
            let dump = Command::new(pg_bin_dir().join("pg_dump"))
                .arg("--no-owner")
                .arg("--dbname")
                .arg(&db.url)
                .stdin(Stdio::null())
                .output()
                .expect("running pg_dump");
            assert!(
                dump.status.success(),
                "pg_dump {} failed: {}",
                db.url,
                String::from_utf8_lossy(&dump.stderr)
            );
            String::from_utf8_lossy(&dump.stdout).into_owned()
        }
        Backend::Sqlite => {
            let path = sqlite_path(&db.url);
            let mut text = String::new();
            for suffix in ["", "-wal", "-shm"] {
                let file = PathBuf::from(format!("{}{suffix}", path.display()));
                if let Ok(bytes) = std::fs::read(&file) {
                    text.push_str(&String::from_utf8_lossy(&bytes));
                }
            }
            assert!(!text.is_empty(), "no SQLite database at {}", path.display());
            text
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files made immutable: a read-only disk, as far as even root is concerned.

/// Files with the immutable attribute set (`chattr +i`): nobody, root included, can write,
/// truncate or replace them, and already open descriptors can no longer write to them
/// either. Cleared again when dropped, so that a failing test still leaves removable files.
pub struct Immutable {
    paths: Vec<PathBuf>,
}

impl Immutable {
    /// Whether `chattr +i` works here (it needs root or CAP_LINUX_IMMUTABLE, and a file
    /// system that has the attribute, such as ext4 or xfs): `Err` says why not.
    pub fn supported_in(dir: &Path) -> Result<(), String> {
        let probe = dir.join(".immutable-probe");
        std::fs::write(&probe, b"probe").map_err(|e| format!("writing a probe file: {e}"))?;
        let outcome = chattr("+i", &probe).and_then(|()| {
            let writable = std::fs::OpenOptions::new()
                .append(true)
                .open(&probe)
                .is_ok();
            chattr("-i", &probe)?;
            if writable {
                Err("a file with chattr +i could still be opened for writing".to_owned())
            } else {
                Ok(())
            }
        });
        let _ = std::fs::remove_file(&probe);
        outcome
    }

    /// Sets the attribute on every path (all or none).
    pub fn set(paths: &[PathBuf]) -> Immutable {
        let mut done = Immutable { paths: Vec::new() };
        for path in paths {
            if let Err(e) = chattr("+i", path) {
                panic!("{e}");
            }
            done.paths.push(path.clone());
        }
        done
    }

    /// Clears the attribute again (also done on drop).
    pub fn clear(mut self) {
        self.clear_all();
    }

    fn clear_all(&mut self) {
        for path in self.paths.drain(..) {
            if let Err(e) = chattr("-i", &path) {
                eprintln!("{e}");
            }
        }
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        self.clear_all();
    }
}

fn chattr(flag: &str, path: &Path) -> Result<(), String> {
    let out = Command::new("chattr")
        .arg(flag)
        .arg(path)
        .output()
        .map_err(|e| format!("running chattr: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "chattr {flag} {}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// A server whose standard output is kept too.

/// Like [`Server::start`], but the server's standard output goes to `stdout` (a file) instead
/// of nowhere, so that a test can read everything the process wrote. The log (standard error)
/// is collected as usual ([`Server::logs`]).
pub fn start_server_keeping_stdout(
    db: &TestDb,
    extra_env: &[(&str, &str)],
    stdout: &Path,
) -> Server {
    let out = std::fs::File::create(stdout).expect("creating the server's stdout file");
    let mut cmd = base_command(env!("CARGO_BIN_EXE_intake-server"), db);
    cmd.env("INTAKE__SERVER__BIND", "127.0.0.1:0")
        .env("INTAKE__LOADER__EMBEDDED", "off")
        .env("RUST_LOG", "info")
        .envs(extra_env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::piped());
    Server::spawn(cmd)
}

// ---------------------------------------------------------------------------------------------
// Command-line tools with extra environment (e.g. `RUST_LOG=trace`).

/// `intake-key-admin ARGS` against `db` with extra environment variables.
pub fn key_admin_with_env(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    run_key_admin(db, args, env)
}

/// `intake-loader ARGS` against `db` with extra environment variables, to the end.
pub fn loader_with_env(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    super::run_cli(env!("CARGO_BIN_EXE_intake-loader"), db, args, env)
}

// ---------------------------------------------------------------------------------------------
// A small file system of its own: a disk that can fill up.

/// A tmpfs of a fixed size mounted on a directory (root only), unmounted when dropped. Drop
/// every process using it first.
pub struct SmallDisk {
    dir: PathBuf,
}

impl SmallDisk {
    /// Mounts a tmpfs of `megabytes` on `dir` (created if missing). `Err` says why not (not
    /// root, no CAP_SYS_ADMIN, no `mount`).
    pub fn mount(dir: &Path, megabytes: u32) -> Result<SmallDisk, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m,mode=0755")])
            .arg("tmpfs")
            .arg(dir)
            .output()
            .map_err(|e| format!("running mount: {e}"))?;
        if out.status.success() {
            Ok(SmallDisk {
                dir: dir.to_owned(),
            })
        } else {
            Err(format!(
                "mount -t tmpfs on {}: {}",
                dir.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// Writes a file until the file system is full (ENOSPC) and returns its path; removing it
    /// frees the space again.
    pub fn fill(&self) -> PathBuf {
        use std::io::Write;
        let path = self.dir.join("filler");
        let mut file = std::fs::File::create(&path).expect("creating the filler file");
        let chunk = vec![0xA5u8; 64 * 1024];
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break,
                Err(e) => panic!("filling {}: {e}", self.dir.display()),
            }
        }
        // Whatever small remainder a partial write leaves, take it too.
        while let Ok(n) = file.write(&chunk[..512]) {
            if n == 0 {
                break;
            }
        }
        path
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            // Busy: detach it now, the kernel frees it when the last user is gone.
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}
