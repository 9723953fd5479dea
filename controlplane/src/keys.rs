//! Minting API keys: random public id and secret from the OS CSPRNG, the shared key format
//! (product prefix, environment tag, id, ≥160-bit secret, CRC32), and only the hash kept.

use aigw_wire::keys::{self, Environment, KEY_ID_LEN, SECRET_LEN};

/// A freshly minted key: the plaintext (shown once) and what is stored.
#[derive(Debug)]
pub struct Minted {
    pub plaintext: String,
    pub key_id: String,
    pub hash: [u8; 32],
}

/// Random base62 of `len` characters.
pub fn random_id(len: usize) -> Result<String, getrandom::Error> {
    // Rejection sampling drops ~3 % of bytes; draw generously and retry if short.
    loop {
        let mut bytes = vec![0u8; len * 2];
        getrandom::fill(&mut bytes)?;
        if let Some(s) = keys::random_base62(&bytes, len) {
            return Ok(s);
        }
    }
}

pub fn mint(environment: Environment) -> Result<Minted, getrandom::Error> {
    let key_id = random_id(KEY_ID_LEN)?;
    let secret = random_id(SECRET_LEN)?;
    let plaintext = keys::assemble(environment, &key_id, &secret);
    let hash = keys::hash(&plaintext);
    Ok(Minted {
        plaintext,
        key_id,
        hash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_keys_parse_and_differ() {
        let a = mint(Environment::Staging).expect("rng");
        let b = mint(Environment::Staging).expect("rng");
        assert_ne!(a.plaintext, b.plaintext);
        let p = keys::parse(&a.plaintext).expect("valid format");
        assert_eq!(p.key_id, a.key_id);
        assert_eq!(p.environment, Environment::Staging);
        assert_eq!(keys::hash(&a.plaintext), a.hash);
    }
}
