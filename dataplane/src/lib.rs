//! aigateway data plane.
//!
//! A request crosses the modules top to bottom, and each module uses only those below it
//! (`tests/layering.rs` holds the crate to that):
//!
//! - [`node`]: starts a node: the workers, the admin listener, the demo provider, the link;
//! - [`gateway`]: the request's phases, in order: authenticate → rate limit → admit →
//!   request guardrail → route → request transforms → upstream exchange → response
//!   transforms (usage, guardrail) → meter, metrics, leak report, log;
//! - [`server`]: listeners, one worker per core, a connection's loop, the responder;
//! - [`config`]: the configuration file, reloadable settings, the pushed configuration (keys,
//!   routing and policy) and the link that receives it, routing tables;
//! - [`upstream`]: connections to providers, pooled per core;
//! - [`adapters`]: what differs between the OpenAI and Anthropic API families;
//! - [`errors`]: every error a client can receive, declared once;
//! - [`runtime`]: the io_uring probe, timers, coarse clocks, shutdown signals;
//! - [`body`]: request bodies as JSON, parsed once and edited;
//! - [`h1`]: the HTTP/1.1 codec, no I/O;
//! - [`metrics`]: Prometheus figures, counted per worker and rendered for the admin listener;
//! - [`pii`]: PII and secret detection (Hyperscan) and redaction, no I/O.

// The crate is the data plane's own code, not a library for others: its docs are read with
// `cargo doc --document-private-items`, where links to private modules resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod adapters;
pub mod body;
pub mod config;
pub mod errors;
pub mod gateway;
pub mod h1;
pub mod metrics;
pub mod node;
pub mod pii;
pub mod runtime;
pub mod server;
pub mod upstream;

pub use aigw_seal as seal;
