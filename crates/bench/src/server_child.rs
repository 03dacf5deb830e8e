//! Runs the real `intake-server` in a child process of the bench (so that its memory is
//! measured alone) and watches its peak RSS.

use std::net::TcpListener;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::measure::vm_hwm_kib;

pub struct ServerChild {
    child: Child,
    pub base_url: String,
}

impl ServerChild {
    /// Starts the real `intake-server` on a free port (embedded loader off) and waits until
    /// it answers.
    pub fn start(db_url: &str) -> anyhow::Result<ServerChild> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = crate::binaries::command("intake-server")?
            .env("DATABASE_URL", db_url)
            .env("INTAKE__SERVER__BIND", format!("127.0.0.1:{port}"))
            .env("INTAKE__LOADER__EMBEDDED", "off")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting intake-server")?;
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
