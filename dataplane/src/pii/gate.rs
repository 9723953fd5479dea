//! Where the rules Hyperscan serves poorly can match, found without it: the numeric rules'
//! digit runs (below) and the IPv6 head's colon pairs ([`colon_pairs`]).
//!
//! Phone numbers, cards, SSNs, IPv4 addresses and IBANs are the expensive rules: they start on
//! any digit, so on text with digits every one of their automata wakes up. Each of them,
//! though, matches only around a *digit run*: digits where consecutive digits are at most two
//! separators (`space . - / ( )`) apart. A rule matches (and its validator can accept) only
//! around a run that *qualifies*:
//!
//! - national phones, cards and SSNs need at least 9 digits in one run (their validators ask
//!   10, 12 and exactly 9);
//! - an IPv4 address needs three dots in one run;
//! - an E.164 number starts with `+` and a digit 1–9, the run's first digit;
//! - an IBAN starts with two capitals and two digits, the run's first two (it continues past
//!   the run, letters and all, for at most its width).
//!
//! Every match of these rules, validated or not, starts within `[run start − 2, run end)`: a
//! `(` or `+` right before the first digit, an IBAN's two capitals, or a digit of the run. All
//! the matches that end where one does (its other starts) belong to the same run, so trying
//! every start in the qualifying runs' ranges finds each match's leftmost start, as Hyperscan
//! reports it, and a run that does not qualify holds nothing a validator accepts.

/// The IPv6 rule's Hyperscan head `:[0-9A-Fa-f]{0,4}:`, found with a SIMD search for colons
/// instead (in logs and times colons are common, and the head cost the database about 40 % of
/// its time on prompts): each pair of consecutive colons at most four hex digits apart, as
/// `(start, end)`. A colon is not a hex digit, so for each end the leftmost start Hyperscan
/// would report is the colon before: these are exactly its hits.
pub(crate) fn colon_pairs(text: &[u8], mut hit: impl FnMut(usize, usize)) {
    let mut prev: Option<usize> = None;
    for c in memchr::memchr_iter(b':', text) {
        if let Some(p) = prev {
            if c - p <= 5 && text[p + 1..c].iter().all(u8::is_ascii_hexdigit) {
                hit(p, c + 1);
            }
        }
        prev = Some(c);
    }
}

/// Bytes the numeric rules allow between two digits.
fn sep(b: u8) -> bool {
    matches!(b, b' ' | b'.' | b'-' | b'/' | b'(' | b')')
}

const ONES: u64 = 0x0101_0101_0101_0101;

/// The high bit of each byte of `x` that is an ASCII digit, exactly: per byte, `'0' − 1 <
/// b < '9' + 1` computed without carries or borrows between bytes.
fn digit_bits(x: u64) -> u64 {
    let low = x & (ONES * 127);
    (ONES * (127 + u64::from(b'9' + 1)) - low)
        & !x
        & (low + ONES * (127 - u64::from(b'0' - 1)))
        & (ONES * 128)
}

/// Position of the first ASCII digit at or after `from`, 8 bytes at a time.
fn next_digit(t: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    while let Some(chunk) = t.get(i..i + 8).and_then(|c| <[u8; 8]>::try_from(c).ok()) {
        let bits = digit_bits(u64::from_le_bytes(chunk));
        if bits != 0 {
            return Some(i + bits.trailing_zeros() as usize / 8);
        }
        i += 8;
    }
    t.get(i..)?
        .iter()
        .position(u8::is_ascii_digit)
        .map(|p| i + p)
}

/// The ranges of `text` in which a numeric rule's match can start, sorted and disjoint.
pub(crate) fn starts(text: &[u8], out: &mut Vec<(usize, usize)>) {
    out.clear();
    let len = text.len();
    let mut i = 0;
    while let Some(rs) = next_digit(text, i) {
        let mut j = rs;
        let mut digits = 0usize;
        let mut dots = 0usize;
        let re = loop {
            while j < len && text[j].is_ascii_digit() {
                j += 1;
                digits += 1;
            }
            let mut k = j;
            while k < len && k - j < 2 && sep(text[k]) {
                k += 1;
            }
            if k > j && k < len && text[k].is_ascii_digit() {
                dots += text[j..k].iter().filter(|&&b| b == b'.').count();
                j = k;
            } else {
                break j;
            }
        };
        let upper = |back: usize| {
            rs.checked_sub(back)
                .is_some_and(|a| text[a].is_ascii_uppercase())
        };
        let intl = rs >= 1 && text[rs - 1] == b'+' && text[rs] != b'0';
        let iban = upper(2) && upper(1) && text.get(rs + 1).is_some_and(u8::is_ascii_digit);
        if digits >= 9 || dots >= 3 || intl || iban {
            let from = rs.saturating_sub(2);
            match out.last_mut() {
                Some(last) if from <= last.1 => last.1 = re,
                _ => out.push((from, re)),
            }
        }
        i = re;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(t: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        starts(t.as_bytes(), &mut out);
        out
    }

    #[test]
    fn digit_bits_are_exact() {
        for b in 0..=255u8 {
            for at in 0..8 {
                let mut x = [b'x'; 8];
                x[at] = b;
                let bits = digit_bits(u64::from_le_bytes(x));
                let want = if b.is_ascii_digit() {
                    0x80u64 << (8 * at)
                } else {
                    0
                };
                assert_eq!(bits, want, "byte {b} at {at}");
            }
        }
        assert_eq!(next_digit(b"abcdefghijklmnopq7", 0), Some(17));
        assert_eq!(next_digit(b"\xff\xfe9", 0), Some(2));
        assert_eq!(next_digit(b"no", 0), None);
    }

    #[test]
    fn colon_pairs_are_the_heads_hits() {
        let mut hits = Vec::new();
        colon_pairs(b"fe80::1 at 10:30:00, a:bcdef:1, ::", |s, e| {
            hits.push((s, e))
        });
        assert_eq!(hits, vec![(4, 6), (13, 17), (32, 34)]);
    }

    #[test]
    fn short_numbers_qualify_for_nothing() {
        assert!(s("version 1.24.3, p99 at 8192 bytes, 32 workers, 2026-12-06").is_empty());
        assert!(s("").is_empty());
        assert!(s("no digits at all here").is_empty());
        // "+0" is not an E.164 start.
        assert!(s("x +0 12").is_empty());
        // Three separators end a run: 4 + 5 digits do not add up.
        assert!(s("1234 - 56789").is_empty());
    }

    #[test]
    fn each_qualifying_run_gives_its_range_of_starts() {
        // 9 digits with single separators.
        assert_eq!(s("my ssn is 123-45-6789 ok"), vec![(8, 21)]);
        // Three dots.
        assert_eq!(s("host 10.0.0.1 up"), vec![(3, 13)]);
        // A plus and a digit 1-9.
        assert_eq!(s("call +44 20"), vec![(4, 11)]);
        // Two capitals and two digits.
        assert_eq!(s("iban GB82 WEST"), vec![(5, 9)]);
        // Parentheses and a space are two separators.
        assert_eq!(s("(415) 555-2671"), vec![(0, 14)]);
        // Ranges that touch merge.
        assert_eq!(s("1.2.3.4 +1"), vec![(0, 10)]);
        // Ranges apart stay apart.
        assert_eq!(s("123-45-6789 x 987-65-4321"), vec![(0, 11), (12, 25)]);
    }
}
