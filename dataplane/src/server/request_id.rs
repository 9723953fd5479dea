//! Request ids: assigned at accept, returned as `x-request-id` on every response (errors
//! included) and written on the access log line, so a client's report can be matched to
//! what the gateway did.

use std::fmt;

/// 32 lowercase hex digits: 64 random bits drawn at worker start, then a 64-bit counter.
/// Unique within a process without coordination between cores, and across restarts and
/// nodes with overwhelming probability.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId([u8; 32]);

impl RequestId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn as_str(&self) -> &str {
        // Only hex digits are ever written.
        std::str::from_utf8(&self.0).unwrap_or("")
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

/// One per worker; not shared, so no atomics.
#[derive(Debug)]
pub struct RequestIdGen {
    /// The random half, in hex (formatted once).
    prefix: [u8; 16],
    counter: u64,
}

impl RequestIdGen {
    pub fn new() -> Self {
        let mut seed = [0u8; 8];
        // On failure fall back to time and thread: still unique within this process because
        // of the counter, just less so across nodes.
        if getrandom::fill(&mut seed).is_err() {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            seed = t.to_le_bytes();
        }
        let mut prefix = [0u8; 16];
        hex64(u64::from_le_bytes(seed), &mut prefix);
        Self { prefix, counter: 0 }
    }

    pub fn next_id(&mut self) -> RequestId {
        self.counter = self.counter.wrapping_add(1);
        let mut out = [0u8; 32];
        out[..16].copy_from_slice(&self.prefix);
        hex64(self.counter, &mut out[16..]);
        RequestId(out)
    }
}

impl Default for RequestIdGen {
    fn default() -> Self {
        Self::new()
    }
}

fn hex64(v: u64, out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, slot) in out.iter_mut().enumerate().take(16) {
        *slot = HEX[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_hex_and_distinct() {
        let mut g = RequestIdGen::new();
        let a = g.next_id();
        let b = g.next_id();
        assert_ne!(a, b);
        assert_eq!(a.as_str().len(), 32);
        assert!(a
            .as_bytes()
            .iter()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(&a.as_str()[..16], &b.as_str()[..16]);
        assert!(b.as_str().ends_with("0000000000000002"));
    }
}
