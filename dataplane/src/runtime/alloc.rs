//! Allocator housekeeping for idle workers.
//!
//! mimalloc returns freed memory to the system lazily: pages freed by a thread are purged
//! only when that thread next allocates after a short delay. A worker that served a burst
//! of large requests (a 400 KB prompt each) and then only waits — on streams whose clients
//! stopped reading, say — would keep the bodies' freed pages resident indefinitely. Once a
//! second each worker asks the allocator to purge what is due, which costs nothing when
//! there is nothing to give back.

#![allow(unsafe_code)]

use std::time::Duration;

use crate::runtime::shutdown::LocalShutdown;

/// How often an idle worker's freed memory is given back.
const EVERY: Duration = Duration::from_secs(1);

/// Purges this thread's freed allocator pages that are due.
pub fn collect() {
    // SAFETY: `mi_collect` takes no pointers and may be called from any thread at any time;
    // with another global allocator it only tidies mimalloc's (unused) heap of this thread.
    unsafe { libmimalloc_sys::mi_collect(false) }
}

/// Runs [`collect`] every second until `shutdown`.
pub async fn collect_every_second(shutdown: &LocalShutdown) {
    loop {
        monoio::select! {
            _ = monoio::time::sleep(EVERY) => collect(),
            _ = shutdown.wait() => return,
        }
    }
}
