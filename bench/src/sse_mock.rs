//! `aigw-bench stream-mock`: an OpenAI-style provider that answers chat completions as
//! server-sent events, paced like a model generating tokens, for thousands of concurrent
//! streams on one thread.
//!
//! `POST /v1/chat/completions` with `"stream": true` is answered `200`,
//! `content-type: text/event-stream`, `transfer-encoding: chunked`, one chunk per event: the
//! role chunk at once (with the response head), then `--events` content chunks
//! `--interval-ms` apart, then — one interval later and written together — the
//! `finish_reason: "stop"` chunk, the usage chunk (`"choices":[]`, only when the request
//! asked `"stream_options":{"include_usage":true}`, which also puts `"usage":null` in every
//! other chunk), `data: [DONE]` and the terminal `0\r\n\r\n`. Connections are kept alive
//! between requests. Without `"stream": true` the same request gets one JSON completion.
//!
//! Echo mode, for requests whose `model` starts with `bench-echo`: the content chunks carry
//! the last user message back, [`ECHO_PIECE`] bytes each, with no pause between them (a
//! 400 KB prompt becomes about 6,000 events), so a client that stops reading leaves a proxy
//! with a large request behind it and a provider still sending.
//!
//! The runtime is monoio on one thread, built like a data plane worker's (io_uring where
//! the kernel allows it, else epoll). It is the lighter choice here: a stream is a task that
//! sleeps on the timer wheel between events, a write is a ring entry submitted together
//! with the writes of every other stream due at the same tick (one `io_uring_enter` for
//! many events, where a readiness runtime such as tokio's current-thread one makes one
//! `write` system call per event), and there is no work-stealing machinery or `Send` bound to
//! pay for. It is already part of the workspace through the data plane.

use std::cell::Cell;
use std::io::{self, Write as _};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use monoio::net::{ListenerOpts, TcpListener};
use monoio::time::Instant;
use serde_json::Value;

use crate::netio::{self, Conn};

/// Content bytes per event in echo mode.
pub(crate) const ECHO_PIECE: usize = 64;
/// Models answered in echo mode start with this.
pub(crate) const ECHO_MODEL_PREFIX: &str = "bench-echo";

const MAX_HEAD: usize = 64 * 1024;
const MAX_BODY: usize = 64 << 20;
/// A connection's read buffer starts at this and shrinks back to it after a large request.
const READ_BUF: usize = 16 * 1024;
const FINGERPRINT: &str = "fp_b28b39ffa8";

/// Options of `aigw-bench stream-mock`.
#[derive(Debug, clap::Args)]
pub(crate) struct MockOpts {
    #[arg(long)]
    listen: SocketAddr,
    /// Content events per stream.
    #[arg(long, default_value_t = 100)]
    events: usize,
    /// Milliseconds between events.
    #[arg(long, default_value_t = 20)]
    interval_ms: u64,
}

/// How a stream is paced.
#[derive(Debug, Clone, Copy)]
struct Pace {
    events: usize,
    interval: Duration,
}

pub(crate) fn serve(opts: &MockOpts) -> anyhow::Result<()> {
    let pace = Pace {
        events: opts.events,
        interval: Duration::from_millis(opts.interval_ms),
    };
    let (mut rt, _) = netio::runtime()?;
    rt.block_on(accept_loop(opts.listen, pace))
}

async fn accept_loop(listen: SocketAddr, pace: Pace) -> anyhow::Result<()> {
    let listener = TcpListener::bind_with_config(listen, &ListenerOpts::new().backlog(4096))?;
    let ids = Rc::new(Cell::new(0u64));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                monoio::spawn(serve_conn(Conn::new(stream, READ_BUF), pace, ids.clone()));
            }
            Err(e) => {
                // Out of descriptors, most likely: wait for connections to close.
                eprintln!("stream-mock: accept: {e}");
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// A request head, parsed.
#[derive(Debug)]
struct Head {
    len: usize,
    body_len: usize,
    close: bool,
    chat: bool,
}

fn parse_head(buf: &[u8]) -> Result<Option<Head>, &'static str> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err("request head too large")
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(_) => return Err("malformed request head"),
    };
    let mut body_len = 0;
    let mut close = req.version == Some(0);
    for f in req.headers.iter() {
        if f.name.eq_ignore_ascii_case("content-length") {
            body_len = std::str::from_utf8(f.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n <= MAX_BODY)
                .ok_or("bad content-length")?;
        } else if f.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err("only content-length request bodies are supported");
        } else if f.name.eq_ignore_ascii_case("connection") {
            close |= String::from_utf8_lossy(f.value)
                .to_ascii_lowercase()
                .contains("close");
        }
    }
    Ok(Some(Head {
        len,
        body_len,
        close,
        chat: req.method == Some("POST") && req.path == Some("/v1/chat/completions"),
    }))
}

async fn serve_conn(mut conn: Conn, pace: Pace, ids: Rc<Cell<u64>>) {
    loop {
        let head = match read_request(&mut conn).await {
            Ok(Some(h)) => h,
            Ok(None) => return,
            Err(e) => {
                let _ = conn.write(plain(400, &e.to_string(), true)).await;
                return;
            }
        };
        let end = head.len + head.body_len;
        let answered = answer(&mut conn, &head, pace, &ids).await;
        conn.buf.drain(..end);
        if conn.buf.capacity() > 4 * READ_BUF {
            conn.buf.shrink_to(READ_BUF);
        }
        if answered.is_err() || head.close {
            return;
        }
    }
}

/// Reads one whole request (head and body) into `conn.buf`; `None` when the peer closed
/// before sending one.
async fn read_request(conn: &mut Conn) -> io::Result<Option<Head>> {
    let head = loop {
        match parse_head(&conn.buf) {
            Ok(Some(h)) => break h,
            Ok(None) => {}
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
        if conn.fill(READ_BUF).await? == 0 {
            return if conn.buf.is_empty() {
                Ok(None)
            } else {
                Err(io::ErrorKind::UnexpectedEof.into())
            };
        }
    };
    let end = head.len + head.body_len;
    while conn.buf.len() < end {
        let want = (end - conn.buf.len()).clamp(READ_BUF, 1 << 20);
        if conn.fill(want).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Some(head))
}

/// What the mock needs from a chat request's body.
#[derive(Debug)]
struct ChatRequest {
    model: String,
    stream: bool,
    include_usage: bool,
    prompt: String,
}

fn parse_chat(body: &[u8]) -> Result<ChatRequest, &'static str> {
    let v: Value = serde_json::from_slice(body).map_err(|_| "the body is not JSON")?;
    let model = v["model"]
        .as_str()
        .ok_or("`model` is required")?
        .to_string();
    let prompt = v["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .map(|m| match &m["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join(""),
            _ => String::new(),
        })
        .ok_or("`messages` must contain a user message")?;
    Ok(ChatRequest {
        model,
        stream: v["stream"] == true,
        include_usage: v["stream_options"]["include_usage"] == true,
        prompt,
    })
}

async fn answer(conn: &mut Conn, head: &Head, pace: Pace, ids: &Cell<u64>) -> io::Result<()> {
    if !head.chat {
        conn.write(plain(
            404,
            "only POST /v1/chat/completions is served",
            false,
        ))
        .await?;
        return Ok(());
    }
    let body = &conn.buf[head.len..head.len + head.body_len];
    let req = match parse_chat(body) {
        Ok(r) => r,
        Err(e) => {
            conn.write(plain(400, e, false)).await?;
            return Ok(());
        }
    };
    ids.set(ids.get() + 1);
    let meta = StreamMeta {
        id: format!("chatcmpl-bench{:020x}", ids.get()),
        created: unix_now(),
        model: serde_json::to_string(&req.model).unwrap_or_else(|_| "\"\"".into()),
        include_usage: req.include_usage,
        prompt_tokens: (req.prompt.len() as u64).div_ceil(4).max(1),
    };
    if !req.stream {
        conn.write(completion(&meta, pace.events)).await?;
        return Ok(());
    }
    if req.model.starts_with(ECHO_MODEL_PREFIX) {
        stream_echo(conn, &meta, &req.prompt).await
    } else {
        stream_paced(conn, &meta, pace).await
    }
}

/// The fields every chunk of one stream repeats.
#[derive(Debug)]
struct StreamMeta {
    id: String,
    created: u64,
    /// The model name as a JSON string, quotes included.
    model: String,
    include_usage: bool,
    prompt_tokens: u64,
}

/// What one chunk's `choices` (or `usage`) says.
#[derive(Debug, Clone, Copy)]
enum Delta<'a> {
    Role,
    /// The content as a JSON string, quotes included.
    Content(&'a str),
    Stop,
    Usage {
        completion_tokens: u64,
    },
}

const SSE_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\ncache-control: no-cache\r\nx-request-id: req_bench\r\ntransfer-encoding: chunked\r\n\r\n";

/// The words content chunks carry, each a JSON string with its trailing space.
const WORDS: &[&str] = &[
    "\"The \"",
    "\"gateway \"",
    "\"relays \"",
    "\"every \"",
    "\"token \"",
    "\"as \"",
    "\"soon \"",
    "\"as \"",
    "\"it \"",
    "\"arrives. \"",
];

impl StreamMeta {
    /// One chat completion chunk as JSON.
    fn chunk_json(&self, out: &mut Vec<u8>, delta: Delta<'_>) {
        let _ = write!(
            out,
            r#"{{"id":"{}","object":"chat.completion.chunk","created":{},"model":{},"system_fingerprint":"{FINGERPRINT}","choices":["#,
            self.id, self.created, self.model
        );
        match delta {
            Delta::Role => out.extend_from_slice(
                br#"{"index":0,"delta":{"role":"assistant","content":"","refusal":null},"logprobs":null,"finish_reason":null}"#,
            ),
            Delta::Content(text) => {
                out.extend_from_slice(br#"{"index":0,"delta":{"content":"#);
                out.extend_from_slice(text.as_bytes());
                out.extend_from_slice(br#"},"logprobs":null,"finish_reason":null}"#);
            }
            Delta::Stop => out.extend_from_slice(
                br#"{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}"#,
            ),
            Delta::Usage { .. } => {}
        }
        out.push(b']');
        if let Delta::Usage { completion_tokens } = delta {
            let p = self.prompt_tokens;
            let _ = write!(
                out,
                r#","usage":{{"prompt_tokens":{p},"completion_tokens":{completion_tokens},"total_tokens":{}}}"#,
                p + completion_tokens
            );
        } else if self.include_usage {
            out.extend_from_slice(br#","usage":null"#);
        }
        out.push(b'}');
    }

    /// Appends one event as one chunk of the chunked body.
    fn push_event(&self, out: &mut Vec<u8>, scratch: &mut Vec<u8>, delta: Delta<'_>) {
        scratch.clear();
        scratch.extend_from_slice(b"data: ");
        self.chunk_json(scratch, delta);
        scratch.extend_from_slice(b"\n\n");
        push_chunk(out, scratch);
    }

    /// The end of a stream: the stop chunk, the usage chunk if asked for, `[DONE]`, the
    /// terminal chunk.
    fn push_end(&self, out: &mut Vec<u8>, scratch: &mut Vec<u8>, completion_tokens: u64) {
        self.push_event(out, scratch, Delta::Stop);
        if self.include_usage {
            self.push_event(out, scratch, Delta::Usage { completion_tokens });
        }
        push_chunk(out, b"data: [DONE]\n\n");
        out.extend_from_slice(b"0\r\n\r\n");
    }
}

fn push_chunk(out: &mut Vec<u8>, data: &[u8]) {
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// The head and role chunk at once, then a content chunk every interval.
async fn stream_paced(conn: &mut Conn, meta: &StreamMeta, pace: Pace) -> io::Result<()> {
    let mut out = Vec::with_capacity(1024);
    let mut scratch = Vec::with_capacity(512);
    out.extend_from_slice(SSE_HEAD);
    meta.push_event(&mut out, &mut scratch, Delta::Role);
    out = conn.write(out).await?;
    let start = Instant::now();
    for k in 1..=pace.events {
        monoio::time::sleep_until(start + pace.interval * k as u32).await;
        out.clear();
        let word = WORDS[(k - 1) % WORDS.len()];
        meta.push_event(&mut out, &mut scratch, Delta::Content(word));
        out = conn.write(out).await?;
    }
    monoio::time::sleep_until(start + pace.interval * (pace.events + 1) as u32).await;
    out.clear();
    meta.push_end(&mut out, &mut scratch, pace.events as u64);
    conn.write(out).await?;
    Ok(())
}

/// The prompt back, [`ECHO_PIECE`] bytes per content chunk, as fast as the reader takes them.
async fn stream_echo(conn: &mut Conn, meta: &StreamMeta, prompt: &str) -> io::Result<()> {
    let mut out = Vec::with_capacity(1024);
    let mut scratch = Vec::with_capacity(512);
    out.extend_from_slice(SSE_HEAD);
    meta.push_event(&mut out, &mut scratch, Delta::Role);
    out = conn.write(out).await?;
    let mut pieces = 0u64;
    for piece in pieces_of(prompt, ECHO_PIECE) {
        out.clear();
        let text = serde_json::to_string(piece).unwrap_or_else(|_| "\"\"".into());
        meta.push_event(&mut out, &mut scratch, Delta::Content(&text));
        out = conn.write(out).await?;
        pieces += 1;
    }
    out.clear();
    meta.push_end(&mut out, &mut scratch, pieces);
    conn.write(out).await?;
    Ok(())
}

/// `s` cut into pieces of at most `max` bytes (at least 4), each ending on a character
/// boundary.
fn pieces_of(s: &str, max: usize) -> impl Iterator<Item = &str> {
    let max = max.max(4);
    let mut rest = s;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(max);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let (piece, tail) = rest.split_at(end);
        rest = tail;
        Some(piece)
    })
}

/// The non-streaming answer: one completion of `words` words.
fn completion(meta: &StreamMeta, words: usize) -> Vec<u8> {
    let content: String = (0..words)
        .map(|k| WORDS[k % WORDS.len()].trim_matches('"'))
        .collect();
    let c = words as u64;
    let p = meta.prompt_tokens;
    let body = format!(
        r#"{{"id":"{}","object":"chat.completion","created":{},"model":{},"system_fingerprint":"{FINGERPRINT}","choices":[{{"index":0,"message":{{"role":"assistant","content":"{content}","refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{{"prompt_tokens":{p},"completion_tokens":{c},"total_tokens":{}}}}}"#,
        meta.id,
        meta.created,
        meta.model,
        p + c
    );
    let mut out = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// An error in OpenAI's shape.
fn plain(status: u16, message: &str, close: bool) -> Vec<u8> {
    let body = serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})
        .to_string();
    let reason = if status == 404 {
        "Not Found"
    } else {
        "Bad Request"
    };
    let connection = if close { "connection: close\r\n" } else { "" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n{connection}content-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(include_usage: bool) -> StreamMeta {
        StreamMeta {
            id: "chatcmpl-x".into(),
            created: 1,
            model: "\"m\"".into(),
            include_usage,
            prompt_tokens: 7,
        }
    }

    fn events(out: &[u8]) -> Vec<String> {
        // Undo the chunked framing the simple way: every chunk is `len\r\ndata\r\n`.
        let mut rest = out;
        let mut data = Vec::new();
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap_or(0);
            let len = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap_or("x"), 16)
                .unwrap_or(usize::MAX);
            if len == 0 {
                assert_eq!(&rest[nl..], b"\r\n\r\n");
                break;
            }
            data.extend_from_slice(&rest[nl + 2..nl + 2 + len]);
            assert_eq!(&rest[nl + 2 + len..nl + 4 + len], b"\r\n");
            rest = &rest[nl + 4 + len..];
        }
        String::from_utf8(data)
            .unwrap_or_default()
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").unwrap_or("not data").to_string())
            .collect()
    }

    #[test]
    fn chunks_are_valid_json_with_usage_null_only_when_asked() {
        for include_usage in [false, true] {
            let m = meta(include_usage);
            let (mut out, mut scratch) = (Vec::new(), Vec::new());
            m.push_event(&mut out, &mut scratch, Delta::Role);
            m.push_event(&mut out, &mut scratch, Delta::Content("\"hi \""));
            m.push_end(&mut out, &mut scratch, 1);
            let ev = events(&out);
            assert_eq!(ev.len(), if include_usage { 5 } else { 4 });
            assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
            for e in &ev[..ev.len() - 1] {
                let v: Value = serde_json::from_str(e).unwrap_or(Value::Null);
                assert_eq!(v["object"], "chat.completion.chunk", "{e}");
                assert_eq!(v.get("usage").is_some(), include_usage, "{e}");
            }
            let content: Value = serde_json::from_str(&ev[1]).unwrap_or(Value::Null);
            assert_eq!(content["choices"][0]["delta"]["content"], "hi ");
            if include_usage {
                let u: Value = serde_json::from_str(&ev[3]).unwrap_or(Value::Null);
                assert_eq!(u["choices"], serde_json::json!([]));
                assert_eq!(u["usage"]["total_tokens"], 8);
            }
        }
    }

    #[test]
    fn pieces_end_on_character_boundaries() {
        let s = "aé".repeat(100);
        let pieces: Vec<&str> = pieces_of(&s, 64).collect();
        assert_eq!(pieces.concat(), s);
        assert!(pieces.iter().all(|p| p.len() <= 64 && !p.is_empty()));
    }

    #[test]
    fn heads_with_length_keep_alive_and_close() {
        let h = parse_head(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n",
        )
        .ok()
        .flatten();
        assert!(matches!(
            h,
            Some(Head {
                body_len: 12,
                close: false,
                chat: true,
                ..
            })
        ));
        let h = parse_head(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n")
            .ok()
            .flatten();
        assert!(matches!(
            h,
            Some(Head {
                close: true,
                chat: false,
                ..
            })
        ));
        assert!(parse_head(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
        assert!(matches!(parse_head(b"POST / HTTP/1.1\r\nHo"), Ok(None)));
    }

    #[test]
    fn chat_requests_are_read() {
        let r = parse_chat(br#"{"model":"m","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"},{"role":"user","content":[{"type":"text","text":"c"}]}]}"#);
        let r = r.ok();
        assert!(matches!(
            &r,
            Some(ChatRequest {
                stream: true,
                include_usage: true,
                ..
            })
        ));
        assert_eq!(r.map(|r| r.prompt), Some("c".to_string()));
    }
}
