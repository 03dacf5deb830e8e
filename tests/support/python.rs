//! Python tools the end-to-end tests drive (Singer's target-stitch, schemathesis): each in a
//! virtual environment of its own under `target/python`, built from a pinned requirements
//! file in `tests/python/` on first use and shared by every later run.
//!
//! Test processes may build at the same time (nextest runs each test in a process of its
//! own): each builds in a directory of its own beside the final one and renames it into place;
//! a process that finds another's finished environment there uses it and discards its own.

use std::fs::{self, File};
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Longest a `python3 -m venv` or `pip install` may take.
const BUILD_TIMEOUT: Duration = Duration::from_secs(20 * 60);
/// What a finished environment was built from (requirements and interpreter), inside it.
const BUILT_FROM: &str = "intake-requirements.txt";
/// Build and replaced directories older than this belong to runs that ended.
const LEFTOVER_AFTER: Duration = Duration::from_secs(3600);

/// A pinned Python package the tests run.
pub struct PythonTool {
    /// The package whose `name==version` pin names the environment (`schemathesis`).
    pub package: &'static str,
    /// The requirements file's text (`include_str!` of `tests/python/requirements-*.txt`).
    pub requirements: &'static str,
}

/// A finished virtual environment.
pub struct PythonEnv {
    dir: PathBuf,
}

impl PythonEnv {
    /// The environment's interpreter, for `-m module` or a script of `bin/`. Scripts are run
    /// through it rather than their `#!` line, which names the directory they were built in.
    pub fn python(&self) -> Command {
        let mut cmd = python_command(&self.dir.join("bin").join("python"));
        // Everything the tools talk to is on this machine.
        for proxy in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
        ] {
            cmd.env_remove(proxy);
        }
        cmd.env("NO_PROXY", "127.0.0.1,localhost");
        cmd
    }

    /// A script the packages installed, e.g. `bin/target-stitch`.
    pub fn script(&self, name: &str) -> PathBuf {
        self.dir.join("bin").join(name)
    }
}

impl PythonTool {
    /// The tool's environment, built if need be; `None`, after a loud `SKIPPED` line naming
    /// `test` on stderr, only when there is no `python3`. Any other failure fails the test.
    pub fn environment(&self, test: &str) -> Option<PythonEnv> {
        let interpreter = match python_command(Path::new("python3"))
            .arg("--version")
            .output()
        {
            Err(e) if e.kind() == ErrorKind::NotFound => {
                eprintln!(
                    "\n{line}\nSKIPPED: python3 not found — {test} did not run\n{line}\n",
                    line = "*".repeat(80)
                );
                return None;
            }
            Err(e) => panic!("running python3 --version: {e}"),
            Ok(out) => {
                assert!(
                    out.status.success(),
                    "python3 --version failed ({}): {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr)
                );
                let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
                text.push_str(&String::from_utf8_lossy(&out.stderr));
                text.trim().to_owned()
            }
        };
        let built_from = format!("{}\n# built with {interpreter}\n", self.requirements);
        let name = format!("{}-{}", self.package, self.pinned_version());
        let root = target_dir().join("python");
        let venv = root.join(&name);
        if is_complete(&venv, &built_from) {
            return Some(PythonEnv { dir: venv });
        }
        fs::create_dir_all(&root).unwrap_or_else(|e| panic!("creating {}: {e}", root.display()));
        remove_leftovers(&root, &name);

        let unique = format!("{}-{}", std::process::id(), unix_nanos());
        let building = root.join(format!(".{name}.building-{unique}"));
        eprintln!(
            "building the {name} virtual environment in {}",
            building.display()
        );
        let started = Instant::now();
        self.build(&building, &built_from);
        eprintln!("built it in {:.1?}", started.elapsed());

        for _ in 0..5 {
            match fs::rename(&building, &venv) {
                Ok(()) => return Some(PythonEnv { dir: venv }),
                // Another process won: use its environment.
                Err(_) if is_complete(&venv, &built_from) => {
                    let _ = fs::remove_dir_all(&building);
                    return Some(PythonEnv { dir: venv });
                }
                // One built from other pins or another interpreter: move it aside (swept
                // later, as a process may still be running from it) and try again.
                Err(_) if venv.exists() => {
                    let _ = fs::rename(&venv, root.join(format!(".{name}.replaced-{unique}")));
                }
                Err(e) => {
                    let _ = fs::remove_dir_all(&building);
                    panic!("moving {} to {}: {e}", building.display(), venv.display());
                }
            }
        }
        let _ = fs::remove_dir_all(&building);
        panic!(
            "could not put a virtual environment in place at {}",
            venv.display()
        );
    }

    /// The version the requirements pin for [`PythonTool::package`].
    fn pinned_version(&self) -> &'static str {
        let pin = format!("{}==", self.package);
        self.requirements
            .lines()
            .find_map(|l| l.trim().strip_prefix(pin.as_str()))
            .map(str::trim)
            .unwrap_or_else(|| panic!("the requirements must pin {pin}<version>"))
    }

    /// `python3 -m venv DIR`, then the pinned packages into it; on failure, removes `dir` and
    /// fails the test with the output.
    fn build(&self, dir: &Path, built_from: &str) {
        let fail = |what: &str, run: &Run| -> ! {
            let _ = fs::remove_dir_all(dir);
            panic!(
                "{what} {}\nstdout:\n{}\nstderr:\n{}",
                run.outcome(),
                run.stdout,
                run.stderr
            );
        };
        let logs = tempfile::tempdir().expect("creating a temporary directory");
        let mut venv = python_command(Path::new("python3"));
        venv.args(["-m", "venv"]).arg(dir);
        let run = run_to_end(venv, logs.path(), "venv", BUILD_TIMEOUT);
        if !run.succeeded() {
            fail(&format!("python3 -m venv {}", dir.display()), &run);
        }
        let requirements = logs.path().join("requirements.txt");
        fs::write(&requirements, self.requirements).expect("writing the requirements");
        let mut pip = python_command(&dir.join("bin").join("python"));
        pip.args([
            "-m",
            "pip",
            "install",
            "--no-input",
            "--disable-pip-version-check",
            "--requirement",
        ])
        .arg(&requirements);
        let run = run_to_end(pip, logs.path(), "pip", BUILD_TIMEOUT);
        if !run.succeeded() {
            fail(
                &format!("pip install of the {} requirements", self.package),
                &run,
            );
        }
        fs::write(dir.join(BUILT_FROM), built_from).unwrap_or_else(|e| {
            let _ = fs::remove_dir_all(dir);
            panic!("writing {}: {e}", dir.join(BUILT_FROM).display())
        });
    }
}

/// A Python command without the caller's settings that would point it at other packages.
fn python_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for name in [
        "PYTHONHOME",
        "PYTHONPATH",
        "PYTHONUSERBASE",
        "PIP_USER",
        "PIP_TARGET",
        "PIP_PREFIX",
    ] {
        cmd.env_remove(name);
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// How a child process ended, and what it printed.
pub struct Run {
    /// `None` if it was killed for taking longer than allowed.
    pub status: Option<ExitStatus>,
    pub timeout: Duration,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn succeeded(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// "failed (exit status: 1)" or "did not finish within ...".
    pub fn outcome(&self) -> String {
        match self.status {
            Some(status) => format!("failed ({status})"),
            None => format!("did not finish within {:?} and was killed", self.timeout),
        }
    }
}

/// Runs `cmd` with its output in files under `dir` (so that it can never block on a full pipe)
/// until it exits, or kills it after `timeout`.
pub fn run_to_end(mut cmd: Command, dir: &Path, name: &str, timeout: Duration) -> Run {
    let stdout_path = dir.join(format!("{name}.stdout"));
    let stderr_path = dir.join(format!("{name}.stderr"));
    let create =
        |p: &Path| File::create(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
    cmd.stdout(create(&stdout_path))
        .stderr(create(&stderr_path));
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {name} ({cmd:?}): {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("waiting for {name}: {e}"),
        }
    };
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    Run {
        status,
        timeout,
        stdout: read(&stdout_path),
        stderr: read(&stderr_path),
    }
}

/// `CARGO_TARGET_DIR` if set (relative to the repository root), else `target` in the root.
fn target_dir() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => manifest.join(dir),
        None => manifest.join("target"),
    }
}

/// A finished environment built from `built_from`.
fn is_complete(venv: &Path, built_from: &str) -> bool {
    venv.join("bin").join("python").exists()
        && fs::read_to_string(venv.join(BUILT_FROM)).is_ok_and(|b| b == built_from)
}

/// Removes build and replaced directories of `name` left by runs that ended long ago.
fn remove_leftovers(root: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let prefix = format!(".{name}.");
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > LEFTOVER_AFTER);
        if old && entry.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
