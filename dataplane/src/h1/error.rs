//! Why a request was refused, and the status it earns.

/// A request the codec refuses. Each variant maps to one status code and one stable
/// machine-readable code that goes into the client's error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum H1Error {
    #[error("malformed request line")]
    BadRequestLine,
    #[error("unsupported HTTP version")]
    UnsupportedVersion,
    #[error("malformed request target")]
    BadTarget,
    #[error("request line too long")]
    RequestLineTooLong,
    #[error("request header section too large")]
    HeadTooLarge,
    #[error("too many header fields")]
    TooManyHeaders,
    #[error("malformed header field")]
    BadHeader,
    #[error("line ending is not CRLF")]
    BareLineEnding,
    #[error("obsolete line folding is not allowed")]
    ObsFold,
    #[error("missing Host header")]
    MissingHost,
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("malformed Host header")]
    BadHost,
    #[error("malformed Content-Length")]
    BadContentLength,
    #[error("more than one Content-Length")]
    DuplicateContentLength,
    #[error("both Content-Length and Transfer-Encoding present")]
    LengthWithTransferEncoding,
    #[error("Transfer-Encoding is not allowed in HTTP/1.0")]
    TransferEncodingHttp10,
    #[error("malformed Transfer-Encoding")]
    BadTransferEncoding,
    #[error("unsupported transfer coding")]
    UnsupportedTransferCoding,
    #[error("unsupported expectation")]
    UnsupportedExpectation,
    #[error("malformed chunk size")]
    BadChunkSize,
    #[error("malformed chunk extension")]
    BadChunkExtension,
    #[error("chunk extension too long")]
    ChunkExtensionTooLong,
    #[error("malformed chunk framing")]
    BadChunkFraming,
    #[error("malformed trailer field")]
    BadTrailer,
    #[error("trailer section too large")]
    TrailerTooLarge,
    #[error("request body too large")]
    BodyTooLarge,
}

impl H1Error {
    /// The response status (RFC 9110 §15 and RFC 6585 §5 for 431).
    pub const fn status(self) -> u16 {
        match self {
            Self::UnsupportedVersion => 505,
            Self::RequestLineTooLong => 414,
            Self::HeadTooLarge | Self::TooManyHeaders | Self::TrailerTooLarge => 431,
            Self::UnsupportedTransferCoding => 501,
            Self::UnsupportedExpectation => 417,
            Self::BodyTooLarge => 413,
            _ => 400,
        }
    }

    /// Stable code for error bodies and logs.
    pub const fn code(self) -> &'static str {
        match self {
            Self::BadRequestLine => "bad_request_line",
            Self::UnsupportedVersion => "http_version_not_supported",
            Self::BadTarget => "bad_request_target",
            Self::RequestLineTooLong => "uri_too_long",
            Self::HeadTooLarge => "header_section_too_large",
            Self::TooManyHeaders => "too_many_headers",
            Self::BadHeader => "bad_header",
            Self::BareLineEnding => "bare_line_ending",
            Self::ObsFold => "obs_fold",
            Self::MissingHost => "missing_host",
            Self::DuplicateHost => "duplicate_host",
            Self::BadHost => "bad_host",
            Self::BadContentLength => "bad_content_length",
            Self::DuplicateContentLength => "duplicate_content_length",
            Self::LengthWithTransferEncoding => "content_length_with_transfer_encoding",
            Self::TransferEncodingHttp10 => "transfer_encoding_in_http10",
            Self::BadTransferEncoding => "bad_transfer_encoding",
            Self::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Self::UnsupportedExpectation => "expectation_failed",
            Self::BadChunkSize => "bad_chunk_size",
            Self::BadChunkExtension => "bad_chunk_extension",
            Self::ChunkExtensionTooLong => "chunk_extension_too_long",
            Self::BadChunkFraming => "bad_chunk_framing",
            Self::BadTrailer => "bad_trailer",
            Self::TrailerTooLarge => "trailer_too_large",
            Self::BodyTooLarge => "request_too_large",
        }
    }
}
