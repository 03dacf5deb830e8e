//! `intake-key-admin`: issue, list and revoke API keys, and grant analysts read-only database
//! roles. Secrets and passwords are printed once and never stored or shown again.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use intake_core::db::{self, DatabaseTarget, DbConn, DbPool};
use intake_core::key_store::{self, KeyInfo, Revocation};
use intake_core::keys;
use intake_core::reader_roles::{self, ReaderGrant};
use intake_core::settings::Settings;
use serde_json::json;

#[derive(Parser)]
#[command(
    name = "intake-key-admin",
    version,
    about = "Issue, list and revoke Intake API keys; grant analysts read-only roles"
)]
struct Cli {
    /// Configuration file (TOML), layered over config/default.toml.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Issue a new push-only key for a client and print it (the only time it is shown).
    Issue {
        /// Client id the key pushes for (a positive integer).
        #[arg(long)]
        client: i64,
        /// Free text to recognise the key by later.
        #[arg(long, default_value = "")]
        label: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        /// Only this client's keys.
        #[arg(long)]
        client: Option<i64>,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key: every server refuses it within the auth cache TTL.
    Revoke {
        /// The key id (the part after "intake_"), as shown by `list`.
        key_id: String,
        /// Why the key is revoked, kept with the key.
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Create (or rotate the password of) a PostgreSQL login role that can only read one
    /// client's warehouse schema, and print its password (the only time it is shown).
    GrantReader {
        /// Client id whose schema client_<ID> the role may read.
        #[arg(long)]
        client: i64,
        /// Name of the role (default: intake_reader_<ID>).
        #[arg(long)]
        role: Option<String>,
        /// The role intake-loader connects as, so that tables it creates later are readable
        /// too (default: the role this command connects as).
        #[arg(long, value_name = "ROLE")]
        loader_role: Option<String>,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Entry point of the `intake-key-admin` binary.
pub fn main() -> ExitCode {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .try_init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("intake-key-admin: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let settings = Settings::load(cli.config.as_deref())?;
    let target = DatabaseTarget::parse(&settings.database.url)?;
    if matches!(cli.command, Command::GrantReader { .. }) && target.is_sqlite() {
        // Before migrating, so that a mistaken run does not create a SQLite file.
        bail!(reader_roles::SQLITE_UNSUPPORTED);
    }
    if settings.database.migrate_on_start {
        db::run_migrations(&target, &settings.database)?;
    }
    let mut conn = DbPool::single(&target, &settings.database)?
        .get()
        .with_context(|| format!("connecting to {}", target.redacted()))?;
    match cli.command {
        Command::Issue {
            client,
            label,
            json,
        } => issue(&mut conn, client, &label, json),
        Command::List { client, json } => list(&mut conn, client, json),
        Command::Revoke { key_id, reason } => revoke(&mut conn, &key_id, &reason),
        Command::GrantReader {
            client,
            role,
            loader_role,
            json,
        } => grant_reader(&mut conn, client, role, loader_role.as_deref(), json),
    }
}

fn issue(conn: &mut DbConn, client_id: i64, label: &str, as_json: bool) -> anyhow::Result<()> {
    if client_id <= 0 {
        bail!("client ids are positive integers, not {client_id}");
    }
    let key = keys::generate_key()?;
    key_store::insert_key(conn, &key, client_id, label).context("storing the key")?;
    if as_json {
        println!(
            "{}",
            json!({"key_id": key.key_id, "client_id": client_id, "label": label, "api_key": key.api_key})
        );
    } else {
        println!("Issued key {} for client {client_id}.", key.key_id);
        println!("API key (shown only now; store it safely):");
        println!("{}", key.api_key);
    }
    Ok(())
}

fn list(conn: &mut DbConn, client_id: Option<i64>, as_json: bool) -> anyhow::Result<()> {
    let keys = key_store::list_keys(conn, client_id).context("listing keys")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&keys)?);
        return Ok(());
    }
    println!(
        "{:<14} {:>10}  {:<20} {:<20} {:<20} LABEL",
        "KEY ID", "CLIENT", "CREATED", "LAST USED", "REVOKED"
    );
    for KeyInfo {
        key_id,
        client_id,
        label,
        created_at,
        last_used_at,
        revoked_at,
        revoked_reason,
    } in keys
    {
        let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
            t.map_or_else(
                || "-".to_owned(),
                |t| t.format("%Y-%m-%d %H:%M:%S").to_string(),
            )
        };
        let revoked = match (revoked_at, revoked_reason.as_deref()) {
            (Some(at), Some(reason)) if !reason.is_empty() => {
                format!("{} ({reason})", time(Some(at)))
            }
            (at, _) => time(at),
        };
        println!(
            "{key_id:<14} {client_id:>10}  {:<20} {:<20} {revoked:<20} {label}",
            time(Some(created_at)),
            time(last_used_at)
        );
    }
    Ok(())
}

fn revoke(conn: &mut DbConn, key_id: &str, reason: &str) -> anyhow::Result<()> {
    // A whole key pasted by mistake: revoke it by its id, and never repeat its secret.
    let key_id = match keys::parse_key(key_id) {
        Some(presented) => {
            eprintln!(
                "note: that was a whole API key; revoking its key id {}",
                presented.key_id
            );
            presented.key_id
        }
        None => key_id,
    };
    if !keys::is_key_id(key_id) {
        bail!("that is not a key id (12 lower-case letters and digits, as `list` shows)");
    }
    match key_store::revoke_key(conn, key_id, reason).context("revoking the key")? {
        Revocation::Revoked => println!("Revoked key {key_id}."),
        Revocation::AlreadyRevoked => println!("Key {key_id} was already revoked."),
        Revocation::UnknownKey => bail!("no key with id {key_id}"),
    }
    Ok(())
}

fn grant_reader(
    conn: &mut DbConn,
    client_id: i64,
    role: Option<String>,
    loader_role: Option<&str>,
    as_json: bool,
) -> anyhow::Result<()> {
    let role = role.unwrap_or_else(|| reader_roles::default_role_name(client_id));
    let ReaderGrant {
        role,
        password,
        client_id,
        created,
    } = reader_roles::grant_reader(conn, client_id, &role, loader_role)?;
    if as_json {
        println!(
            "{}",
            json!({"role": role, "password": password, "client_id": client_id})
        );
    } else {
        let done = if created {
            "Created"
        } else {
            "Rotated the password of"
        };
        println!(
            "{done} reader role {role}: it can read schema {} only.",
            reader_roles::client_schema(client_id)
        );
        println!("Password (shown only now; store it safely):");
        println!("{password}");
    }
    Ok(())
}
