//! The authenticate phase: the key a request presents, checked against the pushed key table
//! before anything is reserved for the request or its body is read.
//!
//! The key arrives where the client's API puts it (`Authorization: Bearer` for OpenAI-style
//! requests, `x-api-key` or `Authorization` for Anthropic-style ones). Each worker keeps a
//! small bounded cache of the keys it has verified against the table it holds, with what
//! that table says of each (its identity, status, scope), so a busy key is hashed and its
//! identity built once per table, not once per request; a new table (a key revoked, a cap
//! set) empties it in effect, and expiry and grace are checked against the clock on every
//! request. A key not in the cache has its format and checksum checked first (no table
//! lookup for garbage), then its public id is looked up in the shared table and SHA-256 of
//! the presented key is compared in constant time.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use aigw_wire::keys::{self, Environment};
use subtle::ConstantTimeEq;

use crate::config::pushed::{NodeConfig, SharedConfig};
use crate::config::routing::Routing;
use crate::errors::{ApiError, Code, Family};
use crate::gateway::ctx::{Identity, RequestCtx};
use crate::server::service::Head;

/// Verified keys remembered per worker.
const CACHE_CAP: usize = 4096;

/// Longer than any key (an environment tag is far shorter than 16): a longer header is
/// refused before it is hashed to look in the cache.
const LONGEST_KEY: usize =
    keys::PREFIX.len() + 16 + 1 + keys::KEY_ID_LEN + 1 + keys::SECRET_LEN + keys::CHECKSUM_LEN;
const _: () = {
    let mut i = 0;
    while i < Environment::ALL.len() {
        assert!(Environment::ALL[i].tag().len() < 16);
        i += 1;
    }
};

/// Why a request was not authenticated; each has its own code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    Missing,
    Malformed,
    Unknown,
    Revoked,
    Expired,
    /// Rotated, and the grace period is over.
    Rotated,
    EnvironmentNotServed,
}

impl AuthError {
    pub fn code(self) -> Code {
        match self {
            Self::Missing => Code::MissingApiKey,
            Self::Malformed => Code::MalformedApiKey,
            Self::Unknown => Code::UnknownApiKey,
            Self::Revoked => Code::RevokedApiKey,
            Self::Expired => Code::ExpiredApiKey,
            Self::Rotated => Code::RotatedApiKey,
            Self::EnvironmentNotServed => Code::EnvironmentNotServed,
        }
    }
}

/// Authenticates the request from its head; the identity goes into `ctx`. A node without a
/// control plane serves unauthenticated (the quick start), and this phase passes.
pub fn run(
    keys: Option<&LocalConfig>,
    ctx: &mut RequestCtx,
    head: &Head<'_>,
) -> Result<(), ApiError> {
    let Some(keys) = keys else { return Ok(()) };
    keys.refresh();
    if !keys.shared.loaded() {
        return Err(Code::ConfigNotLoaded.into());
    }
    if !keys.max_stale.is_zero()
        && keys
            .shared
            .age_seconds()
            .is_none_or(|a| a > keys.max_stale.as_secs())
    {
        return Err(Code::StaleConfig.into());
    }
    let presented = presented_key(ctx.family, |n| head.header(n));
    let identity = keys
        .authenticate(presented, crate::runtime::deadline::coarse_unix_secs())
        .map_err(|e| ApiError::from(e.code()))?;
    ctx.identity = Some(identity);
    Ok(())
}

/// The key a request carries, by API family.
pub fn presented_key<'a>(
    family: Family,
    header: impl Fn(&str) -> Option<&'a [u8]>,
) -> Option<&'a str> {
    let bearer = || {
        header("authorization")
            .and_then(|v| {
                v.strip_prefix(b"Bearer ")
                    .or_else(|| v.strip_prefix(b"bearer "))
            })
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    };
    let x_api_key = || {
        header("x-api-key")
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::trim)
    };
    match family {
        Family::Openai => bearer().or_else(x_api_key),
        Family::Anthropic => x_api_key().or_else(bearer),
    }
    .filter(|k| !k.is_empty())
}

/// Presented key → what the table it was verified against says of it. SipHash with a random
/// key on purpose: a predictable hash would let a client aim its lookups at a cached key's
/// bucket and time the compares.
type VerifiedCache = HashMap<Box<str>, Verified>;

/// A worker's view of the pushed configuration: the table it uses and the keys it has
/// verified against it.
#[derive(Debug)]
pub struct LocalConfig {
    shared: Arc<SharedConfig>,
    /// The table this worker uses, and the publish generation it came from.
    table: RefCell<(u64, Arc<NodeConfig>)>,
    verified: RefCell<VerifiedCache>,
    served: Vec<Environment>,
    /// Longest time without the control plane before requests are refused (0 = forever).
    max_stale: Duration,
}

impl LocalConfig {
    pub fn new(shared: Arc<SharedConfig>, served: Vec<Environment>, max_stale: Duration) -> Self {
        let table = RefCell::new((shared.generation(), shared.load()));
        Self {
            shared,
            table,
            verified: RefCell::new(HashMap::new()),
            served,
            max_stale,
        }
    }

    pub fn shared(&self) -> &Arc<SharedConfig> {
        &self.shared
    }

    /// Swaps to the published table if it moved; returns the revision now held.
    pub fn refresh(&self) -> u64 {
        let published = self.shared.generation();
        let mut t = self.table.borrow_mut();
        if t.0 != published {
            // Generation first, then the table: a publish in between is seen next time.
            *t = (published, self.shared.load());
        }
        t.1.revision
    }

    /// The routing of the table this worker holds, when its generation differs from `seen`.
    /// It does not look for a newer table: [`Self::authenticate`] does, once per request, and
    /// a change it picks up is seen here at the next request.
    pub fn routing_if_changed(&self, seen: u64) -> Option<Arc<Routing>> {
        let t = self.table.borrow();
        (t.1.routing.generation != seen).then(|| Arc::clone(&t.1.routing))
    }

    /// Checks `presented` (format, existence, hash, status, expiry, environment).
    ///
    /// A key verified against the table this worker holds is found in the cache with
    /// everything the table says of it (its identity, status, scope); expiry and grace are
    /// checked against the clock on every request.
    pub fn authenticate(
        &self,
        presented: Option<&str>,
        now_unix: u64,
    ) -> Result<Arc<Identity>, AuthError> {
        let presented = presented.ok_or(AuthError::Missing)?;
        if presented.len() > LONGEST_KEY {
            return Err(AuthError::Malformed);
        }
        self.refresh();
        let guard = self.table.borrow();
        if let Some(v) = self.verified.borrow().get(presented) {
            if v.generation == guard.0 {
                return v.verdict(now_unix);
            }
        }
        let parsed = keys::parse(presented).map_err(|_| AuthError::Malformed)?;
        let table = &guard.1;
        let entry = table.get(parsed.key_id).ok_or(AuthError::Unknown)?;
        let ok: bool = keys::hash(presented).ct_eq(&entry.hash).into();
        if !ok {
            return Err(AuthError::Unknown);
        }
        let identity = Arc::new(Identity {
            tenant_id: Arc::clone(&entry.tenant_id),
            environment: entry.environment,
            sub_account_id: entry.sub_account_id.clone(),
            key_id: parsed.key_id.into(),
            allowed_models: entry.allowed_models.clone(),
            routes: table
                .routing
                .env(&entry.tenant_id, entry.environment)
                .cloned(),
            rate_limits: entry.rate_limits,
            sub_account_limits: table.routing.spend.sub_account_limits(
                entry.sub_account_id.as_deref(),
                entry.sub_account_parents.as_deref().unwrap_or_default(),
            ),
            caps: table.routing.spend.caps_for(
                &entry.tenant_id,
                entry.sub_account_id.as_deref(),
                entry.sub_account_parents.as_deref().unwrap_or_default(),
                parsed.key_id,
            ),
            spend: table
                .routing
                .spend
                .has_caps()
                .then(|| Arc::clone(&table.routing.spend)),
        });
        let verified = Verified {
            generation: guard.0,
            identity,
            revoked: entry.revoked,
            expires_at: entry.expires_at,
            grace_ends_at: entry.grace_ends_at,
            served: parsed.environment == entry.environment
                && self.served.contains(&entry.environment),
        };
        let verdict = verified.verdict(now_unix);
        let mut cache = self.verified.borrow_mut();
        if cache.len() >= CACHE_CAP {
            cache.clear();
        }
        cache.insert(presented.into(), verified);
        verdict
    }
}

/// What the table a key was verified against says of it.
#[derive(Debug)]
struct Verified {
    /// The publish generation of that table (an entry cannot change within one).
    generation: u64,
    identity: Arc<Identity>,
    revoked: bool,
    expires_at: u64,
    grace_ends_at: u64,
    /// The key's text names its entry's environment, and this node serves it.
    served: bool,
}

impl Verified {
    fn verdict(&self, now_unix: u64) -> Result<Arc<Identity>, AuthError> {
        if self.revoked {
            return Err(AuthError::Revoked);
        }
        if self.expires_at != 0 && now_unix >= self.expires_at {
            return Err(AuthError::Expired);
        }
        if self.grace_ends_at != 0 && now_unix >= self.grace_ends_at {
            return Err(AuthError::Rotated);
        }
        if !self.served {
            return Err(AuthError::EnvironmentNotServed);
        }
        Ok(Arc::clone(&self.identity))
    }
}

/// Whether the identity's key may use `model`.
pub fn may_use(identity: &Identity, model: &str) -> bool {
    match &identity.allowed_models {
        Some(list) => list.iter().any(|m| &**m == model),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigw_wire::{KeyRecord, KeyStatus};

    fn setup(rec: impl Fn(&mut KeyRecord)) -> (LocalConfig, String, Arc<SharedConfig>) {
        let key = keys::assemble(
            Environment::Production,
            "k7Hq2Lx9Pw3Z",
            "abcdefghijABCDEFGHIJ0123456789",
        );
        let mut r = KeyRecord {
            sub_account_parents: Vec::new(),
            key_id: "k7Hq2Lx9Pw3Z".into(),
            tenant_id: "t".into(),
            environment: "production".into(),
            sub_account_id: None,
            hash_version: 1,
            hash: keys::hash(&key),
            status: KeyStatus::Active,
            expires_at: 0,
            grace_ends_at: 0,
            allowed_models: vec![],
            rate_limits: Default::default(),
        };
        rec(&mut r);
        let shared = Arc::new(SharedConfig::default());
        shared.publish(NodeConfig::from_records(1, &[r]));
        (
            LocalConfig::new(
                Arc::clone(&shared),
                Environment::ALL.to_vec(),
                Duration::ZERO,
            ),
            key,
            shared,
        )
    }

    #[test]
    fn valid_key_passes_and_every_failure_has_its_reason() {
        let (l, key, _) = setup(|_| {});
        assert!(l.authenticate(Some(&key), 100).is_ok());
        assert!(l.authenticate(Some(&key), 100).is_ok(), "cached path");
        assert_eq!(
            l.authenticate(None, 100).map(|_| ()),
            Err(AuthError::Missing)
        );
        assert_eq!(
            l.authenticate(Some("sk-123"), 100).map(|_| ()),
            Err(AuthError::Malformed)
        );
        assert_eq!(
            l.authenticate(Some(&format!("{key}{}", "x".repeat(4096))), 100)
                .map(|_| ()),
            Err(AuthError::Malformed)
        );
        let other = keys::assemble(
            Environment::Production,
            "k7Hq2Lx9Pw3Z",
            "ZZZZZZZZZZABCDEFGHIJ0123456789",
        );
        assert_eq!(
            l.authenticate(Some(&other), 100).map(|_| ()),
            Err(AuthError::Unknown),
            "same id, wrong secret"
        );
        let unknown = keys::assemble(
            Environment::Production,
            "AAAAAAAAAAAA",
            "abcdefghijABCDEFGHIJ0123456789",
        );
        assert_eq!(
            l.authenticate(Some(&unknown), 100).map(|_| ()),
            Err(AuthError::Unknown)
        );
        // Each refusal again from the worker's cache, and in the same order of reasons.
        let refused = |l: &LocalConfig, key: &str, now: u64, want: AuthError| {
            for pass in ["verified", "cached"] {
                assert_eq!(
                    l.authenticate(Some(key), now).map(|_| ()),
                    Err(want),
                    "{pass}"
                );
            }
        };
        let (l, key, _) = setup(|r| r.status = KeyStatus::Revoked);
        refused(&l, &key, 100, AuthError::Revoked);
        let (l, key, _) = setup(|r| {
            r.status = KeyStatus::Revoked;
            r.expires_at = 50;
        });
        refused(&l, &key, 100, AuthError::Revoked);
        let (l, key, _) = setup(|r| r.expires_at = 50);
        assert!(l.authenticate(Some(&key), 49).is_ok());
        refused(&l, &key, 100, AuthError::Expired);
        assert!(
            l.authenticate(Some(&key), 49).is_ok(),
            "the clock, not the cache"
        );
        let (l, key, _) = setup(|r| r.grace_ends_at = 50);
        refused(&l, &key, 100, AuthError::Rotated);
        let (l, key, _) = setup(|r| r.environment = "staging".into());
        refused(&l, &key, 100, AuthError::EnvironmentNotServed);
        let (l, key, _) = setup(|_| {});
        let first = l.authenticate(Some(&key), 1).expect("valid");
        let again = l.authenticate(Some(&key), 1).expect("valid");
        assert!(
            Arc::ptr_eq(&first, &again),
            "one identity per key and table"
        );
        let (l, _, _) = setup(|_| {});
        let staging = keys::assemble(
            Environment::Staging,
            "k7Hq2Lx9Pw3Z",
            "abcdefghijABCDEFGHIJ0123456789",
        );
        refused(&l, &staging, 1, AuthError::Unknown);
    }

    #[test]
    fn revocation_applies_to_cached_keys_at_once() {
        let (l, key, shared) = setup(|_| {});
        assert!(l.authenticate(Some(&key), 1).is_ok());
        let table = shared.load();
        let mut r = KeyRecord {
            sub_account_parents: Vec::new(),
            key_id: "k7Hq2Lx9Pw3Z".into(),
            tenant_id: "t".into(),
            environment: "production".into(),
            sub_account_id: None,
            hash_version: 1,
            hash: keys::hash(&key),
            status: KeyStatus::Revoked,
            expires_at: 0,
            grace_ends_at: 0,
            allowed_models: vec![],
            rate_limits: Default::default(),
        };
        shared.publish(table.apply(2, &[r.clone()], &[]));
        assert_eq!(
            l.authenticate(Some(&key), 1).map(|_| ()),
            Err(AuthError::Revoked)
        );
        r.status = KeyStatus::Active;
        r.allowed_models = vec!["gpt-x".into()];
        shared.publish(shared.load().apply(3, &[r], &[]));
        let e = l.authenticate(Some(&key), 1).expect("active again");
        assert!(
            may_use(&e, "gpt-x"),
            "the identity of the newest table, not the cached one"
        );
        assert!(!may_use(&e, "gpt-y"));
        assert_eq!(&*e.key_id, "k7Hq2Lx9Pw3Z");
        assert_eq!(&*e.tenant_id, "t");
    }

    #[test]
    fn key_location_by_family() {
        let h = |name: &str| match name {
            "authorization" => Some(&b"Bearer aigw_a"[..]),
            "x-api-key" => Some(&b"aigw_b"[..]),
            _ => None,
        };
        assert_eq!(presented_key(Family::Openai, h), Some("aigw_a"));
        assert_eq!(presented_key(Family::Anthropic, h), Some("aigw_b"));
    }
}
