//! Runs `intake-server` in a child process of the bench (so that its memory is measured
//! alone) and watches its peak RSS.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::measure::vm_hwm_kib;

pub struct ServerChild {
    child: Child,
    pub base_url: String,
}

impl ServerChild {
    /// Starts `intake-bench serve-child` on a free port and waits until it answers.
    pub fn start(db_url: &str) -> anyhow::Result<ServerChild> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(std::env::current_exe()?)
            .args(["serve-child", db_url, &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the server child")?;
        let server = ServerChild {
            child,
            base_url: format!("http://127.0.0.1:{port}"),
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .proxy(None)
            .build()
            .into();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if agent
                .get(&format!("{}/health", server.base_url))
                .call()
                .is_ok()
            {
                return Ok(server);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the server child did not start within 30 s")
    }

    pub fn peak_rss_mib(&self) -> u64 {
        vm_hwm_kib(self.child.id()).unwrap_or(0) / 1024
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child side: serve with the embedded loader off, on the given database and port.
pub fn serve(db_url: &str, port: u16) -> anyhow::Result<()> {
    let mut settings = intake_core::settings::Settings::load(None)?;
    settings.database.url = db_url.to_owned();
    settings.server.bind = format!("127.0.0.1:{port}");
    settings.loader.embedded = intake_core::settings::EmbeddedLoader::Off;
    intake_server::serve(settings)
}
