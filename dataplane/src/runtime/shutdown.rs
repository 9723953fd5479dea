//! The process-wide shutdown signal: set once, observed by every worker and connection.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

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

    /// Blocks the calling thread for `d`, or until [`Shutdown::trigger`] if sooner; returns
    /// whether it was triggered.
    pub fn sleep(&self, d: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + d;
        loop {
            if self.is_triggered() {
                return true;
            }
            let listener = self.event.listen();
            if self.is_triggered() {
                return true;
            }
            if event_listener::Listener::wait_deadline(listener, deadline).is_none() {
                return self.is_triggered();
            }
        }
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

/// One worker's view of [`Shutdown`]. Its connections wait on it between requests; the
/// process-wide signal takes a lock and allocates per waiter, shared by every core, so
/// instead one task per worker waits there (started by the first local waiter) and wakes
/// the local ones.
#[derive(Debug)]
pub struct LocalShutdown {
    global: Arc<Shutdown>,
    local: Rc<Local>,
}

#[derive(Debug, Default)]
struct Local {
    fired: Cell<bool>,
    relaying: Cell<bool>,
    waiters: RefCell<Waiters>,
}

#[derive(Debug, Default)]
struct Waiters {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

impl LocalShutdown {
    pub fn new(global: Arc<Shutdown>) -> Self {
        Self {
            global,
            local: Rc::default(),
        }
    }

    pub fn is_triggered(&self) -> bool {
        self.global.is_triggered()
    }

    /// Resolves once the process shuts down (immediately if it already does).
    pub fn wait(&self) -> LocalWait<'_> {
        LocalWait {
            shutdown: self,
            slot: None,
        }
    }

    fn start_relay(&self) {
        if self.local.relaying.replace(true) {
            return;
        }
        let global = Arc::clone(&self.global);
        let local = Rc::clone(&self.local);
        monoio::spawn(async move {
            global.wait().await;
            local.fired.set(true);
            let woken: Vec<Waker> = local
                .waiters
                .borrow_mut()
                .slots
                .iter_mut()
                .filter_map(Option::take)
                .collect();
            for w in woken {
                w.wake();
            }
        });
    }
}

/// The future of [`LocalShutdown::wait`].
#[derive(Debug)]
#[must_use = "futures do nothing unless polled"]
pub struct LocalWait<'a> {
    shutdown: &'a LocalShutdown,
    slot: Option<usize>,
}

impl Future for LocalWait<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let local = &self.shutdown.local;
        if local.fired.get() || self.shutdown.global.is_triggered() {
            return Poll::Ready(());
        }
        let replaced = {
            let mut w = local.waiters.borrow_mut();
            match self.slot {
                Some(i) => match &mut w.slots[i] {
                    Some(old) if old.will_wake(cx.waker()) => None,
                    slot => slot.replace(cx.waker().clone()),
                },
                None => {
                    let i = match w.free.pop() {
                        Some(i) => {
                            w.slots[i] = Some(cx.waker().clone());
                            i
                        }
                        None => {
                            w.slots.push(Some(cx.waker().clone()));
                            w.slots.len() - 1
                        }
                    };
                    self.slot = Some(i);
                    None
                }
            }
        };
        drop(replaced);
        self.shutdown.start_relay();
        Poll::Pending
    }
}

impl Drop for LocalWait<'_> {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            let old = {
                let mut w = self.shutdown.local.waiters.borrow_mut();
                w.free.push(i);
                w.slots[i].take()
            };
            drop(old);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_waiters_wake_on_the_process_signal_and_leave_no_slot_behind() {
        let mut rt = crate::runtime::for_tests();
        rt.block_on(async {
            let global = Arc::new(Shutdown::default());
            let local = Rc::new(LocalShutdown::new(Arc::clone(&global)));
            // Waits that end for another reason give their slot back.
            for _ in 0..50 {
                monoio::select! {
                    _ = local.wait() => panic!("not shut down yet"),
                    _ = monoio::time::sleep(std::time::Duration::from_millis(1)) => {}
                }
            }
            assert!(local.local.waiters.borrow().slots.len() <= 1);
            let waiting: Vec<_> = (0..3)
                .map(|_| {
                    let l = Rc::clone(&local);
                    monoio::spawn(async move { l.wait().await })
                })
                .collect();
            monoio::time::sleep(std::time::Duration::from_millis(5)).await;
            std::thread::spawn(move || global.trigger())
                .join()
                .unwrap_or_else(|_| panic!("trigger"));
            for w in waiting {
                w.await;
            }
            assert!(local.is_triggered());
            local.wait().await;
        });
    }
}
