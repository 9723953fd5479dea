//! Coarse deadlines for the socket reads and writes of the request path.
//!
//! Every read and write the gateway makes on a request's path is bounded (client idle and
//! head timeouts, the upstream's first-byte and idle timeouts, the client write timeout),
//! and almost none of them ever runs out. monoio's timer costs each of them a precise clock
//! read (a TSC read, slow under virtualisation), an insertion into its wheel and a removal:
//! about a tenth of the worker's own instructions per proxied request. Here a bounded
//! operation that has to wait takes a slot in its worker's table, stamped from the kernel's
//! coarse clock (no TSC read), and gives it back when done; one sweeper task per worker
//! wakes the operations whose deadline has passed.
//!
//! Precision: a deadline fires after its duration has fully elapsed, never before, and at
//! most one sweep interval plus one coarse clock tick (together under 20 ms) after. The
//! bounds that go through here are configured in seconds to minutes, for which that is
//! immaterial; finer timers (the accept back-off, the drain poll) stay on monoio's.

#![allow(unsafe_code)]

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// How often a worker's sweeper looks for expired deadlines (only while any are pending).
const SWEEP_EVERY: Duration = Duration::from_millis(10);

/// The operation did not finish in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// Milliseconds on the kernel's coarse monotonic clock (the time of the last clock tick:
/// read from the vDSO without touching the TSC). For bounds and ages measured in tens of
/// milliseconds or more; latency figures use `Instant`.
pub fn coarse_now_ms() -> u64 {
    let ts = coarse_clock(libc::CLOCK_MONOTONIC_COARSE);
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Seconds since the Unix epoch on the kernel's coarse wall clock (read like
/// [`coarse_now_ms`]; at most one clock tick behind). For the `Date` header and expiry times,
/// which count whole seconds.
pub fn coarse_unix_secs() -> u64 {
    u64::try_from(coarse_clock(libc::CLOCK_REALTIME_COARSE).tv_sec).unwrap_or(0)
}

/// Reads one of the kernel's coarse clocks.
fn coarse_clock(clock: libc::clockid_t) -> libc::timespec {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the coarse clocks exist on every Linux the
    // gateway runs on (2.6.32+), so the call cannot fail.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts
}

/// The coarse clock's resolution in whole milliseconds, rounded up (one tick: 1 to 10 ms).
fn coarse_resolution_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: as above; clock_getres only writes `ts`.
    let rc = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if rc != 0 {
        return 10;
    }
    (ts.tv_sec as u64 * 1000 + (ts.tv_nsec as u64).div_ceil(1_000_000)).max(1)
}

#[derive(Debug)]
struct Slot {
    /// Coarse milliseconds at or after which the slot fires.
    at: u64,
    waker: Option<Waker>,
    fired: bool,
    live: bool,
}

/// One worker's pending deadlines.
#[derive(Debug)]
struct Table {
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Live, unfired slots.
    pending: usize,
    /// No pending slot fires before this (a lower bound: slots given back are not
    /// subtracted, so a sweep may find nothing to do, never miss something).
    earliest: u64,
    /// Added to every deadline so that the coarse clock's tick cannot make one fire early.
    slack_ms: u64,
    sweeper: Sweeper,
    /// Which runtime on this thread the slots belong to (see [`start`]).
    epoch: u64,
}

#[derive(Debug)]
enum Sweeper {
    /// None started on this thread yet.
    Absent,
    /// Running; waiting for a deadline to be registered when it holds this waker.
    Idle(Option<Waker>),
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::new(Table {
        slots: Vec::new(),
        free: Vec::new(),
        pending: 0,
        earliest: u64::MAX,
        slack_ms: coarse_resolution_ms(),
        sweeper: Sweeper::Absent,
        epoch: 0,
    });
}

/// Starts the calling runtime's sweeper. Call once at the top of a runtime's main future: a
/// runtime that never calls it gets a sweeper at its first deadline, which is enough as long
/// as it is the only runtime its thread ever runs (monoio leaks a finished runtime's tasks,
/// so a sweeper cannot tell that its runtime has gone; this tells it).
pub fn start() {
    let (epoch, stale) = TABLE.with_borrow_mut(|t| {
        t.epoch += 1;
        t.pending = 0;
        t.earliest = u64::MAX;
        t.free.clear();
        let sweeper = std::mem::replace(&mut t.sweeper, Sweeper::Idle(None));
        (t.epoch, (std::mem::take(&mut t.slots), sweeper))
    });
    // The previous runtime's wakers are dropped outside the table's borrow.
    drop(stale);
    monoio::spawn(sweep(epoch));
}

impl Table {
    fn register(&mut self, after: Duration, waker: &Waker) -> (u64, usize) {
        let at = coarse_now_ms()
            .saturating_add(u64::try_from(after.as_millis()).unwrap_or(u64::MAX))
            .saturating_add(self.slack_ms);
        let slot = Slot {
            at,
            waker: Some(waker.clone()),
            fired: false,
            live: true,
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i] = slot;
                i
            }
            None => {
                self.slots.push(slot);
                self.slots.len() - 1
            }
        };
        self.pending += 1;
        self.earliest = self.earliest.min(at);
        match &mut self.sweeper {
            Sweeper::Absent => {
                self.sweeper = Sweeper::Idle(None);
                monoio::spawn(sweep(self.epoch));
            }
            Sweeper::Idle(w) => {
                if let Some(w) = w.take() {
                    w.wake();
                }
            }
        }
        (self.epoch, i)
    }

    /// Gives slot `i` back; returns its waker for the caller to drop outside the borrow.
    fn release(&mut self, epoch: u64, i: usize) -> Option<Waker> {
        if epoch != self.epoch {
            return None;
        }
        let s = &mut self.slots[i];
        if !s.fired {
            self.pending -= 1;
        }
        s.live = false;
        self.free.push(i);
        s.waker.take()
    }

    /// Fires every pending slot due at `now`; returns the wakers to call (outside the
    /// table's borrow: a woken task may register again at once).
    fn expire(&mut self, now: u64, woken: &mut Vec<Waker>) {
        if now < self.earliest {
            return;
        }
        let mut earliest = u64::MAX;
        for s in self.slots.iter_mut().filter(|s| s.live && !s.fired) {
            if s.at <= now {
                s.fired = true;
                self.pending -= 1;
                woken.extend(s.waker.take());
            } else {
                earliest = earliest.min(s.at);
            }
        }
        self.earliest = earliest;
    }
}

/// The runtime's sweeper: sleeps while nothing is pending, else looks every
/// [`SWEEP_EVERY`]. Ends when a newer runtime on its thread has started its own.
async fn sweep(epoch: u64) {
    let mut woken = Vec::new();
    loop {
        std::future::poll_fn(|cx| {
            TABLE.with_borrow_mut(|t| {
                if t.pending > 0 || t.epoch != epoch {
                    Poll::Ready(())
                } else {
                    t.sweeper = Sweeper::Idle(Some(cx.waker().clone()));
                    Poll::Pending
                }
            })
        })
        .await;
        monoio::time::sleep(SWEEP_EVERY).await;
        if TABLE.with_borrow(|t| t.epoch != epoch) {
            return;
        }
        TABLE.with_borrow_mut(|t| t.expire(coarse_now_ms(), &mut woken));
        for w in woken.drain(..) {
            w.wake();
        }
    }
}

pin_project_lite::pin_project! {
    /// `fut`, bounded by a deadline that starts when it first has to wait.
    #[derive(Debug)]
    #[must_use = "futures do nothing unless polled"]
    pub struct Timeout<F> {
        #[pin]
        fut: F,
        after: Duration,
        slot: Option<(u64, usize)>,
    }

    impl<F> PinnedDrop for Timeout<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some((epoch, i)) = *this.project().slot {
                let waker = TABLE.try_with(|t| t.borrow_mut().release(epoch, i));
                drop(waker);
            }
        }
    }
}

/// Bounds `fut` by `after` (counted from its first wait; see the module's precision note).
pub fn timeout<F: Future>(after: Duration, fut: F) -> Timeout<F> {
    Timeout {
        fut,
        after,
        slot: None,
    }
}

impl<F: Future> Future for Timeout<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        let (poll, replaced) = TABLE.with_borrow_mut(|t| match *this.slot {
            None => {
                *this.slot = Some(t.register(*this.after, cx.waker()));
                (Poll::Pending, None)
            }
            // A slot of a runtime that has since been replaced on this thread never fires.
            Some((epoch, _)) if epoch != t.epoch => (Poll::Pending, None),
            Some((_, i)) => {
                let s = &mut t.slots[i];
                if s.fired {
                    return (Poll::Ready(Err(Elapsed)), None);
                }
                match &mut s.waker {
                    Some(w) if w.will_wake(cx.waker()) => (Poll::Pending, None),
                    w => (Poll::Pending, w.replace(cx.waker().clone())),
                }
            }
        });
        // A waker is dropped outside the table's borrow.
        drop(replaced);
        poll
    }
}

/// Resolves once `after` has passed (coarse: see the module's precision note).
pub async fn sleep(after: Duration) {
    let _ = timeout(after, std::future::pending::<()>()).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use crate::runtime::for_tests as rt;

    #[test]
    fn fires_after_its_duration_never_before() {
        rt().block_on(async {
            for ms in [1u64, 30, 120] {
                let t0 = Instant::now();
                let r = timeout(Duration::from_millis(ms), std::future::pending::<()>()).await;
                let took = t0.elapsed();
                assert_eq!(r, Err(Elapsed));
                assert!(
                    took >= Duration::from_millis(ms),
                    "{ms} ms fired after {took:?}"
                );
                assert!(
                    took < Duration::from_millis(ms + 500),
                    "{ms} ms fired after {took:?}"
                );
            }
        });
    }

    #[test]
    fn a_finished_operation_returns_its_value_and_frees_its_slot() {
        rt().block_on(async {
            for i in 0..100u32 {
                let r = timeout(Duration::from_secs(5), async {
                    monoio::time::sleep(Duration::from_millis(1)).await;
                    i
                })
                .await;
                assert_eq!(r, Ok(i));
            }
            TABLE.with_borrow(|t| {
                assert_eq!(t.pending, 0);
                // Slots are reused, not grown per operation.
                assert!(t.slots.len() <= 2, "{} slots", t.slots.len());
            });
        });
    }

    #[test]
    fn only_the_expired_one_of_many_fires() {
        rt().block_on(async {
            let long = monoio::spawn(timeout(Duration::from_secs(30), async {
                monoio::time::sleep(Duration::from_millis(200)).await;
                "done"
            }));
            let short = timeout(Duration::from_millis(20), std::future::pending::<()>()).await;
            assert_eq!(short, Err(Elapsed));
            assert_eq!(long.await, Ok("done"));
        });
    }

    #[test]
    fn a_new_runtime_on_the_same_thread_gets_a_sweeper() {
        for _ in 0..3 {
            rt().block_on(async {
                start();
                let r = timeout(Duration::from_millis(5), std::future::pending::<()>()).await;
                assert_eq!(r, Err(Elapsed));
            });
        }
    }

    #[test]
    fn sleep_waits_at_least_its_duration() {
        rt().block_on(async {
            let t0 = Instant::now();
            sleep(Duration::from_millis(40)).await;
            assert!(t0.elapsed() >= Duration::from_millis(40));
        });
    }
}
