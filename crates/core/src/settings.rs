//! Configuration: built-in defaults < `config/default.toml` < `--config FILE` < environment.
//!
//! The built-in defaults are the repository's `config/default.toml`, compiled in, so that the
//! documented file and the behaviour with no file at all can never drift apart.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

const BUILT_IN_DEFAULTS: &str = include_str!("../../../config/default.toml");

/// Where the operator's copy of the defaults is looked for, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/default.toml";

/// Every setting of every Intake process.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub auth: AuthSettings,
    pub rate_limit: RateLimitSettings,
    pub loader: LoaderSettings,
    pub stitch: StitchSettings,
}

/// Limits of the Stitch Import API endpoints (`/v2/import/...`), which take larger requests
/// than the RJMetrics ones: Singer targets send batches of up to 20 MB.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StitchSettings {
    pub max_body_bytes: usize,
    pub max_records_per_request: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub bind: String,
    pub workers: usize,
    pub max_records_per_request: usize,
    pub max_body_bytes: usize,
    pub max_json_depth: usize,
    pub client_request_timeout_secs: u64,
    pub body_timeout_secs: u64,
    pub shutdown_timeout_secs: u64,
    pub retry_after_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub pool_size: u32,
    pub checkout_timeout_ms: u64,
    pub statement_timeout_ms: u64,
    pub migrate_on_start: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub cache_ttl_secs: u64,
    pub last_used_flush_secs: u64,
}

/// Per-key request limits of `intake-server`: a token bucket per API key id, so that one
/// client's runaway job cannot take the database's capacity from every other client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    pub enabled: bool,
    /// Sustained rate: tokens added to a key's bucket per second.
    pub requests_per_sec: f64,
    /// Bucket size: requests a key may make at once after being idle.
    pub burst: u32,
}

/// Whether `intake-server` runs loader passes in-process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EmbeddedLoader {
    /// On for SQLite (the zero set-up default), off for PostgreSQL (run loaders separately).
    Auto,
    On,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoaderSettings {
    pub interval_secs: u64,
    pub embedded: EmbeddedLoader,
    pub embedded_interval_secs: u64,
    /// Staged records per chunk; unset: [`LoaderSettings::chunk_records`] picks by backend.
    #[serde(default)]
    pub chunk_size: Option<usize>,
    /// Most bytes of staged JSON per chunk (a chunk holds at least one record), so that the
    /// loader's memory does not grow with the records' size.
    pub chunk_max_bytes: usize,
    /// Database connections that write one chunk at once, each in its own transaction with
    /// its share of the chunk's keys (PostgreSQL only; SQLite has one writer). On a 2-core
    /// machine the database, not the loader, is the bottleneck, and one connection uses one core.
    pub writers: usize,
}

/// Staged records per chunk when `loader.chunk_size` is unset. PostgreSQL: 20,000, as its
/// writers send a few statements per share and larger chunks cost fewer per record (0.74-0.76x
/// the load baseline against 0.67-0.70x for 10,000, at about 220 against 160 MiB; see
/// docs/benchmarks.md). SQLite: 5,000, as a chunk holds its one write lock, which pushes wait
/// for, and 10,000 bought only 5% there.
pub fn default_chunk_size(sqlite: bool) -> usize {
    if sqlite { 5_000 } else { 20_000 }
}

impl LoaderSettings {
    /// Staged records per chunk: `chunk_size` if set, else the backend's default.
    pub fn chunk_records(&self, sqlite: bool) -> usize {
        self.chunk_size
            .unwrap_or_else(|| default_chunk_size(sqlite))
    }

    /// Database connections a loader uses at once: one per writer, and one reading ahead.
    pub fn connections(&self) -> u32 {
        self.writers as u32 + 1
    }
}

impl Settings {
    /// Loads the settings in precedence order and checks them, so that a bad setting stops the
    /// process at start with a message naming it rather than misbehaving later.
    pub fn load(config_file: Option<&Path>) -> anyhow::Result<Settings> {
        let mut builder =
            Config::builder().add_source(File::from_str(BUILT_IN_DEFAULTS, FileFormat::Toml));
        builder =
            builder.add_source(File::new(DEFAULT_CONFIG_PATH, FileFormat::Toml).required(false));
        if let Some(path) = config_file {
            if !path.exists() {
                bail!("configuration file {} does not exist", path.display());
            }
            builder = builder.add_source(File::from(PathBuf::from(path)).format(FileFormat::Toml));
        }
        builder = builder.add_source(
            Environment::with_prefix("INTAKE")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true),
        );
        if let Ok(url) = std::env::var("DATABASE_URL")
            && !url.is_empty()
        {
            builder = builder.set_override("database.url", url)?;
        }
        let settings: Settings = builder
            .build()
            .context("reading configuration")?
            .try_deserialize()
            .context("invalid configuration")?;
        settings.validate()?;
        Ok(settings)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let s = &self.server;
        if s.max_records_per_request == 0 {
            bail!("server.max_records_per_request must be at least 1");
        }
        if s.max_body_bytes < 2 {
            bail!("server.max_body_bytes must be at least 2");
        }
        if self.stitch.max_body_bytes < 2 {
            bail!("stitch.max_body_bytes must be at least 2");
        }
        if self.stitch.max_records_per_request == 0 {
            bail!("stitch.max_records_per_request must be at least 1");
        }
        if !(2..=120).contains(&s.max_json_depth) {
            bail!("server.max_json_depth must be between 2 and 120");
        }
        if self.database.pool_size == 0 {
            bail!("database.pool_size must be at least 1");
        }
        // The commit path keeps 0.3 s of every request's deadline in reserve.
        if self.database.checkout_timeout_ms < 500 {
            bail!("database.checkout_timeout_ms must be at least 500");
        }
        if self.database.url.trim().is_empty() {
            bail!("database.url must not be empty");
        }
        let r = &self.rate_limit;
        if !(r.requests_per_sec.is_finite() && r.requests_per_sec > 0.0) {
            bail!("rate_limit.requests_per_sec must be a positive number");
        }
        if r.burst == 0 {
            bail!("rate_limit.burst must be at least 1");
        }
        if self.loader.chunk_size == Some(0) {
            bail!("loader.chunk_size must be at least 1");
        }
        if !(1..=16).contains(&self.loader.writers) {
            bail!("loader.writers must be between 1 and 16");
        }
        if self.loader.chunk_max_bytes == 0 {
            bail!("loader.chunk_max_bytes must be at least 1");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_defaults_parse_and_match_the_documented_values() {
        let settings: Settings = Config::builder()
            .add_source(File::from_str(BUILT_IN_DEFAULTS, FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .expect("defaults parse");
        settings.validate().expect("defaults are valid");
        assert_eq!(settings.server.bind, "127.0.0.1:8080");
        assert_eq!(settings.server.max_records_per_request, 10_000);
        assert_eq!(settings.server.max_body_bytes, 10 * 1024 * 1024);
        assert_eq!(settings.auth.cache_ttl_secs, 5);
        assert_eq!(settings.loader.embedded, EmbeddedLoader::Auto);
        assert!(
            !settings.rate_limit.enabled,
            "rate limiting is off by default"
        );
        assert_eq!(settings.rate_limit.requests_per_sec, 50.0);
        assert_eq!(settings.rate_limit.burst, 100);
    }

    /// The built-in defaults with `overrides` (as text, the way environment variables give
    /// them), parsed and validated.
    fn with(overrides: &[(&str, &str)]) -> anyhow::Result<Settings> {
        let mut builder =
            Config::builder().add_source(File::from_str(BUILT_IN_DEFAULTS, FileFormat::Toml));
        for (key, value) in overrides {
            builder = builder.set_override(*key, *value)?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    #[test]
    fn rate_limits_must_be_positive() {
        let limits = |rate: &str, burst: &str| {
            with(&[
                ("rate_limit.requests_per_sec", rate),
                ("rate_limit.burst", burst),
            ])
        };
        // An integer rate, as an environment variable would give it, is accepted.
        let ok = limits("2", "3").expect("valid limits");
        assert_eq!(ok.rate_limit.requests_per_sec, 2.0);
        assert_eq!(ok.rate_limit.burst, 3);
        assert!(limits("0.5", "1").is_ok());
        for (rate, burst) in [
            ("0", "3"),
            ("-1", "3"),
            ("NaN", "3"),
            ("inf", "3"),
            ("2", "0"),
        ] {
            assert!(limits(rate, burst).is_err(), "rate {rate}, burst {burst}");
        }
    }

    #[test]
    fn loader_writers_and_the_checkout_timeout_are_bounded() {
        let one =
            |key: &str, value: &str| with(&[(key, value)]).map(|_| ()).map_err(|e| e.to_string());
        assert_eq!(one("loader.writers", "1"), Ok(()));
        assert_eq!(one("loader.writers", "16"), Ok(()));
        for bad in ["0", "17"] {
            let refused = one("loader.writers", bad).expect_err(bad);
            assert!(refused.contains("loader.writers"), "{refused}");
        }
        assert_eq!(one("database.checkout_timeout_ms", "500"), Ok(()));
        let refused = one("database.checkout_timeout_ms", "300").expect_err("300 ms");
        assert!(refused.contains("checkout_timeout_ms"), "{refused}");
    }

    #[test]
    fn the_chunk_size_defaults_by_backend_unless_set() {
        let unset = with(&[]).expect("valid").loader;
        assert_eq!(unset.chunk_records(false), 20_000);
        assert_eq!(unset.chunk_records(true), 5_000);
        // As an environment variable gives it: text.
        let set = with(&[("loader.chunk_size", "250")]).expect("valid").loader;
        assert_eq!(
            (set.chunk_records(false), set.chunk_records(true)),
            (250, 250)
        );
        let refused = with(&[("loader.chunk_size", "0")]).expect_err("a chunk of 0");
        assert!(
            refused.to_string().contains("loader.chunk_size"),
            "{refused}"
        );
    }
}
