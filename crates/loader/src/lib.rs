//! `intake-loader`: moves staged records into warehouse tables.

use std::process::ExitCode;

/// Entry point of the `intake-loader` binary.
pub fn main() -> ExitCode {
    eprintln!("intake-loader: not built yet");
    ExitCode::FAILURE
}
