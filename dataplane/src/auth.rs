//! Authenticating every request against the pushed key table.
//!
//! The key arrives where the client's API puts it (`Authorization: Bearer` for OpenAI-style
//! requests, `x-api-key` or `Authorization` for Anthropic-style ones). Its format and
//! checksum are checked first (no lookup for garbage), then the public key id is looked up
//! in the shared table and SHA-256 of the presented key is compared in constant time. Each
//! worker keeps a small bounded cache of keys it has verified against the current table
//! revision, so a busy key is hashed once per revision, not once per request; status,
//! expiry, grace and scope are checked on every request against the live entry.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

use aigw_wire::keys::{self, Environment};
use subtle::ConstantTimeEq;

use crate::config::ProviderKind;
use crate::errors::ApiError;
use crate::keys::{KeyTable, SharedKeys};
use crate::routing::{EnvRoutes, Routing};

/// Verified keys remembered per worker.
const CACHE_CAP: usize = 4096;

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
    ModelNotAllowed,
}

impl AuthError {
    pub fn to_api(self) -> ApiError {
        let (status, code, msg) = match self {
            Self::Missing => (401, "missing_api_key", "no API key was provided"),
            Self::Malformed => (
                401,
                "malformed_api_key",
                "the API key is not a valid aigateway key",
            ),
            Self::Unknown => (401, "unknown_api_key", "the API key is not known"),
            Self::Revoked => (401, "revoked_api_key", "the API key has been revoked"),
            Self::Expired => (401, "expired_api_key", "the API key has expired"),
            Self::Rotated => (
                401,
                "rotated_api_key",
                "the API key was rotated and its grace period is over",
            ),
            Self::EnvironmentNotServed => (
                403,
                "environment_not_served",
                "this gateway does not serve the key's environment",
            ),
            Self::ModelNotAllowed => (
                403,
                "model_not_allowed",
                "the API key may not use this model",
            ),
        };
        ApiError::downstream(status, code, msg)
    }
}

/// The key a request carries, by API family.
pub fn presented_key<'a>(
    family: ProviderKind,
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
        ProviderKind::Openai => bearer().or_else(x_api_key),
        ProviderKind::Anthropic => x_api_key().or_else(bearer),
    }
    .filter(|k| !k.is_empty())
}

/// Presented key → the publish generation of the table it was verified against (an entry
/// cannot change within one published table).
type VerifiedCache = HashMap<Box<str>, u64>;

/// A worker's view of the key table.
#[derive(Debug)]
pub struct LocalKeys {
    shared: Arc<SharedKeys>,
    /// The table this worker uses, and the publish generation it came from.
    table: RefCell<(u64, Arc<KeyTable>)>,
    verified: RefCell<VerifiedCache>,
    served: Vec<Environment>,
}

impl LocalKeys {
    pub fn new(shared: Arc<SharedKeys>, served: Vec<Environment>) -> Self {
        let table = RefCell::new((shared.generation(), shared.load()));
        Self {
            shared,
            table,
            verified: RefCell::new(HashMap::new()),
            served,
        }
    }

    pub fn shared(&self) -> &Arc<SharedKeys> {
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
    pub fn authenticate(
        &self,
        presented: Option<&str>,
        now_unix: u64,
    ) -> Result<AuthOk, AuthError> {
        let presented = presented.ok_or(AuthError::Missing)?;
        let parsed = keys::parse(presented).map_err(|_| AuthError::Malformed)?;
        self.refresh();
        let guard = self.table.borrow();
        let table = &guard.1;
        let entry = table.get(parsed.key_id).ok_or(AuthError::Unknown)?;
        let cached = self
            .verified
            .borrow()
            .get(presented)
            .is_some_and(|g| *g == guard.0);
        if !cached {
            let ok: bool = keys::hash(presented).ct_eq(&entry.hash).into();
            if !ok {
                return Err(AuthError::Unknown);
            }
            let mut cache = self.verified.borrow_mut();
            if cache.len() >= CACHE_CAP {
                cache.clear();
            }
            cache.insert(presented.into(), guard.0);
        }
        if entry.revoked {
            return Err(AuthError::Revoked);
        }
        if entry.expires_at != 0 && now_unix >= entry.expires_at {
            return Err(AuthError::Expired);
        }
        if entry.grace_ends_at != 0 && now_unix >= entry.grace_ends_at {
            return Err(AuthError::Rotated);
        }
        if parsed.environment != entry.environment || !self.served.contains(&entry.environment) {
            return Err(AuthError::EnvironmentNotServed);
        }
        Ok(AuthOk {
            allowed_models: entry.allowed_models.clone(),
            routes: table
                .routing
                .env(&entry.tenant_id, entry.environment)
                .cloned(),
        })
    }
}

/// What a request may do once authenticated.
#[derive(Debug, Clone)]
pub struct AuthOk {
    /// `None`: every model (cloning it costs nothing for unrestricted keys).
    pub allowed_models: Option<Arc<[Box<str>]>>,
    /// The routing of the key's environment; `None` when it has none.
    pub routes: Option<Arc<EnvRoutes>>,
}

/// Whether the key may use `model`.
pub fn check_model(entry: &AuthOk, model: &str) -> Result<(), AuthError> {
    match &entry.allowed_models {
        Some(list) if !list.iter().any(|m| &**m == model) => Err(AuthError::ModelNotAllowed),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigw_wire::{KeyRecord, KeyStatus};

    fn setup(rec: impl Fn(&mut KeyRecord)) -> (LocalKeys, String, Arc<SharedKeys>) {
        let key = keys::assemble(
            Environment::Production,
            "k7Hq2Lx9Pw3Z",
            "abcdefghijABCDEFGHIJ0123456789",
        );
        let mut r = KeyRecord {
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
        };
        rec(&mut r);
        let shared = Arc::new(SharedKeys::default());
        shared.publish(KeyTable::from_records(1, &[r]).expect("valid"));
        (
            LocalKeys::new(Arc::clone(&shared), Environment::ALL.to_vec()),
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
        let (l, key, _) = setup(|r| r.status = KeyStatus::Revoked);
        assert_eq!(
            l.authenticate(Some(&key), 100).map(|_| ()),
            Err(AuthError::Revoked)
        );
        let (l, key, _) = setup(|r| r.expires_at = 50);
        assert_eq!(
            l.authenticate(Some(&key), 100).map(|_| ()),
            Err(AuthError::Expired)
        );
        assert!(l.authenticate(Some(&key), 49).is_ok());
        let (l, key, _) = setup(|r| r.grace_ends_at = 50);
        assert_eq!(
            l.authenticate(Some(&key), 100).map(|_| ()),
            Err(AuthError::Rotated)
        );
        let (l, key, _) = setup(|r| r.environment = "staging".into());
        assert_eq!(
            l.authenticate(Some(&key), 100).map(|_| ()),
            Err(AuthError::EnvironmentNotServed),
            "key text says prod"
        );
    }

    #[test]
    fn revocation_applies_to_cached_keys_at_once() {
        let (l, key, shared) = setup(|_| {});
        assert!(l.authenticate(Some(&key), 1).is_ok());
        let table = shared.load();
        let mut r = KeyRecord {
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
        };
        shared.publish(table.apply(2, &[r.clone()], &[]).expect("valid"));
        assert_eq!(
            l.authenticate(Some(&key), 1).map(|_| ()),
            Err(AuthError::Revoked)
        );
        r.status = KeyStatus::Active;
        r.allowed_models = vec!["gpt-x".into()];
        shared.publish(shared.load().apply(3, &[r], &[]).expect("valid"));
        let e = l.authenticate(Some(&key), 1).expect("active again");
        assert!(check_model(&e, "gpt-x").is_ok());
        assert_eq!(check_model(&e, "gpt-y"), Err(AuthError::ModelNotAllowed));
    }

    #[test]
    fn key_location_by_family() {
        let h = |name: &str| match name {
            "authorization" => Some(&b"Bearer aigw_a"[..]),
            "x-api-key" => Some(&b"aigw_b"[..]),
            _ => None,
        };
        assert_eq!(presented_key(ProviderKind::Openai, h), Some("aigw_a"));
        assert_eq!(presented_key(ProviderKind::Anthropic, h), Some("aigw_b"));
    }
}
