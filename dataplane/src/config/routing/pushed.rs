//! What the control plane pushes besides keys: each tenant environment's upstreams (with
//! their provider credentials), routes and policy. When a node has a control plane, these
//! replace the static routing table of its config file: a request is routed by the
//! environment of the key it presents.
//!
//! Built by the control thread and shared read-only by every worker with the key table.
//! Each record is checked on its own, with the rules the control plane applied before it
//! committed it ([`aigw_wire::rules`]): a record this node cannot apply (an upstream whose
//! TLS setup fails, say) is kept, reported ([`Routing::problems`]) and made unusable — the
//! routes naming it lose it as a target, a route left with none answers that its route is
//! unusable, a broken policy stops its environment's routing rather than being ignored —
//! and it never holds back any other record, tenant or key. An upstream whose record did not
//! change keeps its `Arc` across revisions, so workers' connection pools to it survive
//! unrelated edits.

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use aigw_wire::keys::Environment;
use aigw_wire::messages::kinds;
use aigw_wire::{PolicyRecord, Record, RouteRecord, Tombstone, UpstreamRecord};

use crate::config::routing::{EnvRoutes, Policy, RouteTable, RouteTo, Target};
use crate::config::{self, UpstreamConfig};
use crate::upstream::{Secret, Upstream};

/// An upstream as built from its record, or why it could not be.
type Built = Result<Arc<Upstream>, Arc<str>>;

/// A route as a table holds it: (exact model, prefix, where it leads).
type RouteEntry = (Option<String>, Option<String>, RouteTo);

/// Records this node holds and cannot apply, by (kind, id), with why.
pub(crate) type Problems = BTreeMap<(u64, String), String>;

/// Every environment's routing at one revision.
#[derive(Debug, Default)]
pub struct Routing {
    /// Changes whenever the routing does (not on key-only revisions).
    pub generation: u64,
    /// Every upstream record held, and what it built into (or why it did not).
    upstreams: BTreeMap<String, (UpstreamRecord, Built)>,
    routes: BTreeMap<String, RouteRecord>,
    policies: BTreeMap<String, PolicyRecord>,
    /// Tenants' own guardrail patterns as compiled, by policy id (reused while unchanged).
    compiled: HashMap<String, (Vec<String>, crate::pii::TenantPatterns)>,
    /// Spend caps, prices and sub-accounts' rate limits.
    pub spend: Arc<crate::config::spend::Spend>,
    envs: FxHashMap<Arc<str>, [Option<Arc<EnvRoutes>>; 3]>,
    all: Vec<Arc<Upstream>>,
    problems: Problems,
}

/// Whether a record belongs here rather than in the key table.
pub fn is_routing_kind(kind: u64) -> bool {
    matches!(
        kind,
        kinds::UPSTREAM | kinds::ROUTE | kinds::POLICY | kinds::CAP | kinds::PRICE | kinds::LIMIT
    )
}

fn env_index(e: Environment) -> usize {
    match e {
        Environment::Production => 0,
        Environment::Staging => 1,
        Environment::Development => 2,
    }
}

fn next_generation() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

type EnvKey = (String, Environment);

fn build_upstream(r: &UpstreamRecord) -> Result<Arc<Upstream>, String> {
    let checked = aigw_wire::rules::check_upstream(r).map_err(|e| e.to_string())?;
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
        credential_file: None,
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
        non_retention: Some(r.non_retention.clone()),
        stream_options: r.stream_options,
        pass_organization_headers: r.pass_organization_headers,
        region: r.region.clone(),
        baa: r.baa,
    };
    super::upstreams::build(&c, r.credential.clone().map(Secret::new))
}

impl Routing {
    pub fn empty() -> Self {
        Self::default()
    }

    /// Routing built from a snapshot's records (keys and unknown kinds are ignored).
    pub fn from_records(records: Vec<Record>) -> Self {
        Self::empty().apply(records, &[])
    }

    /// A new routing with `upserts` applied and `deletes` removed; `self` is untouched.
    /// Every record that can be applied is; the others are in [`Self::problems`].
    pub fn apply(&self, upserts: Vec<Record>, deletes: &[Tombstone]) -> Self {
        let mut upstream_recs: BTreeMap<String, UpstreamRecord> = self
            .upstreams
            .iter()
            .map(|(id, (r, _))| (id.clone(), r.clone()))
            .collect();
        let mut routes = self.routes.clone();
        let mut policies = self.policies.clone();
        let mut caps = self.spend.cap_records().clone();
        let mut prices = self.spend.price_records().clone();
        let mut limits = self.spend.limit_records().clone();
        let mut spend_changed = false;
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
                Record::Cap(c) => {
                    spend_changed = true;
                    caps.insert(c.id.clone(), c);
                }
                Record::Price(p) => {
                    spend_changed = true;
                    prices.insert(p.id.clone(), p);
                }
                Record::Limit(l) => {
                    spend_changed = true;
                    limits.insert(l.id.clone(), l);
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
                kinds::CAP => spend_changed |= caps.remove(&t.id).is_some(),
                kinds::PRICE => spend_changed |= prices.remove(&t.id).is_some(),
                kinds::LIMIT => spend_changed |= limits.remove(&t.id).is_some(),
                _ => {}
            }
        }
        let mut problems = Problems::new();

        // Upstreams: reuse what did not change, build the rest.
        let mut upstreams = BTreeMap::new();
        // (tenant, environment) → name → the upstream, or why it is unusable.
        let mut by_env: HashMap<EnvKey, HashMap<String, Built>> = HashMap::new();
        for (id, rec) in upstream_recs {
            let built = match self.upstreams.get(&id) {
                Some((old, b)) if *old == rec => b.clone(),
                _ => build_upstream(&rec).map_err(Arc::from),
            };
            if let Err(why) = &built {
                problems.insert((kinds::UPSTREAM, id.clone()), why.to_string());
            }
            if let Some(env) = Environment::from_name(&rec.environment) {
                let names = by_env.entry((rec.tenant_id.clone(), env)).or_default();
                if names.contains_key(&rec.name) {
                    let why = format!(
                        "name {:?} is used twice in {}/{}",
                        rec.name, rec.tenant_id, rec.environment
                    );
                    problems.insert((kinds::UPSTREAM, id.clone()), why.clone());
                    names.insert(rec.name.clone(), Err(Arc::from(why)));
                } else {
                    names.insert(rec.name.clone(), built.clone());
                }
            }
            upstreams.insert(id, (rec, built));
        }

        // Routes, grouped by environment.
        let mut env_routes: HashMap<EnvKey, Vec<RouteEntry>> = HashMap::new();
        for (id, r) in &routes {
            let env = match aigw_wire::rules::check_route(r) {
                Ok(env) => env,
                Err(e) => {
                    // Not even its model or environment is known: it routes nothing.
                    problems.insert((kinds::ROUTE, id.clone()), e.to_string());
                    continue;
                }
            };
            let names = by_env.get(&(r.tenant_id.clone(), env));
            let mut targets = Vec::with_capacity(r.targets.len());
            let mut unusable = Vec::new();
            for t in &r.targets {
                match names.and_then(|n| n.get(&t.upstream)) {
                    Some(Ok(up)) => targets.push(Target {
                        upstream: Arc::clone(up),
                        model: t.model.clone(),
                    }),
                    Some(Err(why)) => unusable.push(format!("upstream {}: {why}", t.upstream)),
                    None => unusable.push(format!(
                        "upstream {} does not exist in {}/{}",
                        t.upstream, r.tenant_id, r.environment
                    )),
                }
            }
            if !unusable.is_empty() {
                problems.insert((kinds::ROUTE, id.clone()), unusable.join("; "));
            }
            let to = if targets.is_empty() {
                RouteTo::Broken(Arc::from(unusable.join("; ")))
            } else {
                RouteTo::Targets(targets)
            };
            env_routes
                .entry((r.tenant_id.clone(), env))
                .or_default()
                .push((r.model.clone(), r.prefix.clone(), to));
        }

        let mut env_policies: HashMap<EnvKey, Result<Policy, Arc<str>>> = HashMap::new();
        let mut compiled = HashMap::new();
        for (id, p) in &policies {
            let Some(env) = Environment::from_name(&p.environment) else {
                problems.insert(
                    (kinds::POLICY, id.clone()),
                    format!("unknown environment {:?}", p.environment),
                );
                continue;
            };
            let patterns = aigw_wire::rules::check_policy(p)
                .map_err(|e| e.to_string())
                .and_then(|_| self.patterns_of(id, &p.patterns, &mut compiled));
            let policy = match patterns {
                Ok(patterns) => Ok(Policy {
                    zero_retention: p.zero_retention,
                    region: p.region.clone(),
                    hipaa: p.hipaa,
                    guardrails: crate::config::routing::Guardrails::from_records(&p.guardrails)
                        .fail_open(p.guardrails_fail_open),
                    patterns,
                }),
                Err(e) => {
                    problems.insert((kinds::POLICY, id.clone()), e.clone());
                    Err(Arc::from(format!("its policy cannot be applied: {e}")))
                }
            };
            env_policies.insert((p.tenant_id.clone(), env), policy);
        }

        // Every environment that has upstreams, routes or a policy.
        let mut envs: FxHashMap<Arc<str>, [Option<Arc<EnvRoutes>>; 3]> = FxHashMap::default();
        let mut keys: Vec<EnvKey> = by_env.keys().cloned().collect();
        keys.extend(env_routes.keys().cloned());
        keys.extend(env_policies.keys().cloned());
        keys.sort_by(|a, b| (&a.0, env_index(a.1)).cmp(&(&b.0, env_index(b.1))));
        keys.dedup();
        for key in keys {
            let ups: Vec<Arc<Upstream>> = by_env
                .get(&key)
                .map(|m| {
                    m.values()
                        .filter_map(|u| u.as_ref().ok())
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            let table = RouteTable::from_parts(ups, env_routes.remove(&key).unwrap_or_default());
            let (policy, broken_policy) = match env_policies.remove(&key) {
                // An environment the tenant set no policy for requires zero retention.
                None => (Policy::unset(), None),
                Some(Ok(p)) => (p, None),
                Some(Err(why)) => (Policy::default(), Some(why)),
            };
            envs.entry(Arc::from(key.0.as_str())).or_default()[env_index(key.1)] =
                Some(Arc::new(EnvRoutes {
                    table,
                    policy,
                    broken_policy,
                }));
        }
        let all = upstreams
            .values()
            .filter_map(|(_, u)| u.as_ref().ok())
            .cloned()
            .collect();
        let spend = if spend_changed {
            Arc::new(crate::config::spend::Spend::new(caps, prices, limits))
        } else {
            Arc::clone(&self.spend)
        };
        Self {
            generation: next_generation(),
            upstreams,
            routes,
            policies,
            compiled,
            spend,
            envs,
            all,
            problems,
        }
    }

    /// A policy's own patterns compiled (the previous revision's, when unchanged): this runs
    /// on the control thread, never on a worker. The error names the pattern.
    fn patterns_of(
        &self,
        id: &str,
        patterns: &[String],
        compiled: &mut HashMap<String, (Vec<String>, crate::pii::TenantPatterns)>,
    ) -> Result<Option<crate::pii::TenantPatterns>, String> {
        if patterns.is_empty() {
            return Ok(None);
        }
        let t = match self.compiled.get(id).filter(|(src, _)| src == patterns) {
            Some((_, t)) => t.clone(),
            None => crate::pii::TenantPatterns::compile(patterns)
                .map_err(|e| format!("patterns: {e}"))?,
        };
        compiled.insert(id.to_string(), (patterns.to_vec(), t.clone()));
        Ok(Some(t))
    }

    /// The routing of one tenant environment, if it has any.
    pub fn env(&self, tenant_id: &str, environment: Environment) -> Option<&Arc<EnvRoutes>> {
        self.envs.get(tenant_id)?[env_index(environment)].as_ref()
    }

    /// Every usable upstream of every environment.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.all
    }

    /// The records held that could not be applied, and why.
    pub fn problems(&self) -> &Problems {
        &self.problems
    }

    /// Every record held, usable or not, for sealing to disk with the key table.
    pub fn records(&self) -> impl Iterator<Item = Record> + '_ {
        self.upstreams
            .values()
            .map(|(r, _)| Record::Upstream(r.clone()))
            .chain(self.routes.values().cloned().map(Record::Route))
            .chain(self.policies.values().cloned().map(Record::Policy))
            .chain(self.spend.records())
    }

    pub fn is_empty(&self) -> bool {
        self.upstreams.is_empty()
            && self.routes.is_empty()
            && self.policies.is_empty()
            && self.spend.records().next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::routing::{NoTarget, Targets};
    use crate::config::ProviderKind;
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
            non_retention: aigw_wire::NonRetention::AccountAgreement {},
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
        ]);
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

        // With no policy set, zero retention holds: an upstream that cannot be told not to
        // retain is refused.
        let mut retaining = upstream("t", "production", "a", 1);
        if let Record::Upstream(u) = &mut retaining {
            u.non_retention = aigw_wire::NonRetention::None {};
        }
        let by_default = r.apply(vec![retaining], &[]);
        let prod2 = by_default.env("t", Environment::Production).expect("prod");
        assert_eq!(
            prod2.lookup("gpt-4o", ProviderKind::Openai).err(),
            Some(NoTarget::Policy("zero retention"))
        );
        // The tenant's explicit opt-out lets it serve.
        let opted_out = by_default.apply(
            vec![Record::Policy(PolicyRecord {
                id: "t/production".into(),
                tenant_id: "t".into(),
                environment: "production".into(),
                zero_retention: false,
                region: String::new(),
                hipaa: false,
                guardrails: vec![],
                guardrails_fail_open: false,
                patterns: vec![],
            })],
            &[],
        );
        let prod3 = opted_out.env("t", Environment::Production).expect("prod");
        assert_eq!(
            names(prod3.lookup("gpt-4o", ProviderKind::Openai)),
            ["t/production/a"]
        );
        // Unchanged upstreams keep their identity (their pools survive); the generation moves.
        assert_eq!(
            prod3.table.upstreams()[0].uid,
            prod2.table.upstreams()[0].uid
        );
        assert_ne!(opted_out.generation, by_default.generation);
    }

    #[test]
    fn a_record_that_cannot_be_applied_is_isolated_and_reported() {
        let ok = Routing::from_records(vec![
            upstream("t", "production", "a", 1),
            route("t", "production", "r", "", &["a"]),
            upstream("u", "production", "a", 2),
            route("u", "production", "r", "", &["a"]),
        ]);
        assert!(ok.problems().is_empty());
        // Tenant t's upstream turns bad: its route is unusable, with the reason; tenant u
        // routes as before, and the bad record is kept (and sealed) for the next revision.
        let mut bad = upstream("t", "production", "a", 1);
        if let Record::Upstream(u) = &mut bad {
            u.base_url = "https://api..openai.com".into();
        }
        let next = ok.apply(vec![bad], &[]);
        let t = next.env("t", Environment::Production).expect("t");
        match t.lookup("gpt-4o", ProviderKind::Openai) {
            Err(NoTarget::Unusable(why)) => assert!(why.contains("base_url"), "{why}"),
            other => panic!("{:?}", other.map(|t| t.len())),
        }
        let u = next.env("u", Environment::Production).expect("u");
        assert_eq!(
            names(u.lookup("gpt-4o", ProviderKind::Openai)),
            ["u/production/a"]
        );
        let problems: Vec<_> = next.problems().keys().cloned().collect();
        assert_eq!(
            problems,
            [
                (kinds::UPSTREAM, "t/production/a".to_string()),
                (kinds::ROUTE, "t/production/r".to_string())
            ]
        );
        assert_eq!(next.records().count(), 4);
        assert_eq!(next.upstreams().len(), 1, "only usable upstreams get pools");

        // A later revision that fixes the record clears the problems.
        let fixed = next.apply(vec![upstream("t", "production", "a", 3)], &[]);
        assert!(fixed.problems().is_empty());
        assert_eq!(
            names(
                fixed
                    .env("t", Environment::Production)
                    .expect("t")
                    .lookup("x", ProviderKind::Openai)
            ),
            ["t/production/a"]
        );

        // A route naming an upstream that does not exist, a malformed route, and a broken
        // policy (which stops its environment rather than being ignored).
        let dangling = ok.apply(
            vec![route("u", "production", "r2", "x-", &["missing"])],
            &[],
        );
        let u = dangling.env("u", Environment::Production).expect("u");
        assert!(matches!(
            u.lookup("x-1", ProviderKind::Openai),
            Err(NoTarget::Unusable(_))
        ));
        assert_eq!(
            names(u.lookup("gpt", ProviderKind::Openai)),
            ["u/production/a"]
        );
        let policy = Record::Policy(PolicyRecord {
            id: "u/production".into(),
            tenant_id: "u".into(),
            environment: "production".into(),
            zero_retention: false,
            region: "Not A Region".into(),
            hipaa: false,
            guardrails: vec![],
            guardrails_fail_open: false,
            patterns: vec![],
        });
        let stopped = ok.apply(vec![policy], &[]);
        let u = stopped.env("u", Environment::Production).expect("u");
        assert!(matches!(
            u.lookup("gpt", ProviderKind::Openai),
            Err(NoTarget::Unusable(_))
        ));
        assert!(stopped
            .problems()
            .contains_key(&(kinds::POLICY, "u/production".to_string())));
        let t = stopped.env("t", Environment::Production).expect("t");
        assert_eq!(
            names(t.lookup("gpt", ProviderKind::Openai)),
            ["t/production/a"]
        );

        // The tenant's own patterns compile off the workers: one that Hyperscan refuses
        // stops its environment (named in the problems); good ones are compiled once and
        // reused by later revisions that leave them alone.
        let with_patterns = |patterns: Vec<String>| {
            Record::Policy(PolicyRecord {
                id: "u/production".into(),
                tenant_id: "u".into(),
                environment: "production".into(),
                zero_retention: false,
                region: String::new(),
                hipaa: false,
                guardrails: vec![],
                guardrails_fail_open: false,
                patterns,
            })
        };
        let bad = ok.apply(vec![with_patterns(vec!["a{1,100000}".into()])], &[]);
        let problem = &bad.problems()[&(kinds::POLICY, "u/production".to_string())];
        assert!(problem.contains("patterns"), "{problem}");
        assert!(matches!(
            bad.env("u", Environment::Production)
                .expect("u")
                .lookup("gpt", ProviderKind::Openai),
            Err(NoTarget::Unusable(_))
        ));
        let good = ok.apply(vec![with_patterns(vec![r"PROJ-[0-9]{4}".into()])], &[]);
        let compiled = good
            .env("u", Environment::Production)
            .and_then(|u| u.policy.patterns.clone())
            .expect("compiled");
        assert_eq!(compiled.len(), 1);
        let later = good.apply(vec![route("u", "production", "r3", "y-", &["a"])], &[]);
        assert!(
            later.compiled["u/production"].1.same_database(&compiled),
            "reused, not compiled again"
        );

        // Deleting the route first, then the upstream, leaves nothing behind.
        let gone = ok.apply(
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
        );
        assert!(gone.problems().is_empty());
        assert_eq!(gone.records().count(), 2);
    }
}
