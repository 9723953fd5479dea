#![forbid(unsafe_code)]
//! Sealing files at rest with AES-256-GCM (BoringSSL), envelope-encrypted: each file gets a
//! fresh random data key, which is itself encrypted ("wrapped") with the key-encryption key
//! the operator provides. Replacing the key-encryption key means re-wrapping 32 bytes per
//! file, and a tenant's own KMS can hold its key-encryption key.
//!
//! ```text
//! head:   "AIGWSEAL" · version (1) · purpose length (1) · purpose
//!         · wrapped data key: nonce (12) · ciphertext (32) · tag (16)
//! chunks: ciphertext length (u32 BE) · nonce (12) · tag (16) · ciphertext     (repeated)
//! ```
//!
//! Files are sealed in chunks so a large file (a million-key snapshot) is written and read
//! with bounded memory. Every chunk's associated data is the head, the chunk's index and a
//! last-chunk flag: chunks cannot be reordered, dropped or appended, the file cannot be
//! truncated at a chunk boundary, and a file sealed for one purpose cannot be passed off as
//! another.

pub mod files;
pub mod keyring;

use boring::rand::rand_bytes;
use boring::symm::{decrypt_aead, encrypt_aead, Cipher};

const MAGIC: &[u8; 8] = b"AIGWSEAL";
const VERSION: u8 = 1;
const NONCE: usize = 12;
const TAG: usize = 16;
const KEY: usize = 32;
/// Largest chunk an opener reads; a length past it in a file is refused before anything is
/// allocated for it. Sealers write chunks well below it (a snapshot part is at most 16 MiB).
pub const MAX_CHUNK: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("not a sealed file, or an unsupported version")]
    Format,
    #[error("sealed for {0:?}, not for this purpose")]
    Purpose(String),
    #[error("authentication failed: wrong key or tampered file")]
    Auth,
    #[error("crypto: {0}")]
    Crypto(String),
    #[error("key-encryption key: {0}")]
    Key(String),
}

/// The operator's key-encryption key (32 bytes).
#[derive(Clone)]
pub struct Kek([u8; KEY]);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Kek(..)")
    }
}

impl Kek {
    /// A key from its 32 bytes (a data key a KMS generated, say).
    pub fn from_bytes(bytes: [u8; KEY]) -> Self {
        Self(bytes)
    }

    /// 64 hex digits (e.g. `openssl rand -hex 32`).
    pub fn from_hex(s: &str) -> Result<Self, SealError> {
        let s = s.trim();
        if s.len() != 2 * KEY || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SealError::Key("must be 64 hex digits (32 bytes)".into()));
        }
        let mut k = [0u8; KEY];
        for (i, slot) in k.iter_mut().enumerate() {
            *slot = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|e| SealError::Key(e.to_string()))?;
        }
        Ok(Self(k))
    }

    /// A fresh random key.
    pub fn generate() -> Result<Self, SealError> {
        Ok(Self(random::<KEY>()?))
    }

    /// The key as 64 hex digits, for writing to a key file.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut b = [0u8; N];
    rand_bytes(&mut b).map_err(|e| SealError::Crypto(e.to_string()))?;
    Ok(b)
}

fn header(purpose: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(10 + purpose.len());
    h.extend_from_slice(MAGIC);
    h.push(VERSION);
    h.push(purpose.len() as u8);
    h.extend_from_slice(purpose.as_bytes());
    h
}

fn chunk_aad(head: &[u8], index: u64, last: bool) -> Vec<u8> {
    let mut aad = Vec::with_capacity(head.len() + 9);
    aad.extend_from_slice(head);
    aad.extend_from_slice(&index.to_be_bytes());
    aad.push(u8::from(last));
    aad
}

/// Seals a file chunk by chunk.
pub struct Sealer {
    dek: [u8; KEY],
    head: Vec<u8>,
    index: u64,
    finished: bool,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("index", &self.index)
            .finish()
    }
}

impl Sealer {
    /// A sealer with a fresh data key, and the file's head bytes to write first.
    pub fn new(kek: &Kek, purpose: &str) -> Result<(Self, Vec<u8>), SealError> {
        let head = header(purpose);
        let dek: [u8; KEY] = random()?;
        let nonce: [u8; NONCE] = random()?;
        let mut tag = [0u8; TAG];
        let wrapped = encrypt_aead(
            Cipher::aes_256_gcm(),
            &kek.0,
            Some(&nonce),
            &head,
            &dek,
            &mut tag,
        )
        .map_err(|e| SealError::Crypto(e.to_string()))?;
        let mut out = head.clone();
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&tag);
        Ok((
            Self {
                dek,
                head,
                index: 0,
                finished: false,
            },
            out,
        ))
    }

    /// Seals one chunk; `last` must be set on the final one.
    pub fn chunk(&mut self, plaintext: &[u8], last: bool) -> Result<Vec<u8>, SealError> {
        if self.finished {
            return Err(SealError::Crypto("chunk after the last one".into()));
        }
        let aad = chunk_aad(&self.head, self.index, last);
        let nonce: [u8; NONCE] = random()?;
        let mut tag = [0u8; TAG];
        let ct = encrypt_aead(
            Cipher::aes_256_gcm(),
            &self.dek,
            Some(&nonce),
            &aad,
            plaintext,
            &mut tag,
        )
        .map_err(|e| SealError::Crypto(e.to_string()))?;
        let len =
            u32::try_from(ct.len()).map_err(|_| SealError::Crypto("chunk too large".into()))?;
        let mut out = Vec::with_capacity(4 + NONCE + TAG + ct.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&tag);
        out.extend_from_slice(&ct);
        self.index += 1;
        self.finished = last;
        Ok(out)
    }
}

/// Opens a sealed file chunk by chunk from a reader.
pub struct Opener<R> {
    reader: R,
    dek: [u8; KEY],
    head: Vec<u8>,
    index: u64,
    done: bool,
}

impl<R> std::fmt::Debug for Opener<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("index", &self.index)
            .finish()
    }
}

impl<R: std::io::Read> Opener<R> {
    pub fn new(kek: &Kek, purpose: &str, mut reader: R) -> Result<Self, SealError> {
        let mut fixed = [0u8; 10];
        reader
            .read_exact(&mut fixed)
            .map_err(|_| SealError::Format)?;
        if &fixed[..8] != MAGIC || fixed[8] != VERSION {
            return Err(SealError::Format);
        }
        let mut p = vec![0u8; fixed[9] as usize];
        reader.read_exact(&mut p).map_err(|_| SealError::Format)?;
        let stored = String::from_utf8_lossy(&p).into_owned();
        if stored != purpose {
            return Err(SealError::Purpose(stored));
        }
        let head = header(purpose);
        let mut wrap = [0u8; NONCE + KEY + TAG];
        reader
            .read_exact(&mut wrap)
            .map_err(|_| SealError::Format)?;
        let dek = decrypt_aead(
            Cipher::aes_256_gcm(),
            &kek.0,
            Some(&wrap[..NONCE]),
            &head,
            &wrap[NONCE..NONCE + KEY],
            &wrap[NONCE + KEY..],
        )
        .map_err(|_| SealError::Auth)?;
        let dek = <[u8; KEY]>::try_from(dek.as_slice()).map_err(|_| SealError::Auth)?;
        Ok(Self {
            reader,
            dek,
            head,
            index: 0,
            done: false,
        })
    }

    /// The reader, positioned after the last chunk read.
    pub fn get_ref(&self) -> &R {
        &self.reader
    }

    /// The next chunk's plaintext; `None` after the last one. A file that ends before its
    /// last chunk is an error, never a silent short read.
    pub fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, SealError> {
        if self.done {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        self.reader
            .read_exact(&mut len)
            .map_err(|_| SealError::Format)?;
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_CHUNK {
            return Err(SealError::Format);
        }
        let mut nt = [0u8; NONCE + TAG];
        self.reader
            .read_exact(&mut nt)
            .map_err(|_| SealError::Format)?;
        // Read what is there, up to the length claimed, so a short file with a large claim
        // costs only what it holds.
        use std::io::Read as _;
        let mut ct = Vec::new();
        (&mut self.reader)
            .take(len as u64)
            .read_to_end(&mut ct)
            .map_err(|_| SealError::Format)?;
        if ct.len() != len {
            return Err(SealError::Format);
        }
        // Try as a middle chunk, then as the last one: the flag is authenticated, not stored.
        for last in [false, true] {
            let aad = chunk_aad(&self.head, self.index, last);
            if let Ok(pt) = decrypt_aead(
                Cipher::aes_256_gcm(),
                &self.dek,
                Some(&nt[..NONCE]),
                &aad,
                &ct,
                &nt[NONCE..],
            ) {
                self.index += 1;
                self.done = last;
                if last {
                    // Nothing may follow the last chunk.
                    let mut extra = [0u8; 1];
                    match self.reader.read(&mut extra) {
                        Ok(0) => {}
                        _ => return Err(SealError::Format),
                    }
                }
                return Ok(Some(pt));
            }
        }
        Err(SealError::Auth)
    }
}

/// Seals `plaintext` as a one-chunk file.
pub fn seal(kek: &Kek, purpose: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
    let (mut s, mut out) = Sealer::new(kek, purpose)?;
    out.extend_from_slice(&s.chunk(plaintext, true)?);
    Ok(out)
}

/// Opens a file sealed by [`seal`] (or any chunked file, concatenating its chunks).
pub fn open(kek: &Kek, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, SealError> {
    let mut o = Opener::new(kek, purpose, sealed)?;
    let mut out = Vec::new();
    while let Some(c) = o.next_chunk()? {
        out.extend_from_slice(&c);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_round_trip_through_hex_and_differ() {
        let a = Kek::generate().expect("random");
        let b = Kek::generate().expect("random");
        assert_ne!(a.to_hex(), b.to_hex());
        let again = Kek::from_hex(&a.to_hex()).expect("hex");
        let sealed = seal(&a, "t", b"secret").expect("seals");
        assert_eq!(open(&again, "t", &sealed).expect("opens"), b"secret");
    }

    fn kek(b: u8) -> Kek {
        Kek([b; KEY])
    }

    #[test]
    fn round_trip_and_fresh_nonces() {
        let a = seal(&kek(1), "key-snapshot", b"secret table").expect("seals");
        let b = seal(&kek(1), "key-snapshot", b"secret table").expect("seals");
        assert_ne!(a, b, "a fresh data key and nonces every time");
        assert!(
            !a.windows(12).any(|w| w == b"secret table"),
            "no plaintext on disk"
        );
        assert_eq!(
            open(&kek(1), "key-snapshot", &a).expect("opens"),
            b"secret table"
        );
    }

    #[test]
    fn wrong_key_tampering_and_purpose_are_refused() {
        let s = seal(&kek(1), "key-snapshot", b"data").expect("seals");
        assert!(matches!(
            open(&kek(2), "key-snapshot", &s),
            Err(SealError::Auth)
        ));
        assert!(matches!(
            open(&kek(1), "body-log", &s),
            Err(SealError::Purpose(_))
        ));
        for i in [0, 9, 30, s.len() - 1] {
            let mut t = s.clone();
            t[i] ^= 1;
            assert!(open(&kek(1), "key-snapshot", &t).is_err(), "flip at {i}");
        }
        assert!(matches!(
            open(&kek(1), "key-snapshot", &s[..20]),
            Err(SealError::Format)
        ));
    }

    #[test]
    fn chunks_cannot_be_dropped_reordered_or_truncated() {
        let (mut s, mut file) = Sealer::new(&kek(3), "p").expect("sealer");
        let head_len = file.len();
        let c0 = s.chunk(b"zero", false).expect("chunk");
        let c1 = s.chunk(b"one", false).expect("chunk");
        let c2 = s.chunk(b"two", true).expect("chunk");
        let mut whole = file.clone();
        for c in [&c0, &c1, &c2] {
            whole.extend_from_slice(c);
        }
        assert_eq!(open(&kek(3), "p", &whole).expect("opens"), b"zeroonetwo");
        // Truncated at a chunk boundary: the last chunk never came.
        let mut cut = file.clone();
        cut.extend_from_slice(&c0);
        cut.extend_from_slice(&c1);
        assert!(open(&kek(3), "p", &cut).is_err());
        // Reordered.
        file.truncate(head_len);
        for c in [&c1, &c0, &c2] {
            file.extend_from_slice(c);
        }
        assert!(matches!(open(&kek(3), "p", &file), Err(SealError::Auth)));
        // Bytes after the last chunk.
        let mut trailing = whole.clone();
        trailing.push(0);
        assert!(matches!(
            open(&kek(3), "p", &trailing),
            Err(SealError::Format)
        ));
        // A chunk length past the bound is refused before anything is allocated for it.
        let mut huge = whole[..head_len].to_vec();
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        huge.extend_from_slice(&[0; NONCE + TAG]);
        assert!(matches!(open(&kek(3), "p", &huge), Err(SealError::Format)));
    }

    #[test]
    fn kek_from_hex() {
        assert!(Kek::from_hex(&"ab".repeat(32)).is_ok());
        assert!(Kek::from_hex("abc").is_err());
        assert!(Kek::from_hex(&"zz".repeat(32)).is_err());
    }
}
