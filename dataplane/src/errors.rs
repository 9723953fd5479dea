//! Error bodies in the shape the client's API expects.
//!
//! OpenAI clients parse `{"error":{"message","type","param","code"}}`; Anthropic clients
//! parse `{"type":"error","error":{"type","message"}}`. Our specific code goes in `code` for
//! OpenAI and in an extra `code` field inside `error` for Anthropic, beside the nearest
//! Anthropic `type`, so SDK users see a familiar error and operators a precise one.

use std::borrow::Cow;

use serde::Serialize;

/// Which API family a request belongs to, decided by its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiStyle {
    OpenAi,
    Anthropic,
}

impl ApiStyle {
    /// `/v1/messages` (and below) is Anthropic's; everything else answers in OpenAI's shape,
    /// the de-facto default of the ecosystem.
    pub fn for_path(path: &str) -> Self {
        let p = memchr::memchr(b'?', path.as_bytes()).map_or(path, |q| &path[..q]);
        if p == "/v1/messages" || p.starts_with("/v1/messages/") {
            Self::Anthropic
        } else {
            Self::OpenAi
        }
    }
}

impl From<aigw_wire::ProviderKind> for ApiStyle {
    fn from(kind: aigw_wire::ProviderKind) -> Self {
        match kind {
            aigw_wire::ProviderKind::Openai => Self::OpenAi,
            aigw_wire::ProviderKind::Anthropic => Self::Anthropic,
        }
    }
}

/// Where an error came from, as pingora classifies them: the client, the upstream, or us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Downstream,
    Upstream,
    Internal,
}

/// A complete error to send: status, stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: Cow<'static, str>,
    pub source: ErrorSource,
}

impl ApiError {
    pub fn downstream(
        status: u16,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            source: ErrorSource::Downstream,
        }
    }

    pub fn upstream(
        status: u16,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            source: ErrorSource::Upstream,
        }
    }

    pub fn internal(
        status: u16,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            source: ErrorSource::Internal,
        }
    }

    /// The OpenAI `type` for this status.
    fn openai_type(&self) -> &'static str {
        match self.status {
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
        match self.status {
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
    pub fn write_body(&self, style: ApiStyle, out: &mut Vec<u8>) {
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
        // Serialising these plain structs into a Vec cannot fail.
        let _ = match style {
            ApiStyle::OpenAi => serde_json::to_writer(
                out,
                &OpenAiBody {
                    error: OpenAiInner {
                        message: &self.message,
                        r#type: self.openai_type(),
                        param: None,
                        code: self.code,
                    },
                },
            ),
            ApiStyle::Anthropic => serde_json::to_writer(
                out,
                &AnthropicBody {
                    r#type: "error",
                    error: AnthropicInner {
                        r#type: self.anthropic_type(),
                        message: &self.message,
                        code: self.code,
                    },
                },
            ),
        };
    }
}

impl From<crate::h1::H1Error> for ApiError {
    fn from(e: crate::h1::H1Error) -> Self {
        // The codec's Display strings are static; map them through a match so the message
        // stays a `&'static str`.
        let message = match e.status() {
            413 => "request body exceeds the configured limit",
            414 => "request line exceeds the configured limit",
            431 => "request header section exceeds the configured limit",
            501 => "only the chunked transfer coding is supported",
            505 => "only HTTP/1.0 and HTTP/1.1 are supported",
            417 => "only the 100-continue expectation is supported",
            _ => "malformed HTTP request",
        };
        Self::downstream(e.status(), e.code(), message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_shape() {
        let mut out = Vec::new();
        ApiError::downstream(400, "bad_header", "malformed HTTP request")
            .write_body(ApiStyle::OpenAi, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["error"]["code"], "bad_header");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["param"].is_null());
        assert_eq!(v["error"]["message"], "malformed HTTP request");
    }

    #[test]
    fn anthropic_shape() {
        let mut out = Vec::new();
        ApiError::downstream(413, "request_too_large", "too big")
            .write_body(ApiStyle::Anthropic, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).expect("json");
        assert_eq!(v["type"], "error");
        assert_eq!(v["error"]["type"], "request_too_large");
        assert_eq!(v["error"]["code"], "request_too_large");
    }

    #[test]
    fn style_by_path() {
        assert_eq!(ApiStyle::for_path("/v1/messages"), ApiStyle::Anthropic);
        assert_eq!(
            ApiStyle::for_path("/v1/messages?beta=true"),
            ApiStyle::Anthropic
        );
        assert_eq!(
            ApiStyle::for_path("/v1/messages/count_tokens"),
            ApiStyle::Anthropic
        );
        assert_eq!(ApiStyle::for_path("/v1/messagesx"), ApiStyle::OpenAi);
        assert_eq!(ApiStyle::for_path("/v1/chat/completions"), ApiStyle::OpenAi);
    }
}
