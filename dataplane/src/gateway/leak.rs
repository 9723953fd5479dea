//! Leak detection of the gateway's own keys: a request body (a prompt, usually) or an
//! answer that holds a valid key of ours — format and checksum — is reported to the control
//! plane as a `key.leaked` event with the key's id and hash (never the key), where the
//! control plane confirms it against its store, marks the key leaked, audits it, and revokes
//! it when the owning environment's policy says so.
//!
//! The phases that see text record what they find in the request context ([`find`]); the
//! request's end reports it ([`report`]). Cheap when there is nothing to find: one SIMD
//! substring search for the keys' prefix. In a stream each event is searched on its own,
//! so a key split across two events is not found.

use std::sync::LazyLock;

use memchr::memmem::Finder;

use crate::gateway::ctx::RequestCtx;

/// The keys' prefix, searched for in every request and answer of a keyed node (a finder
/// built once, not per search).
static PREFIX: LazyLock<Finder<'static>> =
    LazyLock::new(|| Finder::new(aigw_wire::keys::PREFIX.as_bytes()));

/// A key of ours seen in traffic: its id, the SHA-256 of the whole key (hex), and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sighting {
    pub key_id: String,
    pub sha256: String,
    pub direction: &'static str,
}

/// Most sightings kept per request.
const MAX_SIGHTINGS: usize = 16;

/// Records every valid key of ours in `text` (`direction`: "request" or "response").
pub(crate) fn find(ctx: &mut RequestCtx, text: &[u8], direction: &'static str) {
    if PREFIX.find(text).is_none() {
        return;
    }
    let text = String::from_utf8_lossy(text);
    for key in aigw_wire::keys::find_keys(&text) {
        let Ok(parsed) = aigw_wire::keys::parse(key) else {
            continue;
        };
        if ctx.leaks.len() >= MAX_SIGHTINGS || ctx.leaks.iter().any(|s| s.key_id == parsed.key_id) {
            continue;
        }
        ctx.leaks.push(Sighting {
            key_id: parsed.key_id.to_string(),
            sha256: aigw_wire::keys::hash(key)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            direction,
        });
    }
}

/// Sends what the request's phases found to the control plane.
pub(crate) fn report(outbox: &crate::config::usage::Outbox, ctx: &RequestCtx) {
    for s in &ctx.leaks {
        let id = ctx.identity.as_ref();
        let detail = serde_json::json!({
            "leaked_key_id": s.key_id,
            "leaked_key_sha256": s.sha256,
            // Who presented it: the request's own key and its environment (the node's
            // scope covers them).
            "tenant_id": id.map(|i| &*i.tenant_id),
            "environment": id.map(|i| i.environment.name()),
            "key_id": id.map(|i| &*i.key_id),
            "direction": s.direction,
            "request_id": ctx.id.to_string(),
        });
        tracing::warn!(id = %ctx.id, leaked_key_id = %s.key_id, direction = s.direction, "a key of ours was seen in traffic; reported");
        outbox.event("key.leaked", detail.to_string());
    }
}
