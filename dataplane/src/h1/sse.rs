//! Server-sent events (WHATWG HTML §9.2.6), parsed incrementally from a response body.
//!
//! The relay forwards a stream's bytes as they arrive; this parser watches the same bytes
//! to see each complete event (usage figures, the end-of-stream marker, and later the text
//! that redaction rewrites). Events are bounded: a stream that never ends an event cannot
//! grow memory past `max_event_bytes`.

/// One complete event. `data` joins multiple `data:` lines with `\n`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SseEvent<'a> {
    pub event: &'a [u8],
    pub data: &'a [u8],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("server-sent event larger than {0} bytes")]
pub struct SseTooLarge(pub usize);

#[derive(Debug)]
pub struct SseParser {
    line: Vec<u8>,
    event: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    after_cr: bool,
    max_event_bytes: usize,
    pending_bytes: usize,
}

impl SseParser {
    pub fn new(max_event_bytes: usize) -> Self {
        Self {
            line: Vec::new(),
            event: Vec::new(),
            data: Vec::new(),
            has_data: false,
            after_cr: false,
            max_event_bytes,
            pending_bytes: 0,
        }
    }

    /// Feeds bytes; calls `on_event` for every event they complete.
    pub fn feed(
        &mut self,
        input: &[u8],
        mut on_event: impl FnMut(SseEvent<'_>),
    ) -> Result<(), SseTooLarge> {
        let mut rest = input;
        while !rest.is_empty() {
            // A CRLF split across two feeds: the LF belongs to the line already ended.
            if self.after_cr {
                self.after_cr = false;
                if rest[0] == b'\n' {
                    rest = &rest[1..];
                    continue;
                }
            }
            match memchr::memchr2(b'\n', b'\r', rest) {
                Some(i) => {
                    self.pending_bytes += i + 1;
                    if self.pending_bytes > self.max_event_bytes {
                        return Err(SseTooLarge(self.max_event_bytes));
                    }
                    self.line.extend_from_slice(&rest[..i]);
                    let was_cr = rest[i] == b'\r';
                    rest = &rest[i + 1..];
                    if was_cr {
                        if rest.first() == Some(&b'\n') {
                            rest = &rest[1..];
                        } else if rest.is_empty() {
                            self.after_cr = true;
                        }
                    }
                    self.end_line(&mut on_event);
                }
                None => {
                    self.pending_bytes += rest.len();
                    if self.pending_bytes > self.max_event_bytes {
                        return Err(SseTooLarge(self.max_event_bytes));
                    }
                    self.line.extend_from_slice(rest);
                    rest = &[];
                }
            }
        }
        Ok(())
    }

    fn end_line(&mut self, on_event: &mut impl FnMut(SseEvent<'_>)) {
        let line = std::mem::take(&mut self.line);
        if line.is_empty() {
            if self.has_data || !self.event.is_empty() {
                on_event(SseEvent {
                    event: &self.event,
                    data: &self.data,
                });
            }
            self.event.clear();
            self.data.clear();
            self.has_data = false;
            self.pending_bytes = 0;
        } else if line[0] != b':' {
            let (name, value) = match memchr::memchr(b':', &line) {
                Some(i) => {
                    let v = &line[i + 1..];
                    (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
                }
                None => (&line[..], &b""[..]),
            };
            match name {
                b"event" => {
                    self.event.clear();
                    self.event.extend_from_slice(value);
                }
                b"data" => {
                    if self.has_data {
                        self.data.push(b'\n');
                    }
                    self.data.extend_from_slice(value);
                    self.has_data = true;
                }
                _ => {} // id, retry and unknown fields do not matter to the gateway
            }
        }
        self.line = line;
        self.line.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(chunks: &[&[u8]]) -> Vec<(String, String)> {
        let mut p = SseParser::new(1 << 20);
        let mut out = Vec::new();
        for c in chunks {
            p.feed(c, |e| {
                out.push((
                    String::from_utf8_lossy(e.event).into_owned(),
                    String::from_utf8_lossy(e.data).into_owned(),
                ))
            })
            .expect("bounded");
        }
        out
    }

    #[test]
    fn openai_style() {
        let got = events(&[b"data: {\"a\":1}\n\ndata: [DONE]\n\n"]);
        assert_eq!(
            got,
            vec![
                ("".into(), "{\"a\":1}".into()),
                ("".into(), "[DONE]".into())
            ]
        );
    }

    #[test]
    fn anthropic_style_split_anywhere() {
        let raw = b"event: message_start\ndata: {\"x\":1}\n\n: ping\n\nevent: message_stop\r\ndata: {}\r\n\r\n";
        let whole = events(&[raw]);
        assert_eq!(
            whole,
            vec![
                ("message_start".into(), "{\"x\":1}".into()),
                ("message_stop".into(), "{}".into())
            ]
        );
        for cut in 0..raw.len() {
            assert_eq!(events(&[&raw[..cut], &raw[cut..]]), whole, "cut at {cut}");
        }
    }

    #[test]
    fn multi_line_data_is_joined() {
        assert_eq!(
            events(&[b"data: a\ndata: b\n\n"]),
            vec![("".into(), "a\nb".into())]
        );
    }

    #[test]
    fn events_are_bounded() {
        let mut p = SseParser::new(16);
        assert!(p.feed(b"data: 0123456789abcdefghij", |_| {}).is_err());
    }
}
