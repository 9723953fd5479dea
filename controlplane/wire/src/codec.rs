//! The byte-level building blocks: a bounds-checked reader, varints, and tagged fields.
//!
//! Every message body is a sequence of tagged fields, `varint tag · varint length · bytes`.
//! A reader takes the fields it knows and skips the rest, so a peer one version newer can
//! add fields without breaking an older one. Malformed input (a length past the end, a
//! varint longer than 10 bytes, a field of the wrong size) is an error, never a panic.

use std::fmt;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidMessage {
    #[error("message truncated")]
    Truncated,
    #[error("varint too long")]
    VarintOverflow,
    #[error("field {tag} has the wrong size or content")]
    BadField { tag: u64 },
    #[error("required field {tag} missing")]
    MissingField { tag: u64 },
    #[error("frame of {0} bytes exceeds the limit")]
    FrameTooLarge(usize),
    #[error("text field is not UTF-8")]
    BadUtf8,
    #[error("repeated fields would expand past {MAX_EXPANSION} times their encoded size")]
    Expansion,
}

/// Most bytes of decoded items a run of repeated fields may take per byte that encodes it
/// (plus a small constant): a decoder's memory is bounded by the bytes it was given, so a
/// small frame of many tiny fields cannot make a peer allocate gigabytes.
pub const MAX_EXPANSION: usize = 16;

/// Whether `count` items of `item_size` bytes decoded out of `encoded` bytes stay within
/// [`MAX_EXPANSION`].
pub fn within_expansion(
    count: usize,
    item_size: usize,
    encoded: usize,
) -> Result<(), InvalidMessage> {
    if count.saturating_mul(item_size) > MAX_EXPANSION.saturating_mul(encoded) + 256 {
        return Err(InvalidMessage::Expansion);
    }
    Ok(())
}

/// The body of the first field tagged `tag` in `body`.
pub fn first_field(body: &[u8], tag: u64) -> Result<Option<&[u8]>, InvalidMessage> {
    let mut r = Reader::new(body);
    while !r.is_empty() {
        let (t, b) = r.field()?;
        if t == tag {
            return Ok(Some(b));
        }
    }
    Ok(None)
}

/// Decodes every field tagged `tag` in `body` as a `T`: counted first, then checked against
/// [`MAX_EXPANSION`], then allocated once.
pub fn repeated<T: Codec>(body: &[u8], tag: u64) -> Result<Vec<T>, InvalidMessage> {
    let mut count = 0;
    let mut r = Reader::new(body);
    while !r.is_empty() {
        if r.field()?.0 == tag {
            count += 1;
        }
    }
    within_expansion(count, std::mem::size_of::<T>(), body.len())?;
    let mut out = Vec::with_capacity(count);
    let mut r = Reader::new(body);
    while !r.is_empty() {
        let (t, b) = r.field()?;
        if t == tag {
            out.push(T::from_bytes(b)?);
        }
    }
    Ok(out)
}

/// Reads from a byte slice, never past its end.
#[derive(Clone)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl fmt::Debug for Reader<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reader")
            .field("pos", &self.pos)
            .field("len", &self.buf.len())
            .finish()
    }
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The length of everything this reader reads from.
    pub fn total_len(&self) -> usize {
        self.buf.len()
    }

    pub fn take(&mut self, n: usize) -> Result<&'a [u8], InvalidMessage> {
        let end = self.pos.checked_add(n).ok_or(InvalidMessage::Truncated)?;
        let s = self
            .buf
            .get(self.pos..end)
            .ok_or(InvalidMessage::Truncated)?;
        self.pos = end;
        Ok(s)
    }

    pub fn u8(&mut self) -> Result<u8, InvalidMessage> {
        Ok(self.take(1)?[0])
    }

    pub fn varint(&mut self) -> Result<u64, InvalidMessage> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.u8()?;
            let bits = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(InvalidMessage::VarintOverflow);
            }
            v |= bits << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(InvalidMessage::VarintOverflow)
    }

    /// The next tagged field: (tag, body).
    pub fn field(&mut self) -> Result<(u64, &'a [u8]), InvalidMessage> {
        let tag = self.varint()?;
        let len = self.varint()?;
        let len = usize::try_from(len).map_err(|_| InvalidMessage::Truncated)?;
        Ok((tag, self.take(len)?))
    }
}

pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Writes a tagged field whose body `body` writes.
pub fn put_field(out: &mut Vec<u8>, tag: u64, body: impl FnOnce(&mut Vec<u8>)) {
    put_varint(out, tag);
    // Reserve one length byte, write the body, then fix the length up (moving the body
    // when the length needs more than one byte).
    let len_at = out.len();
    out.push(0);
    let start = out.len();
    body(out);
    let len = out.len() - start;
    if len < 0x80 {
        out[len_at] = len as u8;
    } else {
        let mut prefix = Vec::with_capacity(10);
        put_varint(&mut prefix, len as u64);
        out.splice(len_at..start, prefix);
    }
}

pub fn put_u64(out: &mut Vec<u8>, tag: u64, v: u64) {
    put_field(out, tag, |o| put_varint(o, v));
}

pub fn put_bytes(out: &mut Vec<u8>, tag: u64, v: &[u8]) {
    put_field(out, tag, |o| o.extend_from_slice(v));
}

pub fn put_str(out: &mut Vec<u8>, tag: u64, v: &str) {
    put_bytes(out, tag, v.as_bytes());
}

/// Decodes a field body as one varint filling it exactly.
pub fn get_u64(tag: u64, body: &[u8]) -> Result<u64, InvalidMessage> {
    let mut r = Reader::new(body);
    let v = r.varint().map_err(|_| InvalidMessage::BadField { tag })?;
    if !r.is_empty() {
        return Err(InvalidMessage::BadField { tag });
    }
    Ok(v)
}

pub fn get_str(body: &[u8]) -> Result<String, InvalidMessage> {
    String::from_utf8(body.to_vec()).map_err(|_| InvalidMessage::BadUtf8)
}

/// A wire message or record: encodes into tagged fields and reads them back, skipping
/// fields it does not know.
pub trait Codec: Sized {
    fn encode(&self, out: &mut Vec<u8>);
    fn read(r: &mut Reader<'_>) -> Result<Self, InvalidMessage>;

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode(&mut out);
        out
    }

    fn from_bytes(b: &[u8]) -> Result<Self, InvalidMessage> {
        Self::read(&mut Reader::new(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip_and_reject_overlong() {
        for v in [0u64, 1, 127, 128, 300, u32::MAX as u64, u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            assert_eq!(Reader::new(&out).varint(), Ok(v));
        }
        assert_eq!(
            Reader::new(&[0xff; 11]).varint(),
            Err(InvalidMessage::VarintOverflow)
        );
        assert_eq!(
            Reader::new(&[0x80]).varint(),
            Err(InvalidMessage::Truncated)
        );
    }

    #[test]
    fn long_fields_get_multi_byte_lengths() {
        let mut out = Vec::new();
        put_bytes(&mut out, 7, &[1u8; 300]);
        let (tag, body) = Reader::new(&out).field().expect("valid");
        assert_eq!((tag, body.len()), (7, 300));
    }

    #[test]
    fn truncated_fields_are_errors() {
        let mut out = Vec::new();
        put_bytes(&mut out, 1, b"hello");
        out.truncate(out.len() - 1);
        assert_eq!(Reader::new(&out).field(), Err(InvalidMessage::Truncated));
    }
}
