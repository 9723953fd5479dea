//! Validators: run only on Hyperscan hits, each sees the whole text and the hit's span so it
//! can look at most [`CONTEXT`] bytes either side of it.

use std::net::Ipv6Addr;

/// How far outside its span a validator (or a `\b`) looks, in bytes. The streaming redactor
/// holds this much extra text so every validator sees what it would see in the whole text.
pub(crate) const CONTEXT: usize = 4;

pub(crate) type Validator = fn(&[u8], usize, usize) -> bool;

/// The digit values in `s` (on the stack for any span a numeric rule matches).
fn digits(s: &[u8]) -> smallvec::SmallVec<[u8; 32]> {
    s.iter()
        .filter(|b| b.is_ascii_digit())
        .map(|b| b - b'0')
        .collect()
}

fn before(t: &[u8], start: usize, back: usize) -> Option<u8> {
    start.checked_sub(back).map(|i| t[i])
}

fn after(t: &[u8], end: usize, fwd: usize) -> Option<u8> {
    t.get(end + fwd).copied()
}

/// The hit continues a longer number: `1.|2.3.4` or `…-12|-34`.
fn continues_a_number(t: &[u8], s: usize, e: usize) -> bool {
    let sep = |b: Option<u8>| matches!(b, Some(b'.' | b'-'));
    let digit = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_digit());
    (sep(before(t, s, 1)) && digit(before(t, s, 2)))
        || (sep(after(t, e, 0)) && digit(after(t, e, 1)))
}

/// All separators between digit groups are the same character.
fn consistent_separators(s: &[u8]) -> bool {
    let mut seps = s
        .iter()
        .filter(|b| !b.is_ascii_digit() && !matches!(b, b'(' | b')' | b'+'));
    match seps.next() {
        None => true,
        Some(first) => seps.all(|b| b == first),
    }
}

pub(crate) fn luhn(d: &[u8]) -> bool {
    let sum: u32 = d
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &x)| {
            let x = u32::from(x);
            if i % 2 == 1 {
                let y = x * 2;
                if y > 9 {
                    y - 9
                } else {
                    y
                }
            } else {
                x
            }
        })
        .sum();
    sum % 10 == 0
}

fn prefix_num(d: &[u8], n: usize) -> u32 {
    d.iter().take(n).fold(0, |acc, &x| acc * 10 + u32::from(x))
}

/// A card brand whose issuer range and length fit `d`.
pub(crate) fn card_brand(d: &[u8]) -> Option<&'static str> {
    let len = d.len();
    let p = |n| prefix_num(d, n);
    let lens = |r: std::ops::RangeInclusive<usize>| r.contains(&len);
    if d[0] == 4 && matches!(len, 13 | 16 | 19) {
        return Some("visa");
    }
    if ((51..=55).contains(&p(2)) || (2221..=2720).contains(&p(4))) && len == 16 {
        return Some("mastercard");
    }
    if matches!(p(2), 34 | 37) && len == 15 {
        return Some("amex");
    }
    if (p(4) == 6011
        || (644..=649).contains(&p(3))
        || p(2) == 65
        || (622_126..=622_925).contains(&p(6)))
        && lens(16..=19)
    {
        return Some("discover");
    }
    if (3528..=3589).contains(&p(4)) && lens(16..=19) {
        return Some("jcb");
    }
    if ((300..=305).contains(&p(3)) || p(4) == 3095 || matches!(p(2), 36 | 38 | 39))
        && lens(14..=19)
    {
        return Some("diners");
    }
    if (2200..=2204).contains(&p(4)) && lens(16..=19) {
        return Some("mir");
    }
    if matches!(p(2), 62 | 81) && lens(16..=19) {
        return Some("unionpay");
    }
    if (matches!(p(2), 60 | 82) || p(3) == 508 || matches!(p(4), 6521 | 6522)) && len == 16 {
        return Some("rupay");
    }
    if ((506_099..=506_198).contains(&p(6)) || (650_002..=650_027).contains(&p(6)))
        && matches!(len, 16 | 18 | 19)
    {
        return Some("verve");
    }
    if matches!(
        p(4),
        5018 | 5020 | 5038 | 5893 | 6304 | 6759 | 6761 | 6762 | 6763
    ) && lens(12..=19)
    {
        return Some("maestro");
    }
    None
}

pub(crate) fn card(t: &[u8], s: usize, e: usize) -> bool {
    let span = &t[s..e];
    let d = digits(span);
    consistent_separators(span)
        && !continues_a_number(t, s, e)
        && (12..=19).contains(&d.len())
        && card_brand(&d).is_some()
        && luhn(&d)
}

pub(crate) fn ssn(t: &[u8], s: usize, e: usize) -> bool {
    let d = digits(&t[s..e]);
    if d.len() != 9 || continues_a_number(t, s, e) {
        return false;
    }
    let area = prefix_num(&d, 3);
    let group = prefix_num(&d[3..], 2);
    let serial = prefix_num(&d[5..], 4);
    area != 0 && area != 666 && area < 900 && group != 0 && serial != 0
}

/// IBAN lengths of the countries most often seen; others must be 15..=34.
const IBAN_LENGTHS: &[(&[u8; 2], usize)] = &[
    (b"AT", 20),
    (b"BE", 16),
    (b"CH", 21),
    (b"CZ", 24),
    (b"DE", 22),
    (b"DK", 18),
    (b"ES", 24),
    (b"FI", 18),
    (b"FR", 27),
    (b"GB", 22),
    (b"GR", 27),
    (b"IE", 22),
    (b"IT", 27),
    (b"LU", 20),
    (b"NL", 18),
    (b"NO", 15),
    (b"PL", 28),
    (b"PT", 25),
    (b"SE", 24),
];

pub(crate) fn iban_checksum(compact: &[u8]) -> bool {
    if compact.len() < 5 {
        return false;
    }
    let rearranged = compact[4..].iter().chain(&compact[..4]);
    let mut rem: u32 = 0;
    for &c in rearranged {
        let v = match c {
            b'0'..=b'9' => u32::from(c - b'0'),
            b'A'..=b'Z' => u32::from(c - b'A') + 10,
            _ => return false,
        };
        rem = if v >= 10 {
            (rem * 100 + v) % 97
        } else {
            (rem * 10 + v) % 97
        };
    }
    rem == 1
}

pub(crate) fn iban(t: &[u8], s: usize, e: usize) -> bool {
    let span = &t[s..e];
    // The country's length first: it settles most of the ends a match offers.
    let len = span.iter().filter(|&&b| b != b' ').count();
    let ok_len = match IBAN_LENGTHS.iter().find(|(c, _)| c[..] == span[..2]) {
        Some(&(_, n)) => len == n,
        None => (15..=34).contains(&len),
    };
    if !ok_len {
        return false;
    }
    // Spaces, if any, split it into groups of four.
    if span.contains(&b' ') {
        let mut groups = span.split(|&b| b == b' ').peekable();
        while let Some(g) = groups.next() {
            let last = groups.peek().is_none();
            if (!last && g.len() != 4) || (last && !(1..=4).contains(&g.len())) {
                return false;
            }
        }
    }
    let compact: smallvec::SmallVec<[u8; 64]> =
        span.iter().copied().filter(|&b| b != b' ').collect();
    iban_checksum(&compact)
}

/// A word byte, as `\b` reads it (ASCII).
pub(crate) fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

fn word(b: Option<u8>) -> bool {
    b.is_some_and(is_word)
}

pub(crate) fn ipv4(t: &[u8], s: usize, e: usize) -> bool {
    if continues_a_number(t, s, e) {
        return false;
    }
    dotted_quad(&t[s..e])
}

/// Four decimal octets, as `Ipv4Addr`'s parser reads them: 0–255, no leading zero.
fn dotted_quad(span: &[u8]) -> bool {
    let mut n = 0;
    for part in span.split(|&b| b == b'.') {
        n += 1;
        let ok = match part {
            [b'0'] => true,
            [b'1'..=b'9', rest @ ..] if rest.len() <= 2 => {
                rest.iter().all(u8::is_ascii_digit)
                    && part.iter().fold(0u32, |v, &b| v * 10 + u32::from(b - b'0')) <= 255
            }
            _ => false,
        };
        if !ok || n > 4 {
            return false;
        }
    }
    n == 4
}

pub(crate) fn ipv6(t: &[u8], s: usize, e: usize) -> bool {
    let span = &t[s..e];
    let neighbour = |b: Option<u8>| word(b) || b == Some(b':');
    if neighbour(before(t, s, 1)) || neighbour(after(t, e, 0)) {
        return false;
    }
    let colons = span.iter().filter(|&&b| b == b':').count();
    if !span.iter().any(u8::is_ascii_hexdigit) || colons < 2 {
        return false;
    }
    // Without `::` an address has all eight groups (six before an IPv4 tail): times such as
    // `10:30:00` are settled here, without the parser.
    if colons < 6 && !span.windows(2).any(|w| w == b"::") {
        return false;
    }
    std::str::from_utf8(span).is_ok_and(|x| x.parse::<Ipv6Addr>().is_ok())
}

pub(crate) fn email(t: &[u8], s: usize, e: usize) -> bool {
    let span = &t[s..e];
    let Some(at) = span.iter().position(|&b| b == b'@') else {
        return false;
    };
    let (local, domain) = (&span[..at], &span[at + 1..]);
    if local.first() == Some(&b'.')
        || local.last() == Some(&b'.')
        || local.windows(2).any(|w| w == b"..")
    {
        return false;
    }
    let labels: Vec<&[u8]> = domain.split(|&b| b == b'.').collect();
    if labels.len() < 2 {
        return false;
    }
    let tld_ok = labels
        .last()
        .is_some_and(|l| l.len() >= 2 && l.iter().all(u8::is_ascii_alphabetic));
    tld_ok
        && labels
            .iter()
            .all(|l| !l.is_empty() && l.len() <= 63 && l[0] != b'-' && l[l.len() - 1] != b'-')
}

fn phone_common(
    t: &[u8],
    s: usize,
    e: usize,
    min: usize,
    max: usize,
) -> Option<smallvec::SmallVec<[u8; 32]>> {
    let span = &t[s..e];
    let d = digits(span);
    let opens = span.iter().filter(|&&b| b == b'(').count();
    let closes = span.iter().filter(|&&b| b == b')').count();
    if opens != closes
        || opens > 1
        || continues_a_number(t, s, e)
        || !(min..=max).contains(&d.len())
    {
        return None;
    }
    Some(d)
}

pub(crate) fn phone_intl(t: &[u8], s: usize, e: usize) -> bool {
    let prev = before(t, s, 1);
    if word(prev) || prev == Some(b'+') {
        return false;
    }
    // A "(0)" trunk prefix is not a digit of the E.164 number.
    let span = &t[s..e];
    let trunk = span.windows(3).filter(|w| *w == b"(0)").count();
    phone_common(t, s, e, 8 + trunk, 15 + trunk).is_some()
}

pub(crate) fn phone_us(t: &[u8], s: usize, e: usize) -> bool {
    let span = &t[s..e];
    let Some(d) = phone_common(t, s, e, 10, 11) else {
        return false;
    };
    let d = if d.len() == 11 {
        if d[0] != 1 {
            return false;
        }
        &d[1..]
    } else {
        &d[..]
    };
    // Separators after the area code's parenthesis may differ; the others must agree.
    let tail = span
        .iter()
        .rposition(|&b| b == b')')
        .map_or(span, |i| &span[i + 1..]);
    d[0] >= 2 && d[3] >= 2 && consistent_separators(tail.trim_ascii_start())
}

/// A national number (no `+`) right after another group of digits or capitals (`0044 0532
/// 0130 01` inside an IBAN) is part of that, not a phone number.
fn inside_groups(t: &[u8], s: usize) -> bool {
    matches!(before(t, s, 1), Some(b' ' | b'.' | b'-' | b'/'))
        && before(t, s, 2).is_some_and(|b| b.is_ascii_digit() || b.is_ascii_uppercase())
}

pub(crate) fn phone_uk(t: &[u8], s: usize, e: usize) -> bool {
    if inside_groups(t, s) {
        return false;
    }
    let span = &t[s..e];
    let Some(d) = phone_common(t, s, e, 10, 11) else {
        return false;
    };
    let separated = span.iter().any(|b| !b.is_ascii_digit());
    separated || (d.len() == 11 && d[1] == 7)
}

pub(crate) fn phone_de(t: &[u8], s: usize, e: usize) -> bool {
    !inside_groups(t, s) && phone_common(t, s, e, 10, 12).is_some()
}

pub(crate) fn phone_fr(t: &[u8], s: usize, e: usize) -> bool {
    if inside_groups(t, s) {
        return false;
    }
    let span = &t[s..e];
    let Some(d) = phone_common(t, s, e, 10, 10) else {
        return false;
    };
    let separated = span.iter().any(|b| !b.is_ascii_digit());
    if separated {
        consistent_separators(span) && span.iter().filter(|b| !b.is_ascii_digit()).count() == 4
    } else {
        matches!(d[1], 6 | 7)
    }
}

pub(crate) fn phone_in(t: &[u8], s: usize, e: usize) -> bool {
    !inside_groups(t, s) && phone_common(t, s, e, 10, 12).is_some()
}

pub(crate) fn always(_: &[u8], _: usize, _: usize) -> bool {
    true
}

fn has_classes(s: &[u8]) -> bool {
    s.iter().any(u8::is_ascii_digit)
        && s.iter().any(u8::is_ascii_uppercase)
        && s.iter().any(u8::is_ascii_lowercase)
}

pub(crate) fn openai(t: &[u8], s: usize, e: usize) -> bool {
    let span = &t[s..e];
    !span.starts_with(b"sk-ant-") && has_classes(&span[3..])
}

pub(crate) fn random_token(t: &[u8], s: usize, e: usize) -> bool {
    let span = &t[s..e];
    let body = span
        .iter()
        .rposition(|&b| b == b'_' || b == b'-')
        .map_or(span, |i| &span[i + 1..]);
    body.iter().any(u8::is_ascii_digit) || has_classes(span)
}

pub(crate) fn slack(t: &[u8], s: usize, e: usize) -> bool {
    t[s..e].iter().filter(|b| b.is_ascii_digit()).count() >= 4
}

pub(crate) fn gateway_key(t: &[u8], s: usize, e: usize) -> bool {
    std::str::from_utf8(&t[s..e]).is_ok_and(|k| aigw_wire::keys::parse(k).is_ok())
}

fn b64url_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for &c in s {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

pub(crate) fn jwt(t: &[u8], s: usize, e: usize) -> bool {
    let is_b64 =
        |b: Option<u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if is_b64(after(t, e, 0)) {
        return false;
    }
    let span = &t[s..e];
    let Some(dot) = span.iter().position(|&b| b == b'.') else {
        return false;
    };
    let Some(header) = b64url_decode(&span[..dot]) else {
        return false;
    };
    serde_json::from_slice::<serde_json::Map<String, serde_json::Value>>(&header)
        .is_ok_and(|m| m.contains_key("alg"))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn ipv6_reads_as_the_standard_parser(s in "[0-9a-f:.]{2,40}") {
            prop_assert_eq!(
                ipv6(s.as_bytes(), 0, s.len()),
                s.parse::<std::net::Ipv6Addr>().is_ok() && s.chars().any(|c| c.is_ascii_hexdigit()) && s.matches(':').count() >= 2
            );
        }

        #[test]
        fn dotted_quad_reads_as_the_standard_parser(s in "[0-9.]{0,17}") {
            prop_assert_eq!(
                dotted_quad(s.as_bytes()),
                s.parse::<std::net::Ipv4Addr>().is_ok()
            );
        }
    }

    fn v(f: Validator, s: &str) -> bool {
        f(s.as_bytes(), 0, s.len())
    }

    #[test]
    fn luhn_and_brands() {
        assert!(v(card, "4111 1111 1111 1111"));
        assert!(!v(card, "4111 1111 1111 1112"));
        assert!(v(card, "5555555555554444"));
        assert!(v(card, "2223003122003222"), "mastercard 2-series");
        assert!(v(card, "378282246310005"));
        assert!(v(card, "6011111111111117"));
        assert!(v(card, "3530111333300000"));
        assert!(v(card, "36227206271667"), "diners 14");
        assert!(!v(card, "4111-1111 1111-1111"), "mixed separators");
        assert!(!v(card, "1234567812345670"), "no brand starts with 1");
    }

    #[test]
    fn ssn_ranges() {
        assert!(v(ssn, "123-45-6789"));
        for bad in [
            "000-12-3456",
            "666-12-3456",
            "900-12-3456",
            "123-00-4567",
            "123-45-0000",
        ] {
            assert!(!v(ssn, bad), "{bad}");
        }
    }

    #[test]
    fn iban_mod97() {
        assert!(v(iban, "DE89370400440532013000"));
        assert!(v(iban, "GB82 WEST 1234 5698 7654 32"));
        assert!(!v(iban, "DE89370400440532013001"));
        assert!(!v(iban, "DE8937040044053201300"), "wrong length for DE");
    }

    #[test]
    fn ips() {
        assert!(v(ipv4, "192.168.1.20"));
        assert!(!v(ipv4, "256.1.1.1"));
        let t = b"v 1.2.3.4.5";
        assert!(!ipv4(t, 2, 9));
        assert!(v(ipv6, "2001:db8::8a2e:370:7334"));
        assert!(v(ipv6, "::1"));
        assert!(!v(ipv6, "12:30:45"));
        assert!(!v(ipv6, "::"));
    }

    #[test]
    fn jwt_header() {
        let t = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U";
        assert!(v(jwt, t));
        assert!(
            !v(jwt, "eyJmb28iOiJiYXIifQ.eyJzdWIiOiIxMjM0NTY3ODkwIn0.abc"),
            "no alg"
        );
    }
}
