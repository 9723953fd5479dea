//! The chunked transfer coding (RFC 9112 §7.1), decoded incrementally and strictly.
//!
//! httparse's own chunk-size parser accepts any byte in extensions and wraps at 16 hex
//! digits; this one follows the grammar exactly, bounds every part, and appends the decoded
//! data to a caller-owned buffer so the body stays in one contiguous allocation.

use super::{is_field_value_byte, is_tchar, H1Error, Limits};

/// Most hex digits a chunk size may have (leading zeros included): 16 digits already span
/// u64, anything longer is someone probing for an overflow.
const MAX_SIZE_DIGITS: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Size,
    /// After BWS that followed the size or an extension: only `;` may come next.
    ExtBws,
    ExtBeforeName,
    ExtName,
    ExtAfterName,
    ExtBeforeValue,
    ExtToken,
    ExtQuoted,
    ExtQuotedEscape,
    /// After a closing quote: BWS, `;` or the line end.
    ExtAfterQuoted,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerLineStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    FinalLf,
    Done,
}

/// Progress after feeding bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkedProgress {
    /// Bytes of the input consumed. When `done`, the rest belongs to the next request.
    pub consumed: usize,
    /// The last chunk and the trailer section have been read.
    pub done: bool,
}

/// Decoder state for one chunked body.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
    size: u64,
    size_digits: u8,
    remaining: u64,
    ext_bytes: usize,
    trailer_bytes: usize,
    body_bytes: u64,
    max_ext: usize,
    max_trailer: usize,
    max_body: u64,
}

impl ChunkedDecoder {
    pub fn new(limits: &Limits) -> Self {
        Self {
            state: State::Size,
            size: 0,
            size_digits: 0,
            remaining: 0,
            ext_bytes: 0,
            trailer_bytes: 0,
            body_bytes: 0,
            max_ext: limits.max_chunk_ext_bytes,
            max_trailer: limits.max_trailer_bytes,
            max_body: limits.max_body_bytes,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decoded body bytes so far.
    pub fn body_len(&self) -> u64 {
        self.body_bytes
    }

    /// Feeds `input`, appending chunk data to `out`. Trailer fields are checked and dropped.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<ChunkedProgress, H1Error> {
        let mut i = 0;
        while i < input.len() && self.state != State::Done {
            if self.state == State::Data {
                let take = usize::try_from(self.remaining)
                    .unwrap_or(usize::MAX)
                    .min(input.len() - i);
                out.extend_from_slice(&input[i..i + take]);
                i += take;
                self.remaining -= take as u64;
                if self.remaining == 0 {
                    self.state = State::DataCr;
                }
                continue;
            }
            self.step(input[i])?;
            i += 1;
        }
        Ok(ChunkedProgress {
            consumed: i,
            done: self.state == State::Done,
        })
    }

    fn step(&mut self, b: u8) -> Result<(), H1Error> {
        use State::*;
        if matches!(
            self.state,
            ExtBws
                | ExtBeforeName
                | ExtName
                | ExtAfterName
                | ExtBeforeValue
                | ExtToken
                | ExtQuoted
                | ExtQuotedEscape
                | ExtAfterQuoted
        ) {
            self.ext_bytes += 1;
            if self.ext_bytes > self.max_ext {
                return Err(H1Error::ChunkExtensionTooLong);
            }
        }
        if matches!(
            self.state,
            TrailerLineStart | TrailerName | TrailerValue | TrailerLf | FinalLf
        ) {
            self.trailer_bytes += 1;
            if self.trailer_bytes > self.max_trailer {
                return Err(H1Error::TrailerTooLarge);
            }
        }
        self.state = match (self.state, b) {
            // chunk-size = 1*HEXDIG
            (Size, _) if b.is_ascii_hexdigit() => {
                self.size_digits += 1;
                if self.size_digits > MAX_SIZE_DIGITS {
                    return Err(H1Error::BadChunkSize);
                }
                let digit = u64::from(hex_value(b));
                self.size = self
                    .size
                    .checked_mul(16)
                    .and_then(|s| s.checked_add(digit))
                    .ok_or(H1Error::BadChunkSize)?;
                Size
            }
            (Size, _) if self.size_digits == 0 => return Err(H1Error::BadChunkSize),
            (Size, b'\r') => SizeLf,
            (Size, b';') => ExtBeforeName,
            (Size, b' ' | b'\t') => ExtBws,
            (Size, _) => return Err(H1Error::BadChunkSize),

            // chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] )
            (ExtBws, b' ' | b'\t') => ExtBws,
            (ExtBws, b';') => ExtBeforeName,
            (ExtBeforeName, b' ' | b'\t') => ExtBeforeName,
            (ExtBeforeName, _) if is_tchar(b) => ExtName,
            (ExtName, _) if is_tchar(b) => ExtName,
            (ExtName, b' ' | b'\t') => ExtAfterName,
            (ExtName | ExtAfterName, b'=') => ExtBeforeValue,
            (ExtName | ExtAfterName, b';') => ExtBeforeName,
            (ExtName, b'\r') => SizeLf,
            (ExtAfterName, b' ' | b'\t') => ExtAfterName,
            (ExtBeforeValue, b' ' | b'\t') => ExtBeforeValue,
            (ExtBeforeValue, b'"') => ExtQuoted,
            (ExtBeforeValue, _) if is_tchar(b) => ExtToken,
            (ExtToken, _) if is_tchar(b) => ExtToken,
            (ExtToken, b' ' | b'\t') => ExtBws,
            (ExtToken, b';') => ExtBeforeName,
            (ExtToken, b'\r') => SizeLf,
            // quoted-string = DQUOTE *( qdtext / quoted-pair ) DQUOTE (RFC 9110 §5.6.4)
            (ExtQuoted, b'"') => ExtAfterQuoted,
            (ExtAfterQuoted, b' ' | b'\t') => ExtBws,
            (ExtAfterQuoted, b';') => ExtBeforeName,
            (ExtAfterQuoted, b'\r') => SizeLf,
            (ExtQuoted, b'\\') => ExtQuotedEscape,
            (ExtQuoted, _) if is_qdtext(b) => ExtQuoted,
            (ExtQuotedEscape, _)
                if b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80 =>
            {
                ExtQuoted
            }
            (
                ExtBws | ExtBeforeName | ExtName | ExtAfterName | ExtBeforeValue | ExtToken
                | ExtQuoted | ExtQuotedEscape | ExtAfterQuoted,
                _,
            ) => return Err(H1Error::BadChunkExtension),

            (SizeLf, b'\n') => {
                if self.size == 0 {
                    TrailerLineStart
                } else {
                    self.body_bytes = self
                        .body_bytes
                        .checked_add(self.size)
                        .filter(|&n| n <= self.max_body)
                        .ok_or(H1Error::BodyTooLarge)?;
                    self.remaining = self.size;
                    self.size = 0;
                    self.size_digits = 0;
                    self.ext_bytes = 0;
                    Data
                }
            }
            (SizeLf, _) => return Err(H1Error::BareLineEnding),

            (Data, _) => unreachable_data(),
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size,
            (DataCr | DataLf, _) => return Err(H1Error::BadChunkFraming),

            // trailer-section = *( field-line CRLF ); the same field rules as the head.
            (TrailerLineStart, b'\r') => FinalLf,
            (TrailerLineStart, _) if is_tchar(b) => TrailerName,
            (TrailerName, _) if is_tchar(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerLineStart | TrailerName, _) => return Err(H1Error::BadTrailer),
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, _) if is_field_value_byte(b) => TrailerValue,
            (TrailerValue, _) => return Err(H1Error::BadTrailer),
            (TrailerLf, b'\n') => TrailerLineStart,
            (FinalLf, b'\n') => Done,
            (TrailerLf | FinalLf, _) => return Err(H1Error::BareLineEnding),
            (Done, _) => Done,
        };
        Ok(())
    }
}

/// `decode` copies data in bulk and never hands a data byte to `step`.
#[cold]
fn unreachable_data() -> State {
    State::Data
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

/// qdtext = HTAB / SP / %x21 / %x23-5B / %x5D-7E / obs-text
fn is_qdtext(b: u8) -> bool {
    matches!(b, b'\t' | b' ' | 0x21 | 0x23..=0x5b | 0x5d..=0x7e | 0x80..=0xff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8]) -> Result<(Vec<u8>, usize), H1Error> {
        let mut d = ChunkedDecoder::new(&Limits::default());
        let mut out = Vec::new();
        let p = d.decode(input, &mut out)?;
        assert!(p.done, "incomplete: {:?}", String::from_utf8_lossy(input));
        Ok((out, p.consumed))
    }

    fn decode_err(input: &[u8]) -> H1Error {
        let mut d = ChunkedDecoder::new(&Limits::default());
        match d.decode(input, &mut Vec::new()) {
            Err(e) => e,
            Ok(p) => panic!("accepted {:?}: {p:?}", String::from_utf8_lossy(input)),
        }
    }

    #[test]
    fn decodes_chunks_and_stops_at_the_end() {
        let (body, used) =
            decode_all(b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\nNEXT").expect("valid");
        assert_eq!(body, b"hello world");
        assert_eq!(used, 26);
    }

    #[test]
    fn decodes_byte_by_byte() {
        let input = b"a;x=1\r\n0123456789\r\n1\r\n!\r\n0\r\nT: v\r\n\r\n";
        let mut d = ChunkedDecoder::new(&Limits::default());
        let mut out = Vec::new();
        for (i, b) in input.iter().enumerate() {
            let p = d.decode(std::slice::from_ref(b), &mut out).expect("valid");
            assert_eq!(p.done, i == input.len() - 1);
        }
        assert_eq!(out, b"0123456789!");
    }

    #[test]
    fn hex_sizes_either_case() {
        let (body, _) = decode_all(b"A\r\n0123456789\r\n0\r\n\r\n").expect("valid");
        assert_eq!(body.len(), 10);
        let (body, _) = decode_all(b"00a\r\n0123456789\r\n0\r\n\r\n").expect("valid");
        assert_eq!(body.len(), 10);
    }

    #[test]
    fn malformed_sizes_are_refused() {
        for input in [
            &b"\r\n"[..],
            b"x\r\n",
            b"-1\r\n",
            b"+1\r\n",
            b"0x5\r\n",
            b" 5\r\n",
            b";a\r\n",
        ] {
            assert_eq!(
                decode_err(input),
                H1Error::BadChunkSize,
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn overflowing_sizes_are_refused() {
        // httparse returns u64::MAX for 16 f's; 17 digits would wrap.
        assert_eq!(decode_err(b"fffffffffffffffff\r\n"), H1Error::BadChunkSize);
        assert_eq!(decode_err(b"00000000000000001\r\n"), H1Error::BadChunkSize);
        // 16 f's parses but is far over the body limit.
        assert_eq!(decode_err(b"ffffffffffffffff\r\n"), H1Error::BodyTooLarge);
    }

    #[test]
    fn body_limit_counts_all_chunks() {
        let limits = Limits {
            max_body_bytes: 8,
            ..Limits::default()
        };
        let mut d = ChunkedDecoder::new(&limits);
        let r = d.decode(b"5\r\nhello\r\n5\r\nworld\r\n", &mut Vec::new());
        assert_eq!(r, Err(H1Error::BodyTooLarge));
    }

    #[test]
    fn extensions_follow_the_grammar() {
        for ok in [
            &b"1;a\r\nx\r\n0\r\n\r\n"[..],
            b"1;a=b\r\nx\r\n0\r\n\r\n",
            b"1 ; a = b ;c\r\nx\r\n0\r\n\r\n",
            b"1;a=\"q \\\" s\"\r\nx\r\n0\r\n\r\n",
            b"1;a=\"q\" ;b\r\nx\r\n0;last\r\n\r\n",
        ] {
            decode_all(ok).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(ok)));
        }
        for bad in [
            &b"1;\r\n"[..],
            b"1;=b\r\n",
            b"1;a=\r\n",
            b"1;a b\r\n",
            b"1;a=b c\r\n",
            b"1;a=\"unterminated\r\n",
            b"1;a\x00\r\n",
            b"1;a=\x01\r\n",
            b"1;a=\"\x7f\"\r\n",
            b"1 \r\n",
            b"1;a=b \r\n",
        ] {
            let e = decode_err(bad);
            assert!(
                matches!(e, H1Error::BadChunkExtension),
                "{e:?} for {:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn extension_length_is_bounded() {
        let mut input = b"1;a=".to_vec();
        input.extend(std::iter::repeat_n(b'b', 2000));
        assert_eq!(decode_err(&input), H1Error::ChunkExtensionTooLong);
    }

    #[test]
    fn bare_line_endings_in_framing_are_refused() {
        assert_eq!(decode_err(b"5\nhello\r\n"), H1Error::BadChunkSize);
        assert_eq!(decode_err(b"5\r\rhello\r\n"), H1Error::BareLineEnding);
        assert_eq!(
            decode_err(b"5\r\nhello\n0\r\n\r\n"),
            H1Error::BadChunkFraming
        );
        assert_eq!(decode_err(b"5\r\nhelloX\r\n"), H1Error::BadChunkFraming);
        assert_eq!(decode_err(b"0\r\n\n"), H1Error::BadTrailer);
        assert_eq!(decode_err(b"0\r\nA: b\n\r\n"), H1Error::BadTrailer);
    }

    #[test]
    fn trailers_are_checked_and_bounded() {
        decode_all(b"0\r\nChecksum: abc\r\nX:\r\n\r\n").expect("valid trailers");
        assert_eq!(decode_err(b"0\r\nBad Name: x\r\n\r\n"), H1Error::BadTrailer);
        assert_eq!(decode_err(b"0\r\n continued\r\n\r\n"), H1Error::BadTrailer);
        assert_eq!(decode_err(b"0\r\nA: b\0\r\n\r\n"), H1Error::BadTrailer);
        let limits = Limits {
            max_trailer_bytes: 16,
            ..Limits::default()
        };
        let mut d = ChunkedDecoder::new(&limits);
        let r = d.decode(b"0\r\nA: 0123456789abcdef\r\n\r\n", &mut Vec::new());
        assert_eq!(r, Err(H1Error::TrailerTooLarge));
    }

    proptest::proptest! {
        #[test]
        fn any_chunking_of_any_body_round_trips(
            body in proptest::collection::vec(proptest::num::u8::ANY, 0..2048),
            cuts in proptest::collection::vec(1usize..300, 1..20),
            feed in 1usize..64,
        ) {
            let mut encoded = Vec::new();
            let mut rest = &body[..];
            for c in cuts.iter().cycle() {
                if rest.is_empty() { break; }
                let n = (*c).min(rest.len());
                encoded.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                encoded.extend_from_slice(&rest[..n]);
                encoded.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            encoded.extend_from_slice(b"0\r\n\r\n");
            let mut d = ChunkedDecoder::new(&Limits::default());
            let mut out = Vec::new();
            let mut pos = 0;
            while pos < encoded.len() {
                let end = (pos + feed).min(encoded.len());
                let p = d.decode(&encoded[pos..end], &mut out).expect("valid encoding");
                pos += p.consumed;
                if p.done { break; }
            }
            proptest::prop_assert!(d.is_done());
            proptest::prop_assert_eq!(pos, encoded.len());
            proptest::prop_assert_eq!(out, body);
        }

        #[test]
        fn never_panics(input in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let mut d = ChunkedDecoder::new(&Limits::default());
            let _ = d.decode(&input, &mut Vec::new());
        }
    }
}
