//! The routing table: which upstreams serve a model, in failover order.
//!
//! Built once per configuration and shared read-only by every worker. Exact model names win;
//! otherwise the longest matching prefix; a route's targets are filtered to the upstreams
//! that speak the request's API (no translation between API families). A route whose
//! upstreams could not be built stays in the table, broken, so requests for its models get
//! a clear refusal instead of going to another route.

use std::collections::HashMap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::config::routing::NoTarget;
use crate::config::{Config, ProviderKind};
use crate::upstream::Upstream;

/// One place a request may go.
#[derive(Debug, Clone)]
pub struct Target {
    pub upstream: Arc<Upstream>,
    /// Send this model name instead of the client's.
    pub model: Option<String>,
}

/// What a route leads to: its usable targets, or why it has none.
#[derive(Debug, Clone)]
pub enum RouteTo {
    Targets(Vec<Target>),
    /// The route's record, or every upstream it names, could not be applied.
    Broken(Arc<str>),
}

#[derive(Debug, Default)]
pub struct RouteTable {
    upstreams: Vec<Arc<Upstream>>,
    /// Read-only once built (nothing a client sends is inserted), so a fast non-keyed hash
    /// is enough.
    exact: FxHashMap<String, RouteTo>,
    /// Longest prefix first.
    prefixes: Vec<(String, RouteTo)>,
}

/// A route's targets for one API family, in failover order: held inline (routes rarely
/// have more than a few), so a lookup does not allocate.
pub type Targets<'a> = smallvec::SmallVec<[&'a Target; 4]>;

impl RouteTable {
    /// Builds from a validated config. Fails only on what validation cannot know in
    /// advance (a CA file that does not parse, a TLS name that is not valid).
    pub fn build(c: &Config) -> Result<Self, String> {
        let mut upstreams = Vec::with_capacity(c.upstreams.len());
        for u in &c.upstreams {
            upstreams.push(
                super::upstreams::from_file(u)
                    .map_err(|e| format!("upstream {:?}: {e}", u.name))?,
            );
        }
        let by_name: HashMap<&str, &Arc<Upstream>> = c
            .upstreams
            .iter()
            .zip(&upstreams)
            .map(|(c, u)| (c.name.as_str(), u))
            .collect();
        let routes = c.routes.iter().map(|r| {
            let targets = r
                .targets
                .iter()
                .filter_map(|t| {
                    by_name.get(t.upstream.as_str()).map(|u| Target {
                        upstream: Arc::clone(u),
                        model: t.model.clone(),
                    })
                })
                .collect();
            (r.model.clone(), r.prefix.clone(), RouteTo::Targets(targets))
        });
        let routes: Vec<_> = routes.collect();
        Ok(Self::from_parts(upstreams, routes))
    }

    /// A table over `upstreams` with routes given as (exact model, prefix, where it leads);
    /// a route with neither is ignored, and the first route for an exact name wins.
    pub fn from_parts(
        upstreams: Vec<Arc<Upstream>>,
        routes: impl IntoIterator<Item = (Option<String>, Option<String>, RouteTo)>,
    ) -> Self {
        let mut exact = FxHashMap::default();
        let mut prefixes = Vec::new();
        for (model, prefix, to) in routes {
            match (model, prefix) {
                (Some(m), _) => {
                    exact.entry(m).or_insert(to);
                }
                (None, Some(p)) => prefixes.push((p, to)),
                (None, None) => {}
            }
        }
        prefixes.sort_by(|(a, _), (b, _)| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        Self {
            upstreams,
            exact,
            prefixes,
        }
    }

    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Targets for `model` that speak `kind`, in failover order.
    pub fn lookup(&self, model: &str, kind: ProviderKind) -> Result<Targets<'_>, NoTarget> {
        let route = self.exact.get(model).or_else(|| {
            self.prefixes
                .iter()
                .find(|(p, _)| model.starts_with(p.as_str()))
                .map(|(_, t)| t)
        });
        match route {
            None => Err(NoTarget::NoRoute),
            Some(RouteTo::Broken(why)) => Err(NoTarget::Unusable(Arc::clone(why))),
            Some(RouteTo::Targets(t)) => {
                let of_kind: Targets<'_> = t.iter().filter(|t| t.upstream.kind == kind).collect();
                if of_kind.is_empty() {
                    Err(NoTarget::NoRoute)
                } else {
                    Ok(of_kind)
                }
            }
        }
    }

    /// Model names that route somewhere, for `GET /v1/models`.
    pub fn model_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .exact
            .iter()
            .filter(|(_, to)| matches!(to, RouteTo::Targets(_)))
            .map(|(m, _)| m.as_str())
            .collect();
        names.sort_unstable();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable {
        let c = Config::parse(
            r#"
            [[upstreams]]
            name = "oa"
            kind = "openai"
            base_url = "http://127.0.0.1:1"
            [[upstreams]]
            name = "an"
            kind = "anthropic"
            base_url = "http://127.0.0.1:2"
            [[upstreams]]
            name = "oa2"
            kind = "openai"
            base_url = "http://127.0.0.1:3"
            [[routes]]
            model = "gpt-4o"
            targets = [{ upstream = "oa2", model = "dep-4o" }, { upstream = "oa" }]
            [[routes]]
            prefix = "gpt-"
            targets = [{ upstream = "oa" }]
            [[routes]]
            prefix = "gpt-4"
            targets = [{ upstream = "oa2" }]
            [[routes]]
            prefix = ""
            targets = [{ upstream = "an" }, { upstream = "oa" }]
            "#,
            "t",
        )
        .expect("valid");
        RouteTable::build(&c).expect("builds")
    }

    fn names(t: Result<Targets<'_>, NoTarget>) -> Vec<String> {
        t.map(|t| t.iter().map(|t| t.upstream.name.clone()).collect())
            .unwrap_or_default()
    }

    #[test]
    fn exact_then_longest_prefix_then_family() {
        let t = table();
        assert_eq!(
            names(t.lookup("gpt-4o", ProviderKind::Openai)),
            ["oa2", "oa"]
        );
        assert_eq!(
            t.lookup("gpt-4o", ProviderKind::Openai).expect("routes")[0]
                .model
                .as_deref(),
            Some("dep-4o")
        );
        assert_eq!(
            names(t.lookup("gpt-4-turbo", ProviderKind::Openai)),
            ["oa2"]
        );
        assert_eq!(names(t.lookup("gpt-3.5", ProviderKind::Openai)), ["oa"]);
        assert_eq!(names(t.lookup("claude-3", ProviderKind::Anthropic)), ["an"]);
        assert_eq!(names(t.lookup("claude-3", ProviderKind::Openai)), ["oa"]);
        assert_eq!(
            t.lookup("gpt-4o", ProviderKind::Anthropic).err(),
            Some(NoTarget::NoRoute)
        );
        assert_eq!(t.model_names(), ["gpt-4o"]);
    }
}
