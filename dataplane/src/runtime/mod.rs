//! Building a worker's runtime: io_uring with `COOP_TASKRUN | SINGLE_ISSUER` where the
//! kernel has them (5.19 / 6.0), else a plain ring, else epoll.
//!
//! A ring built with flags the kernel lacks fails instead of degrading, so each step is
//! probed in turn. The two flags save about a third of the per-request kernel time here: the
//! kernel stops interrupting the worker to run task work, and knows one thread submits.

pub mod alloc;
pub mod buffers;
pub mod deadline;
pub mod shutdown;

use std::fmt;

use monoio::time::TimeDriver;
use monoio::{FusionRuntime, IoUringDriver, LegacyDriver, RuntimeBuilder};

/// Which I/O driver workers use (`server.driver` in the configuration file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriverChoice {
    Auto,
    IoUring,
    Epoll,
}

/// The runtime type every worker runs on.
pub type WorkerRuntime = FusionRuntime<TimeDriver<IoUringDriver>, TimeDriver<LegacyDriver>>;

/// Which I/O driver a worker got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// io_uring with COOP_TASKRUN and SINGLE_ISSUER.
    IoUringTuned,
    IoUring,
    Epoll,
}

impl DriverKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::IoUringTuned => "io_uring(coop_taskrun,single_issuer)",
            Self::IoUring => "io_uring",
            Self::Epoll => "epoll",
        }
    }
}

impl fmt::Display for DriverKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

const RING_ENTRIES: u32 = 1024;

/// Whether the environment forces the epoll driver (monoio's own switch, honoured here too).
/// Seconds since the Unix epoch, UTC (0 on a clock set before it), on the kernel's coarse
/// clock (at most one clock tick behind, read without the TSC): for minutes, days and
/// months of rate limits and spend caps, read on every request.
pub fn unix_seconds() -> u64 {
    deadline::coarse_unix_secs()
}

pub fn legacy_forced_by_env() -> bool {
    std::env::var("MONOIO_FORCE_LEGACY_DRIVER").is_ok_and(|v| v == "1" || v == "true")
}

/// Builds the runtime for the calling thread. The ring must be built on the thread that uses
/// it (SINGLE_ISSUER).
pub fn build(choice: DriverChoice) -> std::io::Result<(WorkerRuntime, DriverKind)> {
    let choice = if legacy_forced_by_env() {
        DriverChoice::Epoll
    } else {
        choice
    };
    if choice != DriverChoice::Epoll {
        let mut tuned = io_uring::IoUring::builder();
        tuned.setup_coop_taskrun().setup_single_issuer();
        let attempt = RuntimeBuilder::<IoUringDriver>::new()
            .with_entries(RING_ENTRIES)
            .uring_builder(tuned)
            .enable_timer()
            .build();
        match attempt {
            Ok(rt) => return Ok((rt.into(), DriverKind::IoUringTuned)),
            Err(e) => {
                tracing::debug!(error = %e, "io_uring with COOP_TASKRUN|SINGLE_ISSUER unavailable")
            }
        }
        let attempt = RuntimeBuilder::<IoUringDriver>::new()
            .with_entries(RING_ENTRIES)
            .enable_timer()
            .build();
        match attempt {
            Ok(rt) => return Ok((rt.into(), DriverKind::IoUring)),
            Err(e) if choice == DriverChoice::IoUring => return Err(e),
            Err(e) => tracing::warn!(error = %e, "io_uring unavailable, falling back to epoll"),
        }
    }
    let rt = RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()?;
    Ok((rt.into(), DriverKind::Epoll))
}

/// A single-threaded epoll runtime with timers, for unit tests that need real sockets or
/// time (every build of the kernel has it, unlike the io_uring flags probed above).
#[cfg(test)]
pub(crate) fn for_tests() -> monoio::Runtime<TimeDriver<LegacyDriver>> {
    RuntimeBuilder::<LegacyDriver>::new()
        .enable_timer()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}
