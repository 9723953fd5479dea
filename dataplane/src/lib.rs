//! aigateway data plane.
//!
//! The hot path, in the order a request takes it: [`listener`] → [`worker`] (one per core)
//! → [`conn`] (one connection's loop) → [`h1`] (the sans-I/O codec) → a [`service`] →
//! the response. [`server`] starts the workers and the [`admin`] listener; [`settings`]
//! carries reloadable settings to the workers without locks.

// The crate is the data plane's own code, not a library for others: its docs are read with
// `cargo doc --document-private-items`, where links to private modules resolve.
#![allow(rustdoc::private_intra_doc_links)]

pub mod adapters;
pub mod admin;
pub mod auth;
pub mod body;
mod client_watch;
pub mod config;
mod conn;
pub mod control;
pub mod date;
pub mod deadline;
pub mod demo;
pub mod errors;
pub mod h1;
pub mod iovec;
pub mod keys;
pub mod listener;
pub mod pipeline;
pub mod proxy;
pub mod relay;
pub mod request_id;
pub mod respond;
pub mod routes;
pub mod routing;
pub mod runtime;
pub use aigw_seal as seal;
pub mod server;
pub mod service;
pub mod settings;
pub mod shutdown;
pub mod snapshot_file;
pub mod upstream;
pub mod worker;
