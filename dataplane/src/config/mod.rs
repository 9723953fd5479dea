//! Configuration, from its two sources: the node's file ([`file`], with the settings a
//! reload swaps in, [`settings`]) and what the control plane pushes ([`pushed`]: keys,
//! routing and policy, received by the [`link`] and kept on disk by [`snapshot`]). Both
//! sources route with the same [`routing`] tables.

pub mod bodies;
mod file;
pub mod identity;
pub mod limits;
pub mod link;
pub mod pushed;
pub mod routing;
pub mod settings;
pub mod snapshot;
pub mod spend;
pub mod tls;
pub mod usage;

pub use file::*;
