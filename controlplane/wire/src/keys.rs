//! The gateway's API key format, shared by the control plane (which mints keys) and the data
//! plane (which checks them on every request), and usable by any secret scanner.
//!
//! ```text
//! aigw_<env>_<key id>_<secret><checksum>
//!      prod  12 base62   30 base62   6 base62 CRC32 of everything before it
//! ```
//!
//! The secret carries 30 × log2(62) ≈ 178 random bits. The CRC32 lets a scanner tell a real
//! key from a look-alike offline with almost no false positives (as GitHub's tokens do);
//! the key id is public and is what lookups use; only SHA-256 of the whole key is stored.

use sha2::{Digest, Sha256};

pub const PREFIX: &str = "aigw_";
pub const KEY_ID_LEN: usize = 12;
pub const SECRET_LEN: usize = 30;
pub const CHECKSUM_LEN: usize = 6;
/// Hash version 1: SHA-256 over the full key text.
pub const HASH_VERSION: u64 = 1;

/// Shortest admin or node token either plane accepts: generated ones are 40 random base62
/// characters behind their prefix; an empty or short token is never a valid credential.
pub const MIN_TOKEN_LEN: usize = 32;

/// Whether `token` is long enough to be a credential (see [`MIN_TOKEN_LEN`]).
pub fn token_is_acceptable(token: &str) -> bool {
    token.len() >= MIN_TOKEN_LEN && token.bytes().all(|b| b.is_ascii_graphic())
}

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// The three environments every tenant has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Production,
    Staging,
    Development,
}

impl Environment {
    pub const ALL: [Self; 3] = [Self::Production, Self::Staging, Self::Development];

    /// The tag inside keys.
    pub const fn tag(self) -> &'static str {
        match self {
            Self::Production => "prod",
            Self::Staging => "stg",
            Self::Development => "dev",
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Production => "production",
            Self::Staging => "staging",
            Self::Development => "development",
        }
    }

    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.name() == s)
    }

    fn from_tag(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|e| e.tag() == s)
    }
}

/// A syntactically valid key with a correct checksum. Says nothing about whether the key
/// exists or is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    pub environment: Environment,
    pub key_id: &'a str,
}

/// Why a string is not a gateway key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyFormatError {
    #[error("not an aigateway key")]
    NotAKey,
    #[error("key checksum does not match")]
    BadChecksum,
}

/// Checks the format and checksum (no lookup, no hashing).
pub fn parse(key: &str) -> Result<ParsedKey<'_>, KeyFormatError> {
    let rest = key.strip_prefix(PREFIX).ok_or(KeyFormatError::NotAKey)?;
    let (env, rest) = rest.split_once('_').ok_or(KeyFormatError::NotAKey)?;
    let environment = Environment::from_tag(env).ok_or(KeyFormatError::NotAKey)?;
    let (key_id, tail) = rest.split_once('_').ok_or(KeyFormatError::NotAKey)?;
    if key_id.len() != KEY_ID_LEN
        || tail.len() != SECRET_LEN + CHECKSUM_LEN
        || !key_id
            .bytes()
            .chain(tail.bytes())
            .all(|b| b.is_ascii_alphanumeric())
    {
        return Err(KeyFormatError::NotAKey);
    }
    let body_len = key.len() - CHECKSUM_LEN;
    if encode_checksum(crc32(&key.as_bytes()[..body_len])) != key.as_bytes()[body_len..] {
        return Err(KeyFormatError::BadChecksum);
    }
    Ok(ParsedKey {
        environment,
        key_id,
    })
}

/// SHA-256 of the full key text (hash version 1).
pub fn hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// Builds a key from its parts; `key_id` and `secret` must be base62 of the right lengths
/// (the caller draws them from a CSPRNG with [`random_base62`]).
pub fn assemble(environment: Environment, key_id: &str, secret: &str) -> String {
    let mut key =
        String::with_capacity(PREFIX.len() + 4 + 1 + KEY_ID_LEN + 1 + SECRET_LEN + CHECKSUM_LEN);
    key.push_str(PREFIX);
    key.push_str(environment.tag());
    key.push('_');
    key.push_str(key_id);
    key.push('_');
    key.push_str(secret);
    let sum = encode_checksum(crc32(key.as_bytes()));
    key.push_str(std::str::from_utf8(&sum).unwrap_or_default());
    key
}

/// Maps random bytes to base62 without modulo bias (bytes ≥ 248 are rejected); returns
/// `None` if `random` ran out before `len` characters.
pub fn random_base62(random: &[u8], len: usize) -> Option<String> {
    let s: String = random
        .iter()
        .filter(|&&b| b < 248)
        .take(len)
        .map(|&b| BASE62[(b % 62) as usize] as char)
        .collect();
    (s.len() == len).then_some(s)
}

/// Every substring of `text` that is a valid gateway key (format and checksum): the leak
/// detector a scanner or the data plane runs over prompts and completions.
pub fn find_keys(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(PREFIX) {
        let start = from + i;
        let end = text[start..]
            .char_indices()
            .find(|&(_, c)| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |(j, _)| start + j);
        if parse(&text[start..end]).is_ok() {
            out.push(&text[start..end]);
        }
        from = start + PREFIX.len();
    }
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(data);
    h.finalize()
}

fn encode_checksum(mut v: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(v % 62) as usize];
        v /= 62;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> String {
        assemble(
            Environment::Production,
            "k7Hq2Lx9Pw3Z",
            "abcdefghijABCDEFGHIJ0123456789",
        )
    }

    #[test]
    fn round_trip() {
        let key = sample();
        assert!(key.starts_with("aigw_prod_k7Hq2Lx9Pw3Z_abcdefghij"));
        let p = parse(&key).expect("valid");
        assert_eq!(p.environment, Environment::Production);
        assert_eq!(p.key_id, "k7Hq2Lx9Pw3Z");
        assert_eq!(hash(&key), hash(&key.clone()));
    }

    #[test]
    fn any_single_character_change_breaks_the_checksum() {
        let key = sample();
        let body = key.len() - CHECKSUM_LEN;
        for i in (PREFIX.len() + 5)..body {
            let mut bad = key.clone().into_bytes();
            bad[i] = if bad[i] == b'a' { b'b' } else { b'a' };
            let bad = String::from_utf8(bad).expect("ascii");
            if bad.as_bytes()[i] == b'_' {
                continue;
            }
            assert!(parse(&bad).is_err(), "change at {i} accepted");
        }
    }

    #[test]
    fn malformed_keys_are_not_keys() {
        for s in [
            "",
            "sk-abc",
            "aigw_",
            "aigw_prod_short_x",
            "aigw_live_k7Hq2Lx9Pw3Z_abcdefghijABCDEFGHIJ0123456789AAAAAA",
        ] {
            assert_eq!(parse(s), Err(KeyFormatError::NotAKey), "{s}");
        }
    }

    #[test]
    fn random_base62_has_no_bias_source() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        let s = random_base62(&bytes, 62).expect("enough");
        assert_eq!(s.as_bytes(), BASE62);
        assert_eq!(random_base62(&[255; 100], 1), None);
    }

    #[test]
    fn finds_keys_in_text() {
        let key = sample();
        let text = format!("here is my key: {key}. and aigw_prod_fake_123 and {key}x");
        assert_eq!(find_keys(&text), vec![key.as_str()]);
    }
}
