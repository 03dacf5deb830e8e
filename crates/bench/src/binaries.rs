//! The real Intake binaries, measured as they ship (their own allocator, logging and
//! settings): they are looked up next to `intake-bench` in the same target directory.

use std::path::PathBuf;
use std::process::Command;

use anyhow::bail;

/// A command for one of Intake's binaries, run from an empty working directory so that no
/// `config/default.toml` of the caller's is picked up, and with no inherited INTAKE__ settings.
pub fn command(name: &str) -> anyhow::Result<Command> {
    let exe = std::env::current_exe()?;
    let path: PathBuf = exe
        .parent()
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if !path.exists() {
        bail!(
            "{} not found: build the binaries first with `cargo build --release`",
            path.display()
        );
    }
    let mut command = Command::new(path);
    command.current_dir(std::env::temp_dir());
    for (key, _) in std::env::vars() {
        if key.starts_with("INTAKE__") || key == "DATABASE_URL" {
            command.env_remove(key);
        }
    }
    Ok(command)
}
