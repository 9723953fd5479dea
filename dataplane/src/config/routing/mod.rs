//! Routing: which upstreams serve a model, in failover order, and which of them an
//! environment's policy allows. One concept with two sources: the node's file gives one
//! table for every request ([`RouteTable::build`]); the control plane pushes one per tenant
//! environment ([`Routing`]).

mod pushed;
mod table;
mod upstreams;

pub use pushed::{is_routing_kind, EnvRoutes, NoTarget, Policy, Routing};
pub use table::{RouteTable, Target, Targets};
