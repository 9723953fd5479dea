//! The route phase: the upstreams that may serve the request's model, in failover order.
//! With a control plane they come from the key's environment (its routes, filtered by its
//! policy); without one, from the node's file. Both are the same kind of table.

use crate::config::routing::{EnvRoutes, NoTarget, Targets};
use crate::errors::{ApiError, Code};
use crate::gateway::ctx::RequestCtx;

/// `routes`: the routing of the key's environment, or the file's when the node has no
/// control plane (`None`: the environment routes nothing).
pub fn run<'r>(ctx: &RequestCtx, routes: Option<&'r EnvRoutes>) -> Result<Targets<'r>, ApiError> {
    let model = ctx.model.as_deref().unwrap_or_default();
    let found = match routes {
        Some(r) => r.lookup(model, ctx.family),
        None => Err(NoTarget::NoRoute),
    };
    found.map_err(|why| match why {
        NoTarget::NoRoute => {
            Code::ModelNotFound.with(format!("no route for model `{model}` on this API"))
        }
        NoTarget::Policy(rule) => Code::PolicyBlocked.with(format!(
            "no upstream for model `{model}` meets this environment's {rule} policy"
        )),
        NoTarget::Unusable(why) => Code::RouteUnavailable.with(format!(
            "the route for model `{model}` cannot be used until its configuration is fixed: {why}"
        )),
    })
}
