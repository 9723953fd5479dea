//! Where the numeric rules can match, found without Hyperscan so their automata run only
//! there.
//!
//! Phone numbers, cards, SSNs, IPv4 addresses and IBANs are the expensive rules: they start on
//! any digit, so on text with digits every one of their automata wakes up, and together they
//! cost several times the rest of the database. Each of them, though, matches only inside a
//! *digit run*: digits where consecutive digits are at most two separators (`space . - / ( )`)
//! apart. A rule matches (and its validator can accept) only in a run that *qualifies*:
//!
//! - national phones, cards and SSNs need at least 9 digits in one run (their validators ask
//!   10, 12 and exactly 9);
//! - an IPv4 address needs three dots in one run;
//! - an E.164 number starts with `+` and a digit 1–9, the run's first digit;
//! - an IBAN starts with two capitals and two digits, the run's first two (it continues past
//!   the run, letters and all, for at most its width).
//!
//! Every match of these rules, validated or not, lies within `[run start − 2, run end]` (a
//! `(` or `+` right before the first digit; an IBAN's two capitals; an IBAN's tail). The
//! returned windows add one byte of context before, for Hyperscan's `\b`, and one after:
//! Hyperscan sees a window's edges as the text's edges, so the scanner keeps only matches
//! that touch neither edge (unless the edge is the text's own), and a match needed from a
//! run always lies strictly inside its window. Merging windows keeps this (a merged window
//! contains both), and so does the leftmost start Hyperscan reports for a match: any match
//! of a gated rule that ends in a window starts in a run whose window is merged with it.

/// Bytes the numeric rules allow between two digits.
fn sep(b: u8) -> bool {
    matches!(b, b' ' | b'.' | b'-' | b'/' | b'(' | b')')
}

/// Windows closer than this are scanned as one (a Hyperscan call costs about as much as
/// scanning this many bytes).
const MERGE: usize = 64;

/// Position of the first ASCII digit at or after `from`, checking 32 bytes at a time.
fn next_digit(t: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    let rest = t.get(from..).unwrap_or_default();
    for chunk in rest.chunks_exact(32) {
        let mut any = false;
        for &b in chunk {
            any |= b.wrapping_sub(b'0') < 10;
        }
        if any {
            break;
        }
        i += 32;
    }
    t[i..].iter().position(u8::is_ascii_digit).map(|p| i + p)
}

/// The windows of `text` the gated rules must be scanned in, sorted and disjoint.
/// `iban_width` is the IBAN rule's widest match.
pub(crate) fn windows(text: &[u8], iban_width: usize, out: &mut Vec<(usize, usize)>) {
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
        let upper = |at: Option<usize>| {
            at.and_then(|a| text.get(a))
                .is_some_and(u8::is_ascii_uppercase)
        };
        let intl = rs >= 1 && text[rs - 1] == b'+' && text[rs] != b'0';
        let iban = upper(rs.checked_sub(2))
            && upper(rs.checked_sub(1))
            && text.get(rs + 1).is_some_and(u8::is_ascii_digit);
        if digits >= 9 || dots >= 3 || intl || iban {
            let end = if iban {
                re.max(rs - 2 + iban_width)
            } else {
                re
            };
            let (ws, we) = (rs.saturating_sub(3), (end + 1).min(len));
            match out.last_mut() {
                Some(last) if ws <= last.1 + MERGE => last.1 = last.1.max(we),
                _ => out.push((ws, we)),
            }
        }
        i = re;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(t: &str) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        windows(t.as_bytes(), 64, &mut out);
        out
    }

    #[test]
    fn short_numbers_open_no_window() {
        assert!(w("version 1.24.3, p99 at 8192 bytes, 32 workers, 2026-12-06").is_empty());
        assert!(w("").is_empty());
        assert!(w("no digits at all here").is_empty());
    }

    #[test]
    fn each_qualifying_run_opens_a_window_around_it() {
        // 9 digits with single separators.
        let t = "my ssn is 123-45-6789 ok";
        assert_eq!(w(t), vec![(7, 22)]);
        // Three dots.
        assert_eq!(w("host 10.0.0.1 up"), vec![(2, 14)]);
        // A plus and a digit 1-9; "+0" is not.
        assert_eq!(w("call +44 20"), vec![(3, 11)]);
        assert!(w("x +0 12").is_empty());
        // Two capitals and two digits: the window reaches the IBAN's width.
        assert_eq!(w("iban GB82 WEST"), vec![(4, 14)]);
        // Three separators end a run: 4 + 5 digits do not add up.
        assert!(w("1234 - 56789").is_empty());
        // Parentheses and a space are two separators.
        assert_eq!(w("(415) 555-2671"), vec![(0, 14)]);
    }

    #[test]
    fn near_windows_merge() {
        let t = "123-45-6789 and 987-65-4321";
        assert_eq!(w(t), vec![(0, t.len())]);
        let far = format!("123-45-6789{}987-65-4321", " x".repeat(60));
        assert_eq!(w(&far).len(), 2);
    }
}
