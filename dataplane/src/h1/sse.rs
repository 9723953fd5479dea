//! Server-sent events (WHATWG HTML §9.2.6) framed out of a response body as it arrives.
//!
//! The framer splits the body into complete events, each kept as the exact bytes it arrived
//! as (fields, comments, line ends and the blank line that ends it), so an event that no
//! one changes is forwarded byte for byte, and usually without a copy: an event that lies
//! within one read is a slice of that read. Only an event split across reads is assembled
//! in a buffer, which is bounded: a stream that never ends an event cannot grow memory past
//! `max_event_bytes`.
//!
//! [`SseEvent::parse`] reads an event's `event` and `data` fields when something needs
//! them.

use std::borrow::Cow;
use std::ops::Range;

/// An event grew past the bound before it ended. Nothing from `unsent_from` on in the
/// chunk was passed on, and [`SseFramer::incomplete`] still holds the event's earlier part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("server-sent event larger than {max} bytes")]
pub struct SseTooLarge {
    pub max: usize,
    pub unsent_from: usize,
}

/// Splits a byte stream into complete events.
#[derive(Debug)]
pub struct SseFramer {
    /// The start of an event whose end has not arrived yet.
    pending: Vec<u8>,
    /// Bytes of the current line seen so far (0: at the start of a line).
    line_len: usize,
    /// The last byte seen was a CR: a LF right after it belongs to the same line end.
    after_cr: bool,
    max_event_bytes: usize,
}

impl SseFramer {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            pending: Vec::new(),
            line_len: 0,
            after_cr: false,
            max_event_bytes,
        }
    }

    /// Feeds the next bytes of the body; `on_event` gets every event they complete, in
    /// order, with where it lies in `chunk` (`None` when it began in an earlier chunk and
    /// was assembled).
    pub fn feed(
        &mut self,
        chunk: &[u8],
        mut on_event: impl FnMut(&[u8], Option<Range<usize>>),
    ) -> Result<(), SseTooLarge> {
        let mut i = 0;
        let mut event_start = 0;
        if self.after_cr && !chunk.is_empty() {
            self.after_cr = false;
            if chunk[0] == b'\n' {
                i = 1;
            }
        }
        while let Some(at) = memchr::memchr2(b'\n', b'\r', &chunk[i..]) {
            let pos = i + at;
            let blank = self.line_len == 0 && pos == i;
            let end = if chunk[pos] == b'\r' {
                match chunk.get(pos + 1) {
                    Some(b'\n') => pos + 2,
                    Some(_) => pos + 1,
                    None => {
                        self.after_cr = true;
                        pos + 1
                    }
                }
            } else {
                pos + 1
            };
            self.line_len = 0;
            i = end;
            if blank {
                if self.pending.is_empty() {
                    on_event(&chunk[event_start..end], Some(event_start..end));
                } else {
                    if self.pending.len() + (end - event_start) > self.max_event_bytes {
                        return Err(SseTooLarge {
                            max: self.max_event_bytes,
                            unsent_from: event_start,
                        });
                    }
                    self.pending.extend_from_slice(&chunk[event_start..end]);
                    on_event(&self.pending, None);
                    self.pending.clear();
                }
                event_start = end;
            }
        }
        self.line_len += chunk.len() - i;
        let tail = &chunk[event_start..];
        if self.pending.len() + tail.len() > self.max_event_bytes {
            return Err(SseTooLarge {
                max: self.max_event_bytes,
                unsent_from: event_start,
            });
        }
        self.pending.extend_from_slice(tail);
        Ok(())
    }

    /// The bytes of an event that has begun and not ended.
    pub fn incomplete(&self) -> &[u8] {
        &self.pending
    }
}

/// One complete event, read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent<'a> {
    /// The event as it arrived, its ending blank line included.
    pub raw: &'a [u8],
    /// The value of the last `event:` field; empty for the default type.
    pub event: &'a [u8],
    /// The `data:` lines joined with `\n`; `None` when the event has none (a comment or a
    /// keep-alive, which clients ignore).
    pub data: Option<Cow<'a, [u8]>>,
    /// Where `data` lies in `raw` when it is one line, so it can be edited in place.
    pub data_at: Option<usize>,
}

impl<'a> SseEvent<'a> {
    /// Reads the fields of a complete event (`id`, `retry` and unknown fields do not matter
    /// to the gateway).
    pub fn parse(raw: &'a [u8]) -> Self {
        let mut event: &[u8] = b"";
        let mut data: Option<Cow<'a, [u8]>> = None;
        let mut data_at = None;
        let mut i = 0;
        while i < raw.len() {
            let end = memchr::memchr2(b'\n', b'\r', &raw[i..]).map_or(raw.len(), |n| i + n);
            let line = &raw[i..end];
            if !line.is_empty() && line[0] != b':' {
                let (name, value, value_at) = match memchr::memchr(b':', line) {
                    Some(c) => {
                        let skip = usize::from(line.get(c + 1) == Some(&b' '));
                        (&line[..c], &line[c + 1 + skip..], i + c + 1 + skip)
                    }
                    None => (line, &b""[..], end),
                };
                match name {
                    b"event" => event = value,
                    b"data" => match &mut data {
                        None => {
                            data = Some(Cow::Borrowed(value));
                            data_at = Some(value_at);
                        }
                        Some(d) => {
                            let joined = d.to_mut();
                            joined.push(b'\n');
                            joined.extend_from_slice(value);
                            data_at = None;
                        }
                    },
                    _ => {}
                }
            }
            i = end;
            if raw.get(i) == Some(&b'\r') && raw.get(i + 1) == Some(&b'\n') {
                i += 2;
            } else {
                i += 1;
            }
        }
        Self {
            raw,
            event,
            data,
            data_at,
        }
    }

    pub fn data(&self) -> &[u8] {
        self.data.as_deref().unwrap_or_default()
    }
}

/// An event with `data` replaced (one `data:` line per line of it), keeping its type.
pub fn write_event(event: &[u8], data: &[u8], out: &mut Vec<u8>) {
    if !event.is_empty() {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(event);
        out.push(b'\n');
    }
    for line in data.split(|&b| b == b'\n') {
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (event, data) of every event, and whether each event's raw bytes were a slice of its
    /// chunk.
    fn frame(chunks: &[&[u8]], max: usize) -> Result<Vec<(String, String, bool)>, SseTooLarge> {
        let mut f = SseFramer::new(max);
        let mut out = Vec::new();
        let mut raw_total = Vec::new();
        for c in chunks {
            f.feed(c, |raw, range| {
                if let Some(r) = &range {
                    assert_eq!(&c[r.clone()], raw);
                }
                raw_total.extend_from_slice(raw);
                let e = SseEvent::parse(raw);
                out.push((
                    String::from_utf8_lossy(e.event).into_owned(),
                    String::from_utf8_lossy(e.data()).into_owned(),
                    range.is_some(),
                ));
            })?;
        }
        raw_total.extend_from_slice(f.incomplete());
        assert_eq!(raw_total, chunks.concat(), "every byte is kept, in order");
        Ok(out)
    }

    fn fields(v: Vec<(String, String, bool)>) -> Vec<(String, String)> {
        v.into_iter().map(|(e, d, _)| (e, d)).collect()
    }

    #[test]
    fn openai_style_in_one_read_is_sliced_not_copied() {
        let got = frame(&[b"data: {\"a\":1}\n\ndata: [DONE]\n\n"], 1 << 20).expect("bounded");
        assert_eq!(
            got,
            vec![
                ("".into(), "{\"a\":1}".into(), true),
                ("".into(), "[DONE]".into(), true)
            ]
        );
    }

    #[test]
    fn anthropic_style_split_anywhere() {
        let raw: &[u8] = b"event: message_start\ndata: {\"x\":1}\n\n: ping\n\nevent: message_stop\r\ndata: {}\r\n\r\n";
        let whole = fields(frame(&[raw], 1 << 20).expect("bounded"));
        assert_eq!(
            whole,
            vec![
                ("message_start".into(), "{\"x\":1}".into()),
                ("".into(), "".into()),
                ("message_stop".into(), "{}".into())
            ]
        );
        for cut in 0..raw.len() {
            for cut2 in cut..raw.len() {
                let got = fields(
                    frame(&[&raw[..cut], &raw[cut..cut2], &raw[cut2..]], 1 << 20).expect("bounded"),
                );
                assert_eq!(got, whole, "cut at {cut} and {cut2}");
            }
        }
    }

    #[test]
    fn every_line_ending_ends_events() {
        for raw in [
            &b"data: a\r\rdata: b\r\r"[..],
            b"data: a\n\ndata: b\n\n",
            b"data: a\r\n\r\ndata: b\r\n\r\n",
            b"data: a\r\n\ndata: b\n\r\n",
        ] {
            let got = fields(frame(&[raw], 64).expect("bounded"));
            assert_eq!(
                got,
                vec![("".into(), "a".into()), ("".into(), "b".into())],
                "{raw:?}"
            );
            for cut in 0..raw.len() {
                assert_eq!(
                    fields(frame(&[&raw[..cut], &raw[cut..]], 64).expect("bounded")),
                    got,
                    "{raw:?} cut at {cut}"
                );
            }
        }
    }

    #[test]
    fn multi_line_data_is_joined_and_comments_have_none() {
        let e = SseEvent::parse(b"data: a\ndata:b\n: c\n\n");
        assert_eq!(e.data(), b"a\nb");
        assert_eq!(e.data_at, None);
        let e = SseEvent::parse(b"event: x\ndata: {\"k\":1}\n\n");
        assert_eq!(e.data_at, Some(15));
        assert_eq!(&e.raw[15..22], b"{\"k\":1}");
        let e = SseEvent::parse(b": ping\n\n");
        assert!(e.data.is_none());
    }

    #[test]
    fn events_are_bounded() {
        let mut f = SseFramer::new(16);
        let e = f
            .feed(b"data: a\n\ndata: 0123456789abcdefghij", |_, _| {})
            .expect_err("too large");
        assert_eq!(e.unsent_from, 9);
        let mut f = SseFramer::new(16);
        f.feed(b"data: 0123", |_, _| {}).expect("bounded so far");
        let e = f
            .feed(b"456789abcdefghij\n\n", |_, _| {})
            .expect_err("too large");
        assert_eq!((e.unsent_from, f.incomplete()), (0, &b"data: 0123"[..]));
        // Events within one read are not held, whatever their size.
        assert!(frame(&[b"data: 0123456789abcdefghij\n\n"], 16).is_ok());
    }

    #[test]
    fn rewritten_events_keep_their_type() {
        let mut out = Vec::new();
        write_event(b"delta", b"{}\n[]", &mut out);
        assert_eq!(out, b"event: delta\ndata: {}\ndata: []\n\n");
    }
}
