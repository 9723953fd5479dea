//! The built-in patterns. Every one has a bounded width (checked when the database is built);
//! `PII.md` lists them with their widths and validators.

use std::borrow::Cow;

use super::validate::{self, Validator, CONTEXT};
use super::Entity;

/// A pattern too wide for the stream's fixed hold-back: its matches begin with `anchor`, and
/// consist only of bytes in `class`, so a stream holds text back for it only while such a run
/// is open.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Long {
    pub(crate) anchor: &'static [u8],
    pub(crate) class: fn(u8) -> bool,
}

pub(crate) type Extend = fn(&[u8], usize, usize) -> Option<(usize, usize)>;

#[derive(Debug, Clone)]
pub(crate) struct Builtin {
    pub(crate) name: &'static str,
    pub(crate) entity: Entity,
    /// Higher wins between overlapping findings of equal length.
    pub(crate) priority: u8,
    pub(crate) expr: Cow<'static, str>,
    pub(crate) validate: Validator,
    /// For some patterns Hyperscan matches only a short head (long bounded repeats cannot be
    /// compiled with start-of-match); this extends a head hit to the whole match (or rejects
    /// it). The number is the whole match's maximum width.
    pub(crate) extend: Option<(Extend, usize)>,
    pub(crate) long: Option<Long>,
}

/// Body of a PEM private key block (base64, whitespace, the `Proc-Type`/`DEK-Info` values):
/// no `-`, so the first `-----END` ends it.
const PEM_HEADER: &str = r"-----BEGIN (?:[A-Z0-9]{1,10} ){0,2}PRIVATE KEY(?: BLOCK)?-----(?:\s{1,2}Proc-Type: 4,ENCRYPTED\s{1,2}DEK-Info: [A-Z0-9\-]{1,24},[0-9A-Fa-f]{16,64})?";
/// Longest PEM body matched (an RSA-8192 key is about 6.4 KiB).
pub(crate) const PEM_BODY_CAP: usize = 8192;

/// A byte class as a table: ASCII letters and digits plus `extra`.
const fn class(extra: &[u8]) -> [bool; 256] {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    let mut i = 0;
    while i < extra.len() {
        t[extra[i] as usize] = true;
        i += 1;
    }
    t
}

static PEM_CLASS: [bool; 256] = class(b" +/=:,.()-\t\r\n\x0b\x0c");
static PEM_BODY: [bool; 256] = class(b" +/=:,.()\t\r\n\x0b\x0c");
static JWT_CLASS: [bool; 256] = class(b"-_.");
static B64URL: [bool; 256] = class(b"-_");
static EMAIL_LOCAL: [bool; 256] = class(b"._%+-");
static EMAIL_DOMAIN: [bool; 256] = class(b".-");

fn pem_class(b: u8) -> bool {
    PEM_CLASS[usize::from(b)]
}

fn jwt_class(b: u8) -> bool {
    JWT_CLASS[usize::from(b)]
}

const PEM: Long = Long {
    anchor: b"-----BEGIN ",
    class: pem_class,
};
const JWT: Long = Long {
    anchor: b"eyJ",
    class: jwt_class,
};

macro_rules! b {
    ($name:expr, $entity:ident, $prio:expr, $expr:expr, $v:ident, $ext:ident, $width:expr) => {
        Builtin {
            name: $name,
            entity: Entity::$entity,
            priority: $prio,
            expr: Cow::Borrowed($expr),
            validate: validate::$v,
            extend: Some(($ext, $width)),
            long: None,
        }
    };
    ($name:expr, $entity:ident, $prio:expr, $expr:expr, $v:ident) => {
        Builtin {
            name: $name,
            entity: Entity::$entity,
            priority: $prio,
            expr: Cow::Borrowed($expr),
            validate: validate::$v,
            extend: None,
            long: None,
        }
    };
}

/// Width of the PEM footer pattern `-----END (?:[A-Z0-9]{1,10} ){0,2}PRIVATE KEY(?: BLOCK)?-----`.
const PEM_FOOTER_WIDTH: usize = 9 + 2 * 11 + 11 + 6 + 5;
/// Longest JWT payload and signature segments matched.
pub(crate) const JWT_HEADER_CAP: usize = 1024;
pub(crate) const JWT_PAYLOAD_CAP: usize = 4096;
pub(crate) const JWT_SIGNATURE_CAP: usize = 1024;

fn run(t: &[u8], from: usize, class: impl Fn(u8) -> bool) -> usize {
    t[from.min(t.len())..]
        .iter()
        .take_while(|&&b| class(b))
        .count()
}

/// From the end of a PEM header hit to the end of the block (its footer), or, when no
/// footer follows, the end of the body run (an open block is still a secret).
fn pem_extend(t: &[u8], _start: usize, header_end: usize) -> Option<(usize, usize)> {
    let body = run(t, header_end, |b| PEM_BODY[usize::from(b)]).min(PEM_BODY_CAP);
    if body < 16 {
        return None;
    }
    let end = header_end + body;
    Some((_start, pem_footer(&t[end..]).map_or(end, |f| end + f)))
}

fn pem_footer(t: &[u8]) -> Option<usize> {
    if !t.starts_with(b"-----END ") {
        return None;
    }
    let mut i = 9;
    for _ in 0..3 {
        if t[i..].starts_with(b"PRIVATE KEY") {
            i += 11;
            if t[i..].starts_with(b" BLOCK") {
                i += 6;
            }
            return t[i..].starts_with(b"-----").then_some(i + 5);
        }
        let w = run(t, i, |b| b.is_ascii_uppercase() || b.is_ascii_digit());
        if !(1..=10).contains(&w) || t.get(i + w) != Some(&b' ') {
            return None;
        }
        i += w + 1;
    }
    None
}

fn b64url(b: u8) -> bool {
    B64URL[usize::from(b)]
}

/// From the head `eyJxxxxx` to the end of `header.payload.signature`, within the caps.
fn jwt_extend(t: &[u8], start: usize, head_end: usize) -> Option<(usize, usize)> {
    let b64 = b64url;
    let header = head_end - start + run(t, head_end, b64);
    if header > JWT_HEADER_CAP || t.get(start + header) != Some(&b'.') {
        return None;
    }
    let dot = start + header + 1;
    let payload = run(t, dot, b64);
    if !(2..=JWT_PAYLOAD_CAP).contains(&payload) || t.get(dot + payload) != Some(&b'.') {
        return None;
    }
    let sig_from = dot + payload + 1;
    let sig = run(t, sig_from, b64);
    (sig <= JWT_SIGNATURE_CAP).then_some((start, sig_from + sig))
}

/// A token's head extended over the rest of its run of `[A-Za-z0-9_-]`, trailing `-`
/// dropped; longer than `cap` in all is not that token.
fn token(t: &[u8], start: usize, head_end: usize, cap: usize) -> Option<(usize, usize)> {
    let mut end = head_end + run(t, head_end, b64url);
    if end - start > cap {
        return None;
    }
    let run_end = end;
    while end > head_end && t[end - 1] == b'-' {
        end -= 1;
    }
    // At most `CONTEXT - 1` trailing bytes are dropped, so a token whose run reaches the end
    // of a stream's text so far always ends within `CONTEXT` of it (and waits).
    (run_end - end < CONTEXT).then_some((start, end))
}

const OPENAI_CAP: usize = 256;
/// `ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`.
const IPV6_CAP: usize = 45;

/// From a head `:x:` (two colons at most four hex digits apart) out over the address: back
/// over hex digits and colons, on over hex digits, colons and dots (an embedded IPv4), up to
/// three trailing dots dropped; at most 45 bytes.
fn ipv6_extend(t: &[u8], s: usize, e: usize) -> Option<(usize, usize)> {
    let back = t[..s]
        .iter()
        .rev()
        .take(IPV6_CAP + 1)
        .take_while(|&&b| b.is_ascii_hexdigit() || b == b':')
        .count();
    let start = s - back;
    let mut end = e + run(t, e, |b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
    let run_end = end;
    while t[end - 1] == b'.' {
        end -= 1;
    }
    (run_end - end < CONTEXT && end - start <= IPV6_CAP).then_some((start, end))
}
const ANTHROPIC_CAP: usize = 256;
const SLACK_CAP: usize = 256;
const EMAIL_LOCAL_CAP: usize = 64;
const EMAIL_DOMAIN_CAP: usize = 253;

fn openai_extend(t: &[u8], s: usize, e: usize) -> Option<(usize, usize)> {
    token(t, s, e, OPENAI_CAP)
}

fn anthropic_extend(t: &[u8], s: usize, e: usize) -> Option<(usize, usize)> {
    token(t, s, e, ANTHROPIC_CAP)
}

fn slack_extend(t: &[u8], s: usize, e: usize) -> Option<(usize, usize)> {
    token(t, s, e, SLACK_CAP)
}

/// From the head `x@y` (one byte either side of the `@`) out to the whole address: the local
/// part back to at most 64 bytes (starting at a letter or digit), the domain on to at most 253
/// bytes (trailing `.`/`-` dropped).
fn email_extend(t: &[u8], s: usize, e: usize) -> Option<(usize, usize)> {
    let local_class = |b: u8| EMAIL_LOCAL[usize::from(b)];
    let at = s + 1;
    let back = t[..at]
        .iter()
        .rev()
        .take(EMAIL_LOCAL_CAP + 1)
        .take_while(|&&b| local_class(b))
        .count();
    if back > EMAIL_LOCAL_CAP {
        return None;
    }
    let mut start = at - back;
    while start < at && !t[start].is_ascii_alphanumeric() {
        start += 1;
    }
    if start == at
        || start
            .checked_sub(1)
            .is_some_and(|i| validate::is_word(t[i]))
    {
        return None;
    }
    let domain_class = |b: u8| EMAIL_DOMAIN[usize::from(b)];
    let mut end = e - 1 + run(t, e - 1, domain_class);
    let run_end = end;
    while end > at + 1 && matches!(t[end - 1], b'.' | b'-') {
        end -= 1;
    }
    if run_end - end >= CONTEXT || end - at - 1 > EMAIL_DOMAIN_CAP || t.get(end) == Some(&b'_') {
        return None;
    }
    Some((start, end))
}

/// The numeric rules: matched by [`Numeric`](super::numeric::Numeric) from the starts
/// [`gate`](super::gate) allows (its reasoning covers exactly these rules; a rule added here
/// must fit it).
pub(crate) fn numeric(name: &str) -> bool {
    ["phone_", "card", "ssn", "iban", "ipv4"]
        .iter()
        .any(|p| name.starts_with(p))
}

pub(crate) fn builtins() -> Vec<Builtin> {
    vec![
        b!(
            "email",
            Email,
            50,
            r"[A-Za-z0-9._%+\-]@[A-Za-z0-9]",
            email,
            email_extend,
            EMAIL_LOCAL_CAP + 1 + EMAIL_DOMAIN_CAP
        ),
        b!(
            "phone_intl",
            Phone,
            40,
            r"\+[1-9][0-9]{0,3}(?:[ .\-]?(?:\([0-9]{1,5}\)[ .\-]?)?[0-9]{1,5}){1,6}\b",
            phone_intl
        ),
        b!(
            "phone_us",
            Phone,
            40,
            r"\b(?:1[ .\-])?[2-9][0-9]{2}[ .\-][2-9][0-9]{2}[ .\-][0-9]{4}\b",
            phone_us
        ),
        b!(
            "phone_us_paren",
            Phone,
            40,
            r"(?:\b1[ .\-]?)?\([2-9][0-9]{2}\)[ .\-]?[2-9][0-9]{2}[ .\-][0-9]{4}\b",
            phone_us
        ),
        b!(
            "phone_uk",
            Phone,
            40,
            r"\b0[1-9][0-9]{2,4}[ \-]?[0-9]{3,4}[ \-]?[0-9]{3,4}\b",
            phone_uk
        ),
        b!(
            "phone_de",
            Phone,
            40,
            r"\b0[1-9][0-9]{1,4}[ /\-][0-9]{3,9}(?:[ \-][0-9]{1,5})?\b",
            phone_de
        ),
        b!(
            "phone_de_mobile",
            Phone,
            40,
            r"\b01[5-7][0-9]{8,9}\b",
            phone_de
        ),
        b!(
            "phone_fr",
            Phone,
            40,
            r"\b0[1-9](?:[ .\-]?[0-9]{2}){4}\b",
            phone_fr
        ),
        b!(
            "phone_in",
            Phone,
            40,
            r"\b(?:0|91[ \-]?)?[6-9][0-9]{4}[ \-][0-9]{5}\b",
            phone_in
        ),
        b!("phone_in_trunk", Phone, 40, r"\b0[6-9][0-9]{9}\b", phone_in),
        b!("card", Card, 80, r"\b[2-68][0-9]{11,18}\b", card),
        b!(
            "card_grouped",
            Card,
            80,
            r"\b[2-68][0-9]{3}(?:[ \-][0-9]{4}){2,3}(?:[ \-][0-9]{1,4})?\b",
            card
        ),
        b!(
            "card_amex",
            Card,
            80,
            r"\b3[0-9]{3}[ \-][0-9]{6}[ \-][0-9]{4,5}\b",
            card
        ),
        b!("ssn", Ssn, 60, r"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", ssn),
        b!(
            "ssn_spaced",
            Ssn,
            60,
            r"\b[0-9]{3} [0-9]{2} [0-9]{4}\b",
            ssn
        ),
        b!(
            "iban",
            Iban,
            70,
            r"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b",
            iban
        ),
        b!("ipv4", Ip, 30, r"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b", ipv4),
        b!(
            "ipv6",
            Ip,
            30,
            r":[0-9A-Fa-f]{0,4}:",
            ipv6,
            ipv6_extend,
            IPV6_CAP
        ),
        b!(
            "openai_key",
            Secret,
            100,
            r"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20}",
            openai,
            openai_extend,
            OPENAI_CAP
        ),
        b!(
            "anthropic_key",
            Secret,
            110,
            r"\bsk-ant-(?:api|admin|sid)[0-9]{2}-[A-Za-z0-9_\-]{32}",
            always,
            anthropic_extend,
            ANTHROPIC_CAP
        ),
        b!(
            "aws_access_key_id",
            Secret,
            110,
            r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b",
            always
        ),
        b!(
            "github_token",
            Secret,
            110,
            r"\bgh[pousr]_[A-Za-z0-9]{36}\b",
            always
        ),
        b!(
            "github_pat",
            Secret,
            110,
            r"\bgithub_pat_[A-Za-z0-9_]{82}\b",
            always
        ),
        b!(
            "stripe_key",
            Secret,
            110,
            r"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{20,247}\b",
            random_token
        ),
        b!(
            "slack_token",
            Secret,
            110,
            r"\bxox[baprs]-[A-Za-z0-9\-]{10}",
            slack,
            slack_extend,
            SLACK_CAP
        ),
        b!(
            "gateway_key",
            Secret,
            120,
            r"\baigw_(?:prod|stg|dev)_[A-Za-z0-9]{12}_[A-Za-z0-9]{36}\b",
            gateway_key
        ),
        Builtin {
            name: "jwt",
            entity: Entity::Secret,
            priority: 105,
            expr: Cow::Borrowed(r"\beyJ[A-Za-z0-9_\-]{5}"),
            validate: validate::jwt,
            extend: Some((
                jwt_extend,
                JWT_HEADER_CAP + 1 + JWT_PAYLOAD_CAP + 1 + JWT_SIGNATURE_CAP,
            )),
            long: Some(JWT),
        },
        Builtin {
            name: "pem_private_key",
            entity: Entity::Secret,
            priority: 110,
            expr: Cow::Borrowed(PEM_HEADER),
            validate: validate::always,
            extend: Some((pem_extend, 180 + PEM_BODY_CAP + PEM_FOOTER_WIDTH)),
            long: Some(PEM),
        },
    ]
}
