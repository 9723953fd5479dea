//! Serving connections, whatever answers them: SO_REUSEPORT [`listener`]s, one pinned
//! [`worker`] per core, a connection's loop ([`conn`]: head, body, answer, keep-alive), and
//! the [`respond`]er that writes answers whole or streamed. What answers is a
//! [`service::Service`]: the gateway, the admin listener, the demo provider.

pub(crate) mod client_watch;
pub(crate) mod conn;
pub mod date;
pub mod listener;
pub mod request_id;
pub mod respond;
pub mod service;
pub mod stream;
pub mod worker;
