//! A data directory's keyring: the key that seals its files and columns (the data key),
//! kept apart from them in one small file, wrapped by the operator's key-encryption key.
//!
//! Every sealed file has a data key of its own, wrapped by the keyring's key; the keyring's
//! key is wrapped by the key-encryption key. Replacing the key-encryption key therefore
//! rewrites only the keyring file — a few dozen bytes — whatever the amount of sealed data,
//! and can be done while the process that uses the data key runs (it read the keyring at
//! start).
//!
//! ```text
//! "AIGWKEYS" · version (1) · count (1) · count × [ nonce (12) · wrapped key (32) · tag (16) ]
//! ```
//!
//! A keyring holds the data key wrapped by one key-encryption key, or by two while a
//! rotation is under way ([`begin_rotation`], then [`finish_rotation`]), so a rotation
//! interrupted at any point leaves a keyring that one of the two keys opens.

use std::path::Path;

use boring::symm::{decrypt_aead, encrypt_aead, Cipher};

use crate::{random, Kek, SealError, KEY, NONCE, TAG};

const MAGIC: &[u8; 8] = b"AIGWKEYS";
const VERSION: u8 = 1;
/// The associated data every wrapped copy is bound to.
const AAD: &[u8] = b"AIGWKEYS\x01aigw data key";
const ENTRY: usize = NONCE + KEY + TAG;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}: not a keyring, or an unsupported version")]
    Format(String),
    #[error("{0}: the seal key does not open this keyring (a wrong seal key, or the new key of an interrupted rotation?)")]
    WrongKey(String),
    #[error("{0}")]
    Seal(#[from] SealError),
}

fn wrap(kek: &Kek, data_key: &[u8; KEY]) -> Result<[u8; ENTRY], SealError> {
    let nonce: [u8; NONCE] = random()?;
    let mut tag = [0u8; TAG];
    let ct = encrypt_aead(
        Cipher::aes_256_gcm(),
        &kek.0,
        Some(&nonce),
        AAD,
        data_key,
        &mut tag,
    )
    .map_err(|e| SealError::Crypto(e.to_string()))?;
    let mut e = [0u8; ENTRY];
    e[..NONCE].copy_from_slice(&nonce);
    e[NONCE..NONCE + KEY].copy_from_slice(&ct);
    e[NONCE + KEY..].copy_from_slice(&tag);
    Ok(e)
}

fn unwrap_entry(kek: &Kek, e: &[u8]) -> Option<[u8; KEY]> {
    let (nonce, rest) = e.split_at(NONCE);
    let (ct, tag) = rest.split_at(KEY);
    let pt = decrypt_aead(Cipher::aes_256_gcm(), &kek.0, Some(nonce), AAD, ct, tag).ok()?;
    pt.try_into().ok()
}

fn encode(entries: &[[u8; ENTRY]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + entries.len() * ENTRY);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.push(entries.len() as u8);
    for e in entries {
        out.extend_from_slice(e);
    }
    out
}

fn decode<'a>(path: &Path, bytes: &'a [u8]) -> Result<Vec<&'a [u8]>, KeyringError> {
    let bad = || KeyringError::Format(path.display().to_string());
    if bytes.len() < 10 || &bytes[..8] != MAGIC || bytes[8] != VERSION {
        return Err(bad());
    }
    let n = usize::from(bytes[9]);
    let body = &bytes[10..];
    if n == 0 || n > 2 || body.len() != n * ENTRY {
        return Err(bad());
    }
    Ok(body.chunks(ENTRY).collect())
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, KeyringError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KeyringError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

fn write(path: &Path, entries: &[[u8; ENTRY]]) -> Result<(), KeyringError> {
    crate::files::write_private(path, &encode(entries)).map_err(|source| KeyringError::Io {
        path: path.display().to_string(),
        source,
    })
}

/// The data key of the keyring at `path`, opened with `kek`. Without a keyring, one is
/// created: holding `adopt` when given (data sealed before keyrings existed was sealed with
/// the key-encryption key itself, which thus becomes the data key), else a fresh random key.
pub fn unlock(path: &Path, kek: &Kek, adopt: Option<&Kek>) -> Result<Kek, KeyringError> {
    match read(path)? {
        Some(bytes) => {
            for e in decode(path, &bytes)? {
                if let Some(k) = unwrap_entry(kek, e) {
                    return Ok(Kek(k));
                }
            }
            Err(KeyringError::WrongKey(path.display().to_string()))
        }
        None => {
            let data_key = match adopt {
                Some(k) => k.0,
                None => random::<KEY>()?,
            };
            write(path, &[wrap(kek, &data_key)?])?;
            Ok(Kek(data_key))
        }
    }
}

/// First step of replacing the key-encryption key `old` with `new`: the keyring then opens
/// with either. Nothing is re-encrypted but the data key.
pub fn begin_rotation(path: &Path, old: &Kek, new: &Kek) -> Result<(), KeyringError> {
    let bytes = read(path)?.ok_or_else(|| KeyringError::Io {
        path: path.display().to_string(),
        source: std::io::ErrorKind::NotFound.into(),
    })?;
    let entries = decode(path, &bytes)?;
    let data_key = entries
        .iter()
        .find_map(|e| unwrap_entry(old, e))
        .ok_or_else(|| KeyringError::WrongKey(path.display().to_string()))?;
    write(path, &[wrap(new, &data_key)?, wrap(old, &data_key)?])
}

/// Last step: the keyring opens with `new` only.
pub fn finish_rotation(path: &Path, new: &Kek) -> Result<(), KeyringError> {
    let data_key = unlock(path, new, None)?;
    write(path, &[wrap(new, &data_key.0)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_rewrites_the_keyring_only_and_the_old_key_stops_opening_it() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keyring");
        let (old, new) = (Kek::generate().unwrap(), Kek::generate().unwrap());
        let data = unlock(&path, &old, None).expect("created");
        let sealed = crate::seal(&data, "t", b"secret").expect("seal");
        assert_eq!(unlock(&path, &old, None).unwrap().0, data.0, "the same key");

        begin_rotation(&path, &old, &new).expect("begin");
        // Interrupted here, either key opens it.
        assert_eq!(unlock(&path, &old, None).unwrap().0, data.0);
        assert_eq!(unlock(&path, &new, None).unwrap().0, data.0);
        finish_rotation(&path, &new).expect("finish");
        let after = unlock(&path, &new, None).expect("new key");
        assert_eq!(crate::open(&after, "t", &sealed).unwrap(), b"secret");
        assert!(matches!(
            unlock(&path, &old, None),
            Err(KeyringError::WrongKey(_))
        ));
        // Tampered or foreign bytes are refused, not taken for a key.
        let mut bytes = std::fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            unlock(&path, &new, None),
            Err(KeyringError::WrongKey(_))
        ));
        std::fs::write(&path, b"AIGWSEAL....").unwrap();
        assert!(matches!(
            unlock(&path, &new, None),
            Err(KeyringError::Format(_))
        ));
    }

    #[test]
    fn data_sealed_before_keyrings_is_adopted() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("keyring");
        let kek = Kek::generate().unwrap();
        let sealed = crate::seal(&kek, "t", b"old").expect("seal");
        let data = unlock(&path, &kek, Some(&kek)).expect("adopted");
        assert_eq!(crate::open(&data, "t", &sealed).unwrap(), b"old");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&path).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }
}
