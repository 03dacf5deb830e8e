//! API key verification with a short-lived cache, so argon2 stays off the hot path.
//!
//! Per key id the cache keeps the stored credentials (refreshed from the database once per
//! TTL, which bounds how long a revocation takes to reach this server) and the SHA-256 digest
//! of the secret that argon2 last accepted. A request whose secret matches that digest
//! (compared in constant time) costs no argon2; unknown key ids cost none either. Each key id
//! runs at most one argon2 verification at a time and at most [`MAX_FAILED_VERIFIES_PER_TTL`]
//! failed ones per TTL, so a flood of wrong secrets cannot make the server spend unbounded
//! argon2 time.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix_web::HttpRequest;
use actix_web::http::header::AUTHORIZATION;
use intake_core::key_store::{self, KeyCredentials};
use intake_core::keys::{self, PresentedKey};
use subtle::ConstantTimeEq;

use crate::db_gate::{DbGate, GateError};

/// Failed argon2 verifications allowed per key id per TTL before wrong secrets are refused
/// without hashing.
pub const MAX_FAILED_VERIFIES_PER_TTL: u32 = 16;
/// Above this many cached key ids, stale entries are swept on insert (bounds memory when
/// clients present many unknown key ids).
const SWEEP_ABOVE: usize = 50_000;

/// Why a key was not accepted.
#[derive(Debug)]
pub enum AuthFailure {
    /// Missing, malformed, unknown, wrong or revoked: all answered alike (401).
    Invalid,
    /// The database could not be asked (503).
    Unavailable(GateError),
    /// Too many wrong secrets for this key id lately: try again after this many seconds
    /// (429). Never 401, so that guessing cannot make a valid key look revoked.
    Throttled(u64),
}

#[derive(Default)]
struct SlotState {
    fetched_at: Option<Instant>,
    /// After a failed lookup, requests queued behind it fail fast until then instead of each
    /// waiting out its own database timeout.
    unavailable_until: Option<Instant>,
    credentials: Option<KeyCredentials>,
    verified_digest: Option<[u8; 32]>,
    failed_verifies: u32,
}

struct Slot {
    state: tokio::sync::Mutex<SlotState>,
    touched: Mutex<Instant>,
}

/// The per-process key cache.
pub struct KeyVerifier {
    gate: DbGate,
    ttl: Duration,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    used: Mutex<HashSet<String>>,
}

impl KeyVerifier {
    pub fn new(gate: DbGate, ttl: Duration) -> KeyVerifier {
        KeyVerifier {
            gate,
            ttl,
            slots: Mutex::default(),
            used: Mutex::default(),
        }
    }

    /// Checks a presented key and returns the client id it belongs to.
    pub async fn verify(&self, presented: &str) -> Result<i64, AuthFailure> {
        let PresentedKey { key_id, secret } =
            keys::parse_key(presented).ok_or(AuthFailure::Invalid)?;
        let slot = self.slot(key_id);
        let mut state = slot.state.lock().await;
        let stale = state.fetched_at.is_none_or(|at| at.elapsed() >= self.ttl);
        if stale {
            if state
                .unavailable_until
                .is_some_and(|until| Instant::now() < until)
            {
                return Err(AuthFailure::Unavailable(GateError::Busy));
            }
            let id = key_id.to_owned();
            let started = Instant::now();
            let fresh = match self
                .gate
                .run(move |conn| key_store::find_credentials(conn, &id))
                .await
            {
                Ok(fresh) => fresh,
                Err(e) => {
                    state.unavailable_until =
                        Some(Instant::now() + started.elapsed().max(Duration::from_millis(250)));
                    return Err(AuthFailure::Unavailable(e));
                }
            };
            state.unavailable_until = None;
            let same_hash = match (&fresh, &state.credentials) {
                (Some(new), Some(old)) => new.secret_hash == old.secret_hash,
                _ => false,
            };
            if !same_hash {
                state.verified_digest = None;
            }
            state.credentials = fresh;
            state.fetched_at = Some(Instant::now());
            state.failed_verifies = 0;
        }
        let credentials = match &state.credentials {
            Some(c) if !c.revoked => c.clone(),
            _ => return Err(AuthFailure::Invalid),
        };
        let digest = keys::secret_digest(secret);
        if let Some(known) = &state.verified_digest {
            return if bool::from(known.ct_eq(&digest)) {
                self.mark_used(key_id);
                Ok(credentials.client_id)
            } else {
                // Only one secret matches the stored hash, and it is not this one.
                Err(AuthFailure::Invalid)
            };
        }
        if state.failed_verifies >= MAX_FAILED_VERIFIES_PER_TTL {
            let wait = state
                .fetched_at
                .map_or(self.ttl, |at| self.ttl.saturating_sub(at.elapsed()));
            return Err(AuthFailure::Throttled(wait.as_secs().max(1)));
        }
        let secret = secret.to_owned();
        let hash = credentials.secret_hash.clone();
        let ok = actix_web::web::block(move || keys::verify_secret(&secret, &hash))
            .await
            .unwrap_or(false);
        if ok {
            state.verified_digest = Some(digest);
            self.mark_used(key_id);
            Ok(credentials.client_id)
        } else {
            state.failed_verifies += 1;
            Err(AuthFailure::Invalid)
        }
    }

    fn slot(&self, key_id: &str) -> Arc<Slot> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(key_id) {
            *slot.touched.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
            return slot.clone();
        }
        if slots.len() >= SWEEP_ABOVE {
            let ttl = self.ttl;
            slots.retain(|_, s| s.touched.lock().map(|t| t.elapsed() < ttl).unwrap_or(false));
        }
        let slot = Arc::new(Slot {
            state: Default::default(),
            touched: Mutex::new(Instant::now()),
        });
        slots.insert(key_id.to_owned(), slot.clone());
        slot
    }

    fn mark_used(&self, key_id: &str) {
        let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
        if !used.contains(key_id) {
            used.insert(key_id.to_owned());
        }
    }

    /// Writes the keys used since the last call to `last_used_at`, in one statement.
    pub async fn flush_last_used(&self) {
        let ids: Vec<String> = {
            let mut used = self.used.lock().unwrap_or_else(|p| p.into_inner());
            used.drain().collect()
        };
        if ids.is_empty() {
            return;
        }
        let now = intake_core::timestamps::now();
        if let Err(e) = self
            .gate
            .run(move |conn| key_store::touch_last_used(conn, &ids, now))
            .await
        {
            log::warn!("could not record keys' last use (will retry with the next use): {e}");
        }
    }
}

/// The key a request presents: `?apikey=`, `Authorization: Bearer`, or `X-Api-Key`.
pub fn presented_key(req: &HttpRequest) -> Option<String> {
    let from_query = serde_urlencoded::from_str::<Vec<(String, String)>>(req.query_string())
        .ok()
        .and_then(|pairs| {
            pairs
                .into_iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("apikey"))
                .map(|(_, v)| v)
        });
    if let Some(key) = from_query.filter(|k| !k.is_empty()) {
        return Some(key);
    }
    if let Some(value) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    {
        let value = value.trim();
        if value.len() > 7 && value[..7].eq_ignore_ascii_case("bearer ") {
            return Some(value[7..].trim().to_owned());
        }
    }
    req.headers()
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim().to_owned())
        .filter(|v| !v.is_empty())
}
