//! What the control plane pushes besides keys: each tenant environment's upstreams (with
//! their provider credentials), routes and policy. When a node has a control plane, these
//! replace the static routing table of its config file: a request is routed by the
//! environment of the key it presents.
//!
//! Built by the control thread, validated as a whole (a route naming an upstream its
//! environment lacks, a base URL that does not parse… refuses the revision, which is then
//! NACKed and reaches no worker), and shared read-only by every worker with the key table.
//! An upstream whose record did not change keeps its `Arc` across revisions, so workers'
//! connection pools to it survive unrelated edits.

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aigw_wire::keys::Environment;
use aigw_wire::messages::kinds;
use aigw_wire::{PolicyRecord, Record, RouteRecord, Tombstone, UpstreamRecord};

use crate::config::routing::{RouteTable, Target, Targets};
use crate::config::{self, ProviderKind, UpstreamConfig};
use crate::upstream::{Secret, Upstream};

/// What an environment's requests must never do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    /// Only upstreams that can be told not to retain (or have an agreement).
    pub zero_retention: bool,
    /// Only upstreams in this region; empty = any.
    pub region: String,
    /// Only upstreams under a business associate agreement.
    pub hipaa: bool,
}

impl Policy {
    /// Why `up` may not serve this environment, if it may not.
    pub fn refuses(&self, up: &Upstream) -> Option<&'static str> {
        if self.zero_retention && !up.non_retention.is_guaranteed() {
            return Some("zero retention");
        }
        if !self.region.is_empty() && up.region != self.region {
            return Some("region");
        }
        if self.hipaa && !up.baa {
            return Some("HIPAA");
        }
        None
    }
}

/// One environment's routing: its table and its policy.
#[derive(Debug, Default)]
pub struct EnvRoutes {
    pub table: RouteTable,
    pub policy: Policy,
}

/// Why a model has no target in an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTarget {
    /// No route matches the model (for this API).
    NoRoute,
    /// Routes match, but the policy refuses every upstream they name.
    Policy(&'static str),
}

impl EnvRoutes {
    /// Targets for `model` on `kind` that the policy allows, in failover order.
    pub fn lookup(&self, model: &str, kind: ProviderKind) -> Result<Targets<'_>, NoTarget> {
        let all = self.table.lookup(model, kind);
        if all.is_empty() {
            return Err(NoTarget::NoRoute);
        }
        let mut refused = None;
        let allowed: Targets<'_> = all
            .into_iter()
            .filter(|t| match self.policy.refuses(&t.upstream) {
                None => true,
                Some(why) => {
                    refused = Some(why);
                    false
                }
            })
            .collect();
        match (allowed.is_empty(), refused) {
            (true, Some(why)) => Err(NoTarget::Policy(why)),
            (true, None) => Err(NoTarget::NoRoute),
            (false, _) => Ok(allowed),
        }
    }
}

/// Every environment's routing at one revision.
#[derive(Debug, Default)]
pub struct Routing {
    /// Changes whenever the routing does (not on key-only revisions).
    pub generation: u64,
    upstreams: BTreeMap<String, (UpstreamRecord, Arc<Upstream>)>,
    routes: BTreeMap<String, RouteRecord>,
    policies: BTreeMap<String, PolicyRecord>,
    envs: FxHashMap<Arc<str>, [Option<Arc<EnvRoutes>>; 3]>,
    all: Vec<Arc<Upstream>>,
}

/// Whether a record belongs here rather than in the key table.
pub fn is_routing_kind(kind: u64) -> bool {
    matches!(kind, kinds::UPSTREAM | kinds::ROUTE | kinds::POLICY)
}

fn env_index(e: Environment) -> usize {
    match e {
        Environment::Production => 0,
        Environment::Staging => 1,
        Environment::Development => 2,
    }
}

fn environment(kind: &str, id: &str, name: &str) -> Result<Environment, String> {
    Environment::from_name(name)
        .ok_or_else(|| format!("{kind} {id:?}: unknown environment {name:?}"))
}

fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn build_upstream(r: &UpstreamRecord) -> Result<Arc<Upstream>, String> {
    let err = |e: String| format!("upstream {:?}: {e}", r.id);
    let checked = aigw_wire::rules::check_upstream(r).map_err(|e| err(e.to_string()))?;
    let ms = |v: u64, default: Duration| {
        if v == 0 {
            default
        } else {
            Duration::from_millis(v)
        }
    };
    let c = UpstreamConfig {
        name: r.id.clone(),
        kind: checked.kind,
        base_url: r.base_url.clone(),
        credential_env: None,
        ca_file: None,
        danger_accept_invalid_certs: false,
        max_connections: if r.max_connections == 0 {
            config::default_max_connections()
        } else {
            usize::try_from(r.max_connections).unwrap_or(usize::MAX)
        },
        connect_timeout: ms(r.connect_timeout_ms, config::default_connect_timeout()),
        first_byte_timeout: ms(
            r.first_byte_timeout_ms,
            config::default_first_byte_timeout(),
        ),
        read_idle_timeout: ms(r.read_idle_timeout_ms, config::default_read_idle_timeout()),
        pool_idle_timeout: config::default_pool_idle_timeout(),
        non_retention: r.non_retention.clone(),
        stream_options: r.stream_options,
        pass_organization_headers: r.pass_organization_headers,
        region: r.region.clone(),
        baa: r.baa,
    };
    super::upstreams::build(&c, r.credential.clone().map(Secret::new)).map_err(err)
}

impl Routing {
    pub fn empty() -> Self {
        Self::default()
    }

    /// Routing built from a snapshot's records (keys and unknown kinds are ignored).
    pub fn from_records(records: Vec<Record>) -> Result<Self, String> {
        Self::empty().apply(records, &[])
    }

    /// A new routing with `upserts` applied and `deletes` removed, validated as a whole;
    /// `self` is untouched.
    pub fn apply(&self, upserts: Vec<Record>, deletes: &[Tombstone]) -> Result<Self, String> {
        let mut upstream_recs: BTreeMap<String, UpstreamRecord> = self
            .upstreams
            .iter()
            .map(|(id, (r, _))| (id.clone(), r.clone()))
            .collect();
        let mut routes = self.routes.clone();
        let mut policies = self.policies.clone();
        for r in upserts {
            match r {
                Record::Upstream(u) => {
                    upstream_recs.insert(u.id.clone(), u);
                }
                Record::Route(rt) => {
                    routes.insert(rt.id.clone(), rt);
                }
                Record::Policy(p) => {
                    policies.insert(p.id.clone(), p);
                }
                Record::Key(_) | Record::Unknown { .. } => {}
            }
        }
        for t in deletes {
            match t.kind {
                kinds::UPSTREAM => {
                    upstream_recs.remove(&t.id);
                }
                kinds::ROUTE => {
                    routes.remove(&t.id);
                }
                kinds::POLICY => {
                    policies.remove(&t.id);
                }
                _ => {}
            }
        }

        // Upstreams: reuse what did not change, build the rest.
        let mut upstreams = BTreeMap::new();
        // (tenant, environment) → name → upstream
        let mut by_env: HashMap<(String, Environment), HashMap<String, Arc<Upstream>>> =
            HashMap::new();
        for (id, rec) in upstream_recs {
            let env = environment("upstream", &id, &rec.environment)?;
            let built = match self.upstreams.get(&id) {
                Some((old, up)) if *old == rec => Arc::clone(up),
                _ => build_upstream(&rec)?,
            };
            let names = by_env.entry((rec.tenant_id.clone(), env)).or_default();
            if names.insert(rec.name.clone(), Arc::clone(&built)).is_some() {
                return Err(format!(
                    "upstream {id:?}: name {:?} is used twice in {}/{}",
                    rec.name, rec.tenant_id, rec.environment
                ));
            }
            upstreams.insert(id, (rec, built));
        }

        // Routes, grouped by environment.
        type EnvRouteList = Vec<(Option<String>, Option<String>, Vec<Target>)>;
        let mut env_routes: HashMap<(String, Environment), EnvRouteList> = HashMap::new();
        for (id, r) in &routes {
            let env = environment("route", id, &r.environment)?;
            if r.model.is_some() == r.prefix.is_some() {
                return Err(format!(
                    "route {id:?}: needs exactly one of model and prefix"
                ));
            }
            if r.targets.is_empty() {
                return Err(format!("route {id:?}: has no targets"));
            }
            let names = by_env.get(&(r.tenant_id.clone(), env));
            let mut targets = Vec::with_capacity(r.targets.len());
            for t in &r.targets {
                let up = names.and_then(|n| n.get(&t.upstream)).ok_or_else(|| {
                    format!(
                        "route {id:?}: upstream {:?} does not exist in {}/{}",
                        t.upstream, r.tenant_id, r.environment
                    )
                })?;
                targets.push(Target {
                    upstream: Arc::clone(up),
                    model: t.model.clone(),
                });
            }
            env_routes
                .entry((r.tenant_id.clone(), env))
                .or_default()
                .push((r.model.clone(), r.prefix.clone(), targets));
        }

        let mut env_policies: HashMap<(String, Environment), Policy> = HashMap::new();
        for (id, p) in &policies {
            let env = environment("policy", id, &p.environment)?;
            env_policies.insert(
                (p.tenant_id.clone(), env),
                Policy {
                    zero_retention: p.zero_retention,
                    region: p.region.clone(),
                    hipaa: p.hipaa,
                },
            );
        }

        // Every environment that has upstreams, routes or a policy.
        let mut envs: FxHashMap<Arc<str>, [Option<Arc<EnvRoutes>>; 3]> = FxHashMap::default();
        let mut keys: Vec<(String, Environment)> = by_env.keys().cloned().collect();
        keys.extend(env_routes.keys().cloned());
        keys.extend(env_policies.keys().cloned());
        keys.sort_by(|a, b| (&a.0, env_index(a.1)).cmp(&(&b.0, env_index(b.1))));
        keys.dedup();
        for key in keys {
            let ups: Vec<Arc<Upstream>> = by_env
                .get(&key)
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            let table = RouteTable::from_parts(ups, env_routes.remove(&key).unwrap_or_default());
            let policy = env_policies.remove(&key).unwrap_or_default();
            envs.entry(Arc::from(key.0.as_str())).or_default()[env_index(key.1)] =
                Some(Arc::new(EnvRoutes { table, policy }));
        }
        let all = upstreams.values().map(|(_, u)| Arc::clone(u)).collect();
        Ok(Self {
            generation: next_generation(),
            upstreams,
            routes,
            policies,
            envs,
            all,
        })
    }

    /// The routing of one tenant environment, if it has any.
    pub fn env(&self, tenant_id: &str, environment: Environment) -> Option<&Arc<EnvRoutes>> {
        self.envs.get(tenant_id)?[env_index(environment)].as_ref()
    }

    /// Every upstream of every environment.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.all
    }

    /// Every record, for sealing to disk with the key table.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        self.upstreams
            .values()
            .map(|(r, _)| Record::Upstream(r.clone()))
            .chain(self.routes.values().cloned().map(Record::Route))
            .chain(self.policies.values().cloned().map(Record::Policy))
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty() && self.routes.is_empty() && self.policies.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigw_wire::RouteTargetRecord;

    fn upstream(tenant: &str, env: &str, name: &str, port: u16) -> Record {
        Record::Upstream(UpstreamRecord {
            id: format!("{tenant}/{env}/{name}"),
            tenant_id: tenant.into(),
            environment: env.into(),
            name: name.into(),
            provider: "openai".into(),
            base_url: format!("http://127.0.0.1:{port}"),
            credential: Some(format!("sk-{name}")),
            region: "us".into(),
            ..Default::default()
        })
    }

    fn route(tenant: &str, env: &str, name: &str, prefix: &str, to: &[&str]) -> Record {
        Record::Route(RouteRecord {
            id: format!("{tenant}/{env}/{name}"),
            tenant_id: tenant.into(),
            environment: env.into(),
            model: None,
            prefix: Some(prefix.into()),
            targets: to
                .iter()
                .map(|u| RouteTargetRecord {
                    upstream: (*u).into(),
                    model: None,
                })
                .collect(),
        })
    }

    fn names(t: Result<Targets<'_>, NoTarget>) -> Vec<String> {
        t.map(|v| v.iter().map(|t| t.upstream.name.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn environments_route_separately_and_policies_filter() {
        let r = Routing::from_records(vec![
            upstream("t", "production", "a", 1),
            upstream("t", "staging", "a", 2),
            route("t", "production", "all", "", &["a"]),
            route("t", "staging", "all", "", &["a"]),
        ])
        .expect("valid");
        let prod = r.env("t", Environment::Production).expect("prod");
        let stg = r.env("t", Environment::Staging).expect("staging");
        assert_eq!(
            names(prod.lookup("gpt-4o", ProviderKind::Openai)),
            ["t/production/a"]
        );
        assert_eq!(
            names(stg.lookup("gpt-4o", ProviderKind::Openai)),
            ["t/staging/a"]
        );
        assert!(r.env("t", Environment::Development).is_none());
        assert!(r.env("other", Environment::Production).is_none());
        let up = &prod.lookup("x", ProviderKind::Openai).expect("routes")[0].upstream;
        assert_eq!(up.credential.as_ref().map(Secret::expose), Some("sk-a"));

        // A zero-retention policy refuses an upstream that cannot be told not to retain.
        let with_policy = r
            .apply(
                vec![Record::Policy(PolicyRecord {
                    id: "t/production".into(),
                    tenant_id: "t".into(),
                    environment: "production".into(),
                    zero_retention: true,
                    region: String::new(),
                    hipaa: false,
                })],
                &[],
            )
            .expect("valid");
        let prod2 = with_policy.env("t", Environment::Production).expect("prod");
        assert_eq!(
            prod2.lookup("gpt-4o", ProviderKind::Openai).err(),
            Some(NoTarget::Policy("zero retention"))
        );
        // Unchanged upstreams keep their identity (their pools survive); the generation moves.
        assert_eq!(
            prod2.table.upstreams()[0].uid,
            prod.table.upstreams()[0].uid
        );
        assert_ne!(with_policy.generation, r.generation);
    }

    #[test]
    fn inconsistent_revisions_are_refused_whole() {
        let e = Routing::from_records(vec![route("t", "production", "r", "", &["missing"])])
            .expect_err("unknown upstream");
        assert!(e.contains("\"missing\" does not exist"), "{e}");
        let ok = Routing::from_records(vec![
            upstream("t", "production", "a", 1),
            route("t", "production", "r", "", &["a"]),
        ])
        .expect("valid");
        let e = ok
            .apply(
                vec![],
                &[Tombstone {
                    kind: kinds::UPSTREAM,
                    id: "t/production/a".into(),
                }],
            )
            .expect_err("route left dangling");
        assert!(e.contains("does not exist"), "{e}");
        let mut bad = upstream("t", "production", "b", 1);
        if let Record::Upstream(u) = &mut bad {
            u.base_url = "ftp://x".into();
        }
        assert!(ok.apply(vec![bad], &[]).is_err());
        // Deleting the route first, then the upstream, is fine.
        let gone = ok
            .apply(
                vec![],
                &[
                    Tombstone {
                        kind: kinds::ROUTE,
                        id: "t/production/r".into(),
                    },
                    Tombstone {
                        kind: kinds::UPSTREAM,
                        id: "t/production/a".into(),
                    },
                ],
            )
            .expect("valid");
        assert!(gone.is_empty());
        assert_eq!(ok.records().count(), 2);
    }
}
