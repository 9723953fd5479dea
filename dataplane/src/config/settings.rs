//! Settings a running node can change without a restart (SIGHUP), and how workers pick
//! them up without taking a lock on the hot path.
//!
//! The reloader validates the new file once, publishes an immutable [`Settings`] and bumps
//! a generation counter. Each worker checks the counter (one atomic load of a read-mostly
//! cache line) at the start of every request and swaps its local copy when it moved, so
//! requests already in flight finish under the settings they started with.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::config::routing::{EnvRoutes, RouteTable};
use crate::config::Config;
use crate::h1::Limits;

/// What a request is served under.
#[derive(Debug, Clone)]
pub struct Settings {
    pub generation: u64,
    /// The file's routing (every request's, when the node has no control plane).
    pub routes: Arc<EnvRoutes>,
    pub body_budget_bytes: u64,
    pub limits: Limits,
    pub head_read_timeout: Duration,
    pub keepalive_idle_timeout: Duration,
    pub body_read_idle_timeout: Duration,
    pub body_read_total_timeout: Duration,
    pub max_body_reads: usize,
    pub max_body_reads_per_client: usize,
    pub write_timeout: Duration,
    pub access_log: bool,
}

impl Settings {
    /// Builds from a validated config.
    pub fn build(c: &Config, generation: u64) -> Result<Self, String> {
        Ok(Self {
            generation,
            routes: Arc::new(EnvRoutes {
                table: RouteTable::build(c)?,
                policy: Default::default(),
                broken_policy: None,
            }),
            body_budget_bytes: c.body_budget_bytes,
            limits: c.h1_limits(),
            head_read_timeout: c.timeouts.head_read,
            keepalive_idle_timeout: c.timeouts.keepalive_idle,
            body_read_idle_timeout: c.timeouts.body_read_idle,
            body_read_total_timeout: c.timeouts.body_read_total,
            max_body_reads: c.limits.max_body_reads,
            max_body_reads_per_client: c.limits.max_body_reads_per_client,
            write_timeout: c.timeouts.write,
            access_log: c.log.access,
        })
    }
}

/// The published settings, shared by all workers.
#[derive(Debug)]
pub struct SharedSettings {
    generation: AtomicU64,
    current: ArcSwap<Settings>,
}

impl SharedSettings {
    pub fn new(c: &Config) -> Result<Self, String> {
        Ok(Self {
            generation: AtomicU64::new(1),
            current: ArcSwap::from_pointee(Settings::build(c, 1)?),
        })
    }

    /// Builds and publishes settings from a validated config; returns the new generation.
    /// A config that fails to build is refused and the current one stays.
    pub fn publish(&self, c: &Config) -> Result<u64, String> {
        let generation = self.generation.load(Ordering::Acquire) + 1;
        let settings = Settings::build(c, generation)?;
        self.current.store(Arc::new(settings));
        self.generation.store(generation, Ordering::Release);
        Ok(generation)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn load(&self) -> Arc<Settings> {
        self.current.load_full()
    }
}

/// A worker's view: a local copy refreshed when the shared generation moves.
#[derive(Debug)]
pub struct LocalSettings {
    shared: Arc<SharedSettings>,
    local: RefCell<Rc<Settings>>,
}

impl LocalSettings {
    pub fn new(shared: Arc<SharedSettings>) -> Self {
        let local = RefCell::new(Rc::new((*shared.load()).clone()));
        Self { shared, local }
    }

    /// The settings for the next request.
    pub fn current(&self) -> Rc<Settings> {
        let generation = self.shared.generation();
        let mut local = self.local.borrow_mut();
        if local.generation != generation {
            *local = Rc::new((*self.shared.load()).clone());
        }
        Rc::clone(&local)
    }
}
