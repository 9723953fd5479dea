//! Routing: which upstreams serve a model, in failover order, and which of them an
//! environment's policy allows. One concept with two sources: the node's file gives one
//! table for every request ([`RouteTable::build`]); the control plane pushes one per tenant
//! environment ([`Routing`]).

mod env;
mod pushed;
mod table;
mod upstreams;

pub use env::{EnvRoutes, Guardrails, NoTarget, Policy};
pub use pushed::{is_routing_kind, Routing};
pub use table::{RouteTable, RouteTo, Target, Targets};
