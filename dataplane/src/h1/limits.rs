//! Bounds on what a peer may make us buffer. Every one of them is a setting; these are the
//! defaults DESIGN.md fixes.

/// Size and count limits applied while parsing one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line plus header section, including the final CRLF (over → 431, or 414 when the
    /// request line alone does not fit).
    pub max_head_bytes: usize,
    /// Number of header fields (over → 431).
    pub max_headers: usize,
    /// Request line length (over → 414).
    pub max_request_line_bytes: usize,
    /// Bytes of chunk extensions on one chunk-size line (over → 400).
    pub max_chunk_ext_bytes: usize,
    /// Bytes of the trailer section (over → 431).
    pub max_trailer_bytes: usize,
    /// Decoded request body (over → 413).
    pub max_body_bytes: u64,
}

/// Hard ceiling on header fields: the parser keeps its field table on the stack.
pub const MAX_HEADERS_CEILING: usize = 256;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 64 * 1024,
            max_headers: 100,
            max_request_line_bytes: 16 * 1024,
            max_chunk_ext_bytes: 1024,
            max_trailer_bytes: 16 * 1024,
            max_body_bytes: 32 * 1024 * 1024,
        }
    }
}
