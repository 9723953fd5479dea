//! The process-wide shutdown signal: set once, observed by every worker and connection.

use std::sync::atomic::{AtomicBool, Ordering};

use event_listener::Event;

/// Set by SIGTERM/SIGINT (or a test); workers stop accepting, idle connections close, and
/// in-flight requests finish with `Connection: close` until the drain deadline.
#[derive(Debug, Default)]
pub struct Shutdown {
    triggered: AtomicBool,
    event: Event,
}

impl Shutdown {
    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        self.event.notify(usize::MAX);
    }

    pub fn is_triggered(&self) -> bool {
        self.triggered.load(Ordering::Acquire)
    }

    /// Resolves once [`Shutdown::trigger`] has been called (immediately if it already was).
    pub async fn wait(&self) {
        loop {
            if self.is_triggered() {
                return;
            }
            let listener = self.event.listen();
            // Re-check after registering, or a trigger in between would be missed.
            if self.is_triggered() {
                return;
            }
            listener.await;
        }
    }
}
