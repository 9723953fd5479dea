//! The admit phase: what an authenticated request may hold while it is served. Today, the
//! memory of its body: the announced length is reserved against the worker's body budget
//! before a byte of it is read or `100 Continue` is sent, so requests without a valid key
//! never hold any of it. (The key's rate limits were taken just before, by
//! [`crate::gateway::limit`].)

use crate::errors::{ApiError, Code};
use crate::gateway::ctx::RequestCtx;
use crate::server::service::Head;
use crate::server::worker::{BodyBudget, WorkerCtx};

/// The body's reservation, or the refusal.
pub fn run(
    worker: &WorkerCtx,
    _ctx: &mut RequestCtx,
    head: &Head<'_>,
) -> Result<BodyBudget, ApiError> {
    let settings = worker.settings.current();
    let mut budget = worker.body_budget(settings.body_budget_bytes);
    // A chunked body announces no length: the connection grows the reservation as it
    // decodes, and refuses the request when it no longer fits.
    if let Some(n) = head.content_length() {
        if !budget.grow(n) {
            return Err(Code::ServerBusy.into());
        }
    }
    Ok(budget)
}
