//! Every error a client can receive, declared once: its status, its code, where it comes
//! from, and its default message ([`Code`]); and the one place that writes an error body, in
//! the shape the client's API family expects ([`ApiError::write_body`]).
//!
//! OpenAI clients parse `{"error":{"message","type","param","code"}}`; Anthropic clients
//! parse `{"type":"error","error":{"type","message"}}`. Our code goes in `code` for OpenAI
//! and in an extra `code` field inside `error` for Anthropic, beside the nearest Anthropic
//! `type`, so SDK users see a familiar error and operators a precise one.
//!
//! `dataplane/ERRORS.md` lists every code for users; a test keeps the two in step.

mod catalogue;

use std::borrow::Cow;

use serde::Serialize;

pub use aigw_wire::ProviderKind as Family;
pub use catalogue::Code;

/// Where an error came from, as pingora classifies them: the client, the upstream, or us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Downstream,
    Upstream,
    Internal,
}

/// The error shape for a path: `/v1/messages` (and below) answers in Anthropic's shape,
/// everything else in OpenAI's, the de-facto default of the ecosystem. Used before the
/// endpoint is known (a head that did not parse) and for paths the gateway does not serve.
pub fn family_for_path(path: &str) -> Family {
    let p = memchr::memchr(b'?', path.as_bytes()).map_or(path, |q| &path[..q]);
    if p == "/v1/messages" || p.starts_with("/v1/messages/") {
        Family::Anthropic
    } else {
        Family::Openai
    }
}

/// The family for a request whose head did not parse: by the request line's target.
pub fn family_for_raw_head(buf: &[u8]) -> Family {
    let line_end = memchr::memchr(b'\n', buf)
        .unwrap_or(buf.len())
        .min(8 * 1024);
    let line = &buf[..line_end];
    let target = line.split(|&b| b == b' ').nth(1).unwrap_or_default();
    family_for_path(std::str::from_utf8(target).unwrap_or(""))
}

/// An error to send: a catalogued code and a message (the code's default, or one naming
/// what was wrong).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: Code,
    pub message: Cow<'static, str>,
}

impl From<Code> for ApiError {
    fn from(code: Code) -> Self {
        Self {
            code,
            message: Cow::Borrowed(code.message()),
        }
    }
}

impl ApiError {
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    /// The OpenAI `type` for this status.
    fn openai_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            429 => "rate_limit_exceeded",
            400..=499 => "invalid_request_error",
            _ => "server_error",
        }
    }

    /// The nearest Anthropic `type` for this status.
    fn anthropic_type(&self) -> &'static str {
        match self.status() {
            401 => "authentication_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            400..=499 => "invalid_request_error",
            503 | 529 => "overloaded_error",
            _ => "api_error",
        }
    }

    /// Appends the JSON body to `out`.
    pub fn write_body(&self, family: Family, out: &mut Vec<u8>) {
        let _ = serde_json::to_writer(out, &self.body_value(family));
    }

    /// The body as a JSON value (also the data of a stream's error event).
    pub fn body_value(&self, family: Family) -> serde_json::Value {
        #[derive(Serialize)]
        struct OpenAiBody<'a> {
            error: OpenAiInner<'a>,
        }
        #[derive(Serialize)]
        struct OpenAiInner<'a> {
            message: &'a str,
            r#type: &'a str,
            param: Option<&'a str>,
            code: &'a str,
        }
        #[derive(Serialize)]
        struct AnthropicBody<'a> {
            r#type: &'a str,
            error: AnthropicInner<'a>,
        }
        #[derive(Serialize)]
        struct AnthropicInner<'a> {
            r#type: &'a str,
            message: &'a str,
            code: &'a str,
        }
        // Serialising these plain structs cannot fail.
        match family {
            Family::Openai => serde_json::to_value(OpenAiBody {
                error: OpenAiInner {
                    message: &self.message,
                    r#type: self.openai_type(),
                    param: None,
                    code: self.code.as_str(),
                },
            }),
            Family::Anthropic => serde_json::to_value(AnthropicBody {
                r#type: "error",
                error: AnthropicInner {
                    r#type: self.anthropic_type(),
                    message: &self.message,
                    code: self.code.as_str(),
                },
            }),
        }
        .unwrap_or_default()
    }
}

impl From<crate::h1::H1Error> for ApiError {
    fn from(e: crate::h1::H1Error) -> Self {
        Code::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let mut out = Vec::new();
        ApiError::from(Code::BadHeader).write_body(Family::Openai, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["error"]["code"], "bad_header");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        assert_eq!(v["error"]["message"], "malformed header field");
    }

    #[test]
    fn anthropic_shape() {
        let mut out = Vec::new();
        Code::RequestTooLarge
            .with("too big")
            .write_body(Family::Anthropic, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "request_too_large");
        assert_eq!(v["error"]["code"], "request_too_large");
        assert_eq!(v["error"]["message"], "too big");
    }

    #[test]
    fn family_by_path() {
        assert_eq!(family_for_path("/v1/messages"), Family::Anthropic);
        assert_eq!(family_for_path("/v1/messages?beta=true"), Family::Anthropic);
        assert_eq!(
            family_for_path("/v1/messages/count_tokens"),
            Family::Anthropic
        );
        assert_eq!(family_for_path("/v1/messagesx"), Family::Openai);
        assert_eq!(family_for_path("/v1/chat/completions"), Family::Openai);
        assert_eq!(
            family_for_raw_head(b"POST /v1/messages HTTP/1.1\r\nbad"),
            Family::Anthropic
        );
    }
}
