//! API key format and secret hashing.
//!
//! A key is `intake_<key id>_<secret>`: the key id is public (it names the row, so unknown ids
//! are refused without any hashing), the secret is 192 bits from the OS RNG and only its
//! argon2id hash is stored.

use argon2::{Argon2, PasswordHasher, PasswordVerifier};
use rand::TryRng;
use rand::rngs::SysRng;
use sha2::{Digest, Sha256};

/// Every key starts with this, so that leaked keys are easy to recognise and to scan for.
pub const KEY_PREFIX: &str = "intake";
const KEY_ID_LEN: usize = 12;
const SECRET_LEN: usize = 32;
const KEY_ID_ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
pub(crate) const SECRET_ALPHABET: &[u8] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A freshly made key: the full text is shown once, the hash is what gets stored.
pub struct NewKey {
    pub key_id: String,
    pub api_key: String,
    pub secret_hash: String,
}

/// A key as presented by a client, split into its parts.
#[derive(Debug, PartialEq, Eq)]
pub struct PresentedKey<'a> {
    pub key_id: &'a str,
    pub secret: &'a str,
}

/// Makes a new random key and hashes its secret.
pub fn generate_key() -> anyhow::Result<NewKey> {
    let key_id = random_string(KEY_ID_ALPHABET, KEY_ID_LEN)?;
    let secret = random_string(SECRET_ALPHABET, SECRET_LEN)?;
    let secret_hash = hash_secret(&secret)?;
    Ok(NewKey {
        api_key: format!("{KEY_PREFIX}_{key_id}_{secret}"),
        key_id,
        secret_hash,
    })
}

/// Uniform characters by rejection sampling over OS random bytes (no modulo bias).
pub(crate) fn random_string(alphabet: &[u8], len: usize) -> anyhow::Result<String> {
    let limit = 256 - (256 % alphabet.len());
    let mut out = String::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        SysRng
            .try_fill_bytes(&mut buf)
            .map_err(|e| anyhow::anyhow!("the OS random number generator failed: {e}"))?;
        for &b in &buf {
            if (b as usize) < limit && out.len() < len {
                out.push(alphabet[b as usize % alphabet.len()] as char);
            }
        }
    }
    Ok(out)
}

/// Argon2id (default parameters) hash of a secret, as a PHC string.
pub fn hash_secret(secret: &str) -> anyhow::Result<String> {
    Argon2::default()
        .hash_password(secret.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| anyhow::anyhow!("hashing the key failed: {e}"))
}

/// Whether `secret` matches a stored hash. Costs one argon2 computation (~20 ms).
pub fn verify_secret(secret: &str, secret_hash: &str) -> bool {
    Argon2::default()
        .verify_password(secret.as_bytes(), secret_hash)
        .is_ok()
}

/// A fast digest of a secret, for comparing against one already verified with argon2.
pub fn secret_digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Splits a presented key into key id and secret; `None` if it cannot be one of ours.
pub fn parse_key(text: &str) -> Option<PresentedKey<'_>> {
    let rest = text.strip_prefix(KEY_PREFIX)?.strip_prefix('_')?;
    let (key_id, secret) = rest.split_once('_')?;
    let id_ok = key_id.len() == KEY_ID_LEN && key_id.bytes().all(|b| KEY_ID_ALPHABET.contains(&b));
    let secret_ok = secret.len() == SECRET_LEN && secret.bytes().all(|b| b.is_ascii_alphanumeric());
    (id_ok && secret_ok).then_some(PresentedKey { key_id, secret })
}

/// Whether a string looks like a key id (for CLI arguments and log redaction).
pub fn is_key_id(text: &str) -> bool {
    text.len() == KEY_ID_LEN && text.bytes().all(|b| KEY_ID_ALPHABET.contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_parse_and_verify() {
        let key = generate_key().expect("key");
        let parsed = parse_key(&key.api_key).expect("parses");
        assert_eq!(parsed.key_id, key.key_id);
        assert!(key.secret_hash.starts_with("$argon2id$"));
        assert!(!key.secret_hash.contains(parsed.secret));
        assert!(verify_secret(parsed.secret, &key.secret_hash));
        let mut wrong = parsed.secret.to_owned();
        wrong.replace_range(0..1, if wrong.starts_with('A') { "B" } else { "A" });
        assert!(!verify_secret(&wrong, &key.secret_hash));
    }

    #[test]
    fn keys_are_distinct() {
        let a = generate_key().expect("key");
        let b = generate_key().expect("key");
        assert_ne!(a.api_key, b.api_key);
        assert_ne!(a.key_id, b.key_id);
    }

    #[test]
    fn malformed_keys_are_refused() {
        let good = format!("intake_{}_{}", "a".repeat(12), "B".repeat(32));
        assert!(parse_key(&good).is_some());
        for bad in [
            "",
            "intake",
            "intake__",
            &format!("other_{}_{}", "a".repeat(12), "B".repeat(32)),
            &format!("intake_{}_{}", "A".repeat(12), "B".repeat(32)),
            &format!("intake_{}_{}", "a".repeat(11), "B".repeat(32)),
            &format!("intake_{}_{}", "a".repeat(12), "B".repeat(31)),
            &format!("intake_{}_{}!", "a".repeat(12), "B".repeat(31)),
        ] {
            assert!(parse_key(bad).is_none(), "{bad:?}");
        }
    }
}
