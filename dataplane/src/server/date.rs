//! The `Date` header (RFC 9110 §6.6.1: an origin server with a clock MUST send it), formatted
//! at most once per second per worker.

use std::time::{Duration, UNIX_EPOCH};

#[derive(Debug)]
pub struct DateCache {
    second: u64,
    value: [u8; 29],
}

impl DateCache {
    pub fn new() -> Self {
        let mut c = Self {
            second: u64::MAX,
            value: [b' '; 29],
        };
        c.get();
        c
    }

    /// e.g. `Sun, 06 Nov 1994 08:49:37 GMT` (IMF-fixdate, always 29 bytes).
    pub fn get(&mut self) -> &[u8] {
        // The coarse wall clock: the header has whole seconds, and a precise clock read per
        // response costs more than the rest of this function.
        let second = crate::runtime::deadline::coarse_unix_secs();
        if second != self.second {
            let s = httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(second));
            if s.len() == self.value.len() {
                self.value.copy_from_slice(s.as_bytes());
            }
            self.second = second;
        }
        &self.value
    }
}

impl Default for DateCache {
    fn default() -> Self {
        Self::new()
    }
}
