//! Redaction of the server-sent event streams the providers answer with: pure functions from
//! incoming events to the events to send instead (`PII.md`, "Server-sent event streams").
//!
//! Each text of a response (a chat choice's `content`, a tool call's `arguments`, a Responses
//! output part, an Anthropic content block) goes through its own [`StreamText`] hold-back; all
//! of them share one [`Redactor`], so a value gets the same placeholder in every text. A delta
//! event is rewritten to carry the text that is final (often `""` while the hold-back fills);
//! before the event that closes a text (a chat `finish_reason`, `response.output_text.done`,
//! `content_block_stop`, `[DONE]`, …) a synthetic delta event carries what was held. Every
//! other event passes byte for byte; a rewritten event keeps its bytes except the text fields'
//! string literals, so it stays valid JSON in the provider's field order.
//!
//! Fail-closed: event data that is not JSON of the expected shape (other than `[DONE]` and
//! empty data), an `event:` name that contradicts the data's `type`, or more than
//! [`MAX_OPEN_TEXTS`] texts open at once is [`RedactError::Json`]; the caller ends the stream
//! with an error event, as for [`RedactError::Blocked`].

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::redact::{Policy, RedactError, Redactor};
use super::stream::StreamText;
use super::{Scanner, Scratch};

/// The most texts a response may have open (received and not closed) at once; one more is
/// [`RedactError::Json`]. Each holds at most its hold-back plus left context (≈ 9 KiB with an
/// open PEM block, under 1 KiB in ordinary text).
pub const MAX_OPEN_TEXTS: usize = 64;

/// Which provider stream shape the events have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    /// `/v1/chat/completions`: `choices[].delta.content`, `choices[].delta.tool_calls[]
    /// .function.arguments`, then `[DONE]`.
    OpenAiChat,
    /// `/v1/completions`: `choices[].text`, then `[DONE]`.
    OpenAiCompletions,
    /// `/v1/responses`: named `response.*` events.
    Responses,
    /// Anthropic `/v1/messages`: named `content_block_*` / `message_*` events.
    Anthropic,
}

/// One event to send: its `event:` name and its `data:` payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutEvent {
    pub event: Option<String>,
    pub data: String,
}

impl OutEvent {
    fn new(event: Option<&str>, data: String) -> Self {
        Self {
            event: event.map(str::to_owned),
            data,
        }
    }
}

/// Which text of a response an index pair names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    /// Chat `delta.content`, completions `text`, Anthropic `text_delta`.
    Content,
    /// Chat tool call `index`'s `function.arguments`.
    Tool(u64),
    /// Responses `output_text` of `content_index`.
    Text(u64),
    /// Responses function call `arguments`, Anthropic `input_json_delta`.
    Json,
    /// Anthropic `thinking_delta`.
    Thinking,
    /// Chat `delta.refusal` (0), Responses `refusal` of `content_index`.
    Refusal(u64),
}

/// A text: the choice / output / content block index and the part of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Key {
    index: u64,
    part: Part,
}

#[derive(Debug)]
struct Open {
    key: Key,
    text: StreamText,
    /// Responses: the `item_id` (JSON) for synthetic deltas.
    item_id: Option<String>,
}

/// A text closed: what was still held, redacted.
struct Flushed {
    key: Key,
    item_id: Option<String>,
    text: String,
}

/// Redacts one response's event stream; see the module docs.
#[derive(Debug)]
pub struct SseRedactor<'a> {
    kind: StreamKind,
    redactor: Redactor<'a>,
    open: Vec<Open>,
    /// OpenAI: `"id":…,"object":…,"created":…,"model":…,"system_fingerprint":…,` of the first
    /// chunk, for synthetic chunks at `[DONE]` or the end.
    head: Option<String>,
}

fn json_err(e: impl std::fmt::Display) -> RedactError {
    RedactError::Json(e.to_string())
}

/// The value of a JSON string literal (borrowed when it has no escapes); not a string is an error.
fn string_of(raw: &RawValue) -> Result<Cow<'_, str>, RedactError> {
    let s = raw.get();
    if s.len() >= 2 && s.starts_with('"') && !s.contains('\\') {
        return Ok(Cow::Borrowed(&s[1..s.len() - 1]));
    }
    serde_json::from_str::<String>(s)
        .map(Cow::Owned)
        .map_err(json_err)
}

fn quote(text: &str) -> String {
    // A `String` always serialises.
    serde_json::to_string(text).unwrap_or_default()
}

/// Byte-range replacements of string literals inside one event's data.
struct Edits<'d> {
    data: &'d str,
    edits: Vec<(usize, usize, String)>,
}

impl<'d> Edits<'d> {
    fn new(data: &'d str) -> Self {
        Self {
            data,
            edits: Vec::new(),
        }
    }

    /// Replaces the literal `raw` (borrowed from `data`), whose value is `old`, by `new`.
    fn replace(&mut self, raw: &RawValue, old: &str, new: &str) -> Result<(), RedactError> {
        if old == new {
            return Ok(());
        }
        let lit = raw.get();
        let start = (lit.as_ptr() as usize).wrapping_sub(self.data.as_ptr() as usize);
        let end = start.saturating_add(lit.len());
        if self.data.get(start..end) != Some(lit) {
            return Err(RedactError::Json(
                "text field outside the event data".into(),
            ));
        }
        self.edits.push((start, end, quote(new)));
        Ok(())
    }

    fn into_event(mut self, event: Option<&str>) -> OutEvent {
        if self.edits.is_empty() {
            return OutEvent::new(event, self.data.to_owned());
        }
        self.edits.sort_unstable_by_key(|e| e.0);
        let mut out = String::with_capacity(self.data.len() + 64);
        let mut at = 0;
        for (start, end, lit) in &self.edits {
            out.push_str(&self.data[at..*start]);
            out.push_str(lit);
            at = *end;
        }
        out.push_str(&self.data[at..]);
        OutEvent::new(event, out)
    }
}

// ---- the providers' shapes (only the fields looked at; the rest is skipped) ----

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    object: Option<&'a RawValue>,
    #[serde(borrow)]
    created: Option<&'a RawValue>,
    #[serde(borrow)]
    model: Option<&'a RawValue>,
    #[serde(borrow)]
    system_fingerprint: Option<&'a RawValue>,
    #[serde(borrow)]
    choices: Option<Vec<Choice<'a>>>,
}

impl Chunk<'_> {
    fn head(&self) -> String {
        let mut head = String::new();
        for (name, value) in [
            ("id", self.id),
            ("object", self.object),
            ("created", self.created),
            ("model", self.model),
            ("system_fingerprint", self.system_fingerprint),
        ] {
            if let Some(v) = value {
                head.push('"');
                head.push_str(name);
                head.push_str("\":");
                head.push_str(v.get());
                head.push(',');
            }
        }
        head
    }
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: u64,
    #[serde(borrow)]
    delta: Option<Delta<'a>>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    finish_reason: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct Delta<'a> {
    #[serde(borrow)]
    content: Option<&'a RawValue>,
    #[serde(borrow)]
    refusal: Option<&'a RawValue>,
    #[serde(borrow)]
    tool_calls: Option<Vec<ToolCall<'a>>>,
}

#[derive(Deserialize)]
struct ToolCall<'a> {
    index: Option<u64>,
    #[serde(borrow)]
    function: Option<Function<'a>>,
}

#[derive(Deserialize)]
struct Function<'a> {
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
}

/// A Responses or Anthropic event; fields stay raw until the event type needs them (an event
/// this module does not rewrite is never refused for a field's shape).
#[derive(Deserialize)]
struct Named<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow)]
    index: Option<&'a RawValue>,
    #[serde(borrow)]
    output_index: Option<&'a RawValue>,
    #[serde(borrow)]
    content_index: Option<&'a RawValue>,
    #[serde(borrow)]
    item_id: Option<&'a RawValue>,
    #[serde(borrow)]
    sequence_number: Option<&'a RawValue>,
    #[serde(borrow)]
    delta: Option<&'a RawValue>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
    #[serde(borrow)]
    refusal: Option<&'a RawValue>,
    #[serde(borrow)]
    part: Option<&'a RawValue>,
    #[serde(borrow)]
    item: Option<&'a RawValue>,
    #[serde(borrow)]
    response: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct AnthropicDelta<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<Cow<'a, str>>,
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    partial_json: Option<&'a RawValue>,
    #[serde(borrow)]
    thinking: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RPart<'a> {
    #[serde(borrow)]
    text: Option<&'a RawValue>,
    #[serde(borrow)]
    refusal: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RItem<'a> {
    #[serde(borrow)]
    content: Option<Vec<RPart<'a>>>,
    #[serde(borrow)]
    arguments: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RResponse<'a> {
    #[serde(borrow)]
    output: Option<Vec<RItem<'a>>>,
}

fn parse<'a, T: Deserialize<'a>>(raw: &'a str) -> Result<T, RedactError> {
    serde_json::from_str(raw).map_err(json_err)
}

/// A required index field of a `ty` event.
fn index_of(raw: Option<&RawValue>, ty: &str, name: &str) -> Result<u64, RedactError> {
    raw.and_then(|r| r.get().parse().ok())
        .ok_or_else(|| RedactError::Json(format!("`{ty}` without a valid {name}")))
}

impl<'a> SseRedactor<'a> {
    /// A response's redactor with the built-in patterns and `policy`.
    pub fn new(scanner: &'a Scanner, policy: Policy, kind: StreamKind) -> Self {
        Self::with_redactor(Redactor::new(scanner, None, policy), kind)
    }

    /// Over an existing redactor (tenant patterns; placeholder numbering continues).
    pub fn with_redactor(redactor: Redactor<'a>, kind: StreamKind) -> Self {
        Self {
            kind,
            redactor,
            open: Vec::new(),
            head: None,
        }
    }

    /// The shared redactor (e.g. [`Redactor::redacted`]; a `.done`/`completed` copy of a text
    /// is redacted again and counted again).
    pub fn redactor(&self) -> &Redactor<'a> {
        &self.redactor
    }

    /// Texts received and not yet closed.
    pub fn open_texts(&self) -> usize {
        self.open.len()
    }

    /// Bytes received and not yet sent, over all open texts.
    pub fn held_back(&self) -> usize {
        self.open.iter().map(|o| o.text.held_back()).sum()
    }

    /// One complete incoming event: its `event:` name (if any) and its `data:` payload. Returns
    /// what to send instead, in order: synthetic deltas flushing texts this event closes, then
    /// the event itself (unchanged, or with its text fields rewritten). After an error the
    /// stream is to be ended (an error event); the redactor is not used again.
    pub fn on_event(
        &mut self,
        scratch: &mut Scratch,
        event: Option<&str>,
        data: &str,
    ) -> Result<Vec<OutEvent>, RedactError> {
        if data.trim().is_empty() {
            return Ok(vec![OutEvent::new(event, data.to_owned())]);
        }
        match self.kind {
            StreamKind::OpenAiChat | StreamKind::OpenAiCompletions => {
                self.openai(scratch, event, data)
            }
            StreamKind::Responses | StreamKind::Anthropic => self.named(scratch, event, data),
        }
    }

    /// The stream ended without the events that close its texts: synthetic deltas carrying
    /// everything still held.
    pub fn finish(&mut self, scratch: &mut Scratch) -> Result<Vec<OutEvent>, RedactError> {
        let flushed = self.close_where(scratch, |_| true)?;
        let head = self.head.clone().unwrap_or_default();
        Ok(self.synthetic(&head, None, flushed))
    }

    // ---- texts ----

    fn push(
        &mut self,
        scratch: &mut Scratch,
        key: Key,
        piece: &str,
        item_id: Option<&RawValue>,
    ) -> Result<String, RedactError> {
        let at = match self.open.iter().position(|o| o.key == key) {
            Some(at) => at,
            None => {
                if self.open.len() >= MAX_OPEN_TEXTS {
                    return Err(RedactError::Json(format!(
                        "stream opens more than {MAX_OPEN_TEXTS} texts at once"
                    )));
                }
                self.open.push(Open {
                    key,
                    text: StreamText::default(),
                    item_id: item_id.map(|r| r.get().to_owned()),
                });
                self.open.len() - 1
            }
        };
        self.open[at].text.push(&mut self.redactor, scratch, piece)
    }

    /// Closes the texts whose key matches, in the order they opened; returns what they held.
    fn close_where(
        &mut self,
        scratch: &mut Scratch,
        matches: impl Fn(Key) -> bool,
    ) -> Result<Vec<Flushed>, RedactError> {
        let mut flushed = Vec::new();
        let mut i = 0;
        while i < self.open.len() {
            if !matches(self.open[i].key) {
                i += 1;
                continue;
            }
            let mut open = self.open.remove(i);
            let text = open.text.finish(&mut self.redactor, scratch)?;
            flushed.push(Flushed {
                key: open.key,
                item_id: open.item_id,
                text,
            });
        }
        Ok(flushed)
    }

    /// Synthetic delta events carrying `flushed` (empty texts left out). `head`: the OpenAI
    /// chunk fields to copy; `seq`: the Responses `sequence_number` to copy.
    fn synthetic(
        &self,
        head: &str,
        seq: Option<&RawValue>,
        flushed: Vec<Flushed>,
    ) -> Vec<OutEvent> {
        let flushed: Vec<Flushed> = flushed.into_iter().filter(|f| !f.text.is_empty()).collect();
        let mut out = Vec::new();
        match self.kind {
            StreamKind::OpenAiChat | StreamKind::OpenAiCompletions => {
                let mut choices: Vec<u64> = Vec::new();
                for f in &flushed {
                    if !choices.contains(&f.key.index) {
                        choices.push(f.key.index);
                    }
                }
                for i in choices {
                    let texts = flushed.iter().filter(|f| f.key.index == i);
                    out.push(OutEvent::new(None, self.openai_chunk(head, i, texts)));
                }
            }
            StreamKind::Responses => {
                for f in flushed {
                    let (event, index) = match f.key.part {
                        Part::Text(c) => (
                            "response.output_text.delta",
                            format!(",\"content_index\":{c}"),
                        ),
                        Part::Refusal(c) => {
                            ("response.refusal.delta", format!(",\"content_index\":{c}"))
                        }
                        _ => ("response.function_call_arguments.delta", String::new()),
                    };
                    let mut data = format!("{{\"type\":\"{event}\"");
                    if let Some(id) = &f.item_id {
                        data.push_str(",\"item_id\":");
                        data.push_str(id);
                    }
                    data.push_str(&format!(",\"output_index\":{}{index}", f.key.index));
                    data.push_str(",\"delta\":");
                    data.push_str(&quote(&f.text));
                    if let Some(seq) = seq {
                        data.push_str(",\"sequence_number\":");
                        data.push_str(seq.get());
                    }
                    data.push('}');
                    out.push(OutEvent::new(Some(event), data));
                }
            }
            StreamKind::Anthropic => {
                for f in flushed {
                    let (ty, field) = match f.key.part {
                        Part::Json => ("input_json_delta", "partial_json"),
                        Part::Thinking => ("thinking_delta", "thinking"),
                        _ => ("text_delta", "text"),
                    };
                    let data = format!(
                        "{{\"type\":\"content_block_delta\",\"index\":{},\"delta\":{{\"type\":\"{ty}\",\"{field}\":{}}}}}",
                        f.key.index,
                        quote(&f.text)
                    );
                    out.push(OutEvent::new(Some("content_block_delta"), data));
                }
            }
        }
        out
    }

    fn openai_chunk<'f>(
        &self,
        head: &str,
        index: u64,
        texts: impl Iterator<Item = &'f Flushed>,
    ) -> String {
        let mut content = None;
        let mut refusal = None;
        let mut tools = Vec::new();
        for f in texts {
            match f.key.part {
                Part::Refusal(_) => refusal = Some(quote(&f.text)),
                Part::Tool(j) => tools.push(format!(
                    "{{\"index\":{j},\"function\":{{\"arguments\":{}}}}}",
                    quote(&f.text)
                )),
                _ => content = Some(quote(&f.text)),
            }
        }
        let mut s = format!("{{{head}\"choices\":[{{\"index\":{index},");
        if self.kind == StreamKind::OpenAiCompletions {
            s.push_str(&format!(
                "\"text\":{},\"logprobs\":null",
                content.unwrap_or_else(|| "\"\"".into())
            ));
        } else {
            let mut fields = Vec::new();
            if let Some(c) = content {
                fields.push(format!("\"content\":{c}"));
            }
            if let Some(r) = refusal {
                fields.push(format!("\"refusal\":{r}"));
            }
            if !tools.is_empty() {
                fields.push(format!("\"tool_calls\":[{}]", tools.join(",")));
            }
            s.push_str(&format!("\"delta\":{{{}}}", fields.join(",")));
        }
        s.push_str(",\"finish_reason\":null}]}");
        s
    }

    // ---- OpenAI chat and completions ----

    fn openai(
        &mut self,
        scratch: &mut Scratch,
        event: Option<&str>,
        data: &str,
    ) -> Result<Vec<OutEvent>, RedactError> {
        if data.trim() == "[DONE]" {
            let mut out = self.finish(scratch)?;
            out.push(OutEvent::new(event, data.to_owned()));
            return Ok(out);
        }
        let chunk: Chunk = parse(data)?;
        let head = chunk.head();
        if self.head.is_none() && !head.is_empty() {
            self.head = Some(head.clone());
        }
        let mut out = Vec::new();
        let mut edits = Edits::new(data);
        for choice in chunk.choices.iter().flatten() {
            let i = choice.index;
            let finishing = choice.finish_reason.is_some();
            let mut fields = Vec::new();
            if self.kind == StreamKind::OpenAiCompletions {
                fields.extend(choice.text.map(|t| (Part::Content, t)));
            } else if let Some(d) = &choice.delta {
                fields.extend(d.content.map(|c| (Part::Content, c)));
                fields.extend(d.refusal.map(|r| (Part::Refusal(0), r)));
                // A tool call without `index` (some OpenAI-compatible servers) is keyed by its
                // position in the array.
                for (n, tc) in d.tool_calls.iter().flatten().enumerate() {
                    if let Some(args) = tc.function.as_ref().and_then(|f| f.arguments) {
                        fields.push((Part::Tool(tc.index.unwrap_or(n as u64)), args));
                    }
                }
            }
            for (part, raw) in fields {
                let key = Key { index: i, part };
                let piece = string_of(raw)?;
                let mut text = self.push(scratch, key, &piece, None)?;
                if finishing {
                    for f in self.close_where(scratch, |k| k == key)? {
                        text.push_str(&f.text);
                    }
                }
                edits.replace(raw, &piece, &text)?;
            }
            if finishing {
                let flushed = self.close_where(scratch, |k| k.index == i)?;
                out.extend(self.synthetic(&head, None, flushed));
            }
        }
        out.push(edits.into_event(event));
        Ok(out)
    }

    // ---- Responses and Anthropic ----

    fn named(
        &mut self,
        scratch: &mut Scratch,
        event: Option<&str>,
        data: &str,
    ) -> Result<Vec<OutEvent>, RedactError> {
        let ev: Named = parse(data)?;
        let ty = match (event, ev.ty.as_deref()) {
            (Some(name), Some(ty)) if name != ty => {
                return Err(RedactError::Json(format!(
                    "event `{name}` carries data of type `{ty}`"
                )))
            }
            (_, Some(ty)) => ty,
            (Some(name), None) => name,
            (None, None) => return Ok(vec![OutEvent::new(event, data.to_owned())]),
        };
        let mut edits = Edits::new(data);
        let mut out = Vec::new();
        if self.kind == StreamKind::Anthropic {
            match ty {
                "content_block_delta" => {
                    let index = index_of(ev.index, ty, "index")?;
                    let delta: AnthropicDelta = parse(
                        ev.delta
                            .ok_or_else(|| json_err("delta without delta"))?
                            .get(),
                    )?;
                    let field = match delta.ty.as_deref() {
                        Some("text_delta") => delta.text.map(|t| (Part::Content, t)),
                        Some("input_json_delta") => delta.partial_json.map(|t| (Part::Json, t)),
                        Some("thinking_delta") => delta.thinking.map(|t| (Part::Thinking, t)),
                        _ => None,
                    };
                    if let Some((part, raw)) = field {
                        let piece = string_of(raw)?;
                        let text = self.push(scratch, Key { index, part }, &piece, None)?;
                        edits.replace(raw, &piece, &text)?;
                    }
                }
                "content_block_stop" => {
                    let index = index_of(ev.index, ty, "index")?;
                    let flushed = self.close_where(scratch, |k| k.index == index)?;
                    out.extend(self.synthetic("", None, flushed));
                }
                "message_delta" | "message_stop" | "error" => {
                    let flushed = self.close_where(scratch, |_| true)?;
                    out.extend(self.synthetic("", None, flushed));
                }
                _ => {}
            }
        } else {
            let seq = ev.sequence_number;
            let indexes = || index_of(ev.output_index, ty, "output_index");
            let content_index = || index_of(ev.content_index, ty, "content_index");
            match ty {
                "response.output_text.delta"
                | "response.refusal.delta"
                | "response.function_call_arguments.delta" => {
                    let part = match ty {
                        "response.output_text.delta" => Part::Text(content_index()?),
                        "response.refusal.delta" => Part::Refusal(content_index()?),
                        _ => Part::Json,
                    };
                    let key = Key {
                        index: indexes()?,
                        part,
                    };
                    let raw = ev.delta.ok_or_else(|| json_err("delta without delta"))?;
                    let piece = string_of(raw)?;
                    let text = self.push(scratch, key, &piece, ev.item_id)?;
                    edits.replace(raw, &piece, &text)?;
                }
                "response.output_text.done"
                | "response.refusal.done"
                | "response.content_part.done"
                | "response.function_call_arguments.done" => {
                    let o = indexes()?;
                    let parts = match ty {
                        "response.function_call_arguments.done" => [Part::Json; 2],
                        "response.output_text.done" => [Part::Text(content_index()?); 2],
                        "response.refusal.done" => [Part::Refusal(content_index()?); 2],
                        _ => [
                            Part::Text(content_index()?),
                            Part::Refusal(content_index()?),
                        ],
                    };
                    let flushed =
                        self.close_where(scratch, |k| k.index == o && parts.contains(&k.part))?;
                    out.extend(self.synthetic("", seq, flushed));
                    let mut whole = Vec::new();
                    match ty {
                        "response.output_text.done" => whole.extend(ev.text),
                        "response.refusal.done" => whole.extend(ev.refusal),
                        "response.function_call_arguments.done" => whole.extend(ev.arguments),
                        _ => {
                            if let Some(part) = ev.part {
                                let part: RPart = parse(part.get())?;
                                whole.extend(part.text);
                                whole.extend(part.refusal);
                            }
                        }
                    }
                    self.redact_whole(scratch, &mut edits, &whole)?;
                }
                "response.output_item.done" => {
                    let o = indexes()?;
                    let flushed = self.close_where(scratch, |k| k.index == o)?;
                    out.extend(self.synthetic("", seq, flushed));
                    if let Some(item) = ev.item {
                        let item: RItem = parse(item.get())?;
                        let whole = item_texts(&item);
                        self.redact_whole(scratch, &mut edits, &whole)?;
                    }
                }
                "response.completed" | "response.incomplete" | "response.failed" | "error" => {
                    let flushed = self.close_where(scratch, |_| true)?;
                    out.extend(self.synthetic("", seq, flushed));
                    if let Some(resp) = ev.response {
                        let resp: RResponse = parse(resp.get())?;
                        let whole: Vec<&RawValue> =
                            resp.output.iter().flatten().flat_map(item_texts).collect();
                        self.redact_whole(scratch, &mut edits, &whole)?;
                    }
                }
                _ => {}
            }
        }
        out.push(edits.into_event(event));
        Ok(out)
    }

    /// Whole copies of texts (`.done`, `completed`) redacted with the shared redactor: the same
    /// values have the same placeholders, so a copy equals the concatenation of its deltas.
    fn redact_whole(
        &mut self,
        scratch: &mut Scratch,
        edits: &mut Edits<'_>,
        raws: &[&RawValue],
    ) -> Result<(), RedactError> {
        for raw in raws {
            let text = string_of(raw)?;
            let redacted = self.redactor.redact(scratch, &text)?;
            edits.replace(raw, &text, &redacted)?;
        }
        Ok(())
    }
}

fn item_texts<'a>(item: &RItem<'a>) -> Vec<&'a RawValue> {
    let mut v: Vec<&'a RawValue> = item
        .content
        .iter()
        .flatten()
        .flat_map(|p| p.text.into_iter().chain(p.refusal))
        .collect();
    v.extend(item.arguments);
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use serde_json::Value;

    use super::*;
    use crate::pii::tests::{arb_text, scanner};
    use crate::pii::{Action, Entity, Rule};

    type Ev = (Option<String>, String);

    fn q(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    const CHAT_HEAD: &str = r#""id":"chatcmpl-AbC123","object":"chat.completion.chunk","created":1733360000,"model":"gpt-4o-2024-08-06","system_fingerprint":"fp_7f6be3efb0""#;

    fn chat(choice: &str) -> Ev {
        (None, format!(r#"{{{CHAT_HEAD},"choices":[{choice}]}}"#))
    }

    fn chat_content(i: u64, content: &str) -> Ev {
        chat(&format!(
            r#"{{"index":{i},"delta":{{"content":{}}},"logprobs":null,"finish_reason":null}}"#,
            q(content)
        ))
    }

    fn chat_tool(i: u64, j: u64, args: &str) -> Ev {
        chat(&format!(
            r#"{{"index":{i},"delta":{{"tool_calls":[{{"index":{j},"function":{{"arguments":{}}}}}]}},"logprobs":null,"finish_reason":null}}"#,
            q(args)
        ))
    }

    fn chat_finish(i: u64, reason: &str) -> Ev {
        chat(&format!(
            r#"{{"index":{i},"delta":{{}},"logprobs":null,"finish_reason":"{reason}"}}"#
        ))
    }

    fn chat_usage() -> Ev {
        (
            None,
            format!(
                r#"{{{CHAT_HEAD},"choices":[],"usage":{{"prompt_tokens":19,"completion_tokens":40,"total_tokens":59}}}}"#
            ),
        )
    }

    fn done() -> Ev {
        (None, "[DONE]".into())
    }

    fn named(event: &str, data: String) -> Ev {
        (Some(event.into()), data)
    }

    fn completion(text: &str, finish: &str) -> Ev {
        (
            None,
            format!(
                r#"{{"id":"cmpl-9xYz","object":"text_completion","created":1733360000,"choices":[{{"text":{},"index":0,"logprobs":null,"finish_reason":{finish}}}],"model":"gpt-3.5-turbo-instruct"}}"#,
                q(text)
            ),
        )
    }

    const RESP: &str = r#""id":"resp_67ccd2bed1ec8190","object":"response","created_at":1741290958,"model":"gpt-4.1-2025-04-14""#;

    fn resp_item(text: &str, status: &str) -> String {
        format!(
            r#"{{"id":"msg_67ccd2bf17f0","type":"message","status":"{status}","role":"assistant","content":[{{"type":"output_text","text":{},"annotations":[]}}]}}"#,
            q(text)
        )
    }

    /// A Responses stream of one output text in `pieces`; `close`: with its closing events.
    fn responses(pieces: &[&str], close: bool) -> Vec<Ev> {
        let whole = pieces.concat();
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        let mut v = vec![
            named(
                "response.created",
                format!(
                    r#"{{"type":"response.created","sequence_number":0,"response":{{{RESP},"status":"in_progress","output":[],"usage":null}}}}"#
                ),
            ),
            named(
                "response.output_item.added",
                format!(
                    r#"{{"type":"response.output_item.added","sequence_number":{},"output_index":0,"item":{{"id":"msg_67ccd2bf17f0","type":"message","status":"in_progress","role":"assistant","content":[]}}}}"#,
                    next()
                ),
            ),
            named(
                "response.content_part.added",
                format!(
                    r#"{{"type":"response.content_part.added","sequence_number":{},"item_id":"msg_67ccd2bf17f0","output_index":0,"content_index":0,"part":{{"type":"output_text","text":"","annotations":[]}}}}"#,
                    next()
                ),
            ),
        ];
        for p in pieces {
            v.push(named("response.output_text.delta", format!(r#"{{"type":"response.output_text.delta","sequence_number":{},"item_id":"msg_67ccd2bf17f0","output_index":0,"content_index":0,"delta":{},"logprobs":[]}}"#, next(), q(p))));
        }
        if close {
            v.push(named("response.output_text.done", format!(r#"{{"type":"response.output_text.done","sequence_number":{},"item_id":"msg_67ccd2bf17f0","output_index":0,"content_index":0,"text":{},"logprobs":[]}}"#, next(), q(&whole))));
            v.push(named("response.content_part.done", format!(r#"{{"type":"response.content_part.done","sequence_number":{},"item_id":"msg_67ccd2bf17f0","output_index":0,"content_index":0,"part":{{"type":"output_text","text":{},"annotations":[]}}}}"#, next(), q(&whole))));
            v.push(named("response.output_item.done", format!(r#"{{"type":"response.output_item.done","sequence_number":{},"output_index":0,"item":{}}}"#, next(), resp_item(&whole, "completed"))));
            v.push(named("response.completed", format!(r#"{{"type":"response.completed","sequence_number":{},"response":{{{RESP},"status":"completed","output":[{}],"usage":{{"input_tokens":37,"output_tokens":11,"total_tokens":48}}}}}}"#, next(), resp_item(&whole, "completed"))));
        }
        v
    }

    fn anthropic_start() -> Vec<Ev> {
        vec![
            named("message_start", r#"{"type":"message_start","message":{"id":"msg_01XFDUDYJgAACzvnptvVoYEL","type":"message","role":"assistant","content":[],"model":"claude-sonnet-4-20250514","stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":25,"output_tokens":1}}}"#.into()),
            named("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#.into()),
            named("ping", r#"{"type": "ping"}"#.into()),
        ]
    }

    fn anthropic_text(i: u64, text: &str) -> Ev {
        named(
            "content_block_delta",
            format!(
                r#"{{"type":"content_block_delta","index":{i},"delta":{{"type":"text_delta","text":{}}}}}"#,
                q(text)
            ),
        )
    }

    fn anthropic_json(i: u64, json: &str) -> Ev {
        named(
            "content_block_delta",
            format!(
                r#"{{"type":"content_block_delta","index":{i},"delta":{{"type":"input_json_delta","partial_json":{}}}}}"#,
                q(json)
            ),
        )
    }

    fn anthropic_stop(i: u64) -> Ev {
        named(
            "content_block_stop",
            format!(r#"{{"type":"content_block_stop","index":{i}}}"#),
        )
    }

    fn anthropic_end() -> Vec<Ev> {
        vec![
            named("message_delta", r#"{"type":"message_delta","delta":{"stop_reason":"end_turn","stop_sequence":null},"usage":{"output_tokens":15}}"#.into()),
            named("message_stop", r#"{"type":"message_stop"}"#.into()),
        ]
    }

    /// Runs `events` (then `finish()`), checking every output is valid JSON (but `[DONE]`) and
    /// that every event that is not a text delta passed byte for byte.
    fn run(kind: StreamKind, policy: Policy, events: &[Ev]) -> Result<Vec<OutEvent>, RedactError> {
        let mut scratch = scanner().scratch().unwrap();
        let mut s = SseRedactor::new(scanner(), policy, kind);
        let mut out = Vec::new();
        for (event, data) in events {
            let got = s.on_event(&mut scratch, event.as_deref(), data)?;
            let last = got.last().unwrap();
            assert_eq!(&last.event, event);
            if !is_delta(kind, last) {
                assert_eq!(&last.data, data, "a non-text event changed");
            }
            assert!(s.open_texts() <= MAX_OPEN_TEXTS);
            let bound = crate::pii::stream::hold_back_bound(&s.redactor);
            assert!(s.open.iter().all(|o| o.text.held_back() <= bound));
            out.extend(got);
        }
        out.extend(s.finish(&mut scratch)?);
        assert_eq!(s.open_texts(), 0);
        for e in &out {
            if e.data != "[DONE]" {
                serde_json::from_str::<Value>(&e.data).expect("valid JSON");
            }
        }
        Ok(out)
    }

    fn is_delta(kind: StreamKind, e: &OutEvent) -> bool {
        match kind {
            StreamKind::OpenAiChat | StreamKind::OpenAiCompletions => {
                e.data.contains("\"choices\":[{")
            }
            StreamKind::Responses => e.event.as_deref().is_some_and(|n| {
                n.ends_with(".delta") || n.ends_with(".done") || n == "response.completed"
            }),
            StreamKind::Anthropic => e.event.as_deref() == Some("content_block_delta"),
        }
    }

    /// The texts the client sees: the concatenation of the text deltas, per text.
    fn texts(kind: StreamKind, out: &[OutEvent]) -> BTreeMap<String, String> {
        let mut t: BTreeMap<String, String> = BTreeMap::new();
        let mut add = |k: String, v: &Value| {
            if let Some(s) = v.as_str() {
                t.entry(k).or_default().push_str(s);
            }
        };
        for e in out.iter().filter(|e| e.data != "[DONE]") {
            let v: Value = serde_json::from_str(&e.data).unwrap();
            match kind {
                StreamKind::OpenAiChat | StreamKind::OpenAiCompletions => {
                    for c in v["choices"].as_array().unwrap() {
                        let i = &c["index"];
                        add(format!("c{i}"), &c["delta"]["content"]);
                        add(format!("c{i}"), &c["text"]);
                        add(format!("c{i}r"), &c["delta"]["refusal"]);
                        for tc in c["delta"]["tool_calls"].as_array().into_iter().flatten() {
                            add(
                                format!("c{i}t{}", tc["index"]),
                                &tc["function"]["arguments"],
                            );
                        }
                    }
                }
                StreamKind::Responses => match v["type"].as_str().unwrap() {
                    "response.output_text.delta" => add(
                        format!("o{}c{}", v["output_index"], v["content_index"]),
                        &v["delta"],
                    ),
                    "response.refusal.delta" => add(
                        format!("o{}r{}", v["output_index"], v["content_index"]),
                        &v["delta"],
                    ),
                    "response.function_call_arguments.delta" => {
                        add(format!("o{}a", v["output_index"]), &v["delta"])
                    }
                    _ => {}
                },
                StreamKind::Anthropic => {
                    if v["type"] == "content_block_delta" {
                        let d = &v["delta"];
                        add(format!("b{}", v["index"]), &d["text"]);
                        add(format!("b{}", v["index"]), &d["partial_json"]);
                    }
                }
            }
        }
        t
    }

    /// `s` in pieces of `n` bytes (on character boundaries).
    fn split(s: &str, n: usize) -> Vec<&str> {
        let mut v = Vec::new();
        let mut at = 0;
        while at < s.len() {
            let mut end = (at + n).min(s.len());
            while !s.is_char_boundary(end) {
                end += 1;
            }
            v.push(&s[at..end]);
            at = end;
        }
        v
    }

    const TEXT0: &str = "Sure. Write to john.doe@example.com or call +44 20 7946 0958; the card on file is 4111 1111 1111 1111.";
    const TEXT1: &str =
        "Contact john.doe@example.com (or jane@corp.example.org) from 192.168.1.20.";

    #[test]
    fn chat_choices_and_tool_calls_share_placeholders() {
        let mut events = vec![chat(
            r#"{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}"#,
        )];
        let (a, b) = (split(TEXT0, 3), split(TEXT1, 5));
        for k in 0..a.len().max(b.len()) {
            if let Some(p) = a.get(k) {
                events.push(chat_content(0, p));
            }
            if let Some(p) = b.get(k) {
                events.push(chat_content(1, p));
            }
        }
        for p in split("I can't email jane@corp.example.org.", 6) {
            events.push(chat(&format!(
                r#"{{"index":2,"delta":{{"refusal":{}}},"logprobs":null,"finish_reason":null}}"#,
                q(p)
            )));
        }
        let args = r#"{"to":"john.doe@example.com","cc":"jane@corp.example.org"}"#;
        for p in split(args, 4) {
            events.push(chat_tool(1, 0, p));
        }
        events.extend([
            chat_finish(0, "stop"),
            chat_finish(1, "tool_calls"),
            chat_usage(),
            done(),
        ]);
        let out = run(StreamKind::OpenAiChat, Policy::default(), &events).unwrap();
        let t = texts(StreamKind::OpenAiChat, &out);
        assert_eq!(
            t["c0"],
            "Sure. Write to [EMAIL_1] or call [PHONE_1]; the card on file is [CARD_1]."
        );
        assert_eq!(t["c1"], "Contact [EMAIL_1] (or [EMAIL_2]) from [IP_1].");
        assert_eq!(t["c1t0"], r#"{"to":"[EMAIL_1]","cc":"[EMAIL_2]"}"#);
        assert_eq!(t["c2r"], "I can't email [EMAIL_2].");
        // Held text goes out before each finishing chunk, in a chunk of the same shape.
        let finish0 = out
            .iter()
            .position(|e| e.data == chat_finish(0, "stop").1)
            .unwrap();
        let synthetic: Value = serde_json::from_str(&out[finish0 - 1].data).unwrap();
        assert_eq!(synthetic["id"], "chatcmpl-AbC123");
        assert_eq!(synthetic["system_fingerprint"], "fp_7f6be3efb0");
        assert_eq!(synthetic["choices"][0]["index"], 0);
        assert!(synthetic["choices"][0]["finish_reason"].is_null());
        assert!(!synthetic["choices"][0]["delta"]["content"]
            .as_str()
            .unwrap()
            .is_empty());
        assert!(out.iter().any(|e| e.data == chat_usage().1));
        // `[DONE]` flushed the refusal of choice 2, which had no finishing chunk.
        assert!(out[out.len() - 2]
            .data
            .contains(r#""delta":{"refusal":"I can't email [EMAIL_2]."}"#));
        assert_eq!(out.last().unwrap().data, "[DONE]");
        // Non-text fields unchanged; only the text literals moved.
        for e in &out[..out.len() - 1] {
            assert!(e.data.starts_with(&format!("{{{CHAT_HEAD},")), "{}", e.data);
        }
        assert!(out.iter().all(|e| !e.data.contains("example.com")));
    }

    #[test]
    fn chat_done_flushes_everything_held_and_unfinished_streams_flush_on_finish() {
        let pieces = split(TEXT0, 7);
        let mut events: Vec<Ev> = pieces.iter().map(|p| chat_content(0, p)).collect();
        events.push(done());
        let out = run(StreamKind::OpenAiChat, Policy::default(), &events).unwrap();
        assert_eq!(
            texts(StreamKind::OpenAiChat, &out)["c0"],
            redact_fresh(TEXT0)
        );
        assert_eq!(out.last().unwrap().data, "[DONE]");
        // Cut off: finish() flushes.
        events.pop();
        let out = run(StreamKind::OpenAiChat, Policy::default(), &events).unwrap();
        assert_eq!(
            texts(StreamKind::OpenAiChat, &out)["c0"],
            redact_fresh(TEXT0)
        );
    }

    #[test]
    fn completions_text_is_redacted() {
        let mut events: Vec<Ev> = split(TEXT1, 2)
            .iter()
            .map(|p| completion(p, "null"))
            .collect();
        events.extend([completion("", "\"length\""), done()]);
        let out = run(StreamKind::OpenAiCompletions, Policy::default(), &events).unwrap();
        assert_eq!(
            texts(StreamKind::OpenAiCompletions, &out)["c0"],
            "Contact [EMAIL_1] (or [EMAIL_2]) from [IP_1]."
        );
    }

    #[test]
    fn anthropic_text_and_tool_input_blocks() {
        let mut events = anthropic_start();
        for p in split(TEXT0, 3) {
            events.push(anthropic_text(0, p));
        }
        events.push(anthropic_stop(0));
        events.push(named("content_block_start", r#"{"type":"content_block_start","index":1,"content_block":{"type":"tool_use","id":"toolu_01T1x1fJ34qAmk2tNTrN7Up6","name":"send_mail","input":{}}}"#.into()));
        for p in split(
            r#"{"to": "john.doe@example.com", "card": "4111111111111111"}"#,
            6,
        ) {
            events.push(anthropic_json(1, p));
        }
        events.push(anthropic_stop(1));
        events.extend(anthropic_end());
        let out = run(StreamKind::Anthropic, Policy::default(), &events).unwrap();
        let t = texts(StreamKind::Anthropic, &out);
        assert_eq!(
            t["b0"],
            "Sure. Write to [EMAIL_1] or call [PHONE_1]; the card on file is [CARD_1]."
        );
        assert_eq!(t["b1"], r#"{"to": "[EMAIL_1]", "card": "[CARD_2]"}"#);
        // The held text of block 0 goes out right before its stop.
        let stop0 = out
            .iter()
            .position(|e| e.data == anthropic_stop(0).1)
            .unwrap();
        assert_eq!(out[stop0 - 1].event.as_deref(), Some("content_block_delta"));
        assert!(out[stop0 - 1].data.contains(r#""index":0"#));
        // message_start, ping, content_block_start, message_delta, message_stop pass as they were.
        for e in anthropic_start().iter().chain(&anthropic_end()) {
            assert!(out.iter().any(|o| o.event == e.0 && o.data == e.1));
        }
    }

    #[test]
    fn responses_done_and_completed_equal_the_streamed_text() {
        let pieces = split(TEXT0, 4);
        let out = run(
            StreamKind::Responses,
            Policy::default(),
            &responses(&pieces, true),
        )
        .unwrap();
        let streamed = texts(StreamKind::Responses, &out)["o0c0"].clone();
        assert_eq!(streamed, redact_fresh(TEXT0));
        let by_type = |ty: &str| -> Value {
            let e = out.iter().find(|e| e.event.as_deref() == Some(ty)).unwrap();
            serde_json::from_str(&e.data).unwrap()
        };
        assert_eq!(by_type("response.output_text.done")["text"], streamed);
        assert_eq!(
            by_type("response.content_part.done")["part"]["text"],
            streamed
        );
        assert_eq!(
            by_type("response.output_item.done")["item"]["content"][0]["text"],
            streamed
        );
        let completed = by_type("response.completed");
        assert_eq!(
            completed["response"]["output"][0]["content"][0]["text"],
            streamed
        );
        assert_eq!(completed["response"]["usage"]["total_tokens"], 48);
        // The synthetic delta precedes `.done` and names the same item.
        let d = out
            .iter()
            .position(|e| e.event.as_deref() == Some("response.output_text.done"))
            .unwrap();
        let synthetic: Value = serde_json::from_str(&out[d - 1].data).unwrap();
        assert_eq!(synthetic["type"], "response.output_text.delta");
        assert_eq!(synthetic["item_id"], "msg_67ccd2bf17f0");
        // Cut off before `.done`: finish() flushes.
        let out = run(
            StreamKind::Responses,
            Policy::default(),
            &responses(&pieces, false),
        )
        .unwrap();
        assert_eq!(texts(StreamKind::Responses, &out)["o0c0"], streamed);
    }

    #[test]
    fn responses_function_call_arguments_and_anthropic_thinking() {
        let args = r#"{"email":"john.doe@example.com","ssn":"123-45-6789"}"#;
        let mut events = vec![named("response.output_item.added", r#"{"type":"response.output_item.added","sequence_number":1,"output_index":1,"item":{"type":"function_call","id":"fc_12345xyz","call_id":"call_12345xyz","name":"lookup","arguments":"","status":"in_progress"}}"#.into())];
        for p in split(args, 5) {
            events.push(named("response.function_call_arguments.delta", format!(r#"{{"type":"response.function_call_arguments.delta","sequence_number":2,"item_id":"fc_12345xyz","output_index":1,"delta":{}}}"#, q(p))));
        }
        events.push(named("response.function_call_arguments.done", format!(r#"{{"type":"response.function_call_arguments.done","sequence_number":9,"item_id":"fc_12345xyz","output_index":1,"arguments":{}}}"#, q(args))));
        events.push(named("response.output_item.done", format!(r#"{{"type":"response.output_item.done","sequence_number":10,"output_index":1,"item":{{"type":"function_call","id":"fc_12345xyz","call_id":"call_12345xyz","name":"lookup","arguments":{},"status":"completed"}}}}"#, q(args))));
        let refusal = "I won't write to john.doe@example.com.";
        for p in split(refusal, 5) {
            events.push(named("response.refusal.delta", format!(r#"{{"type":"response.refusal.delta","sequence_number":11,"item_id":"msg_2","output_index":2,"content_index":0,"delta":{}}}"#, q(p))));
        }
        events.push(named("response.refusal.done", format!(r#"{{"type":"response.refusal.done","sequence_number":12,"item_id":"msg_2","output_index":2,"content_index":0,"refusal":{}}}"#, q(refusal))));
        events.push(named("response.content_part.done", format!(r#"{{"type":"response.content_part.done","sequence_number":13,"item_id":"msg_2","output_index":2,"content_index":0,"part":{{"type":"refusal","refusal":{}}}}}"#, q(refusal))));
        let out = run(StreamKind::Responses, Policy::default(), &events).unwrap();
        let t = texts(StreamKind::Responses, &out);
        assert_eq!(t["o2r0"], "I won't write to [EMAIL_1].");
        let part: Value = serde_json::from_str(&out.last().unwrap().data).unwrap();
        assert_eq!(part["part"]["refusal"], t["o2r0"]);
        let want = r#"{"email":"[EMAIL_1]","ssn":"[SSN_1]"}"#;
        assert_eq!(texts(StreamKind::Responses, &out)["o1a"], want);
        let item = out
            .iter()
            .find(|e| e.event.as_deref() == Some("response.output_item.done"))
            .unwrap();
        let last: Value = serde_json::from_str(&item.data).unwrap();
        assert_eq!(last["item"]["arguments"], want);
        assert_eq!(last["item"]["call_id"], "call_12345xyz");

        let mut events = vec![named("content_block_start", r#"{"type":"content_block_start","index":0,"content_block":{"type":"thinking","thinking":""}}"#.into())];
        for p in split("The user is john.doe@example.com.", 4) {
            events.push(named("content_block_delta", format!(r#"{{"type":"content_block_delta","index":0,"delta":{{"type":"thinking_delta","thinking":{}}}}}"#, q(p))));
        }
        events.push(named("content_block_delta", r#"{"type":"content_block_delta","index":0,"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"}}"#.into()));
        events.push(anthropic_stop(0));
        let out = run(StreamKind::Anthropic, Policy::default(), &events).unwrap();
        let thinking: String = out
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(&e.data).ok())
            .filter_map(|v| v["delta"]["thinking"].as_str().map(str::to_owned))
            .collect();
        assert_eq!(thinking, "The user is [EMAIL_1].");
    }

    #[test]
    fn tool_calls_without_index_are_keyed_by_position() {
        let events = [
            chat(
                r#"{"index":0,"delta":{"role":"assistant","tool_calls":[{"id":"call_1","type":"function","function":{"name":"a","arguments":"{\"m\":\"john.doe@example.com\"}"}},{"id":"call_2","type":"function","function":{"name":"b","arguments":"{\"ip\":\"10.0.0.1\"}"}}]},"finish_reason":null}"#,
            ),
            chat_finish(0, "tool_calls"),
            done(),
        ];
        let out = run(StreamKind::OpenAiChat, Policy::default(), &events).unwrap();
        let t = texts(StreamKind::OpenAiChat, &out);
        assert_eq!(t["c0t0"], r#"{"m":"[EMAIL_1]"}"#);
        assert_eq!(t["c0t1"], r#"{"ip":"[IP_1]"}"#);
    }

    fn redact_fresh(text: &str) -> String {
        let mut scratch = scanner().scratch().unwrap();
        Redactor::new(scanner(), None, Policy::default())
            .redact(&mut scratch, text)
            .unwrap()
    }

    /// Events of `kind` streaming one text in `pieces`, closed or cut off.
    fn one_text(kind: StreamKind, pieces: &[&str], close: bool) -> Vec<Ev> {
        let mut v = Vec::new();
        match kind {
            StreamKind::OpenAiChat => {
                v.extend(pieces.iter().map(|p| chat_content(0, p)));
                if close {
                    v.extend([chat_finish(0, "stop"), chat_usage(), done()]);
                }
            }
            StreamKind::OpenAiCompletions => {
                v.extend(pieces.iter().map(|p| completion(p, "null")));
                if close {
                    v.extend([completion("", "\"stop\""), done()]);
                }
            }
            StreamKind::Responses => v = responses(pieces, close),
            StreamKind::Anthropic => {
                v = anthropic_start();
                v.extend(pieces.iter().map(|p| anthropic_text(0, p)));
                if close {
                    v.push(anthropic_stop(0));
                    v.extend(anthropic_end());
                }
            }
        }
        v
    }

    const KINDS: [StreamKind; 4] = [
        StreamKind::OpenAiChat,
        StreamKind::OpenAiCompletions,
        StreamKind::Responses,
        StreamKind::Anthropic,
    ];
    const KEY0: [&str; 4] = ["c0", "c0", "o0c0", "b0"];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn any_split_streams_the_one_shot_redaction(
            text in arb_text(),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
            kind in 0..4usize,
            close: bool,
        ) {
            let mut at: Vec<usize> = cuts.iter().map(|i| i.index(text.len() + 1)).collect();
            at.extend([0, text.len()]);
            at.sort_unstable();
            at.dedup();
            at.retain(|&i| text.is_char_boundary(i));
            let pieces: Vec<&str> = at.windows(2).map(|w| &text[w[0]..w[1]]).collect();
            let out = run(KINDS[kind], Policy::default(), &one_text(KINDS[kind], &pieces, close)).unwrap();
            let got = texts(KINDS[kind], &out).remove(KEY0[kind]).unwrap_or_default();
            prop_assert_eq!(got, redact_fresh(&text));
        }
    }

    /// Placeholder numbers dropped: `[EMAIL_2]` → `[EMAIL]`.
    fn unnumbered(s: &str) -> String {
        let mut out = String::new();
        let mut rest = s;
        while let Some(p) = rest.find('_') {
            let digits = rest[p + 1..].bytes().take_while(u8::is_ascii_digit).count();
            let tagged = rest[..p].rfind('[').is_some_and(|b| {
                rest[b + 1..p].bytes().all(|c| c.is_ascii_uppercase()) && b + 1 < p
            });
            if digits > 0 && tagged && rest[p + 1 + digits..].starts_with(']') {
                out.push_str(&rest[..p]);
                rest = &rest[p + 1 + digits..];
            } else {
                out.push_str(&rest[..=p]);
                rest = &rest[p + 1..];
            }
        }
        out.push_str(rest);
        out
    }

    #[test]
    fn unnumbered_drops_placeholder_numbers_only() {
        assert_eq!(
            unnumbered("a [EMAIL_12] b_1 [_3] [X_2]_"),
            "a [EMAIL] b_1 [_3] [X]_"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Two choices whose pieces interleave (sometimes in one chunk): each streams its own
        /// one-shot redaction (numbering shared, so compared without numbers).
        #[test]
        fn interleaved_choices_each_stream_their_redaction(
            a in arb_text(),
            b in arb_text(),
            size_a in 1..40usize,
            size_b in 1..40usize,
            together in any::<Vec<bool>>(),
        ) {
            let (pa, pb) = (split(&a, size_a), split(&b, size_b));
            let mut events = Vec::new();
            for k in 0..pa.len().max(pb.len()) {
                let ca = pa.get(k).map(|p| format!(r#"{{"index":0,"delta":{{"content":{}}},"finish_reason":null}}"#, q(p)));
                let cb = pb.get(k).map(|p| format!(r#"{{"index":1,"delta":{{"content":{}}},"finish_reason":null}}"#, q(p)));
                if together.get(k).copied().unwrap_or(false) {
                    events.push(chat(&ca.into_iter().chain(cb).collect::<Vec<_>>().join(",")));
                } else {
                    events.extend(ca.iter().chain(&cb).map(|c| chat(c)));
                }
            }
            events.extend([chat_finish(1, "stop"), chat_finish(0, "length"), done()]);
            let out = run(StreamKind::OpenAiChat, Policy::default(), &events).unwrap();
            let t = texts(StreamKind::OpenAiChat, &out);
            let get = |k: &str| unnumbered(t.get(k).map(String::as_str).unwrap_or(""));
            prop_assert_eq!(get("c0"), unnumbered(&redact_fresh(&a)));
            prop_assert_eq!(get("c1"), unnumbered(&redact_fresh(&b)));
        }
    }

    #[test]
    fn a_blocked_entity_fails_by_the_end_of_its_text() {
        let policy = Policy::default().with(Entity::Card, Action::Block);
        let text = "card 4111 1111 1111 1111 ok";
        for (k, kind) in KINDS.into_iter().enumerate() {
            for close in [true, false] {
                let err = run(kind, policy, &one_text(kind, &split(text, 3), close)).unwrap_err();
                assert!(
                    matches!(
                        err,
                        RedactError::Blocked {
                            entity: Entity::Card,
                            rule: Rule::Builtin(_)
                        }
                    ),
                    "{k} {err:?}"
                );
            }
        }
        // Chat: at the latest on the finishing chunk.
        let mut scratch = scanner().scratch().unwrap();
        let mut s = SseRedactor::new(scanner(), policy, StreamKind::OpenAiChat);
        for p in split(text, 3) {
            s.on_event(&mut scratch, None, &chat_content(0, p).1)
                .unwrap();
        }
        assert!(s
            .on_event(&mut scratch, None, &chat_finish(0, "stop").1)
            .is_err());
    }

    #[test]
    fn open_texts_are_bounded_and_bad_events_refused() {
        let mut scratch = scanner().scratch().unwrap();
        let mut s = SseRedactor::new(scanner(), Policy::default(), StreamKind::Anthropic);
        for i in 0..MAX_OPEN_TEXTS as u64 {
            let (e, d) = anthropic_text(i, "hello");
            s.on_event(&mut scratch, e.as_deref(), &d).unwrap();
        }
        let (e, d) = anthropic_text(MAX_OPEN_TEXTS as u64, "hello");
        assert!(matches!(
            s.on_event(&mut scratch, e.as_deref(), &d),
            Err(RedactError::Json(_))
        ));
        // Closing one makes room again.
        let (e, d) = anthropic_stop(3);
        let out = s.on_event(&mut scratch, e.as_deref(), &d).unwrap();
        assert_eq!(out.len(), 2);
        let (e, d) = anthropic_text(MAX_OPEN_TEXTS as u64, "hello");
        s.on_event(&mut scratch, e.as_deref(), &d).unwrap();

        // Not JSON, a name contradicting the data, a text that is not a string: refused.
        let (e, d) = anthropic_text(0, "x");
        assert!(s.on_event(&mut scratch, Some("ping"), &d).is_err());
        assert!(s.on_event(&mut scratch, e.as_deref(), "{not json").is_err());
        let mut c = SseRedactor::new(scanner(), Policy::default(), StreamKind::OpenAiChat);
        let bad = chat_content(0, "x")
            .1
            .replace(r#""content":"x""#, r#""content":42"#);
        assert!(c.on_event(&mut scratch, None, &bad).is_err());
        // Events not rewritten pass whatever their other fields hold.
        let mut r = SseRedactor::new(scanner(), Policy::default(), StreamKind::Responses);
        let odd =
            r#"{"type":"response.output_text.annotation.added","index":"x","output_index":null}"#;
        assert_eq!(r.on_event(&mut scratch, None, odd).unwrap()[0].data, odd);
        // Empty data and events without a type pass.
        assert_eq!(c.on_event(&mut scratch, None, "").unwrap().len(), 1);
    }
}
