//! The catalogue: one line per error a client can receive.

use std::borrow::Cow;

use super::{ApiError, ErrorSource};
use crate::h1::H1Error;

macro_rules! catalogue {
    ($( $(#[$doc:meta])* $variant:ident = ($status:literal, $code:literal, $source:ident, $message:literal), )*) => {
        /// Every error a client can receive. The code string is stable: clients and
        /// operators match on it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum Code {
            $( $(#[$doc])* $variant, )*
        }

        impl Code {
            /// Every code, in catalogue order.
            pub const ALL: &'static [Code] = &[ $( Code::$variant, )* ];

            pub const fn status(self) -> u16 {
                match self { $( Code::$variant => $status, )* }
            }

            /// The machine-readable code that goes into the error body.
            pub const fn as_str(self) -> &'static str {
                match self { $( Code::$variant => $code, )* }
            }

            pub const fn source(self) -> ErrorSource {
                match self { $( Code::$variant => ErrorSource::$source, )* }
            }

            /// The message sent when the caller has nothing more precise to say.
            pub const fn message(self) -> &'static str {
                match self { $( Code::$variant => $message, )* }
            }
        }
    };
}

catalogue! {
    // The HTTP/1.1 codec (RFC 9112): the connection is closed after these.
    BadRequestLine = (400, "bad_request_line", Downstream, "malformed request line"),
    HttpVersionNotSupported = (505, "http_version_not_supported", Downstream, "only HTTP/1.0 and HTTP/1.1 are supported"),
    BadRequestTarget = (400, "bad_request_target", Downstream, "malformed request target"),
    UriTooLong = (414, "uri_too_long", Downstream, "request line exceeds the configured limit"),
    HeaderSectionTooLarge = (431, "header_section_too_large", Downstream, "request header section exceeds the configured limit"),
    TooManyHeaders = (431, "too_many_headers", Downstream, "too many header fields"),
    BadHeader = (400, "bad_header", Downstream, "malformed header field"),
    BareLineEnding = (400, "bare_line_ending", Downstream, "line ending is not CRLF"),
    ObsFold = (400, "obs_fold", Downstream, "obsolete line folding is not allowed"),
    MissingHost = (400, "missing_host", Downstream, "missing Host header"),
    DuplicateHost = (400, "duplicate_host", Downstream, "more than one Host header"),
    BadHost = (400, "bad_host", Downstream, "malformed Host header"),
    BadContentLength = (400, "bad_content_length", Downstream, "malformed Content-Length"),
    DuplicateContentLength = (400, "duplicate_content_length", Downstream, "more than one Content-Length"),
    ContentLengthWithTransferEncoding = (400, "content_length_with_transfer_encoding", Downstream, "both Content-Length and Transfer-Encoding present"),
    TransferEncodingInHttp10 = (400, "transfer_encoding_in_http10", Downstream, "Transfer-Encoding is not allowed in HTTP/1.0"),
    BadTransferEncoding = (400, "bad_transfer_encoding", Downstream, "malformed Transfer-Encoding"),
    UnsupportedTransferCoding = (501, "unsupported_transfer_coding", Downstream, "only the chunked transfer coding is supported"),
    ExpectationFailed = (417, "expectation_failed", Downstream, "only the 100-continue expectation is supported"),
    BadChunkSize = (400, "bad_chunk_size", Downstream, "malformed chunk size"),
    BadChunkExtension = (400, "bad_chunk_extension", Downstream, "malformed chunk extension"),
    ChunkExtensionTooLong = (400, "chunk_extension_too_long", Downstream, "chunk extension too long"),
    BadChunkFraming = (400, "bad_chunk_framing", Downstream, "malformed chunk framing"),
    BadTrailer = (400, "bad_trailer", Downstream, "malformed trailer field"),
    TrailerTooLarge = (431, "trailer_too_large", Downstream, "trailer section too large"),
    RequestTooLarge = (413, "request_too_large", Downstream, "request body exceeds the configured limit"),
    RequestTimeout = (408, "request_timeout", Downstream, "the request was not received in time"),

    // The listener: plain HTTP on a node that serves over TLS.
    HttpsRequired = (403, "https_required", Downstream, "this gateway takes API requests over https only"),

    // The endpoint.
    NotFound = (404, "not_found", Downstream, "no such endpoint"),
    MethodNotAllowed = (405, "method_not_allowed", Downstream, "method not allowed on this endpoint"),

    // Authentication.
    MissingApiKey = (401, "missing_api_key", Downstream, "no API key was provided"),
    MalformedApiKey = (401, "malformed_api_key", Downstream, "the API key is not a valid aigateway key"),
    UnknownApiKey = (401, "unknown_api_key", Downstream, "the API key is not known"),
    RevokedApiKey = (401, "revoked_api_key", Downstream, "the API key has been revoked"),
    ExpiredApiKey = (401, "expired_api_key", Downstream, "the API key has expired"),
    RotatedApiKey = (401, "rotated_api_key", Downstream, "the API key was rotated and its grace period is over"),
    EnvironmentNotServed = (403, "environment_not_served", Downstream, "this gateway does not serve the key's environment"),
    ConfigNotLoaded = (503, "config_not_loaded", Internal, "this gateway has no configuration yet; retry shortly"),
    StaleConfig = (503, "stale_config", Internal, "this gateway has lost its control plane for too long"),

    // Admission.
    ServerBusy = (503, "server_busy", Internal, "the gateway is at its memory limit for request bodies; retry shortly"),

    // The request body.
    UnsupportedMediaType = (415, "unsupported_media_type", Downstream, "request body must be application/json"),
    InvalidJson = (400, "invalid_json", Downstream, "request body is not valid JSON"),
    DuplicateKey = (400, "duplicate_key", Downstream, "duplicate key in request body"),
    MissingModel = (400, "missing_model", Downstream, "`model` is required and must be a string"),
    InvalidRequest = (400, "invalid_request", Downstream, "the request is missing a required field"),
    ModelNotAllowed = (403, "model_not_allowed", Downstream, "the API key may not use this model"),
    RateLimitExceeded = (429, "rate_limit_exceeded", Downstream, "this API key's rate limit is reached; retry after the time in Retry-After"),

    // Spend caps.
    InsufficientQuota = (429, "insufficient_quota", Downstream, "a spend cap covering this API key is reached for its period"),
    ModelNotPriced = (403, "model_not_priced", Downstream, "a spend cap covers this API key and the model has no price, so its cost cannot be bounded"),
    SpendCapUnavailable = (503, "spend_cap_unavailable", Internal, "this gateway cannot reach its control plane for more spend cap budget; retry shortly"),

    // Guardrails: the environment's policy blocks what the request holds.
    GuardrailEmail = (400, "guardrail_email", Downstream, "the request holds an e-mail address, which this environment's guardrail blocks"),
    GuardrailPhone = (400, "guardrail_phone", Downstream, "the request holds a phone number, which this environment's guardrail blocks"),
    GuardrailCard = (400, "guardrail_card", Downstream, "the request holds a payment card number, which this environment's guardrail blocks"),
    GuardrailSsn = (400, "guardrail_ssn", Downstream, "the request holds a US social security number, which this environment's guardrail blocks"),
    GuardrailIban = (400, "guardrail_iban", Downstream, "the request holds an IBAN, which this environment's guardrail blocks"),
    GuardrailIp = (400, "guardrail_ip", Downstream, "the request holds an IP address, which this environment's guardrail blocks"),
    GuardrailSecret = (400, "guardrail_secret", Downstream, "the request holds a secret (an API key, a token, a private key), which this environment's guardrail blocks"),
    GuardrailCustom = (400, "guardrail_custom", Downstream, "the request holds a match of one of this tenant's own patterns, which this environment's guardrail blocks"),
    GuardrailUnavailable = (503, "guardrail_unavailable", Internal, "the guardrail scanner is unavailable; the request was not sent"),
    BodyLogUnavailable = (503, "body_log_unavailable", Internal, "this tenant's body log cannot take more bodies right now, and its setting refuses requests rather than leave them unlogged; the request was not sent; retry shortly"),

    // Routing.
    ModelNotFound = (404, "model_not_found", Downstream, "no route for this model on this API"),
    PolicyBlocked = (403, "policy_blocked", Downstream, "no upstream for this model meets this environment's policy"),
    RouteUnavailable = (503, "route_unavailable", Internal, "the route for this model cannot be used until its configuration is fixed"),

    // The upstream exchange.
    UpstreamUnavailable = (502, "upstream_unavailable", Upstream, "no upstream could be reached"),
    UpstreamBusy = (503, "upstream_busy", Internal, "too many requests in flight to this upstream; retry shortly"),
    UpstreamTimeout = (504, "upstream_timeout", Upstream, "the upstream did not answer in time"),
    UpstreamClosed = (502, "upstream_closed", Upstream, "the upstream closed the connection without a complete answer"),
    BadUpstreamResponse = (502, "bad_upstream_response", Upstream, "the upstream sent a malformed response"),
    UpstreamError = (502, "upstream_error", Upstream, "the upstream answered with a server error"),
    UpstreamRateLimited = (429, "upstream_rate_limited", Upstream, "every upstream for this model is rate limited; retry later"),
    UpstreamAuthFailed = (502, "upstream_auth_failed", Upstream, "the upstream refused the gateway's credentials"),

    // The response: sent as an error event when a stream is cut short.
    UpstreamInterrupted = (502, "upstream_interrupted", Upstream, "the upstream stopped before the response was complete"),

    // The gateway itself.
    InternalError = (500, "internal_error", Internal, "the gateway produced no response"),
}

impl Code {
    /// An error with this code and a message naming what was wrong.
    pub fn with(self, message: impl Into<Cow<'static, str>>) -> ApiError {
        ApiError {
            code: self,
            message: message.into(),
        }
    }

    /// Seconds a client should wait before retrying (`Retry-After`), for errors that say
    /// "busy, try again" rather than "this will fail again".
    pub const fn retry_after(self) -> Option<u32> {
        match self {
            Code::ServerBusy
            | Code::UpstreamBusy
            | Code::ConfigNotLoaded
            | Code::GuardrailUnavailable
            | Code::BodyLogUnavailable
            | Code::SpendCapUnavailable => Some(1),
            _ => None,
        }
    }

    /// Errors the official SDKs must not retry although their status says so (they retry
    /// every 429 unless told otherwise with `x-should-retry: false`).
    pub const fn final_answer(self) -> bool {
        matches!(self, Code::InsufficientQuota)
    }
}

impl From<H1Error> for Code {
    fn from(e: H1Error) -> Self {
        match e {
            H1Error::BadRequestLine => Code::BadRequestLine,
            H1Error::UnsupportedVersion => Code::HttpVersionNotSupported,
            H1Error::BadTarget => Code::BadRequestTarget,
            H1Error::RequestLineTooLong => Code::UriTooLong,
            H1Error::HeadTooLarge => Code::HeaderSectionTooLarge,
            H1Error::TooManyHeaders => Code::TooManyHeaders,
            H1Error::BadHeader => Code::BadHeader,
            H1Error::BareLineEnding => Code::BareLineEnding,
            H1Error::ObsFold => Code::ObsFold,
            H1Error::MissingHost => Code::MissingHost,
            H1Error::DuplicateHost => Code::DuplicateHost,
            H1Error::BadHost => Code::BadHost,
            H1Error::BadContentLength => Code::BadContentLength,
            H1Error::DuplicateContentLength => Code::DuplicateContentLength,
            H1Error::LengthWithTransferEncoding => Code::ContentLengthWithTransferEncoding,
            H1Error::TransferEncodingHttp10 => Code::TransferEncodingInHttp10,
            H1Error::BadTransferEncoding => Code::BadTransferEncoding,
            H1Error::UnsupportedTransferCoding => Code::UnsupportedTransferCoding,
            H1Error::UnsupportedExpectation => Code::ExpectationFailed,
            H1Error::BadChunkSize => Code::BadChunkSize,
            H1Error::BadChunkExtension => Code::BadChunkExtension,
            H1Error::ChunkExtensionTooLong => Code::ChunkExtensionTooLong,
            H1Error::BadChunkFraming => Code::BadChunkFraming,
            H1Error::BadTrailer => Code::BadTrailer,
            H1Error::TrailerTooLarge => Code::TrailerTooLarge,
            H1Error::BodyTooLarge => Code::RequestTooLarge,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_lowercase() {
        let mut seen = std::collections::HashSet::new();
        for c in Code::ALL {
            assert!(seen.insert(c.as_str()), "{} twice", c.as_str());
            assert!(c
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'));
            assert!((400..600).contains(&c.status()), "{c:?}");
            assert!(!c.message().is_empty());
        }
    }

    #[test]
    fn the_codec_keeps_its_status_and_code() {
        // The codec states its own status and code for each refusal (RFC 9112); the
        // catalogue must agree with it.
        for e in [
            H1Error::BadRequestLine,
            H1Error::UnsupportedVersion,
            H1Error::BadTarget,
            H1Error::RequestLineTooLong,
            H1Error::HeadTooLarge,
            H1Error::TooManyHeaders,
            H1Error::BadHeader,
            H1Error::BareLineEnding,
            H1Error::ObsFold,
            H1Error::MissingHost,
            H1Error::DuplicateHost,
            H1Error::BadHost,
            H1Error::BadContentLength,
            H1Error::DuplicateContentLength,
            H1Error::LengthWithTransferEncoding,
            H1Error::TransferEncodingHttp10,
            H1Error::BadTransferEncoding,
            H1Error::UnsupportedTransferCoding,
            H1Error::UnsupportedExpectation,
            H1Error::BadChunkSize,
            H1Error::BadChunkExtension,
            H1Error::ChunkExtensionTooLong,
            H1Error::BadChunkFraming,
            H1Error::BadTrailer,
            H1Error::TrailerTooLarge,
            H1Error::BodyTooLarge,
        ] {
            let c = Code::from(e);
            assert_eq!((c.status(), c.as_str()), (e.status(), e.code()), "{e:?}");
        }
    }

    /// `dataplane/ERRORS.md` lists every code with its status, and nothing else.
    #[test]
    fn the_user_list_matches_the_catalogue() {
        let doc = include_str!("../../ERRORS.md");
        let mut listed = std::collections::HashMap::new();
        for line in doc.lines() {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            if cells.len() >= 4 {
                if let (Ok(status), Some(code)) = (
                    cells[1].parse::<u16>(),
                    cells[2].strip_prefix('`').and_then(|c| c.strip_suffix('`')),
                ) {
                    assert!(listed.insert(code, status).is_none(), "{code} twice");
                }
            }
        }
        for c in Code::ALL {
            assert_eq!(
                listed.remove(c.as_str()),
                Some(c.status()),
                "ERRORS.md: {} must be listed with status {}",
                c.as_str(),
                c.status()
            );
        }
        assert!(
            listed.is_empty(),
            "ERRORS.md lists unknown codes: {listed:?}"
        );
    }
}
